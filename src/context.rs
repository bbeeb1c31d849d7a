//! The request context a gateway sends: who, from where, on which device, for which
//! application. Parsed once at the edge; the engine only ever sees [`RequestContext`].

use std::collections::HashMap;

use serde::Deserialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The JSON body of `POST /v1/decisions` as the caller sends it.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContextInput {
    /// The application the user wants to reach (required).
    pub application: Option<String>,
    pub username: Option<String>,
    pub groups: Option<Vec<String>>,
    pub group_names: Option<Vec<String>>,
    pub remote_ip: Option<String>,
    pub internal_addr: Option<String>,
    pub user_agent: Option<String>,
    pub device_id: Option<String>,
    /// PEM, or the URL-escaped PEM of nginx's `$ssl_client_escaped_cert`.
    pub client_certificate: Option<String>,
    /// Client request headers, for `%headers.NAME%`.
    pub headers: Option<HashMap<String, String>>,
}

/// Why a context was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ContextError {
    #[error("`application` is required")]
    MissingApplication,
    #[error("`client_certificate` is not a parsable X.509 certificate: {0}")]
    BadCertificate(String),
}

impl ContextError {
    /// The request field the problem is about.
    pub fn field(&self) -> &'static str {
        match self {
            ContextError::MissingApplication => "application",
            ContextError::BadCertificate(_) => "client_certificate",
        }
    }
}

/// Values derived from the client certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct CertInfo {
    /// SHA-1 of the DER, lowercase hex.
    pub sha1: String,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256: String,
    /// Subject common name, when there is one.
    pub common_name: Option<String>,
    /// Subject alternative names (DNS names, e-mail addresses, URIs, IP addresses).
    pub alt_names: Vec<String>,
}

/// A validated request context.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub application: String,
    pub username: Option<String>,
    pub groups: Option<Vec<String>>,
    pub group_names: Option<Vec<String>>,
    pub remote_ip: Option<String>,
    pub internal_addr: Option<String>,
    pub user_agent: Option<String>,
    pub device_id: Option<String>,
    pub cert: Option<CertInfo>,
    /// Header names lowercased.
    pub headers: HashMap<String, String>,
}

impl RequestContext {
    /// Turns caller input into a context; the certificate is parsed here, once.
    pub fn parse(input: ContextInput) -> Result<RequestContext, ContextError> {
        let application = input.application.filter(|a| !a.trim().is_empty()).ok_or(ContextError::MissingApplication)?;
        let cert = match input.client_certificate.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(parse_certificate(text)?),
        };
        let headers = input.headers.unwrap_or_default().into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
        Ok(RequestContext {
            application,
            username: non_empty(input.username),
            groups: input.groups,
            group_names: input.group_names,
            remote_ip: non_empty(input.remote_ip),
            internal_addr: non_empty(input.internal_addr),
            user_agent: non_empty(input.user_agent),
            device_id: non_empty(input.device_id),
            cert,
            headers,
        })
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

/// Parses a PEM certificate, also in nginx's URL-escaped form, and derives the
/// `cert_*` values. Only the first certificate of a chain is used.
pub fn parse_certificate(text: &str) -> Result<CertInfo, ContextError> {
    let unescaped;
    // A PEM never holds `%`; the escaped form always does (`BEGIN%20CERTIFICATE`: nginx
    // keeps letters and `-`, so "-----BEGIN" alone does not tell the forms apart).
    let text = if !text.contains('%') {
        text
    } else {
        // `$ssl_client_escaped_cert` percent-encodes spaces and newlines; `+` is a
        // literal base64 character there, so this is not form decoding.
        unescaped = percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map_err(|_| ContextError::BadCertificate("not valid UTF-8 after unescaping".into()))?
            .into_owned();
        unescaped.as_str()
    };
    let der = pem_to_der(text)?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| ContextError::BadCertificate(format!("bad DER: {e}")))?;
    let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
    let mut alt_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    alt_names.push((*s).to_owned())
                }
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        alt_names.push(ip.to_string())
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        sha1: hex::encode(Sha1::digest(&der)),
        sha256: hex::encode(Sha256::digest(&der)),
        common_name,
        alt_names,
    })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

fn pem_to_der(text: &str) -> Result<Vec<u8>, ContextError> {
    use base64::Engine as _;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start =
        text.find(BEGIN).ok_or_else(|| ContextError::BadCertificate("no BEGIN CERTIFICATE line".into()))? + BEGIN.len();
    let rest = text.get(start..).unwrap_or_default();
    let end = rest.find(END).ok_or_else(|| ContextError::BadCertificate("no END CERTIFICATE line".into()))?;
    let body: String = rest.get(..end).unwrap_or_default().chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| ContextError::BadCertificate("certificate body is not base64".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_application_is_an_error() {
        let err = RequestContext::parse(ContextInput::default()).unwrap_err();
        assert_eq!(err, ContextError::MissingApplication);
    }

    #[test]
    fn garbage_certificate_is_an_error() {
        let input = ContextInput {
            application: Some("a".into()),
            client_certificate: Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----".into()),
            ..Default::default()
        };
        assert!(matches!(RequestContext::parse(input), Err(ContextError::BadCertificate(_))));
    }
}
