//! Small helpers for the admin API tests: writes with a token, the audit entries of one
//! object, and a wiremock API that answers one fixed JSON body.

use serde_json::Value;
use verdict::store::{AuditEntry, AuditFilter, Page};

use crate::helpers::*;

impl TestApp {
    /// PUT JSON with a token.
    pub async fn put_json(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        read(self.request(reqwest::Method::PUT, path).bearer_auth(token).json(body).send().await.expect("request"))
            .await
    }

    /// DELETE with a token.
    pub async fn delete(&self, path: &str, token: &str) -> (u16, Value) {
        read(self.request(reqwest::Method::DELETE, path).bearer_auth(token).send().await.expect("request")).await
    }

    /// Creates a rule as the admin and expects a 201.
    pub async fn create_rule(&self, rule: Value) -> Value {
        let (status, body) = self.post_json("/v1/rules", ADMIN_TOKEN, &rule).await;
        assert_eq!(status, 201, "rule create failed: {body}");
        body
    }

    /// Creates a policy as the admin and expects a 201.
    pub async fn create_policy(&self, policy: Value) -> Value {
        let (status, body) = self.post_json("/v1/policies", ADMIN_TOKEN, &policy).await;
        assert_eq!(status, 201, "policy create failed: {body}");
        body
    }

    /// Every audit entry about one object, oldest first, read from the store.
    pub async fn audit_of(&self, object_id: &str) -> Vec<AuditEntry> {
        let filter = AuditFilter { object_id: Some(object_id.to_owned()), ..Default::default() };
        let mut entries = Vec::new();
        let mut page = Page { limit: 1000, cursor: None };
        loop {
            let listing = self.state.store.list_audit(&filter, &page).await.expect("audit log readable");
            entries.extend(listing.items);
            match listing.next_cursor {
                Some(c) => page.cursor = Some(c),
                None => break,
            }
        }
        entries.sort_by_key(|e| e.seq);
        entries
    }

    /// Every audit entry, oldest first.
    pub async fn audit_all(&self) -> Vec<AuditEntry> {
        let mut entries = Vec::new();
        let mut page = Page { limit: 1000, cursor: None };
        loop {
            let listing =
                self.state.store.list_audit(&AuditFilter::default(), &page).await.expect("audit log readable");
            entries.extend(listing.items);
            match listing.next_cursor {
                Some(c) => page.cursor = Some(c),
                None => break,
            }
        }
        entries.sort_by_key(|e| e.seq);
        entries
    }
}

/// Asserts a 422 whose details hold exactly one problem, for `field`, with `message`.
pub fn assert_one_problem(status: u16, body: &Value, field: &str, message: &str) {
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "validation_failed", "{body}");
    let details = body["error"]["details"].as_array().expect("details");
    assert_eq!(details.len(), 1, "expected one problem: {body}");
    assert_eq!(details[0]["field"], field, "{body}");
    assert_eq!(details[0]["message"], message, "{body}");
}

/// The credential of a Basic `Authorization` header.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}
