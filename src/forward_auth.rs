//! Forward auth: the request context from the headers a gateway sends (nginx
//! `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth`).

use std::collections::HashMap;

use actix_web::http::header::HeaderMap;

use crate::config::ForwardAuthHeaders;
use crate::context::{ContextError, ContextInput, RequestContext};

fn first(headers: &HeaderMap, names: &[String]) -> Option<String> {
    names.iter().find_map(|n| {
        headers
            .get(n.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    })
}

fn list(value: Option<String>) -> Option<Vec<String>> {
    value.map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
}

/// Builds the context from gateway headers; every header feeds `%headers.NAME%`.
pub fn context_from_headers(headers: &HeaderMap, names: &ForwardAuthHeaders) -> Result<RequestContext, ContextError> {
    let application = first(headers, &names.application)
        .or_else(|| first(headers, &names.host).map(|h| host_without_port(&h).to_owned()));
    let remote_ip = first(headers, &names.remote_ip).or_else(|| {
        first(headers, &names.forwarded_for).and_then(|v| v.split(',').next().map(|s| s.trim().to_owned()))
    });
    let mut all: HashMap<String, String> = HashMap::new();
    for (name, value) in headers {
        if name == actix_web::http::header::AUTHORIZATION {
            continue; // verdict's own token is not the client's header
        }
        if let Ok(v) = value.to_str() {
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
        client_certificate: first(headers, &names.client_certificate),
        headers: Some(all),
    })
}

/// A reason made fit for a header value: printable ASCII only, bounded length.
pub fn header_safe(reason: &str) -> String {
    let cleaned: String =
        reason.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).take(1024).collect();
    cleaned
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
