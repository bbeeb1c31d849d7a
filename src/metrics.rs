//! Prometheus metrics. Registered once; the hot path only increments.

use std::time::Duration;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// All of verdict's metrics.
pub struct Metrics {
    registry: Registry,
    decisions: IntCounterVec,
    decision_latency: HistogramVec,
    rule_outcomes: IntCounterVec,
    rule_latency: HistogramVec,
    token_fetches: IntCounterVec,
    circuit_state: prometheus::IntGaugeVec,
    /// Activity-log batch sizes.
    pub activity_batch_size: HistogramVec,
    /// Activity entries waiting to be written.
    pub activity_queue_depth: IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            registry.register(Box::new(c.clone())).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            registry.register(Box::new(h.clone())).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            h
        };
        let decisions =
            counter("verdict_decisions_total", "Decisions by outcome and entry point", &["decision", "via"]);
        let decision_latency =
            histogram("verdict_decision_latency_seconds", "Decision latency", &["via"], LATENCY_BUCKETS.to_vec());
        let rule_outcomes = counter("verdict_rule_outcomes_total", "Rule evaluations by outcome", &["rule", "outcome"]);
        let rule_latency =
            histogram("verdict_rule_latency_seconds", "Rule evaluation latency", &["rule"], LATENCY_BUCKETS.to_vec());
        let token_fetches =
            counter("verdict_oauth_token_fetches_total", "OAuth2 token requests by result", &["result"]);
        let activity_batch_size = histogram(
            "verdict_activity_batch_size",
            "Activity entries per committed batch",
            &[],
            vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
        );
        let activity_queue_depth =
            IntGauge::new("verdict_activity_queue_depth", "Activity entries waiting to be written")
                .unwrap_or_else(|e| unreachable!("{e}"));
        registry.register(Box::new(activity_queue_depth.clone())).unwrap_or_else(|e| unreachable!("{e}"));
        let circuit_state = prometheus::IntGaugeVec::new(
            Opts::new("verdict_circuit_state", "Circuit state per API origin: 0 closed, 1 open, 2 half-open"),
            &["origin"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        registry.register(Box::new(circuit_state.clone())).unwrap_or_else(|e| unreachable!("{e}"));
        Metrics {
            circuit_state,
            registry,
            decisions,
            decision_latency,
            rule_outcomes,
            rule_latency,
            token_fetches,
            activity_batch_size,
            activity_queue_depth,
        }
    }

    /// The registry, for subsystems that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a decision.
    pub fn decision(&self, decision: &str, via: &str, latency: Duration) {
        self.decisions.with_label_values(&[decision, via]).inc();
        self.decision_latency.with_label_values(&[via]).observe(latency.as_secs_f64());
    }

    /// Counts a rule evaluation.
    pub fn rule(&self, rule: &str, outcome: &str, latency: Duration) {
        self.rule_outcomes.with_label_values(&[rule, outcome]).inc();
        self.rule_latency.with_label_values(&[rule]).observe(latency.as_secs_f64());
    }

    /// Records a circuit state change.
    pub fn circuit(&self, t: &crate::engine::breaker::Transition) {
        use crate::engine::breaker::Transition;
        match t {
            Transition::Opened(o) => self.circuit_state.with_label_values(&[o]).set(1),
            Transition::Closed(o) => self.circuit_state.with_label_values(&[o]).set(0),
        }
    }

    /// Sets every origin's circuit gauge (at scrape time, so half-open shows).
    pub fn circuit_states(&self, states: &[(String, crate::engine::breaker::CircuitState)]) {
        for (origin, state) in states {
            self.circuit_state.with_label_values(&[origin]).set(state.gauge());
        }
    }

    /// Counts an OAuth token request.
    pub fn token_fetch(&self, ok: bool, _latency: Duration) {
        self.token_fetches.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
    }

    /// How many OAuth token requests were made (tests and diagnostics).
    pub fn token_fetch_count(&self) -> u64 {
        self.token_fetches.with_label_values(&["ok"]).get() + self.token_fetches.with_label_values(&["error"]).get()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
