//! Decisions go on when the database goes away: [`SpoolingStore`] wraps a store and,
//! when writing an activity batch fails because the store is unavailable, appends the
//! batch to a spool file in the data directory (fsynced, so still durable before the
//! answer) instead. A background task writes the spool to the store, in order, when it
//! answers again; entries are idempotent per `decision_id`, so a replay interrupted by
//! a crash and repeated inserts each entry exactly once.
//!
//! Architecture Invariant: while the spool holds entries, new batches go to the spool
//! too, so the store receives activity entries in the order they were answered.
//!
//! Webhook events of a decision ride in its entry ([`ActivityEntry::outbox`] is part of
//! the spool line), so a spooled decision's events reach the store's outbox in the same
//! write as the entry when the spool drains: none is lost or written twice. Every other
//! outbox method is forwarded as is: while the store is away the delivery worker finds
//! it unavailable and waits, and admin writes (which carry `config.changed` events) are
//! refused anyway.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use super::{
    ActivityEntry, ActivityFilter, ActivityRecord, ActivitySink, AuditDraft, AuditEntry, AuditFilter, AuditHook,
    Change, Delivery, DeliveryUpdate, Listing, OutboxEvent, Page, Store, StoreError, StoredObject, VerifyResult,
};

/// File name of the spool in the data directory.
pub const SPOOL_FILE_NAME: &str = "activity-spool.jsonl";

/// Entries written back per store transaction while draining.
const REPLAY_CHUNK: usize = 500;

/// A store whose activity writes survive the store being unavailable.
pub struct SpoolingStore {
    inner: Arc<dyn Store>,
    spool: Arc<Spool>,
}

/// The spool's state, shared with the activity sink (see [`Store::activity_sink`]).
struct Spool {
    path: PathBuf,
    /// Serializes spool appends and drains; holds the number of spooled entries.
    spooled: Mutex<u64>,
    /// Spooled entries, readable without the lock (metrics, readiness).
    depth: AtomicU64,
}

impl SpoolingStore {
    /// Wraps `inner`, spooling to `data_dir/activity-spool.jsonl`. Entries left in
    /// the spool by an earlier run are counted and drained by [`SpoolingStore::drain`].
    pub fn new(inner: Arc<dyn Store>, data_dir: &Path) -> Result<SpoolingStore, StoreError> {
        let path = data_dir.join(SPOOL_FILE_NAME);
        let existing = read_spool(&path)?.len() as u64;
        let spool = Spool { path, spooled: Mutex::new(existing), depth: AtomicU64::new(existing) };
        Ok(SpoolingStore { inner, spool: Arc::new(spool) })
    }

    /// Entries waiting in the spool.
    pub fn depth(&self) -> u64 {
        self.spool.depth.load(Ordering::Relaxed)
    }

    /// Writes spooled entries to the store, in order. Returns how many were written;
    /// stops at the first failure and keeps the rest.
    pub async fn drain(&self) -> Result<u64, StoreError> {
        let mut spooled = self.spool.spooled.lock().await;
        if *spooled == 0 {
            return Ok(0);
        }
        let entries = read_spool(&self.spool.path)?;
        let mut written = 0usize;
        for chunk in entries.chunks(REPLAY_CHUNK) {
            if let Err(e) = self.inner.insert_activity(chunk).await {
                if written > 0 {
                    rewrite_spool(&self.spool.path, entries.get(written..).unwrap_or_default())?;
                }
                *spooled = (entries.len() - written) as u64;
                self.spool.depth.store(*spooled, Ordering::Relaxed);
                return Err(e);
            }
            written += chunk.len();
        }
        rewrite_spool(&self.spool.path, &[])?;
        *spooled = 0;
        self.spool.depth.store(0, Ordering::Relaxed);
        tracing::info!(entries = written, "activity spool written to the store");
        Ok(written as u64)
    }

    /// Drains the spool every `every` until the process ends.
    pub fn spawn_drainer(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if this.depth() > 0 {
                    if let Err(e) = this.drain().await {
                        tracing::debug!(error = %e, spooled = this.depth(), "store still unavailable; activity stays spooled");
                    }
                }
            }
        })
    }
}

/// The activity sink of a [`SpoolingStore`] whose inner store has one: the same rules
/// as [`SpoolingStore`]'s `insert_activity`, on the activity writer's thread.
struct SpoolingSink {
    inner: Box<dyn ActivitySink>,
    spool: Arc<Spool>,
}

impl ActivitySink for SpoolingSink {
    fn insert(&mut self, batch: &[ActivityRecord]) -> Result<(), StoreError> {
        // This runs on the activity writer's own thread, never on the async runtime.
        let mut spooled = self.spool.spooled.blocking_lock();
        if *spooled == 0 {
            match self.inner.insert(batch) {
                Err(StoreError::Unavailable(reason)) => {
                    tracing::warn!(%reason, entries = batch.len(), "store unavailable; spooling activity entries");
                }
                other => return other,
            }
        }
        let entries = batch.iter().map(ActivityRecord::to_entry).collect::<Result<Vec<_>, _>>()?;
        append_spool(&self.spool.path, &entries)?;
        *spooled += batch.len() as u64;
        self.spool.depth.store(*spooled, Ordering::Relaxed);
        Ok(())
    }
}

fn spool_error(e: std::io::Error) -> StoreError {
    StoreError::Internal(format!("activity spool: {e}"))
}

/// Reads the spool; a torn last line (a crash mid-append, never acknowledged) is skipped.
fn read_spool(path: &Path) -> Result<Vec<ActivityEntry>, StoreError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(spool_error(e)),
    };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(spool_error)?;
        match serde_json::from_str::<ActivityEntry>(&line) {
            Ok(entry) => out.push(entry),
            Err(_) if line.trim().is_empty() => {}
            Err(e) => tracing::warn!(error = %e, "skipping an unreadable activity spool line"),
        }
    }
    Ok(out)
}

fn append_spool(path: &Path, batch: &[ActivityEntry]) -> Result<(), StoreError> {
    let mut text = String::new();
    for entry in batch {
        text.push_str(&serde_json::to_string(entry).map_err(|e| StoreError::Internal(e.to_string()))?);
        text.push('\n');
    }
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(spool_error)?;
    file.write_all(text.as_bytes()).map_err(spool_error)?;
    file.sync_all().map_err(spool_error)
}

/// Replaces the spool's content atomically (write a temp file, fsync, rename).
fn rewrite_spool(path: &Path, rest: &[ActivityEntry]) -> Result<(), StoreError> {
    let tmp = path.with_extension("jsonl.tmp");
    let _ = std::fs::remove_file(&tmp);
    append_spool(&tmp, rest)?;
    std::fs::rename(&tmp, path).map_err(spool_error)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[async_trait]
impl Store for SpoolingStore {
    async fn load_all(&self) -> Result<Vec<StoredObject>, StoreError> {
        self.inner.load_all().await
    }

    async fn commit(&self, changes: Vec<Change>, audit: Vec<AuditDraft>) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.commit(changes, audit).await
    }

    async fn last_file_hash(&self, file: &str) -> Result<Option<String>, StoreError> {
        self.inner.last_file_hash(file).await
    }

    async fn list_audit(&self, filter: &AuditFilter, page: &Page) -> Result<Listing<AuditEntry>, StoreError> {
        self.inner.list_audit(filter, page).await
    }

    async fn verify_audit(&self) -> Result<VerifyResult, StoreError> {
        self.inner.verify_audit().await
    }

    async fn insert_activity(&self, batch: &[ActivityEntry]) -> Result<(), StoreError> {
        let mut spooled = self.spool.spooled.lock().await;
        if *spooled == 0 {
            match self.inner.insert_activity(batch).await {
                Err(StoreError::Unavailable(reason)) => {
                    tracing::warn!(%reason, entries = batch.len(), "store unavailable; spooling activity entries");
                }
                other => return other,
            }
        }
        let path = self.spool.path.clone();
        let owned = batch.to_vec();
        tokio::task::spawn_blocking(move || append_spool(&path, &owned))
            .await
            .map_err(|e| StoreError::Internal(format!("activity spool task: {e}")))??;
        *spooled += batch.len() as u64;
        self.spool.depth.store(*spooled, Ordering::Relaxed);
        Ok(())
    }

    fn activity_sink(&self) -> Option<Box<dyn ActivitySink>> {
        let inner = self.inner.activity_sink()?;
        Some(Box::new(SpoolingSink { inner, spool: Arc::clone(&self.spool) }))
    }

    async fn list_activity(&self, filter: &ActivityFilter, page: &Page) -> Result<Listing<ActivityEntry>, StoreError> {
        self.inner.list_activity(filter, page).await
    }

    async fn prune_activity(&self, older_than: OffsetDateTime) -> Result<u64, StoreError> {
        self.inner.prune_activity(older_than).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn enqueue_events(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        self.inner.enqueue_events(events).await
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        now_us: i64,
        lease_us: i64,
        wants: &[(String, usize)],
    ) -> Result<Vec<Delivery>, StoreError> {
        self.inner.claim_deliveries(owner, now_us, lease_us, wants).await
    }

    async fn pending_webhooks(&self) -> Result<Vec<String>, StoreError> {
        self.inner.pending_webhooks().await
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
        self.inner.fail_pending_deliveries(webhook_id, now_us, due_before_us, last_status, error, limit).await
    }

    async fn finish_deliveries(&self, done: &[(i64, DeliveryUpdate)]) -> Result<(), StoreError> {
        self.inner.finish_deliveries(done).await
    }

    async fn release_claims(&self, owner: &str) -> Result<u64, StoreError> {
        self.inner.release_claims(owner).await
    }

    async fn list_deliveries(&self, webhook_id: &str, page: &Page) -> Result<Listing<Delivery>, StoreError> {
        self.inner.list_deliveries(webhook_id, page).await
    }

    async fn get_delivery(&self, webhook_id: &str, event_id: &str) -> Result<Option<Delivery>, StoreError> {
        self.inner.get_delivery(webhook_id, event_id).await
    }

    async fn retry_delivery(
        &self,
        webhook_id: &str,
        event_id: &str,
        now_us: i64,
        extra_attempts: u32,
    ) -> Result<Option<Delivery>, StoreError> {
        self.inner.retry_delivery(webhook_id, event_id, now_us, extra_attempts).await
    }

    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.inner.outbox_depth().await
    }

    fn set_audit_hook(&self, hook: AuditHook) {
        self.inner.set_audit_hook(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A store that is up or down at the test's command and remembers inserts.
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        fail_with: std::sync::Mutex<Option<StoreError>>,
        inserted: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Store for Flaky {
        async fn load_all(&self) -> Result<Vec<StoredObject>, StoreError> {
            Ok(Vec::new())
        }
        async fn commit(&self, _: Vec<Change>, _: Vec<AuditDraft>) -> Result<Vec<AuditEntry>, StoreError> {
            Ok(Vec::new())
        }
        async fn last_file_hash(&self, _: &str) -> Result<Option<String>, StoreError> {
            Ok(None)
        }
        async fn list_audit(&self, _: &AuditFilter, _: &Page) -> Result<Listing<AuditEntry>, StoreError> {
            Ok(Listing { items: Vec::new(), next_cursor: None })
        }
        async fn verify_audit(&self) -> Result<VerifyResult, StoreError> {
            Ok(VerifyResult::Ok { entries: 0 })
        }
        async fn insert_activity(&self, batch: &[ActivityEntry]) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            if let Some(e) = self.fail_with.lock().unwrap().clone() {
                return Err(e);
            }
            let mut inserted = self.inserted.lock().unwrap();
            for e in batch {
                if !inserted.contains(&e.decision_id) {
                    inserted.push(e.decision_id.clone());
                }
            }
            Ok(())
        }
        async fn list_activity(&self, _: &ActivityFilter, _: &Page) -> Result<Listing<ActivityEntry>, StoreError> {
            Ok(Listing { items: Vec::new(), next_cursor: None })
        }
        async fn prune_activity(&self, _: OffsetDateTime) -> Result<u64, StoreError> {
            Ok(0)
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn entry(id: &str) -> ActivityEntry {
        ActivityEntry {
            decision_id: id.into(),
            time: "2026-11-23T10:00:00.000000Z".into(),
            application: "app".into(),
            username: None,
            remote_ip: None,
            device_id: None,
            decision: "deny".into(),
            reason: "r".into(),
            policies: serde_json::json!([]),
            rules: serde_json::json!([]),
            latency_ms: 1.0,
            via: "api".into(),
            replica: "a".into(),
            outbox: Vec::new(),
        }
    }

    #[tokio::test]
    async fn spools_while_down_and_drains_in_order_once() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky::default());
        let store = SpoolingStore::new(flaky.clone(), dir.path()).unwrap();
        store.insert_activity(&[entry("1")]).await.unwrap();
        flaky.down.store(true, Ordering::SeqCst);
        store.insert_activity(&[entry("2"), entry("3")]).await.unwrap();
        flaky.down.store(false, Ordering::SeqCst);
        // The store is back, but the spool is not empty: order wins, this one queues.
        store.insert_activity(&[entry("4")]).await.unwrap();
        assert_eq!(store.depth(), 3);
        assert_eq!(*flaky.inserted.lock().unwrap(), vec!["1"]);
        // A restart finds the spool where it was.
        let store = SpoolingStore::new(flaky.clone(), dir.path()).unwrap();
        assert_eq!(store.depth(), 3);
        assert_eq!(store.drain().await.unwrap(), 3);
        assert_eq!(*flaky.inserted.lock().unwrap(), vec!["1", "2", "3", "4"]);
        assert_eq!(store.depth(), 0);
        // Draining again changes nothing; replays are idempotent per decision_id anyway.
        assert_eq!(store.drain().await.unwrap(), 0);
        store.insert_activity(&[entry("5")]).await.unwrap();
        assert_eq!(flaky.inserted.lock().unwrap().len(), 5);
    }

    /// The activity sink of a [`Flaky`] store.
    struct FlakySink(Arc<Flaky>);

    impl ActivitySink for FlakySink {
        fn insert(&mut self, batch: &[ActivityRecord]) -> Result<(), StoreError> {
            let entries = batch.iter().map(ActivityRecord::to_entry).collect::<Result<Vec<_>, _>>()?;
            futures::executor::block_on(self.0.insert_activity(&entries))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sink_spools_while_down_like_insert_activity() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky::default());
        let store = SpoolingStore::new(flaky.clone(), dir.path()).unwrap();
        // Flaky has no sink of its own, so neither has the spooling store around it.
        assert!(store.activity_sink().is_none());
        let mut sink = SpoolingSink { inner: Box::new(FlakySink(flaky.clone())), spool: store.spool.clone() };
        let record = |id: &str| ActivityRecord::from_entry(&entry(id)).unwrap();
        let flaky_for_thread = flaky.clone();
        // The sink blocks: run it off the runtime, as the activity writer's thread does.
        let sink = tokio::task::spawn_blocking(move || {
            sink.insert(&[record("1")]).unwrap();
            flaky_for_thread.down.store(true, Ordering::SeqCst);
            sink.insert(&[record("2"), record("3")]).unwrap();
            flaky_for_thread.down.store(false, Ordering::SeqCst);
            // Up again, but the spool holds entries: this one queues behind them.
            sink.insert(&[record("4")]).unwrap();
            sink
        })
        .await
        .unwrap();
        assert_eq!(store.depth(), 3);
        assert_eq!(*flaky.inserted.lock().unwrap(), vec!["1"]);
        assert_eq!(store.drain().await.unwrap(), 3);
        assert_eq!(*flaky.inserted.lock().unwrap(), vec!["1", "2", "3", "4"]);
        let mut sink = sink;
        tokio::task::spawn_blocking(move || sink.insert(&[record("5")])).await.unwrap().unwrap();
        assert_eq!(flaky.inserted.lock().unwrap().len(), 5);
        assert_eq!(store.depth(), 0);
    }

    #[tokio::test]
    async fn other_errors_are_not_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky::default());
        *flaky.fail_with.lock().unwrap() = Some(StoreError::Internal("bad row".into()));
        let store = SpoolingStore::new(flaky, dir.path()).unwrap();
        assert!(store.insert_activity(&[entry("1")]).await.is_err());
        assert_eq!(store.depth(), 0);
    }

    /// A real SQLite store behind a switch: while down, activity writes (through
    /// `insert_activity` or its sink) answer `Unavailable`.
    struct Switch {
        down: Arc<AtomicBool>,
        inner: crate::store::SqliteStore,
    }

    struct SwitchSink {
        down: Arc<AtomicBool>,
        inner: Box<dyn ActivitySink>,
    }

    impl ActivitySink for SwitchSink {
        fn insert(&mut self, batch: &[ActivityRecord]) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            self.inner.insert(batch)
        }
    }

    #[async_trait]
    impl Store for Switch {
        async fn load_all(&self) -> Result<Vec<StoredObject>, StoreError> {
            self.inner.load_all().await
        }
        async fn commit(&self, changes: Vec<Change>, audit: Vec<AuditDraft>) -> Result<Vec<AuditEntry>, StoreError> {
            self.inner.commit(changes, audit).await
        }
        async fn last_file_hash(&self, file: &str) -> Result<Option<String>, StoreError> {
            self.inner.last_file_hash(file).await
        }
        async fn list_audit(&self, filter: &AuditFilter, page: &Page) -> Result<Listing<AuditEntry>, StoreError> {
            self.inner.list_audit(filter, page).await
        }
        async fn verify_audit(&self) -> Result<VerifyResult, StoreError> {
            self.inner.verify_audit().await
        }
        async fn insert_activity(&self, batch: &[ActivityEntry]) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            self.inner.insert_activity(batch).await
        }
        fn activity_sink(&self) -> Option<Box<dyn ActivitySink>> {
            Some(Box::new(SwitchSink { down: self.down.clone(), inner: self.inner.activity_sink()? }))
        }
        async fn list_activity(
            &self,
            filter: &ActivityFilter,
            page: &Page,
        ) -> Result<Listing<ActivityEntry>, StoreError> {
            self.inner.list_activity(filter, page).await
        }
        async fn prune_activity(&self, older_than: OffsetDateTime) -> Result<u64, StoreError> {
            self.inner.prune_activity(older_than).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn list_deliveries(&self, webhook_id: &str, page: &Page) -> Result<Listing<Delivery>, StoreError> {
            self.inner.list_deliveries(webhook_id, page).await
        }
        async fn outbox_depth(&self) -> Result<u64, StoreError> {
            self.inner.outbox_depth().await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spooled_entries_keep_their_webhook_events_until_drained() {
        use crate::store::outbox_conformance::event;
        let dir = tempfile::tempdir().unwrap();
        let secrets = Arc::new(crate::secrets::SecretBox::from_key([9u8; 32]));
        let down = Arc::new(AtomicBool::new(true));
        let switch = Arc::new(Switch {
            down: down.clone(),
            inner: crate::store::SqliteStore::open(dir.path(), secrets).unwrap(),
        });
        let store = SpoolingStore::new(switch.clone(), dir.path()).unwrap();
        let with_events = |id: &str, events: Vec<OutboxEvent>| ActivityEntry { outbox: events, ..entry(id) };

        // Spooled through both paths while the store is down.
        store.insert_activity(&[with_events("1", vec![event("h", "e1")]), entry("2")]).await.unwrap();
        let mut sink = store.activity_sink().expect("SQLite's sink, wrapped");
        let record = ActivityRecord::from_entry(&with_events("3", vec![event("h", "e3"), event("g", "e3")])).unwrap();
        tokio::task::spawn_blocking(move || sink.insert(&[record])).await.unwrap().unwrap();
        assert_eq!(store.depth(), 3);
        assert_eq!(store.outbox_depth().await.unwrap(), 0);

        // The events are in the spool lines, and survive a restart.
        let spooled = read_spool(&dir.path().join(SPOOL_FILE_NAME)).unwrap();
        assert_eq!(spooled[0].outbox, [event("h", "e1")]);
        assert_eq!(spooled[2].outbox, [event("h", "e3"), event("g", "e3")]);
        let store = SpoolingStore::new(switch.clone(), dir.path()).unwrap();

        // Drained: each entry's events become deliveries, once.
        down.store(false, Ordering::SeqCst);
        assert_eq!(store.drain().await.unwrap(), 3);
        assert_eq!(store.outbox_depth().await.unwrap(), 3);
        let listed = store.list_deliveries("h", &Page::default()).await.unwrap();
        let ids: Vec<&str> = listed.items.iter().map(|d| d.event_id.as_str()).collect();
        assert_eq!(ids, ["e3", "e1"]);
        assert_eq!(listed.items[1].payload, event("h", "e1").payload);
        store.insert_activity(&spooled).await.unwrap();
        assert_eq!(store.outbox_depth().await.unwrap(), 3, "a replay adds nothing");
    }

    #[test]
    fn spool_lines_without_events_keep_their_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE_NAME);
        // A line as an earlier release wrote it, before entries had events.
        let line = serde_json::to_string(&entry("1")).unwrap();
        assert!(!line.contains("outbox"), "{line}");
        std::fs::write(&path, format!("{line}\n")).unwrap();
        assert_eq!(read_spool(&path).unwrap(), [entry("1")]);
    }
}
