//! Several replicas on one PostgreSQL database (SPEC §9, issue #7): real `verdict`
//! processes named `a`, `b` (and `c`) share a fresh database of their own on the server
//! of `VERDICT_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432`), in
//! both passes of the suite. Changes propagate, the audit chain stays one, activity is
//! shared, file loads are audited once per content, migrations run once, and when the
//! database goes away (a TCP proxy the test cuts) decisions go on and their activity
//! entries arrive later, exactly once.
//!
//! Waits are bounded polls, never timing assertions; the 1 s bound on propagation and
//! the 2 s bound on a 503 are the SPEC's.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{
    create_database, pg_connect, pg_server_or_default, read, ADMIN_TOKEN, AUDITOR_TOKEN, PROXY_TOKEN,
};
use crate::tools::{write_file, Binary, BinaryOptions, PgProxy};

/// The SPEC's bound on a change reaching every replica.
const PROPAGATION: Duration = Duration::from_secs(1);

/// Shared by the replicas so that each can read the secrets the others stored.
const SECRET_KEY: &str = "replicas-test-secret-passphrase";

/// A fresh database on the test server; returns (server URL, database name, its URL).
fn fresh_database() -> (String, String, String) {
    let server = pg_server_or_default();
    let url = create_database(&server);
    let name = url::Url::parse(&url).expect("url").path().trim_start_matches('/').to_string();
    (server, name, url)
}

/// Starts replica `name` on `database_url` with `dir/data` and `dir/policies`.
async fn replica(dir: &Path, name: &str, database_url: &str, run_name: &str) -> Binary {
    Binary::start(BinaryOptions {
        dir,
        env: vec![
            ("VERDICT_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("VERDICT_PROXY_TOKEN", PROXY_TOKEN.to_string()),
            ("VERDICT_AUDITOR_TOKEN", AUDITOR_TOKEN.to_string()),
            ("VERDICT_DATABASE_URL", database_url.to_string()),
            ("VERDICT_REPLICA_NAME", name.to_string()),
            ("VERDICT_SECRET_KEY", SECRET_KEY.to_string()),
        ],
        run_name,
    })
    .await
}

/// Two replicas `a` and `b`, each with a directory of its own, on one fresh database.
struct Pair {
    a: Binary,
    b: Binary,
    database: String,
    database_url: String,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn pair() -> Pair {
    let (_, database, database_url) = fresh_database();
    let (da, db) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let (a, b) = tokio::join!(replica(da.path(), "a", &database_url, "a"), replica(db.path(), "b", &database_url, "b"));
    Pair { a, b, database, database_url, _dirs: (da, db) }
}

/// Any request with a token and an optional JSON body.
async fn call(bin: &Binary, method: Method, path: &str, token: &str, body: Option<&Value>) -> (u16, Value) {
    let mut request = bin.client.request(method, format!("{}{path}", bin.address)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(body);
    }
    read(request.send().await.expect("request to verdict")).await
}

async fn admin(bin: &Binary, method: Method, path: &str, body: Option<&Value>, expect: u16) -> Value {
    let (status, answer) = call(bin, method.clone(), path, ADMIN_TOKEN, body).await;
    assert_eq!(status, expect, "{method} {path}: {answer}");
    answer
}

async fn decision(bin: &Binary, context: &Value) -> Value {
    let (status, answer) = bin.decide(PROXY_TOKEN, context).await;
    assert_eq!(status, 200, "decision on {}: {answer}", bin.address);
    answer
}

/// Asks `bin` for decisions until `holds` accepts one or `within` has passed; returns
/// whether it held, and the last answer.
async fn decide_until(
    bin: &Binary,
    context: &Value,
    within: Duration,
    holds: impl Fn(&Value) -> bool,
) -> (bool, Value) {
    let started = Instant::now();
    loop {
        let answer = decision(bin, context).await;
        if holds(&answer) {
            return (true, answer);
        }
        if started.elapsed() > within {
            return (false, answer);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`decide_until`] for a GET: polls until the status is `status`.
async fn get_until(bin: &Binary, path: &str, status: u16, within: Duration) -> (bool, Value) {
    let started = Instant::now();
    loop {
        let (got, body) = call(bin, Method::GET, path, AUDITOR_TOKEN, None).await;
        if got == status {
            return (true, body);
        }
        if started.elapsed() > within {
            return (false, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every item of a list endpoint, following cursors.
async fn whole_list(bin: &Binary, path: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let page = match &cursor {
            Some(c) => format!("{path}{sep}limit=1000&cursor={c}"),
            None => format!("{path}{sep}limit=1000"),
        };
        let (status, body) = call(bin, Method::GET, &page, AUDITOR_TOKEN, None).await;
        assert_eq!(status, 200, "GET {page}: {body}");
        items.extend(body["items"].as_array().expect("items").iter().cloned());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return items,
        }
    }
}

/// No policy covers the request (reason `no policy matches …`).
fn no_policy(answer: &Value) -> bool {
    answer["policies"] == json!([]) && answer["reason"].as_str().is_some_and(|r| r.starts_with("no policy matches"))
}

fn policy_ids(answer: &Value) -> Vec<&str> {
    answer["policies"].as_array().map(|ps| ps.iter().filter_map(|p| p["id"].as_str()).collect()).unwrap_or_default()
}

async fn posture_api() -> MockServer {
    let api = MockServer::start().await;
    for (p, status) in [("/ok", "compliant"), ("/bad", "noncompliant")] {
        Mock::given(method("GET"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": status})))
            .mount(&api)
            .await;
    }
    api
}

fn posture_rule(id: &str, url: String) -> Value {
    json!({"id": id, "method": "GET", "url": url,
           "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_policies_changed_through_a_decide_on_b_within_a_second() {
    let api = posture_api().await;
    let p = pair().await;
    let crm = json!({"application": "crm", "username": "alice"});
    let erp = json!({"application": "erp", "username": "alice"});
    let before = decision(&p.b, &crm).await;
    assert!(before["decision"] == "deny" && no_policy(&before), "{before}");

    // Created through A.
    let rule =
        admin(&p.a, Method::POST, "/v1/rules", Some(&posture_rule("r-1", format!("{}/ok", api.uri()))), 201).await;
    let policy = json!({"id": "p-1", "applications": ["crm"], "rules": ["r-1"]});
    admin(&p.a, Method::POST, "/v1/policies", Some(&policy), 201).await;
    let (held, answer) =
        decide_until(&p.b, &crm, PROPAGATION, |a| a["decision"] == "allow" && policy_ids(a) == ["p-1"]).await;
    assert!(held, "B does not allow through p-1 within 1 s of its creation on A: {answer}");
    assert_eq!(answer["rules"][0]["rule_id"], "r-1", "{answer}");
    let (_, on_b) = call(&p.b, Method::GET, "/v1/rules/r-1", AUDITOR_TOKEN, None).await;
    assert_eq!(on_b, rule, "B serves the rule as A stored it");

    // The rule changed through A.
    let mut changed = rule.clone();
    changed["url"] = json!(format!("{}/bad", api.uri()));
    admin(&p.a, Method::PUT, "/v1/rules/r-1", Some(&changed), 200).await;
    let (held, answer) = decide_until(&p.b, &crm, PROPAGATION, |a| a["decision"] == "deny").await;
    assert!(held, "B still allows within 1 s of the rule's change on A: {answer}");
    assert_eq!(
        answer["reason"], "policy p-1: rule r-1 denied: $.status is \"noncompliant\", expected equals \"compliant\"",
        "{answer}"
    );

    // The policy changed through A: it now covers erp instead of crm.
    let moved = json!({"id": "p-1", "applications": ["erp"], "rules": ["r-1"]});
    admin(&p.a, Method::PUT, "/v1/policies/p-1", Some(&moved), 200).await;
    let (held, answer) = decide_until(&p.b, &erp, PROPAGATION, |a| policy_ids(a) == ["p-1"]).await;
    assert!(held, "p-1 does not cover erp on B within 1 s of its change on A: {answer}");
    assert_eq!(answer["decision"], "deny", "{answer}");
    let now = decision(&p.b, &crm).await;
    assert!(no_policy(&now), "{now}");

    // Both deleted through A.
    admin(&p.a, Method::DELETE, "/v1/policies/p-1", None, 204).await;
    admin(&p.a, Method::DELETE, "/v1/rules/r-1", None, 204).await;
    let (held, answer) = decide_until(&p.b, &erp, PROPAGATION, no_policy).await;
    assert!(held, "B still applies p-1 within 1 s of its deletion on A: {answer}");
    let (gone, body) = get_until(&p.b, "/v1/rules/r-1", 404, PROPAGATION).await;
    assert!(gone, "B still has rule r-1 within 1 s of its deletion on A: {body}");
    let (_, rules) = call(&p.b, Method::GET, "/v1/rules", AUDITOR_TOKEN, None).await;
    assert_eq!(rules["items"], json!([]), "{rules}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_a_drops_outcomes_cached_on_b() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/cached"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "compliant"})))
        .mount(&api)
        .await;
    let p = pair().await;
    let mut rule = posture_rule("r-cached", format!("{}/cached", api.uri()));
    rule["cache_ttl_s"] = json!(3600);
    let rule = admin(&p.a, Method::POST, "/v1/rules", Some(&rule), 201).await;
    let policy = json!({"id": "p-cached", "applications": ["cached"], "rules": ["r-cached"]});
    admin(&p.a, Method::POST, "/v1/policies", Some(&policy), 201).await;
    let ctx = json!({"application": "cached", "username": "alice"});
    let (held, answer) = decide_until(&p.b, &ctx, PROPAGATION, |a| a["decision"] == "allow").await;
    assert!(held, "B does not allow within 1 s: {answer}");
    let cached = decision(&p.b, &ctx).await;
    assert_eq!((&cached["decision"], &cached["rules"][0]["cached"]), (&json!("allow"), &json!(true)), "{cached}");

    // The API changes its mind; B keeps answering from its cache...
    api.reset().await;
    Mock::given(method("GET"))
        .and(path("/cached"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "noncompliant"})))
        .mount(&api)
        .await;
    let still = decision(&p.b, &ctx).await;
    assert_eq!((&still["decision"], &still["rules"][0]["cached"]), (&json!("allow"), &json!(true)), "{still}");

    // ...until the rule changes on A (not its request: only its name).
    let mut renamed = rule.clone();
    renamed["name"] = json!("renamed on a");
    admin(&p.a, Method::PUT, "/v1/rules/r-cached", Some(&renamed), 200).await;
    let (held, answer) = decide_until(&p.b, &ctx, PROPAGATION, |a| a["decision"] == "deny").await;
    assert!(held, "B still answers from its cache within 1 s of the change on A: {answer}");
    assert_eq!(answer["rules"][0]["cached"], false, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_writes_to_both_replicas_make_one_gap_free_audit_chain() {
    let p = pair().await;
    let writes = (0..20).flat_map(|i| {
        [(&p.a, format!("from-a-{i:02}")), (&p.b, format!("from-b-{i:02}"))].map(|(bin, id)| async move {
            let rule = json!({"id": id, "method": "GET", "url": "http://127.0.0.1:9/x"});
            admin(bin, Method::POST, "/v1/rules", Some(&rule), 201).await;
            id
        })
    });
    let created: HashSet<String> = futures::future::join_all(writes).await.into_iter().collect();
    assert_eq!(created.len(), 40);

    for bin in [&p.a, &p.b] {
        let entries = whole_list(bin, "/v1/audit-logs").await;
        let mut seqs: Vec<i64> = entries.iter().map(|e| e["seq"].as_i64().expect("seq")).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "distinct, gap-free seq on {}", bin.address);
        let ids: HashSet<String> =
            entries.iter().map(|e| e["object_id"].as_str().expect("object_id").to_string()).collect();
        assert_eq!(ids, created);
        let (status, verify) = call(bin, Method::GET, "/v1/audit-logs/verify", AUDITOR_TOKEN, None).await;
        assert_eq!((status, verify), (200, json!({"ok": true, "entries": 40})), "on {}", bin.address);
    }
    // Both replicas know every rule (B's own at once, A's within the bound).
    for bin in [&p.a, &p.b] {
        let started = Instant::now();
        loop {
            let rules = whole_list(bin, "/v1/rules").await;
            let ids: HashSet<String> = rules.iter().map(|r| r["id"].as_str().expect("id").to_string()).collect();
            if ids == created {
                break;
            }
            assert!(started.elapsed() < PROPAGATION, "rules known on {}: {ids:?}", bin.address);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_of_both_replicas_are_in_one_activity_log_with_their_replica() {
    let (_, _, database_url) = fresh_database();
    let (da, db) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    for dir in [&da, &db] {
        write_file(dir.path(), "open.json", json!([]), json!([{"id": "p-open", "applications": ["crm"], "rules": []}]));
    }
    let (a, b) = tokio::join!(replica(da.path(), "a", &database_url, "a"), replica(db.path(), "b", &database_url, "b"));
    let asks = (0..10).map(|i| {
        let (bin, name) = if i % 2 == 0 { (&a, "a") } else { (&b, "b") };
        async move {
            let answer = decision(bin, &json!({"application": "crm", "username": format!("user-{i}")})).await;
            assert_eq!(answer["decision"], "allow", "{answer}");
            (answer["decision_id"].as_str().expect("decision_id").to_string(), name.to_string())
        }
    });
    let answered: BTreeMap<String, String> = futures::future::join_all(asks).await.into_iter().collect();
    assert_eq!(answered.len(), 10);

    for bin in [&a, &b] {
        let log = whole_list(bin, "/v1/activity-logs").await;
        let logged: BTreeMap<String, String> = log
            .iter()
            .map(|e| {
                (
                    e["decision_id"].as_str().expect("decision_id").to_string(),
                    e["replica"].as_str().unwrap_or("").into(),
                )
            })
            .collect();
        assert_eq!(log.len(), 10, "one entry per decision on {}", bin.address);
        assert_eq!(logged, answered, "each decision with the replica that answered it, on {}", bin.address);
        assert!(log.iter().all(|e| e["via"] == "api"), "{log:?}");
    }
}

/// The `load` entries of the audit log: file name → how many.
async fn loads(bin: &Binary) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in whole_list(bin, "/v1/audit-logs?action=load").await {
        *out.entry(e["object_id"].as_str().expect("object_id").to_string()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_load_is_audited_once_per_content_not_once_per_replica() {
    let (_, _, database_url) = fresh_database();
    let (da, db) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let files = |apps: &str| {
        [
            ("one.json", json!([{"id": "p-one", "applications": [format!("one-{apps}")], "rules": []}])),
            ("two.json", json!([{"id": "p-two", "applications": [format!("two-{apps}")], "rules": []}])),
            ("three.json", json!([{"id": "p-three", "applications": ["three"], "rules": []}])),
        ]
    };
    for dir in [&da, &db] {
        for (name, policies) in files("v1") {
            write_file(dir.path(), name, json!([]), policies);
        }
    }
    let (a, b) = tokio::join!(replica(da.path(), "a", &database_url, "a"), replica(db.path(), "b", &database_url, "b"));
    let expected: BTreeMap<String, usize> =
        [("one.json", 1), ("three.json", 1), ("two.json", 1)].into_iter().map(|(f, n)| (f.to_string(), n)).collect();
    assert_eq!(loads(&a).await, expected, "both replicas started with the same files");

    // The same change to one.json and two.json on both replicas, then SIGHUP to both.
    for dir in [&da, &db] {
        for (name, policies) in files("v2").into_iter().take(2) {
            write_file(dir.path(), name, json!([]), policies);
        }
    }
    a.signal("HUP");
    b.signal("HUP");
    for bin in [&a, &b] {
        assert!(bin.wait_for_stderr("policy files reloaded").await, "no reload; stderr:\n{}", bin.stderr_text());
    }
    let expected: BTreeMap<String, usize> =
        [("one.json", 2), ("three.json", 1), ("two.json", 2)].into_iter().map(|(f, n)| (f.to_string(), n)).collect();
    for bin in [&a, &b] {
        assert_eq!(loads(bin).await, expected, "on {}", bin.address);
        let (_, verify) = call(bin, Method::GET, "/v1/audit-logs/verify", AUDITOR_TOKEN, None).await;
        assert_eq!(verify, json!({"ok": true, "entries": 5}));
        let answer = decision(bin, &json!({"application": "one-v2"})).await;
        assert_eq!(answer["decision"], "allow", "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_starting_at_once_apply_each_migration_once() {
    let (_, _, database_url) = fresh_database();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let (a, b, c) = tokio::join!(
        replica(dirs[0].path(), "a", &database_url, "a"),
        replica(dirs[1].path(), "b", &database_url, "b"),
        replica(dirs[2].path(), "c", &database_url, "c"),
    );
    for bin in [&a, &b, &c] {
        let (status, ready) = call(bin, Method::GET, "/readyz", AUDITOR_TOKEN, None).await;
        assert_eq!(status, 200, "{ready}");
    }
    let db = pg_connect(&database_url).await;
    let rows = db.query("SELECT version, applied_by FROM schema_version ORDER BY version", &[]).await.expect("query");
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let known = i32::try_from(verdict::store::postgres::MIGRATIONS.len()).expect("few migrations");
    assert_eq!(versions, (1..=known).collect::<Vec<_>>(), "one row per script");
    for row in &rows {
        let by: String = row.get(1);
        assert!(["a", "b", "c"].contains(&by.as_str()), "applied by {by}");
    }
    // The logs of all three name one applier per script.
    let applied: usize =
        [&a, &b, &c].iter().map(|bin| bin.stderr_text().matches("applied store migration").count()).sum();
    assert_eq!(applied, rows.len(), "{}\n{}\n{}", a.stderr_text(), b.stderr_text(), c.stderr_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_listener_connection_is_killed_changes_still_reach_b() {
    let api = posture_api().await;
    let p = pair().await;
    let db = pg_connect(&p.database_url).await;
    let listeners = "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE 'verdict-listen:%'";
    let before: Vec<i32> = db.query(listeners, &[&p.database]).await.expect("query").iter().map(|r| r.get(0)).collect();
    assert_eq!(before.len(), 2, "one listener per replica");
    let killed = db
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name LIKE 'verdict-listen:%'",
            &[&p.database],
        )
        .await
        .expect("terminate");
    assert_eq!(killed.len(), 2);

    // A change made right away may find B's listener down: B reloads everything once it
    // listens again, so the change arrives all the same (bounded wait: reconnect backoff).
    admin(&p.a, Method::POST, "/v1/rules", Some(&posture_rule("r-1", format!("{}/ok", api.uri()))), 201).await;
    let policy = json!({"id": "p-1", "applications": ["crm"], "rules": ["r-1"]});
    admin(&p.a, Method::POST, "/v1/policies", Some(&policy), 201).await;
    let crm = json!({"application": "crm"});
    let (held, answer) = decide_until(&p.b, &crm, Duration::from_secs(15), |a| a["decision"] == "allow").await;
    assert!(held, "the change never reached B after its listener was killed: {answer}");

    // Both listen again (new backends), and a later change arrives within the bound.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now: Vec<i32> =
            db.query(listeners, &[&p.database]).await.expect("query").iter().map(|r| r.get(0)).collect();
        if now.len() == 2 && now.iter().all(|pid| !before.contains(pid)) {
            break;
        }
        assert!(Instant::now() < deadline, "listeners did not come back: {now:?} (before {before:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut changed = posture_rule("r-1", format!("{}/bad", api.uri()));
    changed["name"] = json!("now failing");
    admin(&p.a, Method::PUT, "/v1/rules/r-1", Some(&changed), 200).await;
    let (held, answer) = decide_until(&p.b, &crm, PROPAGATION, |a| a["decision"] == "deny").await;
    assert!(held, "B missed a change after its listener came back: {answer}");
    assert!(p.b.stderr_text().contains("reloading every object once"), "{}", p.b.stderr_text());
}

/// Decision ids in the `activity` table, in insertion order.
async fn activity_ids(db: &tokio_postgres::Client) -> Vec<String> {
    db.query("SELECT decision_id FROM activity ORDER BY id", &[])
        .await
        .expect("select activity")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits (bounded) until the `activity` table holds `count` rows; returns them.
async fn wait_for_activity(db: &tokio_postgres::Client, count: usize, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let ids = activity_ids(db).await;
        if ids.len() >= count || Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_each_once(db: &tokio_postgres::Client, answered: &[String]) {
    let dups = db
        .query("SELECT decision_id, count(*) FROM activity GROUP BY decision_id HAVING count(*) > 1", &[])
        .await
        .expect("duplicates query");
    assert!(
        dups.is_empty(),
        "decision ids stored more than once: {:?}",
        dups.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    );
    let total: i64 = db.query_one("SELECT count(*) FROM activity", &[]).await.expect("count").get(0);
    assert_eq!(total, answered.len() as i64, "one row per answered decision");
}

fn open_policy(dir: &Path) {
    write_file(dir, "open.json", json!([]), json!([{"id": "p-open", "applications": ["crm"], "rules": []}]));
}

async fn answer_id(bin: &Binary, i: usize) -> String {
    let answer = decision(bin, &json!({"application": "crm", "username": format!("user-{i}")})).await;
    assert_eq!(answer["decision"], "allow", "{answer}");
    answer["decision_id"].as_str().expect("decision_id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_go_on_while_the_database_is_away_and_are_logged_once_when_it_is_back() {
    let (server, name, direct_url) = fresh_database();
    let mut proxy = PgProxy::start(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    open_policy(dir.path());
    let bin = replica(dir.path(), "a", &proxy.url(&server, &name), "a").await;
    let db = pg_connect(&direct_url).await;

    let mut answered = Vec::new();
    for i in 0..10 {
        answered.push(answer_id(&bin, i).await);
    }
    assert_eq!(activity_ids(&db).await, answered, "durable before the answer while the store is up");

    proxy.cut();
    for i in 10..40 {
        answered.push(answer_id(&bin, i).await);
    }
    // /readyz says the store is down (bounded wait), and decisions go on meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let (status, ready) = call(&bin, Method::GET, "/readyz", AUDITOR_TOKEN, None).await;
        if status == 503 || Instant::now() > deadline {
            break (status, ready);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ready.0, 503, "{}", ready.1);
    assert_eq!(ready.1["checks"]["store"]["ok"], false, "{}", ready.1);
    for i in 40..50 {
        answered.push(answer_id(&bin, i).await);
    }
    // An admin write answers 503 store_unavailable, within 2 s (SPEC §9).
    let rule = json!({"id": "r-while-down", "method": "GET", "url": "http://127.0.0.1:9/x"});
    let write =
        tokio::time::timeout(Duration::from_secs(2), call(&bin, Method::POST, "/v1/rules", ADMIN_TOKEN, Some(&rule)))
            .await
            .expect("the admin write hangs while the database is away");
    assert_eq!((write.0, &write.1["error"]["code"]), (503, &json!("store_unavailable")), "{}", write.1);
    assert_eq!(activity_ids(&db).await.len(), 10, "nothing reached the database while it was away");
    assert!(dir.path().join("data/activity-spool.jsonl").exists(), "no spool in the data directory");

    proxy.restore().await;
    let stored = wait_for_activity(&db, answered.len(), Duration::from_secs(15)).await;
    assert_eq!(stored, answered, "every answered decision, in order");
    assert_each_once(&db, &answered).await;
    let (ok, ready) = get_until(&bin, "/readyz", 200, Duration::from_secs(10)).await;
    assert!(ok, "{ready}");
    // The store takes writes again, and the listing shows every entry.
    admin(&bin, Method::POST, "/v1/rules", Some(&rule), 201).await;
    let log = whole_list(&bin, "/v1/activity-logs").await;
    assert_eq!(log.len(), answered.len());
    answered.push(answer_id(&bin, 50).await);
    assert_each_once(&db, &answered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_spooled_before_a_kill_9_arrive_once_after_the_restart() {
    let (server, name, direct_url) = fresh_database();
    let mut proxy = PgProxy::start(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    open_policy(dir.path());
    let url = proxy.url(&server, &name);
    let mut bin = replica(dir.path(), "a", &url, "first").await;
    let db = pg_connect(&direct_url).await;

    let mut answered = Vec::new();
    for i in 0..5 {
        answered.push(answer_id(&bin, i).await);
    }
    proxy.cut();
    for i in 5..25 {
        answered.push(answer_id(&bin, i).await);
    }
    bin.child.kill().expect("kill -9");
    bin.child.wait().expect("wait");
    assert_eq!(activity_ids(&db).await.len(), 5);

    proxy.restore().await;
    let bin = replica(dir.path(), "a", &url, "second").await;
    let stored = wait_for_activity(&db, answered.len(), Duration::from_secs(15)).await;
    assert_eq!(stored, answered, "every answered decision, in order, after the restart");
    assert_each_once(&db, &answered).await;
    answered.push(answer_id(&bin, 25).await);
    assert_each_once(&db, &answered).await;
}

/// The suite's switch itself: under `VERDICT_TEST_DATABASE_URL` an in-process app and
/// the real binary each store into a PostgreSQL database of their own (and no SQLite
/// file); without it, into `data/verdict.db`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_switch_gives_every_test_app_a_database_of_its_own() {
    let app = crate::helpers::spawn_app(json!([]), json!([])).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = Binary::start(BinaryOptions {
        dir: dir.path(),
        env: vec![("VERDICT_ADMIN_TOKEN", ADMIN_TOKEN.to_string())],
        run_name: "switch",
    })
    .await;
    let rule = |id: &str| json!({"id": id, "method": "GET", "url": "http://127.0.0.1:9/x"});
    let (status, body) = app.post_json("/v1/rules", ADMIN_TOKEN, &rule("in-process")).await;
    assert_eq!(status, 201, "{body}");
    admin(&bin, Method::POST, "/v1/rules", Some(&rule("binary")), 201).await;

    let in_process = crate::helpers::test_database_url(app.dir.path());
    let binary = crate::helpers::test_database_url(dir.path());
    match crate::helpers::pg_server() {
        Some(_) => {
            let (in_process, binary) = (in_process.expect("a database"), binary.expect("a database"));
            assert_ne!(in_process, binary);
            for (url, id, data) in [(&in_process, "in-process", app.dir.path()), (&binary, "binary", dir.path())] {
                let db = pg_connect(url).await;
                let ids: Vec<String> =
                    db.query("SELECT id FROM objects", &[]).await.expect("objects").iter().map(|r| r.get(0)).collect();
                assert_eq!(ids, [id], "{url}");
                assert!(!data.join("data/verdict.db").exists(), "a SQLite file under the switch");
            }
        }
        None => {
            assert_eq!((in_process, binary), (None, None));
            for data in [app.dir.path(), dir.path()] {
                assert!(data.join("data/verdict.db").exists());
            }
        }
    }
}

/// The event ids a receiver got, in arrival order.
async fn received_event_ids(receiver: &MockServer) -> Vec<String> {
    let requests = receiver.received_requests().await.unwrap_or_default();
    requests
        .iter()
        .filter_map(|r| r.headers.get("x-verdict-event-id").and_then(|v| v.to_str().ok()).map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_webhook_event_goes_out_from_one_replica_and_webhooks_reach_every_replica() {
    let api = posture_api().await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST")).and(path("/hook")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let p = pair().await;
    admin(&p.a, Method::POST, "/v1/rules", Some(&posture_rule("r-bad", format!("{}/bad", api.uri()))), 201).await;
    let policy = json!({"id": "p-hr", "applications": ["hr"], "rules": ["r-bad"]});
    admin(&p.a, Method::POST, "/v1/policies", Some(&policy), 201).await;
    let hook = json!({"id": "siem", "url": format!("{}/hook", receiver.uri()), "events": ["decision.denied"]});
    admin(&p.a, Method::POST, "/v1/webhooks", Some(&hook), 201).await;
    // Created on A, known to B within the SPEC's bound (it is an object like the others).
    let (known, body) = get_until(&p.b, "/v1/webhooks/siem", 200, PROPAGATION).await;
    assert!(known, "B does not know the webhook within 1 s of its creation on A: {body}");
    // The policy must be in force on B before B decides; how fast it got there is
    // the subject of the propagation tests above, not of this one.
    let (_, policy_on_b) = get_until(&p.b, "/v1/policies/p-hr", 200, Duration::from_secs(15)).await;
    assert_eq!(policy_on_b["id"], "p-hr");

    // 40 denied decisions, half on each replica: each replica writes its events, and
    // both delivery loops compete for every row.
    let context = json!({"application": "hr", "username": "bob"});
    let mut decided = Vec::new();
    for i in 0..40 {
        let bin = if i % 2 == 0 { &p.a } else { &p.b };
        let answer = decision(bin, &context).await;
        assert_eq!(answer["decision"], "deny", "{answer}");
        decided.push(answer["decision_id"].as_str().expect("decision_id").to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ids = received_event_ids(&receiver).await;
    while ids.iter().collect::<HashSet<_>>().len() < decided.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ids = received_event_ids(&receiver).await;
    }
    // Both loops poll every second: give a second sender the time it would need to
    // send a duplicate before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = receiver.received_requests().await.unwrap_or_default();
    let mut by_decision: BTreeMap<String, usize> = BTreeMap::new();
    for r in &requests {
        let body: Value = serde_json::from_slice(&r.body).expect("JSON payload");
        let id = body["detail"]["decision_id"].as_str().expect("decision id in detail").to_string();
        *by_decision.entry(id).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = decided.iter().map(|d| (d.clone(), 1)).collect();
    assert_eq!(by_decision, expected, "every denied decision's event exactly once, whichever replica sent it");
    let ids = received_event_ids(&receiver).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 40, "40 distinct event ids: {ids:?}");
    // Both replicas list the same deliveries, all delivered after one attempt.
    for bin in [&p.a, &p.b] {
        let items = whole_list(bin, "/v1/webhooks/siem/deliveries").await;
        assert_eq!(items.len(), 40, "{items:?}");
        assert!(items.iter().all(|d| d["state"] == "delivered" && d["attempts"] == 1), "{items:?}");
    }
}
