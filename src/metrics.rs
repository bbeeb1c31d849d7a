//! Prometheus metrics. Registered once; the hot path only increments.
//!
//! The activity log's metrics are not counted here: the group-commit writer keeps its
//! own counters ([`ActivityWriter::stats`]) and `ActivityCollector` turns a snapshot
//! of them into metric families at scrape time, so the writer stays free of Prometheus.

use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::logs::activity::{ActivityStats, ActivityWriter};

/// All of verdict's metrics.
pub struct Metrics {
    registry: Registry,
    decisions: IntCounterVec,
    decision_latency: HistogramVec,
    rule_outcomes: IntCounterVec,
    rule_latency: HistogramVec,
    token_fetches: IntCounterVec,
    circuit_state: prometheus::IntGaugeVec,
    /// The series of `decisions`/`decision_latency` for every (decision, via) pair,
    /// looked up once: counting a decision hashes no labels.
    decision_series: [DecisionSeries; 2],
    /// The series of each rule seen so far, by rule id: one map lookup per evaluation
    /// instead of two label lookups.
    rule_series: RwLock<HashMap<String, RuleSeries>>,
}

/// The series of one entry point (`via`).
struct DecisionSeries {
    allow: IntCounter,
    deny: IntCounter,
    latency: Histogram,
}

/// The series of one rule; an outcome's counter appears on its first use, as when
/// looked up by label on every evaluation.
struct RuleSeries {
    allow: OnceLock<IntCounter>,
    deny: OnceLock<IntCounter>,
    error: OnceLock<IntCounter>,
    latency: Histogram,
}

/// The entry points, in `decision_series` order.
const VIAS: [&str; 2] = ["api", "forward-auth"];

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
        // Known label values start at zero, so a scrape shows every series (and a rate
        // can be taken) before the first decision or token fetch.
        let decision_series = VIAS.map(|via| DecisionSeries {
            allow: decisions.with_label_values(&["allow", via]),
            deny: decisions.with_label_values(&["deny", via]),
            latency: decision_latency.with_label_values(&[via]),
        });
        for result in ["ok", "error"] {
            token_fetches.with_label_values(&[result]);
        }
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
            decision_series,
            rule_series: RwLock::new(HashMap::new()),
        }
    }

    /// Exposes the activity writer's batch sizes, queue depth and totals, read at
    /// scrape time. Call once per writer.
    pub fn watch_activity(&self, writer: ActivityWriter) {
        if let Err(e) = self.registry.register(Box::new(ActivityCollector::new(writer))) {
            tracing::warn!(error = %e, "activity log metrics not registered");
        }
    }

    /// The registry, for subsystems that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a decision.
    pub fn decision(&self, decision: &str, via: &str, latency: Duration) {
        let series = VIAS.iter().position(|v| *v == via).and_then(|i| self.decision_series.get(i));
        match (series, decision) {
            (Some(s), "allow") => s.allow.inc(),
            (Some(s), "deny") => s.deny.inc(),
            _ => self.decisions.with_label_values(&[decision, via]).inc(),
        }
        match series {
            Some(s) => s.latency.observe(latency.as_secs_f64()),
            None => self.decision_latency.with_label_values(&[via]).observe(latency.as_secs_f64()),
        }
    }

    /// Counts a rule evaluation.
    pub fn rule(&self, rule: &str, outcome: &str, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let count = |s: &RuleSeries| {
            let cell = match outcome {
                "allow" => &s.allow,
                "deny" => &s.deny,
                "error" => &s.error,
                _ => return self.rule_outcomes.with_label_values(&[rule, outcome]).inc(),
            };
            cell.get_or_init(|| self.rule_outcomes.with_label_values(&[rule, outcome])).inc();
        };
        if let Some(s) = self.rule_series.read().unwrap_or_else(PoisonError::into_inner).get(rule) {
            count(s);
            s.latency.observe(seconds);
            return;
        }
        let mut all = self.rule_series.write().unwrap_or_else(PoisonError::into_inner);
        let series = all.entry(rule.to_owned()).or_insert_with(|| RuleSeries {
            allow: OnceLock::new(),
            deny: OnceLock::new(),
            error: OnceLock::new(),
            latency: self.rule_latency.with_label_values(&[rule]),
        });
        count(series);
        series.latency.observe(seconds);
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

/// Reads [`ActivityWriter::stats`] when Prometheus scrapes.
struct ActivityCollector {
    writer: ActivityWriter,
    descs: Vec<Desc>,
}

/// Name, help and type of each activity-log family, in output order.
const ACTIVITY_FAMILIES: [(&str, &str, MetricType); 4] = [
    (
        "verdict_activity_batch_size",
        "Activity entries per batch committed (or failed) in one transaction",
        MetricType::HISTOGRAM,
    ),
    (
        "verdict_activity_queue_depth",
        "Activity entries waiting to be written, including decisions waiting for room in the queue",
        MetricType::GAUGE,
    ),
    ("verdict_activity_entries_total", "Activity entries committed", MetricType::COUNTER),
    ("verdict_activity_failed_batches_total", "Activity batches whose commit failed", MetricType::COUNTER),
];

impl ActivityCollector {
    fn new(writer: ActivityWriter) -> ActivityCollector {
        let descs = ACTIVITY_FAMILIES
            .iter()
            .map(|(name, help, _)| {
                Desc::new((*name).into(), (*help).into(), Vec::new(), HashMap::new())
                    .unwrap_or_else(|e| unreachable!("metric {name}: {e}"))
            })
            .collect();
        ActivityCollector { writer, descs }
    }
}

impl Collector for ActivityCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        activity_families(&self.writer.stats())
    }
}

/// The activity log's metric families for one snapshot of the writer's counters.
fn activity_families(stats: &ActivityStats) -> Vec<MetricFamily> {
    ACTIVITY_FAMILIES
        .iter()
        .map(|&(name, help, kind)| {
            let mut metric = proto::Metric::default();
            match kind {
                MetricType::HISTOGRAM => {
                    let mut histogram = proto::Histogram::default();
                    histogram.set_sample_count(stats.batches + stats.failed_batches);
                    histogram.set_sample_sum(stats.batch_size_sum as f64);
                    let buckets: Vec<proto::Bucket> = stats
                        .batch_size_buckets
                        .iter()
                        .map(|&(bound, cumulative)| {
                            let mut bucket = proto::Bucket::default();
                            bucket.set_upper_bound(bound as f64);
                            bucket.set_cumulative_count(cumulative);
                            bucket
                        })
                        .collect();
                    histogram.set_bucket(buckets);
                    metric.set_histogram(histogram);
                }
                MetricType::GAUGE => {
                    let mut gauge = proto::Gauge::default();
                    gauge.set_value(stats.queue_depth as f64);
                    metric.set_gauge(gauge);
                }
                _ => {
                    let value =
                        if name == "verdict_activity_entries_total" { stats.entries } else { stats.failed_batches };
                    let mut counter = proto::Counter::default();
                    counter.set_value(value as f64);
                    metric.set_counter(counter);
                }
            }
            let mut family = MetricFamily::default();
            family.set_name(name.into());
            family.set_help(help.into());
            family.set_field_type(kind);
            family.set_metric(vec![metric]);
            family
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::activity::BATCH_SIZE_BUCKETS;

    #[test]
    fn decision_and_rule_series_count_as_labelled() {
        let m = Metrics::new();
        m.decision("allow", "api", Duration::from_millis(2));
        m.decision("deny", "forward-auth", Duration::from_millis(3));
        m.decision("allow", "api", Duration::from_millis(4));
        m.rule("r1", "allow", Duration::from_millis(1));
        m.rule("r1", "allow", Duration::from_millis(1));
        m.rule("r1", "error", Duration::from_millis(1));
        m.rule("r2", "deny", Duration::from_millis(1));
        let text = m.render();
        for line in [
            "verdict_decisions_total{decision=\"allow\",via=\"api\"} 2",
            "verdict_decisions_total{decision=\"deny\",via=\"forward-auth\"} 1",
            "verdict_decisions_total{decision=\"deny\",via=\"api\"} 0",
            "verdict_decision_latency_seconds_count{via=\"api\"} 2",
            "verdict_rule_outcomes_total{outcome=\"allow\",rule=\"r1\"} 2",
            "verdict_rule_outcomes_total{outcome=\"error\",rule=\"r1\"} 1",
            "verdict_rule_outcomes_total{outcome=\"deny\",rule=\"r2\"} 1",
            "verdict_rule_latency_seconds_count{rule=\"r1\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        // An outcome a rule never had has no series, as before the series were cached.
        assert!(!text.contains("outcome=\"deny\",rule=\"r1\""), "{text}");
    }

    #[test]
    fn activity_stats_render_as_prometheus_families() {
        let stats = ActivityStats {
            queue_depth: 3,
            accepted: 10,
            batches: 3,
            entries: 7,
            failed_batches: 1,
            last_batch_size: 2,
            batch_size_buckets: BATCH_SIZE_BUCKETS
                .iter()
                .map(|&b| {
                    let cumulative = match b {
                        1 => 1,
                        2 | 4 => 2,
                        _ => 4,
                    };
                    (b, cumulative)
                })
                .collect(),
            batch_size_sum: 10,
        };
        let mut buf = Vec::new();
        TextEncoder::new().encode(&activity_families(&stats), &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        for line in [
            "# TYPE verdict_activity_batch_size histogram",
            "verdict_activity_batch_size_bucket{le=\"1\"} 1",
            "verdict_activity_batch_size_bucket{le=\"4\"} 2",
            "verdict_activity_batch_size_bucket{le=\"8\"} 4",
            "verdict_activity_batch_size_bucket{le=\"+Inf\"} 4",
            "verdict_activity_batch_size_sum 10",
            "verdict_activity_batch_size_count 4",
            "# TYPE verdict_activity_queue_depth gauge",
            "verdict_activity_queue_depth 3",
            "# TYPE verdict_activity_entries_total counter",
            "verdict_activity_entries_total 7",
            "verdict_activity_failed_batches_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
    }
}
