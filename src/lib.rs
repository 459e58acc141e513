//! cachecore
#![cfg_attr(docsrs, feature(doc_cfg))]

mod context;
mod dep;
pub mod key;
pub mod store;

pub use context::{current_scope, scope, RequestContext};
pub use dep::{validate_dep_id, Dep, InvalidDepId, MAX_DEP_ID_LEN, POLICY_DEP};
pub use store::{
    CacheKey, CacheStore, DepEpochs, Entry, InvalidationResult, Lookup, MemoryStore, PutOutcome,
    StoreError, StoreErrorKind,
};
