//! Authentication to the rules' APIs (SPEC §4 `auth`): none, Basic, API key in a
//! header or the query, and OAuth2 client credentials with its token cache, sharing,
//! single flight, refresh on 401 and renewal at expiry. Token requests are counted at
//! the token endpoint.

use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{any, basic_auth, bearer_token, header, method, path, query_param, query_param_is_missing};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::*;

fn ok() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"status": "ok"}))
}

fn token(access: &str, expires_in: u64) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_json(json!({"access_token": access, "token_type": "Bearer", "expires_in": expires_in}))
}

async fn one_rule_app(rule: Value) -> TestApp {
    let id = rule["id"].as_str().unwrap().to_owned();
    spawn_app(json!([rule]), json!([{"id": "p", "applications": ["app"], "rules": [id]}])).await
}

fn rule_with_auth(id: &str, url: String, auth: Value) -> Value {
    json!({"id": id, "method": "GET", "url": url, "auth": auth,
           "response_actions": [{"type": "equals", "key": "status", "value": "ok"}]})
}

fn oauth(token_url: String) -> Value {
    json!({"type": "oauth2_client_credentials", "token_url": token_url, "client_id": "verdict-client",
           "client_secret": "client-s3cret", "scopes": ["posture.read", "hr.read"],
           "params": [{"key": "audience", "value": "posture-api"}]})
}

fn ctx() -> Value {
    json!({"application": "app", "username": "alice"})
}

fn form(req: &Request) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(&req.body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    pairs.sort();
    pairs
}

fn expected_token_params() -> Vec<(String, String)> {
    let mut want: Vec<(String, String)> = [
        ("grant_type", "client_credentials"),
        ("client_id", "verdict-client"),
        ("client_secret", "client-s3cret"),
        ("scope", "posture.read hr.read"),
        ("audience", "posture-api"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    want.sort();
    want
}

#[tokio::test]
async fn auth_none_sends_no_credentials() {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ok()).expect(1).mount(&api).await;
    let app = one_rule_app(rule_with_auth("r", format!("{}/x", api.uri()), json!({"type": "none"}))).await;
    assert_eq!(app.decision(ctx()).await["decision"], "allow");
    let req = &api.received_requests().await.unwrap()[0];
    assert!(req.headers.get("authorization").is_none());
    assert_eq!(req.url.query(), None);
}

#[tokio::test]
async fn basic_auth_sends_the_authorization_header() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(basic_auth("svc-user", "p@ss:w0rd"))
        .and(header("authorization", "Basic c3ZjLXVzZXI6cEBzczp3MHJk"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(rule_with_auth(
        "r",
        format!("{}/x", api.uri()),
        json!({"type": "basic", "username": "svc-user", "password": "p@ss:w0rd"}),
    ))
    .await;
    let answer = app.decision(ctx()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
}

#[tokio::test]
async fn an_api_key_goes_in_the_named_header() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(header("x-api-key", "key-123"))
        .and(query_param_is_missing("X-API-Key"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(rule_with_auth(
        "r",
        format!("{}/x", api.uri()),
        json!({"type": "api_key", "name": "X-API-Key", "value": "key-123", "in": "header"}),
    ))
    .await;
    let answer = app.decision(ctx()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
}

#[tokio::test]
async fn an_api_key_goes_in_the_query_next_to_the_rules_own_query() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/x"))
        .and(query_param("api_key", "key&123"))
        .and(query_param("user", "alice"))
        .and(query_param("tenant", "acme"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(json!({"id": "r", "method": "GET", "url": format!("{}/x?user=%username%", api.uri()),
        "query": [{"key": "tenant", "value": "acme"}],
        "auth": {"type": "api_key", "name": "api_key", "value": "key&123", "in": "query"}}))
    .await;
    let answer = app.decision(ctx()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let req = &api.received_requests().await.unwrap()[0];
    assert!(req.headers.get("api_key").is_none());
    assert_eq!(req.url.query_pairs().count(), 3, "{}", req.url);
}

#[tokio::test]
async fn oauth2_posts_the_client_credentials_grant_and_sends_the_bearer_token() {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth2/token"))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .respond_with(token("tok-1", 3600))
        .expect(1)
        .mount(&idp)
        .await;
    let api = MockServer::start().await;
    Mock::given(method("GET")).and(bearer_token("tok-1")).respond_with(ok()).expect(1).mount(&api).await;
    let app =
        one_rule_app(rule_with_auth("r", format!("{}/x", api.uri()), oauth(format!("{}/oauth2/token", idp.uri()))))
            .await;
    let answer = app.decision(ctx()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let token_req = &idp.received_requests().await.unwrap()[0];
    assert_eq!(form(token_req), expected_token_params());
}

#[tokio::test]
async fn oauth2_token_method_get_sends_the_grant_in_the_query() {
    let idp = MockServer::start().await;
    Mock::given(method("GET")).and(path("/token")).respond_with(token("tok-g", 3600)).expect(1).mount(&idp).await;
    let api = MockServer::start().await;
    Mock::given(method("GET")).and(bearer_token("tok-g")).respond_with(ok()).expect(1).mount(&api).await;
    let mut auth = oauth(format!("{}/token", idp.uri()));
    auth["token_method"] = json!("GET");
    let app = one_rule_app(rule_with_auth("r", format!("{}/x", api.uri()), auth)).await;
    let answer = app.decision(ctx()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let token_req = &idp.received_requests().await.unwrap()[0];
    assert!(token_req.body.is_empty());
    let mut query: Vec<(String, String)> =
        token_req.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    query.sort();
    assert_eq!(query, expected_token_params());
}

async fn token_endpoint(expected_fetches: u64) -> MockServer {
    let idp = MockServer::start().await;
    Mock::given(path("/token")).respond_with(token("tok-1", 3600)).expect(expected_fetches).mount(&idp).await;
    idp
}

#[tokio::test]
async fn the_oauth2_token_is_cached_between_decisions() {
    let idp = token_endpoint(1).await;
    let api = MockServer::start().await;
    Mock::given(bearer_token("tok-1")).respond_with(ok()).expect(3).mount(&api).await;
    let app =
        one_rule_app(rule_with_auth("r", format!("{}/x", api.uri()), oauth(format!("{}/token", idp.uri())))).await;
    for _ in 0..3 {
        assert_eq!(app.decision(ctx()).await["decision"], "allow");
    }
}

#[tokio::test]
async fn rules_with_the_same_client_share_one_token_and_another_client_gets_its_own() {
    let idp = MockServer::start().await;
    Mock::given(path("/token"))
        .and(wiremock::matchers::body_string_contains("client_id=verdict-client&"))
        .respond_with(token("tok-shared", 3600))
        .expect(1)
        .mount(&idp)
        .await;
    Mock::given(path("/token"))
        .and(wiremock::matchers::body_string_contains("client_id=other-client&"))
        .respond_with(token("tok-other", 3600))
        .expect(1)
        .mount(&idp)
        .await;
    let api = MockServer::start().await;
    Mock::given(path("/a")).and(bearer_token("tok-shared")).respond_with(ok()).expect(1).mount(&api).await;
    Mock::given(path("/b")).and(bearer_token("tok-shared")).respond_with(ok()).expect(1).mount(&api).await;
    Mock::given(path("/c")).and(bearer_token("tok-other")).respond_with(ok()).expect(1).mount(&api).await;
    let token_url = format!("{}/token", idp.uri());
    let mut other = oauth(token_url.clone());
    other["client_id"] = json!("other-client");
    let app = spawn_app(
        json!([
            rule_with_auth("ra", format!("{}/a", api.uri()), oauth(token_url.clone())),
            rule_with_auth("rb", format!("{}/b", api.uri()), oauth(token_url.clone())),
            rule_with_auth("rc", format!("{}/c", api.uri()), other)
        ]),
        json!([
            {"id": "pa", "applications": ["app-a"], "rules": ["ra"]},
            {"id": "pb", "applications": ["app-b"], "rules": ["rb"]},
            {"id": "pc", "applications": ["app-c"], "rules": ["rc"]}
        ]),
    )
    .await;
    for application in ["app-a", "app-b", "app-c"] {
        let answer = app.decision(json!({"application": application})).await;
        assert_eq!(answer["decision"], "allow", "{application}: {answer}");
    }
}

#[tokio::test]
async fn fifty_concurrent_decisions_with_an_empty_cache_fetch_one_token() {
    let idp = MockServer::start().await;
    Mock::given(path("/token"))
        .respond_with(token("tok-1", 3600).set_delay(Duration::from_millis(500)))
        .expect(1)
        .mount(&idp)
        .await;
    let api = MockServer::start().await;
    Mock::given(bearer_token("tok-1")).respond_with(ok()).expect(50).mount(&api).await;
    let mut rule = rule_with_auth("r", format!("{}/x", api.uri()), oauth(format!("{}/token", idp.uri())));
    rule["timeout_ms"] = json!(30_000);
    let app = one_rule_app(rule).await;
    let answers = futures::future::join_all((0..50).map(|_| app.decision(ctx()))).await;
    for answer in answers {
        assert_eq!(answer["decision"], "allow", "{answer}");
    }
    // The 50 decisions were sent at once and the token endpoint holds its answer for
    // 500 ms, so they all found the cache empty and waited on the same fetch.
    assert_eq!(idp.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_401_from_the_api_fetches_a_new_token_once_and_retries() {
    let idp = MockServer::start().await;
    Mock::given(path("/token")).respond_with(token("tok-old", 3600)).up_to_n_times(1).expect(1).mount(&idp).await;
    Mock::given(path("/token")).respond_with(token("tok-new", 3600)).expect(1).mount(&idp).await;
    let api = MockServer::start().await;
    Mock::given(bearer_token("tok-old")).respond_with(ResponseTemplate::new(401)).expect(1).mount(&api).await;
    Mock::given(bearer_token("tok-new")).respond_with(ok()).expect(2).mount(&api).await;
    let app =
        one_rule_app(rule_with_auth("r", format!("{}/x", api.uri()), oauth(format!("{}/token", idp.uri())))).await;
    let answer = app.decision(ctx()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    assert_eq!(answer["rules"][0]["http_status"], 200);
    // The new token is the cached one now.
    assert_eq!(app.decision(ctx()).await["decision"], "allow");
}

#[tokio::test]
async fn a_second_401_is_not_retried_again_and_denies() {
    let idp = MockServer::start().await;
    Mock::given(path("/token")).respond_with(token("tok-1", 3600)).expect(2).mount(&idp).await;
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ResponseTemplate::new(401)).expect(2).mount(&api).await;
    let app =
        one_rule_app(rule_with_auth("r", format!("{}/x", api.uri()), oauth(format!("{}/token", idp.uri())))).await;
    let answer = app.decision(ctx()).await;
    assert_eq!(answer["decision"], "deny", "{answer}");
    assert_eq!(answer["rules"][0]["outcome"], "deny");
    assert!(answer["reason"].as_str().unwrap().contains("HTTP 401"), "{answer}");
}

#[tokio::test]
async fn an_expired_token_is_fetched_anew() {
    let idp = MockServer::start().await;
    // Lifetime 2 s: renewed at half its life (1 s), as it is shorter than the margin.
    Mock::given(path("/token")).respond_with(token("tok-1", 2)).up_to_n_times(1).expect(1).mount(&idp).await;
    Mock::given(path("/token")).respond_with(token("tok-2", 3600)).expect(1).mount(&idp).await;
    let api = MockServer::start().await;
    Mock::given(bearer_token("tok-1")).respond_with(ok()).expect(1).mount(&api).await;
    Mock::given(bearer_token("tok-2")).respond_with(ok()).expect(1).mount(&api).await;
    let app =
        one_rule_app(rule_with_auth("r", format!("{}/x", api.uri()), oauth(format!("{}/token", idp.uri())))).await;
    assert_eq!(app.decision(ctx()).await["decision"], "allow");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let answer = app.decision(ctx()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
}

#[tokio::test]
async fn the_rule_timeout_covers_a_slow_token_fetch() {
    let idp = MockServer::start().await;
    Mock::given(path("/token")).respond_with(token("tok-1", 3600).set_delay(Duration::from_secs(5))).mount(&idp).await;
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ok()).expect(0).mount(&api).await;
    let mut rule = rule_with_auth("r", format!("{}/x", api.uri()), oauth(format!("{}/token", idp.uri())));
    rule["timeout_ms"] = json!(300);
    let app = one_rule_app(rule).await;
    let answer = app.decision(ctx()).await;
    assert_eq!(answer["decision"], "deny", "{answer}");
    assert_eq!(answer["rules"][0]["outcome"], "error");
    assert_eq!(answer["reason"], "policy p: rule r failed: timed out after 300 ms");
}
