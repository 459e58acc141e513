//! L2's index on the Redis Query Engine, for [`RedisStore`] (docs/design.md §5a).

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use super::guard::Lexicon;
use super::index::{Candidate, PartitionKey};
use crate::store::redis::RedisStore;
use crate::store::StoreError;

/// L2's vectors in Redis, beside the entries of a [`RedisStore`]: every process sharing the
/// Redis sees every vector, and a vector goes with its entry (same expiry, unlinked in the
/// same reclamation after an invalidation).
///
/// Needs the search module (Redis Stack, Redis 8, or RediSearch 2.10 or later loaded into
/// Redis): [`create`](Self::create) fails with
/// [`StoreErrorKind::Unsupported`](crate::StoreErrorKind::Unsupported) without it, and the
/// caller chooses between stopping and keeping the in-process [`MemoryIndex`](super::MemoryIndex)
/// (the gateway logs a warning and keeps it). L1 works either way.
///
/// ```no_run
/// use cachecore::semantic::{LocalEmbedder, RedisIndex, SemanticCache};
/// use cachecore::store::redis::RedisStore;
/// use cachecore::CachecoreLayer;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::builder().url("redis://127.0.0.1:6379/").build().await?;
/// let embedder = LocalEmbedder::load("models/bge-small-en-v1.5")?;
/// let index = RedisIndex::create(&store, embedder.dims()).await?;
/// let layer = CachecoreLayer::builder()
///     .store(store)
///     .semantic(SemanticCache::new(embedder).redis_index(index))
///     .build();
/// # let _ = layer;
/// # Ok(()) }
/// ```
///
/// Searches are `FT.SEARCH` KNN queries (HNSW, cosine) restricted to the tenant and the
/// context signature by two TAG fields; the neighbours' cosine distances are turned into
/// similarities and checked against the threshold here, since a KNN query always answers its
/// nearest neighbours however far they are. The question is kept in the hash for the lexical
/// guards. A search or a write that fails is logged and L2 misses: the request goes on to L1's
/// ordinary miss path.
#[derive(Clone)]
pub struct RedisIndex {
    store: RedisStore,
    dims: usize,
    /// The tenants whose index this process has made sure of (on a single Redis, one index
    /// serves all: the set holds at most one name).
    ensured: Arc<Mutex<HashSet<String>>>,
}

/// Past this many tenants the set of ensured indexes starts over (a create of an index that
/// exists is one cheap round trip).
const MAX_ENSURED: usize = 65_536;

impl fmt::Debug for RedisIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisIndex")
            .field("dims", &self.dims)
            .finish()
    }
}

impl RedisIndex {
    /// The index of `dims`-long vectors on `store`: created if missing on a single Redis
    /// (`cachecore:l2:v1:<dims>`); on a cluster, every primary is checked for the search module
    /// and each tenant's index (`cachecore:l2:v1:<dims>:{<tenant>}`) is created with its first
    /// vector. Fails with [`StoreErrorKind::Unsupported`](crate::StoreErrorKind::Unsupported)
    /// when Redis has no search module, and like any store call when Redis cannot be reached.
    pub async fn create(store: &RedisStore, dims: usize) -> Result<Self, StoreError> {
        store.l2_check(dims).await?;
        Ok(Self {
            store: store.clone(),
            dims,
            ensured: Arc::default(),
        })
    }

    /// The dimension of the vectors it holds.
    pub fn dims(&self) -> usize {
        self.dims
    }

    fn ensured(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.ensured.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Neighbours at a cosine of at least `min`, nearest first.
    pub(crate) async fn search(
        &self,
        key: &PartitionKey,
        query: &[f32],
        min: f32,
        k: usize,
    ) -> Vec<Candidate> {
        if query.len() != self.dims {
            return Vec::new();
        }
        let found = match self
            .store
            .l2_search(self.dims, &key.tenant, &key.signature, query, k)
            .await
        {
            Ok(Some(found)) => found,
            // No index (nothing stored yet for this tenant of a cluster, or a Redis restarted
            // empty): the next write creates it.
            Ok(None) => {
                let name = self.store.l2_index(self.dims, &key.tenant);
                self.ensured().remove(&name);
                return Vec::new();
            }
            Err(e) => {
                tracing::warn!(target: "cachecore", error = %e, "L2 search in Redis failed; L2 skipped for this request");
                return Vec::new();
            }
        };
        // KNN answers the nearest whatever their distance: the threshold is checked here.
        let mut near: Vec<_> = found.into_iter().filter(|n| n.similarity >= min).collect();
        if near.iter().any(|n| n.question.is_none()) {
            let digests: Vec<[u8; 32]> = near.iter().map(|n| n.digest).collect();
            match self.store.l2_questions(&key.tenant, &digests).await {
                Ok(questions) => {
                    for (n, q) in near.iter_mut().zip(questions) {
                        n.question = q;
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "cachecore", error = %e, "reading L2 questions from Redis failed; L2 skipped for this request");
                    return Vec::new();
                }
            }
        }
        near.into_iter()
            .filter_map(|n| {
                // A hash gone since the search: no question, no candidate.
                let question = n.question?;
                Some(Candidate {
                    digest: n.digest,
                    similarity: n.similarity,
                    lexicon: Arc::new(Lexicon::of(&question)),
                })
            })
            .collect()
    }

    /// Stores the vector of the entry `digest` beside it (if the entry is still there).
    pub(crate) async fn insert(
        &self,
        key: &PartitionKey,
        digest: &[u8; 32],
        vector: &[f32],
        question: &str,
    ) -> bool {
        if vector.len() != self.dims {
            return false;
        }
        let name = self.store.l2_index(self.dims, &key.tenant);
        if !self.ensured().contains(&name) {
            if let Err(e) = self.store.l2_ensure_index(self.dims, &key.tenant).await {
                tracing::warn!(target: "cachecore", error = %e, "creating the L2 index in Redis failed; the entry is served by L1 only");
                return false;
            }
            let mut ensured = self.ensured();
            if ensured.len() >= MAX_ENSURED {
                ensured.clear();
            }
            ensured.insert(name);
        }
        match self
            .store
            .l2_write(&key.tenant, digest, &key.signature, vector, question)
            .await
        {
            Ok(written) => written,
            Err(e) => {
                tracing::warn!(target: "cachecore", error = %e, "writing an L2 vector to Redis failed; the entry is served by L1 only");
                false
            }
        }
    }

    /// Drops the vector of the entry `digest` (found gone).
    pub(crate) async fn remove(&self, key: &PartitionKey, digest: &[u8; 32]) {
        if let Err(e) = self.store.l2_remove(&key.tenant, digest).await {
            tracing::debug!(target: "cachecore", error = %e, "dropping an L2 vector in Redis failed; it expires with its entry");
        }
    }
}
