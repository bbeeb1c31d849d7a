//! Typed settings, resolved once at start: flag > environment variable > config file
//! > default. clap handles flag-over-variable; the file fills what neither set.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tokens::{Role, TokenEntry};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Header names forward auth reads the context from (SPEC §7).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardAuthHeaders {
    pub application: Vec<String>,
    pub host: Vec<String>,
    pub username: Vec<String>,
    pub groups: Vec<String>,
    pub group_names: Vec<String>,
    pub remote_ip: Vec<String>,
    pub forwarded_for: Vec<String>,
    pub user_agent: Vec<String>,
    pub device_id: Vec<String>,
    pub internal_addr: Vec<String>,
    pub client_certificate: Vec<String>,
}

impl Default for ForwardAuthHeaders {
    fn default() -> Self {
        let v = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
        ForwardAuthHeaders {
            application: v(&["X-Verdict-Application"]),
            host: v(&["X-Forwarded-Host", "Host"]),
            username: v(&["X-Forwarded-User", "Remote-User", "X-Auth-Request-User"]),
            groups: v(&["X-Forwarded-Groups"]),
            group_names: v(&["X-Forwarded-Group-Names"]),
            remote_ip: v(&["X-Real-IP"]),
            forwarded_for: v(&["X-Forwarded-For"]),
            user_agent: v(&["User-Agent"]),
            device_id: v(&["X-Device-Id"]),
            internal_addr: v(&["X-Forwarded-Internal-Addr"]),
            client_certificate: v(&["X-SSL-Client-Cert"]),
        }
    }
}

/// A token as the config file lists it (hash only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileToken {
    pub name: String,
    pub role: Role,
    pub sha256: String,
}

/// The config file (TOML). Every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub policies: Option<PathBuf>,
    pub database_url: Option<String>,
    pub log_format: Option<LogFormat>,
    pub max_body_bytes: Option<usize>,
    pub activity_retention_days: Option<u32>,
    pub replica_name: Option<String>,
    pub tokens: Vec<FileToken>,
    pub forward_auth: Option<ForwardAuthHeaders>,
    pub outbound: Option<OutboundFile>,
    pub circuit_breaker: Option<BreakerFile>,
    pub decision_cache: Option<CacheFile>,
    pub activity_log: Option<ActivityLogFile>,
    pub instance_name: Option<String>,
    pub webhooks: Option<WebhooksFile>,
}

/// `[webhooks]` in the config file: how the delivery worker paces itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksFile {
    /// How often the worker looks for due deliveries, in ms (default 1000); it also
    /// wakes at once after a decision or change that produced events.
    pub poll_ms: Option<u64>,
    /// First retry delay in ms, doubled per attempt (default 1000).
    pub backoff_base_ms: Option<u64>,
    /// Longest retry delay in seconds, `Retry-After` included (default 3600).
    pub max_backoff_s: Option<u64>,
    /// Calls in flight at once (default 32); one webhook uses at most half of them.
    pub concurrency: Option<usize>,
}

/// Resolved `[webhooks]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    pub poll_ms: u64,
    pub backoff_base_ms: u64,
    pub max_backoff_s: u64,
    pub concurrency: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings { poll_ms: 1000, backoff_base_ms: 1000, max_backoff_s: 3600, concurrency: 32 }
    }
}

/// `[activity_log]` in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActivityLogFile {
    /// `full` (default): each batch is fsynced before its decisions are answered, so
    /// they survive `kill -9` and power loss. `normal`: not fsynced per batch; answered
    /// decisions survive `kill -9` of verdict but not an OS crash or power loss.
    pub synchronous: Option<crate::store::Synchronous>,
}

/// `[circuit_breaker]` in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerFile {
    /// Consecutive errors that open an origin's circuit (default 5).
    pub failures: Option<u32>,
    /// Seconds an open circuit fails fast before a probe (default 30).
    pub cooldown_s: Option<u64>,
    /// Calls in flight per API origin (default 256).
    pub max_in_flight: Option<usize>,
}

/// `[decision_cache]` in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheFile {
    /// Most cached outcomes (default 100000).
    pub max_entries: Option<u64>,
}

/// Outbound limits in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundFile {
    pub max_response_bytes: Option<usize>,
    pub follow_redirects: Option<bool>,
}

/// What `verdict serve` takes on the command line (and from `VERDICT_*`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "VERDICT_LISTEN")]
    pub listen: Option<String>,
    /// Data directory (SQLite database, keys, spool) [default: ./data]
    #[arg(long, env = "VERDICT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of policy files [default: ./policies]
    #[arg(long, env = "VERDICT_POLICIES")]
    pub policies: Option<PathBuf>,
    /// Config file (TOML)
    #[arg(long, env = "VERDICT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Store URL: sqlite://PATH
    #[arg(long, env = "VERDICT_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Log format on stderr
    #[arg(long, env = "VERDICT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Days of activity log kept [default: 30]
    #[arg(long, env = "VERDICT_ACTIVITY_RETENTION_DAYS")]
    pub activity_retention_days: Option<u32>,
    /// Name of this replica in activity entries and metrics [default: host name]
    #[arg(long, env = "VERDICT_REPLICA_NAME")]
    pub replica_name: Option<String>,
    /// Name of this installation, the `account` of webhook events [default: verdict]
    #[arg(long, env = "VERDICT_INSTANCE_NAME")]
    pub instance_name: Option<String>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub data_dir: PathBuf,
    pub policies: PathBuf,
    pub database_url: Option<String>,
    pub log_format: LogFormat,
    pub max_body_bytes: usize,
    pub activity_retention_days: u32,
    pub replica_name: String,
    /// Tokens from the config file and environment; empty means "generate".
    pub tokens: Vec<TokenEntry>,
    pub forward_auth: ForwardAuthHeaders,
    pub max_response_bytes: usize,
    pub follow_redirects: bool,
    /// Decision cache and circuit breaker settings.
    pub engine: crate::engine::EngineConfig,
    /// Durability of activity-log commits (`[activity_log] synchronous`).
    pub activity_synchronous: crate::store::Synchronous,
    /// The installation's name: `account` in webhook events.
    pub instance_name: String,
    /// Webhook delivery pacing.
    pub webhooks: WebhookSettings,
}

/// Why settings could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
}

impl Settings {
    /// Defaults for everything, with a data and policy directory (tests use this).
    pub fn with_dirs(data_dir: &Path, policies: &Path) -> Settings {
        Settings {
            listen: "127.0.0.1:0".into(),
            data_dir: data_dir.to_owned(),
            policies: policies.to_owned(),
            database_url: None,
            log_format: LogFormat::Text,
            max_body_bytes: 1 << 20,
            activity_retention_days: 30,
            replica_name: host_name(),
            tokens: Vec::new(),
            forward_auth: ForwardAuthHeaders::default(),
            max_response_bytes: 1 << 20,
            follow_redirects: false,
            engine: crate::engine::EngineConfig::default(),
            activity_synchronous: crate::store::Synchronous::Full,
            instance_name: "verdict".into(),
            webhooks: WebhookSettings::default(),
        }
    }

    /// Resolves flags and environment over the config file over defaults.
    pub fn resolve(args: ServeArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.clone(), e))?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse(path.clone(), e.to_string()))?
            }
            None => FileConfig::default(),
        };
        let mut s = Settings::with_dirs(
            &args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("./data")),
            &args.policies.or(file.policies).unwrap_or_else(|| PathBuf::from("./policies")),
        );
        s.listen = args.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:8080".into());
        s.database_url = args.database_url.or(file.database_url);
        s.log_format = args.log_format.or(file.log_format).unwrap_or_default();
        s.max_body_bytes = file.max_body_bytes.unwrap_or(1 << 20);
        s.activity_retention_days = args.activity_retention_days.or(file.activity_retention_days).unwrap_or(30);
        if let Some(name) = args.replica_name.or(file.replica_name) {
            s.replica_name = name;
        }
        s.forward_auth = file.forward_auth.unwrap_or_default();
        if let Some(o) = file.outbound {
            s.max_response_bytes = o.max_response_bytes.unwrap_or(s.max_response_bytes);
            s.follow_redirects = o.follow_redirects.unwrap_or(false);
        }
        if let Some(b) = file.circuit_breaker {
            let breaker = &mut s.engine.breaker;
            breaker.failures = b.failures.unwrap_or(breaker.failures).max(1);
            breaker.cooldown = b.cooldown_s.map(std::time::Duration::from_secs).unwrap_or(breaker.cooldown);
            breaker.max_in_flight = b.max_in_flight.unwrap_or(breaker.max_in_flight).max(1);
        }
        if let Some(c) = file.decision_cache {
            s.engine.cache_max_entries = c.max_entries.unwrap_or(s.engine.cache_max_entries);
        }
        if let Some(a) = file.activity_log {
            s.activity_synchronous = a.synchronous.unwrap_or(s.activity_synchronous);
        }
        if let Some(name) = args.instance_name.or(file.instance_name) {
            s.instance_name = name;
        }
        if let Some(w) = file.webhooks {
            let d = &mut s.webhooks;
            d.poll_ms = w.poll_ms.unwrap_or(d.poll_ms).max(10);
            d.backoff_base_ms = w.backoff_base_ms.unwrap_or(d.backoff_base_ms).max(1);
            d.max_backoff_s = w.max_backoff_s.unwrap_or(d.max_backoff_s).max(1);
            d.concurrency = w.concurrency.unwrap_or(d.concurrency).max(1);
        }
        s.tokens =
            file.tokens.into_iter().map(|t| TokenEntry { name: t.name, role: t.role, sha256: t.sha256 }).collect();
        for (var, name, role) in [
            ("VERDICT_ADMIN_TOKEN", "env-admin", Role::Admin),
            ("VERDICT_PROXY_TOKEN", "env-proxy", Role::Proxy),
            ("VERDICT_AUDITOR_TOKEN", "env-auditor", Role::Auditor),
        ] {
            if let Ok(token) = std::env::var(var) {
                if !token.is_empty() {
                    s.tokens.push(TokenEntry::from_plain(name, role, &token));
                }
            }
        }
        Ok(s)
    }
}

/// The host name, for the default replica name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "verdict".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_and_cache_settings_come_from_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("verdict.toml");
        std::fs::write(
            &path,
            "[circuit_breaker]\nfailures = 3\ncooldown_s = 7\nmax_in_flight = 9\n[decision_cache]\nmax_entries = 42\n",
        )
        .expect("write config");
        let s = Settings::resolve(ServeArgs { config: Some(path), ..Default::default() }).expect("resolve");
        assert_eq!(s.engine.breaker.failures, 3);
        assert_eq!(s.engine.breaker.cooldown, std::time::Duration::from_secs(7));
        assert_eq!(s.engine.breaker.max_in_flight, 9);
        assert_eq!(s.engine.cache_max_entries, 42);
        assert_eq!(s.activity_synchronous, crate::store::Synchronous::Full, "the default");
    }

    #[test]
    fn activity_log_synchronous_comes_from_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("verdict.toml");
        std::fs::write(&path, "[activity_log]\nsynchronous = \"normal\"\n").expect("write config");
        let s = Settings::resolve(ServeArgs { config: Some(path.clone()), ..Default::default() }).expect("resolve");
        assert_eq!(s.activity_synchronous, crate::store::Synchronous::Normal);
        std::fs::write(&path, "[activity_log]\nsynchronous = \"off\"\n").expect("write config");
        assert!(Settings::resolve(ServeArgs { config: Some(path), ..Default::default() }).is_err());
    }
}
