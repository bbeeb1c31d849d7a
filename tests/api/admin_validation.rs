//! Save-time validation over the API (SPEC §4, §5): one case per kind of problem, one
//! body with many at once, and proof that a refused write stores nothing and leaves
//! no audit entry.

use serde_json::{json, Value};

use crate::admin_support::assert_one_problem;
use crate::helpers::*;

const API: &str = "https://api.example.com";

/// POSTs a rule that must be refused with exactly one problem, then checks that
/// nothing was stored or audited.
async fn refused_rule(app: &TestApp, rule: Value, field: &str, message: &str) {
    let (status, body) = app.post_json("/v1/rules", ADMIN_TOKEN, &rule).await;
    assert_one_problem(status, &body, field, message);
    nothing_stored(app, "rules", rule["id"].as_str().expect("test rules have ids")).await;
}

/// Like [`refused_rule`] for a message whose tail comes from a library (a JSONPath or
/// regex parser): the message must start with `prefix`.
async fn refused_rule_prefix(app: &TestApp, rule: Value, field: &str, prefix: &str) {
    let (status, body) = app.post_json("/v1/rules", ADMIN_TOKEN, &rule).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "validation_failed");
    let details = body["error"]["details"].as_array().expect("details");
    assert_eq!(details.len(), 1, "{body}");
    assert_eq!(details[0]["field"], field, "{body}");
    let message = details[0]["message"].as_str().expect("message");
    assert!(message.starts_with(prefix) && message.len() > prefix.len(), "{message:?} should start with {prefix:?}");
    nothing_stored(app, "rules", rule["id"].as_str().expect("id")).await;
}

async fn nothing_stored(app: &TestApp, kind: &str, id: &str) {
    let (status, body) = app.get(&format!("/v1/{kind}/{id}"), ADMIN_TOKEN).await;
    assert_eq!(status, 404, "{id} was stored: {body}");
    assert!(app.audit_of(id).await.is_empty(), "{id} has audit entries");
}

#[tokio::test]
async fn each_kind_of_problem_is_a_422_naming_the_field() {
    let app = spawn_app_with(AppOptions::default()).await;

    // Unknown placeholder, with the nearest known name as a hint, wherever it stands.
    refused_rule(
        &app,
        json!({"id": "typo", "method": "GET", "url": format!("{API}/users/%usernme%")}),
        "url",
        "unknown placeholder `%usernme%`; did you mean `%username%`?",
    )
    .await;
    refused_rule(
        &app,
        json!({"id": "typo-header", "method": "GET", "url": API,
               "headers": [{"key": "X-Device", "value": "%device%"}]}),
        "headers[0].value",
        "unknown placeholder `%device%`; did you mean `%device_id%`?",
    )
    .await;
    refused_rule(
        &app,
        json!({"id": "typo-body", "method": "POST", "url": API, "body": {"ip": "%remote-ip%"}}),
        "body.ip",
        "unknown placeholder `%remote-ip%`; did you mean `%remote_ip%`?",
    )
    .await;

    // Placeholders where the method or the place does not allow them.
    refused_rule(
        &app,
        json!({"id": "in-host", "method": "GET", "url": "https://%username%.example.com/check"}),
        "url",
        "placeholders are not allowed in the scheme, host or port of a URL",
    )
    .await;
    refused_rule(
        &app,
        json!({"id": "get-body", "method": "GET", "url": API, "body": {"user": "%username%"}}),
        "body",
        "a GET rule has no body; use `POST`, or move the values into `query`",
    )
    .await;
    refused_rule(
        &app,
        json!({"id": "json-key", "method": "POST", "url": API, "body": {"%username%": true}}),
        "body.%username%",
        "placeholders are not allowed in JSON keys",
    )
    .await;
    refused_rule(
        &app,
        json!({"id": "query-name", "method": "GET", "url": API, "query": [{"key": "%username%", "value": "x"}]}),
        "query[0].key",
        "placeholders are not allowed in query parameter names",
    )
    .await;

    // Malformed URL, scheme other than http/https.
    refused_rule(
        &app,
        json!({"id": "no-scheme", "method": "GET", "url": "api.example.com/check"}),
        "url",
        "`api.example.com/check` is not an absolute http:// or https:// URL",
    )
    .await;
    refused_rule(
        &app,
        json!({"id": "ftp", "method": "GET", "url": "ftp://files.example.com/check"}),
        "url",
        "scheme `ftp` is not allowed; use http or https",
    )
    .await;

    // Bad JSONPath, bad regular expression.
    refused_rule_prefix(
        &app,
        json!({"id": "bad-path", "method": "GET", "url": API,
               "response_actions": [{"type": "exists", "key": "$.["}]}),
        "response_actions[0].key",
        "`$.[` is not a valid JSONPath",
    )
    .await;
    refused_rule_prefix(
        &app,
        json!({"id": "bad-regex", "method": "GET", "url": API,
               "response_actions": [{"type": "matches", "key": "status", "value": "(unclosed"}]}),
        "response_actions[0].value",
        "`(unclosed` is not a valid regular expression: ",
    )
    .await;

    // Wrong value type for an action.
    refused_rule(
        &app,
        json!({"id": "gt-string", "method": "GET", "url": API,
               "response_actions": [{"type": "greater_than", "key": "score", "value": "70"}]}),
        "response_actions[0].value",
        "`greater_than` needs a number, got a string",
    )
    .await;
    refused_rule(
        &app,
        json!({"id": "one-of-scalar", "method": "GET", "url": API,
               "response_actions": [{"type": "one_of", "key": "tier", "value": "gold"}]}),
        "response_actions[0].value",
        "`one_of` needs an array, got a string",
    )
    .await;
    refused_rule(
        &app,
        json!({"id": "exists-value", "method": "GET", "url": API,
               "response_actions": [{"type": "exists", "key": "tier", "value": true}]}),
        "response_actions[0].value",
        "`exists` takes no value",
    )
    .await;

    // Missing auth fields.
    refused_rule(
        &app,
        json!({"id": "oauth-no-secret", "method": "GET", "url": API,
               "auth": {"type": "oauth2_client_credentials", "token_url": "https://idp.example.com/token",
                        "client_id": "verdict"}}),
        "auth.client_secret",
        "`client_secret` is required for auth type `oauth2_client_credentials`",
    )
    .await;
    refused_rule(
        &app,
        json!({"id": "key-no-value", "method": "GET", "url": API, "auth": {"type": "api_key", "name": "X-Key"}}),
        "auth.value",
        "`value` is required for auth type `api_key`",
    )
    .await;
    // The mask stands for a stored value, and a new rule has none.
    refused_rule(
        &app,
        json!({"id": "basic-mask", "method": "GET", "url": API,
               "auth": {"type": "basic", "username": "svc", "password": "********"}}),
        "auth.password",
        "`password` is required for auth type `basic`",
    )
    .await;

    // A policy naming a rule that does not exist.
    app.create_rule(json!({"id": "real", "method": "GET", "url": API})).await;
    let (status, body) = app
        .post_json(
            "/v1/policies",
            ADMIN_TOKEN,
            &json!({"id": "ghostly", "applications": ["a"], "rules": ["real", "ghost"]}),
        )
        .await;
    assert_one_problem(status, &body, "rules[1]", "rule `ghost` does not exist");
    nothing_stored(&app, "policies", "ghostly").await;
    let (status, body) =
        app.post_json("/v1/policies", ADMIN_TOKEN, &json!({"id": "no-apps", "applications": [], "rules": []})).await;
    assert_one_problem(status, &body, "applications", "list at least one application, or `\"*\"` for all");
    nothing_stored(&app, "policies", "no-apps").await;

    // The only entry in the audit log is the one successful create.
    let audit = app.audit_all().await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].object_id, "real");
}

#[tokio::test]
async fn every_problem_of_a_body_is_listed_at_once() {
    let app = spawn_app_with(AppOptions::default()).await;
    let rule = json!({
        "id": "many-problems",
        "method": "GET",
        "url": format!("{API}/users/%usernme%"),
        "body": {"user": "%username%"},
        "auth": {"type": "basic", "username": "svc"},
        "response_actions": [
            {"type": "equals", "key": "$.[", "value": 1},
            {"type": "matches", "key": "status", "value": "(unclosed"},
            {"type": "greater_than", "key": "score", "value": "high"},
            {"type": "one_of", "key": "tier", "value": {"gold": true}}
        ],
        "timeout_ms": 0,
        "on_error": "maybe"
    });
    let (status, body) = app.post_json("/v1/rules", ADMIN_TOKEN, &rule).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "validation_failed");
    let details = body["error"]["details"].as_array().expect("details");
    let found: Vec<(&str, &str)> = details
        .iter()
        .map(|d| (d["field"].as_str().unwrap_or_default(), d["message"].as_str().unwrap_or_default()))
        .collect();
    let expected = [
        ("url", "unknown placeholder `%usernme%`; did you mean `%username%`?"),
        ("body", "a GET rule has no body; use `POST`, or move the values into `query`"),
        ("auth.password", "`password` is required for auth type `basic`"),
        ("response_actions[0].key", "`$.[` is not a valid JSONPath"),
        ("response_actions[1].value", "`(unclosed` is not a valid regular expression"),
        ("response_actions[2].value", "`greater_than` needs a number, got a string"),
        ("response_actions[3].value", "`one_of` needs an array, got an object"),
        ("timeout_ms", "must be between 1 and 60000"),
        ("on_error", "`maybe` is not supported; use `deny` or `allow`"),
    ];
    for (field, message) in expected {
        assert!(
            found.iter().any(|(f, m)| *f == field && m.starts_with(message)),
            "missing {field}: {message} in {body}"
        );
    }
    assert_eq!(found.len(), expected.len(), "{body}");
    assert_eq!(body["error"]["message"], format!("{} problems found; nothing was saved", expected.len()));
    nothing_stored(&app, "rules", "many-problems").await;
    assert!(app.audit_all().await.is_empty());
}

#[tokio::test]
async fn a_refused_update_leaves_the_stored_object_as_it_was() {
    let app = spawn_app_with(AppOptions::default()).await;
    let created = app
        .create_rule(json!({"id": "stable", "method": "POST", "url": format!("{API}/check"),
                             "body": {"user": "%username%"}}))
        .await;
    let policy = app.create_policy(json!({"id": "stable-policy", "applications": ["a"], "rules": ["stable"]})).await;

    let mut broken = created.clone();
    broken["url"] = json!("ftp://files.example.com/x");
    broken["body"] = json!({"%username%": "x"});
    let (status, body) = app.put_json("/v1/rules/stable", ADMIN_TOKEN, &broken).await;
    assert_eq!(status, 422, "{body}");
    let fields: Vec<&str> =
        body["error"]["details"].as_array().expect("details").iter().filter_map(|d| d["field"].as_str()).collect();
    assert_eq!(fields, ["url", "body.%username%"], "{body}");

    let mut broken_policy = policy.clone();
    broken_policy["rules"] = json!(["stable", "missing"]);
    let (status, body) = app.put_json("/v1/policies/stable-policy", ADMIN_TOKEN, &broken_policy).await;
    assert_one_problem(status, &body, "rules[1]", "rule `missing` does not exist");

    let (_, rule) = app.get("/v1/rules/stable", ADMIN_TOKEN).await;
    assert_eq!(rule, created);
    let (_, now) = app.get("/v1/policies/stable-policy", ADMIN_TOKEN).await;
    assert_eq!(now, policy);
    assert_eq!(app.audit_of("stable").await.len(), 1);
    assert_eq!(app.audit_of("stable-policy").await.len(), 1);
}
