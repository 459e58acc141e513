//! The default, in-process store on `moka`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::sync::Cache;

use super::{
    epoch_retention, now_ms, CacheKey, CacheStore, DepEpochs, DepInvalidated, Entry, Freshness,
    Lookup, PutOutcome, RefusedReason, StoreError, StoreErrorKind, StoreFuture,
    DEFAULT_PUT_DEADLINE,
};
use crate::dep::validate_dep_id;

/// Default capacity: 256 MiB of entries (bodies, headers and bookkeeping).
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// An in-memory [`CacheStore`], bounded by bytes, with per-entry TTL and a dep index that is
/// cleaned when entries are evicted.
///
/// The dep index is bounded too (docs/design.md §4 rule 8): a put more than the
/// [put deadline](MemoryStoreBuilder::put_deadline) after its lookup is refused, and a raised
/// epoch is forgotten once no entry records the dep and the deadline (plus a margin for puts
/// under way) has passed since its last raise. A dep invalidated once per row costs memory for
/// a few minutes, not for the life of the process. An epoch raised again after being forgotten
/// starts a new life, which puts that observed the old one never match.
///
/// Cloning is cheap and shares the same data, so a test can keep a handle to inspect what the
/// layer stored.
///
/// ```
/// use cachecore::MemoryStore;
/// let store = MemoryStore::builder().max_bytes(64 * 1024 * 1024).build();
/// assert_eq!(store.entry_count(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    entries: Cache<CacheKey, Arc<Stored>, foldhash::quality::RandomState>,
    deps: Arc<DepIndex>,
    max_entry_bytes: usize,
    put_deadline: Duration,
}

/// Builds a [`MemoryStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
    put_deadline: Duration,
}

impl MemoryStoreBuilder {
    /// Total bytes the entries may occupy before the least useful are evicted.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// How long after its lookup a put is still accepted (default
    /// [`DEFAULT_PUT_DEADLINE`](crate::store::DEFAULT_PUT_DEADLINE)); later ones are refused
    /// with [`RefusedReason::DeadlinePassed`]. It must exceed the slowest upstream call worth
    /// caching. A raised epoch that no entry records is kept about this long (plus up to a
    /// minute) after its last raise, then forgotten.
    pub fn put_deadline(mut self, deadline: Duration) -> Self {
        self.put_deadline = deadline;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        let deps = Arc::new(DepIndex::new(epoch_retention(self.put_deadline)));
        let listener_deps = Arc::clone(&deps);
        let entries = Cache::builder()
            .max_capacity(self.max_bytes)
            .weigher(|_k: &CacheKey, e: &Arc<Stored>| u32::try_from(e.weight()).unwrap_or(u32::MAX))
            .expire_after(EntryExpiry)
            .eviction_listener(move |key: Arc<CacheKey>, entry: Arc<Stored>, cause| {
                // A replacement under the same key carries the same dep ids (deps are part of
                // the key), and its tags are already in place.
                if cause != RemovalCause::Replaced {
                    listener_deps.untag(&key, &entry);
                }
            })
            .build_with_hasher(foldhash::quality::RandomState::default());
        MemoryStore {
            entries,
            deps,
            // One entry may not take more than an eighth of the store, so a single huge
            // response cannot flush everything else.
            max_entry_bytes: usize::try_from(self.max_bytes / 8).unwrap_or(usize::MAX),
            put_deadline: self.put_deadline,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default capacity ([`DEFAULT_MAX_BYTES`]).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_bytes: DEFAULT_MAX_BYTES,
            put_deadline: DEFAULT_PUT_DEADLINE,
        }
    }

    /// The number of entries held now (after pending evictions have run).
    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// The entries held now, with their keys.
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn entries(&self) -> Vec<(CacheKey, Entry)> {
        self.entries.run_pending_tasks();
        self.entries
            .iter()
            .map(|(k, e)| ((*k).clone(), Entry::clone(&e)))
            .collect()
    }

    /// The dep ids recorded on the entry under `key`, the policy dep included.
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn deps_of(&self, key: &CacheKey) -> Option<Vec<String>> {
        self.entries
            .get(key)
            .map(|e| e.deps.iter().map(|(id, _)| id.to_owned()).collect())
    }

    /// The current epoch of `dep_id` in `tenant` (0 until it is first invalidated, and again
    /// once it has been forgotten).
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn dep_epoch(&self, tenant: &str, dep_id: &str) -> u64 {
        self.deps.read().epoch(tenant, dep_id).0
    }

    /// How many dep states the index holds, plus the raised epochs waiting to be forgotten:
    /// what per-dep memory the store uses, for tests of its bound.
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    #[doc(hidden)]
    pub fn dep_index_size(&self) -> usize {
        let index = self.deps.read();
        index.tenants.values().map(HashMap::len).sum::<usize>() + index.forget.len()
    }

    /// The last `new_hash` given for `dep_id` in `tenant` (none once the epoch is forgotten).
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn dep_hash(&self, tenant: &str, dep_id: &str) -> Option<String> {
        let index = self.deps.read();
        index
            .tenants
            .get(tenant)
            .and_then(|t| t.get(dep_id))
            .and_then(|d| d.last_hash.clone())
    }

    /// How many keys are tagged under `dep_id` in `tenant`.
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn tagged_count(&self, tenant: &str, dep_id: &str) -> usize {
        let index = self.deps.read();
        index
            .tenants
            .get(tenant)
            .and_then(|t| t.get(dep_id))
            .map_or(0, |d| d.keys.len())
    }

    /// Removes every entry. Dep epochs are kept until the put deadline allows forgetting them:
    /// forgetting one sooner could admit a stale write.
    pub fn clear(&self) {
        self.entries.invalidate_all();
        self.entries.run_pending_tasks();
    }

    fn lookup_here(&self, key: &CacheKey, deps: &[&str]) -> Lookup {
        if let Some(entry) = self.entries.get(key) {
            // No write to the dep index since this entry was last found valid: it still is,
            // without taking the lock or looking its deps up again.
            let valid = entry.valid_at.load(Ordering::SeqCst) == self.deps.writes() || {
                let index = self.deps.read();
                let writes = self.deps.writes();
                let tenant = index.tenants.get(key.tenant());
                let valid = entry
                    .deps
                    .iter_lives()
                    .all(|(id, epoch, life)| current(epoch_in(tenant, id), epoch, life));
                if valid {
                    entry.valid_at.store(writes, Ordering::SeqCst);
                }
                valid
            };
            if valid {
                // The epochs were current just now: a put after this hit (a refresh) counts its
                // deadline from here.
                let served = |entry: &Entry| {
                    let mut entry = entry.clone();
                    entry.deps.restamp(Instant::now());
                    entry
                };
                match entry.freshness(now_ms()) {
                    Freshness::Fresh => return Lookup::Fresh(served(&entry)),
                    Freshness::Stale => return Lookup::Stale(served(&entry)),
                    Freshness::Expired => {}
                }
            } else {
                // Rule 3: a dep moved. The entry is dead; reclaim it now.
                self.entries.invalidate(key);
            }
        }
        let index = self.deps.read();
        let tenant = index.tenants.get(key.tenant());
        Lookup::Miss(DepEpochs::observed(
            deps.iter()
                .map(|id| {
                    let (epoch, life) = epoch_in(tenant, id);
                    ((*id).to_owned(), epoch, life)
                })
                .collect(),
            Instant::now(),
        ))
    }

    fn put_now(&self, key: &CacheKey, entry: Entry) -> PutOutcome {
        if entry.weight() > self.max_entry_bytes {
            return PutOutcome::Refused(RefusedReason::TooLarge);
        }
        let now = Instant::now();
        let observed_at = entry.deps.observed_at();
        if now.saturating_duration_since(observed_at) > self.put_deadline {
            return PutOutcome::Refused(RefusedReason::DeadlinePassed);
        }
        {
            let mut index = self.deps.write();
            index.sweep(now, self.deps.retention);
            if let Some(moved) = index.first_moved(key.tenant(), &entry.deps) {
                return PutOutcome::Refused(RefusedReason::DepChanged(moved));
            }
            let tenant = index.tenants.entry(key.tenant_arc().clone()).or_default();
            for (id, _) in entry.deps.iter() {
                tenant
                    .entry(id.to_owned())
                    .or_default()
                    .keys
                    .insert(*key.digest());
            }
        }
        let deps = entry.deps.clone();
        self.entries
            .insert(key.clone(), Arc::new(Stored::new(entry)));
        // An invalidation may have run between the tagging above and the insert: it took the
        // tag set before the entry existed. The entry could never be served (its epochs are
        // old), but drop it now rather than let it hold memory until its TTL.
        // The read guard must be gone before moka runs the eviction listener inside
        // `invalidate`: the listener takes the write lock on this thread (`untag`). Rule for
        // this file: never call into moka while holding the dep index lock.
        let moved = self.deps.read().first_moved(key.tenant(), &deps);
        if let Some(moved) = moved {
            self.entries.invalidate(key);
            return PutOutcome::Refused(RefusedReason::DepChanged(moved));
        }
        // Only a put this late (a thread descheduled for the whole retention) could have seen
        // its epochs forgotten and the tag it placed taken by an invalidation: the check above
        // proves nothing then.
        if observed_at.elapsed() > self.deps.retention {
            self.entries.invalidate(key);
            return PutOutcome::Refused(RefusedReason::DeadlinePassed);
        }
        PutOutcome::Stored
    }

    fn invalidate_now(
        &self,
        tenant: &str,
        dep_id: &str,
        new_hash: &str,
    ) -> Result<DepInvalidated, StoreError> {
        validate_dep_id(dep_id)
            .map_err(|e| StoreError::new(StoreErrorKind::InvalidInput, e.to_string()))?;
        let now = Instant::now();
        let (tenant, keys) = {
            let mut index = self.deps.write();
            index.sweep(now, self.deps.retention);
            let tenant = match index.tenants.get_key_value(tenant) {
                Some((shared, _)) => Arc::clone(shared),
                None => Arc::from(tenant),
            };
            let state = index
                .tenants
                .entry(Arc::clone(&tenant))
                .or_default()
                .entry(dep_id.to_owned())
                .or_default();
            state.epoch += 1;
            if state.life == 0 {
                state.life = self.deps.next_life.fetch_add(1, Ordering::Relaxed);
            }
            state.raised_at = Some(now);
            state.last_hash = Some(new_hash.to_owned());
            let keys = std::mem::take(&mut state.keys);
            // One place in the queue per state, however often it is raised: a dep raised a
            // thousand times a second costs one item, not a thousand.
            let queue = !std::mem::replace(&mut state.queued, true);
            let life = state.life;
            if queue {
                index.forget.push_back(Forget {
                    at: now + self.deps.retention,
                    tenant: Arc::clone(&tenant),
                    dep_id: dep_id.to_owned(),
                    life,
                });
            }
            (tenant, keys)
        };
        let deleted = keys
            .into_iter()
            .filter(|digest| {
                self.entries
                    .remove(&CacheKey::new(tenant.clone(), *digest))
                    .is_some()
            })
            .count();
        Ok(DepInvalidated::new(dep_id, deleted as u64))
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.entries.entry_count())
            .field("weighted_bytes", &self.entries.weighted_size())
            .finish()
    }
}

impl CacheStore for MemoryStore {
    fn lookup<'a>(&'a self, key: &'a CacheKey, deps: &'a [&'a str]) -> StoreFuture<'a, Lookup> {
        let out = self.lookup_here(key, deps);
        Box::pin(std::future::ready(Ok(out)))
    }

    fn lookup_now(&self, key: &CacheKey, deps: &[&str]) -> Option<Result<Lookup, StoreError>> {
        Some(Ok(self.lookup_here(key, deps)))
    }

    fn put<'a>(&'a self, key: &'a CacheKey, entry: Entry) -> StoreFuture<'a, PutOutcome> {
        let out = self.put_now(key, entry);
        Box::pin(std::future::ready(Ok(out)))
    }

    fn invalidate<'a>(
        &'a self,
        tenant: &'a str,
        dep_id: &'a str,
        new_hash: &'a str,
    ) -> StoreFuture<'a, DepInvalidated> {
        let out = self.invalidate_now(tenant, dep_id, new_hash);
        Box::pin(std::future::ready(out))
    }
}

/// An entry as the store holds it.
struct Stored {
    entry: Entry,
    /// The dep index's [write count](DepIndex::writes) when a lookup last found every epoch
    /// the entry records current ([`NEVER_VALIDATED`] before the first).
    valid_at: AtomicU64,
}

/// A write count the index never reaches.
const NEVER_VALIDATED: u64 = u64::MAX;

impl Stored {
    fn new(entry: Entry) -> Self {
        Self {
            entry,
            valid_at: AtomicU64::new(NEVER_VALIDATED),
        }
    }
}

impl Deref for Stored {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        &self.entry
    }
}

/// Epochs, last hashes and the keys tagged under each dep, per tenant.
struct DepIndex {
    inner: RwLock<Tenants>,
    /// Raised each time the write lock is taken, before anything is changed under it. A lookup
    /// that reads the same count as when it last validated an entry (under the read lock) knows
    /// no epoch, life or state has changed since: the entry is still valid. Any later change,
    /// an invalidation included, raises the count before it is made.
    writes: AtomicU64,
    /// How long a raised epoch that no entry records is kept after its last raise.
    retention: Duration,
    /// The life the next state raised from nothing gets; never 0, never reused.
    next_life: AtomicU64,
}

#[derive(Default)]
struct Tenants {
    tenants: HashMap<Arc<str>, HashMap<String, DepState>>,
    /// Raised states, about in the order they may be forgotten; each is in it at most once (see
    /// `DepState::queued`). When its turn comes, a state raised again since goes back in at its
    /// new time, and one still tagged leaves the queue: the untag of its last key forgets it.
    forget: VecDeque<Forget>,
}

struct Forget {
    at: Instant,
    tenant: Arc<str>,
    dep_id: String,
    /// The life of the state queued: a state forgotten (by an untag) and raised again is another
    /// life, with its own place in the queue.
    life: u64,
}

/// Forget-queue items looked at per write, at most: a raise adds one at most, so the queue
/// drains under any load while each write's extra work stays small.
const SWEEP_PER_WRITE: usize = 16;

#[derive(Default)]
struct DepState {
    epoch: u64,
    /// Which life of the dep's state this is (0 until its first raise).
    life: u64,
    last_hash: Option<String>,
    keys: HashSet<[u8; 32]>,
    /// The last raise; `None` for a state that only tags keys.
    raised_at: Option<Instant>,
    /// Whether the state has a place in the forget queue. Invariant: a state raised less than
    /// the retention ago has one, so it is looked at again once the retention has passed.
    queued: bool,
}

impl DepState {
    /// Whether the state can go (docs/design.md §4 rule 8): no entry records the dep, and no
    /// admissible put can carry an epoch older than this one. Epoch 0 and no keys is the same as
    /// no state at all.
    fn forgettable(&self, now: Instant, retention: Duration) -> bool {
        self.keys.is_empty()
            && self
                .raised_at
                .is_none_or(|at| now.saturating_duration_since(at) >= retention)
    }
}

impl DepIndex {
    fn new(retention: Duration) -> Self {
        Self {
            inner: RwLock::default(),
            writes: AtomicU64::new(0),
            retention,
            next_life: AtomicU64::new(1),
        }
    }

    // A poisoned lock only means another thread panicked mid-update of plain maps; the data is
    // still usable and failing every request would be worse.
    fn read(&self) -> RwLockReadGuard<'_, Tenants> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tenants> {
        let guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        self.writes.fetch_add(1, Ordering::SeqCst);
        guard
    }

    /// How many times the write lock has been taken.
    fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn untag(&self, key: &CacheKey, entry: &Entry) {
        let now = Instant::now();
        let mut index = self.write();
        let Some(tenant) = index.tenants.get_mut(key.tenant()) else {
            return;
        };
        for (id, _) in entry.deps.iter() {
            if let Some(state) = tenant.get_mut(id) {
                state.keys.remove(key.digest());
                if state.forgettable(now, self.retention) {
                    tenant.remove(id);
                }
            }
        }
        if tenant.is_empty() {
            index.tenants.remove(key.tenant());
        }
    }
}

impl Tenants {
    #[cfg(any(test, feature = "test-util"))]
    fn epoch(&self, tenant: &str, dep_id: &str) -> (u64, u64) {
        epoch_in(self.tenants.get(tenant), dep_id)
    }

    fn first_moved(&self, tenant: &str, observed: &DepEpochs) -> Option<String> {
        let deps = self.tenants.get(tenant);
        observed
            .iter_lives()
            .find(|(id, epoch, life)| !current(epoch_in(deps, id), *epoch, *life))
            .map(|(id, _, _)| id.to_owned())
    }

    /// Forgets, in queue order, the raised epochs whose time has come and that nothing records.
    fn sweep(&mut self, now: Instant, retention: Duration) {
        for _ in 0..SWEEP_PER_WRITE {
            match self.forget.front() {
                Some(next) if next.at <= now => {}
                _ => return,
            }
            let Some(Forget {
                tenant,
                dep_id,
                life,
                ..
            }) = self.forget.pop_front()
            else {
                return;
            };
            let Some(deps) = self.tenants.get_mut(&tenant) else {
                continue;
            };
            let Some(state) = deps.get_mut(&dep_id).filter(|state| state.life == life) else {
                continue;
            };
            state.queued = false;
            if state.forgettable(now, retention) {
                deps.remove(&dep_id);
                if deps.is_empty() {
                    self.tenants.remove(&tenant);
                }
                continue;
            }
            // Raised again since it was queued: back in the queue at its new time. Otherwise its
            // time has come but entries record it: the untag of the last one forgets it.
            if let Some(at) = state
                .raised_at
                .map(|at| at + retention)
                .filter(|at| *at > now)
            {
                state.queued = true;
                self.forget.push_back(Forget {
                    at,
                    tenant,
                    dep_id,
                    life,
                });
            }
        }
    }
}

/// The epoch and life of `dep_id` in one tenant's deps (found once per lookup, not once per
/// dep); `(0, 0)` when there is no state.
fn epoch_in(tenant: Option<&HashMap<String, DepState>>, dep_id: &str) -> (u64, u64) {
    tenant
        .and_then(|t| t.get(dep_id))
        .map_or((0, 0), |d| (d.epoch, d.life))
}

/// Whether an observed `(epoch, life)` is the current `(epoch, life)`. An unknown life (0, from
/// [`DepEpochs::new`]) is checked on the number alone.
fn current((cur_epoch, cur_life): (u64, u64), epoch: u64, life: u64) -> bool {
    cur_epoch == epoch && (life == 0 || cur_life == life)
}

struct EntryExpiry;

impl moka::Expiry<CacheKey, Arc<Stored>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Stored>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let age = Duration::from_millis(entry.age_ms(now_ms()));
        Some(entry.lifetime().saturating_sub(age))
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        entry: &Arc<Stored>,
        updated_at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, entry, updated_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::POLICY_DEP;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn entry(body_len: usize, ttl: Duration, deps: &[(&str, u64)]) -> Entry {
        Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body_len]),
            stored_at_ms: now_ms(),
            fresh_ttl: ttl,
            stale_window: Duration::ZERO,
            deps: DepEpochs::new(deps.iter().map(|(d, e)| ((*d).to_owned(), *e)).collect()),
        }
    }

    fn key(i: u32) -> CacheKey {
        let mut digest = [0u8; 32];
        digest[..4].copy_from_slice(&i.to_be_bytes());
        CacheKey::new("t", digest)
    }

    #[test]
    fn a_remembered_validation_never_outlives_an_epoch_change() {
        let store = MemoryStore::new();
        let deps = [("doc:1", 0), (POLICY_DEP, 0)];
        let declared = ["doc:1", POLICY_DEP];
        let out = store.put_now(&key(1), entry(10, Duration::from_secs(60), &deps));
        assert_eq!(out, PutOutcome::Stored);
        // The first hit validates under the lock and remembers it; the second uses the memo.
        for _ in 0..2 {
            assert!(matches!(
                store.lookup_here(&key(1), &declared),
                Lookup::Fresh(_)
            ));
        }
        // Another dep's invalidation: the entry is checked again, and still valid.
        store.invalidate_now("t", "doc:2", "h").unwrap();
        assert!(matches!(
            store.lookup_here(&key(1), &declared),
            Lookup::Fresh(_)
        ));
        // The epoch moves while the entry is still held (its deletion not done yet, rule 3).
        store
            .deps
            .write()
            .tenants
            .get_mut("t")
            .and_then(|t| t.get_mut("doc:1"))
            .expect("tagged")
            .epoch += 1;
        assert!(matches!(
            store.lookup_here(&key(1), &declared),
            Lookup::Miss(_)
        ));
    }

    #[test]
    fn the_store_is_bounded_by_bytes_and_eviction_cleans_the_dep_index() {
        let store = MemoryStore::builder().max_bytes(64 * 1024).build();
        let deps = [("doc:1", 0), (POLICY_DEP, 0)];
        for i in 0..200 {
            let out = store.put_now(&key(i), entry(1024, Duration::from_secs(60), &deps));
            assert_eq!(out, PutOutcome::Stored);
        }
        let held = store.entry_count();
        assert!(
            held < 64,
            "bounded by bytes: {held} entries of ~1 KiB in 64 KiB"
        );
        store.entries.run_pending_tasks();
        assert_eq!(
            store.tagged_count("t", "doc:1") as u64,
            held,
            "evicted entries are untagged"
        );
    }

    #[test]
    fn expired_entries_are_misses_and_leave_the_dep_index() {
        let store = MemoryStore::new();
        let deps = [("doc:1", 0), (POLICY_DEP, 0)];
        store.put_now(&key(1), entry(10, Duration::from_millis(30), &deps));
        assert!(matches!(
            store.lookup_here(&key(1), &["doc:1", POLICY_DEP]),
            Lookup::Fresh(_)
        ));
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(
            store.lookup_here(&key(1), &["doc:1", POLICY_DEP]),
            Lookup::Miss(_)
        ));
        // moka reaps expired entries on its timer wheel (about one-second ticks).
        for _ in 0..40 {
            store.entries.run_pending_tasks();
            if store.tagged_count("t", "doc:1") == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the expired entry is still tagged");
    }

    #[test]
    fn a_single_huge_entry_is_refused_rather_than_flushing_the_store() {
        let store = MemoryStore::builder().max_bytes(8 * 1024).build();
        let out = store.put_now(&key(1), entry(4096, Duration::from_secs(60), &[]));
        assert_eq!(out, PutOutcome::Refused(RefusedReason::TooLarge));
    }

    #[test]
    fn a_put_racing_an_invalidation_never_deadlocks() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let store = MemoryStore::new();
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for t in 0..2u32 {
            let (store, stop, progress) = (store.clone(), stop.clone(), progress.clone());
            threads.push(std::thread::spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let k = key(t << 24 | i);
                    i += 1;
                    let Lookup::Miss(epochs) = store.lookup_here(&k, &["doc", POLICY_DEP]) else {
                        continue;
                    };
                    let mut e = entry(16, Duration::from_secs(60), &[]);
                    e.deps = epochs;
                    store.put_now(&k, e);
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        {
            let (store, stop) = (store.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    store.invalidate_now("t", "doc", "h").unwrap();
                }
            }));
        }
        // Watchdog: puts must keep making progress in every window. A deadlock stops them for
        // good; the threads are then left behind (the process exits with the test binary).
        let mut last = 0;
        for window in 0..20 {
            std::thread::sleep(Duration::from_millis(150));
            let now = progress.load(Ordering::Relaxed);
            if now == last {
                stop.store(true, Ordering::Relaxed);
                panic!("puts made no progress in window {window} (after {now} puts): deadlock");
            }
            last = now;
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_dep_raised_again_and_again_holds_one_place_in_the_forget_queue() {
        // Retention 500 ms.
        let store = MemoryStore::builder()
            .put_deadline(Duration::from_millis(250))
            .build();
        for _ in 0..1_000 {
            assert!(store.invalidate_now("t", "doc:hot", "h").is_ok());
        }
        assert_eq!(
            store.dep_index_size(),
            2,
            "one state, one place in the queue"
        );
        // Raised again within the retention, it goes back in the queue when its first turn
        // comes, rather than out.
        std::thread::sleep(Duration::from_millis(350));
        store.invalidate_now("t", "doc:hot", "h").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        store.invalidate_now("t", "doc:other", "h").unwrap();
        assert_eq!(store.dep_epoch("t", "doc:hot"), 1_001);
        std::thread::sleep(Duration::from_millis(500));
        store.invalidate_now("t", "doc:other", "h").unwrap();
        assert_eq!(
            store.dep_epoch("t", "doc:hot"),
            0,
            "forgotten after the retention"
        );
    }

    #[test]
    fn an_epoch_an_entry_records_is_forgotten_only_when_its_last_entry_goes() {
        // Retention 200 ms.
        let store = MemoryStore::builder()
            .put_deadline(Duration::from_millis(100))
            .build();
        store.invalidate_now("t", "doc:1", "h").unwrap();
        let Lookup::Miss(observed) = store.lookup_here(&key(1), &["doc:1"]) else {
            panic!("expected a miss");
        };
        let mut e = entry(10, Duration::from_secs(60), &[]);
        e.deps = observed;
        assert_eq!(store.put_now(&key(1), e), PutOutcome::Stored);
        std::thread::sleep(Duration::from_millis(250));
        store.invalidate_now("t", "doc:other", "h").unwrap();
        assert_eq!(store.dep_epoch("t", "doc:1"), 1, "an entry records it");
        let Lookup::Fresh(hit) = store.lookup_here(&key(1), &["doc:1"]) else {
            panic!("expected a hit");
        };
        store.entries.invalidate(&key(1));
        store.entries.run_pending_tasks();
        assert_eq!(
            store.dep_epoch("t", "doc:1"),
            0,
            "forgotten with its last entry"
        );
        // Raised again: the same number, another life. A put that observed the old life (as
        // the hit just did; stamped now, so only the life can refuse it) never matches.
        store.invalidate_now("t", "doc:1", "h").unwrap();
        assert_eq!(store.dep_epoch("t", "doc:1"), 1);
        let mut stale = entry(10, Duration::from_secs(60), &[]);
        stale.deps = DepEpochs::observed(
            hit.deps
                .iter_lives()
                .map(|(id, epoch, life)| (id.to_owned(), epoch, life))
                .collect(),
            Instant::now(),
        );
        assert_eq!(
            store.put_now(&key(2), stale),
            PutOutcome::Refused(RefusedReason::DepChanged("doc:1".into()))
        );
    }

    #[test]
    fn raised_epochs_outlive_their_entries() {
        let store = MemoryStore::new();
        let r = store.invalidate_now("t", "doc:1", "v2");
        assert!(r.is_ok());
        store.clear();
        // A put that observed epoch 0 before the invalidation is still refused.
        let out = store.put_now(&key(1), entry(10, Duration::from_secs(60), &[("doc:1", 0)]));
        assert!(matches!(
            out,
            PutOutcome::Refused(RefusedReason::DepChanged(_))
        ));
    }
}
