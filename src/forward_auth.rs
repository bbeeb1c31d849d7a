//! Forward auth: the request context from the headers a gateway sends (nginx
//! `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth`).

use std::collections::HashMap;

use actix_web::http::header::{HeaderMap, HeaderValue};

use crate::config::ForwardAuthHeaders;
use crate::context::{ContextError, ContextInput, RequestContext};

/// A header value as text. Header values are bytes: besides visible ASCII, gateways
/// pass UTF-8 as it is (a user name such as `jürgen@example.com` from the IdP).
fn text(value: &HeaderValue) -> Option<&str> {
    std::str::from_utf8(value.as_bytes()).ok()
}

fn first(headers: &HeaderMap, names: &[String]) -> Option<String> {
    names.iter().find_map(|n| {
        headers.get(n.as_str()).and_then(text).map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned)
    })
}

fn list(value: Option<String>) -> Option<Vec<String>> {
    value.map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
}

/// Builds the context from gateway headers; every header feeds `%headers.NAME%`.
pub fn context_from_headers(headers: &HeaderMap, names: &ForwardAuthHeaders) -> Result<RequestContext, ContextError> {
    let application =
        first(headers, &names.application).or_else(|| first(headers, &names.host).map(|h| application_from_host(&h)));
    let remote_ip = first(headers, &names.remote_ip).or_else(|| {
        first(headers, &names.forwarded_for).and_then(|v| v.split(',').next().map(|s| s.trim().to_owned()))
    });
    let mut all: HashMap<String, String> = HashMap::new();
    for (name, value) in headers {
        if name == actix_web::http::header::AUTHORIZATION {
            continue; // verdict's own token is not the client's header
        }
        if let Some(v) = text(value) {
            all.entry(name.as_str().to_owned())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(v)
                })
                .or_insert_with(|| v.to_owned());
        }
    }
    RequestContext::parse(ContextInput {
        application,
        username: first(headers, &names.username),
        groups: list(first(headers, &names.groups)),
        group_names: list(first(headers, &names.group_names)),
        remote_ip,
        internal_addr: first(headers, &names.internal_addr),
        user_agent: first(headers, &names.user_agent),
        device_id: first(headers, &names.device_id),
        client_certificate: first(headers, &names.client_certificate).map(certificate_from_header),
        headers: Some(all),
    })
}

/// A reason made fit for a header value: printable ASCII only, bounded length.
pub fn header_safe(reason: &str) -> String {
    let cleaned: String =
        reason.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).take(1024).collect();
    cleaned
}

/// The application named by a host header: the first of a list that proxies appended
/// to (`a.example.com, gw.internal`), without the port, lowercased (host names are
/// case-insensitive).
fn application_from_host(value: &str) -> String {
    let host = value.split(',').next().unwrap_or_default().trim();
    host_without_port(host).to_ascii_lowercase()
}

/// The certificate header as `RequestContext::parse` takes it. A PEM, or nginx's
/// escaped PEM, stays as it is. Traefik's `passTLSClientCert` sends the base64 of the
/// DER without the PEM armour, URL-escaped, a chain comma-separated: the first one is
/// put back into its armour.
fn certificate_from_header(value: String) -> String {
    if value.contains("BEGIN") {
        return value;
    }
    let first = value.split(',').next().unwrap_or_default().trim();
    let base64 = percent_encoding::percent_decode_str(first).decode_utf8_lossy();
    format!("-----BEGIN CERTIFICATE-----\n{base64}\n-----END CERTIFICATE-----\n")
}

/// `example.com:8443` → `example.com`; `[::1]:80` → `::1`.
fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}
