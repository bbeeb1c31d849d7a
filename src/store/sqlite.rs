//! The SQLite store: one file, `DATA_DIR/verdict.db`, for a single verdict process.
//!
//! Durability: WAL journal with `synchronous=FULL`, so every committed transaction is
//! fsynced before `commit`/`insert_activity` returns and survives `kill -9` and power
//! loss. [`SqliteOptions::activity_synchronous`] may relax this for activity batches
//! only (`NORMAL`: no fsync per commit, survives `kill -9` of verdict but not an OS
//! crash or power loss); admin commits always stay `FULL`.
//!
//! Threads: SQLite calls block, so they run under `spawn_blocking`, never on the async
//! executor threads — except activity batches, which the activity writer commits from
//! its own dedicated thread through [`Store::activity_sink`]. All writes go through one
//! writer connection behind a mutex (SQLite allows one writer at a time anyway, and the
//! mutex makes audit `seq` assignment race-free); listings use a second, read-only
//! connection, so a long read never waits for a batch of activity inserts and vice
//! versa.
//!
//! Schema: [`MIGRATIONS`] is an ordered list of SQL scripts; `PRAGMA user_version` holds
//! how many have run. Each runs in its own transaction at [`SqliteStore::open`].
//!
//! Webhook outbox (SPEC §10): `webhook_deliveries` (migration 3) holds one row per
//! (webhook, event). Rows are written in the transaction of what caused them — an
//! activity batch (from [`ActivityRecord::outbox`], only for entries the batch actually
//! inserted), a `commit` (from the [`AuditHook`]'s events) — so an answered decision or a
//! committed change never lacks its events. A batch without events prepares nothing
//! more than before. Delivery workers claim due rows with a lease (`claimed_by`,
//! `claimed_until_us`), one `UPDATE … RETURNING` per named webhook (a range of the due
//! index, migration 4) in one job on the writer connection, which serialises claims; a
//! lease that runs out (a crashed process) frees the row.
//! `AUTOINCREMENT` keeps row ids (the listing order and cursor) from being reused after
//! pruning.
//!
//! File loads: [`Store::last_file_hash`] reads `after.sha256` of the newest audit entry
//! with `action = load`, `object_type = file`, `object_id = FILE` — the audit log is the
//! record, no side table.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde_json::Value;
use time::OffsetDateTime;

use super::{
    activity_rule_ids, decode_activity_cursor, decode_audit_cursor, decode_delivery_cursor, encode_activity_cursor,
    encode_audit_cursor, encode_delivery_cursor, format_time, unix_micros, ActivityEntry, ActivityFilter,
    ActivityRecord, ActivitySink, AuditAction, AuditDraft, AuditEntry, AuditFilter, AuditHook, Change, Delivery,
    DeliveryUpdate, Listing, ObjectKind, OutboxEvent, Page, RawDelivery, Store, StoreError, StoredObject, Synchronous,
    VerifyResult, DELIVERY_COLUMNS,
};
use crate::logs::audit::{seal_all, ChainBreak, ChainVerifier, GENESIS_HASH};
use crate::secrets::SecretBox;

/// Name of the database file inside the data directory.
pub const DB_FILE_NAME: &str = "verdict.db";

/// How long a statement waits for a lock held by another process (e.g. a `sqlite3`
/// shell) before the store reports [`StoreError::Unavailable`]; admin writes must answer
/// 503 within about 2 s rather than hang.
const BUSY_TIMEOUT: Duration = Duration::from_millis(2000);

/// Rows deleted per transaction by `prune_activity`, so pruning a large backlog never
/// holds the writer long enough to delay decisions waiting for their activity entry.
const PRUNE_CHUNK: usize = 2000;

/// Schema migrations, in order. Never edit one that has shipped; append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: objects, audit chain, activity log.
    r#"
    CREATE TABLE objects (
        kind        TEXT NOT NULL,
        id          TEXT NOT NULL,
        source      TEXT NOT NULL,
        version     INTEGER NOT NULL,
        doc         TEXT NOT NULL,
        secrets     TEXT,            -- SecretBox ciphertext of the JSON map; NULL when empty
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (kind, id)
    ) WITHOUT ROWID;

    CREATE TABLE audit (
        seq          INTEGER PRIMARY KEY,
        time         TEXT NOT NULL,
        time_us      INTEGER NOT NULL,
        actor        TEXT NOT NULL,
        action       TEXT NOT NULL,
        object_type  TEXT NOT NULL,
        object_id    TEXT NOT NULL,
        before_json  TEXT,
        after_json   TEXT,
        prev_hash    TEXT NOT NULL,
        hash         TEXT NOT NULL
    );
    CREATE INDEX audit_by_actor ON audit (actor, seq);
    CREATE INDEX audit_by_object ON audit (object_type, object_id, seq);
    CREATE INDEX audit_by_time ON audit (time_us);

    CREATE TABLE activity (
        id           INTEGER PRIMARY KEY,
        decision_id  TEXT NOT NULL UNIQUE,
        time         TEXT NOT NULL,
        time_us      INTEGER NOT NULL,
        application  TEXT NOT NULL,
        username     TEXT,
        remote_ip    TEXT,
        device_id    TEXT,
        decision     TEXT NOT NULL,
        reason       TEXT NOT NULL,
        policies     TEXT NOT NULL,
        rules        TEXT NOT NULL,
        latency_ms   REAL NOT NULL,
        via          TEXT NOT NULL,
        replica      TEXT NOT NULL
    );
    CREATE INDEX activity_by_time ON activity (time_us, id);
    CREATE INDEX activity_by_user ON activity (username, time_us, id);
    CREATE INDEX activity_by_app ON activity (application, time_us, id);
    CREATE INDEX activity_by_decision ON activity (decision, time_us, id);

    -- One row per (rule, activity entry), so the rule_id filter is an index lookup
    -- instead of parsing every entry's rules JSON.
    CREATE TABLE activity_rule (
        rule_id      TEXT NOT NULL,
        activity_id  INTEGER NOT NULL,
        PRIMARY KEY (rule_id, activity_id)
    ) WITHOUT ROWID;
    CREATE INDEX activity_rule_by_activity ON activity_rule (activity_id);
    "#,
    // 2: cheaper activity inserts (each index is written on every decision). `decision`
    // has two values: its index becomes a partial index of the denies (the rarer,
    // investigated ones; an `allow` filter walks the time index and skips denies).
    // Pruning finds an entry's rule rows by (rule_id, activity_id) from its `rules`
    // JSON, so the activity_id index of activity_rule goes. Creating the partial index
    // reads the activity table once.
    r#"
    DROP INDEX activity_by_decision;
    DROP INDEX activity_rule_by_activity;
    CREATE INDEX activity_denies ON activity (time_us, id) WHERE decision = 'deny';
    "#,
    // 3: the webhook outbox (SPEC §10): one row per (webhook, event). `state` is
    // `pending`, `delivered` or `failed`; a pending row is due at `next_attempt_us` and
    // free to claim once `claimed_until_us` has passed. The due index is partial: only
    // pending rows are ever claimed, and delivered ones (nearly all) cost it nothing.
    r#"
    CREATE TABLE webhook_deliveries (
        id                INTEGER PRIMARY KEY AUTOINCREMENT,
        webhook_id        TEXT NOT NULL,
        event_id          TEXT NOT NULL,
        event_type        TEXT NOT NULL,
        payload           TEXT NOT NULL,
        state             TEXT NOT NULL DEFAULT 'pending',
        attempts          INTEGER NOT NULL DEFAULT 0,
        max_attempts      INTEGER NOT NULL,
        last_status       INTEGER,
        last_error        TEXT,
        next_attempt_us   INTEGER NOT NULL,
        claimed_by        TEXT,
        claimed_until_us  INTEGER NOT NULL DEFAULT 0,
        created_at        TEXT NOT NULL,
        updated_at        TEXT NOT NULL,
        updated_us        INTEGER NOT NULL,
        UNIQUE (webhook_id, event_id)
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_us, id) WHERE state = 'pending';
    CREATE INDEX webhook_deliveries_by_hook ON webhook_deliveries (webhook_id, id);
    "#,
    // 4: claims name the webhooks they take rows of, so the due index leads with the
    // webhook: the rows of a webhook whose receiver is failing are never read while they
    // wait (before, every claim passed over them, and holding them back rewrote them).
    // Rows held back by the old scheme (due at i64::MAX / 2) are due again.
    r#"
    DROP INDEX webhook_deliveries_due;
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook_id, next_attempt_us, id) WHERE state = 'pending';
    UPDATE webhook_deliveries SET next_attempt_us = updated_us
        WHERE state = 'pending' AND next_attempt_us >= 4611686018427387903;
    "#,
];

/// Options of [`SqliteStore::open_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SqliteOptions {
    /// `synchronous` for activity batches; everything else is always `FULL`.
    pub activity_synchronous: Synchronous,
}

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
    secrets: Arc<SecretBox>,
    options: SqliteOptions,
    /// Builds the outbox events of the audit entries `commit` seals.
    audit_hook: RwLock<Option<AuditHook>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating when missing) `data_dir/verdict.db` and runs pending migrations.
    ///
    /// Blocks on file I/O: call it at startup, before serving, or from `spawn_blocking`.
    pub fn open(data_dir: &Path, secrets: Arc<SecretBox>) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(data_dir, secrets, SqliteOptions::default())
    }

    /// [`SqliteStore::open`] with options.
    pub fn open_with(
        data_dir: &Path,
        secrets: Arc<SecretBox>,
        options: SqliteOptions,
    ) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create data directory `{}`: {e}", data_dir.display()))
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        let mut writer = open_connection(&path, false)?;
        migrate(&mut writer)?;
        let reader = open_connection(&path, true)?;
        Ok(SqliteStore {
            path,
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            secrets,
            options,
            audit_hook: RwLock::new(None),
        })
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer connection on a blocking thread.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        run_blocking(Arc::clone(&self.writer), f).await
    }

    /// Runs `f` on the reader connection on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        run_blocking(Arc::clone(&self.reader), f).await
    }
}

async fn run_blocking<T, F>(conn: Arc<Mutex<Connection>>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        // A panic while holding the lock leaves no half-done work behind: an open
        // rusqlite transaction rolls back when dropped. So a poisoned lock is safe to use.
        let mut guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    })
    .await
    .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
}

fn open_connection(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        // Each connection is used by one thread at a time, behind its own mutex.
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(db_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    // Room for every statement the store prepares (rusqlite's default is 16), so the
    // activity batch statements are never evicted by admin or listing queries.
    conn.set_prepared_statement_cache_capacity(64);
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).map_err(db_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "database `{}` refused WAL journal mode (got `{mode}`)",
            path.display()
        )));
    }
    // FULL fsyncs the WAL on every commit: a committed batch survives power loss.
    conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(db_err)?;
    // Keep sort/temp data in memory so nothing about a query lands in temp files.
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(db_err)?;
    if read_only {
        conn.pragma_update(None, "query_only", "ON").map_err(db_err)?;
    }
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(db_err)?;
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if current > known {
        return Err(StoreError::Corrupt(format!(
            "database schema version {current} is newer than this verdict supports ({known})"
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
        let version = index + 1;
        // IMMEDIATE takes the write lock first, so two processes opening the same file
        // cannot both run a migration.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        let now: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(db_err)?;
        if now >= i64::try_from(version).unwrap_or(i64::MAX) {
            continue;
        }
        tx.execute_batch(sql).map_err(db_err)?;
        tx.pragma_update(None, "user_version", version).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        tracing::info!(version, "applied store migration");
    }
    Ok(())
}

/// Maps SQLite failures onto the store's error kinds. rusqlite messages name SQL and
/// columns, never bound values, so no secret can appear in them.
fn db_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::SystemIoFailure
            | ErrorCode::PermissionDenied
            | ErrorCode::ReadOnly
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::OutOfMemory => StoreError::Unavailable(e.to_string()),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => StoreError::Corrupt(e.to_string()),
            _ => StoreError::Internal(e.to_string()),
        },
        _ => StoreError::Internal(e.to_string()),
    }
}

fn json_text(value: &Value) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Internal(format!("cannot encode JSON: {e}")))
}

fn opt_json_text(value: Option<&Value>) -> Result<Option<String>, StoreError> {
    value.map(json_text).transpose()
}

fn parse_json(text: &str, what: impl FnOnce() -> String) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt(format!("{} is not valid JSON", what())))
}

/// An object row ready to be written: secrets already encrypted.
struct ObjectRow {
    kind: ObjectKind,
    id: String,
    source: String,
    version: i64,
    doc: String,
    secrets: Option<String>,
    created_at: String,
    updated_at: String,
}

fn encode_object(obj: StoredObject, secrets: &SecretBox) -> Result<ObjectRow, StoreError> {
    let sealed = if obj.secrets.is_empty() {
        None
    } else {
        let plain = serde_json::to_string(&obj.secrets)
            .map_err(|e| StoreError::Internal(format!("cannot encode secrets: {e}")))?;
        Some(secrets.encrypt(&plain))
    };
    Ok(ObjectRow {
        kind: obj.kind,
        id: obj.id,
        source: obj.source,
        version: obj.version,
        doc: json_text(&obj.doc)?,
        secrets: sealed,
        created_at: obj.created_at,
        updated_at: obj.updated_at,
    })
}

const AUDIT_COLUMNS: &str =
    "seq, time, actor, action, object_type, object_id, before_json, after_json, prev_hash, hash";

/// An audit row as stored, before its text is parsed.
struct RawAudit {
    seq: i64,
    time: String,
    actor: String,
    action: String,
    object_type: String,
    object_id: String,
    before: Option<String>,
    after: Option<String>,
    prev_hash: String,
    hash: String,
}

impl RawAudit {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawAudit> {
        Ok(RawAudit {
            seq: row.get(0)?,
            time: row.get(1)?,
            actor: row.get(2)?,
            action: row.get(3)?,
            object_type: row.get(4)?,
            object_id: row.get(5)?,
            before: row.get(6)?,
            after: row.get(7)?,
            prev_hash: row.get(8)?,
            hash: row.get(9)?,
        })
    }

    /// Parses the row; the error says what is wrong with it, for `Corrupt` or a chain break.
    fn parse(self) -> Result<AuditEntry, String> {
        let seq = self.seq;
        let action = AuditAction::parse(&self.action).ok_or_else(|| "unknown action".to_string())?;
        let json = |text: Option<String>, field: &str| -> Result<Option<Value>, String> {
            text.map(|t| serde_json::from_str(&t).map_err(|_| format!("`{field}` is not valid JSON"))).transpose()
        };
        Ok(AuditEntry {
            seq,
            time: self.time,
            actor: self.actor,
            action,
            object_type: self.object_type,
            object_id: self.object_id,
            before: json(self.before, "before")?,
            after: json(self.after, "after")?,
            prev_hash: self.prev_hash,
            hash: self.hash,
        })
    }
}

const ACTIVITY_COLUMNS: &str = "id, time_us, decision_id, time, application, username, remote_ip, \
     device_id, decision, reason, policies, rules, latency_ms, via, replica";

/// An activity row with its ordering key, for building the next cursor.
struct ActivityRow {
    id: i64,
    time_us: i64,
    entry: ActivityEntry,
}

fn activity_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, i64, ActivityEntry, String, String)> {
    let policies: String = row.get(10)?;
    let rules: String = row.get(11)?;
    Ok((
        row.get(0)?,
        row.get(1)?,
        ActivityEntry {
            decision_id: row.get(2)?,
            time: row.get(3)?,
            application: row.get(4)?,
            username: row.get(5)?,
            remote_ip: row.get(6)?,
            device_id: row.get(7)?,
            decision: row.get(8)?,
            reason: row.get(9)?,
            policies: Value::Null,
            rules: Value::Null,
            latency_ms: row.get(12)?,
            via: row.get(13)?,
            replica: row.get(14)?,
            outbox: Vec::new(),
        },
        policies,
        rules,
    ))
}

/// Inserts a batch of activity records in one transaction (durable on return, at the
/// connection's `synchronous` level). A known `decision_id` is ignored.
fn insert_records(conn: &mut Connection, batch: &[ActivityRecord]) -> Result<(), StoreError> {
    // BEGIN and COMMIT as cached statements: a batch is committed every few hundred µs
    // under load, and parsing them anew each time shows in profiles.
    let tx = CachedTx::begin_immediate(conn)?;
    // Records inserted by this batch that carry webhook events (usually none: then
    // nothing below touches the outbox).
    let mut with_events: Vec<&ActivityRecord> = Vec::new();
    {
        let mut ins = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO activity (decision_id, time, time_us, \
                 application, username, remote_ip, device_id, decision, reason, \
                 policies, rules, latency_ms, via, replica) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )
            .map_err(db_err)?;
        let mut ins_rule = tx
            .prepare_cached("INSERT OR IGNORE INTO activity_rule (rule_id, activity_id) VALUES (?1, ?2)")
            .map_err(db_err)?;
        for r in batch {
            let inserted = ins
                .execute(params![
                    r.decision_id,
                    r.time,
                    r.time_us,
                    r.application,
                    r.username,
                    r.remote_ip,
                    r.device_id,
                    r.decision,
                    r.reason,
                    r.policies,
                    r.rules,
                    r.latency_ms,
                    r.via,
                    r.replica
                ])
                .map_err(db_err)?;
            // 0 rows: a known decision_id (a retry); its rule rows exist already.
            if inserted == 1 {
                let id = tx.last_insert_rowid();
                for rule_id in &r.rule_ids {
                    ins_rule.execute(params![rule_id, id]).map_err(db_err)?;
                }
                if !r.outbox.is_empty() {
                    with_events.push(r);
                }
            }
        }
    }
    // A known decision (a retry) was written with its events the first time.
    if !with_events.is_empty() {
        insert_events(&tx, with_events.iter().flat_map(|r| &r.outbox), OffsetDateTime::now_utc())?;
    }
    tx.commit()
}

/// Inserts outbox events as pending deliveries due at `now`, inside the caller's
/// transaction; a known `(webhook_id, event_id)` is ignored.
fn insert_events<'a>(
    conn: &Connection,
    events: impl IntoIterator<Item = &'a OutboxEvent>,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let mut ins = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO webhook_deliveries (webhook_id, event_id, event_type, payload, \
             max_attempts, next_attempt_us, created_at, updated_at, updated_us) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?6)",
        )
        .map_err(db_err)?;
    let (time, us) = (format_time(now), unix_micros(now));
    for e in events {
        ins.execute(params![e.webhook_id, e.event_id, e.event_type, e.payload, i64::from(e.max_attempts), us, time])
            .map_err(db_err)?;
    }
    Ok(())
}

fn delivery_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawDelivery> {
    Ok(RawDelivery {
        id: row.get(0)?,
        webhook_id: row.get(1)?,
        event_id: row.get(2)?,
        event_type: row.get(3)?,
        state: row.get(4)?,
        attempts: row.get(5)?,
        max_attempts: row.get(6)?,
        last_status: row.get(7)?,
        last_error: row.get(8)?,
        next_attempt_us: row.get(9)?,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        payload: row.get(12)?,
    })
}

/// Runs a statement selecting [`DELIVERY_COLUMNS`] and reads its rows.
fn query_deliveries(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> Result<Vec<RawDelivery>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let rows = stmt.query_map(args, delivery_from_row).map_err(db_err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
}

/// Deletes up to [`PRUNE_CHUNK`] finished (delivered or failed) deliveries last changed
/// before `cutoff` (µs); returns how many. Pending rows stay however old: they are
/// still owed to their webhook.
fn prune_deliveries_chunk(conn: &Connection, cutoff: i64) -> Result<usize, StoreError> {
    let chunk = i64::try_from(PRUNE_CHUNK).unwrap_or(i64::MAX);
    conn.prepare_cached(
        "DELETE FROM webhook_deliveries WHERE id IN \
         (SELECT id FROM webhook_deliveries WHERE state <> 'pending' AND updated_us < ?1 LIMIT ?2)",
    )
    .and_then(|mut stmt| stmt.execute(params![cutoff, chunk]))
    .map_err(db_err)
}

/// A write transaction begun and committed through cached statements; rolled back when
/// dropped uncommitted (an error or a panic), like rusqlite's `Transaction`.
struct CachedTx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> CachedTx<'c> {
    fn begin_immediate(conn: &'c Connection) -> Result<CachedTx<'c>, StoreError> {
        conn.prepare_cached("BEGIN IMMEDIATE").and_then(|mut s| s.execute([])).map_err(db_err)?;
        Ok(CachedTx { conn, open: true })
    }

    fn commit(mut self) -> Result<(), StoreError> {
        self.conn.prepare_cached("COMMIT").and_then(|mut s| s.execute([])).map_err(db_err)?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for CachedTx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for CachedTx<'_> {
    fn drop(&mut self) {
        // Only when still inside the transaction: a failed COMMIT may have ended it.
        if self.open && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// Sets `synchronous` on a connection (a cached statement: cheap enough per batch).
fn set_synchronous(conn: &Connection, level: Synchronous) -> Result<(), StoreError> {
    let sql = match level {
        Synchronous::Full => "PRAGMA synchronous = FULL",
        Synchronous::Normal => "PRAGMA synchronous = NORMAL",
    };
    conn.prepare_cached(sql).and_then(|mut stmt| stmt.execute([])).map(drop).map_err(db_err)
}

/// Inserts a batch on the shared writer connection, at `level` for this transaction only:
/// the connection is back at `FULL` afterwards, so admin commits are never relaxed.
fn insert_records_at(conn: &mut Connection, batch: &[ActivityRecord], level: Synchronous) -> Result<(), StoreError> {
    if level == Synchronous::Full {
        return insert_records(conn, batch);
    }
    set_synchronous(conn, level)?;
    let result = insert_records(conn, batch);
    let restored = set_synchronous(conn, Synchronous::Full);
    result.and(restored)
}

/// The activity sink: the activity writer's dedicated thread commits through the store's
/// writer connection directly, without a `spawn_blocking` hop per batch.
struct SqliteActivitySink {
    writer: Arc<Mutex<Connection>>,
    level: Synchronous,
}

impl ActivitySink for SqliteActivitySink {
    fn insert(&mut self, batch: &[ActivityRecord]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // A poisoned lock is safe to use: see `run_blocking`.
        let mut conn = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        insert_records_at(&mut conn, batch, self.level)
    }
}

/// Deletes up to [`PRUNE_CHUNK`] activity entries older than `cutoff` (µs) with their
/// rule index rows, in one transaction; returns how many.
fn prune_chunk(conn: &mut Connection, cutoff: i64) -> Result<usize, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
    let chunk = i64::try_from(PRUNE_CHUNK).unwrap_or(i64::MAX);
    let rows: Vec<(i64, String)> = {
        let mut stmt = tx
            .prepare_cached("SELECT id, rules FROM activity WHERE time_us < ?1 ORDER BY time_us LIMIT ?2")
            .map_err(db_err)?;
        let rows = stmt.query_map(params![cutoff, chunk], |row| Ok((row.get(0)?, row.get(1)?))).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)?
    };
    {
        // An entry's rule rows are keyed (rule_id, activity_id): its rule ids come from
        // its `rules` JSON, as when it was inserted.
        let mut del_rule =
            tx.prepare_cached("DELETE FROM activity_rule WHERE rule_id = ?1 AND activity_id = ?2").map_err(db_err)?;
        let mut del = tx.prepare_cached("DELETE FROM activity WHERE id = ?1").map_err(db_err)?;
        for (id, rules) in &rows {
            match serde_json::from_str::<Value>(rules) {
                Ok(rules) => {
                    for rule_id in activity_rule_ids(&rules) {
                        del_rule.execute(params![rule_id, id]).map_err(db_err)?;
                    }
                }
                // Unreadable JSON (edited by hand?): find its rule rows the slow way.
                Err(_) => {
                    tx.execute("DELETE FROM activity_rule WHERE activity_id = ?1", params![id]).map_err(db_err)?;
                }
            }
            del.execute(params![id]).map_err(db_err)?;
        }
    }
    tx.commit().map_err(db_err)?;
    Ok(rows.len())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn load_all(&self) -> Result<Vec<StoredObject>, StoreError> {
        let secrets = Arc::clone(&self.secrets);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT kind, id, source, version, doc, secrets, created_at, updated_at \
                     FROM objects ORDER BY kind, id",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, Option<String>>(5)?,
                        row.get::<_, String>(6)?,
                        row.get::<_, String>(7)?,
                    ))
                })
                .map_err(db_err)?;
            let mut out = Vec::new();
            for row in rows {
                let (kind, id, source, version, doc, sealed, created_at, updated_at) = row.map_err(db_err)?;
                let kind = ObjectKind::parse(&kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("object `{id}` has unknown kind `{kind}`")))?;
                let doc = parse_json(&doc, || format!("doc of {kind} `{id}`"))?;
                let secrets = match sealed {
                    None => Default::default(),
                    Some(sealed) => {
                        let plain = secrets
                            .decrypt(&sealed)
                            .map_err(|e| StoreError::Corrupt(format!("secrets of {kind} `{id}`: {e}")))?;
                        serde_json::from_str(&plain)
                            .map_err(|_| StoreError::Corrupt(format!("secrets of {kind} `{id}` are not a JSON map")))?
                    }
                };
                out.push(StoredObject { kind, id, source, version, doc, secrets, created_at, updated_at });
            }
            Ok(out)
        })
        .await
    }

    async fn commit(&self, changes: Vec<Change>, audit: Vec<AuditDraft>) -> Result<Vec<AuditEntry>, StoreError> {
        if changes.is_empty() && audit.is_empty() {
            return Ok(Vec::new());
        }
        // Encrypt and encode before taking the writer: none of it needs the database,
        // and the writer is shared with the activity log's batches.
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for change in changes {
            match change {
                Change::Put(obj) => puts.push(encode_object(obj, &self.secrets)?),
                Change::Delete { kind, id } => deletes.push((kind, id)),
            }
        }
        let mut audit_rows = Vec::with_capacity(audit.len());
        for d in &audit {
            audit_rows.push((opt_json_text(d.before.as_ref())?, opt_json_text(d.after.as_ref())?));
        }
        let hook = self.audit_hook.read().unwrap_or_else(PoisonError::into_inner).clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            {
                let mut put = tx
                    .prepare_cached(
                        "INSERT INTO objects \
                         (kind, id, source, version, doc, secrets, created_at, updated_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                         ON CONFLICT (kind, id) DO UPDATE SET \
                         source = excluded.source, version = excluded.version, \
                         doc = excluded.doc, secrets = excluded.secrets, \
                         created_at = excluded.created_at, updated_at = excluded.updated_at",
                    )
                    .map_err(db_err)?;
                for r in &puts {
                    put.execute(params![
                        r.kind.as_str(),
                        r.id,
                        r.source,
                        r.version,
                        r.doc,
                        r.secrets,
                        r.created_at,
                        r.updated_at
                    ])
                    .map_err(db_err)?;
                }
                let mut del = tx.prepare_cached("DELETE FROM objects WHERE kind = ?1 AND id = ?2").map_err(db_err)?;
                for (kind, id) in &deletes {
                    del.execute(params![kind.as_str(), id]).map_err(db_err)?;
                }
            }

            // Read the chain's tail inside the write transaction: no other writer can
            // append between this read and our inserts, so seq stays gap-free and unique.
            let (last_seq, last_hash) = tx
                .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                })
                .optional()
                .map_err(db_err)?
                .unwrap_or_else(|| (0, GENESIS_HASH.to_string()));
            let now = OffsetDateTime::now_utc();
            let time = super::format_time(now);
            let time_us = unix_micros(now);
            let entries = seal_all(audit, last_seq, &last_hash, &time);
            {
                let mut ins = tx
                    .prepare_cached(
                        "INSERT INTO audit (seq, time, time_us, actor, action, object_type, \
                         object_id, before_json, after_json, prev_hash, hash) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    )
                    .map_err(db_err)?;
                for (e, (before, after)) in entries.iter().zip(&audit_rows) {
                    ins.execute(params![
                        e.seq,
                        e.time,
                        time_us,
                        e.actor,
                        e.action.as_str(),
                        e.object_type,
                        e.object_id,
                        before,
                        after,
                        e.prev_hash,
                        e.hash
                    ])
                    .map_err(db_err)?;
                }
            }
            // The entries' webhook events, in the same transaction: written if and only
            // if the entries are.
            if let Some(hook) = &hook {
                let events: Vec<OutboxEvent> = entries.iter().flat_map(|e| hook(e)).collect();
                if !events.is_empty() {
                    insert_events(&tx, &events, now)?;
                }
            }
            tx.commit().map_err(db_err)?;
            Ok(entries)
        })
        .await
    }

    async fn last_file_hash(&self, file: &str) -> Result<Option<String>, StoreError> {
        let file = file.to_string();
        self.read(move |conn| {
            let hash: Option<Option<String>> = conn
                .query_row(
                    "SELECT json_extract(after_json, '$.sha256') FROM audit \
                     WHERE object_type = 'file' AND object_id = ?1 AND action = 'load' \
                     ORDER BY seq DESC LIMIT 1",
                    params![file],
                    |row| row.get(0),
                )
                .optional()
                .map_err(db_err)?;
            Ok(hash.flatten())
        })
        .await
    }

    async fn list_audit(&self, filter: &AuditFilter, page: &Page) -> Result<Listing<AuditEntry>, StoreError> {
        let limit = page.effective_limit();
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE 1 = 1");
        let mut args: Vec<SqlValue> = Vec::new();
        if let Some(cursor) = &page.cursor {
            sql.push_str(" AND seq < ?");
            args.push(SqlValue::Integer(decode_audit_cursor(cursor)?));
        }
        if let Some(t) = filter.since {
            sql.push_str(" AND time_us >= ?");
            args.push(SqlValue::Integer(unix_micros(t)));
        }
        if let Some(t) = filter.until {
            sql.push_str(" AND time_us < ?");
            args.push(SqlValue::Integer(unix_micros(t)));
        }
        for (column, value) in [
            ("actor", filter.actor.clone()),
            ("action", filter.action.map(|a| a.as_str().to_string())),
            ("object_type", filter.object_type.clone()),
            ("object_id", filter.object_id.clone()),
        ] {
            if let Some(v) = value {
                sql.push_str(&format!(" AND {column} = ?"));
                args.push(SqlValue::Text(v));
            }
        }
        sql.push_str(" ORDER BY seq DESC LIMIT ?");
        // One row more than asked tells whether there is a next page.
        args.push(SqlValue::Integer(i64::try_from(limit + 1).unwrap_or(i64::MAX)));

        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql).map_err(db_err)?;
            let rows = stmt.query_map(params_from_iter(args), RawAudit::from_row).map_err(db_err)?;
            let mut items = Vec::new();
            for row in rows {
                let raw = row.map_err(db_err)?;
                let seq = raw.seq;
                items.push(raw.parse().map_err(|why| StoreError::Corrupt(format!("audit entry {seq}: {why}")))?);
            }
            Ok(Listing::from_overfetch(items, limit, |e| encode_audit_cursor(e.seq)))
        })
        .await
    }

    async fn verify_audit(&self) -> Result<VerifyResult, StoreError> {
        // A separate connection: walking a long chain must not hold up listings on the
        // shared reader. One SELECT reads one consistent WAL snapshot.
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = open_connection(&path, true)?;
            let mut stmt =
                conn.prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq ASC")).map_err(db_err)?;
            let mut rows = stmt.query([]).map_err(db_err)?;
            let mut verifier = ChainVerifier::new();
            while let Some(row) = rows.next().map_err(db_err)? {
                let raw = RawAudit::from_row(row).map_err(db_err)?;
                let seq = raw.seq;
                let result =
                    raw.parse().map_err(|reason| ChainBreak { seq, reason }).and_then(|entry| verifier.push(&entry));
                if let Err(brk) = result {
                    return Ok(verifier.broken(brk));
                }
            }
            Ok(verifier.finish())
        })
        .await
        .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
    }

    async fn insert_activity(&self, batch: &[ActivityEntry]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let records = batch.iter().map(ActivityRecord::from_entry).collect::<Result<Vec<_>, _>>()?;
        let level = self.options.activity_synchronous;
        self.write(move |conn| insert_records_at(conn, &records, level)).await
    }

    fn activity_sink(&self) -> Option<Box<dyn ActivitySink>> {
        Some(Box::new(SqliteActivitySink {
            writer: Arc::clone(&self.writer),
            level: self.options.activity_synchronous,
        }))
    }

    async fn list_activity(&self, filter: &ActivityFilter, page: &Page) -> Result<Listing<ActivityEntry>, StoreError> {
        let limit = page.effective_limit();
        let mut sql = format!("SELECT {ACTIVITY_COLUMNS} FROM activity WHERE 1 = 1");
        let mut args: Vec<SqlValue> = Vec::new();
        if let Some(cursor) = &page.cursor {
            let (t, id) = decode_activity_cursor(cursor)?;
            sql.push_str(" AND (time_us < ? OR (time_us = ? AND id < ?))");
            args.extend([SqlValue::Integer(t), SqlValue::Integer(t), SqlValue::Integer(id)]);
        }
        if let Some(t) = filter.since {
            sql.push_str(" AND time_us >= ?");
            args.push(SqlValue::Integer(unix_micros(t)));
        }
        if let Some(t) = filter.until {
            sql.push_str(" AND time_us < ?");
            args.push(SqlValue::Integer(unix_micros(t)));
        }
        for (column, value) in [("username", &filter.username), ("application", &filter.application)] {
            if let Some(v) = value {
                sql.push_str(&format!(" AND {column} = ?"));
                args.push(SqlValue::Text(v.clone()));
            }
        }
        match filter.decision.as_deref() {
            // A literal, so the planner may use the partial index of denies.
            Some("deny") => sql.push_str(" AND decision = 'deny'"),
            Some(other) => {
                sql.push_str(" AND decision = ?");
                args.push(SqlValue::Text(other.to_string()));
            }
            None => {}
        }
        if let Some(rule_id) = &filter.rule_id {
            sql.push_str(" AND id IN (SELECT activity_id FROM activity_rule WHERE rule_id = ?)");
            args.push(SqlValue::Text(rule_id.clone()));
        }
        sql.push_str(" ORDER BY time_us DESC, id DESC LIMIT ?");
        args.push(SqlValue::Integer(i64::try_from(limit + 1).unwrap_or(i64::MAX)));

        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql).map_err(db_err)?;
            let rows = stmt.query_map(params_from_iter(args), activity_from_row).map_err(db_err)?;
            let mut items: Vec<ActivityRow> = Vec::new();
            for row in rows {
                let (id, time_us, mut entry, policies, rules) = row.map_err(db_err)?;
                entry.policies =
                    parse_json(&policies, || format!("policies of activity entry `{}`", entry.decision_id))?;
                entry.rules = parse_json(&rules, || format!("rules of activity entry `{}`", entry.decision_id))?;
                items.push(ActivityRow { id, time_us, entry });
            }
            Ok(Listing::from_overfetch(items, limit, |r| encode_activity_cursor(r.time_us, r.id)).map(|r| r.entry))
        })
        .await
    }

    async fn prune_activity(&self, older_than: OffsetDateTime) -> Result<u64, StoreError> {
        let cutoff = unix_micros(older_than);
        let mut total: u64 = 0;
        loop {
            let removed = self.write(move |conn| prune_chunk(conn, cutoff)).await?;
            total += u64::try_from(removed).unwrap_or(u64::MAX);
            if removed < PRUNE_CHUNK {
                break;
            }
        }
        // Finished webhook deliveries follow the activity log's retention.
        let mut deliveries: usize = 0;
        loop {
            let removed = self.write(move |conn| prune_deliveries_chunk(conn, cutoff)).await?;
            deliveries += removed;
            if removed < PRUNE_CHUNK {
                break;
            }
        }
        if deliveries > 0 {
            tracing::info!(deliveries, "pruned finished webhook deliveries");
        }
        Ok(total)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| {
            // `SELECT 1` never touches the file; reading the schema takes a read
            // transaction and page 1, so a locked, unreadable or corrupt file fails here.
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get::<_, i64>(0)).map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn enqueue_events(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let events = events.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            insert_events(&tx, &events, OffsetDateTime::now_utc())?;
            tx.commit().map_err(db_err)
        })
        .await
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
            .map(|(hook, n)| (hook.clone(), i64::try_from(*n).unwrap_or(i64::MAX)))
            .collect();
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        let owner = owner.to_string();
        let until = now_us.saturating_add(lease_us);
        // One statement per webhook, each a range of the due index, all in one job on
        // the one writer connection: claims are serialised, so two workers never get the
        // same row.
        let sql = format!(
            "UPDATE webhook_deliveries SET claimed_by = ?1, claimed_until_us = ?2 WHERE id IN \
             (SELECT id FROM webhook_deliveries \
              WHERE state = 'pending' AND webhook_id = ?3 AND next_attempt_us <= ?4 AND claimed_until_us <= ?4 \
              ORDER BY next_attempt_us, id LIMIT ?5) \
             RETURNING {DELIVERY_COLUMNS}"
        );
        let mut rows = self
            .write(move |conn| {
                let mut rows = Vec::new();
                for (hook, n) in &wants {
                    rows.extend(query_deliveries(conn, &sql, params![owner, until, hook, now_us, n])?);
                }
                Ok(rows)
            })
            .await?;
        // RETURNING has no defined order.
        rows.sort_by_key(|r| (r.next_attempt_us, r.id));
        rows.into_iter().map(RawDelivery::into_delivery).collect()
    }

    async fn pending_webhooks(&self) -> Result<Vec<String>, StoreError> {
        self.read(|conn| {
            // A skip through the due index: one seek per webhook.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT webhook_id FROM webhook_deliveries WHERE state = 'pending' AND webhook_id > ?1 \
                     ORDER BY webhook_id LIMIT 1",
                )
                .map_err(db_err)?;
            let mut hooks: Vec<String> = Vec::new();
            loop {
                let after = hooks.last().map_or("", String::as_str);
                match stmt.query_row(params![after], |row| row.get(0)).optional().map_err(db_err)? {
                    Some(next) => hooks.push(next),
                    None => return Ok(hooks),
                }
            }
        })
        .await
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
        let (webhook_id, error) = (webhook_id.to_string(), error.to_string());
        let now = OffsetDateTime::now_utc();
        let failed = self
            .write(move |conn| {
                // The subquery reads a bounded range of the due index (ids first, then
                // the update), so a chunk costs its own rows only.
                conn.prepare_cached(
                    "UPDATE webhook_deliveries SET state = 'failed', last_status = coalesce(?4, last_status), \
                     last_error = ?5, claimed_by = NULL, claimed_until_us = 0, updated_at = ?6, updated_us = ?7 \
                     WHERE id IN (SELECT id FROM webhook_deliveries \
                      WHERE state = 'pending' AND webhook_id = ?1 AND next_attempt_us < ?3 AND claimed_until_us <= ?2 \
                      ORDER BY next_attempt_us, id LIMIT ?8)",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        webhook_id,
                        now_us,
                        due_before_us,
                        last_status.map(i64::from),
                        error,
                        format_time(now),
                        unix_micros(now),
                        i64::from(limit)
                    ])
                })
                .map_err(db_err)
            })
            .await?;
        Ok(failed as u64)
    }

    async fn finish_deliveries(&self, done: &[(i64, DeliveryUpdate)]) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        let done = done.to_vec();
        let now = OffsetDateTime::now_utc();
        self.write(move |conn| {
            let tx = CachedTx::begin_immediate(conn)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET state = ?2, attempts = ?3, last_status = ?4, \
                         last_error = ?5, next_attempt_us = ?6, claimed_by = NULL, claimed_until_us = 0, \
                         updated_at = ?7, updated_us = ?8 WHERE id = ?1",
                    )
                    .map_err(db_err)?;
                let (now_text, now_us) = (format_time(now), unix_micros(now));
                for (id, u) in &done {
                    stmt.execute(params![
                        id,
                        u.state.as_str(),
                        i64::from(u.attempts),
                        u.last_status.map(i64::from),
                        u.last_error,
                        u.next_attempt_us,
                        now_text,
                        now_us
                    ])
                    .map_err(db_err)?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn release_claims(&self, owner: &str) -> Result<u64, StoreError> {
        let owner = owner.to_string();
        let released = self
            .write(move |conn| {
                // Only pending rows hold claims (`finish_delivery` clears them), and the
                // partial index lists exactly those.
                conn.prepare_cached(
                    "UPDATE webhook_deliveries SET claimed_by = NULL, claimed_until_us = 0 \
                     WHERE state = 'pending' AND claimed_by = ?1",
                )
                .and_then(|mut stmt| stmt.execute(params![owner]))
                .map_err(db_err)
            })
            .await?;
        Ok(u64::try_from(released).unwrap_or(u64::MAX))
    }

    async fn list_deliveries(&self, webhook_id: &str, page: &Page) -> Result<Listing<Delivery>, StoreError> {
        let limit = page.effective_limit();
        let before = match &page.cursor {
            Some(cursor) => decode_delivery_cursor(cursor)?,
            None => i64::MAX,
        };
        let webhook_id = webhook_id.to_string();
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = ?1 AND id < ?2 \
             ORDER BY id DESC LIMIT ?3"
        );
        let rows = self.read(move |conn| query_deliveries(conn, &sql, params![webhook_id, before, fetch])).await?;
        let items = rows.into_iter().map(RawDelivery::into_delivery).collect::<Result<Vec<_>, _>>()?;
        Ok(Listing::from_overfetch(items, limit, |d| encode_delivery_cursor(d.id)))
    }

    async fn get_delivery(&self, webhook_id: &str, event_id: &str) -> Result<Option<Delivery>, StoreError> {
        let (webhook_id, event_id) = (webhook_id.to_string(), event_id.to_string());
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = ?1 AND event_id = ?2");
        let rows = self.read(move |conn| query_deliveries(conn, &sql, params![webhook_id, event_id])).await?;
        rows.into_iter().next().map(RawDelivery::into_delivery).transpose()
    }

    async fn retry_delivery(
        &self,
        webhook_id: &str,
        event_id: &str,
        now_us: i64,
        extra_attempts: u32,
    ) -> Result<Option<Delivery>, StoreError> {
        let (webhook_id, event_id) = (webhook_id.to_string(), event_id.to_string());
        let now = OffsetDateTime::now_utc();
        let sql = format!(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_us = ?3, \
             max_attempts = min(attempts + ?4, {}), claimed_by = NULL, claimed_until_us = 0, \
             updated_at = ?5, updated_us = ?6 \
             WHERE webhook_id = ?1 AND event_id = ?2 RETURNING {DELIVERY_COLUMNS}",
            u32::MAX
        );
        let rows = self
            .write(move |conn| {
                let args = params![
                    webhook_id,
                    event_id,
                    now_us,
                    i64::from(extra_attempts),
                    format_time(now),
                    unix_micros(now)
                ];
                query_deliveries(conn, &sql, args)
            })
            .await?;
        rows.into_iter().next().map(RawDelivery::into_delivery).transpose()
    }

    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .read(|conn| {
                conn.query_row("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'", [], |row| row.get(0))
                    .map_err(db_err)
            })
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn set_audit_hook(&self, hook: AuditHook) {
        *self.audit_hook.write().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{self, activity, all_activity_ids, PASSWORD, SECRET};
    use crate::store::{Page, Synchronous};

    fn open(dir: &Path) -> SqliteStore {
        let secrets = Arc::new(SecretBox::load_or_create(dir, None).unwrap());
        SqliteStore::open(dir, secrets).unwrap()
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    /// Every file in the data dir (db, -wal, -shm, key file) checked for plaintext.
    fn assert_no_plaintext(dir: &Path, needles: &[&str]) -> usize {
        let mut files = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            for needle in needles {
                assert!(!contains(&bytes, needle), "`{needle}` found in {}", path.display());
            }
            files += 1;
        }
        files
    }

    #[tokio::test]
    async fn objects_round_trip_with_secrets_encrypted_at_rest() {
        let dir = tempfile::tempdir().unwrap();
        conformance::objects_round_trip_with_secrets_encrypted_at_rest(
            async || open(dir.path()),
            async |open: bool| {
                let files = assert_no_plaintext(dir.path(), &[SECRET, PASSWORD]);
                if open {
                    // While open: the main file, -wal and -shm all exist and hold no plaintext.
                    assert!(dir.path().join("verdict.db-wal").exists());
                    assert!(files >= 4, "db, -wal, -shm and secret.key expected, saw {files}");
                }
            },
        )
        .await;
    }

    #[tokio::test]
    async fn wrong_key_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        conformance::wrong_key_is_an_error_not_a_panic(open(dir.path()), async |key| {
            SqliteStore::open(dir.path(), key).unwrap()
        })
        .await;
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let raw = Connection::open(dir.path().join(DB_FILE_NAME)).unwrap();
        raw.pragma_update(None, "user_version", 99).unwrap();
        drop(raw);
        let secrets = Arc::new(SecretBox::load_or_create(dir.path(), None).unwrap());
        let err = SqliteStore::open(dir.path(), secrets).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    }

    #[tokio::test]
    async fn audit_chain_verifies_and_tampering_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let raw = Connection::open(dir.path().join(DB_FILE_NAME)).unwrap();
        conformance::audit_chain_verifies_and_tampering_is_located(&store, async |sql: &str| {
            raw.execute_batch(sql).unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn concurrent_commits_keep_seq_gap_free() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(open(dir.path()));
        conformance::concurrent_commits_keep_seq_gap_free(Arc::clone(&store), store).await;
    }

    #[tokio::test]
    async fn audit_pagination_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        conformance::audit_pagination_and_filters(&open(dir.path())).await;
    }

    #[tokio::test]
    async fn last_file_hash_reads_the_newest_load() {
        let dir = tempfile::tempdir().unwrap();
        conformance::last_file_hash_reads_the_newest_load(&open(dir.path())).await;
    }

    #[tokio::test]
    async fn activity_insert_filters_pagination_prune() {
        let dir = tempfile::tempdir().unwrap();
        conformance::activity_insert_filters_pagination_prune(&open(dir.path())).await;
        // Pruning took the entries' rule index rows with them.
        let raw = Connection::open(dir.path().join(DB_FILE_NAME)).unwrap();
        let orphans: i64 = raw
            .query_row(
                "SELECT count(*) FROM activity_rule WHERE activity_id NOT IN (SELECT id FROM activity)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(orphans, 0);
    }

    #[tokio::test]
    async fn prune_works_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        conformance::prune_works_in_chunks(&open(dir.path()), PRUNE_CHUNK).await;
    }

    #[test]
    fn page_limit_is_clamped() {
        assert_eq!(Page { limit: 0, cursor: None }.effective_limit(), 1);
        assert_eq!(Page { limit: 5000, cursor: None }.effective_limit(), 1000);
    }

    #[tokio::test]
    async fn activity_sink_inserts_and_normal_sync_stays_with_activity_batches() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Arc::new(SecretBox::load_or_create(dir.path(), None).unwrap());
        let options = SqliteOptions { activity_synchronous: Synchronous::Normal };
        let store = SqliteStore::open_with(dir.path(), secrets, options).unwrap();
        let base = time::macros::datetime!(2025-03-01 12:00 UTC);
        let entries: Vec<ActivityEntry> =
            (0..10).map(|i| activity(i, base + time::Duration::minutes(i as i64))).collect();
        let records: Vec<ActivityRecord> = entries.iter().map(|e| ActivityRecord::from_entry(e).unwrap()).collect();
        let mut sink = store.activity_sink().expect("SQLite has a sink");
        sink.insert(&records[..6]).unwrap();
        // A retry of known entries adds nothing, as with insert_activity.
        sink.insert(&records[..8]).unwrap();
        store.insert_activity(&entries[8..]).await.unwrap();
        let got = all_activity_ids(&store, &ActivityFilter::default(), 100).await;
        assert_eq!(got, (0..10).rev().map(|i| format!("d-{i:04}")).collect::<Vec<_>>());
        let listed = store.list_activity(&ActivityFilter::default(), &Page::default()).await.unwrap();
        assert_eq!(listed.items.last(), entries.first(), "the sink stores what insert_activity stores");
        let rule_filter = ActivityFilter { rule_id: Some("device-posture".into()), ..Default::default() };
        assert_eq!(all_activity_ids(&store, &rule_filter, 3).await, vec!["d-0008", "d-0004", "d-0000"]);
        // The relaxed level applies inside activity batches only: the shared writer
        // connection is back at FULL for admin commits.
        let sync: i64 = store.writer.lock().unwrap().pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap();
        assert_eq!(sync, 2);
    }

    #[tokio::test]
    async fn migration_2_keeps_entries_and_the_deny_filter_uses_its_partial_index() {
        let dir = tempfile::tempdir().unwrap();
        // A database as the first release left it: migration 1 only, with entries.
        {
            let mut raw = Connection::open(dir.path().join(DB_FILE_NAME)).unwrap();
            let tx = raw.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[0]).unwrap();
            tx.pragma_update(None, "user_version", 1).unwrap();
            tx.commit().unwrap();
            let base = time::macros::datetime!(2025-03-01 12:00 UTC);
            for i in 0..12 {
                let r = ActivityRecord::from_entry(&activity(i, base + time::Duration::minutes(i as i64))).unwrap();
                insert_records(&mut raw, &[r]).unwrap();
            }
            // Rule rows as the first release wrote them, with its activity_id index.
            let n: i64 = raw.query_row("SELECT count(*) FROM activity_rule", [], |r| r.get(0)).unwrap();
            assert_eq!(n, 15);
        }
        let store = open(dir.path());
        let indexes: Vec<String> = {
            let conn = store.reader.lock().unwrap();
            let mut stmt = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name")
                .unwrap();
            let rows = stmt.query_map([], |r| r.get(0)).unwrap();
            rows.collect::<Result<_, _>>().unwrap()
        };
        assert_eq!(
            indexes,
            vec![
                "activity_by_app",
                "activity_by_time",
                "activity_by_user",
                "activity_denies",
                "audit_by_actor",
                "audit_by_object",
                "audit_by_time",
                "webhook_deliveries_by_hook",
                "webhook_deliveries_due"
            ]
        );
        let deny = ActivityFilter { decision: Some("deny".into()), ..Default::default() };
        assert_eq!(all_activity_ids(&store, &deny, 1).await, vec!["d-0010", "d-0005", "d-0000"]);
        let allow = ActivityFilter { decision: Some("allow".into()), ..Default::default() };
        assert_eq!(all_activity_ids(&store, &allow, 4).await.len(), 9);
        let plan: Vec<String> = {
            let conn = store.reader.lock().unwrap();
            let mut stmt = conn
                .prepare(&format!(
                    "EXPLAIN QUERY PLAN SELECT {ACTIVITY_COLUMNS} FROM activity WHERE 1 = 1 AND decision = 'deny' \
                     ORDER BY time_us DESC, id DESC LIMIT 101"
                ))
                .unwrap();
            let rows = stmt.query_map([], |r| r.get(3)).unwrap();
            rows.collect::<Result<_, _>>().unwrap()
        };
        assert!(plan.iter().any(|step| step.contains("activity_denies")), "{plan:?}");
        // Pruning still removes the rule rows the first release wrote.
        assert_eq!(store.prune_activity(time::macros::datetime!(2025-03-01 12:06 UTC)).await.unwrap(), 6);
        let raw = Connection::open(dir.path().join(DB_FILE_NAME)).unwrap();
        let orphans: i64 = raw
            .query_row(
                "SELECT count(*) FROM activity_rule WHERE activity_id NOT IN (SELECT id FROM activity)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(orphans, 0);
    }

    #[test]
    fn connections_are_wal_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for conn in [&store.writer, &store.reader] {
            let conn = conn.lock().unwrap();
            let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
            let sync: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap();
            assert_eq!(mode, "wal");
            assert_eq!(sync, 2, "synchronous=FULL");
        }
        let version: i64 = store.writer.lock().unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    mod outbox {
        use super::*;
        use crate::store::outbox_conformance as conformance;

        async fn fresh() -> (tempfile::TempDir, SqliteStore) {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            (dir, store)
        }

        crate::store::store_checks!(conformance; fresh;
            activity_batches_write_their_events_once, claims_lease_and_finish, claims_take_only_the_named_webhooks, fail_pending_fails_overdue_rows_in_chunks, release_claims_frees_rows, listing_get_and_retry, depth_counts_pending_only, audit_hook_events_commit_with_the_entry);

        #[tokio::test]
        async fn a_failing_outbox_insert_fails_the_whole_write() {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            let path = dir.path().join(DB_FILE_NAME);
            conformance::a_failing_outbox_insert_fails_the_whole_write(&store, || async move {
                let raw = Connection::open(path).unwrap();
                raw.execute_batch(
                    "CREATE TRIGGER no_outbox BEFORE INSERT ON webhook_deliveries \
                     BEGIN SELECT RAISE(ABORT, 'outbox refused'); END;",
                )
                .unwrap();
            })
            .await;
        }

        #[tokio::test]
        async fn prune_removes_finished_deliveries() {
            let dir = tempfile::tempdir().unwrap();
            conformance::prune_removes_finished_deliveries(&open(dir.path())).await;
        }

        #[tokio::test]
        async fn the_activity_sink_writes_events_too() {
            let dir = tempfile::tempdir().unwrap();
            let secrets = Arc::new(SecretBox::load_or_create(dir.path(), None).unwrap());
            let options = SqliteOptions { activity_synchronous: Synchronous::Normal };
            let store = SqliteStore::open_with(dir.path(), secrets, options).unwrap();
            let entries = [
                conformance::entry("d1", vec![]),
                conformance::entry("d2", vec![conformance::event("h", "e2")]),
                conformance::entry("d3", vec![conformance::event("h", "e3a"), conformance::event("h", "e3b")]),
            ];
            let records: Vec<ActivityRecord> = entries.iter().map(|e| ActivityRecord::from_entry(e).unwrap()).collect();
            assert_eq!(records[2].to_entry().unwrap(), entries[2], "records carry the events both ways");
            let mut sink = store.activity_sink().unwrap();
            sink.insert(&records[..1]).unwrap();
            assert_eq!(store.outbox_depth().await.unwrap(), 0);
            sink.insert(&records).unwrap();
            sink.insert(&records).unwrap();
            let listed = store.list_deliveries("h", &Page::default()).await.unwrap();
            let ids: Vec<&str> = listed.items.iter().map(|d| d.event_id.as_str()).collect();
            assert_eq!(ids, ["e3b", "e3a", "e2"]);
            assert_eq!(store.list_activity(&ActivityFilter::default(), &Page::default()).await.unwrap().items.len(), 3);
        }

        #[tokio::test]
        async fn claims_use_the_partial_due_index() {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            let conn = store.reader.lock().unwrap();
            let plan = |sql: &str| -> Vec<String> {
                let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
                let rows = stmt.query_map([], |r| r.get(3)).unwrap();
                rows.collect::<Result<_, _>>().unwrap()
            };
            let claim = plan(
                "SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_us <= 5 \
                 AND claimed_until_us <= 5 ORDER BY next_attempt_us, id LIMIT 10",
            );
            assert!(claim.iter().any(|s| s.contains("webhook_deliveries_due")), "{claim:?}");
            let list =
                plan("SELECT id FROM webhook_deliveries WHERE webhook_id = 'h' AND id < 9 ORDER BY id DESC LIMIT 10");
            assert!(list.iter().any(|s| s.contains("webhook_deliveries_by_hook")), "{list:?}");
        }
    }
}
