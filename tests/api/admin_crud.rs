//! Rule and policy CRUD over HTTP (SPEC §7): round trips, pagination, conflicts,
//! file-managed objects, roles and malformed requests.

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

fn posture_rule(api: &str, expected: &str) -> Value {
    json!({"id": "posture", "method": "GET", "url": format!("{api}/check"),
           "response_actions": [{"type": "equals", "key": "status", "value": expected}]})
}

#[tokio::test]
async fn rule_and_policy_round_trip_changes_decisions_at_once() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/check"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "green"})))
        .expect(2)
        .mount(&api)
        .await;
    let app = spawn_app_with(AppOptions::default()).await;

    // Create: 201 with the stored object, defaults filled in.
    let created = app.create_rule(posture_rule(&api.uri(), "green")).await;
    assert_eq!(created["id"], "posture");
    assert_eq!(created["name"], "posture");
    assert_eq!(created["enabled"], true);
    assert_eq!(created["timeout_ms"], 2000);
    assert_eq!(created["on_error"], "deny");
    assert_eq!(created["auth"], json!({"type": "none"}));
    assert_eq!(created["source"], "api");
    assert_eq!(created["version"], 1);
    assert!(created["created_at"].as_str().is_some_and(|t| !t.is_empty()), "{created}");
    assert_eq!(created["created_at"], created["updated_at"]);

    // Read it back, as admin and as auditor.
    let (status, got) = app.get("/v1/rules/posture", ADMIN_TOKEN).await;
    assert_eq!(status, 200);
    assert_eq!(got, created);
    let (status, got) = app.get("/v1/rules/posture", AUDITOR_TOKEN).await;
    assert_eq!((status, &got), (200, &created));

    let policy = app.create_policy(json!({"id": "crm-access", "applications": ["crm"], "rules": ["posture"]})).await;
    assert_eq!(policy["name"], "crm-access");
    assert_eq!(policy["enabled"], true);
    assert_eq!(policy["subjects"], json!({"users": [], "groups": []}));
    assert_eq!(policy["source"], "api");
    assert_eq!(policy["version"], 1);
    let (status, got) = app.get("/v1/policies/crm-access", AUDITOR_TOKEN).await;
    assert_eq!((status, &got), (200, &policy));

    let allow = app.decision(json!({"application": "crm"})).await;
    assert_eq!(allow["decision"], "allow", "{allow}");

    // Update the rule as GET shows it (read-only fields included): version 2, and the
    // next decision already uses it.
    let mut edited = got_rule(&app, "posture").await;
    edited["response_actions"][0]["value"] = json!("blue");
    let (status, updated) = app.put_json("/v1/rules/posture", ADMIN_TOKEN, &edited).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["version"], 2);
    assert_eq!(updated["created_at"], created["created_at"]);
    assert_eq!(updated["response_actions"][0]["value"], "blue");
    assert_eq!(got_rule(&app, "posture").await, updated);
    let deny = app.decision(json!({"application": "crm"})).await;
    assert_eq!(deny["decision"], "deny");
    assert_eq!(
        deny["reason"],
        "policy crm-access: rule posture denied: $.status is \"green\", expected equals \"blue\""
    );

    // Update the policy: it no longer covers `crm`.
    let mut edited = policy.clone();
    edited["applications"] = json!(["erp"]);
    let (status, updated) = app.put_json("/v1/policies/crm-access", ADMIN_TOKEN, &edited).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["version"], 2);
    assert_eq!(updated["applications"], json!(["erp"]));
    let none = app.decision(json!({"application": "crm"})).await;
    assert_eq!(none["decision"], "deny");
    assert!(none["policies"].as_array().is_some_and(Vec::is_empty), "{none}");

    // A rule a policy lists cannot go; the 409 names the policy.
    let (status, body) = app.delete("/v1/rules/posture", ADMIN_TOKEN).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("`crm-access`")), "{body}");
    assert_eq!(got_rule(&app, "posture").await["version"], 2);

    // Delete both: 204, then 404.
    let resp = app.request(reqwest::Method::DELETE, "/v1/policies/crm-access").bearer_auth(ADMIN_TOKEN).send().await;
    let resp = resp.expect("request");
    assert_eq!(resp.status().as_u16(), 204);
    assert!(resp.bytes().await.expect("body").is_empty());
    let (status, _) = app.delete("/v1/rules/posture", ADMIN_TOKEN).await;
    assert_eq!(status, 204);
    for p in ["/v1/rules/posture", "/v1/policies/crm-access"] {
        let (status, body) = app.get(p, ADMIN_TOKEN).await;
        assert_eq!(status, 404, "{p}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
        let (status, _) = app.delete(p, ADMIN_TOKEN).await;
        assert_eq!(status, 404, "{p}");
    }

    // One audit entry per write, by the token's name.
    let actions: Vec<(String, String)> =
        app.audit_of("posture").await.iter().map(|e| (e.action.to_string(), e.actor.clone())).collect();
    let admin = "test-admin".to_owned();
    assert_eq!(
        actions,
        vec![("create".into(), admin.clone()), ("update".into(), admin.clone()), ("delete".into(), admin.clone())]
    );
    let entries = app.audit_of("crm-access").await;
    let actions: Vec<String> = entries.iter().map(|e| e.action.to_string()).collect();
    assert_eq!(actions, ["create", "update", "delete"]);
    assert_eq!(entries[1].before.as_ref().map(|b| b["applications"].clone()), Some(json!(["crm"])));
    assert_eq!(entries[1].after.as_ref().map(|a| a["applications"].clone()), Some(json!(["erp"])));
    assert_eq!(entries[2].after, None);
}

async fn got_rule(app: &TestApp, id: &str) -> Value {
    let (status, body) = app.get(&format!("/v1/rules/{id}"), ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn lists_are_sorted_paginated_and_include_file_objects() {
    let app = spawn_app(
        json!([{"id": "c-file", "method": "GET", "url": "https://api.example.com/c"}]),
        json!([{"id": "pc-file", "applications": ["a"], "rules": ["c-file"]}]),
    )
    .await;
    for id in ["e-api", "a-api", "d-api", "b-api"] {
        app.create_rule(json!({"id": id, "method": "GET", "url": "https://api.example.com/x"})).await;
    }
    for id in ["pb-api", "pa-api"] {
        app.create_policy(json!({"id": id, "applications": ["a"], "rules": ["a-api"]})).await;
    }

    // Everything on one page by default, sorted by id.
    let (status, all) = app.get("/v1/rules", AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{all}");
    let ids: Vec<&str> = all["items"].as_array().expect("items").iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids, ["a-api", "b-api", "c-file", "d-api", "e-api"]);
    assert_eq!(all["next_cursor"], Value::Null);
    let file_rule = &all["items"][2];
    assert_eq!(file_rule["source"], "policies/test.json");
    assert_eq!(all["items"][0]["source"], "api");

    // Two pages of three and two.
    let (status, first) = app.get("/v1/rules?limit=3", ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{first}");
    let cursor = first["next_cursor"].as_str().expect("a next cursor").to_owned();
    let (status, second) = app.get(&format!("/v1/rules?limit=3&cursor={cursor}"), ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["next_cursor"], Value::Null);
    let paged: Vec<Value> =
        [&first, &second].iter().flat_map(|p| p["items"].as_array().expect("items").clone()).collect();
    assert_eq!(Value::Array(paged), all["items"]);
    assert_eq!(first["items"].as_array().map(Vec::len), Some(3));

    // A page that ends exactly at the last item has no next cursor.
    let (_, exact) = app.get("/v1/rules?limit=5", ADMIN_TOKEN).await;
    assert_eq!(exact["items"].as_array().map(Vec::len), Some(5));
    assert_eq!(exact["next_cursor"], Value::Null);

    // Policies likewise, across two pages.
    let (status, page1) = app.get("/v1/policies?limit=2", AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{page1}");
    let ids: Vec<&str> = page1["items"].as_array().expect("items").iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(ids, ["pa-api", "pb-api"]);
    let cursor = page1["next_cursor"].as_str().expect("a next cursor");
    let (status, page2) = app.get(&format!("/v1/policies?limit=2&cursor={cursor}"), AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{page2}");
    assert_eq!(page2["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(page2["items"][0]["id"], "pc-file");
    assert_eq!(page2["items"][0]["source"], "policies/test.json");
    assert_eq!(page2["next_cursor"], Value::Null);

    // Bad paging parameters are 400s naming the parameter; a rule cursor is no policy
    // cursor.
    let rule_cursor = first["next_cursor"].as_str().expect("cursor");
    for (query, field) in [
        ("/v1/rules?limit=0", "limit"),
        ("/v1/rules?limit=1001", "limit"),
        ("/v1/rules?limit=ten", "limit"),
        ("/v1/rules?limit=-1", "limit"),
        ("/v1/rules?cursor=!!not-base64!!", "cursor"),
        ("/v1/policies?limit=0", "limit"),
        (&format!("/v1/policies?cursor={rule_cursor}"), "cursor"),
    ] {
        let (status, body) = app.get(query, ADMIN_TOKEN).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["details"][0]["field"], field, "{query}: {body}");
    }
    let (status, body) = app.get("/v1/rules?limit=1000", ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn duplicate_ids_are_conflicts_and_change_nothing() {
    let app = spawn_app(
        json!([{"id": "from-file", "method": "GET", "url": "https://api.example.com/f"}]),
        json!([{"id": "file-policy", "applications": ["a"], "rules": ["from-file"]}]),
    )
    .await;
    app.create_rule(json!({"id": "dup", "method": "GET", "url": "https://api.example.com/one"})).await;
    app.create_policy(json!({"id": "dup-policy", "applications": ["a"], "rules": ["dup"]})).await;

    for (path, body) in [
        ("/v1/rules", json!({"id": "dup", "method": "POST", "url": "https://api.example.com/two"})),
        ("/v1/rules", json!({"id": "from-file", "method": "GET", "url": "https://api.example.com/two"})),
        ("/v1/policies", json!({"id": "dup-policy", "applications": ["b"], "rules": ["dup"]})),
        ("/v1/policies", json!({"id": "file-policy", "applications": ["b"], "rules": ["dup"]})),
    ] {
        let (status, answer) = app.post_json(path, ADMIN_TOKEN, &body).await;
        assert_eq!(status, 409, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], "conflict");
        let id = body["id"].as_str().expect("id");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains(&format!("`{id}`"))), "{answer}");
    }
    let (_, rule) = app.get("/v1/rules/dup", ADMIN_TOKEN).await;
    assert_eq!(rule["url"], "https://api.example.com/one");
    assert_eq!(rule["version"], 1);
    let (_, policy) = app.get("/v1/policies/dup-policy", ADMIN_TOKEN).await;
    assert_eq!(policy["applications"], json!(["a"]));
    assert_eq!(app.audit_of("dup").await.len(), 1);
    assert_eq!(app.audit_of("dup-policy").await.len(), 1);
    assert!(app.audit_of("from-file").await.is_empty());
}

#[tokio::test]
async fn file_managed_objects_show_their_source_and_refuse_writes() {
    let app = spawn_app(
        json!([{"id": "filed", "method": "GET", "url": "https://api.example.com/f"}]),
        json!([{"id": "filed-policy", "applications": ["a"], "rules": ["filed"]}]),
    )
    .await;
    let (status, rule) = app.get("/v1/rules/filed", AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{rule}");
    assert_eq!(rule["source"], "policies/test.json");
    let (status, policy) = app.get("/v1/policies/filed-policy", AUDITOR_TOKEN).await;
    assert_eq!(status, 200, "{policy}");
    assert_eq!(policy["source"], "policies/test.json");

    // The object as GET returns it, an invalid one and a non-JSON body: all 409, since
    // the refusal comes before any validation.
    let mut broken = rule.clone();
    broken["url"] = json!("ftp://nope");
    for body in [rule.clone(), broken, json!({"no_such_field": 1})] {
        let (status, answer) = app.put_json("/v1/rules/filed", ADMIN_TOKEN, &body).await;
        assert_eq!(status, 409, "{answer}");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains("policies/test.json")), "{answer}");
    }
    let resp = app
        .request(reqwest::Method::PUT, "/v1/rules/filed")
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 409);
    let (status, answer) = app.put_json("/v1/policies/filed-policy", ADMIN_TOKEN, &policy).await;
    assert_eq!(status, 409, "{answer}");
    let (status, answer) =
        app.put_json("/v1/policies/filed-policy", ADMIN_TOKEN, &json!({"applications": "wrong type"})).await;
    assert_eq!(status, 409, "{answer}");
    let (status, _) = app.delete("/v1/policies/filed-policy", ADMIN_TOKEN).await;
    assert_eq!(status, 409);
    let (status, _) = app.delete("/v1/rules/filed", ADMIN_TOKEN).await;
    assert_eq!(status, 409);

    let (_, after) = app.get("/v1/rules/filed", ADMIN_TOKEN).await;
    assert_eq!(after, rule);
    assert!(app.audit_of("filed").await.is_empty());
    assert!(app.audit_of("filed-policy").await.is_empty());

    // An API policy may still list a file rule.
    app.create_policy(json!({"id": "api-policy", "applications": ["a"], "rules": ["filed"]})).await;
}

#[tokio::test]
async fn roles_are_enforced() {
    let app = spawn_app_with(AppOptions::default()).await;
    app.create_rule(json!({"id": "r", "method": "GET", "url": "https://api.example.com/r"})).await;
    app.create_policy(json!({"id": "p", "applications": ["a"], "rules": ["r"]})).await;
    let rule = json!({"id": "r2", "method": "GET", "url": "https://api.example.com/r"});
    let policy = json!({"id": "p2", "applications": ["a"], "rules": ["r"]});

    for token in [PROXY_TOKEN, AUDITOR_TOKEN] {
        for (path, body) in [("/v1/rules", &rule), ("/v1/policies", &policy)] {
            let (status, answer) = app.post_json(path, token, body).await;
            assert_eq!(status, 403, "{token} POST {path}: {answer}");
            assert_eq!(answer["error"]["code"], "forbidden");
        }
        for (path, body) in [("/v1/rules/r", &rule), ("/v1/policies/p", &policy)] {
            let (status, _) = app.put_json(path, token, body).await;
            assert_eq!(status, 403, "{token} PUT {path}");
            let (status, _) = app.delete(path, token).await;
            assert_eq!(status, 403, "{token} DELETE {path}");
        }
        let (status, _) = app.post_json("/v1/rules/r/test", token, &json!({"application": "a"})).await;
        assert_eq!(status, 403, "{token} test");
        let (status, _) =
            app.post_json("/v1/rules/test", token, &json!({"rule": rule, "context": {"application": "a"}})).await;
        assert_eq!(status, 403, "{token} unsaved test");
    }
    for path in ["/v1/rules", "/v1/rules/r", "/v1/policies", "/v1/policies/p"] {
        let (status, _) = app.get(path, PROXY_TOKEN).await;
        assert_eq!(status, 403, "proxy GET {path}");
        let (status, _) = app.get(path, AUDITOR_TOKEN).await;
        assert_eq!(status, 200, "auditor GET {path}");
        let resp = app.request(reqwest::Method::GET, path).send().await.expect("request");
        assert_eq!(resp.status().as_u16(), 401, "anonymous GET {path}");
        let (status, _) = app.get(path, "not-a-token").await;
        assert_eq!(status, 401, "unknown token GET {path}");
    }
    // Nothing changed.
    let (_, rules) = app.get("/v1/rules", ADMIN_TOKEN).await;
    assert_eq!(rules["items"].as_array().map(Vec::len), Some(1));
    let (_, policies) = app.get("/v1/policies", ADMIN_TOKEN).await;
    assert_eq!(policies["items"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn malformed_bodies_are_400s_naming_the_field() {
    let app = spawn_app_with(AppOptions::default()).await;
    app.create_rule(json!({"id": "r", "method": "GET", "url": "https://api.example.com/r"})).await;

    let cases = [
        (json!({"id": "x", "method": "GET", "url": "https://a.example.com", "timeout_ms": "soon"}), "timeout_ms"),
        (json!({"id": "x", "method": "GET", "url": "https://a.example.com", "headers": [{"key": "a"}]}), "headers[0]"),
        (
            json!({"id": "x", "method": "GET", "url": "https://a.example.com", "auth": {"type": "basic", "pass": "p"}}),
            "auth",
        ),
        (json!({"id": "x", "method": "GET", "url": "https://a.example.com", "enabled": "yes"}), "enabled"),
    ];
    for (body, field) in cases {
        let (status, answer) = app.post_json("/v1/rules", ADMIN_TOKEN, &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let named = answer["error"]["details"][0]["field"].as_str().unwrap_or_default();
        assert!(named.starts_with(field), "{body}: expected field {field}, got {answer}");
    }
    // Unknown fields and non-objects are 400s too (the spec has `deny_unknown_fields`).
    for body in [json!({"id": "x", "method": "GET", "url": "https://a.example.com", "colour": "red"}), json!([1, 2])] {
        let (status, answer) = app.post_json("/v1/rules", ADMIN_TOKEN, &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    let resp = app
        .request(reqwest::Method::POST, "/v1/policies")
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"id\": ")
        .send()
        .await
        .expect("request");
    let (status, answer) = read(resp).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"]["code"], "malformed_request");
    let (status, answer) =
        app.post_json("/v1/policies", ADMIN_TOKEN, &json!({"id": "p", "applications": "a", "rules": []})).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["details"][0]["field"], "applications");

    // PUT: missing object 404; an id in the body must match the path.
    let (status, _) =
        app.put_json("/v1/rules/nope", ADMIN_TOKEN, &json!({"method": "GET", "url": "https://a.example.com"})).await;
    assert_eq!(status, 404);
    let (status, answer) = app
        .put_json("/v1/rules/r", ADMIN_TOKEN, &json!({"id": "other", "method": "GET", "url": "https://a.example.com"}))
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["details"][0]["field"], "id");
    // Without an id the path's id is used.
    let (status, answer) =
        app.put_json("/v1/rules/r", ADMIN_TOKEN, &json!({"method": "POST", "url": "https://a.example.com"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], "r");
    assert_eq!(answer["method"], "POST");

    let (_, rules) = app.get("/v1/rules", ADMIN_TOKEN).await;
    assert_eq!(rules["items"].as_array().map(Vec::len), Some(1));

    // A created rule without an id gets one.
    let created = app.create_rule(json!({"method": "GET", "url": "https://a.example.com"})).await;
    let id = created["id"].as_str().expect("generated id");
    let (status, _) = app.get(&format!("/v1/rules/{id}"), AUDITOR_TOKEN).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let app = spawn_app_with(AppOptions {
        tweak: Some(Box::new(|s: &mut verdict::config::Settings| s.max_body_bytes = 1024)),
        ..Default::default()
    })
    .await;
    let big = json!({"id": "big", "method": "GET", "url": "https://a.example.com", "description": "x".repeat(2048)});
    let (status, answer) = app.post_json("/v1/rules", ADMIN_TOKEN, &big).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "body_too_large");
    let (status, _) = app.get("/v1/rules/big", ADMIN_TOKEN).await;
    assert_eq!(status, 404);
}
