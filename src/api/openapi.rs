//! `GET /openapi.json`: the OpenAPI 3 description of every endpoint, generated from
//! the handlers' `#[utoipa::path]` attributes and the types they answer with, so the
//! document cannot drift from the code.
//!
//! Architecture Invariant: every route registered in [`super::routes`] has its handler
//! listed in [`ApiDoc`]'s `paths(...)`; `tests/api/openapi.rs` checks it against the
//! endpoint list of SPEC §7.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::{admin, decisions, logs, system, webhooks};

/// The OpenAPI description of verdict's HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "verdict",
        description = "Access decisions for zero-trust gateways: decisions, rule and policy administration, \
                       audit and activity logs, event webhooks. Every `/v1` endpoint needs `Authorization: Bearer <token>`; \
                       a token's role (`proxy`, `auditor`, `admin`) decides what it may do."
    ),
    paths(
        decisions::decide,
        decisions::forward_auth,
        system::parameters,
        system::healthz,
        system::readyz,
        system::metrics,
        openapi_json,
        logs::list_audit,
        logs::verify_audit,
        logs::list_activity,
        admin::list_rules,
        admin::get_rule,
        admin::create_rule,
        admin::update_rule,
        admin::delete_rule,
        admin::test_stored_rule,
        admin::test_unsaved_rule,
        admin::list_policies,
        admin::get_policy,
        admin::create_policy,
        admin::update_policy,
        admin::delete_policy,
        webhooks::list_webhooks,
        webhooks::get_webhook,
        webhooks::create_webhook,
        webhooks::update_webhook,
        webhooks::delete_webhook,
        webhooks::test_webhook,
        webhooks::list_deliveries,
        webhooks::retry_delivery,
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerToken),
    tags(
        (name = "decisions", description = "Allow or deny, for gateways (role `proxy`)"),
        (name = "rules", description = "Custom rules, their dry runs, and the placeholders they may use"),
        (name = "policies", description = "Policies: which rules cover which applications and subjects"),
        (name = "webhooks", description = "Event notifications to SIEM/SOAR tools: webhooks, test calls, deliveries"),
        (name = "logs", description = "The audit log (changes) and the activity log (decisions), for auditors"),
        (name = "system", description = "Liveness, readiness, metrics and this document; no token needed"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the operations refer to.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("a token of role `proxy`, `auditor` or `admin`"))
                    .build(),
            ),
        );
    }
}

/// The document as JSON, built once.
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        ApiDoc::openapi().to_json().unwrap_or_else(|e| {
            // Serializing a value built from static attributes does not fail; if it ever
            // did, an empty document is better than a panic in a request handler.
            tracing::error!(error = %e, "cannot serialize the OpenAPI document");
            "{}".to_owned()
        })
    })
}

/// This document. Needs no token.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "system",
    responses((status = 200, description = "The OpenAPI 3 description of the API", content_type = "application/json"))
)]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_is_openapi_3_and_every_security_requirement_is_declared() {
        let doc: serde_json::Value = serde_json::from_str(document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);
        let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(!paths.is_empty());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                for requirement in op["security"].as_array().into_iter().flatten() {
                    for name in requirement.as_object().unwrap().keys() {
                        assert!(schemes.contains_key(name), "{method} {path}: unknown security scheme `{name}`");
                    }
                }
                let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
                assert_eq!(secured, path.starts_with("/v1/"), "{method} {path}: only /v1 needs a token");
            }
        }
        // Every referenced schema exists.
        let text = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling $ref to `{name}`");
        }
    }
}
