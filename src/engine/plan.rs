//! Planning: from a request's head alone, whether it is cached, in which namespace, with which
//! deps and lifetime (docs/design.md §3 and §4).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::HeaderMap;

use super::config::Authentication;
use super::Engine;
use crate::context::RequestHead;
use crate::headers::{cache_control, content_length};
use crate::key::KeyParts;
use crate::namespace::Namespace;
use crate::{current_scope, validate_dep_id, Dep, RequestContext, POLICY_DEP};

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
    /// The `X-Cache-Error` value of a problem with the caller's input.
    pub(crate) fn error_header(&self) -> Option<http::HeaderValue> {
        self.error_message()
            .and_then(|m| http::HeaderValue::from_str(m).ok())
    }

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

    /// The dep ids to check: the declared ones and the policy dep (sorted, each once). Most
    /// requests declare none: the policy dep alone is a static slice, not an allocation.
    pub(crate) fn dep_ids(&self) -> Cow<'_, [&str]> {
        if self.deps.is_empty() {
            return Cow::Borrowed(&[POLICY_DEP]);
        }
        let mut ids = Vec::with_capacity(self.deps.len() + 1);
        ids.extend(self.deps.iter().map(Dep::id));
        ids.push(POLICY_DEP);
        ids.sort_unstable();
        ids.dedup();
        Cow::Owned(ids)
    }
}

impl Engine {
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
        let namespace = match authenticated {
            Authentication::NotUsed => self.config.namespace_of(head),
            Authentication::Missing => None,
            Authentication::Verified(ns) => Some(ns),
        }
        .ok_or(BypassReason::NoNamespace)?;
        Ok(Plan {
            namespace,
            fresh_ttl: ctx.ttl.unwrap_or(self.config.fresh_ttl),
            deps: ctx.deps,
            refresh: ctx.refresh || directives.revalidate,
            semantic: ctx.semantic,
        })
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
