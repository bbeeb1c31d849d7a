#![allow(dead_code)]
//! Test tools beyond the in-process app: the real `verdict` binary as a child process,
//! free ports, a closed port, and a small API whose answers wait for each other.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::read;

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// An `http://127.0.0.1:PORT` origin where nothing listens (connection refused).
pub fn closed_origin() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// The real `verdict` binary, killed when dropped.
pub struct Binary {
    pub child: Child,
    pub address: String,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub client: reqwest::Client,
}

/// How to start the binary.
pub struct BinaryOptions<'a> {
    /// Holds `data/`, `policies/`, and the captured `stdout.txt` / `stderr.txt`.
    pub dir: &'a Path,
    /// `(variable, value)` pairs; the `VERDICT_*_TOKEN` variables are cleared first.
    pub env: Vec<(&'a str, String)>,
    /// Name of the capture files (so one directory can serve several starts).
    pub run_name: &'a str,
}

impl Binary {
    /// Starts `verdict serve` on a free port with `dir/data` and `dir/policies`, and
    /// waits until `/healthz` answers (or the process exits, which panics with its
    /// stderr). When another process took the port between `free_port` and verdict's
    /// bind, it starts again on another one (the capture files are appended to then).
    pub async fn start(options: BinaryOptions<'_>) -> Binary {
        let stdout = options.dir.join(format!("{}.stdout.txt", options.run_name));
        let stderr = options.dir.join(format!("{}.stderr.txt", options.run_name));
        std::fs::create_dir_all(options.dir.join("policies")).expect("policies dir");
        let capture = |path: &Path, attempt: usize| {
            let mut open = std::fs::OpenOptions::new();
            open.create(true);
            if attempt == 0 {
                open.write(true).truncate(true);
            } else {
                open.append(true);
            }
            open.open(path).expect("capture file")
        };
        for attempt in 0..5 {
            let port = free_port();
            let mut command = Command::new(env!("CARGO_BIN_EXE_verdict"));
            command
                .arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(options.dir.join("data"))
                .arg("--policies")
                .arg(options.dir.join("policies"))
                .env_remove("VERDICT_ADMIN_TOKEN")
                .env_remove("VERDICT_PROXY_TOKEN")
                .env_remove("VERDICT_AUDITOR_TOKEN")
                .env_remove("VERDICT_CONFIG")
                .env_remove("VERDICT_DATABASE_URL")
                .env_remove("VERDICT_LISTEN")
                .env_remove("VERDICT_DATA_DIR")
                .env_remove("VERDICT_POLICIES")
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(capture(&stdout, attempt))
                .stderr(capture(&stderr, attempt));
            // Under the PostgreSQL switch: the database of this directory, unless the
            // test names one itself.
            if !options.env.iter().any(|(k, _)| *k == "VERDICT_DATABASE_URL") {
                if let Some(url) = crate::helpers::test_database_url(options.dir) {
                    command.arg("--database-url").arg(url);
                }
            }
            for (k, v) in &options.env {
                command.env(k, v);
            }
            let child = command.spawn().expect("spawn verdict");
            let mut binary = Binary {
                child,
                address: format!("http://127.0.0.1:{port}"),
                stdout: stdout.clone(),
                stderr: stderr.clone(),
                client: reqwest::Client::new(),
            };
            match binary.wait_ready().await {
                Ok(()) => return binary,
                Err(text) if attempt < 4 && text.contains(&format!("127.0.0.1:{port}: Address already in use")) => {
                    continue
                }
                Err(text) => panic!("{text}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(format!("verdict exited with {status} before answering; stderr:\n{}", self.stderr_text()));
            }
            let answer = self.client.get(format!("{}/healthz", self.address)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("verdict did not answer /healthz within 30 s; stderr:\n{}", self.stderr_text());
    }

    /// What the process wrote to stdout so far.
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// What the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends a signal with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (bounded) until stderr contains `needle`; returns whether it did.
    pub async fn wait_for_stderr(&self, needle: &str) -> bool {
        for _ in 0..400 {
            if self.stderr_text().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// `POST /v1/decisions` with a token.
    pub async fn decide(&self, token: &str, context: &Value) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}/v1/decisions", self.address))
            .bearer_auth(token)
            .json(context)
            .send()
            .await
            .expect("request to verdict");
        read(resp).await
    }

    /// Stops the process (SIGTERM, then SIGKILL if it lingers) and waits for it.
    pub async fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        self.signal("TERM");
        for _ in 0..200 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes `{"rules": ..., "policies": ...}` as `dir/policies/NAME`.
pub fn write_file(dir: &Path, name: &str, rules: Value, policies: Value) -> PathBuf {
    crate::helpers::write_policy_file(dir, name, &json!({"rules": rules, "policies": policies}))
}

/// An API that answers no request before `parties` requests have arrived: with
/// `parties` = 2 and two rules calling it in one decision, both answers come only if
/// the two calls were in flight at the same time.
pub struct BarrierApi {
    pub uri: String,
    pub arrived: Arc<std::sync::atomic::AtomicUsize>,
    handle: actix_web::dev::ServerHandle,
}

impl BarrierApi {
    /// Starts the API on a random port.
    pub async fn start(parties: usize) -> BarrierApi {
        use actix_web::{web, App, HttpResponse, HttpServer};
        let barrier = Arc::new(tokio::sync::Barrier::new(parties));
        let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (b, a) = (barrier.clone(), arrived.clone());
        let server = HttpServer::new(move || {
            let (b, a) = (b.clone(), a.clone());
            App::new().default_service(web::to(move || {
                let (b, a) = (b.clone(), a.clone());
                async move {
                    a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    b.wait().await;
                    HttpResponse::Ok().json(json!({"status": "ok"}))
                }
            }))
        })
        .workers(1)
        .listen(listener)
        .expect("listen")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        BarrierApi { uri: format!("http://127.0.0.1:{port}"), arrived, handle }
    }
}

impl Drop for BarrierApi {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        tokio::spawn(async move { handle.stop(false).await });
    }
}

/// A TCP proxy a test puts between verdict and PostgreSQL: `cut` closes every
/// connection through it and refuses new ones (the database "goes away"), `restore`
/// accepts again on the same port.
pub struct PgProxy {
    pub port: u16,
    target: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl PgProxy {
    /// Starts forwarding a free loopback port to the PostgreSQL server of `server_url`.
    pub async fn start(server_url: &str) -> PgProxy {
        use std::net::ToSocketAddrs;
        let url = url::Url::parse(server_url).expect("PostgreSQL server URL");
        let host = url.host_str().unwrap_or("127.0.0.1");
        let target = (host, url.port().unwrap_or(5432))
            .to_socket_addrs()
            .expect("PostgreSQL address")
            .next()
            .expect("PostgreSQL address");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, _) = tokio::sync::watch::channel(false);
        let mut proxy = PgProxy { port, target, cut, accept: None };
        proxy.serve(listener);
        proxy
    }

    /// `server_url` with the proxy as host and port and `database` as database.
    pub fn url(&self, server_url: &str, database: &str) -> String {
        let mut url = url::Url::parse(server_url).expect("PostgreSQL server URL");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(self.port)).expect("port");
        url.set_path(&format!("/{database}"));
        url.to_string()
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (cut, target) = (self.cut.clone(), self.target);
        self.accept = Some(tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(pump(client, target, cut.subscribe()));
            }
        }));
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        self.cut.send_replace(true);
    }

    /// Accepts and forwards connections again.
    pub async fn restore(&mut self) {
        if self.accept.is_some() {
            return;
        }
        self.cut.send_replace(false);
        // The aborted accept task drops its listener at its next poll; retry the bind.
        for _ in 0..100 {
            if let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                self.serve(listener);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the proxy could not listen on port {} again", self.port);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn pump(
    mut client: tokio::net::TcpStream,
    target: std::net::SocketAddr,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    if *cut.borrow_and_update() {
        return;
    }
    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
}
