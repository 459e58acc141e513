//! Counters of the cache, cheap to bump on every request and cheap to read.
//!
//! Two ways to read them:
//!
//! - [`CachecoreLayer::metrics`](crate::CachecoreLayer::metrics): a [`MetricsSnapshot`], plain
//!   numbers for tests, logs and your own exporter;
//! - [`PrometheusCollector`] (feature `prometheus`): the same counters, the store latency
//!   histogram and the breaker state as one `prometheus-client` collector, registered on the
//!   registry of your service (the gateway's `/metrics` is rendered from one).
//!
//! The counters are plain atomics bumped on the request path; the collector reads them when
//! scraped, so exporting costs the request path nothing.
//!
//! ```
//! # #[cfg(feature = "prometheus")] {
//! use cachecore::metrics::PrometheusCollector;
//! use cachecore::CachecoreLayer;
//! use prometheus_client::registry::Registry;
//!
//! let layer = CachecoreLayer::builder().build();
//! let mut registry = Registry::default();
//! registry.register_collector(Box::new(PrometheusCollector::new(&layer)));
//!
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains("cachecore_requests_total{status=\"HIT_L1\"} 0"));
//! # }
//! ```
//!
//! Queue workers report through [`QueueMetrics`], a handle the worker (or whoever watches the
//! stream) feeds and the collector reads.

pub use crate::counters::{MetricsSnapshot, QueueMetrics, QueueSnapshot};

#[cfg(feature = "prometheus")]
mod prometheus;
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use prometheus::PrometheusCollector;
