//! `/openapi.json`: an OpenAPI 3 document, served without a token, that describes every
//! endpoint of SPEC §7 — and nothing the service does not serve.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// The endpoints of SPEC §7 and §10, as (method, OpenAPI path).
const SPEC_ENDPOINTS: &[(&str, &str)] = &[
    ("post", "/v1/decisions"),
    // "any method" /v1/forward-auth
    ("get", "/v1/forward-auth"),
    ("post", "/v1/forward-auth"),
    ("put", "/v1/forward-auth"),
    ("delete", "/v1/forward-auth"),
    ("patch", "/v1/forward-auth"),
    ("head", "/v1/forward-auth"),
    ("options", "/v1/forward-auth"),
    ("get", "/v1/rules"),
    ("post", "/v1/rules"),
    ("get", "/v1/rules/{id}"),
    ("put", "/v1/rules/{id}"),
    ("delete", "/v1/rules/{id}"),
    ("post", "/v1/rules/{id}/test"),
    ("post", "/v1/rules/test"),
    ("get", "/v1/policies"),
    ("post", "/v1/policies"),
    ("get", "/v1/policies/{id}"),
    ("put", "/v1/policies/{id}"),
    ("delete", "/v1/policies/{id}"),
    ("get", "/v1/parameters"),
    ("get", "/v1/audit-logs"),
    ("get", "/v1/audit-logs/verify"),
    ("get", "/v1/activity-logs"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    // SPEC §10, event webhooks
    ("get", "/v1/webhooks"),
    ("post", "/v1/webhooks"),
    ("get", "/v1/webhooks/{id}"),
    ("put", "/v1/webhooks/{id}"),
    ("delete", "/v1/webhooks/{id}"),
    ("post", "/v1/webhooks/{id}/test"),
    ("get", "/v1/webhooks/{id}/deliveries"),
    ("post", "/v1/webhooks/{id}/deliveries/{event_id}/retry"),
];

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Every (method, path) the document describes.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("path item");
            item.keys().filter(|k| METHODS.contains(&k.as_str())).map(move |m| (m.clone(), path.clone()))
        })
        .collect()
}

async fn document(app: &TestApp) -> Value {
    let resp = app.request(Method::GET, "/openapi.json").send().await.expect("openapi.json");
    assert_eq!(resp.status().as_u16(), 200);
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("application/json"), "{content_type}");
    let text = resp.text().await.expect("body");
    serde_json::from_str(&text).expect("the document is JSON")
}

#[tokio::test]
async fn the_document_describes_every_endpoint_of_the_spec() {
    let app = spawn_app(json!([]), json!([])).await;
    let doc = document(&app).await;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "openapi: {}", doc["openapi"]);
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());

    let documented = operations(&doc);
    let spec: BTreeSet<(String, String)> =
        SPEC_ENDPOINTS.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    let missing: Vec<_> = spec.difference(&documented).collect();
    assert!(missing.is_empty(), "endpoints of SPEC §7/§10 missing from /openapi.json: {missing:?}");
    let extra: Vec<_> = documented.difference(&spec).collect();
    assert!(extra.is_empty(), "documented but not in SPEC §7/§10 (update the spec list or the code): {extra:?}");

    // Every /v1 operation requires the bearer scheme, which is declared; the rest none.
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!((scheme["type"].as_str(), scheme["scheme"].as_str()), (Some("http"), Some("bearer")), "{scheme}");
    for (method, path) in &documented {
        let op = &doc["paths"][path][method];
        let secured = op["security"].as_array().is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
        assert_eq!(secured, path.starts_with("/v1/"), "{method} {path}: security {}", op["security"]);
        assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path}: no responses");
    }

    // The types behind the endpoints are described.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "ContextInput",
        "Decision",
        "RuleSpec",
        "PolicySpec",
        "AuditEntry",
        "ActivityEntry",
        "VerifyReport",
        "Readiness",
        "ErrorBody",
        "WebhookSpec",
        "WebhookObject",
        "Delivery",
        "TestAnswer",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing; have {:?}", schemas.keys().collect::<Vec<_>>());
    }
    let params: Vec<&str> = doc["paths"]["/v1/activity-logs"]["get"]["parameters"]
        .as_array()
        .expect("activity-log parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(params, ["since", "until", "username", "application", "decision", "rule_id", "limit", "cursor"]);
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    let app = spawn_app(json!([]), json!([])).await;
    let doc = document(&app).await;
    for (method, path) in operations(&doc) {
        let url = path.replace("{id}", "some-id").replace("{event_id}", "some-event");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let status = app.request(method.clone(), &url).send().await.expect("request").status().as_u16();
        if path.starts_with("/v1/") {
            // Served and guarded: without a token the answer is 401, not 404 or 405.
            assert_eq!(status, 401, "{method} {url}");
        } else {
            assert_eq!(status, 200, "{method} {url}");
        }
    }
}
