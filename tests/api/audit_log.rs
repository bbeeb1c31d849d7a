//! `GET /v1/audit-logs` and `/v1/audit-logs/verify` over HTTP: one entry per policy file
//! load and per API write, chained, with filters, pagination and the errors of a
//! malformed query. (Tampering with the database file is in `durability`.)

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const AUDIT_PASSWORD: &str = "audit-pa55word-7c1d";

/// Every audit entry under `query`, following `next_cursor` with pages of `limit`.
async fn all_entries(app: &TestApp, query: &str, limit: usize) -> Vec<Value> {
    let mut entries = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let sep = if query.is_empty() { "" } else { "&" };
        let mut url = format!("/v1/audit-logs?{query}{sep}limit={limit}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = app.get(&url, AUDITOR_TOKEN).await;
        assert_eq!(status, 200, "{url}: {page}");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= limit, "{url}: page longer than limit");
        entries.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return entries,
        }
    }
}

async fn seqs(app: &TestApp, query: &str, limit: usize) -> Vec<i64> {
    all_entries(app, query, limit).await.iter().map(|e| e["seq"].as_i64().expect("seq")).collect()
}

async fn send(app: &TestApp, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = app.request(method, path).bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    read(request.send().await.expect("request")).await
}

#[tokio::test]
async fn writes_are_audited_chained_filterable_and_paged() {
    let app = spawn_app(
        json!([{"id": "file-rule", "method": "GET", "url": "http://127.0.0.1:9/x"}]),
        json!([{"id": "file-policy", "applications": ["a"], "rules": ["file-rule"]}]),
    )
    .await;
    let rule = json!({"id": "r-api", "method": "GET", "url": "http://127.0.0.1:9/check/%username%",
                      "auth": {"type": "basic", "username": "verdict", "password": AUDIT_PASSWORD}});
    let writes = [
        (Method::POST, "/v1/rules", Some(rule.clone()), 201),
        (Method::PUT, "/v1/rules/r-api", Some(merge(&rule, json!({"description": "changed"}))), 200),
        (Method::POST, "/v1/policies", Some(json!({"id": "p-api", "applications": ["b"], "rules": ["r-api"]})), 201),
        (Method::DELETE, "/v1/policies/p-api", None, 204),
    ];
    for (method, path, body, status) in writes {
        let (got, answer) = send(&app, method.clone(), path, body).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
    }

    // 1 file load + 4 API writes, newest first, chained from the genesis hash.
    let entries = all_entries(&app, "", 1000).await;
    let got: Vec<(i64, &str, &str, &str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["seq"].as_i64().unwrap_or_default(),
                e["actor"].as_str().unwrap_or_default(),
                e["action"].as_str().unwrap_or_default(),
                e["object_type"].as_str().unwrap_or_default(),
                e["object_id"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (5, "test-admin", "delete", "policy", "p-api"),
            (4, "test-admin", "create", "policy", "p-api"),
            (3, "test-admin", "update", "rule", "r-api"),
            (2, "test-admin", "create", "rule", "r-api"),
            (1, "file:test.json", "load", "file", "test.json"),
        ]
    );
    let oldest_first: Vec<&Value> = entries.iter().rev().collect();
    assert_eq!(oldest_first[0]["prev_hash"], GENESIS);
    for pair in oldest_first.windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"], "chain link at seq {}", pair[1]["seq"]);
    }
    for e in &entries {
        assert_eq!(e["hash"].as_str().map(str::len), Some(64), "{e}");
        assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "UTC times: {e}");
    }
    // before/after: nothing before a create, nothing after a delete; secrets masked.
    let by_seq = |seq: i64| oldest_first[usize::try_from(seq - 1).unwrap_or_default()];
    assert_eq!((by_seq(2)["before"].clone(), by_seq(2)["after"]["id"].clone()), (Value::Null, json!("r-api")));
    assert_eq!(by_seq(3)["before"]["description"], Value::Null);
    assert_eq!(by_seq(3)["after"]["description"], "changed");
    assert_eq!((by_seq(5)["before"]["id"].clone(), by_seq(5)["after"].clone()), (json!("p-api"), Value::Null));
    assert_eq!(by_seq(2)["after"]["auth"]["password"], "********");
    assert!(!serde_json::to_string(&entries).unwrap_or_default().contains(AUDIT_PASSWORD));

    let (status, verify) = app.get("/v1/audit-logs/verify", AUDITOR_TOKEN).await;
    assert_eq!((status, verify), (200, json!({"ok": true, "entries": 5})));

    // Pages of every size give the same log.
    for limit in [1, 2, 4, 5] {
        assert_eq!(seqs(&app, "", limit).await, vec![5, 4, 3, 2, 1], "limit {limit}");
    }
    let (_, exact) = app.get("/v1/audit-logs?limit=5", AUDITOR_TOKEN).await;
    assert_eq!(exact["next_cursor"], Value::Null, "no cursor to an empty page");

    let cases: Vec<(&str, Vec<i64>)> = vec![
        ("actor=test-admin", vec![5, 4, 3, 2]),
        ("actor=file%3Atest.json", vec![1]),
        ("actor=nobody", vec![]),
        ("action=create", vec![4, 2]),
        ("action=load", vec![1]),
        ("action=delete", vec![5]),
        ("object_type=rule", vec![3, 2]),
        ("object_type=policy", vec![5, 4]),
        ("object_type=file", vec![1]),
        ("object_id=p-api", vec![5, 4]),
        ("object_id=r-api&action=update", vec![3]),
        ("actor=test-admin&object_type=rule&action=create", vec![2]),
    ];
    for (query, expected) in cases {
        assert_eq!(seqs(&app, query, 1).await, expected, "{query}");
    }
    let time = |seq: i64| by_seq(seq)["time"].as_str().unwrap_or_default().replace(':', "%3A");
    assert_eq!(seqs(&app, &format!("since={}", time(3)), 2).await, vec![5, 4, 3]);
    assert_eq!(seqs(&app, &format!("until={}", time(3)), 2).await, vec![2, 1]);
    assert_eq!(seqs(&app, &format!("since={}&until={}", time(2), time(5)), 2).await, vec![4, 3, 2]);
    assert_eq!(seqs(&app, &format!("since={}&actor=test-admin&action=create", time(3)), 2).await, vec![4]);
}

#[tokio::test]
async fn malformed_audit_queries_are_400_naming_the_parameter() {
    let app = spawn_app(json!([]), json!([{"id": "p", "applications": ["a"], "rules": []}])).await;
    for _ in 0..2 {
        app.decision(json!({"application": "a"})).await;
    }
    let (_, activity) = app.get("/v1/activity-logs?limit=1", AUDITOR_TOKEN).await;
    let activity_cursor = activity["next_cursor"].as_str().expect("activity cursor").to_owned();
    let cases: Vec<(String, &str)> = vec![
        ("since=last-week".into(), "since"),
        ("until=2025-01-01T25:00:00Z".into(), "until"),
        ("action=obliterate".into(), "action"),
        ("object_type=widget".into(), "object_type"),
        ("limit=0".into(), "limit"),
        ("limit=1001".into(), "limit"),
        ("limit=".into(), "limit"),
        ("cursor=%%%".into(), "cursor"),
        ("cursor=bm90LWEtY3Vyc29y".into(), "cursor"),
        (format!("cursor={activity_cursor}"), "cursor"),
        ("who=me".into(), "who"),
        ("actor=a&actor=b".into(), "actor"),
    ];
    for (query, field) in &cases {
        let (status, body) = app.get(&format!("/v1/audit-logs?{query}"), AUDITOR_TOKEN).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["details"][0]["field"], *field, "{query}: {body}");
        assert!(body["error"]["message"].as_str().unwrap_or_default().contains(&format!("`{field}`")), "{body}");
    }
}

#[tokio::test]
async fn only_auditors_and_admins_read_and_verify_the_audit_log() {
    let app = spawn_app(json!([]), json!([])).await;
    for path in ["/v1/audit-logs", "/v1/audit-logs/verify"] {
        for (token, status) in [(AUDITOR_TOKEN, 200), (ADMIN_TOKEN, 200), (PROXY_TOKEN, 403), ("nope", 401)] {
            let (got, body) = app.get(path, token).await;
            assert_eq!(got, status, "{path} with {token}: {body}");
        }
        let resp = app.request(Method::GET, path).send().await.expect("request");
        assert_eq!(resp.status().as_u16(), 401, "{path} without a token");
    }
}

/// `base` with the fields of `overlay` set.
fn merge(base: &Value, overlay: Value) -> Value {
    let mut out = base.clone();
    if let (Some(out), Value::Object(overlay)) = (out.as_object_mut(), overlay) {
        out.extend(overlay);
    }
    out
}
