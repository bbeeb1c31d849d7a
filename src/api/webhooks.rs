//! Webhook CRUD (`/v1/webhooks`), the test call, and the deliveries of a webhook
//! (SPEC §10). Parsing happens here; validation, secrets and persistence in the
//! registry; sending in [`crate::webhooks::deliver`].

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::admin::{page_params, paginate, parse_object, registry_error, READERS, WRITERS};
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_json, read_body, require};
use super::logs::store_error;
use super::AppState;
use crate::store::{unix_micros, Delivery, DeliveryState};
use crate::webhooks::deliver::TestAnswer;
use crate::webhooks::{Webhook, WebhookSpec};

/// Registers this module's routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/webhooks").route(web::get().to(list_webhooks)).route(web::post().to(create_webhook)),
    )
    .service(
        web::resource("/v1/webhooks/{id}")
            .route(web::get().to(get_webhook))
            .route(web::put().to(update_webhook))
            .route(web::delete().to(delete_webhook)),
    )
    .service(web::resource("/v1/webhooks/{id}/test").route(web::post().to(test_webhook)))
    .service(web::resource("/v1/webhooks/{id}/deliveries").route(web::get().to(list_deliveries)))
    .service(web::resource("/v1/webhooks/{id}/deliveries/{event_id}/retry").route(web::post().to(retry_delivery)));
}

/// A webhook as reads return it: defaults filled in, secrets as `********` (the
/// create answer alone shows `signing_secret`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct WebhookObject {
    #[serde(flatten)]
    pub spec: WebhookSpec,
    #[serde(flatten)]
    pub meta: super::admin::ObjectMeta,
}

/// One page of webhooks, sorted by id.
#[derive(Serialize, utoipa::ToSchema)]
pub struct WebhookPage {
    pub items: Vec<WebhookObject>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// One page of deliveries, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeliveryPage {
    pub items: Vec<Delivery>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

const WEBHOOK_CURSOR: &str = "webhook";

fn find(state: &AppState, id: &str) -> Result<std::sync::Arc<Webhook>, ApiError> {
    state.webhooks.current().hooks.get(id).cloned().ok_or_else(|| ApiError::not_found("webhook", id))
}

/// `GET /v1/webhooks`.
#[utoipa::path(
    get,
    path = "/v1/webhooks",
    tag = "webhooks",
    params(
        ("limit" = Option<usize>, Query, description = "page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "webhooks sorted by id, secrets as `********`", body = WebhookPage),
        (status = 400, description = "bad `limit` or `cursor`", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_webhooks(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    let page = page_params(&req)?;
    let set = state.webhooks.current();
    let (items, next_cursor) = paginate(&set.hooks, WEBHOOK_CURSOR, &page, Webhook::to_json)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"items": items, "next_cursor": next_cursor})))
}

/// `GET /v1/webhooks/{id}`.
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "webhook id")),
    responses(
        (status = 200, description = "the webhook, secrets as `********`", body = WebhookObject),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_webhook(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    Ok(HttpResponse::Ok().json(find(&state, &id)?.to_json()))
}

/// `POST /v1/webhooks`.
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    tag = "webhooks",
    request_body = WebhookSpec,
    responses(
        (status = 201, description = "the stored webhook; `signing_secret` in clear, this once", body = WebhookObject),
        (status = 400, description = "malformed body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 409, description = "a webhook with this id exists", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "every validation problem", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_webhook(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require(&req, &state, WRITERS)?;
    let body = read_body(payload, state.settings.max_body_bytes).await?;
    let spec: WebhookSpec = parse_object(parse_json(&body)?, "")?;
    let hook = state.registry.create_webhook(&caller.name, spec).await.map_err(registry_error)?;
    let mut shown = hook.to_json();
    // The one time the signing secret is shown: the receiver needs it to check
    // signatures, and it is write-only from here on.
    shown["signing_secret"] = hook.signing_secret.expose().into();
    Ok(HttpResponse::Created().json(shown))
}

/// `PUT /v1/webhooks/{id}`.
#[utoipa::path(
    put,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "webhook id")),
    request_body(
        content = WebhookSpec,
        description = "the webhook as GET returns it; read-only fields are ignored, secrets sent as `********` or left out are kept"
    ),
    responses(
        (status = 200, description = "the stored webhook, secrets as `********`", body = WebhookObject),
        (status = 400, description = "malformed body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "every validation problem", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update_webhook(
    req: HttpRequest,
    id: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require(&req, &state, WRITERS)?;
    let body = read_body(payload, state.settings.max_body_bytes).await?;
    let spec: WebhookSpec = parse_object(parse_json(&body)?, "")?;
    let hook = state.registry.update_webhook(&caller.name, &id, spec).await.map_err(registry_error)?;
    Ok(HttpResponse::Ok().json(hook.to_json()))
}

/// `DELETE /v1/webhooks/{id}`.
#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "webhook id")),
    responses(
        (status = 204, description = "deleted; its pending deliveries fail"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_webhook(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = require(&req, &state, WRITERS)?;
    state.registry.delete_webhook(&caller.name, &id).await.map_err(registry_error)?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /v1/webhooks/{id}/test`: sends a `WebhookTest` event now.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/test",
    tag = "webhooks",
    params(("id" = String, Path, description = "webhook id")),
    responses(
        (status = 200, description = "what the receiver answered (also when it failed or did not answer)", body = TestAnswer),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn test_webhook(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require(&req, &state, WRITERS)?;
    let hook = find(&state, &id)?;
    Ok(HttpResponse::Ok().json(state.deliverer.test(&hook).await))
}

/// `GET /v1/webhooks/{id}/deliveries`.
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}/deliveries",
    tag = "webhooks",
    params(
        ("id" = String, Path, description = "webhook id"),
        ("limit" = Option<usize>, Query, description = "page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "the webhook's deliveries, newest first", body = DeliveryPage),
        (status = 400, description = "bad `limit` or `cursor`", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, description = "the store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_deliveries(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    let page = page_params(&req)?;
    find(&state, &id)?;
    let mut listing =
        state.store.list_deliveries(&id, &page).await.map_err(|e| store_error(e, "listing deliveries"))?;
    // Events waiting while the receiver fails are not rewritten (that would cost a
    // write per event per failure): those not tried yet say why they wait here.
    if let Some(failing) = state.webhooks.failing(&id) {
        let why = format!(
            "waiting: the receiver is failing ({}); next probe at {}",
            failing.error,
            crate::store::format_time(failing.next_probe)
        );
        for d in listing.items.iter_mut().filter(|d| d.state == DeliveryState::Pending && d.last_error.is_none()) {
            d.last_error = Some(why.clone());
        }
    }
    Ok(HttpResponse::Ok().json(listing))
}

/// `POST /v1/webhooks/{id}/deliveries/{event_id}/retry`.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/deliveries/{event_id}/retry",
    tag = "webhooks",
    params(
        ("id" = String, Path, description = "webhook id"),
        ("event_id" = String, Path, description = "the event's id"),
    ),
    responses(
        (status = 200, description = "the delivery, pending again and due now, with the webhook's `max_attempts` more attempts", body = Delivery),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "already delivered", body = ErrorBody),
        (status = 503, description = "the store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retry_delivery(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require(&req, &state, WRITERS)?;
    let (id, event_id) = path.into_inner();
    let hook = find(&state, &id)?;
    let not_found = || ApiError::not_found("delivery", &event_id);
    let current = state.store.get_delivery(&id, &event_id).await.map_err(|e| store_error(e, "reading a delivery"))?;
    match current {
        None => return Err(not_found()),
        Some(d) if d.state == DeliveryState::Delivered => {
            return Err(ApiError::conflict(format!("event `{event_id}` was already delivered to `{id}`")))
        }
        Some(_) => {}
    }
    let now = unix_micros(time::OffsetDateTime::now_utc());
    let retried = state
        .store
        .retry_delivery(&id, &event_id, now, hook.max_attempts)
        .await
        .map_err(|e| store_error(e, "retrying a delivery"))?
        .ok_or_else(not_found)?;
    state.webhooks.wake();
    Ok(HttpResponse::Ok().json(retried))
}
