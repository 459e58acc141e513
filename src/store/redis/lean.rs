//! The lookup's own connections to a single Redis: a small pool of plain connections, each
//! used by one lookup at a time, that write the `MGET` and read its reply without the `redis`
//! crate's multiplexer (docs/design.md §7, "Lookup connections").
//!
//! Through the crate, a hit's `MGET` went over a channel to the multiplexed connection's task,
//! came back through a oneshot, was parsed into a `redis::Value` (the entry copied out of the
//! read buffer) under two timers: about 14,000 instructions a hit, the largest share of what a
//! Redis hit costs over an in-memory one. Here a lookup takes an idle connection, writes the
//! command from a buffer the connection keeps, reads the reply into the connection's buffer and
//! hands the entry on as a slice of it (no copy), then gives the connection back.
//!
//! - **Bounded.** At most [`MAX_OPEN`] connections are open; a lookup that finds none idle and
//!   the bound reached goes through the store's shared connection instead, as before, so no
//!   lookup waits for a connection.
//! - **Cancel-safe.** A connection goes back to the pool only after a complete exchange; a
//!   lookup dropped half-way (its timeout) closes its connection, whose reply may still come.
//! - **A failure retires them all.** A broken connection (an I/O error, a reply that is not
//!   RESP, the server gone) bumps the pool's generation, and every idle connection of an older
//!   generation is closed instead of used: after a Redis restart one lookup fails (open), not
//!   one per pooled connection.
//! - **Same server, same settings.** It connects where the store's URL says (TCP or a Unix
//!   socket), authenticates with the URL's user and password and selects its database, each
//!   only when the URL sets it, so the commands Redis counts for a hit stay one `MGET`. A TLS
//!   URL keeps every lookup on the shared connection.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::timeout_error;
use crate::store::{StoreError, StoreErrorKind};

/// Most connections the pool keeps open (idle or in use by a lookup).
pub(super) const MAX_OPEN: usize = 32;

/// Longest bulk string a reply may announce: Redis's own ceiling (`proto-max-bulk-len`).
const MAX_BULK: usize = 512 * 1024 * 1024;

/// Longest `+`/`-` line read before the reply is refused as not RESP.
const MAX_LINE: usize = 64 * 1024;

/// Most elements an array reply may announce (an `MGET` of the entry and its deps).
const MAX_ITEMS: usize = 1 << 20;

/// Bytes read at a time when the reply's length is not known yet.
const READ_CHUNK: usize = 4096;

/// Where the pool connects.
#[derive(Debug)]
enum Addr {
    Tcp(String, u16),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

/// The pool of lookup connections. Cloning shares it.
#[derive(Clone)]
pub(super) struct Lean {
    inner: Arc<Inner>,
}

struct Inner {
    addr: Addr,
    /// `AUTH` and `SELECT` as the URL asks, sent on every new connection, and how many replies
    /// they answer.
    hello: Vec<u8>,
    hello_replies: usize,
    connect_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    /// Connections open: idle ones and those a lookup holds.
    open: AtomicUsize,
    /// Raised by every broken connection; idle connections of an older one are closed.
    generation: AtomicU64,
}

enum Stream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

struct Conn {
    stream: Stream,
    /// What is read and not yet handed on.
    buf: BytesMut,
    /// The command being written; kept, so writing one allocates nothing.
    out: Vec<u8>,
    /// Where each element of the last array reply lies in `buf`.
    items: Vec<Option<Range<usize>>>,
    generation: u64,
}

/// A reply to one command, as far as the pool reads replies.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply {
    /// A simple string or an integer (`+OK`, `:1`).
    Simple,
    /// An error reply, with its text.
    Error(String),
    /// A bulk string, or nil.
    Bulk(Option<Bytes>),
    /// An array of bulk strings and nils (an `MGET` reply).
    Array(Vec<Option<Bytes>>),
}

/// Why a read buffer does not hold a reply the pool reads.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct NotResp(&'static str);

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

impl Lean {
    /// A pool for the Redis `info` describes, or `None` when it is reached over TLS (the
    /// shared connection then serves every lookup).
    pub(super) fn new(info: &ConnectionInfo, connect_timeout: Duration) -> Option<Self> {
        let addr = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Addr::Tcp(host.clone(), *port),
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
            _ => return None,
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
            inner: Arc::new(Inner {
                addr,
                hello,
                hello_replies,
                connect_timeout,
                idle: Mutex::new(Vec::new()),
                open: AtomicUsize::new(0),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// A connection for one command: an idle one, or a slot for a new one while fewer than
    /// [`MAX_OPEN`] are open. `None` when every connection is busy.
    pub(super) fn checkout(&self) -> Option<Checkout> {
        let current = self.inner.generation.load(Ordering::Acquire);
        loop {
            let conn = self.inner.lock_idle().pop();
            match conn {
                Some(conn) if conn.generation == current => {
                    return Some(Checkout {
                        pool: Arc::clone(&self.inner),
                        conn: Some(conn),
                        done: false,
                    });
                }
                // Opened before a connection broke: it may be broken too.
                Some(stale) => self.inner.close(stale),
                None => break,
            }
        }
        let reserved = self
            .inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < MAX_OPEN).then_some(open + 1)
            });
        reserved.ok().map(|_| Checkout {
            pool: Arc::clone(&self.inner),
            conn: None,
            done: false,
        })
    }

    /// Connections open now (idle or in use).
    #[cfg(test)]
    fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }
}

impl Inner {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        // The vector stays consistent whatever panicked while it was held.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self, conn: Conn) {
        drop(conn);
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    async fn connect(&self) -> Result<Conn, StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        let stream = tokio::time::timeout(self.connect_timeout, self.open_stream())
            .await
            .map_err(|_| timeout_error("connecting to Redis"))?
            .map_err(|e| backend("connecting to Redis", &e))?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(256),
            items: Vec::new(),
            generation,
        };
        if self.hello_replies > 0 {
            conn.out.extend_from_slice(&self.hello);
            for _ in 0..self.hello_replies {
                // Only the first exchange writes; the rest read the following replies.
                match conn.exchange().await? {
                    Reply::Simple => {}
                    Reply::Error(e) => {
                        return Err(StoreError::new(
                            StoreErrorKind::Backend,
                            format!("setting up a Redis connection: {e}"),
                        ))
                    }
                    _ => return Err(not_resp("setting up a Redis connection")),
                }
            }
        }
        Ok(conn)
    }

    async fn open_stream(&self) -> io::Result<Stream> {
        match &self.addr {
            Addr::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
            #[cfg(unix)]
            Addr::Unix(path) => Ok(Stream::Unix(tokio::net::UnixStream::connect(path).await?)),
        }
    }
}

/// One connection of the pool held for one command; dropped before the command completes, it
/// closes the connection.
pub(super) struct Checkout {
    pool: Arc<Inner>,
    conn: Option<Conn>,
    done: bool,
}

impl Checkout {
    /// Whether the command will open a new connection (the pool's first, one more under
    /// load, or one after a break).
    pub(super) fn connects(&self) -> bool {
        self.conn.is_none()
    }

    /// Sends the command `write` appends (with [`write_array`] and [`write_arg`]) and reads its
    /// reply. The connection goes back to the pool after any complete reply, error replies
    /// included; anything else breaks it and retires the pool's other idle connections.
    pub(super) async fn query(
        mut self,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Reply, StoreError> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            slot @ None => slot.insert(self.pool.connect().await?),
        };
        conn.out.clear();
        write(&mut conn.out);
        match conn.exchange().await {
            Ok(reply) => {
                self.done = true;
                Ok(reply)
            }
            Err(e) => {
                self.pool.generation.fetch_add(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        match self.conn.take() {
            Some(conn)
                if self.done && conn.generation == self.pool.generation.load(Ordering::Acquire) =>
            {
                self.pool.lock_idle().push(conn);
            }
            Some(conn) => self.pool.close(conn),
            // A slot reserved for a connection that was never made.
            None => {
                self.pool.open.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Conn {
    /// Writes `out` (if not empty) and reads one reply.
    async fn exchange(&mut self) -> Result<Reply, StoreError> {
        if !self.out.is_empty() {
            let written = match &mut self.stream {
                Stream::Tcp(s) => s.write_all(&self.out).await,
                #[cfg(unix)]
                Stream::Unix(s) => s.write_all(&self.out).await,
            };
            self.out.clear();
            written.map_err(|e| backend("writing to Redis", &e))?;
        }
        loop {
            match frame(&self.buf, &mut self.items).map_err(|e| not_resp(e.0))? {
                Frame::Complete { len, kind } => {
                    let reply = self.buf.split_to(len).freeze();
                    return Ok(match kind {
                        Kind::Simple => Reply::Simple,
                        Kind::Error(at) => {
                            Reply::Error(String::from_utf8_lossy(&reply[at]).into_owned())
                        }
                        Kind::Bulk(at) => Reply::Bulk(at.map(|at| reply.slice(at))),
                        Kind::Array => Reply::Array(
                            self.items
                                .drain(..)
                                .map(|at| at.map(|at| reply.slice(at)))
                                .collect(),
                        ),
                    });
                }
                Frame::Incomplete(more) => {
                    self.buf.reserve(more.max(READ_CHUNK));
                    let read = match &mut self.stream {
                        Stream::Tcp(s) => read_some(s, &mut self.buf).await,
                        #[cfg(unix)]
                        Stream::Unix(s) => read_some(s, &mut self.buf).await,
                    };
                    read.map_err(|e| backend("reading from Redis", &e))?;
                }
            }
        }
    }
}

async fn read_some(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    buf: &mut BytesMut,
) -> io::Result<()> {
    match stream.read_buf(buf).await? {
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "Redis closed the connection",
        )),
        _ => Ok(()),
    }
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
    fn a_tls_url_keeps_lookups_on_the_shared_connection() {
        let tls = info("redis://127.0.0.1:6380/").set_addr(ConnectionAddr::TcpTls {
            host: "127.0.0.1".into(),
            port: 6380,
            insecure: false,
            tls_params: None,
        });
        assert!(Lean::new(&tls, Duration::from_secs(1)).is_none());
        let lean =
            Lean::new(&info("redis://127.0.0.1:1/"), Duration::from_secs(1)).expect("plain TCP");
        // No `AUTH` or `SELECT` unless the URL asks for them.
        assert!(lean.inner.hello.is_empty());
        let lean = Lean::new(&info("redis://u:p@127.0.0.1:1/3"), Duration::from_secs(1)).unwrap();
        assert_eq!(
            lean.inner.hello,
            b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$1\r\np\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"
        );
        assert_eq!(lean.inner.hello_replies, 2);
    }

    #[test]
    fn no_more_than_max_open_connections_are_handed_out() {
        let lean = Lean::new(&info("redis://127.0.0.1:1/"), Duration::from_secs(1)).unwrap();
        let held: Vec<Checkout> = (0..MAX_OPEN).map_while(|_| lean.checkout()).collect();
        assert_eq!(held.len(), MAX_OPEN);
        assert!(lean.checkout().is_none());
        drop(held);
        // Slots reserved for connections never made are given back.
        assert_eq!(lean.open(), 0);
        assert!(lean.checkout().is_some());
    }

    /// Property tests of the reply reader, a decoder of what comes off the socket.
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
