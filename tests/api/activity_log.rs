//! `GET /v1/activity-logs`: one entry per decision from `/v1/decisions` (`via: api`) and
//! `/v1/forward-auth` (`via: forward-auth`), with the reason and per-rule results;
//! filters, pagination and the errors of a malformed query.

use reqwest::Method;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

/// A device-posture API and an HR API with fixed answers.
async fn apis() -> MockServer {
    let api = MockServer::start().await;
    for (p, body) in [
        ("/posture/dev-ok", json!({"status": "compliant"})),
        ("/posture/dev-bad", json!({"status": "noncompliant"})),
        ("/hr/alice", json!({"status": "active"})),
        ("/hr/carol", json!({"status": "terminated"})),
    ] {
        Mock::given(method("GET"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&api)
            .await;
    }
    api
}

/// `payroll` is covered by the posture rule alone and `wiki` by the HR rule alone, so
/// every decision's `rules` is known in advance.
async fn app_with_rules(api: &MockServer) -> TestApp {
    spawn_app(
        json!([
            {"id": "posture", "method": "GET", "url": format!("{}/posture/%device_id%", api.uri()),
             "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]},
            {"id": "hr", "method": "GET", "url": format!("{}/hr/%username%", api.uri()),
             "response_actions": [{"type": "equals", "key": "status", "value": "active"}]},
        ]),
        json!([
            {"id": "payroll-access", "applications": ["payroll"], "rules": ["posture"]},
            {"id": "wiki-access", "applications": ["wiki"], "rules": ["hr"]},
        ]),
    )
    .await
}

/// A forward-auth request; returns the status and the `X-Verdict-Decision-Id`.
async fn forward_auth(app: &TestApp, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = app.request(Method::GET, "/v1/forward-auth").bearer_auth(PROXY_TOKEN);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let resp = request.send().await.expect("forward-auth request");
    let id = resp
        .headers()
        .get("X-Verdict-Decision-Id")
        .and_then(|v| v.to_str().ok())
        .expect("X-Verdict-Decision-Id header")
        .to_owned();
    (resp.status().as_u16(), id)
}

/// Every decision id of the activity log under `query`, following `next_cursor`.
async fn all_ids(app: &TestApp, query: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let sep = if query.is_empty() { "" } else { "&" };
        let mut url = format!("/v1/activity-logs?{query}{sep}limit={limit}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = app.get(&url, AUDITOR_TOKEN).await;
        assert_eq!(status, 200, "{url}: {page}");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= limit, "{url}: page longer than limit");
        ids.extend(items.iter().map(|e| e["decision_id"].as_str().expect("decision_id").to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert!(!items.is_empty(), "{url}: a cursor after an empty page");
                cursor = Some(c.to_owned());
            }
            None => return ids,
        }
    }
}

fn ids(list: &[&String]) -> Vec<String> {
    list.iter().map(|s| (*s).clone()).collect()
}

#[tokio::test]
async fn decisions_from_both_entry_points_are_logged_with_filters_and_pages() {
    let api = apis().await;
    let app = app_with_rules(&api).await;

    // Six decisions, one after the other, so their order in the log is known.
    let d1 = app.decision(json!({"application": "payroll", "username": "alice", "device_id": "dev-ok"})).await;
    let d2 = app
        .decision(json!({"application": "payroll", "username": "bob", "device_id": "dev-bad", "remote_ip": "10.1.2.3"}))
        .await;
    let (s3, id3) = forward_auth(
        &app,
        &[("X-Verdict-Application", "wiki"), ("X-Forwarded-User", "alice"), ("X-Real-IP", "192.0.2.7")],
    )
    .await;
    let (s4, id4) = forward_auth(
        &app,
        &[("X-Verdict-Application", "payroll"), ("X-Forwarded-User", "carol"), ("X-Device-Id", "dev-bad")],
    )
    .await;
    let d5 = app.decision(json!({"application": "wiki", "username": "carol"})).await;
    let (s6, id6) = forward_auth(&app, &[("X-Verdict-Application", "crm"), ("X-Forwarded-User", "bob")]).await;
    assert_eq!(
        (d1["decision"].as_str(), d2["decision"].as_str(), d5["decision"].as_str()),
        (Some("allow"), Some("deny"), Some("deny"))
    );
    assert_eq!((s3, s4, s6), (200, 403, 403));
    let id = |d: &Value| d["decision_id"].as_str().expect("decision_id").to_owned();
    let (id1, id2, id5) = (id(&d1), id(&d2), id(&d5));

    // Newest first, whole pages and a last partial one.
    let newest_first = ids(&[&id6, &id5, &id4, &id3, &id2, &id1]);
    assert_eq!(all_ids(&app, "", 2).await, newest_first);
    assert_eq!(all_ids(&app, "", 4).await, newest_first);
    assert_eq!(all_ids(&app, "", 1000).await, newest_first);
    let (_, first) = app.get("/v1/activity-logs", AUDITOR_TOKEN).await;
    assert_eq!(first["next_cursor"], Value::Null, "everything fits the default page");

    // The entries: `via`, who, what, and the answer's reason and per-rule results.
    let items = first["items"].as_array().expect("items").clone();
    let entry = |id: &str| items.iter().find(|e| e["decision_id"] == id).expect("entry").clone();
    for (d, via) in [(&d1, "api"), (&d2, "api"), (&d5, "api")] {
        let e = entry(d["decision_id"].as_str().unwrap_or_default());
        assert_eq!(e["via"], via);
        for field in ["decision", "reason", "policies", "rules", "latency_ms"] {
            assert_eq!(e[field], d[field], "`{field}` of the entry differs from the answer");
        }
    }
    let e2 = entry(&id2);
    assert_eq!(
        (e2["application"].as_str(), e2["username"].as_str(), e2["device_id"].as_str(), e2["remote_ip"].as_str()),
        (Some("payroll"), Some("bob"), Some("dev-bad"), Some("10.1.2.3"))
    );
    assert_eq!(e2["rules"][0]["rule_id"], "posture");
    assert_eq!(e2["rules"][0]["outcome"], "deny");
    assert_eq!(e2["rules"][0]["http_status"], 200);
    assert!(e2["reason"].as_str().unwrap_or_default().contains("noncompliant"), "{e2}");

    let e3 = entry(&id3);
    assert_eq!(e3["via"], "forward-auth");
    assert_eq!(
        (e3["application"].as_str(), e3["username"].as_str(), e3["remote_ip"].as_str(), e3["decision"].as_str()),
        (Some("wiki"), Some("alice"), Some("192.0.2.7"), Some("allow"))
    );
    assert_eq!(e3["rules"][0]["rule_id"], "hr");
    assert_eq!(e3["rules"][0]["outcome"], "allow");
    let e4 = entry(&id4);
    assert_eq!((e4["via"].as_str(), e4["decision"].as_str()), (Some("forward-auth"), Some("deny")));
    assert_eq!((e4["device_id"].as_str(), e4["rules"][0]["rule_id"].as_str()), (Some("dev-bad"), Some("posture")));
    let e6 = entry(&id6);
    assert_eq!(e6["rules"], json!([]), "no policy covers crm: no rule ran");
    assert_eq!(e6["reason"], "no policy matches application `crm` for this user");

    // Each filter, alone and combined, through pages of two.
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("decision=deny", ids(&[&id6, &id5, &id4, &id2])),
        ("decision=allow", ids(&[&id3, &id1])),
        ("username=alice", ids(&[&id3, &id1])),
        ("username=carol", ids(&[&id5, &id4])),
        ("username=nobody", vec![]),
        ("application=payroll", ids(&[&id4, &id2, &id1])),
        ("application=wiki", ids(&[&id5, &id3])),
        ("rule_id=posture", ids(&[&id4, &id2, &id1])),
        ("rule_id=hr", ids(&[&id5, &id3])),
        ("rule_id=unknown-rule", vec![]),
        ("rule_id=posture&decision=deny", ids(&[&id4, &id2])),
        ("rule_id=posture&decision=deny&username=carol", ids(&[&id4])),
        ("application=wiki&username=alice", ids(&[&id3])),
    ];
    for (query, expected) in &cases {
        assert_eq!(&all_ids(&app, query, 2).await, expected, "{query}");
    }

    // since is inclusive, until exclusive.
    let time = |id: &str| urlencode(entry(id)["time"].as_str().expect("time"));
    let (t3, t5) = (time(&id3), time(&id5));
    assert_eq!(all_ids(&app, &format!("since={t3}"), 2).await, ids(&[&id6, &id5, &id4, &id3]));
    assert_eq!(all_ids(&app, &format!("until={t3}"), 2).await, ids(&[&id2, &id1]));
    assert_eq!(all_ids(&app, &format!("since={t3}&until={t5}"), 2).await, ids(&[&id4, &id3]));
    assert_eq!(all_ids(&app, &format!("since={t3}&until={t5}&decision=deny"), 2).await, ids(&[&id4]));
    // An offset other than Z means the same instant.
    let t3_plus_two = entry(&id3)["time"].as_str().map(shift_to_plus_two).expect("time");
    assert_eq!(all_ids(&app, &format!("since={}", urlencode(&t3_plus_two)), 10).await, ids(&[&id6, &id5, &id4, &id3]));
}

#[tokio::test]
async fn malformed_queries_are_400_naming_the_parameter() {
    let app = spawn_app(json!([]), json!([{"id": "p", "applications": ["a"], "rules": []}])).await;
    for _ in 0..3 {
        app.decision(json!({"application": "a"})).await;
    }
    let audit_cursor = {
        // A cursor handed out by the audit log is not one of this listing's.
        app.state
            .store
            .commit(
                vec![],
                (0..2)
                    .map(|i| verdict::store::AuditDraft {
                        actor: "x".into(),
                        action: verdict::store::AuditAction::Create,
                        object_type: "rule".into(),
                        object_id: format!("r{i}"),
                        before: None,
                        after: None,
                    })
                    .collect(),
            )
            .await
            .expect("commit");
        let (_, page) = app.get("/v1/audit-logs?limit=1", AUDITOR_TOKEN).await;
        page["next_cursor"].as_str().expect("audit cursor").to_owned()
    };
    let cases: Vec<(String, &str)> = vec![
        ("since=yesterday".into(), "since"),
        ("until=2025-13-01T00:00:00Z".into(), "until"),
        ("since=2025-01-01".into(), "since"),
        ("limit=0".into(), "limit"),
        ("limit=1001".into(), "limit"),
        ("limit=ten".into(), "limit"),
        ("limit=-1".into(), "limit"),
        ("cursor=not-a-cursor".into(), "cursor"),
        (format!("cursor={audit_cursor}"), "cursor"),
        ("decision=maybe".into(), "decision"),
        ("user=alice".into(), "user"),
        ("username=".into(), "username"),
        ("username=a&username=b".into(), "username"),
    ];
    for (query, field) in &cases {
        let (status, body) = app.get(&format!("/v1/activity-logs?{query}"), AUDITOR_TOKEN).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{query}: {body}");
        assert_eq!(body["error"]["details"][0]["field"], *field, "{query}: {body}");
        assert!(body["error"]["message"].as_str().unwrap_or_default().contains(&format!("`{field}`")), "{body}");
    }
    // The largest page is fine, and so is a cursor from this listing.
    let (status, page) = app.get("/v1/activity-logs?limit=1000", AUDITOR_TOKEN).await;
    assert_eq!((status, page["items"].as_array().map(Vec::len)), (200, Some(3)));
    let (_, page) = app.get("/v1/activity-logs?limit=2", AUDITOR_TOKEN).await;
    let cursor = page["next_cursor"].as_str().expect("cursor");
    let (status, rest) = app.get(&format!("/v1/activity-logs?limit=2&cursor={cursor}"), AUDITOR_TOKEN).await;
    assert_eq!((status, rest["items"].as_array().map(Vec::len)), (200, Some(1)));
}

#[tokio::test]
async fn only_auditors_and_admins_read_the_activity_log() {
    let app = spawn_app(json!([]), json!([])).await;
    app.decision(json!({"application": "a"})).await;
    for (token, status) in [(AUDITOR_TOKEN, 200), (ADMIN_TOKEN, 200), (PROXY_TOKEN, 403), ("wrong-token", 401)] {
        let (got, body) = app.get("/v1/activity-logs", token).await;
        assert_eq!(got, status, "{body}");
    }
    let resp = app.request(Method::GET, "/v1/activity-logs").send().await.expect("request");
    assert_eq!(resp.status().as_u16(), 401);
}

/// Percent-encodes what a query value may not hold as is (`+` and `:`).
fn urlencode(s: &str) -> String {
    s.replace('%', "%25").replace('+', "%2B").replace(':', "%3A")
}

/// `2025-01-31T10:00:00.000001Z` as the same instant written with a `+02:00` offset.
fn shift_to_plus_two(t: &str) -> String {
    let parsed = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).expect("rfc 3339");
    let shifted = parsed.to_offset(time::macros::offset!(+2));
    shifted.format(&time::format_description::well_known::Rfc3339).expect("format")
}
