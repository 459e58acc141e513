//! The counters as one `prometheus-client` collector (feature `prometheus`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::counters::{QueueMetrics, StoreOp};
use crate::engine::Engine;
use crate::{CacheStatus, CachecoreLayer};

/// The cache's counters, its store latency and its breaker, read at scrape time.
///
/// | metric | type | labels |
/// |---|---|---|
/// | `cachecore_requests_total` | counter | `status`: the `X-Cache` value (`HIT_L1`, `HIT_L1_STALE`, `HIT_L2`, `MISS`, `BYPASS`) |
/// | `cachecore_store_writes_total` | counter | `outcome`: `stored`, `refused` (a dep moved during the upstream call, or too large) |
/// | `cachecore_store_errors_total` | counter | store calls that failed or timed out (each failed open) |
/// | `cachecore_store_skipped_total` | counter | store calls skipped by the open circuit breaker |
/// | `cachecore_store_breaker_open` | gauge | 1 while the breaker skips the store |
/// | `cachecore_store_breaker_opened_total` | counter | times the breaker opened |
/// | `cachecore_store_call_duration_seconds` | histogram | `op`: `lookup`, `put` |
/// | `cachecore_coalesced_total` | counter | requests that joined an identical in-flight one |
/// | `cachecore_background_refreshes_total` | counter | refreshes of stale entries |
/// | `cachecore_invalidations_total` | counter | dep invalidations attempted |
/// | `cachecore_invalidation_errors_total` | counter | of those, failed |
/// | `cachecore_invalidated_entries_total` | counter | entries deleted by invalidations |
///
/// With [`queue`](Self::queue): `cachecore_queue_applied_total`,
/// `cachecore_queue_failed_attempts_total`, `cachecore_queue_dead_lettered_total` (counters),
/// and `cachecore_queue_lag`, `cachecore_queue_pending`, `cachecore_queue_dead_letters`
/// (gauges, present once known).
///
/// A store that answers without waiting (the in-process [`MemoryStore`](crate::MemoryStore))
/// is not timed, so the clock is not read on its hit path: its calls count in the first
/// bucket.
#[derive(Clone)]
pub struct PrometheusCollector {
    engine: Arc<Engine>,
    queue: Option<QueueMetrics>,
}

impl fmt::Debug for PrometheusCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrometheusCollector")
            .field("queue", &self.queue.is_some())
            .finish_non_exhaustive()
    }
}

impl PrometheusCollector {
    /// A collector of `layer`'s counters (and of every clone of it: they share them).
    pub fn new(layer: &CachecoreLayer) -> Self {
        Self {
            engine: Arc::clone(layer.engine()),
            queue: None,
        }
    }

    /// Adds the queue worker's numbers.
    #[must_use]
    pub fn queue(mut self, queue: QueueMetrics) -> Self {
        self.queue = Some(queue);
        self
    }
}

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: i64) -> fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

fn labelled_counters(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&'static str, u64)],
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for &(value, n) in values {
        ConstCounter::new(n).encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

impl Collector for PrometheusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let m = self.engine.metrics();
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let e = &mut encoder;
        labelled_counters(
            e,
            "cachecore_requests",
            "Requests by what the cache did (the X-Cache value).",
            "status",
            &[
                (CacheStatus::Hit.as_str(), g(&m.hits)),
                (CacheStatus::StaleHit.as_str(), g(&m.stale_hits)),
                ("HIT_L2", g(&m.l2_hits)),
                (CacheStatus::Miss.as_str(), g(&m.misses)),
                (CacheStatus::Bypass.as_str(), g(&m.bypasses)),
            ],
        )?;
        labelled_counters(
            e,
            "cachecore_store_writes",
            "Entry writes: stored, or refused by the store (a dep moved, or too large).",
            "outcome",
            &[("stored", g(&m.stored)), ("refused", g(&m.refused_writes))],
        )?;
        counter(
            e,
            "cachecore_store_errors",
            "Store calls that failed or timed out; each request went through uncached.",
            g(&m.store_errors),
        )?;
        counter(
            e,
            "cachecore_store_skipped",
            "Store calls skipped while the circuit breaker was open.",
            g(&m.store_skipped),
        )?;
        gauge(
            e,
            "cachecore_store_breaker_open",
            "1 while the circuit breaker skips the store, else 0.",
            i64::from(self.engine.breaker_open()),
        )?;
        counter(
            e,
            "cachecore_store_breaker_opened",
            "Times the circuit breaker opened.",
            g(&m.breaker_opened),
        )?;
        {
            let mut family = e.encode_descriptor(
                "cachecore_store_call_duration",
                "Time of store lookups and puts (in-process stores count in the first bucket).",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for op in StoreOp::ALL {
                let (sum, count, buckets) = m.latency(op).read();
                family
                    .encode_family(&[("op", op.as_str())])?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        counter(
            e,
            "cachecore_coalesced",
            "Requests that joined an identical in-flight request instead of calling upstream.",
            g(&m.coalesced),
        )?;
        counter(
            e,
            "cachecore_background_refreshes",
            "Background refreshes of stale entries started.",
            g(&m.background_refreshes),
        )?;
        counter(
            e,
            "cachecore_invalidations",
            "Dep invalidations attempted.",
            g(&m.invalidations),
        )?;
        counter(
            e,
            "cachecore_invalidation_errors",
            "Dep invalidations that failed.",
            g(&m.invalidation_errors),
        )?;
        counter(
            e,
            "cachecore_invalidated_entries",
            "Entries deleted by invalidations (space reclaimed).",
            g(&m.invalidated_entries),
        )?;
        if let Some(queue) = &self.queue {
            let q = queue.snapshot();
            counter(
                e,
                "cachecore_queue_applied",
                "Invalidation events applied and acknowledged.",
                q.applied,
            )?;
            counter(
                e,
                "cachecore_queue_failed_attempts",
                "Invalidation event attempts that failed, transient ones included.",
                q.failed_attempts,
            )?;
            counter(
                e,
                "cachecore_queue_dead_lettered",
                "Invalidation events this process moved to the dead-letter stream.",
                q.dead_lettered,
            )?;
            let gauges = [
                (
                    "cachecore_queue_lag",
                    "Events in the stream not yet delivered to the consumer group.",
                    q.lag,
                ),
                (
                    "cachecore_queue_pending",
                    "Events delivered to the consumer group and not acknowledged.",
                    q.pending,
                ),
                (
                    "cachecore_queue_dead_letters",
                    "Entries in the dead-letter stream.",
                    q.dead_letters,
                ),
            ];
            for (name, help, value) in gauges {
                if let Some(v) = value {
                    gauge(e, name, help, i64::try_from(v).unwrap_or(i64::MAX))?;
                }
            }
        }
        Ok(())
    }
}
