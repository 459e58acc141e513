//! L2: answer a request that means the same as a cached one (docs/design.md §5a).
//!
//! On an L1 miss, a chat request is split into an exact **context signature** (everything but
//! the text of the final user message: model, sampling parameters, stop, `n`, seed, tools,
//! `tool_choice`, `response_format`, system prompt, earlier turns, the namespace, the declared
//! deps and the embedder) and the **question** (that text). The question is embedded once;
//! the nearest questions asked before *with the same signature* are candidates, and one whose
//! cosine reaches the threshold and that every [lexical guard](#guards) accepts names the L1
//! entry to answer with. That entry is then read through the ordinary L1 lookup, so expiry and
//! every dependency rule apply unchanged: an entry whose dep was invalidated is not served,
//! however near its question. The answer is the stored response, byte for byte, with
//! `X-Cache: HIT_L2` and `X-Cache-Similarity` (the cosine, rounded down to two decimals).
//!
//! ```no_run
//! use cachecore::semantic::{LocalEmbedder, SemanticCache};
//! use cachecore::CachecoreLayer;
//!
//! # fn main() -> Result<(), cachecore::semantic::EmbedError> {
//! let embedder = LocalEmbedder::load("models/bge-small-en-v1.5")?;
//! let layer = CachecoreLayer::builder()
//!     .semantic(SemanticCache::new(embedder).threshold(0.92))
//!     .build();
//! # Ok(()) }
//! ```
//!
//! # When L2 stays out of the way
//!
//! - bodies that are not OpenAI-style chat requests ending with a user message of text (the
//!   splitter in `request.rs` is the place to teach it another API);
//! - requests with tools (definitions, `tool_choice`, tool calls or results in the
//!   conversation), unless [`allow_tools`](SemanticCache::allow_tools) or
//!   [`RequestContext::semantic_tools`](crate::RequestContext::semantic_tools) says otherwise;
//! - requests that sample: a `temperature` other than 0, *or none at all* (OpenAI's default is
//!   1), unless [`allow_sampling`](SemanticCache::allow_sampling) or
//!   [`RequestContext::semantic_sampling`](crate::RequestContext::semantic_sampling) opts in;
//! - an embedding that fails or is slower than the [timeout](SemanticCache::timeout): the
//!   request is an ordinary miss (after repeated failures the embedder is skipped for a
//!   cool-down), and nothing is written to L2;
//! - an L1 hit: it never pays for an embedding.
//!
//! # Guards
//!
//! Cosine alone serves "Don't cancel my order" the answer to "Cancel my order". Every
//! candidate must also pass lexical guards: the same numbers, the same count of negations,
//! the same names, no flipped pair of opposites, and no reversed direction ("from A to B"
//! and "from B to A"). They cost recall on purpose; [`lexical_guards(false)`](SemanticCache::lexical_guards)
//! turns them off for measurements.
//!
//! # Threshold
//!
//! A cosine similarity in `[-1, 1]` (not a distance): higher is stricter. The default is 0.92.
//! A request may raise it ([`RequestContext::min_similarity`](crate::RequestContext::min_similarity),
//! or the `X-CacheCore-Min-Similarity` header in trusted-header mode), never lower it.
//!
//! # Where vectors live
//!
//! In a [`MemoryIndex`] beside the entries: the vector of an entry is written only once the
//! entry is stored, under the entry's digest and with its expiry, and goes when the entry is
//! found gone, when it expires, or when a dep of its signature is invalidated.

mod bert;
mod embed;
mod guard;
mod index;
mod openai;
#[cfg(feature = "redis")]
mod redis;
mod request;

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

pub use bert::LocalEmbedder;
pub use embed::{EmbedError, EmbedFuture, Embedder};
pub use index::{MemoryIndex, DEFAULT_INDEX_BYTES};
pub use openai::OpenAiEmbedder;
#[cfg(feature = "redis")]
pub use redis::RedisIndex;

use crate::context::SemanticRequest;
use crate::headers::X_CACHE_SIMILARITY;
use crate::key::{self, BodyKeying, KeyParts};
use crate::store::{duration_ms, now_ms, CacheKey, Entry};
use guard::Lexicon;
use index::PartitionKey;

/// The hosted product's threshold (docs/design.md §5a).
pub const DEFAULT_THRESHOLD: f32 = 0.92;

/// Long enough for a local model on a short question (a few milliseconds) or an embeddings
/// API on a good day; short next to the LLM call a miss goes on to make.
pub const DEFAULT_EMBED_TIMEOUT: Duration = Duration::from_millis(250);

/// Candidates taken from the index per request (nearest first); each one that passes the
/// guards costs one L1 lookup, at most [`MAX_LOOKUPS`].
const CANDIDATES: usize = 8;
/// L1 lookups per request for candidates that passed the guards.
const MAX_LOOKUPS: usize = 3;
/// Consecutive embedding failures after which the embedder is skipped for a cool-down.
const EMBED_FAILURES: u32 = 5;
/// How long a failing embedder is skipped.
const EMBED_COOLDOWN: Duration = Duration::from_secs(5);

/// The L2 configuration: an embedder, an index, a threshold and the gates. Hand it to
/// [`CachecoreBuilder::semantic`]; keep a clone to read its [`stats`](Self::stats).
#[derive(Clone)]
#[must_use]
pub struct SemanticCache {
    embedder: Arc<dyn Embedder>,
    index: Index,
    threshold: f32,
    timeout: Duration,
    allow_sampling: bool,
    allow_tools: bool,
    guards: bool,
    stats: Arc<Counters>,
}

impl fmt::Debug for SemanticCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemanticCache")
            .field("embedder", &self.embedder.id())
            .field("index", &self.index)
            .field("threshold", &self.threshold)
            .field("timeout", &self.timeout)
            .field("allow_sampling", &self.allow_sampling)
            .field("allow_tools", &self.allow_tools)
            .field("guards", &self.guards)
            .finish()
    }
}

/// Where the vectors live.
#[derive(Clone, Debug)]
enum Index {
    Memory(Arc<MemoryIndex>),
    #[cfg(feature = "redis")]
    Redis(Arc<RedisIndex>),
}

impl Index {
    async fn search(
        &self,
        key: &PartitionKey,
        query: &[f32],
        min: f32,
        k: usize,
    ) -> Vec<index::Candidate> {
        match self {
            Self::Memory(ix) => ix.search(key, query, min, k, now_ms()),
            #[cfg(feature = "redis")]
            Self::Redis(ix) => ix.search(key, query, min, k).await,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    embedded: AtomicU64,
    embed_failures: AtomicU64,
    vetoed: AtomicU64,
    stored: AtomicU64,
    consecutive_failures: AtomicU32,
    skip_until_ms: AtomicU64,
}

/// What L2 has done since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SemanticStats {
    /// Questions embedded.
    pub embedded: u64,
    /// Embeddings that failed, timed out, or were skipped while the embedder cooled down.
    pub embed_failures: u64,
    /// Candidates above the threshold that a lexical guard turned down.
    pub vetoed: u64,
    /// Vectors written beside stored entries.
    pub stored: u64,
}

impl SemanticCache {
    /// L2 with `embedder`, an in-process [`MemoryIndex`] and the defaults: threshold 0.92,
    /// guards on, 250 ms embedding timeout, no sampled or tool requests.
    pub fn new(embedder: impl Embedder) -> Self {
        Self {
            embedder: Arc::new(embedder),
            index: Index::Memory(Arc::new(MemoryIndex::default())),
            threshold: DEFAULT_THRESHOLD,
            timeout: DEFAULT_EMBED_TIMEOUT,
            allow_sampling: false,
            allow_tools: false,
            guards: true,
            stats: Arc::default(),
        }
    }

    /// The least cosine similarity (not distance) a match needs. Every value in `[-1, 1]` is
    /// taken as given, 0 included.
    ///
    /// # Panics
    ///
    /// When `threshold` is not a number in `[-1, 1]`: a similarity outside that range (a
    /// distance, a percentage) is a misreading of the scale, not a setting.
    pub fn threshold(mut self, threshold: f32) -> Self {
        assert!(
            (-1.0..=1.0).contains(&threshold),
            "the semantic threshold is a cosine similarity in [-1, 1], got {threshold}"
        );
        self.threshold = threshold;
        self
    }

    /// The longest an embedding may take before the request goes on as a miss (default
    /// 250 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Lets requests that sample (a non-zero or absent `temperature`) use L2.
    pub fn allow_sampling(mut self, on: bool) -> Self {
        self.allow_sampling = on;
        self
    }

    /// Lets requests with tools use L2.
    pub fn allow_tools(mut self, on: bool) -> Self {
        self.allow_tools = on;
        self
    }

    /// Whether candidates must pass the lexical guards (default on).
    pub fn lexical_guards(mut self, on: bool) -> Self {
        self.guards = on;
        self
    }

    /// The index to keep vectors in (default: a [`MemoryIndex`] of
    /// [`DEFAULT_INDEX_BYTES`]). Shared: several layers may use one index.
    pub fn index(mut self, index: Arc<MemoryIndex>) -> Self {
        self.index = Index::Memory(index);
        self
    }

    /// Keeps the vectors in Redis, beside the entries of the [`RedisStore`](crate::store::redis::RedisStore)
    /// the index was created on (use that store for the layer too): see [`RedisIndex`].
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis_index(mut self, index: RedisIndex) -> Self {
        self.index = Index::Redis(Arc::new(index));
        self
    }

    /// The counters.
    pub fn stats(&self) -> SemanticStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SemanticStats {
            embedded: g(&self.stats.embedded),
            embed_failures: g(&self.stats.embed_failures),
            vetoed: g(&self.stats.vetoed),
            stored: g(&self.stats.stored),
        }
    }

    /// The L2 step of a request that missed L1: its candidates (nearest first) and, when it
    /// was embedded, the right to store its vector beside the entry its response becomes.
    ///
    /// `parts` are the request's key parts without its body (the L1 key's namespace, head and
    /// deps), `keying` how bodies are keyed; `body` is the request body.
    pub(crate) async fn probe(
        &self,
        wants: SemanticRequest,
        parts: &KeyParts<'_>,
        keying: &BodyKeying,
        body: &[u8],
    ) -> Probe {
        let mut probe = Probe::default();
        if wants.skip {
            return probe;
        }
        let Ok(split) = request::split_chat(body) else {
            return probe;
        };
        if split.tools && !(self.allow_tools || wants.allow_tools) {
            return probe;
        }
        if !(split.deterministic || self.allow_sampling || wants.allow_sampling) {
            return probe;
        }
        let Some(vector) = self.embed(&split.question).await else {
            return probe;
        };
        let partition = PartitionKey {
            tenant: Arc::from(parts.tenant),
            signature: self.signature(parts, keying, &split.context),
        };
        let threshold = wants
            .min_similarity()
            .map_or(self.threshold, |t| t.max(self.threshold));
        let lexicon = Arc::new(Lexicon::of(&split.question));
        for c in self
            .index
            .search(&partition, &vector, threshold, CANDIDATES)
            .await
        {
            if probe.matches.len() == MAX_LOOKUPS {
                break;
            }
            if self.guards {
                if let Err(veto) = lexicon.agrees_with(&c.lexicon) {
                    self.stats.vetoed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(target: "cachecore", similarity = c.similarity, ?veto, "L2 candidate vetoed");
                    continue;
                }
            }
            probe.matches.push(Match {
                key: CacheKey::new(Arc::from(parts.tenant), c.digest),
                similarity: c.similarity,
            });
        }
        probe.write = Some(L2Write {
            index: self.index.clone(),
            question: split.question,
            stats: Arc::clone(&self.stats),
            deps: parts.deps.iter().map(|d| d.id().to_owned()).collect(),
            partition,
            vector,
            lexicon,
        });
        probe
    }

    /// Drops the vectors of partitions that declare one of `dep_ids` (just invalidated).
    ///
    /// In Redis, the store's reclamation of the invalidated entries unlinks their vectors.
    pub(crate) fn forget_deps(&self, tenant: &str, dep_ids: &[&str]) {
        match &self.index {
            Index::Memory(ix) => ix.forget_deps(tenant, dep_ids),
            #[cfg(feature = "redis")]
            Index::Redis(_) => {}
        }
    }

    /// The question's vector, once, off the async threads and within the timeout; `None`
    /// (a miss) on any failure.
    async fn embed(&self, question: &str) -> Option<Vec<f32>> {
        let fail = |why: &dyn fmt::Display| {
            self.stats.embed_failures.fetch_add(1, Ordering::Relaxed);
            let n = self
                .stats
                .consecutive_failures
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if n >= EMBED_FAILURES {
                self.stats
                    .skip_until_ms
                    .store(now_ms() + duration_ms(EMBED_COOLDOWN), Ordering::Relaxed);
            }
            tracing::warn!(target: "cachecore", error = %why, "embedding failed; L2 skipped for this request");
            None
        };
        let until = self.stats.skip_until_ms.load(Ordering::Relaxed);
        if until != 0 && now_ms() < until {
            self.stats.embed_failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // Without a Tokio runtime there is no timer to bound the call: no L2.
        tokio::runtime::Handle::try_current().ok()?;
        let texts = [question.to_owned()];
        let vector = match tokio::time::timeout(self.timeout, self.embedder.embed(&texts)).await {
            Err(_) => return fail(&format_args!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) => return fail(&e),
            Ok(Ok(mut v)) if v.len() == 1 && !v[0].is_empty() => v.swap_remove(0),
            Ok(Ok(_)) => return fail(&"the embedder returned no vector"),
        };
        self.stats.consecutive_failures.store(0, Ordering::Relaxed);
        self.stats.skip_until_ms.store(0, Ordering::Relaxed);
        self.stats.embedded.fetch_add(1, Ordering::Relaxed);
        Some(vector)
    }

    /// The exact context signature: everything the L1 key covers (namespace, method, URI,
    /// vary headers, deps), the body without its question, and the embedder.
    fn signature(&self, parts: &KeyParts<'_>, keying: &BodyKeying, context: &[u8]) -> [u8; 32] {
        let mut encoded = Vec::with_capacity(key::HEAD_CAPACITY);
        encoded.extend_from_slice(b"cachecore-l2-signature-v1");
        let id = self.embedder.id().as_bytes();
        encoded.extend_from_slice(&(id.len() as u64).to_be_bytes());
        encoded.extend_from_slice(id);
        key::encode_head(parts, &mut encoded);
        key::digest(&encoded, context, keying)
    }
}

/// The outcome of the L2 step.
#[derive(Default)]
pub(crate) struct Probe {
    matches: Vec<Match>,
    write: Option<L2Write>,
}

/// An L1 entry that may answer the request.
pub(crate) struct Match {
    pub(crate) key: CacheKey,
    similarity: f32,
}

impl Match {
    /// The entry as an L2 answer: its similarity in `X-Cache-Similarity`, rounded down so the
    /// header never claims more than was measured.
    pub(crate) fn answer(&self, mut entry: Entry) -> Entry {
        let hundredths = (self.similarity.clamp(-1.0, 1.0) * 100.0).floor() / 100.0;
        if let Ok(v) = HeaderValue::from_str(&format!("{hundredths:.2}")) {
            entry.headers.insert(X_CACHE_SIMILARITY, v);
        }
        entry
    }
}

impl Probe {
    /// The candidates that passed the guards, nearest first.
    pub(crate) fn matches(&self) -> &[Match] {
        &self.matches
    }

    /// `m` named an entry that is gone (expired, evicted or invalidated): forget its vector.
    pub(crate) fn gone(&self, m: &Match) {
        let Some(w) = &self.write else {
            return;
        };
        match &w.index {
            Index::Memory(ix) => ix.remove(&w.partition, m.key.digest()),
            // Off the request's path: the vector expires with its entry anyway.
            #[cfg(feature = "redis")]
            Index::Redis(ix) => {
                let (ix, partition, digest) =
                    (Arc::clone(ix), w.partition.clone(), *m.key.digest());
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move { ix.remove(&partition, &digest).await });
                }
            }
        }
    }

    /// The right to store this request's vector beside its entry.
    pub(crate) fn into_write(self) -> Option<L2Write> {
        self.write
    }
}

/// A request's vector, waiting for its response to be stored.
pub(crate) struct L2Write {
    index: Index,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    question: String,
    stats: Arc<Counters>,
    partition: PartitionKey,
    deps: Arc<[String]>,
    vector: Vec<f32>,
    lexicon: Arc<Lexicon>,
}

impl L2Write {
    /// The entry under `key` was stored, to live `lifetime`: its vector goes beside it.
    pub(crate) async fn stored(self, key: &CacheKey, lifetime: Duration) {
        let stored = match &self.index {
            Index::Memory(ix) => {
                let expires = now_ms().saturating_add(duration_ms(lifetime));
                ix.insert(
                    self.partition,
                    self.deps,
                    *key.digest(),
                    &self.vector,
                    self.lexicon,
                    expires,
                );
                true
            }
            // The store gives the vector its entry's remaining lifetime itself.
            #[cfg(feature = "redis")]
            Index::Redis(ix) => {
                ix.insert(&self.partition, key.digest(), &self.vector, &self.question)
                    .await
            }
        };
        if stored {
            self.stats.stored.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Which lexical guard turned a candidate down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuardVeto {
    /// The questions name different numbers (digits, number words or ordinals).
    Numbers,
    /// One negates where the other does not.
    Negation,
    /// They name different things (names, acronyms, days, months).
    Entities,
    /// One moves one way where the other moves the other (open/closed, safe/unsafe, ...).
    Opposites,
    /// One goes from where the other goes to ("from savings to current" and back).
    Direction,
    /// One narrows the other with a qualifying phrase ("flu" / "flu in babies").
    Qualifier,
}

impl From<guard::Veto> for GuardVeto {
    fn from(v: guard::Veto) -> Self {
        match v {
            guard::Veto::Numbers => Self::Numbers,
            guard::Veto::Negation => Self::Negation,
            guard::Veto::Entities => Self::Entities,
            guard::Veto::Opposites => Self::Opposites,
            guard::Veto::Direction => Self::Direction,
            guard::Veto::Qualifier => Self::Qualifier,
        }
    }
}

impl fmt::Display for GuardVeto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Numbers => "numbers differ",
            Self::Negation => "negation differs",
            Self::Entities => "names differ",
            Self::Opposites => "opposites",
            Self::Direction => "direction reversed",
            Self::Qualifier => "qualifier added",
        })
    }
}

/// The guard that would stop `cached`'s answer from answering `question`, if any: what L2
/// checks after the cosine. For tuning and for tests; the layer calls it itself.
///
/// ```
/// use cachecore::semantic::{lexical_veto, GuardVeto};
/// assert_eq!(lexical_veto("Track order 48213", "Track order 48231"), Some(GuardVeto::Numbers));
/// assert_eq!(lexical_veto("Where is my parcel?", "Where's my parcel?"), None);
/// ```
pub fn lexical_veto(question: &str, cached: &str) -> Option<GuardVeto> {
    Lexicon::of(question)
        .agrees_with(&Lexicon::of(cached))
        .err()
        .map(GuardVeto::from)
}

/// Internals the benchmark measures; not part of the API.
#[doc(hidden)]
pub mod __bench {
    use super::*;

    /// Every guard that objects to answering `question` with `cached`'s answer, not only the
    /// first ([`lexical_veto`]): a pair that one guard alone turns down is what that guard adds.
    pub fn lexical_vetoes(question: &str, cached: &str) -> Vec<GuardVeto> {
        Lexicon::of(question)
            .objections(&Lexicon::of(cached))
            .map(GuardVeto::from)
            .collect()
    }

    /// Fills one partition of `index` with `vectors` (the digests are their positions).
    pub fn fill(index: &MemoryIndex, vectors: &[Vec<f32>]) {
        for (i, v) in vectors.iter().enumerate() {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&(i as u64).to_be_bytes());
            index.insert(
                partition(),
                Arc::from(Vec::new()),
                digest,
                v,
                Arc::default(),
                u64::MAX,
            );
        }
    }

    /// Searches the partition [`fill`] filled; how many candidates were found.
    pub fn search(index: &MemoryIndex, query: &[f32], min: f32) -> usize {
        index.search(&partition(), query, min, CANDIDATES, 0).len()
    }

    fn partition() -> PartitionKey {
        PartitionKey {
            tenant: Arc::from("bench"),
            signature: [0; 32],
        }
    }

    /// [`search`] for a [`RedisIndex`], on the partition of tenant `bench` and the all-zero
    /// signature (the benchmark writes its hashes itself: see `benches/semantic.rs`).
    #[cfg(feature = "redis")]
    pub async fn redis_search(index: &RedisIndex, query: &[f32], min: f32) -> usize {
        index
            .search(&partition(), query, min, CANDIDATES)
            .await
            .len()
    }
}
