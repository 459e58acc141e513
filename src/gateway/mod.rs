//! A caching reverse proxy for OpenAI-compatible APIs (feature `gateway`).
//!
//! [`Gateway`] is the assembly behind `examples/gateway.rs`, as one tower service you can serve
//! with hyper or axum, or start inside a test:
//!
//! | path | what |
//! |---|---|
//! | `POST /v1/invalidate` | the invalidation API ([`InvalidateService`]) |
//! | `GET /health` | `200 {"status":"ok"}`; `503 {"status":"draining"}` once [`serve`] is shutting down |
//! | `GET /metrics` | the cache's and the gateway's metrics ([`PrometheusCollector`]), in the Prometheus text format, or OpenMetrics when the scraper asks for it |
//! | anything else | forwarded to the upstream in trusted-header mode ([`crate::wire`]), streaming included: through the cache when it is a [cacheable path](GatewayBuilder::cacheable_paths), as a `BYPASS` otherwise |
//!
//! Every request logs one `tracing` event (target `cachecore::gateway`) with method, path,
//! status, `X-Cache` and the time to the response head.
//!
//! What the cache did is in the `X-Cache` header only: unlike [`CachecoreLayer`](crate::CachecoreLayer)'s, the
//! gateway's responses do not carry the [`CacheStatus`](crate::CacheStatus) extension, since
//! they are made to be written to a connection (making and dropping it was about 2% of a hit).
//! [`CacheStatusOf::cache_status`](crate::testing::CacheStatusOf::cache_status) reads either.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use cachecore::auth::jwt::JwtAuth;
//! use cachecore::gateway::Gateway;
//! use cachecore::CachecoreLayer;
//!
//! let gateway = Gateway::builder("http://127.0.0.1:9000", JwtAuth::new("the shared HS256 secret, 32 bytes or more")?)
//!     .cache(CachecoreLayer::builder().default_ttl(std::time::Duration::from_secs(600)))
//!     .build()?;
//! let app = axum::Router::new().fallback_service(gateway);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! # What is cached
//!
//! Only requests whose answer depends on the request alone: by default
//! [`DEFAULT_CACHEABLE_PATHS`], the `POST`s of chat completions, completions, embeddings,
//! moderations and responses. Every other request (creating a thread message, uploading a
//! file, starting a batch, listing models) is forwarded as a `BYPASS`: replaying a stored answer
//! to it would skip the change it asks for. [`GatewayBuilder::cacheable_paths`] replaces the
//! list.
//!
//! A request that asks the provider to keep its result is a `BYPASS` too, on any path: a JSON
//! body with `"store": true`, and a Responses API call (a path ending in `/responses`) unless its
//! body says `"store": false`, since that API stores by default. So is a body the gateway cannot
//! tell about: one larger than the cache's body limit (it is not read whole), and one that may
//! name `store` but is not a JSON object with a boolean or `null` there.
//!
//! # What goes upstream
//!
//! The request as received, minus hop-by-hop headers, the `X-CacheCore-*` headers and the
//! tenant credential, which never leaves the gateway in any of its accepted forms
//! (`X-CacheCore-Token`, `Authorization: Bearer cc_live_<id>.<jwt>`, `Authorization: Bearer
//! <jwt>`):
//!
//! | the request has | `Authorization` sent upstream |
//! |---|---|
//! | any, with [`upstream_authorization`](GatewayBuilder::upstream_authorization) set | that value (the gateway holds the provider key) |
//! | `Authorization: Bearer ...`, no `X-CacheCore-Token` | none: it is the tenant credential, whatever it holds, valid or not |
//! | `X-CacheCore-Token` and `Authorization` | the caller's `Authorization` (their provider key), unless it holds a `cc_` tenant key or the same token |
//! | `Authorization` with another scheme (`Basic ...`) | the caller's, unchanged |
//!
//! Provider keys in headers of their own (`X-Api-Key`, `Api-Key`, `X-Goog-Api-Key`) are
//! forwarded unchanged. So a caller who brings their own provider key either sends it in such a
//! header or puts the tenant token in `X-CacheCore-Token`, which leaves `Authorization` to them.
//!
//! The upstream is reached over plain HTTP/1.1. For an `https://` upstream, pass a TLS
//! connector to [`GatewayBuilder::build_with_connector`].
//!
//! # Serving it
//!
//! [`serve`] runs the gateway on a listener the way the `cachecore-gateway` binary does: at most
//! [`ServeOptions::max_connections`] connections at a time, a bound on reading a request head,
//! and a graceful shutdown (stop accepting, let in-flight requests and streams finish within a
//! bound, then close what is left).
//!
//! # Limits towards the upstream
//!
//! | setting | default |
//! |---|---|
//! | [`upstream_connect_timeout`](GatewayBuilder::upstream_connect_timeout) | [`DEFAULT_UPSTREAM_CONNECT_TIMEOUT`], 5 s |
//! | [`upstream_timeout`](GatewayBuilder::upstream_timeout) (response head) | [`DEFAULT_UPSTREAM_TIMEOUT`], 10 min |
//! | [`upstream_idle_timeout`](GatewayBuilder::upstream_idle_timeout) (between body chunks) | [`DEFAULT_UPSTREAM_IDLE_TIMEOUT`], 5 min |
//! | [`upstream_max_inflight`](GatewayBuilder::upstream_max_inflight) | [`DEFAULT_UPSTREAM_MAX_INFLIGHT`], 256 |
//! | [`upstream_pool_max_idle`](GatewayBuilder::upstream_pool_max_idle) | [`DEFAULT_UPSTREAM_POOL_MAX_IDLE`], 64 |
//!
//! Each constant's docs say where its number comes from.
//!
//! [`InvalidateService`]: crate::invalidate::InvalidateService
//! [`PrometheusCollector`]: crate::metrics::PrometheusCollector

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use memchr::memmem::Finder;
use tower_layer::Layer;
use tower_service::Service;

mod heads;
mod proxy;
mod serve;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::auth::Authenticator;
use crate::invalidate::InvalidateService;
use crate::metrics::{PrometheusCollector, QueueMetrics};
use crate::{Cachecore, CachecoreBuilder, CachecoreLayer, RequestBody, RequestContext, X_CACHE};
use proxy::{Proxy, ProxyOptions, Upstream};
pub use serve::{serve, ServeOptions, ServeReport};

use crate::edge::BoxError;

/// The body of every request the proxy forwards and every response the gateway sends.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// The path of the invalidation API.
pub const INVALIDATE_PATH: &str = "/v1/invalidate";
/// The path of the health check.
pub const HEALTH_PATH: &str = "/health";
/// The path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

/// The requests the gateway caches unless told otherwise
/// ([`GatewayBuilder::cacheable_paths`]): the OpenAI-compatible endpoints whose answer is a
/// function of the request.
pub const DEFAULT_CACHEABLE_PATHS: &[&str] = &[
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/moderations",
    "POST /v1/responses",
];

/// Longest wait for a TCP connection to the upstream by default. A reachable host answers in
/// milliseconds; Linux retransmits an unanswered SYN after 1 s and again after 3 s, so 5 s
/// covers two retransmissions and then gives the caller a `502` rather than a hang.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for the upstream's response head by default: 10 minutes, the request timeout
/// the OpenAI SDKs use themselves, so the gateway never cuts a call its client would still
/// wait for (a long non-streamed completion sends nothing until it is done).
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest silence between two chunks of an upstream response body by default: 5 minutes.
/// Longer than a reasoning model thinks before its first streamed token, short enough that a
/// connection the upstream dropped without a FIN frees its slot. The stream then ends with an
/// error, and is not stored.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Upstream requests in flight at once by default (more wait for a slot, within the head
/// timeout). With [`DEFAULT_UPSTREAM_POOL_MAX_IDLE`] idle sockets and
/// [`ServeOptions::DEFAULT_MAX_CONNECTIONS`] callers, the gateway stays under the 1024 open
/// files that most systems allow a process by default.
pub const DEFAULT_UPSTREAM_MAX_INFLIGHT: usize = 256;

/// Idle upstream connections kept for reuse by default (hyper keeps any number otherwise):
/// enough to absorb a burst without new handshakes, bounded for the open-file budget above.
pub const DEFAULT_UPSTREAM_POOL_MAX_IDLE: usize = 64;

/// The last path segment of the Responses API, which keeps every response unless the request
/// says `"store": false` (the gateway docs, "What is cached").
const STORES_BY_DEFAULT: &str = "responses";

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
    upstream_url: String,
    auth: Arc<dyn Authenticator>,
    cache: CachecoreBuilder,
    upstream_authorization: Option<HeaderValue>,
    upstream_connect_timeout: Duration,
    upstream: ProxyOptions,
    cacheable_paths: Vec<String>,
    queue_metrics: Option<QueueMetrics>,
}

impl fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayBuilder")
            .field("upstream", &self.upstream_url)
            .field("cache", &self.cache)
            .field("upstream_connect_timeout", &self.upstream_connect_timeout)
            .field("limits", &self.upstream)
            .field("cacheable_paths", &self.cacheable_paths)
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

    /// Longest wait for the upstream's response head, a free upstream slot included (default
    /// [`DEFAULT_UPSTREAM_TIMEOUT`]). Past it the caller gets `504`.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.upstream.head_timeout = timeout;
        self
    }

    /// Longest wait for a TCP connection to the upstream (default
    /// [`DEFAULT_UPSTREAM_CONNECT_TIMEOUT`]); past it the caller gets `502`. Applies to
    /// [`build`](Self::build); a connector given to
    /// [`build_with_connector`](Self::build_with_connector) brings its own.
    pub fn upstream_connect_timeout(mut self, timeout: Duration) -> Self {
        self.upstream_connect_timeout = timeout;
        self
    }

    /// Longest silence between two chunks of an upstream response body (default
    /// [`DEFAULT_UPSTREAM_IDLE_TIMEOUT`]). Past it the response ends with an error (the caller
    /// sees the connection cut) and nothing is stored.
    pub fn upstream_idle_timeout(mut self, timeout: Duration) -> Self {
        self.upstream.idle_timeout = timeout;
        self
    }

    /// Upstream requests in flight at once, bodies included (default
    /// [`DEFAULT_UPSTREAM_MAX_INFLIGHT`]; at least 1). A request past it waits for a slot,
    /// within the [head timeout](Self::upstream_timeout).
    pub fn upstream_max_inflight(mut self, n: usize) -> Self {
        self.upstream.max_inflight = n.max(1);
        self
    }

    /// Idle upstream connections kept for reuse (default [`DEFAULT_UPSTREAM_POOL_MAX_IDLE`]).
    pub fn upstream_pool_max_idle(mut self, n: usize) -> Self {
        self.upstream.pool_max_idle = n;
        self
    }

    /// Adds a queue worker's numbers to `/metrics` (see [`QueueMetrics`]).
    pub fn queue_metrics(mut self, queue: QueueMetrics) -> Self {
        self.queue_metrics = Some(queue);
        self
    }

    /// The requests the gateway caches, replacing [`DEFAULT_CACHEABLE_PATHS`]; every other
    /// request is forwarded as a `BYPASS`.
    ///
    /// Each entry is `[METHOD ]PATH`: without a method, every method the cache handles (by
    /// default `GET` and `POST`); a path ending in `*` matches every path that starts with
    /// what comes before it, and `*` alone every path. Entries are checked by
    /// [`build`](Self::build). The rule on `"store"` in the module docs applies on every path.
    ///
    /// ```
    /// # use cachecore::auth::jwt::JwtAuth;
    /// # use cachecore::gateway::{Gateway, DEFAULT_CACHEABLE_PATHS};
    /// let gateway = Gateway::builder("http://127.0.0.1:9000", JwtAuth::new("a shared secret of 32 bytes or more").unwrap())
    ///     .cacheable_paths(DEFAULT_CACHEABLE_PATHS.iter().copied().chain(["GET /v1/models"]))
    ///     .build()
    ///     .unwrap();
    /// # let _ = gateway;
    /// ```
    pub fn cacheable_paths<I>(mut self, paths: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.cacheable_paths = paths.into_iter().map(|p| p.as_ref().to_owned()).collect();
        self
    }

    /// Builds a gateway that reaches the upstream over plain HTTP.
    pub fn build(self) -> Result<Gateway, GatewayError> {
        if !self.upstream_url.trim().starts_with("http://") {
            return Err(GatewayError(format!(
                "upstream {:?} is not an http:// URL; for https pass a TLS connector to build_with_connector",
                self.upstream_url
            )));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(self.upstream_connect_timeout));
        self.build_with_connector(connector)
    }

    /// Builds a gateway that reaches the upstream through `connector`.
    pub fn build_with_connector<C>(self, connector: C) -> Result<Gateway, GatewayError>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let upstream = Upstream::parse(&self.upstream_url).map_err(GatewayError)?;
        let routes = self
            .cacheable_paths
            .iter()
            .map(|entry| {
                Route::parse(entry)
                    .map_err(|why| GatewayError(format!("cacheable path {entry:?}: {why}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A gateway's responses go to the wire, where only `X-Cache` says what the cache did.
        let cache = self
            .cache
            .trusted_headers(Arc::clone(&self.auth))
            .without_status_extension()
            .build();
        let max_body = cache.engine().config().max_body;
        let metrics = Arc::new(GatewayMetrics::default());
        let mut registry = Registry::default();
        let mut collector = PrometheusCollector::new(&cache);
        if let Some(queue) = self.queue_metrics {
            collector = collector.queue(queue);
        }
        registry.register_collector(Box::new(collector));
        metrics.register(&mut registry);
        let proxy = Proxy::new(
            connector,
            upstream,
            self.upstream_authorization,
            self.upstream,
            Arc::clone(&metrics),
        );
        Ok(Gateway {
            cached: cache.layer(proxy),
            invalidate: InvalidateService::from_shared(Arc::new(cache.invalidator()), self.auth),
            cache,
            metrics,
            registry: Arc::new(registry),
            draining: Arc::new(AtomicBool::new(false)),
            routes: routes.into(),
            max_body,
        })
    }
}

/// Why a forwarded request got no (whole) answer from the upstream: the `reason` label of
/// `cachecore_gateway_upstream_errors_total`.
type ReasonLabel = [(&'static str, &'static str); 1];

/// The gateway's own metrics, on top of the cache's.
#[derive(Debug, Default)]
pub(crate) struct GatewayMetrics {
    requests: Counter,
    upstream_errors: Family<ReasonLabel, Counter>,
    pub(crate) upstream_inflight: Gauge,
    pub(crate) connections: Gauge,
    pub(crate) connections_refused: Counter,
}

impl GatewayMetrics {
    fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "cachecore_gateway_requests",
            "Requests received by the gateway",
            self.requests.clone(),
        );
        registry.register(
            "cachecore_gateway_upstream_errors",
            "Forwarded requests the upstream did not answer whole: reason unreachable (502), \
             timeout (504: no response head in time), idle_timeout (body cut after a silence)",
            self.upstream_errors.clone(),
        );
        registry.register(
            "cachecore_gateway_upstream_inflight",
            "Upstream requests in flight, bodies included",
            self.upstream_inflight.clone(),
        );
        registry.register(
            "cachecore_gateway_connections",
            "Client connections open",
            self.connections.clone(),
        );
        registry.register(
            "cachecore_gateway_connection_errors",
            "Client connections that could not be accepted (e.g. out of file descriptors)",
            self.connections_refused.clone(),
        );
    }

    pub(crate) fn upstream_error(&self, reason: &'static str) {
        self.upstream_errors
            .get_or_create(&[("reason", reason)])
            .inc();
    }
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
    registry: Arc<Registry>,
    /// Set by [`serve`] when it starts shutting down: `/health` answers `503`.
    draining: Arc<AtomicBool>,
    routes: Arc<[Route]>,
    /// The cache's body limit: a larger body is never read whole, so never cached.
    max_body: usize,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("cache", &self.cache)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A builder for a gateway in front of `upstream` (e.g. `http://127.0.0.1:9000`; a path
    /// in it is prefixed to every forwarded path), whose callers `auth` identifies.
    pub fn builder(upstream: impl Into<String>, auth: impl Authenticator) -> GatewayBuilder {
        GatewayBuilder {
            upstream_url: upstream.into(),
            auth: Arc::new(auth),
            cache: CachecoreLayer::builder(),
            upstream_authorization: None,
            upstream_connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            upstream: ProxyOptions::default(),
            cacheable_paths: DEFAULT_CACHEABLE_PATHS
                .iter()
                .map(|&p| p.to_owned())
                .collect(),
            queue_metrics: None,
        }
    }

    /// The cache: invalidate through it (a queue worker), read its metrics.
    pub fn cache(&self) -> &CachecoreLayer {
        &self.cache
    }

    /// The `/metrics` text in the Prometheus text format (version 0.0.4): the cache's metrics
    /// and the gateway's.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The same metrics in the OpenMetrics text format.
    pub fn openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Whether [`serve`] is shutting down (then `/health` answers `503`).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// The `Content-Type` of the OpenMetrics text format.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scraper's `Accept` asks for OpenMetrics (Prometheus does, ahead of the text format).
fn wants_openmetrics(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
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
        self.dispatch(req)
    }
}

/// Where a request goes, decided from its head before it is moved.
enum Destination {
    Invalidate,
    Health,
    Metrics,
    /// Through the cache; `Some(by_default)` when the body decides (`store`), with whether the
    /// path stores by default.
    Cache {
        read_store: Option<bool>,
    },
    /// Forwarded as a `BYPASS`.
    Bypass,
}

impl Gateway {
    /// [`Service::call`] on a shared gateway: nothing per request is cloned but the cache's
    /// handle to the proxy (one reference count).
    pub(crate) fn dispatch<B>(&self, req: Request<B>) -> ResponseFuture
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.metrics.requests.inc();
        // The request's log line (module docs) costs nothing when its level is off.
        let log =
            tracing::enabled!(target: "cachecore::gateway", tracing::Level::INFO).then(|| {
                (
                    Instant::now(),
                    req.method().clone(),
                    req.uri().path().to_owned(),
                )
            });
        let destination = {
            let (method, path) = (req.method(), req.uri().path());
            let read_only = matches!(*method, Method::GET | Method::HEAD);
            match path {
                INVALIDATE_PATH => Destination::Invalidate,
                HEALTH_PATH if read_only => Destination::Health,
                METRICS_PATH if read_only => Destination::Metrics,
                _ if self.routes.iter().any(|r| r.matches(method, path)) => Destination::Cache {
                    read_store: (!read_only).then(|| last_segment_is(path, STORES_BY_DEFAULT)),
                },
                _ => Destination::Bypass,
            }
        };
        let fut: Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>> =
            match destination {
                Destination::Invalidate => {
                    let fut = self.invalidate.clone().call(req);
                    Box::pin(async move {
                        match fut.await {
                            Ok(res) => {
                                Ok(res.map(|b| b.map_err(|never| match never {}).boxed_unsync()))
                            }
                            Err(never) => match never {},
                        }
                    })
                }
                Destination::Health => Box::pin(std::future::ready(Ok(if self.is_draining() {
                    full(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        &br#"{"status":"draining"}"#[..],
                    )
                } else {
                    full(
                        StatusCode::OK,
                        "application/json",
                        &br#"{"status":"ok"}"#[..],
                    )
                }))),
                Destination::Metrics => Box::pin(std::future::ready(Ok(
                    if wants_openmetrics(req.headers()) {
                        full(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, self.openmetrics())
                    } else {
                        full(
                            StatusCode::OK,
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                            self.prometheus(),
                        )
                    },
                ))),
                Destination::Cache { read_store } => {
                    // The body is read once, here: it decides `store`, and the cache keys it.
                    // The proxy is always ready, so a clone may be called without polling.
                    let cached = self.cached.clone();
                    let max_body = self.max_body;
                    Box::pin(async move {
                        let res = cached_whole(cached, req, read_store, max_body).await;
                        match res {
                            Ok(res) => Ok(res.map(|b| b.map_err(Into::into).boxed_unsync())),
                            Err(never) => match never {},
                        }
                    })
                }
                Destination::Bypass => {
                    let mut req = req.map(|b| b.map_err(Into::into).boxed_unsync());
                    mark_bypass(&mut req);
                    let fut = self.cached.clone().call(req);
                    Box::pin(async move {
                        match fut.await {
                            Ok(res) => Ok(res.map(|b| b.map_err(Into::into).boxed_unsync())),
                            Err(never) => match never {},
                        }
                    })
                }
            };
        let Some((started, method, path)) = log else {
            return ResponseFuture(fut);
        };
        ResponseFuture(Box::pin(async move {
            let res = fut.await;
            if let Ok(res) = &res {
                let x_cache = res
                    .headers()
                    .get(X_CACHE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info!(target: "cachecore::gateway", %method, %path,
                    status = res.status().as_u16(), x_cache,
                    ms = started.elapsed().as_secs_f64() * 1000.0, "request");
            }
            res
        }))
    }
}

/// One entry of the cacheable paths: `[METHOD ]PATH`, the path exact or a prefix ending in `*`.
#[derive(Clone, Debug)]
struct Route {
    method: Option<Method>,
    path: String,
    prefix: bool,
}

impl Route {
    fn parse(entry: &str) -> Result<Self, String> {
        let mut words = entry.split_whitespace();
        let (method, path) = match (words.next(), words.next(), words.next()) {
            (Some(path), None, _) => (None, path),
            (Some(method), Some(path), None) => {
                let method = Method::from_bytes(method.as_bytes())
                    .map_err(|_| format!("{method:?} is not an HTTP method"))?;
                (Some(method), path)
            }
            (None, ..) => return Err("empty".into()),
            _ => return Err("expected `[METHOD ]PATH`".into()),
        };
        let (path, prefix) = match path.strip_suffix('*') {
            Some(start) => (start, true),
            None => (path, false),
        };
        if path.contains('*') {
            return Err("`*` may only end the path".into());
        }
        if !prefix && !path.starts_with('/') {
            return Err("the path must start with `/`".into());
        }
        if prefix && !path.is_empty() && !path.starts_with('/') {
            return Err("the path must start with `/` (or be `*`)".into());
        }
        Ok(Self {
            method,
            path: path.to_owned(),
            prefix,
        })
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && if self.prefix {
                path.starts_with(&self.path)
            } else {
                path == self.path
            }
    }
}

/// Makes the request a bypass through the cache's own mechanism, the [`RequestContext`]
/// extension, which wins over a task-local scope and the trusted headers.
fn mark_bypass<B>(req: &mut Request<B>) {
    mark_bypass_parts(req.extensions_mut());
}

/// [`mark_bypass`] on a request's extensions.
fn mark_bypass_parts(extensions: &mut http::Extensions) {
    let ctx = match extensions.remove::<RequestContext>() {
        Some(ctx) => ctx.bypass(),
        None => RequestContext::bypass_all(),
    };
    extensions.insert(ctx);
}

/// A request to a cacheable path through the cache. The body is read once (up to `max_body`);
/// when `read_store` is `Some(by_default)` it decides whether the request asks the provider to
/// store its result (`by_default`: its path stores unless told not to), and such a request is
/// a bypass. A body that cannot be read whole is forwarded frame for frame as a bypass: the
/// cache could not key it, nor tell what it asks.
async fn cached_whole<B>(
    cached: Cachecore<Proxy>,
    req: Request<B>,
    read_store: Option<bool>,
    max_body: usize,
) -> Result<Response<crate::ResponseBody<GatewayBody>>, Infallible>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let body = body.map_err(Into::<BoxError>::into);
    match crate::layer::buffer(body, max_body).await {
        Ok(body) => {
            if read_store.is_some_and(|by_default| asks_to_store(by_default, &body)) {
                mark_bypass_parts(&mut parts.extensions);
            }
            cached
                .call_buffered::<GatewayBody, GatewayBody>(parts, body)
                .await
        }
        Err(crate::layer::Unbuffered {
            prefix,
            error,
            rest,
        }) => {
            mark_bypass_parts(&mut parts.extensions);
            let body = RequestBody::replay(prefix, error, rest).boxed_unsync();
            let mut cached = cached;
            // Boxed: the hit path's future keeps no room for an upstream call.
            Box::pin(cached.call(Request::from_parts(parts, body))).await
        }
    }
}

/// Whether the last `/`-separated segment of `path` is `segment` (a suffix compare: this runs
/// on every POST).
fn last_segment_is(path: &str, segment: &str) -> bool {
    path.strip_suffix(segment)
        .is_some_and(|rest| rest.is_empty() || rest.ends_with('/'))
}

/// Whether a request body asks the provider to keep what it produces: `"store": true` at the
/// top level, or no `"store": false` where the path stores `by_default` (the Responses API).
fn asks_to_store(by_default: bool, body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Store {
        store: Option<bool>,
    }
    // Most bodies never name the field: skip the parse. A key spelled with `\u` escapes is the
    // same key, so a body with escapes is parsed too (and a body without a backslash has
    // none: one byte search rules them out). The searchers are built once: building one costs
    // about as much as scanning a chat request with it.
    static STORE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"store\""));
    static ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u"));
    let escaped = || memchr::memchr(b'\\', body).is_some() && ESCAPE.find(body).is_some();
    if STORE_KEY.find(body).is_none() && !escaped() {
        return by_default;
    }
    match serde_json::from_slice::<Store>(body) {
        Ok(Store { store }) => store.unwrap_or(by_default),
        // Not JSON, or `store` not a boolean: the upstream decides what it means, the cache
        // does not guess.
        Err(_) => true,
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn last_segment_is_the_text_after_the_last_slash(
            path in proptest::collection::vec(
                prop_oneof![Just("/"), Just("responses"), Just("x"), Just("s"), Just("v1")],
                0..6,
            ),
        ) {
            let path = path.concat();
            let expected = path.rsplit('/').next() == Some(STORES_BY_DEFAULT);
            prop_assert_eq!(last_segment_is(&path, STORES_BY_DEFAULT), expected, "{}", path);
        }
    }

    #[test]
    fn a_store_key_is_found_however_it_is_spelled() {
        for (body, by_default, expected) in [
            (r#"{"model":"m"}"#, false, false),
            (r#"{"model":"m"}"#, true, true),
            (r#"{"model":"m","store":true}"#, false, true),
            (r#"{"model":"m","store":false}"#, true, false),
            // An escape anywhere sends the body to the parser, which reads the key.
            (r#"{"model":"m","\u0073tore":true}"#, false, true),
            (r#"{"model":"m","st\u006Fre":false}"#, true, false),
            // Backslashes but no `\u` escape: nothing to find.
            (r#"{"model":"m","content":"a\nb \"q\""}"#, false, false),
            // Not a boolean: left to the upstream, never cached.
            (r#"{"store":"yes"}"#, false, true),
        ] {
            assert_eq!(
                asks_to_store(by_default, body.as_bytes()),
                expected,
                "{body} (by default {by_default})"
            );
        }
    }
}
