//! Where entries and dep epochs live.
//!
//! [`CacheStore`] is the contract of docs/design.md §7. Every store keeps the dependency rules
//! of section 4: an entry records the epoch of each of its deps when it is written, a read serves
//! it only while all of them are still current, a put is refused when any of them moved since the
//! lookup, and an invalidation raises the epoch first and reclaims space afterwards. Epoch state
//! is bounded (rule 8): a put has a deadline after its lookup ([`DEFAULT_PUT_DEADLINE`]), and a
//! store forgets an epoch only once no entry and no admissible put can carry an older one.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

mod memory;
pub use memory::{MemoryStore, MemoryStoreBuilder, DEFAULT_MAX_BYTES};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

/// The future every [`CacheStore`] method returns (boxed so the trait stays object safe).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The future of [`CacheStore::invalidate_many`]: one result per id, in order.
pub type InvalidateManyFuture<'a> =
    Pin<Box<dyn Future<Output = Vec<Result<DepInvalidated, StoreError>>> + Send + 'a>>;

/// The async store behind the cache. Object safe: `Arc<dyn CacheStore>` works.
pub trait CacheStore: Send + Sync + 'static {
    /// Reads the entry under `key`, serving it only when every dep epoch it records is current.
    ///
    /// `deps` are the dep ids the request declares, the policy dep included; on a miss the store
    /// returns the current epoch of each of them, which the following [`put`](Self::put) must
    /// present.
    fn lookup<'a>(&'a self, key: &'a CacheKey, deps: &'a [&'a str]) -> StoreFuture<'a, Lookup>;

    /// [`lookup`](Self::lookup) answered at once, when the store can answer without waiting
    /// for anything: an in-process store always can, a store with a process-local copy can
    /// for what the copy holds. `None` means "call `lookup`" (the default: a store that only
    /// answers asynchronously need not implement it). The answer must be the one `lookup`
    /// would give now.
    ///
    /// The layer asks this first, so a hit it answers never builds the asynchronous path.
    fn lookup_now(&self, key: &CacheKey, deps: &[&str]) -> Option<Result<Lookup, StoreError>> {
        let _ = (key, deps);
        None
    }

    /// Writes `entry` under `key` if none of the epochs in `entry.deps` (those observed at
    /// lookup time) has moved since; otherwise refuses. Tags the key under each dep.
    fn put<'a>(&'a self, key: &'a CacheKey, entry: Entry) -> StoreFuture<'a, PutOutcome>;

    /// Raises the epoch of `dep_id` in `tenant` (storing `new_hash`), then deletes every entry
    /// tagged with it. An error means the epoch may not have been raised.
    fn invalidate<'a>(
        &'a self,
        tenant: &'a str,
        dep_id: &'a str,
        new_hash: &'a str,
    ) -> StoreFuture<'a, DepInvalidated>;

    /// Whether every call of this store ends within a time bound the store enforces itself
    /// (its own timeout). The layer then sets no timer of its own around the store's calls;
    /// otherwise it bounds each call that does not answer at once by its store timeout.
    fn bounds_its_own_calls(&self) -> bool {
        false
    }

    /// How many parts of the store can fail independently of each other (default 1). The layer
    /// keeps one circuit breaker per part, so one failing part is skipped while the others keep
    /// serving.
    fn failure_domains(&self) -> usize {
        1
    }

    /// The part of the store that holds `tenant`'s data: a number below
    /// [`failure_domains`](Self::failure_domains) (default 0). All of a tenant's calls must
    /// land in the part it names.
    fn failure_domain(&self, tenant: &str) -> usize {
        let _ = tenant;
        0
    }

    /// [`invalidate`](Self::invalidate) for each id: one result per id, in order. The default
    /// calls `invalidate` in turn; a store can do better.
    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: &'a str,
    ) -> InvalidateManyFuture<'a> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(dep_ids.len());
            for id in dep_ids {
                out.push(self.invalidate(tenant, id, new_hash).await);
            }
            out
        })
    }
}

impl<T: CacheStore + ?Sized> CacheStore for Arc<T> {
    fn bounds_its_own_calls(&self) -> bool {
        (**self).bounds_its_own_calls()
    }
    fn failure_domains(&self) -> usize {
        (**self).failure_domains()
    }
    fn failure_domain(&self, tenant: &str) -> usize {
        (**self).failure_domain(tenant)
    }
    fn lookup<'a>(&'a self, key: &'a CacheKey, deps: &'a [&'a str]) -> StoreFuture<'a, Lookup> {
        (**self).lookup(key, deps)
    }
    fn lookup_now(&self, key: &CacheKey, deps: &[&str]) -> Option<Result<Lookup, StoreError>> {
        (**self).lookup_now(key, deps)
    }
    fn put<'a>(&'a self, key: &'a CacheKey, entry: Entry) -> StoreFuture<'a, PutOutcome> {
        (**self).put(key, entry)
    }
    fn invalidate<'a>(
        &'a self,
        tenant: &'a str,
        dep_id: &'a str,
        new_hash: &'a str,
    ) -> StoreFuture<'a, DepInvalidated> {
        (**self).invalidate(tenant, dep_id, new_hash)
    }
    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: &'a str,
    ) -> InvalidateManyFuture<'a> {
        (**self).invalidate_many(tenant, dep_ids, new_hash)
    }
}

/// A cache key: the tenant it lives in and the SHA-256 digest of the request (docs/design.md §3).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    tenant: Arc<str>,
    digest: [u8; 32],
}

impl CacheKey {
    /// A key for `digest` in `tenant`.
    pub fn new(tenant: impl Into<Arc<str>>, digest: [u8; 32]) -> Self {
        Self {
            tenant: tenant.into(),
            digest,
        }
    }

    /// The tenant the key lives in.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The shared tenant string.
    pub fn tenant_arc(&self) -> &Arc<str> {
        &self.tenant
    }

    /// The SHA-256 digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The digest as 64 lowercase hex characters.
    pub fn hex(&self) -> String {
        crate::key::to_hex(&self.digest)
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({}/{})", self.tenant, &self.hex()[..16])
    }
}

/// The epoch of each dep an entry was computed from (or a lookup observed), sorted by id, and
/// when the store observed them.
///
/// A store stamps the epochs it returns with the time of the lookup: a put presented more than
/// the store's put deadline after it is refused ([`RefusedReason::DeadlinePassed`]), which is what
/// lets a store forget epochs (docs/design.md §4 rule 8). Equality compares the epochs only.
///
/// A store also notes, for each dep, which *life* of its state it observed: an epoch that was
/// forgotten and raised again starts a new life, so a put that observed epoch N of the old life
/// is refused even though the dep is at epoch N again. `DepEpochs::new` knows no lives; a put
/// presenting it is checked on the numbers alone.
#[derive(Clone)]
pub struct DepEpochs {
    deps: Arc<[Observed]>,
    observed_at: Instant,
}

/// One dep's epoch, and the life of the dep's state it belongs to (0: not known, or no state).
#[derive(Clone, Debug)]
struct Observed {
    id: String,
    epoch: u64,
    life: u64,
}

impl DepEpochs {
    /// Builds the set from `(dep id, epoch)` pairs; sorts and removes duplicate ids. Observed
    /// now.
    pub fn new(pairs: Vec<(String, u64)>) -> Self {
        Self::observed(
            pairs.into_iter().map(|(id, e)| (id, e, 0)).collect(),
            Instant::now(),
        )
    }

    /// The set from `(dep id, epoch, life)` triples, observed at `at`.
    pub(crate) fn observed(mut deps: Vec<(String, u64, u64)>, at: Instant) -> Self {
        // Stores write them sorted: strictly ascending ids need neither the sort nor the dedup.
        if !deps.is_sorted_by(|a, b| a.0 < b.0) {
            deps.sort_by(|a, b| a.0.cmp(&b.0));
            deps.dedup_by(|a, b| a.0 == b.0);
        }
        Self {
            // Shared: entries are cloned on every hit, their epochs need not be.
            deps: deps
                .into_iter()
                .map(|(id, epoch, life)| Observed { id, epoch, life })
                .collect(),
            observed_at: at,
        }
    }

    /// The `(dep id, epoch)` pairs, sorted by id.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, u64)> + '_ {
        self.deps.iter().map(|d| (d.id.as_str(), d.epoch))
    }

    /// The `(dep id, epoch, life)` triples, sorted by id.
    pub(crate) fn iter_lives(&self) -> impl ExactSizeIterator<Item = (&str, u64, u64)> + '_ {
        self.deps.iter().map(|d| (d.id.as_str(), d.epoch, d.life))
    }

    /// The number of deps.
    pub fn len(&self) -> usize {
        self.deps.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.deps.is_empty()
    }

    /// The epoch recorded for `dep_id`.
    pub fn get(&self, dep_id: &str) -> Option<u64> {
        self.deps
            .binary_search_by(|d| d.id.as_str().cmp(dep_id))
            .ok()
            .map(|i| self.deps[i].epoch)
    }

    /// When the store observed these epochs (for [`DepEpochs::new`]: when it was called).
    pub fn observed_at(&self) -> Instant {
        self.observed_at
    }

    /// Marks the epochs as observed (again) at `at`: a lookup that found them current.
    pub(crate) fn restamp(&mut self, at: Instant) {
        self.observed_at = at;
    }

    /// Sets the life of every dep to `life(id)`. In place when the set is not shared (a freshly
    /// decoded entry), so a hit pays no allocation for it.
    #[cfg(feature = "redis")]
    pub(crate) fn set_lives(&mut self, life: impl Fn(&str) -> u64) {
        match Arc::get_mut(&mut self.deps) {
            Some(deps) => deps.iter_mut().for_each(|d| d.life = life(&d.id)),
            None => {
                self.deps = self
                    .deps
                    .iter()
                    .map(|d| Observed {
                        life: life(&d.id),
                        ..d.clone()
                    })
                    .collect()
            }
        }
    }
}

impl Default for DepEpochs {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl PartialEq for DepEpochs {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for DepEpochs {}

impl fmt::Debug for DepEpochs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// One stored response.
#[derive(Debug)]
pub struct Entry {
    /// Response status.
    pub status: StatusCode,
    /// Response headers, as the inner service sent them.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// When the entry was written, in milliseconds since the Unix epoch.
    pub stored_at_ms: u64,
    /// How long the entry is fresh.
    pub fresh_ttl: Duration,
    /// How long after `fresh_ttl` it may still be served stale while one refresh runs.
    pub stale_window: Duration,
    /// The dep epochs observed when the upstream call started, the policy dep included.
    pub deps: DepEpochs,
}

/// Room for the headers a hit adds to a stored response (`X-Cache`, `X-Cache-Age`,
/// `X-Cache-Similarity`), so serving it never grows the header map.
pub(crate) const HIT_HEADER_ROOM: usize = 3;

/// A header map holding `headers`, with room for [`HIT_HEADER_ROOM`] more.
pub(crate) fn headers_with_room(headers: &HeaderMap) -> HeaderMap {
    // Not a clone then `reserve`: that copies the index table without hashing, but leaves the
    // entry list full, and a hit's first insert then reallocates it; for the few headers of a
    // completion that costs more than hashing them again (measured with the gateway probe).
    let mut out = HeaderMap::with_capacity(headers.len() + HIT_HEADER_ROOM);
    for (name, value) in headers {
        out.append(name.clone(), value.clone());
    }
    out
}

impl Clone for Entry {
    /// A copy whose header map has room for the headers a hit adds ([`headers_with_room`]), so
    /// serving it never grows the map.
    fn clone(&self) -> Self {
        Self {
            status: self.status,
            headers: headers_with_room(&self.headers),
            body: self.body.clone(),
            stored_at_ms: self.stored_at_ms,
            fresh_ttl: self.fresh_ttl,
            stale_window: self.stale_window,
            deps: self.deps.clone(),
        }
    }
}

impl Entry {
    /// How long the store must keep the entry: fresh TTL plus stale window.
    pub fn lifetime(&self) -> Duration {
        self.fresh_ttl.saturating_add(self.stale_window)
    }

    /// Age in milliseconds at `now_ms`.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms)
    }

    /// Classifies the entry at `now_ms`: fresh, stale (within the stale window) or expired.
    pub fn freshness(&self, now_ms: u64) -> Freshness {
        let age = self.age_ms(now_ms);
        let fresh = duration_ms(self.fresh_ttl);
        if age < fresh {
            Freshness::Fresh
        } else if age < fresh.saturating_add(duration_ms(self.stale_window)) {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }

    /// Approximate bytes the entry occupies, for byte-bounded stores.
    pub fn weight(&self) -> usize {
        const OVERHEAD: usize = 128;
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 16)
            .sum();
        let deps: usize = self.deps.iter().map(|(id, _)| id.len() + 16).sum();
        self.body.len() + headers + deps + OVERHEAD
    }
}

/// Where an entry stands in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Within its fresh TTL.
    Fresh,
    /// Past its fresh TTL, within its stale window.
    Stale,
    /// Past both.
    Expired,
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_ms)
        .unwrap_or(0)
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The answer to [`CacheStore::lookup`].
#[derive(Clone, Debug)]
pub enum Lookup {
    /// A valid entry within its fresh TTL.
    Fresh(Entry),
    /// A valid entry past its fresh TTL but within its stale window. Its `deps` are current.
    Stale(Entry),
    /// No valid entry; the current epochs of the requested deps.
    Miss(DepEpochs),
}

/// The answer to [`CacheStore::put`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The entry was written and tagged.
    Stored,
    /// The entry was not written.
    Refused(RefusedReason),
}

/// Why a put was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusedReason {
    /// A dep epoch moved between the lookup and the put: the response may be derived from data
    /// that has since changed (docs/design.md §4, rule 4).
    DepChanged(String),
    /// The entry is larger than the store accepts.
    TooLarge,
    /// The put came more than the store's put deadline after the lookup that observed its
    /// epochs ([`DepEpochs::observed_at`]). The store may have forgotten those epochs since
    /// (docs/design.md §4 rule 8), so it can no longer tell whether they moved.
    DeadlinePassed,
}

/// Default put deadline: how long after its lookup a put is still accepted.
///
/// A put follows the upstream call it stores. Ten minutes covers the slowest LLM calls this cache
/// stores (long completions, streamed answers recorded to their end, a single-flight follower
/// that waited its 30 s first) several times over, so a real answer is practically never
/// refused for it; and it bounds how long a store must remember an epoch nothing else needs
/// (a dep invalidated once per row): a few minutes' worth of invalidations, not all of them.
pub const DEFAULT_PUT_DEADLINE: Duration = Duration::from_secs(600);

/// Most time a put that passed its deadline check can take to reach the store's data (a
/// request on the wire or queued in a busy server). The store keeps an epoch this much longer
/// than the deadline.
const PUT_TRANSIT: Duration = Duration::from_secs(60);

/// How long after its last raise a store keeps an epoch that no entry records any more: the
/// put deadline, plus the time a put that passed it may still be under way (a minute, or the
/// deadline itself when that is shorter, so short test deadlines stay short). After that no
/// admissible put can carry an older epoch (docs/design.md §4 rule 8).
pub(crate) fn epoch_retention(put_deadline: Duration) -> Duration {
    put_deadline.saturating_add(put_deadline.min(PUT_TRANSIT))
}

/// One dep invalidated: entries derived from it are no longer served. What a store reports for
/// each dep it invalidated, and what every invalidation handle reports per dep
/// ([`Invalidated`](crate::Invalidated), [`InvalidationError`](crate::InvalidationError)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepInvalidated {
    /// The dep id.
    pub dep_id: String,
    /// How many entries were deleted now. Zero does not mean nothing was invalidated: entries
    /// still in the store are refused on read and reclaimed later.
    pub deleted: u64,
    /// Whether the raised epoch reached the replicas the store was asked to wait for
    /// (`RedisStoreBuilder::ack_replicas`); `None` when no acknowledgement was asked for.
    /// `Some(false)` does not undo the invalidation: it is in effect on the primary, but a
    /// failover to a replica that missed it can bring the old entries back (docs/design.md §4
    /// rule 9).
    pub acknowledged: Option<bool>,
}

impl DepInvalidated {
    /// `dep_id` invalidated, `deleted` entries deleted now, no acknowledgement asked for.
    pub fn new(dep_id: impl Into<String>, deleted: u64) -> Self {
        Self {
            dep_id: dep_id.into(),
            deleted,
            acknowledged: None,
        }
    }
}

/// A store failure. The layer never passes it to a client: it logs, counts and goes on.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
}

/// The kind of a [`StoreError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store did not answer within its timeout.
    Timeout,
    /// The store is unreachable or answered with an error.
    Backend,
    /// The store held data it could not decode.
    Corrupt,
    /// The circuit breaker is open: the store is being skipped for a cool-down.
    CircuitOpen,
    /// The caller's input was rejected (e.g. an invalid dep id).
    InvalidInput,
    /// The store lacks what the configuration asks of it (e.g. a Redis without the search
    /// module for L2's vector index).
    Unsupported,
}

impl StoreError {
    /// A new error.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// What went wrong (without the kind [`Display`](fmt::Display) adds).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        describe(f, self.kind, &self.message)
    }
}

/// How a store failure reads: `cache store <kind>: <message>`. The invalidation API sends a
/// failed dep's reason this way, and the remote client reads the kind back from it
/// (docs/design.md §8).
pub(crate) fn describe(
    f: &mut fmt::Formatter<'_>,
    kind: StoreErrorKind,
    message: &str,
) -> fmt::Result {
    write!(f, "{STORE_ERROR_PREFIX}{kind:?}: {message}")
}

/// What every [`describe`]d store failure starts with.
pub(crate) const STORE_ERROR_PREFIX: &str = "cache store ";

impl StoreErrorKind {
    /// Every kind, for reading one back from its name (the remote client's).
    #[cfg(any(feature = "client", test))]
    pub(crate) const ALL: [Self; 6] = [
        Self::Timeout,
        Self::Backend,
        Self::Corrupt,
        Self::CircuitOpen,
        Self::InvalidInput,
        Self::Unsupported,
    ];
}

impl std::error::Error for StoreError {}

#[cfg(test)]
mod room_tests {
    use super::*;
    use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, SET_COOKIE};

    #[test]
    fn a_copy_with_room_keeps_every_value_in_order_and_takes_three_more_without_growing() {
        for n in 0..40 {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.append(SET_COOKIE, HeaderValue::from_static("a=1"));
            headers.append(SET_COOKIE, HeaderValue::from_static("b=2"));
            for i in 0..n {
                let name = HeaderName::try_from(format!("x-upstream-{i}")).unwrap();
                headers.insert(name, HeaderValue::from(i));
            }
            let mut copy = headers_with_room(&headers);
            let pairs = |m: &HeaderMap| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(pairs(&copy), pairs(&headers), "{n} extra headers");
            let capacity = copy.capacity();
            assert!(
                capacity >= copy.keys_len() + HIT_HEADER_ROOM,
                "{n} extra headers"
            );
            for name in [
                crate::headers::X_CACHE,
                crate::headers::X_CACHE_AGE,
                crate::headers::X_CACHE_SIMILARITY,
            ] {
                copy.insert(name, HeaderValue::from_static("1"));
            }
            assert_eq!(copy.capacity(), capacity, "{n} extra headers: grew");
        }
    }
}

#[cfg(test)]
mod dep_epochs_tests {
    use super::*;

    fn ids(deps: &DepEpochs) -> Vec<(&str, u64)> {
        deps.iter().collect()
    }

    #[test]
    fn epochs_are_sorted_by_id_and_each_id_kept_once_however_they_come() {
        let pairs = |p: &[(&str, u64)]| p.iter().map(|(id, e)| (id.to_string(), *e)).collect();
        // Already in order (as stores write them), out of order, with a duplicate next to its
        // twin once sorted, and with one that only sorting brings next to its twin.
        for given in [
            vec![("a", 1), ("b", 2), ("cc:policy", 3)],
            vec![("cc:policy", 3), ("a", 1), ("b", 2)],
            vec![("a", 1), ("a", 1), ("b", 2), ("cc:policy", 3)],
            vec![("b", 2), ("a", 1), ("cc:policy", 3), ("b", 2)],
        ] {
            let deps = DepEpochs::new(pairs(&given));
            assert_eq!(
                ids(&deps),
                [("a", 1), ("b", 2), ("cc:policy", 3)],
                "{given:?}"
            );
        }
    }
}
