//! The decision engine: which policies match, which rules to call, what the answers
//! mean. It does no I/O of its own — HTTP goes through [`Outbound`] — and reads rules
//! and policies from an immutable [`Catalog`] snapshot, never from the store.
//!
//! Architecture Invariant: a decision never reads the store; the catalog is swapped
//! whole when rules or policies change.

pub mod breaker;
pub mod cache;
mod verify;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;

use crate::action::ActionResult;
use crate::context::RequestContext;
use crate::metrics::Metrics;
use crate::outbound::{ApiResponse, CallMode, Outbound, RequestView};
use crate::policy::{Catalog, Policy};
use crate::rule::{Effect, RenderedRequest, Rule};
use breaker::{Admission, BreakerConfig, Breakers, CircuitState, Transition};
use cache::{CacheKey, CachedOutcome, DecisionCache};

/// The outcome of one rule evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The criteria were met.
    Allow,
    /// The criteria were not met (or the rule could not be rendered).
    Deny,
    /// No usable answer; the rule's `on_error` decides.
    Error,
}

impl Outcome {
    /// `allow`, `deny` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Error => "error",
        }
    }
}

/// One rule's part in a decision, as the answer and the activity log show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RuleResult {
    pub rule_id: String,
    pub policy_id: String,
    pub outcome: Outcome,
    /// What the outcome counted as in its policy (`on_error` applied).
    pub effect: Effect,
    pub reason: String,
    pub http_status: Option<u16>,
    pub latency_ms: f64,
    pub cached: bool,
}

/// A policy's part in a decision: `allow`, `deny`, or `skipped` when another policy
/// had already allowed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PolicyResult {
    pub id: String,
    pub decision: String,
}

/// The answer to "may this request pass?".
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Decision {
    pub decision_id: String,
    pub decision: Effect,
    pub reason: String,
    pub policies: Vec<PolicyResult>,
    pub rules: Vec<RuleResult>,
    pub latency_ms: f64,
}

/// Everything known about one rule evaluation (the rule-test endpoints show it all).
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub outcome: Outcome,
    pub reason: String,
    pub http_status: Option<u16>,
    pub request: Option<RequestView>,
    pub response: Option<ApiResponse>,
    pub actions: Vec<ActionResult>,
    pub latency: Duration,
    pub cached: bool,
}

impl Evaluation {
    /// What the outcome counts as, with `on_error` applied.
    pub fn effect(&self, rule: &Rule) -> Effect {
        match self.outcome {
            Outcome::Allow => Effect::Allow,
            Outcome::Deny => Effect::Deny,
            Outcome::Error => rule.on_error,
        }
    }
}

/// Engine limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most outcomes the decision cache holds.
    pub cache_max_entries: u64,
    /// Circuit breaker and in-flight limits per API origin.
    pub breaker: BreakerConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { cache_max_entries: 100_000, breaker: BreakerConfig::default() }
    }
}

/// The engine: the current catalog and the way out to the APIs.
pub struct Engine {
    catalog: ArcSwap<Catalog>,
    outbound: Arc<dyn Outbound>,
    metrics: Arc<Metrics>,
    cache: DecisionCache,
    breakers: Breakers,
    transitions: tokio::sync::broadcast::Sender<Transition>,
    generation: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// An engine over a catalog.
    pub fn new(catalog: Catalog, outbound: Arc<dyn Outbound>, metrics: Arc<Metrics>, config: EngineConfig) -> Engine {
        Engine {
            catalog: ArcSwap::from_pointee(catalog),
            outbound,
            metrics,
            cache: DecisionCache::new(config.cache_max_entries),
            breakers: Breakers::new(config.breaker),
            transitions: tokio::sync::broadcast::channel(64).0,
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Circuit state changes, for whoever wants to hear of them (webhooks, logs).
    pub fn circuit_transitions(&self) -> tokio::sync::broadcast::Receiver<Transition> {
        self.transitions.subscribe()
    }

    /// Every API origin seen and its circuit state.
    pub fn circuit_states(&self) -> Vec<(String, CircuitState)> {
        self.breakers.states()
    }

    /// Outcomes held by the decision cache (approximate).
    pub fn cached_outcomes(&self) -> u64 {
        self.cache.len()
    }

    /// The catalog in force.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    /// Replaces the catalog; decisions in flight finish with the one they started with.
    pub fn replace_catalog(&self, catalog: Catalog) {
        self.catalog.store(Arc::new(catalog));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        // Changes are rare and a rule's outcomes must not outlive its definition
        // (file rules keep version 1 across reloads), so the whole cache goes.
        self.cache.clear();
    }

    /// Decides a request.
    pub async fn decide(&self, ctx: &RequestContext) -> Decision {
        let started = Instant::now();
        let catalog = self.catalog.load_full();
        let policies = catalog.matching(ctx);
        let decision_id = uuid::Uuid::now_v7().to_string();
        if policies.is_empty() {
            return Decision {
                decision_id,
                decision: Effect::Deny,
                reason: format!("no policy matches application `{}` for this user", ctx.application),
                policies: Vec::new(),
                rules: Vec::new(),
                latency_ms: ms(started.elapsed()),
            };
        }
        let shared = self.shared_evaluations(&catalog, &policies, ctx);
        let mut pending: FuturesUnordered<_> =
            policies.iter().map(|p| self.evaluate_policy(&catalog, p, ctx, &shared)).collect();
        let mut done: Vec<PolicyEvaluation> = Vec::with_capacity(policies.len());
        while let Some(result) = pending.next().await {
            let allowed = result.effect == Effect::Allow;
            done.push(result);
            if allowed {
                break;
            }
        }
        drop(pending);
        let allowed = done.iter().find(|p| p.effect == Effect::Allow);
        let reason = match allowed {
            Some(p) => format!("policy {} allowed: {}", p.id, p.reason),
            None => {
                let mut denied: Vec<&PolicyEvaluation> = done.iter().collect();
                denied.sort_by(|a, b| a.id.cmp(&b.id));
                denied.iter().map(|p| format!("policy {}: {}", p.id, p.reason)).collect::<Vec<_>>().join("; ")
            }
        };
        let policies_out = policies
            .iter()
            .map(|p| PolicyResult {
                id: p.id.clone(),
                decision: done.iter().find(|d| d.id == p.id).map(|d| d.effect.as_str()).unwrap_or("skipped").to_owned(),
            })
            .collect();
        let decision = if allowed.is_some() { Effect::Allow } else { Effect::Deny };
        let mut rules = Vec::new();
        for p in done.iter_mut() {
            rules.append(&mut p.rules);
        }
        Decision { decision_id, decision, reason, policies: policies_out, rules, latency_ms: ms(started.elapsed()) }
    }

    /// One evaluation for each enabled rule that several matching policies list, to be
    /// awaited by each of them: a rule is called once per decision. Empty (and free) in
    /// the common case of one policy or no shared rule. The evaluation runs while any
    /// policy still waits for it and is dropped (cancelled) when none does.
    fn shared_evaluations<'a>(
        &'a self,
        catalog: &'a Catalog,
        policies: &[Arc<Policy>],
        ctx: &'a RequestContext,
    ) -> SharedEvaluations<'a> {
        let mut shared = SharedEvaluations::new();
        if policies.len() < 2 {
            return shared;
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for p in policies {
            for id in &p.rules {
                *seen.entry(id.as_str()).or_default() += 1;
            }
        }
        for (id, uses) in seen {
            if uses < 2 {
                continue;
            }
            if let Some(rule) = catalog.rules.get(id).filter(|r| r.enabled) {
                let eval: BoxFuture<'a, Evaluation> = Box::pin(self.evaluate(rule, ctx, CallMode::Decision));
                shared.insert(rule.id.clone(), eval.shared());
            }
        }
        shared
    }

    /// Evaluates a policy's enabled rules concurrently; the first deny ends it and
    /// drops (cancels) the calls still outstanding.
    async fn evaluate_policy(
        &self,
        catalog: &Catalog,
        policy: &Arc<Policy>,
        ctx: &RequestContext,
        shared: &SharedEvaluations<'_>,
    ) -> PolicyEvaluation {
        let rules: Vec<&Arc<Rule>> =
            policy.rules.iter().filter_map(|id| catalog.rules.get(id)).filter(|r| r.enabled).collect();
        let mut pending: FuturesUnordered<_> = rules
            .iter()
            .map(|rule| async move {
                let eval = match shared.get(&rule.id) {
                    Some(once) => once.clone().await,
                    None => self.evaluate(rule, ctx, CallMode::Decision).await,
                };
                (*rule, eval)
            })
            .collect();
        let mut results = Vec::with_capacity(rules.len());
        while let Some((rule, eval)) = pending.next().await {
            let effect = eval.effect(rule);
            let reason = match (eval.outcome, effect) {
                (Outcome::Error, Effect::Allow) => format!("{}; on_error allows", eval.reason),
                _ => eval.reason.clone(),
            };
            results.push(RuleResult {
                rule_id: rule.id.clone(),
                policy_id: policy.id.clone(),
                outcome: eval.outcome,
                effect,
                reason: reason.clone(),
                http_status: eval.http_status,
                latency_ms: ms(eval.latency),
                cached: eval.cached,
            });
            if effect == Effect::Deny {
                let verb = if eval.outcome == Outcome::Error { "failed" } else { "denied" };
                return PolicyEvaluation {
                    id: policy.id.clone(),
                    effect,
                    reason: format!("rule {} {verb}: {reason}", rule.id),
                    rules: results,
                };
            }
        }
        let reason = if results.is_empty() {
            "no enabled rules".to_owned()
        } else {
            let ids: Vec<&str> = results.iter().map(|r| r.rule_id.as_str()).collect();
            format!("rule{} {} allowed", if ids.len() == 1 { "" } else { "s" }, ids.join(", "))
        };
        PolicyEvaluation { id: policy.id.clone(), effect: Effect::Allow, reason, rules: results }
    }

    /// Evaluates one rule for a context: render, call within the rule's deadline
    /// (token fetch included), verify the answer, apply the response actions.
    pub async fn evaluate(&self, rule: &Rule, ctx: &RequestContext, mode: CallMode) -> Evaluation {
        let started = Instant::now();
        let eval = self.evaluate_uncounted(rule, ctx, mode, started).await;
        if mode == CallMode::Decision {
            self.metrics.rule(&rule.id, eval.outcome.as_str(), eval.latency);
        }
        eval
    }

    async fn evaluate_uncounted(
        &self,
        rule: &Rule,
        ctx: &RequestContext,
        mode: CallMode,
        started: Instant,
    ) -> Evaluation {
        let request = match rule.render(ctx) {
            Ok(r) => r,
            Err(e) => {
                // A rendering failure is a deny whatever `on_error` says: an attacker
                // must not turn a refused value into an allow.
                let mut eval = Evaluation::new();
                eval.reason = format!("{e}; the API was not called");
                eval.latency = started.elapsed();
                return eval;
            }
        };
        if mode == CallMode::Test || rule.cache_ttl.is_zero() {
            return self.call(rule, &request, mode, started).await;
        }
        let key = CacheKey {
            generation: self.generation.load(std::sync::atomic::Ordering::Acquire),
            rule_id: rule.id.clone(),
            version: rule.version,
            request: request.clone(),
        };
        let mut uncached: Option<Evaluation> = None;
        let init = async {
            let eval = self.call(rule, &request, mode, started).await;
            let cacheable = eval.outcome != Outcome::Error;
            let outcome = CachedOutcome {
                outcome: eval.outcome,
                reason: eval.reason.clone(),
                http_status: eval.http_status,
                ttl: rule.cache_ttl,
            };
            uncached = Some(eval);
            cacheable.then(|| Arc::new(outcome))
        };
        match self.cache.get_or_insert(key, init).await {
            Some((hit, true)) => Evaluation {
                outcome: hit.outcome,
                reason: hit.reason.clone(),
                http_status: hit.http_status,
                latency: started.elapsed(),
                cached: true,
                ..Evaluation::new()
            },
            _ => match uncached {
                Some(eval) => eval,
                // Another caller's identical call failed (errors are not cached);
                // make this one's own call.
                None => self.call(rule, &request, mode, started).await,
            },
        }
    }

    /// One call through the origin's circuit breaker and in-flight limit, bounded by
    /// the rule's timeout (which covers the wait for a slot and the token fetch).
    async fn call(&self, rule: &Rule, request: &RenderedRequest, mode: CallMode, started: Instant) -> Evaluation {
        let mut eval = Evaluation::new();
        if mode == CallMode::Test {
            eval.request = Some(RequestView::new(request, &rule.auth));
        }
        let origin_name = rule.url.origin();
        let origin = self.breakers.origin(origin_name);
        // Rule tests go through even when the circuit is open: they are how an admin
        // finds out whether the API is back.
        let admission = if mode == CallMode::Test { Admission::Call } else { self.breakers.admit(&origin) };
        if admission == Admission::Reject {
            eval.latency = started.elapsed();
            return error(eval, format!("circuit open for {origin_name}: too many consecutive errors; calls fail fast until a probe succeeds"));
        }
        let mut guard = self.breakers.probe_guard(&origin, admission);
        let answer = tokio::time::timeout(rule.timeout, async {
            let _slot = origin.slots.acquire().await;
            self.outbound.send(request, &rule.auth, mode).await
        })
        .await;
        eval.latency = started.elapsed();
        eval = match answer {
            Err(_) => error(eval, format!("timed out after {} ms", rule.timeout.as_millis())),
            Ok(Err(e)) => error(eval, e.to_string()),
            Ok(Ok(response)) => {
                eval.http_status = Some(response.status);
                let (outcome, reason, actions) = verify::judge(rule, &response);
                eval.outcome = outcome;
                eval.reason = reason;
                eval.actions = actions;
                if mode == CallMode::Test {
                    eval.response = Some(response);
                }
                eval
            }
        };
        if mode != CallMode::Test {
            let transition = self.breakers.record(origin_name, &origin, admission, eval.outcome != Outcome::Error);
            guard.disarm();
            if let Some(t) = transition {
                match &t {
                    Transition::Opened(o) => tracing::warn!(origin = %o, "circuit opened"),
                    Transition::Closed(o) => tracing::info!(origin = %o, "circuit closed"),
                }
                self.metrics.circuit(&t);
                let _ = self.transitions.send(t);
            }
        }
        eval
    }
}

impl Evaluation {
    fn new() -> Evaluation {
        Evaluation {
            outcome: Outcome::Deny,
            reason: String::new(),
            http_status: None,
            request: None,
            response: None,
            actions: Vec::new(),
            latency: Duration::ZERO,
            cached: false,
        }
    }
}

fn error(mut eval: Evaluation, reason: String) -> Evaluation {
    eval.outcome = Outcome::Error;
    eval.reason = reason;
    eval
}

struct PolicyEvaluation {
    id: String,
    effect: Effect,
    reason: String,
    rules: Vec<RuleResult>,
}

/// Rule id → the one evaluation of that rule in this decision.
type SharedEvaluations<'a> = HashMap<String, Shared<BoxFuture<'a, Evaluation>>>;

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}
