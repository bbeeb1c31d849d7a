//! Event notifications (SPEC §10): webhooks that security tools register, the events
//! verdict sends them, and the outbox those events go through.
//!
//! The shape: the decision path, the audit log and the circuit breakers turn what
//! happened into [`OutboxEvent`]s — one envelope per event, one row per subscribed
//! webhook — that the store writes durably (a decision's events in the same batch as
//! its activity entry, a change's in the same transaction as its audit entry). The
//! delivery worker ([`deliver`]) claims due rows from the store and sends them in the
//! background. Nothing on the decision path waits for a receiver, and pending events
//! live in the store, not in memory.
//!
//! Architecture Invariant: a webhook's secrets (`auth` secrets, `signing_secret`) are
//! [`Secret`]s: they serialise as the mask, so `to_json`, audit entries and listings
//! never carry them; the plaintext signing secret is shown once, in the create answer.

pub mod deliver;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::RngCore;
use reqwest::header::HeaderName;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::engine::breaker::Transition;
use crate::engine::{Outcome, RuleResult};
use crate::rule::{check_id, compile_auth, with_meta, Auth, AuthSpec, FieldError, KeyValue, MAX_TIMEOUT_MS};
use crate::secret::Secret;
use crate::store::{now_string, ActivityRecord, AuditEntry, OutboxEvent};

/// What can happen that a webhook may hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    DecisionDenied,
    DecisionAllowed,
    RuleFailed,
    ConfigChanged,
    CircuitOpened,
    CircuitClosed,
    WebhookTest,
}

impl EventType {
    /// Every type, in the order the docs list them.
    pub const ALL: [EventType; 7] = [
        EventType::DecisionDenied,
        EventType::DecisionAllowed,
        EventType::RuleFailed,
        EventType::ConfigChanged,
        EventType::CircuitOpened,
        EventType::CircuitClosed,
        EventType::WebhookTest,
    ];

    /// The name a webhook's `events` lists and `X-Verdict-Event-Type` carries.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::DecisionDenied => "decision.denied",
            EventType::DecisionAllowed => "decision.allowed",
            EventType::RuleFailed => "rule.failed",
            EventType::ConfigChanged => "config.changed",
            EventType::CircuitOpened => "circuit.opened",
            EventType::CircuitClosed => "circuit.closed",
            EventType::WebhookTest => "webhook.test",
        }
    }

    /// The envelope's `detail-type`.
    pub fn detail_type(self) -> &'static str {
        match self {
            EventType::DecisionDenied => "Decision Denied",
            EventType::DecisionAllowed => "Decision Allowed",
            EventType::RuleFailed => "Rule Failed",
            EventType::ConfigChanged => "Config Changed",
            EventType::CircuitOpened => "Circuit Opened",
            EventType::CircuitClosed => "Circuit Closed",
            EventType::WebhookTest => "WebhookTest",
        }
    }

    /// The inverse of [`EventType::as_str`].
    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Top-level keys of the envelope; `body_params` may not reuse them.
const ENVELOPE_KEYS: [&str; 9] =
    ["version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"];

/// Headers verdict sets on every call; invocation `headers` may not set them.
const RESERVED_HEADERS: [&str; 6] =
    ["content-type", "content-length", "host", "x-verdict-event-id", "x-verdict-event-type", "x-verdict-signature"];

/// Largest `max_attempts` accepted.
pub const MAX_ATTEMPTS: u32 = 100;

/// A webhook as written by an admin, and as read back (secrets masked).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `POST` (default) or `PUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// Headers added to every call.
    #[serde(default)]
    pub headers: Vec<KeyValue>,
    /// Query parameters added to every call.
    #[serde(default)]
    pub query: Vec<KeyValue>,
    /// Top-level keys added to every payload.
    #[serde(default)]
    pub body_params: Vec<KeyValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// Applications whose decision events are sent; `*` is all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applications: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// HMAC key of `X-Verdict-Signature`; generated when not given, shown once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub signing_secret: Option<Secret>,
}

impl WebhookSpec {
    /// The secrets of this webhook by field path, for the store to encrypt.
    pub fn secrets(&self) -> Vec<(&'static str, &Secret)> {
        let mut out = self.auth.as_ref().map(AuthSpec::secrets).unwrap_or_default();
        if let Some(s) = &self.signing_secret {
            out.push(("signing_secret", s));
        }
        out
    }

    /// Mutable access to a secret by field path.
    pub fn secret_mut(&mut self, path: &str) -> Option<&mut Option<Secret>> {
        match path {
            "signing_secret" => Some(&mut self.signing_secret),
            other => self.auth.as_mut().and_then(|a| a.secret_mut(other)),
        }
    }
}

/// A compiled webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    /// Normalised (defaults filled), with its secrets.
    pub spec: WebhookSpec,
    pub source: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    pub enabled: bool,
    pub method: reqwest::Method,
    /// The URL with the invocation `query` appended.
    pub url: String,
    pub headers: Vec<(HeaderName, String)>,
    pub auth: Auth,
    pub body_params: Vec<(String, String)>,
    pub events: BTreeSet<EventType>,
    /// `None` = every application.
    pub applications: Option<BTreeSet<String>>,
    pub max_attempts: u32,
    pub timeout: Duration,
    pub signing_secret: Secret,
}

impl Webhook {
    /// Validates a spec and compiles it; every problem is listed. A missing
    /// `signing_secret` is generated.
    pub fn compile(mut spec: WebhookSpec, source: &str, version: i64) -> Result<Webhook, Vec<FieldError>> {
        let mut errors = Vec::new();
        let id = spec.id.clone().unwrap_or_default();
        check_id(&id, &mut errors);
        let method = match spec.method.as_deref() {
            None | Some("POST") => reqwest::Method::POST,
            Some("PUT") => reqwest::Method::PUT,
            Some(other) => {
                errors.push(FieldError::new("method", format!("`{other}` is not supported; use `POST` or `PUT`")));
                reqwest::Method::POST
            }
        };
        let url = compile_url(spec.url.as_deref(), &spec.query, &mut errors);
        let mut headers = Vec::new();
        for (i, kv) in spec.headers.iter().enumerate() {
            let field = format!("headers[{i}]");
            match HeaderName::from_bytes(kv.key.as_bytes()) {
                Ok(name) if RESERVED_HEADERS.contains(&name.as_str()) => errors.push(FieldError::new(
                    format!("{field}.key"),
                    format!("`{}` is set by verdict on every call and cannot be overridden", kv.key),
                )),
                Ok(name) => {
                    if reqwest::header::HeaderValue::from_str(&kv.value).is_err() {
                        errors.push(FieldError::new(
                            format!("{field}.value"),
                            "holds characters that cannot go in a header (control characters)",
                        ));
                    }
                    headers.push((name, kv.value.clone()));
                }
                Err(_) => errors
                    .push(FieldError::new(format!("{field}.key"), format!("`{}` is not a valid header name", kv.key))),
            }
        }
        let mut body_params = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, kv) in spec.body_params.iter().enumerate() {
            let field = format!("body_params[{i}].key");
            if kv.key.is_empty() {
                errors.push(FieldError::new(field, "a body parameter needs a name"));
            } else if ENVELOPE_KEYS.contains(&kv.key.as_str()) {
                errors.push(FieldError::new(
                    field,
                    format!("`{}` is a key of the event envelope; choose another name", kv.key),
                ));
            } else if !seen.insert(kv.key.as_str()) {
                errors.push(FieldError::new(field, format!("`{}` is listed twice", kv.key)));
            } else {
                body_params.push((kv.key.clone(), kv.value.clone()));
            }
        }
        let mut events = BTreeSet::new();
        match spec.events.as_deref() {
            None => errors.push(FieldError::new("events", "`events` is required: the event types to send")),
            Some([]) => errors.push(FieldError::new("events", "list at least one event type")),
            Some(names) => {
                for (i, name) in names.iter().enumerate() {
                    match EventType::parse(name) {
                        Some(t) => {
                            events.insert(t);
                        }
                        None => errors.push(FieldError::new(
                            format!("events[{i}]"),
                            format!("`{name}` is not an event type; use one of {}", event_names()),
                        )),
                    }
                }
            }
        }
        let applications = match spec.applications.as_deref() {
            None => None,
            Some([]) => {
                errors.push(FieldError::new("applications", "list at least one application, or `*` for all"));
                None
            }
            Some(apps) => {
                for (i, a) in apps.iter().enumerate() {
                    if a.is_empty() {
                        errors.push(FieldError::new(format!("applications[{i}]"), "must not be empty"));
                    }
                }
                (!apps.iter().any(|a| a == "*")).then(|| apps.iter().cloned().collect())
            }
        };
        let max_attempts = spec.max_attempts.unwrap_or(8);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            errors.push(FieldError::new("max_attempts", format!("must be between 1 and {MAX_ATTEMPTS}")));
        }
        let timeout_ms = spec.timeout_ms.unwrap_or(5000);
        if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
            errors.push(FieldError::new("timeout_ms", format!("must be between 1 and {MAX_TIMEOUT_MS}")));
        }
        if spec.signing_secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
            errors.push(FieldError::new("signing_secret", "must not be empty; leave it out to have one generated"));
        }
        let auth = compile_auth(spec.auth.as_ref(), &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let signing_secret = spec.signing_secret.get_or_insert_with(generate_secret).clone();
        spec.name.get_or_insert_with(|| id.clone());
        spec.enabled.get_or_insert(true);
        spec.method = Some(method.as_str().to_owned());
        spec.auth.get_or_insert_with(|| AuthSpec { kind: "none".into(), ..AuthSpec::default() });
        spec.applications.get_or_insert_with(|| vec!["*".into()]);
        spec.max_attempts = Some(max_attempts);
        spec.timeout_ms = Some(timeout_ms);
        Ok(Webhook {
            enabled: spec.enabled.unwrap_or(true),
            id,
            source: source.to_owned(),
            version,
            created_at: String::new(),
            updated_at: String::new(),
            method,
            url: url.unwrap_or_default(),
            headers,
            auth: auth.unwrap_or(Auth::None),
            body_params,
            events,
            applications,
            max_attempts,
            timeout: Duration::from_millis(timeout_ms),
            signing_secret,
            spec,
        })
    }

    /// The webhook as GET shows it (secrets masked).
    pub fn to_json(&self) -> Value {
        with_meta(&self.spec, &self.source, self.version, &self.created_at, &self.updated_at)
    }

    /// Whether this webhook wants events of `kind` for `application` (`None`: events
    /// not tied to an application).
    fn wants(&self, kind: EventType, application: Option<&str>) -> bool {
        self.enabled
            && self.events.contains(&kind)
            && match (&self.applications, application) {
                (Some(apps), Some(app)) => apps.contains(app),
                _ => true,
            }
    }
}

fn event_names() -> String {
    EventType::ALL.iter().map(|t| format!("`{}`", t.as_str())).collect::<Vec<_>>().join(", ")
}

/// A random signing secret: 32 bytes, hex.
fn generate_secret() -> Secret {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    Secret::new(format!("whsec_{}", hex::encode(bytes)))
}

/// The URL plus the invocation query, each value encoded as one query value.
fn compile_url(url: Option<&str>, query: &[KeyValue], errors: &mut Vec<FieldError>) -> Option<String> {
    let Some(raw) = url else {
        errors.push(FieldError::new("url", "`url` is required"));
        return None;
    };
    let mut parsed = match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => u,
        Ok(_) => {
            errors.push(FieldError::new("url", format!("`{raw}` is not an http:// or https:// URL with a host")));
            return None;
        }
        Err(e) => {
            errors.push(FieldError::new("url", format!("`{raw}` is not a valid URL: {e}")));
            return None;
        }
    };
    if parsed.fragment().is_some() {
        errors.push(FieldError::new("url", "a webhook URL cannot have a `#fragment`"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        errors.push(FieldError::new("url", "put credentials in `auth`, not in the URL"));
    }
    let mut ok = true;
    for (i, kv) in query.iter().enumerate() {
        if kv.key.is_empty() {
            errors.push(FieldError::new(format!("query[{i}].key"), "a query parameter needs a name"));
            ok = false;
        }
    }
    if ok && !query.is_empty() {
        let mut pairs = parsed.query_pairs_mut();
        for kv in query {
            pairs.append_pair(&kv.key, &kv.value);
        }
    }
    Some(parsed.to_string())
}

/// The envelope of every event (SPEC §10), EventBridge style.
#[derive(Serialize)]
struct Envelope<'a, D: Serialize> {
    version: &'static str,
    id: &'a str,
    #[serde(rename = "detail-type")]
    detail_type: &'static str,
    source: &'static str,
    account: &'a str,
    time: &'a str,
    region: &'a str,
    resources: Vec<String>,
    detail: D,
}

/// A decision event's detail: the activity entry (SPEC §8), `policies` and `rules` as
/// the JSON text the activity record already holds.
#[derive(Serialize)]
struct ActivityDetail<'a> {
    decision_id: &'a str,
    time: &'a str,
    application: &'a str,
    username: Option<&'a str>,
    remote_ip: Option<&'a str>,
    device_id: Option<&'a str>,
    decision: &'a str,
    reason: &'a str,
    policies: &'a RawValue,
    rules: &'a RawValue,
    latency_ms: f64,
    via: &'a str,
    replica: &'a str,
}

/// A `rule.failed` event's detail: the rule's result in the decision, and which
/// decision it was part of.
#[derive(Serialize)]
struct RuleFailedDetail<'a> {
    decision_id: &'a str,
    application: &'a str,
    username: Option<&'a str>,
    rule_id: &'a str,
    policy_id: &'a str,
    reason: &'a str,
    http_status: Option<u16>,
    latency_ms: f64,
    effect: &'a str,
    replica: &'a str,
}

/// The webhooks in force, indexed by event type (enabled ones only).
#[derive(Debug, Default)]
pub struct WebhookSet {
    pub hooks: BTreeMap<String, Arc<Webhook>>,
    by_event: BTreeMap<EventType, Vec<Arc<Webhook>>>,
}

impl WebhookSet {
    /// Indexes a set of webhooks.
    pub fn new(hooks: BTreeMap<String, Arc<Webhook>>) -> WebhookSet {
        let mut by_event: BTreeMap<EventType, Vec<Arc<Webhook>>> = BTreeMap::new();
        for hook in hooks.values().filter(|h| h.enabled) {
            for kind in &hook.events {
                by_event.entry(*kind).or_default().push(hook.clone());
            }
        }
        WebhookSet { hooks, by_event }
    }

    fn subscribers<'a>(
        &'a self,
        kind: EventType,
        application: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<Webhook>> + 'a {
        self.by_event.get(&kind).into_iter().flatten().filter(move |h| h.wants(kind, application))
    }
}

/// The webhooks in force and what turns happenings into outbox events.
pub struct Webhooks {
    set: ArcSwap<WebhookSet>,
    /// `account` of the envelope.
    instance: String,
    /// `region` of the envelope.
    replica: String,
    /// Wakes the delivery worker when events were recorded.
    wake: tokio::sync::Notify,
    /// Webhooks whose receiver this replica's delivery loop sees failing: why, and when
    /// it is probed next. Shown on waiting deliveries, which are not rewritten.
    failing: std::sync::Mutex<BTreeMap<String, Failing>>,
}

/// A receiver the delivery loop sees failing.
#[derive(Debug, Clone, PartialEq)]
pub struct Failing {
    /// The last failure's HTTP status, when it got an answer.
    pub status: Option<u16>,
    /// The last failure (`HTTP 503`, `connection refused`, …).
    pub error: String,
    /// When the next probe may go.
    pub next_probe: time::OffsetDateTime,
}

impl Webhooks {
    /// An empty set for an instance and replica.
    pub fn new(instance: &str, replica: &str) -> Webhooks {
        Webhooks {
            set: ArcSwap::from_pointee(WebhookSet::default()),
            instance: instance.to_owned(),
            replica: replica.to_owned(),
            wake: tokio::sync::Notify::new(),
            failing: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Records that `hook`'s receiver is failing (`Some`) or answers (`None`).
    pub fn set_failing(&self, hook: &str, failing: Option<Failing>) {
        let mut map = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match failing {
            Some(f) => map.insert(hook.to_owned(), f),
            None => map.remove(hook),
        };
    }

    /// Whether this replica sees `hook`'s receiver failing.
    pub fn failing(&self, hook: &str) -> Option<Failing> {
        self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(hook).cloned()
    }

    /// Swaps in a new set (after the store committed the change).
    pub fn replace(&self, hooks: BTreeMap<String, Arc<Webhook>>) {
        self.set.store(Arc::new(WebhookSet::new(hooks)));
    }

    /// The set in force.
    pub fn current(&self) -> Arc<WebhookSet> {
        self.set.load_full()
    }

    /// Tells the delivery worker that events were recorded.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The events of a decision for every subscribed webhook: `decision.denied` or
    /// `decision.allowed`, and a `rule.failed` per rule that ended in `error`. Empty —
    /// and nothing serialised — when no webhook listens.
    pub fn decision_events(&self, record: &ActivityRecord, rules: &[RuleResult]) -> Vec<OutboxEvent> {
        let set = self.set.load();
        if set.by_event.is_empty() {
            return Vec::new();
        }
        let app = Some(record.application.as_str());
        let mut out = Vec::new();
        let kind = if record.decision == "deny" { EventType::DecisionDenied } else { EventType::DecisionAllowed };
        let hooks: Vec<&Arc<Webhook>> = set.subscribers(kind, app).collect();
        if !hooks.is_empty() {
            let (Ok(policies), Ok(rules_json)) =
                (serde_json::from_str::<&RawValue>(&record.policies), serde_json::from_str::<&RawValue>(&record.rules))
            else {
                tracing::error!(decision_id = %record.decision_id, "activity record JSON does not parse; no decision event");
                return out;
            };
            let detail = ActivityDetail {
                decision_id: &record.decision_id,
                time: &record.time,
                application: &record.application,
                username: record.username.as_deref(),
                remote_ip: record.remote_ip.as_deref(),
                device_id: record.device_id.as_deref(),
                decision: &record.decision,
                reason: &record.reason,
                policies,
                rules: rules_json,
                latency_ms: record.latency_ms,
                via: &record.via,
                replica: &record.replica,
            };
            let mut resources = vec![format!("application:{}", record.application)];
            resources.extend(record.rule_ids.iter().map(|r| format!("rule:{r}")));
            self.push(&mut out, kind, &hooks, resources, &detail);
        }
        let failed_hooks: Vec<&Arc<Webhook>> = if rules.iter().any(|r| r.outcome == Outcome::Error) {
            set.subscribers(EventType::RuleFailed, app).collect()
        } else {
            Vec::new()
        };
        for rule in rules.iter().filter(|r| r.outcome == Outcome::Error && !failed_hooks.is_empty()) {
            let detail = RuleFailedDetail {
                decision_id: &record.decision_id,
                application: &record.application,
                username: record.username.as_deref(),
                rule_id: &rule.rule_id,
                policy_id: &rule.policy_id,
                reason: &rule.reason,
                http_status: rule.http_status,
                latency_ms: rule.latency_ms,
                effect: rule.effect.as_str(),
                replica: &record.replica,
            };
            let resources = vec![
                format!("application:{}", record.application),
                format!("rule:{}", rule.rule_id),
                format!("policy:{}", rule.policy_id),
            ];
            self.push(&mut out, EventType::RuleFailed, &failed_hooks, resources, &detail);
        }
        out
    }

    /// The `config.changed` events of an audit entry (the store calls this inside the
    /// audit entry's transaction).
    pub fn audit_events(&self, entry: &AuditEntry) -> Vec<OutboxEvent> {
        let set = self.set.load();
        let hooks: Vec<&Arc<Webhook>> = set.subscribers(EventType::ConfigChanged, None).collect();
        let mut out = Vec::new();
        if !hooks.is_empty() {
            let resources = vec![format!("{}:{}", entry.object_type, entry.object_id)];
            self.push(&mut out, EventType::ConfigChanged, &hooks, resources, entry);
        }
        out
    }

    /// The event of a circuit opening or closing.
    pub fn circuit_events(&self, transition: &Transition) -> Vec<OutboxEvent> {
        let (kind, origin, state) = match transition {
            Transition::Opened(o) => (EventType::CircuitOpened, o, "open"),
            Transition::Closed(o) => (EventType::CircuitClosed, o, "closed"),
        };
        let set = self.set.load();
        let hooks: Vec<&Arc<Webhook>> = set.subscribers(kind, None).collect();
        let mut out = Vec::new();
        if !hooks.is_empty() {
            let detail = serde_json::json!({"origin": origin, "state": state, "replica": self.replica});
            self.push(&mut out, kind, &hooks, vec![format!("origin:{origin}")], &detail);
        }
        out
    }

    /// The envelope of a test call to `hook`: (event id, payload).
    pub fn test_event(&self, hook: &Webhook) -> (String, String) {
        let id = uuid::Uuid::now_v7().to_string();
        let detail = serde_json::json!({
            "webhook_id": hook.id,
            "message": "a test event sent from verdict's POST /v1/webhooks/{id}/test",
        });
        let payload = self.envelope(&id, EventType::WebhookTest, vec![format!("webhook:{}", hook.id)], &detail);
        (id, payload)
    }

    /// One event (one id, one payload) for each of `hooks`.
    fn push<D: Serialize>(
        &self,
        out: &mut Vec<OutboxEvent>,
        kind: EventType,
        hooks: &[&Arc<Webhook>],
        resources: Vec<String>,
        detail: &D,
    ) {
        let id = uuid::Uuid::now_v7().to_string();
        let payload = self.envelope(&id, kind, resources, detail);
        out.extend(hooks.iter().map(|h| OutboxEvent {
            webhook_id: h.id.clone(),
            event_id: id.clone(),
            event_type: kind.as_str().to_owned(),
            payload: payload.clone(),
            max_attempts: h.max_attempts,
        }));
    }

    fn envelope<D: Serialize>(&self, id: &str, kind: EventType, resources: Vec<String>, detail: &D) -> String {
        let time = now_string();
        let envelope = Envelope {
            version: "1",
            id,
            detail_type: kind.detail_type(),
            source: "verdict",
            account: &self.instance,
            time: &time,
            region: &self.replica,
            resources,
            detail,
        };
        // Serialising these types cannot fail (string keys, finite numbers).
        serde_json::to_string(&envelope).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot encode an event envelope");
            String::from("{}")
        })
    }
}

/// The store's audit hook: `config.changed` events from the webhooks in force. Holds
/// the set weakly (the store outlives nothing it hooks into).
pub fn audit_hook(webhooks: &Arc<Webhooks>) -> crate::store::AuditHook {
    let weak: Weak<Webhooks> = Arc::downgrade(webhooks);
    Arc::new(move |entry: &AuditEntry| weak.upgrade().map(|w| w.audit_events(entry)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> WebhookSpec {
        serde_json::from_value(v).expect("spec")
    }

    #[test]
    fn defaults_fill_in_and_a_signing_secret_is_generated() {
        let hook = Webhook::compile(
            spec(
                serde_json::json!({"id": "siem", "url": "https://siem.example.com/h?a=1", "events": ["decision.denied"],
                "query": [{"key": "source", "value": "ver dict&x=1"}]}),
            ),
            "api",
            1,
        )
        .expect("compiles");
        assert_eq!(hook.method, reqwest::Method::POST);
        assert_eq!(hook.max_attempts, 8);
        assert_eq!(hook.timeout, Duration::from_millis(5000));
        assert_eq!(hook.url, "https://siem.example.com/h?a=1&source=ver+dict%26x%3D1");
        assert!(hook.signing_secret.expose().starts_with("whsec_") && hook.signing_secret.expose().len() > 40);
        let json = hook.to_json();
        assert_eq!(json["signing_secret"], "********");
        assert_eq!(json["name"], "siem");
        assert_eq!(json["applications"], serde_json::json!(["*"]));
        assert_eq!(json["auth"], serde_json::json!({"type": "none"}));
        assert!(hook.applications.is_none());
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let errors = Webhook::compile(
            spec(serde_json::json!({"id": "Bad Id", "url": "ftp://x", "method": "GET", "events": ["decision.denyed"],
                "auth": {"type": "api_key", "name": "X-Key"},
                "headers": [{"key": "X-Verdict-Signature", "value": "x"}, {"key": "X-A", "value": "a\r\nb"}],
                "body_params": [{"key": "detail", "value": "x"}],
                "max_attempts": 0, "timeout_ms": 0, "applications": []})),
            "api",
            1,
        )
        .expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "id",
            "url",
            "method",
            "events[0]",
            "auth.value",
            "headers[0].key",
            "headers[1].value",
            "body_params[0].key",
            "max_attempts",
            "timeout_ms",
            "applications",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        assert!(errors.iter().any(|e| e.message.contains("`decision.denied`")), "the hint lists the event types");
    }

    fn record(decision: &str, app: &str) -> ActivityRecord {
        ActivityRecord {
            decision_id: "d1".into(),
            time: now_string(),
            time_us: 0,
            application: app.into(),
            username: Some("alice".into()),
            remote_ip: None,
            device_id: None,
            decision: decision.into(),
            reason: "r".into(),
            policies: "[]".into(),
            rules: r#"[{"rule_id":"posture"}]"#.into(),
            rule_ids: vec!["posture".into()],
            latency_ms: 1.0,
            via: "api".into(),
            replica: "r1".into(),
            outbox: Vec::new(),
        }
    }

    #[test]
    fn decision_events_follow_subscriptions_and_application_filters() {
        let webhooks = Webhooks::new("acme", "r1");
        let mk = |id: &str, events: Value, apps: Value| {
            let mut h = Webhook::compile(
                spec(serde_json::json!({"id": id, "url": "http://127.0.0.1:1/h", "events": events, "applications": apps})),
                "api",
                1,
            )
            .expect("compiles");
            h.created_at = now_string();
            (id.to_owned(), Arc::new(h))
        };
        webhooks.replace(BTreeMap::from([
            mk("all-denied", serde_json::json!(["decision.denied"]), serde_json::json!(["*"])),
            mk(
                "payroll-only",
                serde_json::json!(["decision.denied", "decision.allowed"]),
                serde_json::json!(["payroll"]),
            ),
        ]));
        let denied = webhooks.decision_events(&record("deny", "wiki"), &[]);
        assert_eq!(denied.iter().map(|e| e.webhook_id.as_str()).collect::<Vec<_>>(), ["all-denied"]);
        let envelope: Value = serde_json::from_str(&denied[0].payload).unwrap();
        assert_eq!(envelope["detail-type"], "Decision Denied");
        assert_eq!(envelope["account"], "acme");
        assert_eq!(envelope["region"], "r1");
        assert_eq!(envelope["id"], denied[0].event_id.as_str());
        assert_eq!(envelope["resources"], serde_json::json!(["application:wiki", "rule:posture"]));
        assert_eq!(envelope["detail"]["rules"][0]["rule_id"], "posture");
        let payroll = webhooks.decision_events(&record("deny", "payroll"), &[]);
        assert_eq!(payroll.len(), 2);
        assert_eq!(payroll[0].event_id, payroll[1].event_id, "one event, the same id for each webhook");
        let allowed = webhooks.decision_events(&record("allow", "wiki"), &[]);
        assert!(allowed.is_empty(), "nobody listens to allows of wiki");
        assert_eq!(webhooks.decision_events(&record("allow", "payroll"), &[]).len(), 1);
    }
}
