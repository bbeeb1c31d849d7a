//! Custom rules: the shape admins write ([`RuleSpec`]), save-time validation that lists
//! every problem at once, and the compiled form ([`Rule`]) the engine evaluates —
//! templates parsed, JSONPaths and regular expressions compiled, defaults applied.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderName;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::action::{Action, ActionSpec};
use crate::context::RequestContext;
use crate::secret::Secret;
use crate::template::{encode_component, Param, Piece, Place, RenderError, Template, UnknownPlaceholder};

/// One validation problem: the field it is about and what is wrong.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A `{"key", "value"}` pair (headers, query, OAuth params).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

/// An extra token-request parameter of OAuth2 client credentials: `{"key", "value",
/// "in"}`, `in` being `body` (default: a form field, or a query parameter for a `GET`
/// token request), `query` or `header`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthParam {
    pub key: String,
    pub value: String,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub in_: Option<String>,
}

/// Where an OAuth2 token-request parameter goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamIn {
    Body,
    Query,
    Header,
}

/// Where a managed object came from.
pub const SOURCE_API: &str = "api";

/// A rule as written by an admin (API body or policy file), and as read back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default)]
    pub headers: Vec<KeyValue>,
    #[serde(default)]
    pub query: Vec<KeyValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub body: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<String>,
    #[serde(default)]
    pub response_actions: Vec<ActionSpec>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_ttl_s: Option<u64>,
}

/// Authentication to the rule's API, as written. Which fields are required depends on
/// `type`; validation says which are missing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthSpec {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Secret>,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub in_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Vec<AuthParam>>,
    /// How the client authenticates to the token endpoint: `body` (default,
    /// `client_secret_post`) or `basic` (`client_secret_basic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<String>,
}

impl AuthSpec {
    /// The secrets of this auth, by field path, for the store to encrypt.
    pub fn secrets(&self) -> Vec<(&'static str, &Secret)> {
        [("auth.password", &self.password), ("auth.value", &self.value), ("auth.client_secret", &self.client_secret)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
            .collect()
    }

    /// Mutable access to a secret by field path.
    pub fn secret_mut(&mut self, path: &str) -> Option<&mut Option<Secret>> {
        match path {
            "auth.password" => Some(&mut self.password),
            "auth.value" => Some(&mut self.value),
            "auth.client_secret" => Some(&mut self.client_secret),
            _ => None,
        }
    }
}

/// OAuth2 client-credentials settings; rules with equal settings share one token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OAuthClient {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub scopes: Vec<String>,
    pub token_method_get: bool,
    pub params: Vec<(ParamIn, String, String)>,
    pub basic_client_auth: bool,
}

/// Compiled authentication.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    Basic { username: String, password: Secret },
    ApiKey { name: String, value: Secret, in_query: bool },
    OAuth2(Arc<OAuthClient>),
}

/// The effect of an error when `on_error` applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }
}

/// A JSON body template: string leaves may hold placeholders.
#[derive(Debug, Clone)]
pub enum JsonTemplate {
    Literal(Value),
    Text(Template),
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
}

impl JsonTemplate {
    /// Renders straight into JSON text: the same bytes as serialising [`Self::render`]'s
    /// value (object keys are unique, from a parsed JSON object), without building it.
    fn render_into(&self, ctx: &RequestContext, out: &mut Vec<u8>) -> Result<(), RenderError> {
        fn write(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
            // Serialising a JSON value or a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, value);
        }
        match self {
            JsonTemplate::Literal(v) => write(out, v),
            JsonTemplate::Text(t) => write(out, &t.render_json(ctx)?),
            JsonTemplate::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.render_into(ctx, out)?;
                }
                out.push(b']');
            }
            JsonTemplate::Object(fields) => {
                out.push(b'{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(out, key.as_str());
                    out.push(b':');
                    value.render_into(ctx, out)?;
                }
                out.push(b'}');
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn render(&self, ctx: &RequestContext) -> Result<Value, RenderError> {
        Ok(match self {
            JsonTemplate::Literal(v) => v.clone(),
            JsonTemplate::Text(t) => t.render_json(ctx)?,
            JsonTemplate::Array(items) => Value::Array(items.iter().map(|i| i.render(ctx)).collect::<Result<_, _>>()?),
            JsonTemplate::Object(fields) => Value::Object(
                fields.iter().map(|(k, v)| Ok((k.clone(), v.render(ctx)?))).collect::<Result<_, RenderError>>()?,
            ),
        })
    }

    fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
        match self {
            JsonTemplate::Literal(_) => {}
            JsonTemplate::Text(t) => out.extend(t.params()),
            JsonTemplate::Array(items) => items.iter().for_each(|i| i.params(out)),
            JsonTemplate::Object(fields) => fields.iter().for_each(|(_, v)| v.params(out)),
        }
    }
}

/// A compiled request body.
#[derive(Debug, Clone)]
pub enum BodyTemplate {
    Json(JsonTemplate),
    Form(Vec<(String, Template)>),
}

/// The rule URL split where encodings differ: the origin is literal, path placeholders
/// are encoded as one segment, query placeholders as one query value.
#[derive(Debug, Clone)]
pub struct UrlTemplate {
    origin: String,
    path: Template,
    query: Option<Template>,
}

impl UrlTemplate {
    /// `scheme://host[:port]`, the unit of circuit breaking.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// A request ready to send (before authentication is applied).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RenderedRequest {
    pub method: reqwest::Method,
    pub url: String,
    pub headers: Vec<(HeaderName, String)>,
    pub body: Option<RenderedBody>,
}

/// A rendered body with its content type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RenderedBody {
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

/// A compiled, validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    /// The normalized spec (defaults filled in), as reads return it.
    pub spec: RuleSpec,
    pub source: String,
    pub version: i64,
    /// RFC 3339; set by the registry.
    pub created_at: String,
    /// RFC 3339; set by the registry.
    pub updated_at: String,
    pub enabled: bool,
    pub method: reqwest::Method,
    pub url: UrlTemplate,
    pub headers: Vec<(HeaderName, Template)>,
    pub query: Vec<(String, Template)>,
    pub body: Option<BodyTemplate>,
    pub auth: Auth,
    pub jsonp: bool,
    pub actions: Vec<Action>,
    pub match_any: bool,
    pub timeout: Duration,
    pub on_error: Effect,
    pub cache_ttl: Duration,
}

/// Checks a rule id: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && id.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Adds an `id` problem when `id` is not valid (rules, policies, webhooks).
pub fn check_id(id: &str, errors: &mut Vec<FieldError>) {
    if !valid_id(id) {
        errors.push(FieldError::new(
            "id",
            format!("`{id}` is not a valid id: use 1 to 64 of a-z, 0-9, `_` and `-`, starting with a letter or digit"),
        ));
    }
}

/// An object's public JSON: its spec plus the read-only fields every managed object
/// carries.
pub fn with_meta(spec: &impl Serialize, source: &str, version: i64, created_at: &str, updated_at: &str) -> Value {
    let mut v = serde_json::to_value(spec).unwrap_or_default();
    if let Value::Object(map) = &mut v {
        map.insert("source".into(), source.into());
        map.insert("version".into(), version.into());
        map.insert("created_at".into(), created_at.into());
        map.insert("updated_at".into(), updated_at.into());
    }
    v
}

/// Largest rule timeout accepted.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

impl Rule {
    /// Validates a spec and compiles it; every problem is listed.
    pub fn compile(mut spec: RuleSpec, source: &str, version: i64) -> Result<Rule, Vec<FieldError>> {
        let mut errors = Vec::new();
        let id = spec.id.clone().unwrap_or_default();
        check_id(&id, &mut errors);
        let method = match spec.method.as_deref() {
            Some("GET") => Some(reqwest::Method::GET),
            Some("POST") => Some(reqwest::Method::POST),
            Some(other) => {
                errors.push(FieldError::new("method", format!("`{other}` is not supported; use `GET` or `POST`")));
                None
            }
            None => {
                errors.push(FieldError::new("method", "`method` is required (`GET` or `POST`)"));
                None
            }
        };
        let url = match spec.url.as_deref() {
            Some(url) => compile_url(url, &mut errors),
            None => {
                errors.push(FieldError::new("url", "`url` is required"));
                None
            }
        };
        let mut headers = Vec::new();
        for (i, kv) in spec.headers.iter().enumerate() {
            let field = format!("headers[{i}]");
            match HeaderName::from_bytes(kv.key.as_bytes()) {
                Ok(name) => {
                    if let Some(t) = template(&kv.value, &format!("{field}.value"), &mut errors) {
                        headers.push((name, t));
                    }
                }
                Err(_) => errors.push(FieldError::new(
                    format!("{field}.key"),
                    format!("`{}` is not a valid header name (placeholders are not allowed in names)", kv.key),
                )),
            }
        }
        let mut query = Vec::new();
        for (i, kv) in spec.query.iter().enumerate() {
            let field = format!("query[{i}]");
            no_placeholder(&kv.key, &format!("{field}.key"), "query parameter names", &mut errors);
            if kv.key.is_empty() {
                errors.push(FieldError::new(format!("{field}.key"), "a query parameter needs a name"));
            }
            if let Some(t) = template(&kv.value, &format!("{field}.value"), &mut errors) {
                // A `query` entry is one value: its literal text is encoded too, so
                // `a&b` stays one value (placeholders are encoded when rendered).
                let pieces = t
                    .pieces()
                    .iter()
                    .map(|p| match p {
                        Piece::Literal(text) => Piece::Literal(encode_component(text)),
                        param => param.clone(),
                    })
                    .collect();
                query.push((encode_component(&kv.key), Template::from_pieces(pieces)));
            }
        }
        let body_format = spec.body_format.clone().unwrap_or_else(|| "json".into());
        let body = match (&spec.body, method.as_ref()) {
            (None, _) => None,
            (Some(_), Some(&reqwest::Method::GET)) => {
                errors.push(FieldError::new(
                    "body",
                    "a GET rule has no body; use `POST`, or move the values into `query`",
                ));
                None
            }
            (Some(body), _) => match body_format.as_str() {
                "json" => json_template(body, "body", &mut errors).map(BodyTemplate::Json),
                "form" => form_template(body, &mut errors).map(BodyTemplate::Form),
                _ => None,
            },
        };
        if !matches!(body_format.as_str(), "json" | "form") {
            errors.push(FieldError::new(
                "body_format",
                format!("`{body_format}` is not supported; use `json` or `form`"),
            ));
        }
        let auth = compile_auth(spec.auth.as_ref(), &mut errors);
        let verification = spec.verification.clone().unwrap_or_else(|| "json".into());
        if !matches!(verification.as_str(), "json" | "jsonp") {
            errors.push(FieldError::new(
                "verification",
                format!("`{verification}` is not supported; use `json` or `jsonp`"),
            ));
        }
        let actions: Vec<Action> = spec
            .response_actions
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Action::compile(a, &format!("response_actions[{i}]"), &mut errors))
            .collect();
        let match_ = spec.match_.clone().unwrap_or_else(|| "all".into());
        if !matches!(match_.as_str(), "all" | "any") {
            errors.push(FieldError::new("match", format!("`{match_}` is not supported; use `all` or `any`")));
        }
        let timeout_ms = spec.timeout_ms.unwrap_or(2000);
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            errors.push(FieldError::new("timeout_ms", format!("must be between 1 and {MAX_TIMEOUT_MS}")));
        }
        let on_error = match spec.on_error.as_deref() {
            None | Some("deny") => Effect::Deny,
            Some("allow") => Effect::Allow,
            Some(other) => {
                errors.push(FieldError::new("on_error", format!("`{other}` is not supported; use `deny` or `allow`")));
                Effect::Deny
            }
        };
        if spec.name.as_deref().is_some_and(|n| n.len() > 200) {
            errors.push(FieldError::new("name", "must be at most 200 characters"));
        }
        let (Some(method), Some(url), Some(auth), true) = (method, url, auth, errors.is_empty()) else {
            return Err(errors);
        };
        spec.name = Some(spec.name.clone().unwrap_or_else(|| id.clone()));
        spec.enabled = Some(spec.enabled.unwrap_or(true));
        spec.body_format = Some(body_format);
        spec.auth = Some(spec.auth.clone().unwrap_or_else(|| AuthSpec { kind: "none".into(), ..Default::default() }));
        spec.verification = Some(verification.clone());
        spec.match_ = Some(match_.clone());
        spec.timeout_ms = Some(timeout_ms);
        spec.on_error = Some(on_error.as_str().into());
        spec.cache_ttl_s = Some(spec.cache_ttl_s.unwrap_or(0));
        Ok(Rule {
            id,
            enabled: spec.enabled.unwrap_or(true),
            method,
            url,
            headers,
            query,
            body,
            auth,
            jsonp: verification == "jsonp",
            actions,
            match_any: match_ == "any",
            timeout: Duration::from_millis(timeout_ms),
            on_error,
            cache_ttl: Duration::from_secs(spec.cache_ttl_s.unwrap_or(0)),
            source: source.to_owned(),
            version,
            created_at: String::new(),
            updated_at: String::new(),
            spec,
        })
    }

    /// The rule as reads show it: the normalized spec, secrets masked, and the
    /// read-only fields.
    pub fn to_json(&self) -> Value {
        with_meta(&self.spec, &self.source, self.version, &self.created_at, &self.updated_at)
    }

    /// Every parameter the rule uses, for the engine to check up front.
    pub fn params(&self) -> Vec<&Param> {
        let mut out: Vec<&Param> = self.url.path.params().collect();
        if let Some(q) = &self.url.query {
            out.extend(q.params());
        }
        out.extend(self.headers.iter().flat_map(|(_, t)| t.params()));
        out.extend(self.query.iter().flat_map(|(_, t)| t.params()));
        match &self.body {
            Some(BodyTemplate::Json(j)) => j.params(&mut out),
            Some(BodyTemplate::Form(f)) => out.extend(f.iter().flat_map(|(_, t)| t.params())),
            None => {}
        }
        out
    }

    /// Renders the request for a context, each value encoded for where it lands.
    pub fn render(&self, ctx: &RequestContext) -> Result<RenderedRequest, RenderError> {
        let mut url = self.url.origin.clone();
        url.push_str(&self.url.path.render(ctx, Place::PathSegment)?);
        let mut sep = '?';
        if let Some(q) = &self.url.query {
            url.push(sep);
            url.push_str(&q.render(ctx, Place::QueryValue)?);
            sep = '&';
        }
        for (key, value) in &self.query {
            url.push(sep);
            url.push_str(key);
            url.push('=');
            url.push_str(&value.render(ctx, Place::QueryValue)?);
            sep = '&';
        }
        let headers = self
            .headers
            .iter()
            .map(|(name, t)| Ok((name.clone(), t.render(ctx, Place::Header)?)))
            .collect::<Result<Vec<_>, RenderError>>()?;
        let body = match &self.body {
            None => None,
            Some(BodyTemplate::Json(j)) => Some(RenderedBody {
                content_type: "application/json",
                bytes: {
                    let mut bytes = Vec::with_capacity(128);
                    j.render_into(ctx, &mut bytes)?;
                    bytes
                },
            }),
            Some(BodyTemplate::Form(fields)) => {
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                for (k, t) in fields {
                    form.append_pair(k, &t.render(ctx, Place::Raw)?);
                }
                Some(RenderedBody {
                    content_type: "application/x-www-form-urlencoded",
                    bytes: form.finish().into_bytes(),
                })
            }
        };
        Ok(RenderedRequest { method: self.method.clone(), url, headers, body })
    }
}

fn template(text: &str, field: &str, errors: &mut Vec<FieldError>) -> Option<Template> {
    match Template::parse(text) {
        Ok(t) => Some(t),
        Err(unknown) => {
            push_unknown(unknown, field, errors);
            None
        }
    }
}

fn push_unknown(unknown: Vec<UnknownPlaceholder>, field: &str, errors: &mut Vec<FieldError>) {
    errors.extend(unknown.into_iter().map(|u| FieldError::new(field, u.to_string())));
}

fn no_placeholder(text: &str, field: &str, what: &str, errors: &mut Vec<FieldError>) {
    match Template::parse(text) {
        Ok(t) if !t.has_params() => {}
        _ => errors.push(FieldError::new(field, format!("placeholders are not allowed in {what}"))),
    }
}

fn compile_url(raw: &str, errors: &mut Vec<FieldError>) -> Option<UrlTemplate> {
    let before = errors.len();
    if let Err(unknown) = Template::parse(raw) {
        push_unknown(unknown, "url", errors);
    }
    if raw.contains('#') {
        errors.push(FieldError::new("url", "a URL fragment (`#…`) is never sent; remove it"));
    }
    let Some(scheme_end) = raw.find("://") else {
        errors.push(FieldError::new("url", format!("`{raw}` is not an absolute http:// or https:// URL")));
        return None;
    };
    let after_scheme = scheme_end + 3;
    let authority_len =
        raw.get(after_scheme..).unwrap_or_default().find(['/', '?']).unwrap_or(raw.len() - after_scheme);
    let (origin, rest) = raw.split_at(after_scheme + authority_len);
    no_placeholder(origin, "url", "the scheme, host or port of a URL", errors);
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    // Check the shape with every placeholder standing in as plain text.
    let probe = Template::parse(raw).ok().map(|t| {
        t.pieces()
            .iter()
            .map(|p| match p {
                crate::template::Piece::Literal(s) => s.as_str(),
                crate::template::Piece::Param(_) => "x",
            })
            .collect::<String>()
    });
    if let Some(probe) = probe {
        match url::Url::parse(&probe) {
            Ok(u) if !matches!(u.scheme(), "http" | "https") => errors
                .push(FieldError::new("url", format!("scheme `{}` is not allowed; use http or https", u.scheme()))),
            Ok(u) if u.host_str().is_none_or(str::is_empty) => {
                errors.push(FieldError::new("url", "the URL has no host"))
            }
            Ok(u) if !u.username().is_empty() || u.password().is_some() => errors
                .push(FieldError::new("url", "credentials in the URL are not allowed; use `auth` so they stay secret")),
            Ok(_) => {}
            Err(e) => errors.push(FieldError::new("url", format!("`{raw}` is not a valid URL: {e}"))),
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(UrlTemplate {
        origin: origin.to_owned(),
        path: Template::parse(path).ok()?,
        query: match query {
            Some(q) => Some(Template::parse(q).ok()?),
            None => None,
        },
    })
}

fn json_template(value: &Value, field: &str, errors: &mut Vec<FieldError>) -> Option<JsonTemplate> {
    Some(match value {
        Value::String(s) => JsonTemplate::Text(template(s, field, errors)?),
        Value::Array(items) => JsonTemplate::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| json_template(v, &format!("{field}[{i}]"), errors))
                .collect::<Vec<_>>()
                .into_iter()
                .collect::<Option<_>>()?,
        ),
        Value::Object(map) => {
            let mut fields = Vec::new();
            let mut ok = true;
            for (k, v) in map {
                let f = format!("{field}.{k}");
                no_placeholder(k, &f, "JSON keys", errors);
                match json_template(v, &f, errors) {
                    Some(t) => fields.push((k.clone(), t)),
                    None => ok = false,
                }
            }
            if !ok {
                return None;
            }
            JsonTemplate::Object(fields)
        }
        other => JsonTemplate::Literal(other.clone()),
    })
}

fn form_template(value: &Value, errors: &mut Vec<FieldError>) -> Option<Vec<(String, Template)>> {
    let Value::Object(map) = value else {
        errors.push(FieldError::new("body", "a form body is an object of field names to string values"));
        return None;
    };
    let mut fields = Vec::new();
    for (k, v) in map {
        let field = format!("body.{k}");
        no_placeholder(k, &field, "form field names", errors);
        match v {
            Value::String(s) => fields.extend(template(s, &field, errors).map(|t| (k.clone(), t))),
            Value::Number(_) | Value::Bool(_) => fields.push((k.clone(), Template::literal(&v.to_string()))),
            _ => errors.push(FieldError::new(field, "a form field value must be a string, number or boolean")),
        }
    }
    Some(fields)
}

fn compile_auth_params(params: &[AuthParam], errors: &mut Vec<FieldError>) -> Vec<(ParamIn, String, String)> {
    let mut out = Vec::with_capacity(params.len());
    for (i, p) in params.iter().enumerate() {
        let field = |name: &str| format!("auth.params[{i}].{name}");
        if p.key.is_empty() {
            errors.push(FieldError::new(field("key"), "must not be empty"));
        }
        no_placeholder(&p.key, &field("key"), "auth settings", errors);
        no_placeholder(&p.value, &field("value"), "auth settings", errors);
        let place = match p.in_.as_deref() {
            None | Some("body") => ParamIn::Body,
            Some("query") => ParamIn::Query,
            Some("header") => {
                if HeaderName::from_bytes(p.key.as_bytes()).is_err() {
                    errors.push(FieldError::new(field("key"), format!("`{}` is not a valid header name", p.key)));
                }
                if reqwest::header::HeaderValue::from_str(&p.value).is_err() {
                    errors.push(FieldError::new(field("value"), "holds characters that cannot go in a header"));
                }
                ParamIn::Header
            }
            Some(other) => {
                errors.push(FieldError::new(
                    field("in"),
                    format!("`{other}` is not supported; use `body`, `query` or `header`"),
                ));
                ParamIn::Body
            }
        };
        out.push((place, p.key.clone(), p.value.clone()));
    }
    out
}

/// Compiles an `auth` object (rules and webhooks); every problem goes to `errors`
/// with a field path under `auth.`.
pub(crate) fn compile_auth(spec: Option<&AuthSpec>, errors: &mut Vec<FieldError>) -> Option<Auth> {
    let Some(spec) = spec else { return Some(Auth::None) };
    let before = errors.len();
    let mut required = |name: &str, present: bool| {
        if !present {
            errors.push(FieldError::new(
                format!("auth.{name}"),
                format!("`{name}` is required for auth type `{}`", spec.kind),
            ));
        }
    };
    let non_empty = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    let secret = |s: &Option<Secret>| s.as_ref().is_some_and(|s| !s.expose().is_empty());
    let auth = match spec.kind.as_str() {
        "none" => Some(Auth::None),
        "basic" => {
            required("username", non_empty(&spec.username));
            required("password", secret(&spec.password));
            Some(Auth::Basic {
                username: spec.username.clone().unwrap_or_default(),
                password: spec.password.clone().unwrap_or_default(),
            })
        }
        "api_key" => {
            required("name", non_empty(&spec.name));
            required("value", secret(&spec.value));
            let in_query = match spec.in_.as_deref() {
                None | Some("header") => false,
                Some("query") => true,
                Some(other) => {
                    errors.push(FieldError::new(
                        "auth.in",
                        format!("`{other}` is not supported; use `header` or `query`"),
                    ));
                    false
                }
            };
            let name = spec.name.clone().unwrap_or_default();
            if !in_query && !name.is_empty() && HeaderName::from_bytes(name.as_bytes()).is_err() {
                errors.push(FieldError::new("auth.name", format!("`{name}` is not a valid header name")));
            }
            Some(Auth::ApiKey { name, value: spec.value.clone().unwrap_or_default(), in_query })
        }
        "oauth2_client_credentials" => {
            required("token_url", non_empty(&spec.token_url));
            required("client_id", non_empty(&spec.client_id));
            required("client_secret", secret(&spec.client_secret));
            if let Some(url) = spec.token_url.as_deref().filter(|u| !u.is_empty()) {
                match url::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                    _ => errors
                        .push(FieldError::new("auth.token_url", format!("`{url}` is not an http:// or https:// URL"))),
                }
                no_placeholder(url, "auth.token_url", "auth settings", errors);
            }
            let token_method_get = match spec.token_method.as_deref() {
                None | Some("POST") => false,
                Some("GET") => true,
                Some(other) => {
                    errors.push(FieldError::new(
                        "auth.token_method",
                        format!("`{other}` is not supported; use `POST` or `GET`"),
                    ));
                    false
                }
            };
            let basic_client_auth = match spec.client_auth.as_deref() {
                None | Some("body") => false,
                Some("basic") => true,
                Some(other) => {
                    errors.push(FieldError::new(
                        "auth.client_auth",
                        format!("`{other}` is not supported; use `body` or `basic`"),
                    ));
                    false
                }
            };
            Some(Auth::OAuth2(Arc::new(OAuthClient {
                token_url: spec.token_url.clone().unwrap_or_default(),
                client_id: spec.client_id.clone().unwrap_or_default(),
                client_secret: spec.client_secret.clone().unwrap_or_default(),
                scopes: spec.scopes.clone().unwrap_or_default(),
                token_method_get,
                params: compile_auth_params(spec.params.as_deref().unwrap_or_default(), errors),
                basic_client_auth,
            })))
        }
        other => {
            errors.push(FieldError::new(
                "auth.type",
                format!("`{other}` is not supported; use `none`, `basic`, `api_key` or `oauth2_client_credentials`"),
            ));
            None
        }
    };
    if errors.len() > before {
        return None;
    }
    auth
}

#[cfg(test)]
mod render_tests {
    use super::*;

    #[test]
    fn json_bodies_render_as_their_value_serialises() {
        let body = serde_json::json!({
            "user": "%username%",
            "groups": "%groups%",
            "ip": "%remote_ip%",
            "nested": {"list": [1, "two", {"k": "v \" \\ \u{1}"}], "dev": "dev=%device_id%"},
            "n": 3.5,
            "none": null,
            "t": true,
            "empty": {},
            "arr": []
        });
        let mut errors = Vec::new();
        let template = json_template(&body, "body", &mut errors).unwrap_or_else(|| panic!("{errors:?}"));
        assert!(errors.is_empty(), "{errors:?}");
        let input: crate::context::ContextInput = serde_json::from_value(serde_json::json!({
            "application": "payroll",
            "username": "al\"ice",
            "groups": ["g1", "g\u{2}2"],
            "remote_ip": "203.0.113.7",
            "device_id": "d/1 é"
        }))
        .expect("input");
        let ctx = RequestContext::parse(input).expect("context");
        let mut direct = Vec::new();
        template.render_into(&ctx, &mut direct).expect("render");
        let via_value = serde_json::to_vec(&template.render(&ctx).expect("render")).expect("encode");
        assert_eq!(String::from_utf8(direct).unwrap(), String::from_utf8(via_value).unwrap());
    }
}
