//! One invalidation as a value ([`Invalidation`]) and what came of it ([`Invalidated`], or an
//! [`InvalidationError`]): what [`CacheInvalidator::invalidate`] takes and returns
//! (docs/design.md §4).
//!
//! [`CacheInvalidator::invalidate`]: crate::CacheInvalidator::invalidate

use std::fmt;

use crate::store::InvalidationResult;

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

/// Every dep of an [`Invalidation`] was invalidated: entries derived from them are no longer
/// served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidated {
    results: Vec<InvalidationResult>,
}

impl Invalidated {
    /// One result per dep, in the order of the invalidation.
    pub fn results(&self) -> &[InvalidationResult] {
        &self.results
    }

    /// The per-dep results, owned.
    pub fn into_results(self) -> Vec<InvalidationResult> {
        self.results
    }

    /// How many entries were deleted now, in all. Zero does not mean nothing was invalidated:
    /// entries still in the store are refused on read and reclaimed later.
    pub fn entries_deleted(&self) -> u64 {
        self.results.iter().map(|r| r.deleted).sum()
    }
}

/// At least one dep of an [`Invalidation`] was not invalidated (a bad id or hash, a store
/// failure, no tenant to work on). The others may have been: see [`results`](Self::results).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidationError {
    results: Vec<InvalidationResult>,
}

impl InvalidationError {
    /// One result per dep, in the order of the invalidation, failed or not.
    pub fn results(&self) -> &[InvalidationResult] {
        &self.results
    }

    /// The per-dep results, owned.
    pub fn into_results(self) -> Vec<InvalidationResult> {
        self.results
    }

    /// The results that failed.
    pub fn failed(&self) -> impl Iterator<Item = &InvalidationResult> {
        self.results.iter().filter(|r| !r.ok)
    }
}

impl fmt::Display for InvalidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalidation failed:")?;
        for r in self.failed() {
            write!(
                f,
                " {:?} ({})",
                r.dep_id,
                r.error.as_deref().unwrap_or("no reason given")
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidationError {}

/// The outcome of per-dep results: `Ok` when every one succeeded.
pub(crate) fn outcome(results: Vec<InvalidationResult>) -> Result<Invalidated, InvalidationError> {
    if results.iter().all(|r| r.ok) {
        Ok(Invalidated { results })
    } else {
        Err(InvalidationError { results })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_is_ok_only_when_every_dep_succeeded() {
        let ok = outcome(vec![
            InvalidationResult::ok("a", 2),
            InvalidationResult::ok("b", 1),
        ])
        .unwrap();
        assert_eq!(ok.entries_deleted(), 3);
        let err = outcome(vec![
            InvalidationResult::ok("a", 2),
            InvalidationResult::failed("b", "store down"),
        ])
        .unwrap_err();
        assert_eq!(err.failed().count(), 1);
        assert_eq!(err.to_string(), r#"invalidation failed: "b" (store down)"#);
        assert!(outcome(Vec::new()).is_ok(), "nothing asked, nothing failed");
    }
}
