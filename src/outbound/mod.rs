//! Calls to the third-party APIs behind custom rules: one pooled reqwest client,
//! authentication applied at send time, bodies capped, errors described without the
//! URL (which may carry an API key) or any secret.

mod oauth;

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Serialize;

pub use oauth::TokenCache;

use crate::metrics::Metrics;
use crate::rule::{Auth, RenderedRequest};
use crate::secret::MASK;
use crate::template::encode_component;

/// An API's answer.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: bytes::Bytes,
}

/// Why no usable answer came.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("connection refused")]
    ConnectionRefused,
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("TLS failure: {0}")]
    Tls(String),
    #[error("answer body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("OAuth token request failed: {0}")]
    Token(String),
    #[error("circuit open")]
    CircuitOpen,
}

/// Whether a call is a dry run from the rule-test endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallMode {
    Decision,
    Test,
}

/// What the engine needs from the network; production is [`HttpOutbound`].
#[async_trait]
pub trait Outbound: Send + Sync {
    /// Sends a rendered request with its authentication. The caller bounds the time.
    async fn send(&self, req: &RenderedRequest, auth: &Auth, mode: CallMode) -> Result<ApiResponse, CallError>;
}

/// Limits of the outbound client.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Largest answer body read; more is an error.
    pub max_response_bytes: usize,
    /// Follow redirects (off by default: a rule's API should answer where it is).
    pub follow_redirects: bool,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig { max_response_bytes: 1 << 20, follow_redirects: false }
    }
}

/// The reqwest-backed outbound client, shared by all rules.
pub struct HttpOutbound {
    client: reqwest::Client,
    tokens: TokenCache,
    config: OutboundConfig,
}

impl HttpOutbound {
    /// Builds the one pooled client.
    pub fn new(config: OutboundConfig, metrics: Arc<Metrics>) -> Result<HttpOutbound, reqwest::Error> {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .redirect(if config.follow_redirects {
                reqwest::redirect::Policy::limited(5)
            } else {
                reqwest::redirect::Policy::none()
            })
            .user_agent(concat!("verdict/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpOutbound { tokens: TokenCache::new(client.clone(), metrics, config.max_response_bytes), client, config })
    }

    async fn send_once(
        &self,
        req: &RenderedRequest,
        auth: &Auth,
        bearer: Option<&str>,
        mode: CallMode,
    ) -> Result<ApiResponse, CallError> {
        let mut url = req.url.clone();
        if let Auth::ApiKey { name, value, in_query: true } = auth {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&encode_component(name));
            url.push('=');
            url.push_str(&encode_component(value.expose()));
        }
        let mut builder = self.client.request(req.method.clone(), url.as_str());
        for (name, value) in &req.headers {
            let value = HeaderValue::from_str(value)
                .map_err(|_| CallError::Transport(format!("header `{name}` has a value that cannot be sent")))?;
            builder = builder.header(name, value);
        }
        match auth {
            Auth::None | Auth::OAuth2(_) => {}
            Auth::Basic { username, password } => {
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{}", password.expose()));
                builder = builder.header(AUTHORIZATION, sensitive(&format!("Basic {token}"))?);
            }
            Auth::ApiKey { name, value, in_query: false } => {
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| CallError::Transport("bad API key header name".into()))?;
                builder = builder.header(name, sensitive(value.expose())?);
            }
            Auth::ApiKey { .. } => {}
        }
        if let Some(token) = bearer {
            builder = builder.header(AUTHORIZATION, sensitive(&format!("Bearer {token}"))?);
        }
        if mode == CallMode::Test {
            builder = builder.header("x-verdict-test", "true");
        }
        if let Some(body) = &req.body {
            builder = builder.header(CONTENT_TYPE, body.content_type).body(body.bytes.clone());
        }
        let mut resp = builder.send().await.map_err(describe)?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = read_capped(&mut resp, self.config.max_response_bytes).await?;
        Ok(ApiResponse { status, headers, body })
    }
}

/// Reads an answer body, refusing one larger than `cap` bytes (announced or streamed).
pub(crate) async fn read_capped(resp: &mut reqwest::Response, cap: usize) -> Result<bytes::Bytes, CallError> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(CallError::BodyTooLarge(cap));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > cap {
            return Err(CallError::BodyTooLarge(cap));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

#[async_trait]
impl Outbound for HttpOutbound {
    async fn send(&self, req: &RenderedRequest, auth: &Auth, mode: CallMode) -> Result<ApiResponse, CallError> {
        let Auth::OAuth2(client) = auth else {
            return self.send_once(req, auth, None, mode).await;
        };
        let token = self.tokens.token(client, None).await?;
        let resp = self.send_once(req, auth, Some(token.expose()), mode).await?;
        if resp.status != 401 {
            return Ok(resp);
        }
        // The token may have been revoked or rotated early: fetch a new one, once.
        let fresh = self.tokens.token(client, Some(&token)).await?;
        self.send_once(req, auth, Some(fresh.expose()), mode).await
    }
}

fn sensitive(value: &str) -> Result<HeaderValue, CallError> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| CallError::Transport("a credential holds characters that cannot go in a header".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Describes a reqwest error without its URL, from the innermost cause.
pub(crate) fn describe(e: reqwest::Error) -> CallError {
    let e = e.without_url();
    let mut source = e.source();
    let mut innermost: Option<&(dyn std::error::Error + 'static)> = None;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return CallError::ConnectionRefused;
            }
        }
        innermost = Some(s);
        source = s.source();
    }
    let detail = innermost.map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
    let lower = detail.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        CallError::Tls(detail)
    } else if e.is_connect() {
        CallError::Connect(detail)
    } else {
        CallError::Transport(detail)
    }
}

/// The request as a rule test shows it: authentication applied, secrets masked.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RequestView {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
}

impl RequestView {
    /// Builds the view of what is sent for a rendered request.
    pub fn new(req: &RenderedRequest, auth: &Auth) -> RequestView {
        let mut url = req.url.clone();
        let mut headers: Vec<(String, String)> =
            req.headers.iter().map(|(k, v)| (k.as_str().to_owned(), v.clone())).collect();
        match auth {
            Auth::None => {}
            Auth::Basic { .. } => headers.push(("authorization".into(), format!("Basic {MASK}"))),
            Auth::ApiKey { name, in_query: true, .. } => {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str(&format!("{}={MASK}", encode_component(name)));
            }
            Auth::ApiKey { name, .. } => headers.push((name.to_ascii_lowercase(), MASK.into())),
            Auth::OAuth2(_) => headers.push(("authorization".into(), format!("Bearer {MASK}"))),
        }
        if let Some(body) = &req.body {
            headers.push(("content-type".into(), body.content_type.into()));
        }
        RequestView {
            method: req.method.to_string(),
            url,
            headers,
            body: req.body.as_ref().map(|b| String::from_utf8_lossy(&b.bytes).into_owned()),
        }
    }
}
