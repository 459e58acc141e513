//! The near cache: hot entries and dep versions kept in process, coherent with Redis through
//! server-assisted client-side caching (docs/design.md §7, "Near cache").
//!
//! - **One tracking connection** (RESP3, `CLIENT TRACKING ON`, default mode) does every lookup
//!   whose answer may be kept. Redis remembers the keys it read and, when one of them changes,
//!   expires or is evicted, pushes an `invalidate` message on that same connection; the
//!   connection's reader evicts the local copy as it reads the push. Puts and invalidations go
//!   through the store's ordinary connection, so every write keeps Redis's atomic checks.
//! - **A near hit** needs the entry and the version of every dep it records, all filled under
//!   the current tracking connection, the versions equal to the entry's, and a lease: a
//!   heartbeat `PING` sent less than [`LEASE`] ago answered. A `PONG` comes after every push
//!   Redis wrote before it, so even a connection that dies silently serves nothing older than
//!   the lease.
//! - **A lost connection** (a disconnection the reader sees, a heartbeat that fails) empties the
//!   near cache before anything else is served from it; the supervisor task connects a new one,
//!   and copies filled under the old one are never served again (each slot carries the
//!   generation of the connection it was filled under).
//! - **The reader has a thread of its own.** The tracking connection is opened on a
//!   single-threaded runtime that runs on a dedicated OS thread (named [`READER_THREAD`]), so its
//!   reader, and the eviction a push causes, runs as soon as the kernel has the push: not when
//!   the application's runtime gets round to it behind every busy request task (the
//!   cross-process window under load, docs/design.md §7). Commands on the connection are sent
//!   from any runtime; only reading its socket happens on that thread.
//! - **A push still in the socket stops near hits.** On a TCP connection the store keeps a
//!   second handle on the tracking socket. Before a near hit is served, it peeks at it (one
//!   non-blocking `recv`); unread bytes there (a push, or a reply the reader has not taken yet)
//!   send the lookup to Redis instead. So another process's invalidation stops near hits once
//!   Redis has written the push to this socket, whether or not the reader thread has been
//!   scheduled to read it: on an idle machine that wake-up alone can take milliseconds
//!   (docs/design.md §7, "the cross-process window"). A look that found nothing is trusted for
//!   [`PEEK_HOLDS`] (100 µs), so a busy store makes one such call per 100 µs, not one per hit;
//!   that is the most it adds to the window. On a Unix socket there is no peek, and the window
//!   is the reader's.
//! - **Fills never race an invalidation.** A fill snapshots the invalidation counters of its
//!   keys before it sends the `MGET`, and inserts only if none moved meanwhile; the check and the
//!   insert hold the same lock as every eviction, so a push handled while the reply was on its
//!   way is never overwritten by the older reply.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, PushKind, Value};

use super::{store_error, timeout_error, Version};
use crate::store::{now_ms, Entry, StoreError};

/// How often the supervisor pings the tracking connection (and retries a lost one).
pub(super) const HEARTBEAT: Duration = Duration::from_millis(100);

/// How long an answered heartbeat lets near copies be served: the bound on staleness when the
/// tracking connection dies without the process noticing (a silent network partition). Ten
/// heartbeats, so a busy runtime that runs the supervisor late does not stop near hits.
pub(super) const LEASE: Duration = Duration::from_secs(1);

/// How long a look at the tracking socket that found nothing unread is trusted: near hits within
/// it skip the system call. The most it adds to the cross-process window when the reader thread
/// is late (docs/design.md §7).
const PEEK_HOLDS: Duration = Duration::from_micros(100);

/// Invalidation counters; a key's counter is picked by its hash. More stripes, fewer fills
/// given up because an unrelated key shared a counter.
const STRIPES: usize = 1024;

/// Bookkeeping bytes per slot besides its key and value.
const SLOT_OVERHEAD: usize = 64;

/// The name of the thread that reads the tracking connection.
pub(super) const READER_THREAD: &str = "cachecore-near";

/// The client name of tracking connections, so an operator (or a test) can find them in
/// `CLIENT LIST`.
pub(super) const CLIENT_NAME: &str = "cachecore-near";

/// What a near slot holds.
#[derive(Clone)]
enum Held {
    Entry(Arc<NearEntry>),
    Version(Version),
}

/// A held entry, and the last time its dep versions were found held and equal to its own.
struct NearEntry {
    entry: Entry,
    /// The value of [`Shared::changes`] read just before a lookup found every dep version of
    /// this entry held at the entry's version; 0 until one did. While the counter still has
    /// that value, no version slot can have been dropped, replaced or filled since, so a hit
    /// skips looking them up again (docs/design.md §7, "Near cache").
    confirmed: AtomicU64,
}

#[derive(Clone)]
struct Slot {
    /// The tracking connection the copy was read on.
    gen: u64,
    held: Held,
}

impl Slot {
    fn weight(&self, key: &[u8]) -> u32 {
        let value = match &self.held {
            Held::Entry(e) => e.entry.weight(),
            Held::Version(_) => 16,
        };
        u32::try_from(key.len() + value + SLOT_OVERHEAD).unwrap_or(u32::MAX)
    }
}

/// The tracking connection of one generation.
#[derive(Clone)]
pub(super) struct Tracked {
    pub(super) conn: MultiplexedConnection,
    gen: u64,
    /// A second handle on its TCP socket, to see unread bytes; `None` on a Unix socket.
    probe: Option<Arc<Probe>>,
}

/// A second handle on the tracking connection's TCP socket (the same open socket, duplicated),
/// and the task that drives the connection. Dropping it (with the last clone of its
/// [`Tracked`]) stops the task and closes the socket: the duplicate would otherwise keep it
/// open.
struct Probe {
    socket: std::net::TcpStream,
    driver: tokio::task::AbortHandle,
}

impl Probe {
    /// Whether bytes have arrived that the connection's reader has not read: a push, a reply,
    /// or the end of the stream. Also true when the socket cannot be asked.
    fn unread(&self) -> bool {
        let mut byte = [0u8; 1];
        !matches!(self.socket.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.driver.abort();
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// Why the near cache does not answer a lookup (its answer is `Ok` with a copy of the held
/// entry, valid under the serving connection).
pub(super) enum NearMiss {
    /// Nothing to serve here: the lookup goes to Redis (and may fill the near cache).
    Absent,
    /// A copy is held, but the tracking socket has bytes the reader has not read yet (maybe an
    /// invalidation of it): ask Redis on the ordinary connection, whose answer is current,
    /// rather than behind those bytes on the tracking one.
    Unread,
}

/// The invalidation counters a fill saw before it sent its read.
pub(super) struct Snapshot {
    flushes: u64,
    stripes: Vec<(usize, u64)>,
}

/// The near cache of one [`RedisStore`](super::RedisStore) and its clones.
#[derive(Clone)]
pub(super) struct Near {
    shared: Arc<Shared>,
}

struct Shared {
    cache: Cache<Box<[u8]>, Slot, foldhash::quality::RandomState>,
    /// Held by every eviction and by each fill's check-and-insert, never across an await.
    gate: Mutex<()>,
    stripes: Box<[AtomicU64]>,
    /// Raised by every flush (lost connection, `FLUSHALL`), which every fill checks too.
    flushes: AtomicU64,
    /// Raised, under `gate`, after every change to the slots other than moka's own eviction
    /// for room: each eviction (a push, or this process's invalidation), each fill, each flush
    /// and each change of connection. Starts at 1, so a new [`NearEntry`] (0) is unconfirmed.
    /// An eviction for room needs no raise: the key stays tracked by Redis, so a later change
    /// still pushes, and that push raises it.
    changes: AtomicU64,
    /// The generation near copies may be served under; 0 while there is no tracking connection.
    live: AtomicU64,
    /// The highest generation known lost.
    lost: AtomicU64,
    next_gen: AtomicU64,
    /// Near copies may be served until this many nanoseconds after `base`.
    lease_until: AtomicU64,
    /// The tracking socket was last found without unread bytes this long (in nanoseconds after
    /// `base`) before [`PEEK_HOLDS`] ran out: until then, hits do not look again.
    quiet_until: AtomicU64,
    base: Instant,
    conn: Mutex<Option<Tracked>>,
    /// Tests only: invalidation pushes kept here instead of applied, while `Some`.
    held_pushes: Mutex<Option<Vec<PushInfo>>>,
    client: Client,
    reader: Reader,
    max_entry_bytes: usize,
    timeout: Duration,
    connect_timeout: Duration,
}

impl Near {
    /// A near cache of `max_bytes` on the Redis at `url`. Nothing is served from it until
    /// [`start`](Self::start) has connected the tracking connection.
    pub(super) fn new(
        url: &str,
        max_bytes: u64,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(store_error)?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(settings)).map_err(store_error)?;
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(weigh)
            .expire_after(SlotExpiry)
            .build_with_hasher(foldhash::quality::RandomState::default());
        let reader = Reader::start()?;
        Ok(Self {
            shared: Arc::new(Shared {
                cache,
                gate: Mutex::new(()),
                stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
                flushes: AtomicU64::new(0),
                changes: AtomicU64::new(1),
                live: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                next_gen: AtomicU64::new(0),
                lease_until: AtomicU64::new(0),
                quiet_until: AtomicU64::new(0),
                base: Instant::now(),
                conn: Mutex::new(None),
                held_pushes: Mutex::new(None),
                client,
                reader,
                // As in MemoryStore: one entry may take at most an eighth of the bound.
                max_entry_bytes: usize::try_from(max_bytes / 8).unwrap_or(usize::MAX),
                timeout,
                connect_timeout,
            }),
        })
    }

    /// Connects the tracking connection now.
    pub(super) async fn connect(&self) -> Result<(), StoreError> {
        self.shared.connect().await
    }

    /// Starts the supervisor task that keeps the tracking connection (and connects it, if
    /// [`connect`](Self::connect) was not called). Must run inside a Tokio runtime.
    pub(super) fn supervise(&self) {
        tokio::spawn(supervise(Arc::downgrade(&self.shared)));
    }

    /// The tracking connection, while there is one.
    pub(super) fn tracked(&self) -> Option<Tracked> {
        lock(&self.shared.conn).clone()
    }

    /// The generation near copies may be served under now, if any, and now (in nanoseconds
    /// after `base`).
    fn serving(&self) -> Option<(u64, u64)> {
        let s = &self.shared;
        let gen = s.live.load(Ordering::Acquire);
        let now = s.nanos(Instant::now());
        (gen != 0 && now < s.lease_until.load(Ordering::Acquire)).then_some((gen, now))
    }

    /// The entry under `entry_key` if it is held and every dep it records is held at the
    /// version the entry records, all under the serving connection, and no unread bytes wait on
    /// that connection's socket. `ver_key` writes the ver key of a dep id; `declared` are the dep
    /// ids the request declares. The versions are looked up once per entry and change of the
    /// slots ([`NearEntry::confirmed`]), not on every hit.
    pub(super) fn hit(
        &self,
        entry_key: &[u8],
        declared: &[&str],
        mut ver_key: impl FnMut(&str, &mut Vec<u8>),
    ) -> Result<Entry, NearMiss> {
        let Some((gen, now)) = self.serving() else {
            return Err(NearMiss::Absent);
        };
        let cache = &self.shared.cache;
        // Read before the slots: a change made after this read raises the counter past it.
        let changes = self.shared.changes.load(Ordering::Acquire);
        let held = match cache.get(entry_key) {
            Some(Slot {
                gen: g,
                held: Held::Entry(e),
            }) if g == gen => e,
            _ => return Err(NearMiss::Absent),
        };
        let entry = &held.entry;
        if entry.deps.iter().any(|(id, _)| !declared.contains(&id)) {
            return Err(NearMiss::Absent);
        }
        if held.confirmed.load(Ordering::Acquire) != changes {
            // Allocated by the first dep's key only: a hit on an entry without deps allocates
            // nothing.
            let mut buf = Vec::new();
            for (id, epoch, life) in entry.deps.iter_lives() {
                // A version key (`cc:{<tag>}:dep:ver:<id>`) is never longer than the entry's
                // key (`cc:{<tag>}:l1:<64 hex digits>`) plus the id: one allocation, no regrowth.
                buf.clear();
                buf.reserve(entry_key.len() + id.len());
                ver_key(id, &mut buf);
                match cache.get(buf.as_slice()) {
                    Some(Slot {
                        gen: g,
                        held: Held::Version(v),
                    }) if g == gen && v == (epoch, life) => {}
                    _ => return Err(NearMiss::Absent),
                }
            }
            held.confirmed.store(changes, Ordering::Release);
        }
        // Last, so only a hit pays for it.
        if self.unread(gen, now) {
            return Err(NearMiss::Unread);
        }
        Ok(entry.clone())
    }

    /// Whether the tracking connection of generation `gen` may have bytes its reader has not
    /// read (or is not the current one any more), `now` nanoseconds after `base`. A socket
    /// found empty counts as empty for [`PEEK_HOLDS`] after, so hits in quick succession share
    /// one system call.
    fn unread(&self, gen: u64, now: u64) -> bool {
        let s = &self.shared;
        if now < s.quiet_until.load(Ordering::Acquire) {
            return false;
        }
        let probe = match lock(&s.conn).as_ref() {
            Some(t) if t.gen == gen => t.probe.clone(),
            _ => return true,
        };
        match probe {
            Some(p) if p.unread() => true,
            _ => {
                let holds = u64::try_from(PEEK_HOLDS.as_nanos()).unwrap_or(u64::MAX);
                s.quiet_until
                    .fetch_max(now.saturating_add(holds), Ordering::AcqRel);
                false
            }
        }
    }

    /// The counters of `keys`, read before the fill's `MGET` is sent.
    pub(super) fn snapshot<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) -> Snapshot {
        let s = &self.shared;
        let flushes = s.flushes.load(Ordering::Acquire);
        let stripes = keys
            .map(|k| {
                let i = stripe(k);
                (i, s.stripes[i].load(Ordering::Acquire))
            })
            .collect();
        Snapshot { flushes, stripes }
    }

    /// Keeps what a lookup on the tracking connection `tracked` read, unless an invalidation
    /// of any of its keys (or a flush, or the loss of that connection) came in since
    /// `snapshot`: `versions` are `(ver key, version)` pairs; `entry` the served entry.
    pub(super) fn fill(
        &self,
        tracked: &Tracked,
        snapshot: &Snapshot,
        entry: Option<(Vec<u8>, Entry)>,
        versions: Vec<(Vec<u8>, Version)>,
    ) {
        let s = &self.shared;
        let _gate = lock(&s.gate);
        let unchanged = s.live.load(Ordering::Acquire) == tracked.gen
            && s.flushes.load(Ordering::Acquire) == snapshot.flushes
            && snapshot
                .stripes
                .iter()
                .all(|&(i, n)| s.stripes[i].load(Ordering::Acquire) == n);
        if !unchanged {
            return;
        }
        let gen = tracked.gen;
        for (key, version) in versions {
            let held = Held::Version(version);
            s.cache.insert(key.into_boxed_slice(), Slot { gen, held });
        }
        if let Some((key, entry)) = entry {
            if entry.weight() <= s.max_entry_bytes {
                let held = Held::Entry(Arc::new(NearEntry {
                    entry,
                    confirmed: AtomicU64::new(0),
                }));
                s.cache.insert(key.into_boxed_slice(), Slot { gen, held });
            }
        }
        // After the inserts (see `changes`).
        s.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops the local copies of `keys` (an invalidation made by this process, before it
    /// returns; or a push).
    pub(super) fn evict<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) {
        self.shared.evict(keys);
    }

    /// Tests only: while `hold`, invalidation pushes are kept instead of applied (the window
    /// of a slow push, made as long as a test needs); on release they are applied in order.
    pub(super) fn hold_pushes(&self, hold: bool) {
        let released = {
            let mut held = lock(&self.shared.held_pushes);
            if hold {
                held.get_or_insert_with(Vec::new);
                return;
            }
            held.take().unwrap_or_default()
        };
        for push in released {
            self.shared.apply(push);
        }
    }

    /// Tests only: blocks the reader's thread for `pause`, as a machine that has not scheduled
    /// it yet would; returns once it is blocked.
    pub(super) async fn stall_reader(&self, pause: Duration) {
        let (blocked, wait) = tokio::sync::oneshot::channel();
        self.shared.reader.runtime.spawn(async move {
            let _ = blocked.send(());
            std::thread::sleep(pause);
        });
        let _ = wait.await;
    }

    /// Bytes held now (after pending evictions have run).
    pub(super) fn weighted_size(&self) -> u64 {
        self.shared.cache.run_pending_tasks();
        self.shared.cache.weighted_size()
    }

    /// Slots held now (entries and versions).
    pub(super) fn slot_count(&self) -> u64 {
        self.shared.cache.run_pending_tasks();
        self.shared.cache.entry_count()
    }
}

impl Shared {
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    fn evict<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) {
        let _gate = lock(&self.gate);
        for key in keys {
            // The counter first: a fill that has not checked yet will see it.
            self.stripes[stripe(key)].fetch_add(1, Ordering::AcqRel);
            self.cache.invalidate(key);
        }
        // After the slots are gone: a hit that reads the new value finds them gone.
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    fn flush(&self) {
        let _gate = lock(&self.gate);
        self.flushes.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// The tracking connection of generation `gen` is gone: nothing filled under it is served
    /// again, and the supervisor connects a new one.
    fn lose(&self, gen: u64) {
        {
            let _gate = lock(&self.gate);
            self.lost.fetch_max(gen, Ordering::AcqRel);
            if self.live.load(Ordering::Acquire) == gen {
                self.live.store(0, Ordering::Release);
                self.lease_until.store(0, Ordering::Release);
                self.quiet_until.store(0, Ordering::Release);
            }
            self.flushes.fetch_add(1, Ordering::AcqRel);
            self.cache.invalidate_all();
            self.changes.fetch_add(1, Ordering::AcqRel);
        }
        let mut conn = lock(&self.conn);
        if conn.as_ref().is_some_and(|t| t.gen == gen) {
            *conn = None;
        }
    }

    /// Connects a tracking connection and makes it the serving one.
    async fn connect(self: &Arc<Self>) -> Result<(), StoreError> {
        let gen = self.next_gen.fetch_add(1, Ordering::AcqRel) + 1;
        let weak = Arc::downgrade(self);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(move |push: PushInfo| on_push(&weak, gen, push));
        let bound = self.connect_timeout.saturating_add(self.timeout);
        // Opened on the reader's runtime: the connection's reading task runs there.
        let client = self.client.clone();
        let opening = self
            .reader
            .runtime
            .spawn(async move { open(&client, config).await });
        let abort = opening.abort_handle();
        let (mut conn, probe) = match tokio::time::timeout(bound, opening).await {
            Ok(Ok(opened)) => opened.map_err(store_error)?,
            Ok(Err(e)) => {
                return Err(StoreError::new(
                    crate::StoreErrorKind::Backend,
                    format!("opening the tracking connection: {e}"),
                ))
            }
            Err(_) => {
                abort.abort();
                return Err(timeout_error(
                    "connecting the near cache's tracking connection",
                ));
            }
        };
        let sent = Instant::now();
        let mut setup = redis::pipe();
        setup
            .cmd("CLIENT")
            .arg("SETNAME")
            .arg(CLIENT_NAME)
            .ignore()
            .cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .ignore();
        tokio::time::timeout(self.timeout, setup.exec_async(&mut conn))
            .await
            .map_err(|_| timeout_error("turning tracking on"))?
            .map_err(store_error)?;
        let _gate = lock(&self.gate);
        if self.lost.load(Ordering::Acquire) >= gen {
            return Err(StoreError::new(
                crate::StoreErrorKind::Backend,
                "the tracking connection was lost while it was set up",
            ));
        }
        // Nothing filled under an earlier connection is served under this one.
        self.flushes.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        self.changes.fetch_add(1, Ordering::AcqRel);
        *lock(&self.conn) = Some(Tracked { conn, gen, probe });
        self.quiet_until.store(0, Ordering::Release);
        self.live.store(gen, Ordering::Release);
        self.extend_lease(sent);
        Ok(())
    }

    fn lease_end(&self) -> Instant {
        self.base + Duration::from_nanos(self.lease_until.load(Ordering::Acquire))
    }

    fn extend_lease(&self, sent: Instant) {
        self.lease_until
            .fetch_max(self.nanos(sent + LEASE), Ordering::AcqRel);
    }

    /// One heartbeat on `tracked`: an answer extends the lease; an error, or a timeout once the
    /// lease has run out, loses the connection.
    async fn heartbeat(&self, tracked: Tracked) {
        let sent = Instant::now();
        let mut conn = tracked.conn.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(self.timeout, ping.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {
                if self.live.load(Ordering::Acquire) == tracked.gen {
                    self.extend_lease(sent);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cachecore: near cache heartbeat failed; near cache emptied");
                self.lose(tracked.gen);
            }
            // A slow answer on a busy machine is not a lost connection: the lease stops near
            // hits meanwhile; only once it has run out is the connection replaced (one that
            // never answers again would otherwise be kept for ever).
            Err(_) if Instant::now() < self.lease_end() => {
                tracing::debug!("cachecore: near cache heartbeat timed out within the lease");
            }
            Err(_) => {
                tracing::warn!(
                    "cachecore: near cache heartbeat unanswered past the lease; near cache emptied"
                );
                self.lose(tracked.gen);
            }
        }
    }
}

/// Opens a tracking connection; on TCP with a [`Probe`] on its socket. Runs on the reader's
/// runtime, so the connection's reading task runs there.
async fn open(
    client: &Client,
    config: AsyncConnectionConfig,
) -> redis::RedisResult<(MultiplexedConnection, Option<Arc<Probe>>)> {
    let info = client.get_connection_info();
    let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        return Ok((conn, None));
    };
    let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
    // Small commands and pushes, where latency is the point.
    stream.set_nodelay(true)?;
    let socket = stream.into_std()?;
    // The same socket (a duplicated descriptor, non-blocking like the original).
    let probe = socket.try_clone()?;
    let stream = tokio::net::TcpStream::from_std(socket)?;
    let (conn, driver) =
        MultiplexedConnection::new_with_config(info.redis_settings(), stream, config).await?;
    let driver = tokio::spawn(driver).abort_handle();
    let probe = Probe {
        socket: probe,
        driver,
    };
    Ok((conn, Some(Arc::new(probe))))
}

/// The runtime of the tracking connection's reader, on a thread of its own; the thread ends
/// (and the connection's reading task with it) when this is dropped.
struct Reader {
    runtime: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Reader {
    fn start() -> Result<Self, StoreError> {
        let failed = |e: std::io::Error| {
            StoreError::new(
                crate::StoreErrorKind::Backend,
                format!("starting the near cache's reader thread: {e}"),
            )
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(failed)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(READER_THREAD.into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(failed)?;
        Ok(Self {
            runtime: handle,
            _stop: stop,
        })
    }
}

/// Handles one push of the tracking connection of generation `gen`, in its reader.
fn on_push(shared: &Weak<Shared>, gen: u64, push: PushInfo) -> Result<(), ()> {
    let shared = shared.upgrade().ok_or(())?;
    match push.kind {
        PushKind::Invalidate => {
            if let Some(held) = lock(&shared.held_pushes).as_mut() {
                held.push(push);
                return Ok(());
            }
            shared.apply(push);
        }
        PushKind::Disconnection => shared.lose(gen),
        _ => {}
    }
    Ok(())
}

impl Shared {
    /// Applies an `invalidate` push.
    fn apply(&self, push: PushInfo) {
        match push.data.first() {
            Some(Value::Array(keys)) => self.evict(keys.iter().filter_map(|k| match k {
                Value::BulkString(b) => Some(b.as_slice()),
                _ => None,
            })),
            // `FLUSHALL` / `FLUSHDB` (a nil), or a shape this code does not know: drop all.
            _ => self.flush(),
        }
    }
}

/// Keeps the tracking connection: pings it every [`HEARTBEAT`], connects a new one when it is
/// lost. Ends when the store is dropped.
async fn supervise(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let current = lock(&shared.conn).clone();
        match current {
            Some(tracked) => shared.heartbeat(tracked).await,
            None => {
                if let Err(e) = shared.connect().await {
                    tracing::warn!(error = %e, "cachecore: near cache tracking connection not established; lookups go to Redis");
                }
            }
        }
    }
}

/// moka's weigher signature takes the key type by reference.
#[allow(clippy::borrowed_box)]
fn weigh(key: &Box<[u8]>, slot: &Slot) -> u32 {
    slot.weight(key)
}

fn stripe(key: &[u8]) -> usize {
    (xxhash_rust::xxh3::xxh3_64(key) % STRIPES as u64) as usize
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Entries leave with their lifetime (fresh TTL plus stale window); versions stay until an
/// invalidation or the byte bound removes them.
struct SlotExpiry;

impl moka::Expiry<Box<[u8]>, Slot> for SlotExpiry {
    fn expire_after_create(
        &self,
        _key: &Box<[u8]>,
        slot: &Slot,
        _created_at: Instant,
    ) -> Option<Duration> {
        match &slot.held {
            Held::Entry(e) => {
                let age = Duration::from_millis(e.entry.age_ms(now_ms()));
                Some(e.entry.lifetime().saturating_sub(age))
            }
            Held::Version(_) => None,
        }
    }
}
