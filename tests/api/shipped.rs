//! The example `policies/` start as shipped; their APIs are unreachable (`.invalid`
//! hosts), so a Finance user's payroll request is denied with a reason.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

async fn shipped_app() -> TestApp {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    spawn_app_with(AppOptions {
        tweak: Some(Box::new(move |s: &mut verdict::config::Settings| s.policies = shipped)),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn the_shipped_policies_start_and_deny_payroll_with_a_reason() {
    let app = shipped_app().await;
    let pem = std::fs::read_to_string(fixture("certs/device-a.pem")).unwrap();
    let ctx = json!({
        "application": "payroll",
        "username": "alice@example.com",
        "groups": ["g-1001"],
        "group_names": ["Finance", "VPN Users"],
        "remote_ip": "203.0.113.7",
        "device_id": "dev-42",
        "client_certificate": pem,
        "headers": {"Accept-Language": "en-US"}
    });
    // The rules' own timeouts (1.5 s at most) bound this; the outer bound only turns
    // a hang into a failure.
    let answer = tokio::time::timeout(Duration::from_secs(20), app.decision(ctx)).await.expect("decision hung");
    assert_eq!(answer["decision"], "deny", "{answer}");
    let reason = answer["reason"].as_str().unwrap();
    assert!(reason.starts_with("policy payroll-access: rule "), "{reason}");
    assert!(reason.contains(" failed: "), "the deny comes from an unreachable API: {reason}");
    assert!(!reason.contains("replace-me"), "a secret in the reason: {reason}");
    assert_eq!(answer["policies"], json!([{"id": "payroll-access", "decision": "deny"}]));
    assert_eq!(answer["rules"][0]["outcome"], "error", "{answer}");
}

#[tokio::test]
async fn the_shipped_policy_does_not_cover_other_users() {
    let app = shipped_app().await;
    let answer = app.decision(json!({"application": "payroll", "username": "bob", "group_names": ["Sales"]})).await;
    assert_eq!(answer["decision"], "deny");
    assert!(answer["reason"].as_str().unwrap().starts_with("no policy matches"), "{answer}");
}
