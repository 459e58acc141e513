//! Event-driven invalidation over a Redis Stream (feature `redis`).
//!
//! For write paths that must not wait for an invalidation: the writer publishes an event
//! ([`InvalidationQueue::publish`], one `XADD`), and [`QueueWorker`]s apply it.
//!
//! The worker consumes with a consumer group, so several workers share the load:
//!
//! - an event is acknowledged (`XACK`) only after its invalidation succeeded; a worker that
//!   dies between reading and acknowledging leaves it pending;
//! - pending events idle for longer than [`claim_idle`](QueueWorkerBuilder::claim_idle) are
//!   taken over (`XAUTOCLAIM`) by a live worker, so nothing a crashed worker read is lost:
//!   every event is applied at least once (applying one twice is harmless);
//! - [`QueueWorker::run`] returns when its shutdown future completes, after finishing the
//!   event in progress.
//!
//! # Failures
//!
//! An event fails in one of three ways, and each is handled on its own terms:
//!
//! - **Poison**: the entry cannot be parsed, or its `dep_id` ([`validate_dep_id`]) or
//!   `new_hash` ([`validate_new_hash`]) is invalid. No retry can help, so it is moved to the
//!   dead-letter stream (with the reason) and acknowledged at once, in one `MULTI`; the cache
//!   never sees it.
//! - **Transient**: the store is down, timed out or unreachable, or a remote invalidation API
//!   cannot be reached ([`DepErrorKind::is_transient`]). The
//!   worker keeps the event, backs off exponentially from
//!   [`DEFAULT_MIN_RETRY_BACKOFF`] to [`DEFAULT_MAX_RETRY_BACKOFF`] and tries it again, for as
//!   long as the outage lasts. These retries do not count as deliveries: a valid event outlives
//!   any outage and is never dead-lettered for one. While it waits, the worker re-claims the
//!   event (`XCLAIM .. JUSTID`, which leaves the delivery counter alone) so no other worker
//!   takes it over. Events behind it wait too, so order is kept: while the store is down
//!   none of them could be applied anyway. (On a Redis Cluster store with one master down, the
//!   tenants of the other masters wait with it until it is back or failed over.)
//! - **Any other failure** the [`Invalidator`] reports (data it cannot read, a refusal of a
//!   wrapper of your own, [`DepErrorKind::Other`]): the event stays pending and is tried again once it has idled for
//!   `claim_idle`, up to [`max_deliveries`](QueueWorkerBuilder::max_deliveries) deliveries,
//!   then dead-lettered. Choose what counts as transient with
//!   [`transient_when`](QueueWorkerBuilder::transient_when).
//!
//! Redis errors of the worker's own (reading, acknowledging) are logged and retried with
//! backoff. A consumer group that has disappeared (Redis restarted without persistence, or the
//! group was deleted) is created again, from the start of the stream, and the worker goes on.
//!
//! ```no_run
//! # async fn run(cache: cachecore::CachecoreLayer) -> Result<(), cachecore::queue::QueueError> {
//! use cachecore::queue::{InvalidationEvent, InvalidationQueue, QueueWorker};
//!
//! // Producer (an ORM save hook):
//! let queue = InvalidationQueue::connect("redis://127.0.0.1:6379/").await?;
//! queue.publish(&InvalidationEvent::new("acme", "doc:contract-123").new_hash("v7")).await?;
//!
//! // Worker:
//! let worker = QueueWorker::builder("redis://127.0.0.1:6379/").build().await?;
//! let report = worker.run(cache, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! println!("applied {} events", report.applied);
//! # Ok(()) }
//! ```
//!
//! Entries are hashes of `tenant`, `dep_id` and optionally `new_hash`, so any language can
//! publish with a plain `XADD cachecore:invalidations * tenant acme dep_id doc:1 new_hash v2`.
//!
//! # Redis Cluster
//!
//! [`InvalidationQueue::connect_cluster`] and [`QueueWorker::cluster_builder`] take seed nodes,
//! like [`RedisStore`](crate::RedisStore). All the queue's state lives in two keys: the stream
//! (its consumer group and pending lists are part of it) and the dead-letter stream. Dead-lettering
//! writes one and acknowledges on the other in a single `MULTI`, so the two must share a hash
//! slot. The default dead-letter stream of a stream `s` is [`dead_letter_stream_for`]`(s)`:
//! `{s}:dead`, whose hash tag is `s` itself, or `s:dead` when `s` already has a hash tag. On a
//! cluster, [`build`](QueueWorkerBuilder::build) refuses a dead-letter stream whose hash tag
//! differs from the stream's.
//!
//! ```text
//! cachecore:invalidations              the stream, with the consumer group
//! {cachecore:invalidations}:dead       its dead-letter stream, in the same slot
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::{RedisError, Value};

use crate::invalidate::Invalidator;
use crate::store::redis::Conn;
use crate::{validate_dep_id, validate_new_hash, DepError, DepErrorKind, Invalidation};

/// Stream the events go to by default.
pub const DEFAULT_STREAM: &str = "cachecore:invalidations";
/// Consumer group of the workers by default.
pub const DEFAULT_GROUP: &str = "cachecore-workers";
/// Dead-letter stream of [`DEFAULT_STREAM`]: [`dead_letter_stream_for`] it, so both share a
/// Redis Cluster slot.
pub const DEFAULT_DEAD_LETTER_STREAM: &str = "{cachecore:invalidations}:dead";
/// Deliveries before an event that keeps failing (for a reason other than a transient one) is
/// dead-lettered by default: a few chances for a fault that clears, then it is set aside.
pub const DEFAULT_MAX_DELIVERIES: usize = 5;
/// Idle time after which a pending event is taken from its consumer by default: far longer
/// than one invalidation takes, so a live worker's event is not taken from it.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);
/// Events read per round trip by default.
pub const DEFAULT_BATCH: usize = 100;
/// How long one `XREADGROUP` waits for new events by default.
pub const DEFAULT_BLOCK: Duration = Duration::from_secs(1);
/// First pause before an event that failed transiently is tried again, by default: a blip
/// (a failover, a reconnect) is over by then.
pub const DEFAULT_MIN_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between two tries of an event that fails transiently, by default: an outage is
/// noticed to be over within this, and a dead store sees one call per worker this often. Below
/// half of [`DEFAULT_CLAIM_IDLE`], so the worker re-claims the event before anyone could take it.
pub const DEFAULT_MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);
/// Longest pause after a Redis error before the worker tries again.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(5);
/// First pause after a Redis error.
const MIN_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Shortest pause between two tries of an event, whatever the configuration: never spin.
const MIN_RETRY_PAUSE: Duration = Duration::from_millis(1);
/// Margin over the blocking time for a response to arrive.
const RESPONSE_MARGIN: Duration = Duration::from_secs(5);
/// Connect timeout of the worker's and the queue's connections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Response timeout of the publisher's connection.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// An error from the queue or the worker: Redis failed, the configuration cannot work, or an
/// event was refused before it was published.
#[derive(Debug)]
pub struct QueueError(Repr);

#[derive(Debug)]
enum Repr {
    Redis(RedisError),
    Config(String),
    InvalidEvent(String),
}

impl QueueError {
    /// Whether `publish` refused the event because it is invalid (nothing was published).
    pub fn is_invalid_event(&self) -> bool {
        matches!(self.0, Repr::InvalidEvent(_))
    }

    /// Whether Redis answered that the stream or its consumer group does not exist.
    fn is_missing_group(&self) -> bool {
        matches!(&self.0, Repr::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Redis(e) => write!(f, "invalidation queue: {e}"),
            Repr::Config(why) => write!(f, "invalidation queue configuration: {why}"),
            Repr::InvalidEvent(why) => write!(f, "invalid invalidation event: {why}"),
        }
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0 {
            Repr::Redis(e) => Some(e),
            Repr::Config(_) | Repr::InvalidEvent(_) => None,
        }
    }
}

impl From<RedisError> for QueueError {
    fn from(e: RedisError) -> Self {
        Self(Repr::Redis(e))
    }
}

/// The part of `key` Redis Cluster hashes to pick its slot: the first `{...}` with something
/// inside, else the whole key.
fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}')
                .filter(|&len| len > 0)
                .map(|len| &rest[..len])
        })
        .unwrap_or(key)
}

/// The default dead-letter stream of `stream`: `{stream}:dead`, whose hash tag is `stream`
/// itself, or `stream:dead` when `stream` already has a hash tag. Either way it is in the
/// stream's Redis Cluster slot, except for a stream without a hash tag that contains a `}`
/// (`a{}b`), which cannot be wrapped in one: give such a stream a dead-letter stream yourself.
pub fn dead_letter_stream_for(stream: &str) -> String {
    if hash_tag(stream) != stream || stream.contains('}') {
        format!("{stream}:dead")
    } else {
        format!("{{{stream}}}:dead")
    }
}

/// One invalidation to apply: `dep_id` in `tenant`, recording `new_hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidationEvent {
    /// The tenant the dep lives in.
    pub tenant: String,
    /// The dep to invalidate.
    pub dep_id: String,
    /// The new version; a random one is recorded when `None`.
    pub new_hash: Option<String>,
}

impl InvalidationEvent {
    /// An event for `dep_id` in `tenant`, with no new hash.
    pub fn new(tenant: impl Into<String>, dep_id: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            dep_id: dep_id.into(),
            new_hash: None,
        }
    }

    /// Sets the new hash.
    #[must_use]
    pub fn new_hash(mut self, hash: impl Into<String>) -> Self {
        self.new_hash = Some(hash.into());
        self
    }

    fn fields(&self) -> Vec<(&str, &str)> {
        let mut f = vec![("tenant", self.tenant.as_str()), ("dep_id", &self.dep_id)];
        if let Some(h) = &self.new_hash {
            f.push(("new_hash", h));
        }
        f
    }

    /// Why no invalidation could ever apply this event, if so.
    fn check(&self) -> Result<(), String> {
        validate_dep_id(&self.dep_id).map_err(|e| format!("dep_id: {e}"))?;
        if let Some(hash) = &self.new_hash {
            validate_new_hash(hash).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The event in `entry`, or why it is poison.
    fn from_entry(entry: &StreamId) -> Result<Self, String> {
        let field = |name: &str| -> Result<Option<String>, String> {
            match entry.map.get(name) {
                None | Some(Value::Nil) => Ok(None),
                Some(v) => redis::from_redis_value_ref::<String>(v)
                    .map(Some)
                    .map_err(|_| format!("field {name} is not a string")),
            }
        };
        let event = Self {
            tenant: field("tenant")?.ok_or("missing field tenant")?,
            dep_id: field("dep_id")?.ok_or("missing field dep_id")?,
            new_hash: field("new_hash")?,
        };
        event.check()?;
        Ok(event)
    }
}

/// Where a queue or a worker connects.
#[derive(Clone, Debug)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

impl Target {
    async fn connect(&self, response_timeout: Duration) -> Result<Conn, QueueError> {
        match self {
            Self::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(response_timeout));
                Ok(Conn::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            Self::Cluster(nodes) => {
                let client = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(response_timeout)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// The producer side: publishes invalidation events to a stream.
#[derive(Clone)]
pub struct InvalidationQueue {
    conn: Conn,
    stream: String,
    max_len: Option<usize>,
}

impl fmt::Debug for InvalidationQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidationQueue")
            .field("stream", &self.stream)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl InvalidationQueue {
    /// A queue on [`DEFAULT_STREAM`] of the Redis at `url`.
    pub async fn connect(url: &str) -> Result<Self, QueueError> {
        let target = Target::Single(url.to_owned());
        Ok(Self::on(target.connect(PUBLISH_TIMEOUT).await?))
    }

    /// A queue on [`DEFAULT_STREAM`] of the Redis Cluster reached through `nodes` (seed URLs;
    /// the rest of the topology is discovered).
    pub async fn connect_cluster<I>(nodes: I) -> Result<Self, QueueError>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let target = Target::Cluster(nodes.into_iter().map(Into::into).collect());
        Ok(Self::on(target.connect(PUBLISH_TIMEOUT).await?))
    }

    /// A queue on [`DEFAULT_STREAM`] over an existing connection.
    pub fn new(conn: ConnectionManager) -> Self {
        Self::on(Conn::Single(conn))
    }

    /// A queue on [`DEFAULT_STREAM`] over an existing Redis Cluster connection.
    pub fn new_cluster(conn: ClusterConnection) -> Self {
        Self::on(Conn::Cluster(conn))
    }

    fn on(conn: Conn) -> Self {
        Self {
            conn,
            stream: DEFAULT_STREAM.to_owned(),
            max_len: None,
        }
    }

    /// Publishes to `stream` instead.
    #[must_use]
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = stream.into();
        self
    }

    /// Trims the stream to about `max_len` entries on each publish (`MAXLEN ~`). Trimming
    /// drops the oldest entries whether or not they were processed: keep it far above any
    /// backlog you expect. Off by default.
    #[must_use]
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = Some(max_len);
        self
    }

    /// Publishes one event; returns its stream id. An event no worker could apply (an invalid
    /// dep id or new hash) is refused here ([`QueueError::is_invalid_event`]) rather than
    /// dead-lettered later.
    pub async fn publish(&self, event: &InvalidationEvent) -> Result<String, QueueError> {
        event
            .check()
            .map_err(|why| QueueError(Repr::InvalidEvent(why)))?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream);
        if let Some(n) = self.max_len {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*");
        for (k, v) in event.fields() {
            cmd.arg(k).arg(v);
        }
        Ok(cmd.query_async(&mut self.conn.clone()).await?)
    }
}

/// Configures a [`QueueWorker`].
#[derive(Clone, Debug)]
#[must_use]
pub struct QueueWorkerBuilder {
    target: Target,
    stream: String,
    group: String,
    consumer: Option<String>,
    dead_letter: Option<String>,
    policy: Policy,
}

/// How a worker reads, retries and gives up: the builder's settings, which the worker keeps.
#[derive(Clone, Copy, Debug)]
struct Policy {
    max_deliveries: usize,
    claim_idle: Duration,
    batch: usize,
    block: Duration,
    retry_backoff: (Duration, Duration),
    transient: fn(&DepError) -> bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            claim_idle: DEFAULT_CLAIM_IDLE,
            batch: DEFAULT_BATCH,
            block: DEFAULT_BLOCK,
            retry_backoff: (DEFAULT_MIN_RETRY_BACKOFF, DEFAULT_MAX_RETRY_BACKOFF),
            transient: |e| e.kind().is_transient(),
        }
    }
}

impl QueueWorkerBuilder {
    /// The stream to consume (default [`DEFAULT_STREAM`]).
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = stream.into();
        self
    }

    /// The consumer group (default [`DEFAULT_GROUP`]); created, from the start of the stream,
    /// if missing, at start-up and whenever it disappears.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// This worker's consumer name, unique among live workers (default: from the process id
    /// and a random suffix). A worker restarted under the same name resumes its own pending
    /// events at once.
    pub fn consumer(mut self, consumer: impl Into<String>) -> Self {
        self.consumer = Some(consumer.into());
        self
    }

    /// The dead-letter stream (default: [`dead_letter_stream_for`] the stream). On Redis
    /// Cluster it must share the stream's hash slot.
    pub fn dead_letter_stream(mut self, stream: impl Into<String>) -> Self {
        self.dead_letter = Some(stream.into());
        self
    }

    /// Deliveries after which an event that keeps failing for a reason that is not transient
    /// is dead-lettered (default [`DEFAULT_MAX_DELIVERIES`]; at least 1). Transient failures
    /// and poison events do not count against it.
    pub fn max_deliveries(mut self, n: usize) -> Self {
        self.policy.max_deliveries = n.max(1);
        self
    }

    /// How long an event stays pending with a consumer before another takes it over, and
    /// before an event that failed for a reason that is not transient is tried again (default
    /// [`DEFAULT_CLAIM_IDLE`]).
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.policy.claim_idle = idle;
        self
    }

    /// Events read per round trip (default [`DEFAULT_BATCH`]).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.policy.batch = n.max(1);
        self
    }

    /// How long one read waits for new events (default [`DEFAULT_BLOCK`]); also how often
    /// idle pending events are looked for when the stream is quiet.
    pub fn block(mut self, block: Duration) -> Self {
        self.policy.block = block.max(Duration::from_millis(1));
        self
    }

    /// Pauses before retrying an event that failed transiently: `min` first, doubling up to
    /// `max` (defaults [`DEFAULT_MIN_RETRY_BACKOFF`] and [`DEFAULT_MAX_RETRY_BACKOFF`]). Each
    /// pause is also at most half of [`claim_idle`](Self::claim_idle), so the worker re-claims
    /// the event before another could take it over.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        let min = min.max(MIN_RETRY_PAUSE);
        self.policy.retry_backoff = (min, max.max(min));
        self
    }

    /// Which failures are transient: retried with backoff, without counting as a delivery and
    /// without ever being dead-lettered (default: those whose kind
    /// [`is_transient`](DepErrorKind::is_transient)). An [`Invalidator`] of your own marks a
    /// failure transient by its kind, e.g. `DepErrorKind::Store(StoreErrorKind::Backend)`.
    pub fn transient_when(mut self, transient: fn(&DepError) -> bool) -> Self {
        self.policy.transient = transient;
        self
    }

    /// Connects and builds the worker. On Redis Cluster, fails when the dead-letter stream
    /// does not share the stream's hash tag.
    pub async fn build(self) -> Result<QueueWorker, QueueError> {
        let dead_letter = self
            .dead_letter
            .unwrap_or_else(|| dead_letter_stream_for(&self.stream));
        if matches!(self.target, Target::Cluster(_))
            && hash_tag(&dead_letter) != hash_tag(&self.stream)
        {
            return Err(QueueError(Repr::Config(format!(
                "on Redis Cluster the dead-letter stream {dead_letter:?} must share the hash \
                 slot of the stream {:?}: give both the same hash tag, or leave the dead-letter \
                 stream to its default, {:?}",
                self.stream,
                dead_letter_stream_for(&self.stream)
            ))));
        }
        let conn = self
            .target
            .connect(self.policy.block + RESPONSE_MARGIN)
            .await?;
        let consumer = self.consumer.unwrap_or_else(|| {
            use std::hash::BuildHasher;
            let r = std::collections::hash_map::RandomState::new().hash_one(0u8);
            format!("worker-{}-{:08x}", std::process::id(), r as u32)
        });
        Ok(QueueWorker {
            conn,
            stream: self.stream,
            group: self.group,
            consumer,
            dead_letter,
            policy: self.policy,
            last_errors: HashMap::new(),
        })
    }
}

/// What a worker did before it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Events applied and acknowledged.
    pub applied: u64,
    /// Attempts that failed, transient ones included.
    pub failed_attempts: u64,
    /// Of those, attempts that failed transiently and were retried in place.
    pub transient_failures: u64,
    /// Events moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Events taken over from idle consumers (a crashed worker, or a failed earlier attempt).
    pub reclaimed: u64,
    /// Times the consumer group was found missing and created again.
    pub groups_recreated: u64,
}

/// Applies invalidation events from a stream. See the [module docs](self).
pub struct QueueWorker {
    conn: Conn,
    stream: String,
    group: String,
    consumer: String,
    dead_letter: String,
    policy: Policy,
    /// The last error of events this worker failed, for the dead-letter entry.
    last_errors: HashMap<String, String>,
}

impl fmt::Debug for QueueWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueWorker")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("dead_letter", &self.dead_letter)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A shutdown future that can be checked without being consumed.
struct Shutdown<F> {
    fut: Pin<Box<F>>,
    done: bool,
}

impl<F: Future<Output = ()>> Shutdown<F> {
    fn new(fut: F) -> Self {
        Self {
            fut: Box::pin(fut),
            done: false,
        }
    }

    /// Whether it has completed, without waiting.
    async fn requested(&mut self) -> bool {
        if !self.done {
            self.done =
                std::future::poll_fn(|cx| Poll::Ready(self.fut.as_mut().poll(cx).is_ready())).await;
        }
        self.done
    }

    /// Completes when shutdown is requested.
    async fn wait(&mut self) {
        if !self.done {
            self.fut.as_mut().await;
            self.done = true;
        }
    }
}

/// How one try of an event ended.
enum Attempt {
    Applied,
    /// Failed for a reason that is not transient.
    Failed(String),
    /// Shutdown came while waiting to retry a transient failure.
    Interrupted,
}

impl QueueWorker {
    /// A builder for a worker on the Redis at `url`, with the defaults.
    pub fn builder(url: impl Into<String>) -> QueueWorkerBuilder {
        Self::builder_for(Target::Single(url.into()))
    }

    /// A builder for a worker on the Redis Cluster reached through `nodes` (seed URLs; the rest
    /// of the topology is discovered), with the defaults.
    pub fn cluster_builder<I>(nodes: I) -> QueueWorkerBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::builder_for(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    fn builder_for(target: Target) -> QueueWorkerBuilder {
        QueueWorkerBuilder {
            target,
            stream: DEFAULT_STREAM.to_owned(),
            group: DEFAULT_GROUP.to_owned(),
            consumer: None,
            dead_letter: None,
            policy: Policy::default(),
        }
    }

    /// This worker's consumer name.
    pub fn consumer_name(&self) -> &str {
        &self.consumer
    }

    /// Applies events through `target` until `shutdown` completes, then returns what it did.
    ///
    /// Shutdown is checked between events: the event in progress is finished (and
    /// acknowledged) first; events read but not started stay pending for the next worker. A
    /// wait for new events, or before retrying a transient failure, is cut short (that event
    /// stays pending too). Redis errors are logged and retried with backoff, and a consumer
    /// group that disappeared is created again; only a failure to create the group at the
    /// start is returned.
    pub async fn run(
        mut self,
        target: impl Invalidator,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<WorkerReport, QueueError> {
        let mut shutdown = Shutdown::new(shutdown);
        let mut report = WorkerReport::default();
        self.ensure_group().await?;
        tracing::info!(target: "cachecore::queue", stream = %self.stream, group = %self.group,
            consumer = %self.consumer, "invalidation worker started");

        // Events this consumer read in an earlier life and never acknowledged come first, in
        // one pass: the cursor moves past each one read, so an event that fails again waits
        // for `claim_idle` like any other instead of being retried at once.
        let mut own_pending = Some(String::from("0"));
        let mut claim_cursor = String::from("0-0");
        let mut backoff = MIN_ERROR_BACKOFF;
        while !shutdown.requested().await {
            let mut step = self
                .step(
                    &target,
                    &mut shutdown,
                    &mut report,
                    &mut own_pending,
                    &mut claim_cursor,
                )
                .await;
            if step.as_ref().is_err_and(QueueError::is_missing_group) {
                // Redis lost the group (a restart without persistence, a flush, someone
                // deleted it): nothing would ever be read again without it. Events published
                // since are in the new stream, so it starts from the beginning.
                tracing::warn!(target: "cachecore::queue", stream = %self.stream,
                    group = %self.group, "invalidation worker: consumer group missing; creating it again");
                own_pending = None;
                claim_cursor = String::from("0-0");
                step = self.ensure_group().await;
                if step.is_ok() {
                    report.groups_recreated += 1;
                }
            }
            match step {
                Ok(()) => backoff = MIN_ERROR_BACKOFF,
                Err(e) => {
                    tracing::warn!(target: "cachecore::queue", error = %e, ?backoff,
                        "invalidation worker: Redis call failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.wait() => {}
                    }
                    backoff = (backoff * 2).min(MAX_ERROR_BACKOFF);
                }
            }
        }
        tracing::info!(target: "cachecore::queue", consumer = %self.consumer, ?report,
            "invalidation worker stopped");
        Ok(report)
    }

    async fn ensure_group(&mut self) -> Result<(), QueueError> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn)
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// One round: this consumer's own pending events (until they are all seen once), else idle
    /// events of any consumer, else new events.
    async fn step<F: Future<Output = ()>>(
        &mut self,
        target: &impl Invalidator,
        shutdown: &mut Shutdown<F>,
        report: &mut WorkerReport,
        own_pending: &mut Option<String>,
        claim_cursor: &mut String,
    ) -> Result<(), QueueError> {
        if let Some(cursor) = own_pending.clone() {
            let entries = self.read(&cursor, None).await?;
            let Some(last) = entries.last() else {
                *own_pending = None;
                return Ok(());
            };
            *own_pending = Some(last.id.clone());
            let counts = self.delivery_counts(&entries).await?;
            return self
                .process(target, shutdown, report, entries, &counts)
                .await;
        }

        let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(millis(self.policy.claim_idle))
            .arg(claim_cursor.as_str())
            .arg("COUNT")
            .arg(self.policy.batch)
            .query_async(&mut self.conn)
            .await?;
        *claim_cursor = claimed.next_stream_id;
        if !claimed.claimed.is_empty() {
            report.reclaimed += claimed.claimed.len() as u64;
            tracing::info!(target: "cachecore::queue", n = claimed.claimed.len(),
                consumer = %self.consumer, "took over idle pending events");
            let counts = self.delivery_counts(&claimed.claimed).await?;
            self.process(target, shutdown, report, claimed.claimed, &counts)
                .await?;
            return Ok(());
        }

        let entries = tokio::select! {
            entries = self.read(">", Some(self.policy.block)) => entries?,
            () = shutdown.wait() => return Ok(()),
        };
        let counts = HashMap::new();
        self.process(target, shutdown, report, entries, &counts)
            .await
    }

    /// `XREADGROUP` from `id` (`>` for new events, `0` for this consumer's pending ones).
    async fn read(
        &mut self,
        id: &str,
        block: Option<Duration>,
    ) -> Result<Vec<StreamId>, QueueError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.policy.batch);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(millis(block));
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(id);
        let reply: Option<StreamReadReply> = cmd.query_async(&mut self.conn).await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect())
    }

    /// How many times each of `entries` (pending with this consumer) has been delivered.
    async fn delivery_counts(
        &mut self,
        entries: &[StreamId],
    ) -> Result<HashMap<String, usize>, QueueError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashMap::new());
        };
        let reply: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&first.id)
            .arg(&last.id)
            .arg(entries.len())
            .arg(&self.consumer)
            .query_async(&mut self.conn)
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|p| (p.id, p.times_delivered))
            .collect())
    }

    async fn process<F: Future<Output = ()>>(
        &mut self,
        target: &impl Invalidator,
        shutdown: &mut Shutdown<F>,
        report: &mut WorkerReport,
        entries: Vec<StreamId>,
        counts: &HashMap<String, usize>,
    ) -> Result<(), QueueError> {
        for entry in entries {
            if shutdown.requested().await {
                // The rest stays pending; the next worker (or this one restarted) takes it.
                return Ok(());
            }
            let deliveries = counts.get(&entry.id).copied().unwrap_or(1);
            let event = match InvalidationEvent::from_entry(&entry) {
                Ok(event) => event,
                Err(why) => {
                    self.dead_letter(&entry, deliveries, &format!("malformed event: {why}"))
                        .await?;
                    report.dead_lettered += 1;
                    continue;
                }
            };
            if deliveries > self.policy.max_deliveries {
                let why = self
                    .last_errors
                    .remove(&entry.id)
                    .unwrap_or_else(|| "delivered too many times".to_owned());
                self.dead_letter(&entry, deliveries, &why).await?;
                report.dead_lettered += 1;
                continue;
            }
            match self
                .attempt(target, shutdown, report, &entry, &event, deliveries)
                .await
            {
                Attempt::Applied => {
                    let _: i64 = redis::cmd("XACK")
                        .arg(&self.stream)
                        .arg(&self.group)
                        .arg(&entry.id)
                        .query_async(&mut self.conn)
                        .await?;
                    self.last_errors.remove(&entry.id);
                    report.applied += 1;
                }
                Attempt::Failed(why) => {
                    if deliveries >= self.policy.max_deliveries {
                        self.dead_letter(&entry, deliveries, &why).await?;
                        report.dead_lettered += 1;
                    } else {
                        // Left pending: tried again once it has been idle for `claim_idle`.
                        self.last_errors.insert(entry.id.clone(), why);
                    }
                }
                Attempt::Interrupted => return Ok(()),
            }
        }
        Ok(())
    }

    /// Applies `event`, retrying in place for as long as it fails transiently.
    async fn attempt<F: Future<Output = ()>>(
        &mut self,
        target: &impl Invalidator,
        shutdown: &mut Shutdown<F>,
        report: &mut WorkerReport,
        entry: &StreamId,
        event: &InvalidationEvent,
        deliveries: usize,
    ) -> Attempt {
        let (mut backoff, max_backoff) = self.policy.retry_backoff;
        loop {
            let mut invalidation = Invalidation::of([event.dep_id.as_str()]).tenant(&event.tenant);
            if let Some(hash) = &event.new_hash {
                invalidation = invalidation.new_hash(hash);
            }
            let error = match target.invalidate(invalidation).await {
                Ok(_) => return Attempt::Applied,
                Err(e) => e.failed().next().cloned().unwrap_or_else(|| {
                    DepError::new(
                        &event.dep_id,
                        DepErrorKind::Other,
                        "failed without a reason",
                    )
                }),
            };
            report.failed_attempts += 1;
            let transient = (self.policy.transient)(&error);
            let why = error.to_string();
            if !transient {
                tracing::warn!(target: "cachecore::queue", id = %entry.id, tenant = %event.tenant,
                    dep_id = %event.dep_id, deliveries, error = %why, "invalidation event failed");
                return Attempt::Failed(why);
            }
            report.transient_failures += 1;
            // Re-claimed before `claim_idle` runs out, so no other worker takes it meanwhile.
            let pause = backoff.min(self.policy.claim_idle / 2).max(MIN_RETRY_PAUSE);
            tracing::warn!(target: "cachecore::queue", id = %entry.id, tenant = %event.tenant,
                dep_id = %event.dep_id, error = %why, retry_in = ?pause,
                "invalidation event failed transiently; retrying");
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.wait() => return Attempt::Interrupted,
            }
            self.keep_claimed(&entry.id).await;
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    /// Resets the idle time of pending event `id` without counting a delivery (`JUSTID`). A
    /// failure only means another worker may take the event over: applied twice, harmlessly.
    async fn keep_claimed(&mut self, id: &str) {
        let claimed: Result<Value, RedisError> = redis::cmd("XCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(id)
            .arg("JUSTID")
            .query_async(&mut self.conn)
            .await;
        if let Err(e) = claimed {
            tracing::debug!(target: "cachecore::queue", id, error = %e,
                "could not re-claim an event waiting for a retry");
        }
    }

    /// Moves `entry` to the dead-letter stream and acknowledges it, atomically.
    async fn dead_letter(
        &mut self,
        entry: &StreamId,
        deliveries: usize,
        why: &str,
    ) -> Result<(), QueueError> {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&self.dead_letter).arg("*");
        let mut fields: Vec<(&String, &Value)> = entry.map.iter().collect();
        fields.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in fields {
            if let Ok(v) = redis::from_redis_value_ref::<Vec<u8>>(v) {
                xadd.arg(k.as_str()).arg(v);
            }
        }
        xadd.arg("original_id")
            .arg(&entry.id)
            .arg("deliveries")
            .arg(deliveries)
            .arg("error")
            .arg(why)
            .arg("consumer")
            .arg(&self.consumer);
        let mut xack = redis::cmd("XACK");
        xack.arg(&self.stream).arg(&self.group).arg(&entry.id);
        let _: (String, i64) = redis::pipe()
            .atomic()
            .add_command(xadd)
            .add_command(xack)
            .query_async(&mut self.conn)
            .await?;
        self.last_errors.remove(&entry.id);
        tracing::warn!(target: "cachecore::queue", id = %entry.id, deliveries, error = %why,
            dead_letter = %self.dead_letter, "invalidation event dead-lettered");
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_dead_letter_stream_is_the_default_streams() {
        assert_eq!(
            dead_letter_stream_for(DEFAULT_STREAM),
            DEFAULT_DEAD_LETTER_STREAM
        );
        assert_eq!(hash_tag(DEFAULT_DEAD_LETTER_STREAM), DEFAULT_STREAM);
    }

    #[test]
    fn a_dead_letter_stream_hashes_like_its_stream() {
        for stream in [
            "inv",
            "cachecore:{invalidations}",
            "{tenant-a}:inv",
            "a{b",
            "x{tag}y",
        ] {
            let dead = dead_letter_stream_for(stream);
            assert_eq!(hash_tag(&dead), hash_tag(stream), "{stream:?} -> {dead:?}");
        }
        // No hash tag, and a `}` that would close one early: not in the same slot, so a
        // cluster worker refuses to build with it.
        assert_ne!(hash_tag(&dead_letter_stream_for("a}b")), hash_tag("a}b"));
    }

    #[test]
    fn hash_tags_follow_the_cluster_rules() {
        assert_eq!(hash_tag("plain"), "plain");
        assert_eq!(hash_tag("{user1000}.following"), "user1000");
        assert_eq!(hash_tag("foo{}{bar}"), "foo{}{bar}");
        assert_eq!(hash_tag("foo{{bar}}zap"), "{bar");
        assert_eq!(hash_tag("foo{bar}{zap}"), "bar");
        assert_eq!(hash_tag("no{close"), "no{close");
    }
}
