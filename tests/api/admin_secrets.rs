//! Secrets are write-only (SPEC §4): masked on read, in audit entries and in rule-test
//! answers; sending the mask back or leaving a secret out keeps it; a new value
//! replaces it. Wiremock APIs check the real credentials, so "kept" is proven by a call
//! that succeeds. Also: a restart keeps rules, policies and their secrets.

use std::path::Path;

use serde_json::{json, Value};
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::admin_support::basic;
use crate::helpers::*;

const MASK: &str = "********";

struct Creds {
    password: &'static str,
    api_key: &'static str,
    client_secret: &'static str,
    access_token: &'static str,
}

const OLD: Creds = Creds {
    password: "sec-BASIC-OLD-1a2b",
    api_key: "sec-KEY-OLD-5e6f",
    client_secret: "sec-CS-OLD-9c0d",
    access_token: "sec-TOK-OLD-2b4d",
};
const NEW: Creds = Creds {
    password: "sec-BASIC-NEW-3c4d",
    api_key: "sec-KEY-NEW-7a8b",
    client_secret: "sec-CS-NEW-1e2f",
    access_token: "sec-TOK-NEW-6f8a",
};

/// Mounts the three APIs and the token endpoint for one set of credentials; each API
/// expects `calls` calls and the token endpoint `tokens` fetches.
async fn mount_apis(api: &MockServer, creds: &Creds, calls: u64, tokens: u64) {
    Mock::given(method("GET"))
        .and(path("/basic"))
        .and(header("authorization", format!("Basic {}", basic("svc", creds.password)).as_str()))
        .respond_with(ResponseTemplate::new(200))
        .expect(calls)
        .mount(api)
        .await;
    Mock::given(method("GET"))
        .and(path("/key"))
        .and(header("x-api-key", creds.api_key))
        .respond_with(ResponseTemplate::new(200))
        .expect(calls)
        .mount(api)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains(format!("client_secret={}", creds.client_secret)))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": creds.access_token, "token_type": "bearer", "expires_in": 3600})),
        )
        .expect(tokens)
        .mount(api)
        .await;
    Mock::given(method("GET"))
        .and(path("/oauth"))
        .and(header("authorization", format!("Bearer {}", creds.access_token).as_str()))
        .respond_with(ResponseTemplate::new(200))
        .expect(calls)
        .mount(api)
        .await;
}

fn secret_rules(api: &str, creds: &Creds) -> [Value; 3] {
    [
        json!({"id": "r-basic", "method": "GET", "url": format!("{api}/basic"),
               "auth": {"type": "basic", "username": "svc", "password": creds.password}}),
        json!({"id": "r-key", "method": "GET", "url": format!("{api}/key"),
               "auth": {"type": "api_key", "name": "X-API-Key", "value": creds.api_key}}),
        json!({"id": "r-oauth", "method": "GET", "url": format!("{api}/oauth"),
               "auth": {"type": "oauth2_client_credentials", "token_url": format!("{api}/token"),
                        "client_id": "verdict", "client_secret": creds.client_secret, "scopes": ["posture"]}}),
    ]
}

/// Where each rule keeps its secret.
const SECRET_FIELDS: [(&str, &str); 3] = [("r-basic", "password"), ("r-key", "value"), ("r-oauth", "client_secret")];

fn all_secrets() -> Vec<String> {
    let mut out = Vec::new();
    for c in [&OLD, &NEW] {
        out.extend([c.password, c.api_key, c.client_secret, c.access_token].map(str::to_owned));
        out.push(basic("svc", c.password));
    }
    out
}

fn assert_no_secret(what: &str, text: &str) {
    for s in all_secrets() {
        assert!(!text.contains(&s), "{what} contains the secret {s}: {text}");
    }
}

fn assert_masked(rule: &Value) {
    let id = rule["id"].as_str().expect("id");
    let (_, field) = SECRET_FIELDS.iter().find(|(r, _)| *r == id).expect("a secret rule");
    assert_eq!(rule["auth"][*field], MASK, "{rule}");
    assert_no_secret(id, &rule.to_string());
}

async fn allowed(app: &TestApp) {
    let decision = app.decision(json!({"application": "sec"})).await;
    assert_eq!(decision["decision"], "allow", "{decision}");
    assert_eq!(decision["rules"].as_array().map(Vec::len), Some(3), "{decision}");
}

#[tokio::test]
async fn secrets_are_write_only_and_kept_unless_replaced() {
    let api = MockServer::start().await;
    // Decisions after create, after a PUT with masks, after a PUT without secrets, and
    // one rule test each: four calls with the old credentials, one token fetch (the
    // client settings, secret included, stay equal so the token is reused).
    mount_apis(&api, &OLD, 4, 1).await;
    mount_apis(&api, &NEW, 1, 1).await;
    let app = spawn_app_with(AppOptions::default()).await;

    for rule in secret_rules(&api.uri(), &OLD) {
        let created = app.create_rule(rule).await;
        assert_masked(&created);
    }
    app.create_policy(json!({"id": "p-sec", "applications": ["sec"], "rules": ["r-basic", "r-key", "r-oauth"]})).await;
    let (_, list) = app.get("/v1/rules", AUDITOR_TOKEN).await;
    for rule in list["items"].as_array().expect("items") {
        assert_masked(rule);
    }
    allowed(&app).await;

    // PUT the rule as GET shows it: the mask keeps the stored secret.
    for (id, _) in SECRET_FIELDS {
        let (_, rule) = app.get(&format!("/v1/rules/{id}"), AUDITOR_TOKEN).await;
        assert_masked(&rule);
        let (status, updated) = app.put_json(&format!("/v1/rules/{id}"), ADMIN_TOKEN, &rule).await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["version"], 2);
        assert_masked(&updated);
    }
    allowed(&app).await;

    // PUT without the secret field: kept too.
    for (id, field) in SECRET_FIELDS {
        let (_, mut rule) = app.get(&format!("/v1/rules/{id}"), AUDITOR_TOKEN).await;
        rule["auth"].as_object_mut().expect("auth").remove(field);
        rule["description"] = json!("secret left out");
        let (status, updated) = app.put_json(&format!("/v1/rules/{id}"), ADMIN_TOKEN, &rule).await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["version"], 3);
        assert_masked(&updated);
    }
    allowed(&app).await;

    // Rule tests show the credential masked where it was sent.
    let mut shown = Vec::new();
    for (id, _) in SECRET_FIELDS {
        let (status, answer) =
            app.post_json(&format!("/v1/rules/{id}/test"), ADMIN_TOKEN, &json!({"application": "sec"})).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["outcome"], "allow", "{answer}");
        assert_no_secret("rule test answer", &answer.to_string());
        shown.push(answer["request"]["headers"].clone());
    }
    assert_eq!(shown[0]["authorization"], format!("Basic {MASK}"));
    assert_eq!(shown[1]["x-api-key"], MASK);
    assert_eq!(shown[2]["authorization"], format!("Bearer {MASK}"));

    // A new value replaces the secret.
    let new_rules = secret_rules(&api.uri(), &NEW);
    for rule in &new_rules {
        let id = rule["id"].as_str().expect("id");
        let (status, updated) = app.put_json(&format!("/v1/rules/{id}"), ADMIN_TOKEN, rule).await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["version"], 4);
        assert_masked(&updated);
    }
    allowed(&app).await;

    // Audit entries hold the masks, never the secrets.
    for (id, field) in SECRET_FIELDS {
        let entries = app.audit_of(id).await;
        let actions: Vec<String> = entries.iter().map(|e| e.action.to_string()).collect();
        assert_eq!(actions, ["create", "update", "update", "update"], "{id}");
        for e in &entries {
            for doc in [&e.before, &e.after].into_iter().flatten() {
                assert_eq!(doc["auth"][field], MASK, "{id}: {doc}");
                assert_no_secret("audit entry", &doc.to_string());
            }
        }
    }

    // And the data directory holds none of them in plain text, nor, under the
    // PostgreSQL switch, any row of the database.
    assert_no_secret_in_dir(&app.dir.path().join("data"));
    if let Some(url) = test_database_url(app.dir.path()) {
        let dump = pg_dump(&url);
        assert!(dump.windows(b"r-oauth".len()).any(|w| w == b"r-oauth"), "rules not in the database");
        for s in all_secrets() {
            assert!(!dump.windows(s.len()).any(|w| w == s.as_bytes()), "the database holds {s}");
        }
    }
}

/// Reads every file under `dir` as bytes and looks for every secret.
fn assert_no_secret_in_dir(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p).expect("read file");
            files += 1;
            for s in all_secrets() {
                assert!(!bytes.windows(s.len()).any(|w| w == s.as_bytes()), "{} holds {s}", p.display());
            }
        }
    }
    assert!(files > 0, "no files under {}", dir.display());
}

/// Builds and runs an application on `dir`, as the binary would after a restart.
async fn start_on(dir: &Path) -> (TestApp, tokio::task::JoinHandle<std::io::Result<()>>) {
    let app = verdict::startup::Application::build(test_settings(dir)).await.expect("verdict failed to start");
    let port = app.port();
    let state = app.state();
    let running = tokio::spawn(app.run_until_stopped());
    let test_app = TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        client: reqwest::Client::new(),
        // The shared directory outlives both runs; this one is only a placeholder.
        dir: tempfile::tempdir().expect("tempdir"),
        state,
    };
    (test_app, running)
}

#[tokio::test]
async fn a_restart_keeps_rules_policies_and_secrets() {
    let api = MockServer::start().await;
    // One decision before the restart and one after; the token is fetched again by the
    // new process.
    mount_apis(&api, &OLD, 2, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");

    let (first, running) = start_on(dir.path()).await;
    let mut before = Vec::new();
    for rule in secret_rules(&api.uri(), &OLD) {
        before.push(first.create_rule(rule).await);
    }
    let policy = first
        .create_policy(json!({"id": "p-sec", "applications": ["sec"], "rules": ["r-basic", "r-key", "r-oauth"]}))
        .await;
    // Updated once, so the restart must keep a version above 1 and the kept secret.
    let (status, updated) = first.put_json("/v1/rules/r-basic", ADMIN_TOKEN, &before[0]).await;
    assert_eq!(status, 200, "{updated}");
    before[0] = updated;
    allowed(&first).await;
    running.abort();
    drop(first);

    let (second, _running) = start_on(dir.path()).await;
    let (_, list) = second.get("/v1/rules", AUDITOR_TOKEN).await;
    assert_eq!(list["items"], Value::Array(before.clone()));
    assert_eq!(list["items"][0]["version"], 2);
    let (status, got) = second.get("/v1/policies/p-sec", AUDITOR_TOKEN).await;
    assert_eq!((status, &got), (200, &policy));
    allowed(&second).await;
    // The audit log survived too.
    assert_eq!(second.audit_of("r-basic").await.len(), 2);
}
