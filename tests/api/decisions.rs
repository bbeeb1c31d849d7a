//! Decision basics against real local APIs (wiremock).

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

#[tokio::test]
async fn allows_when_the_api_says_compliant_and_denies_otherwise() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/devices/dev-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "compliant"})))
        .expect(1)
        .mount(&api)
        .await;
    Mock::given(method("GET"))
        .and(path("/devices/dev-2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "noncompliant"})))
        .expect(1)
        .mount(&api)
        .await;
    let app = spawn_app(
        json!([{"id": "posture", "method": "GET", "url": format!("{}/devices/%device_id%", api.uri()),
                "response_actions": [{"type": "equals", "key": "status", "value": "compliant"}]}]),
        json!([{"id": "p", "applications": ["payroll"], "rules": ["posture"]}]),
    )
    .await;
    let allow = app.decision(json!({"application": "payroll", "device_id": "dev-1"})).await;
    assert_eq!(allow["decision"], "allow", "{allow}");
    let deny = app.decision(json!({"application": "payroll", "device_id": "dev-2"})).await;
    assert_eq!(deny["decision"], "deny");
    assert_eq!(
        deny["reason"],
        "policy p: rule posture denied: $.status is \"noncompliant\", expected equals \"compliant\""
    );
    assert_eq!(deny["rules"][0]["http_status"], 200);
    assert_eq!(deny["policies"][0], json!({"id": "p", "decision": "deny"}));
}
