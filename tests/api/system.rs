//! `/healthz`, `/readyz` and `/metrics`: no token needed; readiness says what it
//! checked; a scrape after a few decisions shows every family with the right counts.

use std::collections::BTreeMap;

use reqwest::Method;
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

#[tokio::test]
async fn health_and_readiness_need_no_token_and_show_each_check() {
    let app = spawn_app(json!([]), json!([{"id": "p", "applications": ["a"], "rules": []}])).await;
    let (status, health) = read(app.request(Method::GET, "/healthz").send().await.expect("healthz")).await;
    assert_eq!((status, health), (200, json!({"status": "ok"})));

    let (status, ready) = read(app.request(Method::GET, "/readyz").send().await.expect("readyz")).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["checks"]["store"]["ok"], true, "{ready}");
    assert_eq!(ready["checks"]["policy_files"]["ok"], true, "{ready}");
    for check in ["store", "policy_files"] {
        assert!(ready["checks"][check]["detail"].as_str().is_some_and(|d| !d.is_empty()), "{ready}");
    }
}

/// One sample of the Prometheus text format: name, labels, value.
type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

fn parse_samples(text: &str) -> Samples {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').expect("label");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            (name, labels, value.parse().expect("sample value"))
        })
        .collect()
}

/// The value of the one sample named `name` whose labels include `labels`.
fn sample(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "expected one sample {name}{labels:?}, found {found:?}");
    found[0]
}

#[tokio::test]
async fn a_scrape_after_some_decisions_shows_every_family() {
    let api = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "tok-1", "token_type": "Bearer", "expires_in": 3600})),
        )
        .expect(1)
        .mount(&api)
        .await;
    for (device, status) in [("dev-ok", "compliant"), ("dev-bad", "noncompliant")] {
        Mock::given(method("GET"))
            .and(path(format!("/devices/{device}")))
            .and(header("Authorization", "Bearer tok-1"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": status})))
            .mount(&api)
            .await;
    }
    let app = spawn_app(
        json!([{"id": "posture", "method": "GET", "url": format!("{}/devices/%device_id%", api.uri()),
                "auth": {"type": "oauth2_client_credentials", "token_url": format!("{}/token", api.uri()),
                         "client_id": "verdict", "client_secret": "metrics-secret"},
                "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]}]),
        json!([{"id": "payroll-access", "applications": ["payroll"], "rules": ["posture"]}]),
    )
    .await;

    // Before any decision every known series is there, at zero.
    let text = app.request(Method::GET, "/metrics").send().await.expect("metrics").text().await.expect("text");
    let before = parse_samples(&text);
    assert_eq!(sample(&before, "verdict_decisions_total", &[("decision", "allow"), ("via", "api")]), 0.0);
    assert_eq!(sample(&before, "verdict_oauth_token_fetches_total", &[("result", "ok")]), 0.0);
    assert_eq!(sample(&before, "verdict_activity_batch_size_count", &[]), 0.0);

    // 3 allow + 2 deny over the API, 1 allow over forward auth.
    for device in ["dev-ok", "dev-bad", "dev-ok", "dev-bad", "dev-ok"] {
        app.decision(json!({"application": "payroll", "device_id": device})).await;
    }
    let resp = app
        .request(Method::GET, "/v1/forward-auth")
        .bearer_auth(PROXY_TOKEN)
        .header("X-Verdict-Application", "payroll")
        .header("X-Device-Id", "dev-ok")
        .send()
        .await
        .expect("forward-auth");
    assert_eq!(resp.status().as_u16(), 200);

    let resp = app.request(Method::GET, "/metrics").send().await.expect("metrics");
    assert_eq!(resp.status().as_u16(), 200);
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = resp.text().await.expect("text");
    let s = parse_samples(&text);
    for family in [
        "verdict_decisions_total",
        "verdict_decision_latency_seconds",
        "verdict_rule_outcomes_total",
        "verdict_rule_latency_seconds",
        "verdict_oauth_token_fetches_total",
        "verdict_activity_batch_size",
        "verdict_activity_queue_depth",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "no family {family} in:\n{text}");
    }

    // Decisions by outcome and entry point, and their latency.
    assert_eq!(sample(&s, "verdict_decisions_total", &[("decision", "allow"), ("via", "api")]), 3.0);
    assert_eq!(sample(&s, "verdict_decisions_total", &[("decision", "deny"), ("via", "api")]), 2.0);
    assert_eq!(sample(&s, "verdict_decisions_total", &[("decision", "allow"), ("via", "forward-auth")]), 1.0);
    assert_eq!(sample(&s, "verdict_decisions_total", &[("decision", "deny"), ("via", "forward-auth")]), 0.0);
    assert_eq!(sample(&s, "verdict_decision_latency_seconds_count", &[("via", "api")]), 5.0);
    assert_eq!(sample(&s, "verdict_decision_latency_seconds_count", &[("via", "forward-auth")]), 1.0);
    assert_eq!(sample(&s, "verdict_decision_latency_seconds_bucket", &[("via", "api"), ("le", "+Inf")]), 5.0);
    assert!(sample(&s, "verdict_decision_latency_seconds_sum", &[("via", "api")]) > 0.0);

    // Rule outcomes and latency.
    assert_eq!(sample(&s, "verdict_rule_outcomes_total", &[("rule", "posture"), ("outcome", "allow")]), 4.0);
    assert_eq!(sample(&s, "verdict_rule_outcomes_total", &[("rule", "posture"), ("outcome", "deny")]), 2.0);
    assert_eq!(sample(&s, "verdict_rule_latency_seconds_count", &[("rule", "posture")]), 6.0);
    assert!(sample(&s, "verdict_rule_latency_seconds_sum", &[("rule", "posture")]) > 0.0);

    // One token, reused by every call.
    assert_eq!(sample(&s, "verdict_oauth_token_fetches_total", &[("result", "ok")]), 1.0);
    assert_eq!(sample(&s, "verdict_oauth_token_fetches_total", &[("result", "error")]), 0.0);

    // Activity log: six entries committed in at most six batches, none waiting.
    let batches = sample(&s, "verdict_activity_batch_size_count", &[]);
    assert!((1.0..=6.0).contains(&batches), "{batches} batches");
    assert_eq!(sample(&s, "verdict_activity_batch_size_sum", &[]), 6.0);
    assert_eq!(sample(&s, "verdict_activity_batch_size_bucket", &[("le", "+Inf")]), batches);
    assert!(sample(&s, "verdict_activity_batch_size_bucket", &[("le", "1")]) <= batches);
    assert_eq!(sample(&s, "verdict_activity_batch_size_bucket", &[("le", "8")]), batches, "no batch above 6");
    assert_eq!(sample(&s, "verdict_activity_entries_total", &[]), 6.0);
    assert_eq!(sample(&s, "verdict_activity_failed_batches_total", &[]), 0.0);
    assert_eq!(sample(&s, "verdict_activity_queue_depth", &[]), 0.0);

    // The client secret is not in the metrics.
    assert!(!text.contains("metrics-secret"));
}
