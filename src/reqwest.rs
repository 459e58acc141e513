//! The reqwest adapter: [`CachecoreMiddleware`], a [`reqwest_middleware::Middleware`] over the
//! same engine as [`CachecoreLayer`].
//!
//! Per-request control comes, as everywhere, from a [`RequestContext`](crate::RequestContext): put it on the request
//! with [`RequestBuilder::with_extension`](reqwest_middleware::RequestBuilder::with_extension),
//! or send the request inside [`scope`](crate::scope). The response carries `X-Cache` and the
//! [`CacheStatus`] in [`Response::extensions`].
//!
//! ```no_run
//! use cachecore::{CacheStatus, CachecoreLayer, Dep, MemoryStore, RequestContext};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = CachecoreLayer::builder().store(MemoryStore::new()).build();
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(layer.reqwest_middleware())
//!     .build();
//!
//! let res = client
//!     .post("http://127.0.0.1:8080/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(r#"{"model":"m","messages":[{"role":"user","content":"Summarise doc 123"}]}"#)
//!     .with_extension(RequestContext::new().dep(Dep::new("doc:123").hash("v7")))
//!     .send()
//!     .await?;
//! println!("{:?}", res.extensions().get::<CacheStatus>());
//!
//! // Later, when doc 123 changes (same layer, so same store):
//! layer
//!     .invalidator()
//!     .invalidate(cachecore::Invalidation::of(["doc:123"]).new_hash("v8"))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # What differs from the tower layer
//!
//! - A request whose body is a stream ([`reqwest::Body::as_bytes`] is `None`) cannot be keyed
//!   without consuming it: it is forwarded untouched and marked `BYPASS`.
//! - Stale-while-revalidate needs a background upstream call, and [`Next`] only lends the rest of
//!   the chain for the duration of one request. So a stale entry is not served here: it is
//!   revalidated in line (one upstream call, coalesced with concurrent callers of the same key).
//! - Hits are built as `http::Response`s and converted; the response URL is the request's.

use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use ::reqwest::{Body, Request, Response, ResponseBuilderExt, Url};
use http::{Extensions, HeaderValue, Uri};
use http_body::{Frame, SizeHint};
use reqwest_middleware::{Middleware, Next, Result};

use crate::context::RequestHead;
use crate::engine::{Engine, RefreshCall, Unwrapped, Upstream};
use crate::namespace::CredentialHash;
use crate::{CacheStatus, CachecoreLayer};

/// A [`reqwest_middleware::Middleware`] that caches responses with the engine of a
/// [`CachecoreLayer`]: same store, same keys, same single-flight and counters, and the layer
/// stays the handle to invalidate from.
///
/// Build it with [`CachecoreLayer::reqwest_middleware`] (or `From<CachecoreLayer>`).
///
/// # Credentials the middleware cannot see
///
/// reqwest merges a client's default headers (`ClientBuilder::default_headers`, often the
/// provider's `Authorization`) into a request *after* the middleware has run, so the layer's
/// credentials partition cannot see them. Two clients with different default keys must still
/// never share an entry, so when no tenant is configured each middleware value is its own
/// partition: entries are shared by the clients it is attached to (clones share it), never with
/// another middleware, another process included. To share entries across processes, tell the
/// middleware the client's credentials with [`client_credentials`](Self::client_credentials):
/// the partition is then a hash of them, the same in every process.
#[derive(Clone)]
pub struct CachecoreMiddleware {
    engine: Arc<Engine>,
    client: Arc<str>,
}

impl CachecoreMiddleware {
    /// A middleware sharing `layer`'s engine, in a key partition of its own (see above).
    pub fn new(layer: &CachecoreLayer) -> Self {
        Self {
            engine: Arc::clone(layer.engine()),
            client: Arc::from(format!("client-{}", crate::engine::random_hash())),
        }
    }

    /// Declares the default headers of the client this middleware is attached to (pass the
    /// same map given to `ClientBuilder::default_headers`). Its credential headers, hashed,
    /// replace the middleware's own partition, so middlewares declaring the same credentials
    /// (in any process) share entries and different ones never do.
    #[must_use]
    pub fn client_credentials(mut self, default_headers: &http::HeaderMap) -> Self {
        let hash = CredentialHash::of(&self.engine.config().credential_headers, default_headers);
        self.client = Arc::from(match hash.finish() {
            Some(p) => format!("client-{}", p.as_str()),
            None => "client-none".to_owned(),
        });
        self
    }
}

impl From<CachecoreLayer> for CachecoreMiddleware {
    fn from(layer: CachecoreLayer) -> Self {
        Self::new(&layer)
    }
}

impl CachecoreLayer {
    /// The reqwest-middleware adapter over this layer's engine.
    #[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
    pub fn reqwest_middleware(&self) -> CachecoreMiddleware {
        CachecoreMiddleware::new(self)
    }
}

impl fmt::Debug for CachecoreMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachecoreMiddleware")
            .field("engine", &self.engine)
            .finish()
    }
}

// Written out rather than with `#[async_trait]`, which would be a dependency for one impl; this
// is the signature that macro produces for the trait.
impl Middleware for CachecoreMiddleware {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        req: Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> Pin<Box<dyn Future<Output = Result<Response>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(handle(&self.engine, &self.client, req, extensions, next))
    }
}

/// One reqwest request through the cache: its conversion to the engine's types and back. The
/// flow itself is the engine's ([`Engine::serve`]), as for the tower service.
async fn handle(
    engine: &Arc<Engine>,
    client: &Arc<str>,
    req: Request,
    extensions: &mut Extensions,
    next: Next<'_>,
) -> Result<Response> {
    // Every `Url` reqwest sends is a valid `Uri`; if one is not, it is simply not cached.
    let Ok(uri) = Uri::try_from(req.url().as_str()) else {
        return bypass(engine, req, extensions, next, None).await;
    };
    let head = RequestHead {
        method: req.method(),
        uri: &uri,
        headers: req.headers(),
        extensions,
    };
    let mut plan = match engine.plan(&head) {
        Ok(plan) => plan,
        Err(reason) => {
            let error = reason.error_header();
            return bypass(engine, req, extensions, next, error).await;
        }
    };
    if engine.config().namespace.is_credentials() {
        // The client's default headers are invisible here: partition by the client too.
        let partition = format!(
            "{}+{client}",
            plan.namespace.partition().unwrap_or_default()
        );
        plan.namespace = plan.namespace.clone().with_partition(partition);
    }
    // A stream would have to be consumed to be keyed; an oversized body is not cached by the
    // tower layer either. Both go out untouched.
    let max_body = engine.config().max_body;
    if req
        .body()
        .is_some_and(|b| b.as_bytes().is_none_or(|b| b.len() > max_body))
    {
        return bypass(engine, req, extensions, next, None).await;
    }
    let url = req.url().clone();
    let request = Outgoing {
        req,
        uri,
        extensions,
    };
    let res = engine.serve(plan, request, Next_(next)).await?;
    let hit = res
        .extensions()
        .get::<CacheStatus>()
        .is_some_and(|s| s.is_hit());
    let (parts, body) = res.into_parts();
    let body = match body.into_unwrapped() {
        Unwrapped::Cached(bytes) => Body::from(bytes),
        Unwrapped::Passthrough(body) => body,
        Unwrapped::Recording(body) => Body::wrap(SyncBody::new(body)),
    };
    let res = http::Response::from_parts(parts, body);
    // A hit's URL is the request's; a forwarded response keeps its own (redirects followed).
    Ok(Response::from(if hit { with_url(res, url) } else { res }))
}

/// A reqwest request with its body in memory, as the engine reads it.
struct Outgoing<'a> {
    req: Request,
    uri: Uri,
    extensions: &'a mut Extensions,
}

/// The rest of the middleware chain, as the engine's [`Upstream`]. It cannot run a background
/// refresh: [`Next`] lends the chain for one request only.
struct Next_<'a>(Next<'a>);

impl<'a> Upstream for Next_<'a> {
    type Request = Outgoing<'a>;
    type Body = Body;
    type Error = reqwest_middleware::Error;

    const REFRESHES: bool = false;

    fn head<'r>(request: &'r Outgoing<'a>) -> RequestHead<'r> {
        RequestHead {
            method: request.req.method(),
            uri: &request.uri,
            headers: request.req.headers(),
            extensions: request.extensions,
        }
    }

    fn body<'r>(request: &'r Outgoing<'a>) -> &'r [u8] {
        request
            .req
            .body()
            .and_then(Body::as_bytes)
            .unwrap_or_default()
    }

    async fn call(self, request: Outgoing<'a>) -> Result<http::Response<Body>> {
        let res = self.0.run(request.req, request.extensions).await?;
        let url = res.url().clone();
        Ok(with_url(http::Response::from(res), url))
    }

    fn refresh(&self, _: &Outgoing<'a>) -> Option<RefreshCall<Body>> {
        None
    }
}

async fn bypass(
    engine: &Engine,
    req: Request,
    extensions: &mut Extensions,
    next: Next<'_>,
    error: Option<HeaderValue>,
) -> Result<Response> {
    let mut res = next.run(req, extensions).await?;
    let mut extensions = mem::take(res.extensions_mut());
    engine.mark_bypass(res.headers_mut(), &mut extensions, error);
    *res.extensions_mut() = extensions;
    Ok(res)
}

/// Puts `url` where the conversion to a reqwest response reads the response URL from (it would
/// otherwise put a placeholder there).
fn with_url(res: http::Response<Body>, url: Url) -> http::Response<Body> {
    let (mut parts, body) = res.into_parts();
    if let Ok(with_url) = http::Response::builder().url(url).body(()) {
        parts.extensions.extend(with_url.into_parts().0.extensions);
    }
    http::Response::from_parts(parts, body)
}

/// [`Body::wrap`] wants a `Sync` body; the recording body holds the pending store write, which is
/// only `Send`. Polling goes through [`Mutex::get_mut`], which does not lock.
struct SyncBody<B>(Mutex<B>);

impl<B> SyncBody<B> {
    fn new(inner: B) -> Self {
        Self(Mutex::new(inner))
    }

    fn with<T>(&self, f: impl FnOnce(&B) -> T) -> T {
        f(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for SyncBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<B::Data>, B::Error>>> {
        let inner = self
            .get_mut()
            .0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        Pin::new(inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.with(B::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.with(B::size_hint)
    }
}
