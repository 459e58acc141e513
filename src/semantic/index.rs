//! The in-process vector index: a partition per context signature, exact scan.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::guard::Lexicon;

/// Where a vector lives: the tenant (invalidation is per tenant) and the context signature.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PartitionKey {
    pub(crate) tenant: Arc<str>,
    pub(crate) signature: [u8; 32],
}

/// One stored question: the L1 entry it names, when that entry expires, and its words (the
/// question's distinct words, lower-cased, and what the guards derived from them: the text
/// itself is not kept).
struct Row {
    digest: [u8; 32],
    expires_ms: u64,
    lexicon: Arc<Lexicon>,
    seq: u64,
    /// What it counts against the bound: its vector, its words and its bookkeeping.
    cost: usize,
}

struct Partition {
    dims: usize,
    /// The dep ids the signature declares (the policy dep is implied): invalidating any of
    /// them retires every entry of the partition, so the whole partition goes.
    deps: Arc<[String]>,
    vectors: Vec<f32>,
    rows: Vec<Row>,
    by_digest: HashMap<[u8; 32], usize>,
}

impl Partition {
    fn remove_at(&mut self, i: usize) {
        let last = self.rows.len() - 1;
        let removed = self.rows.swap_remove(i);
        self.by_digest.remove(&removed.digest);
        if i != last {
            let (head, tail) = self.vectors.split_at_mut(last * self.dims);
            head[i * self.dims..(i + 1) * self.dims].copy_from_slice(&tail[..self.dims]);
            self.by_digest.insert(self.rows[i].digest, i);
        }
        self.vectors.truncate(last * self.dims);
    }
}

/// A candidate answer: the digest of an L1 entry, and how near its question is.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    pub(crate) digest: [u8; 32],
    pub(crate) similarity: f32,
    pub(crate) lexicon: Arc<Lexicon>,
}

/// Room for a vector's bookkeeping besides its floats and its question's words (row, digest
/// map, eviction queue).
const ROW_OVERHEAD: usize = 160;

/// The in-process vector index of [`SemanticCache`](super::SemanticCache), for the
/// [`MemoryStore`](crate::MemoryStore) (and any store, as a per-process index).
///
/// Vectors are kept per context signature and searched by an exact scan (a dot product per
/// vector: the vectors are of unit length). Memory is bounded: past `max_bytes` the oldest
/// vectors go first. The bound counts each vector's floats, the words kept of its question
/// for the lexical guards (a long question costs more) and a fixed overhead. A vector is also dropped when the entry it names turns out to be gone,
/// when its expiry passes, and when a dep its partition declares is invalidated.
pub struct MemoryIndex {
    partitions: RwLock<HashMap<PartitionKey, Arc<RwLock<Partition>>>>,
    order: Mutex<Order>,
    max_bytes: usize,
}

#[derive(Default)]
struct Order {
    queue: VecDeque<(PartitionKey, [u8; 32], u64)>,
    next_seq: u64,
    bytes: usize,
    rows: usize,
}

impl fmt::Debug for MemoryIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = lock(&self.order);
        f.debug_struct("MemoryIndex")
            .field("vectors", &order.rows)
            .field("bytes", &order.bytes)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

/// 64 MiB: about 28,000 vectors of 384 dimensions (all-MiniLM-L6-v2, bge-small-en-v1.5) with
/// questions of ten words or so (their words count too: about 650 bytes beside 1,536 of floats).
pub const DEFAULT_INDEX_BYTES: usize = 64 * 1024 * 1024;

impl Default for MemoryIndex {
    fn default() -> Self {
        Self::new(DEFAULT_INDEX_BYTES)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

impl MemoryIndex {
    /// An index holding at most about `max_bytes` of vectors.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            partitions: RwLock::new(HashMap::new()),
            order: Mutex::new(Order::default()),
            max_bytes,
        }
    }

    /// How many vectors it holds.
    pub fn len(&self) -> usize {
        lock(&self.order).rows
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` nearest vectors of `key` with a similarity of at least `min`, nearest first.
    pub(crate) fn search(
        &self,
        key: &PartitionKey,
        query: &[f32],
        min: f32,
        k: usize,
        now_ms: u64,
    ) -> Vec<Candidate> {
        let Some(partition) = read(&self.partitions).get(key).cloned() else {
            return Vec::new();
        };
        let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
        let mut expired = Vec::new();
        let out = {
            let p = read(&partition);
            if p.dims != query.len() {
                return Vec::new();
            }
            for (i, v) in p.vectors.chunks_exact(p.dims).enumerate() {
                let s = dot(query, v);
                if s < min || (best.len() == k && s <= best[k - 1].0) {
                    continue;
                }
                if p.rows[i].expires_ms <= now_ms {
                    expired.push(p.rows[i].digest);
                    continue;
                }
                let at = best.partition_point(|(b, _)| *b >= s);
                best.insert(at, (s, i));
                best.truncate(k);
            }
            best.iter()
                .map(|&(similarity, i)| Candidate {
                    digest: p.rows[i].digest,
                    similarity,
                    lexicon: Arc::clone(&p.rows[i].lexicon),
                })
                .collect()
        };
        for digest in expired {
            self.remove(key, &digest);
        }
        out
    }

    /// Stores the vector of the entry `digest` until `expires_ms` (replacing any earlier one).
    pub(crate) fn insert(
        &self,
        key: PartitionKey,
        deps: Arc<[String]>,
        digest: [u8; 32],
        vector: &[f32],
        lexicon: Arc<Lexicon>,
        expires_ms: u64,
    ) {
        let dims = vector.len();
        let cost = dims * 4 + ROW_OVERHEAD + lexicon.heap_bytes();
        if cost > self.max_bytes {
            return;
        }
        let partition = {
            let mut map = write(&self.partitions);
            Arc::clone(map.entry(key.clone()).or_insert_with(|| {
                Arc::new(RwLock::new(Partition {
                    dims,
                    deps,
                    vectors: Vec::new(),
                    rows: Vec::new(),
                    by_digest: HashMap::new(),
                }))
            }))
        };
        let mut order = lock(&self.order);
        let seq = order.next_seq;
        order.next_seq += 1;
        {
            let mut p = write(&partition);
            if p.dims != dims {
                return;
            }
            if let Some(&i) = p.by_digest.get(&digest) {
                let old = p.rows[i].cost;
                p.remove_at(i);
                order.rows -= 1;
                order.bytes -= old;
            }
            p.vectors.extend_from_slice(vector);
            let at = p.rows.len();
            p.rows.push(Row {
                digest,
                expires_ms,
                lexicon,
                seq,
                cost,
            });
            p.by_digest.insert(digest, at);
        }
        order.rows += 1;
        order.bytes += cost;
        order.queue.push_back((key, digest, seq));
        // Oldest first; queue slots of vectors already gone are skipped.
        while order.bytes > self.max_bytes {
            let Some((key, digest, seq)) = order.queue.pop_front() else {
                break;
            };
            if let Some(cost) = self.remove_if(&key, &digest, Some(seq)) {
                order.rows -= 1;
                order.bytes -= cost;
            }
        }
        // Slots of vectors removed by other means pile up; drop them once they dominate.
        if order.queue.len() > 2 * order.rows + 1024 {
            let map = read(&self.partitions);
            order.queue.retain(|(key, digest, seq)| {
                map.get(key).is_some_and(|p| {
                    let p = read(p);
                    p.by_digest
                        .get(digest)
                        .is_some_and(|&i| p.rows[i].seq == *seq)
                })
            });
        }
    }

    /// Drops the vector of the entry `digest`, if any.
    pub(crate) fn remove(&self, key: &PartitionKey, digest: &[u8; 32]) {
        let mut order = lock(&self.order);
        if let Some(cost) = self.remove_if(key, digest, None) {
            order.rows -= 1;
            order.bytes -= cost;
        }
    }

    /// Removes a vector (only the one written with `seq`, when given); its byte cost.
    fn remove_if(&self, key: &PartitionKey, digest: &[u8; 32], seq: Option<u64>) -> Option<usize> {
        let mut map = write(&self.partitions);
        let partition = map.get(key)?;
        let mut p = write(partition);
        let i = *p.by_digest.get(digest)?;
        if seq.is_some_and(|s| p.rows[i].seq != s) {
            return None;
        }
        let cost = p.rows[i].cost;
        p.remove_at(i);
        let empty = p.rows.is_empty();
        drop(p);
        if empty {
            map.remove(key);
        }
        Some(cost)
    }

    /// Drops every partition of `tenant` that declares one of `dep_ids` (all of the tenant's
    /// for the policy dep): their entries can no longer be served.
    pub(crate) fn forget_deps(&self, tenant: &str, dep_ids: &[&str]) {
        let mut order = lock(&self.order);
        let mut map = write(&self.partitions);
        map.retain(|key, partition| {
            if &*key.tenant != tenant {
                return true;
            }
            let p = read(partition);
            let hit = dep_ids
                .iter()
                .any(|id| *id == crate::POLICY_DEP || p.deps.iter().any(|d| d == id));
            if hit {
                order.rows -= p.rows.len();
                order.bytes -= p.rows.iter().map(|r| r.cost).sum::<usize>();
            }
            !hit
        });
    }
}

/// Dot product, written so the compiler vectorises it: eight independent accumulators.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (a_chunks, a_rest) = a.split_at(a.len() / LANES * LANES);
    let (b_chunks, b_rest) = b.split_at(a_chunks.len().min(b.len()));
    for (x, y) in a_chunks
        .chunks_exact(LANES)
        .zip(b_chunks.chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, sig: u8) -> PartitionKey {
        PartitionKey {
            tenant: tenant.into(),
            signature: [sig; 32],
        }
    }

    fn unit(i: usize, dims: usize) -> Vec<f32> {
        let mut v = vec![0.0; dims];
        v[i] = 1.0;
        v
    }

    fn insert(ix: &MemoryIndex, k: &PartitionKey, d: u8, v: &[f32]) {
        ix.insert(
            k.clone(),
            vec!["doc".to_owned()].into(),
            [d; 32],
            v,
            Arc::default(),
            u64::MAX,
        );
    }

    #[test]
    fn finds_the_nearest_in_its_partition_only() {
        let ix = MemoryIndex::default();
        insert(&ix, &key("t", 1), 1, &unit(0, 16));
        insert(&ix, &key("t", 1), 2, &unit(1, 16));
        insert(&ix, &key("t", 2), 3, &unit(0, 16));
        let found = ix.search(&key("t", 1), &unit(0, 16), 0.5, 4, 0);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].digest, [1; 32]);
        assert!(ix.search(&key("u", 1), &unit(0, 16), 0.5, 4, 0).is_empty());
    }

    #[test]
    fn removal_by_digest_and_by_dep() {
        let ix = MemoryIndex::default();
        insert(&ix, &key("t", 1), 1, &unit(0, 16));
        insert(&ix, &key("t", 1), 2, &unit(0, 16));
        ix.remove(&key("t", 1), &[1; 32]);
        let found = ix.search(&key("t", 1), &unit(0, 16), 0.5, 4, 0);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].digest, [2; 32]);
        ix.forget_deps("t", &["doc"]);
        assert!(ix.is_empty());
    }

    #[test]
    fn bounded_oldest_first() {
        let cost = 16 * 4 + ROW_OVERHEAD + Lexicon::default().heap_bytes();
        let ix = MemoryIndex::new(3 * cost);
        for d in 0..5u8 {
            insert(&ix, &key("t", 1), d, &unit(0, 16));
        }
        assert_eq!(ix.len(), 3);
        let found = ix.search(&key("t", 1), &unit(0, 16), 0.5, 8, 0);
        let mut digests: Vec<u8> = found.iter().map(|c| c.digest[0]).collect();
        digests.sort_unstable();
        assert_eq!(digests, [2, 3, 4]);
    }

    #[test]
    fn the_bound_counts_the_words_kept_of_each_question() {
        let short = Arc::new(Lexicon::of("Where is my parcel?"));
        let long = Arc::new(Lexicon::of(
            &(0..2_000)
                .map(|i| format!("word{i}"))
                .collect::<Vec<_>>()
                .join(" "),
        ));
        assert!(long.heap_bytes() > 50 * short.heap_bytes());
        let row = |lexicon: &Arc<Lexicon>| 16 * 4 + ROW_OVERHEAD + lexicon.heap_bytes();
        let ix = MemoryIndex::new(4 * row(&short));
        let put = |d: u8, lexicon: &Arc<Lexicon>| {
            ix.insert(
                key("t", 1),
                Arc::from(Vec::new()),
                [d; 32],
                &unit(0, 16),
                Arc::clone(lexicon),
                u64::MAX,
            );
        };
        for d in 0..4 {
            put(d, &short);
        }
        assert_eq!(ix.len(), 4);
        assert_eq!(lock(&ix.order).bytes, 4 * row(&short));
        // A question whose words alone outweigh the bound is not kept; one that fits pushes
        // out as many of the oldest as its words weigh.
        put(9, &long);
        assert_eq!(ix.len(), 4);
        let medium = Arc::new(Lexicon::of(
            "Hello, could you tell me where my parcel is, the one I ordered last week?",
        ));
        assert!(row(&medium) > row(&short) && row(&medium) < 3 * row(&short));
        put(10, &medium);
        assert!(ix.len() < 4);
        assert!(lock(&ix.order).bytes <= 4 * row(&short));
        ix.forget_deps("t", &[crate::POLICY_DEP]);
        assert_eq!((ix.len(), lock(&ix.order).bytes), (0, 0));
    }

    #[test]
    fn expired_vectors_are_not_found() {
        let ix = MemoryIndex::default();
        ix.insert(
            key("t", 1),
            Arc::from(Vec::new()),
            [1; 32],
            &unit(0, 16),
            Arc::default(),
            10,
        );
        assert!(ix.search(&key("t", 1), &unit(0, 16), 0.5, 4, 11).is_empty());
        assert!(ix.is_empty());
    }
}
