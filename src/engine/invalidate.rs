//! Invalidation: moves a dep's version so every entry derived from it stops being served
//! (docs/design.md §4).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::Engine;
use crate::key::to_hex;
use crate::store::{now_ms, InvalidationResult};
use crate::validate_dep_id;

impl Engine {
    pub(crate) fn default_tenant(&self) -> Option<Arc<str>> {
        self.config.namespace.default_tenant()
    }

    pub(crate) async fn invalidate_many(
        &self,
        tenant: &str,
        dep_ids: &[&str],
        new_hash: Option<&str>,
    ) -> Vec<InvalidationResult> {
        if let Some(Err(e)) = new_hash.map(crate::validate_new_hash) {
            // A hash travels in headers and store values: a bad one changes nothing.
            self.metrics
                .invalidation_errors
                .fetch_add(dep_ids.len() as u64, Ordering::Relaxed);
            return dep_ids
                .iter()
                .map(|id| InvalidationResult::failed(*id, e.to_string()))
                .collect();
        }
        let generated;
        let new_hash = match new_hash {
            Some(h) => h,
            None => {
                generated = random_hash();
                &generated
            }
        };
        let mut results: Vec<Option<InvalidationResult>> = vec![None; dep_ids.len()];
        let mut valid: Vec<&str> = Vec::with_capacity(dep_ids.len());
        for (slot, id) in results.iter_mut().zip(dep_ids) {
            match validate_dep_id(id) {
                Ok(()) => valid.push(id),
                Err(e) => *slot = Some(InvalidationResult::failed(*id, e.to_string())),
            }
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
            match self
                .store
                .unguarded()
                .invalidate_many(tenant, &valid, new_hash)
                .await
            {
                Ok(r) => r,
                Err(e) => valid
                    .iter()
                    .map(|id| InvalidationResult::failed(*id, e.to_string()))
                    .collect(),
            }
        }
        .into_iter();
        let out: Vec<InvalidationResult> = results
            .into_iter()
            .map(|r| {
                r.or_else(|| done.next())
                    .unwrap_or_else(|| InvalidationResult::failed("", "store gave no result"))
            })
            .collect();
        for r in &out {
            self.metrics.invalidations.fetch_add(1, Ordering::Relaxed);
            if r.ok {
                self.metrics
                    .invalidated_entries
                    .fetch_add(r.deleted, Ordering::Relaxed);
                tracing::info!(target: "cachecore", tenant, dep_id = %r.dep_id, deleted = r.deleted, "invalidated");
            } else {
                self.metrics
                    .invalidation_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "cachecore", tenant, dep_id = %r.dep_id, error = ?r.error, "invalidation failed");
            }
        }
        out
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
