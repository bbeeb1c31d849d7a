//! Policy files (SPEC §1, §6): loaded at start, all-or-nothing per file with every
//! problem listed, a bad file stops the start, SIGHUP reloads and a bad reload keeps
//! the running set; `verdict validate`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use verdict::startup::{Application, StartError};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::tools::*;

/// An API with `/ok` (allows under [`status_rule`]) and `/bad` (denies).
async fn status_api() -> MockServer {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/ok"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "ok"})))
        .mount(&api)
        .await;
    Mock::given(method("GET"))
        .and(path("/bad"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "bad"})))
        .mount(&api)
        .await;
    api
}

fn status_rule(id: &str, url: String) -> Value {
    json!({"id": id, "method": "GET", "url": url,
           "response_actions": [{"type": "equals", "key": "$.status", "value": "ok"}]})
}

/// A file with three distinct problems in one rule and one in a policy.
fn file_with_four_problems() -> Value {
    json!({
        "rules": [
            {"id": "r1", "method": "GET", "url": "ftp://example.com/x",
             "response_actions": [{"type": "matches", "key": "$.a", "value": "(unclosed"}]},
            {"id": "r2", "url": "https://example.com/%usernme%"}
        ],
        "policies": [{"id": "p1", "applications": ["app"], "rules": ["missing-rule"]}]
    })
}

fn problems_of(result: Result<Application, StartError>) -> Vec<String> {
    match result {
        Ok(_) => panic!("verdict started although a policy file is bad"),
        Err(StartError::PolicyFiles(problems)) => problems.iter().map(|p| p.to_string()).collect(),
        Err(other) => panic!("expected policy file problems, got {other}"),
    }
}

#[tokio::test]
async fn a_bad_policy_file_stops_the_start_and_every_problem_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    write_policy_file(dir.path(), "bad.json", &file_with_four_problems());
    let problems = problems_of(Application::build(test_settings(dir.path())).await);
    let all = problems.join("\n");
    for expected in [
        "bad.json: rules[0].url: scheme `ftp` is not allowed",
        "bad.json: rules[0].response_actions[0].value: `(unclosed` is not a valid regular expression",
        "bad.json: rules[1].method: `method` is required",
        "bad.json: rules[1].url: unknown placeholder `%usernme%`; did you mean `%username%`?",
    ] {
        assert!(all.contains(expected), "missing problem `{expected}` in:\n{all}");
    }
    for line in &problems {
        let parts: Vec<&str> = line.splitn(3, ": ").collect();
        assert_eq!(parts.len(), 3, "not `file: field: message`: {line}");
        assert!(parts[0].ends_with("bad.json"), "{line}");
    }
}

#[tokio::test]
async fn a_policy_naming_a_missing_rule_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "refs.json",
        json!([]),
        json!([{"id": "p1", "applications": ["app"], "rules": ["nowhere"]}]),
    );
    let problems = problems_of(Application::build(test_settings(dir.path())).await);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].ends_with("policies[0].rules[0]: rule `nowhere` does not exist"), "{problems:?}");
}

#[tokio::test]
async fn one_bad_file_among_good_ones_still_stops_the_start_and_only_it_is_blamed() {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "good.json",
        json!([status_rule("fine", "http://127.0.0.1:9/ok".into())]),
        json!([{"id": "p-good", "applications": ["app"], "rules": ["fine"]}]),
    );
    write_policy_file(dir.path(), "zz-bad.json", &json!({"rules": [{"id": "Bad Id!", "method": "GET"}]}));
    let problems = problems_of(Application::build(test_settings(dir.path())).await);
    assert!(problems.len() >= 2, "both problems of the bad rule are listed: {problems:?}");
    assert!(problems.iter().all(|p| p.contains("zz-bad.json: ")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("rules[0].id: `Bad Id!` is not a valid id")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("rules[0].url: `url` is required")), "{problems:?}");
}

#[tokio::test]
async fn a_file_that_is_not_json_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/broken.json"), "{\"rules\": [").unwrap();
    let problems = problems_of(Application::build(test_settings(dir.path())).await);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("broken.json: -: not a policy file"), "{problems:?}");
}

#[tokio::test]
async fn reload_applies_a_changed_file() {
    let api = status_api().await;
    let app = spawn_app(
        json!([status_rule("r", format!("{}/bad", api.uri()))]),
        json!([{"id": "p", "applications": ["app"], "rules": ["r"]}]),
    )
    .await;
    assert_eq!(app.decision(json!({"application": "app"})).await["decision"], "deny");
    write_file(
        app.dir.path(),
        "test.json",
        json!([status_rule("r", format!("{}/ok", api.uri()))]),
        json!([{"id": "p", "applications": ["app"], "rules": ["r"]}]),
    );
    app.state.registry.load_files().await.expect("reload");
    assert_eq!(app.decision(json!({"application": "app"})).await["decision"], "allow");
}

#[tokio::test]
async fn a_bad_file_on_reload_keeps_the_running_set_and_loads_nothing_of_that_file() {
    let api = status_api().await;
    let app = spawn_app(
        json!([status_rule("r", format!("{}/ok", api.uri()))]),
        json!([{"id": "p", "applications": ["app"], "rules": ["r"]}]),
    )
    .await;
    assert_eq!(app.decision(json!({"application": "app"})).await["decision"], "allow");
    // The same file now points `r` at a denying URL (valid) and adds a valid rule and
    // policy for `app2`, next to one invalid rule: none of it may be taken.
    write_policy_file(
        app.dir.path(),
        "test.json",
        &json!({
            "rules": [
                status_rule("r", format!("{}/bad", api.uri())),
                status_rule("r2", format!("{}/ok", api.uri())),
                {"id": "r3", "method": "DELETE", "url": "http://example.com/"}
            ],
            "policies": [
                {"id": "p", "applications": ["app"], "rules": ["r"]},
                {"id": "p2", "applications": ["app2"], "rules": ["r2"]}
            ]
        }),
    );
    let problems = app.state.registry.load_files().await.expect_err("the reload must be refused");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].field, "rules[2].method");
    let still = app.decision(json!({"application": "app"})).await;
    assert_eq!(still["decision"], "allow", "the running rule `r` was replaced: {still}");
    let other = app.decision(json!({"application": "app2"})).await;
    assert_eq!(other["decision"], "deny");
    assert!(other["reason"].as_str().unwrap().contains("no policy matches"), "{other}");
}

/// Polls decisions until `want` comes back (bounded); returns the last answer.
async fn decide_until(binary: &Binary, context: &Value, want: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        let (status, body) = binary.decide(PROXY_TOKEN, context).await;
        assert_eq!(status, 200, "{body}");
        if body["decision"] == want {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("decision never became {want}; last answer: {last}");
}

#[tokio::test]
async fn sighup_reloads_policy_files_and_a_bad_reload_keeps_the_running_set() {
    let api = status_api().await;
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "access.json",
        json!([status_rule("r", format!("{}/bad", api.uri()))]),
        json!([{"id": "p", "applications": ["app"], "rules": ["r"]}]),
    );
    let binary = Binary::start(BinaryOptions {
        dir: dir.path(),
        env: vec![("VERDICT_PROXY_TOKEN", PROXY_TOKEN.into()), ("RUST_LOG", "info".into())],
        run_name: "serve",
    })
    .await;
    let ctx = json!({"application": "app"});
    let (status, first) = binary.decide(PROXY_TOKEN, &ctx).await;
    assert_eq!((status, first["decision"].as_str()), (200, Some("deny")), "{first}");

    write_file(
        dir.path(),
        "access.json",
        json!([status_rule("r", format!("{}/ok", api.uri()))]),
        json!([{"id": "p", "applications": ["app"], "rules": ["r"]}]),
    );
    binary.signal("HUP");
    decide_until(&binary, &ctx, "allow").await;
    assert!(binary.wait_for_stderr("policy files reloaded").await, "stderr:\n{}", binary.stderr_text());

    write_file(
        dir.path(),
        "access.json",
        json!([status_rule("r", format!("{}/bad", api.uri())), {"id": "broken", "method": "GET", "url": "https://x.example/%nope_nope%"}]),
        json!([{"id": "p", "applications": ["app"], "rules": ["r"]}]),
    );
    binary.signal("HUP");
    assert!(
        binary.wait_for_stderr("policy reload refused").await,
        "no refusal logged; stderr:\n{}",
        binary.stderr_text()
    );
    assert!(binary.stderr_text().contains("unknown placeholder `%nope_nope%`"), "{}", binary.stderr_text());
    let (status, kept) = binary.decide(PROXY_TOKEN, &ctx).await;
    assert_eq!(status, 200);
    assert_eq!(kept["decision"], "allow", "a bad reload changed the running set: {kept}");
}

fn validate(args: &[&Path]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_verdict")).arg("validate").args(args).output().expect("run validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn validate_lists_every_problem_as_file_field_message_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_policy_file(dir.path(), "bad.json", &file_with_four_problems());
    let (ok, text) = validate(&[&bad]);
    assert!(!ok, "validate must exit non-zero:\n{text}");
    let file = bad.display().to_string();
    for expected in [
        format!("{file}: rules[0].url: scheme `ftp` is not allowed; use http or https"),
        format!("{file}: rules[0].response_actions[0].value: `(unclosed` is not a valid regular expression"),
        format!("{file}: rules[1].method: `method` is required"),
        format!("{file}: rules[1].url: unknown placeholder `%usernme%`; did you mean `%username%`?"),
    ] {
        assert!(text.contains(&expected), "missing `{expected}` in:\n{text}");
    }
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(line.starts_with(&format!("{file}: ")), "not `file: field: message`: {line}");
        assert_eq!(line.splitn(3, ": ").count(), 3, "not `file: field: message`: {line}");
    }
}

#[test]
fn validate_reports_a_policy_naming_a_missing_rule() {
    let dir = tempfile::tempdir().unwrap();
    let only_policy = write_file(
        dir.path(),
        "policies.json",
        json!([]),
        json!([{"id": "p", "applications": ["app"], "rules": ["elsewhere"]}]),
    );
    let (ok, text) = validate(&[&only_policy]);
    assert!(!ok, "{text}");
    assert!(text.contains("policies.json: policies[0].rules[0]: rule `elsewhere` does not exist"), "{text}");
}

#[test]
fn validate_resolves_rules_across_the_files_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write_file(
        dir.path(),
        "a-rules.json",
        json!([status_rule("elsewhere", "https://e.example/x".into())]),
        json!([]),
    );
    let policies = write_file(
        dir.path(),
        "b-policies.json",
        json!([]),
        json!([{"id": "p", "applications": ["app"], "rules": ["elsewhere"]}]),
    );
    let (ok, text) = validate(&[&rules, &policies]);
    assert!(ok, "{text}");
    let (ok, text) = validate(&[&dir.path().join("policies")]);
    assert!(ok, "a directory is expanded to its files: {text}");
}

#[test]
fn validate_accepts_the_shipped_policies() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let (ok, text) = validate(&[&shipped]);
    assert!(ok, "the shipped policies/ do not validate:\n{text}");
}

/// A rule in a policy file whose Basic password is `$env:NAME`.
fn env_secret_file(api: &str, var: &str) -> Value {
    json!({
        "rules": [{"id": "env-secret", "method": "GET", "url": format!("{api}/status"),
                   "auth": {"type": "basic", "username": "svc", "password": format!("$env:{var}")},
                   "response_actions": [{"type": "equals", "key": "status", "value": "ok"}]}],
        "policies": [{"id": "env-secret-policy", "applications": ["env-app"], "rules": ["env-secret"]}]
    })
}

#[tokio::test]
async fn a_policy_file_secret_can_come_from_the_environment_and_stays_out_of_the_file_and_reads() {
    let api = MockServer::start().await;
    let password = "pw-from-env-7f3a9c";
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("svc:{password}")));
    Mock::given(method("GET"))
        .and(path("/status"))
        .and(wiremock::matchers::header("authorization", basic.as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "ok"})))
        .mount(&api)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let var = "VERDICT_TEST_POSTURE_PASSWORD";
    let file = write_policy_file(dir.path(), "env.json", &env_secret_file(&api.uri(), var));
    assert!(!std::fs::read_to_string(&file).expect("file").contains(password));

    // The real binary with the variable set: the API gets the password from it.
    let mut bin = Binary::start(BinaryOptions {
        dir: dir.path(),
        env: vec![
            ("VERDICT_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("VERDICT_PROXY_TOKEN", PROXY_TOKEN.to_string()),
            (var, password.to_string()),
        ],
        run_name: "env-secret",
    })
    .await;
    let (status, answer) = bin.decide(PROXY_TOKEN, &json!({"application": "env-app", "username": "u"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["decision"], "allow", "the API saw the password from the environment: {answer}");
    let rule: Value = bin
        .client
        .get(format!("{}/v1/rules/env-secret", bin.address))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("get rule")
        .json()
        .await
        .expect("json");
    assert_eq!(rule["auth"]["password"], "********", "{rule}");
    bin.stop().await;
    assert!(!bin.stdout_text().contains(password) && !bin.stderr_text().contains(password));

    // Without the variable the file does not load, and the problem names the field and
    // the variable — not a value.
    let out = Command::new(env!("CARGO_BIN_EXE_verdict"))
        .arg("validate")
        .arg(&file)
        .env_remove(var)
        .output()
        .expect("run validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "validate must fail without the variable:\n{text}");
    assert!(text.contains("rules[0].auth.password") && text.contains(var), "{text}");
}
