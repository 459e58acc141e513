//! The counters of the cache: atomics bumped on the request path, read as snapshots. Public
//! through [`crate::metrics`], which also exports them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::CacheStatus;

/// Upper bounds of the store-latency buckets, in microseconds. They run from an in-process
/// answer and a Redis round trip on the same host (~100 µs) to the default store timeout
/// (250 ms) and past it, so a store that times out shows in the last finite buckets.
pub(crate) const STORE_LATENCY_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A store call, for the latency histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreOp {
    Lookup,
    Put,
}

impl StoreOp {
    pub(crate) const ALL: [Self; 2] = [Self::Lookup, Self::Put];

    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Lookup => "lookup",
            Self::Put => "put",
        }
    }
}

/// A latency histogram of atomics: one relaxed add per bucket hit, no lock, no allocation.
#[derive(Debug, Default)]
pub(crate) struct LatencyHistogram {
    /// Calls per bucket (not cumulative); the last slot is `+Inf`.
    buckets: [AtomicU64; STORE_LATENCY_BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    pub(crate) fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let slot = STORE_LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(STORE_LATENCY_BOUNDS_US.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// `(sum in seconds, count, (upper bound in seconds, calls in that bucket alone))`, the
    /// shape `prometheus-client` encodes (it adds the buckets up itself).
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.load(Ordering::Relaxed);
            count += n;
            let bound = STORE_LATENCY_BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            out.push((bound, n));
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, out)
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

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
    pub(crate) breaker_opened: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) background_refreshes: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) invalidation_errors: AtomicU64,
    pub(crate) invalidated_entries: AtomicU64,
    pub(crate) lookup_latency: LatencyHistogram,
    pub(crate) put_latency: LatencyHistogram,
}

impl Metrics {
    // The last arm is `HIT_L2` (feature `semantic`); written as a wildcard so these counters
    // build whether or not the status exists in this build.
    #[allow(unreachable_patterns)]
    pub(crate) fn count(&self, status: CacheStatus) {
        let c = match status {
            CacheStatus::Hit => &self.hits,
            CacheStatus::StaleHit => &self.stale_hits,
            CacheStatus::Miss => &self.misses,
            CacheStatus::Bypass => &self.bypasses,
            CacheStatus::HitL2 => &self.l2_hits,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn latency(&self, op: StoreOp) -> &LatencyHistogram {
        match op {
            StoreOp::Lookup => &self.lookup_latency,
            StoreOp::Put => &self.put_latency,
        }
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
            breaker_opened: g(&self.breaker_opened),
            coalesced: g(&self.coalesced),
            background_refreshes: g(&self.background_refreshes),
            invalidations: g(&self.invalidations),
            invalidation_errors: g(&self.invalidation_errors),
            invalidated_entries: g(&self.invalidated_entries),
            store_calls: StoreOp::ALL.map(|op| self.latency(op).count()).iter().sum(),
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
    /// Times the circuit breaker opened.
    pub breaker_opened: u64,
    /// Lookups and puts that reached the store (the store latency histogram's count).
    pub store_calls: u64,
    /// Requests that waited for an identical in-flight request instead of calling upstream.
    pub coalesced: u64,
    /// Background refreshes of stale entries started.
    pub background_refreshes: u64,
    /// Dep invalidations attempted.
    pub invalidations: u64,
    /// Dep invalidations that failed.
    pub invalidation_errors: u64,
    /// Entries deleted by invalidations (space reclaimed; the invalidation itself took effect
    /// when the dep's epoch moved).
    pub invalidated_entries: u64,
}

/// What a queue worker reports, for the metrics: fed by the worker (or by whoever watches its
/// stream), read by [`PrometheusCollector::queue`] when scraped.
///
/// Cheap to clone: clones share the counters.
///
/// ```
/// let queue = cachecore::metrics::QueueMetrics::default();
/// queue.applied(1);
/// queue.set_lag(Some(12));
/// assert_eq!(queue.snapshot().lag, Some(12));
/// ```
#[derive(Clone, Debug, Default)]
pub struct QueueMetrics(Arc<QueueCounters>);

#[derive(Debug, Default)]
struct QueueCounters {
    applied: AtomicU64,
    failed_attempts: AtomicU64,
    dead_lettered: AtomicU64,
    lag: AtomicU64,
    pending: AtomicU64,
    dead_letter_len: AtomicU64,
    lag_known: AtomicBool,
    pending_known: AtomicBool,
    dead_letter_len_known: AtomicBool,
}

/// A point-in-time copy of [`QueueMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueSnapshot {
    /// Events applied and acknowledged.
    pub applied: u64,
    /// Attempts that failed (transient ones included).
    pub failed_attempts: u64,
    /// Events this process moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Events in the stream not yet delivered to the consumer group (Redis `XINFO GROUPS`
    /// `lag`), when known.
    pub lag: Option<u64>,
    /// Events delivered but not acknowledged, when known.
    pub pending: Option<u64>,
    /// Entries in the dead-letter stream, when known.
    pub dead_letters: Option<u64>,
}

impl QueueMetrics {
    /// Counts `n` events applied and acknowledged.
    pub fn applied(&self, n: u64) {
        self.0.applied.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` failed attempts.
    pub fn failed_attempts(&self, n: u64) {
        self.0.failed_attempts.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` events moved to the dead-letter stream.
    pub fn dead_lettered(&self, n: u64) {
        self.0.dead_lettered.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the number of events not yet delivered to the group (`None`: unknown).
    pub fn set_lag(&self, lag: Option<u64>) {
        set(&self.0.lag, &self.0.lag_known, lag);
    }

    /// Sets the number of events delivered and not acknowledged (`None`: unknown).
    pub fn set_pending(&self, pending: Option<u64>) {
        set(&self.0.pending, &self.0.pending_known, pending);
    }

    /// Sets the length of the dead-letter stream (`None`: unknown).
    pub fn set_dead_letters(&self, len: Option<u64>) {
        set(&self.0.dead_letter_len, &self.0.dead_letter_len_known, len);
    }

    /// The values now.
    pub fn snapshot(&self) -> QueueSnapshot {
        let c = &self.0;
        let get = |v: &AtomicU64, known: &AtomicBool| {
            known
                .load(Ordering::Relaxed)
                .then(|| v.load(Ordering::Relaxed))
        };
        QueueSnapshot {
            applied: c.applied.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            lag: get(&c.lag, &c.lag_known),
            pending: get(&c.pending, &c.pending_known),
            dead_letters: get(&c.dead_letter_len, &c.dead_letter_len_known),
        }
    }
}

fn set(value: &AtomicU64, known: &AtomicBool, to: Option<u64>) {
    value.store(to.unwrap_or(0), Ordering::Relaxed);
    known.store(to.is_some(), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_first_bucket_that_holds_it() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(5));
        let (sum, count, buckets) = h.read();
        assert_eq!(count, 3);
        assert!((sum - 5.000201).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.0001, 1));
        assert_eq!(buckets[1], (0.00025, 1));
        assert_eq!(buckets[buckets.len() - 2].1, 0);
        assert_eq!(buckets[buckets.len() - 1], (f64::INFINITY, 1));
    }
}
