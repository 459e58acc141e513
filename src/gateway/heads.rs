//! The request-head timeout of [`serve`](super::serve): a connection that has not sent a whole
//! request head within `header_read_timeout` of the server starting to wait for one (since it
//! was accepted, or since its last response ended) is closed. That is what keeps a client that
//! trickles bytes (slowloris), or that just sits on an idle kept-alive connection, from holding
//! a connection slot.
//!
//! hyper has this built in once it is given a timer, but arms a new timer for every request
//! head: an allocation, an insertion into the runtime's timer wheel and a removal from it, and
//! a heavier dispatch loop: about 2,200 instructions of a 35,000-instruction gateway hit
//! (README, "Issue 12, sixth pass"). Here a request costs two stores and a clock read:
//!
//! - [`HeadWatch`] records, per connection, since when a head has been awaited: from the accept,
//!   and again from the moment a response's body is dropped (hyper drops it once written);
//!   nothing while a request is being served, however long its upstream call or its stream.
//! - A watchdog task per connection sleeps until the earliest moment the wait could be over,
//!   and then either closes the connection (aborts its task) or sleeps again until the deadline
//!   the record gives now. Every wake-up comes no later than the true deadline, so the bound is
//!   exact (to the timer's millisecond), and a busy connection wakes its watchdog once per
//!   timeout, not once per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{GatewayBody, ResponseFuture};
use crate::deadline::after;
use crate::edge::BoxError;

/// Since when one connection has awaited a request head, if it does.
pub(super) struct HeadWatch {
    /// The accept.
    base: Instant,
    /// Nanoseconds after `base`, plus one, since which a head has been awaited; 0 while a
    /// request is served.
    awaiting_since: AtomicU64,
    /// The connection's task has ended: the watchdog stops.
    closed: AtomicBool,
    /// The watchdog, stopped when the connection ends.
    watchdog: OnceLock<AbortHandle>,
}

impl HeadWatch {
    /// A connection accepted now: its first head is awaited from now.
    pub(super) fn accepted() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            awaiting_since: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            watchdog: OnceLock::new(),
        })
    }

    /// A request head is in: the connection is serving it.
    pub(super) fn serving(&self) {
        self.awaiting_since.store(0, Ordering::Release);
    }

    /// The response is written: the next head is awaited from now.
    fn awaiting(&self) {
        let since = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.awaiting_since.store(since + 1, Ordering::Release);
    }

    fn awaiting_since(&self) -> Option<Instant> {
        match self.awaiting_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(self.base + Duration::from_nanos(since - 1)),
        }
    }

    /// Starts the watchdog of the connection whose task `conn` is: it aborts that task once a
    /// head has been awaited for `timeout`. Must run inside a Tokio runtime.
    pub(super) fn watch(self: &Arc<Self>, conn: AbortHandle, timeout: Duration) {
        let watchdog = tokio::spawn(watchdog(Arc::clone(self), conn, timeout));
        let _ = self.watchdog.set(watchdog.abort_handle());
        // The connection may have ended before the handle was set.
        if self.closed.load(Ordering::Acquire) {
            watchdog.abort();
        }
    }

    /// The connection's task has ended (called from its drop guard, so an aborted task calls it
    /// too).
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(watchdog) = self.watchdog.get() {
            watchdog.abort();
        }
    }
}

async fn watchdog(watch: Arc<HeadWatch>, conn: AbortHandle, timeout: Duration) {
    let sleep = tokio::time::sleep_until(after(watch.base, timeout));
    tokio::pin!(sleep);
    loop {
        sleep.as_mut().await;
        if watch.closed.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let next = match watch.awaiting_since() {
            Some(since) if after(since, timeout) <= now => {
                tracing::debug!(target: "cachecore::gateway", ?timeout,
                    "no request head within the head timeout: closing the connection");
                conn.abort();
                return;
            }
            Some(since) => after(since, timeout),
            // Serving: the wait starts after now, so it cannot end before now + timeout.
            None => after(now, timeout),
        };
        sleep.as_mut().reset(next);
    }
}

/// The response future of one request on a watched connection: its body, once dropped, starts
/// the wait for the next head.
pub(super) struct Watched {
    pub(super) response: ResponseFuture,
    pub(super) watch: Option<Arc<HeadWatch>>,
}

impl Future for Watched {
    type Output = Result<http::Response<WatchedBody>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = match Pin::new(&mut self.response).poll(cx) {
            Poll::Ready(Ok(res)) => res,
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => return Poll::Pending,
        };
        let watch = self.watch.take();
        Poll::Ready(Ok(res.map(|body| WatchedBody { body, watch })))
    }
}

/// A response body that, dropped (hyper drops it once written, or when the connection goes),
/// marks its connection as awaiting the next head.
pub(super) struct WatchedBody {
    body: GatewayBody,
    watch: Option<Arc<HeadWatch>>,
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.awaiting();
        }
    }
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection task that never ends by itself, watched with `timeout`.
    fn watched(timeout: Duration) -> (Arc<HeadWatch>, tokio::task::JoinHandle<()>) {
        let watch = HeadWatch::accepted();
        let conn = tokio::spawn(std::future::pending::<()>());
        watch.watch(conn.abort_handle(), timeout);
        (watch, conn)
    }

    /// Lets `d` pass on the paused clock, and the woken tasks run.
    async fn pass(d: Duration) {
        tokio::time::sleep(d).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Checks that `conn` is still open 10 ms before `timeout` from now, and aborted 10 ms
    /// after.
    async fn closed_after(conn: tokio::task::JoinHandle<()>, timeout: Duration) {
        pass(timeout - Duration::from_millis(10)).await;
        assert!(!conn.is_finished(), "closed before the timeout");
        pass(Duration::from_millis(20)).await;
        assert!(conn.await.unwrap_err().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_head_is_closed_at_the_timeout_and_not_before() {
        let (_watch, conn) = watched(Duration::from_secs(30));
        closed_after(conn, Duration::from_secs(30)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_served_for_longer_than_the_timeout_keeps_its_connection() {
        let (watch, conn) = watched(Duration::from_secs(30));
        pass(Duration::from_secs(10)).await;
        watch.serving();
        pass(Duration::from_secs(100)).await;
        assert!(!conn.is_finished(), "closed while serving");
        // The response ends: the next head is awaited from now, for the whole timeout.
        watch.awaiting();
        closed_after(conn, Duration::from_secs(30)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn each_response_restarts_the_wait() {
        let (watch, conn) = watched(Duration::from_secs(30));
        for _ in 0..10 {
            pass(Duration::from_secs(20)).await;
            watch.serving();
            watch.awaiting();
        }
        assert!(!conn.is_finished());
        closed_after(conn, Duration::from_secs(30)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_stops_with_its_connection() {
        let (watch, conn) = watched(Duration::from_secs(30));
        let watchdog = watch.watchdog.get().unwrap().clone();
        conn.abort();
        watch.close();
        pass(Duration::ZERO).await;
        assert!(watchdog.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_too_long_to_add_never_closes_and_never_panics() {
        let (_watch, conn) = watched(Duration::MAX);
        pass(Duration::from_secs(10 * 365 * 24 * 3600)).await;
        assert!(!conn.is_finished());
    }

    #[tokio::test]
    async fn a_dropped_body_starts_the_wait_and_a_body_is_passed_through() {
        use http_body_util::BodyExt;
        let watch = HeadWatch::accepted();
        watch.serving();
        let response = ResponseFuture(Box::pin(std::future::ready(Ok(http::Response::new(
            http_body_util::Full::new(Bytes::from_static(b"answer"))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )))));
        let res = Watched {
            response,
            watch: Some(Arc::clone(&watch)),
        }
        .await
        .unwrap();
        assert_eq!(res.body().size_hint().exact(), Some(6));
        assert_eq!(watch.awaiting_since(), None, "still serving");
        let body = res.into_body();
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"answer");
        assert!(watch.awaiting_since().is_some());
    }
}
