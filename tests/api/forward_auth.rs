//! `/v1/forward-auth` (SPEC §7): the context from gateway headers, the same decision
//! as `POST /v1/decisions`, and the examples in `examples/nginx/` run by a real nginx.

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::*;

#[path = "../support/nginx.rs"]
mod nginx;

// ---------------------------------------------------------------------------------
// helpers

/// A forward-auth answer: status, the two verdict headers, the JSON body.
struct Answer {
    status: u16,
    decision_id: Option<String>,
    reason: Option<String>,
    body: Value,
}

fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_bytes(value.as_bytes()).expect("header value"),
        );
    }
    map
}

/// `METHOD /v1/forward-auth` with the proxy token and `headers`.
async fn forward(app: &TestApp, method: Method, headers: &[(&str, &str)]) -> Answer {
    forward_as(app, method, Some(PROXY_TOKEN), headers).await
}

async fn forward_as(app: &TestApp, method: Method, token: Option<&str>, headers: &[(&str, &str)]) -> Answer {
    let mut req = app.request(method, "/v1/forward-auth").headers(header_map(headers));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("forward-auth request");
    let text_header =
        |name: &str| resp.headers().get(name).map(|v| v.to_str().expect("verdict header is visible ASCII").to_owned());
    let decision_id = text_header("x-verdict-decision-id");
    let reason = text_header("x-verdict-reason");
    let (status, body) = read(resp).await;
    Answer { status, decision_id, reason, body }
}

/// An API that answers `{"status": "ok"}` to `POST /echo` and records what it got.
async fn echo_api() -> MockServer {
    let api = MockServer::start().await;
    mount_echo(&api).await;
    api
}

async fn mount_echo(api: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/echo"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "ok"})))
        .mount(api)
        .await;
}

/// Forgets what the echo API received (wiremock's reset also drops the mock).
async fn clear_echo(api: &MockServer) {
    api.reset().await;
    mount_echo(api).await;
}

/// verdict with one rule `echo` that POSTs `body` (a JSON template) to the echo API,
/// for every application in `applications`.
async fn echo_app(api: &MockServer, body: Value, applications: Value) -> TestApp {
    spawn_app(
        json!([{"id": "echo", "method": "POST", "url": format!("{}/echo", api.uri()), "body": body}]),
        json!([{"id": "p", "applications": applications, "rules": ["echo"]}]),
    )
    .await
}

/// The JSON bodies the API received, oldest first.
async fn received_bodies(api: &MockServer) -> Vec<Value> {
    api.received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|r: &Request| serde_json::from_slice(&r.body).expect("rule body is JSON"))
        .collect()
}

/// The body of the one request the API received since the last look (clears it).
async fn take_one_body(api: &MockServer) -> Value {
    let bodies = received_bodies(api).await;
    assert_eq!(bodies.len(), 1, "expected exactly one call to the rule API, got {bodies:?}");
    clear_echo(api).await;
    bodies.into_iter().next().unwrap()
}

fn expected_certs() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("certs/expected.json")).expect("expected.json"))
        .expect("expected.json is JSON")
}

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).unwrap_or_else(|e| panic!("fixtures/{name}: {e}"))
}

/// nginx's `$ssl_client_escaped_cert` rendering of a PEM: letters, digits and `-` kept,
/// everything else `%XX` (what `fixtures/certs/README.md` describes).
fn nginx_escape(pem: &str) -> String {
    pem.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'-' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// A posture API: `GET /devices/dev-ok` is compliant, `/devices/dev-bad` is not.
async fn posture_app() -> (TestApp, MockServer) {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/devices/dev-ok"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "compliant"})))
        .mount(&api)
        .await;
    Mock::given(method("GET"))
        .and(path("/devices/dev-bad"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "noncompliant"})))
        .mount(&api)
        .await;
    let app = spawn_app(
        json!([{"id": "posture", "method": "GET", "url": format!("{}/devices/%device_id%", api.uri()),
                "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]}]),
        json!([{"id": "p", "applications": ["payroll"], "rules": ["posture"]}]),
    )
    .await;
    (app, api)
}

// ---------------------------------------------------------------------------------
// the endpoint

#[tokio::test]
async fn any_method_gives_the_decision_the_json_api_gives() {
    let (app, _api) = posture_app().await;
    let allow_json = app.decision(json!({"application": "payroll", "device_id": "dev-ok"})).await;
    let deny_json = app.decision(json!({"application": "payroll", "device_id": "dev-bad"})).await;
    assert_eq!(allow_json["decision"], "allow", "{allow_json}");
    assert_eq!(deny_json["decision"], "deny", "{deny_json}");

    let methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"];
    for m in methods {
        let m = Method::from_bytes(m.as_bytes()).unwrap();
        for (device, expected, status) in [("dev-ok", &allow_json, 200), ("dev-bad", &deny_json, 403)] {
            let a = forward(&app, m.clone(), &[("X-Verdict-Application", "payroll"), ("X-Device-Id", device)]).await;
            assert_eq!(a.status, status, "{m} {device}: {}", a.body);
            let id = a.decision_id.unwrap_or_else(|| panic!("{m} {device}: no X-Verdict-Decision-Id"));
            assert!(!id.is_empty());
            assert_ne!(Some(id.as_str()), expected["decision_id"].as_str(), "a new decision, not a replay");
            // The reason header is the decision's reason (plain ASCII here, so as is).
            assert_eq!(a.reason.as_deref(), expected["reason"].as_str(), "{m} {device}");
            if m != Method::HEAD {
                assert_eq!(a.body["decision"], expected["decision"], "{m} {device}");
                assert_eq!(a.body["reason"], expected["reason"], "{m} {device}");
                assert_eq!(a.body["decision_id"].as_str(), Some(id.as_str()));
            }
        }
    }

    // No matching policy: 403 with the same reason as the JSON API.
    let none_json = app.decision(json!({"application": "wiki"})).await;
    let a = forward(&app, Method::GET, &[("X-Verdict-Application", "wiki")]).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.reason.as_deref(), none_json["reason"].as_str());
    assert_eq!(a.body["decision"], "deny");
}

#[tokio::test]
async fn tokens_401_without_or_unknown_403_for_the_wrong_role() {
    let (app, api) = posture_app().await;
    let headers = [("X-Verdict-Application", "payroll"), ("X-Device-Id", "dev-ok")];
    for m in [Method::GET, Method::POST] {
        let a = forward_as(&app, m.clone(), None, &headers).await;
        assert_eq!(a.status, 401, "{m} without a token: {}", a.body);
        assert_eq!(a.body["error"]["code"], "unauthenticated");
        let a = forward_as(&app, m.clone(), Some("not-a-known-token"), &headers).await;
        assert_eq!(a.status, 401, "{m} unknown token");
        let a = forward_as(&app, m.clone(), Some(AUDITOR_TOKEN), &headers).await;
        assert_eq!(a.status, 403, "{m} auditor");
        assert_eq!(a.body["error"]["code"], "forbidden");
        assert_eq!(a.decision_id, None, "a refused caller gets no decision");
    }
    // A Basic header is no bearer token either.
    let resp = app
        .request(Method::GET, "/v1/forward-auth")
        .basic_auth("proxy", Some(PROXY_TOKEN))
        .headers(header_map(&headers))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(api.received_requests().await.unwrap().is_empty(), "no decision was made for a refused caller");
    // The admin role may do everything.
    let a = forward_as(&app, Method::GET, Some(ADMIN_TOKEN), &headers).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test]
async fn the_reason_header_is_header_safe() {
    let api = MockServer::start().await;
    // A status with non-ASCII text, a newline and a tab: the reason quotes it.
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"status": "nicht konform – Gerät\r\nX-Injected: 1\tx"})),
        )
        .mount(&api)
        .await;
    let app = spawn_app(
        json!([{"id": "posture", "method": "GET", "url": format!("{}/d", api.uri()),
                "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]}]),
        json!([{"id": "p", "applications": ["payroll"], "rules": ["posture"]}]),
    )
    .await;
    let json_answer = app.decision(json!({"application": "payroll"})).await;
    let json_reason = json_answer["reason"].as_str().unwrap().to_owned();
    assert!(!json_reason.is_ascii(), "the test needs a non-ASCII reason: {json_reason}");

    let resp = app
        .request(Method::GET, "/v1/forward-auth")
        .bearer_auth(PROXY_TOKEN)
        .header("X-Verdict-Application", "payroll")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert!(resp.headers().get("x-injected").is_none());
    let header = resp.headers().get("x-verdict-reason").expect("reason header").as_bytes().to_vec();
    assert!(header.iter().all(|b| b.is_ascii_graphic() || *b == b' '), "not header-safe: {header:?}");
    let header = String::from_utf8(header).unwrap();
    // Same reason, only the characters a header cannot carry replaced.
    assert_eq!(header.len(), json_reason.chars().count(), "{header} vs {json_reason}");
    for (h, j) in header.chars().zip(json_reason.chars()) {
        if j.is_ascii_graphic() || j == ' ' {
            assert_eq!(h, j, "{header} vs {json_reason}");
        }
    }
    assert!(header.starts_with("policy p: rule posture denied: $.status is \"nicht konform "), "{header}");
    // The JSON body keeps the reason as it is.
    let (_, body) = read(resp).await;
    assert_eq!(body["reason"].as_str(), Some(json_reason.as_str()));
}

// ---------------------------------------------------------------------------------
// the context from headers

#[tokio::test]
async fn the_context_from_headers_is_the_context_the_json_api_takes() {
    let api = echo_api().await;
    let body = json!({
        "username": "%username%", "groups": "%groups%", "group_names": "%group_names%",
        "remote_ip": "%remote_ip%", "internal_addr": "%internal_addr%", "user_agent": "%user_agent%",
        "device_id": "%device_id%", "lang": "%headers.Accept-Language%", "custom": "%headers.x-custom-thing%"
    });
    let app = echo_app(&api, body, json!(["payroll"])).await;

    let context = json!({
        "application": "payroll",
        "username": "alice@example.com",
        "groups": ["g-1001", "g-1002", "g-1003"],
        "group_names": ["Finance", "VPN Users"],
        "remote_ip": "203.0.113.7",
        "internal_addr": "10.20.0.15",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        "device_id": "dev-42",
        "headers": {"Accept-Language": "en-US", "X-Custom-Thing": "a, b"}
    });
    let expected = json!({
        "username": "alice@example.com", "groups": ["g-1001", "g-1002", "g-1003"],
        "group_names": ["Finance", "VPN Users"], "remote_ip": "203.0.113.7", "internal_addr": "10.20.0.15",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)", "device_id": "dev-42", "lang": "en-US", "custom": "a, b"
    });
    let by_json = app.decision(context).await;
    assert_eq!(by_json["decision"], "allow", "{by_json}");
    assert_eq!(take_one_body(&api).await, expected);

    let a = forward(
        &app,
        Method::GET,
        &[
            ("X-Verdict-Application", "payroll"),
            ("X-Forwarded-User", "alice@example.com"),
            ("X-Forwarded-Groups", "g-1001, g-1002,,g-1003"),
            ("X-Forwarded-Group-Names", "Finance,VPN Users"),
            ("X-Real-IP", "203.0.113.7"),
            ("X-Forwarded-Internal-Addr", "10.20.0.15"),
            ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)"),
            ("X-Device-Id", "dev-42"),
            ("Accept-Language", "en-US"),
            // A header sent twice feeds %headers.NAME% with both values.
            ("X-Custom-Thing", "a"),
            ("X-Custom-Thing", "b"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["reason"], by_json["reason"]);
    assert_eq!(take_one_body(&api).await, expected);
}

#[tokio::test]
async fn the_application_comes_from_x_verdict_application_else_the_host() {
    let api = echo_api().await;
    let app = echo_app(&api, json!({"x": "y"}), json!(["payroll", "payroll.example.com", "::1"])).await;
    let cases: &[(&[(&str, &str)], u16)] = &[
        (&[("X-Verdict-Application", "payroll"), ("X-Forwarded-Host", "wiki.example.com")], 200),
        (&[("X-Verdict-Application", "wiki"), ("X-Forwarded-Host", "payroll.example.com")], 403),
        (&[("X-Forwarded-Host", "payroll.example.com:8443"), ("Host", "wiki.example.com")], 200),
        (&[("X-Forwarded-Host", "wiki.example.com"), ("Host", "payroll.example.com")], 403),
        (&[("Host", "payroll.example.com:8443")], 200),
        (&[("Host", "payroll.example.com")], 200),
        (&[("Host", "[::1]:8080")], 200),
        // Host names are case-insensitive.
        (&[("Host", "Payroll.Example.COM")], 200),
        // Proxies in a chain each append theirs: the first is the client's.
        (&[("X-Forwarded-Host", "payroll.example.com, gateway.internal:8080")], 200),
    ];
    for (headers, status) in cases {
        let a = forward(&app, Method::GET, headers).await;
        assert_eq!(a.status, *status, "{headers:?}: {}", a.body);
        if *status == 403 {
            assert!(a.reason.as_deref().unwrap_or_default().starts_with("no policy matches"), "{:?}", a.reason);
        }
    }
    // Without either header reqwest sends Host 127.0.0.1:PORT: application 127.0.0.1.
    let a = forward(&app, Method::GET, &[]).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.reason.as_deref(), Some("no policy matches application `127.0.0.1` for this user"));
}

#[tokio::test]
async fn username_groups_and_remote_ip_fall_back_in_the_documented_order() {
    let api = echo_api().await;
    let app = echo_app(&api, json!({"u": "%username%"}), json!(["payroll"])).await;
    let app_h = ("X-Verdict-Application", "payroll");
    for (headers, user) in [
        (vec![("X-Forwarded-User", "alice"), ("Remote-User", "bob"), ("X-Auth-Request-User", "carol")], "alice"),
        (vec![("Remote-User", "bob"), ("X-Auth-Request-User", "carol")], "bob"),
        (vec![("X-Auth-Request-User", "carol")], "carol"),
        // An empty header is no value: the next name is tried.
        (vec![("X-Forwarded-User", ""), ("Remote-User", "bob")], "bob"),
        // Header values are bytes; a UTF-8 name from the IdP is taken as it is.
        (vec![("X-Forwarded-User", "jürgen.müller@example.com")], "jürgen.müller@example.com"),
    ] {
        let mut headers = headers.clone();
        headers.push(app_h);
        let a = forward(&app, Method::GET, &headers).await;
        assert_eq!(a.status, 200, "{headers:?}: {}", a.body);
        assert_eq!(take_one_body(&api).await, json!({"u": user}), "{headers:?}");
    }
    // No user at all: the rule denies naming the parameter, the API is not called.
    let a = forward(&app, Method::GET, &[app_h]).await;
    assert_eq!(a.status, 403);
    assert!(a.reason.as_deref().unwrap().contains("%username%"), "{:?}", a.reason);
    assert!(received_bodies(&api).await.is_empty());

    let api = echo_api().await;
    let app = echo_app(&api, json!({"ip": "%remote_ip%", "ua": "%user_agent%"}), json!(["payroll"])).await;
    for (headers, ip) in [
        (vec![("X-Real-IP", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.1, 10.0.0.1")], "203.0.113.7"),
        (vec![("X-Forwarded-For", "198.51.100.1, 10.0.0.1, 10.0.0.2")], "198.51.100.1"),
        (vec![("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "10.0.0.1")], "198.51.100.1"),
        (vec![("X-Forwarded-For", "2001:db8::1")], "2001:db8::1"),
    ] {
        let mut headers = headers.clone();
        headers.push(app_h);
        headers.push(("User-Agent", "curl/8.0"));
        let a = forward(&app, Method::GET, &headers).await;
        assert_eq!(a.status, 200, "{headers:?}: {}", a.body);
        assert_eq!(take_one_body(&api).await, json!({"ip": ip, "ua": "curl/8.0"}), "{headers:?}");
    }
}

#[tokio::test]
async fn every_header_feeds_headers_name_but_never_verdicts_own_token() {
    let api = echo_api().await;
    let app = echo_app(
        &api,
        json!({"lang": "%headers.accept-language%", "uri": "%headers.X-Original-URI%", "host": "%headers.host%"}),
        json!(["payroll"]),
    )
    .await;
    let a = forward(
        &app,
        Method::GET,
        &[
            ("X-Verdict-Application", "payroll"),
            ("ACCEPT-LANGUAGE", "de-DE"),
            ("X-Original-URI", "/reports?q=1"),
            ("Host", "payroll.example.com"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        take_one_body(&api).await,
        json!({"lang": "de-DE", "uri": "/reports?q=1", "host": "payroll.example.com"})
    );

    // The proxy token in Authorization is verdict's, not the client's: a rule that
    // asks for it gets nothing, and the API never sees the token.
    let api = echo_api().await;
    let app = echo_app(&api, json!({"auth": "%headers.authorization%"}), json!(["payroll"])).await;
    let a = forward(&app, Method::GET, &[("X-Verdict-Application", "payroll")]).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.reason.as_deref().unwrap().contains("%headers.authorization%"), "{:?}", a.reason);
    assert!(received_bodies(&api).await.is_empty());
}

#[tokio::test]
async fn header_names_are_configurable() {
    // The `[forward_auth]` table of the config file, as `verdict serve --config` reads it.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("verdict.toml");
    std::fs::write(
        &config,
        "[forward_auth]\nusername = [\"X-My-User\"]\napplication = [\"X-App\"]\n\
         client_certificate = [\"X-Client-Cert\"]\n",
    )
    .unwrap();
    let settings = verdict::config::Settings::resolve(verdict::config::ServeArgs {
        config: Some(config),
        data_dir: Some(dir.path().join("data")),
        ..Default::default()
    })
    .expect("config file");
    assert_eq!(settings.forward_auth.username, vec!["X-My-User".to_string()]);
    // Names not in the file keep their defaults.
    assert_eq!(settings.forward_auth.groups, vec!["X-Forwarded-Groups".to_string()]);
    let forward_auth = settings.forward_auth.clone();

    let api = echo_api().await;
    let app = spawn_app_with(AppOptions {
        files: vec![(
            "test.json".into(),
            json!({
                "rules": [{"id": "echo", "method": "POST", "url": format!("{}/echo", api.uri()),
                           "body": {"u": "%username%", "cn": "%cert_name%"}}],
                "policies": [{"id": "p", "applications": ["payroll"], "rules": ["echo"]}]
            }),
        )],
        tweak: Some(Box::new(move |s| s.forward_auth = forward_auth)),
        ..Default::default()
    })
    .await;
    let cert = fixture_text("certs/device-a.escaped.txt");
    let a = forward(
        &app,
        Method::GET,
        &[("X-App", "payroll"), ("X-My-User", "bob"), ("X-Forwarded-User", "mallory"), ("X-Client-Cert", &cert)],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(take_one_body(&api).await, json!({"u": "bob", "cn": "device-a.example.com"}));

    // The default names are not read any more.
    let a = forward(
        &app,
        Method::GET,
        &[("X-App", "payroll"), ("X-Forwarded-User", "mallory"), ("X-SSL-Client-Cert", &cert)],
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.reason.as_deref().unwrap().contains("%username%"), "{:?}", a.reason);
    let a = forward(&app, Method::GET, &[("X-Verdict-Application", "payroll"), ("X-My-User", "bob")]).await;
    assert_eq!(a.status, 403, "X-Verdict-Application is not read: {}", a.body);
    assert!(a.reason.as_deref().unwrap().starts_with("no policy matches"), "{:?}", a.reason);

    // And the same through the tweak the other tests use.
    let api = echo_api().await;
    let app = spawn_app_with(AppOptions {
        files: vec![(
            "test.json".into(),
            json!({
                "rules": [{"id": "echo", "method": "POST", "url": format!("{}/echo", api.uri()),
                           "body": {"u": "%username%"}}],
                "policies": [{"id": "p", "applications": ["payroll"], "rules": ["echo"]}]
            }),
        )],
        tweak: Some(Box::new(|s| s.forward_auth.username = vec!["X-My-User".into(), "X-Other-User".into()])),
        ..Default::default()
    })
    .await;
    let a = forward(&app, Method::GET, &[("X-Verdict-Application", "payroll"), ("X-Other-User", "carol")]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(take_one_body(&api).await, json!({"u": "carol"}));
}

// ---------------------------------------------------------------------------------
// the client certificate

/// A rule that sends every `cert_*` value; the alternative names in the query (where a
/// list is joined with `,`).
async fn cert_echo_app(api: &MockServer, tweak: Option<Tweak>) -> TestApp {
    spawn_app_with(AppOptions {
        files: vec![(
            "test.json".into(),
            json!({
                "rules": [{"id": "cert", "method": "POST", "url": format!("{}/echo", api.uri()),
                    "query": [{"key": "alt", "value": "%cert_alt_name%"}],
                    "body": {"sha1": "%cert_thumbprint%", "sha1_upper": "%cert_thumbprint_upper%",
                             "sha256": "%cert_thumbprint_256%", "sha256_upper": "%cert_thumbprint_256_upper%",
                             "cn": "%cert_name%"}}],
                "policies": [{"id": "p", "applications": ["payroll"], "rules": ["cert"]}]
            }),
        )],
        tweak,
        ..Default::default()
    })
    .await
}

/// What the cert echo rule should send for `device` (per expected.json): the body and
/// the `alt` query value.
fn cert_call_for(device: &str) -> (Value, String) {
    let e = &expected_certs()[device];
    let body = json!({"sha1": e["sha1"], "sha1_upper": e["sha1_upper"], "sha256": e["sha256"],
                      "sha256_upper": e["sha256_upper"], "cn": e["cn"]});
    let alt = e["alt_names"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>().join(",");
    (body, alt)
}

async fn take_cert_call(api: &MockServer) -> (Value, String) {
    let requests = api.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "one call to the rule API");
    let r = &requests[0];
    let alt = r.url.query_pairs().find(|(k, _)| k == "alt").map(|(_, v)| v.into_owned()).expect("alt");
    let body = serde_json::from_slice(&r.body).unwrap();
    clear_echo(api).await;
    (body, alt)
}

#[tokio::test]
async fn nginx_escaped_certificate_gives_the_cert_parameters() {
    let api = echo_api().await;
    let app = cert_echo_app(&api, None).await;
    for device in ["device-a", "device-b"] {
        let escaped = fixture_text(&format!("certs/{device}.escaped.txt"));
        let pem = fixture_text(&format!("certs/{device}.pem"));
        assert_eq!(nginx_escape(&pem), escaped, "the escaping in this test is nginx's");
        let want = cert_call_for(device);

        let a =
            forward(&app, Method::GET, &[("X-Verdict-Application", "payroll"), ("X-SSL-Client-Cert", &escaped)]).await;
        assert_eq!(a.status, 200, "{device}: {}", a.body);
        assert_eq!(take_cert_call(&api).await, want, "{device} via forward auth");

        // The JSON API gives the same values, from the PEM and from the escaped PEM.
        for cert in [&pem, &escaped] {
            let by_json = app.decision(json!({"application": "payroll", "client_certificate": cert})).await;
            assert_eq!(by_json["decision"], "allow", "{by_json}");
            assert_eq!(take_cert_call(&api).await, want, "{device} via JSON");
        }
    }
}

/// The base64 of a PEM's DER on one line: what Traefik and Caddy work with.
fn der_base64(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[tokio::test]
async fn traefik_and_caddy_certificate_forms_give_the_cert_parameters() {
    let api = echo_api().await;
    // Traefik's passTLSClientCert header, configured as the certificate header by the
    // example config file.
    let forward_auth = verdict::config::Settings::resolve(verdict::config::ServeArgs {
        config: Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/traefik/verdict.toml")),
        ..Default::default()
    })
    .expect("examples/traefik/verdict.toml")
    .forward_auth;
    assert_eq!(forward_auth.client_certificate, vec!["X-Forwarded-Tls-Client-Cert".to_string()]);
    let app = cert_echo_app(&api, Some(Box::new(move |s| s.forward_auth = forward_auth))).await;
    let a_pem = fixture_text("certs/device-a.pem");
    let b_pem = fixture_text("certs/device-b.pem");
    let ca_pem = fixture_text("certs/ca.pem");
    // URL-escaped base64 DER (Go's url.QueryEscape: + / = escaped), a chain
    // comma-separated; and unescaped, as some versions send it.
    let escaped_chain = format!("{},{}", nginx_escape(&der_base64(&a_pem)), nginx_escape(&der_base64(&ca_pem)));
    for value in [escaped_chain, der_base64(&a_pem)] {
        let a = forward(
            &app,
            Method::GET,
            &[("X-Verdict-Application", "payroll"), ("X-Forwarded-Tls-Client-Cert", &value)],
        )
        .await;
        assert_eq!(a.status, 200, "{value}: {}", a.body);
        assert_eq!(take_cert_call(&api).await, cert_call_for("device-a"));
    }

    // Caddy's form (examples/caddy/Caddyfile): escaped armour around one base64 line
    // whose + / = stay literal.
    let api = echo_api().await;
    let app = cert_echo_app(&api, None).await;
    let b64 = der_base64(&b_pem);
    assert!(b64.contains('+') || b64.contains('/'), "the test needs a literal + or /");
    let caddy = format!("-----BEGIN%20CERTIFICATE-----%0A{b64}%0A-----END%20CERTIFICATE-----%0A");
    let a = forward(&app, Method::GET, &[("X-Verdict-Application", "payroll"), ("X-SSL-Client-Cert", &caddy)]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(take_cert_call(&api).await, cert_call_for("device-b"));
}

#[tokio::test]
async fn an_absent_or_empty_certificate_header_is_no_certificate() {
    let api = echo_api().await;
    let app = spawn_app(
        json!([{"id": "cert", "method": "POST", "url": format!("{}/echo", api.uri()),
                "body": {"cn": "%cert_name%"}}]),
        json!([{"id": "p", "applications": ["payroll"], "rules": ["cert"]}]),
    )
    .await;
    let by_json = app.decision(json!({"application": "payroll"})).await;
    for cert in [None, Some(""), Some("   ")] {
        let mut headers = vec![("X-Verdict-Application", "payroll")];
        if let Some(cert) = cert {
            headers.push(("X-SSL-Client-Cert", cert));
        }
        let a = forward(&app, Method::GET, &headers).await;
        assert_eq!(a.status, 403, "{cert:?}: {}", a.body);
        let reason = a.reason.unwrap();
        assert!(reason.contains("%cert_name%"), "{cert:?}: {reason}");
        assert_eq!(Some(reason.as_str()), by_json["reason"].as_str());
    }
    assert!(received_bodies(&api).await.is_empty(), "the API is not called without a certificate");
}

#[tokio::test]
async fn an_unparsable_certificate_header_is_a_400() {
    let api = echo_api().await;
    let app = cert_echo_app(&api, None).await;
    let garbage_pem = fixture_text("certs/not-a-cert.pem");
    let escaped_garbage = nginx_escape(&garbage_pem);
    for cert in
        [escaped_garbage.as_str(), "hello", "-----BEGIN%20CERTIFICATE-----%0AAAAA%0A-----END%20CERTIFICATE-----"]
    {
        for m in [Method::GET, Method::POST] {
            let a =
                forward(&app, m.clone(), &[("X-Verdict-Application", "payroll"), ("X-SSL-Client-Cert", cert)]).await;
            assert_eq!(a.status, 400, "{m} {cert}: {}", a.body);
            assert_eq!(a.body["error"]["details"][0]["field"], "client_certificate", "{}", a.body);
            assert_eq!(a.decision_id, None);
        }
    }
    assert!(received_bodies(&api).await.is_empty());
}

// ---------------------------------------------------------------------------------
// a real nginx in front, configured with the example files

fn example(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nginx").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `host:port` of a wiremock server.
fn host_port(server: &MockServer) -> String {
    server.address().to_string()
}

/// The protected application: `GET /` answers "protected content".
async fn backend() -> MockServer {
    let backend = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/"))
        .respond_with(ResponseTemplate::new(200).set_body_string("protected content"))
        .mount(&backend)
        .await;
    backend
}

async fn backend_calls(backend: &MockServer) -> usize {
    backend.received_requests().await.unwrap_or_default().len()
}

#[tokio::test]
async fn nginx_auth_request_lets_an_allowed_user_in_and_keeps_a_denied_one_out() {
    let directory = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/users/alice"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "active"})))
        .mount(&directory)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "disabled"})))
        .mount(&directory)
        .await;
    Mock::given(method("GET")).and(path("/anyone")).respond_with(ResponseTemplate::new(204)).mount(&directory).await;
    let app = spawn_app(
        json!([{"id": "active-user", "method": "GET", "url": format!("{}/users/%username%", directory.uri()),
                "response_actions": [{"type": "equals", "key": "status", "value": "active"}]},
               {"id": "anyone", "method": "GET", "url": format!("{}/anyone", directory.uri())}]),
        json!([{"id": "payroll-access", "applications": ["payroll"], "rules": ["active-user"]},
               {"id": "finance", "applications": ["payroll"], "subjects": {"groups": ["Finance"]},
                "rules": ["anyone"]}]),
    )
    .await;
    // Whoever is in the group named Finance gets in, by the JSON API...
    let finance = app.decision(json!({"application": "payroll", "username": "mallory", "group_names": ["Finance"]}));
    assert_eq!(finance.await["decision"], "allow");
    directory.reset().await;
    Mock::given(method("GET"))
        .and(path("/users/alice"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "active"})))
        .mount(&directory)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "disabled"})))
        .mount(&directory)
        .await;
    let backend = backend().await;
    let verdict_addr = format!("127.0.0.1:{}", app.port);
    let backend_addr = host_port(&backend);
    let Some(nginx) = nginx::start_or_skip(
        &example("verdict.conf.template"),
        &[("VERDICT", &verdict_addr), ("UPSTREAM", &backend_addr), ("PROXY_TOKEN", PROXY_TOKEN)],
    ) else {
        return;
    };
    let client = reqwest::Client::new();
    let get = |headers: &[(&str, &str)]| client.get(nginx.url("/")).headers(header_map(headers)).send();

    // Denied user: 403 with verdict's reason, the backend sees nothing.
    let resp = get(&[("X-Forwarded-User", "mallory")]).await.unwrap();
    assert_eq!(resp.status().as_u16(), 403, "nginx error log:\n{}", nginx.error_log());
    let reason = resp.headers().get("x-verdict-reason").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        reason.as_deref(),
        Some("policy payroll-access: rule active-user denied: $.status is \"disabled\", expected equals \"active\"")
    );
    assert!(resp.headers().get("x-verdict-decision-id").is_some());
    assert_eq!(backend_calls(&backend).await, 0, "a denied request must not reach the backend");

    // Identity headers the template blanks cannot be forged by the client: with only
    // Remote-User (which verdict would read) there is no user, so the rule denies.
    let resp = get(&[("Remote-User", "alice"), ("X-Auth-Request-User", "alice")]).await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let reason = resp.headers().get("x-verdict-reason").unwrap().to_str().unwrap().to_owned();
    assert!(reason.contains("%username%"), "{reason}");
    // ...but not by naming the group in a header of its own through nginx.
    let resp = get(&[("X-Forwarded-User", "mallory"), ("X-Forwarded-Group-Names", "Finance")]).await.unwrap();
    assert_eq!(resp.status().as_u16(), 403, "a client named its own group");
    // A client's POST makes a POST subrequest: the same decision.
    let resp = client.post(nginx.url("/")).header("X-Forwarded-User", "mallory").body("data").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403, "nginx error log:\n{}", nginx.error_log());
    assert!(resp.headers().get("x-verdict-reason").is_some());
    assert_eq!(backend_calls(&backend).await, 0);
    // Nor the application or a certificate (a garbage one would be a 400 -> 500).
    let resp = get(&[("X-Forwarded-User", "alice"), ("X-Verdict-Application", "wiki"), ("X-SSL-Client-Cert", "junk")])
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "nginx error log:\n{}", nginx.error_log());
    assert_eq!(resp.text().await.unwrap(), "protected content");
    assert_eq!(backend_calls(&backend).await, 1);

    // Allowed user: the backend's content, verdict's headers on the answer.
    let resp = get(&[("X-Forwarded-User", "alice")]).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "nginx error log:\n{}", nginx.error_log());
    let id = resp.headers().get("x-verdict-decision-id").map(|v| v.to_str().unwrap().to_owned());
    assert!(id.is_some_and(|id| !id.is_empty()));
    assert_eq!(resp.text().await.unwrap(), "protected content");
    assert_eq!(backend_calls(&backend).await, 2);

    // The directory API saw exactly the users nginx passed on.
    let users: Vec<String> =
        directory.received_requests().await.unwrap().iter().map(|r| r.url.path().to_owned()).collect();
    assert_eq!(users, ["/users/mallory", "/users/mallory", "/users/mallory", "/users/alice", "/users/alice"]);
}

/// A client presenting `device` (a file pair under fixtures/certs), or none.
fn mtls_client(device: Option<&str>, port: u16) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(fixture("certs/ca.pem")).unwrap()).unwrap();
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .resolve("localhost", std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    if let Some(device) = device {
        let mut pem = std::fs::read(fixture(&format!("certs/{device}.pem"))).unwrap();
        pem.extend(std::fs::read(fixture(&format!("certs/{device}.key"))).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&pem).expect("client identity"));
    }
    builder.build().unwrap()
}

#[tokio::test]
async fn nginx_mtls_lets_one_device_in_and_keeps_the_others_out() {
    let expected = expected_certs();
    let inventory = MockServer::start().await;
    // The device inventory knows device-a only, by SHA-256 thumbprint and name.
    Mock::given(method("POST"))
        .and(path("/devices/lookup"))
        .and(body_partial_json(json!({"sha256": expected["device-a"]["sha256"], "cn": "device-a.example.com"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "managed"})))
        .mount(&inventory)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "unknown"})))
        .mount(&inventory)
        .await;
    let app = spawn_app(
        json!([{"id": "managed-device", "method": "POST", "url": format!("{}/devices/lookup", inventory.uri()),
                "body": {"sha256": "%cert_thumbprint_256%", "cn": "%cert_name%", "user": "%username%"},
                "response_actions": [{"type": "equals", "key": "status", "value": "managed"}]}]),
        json!([{"id": "devices", "applications": ["payroll"], "rules": ["managed-device"]}]),
    )
    .await;
    let backend = backend().await;
    let verdict_addr = format!("127.0.0.1:{}", app.port);
    let backend_addr = host_port(&backend);
    let Some(nginx) = nginx::start_or_skip(
        &example("verdict-mtls.conf.template"),
        &[("VERDICT", &verdict_addr), ("UPSTREAM", &backend_addr), ("PROXY_TOKEN", PROXY_TOKEN)],
    ) else {
        return;
    };
    let url = nginx.https_url("/");
    let user = [("X-Forwarded-User", "alice@example.com")];

    // device-b: a valid certificate from the CA, but not a managed device.
    let resp = mtls_client(Some("device-b"), nginx.port).get(&url).headers(header_map(&user)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403, "nginx error log:\n{}", nginx.error_log());
    let reason = resp.headers().get("x-verdict-reason").unwrap().to_str().unwrap().to_owned();
    assert!(reason.contains("rule managed-device denied"), "{reason}");
    assert_eq!(backend_calls(&backend).await, 0);

    // rogue (self-signed) and no certificate at all: nginx refuses, verdict is not asked.
    for device in [Some("rogue"), None] {
        // nginx completes the handshake and answers its own 400.
        let resp = mtls_client(device, nginx.port).get(&url).headers(header_map(&user)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{device:?}");
        assert!(resp.headers().get("x-verdict-decision-id").is_none(), "{device:?}: verdict was asked");
    }
    assert_eq!(backend_calls(&backend).await, 0);

    // device-a: in, with the backend's content.
    let resp = mtls_client(Some("device-a"), nginx.port).get(&url).headers(header_map(&user)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "nginx error log:\n{}", nginx.error_log());
    assert_eq!(resp.text().await.unwrap(), "protected content");
    assert_eq!(backend_calls(&backend).await, 1);

    // What the inventory got: each device's own values, from nginx's escaped PEM.
    let bodies = received_bodies(&inventory).await;
    assert_eq!(
        bodies,
        vec![
            json!({"sha256": expected["device-b"]["sha256"], "cn": "device-b.example.com", "user": "alice@example.com"}),
            json!({"sha256": expected["device-a"]["sha256"], "cn": "device-a.example.com", "user": "alice@example.com"}),
        ]
    );
}
