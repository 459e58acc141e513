//! The inner service of the gateway: forwards a request to the upstream.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use super::{full, GatewayBody, GatewayMetrics};
use crate::auth::{bearer_token, strip_key_prefix, X_CACHECORE_TOKEN};
use crate::edge::{BoxError, ErrorEnvelope};
use crate::headers::{remove_hop_by_hop, X_CACHECORE_BYPASS, X_CACHECORE_DEPS};
use crate::RequestBody;

type SendFuture = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;
type SendFn = Arc<dyn Fn(Request<GatewayBody>) -> SendFuture + Send + Sync>;

/// Where forwarded requests go: scheme, authority, and a path prefix.
#[derive(Clone, Debug)]
pub(super) struct Upstream {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
}

impl Upstream {
    pub(super) fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .trim()
            .parse()
            .map_err(|e| format!("upstream URL {url:?}: {e}"))?;
        match (uri.scheme(), uri.authority()) {
            (Some(scheme), Some(authority)) => Ok(Self {
                scheme: scheme.clone(),
                authority: authority.clone(),
                prefix: uri.path().trim_end_matches('/').to_owned(),
            }),
            _ => Err(format!(
                "upstream URL {url:?} needs a scheme and a host, e.g. http://127.0.0.1:9000"
            )),
        }
    }

    fn uri(&self, original: &Uri) -> Result<Uri, http::Error> {
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{pq}", self.prefix))
            .build()
    }
}

/// The limits of the proxy towards the upstream (the gateway builder's docs say each one).
#[derive(Clone, Copy, Debug)]
pub(super) struct ProxyOptions {
    pub(super) head_timeout: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) max_inflight: usize,
    pub(super) pool_max_idle: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            head_timeout: super::DEFAULT_UPSTREAM_TIMEOUT,
            idle_timeout: super::DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            max_inflight: super::DEFAULT_UPSTREAM_MAX_INFLIGHT,
            pool_max_idle: super::DEFAULT_UPSTREAM_POOL_MAX_IDLE,
        }
    }
}

/// Forwards to the upstream; an upstream that cannot be reached is a `502` (or `504` past
/// the timeout), never an error, so the gateway stays infallible.
///
/// One reference count to clone: the cache clones its inner service on every request, hits
/// included.
#[derive(Clone)]
pub(crate) struct Proxy(Arc<ProxyShared>);

/// What every clone of a [`Proxy`] shares.
struct ProxyShared {
    send: SendFn,
    upstream: Upstream,
    authorization: Option<HeaderValue>,
    options: ProxyOptions,
    /// One permit per upstream request in flight, held until its body ends.
    slots: Arc<Semaphore>,
    metrics: Arc<GatewayMetrics>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstream", &self.0.upstream)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub(super) fn new<C>(
        connector: C,
        upstream: Upstream,
        authorization: Option<HeaderValue>,
        options: ProxyOptions,
        metrics: Arc<GatewayMetrics>,
    ) -> Self
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let client: Client<C, GatewayBody> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(options.pool_max_idle)
            .build(connector);
        let send: SendFn = Arc::new(move |req| {
            let fut = client.request(req);
            Box::pin(async move {
                let res = fut.await?;
                Ok(res.map(|b| b.map_err(BoxError::from).boxed_unsync()))
            })
        });
        Self(Arc::new(ProxyShared {
            send,
            upstream,
            authorization,
            slots: Arc::new(Semaphore::new(options.max_inflight.max(1))),
            options,
            metrics,
        }))
    }

    fn prepare(
        &self,
        req: Request<RequestBody<GatewayBody>>,
    ) -> Result<Request<GatewayBody>, http::Error> {
        let (mut parts, body) = req.into_parts();
        parts.uri = self.0.upstream.uri(&parts.uri)?;
        parts.version = Version::HTTP_11;
        let headers = &mut parts.headers;
        let tenant_credential_in_authorization = authorization_is_tenant_credential(headers);
        remove_hop_by_hop(headers);
        headers.remove(header::HOST);
        for name in [X_CACHECORE_TOKEN, X_CACHECORE_DEPS, X_CACHECORE_BYPASS] {
            headers.remove(name);
        }
        match &self.0.authorization {
            Some(value) => {
                headers.insert(header::AUTHORIZATION, value.clone());
            }
            None if tenant_credential_in_authorization => {
                headers.remove(header::AUTHORIZATION);
            }
            None => {}
        }
        Ok(Request::from_parts(parts, body.boxed_unsync()))
    }
}

/// Whether the request's `Authorization` carries the caller's tenant credential, which never
/// leaves the gateway (the module docs of `gateway` say what is forwarded).
///
/// The rule follows where the authenticator looks ([`bearer_token`]), not what the token looks
/// like, so that it holds for every authenticator and for tokens it rejects (an expired JWT is
/// still a tenant's):
/// - without `X-CacheCore-Token`, a `Bearer` value in `Authorization` is the tenant credential,
///   whatever it holds;
/// - with it, `Authorization` is the caller's own (a provider key) and is forwarded, unless it
///   holds a `cc_`-prefixed tenant key or the same token as `X-CacheCore-Token`.
fn authorization_is_tenant_credential(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    // Parsed by the function the authenticators use, so that the two never disagree.
    let mut only_authorization = HeaderMap::with_capacity(1);
    only_authorization.insert(header::AUTHORIZATION, value.clone());
    let Some(in_authorization) = bearer_token(&only_authorization) else {
        // No `Bearer` scheme: nothing an authenticator reads as a token.
        return false;
    };
    if !headers.contains_key(X_CACHECORE_TOKEN) {
        return true;
    }
    in_authorization.starts_with("cc_")
        || bearer_token(headers)
            .is_some_and(|tenant| strip_key_prefix(tenant) == strip_key_prefix(in_authorization))
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<GatewayBody> {
    full(
        status,
        "application/json",
        ErrorEnvelope::body(code, message),
    )
}

impl Service<Request<RequestBody<GatewayBody>>> for Proxy {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<GatewayBody>>) -> Self::Future {
        let req = match self.prepare(req) {
            Ok(req) => req,
            Err(e) => {
                let res = error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("cannot forward: {e}"),
                );
                return Box::pin(std::future::ready(Ok(res)));
            }
        };
        let send = Arc::clone(&self.0.send);
        let slots = Arc::clone(&self.0.slots);
        let options = self.0.options;
        let metrics = Arc::clone(&self.0.metrics);
        Box::pin(async move {
            // The wait for a slot counts against the head timeout: the caller waits once.
            let head = async {
                let permit = slots.acquire_owned().await.ok();
                let guard = Inflight::new(permit, Arc::clone(&metrics));
                (send(req).await, guard)
            };
            Ok(
                match tokio::time::timeout(options.head_timeout, head).await {
                    Ok((Ok(mut res), guard)) => {
                        remove_hop_by_hop(res.headers_mut());
                        res.map(|body| {
                            UpstreamBody {
                                inner: body,
                                idle: options.idle_timeout,
                                timer: None,
                                armed: false,
                                _guard: guard,
                            }
                            .boxed_unsync()
                        })
                    }
                    Ok((Err(e), _)) => {
                        metrics.upstream_error("unreachable");
                        tracing::warn!(target: "cachecore::gateway", error = %e, "upstream unreachable");
                        error_response(
                            StatusCode::BAD_GATEWAY,
                            "upstream_unavailable",
                            &format!("the upstream could not be reached: {e}"),
                        )
                    }
                    Err(_) => {
                        metrics.upstream_error("timeout");
                        tracing::warn!(target: "cachecore::gateway", timeout = ?options.head_timeout,
                        "upstream did not answer in time");
                        error_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream_timeout",
                            "the upstream did not answer in time",
                        )
                    }
                },
            )
        })
    }
}

/// An upstream request in flight: its slot and its place in the gauge, given back on drop
/// (when the response body ends or is dropped).
struct Inflight {
    _permit: Option<OwnedSemaphorePermit>,
    metrics: Arc<GatewayMetrics>,
}

impl Inflight {
    fn new(permit: Option<OwnedSemaphorePermit>, metrics: Arc<GatewayMetrics>) -> Self {
        metrics.upstream_inflight.inc();
        Self {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.metrics.upstream_inflight.dec();
    }
}

/// An upstream response body that ends with an error after `idle` without a chunk, and holds
/// its request's slot until it ends.
struct UpstreamBody {
    inner: GatewayBody,
    idle: Duration,
    /// Allocated on the first wait, then reset: one timer per response.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer runs: from the first wait after a chunk until the next chunk.
    armed: bool,
    _guard: Inflight,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        // The upstream is asked first: a chunk that is ready wins over a timer that also fired
        // (the caller may have been slow to read, which is not the upstream's silence).
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame);
        }
        let deadline = Instant::now() + this.idle;
        let timer = match &mut this.timer {
            Some(timer) if this.armed => timer,
            Some(timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        this.armed = true;
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.armed = false;
        this._guard.metrics.upstream_error("idle_timeout");
        tracing::warn!(target: "cachecore::gateway", idle = ?this.idle,
            "upstream body went silent; cutting the response");
        Poll::Ready(Some(Err(format!(
            "the upstream sent nothing for {:?}",
            this.idle
        )
        .into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
