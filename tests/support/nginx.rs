//! A real nginx (the Debian package) on a random loopback port, for integration tests
//! that put verdict behind `auth_request`.
//!
//! Standalone: needs only `std` and the `tempfile` dev-dependency. Use it from a test
//! crate with `mod support { pub mod nginx; }` (or `#[path = "support/nginx.rs"] mod
//! nginx;`).
//!
//! ```ignore
//! let Some(nginx) = nginx::start_or_skip(
//!     include_str!("../examples/nginx/verdict.conf.template"),
//!     &[("VERDICT", &verdict_addr), ("UPSTREAM", &backend_addr), ("PROXY_TOKEN", "t")],
//! ) else { return };
//! let url = nginx.url("/some/path");
//! ```
//!
//! Placeholders in the template, each written `{{NAME}}`:
//!
//! | name | value |
//! | --- | --- |
//! | `LISTEN` | `127.0.0.1:PORT`, a free port the harness picked (always set by the harness) |
//! | `PREFIX` | the temp dir nginx runs in: logs, pid file, temp files (always set by the harness) |
//! | `CERTS` | absolute path of `fixtures/certs` (default; may be overridden) |
//! | `APPLICATION` | `payroll` (default; may be overridden) |
//! | `VERDICT`, `UPSTREAM`, `PROXY_TOKEN`, anything else | from `vars` |
//!
//! A placeholder left without a value is an error. A template that has no `events`
//! block is taken to be the inside of `http { }` (e.g. just a `server { }` block) and
//! is wrapped in a minimal nginx.conf that keeps every file inside PREFIX.
//!
//! nginx missing: `start` returns `Err` whose text starts with [`NGINX_MISSING`] —
//! except when the environment has `CI=true`, where it panics, so that CI fails
//! rather than silently skipping the nginx tests.
//!
//! Running as root: nginx's workers would switch to `nobody` and then need to enter
//! PREFIX to buffer large request/response bodies in its temp dirs, which fails with
//! "Permission denied" (a 500) whenever TMPDIR or a parent is not world-searchable.
//! The harness therefore adds `-g 'user root;'` when it runs as root and the config
//! has no `user` directive. As non-root nothing is added (nginx ignores `user` then).
//! Nothing is written outside PREFIX: the Debian build logs to stderr before it reads
//! the config, and the templates put every log, pid and temp path in PREFIX.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long `start` waits for nginx to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Prefix of the error `start` returns when there is no nginx binary.
pub const NGINX_MISSING: &str = "nginx not installed";

/// A running nginx. Dropping it stops nginx (SIGTERM, then SIGKILL after 5 s) and
/// removes its temp dir.
pub struct Nginx {
    /// The loopback port nginx listens on (`{{LISTEN}}` = `127.0.0.1:port`).
    pub port: u16,
    /// The temp dir nginx runs in (`{{PREFIX}}`); holds `nginx.conf`, `error.log`,
    /// `access.log`, `stderr.log`.
    pub prefix: PathBuf,
    child: Option<Child>,
    // Dropped after `child` is stopped (see Drop).
    dir: Option<tempfile::TempDir>,
}

impl Nginx {
    /// Renders `template` into a fresh temp dir and runs
    /// `nginx -p PREFIX -c PREFIX/nginx.conf -g 'daemon off;'` as a child, then waits
    /// (up to [`START_TIMEOUT`]) until it accepts connections on its port.
    ///
    /// `vars` are `(NAME, value)` pairs for `{{NAME}}`; a name may also be given as
    /// `{{NAME}}`. `LISTEN` and `PREFIX` cannot be given: the harness sets them.
    pub fn start(template: &str, vars: &[(&str, &str)]) -> Result<Nginx, String> {
        let bin = match find_nginx() {
            Some(bin) => bin,
            None => {
                let msg = format!(
                    "{NGINX_MISSING}: no `nginx` on PATH nor in /usr/sbin \
                     (install it with `apt-get install -y nginx`)"
                );
                if in_ci() {
                    panic!("CI=true and {msg}; the nginx integration tests must run in CI");
                }
                return Err(msg);
            }
        };

        // The port is picked by binding port 0 and letting it go, so another process
        // may grab it before nginx does: retry a few times on "Address already in use".
        let mut last_err = String::new();
        for _ in 0..5 {
            match start_once(&bin, template, vars) {
                Ok(nginx) => return Ok(nginx),
                Err(StartError::AddrInUse(e)) => last_err = e,
                Err(StartError::Fatal(e)) => return Err(e),
            }
        }
        Err(last_err)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// `https://localhost:PORT{path}` (fixtures/certs/server.pem is for `localhost`
    /// and `127.0.0.1`).
    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{}", self.port, path)
    }

    /// nginx's error log (`PREFIX/error.log`), or "" if there is none. Handy in
    /// assertion messages.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }

    /// nginx's access log (`PREFIX/access.log`), or "".
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.prefix.join("access.log")).unwrap_or_default()
    }

    /// Stops nginx now (what Drop does).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// The nginx binary: `nginx` on PATH, else /usr/sbin/nginx (not on a non-root PATH
/// on Debian), /usr/local/sbin/nginx, /usr/local/nginx/sbin/nginx.
pub fn find_nginx() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join("nginx")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(
            ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"].into_iter().map(PathBuf::from),
        )
        .find(|p| is_executable(p))
}

/// Absolute path of `fixtures/certs` (the `{{CERTS}}` default).
pub fn certs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("certs")
}

/// `Nginx::start`, but when nginx is not installed (and not in CI, where `start`
/// panics) prints "skipping: nginx not installed" and returns None. Any other failure
/// panics with nginx's own error output.
pub fn start_or_skip(template: &str, vars: &[(&str, &str)]) -> Option<Nginx> {
    match Nginx::start(template, vars) {
        Ok(nginx) => Some(nginx),
        Err(e) if e.starts_with(NGINX_MISSING) => {
            eprintln!("skipping: {NGINX_MISSING}");
            None
        }
        Err(e) => panic!("nginx did not start: {e}"),
    }
}

/// Fills the `{{NAME}}` placeholders of `template` (see the module docs) and wraps a
/// template without an `events` block into a full nginx.conf. Errors on a placeholder
/// without a value.
pub fn render(template: &str, vars: &[(&str, &str)], listen: &str, prefix: &Path) -> Result<String, String> {
    let certs = certs_dir();
    let prefix_s = prefix.to_str().ok_or("temp dir path is not UTF-8")?.to_string();
    let mut values: Vec<(String, String)> =
        vec![("CERTS".into(), certs.to_string_lossy().into_owned()), ("APPLICATION".into(), "payroll".into())];
    for (name, value) in vars {
        let name = name.trim().trim_start_matches("{{").trim_end_matches("}}").trim();
        if name == "LISTEN" || name == "PREFIX" {
            return Err(format!("{{{{{name}}}}} is set by the harness and cannot be given"));
        }
        values.retain(|(n, _)| n != name);
        values.push((name.to_string(), value.to_string()));
    }
    values.push(("LISTEN".into(), listen.to_string()));
    values.push(("PREFIX".into(), prefix_s.clone()));

    let mut conf = if has_directive(template, "events") { template.to_string() } else { wrap_http(template) };
    for (name, value) in &values {
        conf = conf.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(start) = conf.find("{{") {
        let end = conf[start..].find("}}").map(|e| start + e + 2).unwrap_or(conf.len().min(start + 40));
        return Err(format!("nginx template: no value for placeholder {}", &conf[start..end]));
    }
    Ok(conf)
}

// ---------------------------------------------------------------------------------

enum StartError {
    AddrInUse(String),
    Fatal(String),
}

fn start_once(bin: &Path, template: &str, vars: &[(&str, &str)]) -> Result<Nginx, StartError> {
    let fatal = StartError::Fatal;
    let port = free_port().map_err(|e| fatal(format!("no free port: {e}")))?;
    let dir =
        tempfile::Builder::new().prefix("verdict-nginx-").tempdir().map_err(|e| fatal(format!("temp dir: {e}")))?;
    let prefix = dir.path().to_path_buf();
    let listen = format!("127.0.0.1:{port}");
    let conf = render(template, vars, &listen, &prefix).map_err(fatal)?;
    let conf_path = prefix.join("nginx.conf");
    fs::write(&conf_path, &conf).map_err(|e| fatal(format!("writing {}: {e}", conf_path.display())))?;
    let stderr_path = prefix.join("stderr.log");
    let stderr = fs::File::create(&stderr_path).map_err(|e| fatal(format!("{}: {e}", stderr_path.display())))?;

    let mut globals = String::from("daemon off;");
    if running_as_root() && !has_directive(&conf, "user") {
        globals.push_str(" user root;");
    }

    let mut child = Command::new(bin)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .arg("-g")
        .arg(&globals)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .map_err(|e| fatal(format!("running {}: {e}", bin.display())))?;

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let pid_path = prefix.join("nginx.pid");
    let expects_pid_file = conf.contains(&format!("pid {}/nginx.pid;", prefix.display()));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let out = diagnostics(&prefix);
            let msg = format!("nginx exited at start ({status}) with {}:\n{out}", conf_path.display());
            return Err(if out.contains("Address already in use") {
                StartError::AddrInUse(msg)
            } else {
                StartError::Fatal(msg)
            });
        }
        // Ready when the port answers AND nginx wrote its pid file (it does so after
        // binding), so that another process that grabbed the port is not mistaken
        // for nginx. Only when the config puts the pid file at PREFIX/nginx.pid;
        // otherwise a connection alone is accepted.
        let pid_ok = !expects_pid_file
            || fs::read_to_string(&pid_path).map(|p| p.trim() == child.id().to_string()).unwrap_or(false);
        if pid_ok && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            // One more look: a process on a stolen port would make nginx exit now.
            sleep(Duration::from_millis(20));
            if child.try_wait().map(|s| s.is_none()).unwrap_or(false) {
                return Ok(Nginx { port, prefix, child: Some(child), dir: Some(dir) });
            }
            continue;
        }
        if Instant::now() >= deadline {
            stop_child(child);
            return Err(fatal(format!(
                "nginx did not accept connections on {addr} within {:?}:\n{}",
                START_TIMEOUT,
                diagnostics(&prefix)
            )));
        }
        sleep(Duration::from_millis(50));
    }
}

/// SIGTERM (fast shutdown: the master stops its workers), up to 5 s, then SIGKILL to
/// the master and its workers.
fn stop_child(mut child: Child) {
    let pid = child.id();
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let workers = children_of(pid);
    signal(pid, "TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        sleep(Duration::from_millis(20));
    }
    for w in workers.into_iter().chain(children_of(pid)) {
        signal(w, "KILL");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `kill -SIG pid` through sh's builtin (no procps needed, no libc crate).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{sig} {pid} 2>/dev/null"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Pids whose parent is `ppid`, from /proc (empty where there is no /proc).
fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
                // "pid (comm) state ppid ...": comm may hold spaces and ')'.
                let rest = &stat[stat.rfind(')')? + 1..];
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            }) == Some(ppid)
        })
        .collect()
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn in_ci() -> bool {
    std::env::var("CI").map(|v| v.eq_ignore_ascii_case("true") || v == "1").unwrap_or(false)
}

/// Effective uid 0, read from /proc/self/status (std has no geteuid).
fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            // Uid: real effective saved fs
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Whether some line of `conf` (comments stripped) starts with the directive `name`.
fn has_directive(conf: &str, name: &str) -> bool {
    conf.lines().any(|line| {
        let line = line.split('#').next().unwrap_or("").trim_start();
        line.strip_prefix(name)
            .map(|rest| rest.starts_with(|c: char| c.is_whitespace() || c == '{' || c == ';'))
            .unwrap_or(false)
    })
}

/// A minimal nginx.conf around the inside of an `http { }` block; every file nginx
/// writes stays in PREFIX.
fn wrap_http(inner: &str) -> String {
    format!(
        "worker_processes 1;\n\
         error_log {{{{PREFIX}}}}/error.log info;\n\
         pid {{{{PREFIX}}}}/nginx.pid;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         access_log {{{{PREFIX}}}}/access.log;\n\
         client_body_temp_path {{{{PREFIX}}}}/client_body_temp;\n\
         proxy_temp_path {{{{PREFIX}}}}/proxy_temp;\n\
         fastcgi_temp_path {{{{PREFIX}}}}/fastcgi_temp;\n\
         uwsgi_temp_path {{{{PREFIX}}}}/uwsgi_temp;\n\
         scgi_temp_path {{{{PREFIX}}}}/scgi_temp;\n\
         {inner}\n\
         }}\n"
    )
}

/// nginx's stderr and error log, for error messages.
fn diagnostics(prefix: &Path) -> String {
    let mut out = String::new();
    for name in ["stderr.log", "error.log"] {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(prefix.join(name)) {
            let _ = f.read_to_string(&mut text);
        }
        if !text.trim().is_empty() {
            out.push_str(&format!("--- {name}\n{}\n", text.trim_end()));
        }
    }
    if out.is_empty() {
        out.push_str("(no output from nginx)");
    }
    out
}
