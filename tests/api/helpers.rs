#![allow(dead_code)]
//! Starts the real application on a random port with its own data and policy
//! directories, and talks to it over HTTP like a gateway or an admin would.

use std::path::{Path, PathBuf};

use serde_json::Value;
use verdict::config::Settings;
use verdict::startup::Application;
use verdict::tokens::{Role, TokenEntry};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const PROXY_TOKEN: &str = "test-proxy-token-0123456789";
pub const AUDITOR_TOKEN: &str = "test-auditor-token-0123456789";

/// A running verdict.
pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub state: actix_web::web::Data<verdict::api::AppState>,
}

/// Changes to settings before start.
pub type Tweak = Box<dyn FnOnce(&mut Settings)>;

/// Options for [`spawn_app_with`].
#[derive(Default)]
pub struct AppOptions {
    /// Policy files to write before start: (file name, JSON).
    pub files: Vec<(String, Value)>,
    /// Leave tokens unconfigured (first-start generation).
    pub no_tokens: bool,
    /// Adjust settings before start.
    pub tweak: Option<Tweak>,
}

/// Settings for a test app in `dir`.
pub fn test_settings(dir: &Path) -> Settings {
    let mut settings = Settings::with_dirs(&dir.join("data"), &dir.join("policies"));
    settings.tokens = vec![
        TokenEntry::from_plain("test-admin", Role::Admin, ADMIN_TOKEN),
        TokenEntry::from_plain("test-proxy", Role::Proxy, PROXY_TOKEN),
        TokenEntry::from_plain("test-auditor", Role::Auditor, AUDITOR_TOKEN),
    ];
    settings
}

/// Writes a policy file into the app's policy directory.
pub fn write_policy_file(dir: &Path, name: &str, body: &Value) -> PathBuf {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("policies dir");
    let path = policies.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(body).expect("json")).expect("write policy file");
    path
}

/// Starts verdict with one policy file holding `rules` and `policies`.
pub async fn spawn_app(rules: Value, policies: Value) -> TestApp {
    spawn_app_with(AppOptions {
        files: vec![("test.json".into(), serde_json::json!({"rules": rules, "policies": policies}))],
        ..Default::default()
    })
    .await
}

/// Starts verdict with options.
pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, body) in &options.files {
        write_policy_file(dir.path(), name, body);
    }
    let mut settings = test_settings(dir.path());
    if options.no_tokens {
        settings.tokens.clear();
    }
    if let Some(tweak) = options.tweak {
        tweak(&mut settings);
    }
    let app = Application::build(settings).await.expect("verdict failed to start");
    let port = app.port();
    let state = app.state();
    tokio::spawn(app.run_until_stopped());
    TestApp { address: format!("http://127.0.0.1:{port}"), port, client: reqwest::Client::new(), dir, state }
}

impl TestApp {
    /// `POST /v1/decisions` with the proxy token; returns status and JSON.
    pub async fn decide(&self, context: Value) -> (u16, Value) {
        self.post_json("/v1/decisions", PROXY_TOKEN, &context).await
    }

    /// Asks for a decision and expects a 200; returns the answer.
    pub async fn decision(&self, context: Value) -> Value {
        let (status, body) = self.decide(context).await;
        assert_eq!(status, 200, "decision failed: {body}");
        body
    }

    /// POSTs JSON with a token.
    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.address))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    /// Sends any request built by the caller.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.address))
    }

    /// GET with a token.
    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let resp = self.client.get(format!("{}{path}", self.address)).bearer_auth(token).send().await.expect("request");
        read(resp).await
    }
}

/// Status and JSON body (`Value::Null` when the body is not JSON).
pub async fn read(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Path of a file under `fixtures/`.
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(path)
}
