//! Aids for your own integration tests: read what the cache did with a response, record the
//! outcome of every request a stack served, and look inside a [`MemoryStore`].
//!
//! Behind the `test-util` feature (add it to your dev-dependencies); it pulls no dependency:
//! it is a few functions and one small layer.
//!
//! ```
//! use cachecore::testing::{cache_status, OutcomeRecorder};
//! use cachecore::{CacheStatus, CachecoreLayer, MemoryStore};
//! use http_body_util::BodyExt;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = MemoryStore::new();
//! let outcomes = OutcomeRecorder::new();
//! let mut svc = ServiceBuilder::new()
//!     .layer(outcomes.layer())
//!     .layer(CachecoreLayer::builder().store(store.clone()).build())
//!     .service(service_fn(|_req: http::Request<_>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::from("answer")))
//!     }));
//!
//! for _ in 0..2 {
//!     let req = http::Request::post("/v1/chat").body(String::from("{}")).unwrap();
//!     let res = svc.ready().await.unwrap().call(req).await.unwrap();
//!     assert!(cache_status(&res).is_some());
//!     // A miss is stored when its body has been read to the end.
//!     res.into_body().collect().await.unwrap();
//! }
//! assert_eq!(outcomes.statuses(), [CacheStatus::Miss, CacheStatus::Hit]);
//! assert_eq!(store.entry_count(), 1);
//! # }
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use http::{HeaderMap, Method, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{CacheKey, CacheStatus, MemoryStore, X_CACHE};

/// Anything that carries what the cache did: a response, or its head.
///
/// Implemented for `http::Response<B>`, `http::response::Parts` and (feature `reqwest`)
/// `reqwest::Response`.
pub trait CacheStatusOf {
    /// The [`CacheStatus`] extension the layer set, or else the parsed `X-Cache` header (a
    /// response that crossed a real connection keeps only the header).
    fn cache_status(&self) -> Option<CacheStatus>;
}

fn from_parts(extensions: &http::Extensions, headers: &HeaderMap) -> Option<CacheStatus> {
    extensions.get::<CacheStatus>().copied().or_else(|| {
        headers
            .get(X_CACHE)
            .and_then(|v| v.to_str().ok())
            .and_then(CacheStatus::from_header)
    })
}

impl<T: CacheStatusOf + ?Sized> CacheStatusOf for &T {
    fn cache_status(&self) -> Option<CacheStatus> {
        (**self).cache_status()
    }
}

impl<B> CacheStatusOf for Response<B> {
    fn cache_status(&self) -> Option<CacheStatus> {
        from_parts(self.extensions(), self.headers())
    }
}

impl CacheStatusOf for http::response::Parts {
    fn cache_status(&self) -> Option<CacheStatus> {
        from_parts(&self.extensions, &self.headers)
    }
}

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl CacheStatusOf for ::reqwest::Response {
    fn cache_status(&self) -> Option<CacheStatus> {
        from_parts(self.extensions(), self.headers())
    }
}

/// What the cache did with `res` (see [`CacheStatusOf`]); `None` when it never saw it.
pub fn cache_status<R: CacheStatusOf + ?Sized>(res: &R) -> Option<CacheStatus> {
    res.cache_status()
}

/// Asserts what the cache did with a response: `assert_cache_status!(res, CacheStatus::Hit)`.
///
/// Works on anything [`CacheStatusOf`](crate::testing::CacheStatusOf) is implemented for; an
/// optional message follows, as with `assert_eq!`.
///
/// ```
/// use cachecore::{assert_cache_status, CacheStatus};
/// let res = http::Response::builder().header("x-cache", "HIT_L1").body(()).unwrap();
/// assert_cache_status!(res, CacheStatus::Hit);
/// assert_cache_status!(&res, CacheStatus::Hit, "second call must hit");
/// ```
#[macro_export]
macro_rules! assert_cache_status {
    ($res:expr, $expected:expr $(,)?) => {
        $crate::assert_cache_status!($res, $expected, "")
    };
    ($res:expr, $expected:expr, $($msg:tt)+) => {{
        let actual = $crate::testing::cache_status(&$res);
        let expected: $crate::CacheStatus = $expected;
        assert!(
            actual == Some(expected),
            "cache status: expected {}, got {}. {}",
            expected,
            actual.map_or("none (the cache did not see this response)", $crate::CacheStatus::as_str),
            format_args!($($msg)+),
        );
    }};
}

/// One request a stack served, as [`OutcomeRecorder`] saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The request method.
    pub method: Method,
    /// The request path and query.
    pub path: String,
    /// What the cache did; `None` while the response is pending, when the inner service failed,
    /// or when the cache never saw the request.
    pub status: Option<CacheStatus>,
}

/// Records the [`Outcome`] of every request, in the order the requests were made.
///
/// Put [`layer`](Self::layer) outside the cache layer (`ServiceBuilder` lists outer layers
/// first), keep the recorder, and assert on [`statuses`](Self::statuses) after the calls. Clones
/// share one log. With the `reqwest` feature it is also a reqwest-middleware `Middleware`: put it
/// before [`CachecoreMiddleware`](crate::reqwest::CachecoreMiddleware) in the chain.
#[derive(Clone, Default)]
pub struct OutcomeRecorder {
    log: Arc<Mutex<Vec<Outcome>>>,
}

impl fmt::Debug for OutcomeRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutcomeRecorder")
            .field("outcomes", &*self.lock())
            .finish()
    }
}

impl OutcomeRecorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tower layer that records into this recorder.
    pub fn layer(&self) -> OutcomeLayer {
        OutcomeLayer {
            recorder: self.clone(),
        }
    }

    /// Every outcome so far, in request order.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.lock().clone()
    }

    /// The cache status of every finished request, in request order (pending or failed
    /// requests are left out).
    pub fn statuses(&self) -> Vec<CacheStatus> {
        self.lock().iter().filter_map(|o| o.status).collect()
    }

    /// How many requests ended with `status`.
    pub fn count(&self, status: CacheStatus) -> usize {
        self.lock()
            .iter()
            .filter(|o| o.status == Some(status))
            .count()
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Outcome>> {
        // A test that panicked mid-push should still be able to print the log.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a slot for a request; the response fills it.
    fn start(&self, method: &Method, uri: &http::Uri) -> Slot {
        let mut log = self.lock();
        log.push(Outcome {
            method: method.clone(),
            path: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned()),
            status: None,
        });
        Slot {
            recorder: self.clone(),
            index: log.len() - 1,
        }
    }
}

struct Slot {
    recorder: OutcomeRecorder,
    index: usize,
}

impl Slot {
    fn fill(self, status: Option<CacheStatus>) {
        if let Some(o) = self.recorder.lock().get_mut(self.index) {
            o.status = status;
        }
    }
}

/// The layer of an [`OutcomeRecorder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct OutcomeLayer {
    recorder: OutcomeRecorder,
}

impl<S> Layer<S> for OutcomeLayer {
    type Service = RecordOutcome<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecordOutcome {
            inner,
            recorder: self.recorder.clone(),
        }
    }
}

/// The service [`OutcomeLayer`] builds.
#[derive(Clone, Debug)]
pub struct RecordOutcome<S> {
    inner: S,
    recorder: OutcomeRecorder,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RecordOutcome<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = OutcomeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let slot = self.recorder.start(req.method(), req.uri());
        OutcomeFuture {
            fut: self.inner.call(req),
            slot: Some(slot),
        }
    }
}

pin_project! {
    /// Response future of [`RecordOutcome`].
    pub struct OutcomeFuture<F> {
        #[pin]
        fut: F,
        slot: Option<Slot>,
    }
}

impl<F> fmt::Debug for OutcomeFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutcomeFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for OutcomeFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.fut.poll(cx));
        if let Some(slot) = this.slot.take() {
            slot.fill(out.as_ref().ok().and_then(cache_status));
        }
        Poll::Ready(out)
    }
}

#[cfg(feature = "reqwest")]
impl reqwest_middleware::Middleware for OutcomeRecorder {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        req: ::reqwest::Request,
        extensions: &'life1 mut http::Extensions,
        next: reqwest_middleware::Next<'life2>,
    ) -> Pin<
        Box<
            dyn Future<Output = reqwest_middleware::Result<::reqwest::Response>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let uri: http::Uri = req.url().as_str().parse().unwrap_or_default();
            let slot = self.start(req.method(), &uri);
            let res = next.run(req, extensions).await;
            slot.fill(res.as_ref().ok().and_then(cache_status));
            res
        })
    }
}

/// The dep ids recorded on each entry of `store` (the policy dep included), one set per entry,
/// in no particular order. Handy to check that no entry picked up a dep it should not have.
pub fn dep_sets(store: &MemoryStore) -> Vec<BTreeSet<String>> {
    store
        .entries()
        .into_iter()
        .map(|(_, entry)| entry.deps.iter().map(|(id, _)| id.to_owned()).collect())
        .collect()
}

/// The key of the one entry whose body is `body`, if exactly one has it. Tests usually make
/// every upstream answer distinct, so this finds the entry a given request wrote; pass the key
/// to [`MemoryStore::deps_of`].
pub fn key_of_body(store: &MemoryStore, body: &[u8]) -> Option<CacheKey> {
    let mut found = store
        .entries()
        .into_iter()
        .filter(|(_, e)| e.body.as_ref() == body)
        .map(|(k, _)| k);
    let key = found.next()?;
    found.next().is_none().then_some(key)
}

/// Milliseconds since the Unix epoch, now: the clock entries' `stored_at_ms` is read on, for
/// tests that build an [`Entry`](crate::Entry) by hand.
pub fn now_ms() -> u64 {
    crate::store::now_ms()
}
