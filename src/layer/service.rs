//! The service the layer builds.

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower_service::Service;

use super::body::RequestBody;
use super::future::ResponseFuture;
use crate::context::RequestHead;
use crate::engine::{into_bytes, Engine, Plan, RefreshCall, ResponseBody, Upstream};
use crate::CacheStatus;

/// The caching service: wraps an inner HTTP service built by [`CachecoreLayer`].
///
/// The inner service receives the request with a [`RequestBody`], and the caller gets the
/// response with a [`ResponseBody`]; the error type is the inner service's, untouched.
///
/// [`CachecoreLayer`]: crate::CachecoreLayer
pub struct Cachecore<S> {
    inner: S,
    engine: Arc<Engine>,
}

impl<S> Cachecore<S> {
    pub(crate) fn new(inner: S, engine: Arc<Engine>) -> Self {
        Self { inner, engine }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for Cachecore<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            engine: Arc::clone(&self.engine),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Cachecore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cachecore")
            .field("inner", &self.inner)
            .field("engine", &self.engine)
            .finish()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Cachecore<S>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body + Send + 'static,
    ReqB::Error: Send,
    ResB: Body + Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match self.engine.plan(&RequestHead::of(&req)) {
            Err(reason) => {
                let error = reason.error_header();
                let fut = self.inner.call(req.map(RequestBody::passthrough));
                ResponseFuture::bypass(fut, Arc::clone(&self.engine), error)
            }
            Ok(plan) => {
                // The instance that reported ready is the one that must be called; keep a
                // clone behind for the next call (tower's readiness contract).
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::cached(Box::pin(cached(Arc::clone(&self.engine), inner, req, plan)))
            }
        }
    }
}

impl<S> Cachecore<S> {
    /// The cache path of a request whose body the caller has already read whole, as
    /// [`Service::call`] would take it, without reading the body again: the gateway reads it
    /// first to see whether the request asks the provider to store its answer. The inner
    /// service must be ready (the gateway's proxy always is).
    #[cfg(feature = "gateway")]
    #[allow(clippy::manual_async_fn)] // an `async fn` here fails the gateway's `Send` check
    pub(crate) fn call_buffered<ReqB, ResB>(
        self,
        parts: Parts,
        body: Bytes,
    ) -> impl Future<Output = Result<Response<ResponseBody<ResB>>, S::Error>> + Send
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: Body + Send + 'static,
        ReqB::Error: Send,
        ResB: Body + Send + 'static,
    {
        // The future's `Send` is proven here, under these bounds, not at the caller (where
        // rustc cannot prove it for every lifetime of the boxed error type).
        async move {
            let request = (parts, body);
            let plan = self.engine.plan(&Inner::<S, ReqB, ResB>::head(&request));
            let inner = Inner::<S, ReqB, ResB>(self.inner, PhantomData);
            match plan {
                Ok(plan) => {
                    let later = match self
                        .engine
                        .serve_now::<Inner<S, ReqB, ResB>>(&plan, &request)
                    {
                        Ok(hit) => return Ok(hit),
                        Err(later) => later,
                    };
                    // Boxed, as everything that waits for the upstream: a hit answered at once
                    // then builds and moves a future of a few words, not one with room for an
                    // upstream call.
                    Box::pin(self.engine.serve_later(plan, later, request, inner)).await
                }
                Err(reason) => {
                    let error = reason.error_header();
                    let (mut parts, body) = Box::pin(inner.call(request)).await?.into_parts();
                    self.engine
                        .mark_bypass(&mut parts.headers, &mut parts.extensions, error);
                    Ok(Response::from_parts(parts, ResponseBody::passthrough(body)))
                }
            }
        }
    }
}

/// The body of a request that did not fit the buffer: what was read, then the rest.
pub(crate) struct Unbuffered<B: Body> {
    pub(crate) prefix: VecDeque<Frame<Bytes>>,
    pub(crate) error: Option<B::Error>,
    pub(crate) rest: Pin<Box<B>>,
}

/// Reads the whole body if it fits in `max` bytes; otherwise hands back what it read and the
/// rest, so the request can be forwarded byte for byte.
pub(crate) async fn buffer<B: Body>(body: B, max: usize) -> Result<Bytes, Unbuffered<B>> {
    let mut body = Box::pin(body);
    let mut chunks = Chunks::default();
    let unbuffered = |chunks: Chunks, last: Option<Frame<Bytes>>, error, rest| {
        let mut prefix: VecDeque<Frame<Bytes>> = chunks.into_iter().map(Frame::data).collect();
        prefix.extend(last);
        Unbuffered {
            prefix,
            error,
            rest,
        }
    };
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(unbuffered(chunks, None, Some(e), body)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let data = into_bytes(data);
                    if chunks.total + data.len() > max {
                        return Err(unbuffered(chunks, Some(Frame::data(data)), None, body));
                    }
                    chunks.push(data);
                }
                // Trailers cannot be part of the key; forward the request as it came.
                Err(trailers) => {
                    let last = trailers.map_data(into_bytes);
                    return Err(unbuffered(chunks, Some(last), None, body));
                }
            },
        }
    }
    Ok(chunks.concat())
}

/// The chunks of a request body being buffered. Most bodies come in one chunk, which is kept
/// as it is: no list is allocated and nothing is copied.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    more: Vec<Bytes>,
    total: usize,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.total += data.len();
        if self.first.is_none() {
            self.first = Some(data);
        } else {
            self.more.push(data);
        }
    }

    fn into_iter(self) -> impl Iterator<Item = Bytes> {
        self.first.into_iter().chain(self.more)
    }

    fn concat(self) -> Bytes {
        if self.more.is_empty() {
            return self.first.unwrap_or_default();
        }
        let mut all = BytesMut::with_capacity(self.total);
        for c in self.into_iter() {
            all.extend_from_slice(&c);
        }
        all.freeze()
    }
}

/// The cache path of one planned request: buffer the body, then the engine's flow. A body that
/// does not fit the buffer goes upstream as it came, uncached.
async fn cached<S, ReqB, ResB>(
    engine: Arc<Engine>,
    mut inner: S,
    req: Request<ReqB>,
    plan: Plan,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body + Send + 'static,
    ReqB::Error: Send,
    ResB: Body + Send + 'static,
{
    let (parts, body) = req.into_parts();
    match buffer(body, engine.config().max_body).await {
        Ok(body) => {
            let request = (parts, body);
            let later = match engine.serve_now::<Inner<S, ReqB, ResB>>(&plan, &request) {
                Ok(hit) => return Ok(hit),
                Err(later) => later,
            };
            // Boxed, as everything that waits for the upstream: a hit answered at once then
            // builds and moves a future of a few words, not one with room for an upstream call.
            // (The same five lines stand in `call_buffered`: a shared helper taking the request
            // by value cost 200-400 instructions a hit more, measured.)
            let inner = Inner(inner, PhantomData);
            Box::pin(engine.serve_later(plan, later, request, inner)).await
        }
        Err(Unbuffered {
            prefix,
            error,
            rest,
        }) => {
            let req = Request::from_parts(parts, RequestBody::replay(prefix, error, rest));
            let mut res = Box::pin(inner.call(req))
                .await?
                .map(ResponseBody::passthrough);
            engine.mark(&mut res, CacheStatus::Bypass);
            Ok(res)
        }
    }
}

/// The inner service, as the engine's [`Upstream`]: the service that reported ready is the one
/// called; a background refresh calls a clone once it is ready.
struct Inner<S, ReqB, ResB>(S, PhantomData<fn(ReqB) -> ResB>);

impl<S, ReqB, ResB> Upstream for Inner<S, ReqB, ResB>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body + Send + 'static,
    ReqB::Error: Send,
    ResB: Body + Send + 'static,
{
    type Request = (Parts, Bytes);
    type Body = ResB;
    type Error = S::Error;

    const REFRESHES: bool = true;

    fn head((parts, _): &(Parts, Bytes)) -> RequestHead<'_> {
        RequestHead {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }

    fn body((_, body): &(Parts, Bytes)) -> &[u8] {
        body
    }

    fn call(
        mut self,
        (parts, body): (Parts, Bytes),
    ) -> impl Future<Output = Result<Response<ResB>, S::Error>> + Send {
        self.0
            .call(Request::from_parts(parts, RequestBody::full(body)))
    }

    fn refresh(&self, (parts, body): &(Parts, Bytes)) -> Option<RefreshCall<ResB>> {
        let mut req = Request::new(RequestBody::<ReqB>::full(body.clone()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        *req.extensions_mut() = parts.extensions.clone();
        let mut svc = self.0.clone();
        Some(Box::pin(async move {
            poll_fn(|cx| svc.poll_ready(cx)).await.ok()?;
            svc.call(req).await.ok()
        }))
    }
}
