//! Counters: cheap to bump on every request, cheap to snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::CacheStatus;

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) hits: AtomicU64,
    pub(crate) stale_hits: AtomicU64,
    pub(crate) l2_hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) bypasses: AtomicU64,
    pub(crate) stored: AtomicU64,
    pub(crate) refused_writes: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) store_skipped: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) background_refreshes: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) invalidation_errors: AtomicU64,
}

impl Metrics {
    pub(crate) fn count(&self, status: CacheStatus) {
        let c = match status {
            CacheStatus::Hit => &self.hits,
            CacheStatus::StaleHit => &self.stale_hits,
            CacheStatus::HitL2 => &self.l2_hits,
            CacheStatus::Miss => &self.misses,
            CacheStatus::Bypass => &self.bypasses,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            hits: g(&self.hits),
            stale_hits: g(&self.stale_hits),
            l2_hits: g(&self.l2_hits),
            misses: g(&self.misses),
            bypasses: g(&self.bypasses),
            stored: g(&self.stored),
            refused_writes: g(&self.refused_writes),
            store_errors: g(&self.store_errors),
            store_skipped: g(&self.store_skipped),
            coalesced: g(&self.coalesced),
            background_refreshes: g(&self.background_refreshes),
            invalidations: g(&self.invalidations),
            invalidation_errors: g(&self.invalidation_errors),
        }
    }
}

/// A point-in-time copy of the layer's counters, since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Requests served from a fresh entry.
    pub hits: u64,
    /// Requests served from a stale entry.
    pub stale_hits: u64,
    /// Requests served from the entry of a request that means the same (L2, feature
    /// `semantic`).
    pub l2_hits: u64,
    /// Requests sent to the inner service through the cache.
    pub misses: u64,
    /// Requests that bypassed the cache.
    pub bypasses: u64,
    /// Entries written.
    pub stored: u64,
    /// Writes the store refused (a dep moved during the upstream call, or too large).
    pub refused_writes: u64,
    /// Store calls that failed or timed out (each one failed open).
    pub store_errors: u64,
    /// Store calls skipped because the circuit breaker was open.
    pub store_skipped: u64,
    /// Requests that waited for an identical in-flight request instead of calling upstream.
    pub coalesced: u64,
    /// Background refreshes of stale entries started.
    pub background_refreshes: u64,
    /// Dep invalidations attempted.
    pub invalidations: u64,
    /// Dep invalidations that failed.
    pub invalidation_errors: u64,
}

impl MetricsSnapshot {
    /// Renders the counters in the Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        let rows: [(&str, &str, u64); 12] = [
            (
                "cachecore_hits_total",
                "Requests served from a fresh entry.",
                self.hits,
            ),
            (
                "cachecore_stale_hits_total",
                "Requests served from a stale entry.",
                self.stale_hits,
            ),
            (
                "cachecore_misses_total",
                "Requests sent upstream through the cache.",
                self.misses,
            ),
            (
                "cachecore_bypasses_total",
                "Requests that bypassed the cache.",
                self.bypasses,
            ),
            ("cachecore_stored_total", "Entries written.", self.stored),
            (
                "cachecore_refused_writes_total",
                "Writes refused by the store.",
                self.refused_writes,
            ),
            (
                "cachecore_store_errors_total",
                "Store calls that failed or timed out.",
                self.store_errors,
            ),
            (
                "cachecore_store_skipped_total",
                "Store calls skipped by the circuit breaker.",
                self.store_skipped,
            ),
            (
                "cachecore_coalesced_total",
                "Requests that joined an in-flight identical request.",
                self.coalesced,
            ),
            (
                "cachecore_background_refreshes_total",
                "Background refreshes of stale entries.",
                self.background_refreshes,
            ),
            (
                "cachecore_invalidations_total",
                "Dep invalidations attempted.",
                self.invalidations,
            ),
            (
                "cachecore_invalidation_errors_total",
                "Dep invalidations that failed.",
                self.invalidation_errors,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        out
    }
}
