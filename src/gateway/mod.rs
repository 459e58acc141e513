//! A caching reverse proxy for OpenAI-compatible APIs (feature `gateway`).
//!
//! [`Gateway`] is the assembly behind `examples/gateway.rs`, as one tower service you can serve
//! with hyper or axum, or start inside a test:
//!
//! | path | what |
//! |---|---|
//! | `POST /v1/invalidate` | the invalidation API ([`InvalidateService`]) |
//! | `GET /health` | `200 {"status":"ok"}` |
//! | `GET /metrics` | the counters in Prometheus text format |
//! | anything else | forwarded to the upstream through the cache in trusted-header mode ([`crate::wire`]), streaming included |
//!
//! Every request logs one `tracing` event (target `cachecore::gateway`) with method, path,
//! status, `X-Cache` and the time to the response head.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use cachecore::auth::jwt::JwtAuth;
//! use cachecore::gateway::Gateway;
//! use cachecore::CachecoreLayer;
//!
//! let gateway = Gateway::builder("http://127.0.0.1:9000", JwtAuth::new("the shared HS256 secret"))
//!     .cache(CachecoreLayer::builder().default_ttl(std::time::Duration::from_secs(600)))
//!     .build()?;
//! let app = axum::Router::new().fallback_service(gateway);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! What goes upstream: the request as received, minus hop-by-hop headers and the
//! `X-CacheCore-*` headers. `Authorization` is replaced by
//! [`upstream_authorization`](GatewayBuilder::upstream_authorization) when one is set (the
//! gateway holds the provider key, callers send their tenant token); otherwise it is forwarded,
//! except when it carries a `cc_...`-prefixed tenant key, which never leaves the gateway.
//!
//! The upstream is reached over plain HTTP/1.1. For an `https://` upstream, pass a TLS
//! connector to [`GatewayBuilder::build_with_connector`].
//!
//! [`InvalidateService`]: crate::invalidate::InvalidateService

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use tower_layer::Layer;
use tower_service::Service;

mod proxy;

use crate::auth::Authenticator;
use crate::invalidate::InvalidateService;
use crate::{Cachecore, CachecoreBuilder, CachecoreLayer, X_CACHE};
use proxy::{Proxy, Upstream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every request the proxy forwards and every response the gateway sends.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// The path of the invalidation API.
pub const INVALIDATE_PATH: &str = "/v1/invalidate";
/// The path of the health check.
pub const HEALTH_PATH: &str = "/health";
/// The path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

/// The upstream URL cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayError(String);

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GatewayError {}

/// Configures a [`Gateway`].
#[must_use]
pub struct GatewayBuilder {
    upstream: String,
    auth: Arc<dyn Authenticator>,
    cache: CachecoreBuilder,
    upstream_authorization: Option<HeaderValue>,
    upstream_timeout: Option<Duration>,
}

impl fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayBuilder")
            .field("upstream", &self.upstream)
            .field("cache", &self.cache)
            .field("upstream_timeout", &self.upstream_timeout)
            .finish_non_exhaustive()
    }
}

impl GatewayBuilder {
    /// The cache settings (store, TTLs, limits). Trusted-header mode with the gateway's
    /// authenticator is turned on by the gateway, over whatever namespace settings this has.
    pub fn cache(mut self, cache: CachecoreBuilder) -> Self {
        self.cache = cache;
        self
    }

    /// Sends this `Authorization` value upstream on every forwarded request (the provider's
    /// API key, e.g. `Bearer sk-...`), in place of the caller's.
    pub fn upstream_authorization(mut self, value: HeaderValue) -> Self {
        let mut value = value;
        value.set_sensitive(true);
        self.upstream_authorization = Some(value);
        self
    }

    /// Longest wait for the upstream's response head (default: none; LLM calls can be long).
    /// Past it the caller gets `504`.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.upstream_timeout = Some(timeout);
        self
    }

    /// Builds a gateway that reaches the upstream over plain HTTP.
    pub fn build(self) -> Result<Gateway, GatewayError> {
        if !self.upstream.trim().starts_with("http://") {
            return Err(GatewayError(format!(
                "upstream {:?} is not an http:// URL; for https pass a TLS connector to build_with_connector",
                self.upstream
            )));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        self.build_with_connector(connector)
    }

    /// Builds a gateway that reaches the upstream through `connector`.
    pub fn build_with_connector<C>(self, connector: C) -> Result<Gateway, GatewayError>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let upstream = Upstream::parse(&self.upstream).map_err(GatewayError)?;
        let cache = self.cache.trusted_headers(Arc::clone(&self.auth)).build();
        let metrics = Arc::new(GatewayMetrics::default());
        let proxy = Proxy::new(
            connector,
            upstream,
            self.upstream_authorization,
            self.upstream_timeout,
            Arc::clone(&metrics),
        );
        Ok(Gateway {
            cached: cache.layer(proxy),
            invalidate: InvalidateService::from_shared(Arc::new(cache.clone()), self.auth),
            cache,
            metrics,
        })
    }
}

/// Counters of the gateway itself, on top of the cache's.
#[derive(Debug, Default)]
pub(crate) struct GatewayMetrics {
    requests: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
}

/// The caching proxy as a tower service. See the [module docs](self).
///
/// Infallible, generic over the request body, cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    cache: CachecoreLayer,
    cached: Cachecore<Proxy>,
    invalidate: InvalidateService,
    metrics: Arc<GatewayMetrics>,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A builder for a gateway in front of `upstream` (e.g. `http://127.0.0.1:9000`; a path
    /// in it is prefixed to every forwarded path), whose callers `auth` identifies.
    pub fn builder(upstream: impl Into<String>, auth: impl Authenticator) -> GatewayBuilder {
        GatewayBuilder {
            upstream: upstream.into(),
            auth: Arc::new(auth),
            cache: CachecoreLayer::builder(),
            upstream_authorization: None,
            upstream_timeout: None,
        }
    }

    /// The cache: invalidate through it (a queue worker), read its metrics.
    pub fn cache(&self) -> &CachecoreLayer {
        &self.cache
    }

    /// The `/metrics` text: the cache's counters and the gateway's.
    pub fn prometheus(&self) -> String {
        let mut out = self.cache.metrics().to_prometheus();
        for (name, help, value) in [
            (
                "cachecore_gateway_requests_total",
                "Requests received by the gateway.",
                &self.metrics.requests,
            ),
            (
                "cachecore_gateway_upstream_errors_total",
                "Forwarded requests that got no response from the upstream.",
                &self.metrics.upstream_errors,
            ),
        ] {
            let value = value.load(Ordering::Relaxed);
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        out
    }
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<GatewayBody> {
    let mut res = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

impl<B> Service<Request<B>> for Gateway
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The proxy's client pools connections and is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let own = matches!(path.as_str(), HEALTH_PATH | METRICS_PATH)
            && matches!(method, Method::GET | Method::HEAD);
        let fut: Pin<Box<dyn Future<Output = Response<GatewayBody>> + Send>> =
            if path == INVALIDATE_PATH {
                let fut = Service::call(&mut self.invalidate, req);
                Box::pin(async move {
                    match fut.await {
                        Ok(res) => res.map(|b| b.map_err(|never| match never {}).boxed_unsync()),
                        Err(never) => match never {},
                    }
                })
            } else if own && path == HEALTH_PATH {
                Box::pin(std::future::ready(full(
                    StatusCode::OK,
                    "application/json",
                    &br#"{"status":"ok"}"#[..],
                )))
            } else if own {
                Box::pin(std::future::ready(full(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.prometheus(),
                )))
            } else {
                let req = req.map(|b| b.map_err(Into::into).boxed_unsync());
                let fut = self.cached.call(req);
                Box::pin(async move {
                    match fut.await {
                        Ok(res) => res.map(|b| b.map_err(Into::into).boxed_unsync()),
                        Err(never) => match never {},
                    }
                })
            };
        ResponseFuture(Box::pin(async move {
            let res = fut.await;
            let x_cache = res
                .headers()
                .get(X_CACHE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info!(target: "cachecore::gateway", %method, %path,
                status = res.status().as_u16(), x_cache,
                ms = started.elapsed().as_secs_f64() * 1000.0, "request");
            Ok(res)
        }))
    }
}

/// Response future of [`Gateway`].
pub struct ResponseFuture(
    Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>,
);

impl Future for ResponseFuture {
    type Output = Result<Response<GatewayBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
