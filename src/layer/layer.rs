//! The layer, its builder, and the invalidation entry points.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use tower_layer::Layer;

use super::Cachecore;
use crate::auth::Authenticator;
use crate::context::{ContextResolver, RequestHead};
use crate::counters::MetricsSnapshot;
use crate::engine::{Config, Engine, NamespaceSettings};
use crate::invalidation::{DepError, DepErrorKind, Invalidated, Invalidation, InvalidationError};
use crate::namespace::{Namespace, NamespaceResolver};
use crate::{CacheStore, MemoryStore, RequestContext};

/// A tower [`Layer`] that caches responses and drops them when their deps are invalidated.
///
/// Clones share one engine (store, in-flight map, counters), and the layer is also the handle
/// to invalidate from: keep a clone where your webhooks run.
#[derive(Clone)]
#[must_use]
pub struct CachecoreLayer {
    engine: Arc<Engine>,
}

impl fmt::Debug for CachecoreLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachecoreLayer")
            .field("engine", &self.engine)
            .finish()
    }
}

impl Default for CachecoreLayer {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl<S> Layer<S> for CachecoreLayer {
    type Service = Cachecore<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cachecore::new(inner, Arc::clone(&self.engine))
    }
}

impl CachecoreLayer {
    /// A layer on an in-memory store with the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder, starting from the defaults.
    pub fn builder() -> CachecoreBuilder {
        CachecoreBuilder {
            store: None,
            config: Config::default(),
            namespace: NamespaceSettings::default(),
        }
    }

    /// The handle to invalidate this layer's entries from (and its clones': they share one
    /// store). Keep one where your webhooks run.
    ///
    /// ```
    /// use cachecore::{CachecoreLayer, Invalidation};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = CachecoreLayer::new();
    /// let done = cache
    ///     .invalidator()
    ///     .invalidate(Invalidation::of(["doc:1"]).new_hash("v8"))
    ///     .await
    ///     .expect("a memory store does not fail");
    /// assert_eq!(done.entries_deleted(), 0);
    /// # }
    /// ```
    pub fn invalidator(&self) -> CacheInvalidator {
        CacheInvalidator {
            engine: Arc::clone(&self.engine),
        }
    }

    /// The namespace a request with this head would be cached in (`None`: it would bypass).
    pub fn namespace_of<B>(&self, req: &http::Request<B>) -> Option<Namespace> {
        self.engine.config().namespace_of(&RequestHead::of(req))
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.engine.metrics().snapshot()
    }

    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))] // the reqwest adapter's way in
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

/// Invalidates the entries of a [`CachecoreLayer`]: every entry derived from an invalidated dep
/// stops being served at once (docs/design.md §4). Built by [`CachecoreLayer::invalidator`];
/// clones share the layer's store.
#[derive(Clone)]
pub struct CacheInvalidator {
    engine: Arc<Engine>,
}

impl fmt::Debug for CacheInvalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheInvalidator").finish_non_exhaustive()
    }
}

impl CacheInvalidator {
    /// Applies `invalidation`: `Ok` when every dep was invalidated, else an error whose
    /// [`results`](crate::InvalidationError::results) say which failed and why. Never skipped by
    /// the circuit breaker nor cut by the lookup timeout: a caller told `Ok` can rely on it.
    ///
    /// Without a [`tenant`](Invalidation::tenant), the layer's own is used (its fixed tenant, or
    /// [`DEFAULT_TENANT`](crate::DEFAULT_TENANT)); a layer whose tenants come from a resolver
    /// or an authenticator has none, and refuses rather than guess
    /// ([`DepErrorKind::Tenant`](crate::DepErrorKind::Tenant)).
    pub async fn invalidate(
        &self,
        invalidation: Invalidation,
    ) -> Result<Invalidated, InvalidationError> {
        let tenant = match invalidation.tenant_name() {
            Some(tenant) => Arc::from(tenant),
            None => match self.engine.default_tenant() {
                Some(tenant) => tenant,
                None => {
                    return Invalidated::from_results(
                        invalidation
                            .dep_ids()
                            .map(|id| {
                                Err(DepError::new(id, DepErrorKind::Tenant, NO_DEFAULT_TENANT))
                            })
                            .collect(),
                    )
                }
            },
        };
        self.engine.invalidate(&tenant, &invalidation).await
    }
}

/// Why an invalidation that names no tenant is refused on a layer whose tenants are resolved
/// per request.
const NO_DEFAULT_TENANT: &str = "this layer resolves tenants per request (namespace resolver or \
     authenticator): name the tenant with Invalidation::tenant";

/// Configures a [`CachecoreLayer`].
#[must_use]
pub struct CachecoreBuilder {
    store: Option<Arc<dyn CacheStore>>,
    config: Config,
    namespace: NamespaceSettings,
}

impl fmt::Debug for CachecoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachecoreBuilder")
            .field("fresh_ttl", &self.config.fresh_ttl)
            .field("stale_window", &self.config.stale_window)
            .field("max_body", &self.config.max_body)
            .finish_non_exhaustive()
    }
}

impl CachecoreBuilder {
    /// The store (default: a [`MemoryStore`] with default capacity).
    pub fn store(mut self, store: impl CacheStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The store, already shared.
    pub fn shared_store(mut self, store: Arc<dyn CacheStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// How long entries are fresh (default one hour). A request can override it with
    /// [`RequestContext::ttl`].
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.config.fresh_ttl = ttl;
        self
    }

    /// How long past its fresh TTL an entry may be served stale while one background refresh
    /// runs (default zero: off).
    pub fn stale_window(mut self, window: Duration) -> Self {
        self.config.stale_window = window;
        self
    }

    /// The largest request body that is buffered and cached (default 2 MiB). Larger bodies
    /// are forwarded untouched and their responses are not cached.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.config.max_body = max;
        self
    }

    /// The largest response body that is recorded (default 8 MiB). Larger responses are
    /// forwarded in full and not stored.
    pub fn max_response_bytes(mut self, max: usize) -> Self {
        self.config.max_response = max;
        self
    }

    /// Adds a request header whose value is part of the key. `Accept-Encoding` is in the key
    /// by default (and a response's own `Vary` is always honoured).
    pub fn vary_header(mut self, name: HeaderName) -> Self {
        if !self.config.vary.contains(&name) {
            self.config.vary.push(name);
        }
        self
    }

    /// Adds a header that carries the caller's credentials. When no tenant is configured,
    /// every credential header a request has goes into its key partition, so callers with
    /// different credentials never share an entry. By default: `Authorization`,
    /// `Proxy-Authorization`, `Cookie`, `X-Api-Key`, `Api-Key`, `X-Goog-Api-Key` and
    /// `X-CacheCore-Token`.
    pub fn credential_header(mut self, name: HeaderName) -> Self {
        if !self.config.credential_headers.contains(&name) {
            self.config.credential_headers.push(name);
        }
        self
    }

    /// Bounds how long a request waits for an identical one already in flight (single-flight)
    /// before calling upstream itself: `total` in all (default 30 s), and `after_head` once
    /// the leader's response head has arrived (default 1 s; its body then normally ends within
    /// milliseconds, unless nobody reads it). A leader that fails or is dropped releases its
    /// followers at once, and a streamed (SSE) response releases them when its head arrives.
    pub fn coalesce_wait(mut self, total: Duration, after_head: Duration) -> Self {
        self.config.coalesce_wait = total;
        self.config.coalesce_body_wait = after_head;
        self
    }

    /// Whether JSON bodies are keyed in canonical form (default true): key order and white
    /// space then do not change the key.
    pub fn canonical_json(mut self, on: bool) -> Self {
        self.config.keying.canonical_json = on;
        self
    }

    /// Leaves a top-level JSON field out of the key (for example `user`).
    pub fn ignore_json_field(mut self, field: impl Into<String>) -> Self {
        self.config.keying.ignored_fields.push(field.into());
        self
    }

    /// Puts every request in one fixed tenant. By default requests are in
    /// [`DEFAULT_TENANT`](crate::DEFAULT_TENANT) with their keys partitioned by a hash of
    /// their credentials header; a fixed tenant drops that partition (use
    /// [`vary_header`](Self::vary_header) or a [`namespace_resolver`](Self::namespace_resolver)
    /// when callers with different credentials must not share entries).
    ///
    /// Where the namespace comes from does not depend on the order of the calls: an
    /// [`authenticator`](Self::authenticator) (or [`trusted_headers`](Self::trusted_headers))
    /// takes precedence over a [`namespace_resolver`](Self::namespace_resolver), which takes
    /// precedence over a fixed tenant, which replaces the default credentials partition. A
    /// shadowed setting is reported as a warning when the layer is built.
    pub fn tenant(mut self, tenant: impl Into<Arc<str>>) -> Self {
        self.namespace.tenant = Some(tenant.into());
        self
    }

    /// The policy version every key is scoped to (default `"1"`). A new one changes every key.
    /// It applies to a fixed [`tenant`](Self::tenant) and to the default credentials partition;
    /// the namespaces a resolver or an authenticator gives carry their own.
    pub fn policy_version(mut self, version: impl Into<Arc<str>>) -> Self {
        self.namespace.policy_version = Some(version.into());
        self
    }

    /// Resolves tenant and policy version per request; a request it returns `None` for
    /// bypasses the cache. Takes precedence over [`tenant`](Self::tenant); an
    /// [`authenticator`](Self::authenticator) takes precedence over it.
    pub fn namespace_resolver(
        mut self,
        resolve: impl Fn(&RequestHead<'_>) -> Option<Namespace> + Send + Sync + 'static,
    ) -> Self {
        let resolve: NamespaceResolver = Arc::new(resolve);
        self.namespace.resolver = Some(resolve);
        self
    }

    /// Takes the namespace of each request from `auth` (for example
    /// [`JwtAuth`](crate::auth::jwt::JwtAuth)): a request without credentials bypasses the
    /// cache, one with rejected credentials bypasses it with the reason in `X-Cache-Error`.
    /// The credentials are verified once per request. Takes precedence over every other
    /// namespace setting.
    pub fn authenticator(mut self, auth: impl Authenticator) -> Self {
        self.namespace.authenticator = Some(Arc::new(auth));
        self
    }

    /// Resolves a request's [`RequestContext`] from its head when it has neither an extension
    /// nor a task-local scope. An `Err` makes the request a bypass, with the message in the
    /// `X-Cache-Error` response header.
    pub fn context_resolver(
        mut self,
        resolve: impl Fn(&RequestHead<'_>) -> Result<Option<RequestContext>, String>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        let resolve: ContextResolver = Arc::new(resolve);
        self.config.context_resolver = Some(resolve);
        self
    }

    /// Adds `X-Cache-Similarity` to responses (1.00 on hits, 0.00 otherwise), as the hosted
    /// product's gateway does.
    pub fn similarity_header(mut self, on: bool) -> Self {
        self.config.similarity_header = on;
        self
    }

    /// Leaves the [`CacheStatus`](crate::CacheStatus) extension off responses (they still
    /// carry `X-Cache`): for a server whose responses only ever go to the wire, where the
    /// extension would be an allocation made and dropped on every request.
    #[cfg(feature = "gateway")]
    pub(crate) fn without_status_extension(mut self) -> Self {
        self.config.status_extension = false;
        self
    }

    /// The longest any store call may take before the request goes on without the cache
    /// (default 250 ms).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config.store_timeout = timeout;
        self
    }

    /// After `failures` consecutive store failures, skip the store for `cooldown`
    /// (default 5 failures, 5 s).
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.config.breaker_failures = failures;
        self.config.breaker_cooldown = cooldown;
        self
    }

    /// The methods whose requests are cached (default GET and POST). Others pass through
    /// without their bodies being read.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// Turns on trusted-header mode (docs/design.md §8; see [`crate::wire`]).
    ///
    /// - the namespace of each request comes from `auth` (no or invalid credentials: `BYPASS`,
    ///   invalid ones with `X-Cache-Error` saying why);
    /// - the deps come from `X-CacheCore-Deps` (malformed: `BYPASS` with `X-Cache-Error`), and
    ///   `X-CacheCore-Bypass: 1` bypasses;
    /// - responses carry `X-Cache-Similarity`.
    ///
    /// A [`RequestContext`] extension or [`scope`](crate::scope) still wins over the headers.
    /// Only turn this on where the headers come from callers you let control the cache: a
    /// gateway in front of an upstream API, not a public app server.
    pub fn trusted_headers(self, auth: impl Authenticator) -> Self {
        self.authenticator(auth)
            .context_resolver(|head| {
                crate::wire::context_from_headers(head.headers).map_err(|e| e.to_string())
            })
            .similarity_header(true)
    }

    /// Turns on L2: requests that miss L1 may be answered by an entry whose question means
    /// the same (see [`crate::semantic`]).
    #[cfg_attr(docsrs, doc(cfg(feature = "semantic")))]
    #[cfg(feature = "semantic")]
    pub fn semantic(mut self, l2: crate::semantic::SemanticCache) -> Self {
        self.config.semantic = Some(Arc::new(l2));
        self
    }

    /// Builds the layer.
    pub fn build(mut self) -> CachecoreLayer {
        self.config.namespace = self.namespace.resolve();
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new()) as Arc<dyn CacheStore>);
        CachecoreLayer {
            engine: Arc::new(Engine::new(store, self.config)),
        }
    }
}
