//! Issue #6: the decision cache (hits, key separation, invalidation, single flight,
//! bounds), circuit breakers per API origin, the answer body cap, redirects, deadlines,
//! and a configuration of 10,000 rules. Upstream calls are counted at the upstream
//! (wiremock `.expect(n)` and `received_requests`). No assertion is about how fast
//! anything is: deadlines are proven by APIs that would answer far later than the
//! bound the decision must meet.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verdict::context::{ContextInput, RequestContext};
use verdict::startup::Application;
use wiremock::matchers::{any, body_partial_json, header, method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

// ---------------------------------------------------------------------------------
// helpers

fn compliant() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"status": "compliant"}))
}

fn noncompliant() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"status": "noncompliant"}))
}

/// A GET rule that allows when the answer's `status` is `compliant`.
fn posture(id: &str, url: String) -> Value {
    json!({"id": id, "method": "GET", "url": url,
           "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]})
}

/// `base` with the fields of `extra` set over it.
fn with(mut base: Value, extra: Value) -> Value {
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        b.extend(e);
    }
    base
}

/// A policy for one application.
fn policy(id: &str, application: &str, rules: &[&str]) -> Value {
    json!({"id": id, "applications": [application], "rules": rules})
}

/// The single rule result of a decision (fails when there is not exactly one).
fn only_rule(decision: &Value) -> &Value {
    let rules = decision["rules"].as_array().expect("rules array");
    assert_eq!(rules.len(), 1, "expected one rule result: {decision}");
    &rules[0]
}

fn reason(rule: &Value) -> &str {
    rule["reason"].as_str().expect("rule reason")
}

async fn calls(api: &MockServer) -> usize {
    api.received_requests().await.expect("request recording is on").len()
}

async fn calls_to(api: &MockServer, p: &str) -> usize {
    api.received_requests().await.expect("request recording is on").iter().filter(|r| r.url.path() == p).count()
}

async fn metrics(app: &TestApp) -> String {
    let resp = app.request(Method::GET, "/metrics").send().await.expect("metrics request");
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.expect("metrics text")
}

/// The `verdict_circuit_state` sample for an origin, if any.
fn circuit_state(metrics: &str, origin: &str) -> Option<String> {
    let prefix = format!("verdict_circuit_state{{origin=\"{origin}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(str::to_owned)
}

/// Runs a future that must finish within `bound`: the structural proof that verdict
/// did not wait for an API that would answer later than that.
async fn within<T>(bound: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(bound, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not complete within {bound:?}"),
    }
}

/// A TCP port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

fn context(value: Value) -> RequestContext {
    let input: ContextInput = serde_json::from_value(value).expect("context input");
    RequestContext::parse(input).expect("context")
}

fn breaker_tweak(failures: u32, cooldown: Duration) -> Option<Tweak> {
    Some(Box::new(move |s| {
        s.engine.breaker.failures = failures;
        s.engine.breaker.cooldown = cooldown;
    }))
}

fn one_file(rules: Value, policies: Value) -> Vec<(String, Value)> {
    vec![("test.json".into(), json!({"rules": rules, "policies": policies}))]
}

// ---------------------------------------------------------------------------------
// decision cache

#[tokio::test]
async fn identical_decisions_make_one_call_and_the_second_is_cached() {
    let api = MockServer::start().await;
    Mock::given(method("GET")).and(path("/devices/dev-1")).respond_with(compliant()).expect(1).mount(&api).await;
    let app = spawn_app(
        json!([with(posture("posture", format!("{}/devices/%device_id%", api.uri())), json!({"cache_ttl_s": 60}))]),
        json!([policy("p", "payroll", &["posture"])]),
    )
    .await;
    let ctx = json!({"application": "payroll", "username": "alice", "device_id": "dev-1"});
    let first = app.decision(ctx.clone()).await;
    assert_eq!(first["decision"], "allow", "{first}");
    assert_eq!(only_rule(&first)["cached"], false, "{first}");
    let second = app.decision(ctx).await;
    assert_eq!(second["decision"], "allow", "{second}");
    let rule = only_rule(&second);
    assert_eq!(rule["cached"], true, "{second}");
    assert_eq!(rule["outcome"], "allow");
    assert_eq!(rule["reason"], only_rule(&first)["reason"]);
    assert_eq!(rule["http_status"], 200);
    assert_eq!(calls(&api).await, 1);
}

#[tokio::test]
async fn users_whose_requests_differ_in_the_url_never_share_an_outcome() {
    let api = MockServer::start().await;
    Mock::given(method("GET")).and(path("/users/alice")).respond_with(compliant()).expect(1).mount(&api).await;
    Mock::given(method("GET")).and(path("/users/bob")).respond_with(noncompliant()).expect(1).mount(&api).await;
    let app = spawn_app(
        json!([with(posture("posture", format!("{}/users/%username%", api.uri())), json!({"cache_ttl_s": 60}))]),
        json!([policy("p", "payroll", &["posture"])]),
    )
    .await;
    let alice = json!({"application": "payroll", "username": "alice"});
    let bob = json!({"application": "payroll", "username": "bob"});
    for round in [false, true] {
        let a = app.decision(alice.clone()).await;
        assert_eq!(a["decision"], "allow", "alice, cached={round}: {a}");
        assert_eq!(only_rule(&a)["cached"], round, "{a}");
        let b = app.decision(bob.clone()).await;
        assert_eq!(b["decision"], "deny", "bob, cached={round}: {b}");
        assert_eq!(only_rule(&b)["cached"], round, "{b}");
        assert!(reason(only_rule(&b)).contains("noncompliant"), "{b}");
    }
}

#[tokio::test]
async fn users_whose_requests_differ_in_the_body_never_share_an_outcome() {
    let api = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/check"))
        .and(body_partial_json(json!({"user": "alice"})))
        .respond_with(compliant())
        .expect(1)
        .mount(&api)
        .await;
    Mock::given(method("POST"))
        .and(path("/check"))
        .and(body_partial_json(json!({"user": "bob"})))
        .respond_with(noncompliant())
        .expect(1)
        .mount(&api)
        .await;
    let rule = json!({"id": "posture", "method": "POST", "url": format!("{}/check", api.uri()),
                      "body": {"user": "%username%"}, "cache_ttl_s": 60,
                      "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]});
    let app = spawn_app(json!([rule]), json!([policy("p", "payroll", &["posture"])])).await;
    for round in [false, true] {
        let a = app.decision(json!({"application": "payroll", "username": "alice"})).await;
        assert_eq!(a["decision"], "allow", "{a}");
        assert_eq!(only_rule(&a)["cached"], round, "{a}");
        let b = app.decision(json!({"application": "payroll", "username": "bob"})).await;
        assert_eq!(b["decision"], "deny", "{b}");
        assert_eq!(only_rule(&b)["cached"], round, "{b}");
    }
}

#[tokio::test]
async fn a_templated_header_is_part_of_the_key_and_unused_context_is_not() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/posture"))
        .and(header("x-tenant", "acme"))
        .respond_with(compliant())
        .expect(1)
        .mount(&api)
        .await;
    Mock::given(method("GET"))
        .and(path("/posture"))
        .and(header("x-tenant", "globex"))
        .respond_with(noncompliant())
        .expect(1)
        .mount(&api)
        .await;
    let rule = with(
        posture("posture", format!("{}/posture", api.uri())),
        json!({"headers": [{"key": "X-Tenant", "value": "%headers.X-Tenant%"}], "cache_ttl_s": 60}),
    );
    let app = spawn_app(json!([rule]), json!([policy("p", "payroll", &["posture"])])).await;
    let ctx =
        |user: &str, tenant: &str| json!({"application": "payroll", "username": user, "headers": {"X-Tenant": tenant}});
    let a = app.decision(ctx("alice", "acme")).await;
    assert_eq!((a["decision"].clone(), only_rule(&a)["cached"].clone()), (json!("allow"), json!(false)), "{a}");
    let g = app.decision(ctx("alice", "globex")).await;
    assert_eq!((g["decision"].clone(), only_rule(&g)["cached"].clone()), (json!("deny"), json!(false)), "{g}");
    // The username is not in the rendered request: bob's request is byte-for-byte
    // alice's, so the entry is shared (what the key is, stated positively).
    let b = app.decision(ctx("bob", "acme")).await;
    assert_eq!((b["decision"].clone(), only_rule(&b)["cached"].clone()), (json!("allow"), json!(true)), "{b}");
    let b = app.decision(ctx("bob", "globex")).await;
    assert_eq!((b["decision"].clone(), only_rule(&b)["cached"].clone()), (json!("deny"), json!(true)), "{b}");
}

#[tokio::test]
async fn updating_a_rule_over_the_api_drops_its_cached_outcomes() {
    let api = MockServer::start().await;
    Mock::given(method("GET")).and(path("/devices/dev-1")).respond_with(compliant()).expect(2).mount(&api).await;
    let app = spawn_app(json!([]), json!([])).await;
    let spec = with(posture("posture", format!("{}/devices/%device_id%", api.uri())), json!({"cache_ttl_s": 60}));
    let (status, body) = app.post_json("/v1/rules", ADMIN_TOKEN, &spec).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app.post_json("/v1/policies", ADMIN_TOKEN, &policy("p", "payroll", &["posture"])).await;
    assert_eq!(status, 201, "{body}");
    let ctx = json!({"application": "payroll", "device_id": "dev-1"});
    assert_eq!(only_rule(&app.decision(ctx.clone()).await)["cached"], false);
    assert_eq!(only_rule(&app.decision(ctx.clone()).await)["cached"], true);
    assert_eq!(calls(&api).await, 1);

    let resp = app
        .request(Method::PUT, "/v1/rules/posture")
        .bearer_auth(ADMIN_TOKEN)
        .json(&with(spec, json!({"name": "Device posture, renamed"})))
        .send()
        .await
        .expect("PUT rule");
    let (status, body) = read(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2, "{body}");

    let after = app.decision(ctx.clone()).await;
    assert_eq!(after["decision"], "allow", "{after}");
    assert_eq!(only_rule(&after)["cached"], false, "the updated rule must call the API again: {after}");
    assert_eq!(calls(&api).await, 2);
    assert_eq!(only_rule(&app.decision(ctx).await)["cached"], true);
}

#[tokio::test]
async fn reloading_a_changed_policy_file_drops_cached_outcomes() {
    let api = MockServer::start().await;
    Mock::given(method("GET")).and(path("/devices/dev-1")).respond_with(compliant()).expect(2).mount(&api).await;
    let rule = with(posture("posture", format!("{}/devices/%device_id%", api.uri())), json!({"cache_ttl_s": 60}));
    let app = spawn_app(json!([rule.clone()]), json!([policy("p", "payroll", &["posture"])])).await;
    let ctx = json!({"application": "payroll", "device_id": "dev-1"});
    assert_eq!(only_rule(&app.decision(ctx.clone()).await)["cached"], false);
    assert_eq!(only_rule(&app.decision(ctx.clone()).await)["cached"], true);
    // File rules keep version 1 across reloads; what SIGHUP runs must still drop them.
    write_policy_file(
        app.dir.path(),
        "test.json",
        &json!({"rules": [with(rule, json!({"name": "changed"}))], "policies": [policy("p", "payroll", &["posture"])]}),
    );
    app.state.registry.load_files().await.expect("reload");
    assert_eq!(only_rule(&app.decision(ctx.clone()).await)["cached"], false);
    assert_eq!(calls(&api).await, 2);
}

#[tokio::test]
async fn fifty_concurrent_identical_misses_make_one_call() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/devices/dev-1"))
        .respond_with(compliant().set_delay(Duration::from_millis(300)))
        .expect(1)
        .mount(&api)
        .await;
    let app = spawn_app(
        json!([with(posture("posture", format!("{}/devices/%device_id%", api.uri())), json!({"cache_ttl_s": 60}))]),
        json!([policy("p", "payroll", &["posture"])]),
    )
    .await;
    let ctx = json!({"application": "payroll", "device_id": "dev-1"});
    let answers = join_all((0..50).map(|_| app.decision(ctx.clone()))).await;
    for a in &answers {
        assert_eq!(a["decision"], "allow", "{a}");
    }
    let uncached = answers.iter().filter(|a| only_rule(a)["cached"] == false).count();
    assert_eq!(uncached, 1, "one caller made the call; the other 49 got its outcome");
    assert_eq!(calls(&api).await, 1);
}

#[tokio::test]
async fn errors_are_not_cached() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/devices/dev-1"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&api)
        .await;
    Mock::given(method("GET")).and(path("/devices/dev-1")).respond_with(compliant()).expect(1).mount(&api).await;
    let app = spawn_app(
        json!([with(posture("posture", format!("{}/devices/%device_id%", api.uri())), json!({"cache_ttl_s": 60}))]),
        json!([policy("p", "payroll", &["posture"])]),
    )
    .await;
    let ctx = json!({"application": "payroll", "device_id": "dev-1"});
    let failed = app.decision(ctx.clone()).await;
    assert_eq!(failed["decision"], "deny", "{failed}");
    assert_eq!(only_rule(&failed)["outcome"], "error");
    assert_eq!(reason(only_rule(&failed)), "HTTP 503");
    let retried = app.decision(ctx.clone()).await;
    assert_eq!(retried["decision"], "allow", "the error was not reused: {retried}");
    assert_eq!(only_rule(&retried)["cached"], false);
    let hit = app.decision(ctx).await;
    assert_eq!(only_rule(&hit)["cached"], true, "{hit}");
    assert_eq!(calls(&api).await, 2);
}

#[tokio::test]
async fn rule_tests_bypass_the_cache() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/devices/dev-1"))
        .and(header("x-verdict-test", "true"))
        .respond_with(compliant())
        .with_priority(1)
        .expect(2)
        .mount(&api)
        .await;
    Mock::given(method("GET")).and(path("/devices/dev-1")).respond_with(compliant()).expect(1).mount(&api).await;
    let app = spawn_app(
        json!([with(posture("posture", format!("{}/devices/%device_id%", api.uri())), json!({"cache_ttl_s": 60}))]),
        json!([policy("p", "payroll", &["posture"])]),
    )
    .await;
    let ctx = json!({"application": "payroll", "device_id": "dev-1"});
    assert_eq!(only_rule(&app.decision(ctx.clone()).await)["cached"], false);
    assert_eq!(only_rule(&app.decision(ctx.clone()).await)["cached"], true);
    // A cached outcome exists for exactly this request; both tests still call.
    for _ in 0..2 {
        let (status, body) = app.post_json("/v1/rules/posture/test", ADMIN_TOKEN, &ctx).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outcome"], "allow", "{body}");
        assert_eq!(body["response"]["status"], 200, "a real answer, not a cached outcome: {body}");
    }
    // …and they neither filled nor dropped the decision cache.
    assert_eq!(only_rule(&app.decision(ctx).await)["cached"], true);
    assert_eq!(calls(&api).await, 3);
}

#[tokio::test]
async fn the_cache_is_bounded_in_entries() {
    let api = MockServer::start().await;
    Mock::given(method("GET")).and(path_regex("^/users/user-")).respond_with(compliant()).expect(100).mount(&api).await;
    Mock::given(method("GET")).and(path("/settle")).respond_with(compliant()).expect(1).mount(&api).await;
    let app = spawn_app_with(AppOptions {
        files: one_file(
            json!([
                with(posture("per-user", format!("{}/users/%username%", api.uri())), json!({"cache_ttl_s": 600})),
                with(posture("settle", format!("{}/settle", api.uri())), json!({"cache_ttl_s": 600})),
            ]),
            json!([policy("p", "payroll", &["per-user"]), policy("s", "settle", &["settle"])]),
        ),
        tweak: Some(Box::new(|s| s.engine.cache_max_entries = 10)),
        ..Default::default()
    })
    .await;
    for chunk in (0..100).collect::<Vec<_>>().chunks(10) {
        let answers = join_all(
            chunk.iter().map(|i| app.decision(json!({"application": "payroll", "username": format!("user-{i}")}))),
        )
        .await;
        for a in answers {
            assert_eq!(a["decision"], "allow", "{a}");
        }
    }
    // moka applies evictions in maintenance it runs lazily on later cache operations,
    // and its entry count is only exact after that (`run_pending_tasks` is not exposed
    // by the engine). So: keep touching the cache (hits on one settle entry, which call
    // nobody but the first time), then check the count with some slack over the bound
    // of 10 for whatever is still pending. Without a bound it would be 101.
    let mut held = app.state.engine.cached_outcomes();
    for _ in 0..50 {
        app.decision(json!({"application": "settle"})).await;
        held = app.state.engine.cached_outcomes();
        if held <= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("cache holds {held} outcomes after 101 distinct requests with cache_max_entries = 10");
    assert!(held <= 20, "the cache holds {held} outcomes with cache_max_entries = 10");
    assert_eq!(calls_to(&api, "/settle").await, 1);
}

// ---------------------------------------------------------------------------------
// circuit breaker

#[tokio::test]
async fn the_circuit_opens_after_consecutive_errors_and_fails_fast_for_that_origin_only() {
    let flaky = MockServer::start().await;
    let healthy = MockServer::start().await;
    Mock::given(path("/devices/dev-1")).respond_with(ResponseTemplate::new(503)).expect(3).mount(&flaky).await;
    Mock::given(path("/lenient")).respond_with(compliant()).expect(0).mount(&flaky).await;
    Mock::given(path("/devices/dev-1")).respond_with(compliant()).expect(2).mount(&healthy).await;
    // A long cool-down: the fail-fast checks must not race its end.
    let app = spawn_app_with(AppOptions {
        files: one_file(
            json!([
                posture("flaky", format!("{}/devices/%device_id%", flaky.uri())),
                with(posture("lenient", format!("{}/lenient", flaky.uri())), json!({"on_error": "allow"})),
                posture("healthy", format!("{}/devices/%device_id%", healthy.uri())),
            ]),
            json!([
                policy("p-flaky", "flaky", &["flaky"]),
                policy("p-lenient", "lenient", &["lenient"]),
                policy("p-healthy", "healthy", &["healthy"]),
            ]),
        ),
        tweak: breaker_tweak(3, Duration::from_secs(60)),
        ..Default::default()
    })
    .await;
    let ctx = json!({"application": "flaky", "device_id": "dev-1"});
    for i in 0..3 {
        let d = app.decision(ctx.clone()).await;
        assert_eq!(d["decision"], "deny", "{d}");
        assert_eq!(reason(only_rule(&d)), "HTTP 503", "call {i}: {d}");
    }
    assert_eq!(calls(&flaky).await, 3);
    for _ in 0..2 {
        let d = app.decision(ctx.clone()).await;
        assert_eq!(d["decision"], "deny", "{d}");
        let rule = only_rule(&d);
        assert_eq!(rule["outcome"], "error", "{d}");
        assert!(reason(rule).contains("circuit open"), "{d}");
        assert_eq!(rule["http_status"], Value::Null, "no call went out: {d}");
    }
    assert_eq!(calls(&flaky).await, 3, "an open circuit makes no calls");
    // The breaker is per origin, not per rule: another rule on the same API fails
    // fast too, and its `on_error` decides.
    let lenient = app.decision(json!({"application": "lenient"})).await;
    assert_eq!(lenient["decision"], "allow", "{lenient}");
    let r = reason(only_rule(&lenient));
    assert!(r.contains("circuit open") && r.ends_with("on_error allows"), "{lenient}");
    assert_eq!(calls(&flaky).await, 3);

    let m = metrics(&app).await;
    assert_eq!(circuit_state(&m, &flaky.uri()).as_deref(), Some("1"), "{m}");
    // Other origins are not affected.
    for _ in 0..2 {
        let d = app.decision(json!({"application": "healthy", "device_id": "dev-1"})).await;
        assert_eq!(d["decision"], "allow", "{d}");
    }
    let m = metrics(&app).await;
    assert_ne!(circuit_state(&m, &healthy.uri()).as_deref(), Some("1"), "{m}");

    // /readyz shows each origin's circuit; an open one does not make verdict unready.
    let ready = app.client.get(format!("{}/readyz", app.address)).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let ready: Value = ready.json().await.unwrap();
    let state_of = |origin: String| {
        ready["circuits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["origin"] == origin.as_str())
            .map(|c| c["state"].clone())
    };
    assert_eq!(state_of(flaky.uri()), Some(json!("open")), "{ready}");
    assert_eq!(state_of(healthy.uri()), Some(json!("closed")), "{ready}");
}

#[tokio::test]
async fn connection_refused_counts_as_an_error() {
    let url = format!("http://127.0.0.1:{}/devices/dev-1", closed_port());
    let app = spawn_app_with(AppOptions {
        files: one_file(json!([posture("gone", url)]), json!([policy("p", "payroll", &["gone"])])),
        tweak: breaker_tweak(3, Duration::from_secs(60)),
        ..Default::default()
    })
    .await;
    let ctx = json!({"application": "payroll"});
    for _ in 0..3 {
        let d = app.decision(ctx.clone()).await;
        assert_eq!(reason(only_rule(&d)), "connection refused", "{d}");
    }
    let d = app.decision(ctx).await;
    assert!(reason(only_rule(&d)).contains("circuit open"), "{d}");
}

#[tokio::test]
async fn after_the_cool_down_one_probe_decides_and_half_open_lets_exactly_one_through() {
    let cooldown = Duration::from_secs(2);
    let api = MockServer::start().await;
    Mock::given(path("/devices/dev-1")).respond_with(ResponseTemplate::new(503)).mount(&api).await;
    let app = spawn_app_with(AppOptions {
        files: one_file(
            json!([with(
                posture("posture", format!("{}/devices/%device_id%", api.uri())),
                json!({"timeout_ms": 8000})
            )]),
            json!([policy("p", "payroll", &["posture"])]),
        ),
        tweak: breaker_tweak(3, cooldown),
        ..Default::default()
    })
    .await;
    let ctx = json!({"application": "payroll", "device_id": "dev-1"});
    for _ in 0..3 {
        app.decision(ctx.clone()).await;
    }
    assert!(reason(only_rule(&app.decision(ctx.clone()).await)).contains("circuit open"));
    assert_eq!(calls(&api).await, 3);

    // Cool-down over (waiting, not measuring): one probe goes out and fails…
    tokio::time::sleep(cooldown + Duration::from_millis(300)).await;
    let probe = app.decision(ctx.clone()).await;
    assert_eq!(reason(only_rule(&probe)), "HTTP 503", "{probe}");
    assert_eq!(calls(&api).await, 4);
    // …so the circuit stays open: no second probe right after.
    let after = app.decision(ctx.clone()).await;
    assert!(reason(only_rule(&after)).contains("circuit open"), "{after}");
    assert_eq!(calls(&api).await, 4);
    assert_eq!(circuit_state(&metrics(&app).await, &api.uri()).as_deref(), Some("1"));

    // The API recovers, slowly: 20 concurrent decisions in half-open state make one
    // probe between them; the other 19 fail fast while it is out.
    api.reset().await;
    Mock::given(path("/devices/dev-1")).respond_with(compliant().set_delay(Duration::from_secs(2))).mount(&api).await;
    tokio::time::sleep(cooldown + Duration::from_millis(300)).await;
    let answers = join_all((0..20).map(|_| app.decision(ctx.clone()))).await;
    assert_eq!(calls(&api).await, 1, "exactly one probe");
    let allowed: Vec<&Value> = answers.iter().filter(|a| a["decision"] == "allow").collect();
    assert_eq!(allowed.len(), 1, "the probe's decision allows: {answers:?}");
    for a in answers.iter().filter(|a| a["decision"] != "allow") {
        assert!(reason(only_rule(a)).contains("circuit open"), "{a}");
    }
    // The probe succeeded: closed, and calls flow again.
    assert_eq!(circuit_state(&metrics(&app).await, &api.uri()).as_deref(), Some("0"));
    let flowing = app.decision(ctx).await;
    assert_eq!(flowing["decision"], "allow", "{flowing}");
    assert_eq!(calls(&api).await, 2);
}

// ---------------------------------------------------------------------------------
// body cap

fn padded(len: usize) -> String {
    let skeleton = json!({"status": "compliant", "pad": ""}).to_string();
    let body = json!({"status": "compliant", "pad": "x".repeat(len - skeleton.len())}).to_string();
    assert_eq!(body.len(), len);
    body
}

/// Serves one chunked answer (no Content-Length) of `chunks` × `chunk` bytes per
/// connection, so only the streaming check can catch its size.
async fn chunked_server(chunks: usize, chunk: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let mut out =
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                for _ in 0..chunks {
                    out.extend_from_slice(format!("{chunk:x}\r\n").as_bytes());
                    out.resize(out.len() + chunk, b' ');
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                let _ = socket.write_all(&out).await;
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn answers_larger_than_the_cap_are_errors() {
    let api = MockServer::start().await;
    Mock::given(path("/big"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(padded(2048), "application/json"))
        .expect(1)
        .mount(&api)
        .await;
    Mock::given(path("/fits"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(padded(1000), "application/json"))
        .expect(1)
        .mount(&api)
        .await;
    Mock::given(path("/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "t".repeat(2048), "token_type": "Bearer", "expires_in": 3600})),
        )
        .expect(1)
        .mount(&api)
        .await;
    Mock::given(path("/behind-token")).respond_with(compliant()).expect(0).mount(&api).await;
    let streamed = chunked_server(2, 1000).await;
    let oauth = json!({"type": "oauth2_client_credentials", "token_url": format!("{}/token", api.uri()),
                       "client_id": "verdict", "client_secret": "s3cret"});
    let app = spawn_app_with(AppOptions {
        files: one_file(
            json!([
                posture("big", format!("{}/big", api.uri())),
                posture("fits", format!("{}/fits", api.uri())),
                json!({"id": "streamed", "method": "GET", "url": format!("{streamed}/s")}),
                with(posture("tokened", format!("{}/behind-token", api.uri())), json!({"auth": oauth})),
            ]),
            json!([
                policy("p-big", "big", &["big"]),
                policy("p-fits", "fits", &["fits"]),
                policy("p-streamed", "streamed", &["streamed"]),
                policy("p-tokened", "tokened", &["tokened"]),
            ]),
        ),
        tweak: Some(Box::new(|s| s.max_response_bytes = 1024)),
        ..Default::default()
    })
    .await;
    let big = app.decision(json!({"application": "big"})).await;
    assert_eq!(big["decision"], "deny", "on_error deny: {big}");
    assert_eq!(only_rule(&big)["outcome"], "error");
    assert_eq!(reason(only_rule(&big)), "answer body is larger than 1024 bytes", "{big}");

    let fits = app.decision(json!({"application": "fits"})).await;
    assert_eq!(fits["decision"], "allow", "{fits}");

    let streamed = app.decision(json!({"application": "streamed"})).await;
    assert_eq!(streamed["decision"], "deny", "{streamed}");
    assert_eq!(reason(only_rule(&streamed)), "answer body is larger than 1024 bytes", "{streamed}");

    // The token endpoint is a third party too.
    let tokened = app.decision(json!({"application": "tokened"})).await;
    assert_eq!(tokened["decision"], "deny", "{tokened}");
    assert_eq!(
        reason(only_rule(&tokened)),
        "OAuth token request failed: answer body is larger than 1024 bytes",
        "{tokened}"
    );
}

// ---------------------------------------------------------------------------------
// redirects

async fn redirecting_api(expect_target: u64) -> MockServer {
    let api = MockServer::start().await;
    Mock::given(path("/check"))
        .respond_with(ResponseTemplate::new(302).insert_header("location", format!("{}/target", api.uri())))
        .expect(1)
        .mount(&api)
        .await;
    Mock::given(path("/target")).respond_with(compliant()).expect(expect_target).mount(&api).await;
    api
}

#[tokio::test]
async fn redirects_are_not_followed_by_default() {
    let api = redirecting_api(0).await;
    let app = spawn_app(
        json!([posture("posture", format!("{}/check", api.uri()))]),
        json!([policy("p", "payroll", &["posture"])]),
    )
    .await;
    let d = app.decision(json!({"application": "payroll"})).await;
    assert_eq!(d["decision"], "deny", "{d}");
    let rule = only_rule(&d);
    assert_eq!(rule["outcome"], "error", "{d}");
    assert_eq!(rule["http_status"], 302);
    assert!(reason(rule).contains("HTTP 302"), "{d}");
}

#[tokio::test]
async fn redirects_are_followed_when_configured() {
    let api = redirecting_api(1).await;
    let app = spawn_app_with(AppOptions {
        files: one_file(
            json!([posture("posture", format!("{}/check", api.uri()))]),
            json!([policy("p", "payroll", &["posture"])]),
        ),
        tweak: Some(Box::new(|s| s.follow_redirects = true)),
        ..Default::default()
    })
    .await;
    let d = app.decision(json!({"application": "payroll"})).await;
    assert_eq!(d["decision"], "allow", "{d}");
}

// ---------------------------------------------------------------------------------
// deadlines

/// Two rules, 300 ms and 800 ms, against an API that answers after 5 s.
async fn two_slow_rules(fast_on_error: &str) -> (MockServer, TestApp) {
    let api = MockServer::start().await;
    Mock::given(any()).respond_with(compliant().set_delay(Duration::from_secs(5))).mount(&api).await;
    let app = spawn_app(
        json!([
            with(
                posture("short", format!("{}/short", api.uri())),
                json!({"timeout_ms": 300, "on_error": fast_on_error})
            ),
            with(posture("long", format!("{}/long", api.uri())), json!({"timeout_ms": 800})),
        ]),
        json!([policy("p", "payroll", &["short", "long"])]),
    )
    .await;
    (api, app)
}

#[tokio::test]
async fn a_decision_ends_at_its_rules_deadlines_whatever_the_api_does() {
    let (_api, app) = two_slow_rules("allow").await;
    // The APIs answer after 5 s; finishing within 4 s proves nobody waited for them.
    let d = within(Duration::from_secs(4), "the decision", app.decision(json!({"application": "payroll"}))).await;
    assert_eq!(d["decision"], "deny", "{d}");
    let rules = d["rules"].as_array().expect("rules");
    let by_id = |id: &str| rules.iter().find(|r| r["rule_id"] == id).unwrap_or_else(|| panic!("{id} in {d}"));
    assert_eq!(by_id("short")["reason"], "timed out after 300 ms; on_error allows", "{d}");
    assert_eq!(by_id("long")["reason"], "timed out after 800 ms", "{d}");
    assert_eq!(d["reason"], "policy p: rule long failed: timed out after 800 ms");
}

#[tokio::test]
async fn the_first_deny_ends_a_policy_before_its_slower_rules() {
    let (_api, app) = two_slow_rules("deny").await;
    let d = within(Duration::from_secs(4), "the decision", app.decision(json!({"application": "payroll"}))).await;
    assert_eq!(d["decision"], "deny", "{d}");
    assert_eq!(d["reason"], "policy p: rule short failed: timed out after 300 ms", "{d}");
    assert_eq!(only_rule(&d)["rule_id"], "short", "the 800 ms rule was cancelled, not waited for: {d}");
}

#[tokio::test]
async fn a_slow_token_endpoint_counts_against_the_rule_timeout() {
    let api = MockServer::start().await;
    Mock::given(path("/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "tok", "token_type": "Bearer", "expires_in": 3600}))
                .set_delay(Duration::from_secs(5)),
        )
        .mount(&api)
        .await;
    Mock::given(path("/devices/dev-1")).respond_with(compliant()).expect(0).mount(&api).await;
    let oauth = json!({"type": "oauth2_client_credentials", "token_url": format!("{}/token", api.uri()),
                       "client_id": "verdict", "client_secret": "s3cret"});
    let app = spawn_app(
        json!([with(
            posture("posture", format!("{}/devices/%device_id%", api.uri())),
            json!({"auth": oauth, "timeout_ms": 300})
        )]),
        json!([policy("p", "payroll", &["posture"])]),
    )
    .await;
    let d = within(
        Duration::from_secs(4),
        "the decision",
        app.decision(json!({"application": "payroll", "device_id": "dev-1"})),
    )
    .await;
    assert_eq!(d["decision"], "deny", "{d}");
    assert_eq!(reason(only_rule(&d)), "timed out after 300 ms", "{d}");
}

#[tokio::test]
async fn a_fast_deny_cancels_the_outstanding_slow_call() {
    // One call in flight per origin: a slow call that was not cancelled would hold the
    // slow API's only slot for 20 s, and the `quick` rule on the same API would time out.
    let fast = MockServer::start().await;
    let slow = MockServer::start().await;
    Mock::given(path("/fast"))
        .respond_with(noncompliant().set_delay(Duration::from_millis(300)))
        .expect(1)
        .mount(&fast)
        .await;
    Mock::given(path("/slow")).respond_with(compliant().set_delay(Duration::from_secs(20))).mount(&slow).await;
    Mock::given(path("/quick")).respond_with(compliant()).expect(1).mount(&slow).await;
    let app = spawn_app_with(AppOptions {
        files: one_file(
            json!([
                posture("fast", format!("{}/fast", fast.uri())),
                with(posture("slow", format!("{}/slow", slow.uri())), json!({"timeout_ms": 30000})),
                with(posture("quick", format!("{}/quick", slow.uri())), json!({"timeout_ms": 3000})),
            ]),
            json!([policy("p", "payroll", &["fast", "slow"]), policy("q", "other", &["quick"])]),
        ),
        tweak: Some(Box::new(|s| s.engine.breaker.max_in_flight = 1)),
        ..Default::default()
    })
    .await;
    let d = within(Duration::from_secs(10), "the decision", app.decision(json!({"application": "payroll"}))).await;
    assert_eq!(d["decision"], "deny", "{d}");
    assert_eq!(only_rule(&d)["rule_id"], "fast", "{d}");
    assert_eq!(calls_to(&slow, "/slow").await, 1, "the slow call was out when the policy ended");
    let q = within(Duration::from_secs(10), "the next decision", app.decision(json!({"application": "other"}))).await;
    assert_eq!(q["decision"], "allow", "the slow call still holds the origin's only slot: {q}");
}

// ---------------------------------------------------------------------------------
// scale of configuration

/// `apps` applications, each with two policies of five rules: `p-N-0` for everyone
/// and `p-N-1` for user `nobody`. The rules of `p-TARGET-0` call `api`; all others
/// call `idle`. Plus one cached rule `cached` for application `cached` on `api`.
fn big_config(apps: usize, target: usize, api: &str, idle: &str) -> Value {
    let mut rules = Vec::with_capacity(apps * 10 + 1);
    let mut policies = Vec::with_capacity(apps * 2 + 1);
    for a in 0..apps {
        for p in 0..2 {
            let ids: Vec<String> = (0..5).map(|r| format!("r-{a:04}-{p}-{r}")).collect();
            for id in &ids {
                let base = if a == target && p == 0 { api } else { idle };
                rules.push(posture(id, format!("{base}/r/{id}")));
            }
            let mut pol = json!({"id": format!("p-{a:04}-{p}"), "applications": [format!("app-{a:04}")], "rules": ids});
            if p == 1 {
                pol["subjects"] = json!({"users": ["nobody"]});
            }
            policies.push(pol);
        }
    }
    rules.push(with(posture("cached", format!("{api}/cached")), json!({"cache_ttl_s": 3600})));
    policies.push(policy("p-cached", "cached", &["cached"]));
    json!({"rules": rules, "policies": policies})
}

/// Like `spawn_app`, timing only verdict's start (store, policy files, catalog,
/// listener), not the test writing the policy file.
async fn start_with(config: Value) -> (TestApp, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_policy_file(dir.path(), "big.json", &config);
    let settings = test_settings(dir.path());
    let started = Instant::now();
    let app = Application::build(settings).await.expect("verdict failed to start");
    let startup = started.elapsed();
    let port = app.port();
    let state = app.state();
    tokio::spawn(app.run_until_stopped());
    let app = TestApp { address: format!("http://127.0.0.1:{port}"), port, client: reqwest::Client::new(), dir, state };
    (app, startup)
}

#[tokio::test]
async fn ten_thousand_rules_a_decision_evaluates_only_its_applications_policies() {
    let api = MockServer::start().await;
    let idle = MockServer::start().await;
    Mock::given(path_regex("^/r/r-0421-0-")).respond_with(compliant()).expect(5).mount(&api).await;
    Mock::given(any()).respond_with(compliant()).expect(0).mount(&idle).await;
    let config = big_config(1000, 421, &api.uri(), &idle.uri());
    assert_eq!(config["rules"].as_array().map(Vec::len), Some(10_001));
    assert_eq!(config["policies"].as_array().map(Vec::len), Some(2_001));
    let (app, startup) = start_with(config).await;
    eprintln!("start-up with 10,001 rules and 2,001 policies: {startup:?} (debug build)");
    assert_eq!(app.state.engine.catalog().rules.len(), 10_001);

    let d = app.decision(json!({"application": "app-0421", "username": "alice"})).await;
    assert_eq!(d["decision"], "allow", "{d}");
    assert_eq!(d["policies"], json!([{"id": "p-0421-0", "decision": "allow"}]), "{d}");
    let mut ids: Vec<&str> =
        d["rules"].as_array().expect("rules").iter().filter_map(|r| r["rule_id"].as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["r-0421-0-0", "r-0421-0-1", "r-0421-0-2", "r-0421-0-3", "r-0421-0-4"]);
    assert_eq!(calls(&api).await, 5);
    assert_eq!(calls(&idle).await, 0, "no other application's rule was called");
}

/// Start-up time, decision latency (medians) and memory with 10 vs 10,000 rules.
/// Run: `cargo test --test api scale_report -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a report, not a check: run with --ignored --nocapture"]
async fn scale_report() {
    const N: usize = 300;
    let api = MockServer::start().await;
    let idle = MockServer::start().await;
    Mock::given(any()).respond_with(compliant()).mount(&api).await;
    let rss_kib = || -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort_unstable();
        v[v.len() / 2]
    }
    eprintln!("build: {}", if cfg!(debug_assertions) { "debug (unoptimized)" } else { "release" });
    let mut apps = Vec::new();
    for apps_n in [1usize, 1000] {
        let rss_before = rss_kib();
        let target = apps_n / 2;
        let (app, startup) = start_with(big_config(apps_n, target, &api.uri(), &idle.uri())).await;
        let rss_after = rss_kib();
        let rules = app.state.engine.catalog().rules.len();
        let policies = app.state.engine.catalog().policies.len();
        let engine = app.state.engine.clone();
        let uncached_ctx = context(json!({"application": format!("app-{target:04}"), "username": "alice"}));
        let cached_ctx = context(json!({"application": "cached"}));
        let mut uncached = Vec::with_capacity(N);
        let mut cached = Vec::with_capacity(N);
        let mut http = Vec::with_capacity(N);
        for _ in 0..N {
            let t = Instant::now();
            let d = engine.decide(&uncached_ctx).await;
            uncached.push(t.elapsed());
            assert_eq!(d.rules.len(), 5);
            let t = Instant::now();
            engine.decide(&cached_ctx).await;
            cached.push(t.elapsed());
            let t = Instant::now();
            app.decision(json!({"application": format!("app-{target:04}"), "username": "alice"})).await;
            http.push(t.elapsed());
        }
        eprintln!(
            "{rules:>6} rules, {policies:>5} policies: start-up {:>7.1} ms | median decide(): 5 uncached rules {:>7.3} ms, \
             1 cached rule {:>7.3} ms | median POST /v1/decisions (5 rules, activity log durable) {:>7.3} ms | \
             RSS {} KiB -> {} KiB (+{} KiB)",
            startup.as_secs_f64() * 1000.0,
            median(uncached).as_secs_f64() * 1000.0,
            median(cached).as_secs_f64() * 1000.0,
            median(http).as_secs_f64() * 1000.0,
            rss_before,
            rss_after,
            rss_after.saturating_sub(rss_before),
        );
        apps.push(app);
    }
    eprintln!("process RSS at the end (both apps running): {} KiB", rss_kib());
    assert_eq!(calls(&idle).await, 0);
}
