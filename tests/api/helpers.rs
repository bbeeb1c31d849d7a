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
    /// Start on this directory (prepared by the test) instead of a new one.
    pub dir: Option<tempfile::TempDir>,
}

/// Settings for a test app in `dir` (on PostgreSQL under [`PG_SWITCH`]).
pub fn test_settings(dir: &Path) -> Settings {
    let mut settings = Settings::with_dirs(&dir.join("data"), &dir.join("policies"));
    settings.tokens = vec![
        TokenEntry::from_plain("test-admin", Role::Admin, ADMIN_TOKEN),
        TokenEntry::from_plain("test-proxy", Role::Proxy, PROXY_TOKEN),
        TokenEntry::from_plain("test-auditor", Role::Auditor, AUDITOR_TOKEN),
    ];
    // Under the PostgreSQL switch: the database of this directory.
    settings.database_url = test_database_url(dir);
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
    let dir = match options.dir {
        Some(dir) => dir,
        None => tempfile::tempdir().expect("tempdir"),
    };
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

// --- The PostgreSQL switch --------------------------------------------------------------
//
// With `VERDICT_TEST_DATABASE_URL` set to a PostgreSQL server URL without a database
// (`postgres://postgres@127.0.0.1:5432`), every test app, in-process or the real binary,
// gets a fresh database of its own, keyed by the test's directory: a restart on the same
// directory finds the same database, as it finds the same SQLite file otherwise. The
// databases are named `verdict_t_<uuid v7>` and dropped when the test binary exits
// (and, should a run have been killed, by a later run once they are 6 hours old).

/// The variable that switches the suite to PostgreSQL.
pub const PG_SWITCH: &str = "VERDICT_TEST_DATABASE_URL";

/// The server the multi-replica tests use when the switch is not set.
pub const PG_DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// The PostgreSQL server the suite runs on, when the switch is set.
pub fn pg_server() -> Option<String> {
    std::env::var(PG_SWITCH).ok().map(|s| s.trim().trim_end_matches('/').to_string()).filter(|s| !s.is_empty())
}

/// The server for tests that always need PostgreSQL (several replicas).
pub fn pg_server_or_default() -> String {
    pg_server().unwrap_or_else(|| PG_DEFAULT_SERVER.to_string())
}

/// `server` with its database set to `name` (user, host, port and query kept).
pub fn pg_url(server: &str, name: &str) -> String {
    let mut url = url::Url::parse(server).unwrap_or_else(|e| panic!("{PG_SWITCH} is not a URL ({server}): {e}"));
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// The database of the test app whose directory is `dir`, when the suite runs on
/// PostgreSQL (created on first use).
pub fn test_database_url(dir: &Path) -> Option<String> {
    let server = pg_server()?;
    static DATABASES: std::sync::Mutex<Option<std::collections::HashMap<PathBuf, String>>> =
        std::sync::Mutex::new(None);
    let mut databases = DATABASES.lock().unwrap_or_else(|e| e.into_inner());
    let databases = databases.get_or_insert_with(Default::default);
    if let Some(url) = databases.get(dir) {
        return Some(url.clone());
    }
    let url = create_database(&server);
    databases.insert(dir.to_path_buf(), url.clone());
    Some(url)
}

/// Runs `work` to completion on a runtime of its own, in a thread of its own: usable
/// from synchronous code called inside a test's runtime.
pub fn on_own_runtime<T: Send + 'static>(work: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(work)
    })
    .join()
    .expect("PostgreSQL helper thread")
}

/// A plain connection to `url`; panics with a hint when PostgreSQL does not answer.
pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must answer for this test ({url}): {e}; start it or unset {PG_SWITCH}"));
    tokio::spawn(connection);
    client
}

/// Creates a fresh, empty database on `server` and returns its URL. Blocking (see
/// [`on_own_runtime`]); the database is dropped when the test binary exits.
pub fn create_database(server: &str) -> String {
    let name = format!("verdict_t_{}", uuid::Uuid::now_v7().simple());
    let admin_url = pg_url(server, "postgres");
    let created = name.clone();
    on_own_runtime(async move {
        let admin = pg_connect(&admin_url).await;
        sweep_stale_databases(&admin).await;
        let mut last = None;
        // Another session copying the template at the same moment can make CREATE
        // DATABASE fail ("source database is being accessed"); that passes.
        for _ in 0..50 {
            match admin.batch_execute(&format!("CREATE DATABASE {created}")).await {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("CREATE DATABASE {created}: {last:?}");
    });
    drop_at_exit(server, &name);
    pg_url(server, &name)
}

/// Drops databases of earlier runs that ended without dropping theirs (killed), once
/// per process: `verdict_t_` names carry their creation time (uuid v7).
async fn sweep_stale_databases(admin: &tokio_postgres::Client) {
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SWEPT.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let Ok(rows) = admin.query("SELECT datname FROM pg_database WHERE datname LIKE 'verdict\\_t\\_%'", &[]).await
    else {
        return;
    };
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    for row in rows {
        let name: String = row.get(0);
        let Some(created_ms) =
            name.strip_prefix("verdict_t_").and_then(|h| u128::from_str_radix(h.get(..12)?, 16).ok())
        else {
            continue;
        };
        if now_ms.saturating_sub(created_ms) > 6 * 3600 * 1000 {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        }
    }
}

/// Remembers `name` to be dropped when the process exits.
fn drop_at_exit(server: &str, name: &str) {
    static CREATED: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    static REGISTER: std::sync::Once = std::sync::Once::new();
    extern "C" {
        fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
    }
    extern "C" fn drop_all() {
        let created = std::mem::take(&mut *CREATED.lock().unwrap_or_else(|e| e.into_inner()));
        if created.is_empty() {
            return;
        }
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                let work = async {
                    for (server, name) in created {
                        let url = pg_url(&server, "postgres");
                        if let Ok((client, connection)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                            tokio::spawn(connection);
                            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                        }
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(60), work).await;
            });
        })
        .join();
    }
    CREATED.lock().unwrap_or_else(|e| e.into_inner()).push((server.to_string(), name.to_string()));
    // SAFETY: registers a plain `extern "C"` function with the C library, once.
    REGISTER.call_once(|| unsafe {
        atexit(drop_all);
    });
}

/// Everything the database at `url` holds, as `pg_dump --data-only` prints it.
pub fn pg_dump(url: &str) -> Vec<u8> {
    let out = std::process::Command::new("pg_dump")
        .args(["--data-only", "--no-owner", "--dbname", url])
        .output()
        .expect("run pg_dump (the postgresql-client package)");
    assert!(out.status.success(), "pg_dump failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stdout.is_empty(), "pg_dump printed nothing");
    out.stdout
}

/// The store a test app on `dir` uses (its PostgreSQL database under the switch, the
/// SQLite file in `dir/data` otherwise), opened with the data directory's secret key,
/// for tests that prepare or inspect it while verdict is not running.
pub async fn open_test_store(dir: &Path) -> std::sync::Arc<dyn verdict::store::Store> {
    let data = dir.join("data");
    let secrets = std::sync::Arc::new(
        verdict::secrets::SecretBox::load_or_create(&data, std::env::var("VERDICT_SECRET_KEY").ok().as_deref())
            .expect("secret key"),
    );
    match test_database_url(dir) {
        Some(url) => std::sync::Arc::new(
            verdict::store::PgStore::connect(&url, secrets, "test").await.expect("PostgreSQL store"),
        ),
        None => std::sync::Arc::new(verdict::store::SqliteStore::open(&data, secrets).expect("SQLite store")),
    }
}
