//! `CachecoreClient`: invalidate on a remote gateway (feature `client`).
//!
//! For Rust services that share a cache through a gateway (`examples/gateway.rs`, or any
//! server mounting [`InvalidateService`]): webhooks, ETL jobs, deploy hooks.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use cachecore::client::CachecoreClient;
//! use cachecore::Invalidation;
//!
//! let cc = CachecoreClient::new("http://127.0.0.1:8080", "cc_live_k1.eyJ...")?;
//!
//! // A record changed (the webhook pattern).
//! cc.invalidate(Invalidation::of(["doc:contract-123"]).new_hash("v2")).await?;
//!
//! // A nightly ETL run (the batch pattern).
//! let batch = Invalidation::of(["table:products", "table:prices"]).new_hash("batch-2026-11-23");
//! if let Err(e) = cc.invalidate(batch).await {
//!     for failed in e.failed() {
//!         eprintln!("{} failed: {failed}", failed.dep_id());
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! It answers like a layer's [`CacheInvalidator`](crate::CacheInvalidator), and is an
//! [`Invalidator`]: a queue worker or an invalidation service can apply what it receives on
//! a remote gateway. A call that fails as a whole fails for every dep, with the kind
//! [`Transport`](DepErrorKind::Transport) (the gateway could not be reached, or kept failing
//! until the retries ran out), [`Rejected`](DepErrorKind::Rejected) (a `4xx`) or
//! [`Other`](DepErrorKind::Other) (an answer that could not be read); the [`ClientError`] is
//! the error's [`source`](std::error::Error::source), and [`ClientError::of`] finds it.
//!
//! The gateway works in the tenant of the token. An invalidation naming a tenant is sent only
//! when it is the one [`CachecoreClientBuilder::tenant`] declared (the wire carries no tenant):
//! otherwise its deps fail with [`DepErrorKind::Tenant`] rather than land in another tenant.
//!
//! Calls are retried, with exponential backoff and jitter, on connection errors, timeouts,
//! `5xx` and `429` (waiting at least the `Retry-After` the server asks for); other `4xx`
//! are returned at once. Retrying is safe: invalidating twice has the effect of invalidating
//! once.
//!
//! The client speaks plain HTTP/1.1 through hyper-util's connection pool and carries no TLS
//! stack. For `https://` gateways, pass a TLS connector (for example `hyper-rustls`'s
//! `HttpsConnector`) to [`CachecoreClientBuilder::build_with_connector`].
//!
//! [`InvalidateService`]: crate::invalidate::InvalidateService

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::edge::{read_capped, BoxError};
use crate::invalidate::payload::{BatchBody, RequestBody, WireResult};
use crate::invalidate::{ApiError, InvalidateFuture, Invalidator};
use crate::{DepError, DepErrorKind, Invalidated, Invalidation, InvalidationError};

/// Attempts per call, the first included.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Backoff before the first retry; doubles each time.
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_millis(100);
/// Longest backoff between two attempts.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(5);
/// Longest `Retry-After` honoured; a server asking for more ends the retries.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Per attempt, from sending the request to the end of the response body.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read: a thousand results fit in a tenth of it.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The path of the invalidation API under the gateway URL.
const INVALIDATE_PATH: &str = "/v1/invalidate";

/// Why a call failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL or token given to the builder cannot be used.
    InvalidConfig(String),
    /// The gateway answered with an error status. For `4xx` this is returned at once; `5xx`
    /// and `429` end up inside [`RetriesExhausted`](Self::RetriesExhausted).
    Http {
        /// The status.
        status: StatusCode,
        /// The error code from the body (`invalid_dep_id`, `unauthorized`, ...), when it was
        /// the API's JSON error.
        code: Option<String>,
        /// The message from the body, or the body itself.
        message: String,
    },
    /// The request could not be sent or its response not read (connection refused, reset).
    Transport(BoxError),
    /// No complete response within the per-attempt timeout.
    Timeout(Duration),
    /// A success status with a body that is not the expected JSON.
    Decode(String),
    /// Every attempt failed with a retryable error; `last` is the last one.
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The error of the last attempt.
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// The HTTP status of the (last) error response, if the gateway answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Http { status, .. } => Some(*status),
            Self::RetriesExhausted { last, .. } => last.status(),
            _ => None,
        }
    }

    /// The API error code of the (last) error response, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Http { code, .. } => code.as_deref(),
            Self::RetriesExhausted { last, .. } => last.code(),
            _ => None,
        }
    }

    /// The client error that failed a [`CachecoreClient::invalidate`] as a whole, if that is
    /// what happened (rather than some deps failing on the gateway).
    pub fn of(error: &InvalidationError) -> Option<&Self> {
        std::error::Error::source(error)?.downcast_ref()
    }

    /// The kind every dep of a call that failed this way fails with.
    fn dep_error_kind(&self) -> DepErrorKind {
        match self {
            Self::Decode(_) => DepErrorKind::Other,
            Self::RetriesExhausted { .. } => DepErrorKind::Transport,
            e if e.retryable() => DepErrorKind::Transport,
            _ => DepErrorKind::Rejected,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Timeout(_) => true,
            Self::Http { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidConfig(why) => write!(f, "invalid client configuration: {why}"),
            Self::Http {
                status,
                code: Some(code),
                message,
            } => write!(f, "gateway answered {status} ({code}): {message}"),
            Self::Http {
                status, message, ..
            } => write!(f, "gateway answered {status}: {message}"),
            Self::Transport(e) => write!(f, "could not reach the gateway: {e}"),
            Self::Timeout(d) => write!(f, "no answer from the gateway within {d:?}"),
            Self::Decode(why) => write!(f, "unexpected answer from the gateway: {why}"),
            Self::RetriesExhausted { attempts, last } => {
                write!(f, "gave up after {attempts} attempts: {last}")
            }
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Transport(e) => Some(&**e),
            Self::RetriesExhausted { last, .. } => Some(&**last),
            _ => None,
        }
    }
}

/// Configures a [`CachecoreClient`].
#[derive(Clone)]
#[must_use]
pub struct CachecoreClientBuilder {
    gateway_url: String,
    token: String,
    tenant: Option<String>,
    retry: Retry,
}

/// How a call is retried and timed: the builder's settings, which the client keeps.
#[derive(Clone, Debug)]
struct Retry {
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
    max_retry_after: Duration,
    timeout: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            base_delay: DEFAULT_BASE_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl fmt::Debug for CachecoreClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachecoreClientBuilder")
            .field("gateway_url", &self.gateway_url)
            .field("tenant", &self.tenant)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl CachecoreClientBuilder {
    /// Attempts per call, the first included (default 4; at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.retry.max_attempts = attempts.max(1);
        self
    }

    /// Backoff before the first retry (default 100 ms), doubling up to `max` (default 5 s).
    /// Each wait is drawn between half and all of the current backoff.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry.base_delay = base;
        self.retry.max_delay = max.max(base);
        self
    }

    /// Longest `Retry-After` honoured (default 30 s). A `429`/`503` asking for longer is
    /// returned instead of retried.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.retry.max_retry_after = max;
        self
    }

    /// Time allowed per attempt (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.retry.timeout = timeout;
        self
    }

    /// The tenant the token is for. An invalidation naming this tenant is sent; one naming
    /// another fails with [`DepErrorKind::Tenant`]. Without it, only invalidations naming no
    /// tenant are sent (the token's tenant applies).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Builds a plain-HTTP client.
    pub fn build(self) -> Result<CachecoreClient, ClientError> {
        let uri = self.endpoint()?;
        if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
            return Err(ClientError::InvalidConfig(format!(
                "{} is not an http:// URL; for https pass a TLS connector to build_with_connector",
                self.gateway_url
            )));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        self.build_with_connector(connector)
    }

    /// Builds a client that connects through `connector` (a TLS connector for `https://`).
    pub fn build_with_connector<C>(self, connector: C) -> Result<CachecoreClient<C>, ClientError>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let endpoint = self.endpoint()?;
        let token = self.token.trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token).trim_start();
        if token.is_empty() {
            return Err(ClientError::InvalidConfig(
                "the tenant token is empty".into(),
            ));
        }
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ClientError::InvalidConfig("the tenant token is not a valid header value".into())
            })?;
        authorization.set_sensitive(true);
        Ok(CachecoreClient {
            http: Client::builder(TokioExecutor::new()).build(connector),
            endpoint,
            authorization,
            tenant: self.tenant,
            retry: self.retry,
        })
    }

    fn endpoint(&self) -> Result<Uri, ClientError> {
        let base: Uri = self.gateway_url.trim().parse().map_err(|e| {
            ClientError::InvalidConfig(format!("gateway URL {:?}: {e}", self.gateway_url))
        })?;
        let (Some(scheme), Some(authority)) = (base.scheme(), base.authority()) else {
            return Err(ClientError::InvalidConfig(format!(
                "gateway URL {:?} needs a scheme and a host, e.g. http://127.0.0.1:8080",
                self.gateway_url
            )));
        };
        let prefix = base.path().trim_end_matches('/');
        Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query(format!("{prefix}{INVALIDATE_PATH}"))
            .build()
            .map_err(|e| ClientError::InvalidConfig(e.to_string()))
    }
}

/// A client for a remote gateway's invalidation API, holding one tenant's token.
///
/// Cheap to clone (the connection pool is shared). See the [module docs](self).
#[derive(Clone)]
pub struct CachecoreClient<C = HttpConnector> {
    http: Client<C, Full<Bytes>>,
    endpoint: Uri,
    authorization: HeaderValue,
    tenant: Option<String>,
    retry: Retry,
}

impl<C> fmt::Debug for CachecoreClient<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachecoreClient")
            .field("endpoint", &self.endpoint)
            .field("tenant", &self.tenant)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl CachecoreClient {
    /// A plain-HTTP client for the gateway at `gateway_url` (e.g. `http://127.0.0.1:8080`;
    /// requests go to `<gateway_url>/v1/invalidate`) with the tenant's token
    /// (`[cc_live_<id>.]<jwt>`), and the default retry policy.
    pub fn new(
        gateway_url: impl Into<String>,
        tenant_token: impl Into<String>,
    ) -> Result<Self, ClientError> {
        Self::builder(gateway_url, tenant_token).build()
    }

    /// A builder, to change the retry policy or the connector.
    pub fn builder(
        gateway_url: impl Into<String>,
        tenant_token: impl Into<String>,
    ) -> CachecoreClientBuilder {
        CachecoreClientBuilder {
            gateway_url: gateway_url.into(),
            token: tenant_token.into(),
            tenant: None,
            retry: Retry::default(),
        }
    }
}

impl<C> CachecoreClient<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// Invalidates on the gateway, in the token's tenant: `Ok` when every dep was
    /// invalidated, else an error reporting each dep (see the [module docs](self) for what a
    /// failed call reports). One dep is sent in the single form, more in the batch form; none
    /// sends nothing.
    ///
    /// A store failure on the gateway is a `503`, retried like any other; so are connection
    /// errors, timeouts and `429`.
    pub async fn invalidate(
        &self,
        invalidation: Invalidation,
    ) -> Result<Invalidated, InvalidationError> {
        let dep_ids: Vec<&str> = invalidation.dep_ids().collect();
        if let Some(tenant) = invalidation.tenant_name() {
            if self.tenant.as_deref() != Some(tenant) {
                let why = format!(
                    "the client's token is not declared for tenant {tenant:?} \
                     (CachecoreClientBuilder::tenant)"
                );
                return Invalidated::from_results(
                    dep_ids
                        .iter()
                        .map(|id| Err(DepError::new(*id, DepErrorKind::Tenant, why.as_str())))
                        .collect(),
                );
            }
        }
        let new_hash = invalidation.hash();
        let sent = match dep_ids.as_slice() {
            [] => return Invalidated::from_results(Vec::new()),
            [dep_id] => self
                .call(&RequestBody {
                    dep_id: Some(dep_id),
                    dep_ids: None,
                    new_hash,
                })
                .await
                .and_then(|bytes| decode::<WireResult>(&bytes))
                .map(|r| vec![r.into_result()]),
            _ => self
                .call(&RequestBody {
                    dep_id: None,
                    dep_ids: Some(&dep_ids),
                    new_hash,
                })
                .await
                .and_then(|bytes| decode::<BatchBody>(&bytes))
                .map(|b| b.results.into_iter().map(WireResult::into_result).collect()),
        };
        match sent {
            Ok(results) => Invalidated::from_results(results),
            Err(e) => Err(InvalidationError::every_dep(dep_ids, e.dep_error_kind(), e)),
        }
    }

    /// Sends the body until it succeeds, fails for good, or the attempts run out.
    async fn call(&self, body: &RequestBody<'_>) -> Result<Bytes, ClientError> {
        let body = Bytes::from(serde_json::to_vec(body).expect("request serializes"));
        let retry = &self.retry;
        let mut backoff = retry.base_delay;
        let mut attempt = 1;
        loop {
            let (error, retry_after) = match self.attempt(body.clone()).await {
                Ok(bytes) => return Ok(bytes),
                Err(failure) => failure,
            };
            if !error.retryable() {
                return Err(error);
            }
            let give_up = |error| ClientError::RetriesExhausted {
                attempts: attempt,
                last: Box::new(error),
            };
            if attempt >= retry.max_attempts {
                return Err(give_up(error));
            }
            let mut wait = jitter(backoff);
            if let Some(asked) = retry_after {
                if asked > retry.max_retry_after {
                    return Err(give_up(error));
                }
                wait = wait.max(asked);
            }
            tracing::debug!(target: "cachecore::client", attempt, ?wait, %error, "retrying invalidation");
            tokio::time::sleep(wait).await;
            backoff = backoff.saturating_mul(2).min(retry.max_delay);
            attempt += 1;
        }
    }

    /// One attempt: the body of a 2xx, or the error and the `Retry-After` asked for.
    async fn attempt(&self, body: Bytes) -> Result<Bytes, (ClientError, Option<Duration>)> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.endpoint.clone();
        let headers = req.headers_mut();
        headers.insert(header::AUTHORIZATION, self.authorization.clone());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));

        let exchange = async {
            let res = self
                .http
                .request(req)
                .await
                .map_err(|e| (ClientError::Transport(Box::new(e)), None))?;
            let status = res.status();
            let retry_after = retry_after(res.headers());
            let bytes = read_capped(res.into_body(), MAX_RESPONSE_BYTES)
                .await
                .map_err(|e| (ClientError::Transport(e.into_box()), None))?;
            if status.is_success() {
                Ok(bytes)
            } else {
                Err((http_error(status, &bytes), retry_after))
            }
        };
        match tokio::time::timeout(self.retry.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err((ClientError::Timeout(self.retry.timeout), None)),
        }
    }
}

/// A 2xx answer's body.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

impl<C> Invalidator for CachecoreClient<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    fn invalidate(&self, invalidation: Invalidation) -> InvalidateFuture<'_> {
        Box::pin(CachecoreClient::invalidate(self, invalidation))
    }
}

/// The error for a non-2xx answer: the API's `{"error": {...}}`, a failed result's `error`, or
/// the body as text.
fn http_error(status: StatusCode, body: &[u8]) -> ClientError {
    if let Some(e) = ApiError::from_body(status, body) {
        return ClientError::Http {
            status,
            code: Some(e.code().to_owned()),
            message: e.message().to_owned(),
        };
    }
    if let Ok(r) = serde_json::from_slice::<WireResult>(body) {
        if let Some(error) = r.error {
            return ClientError::Http {
                status,
                code: None,
                message: format!("{}: {error}", r.dep_id),
            };
        }
    }
    /// Enough of an unexpected body (an HTML error page) to recognise it.
    const SHOWN: usize = 512;
    let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN)]).into_owned();
    ClientError::Http {
        status,
        code: None,
        message: text,
    }
}

/// `Retry-After` as delay-seconds or as an HTTP date (RFC 9110 section 10.2.3); a date in the
/// past means "now".
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A wait between half and all of `backoff`, so that clients failing together do not retry
/// together.
fn jitter(backoff: Duration) -> Duration {
    let half = backoff / 2;
    let span = u64::try_from((backoff - half).as_nanos()).unwrap_or(u64::MAX);
    if span == 0 {
        return backoff;
    }
    // RandomState is seeded from the OS per process and stepped per instance: random enough
    // for spreading retries, without a dependency.
    let r = RandomState::new().hash_one(std::time::Instant::now());
    half + Duration::from_nanos(r % span)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_retry_after(v: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(header::RETRY_AFTER, v.parse().unwrap());
        h
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        assert_eq!(
            retry_after(&with_retry_after("7")),
            Some(Duration::from_secs(7))
        );
        let soon = std::time::SystemTime::now() + Duration::from_secs(120);
        let wait = retry_after(&with_retry_after(&httpdate::fmt_http_date(soon))).unwrap();
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        let past = "Wed, 21 Oct 2015 07:28:00 GMT";
        assert_eq!(retry_after(&with_retry_after(past)), Some(Duration::ZERO));
        assert_eq!(retry_after(&with_retry_after("soon")), None);
        assert_eq!(retry_after(&http::HeaderMap::new()), None);
    }

    #[test]
    fn endpoint_keeps_a_base_path() {
        let b = CachecoreClient::builder("http://127.0.0.1:9/gw/", "t");
        assert_eq!(
            b.endpoint().unwrap().to_string(),
            "http://127.0.0.1:9/gw/v1/invalidate"
        );
        assert!(CachecoreClient::new("https://x", "t").is_err());
        assert!(CachecoreClient::new("127.0.0.1:8080", "t").is_err());
        assert!(CachecoreClient::new("http://127.0.0.1:8080", " ").is_err());
    }

    #[test]
    fn jitter_stays_within_half_and_all() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
    }
}
