//! A Tower layer that caches the responses of expensive HTTP calls (LLM API calls above all)
//! and drops them the moment the data they were computed from changes.
//!
//! Put [`CachecoreLayer`] around any `Service<http::Request<B>>` (an axum router, a hyper
//! client, a tower stack); tag each request with the [`Dep`]s its answer is derived from; when
//! one of them changes, invalidate it and every entry derived from it stops being served at
//! once.
//!
//! ```
//! use bytes::Bytes;
//! use cachecore::{CacheStatus, CachecoreLayer, Dep, Invalidation, MemoryStore, RequestContext};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, Layer, Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let cache = CachecoreLayer::builder().store(MemoryStore::new()).build();
//! let mut llm = cache.layer(service_fn(|_req: http::Request<_>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("answer"))))
//! }));
//! let ask = || {
//!     let body = Full::new(Bytes::from(r#"{"model":"m","messages":[]}"#));
//!     let mut req = http::Request::post("http://llm.local/v1/chat/completions").body(body).unwrap();
//!     req.extensions_mut().insert(RequestContext::new().dep(Dep::new("doc:contract-123")));
//!     req
//! };
//! let res = llm.ready().await.unwrap().call(ask()).await.unwrap();
//! assert_eq!(res.extensions().get::<CacheStatus>(), Some(&CacheStatus::Miss));
//! res.into_body().collect().await.unwrap(); // a miss is stored when its body ends
//!
//! let res = llm.ready().await.unwrap().call(ask()).await.unwrap();
//! assert_eq!(res.extensions().get::<CacheStatus>(), Some(&CacheStatus::Hit));
//!
//! // The contract changed: every answer derived from it goes.
//! let invalidation = Invalidation::of(["doc:contract-123"]).new_hash("v2");
//! cache.invalidator().invalidate(invalidation).await.unwrap();
//! let res = llm.ready().await.unwrap().call(ask()).await.unwrap();
//! assert_eq!(res.extensions().get::<CacheStatus>(), Some(&CacheStatus::Miss));
//! # }
//! ```
//!
//! # Where to go next
//!
//! - [`CachecoreBuilder`]: the store ([`MemoryStore`], or `RedisStore` with the feature
//!   `redis`), lifetimes, limits, the namespace (tenant, credentials partition, resolver,
//!   authenticator, with one precedence), the store timeout and breaker.
//! - [`RequestContext`] and [`scope`]: per-request deps, lifetime, refresh or bypass.
//! - [`invalidate`]: the `POST /v1/invalidate` service; [`wire`]: the trusted-header format for
//!   callers in other languages; `gateway` (feature `gateway`): the caching reverse proxy.
//! - [`metrics`]: counters and (feature `prometheus`) a Prometheus collector.
//! - `testing` (feature `test-util`): aids for your integration tests.
//!
//! The README covers setup, every adapter (axum, hyper, reqwest, async-openai), production
//! settings and measured costs; `docs/design.md` states the contract (keys, dependency rules,
//! stores, failure, wire format) and `docs/ARCHITECTURE.md` maps the code.
#![cfg_attr(docsrs, feature(doc_cfg))]

// The README's examples run as doctests too.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod auth;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
mod context;
mod counters;
#[cfg(any(feature = "gateway", feature = "redis"))]
mod deadline;
mod dep;
mod edge;
mod engine;
#[cfg(feature = "gateway")]
#[cfg_attr(docsrs, doc(cfg(feature = "gateway")))]
pub mod gateway;
pub mod headers;
pub mod invalidate;
mod invalidation;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod key;
#[cfg(not(feature = "test-util"))]
mod key;
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
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;
pub mod wire;

pub use context::{current_scope, scope, ContextResolver, RequestContext, RequestHead};
pub use counters::MetricsSnapshot;
pub use dep::{validate_dep_id, Dep, InvalidDepId, MAX_DEP_ID_LEN, POLICY_DEP};
pub use dep::{validate_new_hash, InvalidNewHash, MAX_NEW_HASH_LEN};
pub use headers::{X_CACHE, X_CACHE_AGE, X_CACHE_ERROR, X_CACHE_SIMILARITY};
pub use invalidation::{DepError, DepErrorKind, Invalidated, Invalidation, InvalidationError};
pub use layer::{
    CacheInvalidator, Cachecore, CachecoreBuilder, CachecoreLayer, RequestBody, ResponseBody,
};
pub use namespace::{
    credentials_partition, Namespace, NamespaceResolver, ANONYMOUS_PARTITION,
    DEFAULT_POLICY_VERSION, DEFAULT_TENANT,
};
pub use status::CacheStatus;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::redis::{RedisStore, RedisStoreBuilder};
pub use store::{
    CacheKey, CacheStore, DepEpochs, DepInvalidated, Entry, Lookup, MemoryStore, PutOutcome,
    StoreError, StoreErrorKind,
};
