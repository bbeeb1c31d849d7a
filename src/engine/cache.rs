//! The decision cache for rules with `cache_ttl_s` > 0: an outcome is reused for an
//! identical rendered request (method, URL, headers, body) of the same rule version,
//! so two users share an entry only when what verdict would send is byte-for-byte the
//! same. Concurrent identical misses make one call (moka coalesces them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

use super::Outcome;
use crate::rule::RenderedRequest;

/// What identifies a cached outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The catalog generation: a rule reloaded from a file keeps version 1, and a
    /// call in flight during a reload must not store an outcome the new rule reuses.
    pub generation: u64,
    pub rule_id: String,
    pub version: i64,
    pub request: RenderedRequest,
}

/// A cached outcome (only answers are cached, never errors).
#[derive(Debug, Clone)]
pub struct CachedOutcome {
    pub outcome: Outcome,
    pub reason: String,
    pub http_status: Option<u16>,
    pub ttl: Duration,
}

struct PerEntryTtl;

impl Expiry<CacheKey, Arc<CachedOutcome>> for PerEntryTtl {
    fn expire_after_create(&self, _: &CacheKey, value: &Arc<CachedOutcome>, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Bounded cache of rule outcomes.
#[derive(Clone)]
pub struct DecisionCache {
    inner: Cache<CacheKey, Arc<CachedOutcome>>,
}

impl DecisionCache {
    /// A cache holding at most `max_entries` outcomes.
    pub fn new(max_entries: u64) -> DecisionCache {
        DecisionCache { inner: Cache::builder().max_capacity(max_entries).expire_after(PerEntryTtl).build() }
    }

    /// The cached outcome for `key`, or the one `init` produces (stored when it is
    /// `Some`). The flag says whether it came from the cache.
    pub async fn get_or_insert<F>(&self, key: CacheKey, init: F) -> Option<(Arc<CachedOutcome>, bool)>
    where
        F: std::future::Future<Output = Option<Arc<CachedOutcome>>>,
    {
        let entry = self.inner.entry(key).or_optionally_insert_with(init).await?;
        let cached = !entry.is_fresh();
        Some((entry.into_value(), cached))
    }

    /// Drops every entry (a rule changed).
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    /// Entries held (approximate).
    pub fn len(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Whether the cache is empty (approximate).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
