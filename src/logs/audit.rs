//! The audit log's hash chain, as pure functions any store can use.
//!
//! `hash = hex(SHA-256(canonical JSON of {seq, time, actor, action, object_type,
//! object_id, before, after, prev_hash}))`; the first entry's `prev_hash` is
//! [`GENESIS_HASH`] (64 zeros).
//!
//! Canonical JSON: object keys sorted by their UTF-8 bytes at every depth, no
//! whitespace, strings and numbers as `serde_json` writes them. Sorting keys makes the
//! hash independent of how a database returns JSON (PostgreSQL `jsonb` reorders keys).

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::store::{AuditDraft, AuditEntry, VerifyResult};

/// `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Writes `value` as canonical JSON (sorted keys, no whitespace) into `out`.
pub fn write_canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => out.push_str(&value.to_string()),
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical_json(v, out);
                }
            }
            out.push('}');
        }
    }
}

/// `value` as canonical JSON.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical_json(value, &mut out);
    out
}

/// The hash of `entry` from every field but `hash` itself (including `prev_hash`).
pub fn entry_hash(entry: &AuditEntry) -> String {
    let body = serde_json::json!({
        "seq": entry.seq,
        "time": entry.time,
        "actor": entry.actor,
        "action": entry.action.as_str(),
        "object_type": entry.object_type,
        "object_id": entry.object_id,
        "before": entry.before,
        "after": entry.after,
        "prev_hash": entry.prev_hash,
    });
    hex::encode(Sha256::digest(canonical_json(&body).as_bytes()))
}

/// Turns a draft into the chain's next entry, computing its hash.
pub fn seal(draft: AuditDraft, seq: i64, time: String, prev_hash: String) -> AuditEntry {
    let mut entry = AuditEntry {
        seq,
        time,
        actor: draft.actor,
        action: draft.action,
        object_type: draft.object_type,
        object_id: draft.object_id,
        before: draft.before,
        after: draft.after,
        prev_hash,
        hash: String::new(),
    };
    entry.hash = entry_hash(&entry);
    entry
}

/// Seals drafts one after the other, continuing a chain whose last entry has
/// `last_seq` (0 when empty) and `last_hash` ([`GENESIS_HASH`] when empty).
pub fn seal_all(drafts: Vec<AuditDraft>, last_seq: i64, last_hash: &str, time: &str) -> Vec<AuditEntry> {
    let mut prev = last_hash.to_string();
    let mut seq = last_seq;
    drafts
        .into_iter()
        .map(|draft| {
            seq += 1;
            let entry = seal(draft, seq, time.to_string(), std::mem::take(&mut prev));
            prev.clone_from(&entry.hash);
            entry
        })
        .collect()
}

/// Where a chain breaks: what [`ChainVerifier::push`] returns for a bad entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The seq of the entry that does not hold.
    pub seq: i64,
    /// What does not hold.
    pub reason: String,
}

/// Checks a chain one entry at a time, in seq order, so a store can stream rows instead
/// of loading the whole log.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_seq: i64,
    prev_hash: String,
    checked: u64,
}

impl Default for ChainVerifier {
    fn default() -> ChainVerifier {
        ChainVerifier::new()
    }
}

impl ChainVerifier {
    /// A verifier expecting seq 1 with the genesis `prev_hash`.
    pub fn new() -> ChainVerifier {
        ChainVerifier { next_seq: 1, prev_hash: GENESIS_HASH.to_string(), checked: 0 }
    }

    /// How many entries held so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// Checks the next entry: its seq follows the last, its `prev_hash` is the last
    /// entry's hash, and its hash recomputes.
    pub fn push(&mut self, entry: &AuditEntry) -> Result<(), ChainBreak> {
        let broken = |reason: String| ChainBreak { seq: entry.seq, reason };
        if entry.seq != self.next_seq {
            return Err(broken(format!(
                "expected seq {} but found seq {} (entries missing or reordered)",
                self.next_seq, entry.seq
            )));
        }
        if entry.prev_hash != self.prev_hash {
            return Err(broken("prev_hash does not match the previous entry's hash".to_string()));
        }
        if entry_hash(entry) != entry.hash {
            return Err(broken("hash does not match the entry's content".to_string()));
        }
        self.next_seq += 1;
        self.prev_hash.clone_from(&entry.hash);
        self.checked += 1;
        Ok(())
    }

    /// The result once every entry was pushed without a break.
    pub fn finish(&self) -> VerifyResult {
        VerifyResult::Ok { entries: self.checked }
    }

    /// The result for a break found by [`ChainVerifier::push`] (or by the store, e.g. a
    /// row that no longer parses).
    pub fn broken(&self, brk: ChainBreak) -> VerifyResult {
        VerifyResult::Broken { seq: brk.seq, entries_checked: self.checked, reason: brk.reason }
    }
}

/// Verifies a whole chain given in seq order.
pub fn verify_chain<'a, I>(entries: I) -> VerifyResult
where
    I: IntoIterator<Item = &'a AuditEntry>,
{
    let mut v = ChainVerifier::new();
    for entry in entries {
        if let Err(brk) = v.push(entry) {
            return v.broken(brk);
        }
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuditAction;
    use serde_json::json;

    fn draft(id: &str) -> AuditDraft {
        AuditDraft {
            actor: "admin".into(),
            action: AuditAction::Create,
            object_type: "rule".into(),
            object_id: id.into(),
            before: None,
            after: Some(json!({"id": id, "auth": {"password": "********"}})),
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let a = json!({"b": 1, "a": {"y": [1, {"d": 2, "c": "x\"y"}], "x": null}});
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":[1,{"c":"x\"y","d":2}]},"b":1}"#);
        let reordered: Value = serde_json::from_str(r#"{"a":{"y":[1,{"c":"x\"y","d":2}],"x":null},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&reordered));
    }

    #[test]
    fn chain_verifies_and_breaks_are_located() {
        let entries = seal_all(
            vec![draft("a"), draft("b"), draft("c"), draft("d")],
            0,
            GENESIS_HASH,
            "2025-01-01T00:00:00.000000Z",
        );
        assert_eq!(entries[0].prev_hash, GENESIS_HASH);
        assert_eq!(entries[1].prev_hash, entries[0].hash);
        assert_eq!(entries[3].seq, 4);
        assert_eq!(verify_chain(&entries), VerifyResult::Ok { entries: 4 });

        let mut edited = entries.clone();
        edited[2].actor = "mallory".into();
        assert!(matches!(verify_chain(&edited), VerifyResult::Broken { seq: 3, entries_checked: 2, .. }));

        // Recomputing the edited entry's hash moves the break to the next link.
        edited[2].hash = entry_hash(&edited[2]);
        assert!(matches!(verify_chain(&edited), VerifyResult::Broken { seq: 4, .. }));

        let mut gap = entries.clone();
        gap.remove(1);
        assert!(matches!(verify_chain(&gap), VerifyResult::Broken { seq: 3, .. }));
    }

    #[test]
    fn hash_ignores_key_order_but_not_values() {
        let e = seal(draft("a"), 1, "t".into(), GENESIS_HASH.into());
        let mut same = e.clone();
        same.after = Some(json!({"auth": {"password": "********"}, "id": "a"}));
        assert_eq!(entry_hash(&same), e.hash);
        same.after = Some(json!({"auth": {"password": "********"}, "id": "b"}));
        assert_ne!(entry_hash(&same), e.hash);
        assert_eq!(e.hash.len(), 64);
    }
}
