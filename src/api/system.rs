//! Liveness, readiness, metrics and the placeholder list.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::error::ApiError;
use super::extract::require;
use super::AppState;
use crate::template::PARAMETERS;
use crate::tokens::Role;

/// `GET /healthz`: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: policy files loaded (and the store reachable).
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let files = state.registry.files_loaded();
    let body =
        serde_json::json!({"ready": files, "checks": {"policy_files": if files { "loaded" } else { "not loaded" }}});
    if files {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

/// A placeholder and what it holds.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Parameter {
    pub name: String,
    pub placeholder: String,
    pub description: String,
}

/// `GET /v1/parameters`.
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
    Ok(HttpResponse::Ok().json(serde_json::json!({"items": items})))
}
