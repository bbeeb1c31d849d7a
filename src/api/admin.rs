//! Rule and policy CRUD (`/v1/rules`, `/v1/policies`) and the rule-test dry runs
//! (`POST /v1/rules/{id}/test`, `POST /v1/rules/test`).
//!
//! Handlers parse at the edge — read-only fields stripped, the body parsed into a
//! [`RuleSpec`] / [`PolicySpec`] with the path of a bad field — and leave validation,
//! conflicts, secrets and persistence to the [`crate::registry::Registry`]. Reads come
//! from the catalog in force, so they show file-managed objects too, with their
//! `source`.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ApiError, ErrorBody};
use super::extract::{parse_json, read_body, require};
use super::AppState;
use crate::action::ActionResult;
use crate::context::{ContextError, ContextInput, RequestContext};
use crate::engine::{Evaluation, Outcome};
use crate::outbound::{ApiResponse, CallMode, RequestView};
use crate::policy::PolicySpec;
use crate::registry::{strip_read_only, RegistryError};
use crate::rule::{FieldError, Rule, RuleSpec, SOURCE_API};
use crate::secret::Secret;
use crate::store::{Page, StoreError};
use crate::tokens::Role;

/// How much of an API's answer body a rule test shows.
pub const TEST_BODY_LIMIT: usize = 4096;

/// Id given to an unsaved rule that has none, so it can be compiled for a test.
const UNSAVED_RULE_ID: &str = "unsaved";

pub(super) const READERS: &[Role] = &[Role::Auditor, Role::Admin];
pub(super) const WRITERS: &[Role] = &[Role::Admin];

/// Registers this module's routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/rules").route(web::get().to(list_rules)).route(web::post().to(create_rule)))
        .service(
            web::resource("/v1/rules/{id}")
                .route(web::get().to(get_rule))
                .route(web::put().to(update_rule))
                .route(web::delete().to(delete_rule))
                // `POST /v1/rules/test` lands here: one resource for the path keeps
                // `GET /v1/rules/test` meaning "the rule with id `test`".
                .route(web::post().to(post_rule_item)),
        )
        .service(web::resource("/v1/rules/{id}/test").route(web::post().to(test_stored_rule)))
        .service(web::resource("/v1/policies").route(web::get().to(list_policies)).route(web::post().to(create_policy)))
        .service(
            web::resource("/v1/policies/{id}")
                .route(web::get().to(get_policy))
                .route(web::put().to(update_policy))
                .route(web::delete().to(delete_policy)),
        );
}

// ---------------------------------------------------------------------------------
// Schemas (the OpenAPI description of what handlers send and take)
// ---------------------------------------------------------------------------------

/// The read-only fields every managed object carries.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ObjectMeta {
    /// `api`, or `policies/NAME.json` for an object managed by a policy file.
    pub source: String,
    /// 1 on create, incremented by every update.
    pub version: i64,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    pub updated_at: String,
}

/// A rule as reads return it: defaults filled in, secrets as `********`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RuleObject {
    #[serde(flatten)]
    pub spec: RuleSpec,
    #[serde(flatten)]
    pub meta: ObjectMeta,
}

/// A policy as reads return it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PolicyObject {
    #[serde(flatten)]
    pub spec: PolicySpec,
    #[serde(flatten)]
    pub meta: ObjectMeta,
}

/// One page of rules, sorted by id.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RulePage {
    pub items: Vec<RuleObject>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// One page of policies, sorted by id.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PolicyPage {
    pub items: Vec<PolicyObject>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Body of `POST /v1/rules/test`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnsavedRuleTest {
    /// The rule to try, as it would be created. With the id of a stored rule, secrets
    /// sent as `********` or left out are taken from the stored rule.
    #[schema(value_type = RuleSpec)]
    pub rule: Value,
    /// The sample request context.
    pub context: ContextInput,
}

/// The request a rule test sent, secrets as `********`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TestRequest {
    pub method: String,
    pub url: String,
    /// Header name (lowercase) to value; repeated headers are joined with `, `.
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
}

/// The answer a rule test got.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TestResponse {
    pub status: u16,
    /// Header name (lowercase) to value; repeated headers are joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The first 4 KiB of the body, as text (invalid UTF-8 replaced).
    pub body: String,
}

/// The result of a rule test.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RuleTestAnswer {
    /// `null` when the rule could not be rendered for the context (the API was not
    /// called; `reason` says why).
    pub request: Option<TestRequest>,
    /// `null` when no answer came (timeout, connection refused, …).
    pub response: Option<TestResponse>,
    /// Each response action with the value its key found.
    pub actions: Vec<ActionResult>,
    pub outcome: Outcome,
    pub reason: String,
}

// ---------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------

/// `GET /v1/rules`.
#[utoipa::path(
    get,
    path = "/v1/rules",
    tag = "rules",
    params(
        ("limit" = Option<usize>, Query, description = "page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "rules sorted by id, file-managed ones included", body = RulePage),
        (status = 400, description = "bad `limit` or `cursor`", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_rules(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    let page = page_params(&req)?;
    let catalog = state.engine.catalog();
    let (items, next_cursor) = paginate(&catalog.rules, RULE_CURSOR, &page, |r| r.to_json())?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"items": items, "next_cursor": next_cursor})))
}

/// `GET /v1/rules/{id}`.
#[utoipa::path(
    get,
    path = "/v1/rules/{id}",
    tag = "rules",
    params(("id" = String, Path, description = "rule id")),
    responses(
        (status = 200, description = "the rule, secrets as `********`", body = RuleObject),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_rule(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    let rule =
        state.engine.catalog().rules.get(id.as_str()).cloned().ok_or_else(|| ApiError::not_found("rule", &id))?;
    Ok(HttpResponse::Ok().json(rule.to_json()))
}

/// `POST /v1/rules`.
#[utoipa::path(
    post,
    path = "/v1/rules",
    tag = "rules",
    request_body = RuleSpec,
    responses(
        (status = 201, description = "the stored rule", body = RuleObject),
        (status = 400, description = "malformed body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 409, description = "a rule with this id exists", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "every validation problem", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_rule(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require(&req, &state, WRITERS)?;
    let body = read_body(payload, state.settings.max_body_bytes).await?;
    let spec: RuleSpec = parse_object(parse_json(&body)?, "")?;
    let rule = state.registry.create_rule(&caller.name, spec).await.map_err(registry_error)?;
    Ok(HttpResponse::Created().json(rule.to_json()))
}

/// `PUT /v1/rules/{id}`.
#[utoipa::path(
    put,
    path = "/v1/rules/{id}",
    tag = "rules",
    params(("id" = String, Path, description = "rule id")),
    request_body(
        content = RuleSpec,
        description = "the rule as GET returns it; read-only fields are ignored, secrets sent as `********` or left out are kept"
    ),
    responses(
        (status = 200, description = "the stored rule", body = RuleObject),
        (status = 400, description = "malformed body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the rule is managed by a policy file", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "every validation problem", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update_rule(
    req: HttpRequest,
    id: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require(&req, &state, WRITERS)?;
    if let Some(rule) = state.engine.catalog().rules.get(id.as_str()) {
        refuse_file_managed("rule", &id, &rule.source)?;
    }
    let body = read_body(payload, state.settings.max_body_bytes).await?;
    let spec: RuleSpec = parse_object(parse_json(&body)?, "")?;
    let rule = state.registry.update_rule(&caller.name, &id, spec).await.map_err(registry_error)?;
    Ok(HttpResponse::Ok().json(rule.to_json()))
}

/// `DELETE /v1/rules/{id}`.
#[utoipa::path(
    delete,
    path = "/v1/rules/{id}",
    tag = "rules",
    params(("id" = String, Path, description = "rule id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "a policy lists the rule, or a policy file manages it", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_rule(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require(&req, &state, WRITERS)?;
    state.registry.delete_rule(&caller.name, &id).await.map_err(registry_error)?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /v1/rules/{id}`: only `POST /v1/rules/test` exists.
async fn post_rule_item(
    req: HttpRequest,
    id: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if id.as_str() == "test" {
        test_unsaved_rule(req, payload, state).await
    } else {
        Ok(HttpResponse::MethodNotAllowed().finish())
    }
}

// ---------------------------------------------------------------------------------
// Rule tests
// ---------------------------------------------------------------------------------

/// `POST /v1/rules/{id}/test`: a dry run of a stored rule against a sample context.
#[utoipa::path(
    post,
    path = "/v1/rules/{id}/test",
    tag = "rules",
    params(("id" = String, Path, description = "rule id")),
    request_body(content = ContextInput, description = "a request context, as for `POST /v1/decisions`"),
    responses(
        (status = 200, description = "what was sent, what came back, and what it meant", body = RuleTestAnswer),
        (status = 400, description = "malformed context (e.g. an unparsable certificate)", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn test_stored_rule(
    req: HttpRequest,
    id: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require(&req, &state, WRITERS)?;
    let rule =
        state.engine.catalog().rules.get(id.as_str()).cloned().ok_or_else(|| ApiError::not_found("rule", &id))?;
    let body = read_body(payload, state.settings.max_body_bytes).await?;
    let input: ContextInput = parse_json(&body)?;
    let ctx = RequestContext::parse(input).map_err(|e| context_error(&e, ""))?;
    Ok(HttpResponse::Ok().json(run_test(&state, &rule, &ctx).await))
}

/// `POST /v1/rules/test`: a dry run of an unsaved rule against a sample context.
#[utoipa::path(
    post,
    path = "/v1/rules/test",
    tag = "rules",
    request_body = UnsavedRuleTest,
    responses(
        (status = 200, description = "what was sent, what came back, and what it meant", body = RuleTestAnswer),
        (status = 400, description = "malformed body or context", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "every problem of the rule, fields under `rule.`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn test_unsaved_rule(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require(&req, &state, WRITERS)?;
    let body = read_body(payload, state.settings.max_body_bytes).await?;
    let test: UnsavedRuleTest = parse_json(&body)?;
    let mut spec: RuleSpec = parse_object(test.rule, "rule")?;
    let id = spec.id.get_or_insert_with(|| UNSAVED_RULE_ID.to_owned()).clone();
    let stored = state.engine.catalog().rules.get(&id).cloned();
    if let Some(auth) = spec.auth.as_mut() {
        for path in ["auth.password", "auth.value", "auth.client_secret"] {
            let Some(slot) = auth.secret_mut(path) else { continue };
            if !slot.as_ref().is_none_or(Secret::is_mask) {
                continue;
            }
            // As on update: the mask (or nothing) means the stored rule's value. With no
            // stored value the mask must not be sent as if it were the secret.
            *slot = stored
                .as_ref()
                .and_then(|r| r.spec.auth.as_ref())
                .and_then(|a| a.secrets().into_iter().find(|(p, _)| *p == path).map(|(_, s)| s.clone()));
        }
    }
    let rule = Rule::compile(spec, SOURCE_API, 0).map_err(|problems| {
        ApiError::validation(
            problems.into_iter().map(|p| FieldError::new(prefixed("rule", &p.field), p.message)).collect(),
        )
    })?;
    let ctx = RequestContext::parse(test.context).map_err(|e| context_error(&e, "context"))?;
    Ok(HttpResponse::Ok().json(run_test(&state, &rule, &ctx).await))
}

async fn run_test(state: &AppState, rule: &Rule, ctx: &RequestContext) -> RuleTestAnswer {
    // `CallMode::Test` is what keeps the call out of every cache and adds
    // `X-Verdict-Test: true`.
    let eval = state.engine.evaluate(rule, ctx, CallMode::Test).await;
    test_answer(eval)
}

fn test_answer(eval: Evaluation) -> RuleTestAnswer {
    RuleTestAnswer {
        request: eval.request.map(test_request),
        response: eval.response.map(test_response),
        actions: eval.actions,
        outcome: eval.outcome,
        reason: eval.reason,
    }
}

fn test_request(view: RequestView) -> TestRequest {
    let mut headers = header_map(view.headers);
    // The outbound client adds it when sending in test mode; show what was sent.
    headers.insert("x-verdict-test".into(), "true".into());
    TestRequest { method: view.method, url: view.url, headers, body: view.body }
}

fn test_response(resp: ApiResponse) -> TestResponse {
    TestResponse { status: resp.status, headers: header_map(resp.headers), body: body_prefix(&resp.body) }
}

fn header_map(headers: Vec<(String, String)>) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        match map.get_mut(&name) {
            Some(existing) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            None => {
                map.insert(name, value);
            }
        }
    }
    map
}

/// The first [`TEST_BODY_LIMIT`] bytes as text; a valid UTF-8 body is cut at a character
/// boundary, anything else is decoded lossily.
pub(super) fn body_prefix(body: &[u8]) -> String {
    let mut end = body.len().min(TEST_BODY_LIMIT);
    if let Ok(text) = std::str::from_utf8(body) {
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        return text.get(..end).unwrap_or_default().to_owned();
    }
    String::from_utf8_lossy(body.get(..end).unwrap_or_default()).into_owned()
}

// ---------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------

/// `GET /v1/policies`.
#[utoipa::path(
    get,
    path = "/v1/policies",
    tag = "policies",
    params(
        ("limit" = Option<usize>, Query, description = "page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "policies sorted by id, file-managed ones included", body = PolicyPage),
        (status = 400, description = "bad `limit` or `cursor`", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_policies(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    let page = page_params(&req)?;
    let catalog = state.engine.catalog();
    let (items, next_cursor) = paginate(&catalog.policies, POLICY_CURSOR, &page, |p| p.to_json())?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"items": items, "next_cursor": next_cursor})))
}

/// `GET /v1/policies/{id}`.
#[utoipa::path(
    get,
    path = "/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, description = "policy id")),
    responses(
        (status = 200, description = "the policy", body = PolicyObject),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_policy(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    let policy =
        state.engine.catalog().policies.get(id.as_str()).cloned().ok_or_else(|| ApiError::not_found("policy", &id))?;
    Ok(HttpResponse::Ok().json(policy.to_json()))
}

/// `POST /v1/policies`.
#[utoipa::path(
    post,
    path = "/v1/policies",
    tag = "policies",
    request_body = PolicySpec,
    responses(
        (status = 201, description = "the stored policy", body = PolicyObject),
        (status = 400, description = "malformed body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 409, description = "a policy with this id exists", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "every validation problem, e.g. a rule that does not exist", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_policy(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require(&req, &state, WRITERS)?;
    let body = read_body(payload, state.settings.max_body_bytes).await?;
    let spec: PolicySpec = parse_object(parse_json(&body)?, "")?;
    let policy = state.registry.create_policy(&caller.name, spec).await.map_err(registry_error)?;
    Ok(HttpResponse::Created().json(policy.to_json()))
}

/// `PUT /v1/policies/{id}`.
#[utoipa::path(
    put,
    path = "/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, description = "policy id")),
    request_body(content = PolicySpec, description = "the policy as GET returns it; read-only fields are ignored"),
    responses(
        (status = 200, description = "the stored policy", body = PolicyObject),
        (status = 400, description = "malformed body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the policy is managed by a policy file", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "every validation problem", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update_policy(
    req: HttpRequest,
    id: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require(&req, &state, WRITERS)?;
    if let Some(policy) = state.engine.catalog().policies.get(id.as_str()) {
        refuse_file_managed("policy", &id, &policy.source)?;
    }
    let body = read_body(payload, state.settings.max_body_bytes).await?;
    let spec: PolicySpec = parse_object(parse_json(&body)?, "")?;
    let policy = state.registry.update_policy(&caller.name, &id, spec).await.map_err(registry_error)?;
    Ok(HttpResponse::Ok().json(policy.to_json()))
}

/// `DELETE /v1/policies/{id}`.
#[utoipa::path(
    delete,
    path = "/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, description = "policy id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "a policy file manages the policy", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_policy(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require(&req, &state, WRITERS)?;
    state.registry.delete_policy(&caller.name, &id).await.map_err(registry_error)?;
    Ok(HttpResponse::NoContent().finish())
}

// ---------------------------------------------------------------------------------
// Shared plumbing
// ---------------------------------------------------------------------------------

pub(super) fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::NotFound(what, id) => ApiError::not_found(what, &id),
        RegistryError::Conflict(message) => ApiError::conflict(message),
        RegistryError::Validation(details) => ApiError::validation(details),
        RegistryError::Store(StoreError::Unavailable(reason)) => {
            tracing::warn!(%reason, "store unavailable for a rule or policy write");
            ApiError::store_unavailable()
        }
        RegistryError::Store(e) => {
            tracing::error!(error = %e, "rule or policy write failed in the store");
            ApiError::internal("store write")
        }
    }
}

/// A write to a file-managed object is refused before its body is even parsed (the
/// registry checks again under its lock).
fn refuse_file_managed(what: &str, id: &str, source: &str) -> Result<(), ApiError> {
    if source == SOURCE_API {
        return Ok(());
    }
    Err(ApiError::conflict(format!(
        "{what} `{id}` is managed by {source} and cannot be changed over the API; edit the file"
    )))
}

fn context_error(e: &ContextError, prefix: &str) -> ApiError {
    ApiError::bad_field(&prefixed(prefix, e.field()), e.to_string())
}

fn prefixed(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field) {
        (true, _) => field.to_owned(),
        (false, "" | ".") => prefix.to_owned(),
        (false, _) => format!("{prefix}.{field}"),
    }
}

/// Parses an object as GET shows it: read-only fields dropped, then the spec, with the
/// path of a field of the wrong type (under `prefix`) in the 400.
pub(super) fn parse_object<T: DeserializeOwned>(doc: Value, prefix: &str) -> Result<T, ApiError> {
    if !doc.is_object() {
        let what = if prefix.is_empty() { "the body".to_owned() } else { format!("`{prefix}`") };
        return Err(ApiError::malformed(format!("{what} must be a JSON object")));
    }
    serde_path_to_error::deserialize(strip_read_only(&doc)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." && prefix.is_empty() {
            ApiError::malformed(format!("unexpected body: {inner}"))
        } else {
            let field = prefixed(prefix, if path == "." { "" } else { &path });
            ApiError::bad_field(&field, format!("`{field}`: {inner}"))
        }
    })
}

const RULE_CURSOR: &str = "rule";
const POLICY_CURSOR: &str = "policy";

/// `limit` and `cursor` from the query string; out of range or unreadable is a 400.
pub(super) fn page_params(req: &HttpRequest) -> Result<Page, ApiError> {
    let mut page = Page { limit: Page::DEFAULT_LIMIT, cursor: None };
    for (key, value) in url::form_urlencoded::parse(req.query_string().as_bytes()) {
        match key.as_ref() {
            "limit" => {
                page.limit =
                    value.parse::<usize>().ok().filter(|n| (1..=Page::MAX_LIMIT).contains(n)).ok_or_else(|| {
                        ApiError::bad_field(
                            "limit",
                            format!("`limit` must be a whole number from 1 to {}", Page::MAX_LIMIT),
                        )
                    })?;
            }
            "cursor" => page.cursor = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok(page)
}

fn encode_cursor(kind: &str, last_id: &str) -> String {
    B64URL.encode(format!("{kind}:{last_id}"))
}

fn decode_cursor(kind: &str, cursor: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_field("cursor", "`cursor` is not a cursor this list handed out");
    let bytes = B64URL.decode(cursor.trim()).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.strip_prefix(kind).and_then(|rest| rest.strip_prefix(':')).map(str::to_owned).ok_or_else(bad)
}

/// One page of a map sorted by id: the items after the cursor's id, and the cursor of
/// the next page when more follow.
pub(super) fn paginate<T>(
    all: &BTreeMap<String, Arc<T>>,
    kind: &str,
    page: &Page,
    show: impl Fn(&T) -> Value,
) -> Result<(Vec<Value>, Option<String>), ApiError> {
    let after = page.cursor.as_deref().map(|c| decode_cursor(kind, c)).transpose()?;
    let range = match &after {
        Some(last) => all.range::<String, _>((std::ops::Bound::Excluded(last), std::ops::Bound::Unbounded)),
        None => all.range::<String, _>(..),
    };
    let mut items = Vec::with_capacity(page.limit.min(all.len()));
    let mut last_id = None;
    let mut more = false;
    for (id, object) in range {
        if items.len() == page.limit {
            more = true;
            break;
        }
        items.push(show(object));
        last_id = Some(id);
    }
    let next = if more { last_id.map(|id| encode_cursor(kind, id)) } else { None };
    Ok((items, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_prefix_cuts_at_a_character_boundary() {
        let text = format!("{}é", "a".repeat(TEST_BODY_LIMIT - 1));
        assert_eq!(body_prefix(text.as_bytes()), "a".repeat(TEST_BODY_LIMIT - 1));
        assert_eq!(body_prefix(b"short"), "short");
        let mut binary = vec![0xff_u8; TEST_BODY_LIMIT + 10];
        binary[0] = b'x';
        let shown = body_prefix(&binary);
        assert!(shown.starts_with('x'));
        assert_eq!(shown.chars().count(), TEST_BODY_LIMIT);
    }

    #[test]
    fn cursors_are_tied_to_their_list() {
        let c = encode_cursor(RULE_CURSOR, "abc");
        assert_eq!(decode_cursor(RULE_CURSOR, &c).unwrap(), "abc");
        assert!(decode_cursor(POLICY_CURSOR, &c).is_err());
        assert!(decode_cursor(RULE_CURSOR, "!!!").is_err());
    }

    #[test]
    fn headers_join_repeats() {
        let m = header_map(vec![("A".into(), "1".into()), ("a".into(), "2".into()), ("b".into(), "3".into())]);
        assert_eq!(m.get("a").map(String::as_str), Some("1, 2"));
        assert_eq!(m.len(), 2);
    }
}
