//! The store guard: every store call under a timeout and the circuit breaker of the store's
//! part it goes to, failing open (docs/design.md §6).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::config::Config;
use crate::counters::{LatencyHistogram, Metrics, StoreOp};
use crate::store::{duration_ms, CacheStore, StoreError, StoreFuture};

/// The store, behind its timeout and its breakers: the only way the engine reaches the store.
pub(super) struct StoreGuard {
    store: Arc<dyn CacheStore>,
    /// The store bounds its own calls (no second timer needed).
    self_bounded: bool,
    breakers: Breakers,
    timeout: Duration,
    failures: u32,
    cooldown: Duration,
}

impl StoreGuard {
    pub(super) fn new(store: Arc<dyn CacheStore>, config: &Config) -> Self {
        Self {
            self_bounded: store.bounds_its_own_calls(),
            breakers: Breakers::new(store.failure_domains()),
            store,
            timeout: config.store_timeout,
            failures: config.breaker_failures,
            cooldown: config.breaker_cooldown,
        }
    }

    /// The store itself, for the calls no guard may cut short (invalidation must be reported,
    /// not skipped: docs/design.md §6).
    pub(super) fn unguarded(&self) -> &dyn CacheStore {
        &*self.store
    }

    /// Whether a breaker is skipping a part of the store now (for the metrics).
    pub(super) fn is_open(&self) -> bool {
        !self.breakers.allows()
    }

    /// Runs one store call for `tenant` under the timeout and the circuit breaker of the store's
    /// part that holds the tenant; `None` when it was skipped, failed or timed out.
    pub(super) async fn call<'a, T>(
        &'a self,
        op: StoreOp,
        tenant: &str,
        metrics: &Metrics,
        call: impl FnOnce(&'a dyn CacheStore) -> StoreFuture<'a, T>,
    ) -> Option<T> {
        let breaker = self.breakers.domain(self.store.failure_domain(tenant));
        if !breaker.allows() {
            metrics.store_skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut call = call(&*self.store);
        let latency = metrics.latency(op);
        // In-process stores answer on the first poll: they need no timer (and no clock read).
        let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        let _timed = TimeOnDrop(first.is_pending().then(Instant::now), latency);
        let outcome = match first {
            Poll::Ready(result) => result.map_err(|e| e.to_string()),
            // A store with its own timeout needs no second timer. Without a Tokio runtime there
            // is no timer: the call runs unbounded rather than panicking in a caller's executor.
            Poll::Pending
                if self.self_bounded || tokio::runtime::Handle::try_current().is_err() =>
            {
                call.await.map_err(|e| e.to_string())
            }
            Poll::Pending => match tokio::time::timeout(self.timeout, call).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            },
        };
        self.settle(outcome, &breaker, metrics)
    }

    /// [`call`](Self::call) for a store that can answer at once ([`CacheStore::lookup_now`]).
    /// An answer at once is timed as zero, like a `call` answered on its first poll.
    pub(super) fn call_now<T>(
        &self,
        op: StoreOp,
        tenant: &str,
        metrics: &Metrics,
        call: impl FnOnce(&dyn CacheStore) -> Option<Result<T, StoreError>>,
    ) -> Now<T> {
        let breaker = self.breakers.domain(self.store.failure_domain(tenant));
        if !breaker.allows() {
            return Now::Later;
        }
        let Some(outcome) = call(&*self.store) else {
            return Now::Later;
        };
        metrics.latency(op).observe(Duration::ZERO);
        Now::Answered(self.settle(outcome.map_err(|e| e.to_string()), &breaker, metrics))
    }

    /// A store call's outcome, told to the breaker and the metrics.
    fn settle<T>(
        &self,
        outcome: Result<T, String>,
        breaker: &DomainBreaker<'_>,
        metrics: &Metrics,
    ) -> Option<T> {
        let error = match outcome {
            Ok(value) => {
                breaker.success();
                return Some(value);
            }
            Err(error) => error,
        };
        metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        if breaker.failure(self.failures, self.cooldown) {
            metrics.breaker_opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "cachecore", %error, cooldown = ?self.cooldown,
                "cache store failing; skipping it for a cool-down");
        } else {
            tracing::warn!(target: "cachecore", %error, "cache store call failed; request goes through uncached");
        }
        None
    }
}

/// What [`StoreGuard::call_now`] gives.
pub(super) enum Now<T> {
    /// The store cannot answer at once, or its breaker is open: ask [`StoreGuard::call`] (which
    /// skips the store, and counts the skip, while the breaker is open).
    Later,
    /// What [`StoreGuard::call`] would have given.
    Answered(Option<T>),
}

/// Records a store call's time in its histogram when the call ends, however it ends (a caller
/// that gives up drops the future). A call answered on the first poll counts as zero: timing it
/// would put a clock read on the in-process hit path.
struct TimeOnDrop<'a>(Option<Instant>, &'a LatencyHistogram);

impl Drop for TimeOnDrop<'_> {
    fn drop(&mut self) {
        self.1
            .observe(self.0.map_or(Duration::ZERO, |started| started.elapsed()));
    }
}

/// One circuit breaker per failure domain of the store ([`CacheStore::failure_domain`]): a part
/// that keeps failing is skipped for a cool-down while the others keep serving (on Redis
/// Cluster, a dead master costs only the tenants whose slots it holds).
#[derive(Debug)]
struct Breakers {
    domains: Box<[Breaker]>,
    epoch: Instant,
}

/// Skips one failure domain for a cool-down after repeated consecutive failures in it.
#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    open_until_ms: AtomicU64,
}

/// The breaker of one domain.
struct DomainBreaker<'a> {
    breaker: &'a Breaker,
    breakers: &'a Breakers,
}

impl Breakers {
    fn new(domains: usize) -> Self {
        Self {
            domains: (0..domains.max(1)).map(|_| Breaker::default()).collect(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        duration_ms(self.epoch.elapsed())
    }

    /// The breaker of `domain` (a domain past the store's count wraps around rather than panic).
    fn domain(&self, domain: usize) -> DomainBreaker<'_> {
        DomainBreaker {
            breaker: &self.domains[domain % self.domains.len()],
            breakers: self,
        }
    }

    /// Whether no domain is being skipped.
    fn allows(&self) -> bool {
        (0..self.domains.len()).all(|d| self.domain(d).allows())
    }
}

impl DomainBreaker<'_> {
    fn allows(&self) -> bool {
        // Zero: never opened, or closed again. Checked first so a healthy store costs no clock
        // read. Past the cool-down the breaker is half-open: calls go through, and the next
        // failure opens it again straight away (the failure count is still at the threshold).
        let until = self.breaker.open_until_ms.load(Ordering::Relaxed);
        until == 0 || until <= self.breakers.now()
    }

    fn success(&self) {
        if self.breaker.failures.load(Ordering::Relaxed) != 0 {
            self.breaker.failures.store(0, Ordering::Relaxed);
            self.breaker.open_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failure; true when it opened the breaker.
    fn failure(&self, threshold: u32, cooldown: Duration) -> bool {
        let n = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < threshold.max(1) {
            return false;
        }
        self.breaker.open_until_ms.store(
            self.breakers.now() + duration_ms(cooldown),
            Ordering::Relaxed,
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaker_opens_at_the_threshold_and_a_success_closes_it() {
        let breakers = Breakers::new(1);
        let b = breakers.domain(0);
        assert!(!b.failure(3, Duration::from_secs(60)));
        assert!(!b.failure(3, Duration::from_secs(60)));
        assert!(b.allows());
        assert!(
            b.failure(3, Duration::from_secs(60)),
            "the third failure opens it"
        );
        assert!(!b.allows());
        assert!(!breakers.allows());
        b.success();
        assert!(b.allows());
    }

    #[test]
    fn an_open_breaker_skips_only_its_own_failure_domain() {
        let breakers = Breakers::new(2);
        assert!(breakers.domain(1).failure(1, Duration::from_secs(60)));
        assert!(breakers.domain(0).allows());
        assert!(!breakers.domain(1).allows());
        // A domain past the store's count wraps around rather than panic.
        assert!(!breakers.domain(3).allows());
    }

    #[test]
    fn a_breaker_is_half_open_after_its_cool_down() {
        let breakers = Breakers::new(1);
        let b = breakers.domain(0);
        assert!(b.failure(1, Duration::ZERO));
        assert!(b.allows(), "past the cool-down calls go through");
        assert!(
            b.failure(1, Duration::from_secs(60)),
            "and the next failure opens it again"
        );
        assert!(!b.allows());
    }
}
