//! The rule-test endpoints (SPEC §7): dry runs of a stored or an unsaved rule, the
//! answer's shape, the 4 KiB cut, no answer on a refused connection, the
//! `X-Verdict-Test` header, and that tests are neither cached nor stored.

use serde_json::{json, Value};
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::admin_support::basic;
use crate::helpers::*;

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn stored_rule_test_shows_request_response_and_each_action() {
    let api = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/check/dev-7"))
        .and(header("x-verdict-test", "true"))
        .and(header("x-tenant", "acme"))
        .and(query_param("tenant", "acme"))
        .and(query_param("api_key", "rt-QUERY-KEY-4411"))
        .and(body_json(json!({"user": "alice@example.com", "groups": ["g1", "g2"]})))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-api-note", "hello")
                .set_body_raw(r#"{"status":"compliant","score":80}"#, "application/json"),
        )
        .expect(1)
        .mount(&api)
        .await;
    let app = spawn_app_with(AppOptions::default()).await;
    app.create_rule(json!({
        "id": "posture",
        "method": "POST",
        "url": format!("{}/check/%device_id%", api.uri()),
        "headers": [{"key": "X-Tenant", "value": "acme"}],
        "query": [{"key": "tenant", "value": "acme"}],
        "body": {"user": "%username%", "groups": "%groups%"},
        "auth": {"type": "api_key", "name": "api_key", "value": "rt-QUERY-KEY-4411", "in": "query"},
        "response_actions": [
            {"type": "equals", "key": "status", "value": "compliant"},
            {"type": "greater_than", "key": "$.score", "value": 70},
            {"type": "exists", "key": "$.missing"}
        ],
        "match": "any"
    }))
    .await;

    let context = json!({"application": "payroll", "username": "alice@example.com",
                         "groups": ["g1", "g2"], "device_id": "dev-7"});
    let (status, answer) = app.post_json("/v1/rules/posture/test", ADMIN_TOKEN, &context).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(keys(&answer), ["actions", "outcome", "reason", "request", "response"]);

    let request = &answer["request"];
    assert_eq!(keys(request), ["body", "headers", "method", "url"]);
    assert_eq!(request["method"], "POST");
    assert_eq!(request["url"], format!("{}/check/dev-7?tenant=acme&api_key=********", api.uri()));
    assert_eq!(request["headers"]["x-tenant"], "acme");
    assert_eq!(request["headers"]["content-type"], "application/json");
    assert_eq!(request["headers"]["x-verdict-test"], "true");
    assert_eq!(request["body"], r#"{"user":"alice@example.com","groups":["g1","g2"]}"#);

    let response = &answer["response"];
    assert_eq!(keys(response), ["body", "headers", "status"]);
    assert_eq!(response["status"], 200);
    assert_eq!(response["headers"]["x-api-note"], "hello");
    assert_eq!(response["body"], r#"{"status":"compliant","score":80}"#);

    assert_eq!(
        answer["actions"],
        json!([
            {"type": "equals", "key": "$.status", "value": "compliant", "found": "compliant", "met": true},
            {"type": "greater_than", "key": "$.score", "value": 70, "found": 80, "met": true},
            {"type": "exists", "key": "$.missing", "value": null, "found": null, "met": false}
        ])
    );
    assert_eq!(answer["outcome"], "allow");
    assert_eq!(
        answer["reason"],
        "$.status is \"compliant\", expected equals \"compliant\"; $.score is 80, expected greater_than 70"
    );
    assert!(!answer.to_string().contains("rt-QUERY-KEY-4411"), "{answer}");
}

#[tokio::test]
async fn unsaved_rule_test_runs_without_storing_anything() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/users/bob"))
        .and(header("x-verdict-test", "true"))
        .and(header("authorization", format!("Basic {}", basic("svc", "rt-BASIC-PW-9021")).as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"active": false})))
        .expect(1)
        .mount(&api)
        .await;
    let app = spawn_app_with(AppOptions::default()).await;
    let body = json!({
        "rule": {"method": "GET", "url": format!("{}/users/%username%", api.uri()),
                 "auth": {"type": "basic", "username": "svc", "password": "rt-BASIC-PW-9021"},
                 "response_actions": [{"type": "equals", "key": "active", "value": true}]},
        "context": {"application": "crm", "username": "bob"}
    });
    let (status, answer) = app.post_json("/v1/rules/test", ADMIN_TOKEN, &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["request"]["url"], format!("{}/users/bob", api.uri()));
    assert_eq!(answer["request"]["headers"]["authorization"], "Basic ********");
    assert_eq!(answer["request"]["body"], Value::Null);
    assert_eq!(answer["response"]["status"], 200);
    assert_eq!(answer["outcome"], "deny");
    assert_eq!(answer["reason"], "$.active is false, expected equals true");
    assert_eq!(
        answer["actions"],
        json!([{"type": "equals", "key": "$.active", "value": true, "found": false, "met": false}])
    );
    let text = answer.to_string();
    assert!(!text.contains("rt-BASIC-PW-9021") && !text.contains(&basic("svc", "rt-BASIC-PW-9021")), "{text}");

    // Nothing stored, nothing audited.
    let (_, rules) = app.get("/v1/rules", ADMIN_TOKEN).await;
    assert_eq!(rules["items"], json!([]));
    assert!(app.audit_all().await.is_empty());
}

#[tokio::test]
async fn unsaved_rule_with_the_id_of_a_stored_one_uses_its_secrets() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v2/check"))
        .and(header("x-api-key", "rt-STORED-KEY-5150"))
        .respond_with(ResponseTemplate::new(200))
        .expect(2)
        .mount(&api)
        .await;
    let app = spawn_app_with(AppOptions::default()).await;
    let stored = app
        .create_rule(json!({"id": "keyed", "method": "GET", "url": format!("{}/v1/check", api.uri()),
                            "auth": {"type": "api_key", "name": "X-API-Key", "value": "rt-STORED-KEY-5150"}}))
        .await;
    // The rule as GET shows it (mask included), edited: a new URL.
    let mut edited = stored.clone();
    edited["url"] = json!(format!("{}/v2/check", api.uri()));
    let (status, answer) =
        app.post_json("/v1/rules/test", ADMIN_TOKEN, &json!({"rule": edited, "context": {"application": "a"}})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outcome"], "allow", "{answer}");
    assert_eq!(answer["request"]["headers"]["x-api-key"], "********");
    // Secret left out: the same.
    if let Some(auth) = edited["auth"].as_object_mut() {
        auth.remove("value");
    }
    let (status, answer) =
        app.post_json("/v1/rules/test", ADMIN_TOKEN, &json!({"rule": edited, "context": {"application": "a"}})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outcome"], "allow", "{answer}");
    // The stored rule is untouched.
    let (_, now) = app.get("/v1/rules/keyed", ADMIN_TOKEN).await;
    assert_eq!(now, stored);
}

#[tokio::test]
async fn the_response_body_is_cut_at_4_kib() {
    let api = MockServer::start().await;
    let big: String = (0..10_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    Mock::given(method("GET"))
        .and(path("/big"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(big.clone(), "text/plain"))
        .expect(1)
        .mount(&api)
        .await;
    let app = spawn_app_with(AppOptions::default()).await;
    app.create_rule(json!({"id": "big", "method": "GET", "url": format!("{}/big", api.uri())})).await;
    let (status, answer) = app.post_json("/v1/rules/big/test", ADMIN_TOKEN, &json!({"application": "a"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"]["body"].as_str(), big.get(..4096));
    assert_eq!(answer["response"]["headers"]["content-length"], "10000");
    // No actions: a 2xx meets the criteria and the body is not parsed.
    assert_eq!(answer["outcome"], "allow");
    assert_eq!(answer["actions"], json!([]));
}

#[tokio::test]
async fn no_answer_means_a_null_response() {
    let app = spawn_app_with(AppOptions::default()).await;
    let port = closed_port();
    app.create_rule(json!({"id": "down", "method": "GET", "url": format!("http://127.0.0.1:{port}/x"),
                           "auth": {"type": "api_key", "name": "key", "value": "rt-REFUSED-KEY-7788", "in": "query"},
                           "on_error": "allow"}))
        .await;
    let (status, answer) = app.post_json("/v1/rules/down/test", ADMIN_TOKEN, &json!({"application": "a"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], Value::Null);
    assert_eq!(answer["outcome"], "error");
    assert_eq!(answer["reason"], "connection refused");
    assert_eq!(answer["request"]["url"], format!("http://127.0.0.1:{port}/x?key=********"));
    assert_eq!(answer["actions"], json!([]));
    assert!(!answer.to_string().contains("rt-REFUSED-KEY-7788"));

    // A rule that cannot be rendered for the context never calls the API.
    app.create_rule(json!({"id": "needs-device", "method": "GET",
                           "url": format!("http://127.0.0.1:{port}/d/%device_id%")}))
        .await;
    let (status, answer) =
        app.post_json("/v1/rules/needs-device/test", ADMIN_TOKEN, &json!({"application": "a"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["request"], Value::Null);
    assert_eq!(answer["response"], Value::Null);
    assert_eq!(answer["outcome"], "deny");
    assert!(answer["reason"].as_str().is_some_and(|r| r.contains("device_id")), "{answer}");
}

#[tokio::test]
async fn test_calls_are_marked_and_never_cached_and_decisions_are_not_marked() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/cached"))
        .and(header("x-verdict-test", "true"))
        .respond_with(ResponseTemplate::new(200))
        .expect(3)
        .mount(&api)
        .await;
    Mock::given(method("GET"))
        .and(path("/cached"))
        .and(|req: &Request| !req.headers.contains_key("x-verdict-test"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&api)
        .await;
    let app = spawn_app_with(AppOptions::default()).await;
    app.create_rule(json!({"id": "cached", "method": "GET", "url": format!("{}/cached", api.uri()),
                           "cache_ttl_s": 300}))
        .await;
    app.create_policy(json!({"id": "p", "applications": ["a"], "rules": ["cached"]})).await;
    for _ in 0..3 {
        let (status, answer) = app.post_json("/v1/rules/cached/test", ADMIN_TOKEN, &json!({"application": "a"})).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["outcome"], "allow");
    }
    let decision = app.decision(json!({"application": "a"})).await;
    assert_eq!(decision["decision"], "allow", "{decision}");
}

#[tokio::test]
async fn bad_input_to_the_test_endpoints() {
    let app = spawn_app_with(AppOptions::default()).await;
    app.create_rule(json!({"id": "r", "method": "GET", "url": "http://127.0.0.1:9/x"})).await;

    let (status, body) = app.post_json("/v1/rules/nope/test", ADMIN_TOKEN, &json!({"application": "a"})).await;
    assert_eq!(status, 404, "{body}");

    let bad_cert = json!({"application": "a", "client_certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"});
    let (status, body) = app.post_json("/v1/rules/r/test", ADMIN_TOKEN, &bad_cert).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "client_certificate");
    let (status, body) = app.post_json("/v1/rules/r/test", ADMIN_TOKEN, &json!({"username": "x"})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "application");

    let rule = json!({"method": "GET", "url": "http://127.0.0.1:9/x"});
    let (status, body) =
        app.post_json("/v1/rules/test", ADMIN_TOKEN, &json!({"rule": rule, "context": bad_cert})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "context.client_certificate");
    let (status, body) = app.post_json("/v1/rules/test", ADMIN_TOKEN, &json!({"rule": rule})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = app
        .post_json("/v1/rules/test", ADMIN_TOKEN, &json!({"rule": {"method": 5}, "context": {"application": "a"}}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "rule.method");

    // A bad unsaved rule: 422 with every problem, fields under `rule.`.
    let bad = json!({
        "rule": {"method": "GET", "url": "ftp://x.example.com/%usernme%",
                 "response_actions": [{"type": "greater_than", "key": "score", "value": "high"}],
                 "auth": {"type": "oauth2_client_credentials", "client_id": "c",
                          "token_url": "https://idp.example.com/token"}},
        "context": {"application": "a"}
    });
    let (status, body) = app.post_json("/v1/rules/test", ADMIN_TOKEN, &bad).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "validation_failed");
    let found: Vec<(String, String)> = body["error"]["details"]
        .as_array()
        .expect("details")
        .iter()
        .map(|d| {
            (d["field"].as_str().unwrap_or_default().to_owned(), d["message"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    assert_eq!(
        found,
        [
            ("rule.url".to_owned(), "unknown placeholder `%usernme%`; did you mean `%username%`?".to_owned()),
            (
                "rule.auth.client_secret".to_owned(),
                "`client_secret` is required for auth type `oauth2_client_credentials`".to_owned()
            ),
            ("rule.response_actions[0].value".to_owned(), "`greater_than` needs a number, got a string".to_owned()),
        ],
        "{body}"
    );
    assert!(app.audit_of("unsaved").await.is_empty());
}
