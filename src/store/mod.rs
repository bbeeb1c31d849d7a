//! Persistence of rules, policies, webhooks, the audit log and the activity log.
//!
//! [`Store`] is the one interface the rest of verdict uses; [`sqlite::SqliteStore`] is the
//! single-process implementation (PostgreSQL comes later and reuses the helpers here and
//! in [`crate::logs::audit`]).
//!
//! Architecture Invariant: the store never adds a secret to `doc`, audit `before`/`after`
//! or an activity entry; secrets live only in [`StoredObject::secrets`] and reach the
//! database encrypted as a whole by [`crate::secrets::SecretBox`].
//!
//! Conventions shared by every implementation:
//! - Times are RFC 3339 UTC strings; the store writes them with microsecond precision
//!   ([`format_time`]). Time filters: `since` is inclusive, `until` is exclusive.
//! - Listings are newest first. Cursors are opaque (URL-safe base64) and tied to the log
//!   they came from; a cursor that does not decode is [`StoreError::BadCursor`].
//! - `Page::limit` is clamped to `1..=1000` ([`Page::MAX_LIMIT`]); the API layer rejects
//!   out-of-range values before they get here.

pub mod postgres;
pub mod spool;
pub mod sqlite;

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

pub use postgres::PgStore;
pub use sqlite::{SqliteOptions, SqliteStore};

/// The kinds of objects the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectKind {
    /// A rule (SPEC §4).
    Rule,
    /// A policy (SPEC §5).
    Policy,
    /// An outbound webhook (SPEC §10).
    Webhook,
}

impl ObjectKind {
    /// The kind as stored and shown: `rule`, `policy` or `webhook`.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Rule => "rule",
            ObjectKind::Policy => "policy",
            ObjectKind::Webhook => "webhook",
        }
    }

    /// The inverse of [`ObjectKind::as_str`].
    pub fn parse(s: &str) -> Option<ObjectKind> {
        match s {
            "rule" => Some(ObjectKind::Rule),
            "policy" => Some(ObjectKind::Policy),
            "webhook" => Some(ObjectKind::Webhook),
            _ => None,
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule, policy or webhook as persisted.
///
/// Deliberately not `Serialize`, and its `Debug` masks secret values: the plaintext in
/// `secrets` must not leak into a response or a log line by accident.
#[derive(Clone, PartialEq)]
pub struct StoredObject {
    /// What the object is.
    pub kind: ObjectKind,
    /// Its id, unique per kind.
    pub id: String,
    /// `api`, or `policies/NAME.json` for an object managed by a policy file.
    pub source: String,
    /// Incremented by the caller on every change.
    pub version: i64,
    /// The object's public JSON, secrets already masked as `********` by the caller.
    pub doc: Value,
    /// Field path (e.g. `auth.client_secret`) to plaintext secret. Encrypted as a whole
    /// on write, decrypted on read.
    pub secrets: BTreeMap<String, String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    pub updated_at: String,
}

impl fmt::Debug for StoredObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let masked: BTreeMap<&str, &str> = self.secrets.keys().map(|k| (k.as_str(), "********")).collect();
        f.debug_struct("StoredObject")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("source", &self.source)
            .field("version", &self.version)
            .field("doc", &self.doc)
            .field("secrets", &masked)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// One change to apply in [`Store::commit`].
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace the object with this kind and id.
    Put(StoredObject),
    /// Remove the object; removing one that does not exist is not an error.
    Delete {
        /// Its kind.
        kind: ObjectKind,
        /// Its id.
        id: String,
    },
}

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    /// An object was created.
    Create,
    /// An object was changed.
    Update,
    /// An object was removed.
    Delete,
    /// A policy file was loaded.
    Load,
}

impl AuditAction {
    /// The action as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Create => "create",
            AuditAction::Update => "update",
            AuditAction::Delete => "delete",
            AuditAction::Load => "load",
        }
    }

    /// The inverse of [`AuditAction::as_str`].
    pub fn parse(s: &str) -> Option<AuditAction> {
        match s {
            "create" => Some(AuditAction::Create),
            "update" => Some(AuditAction::Update),
            "delete" => Some(AuditAction::Delete),
            "load" => Some(AuditAction::Load),
            _ => None,
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An audit entry before the store gives it `seq`, `time` and its place in the chain.
///
/// For a policy file load (`action: load`, `object_type: "file"`, `object_id` = the file
/// name), `after` must carry the file's content hash as `"sha256"`; that is what
/// [`Store::last_file_hash`] reads back. Suggested shape:
/// `{"file": "policies/a.json", "sha256": "…", "rules": [...], "policies": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditDraft {
    /// Who made the change: a token name, or `file:NAME.json`.
    pub actor: String,
    /// What was done.
    pub action: AuditAction,
    /// `rule`, `policy`, `webhook` or `file`.
    pub object_type: String,
    /// The object's id, or the file name.
    pub object_id: String,
    /// The object before the change, secrets masked by the caller.
    pub before: Option<Value>,
    /// The object after the change, secrets masked by the caller.
    pub after: Option<Value>,
}

/// One entry of the audit log's hash chain (SPEC §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Position in the chain, from 1, without gaps.
    pub seq: i64,
    /// RFC 3339 UTC.
    pub time: String,
    /// Who made the change.
    pub actor: String,
    /// What was done.
    pub action: AuditAction,
    /// `rule`, `policy`, `webhook` or `file`.
    pub object_type: String,
    /// The object's id, or the file name.
    pub object_id: String,
    /// The object before the change (secrets masked).
    #[schema(value_type = Option<Object>)]
    pub before: Option<Value>,
    /// The object after the change (secrets masked).
    #[schema(value_type = Option<Object>)]
    pub after: Option<Value>,
    /// `hash` of the previous entry; 64 zeros for the first.
    pub prev_hash: String,
    /// See [`crate::logs::audit::entry_hash`].
    pub hash: String,
}

/// One decision as recorded in the activity log (SPEC §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActivityEntry {
    /// Unique per decision; inserting it twice keeps the first.
    pub decision_id: String,
    /// RFC 3339; must parse, since the log is ordered and filtered by it.
    pub time: String,
    /// The application the request was for.
    pub application: String,
    /// The user, when known.
    pub username: Option<String>,
    /// The client address, when known.
    pub remote_ip: Option<String>,
    /// The device, when known.
    pub device_id: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    /// Why.
    pub reason: String,
    /// As in the decision answer.
    #[schema(value_type = Vec<Object>)]
    pub policies: Value,
    /// As in the decision answer: an array of objects each with a `rule_id`.
    #[schema(value_type = Vec<Object>)]
    pub rules: Value,
    /// Time the decision took.
    pub latency_ms: f64,
    /// `api` or `forward-auth`.
    pub via: String,
    /// The replica that decided.
    pub replica: String,
}

/// How durable an activity batch is when its commit returns (`[activity_log]
/// synchronous` in the config file). Admin writes are always `Full`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Flushed to stable storage (fsync) before the commit returns: an answered
    /// decision survives `kill -9` of verdict and power loss. The default.
    #[default]
    Full,
    /// Handed to the operating system before the commit returns, flushed later (SQLite
    /// WAL `synchronous=NORMAL`): an answered decision survives `kill -9` of verdict but
    /// the last commits may be lost on an OS crash or power loss.
    Normal,
}

/// An activity entry as the writer hands it to the database: `policies` and `rules`
/// already JSON text, the time already in µs, the rule ids already extracted. The
/// decision path builds these directly (serialising its results once, for the answer and
/// the entry alike); [`ActivityRecord::from_entry`] builds one from an [`ActivityEntry`].
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityRecord {
    /// As [`ActivityEntry::decision_id`].
    pub decision_id: String,
    /// RFC 3339, as [`format_time`] writes it.
    pub time: String,
    /// The same instant as `time`, µs since the Unix epoch ([`unix_micros`]).
    pub time_us: i64,
    /// As [`ActivityEntry::application`].
    pub application: String,
    /// As [`ActivityEntry::username`].
    pub username: Option<String>,
    /// As [`ActivityEntry::remote_ip`].
    pub remote_ip: Option<String>,
    /// As [`ActivityEntry::device_id`].
    pub device_id: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    /// As [`ActivityEntry::reason`].
    pub reason: String,
    /// [`ActivityEntry::policies`] as JSON text.
    pub policies: String,
    /// [`ActivityEntry::rules`] as JSON text.
    pub rules: String,
    /// The distinct `rule_id`s in `rules`, sorted ([`activity_rule_ids`]).
    pub rule_ids: Vec<String>,
    /// As [`ActivityEntry::latency_ms`].
    pub latency_ms: f64,
    /// As [`ActivityEntry::via`].
    pub via: String,
    /// As [`ActivityEntry::replica`].
    pub replica: String,
}

impl ActivityRecord {
    /// Encodes an entry; its `time` must be RFC 3339.
    pub fn from_entry(entry: &ActivityEntry) -> Result<ActivityRecord, StoreError> {
        let time = parse_time(&entry.time).ok_or_else(|| {
            StoreError::Internal(format!("activity entry `{}` has a time that is not RFC 3339", entry.decision_id))
        })?;
        let json =
            |v: &Value| serde_json::to_string(v).map_err(|e| StoreError::Internal(format!("cannot encode JSON: {e}")));
        Ok(ActivityRecord {
            decision_id: entry.decision_id.clone(),
            time: entry.time.clone(),
            time_us: unix_micros(time),
            application: entry.application.clone(),
            username: entry.username.clone(),
            remote_ip: entry.remote_ip.clone(),
            device_id: entry.device_id.clone(),
            decision: entry.decision.clone(),
            reason: entry.reason.clone(),
            policies: json(&entry.policies)?,
            rules: json(&entry.rules)?,
            rule_ids: activity_rule_ids(&entry.rules),
            latency_ms: entry.latency_ms,
            via: entry.via.clone(),
            replica: entry.replica.clone(),
        })
    }

    /// The entry again, for stores that take [`ActivityEntry`] (the JSON text is parsed).
    pub fn to_entry(&self) -> Result<ActivityEntry, StoreError> {
        let json = |text: &str, what: &str| {
            serde_json::from_str(text).map_err(|_| {
                StoreError::Internal(format!("{what} of activity entry `{}` is not valid JSON", self.decision_id))
            })
        };
        Ok(ActivityEntry {
            decision_id: self.decision_id.clone(),
            time: self.time.clone(),
            application: self.application.clone(),
            username: self.username.clone(),
            remote_ip: self.remote_ip.clone(),
            device_id: self.device_id.clone(),
            decision: self.decision.clone(),
            reason: self.reason.clone(),
            policies: json(&self.policies, "policies")?,
            rules: json(&self.rules, "rules")?,
            latency_ms: self.latency_ms,
            via: self.via.clone(),
            replica: self.replica.clone(),
        })
    }
}

/// A synchronous writer of activity batches, driven by [`crate::logs::activity`]'s
/// writer on a dedicated OS thread (no async runtime hop per batch). Same contract as
/// [`Store::insert_activity`]: one transaction per call, durable when it returns,
/// idempotent per `decision_id`.
pub trait ActivitySink: Send {
    /// Inserts the batch in one transaction.
    fn insert(&mut self, batch: &[ActivityRecord]) -> Result<(), StoreError>;
}

/// Filters for [`Store::list_audit`]; every field set must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    /// Entries at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Entries strictly before this time.
    pub until: Option<OffsetDateTime>,
    /// Exact actor.
    pub actor: Option<String>,
    /// Exact action.
    pub action: Option<AuditAction>,
    /// Exact object type.
    pub object_type: Option<String>,
    /// Exact object id.
    pub object_id: Option<String>,
}

/// Filters for [`Store::list_activity`]; every field set must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActivityFilter {
    /// Entries at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Entries strictly before this time.
    pub until: Option<OffsetDateTime>,
    /// Exact username.
    pub username: Option<String>,
    /// Exact application.
    pub application: Option<String>,
    /// Exact decision (`allow` / `deny`).
    pub decision: Option<String>,
    /// Entries whose `rules[]` hold an element with this `rule_id`.
    pub rule_id: Option<String>,
}

/// Which page of a listing to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Rows per page, `1..=1000` (clamped).
    pub limit: usize,
    /// `next_cursor` of the previous page; `None` for the first page.
    pub cursor: Option<String>,
}

impl Page {
    /// The default page size of the list endpoints.
    pub const DEFAULT_LIMIT: usize = 100;
    /// The largest page size.
    pub const MAX_LIMIT: usize = 1000;

    /// The limit clamped to `1..=MAX_LIMIT`.
    pub fn effective_limit(&self) -> usize {
        self.limit.clamp(1, Page::MAX_LIMIT)
    }
}

impl Default for Page {
    fn default() -> Page {
        Page { limit: Page::DEFAULT_LIMIT, cursor: None }
    }
}

/// One page of a listing; serializes as `{"items": [...], "next_cursor": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Listing<T> {
    /// The rows, newest first.
    pub items: Vec<T>,
    /// Cursor of the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Outcome of [`Store::verify_audit`].
///
/// Serializes as `{"ok": true, "entries": N}` or
/// `{"ok": false, "seq": S, "entries_checked": N, "reason": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyResult {
    /// Every entry's hash and link hold.
    Ok {
        /// How many entries were checked.
        entries: u64,
    },
    /// The first entry that does not hold.
    Broken {
        /// Its seq.
        seq: i64,
        /// How many entries held before it.
        entries_checked: u64,
        /// What does not hold.
        reason: String,
    },
}

impl Serialize for VerifyResult {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            VerifyResult::Ok { entries } => {
                let mut m = serializer.serialize_map(Some(2))?;
                m.serialize_entry("ok", &true)?;
                m.serialize_entry("entries", entries)?;
                m.end()
            }
            VerifyResult::Broken { seq, entries_checked, reason } => {
                let mut m = serializer.serialize_map(Some(4))?;
                m.serialize_entry("ok", &false)?;
                m.serialize_entry("seq", seq)?;
                m.serialize_entry("entries_checked", entries_checked)?;
                m.serialize_entry("reason", reason)?;
                m.end()
            }
        }
    }
}

/// Store failures. Messages never contain secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is busy/locked/full; retrying later may work.
    /// The API answers 503 `store_unavailable`.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The change conflicts with the stored state.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A pagination cursor that this store did not hand out.
    #[error("malformed cursor")]
    BadCursor,
    /// Stored data is unreadable (corrupt file, undecryptable secrets, bad JSON).
    #[error("store data corrupt: {0}")]
    Corrupt(String),
    /// Anything else; a bug or an environment problem.
    #[error("store error: {0}")]
    Internal(String),
}

/// Formats a time as RFC 3339 UTC with microseconds, e.g. `2025-01-31T12:00:00.123456Z`.
/// Fixed width, so these strings also sort by time.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    // Every decision formats its time: digits by hand rather than through a format
    // description (the same text; see the test).
    if let Ok(year) = u32::try_from(t.year()) {
        if year <= 9999 {
            let mut out = String::with_capacity(27);
            let fields = [
                (year, 4, '-'),
                (u32::from(u8::from(t.month())), 2, '-'),
                (u32::from(t.day()), 2, 'T'),
                (u32::from(t.hour()), 2, ':'),
                (u32::from(t.minute()), 2, ':'),
                (u32::from(t.second()), 2, '.'),
                (t.microsecond(), 6, 'Z'),
            ];
            for (value, width, after) in fields {
                push_digits(&mut out, value, width);
                out.push(after);
            }
            return out;
        }
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    // Formatting only fails for years outside 0..=9999, which `now` never is; fall back
    // to the well-known format rather than fail a write.
    t.format(&fmt).or_else(|_| t.format(&Rfc3339)).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Appends `value` as exactly `width` decimal digits (zero-padded; `value` fits).
fn push_digits(out: &mut String, value: u32, width: u32) {
    for i in (0..width).rev() {
        let digit = (value / 10u32.pow(i)) % 10;
        out.push(char::from_digit(digit, 10).unwrap_or('0'));
    }
}

/// The current time as [`format_time`] writes it.
pub fn now_string() -> String {
    format_time(OffsetDateTime::now_utc())
}

/// Parses an RFC 3339 time.
pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// Microseconds since the Unix epoch: the column the logs are ordered and filtered by.
pub fn unix_micros(t: OffsetDateTime) -> i64 {
    let micros = t.unix_timestamp_nanos() / 1_000;
    i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX })
}

const AUDIT_CURSOR_TAG: &str = "a1";
const ACTIVITY_CURSOR_TAG: &str = "c1";

/// Cursor of an audit listing: entries with `seq` below `seq` come next.
pub fn encode_audit_cursor(seq: i64) -> String {
    B64URL.encode(format!("{AUDIT_CURSOR_TAG}:{seq}"))
}

/// The inverse of [`encode_audit_cursor`].
pub fn decode_audit_cursor(cursor: &str) -> Result<i64, StoreError> {
    let text = decode_cursor_text(cursor, AUDIT_CURSOR_TAG)?;
    text.parse().map_err(|_| StoreError::BadCursor)
}

/// Cursor of an activity listing: the `(time in µs, row id)` of the last row returned.
pub fn encode_activity_cursor(time_us: i64, id: i64) -> String {
    B64URL.encode(format!("{ACTIVITY_CURSOR_TAG}:{time_us}:{id}"))
}

/// The inverse of [`encode_activity_cursor`].
pub fn decode_activity_cursor(cursor: &str) -> Result<(i64, i64), StoreError> {
    let text = decode_cursor_text(cursor, ACTIVITY_CURSOR_TAG)?;
    let (t, id) = text.split_once(':').ok_or(StoreError::BadCursor)?;
    Ok((t.parse().map_err(|_| StoreError::BadCursor)?, id.parse().map_err(|_| StoreError::BadCursor)?))
}

fn decode_cursor_text(cursor: &str, tag: &str) -> Result<String, StoreError> {
    let bytes = B64URL.decode(cursor).map_err(|_| StoreError::BadCursor)?;
    let text = String::from_utf8(bytes).map_err(|_| StoreError::BadCursor)?;
    let rest = text.strip_prefix(tag).and_then(|r| r.strip_prefix(':')).ok_or(StoreError::BadCursor)?;
    Ok(rest.to_string())
}

/// The distinct `rule_id`s in an activity entry's `rules` array.
pub fn activity_rule_ids(rules: &Value) -> Vec<String> {
    let mut ids: Vec<String> = rules
        .as_array()
        .map(|a| a.iter().filter_map(|r| r.get("rule_id").and_then(Value::as_str)).map(str::to_string).collect())
        .unwrap_or_default();
    ids.sort();
    ids.dedup();
    ids
}

/// The persistence interface of verdict.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Every stored rule/policy/webhook, secrets decrypted.
    async fn load_all(&self) -> Result<Vec<StoredObject>, StoreError>;
    /// Apply the changes and append the audit entries (chained, seq gap-free) in ONE
    /// transaction; returns the appended entries.
    async fn commit(&self, changes: Vec<Change>, audit: Vec<AuditDraft>) -> Result<Vec<AuditEntry>, StoreError>;
    /// The `sha256` in the `after` of the newest `load` audit entry for this file
    /// (`object_type` `file`, `object_id` = `file`), if any; a file load is audited once
    /// per distinct content.
    async fn last_file_hash(&self, file: &str) -> Result<Option<String>, StoreError>;
    /// Audit entries, newest first.
    async fn list_audit(&self, filter: &AuditFilter, page: &Page) -> Result<Listing<AuditEntry>, StoreError>;
    /// Walks the chain in seq order and reports the first entry that does not hold.
    async fn verify_audit(&self) -> Result<VerifyResult, StoreError>;
    /// Insert a batch of activity entries in ONE transaction, durable (fsynced) when this
    /// returns. Idempotent per `decision_id`: a known one is ignored.
    async fn insert_activity(&self, batch: &[ActivityEntry]) -> Result<(), StoreError>;
    /// A synchronous activity writer for a dedicated thread, when the store has one
    /// (SQLite does). `None` (the default) makes the activity writer call
    /// [`Store::insert_activity`] from the async runtime instead. Additive: a store that
    /// does not override it behaves as before.
    fn activity_sink(&self) -> Option<Box<dyn ActivitySink>> {
        None
    }
    /// Activity entries, newest first.
    async fn list_activity(&self, filter: &ActivityFilter, page: &Page) -> Result<Listing<ActivityEntry>, StoreError>;
    /// Removes activity entries strictly older than `older_than`; returns how many.
    async fn prune_activity(&self, older_than: OffsetDateTime) -> Result<u64, StoreError>;
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(decode_audit_cursor(&encode_audit_cursor(42)).unwrap(), 42);
        assert_eq!(
            decode_activity_cursor(&encode_activity_cursor(1_700_000_000_000_000, 7)).unwrap(),
            (1_700_000_000_000_000, 7)
        );
        for bad in ["", "!!", "zzzz", &encode_activity_cursor(1, 2)] {
            assert_eq!(decode_audit_cursor(bad), Err(StoreError::BadCursor), "{bad}");
        }
        assert_eq!(decode_activity_cursor(&encode_audit_cursor(1)), Err(StoreError::BadCursor));
    }

    #[test]
    fn time_format_matches_the_format_description() {
        let fmt =
            time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
        for t in [
            time::macros::datetime!(2025-01-02 03:04:05.000_007 UTC),
            time::macros::datetime!(1999-12-31 23:59:59.999_999_999 UTC),
            time::macros::datetime!(0001-01-01 00:00:00 UTC),
            time::macros::datetime!(9999-12-31 23:59:59.5 +01:00),
            OffsetDateTime::now_utc(),
        ] {
            let utc = t.to_offset(UtcOffset::UTC);
            assert_eq!(format_time(t), utc.format(&fmt).unwrap(), "{t}");
        }
    }

    #[test]
    fn time_format_is_fixed_width_utc() {
        let t = time::macros::datetime!(2025-01-02 03:04:05.5 +02:00);
        assert_eq!(format_time(t), "2025-01-02T01:04:05.500000Z");
        assert_eq!(parse_time(&format_time(t)), Some(t));
    }

    #[test]
    fn debug_masks_secrets() {
        let o = StoredObject {
            kind: ObjectKind::Rule,
            id: "r".into(),
            source: "api".into(),
            version: 1,
            doc: serde_json::json!({}),
            secrets: BTreeMap::from([("auth.password".to_string(), "pa55word".to_string())]),
            created_at: now_string(),
            updated_at: now_string(),
        };
        let dbg = format!("{o:?}");
        assert!(dbg.contains("auth.password"));
        assert!(!dbg.contains("pa55word"));
    }

    #[test]
    fn verify_result_json_shape() {
        let ok = serde_json::to_value(VerifyResult::Ok { entries: 3 }).unwrap();
        assert_eq!(ok, serde_json::json!({"ok": true, "entries": 3}));
        let broken =
            serde_json::to_value(VerifyResult::Broken { seq: 2, entries_checked: 1, reason: "hash mismatch".into() })
                .unwrap();
        assert_eq!(broken["ok"], false);
        assert_eq!(broken["seq"], 2);
    }
}
