#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
mod context;
mod dep;
mod edge;
mod engine;
#[cfg(feature = "gateway")]
#[cfg_attr(docsrs, doc(cfg(feature = "gateway")))]
pub mod gateway;
pub mod headers;
pub mod invalidate;
pub mod key;
pub mod layer;
pub mod metrics;
mod namespace;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod queue;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
#[cfg(feature = "semantic")]
#[cfg_attr(docsrs, doc(cfg(feature = "semantic")))]
pub mod semantic;
mod status;
pub mod store;
pub mod testing;
pub mod wire;

pub use context::{current_scope, scope, ContextResolver, RequestContext, RequestHead};
pub use dep::{validate_dep_id, Dep, InvalidDepId, MAX_DEP_ID_LEN, POLICY_DEP};
pub use dep::{validate_new_hash, InvalidNewHash, MAX_NEW_HASH_LEN};
pub use headers::{X_CACHE, X_CACHE_AGE, X_CACHE_ERROR, X_CACHE_SIMILARITY};
pub use layer::{Cachecore, CachecoreBuilder, CachecoreLayer, RequestBody, ResponseBody};
pub use metrics::MetricsSnapshot;
pub use namespace::{
    credentials_partition, Namespace, NamespaceResolver, ANONYMOUS_PARTITION,
    DEFAULT_POLICY_VERSION, DEFAULT_TENANT,
};
pub use status::CacheStatus;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::redis::{RedisStore, RedisStoreBuilder};
pub use store::{
    CacheKey, CacheStore, DepEpochs, Entry, InvalidationResult, Lookup, MemoryStore, PutOutcome,
    StoreError, StoreErrorKind,
};
