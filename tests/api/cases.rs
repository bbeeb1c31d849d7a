//! The data-driven table: `fixtures/cases/*.json`, each
//! `{"description", "defaults": {"context", "rule", "api"}, "cases": [...]}` where a case
//! is `{"name", "context", "rule", "api", "expect"}` (see fixtures/cases/README.md).
//! One test runs them all — one verdict per file, one local API per case — compares
//! outcome, decision, reasons and what the API received, and checks that the table
//! covers every response action type (met and not met) and every placeholder.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::*;
use crate::tools::closed_origin;

const ACTION_TYPES: [&str; 10] = [
    "equals",
    "not_equals",
    "contains",
    "not_contains",
    "matches",
    "exists",
    "not_exists",
    "greater_than",
    "less_than",
    "one_of",
];

/// Replaces `{{file:PATH}}` (a whole string: the fixture file's text) and
/// `{{cert:NAME.FIELD}}` (anywhere in a string: a value of certs/expected.json;
/// `alt_names` joined with `,`).
fn substitute(value: &mut Value, certs: &Value) {
    match value {
        Value::String(s) => {
            if let Some(file) = s.strip_prefix("{{file:").and_then(|r| r.strip_suffix("}}")) {
                *s = std::fs::read_to_string(fixture(file)).unwrap_or_else(|e| panic!("fixture {file}: {e}"));
                return;
            }
            while let Some(start) = s.find("{{cert:") {
                let end = start + s[start..].find("}}").expect("unclosed {{cert:");
                let key = &s[start + 7..end];
                let (name, field) = key.split_once('.').expect("{{cert:NAME.FIELD}}");
                let v = &certs[name][field];
                let text = match v {
                    Value::String(t) => t.clone(),
                    Value::Array(items) => items.iter().map(|i| i.as_str().unwrap()).collect::<Vec<_>>().join(","),
                    other => panic!("no certificate value {key}: {other}"),
                };
                s.replace_range(start..end + 2, &text);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| substitute(i, certs)),
        Value::Object(map) => map.values_mut().for_each(|v| substitute(v, certs)),
        _ => {}
    }
}

/// `defaults` shallow-merged under `case` for the keys context, rule and api.
fn merged(defaults: &Value, case: &Value, key: &str) -> Value {
    let mut out = defaults.get(key).cloned().unwrap_or_else(|| json!({}));
    if let Some(over) = case.get(key).and_then(Value::as_object) {
        for (k, v) in over {
            out[k] = v.clone();
        }
    }
    out
}

struct Prepared {
    name: String,
    application: String,
    context: Value,
    expect: Value,
    api: Option<MockServer>,
}

async fn start_api(api: &Value) -> Option<MockServer> {
    if api["unreachable"] == true {
        return None;
    }
    let mut template = ResponseTemplate::new(api["status"].as_u64().unwrap_or(200) as u16);
    let content_type = api["content_type"].as_str();
    match &api["body"] {
        Value::Null => {}
        Value::String(text) => {
            template = template.set_body_raw(text.clone().into_bytes(), content_type.unwrap_or("text/plain"))
        }
        body => {
            template =
                template.set_body_raw(serde_json::to_vec(body).unwrap(), content_type.unwrap_or("application/json"))
        }
    }
    if let Some(location) = api["location"].as_str() {
        template = template.insert_header("location", location);
    }
    if let Some(ms) = api["delay_ms"].as_u64() {
        template = template.set_delay(Duration::from_millis(ms));
    }
    let server = MockServer::start().await;
    Mock::given(any()).respond_with(template).mount(&server).await;
    Some(server)
}

fn pairs_to_object(pairs: Vec<(String, String)>) -> Result<Value, String> {
    let mut map = Map::new();
    for (k, v) in pairs {
        if map.insert(k.clone(), Value::String(v)).is_some() {
            return Err(format!("key `{k}` appears twice"));
        }
    }
    Ok(Value::Object(map))
}

fn check_request(req: &Request, want: &Value) -> Result<(), String> {
    let want = want.as_object().ok_or("expect.request must be an object or null")?;
    let mut problems = Vec::new();
    fn check(problems: &mut Vec<String>, what: &str, got: Value, expected: &Value) {
        if &got != expected {
            problems.push(format!("{what}: got {got}, expected {expected}"));
        }
    }
    for (key, expected) in want {
        match key.as_str() {
            "method" => check(&mut problems, "method", json!(req.method.as_str()), expected),
            "path" => check(&mut problems, "path", json!(req.url.path()), expected),
            "path_segments" => {
                let segments: Vec<String> = req
                    .url
                    .path()
                    .trim_start_matches('/')
                    .split('/')
                    .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned())
                    .collect();
                check(&mut problems, "decoded path segments", json!(segments), expected)
            }
            "raw_query" => check(&mut problems, "raw query", json!(req.url.query()), expected),
            "query" => {
                let pairs = req.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
                match pairs_to_object(pairs) {
                    Ok(q) => check(&mut problems, "query", q, expected),
                    Err(e) => problems.push(format!("query: {e}")),
                }
            }
            "body" => match serde_json::from_slice::<Value>(&req.body) {
                Ok(body) => check(&mut problems, "JSON body", body, expected),
                Err(_) => problems.push(format!("body is not JSON: {}", String::from_utf8_lossy(&req.body))),
            },
            "form" => {
                let pairs =
                    url::form_urlencoded::parse(&req.body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
                match pairs_to_object(pairs) {
                    Ok(f) => check(&mut problems, "form body", f, expected),
                    Err(e) => problems.push(format!("form: {e}")),
                }
            }
            "body_text" => check(&mut problems, "body text", json!(String::from_utf8_lossy(&req.body)), expected),
            "headers" => {
                for (name, value) in expected.as_object().ok_or("expect.request.headers must be an object")? {
                    let got =
                        req.headers.get(name.as_str()).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                    check(&mut problems, &format!("header {name}"), json!(got), value);
                }
            }
            "headers_absent" => {
                for name in expected.as_array().ok_or("headers_absent must be a list")? {
                    let name = name.as_str().unwrap_or_default();
                    if req.headers.contains_key(name) {
                        problems.push(format!("header {name} was sent"));
                    }
                }
            }
            other => problems.push(format!("unknown expect.request key `{other}`")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn as_list(v: &Value) -> Vec<String> {
    match v {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().map(|i| i.as_str().expect("strings").to_owned()).collect(),
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

async fn check_case(app: &TestApp, case: &Prepared) -> Result<(), String> {
    let (status, answer) = app.decide(case.context.clone()).await;
    if status != 200 {
        return Err(format!("HTTP {status}: {answer}"));
    }
    let mut problems = Vec::new();
    let expect = &case.expect;
    let rule = &answer["rules"][0];
    if let Some(outcome) = expect["outcome"].as_str() {
        if rule["outcome"] != outcome {
            problems.push(format!("outcome {} (expected {outcome})", rule["outcome"]));
        }
    }
    if let Some(decision) = expect["decision"].as_str() {
        if answer["decision"] != decision {
            problems.push(format!("decision {} (expected {decision})", answer["decision"]));
        }
    }
    if let Some(http_status) = expect.get("http_status") {
        if &rule["http_status"] != http_status {
            problems.push(format!("http_status {} (expected {http_status})", rule["http_status"]));
        }
    }
    let reason = answer["reason"].as_str().unwrap_or_default();
    for needle in as_list(&expect["reason_contains"]) {
        if !reason.contains(&needle) {
            problems.push(format!("reason {reason:?} lacks {needle:?}"));
        }
    }
    let rule_reason = rule["reason"].as_str().unwrap_or_default();
    for needle in as_list(&expect["rule_reason_contains"]) {
        if !rule_reason.contains(&needle) {
            problems.push(format!("rule reason {rule_reason:?} lacks {needle:?}"));
        }
    }
    if let Some(want) = expect.get("request") {
        let received = match &case.api {
            Some(api) => api.received_requests().await.unwrap_or_default(),
            None => Vec::new(),
        };
        match (want, received.as_slice()) {
            (Value::Null, []) => {}
            (Value::Null, got) => problems.push(format!("the API was called {} time(s); expected none", got.len())),
            (want, [one]) => {
                if let Err(e) = check_request(one, want) {
                    problems.push(e);
                }
            }
            (_, got) => problems.push(format!("the API was called {} time(s); expected once", got.len())),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}\n      answer: {answer}", problems.join("\n      ")))
    }
}

/// What the table covers, gathered while it runs.
#[derive(Default)]
struct Coverage {
    /// (action type, outcome) of single-action cases.
    actions: BTreeSet<(String, String)>,
    /// Rule texts of cases that check what the API received.
    checked_rules: Vec<String>,
    status_code_keys: usize,
    match_any: BTreeSet<String>,
    jsonp: BTreeSet<String>,
}

impl Coverage {
    fn record(&mut self, rule: &Value, expect: &Value) {
        let outcome = expect["outcome"].as_str().unwrap_or_default().to_owned();
        let actions = rule["response_actions"].as_array().cloned().unwrap_or_default();
        if let [one] = actions.as_slice() {
            self.actions.insert((one["type"].as_str().unwrap_or_default().to_owned(), outcome.clone()));
        }
        if actions.iter().any(|a| a["key"] == "status_code") {
            self.status_code_keys += 1;
        }
        if rule["match"] == "any" {
            self.match_any.insert(outcome.clone());
        }
        if rule["verification"] == "jsonp" {
            self.jsonp.insert(outcome.clone());
        }
        if expect["request"].is_object() {
            self.checked_rules.push(rule.to_string());
        }
    }

    fn gaps(&self) -> Vec<String> {
        let mut gaps = Vec::new();
        for t in ACTION_TYPES {
            for outcome in ["allow", "deny"] {
                if !self.actions.contains(&(t.to_owned(), outcome.to_owned())) {
                    gaps.push(format!("no single-action `{t}` case with outcome {outcome}"));
                }
            }
        }
        for (name, _) in verdict::template::PARAMETERS {
            let needle = match name.strip_suffix("NAME") {
                Some(prefix) => format!("%{prefix}"),
                None => format!("%{name}%"),
            };
            if !self.checked_rules.iter().any(|r| r.contains(&needle)) {
                gaps.push(format!("no case checks what the API receives for `{needle}`"));
            }
        }
        if self.status_code_keys < 2 {
            gaps.push("fewer than two `status_code` cases".into());
        }
        for outcome in ["allow", "deny"] {
            if !self.match_any.contains(outcome) {
                gaps.push(format!("no `match: any` case with outcome {outcome}"));
            }
            if !self.jsonp.contains(outcome) {
                gaps.push(format!("no `jsonp` case with outcome {outcome}"));
            }
        }
        gaps
    }
}

async fn run_file(path: &Path, certs: &Value, coverage: &mut Coverage) -> (usize, Vec<String>) {
    let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut table: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{file_name} is not JSON: {e}"));
    substitute(&mut table, certs);
    let defaults = table.get("defaults").cloned().unwrap_or_else(|| json!({}));
    let cases = table["cases"].as_array().unwrap_or_else(|| panic!("{file_name}: no `cases` list")).clone();
    let refused = closed_origin();
    let mut names = BTreeSet::new();
    let mut rules = Vec::new();
    let mut policies = Vec::new();
    let mut prepared = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap_or_else(|| panic!("{file_name}: case {i} has no name")).to_owned();
        assert!(names.insert(name.clone()), "{file_name}: case name `{name}` is used twice");
        let api_spec = merged(&defaults, case, "api");
        let api = start_api(&api_spec).await;
        let mut rule = merged(&defaults, case, "rule");
        let url = rule["url"].as_str().unwrap_or_else(|| panic!("{file_name}: {name}: rule has no url")).to_owned();
        let origin = api.as_ref().map(|a| a.uri()).unwrap_or_else(|| refused.clone());
        rule["url"] = json!(format!("{origin}{url}"));
        let (rule_id, application) = (format!("c{i}"), format!("case-{i}"));
        rule["id"] = json!(rule_id);
        let expect = case["expect"].clone();
        assert!(expect.is_object(), "{file_name}: {name}: no `expect`");
        coverage.record(&rule, &expect);
        rules.push(rule);
        policies.push(json!({"id": format!("p{i}"), "applications": [application], "rules": [rule_id]}));
        let mut context = merged(&defaults, case, "context");
        context["application"] = json!(application);
        prepared.push(Prepared { name, application, context, expect, api });
    }
    let app = spawn_app_with(AppOptions {
        files: vec![(file_name.clone(), json!({"rules": rules, "policies": policies}))],
        ..Default::default()
    })
    .await;
    let mut failures = Vec::new();
    for case in &prepared {
        // A hung case is reported by name instead of hanging the whole table.
        let result = tokio::time::timeout(Duration::from_secs(60), check_case(&app, case))
            .await
            .unwrap_or_else(|_| Err("no answer within 60 s".into()));
        if let Err(e) = result {
            failures.push(format!("{file_name}: {} ({}): {e}", case.name, case.application));
        }
    }
    let count = prepared.len();
    // `MockServer`'s drop blocks on futures inside this task; dropping dozens in one
    // poll exhausts tokio's cooperative budget and the drop then waits forever for a
    // wake-up only the runtime could deliver. One drop per poll avoids that.
    for case in prepared {
        drop(case);
        tokio::task::yield_now().await;
    }
    (count, failures)
}

#[tokio::test]
async fn every_case_of_the_fixture_table_holds() {
    let certs: Value = serde_json::from_str(&std::fs::read_to_string(fixture("certs/expected.json")).unwrap()).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(fixture("cases"))
        .expect("fixtures/cases")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut coverage = Coverage::default();
    let mut total = 0;
    let mut per_file = BTreeMap::new();
    let mut failures = Vec::new();
    for path in &files {
        let (n, mut f) = run_file(path, &certs, &mut coverage).await;
        per_file.insert(path.file_name().unwrap().to_string_lossy().into_owned(), n);
        total += n;
        failures.append(&mut f);
    }
    assert!(total >= 50, "the table has only {total} cases: {per_file:?}");
    let gaps = coverage.gaps();
    assert!(gaps.is_empty(), "the table does not cover:\n  {}", gaps.join("\n  "));
    assert!(failures.is_empty(), "{} of {total} cases failed:\n  {}", failures.len(), failures.join("\n  "));
}
