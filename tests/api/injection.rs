//! Injection-safe substitution (SPEC §3): a hostile value lands as ONE literal value
//! wherever it goes — a path segment, a query value, a JSON string, a form value — and
//! a value with CR/LF in a header fails the rule before anything is sent.

use serde_json::{json, Value};
use wiremock::matchers::{any, body_json, method, path, query_param, query_param_is_missing};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::*;

const TRAVERSAL: &str = "../../admin";
const AMPERSAND: &str = "a&admin=1#x";
const QUOTES: &str = "x\", \"admin\": \"yes";
const CRLF: &str = "ok\r\nX-Injected: 1";

async fn one_rule_app(rule: Value) -> TestApp {
    let id = rule["id"].as_str().unwrap().to_owned();
    spawn_app(json!([rule]), json!([{"id": "p", "applications": ["app"], "rules": [id]}])).await
}

fn ok() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({}))
}

fn decoded_segments(req: &Request) -> Vec<String> {
    req.url
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(|s| percent_encoding::percent_decode_str(s).decode_utf8().unwrap().into_owned())
        .collect()
}

async fn only_request(api: &MockServer) -> Request {
    let received = api.received_requests().await.unwrap();
    assert_eq!(received.len(), 1, "expected exactly one call, got {}", received.len());
    received.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_traversal_value_is_one_encoded_path_segment() {
    let api = MockServer::start().await;
    Mock::given(method("GET")).and(path("/users/..%2F..%2Fadmin/check")).respond_with(ok()).expect(1).mount(&api).await;
    let app =
        one_rule_app(json!({"id": "r", "method": "GET", "url": format!("{}/users/%username%/check", api.uri())})).await;
    let answer = app.decision(json!({"application": "app", "username": TRAVERSAL})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let req = only_request(&api).await;
    assert_eq!(decoded_segments(&req), ["users", TRAVERSAL, "check"]);
}

#[tokio::test]
async fn query_characters_in_a_path_value_stay_in_the_segment() {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ok()).expect(1).mount(&api).await;
    let app = one_rule_app(json!({"id": "r", "method": "GET", "url": format!("{}/users/%username%", api.uri())})).await;
    app.decision(json!({"application": "app", "username": AMPERSAND})).await;
    let req = only_request(&api).await;
    assert_eq!(req.url.path(), "/users/a%26admin%3D1%23x");
    assert_eq!(req.url.query(), None, "a value added a query: {}", req.url);
    assert_eq!(decoded_segments(&req), ["users", AMPERSAND]);
}

#[tokio::test]
async fn a_dot_dot_value_cannot_stand_as_a_path_segment() {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ok()).expect(0).mount(&api).await;
    let app = one_rule_app(json!({"id": "r", "method": "GET", "url": format!("{}/users/%username%", api.uri())})).await;
    let answer = app.decision(json!({"application": "app", "username": ".."})).await;
    assert_eq!(answer["decision"], "deny");
    assert!(answer["reason"].as_str().unwrap().contains("`%username%`"), "{answer}");
}

#[tokio::test]
async fn a_hostile_value_in_the_url_query_is_one_query_value() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/check"))
        .and(query_param("user", AMPERSAND))
        .and(query_param("tenant", "acme"))
        .and(query_param_is_missing("admin"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(
        json!({"id": "r", "method": "GET", "url": format!("{}/check?user=%username%&tenant=acme", api.uri())}),
    )
    .await;
    let answer = app.decision(json!({"application": "app", "username": AMPERSAND})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let req = only_request(&api).await;
    assert_eq!(req.url.fragment(), None);
    assert_eq!(req.url.query_pairs().count(), 2, "{}", req.url);
}

#[tokio::test]
async fn a_hostile_value_in_the_query_list_is_one_query_value() {
    let api = MockServer::start().await;
    Mock::given(any())
        .and(query_param("user", AMPERSAND))
        .and(query_param("path", TRAVERSAL))
        .and(query_param_is_missing("admin"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(json!({"id": "r", "method": "GET", "url": format!("{}/check", api.uri()),
        "query": [{"key": "user", "value": "%username%"}, {"key": "path", "value": "%device_id%"}]}))
    .await;
    let answer = app.decision(json!({"application": "app", "username": AMPERSAND, "device_id": TRAVERSAL})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let req = only_request(&api).await;
    assert_eq!(req.url.path(), "/check");
    assert_eq!(req.url.query_pairs().count(), 2, "{}", req.url);
}

#[tokio::test]
async fn a_quote_in_a_json_body_stays_inside_its_string() {
    let api = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_json(json!({"user": QUOTES, "note": format!("user {QUOTES}"), "fixed": 1})))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(json!({"id": "r", "method": "POST", "url": format!("{}/check", api.uri()),
        "body": {"user": "%username%", "note": "user %username%", "fixed": 1}}))
    .await;
    let answer = app.decision(json!({"application": "app", "username": QUOTES})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let body: Value = only_request(&api).await.body_json().unwrap();
    assert!(body.get("admin").is_none(), "a value added a key: {body}");
}

#[tokio::test]
async fn hostile_values_in_a_form_body_are_one_form_value_each() {
    let api = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ok()).expect(1).mount(&api).await;
    let app = one_rule_app(json!({"id": "r", "method": "POST", "url": format!("{}/check", api.uri()),
        "body_format": "form", "body": {"user": "%username%", "device": "%device_id%", "crlf": "%user_agent%"}}))
    .await;
    let answer = app
        .decision(json!({"application": "app", "username": AMPERSAND, "device_id": QUOTES, "user_agent": CRLF}))
        .await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let req = only_request(&api).await;
    assert_eq!(req.headers.get("content-type").unwrap(), "application/x-www-form-urlencoded");
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(&req.body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    assert_eq!(
        pairs,
        [("user".into(), AMPERSAND.into()), ("device".into(), QUOTES.into()), ("crlf".into(), CRLF.into())]
    );
}

#[tokio::test]
async fn crlf_in_a_templated_header_fails_the_rule_and_nothing_is_sent() {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ok()).expect(0).mount(&api).await;
    let app = one_rule_app(json!({"id": "r", "method": "GET", "url": format!("{}/check", api.uri()),
        "headers": [{"key": "X-User", "value": "%username%"}], "on_error": "allow"}))
    .await;
    let answer = app.decision(json!({"application": "app", "username": CRLF})).await;
    assert_eq!(answer["decision"], "deny", "a refused value must not turn into an allow: {answer}");
    let reason = answer["reason"].as_str().unwrap();
    assert!(reason.contains("parameter `%username%` holds a CR, LF or NUL character"), "{reason}");
    assert!(reason.contains("the API was not called"), "{reason}");
}

#[tokio::test]
async fn crlf_in_a_forwarded_client_header_fails_the_rule_and_nothing_is_sent() {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ok()).expect(0).mount(&api).await;
    let app = one_rule_app(json!({"id": "r", "method": "GET", "url": format!("{}/check", api.uri()),
        "headers": [{"key": "Accept-Language", "value": "%headers.Accept-Language%"}]}))
    .await;
    let answer = app.decision(json!({"application": "app", "headers": {"Accept-Language": CRLF}})).await;
    assert_eq!(answer["decision"], "deny");
    assert!(
        answer["reason"].as_str().unwrap().contains("`%headers.accept-language%` holds a CR, LF or NUL"),
        "{answer}"
    );
    let nul = app.decision(json!({"application": "app", "headers": {"Accept-Language": "en\u{0}"}})).await;
    assert_eq!(nul["decision"], "deny", "{nul}");
}

#[tokio::test]
async fn percent_text_that_is_not_a_placeholder_stays_literal_in_the_url() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/a%20b/it%E2%80%99s/alice"))
        .and(query_param("q", "x y"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(
        json!({"id": "r", "method": "GET", "url": format!("{}/a%20b/it%E2%80%99s/%username%?q=x%20y", api.uri())}),
    )
    .await;
    let answer = app.decision(json!({"application": "app", "username": "alice"})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    assert_eq!(only_request(&api).await.url.query(), Some("q=x%20y"));
}

#[tokio::test]
async fn a_value_that_looks_like_a_placeholder_is_not_substituted_again() {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ok()).expect(1).mount(&api).await;
    let app = one_rule_app(json!({"id": "r", "method": "POST", "url": format!("{}/u/%username%", api.uri()),
        "body": {"u": "%username%"}}))
    .await;
    app.decision(json!({"application": "app", "username": "%device_id%", "device_id": "dev-1"})).await;
    let req = only_request(&api).await;
    assert_eq!(req.url.path(), "/u/%25device_id%25");
    assert_eq!(req.body_json::<Value>().unwrap(), json!({"u": "%device_id%"}));
}

#[tokio::test]
async fn a_json_leaf_that_is_exactly_a_group_placeholder_gets_an_array() {
    let api = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_json(json!({
            "groups": ["g-1001", "g-1002"],
            "names": ["Finance", "VPN Users"],
            "nested": {"list": [["g-1001", "g-1002"]]},
            "text": "in g-1001,g-1002",
            "dev": "dev-1"
        })))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(json!({"id": "r", "method": "POST", "url": format!("{}/check", api.uri()),
        "body": {"groups": "%groups%", "names": "%group_names%", "nested": {"list": ["%groups%"]},
                 "text": "in %groups%", "dev": "%device_id%"}}))
    .await;
    let answer = app
        .decision(json!({"application": "app", "groups": ["g-1001", "g-1002"], "group_names": ["Finance", "VPN Users"],
                          "device_id": "dev-1"}))
        .await;
    assert_eq!(answer["decision"], "allow", "the API did not get the arrays: {answer}");
}

#[tokio::test]
async fn literal_text_in_the_query_list_is_one_value_too() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(query_param("v", "a&admin=1 x,y"))
        .and(query_param_is_missing("admin"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(json!({"id": "q", "method": "GET", "url": format!("{}/check", api.uri()),
        "query": [{"key": "v", "value": "a&admin=1 x,%username%"}]}))
    .await;
    let d = app.decision(json!({"application": "app", "username": "y"})).await;
    assert_eq!(d["decision"], "allow", "{d}");
    let raw = only_request(&api).await.url.query().unwrap_or_default().to_owned();
    assert_eq!(raw, "v=a%26admin%3D1%20x%2Cy");
}
