//! Outcomes of one evaluation (SPEC §4): 2xx is judged by the response actions, 4xx is
//! "not met", and no usable answer (connection refused, timeout, 5xx, a body that is
//! not the declared JSON/JSONP) is an error that `on_error` turns into deny or allow.

use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::tools::closed_origin;

fn rule(url: String, extra: Value) -> Value {
    let mut rule = json!({"id": "r", "method": "GET", "url": url,
        "response_actions": [{"type": "equals", "key": "$.status", "value": "ok"}]});
    for (k, v) in extra.as_object().unwrap() {
        rule[k] = v.clone();
    }
    rule
}

async fn app_for(rule: Value) -> TestApp {
    spawn_app(json!([rule]), json!([{"id": "p", "applications": ["app"], "rules": ["r"]}])).await
}

async fn api_answering(template: ResponseTemplate) -> MockServer {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(template).mount(&api).await;
    api
}

/// Decides once and returns (decision, rule outcome, reason).
async fn outcome(app: &TestApp) -> (String, String, String) {
    let a = app.decision(json!({"application": "app"})).await;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (s(&a["decision"]), s(&a["rules"][0]["outcome"]), s(&a["reason"]))
}

#[tokio::test]
async fn a_4xx_answer_is_not_met_even_with_on_error_allow() {
    let api = api_answering(ResponseTemplate::new(403).set_body_json(json!({"status": "ok"}))).await;
    let app = app_for(rule(format!("{}/x", api.uri()), json!({"on_error": "allow"}))).await;
    let (decision, rule_outcome, reason) = outcome(&app).await;
    assert_eq!((decision.as_str(), rule_outcome.as_str()), ("deny", "deny"), "{reason}");
    assert_eq!(reason, "policy p: rule r denied: HTTP 403: the API refused, criteria not met");
}

#[tokio::test]
async fn a_5xx_answer_is_an_error_that_on_error_decides() {
    let api = api_answering(ResponseTemplate::new(503).set_body_json(json!({"status": "ok"}))).await;
    let deny = app_for(rule(format!("{}/x", api.uri()), json!({}))).await;
    assert_eq!(outcome(&deny).await, ("deny".into(), "error".into(), "policy p: rule r failed: HTTP 503".into()));
    let allow = app_for(rule(format!("{}/x", api.uri()), json!({"on_error": "allow"}))).await;
    assert_eq!(outcome(&allow).await, ("allow".into(), "error".into(), "policy p allowed: rule r allowed".into()));
    let answer = allow.decision(json!({"application": "app"})).await;
    assert_eq!(answer["rules"][0]["reason"], "HTTP 503; on_error allows");
    assert_eq!(answer["rules"][0]["http_status"], 503);
}

#[tokio::test]
async fn connection_refused_is_an_error_that_on_error_decides() {
    let origin = closed_origin();
    let deny = app_for(rule(format!("{origin}/x"), json!({}))).await;
    assert_eq!(
        outcome(&deny).await,
        ("deny".into(), "error".into(), "policy p: rule r failed: connection refused".into())
    );
    let allow = app_for(rule(format!("{origin}/x"), json!({"on_error": "allow"}))).await;
    let answer = allow.decision(json!({"application": "app"})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    assert_eq!(answer["rules"][0]["outcome"], "error");
    assert_eq!(answer["rules"][0]["reason"], "connection refused; on_error allows");
}

#[tokio::test]
async fn a_slow_api_times_out_at_the_rule_deadline() {
    let api = api_answering(
        ResponseTemplate::new(200).set_body_json(json!({"status": "ok"})).set_delay(Duration::from_secs(10)),
    )
    .await;
    let deny = app_for(rule(format!("{}/x", api.uri()), json!({"timeout_ms": 300}))).await;
    assert_eq!(
        outcome(&deny).await,
        ("deny".into(), "error".into(), "policy p: rule r failed: timed out after 300 ms".into())
    );
    let allow = app_for(rule(format!("{}/x", api.uri()), json!({"timeout_ms": 300, "on_error": "allow"}))).await;
    let answer = allow.decision(json!({"application": "app"})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    assert_eq!(answer["rules"][0]["reason"], "timed out after 300 ms; on_error allows");
}

#[tokio::test]
async fn an_unparsable_body_is_an_error() {
    let api = api_answering(ResponseTemplate::new(200).set_body_raw("<html>not json</html>", "text/html")).await;
    let app = app_for(rule(format!("{}/x", api.uri()), json!({}))).await;
    let (decision, rule_outcome, reason) = outcome(&app).await;
    assert_eq!((decision.as_str(), rule_outcome.as_str()), ("deny", "error"));
    assert!(reason.starts_with("policy p: rule r failed: the answer is not valid JSON"), "{reason}");
    let lenient = app_for(rule(format!("{}/x", api.uri()), json!({"on_error": "allow"}))).await;
    assert_eq!(outcome(&lenient).await.0, "allow");
}

#[tokio::test]
async fn jsonp_answers_are_unwrapped_when_declared() {
    let api = api_answering(
        ResponseTemplate::new(200).set_body_raw("handle_check({\"status\": \"ok\"});", "application/javascript"),
    )
    .await;
    let jsonp = app_for(rule(format!("{}/x", api.uri()), json!({"verification": "jsonp"}))).await;
    assert_eq!(outcome(&jsonp).await.0, "allow");
    let json_declared = app_for(rule(format!("{}/x", api.uri()), json!({}))).await;
    let (decision, rule_outcome, _) = outcome(&json_declared).await;
    assert_eq!((decision.as_str(), rule_outcome.as_str()), ("deny", "error"), "JSONP is not JSON");
}

#[tokio::test]
async fn jsonp_declared_but_plain_json_answered_is_an_error() {
    let api = api_answering(ResponseTemplate::new(200).set_body_json(json!({"status": "ok"}))).await;
    let app = app_for(rule(format!("{}/x", api.uri()), json!({"verification": "jsonp"}))).await;
    let (decision, rule_outcome, reason) = outcome(&app).await;
    assert_eq!((decision.as_str(), rule_outcome.as_str()), ("deny", "error"));
    assert!(reason.contains("not JSONP"), "{reason}");
}

#[tokio::test]
async fn without_response_actions_a_2xx_allows_and_the_body_is_not_parsed() {
    let api = api_answering(ResponseTemplate::new(204)).await;
    let app = app_for(json!({"id": "r", "method": "GET", "url": format!("{}/x", api.uri())})).await;
    let a = app.decision(json!({"application": "app"})).await;
    assert_eq!(a["decision"], "allow", "{a}");
    assert_eq!(a["rules"][0]["http_status"], 204);
    let garbage = api_answering(ResponseTemplate::new(200).set_body_raw("garbage", "text/plain")).await;
    let app = app_for(json!({"id": "r", "method": "GET", "url": format!("{}/x", garbage.uri())})).await;
    assert_eq!(app.decision(json!({"application": "app"})).await["decision"], "allow");
}
