//! The PostgreSQL store: one database shared by any number of verdict replicas (SPEC §9).
//!
//! Why tokio-postgres (+ deadpool-postgres) rather than sqlx: it is a much lighter build
//! (no macros crate, no compile-time database connection or offline query cache to keep
//! in the repository, no second TLS/runtime feature matrix), the store's SQL is a few
//! dynamic statements that gain nothing from compile-time checking, and the change
//! notifications need the raw connection's message stream (`Connection::poll_message`)
//! to receive `NOTIFY` payloads on a dedicated connection, which tokio-postgres exposes
//! directly. deadpool-postgres is a thin pool with a per-connection statement cache.
//! Migrations are a short ordered list of SQL scripts run under an advisory lock, so no
//! migration framework (refinery) is needed either.
//!
//! Multi-replica rules:
//! - Migrations: [`MIGRATIONS`] run in ONE transaction that first takes
//!   `pg_advisory_xact_lock(MIGRATION_LOCK)`; `schema_version` has one row per applied
//!   script (with the replica that applied it). Replicas starting at the same moment
//!   queue on the lock; the first applies, the others find nothing left to do.
//! - Audit chain: every [`Store::commit`] takes `pg_advisory_xact_lock(AUDIT_LOCK)` first,
//!   then reads the chain's tail (READ COMMITTED: a fresh snapshot after the lock, which
//!   the previous holder released only once its commit was visible), seals the drafts with
//!   [`seal_all`] and inserts them, all in one transaction. `seq` is the primary key, so
//!   even a locking bug could not fork the chain silently.
//! - Policy file loads: inside that lock, a `load` draft for a file whose newest `load`
//!   entry already has the same `after.sha256` is dropped, so N replicas starting with
//!   the same files record one `load` per distinct content (the returned entries then omit
//!   it; the object changes of the commit are still applied).
//! - Change notification: a commit that changed objects sends one
//!   `NOTIFY verdict_changes, '{"kind","id","op","replica"}'` per change in the same
//!   transaction (so it is delivered if and only if the change committed);
//!   [`PgStore::listen`] receives them on a dedicated connection.
//! - Activity: one `INSERT … SELECT FROM unnest(…) ON CONFLICT (decision_id) DO NOTHING`
//!   statement per batch, whatever its size, in autocommit with `synchronous_commit=on`
//!   (durable when it returns). `rule_ids text[]` with a GIN index serves the `rule_id`
//!   filter.
//! - Webhook outbox (SPEC §10, migration 3): `webhook_deliveries`, one row per (webhook,
//!   event). A batch whose entries carry events is still ONE statement: a data-modifying
//!   CTE inserts the entries and `RETURNING decision_id`, and the outer `INSERT` writes the
//!   events of exactly those entries (a known decision, a replayed spool line, adds
//!   nothing); a batch without events runs the plain statement. `commit` inserts the
//!   [`AuditHook`]'s events inside its transaction. Replicas claim due rows of the
//!   webhooks they name (a range of the due index each, migration 4, through `unnest` and
//!   `LATERAL`) with `SELECT … FOR UPDATE SKIP LOCKED` under an `UPDATE` that sets a lease
//!   (`claimed_by`, `claimed_until_us`): two replicas claiming at once get disjoint rows,
//!   and a replica that dies mid-delivery frees its rows when the lease runs out, so each
//!   event is delivered by one replica (at least once).
//!
//! Failure behaviour: connects time out after [`CONNECT_TIMEOUT`]; every write, `ping`
//! and single-row read has a client-side deadline of [`WRITE_DEADLINE`] (pool wait
//! included) and a server-side `statement_timeout`, so an admin write answers
//! [`StoreError::Unavailable`] within 2 s when the database is gone or hangs. A
//! connection that failed that way is discarded with every idle one. Error messages
//! carry PostgreSQL's message and SQLSTATE, never bound values, secrets or the URL's
//! password.
//!
//! TLS is not configured (`NoTls`): `sslmode=prefer` (the default) falls back to plain
//! TCP, `sslmode=require` fails to connect.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::Host;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Config, GenericClient, NoTls, Row};

use super::{
    activity_rule_ids, decode_activity_cursor, decode_audit_cursor, decode_delivery_cursor, encode_activity_cursor,
    encode_audit_cursor, encode_delivery_cursor, format_time, parse_time, unix_micros, ActivityEntry, ActivityFilter,
    AuditAction, AuditDraft, AuditEntry, AuditFilter, AuditHook, Change, Delivery, DeliveryUpdate, Listing, ObjectKind,
    OutboxEvent, Page, RawDelivery, Store, StoreError, StoredObject, VerifyResult, DELIVERY_COLUMNS,
};
use crate::logs::audit::{seal_all, ChainBreak, ChainVerifier, GENESIS_HASH};
use crate::secrets::SecretBox;

/// The `LISTEN`/`NOTIFY` channel carrying object changes.
pub const NOTIFY_CHANNEL: &str = "verdict_changes";

/// Connections in the pool of one replica.
pub const POOL_SIZE: usize = 8;

/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Client-side deadline of writes, `ping` and single-row reads, pool wait included: an
/// admin write must answer (503 when the database is gone) within 2 s.
pub const WRITE_DEADLINE: Duration = Duration::from_millis(1800);

/// Server-side `statement_timeout` of every session (ms); reads raise it per transaction.
const STATEMENT_TIMEOUT_MS: u64 = 1800;

/// A transaction left idle (its client vanished mid-commit) is ended by the server after
/// this long, so it cannot hold the audit lock for the other replicas (ms).
const IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 5000;

/// Deadline of listings and `load_all`.
const READ_DEADLINE: Duration = Duration::from_secs(30);

/// Deadline of `verify_audit`, which walks the whole chain.
const VERIFY_DEADLINE: Duration = Duration::from_secs(300);

/// Deadline of the migrations at `connect`, lock wait included.
const MIGRATE_DEADLINE: Duration = Duration::from_secs(60);

/// Rows deleted per statement by `prune_activity`.
const PRUNE_CHUNK: i64 = 2000;

/// Advisory lock key held while migrating ("verdict" + 1).
const MIGRATION_LOCK: i64 = 0x7665_7264_6963_7401;

/// Advisory lock key serializing commits, i.e. audit appenders ("verdict" + 2).
const AUDIT_LOCK: i64 = 0x7665_7264_6963_7402;

/// NOTIFY payloads must stay under 8000 bytes; a bigger one becomes a resync request.
const NOTIFY_PAYLOAD_MAX: usize = 7900;

/// Events buffered for a slow [`PgStore::listen`] consumer.
const LISTEN_BUFFER: usize = 1024;

/// How often the listener checks its connection with a query.
const LISTEN_PING_EVERY: Duration = Duration::from_secs(5);

/// Reconnect backoff of the listener.
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Schema migrations, in order. Never edit one that has shipped; append a new one.
///
/// JSON columns are `json` (not `jsonb`): it keeps the text as written, so documents and
/// log entries come back with their keys in the order the caller gave.
pub const MIGRATIONS: &[&str] = &[
    // 1: objects, audit chain, activity log.
    r#"
    CREATE TABLE objects (
        kind        text NOT NULL,
        id          text NOT NULL,
        source      text NOT NULL,
        version     bigint NOT NULL,
        doc         json NOT NULL,
        secrets     text,            -- SecretBox ciphertext of the JSON map; NULL when empty
        created_at  text NOT NULL,
        updated_at  text NOT NULL,
        PRIMARY KEY (kind, id)
    );

    CREATE TABLE audit (
        seq          bigint PRIMARY KEY,
        time         text NOT NULL,
        time_us      bigint NOT NULL,
        actor        text NOT NULL,
        action       text NOT NULL,
        object_type  text NOT NULL,
        object_id    text NOT NULL,
        before_json  json,
        after_json   json,
        prev_hash    text NOT NULL,
        hash         text NOT NULL
    );
    CREATE INDEX audit_by_actor ON audit (actor, seq);
    CREATE INDEX audit_by_object ON audit (object_type, object_id, seq);
    CREATE INDEX audit_by_time ON audit (time_us);

    CREATE TABLE activity (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        decision_id  text NOT NULL UNIQUE,
        time         text NOT NULL,
        time_us      bigint NOT NULL,
        application  text NOT NULL,
        username     text,
        remote_ip    text,
        device_id    text,
        decision     text NOT NULL,
        reason       text NOT NULL,
        policies     json NOT NULL,
        rules        json NOT NULL,
        rule_ids     text[] NOT NULL DEFAULT '{}',  -- distinct rules[].rule_id, for the filter
        latency_ms   double precision NOT NULL,
        via          text NOT NULL,
        replica      text NOT NULL
    );
    CREATE INDEX activity_by_time ON activity (time_us, id);
    CREATE INDEX activity_by_user ON activity (username, time_us, id);
    CREATE INDEX activity_by_app ON activity (application, time_us, id);
    CREATE INDEX activity_by_decision ON activity (decision, time_us, id);
    CREATE INDEX activity_by_rule ON activity USING gin (rule_ids);
    "#,
    // 2: usernames and applications of any length (a request body may be 1 MiB). A
    // B-tree entry holds at most ~2.7 kB, so an entry with a longer value could not be
    // inserted; the filter indexes key on a prefix, and the filter compares the whole
    // value as well (`ACTIVITY_KEY_PREFIX`).
    r#"
    DROP INDEX activity_by_user;
    DROP INDEX activity_by_app;
    CREATE INDEX activity_by_user ON activity (left(username, 200), time_us, id);
    CREATE INDEX activity_by_app ON activity (left(application, 200), time_us, id);
    "#,
    // 3: the webhook outbox (SPEC §10): one row per (webhook, event). `state` is
    // `pending`, `delivered` or `failed`; a pending row is due at `next_attempt_us` and
    // free to claim once `claimed_until_us` has passed. The due index is partial: only
    // pending rows are ever claimed, and delivered ones (nearly all) cost it nothing.
    r#"
    CREATE TABLE webhook_deliveries (
        id                bigserial PRIMARY KEY,
        webhook_id        text NOT NULL,
        event_id          text NOT NULL,
        event_type        text NOT NULL,
        payload           text NOT NULL,
        state             text NOT NULL DEFAULT 'pending',
        attempts          bigint NOT NULL DEFAULT 0,
        max_attempts      bigint NOT NULL,
        last_status       bigint,
        last_error        text,
        next_attempt_us   bigint NOT NULL,
        claimed_by        text,
        claimed_until_us  bigint NOT NULL DEFAULT 0,
        created_at        text NOT NULL,
        updated_at        text NOT NULL,
        updated_us        bigint NOT NULL,
        UNIQUE (webhook_id, event_id)
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_us, id) WHERE state = 'pending';
    CREATE INDEX webhook_deliveries_by_hook ON webhook_deliveries (webhook_id, id);
    "#,
    // 4: claims name the webhooks they take rows of, so the due index leads with the
    // webhook: the rows of a webhook whose receiver is failing are never read while they
    // wait. Rows held back by the old scheme (due at i64::MAX / 2) are due again.
    r#"
    DROP INDEX webhook_deliveries_due;
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook_id, next_attempt_us, id) WHERE state = 'pending';
    UPDATE webhook_deliveries SET next_attempt_us = updated_us
        WHERE state = 'pending' AND next_attempt_us >= 4611686018427387903;
    "#,
];

/// Characters of `username` / `application` that their activity indexes key on
/// (migration 2); the filters must use the same expression to use them.
const ACTIVITY_KEY_PREFIX: usize = 200;

/// What a change notification says happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    /// Created or replaced.
    Put,
    /// Deleted.
    Delete,
}

/// What [`PgStore::listen`] delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeEvent {
    /// One object changed through some replica (this one included: compare `replica`).
    /// Load it with [`PgStore::load_object`]; `None` there means it is gone.
    Changed {
        /// Its kind.
        kind: ObjectKind,
        /// Its id.
        id: String,
        /// What happened.
        op: ChangeOp,
        /// The replica that committed the change.
        replica: String,
    },
    /// Notifications may have been missed (the listening connection was lost and is back,
    /// or a payload was unreadable): reload everything with [`Store::load_all`].
    Resync,
}

#[derive(Serialize, Deserialize)]
struct ChangePayload {
    kind: String,
    id: String,
    op: String,
    replica: String,
}

impl ChangeEvent {
    /// Reads a `verdict_changes` payload; anything unreadable asks for a resync.
    fn from_payload(payload: &str) -> ChangeEvent {
        let parsed = serde_json::from_str::<ChangePayload>(payload).ok().and_then(|p| {
            let kind = ObjectKind::parse(&p.kind)?;
            let op = match p.op.as_str() {
                "put" => ChangeOp::Put,
                "delete" => ChangeOp::Delete,
                _ => return None,
            };
            Some(ChangeEvent::Changed { kind, id: p.id, op, replica: p.replica })
        });
        parsed.unwrap_or(ChangeEvent::Resync)
    }
}

fn change_payload(kind: ObjectKind, id: &str, op: ChangeOp, replica: &str) -> String {
    let op = match op {
        ChangeOp::Put => "put",
        ChangeOp::Delete => "delete",
    };
    let text = serde_json::to_string(&ChangePayload {
        kind: kind.as_str().to_string(),
        id: id.to_string(),
        op: op.to_string(),
        replica: replica.to_string(),
    })
    .unwrap_or_default();
    if text.is_empty() || text.len() > NOTIFY_PAYLOAD_MAX {
        serde_json::json!({"op": "resync", "replica": replica}).to_string()
    } else {
        text
    }
}

/// The PostgreSQL implementation of [`Store`], shareable by several replicas.
pub struct PgStore {
    pool: Pool,
    /// Connection settings (timeouts applied), for the listener's own connection.
    config: Config,
    secrets: Arc<SecretBox>,
    replica: String,
    /// `host:port/database`, for messages; never the password.
    target: String,
    /// Builds the outbox events of the audit entries `commit` seals.
    audit_hook: RwLock<Option<AuditHook>>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").field("target", &self.target).field("replica", &self.replica).finish_non_exhaustive()
    }
}

/// Runs `$body` (an async block body using `$c: &mut Object`) on a pooled connection
/// within `$deadline`, pool wait included. A connection whose operation ended
/// `Unavailable` (deadline, I/O error, server gone) is discarded with all idle ones.
macro_rules! with_conn {
    ($store:expr, $deadline:expr, |$c:ident| $body:block) => {{
        let store: &PgStore = $store;
        let deadline: Duration = $deadline;
        let started = Instant::now();
        match tokio::time::timeout(deadline, store.checkout()).await {
            Err(_) => Err(store.too_slow(deadline)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(mut conn)) => {
                let remaining = deadline.saturating_sub(started.elapsed());
                let result = match tokio::time::timeout(remaining, async {
                    let $c: &mut Object = &mut conn;
                    $body
                })
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(store.too_slow(deadline)),
                };
                store.settle(conn, &result);
                result
            }
        }
    }};
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/db?…`), builds a pool of
    /// [`POOL_SIZE`] connections and runs pending migrations under an advisory lock.
    /// `replica` names this process in activity entries and change notifications.
    pub async fn connect(url: &str, secrets: Arc<SecretBox>, replica: &str) -> Result<PgStore, StoreError> {
        let mut config = Config::from_str(url).map_err(|e| {
            let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
            StoreError::Internal(format!("invalid database URL{cause}"))
        })?;
        if config.get_application_name().is_none() {
            config.application_name(format!("verdict:{replica}"));
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        // Unacknowledged data for this long means the server or the network is gone.
        config.tcp_user_timeout(CONNECT_TIMEOUT);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        let options = format!(
            "{} -c statement_timeout={STATEMENT_TIMEOUT_MS} -c synchronous_commit=on \
             -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}",
            config.get_options().unwrap_or("")
        );
        config.options(options.trim_start());
        let target = describe(&config);

        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WRITE_DEADLINE))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the connection pool: {e}")))?;
        let store =
            PgStore { pool, config, secrets, replica: replica.to_string(), target, audit_hook: RwLock::new(None) };
        store.migrate().await?;
        Ok(store)
    }

    /// The replica name given to [`PgStore::connect`].
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// One object, secrets decrypted; `None` when it does not exist (e.g. after a
    /// [`ChangeOp::Delete`] notification).
    pub async fn load_object(&self, kind: ObjectKind, id: &str) -> Result<Option<StoredObject>, StoreError> {
        let row = with_conn!(self, WRITE_DEADLINE, |client| {
            let stmt = client.prepare_cached(&format!("{OBJECT_SELECT} WHERE kind = $1 AND id = $2")).await;
            client.query_opt(&stmt.map_err(pg_err)?, &[&kind.as_str(), &id]).await.map_err(pg_err)
        })?;
        row.map(|row| object_from_row(&row, &self.secrets)).transpose()
    }

    /// Subscribes to object changes committed by any replica (this one included).
    ///
    /// Opens a dedicated connection running `LISTEN verdict_changes` before returning, so
    /// a caller that then calls [`Store::load_all`] misses nothing. When that connection
    /// is lost the listener reconnects with backoff and, once listening again, sends
    /// [`ChangeEvent::Resync`] once. If the first connection attempt fails, the receiver
    /// is returned anyway and gets `Resync` when the listener is up. The listener stops
    /// when the receiver is dropped.
    pub async fn listen(&self) -> mpsc::Receiver<ChangeEvent> {
        let (events, receiver) = mpsc::channel(LISTEN_BUFFER);
        let mut config = self.config.clone();
        config.application_name(format!("verdict-listen:{}", self.replica));
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(listen_loop(config, events, ready_tx, self.target.clone()));
        let _ = ready_rx.await;
        receiver
    }

    async fn checkout(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Timeout(_) => self.too_slow(WRITE_DEADLINE),
            PoolError::Backend(e) => match pg_err(e) {
                StoreError::Unavailable(m) => StoreError::Unavailable(format!("PostgreSQL at {}: {m}", self.target)),
                other => other,
            },
            PoolError::Closed => StoreError::Unavailable("the connection pool is closed".to_string()),
            other => StoreError::Internal(format!("connection pool: {other}")),
        })
    }

    fn too_slow(&self, deadline: Duration) -> StoreError {
        StoreError::Unavailable(format!(
            "PostgreSQL at {} did not answer within {} ms",
            self.target,
            deadline.as_millis()
        ))
    }

    /// Returns a connection to the pool, or discards it (and every idle one: they most
    /// likely share its fate) when the operation found the database unavailable.
    fn settle<T>(&self, conn: Object, result: &Result<T, StoreError>) {
        if matches!(result, Err(StoreError::Unavailable(_))) {
            drop(Object::take(conn));
            self.pool.retain(|_, _| false);
        } else {
            drop(conn);
        }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let replica = self.replica.clone();
        let applied = with_conn!(self, MIGRATE_DEADLINE, |client| {
            let tx = client.transaction().await.map_err(pg_err)?;
            tx.batch_execute(&format!("SET LOCAL statement_timeout = {}", MIGRATE_DEADLINE.as_millis()))
                .await
                .map_err(pg_err)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg_err)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_version (\
                 version integer PRIMARY KEY, \
                 applied_at timestamptz NOT NULL DEFAULT now(), \
                 applied_by text NOT NULL)",
            )
            .await
            .map_err(pg_err)?;
            let row = tx.query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[]).await;
            let current: i32 = get(&row.map_err(pg_err)?, 0)?;
            let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
            if current > known {
                return Err(StoreError::Corrupt(format!(
                    "database schema version {current} is newer than this verdict supports ({known})"
                )));
            }
            let mut applied = Vec::new();
            for (index, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
                let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
                tx.batch_execute(sql).await.map_err(pg_err)?;
                tx.execute("INSERT INTO schema_version (version, applied_by) VALUES ($1, $2)", &[&version, &replica])
                    .await
                    .map_err(pg_err)?;
                applied.push(version);
            }
            tx.commit().await.map_err(pg_err)?;
            Ok(applied)
        })?;
        for version in applied {
            tracing::info!(version, replica = %self.replica, "applied store migration");
        }
        Ok(())
    }
}

/// `host:port/database` of a connection config.
fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => config.get_hostaddrs().first().map(|a| a.to_string()).unwrap_or_else(|| "?".to_string()),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().or(config.get_user()).unwrap_or("?");
    format!("{host}:{port}/{db}")
}

/// Maps PostgreSQL failures onto the store's error kinds. Messages are the server's
/// message and SQLSTATE (never `detail`, which can quote values) or the client's error
/// kind and its I/O cause.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let msg = format!("{} (SQLSTATE {code})", db.message());
        return match code.get(..2).unwrap_or("") {
            // connection exception, invalid authorization, invalid catalog (no such
            // database), transaction rollback (serialization, deadlock), insufficient
            // resources, operator intervention (shutdown, statement timeout), lock not
            // available, system I/O error.
            "08" | "28" | "3D" | "40" | "53" | "55" | "57" | "58" => StoreError::Unavailable(msg),
            "23" => StoreError::Conflict(msg),
            "XX" if code != "XX000" => StoreError::Corrupt(msg),
            _ => StoreError::Internal(msg),
        };
    }
    let text = match std::error::Error::source(&e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    };
    let transport = [
        "error communicating with the server",
        "error connecting to server",
        "timeout waiting for server",
        "connection closed",
        "unexpected message from server",
        "error parsing response from server",
        "authentication error",
        "error performing TLS handshake",
    ];
    if e.is_closed() || transport.iter().any(|t| text.starts_with(t)) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Internal(text)
    }
}

/// A column, with a type mismatch reported as corrupt data rather than a panic.
fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx).map_err(|e| StoreError::Corrupt(format!("unexpected column {idx}: {e}")))
}

const OBJECT_SELECT: &str = "SELECT kind, id, source, version, doc, secrets, created_at, updated_at FROM objects";

fn object_from_row(row: &Row, secrets: &SecretBox) -> Result<StoredObject, StoreError> {
    let kind: String = get(row, 0)?;
    let id: String = get(row, 1)?;
    let kind = ObjectKind::parse(&kind)
        .ok_or_else(|| StoreError::Corrupt(format!("object `{id}` has unknown kind `{kind}`")))?;
    let sealed: Option<String> = get(row, 5)?;
    let plain = match sealed {
        None => BTreeMap::new(),
        Some(sealed) => {
            let plain =
                secrets.decrypt(&sealed).map_err(|e| StoreError::Corrupt(format!("secrets of {kind} `{id}`: {e}")))?;
            serde_json::from_str(&plain)
                .map_err(|_| StoreError::Corrupt(format!("secrets of {kind} `{id}` are not a JSON map")))?
        }
    };
    Ok(StoredObject {
        kind,
        source: get(row, 2)?,
        version: get(row, 3)?,
        doc: get(row, 4)?,
        secrets: plain,
        created_at: get(row, 6)?,
        updated_at: get(row, 7)?,
        id,
    })
}

/// An object ready to be written: secrets already encrypted.
struct PutRow {
    kind: &'static str,
    id: String,
    source: String,
    version: i64,
    doc: Value,
    secrets: Option<String>,
    created_at: String,
    updated_at: String,
}

fn encode_object(obj: StoredObject, secrets: &SecretBox) -> Result<PutRow, StoreError> {
    let sealed = if obj.secrets.is_empty() {
        None
    } else {
        let plain = serde_json::to_string(&obj.secrets)
            .map_err(|e| StoreError::Internal(format!("cannot encode secrets: {e}")))?;
        Some(secrets.encrypt(&plain))
    };
    Ok(PutRow {
        kind: obj.kind.as_str(),
        id: obj.id,
        source: obj.source,
        version: obj.version,
        doc: obj.doc,
        secrets: sealed,
        created_at: obj.created_at,
        updated_at: obj.updated_at,
    })
}

const AUDIT_COLUMNS: &str =
    "seq, time, actor, action, object_type, object_id, before_json, after_json, prev_hash, hash";

/// Reads an audit row. The outer error is a database/type failure; the inner one says
/// what is wrong with the row's content (a chain break for `verify`).
fn audit_from_row(row: &Row) -> Result<Result<AuditEntry, String>, StoreError> {
    let action: String = get(row, 3)?;
    let Some(action) = AuditAction::parse(&action) else {
        return Ok(Err("unknown action".to_string()));
    };
    Ok(Ok(AuditEntry {
        seq: get(row, 0)?,
        time: get(row, 1)?,
        actor: get(row, 2)?,
        action,
        object_type: get(row, 4)?,
        object_id: get(row, 5)?,
        before: get(row, 6)?,
        after: get(row, 7)?,
        prev_hash: get(row, 8)?,
        hash: get(row, 9)?,
    }))
}

const ACTIVITY_COLUMNS: &str = "id, time_us, decision_id, time, application, username, remote_ip, \
     device_id, decision, reason, policies, rules, latency_ms, via, replica";

fn activity_from_row(row: &Row) -> Result<(i64, i64, ActivityEntry), StoreError> {
    Ok((
        get(row, 0)?,
        get(row, 1)?,
        ActivityEntry {
            decision_id: get(row, 2)?,
            time: get(row, 3)?,
            application: get(row, 4)?,
            username: get(row, 5)?,
            remote_ip: get(row, 6)?,
            device_id: get(row, 7)?,
            decision: get(row, 8)?,
            reason: get(row, 9)?,
            policies: get(row, 10)?,
            rules: get(row, 11)?,
            latency_ms: get(row, 12)?,
            via: get(row, 13)?,
            replica: get(row, 14)?,
            outbox: Vec::new(),
        },
    ))
}

/// One batch of activity entries as column arrays for `unnest`.
#[derive(Default)]
struct ActivityColumns {
    decision_id: Vec<String>,
    time: Vec<String>,
    time_us: Vec<i64>,
    application: Vec<String>,
    username: Vec<Option<String>>,
    remote_ip: Vec<Option<String>>,
    device_id: Vec<Option<String>>,
    decision: Vec<String>,
    reason: Vec<String>,
    policies: Vec<String>,
    rules: Vec<String>,
    rule_ids: Vec<String>,
    latency_ms: Vec<f64>,
    via: Vec<String>,
    replica: Vec<String>,
}

/// PostgreSQL `text` cannot hold NUL; one in a client-supplied field (a username in a
/// JSON body) must not make the whole batch fail forever, so it is replaced.
fn pg_text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

fn json_text(value: &Value) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Internal(format!("cannot encode JSON: {e}")))
}

/// The activity batch insert (`$1`..`$15`: [`ActivityColumns`]), as a literal so that
/// [`INSERT_ACTIVITY_WITH_EVENTS`] can embed it.
macro_rules! insert_activity_sql {
    () => {
        "INSERT INTO activity (decision_id, time, time_us, application, username, \
         remote_ip, device_id, decision, reason, policies, rules, rule_ids, latency_ms, via, replica) \
         SELECT u.decision_id, u.time, u.time_us, u.application, u.username, u.remote_ip, u.device_id, \
         u.decision, u.reason, u.policies::json, u.rules::json, \
         ARRAY(SELECT json_array_elements_text(u.rule_ids::json)), u.latency_ms, u.via, u.replica \
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], \
         $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::float8[], $14::text[], $15::text[]) \
         WITH ORDINALITY AS u(decision_id, time, time_us, application, username, remote_ip, device_id, \
         decision, reason, policies, rules, rule_ids, latency_ms, via, replica, ord) \
         ORDER BY u.ord \
         ON CONFLICT (decision_id) DO NOTHING"
    };
}

const INSERT_ACTIVITY: &str = insert_activity_sql!();

/// A batch with webhook events, still one statement (so still one autocommit, durable
/// when it returns): the entries are inserted in a CTE that returns the decision ids it
/// actually inserted, and only their events are written (`$16`..`$23`: [`EventColumns`]
/// with each event's decision id, then the time as µs and as text). A known decision was
/// written with its events the first time.
const INSERT_ACTIVITY_WITH_EVENTS: &str = concat!(
    "WITH inserted AS (",
    insert_activity_sql!(),
    " RETURNING decision_id) \
     INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, payload, max_attempts, \
     next_attempt_us, created_at, updated_at, updated_us) \
     SELECT o.webhook_id, o.event_id, o.event_type, o.payload, o.max_attempts, $21, $22, $22, $21 \
     FROM unnest($16::text[], $17::text[], $18::text[], $19::text[], $20::bigint[], $23::text[]) \
     WITH ORDINALITY AS o(webhook_id, event_id, event_type, payload, max_attempts, decision_id, ord) \
     JOIN inserted ON inserted.decision_id = o.decision_id \
     ORDER BY o.ord \
     ON CONFLICT (webhook_id, event_id) DO NOTHING"
);

/// Outbox events written outside an activity batch (`enqueue_events`, `commit`):
/// `$1`..`$5` [`EventColumns`], `$6` the time in µs, `$7` as text.
const INSERT_EVENTS: &str = "INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, payload, \
     max_attempts, next_attempt_us, created_at, updated_at, updated_us) \
     SELECT o.webhook_id, o.event_id, o.event_type, o.payload, o.max_attempts, $6, $7, $7, $6 \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) \
     WITH ORDINALITY AS o(webhook_id, event_id, event_type, payload, max_attempts, ord) \
     ORDER BY o.ord \
     ON CONFLICT (webhook_id, event_id) DO NOTHING";

/// Outbox events as column arrays for `unnest`.
#[derive(Default)]
struct EventColumns {
    webhook_id: Vec<String>,
    event_id: Vec<String>,
    event_type: Vec<String>,
    payload: Vec<String>,
    max_attempts: Vec<i64>,
}

impl EventColumns {
    fn of(events: &[OutboxEvent]) -> EventColumns {
        let mut c = EventColumns::default();
        for e in events {
            c.push(e);
        }
        c
    }

    fn push(&mut self, e: &OutboxEvent) {
        self.webhook_id.push(pg_text(&e.webhook_id));
        self.event_id.push(pg_text(&e.event_id));
        self.event_type.push(pg_text(&e.event_type));
        self.payload.push(pg_text(&e.payload));
        self.max_attempts.push(i64::from(e.max_attempts));
    }
}

/// Inserts outbox events as pending deliveries due at `now`; a known
/// `(webhook_id, event_id)` is ignored. One statement: in the caller's transaction, or
/// an autocommit of its own.
async fn insert_events<C: deadpool_postgres::GenericClient>(
    client: &C,
    events: &[OutboxEvent],
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let c = EventColumns::of(events);
    let (now_us, now_text) = (unix_micros(now), format_time(now));
    let stmt = client.prepare_cached(INSERT_EVENTS).await.map_err(pg_err)?;
    client
        .execute(&stmt, &[&c.webhook_id, &c.event_id, &c.event_type, &c.payload, &c.max_attempts, &now_us, &now_text])
        .await
        .map_err(pg_err)?;
    Ok(())
}

fn delivery_from_row(row: &Row) -> Result<Delivery, StoreError> {
    RawDelivery {
        id: get(row, 0)?,
        webhook_id: get(row, 1)?,
        event_id: get(row, 2)?,
        event_type: get(row, 3)?,
        state: get(row, 4)?,
        attempts: get(row, 5)?,
        max_attempts: get(row, 6)?,
        last_status: get(row, 7)?,
        last_error: get(row, 8)?,
        next_attempt_us: get(row, 9)?,
        created_at: get(row, 10)?,
        updated_at: get(row, 11)?,
        payload: get(row, 12)?,
    }
    .into_delivery()
}

type SqlArgs = Vec<Box<dyn ToSql + Sync + Send>>;

/// Appends a bound argument and returns its placeholder.
fn arg(args: &mut SqlArgs, value: impl ToSql + Sync + Send + 'static) -> String {
    args.push(Box::new(value));
    format!("${}", args.len())
}

fn arg_refs(args: &SqlArgs) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// `after.sha256` of the newest `load` entry of `file`.
async fn newest_file_hash<C: GenericClient + Sync>(client: &C, file: &str) -> Result<Option<String>, StoreError> {
    let row = client
        .query_opt(
            "SELECT after_json->>'sha256' FROM audit \
             WHERE object_type = 'file' AND object_id = $1 AND action = 'load' \
             ORDER BY seq DESC LIMIT 1",
            &[&file],
        )
        .await
        .map_err(pg_err)?;
    match row {
        Some(row) => get::<Option<String>>(&row, 0),
        None => Ok(None),
    }
}

/// Drops `load` drafts whose file content hash equals the newest recorded one (another
/// replica recorded this content already). Runs under the audit lock.
async fn drop_repeated_loads<C: GenericClient + Sync>(
    client: &C,
    drafts: Vec<AuditDraft>,
) -> Result<Vec<AuditDraft>, StoreError> {
    let mut newest: HashMap<String, Option<String>> = HashMap::new();
    let mut kept = Vec::with_capacity(drafts.len());
    for draft in drafts {
        let sha = (draft.action == AuditAction::Load && draft.object_type == "file")
            .then(|| draft.after.as_ref().and_then(|a| a.get("sha256")).and_then(Value::as_str).map(str::to_string))
            .flatten();
        if let Some(sha) = sha {
            let last = match newest.get(&draft.object_id) {
                Some(last) => last.clone(),
                None => newest_file_hash(client, &draft.object_id).await?,
            };
            if last.as_deref() == Some(sha.as_str()) {
                continue;
            }
            newest.insert(draft.object_id.clone(), Some(sha));
        }
        kept.push(draft);
    }
    Ok(kept)
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn load_all(&self) -> Result<Vec<StoredObject>, StoreError> {
        let rows = with_conn!(self, READ_DEADLINE, |client| {
            let tx = client.build_transaction().read_only(true).start().await.map_err(pg_err)?;
            tx.batch_execute(&format!("SET LOCAL statement_timeout = {}", READ_DEADLINE.as_millis()))
                .await
                .map_err(pg_err)?;
            let rows = tx
                .query(format!("{OBJECT_SELECT} ORDER BY kind COLLATE \"C\", id COLLATE \"C\"").as_str(), &[])
                .await
                .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(rows)
        })?;
        rows.iter().map(|row| object_from_row(row, &self.secrets)).collect()
    }

    async fn commit(&self, changes: Vec<Change>, audit: Vec<AuditDraft>) -> Result<Vec<AuditEntry>, StoreError> {
        if changes.is_empty() && audit.is_empty() {
            return Ok(Vec::new());
        }
        // Encrypt and encode before taking a connection: none of it needs the database.
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        let mut notes = Vec::new();
        for change in changes {
            match change {
                Change::Put(obj) => {
                    notes.push(change_payload(obj.kind, &obj.id, ChangeOp::Put, &self.replica));
                    puts.push(encode_object(obj, &self.secrets)?);
                }
                Change::Delete { kind, id } => {
                    notes.push(change_payload(kind, &id, ChangeOp::Delete, &self.replica));
                    deletes.push((kind.as_str(), id));
                }
            }
        }
        let hook = self.audit_hook.read().unwrap_or_else(PoisonError::into_inner).clone();
        with_conn!(self, WRITE_DEADLINE, |client| {
            let tx = client.transaction().await.map_err(pg_err)?;
            // Serializes every commit of every replica: seq assignment, and object
            // changes in the same order as their audit entries.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK]).await.map_err(pg_err)?;
            if !puts.is_empty() {
                let put = tx
                    .prepare_cached(
                        "INSERT INTO objects (kind, id, source, version, doc, secrets, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                         ON CONFLICT (kind, id) DO UPDATE SET \
                         source = excluded.source, version = excluded.version, doc = excluded.doc, \
                         secrets = excluded.secrets, created_at = excluded.created_at, \
                         updated_at = excluded.updated_at",
                    )
                    .await
                    .map_err(pg_err)?;
                for r in &puts {
                    tx.execute(
                        &put,
                        &[&r.kind, &r.id, &r.source, &r.version, &r.doc, &r.secrets, &r.created_at, &r.updated_at],
                    )
                    .await
                    .map_err(pg_err)?;
                }
            }
            if !deletes.is_empty() {
                let del = tx.prepare_cached("DELETE FROM objects WHERE kind = $1 AND id = $2").await.map_err(pg_err)?;
                for (kind, id) in &deletes {
                    tx.execute(&del, &[kind, id]).await.map_err(pg_err)?;
                }
            }

            let mut entries = Vec::new();
            if !audit.is_empty() {
                let drafts = drop_repeated_loads(&*tx, audit).await?;
                let tail =
                    tx.query_opt("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[]).await.map_err(pg_err)?;
                let (last_seq, last_hash) = match tail {
                    Some(row) => (get::<i64>(&row, 0)?, get::<String>(&row, 1)?),
                    None => (0, GENESIS_HASH.to_string()),
                };
                let now = OffsetDateTime::now_utc();
                let time_us = unix_micros(now);
                entries = seal_all(drafts, last_seq, &last_hash, &format_time(now));
                let ins = tx
                    .prepare_cached(
                        "INSERT INTO audit (seq, time, time_us, actor, action, object_type, object_id, \
                         before_json, after_json, prev_hash, hash) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    )
                    .await
                    .map_err(pg_err)?;
                for e in &entries {
                    tx.execute(
                        &ins,
                        &[
                            &e.seq,
                            &e.time,
                            &time_us,
                            &e.actor,
                            &e.action.as_str(),
                            &e.object_type,
                            &e.object_id,
                            &e.before,
                            &e.after,
                            &e.prev_hash,
                            &e.hash,
                        ],
                    )
                    .await
                    .map_err(pg_err)?;
                }
                // The entries' webhook events, in the same transaction: written if and
                // only if the entries are.
                if let Some(hook) = &hook {
                    let events: Vec<OutboxEvent> = entries.iter().flat_map(|e| hook(e)).collect();
                    insert_events(&tx, &events, now).await?;
                }
            }
            if !notes.is_empty() {
                // Delivered to listeners when (and only if) this transaction commits.
                tx.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", &[&NOTIFY_CHANNEL, &notes])
                    .await
                    .map_err(pg_err)?;
            }
            tx.commit().await.map_err(pg_err)?;
            Ok(entries)
        })
    }

    async fn last_file_hash(&self, file: &str) -> Result<Option<String>, StoreError> {
        with_conn!(self, WRITE_DEADLINE, |client| { newest_file_hash(&***client, file).await })
    }

    async fn list_audit(&self, filter: &AuditFilter, page: &Page) -> Result<Listing<AuditEntry>, StoreError> {
        let limit = page.effective_limit();
        let mut args = SqlArgs::new();
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE true");
        if let Some(cursor) = &page.cursor {
            sql.push_str(&format!(" AND seq < {}", arg(&mut args, decode_audit_cursor(cursor)?)));
        }
        if let Some(t) = filter.since {
            sql.push_str(&format!(" AND time_us >= {}", arg(&mut args, unix_micros(t))));
        }
        if let Some(t) = filter.until {
            sql.push_str(&format!(" AND time_us < {}", arg(&mut args, unix_micros(t))));
        }
        for (column, value) in [
            ("actor", filter.actor.clone()),
            ("action", filter.action.map(|a| a.as_str().to_string())),
            ("object_type", filter.object_type.clone()),
            ("object_id", filter.object_id.clone()),
        ] {
            if let Some(v) = value {
                sql.push_str(&format!(" AND {column} = {}", arg(&mut args, v)));
            }
        }
        // One row more than asked tells whether there is a next page.
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", arg(&mut args, fetch)));

        let rows = with_conn!(self, READ_DEADLINE, |client| {
            let tx = client.build_transaction().read_only(true).start().await.map_err(pg_err)?;
            tx.batch_execute(&format!("SET LOCAL statement_timeout = {}", READ_DEADLINE.as_millis()))
                .await
                .map_err(pg_err)?;
            let stmt = tx.prepare_cached(&sql).await.map_err(pg_err)?;
            let rows = tx.query(&stmt, &arg_refs(&args)).await.map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(rows)
        })?;
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = get(row, 0)?;
            items.push(audit_from_row(row)?.map_err(|why| StoreError::Corrupt(format!("audit entry {seq}: {why}")))?);
        }
        Ok(Listing::from_overfetch(items, limit, |e| encode_audit_cursor(e.seq)))
    }

    async fn verify_audit(&self) -> Result<VerifyResult, StoreError> {
        with_conn!(self, VERIFY_DEADLINE, |client| {
            // One statement reads one snapshot; rows are streamed, not collected.
            let tx = client.build_transaction().read_only(true).start().await.map_err(pg_err)?;
            tx.batch_execute(&format!("SET LOCAL statement_timeout = {}", VERIFY_DEADLINE.as_millis()))
                .await
                .map_err(pg_err)?;
            let rows = tx
                .query_raw(
                    format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq ASC").as_str(),
                    std::iter::empty::<i64>(),
                )
                .await
                .map_err(pg_err)?;
            futures::pin_mut!(rows);
            let mut verifier = ChainVerifier::new();
            while let Some(row) = rows.try_next().await.map_err(pg_err)? {
                let seq: i64 = get(&row, 0)?;
                let result = audit_from_row(&row)?
                    .map_err(|reason| ChainBreak { seq, reason })
                    .and_then(|entry| verifier.push(&entry));
                if let Err(brk) = result {
                    return Ok(verifier.broken(brk));
                }
            }
            tx.commit().await.map_err(pg_err)?;
            Ok(verifier.finish())
        })
    }

    async fn insert_activity(&self, batch: &[ActivityEntry]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut c = ActivityColumns::default();
        // The batch's webhook events, each with its entry's decision id.
        let mut events = EventColumns::default();
        let mut event_decisions: Vec<String> = Vec::new();
        for e in batch {
            for event in &e.outbox {
                events.push(event);
                event_decisions.push(pg_text(&e.decision_id));
            }
            let time = parse_time(&e.time).ok_or_else(|| {
                StoreError::Internal(format!("activity entry `{}` has a time that is not RFC 3339", e.decision_id))
            })?;
            c.decision_id.push(pg_text(&e.decision_id));
            c.time.push(pg_text(&e.time));
            c.time_us.push(unix_micros(time));
            c.application.push(pg_text(&e.application));
            c.username.push(e.username.as_deref().map(pg_text));
            c.remote_ip.push(e.remote_ip.as_deref().map(pg_text));
            c.device_id.push(e.device_id.as_deref().map(pg_text));
            c.decision.push(pg_text(&e.decision));
            c.reason.push(pg_text(&e.reason));
            c.policies.push(json_text(&e.policies)?);
            c.rules.push(json_text(&e.rules)?);
            c.rule_ids.push(json_text(&Value::from(activity_rule_ids(&e.rules)))?);
            c.latency_ms.push(e.latency_ms);
            c.via.push(pg_text(&e.via));
            c.replica.push(pg_text(&e.replica));
        }
        // The events' creation time; not even read from the clock without events.
        let (now_us, now_text) = match event_decisions.is_empty() {
            true => (0, String::new()),
            false => {
                let now = OffsetDateTime::now_utc();
                (unix_micros(now), format_time(now))
            }
        };
        // One autocommit statement: durable (synchronous_commit=on) when it returns.
        with_conn!(self, WRITE_DEADLINE, |client| {
            let activity: [&(dyn ToSql + Sync); 15] = [
                &c.decision_id,
                &c.time,
                &c.time_us,
                &c.application,
                &c.username,
                &c.remote_ip,
                &c.device_id,
                &c.decision,
                &c.reason,
                &c.policies,
                &c.rules,
                &c.rule_ids,
                &c.latency_ms,
                &c.via,
                &c.replica,
            ];
            if event_decisions.is_empty() {
                let stmt = client.prepare_cached(INSERT_ACTIVITY).await.map_err(pg_err)?;
                client.execute(&stmt, &activity).await.map_err(pg_err)?;
            } else {
                let stmt = client.prepare_cached(INSERT_ACTIVITY_WITH_EVENTS).await.map_err(pg_err)?;
                let mut args = activity.to_vec();
                args.extend_from_slice(&[
                    &events.webhook_id as &(dyn ToSql + Sync),
                    &events.event_id,
                    &events.event_type,
                    &events.payload,
                    &events.max_attempts,
                    &now_us,
                    &now_text,
                    &event_decisions,
                ]);
                client.execute(&stmt, &args).await.map_err(pg_err)?;
            }
            Ok(())
        })
    }

    async fn list_activity(&self, filter: &ActivityFilter, page: &Page) -> Result<Listing<ActivityEntry>, StoreError> {
        let limit = page.effective_limit();
        let mut args = SqlArgs::new();
        let mut sql = format!("SELECT {ACTIVITY_COLUMNS} FROM activity WHERE true");
        if let Some(cursor) = &page.cursor {
            let (t, id) = decode_activity_cursor(cursor)?;
            let (t, id) = (arg(&mut args, t), arg(&mut args, id));
            sql.push_str(&format!(" AND (time_us, id) < ({t}, {id})"));
        }
        if let Some(t) = filter.since {
            sql.push_str(&format!(" AND time_us >= {}", arg(&mut args, unix_micros(t))));
        }
        if let Some(t) = filter.until {
            sql.push_str(&format!(" AND time_us < {}", arg(&mut args, unix_micros(t))));
        }
        for (column, value) in [("username", &filter.username), ("application", &filter.application)] {
            if let Some(v) = value {
                let v = arg(&mut args, v.clone());
                let n = ACTIVITY_KEY_PREFIX;
                sql.push_str(&format!(" AND left({column}, {n}) = left({v}, {n}) AND {column} = {v}"));
            }
        }
        if let Some(v) = &filter.decision {
            sql.push_str(&format!(" AND decision = {}", arg(&mut args, v.clone())));
        }
        if let Some(rule_id) = &filter.rule_id {
            sql.push_str(&format!(" AND rule_ids @> ARRAY[{}::text]", arg(&mut args, rule_id.clone())));
        }
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        sql.push_str(&format!(" ORDER BY time_us DESC, id DESC LIMIT {}", arg(&mut args, fetch)));

        let rows = with_conn!(self, READ_DEADLINE, |client| {
            let tx = client.build_transaction().read_only(true).start().await.map_err(pg_err)?;
            tx.batch_execute(&format!("SET LOCAL statement_timeout = {}", READ_DEADLINE.as_millis()))
                .await
                .map_err(pg_err)?;
            let stmt = tx.prepare_cached(&sql).await.map_err(pg_err)?;
            let rows = tx.query(&stmt, &arg_refs(&args)).await.map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(rows)
        })?;
        let items = rows.iter().map(activity_from_row).collect::<Result<Vec<_>, _>>()?;
        Ok(Listing::from_overfetch(items, limit, |(id, time_us, _)| encode_activity_cursor(*time_us, *id))
            .map(|(_, _, e)| e))
    }

    async fn prune_activity(&self, older_than: OffsetDateTime) -> Result<u64, StoreError> {
        let cutoff = unix_micros(older_than);
        let mut total: u64 = 0;
        loop {
            // Chunks keep each statement short: prune never delays activity batches long.
            let removed = with_conn!(self, READ_DEADLINE, |client| {
                client
                    .execute(
                        "DELETE FROM activity WHERE id IN \
                         (SELECT id FROM activity WHERE time_us < $1 ORDER BY time_us LIMIT $2)",
                        &[&cutoff, &PRUNE_CHUNK],
                    )
                    .await
                    .map_err(pg_err)
            })?;
            total += removed;
            if removed < PRUNE_CHUNK.unsigned_abs() {
                break;
            }
        }
        // Finished webhook deliveries follow the activity log's retention; pending ones
        // stay however old (they are still owed to their webhook).
        let mut deliveries: u64 = 0;
        loop {
            let removed = with_conn!(self, READ_DEADLINE, |client| {
                client
                    .execute(
                        "DELETE FROM webhook_deliveries WHERE id IN \
                         (SELECT id FROM webhook_deliveries WHERE state <> 'pending' AND updated_us < $1 LIMIT $2)",
                        &[&cutoff, &PRUNE_CHUNK],
                    )
                    .await
                    .map_err(pg_err)
            })?;
            deliveries += removed;
            if removed < PRUNE_CHUNK.unsigned_abs() {
                break;
            }
        }
        if deliveries > 0 {
            tracing::info!(deliveries, "pruned finished webhook deliveries");
        }
        Ok(total)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        with_conn!(self, WRITE_DEADLINE, |client| {
            client.simple_query("SELECT 1").await.map_err(pg_err)?;
            Ok(())
        })
    }

    async fn enqueue_events(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        with_conn!(self, WRITE_DEADLINE, |client| { insert_events(&*client, events, now).await })
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        now_us: i64,
        lease_us: i64,
        wants: &[(String, usize)],
    ) -> Result<Vec<Delivery>, StoreError> {
        let wants: Vec<(String, i64)> = wants
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(hook, n)| (pg_text(hook), i64::try_from(*n).unwrap_or(i64::MAX)))
            .collect();
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        let (hooks, counts): (Vec<String>, Vec<i64>) = wants.into_iter().unzip();
        let owner = pg_text(owner);
        let until = now_us.saturating_add(lease_us);
        // One range of the due index per named webhook. SKIP LOCKED: a row another
        // replica is claiming right now is passed over rather than waited for; one it
        // claimed a moment ago fails the `claimed_until_us` test when re-checked after
        // its lock is released. Either way no row goes to both. MATERIALIZED keeps the
        // locking SELECT one scan, run once.
        let returning: Vec<String> = DELIVERY_COLUMNS.split(", ").map(|c| format!("d.{c}")).collect();
        let sql = format!(
            "WITH due AS MATERIALIZED (\
             SELECT c.id FROM unnest($4::text[], $5::bigint[]) AS w(hook, n) CROSS JOIN LATERAL (\
             SELECT id FROM webhook_deliveries \
             WHERE state = 'pending' AND webhook_id = w.hook AND next_attempt_us <= $3 AND claimed_until_us <= $3 \
             ORDER BY next_attempt_us, id LIMIT w.n FOR UPDATE SKIP LOCKED) c) \
             UPDATE webhook_deliveries d SET claimed_by = $1, claimed_until_us = $2 \
             FROM due WHERE d.id = due.id RETURNING {}",
            returning.join(", ")
        );
        let rows = with_conn!(self, WRITE_DEADLINE, |client| {
            let stmt = client.prepare_cached(&sql).await.map_err(pg_err)?;
            client.query(&stmt, &[&owner, &until, &now_us, &hooks, &counts]).await.map_err(pg_err)
        })?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let next_attempt_us: i64 = get(row, 9)?;
            claimed.push((next_attempt_us, delivery_from_row(row)?));
        }
        // RETURNING has no defined order.
        claimed.sort_by_key(|(due, d)| (*due, d.id));
        Ok(claimed.into_iter().map(|(_, d)| d).collect())
    }

    async fn pending_webhooks(&self) -> Result<Vec<String>, StoreError> {
        // A loose index scan of the due index: one seek per webhook.
        let rows = with_conn!(self, READ_DEADLINE, |client| {
            client
                .query(
                    "WITH RECURSIVE hooks(webhook_id) AS ( \
                     (SELECT webhook_id FROM webhook_deliveries WHERE state = 'pending' ORDER BY webhook_id LIMIT 1) \
                     UNION ALL \
                     SELECT (SELECT d.webhook_id FROM webhook_deliveries d \
                             WHERE d.state = 'pending' AND d.webhook_id > h.webhook_id ORDER BY d.webhook_id LIMIT 1) \
                     FROM hooks h WHERE h.webhook_id IS NOT NULL) \
                     SELECT webhook_id FROM hooks WHERE webhook_id IS NOT NULL",
                    &[],
                )
                .await
                .map_err(pg_err)
        })?;
        rows.iter().map(|row| get(row, 0)).collect()
    }

    async fn fail_pending_deliveries(
        &self,
        webhook_id: &str,
        now_us: i64,
        due_before_us: i64,
        last_status: Option<u16>,
        error: &str,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let (webhook_id, error) = (pg_text(webhook_id), pg_text(error));
        let status = last_status.map(i64::from);
        let now = OffsetDateTime::now_utc();
        let (now_text, now_micros) = (format_time(now), unix_micros(now));
        let limit = i64::from(limit);
        with_conn!(self, WRITE_DEADLINE, |client| {
            let stmt = client
                .prepare_cached(
                    "UPDATE webhook_deliveries SET state = 'failed', last_status = coalesce($4::bigint, last_status), \
                     last_error = $5, claimed_by = NULL, claimed_until_us = 0, updated_at = $6, updated_us = $7 \
                     WHERE id IN (SELECT id FROM webhook_deliveries \
                      WHERE state = 'pending' AND webhook_id = $1 AND next_attempt_us < $3 AND claimed_until_us <= $2 \
                      ORDER BY next_attempt_us, id LIMIT $8 FOR UPDATE SKIP LOCKED)",
                )
                .await
                .map_err(pg_err)?;
            client
                .execute(
                    &stmt,
                    &[&webhook_id, &now_us, &due_before_us, &status, &error, &now_text, &now_micros, &limit],
                )
                .await
                .map_err(pg_err)
        })
    }

    async fn finish_deliveries(&self, done: &[(i64, DeliveryUpdate)]) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        let (now_us, now_text) = (unix_micros(now), format_time(now));
        let ids: Vec<i64> = done.iter().map(|(id, _)| *id).collect();
        let states: Vec<&str> = done.iter().map(|(_, u)| u.state.as_str()).collect();
        let attempts: Vec<i64> = done.iter().map(|(_, u)| i64::from(u.attempts)).collect();
        let statuses: Vec<Option<i64>> = done.iter().map(|(_, u)| u.last_status.map(i64::from)).collect();
        let errors: Vec<Option<String>> = done.iter().map(|(_, u)| u.last_error.as_deref().map(pg_text)).collect();
        let next: Vec<i64> = done.iter().map(|(_, u)| u.next_attempt_us).collect();
        // One autocommit statement for the whole batch: one commit, one WAL flush.
        with_conn!(self, WRITE_DEADLINE, |client| {
            let stmt = client
                .prepare_cached(
                    "UPDATE webhook_deliveries AS d SET state = u.state, attempts = u.attempts, \
                     last_status = u.status, last_error = u.error, next_attempt_us = u.next, claimed_by = NULL, \
                     claimed_until_us = 0, updated_at = $7, updated_us = $8 \
                     FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::bigint[]) \
                     AS u(id, state, attempts, status, error, next) WHERE d.id = u.id",
                )
                .await
                .map_err(pg_err)?;
            client
                .execute(&stmt, &[&ids, &states, &attempts, &statuses, &errors, &next, &now_text, &now_us])
                .await
                .map_err(pg_err)?;
            Ok(())
        })
    }

    async fn release_claims(&self, owner: &str) -> Result<u64, StoreError> {
        let owner = pg_text(owner);
        with_conn!(self, WRITE_DEADLINE, |client| {
            // Only pending rows hold claims (`finish_delivery` clears them), and the
            // partial index lists exactly those.
            client
                .execute(
                    "UPDATE webhook_deliveries SET claimed_by = NULL, claimed_until_us = 0 \
                     WHERE state = 'pending' AND claimed_by = $1",
                    &[&owner],
                )
                .await
                .map_err(pg_err)
        })
    }

    async fn list_deliveries(&self, webhook_id: &str, page: &Page) -> Result<Listing<Delivery>, StoreError> {
        // Ids come from request paths: a NUL (which text cannot hold) matches nothing
        // rather than failing the query.
        let webhook_id = pg_text(webhook_id);
        let limit = page.effective_limit();
        let before = match &page.cursor {
            Some(cursor) => decode_delivery_cursor(cursor)?,
            None => i64::MAX,
        };
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = $1 AND id < $2 \
             ORDER BY id DESC LIMIT $3"
        );
        let rows = with_conn!(self, READ_DEADLINE, |client| {
            let tx = client.build_transaction().read_only(true).start().await.map_err(pg_err)?;
            tx.batch_execute(&format!("SET LOCAL statement_timeout = {}", READ_DEADLINE.as_millis()))
                .await
                .map_err(pg_err)?;
            let stmt = tx.prepare_cached(&sql).await.map_err(pg_err)?;
            let rows = tx.query(&stmt, &[&webhook_id, &before, &fetch]).await.map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(rows)
        })?;
        let items = rows.iter().map(delivery_from_row).collect::<Result<Vec<_>, _>>()?;
        Ok(Listing::from_overfetch(items, limit, |d| encode_delivery_cursor(d.id)))
    }

    async fn get_delivery(&self, webhook_id: &str, event_id: &str) -> Result<Option<Delivery>, StoreError> {
        let (webhook_id, event_id) = (pg_text(webhook_id), pg_text(event_id));
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = $1 AND event_id = $2");
        let row = with_conn!(self, WRITE_DEADLINE, |client| {
            let stmt = client.prepare_cached(&sql).await.map_err(pg_err)?;
            client.query_opt(&stmt, &[&webhook_id, &event_id]).await.map_err(pg_err)
        })?;
        row.as_ref().map(delivery_from_row).transpose()
    }

    async fn retry_delivery(
        &self,
        webhook_id: &str,
        event_id: &str,
        now_us: i64,
        extra_attempts: u32,
    ) -> Result<Option<Delivery>, StoreError> {
        let (webhook_id, event_id) = (pg_text(webhook_id), pg_text(event_id));
        let now = OffsetDateTime::now_utc();
        let (updated_us, updated_at) = (unix_micros(now), format_time(now));
        let extra = i64::from(extra_attempts);
        let sql = format!(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_us = $3, \
             max_attempts = LEAST(attempts + $4, {}), claimed_by = NULL, claimed_until_us = 0, \
             updated_at = $5, updated_us = $6 \
             WHERE webhook_id = $1 AND event_id = $2 RETURNING {DELIVERY_COLUMNS}",
            u32::MAX
        );
        let row = with_conn!(self, WRITE_DEADLINE, |client| {
            let stmt = client.prepare_cached(&sql).await.map_err(pg_err)?;
            client
                .query_opt(&stmt, &[&webhook_id, &event_id, &now_us, &extra, &updated_at, &updated_us])
                .await
                .map_err(pg_err)
        })?;
        row.as_ref().map(delivery_from_row).transpose()
    }

    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        let row = with_conn!(self, WRITE_DEADLINE, |client| {
            client
                .query_one("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'", &[])
                .await
                .map_err(pg_err)
        })?;
        let n: i64 = get(&row, 0)?;
        Ok(n.unsigned_abs())
    }

    fn set_audit_hook(&self, hook: AuditHook) {
        *self.audit_hook.write().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }
}

/// Why a listening session ended.
enum SessionEnd {
    /// The receiver was dropped: stop listening.
    ReceiverGone,
    /// The connection failed or could not be opened: reconnect.
    Lost,
}

async fn listen_loop(config: Config, events: mpsc::Sender<ChangeEvent>, ready: oneshot::Sender<()>, target: String) {
    let mut ready = Some(ready);
    // After any failure, the first successful session starts with a Resync.
    let mut resync_due = false;
    let mut backoff = LISTEN_BACKOFF_MIN;
    loop {
        let started = Instant::now();
        match listen_session(&config, &events, &mut ready, resync_due, &target).await {
            SessionEnd::ReceiverGone => return,
            SessionEnd::Lost => {}
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        resync_due = true;
        // A session that lived a while was a working connection: retry quickly.
        if started.elapsed() > LISTEN_BACKOFF_MAX {
            backoff = LISTEN_BACKOFF_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = events.closed() => return,
        }
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

async fn listen_session(
    config: &Config,
    events: &mpsc::Sender<ChangeEvent>,
    ready: &mut Option<oneshot::Sender<()>>,
    resync_due: bool,
    target: &str,
) -> SessionEnd {
    let (client, mut connection) = match config.connect(NoTls).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(target = %target, error = %pg_err(e), "change listener cannot connect");
            return SessionEnd::Lost;
        }
    };
    // The connection makes progress only while polled: a task drives it and forwards
    // the notifications it yields.
    let (payloads_tx, mut payloads) = mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if payloads_tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %pg_err(e), "change listener connection failed");
                    return;
                }
            }
        }
    });
    let _driver = AbortOnDrop(driver);

    let listen_sql = format!("LISTEN {NOTIFY_CHANNEL}");
    let listening = tokio::time::timeout(CONNECT_TIMEOUT, client.batch_execute(&listen_sql));
    if !matches!(listening.await, Ok(Ok(()))) {
        return SessionEnd::Lost;
    }
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    if resync_due {
        tracing::info!(target = %target, "change listener reconnected; asking for a full reload");
        if events.send(ChangeEvent::Resync).await.is_err() {
            return SessionEnd::ReceiverGone;
        }
    }
    let mut ping = tokio::time::interval(LISTEN_PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            payload = payloads.recv() => match payload {
                Some(payload) => {
                    if events.send(ChangeEvent::from_payload(&payload)).await.is_err() {
                        return SessionEnd::ReceiverGone;
                    }
                }
                None => {
                    tracing::warn!(target = %target, "change listener lost its connection");
                    return SessionEnd::Lost;
                }
            },
            _ = ping.tick() => {
                // Detects a connection that died silently (no FIN, e.g. a network cut).
                let alive = tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("SELECT 1")).await;
                if !matches!(alive, Ok(Ok(_))) {
                    tracing::warn!(target = %target, "change listener connection stopped answering");
                    return SessionEnd::Lost;
                }
            }
            _ = events.closed() => return SessionEnd::ReceiverGone,
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    //! These run against a real PostgreSQL (`VERDICT_TEST_DATABASE_URL`, default
    //! `postgres://postgres@127.0.0.1:5432`); each test creates and drops its own
    //! database, so they run in parallel.

    use super::*;
    use crate::store::conformance::{self, activity, all_activity_ids, draft, rule, PASSWORD, SECRET};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    fn server_url() -> String {
        std::env::var("VERDICT_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
            .trim_end_matches('/')
            .to_string()
    }

    async fn raw_connect(url: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL must run for these tests ({}): {e}", server_url()));
        tokio::spawn(conn);
        client
    }

    /// A database of its own, dropped (with its connections) at the end of the test.
    struct TestDb {
        name: String,
        url: String,
    }

    impl TestDb {
        async fn new() -> TestDb {
            let name = format!("verdict_test_{}", uuid::Uuid::new_v4().simple());
            let admin = raw_connect(&format!("{}/postgres", server_url())).await;
            admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
            TestDb { url: format!("{}/{name}", server_url()), name }
        }

        async fn raw(&self) -> tokio_postgres::Client {
            raw_connect(&self.url).await
        }

        async fn store(&self, replica: &str) -> PgStore {
            PgStore::connect(&self.url, key(), replica).await.unwrap()
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let name = self.name.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let url = format!("{}/postgres", server_url());
                    if let Ok((client, conn)) = tokio_postgres::connect(&url, NoTls).await {
                        tokio::spawn(conn);
                        let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                    }
                });
            })
            .join();
        }
    }

    fn key() -> Arc<SecretBox> {
        Arc::new(SecretBox::from_key([7u8; 32]))
    }

    /// Every row of every table of the database, as text.
    async fn dump_all_tables(raw: &tokio_postgres::Client) -> String {
        let tables = raw
            .query("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'", &[])
            .await
            .unwrap();
        let mut out = String::new();
        for t in tables {
            let name: String = t.get(0);
            let rows = raw.query(&format!("SELECT t::text FROM {name} t"), &[]).await.unwrap();
            for r in rows {
                out.push_str(r.get::<_, &str>(0));
                out.push('\n');
            }
        }
        out
    }

    #[tokio::test]
    async fn objects_round_trip_with_secrets_encrypted_at_rest() {
        let db = TestDb::new().await;
        let raw = db.raw().await;
        conformance::objects_round_trip_with_secrets_encrypted_at_rest(
            async || db.store("a").await,
            async |_open: bool| {
                let dump = dump_all_tables(&raw).await;
                assert!(dump.contains("r1") && dump.contains("siem"), "the dump reads the rows");
                for needle in [SECRET, PASSWORD] {
                    assert!(!dump.contains(needle), "`{needle}` in a raw row");
                }
            },
        )
        .await;
        // One object, by kind and id.
        let store = db.store("a").await;
        let mut hook = rule("siem", &[("auth.password", PASSWORD)]);
        hook.kind = ObjectKind::Webhook;
        assert_eq!(store.load_object(ObjectKind::Webhook, "siem").await.unwrap(), Some(hook));
        assert_eq!(store.load_object(ObjectKind::Policy, "siem").await.unwrap(), None);
    }

    #[tokio::test]
    async fn wrong_key_is_an_error_not_a_panic() {
        let db = TestDb::new().await;
        conformance::wrong_key_is_an_error_not_a_panic(db.store("a").await, async |key| {
            PgStore::connect(&db.url, key, "b").await.unwrap()
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_connects_migrate_once_and_newer_schema_is_refused() {
        let db = TestDb::new().await;
        let connects = (0..4).map(|i| {
            let url = db.url.clone();
            tokio::spawn(async move { PgStore::connect(&url, key(), &format!("r{i}")).await })
        });
        for c in futures::future::join_all(connects).await {
            c.unwrap().unwrap();
        }
        let raw = db.raw().await;
        let rows = raw.query("SELECT version, applied_by FROM schema_version ORDER BY version", &[]).await.unwrap();
        assert_eq!(rows.len(), MIGRATIONS.len());
        let appliers: std::collections::HashSet<String> = rows.iter().map(|r| r.get(1)).collect();
        assert_eq!(appliers.len(), 1, "one replica applied every migration: {appliers:?}");

        raw.execute("INSERT INTO schema_version (version, applied_by) VALUES (99, 'future')", &[]).await.unwrap();
        let err = PgStore::connect(&db.url, key(), "x").await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    }

    #[tokio::test]
    async fn audit_chain_verifies_and_tampering_is_located() {
        let db = TestDb::new().await;
        let raw = db.raw().await;
        conformance::audit_chain_verifies_and_tampering_is_located(&db.store("a").await, async |sql: &str| {
            raw.batch_execute(sql).await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_commit_concurrently_into_one_gap_free_chain() {
        let db = TestDb::new().await;
        let (a, b) = (db.store("a").await, db.store("b").await);
        conformance::concurrent_commits_keep_seq_gap_free(Arc::new(a), Arc::new(b)).await;
    }

    #[tokio::test]
    async fn audit_pagination_filters_and_file_hashes() {
        let db = TestDb::new().await;
        let store = db.store("a").await;
        conformance::audit_pagination_and_filters(&store).await;

        // last_file_hash, and a load of unchanged content is recorded once whichever
        // replica commits it.
        let file = "policies/b.json";
        assert_eq!(store.last_file_hash(file).await.unwrap(), None);
        let load = |sha: &str| conformance::file_load(file, sha);
        let other = db.store("b").await;
        assert_eq!(store.commit(vec![], vec![load("aaa")]).await.unwrap().len(), 1);
        assert_eq!(other.commit(vec![], vec![load("aaa")]).await.unwrap().len(), 0, "same content");
        assert_eq!(other.commit(vec![], vec![load("bbb"), load("bbb")]).await.unwrap().len(), 1);
        assert_eq!(store.commit(vec![], vec![load("aaa")]).await.unwrap().len(), 1, "changed back");
        // A non-load entry on the same object id does not count.
        store.commit(vec![], vec![draft("x", AuditAction::Update, "file", file)]).await.unwrap();
        assert_eq!(store.last_file_hash(file).await.unwrap().as_deref(), Some("aaa"));
        assert_eq!(store.last_file_hash("policies/c.json").await.unwrap(), None);
        assert_eq!(store.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 10 });
    }

    #[tokio::test]
    async fn last_file_hash_reads_the_newest_load() {
        let db = TestDb::new().await;
        conformance::last_file_hash_reads_the_newest_load(&db.store("a").await).await;
    }

    #[tokio::test]
    async fn usernames_and_applications_of_any_length_are_stored_and_filtered() {
        let db = TestDb::new().await;
        let store = db.store("a").await;
        let now = OffsetDateTime::now_utc();
        // Far over a B-tree entry's limit, and two values that share their first 200
        // characters (the indexed prefix) but differ after it.
        let huge = "x".repeat(1 << 20);
        let prefix = "p".repeat(300);
        let (long_a, long_b) = (format!("{prefix}-a"), format!("{prefix}-b"));
        let mut entries = Vec::new();
        for (i, (user, app)) in [(&huge, &huge), (&long_a, &long_a), (&long_b, &long_b)].into_iter().enumerate() {
            let mut e = activity(i, now);
            e.username = Some(user.clone());
            e.application = app.clone();
            entries.push(e);
        }
        store.insert_activity(&entries).await.unwrap();
        for (i, value) in [&huge, &long_a, &long_b].into_iter().enumerate() {
            let by_user = ActivityFilter { username: Some(value.clone()), ..Default::default() };
            assert_eq!(all_activity_ids(&store, &by_user, 10).await, vec![format!("d-{i:04}")]);
            let by_app = ActivityFilter { application: Some(value.clone()), ..Default::default() };
            assert_eq!(all_activity_ids(&store, &by_app, 10).await, vec![format!("d-{i:04}")]);
        }
        let none = ActivityFilter { username: Some(prefix), ..Default::default() };
        assert!(all_activity_ids(&store, &none, 10).await.is_empty());
    }

    #[tokio::test]
    async fn activity_insert_filters_pagination_prune() {
        let db = TestDb::new().await;
        conformance::activity_insert_filters_pagination_prune(&db.store("a").await).await;
    }

    #[tokio::test]
    async fn a_batch_of_500_is_one_statement() {
        let db = TestDb::new().await;
        let store = db.store("a").await;
        let old = time::macros::datetime!(2020-01-01 0:00 UTC);
        let batch: Vec<ActivityEntry> = (0..500).map(|i| activity(i, old)).collect();
        store.insert_activity(&batch).await.unwrap();
        let raw = db.raw().await;
        // Rows written by one statement share their transaction (xmin) and command id (cmin).
        let row = raw
            .query_one("SELECT count(*), count(DISTINCT xmin::text), count(DISTINCT cmin::text) FROM activity", &[])
            .await
            .unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), (500, 1, 1));
    }

    #[tokio::test]
    async fn prune_works_in_chunks() {
        let db = TestDb::new().await;
        let chunk = usize::try_from(PRUNE_CHUNK).unwrap();
        conformance::prune_works_in_chunks(&db.store("a").await, chunk).await;
    }

    async fn next_event(rx: &mut mpsc::Receiver<ChangeEvent>, within: Duration) -> ChangeEvent {
        tokio::time::timeout(within, rx.recv()).await.expect("an event in time").expect("listener alive")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_on_one_replica_are_notified_to_another() {
        let db = TestDb::new().await;
        let a = db.store("a").await;
        let b = db.store("b").await;
        let mut events = b.listen().await;

        // Audit-only commits notify nothing.
        a.commit(vec![], vec![draft("x", AuditAction::Load, "file", "policies/a.json")]).await.unwrap();
        let started = Instant::now();
        a.commit(
            vec![
                Change::Put(rule("r1", &[("auth.client_secret", SECRET)])),
                Change::Delete { kind: ObjectKind::Policy, id: "p9".into() },
            ],
            vec![draft("x", AuditAction::Create, "rule", "r1")],
        )
        .await
        .unwrap();
        let first = next_event(&mut events, Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1), "notified within 1 s: {:?}", started.elapsed());
        assert_eq!(
            first,
            ChangeEvent::Changed { kind: ObjectKind::Rule, id: "r1".into(), op: ChangeOp::Put, replica: "a".into() }
        );
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            ChangeEvent::Changed {
                kind: ObjectKind::Policy,
                id: "p9".into(),
                op: ChangeOp::Delete,
                replica: "a".into()
            }
        );
        let loaded = b.load_object(ObjectKind::Rule, "r1").await.unwrap().unwrap();
        assert_eq!(loaded.secrets["auth.client_secret"], SECRET);

        // A failed commit notifies nothing: the NOTIFY is part of its transaction.
        let raw = db.raw().await;
        raw.batch_execute("CREATE FUNCTION no_rules() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no'; END $$; \
             CREATE TRIGGER no_r2 BEFORE INSERT ON objects FOR EACH ROW WHEN (NEW.id = 'r2') EXECUTE FUNCTION no_rules();")
            .await
            .unwrap();
        assert!(a.commit(vec![Change::Put(rule("r2", &[]))], vec![]).await.is_err());
        a.commit(vec![Change::Put(rule("r3", &[]))], vec![]).await.unwrap();
        match next_event(&mut events, Duration::from_secs(5)).await {
            ChangeEvent::Changed { id, .. } => assert_eq!(id, "r3"),
            other => panic!("{other:?}"),
        }
        // A payload that is not ours asks for a resync rather than being dropped.
        raw.batch_execute("NOTIFY verdict_changes, 'garbage'").await.unwrap();
        assert_eq!(next_event(&mut events, Duration::from_secs(5)).await, ChangeEvent::Resync);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listener_resyncs_once_after_its_connection_is_killed() {
        let db = TestDb::new().await;
        let a = db.store("a").await;
        let b = db.store("b").await;
        let mut events = b.listen().await;
        let raw = db.raw().await;
        let killed = raw
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'verdict-listen:b' \
                 AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(killed.len(), 1, "one listener backend");
        assert_eq!(next_event(&mut events, Duration::from_secs(10)).await, ChangeEvent::Resync);
        // Listening again: later changes arrive, and no second Resync comes first.
        a.commit(vec![Change::Put(rule("r1", &[]))], vec![]).await.unwrap();
        match next_event(&mut events, Duration::from_secs(5)).await {
            ChangeEvent::Changed { id, replica, .. } => assert_eq!((id.as_str(), replica.as_str()), ("r1", "a")),
            other => panic!("{other:?}"),
        }
        // Dropping the receiver stops the listener and closes its connection.
        drop(events);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = raw
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'verdict-listen:b' \
                     AND datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "listener connection still open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Mode {
        Up,
        Blackhole,
        Down,
    }

    /// A TCP proxy in front of PostgreSQL that a test can cut or make hang.
    struct Proxy {
        addr: SocketAddr,
        mode: watch::Sender<Mode>,
        accept: Option<tokio::task::JoinHandle<()>>,
    }

    impl Proxy {
        async fn start() -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (mode, _) = watch::channel(Mode::Up);
            let mut proxy = Proxy { addr, mode, accept: None };
            proxy.serve(listener);
            proxy
        }

        fn serve(&mut self, listener: TcpListener) {
            let mode = self.mode.clone();
            self.accept = Some(tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(pump(client, mode.subscribe()));
                }
            }));
        }

        fn set(&mut self, mode: Mode) {
            self.mode.send_replace(mode);
            if mode == Mode::Down {
                if let Some(accept) = self.accept.take() {
                    accept.abort();
                }
            }
        }

        async fn up(&mut self) {
            self.set(Mode::Up);
            if self.accept.is_none() {
                let listener = TcpListener::bind(self.addr).await.unwrap();
                self.serve(listener);
            }
        }
    }

    async fn pump(mut client: TcpStream, mut mode: watch::Receiver<Mode>) {
        let target: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let Ok(mut server) = TcpStream::connect(target).await else { return };
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let (mut up, mut down) = (vec![0u8; 16384], vec![0u8; 16384]);
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Down => return,
                Mode::Blackhole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                Mode::Up => {}
            }
            tokio::select! {
                r = cr.read(&mut up) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => if sw.write_all(&up[..n]).await.is_err() { return },
                },
                r = sr.read(&mut down) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => if cw.write_all(&down[..n]).await.is_err() { return },
                },
                c = mode.changed() => if c.is_err() { return },
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_database_answers_unavailable_within_two_seconds() {
        let db = TestDb::new().await;
        let mut proxy = Proxy::start().await;
        let pw = "hunter2-not-in-messages";
        let url = format!("postgres://postgres:{pw}@{}/{}", proxy.addr, db.name);
        let store = PgStore::connect(&url, key(), "a").await.unwrap();
        store
            .commit(vec![Change::Put(rule("r1", &[]))], vec![draft("x", AuditAction::Create, "rule", "r1")])
            .await
            .unwrap();
        store.insert_activity(&[activity(1, OffsetDateTime::now_utc())]).await.unwrap();

        let expect_unavailable = |what: &str, started: Instant, result: Result<(), StoreError>| {
            let elapsed = started.elapsed();
            let err = result.expect_err(what);
            assert!(matches!(err, StoreError::Unavailable(_)), "{what}: {err}");
            assert!(elapsed < Duration::from_millis(2100), "{what} took {elapsed:?}");
            assert!(!err.to_string().contains(pw), "{what}: {err}");
        };

        // The network hangs: the pooled connection's query never returns.
        proxy.set(Mode::Blackhole);
        let t = Instant::now();
        let r = store.commit(vec![Change::Put(rule("r2", &[]))], vec![draft("x", AuditAction::Create, "rule", "r2")]);
        expect_unavailable("commit (hanging)", t, r.await.map(|_| ()));
        let t = Instant::now();
        expect_unavailable("ping (hanging, new connection)", t, store.ping().await);

        // The server is gone: connections are closed and new ones refused.
        proxy.set(Mode::Down);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        let r = store.commit(vec![Change::Put(rule("r2", &[]))], vec![draft("x", AuditAction::Create, "rule", "r2")]);
        expect_unavailable("commit (down)", t, r.await.map(|_| ()));
        let t = Instant::now();
        expect_unavailable(
            "insert_activity (down)",
            t,
            store.insert_activity(&[activity(2, OffsetDateTime::now_utc())]).await,
        );
        let t = Instant::now();
        expect_unavailable("connect (down)", t, PgStore::connect(&url, key(), "b").await.map(|_| ()));

        // Back: the store recovers by itself and the chain is intact, with no half commit.
        proxy.up().await;
        store
            .commit(vec![Change::Put(rule("r3", &[]))], vec![draft("x", AuditAction::Create, "rule", "r3")])
            .await
            .unwrap();
        assert_eq!(store.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 2 });
        let ids: Vec<String> = store.load_all().await.unwrap().into_iter().map(|o| o.id).collect();
        assert_eq!(ids, ["r1", "r3"]);
        assert_eq!(store.list_activity(&ActivityFilter::default(), &Page::default()).await.unwrap().items.len(), 1);
    }

    #[tokio::test]
    async fn bad_urls_and_refused_connections_do_not_leak_the_password() {
        let t = Instant::now();
        let err = PgStore::connect("postgres://u:sekrit-pw@127.0.0.1:1/db", key(), "a").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(!err.to_string().contains("sekrit-pw"), "{err}");
        assert!(err.to_string().contains("127.0.0.1:1/db"), "{err}");
        let err = PgStore::connect("postgres://u:sekrit-pw@127.0.0.1:notaport/db", key(), "a").await.unwrap_err();
        assert!(!err.to_string().contains("sekrit-pw"), "{err}");
    }

    #[test]
    fn payloads_round_trip_and_garbage_means_resync() {
        let p = change_payload(ObjectKind::Webhook, "siem", ChangeOp::Delete, "r1");
        assert_eq!(
            ChangeEvent::from_payload(&p),
            ChangeEvent::Changed {
                kind: ObjectKind::Webhook,
                id: "siem".into(),
                op: ChangeOp::Delete,
                replica: "r1".into()
            }
        );
        let huge = change_payload(ObjectKind::Rule, &"x".repeat(9000), ChangeOp::Put, "r1");
        assert!(huge.len() < 100);
        assert_eq!(ChangeEvent::from_payload(&huge), ChangeEvent::Resync);
        assert_eq!(ChangeEvent::from_payload("{}"), ChangeEvent::Resync);
    }

    mod outbox {
        use super::*;
        use crate::store::outbox_conformance as conformance;

        async fn fresh() -> (TestDb, PgStore) {
            let db = TestDb::new().await;
            let store = db.store("a").await;
            (db, store)
        }

        crate::store::store_checks!(conformance; fresh;
             claims_lease_and_finish, claims_take_only_the_named_webhooks, fail_pending_fails_overdue_rows_in_chunks, release_claims_frees_rows, listing_get_and_retry, depth_counts_pending_only, audit_hook_events_commit_with_the_entry);

        #[tokio::test]
        async fn activity_batches_write_their_events_once() {
            let db = TestDb::new().await;
            let store = db.store("a").await;
            conformance::activity_batches_write_their_events_once(&store).await;
            // A batch with events is still one statement, entries and events alike.
            let batch = [
                conformance::entry("one-1", vec![conformance::event("one", "e1"), conformance::event("two", "e1")]),
                conformance::entry("one-2", vec![]),
                conformance::entry("one-3", vec![conformance::event("one", "e3")]),
            ];
            store.insert_activity(&batch).await.unwrap();
            let raw = db.raw().await;
            let row = raw
                .query_one(
                    "SELECT count(*), count(DISTINCT xmin::text), count(DISTINCT cmin::text) FROM \
                     (SELECT xmin, cmin FROM activity WHERE decision_id LIKE 'one-%' \
                      UNION ALL SELECT xmin, cmin FROM webhook_deliveries WHERE webhook_id IN ('one', 'two')) t",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), (6, 1, 1));
        }

        #[tokio::test]
        async fn a_failing_outbox_insert_fails_the_whole_write() {
            let db = TestDb::new().await;
            let store = db.store("a").await;
            let raw = db.raw().await;
            conformance::a_failing_outbox_insert_fails_the_whole_write(&store, || async move {
                raw.batch_execute(
                    "CREATE FUNCTION no_outbox() RETURNS trigger LANGUAGE plpgsql AS \
                     $$ BEGIN RAISE EXCEPTION 'outbox refused'; END $$; \
                     CREATE TRIGGER no_outbox BEFORE INSERT ON webhook_deliveries \
                     FOR EACH ROW EXECUTE FUNCTION no_outbox();",
                )
                .await
                .unwrap();
            })
            .await;
        }

        #[tokio::test]
        async fn prune_removes_finished_deliveries() {
            let db = TestDb::new().await;
            conformance::prune_removes_finished_deliveries(&db.store("a").await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_replicas_claiming_at_once_get_disjoint_rows() {
            let db = TestDb::new().await;
            let a = db.store("a").await;
            let b = db.store("b").await;
            for round in 0..5 {
                let events: Vec<OutboxEvent> =
                    (0..200).map(|i| conformance::event("h", &format!("r{round}-e{i:03}"))).collect();
                a.enqueue_events(&events).await.unwrap();
                let now = conformance::now_us();
                let wants = [("h".to_string(), 150)];
                let (x, y) = tokio::join!(
                    a.claim_deliveries("replica-a", now, 60_000_000, &wants),
                    b.claim_deliveries("replica-b", now, 60_000_000, &wants)
                );
                let (x, y) = (x.unwrap(), y.unwrap());
                assert!(x.len() <= 150 && y.len() <= 150);
                let mut ids: Vec<&str> = x.iter().chain(&y).map(|d| d.event_id.as_str()).collect();
                assert_eq!(ids.len(), 200, "round {round}: {} + {}", x.len(), y.len());
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), 200, "round {round}: a row went to both replicas");
                for d in x.iter().chain(&y) {
                    let done = DeliveryUpdate {
                        state: crate::store::DeliveryState::Delivered,
                        attempts: 1,
                        last_status: Some(200),
                        last_error: None,
                        next_attempt_us: 0,
                    };
                    a.finish_delivery(d.id, &done).await.unwrap();
                }
            }
            assert_eq!(a.outbox_depth().await.unwrap(), 0);
        }

        #[tokio::test]
        async fn migration_3_adds_the_outbox_to_a_database_with_entries() {
            let db = TestDb::new().await;
            // A database at migration 2, as the previous release left it.
            {
                let raw = db.raw().await;
                raw.batch_execute(
                    "CREATE TABLE schema_version (version integer PRIMARY KEY, \
                     applied_at timestamptz NOT NULL DEFAULT now(), applied_by text NOT NULL)",
                )
                .await
                .unwrap();
                for (i, sql) in MIGRATIONS[..2].iter().enumerate() {
                    raw.batch_execute(sql).await.unwrap();
                    let version = i as i32 + 1;
                    raw.execute("INSERT INTO schema_version (version, applied_by) VALUES ($1, 'old')", &[&version])
                        .await
                        .unwrap();
                }
            }
            let store = db.store("a").await;
            store.insert_activity(&[conformance::entry("d1", vec![conformance::event("h", "e1")])]).await.unwrap();
            assert_eq!(store.outbox_depth().await.unwrap(), 1);
            let raw = db.raw().await;
            let n: i64 = raw.query_one("SELECT count(*) FROM schema_version", &[]).await.unwrap().get(0);
            assert_eq!(n, MIGRATIONS.len() as i64);
        }
    }
}
