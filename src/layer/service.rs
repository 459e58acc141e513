//! The service the layer builds.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower_service::Service;

use super::body::{into_bytes, RequestBody, ResponseBody};
use super::future::ResponseFuture;
use crate::context::RequestHead;
use crate::engine::{Engine, Forward, Plan, Route};
use crate::store::{CacheKey, DepEpochs};
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
                let error = reason
                    .error_message()
                    .and_then(|m| HeaderValue::from_str(m).ok());
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

/// The body of a request that did not fit the buffer: what was read, then the rest.
struct Unbuffered<B: Body> {
    prefix: VecDeque<Frame<Bytes>>,
    error: Option<B::Error>,
    rest: Pin<Box<B>>,
}

/// Reads the whole body if it fits in `max` bytes; otherwise hands back what it read and the
/// rest, so the request can be forwarded byte for byte.
async fn buffer<B: Body>(body: B, max: usize) -> Result<Bytes, Unbuffered<B>> {
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

/// The cache path of one request: buffer, key, lookup, single-flight, upstream, record.
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
    let body = match buffer(body, engine.config.max_body).await {
        Ok(body) => body,
        Err(Unbuffered {
            prefix,
            error,
            rest,
        }) => {
            let req = Request::from_parts(parts, RequestBody::replay(prefix, error, rest));
            let mut res = inner.call(req).await?.map(ResponseBody::passthrough);
            engine.mark(&mut res, CacheStatus::Bypass);
            return Ok(res);
        }
    };

    let head = RequestHead {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
        extensions: &parts.extensions,
    };
    let key = engine.key(&plan, &head, &body);
    let forward = match engine.route(&key, &plan, &head, &body, true).await {
        Route::Serve(entry, status) => {
            if status == CacheStatus::StaleHit {
                spawn_refresh(
                    &engine,
                    &inner,
                    &parts,
                    &body,
                    key,
                    &plan,
                    entry.deps.clone(),
                );
            }
            return Ok(engine.hit_response(entry, status, ResponseBody::cached));
        }
        Route::Forward(forward) => forward,
    };

    // The request's headers decide which variant a `Vary` response is; keep them (cheap:
    // this is the miss path, which pays an upstream call).
    let request_headers = parts.headers.clone();
    let res = inner
        .call(Request::from_parts(parts, RequestBody::full(body)))
        .await?;
    let (res_parts, res_body) = res.into_parts();
    let recorder = engine.start_recording(
        key,
        plan.fresh_ttl,
        forward,
        &request_headers,
        res_parts.status,
        &res_parts.headers,
    );
    let body = match recorder {
        // Servers may never poll a body that is already at its end: store it now, before the
        // response goes out, as a recording body does before it reports its end.
        Some(recorder) if res_body.is_end_stream() => {
            recorder.finish().wait().await;
            ResponseBody::passthrough(res_body)
        }
        Some(recorder) => ResponseBody::recording(res_body, recorder),
        None => ResponseBody::passthrough(res_body),
    };
    let mut res = Response::from_parts(res_parts, body);
    engine.mark(&mut res, CacheStatus::Miss);
    Ok(res)
}

/// Starts the one background refresh of a stale entry, unless one is running.
fn spawn_refresh<S, ReqB, ResB>(
    engine: &Arc<Engine>,
    inner: &S,
    parts: &Parts,
    body: &Bytes,
    key: CacheKey,
    plan: &Plan,
    observed: DepEpochs,
) where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body + Send + 'static,
    ReqB::Error: Send,
    ResB: Body + Send + 'static,
{
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Some(guard) = engine.begin_refresh(&key) else {
        return;
    };
    engine
        .metrics
        .background_refreshes
        .fetch_add(1, Ordering::Relaxed);
    let mut req = Request::new(RequestBody::full(body.clone()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    let request_headers = parts.headers.clone();
    let mut svc = inner.clone();
    let engine = Arc::clone(engine);
    let fresh_ttl = plan.fresh_ttl;
    rt.spawn(async move {
        let _guard = guard;
        if poll_fn(|cx| svc.poll_ready(cx)).await.is_err() {
            return;
        }
        let Ok(res) = svc.call(req).await else {
            return;
        };
        let (parts, body) = res.into_parts();
        let Some(mut recorder) = engine.start_recording(
            key,
            fresh_ttl,
            Forward::refresh(observed),
            &request_headers,
            parts.status,
            &parts.headers,
        ) else {
            return;
        };
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            let Ok(data) = frame.into_data() else { return };
            if !recorder.push(&into_bytes(data)) {
                return;
            }
        }
        recorder.finish().wait().await;
    });
}
