//! The activity log's group-commit writer.
//!
//! A decision is answered only after its activity entry is durable (SPEC §8). One fsync
//! per decision would cap throughput at the disk's fsync rate, so entries are committed
//! in batches: callers enqueue on a bounded channel and wait on a oneshot; one writer task
//! takes the first queued entry plus whatever else is queued (up to `max_batch`), commits
//! them in one transaction, and answers every waiter. While a commit runs, new entries
//! queue up and form the next batch, so the busier verdict is, the bigger the batches.
//!
//! When the store offers a synchronous [`ActivitySink`] (SQLite does), the writer is a
//! dedicated OS thread that commits through it: a decision costs one channel send and one
//! oneshot wake-up, with no runtime task or `spawn_blocking` hop per batch. Otherwise the
//! writer is a task on the async runtime calling [`Store::insert_activity`].
//!
//! Architecture Invariant: an entry is never dropped silently. A full queue makes
//! callers wait (backpressure); a failed commit is reported to every waiter of the batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::store::{ActivityEntry, ActivityRecord, ActivitySink, Store, StoreError};

/// Upper bounds of the batch-size histogram buckets.
pub const BATCH_SIZE_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// Settings of an [`ActivityWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivityWriterConfig {
    /// Most entries committed in one transaction (at least 1).
    pub max_batch: usize,
    /// Entries that may wait in the queue before `record` callers wait for room (at least 1).
    pub queue_capacity: usize,
}

impl Default for ActivityWriterConfig {
    fn default() -> ActivityWriterConfig {
        ActivityWriterConfig { max_batch: 512, queue_capacity: 8192 }
    }
}

/// A snapshot of the writer's counters, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityStats {
    /// Entries accepted by `record` and not yet taken into a batch, including callers
    /// waiting for room in a full queue.
    pub queue_depth: u64,
    /// Entries accepted by `record` since start.
    pub accepted: u64,
    /// Batches committed successfully.
    pub batches: u64,
    /// Entries in successfully committed batches.
    pub entries: u64,
    /// Batches whose commit failed (their waiters got the error).
    pub failed_batches: u64,
    /// Size of the last batch, committed or not.
    pub last_batch_size: u64,
    /// Histogram of the sizes of all batches (committed or not), Prometheus style:
    /// `(upper bound, cumulative count)` for each of [`BATCH_SIZE_BUCKETS`]. The `+Inf`
    /// bucket is `batches + failed_batches`, and the sum of sizes is `batch_size_sum`.
    pub batch_size_buckets: Vec<(u64, u64)>,
    /// Sum of the sizes of all batches, committed or not.
    pub batch_size_sum: u64,
}

#[derive(Debug, Default)]
struct Counters {
    queue_depth: AtomicU64,
    accepted: AtomicU64,
    batches: AtomicU64,
    entries: AtomicU64,
    failed_batches: AtomicU64,
    last_batch_size: AtomicU64,
    batch_size_sum: AtomicU64,
    /// Per bucket, not cumulative; a batch over the last bound is counted in none.
    buckets: [AtomicU64; BATCH_SIZE_BUCKETS.len()],
}

impl Counters {
    fn record_batch(&self, size: usize, ok: bool) {
        let size = u64::try_from(size).unwrap_or(u64::MAX);
        if ok {
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.entries.fetch_add(size, Ordering::Relaxed);
        } else {
            self.failed_batches.fetch_add(1, Ordering::Relaxed);
        }
        self.last_batch_size.store(size, Ordering::Relaxed);
        self.batch_size_sum.fetch_add(size, Ordering::Relaxed);
        if let Some(i) = BATCH_SIZE_BUCKETS.iter().position(|&bound| size <= bound) {
            if let Some(bucket) = self.buckets.get(i) {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> ActivityStats {
        let mut cumulative = 0;
        let batch_size_buckets = BATCH_SIZE_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, count)| {
                cumulative += count.load(Ordering::Relaxed);
                (bound, cumulative)
            })
            .collect();
        ActivityStats {
            queue_depth: self.queue_depth.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            last_batch_size: self.last_batch_size.load(Ordering::Relaxed),
            batch_size_buckets,
            batch_size_sum: self.batch_size_sum.load(Ordering::Relaxed),
        }
    }
}

struct Job {
    record: ActivityRecord,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

struct Shared {
    /// `None` once shut down. Dropping the last sender is what tells the writer task to
    /// drain and stop.
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    counters: Arc<Counters>,
    done: watch::Receiver<bool>,
}

/// Handle to the group-commit writer; cheap to clone.
#[derive(Clone)]
pub struct ActivityWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ActivityWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityWriter").field("stats", &self.stats()).finish()
    }
}

/// Undoes the queue-depth increment of a `record` call that never got its entry into the
/// queue (channel closed, or the caller's future dropped while waiting for room).
struct DepthGuard<'a> {
    depth: &'a AtomicU64,
    armed: bool,
}

impl Drop for DepthGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.depth.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ActivityWriter {
    /// Starts the writer: a dedicated thread when the store has an [`ActivitySink`],
    /// else a task (then it must be called from within a tokio runtime).
    pub fn start(store: Arc<dyn Store>, cfg: ActivityWriterConfig) -> ActivityWriter {
        let max_batch = cfg.max_batch.max(1);
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let (done_tx, done_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        // The writer holds only the counters, not `Shared`: when every handle is dropped
        // the sender goes with them and the writer drains and ends by itself.
        let mut sender = Some(tx);
        match store.activity_sink() {
            Some(sink) => {
                let thread_counters = Arc::clone(&counters);
                let spawned = std::thread::Builder::new()
                    .name("verdict-activity".into())
                    .spawn(move || run_thread(sink, rx, max_batch, thread_counters, done_tx));
                if let Err(e) = spawned {
                    // Nothing can be recorded, so nothing may be decided: every `record`
                    // fails and decisions answer 503.
                    tracing::error!(error = %e, "cannot start the activity writer thread; decisions will be refused");
                    sender = None;
                }
            }
            None => {
                tokio::spawn(run(store, rx, max_batch, Arc::clone(&counters), done_tx));
            }
        }
        ActivityWriter { shared: Arc::new(Shared { sender: Mutex::new(sender), counters, done: done_rx }) }
    }

    /// Queues `entry` and resolves once the batch holding it is committed (durable), or
    /// with the commit's error. Waits while the queue is full.
    ///
    /// An entry whose `time` is not RFC 3339 is refused here, so it cannot fail the
    /// batch it would have joined.
    pub async fn record(&self, entry: ActivityEntry) -> Result<(), StoreError> {
        self.record_prepared(ActivityRecord::from_entry(&entry)?).await
    }

    /// [`ActivityWriter::record`] for an entry already encoded (the decision path builds
    /// its record directly; its `time` and `time_us` must agree).
    pub async fn record_prepared(&self, record: ActivityRecord) -> Result<(), StoreError> {
        let sender = self
            .shared
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::Unavailable("activity writer is shut down".into()))?;
        let counters = &self.shared.counters;
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        counters.queue_depth.fetch_add(1, Ordering::Relaxed);
        let mut guard = DepthGuard { depth: &counters.queue_depth, armed: true };
        let (reply, answer) = oneshot::channel();
        if sender.send(Job { record, reply }).await.is_err() {
            return Err(StoreError::Unavailable("activity writer stopped".into()));
        }
        // Queued: the writer task decrements the depth when it takes the entry.
        guard.armed = false;
        drop(sender);
        answer.await.map_err(|_| StoreError::Internal("activity writer stopped before committing the entry".into()))?
    }

    /// Stops accepting entries, commits everything already queued (including entries of
    /// `record` calls waiting for room), and returns when the writer task has finished.
    pub async fn shutdown(&self) {
        let sender = self.shared.sender.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(sender);
        let mut done = self.shared.done.clone();
        // An error means the task is gone without saying so (it panicked): nothing to wait for.
        let _ = done.wait_for(|finished| *finished).await;
    }

    /// The writer's counters.
    pub fn stats(&self) -> ActivityStats {
        self.shared.counters.snapshot()
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    counters: Arc<Counters>,
    done: watch::Sender<bool>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(max_batch);
    // recv_many waits for the first entry, then takes whatever else is queued, up to
    // max_batch, without waiting; 0 means every sender is gone and the queue is empty.
    while rx.recv_many(&mut jobs, max_batch).await > 0 {
        let size = jobs.len();
        counters.queue_depth.fetch_sub(u64::try_from(size).unwrap_or(0), Ordering::Relaxed);
        let (records, replies): (Vec<ActivityRecord>, Vec<_>) =
            jobs.drain(..).map(|job| (job.record, job.reply)).unzip();
        // Committed in its own task so a panicking store fails this batch's waiters
        // instead of killing the writer.
        let store_for_batch = Arc::clone(&store);
        let result = match tokio::spawn(async move {
            let entries = records.iter().map(ActivityRecord::to_entry).collect::<Result<Vec<ActivityEntry>, _>>()?;
            store_for_batch.insert_activity(&entries).await
        })
        .await
        {
            Ok(result) => result,
            Err(e) => Err(StoreError::Internal(format!("activity commit task failed: {e}"))),
        };
        counters.record_batch(size, result.is_ok());
        if let Err(e) = &result {
            tracing::error!(error = %e, entries = size, "activity batch commit failed");
        }
        for reply in replies {
            // A caller that stopped waiting does not care; its entry is committed anyway.
            let _ = reply.send(result.clone());
        }
    }
    let _ = done.send(true);
}

/// The writer on its own thread: takes the first queued entry plus whatever else is
/// queued (up to `max_batch`), commits them through the sink, answers the waiters, and
/// ends once every sender is gone and the queue is drained.
fn run_thread(
    mut sink: Box<dyn ActivitySink>,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    counters: Arc<Counters>,
    done: watch::Sender<bool>,
) {
    let mut records: Vec<ActivityRecord> = Vec::with_capacity(max_batch);
    let mut replies: Vec<oneshot::Sender<Result<(), StoreError>>> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        let mut job = Some(first);
        while let Some(Job { record, reply }) = job.take() {
            records.push(record);
            replies.push(reply);
            if records.len() < max_batch {
                job = rx.try_recv().ok();
            }
        }
        let size = records.len();
        counters.queue_depth.fetch_sub(u64::try_from(size).unwrap_or(0), Ordering::Relaxed);
        // A panicking store fails this batch's waiters instead of killing the writer.
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink.insert(&records))) {
            Ok(result) => result,
            Err(_) => Err(StoreError::Internal("activity commit panicked".into())),
        };
        counters.record_batch(size, result.is_ok());
        if let Err(e) = &result {
            tracing::error!(error = %e, entries = size, "activity batch commit failed");
        }
        for reply in replies.drain(..) {
            // A caller that stopped waiting does not care; its entry is committed anyway.
            let _ = reply.send(result.clone());
        }
        // Freed after the waiters are answered, off their path.
        records.clear();
    }
    let _ = done.send(true);
}

/// Prunes activity entries older than `retention_days` now and then every `every`
/// (a zero `every` is taken as one hour). `retention_days == 0` keeps entries forever:
/// the task ends at once.
pub fn spawn_retention(store: Arc<dyn Store>, retention_days: u32, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        if retention_days == 0 {
            return;
        }
        let every = if every.is_zero() { Duration::from_secs(3600) } else { every };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let cutoff = OffsetDateTime::now_utc() - time::Duration::days(i64::from(retention_days));
            match store.prune_activity(cutoff).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(removed, retention_days, "pruned old activity entries")
                }
                Err(e) => tracing::warn!(error = %e, "pruning activity entries failed; will retry"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::SecretBox;
    use crate::store::{format_time, ActivityFilter, Page, SqliteStore};
    use serde_json::json;

    fn open(dir: &std::path::Path) -> Arc<SqliteStore> {
        let secrets = Arc::new(SecretBox::from_key([3u8; 32]));
        Arc::new(SqliteStore::open(dir, secrets).unwrap())
    }

    fn entry(i: usize, time: OffsetDateTime) -> ActivityEntry {
        ActivityEntry {
            decision_id: format!("d-{i:05}"),
            time: format_time(time),
            application: "payroll".into(),
            username: Some("alice".into()),
            remote_ip: None,
            device_id: None,
            decision: "allow".into(),
            reason: "policy p1 allowed".into(),
            policies: json!([{"id": "p1", "decision": "allow"}]),
            rules: json!([{"rule_id": "r1", "outcome": "allow"}]),
            latency_ms: 0.7,
            via: "forward-auth".into(),
            replica: "r-1".into(),
            outbox: Vec::new(),
        }
    }

    async fn count(store: &SqliteStore) -> usize {
        let page = Page { limit: 1000, cursor: None };
        let listing = store.list_activity(&ActivityFilter::default(), &page).await.unwrap();
        assert!(listing.next_cursor.is_none());
        listing.items.len()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_are_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let writer = ActivityWriter::start(store.clone(), ActivityWriterConfig::default());
        let now = OffsetDateTime::now_utc();
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.record(entry(i, now)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(count(&store).await, 500);
        let stats = writer.stats();
        assert_eq!(stats.entries, 500);
        assert_eq!(stats.accepted, 500);
        assert_eq!(stats.queue_depth, 0);
        assert_eq!(stats.failed_batches, 0);
        assert!(stats.batches < stats.entries, "no batching happened: {stats:?}");
        assert_eq!(stats.batch_size_sum, 500);
        assert_eq!(stats.batch_size_buckets.len(), BATCH_SIZE_BUCKETS.len());
        assert_eq!(stats.batch_size_buckets.last().map(|b| b.1), Some(stats.batches));
        assert!(stats.batch_size_buckets.windows(2).all(|w| w[0].1 <= w[1].1));

        // Recording a known decision_id again succeeds and adds nothing.
        writer.record(entry(7, now)).await.unwrap();
        assert_eq!(count(&store).await, 500);
        writer.shutdown().await;
    }

    #[tokio::test]
    async fn small_batches_and_tiny_queue_apply_backpressure_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let cfg = ActivityWriterConfig { max_batch: 4, queue_capacity: 2 };
        let writer = ActivityWriter::start(store.clone(), cfg);
        let now = OffsetDateTime::now_utc();
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.record(entry(i, now)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(count(&store).await, 50);
        let stats = writer.stats();
        assert!(stats.last_batch_size <= 4);
        // No batch over max_batch: everything is in the buckets up to 4.
        assert_eq!(stats.batch_size_buckets[2].1, stats.batches);
        writer.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_flushes_queued_entries_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let writer = ActivityWriter::start(store.clone(), ActivityWriterConfig::default());
        let now = OffsetDateTime::now_utc();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.record(entry(i, now)).await })
            })
            .collect();
        // Wait until every call is past the shut-down check; most are still queued.
        while writer.stats().accepted < 200 {
            tokio::task::yield_now().await;
        }
        writer.shutdown().await;
        assert_eq!(count(&store).await, 200);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let stats = writer.stats();
        assert_eq!(stats.entries, 200);
        assert_eq!(stats.queue_depth, 0);

        let late = writer.record(entry(999, now)).await;
        assert!(matches!(late, Err(StoreError::Unavailable(_))), "{late:?}");
        // A second shutdown returns at once.
        writer.shutdown().await;
    }

    #[tokio::test]
    async fn failed_commit_reaches_every_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let writer = ActivityWriter::start(store.clone(), ActivityWriterConfig::default());
        let now = OffsetDateTime::now_utc();
        writer.record(entry(0, now)).await.unwrap();

        // Break the real database underneath the store.
        let raw = rusqlite::Connection::open(store.path()).unwrap();
        raw.execute_batch("DROP TABLE activity").unwrap();
        let tasks: Vec<_> = (1..20)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.record(entry(i, now)).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().is_err());
        }
        let stats = writer.stats();
        assert!(stats.failed_batches >= 1);
        assert_eq!(stats.entries, 1);

        // A malformed time is refused up front, for its caller only.
        let bad = ActivityEntry { time: "not a time".into(), ..entry(50, now) };
        assert!(matches!(writer.record(bad).await, Err(StoreError::Internal(_))));
        writer.shutdown().await;
    }

    /// The store without its activity sink: the writer falls back to a runtime task
    /// calling `insert_activity`, as it does for a store that has no sink.
    struct WithoutSink(Arc<SqliteStore>);

    #[async_trait::async_trait]
    impl Store for WithoutSink {
        async fn load_all(&self) -> Result<Vec<crate::store::StoredObject>, StoreError> {
            self.0.load_all().await
        }
        async fn commit(
            &self,
            changes: Vec<crate::store::Change>,
            audit: Vec<crate::store::AuditDraft>,
        ) -> Result<Vec<crate::store::AuditEntry>, StoreError> {
            self.0.commit(changes, audit).await
        }
        async fn last_file_hash(&self, file: &str) -> Result<Option<String>, StoreError> {
            self.0.last_file_hash(file).await
        }
        async fn list_audit(
            &self,
            filter: &crate::store::AuditFilter,
            page: &Page,
        ) -> Result<crate::store::Listing<crate::store::AuditEntry>, StoreError> {
            self.0.list_audit(filter, page).await
        }
        async fn verify_audit(&self) -> Result<crate::store::VerifyResult, StoreError> {
            self.0.verify_audit().await
        }
        async fn insert_activity(&self, batch: &[ActivityEntry]) -> Result<(), StoreError> {
            self.0.insert_activity(batch).await
        }
        async fn list_activity(
            &self,
            filter: &ActivityFilter,
            page: &Page,
        ) -> Result<crate::store::Listing<ActivityEntry>, StoreError> {
            self.0.list_activity(filter, page).await
        }
        async fn prune_activity(&self, older_than: OffsetDateTime) -> Result<u64, StoreError> {
            self.0.prune_activity(older_than).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.0.ping().await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_without_a_sink_is_written_from_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let wrapped: Arc<dyn Store> = Arc::new(WithoutSink(store.clone()));
        assert!(wrapped.activity_sink().is_none());
        let writer = ActivityWriter::start(wrapped, ActivityWriterConfig::default());
        let now = OffsetDateTime::now_utc();
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.record(entry(i, now)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(count(&store).await, 100);
        let listed = store.list_activity(&ActivityFilter::default(), &Page::default()).await.unwrap();
        assert!(listed.items.contains(&entry(42, now)), "entries round-trip through the records");
        assert_eq!(writer.stats().entries, 100);
        writer.shutdown().await;
        let late = writer.record(entry(999, now)).await;
        assert!(matches!(late, Err(StoreError::Unavailable(_))), "{late:?}");
    }

    #[tokio::test]
    async fn retention_prunes_old_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let now = OffsetDateTime::now_utc();
        store
            .insert_activity(&[
                entry(1, now - time::Duration::days(40)),
                entry(2, now - time::Duration::days(29)),
                entry(3, now),
            ])
            .await
            .unwrap();
        let handle = spawn_retention(store.clone(), 30, Duration::from_secs(3600));
        // The first prune runs at once; wait for it without a fixed sleep.
        for _ in 0..500 {
            if count(&store).await == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        handle.abort();
        let page = Page { limit: 10, cursor: None };
        let left = store.list_activity(&ActivityFilter::default(), &page).await.unwrap();
        let ids: Vec<_> = left.items.iter().map(|e| e.decision_id.as_str()).collect();
        assert_eq!(ids, vec!["d-00003", "d-00002"]);

        // 0 days keeps everything: the task ends without pruning.
        spawn_retention(store.clone(), 0, Duration::ZERO).await.unwrap();
        assert_eq!(count(&store).await, 2);
    }
}
