//! `%param%` placeholders: parsed once when a rule is saved into a [`Template`], and
//! rendered per decision with the encoding of the place the value lands in.
//!
//! Rendering is where injection is stopped: a value is percent-encoded as one path
//! segment or one query value, JSON-escaped by construction in JSON bodies (the body
//! is built as a `serde_json::Value`, never by pasting text), form-encoded in form
//! bodies, and refused in header values when it holds CR, LF or NUL.

use std::borrow::Cow;
use std::fmt;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::context::RequestContext;

/// A parameter a rule may reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Param {
    Username,
    InternalAddr,
    UserAgent,
    RemoteIp,
    DeviceId,
    Groups,
    GroupNames,
    CertThumbprint,
    CertThumbprintUpper,
    CertThumbprint256,
    CertThumbprint256Upper,
    CertName,
    CertAltName,
    /// A client request header, name lowercased.
    Header(String),
}

/// Every fixed placeholder name with its description (`GET /v1/parameters`).
pub const PARAMETERS: &[(&str, &str)] = &[
    ("username", "the user's name as the gateway knows it"),
    ("internal_addr", "the internal address of the resource the user wants to reach"),
    ("user_agent", "the client's User-Agent"),
    ("remote_ip", "the client's IP address"),
    ("device_id", "the device identifier"),
    (
        "groups",
        "the user's group ids joined with `,` (a JSON body leaf that is exactly the placeholder gets the JSON array)",
    ),
    (
        "group_names",
        "the user's group names joined with `,` (a JSON body leaf that is exactly the placeholder gets the JSON array)",
    ),
    ("cert_thumbprint", "SHA-1 of the client certificate's DER, lowercase hex"),
    ("cert_thumbprint_upper", "SHA-1 of the client certificate's DER, uppercase hex"),
    ("cert_thumbprint_256", "SHA-256 of the client certificate's DER, lowercase hex"),
    ("cert_thumbprint_256_upper", "SHA-256 of the client certificate's DER, uppercase hex"),
    ("cert_name", "the client certificate subject's common name"),
    ("cert_alt_name", "the client certificate's subject alternative names joined with `,`"),
    ("headers.NAME", "the client request header NAME (case-insensitive)"),
];

impl Param {
    /// Parses a placeholder name (without the `%`).
    pub fn from_name(name: &str) -> Option<Param> {
        Some(match name {
            "username" => Param::Username,
            "internal_addr" => Param::InternalAddr,
            "user_agent" => Param::UserAgent,
            "remote_ip" => Param::RemoteIp,
            "device_id" => Param::DeviceId,
            "groups" => Param::Groups,
            "group_names" => Param::GroupNames,
            "cert_thumbprint" => Param::CertThumbprint,
            "cert_thumbprint_upper" => Param::CertThumbprintUpper,
            "cert_thumbprint_256" => Param::CertThumbprint256,
            "cert_thumbprint_256_upper" => Param::CertThumbprint256Upper,
            "cert_name" => Param::CertName,
            "cert_alt_name" => Param::CertAltName,
            _ => {
                let header = name.strip_prefix("headers.")?;
                if header.is_empty() {
                    return None;
                }
                Param::Header(header.to_ascii_lowercase())
            }
        })
    }

    /// Whether the value is a list (`groups`, `group_names`).
    pub fn is_list(&self) -> bool {
        matches!(self, Param::Groups | Param::GroupNames)
    }

    /// The value for a context, `None` when the request lacks it.
    pub fn value<'c>(&self, ctx: &'c RequestContext) -> Option<Value<'c>> {
        let cert = || ctx.cert.as_ref();
        let s = |v: &'c Option<String>| v.as_deref().map(|s| Value::Str(Cow::Borrowed(s)));
        match self {
            Param::Username => s(&ctx.username),
            Param::InternalAddr => s(&ctx.internal_addr),
            Param::UserAgent => s(&ctx.user_agent),
            Param::RemoteIp => s(&ctx.remote_ip),
            Param::DeviceId => s(&ctx.device_id),
            Param::Groups => ctx.groups.as_deref().map(Value::List),
            Param::GroupNames => ctx.group_names.as_deref().map(Value::List),
            Param::CertThumbprint => cert().map(|c| Value::Str(Cow::Borrowed(&c.sha1))),
            Param::CertThumbprintUpper => cert().map(|c| Value::Str(Cow::Owned(c.sha1.to_ascii_uppercase()))),
            Param::CertThumbprint256 => cert().map(|c| Value::Str(Cow::Borrowed(&c.sha256))),
            Param::CertThumbprint256Upper => cert().map(|c| Value::Str(Cow::Owned(c.sha256.to_ascii_uppercase()))),
            Param::CertName => cert().and_then(|c| c.common_name.as_deref()).map(|n| Value::Str(Cow::Borrowed(n))),
            // Joined text even as a whole JSON leaf: only `%groups%` and
            // `%group_names%` become arrays (SPEC §3).
            Param::CertAltName => {
                cert().filter(|c| !c.alt_names.is_empty()).map(|c| Value::Str(Cow::Owned(c.alt_names.join(","))))
            }
            Param::Header(name) => ctx.headers.get(name).map(|v| Value::Str(Cow::Borrowed(v.as_str()))),
        }
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Param::Username => "username",
            Param::InternalAddr => "internal_addr",
            Param::UserAgent => "user_agent",
            Param::RemoteIp => "remote_ip",
            Param::DeviceId => "device_id",
            Param::Groups => "groups",
            Param::GroupNames => "group_names",
            Param::CertThumbprint => "cert_thumbprint",
            Param::CertThumbprintUpper => "cert_thumbprint_upper",
            Param::CertThumbprint256 => "cert_thumbprint_256",
            Param::CertThumbprint256Upper => "cert_thumbprint_256_upper",
            Param::CertName => "cert_name",
            Param::CertAltName => "cert_alt_name",
            Param::Header(h) => return write!(f, "%headers.{h}%"),
        };
        write!(f, "%{name}%")
    }
}

/// A parameter value: text, or a list that renders joined with `,`.
#[derive(Debug, Clone)]
pub enum Value<'c> {
    Str(Cow<'c, str>),
    List(&'c [String]),
}

impl Value<'_> {
    fn as_text(&self) -> Cow<'_, str> {
        match self {
            Value::Str(s) => Cow::Borrowed(s.as_ref()),
            Value::List(items) => Cow::Owned(items.join(",")),
        }
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Literal(String),
    Param(Param),
}

/// Text with placeholders, parsed once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// A placeholder name that is not known, with the nearest known one.
#[derive(Debug, Clone, PartialEq)]
pub struct UnknownPlaceholder {
    pub name: String,
    pub hint: Option<String>,
}

impl fmt::Display for UnknownPlaceholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown placeholder `%{}%`", self.name)?;
        if let Some(hint) = &self.hint {
            write!(f, "; did you mean `%{hint}%`?")?;
        }
        Ok(())
    }
}

/// Where a rendered value goes, which decides its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// One URL path segment: everything but unreserved characters is percent-encoded.
    PathSegment,
    /// One URL query value (or key).
    QueryValue,
    /// An HTTP header value: sent as is, refused with CR, LF or NUL.
    Header,
    /// Raw text (JSON string leaves and form values, encoded later by their serializer).
    Raw,
}

/// Why a template could not be rendered for a context.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RenderError {
    #[error("parameter `{0}` is missing from the request")]
    Missing(String),
    #[error("parameter `{0}` holds a CR, LF or NUL character and cannot go in a header")]
    HeaderInjection(String),
    #[error("parameter `{0}` is `.` or `..`, which cannot stand as a URL path segment")]
    DotSegment(String),
}

/// Unreserved characters of RFC 3986 stay; everything else is encoded, so a value can
/// never add a `/`, `?`, `&`, `=`, `#` or `+`.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

impl Template {
    /// Parses text. `%name%` is a placeholder when name starts with a letter and has
    /// at least three characters of letters, digits, `_`, `.` and `-`; any other `%`
    /// (as in `%20`) is literal.
    pub fn parse(text: &str) -> Result<Template, Vec<UnknownPlaceholder>> {
        let mut pieces = Vec::new();
        let mut unknown = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(pos) = rest.find('%') {
            let (before, from_pct) = rest.split_at(pos);
            literal.push_str(before);
            let after = from_pct.get(1..).unwrap_or_default();
            match placeholder_name(after) {
                Some(name) => {
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    match Param::from_name(name) {
                        Some(p) => pieces.push(Piece::Param(p)),
                        None => unknown.push(UnknownPlaceholder { name: name.to_owned(), hint: nearest_name(name) }),
                    }
                    rest = after.get(name.len() + 1..).unwrap_or_default();
                }
                None => {
                    literal.push('%');
                    rest = after;
                }
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        if unknown.is_empty() {
            Ok(Template { pieces })
        } else {
            Err(unknown)
        }
    }

    /// A template of literal text only.
    pub fn literal(text: &str) -> Template {
        Template { pieces: vec![Piece::Literal(text.to_owned())] }
    }

    /// The parameters this template uses.
    pub fn params(&self) -> impl Iterator<Item = &Param> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(p) => Some(p),
            Piece::Literal(_) => None,
        })
    }

    /// Whether the template holds any placeholder.
    pub fn has_params(&self) -> bool {
        self.params().next().is_some()
    }

    /// The parameter when the template is exactly one placeholder and nothing else.
    pub fn sole_param(&self) -> Option<&Param> {
        match self.pieces.as_slice() {
            [Piece::Param(p)] => Some(p),
            _ => None,
        }
    }

    /// The pieces, for callers that split a template (URLs).
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Builds a template from pieces.
    pub fn from_pieces(pieces: Vec<Piece>) -> Template {
        Template { pieces }
    }

    /// Renders with each value encoded for `place`; literal text is copied as is.
    pub fn render(&self, ctx: &RequestContext, place: Place) -> Result<String, RenderError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Param(param) => {
                    let value = param.value(ctx).ok_or_else(|| RenderError::Missing(param.to_string()))?;
                    let text = value.as_text();
                    encode_into(&mut out, &text, place, param)?;
                }
            }
        }
        Ok(out)
    }

    /// Renders for a JSON body leaf: a leaf that is exactly a list placeholder becomes
    /// a JSON array; anything else a JSON string (escaped by the serializer).
    pub fn render_json(&self, ctx: &RequestContext) -> Result<serde_json::Value, RenderError> {
        if let Some(param) = self.sole_param() {
            if let Some(Value::List(items)) = param.value(ctx) {
                return Ok(serde_json::Value::Array(items.iter().cloned().map(serde_json::Value::String).collect()));
            }
        }
        self.render(ctx, Place::Raw).map(serde_json::Value::String)
    }
}

fn encode_into(out: &mut String, text: &str, place: Place, param: &Param) -> Result<(), RenderError> {
    match place {
        Place::PathSegment => {
            if text == "." || text == ".." {
                return Err(RenderError::DotSegment(param.to_string()));
            }
            out.extend(utf8_percent_encode(text, COMPONENT));
        }
        Place::QueryValue => out.extend(utf8_percent_encode(text, COMPONENT)),
        Place::Header => {
            if text.contains(['\r', '\n', '\0']) {
                return Err(RenderError::HeaderInjection(param.to_string()));
            }
            out.push_str(text);
        }
        Place::Raw => out.push_str(text),
    }
    Ok(())
}

/// Percent-encodes literal text for a query component (keys and values of the
/// rule's `query` list).
pub fn encode_component(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// The placeholder name at the start of `s` (which follows a `%`), if any.
fn placeholder_name(s: &str) -> Option<&str> {
    let mut chars = s.char_indices();
    let (_, first) = chars.next()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    for (i, c) in chars {
        if c == '%' {
            return if i >= 3 { s.get(..i) } else { None };
        }
        if !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
            return None;
        }
    }
    None
}

/// The known placeholder nearest to an unknown one, by edit distance.
fn nearest_name(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    for prefix in ["header.", "headers_", "header_", "hdr."] {
        if let Some(rest) = lower.strip_prefix(prefix) {
            return Some(format!("headers.{rest}"));
        }
    }
    PARAMETERS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n != "headers.NAME")
        .map(|n| (strsim::levenshtein(&lower, n), n))
        .filter(|(d, n)| *d <= (n.len() / 2).max(3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RequestContext {
        RequestContext {
            application: "app".into(),
            username: Some("../../admin".into()),
            groups: Some(vec!["g1".into(), "g2".into()]),
            headers: [("accept-language".to_string(), "ok\r\nX-Injected: 1".to_string())].into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn percent_text_that_is_not_a_placeholder_stays_literal() {
        let t = Template::parse("a%20b%E2%80%99c/%username%/100%").unwrap();
        assert_eq!(
            t.pieces(),
            &[Piece::Literal("a%20b%E2%80%99c/".into()), Piece::Param(Param::Username), Piece::Literal("/100%".into())]
        );
    }

    #[test]
    fn unknown_placeholder_has_a_hint() {
        let err = Template::parse("%usernme%").unwrap_err();
        assert_eq!(err[0].to_string(), "unknown placeholder `%usernme%`; did you mean `%username%`?");
        let err = Template::parse("%header.X-Foo%").unwrap_err();
        assert_eq!(err[0].hint.as_deref(), Some("headers.x-foo"));
    }

    #[test]
    fn path_segment_encoding_keeps_one_segment() {
        let t = Template::parse("%username%").unwrap();
        assert_eq!(t.render(&ctx(), Place::PathSegment).unwrap(), "..%2F..%2Fadmin");
        let dots = RequestContext { username: Some("..".into()), ..ctx() };
        assert!(matches!(t.render(&dots, Place::PathSegment), Err(RenderError::DotSegment(_))));
    }

    #[test]
    fn header_values_with_crlf_are_refused() {
        let t = Template::parse("%headers.Accept-Language%").unwrap();
        assert_eq!(
            t.render(&ctx(), Place::Header),
            Err(RenderError::HeaderInjection("%headers.accept-language%".into()))
        );
    }

    #[test]
    fn list_leaf_becomes_array() {
        let t = Template::parse("%groups%").unwrap();
        assert_eq!(t.render_json(&ctx()).unwrap(), serde_json::json!(["g1", "g2"]));
        let t = Template::parse("x%groups%").unwrap();
        assert_eq!(t.render_json(&ctx()).unwrap(), serde_json::json!("xg1,g2"));
    }

    #[test]
    fn missing_value_names_the_parameter() {
        let t = Template::parse("%device_id%").unwrap();
        assert_eq!(
            t.render(&ctx(), Place::Raw).unwrap_err().to_string(),
            "parameter `%device_id%` is missing from the request"
        );
    }
}
