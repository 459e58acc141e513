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

use crate::{CacheInvalidator, CachecoreLayer, InvalidationResult};

/// Largest request body read, in bytes: a thousand 40-byte ids with their JSON quoting fit
/// with room to spare.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Most ids in one batch. Larger jobs split their ids; a bound keeps one call's store work
/// (and its time holding a connection) predictable.
pub const MAX_BATCH: usize = 1000;

/// Longest `new_hash` accepted, in bytes: the crate-wide [`crate::MAX_NEW_HASH_LEN`].
pub const MAX_NEW_HASH_LEN: usize = crate::MAX_NEW_HASH_LEN;

/// The future an [`Invalidator`] returns.
pub type InvalidateFuture<'a> = Pin<Box<dyn Future<Output = Vec<InvalidationResult>> + Send + 'a>>;

/// Something that applies invalidations in bulk, one result per id: a layer's
/// [`CacheInvalidator`], or a wrapper of your own (to fan out, to audit). The invalidation
/// service and the queue worker apply the invalidations they receive through it; your own code
/// calls [`CacheInvalidator::invalidate`].
pub trait Invalidator: Send + Sync + 'static {
    /// Invalidates each of `dep_ids` in `tenant` (recording `new_hash`, or a random one), and
    /// reports one result per id, in order. Never fails as a whole: failures are per id.
    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: Option<&'a str>,
    ) -> InvalidateFuture<'a>;
}

impl Invalidator for CacheInvalidator {
    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: Option<&'a str>,
    ) -> InvalidateFuture<'a> {
        Box::pin(self.invalidate_in(tenant, dep_ids, new_hash))
    }
}

/// A layer applies invalidations through its [`invalidator`](CachecoreLayer::invalidator).
impl Invalidator for CachecoreLayer {
    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: Option<&'a str>,
    ) -> InvalidateFuture<'a> {
        Box::pin(async move {
            self.invalidator()
                .invalidate_in(tenant, dep_ids, new_hash)
                .await
        })
    }
}

impl<T: Invalidator + ?Sized> Invalidator for Arc<T> {
    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: Option<&'a str>,
    ) -> InvalidateFuture<'a> {
        (**self).invalidate_many(tenant, dep_ids, new_hash)
    }
}
