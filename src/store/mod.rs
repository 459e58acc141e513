//! Where entries and dep epochs live.
//!
//! [`CacheStore`] is the contract of DESIGN section 5. Every store keeps the dependency rules
//! of section 4: an entry records the epoch of each of its deps when it is written, a read serves
//! it only while all of them are still current, a put is refused when any of them moved since the
//! lookup, and an invalidation raises the epoch first and reclaims space afterwards.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

mod memory;
pub use memory::{MemoryStore, MemoryStoreBuilder, DEFAULT_MAX_BYTES};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

/// The future every [`CacheStore`] method returns (boxed so the trait stays object safe).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The async store behind the cache. Object safe: `Arc<dyn CacheStore>` works.
pub trait CacheStore: Send + Sync + 'static {
    /// Reads the entry under `key`, serving it only when every dep epoch it records is current.
    ///
    /// `deps` are the dep ids the request declares, the policy dep included; on a miss the store
    /// returns the current epoch of each of them, which the following [`put`](Self::put) must
    /// present.
    fn lookup<'a>(&'a self, key: &'a CacheKey, deps: &'a [&'a str]) -> StoreFuture<'a, Lookup>;

    /// Writes `entry` under `key` if none of the epochs in `entry.deps` (those observed at
    /// lookup time) has moved since; otherwise refuses. Tags the key under each dep.
    fn put<'a>(&'a self, key: &'a CacheKey, entry: Entry) -> StoreFuture<'a, PutOutcome>;

    /// Raises the epoch of `dep_id` in `tenant` (storing `new_hash`), then deletes every entry
    /// tagged with it.
    fn invalidate<'a>(
        &'a self,
        tenant: &'a str,
        dep_id: &'a str,
        new_hash: &'a str,
    ) -> StoreFuture<'a, InvalidationResult>;

    /// Whether every call of this store ends within a time bound the store enforces itself
    /// (its own timeout). The layer then sets no timer of its own around the store's calls;
    /// otherwise it bounds each call that does not answer at once by its store timeout.
    fn bounds_its_own_calls(&self) -> bool {
        false
    }

    /// [`invalidate`](Self::invalidate) for each id, reporting per id. The default calls
    /// `invalidate` in turn; a store can do better.
    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: &'a str,
    ) -> StoreFuture<'a, Vec<InvalidationResult>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(dep_ids.len());
            for id in dep_ids {
                out.push(match self.invalidate(tenant, id, new_hash).await {
                    Ok(r) => r,
                    Err(e) => InvalidationResult::failed(*id, e.to_string()),
                });
            }
            Ok(out)
        })
    }
}

impl<T: CacheStore + ?Sized> CacheStore for Arc<T> {
    fn bounds_its_own_calls(&self) -> bool {
        (**self).bounds_its_own_calls()
    }
    fn lookup<'a>(&'a self, key: &'a CacheKey, deps: &'a [&'a str]) -> StoreFuture<'a, Lookup> {
        (**self).lookup(key, deps)
    }
    fn put<'a>(&'a self, key: &'a CacheKey, entry: Entry) -> StoreFuture<'a, PutOutcome> {
        (**self).put(key, entry)
    }
    fn invalidate<'a>(
        &'a self,
        tenant: &'a str,
        dep_id: &'a str,
        new_hash: &'a str,
    ) -> StoreFuture<'a, InvalidationResult> {
        (**self).invalidate(tenant, dep_id, new_hash)
    }
    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: &'a str,
    ) -> StoreFuture<'a, Vec<InvalidationResult>> {
        (**self).invalidate_many(tenant, dep_ids, new_hash)
    }
}

/// A cache key: the tenant it lives in and the SHA-256 digest of the request (DESIGN section 3).
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

/// The epoch of each dep an entry was computed from (or a lookup observed), sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DepEpochs(Arc<[(String, u64)]>);

impl DepEpochs {
    /// Builds the set from `(dep id, epoch)` pairs; sorts and removes duplicate ids.
    pub fn new(mut pairs: Vec<(String, u64)>) -> Self {
        pairs.sort();
        pairs.dedup_by(|a, b| a.0 == b.0);
        // Shared: entries are cloned on every hit, their epochs need not be.
        Self(pairs.into())
    }

    /// The `(dep id, epoch)` pairs, sorted by id.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, u64)> + '_ {
        self.0.iter().map(|(id, e)| (id.as_str(), *e))
    }

    /// The number of deps.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The epoch recorded for `dep_id`.
    pub fn get(&self, dep_id: &str) -> Option<u64> {
        self.0
            .binary_search_by(|(id, _)| id.as_str().cmp(dep_id))
            .ok()
            .map(|i| self.0[i].1)
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
    let mut out = HeaderMap::with_capacity(headers.len() + HIT_HEADER_ROOM);
    for (name, value) in headers {
        out.append(name.clone(), value.clone());
    }
    out
}

impl Clone for Entry {
    /// A copy whose header map has room for the headers a hit adds (a derived clone of a
    /// `HeaderMap` has none, so every hit would reallocate it).
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
pub fn now_ms() -> u64 {
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
    /// that has since changed (DESIGN section 4, rule 4).
    DepChanged(String),
    /// The entry is larger than the store accepts.
    TooLarge,
}

/// The outcome of invalidating one dep.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InvalidationResult {
    /// The dep id.
    pub dep_id: String,
    /// Whether the epoch was raised (entries recorded before can no longer be served).
    pub ok: bool,
    /// How many entries were deleted now. Zero does not mean nothing was invalidated: entries
    /// still in the store are rejected on read and reclaimed later.
    pub deleted: u64,
    /// What went wrong, when `ok` is false.
    pub error: Option<String>,
}

impl InvalidationResult {
    /// A success that deleted `deleted` entries.
    pub fn ok(dep_id: impl Into<String>, deleted: u64) -> Self {
        Self {
            dep_id: dep_id.into(),
            ok: true,
            deleted,
            error: None,
        }
    }

    /// A failure.
    pub fn failed(dep_id: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            dep_id: dep_id.into(),
            ok: false,
            deleted: 0,
            error: Some(error.into()),
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
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cache store {:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for StoreError {}
