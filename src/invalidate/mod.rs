//! Invalidation from outside the process: `POST /v1/invalidate` (docs/design.md §8).
//!
//! [`InvalidateService`] is a tower service for webhooks, ETL jobs and other services. The
//! caller's credentials name the tenant (see [`crate::auth`]); a call only ever touches that
//! tenant's deps.
//!
//! | request | answer |
//! |---|---|
//! | `{"dep_id": "doc:1", "new_hash": "v2"}` (`new_hash` optional) | `200 {"ok":true,"dep_id":"doc:1","keys_deleted":3}` |
//! | `{"dep_ids": ["table:a", "table:b"], "new_hash": "..."}` | `200 {"results":[{"ok":true,"dep_id":"table:a","keys_deleted":0,"error":null}, ...]}` |
//!
//! A store failure is `503` with the same shape and `"ok": false` (a batch: `503` only when no
//! id succeeded). Bad input is a `4xx` with `{"error": {"code": "...", "message": "..."}}`
//! (the codes are listed on [`ApiError`]), and nothing is invalidated: the whole request,
//! every id of a batch included, is validated before the store is touched.
//!
//! ```
//! use axum::Router;
//! use cachecore::auth::FixedTenant;
//! use cachecore::invalidate::InvalidateService;
//! use cachecore::CachecoreLayer;
//!
//! let cache = CachecoreLayer::builder().tenant("acme").build();
//! let app: Router = Router::new()
//!     // .route("/v1/chat/completions", ...)
//!     .route_service(
//!         "/v1/invalidate",
//!         InvalidateService::new(cache.invalidator(), FixedTenant::new("acme")),
//!     )
//!     .layer(cache);
//! # let _ = app;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

mod error;
pub(crate) mod payload;
mod service;

pub use error::ApiError;
pub use service::{InvalidateService, ResponseFuture};

use crate::{CacheInvalidator, CachecoreLayer, Invalidated, Invalidation, InvalidationError};

/// Largest request body read, in bytes: a thousand 40-byte ids with their JSON quoting fit
/// with room to spare.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Most ids in one batch. Larger jobs split their ids; a bound keeps one call's store work
/// (and its time holding a connection) predictable.
pub const MAX_BATCH: usize = 1000;

/// Longest `new_hash` accepted, in bytes: the crate-wide [`crate::MAX_NEW_HASH_LEN`].
pub const MAX_NEW_HASH_LEN: usize = crate::MAX_NEW_HASH_LEN;

/// The future an [`Invalidator`] returns.
pub type InvalidateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Invalidated, InvalidationError>> + Send + 'a>>;

/// Anything that applies an [`Invalidation`] and reports per dep: a layer's
/// [`CacheInvalidator`] (or the [`CachecoreLayer`] itself), the remote
/// [`CachecoreClient`](crate::client::CachecoreClient), or a wrapper of your own (to fan out,
/// to audit). The invalidation service and the queue worker apply what they receive through
/// one, so these are interchangeable there.
///
/// It has the signature of [`CacheInvalidator::invalidate`], which is what your own code
/// calls.
///
/// ```
/// use cachecore::invalidate::{InvalidateFuture, Invalidator};
/// use cachecore::{CacheInvalidator, Invalidation};
///
/// /// Logs every invalidation, then applies it.
/// struct Audited(CacheInvalidator);
///
/// impl Invalidator for Audited {
///     fn invalidate(&self, invalidation: Invalidation) -> InvalidateFuture<'_> {
///         println!("invalidating {:?}", invalidation.dep_ids().collect::<Vec<_>>());
///         Box::pin(self.0.invalidate(invalidation))
///     }
/// }
/// ```
pub trait Invalidator: Send + Sync + 'static {
    /// Applies `invalidation`: `Ok` when every dep was invalidated, else an error that reports
    /// every dep, failed or not, in order.
    fn invalidate(&self, invalidation: Invalidation) -> InvalidateFuture<'_>;
}

impl Invalidator for CacheInvalidator {
    fn invalidate(&self, invalidation: Invalidation) -> InvalidateFuture<'_> {
        Box::pin(CacheInvalidator::invalidate(self, invalidation))
    }
}

/// A layer applies invalidations through its [`invalidator`](CachecoreLayer::invalidator).
impl Invalidator for CachecoreLayer {
    fn invalidate(&self, invalidation: Invalidation) -> InvalidateFuture<'_> {
        let invalidator = self.invalidator();
        Box::pin(async move { invalidator.invalidate(invalidation).await })
    }
}

impl<T: Invalidator + ?Sized> Invalidator for Arc<T> {
    fn invalidate(&self, invalidation: Invalidation) -> InvalidateFuture<'_> {
        (**self).invalidate(invalidation)
    }
}
