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
//! - an event that failed [`max_deliveries`](QueueWorkerBuilder::max_deliveries) times, or
//!   that cannot be parsed, is moved to a dead-letter stream (with the reason) and
//!   acknowledged, in one `MULTI`;
//! - [`QueueWorker::run`] returns when its shutdown future completes, after finishing the
//!   event in progress.
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

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::{RedisError, Value};

use crate::invalidate::Invalidator;

/// Stream the events go to by default.
pub const DEFAULT_STREAM: &str = "cachecore:invalidations";
/// Consumer group of the workers by default.
pub const DEFAULT_GROUP: &str = "cachecore-workers";
/// Dead-letter stream by default.
pub const DEFAULT_DEAD_LETTER_STREAM: &str = "cachecore:invalidations:dead";
/// Deliveries before an event is dead-lettered by default: rides out a store blip or a
/// restart, gives up on an event that fails for good.
pub const DEFAULT_MAX_DELIVERIES: usize = 5;
/// Idle time after which a pending event is taken from its consumer by default: far longer
/// than one invalidation takes, so a live worker's event is not taken from it.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);
/// Events read per round trip by default.
pub const DEFAULT_BATCH: usize = 100;
/// How long one `XREADGROUP` waits for new events by default.
pub const DEFAULT_BLOCK: Duration = Duration::from_secs(1);
/// Longest pause after a Redis error before the worker tries again.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(5);
/// First pause after a Redis error.
const MIN_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Margin over the blocking time for a response to arrive.
const RESPONSE_MARGIN: Duration = Duration::from_secs(5);
/// Connect timeout of the worker's and the queue's connections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Response timeout of the publisher's connection.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// A Redis error from the queue or the worker.
#[derive(Debug)]
pub struct QueueError(RedisError);

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalidation queue: {}", self.0)
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl From<RedisError> for QueueError {
    fn from(e: RedisError) -> Self {
        Self(e)
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

    fn from_entry(entry: &StreamId) -> Result<Self, String> {
        let field = |name: &str| -> Result<Option<String>, String> {
            match entry.map.get(name) {
                None | Some(Value::Nil) => Ok(None),
                Some(v) => redis::from_redis_value_ref::<String>(v)
                    .map(Some)
                    .map_err(|_| format!("field {name} is not a string")),
            }
        };
        let tenant = field("tenant")?.ok_or("missing field tenant")?;
        let dep_id = field("dep_id")?.ok_or("missing field dep_id")?;
        crate::validate_dep_id(&dep_id).map_err(|e| format!("dep_id: {e}"))?;
        Ok(Self {
            tenant,
            dep_id,
            new_hash: field("new_hash")?,
        })
    }
}

async fn connection(
    url: &str,
    response_timeout: Duration,
) -> Result<ConnectionManager, QueueError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

/// The producer side: publishes invalidation events to a stream.
#[derive(Clone)]
pub struct InvalidationQueue {
    conn: ConnectionManager,
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
        Ok(Self::new(connection(url, PUBLISH_TIMEOUT).await?))
    }

    /// A queue on [`DEFAULT_STREAM`] over an existing connection.
    pub fn new(conn: ConnectionManager) -> Self {
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

    /// Publishes one event; returns its stream id.
    pub async fn publish(&self, event: &InvalidationEvent) -> Result<String, QueueError> {
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
    url: String,
    stream: String,
    group: String,
    consumer: Option<String>,
    dead_letter: String,
    max_deliveries: usize,
    claim_idle: Duration,
    batch: usize,
    block: Duration,
}

impl QueueWorkerBuilder {
    /// The stream to consume (default [`DEFAULT_STREAM`]).
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = stream.into();
        self
    }

    /// The consumer group (default [`DEFAULT_GROUP`]); created, from the start of the stream,
    /// if missing.
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

    /// The dead-letter stream (default [`DEFAULT_DEAD_LETTER_STREAM`]).
    pub fn dead_letter_stream(mut self, stream: impl Into<String>) -> Self {
        self.dead_letter = stream.into();
        self
    }

    /// Deliveries after which a failing event is dead-lettered (default
    /// [`DEFAULT_MAX_DELIVERIES`]; at least 1).
    pub fn max_deliveries(mut self, n: usize) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// How long an event stays pending with a consumer before another takes it over, and
    /// before a failed event is tried again (default [`DEFAULT_CLAIM_IDLE`]).
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Events read per round trip (default [`DEFAULT_BATCH`]).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// How long one read waits for new events (default [`DEFAULT_BLOCK`]); also how often
    /// idle pending events are looked for when the stream is quiet.
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block.max(Duration::from_millis(1));
        self
    }

    /// Connects and builds the worker.
    pub async fn build(self) -> Result<QueueWorker, QueueError> {
        let conn = connection(&self.url, self.block + RESPONSE_MARGIN).await?;
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
            dead_letter: self.dead_letter,
            max_deliveries: self.max_deliveries,
            claim_idle: self.claim_idle,
            batch: self.batch,
            block: self.block,
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
    /// Attempts that failed (the event stayed pending, or was dead-lettered).
    pub failed_attempts: u64,
    /// Events moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Events taken over from idle consumers (a crashed worker, or a failed earlier attempt).
    pub reclaimed: u64,
}

/// Applies invalidation events from a stream. See the [module docs](self).
pub struct QueueWorker {
    conn: ConnectionManager,
    stream: String,
    group: String,
    consumer: String,
    dead_letter: String,
    max_deliveries: usize,
    claim_idle: Duration,
    batch: usize,
    block: Duration,
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
            .field("max_deliveries", &self.max_deliveries)
            .field("claim_idle", &self.claim_idle)
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

impl QueueWorker {
    /// A builder for a worker on the Redis at `url`, with the defaults.
    pub fn builder(url: impl Into<String>) -> QueueWorkerBuilder {
        QueueWorkerBuilder {
            url: url.into(),
            stream: DEFAULT_STREAM.to_owned(),
            group: DEFAULT_GROUP.to_owned(),
            consumer: None,
            dead_letter: DEFAULT_DEAD_LETTER_STREAM.to_owned(),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            claim_idle: DEFAULT_CLAIM_IDLE,
            batch: DEFAULT_BATCH,
            block: DEFAULT_BLOCK,
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
    /// wait for new events is cut short. Redis errors are logged and retried with backoff;
    /// only a failure to create the consumer group at the start is returned.
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
            let step = self
                .step(
                    &target,
                    &mut shutdown,
                    &mut report,
                    &mut own_pending,
                    &mut claim_cursor,
                )
                .await;
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
            .arg(u64::try_from(self.claim_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(claim_cursor.as_str())
            .arg("COUNT")
            .arg(self.batch)
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
            entries = self.read(">", Some(self.block)) => entries?,
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
            .arg(self.batch);
        if let Some(block) = block {
            cmd.arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX));
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
            if deliveries > self.max_deliveries {
                let why = self
                    .last_errors
                    .remove(&entry.id)
                    .unwrap_or_else(|| "delivered too many times".to_owned());
                self.dead_letter(&entry, deliveries, &why).await?;
                report.dead_lettered += 1;
                continue;
            }
            let result = target
                .invalidate_many(
                    &event.tenant,
                    &[event.dep_id.as_str()],
                    event.new_hash.as_deref(),
                )
                .await
                .pop();
            match result {
                Some(r) if r.ok => {
                    let _: i64 = redis::cmd("XACK")
                        .arg(&self.stream)
                        .arg(&self.group)
                        .arg(&entry.id)
                        .query_async(&mut self.conn)
                        .await?;
                    self.last_errors.remove(&entry.id);
                    report.applied += 1;
                }
                other => {
                    report.failed_attempts += 1;
                    let why = other
                        .and_then(|r| r.error)
                        .unwrap_or_else(|| "no result".to_owned());
                    tracing::warn!(target: "cachecore::queue", id = %entry.id, tenant = %event.tenant,
                        dep_id = %event.dep_id, deliveries, error = %why, "invalidation event failed");
                    if deliveries >= self.max_deliveries {
                        self.dead_letter(&entry, deliveries, &why).await?;
                        report.dead_lettered += 1;
                    } else {
                        // Left pending: tried again once it has been idle for `claim_idle`.
                        self.last_errors.insert(entry.id.clone(), why);
                    }
                }
            }
        }
        Ok(())
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
