//! Configuration: what a layer is built with, and the defaults of each setting.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::Method;

use crate::auth::{AuthError, Authenticator};
use crate::context::{ContextResolver, RequestHead};
use crate::key::BodyKeying;
use crate::namespace::{
    CredentialHash, Namespace, NamespaceResolver, ANONYMOUS_PARTITION, DEFAULT_POLICY_VERSION,
    DEFAULT_TENANT,
};

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
    /// Keys partitioned by a hash of the credentials header (docs/design.md §3), deps in the
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

    pub(super) fn resolve(
        &self,
        head: &RequestHead<'_>,
        credentials: &[HeaderName],
    ) -> Option<Namespace> {
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
    #[cfg(any(test, feature = "reqwest"))]
    pub(crate) fn is_credentials(&self) -> bool {
        matches!(self, Self::Credentials { .. })
    }

    /// For an authenticator, the one verification of the request's credentials; an error
    /// saying why when they are rejected.
    pub(super) fn authenticate(&self, head: &RequestHead<'_>) -> Result<Authentication, String> {
        let Self::Authenticated(auth) = self else {
            return Ok(Authentication::NotUsed);
        };
        match auth.authenticate(head.headers) {
            Ok(ns) => Ok(Authentication::Verified(ns)),
            Err(AuthError::Missing) => Ok(Authentication::Missing),
            Err(e @ AuthError::Invalid(_)) => Err(e.to_string()),
        }
    }

    /// The tenant `invalidate` works on when none is named; `None` when tenants come from a
    /// resolver or an authenticator, where no tenant is "the" tenant.
    pub(super) fn default_tenant(&self) -> Option<Arc<str>> {
        match self {
            Self::Fixed(ns) => Some(ns.tenant_shared().clone()),
            Self::Credentials { anonymous } => Some(anonymous.tenant_shared().clone()),
            Self::Resolver(_) | Self::Authenticated(_) => None,
        }
    }
}

/// What an authenticator made of a request's credentials.
pub(super) enum Authentication {
    /// The namespace comes from another source.
    NotUsed,
    /// The request carries no credentials: it has no namespace.
    Missing,
    /// The namespace the credentials entitle the request to.
    Verified(Namespace),
}

/// The namespace settings of a builder, each kept apart so that the order of the calls never
/// matters: [`resolve`](Self::resolve) applies one precedence (docs/design.md §3).
#[derive(Clone, Default)]
pub(crate) struct NamespaceSettings {
    pub(crate) tenant: Option<Arc<str>>,
    pub(crate) policy_version: Option<Arc<str>>,
    pub(crate) resolver: Option<NamespaceResolver>,
    pub(crate) authenticator: Option<Arc<dyn Authenticator>>,
}

impl NamespaceSettings {
    /// The source of every request's namespace. Precedence, highest first: an authenticator
    /// (trusted-header mode included), a namespace resolver, a fixed tenant, and by default
    /// the credentials partition in [`DEFAULT_TENANT`]. The policy version applies to the last
    /// two; an authenticator's or a resolver's namespaces carry their own. A setting that is
    /// shadowed is reported once, as a warning, when the layer is built.
    pub(crate) fn resolve(self) -> NamespaceSource {
        let Self {
            tenant,
            policy_version,
            resolver,
            authenticator,
        } = self;
        let shadowed = |what: &str, by: &str| {
            tracing::warn!(target: "cachecore", "the builder's {what} is not used: {by} takes precedence (docs/design.md §3)");
        };
        if let Some(auth) = authenticator {
            for (set, what) in [
                (resolver.is_some(), "namespace_resolver"),
                (tenant.is_some(), "tenant"),
                (policy_version.is_some(), "policy_version"),
            ] {
                if set {
                    shadowed(what, "the authenticator");
                }
            }
            return NamespaceSource::Authenticated(auth);
        }
        if let Some(resolve) = resolver {
            for (set, what) in [
                (tenant.is_some(), "tenant"),
                (policy_version.is_some(), "policy_version"),
            ] {
                if set {
                    shadowed(what, "the namespace resolver");
                }
            }
            return NamespaceSource::Resolver(resolve);
        }
        let policy_version = policy_version.unwrap_or_else(|| Arc::from(DEFAULT_POLICY_VERSION));
        match tenant {
            Some(tenant) => NamespaceSource::Fixed(Namespace::new(tenant, policy_version)),
            None => NamespaceSource::credentials(policy_version),
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
    /// Whether a marked response carries the [`CacheStatus`](crate::CacheStatus) extension
    /// (always, except in the gateway, whose responses only ever go to the wire).
    pub(crate) status_extension: bool,
    pub(crate) credential_headers: Vec<HeaderName>,
    pub(crate) coalesce_wait: Duration,
    pub(crate) coalesce_body_wait: Duration,
    /// L2 (docs/design.md §5a), when turned on.
    #[cfg(feature = "semantic")]
    pub(crate) semantic: Option<Arc<crate::semantic::SemanticCache>>,
}

impl Config {
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
            status_extension: true,
            credential_headers: crate::headers::default_credential_headers(),
            coalesce_wait: defaults::COALESCE_WAIT,
            coalesce_body_wait: defaults::COALESCE_BODY_WAIT,
            #[cfg(feature = "semantic")]
            semantic: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> NamespaceSettings {
        NamespaceSettings::default()
    }

    fn head_of(req: &http::Request<()>) -> RequestHead<'_> {
        RequestHead::of(req)
    }

    #[test]
    fn with_nothing_set_keys_are_partitioned_by_credentials_in_the_default_tenant() {
        let source = settings().resolve();
        assert!(source.is_credentials());
        assert_eq!(source.default_tenant().as_deref(), Some(DEFAULT_TENANT));
    }

    #[test]
    fn tenant_and_policy_version_combine_whatever_their_order() {
        let s = NamespaceSettings {
            tenant: Some("acme".into()),
            policy_version: Some("7".into()),
            ..settings()
        };
        let req = http::Request::new(());
        let ns = s.resolve().resolve(&head_of(&req), &[]).unwrap();
        assert_eq!((ns.tenant(), ns.policy_version()), ("acme", "7"));
    }

    #[test]
    fn a_resolver_takes_precedence_over_a_tenant_and_an_authenticator_over_both() {
        let resolver: NamespaceResolver = Arc::new(|_| Some(Namespace::new("resolved", "1")));
        let auth: Arc<dyn Authenticator> =
            Arc::new(|_: &http::HeaderMap| Ok(Namespace::new("authenticated", "1")));
        let req = http::Request::new(());
        let tenant_of = |s: NamespaceSettings| {
            s.resolve()
                .resolve(&head_of(&req), &[])
                .map(|ns| ns.tenant().to_owned())
        };
        let with_resolver = NamespaceSettings {
            tenant: Some("fixed".into()),
            resolver: Some(resolver.clone()),
            ..settings()
        };
        assert_eq!(tenant_of(with_resolver).as_deref(), Some("resolved"));
        let with_all = NamespaceSettings {
            tenant: Some("fixed".into()),
            resolver: Some(resolver),
            authenticator: Some(auth),
            ..settings()
        };
        assert_eq!(tenant_of(with_all).as_deref(), Some("authenticated"));
    }
}
