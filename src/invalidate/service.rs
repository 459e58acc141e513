//! The `POST /v1/invalidate` service.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use tower_service::Service;

use super::payload::{BatchBody, InvalidateRequest, WireResult};
use super::{ApiError, Invalidator, MAX_BODY_BYTES};
use crate::auth::Authenticator;
use crate::edge::{read_capped, BoxError, CappedReadError};
use crate::{DepError, DepErrorKind, DepInvalidated, Invalidated, Invalidation, InvalidationError};

/// The tower service behind `POST /v1/invalidate` (see the [module docs](super)).
///
/// Generic over the request body, infallible, and cheap to clone: mount it in axum with
/// `Router::route_service("/v1/invalidate", service)`, or call it from any tower stack.
#[derive(Clone)]
pub struct InvalidateService {
    target: Arc<dyn Invalidator>,
    auth: Arc<dyn Authenticator>,
    max_body: usize,
}

impl fmt::Debug for InvalidateService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidateService")
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl InvalidateService {
    /// A service that invalidates through `target` (a [`CachecoreLayer`], usually) in the
    /// tenant `auth` resolves for each call.
    ///
    /// [`CachecoreLayer`]: crate::CachecoreLayer
    pub fn new(target: impl Invalidator, auth: impl Authenticator) -> Self {
        Self {
            target: Arc::new(target),
            auth: Arc::new(auth),
            max_body: MAX_BODY_BYTES,
        }
    }

    /// [`new`](Self::new) with shared parts.
    pub fn from_shared(target: Arc<dyn Invalidator>, auth: Arc<dyn Authenticator>) -> Self {
        Self {
            target,
            auth,
            max_body: MAX_BODY_BYTES,
        }
    }

    /// The largest body read (default [`MAX_BODY_BYTES`], 64 KiB); larger bodies get `413`
    /// and are never buffered beyond the limit.
    #[must_use]
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body = max;
        self
    }

    /// Handles one request; every rejection is an [`ApiError`] and nothing was invalidated.
    async fn handle<B>(&self, req: Request<B>) -> Result<Response<Full<Bytes>>, ApiError>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        if req.method() != Method::POST {
            return Err(ApiError::method_not_allowed(req.method()));
        }
        let namespace = self
            .auth
            .authenticate(req.headers())
            .map_err(ApiError::unauthorized)?;
        check_content_type(req.headers())?;
        let body = read_capped(req.into_body(), self.max_body)
            .await
            .map_err(|e| match e {
                CappedReadError::TooLarge => ApiError::too_large(self.max_body),
                CappedReadError::Body(e) => ApiError::unreadable_body(e),
            })?;
        let request = InvalidateRequest::parse(&body)?;
        let (single, dep_ids, new_hash) = match request {
            InvalidateRequest::Single { dep_id, new_hash } => (true, vec![dep_id], new_hash),
            InvalidateRequest::Batch { dep_ids, new_hash } => (false, dep_ids, new_hash),
        };
        let mut invalidation = Invalidation::of(dep_ids).tenant(namespace.tenant());
        if let Some(hash) = new_hash {
            invalidation = invalidation.new_hash(hash);
        }
        let first = invalidation.dep_ids().next().unwrap_or_default().to_owned();
        let results = self
            .target
            .invalidate(invalidation)
            .await
            .map_or_else(InvalidationError::into_results, Invalidated::into_results);
        Ok(if single {
            let result = results
                .into_iter()
                .next()
                .unwrap_or_else(|| Err(DepError::new(first, DepErrorKind::Other, "no result")));
            single_response(result)
        } else {
            batch_response(results)
        })
    }
}

/// `200` when the dep was invalidated; `503` (same body shape, `ok: false`) when the store
/// failed, so that clients retry.
fn single_response(result: Result<DepInvalidated, DepError>) -> Response<Full<Bytes>> {
    let wire = WireResult::from(result);
    let body = serde_json::to_vec(&wire.single()).expect("result serializes");
    let status = if wire.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, body)
}

/// `200` with one result per id, in order, when any succeeded (check each `ok`); `503` when
/// none did.
fn batch_response(results: Vec<Result<DepInvalidated, DepError>>) -> Response<Full<Bytes>> {
    let status = if results.iter().any(Result::is_ok) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_vec(&BatchBody {
        results: results.into_iter().map(WireResult::from).collect(),
    })
    .expect("results serialize");
    json_response(status, body)
}

pub(super) fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// JSON, or no content type at all, or `application/x-www-form-urlencoded`: what `curl -d`
/// sends when not told otherwise, and the hosted product's own curl recipes are written that
/// way. The body is parsed as JSON in every case.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let raw = String::from_utf8_lossy(value.as_bytes());
    let essence = raw
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json || essence == "application/x-www-form-urlencoded" {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(&raw))
    }
}

impl<B> Service<Request<B>> for InvalidateService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        ResponseFuture(Box::pin(async move {
            Ok(match this.handle(req).await {
                Ok(res) => res,
                Err(e) => {
                    tracing::info!(target: "cachecore::invalidate", status = e.status().as_u16(),
                        code = e.code(), reason = e.message(), "invalidation request rejected");
                    e.into_response()
                }
            })
        }))
    }
}

/// Response future of [`InvalidateService`] (boxed: an invalidation is a store round trip, not
/// a hot path).
pub struct ResponseFuture(Pin<Box<dyn Future<Output = Result<JsonResponse, Infallible>> + Send>>);

type JsonResponse = Response<Full<Bytes>>;

impl Future for ResponseFuture {
    type Output = Result<JsonResponse, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
