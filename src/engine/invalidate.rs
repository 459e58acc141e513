//! Invalidation: moves a dep's version so every entry derived from it stops being served
//! (docs/design.md §4).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::Engine;
use crate::invalidation::{DepError, DepErrorKind, Invalidated, Invalidation, InvalidationError};
use crate::key::to_hex;
use crate::store::{now_ms, DepInvalidated, StoreError, StoreErrorKind};
use crate::validate_dep_id;

impl Engine {
    pub(crate) fn default_tenant(&self) -> Option<Arc<str>> {
        self.config.namespace.default_tenant()
    }

    /// Applies `invalidation` in `tenant` (its own tenant, if any, was resolved by the caller).
    pub(crate) async fn invalidate(
        &self,
        tenant: &str,
        invalidation: &Invalidation,
    ) -> Result<Invalidated, InvalidationError> {
        let dep_ids: Vec<&str> = invalidation.dep_ids().collect();
        if let Some(Err(e)) = invalidation.hash().map(crate::validate_new_hash) {
            // A hash travels in headers and store values: a bad one changes nothing.
            self.metrics
                .invalidation_errors
                .fetch_add(dep_ids.len() as u64, Ordering::Relaxed);
            let message = e.to_string();
            return Invalidated::from_results(
                dep_ids
                    .iter()
                    .map(|id| Err(DepError::new(*id, DepErrorKind::InvalidInput, &*message)))
                    .collect(),
            );
        }
        let generated;
        let new_hash = match invalidation.hash() {
            Some(h) => h,
            None => {
                generated = random_hash();
                &generated
            }
        };
        let mut results: Vec<Option<Result<DepInvalidated, DepError>>> =
            Vec::with_capacity(dep_ids.len());
        let mut valid: Vec<&str> = Vec::with_capacity(dep_ids.len());
        for id in &dep_ids {
            results.push(match validate_dep_id(id) {
                Ok(()) => {
                    valid.push(id);
                    None
                }
                Err(e) => Some(Err(DepError::new(
                    *id,
                    DepErrorKind::InvalidInput,
                    e.to_string(),
                ))),
            });
        }
        // Invalidation must not be skipped by the breaker or cut by the lookup timeout: a
        // caller told "ok" must be able to rely on it, so failures are reported, not hidden.
        // L2 vectors of partitions that declare an invalidated dep are reclaimed with their
        // entries (they could no longer be served anyway: a match is read through L1).
        #[cfg(feature = "semantic")]
        if let Some(semantic) = &self.config.semantic {
            semantic.forget_deps(tenant, &valid);
        }
        let mut done = if valid.is_empty() {
            Vec::new()
        } else {
            self.store
                .unguarded()
                .invalidate_many(tenant, &valid, new_hash)
                .await
        }
        .into_iter();
        // An empty slot is a valid id, and the store answered the valid ids in order.
        let results: Vec<Result<DepInvalidated, DepError>> = results
            .into_iter()
            .zip(&dep_ids)
            .map(|(r, id)| {
                r.unwrap_or_else(|| {
                    done.next()
                        .unwrap_or_else(|| {
                            Err(StoreError::new(
                                StoreErrorKind::Backend,
                                "the store gave no result",
                            ))
                        })
                        .map_err(|e| DepError::store(*id, &e))
                })
            })
            .collect();
        for r in &results {
            self.metrics.invalidations.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(d) => {
                    self.metrics
                        .invalidated_entries
                        .fetch_add(d.deleted, Ordering::Relaxed);
                    tracing::info!(target: "cachecore", tenant, dep_id = %d.dep_id, deleted = d.deleted, "invalidated");
                }
                Err(e) => {
                    self.metrics
                        .invalidation_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "cachecore", tenant, dep_id = %e.dep_id(), error = %e, "invalidation failed");
                }
            }
        }
        Invalidated::from_results(results)
    }
}

/// A fresh random-enough version string for invalidations that give none.
pub(crate) fn random_hash() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(now_ms().to_be_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    h.update(std::process::id().to_be_bytes());
    h.update(format!("{:?}", Instant::now()).as_bytes());
    let digest: [u8; 32] = h.finalize().into();
    to_hex(&digest[..8])
}
