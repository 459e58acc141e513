//! The key schema (DESIGN section 5).
//!
//! ```text
//! cc:{<tenant>}:l1:<key hex>        an entry (string, PX = fresh TTL + stale window)
//! cc:{<tenant>}:dep:ver:<dep id>    a dep's epoch and last hash (`<epoch>:<hash>`; never expires)
//! cc:{<tenant>}:dep:keys:<dep id>   the digests of the entries tagged with a dep (sorted set
//!                                   scored by entry expiry; expires with its longest-lived entry)
//! cc:{<tenant>}:gc:<nonce>          a tag set detached by an invalidation, being reclaimed
//! ```
//!
//! The braces are the Redis Cluster hash tag: every key of a tenant lives in one slot, so each
//! script and each reclamation batch touches one slot only.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::key::to_hex;
use crate::store::CacheKey;

/// Longest tenant used verbatim inside the hash tag. Longer tenants are hashed, which keeps keys
/// short and the slot computation cheap.
pub(super) const MAX_VERBATIM_TENANT: usize = 64;

/// Bytes of SHA-256 kept when a tenant is hashed: 128 bits, collision-free in practice.
const TENANT_HASH_BYTES: usize = 16;

/// The tenant as it appears between the braces.
///
/// A tenant made only of `[A-Za-z0-9._:-]`, 1 to 64 bytes long and not starting with `h-`, is
/// used as is. Any other (empty, longer, with braces, spaces or non-ASCII bytes, or starting
/// with `h-`) becomes `h-` followed by the hex of the first 16 bytes of its SHA-256. Reserving the
/// `h-` prefix for hashed tenants means a verbatim tenant can never equal a hashed one.
pub(super) fn tenant_tag(tenant: &str) -> Cow<'_, str> {
    let verbatim = !tenant.is_empty()
        && tenant.len() <= MAX_VERBATIM_TENANT
        && !tenant.starts_with("h-")
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if verbatim {
        Cow::Borrowed(tenant)
    } else {
        let digest = Sha256::digest(tenant.as_bytes());
        Cow::Owned(format!("h-{}", to_hex(&digest[..TENANT_HASH_BYTES])))
    }
}

/// `cc:{<tenant>}:` for one tenant; every key of the tenant starts with it.
pub(super) struct TenantKeys {
    prefix: String,
}

impl TenantKeys {
    pub(super) fn new(tenant: &str) -> Self {
        Self {
            prefix: format!("cc:{{{}}}:", tenant_tag(tenant)),
        }
    }

    pub(super) fn entry(&self, key: &CacheKey) -> String {
        self.entry_digest(key.digest())
    }

    pub(super) fn entry_digest(&self, digest: &[u8; 32]) -> String {
        let mut s = String::with_capacity(self.prefix.len() + 3 + 64);
        s.push_str(&self.prefix);
        s.push_str("l1:");
        s.push_str(&to_hex(digest));
        s
    }

    pub(super) fn dep_ver(&self, dep_id: &str) -> String {
        format!("{}dep:ver:{dep_id}", self.prefix)
    }

    pub(super) fn dep_keys(&self, dep_id: &str) -> String {
        format!("{}dep:keys:{dep_id}", self.prefix)
    }

    /// A fresh, unique name for a detached tag set.
    pub(super) fn gc(&self) -> String {
        format!("{}gc:{}", self.prefix, nonce())
    }
}

/// 128 bits that differ between calls, processes and machines: a per-process random seed (std's
/// `RandomState` is seeded from the OS) hashed with a counter, plus the time.
fn nonce() -> String {
    static SEED: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = SEED.get_or_init(RandomState::new).hash_one(n);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{nanos:016x}{random:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_tenants_are_verbatim_others_hashed() {
        assert_eq!(tenant_tag("acme-prod.eu:1_a"), "acme-prod.eu:1_a");
        for unsafe_tenant in [
            "",
            "a{b",
            "a}b",
            "with space",
            "é",
            "h-abc",
            &"x".repeat(MAX_VERBATIM_TENANT + 1),
        ] {
            let tag = tenant_tag(unsafe_tenant);
            assert!(tag.starts_with("h-"), "{unsafe_tenant:?} -> {tag}");
            assert_eq!(tag.len(), 2 + 2 * TENANT_HASH_BYTES);
        }
        assert_ne!(tenant_tag("a{b"), tenant_tag("a}b"));
        // A verbatim tenant can never spell a hashed one.
        let hashed = tenant_tag("a{b").into_owned();
        assert_ne!(tenant_tag(&hashed), hashed);
    }

    #[test]
    fn keys_follow_the_schema() {
        let k = TenantKeys::new("t1");
        let key = CacheKey::new("t1", [0xab; 32]);
        assert_eq!(k.entry(&key), format!("cc:{{t1}}:l1:{}", "ab".repeat(32)));
        assert_eq!(k.dep_ver("doc:{1}"), "cc:{t1}:dep:ver:doc:{1}");
        assert_eq!(k.dep_keys("doc:1"), "cc:{t1}:dep:keys:doc:1");
        assert_ne!(k.gc(), k.gc());
    }
}
