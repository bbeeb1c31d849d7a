//! Callers and tokens (SPEC §2): roles on `/v1/decisions`, 401 and 403, and the
//! first-start generation of one token per role when none is configured.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use verdict::startup::Application;

use crate::helpers::*;
use crate::tools::*;

async fn app_without_rules() -> TestApp {
    spawn_app(json!([]), json!([])).await
}

fn ctx() -> Value {
    json!({"application": "payroll", "username": "alice"})
}

#[tokio::test]
async fn proxy_and_admin_tokens_may_ask_for_decisions() {
    let app = app_without_rules().await;
    for token in [PROXY_TOKEN, ADMIN_TOKEN] {
        let (status, body) = app.post_json("/v1/decisions", token, &ctx()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["decision"], "deny");
        assert!(body["decision_id"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    }
}

#[tokio::test]
async fn an_auditor_token_gets_403_on_decisions() {
    let app = app_without_rules().await;
    let (status, body) = app.post_json("/v1/decisions", AUDITOR_TOKEN, &ctx()).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
}

#[tokio::test]
async fn a_missing_or_unknown_token_gets_401() {
    let app = app_without_rules().await;
    let url = format!("{}/v1/decisions", app.address);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("unknown token", Some("Bearer not-a-known-token".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("token without scheme", Some(PROXY_TOKEN.into())),
        ("basic scheme", Some(format!("Basic {PROXY_TOKEN}"))),
        ("token with one character changed", Some(format!("Bearer {}X", &PROXY_TOKEN[..PROXY_TOKEN.len() - 1]))),
    ];
    for (name, header) in cases {
        let mut req = app.client.post(&url).json(&ctx());
        if let Some(h) = header {
            req = req.header("authorization", h);
        }
        let (status, body) = read(req.send().await.unwrap()).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["error"]["code"], "unauthenticated", "{name}: {body}");
    }
}

#[tokio::test]
async fn health_needs_no_token() {
    let app = app_without_rules().await;
    let resp = app.request(reqwest::Method::GET, "/healthz").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[tokio::test]
async fn first_start_without_tokens_keeps_only_hashes_and_refuses_unknown_tokens() {
    let app = spawn_app_with(AppOptions { no_tokens: true, ..Default::default() }).await;
    let stored = std::fs::read_to_string(app.dir.path().join("data/tokens.json")).expect("tokens.json");
    let entries: Vec<Value> = serde_json::from_str(&stored).expect("tokens.json is JSON");
    let mut roles: Vec<&str> = entries.iter().map(|e| e["role"].as_str().unwrap()).collect();
    roles.sort();
    assert_eq!(roles, ["admin", "auditor", "proxy"]);
    for e in &entries {
        let h = e["sha256"].as_str().unwrap();
        assert!(h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()), "{e}");
    }
    assert!(!stored.contains("vdt_"), "a plain token is stored: {stored}");
    let (status, _) = app.post_json("/v1/decisions", PROXY_TOKEN, &ctx()).await;
    assert_eq!(status, 401, "the test tokens are not configured here");

    // A second start on the same data directory keeps the same tokens.
    let mut settings = test_settings(app.dir.path());
    settings.tokens.clear();
    let again = Application::build(settings).await.unwrap_or_else(|e| panic!("second start: {e}"));
    drop(again);
    let after = std::fs::read_to_string(app.dir.path().join("data/tokens.json")).unwrap();
    assert_eq!(after, stored, "tokens were generated again");
}

/// The token printed for `role` in the first start's stdout.
fn printed_token(stdout: &str, role: &str) -> String {
    let marker = format!("({role}): ");
    let line = stdout
        .lines()
        .find(|l| l.contains(&marker))
        .unwrap_or_else(|| panic!("no {role} token printed; stdout:\n{stdout}"));
    line.split(&marker).nth(1).unwrap().trim().to_owned()
}

#[tokio::test]
async fn generated_tokens_are_printed_once_and_work_with_their_roles() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Binary::start(BinaryOptions { dir: dir.path(), env: vec![], run_name: "first" }).await;
    let stdout = first.stdout_text();
    let proxy = printed_token(&stdout, "proxy");
    let admin = printed_token(&stdout, "admin");
    let auditor = printed_token(&stdout, "auditor");
    assert_ne!(proxy, admin);

    let stored = std::fs::read_to_string(dir.path().join("data/tokens.json")).unwrap();
    for token in [&proxy, &admin, &auditor] {
        assert!(!stored.contains(token.as_str()), "plain token stored");
        assert!(stored.contains(&hash(token)), "hash of a printed token is not stored");
        assert!(!first.stderr_text().contains(token.as_str()), "a token went to the log");
    }

    let (status, body) = first.decide(&proxy, &ctx()).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = first.decide(&admin, &ctx()).await;
    assert_eq!(status, 200);
    let (status, _) = first.decide(&auditor, &ctx()).await;
    assert_eq!(status, 403);
    let (status, _) = first.decide("vdt_0000", &ctx()).await;
    assert_eq!(status, 401);
    first.stop().await;

    let second = Binary::start(BinaryOptions { dir: dir.path(), env: vec![], run_name: "second" }).await;
    assert!(!second.stdout_text().contains(&proxy), "tokens printed again on the second start");
    let (status, body) = second.decide(&proxy, &ctx()).await;
    assert_eq!(status, 200, "the generated token does not survive a restart: {body}");
}

#[tokio::test]
async fn tokens_from_the_environment_have_their_roles() {
    let dir = tempfile::tempdir().unwrap();
    let binary = Binary::start(BinaryOptions {
        dir: dir.path(),
        env: vec![
            ("VERDICT_PROXY_TOKEN", "env-proxy-secret-1".into()),
            ("VERDICT_AUDITOR_TOKEN", "env-auditor-secret-1".into()),
        ],
        run_name: "env",
    })
    .await;
    assert!(!binary.stdout_text().contains("generated"), "tokens generated although configured");
    assert!(!dir.path().join("data/tokens.json").exists());
    assert_eq!(binary.decide("env-proxy-secret-1", &ctx()).await.0, 200);
    assert_eq!(binary.decide("env-auditor-secret-1", &ctx()).await.0, 403);
    assert_eq!(binary.decide("env-admin-secret-1", &ctx()).await.0, 401);
}
