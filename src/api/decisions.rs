//! `POST /v1/decisions` and `/v1/forward-auth`: the same decision from a JSON context
//! or from gateway headers.

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};

use super::error::ApiError;
use super::extract::{parse_json, read_body, require};
use super::AppState;
use crate::context::{ContextError, ContextInput, RequestContext};
use crate::engine::Decision;
use crate::rule::Effect;
use crate::store::{now_string, ActivityEntry};
use crate::tokens::Role;

fn context_error(e: ContextError) -> ApiError {
    ApiError::bad_field(e.field(), e.to_string())
}

/// `POST /v1/decisions`.
#[utoipa::path(
    post,
    path = "/v1/decisions",
    tag = "decisions",
    request_body(content = ContextInput, description = "the request context (SPEC §3); `application` is required"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the decision, allow or deny, with its reason; answered once its activity entry is durable", body = Decision),
        (status = 400, description = "malformed context", body = crate::api::error::ErrorBody),
        (status = 401, description = "no or an unknown token", body = crate::api::error::ErrorBody),
        (status = 403, description = "the token's role may not ask for decisions", body = crate::api::error::ErrorBody),
        (status = 413, description = "body over the limit", body = crate::api::error::ErrorBody),
        (status = 503, description = "the activity entry could not be recorded; no decision is given", body = crate::api::error::ErrorBody),
    )
)]
pub async fn decide(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require(&req, &state, &[Role::Proxy, Role::Admin])?;
    let started = Instant::now();
    let body = read_body(payload, state.settings.max_body_bytes).await?;
    let input: ContextInput = parse_json(&body)?;
    let ctx = RequestContext::parse(input).map_err(context_error)?;
    let decision = finish(&state, &ctx, "api", started).await?;
    Ok(HttpResponse::Ok().json(decision))
}

/// Any method `/v1/forward-auth`: context from headers, 200 allow / 403 deny.
#[utoipa::path(
    method(get, post, put, delete, patch, head, options),
    path = "/v1/forward-auth",
    tag = "decisions",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "allow; `{\"decision_id\", \"decision\", \"reason\"}`", headers(
            ("X-Verdict-Decision-Id" = String, description = "the decision's id in the activity log"),
            ("X-Verdict-Reason" = String, description = "why"),
        )),
        (status = 403, description = "deny (same body and headers as allow), or the token's role may not ask for decisions (error body)", headers(
            ("X-Verdict-Decision-Id" = String, description = "the decision's id in the activity log"),
            ("X-Verdict-Reason" = String, description = "why"),
        )),
        (status = 400, description = "a header that cannot be read as context (e.g. an unparsable certificate)", body = crate::api::error::ErrorBody),
        (status = 401, description = "no or an unknown token", body = crate::api::error::ErrorBody),
        (status = 503, description = "the activity entry could not be recorded; no decision is given", body = crate::api::error::ErrorBody),
    )
)]
pub async fn forward_auth(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require(&req, &state, &[Role::Proxy, Role::Admin])?;
    let started = Instant::now();
    let ctx = crate::forward_auth::context_from_headers(req.headers(), &state.settings.forward_auth)
        .map_err(context_error)?;
    let decision = finish(&state, &ctx, "forward-auth", started).await?;
    let mut answer = match decision.decision {
        Effect::Allow => HttpResponse::Ok(),
        Effect::Deny => HttpResponse::Forbidden(),
    };
    answer.insert_header(("X-Verdict-Decision-Id", decision.decision_id.as_str()));
    answer.insert_header(("X-Verdict-Reason", crate::forward_auth::header_safe(&decision.reason)));
    Ok(answer.json(serde_json::json!({"decision_id": decision.decision_id, "decision": decision.decision, "reason": decision.reason})))
}

/// Decides, records the activity entry durably, counts. The answer waits for the
/// entry's batch to commit (SPEC §8).
async fn finish(
    state: &AppState,
    ctx: &RequestContext,
    via: &'static str,
    started: Instant,
) -> Result<Decision, ApiError> {
    let mut decision = state.engine.decide(ctx).await;
    decision.latency_ms = (started.elapsed().as_secs_f64() * 100_000.0).round() / 100.0;
    let entry = ActivityEntry {
        decision_id: decision.decision_id.clone(),
        time: now_string(),
        application: ctx.application.clone(),
        username: ctx.username.clone(),
        remote_ip: ctx.remote_ip.clone(),
        device_id: ctx.device_id.clone(),
        decision: decision.decision.as_str().to_owned(),
        reason: decision.reason.clone(),
        policies: serde_json::to_value(&decision.policies).unwrap_or_default(),
        rules: serde_json::to_value(&decision.rules).unwrap_or_default(),
        latency_ms: decision.latency_ms,
        via: via.to_owned(),
        replica: state.settings.replica_name.clone(),
    };
    if let Err(e) = state.activity.record(entry).await {
        tracing::error!(error = %e, decision_id = %decision.decision_id, "activity entry not recorded; refusing to answer");
        return Err(ApiError::store_unavailable());
    }
    state.metrics.decision(decision.decision.as_str(), via, started.elapsed());
    Ok(decision)
}
