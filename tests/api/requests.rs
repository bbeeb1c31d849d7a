//! What a rule sends (SPEC §3, §4): GET and POST, JSON and form bodies, the `query`
//! list, static and templated headers, and every placeholder of the request context,
//! including the `cert_*` values from a PEM and from nginx's escaped PEM.

use serde_json::{json, Value};
use wiremock::matchers::{any, body_json, body_string, header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::*;

async fn one_rule_app(rule: Value) -> TestApp {
    let id = rule["id"].as_str().unwrap().to_owned();
    spawn_app(json!([rule]), json!([{"id": "p", "applications": ["app"], "rules": [id]}])).await
}

fn ok() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({}))
}

async fn only_request(api: &MockServer) -> Request {
    let received = api.received_requests().await.unwrap();
    assert_eq!(received.len(), 1, "expected exactly one call");
    received.into_iter().next().unwrap()
}

fn full_context() -> Value {
    json!({
        "application": "app",
        "username": "alice@example.com",
        "groups": ["g-1001", "g-1002"],
        "group_names": ["Finance", "VPN Users"],
        "remote_ip": "203.0.113.7",
        "internal_addr": "10.20.0.15",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        "device_id": "dev-42",
        "headers": {"Accept-Language": "en-US", "X-Tenant": "acme"}
    })
}

#[tokio::test]
async fn a_get_rule_sends_no_body_and_its_query_list() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/users/alice%40example.com"))
        .and(query_param("fields", "status,department"))
        .and(query_param("ip", "203.0.113.7"))
        .and(query_param("existing", "1"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(json!({"id": "r", "method": "GET",
        "url": format!("{}/v1/users/%username%?existing=1", api.uri()),
        "query": [{"key": "fields", "value": "status,department"}, {"key": "ip", "value": "%remote_ip%"}]}))
    .await;
    let answer = app.decision(full_context()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let req = only_request(&api).await;
    assert!(req.body.is_empty());
    let query: Vec<(String, String)> = req.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let want = [("existing", "1"), ("fields", "status,department"), ("ip", "203.0.113.7")];
    assert_eq!(
        query,
        want.map(|(k, v)| (k.to_owned(), v.to_owned())),
        "the URL's own query comes first, then the list"
    );
}

#[tokio::test]
async fn a_post_rule_sends_its_json_body_with_every_context_value() {
    let api = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/devices/dev-42/check"))
        .and(header("content-type", "application/json"))
        .and(body_json(json!({
            "user": "alice@example.com", "ip": "203.0.113.7", "internal": "10.20.0.15",
            "ua": "Mozilla/5.0 (X11; Linux x86_64)", "device": "dev-42",
            "groups": ["g-1001", "g-1002"], "names": ["Finance", "VPN Users"],
            "lang": "en-US", "static": true, "n": 3, "none": null,
            "list": ["a", "dev-42"]
        })))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(json!({"id": "r", "method": "POST",
        "url": format!("{}/v1/devices/%device_id%/check", api.uri()),
        "body": {"user": "%username%", "ip": "%remote_ip%", "internal": "%internal_addr%",
                 "ua": "%user_agent%", "device": "%device_id%", "groups": "%groups%",
                 "names": "%group_names%", "lang": "%headers.accept-language%", "static": true, "n": 3,
                 "none": null, "list": ["a", "%device_id%"]}}))
    .await;
    let answer = app.decision(full_context()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
}

#[tokio::test]
async fn a_post_rule_sends_a_form_body() {
    let api = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string("user=alice%40example.com&groups=g-1001%2Cg-1002&names=Finance%2CVPN+Users&n=3&flag=true"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(json!({"id": "r", "method": "POST", "url": format!("{}/form", api.uri()),
        "body_format": "form",
        "body": {"user": "%username%", "groups": "%groups%", "names": "%group_names%", "n": 3, "flag": true}}))
    .await;
    let answer = app.decision(full_context()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
}

#[tokio::test]
async fn static_and_templated_headers_are_sent() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(header("x-static", "fixed value"))
        .and(header("x-tenant", "tenant-acme"))
        .and(header("accept-language", "en-US"))
        .and(header("x-user", "alice@example.com"))
        .respond_with(ok())
        .expect(1)
        .mount(&api)
        .await;
    let app = one_rule_app(json!({"id": "r", "method": "GET", "url": format!("{}/h", api.uri()),
    "headers": [
        {"key": "X-Static", "value": "fixed value"},
        {"key": "X-Tenant", "value": "tenant-%headers.x-tenant%"},
        {"key": "Accept-Language", "value": "%headers.ACCEPT-LANGUAGE%"},
        {"key": "X-User", "value": "%username%"}
    ]}))
    .await;
    let answer = app.decision(full_context()).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
}

#[tokio::test]
async fn a_missing_parameter_denies_naming_it_and_the_api_is_not_called() {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ok()).expect(0).mount(&api).await;
    let app = one_rule_app(json!({"id": "r", "method": "GET", "url": format!("{}/d/%device_id%", api.uri()),
        "on_error": "allow"}))
    .await;
    let answer = app.decision(json!({"application": "app", "username": "alice"})).await;
    assert_eq!(answer["decision"], "deny", "{answer}");
    assert_eq!(
        answer["reason"],
        "policy p: rule r denied: parameter `%device_id%` is missing from the request; the API was not called"
    );
}

fn expected_certs() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("certs/expected.json")).unwrap()).unwrap()
}

fn cert_rule(uri: &str) -> Value {
    json!({"id": "r", "method": "POST", "url": format!("{uri}/cert/%cert_thumbprint%"),
        "query": [{"key": "alt", "value": "%cert_alt_name%"}],
        "headers": [{"key": "X-Cert-Name", "value": "%cert_name%"}],
        "body": {"sha1": "%cert_thumbprint%", "sha1_upper": "%cert_thumbprint_upper%",
                 "sha256": "%cert_thumbprint_256%", "sha256_upper": "%cert_thumbprint_256_upper%",
                 "cn": "%cert_name%", "alt": "%cert_alt_name%"}})
}

/// Asserts the one request carried the `cert_*` values of `name` in expected.json.
fn assert_cert_values(req: &Request, name: &str) {
    let want = &expected_certs()[name];
    let alt = want["alt_names"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>().join(",");
    assert_eq!(req.url.path(), format!("/cert/{}", want["sha1"].as_str().unwrap()));
    let query: Vec<(String, String)> = req.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    assert_eq!(query, [("alt".to_owned(), alt.clone())]);
    assert_eq!(req.headers.get("x-cert-name").unwrap().to_str().unwrap(), want["cn"].as_str().unwrap());
    assert_eq!(
        req.body_json::<Value>().unwrap(),
        json!({"sha1": want["sha1"], "sha1_upper": want["sha1_upper"], "sha256": want["sha256"],
               "sha256_upper": want["sha256_upper"], "cn": want["cn"], "alt": alt})
    );
}

#[tokio::test]
async fn cert_values_come_from_a_pem_client_certificate() {
    for name in ["device-a", "device-b", "rogue"] {
        let api = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ok()).expect(1).mount(&api).await;
        let app = one_rule_app(cert_rule(&api.uri())).await;
        let pem = std::fs::read_to_string(fixture(&format!("certs/{name}.pem"))).unwrap();
        let answer = app.decision(json!({"application": "app", "client_certificate": pem})).await;
        assert_eq!(answer["decision"], "allow", "{name}: {answer}");
        assert_cert_values(&only_request(&api).await, name);
    }
}

#[tokio::test]
async fn cert_values_come_from_an_nginx_escaped_client_certificate() {
    for name in ["device-a", "device-b"] {
        let api = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ok()).expect(1).mount(&api).await;
        let app = one_rule_app(cert_rule(&api.uri())).await;
        let escaped = std::fs::read_to_string(fixture(&format!("certs/{name}.escaped.txt"))).unwrap();
        assert!(!escaped.contains("-----BEGIN CERTIFICATE-----"), "the fixture is escaped");
        let answer = app.decision(json!({"application": "app", "client_certificate": escaped})).await;
        assert_eq!(answer["decision"], "allow", "{name}: {answer}");
        assert_cert_values(&only_request(&api).await, name);
    }
}

#[tokio::test]
async fn a_cert_placeholder_without_a_certificate_denies_naming_it() {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(ok()).expect(0).mount(&api).await;
    let app = one_rule_app(cert_rule(&api.uri())).await;
    let answer = app.decision(json!({"application": "app"})).await;
    assert_eq!(answer["decision"], "deny");
    assert!(answer["reason"].as_str().unwrap().contains("parameter `%cert_thumbprint%` is missing"), "{answer}");
}

#[tokio::test]
async fn the_parameters_endpoint_lists_every_placeholder() {
    let app = spawn_app(json!([]), json!([])).await;
    let (status, body) = app.get("/v1/parameters", AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> =
        body["items"].as_array().unwrap().iter().map(|i| i["placeholder"].as_str().unwrap()).collect();
    for p in [
        "%username%",
        "%internal_addr%",
        "%user_agent%",
        "%remote_ip%",
        "%device_id%",
        "%groups%",
        "%group_names%",
        "%cert_thumbprint%",
        "%cert_thumbprint_upper%",
        "%cert_thumbprint_256%",
        "%cert_thumbprint_256_upper%",
        "%cert_name%",
        "%cert_alt_name%",
        "%headers.NAME%",
    ] {
        assert!(names.contains(&p), "{p} missing from {names:?}");
    }
    assert!(body["items"].as_array().unwrap().iter().all(|i| i["description"].as_str().is_some_and(|d| !d.is_empty())));
}
