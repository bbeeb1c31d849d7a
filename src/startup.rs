//! Wiring: settings → store, engine, registry, HTTP server. Tests build the very same
//! [`Application`] the binary runs, on port 0.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::{web, App, HttpServer};

use crate::api::{self, AppState};
use crate::config::Settings;
use crate::engine::Engine;
use crate::logs::activity::{spawn_retention, ActivityWriter, ActivityWriterConfig};
use crate::metrics::Metrics;
use crate::outbound::{HttpOutbound, Outbound, OutboundConfig};
use crate::policy::Catalog;
use crate::policy_files::FileProblem;
use crate::registry::Registry;
use crate::secrets::SecretBox;
use crate::store::postgres::ChangeEvent;
use crate::store::spool::SpoolingStore;
use crate::store::{PgStore, SqliteOptions, SqliteStore, Store};
use crate::tokens::{self, TokenSet};
use crate::webhooks::deliver::Deliverer;
use crate::webhooks::{self, Webhooks};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("policy files have problems:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    PolicyFiles(Vec<FileProblem>),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("data directory {0}: {1}")]
    DataDir(String, std::io::Error),
    #[error("tokens: {0}")]
    Tokens(String),
    #[error("outbound HTTP client: {0}")]
    Client(String),
    #[error("secret key: {0}")]
    SecretKey(String),
    #[error("store: {0}")]
    Store(String),
}

/// A built, bound, not yet running service.
pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    state: web::Data<AppState>,
}

impl Application {
    /// Builds everything and binds the listener.
    pub async fn build(settings: Settings) -> Result<Application, StartError> {
        let data_dir = settings.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|e| StartError::DataDir(data_dir.display().to_string(), e))?;
        let token_entries = if settings.tokens.is_empty() {
            let (entries, plain) = tokens::load_or_generate(&data_dir)
                .map_err(|e| StartError::DataDir(data_dir.display().to_string(), e))?;
            if !plain.is_empty() {
                // Printed once, on purpose, to stdout and not to the log: only the
                // hashes are kept, so this is the one chance to copy them.
                println!(
                    "verdict: no tokens configured; generated one per role (only their hashes are kept in {}):",
                    data_dir.join("tokens.json").display()
                );
                for (name, role, token) in &plain {
                    println!("  {name} ({}): {token}", role.as_str());
                }
            }
            entries
        } else {
            settings.tokens.clone()
        };
        let tokens = TokenSet::new(token_entries).map_err(StartError::Tokens)?;
        let metrics = Arc::new(Metrics::new());
        let outbound = HttpOutbound::new(
            OutboundConfig {
                max_response_bytes: settings.max_response_bytes,
                follow_redirects: settings.follow_redirects,
            },
            metrics.clone(),
        )
        .map_err(|e| StartError::Client(e.to_string()))?;
        let secret_key = std::env::var("VERDICT_SECRET_KEY").ok();
        let secrets = Arc::new(
            SecretBox::load_or_create(&data_dir, secret_key.as_deref())
                .map_err(|e| StartError::SecretKey(e.to_string()))?,
        );
        let (backend, postgres) = open_store(&settings, secrets).await?;
        // Activity entries that cannot reach the store are spooled in the data
        // directory and written back in order when it answers again.
        let spool = Arc::new(SpoolingStore::new(backend, &data_dir).map_err(|e| StartError::Store(e.to_string()))?);
        spool.spawn_drainer(std::time::Duration::from_secs(1));
        let store: Arc<dyn Store> = spool;
        let outbound: Arc<dyn Outbound> = Arc::new(outbound);
        let engine = Arc::new(Engine::new(Catalog::default(), outbound.clone(), metrics.clone(), settings.engine));
        let webhooks = Arc::new(Webhooks::new(&settings.instance_name, &settings.replica_name));
        // `config.changed` events are written in the same transaction as their audit entry.
        store.set_audit_hook(webhooks::audit_hook(&webhooks));
        let registry =
            Arc::new(Registry::new(engine.clone(), webhooks.clone(), store.clone(), settings.policies.clone()));
        registry.load_store().await.map_err(|e| StartError::Store(e.to_string()))?;
        if let Some(pg) = postgres {
            spawn_follow_replicas(pg, registry.clone());
        }
        let files = registry.load_files().await.map_err(StartError::PolicyFiles)?;
        for f in &files {
            tracing::info!(file = %f.source, rules = f.rules.len(), policies = f.policies.len(), "policy file loaded");
        }
        let listener =
            TcpListener::bind(&settings.listen).map_err(|e| StartError::Listen(settings.listen.clone(), e))?;
        let port = listener.local_addr().map_err(|e| StartError::Listen(settings.listen.clone(), e))?.port();
        let activity = ActivityWriter::start(store.clone(), ActivityWriterConfig::default());
        metrics.watch_activity(activity.clone());
        spawn_retention(store.clone(), settings.activity_retention_days, std::time::Duration::from_secs(3600));
        let deliverer = Deliverer::new(
            webhooks.clone(),
            store.clone(),
            outbound,
            settings.webhooks.clone(),
            &settings.replica_name,
            &metrics,
        );
        tokio::spawn(deliverer.clone().run());
        spawn_circuit_events(&engine, webhooks.clone(), store.clone());
        let state = web::Data::new(AppState {
            settings,
            tokens,
            engine,
            registry,
            metrics,
            store,
            activity,
            webhooks,
            deliverer,
        });
        let server_state = state.clone();
        let server = HttpServer::new(move || App::new().app_data(server_state.clone()).configure(api::routes))
            .listen(listener)
            .map_err(|e| StartError::Listen("listener".into(), e))?
            .shutdown_timeout(30)
            .disable_signals()
            .run();
        spawn_stop_on_signal(server.handle());
        spawn_reload_on_sighup(state.registry.clone());
        Ok(Application { port, server, state })
    }

    /// The port the service listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Shared state (tests inspect metrics through it).
    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Runs until SIGTERM/SIGINT (actix stops accepting and lets in-flight requests
    /// finish), then flushes what must be flushed.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await?;
        // actix has stopped accepting and finished in-flight requests; what they
        // queued for the activity log is flushed before exit.
        self.state.activity.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the store the settings name: SQLite in the data directory by default,
/// `sqlite://DIR`, or `postgres://…` (shared by replicas; returned twice so the caller
/// can follow other replicas' changes).
async fn open_store(
    settings: &Settings,
    secrets: Arc<SecretBox>,
) -> Result<(Arc<dyn Store>, Option<Arc<PgStore>>), StartError> {
    let url = settings.database_url.as_deref().unwrap_or_default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pg = Arc::new(
            PgStore::connect(url, secrets, &settings.replica_name)
                .await
                .map_err(|e| StartError::Store(e.to_string()))?,
        );
        return Ok((pg.clone(), Some(pg)));
    }
    let dir = match url.strip_prefix("sqlite://") {
        // `sqlite://DIR` names the directory that holds verdict.db.
        Some(path) => std::path::PathBuf::from(path),
        None if url.is_empty() => settings.data_dir.clone(),
        None => {
            return Err(StartError::Store(format!(
                "unsupported database URL scheme `{}`; use sqlite://DIR or postgres://…",
                url.split("://").next().unwrap_or("?")
            )))
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| StartError::DataDir(dir.display().to_string(), e))?;
    let options = SqliteOptions { activity_synchronous: settings.activity_synchronous };
    let sqlite = SqliteStore::open_with(&dir, secrets, options).map_err(|e| StartError::Store(e.to_string()))?;
    Ok((Arc::new(sqlite), None))
}

/// Follows changes other replicas make through the shared PostgreSQL store: each
/// notification names the object, which is read and applied; after a lost
/// connection everything is reloaded once. Decision caches are cleared by every
/// catalog swap.
fn spawn_follow_replicas(pg: Arc<PgStore>, registry: Arc<Registry>) {
    tokio::spawn(async move {
        let mut events = pg.listen().await;
        while let Some(event) = events.recv().await {
            match event {
                ChangeEvent::Changed { kind, id, replica, .. } => {
                    if replica == pg.replica() {
                        continue;
                    }
                    match pg.load_object(kind, &id).await {
                        Ok(stored) => registry.apply_remote(kind, &id, stored).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not read a changed object; reloading all");
                            if let Err(e) = registry.load_store().await {
                                tracing::error!(error = %e, "reload after a change notification failed");
                            }
                        }
                    }
                }
                ChangeEvent::Resync => {
                    tracing::info!("change notifications resumed; reloading every object once");
                    if let Err(e) = registry.load_store().await {
                        tracing::error!(error = %e, "reload after reconnecting failed");
                    }
                }
            }
        }
    });
}

/// Stops gracefully on SIGTERM and SIGINT (SPEC §1): no new connections, requests in
/// flight finish, then `run_until_stopped` flushes the activity log. actix's own
/// handling force-stops on SIGINT, dropping decisions in flight, hence this.
fn spawn_stop_on_signal(server: actix_web::dev::ServerHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop verdict with SIGKILL");
        return;
    };
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping: no new connections, finishing requests in flight");
        server.stop(true).await;
    });
}

/// Records `circuit.opened` / `circuit.closed` events for the webhooks that want them.
fn spawn_circuit_events(engine: &Engine, webhooks: Arc<Webhooks>, store: Arc<dyn Store>) {
    let mut transitions = engine.circuit_transitions();
    tokio::spawn(async move {
        loop {
            let transition = match transitions.recv().await {
                Ok(t) => t,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "circuit events fell behind; some were not sent to webhooks");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let events = webhooks.circuit_events(&transition);
            if events.is_empty() {
                continue;
            }
            match store.enqueue_events(&events).await {
                Ok(()) => webhooks.wake(),
                Err(e) => tracing::warn!(error = %e, "could not record a circuit event for webhooks"),
            }
        }
    });
}

fn spawn_reload_on_sighup(registry: Arc<Registry>) {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered before `build` returns, so a HUP right after start reloads instead
    // of taking the default action (terminating the process).
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP; policy files will not reload");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match registry.load_files().await {
                Ok(files) => tracing::info!(files = files.len(), "policy files reloaded"),
                Err(problems) => {
                    for p in &problems {
                        tracing::error!(problem = %p, "policy reload refused; the running set is kept");
                    }
                }
            }
        }
    });
}
