//! The transport-neutral part of the cache: context, key, lookup, admission, put, invalidate.
//!
//! The tower service and the reqwest adapter are thin shells over [`Engine`]; no cache logic
//! lives anywhere else.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Extensions, HeaderMap, Method, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::auth::{AuthError, Authenticator};
use crate::context::{ContextResolver, RequestHead};
use crate::headers::{
    cache_control, content_length, is_event_stream, remove_hop_by_hop, vary_names, VARY_KEY,
    X_CACHE, X_CACHE_AGE, X_CACHE_SIMILARITY,
};
use crate::key::{self, to_hex, BodyKeying, KeyMemo, KeyParts};
use crate::metrics::{LatencyHistogram, Metrics, StoreOp};
use crate::namespace::{
    CredentialHash, Namespace, NamespaceResolver, ANONYMOUS_PARTITION, DEFAULT_POLICY_VERSION,
    DEFAULT_TENANT,
};
use crate::store::{
    duration_ms, now_ms, CacheKey, CacheStore, DepEpochs, Entry, InvalidationResult, Lookup,
    PutOutcome,
};
use crate::{current_scope, validate_dep_id, CacheStatus, Dep, RequestContext, POLICY_DEP};

/// Defaults, chosen for LLM calls: answers are expensive and requests are a few KiB.
pub(crate) mod defaults {
    use std::time::Duration;
    /// An hour: long enough to pay off an LLM call, short enough to bound surprise.
    pub(crate) const FRESH_TTL: Duration = Duration::from_secs(3600);
    /// Off: serving stale is an explicit choice.
    pub(crate) const STALE_WINDOW: Duration = Duration::ZERO;
    /// 2 MiB covers long-context chat requests; larger bodies pass through uncached.
    pub(crate) const MAX_BODY: usize = 2 * 1024 * 1024;
    /// 8 MiB of response is recorded at most; larger responses are forwarded, not stored.
    pub(crate) const MAX_RESPONSE: usize = 8 * 1024 * 1024;
    /// Well under an LLM call and well over a healthy Redis round trip.
    pub(crate) const STORE_TIMEOUT: Duration = Duration::from_millis(250);
    /// Consecutive store failures that open the circuit breaker.
    pub(crate) const BREAKER_FAILURES: u32 = 5;
    /// How long an open breaker skips the store.
    pub(crate) const BREAKER_COOLDOWN: Duration = Duration::from_secs(5);
    /// The longest a single-flight follower waits for its leader before calling upstream
    /// itself. A leader that fails, is dropped or whose body is dropped releases its followers
    /// at once, so this bound only matters for a leader that is alive but slow: long enough
    /// to cover a normal non-streamed LLM completion (a few seconds, rarely past 30), so a slow
    /// call does not turn into a stampede; short enough that a stuck upstream call does not
    /// hold every identical request much longer than a client would wait anyway.
    pub(crate) const COALESCE_WAIT: Duration = Duration::from_secs(30);
    /// How long followers wait for a leader's body once its head has arrived. A non-streamed
    /// body follows its head within milliseconds; one that has not ended a second later is
    /// most likely not being read (its caller awaits something else first), so the followers
    /// stop waiting on it and call upstream themselves.
    pub(crate) const COALESCE_BODY_WAIT: Duration = Duration::from_secs(1);
}

#[derive(Clone)]
pub(crate) enum NamespaceSource {
    Fixed(Namespace),
    /// Keys partitioned by a hash of the credentials header (DESIGN section 3), deps in the
    /// default tenant.
    Credentials {
        /// The namespace of a request without credentials; the others differ only in their
        /// partition (built once, so a request costs no allocation for it).
        anonymous: Namespace,
    },
    Resolver(NamespaceResolver),
    /// The namespace an authenticator gives the request's credentials (trusted-header mode).
    Authenticated(Arc<dyn Authenticator>),
}

impl NamespaceSource {
    /// Keys partitioned by the credentials, at `policy_version`.
    pub(crate) fn credentials(policy_version: Arc<str>) -> Self {
        Self::Credentials {
            anonymous: Namespace::new(DEFAULT_TENANT, policy_version)
                .with_partition(ANONYMOUS_PARTITION),
        }
    }

    fn resolve(&self, head: &RequestHead<'_>, credentials: &[HeaderName]) -> Option<Namespace> {
        match self {
            Self::Fixed(ns) => Some(ns.clone()),
            Self::Resolver(f) => f(head),
            Self::Authenticated(auth) => auth.authenticate(head.headers).ok(),
            Self::Credentials { anonymous } => {
                let partition = CredentialHash::of(credentials, head.headers).finish();
                Some(match partition {
                    Some(p) => anonymous.clone().with_partition(p.as_str()),
                    None => anonymous.clone(),
                })
            }
        }
    }

    /// Whether keys are partitioned by the credentials the layer sees (no tenant configured).
    pub(crate) fn is_credentials(&self) -> bool {
        matches!(self, Self::Credentials { .. })
    }

    /// For an authenticator, the one verification of the request's credentials: `Some(None)`
    /// when it has none, an error saying why when they are rejected. `None` for other sources.
    fn authenticate(&self, head: &RequestHead<'_>) -> Result<Option<Option<Namespace>>, String> {
        let Self::Authenticated(auth) = self else {
            return Ok(None);
        };
        match auth.authenticate(head.headers) {
            Ok(ns) => Ok(Some(Some(ns))),
            Err(AuthError::Missing) => Ok(Some(None)),
            Err(e @ AuthError::Invalid(_)) => Err(e.to_string()),
        }
    }

    /// The tenant `invalidate` works on when none is named; `None` when tenants come from a
    /// resolver or an authenticator, where no tenant is "the" tenant.
    fn default_tenant(&self) -> Option<Arc<str>> {
        match self {
            Self::Fixed(ns) => Some(ns.tenant_shared().clone()),
            Self::Credentials { anonymous } => Some(anonymous.tenant_shared().clone()),
            Self::Resolver(_) | Self::Authenticated(_) => None,
        }
    }
}

/// Everything the layer is configured with.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) fresh_ttl: Duration,
    pub(crate) stale_window: Duration,
    pub(crate) max_body: usize,
    pub(crate) max_response: usize,
    pub(crate) vary: Vec<HeaderName>,
    pub(crate) keying: BodyKeying,
    pub(crate) namespace: NamespaceSource,
    pub(crate) context_resolver: Option<ContextResolver>,
    pub(crate) store_timeout: Duration,
    pub(crate) methods: Vec<Method>,
    pub(crate) breaker_failures: u32,
    pub(crate) breaker_cooldown: Duration,
    pub(crate) similarity_header: bool,
    pub(crate) credential_headers: Vec<HeaderName>,
    pub(crate) coalesce_wait: Duration,
    pub(crate) coalesce_body_wait: Duration,
    /// L2 (docs/design.md §5a), when turned on.
    #[cfg(feature = "semantic")]
    pub(crate) semantic: Option<Arc<crate::semantic::SemanticCache>>,
}

impl Config {
    pub(crate) fn policy_version(&self) -> Arc<str> {
        match &self.namespace {
            NamespaceSource::Fixed(ns) => ns.policy_version_shared().clone(),
            NamespaceSource::Credentials { anonymous } => anonymous.policy_version_shared().clone(),
            NamespaceSource::Resolver(_) | NamespaceSource::Authenticated(_) => {
                Arc::from(DEFAULT_POLICY_VERSION)
            }
        }
    }

    pub(crate) fn namespace_of(&self, head: &RequestHead<'_>) -> Option<Namespace> {
        self.namespace.resolve(head, &self.credential_headers)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fresh_ttl: defaults::FRESH_TTL,
            stale_window: defaults::STALE_WINDOW,
            max_body: defaults::MAX_BODY,
            max_response: defaults::MAX_RESPONSE,
            // Content negotiation is part of the key by default: a compressed body stored for
            // one client is never replayed to one that cannot decode it.
            vary: vec![header::ACCEPT_ENCODING],
            keying: BodyKeying {
                canonical_json: true,
                ignored_fields: Vec::new(),
            },
            namespace: NamespaceSource::credentials(Arc::from(DEFAULT_POLICY_VERSION)),
            context_resolver: None,
            store_timeout: defaults::STORE_TIMEOUT,
            methods: vec![Method::GET, Method::POST],
            breaker_failures: defaults::BREAKER_FAILURES,
            breaker_cooldown: defaults::BREAKER_COOLDOWN,
            similarity_header: false,
            credential_headers: crate::headers::default_credential_headers(),
            coalesce_wait: defaults::COALESCE_WAIT,
            coalesce_body_wait: defaults::COALESCE_BODY_WAIT,
            #[cfg(feature = "semantic")]
            semantic: None,
        }
    }
}

/// Why a request is not cached at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BypassReason {
    Requested,
    Method,
    NoNamespace,
    BodyTooLarge,
    InvalidDep(String),
    BadContext(String),
}

impl BypassReason {
    /// A problem with the caller's input, reported in `X-Cache-Error`.
    pub(crate) fn error_message(&self) -> Option<&str> {
        match self {
            Self::InvalidDep(m) | Self::BadContext(m) => Some(m),
            _ => None,
        }
    }
}

/// What to do with a request that is cached.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) namespace: Namespace,
    pub(crate) deps: Arc<[Dep]>,
    pub(crate) refresh: bool,
    pub(crate) fresh_ttl: Duration,
    #[cfg_attr(not(feature = "semantic"), allow(dead_code))]
    pub(crate) semantic: crate::context::SemanticRequest,
}

impl Plan {
    /// The parts of the request's key (docs/design.md §3) under this plan's namespace and deps.
    pub(crate) fn key_parts<'a>(
        &'a self,
        head: &RequestHead<'a>,
        vary: &'a [HeaderName],
        body: &'a [u8],
    ) -> KeyParts<'a> {
        KeyParts {
            tenant: self.namespace.tenant(),
            policy_version: self.namespace.policy_version(),
            partition: self.namespace.partition(),
            method: head.method,
            uri: head.uri,
            headers: head.headers,
            vary,
            deps: &self.deps,
            body,
        }
    }

    /// The dep ids to check: the declared ones and the policy dep.
    pub(crate) fn dep_ids(&self) -> Vec<&str> {
        let mut ids = Vec::with_capacity(self.deps.len() + 1);
        ids.extend(self.deps.iter().map(Dep::id));
        ids.push(POLICY_DEP);
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// The largest encoded-head buffer a thread keeps for the next request.
const MAX_KEPT_HEAD: usize = 16 * 1024;

/// The result of looking a request up.
pub(crate) enum Found {
    Hit(Entry, CacheStatus),
    /// Miss: the epochs to present at put time.
    Miss(DepEpochs),
    /// The store could not answer: forward, write nothing.
    Unavailable,
}

/// What to do with a cached request once its key is known (shared by every adapter).
pub(crate) enum Route {
    /// Serve this entry. A [`CacheStatus::StaleHit`] asks the adapter for one background refresh.
    Serve(Entry, CacheStatus),
    /// Call upstream, then hand the response head to [`Engine::start_recording`].
    Forward(Forward),
}

/// A forwarded request's right to store its response: the epochs observed at lookup (none when
/// the store could not answer, or when a coalesced follower goes upstream itself), and the
/// single-flight it leads. Dropping it releases the followers.
pub(crate) struct Forward {
    observed: Option<DepEpochs>,
    flight: Option<FlightGuard>,
    /// The request's L2 vector, stored beside its entry if the entry is stored.
    #[cfg(feature = "semantic")]
    l2: Option<crate::semantic::L2Write>,
}

impl Forward {
    /// The right to store of a background refresh: the epochs its stale entry recorded (current
    /// at the lookup that found it), no single-flight.
    pub(crate) fn refresh(observed: DepEpochs) -> Self {
        Self {
            observed: Some(observed),
            flight: None,
            #[cfg(feature = "semantic")]
            l2: None,
        }
    }
}

/// The engine behind every adapter.
pub(crate) struct Engine {
    store: Arc<dyn CacheStore>,
    self_bounded: bool,
    pub(crate) config: Config,
    flights: Mutex<HashMap<CacheKey, watch::Receiver<FlightState>>>,
    refreshing: Mutex<HashSet<CacheKey>>,
    breaker: Breakers,
    key_memo: KeyMemo,
    pub(crate) metrics: Metrics,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("fresh_ttl", &self.config.fresh_ttl)
            .field("stale_window", &self.config.stale_window)
            .field("max_body", &self.config.max_body)
            .field("metrics", &self.metrics.snapshot())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps behind these locks stay consistent at every await-free step; a panic elsewhere
    // must not turn every later request into a failure.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    pub(crate) fn new(store: Arc<dyn CacheStore>, config: Config) -> Self {
        Self {
            self_bounded: store.bounds_its_own_calls(),
            breaker: Breakers::new(store.failure_domains()),
            store,
            config,
            flights: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(HashSet::new()),
            key_memo: KeyMemo::default(),
            metrics: Metrics::default(),
        }
    }

    /// Decides, from the head alone, whether the request is cached and how.
    pub(crate) fn plan(&self, head: &RequestHead<'_>) -> Result<Plan, BypassReason> {
        // Credentials an authenticator checks are verified once per request, first: rejected
        // ones make the request a bypass that says why.
        let authenticated = self
            .config
            .namespace
            .authenticate(head)
            .map_err(BypassReason::BadContext)?;
        let ctx = match head.extensions.get::<RequestContext>() {
            Some(ctx) => Some(ctx.clone()),
            None => current_scope(),
        };
        let ctx = match ctx {
            Some(ctx) => ctx,
            None => match &self.config.context_resolver {
                Some(resolve) => match resolve(head) {
                    Ok(ctx) => ctx.unwrap_or_default(),
                    Err(why) => return Err(BypassReason::BadContext(why)),
                },
                None => RequestContext::default(),
            },
        };
        if ctx.bypass {
            return Err(BypassReason::Requested);
        }
        // The caller's own `Cache-Control` (RFC 9111 §5.2.1): `no-store` keeps the exchange out
        // of the cache; `no-cache` or `max-age=0` asks for a fresh answer, which is a refresh.
        let directives = RequestDirectives::of(head.headers);
        if directives.no_store {
            return Err(BypassReason::Requested);
        }
        if !self.config.methods.contains(head.method) {
            return Err(BypassReason::Method);
        }
        if let Some(len) = content_length(head.headers) {
            if len > self.config.max_body as u64 {
                return Err(BypassReason::BodyTooLarge);
            }
        }
        for dep in ctx.deps.iter() {
            if let Err(e) = validate_dep_id(dep.id()) {
                return Err(BypassReason::InvalidDep(format!("{e}: {:?}", dep.id())));
            }
        }
        let namespace = authenticated
            .unwrap_or_else(|| self.config.namespace_of(head))
            .ok_or(BypassReason::NoNamespace)?;
        Ok(Plan {
            namespace,
            fresh_ttl: ctx.ttl.unwrap_or(self.config.fresh_ttl),
            deps: ctx.deps,
            refresh: ctx.refresh || directives.revalidate,
            semantic: ctx.semantic,
        })
    }

    pub(crate) fn key(&self, plan: &Plan, head: &RequestHead<'_>, body: &[u8]) -> CacheKey {
        let parts = plan.key_parts(head, &self.config.vary, body);
        thread_local! {
            // The encoded head is scratch space: reused by every request on the thread.
            static ENCODED: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(key::HEAD_CAPACITY));
        }
        let digest = ENCODED.with(|encoded| {
            let mut encoded = encoded.borrow_mut();
            encoded.clear();
            key::encode_head(&parts, &mut encoded);
            // Identical requests repeat (that is what a cache is for): the memo saves them
            // the canonicalisation and the SHA-256 of the body.
            let digest = self.key_memo.digest(&encoded, body, || {
                key::digest(&encoded, body, &self.config.keying)
            });
            // An outsized head (a huge URI or vary header) does not pin its buffer.
            if encoded.capacity() > MAX_KEPT_HEAD {
                *encoded = Vec::with_capacity(key::HEAD_CAPACITY);
            }
            digest
        });
        CacheKey::new(plan.namespace.tenant_shared().clone(), digest)
    }

    /// Looks the key up, failing open: a store error, a timeout or an open breaker is
    /// `Unavailable`, never an error.
    pub(crate) async fn lookup(&self, key: &CacheKey, deps: &[&str]) -> Found {
        match self
            .guarded(StoreOp::Lookup, key.tenant(), self.store.lookup(key, deps))
            .await
        {
            Some(Lookup::Fresh(entry)) => Found::Hit(entry, CacheStatus::Hit),
            Some(Lookup::Stale(entry)) => Found::Hit(entry, CacheStatus::StaleHit),
            Some(Lookup::Miss(epochs)) => Found::Miss(epochs),
            None => Found::Unavailable,
        }
    }

    /// Looks the key up and joins the single-flight: serve an entry, or forward.
    ///
    /// `head` is the request's: an entry whose response named request headers in `Vary`
    /// is served only to a request with the same values for them. `body` is the buffered
    /// request body (L2 reads the question from it).
    ///
    /// `serve_stale`: whether the adapter can run a background refresh. When it cannot (the
    /// reqwest adapter: `Next` borrows the client), a stale entry is revalidated in line instead.
    pub(crate) async fn route(
        self: &Arc<Self>,
        key: &CacheKey,
        plan: &Plan,
        head: &RequestHead<'_>,
        body: &[u8],
        serve_stale: bool,
    ) -> Route {
        let headers = head.headers;
        let deps = plan.dep_ids();
        let found = self.lookup(key, &deps).await;
        #[cfg(feature = "semantic")]
        let l1_missed = matches!(found, Found::Miss(_));
        let observed = match found {
            Found::Hit(entry, status)
                if !plan.refresh
                    && (serve_stale || status != CacheStatus::StaleHit)
                    && vary_matches(&entry.headers, headers) =>
            {
                return Route::Serve(entry, status);
            }
            // A refresh (or another variant) skips the entry, but a valid entry's epochs are
            // the current ones.
            Found::Hit(entry, _) => Some(entry.deps),
            Found::Miss(epochs) => Some(epochs),
            Found::Unavailable => None,
        };
        // L2 (docs/design.md §5a): on an L1 miss, an entry whose question means the same may
        // answer. A match only names an entry; it is read through the L1 lookup, so expiry and
        // every dep rule apply as to any hit. No embedding is paid on an L1 hit.
        #[cfg(feature = "semantic")]
        let l2 = match &self.config.semantic {
            Some(semantic) if l1_missed => {
                let probe = semantic.probe(plan, head, body, &self.config).await;
                for m in probe.matches() {
                    match self.lookup(&m.key, &deps).await {
                        Found::Hit(entry, CacheStatus::Hit)
                            if vary_matches(&entry.headers, headers) =>
                        {
                            return Route::Serve(m.answer(entry), CacheStatus::HitL2);
                        }
                        Found::Miss(_) => probe.gone(m),
                        _ => {}
                    }
                }
                probe.into_write()
            }
            _ => None,
        };
        #[cfg(not(feature = "semantic"))]
        let _ = body;
        let mut flight = None;
        if observed.is_some() && !plan.refresh {
            match self.join_flight(key) {
                Flight::Leader(guard) => flight = Some(guard),
                Flight::Follower(rx) => {
                    self.metrics.coalesced.fetch_add(1, Ordering::Relaxed);
                    // The leader stored its answer: read it back from the store rather than take
                    // it from the leader, so an invalidation that ran since the write is seen
                    // (rule 4 holds for followers too). If it stored nothing, or did not finish
                    // within the bounds (docs/design.md §4 rule 8), go upstream ourselves, with
                    // the epochs observed before waiting: a put is refused if any moved since.
                    if Flight::wait(
                        rx,
                        self.config.coalesce_wait,
                        self.config.coalesce_body_wait,
                    )
                    .await
                    {
                        if let Found::Hit(entry, status) = self.lookup(key, &deps).await {
                            if vary_matches(&entry.headers, headers) {
                                return Route::Serve(entry, status);
                            }
                        }
                    }
                }
            }
        }
        Route::Forward(Forward {
            observed,
            flight,
            #[cfg(feature = "semantic")]
            l2,
        })
    }

    /// The recorder for a forwarded request's response, when it may be stored; `None` (and the
    /// followers released) otherwise.
    ///
    /// `request` are the request's headers (for the response's `Vary`). A streamed response
    /// (server-sent events) releases the followers at once: they call upstream themselves
    /// rather than wait for the whole stream.
    pub(crate) fn start_recording(
        self: &Arc<Self>,
        key: CacheKey,
        fresh_ttl: Duration,
        forward: Forward,
        request: &HeaderMap,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<Recorder> {
        let Forward {
            observed,
            flight,
            #[cfg(feature = "semantic")]
            l2,
        } = forward;
        let observed = observed?;
        if !self.admits(status, headers) {
            return None;
        }
        let flight = match flight {
            Some(flight) if !is_event_stream(headers) => {
                flight.tx.send_replace(FlightState::Recording);
                Some(flight)
            }
            _ => None,
        };
        let mut recorder = self.recorder(key, observed, fresh_ttl, status, headers, flight);
        if let Some(fingerprint) = vary_fingerprint(headers, request) {
            recorder.headers.insert(VARY_KEY, fingerprint);
        }
        #[cfg(feature = "semantic")]
        {
            recorder.l2 = l2;
        }
        Some(recorder)
    }

    /// Whether the circuit breaker is skipping the store now (for the metrics).
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) fn breaker_open(&self) -> bool {
        !self.breaker.allows()
    }

    /// Runs one store call for `tenant` under the timeout and the circuit breaker of the store's
    /// part that holds the tenant.
    async fn guarded<T>(
        &self,
        op: StoreOp,
        tenant: &str,
        mut call: crate::store::StoreFuture<'_, T>,
    ) -> Option<T> {
        let breaker = self.breaker.domain(self.store.failure_domain(tenant));
        if !breaker.allows() {
            self.metrics.store_skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let latency = self.metrics.latency(op);
        // In-process stores answer on the first poll: they need no timer (and no clock read).
        let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        let _timed = TimeOnDrop(first.is_pending().then(Instant::now), latency);
        let outcome = match first {
            Poll::Ready(result) => result.map_err(|e| e.to_string()),
            // A store with its own timeout needs no second timer. Without a Tokio runtime there
            // is no timer: the call runs unbounded rather than panicking in a caller's executor.
            Poll::Pending
                if self.self_bounded || tokio::runtime::Handle::try_current().is_err() =>
            {
                call.await.map_err(|e| e.to_string())
            }
            Poll::Pending => match tokio::time::timeout(self.config.store_timeout, call).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", self.config.store_timeout)),
            },
        };
        let error = match outcome {
            Ok(value) => {
                breaker.success();
                return Some(value);
            }
            Err(error) => error,
        };
        self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        if breaker.failure(self.config.breaker_failures, self.config.breaker_cooldown) {
            self.metrics.breaker_opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "cachecore", %error, cooldown = ?self.config.breaker_cooldown,
                "cache store failing; skipping it for a cool-down");
        } else {
            tracing::warn!(target: "cachecore", %error, "cache store call failed; request goes through uncached");
        }
        None
    }

    /// Writes an entry with the epochs observed at lookup; returns whether it was stored.
    pub(crate) async fn put(&self, key: &CacheKey, entry: Entry) -> bool {
        match self
            .guarded(StoreOp::Put, key.tenant(), self.store.put(key, entry))
            .await
        {
            Some(PutOutcome::Stored) => {
                self.metrics.stored.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(PutOutcome::Refused(reason)) => {
                self.metrics.refused_writes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target: "cachecore", ?key, ?reason, "write refused");
                false
            }
            None => false,
        }
    }

    /// Joins the in-flight upstream call for `key`, or becomes its leader.
    pub(crate) fn join_flight(self: &Arc<Self>, key: &CacheKey) -> Flight {
        let mut flights = lock(&self.flights);
        if let Some(rx) = flights.get(key) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(FlightState::Pending);
        flights.insert(key.clone(), rx);
        Flight::Leader(FlightGuard {
            engine: Arc::clone(self),
            key: Some(key.clone()),
            tx,
        })
    }

    /// Marks `key` as being refreshed in the background; false when a refresh already runs.
    pub(crate) fn begin_refresh(self: &Arc<Self>, key: &CacheKey) -> Option<RefreshGuard> {
        if lock(&self.refreshing).insert(key.clone()) {
            Some(RefreshGuard {
                engine: Arc::clone(self),
                key: key.clone(),
            })
        } else {
            None
        }
    }

    /// Whether a response may be stored (docs/design.md §6): 2xx only, and not a partial
    /// `206` (`Range` is not in the key); no `no-store`, `private` (with or without field
    /// names), `no-cache` (but see event streams below) or a zero `max-age`/`s-maxage` (this
    /// cache cannot revalidate, so "revalidate before every reuse" means "do not reuse");
    /// nothing that sets cookies; no `Vary: *`; not larger than the recording limit when its
    /// length is known.
    fn admits(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        if !status.is_success() || status == StatusCode::PARTIAL_CONTENT {
            return false;
        }
        if headers.contains_key(header::SET_COOKIE) {
            return false;
        }
        // Event streams carry `no-cache` by convention (it keeps intermediaries from buffering
        // a live stream; LLM APIs send it on every streamed completion), not as a statement
        // about reusing the finished stream: for them only the other directives count.
        let stream = is_event_stream(headers);
        let forbidden = cache_control(headers).any(|(name, value)| {
            name.eq_ignore_ascii_case("no-store")
                || name.eq_ignore_ascii_case("private")
                || (name.eq_ignore_ascii_case("no-cache") && !stream)
                || ((name.eq_ignore_ascii_case("max-age") || name.eq_ignore_ascii_case("s-maxage"))
                    && value.is_some_and(|v| v.parse::<u64>().map_or(true, |n| n == 0)))
        });
        if forbidden || vary_names(headers).any(|name| name == "*") {
            return false;
        }
        !matches!(content_length(headers), Some(len) if len > self.config.max_response as u64)
    }

    /// Starts recording a response that will become an entry when its body ends cleanly.
    fn recorder(
        self: &Arc<Self>,
        key: CacheKey,
        observed: DepEpochs,
        fresh_ttl: Duration,
        status: StatusCode,
        headers: &HeaderMap,
        flight: Option<FlightGuard>,
    ) -> Recorder {
        Recorder {
            engine: Arc::clone(self),
            key,
            observed,
            status,
            headers: storable_headers(headers),
            fresh_ttl,
            buf: BytesMut::with_capacity(
                content_length(headers)
                    .map_or(0, |n| usize::try_from(n).unwrap_or(0))
                    .min(self.config.max_response),
            ),
            flight,
            #[cfg(feature = "semantic")]
            l2: None,
        }
    }

    /// The response served from an entry (consumed: its headers move into the response).
    pub(crate) fn hit_response<B>(
        &self,
        entry: Entry,
        status: CacheStatus,
        body: impl FnOnce(Bytes) -> B,
    ) -> Response<B> {
        let age = entry.age_ms(now_ms()) / 1000;
        let mut res = Response::new(body(entry.body));
        *res.status_mut() = entry.status;
        *res.headers_mut() = entry.headers;
        res.headers_mut().remove(VARY_KEY);
        res.headers_mut()
            .insert(X_CACHE_AGE, HeaderValue::from(age));
        self.mark(&mut res, status);
        res
    }

    /// Sets `X-Cache` (and the similarity header in wire mode) and the [`CacheStatus`]
    /// extension, and counts the outcome.
    pub(crate) fn mark<B>(&self, res: &mut Response<B>, status: CacheStatus) {
        // `http::Response` lends one part at a time; an empty `Extensions` does not allocate.
        let mut extensions = std::mem::take(res.extensions_mut());
        self.mark_head(res.headers_mut(), &mut extensions, status);
        *res.extensions_mut() = extensions;
    }

    /// [`mark`](Self::mark) on the head of a response that is not an `http::Response`.
    pub(crate) fn mark_head(
        &self,
        headers: &mut HeaderMap,
        extensions: &mut Extensions,
        status: CacheStatus,
    ) {
        self.metrics.count(status);
        headers.insert(X_CACHE, HeaderValue::from_static(status.as_str()));
        // An L2 hit carries its own similarity, set when it matched.
        if self.config.similarity_header && status != CacheStatus::HitL2 {
            let similarity = match status {
                CacheStatus::Hit | CacheStatus::StaleHit => "1.00",
                _ => "0.00",
            };
            headers.insert(X_CACHE_SIMILARITY, HeaderValue::from_static(similarity));
        }
        extensions.insert(status);
        tracing::debug!(target: "cachecore", status = status.as_str(), "request served");
    }

    pub(crate) fn default_tenant(&self) -> Option<Arc<str>> {
        self.config.namespace.default_tenant()
    }

    pub(crate) async fn invalidate_many(
        &self,
        tenant: &str,
        dep_ids: &[&str],
        new_hash: Option<&str>,
    ) -> Vec<InvalidationResult> {
        if let Some(Err(e)) = new_hash.map(crate::validate_new_hash) {
            // A hash travels in headers and store values: a bad one changes nothing.
            self.metrics
                .invalidation_errors
                .fetch_add(dep_ids.len() as u64, Ordering::Relaxed);
            return dep_ids
                .iter()
                .map(|id| InvalidationResult::failed(*id, e.to_string()))
                .collect();
        }
        let generated;
        let new_hash = match new_hash {
            Some(h) => h,
            None => {
                generated = random_hash();
                &generated
            }
        };
        let mut results: Vec<Option<InvalidationResult>> = vec![None; dep_ids.len()];
        let mut valid: Vec<&str> = Vec::with_capacity(dep_ids.len());
        for (slot, id) in results.iter_mut().zip(dep_ids) {
            match validate_dep_id(id) {
                Ok(()) => valid.push(id),
                Err(e) => *slot = Some(InvalidationResult::failed(*id, e.to_string())),
            }
        }
        // Invalidation must not be skipped by the breaker or cut by the lookup timeout: a
        // caller told "ok" must be able to rely on it, so failures are reported, not hidden.
        // L2 vectors of partitions that declare an invalidated dep are reclaimed with their
        // entries (they could no longer be served anyway: a match is read through L1).
        #[cfg(feature = "semantic")]
        if let Some(semantic) = &self.config.semantic {
            semantic.forget_deps(tenant, &valid);
        }
        let mut done = if valid.is_empty() {
            Vec::new()
        } else {
            match self.store.invalidate_many(tenant, &valid, new_hash).await {
                Ok(r) => r,
                Err(e) => valid
                    .iter()
                    .map(|id| InvalidationResult::failed(*id, e.to_string()))
                    .collect(),
            }
        }
        .into_iter();
        let out: Vec<InvalidationResult> = results
            .into_iter()
            .map(|r| {
                r.or_else(|| done.next())
                    .unwrap_or_else(|| InvalidationResult::failed("", "store gave no result"))
            })
            .collect();
        for r in &out {
            self.metrics.invalidations.fetch_add(1, Ordering::Relaxed);
            if r.ok {
                self.metrics
                    .invalidated_entries
                    .fetch_add(r.deleted, Ordering::Relaxed);
                tracing::info!(target: "cachecore", tenant, dep_id = %r.dep_id, deleted = r.deleted, "invalidated");
            } else {
                self.metrics
                    .invalidation_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "cachecore", tenant, dep_id = %r.dep_id, error = ?r.error, "invalidation failed");
            }
        }
        out
    }
}

/// The `Cache-Control` directives of a request that the cache honours.
#[derive(Default)]
struct RequestDirectives {
    no_store: bool,
    revalidate: bool,
}

impl RequestDirectives {
    fn of(headers: &HeaderMap) -> Self {
        let mut out = Self::default();
        for (name, value) in cache_control(headers) {
            if name.eq_ignore_ascii_case("no-store") {
                out.no_store = true;
            } else if name.eq_ignore_ascii_case("no-cache")
                || (name.eq_ignore_ascii_case("max-age") && value == Some("0"))
            {
                out.revalidate = true;
            }
        }
        out
    }
}

/// A fresh random-enough version string for invalidations that give none.
pub(crate) fn random_hash() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(now_ms().to_be_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    h.update(std::process::id().to_be_bytes());
    h.update(format!("{:?}", Instant::now()).as_bytes());
    let digest: [u8; 32] = h.finalize().into();
    to_hex(&digest[..8])
}

/// What of a response's headers an entry keeps: not the hop-by-hop ones (they describe one
/// connection, never replay them), nor the cache's own marks.
fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    remove_hop_by_hop(&mut out);
    for name in [X_CACHE, X_CACHE_AGE, X_CACHE_SIMILARITY, VARY_KEY] {
        out.remove(name);
    }
    out
}

/// The digest of `request`'s values for the headers `response` varies on, if it varies.
fn vary_fingerprint(response: &HeaderMap, request: &HeaderMap) -> Option<HeaderValue> {
    let mut names = vary_names(response).peekable();
    names.peek()?;
    let mut h = Sha256::new();
    for name in names {
        let name = name.to_ascii_lowercase();
        h.update((name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        let values = request.get_all(name.as_str());
        h.update((values.iter().count() as u64).to_be_bytes());
        for v in values {
            h.update((v.len() as u64).to_be_bytes());
            h.update(v.as_bytes());
        }
    }
    let digest: [u8; 32] = h.finalize().into();
    HeaderValue::from_str(&to_hex(&digest[..16])).ok()
}

/// Whether an entry may answer a request with these headers: it names no `Vary` headers, or
/// the request has the same values for them as the one that produced it.
fn vary_matches(entry: &HeaderMap, request: &HeaderMap) -> bool {
    match entry.get(VARY_KEY) {
        None => true,
        Some(stored) => vary_fingerprint(entry, request).is_some_and(|now| now == stored),
    }
}

/// Whether a finished event stream reported an error in band: an `event: error`, or a `data:`
/// line carrying an `{"error": ...}` object (as LLM APIs send when generation fails midway).
/// Such a stream ended cleanly at the HTTP level but is not an answer to replay.
fn sse_reports_error(body: &[u8]) -> bool {
    body.split(|&b| b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let field = |name: &[u8]| {
            line.strip_prefix(name).map(|rest| {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                rest.trim_ascii()
            })
        };
        if field(b"event:").is_some_and(|v| v == b"error") {
            return true;
        }
        field(b"data:").is_some_and(|v| {
            v.strip_prefix(b"{")
                .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"\"error\""))
        })
    })
}

/// What the leader of an in-flight call tells its followers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FlightState {
    /// The upstream call runs.
    Pending,
    /// The response head arrived and is being recorded: its body should end soon.
    Recording,
    /// Whether the leader's answer was stored (if not, followers call upstream themselves).
    Done { stored: bool },
}

pub(crate) enum Flight {
    Leader(FlightGuard),
    Follower(watch::Receiver<FlightState>),
}

impl Flight {
    /// Waits for the leader, within bounds (docs/design.md §4 rule 8); true when it stored its
    /// answer. At most `total` in all, and at most `after_head` once the leader's response head
    /// has arrived. Without a Tokio runtime there is no timer to bound the wait: no waiting.
    pub(crate) async fn wait(
        mut rx: watch::Receiver<FlightState>,
        total: Duration,
        after_head: Duration,
    ) -> bool {
        if tokio::runtime::Handle::try_current().is_err() {
            return false;
        }
        let start = tokio::time::Instant::now();
        let mut deadline = start + total;
        let mut head_seen = false;
        loop {
            match *rx.borrow_and_update() {
                FlightState::Done { stored } => return stored,
                FlightState::Recording if !head_seen => {
                    head_seen = true;
                    deadline = deadline.min(tokio::time::Instant::now() + after_head);
                }
                FlightState::Recording | FlightState::Pending => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The leader is gone without a word, or too slow: stop waiting on it.
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }
}

/// Held by the leader of an in-flight call; dropping it without [`finish`](Self::finish)
/// releases the followers to call the inner service themselves.
pub(crate) struct FlightGuard {
    engine: Arc<Engine>,
    key: Option<CacheKey>,
    tx: watch::Sender<FlightState>,
}

impl FlightGuard {
    pub(crate) fn finish(mut self, stored: bool) {
        self.release(stored);
    }

    fn release(&mut self, stored: bool) {
        if let Some(key) = self.key.take() {
            lock(&self.engine.flights).remove(&key);
            self.tx.send_replace(FlightState::Done { stored });
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.release(false);
    }
}

/// Held while a background refresh of a stale entry runs.
pub(crate) struct RefreshGuard {
    engine: Arc<Engine>,
    key: CacheKey,
}

impl Drop for RefreshGuard {
    fn drop(&mut self) {
        lock(&self.engine.refreshing).remove(&self.key);
    }
}

/// Collects a response body while it is forwarded; stores it when the body ends cleanly.
/// Dropped before that (client gone, stream error, too large): nothing is stored.
pub(crate) struct Recorder {
    engine: Arc<Engine>,
    key: CacheKey,
    observed: DepEpochs,
    status: StatusCode,
    headers: HeaderMap,
    fresh_ttl: Duration,
    buf: BytesMut,
    flight: Option<FlightGuard>,
    #[cfg(feature = "semantic")]
    l2: Option<crate::semantic::L2Write>,
}

impl Recorder {
    /// Appends a chunk; false once the response is too large to store (drop the recorder then).
    pub(crate) fn push(&mut self, chunk: &[u8]) -> bool {
        if self.buf.len() + chunk.len() > self.engine.config.max_response {
            return false;
        }
        self.buf.extend_from_slice(chunk);
        true
    }

    /// The body ended cleanly: returns the write of the entry (then the release of the
    /// followers). Poll it to completion before reporting the end of the body, so a caller
    /// that has seen the whole response finds the entry on its next request; dropped before
    /// completion, it finishes in the background.
    pub(crate) fn finish(self) -> PendingStore {
        let Self {
            engine,
            key,
            observed,
            status,
            headers,
            fresh_ttl,
            buf,
            flight,
            #[cfg(feature = "semantic")]
            l2,
        } = self;
        if is_event_stream(&headers) && sse_reports_error(&buf) {
            // Dropping the flight guard releases the followers: nothing to read back.
            return PendingStore::default();
        }
        let entry = Entry {
            status,
            headers,
            body: buf.freeze(),
            stored_at_ms: now_ms(),
            fresh_ttl,
            stale_window: engine.config.stale_window,
            deps: observed,
        };
        #[cfg(feature = "semantic")]
        let lifetime = entry.lifetime();
        PendingStore(Some(Box::pin(async move {
            let stored = engine.put(&key, entry).await;
            // The vector goes beside the entry only once the entry is there (docs/design.md §5a).
            #[cfg(feature = "semantic")]
            if let (true, Some(l2)) = (stored, l2) {
                l2.stored(&key, lifetime);
            }
            if let Some(flight) = flight {
                flight.finish(stored);
            }
        })))
    }
}

/// The write of a finished recording. Polled by the response body before it reports its end;
/// if the body is dropped first, the write goes on in the background.
#[derive(Default)]
pub(crate) struct PendingStore(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl PendingStore {
    pub(crate) fn is_pending(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(fut) = &mut self.0 {
            ready!(fut.as_mut().poll(cx));
            self.0 = None;
        }
        Poll::Ready(())
    }

    /// Runs the write to completion.
    pub(crate) async fn wait(mut self) {
        std::future::poll_fn(|cx| self.poll(cx)).await;
    }

    fn spawn_rest(&mut self) {
        if let Some(fut) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(fut);
                }
                Err(_) => {
                    tracing::warn!(target: "cachecore", "no tokio runtime to finish a cache write on; not cached");
                }
            }
        }
    }
}

impl Drop for PendingStore {
    fn drop(&mut self) {
        self.spawn_rest();
    }
}

/// Records a store call's time in its histogram when the call ends, however it ends (a caller
/// that gives up drops the future). A call answered on the first poll counts as zero: timing it
/// would put a clock read on the in-process hit path.
struct TimeOnDrop<'a>(Option<Instant>, &'a LatencyHistogram);

impl Drop for TimeOnDrop<'_> {
    fn drop(&mut self) {
        self.1
            .observe(self.0.map_or(Duration::ZERO, |started| started.elapsed()));
    }
}

/// One circuit breaker per failure domain of the store ([`CacheStore::failure_domain`]): a part
/// that keeps failing is skipped for a cool-down while the others keep serving (on Redis
/// Cluster, a dead master costs only the tenants whose slots it holds).
#[derive(Debug)]
struct Breakers {
    domains: Box<[Breaker]>,
    epoch: Instant,
}

/// Skips one failure domain for a cool-down after repeated consecutive failures in it.
#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    open_until_ms: AtomicU64,
}

/// The breaker of one domain.
struct DomainBreaker<'a> {
    breaker: &'a Breaker,
    breakers: &'a Breakers,
}

impl Breakers {
    fn new(domains: usize) -> Self {
        Self {
            domains: (0..domains.max(1)).map(|_| Breaker::default()).collect(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        duration_ms(self.epoch.elapsed())
    }

    /// The breaker of `domain` (a domain past the store's count wraps around rather than panic).
    fn domain(&self, domain: usize) -> DomainBreaker<'_> {
        DomainBreaker {
            breaker: &self.domains[domain % self.domains.len()],
            breakers: self,
        }
    }

    /// Whether no domain is being skipped.
    fn allows(&self) -> bool {
        (0..self.domains.len()).all(|d| self.domain(d).allows())
    }
}

impl DomainBreaker<'_> {
    fn allows(&self) -> bool {
        // Zero: never opened, or closed again. Checked first so a healthy store costs no clock
        // read. Past the cool-down the breaker is half-open: calls go through, and the next
        // failure opens it again straight away (the failure count is still at the threshold).
        let until = self.breaker.open_until_ms.load(Ordering::Relaxed);
        until == 0 || until <= self.breakers.now()
    }

    fn success(&self) {
        if self.breaker.failures.load(Ordering::Relaxed) != 0 {
            self.breaker.failures.store(0, Ordering::Relaxed);
            self.breaker.open_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failure; true when it opened the breaker.
    fn failure(&self, threshold: u32, cooldown: Duration) -> bool {
        let n = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < threshold.max(1) {
            return false;
        }
        self.breaker.open_until_ms.store(
            self.breakers.now() + duration_ms(cooldown),
            Ordering::Relaxed,
        );
        true
    }
}
