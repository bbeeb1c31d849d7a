//! Liveness, readiness, metrics and the placeholder list.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::require;
use super::AppState;
use crate::store::StoreError;
use crate::template::PARAMETERS;
use crate::tokens::Role;

/// How long readiness waits for the store. Longer than the SQLite busy timeout, so a
/// locked database reports its own error rather than this one.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// The answer of `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    pub status: &'static str,
}

/// The answer of `GET /readyz`: overall readiness and each check with its detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Readiness {
    /// Whether every check passed (the status is then 200, else 503).
    pub ready: bool,
    /// Each check.
    pub checks: ReadinessChecks,
    /// Every rule API origin seen and its circuit state (`closed`, `open`,
    /// `half_open`). Informational: an open circuit to a third-party API does not
    /// make verdict unready, its rules fail fast with their `on_error`.
    pub circuits: Vec<CircuitReport>,
}

/// The checks behind readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ReadinessChecks {
    /// The store answered a query.
    pub store: Check,
    /// The policy files were loaded.
    pub policy_files: Check,
}

/// One readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Check {
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// Readiness from the outcome of each check.
/// One origin's circuit in `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CircuitReport {
    /// `scheme://host:port` of a rule API.
    pub origin: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
}

/// Readiness from the store ping and the policy-file state (circuits are added by the caller).
pub fn readiness(store: Result<(), StoreError>, files_loaded: bool) -> Readiness {
    let store = match store {
        Ok(()) => Check { ok: true, detail: "the store answered".into() },
        Err(e) => Check { ok: false, detail: e.to_string() },
    };
    let policy_files = if files_loaded {
        Check { ok: true, detail: "policy files loaded".into() }
    } else {
        Check { ok: false, detail: "policy files are not loaded".into() }
    };
    Readiness {
        ready: store.ok && policy_files.ok,
        checks: ReadinessChecks { store, policy_files },
        circuits: Vec::new(),
    }
}

/// Liveness: the process answers. Needs no token.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "system",
    responses((status = 200, description = "The process answers", body = Health))
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// Readiness: the store answers and the policy files are loaded. Needs no token.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "system",
    responses(
        (status = 200, description = "Ready to decide", body = Readiness),
        (status = 503, description = "Not ready; the failing check says why", body = Readiness),
    )
)]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let ping = match tokio::time::timeout(STORE_PING_TIMEOUT, state.store.ping()).await {
        Ok(result) => result,
        Err(_) => {
            Err(StoreError::Unavailable(format!("the store did not answer within {} s", STORE_PING_TIMEOUT.as_secs())))
        }
    };
    let mut ready = readiness(ping, state.registry.files_loaded());
    ready.circuits = state
        .engine
        .circuit_states()
        .into_iter()
        .map(|(origin, s)| CircuitReport { origin, state: s.as_str().to_owned() })
        .collect();
    let status = if ready.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    HttpResponse::build(status).json(ready)
}

/// Prometheus metrics (text exposition format). Needs no token.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain; version=0.0.4"))
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    // Circuit states change with time alone (open turns half-open), so they are read now.
    state.metrics.circuit_states(&state.engine.circuit_states());
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

/// A placeholder and what it holds.
#[derive(Serialize, ToSchema)]
pub struct Parameter {
    /// The name, e.g. `username`.
    pub name: String,
    /// As written in a rule, e.g. `%username%`.
    pub placeholder: String,
    /// What it holds.
    pub description: String,
}

/// The answer of `GET /v1/parameters`.
#[derive(Serialize, ToSchema)]
pub struct ParameterList {
    /// Every placeholder.
    pub items: Vec<Parameter>,
}

/// The placeholders rules may use.
#[utoipa::path(
    get,
    path = "/v1/parameters",
    tag = "rules",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every placeholder", body = ParameterList),
        (status = 401, description = "No or an unknown token", body = ErrorBody),
        (status = 403, description = "The token's role may not read parameters", body = ErrorBody),
    )
)]
pub async fn parameters(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require(&req, &state, &[Role::Auditor, Role::Admin])?;
    let items: Vec<Parameter> = PARAMETERS
        .iter()
        .map(|(name, description)| Parameter {
            name: (*name).into(),
            placeholder: format!("%{name}%"),
            description: (*description).into(),
        })
        .collect();
    Ok(HttpResponse::Ok().json(ParameterList { items }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let ok = readiness(Ok(()), true);
        assert!(ok.ready && ok.checks.store.ok && ok.checks.policy_files.ok);

        let no_store = readiness(Err(StoreError::Unavailable("database is locked".into())), true);
        assert!(!no_store.ready);
        assert!(!no_store.checks.store.ok);
        assert!(no_store.checks.store.detail.contains("database is locked"), "{no_store:?}");
        assert!(no_store.checks.policy_files.ok);

        let no_files = readiness(Ok(()), false);
        assert!(!no_files.ready);
        assert!(no_files.checks.store.ok);
        assert!(!no_files.checks.policy_files.ok);

        let json = serde_json::to_value(readiness(Ok(()), false)).unwrap();
        assert_eq!(json["ready"], false);
        assert_eq!(json["checks"]["policy_files"]["ok"], false);
        assert_eq!(json["checks"]["store"]["ok"], true);
    }
}
