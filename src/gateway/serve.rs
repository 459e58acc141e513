//! Runs a [`Gateway`] on a TCP listener: connection limit, request-head timeout, graceful
//! shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::heads::{HeadWatch, Watched, WatchedBody};
use super::Gateway;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The gateway as one connection's hyper service: called by shared reference, so a request
/// clones nothing of the gateway. Tells the connection's [`HeadWatch`] when a head is in and
/// when its response is written.
struct Connection {
    gateway: Gateway,
    heads: Arc<HeadWatch>,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Connection {
    type Response = http::Response<WatchedBody>;
    type Error = std::convert::Infallible;
    type Future = Watched;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Watched {
        self.heads.serving();
        Watched {
            response: self.gateway.dispatch(req),
            watch: Some(Arc::clone(&self.heads)),
        }
    }
}

/// What a connection's task holds until it ends, however it ends (its watchdog aborts it when
/// no head comes in time): its slot, its count in the metrics, and its watchdog.
struct Open {
    gateway: Gateway,
    heads: Arc<HeadWatch>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.heads.close();
        self.gateway.metrics().connections.dec();
    }
}

/// How [`serve`] runs. Each default's docs say where its number comes from.
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct ServeOptions {
    max_connections: usize,
    header_read_timeout: Duration,
    shutdown_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            shutdown_timeout: Self::DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

impl ServeOptions {
    /// Client connections open at once by default. Past it the gateway stops accepting until
    /// one closes (callers queue in the kernel's backlog). With the upstream's sockets
    /// ([`DEFAULT_UPSTREAM_MAX_INFLIGHT`](super::DEFAULT_UPSTREAM_MAX_INFLIGHT) in flight,
    /// [`DEFAULT_UPSTREAM_POOL_MAX_IDLE`](super::DEFAULT_UPSTREAM_POOL_MAX_IDLE) idle) this stays
    /// under the 1024 open files most systems allow a process by default.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

    /// Longest time a client may take to send a request head by default (hyper's default for
    /// the same bound): what keeps a client that trickles bytes (slowloris), or an idle
    /// kept-alive connection, from holding a connection slot.
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

    /// Longest wait, after a shutdown signal, for in-flight requests and streams to finish by
    /// default: under the 30 s an orchestrator (Kubernetes' default grace period, systemd's
    /// default stop timeout is longer) waits before it kills the process, with a margin for
    /// stopping the queue worker and exiting.
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);

    /// Client connections open at once (at least 1).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Longest time a client may take to send a request head, counted from the accept and
    /// from the end of each response; the connection is closed then. Not counted while a
    /// request is served, however long its upstream call or its stream takes. A zero timeout
    /// closes each connection before its first request (the gateway binary refuses it).
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Longest wait after the shutdown signal for in-flight requests (streams included) to
    /// finish; connections still open then are closed.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }
}

/// What [`serve`] did, once it returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServeReport {
    /// Connections accepted.
    pub connections: u64,
    /// Connections still open when the shutdown began.
    pub open_at_shutdown: usize,
    /// Connections closed at the shutdown bound with a request still running (0 when every
    /// in-flight request finished in time).
    pub cut: usize,
}

/// First pause after a failed `accept` (out of file descriptors, typically), doubled up to
/// [`MAX_ACCEPT_BACKOFF`]: gives connections time to close instead of spinning.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `gateway` on `listener` (HTTP/1.1) until `shutdown` completes, then shuts down
/// gracefully:
///
/// 1. `/health` answers `503 {"status":"draining"}` (for a load balancer that still has a
///    kept-alive connection) and the listener is closed: new connections are refused;
/// 2. idle connections are closed; a connection with a request in flight finishes that request,
///    its response body to the end (a stream included), and then closes;
/// 3. whatever is still open after [`shutdown_timeout`](ServeOptions::shutdown_timeout) is
///    closed, and counted in [`ServeReport::cut`].
///
/// ```no_run
/// # async fn run(gateway: cachecore::gateway::Gateway) -> std::io::Result<()> {
/// use cachecore::gateway::{serve, ServeOptions};
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// let report = serve(listener, gateway, ServeOptions::default(), async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await;
/// println!("{report:?}");
/// # Ok(()) }
/// ```
pub async fn serve<F>(
    listener: TcpListener,
    gateway: Gateway,
    options: ServeOptions,
    shutdown: F,
) -> ServeReport
where
    F: Future<Output = ()> + Send,
{
    let mut report = ServeReport::default();
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut connections = JoinSet::new();
    let mut backoff = MIN_ACCEPT_BACKOFF;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                backoff = MIN_ACCEPT_BACKOFF;
                stream
            }
            Err(e) => {
                gateway.metrics().connections_refused.inc();
                tracing::warn!(target: "cachecore::gateway", error = %e, retry_in = ?backoff,
                    "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut shutdown => break,
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        report.connections += 1;
        let heads = HeadWatch::accepted();
        let service = Connection {
            gateway: gateway.clone(),
            heads: Arc::clone(&heads),
        };
        // No hyper timer: the head timeout is the connection's watchdog (heads.rs), which
        // costs a request no timer of its own.
        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        gateway.metrics().connections.inc();
        let open = Open {
            gateway: gateway.clone(),
            heads: Arc::clone(&heads),
            _slot: slot,
        };
        let task = connections.spawn(async move {
            let _open = open;
            if let Err(e) = conn.await {
                tracing::debug!(target: "cachecore::gateway", error = %e, "connection ended with an error");
            }
        });
        heads.watch(task, options.header_read_timeout);
    }

    gateway.start_draining();
    drop(listener);
    while connections.try_join_next().is_some() {}
    report.open_at_shutdown = connections.len();
    tracing::info!(target: "cachecore::gateway", open = report.open_at_shutdown,
        bound = ?options.shutdown_timeout, "shutting down: no new connections; finishing in-flight requests");
    if tokio::time::timeout(options.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        report.cut = connections.len();
        tracing::warn!(target: "cachecore::gateway", cut = report.cut,
            "shutdown bound reached; closing connections with requests still running");
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
    report
}
