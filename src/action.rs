//! Response actions: how an API's answer maps to "criteria met". Compiled once when a
//! rule is saved (JSONPath, regular expression, value types checked) and evaluated
//! per call without re-parsing anything.

use std::fmt;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::rule::FieldError;

/// The kinds of response action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Equals,
    NotEquals,
    Contains,
    NotContains,
    Matches,
    Exists,
    NotExists,
    GreaterThan,
    LessThan,
    OneOf,
}

impl ActionKind {
    const ALL: &'static [(&'static str, ActionKind)] = &[
        ("equals", ActionKind::Equals),
        ("not_equals", ActionKind::NotEquals),
        ("contains", ActionKind::Contains),
        ("not_contains", ActionKind::NotContains),
        ("matches", ActionKind::Matches),
        ("exists", ActionKind::Exists),
        ("not_exists", ActionKind::NotExists),
        ("greater_than", ActionKind::GreaterThan),
        ("less_than", ActionKind::LessThan),
        ("one_of", ActionKind::OneOf),
    ];

    fn parse(s: &str) -> Option<ActionKind> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, k)| *k)
    }

    /// The name used in rules and reasons.
    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(_, k)| *k == self).map(|(n, _)| *n).unwrap_or("equals")
    }
}

/// A response action as written in a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    #[serde(rename = "type")]
    pub kind: String,
    /// A JSONPath into the body (`status` alone means `$.status`), or `status_code`.
    pub key: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub value: Option<Value>,
}

/// `Some(null)` for an explicit `null`, so `equals null` can be written.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// What an action looks at.
#[derive(Clone)]
pub enum Key {
    StatusCode,
    Path { text: String, compiled: jsonpath_lib::Compiled },
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Key {
    /// The key as shown in reasons.
    pub fn as_str(&self) -> &str {
        match self {
            Key::StatusCode => "status_code",
            Key::Path { text, .. } => text,
        }
    }
}

/// A compiled response action.
#[derive(Debug, Clone)]
pub struct Action {
    pub kind: ActionKind,
    pub key: Key,
    pub value: Option<Value>,
    regex: Option<Regex>,
}

/// The result of one action against one answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ActionResult {
    #[serde(rename = "type")]
    pub kind: ActionKind,
    pub key: String,
    #[schema(value_type = Option<Object>)]
    pub value: Option<Value>,
    /// The value the key found; `null` when it found nothing.
    #[schema(value_type = Option<Object>)]
    pub found: Option<Value>,
    pub met: bool,
}

impl ActionResult {
    /// `$.status is "noncompliant", expected equals "compliant"`.
    pub fn explain(&self) -> String {
        let expected = match &self.value {
            Some(v) => format!("expected {} {}", self.kind.as_str(), short(v)),
            None => format!("expected {}", self.kind.as_str().replace('_', " ")),
        };
        match &self.found {
            Some(found) => format!("{} is {}, {expected}", self.key, short(found)),
            None => format!("{} not found, {expected}", self.key),
        }
    }
}

/// JSON text of a value, cut so reasons stay readable.
fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.len() <= 120 {
        return text;
    }
    let mut end = 117;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", text.get(..end).unwrap_or_default())
}

impl Action {
    /// Checks and compiles an action; problems are reported against `field`.
    pub fn compile(spec: &ActionSpec, field: &str, errors: &mut Vec<FieldError>) -> Option<Action> {
        let before = errors.len();
        let kind = ActionKind::parse(&spec.kind);
        if kind.is_none() {
            let names: Vec<&str> = ActionKind::ALL.iter().map(|(n, _)| *n).collect();
            errors.push(FieldError::new(
                format!("{field}.type"),
                format!("unknown action type `{}`; expected one of {}", spec.kind, names.join(", ")),
            ));
        }
        let key = match spec.key.as_deref().map(str::trim) {
            None | Some("") => {
                errors.push(FieldError::new(
                    format!("{field}.key"),
                    "a key is required (a JSONPath such as `$.status`, or `status_code`)",
                ));
                None
            }
            Some("status_code") => Some(Key::StatusCode),
            Some(text) => compile_path(text, &format!("{field}.key"), errors),
        };
        let mut regex = None;
        if let Some(kind) = kind {
            check_value(kind, spec.value.as_ref(), &format!("{field}.value"), errors, &mut regex);
        }
        if errors.len() > before {
            return None;
        }
        Some(Action { kind: kind?, key: key?, value: spec.value.clone(), regex })
    }

    /// Evaluates against an answer. `body` is `None` when it was not parsed.
    pub fn evaluate(&self, status: u16, body: Option<&Value>) -> ActionResult {
        let found = match &self.key {
            Key::StatusCode => Some(Value::from(status)),
            Key::Path { compiled, .. } => body.and_then(|b| select(compiled, b)),
        };
        let met = self.is_met(found.as_ref());
        ActionResult { kind: self.kind, key: self.key.as_str().to_owned(), value: self.value.clone(), found, met }
    }

    fn is_met(&self, found: Option<&Value>) -> bool {
        let expected = self.value.as_ref();
        match (self.kind, found) {
            (ActionKind::Exists, f) => f.is_some(),
            (ActionKind::NotExists, f) => f.is_none(),
            (ActionKind::NotEquals, None) | (ActionKind::NotContains, None) => true,
            (_, None) => false,
            (ActionKind::Equals, Some(f)) => expected.is_some_and(|e| json_eq(f, e)),
            (ActionKind::NotEquals, Some(f)) => !expected.is_some_and(|e| json_eq(f, e)),
            (ActionKind::Contains, Some(f)) => expected.is_some_and(|e| contains(f, e)),
            (ActionKind::NotContains, Some(f)) => !expected.is_some_and(|e| contains(f, e)),
            (ActionKind::Matches, Some(Value::String(s))) => self.regex.as_ref().is_some_and(|r| r.is_match(s)),
            (ActionKind::Matches, Some(_)) => false,
            (ActionKind::GreaterThan, Some(f)) => compare(f, expected).is_some_and(|o| o.is_gt()),
            (ActionKind::LessThan, Some(f)) => compare(f, expected).is_some_and(|o| o.is_lt()),
            (ActionKind::OneOf, Some(f)) => match expected {
                Some(Value::Array(items)) => items.iter().any(|e| json_eq(f, e)),
                _ => false,
            },
        }
    }
}

/// `status` alone means `$.status`; a key without `$` is taken as a child path.
pub fn normalize_path(text: &str) -> String {
    if text.starts_with('$') {
        text.to_owned()
    } else if text.starts_with('[') {
        format!("${text}")
    } else {
        format!("$.{text}")
    }
}

fn compile_path(text: &str, field: &str, errors: &mut Vec<FieldError>) -> Option<Key> {
    let normalized = normalize_path(text);
    // jsonpath_lib reports most syntax errors as `Err`, but has panicked on some odd
    // inputs; an admin's typo must be a 422, never a crashed worker.
    let compiled = std::panic::catch_unwind(|| jsonpath_lib::Compiled::compile(&normalized));
    match compiled {
        Ok(Ok(compiled)) => Some(Key::Path { text: normalized, compiled }),
        Ok(Err(e)) => {
            let e = e.lines().next().unwrap_or("syntax error").to_owned();
            errors.push(FieldError::new(field, format!("`{text}` is not a valid JSONPath: {e}")));
            None
        }
        Err(_) => {
            errors.push(FieldError::new(field, format!("`{text}` is not a valid JSONPath")));
            None
        }
    }
}

fn check_value(
    kind: ActionKind,
    value: Option<&Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
    regex: &mut Option<Regex>,
) {
    let mut problem = |msg: String| errors.push(FieldError::new(field, msg));
    let name = kind.as_str();
    match kind {
        ActionKind::Exists | ActionKind::NotExists => {
            if value.is_some() {
                problem(format!("`{name}` takes no value"));
            }
        }
        ActionKind::Equals | ActionKind::NotEquals | ActionKind::Contains | ActionKind::NotContains => {
            if value.is_none() {
                problem(format!("`{name}` needs a value"));
            }
        }
        ActionKind::GreaterThan | ActionKind::LessThan => {
            if !matches!(value, Some(Value::Number(_))) {
                problem(format!("`{name}` needs a number, got {}", type_name(value)));
            }
        }
        ActionKind::OneOf => {
            if !matches!(value, Some(Value::Array(_))) {
                problem(format!("`one_of` needs an array, got {}", type_name(value)));
            }
        }
        ActionKind::Matches => match value {
            Some(Value::String(pattern)) => match regex::RegexBuilder::new(pattern).size_limit(1 << 20).build() {
                Ok(r) => *regex = Some(r),
                Err(e) => {
                    let e = e.to_string();
                    let e = e.lines().last().unwrap_or("syntax error").trim().to_owned();
                    problem(format!("`{pattern}` is not a valid regular expression: {e}"));
                }
            },
            other => problem(format!("`matches` needs a regular expression string, got {}", type_name(other))),
        },
    }
}

fn type_name(v: Option<&Value>) -> &'static str {
    match v {
        None => "nothing",
        Some(Value::Null) => "null",
        Some(Value::Bool(_)) => "a boolean",
        Some(Value::Number(_)) => "a number",
        Some(Value::String(_)) => "a string",
        Some(Value::Array(_)) => "an array",
        Some(Value::Object(_)) => "an object",
    }
}

/// What a JSONPath finds: nothing, the one value, or an array of all matches.
fn select(path: &jsonpath_lib::Compiled, body: &Value) -> Option<Value> {
    let found = path.select(body).ok()?;
    match found.as_slice() {
        [] => None,
        [one] => Some((*one).clone()),
        many => Some(Value::Array(many.iter().map(|v| (*v).clone()).collect())),
    }
}

/// Deep equality where numbers compare by value (`70` equals `70.0`).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn contains(found: &Value, expected: &Value) -> bool {
    match (found, expected) {
        (Value::String(s), Value::String(sub)) => s.contains(sub.as_str()),
        (Value::Array(items), e) => items.iter().any(|i| json_eq(i, e)),
        _ => false,
    }
}

fn compare(found: &Value, expected: Option<&Value>) -> Option<std::cmp::Ordering> {
    let f = found.as_f64()?;
    let e = expected?.as_f64()?;
    f.partial_cmp(&e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn action(kind: &str, key: &str, value: Option<Value>) -> Action {
        let spec = ActionSpec { kind: kind.into(), key: Some(key.into()), value };
        let mut errors = Vec::new();
        let a = Action::compile(&spec, "a", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        a.unwrap()
    }

    #[test]
    fn numbers_compare_by_value() {
        let a = action("equals", "score", Some(json!(70)));
        assert!(a.evaluate(200, Some(&json!({"score": 70.0}))).met);
    }

    #[test]
    fn missing_key_meets_only_negations() {
        let body = json!({});
        assert!(!action("equals", "x", Some(json!(1))).evaluate(200, Some(&body)).met);
        assert!(action("not_equals", "x", Some(json!(1))).evaluate(200, Some(&body)).met);
        assert!(action("not_contains", "x", Some(json!(1))).evaluate(200, Some(&body)).met);
        assert!(action("not_exists", "x", None).evaluate(200, Some(&body)).met);
        assert!(!action("exists", "x", None).evaluate(200, Some(&body)).met);
    }

    #[test]
    fn bad_values_are_all_reported() {
        let mut errors = Vec::new();
        let spec = ActionSpec { kind: "greater_than".into(), key: Some("$[".into()), value: Some(json!("x")) };
        assert!(Action::compile(&spec, "response_actions[0]", &mut errors).is_none());
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
