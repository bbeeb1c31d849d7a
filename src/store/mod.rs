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
//! - Webhook events go through an outbox (SPEC §10): rows written in the same transaction
//!   as what caused them ([`ActivityEntry::outbox`] with its entry, the [`AuditHook`]'s
//!   events with `commit`), delivered later by a worker that claims due rows with a lease
//!   ([`Store::claim_deliveries`]). The behaviour every store must have is written once,
//!   in `outbox_conformance` (the outbox) and `conformance` (the rest), and run against
//!   each.

#[cfg(test)]
pub(crate) mod conformance;
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
    /// Webhook events of this decision, written to the outbox in the same transaction as
    /// the entry (SPEC §10: nothing is lost). Carried here so a spooled entry keeps its
    /// events until the spool drains; never part of an API answer (entries read back
    /// from a store always have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(ignore)]
    pub outbox: Vec<OutboxEvent>,
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
    /// As [`ActivityEntry::outbox`]: inserted in the batch's transaction.
    pub outbox: Vec<OutboxEvent>,
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
            outbox: entry.outbox.clone(),
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
            outbox: self.outbox.clone(),
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

/// One event for one webhook, written to the outbox (SPEC §10).
///
/// The outbox is how delivery stays "at least once, and nothing is lost": an event is a
/// row written in the same transaction as what caused it (a decision's activity entry,
/// an audit entry), and a background worker delivers the rows later. The store treats
/// the content as opaque; only `(webhook_id, event_id)` matters to it, as the key that
/// makes a repeated write (a retried or replayed batch) a no-op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// The webhook that receives the event.
    pub webhook_id: String,
    /// The event's UUID; the same for every webhook receiving this event, and on every
    /// attempt (receivers de-duplicate on it).
    pub event_id: String,
    /// E.g. `decision.denied`.
    pub event_type: String,
    /// The envelope JSON text, sent as the body (opaque to the store).
    pub payload: String,
    /// Attempts before the delivery is `failed`.
    pub max_attempts: u32,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its next attempt (or in flight).
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Out of attempts, or an answer that retrying cannot fix.
    Failed,
}

impl DeliveryState {
    /// The state as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    /// The inverse of [`DeliveryState::as_str`].
    pub fn parse(s: &str) -> Option<DeliveryState> {
        match s {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "failed" => Some(DeliveryState::Failed),
            _ => None,
        }
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One (webhook, event) delivery as the store keeps it; serialises as
/// `GET /v1/webhooks/{id}/deliveries` shows it (without the row id and the payload).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    /// The store's row id: what [`Store::finish_delivery`] takes.
    #[serde(skip)]
    pub id: i64,
    /// The webhook.
    pub webhook_id: String,
    /// The event's UUID (`X-Verdict-Event-Id`).
    pub event_id: String,
    /// The event type, e.g. `decision.denied`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// HTTP status of the last attempt, when it got an answer.
    pub last_status: Option<u16>,
    /// Why the last attempt did not deliver; for an event not tried yet while this
    /// replica sees the receiver failing, why it waits (`waiting: …`, added by the API).
    pub last_error: Option<String>,
    /// RFC 3339 time of the next attempt while `pending`; `None` otherwise.
    pub next_attempt_at: Option<String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC of the last state change.
    pub updated_at: String,
    /// The body to send (the event envelope); not shown.
    #[serde(skip)]
    pub payload: String,
}

/// The result of one attempt (or a manual state change), written by
/// [`Store::finish_delivery`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryUpdate {
    /// The new state.
    pub state: DeliveryState,
    /// Attempts made, this one included.
    pub attempts: u32,
    /// HTTP status of this attempt, when it got an answer.
    pub last_status: Option<u16>,
    /// Why this attempt did not deliver.
    pub last_error: Option<String>,
    /// µs since the Unix epoch of the next attempt; meaningful when `state` is `Pending`.
    pub next_attempt_us: i64,
}

/// Builds the outbox events of an audit entry (`config.changed`). [`Store::commit`] calls
/// it for each entry it seals, inside its transaction, so the events are written if and
/// only if the entry is; it must be quick and must not touch the store.
pub type AuditHook = std::sync::Arc<dyn Fn(&AuditEntry) -> Vec<OutboxEvent> + Send + Sync>;

/// A delivery row as both stores read it, before its values are checked.
pub(crate) struct RawDelivery {
    pub id: i64,
    pub webhook_id: String,
    pub event_id: String,
    pub event_type: String,
    pub state: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub next_attempt_us: i64,
    pub created_at: String,
    pub updated_at: String,
    pub payload: String,
}

/// The columns [`RawDelivery`] is read from, in its field order.
pub(crate) const DELIVERY_COLUMNS: &str = "id, webhook_id, event_id, event_type, state, attempts, max_attempts, \
     last_status, last_error, next_attempt_us, created_at, updated_at, payload";

impl RawDelivery {
    /// The delivery; an unknown state or an out-of-range number is corrupt data.
    pub(crate) fn into_delivery(self) -> Result<Delivery, StoreError> {
        let id = self.id;
        let corrupt = |what: &str| StoreError::Corrupt(format!("webhook delivery {id} has an invalid {what}"));
        let state = DeliveryState::parse(&self.state).ok_or_else(|| corrupt("state"))?;
        let next_attempt_at =
            (state == DeliveryState::Pending).then(|| format_time(from_unix_micros(self.next_attempt_us)));
        Ok(Delivery {
            id,
            webhook_id: self.webhook_id,
            event_id: self.event_id,
            event_type: self.event_type,
            state,
            attempts: u32::try_from(self.attempts).map_err(|_| corrupt("attempt count"))?,
            max_attempts: u32::try_from(self.max_attempts).map_err(|_| corrupt("max_attempts"))?,
            last_status: self.last_status.map(u16::try_from).transpose().map_err(|_| corrupt("last_status"))?,
            last_error: self.last_error,
            next_attempt_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
            payload: self.payload,
        })
    }
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
impl<T> Listing<T> {
    /// A page from a query that fetched one row more than `limit`: the extra row only
    /// says that another page follows, whose cursor `cursor` makes from the last item kept.
    pub fn from_overfetch(mut items: Vec<T>, limit: usize, cursor: impl Fn(&T) -> String) -> Listing<T> {
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(cursor)
        } else {
            None
        };
        Listing { items, next_cursor }
    }

    /// The same page with each item turned into another type.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Listing<U> {
        Listing { items: self.items.into_iter().map(f).collect(), next_cursor: self.next_cursor }
    }
}

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

/// The inverse of [`unix_micros`] (saturating at the limits `OffsetDateTime` can hold).
pub fn from_unix_micros(us: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000).unwrap_or(if us < 0 {
        time::PrimitiveDateTime::MIN.assume_utc()
    } else {
        time::PrimitiveDateTime::MAX.assume_utc()
    })
}

const AUDIT_CURSOR_TAG: &str = "a1";
const ACTIVITY_CURSOR_TAG: &str = "c1";
const DELIVERY_CURSOR_TAG: &str = "d1";

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

/// Cursor of a delivery listing: rows with an `id` below `id` come next.
pub fn encode_delivery_cursor(id: i64) -> String {
    B64URL.encode(format!("{DELIVERY_CURSOR_TAG}:{id}"))
}

/// The inverse of [`encode_delivery_cursor`].
pub fn decode_delivery_cursor(cursor: &str) -> Result<i64, StoreError> {
    let text = decode_cursor_text(cursor, DELIVERY_CURSOR_TAG)?;
    text.parse().map_err(|_| StoreError::BadCursor)
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

    // The webhook outbox (SPEC §10). Decision events are written by `insert_activity` /
    // the activity sink from [`ActivityEntry::outbox`], config events by `commit` through
    // the [`AuditHook`]; the methods below write the others and drive delivery. The
    // defaults say "not supported", so a store without an outbox (a test fake) still
    // compiles; SQLite and PostgreSQL implement them all.

    /// Writes events not tied to a decision or an audit entry (circuit changes), pending
    /// and due now, in one transaction. Idempotent on `(webhook_id, event_id)`.
    async fn enqueue_events(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        let _ = events;
        Err(outbox_unsupported())
    }
    /// Claims pending deliveries due at `now_us` and not claimed (`claimed_until_us <=
    /// now_us`: a lease that ran out is free again): of each webhook in `wants`, at most
    /// its count, oldest due first, marking them claimed by `owner` until
    /// `now_us + lease_us`. Returned oldest due first. Webhooks not named are not
    /// touched and their rows not read, so a webhook the delivery loop holds back (its
    /// receiver failing) costs a claim nothing, however many of its events wait. Two
    /// claims at once (two replicas) never get the same row.
    async fn claim_deliveries(
        &self,
        owner: &str,
        now_us: i64,
        lease_us: i64,
        wants: &[(String, usize)],
    ) -> Result<Vec<Delivery>, StoreError> {
        let _ = (owner, now_us, lease_us, wants);
        Err(outbox_unsupported())
    }
    /// The webhooks that have pending deliveries, each once, in id order (one index
    /// seek per webhook, not a scan of its rows). The delivery loop uses it to find
    /// events of webhooks it does not know (deleted while it was down).
    async fn pending_webhooks(&self) -> Result<Vec<String>, StoreError> {
        Err(outbox_unsupported())
    }
    /// Fails up to `limit` pending deliveries of `webhook_id` that have been due since
    /// before `due_before_us` and are not claimed at `now_us`, oldest due first, with
    /// `error` (and `last_status` when given), in one short write; returns how many.
    /// Callers repeat while a full `limit` comes back, so a large backlog never holds
    /// the writer long. Used for the give-up rule (events overdue by more than their
    /// whole retry schedule while the receiver fails) and for a deleted webhook.
    async fn fail_pending_deliveries(
        &self,
        webhook_id: &str,
        now_us: i64,
        due_before_us: i64,
        last_status: Option<u16>,
        error: &str,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let _ = (webhook_id, now_us, due_before_us, last_status, error, limit);
        Err(outbox_unsupported())
    }
    /// Records an attempt's result (or a manual state change) and clears the claim. A
    /// delivery that no longer exists is not an error.
    async fn finish_delivery(&self, id: i64, update: &DeliveryUpdate) -> Result<(), StoreError> {
        self.finish_deliveries(&[(id, update.clone())]).await
    }
    /// [`Store::finish_delivery`] for many deliveries in one write: the delivery loop
    /// records its results in batches, so a busy webhook costs one commit per batch
    /// rather than one per event.
    async fn finish_deliveries(&self, done: &[(i64, DeliveryUpdate)]) -> Result<(), StoreError> {
        let _ = done;
        Err(outbox_unsupported())
    }
    /// Clears every claim held by `owner`; returns how many. Called at start: a restarted
    /// process re-sends what it had in flight rather than waiting for its old leases.
    async fn release_claims(&self, owner: &str) -> Result<u64, StoreError> {
        let _ = owner;
        Err(outbox_unsupported())
    }
    /// A webhook's deliveries, newest first (by row id), paged with an opaque cursor.
    async fn list_deliveries(&self, webhook_id: &str, page: &Page) -> Result<Listing<Delivery>, StoreError> {
        let _ = (webhook_id, page);
        Err(outbox_unsupported())
    }
    /// One delivery; `None` when it does not exist.
    async fn get_delivery(&self, webhook_id: &str, event_id: &str) -> Result<Option<Delivery>, StoreError> {
        let _ = (webhook_id, event_id);
        Err(outbox_unsupported())
    }
    /// Makes a delivery pending again, due at `now_us`, with `extra_attempts` more
    /// attempts than it has made (`max_attempts = attempts + extra_attempts`), claim
    /// cleared; `last_status`/`last_error` stay until the next attempt. Whatever its state:
    /// which states may be retried is the caller's rule. `None` when it does not exist.
    async fn retry_delivery(
        &self,
        webhook_id: &str,
        event_id: &str,
        now_us: i64,
        extra_attempts: u32,
    ) -> Result<Option<Delivery>, StoreError> {
        let _ = (webhook_id, event_id, now_us, extra_attempts);
        Err(outbox_unsupported())
    }
    /// How many deliveries are pending (the outbox depth, for metrics).
    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        Err(outbox_unsupported())
    }
    /// Installs the hook [`Store::commit`] calls for each audit entry it seals; the events
    /// it returns are inserted in the same transaction as the entry. Replaces any earlier
    /// hook. The default (a store without an outbox) ignores it.
    fn set_audit_hook(&self, hook: AuditHook) {
        let _ = hook;
    }
}

/// Rows one [`Store::fail_pending_deliveries`] write fails at most.
pub const FAIL_CHUNK: u32 = 500;

/// [`Store::fail_pending_deliveries`] repeated until no full chunk comes back: fails
/// every matching row in writes of [`FAIL_CHUNK`], yielding between them so decisions
/// sharing the writer go in between. Returns how many rows failed.
pub async fn fail_pending_in_chunks(
    store: &dyn Store,
    webhook_id: &str,
    now_us: i64,
    due_before_us: i64,
    last_status: Option<u16>,
    error: &str,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n =
            store.fail_pending_deliveries(webhook_id, now_us, due_before_us, last_status, error, FAIL_CHUNK).await?;
        total += n;
        if n < u64::from(FAIL_CHUNK) {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

fn outbox_unsupported() -> StoreError {
    StoreError::Internal("webhook outbox not supported by this store".into())
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

/// The webhook outbox's contract, written once and run against every store (each store's
/// tests call these with a fresh, empty store of their own).
/// One `#[tokio::test]` per shared check that needs nothing but a store: `$fresh` is
/// an async fn of the calling module returning (what must live as long as the store,
/// the store).
#[cfg(test)]
macro_rules! store_checks {
    ($module:ident; $fresh:ident; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (_keep, store) = $fresh().await;
                $module::$name(&store).await;
            }
        )+
    };
}
#[cfg(test)]
pub(crate) use store_checks;

#[cfg(test)]
pub(crate) mod outbox_conformance {
    use std::future::Future;
    use std::sync::Arc;

    use serde_json::json;

    use super::conformance::all_pages;
    use super::*;

    /// A lease long enough that no claim in these tests runs out by itself.
    const LEASE: i64 = 60_000_000;

    pub(crate) fn now_us() -> i64 {
        unix_micros(OffsetDateTime::now_utc())
    }

    pub(crate) fn event(webhook_id: &str, event_id: &str) -> OutboxEvent {
        OutboxEvent {
            webhook_id: webhook_id.into(),
            event_id: event_id.into(),
            event_type: "decision.denied".into(),
            payload: json!({"version": "1", "id": event_id, "detail-type": "Decision Denied"}).to_string(),
            max_attempts: 8,
        }
    }

    pub(crate) fn entry(decision_id: &str, outbox: Vec<OutboxEvent>) -> ActivityEntry {
        ActivityEntry {
            decision_id: decision_id.into(),
            time: now_string(),
            application: "payroll".into(),
            username: Some("alice".into()),
            remote_ip: None,
            device_id: None,
            decision: "deny".into(),
            reason: "device-posture denied".into(),
            policies: json!([{"id": "p1", "decision": "deny"}]),
            rules: json!([{"rule_id": "device-posture", "outcome": "deny"}]),
            latency_ms: 2.0,
            via: "api".into(),
            replica: "test".into(),
            outbox,
        }
    }

    fn keys(deliveries: &[Delivery]) -> Vec<(String, String)> {
        deliveries.iter().map(|d| (d.webhook_id.clone(), d.event_id.clone())).collect()
    }

    fn key(webhook_id: &str, event_id: &str) -> (String, String) {
        (webhook_id.to_string(), event_id.to_string())
    }

    fn update(state: DeliveryState, attempts: u32, status: Option<u16>, next_attempt_us: i64) -> DeliveryUpdate {
        DeliveryUpdate {
            state,
            attempts,
            last_status: status,
            last_error: status.filter(|s| *s >= 300).map(|s| format!("HTTP {s}")),
            next_attempt_us,
        }
    }

    /// Every event id of a webhook's deliveries, page by page.
    async fn listed(store: &dyn Store, webhook_id: &str, limit: usize) -> Vec<String> {
        let list = async |page: &Page| store.list_deliveries(webhook_id, page).await.unwrap();
        all_pages(limit, list).await.into_iter().map(|d| d.event_id).collect()
    }

    /// Claims up to `n` due rows of each webhook that has pending rows.
    async fn claim(store: &dyn Store, owner: &str, now_us: i64, n: usize) -> Vec<Delivery> {
        let wants: Vec<(String, usize)> = store.pending_webhooks().await.unwrap().into_iter().map(|h| (h, n)).collect();
        store.claim_deliveries(owner, now_us, LEASE, &wants).await.unwrap()
    }

    async fn delivery(store: &dyn Store, webhook_id: &str, event_id: &str) -> Delivery {
        store.get_delivery(webhook_id, event_id).await.unwrap().unwrap_or_else(|| panic!("{webhook_id}/{event_id}"))
    }

    /// An activity batch writes its entries' events as pending deliveries, once.
    pub(crate) async fn activity_batches_write_their_events_once(store: &dyn Store) {
        let before = now_us();
        let batch = vec![
            entry("d1", vec![event("h1", "x1"), event("h2", "x1")]),
            entry("d2", vec![]),
            entry("d3", vec![event("h1", "x3")]),
        ];
        store.insert_activity(&batch).await.unwrap();
        assert_eq!(listed(store, "h1", 10).await, ["x3", "x1"]);
        assert_eq!(listed(store, "h2", 10).await, ["x1"]);
        assert_eq!(store.outbox_depth().await.unwrap(), 3);
        let d = delivery(store, "h1", "x1").await;
        assert_eq!(
            (d.event_type.as_str(), d.state, d.attempts, d.max_attempts, d.last_status, d.last_error.as_deref()),
            ("decision.denied", DeliveryState::Pending, 0, 8, None, None)
        );
        assert_eq!(d.payload, event("h1", "x1").payload);
        assert_eq!(d.created_at, d.updated_at);
        let due = parse_time(d.next_attempt_at.as_deref().expect("pending: due now")).unwrap();
        assert!(unix_micros(due) >= before && unix_micros(due) <= now_us(), "due when written");

        // A retried batch adds nothing; neither does a known decision replayed with other
        // events (they were written with the decision the first time).
        store.insert_activity(&batch).await.unwrap();
        store.insert_activity(&[entry("d2", vec![event("h1", "x9")])]).await.unwrap();
        assert_eq!(store.outbox_depth().await.unwrap(), 3);
        assert_eq!(listed(store, "h1", 10).await, ["x3", "x1"]);

        // Entries read back never show their events.
        let listing = store.list_activity(&ActivityFilter::default(), &Page::default()).await.unwrap();
        assert_eq!(listing.items.len(), 3);
        for e in &listing.items {
            assert!(e.outbox.is_empty());
            assert!(serde_json::to_value(e).unwrap().get("outbox").is_none());
        }

        // Oldest due first; a batch's events are due together, in the batch's order.
        let claimed = claim(store, "w", now_us(), 10).await;
        assert_eq!(keys(&claimed), [key("h1", "x1"), key("h2", "x1"), key("h1", "x3")]);
    }

    /// Claims take due, unclaimed, pending rows only, and hold them for the lease.
    pub(crate) async fn claims_lease_and_finish(store: &dyn Store) {
        assert!(claim(store, "a", now_us(), 10).await.is_empty());
        store.enqueue_events(&[event("h", "e1"), event("h", "e2"), event("h", "e3")]).await.unwrap();
        // Idempotent on (webhook_id, event_id).
        store.enqueue_events(&[event("h", "e1")]).await.unwrap();
        let t = now_us();

        let first = claim(store, "a", t, 2).await;
        assert_eq!(keys(&first), [key("h", "e1"), key("h", "e2")]);
        assert_eq!(first[0].payload, event("h", "e1").payload, "a claim carries what to send");
        assert_eq!((first[0].state, first[0].attempts), (DeliveryState::Pending, 0));
        let second = claim(store, "b", t, 10).await;
        assert_eq!(keys(&second), [key("h", "e3")]);
        // Everything is claimed until the leases end.
        assert!(claim(store, "b", t + LEASE - 1, 10).await.is_empty());

        let (e1, e2, e3) = (first[0].id, first[1].id, second[0].id);
        store.finish_delivery(e1, &update(DeliveryState::Pending, 1, Some(503), t + 10 * LEASE)).await.unwrap();
        store.finish_delivery(e2, &update(DeliveryState::Delivered, 1, Some(200), 0)).await.unwrap();
        store.finish_delivery(e3, &update(DeliveryState::Failed, 1, Some(404), 0)).await.unwrap();
        // The claims are cleared, but e1 is not due yet and the others are done.
        assert!(claim(store, "b", t + LEASE, 10).await.is_empty());
        let retry = claim(store, "b", t + 10 * LEASE, 10).await;
        assert_eq!(keys(&retry), [key("h", "e1")]);
        assert_eq!(
            (retry[0].attempts, retry[0].last_status, retry[0].last_error.as_deref()),
            (1, Some(503), Some("HTTP 503"))
        );
        // A lease that ran out (its holder died) makes the row claimable again.
        assert!(claim(store, "c", t + 11 * LEASE - 1, 10).await.is_empty());
        assert_eq!(keys(&claim(store, "c", t + 11 * LEASE, 10).await), [key("h", "e1")]);
        // Delivered and failed rows are never claimed, however late.
        assert_eq!(keys(&claim(store, "d", t + 1000 * LEASE, 10).await), [key("h", "e1")]);

        let e2 = delivery(store, "h", "e2").await;
        assert_eq!(
            (e2.state, e2.attempts, e2.last_status, e2.next_attempt_at),
            (DeliveryState::Delivered, 1, Some(200), None)
        );
        assert!(e2.updated_at >= e2.created_at);
        let e3 = delivery(store, "h", "e3").await;
        assert_eq!((e3.state, e3.last_error.as_deref()), (DeliveryState::Failed, Some("HTTP 404")));
        let e1 = delivery(store, "h", "e1").await;
        assert_eq!(e1.next_attempt_at, Some(format_time(from_unix_micros(t + 10 * LEASE))));

        // Oldest due first, whatever the row order.
        store.enqueue_events(&[event("h", "e4"), event("h", "e5")]).await.unwrap();
        let t2 = now_us();
        let both = claim(store, "a", t2, 10).await;
        assert_eq!(keys(&both), [key("h", "e4"), key("h", "e5")]);
        store.finish_delivery(both[0].id, &update(DeliveryState::Pending, 1, None, t2 + 3 * LEASE)).await.unwrap();
        store.finish_delivery(both[1].id, &update(DeliveryState::Pending, 1, None, t2 + 2 * LEASE)).await.unwrap();
        let next = claim(store, "a", t2 + 3 * LEASE, 1).await;
        assert_eq!(keys(&next), [key("h", "e5")]);
        // Finishing a delivery that is gone is not an error.
        store.finish_delivery(i64::MAX, &update(DeliveryState::Delivered, 1, Some(200), 0)).await.unwrap();
    }

    /// A claim reads only the webhooks it names, at most their counts each; the others'
    /// rows stay due for later claims.
    pub(crate) async fn claims_take_only_the_named_webhooks(store: &dyn Store) {
        assert!(store.pending_webhooks().await.unwrap().is_empty());
        store
            .enqueue_events(&[event("slow", "s1"), event("fast", "f1"), event("slow", "s2"), event("other", "o1")])
            .await
            .unwrap();
        assert_eq!(store.pending_webhooks().await.unwrap(), ["fast", "other", "slow"]);
        let t = now_us();
        let wants = |w: &[(&str, usize)]| w.iter().map(|(h, n)| (h.to_string(), *n)).collect::<Vec<_>>();
        let claimed = store.claim_deliveries("a", t, LEASE, &wants(&[("fast", 10), ("nobody", 3)])).await.unwrap();
        assert_eq!(keys(&claimed), [key("fast", "f1")]);
        assert!(store.claim_deliveries("a", t, LEASE, &wants(&[("slow", 0)])).await.unwrap().is_empty());
        assert!(store.claim_deliveries("a", t, LEASE, &[]).await.unwrap().is_empty());
        let claimed = store.claim_deliveries("a", t, LEASE, &wants(&[("other", 10), ("slow", 1)])).await.unwrap();
        assert_eq!(keys(&claimed), [key("slow", "s1"), key("other", "o1")], "oldest due first across webhooks");
        let claimed = store.claim_deliveries("a", t, LEASE, &wants(&[("slow", 10)])).await.unwrap();
        assert_eq!(keys(&claimed), [key("slow", "s2")]);
        // Claimed rows are still pending; finished ones leave the list.
        assert_eq!(store.pending_webhooks().await.unwrap(), ["fast", "other", "slow"]);
        store.finish_delivery(claimed[0].id, &update(DeliveryState::Delivered, 1, Some(200), 0)).await.unwrap();
        let s1 = delivery(store, "slow", "s1").await;
        store.finish_delivery(s1.id, &update(DeliveryState::Failed, 1, Some(404), 0)).await.unwrap();
        assert_eq!(store.pending_webhooks().await.unwrap(), ["fast", "other"]);
    }

    /// Overdue rows fail oldest due first, in chunks, passing over claimed rows (unless
    /// `now_us` is past every lease) and other webhooks.
    pub(crate) async fn fail_pending_fails_overdue_rows_in_chunks(store: &dyn Store) {
        store.enqueue_events(&[event("down", "old1"), event("down", "old2"), event("down", "old3")]).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let between = now_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        store.enqueue_events(&[event("down", "new"), event("up", "u1")]).await.unwrap();
        let t = now_us();
        let wants = vec![("down".to_string(), 1)];
        let probe = store.claim_deliveries("a", t, LEASE, &wants).await.unwrap();
        assert_eq!(keys(&probe), [key("down", "old1")], "oldest due first");

        let fail = |limit| store.fail_pending_deliveries("down", t, between, Some(503), "gave up", limit);
        assert_eq!(fail(1).await.unwrap(), 1, "a full chunk");
        assert_eq!(fail(1).await.unwrap(), 1);
        assert_eq!(fail(1).await.unwrap(), 0, "the claimed probe and the newer row are left");
        for id in ["old2", "old3"] {
            let d = delivery(store, "down", id).await;
            assert_eq!(
                (d.state, d.attempts, d.last_status, d.last_error.as_deref(), d.next_attempt_at),
                (DeliveryState::Failed, 0, Some(503), Some("gave up"), None)
            );
        }
        let n = delivery(store, "down", "new").await;
        assert_eq!((n.state, n.last_status, n.last_error), (DeliveryState::Pending, None, None));
        assert_eq!(delivery(store, "up", "u1").await.state, DeliveryState::Pending);

        // Everything pending, claimed or not (a deleted webhook): status kept when none is given.
        let all = store.fail_pending_deliveries("down", i64::MAX, i64::MAX, None, "the webhook was deleted", 10);
        assert_eq!(all.await.unwrap(), 2);
        let p = delivery(store, "down", "old1").await;
        assert_eq!((p.state, p.last_error.as_deref()), (DeliveryState::Failed, Some("the webhook was deleted")));
        assert_eq!(delivery(store, "down", "old2").await.last_status, Some(503));
        assert_eq!(store.pending_webhooks().await.unwrap(), ["up"]);
        assert!(store.claim_deliveries("b", now_us(), LEASE, &wants).await.unwrap().is_empty());
    }

    /// `release_claims` frees what one owner holds, nothing else.
    pub(crate) async fn release_claims_frees_rows(store: &dyn Store) {
        store.enqueue_events(&[event("h", "e1"), event("h", "e2"), event("h", "e3"), event("h", "e4")]).await.unwrap();
        let t = now_us();
        let a = claim(store, "a", t, 3).await;
        assert_eq!(a.len(), 3);
        store.finish_delivery(a[2].id, &update(DeliveryState::Delivered, 1, Some(204), 0)).await.unwrap();
        assert_eq!(claim(store, "b", t, 10).await.len(), 1);
        assert_eq!(store.release_claims("a").await.unwrap(), 2);
        assert_eq!(store.release_claims("a").await.unwrap(), 0);
        assert_eq!(store.release_claims("nobody").await.unwrap(), 0);
        let again = claim(store, "c", t, 10).await;
        assert_eq!(keys(&again), [key("h", "e1"), key("h", "e2")], "b's claim and the delivered row stay");
        assert_eq!(delivery(store, "h", "e3").await.state, DeliveryState::Delivered);
    }

    /// Listing (newest first, paged), one delivery, its JSON, and a manual retry.
    pub(crate) async fn listing_get_and_retry(store: &dyn Store) {
        let events: Vec<OutboxEvent> = (1..=5).map(|i| event("h", &format!("e{i}"))).collect();
        store.enqueue_events(&events).await.unwrap();
        store.enqueue_events(&[event("other", "e3"), event("other", "o1")]).await.unwrap();
        assert_eq!(listed(store, "h", 2).await, ["e5", "e4", "e3", "e2", "e1"]);
        assert_eq!(listed(store, "h", 1000).await, ["e5", "e4", "e3", "e2", "e1"]);
        assert_eq!(listed(store, "other", 1).await, ["o1", "e3"]);
        assert!(listed(store, "nothing", 10).await.is_empty());
        let exact = store.list_deliveries("h", &Page { limit: 5, cursor: None }).await.unwrap();
        assert_eq!((exact.items.len(), exact.next_cursor), (5, None), "no cursor to an empty page");
        for bad in ["garbage", "", &encode_audit_cursor(3), &encode_activity_cursor(1, 2)] {
            let page = Page { limit: 10, cursor: Some(bad.to_string()) };
            assert_eq!(store.list_deliveries("h", &page).await.unwrap_err(), StoreError::BadCursor, "{bad}");
        }

        let e3 = delivery(store, "h", "e3").await;
        assert_eq!(exact.items[2], e3, "listed and got alike");
        assert_eq!(delivery(store, "other", "e3").await.webhook_id, "other");
        assert_eq!(store.get_delivery("h", "o1").await.unwrap(), None);
        assert_eq!(store.get_delivery("nothing", "e1").await.unwrap(), None);
        // Ids from request paths may hold anything, a NUL included: not found, not an error.
        assert_eq!(store.get_delivery("h", "e1\0").await.unwrap(), None);
        assert_eq!(store.retry_delivery("h\0", "e1", now_us(), 1).await.unwrap(), None);
        assert!(listed(store, "h\0", 10).await.is_empty());
        let shown = serde_json::to_value(&e3).unwrap();
        let fields: Vec<&str> = shown.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            [
                "webhook_id",
                "event_id",
                "type",
                "state",
                "attempts",
                "max_attempts",
                "last_status",
                "last_error",
                "next_attempt_at",
                "created_at",
                "updated_at"
            ]
        );
        assert_eq!((&shown["type"], &shown["state"]), (&json!("decision.denied"), &json!("pending")));

        // A failed delivery made pending again, due now, with more attempts.
        let t = now_us();
        let claimed = claim(store, "a", t, 10).await;
        assert_eq!(claimed.len(), 7);
        let e2 = claimed.iter().find(|d| (d.webhook_id.as_str(), d.event_id.as_str()) == ("h", "e2")).unwrap();
        store.finish_delivery(e2.id, &update(DeliveryState::Failed, 8, Some(500), 0)).await.unwrap();
        let t2 = t + 5;
        let retried = store.retry_delivery("h", "e2", t2, 3).await.unwrap().expect("exists");
        assert_eq!(
            (retried.state, retried.attempts, retried.max_attempts, retried.last_status),
            (DeliveryState::Pending, 8, 11, Some(500))
        );
        assert_eq!(retried.next_attempt_at, Some(format_time(from_unix_micros(t2))));
        assert_eq!(retried, delivery(store, "h", "e2").await);
        // Its claim is cleared too: so is that of a claimed row retried by hand.
        store.retry_delivery("h", "e4", t2, 1).await.unwrap().unwrap();
        let due = claim(store, "b", t2, 10).await;
        assert_eq!(keys(&due), [key("h", "e2"), key("h", "e4")]);
        assert_eq!(store.retry_delivery("h", "nope", t2, 1).await.unwrap(), None);
        assert_eq!(store.retry_delivery("nothing", "e2", t2, 1).await.unwrap(), None);
    }

    /// The depth counts pending rows, claimed or not.
    pub(crate) async fn depth_counts_pending_only(store: &dyn Store) {
        assert_eq!(store.outbox_depth().await.unwrap(), 0);
        let events: Vec<OutboxEvent> = (1..=4).map(|i| event("h", &format!("e{i}"))).collect();
        store.enqueue_events(&events).await.unwrap();
        assert_eq!(store.outbox_depth().await.unwrap(), 4);
        let claimed = claim(store, "a", now_us(), 10).await;
        assert_eq!(store.outbox_depth().await.unwrap(), 4);
        store.finish_delivery(claimed[0].id, &update(DeliveryState::Delivered, 1, Some(200), 0)).await.unwrap();
        store.finish_delivery(claimed[1].id, &update(DeliveryState::Failed, 1, Some(400), 0)).await.unwrap();
        store.finish_delivery(claimed[2].id, &update(DeliveryState::Pending, 1, None, now_us() + LEASE)).await.unwrap();
        assert_eq!(store.outbox_depth().await.unwrap(), 2);
    }

    /// A hook that gives each audit entry one `config.changed` event for `siem`, except
    /// file loads; the payload is the sealed entry.
    fn config_hook() -> AuditHook {
        Arc::new(|entry: &AuditEntry| {
            if entry.object_type == "file" {
                return Vec::new();
            }
            vec![OutboxEvent {
                webhook_id: "siem".into(),
                event_id: format!("audit-{}", entry.seq),
                event_type: "config.changed".into(),
                payload: serde_json::to_string(entry).unwrap(),
                max_attempts: 3,
            }]
        })
    }

    fn draft(object_type: &str, object_id: &str) -> AuditDraft {
        AuditDraft {
            actor: "admin".into(),
            action: AuditAction::Create,
            object_type: object_type.into(),
            object_id: object_id.into(),
            before: None,
            after: Some(json!({"id": object_id})),
        }
    }

    fn object(id: &str) -> StoredObject {
        StoredObject {
            kind: ObjectKind::Rule,
            id: id.into(),
            source: "api".into(),
            version: 1,
            doc: json!({"id": id}),
            secrets: BTreeMap::new(),
            created_at: now_string(),
            updated_at: now_string(),
        }
    }

    /// `commit` writes the hook's events for the entries it seals.
    pub(crate) async fn audit_hook_events_commit_with_the_entry(store: &dyn Store) {
        // Without a hook, nothing.
        store.commit(vec![], vec![draft("rule", "r0")]).await.unwrap();
        assert_eq!(store.outbox_depth().await.unwrap(), 0);

        store.set_audit_hook(config_hook());
        let entries = store
            .commit(vec![Change::Put(object("r1"))], vec![draft("rule", "r1"), draft("policy", "p1")])
            .await
            .unwrap();
        assert_eq!(listed(store, "siem", 10).await, ["audit-3", "audit-2"]);
        let d = delivery(store, "siem", "audit-2").await;
        assert_eq!((d.event_type.as_str(), d.max_attempts, d.state), ("config.changed", 3, DeliveryState::Pending));
        let sent: AuditEntry = serde_json::from_str(&d.payload).unwrap();
        assert_eq!(sent, entries[0], "the hook sees the sealed entry");
        assert!(!sent.hash.is_empty());

        // A hook that returns nothing writes nothing; a commit without entries calls no hook.
        store.commit(vec![], vec![draft("file", "policies/a.json")]).await.unwrap();
        store.commit(vec![Change::Put(object("r2"))], vec![]).await.unwrap();
        assert_eq!(store.outbox_depth().await.unwrap(), 2);
    }

    /// When the outbox insert fails, the write that carried the events fails whole: no
    /// audit entry or object without its events, no decision without its events.
    /// `break_outbox` makes every insert into the store's delivery table fail.
    pub(crate) async fn a_failing_outbox_insert_fails_the_whole_write<F, Fut>(store: &dyn Store, break_outbox: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = ()>,
    {
        store.set_audit_hook(config_hook());
        break_outbox().await;
        assert!(store.commit(vec![Change::Put(object("r1"))], vec![draft("rule", "r1")]).await.is_err());
        assert!(store.load_all().await.unwrap().is_empty(), "the object change rolled back");
        assert!(store.list_audit(&AuditFilter::default(), &Page::default()).await.unwrap().items.is_empty());
        assert!(store.insert_activity(&[entry("d1", vec![event("h", "e1")])]).await.is_err());
        assert!(store.list_activity(&ActivityFilter::default(), &Page::default()).await.unwrap().items.is_empty());
        assert!(store.enqueue_events(&[event("h", "e2")]).await.is_err());

        // Writes without events do not touch the outbox.
        store.insert_activity(&[entry("d2", vec![])]).await.unwrap();
        let entries = store.commit(vec![], vec![draft("file", "policies/a.json")]).await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(store.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 1 });
        assert_eq!(store.outbox_depth().await.unwrap(), 0);
    }

    /// Pruning removes finished deliveries last changed before the cutoff.
    pub(crate) async fn prune_removes_finished_deliveries(store: &dyn Store) {
        store.enqueue_events(&[event("h", "e1"), event("h", "e2"), event("h", "e3")]).await.unwrap();
        let claimed = claim(store, "a", now_us(), 10).await;
        store.finish_delivery(claimed[0].id, &update(DeliveryState::Delivered, 1, Some(200), 0)).await.unwrap();
        store.finish_delivery(claimed[1].id, &update(DeliveryState::Failed, 8, Some(500), 0)).await.unwrap();
        store.insert_activity(&[entry("d1", vec![])]).await.unwrap();

        // Finished rows newer than the cutoff stay.
        let past = OffsetDateTime::now_utc() - time::Duration::days(1);
        assert_eq!(store.prune_activity(past).await.unwrap(), 0);
        assert_eq!(listed(store, "h", 10).await, ["e3", "e2", "e1"]);
        // Activity entries are what the count counts; pending rows stay however old.
        let future = OffsetDateTime::now_utc() + time::Duration::days(1);
        assert_eq!(store.prune_activity(future).await.unwrap(), 1);
        assert_eq!(listed(store, "h", 10).await, ["e3"]);
        assert_eq!(store.outbox_depth().await.unwrap(), 1);
    }
}
