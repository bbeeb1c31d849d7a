//! Issue #8: outbound webhooks (SPEC §10). Everything is checked at real local
//! receivers: a small recording HTTP server ([`Receiver`]) stands in for the SIEM, a
//! wiremock server for the OAuth token endpoint and the rule APIs. The receiver checks
//! signatures with the signing secret the way a real receiver would
//! ([`verify_signature`]). Nothing asserts how fast anything is: conditions are waited
//! for with a generous deadline ([`wait_for`]), and "never waits for a webhook" is
//! proven with a receiver that does not answer at all until the test lets it.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::Mac;
use reqwest::Method;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::admin_support::basic;
use crate::helpers::*;
use crate::tools::{closed_origin, free_port, write_file, Binary, BinaryOptions};

const MASK: &str = "********";
const INSTANCE: &str = "acme-verdict-test";
const REPLICA: &str = "replica-wh-1";
const EVENT_TYPES: [&str; 6] =
    ["decision.denied", "decision.allowed", "rule.failed", "config.changed", "circuit.opened", "circuit.closed"];

// ---------------------------------------------------------------------------------
// the receiver

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub raw: Vec<u8>,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Hit {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    pub fn query_value(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.raw)
            .unwrap_or_else(|e| panic!("webhook body is not JSON ({e}): {}", String::from_utf8_lossy(&self.raw)))
    }

    pub fn event_id(&self) -> String {
        self.header("x-verdict-event-id").unwrap_or_else(|| panic!("no X-Verdict-Event-Id: {self:?}")).to_owned()
    }

    pub fn event_type(&self) -> String {
        self.header("x-verdict-event-type").unwrap_or_else(|| panic!("no X-Verdict-Event-Type: {self:?}")).to_owned()
    }

    pub fn text(&self) -> String {
        format!(
            "{} {}?{:?}\n{:?}\n\n{}",
            self.method,
            self.path,
            self.query,
            self.headers,
            String::from_utf8_lossy(&self.raw)
        )
    }
}

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Hold the answer until [`Receiver::open_gate`].
    pub hold: bool,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: String::new(), hold: false }
    }
}

type Script = Box<dyn Fn(usize, &Hit) -> Reply + Send + Sync>;

struct Shared {
    hits: Mutex<Vec<Hit>>,
    script: Script,
    gate: tokio::sync::watch::Sender<bool>,
    answered: AtomicUsize,
}

/// A local HTTP server that records every request and answers as its script says
/// (the script gets the 0-based number of the request on this receiver).
pub struct Receiver {
    pub uri: String,
    shared: Arc<Shared>,
    handle: actix_web::dev::ServerHandle,
}

async fn receive(
    req: actix_web::HttpRequest,
    body: actix_web::web::Bytes,
    shared: actix_web::web::Data<Shared>,
) -> actix_web::HttpResponse {
    let hit = Hit {
        method: req.method().to_string(),
        path: req.path().to_owned(),
        query: url::form_urlencoded::parse(req.query_string().as_bytes()).into_owned().collect(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        raw: body.to_vec(),
        at: std::time::Instant::now(),
    };
    let reply = {
        let mut hits = shared.hits.lock().unwrap_or_else(|e| e.into_inner());
        let reply = (shared.script)(hits.len(), &hit);
        hits.push(hit);
        reply
    };
    if reply.hold {
        let mut gate = shared.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
    }
    shared.answered.fetch_add(1, Ordering::SeqCst);
    let status = actix_web::http::StatusCode::from_u16(reply.status).expect("status");
    let mut resp = actix_web::HttpResponse::build(status);
    for (k, v) in reply.headers {
        resp.insert_header((k, v));
    }
    resp.body(reply.body)
}

impl Receiver {
    /// Answers every request 200.
    pub async fn ok() -> Receiver {
        Receiver::start(|_, _| Reply::status(200)).await
    }

    /// Starts on a random port.
    pub async fn start(script: impl Fn(usize, &Hit) -> Reply + Send + Sync + 'static) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        Receiver::start_on(listener, script)
    }

    /// Starts on `port` (which must be free now).
    pub async fn start_on_port(port: u16, script: impl Fn(usize, &Hit) -> Reply + Send + Sync + 'static) -> Receiver {
        let mut last = None;
        for _ in 0..100 {
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(listener) => return Receiver::start_on(listener, script),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot listen on 127.0.0.1:{port}: {last:?}");
    }

    fn start_on(
        listener: std::net::TcpListener,
        script: impl Fn(usize, &Hit) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        use actix_web::{web, App, HttpServer};
        let port = listener.local_addr().expect("addr").port();
        let (gate, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            hits: Mutex::new(Vec::new()),
            script: Box::new(script),
            gate,
            answered: AtomicUsize::new(0),
        });
        let data = web::Data::from(shared.clone());
        let server = HttpServer::new(move || App::new().app_data(data.clone()).default_service(web::to(receive)))
            .workers(2)
            .disable_signals()
            .listen(listener)
            .expect("listen")
            .run();
        let handle = server.handle();
        tokio::spawn(server);
        Receiver { uri: format!("http://127.0.0.1:{port}"), shared, handle }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.uri)
    }

    /// Every request so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The requests to one path.
    pub fn hits_on(&self, p: &str) -> Vec<Hit> {
        self.hits().into_iter().filter(|h| h.path == p).collect()
    }

    /// How many answers went out.
    pub fn answered(&self) -> usize {
        self.shared.answered.load(Ordering::SeqCst)
    }

    /// Lets every held answer (and every later one) go.
    pub fn open_gate(&self) {
        self.shared.gate.send_replace(true);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.open_gate();
        let handle = self.handle.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { handle.stop(false).await });
        }
    }
}

// ---------------------------------------------------------------------------------
// signatures

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What a receiver does: `X-Verdict-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>">` checked with the signing secret.
fn verify_signature(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1.push(value),
            _ => {}
        }
    }
    let Some(t) = t.filter(|t| t.parse::<i64>().is_ok()) else { return false };
    v1.iter().any(|sig| {
        let Ok(sig) = hex::decode(sig) else { return false };
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(t.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    })
}

/// The signature of `hit` holds for `secret`, and its time is a plausible Unix time.
fn assert_signed(hit: &Hit, secret: &str) {
    let header = hit.header("x-verdict-signature").unwrap_or_else(|| panic!("no X-Verdict-Signature: {}", hit.text()));
    assert!(verify_signature(secret, header, &hit.raw), "signature does not verify with the secret: {}", hit.text());
    let t: i64 = header
        .split(',')
        .find_map(|p| p.trim().strip_prefix("t="))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no t= in {header}"));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - t).abs() < 24 * 3600, "t={t} is not a Unix time in seconds (now {now})");
}

// ---------------------------------------------------------------------------------
// waiting, listing, metrics

/// Polls `probe` until it gives `Ok`, for up to `secs` seconds; panics with `what` and
/// the last `Err` (a description of the state seen) otherwise.
async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(state) if tokio::time::Instant::now() >= deadline => {
                panic!("gave up after {secs} s waiting for {what}; last seen: {state}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits until the receiver has at least `n` requests on `p`; returns them all.
async fn wait_hits(recv: &Receiver, p: &str, n: usize) -> Vec<Hit> {
    wait_for(&format!("{n} calls to {p}"), 60, || async {
        let hits = recv.hits_on(p);
        if hits.len() >= n {
            Ok(hits)
        } else {
            Err(format!("{} calls: {:?}", hits.len(), hits.iter().map(Hit::text).collect::<Vec<_>>()))
        }
    })
    .await
}

fn settings_tweak(s: &mut verdict::config::Settings) {
    s.instance_name = INSTANCE.to_owned();
    s.replica_name = REPLICA.to_owned();
    s.webhooks.poll_ms = 100;
    s.webhooks.backoff_base_ms = 200;
}

fn fast() -> Option<Tweak> {
    Some(Box::new(settings_tweak))
}

/// A rule API: `dev-ok` compliant, `dev-bad` noncompliant, `/broken` answers 500.
async fn posture_api() -> MockServer {
    let api = MockServer::start().await;
    for (device, status) in [("dev-ok", "compliant"), ("dev-bad", "noncompliant")] {
        Mock::given(method("GET"))
            .and(path(format!("/devices/{device}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": status})))
            .mount(&api)
            .await;
    }
    Mock::given(method("GET")).and(path("/broken")).respond_with(ResponseTemplate::new(500)).mount(&api).await;
    api
}

fn posture_rules(api: &str) -> Value {
    json!([
        {"id": "posture", "method": "GET", "url": format!("{api}/devices/%device_id%"),
         "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]},
        {"id": "broken", "method": "GET", "url": format!("{api}/broken"),
         "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]},
        {"id": "refused", "method": "GET", "url": format!("{}/x", closed_origin()),
         "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]},
    ])
}

/// `payroll` and `wiki` need the posture rule; `broken` needs a rule whose API answers
/// 500, `refused` one where nothing listens.
fn posture_policies() -> Value {
    json!([
        {"id": "payroll-access", "applications": ["payroll"], "rules": ["posture"]},
        {"id": "wiki-access", "applications": ["wiki"], "rules": ["posture"]},
        {"id": "broken-access", "applications": ["broken"], "rules": ["broken"]},
        {"id": "refused-access", "applications": ["refused"], "rules": ["refused"]},
    ])
}

/// A test app with the posture policies and fast webhook settings.
async fn start_app(api: &MockServer) -> TestApp {
    spawn_app_with(AppOptions {
        files: vec![("test.json".into(), json!({"rules": posture_rules(&api.uri()), "policies": posture_policies()}))],
        tweak: fast(),
        ..Default::default()
    })
    .await
}

/// A decision that must come out as `expected`; returns the answer.
async fn decide(app: &TestApp, application: &str, user: &str, device: &str, expected: &str) -> Value {
    let answer = app.decision(json!({"application": application, "username": user, "device_id": device})).await;
    assert_eq!(answer["decision"], expected, "{answer}");
    answer
}

async fn deny(app: &TestApp, application: &str, user: &str) -> Value {
    decide(app, application, user, "dev-bad", "deny").await
}

async fn allow(app: &TestApp, application: &str, user: &str) -> Value {
    decide(app, application, user, "dev-ok", "allow").await
}

fn decision_id(answer: &Value) -> String {
    answer["decision_id"].as_str().expect("decision_id").to_owned()
}

/// Creates a webhook as the admin and expects a 201.
async fn create_webhook(app: &TestApp, body: Value) -> Value {
    let (status, created) = app.post_json("/v1/webhooks", ADMIN_TOKEN, &body).await;
    assert_eq!(status, 201, "webhook create failed: {created}");
    created
}

/// Every delivery of a webhook, all pages (as the auditor), newest first.
async fn deliveries(app: &TestApp, id: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut url = format!("/v1/webhooks/{id}/deliveries?limit=1000");
    loop {
        let (status, page) = app.get(&url, AUDITOR_TOKEN).await;
        assert_eq!(status, 200, "{url}: {page}");
        items.extend(page["items"].as_array().unwrap_or_else(|| panic!("items: {page}")).iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => url = format!("/v1/webhooks/{id}/deliveries?limit=1000&cursor={c}"),
            None => return items,
        }
    }
}

/// Waits until the webhook's deliveries satisfy `done`; returns them.
async fn wait_deliveries(app: &TestApp, id: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    wait_for(&format!("deliveries of {id}: {what}"), 60, || async {
        let items = deliveries(app, id).await;
        if done(&items) {
            Ok(items)
        } else {
            Err(Value::Array(items).to_string())
        }
    })
    .await
}

fn all_in_state(items: &[Value], state: &str) -> bool {
    items.iter().all(|d| d["state"] == state)
}

async fn metrics_text(address: &str) -> String {
    let resp = reqwest::get(format!("{address}/metrics")).await.expect("metrics request");
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.expect("metrics text")
}

/// The value of the sample `name{...}` whose labels include every `labels` pair.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| label_text.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

/// The envelope of SPEC §10 around a decision event: header and body agree.
fn assert_envelope(hit: &Hit, event_type: &str, detail_type: &str) -> Value {
    let body = hit.json();
    assert_eq!(hit.header("content-type").map(|c| c.starts_with("application/json")), Some(true), "{}", hit.text());
    assert_eq!(hit.event_type(), event_type, "{}", hit.text());
    assert_eq!(body["version"], "1", "{body}");
    assert_eq!(body["id"], hit.event_id(), "body id and X-Verdict-Event-Id differ: {body}");
    assert!(uuid::Uuid::parse_str(&hit.event_id()).is_ok(), "event id is not a UUID: {}", hit.event_id());
    assert_eq!(body["detail-type"], detail_type, "{body}");
    assert_eq!(body["source"], "verdict", "{body}");
    let time = body["time"].as_str().unwrap_or_else(|| panic!("time: {body}"));
    time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("time {time:?} is not RFC 3339: {e}"));
    assert!(body["resources"].is_array(), "{body}");
    assert!(body["detail"].is_object(), "{body}");
    body
}

fn resources(body: &Value) -> Vec<String> {
    body["resources"].as_array().expect("resources").iter().filter_map(|r| r.as_str().map(str::to_owned)).collect()
}

/// Decision ids in the `detail` of the hits.
fn detail_decision_ids(hits: &[Hit]) -> BTreeSet<String> {
    hits.iter().filter_map(|h| h.json()["detail"]["decision_id"].as_str().map(str::to_owned)).collect()
}

// ---------------------------------------------------------------------------------
// 1. CRUD, validation, audit, write-only signing secret

#[tokio::test]
async fn webhook_crud_validation_audit_and_a_write_only_signing_secret() {
    let recv = Receiver::ok().await;
    let app = spawn_app_with(AppOptions { tweak: fast(), ..Default::default() }).await;
    let body = json!({"id": "siem", "url": recv.url("/hooks/siem"), "events": ["decision.denied"]});

    // Roles.
    let resp = app.request(Method::POST, "/v1/webhooks").json(&body).send().await.expect("request");
    assert_eq!(resp.status().as_u16(), 401);
    for token in [AUDITOR_TOKEN, PROXY_TOKEN] {
        let (status, answer) = app.post_json("/v1/webhooks", token, &body).await;
        assert_eq!(status, 403, "{answer}");
    }
    let (status, answer) = app.get("/v1/webhooks", PROXY_TOKEN).await;
    assert_eq!(status, 403, "{answer}");

    // Create with only url and events: the defaults, and the generated secret, once.
    let created = create_webhook(&app, body.clone()).await;
    let secret = created["signing_secret"].as_str().expect("signing_secret in the create answer").to_owned();
    assert_ne!(secret, MASK, "the create answer shows the generated secret: {created}");
    assert!(secret.len() >= 16, "a generated signing secret of {} characters is too weak: {secret}", secret.len());
    let expected_defaults = [
        ("id", json!("siem")),
        ("name", json!("siem")),
        ("enabled", json!(true)),
        ("url", json!(recv.url("/hooks/siem"))),
        ("method", json!("POST")),
        ("auth", json!({"type": "none"})),
        ("headers", json!([])),
        ("query", json!([])),
        ("body_params", json!([])),
        ("events", json!(["decision.denied"])),
        ("applications", json!(["*"])),
        ("max_attempts", json!(8)),
        ("timeout_ms", json!(5000)),
        ("source", json!("api")),
        ("version", json!(1)),
    ];
    for (field, value) in &expected_defaults {
        assert_eq!(&created[field], value, "{field}: {created}");
    }
    for field in ["created_at", "updated_at"] {
        assert!(created[field].is_string(), "{field}: {created}");
    }
    let other =
        create_webhook(&app, json!({"id": "other", "url": recv.url("/hooks/other"), "events": ["rule.failed"]})).await;
    let other_secret = other["signing_secret"].as_str().expect("signing_secret");
    assert_ne!(other_secret, secret, "generated secrets must differ");
    let explicit = create_webhook(
        &app,
        json!({"id": "explicit", "url": recv.url("/hooks/explicit"), "events": ["config.changed"],
               "signing_secret": "whsec-EXPLICIT-0123456789"}),
    )
    .await;
    assert_eq!(explicit["signing_secret"], "whsec-EXPLICIT-0123456789", "{explicit}");
    let secrets = [secret.clone(), other_secret.to_owned(), "whsec-EXPLICIT-0123456789".to_owned()];
    let assert_no_secret = |what: &str, text: &str| {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "{what} shows the signing secret {s}: {text}");
        }
    };

    // Duplicate id.
    let (status, answer) = app.post_json("/v1/webhooks", ADMIN_TOKEN, &body).await;
    assert_eq!(status, 409, "{answer}");

    // Reads mask it.
    let (status, got) = app.get("/v1/webhooks/siem", AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["signing_secret"], MASK, "{got}");
    let mut unmasked = got.clone();
    unmasked["signing_secret"] = json!(secret);
    assert_eq!(unmasked, created, "GET shows what the create stored");
    assert_no_secret("GET", &got.to_string());
    let (status, list) = app.get("/v1/webhooks", AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["next_cursor"], Value::Null, "{list}");
    let ids: BTreeSet<&str> =
        list["items"].as_array().expect("items").iter().filter_map(|w| w["id"].as_str()).collect();
    assert_eq!(ids, BTreeSet::from(["siem", "other", "explicit"]), "{list}");
    for w in list["items"].as_array().expect("items") {
        assert_eq!(w["signing_secret"], MASK, "{w}");
    }
    assert_no_secret("GET /v1/webhooks", &list.to_string());
    let (status, _) = app.get("/v1/webhooks/nope", AUDITOR_TOKEN).await;
    assert_eq!(status, 404);

    // PUT as GET shows it (the mask): kept. PUT without the secret: kept.
    let mut put = got.clone();
    put["name"] = json!("SIEM intake");
    let (status, updated) = app.put_json("/v1/webhooks/siem", ADMIN_TOKEN, &put).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["version"], 2, "{updated}");
    assert_eq!(updated["name"], "SIEM intake");
    assert_eq!(updated["signing_secret"], MASK, "{updated}");
    let mut put = updated.clone();
    put.as_object_mut().expect("object").remove("signing_secret");
    put["events"] = json!(["decision.denied", "rule.failed"]);
    let (status, updated) = app.put_json("/v1/webhooks/siem", ADMIN_TOKEN, &put).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["version"], 3, "{updated}");
    assert_eq!(updated["signing_secret"], MASK, "{updated}");
    assert_no_secret("PUT answer", &updated.to_string());

    // An id in the body must match the path.
    let mut mismatch = updated.clone();
    mismatch["id"] = json!("another");
    let (status, answer) = app.put_json("/v1/webhooks/siem", ADMIN_TOKEN, &mismatch).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["details"][0]["field"], "id", "{answer}");

    // The kept secret is the original one: a delivery after the updates verifies with it.
    let (status, test) = app.post_json("/v1/webhooks/siem/test", ADMIN_TOKEN, &json!({})).await;
    assert_eq!(status, 200, "{test}");
    assert_eq!(test["delivered"], true, "{test}");
    let hits = wait_hits(&recv, "/hooks/siem", 1).await;
    assert_signed(&hits[0], &secret);

    // A new value replaces it.
    let mut put = updated.clone();
    put["signing_secret"] = json!("whsec-NEW-9876543210");
    let (status, updated) = app.put_json("/v1/webhooks/siem", ADMIN_TOKEN, &put).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["signing_secret"], MASK, "{updated}");
    let (status, test) = app.post_json("/v1/webhooks/siem/test", ADMIN_TOKEN, &json!({})).await;
    assert_eq!(status, 200, "{test}");
    let hits = wait_hits(&recv, "/hooks/siem", 2).await;
    let last = &hits[1];
    assert_signed(last, "whsec-NEW-9876543210");
    let header = last.header("x-verdict-signature").expect("signature");
    assert!(!verify_signature(&secret, header, &last.raw), "the old secret still verifies after the replace");

    // Validation: every problem at once, nothing stored.
    let bad = json!({"id": "bad-hook", "url": "ftp://files.example.com/x", "method": "GET",
                     "events": ["decision.denied", "decision.maybe"],
                     "auth": {"type": "api_key", "name": "X-Key", "in": "header"}});
    let (status, answer) = app.post_json("/v1/webhooks", ADMIN_TOKEN, &bad).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "validation_failed", "{answer}");
    let fields: BTreeSet<&str> = answer["error"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("details: {answer}"))
        .iter()
        .filter_map(|d| d["field"].as_str())
        .collect();
    assert_eq!(fields, BTreeSet::from(["url", "method", "events[1]", "auth.value"]), "{answer}");
    for d in answer["error"]["details"].as_array().expect("details") {
        assert!(d["message"].as_str().is_some_and(|m| !m.is_empty()), "{d}");
    }
    let (status, _) = app.get("/v1/webhooks/bad-hook", ADMIN_TOKEN).await;
    assert_eq!(status, 404, "a refused webhook was stored");
    assert!(app.audit_of("bad-hook").await.is_empty(), "a refused webhook was audited");
    // A refused update leaves the webhook as it was.
    let (_, before) = app.get("/v1/webhooks/other", AUDITOR_TOKEN).await;
    let mut broken = before.clone();
    broken["url"] = json!("not a url");
    broken["events"] = json!(["nope"]);
    let (status, answer) = app.put_json("/v1/webhooks/other", ADMIN_TOKEN, &broken).await;
    assert_eq!(status, 422, "{answer}");
    let (_, after) = app.get("/v1/webhooks/other", AUDITOR_TOKEN).await;
    assert_eq!(after, before);

    // Delete.
    let (status, _) = app.delete("/v1/webhooks/siem", AUDITOR_TOKEN).await;
    assert_eq!(status, 403);
    let (status, answer) = app.delete("/v1/webhooks/siem", ADMIN_TOKEN).await;
    assert_eq!(status, 204, "{answer}");
    let (status, _) = app.get("/v1/webhooks/siem", AUDITOR_TOKEN).await;
    assert_eq!(status, 404);
    let (status, _) = app.delete("/v1/webhooks/siem", ADMIN_TOKEN).await;
    assert_eq!(status, 404);

    // Audited like rules, newest first, the secret masked.
    let (status, audit) = app.get("/v1/audit-logs?object_type=webhook&object_id=siem", AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{audit}");
    let entries = audit["items"].as_array().expect("items");
    let actions: Vec<&str> = entries.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["delete", "update", "update", "update", "create"], "{audit}");
    for e in entries {
        assert_eq!(e["object_type"], "webhook", "{e}");
        assert_eq!(e["actor"], "test-admin", "{e}");
        for doc in [&e["before"], &e["after"]] {
            if doc.is_object() {
                assert_eq!(doc["signing_secret"], MASK, "{e}");
            }
        }
    }
    assert_no_secret("the audit log", &audit.to_string());
    let (_, all_audit) = app.get("/v1/audit-logs?limit=1000", AUDITOR_TOKEN).await;
    assert_no_secret("the audit log", &all_audit.to_string());
    let (status, verify) = app.get("/v1/audit-logs/verify", AUDITOR_TOKEN).await;
    assert_eq!((status, &verify["ok"]), (200, &json!(true)), "{verify}");
}

// ---------------------------------------------------------------------------------
// 2. auth types

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_auth_type_is_seen_by_the_receiver_and_one_token_serves_many_events() {
    let api = posture_api().await;
    let recv = Receiver::ok().await;
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "tok-7f3a9c", "token_type": "bearer", "expires_in": 3600})),
        )
        .mount(&idp)
        .await;
    let app = start_app(&api).await;
    let denied = json!(["decision.denied"]);
    create_webhook(
        &app,
        json!({"id": "wh-basic", "url": recv.url("/basic"), "events": denied,
               "auth": {"type": "basic", "username": "siem-user", "password": "pw-BASIC-1234"}}),
    )
    .await;
    create_webhook(
        &app,
        json!({"id": "wh-key-header", "url": recv.url("/key-header"), "events": denied,
               "auth": {"type": "api_key", "name": "X-API-Key", "value": "key-HEADER-5678", "in": "header"}}),
    )
    .await;
    create_webhook(
        &app,
        json!({"id": "wh-key-query", "url": recv.url("/key-query"), "events": denied,
               "auth": {"type": "api_key", "name": "api_key", "value": "key-QUERY-9012", "in": "query"}}),
    )
    .await;
    create_webhook(
        &app,
        json!({"id": "wh-oauth", "url": recv.url("/oauth"), "events": denied,
        "auth": {"type": "oauth2_client_credentials", "token_url": format!("{}/oauth/token", idp.uri()),
                 "client_id": "verdict-hooks", "client_secret": "cs-OAUTH-3456", "scopes": ["events.write"],
                 "params": [
                     {"key": "audience", "value": "siem", "in": "body"},
                     {"key": "X-Tenant-Hint", "value": "acme", "in": "header"},
                     {"key": "resource", "value": "urn:siem", "in": "query"},
                     {"key": "plain", "value": "by-default-in-body"}
                 ]}}),
    )
    .await;
    let none = create_webhook(&app, json!({"id": "wh-none", "url": recv.url("/none"), "events": denied})).await;
    assert_eq!(none["auth"], json!({"type": "none"}));

    // Several events, concurrently.
    let n = 4;
    let answers = futures::future::join_all((0..n).map(|i| {
        let app = &app;
        async move { deny(app, "payroll", &format!("user-{i}")).await }
    }))
    .await;
    let ids: BTreeSet<String> = answers.iter().map(decision_id).collect();

    for (p, check) in [
        ("/basic", "basic"),
        ("/key-header", "key-header"),
        ("/key-query", "key-query"),
        ("/oauth", "oauth"),
        ("/none", "none"),
    ] {
        let hits = wait_hits(&recv, p, n).await;
        let got: BTreeSet<String> = detail_decision_ids(&hits);
        assert_eq!(got, ids, "{p}: every denied decision arrives");
        for hit in &hits {
            match check {
                "basic" => assert_eq!(
                    hit.header("authorization"),
                    Some(format!("Basic {}", basic("siem-user", "pw-BASIC-1234")).as_str()),
                    "{}",
                    hit.text()
                ),
                "key-header" => {
                    assert_eq!(hit.header("x-api-key"), Some("key-HEADER-5678"), "{}", hit.text());
                    assert_eq!(hit.query_value("api_key"), None);
                }
                "key-query" => {
                    assert_eq!(hit.query_value("api_key"), Some("key-QUERY-9012"), "{}", hit.text());
                    assert_eq!(hit.header("api_key"), None);
                }
                "oauth" => assert_eq!(hit.header("authorization"), Some("Bearer tok-7f3a9c"), "{}", hit.text()),
                _ => assert_eq!(hit.header("authorization"), None, "{}", hit.text()),
            }
        }
    }
    // A test call uses the cached token too.
    let (status, test) = app.post_json("/v1/webhooks/wh-oauth/test", ADMIN_TOKEN, &json!({})).await;
    assert_eq!(status, 200, "{test}");
    assert_eq!(test["delivered"], true, "{test}");
    let hits = wait_hits(&recv, "/oauth", n + 1).await;
    assert!(hits.iter().all(|h| h.header("authorization") == Some("Bearer tok-7f3a9c")));

    // One token request for all of them, with the extra parameters where configured.
    let token_requests: Vec<_> = idp
        .received_requests()
        .await
        .expect("recording")
        .into_iter()
        .filter(|r| r.url.path() == "/oauth/token")
        .collect();
    assert_eq!(token_requests.len(), 1, "one token fetch shared by {} events", n + 1);
    let t = &token_requests[0];
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&t.body).into_owned().collect();
    let field = |k: &str| form.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(field("grant_type"), Some("client_credentials"), "{form:?}");
    assert_eq!(field("audience"), Some("siem"), "{form:?}");
    assert_eq!(field("plain"), Some("by-default-in-body"), "{form:?}");
    assert_eq!(field("scope"), Some("events.write"), "{form:?}");
    assert_eq!(field("resource"), None, "a query param is not a form field: {form:?}");
    assert_eq!(field("X-Tenant-Hint"), None, "a header param is not a form field: {form:?}");
    let query: Vec<(String, String)> = t.url.query_pairs().into_owned().collect();
    assert!(query.contains(&("resource".into(), "urn:siem".into())), "{}", t.url);
    assert!(!query.iter().any(|(k, _)| k == "audience" || k == "X-Tenant-Hint"), "{}", t.url);
    assert_eq!(t.headers.get("x-tenant-hint").and_then(|v| v.to_str().ok()), Some("acme"));
    // The client authenticated with the stored secret (in the body or as Basic).
    let basic_client = format!("Basic {}", basic("verdict-hooks", "cs-OAUTH-3456"));
    let in_body = field("client_secret") == Some("cs-OAUTH-3456") && field("client_id") == Some("verdict-hooks");
    let as_basic = t.headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(basic_client.as_str());
    assert!(in_body || as_basic, "the token request carries the client credentials: {form:?}");

    // Every delivery is delivered.
    for id in ["wh-basic", "wh-key-header", "wh-key-query", "wh-oauth", "wh-none"] {
        let items = wait_deliveries(&app, id, "all delivered", |d| d.len() >= n && all_in_state(d, "delivered")).await;
        assert_eq!(items.len(), n, "{id}: {items:?}");
    }
}

// ---------------------------------------------------------------------------------
// 3. invocation parameters, PUT, the envelope

#[tokio::test]
async fn invocation_parameters_are_on_every_call_and_put_is_honoured() {
    let api = posture_api().await;
    let recv = Receiver::ok().await;
    let app = start_app(&api).await;
    let created = create_webhook(
        &app,
        json!({"id": "params", "url": format!("{}?fixed=1", recv.url("/intake")), "method": "PUT",
               "events": ["decision.denied"],
               "headers": [{"key": "X-Tenant", "value": "acme"}, {"key": "X-Source", "value": "verdict-test"}],
               "query": [{"key": "source", "value": "verdict"}, {"key": "tenant", "value": "acme corp"}],
               "body_params": [{"key": "tenant", "value": "acme"}, {"key": "env", "value": "test"}]}),
    )
    .await;
    let secret = created["signing_secret"].as_str().expect("secret").to_owned();
    assert_eq!(created["method"], "PUT");

    let first = deny(&app, "payroll", "alice@example.com").await;
    let second = deny(&app, "wiki", "bob@example.com").await;
    let (status, _) = app.post_json("/v1/webhooks/params/test", ADMIN_TOKEN, &json!({})).await;
    assert_eq!(status, 200);

    let hits = wait_hits(&recv, "/intake", 3).await;
    for hit in &hits {
        assert_eq!(hit.method, "PUT", "{}", hit.text());
        assert_eq!(hit.header("x-tenant"), Some("acme"), "{}", hit.text());
        assert_eq!(hit.header("x-source"), Some("verdict-test"), "{}", hit.text());
        assert_eq!(hit.query_value("source"), Some("verdict"), "{}", hit.text());
        assert_eq!(hit.query_value("tenant"), Some("acme corp"), "{}", hit.text());
        assert_eq!(hit.query_value("fixed"), Some("1"), "the URL's own query is kept: {}", hit.text());
        let body = hit.json();
        assert_eq!(body["tenant"], "acme", "{body}");
        assert_eq!(body["env"], "test", "{body}");
        assert_signed(hit, &secret);
    }

    // The envelope of a denied decision, and its detail: the activity entry.
    for (answer, application) in [(&first, "payroll"), (&second, "wiki")] {
        let id = decision_id(answer);
        let hit = hits
            .iter()
            .find(|h| h.json()["detail"]["decision_id"] == id)
            .unwrap_or_else(|| panic!("no event for {id}: {:?}", hits.iter().map(Hit::text).collect::<Vec<_>>()));
        let body = assert_envelope(hit, "decision.denied", "Decision Denied");
        assert_eq!(body["account"], INSTANCE, "{body}");
        assert_eq!(body["region"], REPLICA, "{body}");
        let res = resources(&body);
        assert!(res.contains(&format!("application:{application}")), "{body}");
        assert!(res.contains(&"rule:posture".to_owned()), "{body}");
        let detail = &body["detail"];
        assert_eq!(detail["decision"], "deny", "{body}");
        assert_eq!(detail["application"], application, "{body}");
        assert_eq!(detail["reason"], answer["reason"], "{body}");
        assert_eq!(detail["policies"], answer["policies"], "{body}");
        assert_eq!(detail["rules"][0]["rule_id"], "posture", "{body}");
        // The very entry the activity log holds.
        let (status, log) = app
            .get(
                &format!("/v1/activity-logs?username={}", detail["username"].as_str().expect("username")),
                AUDITOR_TOKEN,
            )
            .await;
        assert_eq!(status, 200, "{log}");
        let entry = log["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|e| e["decision_id"] == id)
            .unwrap_or_else(|| panic!("{id} not in the activity log: {log}"));
        for (key, value) in entry.as_object().expect("entry") {
            assert_eq!(&detail[key], value, "detail.{key} differs from the activity entry {entry}: {body}");
        }
    }
    let test_hit = hits.iter().find(|h| h.event_type() == "webhook.test").expect("the test call");
    let body = assert_envelope(test_hit, "webhook.test", "WebhookTest");
    assert_eq!(body["tenant"], "acme", "{body}");
}

// ---------------------------------------------------------------------------------
// 4. signatures

#[tokio::test]
async fn the_signature_verifies_with_the_secret_and_fails_for_a_tampered_body() {
    let api = posture_api().await;
    let recv = Receiver::ok().await;
    let app = start_app(&api).await;
    let secret = "whsec-SIGNING-abcdef0123456789";
    create_webhook(
        &app,
        json!({"id": "signed", "url": recv.url("/signed"), "events": ["decision.denied", "decision.allowed"],
               "signing_secret": secret}),
    )
    .await;
    deny(&app, "payroll", "alice").await;
    allow(&app, "payroll", "bob").await;
    let hits = wait_hits(&recv, "/signed", 2).await;
    let mut seen_ids = HashSet::new();
    for hit in &hits {
        assert_signed(hit, secret);
        assert!(seen_ids.insert(hit.event_id()), "two events share an id");
        let header = hit.header("x-verdict-signature").expect("signature");
        // The check can fail: a changed body, another secret, another time.
        let mut tampered = hit.raw.clone();
        let pos = tampered.iter().position(|b| *b == b'{').expect("json");
        tampered.insert(pos + 1, b' ');
        assert!(!verify_signature(secret, header, &tampered), "a tampered body verifies");
        let replaced = String::from_utf8(hit.raw.clone()).expect("utf-8").replace("\"deny\"", "\"allow\"");
        if replaced.as_bytes() != hit.raw.as_slice() {
            assert!(!verify_signature(secret, header, replaced.as_bytes()), "a changed decision verifies");
        }
        assert!(!verify_signature("whsec-other", header, &hit.raw), "another secret verifies");
        let (t, rest) = header.split_once(',').expect("t=..,v1=..");
        let t: i64 = t.trim().trim_start_matches("t=").parse().expect("t");
        assert!(!verify_signature(secret, &format!("t={},{rest}", t + 1), &hit.raw), "another time verifies");
    }
}

// ---------------------------------------------------------------------------------
// 5. retries

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_answering_503_twice_then_200_gets_the_same_event_three_times() {
    let api = posture_api().await;
    // /flaky: 503, 503, 200. /throttled: 429 with Retry-After, 408, 200.
    let flaky_n = Arc::new(AtomicUsize::new(0));
    let throttled_n = Arc::new(AtomicUsize::new(0));
    let (f, t) = (flaky_n.clone(), throttled_n.clone());
    let recv = Receiver::start(move |_, hit| match hit.path.as_str() {
        "/flaky" => match f.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => Reply { body: "try later".into(), ..Reply::status(503) },
            _ => Reply::status(200),
        },
        "/throttled" => match t.fetch_add(1, Ordering::SeqCst) {
            0 => Reply { headers: vec![("Retry-After".into(), "3".into())], ..Reply::status(429) },
            1 => Reply::status(408),
            _ => Reply::status(204),
        },
        "/always-503" => Reply::status(503),
        _ => Reply::status(404),
    })
    .await;
    let app = start_app(&api).await;
    let flaky =
        create_webhook(&app, json!({"id": "flaky", "url": recv.url("/flaky"), "events": ["decision.denied"]})).await;
    let secret = flaky["signing_secret"].as_str().expect("secret").to_owned();
    create_webhook(&app, json!({"id": "throttled", "url": recv.url("/throttled"), "events": ["decision.denied"]}))
        .await;
    create_webhook(
        &app,
        json!({"id": "hopeless", "url": recv.url("/always-503"), "events": ["decision.denied"], "max_attempts": 3}),
    )
    .await;

    let answer = deny(&app, "payroll", "alice").await;
    let hits = wait_hits(&recv, "/flaky", 3).await;
    assert_eq!(hits.len(), 3);
    let ids: HashSet<String> = hits.iter().map(Hit::event_id).collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same event id: {ids:?}");
    let bodies: HashSet<String> = hits.iter().map(|h| h.json()["id"].to_string()).collect();
    assert_eq!(bodies.len(), 1, "every attempt carries the same body id");
    for hit in &hits {
        assert_signed(hit, &secret);
        assert_eq!(hit.json()["detail"]["decision_id"], answer["decision_id"]);
    }
    let event_id = hits[0].event_id();

    let items = wait_deliveries(&app, "flaky", "delivered", |d| d.len() == 1 && d[0]["state"] == "delivered").await;
    let d = &items[0];
    assert_eq!(d["webhook_id"], "flaky", "{d}");
    assert_eq!(d["event_id"], event_id, "{d}");
    assert_eq!(d["type"], "decision.denied", "{d}");
    assert_eq!(d["attempts"], 3, "{d}");
    assert_eq!(d["max_attempts"], 8, "{d}");
    assert_eq!(d["last_status"], 200, "{d}");
    for field in ["created_at", "updated_at"] {
        assert!(d[field].is_string(), "{field}: {d}");
    }
    for field in [
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
        "updated_at",
    ] {
        assert!(d.get(field).is_some(), "a delivery lists {field}: {d}");
    }
    // Still exactly three calls once delivered.
    assert_eq!(recv.hits_on("/flaky").len(), 3);

    // 429 (with Retry-After) and 408 are retried too.
    let items = wait_deliveries(&app, "throttled", "delivered", |d| d.len() == 1 && d[0]["state"] == "delivered").await;
    assert_eq!(items[0]["attempts"], 3, "{}", items[0]);
    assert_eq!(items[0]["last_status"], 204, "{}", items[0]);
    let throttled_hits = recv.hits_on("/throttled");
    let throttled: HashSet<String> = throttled_hits.iter().map(Hit::event_id).collect();
    assert_eq!(throttled.len(), 1);
    // Retry-After: 3 is honoured over the 200 ms backoff. A lower bound only (a busy
    // machine makes the gap longer, never shorter), with a second of slack for
    // whole-second scheduling.
    let gap = throttled_hits[1].at.duration_since(throttled_hits[0].at);
    assert!(gap >= Duration::from_secs(2), "retried {gap:?} after a 429 with Retry-After: 3");

    // max_attempts bounds the retries: failed after 3 calls, none after.
    let items = wait_deliveries(&app, "hopeless", "failed", |d| d.len() == 1 && d[0]["state"] == "failed").await;
    let d = &items[0];
    assert_eq!(d["attempts"], 3, "{d}");
    assert_eq!(d["max_attempts"], 3, "{d}");
    assert_eq!(d["last_status"], 503, "{d}");
    assert_eq!(recv.hits_on("/always-503").len(), 3);

    // Metrics: deliveries by webhook and state, outbox depth, latency.
    let metrics = metrics_text(&app.address).await;
    let count = |webhook: &str, state: &str| {
        sample(&metrics, "verdict_webhook_deliveries_total", &[("webhook", webhook), ("state", state)])
    };
    assert_eq!(count("flaky", "delivered"), Some(1.0), "{metrics}");
    assert_eq!(count("flaky", "retry"), Some(2.0), "{metrics}");
    assert_eq!(count("hopeless", "failed"), Some(1.0), "{metrics}");
    assert_eq!(count("hopeless", "retry"), Some(2.0), "{metrics}");
    assert!(sample(&metrics, "verdict_webhook_outbox_depth", &[]).is_some(), "{metrics}");
    let latency_count = sample(&metrics, "verdict_webhook_delivery_seconds_count", &[]).unwrap_or(0.0)
        + sample(&metrics, "verdict_webhook_delivery_seconds_count", &[("webhook", "flaky")]).unwrap_or(0.0);
    assert!(latency_count >= 1.0, "{metrics}");
}

// ---------------------------------------------------------------------------------
// 6. permanent failure, retry by hand

#[tokio::test]
async fn a_400_is_not_retried_and_a_failed_delivery_can_be_retried_by_hand() {
    let api = posture_api().await;
    let status = Arc::new(AtomicU16::new(400));
    let s = status.clone();
    let recv = Receiver::start(move |_, _| Reply {
        body: "{\"error\":\"bad payload\"}".into(),
        ..Reply::status(s.load(Ordering::SeqCst))
    })
    .await;
    let app = start_app(&api).await;
    create_webhook(&app, json!({"id": "strict", "url": recv.url("/strict"), "events": ["decision.denied"]})).await;

    deny(&app, "payroll", "alice").await;
    let items = wait_deliveries(&app, "strict", "failed", |d| d.len() == 1 && d[0]["state"] == "failed").await;
    let d = &items[0];
    assert_eq!(d["attempts"], 1, "{d}");
    assert_eq!(d["last_status"], 400, "{d}");
    let event_id = d["event_id"].as_str().expect("event_id").to_owned();
    // Failed means no more attempts: many backoff periods later, still one call.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hits = recv.hits_on("/strict");
    assert_eq!(hits.len(), 1, "a 400 is not retried");
    assert_eq!(hits[0].event_id(), event_id);

    // The retry endpoint: roles and unknowns.
    let retry = format!("/v1/webhooks/strict/deliveries/{event_id}/retry");
    let (code, answer) = app.post_json(&retry, AUDITOR_TOKEN, &json!({})).await;
    assert_eq!(code, 403, "{answer}");
    let (code, answer) = app
        .post_json(&format!("/v1/webhooks/strict/deliveries/{}/retry", uuid::Uuid::new_v4()), ADMIN_TOKEN, &json!({}))
        .await;
    assert_eq!(code, 404, "{answer}");
    let (code, answer) =
        app.post_json(&format!("/v1/webhooks/nope/deliveries/{event_id}/retry"), ADMIN_TOKEN, &json!({})).await;
    assert_eq!(code, 404, "{answer}");
    let (code, answer) = app.get("/v1/webhooks/nope/deliveries", AUDITOR_TOKEN).await;
    assert_eq!(code, 404, "{answer}");
    let (code, answer) = app.get("/v1/webhooks/strict/deliveries", PROXY_TOKEN).await;
    assert_eq!(code, 403, "{answer}");

    // The receiver is fixed; the retry by hand delivers the same event.
    status.store(200, Ordering::SeqCst);
    let (code, answer) = app.post_json(&retry, ADMIN_TOKEN, &json!({})).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["state"], "pending", "{answer}");
    assert_eq!(answer["event_id"], event_id, "{answer}");
    let hits = wait_hits(&recv, "/strict", 2).await;
    assert_eq!(hits[1].event_id(), event_id, "the retry sends the same event id");
    assert_eq!(hits[1].raw.len(), hits[0].raw.len(), "the retry sends the same event");
    let items = wait_deliveries(&app, "strict", "delivered", |d| d.len() == 1 && d[0]["state"] == "delivered").await;
    assert_eq!(items[0]["last_status"], 200, "{}", items[0]);
    // A delivered event is not retried.
    let (code, answer) = app.post_json(&retry, ADMIN_TOKEN, &json!({})).await;
    assert_eq!(code, 409, "{answer}");
    assert_eq!(recv.hits_on("/strict").len(), 2);
}

// ---------------------------------------------------------------------------------
// 7. which decisions go where

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn denied_subscribers_get_denials_only_filtered_by_application() {
    let api = posture_api().await;
    let recv = Receiver::ok().await;
    let app = start_app(&api).await;
    create_webhook(&app, json!({"id": "all-denied", "url": recv.url("/all-denied"), "events": ["decision.denied"]}))
        .await;
    create_webhook(
        &app,
        json!({"id": "payroll-denied", "url": recv.url("/payroll-denied"), "events": ["decision.denied"],
               "applications": ["payroll"]}),
    )
    .await;
    create_webhook(&app, json!({"id": "allowed", "url": recv.url("/allowed"), "events": ["decision.allowed"]})).await;
    create_webhook(
        &app,
        json!({"id": "both-wiki", "url": recv.url("/both-wiki"), "events": ["decision.allowed", "decision.denied"],
               "applications": ["wiki"]}),
    )
    .await;
    // Disabled: gets nothing.
    create_webhook(
        &app,
        json!({"id": "off", "url": recv.url("/off"), "events": ["decision.denied", "decision.allowed"],
               "enabled": false}),
    )
    .await;

    let payroll_denied = [deny(&app, "payroll", "p1").await, deny(&app, "payroll", "p2").await];
    let payroll_allowed = [allow(&app, "payroll", "p3").await];
    let wiki_denied = [deny(&app, "wiki", "w1").await];
    let wiki_allowed = [allow(&app, "wiki", "w2").await, allow(&app, "wiki", "w3").await];
    // No matching policy: a deny too.
    let nobody = app.decision(json!({"application": "nobody-app", "username": "n1"})).await;
    assert_eq!(nobody["decision"], "deny", "{nobody}");

    let ids = |answers: &[&Value]| -> BTreeSet<String> { answers.iter().map(|a| decision_id(a)).collect() };
    let expect = [
        ("/all-denied", "all-denied", ids(&[&payroll_denied[0], &payroll_denied[1], &wiki_denied[0], &nobody])),
        ("/payroll-denied", "payroll-denied", ids(&[&payroll_denied[0], &payroll_denied[1]])),
        ("/allowed", "allowed", ids(&[&payroll_allowed[0], &wiki_allowed[0], &wiki_allowed[1]])),
        ("/both-wiki", "both-wiki", ids(&[&wiki_denied[0], &wiki_allowed[0], &wiki_allowed[1]])),
    ];
    for (p, webhook, expected) in &expect {
        wait_hits(&recv, p, expected.len()).await;
        wait_deliveries(&app, webhook, "all delivered", |d| d.len() >= expected.len() && all_in_state(d, "delivered"))
            .await;
    }
    // Everything that was recorded for delivery is in; now nothing more than expected.
    for (p, webhook, expected) in &expect {
        let hits = recv.hits_on(p);
        let got = detail_decision_ids(&hits);
        assert_eq!(&got, expected, "{p}");
        assert_eq!(hits.len(), expected.len(), "{p}: one call per event");
        let listed = deliveries(&app, webhook).await;
        assert_eq!(listed.len(), expected.len(), "{webhook}: {listed:?}");
        for hit in &hits {
            let body = hit.json();
            let decision = body["detail"]["decision"].as_str().expect("decision").to_owned();
            let (event_type, detail_type) = if decision == "deny" {
                ("decision.denied", "Decision Denied")
            } else {
                ("decision.allowed", "Decision Allowed")
            };
            assert_envelope(hit, event_type, detail_type);
        }
    }
    let nobody_hit = recv
        .hits_on("/all-denied")
        .into_iter()
        .find(|h| h.json()["detail"]["decision_id"] == nobody["decision_id"])
        .expect("the no-policy denial");
    assert!(resources(&nobody_hit.json()).contains(&"application:nobody-app".to_owned()));
    // The listing is newest first (the decisions were made one after the other), and
    // pages.
    let event_to_decision: std::collections::HashMap<String, String> = recv
        .hits_on("/all-denied")
        .iter()
        .map(|h| (h.event_id(), h.json()["detail"]["decision_id"].as_str().unwrap_or_default().to_owned()))
        .collect();
    let listed = deliveries(&app, "all-denied").await;
    let order: Vec<String> = listed
        .iter()
        .map(|d| event_to_decision.get(d["event_id"].as_str().unwrap_or_default()).cloned().unwrap_or_default())
        .collect();
    let newest_first: Vec<String> =
        [&nobody, &wiki_denied[0], &payroll_denied[1], &payroll_denied[0]].iter().map(|a| decision_id(a)).collect();
    assert_eq!(order, newest_first, "deliveries newest first: {listed:?}");
    let (status, first_page) = app.get("/v1/webhooks/all-denied/deliveries?limit=3", AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{first_page}");
    assert_eq!(first_page["items"].as_array().map(Vec::len), Some(3), "{first_page}");
    let cursor = first_page["next_cursor"].as_str().unwrap_or_else(|| panic!("a next page: {first_page}"));
    let (status, second_page) =
        app.get(&format!("/v1/webhooks/all-denied/deliveries?limit=3&cursor={cursor}"), AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{second_page}");
    assert_eq!(second_page["next_cursor"], Value::Null, "{second_page}");
    let paged: Vec<Value> = first_page["items"]
        .as_array()
        .expect("items")
        .iter()
        .chain(second_page["items"].as_array().expect("items"))
        .cloned()
        .collect();
    assert_eq!(paged, listed);
    assert!(recv.hits_on("/off").is_empty(), "a disabled webhook was called");
    assert!(deliveries(&app, "off").await.is_empty(), "a disabled webhook has deliveries");
    let types: BTreeSet<String> =
        deliveries(&app, "both-wiki").await.iter().filter_map(|d| d["type"].as_str().map(str::to_owned)).collect();
    assert_eq!(types, BTreeSet::from(["decision.allowed".to_owned(), "decision.denied".to_owned()]));
}

// ---------------------------------------------------------------------------------
// 8. rule.failed

#[tokio::test]
async fn a_rule_whose_api_fails_produces_rule_failed_naming_the_rule() {
    let api = posture_api().await;
    let recv = Receiver::ok().await;
    let app = start_app(&api).await;
    create_webhook(&app, json!({"id": "failures", "url": recv.url("/failures"), "events": ["rule.failed"]})).await;
    create_webhook(
        &app,
        json!({"id": "elsewhere", "url": recv.url("/elsewhere"), "events": ["rule.failed"],
               "applications": ["payroll"]}),
    )
    .await;

    let http_500 = decide(&app, "broken", "alice", "dev-ok", "deny").await;
    let refused = decide(&app, "refused", "bob", "dev-ok", "deny").await;
    // A plain denial is not a failure.
    deny(&app, "payroll", "carol").await;

    let hits = wait_hits(&recv, "/failures", 2).await;
    wait_deliveries(&app, "failures", "delivered", |d| d.len() >= 2 && all_in_state(d, "delivered")).await;
    let hits_now = recv.hits_on("/failures");
    assert_eq!(
        hits_now.len(),
        2,
        "only the two failing rules: {:?}",
        hits_now.iter().map(Hit::text).collect::<Vec<_>>()
    );
    assert_eq!(deliveries(&app, "failures").await.len(), 2);
    for (answer, rule, application, reason) in
        [(&http_500, "broken", "broken", "HTTP 500"), (&refused, "refused", "refused", "connection refused")]
    {
        let hit = hits
            .iter()
            .find(|h| h.json()["detail"]["decision_id"] == answer["decision_id"])
            .unwrap_or_else(|| panic!("no rule.failed for {rule}"));
        let body = assert_envelope(hit, "rule.failed", "Rule Failed");
        let detail = &body["detail"];
        assert_eq!(detail["rule_id"], rule, "{body}");
        assert_eq!(detail["application"], application, "{body}");
        let why = detail["reason"].as_str().unwrap_or_else(|| panic!("reason: {body}"));
        assert!(why.contains(reason), "{why:?} should say {reason:?}: {body}");
        let res = resources(&body);
        assert!(res.contains(&format!("rule:{rule}")), "{body}");
        assert!(res.contains(&format!("application:{application}")), "{body}");
    }
    // The application filter applies to rule.failed.
    assert!(recv.hits_on("/elsewhere").is_empty(), "a payroll-only webhook got another application's failure");
    assert!(deliveries(&app, "elsewhere").await.is_empty());
}

// ---------------------------------------------------------------------------------
// 9. config.changed

#[tokio::test]
async fn config_changes_are_sent_with_their_audit_entry_and_secrets_masked() {
    let api = posture_api().await;
    let recv = Receiver::ok().await;
    let app = start_app(&api).await;
    create_webhook(&app, json!({"id": "changes", "url": recv.url("/changes"), "events": ["config.changed"]})).await;
    let (_, audit) = app.get("/v1/audit-logs?limit=1", AUDITOR_TOKEN).await;
    let webhook_seq = audit["items"][0]["seq"].as_i64().expect("seq");

    let password = "cfg-PASSWORD-77aa";
    let rule = json!({"id": "hr-active", "method": "GET", "url": format!("{}/devices/%device_id%", api.uri()),
                      "auth": {"type": "basic", "username": "svc", "password": password}});
    let created = app.create_rule(rule.clone()).await;
    let (status, _) = app
        .put_json(
            "/v1/rules/hr-active",
            ADMIN_TOKEN,
            &json!({"method": "GET",
        "url": format!("{}/devices/%device_id%", api.uri()), "name": "HR active",
        "auth": {"type": "basic", "username": "svc", "password": MASK}}),
        )
        .await;
    assert_eq!(status, 200);
    app.create_policy(json!({"id": "hr", "applications": ["hr"], "rules": ["hr-active"]})).await;
    let (status, _) = app.delete("/v1/policies/hr", ADMIN_TOKEN).await;
    assert_eq!(status, 204);
    assert_eq!(created["auth"]["password"], MASK);

    // Every audit entry after the webhook existed.
    let (_, audit) = app.get("/v1/audit-logs?limit=1000", AUDITOR_TOKEN).await;
    let later: Vec<Value> = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["seq"].as_i64().is_some_and(|s| s > webhook_seq))
        .cloned()
        .collect();
    assert_eq!(later.len(), 4, "{audit}");
    // (Whether a webhook hears of its own creation is left open: only later entries count.)
    let later_hits = |hits: Vec<Hit>| -> Vec<Hit> {
        hits.into_iter().filter(|h| h.json()["detail"]["seq"].as_i64().is_some_and(|s| s > webhook_seq)).collect()
    };
    wait_for("4 config.changed events", 60, || async {
        let hits = later_hits(recv.hits_on("/changes"));
        if hits.len() >= 4 {
            Ok(())
        } else {
            Err(format!("{:?}", hits.iter().map(Hit::text).collect::<Vec<_>>()))
        }
    })
    .await;
    wait_deliveries(&app, "changes", "delivered", |d| d.len() >= 4 && all_in_state(d, "delivered")).await;
    let hits = later_hits(recv.hits_on("/changes"));
    assert_eq!(hits.len(), 4, "one event per audit entry: {:?}", hits.iter().map(Hit::text).collect::<Vec<_>>());
    for entry in &later {
        let hit = hits
            .iter()
            .find(|h| h.json()["detail"]["seq"] == entry["seq"])
            .unwrap_or_else(|| panic!("no config.changed for audit entry {entry}"));
        let body = assert_envelope(hit, "config.changed", "Config Changed");
        let detail = &body["detail"];
        for key in
            ["seq", "time", "actor", "action", "object_type", "object_id", "before", "after", "prev_hash", "hash"]
        {
            assert_eq!(detail[key], entry[key], "detail.{key} differs from the audit entry {entry}: {body}");
        }
        assert_eq!(detail["actor"], "test-admin");
        assert!(!String::from_utf8_lossy(&hit.raw).contains(password), "the password is in an event: {}", hit.text());
        if detail["object_id"] == "hr-active" {
            for doc in [&detail["before"], &detail["after"]] {
                if doc.is_object() {
                    assert_eq!(doc["auth"]["password"], MASK, "{body}");
                }
            }
        }
    }
    let actions: Vec<(String, String)> = later
        .iter()
        .rev()
        .map(|e| (e["object_id"].as_str().unwrap_or("").to_owned(), e["action"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert_eq!(
        actions,
        [("hr-active", "create"), ("hr-active", "update"), ("hr", "create"), ("hr", "delete")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
}

// ---------------------------------------------------------------------------------
// 10. circuit.opened / circuit.closed

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_circuit_opening_and_closing_are_events() {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    // The rule API: 503 until healthy, then compliant.
    let rule_api = Receiver::start(move |_, _| {
        if h.load(Ordering::SeqCst) {
            Reply {
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: "{\"status\":\"compliant\"}".into(),
                ..Reply::status(200)
            }
        } else {
            Reply::status(503)
        }
    })
    .await;
    let recv = Receiver::ok().await;
    let rules = json!([{"id": "flaky", "method": "GET", "url": rule_api.url("/check"),
                        "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]}]);
    let app = spawn_app_with(AppOptions {
        files: vec![(
            "test.json".into(),
            json!({"rules": rules, "policies": [{"id": "p", "applications": ["flaky-app"], "rules": ["flaky"]}]}),
        )],
        tweak: Some(Box::new(|s| {
            settings_tweak(s);
            s.engine.breaker.failures = 2;
            s.engine.breaker.cooldown = Duration::from_secs(1);
        })),
        ..Default::default()
    })
    .await;
    create_webhook(
        &app,
        json!({"id": "circuits", "url": recv.url("/circuits"), "events": ["circuit.opened", "circuit.closed"]}),
    )
    .await;
    let ctx = json!({"application": "flaky-app", "username": "alice"});
    for _ in 0..2 {
        assert_eq!(app.decision(ctx.clone()).await["decision"], "deny");
    }
    let open = app.decision(ctx.clone()).await;
    assert!(open["rules"][0]["reason"].as_str().is_some_and(|r| r.contains("circuit open")), "{open}");
    let hits = wait_hits(&recv, "/circuits", 1).await;
    let body = assert_envelope(&hits[0], "circuit.opened", "Circuit Opened");
    let origin = rule_api.uri.clone();
    assert!(body["detail"].to_string().contains(&origin), "the event names the origin {origin}: {body}");

    // Recovered: after the cool-down a probe succeeds and the circuit closes.
    healthy.store(true, Ordering::SeqCst);
    wait_for("a decision through the closed circuit", 60, || async {
        let d = app.decision(ctx.clone()).await;
        if d["decision"] == "allow" {
            Ok(())
        } else {
            Err(d.to_string())
        }
    })
    .await;
    let hits = wait_hits(&recv, "/circuits", 2).await;
    let closed = hits.iter().find(|h| h.event_type() == "circuit.closed").expect("circuit.closed");
    let body = assert_envelope(closed, "circuit.closed", "Circuit Closed");
    assert!(body["detail"].to_string().contains(&origin), "the event names the origin {origin}: {body}");
    assert_eq!(hits.iter().filter(|h| h.event_type() == "circuit.opened").count(), 1);
}

// ---------------------------------------------------------------------------------
// 11. the test call

#[tokio::test]
async fn the_test_call_answers_status_latency_and_the_start_of_the_answer() {
    let recv = Receiver::start(|_, hit| match hit.path.as_str() {
        "/big" => Reply { body: "x".repeat(10_000), ..Reply::status(202) },
        "/error" => Reply { body: "{\"error\":\"down for maintenance\"}".into(), ..Reply::status(500) },
        _ => Reply::status(404),
    })
    .await;
    let app = spawn_app_with(AppOptions { tweak: fast(), ..Default::default() }).await;
    let created =
        create_webhook(&app, json!({"id": "big", "url": recv.url("/big"), "events": ["decision.denied"]})).await;
    let secret = created["signing_secret"].as_str().expect("secret").to_owned();
    create_webhook(&app, json!({"id": "error", "url": recv.url("/error"), "events": ["decision.denied"]})).await;
    create_webhook(
        &app,
        json!({"id": "dead", "url": format!("{}/hook", closed_origin()), "events": ["decision.denied"]}),
    )
    .await;

    let (status, _) = app.post_json("/v1/webhooks/big/test", AUDITOR_TOKEN, &json!({})).await;
    assert_eq!(status, 403);
    let (status, _) = app.post_json("/v1/webhooks/nope/test", ADMIN_TOKEN, &json!({})).await;
    assert_eq!(status, 404);

    let (status, answer) = app.post_json("/v1/webhooks/big/test", ADMIN_TOKEN, &json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["delivered"], true, "{answer}");
    assert_eq!(answer["status"], 202, "{answer}");
    assert!(answer["latency_ms"].as_f64().is_some_and(|l| l >= 0.0), "{answer}");
    let body = answer["body"].as_str().unwrap_or_else(|| panic!("body: {answer}"));
    assert_eq!(body, "x".repeat(4096), "the first 4 KiB of the answer");
    assert_eq!(answer["error"], Value::Null, "{answer}");
    let hits = recv.hits_on("/big");
    assert_eq!(hits.len(), 1);
    let hit = &hits[0];
    assert_eq!(answer["event_id"], hit.event_id(), "{answer}");
    let envelope = assert_envelope(hit, "webhook.test", "WebhookTest");
    assert_eq!(envelope["account"], INSTANCE);
    assert_eq!(envelope["region"], REPLICA);
    assert_signed(hit, &secret);

    let (status, answer) = app.post_json("/v1/webhooks/error/test", ADMIN_TOKEN, &json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["delivered"], false, "{answer}");
    assert_eq!(answer["status"], 500, "{answer}");
    assert!(answer["body"].as_str().is_some_and(|b| b.contains("down for maintenance")), "{answer}");

    let (status, answer) = app.post_json("/v1/webhooks/dead/test", ADMIN_TOKEN, &json!({})).await;
    assert_eq!(status, 200, "a dead receiver is not verdict's error: {answer}");
    assert_eq!(answer["delivered"], false, "{answer}");
    assert_eq!(answer["status"], Value::Null, "{answer}");
    assert_eq!(answer["body"], Value::Null, "{answer}");
    assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
    assert!(answer["latency_ms"].is_number(), "{answer}");
}

// ---------------------------------------------------------------------------------
// 12. durability: kill -9 with the receiver down

fn binary_options<'a>(dir: &'a Path, run_name: &'a str, extra: &[(&'a str, &str)]) -> BinaryOptions<'a> {
    let mut env = vec![
        ("VERDICT_PROXY_TOKEN", PROXY_TOKEN.to_owned()),
        ("VERDICT_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("VERDICT_AUDITOR_TOKEN", AUDITOR_TOKEN.to_owned()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    BinaryOptions { dir, env, run_name }
}

async fn bin_send(bin: &Binary, m: Method, path: &str, token: &str, body: Option<&Value>) -> (u16, Value, String) {
    let mut req = bin.client.request(m, format!("{}{path}", bin.address)).bearer_auth(token);
    if let Some(body) = body {
        req = req.json(body);
    }
    let resp = req.send().await.expect("request to verdict");
    let status = resp.status().as_u16();
    let headers: Vec<String> =
        resp.headers().iter().map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes()))).collect();
    let text = resp.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, value, format!("{path} -> {status}\n{}\n\n{text}", headers.join("\n")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_of_answered_decisions_survive_kill_9_while_the_receiver_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = posture_api().await;
    write_file(dir.path(), "access.json", posture_rules(&api.uri()), posture_policies());
    let port = free_port();
    let secret = "whsec-DURABLE-0011223344";
    let mut bin = Binary::start(binary_options(dir.path(), "first", &[])).await;
    let hook = json!({"id": "siem", "url": format!("http://127.0.0.1:{port}/hook"), "events": ["decision.denied"],
                      "signing_secret": secret});
    let (status, created, _) = bin_send(&bin, Method::POST, "/v1/webhooks", ADMIN_TOKEN, Some(&hook)).await;
    assert_eq!(status, 201, "{created}");

    // 50 denials at once while nothing listens on the receiver's port.
    let n = 50;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = bin.client.clone();
            let url = format!("{}/v1/decisions", bin.address);
            tokio::spawn(async move {
                let ctx = json!({"application": "payroll", "username": format!("user-{i}"), "device_id": "dev-bad"});
                let resp = client.post(url).bearer_auth(PROXY_TOKEN).json(&ctx).send().await.expect("decision");
                read(resp).await
            })
        })
        .collect();
    let mut answered = BTreeSet::new();
    for task in tasks {
        let (status, body) = task.await.expect("task");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["decision"], "deny", "{body}");
        answered.insert(decision_id(&body));
    }
    // SIGKILL the moment the last answer is in.
    bin.child.kill().expect("kill -9");
    bin.child.wait().expect("wait");
    assert_eq!(answered.len(), n);

    // The receiver comes up on that port; verdict restarts on the same data.
    let recv = Receiver::start_on_port(port, |_, _| Reply::status(200)).await;
    let bin = Binary::start(binary_options(dir.path(), "second", &[])).await;
    let hits = wait_for(&format!("{n} distinct events at the receiver"), 120, || async {
        let hits = recv.hits_on("/hook");
        let distinct: HashSet<String> = hits.iter().map(Hit::event_id).collect();
        if distinct.len() >= n {
            Ok(hits)
        } else {
            Err(format!("{} calls, {} distinct events", hits.len(), distinct.len()))
        }
    })
    .await;
    let distinct: HashSet<String> = hits.iter().map(Hit::event_id).collect();
    assert_eq!(distinct.len(), n, "one event per denied decision");
    assert_eq!(detail_decision_ids(&hits), answered, "the events are those of the answered decisions");
    for hit in &hits {
        assert_eq!(hit.event_type(), "decision.denied");
        assert_eq!(hit.json()["id"], hit.event_id());
        assert_signed(hit, secret);
    }
    // A redelivered event carries the same id and decision: at least once, never mixed.
    for id in &distinct {
        let decisions: HashSet<String> = hits
            .iter()
            .filter(|h| &h.event_id() == id)
            .map(|h| h.json()["detail"]["decision_id"].to_string())
            .collect();
        assert_eq!(decisions.len(), 1, "event {id} names several decisions");
    }
    let (status, listing, _) =
        bin_send(&bin, Method::GET, "/v1/webhooks/siem/deliveries?limit=1000", AUDITOR_TOKEN, None).await;
    assert_eq!(status, 200, "{listing}");
    let _ = wait_for("every delivery delivered", 60, || async {
        let (_, listing, _) =
            bin_send(&bin, Method::GET, "/v1/webhooks/siem/deliveries?limit=1000", AUDITOR_TOKEN, None).await;
        let items = listing["items"].as_array().cloned().unwrap_or_default();
        if items.len() == n && all_in_state(&items, "delivered") {
            Ok(())
        } else {
            Err(listing.to_string())
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 13. nothing secret anywhere

const S_PASSWORD: &str = "whs-BASIC-PW-4f5e6d";
const S_HEADER_KEY: &str = "whs-HDR-KEY-7c8b9a";
const S_QUERY_KEY: &str = "whs-QRY-KEY-1a2b3c";
const S_REFUSED_KEY: &str = "whs-REF-KEY-4d5e6f";
const S_500_KEY: &str = "whs-500-KEY-7a8b9c";
const S_CLIENT_SECRET: &str = "whs-CS-0d1e2f";
const S_FAILING_SECRET: &str = "whs-CS-FAIL-3a4b5c";
const S_ACCESS_TOKEN: &str = "whs-ACCESS-TOKEN-6d7e8f";
const S_REJECTED: &str = "whs-REJECTED-PW-9a0b1c";
const S_SIGNING: &str = "whs-SIGNING-2d3e4f5a";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_webhook_secret_in_answers_deliveries_audit_logs_or_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = posture_api().await;
    write_file(dir.path(), "access.json", posture_rules(&api.uri()), posture_policies());
    let recv = Receiver::start(|_, hit| match hit.path.as_str() {
        "/fails" => Reply { body: "{\"error\":\"internal\"}".into(), ..Reply::status(500) },
        _ => Reply::status(200),
    })
    .await;
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": S_ACCESS_TOKEN, "token_type": "bearer", "expires_in": 3600})),
        )
        .mount(&idp)
        .await;
    // A token endpoint that refuses and echoes the secret it was sent.
    Mock::given(method("POST"))
        .and(path("/token-fail"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({
            "error": "invalid_client", "error_description": format!("client_secret {S_FAILING_SECRET} is wrong")
        })))
        .mount(&idp)
        .await;
    let mut bin = Binary::start(binary_options(dir.path(), "grep", &[("RUST_LOG", "debug")])).await;
    let mut seen: Vec<String> = Vec::new();
    let events = json!(["decision.denied", "config.changed"]);
    let hooks = [
        json!({"id": "s-basic", "url": recv.url("/basic"), "events": events, "signing_secret": S_SIGNING,
               "auth": {"type": "basic", "username": "svc", "password": S_PASSWORD}}),
        json!({"id": "s-key-header", "url": recv.url("/key-header"), "events": events,
               "auth": {"type": "api_key", "name": "X-API-Key", "value": S_HEADER_KEY, "in": "header"}}),
        json!({"id": "s-key-query", "url": recv.url("/key-query"), "events": events,
               "auth": {"type": "api_key", "name": "api_key", "value": S_QUERY_KEY, "in": "query"}}),
        json!({"id": "s-oauth", "url": recv.url("/oauth"), "events": events,
               "auth": {"type": "oauth2_client_credentials", "token_url": format!("{}/token", idp.uri()),
                        "client_id": "hooks", "client_secret": S_CLIENT_SECRET}}),
        json!({"id": "s-refused", "url": format!("{}/hook", closed_origin()), "events": events, "max_attempts": 2,
               "auth": {"type": "api_key", "name": "api_key", "value": S_REFUSED_KEY, "in": "query"}}),
        json!({"id": "s-500", "url": recv.url("/fails"), "events": events, "max_attempts": 2,
               "auth": {"type": "api_key", "name": "api_key", "value": S_500_KEY, "in": "query"}}),
        json!({"id": "s-oauth-fail", "url": recv.url("/oauth-fail"), "events": events, "max_attempts": 2,
               "auth": {"type": "oauth2_client_credentials", "token_url": format!("{}/token-fail", idp.uri()),
                        "client_id": "hooks", "client_secret": S_FAILING_SECRET}}),
    ];
    // The create answers: the signing secret (given or generated) once, nothing else.
    let mut signing = vec![S_SIGNING.to_owned()];
    let auth_secrets = [
        S_PASSWORD,
        S_HEADER_KEY,
        S_QUERY_KEY,
        S_REFUSED_KEY,
        S_500_KEY,
        S_CLIENT_SECRET,
        S_FAILING_SECRET,
        S_ACCESS_TOKEN,
        S_REJECTED,
    ];
    for hook in &hooks {
        let (status, created, text) = bin_send(&bin, Method::POST, "/v1/webhooks", ADMIN_TOKEN, Some(hook)).await;
        assert_eq!(status, 201, "{created}");
        for s in auth_secrets {
            assert!(!text.contains(s), "the create answer shows {s}: {text}");
        }
        let shown = created["signing_secret"].as_str().expect("signing secret").to_owned();
        assert_ne!(shown, MASK);
        if hook["id"] == "s-basic" {
            assert_eq!(shown, S_SIGNING);
        } else {
            signing.push(shown);
        }
    }
    let mut secrets: Vec<String> = auth_secrets.iter().map(|s| (*s).to_owned()).collect();
    secrets.extend(signing.iter().cloned());
    secrets.push(basic("svc", S_PASSWORD));
    for t in [ADMIN_TOKEN, PROXY_TOKEN, AUDITOR_TOKEN] {
        secrets.push(t.to_owned());
    }

    // Refused writes carrying secrets.
    let invalid = json!({"id": "s-invalid", "url": "ftp://x.example.com", "events": ["decision.denied"],
                         "auth": {"type": "basic", "username": "svc", "password": S_REJECTED}});
    let (status, _, text) = bin_send(&bin, Method::POST, "/v1/webhooks", ADMIN_TOKEN, Some(&invalid)).await;
    assert_eq!(status, 422);
    seen.push(text);
    let (status, _, text) = bin_send(&bin, Method::POST, "/v1/webhooks", ADMIN_TOKEN, Some(&hooks[0])).await;
    assert_eq!(status, 409);
    seen.push(text);

    // Updates: the masks sent back, secrets left out.
    for hook in &hooks {
        let id = hook["id"].as_str().expect("id");
        let (_, got, text) = bin_send(&bin, Method::GET, &format!("/v1/webhooks/{id}"), AUDITOR_TOKEN, None).await;
        seen.push(text);
        let (status, _, text) =
            bin_send(&bin, Method::PUT, &format!("/v1/webhooks/{id}"), ADMIN_TOKEN, Some(&got)).await;
        assert_eq!(status, 200, "{text}");
        seen.push(text);
        let mut without = got.clone();
        for field in ["password", "value", "client_secret"] {
            if let Some(auth) = without["auth"].as_object_mut() {
                auth.remove(field);
            }
        }
        without.as_object_mut().expect("object").remove("signing_secret");
        without["name"] = json!(format!("{id} renamed"));
        let (status, _, text) =
            bin_send(&bin, Method::PUT, &format!("/v1/webhooks/{id}"), ADMIN_TOKEN, Some(&without)).await;
        assert_eq!(status, 200, "{text}");
        seen.push(text);
    }

    // Events and test calls.
    for i in 0..3 {
        let ctx = json!({"application": "payroll", "username": format!("user-{i}"), "device_id": "dev-bad"});
        let (status, _, text) = bin_send(&bin, Method::POST, "/v1/decisions", PROXY_TOKEN, Some(&ctx)).await;
        assert_eq!(status, 200);
        seen.push(text);
    }
    for hook in &hooks {
        let id = hook["id"].as_str().expect("id");
        let (status, _, text) =
            bin_send(&bin, Method::POST, &format!("/v1/webhooks/{id}/test"), ADMIN_TOKEN, Some(&json!({}))).await;
        assert_eq!(status, 200, "{text}");
        seen.push(text);
    }
    // Wait until every delivery is final (the failing ones failed with an error).
    for hook in &hooks {
        let id = hook["id"].as_str().expect("id");
        let path = format!("/v1/webhooks/{id}/deliveries?limit=1000");
        wait_for(&format!("final deliveries of {id}"), 90, || async {
            let (_, listing, _) = bin_send(&bin, Method::GET, &path, AUDITOR_TOKEN, None).await;
            let items = listing["items"].as_array().cloned().unwrap_or_default();
            if items.len() >= 3 && items.iter().all(|d| d["state"] == "delivered" || d["state"] == "failed") {
                Ok(())
            } else {
                Err(listing.to_string())
            }
        })
        .await;
        let (_, listing, text) = bin_send(&bin, Method::GET, &path, AUDITOR_TOKEN, None).await;
        seen.push(text);
        let expected = if ["s-refused", "s-500", "s-oauth-fail"].contains(&id) { "failed" } else { "delivered" };
        for d in listing["items"].as_array().expect("items") {
            assert_eq!(d["state"], expected, "{id}: {d}");
            if expected == "failed" {
                assert!(d["last_error"].is_string() || d["last_status"].is_number(), "{id}: {d}");
            }
        }
    }
    // The receivers got the real credentials: the secrets were used, just not shown.
    let hit = &wait_hits(&recv, "/basic", 1).await[0];
    assert_eq!(hit.header("authorization"), Some(format!("Basic {}", basic("svc", S_PASSWORD)).as_str()));
    assert_signed(hit, S_SIGNING);
    assert_eq!(wait_hits(&recv, "/key-header", 1).await[0].header("x-api-key"), Some(S_HEADER_KEY));
    assert_eq!(wait_hits(&recv, "/key-query", 1).await[0].query_value("api_key"), Some(S_QUERY_KEY));
    assert_eq!(wait_hits(&recv, "/fails", 1).await[0].query_value("api_key"), Some(S_500_KEY));
    let bearer = format!("Bearer {S_ACCESS_TOKEN}");
    assert_eq!(wait_hits(&recv, "/oauth", 1).await[0].header("authorization"), Some(bearer.as_str()));

    for p in [
        "/v1/webhooks",
        "/v1/audit-logs?limit=1000",
        "/v1/audit-logs?object_type=webhook&limit=1000",
        "/v1/activity-logs?limit=1000",
        "/metrics",
        "/openapi.json",
    ] {
        let (status, _, text) = bin_send(&bin, Method::GET, p, AUDITOR_TOKEN, None).await;
        assert_eq!(status, 200, "{text}");
        seen.push(text);
    }
    bin.stop().await;

    // The grep.
    for text in &seen {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "an answer contains {s}:\n{text}");
        }
    }
    let stderr = bin.stderr_text();
    assert!(stderr.contains("DEBUG"), "debug logging was not on; the grep would prove little");
    for (what, text) in [("stderr", stderr), ("stdout", bin.stdout_text())] {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "{what} contains {s}");
        }
    }
    let data = dir.path().join("data");
    let mut files = 0;
    let mut stack = vec![data.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read data dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&p).expect("read");
            for s in &secrets {
                assert!(!bytes.windows(s.len()).any(|w| w == s.as_bytes()), "{} holds {s}", p.display());
            }
        }
    }
    assert!(files > 0, "the data directory is empty");
    if let Some(url) = test_database_url(dir.path()) {
        let dump = pg_dump(&url);
        assert!(dump.windows(b"s-key-query".len()).any(|w| w == b"s-key-query"), "webhooks not in the database");
        for s in &secrets {
            assert!(!dump.windows(s.len()).any(|w| w == s.as_bytes()), "the database holds {s}");
        }
    }
}

// ---------------------------------------------------------------------------------
// 14. a hanging receiver does not slow decisions

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_receiver_does_not_hold_up_decisions() {
    let api = posture_api().await;
    // Holds every answer until the test opens the gate.
    let recv = Receiver::start(|_, _| Reply { hold: true, ..Reply::status(200) }).await;
    let app = start_app(&api).await;
    create_webhook(
        &app,
        json!({"id": "stuck", "url": recv.url("/stuck"), "events": ["decision.denied", "decision.allowed"],
               "timeout_ms": 60000}),
    )
    .await;
    // The first event's call goes out and hangs.
    let first = deny(&app, "payroll", "first").await;
    wait_hits(&recv, "/stuck", 1).await;

    // While it hangs, decisions keep being answered, concurrently and in sequence. The
    // webhook's own time-out (60 s) is far beyond: a decision that waited on the
    // receiver could not be answered before the gate opens.
    let n = 60;
    let concurrent = futures::future::join_all((0..n).map(|i| {
        let app = &app;
        async move {
            if i % 2 == 0 {
                deny(app, "payroll", &format!("c-{i}")).await
            } else {
                allow(app, "wiki", &format!("c-{i}")).await
            }
        }
    }));
    let answers = tokio::time::timeout(Duration::from_secs(45), concurrent)
        .await
        .expect("decisions were held up by a receiver that does not answer");
    let mut ids: BTreeSet<String> = answers.iter().map(decision_id).collect();
    let sequential = tokio::time::timeout(Duration::from_secs(45), async {
        let mut out = Vec::new();
        for i in 0..20 {
            out.push(deny(&app, "payroll", &format!("s-{i}")).await);
        }
        out
    })
    .await
    .expect("decisions were held up by a receiver that does not answer");
    ids.extend(sequential.iter().map(decision_id));
    ids.insert(decision_id(&first));
    assert_eq!(recv.answered(), 0, "the receiver answered nothing while the decisions were made");
    assert_eq!(ids.len(), n + 21);
    // The waiting events are in the store's outbox, and the metric shows them.
    wait_for("a non-zero outbox depth while the receiver hangs", 60, || async {
        let metrics = metrics_text(&app.address).await;
        match sample(&metrics, "verdict_webhook_outbox_depth", &[]) {
            Some(depth) if depth > 0.0 => Ok(()),
            other => Err(format!("verdict_webhook_outbox_depth {other:?}")),
        }
    })
    .await;

    // Released, every event arrives.
    recv.open_gate();
    let hits = wait_for("all events after the receiver recovered", 120, || async {
        let hits = recv.hits_on("/stuck");
        let got = detail_decision_ids(&hits);
        if got.len() >= ids.len() {
            Ok(hits)
        } else {
            Err(format!("{} of {} decisions", got.len(), ids.len()))
        }
    })
    .await;
    assert_eq!(detail_decision_ids(&hits), ids);
    wait_for("an empty outbox once everything is delivered", 60, || async {
        let metrics = metrics_text(&app.address).await;
        match sample(&metrics, "verdict_webhook_outbox_depth", &[]) {
            Some(0.0) => Ok(()),
            other => Err(format!("verdict_webhook_outbox_depth {other:?}")),
        }
    })
    .await;
    let items = deliveries(&app, "stuck").await;
    assert_eq!(items.len(), ids.len());
    assert!(all_in_state(&items, "delivered"), "{items:?}");
}

// ---------------------------------------------------------------------------------
// the event names themselves

#[tokio::test]
async fn every_event_type_of_the_contract_is_accepted() {
    let recv = Receiver::ok().await;
    let app = spawn_app_with(AppOptions { tweak: fast(), ..Default::default() }).await;
    let created =
        create_webhook(&app, json!({"id": "everything", "url": recv.url("/all"), "events": EVENT_TYPES})).await;
    assert_eq!(created["events"], json!(EVENT_TYPES));
    for bad in [json!([]), json!(["decision.*"]), json!(["Decision.Denied"])] {
        let (status, answer) = app
            .post_json("/v1/webhooks", ADMIN_TOKEN, &json!({"id": "bad", "url": recv.url("/x"), "events": bad}))
            .await;
        assert_eq!(status, 422, "events {bad}: {answer}");
        assert!(
            answer["error"]["details"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["field"].as_str().is_some_and(|f| f.starts_with("events")))),
            "{answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_probed_at_the_cool_down_pace_not_once_per_event_and_gets_everything_back() {
    let api = posture_api().await;
    // 503 until the test flips the switch, then 200.
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = healthy.clone();
    let recv =
        Receiver::start(move |_, _| if flag.load(Ordering::SeqCst) { Reply::status(200) } else { Reply::status(503) })
            .await;
    let app = start_app(&api).await;
    create_webhook(&app, json!({"id": "flaky", "url": recv.url("/flaky"), "events": ["decision.denied"]})).await;
    let mut decided = BTreeSet::new();
    for i in 0..40 {
        decided.insert(decision_id(&deny(&app, "payroll", &format!("u{i}")).await));
    }
    // Three seconds of outage. Retried once per event with 200 ms doubling, 40 events
    // would make well over 100 calls; cooled down as one receiver, the first calls and
    // then one probe per cool-down (0.2, 0.4, 0.8, 1.6 s…): far fewer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = recv.hits_on("/flaky").len();
    assert!(during >= 1, "the receiver was tried");
    assert!(during < 30, "a failing receiver got {during} calls for 40 events: it is not cooled down as one");
    let pending = deliveries(&app, "flaky").await;
    assert_eq!(pending.len(), 40);
    assert!(pending.iter().all(|d| d["state"] == "pending"), "nothing failed for good: {pending:?}");
    // Events that were not called wait, and say why.
    let waiting: Vec<&Value> = pending.iter().filter(|d| d["attempts"] == 0).collect();
    assert!(!waiting.is_empty(), "{pending:?}");
    assert!(waiting.iter().all(|d| d["last_error"].as_str().is_some_and(|e| e.contains("HTTP 503"))), "{waiting:?}");
    // …but they are not rewritten while they wait: a failing receiver costs the store
    // nothing per waiting event.
    assert!(waiting.iter().all(|d| d["updated_at"] == d["created_at"]), "{waiting:?}");
    let attempts: u64 = pending.iter().map(|d| d["attempts"].as_u64().unwrap()).sum();
    assert!(attempts <= during as u64, "{attempts} attempts recorded for {during} calls");

    // The receiver comes back: the next probe gets through and every event follows.
    healthy.store(true, Ordering::SeqCst);
    wait_deliveries(&app, "flaky", "every event delivered after the receiver recovered", |items| {
        items.len() == 40 && all_in_state(items, "delivered")
    })
    .await;
    let got: BTreeSet<String> = detail_decision_ids(&recv.hits_on("/flaky"));
    assert_eq!(got, decided);
}

/// Events that wait longer than their whole retry schedule for a receiver that keeps
/// failing fail for good ("gave up"), without a call each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_overdue_by_their_whole_retry_schedule_give_up_without_a_call_each() {
    let api = posture_api().await;
    let recv = Receiver::start(|_, _| Reply::status(503)).await;
    let app = start_app(&api).await;
    // max_attempts 2: the schedule is one 200 ms backoff.
    let hook = json!({"id": "gone", "url": recv.url("/gone"), "events": ["decision.denied"], "max_attempts": 2});
    create_webhook(&app, hook).await;
    for i in 0..30 {
        deny(&app, "payroll", &format!("u{i}")).await;
    }
    let items = wait_deliveries(&app, "gone", "every delivery failed for good", |items| {
        items.len() == 30 && all_in_state(items, "failed")
    })
    .await;
    let calls = recv.hits_on("/gone").len();
    let attempts: u64 = items.iter().map(|d| d["attempts"].as_u64().unwrap()).sum();
    assert!(attempts <= calls as u64, "{attempts} attempts recorded for {calls} calls");
    assert!(calls < 30, "{calls} calls for 30 events: not cooled down as one receiver");
    let gave_up: Vec<&Value> = items.iter().filter(|d| d["attempts"] == 0).collect();
    assert!(!gave_up.is_empty(), "{items:?}");
    for d in &gave_up {
        let error = d["last_error"].as_str().unwrap_or_default();
        assert!(error.starts_with("gave up:") && error.contains("HTTP 503"), "{d}");
        assert_eq!(d["last_status"], 503, "{d}");
        assert_eq!(d["next_attempt_at"], Value::Null, "{d}");
    }
}

/// Pending events of a webhook that no longer exists (deleted while verdict was down)
/// fail when the delivery loop starts, once they have been due for the grace period a
/// webhook created on another replica needs to be known here; younger ones wait.
#[tokio::test]
async fn pending_events_of_an_unknown_webhook_fail_after_a_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open_test_store(dir.path()).await;
        let event = |id: &str| verdict::store::OutboxEvent {
            webhook_id: "ghost".into(),
            event_id: id.into(),
            event_type: "decision.denied".into(),
            payload: json!({"id": id}).to_string(),
            max_attempts: 8,
        };
        store.enqueue_events(&[event("old"), event("young")]).await.unwrap();
        let now = verdict::store::unix_micros(time::OffsetDateTime::now_utc());
        let claimed = store.claim_deliveries("prep", now, 60_000_000, &[("ghost".to_string(), 1)]).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let an_hour_ago = verdict::store::DeliveryUpdate {
            state: verdict::store::DeliveryState::Pending,
            attempts: 1,
            last_status: Some(503),
            last_error: Some("HTTP 503".into()),
            next_attempt_us: now - 3_600_000_000,
        };
        store.finish_delivery(claimed[0].id, &an_hour_ago).await.unwrap();
    }
    let app = spawn_app_with(AppOptions { tweak: fast(), dir: Some(dir), ..Default::default() }).await;
    let old = wait_for("the old event of the unknown webhook failed", 30, || async {
        let d = app.state.store.get_delivery("ghost", "old").await.unwrap().expect("still there");
        if d.state == verdict::store::DeliveryState::Failed {
            Ok(d)
        } else {
            Err(format!("{d:?}"))
        }
    })
    .await;
    assert_eq!((old.last_error.as_deref(), old.last_status), (Some("the webhook was deleted"), Some(503)));
    let young = app.state.store.get_delivery("ghost", "young").await.unwrap().expect("still there");
    assert_eq!(young.state, verdict::store::DeliveryState::Pending, "within the grace period");
}

/// Deleting a webhook fails its pending events (in the background); a webhook created
/// again with the same id is not touched by that cleanup and gets its own events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_webhook_fails_its_pending_events_and_a_new_one_with_its_id_starts_clean() {
    let api = posture_api().await;
    let app = start_app(&api).await;
    let dead = json!({"id": "siem", "url": format!("{}/hook", closed_origin()), "events": ["decision.denied"]});
    create_webhook(&app, dead).await;
    for i in 0..10 {
        deny(&app, "payroll", &format!("u{i}")).await;
    }
    let pending = deliveries(&app, "siem").await;
    assert_eq!(pending.len(), 10);
    assert!(all_in_state(&pending, "pending"), "{pending:?}");

    let deleted = app.request(Method::DELETE, "/v1/webhooks/siem").bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    let recv = Receiver::ok().await;
    // Re-created at once: the create waits for the old cleanup, so it cannot fail the
    // new webhook's events.
    create_webhook(&app, json!({"id": "siem", "url": recv.url("/siem"), "events": ["decision.denied"]})).await;
    let fresh = decision_id(&deny(&app, "payroll", "after").await);
    let hits = wait_hits(&recv, "/siem", 1).await;
    assert_eq!(detail_decision_ids(&hits), BTreeSet::from([fresh.clone()]));

    let items = wait_deliveries(&app, "siem", "the old events failed and the new one delivered", |items| {
        items.len() == 11 && items.iter().filter(|d| d["state"] == "failed").count() == 10
    })
    .await;
    for d in &items {
        if d["state"] == "failed" {
            assert_eq!(d["last_error"], "the webhook was deleted", "{d}");
        } else {
            assert_eq!(d["state"], "delivered", "{d}");
        }
    }
}
