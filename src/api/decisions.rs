//! `POST /v1/decisions` and `/v1/forward-auth`: the same decision from a JSON context
//! or from gateway headers.

use std::time::Instant;

use actix_web::http::header::ContentType;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;

use super::error::ApiError;
use super::extract::{parse_json, read_body, require};
use super::AppState;
use crate::context::{ContextError, ContextInput, RequestContext};
use crate::engine::Decision;
use crate::rule::Effect;
use crate::store::{format_time, unix_micros, ActivityRecord};
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
    let answered = finish(&state, &ctx, Via::Api, started).await?;
    Ok(HttpResponse::Ok().content_type(ContentType::json()).body(answered.body))
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
    let answered = finish(&state, &ctx, Via::ForwardAuth, started).await?;
    let mut answer = match answered.decision {
        Effect::Allow => HttpResponse::Ok(),
        Effect::Deny => HttpResponse::Forbidden(),
    };
    answer.insert_header(("X-Verdict-Decision-Id", answered.decision_id.as_str()));
    answer.insert_header(("X-Verdict-Reason", crate::forward_auth::header_safe(&answered.reason)));
    Ok(answer.content_type(ContentType::json()).body(answered.body))
}

/// The entry point a decision came through, as the activity log and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Api,
    ForwardAuth,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Api => "api",
            Via::ForwardAuth => "forward-auth",
        }
    }
}

/// The `/v1/decisions` answer with `policies` and `rules` already serialised — the
/// same text goes into the activity entry, so each is serialised once. Same fields,
/// same order, same JSON as [`crate::engine::Decision`]'s own serialisation.
#[derive(Serialize)]
struct DecisionBody<'a> {
    decision_id: &'a str,
    decision: Effect,
    reason: &'a str,
    policies: &'a RawValue,
    rules: &'a RawValue,
    latency_ms: f64,
}

/// The `/v1/forward-auth` answer body.
#[derive(Serialize)]
struct ForwardAuthBody<'a> {
    decision_id: &'a str,
    decision: Effect,
    reason: &'a str,
}

/// What the handlers answer with once the entry is durable.
struct Answered {
    decision_id: String,
    decision: Effect,
    reason: String,
    /// The JSON body for the entry point the decision came through.
    body: Vec<u8>,
}

fn encode_failed(e: serde_json::Error) -> ApiError {
    tracing::error!(error = %e, "cannot encode a decision");
    ApiError::internal("encoding the decision")
}

/// Decides, records the activity entry durably, counts. The answer waits for the
/// entry's batch to commit (SPEC §8).
async fn finish(state: &AppState, ctx: &RequestContext, via: Via, started: Instant) -> Result<Answered, ApiError> {
    let decision = state.engine.decide(ctx).await;
    let latency_ms = (started.elapsed().as_secs_f64() * 100_000.0).round() / 100.0;
    let now = OffsetDateTime::now_utc();
    let policies = serde_json::value::to_raw_value(&decision.policies).map_err(encode_failed)?;
    let rules = serde_json::value::to_raw_value(&decision.rules).map_err(encode_failed)?;
    let body = match via {
        Via::Api => serde_json::to_vec(&DecisionBody {
            decision_id: &decision.decision_id,
            decision: decision.decision,
            reason: &decision.reason,
            policies: &policies,
            rules: &rules,
            latency_ms,
        }),
        Via::ForwardAuth => serde_json::to_vec(&ForwardAuthBody {
            decision_id: &decision.decision_id,
            decision: decision.decision,
            reason: &decision.reason,
        }),
    }
    .map_err(encode_failed)?;
    let mut rule_ids: Vec<String> = decision.rules.iter().map(|r| r.rule_id.clone()).collect();
    rule_ids.sort_unstable();
    rule_ids.dedup();
    let mut record = ActivityRecord {
        decision_id: decision.decision_id.clone(),
        time: format_time(now),
        time_us: unix_micros(now),
        application: ctx.application.clone(),
        username: ctx.username.clone(),
        remote_ip: ctx.remote_ip.clone(),
        device_id: ctx.device_id.clone(),
        decision: decision.decision.as_str().to_owned(),
        reason: decision.reason.clone(),
        policies: String::from(Box::<str>::from(policies)),
        rules: String::from(Box::<str>::from(rules)),
        rule_ids,
        latency_ms,
        via: via.as_str().to_owned(),
        replica: state.settings.replica_name.clone(),
        outbox: Vec::new(),
    };
    // Webhook events ride in the same durable write as the entry (the outbox).
    record.outbox = state.webhooks.decision_events(&record, &decision.rules);
    let has_events = !record.outbox.is_empty();
    if let Err(e) = state.activity.record_prepared(record).await {
        tracing::error!(error = %e, decision_id = %decision.decision_id, "activity entry not recorded; refusing to answer");
        return Err(ApiError::store_unavailable());
    }
    if has_events {
        state.webhooks.wake();
    }
    state.metrics.decision(decision.decision.as_str(), via.as_str(), started.elapsed());
    Ok(Answered { decision_id: decision.decision_id, decision: decision.decision, reason: decision.reason, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Outcome, PolicyResult, RuleResult};

    #[test]
    fn the_answer_body_is_the_decision_as_serialised() {
        let decision = Decision {
            decision_id: "0193a-\"id\"".into(),
            decision: Effect::Deny,
            reason: "policy p: rule r denied: HTTP 403 \u{1} é".into(),
            policies: vec![
                PolicyResult { id: "p".into(), decision: "deny".into() },
                PolicyResult { id: "q".into(), decision: "skipped".into() },
            ],
            rules: vec![RuleResult {
                rule_id: "r".into(),
                policy_id: "p".into(),
                outcome: Outcome::Deny,
                effect: Effect::Deny,
                reason: "HTTP 403".into(),
                http_status: Some(403),
                latency_ms: 1.25,
                cached: false,
            }],
            latency_ms: 3.07,
        };
        let policies = serde_json::value::to_raw_value(&decision.policies).unwrap();
        let rules = serde_json::value::to_raw_value(&decision.rules).unwrap();
        let body = serde_json::to_vec(&DecisionBody {
            decision_id: &decision.decision_id,
            decision: decision.decision,
            reason: &decision.reason,
            policies: &policies,
            rules: &rules,
            latency_ms: decision.latency_ms,
        })
        .unwrap();
        assert_eq!(String::from_utf8(body).unwrap(), serde_json::to_string(&decision).unwrap());
        // The entry's JSON is what the Value round trip used to store.
        assert_eq!(policies.get(), serde_json::to_value(&decision.policies).unwrap().to_string());
        assert_eq!(rules.get(), serde_json::to_value(&decision.rules).unwrap().to_string());
        let short = serde_json::to_vec(&ForwardAuthBody {
            decision_id: &decision.decision_id,
            decision: decision.decision,
            reason: &decision.reason,
        })
        .unwrap();
        let expected = serde_json::json!({"decision_id": decision.decision_id, "decision": decision.decision, "reason": decision.reason});
        assert_eq!(String::from_utf8(short).unwrap(), expected.to_string());
    }
}
