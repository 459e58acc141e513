//! The tower adapter: [`CachecoreLayer`] builds [`Cachecore`] around any
//! `Service<http::Request<B>>`.

mod body;
mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use crate::engine::ResponseBody;
pub use crate::headers::X_CACHE_ERROR;
pub use body::RequestBody;
pub use future::ResponseFuture;
pub use layer::{CacheInvalidator, CachecoreBuilder, CachecoreLayer};
pub use service::Cachecore;
#[cfg(feature = "gateway")]
pub(crate) use service::{buffer, Unbuffered};
