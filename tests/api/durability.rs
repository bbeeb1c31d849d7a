//! What survives the process: the real `verdict` binary is killed (`kill -9`), stopped
//! with SIGTERM/SIGINT while decisions are in flight, or restarted, on one data
//! directory; then the logs are read back over HTTP from the next process.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{read, ADMIN_TOKEN, AUDITOR_TOKEN, PROXY_TOKEN};
use crate::tools::{write_file, Binary, BinaryOptions};

/// Tokens for every role, plus `extra_env` (e.g. `VERDICT_ACTIVITY_RETENTION_DAYS`, the
/// variable of `--activity-retention-days`).
fn options<'a>(dir: &'a Path, run_name: &'a str, extra_env: &[(&'a str, &str)]) -> BinaryOptions<'a> {
    let mut env = vec![
        ("VERDICT_PROXY_TOKEN", PROXY_TOKEN.to_owned()),
        ("VERDICT_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("VERDICT_AUDITOR_TOKEN", AUDITOR_TOKEN.to_owned()),
    ];
    env.extend(extra_env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    BinaryOptions { dir, env, run_name }
}

async fn start(dir: &Path, run_name: &str) -> Binary {
    Binary::start(options(dir, run_name, &[])).await
}

/// A posture API: `dev-ok` is compliant, `dev-bad` is not; answers after `delay`.
async fn posture_api(delay: Duration) -> MockServer {
    let api = MockServer::start().await;
    for (device, status) in [("dev-ok", "compliant"), ("dev-bad", "noncompliant")] {
        Mock::given(method("GET"))
            .and(path(format!("/devices/{device}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": status})).set_delay(delay))
            .mount(&api)
            .await;
    }
    api
}

/// `payroll` needs the posture rule; `wiki` has a policy without rules (always allow).
fn write_policies(dir: &Path, api: &MockServer) {
    write_file(
        dir,
        "access.json",
        json!([{"id": "posture", "method": "GET", "url": format!("{}/devices/%device_id%", api.uri()),
                "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]}]),
        json!([
            {"id": "payroll-access", "applications": ["payroll"], "rules": ["posture"]},
            {"id": "wiki-open", "applications": ["wiki"], "rules": []},
        ]),
    );
}

/// The `i`-th test context: a third open wiki (allow), a third compliant (allow), a
/// third noncompliant (deny).
fn context(i: usize) -> Value {
    match i % 3 {
        0 => json!({"application": "wiki", "username": format!("user-{i}")}),
        1 => json!({"application": "payroll", "username": format!("user-{i}"), "device_id": "dev-ok"}),
        _ => json!({"application": "payroll", "username": format!("user-{i}"), "device_id": "dev-bad"}),
    }
}

/// Sends `n` decisions at once; each task answers (status, body).
fn send_concurrently(bin: &Binary, n: usize) -> Vec<tokio::task::JoinHandle<(u16, Value)>> {
    (0..n)
        .map(|i| {
            let client = bin.client.clone();
            let url = format!("{}/v1/decisions", bin.address);
            tokio::spawn(async move {
                let resp = client.post(url).bearer_auth(PROXY_TOKEN).json(&context(i)).send().await.expect("decision");
                read(resp).await
            })
        })
        .collect()
}

/// Waits for every answer; each must be a 200 decision. Returns the decision ids and
/// how many were allow and deny.
async fn answered_ids(tasks: Vec<tokio::task::JoinHandle<(u16, Value)>>) -> (Vec<String>, usize, usize) {
    let mut ids = Vec::new();
    let (mut allow, mut deny) = (0, 0);
    for task in tasks {
        let (status, body) = task.await.expect("decision task");
        assert_eq!(status, 200, "{body}");
        match body["decision"].as_str() {
            Some("allow") => allow += 1,
            Some("deny") => deny += 1,
            other => panic!("unexpected decision {other:?}: {body}"),
        }
        ids.push(body["decision_id"].as_str().expect("decision_id").to_owned());
    }
    (ids, allow, deny)
}

/// GET with the auditor token.
async fn get(bin: &Binary, path: &str) -> (u16, Value) {
    let resp = bin.client.get(format!("{}{path}", bin.address)).bearer_auth(AUDITOR_TOKEN).send().await.expect("GET");
    read(resp).await
}

/// Every item of a log listing (`/v1/activity-logs` or `/v1/audit-logs`), all pages.
async fn whole_log(bin: &Binary, log: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut url = format!("{log}?limit=1000");
    loop {
        let (status, page) = get(bin, &url).await;
        assert_eq!(status, 200, "{url}: {page}");
        items.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => url = format!("{log}?limit=1000&cursor={c}"),
            None => return items,
        }
    }
}

/// Waits (bounded) for the process to exit and returns its status.
async fn wait_exit(bin: &mut Binary) -> std::process::ExitStatus {
    for _ in 0..600 {
        if let Some(status) = bin.child.try_wait().expect("try_wait") {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("verdict did not exit within 30 s; stderr:\n{}", bin.stderr_text());
}

fn assert_all_logged(logged: &[Value], answered: &[String]) {
    let logged_ids: HashSet<&str> = logged.iter().filter_map(|e| e["decision_id"].as_str()).collect();
    assert_eq!(logged.len(), logged_ids.len(), "a decision is logged twice");
    let missing: Vec<&String> = answered.iter().filter(|id| !logged_ids.contains(id.as_str())).collect();
    assert!(missing.is_empty(), "{} answered decisions are not in the activity log: {missing:?}", missing.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_decision_survives_kill_9_right_after_the_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = posture_api(Duration::ZERO).await;
    write_policies(dir.path(), &api);
    let mut bin = start(dir.path(), "first").await;

    let (answered, allow, deny) = answered_ids(send_concurrently(&bin, 300)).await;
    // SIGKILL the moment the last answer is in: nothing gets a chance to flush.
    bin.child.kill().expect("kill -9");
    bin.child.wait().expect("wait");
    assert_eq!(answered.len(), 300);
    assert!(allow > 0 && deny > 0, "allow {allow}, deny {deny}");

    let bin = start(dir.path(), "second").await;
    let logged = whole_log(&bin, "/v1/activity-logs").await;
    assert_eq!(logged.len(), answered.len(), "exactly one activity entry per answered decision");
    assert_all_logged(&logged, &answered);
    let logged_deny = logged.iter().filter(|e| e["decision"] == "deny").count();
    assert_eq!(logged_deny, deny);
}

/// Decisions in flight when the signal arrives are finished and logged, and the
/// process exits 0.
async fn stops_gracefully_on(signal: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = posture_api(Duration::from_millis(300)).await;
    write_policies(dir.path(), &api);
    let mut bin = start(dir.path(), "first").await;

    // Only payroll decisions call the slow API; wait until all of them are waiting on it.
    let n = 12;
    let tasks: Vec<_> = send_concurrently(&bin, n * 3).into_iter().collect();
    let calling_api = 2 * n;
    for _ in 0..600 {
        if api.received_requests().await.map_or(0, |r| r.len()) >= calling_api {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(api.received_requests().await.map_or(0, |r| r.len()), calling_api, "decisions in flight");
    bin.signal(signal);

    let (answered, _, deny) = answered_ids(tasks).await;
    assert_eq!(answered.len(), n * 3);
    assert_eq!(deny, n);
    let status = wait_exit(&mut bin).await;
    assert!(status.success(), "verdict exited with {status} after SIG{signal}; stderr:\n{}", bin.stderr_text());

    let bin = start(dir.path(), "second").await;
    let logged = whole_log(&bin, "/v1/activity-logs").await;
    assert_eq!(logged.len(), answered.len());
    assert_all_logged(&logged, &answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_decisions_in_flight_flushes_and_exits_0() {
    stops_gracefully_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_finishes_decisions_in_flight_flushes_and_exits_0() {
    stops_gracefully_on("INT").await;
}

async fn admin_post(bin: &Binary, path: &str, body: Value) {
    let resp = bin
        .client
        .post(format!("{}{path}", bin.address))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("POST");
    let (status, answer) = read(resp).await;
    assert_eq!(status, 201, "POST {path}: {answer}");
}

async fn stop(bin: &mut Binary) {
    bin.signal("TERM");
    let status = wait_exit(bin).await;
    assert!(status.success(), "verdict exited with {status}; stderr:\n{}", bin.stderr_text());
}

#[tokio::test]
async fn verify_finds_an_audit_entry_changed_in_the_database_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = posture_api(Duration::ZERO).await;
    write_policies(dir.path(), &api);
    let mut bin = start(dir.path(), "first").await;
    // seq 1 is the policy file load; 2..=4 are API writes.
    admin_post(&bin, "/v1/rules", json!({"id": "r-1", "method": "GET", "url": format!("{}/r1", api.uri())})).await;
    admin_post(&bin, "/v1/rules", json!({"id": "r-2", "method": "GET", "url": format!("{}/r2", api.uri())})).await;
    admin_post(&bin, "/v1/policies", json!({"id": "p-1", "applications": ["crm"], "rules": ["r-1", "r-2"]})).await;
    let (status, verify) = get(&bin, "/v1/audit-logs/verify").await;
    assert_eq!((status, verify), (200, json!({"ok": true, "entries": 4})));
    let before = whole_log(&bin, "/v1/audit-logs").await;
    assert_eq!(
        before.iter().map(|e| e["seq"].clone()).collect::<Vec<_>>(),
        vec![json!(4), json!(3), json!(2), json!(1)]
    );
    assert_eq!(before[1]["object_id"], "r-2");
    stop(&mut bin).await;

    // Someone with access to the database rewrites who created rule r-2: in the SQLite
    // file, or with SQL in the PostgreSQL database under the switch.
    let tamper = "UPDATE audit SET actor = 'someone-else' WHERE seq = 3";
    if let Some(url) = crate::helpers::test_database_url(dir.path()) {
        let db = crate::helpers::pg_connect(&url).await;
        assert_eq!(db.execute(tamper, &[]).await.expect("tamper"), 1);
    } else {
        let db = rusqlite::Connection::open(dir.path().join("data").join("verdict.db")).expect("open verdict.db");
        assert_eq!(db.execute(tamper, []).expect("tamper"), 1);
    }

    let bin = start(dir.path(), "second").await;
    let (status, verify) = get(&bin, "/v1/audit-logs/verify").await;
    assert_eq!(status, 200, "{verify}");
    assert_eq!(verify["ok"], false, "{verify}");
    assert_eq!(verify["seq"], 3, "{verify}");
    assert_eq!(verify["entries_checked"], 2, "{verify}");
    // The listing still shows what the file holds; verify is what tells it is wrong.
    let after = whole_log(&bin, "/v1/audit-logs").await;
    assert_eq!(after.len(), 4, "a restart on unchanged policy files adds no entry");
    assert_eq!(after[1]["actor"], "someone-else");
}

#[tokio::test]
async fn a_restart_keeps_the_audit_and_activity_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = posture_api(Duration::ZERO).await;
    write_policies(dir.path(), &api);
    let mut bin = start(dir.path(), "first").await;
    admin_post(&bin, "/v1/rules", json!({"id": "r-1", "method": "GET", "url": format!("{}/r1", api.uri())})).await;
    let (answered, _, _) = answered_ids(send_concurrently(&bin, 9)).await;
    let audit = whole_log(&bin, "/v1/audit-logs").await;
    let activity = whole_log(&bin, "/v1/activity-logs").await;
    assert_eq!((audit.len(), activity.len()), (2, 9));
    stop(&mut bin).await;

    let bin = start(dir.path(), "second").await;
    assert_eq!(whole_log(&bin, "/v1/audit-logs").await, audit);
    assert_eq!(whole_log(&bin, "/v1/activity-logs").await, activity);
    assert_all_logged(&activity, &answered);
    let (_, verify) = get(&bin, "/v1/audit-logs/verify").await;
    assert_eq!(verify, json!({"ok": true, "entries": 2}));

    // And the new process appends to the same logs.
    let (status, _) = bin.decide(PROXY_TOKEN, &context(0)).await;
    assert_eq!(status, 200);
    assert_eq!(whole_log(&bin, "/v1/activity-logs").await.len(), 10);
}

#[tokio::test]
async fn activity_retention_prunes_entries_older_than_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Entries 60, 40 and 0 days old, written before verdict starts (into the SQLite
    // file, or the PostgreSQL database under the switch).
    {
        let store = crate::helpers::open_test_store(dir.path()).await;
        let now = time::OffsetDateTime::now_utc();
        let entries: Vec<verdict::store::ActivityEntry> = [("old-60", 60), ("old-40", 40), ("fresh", 0)]
            .into_iter()
            .map(|(id, days)| verdict::store::ActivityEntry {
                decision_id: id.into(),
                time: verdict::store::format_time(now - time::Duration::days(days)),
                application: "wiki".into(),
                username: None,
                remote_ip: None,
                device_id: None,
                decision: "allow".into(),
                reason: "policy wiki-open allowed: no enabled rules".into(),
                policies: json!([]),
                rules: json!([]),
                latency_ms: 0.1,
                via: "api".into(),
                replica: "test".into(),
                outbox: Vec::new(),
            })
            .collect();
        store.insert_activity(&entries).await.expect("insert");
    }

    // Keep 50 days: the 60-day-old entry goes at start, the 40-day-old one stays.
    let bin = Binary::start(options(dir.path(), "retention", &[("VERDICT_ACTIVITY_RETENTION_DAYS", "50")])).await;
    let mut left = Vec::new();
    for _ in 0..400 {
        left = whole_log(&bin, "/v1/activity-logs").await;
        if left.len() < 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<&str> = left.iter().filter_map(|e| e["decision_id"].as_str()).collect();
    assert_eq!(ids, vec!["fresh", "old-40"]);
}
