//! Circuit breakers per API origin (scheme, host, port), and the per-origin limit on
//! calls in flight. After `failures` consecutive errors an origin's circuit opens:
//! calls fail fast for `cooldown`, then one probe call decides whether it closes.
//! Other origins are not affected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// Breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive errors that open the circuit.
    pub failures: u32,
    /// How long an open circuit fails fast before a probe.
    pub cooldown: Duration,
    /// Calls in flight per origin; more wait (within their deadline).
    pub max_in_flight: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failures: 5, cooldown: Duration::from_secs(30), max_in_flight: 256 }
    }
}

/// One origin's state.
pub struct Origin {
    errors: AtomicU32,
    /// Milliseconds since the breaker's epoch when the circuit may be probed; 0 = closed.
    open_until: AtomicU64,
    probing: AtomicBool,
    /// Limits calls in flight to the origin.
    pub slots: Semaphore,
}

/// A circuit's state as metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    /// Prometheus value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }

    /// `closed`, `open`, `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// Whether a call may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Circuit closed: call.
    Call,
    /// Circuit half-open and this call is the probe.
    Probe,
    /// Circuit open: fail fast.
    Reject,
}

/// A change of circuit state worth telling the world about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Opened(String),
    Closed(String),
}

/// Breakers for every origin seen.
pub struct Breakers {
    config: BreakerConfig,
    epoch: Instant,
    origins: RwLock<HashMap<String, Arc<Origin>>>,
}

impl Breakers {
    /// Breakers with settings.
    pub fn new(config: BreakerConfig) -> Breakers {
        Breakers { config, epoch: Instant::now(), origins: RwLock::new(HashMap::new()) }
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means "closed".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The state of an origin, created on first use.
    pub fn origin(&self, origin: &str) -> Arc<Origin> {
        if let Some(o) = self.origins.read().unwrap_or_else(|p| p.into_inner()).get(origin) {
            return o.clone();
        }
        let mut map = self.origins.write().unwrap_or_else(|p| p.into_inner());
        map.entry(origin.to_owned())
            .or_insert_with(|| {
                Arc::new(Origin {
                    errors: AtomicU32::new(0),
                    open_until: AtomicU64::new(0),
                    probing: AtomicBool::new(false),
                    slots: Semaphore::new(self.config.max_in_flight),
                })
            })
            .clone()
    }

    /// Decides whether a call to `origin` may go out now.
    pub fn admit(&self, origin: &Origin) -> Admission {
        let until = origin.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Call;
        }
        if self.now_ms() < until {
            return Admission::Reject;
        }
        if origin.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            Admission::Probe
        } else {
            Admission::Reject
        }
    }

    /// Records a call's result; returns a transition when the circuit changed.
    pub fn record(&self, name: &str, origin: &Origin, admission: Admission, ok: bool) -> Option<Transition> {
        if ok {
            origin.errors.store(0, Ordering::Release);
            let was_open = origin.open_until.swap(0, Ordering::AcqRel) != 0;
            origin.probing.store(false, Ordering::Release);
            return was_open.then(|| Transition::Closed(name.to_owned()));
        }
        if admission == Admission::Probe {
            origin.open_until.store(self.now_ms() + self.config.cooldown.as_millis() as u64, Ordering::Release);
            origin.probing.store(false, Ordering::Release);
            return None;
        }
        let errors = origin.errors.fetch_add(1, Ordering::AcqRel) + 1;
        if errors >= self.config.failures && origin.open_until.load(Ordering::Acquire) == 0 {
            origin.open_until.store(self.now_ms() + self.config.cooldown.as_millis() as u64, Ordering::Release);
            return Some(Transition::Opened(name.to_owned()));
        }
        None
    }

    /// Arms a guard that frees the probe slot if the probing call is dropped
    /// (its policy finished early) before its result was recorded.
    pub fn probe_guard(&self, origin: &Arc<Origin>, admission: Admission) -> ProbeGuard {
        ProbeGuard((admission == Admission::Probe).then(|| origin.clone()))
    }

    /// Every origin and its circuit state.
    pub fn states(&self) -> Vec<(String, CircuitState)> {
        let now = self.now_ms();
        let map = self.origins.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, CircuitState)> = map
            .iter()
            .map(|(name, o)| {
                let until = o.open_until.load(Ordering::Acquire);
                let state = if until == 0 {
                    CircuitState::Closed
                } else if now < until {
                    CircuitState::Open
                } else {
                    CircuitState::HalfOpen
                };
                (name.clone(), state)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Frees a half-open circuit's probe slot when dropped while armed.
pub struct ProbeGuard(Option<Arc<Origin>>);

impl ProbeGuard {
    /// The result was recorded; nothing to undo.
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(origin) = self.0.take() {
            origin.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_and_probes_once() {
        let b = Breakers::new(BreakerConfig { failures: 2, cooldown: Duration::ZERO, max_in_flight: 1 });
        let o = b.origin("http://x");
        assert_eq!(b.record("http://x", &o, Admission::Call, false), None);
        assert_eq!(b.record("http://x", &o, Admission::Call, false), Some(Transition::Opened("http://x".into())));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(b.admit(&o), Admission::Probe);
        assert_eq!(b.admit(&o), Admission::Reject, "only one probe at a time");
        assert_eq!(b.record("http://x", &o, Admission::Probe, true), Some(Transition::Closed("http://x".into())));
        assert_eq!(b.admit(&o), Admission::Call);
    }
}
