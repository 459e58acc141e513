#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
mod context;
mod dep;
mod engine;
#[cfg(feature = "gateway")]
#[cfg_attr(docsrs, doc(cfg(feature = "gateway")))]
pub mod gateway;
pub mod invalidate;
pub mod key;
pub mod layer;
pub mod metrics;
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

pub use context::{current_scope, scope, RequestContext};
pub use dep::{validate_dep_id, Dep, InvalidDepId, MAX_DEP_ID_LEN, POLICY_DEP};
pub use dep::{validate_new_hash, InvalidNewHash, MAX_NEW_HASH_LEN};
pub use engine::{
    credentials_partition, ContextResolver, Namespace, NamespaceResolver, RequestHead,
    ANONYMOUS_PARTITION, DEFAULT_POLICY_VERSION, DEFAULT_TENANT, X_CACHE, X_CACHE_AGE,
    X_CACHE_SIMILARITY,
};
pub use layer::{
    Cachecore, CachecoreBuilder, CachecoreLayer, RequestBody, ResponseBody, X_CACHE_ERROR,
};
pub use metrics::MetricsSnapshot;
pub use status::CacheStatus;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::redis::{RedisStore, RedisStoreBuilder};
pub use store::{
    CacheKey, CacheStore, DepEpochs, Entry, InvalidationResult, Lookup, MemoryStore, PutOutcome,
    StoreError, StoreErrorKind,
};
