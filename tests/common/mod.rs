//! Test doubles for the core tests: a counting upstream, a gate, a channel body, broken stores.
#![allow(dead_code, unreachable_pub)]

pub mod watchdog;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use cachecore::store::StoreFuture;
use cachecore::{
    CacheKey, CacheStore, CachecoreLayer, DepInvalidated, Entry, Lookup, PutOutcome, RequestBody,
    StoreError, StoreErrorKind,
};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, Semaphore};
use tower::{Service, ServiceExt};

pub type Req = Request<RequestBody<Full<Bytes>>>;
pub type Res = Response<Full<Bytes>>;

/// A JSON chat-completions request body.
pub fn chat(body: &str) -> Request<Full<Bytes>> {
    post("/v1/chat/completions", body)
}

pub fn post(path: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap()
}

/// An upstream that counts calls and answers `call <n>: <request body>`, optionally waiting for
/// a gate and optionally with a fixed status / extra headers.
#[derive(Clone, Default)]
pub struct Upstream {
    pub calls: Arc<AtomicUsize>,
    pub gate: Option<Arc<Semaphore>>,
    pub started: Option<mpsc::UnboundedSender<usize>>,
    pub status: Option<StatusCode>,
    pub headers: Vec<(&'static str, &'static str)>,
}

impl Upstream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls wait for a permit of the returned semaphore; each call's number is sent on the
    /// returned channel when it starts.
    pub fn gated(mut self) -> (Self, Arc<Semaphore>, mpsc::UnboundedReceiver<usize>) {
        let gate = Arc::new(Semaphore::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        self.gate = Some(gate.clone());
        self.started = Some(tx);
        (self, gate, rx)
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    pub fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    pub async fn handle<B>(self, req: Request<B>) -> Result<Res, Infallible>
    where
        B: Body,
        B::Error: std::fmt::Debug,
    {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(tx) = &self.started {
            let _ = tx.send(n);
        }
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let text = format!(
            "call {n}: {} {} {}",
            parts.method,
            parts.uri,
            String::from_utf8_lossy(&body)
        );
        let mut res = Response::new(Full::new(Bytes::from(text)));
        *res.status_mut() = self.status.unwrap_or(StatusCode::OK);
        res.headers_mut()
            .insert("content-type", "text/plain".parse().unwrap());
        res.headers_mut()
            .insert("x-upstream-call", n.to_string().parse().unwrap());
        for (k, v) in &self.headers {
            res.headers_mut().insert(*k, v.parse().unwrap());
        }
        Ok(res)
    }
}

pub type Stack = cachecore::Cachecore<tower::util::BoxCloneSyncService<Req, Res, Infallible>>;

/// The layer around the upstream.
pub fn stack(layer: &CachecoreLayer, upstream: &Upstream) -> Stack {
    let up = upstream.clone();
    let inner = tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Req| {
        up.clone().handle(req)
    }));
    tower::Layer::layer(layer, inner)
}

/// What a caller sees of a response.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub status: StatusCode,
    pub x_cache: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send<S, B>(svc: &S, req: Request<Full<Bytes>>) -> Seen
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Seen {
        status: parts.status,
        x_cache: parts
            .headers
            .get("x-cache")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    }
}

/// A body fed by a channel: each item is one frame, sent when the test decides.
pub struct ChannelBody {
    pub rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

pub fn channel_body() -> (mpsc::Sender<Result<Bytes, std::io::Error>>, ChannelBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChannelBody { rx })
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }
}

/// A store whose every call fails.
#[derive(Debug, Default, Clone)]
pub struct FailingStore {
    pub calls: Arc<AtomicUsize>,
}

fn fail<T>(calls: &AtomicUsize) -> StoreFuture<'_, T>
where
    T: Send + 'static,
{
    calls.fetch_add(1, Ordering::SeqCst);
    Box::pin(async {
        Err(StoreError::new(
            StoreErrorKind::Backend,
            "connection refused",
        ))
    })
}

impl CacheStore for FailingStore {
    fn lookup<'a>(&'a self, _: &'a CacheKey, _: &'a [&'a str]) -> StoreFuture<'a, Lookup> {
        fail(&self.calls)
    }
    fn put<'a>(&'a self, _: &'a CacheKey, _: Entry) -> StoreFuture<'a, PutOutcome> {
        fail(&self.calls)
    }
    fn invalidate<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a str,
    ) -> StoreFuture<'a, DepInvalidated> {
        fail(&self.calls)
    }
}

/// A store that never answers.
#[derive(Debug, Default, Clone)]
pub struct SilentStore {
    pub calls: Arc<AtomicUsize>,
}

fn hang<T: Send + 'static>(calls: &AtomicUsize) -> StoreFuture<'_, T> {
    calls.fetch_add(1, Ordering::SeqCst);
    Box::pin(std::future::pending())
}

impl CacheStore for SilentStore {
    fn lookup<'a>(&'a self, _: &'a CacheKey, _: &'a [&'a str]) -> StoreFuture<'a, Lookup> {
        hang(&self.calls)
    }
    fn put<'a>(&'a self, _: &'a CacheKey, _: Entry) -> StoreFuture<'a, PutOutcome> {
        hang(&self.calls)
    }
    fn invalidate<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a str,
    ) -> StoreFuture<'a, DepInvalidated> {
        hang(&self.calls)
    }
}

/// A store that answers lookups at once ([`CacheStore::lookup_now`]) or only through
/// `lookup`, counting each, over a `MemoryStore`; `fail_now` makes each answer at once an error.
#[derive(Default, Clone)]
pub struct AtOnceStore {
    pub inner: cachecore::MemoryStore,
    pub answers_at_once: bool,
    pub fail_now: Arc<std::sync::atomic::AtomicBool>,
    pub now_calls: Arc<AtomicUsize>,
    pub later_calls: Arc<AtomicUsize>,
}

impl AtOnceStore {
    /// A store that answers every lookup at once.
    pub fn answering() -> Self {
        Self {
            answers_at_once: true,
            ..Self::default()
        }
    }
    pub fn now_calls(&self) -> usize {
        self.now_calls.load(Ordering::SeqCst)
    }
    pub fn later_calls(&self) -> usize {
        self.later_calls.load(Ordering::SeqCst)
    }
}

impl CacheStore for AtOnceStore {
    fn lookup<'a>(&'a self, key: &'a CacheKey, deps: &'a [&'a str]) -> StoreFuture<'a, Lookup> {
        self.later_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.lookup(key, deps)
    }
    fn lookup_now(&self, key: &CacheKey, deps: &[&str]) -> Option<Result<Lookup, StoreError>> {
        if !self.answers_at_once {
            return None;
        }
        self.now_calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_now.load(Ordering::SeqCst) {
            return Some(Err(StoreError::new(StoreErrorKind::Backend, "injected")));
        }
        self.inner.lookup_now(key, deps)
    }
    fn put<'a>(&'a self, key: &'a CacheKey, entry: Entry) -> StoreFuture<'a, PutOutcome> {
        self.inner.put(key, entry)
    }
    fn invalidate<'a>(
        &'a self,
        tenant: &'a str,
        dep_id: &'a str,
        new_hash: &'a str,
    ) -> StoreFuture<'a, DepInvalidated> {
        self.inner.invalidate(tenant, dep_id, new_hash)
    }
}

/// Waits (bounded) until `cond` holds; entries are written in the background after a
/// response body ends, so tests wait for the write rather than sleep a guessed time.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    panic!("timed out waiting for: {what}");
}
