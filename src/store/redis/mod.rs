//! The production store on Redis or Redis Cluster (feature `redis`).
//!
//! ```no_run
//! use std::time::Duration;
//! use cachecore::store::redis::RedisStore;
//!
//! # async fn run() -> Result<(), cachecore::StoreError> {
//! // A single Redis (or a proxy in front of one).
//! let store = RedisStore::builder()
//!     .url("redis://127.0.0.1:6379/")
//!     .timeout(Duration::from_millis(250))
//!     .build()
//!     .await?;
//!
//! // Redis Cluster: any of its nodes as seeds; the same code and the same behaviour.
//! let clustered = RedisStore::builder()
//!     .cluster(["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/"])
//!     .build()
//!     .await?;
//! # let _ = (store, clustered);
//! # Ok(()) }
//! ```
//!
//! # How it keeps docs/design.md §4
//!
//! - **One round trip per lookup.** One `MGET` reads the entry and the current epoch of every
//!   declared dep (the policy dep included); a single command is atomic, so this is one
//!   consistent snapshot. The entry records the epoch of each of its deps; it is served only when
//!   all of them are current. On a miss the same reply gives the epochs the following put must
//!   present. On a single Redis over plain TCP the `MGET` goes over the lookups' own
//!   multiplexed connection (docs/design.md §7, "Lookup connection"), read without the `redis`
//!   crate's multiplexer.
//! - **One round trip per put.** One script checks the observed epochs and, only if none moved,
//!   writes the entry with `PX` = fresh TTL + stale window, adds its digest to each dep's tag set
//!   (a sorted set scored by the entry's expiry, from which each put also drops a few expired
//!   members) and extends that set's expiry so it never expires before an entry it names.
//!   Otherwise the put is refused with the dep that moved.
//! - **Invalidation is one atomic round trip**: a script raises the epoch, stores the new hash
//!   and detaches (renames) the tag set. From that moment no reader is served an entry of the old
//!   epoch and no put that observed it is accepted. Reclaiming the detached entries follows in
//!   batches of at most [`DEFAULT_RECLAIM_BATCH`] keys (`ZPOPMIN` then `UNLINK`), so a dep tagged on
//!   100,000 entries never blocks Redis.
//! - **Epochs are forgotten, safely** (rule 8). A put more than the
//!   [put deadline](RedisStoreBuilder::put_deadline) after its lookup is refused without a round
//!   trip. A ver key expires only once no entry records the dep and the deadline (plus a transit
//!   margin) has passed since its last raise: a raise sets its expiry to cover both, a put
//!   extends it to cover its entry. A key raised again after it expired has a new *life*, so a
//!   put that observed the old key never matches the new one.
//! - **Acknowledged invalidation** (rule 9, opt-in): with
//!   [`ack_replicas`](RedisStoreBuilder::ack_replicas) the raise is followed by `WAIT` on the
//!   same connection, and [`DepInvalidated::acknowledged`] says whether enough replicas
//!   confirmed it.
//!
//! # Near cache
//!
//! With [`near_cache`](RedisStoreBuilder::near_cache) (single Redis only), hot entries and dep
//! versions are also kept in process and a hit on them makes no round trip. They stay coherent
//! through Redis's client tracking: an invalidation made through this store drops them before
//! it returns, one made elsewhere when Redis's push arrives, and a lost tracking connection
//! drops them all (docs/design.md §7).
//!
//! # Keys
//!
//! ```text
//! cc:{<tenant>}:l1:<key hex>        an entry
//! cc:{<tenant>}:dep:ver:<dep id>    string `<epoch>.<life>:<last new_hash>`, expiring as above
//! cc:{<tenant>}:dep:keys:<dep id>   sorted set: digests of the entries tagged with the dep,
//!                                   scored by their expiry (ms)
//! cc:{<tenant>}:gc:<nonce>          a tag set detached by an invalidation, being reclaimed
//! ```
//!
//! The braces are the Redis Cluster hash tag, so all keys of a tenant share a slot and every
//! script touches one slot. A tenant made only of `[A-Za-z0-9._:-]`, 1 to 64 bytes long and not
//! starting with `h-`, appears verbatim; any other tenant (braces, spaces, other bytes, longer,
//! empty, or starting with `h-`) appears as `h-` followed by the hex of the first 16 bytes of
//! its SHA-256.
//!
//! # Entries
//!
//! Values are a compact, length-prefixed binary encoding that starts with a magic and a format
//! version. A value that does not decode (written by something else, or by another format
//! version) is a miss, logged with `tracing::warn!`, and is overwritten by the next put.
//!
//! # Requirements
//!
//! Redis 6.2 or later (or a compatible server): the put script uses `ZRANGE .. BYSCORE LIMIT`
//! and `ZADD GT`. Single Redis and Redis Cluster alike.
//!
//! # Failures
//!
//! Every call is bounded by [`RedisStoreBuilder::timeout`] (default [`DEFAULT_TIMEOUT`]) and
//! fails with a [`StoreError`] of kind [`Timeout`](StoreErrorKind::Timeout) or
//! [`Backend`](StoreErrorKind::Backend); the layer then fails open. Connections are re-established
//! on their own after Redis restarts or a cluster node moves. On Redis Cluster each hash slot is
//! a failure domain of its own ([`CacheStore::failure_domain`]): the layer's circuit breaker
//! skips only the slots of a master that fails, and tenants on the other masters keep their hits.
//!
//! # Durability
//!
//! An epoch lives as long as Redis keeps it (docs/design.md §4 rule 9). Losing everything (a
//! restart without persistence) takes the entries too, so nothing invalidated comes back; only
//! an upstream call that observed a dep before its first raise and completes after the restart
//! (within the put deadline) could still be stored. Rolling back (an RDB snapshot older than the
//! raise, `appendfsync everysec` losing its last second, a failover to a replica that had not
//! received the raise) can bring invalidated entries back. `appendfsync always` keeps an
//! acknowledged raise across a crash of the server; [`ack_replicas`](RedisStoreBuilder::ack_replicas)
//! tells the caller whether the raise reached the replicas a failover would promote.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{RedisError, Value};

use super::{
    duration_ms, epoch_retention, now_ms, CacheKey, CacheStore, DepEpochs, DepInvalidated, Entry,
    Freshness, InvalidateManyFuture, Lookup, PutOutcome, RefusedReason, StoreError, StoreErrorKind,
    StoreFuture, DEFAULT_PUT_DEADLINE,
};
use crate::dep::validate_dep_id;

mod codec;
mod conn;
mod keys;
mod lean;
mod near;
mod scripts;
#[cfg(feature = "semantic")]
mod vector;

pub(crate) use conn::Conn;
use keys::TenantKeys;
use scripts::Scripts;

/// Default bound on every store call. Far below an LLM call (seconds), above a Redis round
/// trip on a loaded network (single-digit milliseconds).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// Default bound on establishing one connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Default number of entry keys reclaimed per `ZPOPMIN` + `UNLINK`: a few hundred keys keep each
/// command well under a millisecond on the Redis main thread.
pub const DEFAULT_RECLAIM_BATCH: usize = 256;

/// Default largest encoded entry accepted; larger puts are refused with
/// [`RefusedReason::TooLarge`].
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 8 * 1024 * 1024;

/// Most deps bumped by one invalidation script; `invalidate_many` splits longer lists.
const BUMP_CHUNK: usize = 128;

/// Acknowledged invalidation: `WAIT` for this many replicas, this long.
#[derive(Clone, Copy, Debug)]
struct Ack {
    replicas: usize,
    timeout: Duration,
}

/// A [`CacheStore`] on Redis or Redis Cluster. See the [module docs](self).
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    /// With [`Ack`]: the connection raises go through, followed by their `WAIT`. Its own, because
    /// `WAIT` holds the connection it runs on, and lookups must not queue behind it.
    ack: Option<(Conn, Ack)>,
    scripts: Arc<Scripts>,
    timeout: Duration,
    reclaim_batch: usize,
    max_entry_bytes: usize,
    put_deadline: Duration,
    retention_ms: u64,
    /// With [`RedisStoreBuilder::near_cache`]: hot entries and versions in process.
    near: Option<near::Near>,
    /// On a single Redis over plain TCP: the lookups' own connection (lean.rs).
    lean: Option<lean::Lean>,
}

/// Where a [`RedisStoreBuilder`] connects.
#[derive(Clone, Debug)]
enum Target {
    Unset,
    Single(String),
    Cluster(Vec<String>),
}

/// Builds a [`RedisStore`]: [`url`](Self::url) for a single Redis or
/// [`cluster`](Self::cluster) for Redis Cluster, then [`build`](Self::build).
#[derive(Clone, Debug)]
#[must_use]
pub struct RedisStoreBuilder {
    target: Target,
    timeout: Duration,
    connect_timeout: Duration,
    reclaim_batch: usize,
    max_entry_bytes: usize,
    put_deadline: Duration,
    ack: Option<Ack>,
    near_cache: Option<u64>,
}

impl RedisStoreBuilder {
    /// A single Redis, as a `redis://` (or `rediss://`, `redis+unix://`) URL.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.target = Target::Single(url.into());
        self
    }

    /// Redis Cluster, from one or more seed node URLs; the rest of the topology is discovered.
    pub fn cluster<I>(mut self, nodes: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.target = Target::Cluster(nodes.into_iter().map(Into::into).collect());
        self
    }

    /// Bound on every store call, reconnection included (default [`DEFAULT_TIMEOUT`]). A slower
    /// call fails with [`StoreErrorKind::Timeout`]. Each reclamation batch of an invalidation has
    /// the same bound.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bound on establishing one connection, at build time and when reconnecting (default
    /// [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Entry keys reclaimed per batch after an invalidation (default [`DEFAULT_RECLAIM_BATCH`];
    /// at least 1).
    pub fn reclaim_batch(mut self, keys: usize) -> Self {
        self.reclaim_batch = keys.max(1);
        self
    }

    /// Largest encoded entry accepted (default [`DEFAULT_MAX_ENTRY_BYTES`]).
    pub fn max_entry_bytes(mut self, bytes: usize) -> Self {
        self.max_entry_bytes = bytes;
        self
    }

    /// How long after its lookup a put is still accepted (default
    /// [`DEFAULT_PUT_DEADLINE`](crate::store::DEFAULT_PUT_DEADLINE)); later ones are refused
    /// with [`RefusedReason::DeadlinePassed`]. It must exceed the slowest upstream call worth
    /// caching. A ver key that no entry records expires this long (plus up to a minute for puts
    /// under way) after its last raise. Every process sharing the Redis must use the same
    /// deadline, or one no longer than the shortest retention.
    pub fn put_deadline(mut self, deadline: Duration) -> Self {
        self.put_deadline = deadline;
        self
    }

    /// Acknowledged invalidation (docs/design.md §4 rule 9): after each raise, `WAIT` until
    /// `replicas` replicas have it or `timeout` passes, and report in
    /// [`DepInvalidated::acknowledged`] whether they did. The raise and its `WAIT` use a
    /// connection of their own (`WAIT` holds the connection it runs on), so hits never queue
    /// behind it; acknowledged invalidations queue behind each other. Off by default.
    pub fn ack_replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.ack = Some(Ack { replicas, timeout });
        self
    }

    /// Keeps hot entries and dep versions in process, up to `max_bytes`, coherent with Redis
    /// through server-assisted client-side caching (docs/design.md §7, "Near cache"). Off by
    /// default.
    ///
    /// A hit on a near copy makes no round trip. An invalidation made through this store drops
    /// the local copies before it returns; one made by another process (or another store)
    /// drops them when Redis's invalidation push arrives on the store's tracking connection
    /// (a RESP3 connection with `CLIENT TRACKING ON`, named `cachecore-near`), which the
    /// README measures. When that connection is lost, or its heartbeat goes unanswered for
    /// a second, nothing is served from the near cache until a new one is up, and what was
    /// held before is dropped. Puts always go to Redis, checked by its conditional write.
    ///
    /// Single Redis only: [`build`](Self::build) refuses it on Redis Cluster with
    /// [`StoreErrorKind::InvalidInput`]. Needs Redis 6 or later (RESP3 and tracking).
    pub fn near_cache(mut self, max_bytes: u64) -> Self {
        self.near_cache = Some(max_bytes);
        self
    }

    /// Connects, loads the scripts, and returns the store. Fails when Redis cannot be reached
    /// within the connect timeout, so a misconfiguration shows at start-up; use
    /// [`build_lazy`](Self::build_lazy) to start while Redis is down.
    pub async fn build(self) -> Result<RedisStore, StoreError> {
        let near = self.near()?;
        let conn = self.connect(self.timeout).await?;
        let ack = match self.ack {
            Some(ack) => Some((self.connect(self.ack_response_timeout(ack)).await?, ack)),
            None => None,
        };
        let store = self.finish(conn, ack, near)?;
        for script in store.scripts.all() {
            store.timed(store.conn.load(script)).await?;
            if let Some((conn, _)) = &store.ack {
                store.timed(conn.load(script)).await?;
            }
        }
        if let Some(lean) = &store.lean {
            lean.start();
        }
        if let Some(near) = &store.near {
            near.connect().await?;
            near.supervise();
        }
        Ok(store)
    }

    /// Returns the store at once; connections are made on first use. Must be called inside a
    /// Tokio runtime. Fails only on an invalid URL.
    pub fn build_lazy(self) -> Result<RedisStore, StoreError> {
        let near = self.near()?;
        let conn = self.connect_lazy(self.timeout)?;
        let ack = match self.ack {
            Some(ack) => Some((self.connect_lazy(self.ack_response_timeout(ack))?, ack)),
            None => None,
        };
        if let Some(near) = &near {
            near.supervise();
        }
        self.finish(conn, ack, near)
    }

    /// The near cache, if one was asked for: refused on Redis Cluster, where tracking is per
    /// node and slots move between nodes (docs/design.md §7).
    fn near(&self) -> Result<Option<near::Near>, StoreError> {
        let Some(max_bytes) = self.near_cache else {
            return Ok(None);
        };
        match &self.target {
            Target::Unset => Err(no_target()),
            Target::Cluster(_) => Err(StoreError::new(
                StoreErrorKind::InvalidInput,
                "RedisStoreBuilder::near_cache is not supported on Redis Cluster (tracking is \
                 per node and slots move between nodes); build without it",
            )),
            Target::Single(url) => {
                near::Near::new(url, max_bytes, self.timeout, self.connect_timeout).map(Some)
            }
        }
    }

    async fn connect(&self, response_timeout: Duration) -> Result<Conn, StoreError> {
        let connect_timeout = self.connect_timeout;
        match &self.target {
            Target::Unset => Err(no_target()),
            Target::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(store_error)?;
                let config = self.manager_config();
                let manager = ConnectionManager::new_with_config(client, config);
                tokio::time::timeout(connect_timeout, manager)
                    .await
                    .map_err(|_| timeout_error("connecting"))?
                    .map(Conn::Single)
                    .map_err(store_error)
            }
            Target::Cluster(nodes) => {
                let client = self.cluster_client(nodes, response_timeout)?;
                tokio::time::timeout(connect_timeout, client.get_async_connection())
                    .await
                    .map_err(|_| timeout_error("connecting"))?
                    .map(Conn::Cluster)
                    .map_err(store_error)
            }
        }
    }

    fn connect_lazy(&self, response_timeout: Duration) -> Result<Conn, StoreError> {
        match &self.target {
            Target::Unset => Err(no_target()),
            Target::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(store_error)?;
                let config = self.manager_config();
                ConnectionManager::new_lazy_with_config(client, config)
                    .map(Conn::Single)
                    .map_err(store_error)
            }
            Target::Cluster(nodes) => {
                let client = self.cluster_client(nodes, response_timeout)?;
                Ok(Conn::Cluster(
                    client.get_pending_async_connection_with_config(
                        redis::cluster::ClusterConfig::new()
                            .set_connection_timeout(self.connect_timeout)
                            .set_response_timeout(response_timeout),
                    ),
                ))
            }
        }
    }

    /// The acknowledging connection waits for `WAIT` as well as for the call itself.
    fn ack_response_timeout(&self, ack: Ack) -> Duration {
        self.timeout.saturating_add(ack.timeout)
    }

    fn manager_config(&self) -> redis::aio::ConnectionManagerConfig {
        // No retry loop inside the manager: while Redis is down each call fails at once (or at
        // the timeout) instead of queueing behind a backoff, and the next call after Redis is
        // back reconnects. The engine's circuit breaker keeps the attempts rare.
        //
        // No response timeout inside it either: every call the store makes on a single Redis is
        // bounded by its own timer (`timed`, or `acknowledged` for `WAIT`), so the manager's would
        // be a second timer armed and cleared on every hit (about 700 instructions a hit, in
        // benches/hit_instructions.sh). A call given up by `timed` leaves its reply to be read
        // and dropped by the connection.
        redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None)
    }

    fn cluster_client(
        &self,
        nodes: &[String],
        response_timeout: Duration,
    ) -> Result<redis::cluster::ClusterClient, StoreError> {
        redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(self.connect_timeout)
            .response_timeout(response_timeout)
            // Retries (MOVED, a node restarting) must fit in one call's timeout.
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
            .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
            .build()
            .map_err(store_error)
    }

    fn finish(
        &self,
        conn: Conn,
        ack: Option<(Conn, Ack)>,
        near: Option<near::Near>,
    ) -> Result<RedisStore, StoreError> {
        let lean = match &self.target {
            Target::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(store_error)?;
                let mut others = vec![conn.clone()];
                others.extend(ack.as_ref().map(|(c, _)| c.clone()));
                lean::Lean::new(
                    client.get_connection_info(),
                    self.connect_timeout,
                    self.timeout,
                    others,
                )
            }
            Target::Cluster(_) | Target::Unset => None,
        };
        Ok(RedisStore {
            conn,
            ack,
            near,
            lean,
            scripts: Arc::new(Scripts::new()),
            timeout: self.timeout,
            reclaim_batch: self.reclaim_batch,
            max_entry_bytes: self.max_entry_bytes,
            put_deadline: self.put_deadline,
            retention_ms: duration_ms(epoch_retention(self.put_deadline)),
        })
    }
}

/// Cluster request retries: enough to follow a MOVED and ride out a failover blip within one
/// call's timeout.
const CLUSTER_RETRIES: u32 = 3;
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 10;
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 100;

impl RedisStore {
    /// A builder with the defaults; set [`url`](RedisStoreBuilder::url) or
    /// [`cluster`](RedisStoreBuilder::cluster).
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder {
            target: Target::Unset,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reclaim_batch: DEFAULT_RECLAIM_BATCH,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            put_deadline: DEFAULT_PUT_DEADLINE,
            ack: None,
            near_cache: None,
        }
    }

    /// Bytes the near cache holds now (entries, dep versions and their keys), or `None` without
    /// one ([`RedisStoreBuilder::near_cache`]). Never more than its bound, give or take the
    /// evictions still pending.
    pub fn near_cache_bytes(&self) -> Option<u64> {
        self.near.as_ref().map(near::Near::weighted_size)
    }

    /// Entries and dep versions the near cache holds now, or `None` without one.
    pub fn near_cache_len(&self) -> Option<u64> {
        self.near.as_ref().map(near::Near::slot_count)
    }

    /// Tests only: while `hold` is true, the near cache keeps Redis's invalidation pushes
    /// instead of applying them, as if they were slow to arrive; `false` applies them in order.
    #[doc(hidden)]
    pub fn near_cache_hold_pushes(&self, hold: bool) {
        if let Some(near) = &self.near {
            near.hold_pushes(hold);
        }
    }

    /// Tests only: blocks the near cache's reader thread for `pause` (a reader the machine has
    /// not scheduled yet); returns once it is blocked. Without a near cache, returns at once.
    #[doc(hidden)]
    pub async fn near_cache_stall_reader(&self, pause: Duration) {
        if let Some(near) = &self.near {
            near.stall_reader(pause).await;
        }
    }

    /// A store on the single Redis at `url`, with the defaults.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().url(url).build().await
    }

    /// A store on the Redis Cluster reached through `nodes`, with the defaults.
    pub async fn connect_cluster<I>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::builder().cluster(nodes).build().await
    }

    async fn timed<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(store_error),
            Err(_) => Err(timeout_error("waiting for Redis")),
        }
    }

    /// The near cache's answer to a lookup, found without I/O; otherwise what the lookup in
    /// Redis needs from it.
    fn near_lookup(near: &near::Near, key: &CacheKey, deps: &[&str]) -> Result<Lookup, NearNext> {
        let keys = TenantKeys::new(key.tenant());
        let entry_key = keys.entry(key);
        let mut name = Vec::with_capacity(entry_key.len());
        entry_key.write_into(&mut name);
        let held = near.hit(&name, deps, |id, out| keys.dep_ver(id).write_into(out));
        let unread = matches!(held, Err(near::NearMiss::Unread));
        if let Ok(mut entry) = held {
            // Served, the epochs count as observed now (a refresh put is checked by Redis
            // anyway).
            entry.deps.restamp(Instant::now());
            match entry.freshness(now_ms()) {
                Freshness::Fresh => return Ok(Lookup::Fresh(entry)),
                Freshness::Stale => return Ok(Lookup::Stale(entry)),
                Freshness::Expired => {}
            }
        }
        Err(NearNext { name, unread })
    }

    /// A lookup in Redis; `near` is what the near cache said, when there is one.
    async fn lookup_inner(
        &self,
        key: &CacheKey,
        deps: &[&str],
        near: Option<NearNext>,
    ) -> Result<Lookup, StoreError> {
        let keys = TenantKeys::new(key.tenant());
        let entry_key = keys.entry(key);
        // With unread bytes on the tracking socket, its next reply waits behind them: the
        // ordinary connection answers (and nothing is filled from it).
        if let (
            Some(cache),
            Some(NearNext {
                name,
                unread: false,
            }),
        ) = (&self.near, near)
        {
            if let Some(tracked) = cache.tracked() {
                return self.lookup_tracked(cache, tracked, &keys, name, deps).await;
            }
        }
        // One command reads the entry and every dep's current epoch. A single command is atomic,
        // so this is the same snapshot a script would see, at a fraction of the cost of running
        // one (measured in benches/redis.rs). MGET answers nil for a key of another type.
        let items = match &self.lean {
            // On the lookups' own connection (lean.rs), written straight into its queue.
            Some(lean) => {
                let mget = |out: &mut Vec<u8>| {
                    lean::write_array(out, 2 + deps.len());
                    lean::write_arg(out, 4, |out| out.extend_from_slice(b"MGET"));
                    lean::write_arg(out, entry_key.len(), |out| entry_key.write_into(out));
                    for dep in deps {
                        let ver = keys.dep_ver(dep);
                        lean::write_arg(out, ver.len(), |out| ver.write_into(out));
                    }
                };
                // Bounded by the connection's sweeper (lean.rs), not by a timer per lookup.
                lean.query(mget).await?
            }
            None => {
                let size =
                    4 + entry_key.len() + deps.iter().map(|d| keys.dep_ver(d).len()).sum::<usize>();
                let mut cmd = redis::Cmd::with_capacity(2 + deps.len(), size);
                cmd.arg("MGET").arg(&entry_key);
                for dep in deps {
                    cmd.arg(keys.dep_ver(dep));
                }
                mget_items(self.timed(self.conn.query(&cmd)).await?)?
            }
        };
        Ok(resolve_lookup(items, deps, Instant::now(), &entry_key)?.0)
    }

    /// A lookup on the near cache's tracking connection, whose answer the near cache keeps
    /// (near.rs: a fill never overwrites an invalidation that came in meanwhile).
    async fn lookup_tracked(
        &self,
        near: &near::Near,
        tracked: near::Tracked,
        keys: &TenantKeys<'_>,
        entry_name: Vec<u8>,
        deps: &[&str],
    ) -> Result<Lookup, StoreError> {
        let ver_names: Vec<Vec<u8>> = deps
            .iter()
            .map(|d| {
                let ver = keys.dep_ver(d);
                let mut name = Vec::with_capacity(ver.len());
                ver.write_into(&mut name);
                name
            })
            .collect();
        let names =
            || std::iter::once(entry_name.as_slice()).chain(ver_names.iter().map(Vec::as_slice));
        let snapshot = near.snapshot(names());
        let size = 4 + names().map(<[u8]>::len).sum::<usize>();
        let mut cmd = redis::Cmd::with_capacity(2 + deps.len(), size);
        cmd.arg("MGET");
        for name in names() {
            cmd.arg(name);
        }
        let mut conn = tracked.conn.clone();
        let reply: Value = self.timed(cmd.query_async(&mut conn)).await?;
        let shown = String::from_utf8_lossy(&entry_name);
        let (lookup, versions) = resolve_lookup(mget_items(reply)?, deps, Instant::now(), &shown)?;
        let served = match &lookup {
            Lookup::Fresh(e) | Lookup::Stale(e) => Some((entry_name, e.clone())),
            Lookup::Miss(_) => None,
        };
        near.fill(
            &tracked,
            &snapshot,
            served,
            ver_names.into_iter().zip(versions).collect(),
        );
        Ok(lookup)
    }

    async fn put_inner(&self, key: &CacheKey, entry: Entry) -> Result<PutOutcome, StoreError> {
        // Rule 8: past its deadline the put's epochs may have been forgotten (and a forgotten
        // epoch reads as 0 again), so it cannot be checked any more. The retention covers the
        // time from this check to the script.
        if entry.deps.observed_at().elapsed() > self.put_deadline {
            return Ok(PutOutcome::Refused(RefusedReason::DeadlinePassed));
        }
        let value = codec::encode(&entry);
        if value.len() > self.max_entry_bytes {
            return Ok(PutOutcome::Refused(RefusedReason::TooLarge));
        }
        // Redis rejects PX 0; an entry already past its lifetime still goes through the epoch
        // check, and expires at once.
        let ttl_ms = duration_ms(entry.lifetime())
            .saturating_sub(entry.age_ms(now_ms()))
            .max(1);
        let keys = TenantKeys::new(key.tenant());
        let mut inv = self.scripts.put.prepare_invoke();
        inv.key(keys.entry(key));
        for (id, _) in entry.deps.iter() {
            inv.key(keys.dep_ver(id));
        }
        for (id, _) in entry.deps.iter() {
            inv.key(keys.dep_keys(id));
        }
        inv.arg(value).arg(ttl_ms).arg(&key.digest()[..]);
        for (_, epoch, life) in entry.deps.iter_lives() {
            inv.arg(if life == 0 {
                epoch.to_string()
            } else {
                format!("{epoch}.{life}")
            });
        }
        let moved: i64 = self.timed(self.conn.invoke(&inv)).await?;
        if moved == 0 {
            return Ok(PutOutcome::Stored);
        }
        let dep = usize::try_from(moved - 1)
            .ok()
            .and_then(|i| entry.deps.iter().nth(i))
            .map(|(id, _)| id.to_owned())
            .ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Backend,
                    format!("put script answered {moved}"),
                )
            })?;
        Ok(PutOutcome::Refused(RefusedReason::DepChanged(dep)))
    }

    /// Invalidates `dep_ids`: every valid id's epoch is raised in one round trip per
    /// [`BUMP_CHUNK`] ids, then each id's detached entries are reclaimed. Errors are per id.
    async fn invalidate_ids(
        &self,
        tenant: &str,
        dep_ids: &[&str],
        new_hash: &str,
    ) -> Vec<Result<DepInvalidated, StoreError>> {
        let keys = TenantKeys::new(tenant);
        let mut out: Vec<Option<Result<DepInvalidated, StoreError>>> =
            Vec::with_capacity(dep_ids.len());
        let mut valid = Vec::new();
        for (i, id) in dep_ids.iter().enumerate() {
            match validate_dep_id(id) {
                Ok(()) => {
                    out.push(None);
                    valid.push(i);
                }
                Err(e) => out.push(Some(Err(StoreError::new(
                    StoreErrorKind::InvalidInput,
                    e.to_string(),
                )))),
            }
        }
        let raising = match &self.ack {
            Some((conn, _)) => conn,
            None => &self.conn,
        };
        for chunk in valid.chunks(BUMP_CHUNK) {
            let gcs: Vec<String> = chunk.iter().map(|_| keys.gc()).collect();
            let mut inv = self.scripts.bump.prepare_invoke();
            for (&i, gc) in chunk.iter().zip(&gcs) {
                inv.key(keys.dep_ver(dep_ids[i]))
                    .key(keys.dep_keys(dep_ids[i]))
                    .key(gc);
            }
            inv.arg(new_hash)
                .arg(self.retention_ms)
                .arg(keys::life().to_string());
            let raised = self.timed(raising.invoke::<Vec<u64>>(&inv)).await;
            if let Some(near) = &self.near {
                // Before this invalidation returns, whatever its outcome: a raise that timed out
                // may still have happened (docs/design.md §4 rule 4 holds at once here).
                let names: Vec<Vec<u8>> = chunk
                    .iter()
                    .map(|&i| {
                        let mut name = Vec::new();
                        keys.dep_ver(dep_ids[i]).write_into(&mut name);
                        name
                    })
                    .collect();
                near.evict(names.iter().map(Vec::as_slice));
            }
            match raised {
                Ok(raised) => {
                    let acknowledged = match &self.ack {
                        Some((conn, ack)) => Some(self.acknowledged(conn, tenant, *ack).await),
                        None => None,
                    };
                    for (n, (&i, gc)) in chunk.iter().zip(&gcs).enumerate() {
                        // Nothing detached (the dep tagged no live entry): nothing to reclaim,
                        // and no round trip to find that out.
                        let detached = raised.get(2 * n + 1).is_some_and(|d| *d != 0);
                        let deleted = if detached {
                            self.reclaim(&keys, dep_ids[i], gc).await
                        } else {
                            0
                        };
                        let mut result = DepInvalidated::new(dep_ids[i], deleted);
                        result.acknowledged = acknowledged;
                        out[i] = Some(Ok(result));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for &i in chunk {
                        out[i] = Some(Err(StoreError::new(e.kind(), message.clone())));
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.expect("every id was answered"))
            .collect()
    }

    /// Whether `ack.replicas` replicas confirm the raise just made on `conn`. A `WAIT` that fails
    /// says nothing was confirmed: the raise itself stands.
    async fn acknowledged(&self, conn: &Conn, tenant: &str, ack: Ack) -> bool {
        let bound = self.timeout.saturating_add(ack.timeout);
        match tokio::time::timeout(bound, conn.wait(tenant, ack)).await {
            Ok(Ok(replicas)) => replicas >= ack.replicas,
            Ok(Err(e)) => {
                tracing::warn!(tenant, error = %e, "cachecore: WAIT failed; the invalidation is not acknowledged");
                false
            }
            Err(_) => {
                tracing::warn!(
                    tenant,
                    "cachecore: WAIT outlived its timeout; the invalidation is not acknowledged"
                );
                false
            }
        }
    }

    /// Deletes the entries named in the detached tag set `gc`, a bounded batch at a time. The
    /// invalidation is already in effect; a failure here only leaves space to be reclaimed by the
    /// entries' own expiry, so it is logged, not returned.
    async fn reclaim(&self, keys: &TenantKeys<'_>, dep_id: &str, gc: &str) -> u64 {
        let mut deleted = 0u64;
        loop {
            let batch: Result<Vec<Vec<u8>>, _> = self
                .timed(
                    self.conn
                        .query(redis::cmd("ZPOPMIN").arg(gc).arg(self.reclaim_batch)),
                )
                .await;
            let popped = match batch {
                Ok(popped) if popped.is_empty() => return deleted,
                Ok(popped) => popped,
                Err(e) => {
                    tracing::warn!(dep_id, error = %e, deleted, "cachecore: reclamation stopped; the rest expires with its TTL");
                    return deleted;
                }
            };
            // ZPOPMIN answers member, score, member, score, ...
            let digests: Vec<[u8; 32]> = popped
                .chunks(2)
                .filter_map(|pair| <[u8; 32]>::try_from(pair[0].as_slice()).ok())
                .collect();
            if !digests.is_empty() {
                // The entries and, in the same round trip, the L2 vectors beside them
                // (docs/design.md §5a); absent vectors cost a lookup each. Only entries count.
                let mut pipe = redis::pipe();
                pipe.cmd("UNLINK")
                    .arg(
                        digests
                            .iter()
                            .map(|d| keys.entry_digest(d))
                            .collect::<Vec<_>>(),
                    )
                    .cmd("UNLINK")
                    .arg(
                        digests
                            .iter()
                            .map(|d| keys.l2_digest(d))
                            .collect::<Vec<_>>(),
                    )
                    .ignore();
                match self.timed(self.conn.pipe::<(u64,)>(&pipe)).await {
                    Ok((n,)) => deleted += n,
                    Err(e) => {
                        tracing::warn!(dep_id, error = %e, deleted, "cachecore: reclamation stopped; the rest expires with its TTL");
                        return deleted;
                    }
                }
            }
            if popped.len() / 2 < self.reclaim_batch {
                return deleted;
            }
        }
    }
}

/// The answer to a lookup from its `MGET` reply (the entry, then each of `deps`' ver key),
/// with the version of each dep. `entry_key` names the entry in logs.
fn resolve_lookup(
    reply: lean::Items,
    deps: &[&str],
    observed_at: Instant,
    entry_key: &dyn fmt::Display,
) -> Result<(Lookup, Vec<Version>), StoreError> {
    let (raw, versions) = parse_lookup_reply(reply, deps)?;
    let miss = || {
        Lookup::Miss(DepEpochs::observed(
            deps.iter()
                .zip(&versions)
                .map(|(id, &(epoch, life))| ((*id).to_owned(), epoch, life))
                .collect(),
            observed_at,
        ))
    };
    let Some(raw) = raw else {
        return Ok((miss(), versions));
    };
    let mut entry = match codec::decode(raw) {
        Ok(entry) => entry,
        Err(e) => {
            tracing::warn!(key = %entry_key, error = %e, "cachecore: undecodable value under an entry key, treated as a miss");
            return Ok((miss(), versions));
        }
    };
    // Rule 3: every recorded epoch must still be current. A recorded dep that was not
    // declared cannot be checked in this round trip, so the entry is not served. The numbers
    // suffice: a ver key outlives every entry that records it, so a live entry and the
    // current epoch are of the same life.
    let version = |id: &str| deps.iter().position(|d| *d == id).map(|i| versions[i]);
    let current = entry
        .deps
        .iter()
        .all(|(id, epoch)| version(id).is_some_and(|(e, _)| e == epoch));
    if !current {
        return Ok((miss(), versions));
    }
    // Served, the epochs are the ones observed now, lives included: a refresh put after
    // this hit is checked against them.
    entry
        .deps
        .set_lives(|id| version(id).map_or(0, |(_, life)| life));
    entry.deps.restamp(observed_at);
    let lookup = match entry.freshness(now_ms()) {
        Freshness::Fresh => Lookup::Fresh(entry),
        Freshness::Stale => Lookup::Stale(entry),
        Freshness::Expired => miss(),
    };
    Ok((lookup, versions))
}

/// The epoch and life in a dep ver value, `<epoch>.<life>:<last new_hash>` (or, written before
/// lives, `<epoch>:<last new_hash>`: life 0).
fn parse_ver(ver: &[u8]) -> Option<Version> {
    let head = ver.split(|b| *b == b':').next()?;
    if head.len() == ver.len() {
        return None;
    }
    let mut parts = head.splitn(2, |b| *b == b'.');
    let number = |digits: &[u8]| -> Option<u64> {
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let epoch = number(parts.next()?)?;
    let life = match parts.next() {
        Some(digits) => number(digits)?,
        None => 0,
    };
    Some((epoch, life))
}

/// A dep's `(epoch, life)`, as its ver key holds them.
type Version = (u64, u64);

/// An `MGET` reply read by the `redis` crate as its elements: bulk strings (the entry keeps
/// the reply's bytes, no copy) and nils.
fn mget_items(reply: Value) -> Result<lean::Items, StoreError> {
    let Value::Array(items) = reply else {
        return Err(lookup_reply_error("not an array"));
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::BulkString(b) => Ok(Some(Bytes::from(b))),
            Value::Nil => Ok(None),
            _ => Err(lookup_reply_error("an element is neither a string nor nil")),
        })
        .collect()
}

fn lookup_reply_error(what: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Backend, format!("lookup reply: {what}"))
}

/// Splits the lookup `MGET` reply into the raw entry and the version of each of `deps`, in
/// order.
fn parse_lookup_reply(
    items: lean::Items,
    deps: &[&str],
) -> Result<(Option<Bytes>, Vec<Version>), StoreError> {
    if items.len() != deps.len() + 1 {
        return Err(lookup_reply_error("wrong length"));
    }
    let mut items = items.into_iter();
    let raw = items.next().flatten();
    let epochs = deps
        .iter()
        .zip(items)
        .map(|(id, v)| {
            match v {
                None => Some((0, 0)),
                Some(b) => parse_ver(&b),
            }
            .ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!("dep ver key of {id:?} does not hold `<epoch>.<life>:<hash>`"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((raw, epochs))
}

fn store_error(e: RedisError) -> StoreError {
    let kind = if e.is_timeout() {
        StoreErrorKind::Timeout
    } else {
        StoreErrorKind::Backend
    };
    StoreError::new(kind, e.to_string())
}

fn timeout_error(doing: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Timeout, format!("timed out {doing}"))
}

fn no_target() -> StoreError {
    StoreError::new(
        StoreErrorKind::InvalidInput,
        "RedisStoreBuilder needs a url(..) or cluster(..)",
    )
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.conn {
            Conn::Single(_) => "single",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("kind", &kind)
            .field("timeout", &self.timeout)
            .field("reclaim_batch", &self.reclaim_batch)
            .field("max_entry_bytes", &self.max_entry_bytes)
            .field("put_deadline", &self.put_deadline)
            .field("ack", &self.ack.as_ref().map(|(_, ack)| ack))
            .field("near_cache", &self.near.is_some())
            .finish()
    }
}

/// What a lookup the near cache could not answer takes to Redis: the entry's key as the near
/// cache names it, and whether unread bytes wait on the tracking socket.
struct NearNext {
    name: Vec<u8>,
    unread: bool,
}

impl CacheStore for RedisStore {
    fn lookup<'a>(&'a self, key: &'a CacheKey, deps: &'a [&'a str]) -> StoreFuture<'a, Lookup> {
        // A near hit needs no I/O: it is answered without making (and boxing) the lookup's
        // future, which has room for a round trip to Redis.
        let near = match &self.near {
            Some(cache) => match Self::near_lookup(cache, key, deps) {
                Ok(found) => return Box::pin(std::future::ready(Ok(found))),
                Err(next) => Some(next),
            },
            None => None,
        };
        Box::pin(self.lookup_inner(key, deps, near))
    }

    /// A near hit; anything else needs Redis.
    fn lookup_now(&self, key: &CacheKey, deps: &[&str]) -> Option<Result<Lookup, StoreError>> {
        let cache = self.near.as_ref()?;
        Self::near_lookup(cache, key, deps).ok().map(Ok)
    }

    /// Every call is bounded by [`RedisStoreBuilder::timeout`].
    fn bounds_its_own_calls(&self) -> bool {
        true
    }

    /// On Redis Cluster, one per hash slot: a tenant is one slot (its hash tag), and a slot is
    /// served or not as a whole. A single Redis is one.
    fn failure_domains(&self) -> usize {
        match self.conn {
            Conn::Single(_) => 1,
            Conn::Cluster(_) => keys::SLOTS,
        }
    }

    fn failure_domain(&self, tenant: &str) -> usize {
        match self.conn {
            Conn::Single(_) => 0,
            Conn::Cluster(_) => usize::from(keys::slot(tenant)),
        }
    }

    fn put<'a>(&'a self, key: &'a CacheKey, entry: Entry) -> StoreFuture<'a, PutOutcome> {
        Box::pin(self.put_inner(key, entry))
    }

    fn invalidate<'a>(
        &'a self,
        tenant: &'a str,
        dep_id: &'a str,
        new_hash: &'a str,
    ) -> StoreFuture<'a, DepInvalidated> {
        Box::pin(async move {
            self.invalidate_ids(tenant, &[dep_id], new_hash)
                .await
                .pop()
                .expect("one id, one result")
        })
    }

    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: &'a str,
    ) -> InvalidateManyFuture<'a> {
        Box::pin(self.invalidate_ids(tenant, dep_ids, new_hash))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ver;

    #[test]
    fn ver_values_parse_only_as_epoch_life_colon_hash() {
        assert_eq!(parse_ver(b"0:"), Some((0, 0)));
        assert_eq!(parse_ver(b"17:etl-2026:11"), Some((17, 0)));
        assert_eq!(parse_ver(b"17.9:etl-2026.11:1"), Some((17, 9)));
        assert_eq!(
            parse_ver(b"18446744073709551615.18446744073709551615:h"),
            Some((u64::MAX, u64::MAX))
        );
        for bad in [
            &b""[..],
            b"17",
            b"17.3",
            b":h",
            b".3:h",
            b"3.:h",
            b"3.4.5:h",
            b"-1:h",
            b"1x:h",
            b"18446744073709551616:h",
            b"1.18446744073709551616:h",
        ] {
            assert_eq!(parse_ver(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
