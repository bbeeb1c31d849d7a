//! Turning an API's answer into an outcome: status classes, JSON/JSONP parsing, and
//! the response actions with `match` all/any.

use serde_json::Value;

use super::Outcome;
use crate::action::ActionResult;
use crate::outbound::ApiResponse;
use crate::rule::Rule;

/// Judges an answer: 2xx is evaluated, 4xx is "not met", anything else is an error.
pub fn judge(rule: &Rule, response: &ApiResponse) -> (Outcome, String, Vec<ActionResult>) {
    let status = response.status;
    match status {
        200..=299 => {}
        400..=499 => return (Outcome::Deny, format!("HTTP {status}: the API refused, criteria not met"), Vec::new()),
        300..=399 => return (Outcome::Error, format!("HTTP {status}: redirects are not followed"), Vec::new()),
        _ => return (Outcome::Error, format!("HTTP {status}"), Vec::new()),
    }
    if rule.actions.is_empty() {
        return (Outcome::Allow, format!("HTTP {status}"), Vec::new());
    }
    let needs_body = rule.actions.iter().any(|a| !matches!(a.key, crate::action::Key::StatusCode));
    let body = if needs_body {
        match parse_body(&response.body, rule.jsonp) {
            Ok(v) => Some(v),
            Err(e) => return (Outcome::Error, e, Vec::new()),
        }
    } else {
        None
    };
    let results: Vec<ActionResult> = rule.actions.iter().map(|a| a.evaluate(status, body.as_ref())).collect();
    let met = if rule.match_any { results.iter().any(|r| r.met) } else { results.iter().all(|r| r.met) };
    let reason = if met {
        let shown: Vec<String> = results.iter().filter(|r| r.met).map(|r| r.explain()).collect();
        shown.join("; ")
    } else if rule.match_any {
        format!(
            "none of the response actions was met: {}",
            results.iter().map(|r| r.explain()).collect::<Vec<_>>().join("; ")
        )
    } else {
        results.iter().filter(|r| !r.met).map(|r| r.explain()).collect::<Vec<_>>().join("; ")
    };
    (if met { Outcome::Allow } else { Outcome::Deny }, reason, results)
}

/// Parses a JSON body, or unwraps `callback({...});` first for JSONP.
pub fn parse_body(body: &[u8], jsonp: bool) -> Result<Value, String> {
    if !jsonp {
        return serde_json::from_slice(body).map_err(|e| format!("the answer is not valid JSON: {e}"));
    }
    let text = std::str::from_utf8(body).map_err(|_| "the answer is not UTF-8 text".to_owned())?.trim();
    let text = text.strip_suffix(';').unwrap_or(text).trim_end();
    let open = text.find('(').ok_or("the answer is not JSONP: no `callback(` found")?;
    let callback = text.get(..open).unwrap_or_default().trim();
    let valid_callback =
        !callback.is_empty() && callback.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.'));
    if !valid_callback || !text.ends_with(')') {
        return Err("the answer is not JSONP: expected `callback(...)`".into());
    }
    let inner = text.get(open + 1..text.len() - 1).unwrap_or_default();
    serde_json::from_str(inner).map_err(|e| format!("the JSONP payload is not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonp_is_unwrapped() {
        assert_eq!(parse_body(b" cb({\"a\":1}); ", true).unwrap(), serde_json::json!({"a": 1}));
        assert!(parse_body(b"{\"a\":1}", true).is_err());
    }
}
