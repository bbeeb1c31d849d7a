//! Delivery: one call per (webhook, event), signed, retried with backoff until it is
//! delivered or fails for good.
//!
//! The worker keeps up to `concurrency` calls in flight. It claims due deliveries
//! from the store (a lease, so a replica that dies mid-call leaves them to others, and
//! on PostgreSQL `FOR UPDATE SKIP LOCKED`, so each event goes out from one replica),
//! sends them, and writes each result back. It wakes when events are recorded and
//! otherwise every `poll_ms`. A dead or slow receiver costs only its own slots and the
//! rows waiting in the store: the outbox is never held in memory.
//!
//! A receiver that fails (no answer, 408, 429, 5xx) cools its whole webhook down:
//! claims stop naming it (so its waiting rows are not read, let alone rewritten), and
//! when the cool-down ends one claimed row is the probe. Rows overdue by more than their
//! whole retry schedule meanwhile fail, in short writes off the loop.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::Sha256;
use tokio::task::JoinSet;

use super::{EventType, Webhook, Webhooks};
use crate::config::WebhookSettings;
use crate::metrics::Metrics;
use crate::outbound::{CallMode, Outbound};
use crate::rule::{RenderedBody, RenderedRequest};
use crate::store::{
    fail_pending_in_chunks, parse_time, unix_micros, Delivery, DeliveryState, DeliveryUpdate, Store, StoreError,
};

/// How much of a receiver's answer a test call shows.
const TEST_BODY_BYTES: usize = 4096;
/// Longest `last_error` kept.
const MAX_ERROR_CHARS: usize = 300;
/// Extra lease beyond the webhook's timeout.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// How long an event for a webhook this replica does not know is kept pending (it may
/// have been created on another replica a moment ago) before it fails.
const UNKNOWN_GRACE: Duration = Duration::from_secs(30);
/// Rows claimed at once, per call slot.
const CLAIM_FACTOR: usize = 4;
/// After a claim that found less than it asked for, the next one waits this long.
const CLAIM_PAUSE: Duration = Duration::from_millis(50);
/// Longest pause of a failing webhook: a receiver that comes back is probed at least
/// this often.
const MAX_COOL_DOWN: Duration = Duration::from_secs(60);
/// Most attempt results recorded in one store write.
const MAX_RESULT_BATCH: usize = 512;
/// How often a failing webhook's overdue rows are looked for.
const GIVE_UP_EVERY: Duration = Duration::from_secs(5);
/// The outbox depth is refreshed at most once per this many times its count took.
const DEPTH_BUDGET_FACTOR: u32 = 20;
/// How often pending events of webhooks this replica does not know are looked for.
const ORPHAN_SWEEP: Duration = Duration::from_secs(60);

/// The result of one call.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub status: Option<u16>,
    pub body: Option<bytes::Bytes>,
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
    pub latency: Duration,
}

impl Attempt {
    /// What the attempt means for the delivery.
    pub fn verdict(&self) -> AttemptVerdict {
        match self.status {
            Some(s) if (200..300).contains(&s) => AttemptVerdict::Delivered,
            Some(408 | 429) => AttemptVerdict::Retry,
            Some(s) if s >= 500 => AttemptVerdict::Retry,
            Some(_) => AttemptVerdict::Failed,
            None => AttemptVerdict::Retry,
        }
    }
}

/// Delivered; try again later; or give up now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptVerdict {
    Delivered,
    Retry,
    Failed,
}

/// What `POST /v1/webhooks/{id}/test` answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TestAnswer {
    pub event_id: String,
    /// Whether the receiver answered 2xx.
    pub delivered: bool,
    /// The receiver's status, `null` when no answer came.
    pub status: Option<u16>,
    pub latency_ms: f64,
    /// The first 4 KiB of the answer (lossy UTF-8).
    pub body: Option<String>,
    /// Why no answer came.
    pub error: Option<String>,
}

/// `X-Verdict-Signature` for `body` at unix time `t`: `t=<t>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>">`, keyed with the UTF-8 bytes of the signing secret.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The delay before attempt `attempts + 1` after `attempts` failed ones: `base`
/// doubled per attempt, or the receiver's `Retry-After`, at most `max`.
pub fn backoff(attempts: u32, base: Duration, retry_after: Option<Duration>, max: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let delay = retry_after.unwrap_or_else(|| base.saturating_mul(1u32 << exp));
    delay.min(max)
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate(value)?;
    let now = time::OffsetDateTime::now_utc();
    Some(if when > now { (when - now).unsigned_abs() } else { Duration::ZERO })
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn httpdate(value: &str) -> Option<time::OffsetDateTime> {
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(value, &fmt).ok().map(|t| t.assume_utc())
}

/// Metrics of delivery.
struct DeliveryMetrics {
    deliveries: IntCounterVec,
    latency: HistogramVec,
    depth: IntGauge,
}

impl DeliveryMetrics {
    fn new(metrics: &Metrics) -> DeliveryMetrics {
        let deliveries = IntCounterVec::new(
            Opts::new(
                "verdict_webhook_deliveries_total",
                "Webhook delivery attempts by webhook and result: delivered, retry (will be tried again), failed",
            ),
            &["webhook", "state"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let latency = HistogramVec::new(
            HistogramOpts::new("verdict_webhook_delivery_seconds", "Webhook call latency")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["webhook"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let depth = IntGauge::new("verdict_webhook_outbox_depth", "Webhook deliveries pending in the outbox")
            .unwrap_or_else(|e| unreachable!("{e}"));
        for c in [
            Box::new(deliveries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(depth.clone()),
        ] {
            if let Err(e) = metrics.registry().register(c) {
                tracing::warn!(error = %e, "webhook metrics not registered");
            }
        }
        DeliveryMetrics { deliveries, latency, depth }
    }
}

/// Sends events to webhooks and runs the delivery loop.
pub struct Deliverer {
    webhooks: Arc<Webhooks>,
    store: Arc<dyn Store>,
    outbound: Arc<dyn Outbound>,
    settings: WebhookSettings,
    owner: String,
    metrics: DeliveryMetrics,
}

impl Deliverer {
    /// A deliverer for the webhooks in force; `owner` names this replica's claims.
    pub fn new(
        webhooks: Arc<Webhooks>,
        store: Arc<dyn Store>,
        outbound: Arc<dyn Outbound>,
        settings: WebhookSettings,
        owner: &str,
        metrics: &Metrics,
    ) -> Arc<Deliverer> {
        Arc::new(Deliverer {
            webhooks,
            store,
            outbound,
            settings,
            owner: owner.to_owned(),
            metrics: DeliveryMetrics::new(metrics),
        })
    }

    /// One signed call of `payload` to `hook`, within its timeout.
    pub async fn send(&self, hook: &Webhook, event_id: &str, event_type: &str, payload: &str) -> Attempt {
        let started = Instant::now();
        let body = match with_body_params(payload, &hook.body_params) {
            Ok(b) => b,
            Err(e) => {
                return Attempt {
                    status: None,
                    body: None,
                    error: Some(e),
                    retry_after: None,
                    latency: started.elapsed(),
                }
            }
        };
        let t = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut headers = hook.headers.clone();
        headers.push((reqwest::header::HeaderName::from_static("x-verdict-event-id"), event_id.to_owned()));
        headers.push((reqwest::header::HeaderName::from_static("x-verdict-event-type"), event_type.to_owned()));
        headers.push((
            reqwest::header::HeaderName::from_static("x-verdict-signature"),
            signature(hook.signing_secret.expose(), t, &body),
        ));
        let request = RenderedRequest {
            method: hook.method.clone(),
            url: hook.url.clone(),
            headers,
            body: Some(RenderedBody { content_type: "application/json", bytes: body }),
        };
        let result =
            tokio::time::timeout(hook.timeout, self.outbound.send(&request, &hook.auth, CallMode::Decision)).await;
        let latency = started.elapsed();
        self.metrics.latency.with_label_values(&[&hook.id]).observe(latency.as_secs_f64());
        match result {
            Ok(Ok(resp)) => {
                let retry_after = resp
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                    .and_then(|(_, v)| parse_retry_after(v));
                Attempt { status: Some(resp.status), body: Some(resp.body), error: None, retry_after, latency }
            }
            Ok(Err(e)) => Attempt { status: None, body: None, error: Some(e.to_string()), retry_after: None, latency },
            Err(_) => Attempt {
                status: None,
                body: None,
                error: Some(format!("timed out after {} ms", hook.timeout.as_millis())),
                retry_after: None,
                latency,
            },
        }
    }

    /// The test call: a `WebhookTest` event sent now, not through the outbox.
    pub async fn test(&self, hook: &Webhook) -> TestAnswer {
        let (event_id, payload) = self.webhooks.test_event(hook);
        let attempt = self.send(hook, &event_id, EventType::WebhookTest.as_str(), &payload).await;
        TestAnswer {
            delivered: attempt.verdict() == AttemptVerdict::Delivered,
            event_id,
            status: attempt.status,
            latency_ms: (attempt.latency.as_secs_f64() * 100_000.0).round() / 100.0,
            body: attempt
                .body
                .as_ref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(TEST_BODY_BYTES)]).into_owned()),
            error: attempt.error,
        }
    }

    /// Runs the delivery loop forever (spawn it).
    pub async fn run(self: Arc<Self>) {
        match self.store.release_claims(&self.owner).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(deliveries = n, "re-sending webhook deliveries that were in flight at the last stop")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not release this replica's earlier claims; they expire with their lease")
            }
        }
        let poll = Duration::from_millis(self.settings.poll_ms);
        let slots = self.settings.concurrency;
        // Results go to one writer that records them in batches: one commit for all
        // the calls that finished meanwhile, not one per event.
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(self.clone().record_results(done_rx));
        let mut in_flight: JoinSet<(String, Reach)> = JoinSet::new();
        // Claimed rows waiting for a slot (one claim serves several calls), with when
        // they were claimed.
        let mut backlog: VecDeque<(Delivery, Instant)> = VecDeque::new();
        let mut health: HashMap<String, Health> = HashMap::new();
        // Background writes failing a webhook's overdue rows, at most one per webhook.
        let mut give_ups: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut next_sweep = Instant::now();
        let mut next_depth = Instant::now();
        let mut next_claim = Instant::now();
        loop {
            while let Some(joined) = in_flight.try_join_next() {
                if let Ok((hook, reach)) = joined {
                    if let Some(failing) = self.observe(&mut health, &hook, reach) {
                        self.on_failure(&failing, &mut backlog, &done_tx);
                    }
                }
            }
            self.hand_back_stale(&mut backlog, &done_tx);
            self.give_up_overdue(&mut health, &mut give_ups);
            if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + ORPHAN_SWEEP;
                tokio::spawn(self.clone().sweep_orphans());
            }
            self.dispatch(&mut backlog, &mut health, &mut in_flight, slots, &done_tx);
            let mut more_due = false;
            if in_flight.len() < slots && backlog.len() < slots * CLAIM_FACTOR && Instant::now() >= next_claim {
                // Nothing in the backlog can go: claim more, naming only the webhooks
                // that may be called now (a share each; one row for a probe).
                let now = Instant::now();
                let want = slots * CLAIM_FACTOR - backlog.len();
                let wants = self.wants(want, &mut health, &backlog);
                match self.claim(&wants).await {
                    Ok(deliveries) => {
                        // A webhook that filled its share may have more due.
                        more_due = wants
                            .iter()
                            .any(|(hook, n)| deliveries.iter().filter(|d| &d.webhook_id == hook).count() >= *n);
                        if !more_due {
                            // Nothing more is due: new events are claimed after a short
                            // pause, not on every wake-up, so a busy decision path never
                            // drives a claim each.
                            next_claim = now + CLAIM_PAUSE;
                        }
                        backlog.extend(deliveries.into_iter().map(|d| (d, now)));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the webhook outbox; retrying");
                        next_claim = now + poll;
                    }
                }
                self.dispatch(&mut backlog, &mut health, &mut in_flight, slots, &done_tx);
            }
            if Instant::now() >= next_depth {
                // Counting pending rows reads the whole due index: with a receiver down
                // for minutes that is a million entries. Refreshed every `poll_ms`, but
                // never spending more than ~5% of a core on it.
                let started = Instant::now();
                if let Ok(depth) = self.store.outbox_depth().await {
                    self.metrics.depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
                }
                next_depth = Instant::now() + poll.max(started.elapsed() * DEPTH_BUDGET_FACTOR);
            }
            if more_due && in_flight.len() < slots {
                continue;
            }
            // Wake for new events, a finished call, the end of a cool-down, or the poll.
            let now = Instant::now();
            let nap = health
                .values()
                .filter_map(|h| h.cool_until)
                .chain([next_claim])
                .filter(|t| *t > now)
                .map(|t| t - now)
                .fold(poll, Duration::min);
            tokio::select! {
                _ = self.webhooks.wake.notified() => {}
                _ = tokio::time::sleep(nap) => {}
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok((hook, reach)) = joined {
                        if let Some(failing) = self.observe(&mut health, &hook, reach) {
                            self.on_failure(&failing, &mut backlog, &done_tx);
                        }
                    }
                }
            }
        }
    }

    /// Learns from a finished call whether the webhook's receiver answers: a failure
    /// cools the whole webhook down (base doubled per failure in a row, or the
    /// receiver's `Retry-After`), so a dead receiver is probed at that pace instead of
    /// once per pending event. Returns the webhook when this failure starts a cool-down.
    fn observe(&self, health: &mut HashMap<String, Health>, hook: &str, reach: Reach) -> Option<String> {
        let h = health.entry(hook.to_owned()).or_default();
        h.in_flight = h.in_flight.saturating_sub(1);
        let mut started = None;
        match reach {
            Reach::Up => {
                if h.failures > 0 {
                    tracing::info!(webhook = %hook, "webhook receiver answers again; sending what waited");
                }
                h.failures = 0;
                h.cool_until = None;
                self.webhooks.set_failing(hook, None);
            }
            Reach::Down { retry_after, status, error } => {
                let now = Instant::now();
                // Calls that were in flight together and fail together count once.
                let starts = h.cool_until.is_none_or(|t| t <= now);
                if starts {
                    h.failures = h.failures.saturating_add(1);
                }
                let pause = backoff(
                    h.failures,
                    Duration::from_millis(self.settings.backoff_base_ms),
                    retry_after,
                    Duration::from_secs(self.settings.max_backoff_s).min(MAX_COOL_DOWN),
                );
                h.cool_until = h.cool_until.max(Some(now + pause));
                let next_probe = time::OffsetDateTime::now_utc() + h.cool_until.map_or(pause, |t| t - now);
                self.webhooks.set_failing(hook, Some(super::Failing { status, error, next_probe }));
                if starts {
                    started = Some(hook.to_owned());
                }
            }
            Reach::NotCalled => {}
        }
        if h.in_flight == 0 && h.failures == 0 {
            health.remove(hook);
        }
        started
    }

    /// What the next claim asks for: a share of `want` for each enabled webhook that
    /// may be called now, one row for a webhook whose cool-down is over (its probe),
    /// nothing for one cooling down or probing. A webhook changed since its failures
    /// (a fixed URL, new credentials) starts afresh.
    fn wants(
        &self,
        want: usize,
        health: &mut HashMap<String, Health>,
        backlog: &VecDeque<(Delivery, Instant)>,
    ) -> Vec<(String, usize)> {
        let set = self.webhooks.current();
        // Forget deleted webhooks (once nothing of theirs is in flight).
        health.retain(|id, h| {
            let keep = h.in_flight > 0 || set.hooks.contains_key(id);
            if !keep {
                self.webhooks.set_failing(id, None);
            }
            keep
        });
        let now = Instant::now();
        let (mut open, mut probes) = (Vec::new(), Vec::new());
        for hook in set.hooks.values().filter(|h| h.enabled) {
            let Some(h) = health.get_mut(&hook.id) else {
                open.push(hook.id.clone());
                continue;
            };
            if h.version != hook.version {
                if h.version != 0 {
                    h.failures = 0;
                    h.cool_until = None;
                    self.webhooks.set_failing(&hook.id, None);
                }
                h.version = hook.version;
            }
            if h.paused(now) {
                continue;
            }
            if h.failures == 0 {
                open.push(hook.id.clone());
            } else if !backlog.iter().any(|(d, _)| d.webhook_id == hook.id) {
                probes.push((hook.id.clone(), 1));
            }
        }
        let share = want.div_ceil(open.len().max(1));
        open.into_iter().map(|id| (id, share)).chain(probes).collect()
    }

    /// A webhook started failing: its rows in this loop's backlog go back to the store
    /// (due as they were, no attempt counted).
    fn on_failure(
        &self,
        hook: &str,
        backlog: &mut VecDeque<(Delivery, Instant)>,
        done: &tokio::sync::mpsc::UnboundedSender<(i64, DeliveryUpdate)>,
    ) {
        backlog.retain(|(d, _)| {
            if d.webhook_id != hook {
                return true;
            }
            let _ = done.send((d.id, unclaim(d)));
            false
        });
    }

    /// For each webhook whose receiver is failing, at most every [`GIVE_UP_EVERY`]:
    /// fails its rows overdue by more than their whole retry schedule, in a background
    /// task, in short writes. Often enough that each pass is small (a few seconds of
    /// events), rather than a wave once per cool-down.
    fn give_up_overdue(
        &self,
        health: &mut HashMap<String, Health>,
        give_ups: &mut HashMap<String, tokio::task::JoinHandle<()>>,
    ) {
        give_ups.retain(|_, task| !task.is_finished());
        let now = Instant::now();
        let set = self.webhooks.current();
        for (id, h) in health.iter_mut() {
            if h.failures == 0 || h.next_give_up.is_some_and(|t| t > now) || give_ups.contains_key(id) {
                continue;
            }
            let Some(super::Failing { status, error, .. }) = self.webhooks.failing(id) else { continue };
            let Some(hook) = set.hooks.get(id) else { continue };
            h.next_give_up = Some(now + GIVE_UP_EVERY);
            let schedule = (1..hook.max_attempts).fold(Duration::ZERO, |total, attempt| {
                total
                    + backoff(
                        attempt,
                        Duration::from_millis(self.settings.backoff_base_ms),
                        None,
                        Duration::from_secs(self.settings.max_backoff_s),
                    )
            });
            let wall = time::OffsetDateTime::now_utc();
            let (now_us, due_before_us) = (unix_micros(wall), unix_micros(wall - schedule));
            let expired = format!("gave up: the receiver kept failing for longer than the retry schedule ({error})");
            let (store, hook_id) = (self.store.clone(), id.clone());
            let failed = self.metrics.deliveries.with_label_values(&[id, "failed"]);
            let task = tokio::spawn(async move {
                match fail_pending_in_chunks(&*store, &hook_id, now_us, due_before_us, status, &expired).await {
                    Ok(0) => {}
                    Ok(n) => {
                        failed.inc_by(n);
                        tracing::warn!(webhook = %hook_id, deliveries = n, "webhook deliveries failed for good: the receiver kept failing for longer than their retry schedule");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, webhook = %hook_id, "could not fail a failing webhook's overdue deliveries")
                    }
                }
            });
            give_ups.insert(id.clone(), task);
        }
    }

    /// Fails the pending events of webhooks this replica does not know (deleted while it
    /// was down, or their delete could not finish), once they have been due for
    /// [`UNKNOWN_GRACE`]: a webhook created on another replica a moment ago is known
    /// here well before that.
    async fn sweep_orphans(self: Arc<Self>) {
        let hooks = match self.store.pending_webhooks().await {
            Ok(hooks) => hooks,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the webhooks with pending deliveries");
                return;
            }
        };
        let now = time::OffsetDateTime::now_utc();
        let (now_us, due_before_us) = (unix_micros(now), unix_micros(now - UNKNOWN_GRACE));
        for id in hooks {
            if self.webhooks.current().hooks.contains_key(&id) {
                continue;
            }
            match fail_pending_in_chunks(&*self.store, &id, now_us, due_before_us, None, "the webhook was deleted")
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(webhook = %id, deliveries = n, "failed the pending deliveries of a webhook that no longer exists")
                }
                Err(e) => {
                    tracing::warn!(error = %e, webhook = %id, "could not fail the deliveries of an unknown webhook")
                }
            }
        }
    }

    /// Hands back (unclaims, due now, without counting an attempt) backlog rows that
    /// waited so long for a slot that their lease could run out. (Rows of a webhook that
    /// starts cooling down leave the backlog in [`Deliverer::on_failure`].)
    fn hand_back_stale(
        &self,
        backlog: &mut VecDeque<(Delivery, Instant)>,
        done: &tokio::sync::mpsc::UnboundedSender<(i64, DeliveryUpdate)>,
    ) {
        let stale = (Duration::from_millis(crate::rule::MAX_TIMEOUT_MS) + LEASE_MARGIN) / 2;
        backlog.retain(|(d, claimed)| {
            if claimed.elapsed() <= stale {
                return true;
            }
            let _ = done.send((d.id, unclaim(d)));
            false
        });
    }

    /// Starts calls for backlog rows while slots are free, except for paused webhooks.
    fn dispatch(
        self: &Arc<Self>,
        backlog: &mut VecDeque<(Delivery, Instant)>,
        health: &mut HashMap<String, Health>,
        in_flight: &mut JoinSet<(String, Reach)>,
        slots: usize,
        done: &tokio::sync::mpsc::UnboundedSender<(i64, DeliveryUpdate)>,
    ) {
        let mut i = 0;
        while in_flight.len() < slots && i < backlog.len() {
            let h = health.entry(backlog[i].0.webhook_id.clone()).or_default();
            if h.paused(Instant::now()) {
                i += 1;
                continue;
            }
            h.in_flight += 1;
            let Some((d, _)) = backlog.remove(i) else { break };
            let (me, done) = (self.clone(), done.clone());
            in_flight.spawn(async move {
                let (update, reach) = me.attempt(&d).await;
                // The receiver lives as long as the loop.
                let _ = done.send((d.id, update));
                (d.webhook_id, reach)
            });
        }
    }

    /// Writes attempt results as they come, each batch in one store write. A batch that
    /// cannot be written leaves its rows claimed: their leases expire and they are sent
    /// again (at least once).
    async fn record_results(self: Arc<Self>, mut done: tokio::sync::mpsc::UnboundedReceiver<(i64, DeliveryUpdate)>) {
        let mut batch = Vec::new();
        while let Some(first) = done.recv().await {
            batch.push(first);
            while batch.len() < MAX_RESULT_BATCH {
                match done.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.store.finish_deliveries(&batch).await {
                tracing::warn!(error = %e, deliveries = batch.len(), "could not record webhook delivery results; they will be sent again when their leases expire");
            }
            batch.clear();
        }
    }

    async fn claim(&self, wants: &[(String, usize)]) -> Result<Vec<Delivery>, StoreError> {
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        let now = unix_micros(time::OffsetDateTime::now_utc());
        let lease = Duration::from_millis(crate::rule::MAX_TIMEOUT_MS) + LEASE_MARGIN;
        let lease_us = i64::try_from(lease.as_micros()).unwrap_or(i64::MAX);
        self.store.claim_deliveries(&self.owner, now, lease_us, wants).await
    }

    /// One attempt of a claimed delivery: what to record for it, and whether the
    /// receiver answered.
    async fn attempt(&self, d: &Delivery) -> (DeliveryUpdate, Reach) {
        let now = time::OffsetDateTime::now_utc();
        let set = self.webhooks.current();
        match set.hooks.get(&d.webhook_id) {
            None => {
                let age = parse_time(&d.created_at).map(|c| (now - c).unsigned_abs()).unwrap_or(Duration::MAX);
                let update = if age < UNKNOWN_GRACE {
                    later(d, now, Duration::from_secs(2), "webhook not known to this replica yet")
                } else {
                    self.metrics.deliveries.with_label_values(&[&d.webhook_id, "failed"]).inc();
                    DeliveryUpdate {
                        state: DeliveryState::Failed,
                        attempts: d.attempts,
                        last_status: d.last_status,
                        last_error: Some("the webhook was deleted".into()),
                        next_attempt_us: unix_micros(now),
                    }
                };
                (update, Reach::NotCalled)
            }
            Some(hook) if !hook.enabled => {
                (later(d, now, Duration::from_secs(60), "webhook disabled; held until enabled"), Reach::NotCalled)
            }
            Some(hook) => {
                let attempt = self.send(hook, &d.event_id, &d.event_type, &d.payload).await;
                let attempts = d.attempts + 1;
                let error = attempt.error.clone().or_else(|| attempt.status.map(|s| format!("HTTP {s}")));
                let verdict = match attempt.verdict() {
                    AttemptVerdict::Retry if attempts >= d.max_attempts => AttemptVerdict::Failed,
                    v => v,
                };
                let label = match verdict {
                    AttemptVerdict::Delivered => "delivered",
                    AttemptVerdict::Retry => "retry",
                    AttemptVerdict::Failed => "failed",
                };
                self.metrics.deliveries.with_label_values(&[&hook.id, label]).inc();
                if verdict == AttemptVerdict::Failed {
                    tracing::warn!(webhook = %hook.id, event_id = %d.event_id, attempts, error = error.as_deref().unwrap_or(""), "webhook delivery failed for good");
                }
                let delay = backoff(
                    attempts,
                    Duration::from_millis(self.settings.backoff_base_ms),
                    attempt.retry_after,
                    Duration::from_secs(self.settings.max_backoff_s),
                );
                // Any answer but 408/429/5xx means the receiver is there (a 4xx is the
                // event's problem, not the receiver's).
                let reach = match attempt.verdict() {
                    AttemptVerdict::Retry => Reach::Down {
                        retry_after: attempt.retry_after,
                        status: attempt.status,
                        error: error.clone().map(truncate).unwrap_or_default(),
                    },
                    _ => Reach::Up,
                };
                let update = DeliveryUpdate {
                    state: match verdict {
                        AttemptVerdict::Delivered => DeliveryState::Delivered,
                        AttemptVerdict::Retry => DeliveryState::Pending,
                        AttemptVerdict::Failed => DeliveryState::Failed,
                    },
                    attempts,
                    last_status: attempt.status,
                    last_error: if verdict == AttemptVerdict::Delivered { None } else { error.map(truncate) },
                    next_attempt_us: unix_micros(time::OffsetDateTime::now_utc() + delay),
                };
                (update, reach)
            }
        }
    }
}

/// Whether a call reached the webhook's receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    /// It answered (2xx, or a status that is not worth retrying).
    Up,
    /// No usable answer (connect error, timeout, 408, 429, 5xx): its `Retry-After`,
    /// status and error.
    Down { retry_after: Option<Duration>, status: Option<u16>, error: String },
    /// Not called (webhook unknown or disabled).
    NotCalled,
}

/// What the delivery loop knows of one webhook's receiver.
#[derive(Debug, Default)]
struct Health {
    in_flight: usize,
    /// Failed calls in a row.
    failures: u32,
    /// No calls before this (set after a failure).
    cool_until: Option<Instant>,
    /// The webhook's version its failures were seen with (0: not looked at yet).
    version: i64,
    /// No give-up pass before this.
    next_give_up: Option<Instant>,
}

impl Health {
    /// Whether the loop leaves this webhook's rows alone now: it is cooling down, or it
    /// is failing and its one probe is in flight.
    fn paused(&self, now: Instant) -> bool {
        (self.failures > 0 && self.in_flight > 0) || self.cool_until.is_some_and(|t| t > now)
    }
}

/// Unclaims a delivery, due when it was, keeping its attempts and last result.
fn unclaim(d: &Delivery) -> DeliveryUpdate {
    let due = d.next_attempt_at.as_deref().and_then(parse_time).unwrap_or_else(time::OffsetDateTime::now_utc);
    DeliveryUpdate {
        state: DeliveryState::Pending,
        attempts: d.attempts,
        last_status: d.last_status,
        last_error: d.last_error.clone(),
        next_attempt_us: unix_micros(due),
    }
}

/// Keeps a delivery pending without counting an attempt.
fn later(d: &Delivery, now: time::OffsetDateTime, delay: Duration, why: &str) -> DeliveryUpdate {
    DeliveryUpdate {
        state: DeliveryState::Pending,
        attempts: d.attempts,
        last_status: d.last_status,
        last_error: Some(why.to_owned()),
        next_attempt_us: unix_micros(now + delay),
    }
}

fn truncate(mut s: String) -> String {
    if let Some((i, _)) = s.char_indices().nth(MAX_ERROR_CHARS) {
        s.truncate(i);
        s.push('…');
    }
    s
}

/// The payload with the webhook's `body_params` as top-level keys (validation keeps
/// them off the envelope's own keys).
fn with_body_params(payload: &str, params: &[(String, String)]) -> Result<Vec<u8>, String> {
    if params.is_empty() {
        return Ok(payload.as_bytes().to_vec());
    }
    let mut map: Map<String, Value> =
        serde_json::from_str(payload).map_err(|_| "the stored event payload is not a JSON object".to_string())?;
    for (k, v) in params {
        map.entry(k.clone()).or_insert_with(|| Value::String(v.clone()));
    }
    serde_json::to_vec(&map).map_err(|e| format!("cannot encode the payload: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector_and_depends_on_every_input() {
        // HMAC-SHA256("secret", "1700000000.{}"), computed independently with openssl:
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac secret
        let sig = signature("secret", 1_700_000_000, b"{}");
        assert_eq!(sig, "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163");
        assert_ne!(sig, signature("secret", 1_700_000_001, b"{}"));
        assert_ne!(sig, signature("secreT", 1_700_000_000, b"{}"));
        assert_ne!(sig, signature("secret", 1_700_000_000, b"{ }"));
    }

    #[test]
    fn backoff_doubles_from_the_base_and_honours_retry_after_within_the_cap() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(3600);
        let delays: Vec<u64> = (1..=5).map(|a| backoff(a, base, None, max).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16]);
        assert_eq!(backoff(2, base, Some(Duration::from_secs(7)), max), Duration::from_secs(7));
        assert_eq!(backoff(40, base, None, max), max);
        assert_eq!(backoff(1, base, Some(Duration::from_secs(999_999)), max), max);
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        assert_eq!(parse_retry_after(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        let later = time::OffsetDateTime::now_utc() + Duration::from_secs(120);
        let fmt = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        let text = later.format(&fmt).unwrap();
        let parsed = parse_retry_after(&text).expect("an HTTP date");
        assert!(parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120), "{parsed:?}");
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn statuses_map_to_delivered_retry_or_failed() {
        let attempt = |status: Option<u16>| Attempt {
            status,
            body: None,
            error: None,
            retry_after: None,
            latency: Duration::ZERO,
        };
        for (status, expected) in [
            (Some(200), AttemptVerdict::Delivered),
            (Some(204), AttemptVerdict::Delivered),
            (Some(408), AttemptVerdict::Retry),
            (Some(429), AttemptVerdict::Retry),
            (Some(503), AttemptVerdict::Retry),
            (Some(400), AttemptVerdict::Failed),
            (Some(404), AttemptVerdict::Failed),
            (Some(301), AttemptVerdict::Failed),
            (None, AttemptVerdict::Retry),
        ] {
            assert_eq!(attempt(status).verdict(), expected, "{status:?}");
        }
    }

    #[test]
    fn body_params_become_top_level_keys() {
        let body = with_body_params(r#"{"version":"1","detail":{}}"#, &[("tenant".into(), "acme".into())]).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["version"], "1");
    }
}
