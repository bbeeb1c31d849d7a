//! The secret grep (issue #4, point 3): run the real `verdict` binary with debug
//! logging, exercise everything that handles secrets — creates, updates, rule tests,
//! decisions, failing API calls with an API key in the query string, an OAuth token
//! endpoint that fails and echoes the secret — then stop it and look for every test
//! secret (and the tokens) in every response, the captured log output and the raw
//! bytes of every file in the data directory.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wiremock::matchers::{body_string_contains, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::admin_support::basic;

const ADMIN: &str = "grep-ADMIN-TOKEN-a1b2c3d4e5";
const PROXY: &str = "grep-PROXY-TOKEN-f6a7b8c9d0";
const AUDITOR: &str = "grep-AUDITOR-TOKEN-1f2e3d4c5b";

const PASSWORD: &str = "grep-BASIC-PW-0a1b2c";
const PASSWORD_NEW: &str = "grep-BASIC-PW-NEW-3d4e5f";
const HEADER_KEY: &str = "grep-HDR-KEY-6a7b8c";
const QUERY_KEY: &str = "grep-QRY-KEY-9d0e1f";
const REFUSED_KEY: &str = "grep-REF-KEY-2a3b4c";
const CLIENT_SECRET: &str = "grep-CS-5d6e7f";
const FAILING_SECRET: &str = "grep-CS-FAIL-8a9b0c";
const ACCESS_TOKEN: &str = "grep-ACCESS-TOKEN-1d2e3f";
const REJECTED_SECRET: &str = "grep-REJECTED-PW-4a5b6c";
const FILE_PASSWORD: &str = "grep-FILE-PW-7d8e9f";

fn secrets() -> Vec<String> {
    let mut out: Vec<String> = [
        ADMIN,
        PROXY,
        AUDITOR,
        PASSWORD,
        PASSWORD_NEW,
        HEADER_KEY,
        QUERY_KEY,
        REFUSED_KEY,
        CLIENT_SECRET,
        FAILING_SECRET,
        ACCESS_TOKEN,
        REJECTED_SECRET,
        FILE_PASSWORD,
    ]
    .map(str::to_owned)
    .to_vec();
    for (user, pw) in [("svc", PASSWORD), ("svc", PASSWORD_NEW), ("filer", FILE_PASSWORD)] {
        out.push(basic(user, pw));
    }
    out
}

/// The running binary; killed if a test fails before it is stopped.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    /// SIGTERM (graceful stop), then waits for the exit.
    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Every response, as text with its status and headers, for the grep.
struct Client {
    base: String,
    http: reqwest::Client,
    seen: Vec<String>,
}

impl Client {
    async fn send(&mut self, method: reqwest::Method, path: &str, token: &str, body: Option<&Value>) -> (u16, Value) {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base)).bearer_auth(token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers: Vec<String> =
            resp.headers().iter().map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes()))).collect();
        let text = resp.text().await.expect("body");
        self.seen.push(format!("{method} {path} -> {status}\n{}\n\n{text}", headers.join("\n")));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&mut self, path: &str, token: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, token, None).await
    }

    async fn put(&mut self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, token, Some(body)).await
    }

    async fn expect(&mut self, expected: u16, method: reqwest::Method, path: &str, body: Option<&Value>) -> Value {
        let token = if path.starts_with("/v1/decisions") { PROXY } else { ADMIN };
        let (status, answer) = self.send(method.clone(), path, token, body).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        answer
    }
}

async fn mount_apis(api: &MockServer) {
    let ok = || ResponseTemplate::new(200).set_body_json(json!({"status": "ok"}));
    for pw in [PASSWORD, PASSWORD_NEW] {
        Mock::given(method("GET"))
            .and(path("/basic"))
            .and(header("authorization", format!("Basic {}", basic("svc", pw)).as_str()))
            .respond_with(ok())
            .expect(1..)
            .mount(api)
            .await;
    }
    Mock::given(method("GET"))
        .and(path("/key-header"))
        .and(header("x-api-key", HEADER_KEY))
        .respond_with(ok())
        .expect(1..)
        .mount(api)
        .await;
    // Fails with the key in the query string.
    Mock::given(method("GET"))
        .and(path("/query-500"))
        .and(query_param("api_key", QUERY_KEY))
        .respond_with(ResponseTemplate::new(500).set_body_string("internal trouble"))
        .expect(1..)
        .mount(api)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains(format!("client_secret={CLIENT_SECRET}")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": ACCESS_TOKEN, "token_type": "bearer", "expires_in": 3600})),
        )
        .expect(1..)
        .mount(api)
        .await;
    // A token endpoint that refuses and echoes what it was sent.
    Mock::given(method("POST"))
        .and(path("/token-fail"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({
            "error": "invalid_client",
            "error_description": format!("client_secret {FAILING_SECRET} is wrong")
        })))
        .expect(1..)
        .mount(api)
        .await;
    Mock::given(method("GET"))
        .and(path("/oauth"))
        .and(header("authorization", format!("Bearer {ACCESS_TOKEN}").as_str()))
        .respond_with(ok())
        .expect(1..)
        .mount(api)
        .await;
}

#[tokio::test]
async fn no_secret_in_any_response_log_line_or_data_file() {
    let api = MockServer::start().await;
    mount_apis(&api).await;
    let uri = api.uri();
    let refused_port = free_port();

    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).expect("policies dir");
    // A file-managed rule with a secret: its audit `load` entry and GET must mask it.
    let file = json!({"rules": [{"id": "g-file", "method": "GET", "url": format!("{uri}/file"),
                                 "auth": {"type": "basic", "username": "filer", "password": FILE_PASSWORD}}],
                      "policies": []});
    std::fs::write(policies.join("grep.json"), serde_json::to_vec(&file).expect("json")).expect("policy file");
    let stderr_path = dir.path().join("stderr.log");
    let stdout_path = dir.path().join("stdout.log");
    let port = free_port();
    // Under the PostgreSQL switch the store is a database of its own, grepped too.
    let database_url = crate::helpers::test_database_url(dir.path());

    let mut server = Server {
        child: Command::new(env!("CARGO_BIN_EXE_verdict"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(database_url.iter().flat_map(|url| ["--database-url", url.as_str()]))
            .arg("--data-dir")
            .arg(&data)
            .arg("--policies")
            .arg(&policies)
            .env_remove("VERDICT_SECRET_KEY")
            .env_remove("VERDICT_CONFIG")
            .env_remove("VERDICT_DATABASE_URL")
            .env("VERDICT_ADMIN_TOKEN", ADMIN)
            .env("VERDICT_PROXY_TOKEN", PROXY)
            .env("VERDICT_AUDITOR_TOKEN", AUDITOR)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("stdout file"))
            .stderr(File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("spawn verdict"),
    };
    let mut c = Client { base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new(), seen: Vec::new() };
    wait_until_up(&mut server, &c.base, &stderr_path).await;

    use reqwest::Method as M;
    for p in ["/healthz", "/readyz", "/metrics"] {
        c.get(p, ADMIN).await;
    }

    // Creates.
    let rules = [
        json!({"id": "g-basic", "method": "GET", "url": format!("{uri}/basic"),
               "auth": {"type": "basic", "username": "svc", "password": PASSWORD}}),
        json!({"id": "g-key-header", "method": "GET", "url": format!("{uri}/key-header"),
               "auth": {"type": "api_key", "name": "X-API-Key", "value": HEADER_KEY}}),
        json!({"id": "g-key-query-500", "method": "GET", "url": format!("{uri}/query-500"),
               "auth": {"type": "api_key", "name": "api_key", "value": QUERY_KEY, "in": "query"}}),
        json!({"id": "g-key-query-refused", "method": "GET", "url": format!("http://127.0.0.1:{refused_port}/x"),
               "auth": {"type": "api_key", "name": "api_key", "value": REFUSED_KEY, "in": "query"}}),
        json!({"id": "g-oauth", "method": "GET", "url": format!("{uri}/oauth"),
               "auth": {"type": "oauth2_client_credentials", "token_url": format!("{uri}/token"),
                        "client_id": "verdict", "client_secret": CLIENT_SECRET}}),
        json!({"id": "g-oauth-fail", "method": "GET", "url": format!("{uri}/oauth"),
               "auth": {"type": "oauth2_client_credentials", "token_url": format!("{uri}/token-fail"),
                        "client_id": "verdict", "client_secret": FAILING_SECRET}}),
    ];
    for rule in &rules {
        c.expect(201, M::POST, "/v1/rules", Some(rule)).await;
    }
    for (id, app, rules) in [
        ("g-allow", "grep-ok", json!(["g-basic", "g-key-header", "g-oauth"])),
        ("g-500", "grep-500", json!(["g-key-query-500"])),
        ("g-refused", "grep-refused", json!(["g-key-query-refused"])),
        ("g-token", "grep-token", json!(["g-oauth-fail"])),
    ] {
        c.expect(201, M::POST, "/v1/policies", Some(&json!({"id": id, "applications": [app], "rules": rules}))).await;
    }
    // Refused writes that carry secrets: a duplicate, a validation failure, a
    // malformed body.
    c.expect(409, M::POST, "/v1/rules", Some(&rules[0])).await;
    let invalid = json!({"id": "g-invalid", "method": "GET", "url": "ftp://x.example.com",
                         "auth": {"type": "basic", "username": "svc", "password": REJECTED_SECRET}});
    c.expect(422, M::POST, "/v1/rules", Some(&invalid)).await;
    let malformed = json!({"id": "g-malformed", "method": "GET", "url": "https://x.example.com",
                           "auth": {"type": "basic", "username": "svc", "password": REJECTED_SECRET, "extra": 1}});
    c.expect(400, M::POST, "/v1/rules", Some(&malformed)).await;

    // Decisions: allowed, an API answering 500 with the key in the query, a refused
    // connection with the key in the query, a failing token endpoint.
    let allow = c.expect(200, M::POST, "/v1/decisions", Some(&json!({"application": "grep-ok"}))).await;
    assert_eq!(allow["decision"], "allow", "{allow}");
    for (app, reason) in [("grep-500", "HTTP 500"), ("grep-refused", "connection refused"), ("grep-token", "token")] {
        let deny = c.expect(200, M::POST, "/v1/decisions", Some(&json!({"application": app}))).await;
        assert_eq!(deny["decision"], "deny", "{deny}");
        assert!(deny["reason"].as_str().is_some_and(|r| r.contains(reason)), "{app}: {deny}");
    }
    let (status, _) = c.get("/v1/forward-auth", PROXY).await;
    assert_eq!(status, 403);

    // Updates: the mask sent back, the secret left out, a new value.
    let (_, got) = c.get("/v1/rules/g-basic", AUDITOR).await;
    c.expect(200, M::PUT, "/v1/rules/g-basic", Some(&got)).await;
    for id in ["g-key-header", "g-key-query-500", "g-oauth-fail"] {
        let (_, mut got) = c.get(&format!("/v1/rules/{id}"), AUDITOR).await;
        if let Some(auth) = got["auth"].as_object_mut() {
            auth.remove("value");
            auth.remove("client_secret");
        }
        c.expect(200, M::PUT, &format!("/v1/rules/{id}"), Some(&got)).await;
    }
    let mut new_basic = rules[0].clone();
    new_basic["auth"]["password"] = json!(PASSWORD_NEW);
    c.expect(200, M::PUT, "/v1/rules/g-basic", Some(&new_basic)).await;
    let (status, _) = c.put("/v1/rules/g-file", ADMIN, &rules[0]).await;
    assert_eq!(status, 409);

    // Decisions again, after the updates.
    for app in ["grep-ok", "grep-500", "grep-refused", "grep-token"] {
        c.expect(200, M::POST, "/v1/decisions", Some(&json!({"application": app}))).await;
    }

    // Rule tests, stored and unsaved.
    for rule in &rules {
        let id = rule["id"].as_str().expect("id");
        c.expect(200, M::POST, &format!("/v1/rules/{id}/test"), Some(&json!({"application": "t"}))).await;
    }
    for rule in &rules {
        let mut unsaved = rule.clone();
        unsaved["id"] = json!("g-unsaved");
        c.expect(200, M::POST, "/v1/rules/test", Some(&json!({"rule": unsaved, "context": {"application": "t"}})))
            .await;
    }
    c.expect(422, M::POST, "/v1/rules/test", Some(&json!({"rule": invalid, "context": {"application": "t"}}))).await;

    // Reads of everything.
    for p in [
        "/v1/rules",
        "/v1/rules/g-basic",
        "/v1/rules/g-oauth",
        "/v1/rules/g-file",
        "/v1/policies",
        "/v1/parameters",
        "/v1/audit-logs?limit=1000",
        "/v1/audit-logs/verify",
        "/v1/activity-logs?limit=1000",
        "/openapi.json",
        "/metrics",
    ] {
        c.get(p, AUDITOR).await;
    }

    server.stop();

    // The grep.
    let secrets = secrets();
    for (i, text) in c.seen.iter().enumerate() {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "response {i} contains {s}:\n{text}");
        }
    }
    for log in [&stderr_path, &stdout_path] {
        let bytes = std::fs::read(log).expect("log file");
        assert_absent(&bytes, &secrets, &log.display().to_string());
    }
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(stderr.contains("DEBUG"), "debug logging was not on; the grep would prove little:\n{stderr}");
    let mut files = 0;
    let mut stack = vec![data.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read data dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files += 1;
                assert_absent(&std::fs::read(&p).expect("read"), &secrets, &p.display().to_string());
            }
        }
    }
    assert!(files > 0, "the data directory is empty");
    // The rules really are stored: the database holds their ids. On PostgreSQL, every
    // row of every table as `pg_dump --data-only` prints it gets the same grep.
    let db: Vec<u8> = match &database_url {
        Some(url) => {
            let dump = crate::helpers::pg_dump(url);
            assert_absent(&dump, &secrets, "pg_dump of the database");
            dump
        }
        None => std::fs::read_dir(&data)
            .expect("data dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("verdict.db"))
            .flat_map(|e| std::fs::read(e.path()).unwrap_or_default())
            .collect(),
    };
    assert!(db.windows(b"g-key-query-refused".len()).any(|w| w == b"g-key-query-refused"), "rules not in the database");
}

fn assert_absent(bytes: &[u8], secrets: &[String], what: &str) {
    for s in secrets {
        assert!(!bytes.windows(s.len()).any(|w| w == s.as_bytes()), "{what} contains {s}");
    }
}

async fn wait_until_up(server: &mut Server, base: &str, stderr: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let http = reqwest::Client::new();
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            let log = std::fs::read_to_string(stderr).unwrap_or_default();
            panic!("verdict exited with {status} before answering:\n{log}");
        }
        if let Ok(resp) = http.get(format!("{base}/healthz")).send().await {
            if resp.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "verdict did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
