//! The key schema (docs/design.md §7).
//!
//! ```text
//! cc:{<tenant>}:l1:<key hex>        an entry (string, PX = fresh TTL + stale window)
//! cc:{<tenant>}:dep:ver:<dep id>    a dep's epoch, life and last hash (`<epoch>.<life>:<hash>`;
//!                                   expires once nothing can carry an older epoch)
//! cc:{<tenant>}:dep:keys:<dep id>   the digests of the entries tagged with a dep (sorted set
//!                                   scored by entry expiry; expires with its longest-lived entry)
//! cc:{<tenant>}:gc:<nonce>          a tag set detached by an invalidation, being reclaimed
//! cc:{<tenant>}:l2:<key hex>        the L2 vector of the entry of the same digest (hash, same
//!                                   expiry; feature `semantic`, see vector.rs)
//! ```
//!
//! The braces are the Redis Cluster hash tag: every key of a tenant lives in one slot, so each
//! script and each reclamation batch touches one slot only.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use redis::{RedisWrite, ToRedisArgs};

use crate::key::{hex_into, to_hex};
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
pub(super) struct TenantKeys<'t> {
    tag: Cow<'t, str>,
}

impl<'t> TenantKeys<'t> {
    pub(super) fn new(tenant: &'t str) -> Self {
        Self {
            tag: tenant_tag(tenant),
        }
    }

    pub(super) fn entry(&self, key: &CacheKey) -> Key<'_> {
        self.entry_digest(key.digest())
    }

    pub(super) fn entry_digest(&self, digest: &[u8; 32]) -> Key<'_> {
        let mut hex = [0; 64];
        hex_into(digest, &mut hex);
        self.key("l1:", Name::Hex(hex))
    }

    /// The L2 vector hash beside the entry `digest`; reclaimed with it.
    pub(super) fn l2_digest(&self, digest: &[u8; 32]) -> Key<'_> {
        let mut hex = [0; 64];
        hex_into(digest, &mut hex);
        self.key("l2:", Name::Hex(hex))
    }

    pub(super) fn dep_ver<'a>(&'a self, dep_id: &'a str) -> Key<'a> {
        self.key("dep:ver:", Name::Text(dep_id))
    }

    pub(super) fn dep_keys<'a>(&'a self, dep_id: &'a str) -> Key<'a> {
        self.key("dep:keys:", Name::Text(dep_id))
    }

    pub(super) fn gc(&self) -> String {
        self.key("gc:", Name::Text(&nonce())).to_string()
    }

    fn key<'a>(&'a self, kind: &'static str, name: Name<'a>) -> Key<'a> {
        Key {
            tag: &self.tag,
            kind,
            name,
        }
    }
}

/// One key of the schema, written straight into a command (no intermediate `String`), or
/// shown with `Display`.
pub(super) struct Key<'a> {
    tag: &'a str,
    kind: &'static str,
    name: Name<'a>,
}

enum Name<'a> {
    Hex([u8; 64]),
    Text(&'a str),
}

impl Key<'_> {
    fn parts(&self) -> [&[u8]; 5] {
        let name = match &self.name {
            Name::Hex(hex) => &hex[..],
            Name::Text(text) => text.as_bytes(),
        };
        [
            b"cc:{",
            self.tag.as_bytes(),
            b"}:",
            self.kind.as_bytes(),
            name,
        ]
    }

    /// Its length in bytes.
    pub(super) fn len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }

    /// Appends its bytes to `out` (the near cache's key for it).
    pub(super) fn write_into(&self, out: &mut Vec<u8>) {
        for part in self.parts() {
            out.extend_from_slice(part);
        }
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in self.parts() {
            // Every part is UTF-8: ASCII framing and hex, or a `&str`.
            f.write_str(std::str::from_utf8(part).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl ToRedisArgs for Key<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        for part in self.parts() {
            w.write_all(part)
                .expect("writing to a command buffer cannot fail");
        }
    }
}

/// Redis Cluster hash slots.
pub(super) const SLOTS: usize = 16_384;

/// The cluster hash slot of every key of `tenant`: CRC16 (XMODEM) of its tag, modulo
/// [`SLOTS`], as Redis computes it for the `{...}` part of a key.
pub(super) fn slot(tenant: &str) -> u16 {
    slot_of_tag(&tenant_tag(tenant))
}

/// The cluster hash slot of `key`: of its hash tag (the text between the first `{` and the
/// next `}`, when not empty), else of the whole key.
#[cfg_attr(not(feature = "semantic"), allow(dead_code))]
pub(super) fn slot_of_key(key: &str) -> u16 {
    let tag = key
        .find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}').map(|close| &rest[..close])
        })
        .filter(|t| !t.is_empty());
    slot_of_tag(tag.unwrap_or(key))
}

fn slot_of_tag(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in tag.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS as u16
}

/// A random life for a ver key a raise creates: never 0 (0 means "no life known").
pub(super) fn life() -> u64 {
    random().max(1)
}

fn random() -> u64 {
    static SEED: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    SEED.get_or_init(RandomState::new).hash_one(n)
}

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
    fn slots_are_the_ones_redis_computes() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot("foo"), 12_182);
        assert_eq!(slot("bar"), 5_061);
        assert_eq!(slot("123456789"), 12_739);
        // A hashed tenant's slot is its tag's.
        let odd = "we{ird}";
        assert_eq!(slot(odd), slot_of_tag(&tenant_tag(odd)));
        assert_eq!(slot_of_key("cc:{foo}:l1:x"), 12_182);
        assert_eq!(slot_of_key("foo"), 12_182);
        assert_eq!(slot_of_key("x{}{foo}"), slot_of_tag("x{}{foo}"));
        assert_ne!(life(), 0);
        assert_ne!(life(), life());
    }

    #[test]
    fn keys_follow_the_schema() {
        let k = TenantKeys::new("t1");
        let key = CacheKey::new("t1", [0xab; 32]);
        let entry = k.entry(&key);
        assert_eq!(
            entry.to_string(),
            format!("cc:{{t1}}:l1:{}", "ab".repeat(32))
        );
        assert_eq!(entry.len(), entry.to_string().len());
        assert_eq!(k.dep_ver("doc:{1}").to_string(), "cc:{t1}:dep:ver:doc:{1}");
        assert_eq!(k.dep_keys("doc:1").to_string(), "cc:{t1}:dep:keys:doc:1");
        // Written into a command, a key is the same bytes.
        let mut cmd = redis::cmd("GET");
        cmd.arg(k.dep_ver("doc:1"));
        assert_eq!(
            cmd.args_iter().nth(1),
            Some(redis::Arg::Simple(&b"cc:{t1}:dep:ver:doc:1"[..]))
        );
        assert_eq!(
            k.l2_digest(&[0xab; 32]).to_string(),
            format!("cc:{{t1}}:l2:{}", "ab".repeat(32))
        );
        assert_ne!(k.gc(), k.gc());
    }
}
