//! The behaviour every store must have beyond the webhook outbox (objects, the audit
//! chain and its listings, the activity log), written once and run against each store:
//! each store's tests call these with a fresh, empty store of their own, one test a check,
//! and keep what only that store has (its files, its SQL, its replicas) to themselves.
//!
//! A check that needs more than a [`Store`] takes it from the caller: another store over
//! the same data (`open`), SQL run behind the store's back (`execute`, written to work on
//! both stores), or a look at what the store keeps at rest (`at_rest`).

use std::sync::Arc;

use serde_json::json;
use time::OffsetDateTime;

use super::{
    encode_activity_cursor, encode_audit_cursor, format_time, parse_time, ActivityEntry, ActivityFilter, AuditAction,
    AuditDraft, AuditEntry, AuditFilter, Change, Listing, ObjectKind, Page, Store, StoreError, StoredObject,
    VerifyResult,
};
use crate::logs::audit::GENESIS_HASH;
use crate::secrets::SecretBox;

/// Secrets that must never reach storage in plaintext.
pub(crate) const SECRET: &str = "PLAINTEXT-client-secret-4f1e9";
pub(crate) const PASSWORD: &str = "PLAINTEXT-basic-password-77ab";

pub(crate) fn rule(id: &str, secrets: &[(&str, &str)]) -> StoredObject {
    StoredObject {
        kind: ObjectKind::Rule,
        id: id.into(),
        source: "api".into(),
        version: 1,
        // Deliberately not in key order: the store keeps the order it was given.
        doc: json!({"id": id, "method": "GET", "url": "https://x.test/",
                    "auth": {"type": "oauth2_client_credentials", "client_secret": "********"}}),
        secrets: secrets.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        created_at: "2025-01-01T00:00:00.000000Z".into(),
        updated_at: "2025-01-01T00:00:00.000000Z".into(),
    }
}

pub(crate) fn draft(actor: &str, action: AuditAction, object_type: &str, id: &str) -> AuditDraft {
    AuditDraft {
        actor: actor.into(),
        action,
        object_type: object_type.into(),
        object_id: id.into(),
        before: None,
        after: Some(json!({"id": id, "auth": {"client_secret": "********"}})),
    }
}

/// Activity entry `i` (id `d-000i`): application, user, decision, rules and replica vary
/// with `i`, so that filters have something to separate.
pub(crate) fn activity(i: usize, time: OffsetDateTime) -> ActivityEntry {
    ActivityEntry {
        decision_id: format!("d-{i:04}"),
        time: format_time(time),
        application: if i.is_multiple_of(2) { "payroll" } else { "wiki" }.into(),
        username: Some(if i.is_multiple_of(3) { "alice" } else { "bob" }.into()),
        remote_ip: Some("10.0.0.1".into()),
        device_id: None,
        decision: if i.is_multiple_of(5) { "deny" } else { "allow" }.into(),
        reason: "ok".into(),
        policies: json!([{"id": "p1", "decision": "allow"}]),
        rules: if i.is_multiple_of(4) {
            json!([{"rule_id": "device-posture", "outcome": "allow"}, {"rule_id": "hr-active", "outcome": "allow"}])
        } else {
            json!([{"rule_id": "hr-active", "outcome": "allow"}])
        },
        latency_ms: 1.5,
        via: "api".into(),
        replica: if i.is_multiple_of(2) { "a" } else { "b" }.into(),
        outbox: Vec::new(),
    }
}

/// Every item `list` lists, page by page, `limit` a page.
pub(crate) async fn all_pages<T>(limit: usize, list: impl AsyncFn(&Page) -> Listing<T>) -> Vec<T> {
    let mut items = Vec::new();
    let mut page = Page { limit, cursor: None };
    loop {
        let listing = list(&page).await;
        assert!(listing.items.len() <= limit);
        items.extend(listing.items);
        match listing.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => return items,
        }
    }
}

/// Every decision id the filter lists, page by page.
pub(crate) async fn all_activity_ids(store: &dyn Store, filter: &ActivityFilter, limit: usize) -> Vec<String> {
    let entries = all_pages(limit, async |page: &Page| store.list_activity(filter, page).await.unwrap()).await;
    entries.into_iter().map(|e| e.decision_id).collect()
}

/// Every audit seq the filter lists, page by page.
async fn all_audit_seqs(store: &dyn Store, filter: &AuditFilter, limit: usize) -> Vec<i64> {
    let entries = all_pages(limit, async |page: &Page| store.list_audit(filter, page).await.unwrap()).await;
    entries.iter().map(|e| e.seq).collect()
}

/// Six audit entries in five commits (the second commit holds two), seqs 1 to 6.
pub(crate) async fn seed_audit(store: &dyn Store) -> Vec<AuditEntry> {
    let batches = vec![
        vec![draft("alice", AuditAction::Create, "rule", "r1")],
        vec![draft("alice", AuditAction::Create, "rule", "r2"), draft("alice", AuditAction::Create, "policy", "p1")],
        vec![draft("bob", AuditAction::Update, "rule", "r1")],
        vec![draft("file:a.json", AuditAction::Load, "file", "policies/a.json")],
        vec![draft("bob", AuditAction::Delete, "rule", "r2")],
    ];
    let mut all = Vec::new();
    for batch in batches {
        all.extend(store.commit(vec![], batch).await.unwrap());
        // Distinct commit times, so the time filters have something to separate.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    all
}

/// Objects put, updated and deleted read back the same, from this store and from one
/// opened again over its data, secrets included; yet no secret is ever stored in
/// plaintext. `open` opens a store over the data with the usual key; `at_rest(open)`
/// asserts that neither [`SECRET`] nor [`PASSWORD`] is anywhere in what the store keeps,
/// `open` telling whether a store is open over it.
pub(crate) async fn objects_round_trip_with_secrets_encrypted_at_rest<S: Store>(
    open: impl AsyncFn() -> S,
    at_rest: impl AsyncFn(bool),
) {
    let store = open().await;
    let r1 = rule("r1", &[("auth.client_secret", SECRET)]);
    let r2 = rule("r2", &[]);
    let mut hook = rule("siem", &[("auth.password", PASSWORD)]);
    hook.kind = ObjectKind::Webhook;
    let entries = store
        .commit(
            vec![Change::Put(r1.clone()), Change::Put(r2.clone()), Change::Put(hook.clone())],
            vec![draft("admin", AuditAction::Create, "rule", "r1")],
        )
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);

    let all = store.load_all().await.unwrap();
    assert_eq!(all, vec![r1.clone(), r2.clone(), hook.clone()], "by kind, then id");
    assert_eq!(all[0].secrets["auth.client_secret"], SECRET);
    let keys: Vec<&String> = all[0].doc.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["id", "method", "url", "auth"], "key order preserved");
    at_rest(true).await;

    // Update and delete (deleting what is not there is no error), then open again
    // (migrations are idempotent) and read again.
    let mut r1b = r1.clone();
    r1b.version = 2;
    r1b.secrets.insert("auth.client_secret".into(), format!("{SECRET}-v2"));
    store
        .commit(
            vec![
                Change::Put(r1b.clone()),
                Change::Delete { kind: ObjectKind::Rule, id: "r2".into() },
                Change::Delete { kind: ObjectKind::Policy, id: "nothing".into() },
            ],
            vec![],
        )
        .await
        .unwrap();
    drop(store);
    at_rest(false).await;

    let store = open().await;
    assert_eq!(store.load_all().await.unwrap(), vec![r1b, hook]);
    store.ping().await.unwrap();
}

/// Objects read with the wrong key are an error naming the object, not the secret, and
/// not a panic. `open_with` opens a store over the data with the given key.
pub(crate) async fn wrong_key_is_an_error_not_a_panic<S: Store>(
    store: S,
    open_with: impl AsyncFn(Arc<SecretBox>) -> S,
) {
    let secrets = [("auth.client_secret", SECRET), ("auth.password", PASSWORD)];
    store.commit(vec![Change::Put(rule("r1", &secrets))], vec![]).await.unwrap();
    drop(store);
    let store = open_with(Arc::new(SecretBox::from_key([42u8; 32]))).await;
    let err = store.load_all().await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("r1"), "{err}");
    assert!(!err.to_string().contains(SECRET) && !err.to_string().contains(PASSWORD), "{err}");
}

/// The audit chain links and verifies, and tampering (a changed, unparsable or deleted
/// row) is located, never an error. `execute` runs SQL on the store's database.
pub(crate) async fn audit_chain_verifies_and_tampering_is_located(store: &dyn Store, execute: impl AsyncFn(&str)) {
    assert_eq!(store.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 0 });
    let entries = seed_audit(store).await;
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(entries[0].prev_hash, GENESIS_HASH);
    assert_eq!(entries[2].prev_hash, entries[1].hash);
    assert_eq!(entries[1].time, entries[2].time, "one commit, one time");
    assert_eq!(store.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 6 });

    execute("UPDATE audit SET actor = 'mallory' WHERE seq = 4").await;
    assert_eq!(
        store.verify_audit().await.unwrap(),
        VerifyResult::Broken { seq: 4, entries_checked: 3, reason: "hash does not match the entry's content".into() }
    );
    execute("UPDATE audit SET actor = 'bob' WHERE seq = 4").await;
    assert_eq!(store.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 6 });

    // Same JSON with keys reordered still verifies (canonical JSON) ...
    execute("UPDATE audit SET after_json = '{\"auth\":{\"client_secret\":\"********\"},\"id\":\"r2\"}' WHERE seq = 2")
        .await;
    assert_eq!(store.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 6 });
    // ... a changed value does not.
    execute("UPDATE audit SET after_json = '{\"id\":\"evil\"}' WHERE seq = 2").await;
    assert!(matches!(store.verify_audit().await.unwrap(), VerifyResult::Broken { seq: 2, entries_checked: 1, .. }));
    execute("UPDATE audit SET after_json = '{\"id\":\"r2\",\"auth\":{\"client_secret\":\"********\"}}' WHERE seq = 2")
        .await;
    assert_eq!(store.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 6 });

    // Unparsable rows (an unknown action) and deleted rows are breaks too, not errors.
    execute("UPDATE audit SET action = 'obliterate' WHERE seq = 5").await;
    assert!(matches!(store.verify_audit().await.unwrap(), VerifyResult::Broken { seq: 5, .. }));
    assert!(matches!(store.list_audit(&AuditFilter::default(), &Page::default()).await, Err(StoreError::Corrupt(_))));
    execute("DELETE FROM audit WHERE seq = 5").await;
    assert!(matches!(store.verify_audit().await.unwrap(), VerifyResult::Broken { seq: 6, entries_checked: 4, .. }));
}

/// Commits racing through `a` and `b` (two stores over one database, or the same store
/// twice) make one gap-free chain, each commit's entries adjacent.
pub(crate) async fn concurrent_commits_keep_seq_gap_free(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move {
            store
                .commit(
                    vec![Change::Put(rule(&format!("r{i}"), &[]))],
                    vec![
                        draft("a", AuditAction::Create, "rule", &format!("r{i}")),
                        draft("a", AuditAction::Update, "rule", &format!("r{i}")),
                    ],
                )
                .await
                .unwrap()
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        let entries = t.await.unwrap();
        assert_eq!(entries[1].seq, entries[0].seq + 1, "one commit's entries are adjacent");
        seqs.extend(entries.into_iter().map(|e| e.seq));
    }
    seqs.sort();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    assert_eq!(a.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 40 });
    assert_eq!(b.verify_audit().await.unwrap(), VerifyResult::Ok { entries: 40 });
    assert_eq!(b.load_all().await.unwrap().len(), 20);
}

/// Audit listings: newest first, paged by cursor, filtered; entries listed equal the
/// entries committed. Leaves the store with the [`seed_audit`] entries.
pub(crate) async fn audit_pagination_and_filters(store: &dyn Store) {
    let entries = seed_audit(store).await;
    let all = AuditFilter::default();

    let first = store.list_audit(&all, &Page { limit: 2, cursor: None }).await.unwrap();
    assert_eq!(first.items.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6, 5]);
    assert_eq!(first.items[0], entries[5], "listed entries equal the committed ones");
    assert!(first.next_cursor.is_some());
    assert_eq!(all_audit_seqs(store, &all, 2).await, vec![6, 5, 4, 3, 2, 1]);
    assert_eq!(all_audit_seqs(store, &all, 1000).await, vec![6, 5, 4, 3, 2, 1]);
    // Exactly a full last page: no cursor to an empty page.
    let exact = store.list_audit(&all, &Page { limit: 6, cursor: None }).await.unwrap();
    assert_eq!((exact.items.len(), exact.next_cursor), (6, None));

    let f = |g: fn(&mut AuditFilter)| {
        let mut filter = AuditFilter::default();
        g(&mut filter);
        filter
    };
    let cases: Vec<(AuditFilter, Vec<i64>)> = vec![
        (f(|x| x.actor = Some("bob".into())), vec![6, 4]),
        (f(|x| x.action = Some(AuditAction::Create)), vec![3, 2, 1]),
        (f(|x| x.object_type = Some("rule".into())), vec![6, 4, 2, 1]),
        (f(|x| x.object_id = Some("r1".into())), vec![4, 1]),
        (
            f(|x| {
                x.actor = Some("alice".into());
                x.object_type = Some("policy".into());
            }),
            vec![3],
        ),
        (f(|x| x.actor = Some("nobody".into())), vec![]),
    ];
    for (filter, expected) in cases {
        assert_eq!(all_audit_seqs(store, &filter, 1).await, expected, "{filter:?}");
    }

    // since inclusive, until exclusive; entries 2 and 3 share a commit time.
    let t = |i: usize| parse_time(&entries[i].time).unwrap();
    let since = AuditFilter { since: Some(t(1)), ..Default::default() };
    assert_eq!(all_audit_seqs(store, &since, 2).await, vec![6, 5, 4, 3, 2]);
    let until = AuditFilter { until: Some(t(3)), ..Default::default() };
    assert_eq!(all_audit_seqs(store, &until, 2).await, vec![3, 2, 1]);
    let both = AuditFilter { since: Some(t(1)), until: Some(t(4)), ..Default::default() };
    assert_eq!(all_audit_seqs(store, &both, 10).await, vec![4, 3, 2]);

    for bad in ["garbage", "", "%%%", &encode_activity_cursor(1, 1)] {
        let page = Page { limit: 10, cursor: Some(bad.to_string()) };
        assert_eq!(store.list_audit(&all, &page).await.unwrap_err(), StoreError::BadCursor);
    }
}

/// A file load's audit entry, recording the file's hash.
pub(crate) fn file_load(file: &str, sha: &str) -> AuditDraft {
    let name = file.rsplit('/').next().unwrap_or(file);
    AuditDraft {
        actor: format!("file:{name}"),
        action: AuditAction::Load,
        object_type: "file".into(),
        object_id: file.into(),
        before: None,
        after: Some(json!({"file": file, "sha256": sha, "rules": ["r1"], "policies": []})),
    }
}

/// `last_file_hash` is the hash of a file's newest load entry.
pub(crate) async fn last_file_hash_reads_the_newest_load(store: &dyn Store) {
    let file = "policies/a.json";
    assert_eq!(store.last_file_hash(file).await.unwrap(), None);
    store.commit(vec![], vec![file_load(file, "aaa")]).await.unwrap();
    store.commit(vec![], vec![file_load(file, "bbb")]).await.unwrap();
    // A non-load entry on the same object id does not count.
    store.commit(vec![], vec![draft("x", AuditAction::Update, "file", file)]).await.unwrap();
    assert_eq!(store.last_file_hash(file).await.unwrap().as_deref(), Some("bbb"));
    assert_eq!(store.last_file_hash("policies/b.json").await.unwrap(), None);
}

/// Activity: inserts (idempotent on the decision id), listings newest first paged by a
/// (time, id) cursor, every filter, bad cursors and times, and pruning by time.
pub(crate) async fn activity_insert_filters_pagination_prune(store: &dyn Store) {
    let base = time::macros::datetime!(2025-03-01 12:00 UTC);
    // 20 entries one minute apart; entries 10 and 11 share a time, to exercise the
    // (time, id) cursor tie-break.
    let entries: Vec<ActivityEntry> = (0..20)
        .map(|i| {
            let minute = if i == 11 { 10 } else { i as i64 };
            activity(i, base + time::Duration::minutes(minute))
        })
        .collect();
    // Inserted out of time order, in two batches.
    let (a, b) = entries.split_at(7);
    store.insert_activity(b).await.unwrap();
    store.insert_activity(a).await.unwrap();

    // A known decision_id, even with other content and twice in one batch, is ignored.
    let mut dup = entries[3].clone();
    dup.reason = "changed".into();
    store.insert_activity(&[dup.clone(), dup]).await.unwrap();

    let all = ActivityFilter::default();
    // 10 and 11 share a time: the later-inserted row (higher id) comes first.
    let expected: Vec<String> = (0..20).rev().map(|i| format!("d-{i:04}")).collect();
    assert_eq!(all_activity_ids(store, &all, 3).await, expected);
    let first = store.list_activity(&all, &Page { limit: 20, cursor: None }).await.unwrap();
    assert_eq!(first.next_cursor, None);
    let three = first.items.iter().find(|e| e.decision_id == "d-0003").unwrap();
    assert_eq!(three, &entries[3], "round trip, and the duplicate did not overwrite");
    assert_eq!(three.replica, "b");

    let ids = |pred: &dyn Fn(usize) -> bool| -> Vec<String> {
        expected.iter().filter(|id| pred(id[2..].parse().unwrap())).cloned().collect()
    };
    let cases: Vec<(ActivityFilter, Vec<String>)> = vec![
        (ActivityFilter { username: Some("alice".into()), ..Default::default() }, ids(&|i| i.is_multiple_of(3))),
        (ActivityFilter { application: Some("wiki".into()), ..Default::default() }, ids(&|i| i % 2 == 1)),
        (ActivityFilter { decision: Some("deny".into()), ..Default::default() }, ids(&|i| i.is_multiple_of(5))),
        (
            ActivityFilter { rule_id: Some("device-posture".into()), ..Default::default() },
            ids(&|i| i.is_multiple_of(4)),
        ),
        (ActivityFilter { rule_id: Some("hr-active".into()), ..Default::default() }, ids(&|_| true)),
        (ActivityFilter { rule_id: Some("nope".into()), ..Default::default() }, vec![]),
        (
            ActivityFilter {
                rule_id: Some("device-posture".into()),
                application: Some("payroll".into()),
                username: Some("alice".into()),
                ..Default::default()
            },
            ids(&|i| i.is_multiple_of(4) && i.is_multiple_of(3)),
        ),
        (
            ActivityFilter {
                since: Some(base + time::Duration::minutes(5)),
                until: Some(base + time::Duration::minutes(10)),
                ..Default::default()
            },
            ids(&|i| (5..10).contains(&i)),
        ),
    ];
    for (filter, want) in cases {
        assert_eq!(all_activity_ids(store, &filter, 2).await, want, "{filter:?}");
    }

    for bad in ["garbage", &encode_audit_cursor(3)] {
        let page = Page { limit: 10, cursor: Some(bad.to_string()) };
        assert_eq!(store.list_activity(&all, &page).await.unwrap_err(), StoreError::BadCursor);
    }

    let bad_time = ActivityEntry { time: "yesterday".into(), ..activity(99, base) };
    assert!(matches!(store.insert_activity(&[bad_time]).await, Err(StoreError::Internal(_))));
    // A NUL (which PostgreSQL text cannot hold) does not fail the batch.
    let nul = ActivityEntry { username: Some("a\0b".into()), ..activity(98, base - time::Duration::days(1)) };
    store.insert_activity(&[nul]).await.unwrap();

    // Prune: strictly older than the cutoff goes (the NUL entry too), with its rule index rows.
    let removed = store.prune_activity(base + time::Duration::minutes(5)).await.unwrap();
    assert_eq!(removed, 6);
    assert_eq!(all_activity_ids(store, &all, 100).await, ids(&|i| i >= 5));
    assert_eq!(
        all_activity_ids(store, &ActivityFilter { rule_id: Some("device-posture".into()), ..Default::default() }, 100)
            .await,
        ids(&|i| i >= 5 && i.is_multiple_of(4))
    );
    assert_eq!(store.prune_activity(base).await.unwrap(), 0);
}

/// Pruning more than the store deletes at once (`chunk` entries) removes them all.
pub(crate) async fn prune_works_in_chunks(store: &dyn Store, chunk: usize) {
    let old = time::macros::datetime!(2020-01-01 0:00 UTC);
    let n = chunk * 2 + 7;
    for batch in [0..500, 500..n] {
        let batch: Vec<ActivityEntry> = batch.map(|i| activity(i, old)).collect();
        store.insert_activity(&batch).await.unwrap();
    }
    store.insert_activity(&[activity(n, OffsetDateTime::now_utc())]).await.unwrap();
    let removed = store.prune_activity(OffsetDateTime::now_utc() - time::Duration::days(1)).await.unwrap();
    assert_eq!(removed, n as u64);
    let left = store.list_activity(&ActivityFilter::default(), &Page::default()).await.unwrap();
    assert_eq!(left.items.len(), 1);
}
