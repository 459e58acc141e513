//! The transport-neutral part of the cache, in rooms: [`config`] (settings and defaults),
//! [`plan`] (from the head: cached or not, how), [`flow`] (lookup, L2, single-flight), [`flight`]
//! (single-flight), [`guard`] (store timeout and breaker), [`record`] (admission and recording),
//! [`invalidate`]. The adapters (the tower service, the reqwest middleware, and through the
//! layer the gateway) only convert their types to and from the engine's.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Extensions, HeaderMap, Response};

use crate::context::RequestHead;
use crate::counters::{Metrics, StoreOp};
use crate::headers::{VARY_KEY, X_CACHE, X_CACHE_AGE, X_CACHE_ERROR, X_CACHE_SIMILARITY};
use crate::key::{self, KeyMemo};
use crate::store::{now_ms, CacheKey, CacheStore, DepEpochs, Entry, Lookup, PutOutcome};
use crate::CacheStatus;

mod body;
mod config;
mod flight;
mod flow;
mod guard;
mod invalidate;
mod plan;
mod record;

pub use body::ResponseBody;
#[cfg(feature = "reqwest")]
pub(crate) use body::Unwrapped;
pub(crate) use body::{into_bytes, poll_bytes, take_bytes};
pub(crate) use config::{Config, NamespaceSettings};
use flight::Flights;
pub(crate) use flow::{RefreshCall, Upstream};
use guard::StoreGuard;
#[cfg(feature = "reqwest")]
pub(crate) use invalidate::random_hash;
pub(crate) use plan::Plan;

/// The largest encoded-head buffer a thread keeps for the next request.
const MAX_KEPT_HEAD: usize = 16 * 1024;

/// The result of looking a request up.
pub(crate) enum Found {
    Hit(Entry, CacheStatus),
    /// Miss: the epochs to present at put time.
    Miss(DepEpochs),
    /// The store could not answer: forward, write nothing.
    Unavailable,
}

impl Found {
    /// What a guarded store lookup gave (`None`: skipped, failed or timed out).
    fn of(lookup: Option<Lookup>) -> Self {
        match lookup {
            Some(Lookup::Fresh(entry)) => Found::Hit(entry, CacheStatus::Hit),
            Some(Lookup::Stale(entry)) => Found::Hit(entry, CacheStatus::StaleHit),
            Some(Lookup::Miss(epochs)) => Found::Miss(epochs),
            None => Found::Unavailable,
        }
    }
}

/// The engine behind every adapter.
pub(crate) struct Engine {
    store: StoreGuard,
    config: Config,
    flights: Arc<Flights>,
    key_memo: KeyMemo,
    metrics: Metrics,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("fresh_ttl", &self.config.fresh_ttl)
            .field("stale_window", &self.config.stale_window)
            .field("max_body", &self.config.max_body)
            .field("metrics", &self.metrics.snapshot())
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub(crate) fn new(store: Arc<dyn CacheStore>, config: Config) -> Self {
        Self {
            store: StoreGuard::new(store, &config),
            config,
            flights: Arc::default(),
            key_memo: KeyMemo::default(),
            metrics: Metrics::default(),
        }
    }

    /// The settings.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The counters.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether a circuit breaker is skipping (part of) the store now.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) fn breaker_open(&self) -> bool {
        self.store.is_open()
    }

    pub(crate) fn key(&self, plan: &Plan, head: &RequestHead<'_>, body: &[u8]) -> CacheKey {
        let parts = plan.key_parts(head, &self.config.vary, body);
        thread_local! {
            // The encoded head is scratch space: reused by every request on the thread.
            static ENCODED: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(key::HEAD_CAPACITY));
        }
        let digest = ENCODED.with(|encoded| {
            let mut encoded = encoded.borrow_mut();
            encoded.clear();
            key::encode_head(&parts, &mut encoded);
            // Identical requests repeat (that is what a cache is for): the memo saves them
            // the canonicalisation and the SHA-256 of the body.
            let digest = self.key_memo.digest(&encoded, body, || {
                key::digest(&encoded, body, &self.config.keying)
            });
            // An outsized head (a huge URI or vary header) does not pin its buffer.
            if encoded.capacity() > MAX_KEPT_HEAD {
                *encoded = Vec::with_capacity(key::HEAD_CAPACITY);
            }
            digest
        });
        CacheKey::new(plan.namespace.tenant_shared().clone(), digest)
    }

    /// Looks the key up, failing open: a store error, a timeout or an open breaker is
    /// `Unavailable`, never an error.
    pub(crate) async fn lookup(&self, key: &CacheKey, deps: &[&str]) -> Found {
        Found::of(
            self.store
                .call(StoreOp::Lookup, key.tenant(), &self.metrics, |s| {
                    s.lookup(key, deps)
                })
                .await,
        )
    }

    /// [`lookup`](Self::lookup) when the store can answer at once ([`CacheStore::lookup_now`]);
    /// `None` when it cannot.
    pub(crate) fn lookup_now(&self, key: &CacheKey, deps: &[&str]) -> Option<Found> {
        match self
            .store
            .call_now(StoreOp::Lookup, key.tenant(), &self.metrics, |s| {
                s.lookup_now(key, deps)
            }) {
            guard::Now::Answered(lookup) => Some(Found::of(lookup)),
            guard::Now::Later => None,
        }
    }

    /// Writes an entry with the epochs observed at lookup; returns whether it was stored.
    pub(crate) async fn put(&self, key: &CacheKey, entry: Entry) -> bool {
        match self
            .store
            .call(StoreOp::Put, key.tenant(), &self.metrics, |s| {
                s.put(key, entry)
            })
            .await
        {
            Some(PutOutcome::Stored) => {
                self.metrics.stored.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(PutOutcome::Refused(reason)) => {
                self.metrics.refused_writes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target: "cachecore", ?key, ?reason, "write refused");
                false
            }
            None => false,
        }
    }

    /// The response served from an entry (consumed: its headers move into the response).
    pub(crate) fn hit_response<B>(
        &self,
        entry: Entry,
        status: CacheStatus,
        body: impl FnOnce(Bytes) -> B,
    ) -> Response<B> {
        let age = entry.age_ms(now_ms()) / 1000;
        let mut res = Response::new(body(entry.body));
        *res.status_mut() = entry.status;
        *res.headers_mut() = entry.headers;
        res.headers_mut().remove(VARY_KEY);
        res.headers_mut().insert(X_CACHE_AGE, age_value(age));
        self.mark(&mut res, status);
        res
    }

    /// Sets `X-Cache` (and the similarity header in wire mode) and, unless the layer leaves it
    /// off, the [`CacheStatus`] extension, and counts the outcome.
    pub(crate) fn mark<B>(&self, res: &mut Response<B>, status: CacheStatus) {
        // `http::Response` lends one part at a time; an empty `Extensions` does not allocate.
        let mut extensions = std::mem::take(res.extensions_mut());
        self.mark_head(res.headers_mut(), &mut extensions, status);
        *res.extensions_mut() = extensions;
    }

    /// Marks a bypassed response: `X-Cache: BYPASS`, and `X-Cache-Error` with `error`, the reason
    /// the request's cache instructions were rejected, if they were.
    pub(crate) fn mark_bypass(
        &self,
        headers: &mut HeaderMap,
        extensions: &mut Extensions,
        error: Option<HeaderValue>,
    ) {
        self.mark_head(headers, extensions, CacheStatus::Bypass);
        if let Some(error) = error {
            headers.insert(X_CACHE_ERROR, error);
        }
    }

    /// [`mark`](Self::mark) on the head of a response that is not an `http::Response`.
    pub(crate) fn mark_head(
        &self,
        headers: &mut HeaderMap,
        extensions: &mut Extensions,
        status: CacheStatus,
    ) {
        self.metrics.count(status);
        headers.insert(X_CACHE, HeaderValue::from_static(status.as_str()));
        // An L2 hit carries its own similarity, set when it matched.
        if self.config.similarity_header && status != CacheStatus::HitL2 {
            let similarity = match status {
                CacheStatus::Hit | CacheStatus::StaleHit => "1.00",
                _ => "0.00",
            };
            headers.insert(X_CACHE_SIMILARITY, HeaderValue::from_static(similarity));
        }
        if self.config.status_extension {
            extensions.insert(status);
        }
        tracing::debug!(target: "cachecore", status = status.as_str(), "request served");
    }
}

/// How many `X-Cache-Age` values [`age_value`] keeps made: the first hour's.
const AGES_MADE: usize = 3600;

/// The `X-Cache-Age` value of an age in seconds. The first hour's are made once, into one
/// string, so a hit copies a static value instead of formatting and allocating one (and
/// freeing it once written).
fn age_value(age: u64) -> HeaderValue {
    static AGES: LazyLock<Box<[HeaderValue]>> = LazyLock::new(|| {
        let mut digits = String::new();
        let mut ends = Vec::with_capacity(AGES_MADE);
        for age in 0..AGES_MADE {
            digits.push_str(&age.to_string());
            ends.push(digits.len());
        }
        // Made once per process and kept for its life.
        let digits: &'static str = Box::leak(digits.into_boxed_str());
        let mut start = 0;
        ends.into_iter()
            .map(|end| {
                let value = HeaderValue::from_static(&digits[start..end]);
                start = end;
                value
            })
            .collect()
    });
    match usize::try_from(age).ok().and_then(|i| AGES.get(i)) {
        Some(value) => value.clone(),
        None => HeaderValue::from(age),
    }
}

#[cfg(test)]
mod age_tests {
    use super::*;

    #[test]
    fn a_made_age_value_is_the_formatted_age() {
        let edges = [0, 1, 9, 10, 99, 100, 999, 1000, 3599, 3600, 3601, u64::MAX];
        for age in (0..AGES_MADE as u64).chain(edges) {
            assert_eq!(age_value(age), HeaderValue::from(age), "age {age}");
        }
    }
}
