//! Reasons a person can act on (SPEC §4, §7), and no secret in a reason, an error or
//! a log line — including an API key sent in the query string.

use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{any, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::tools::*;

async fn api_answering(template: ResponseTemplate) -> MockServer {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(template).mount(&api).await;
    api
}

#[tokio::test]
async fn a_deny_names_the_policy_rule_action_value_found_and_value_expected() {
    let api = api_answering(
        ResponseTemplate::new(200).set_body_json(json!({"status": "compliant", "score": 50, "tags": ["byod"]})),
    )
    .await;
    let app = spawn_app(
        json!([
            {"id": "posture", "method": "GET", "url": format!("{}/x", api.uri()),
             "response_actions": [
                 {"type": "equals", "key": "$.status", "value": "compliant"},
                 {"type": "greater_than", "key": "$.score", "value": 70},
                 {"type": "contains", "key": "$.tags", "value": "managed"}
             ]},
            {"id": "either", "method": "GET", "url": format!("{}/y", api.uri()), "match": "any",
             "response_actions": [
                 {"type": "exists", "key": "$.owner"},
                 {"type": "one_of", "key": "$.status", "value": ["active", "on_leave"]}
             ]}
        ]),
        json!([
            {"id": "payroll-access", "applications": ["payroll"], "rules": ["posture"]},
            {"id": "wiki-access", "applications": ["wiki"], "rules": ["either"]}
        ]),
    )
    .await;
    let answer = app.decision(json!({"application": "payroll"})).await;
    assert_eq!(
        answer["reason"],
        "policy payroll-access: rule posture denied: $.score is 50, expected greater_than 70; \
         $.tags is [\"byod\"], expected contains \"managed\""
    );
    assert_eq!(
        answer["rules"][0]["reason"],
        "$.score is 50, expected greater_than 70; $.tags is [\"byod\"], expected contains \"managed\""
    );
    let any = app.decision(json!({"application": "wiki"})).await;
    assert_eq!(
        any["reason"],
        "policy wiki-access: rule either denied: none of the response actions was met: \
         $.owner not found, expected exists; $.status is \"compliant\", expected one_of [\"active\",\"on_leave\"]"
    );
}

#[tokio::test]
async fn an_allow_explains_what_was_met() {
    let api = api_answering(ResponseTemplate::new(200).set_body_json(json!({"status": "active"}))).await;
    let app = spawn_app(
        json!([{"id": "hr", "method": "GET", "url": format!("{}/x", api.uri()),
                "response_actions": [{"type": "one_of", "key": "status", "value": ["active", "on_leave"]}]}]),
        json!([{"id": "p", "applications": ["app"], "rules": ["hr"]}]),
    )
    .await;
    let answer = app.decision(json!({"application": "app"})).await;
    assert_eq!(answer["reason"], "policy p allowed: rule hr allowed");
    assert_eq!(answer["rules"][0]["reason"], "$.status is \"active\", expected one_of [\"active\",\"on_leave\"]");
}

#[tokio::test]
async fn error_reasons_name_the_status_the_timeout_and_the_refusal() {
    let down = api_answering(ResponseTemplate::new(503)).await;
    let slow = api_answering(ResponseTemplate::new(200).set_delay(Duration::from_secs(10))).await;
    let refused = closed_origin();
    let app = spawn_app(
        json!([
            {"id": "down", "method": "GET", "url": format!("{}/x", down.uri())},
            {"id": "slow", "method": "GET", "url": format!("{}/x", slow.uri()), "timeout_ms": 300},
            {"id": "gone", "method": "GET", "url": format!("{refused}/x")}
        ]),
        json!([
            {"id": "p-down", "applications": ["down"], "rules": ["down"]},
            {"id": "p-slow", "applications": ["slow"], "rules": ["slow"]},
            {"id": "p-gone", "applications": ["gone"], "rules": ["gone"]}
        ]),
    )
    .await;
    for (application, reason) in [
        ("down", "policy p-down: rule down failed: HTTP 503"),
        ("slow", "policy p-slow: rule slow failed: timed out after 300 ms"),
        ("gone", "policy p-gone: rule gone failed: connection refused"),
    ] {
        let answer = app.decision(json!({"application": application})).await;
        assert_eq!(answer["reason"], reason, "{answer}");
        assert_eq!(answer["rules"][0]["outcome"], "error");
    }
}

const QUERY_KEY: &str = "QKEY-7f3a9c-in-the-query";
const HEADER_KEY: &str = "HKEY-51b2e0-in-a-header";
const PASSWORD: &str = "PWD-9d8c7b-basic";
const CLIENT_SECRET: &str = "CSEC-0a1b2c-oauth";

/// Rules that each fail, with every kind of secret: an API key in the query against
/// a refused connection and against a 503, a redirect whose target echoes the key,
/// a header key and a password against a 503, and an OAuth client whose token
/// endpoint refuses it and echoes the secret in its error description.
async fn failing_secret_rules() -> (Value, Value, Vec<MockServer>) {
    let down = api_answering(ResponseTemplate::new(503).set_body_string(format!("bad key {QUERY_KEY}"))).await;
    let redirect = api_answering(
        ResponseTemplate::new(302).insert_header("location", format!("http://127.0.0.1:9/next?api_key={QUERY_KEY}")),
    )
    .await;
    let idp = MockServer::start().await;
    Mock::given(path("/token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            json!({"error": "invalid_client", "error_description": format!("secret {CLIENT_SECRET} is wrong")}),
        ))
        .mount(&idp)
        .await;
    let refused = closed_origin();
    let query_key = json!({"type": "api_key", "name": "api_key", "value": QUERY_KEY, "in": "query"});
    let rules = json!([
        {"id": "q-refused", "method": "GET", "url": format!("{refused}/check?user=%username%"), "auth": query_key},
        {"id": "q-503", "method": "GET", "url": format!("{}/check", down.uri()), "auth": query_key},
        {"id": "q-302", "method": "GET", "url": format!("{}/check", redirect.uri()), "auth": query_key},
        {"id": "h-503", "method": "GET", "url": format!("{}/check", down.uri()),
         "auth": {"type": "api_key", "name": "X-API-Key", "value": HEADER_KEY}},
        {"id": "basic-503", "method": "POST", "url": format!("{}/check", down.uri()), "body": {"u": "%username%"},
         "auth": {"type": "basic", "username": "svc", "password": PASSWORD}},
        {"id": "oauth-401", "method": "GET", "url": format!("{}/check", down.uri()),
         "auth": {"type": "oauth2_client_credentials", "token_url": format!("{}/token", idp.uri()),
                  "client_id": "verdict", "client_secret": CLIENT_SECRET}}
    ]);
    let ids: Vec<String> = rules.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    let policies: Vec<Value> =
        ids.iter().map(|id| json!({"id": format!("p-{id}"), "applications": [id], "rules": [id]})).collect();
    (rules, Value::Array(policies), vec![down, redirect, idp])
}

fn secret_rule_ids() -> [&'static str; 6] {
    ["q-refused", "q-503", "q-302", "h-503", "basic-503", "oauth-401"]
}

fn assert_no_secret(text: &str, what: &str) {
    for secret in [QUERY_KEY, HEADER_KEY, PASSWORD, CLIENT_SECRET] {
        assert!(!text.contains(secret), "{what} shows the secret {secret}:\n{text}");
    }
}

#[tokio::test]
async fn no_secret_appears_in_a_decision_answer() {
    let (rules, policies, _servers) = failing_secret_rules().await;
    let app = spawn_app(rules, policies).await;
    let mut reasons = Vec::new();
    for id in secret_rule_ids() {
        let answer = app.decision(json!({"application": id, "username": "alice"})).await;
        assert_eq!(answer["decision"], "deny", "{answer}");
        assert_no_secret(&answer.to_string(), &format!("the answer for {id}"));
        reasons.push(answer["reason"].as_str().unwrap().to_owned());
    }
    assert_eq!(reasons[0], "policy p-q-refused: rule q-refused failed: connection refused");
    assert_eq!(reasons[1], "policy p-q-503: rule q-503 failed: HTTP 503");
    assert!(reasons[5].contains("token endpoint answered HTTP 401 (invalid_client)"), "{}", reasons[5]);
}

#[tokio::test]
async fn no_secret_appears_in_the_debug_log() {
    let (rules, policies, _servers) = failing_secret_rules().await;
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "secrets.json", rules, policies);
    let mut binary = Binary::start(BinaryOptions {
        dir: dir.path(),
        env: vec![("VERDICT_PROXY_TOKEN", PROXY_TOKEN.into()), ("RUST_LOG", "debug".into())],
        run_name: "serve",
    })
    .await;
    for id in secret_rule_ids() {
        let (status, answer) = binary.decide(PROXY_TOKEN, &json!({"application": id, "username": "alice"})).await;
        assert_eq!(status, 200, "{answer}");
        assert_no_secret(&answer.to_string(), &format!("the answer for {id}"));
    }
    binary.stop().await;
    let log = binary.stderr_text();
    assert!(log.contains("DEBUG"), "the log is not at debug level, so it proves nothing:\n{log}");
    assert_no_secret(&log, "the log");
}
