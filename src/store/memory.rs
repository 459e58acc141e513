//! The default, in-process store on `moka`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::sync::Cache;

use super::{
    now_ms, CacheKey, CacheStore, DepEpochs, Entry, Freshness, InvalidationResult, Lookup,
    PutOutcome, RefusedReason, StoreFuture,
};
use crate::dep::validate_dep_id;

/// Default capacity: 256 MiB of entries (bodies, headers and bookkeeping).
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// An in-memory [`CacheStore`], bounded by bytes, with per-entry TTL and a dep index that is
/// cleaned when entries are evicted.
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
    entries: Cache<CacheKey, Arc<Entry>>,
    deps: Arc<DepIndex>,
    max_entry_bytes: usize,
}

/// Builds a [`MemoryStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
}

impl MemoryStoreBuilder {
    /// Total bytes the entries may occupy before the least useful are evicted.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        let deps = Arc::new(DepIndex::default());
        let listener_deps = Arc::clone(&deps);
        let entries = Cache::builder()
            .max_capacity(self.max_bytes)
            .weigher(|_k: &CacheKey, e: &Arc<Entry>| u32::try_from(e.weight()).unwrap_or(u32::MAX))
            .expire_after(EntryExpiry)
            .eviction_listener(move |key: Arc<CacheKey>, entry: Arc<Entry>, cause| {
                // A replacement under the same key carries the same dep ids (deps are part of
                // the key), and its tags are already in place.
                if cause != RemovalCause::Replaced {
                    listener_deps.untag(&key, &entry);
                }
            })
            .build();
        MemoryStore {
            entries,
            deps,
            // One entry may not take more than an eighth of the store, so a single huge
            // response cannot flush everything else.
            max_entry_bytes: usize::try_from(self.max_bytes / 8).unwrap_or(usize::MAX),
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
        }
    }

    /// The number of entries held now (after pending evictions have run).
    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// The entries held now, with their keys.
    pub fn entries(&self) -> Vec<(CacheKey, Entry)> {
        self.entries.run_pending_tasks();
        self.entries
            .iter()
            .map(|(k, e)| ((*k).clone(), (*e).clone()))
            .collect()
    }

    /// The dep ids recorded on the entry under `key`, the policy dep included.
    pub fn deps_of(&self, key: &CacheKey) -> Option<Vec<String>> {
        self.entries
            .get(key)
            .map(|e| e.deps.iter().map(|(id, _)| id.to_owned()).collect())
    }

    /// The current epoch of `dep_id` in `tenant` (0 until it is first invalidated).
    pub fn dep_epoch(&self, tenant: &str, dep_id: &str) -> u64 {
        self.deps.read().epoch(tenant, dep_id)
    }

    /// The last `new_hash` given for `dep_id` in `tenant`.
    pub fn dep_hash(&self, tenant: &str, dep_id: &str) -> Option<String> {
        let index = self.deps.read();
        index
            .tenants
            .get(tenant)
            .and_then(|t| t.get(dep_id))
            .and_then(|d| d.last_hash.clone())
    }

    /// How many keys are tagged under `dep_id` in `tenant`.
    pub fn tagged_count(&self, tenant: &str, dep_id: &str) -> usize {
        let index = self.deps.read();
        index
            .tenants
            .get(tenant)
            .and_then(|t| t.get(dep_id))
            .map_or(0, |d| d.keys.len())
    }

    /// Removes every entry (dep epochs are kept: forgetting them could admit a stale write).
    pub fn clear(&self) {
        self.entries.invalidate_all();
        self.entries.run_pending_tasks();
    }

    fn lookup_now(&self, key: &CacheKey, deps: &[&str]) -> Lookup {
        if let Some(entry) = self.entries.get(key) {
            let valid = {
                let index = self.deps.read();
                let tenant = index.tenants.get(key.tenant());
                entry
                    .deps
                    .iter()
                    .all(|(id, epoch)| epoch_in(tenant, id) == epoch)
            };
            if valid {
                match entry.freshness(now_ms()) {
                    Freshness::Fresh => return Lookup::Fresh((*entry).clone()),
                    Freshness::Stale => return Lookup::Stale((*entry).clone()),
                    Freshness::Expired => {}
                }
            } else {
                // Rule 3: a dep moved. The entry is dead; reclaim it now.
                self.entries.invalidate(key);
            }
        }
        let index = self.deps.read();
        let tenant = index.tenants.get(key.tenant());
        Lookup::Miss(DepEpochs::new(
            deps.iter()
                .map(|id| ((*id).to_owned(), epoch_in(tenant, id)))
                .collect(),
        ))
    }

    fn put_now(&self, key: &CacheKey, entry: Entry) -> PutOutcome {
        if entry.weight() > self.max_entry_bytes {
            return PutOutcome::Refused(RefusedReason::TooLarge);
        }
        {
            let mut index = self.deps.write();
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
        self.entries.insert(key.clone(), Arc::new(entry));
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
        PutOutcome::Stored
    }

    fn invalidate_now(&self, tenant: &str, dep_id: &str, new_hash: &str) -> InvalidationResult {
        if let Err(e) = validate_dep_id(dep_id) {
            return InvalidationResult::failed(dep_id, e.to_string());
        }
        let keys = {
            let mut index = self.deps.write();
            let state = index
                .tenants
                .entry(Arc::from(tenant))
                .or_default()
                .entry(dep_id.to_owned())
                .or_default();
            state.epoch += 1;
            state.last_hash = Some(new_hash.to_owned());
            std::mem::take(&mut state.keys)
        };
        let tenant: Arc<str> = Arc::from(tenant);
        let deleted = keys
            .into_iter()
            .filter(|digest| {
                self.entries
                    .remove(&CacheKey::new(tenant.clone(), *digest))
                    .is_some()
            })
            .count();
        InvalidationResult::ok(dep_id, deleted as u64)
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
        let out = self.lookup_now(key, deps);
        Box::pin(std::future::ready(Ok(out)))
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
    ) -> StoreFuture<'a, InvalidationResult> {
        let out = self.invalidate_now(tenant, dep_id, new_hash);
        Box::pin(std::future::ready(Ok(out)))
    }
}

/// Epochs, last hashes and the keys tagged under each dep, per tenant.
#[derive(Default)]
struct DepIndex {
    inner: RwLock<Tenants>,
}

#[derive(Default)]
struct Tenants {
    tenants: HashMap<Arc<str>, HashMap<String, DepState>>,
}

#[derive(Default)]
struct DepState {
    epoch: u64,
    last_hash: Option<String>,
    keys: HashSet<[u8; 32]>,
}

impl DepIndex {
    // A poisoned lock only means another thread panicked mid-update of plain maps; the data is
    // still usable and failing every request would be worse.
    fn read(&self) -> RwLockReadGuard<'_, Tenants> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tenants> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn untag(&self, key: &CacheKey, entry: &Entry) {
        let mut index = self.write();
        let Some(tenant) = index.tenants.get_mut(key.tenant()) else {
            return;
        };
        for (id, _) in entry.deps.iter() {
            if let Some(state) = tenant.get_mut(id) {
                state.keys.remove(key.digest());
                // Epoch 0 and no keys is the same as no state at all. A raised epoch must be
                // kept forever: forgetting it would let an in-flight put from before the
                // invalidation through.
                if state.keys.is_empty() && state.epoch == 0 {
                    tenant.remove(id);
                }
            }
        }
    }
}

impl Tenants {
    fn epoch(&self, tenant: &str, dep_id: &str) -> u64 {
        epoch_in(self.tenants.get(tenant), dep_id)
    }

    fn first_moved(&self, tenant: &str, observed: &DepEpochs) -> Option<String> {
        observed
            .iter()
            .find(|(id, epoch)| self.epoch(tenant, id) != *epoch)
            .map(|(id, _)| id.to_owned())
    }
}

/// The epoch of `dep_id` in one tenant's deps (found once per lookup, not once per dep).
fn epoch_in(tenant: Option<&HashMap<String, DepState>>, dep_id: &str) -> u64 {
    tenant.and_then(|t| t.get(dep_id)).map_or(0, |d| d.epoch)
}

struct EntryExpiry;

impl moka::Expiry<CacheKey, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let age = Duration::from_millis(entry.age_ms(now_ms()));
        Some(entry.lifetime().saturating_sub(age))
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        entry: &Arc<Entry>,
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
            store.lookup_now(&key(1), &["doc:1", POLICY_DEP]),
            Lookup::Fresh(_)
        ));
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(
            store.lookup_now(&key(1), &["doc:1", POLICY_DEP]),
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
                    let Lookup::Miss(epochs) = store.lookup_now(&k, &["doc", POLICY_DEP]) else {
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
                    store.invalidate_now("t", "doc", "h");
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
    fn raised_epochs_outlive_their_entries() {
        let store = MemoryStore::new();
        let r = store.invalidate_now("t", "doc:1", "v2");
        assert!(r.ok);
        store.clear();
        // A put that observed epoch 0 before the invalidation is still refused.
        let out = store.put_now(&key(1), entry(10, Duration::from_secs(60), &[("doc:1", 0)]));
        assert!(matches!(
            out,
            PutOutcome::Refused(RefusedReason::DepChanged(_))
        ));
    }
}
