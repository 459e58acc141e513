//! The lookups' own multiplexed connection to a single Redis over plain TCP: one socket, one
//! I/O task that writes every pending `MGET` at once and reads every complete reply at once,
//! without the `redis` crate's multiplexer (docs/design.md §7, "Lookup connection").
//!
//! Through the crate, a hit's `MGET` went over a channel to the connection manager's task, came
//! back through a oneshot and was parsed into a `redis::Value` (the entry copied out of the read
//! buffer): about 12,000 instructions a hit. Connections of one lookup each (tried in `e26b17a`)
//! saved those but paid a write, a read and a wake-up per lookup, and lost in wall clock; this
//! keeps the batching:
//!
//! - **One queue, one lock.** A lookup appends its encoded command to the shared out-buffer and
//!   its completion slot to the FIFO of waiters under the same short lock, so the order of the
//!   bytes is the order of the waiters, and wakes the I/O task only when the buffer was empty.
//! - **One task owns the socket.** It swaps the out-buffer for an empty one and writes it whole
//!   (the lookups of c=32 in one system call), reads whatever has arrived and completes the
//!   waiters of every complete reply in order, each with slices of the read buffer (no copy).
//! - **Woken, it yields once before writing.** tokio runs a task woken from a worker next, on
//!   that worker: the I/O task, woken by the first lookup of a batch, would write that lookup
//!   alone and be woken again by the next (0.73 `send` calls per gateway hit at c=32). Yielding
//!   once lets the tasks the worker has ready queue their lookups first (0.14 `send` per hit,
//!   the gateway's Redis hits 7% faster; README, "Issue 12, eighth pass"). A lone lookup pays
//!   for the extra turn of the scheduler (2,500 instructions at c=1); yielding only when other
//!   lookups were in flight, or the last batch held several, saved that and lost 1.5–2% at c=32
//!   in three same-run A/Bs, so it always yields.
//! - **Cancel-safe.** A lookup given up on (its timeout, a dropped future) leaves its bytes to be
//!   written and its reply to be read and dropped, in order; nothing else moves.
//! - **One timer per connection, not one per lookup.** Each waiter carries its deadline (the
//!   store's timeout from when it was queued). A sweeper task sleeps until the oldest live
//!   waiter's deadline and fails every waiter past its own with a timeout, leaving its place in
//!   the FIFO for its reply to be dropped. Deadlines only grow along the FIFO, so the sweeper
//!   stops at the first live one, and with nothing waiting it sleeps one timeout: no lookup
//!   waits past its deadline by more than the timer's millisecond. A tokio timeout around each
//!   lookup cost a timer registration and removal per hit (about 1,100 instructions).
//! - **A break fails the waiters.** An I/O error, the server closing, or a reply that is not
//!   RESP ends the task and fails every waiter (the layer fails open); the next lookup starts a
//!   new task, which first pings the store's other connections so they notice the restart too.
//! - **Same server, same settings.** It connects where the store's URL says, authenticates with
//!   the URL's user and password and selects its database, each only when the URL sets it, so a
//!   hit stays one `MGET` in Redis's command counts. TLS and Unix-socket URLs (and Redis
//!   Cluster) keep every lookup on the shared connection.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis::{ConnectionAddr, ConnectionInfo};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{timeout_error, Conn};
use crate::deadline::after;
use crate::store::{StoreError, StoreErrorKind};

/// Longest bulk string a reply may announce: Redis's own ceiling (`proto-max-bulk-len`).
const MAX_BULK: usize = 512 * 1024 * 1024;

/// Longest `+`/`-` line read before the reply is refused as not RESP.
const MAX_LINE: usize = 64 * 1024;

/// Most elements an array reply may announce (an `MGET` of the entry and its deps).
const MAX_ITEMS: usize = 1 << 20;

/// Bytes the read buffer makes room for at a time (the replies of a c=32 batch of 1 KiB
/// entries fit in one read).
const READ_CHUNK: usize = 64 * 1024;

/// Least free room in the read buffer before a read.
const MIN_ROOM: usize = 4096;

/// Most lookups waiting on the connection; past it a lookup fails at once (the layer fails
/// open) rather than queueing behind a Redis that stopped answering.
const MAX_WAITERS: usize = 1 << 16;

/// The elements of an `MGET` reply: bulk strings (slices of the read buffer) and nils.
pub(super) type Items = Vec<Option<Bytes>>;

type Answer = Result<Items, StoreError>;

/// The lookups' connection. Cloning shares it.
#[derive(Clone)]
pub(super) struct Lean {
    shared: Arc<Shared>,
}

struct Shared {
    host: String,
    port: u16,
    /// `AUTH` and `SELECT` as the URL asks, written first on every new socket, and how many
    /// replies they answer.
    hello: Vec<u8>,
    hello_replies: usize,
    connect_timeout: Duration,
    /// How long a lookup waits for its reply, from when it is queued.
    timeout: Duration,
    /// Pinged before a reconnection (the store's other connections; see [`Lean::new`]).
    others: Vec<Conn>,
    queue: Mutex<Queue>,
    /// Wakes the I/O task: the out-buffer went from empty to non-empty.
    wake: Notify,
    /// Writes to the socket so far (the batching test counts them).
    #[cfg(test)]
    writes: std::sync::atomic::AtomicUsize,
}

struct Queue {
    /// Commands not yet taken by the I/O task, in the order of `waiters`' tail.
    out: Vec<u8>,
    /// One per command written or to be written whose reply has not been read, oldest first.
    /// A waiter whose receiver is gone, or whose sender the sweeper took, is a lookup given up
    /// on: its reply is dropped.
    waiters: VecDeque<Waiter>,
    /// Whether an I/O task is running (connecting or connected).
    running: bool,
    /// I/O tasks started so far: the first connects, the later ones reconnect.
    started: u64,
}

/// A lookup waiting for its reply.
struct Waiter {
    /// `None` once the sweeper has failed it with a timeout.
    tx: Option<oneshot::Sender<Answer>>,
    deadline: Instant,
}

impl Waiter {
    fn answer(self, answer: Answer) {
        if let Some(tx) = self.tx {
            // A lookup given up on has no receiver: its answer is dropped here.
            let _ = tx.send(answer);
        }
    }
}

impl Lean {
    /// The connection for the Redis `info` describes, or `None` unless it is reached over plain
    /// TCP (the shared connection then serves every lookup). `others` are the store's other
    /// connections to the same Redis: a reconnection pings them first, as the lookups no longer
    /// go through them to find out about a restart.
    pub(super) fn new(
        info: &ConnectionInfo,
        connect_timeout: Duration,
        timeout: Duration,
        others: Vec<Conn>,
    ) -> Option<Self> {
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return None;
        };
        let settings = info.redis_settings();
        let mut hello = Vec::new();
        let mut hello_replies = 0;
        if let Some(password) = settings.password() {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = settings.username() {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            write_command(&mut hello, &args);
            hello_replies += 1;
        }
        if settings.db() != 0 {
            let db = settings.db().to_string();
            write_command(&mut hello, &[b"SELECT", db.as_bytes()]);
            hello_replies += 1;
        }
        Some(Self {
            shared: Arc::new(Shared {
                host: host.clone(),
                port: *port,
                hello,
                hello_replies,
                connect_timeout,
                timeout,
                others,
                queue: Mutex::new(Queue {
                    out: Vec::with_capacity(4096),
                    waiters: VecDeque::new(),
                    running: false,
                    started: 0,
                }),
                wake: Notify::new(),
                #[cfg(test)]
                writes: Default::default(),
            }),
        })
    }

    /// Connects now, unless it is connected or connecting already. Called when the store is
    /// built, so that the connection is up before a restart of Redis can break it: a
    /// reconnection (which pings the store's other connections) then follows the restart,
    /// whichever connection the first lookup after it goes over.
    pub(super) fn start(&self) {
        let nth = {
            let mut queue = self.shared.lock();
            if queue.running {
                return;
            }
            queue.running = true;
            queue.started += 1;
            queue.started
        };
        tokio::spawn(run(Arc::clone(&self.shared), nth));
    }

    /// Sends the command `write` appends (with [`write_array`] and [`write_arg`]; one command,
    /// whose reply is an array of bulk strings and nils) and waits for its reply. Dropped
    /// before the reply comes, the command still goes out and its reply is read and dropped.
    pub(super) async fn query(&self, write: impl FnOnce(&mut Vec<u8>)) -> Answer {
        let (tx, rx) = oneshot::channel();
        let deadline = after(Instant::now(), self.shared.timeout);
        let (start, wake) = {
            let mut queue = self.shared.lock();
            if queue.waiters.len() >= MAX_WAITERS {
                return Err(StoreError::new(
                    StoreErrorKind::Backend,
                    "too many lookups waiting on Redis",
                ));
            }
            let was_empty = queue.out.is_empty();
            write(&mut queue.out);
            queue.waiters.push_back(Waiter {
                tx: Some(tx),
                deadline,
            });
            if queue.running {
                (None, was_empty)
            } else {
                queue.running = true;
                queue.started += 1;
                (Some(queue.started), false)
            }
        };
        if let Some(nth) = start {
            tokio::spawn(run(Arc::clone(&self.shared), nth));
        } else if wake {
            self.shared.wake.notify_one();
        }
        match rx.await {
            Ok(answer) => answer,
            // Not expected: the task answers every waiter, with a reply or when it ends.
            Err(_) => Err(StoreError::new(
                StoreErrorKind::Backend,
                "the lookup connection's task ended",
            )),
        }
    }

    /// Lookups waiting on the connection now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.shared.lock().waiters.len()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every change under the lock leaves the queue consistent, whatever panicked.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connect(&self) -> Result<TcpStream, StoreError> {
        // Nagle's algorithm stays on (as on the crate's connections): under load a write made
        // while an earlier one is unacknowledged waits for Redis's reply, which carries the
        // acknowledgement, and goes out with the lookups queued meanwhile. With TCP_NODELAY the
        // gateway served fewer Redis hits (README, "Issue 12, fourth pass").
        tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| timeout_error("connecting to Redis"))?
        .map_err(|e| backend("connecting to Redis", &e))
    }

    /// Before a reconnection: a `PING` on each of the store's other connections, so that one
    /// broken by the same restart reconnects now rather than fail the next put or
    /// invalidation. Its outcome is not the lookups'.
    async fn ping_others(&self) {
        let ping = redis::cmd("PING");
        for conn in &self.others {
            let _ =
                tokio::time::timeout(self.connect_timeout, conn.query::<redis::Value>(&ping)).await;
        }
    }
}

/// The I/O task: drives one socket until it breaks, then fails every waiter and marks the
/// connection down, so the next lookup starts another.
async fn run(shared: Arc<Shared>, nth: u64) {
    let mut ended = Ended {
        shared: Arc::clone(&shared),
        why: None,
        sweeper: tokio::spawn(sweep(Arc::clone(&shared))).abort_handle(),
    };
    if nth > 1 {
        shared.ping_others().await;
    }
    let Err(broke) = drive(&shared).await;
    ended.why = Some(broke);
}

/// Ends an I/O task, however it ends: a broken socket, or the runtime shutting down and
/// dropping the task (without this, the connection would count as running forever, and every
/// later lookup would wait for its timeout).
struct Ended {
    shared: Arc<Shared>,
    why: Option<StoreError>,
    /// The task's sweeper, stopped with it.
    sweeper: AbortHandle,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.sweeper.abort();
        let waiters = {
            let mut queue = self.shared.lock();
            queue.running = false;
            queue.out.clear();
            std::mem::take(&mut queue.waiters)
        };
        let (kind, why) = match &self.why {
            Some(e) => (e.kind(), e.message()),
            None => (
                StoreErrorKind::Backend,
                "the lookup connection's runtime shut down",
            ),
        };
        tracing::debug!(
            error = why,
            failed = waiters.len(),
            "cachecore: Redis lookup connection ended"
        );
        for waiter in waiters {
            waiter.answer(Err(StoreError::new(kind, why)));
        }
    }
}

/// Connects, then writes what is queued and reads what comes until the socket breaks.
async fn drive(shared: &Shared) -> Result<std::convert::Infallible, StoreError> {
    let stream = shared.connect().await?;
    // Being written: the hello first, then what the lookups queued, taken whole.
    let mut pending = shared.hello.clone();
    let mut written = 0;
    let mut hello_left = shared.hello_replies;
    let mut read = BytesMut::with_capacity(READ_CHUNK);
    let mut ranges = Vec::new();
    let mut answers: Vec<Answer> = Vec::new();
    let mut finished = Vec::new();
    loop {
        // Read everything that has come, then frame every complete reply in it.
        let mut need = 0;
        loop {
            let room = need.max(MIN_ROOM);
            if read.capacity() - read.len() < room {
                read.reserve(room.max(READ_CHUNK));
            }
            match stream.try_read_buf(&mut read) {
                Ok(0) => {
                    return Err(StoreError::new(
                        StoreErrorKind::Backend,
                        "Redis closed the lookup connection",
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(backend("reading from Redis", &e)),
            }
            need = take_replies(&mut read, &mut ranges, &mut answers, &mut hello_left)?;
        }
        // Hand the answers out and take what was queued meanwhile, under one lock; wake the
        // lookups outside it.
        if !answers.is_empty() || written == pending.len() {
            {
                let mut queue = shared.lock();
                if queue.waiters.len() < answers.len() {
                    return Err(not_resp("a reply no lookup waits for"));
                }
                if written == pending.len() {
                    pending.clear();
                    written = 0;
                    std::mem::swap(&mut queue.out, &mut pending);
                }
                finished.extend(queue.waiters.drain(..answers.len()));
            }
            for (waiter, answer) in finished.drain(..).zip(answers.drain(..)) {
                waiter.answer(answer);
            }
        }
        // Write as much as the socket takes now.
        while written < pending.len() {
            match stream.try_write(&pending[written..]) {
                Ok(n) => {
                    written += n;
                    #[cfg(test)]
                    shared
                        .writes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(backend("writing to Redis", &e)),
            }
        }
        let unwritten = written < pending.len();
        if !unwritten && !pending.is_empty() {
            // Written whole: take the next batch before sleeping, if one came meanwhile.
            pending.clear();
            written = 0;
            let mut queue = shared.lock();
            std::mem::swap(&mut queue.out, &mut pending);
            if !pending.is_empty() {
                continue;
            }
        }
        tokio::select! {
            ready = stream.readable() => ready.map_err(|e| backend("reading from Redis", &e))?,
            ready = stream.writable(), if unwritten => {
                ready.map_err(|e| backend("writing to Redis", &e))?;
            }
            () = shared.wake.notified(), if !unwritten => {
                // Woken by the first lookup of a batch: let the tasks the worker has ready run
                // first, so that their lookups join the batch (one `send` for all of them).
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Fails, with a timeout, every waiter past its deadline, for as long as its I/O task runs
/// (module docs).
async fn sweep(shared: Arc<Shared>) {
    let sleep = tokio::time::sleep(shared.timeout);
    tokio::pin!(sleep);
    let mut expired = Vec::new();
    loop {
        sleep.as_mut().await;
        let now = Instant::now();
        let next = {
            let mut queue = shared.lock();
            let mut next = None;
            for waiter in queue.waiters.iter_mut().filter(|w| w.tx.is_some()) {
                if waiter.deadline > now {
                    next = Some(waiter.deadline);
                    break;
                }
                expired.extend(waiter.tx.take());
            }
            next
        };
        for tx in expired.drain(..) {
            let _ = tx.send(Err(timeout_error("waiting for Redis")));
        }
        // Nothing waiting: a lookup queued from now on has its deadline a timeout from now
        // or later.
        sleep
            .as_mut()
            .reset(next.unwrap_or_else(|| after(now, shared.timeout)));
    }
}

/// Frames every complete reply at the front of `read` into `answers` (after the `hello_left`
/// replies to the hello, which must be simple strings); answers how many more bytes the next
/// reply needs at least.
fn take_replies(
    read: &mut BytesMut,
    ranges: &mut Vec<Option<Range<usize>>>,
    answers: &mut Vec<Answer>,
    hello_left: &mut usize,
) -> Result<usize, StoreError> {
    loop {
        let (len, kind) = match frame(read, ranges).map_err(|e| not_resp(e.0))? {
            Frame::Incomplete(more) => return Ok(more),
            Frame::Complete { len, kind } => (len, kind),
        };
        let reply = read.split_to(len).freeze();
        if *hello_left > 0 {
            *hello_left -= 1;
            match kind {
                Kind::Simple => continue,
                Kind::Error(at) => {
                    return Err(StoreError::new(
                        StoreErrorKind::Backend,
                        format!(
                            "setting up a Redis connection: {}",
                            String::from_utf8_lossy(&reply[at])
                        ),
                    ))
                }
                _ => return Err(not_resp("setting up a Redis connection")),
            }
        }
        answers.push(match kind {
            Kind::Array => Ok(ranges
                .drain(..)
                .map(|at| at.map(|at| reply.slice(at)))
                .collect()),
            Kind::Error(at) => Err(StoreError::new(
                StoreErrorKind::Backend,
                String::from_utf8_lossy(&reply[at]).into_owned(),
            )),
            Kind::Simple | Kind::Bulk(_) => Err(StoreError::new(
                StoreErrorKind::Backend,
                "lookup reply: not an array",
            )),
        });
    }
}

/// Why a read buffer does not hold a reply the connection reads.
#[derive(Debug, PartialEq, Eq)]
struct NotResp(&'static str);

/// How far a read buffer holds one reply.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// The reply is not complete: at least this many more bytes are needed.
    Incomplete(usize),
    /// The reply takes the first `len` bytes.
    Complete { len: usize, kind: Kind },
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Simple,
    /// The message lies at this range.
    Error(Range<usize>),
    Bulk(Option<Range<usize>>),
    /// The elements' ranges were written to the caller's vector.
    Array,
}

fn backend(doing: &str, e: &io::Error) -> StoreError {
    StoreError::new(StoreErrorKind::Backend, format!("{doing}: {e}"))
}

fn not_resp(what: &str) -> StoreError {
    StoreError::new(
        StoreErrorKind::Backend,
        format!("Redis reply is not what a lookup reads: {what}"),
    )
}

/// Appends the header of a command of `args` arguments.
pub(super) fn write_array(out: &mut Vec<u8>, args: usize) {
    out.push(b'*');
    write_decimal(out, args);
    out.extend_from_slice(b"\r\n");
}

/// Appends one argument of `len` bytes, which `write` appends.
pub(super) fn write_arg(out: &mut Vec<u8>, len: usize, write: impl FnOnce(&mut Vec<u8>)) {
    out.push(b'$');
    write_decimal(out, len);
    out.extend_from_slice(b"\r\n");
    let start = out.len();
    write(out);
    debug_assert_eq!(out.len() - start, len, "an argument wrote another length");
    out.extend_from_slice(b"\r\n");
}

fn write_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    write_array(out, args.len());
    for arg in args {
        write_arg(out, arg.len(), |out| out.extend_from_slice(arg));
    }
}

fn write_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// How far `buf` holds one RESP2 reply of the kinds a lookup reads: a simple string, an
/// error, an integer, a bulk string or nil, or an array of bulk strings and nils (whose
/// elements' ranges go to `items`, cleared first).
fn frame(buf: &[u8], items: &mut Vec<Option<Range<usize>>>) -> Result<Frame, NotResp> {
    items.clear();
    let Some((head, at)) = line(buf, 0, MAX_LINE)? else {
        return Ok(Frame::Incomplete(1));
    };
    match head.first() {
        Some(b'+' | b':') => Ok(Frame::Complete {
            len: at,
            kind: Kind::Simple,
        }),
        Some(b'-') => Ok(Frame::Complete {
            len: at,
            kind: Kind::Error(1..at - 2),
        }),
        Some(b'$') => Ok(match bulk(buf, &head[1..], at)? {
            Err(more) => Frame::Incomplete(more),
            Ok((range, len)) => Frame::Complete {
                len,
                kind: Kind::Bulk(range),
            },
        }),
        Some(b'*') => {
            let n = number(&head[1..], MAX_ITEMS)?.ok_or(NotResp("a nil array"))?;
            let mut at = at;
            for _ in 0..n {
                let Some((head, next)) = line(buf, at, 32)? else {
                    return Ok(Frame::Incomplete(1));
                };
                if head.first() != Some(&b'$') {
                    return Err(NotResp("an array element that is not a bulk string"));
                }
                match bulk(buf, &head[1..], next)? {
                    Err(more) => return Ok(Frame::Incomplete(more)),
                    Ok((range, end)) => {
                        items.push(range);
                        at = end;
                    }
                }
            }
            Ok(Frame::Complete {
                len: at,
                kind: Kind::Array,
            })
        }
        _ => Err(NotResp("an unknown reply type")),
    }
}

/// The bulk string whose length line (after `$`) is `digits` and whose bytes start at `at`:
/// its range (`None` for nil) and where it ends, or how many more bytes it needs.
#[allow(clippy::type_complexity)]
fn bulk(
    buf: &[u8],
    digits: &[u8],
    at: usize,
) -> Result<Result<(Option<Range<usize>>, usize), usize>, NotResp> {
    let Some(len) = number(digits, MAX_BULK)? else {
        return Ok(Ok((None, at)));
    };
    let end = at + len + 2;
    if buf.len() < end {
        return Ok(Err(end - buf.len()));
    }
    if &buf[at + len..end] != b"\r\n" {
        return Err(NotResp("a bulk string longer than announced"));
    }
    Ok(Ok((Some(at..at + len), end)))
}

/// The line starting at `at` (without its CRLF) and where the next one starts; `None` while
/// its CRLF has not arrived. A line may be `max` bytes long.
fn line(buf: &[u8], at: usize, max: usize) -> Result<Option<(&[u8], usize)>, NotResp> {
    let rest = buf.get(at..).unwrap_or_default();
    let window = &rest[..rest.len().min(max + 2)];
    match memchr::memchr(b'\n', window) {
        Some(0) => Err(NotResp("an empty line")),
        Some(nl) if window[nl - 1] == b'\r' => Ok(Some((&rest[..nl - 1], at + nl + 1))),
        Some(_) => Err(NotResp("a bare line feed")),
        None if window.len() == rest.len() => Ok(None),
        None => Err(NotResp("an overlong line")),
    }
}

/// A length or count: decimal digits up to `max`, or `-1` (nil, as `None`).
fn number(digits: &[u8], max: usize) -> Result<Option<usize>, NotResp> {
    if digits == b"-1" {
        return Ok(None);
    }
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(NotResp("a length that is not a number"));
    }
    let n = digits
        .iter()
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    if n > max {
        return Err(NotResp("a length past the limit"));
    }
    Ok(Some(n))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    /// The RESP2 encoding of an array of bulk strings and nils.
    fn encode(items: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut out = Vec::new();
        write_array(&mut out, items.len());
        for item in items {
            match item {
                Some(bytes) => write_arg(&mut out, bytes.len(), |o| o.extend_from_slice(bytes)),
                None => out.extend_from_slice(b"$-1\r\n"),
            }
        }
        out
    }

    fn info(url: &str) -> ConnectionInfo {
        url.parse().expect("a redis URL")
    }

    /// A lookup connection to a server of the test's on `port`, lookups bounded by `timeout`.
    fn local(port: u16, timeout: Duration) -> Lean {
        let url = format!("redis://127.0.0.1:{port}/");
        Lean::new(&info(&url), Duration::from_secs(1), timeout, Vec::new()).unwrap()
    }

    /// The lookup the tests send.
    fn mget(out: &mut Vec<u8>) {
        write_command(out, &[b"MGET", b"k"]);
    }

    fn framed(buf: &[u8]) -> (Result<Frame, NotResp>, Vec<Option<Range<usize>>>) {
        let mut items = Vec::new();
        let frame = frame(buf, &mut items);
        (frame, items)
    }

    #[test]
    fn replies_a_lookup_reads_are_framed() {
        assert_eq!(
            framed(b"+OK\r\n").0,
            Ok(Frame::Complete {
                len: 5,
                kind: Kind::Simple
            })
        );
        assert_eq!(
            framed(b"-ERR wrong\r\nrest").0,
            Ok(Frame::Complete {
                len: 12,
                kind: Kind::Error(1..10)
            })
        );
        assert_eq!(
            framed(b"$3\r\nabc\r\n").0,
            Ok(Frame::Complete {
                len: 9,
                kind: Kind::Bulk(Some(4..7))
            })
        );
        assert_eq!(framed(b"$3\r\nab").0, Ok(Frame::Incomplete(3)));
        let (frame, items) = framed(b"*3\r\n$2\r\nab\r\n$-1\r\n$0\r\n\r\n");
        assert_eq!(
            frame,
            Ok(Frame::Complete {
                len: 23,
                kind: Kind::Array
            })
        );
        assert_eq!(items, vec![Some(8..10), None, Some(21..21)]);
        for bad in [
            &b"*-1\r\n"[..],
            b"*1\r\n:1\r\n",
            b"$3\r\nabcd\r\n",
            b"$x\r\n",
            b"\r\n",
            b"+a\nb",
            b"!3\r\nabc\r\n",
            b"$536870913\r\n",
        ] {
            assert!(framed(bad).0.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn commands_are_written_as_resp_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        write_command(&mut out, &[b"MGET", b"k", b""]);
        assert_eq!(out, b"*3\r\n$4\r\nMGET\r\n$1\r\nk\r\n$0\r\n\r\n");
        let mut big = Vec::new();
        write_decimal(&mut big, usize::MAX);
        assert_eq!(big, usize::MAX.to_string().as_bytes());
    }

    #[test]
    fn only_a_plain_tcp_url_gets_a_lookup_connection_with_the_urls_auth_and_database() {
        let second = Duration::from_secs(1);
        let tls = info("redis://127.0.0.1:6380/").set_addr(ConnectionAddr::TcpTls {
            host: "127.0.0.1".into(),
            port: 6380,
            insecure: false,
            tls_params: None,
        });
        assert!(Lean::new(&tls, second, second, Vec::new()).is_none());
        let unix = info("redis+unix:///tmp/redis.sock");
        assert!(Lean::new(&unix, second, second, Vec::new()).is_none());
        let lean =
            Lean::new(&info("redis://127.0.0.1:1/"), second, second, Vec::new()).expect("TCP");
        // No `AUTH` or `SELECT` unless the URL asks for them.
        assert!(lean.shared.hello.is_empty());
        let lean = Lean::new(
            &info("redis://u:p@127.0.0.1:1/3"),
            second,
            second,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            lean.shared.hello,
            b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$1\r\np\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"
        );
        assert_eq!(lean.shared.hello_replies, 2);
    }

    #[test]
    fn replies_in_one_read_complete_their_lookups_in_order_and_a_partial_one_waits() {
        let mut read = BytesMut::new();
        read.extend_from_slice(&encode(&[Some(b"one".to_vec()), None]));
        read.extend_from_slice(b"-ERR two\r\n");
        read.extend_from_slice(&encode(&[Some(b"three".to_vec())]));
        let partial = encode(&[Some(b"four".to_vec())]);
        read.extend_from_slice(&partial[..partial.len() - 3]);
        let (mut ranges, mut answers, mut hello) = (Vec::new(), Vec::new(), 0);
        let more = take_replies(&mut read, &mut ranges, &mut answers, &mut hello).unwrap();
        assert_eq!(more, 3);
        assert_eq!(read.len(), partial.len() - 3);
        assert_eq!(answers.len(), 3);
        let mut answers = answers.into_iter();
        assert_eq!(
            answers.next().unwrap().unwrap(),
            vec![Some(Bytes::from_static(b"one")), None]
        );
        assert_eq!(answers.next().unwrap().unwrap_err().message(), "ERR two");
        assert_eq!(
            answers.next().unwrap().unwrap(),
            vec![Some(Bytes::from_static(b"three"))]
        );
    }

    #[test]
    fn the_hellos_replies_come_before_any_lookups_and_a_refused_hello_breaks_the_connection() {
        let (mut ranges, mut answers) = (Vec::new(), Vec::new());
        let mut read = BytesMut::from(&b"+OK\r\n+OK\r\n*1\r\n$-1\r\n"[..]);
        let mut hello = 2;
        take_replies(&mut read, &mut ranges, &mut answers, &mut hello).unwrap();
        assert_eq!(hello, 0);
        assert_eq!(answers.len(), 1);
        let mut read = BytesMut::from(&b"-WRONGPASS invalid\r\n"[..]);
        let err = take_replies(&mut read, &mut ranges, &mut Vec::new(), &mut 1).unwrap_err();
        assert!(err.message().contains("WRONGPASS"), "{err}");
    }

    #[tokio::test]
    async fn nothing_listening_fails_the_waiting_lookups_and_leaves_none_queued() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let lean = local(port, Duration::from_secs(1));
        let (a, b) = tokio::join!(lean.query(mget), lean.query(mget));
        assert_eq!(a.unwrap_err().kind(), StoreErrorKind::Backend);
        assert_eq!(b.unwrap_err().kind(), StoreErrorKind::Backend);
        assert_eq!(lean.waiting(), 0);
        assert!(lean.query(mget).await.is_err());
    }

    /// A server that accepts and never answers: each lookup fails with a timeout at its own
    /// deadline (not at the first one's, nor never), and keeps its place for a reply.
    #[tokio::test]
    async fn a_silent_server_fails_each_lookup_at_its_own_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(socket);
        });
        let timeout = Duration::from_millis(150);
        let lean = local(port, timeout);
        let timed = |delay: Duration| {
            let lean = lean.clone();
            async move {
                tokio::time::sleep(delay).await;
                let started = Instant::now();
                let answer = lean.query(mget).await;
                (answer, started.elapsed())
            }
        };
        let both = async { tokio::join!(timed(Duration::ZERO), timed(Duration::from_millis(100))) };
        let (first, second) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the lookups are bounded");
        for (answer, waited) in [first, second] {
            assert_eq!(answer.unwrap_err().kind(), StoreErrorKind::Timeout);
            assert!(waited >= timeout, "failed early: {waited:?}");
            assert!(waited < timeout * 4, "failed late: {waited:?}");
        }
        // Both still hold their places: a reply that came now would be dropped, in order.
        assert_eq!(lean.waiting(), 2);
        server.abort();
    }

    /// A server that answers every `MGET` with one nil, whatever the reads' boundaries.
    fn nil_server() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let Ok((mut socket, _)) = listener.accept() else {
                return;
            };
            let finder = memchr::memmem::Finder::new(b"MGET");
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = socket.read(&mut buf) {
                // The last 3 bytes of the reads before: a name split across two reads is
                // found once (3 bytes cannot hold a whole one).
                let start = seen.len().saturating_sub(3);
                seen.drain(..start);
                seen.extend_from_slice(&buf[..n]);
                let reply = b"*1\r\n$-1\r\n".repeat(finder.find_iter(&seen).count());
                if socket.write_all(&reply).is_err() {
                    return;
                }
            }
        });
        port
    }

    /// Lookups started together on one worker go out in one write: the I/O task, woken by the
    /// first, lets the others queue theirs before it writes (without that, tokio runs the woken
    /// task next and each lookup was a `send` of its own).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn lookups_started_together_go_out_in_one_write() {
        let port = nil_server();
        let lean = local(port, Duration::from_secs(5));
        assert_eq!(lean.query(mget).await.unwrap(), vec![None]);
        let writes = || lean.shared.writes.load(Ordering::Relaxed);
        let before = writes();
        // Spawned from a task on the worker, the lookups queue on that worker and run in turn.
        let shared = lean.clone();
        let all = tokio::spawn(async move {
            let lookups: Vec<_> = (0..16)
                .map(|_| {
                    let lean = shared.clone();
                    tokio::spawn(async move { lean.query(mget).await })
                })
                .collect();
            for lookup in lookups {
                assert_eq!(lookup.await.unwrap().unwrap(), vec![None]);
            }
        });
        tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("the lookups are answered")
            .unwrap();
        let batches = writes() - before;
        assert!(batches <= 2, "16 lookups took {batches} writes");
    }

    mod prop {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        fn items() -> impl Strategy<Value = Vec<Option<Vec<u8>>>> {
            vec(proptest::option::of(vec(any::<u8>(), 0..64)), 0..6)
        }

        proptest! {
            #[test]
            fn every_array_reply_reads_back_and_every_prefix_is_incomplete(
                items in items(),
                tail in vec(any::<u8>(), 0..8),
            ) {
                let raw = encode(&items);
                let mut buf = raw.clone();
                buf.extend_from_slice(&tail);
                let (frame, ranges) = framed(&buf);
                prop_assert_eq!(frame, Ok(Frame::Complete { len: raw.len(), kind: Kind::Array }));
                let read: Vec<Option<Vec<u8>>> =
                    ranges.into_iter().map(|r| r.map(|r| buf[r].to_vec())).collect();
                prop_assert_eq!(read, items);
                for cut in 0..raw.len() {
                    let (frame, _) = framed(&raw[..cut]);
                    match frame {
                        Ok(Frame::Incomplete(more)) => prop_assert!(more >= 1 && cut + more <= raw.len()),
                        other => prop_assert!(false, "cut at {}: {:?}", cut, other),
                    }
                }
            }

            #[test]
            fn arbitrary_bytes_are_framed_within_the_buffer_or_refused(
                head in prop_oneof![Just(b"*".to_vec()), Just(b"$".to_vec()), Just(Vec::new())],
                bytes in vec(any::<u8>(), 0..200),
            ) {
                let mut buf = head;
                buf.extend_from_slice(&bytes);
                let (frame, ranges) = framed(&buf);
                if let Ok(Frame::Complete { len, .. }) = frame {
                    prop_assert!(len <= buf.len());
                    for r in ranges.into_iter().flatten() {
                        prop_assert!(r.end <= len);
                    }
                }
            }
        }
    }
}
