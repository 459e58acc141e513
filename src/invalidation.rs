//! One invalidation as a value ([`Invalidation`]) and what came of it: [`Invalidated`] when
//! every dep was invalidated, else an [`InvalidationError`]; per dep, a [`DepInvalidated`] or a
//! [`DepError`]. What every invalidation handle takes and returns
//! ([`CacheInvalidator::invalidate`], the [`Invalidator`] trait, the remote client), and what a
//! store reports per dep (docs/design.md §4).
//!
//! [`CacheInvalidator::invalidate`]: crate::CacheInvalidator::invalidate
//! [`Invalidator`]: crate::invalidate::Invalidator

use std::fmt;
use std::sync::Arc;

use crate::store::{DepInvalidated, StoreError, StoreErrorKind};

/// Deps to invalidate, in which tenant, and the version they move to.
///
/// ```
/// use cachecore::Invalidation;
///
/// let inv = Invalidation::of(["doc:1", "doc:2"]).tenant("acme").new_hash("v8");
/// assert_eq!(inv.dep_ids().collect::<Vec<_>>(), ["doc:1", "doc:2"]);
/// assert_eq!((inv.tenant_name(), inv.hash()), (Some("acme"), Some("v8")));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Invalidation {
    dep_ids: Vec<String>,
    tenant: Option<String>,
    new_hash: Option<String>,
}

impl Invalidation {
    /// Invalidates each of `dep_ids` (one result per id, in order).
    pub fn of<I, S>(dep_ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            dep_ids: dep_ids.into_iter().map(Into::into).collect(),
            tenant: None,
            new_hash: None,
        }
    }

    /// In this tenant. Without one, the layer's own: the fixed tenant, or
    /// [`DEFAULT_TENANT`](crate::DEFAULT_TENANT), which holds the entries of every credentials
    /// partition. A layer whose tenants come per request (a resolver, an authenticator) has no
    /// tenant of its own, and refuses an invalidation that names none.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// The version the deps move to (checked by [`validate_new_hash`](crate::validate_new_hash));
    /// without one a random version is recorded. Every invalidation invalidates, even with the
    /// same hash as the last.
    pub fn new_hash(mut self, new_hash: impl Into<String>) -> Self {
        self.new_hash = Some(new_hash.into());
        self
    }

    /// The dep ids, in order.
    pub fn dep_ids(&self) -> impl ExactSizeIterator<Item = &str> {
        self.dep_ids.iter().map(String::as_str)
    }

    /// The tenant named, if any.
    pub fn tenant_name(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// The new hash given, if any.
    pub fn hash(&self) -> Option<&str> {
        self.new_hash.as_deref()
    }
}

/// One dep not invalidated: entries derived from it may still be served.
///
/// Displays as its reason alone (what `POST /v1/invalidate` sends as the dep's `error`): a
/// store failure as its [`StoreError`] does, anything else as its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepError {
    dep_id: String,
    kind: DepErrorKind,
    message: String,
}

/// Why a dep was not invalidated: what a caller can do about it depends on it (the queue
/// worker retries the kinds [`is_transient`](DepErrorKind::is_transient) names, in place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DepErrorKind {
    /// The dep id or the new hash is invalid ([`validate_dep_id`](crate::validate_dep_id),
    /// [`validate_new_hash`](crate::validate_new_hash)): no retry can help.
    InvalidInput,
    /// No tenant to work in: the invalidation named none and the handle has none of its own
    /// (a layer whose tenants come per request), or it named one the handle cannot reach (a
    /// [remote client](crate::client) whose token is for another tenant).
    Tenant,
    /// The store failed, in the way its [`StoreErrorKind`] says.
    Store(StoreErrorKind),
    /// A remote invalidation API could not be reached, timed out, or kept failing (`5xx`,
    /// `429`) until the client gave up: nothing is known of the dep, and trying again later may
    /// help.
    Transport,
    /// A remote invalidation API refused the call (a `4xx`: credentials, input, limits): trying
    /// it again as it is cannot help.
    Rejected,
    /// Any other failure: one an [`Invalidator`](crate::invalidate::Invalidator) of your own
    /// reports, one a remote API reported without a kind this crate knows, an answer that could
    /// not be read.
    Other,
}

impl DepErrorKind {
    /// Whether trying again as it is may succeed: a store that timed out, failed or is being
    /// skipped by the circuit breaker (`Timeout`, `Backend`, `CircuitOpen`), or a remote API
    /// that could not be reached.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Store(
                StoreErrorKind::Timeout | StoreErrorKind::Backend | StoreErrorKind::CircuitOpen
            ) | Self::Transport
        )
    }
}

impl DepError {
    /// `dep_id` failed with `kind`, for the reason `message`.
    pub fn new(dep_id: impl Into<String>, kind: DepErrorKind, message: impl Into<String>) -> Self {
        Self {
            dep_id: dep_id.into(),
            kind,
            message: message.into(),
        }
    }

    /// `dep_id` failed because the store did.
    pub fn store(dep_id: impl Into<String>, error: &StoreError) -> Self {
        Self::new(dep_id, DepErrorKind::Store(error.kind()), error.message())
    }

    /// The dep id.
    pub fn dep_id(&self) -> &str {
        &self.dep_id
    }

    /// What kind of failure.
    pub fn kind(&self) -> DepErrorKind {
        self.kind
    }

    /// The message (for a store failure, without the kind [`Display`](fmt::Display) adds).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for DepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            DepErrorKind::Store(kind) => crate::store::describe(f, kind, &self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for DepError {}

/// Every dep of an [`Invalidation`] was invalidated: entries derived from them are no longer
/// served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidated {
    deps: Vec<DepInvalidated>,
}

impl Invalidated {
    /// `Ok` when every one of `results` succeeded, else an error holding them all: how an
    /// [`Invalidator`](crate::invalidate::Invalidator) of your own (one that fans out, say)
    /// reports what it gathered.
    pub fn from_results(
        results: Vec<Result<DepInvalidated, DepError>>,
    ) -> Result<Self, InvalidationError> {
        if results.iter().all(Result::is_ok) {
            Ok(Self {
                deps: results.into_iter().flatten().collect(),
            })
        } else {
            Err(InvalidationError {
                results,
                cause: None,
            })
        }
    }

    /// One result per dep, in the order of the invalidation.
    pub fn deps(&self) -> &[DepInvalidated] {
        &self.deps
    }

    /// The per-dep results, owned, as [`InvalidationError::into_results`] gives them (every one
    /// `Ok`), so both outcomes can be handled alike:
    /// `outcome.map_or_else(InvalidationError::into_results, Invalidated::into_results)`.
    pub fn into_results(self) -> Vec<Result<DepInvalidated, DepError>> {
        self.deps.into_iter().map(Ok).collect()
    }

    /// How many entries were deleted now, in all. Zero does not mean nothing was invalidated:
    /// entries still in the store are refused on read and reclaimed later.
    pub fn entries_deleted(&self) -> u64 {
        self.deps.iter().map(|d| d.deleted).sum()
    }
}

/// At least one dep of an [`Invalidation`] was not invalidated (a bad id or hash, a store
/// failure, no tenant to work in, a remote API out of reach). The others may have been: see
/// [`results`](Self::results).
///
/// When one cause failed the whole call (the remote client's [`ClientError`]), it is the
/// error's [`source`](std::error::Error::source).
///
/// [`ClientError`]: crate::client::ClientError
#[derive(Clone, Debug)]
pub struct InvalidationError {
    results: Vec<Result<DepInvalidated, DepError>>,
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl InvalidationError {
    /// Every one of `dep_ids` failed for the same reason, `cause`, which is kept as the
    /// error's [`source`](std::error::Error::source).
    pub fn every_dep<'a, E>(
        dep_ids: impl IntoIterator<Item = &'a str>,
        kind: DepErrorKind,
        cause: E,
    ) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let message = cause.to_string();
        Self {
            results: dep_ids
                .into_iter()
                .map(|id| Err(DepError::new(id, kind, message.as_str())))
                .collect(),
            cause: Some(Arc::new(cause)),
        }
    }

    /// One result per dep, in the order of the invalidation, failed or not.
    pub fn results(&self) -> &[Result<DepInvalidated, DepError>] {
        &self.results
    }

    /// The per-dep results, owned.
    pub fn into_results(self) -> Vec<Result<DepInvalidated, DepError>> {
        self.results
    }

    /// The deps that failed.
    pub fn failed(&self) -> impl Iterator<Item = &DepError> {
        self.results.iter().filter_map(|r| r.as_ref().err())
    }
}

impl fmt::Display for InvalidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalidation failed:")?;
        for e in self.failed() {
            write!(f, " {:?} ({e})", e.dep_id)?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_is_ok_only_when_every_dep_succeeded() {
        let ok = Invalidated::from_results(vec![
            Ok(DepInvalidated::new("a", 2)),
            Ok(DepInvalidated::new("b", 1)),
        ])
        .unwrap();
        assert_eq!(ok.entries_deleted(), 3);
        let err = Invalidated::from_results(vec![
            Ok(DepInvalidated::new("a", 2)),
            Err(DepError::new("b", DepErrorKind::Other, "store down")),
        ])
        .unwrap_err();
        assert_eq!(err.failed().count(), 1);
        assert_eq!(err.to_string(), r#"invalidation failed: "b" (store down)"#);
        assert!(
            Invalidated::from_results(Vec::new()).is_ok(),
            "nothing asked, nothing failed"
        );
    }

    #[test]
    fn a_store_failure_displays_as_the_store_error_does() {
        let store = StoreError::new(StoreErrorKind::Timeout, "no answer in 250ms");
        let e = DepError::store("doc:1", &store);
        assert_eq!(e.kind(), DepErrorKind::Store(StoreErrorKind::Timeout));
        assert_eq!(e.message(), "no answer in 250ms");
        assert_eq!(e.to_string(), store.to_string());
    }

    #[test]
    fn store_outages_and_unreachable_remotes_are_transient_and_bad_input_is_not() {
        for kind in [
            StoreErrorKind::Timeout,
            StoreErrorKind::Backend,
            StoreErrorKind::CircuitOpen,
        ] {
            assert!(DepErrorKind::Store(kind).is_transient(), "{kind:?}");
        }
        assert!(DepErrorKind::Transport.is_transient());
        for kind in [
            DepErrorKind::Store(StoreErrorKind::Corrupt),
            DepErrorKind::Store(StoreErrorKind::InvalidInput),
            DepErrorKind::InvalidInput,
            DepErrorKind::Tenant,
            DepErrorKind::Rejected,
            DepErrorKind::Other,
        ] {
            assert!(!kind.is_transient(), "{kind:?}");
        }
    }

    #[test]
    fn a_whole_call_failure_is_every_deps_error_and_its_source() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = InvalidationError::every_dep(["a", "b"], DepErrorKind::Transport, cause);
        assert_eq!(e.failed().count(), 2);
        assert!(e.failed().all(|d| d.kind() == DepErrorKind::Transport));
        let source = std::error::Error::source(&e).expect("the cause");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }
}
