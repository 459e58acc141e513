//! The inner service of the gateway: forwards a request to the upstream.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use super::{full, BoxError, GatewayBody, GatewayMetrics};
use crate::auth::{bearer_token, strip_key_prefix, X_CACHECORE_TOKEN};
use crate::wire::{X_CACHECORE_BYPASS, X_CACHECORE_DEPS};
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

/// Forwards to the upstream; an upstream that cannot be reached is a `502` (or `504` past
/// the timeout), never an error, so the gateway stays infallible.
#[derive(Clone)]
pub(crate) struct Proxy {
    send: SendFn,
    upstream: Upstream,
    authorization: Option<HeaderValue>,
    timeout: Option<Duration>,
    metrics: Arc<GatewayMetrics>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub(super) fn new<C>(
        connector: C,
        upstream: Upstream,
        authorization: Option<HeaderValue>,
        timeout: Option<Duration>,
        metrics: Arc<GatewayMetrics>,
    ) -> Self
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let client: Client<C, GatewayBody> = Client::builder(TokioExecutor::new()).build(connector);
        let send: SendFn = Arc::new(move |req| {
            let fut = client.request(req);
            Box::pin(async move {
                let res = fut.await?;
                Ok(res.map(|b| b.map_err(BoxError::from).boxed_unsync()))
            })
        });
        Self {
            send,
            upstream,
            authorization,
            timeout,
            metrics,
        }
    }

    fn prepare(
        &self,
        req: Request<RequestBody<GatewayBody>>,
    ) -> Result<Request<GatewayBody>, http::Error> {
        let (mut parts, body) = req.into_parts();
        parts.uri = self.upstream.uri(&parts.uri)?;
        parts.version = Version::HTTP_11;
        let headers = &mut parts.headers;
        let tenant_credential_in_authorization = authorization_is_tenant_credential(headers);
        remove_hop_by_hop(headers);
        headers.remove(header::HOST);
        for name in [X_CACHECORE_TOKEN, X_CACHECORE_DEPS, X_CACHECORE_BYPASS] {
            headers.remove(name);
        }
        match &self.authorization {
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

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1), and those
/// the `Connection` header names.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<GatewayBody> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    full(status, "application/json", body)
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
        let send = (self.send)(req);
        let timeout = self.timeout;
        let metrics = Arc::clone(&self.metrics);
        Box::pin(async move {
            let outcome = match timeout {
                Some(t) => tokio::time::timeout(t, send).await.ok(),
                None => Some(send.await),
            };
            Ok(match outcome {
                Some(Ok(mut res)) => {
                    remove_hop_by_hop(res.headers_mut());
                    res
                }
                Some(Err(e)) => {
                    metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "cachecore::gateway", error = %e, "upstream unreachable");
                    error_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream_unavailable",
                        &format!("the upstream could not be reached: {e}"),
                    )
                }
                None => {
                    metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        "the upstream did not answer in time",
                    )
                }
            })
        })
    }
}
