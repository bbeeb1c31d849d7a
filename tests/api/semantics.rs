//! Policy semantics (SPEC §5): OR across matching policies, AND within one, rules of a
//! policy evaluated concurrently with a deny ending the policy at once, subjects,
//! disabled rules and policies, `"*"`, and `no policy matches`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{any, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::tools::BarrierApi;

/// An API with `/allow` and `/deny` (for rules checking `status == ok`).
async fn api() -> MockServer {
    let api = MockServer::start().await;
    Mock::given(path("/allow"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "ok"})))
        .mount(&api)
        .await;
    Mock::given(path("/deny"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "no"})))
        .mount(&api)
        .await;
    api
}

fn rule(id: &str, url: String) -> Value {
    json!({"id": id, "method": "GET", "url": url,
           "response_actions": [{"type": "equals", "key": "status", "value": "ok"}]})
}

fn yes_no(api: &MockServer) -> Value {
    json!([rule("yes", format!("{}/allow", api.uri())), rule("no", format!("{}/deny", api.uri()))])
}

fn policy_ids(answer: &Value) -> Vec<(String, String)> {
    answer["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap().to_owned(), p["decision"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn one_allowing_policy_among_matching_ones_allows() {
    let api = api().await;
    let app = spawn_app(
        yes_no(&api),
        json!([
            {"id": "a-denies", "applications": ["app"], "rules": ["no"]},
            {"id": "b-allows", "applications": ["app"], "rules": ["yes"]}
        ]),
    )
    .await;
    let answer = app.decision(json!({"application": "app"})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    assert_eq!(answer["reason"], "policy b-allows allowed: rule yes allowed");
    let ids: Vec<String> = policy_ids(&answer).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["a-denies", "b-allows"]);
}

#[tokio::test]
async fn when_every_matching_policy_denies_the_reason_names_each() {
    let api = api().await;
    let app = spawn_app(
        yes_no(&api),
        json!([
            {"id": "a", "applications": ["app"], "rules": ["no"]},
            {"id": "b", "applications": ["app"], "rules": ["yes", "no"]}
        ]),
    )
    .await;
    let answer = app.decision(json!({"application": "app"})).await;
    assert_eq!(answer["decision"], "deny");
    assert_eq!(
        answer["reason"],
        "policy a: rule no denied: $.status is \"no\", expected equals \"ok\"; \
         policy b: rule no denied: $.status is \"no\", expected equals \"ok\""
    );
    assert_eq!(policy_ids(&answer), [("a".into(), "deny".into()), ("b".into(), "deny".into())]);
}

#[tokio::test]
async fn every_rule_of_a_policy_must_allow() {
    let api = api().await;
    let mut rules = yes_no(&api);
    rules.as_array_mut().unwrap().push(rule("yes-too", format!("{}/allow", api.uri())));
    let app = spawn_app(
        rules,
        json!([
            {"id": "both", "applications": ["app"], "rules": ["yes", "yes-too"]},
            {"id": "mixed", "applications": ["mixed"], "rules": ["yes", "no"]}
        ]),
    )
    .await;
    let all = app.decision(json!({"application": "app"})).await;
    assert_eq!(all["decision"], "allow", "{all}");
    assert_eq!(all["rules"].as_array().unwrap().len(), 2);
    let mixed = app.decision(json!({"application": "mixed"})).await;
    assert_eq!(mixed["decision"], "deny", "{mixed}");
    assert!(mixed["reason"].as_str().unwrap().starts_with("policy mixed: rule no denied"), "{mixed}");
}

#[tokio::test]
async fn rules_of_a_policy_are_called_concurrently() {
    // The API answers neither call before both have arrived: evaluated one after the
    // other, the first call would wait until its rule times out and the policy denies.
    let barrier = BarrierApi::start(2).await;
    let app = spawn_app(
        json!([
            {"id": "one", "method": "GET", "url": format!("{}/one", barrier.uri), "timeout_ms": 10000},
            {"id": "two", "method": "GET", "url": format!("{}/two", barrier.uri), "timeout_ms": 10000}
        ]),
        json!([{"id": "p", "applications": ["app"], "rules": ["one", "two"]}]),
    )
    .await;
    let answer = app.decision(json!({"application": "app"})).await;
    assert_eq!(answer["decision"], "allow", "the two calls were not in flight together: {answer}");
    assert_eq!(barrier.arrived.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_deny_ends_the_policy_without_waiting_for_its_other_rules() {
    let api = api().await;
    let slow = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"status": "ok"})).set_delay(Duration::from_secs(25)),
        )
        .mount(&slow)
        .await;
    let app = spawn_app(
        json!([
            rule("no", format!("{}/deny", api.uri())),
            {"id": "slow", "method": "GET", "url": format!("{}/slow", slow.uri()), "timeout_ms": 30000}
        ]),
        json!([{"id": "p", "applications": ["app"], "rules": ["slow", "no"]}]),
    )
    .await;
    // A hang (not a slow answer) is the failure: the bound is far above any normal
    // latency and far below the slow API's 25 s.
    let answer = tokio::time::timeout(Duration::from_secs(15), app.decision(json!({"application": "app"})))
        .await
        .expect("the decision waited for the slow rule although another rule had denied");
    assert_eq!(answer["decision"], "deny");
    assert!(answer["reason"].as_str().unwrap().starts_with("policy p: rule no denied"), "{answer}");
    let rules: Vec<&str> = answer["rules"].as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap()).collect();
    assert_eq!(rules, ["no"], "the slow rule has no result: it was cancelled");
}

#[tokio::test]
async fn subjects_match_users_exactly() {
    let api = api().await;
    let app = spawn_app(
        yes_no(&api),
        json!([{"id": "p", "applications": ["app"], "subjects": {"users": ["alice@example.com"]}, "rules": ["yes"]}]),
    )
    .await;
    let alice = app.decision(json!({"application": "app", "username": "alice@example.com"})).await;
    assert_eq!(alice["decision"], "allow", "{alice}");
    for other in [json!({"application": "app", "username": "bob@example.com"}), json!({"application": "app"})] {
        let answer = app.decision(other).await;
        assert_eq!(answer["decision"], "deny");
        assert!(answer["reason"].as_str().unwrap().contains("no policy matches"), "{answer}");
    }
}

#[tokio::test]
async fn subjects_match_a_group_by_id_or_by_name() {
    let api = api().await;
    let app = spawn_app(
        yes_no(&api),
        json!([
            {"id": "by-id", "applications": ["by-id"], "subjects": {"groups": ["g-1001"]}, "rules": ["yes"]},
            {"id": "by-name", "applications": ["by-name"], "subjects": {"groups": ["Finance"]}, "rules": ["yes"]}
        ]),
    )
    .await;
    let member = json!({"groups": ["g-7", "g-1001"], "group_names": ["Staff", "Finance"]});
    for application in ["by-id", "by-name"] {
        let mut ctx = member.clone();
        ctx["application"] = json!(application);
        let answer = app.decision(ctx).await;
        assert_eq!(answer["decision"], "allow", "{application}: {answer}");
    }
    let outsider = app.decision(json!({"application": "by-id", "groups": ["g-1002"], "group_names": ["HR"]})).await;
    assert!(outsider["reason"].as_str().unwrap().contains("no policy matches"), "{outsider}");
}

#[tokio::test]
async fn a_disabled_rule_is_skipped_and_never_called() {
    let api = api().await;
    let never = MockServer::start().await;
    Mock::given(any()).respond_with(ResponseTemplate::new(200)).expect(0).mount(&never).await;
    let mut rules = yes_no(&api);
    rules.as_array_mut().unwrap().push(json!({"id": "off", "enabled": false, "method": "GET",
        "url": format!("{}/never", never.uri()), "response_actions": [{"type": "exists", "key": "$.nothing"}]}));
    let app = spawn_app(rules, json!([{"id": "p", "applications": ["app"], "rules": ["off", "yes"]}])).await;
    let answer = app.decision(json!({"application": "app"})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    let ran: Vec<&str> = answer["rules"].as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap()).collect();
    assert_eq!(ran, ["yes"]);
}

#[tokio::test]
async fn a_disabled_policy_does_not_match() {
    let api = api().await;
    let app = spawn_app(
        yes_no(&api),
        json!([
            {"id": "off", "enabled": false, "applications": ["app"], "rules": ["yes"]},
            {"id": "on", "applications": ["other"], "rules": ["yes"]}
        ]),
    )
    .await;
    let answer = app.decision(json!({"application": "app"})).await;
    assert_eq!(answer["decision"], "deny");
    assert!(answer["reason"].as_str().unwrap().contains("no policy matches"), "{answer}");
    assert_eq!(answer["policies"], json!([]));
    assert_eq!(app.decision(json!({"application": "other"})).await["decision"], "allow");
}

#[tokio::test]
async fn a_star_policy_covers_every_application() {
    let api = api().await;
    let app = spawn_app(
        yes_no(&api),
        json!([
            {"id": "everything", "applications": ["*"], "rules": ["yes"]},
            {"id": "payroll-only", "applications": ["payroll"], "rules": ["no"]}
        ]),
    )
    .await;
    for application in ["payroll", "wiki", "anything-at-all"] {
        let answer = app.decision(json!({"application": application})).await;
        assert_eq!(answer["decision"], "allow", "{application}: {answer}");
    }
    let payroll = app.decision(json!({"application": "payroll"})).await;
    let ids: Vec<String> = policy_ids(&payroll).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["everything", "payroll-only"], "both policies match payroll");
}

#[tokio::test]
async fn with_no_matching_policy_the_request_is_denied() {
    let api = api().await;
    let app = spawn_app(yes_no(&api), json!([{"id": "p", "applications": ["payroll"], "rules": ["yes"]}])).await;
    let answer = app.decision(json!({"application": "wiki"})).await;
    assert_eq!(answer["decision"], "deny");
    assert!(answer["reason"].as_str().unwrap().starts_with("no policy matches"), "{answer}");
    assert_eq!(answer["rules"], json!([]));
    assert_eq!(answer["policies"], json!([]));
}

#[tokio::test]
async fn the_answer_has_the_documented_shape() {
    let api = api().await;
    let app = spawn_app(yes_no(&api), json!([{"id": "p", "applications": ["app"], "rules": ["yes"]}])).await;
    let answer = app.decision(json!({"application": "app"})).await;
    let id = answer["decision_id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    assert!(answer["latency_ms"].is_number());
    assert_eq!(answer["policies"], json!([{"id": "p", "decision": "allow"}]));
    let r = &answer["rules"][0];
    assert_eq!(r["rule_id"], "yes");
    assert_eq!(r["outcome"], "allow");
    assert_eq!(r["http_status"], 200);
    assert_eq!(r["cached"], false);
    assert!(r["latency_ms"].is_number() && r["reason"].is_string(), "{r}");
    let second = app.decision(json!({"application": "app"})).await;
    assert_ne!(second["decision_id"], answer["decision_id"]);
}

#[tokio::test]
async fn a_rule_listed_by_several_matching_policies_is_called_once_per_decision() {
    let api = MockServer::start().await;
    Mock::given(path("/shared"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"status": "no"})).set_delay(Duration::from_millis(100)),
        )
        .mount(&api)
        .await;
    Mock::given(path("/deny"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "no"})))
        .mount(&api)
        .await;
    let app = spawn_app(
        json!([rule("shared", format!("{}/shared", api.uri())), rule("other", format!("{}/deny", api.uri()))]),
        json!([
            {"id": "p1", "applications": ["app"], "rules": ["shared"]},
            {"id": "p2", "applications": ["app"], "rules": ["shared", "other"]},
            {"id": "p3", "applications": ["*"], "rules": ["shared"]}
        ]),
    )
    .await;
    for round in 1..=3 {
        let answer = app.decision(json!({"application": "app", "username": format!("u{round}")})).await;
        assert_eq!(answer["decision"], "deny", "{answer}");
        let calls = api.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/shared").count();
        assert_eq!(calls, round, "the shared rule is called once per decision, not once per policy");
        // Each policy that waited for it reports its result.
        let shared_results = answer["rules"].as_array().unwrap().iter().filter(|r| r["rule_id"] == "shared").count();
        assert!(shared_results >= 2, "p1 and p3 both report the shared rule: {answer}");
        assert!(
            answer["reason"].as_str().unwrap().contains("policy p1: rule shared denied"),
            "the reason still names each policy: {answer}"
        );
    }
}
