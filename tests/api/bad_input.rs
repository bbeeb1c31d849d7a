//! Bad decision requests (SPEC §7): a clear 400/413 with `error.code` and the field at
//! fault, never a 500.

use serde_json::{json, Value};

use crate::helpers::*;

async fn app() -> TestApp {
    spawn_app(json!([]), json!([])).await
}

async fn post_raw(app: &TestApp, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let resp = app
        .request(reqwest::Method::POST, "/v1/decisions")
        .bearer_auth(PROXY_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    read(resp).await
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

fn detail_fields(body: &Value) -> Vec<String> {
    body["error"]["details"]
        .as_array()
        .map(|d| d.iter().map(|d| d["field"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = app().await;
    for body in ["{\"application\": ", "not json", "{\"application\": \"a\"} trailing", ""] {
        let (status, answer) = post_raw(&app, body).await;
        assert_error(status, &answer, 400, "malformed_request");
        assert!(answer["error"]["message"].as_str().unwrap().contains("JSON"), "{body:?}: {answer}");
    }
}

#[tokio::test]
async fn a_body_that_is_not_an_object_is_a_400() {
    let app = app().await;
    for body in ["[]", "null", "\"payroll\"", "42"] {
        let (status, answer) = post_raw(&app, body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
}

#[tokio::test]
async fn a_missing_application_names_the_field() {
    let app = app().await;
    for body in [json!({"username": "alice"}), json!({"application": ""}), json!({"application": null})] {
        let (status, answer) = app.decide(body.clone()).await;
        assert!(status == 400 || status == 422, "{body}: {status} {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
        assert_eq!(detail_fields(&answer), ["application"], "{body}: {answer}");
    }
}

#[tokio::test]
async fn a_wrong_field_type_names_the_field() {
    let app = app().await;
    for (body, field) in [
        (json!({"application": "a", "groups": "g-1"}), "groups"),
        (json!({"application": 7}), "application"),
        (json!({"application": "a", "group_names": [1, 2]}), "group_names"),
        (json!({"application": "a", "headers": ["Accept-Language"]}), "headers"),
        (json!({"application": "a", "username": {"name": "alice"}}), "username"),
    ] {
        let (status, answer) = app.decide(body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
        let fields = detail_fields(&answer);
        assert_eq!(fields.len(), 1, "{answer}");
        assert!(fields[0].starts_with(field), "{body}: expected field {field}, got {answer}");
    }
}

#[tokio::test]
async fn an_unknown_field_is_a_400_naming_it() {
    let app = app().await;
    let (status, answer) = app.decide(json!({"application": "a", "usrname": "alice"})).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["code"].is_string());
    assert!(answer.to_string().contains("usrname"), "{answer}");
}

#[tokio::test]
async fn an_unparsable_certificate_is_a_400() {
    let app = app().await;
    let not_a_cert = std::fs::read_to_string(fixture("certs/not-a-cert.pem")).unwrap();
    for cert in [not_a_cert.as_str(), "hello", "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"] {
        let (status, answer) = app.decide(json!({"application": "a", "client_certificate": cert})).await;
        assert_eq!(status, 400, "{cert:?}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
        assert_eq!(detail_fields(&answer), ["client_certificate"], "{answer}");
    }
}

#[tokio::test]
async fn a_body_over_one_mib_is_a_413() {
    let app = app().await;
    let big = format!("{{\"application\": \"a\", \"username\": \"{}\"}}", "x".repeat(1 << 20));
    let (status, answer) = post_raw(&app, big).await;
    assert_error(status, &answer, 413, "body_too_large");
    // Just under the limit is fine.
    let fits = format!("{{\"application\": \"a\", \"username\": \"{}\"}}", "x".repeat((1 << 20) - 100));
    let (status, answer) = post_raw(&app, fits).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn invalid_utf8_is_a_400_not_a_500() {
    let app = app().await;
    let (status, answer) = post_raw(&app, b"{\"application\": \"\xff\xfe\"}".to_vec()).await;
    assert_eq!(status, 400, "{answer}");
}
