//! `GET /v1/audit-logs`, `/v1/audit-logs/verify` and `/v1/activity-logs` (SPEC §7–§8):
//! query parameters parsed into the store's typed filters at the edge, one page of the
//! log newest first.
//!
//! The query structs are the single definition of what each listing accepts: the
//! OpenAPI parameters are derived from them and a parameter they do not name is a 400,
//! so a misspelt filter (`?usr=alice`) never silently returns the unfiltered log.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::openapi::path::ParameterIn;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::extract::require;
use super::AppState;
use crate::store::{
    parse_time, ActivityEntry, ActivityFilter, AuditAction, AuditEntry, AuditFilter, Listing, ObjectKind, Page,
    StoreError, VerifyResult,
};
use crate::tokens::Role;

/// Registers this module's routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/audit-logs", web::get().to(list_audit))
        .route("/v1/audit-logs/verify", web::get().to(verify_audit))
        .route("/v1/activity-logs", web::get().to(list_activity));
}

/// Who may read the logs.
const READERS: &[Role] = &[Role::Auditor, Role::Admin];

/// Query parameters of `GET /v1/audit-logs`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Entries at or after this time (RFC 3339).
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// Entries strictly before this time (RFC 3339).
    #[param(format = DateTime)]
    pub until: Option<String>,
    /// Exact actor: a token name, or `file:NAME.json`.
    pub actor: Option<String>,
    /// `create`, `update`, `delete` or `load`.
    pub action: Option<String>,
    /// `rule`, `policy`, `webhook` or `file`.
    pub object_type: Option<String>,
    /// Exact object id (the file name for `file`).
    pub object_id: Option<String>,
    /// Entries per page, 1 to 1000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page, unchanged.
    pub cursor: Option<String>,
}

/// Query parameters of `GET /v1/activity-logs`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ActivityQuery {
    /// Entries at or after this time (RFC 3339).
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// Entries strictly before this time (RFC 3339).
    #[param(format = DateTime)]
    pub until: Option<String>,
    /// Exact username.
    pub username: Option<String>,
    /// Exact application.
    pub application: Option<String>,
    /// `allow` or `deny`.
    pub decision: Option<String>,
    /// Entries in which this rule was evaluated.
    pub rule_id: Option<String>,
    /// Entries per page, 1 to 1000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page, unchanged.
    pub cursor: Option<String>,
}

/// The answer of `GET /v1/audit-logs/verify`: `{"ok": true, "entries": N}`, or the
/// first entry whose hash or link to its predecessor does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct VerifyReport {
    /// Whether every entry holds.
    pub ok: bool,
    /// How many entries were checked (when `ok`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    /// The first entry that does not hold (when not `ok`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// How many entries held before it (when not `ok`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries_checked: Option<u64>,
    /// What does not hold (when not `ok`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<VerifyResult> for VerifyReport {
    fn from(result: VerifyResult) -> VerifyReport {
        match result {
            VerifyResult::Ok { entries } => {
                VerifyReport { ok: true, entries: Some(entries), seq: None, entries_checked: None, reason: None }
            }
            VerifyResult::Broken { seq, entries_checked, reason } => VerifyReport {
                ok: false,
                entries: None,
                seq: Some(seq),
                entries_checked: Some(entries_checked),
                reason: Some(reason),
            },
        }
    }
}

/// The audit log, newest first.
#[utoipa::path(
    get,
    path = "/v1/audit-logs",
    tag = "logs",
    params(AuditQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of audit entries, newest first", body = Listing<AuditEntry>),
        (status = 400, description = "A malformed or unknown query parameter", body = ErrorBody),
        (status = 401, description = "No or an unknown token", body = ErrorBody),
        (status = 403, description = "The token's role may not read logs", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    )
)]
pub async fn list_audit(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    let query: AuditQuery = parse_query(req.query_string())?;
    let filter = AuditFilter {
        since: time_param("since", query.since.as_deref())?,
        until: time_param("until", query.until.as_deref())?,
        actor: query.actor,
        action: query.action.as_deref().map(audit_action).transpose()?,
        object_type: query.object_type.map(object_type).transpose()?,
        object_id: query.object_id,
    };
    let page = page(query.limit.as_deref(), query.cursor)?;
    let listing = state.store.list_audit(&filter, &page).await.map_err(|e| store_error(e, "listing the audit log"))?;
    Ok(HttpResponse::Ok().json(listing))
}

/// Walks the audit log's hash chain and reports the first entry that does not hold.
#[utoipa::path(
    get,
    path = "/v1/audit-logs/verify",
    tag = "logs",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The result of the check (`ok` false names the first broken `seq`)", body = VerifyReport),
        (status = 401, description = "No or an unknown token", body = ErrorBody),
        (status = 403, description = "The token's role may not read logs", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    )
)]
pub async fn verify_audit(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    let result = state.store.verify_audit().await.map_err(|e| store_error(e, "verifying the audit log"))?;
    if let VerifyResult::Broken { seq, reason, .. } = &result {
        tracing::warn!(seq, reason = %reason, "audit log hash chain does not hold");
    }
    Ok(HttpResponse::Ok().json(VerifyReport::from(result)))
}

/// The activity log (one entry per decision), newest first.
#[utoipa::path(
    get,
    path = "/v1/activity-logs",
    tag = "logs",
    params(ActivityQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of activity entries, newest first", body = Listing<ActivityEntry>),
        (status = 400, description = "A malformed or unknown query parameter", body = ErrorBody),
        (status = 401, description = "No or an unknown token", body = ErrorBody),
        (status = 403, description = "The token's role may not read logs", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    )
)]
pub async fn list_activity(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require(&req, &state, READERS)?;
    let query: ActivityQuery = parse_query(req.query_string())?;
    let filter = ActivityFilter {
        since: time_param("since", query.since.as_deref())?,
        until: time_param("until", query.until.as_deref())?,
        username: query.username,
        application: query.application,
        decision: query.decision.map(decision).transpose()?,
        rule_id: query.rule_id,
    };
    let page = page(query.limit.as_deref(), query.cursor)?;
    let listing =
        state.store.list_activity(&filter, &page).await.map_err(|e| store_error(e, "listing the activity log"))?;
    Ok(HttpResponse::Ok().json(listing))
}

/// Parses a query string into `Q`, accepting only the parameters `Q` documents, each
/// once and non-empty.
fn parse_query<Q: IntoParams + DeserializeOwned>(query_string: &str) -> Result<Q, ApiError> {
    let known: Vec<String> = Q::into_params(|| Some(ParameterIn::Query)).into_iter().map(|p| p.name).collect();
    let mut fields = serde_json::Map::new();
    for (name, value) in url::form_urlencoded::parse(query_string.as_bytes()) {
        if !known.iter().any(|k| *k == name) {
            let known: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
            return Err(ApiError::bad_field(
                &name,
                format!("unknown query parameter `{name}`; known: {}", known.join(", ")),
            ));
        }
        if value.is_empty() {
            return Err(ApiError::bad_field(&name, format!("`{name}` must not be empty")));
        }
        if fields.insert(name.to_string(), serde_json::Value::String(value.into_owned())).is_some() {
            return Err(ApiError::bad_field(&name, format!("`{name}` is given more than once")));
        }
    }
    // Every field is an optional string and only known names are present, so this
    // cannot fail; mapped anyway rather than trusted.
    serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| ApiError::malformed(format!("unexpected query string: {e}")))
}

fn time_param(name: &str, value: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    value
        .map(|v| {
            parse_time(v).ok_or_else(|| {
                ApiError::bad_field(
                    name,
                    format!("`{name}` is not an RFC 3339 time (e.g. `2025-01-31T12:00:00Z`): `{v}`"),
                )
            })
        })
        .transpose()
}

fn page(limit: Option<&str>, cursor: Option<String>) -> Result<Page, ApiError> {
    let limit = match limit {
        None => Page::DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=Page::MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_field(
                    "limit",
                    format!("`limit` must be a whole number from 1 to {}, not `{text}`", Page::MAX_LIMIT),
                ))
            }
        },
    };
    Ok(Page { limit, cursor })
}

fn audit_action(value: &str) -> Result<AuditAction, ApiError> {
    AuditAction::parse(value).ok_or_else(|| {
        ApiError::bad_field("action", format!("`action` must be `create`, `update`, `delete` or `load`, not `{value}`"))
    })
}

fn object_type(value: String) -> Result<String, ApiError> {
    if ObjectKind::parse(&value).is_some() || value == "file" {
        Ok(value)
    } else {
        Err(ApiError::bad_field(
            "object_type",
            format!("`object_type` must be `rule`, `policy`, `webhook` or `file`, not `{value}`"),
        ))
    }
}

fn decision(value: String) -> Result<String, ApiError> {
    match value.as_str() {
        "allow" | "deny" => Ok(value),
        _ => Err(ApiError::bad_field("decision", format!("`decision` must be `allow` or `deny`, not `{value}`"))),
    }
}

/// A store failure as the caller sees it: a cursor it made up is its mistake (400), an
/// unreachable store a 503, anything else our fault (500, details in the log).
pub(super) fn store_error(e: StoreError, doing: &str) -> ApiError {
    match e {
        StoreError::BadCursor => ApiError::bad_field(
            "cursor",
            "`cursor` is not one this listing handed out; pass `next_cursor` back unchanged",
        ),
        StoreError::Unavailable(why) => {
            tracing::warn!(error = %why, "store unavailable while {doing}");
            ApiError::store_unavailable()
        }
        other => {
            tracing::error!(error = %other, "store failed while {doing}");
            ApiError::internal(doing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_accepts_known_parameters_once() {
        let q: AuditQuery = parse_query("actor=alice&object_id=a%20b&limit=5").unwrap();
        assert_eq!(q.actor.as_deref(), Some("alice"));
        assert_eq!(q.object_id.as_deref(), Some("a b"));
        assert_eq!(q.limit.as_deref(), Some("5"));
        let empty: ActivityQuery = parse_query("").unwrap();
        assert!(empty.username.is_none());

        for (query, field) in
            [("usr=alice", "usr"), ("actor=a&actor=b", "actor"), ("actor=", "actor"), ("username=x", "username")]
        {
            let e = parse_query::<AuditQuery>(query).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{query}");
            assert_eq!(e.details[0].field, field, "{query}");
        }
    }

    #[test]
    fn limits_and_times_are_checked() {
        assert_eq!(page(None, None).unwrap().limit, 100);
        assert_eq!(page(Some("1000"), None).unwrap().limit, 1000);
        for bad in ["0", "1001", "-1", "ten", "1.5"] {
            assert_eq!(page(Some(bad), None).unwrap_err().details[0].field, "limit", "{bad}");
        }
        assert!(time_param("since", Some("2025-01-31T12:00:00+01:00")).unwrap().is_some());
        let e = time_param("until", Some("yesterday")).unwrap_err();
        assert_eq!(e.details[0].field, "until");
        assert!(e.message.contains("`until`"), "{}", e.message);
    }

    #[test]
    fn verify_report_keeps_the_spec_shape() {
        let ok = serde_json::to_value(VerifyReport::from(VerifyResult::Ok { entries: 4 })).unwrap();
        assert_eq!(ok, serde_json::json!({"ok": true, "entries": 4}));
        let broken = VerifyResult::Broken { seq: 3, entries_checked: 2, reason: "hash mismatch".into() };
        assert_eq!(
            serde_json::to_value(VerifyReport::from(broken.clone())).unwrap(),
            serde_json::to_value(broken).unwrap()
        );
    }

    #[test]
    fn a_made_up_cursor_is_the_callers_mistake() {
        let e = store_error(StoreError::BadCursor, "listing");
        assert_eq!((e.status.as_u16(), e.details[0].field.as_str()), (400, "cursor"));
        assert_eq!(store_error(StoreError::Unavailable("locked".into()), "listing").status.as_u16(), 503);
    }
}
