//! OAuth2 client-credentials tokens: cached until shortly before expiry, shared by
//! every rule with the same client settings, and fetched once however many decisions
//! wait for them (single flight: waiters queue on the client's slot and find the
//! token the first one fetched).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oauth2::basic::BasicTokenResponse;
use oauth2::TokenResponse as _;

use super::{describe, read_capped, CallError};
use crate::metrics::Metrics;
use crate::rule::{OAuthClient, ParamIn};
use crate::secret::Secret;

/// Lifetime assumed when the token endpoint gives no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// A token is renewed this long before it expires (or at half its life if shorter).
const RENEW_MARGIN: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct CachedToken {
    access: Secret,
    renew_at: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<CachedToken>>>;

/// Tokens by client settings.
pub struct TokenCache {
    client: reqwest::Client,
    slots: Mutex<HashMap<OAuthClient, Slot>>,
    metrics: Arc<Metrics>,
    /// Largest token answer read (the outbound body cap).
    max_bytes: usize,
}

impl TokenCache {
    pub(super) fn new(client: reqwest::Client, metrics: Arc<Metrics>, max_bytes: usize) -> TokenCache {
        TokenCache { client, slots: Mutex::new(HashMap::new()), metrics, max_bytes }
    }

    /// A valid token for `oauth`. With `stale`, a cached token equal to it is not
    /// reused (the API refused it), but one fetched meanwhile by another caller is.
    pub async fn token(&self, oauth: &OAuthClient, stale: Option<&Secret>) -> Result<Secret, CallError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry(oauth.clone()).or_default().clone()
        };
        let mut cached = slot.lock().await;
        if let Some(t) = cached.as_ref() {
            if t.renew_at > Instant::now() && stale != Some(&t.access) {
                return Ok(t.access.clone());
            }
        }
        let fresh = self.fetch(oauth).await?;
        let access = fresh.access.clone();
        *cached = Some(fresh);
        Ok(access)
    }

    async fn fetch(&self, oauth: &OAuthClient) -> Result<CachedToken, CallError> {
        let started = Instant::now();
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        let scope = oauth.scopes.join(" ");
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        let mut query: Vec<(&str, &str)> = Vec::new();
        let mut headers: Vec<(&str, &str)> = Vec::new();
        for (place, k, v) in &oauth.params {
            match place {
                ParamIn::Body => form.push((k, v)),
                ParamIn::Query => query.push((k, v)),
                ParamIn::Header => headers.push((k, v)),
            }
        }
        if !oauth.basic_client_auth {
            form.push(("client_id", &oauth.client_id));
            form.push(("client_secret", oauth.client_secret.expose()));
        }
        let mut req = if oauth.token_method_get {
            self.client.get(&oauth.token_url).query(&form)
        } else {
            self.client.post(&oauth.token_url).form(&form)
        };
        if !query.is_empty() {
            req = req.query(&query);
        }
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if oauth.basic_client_auth {
            req = req.basic_auth(&oauth.client_id, Some(oauth.client_secret.expose()));
        }
        let result = async {
            let mut resp = req
                .header("accept", "application/json")
                .send()
                .await
                .map_err(|e| CallError::Token(describe(e).to_string()))?;
            let status = resp.status();
            let body = read_capped(&mut resp, self.max_bytes).await.map_err(|e| CallError::Token(e.to_string()))?;
            if !status.is_success() {
                // Only the standard `error` code is repeated: the body could echo input.
                let code = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(|s| format!(" ({s})")))
                    .unwrap_or_default();
                return Err(CallError::Token(format!("token endpoint answered HTTP {}{code}", status.as_u16())));
            }
            let token: BasicTokenResponse = serde_json::from_slice(&body)
                .map_err(|_| CallError::Token("token endpoint answer is not a valid OAuth2 token response".into()))?;
            let lifetime = token.expires_in().unwrap_or(DEFAULT_LIFETIME);
            let margin = RENEW_MARGIN.min(lifetime / 2);
            Ok(CachedToken {
                access: Secret::new(token.access_token().secret().clone()),
                renew_at: Instant::now() + lifetime - margin,
            })
        }
        .await;
        self.metrics.token_fetch(result.is_ok(), started.elapsed());
        result
    }
}
