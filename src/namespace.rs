//! Namespaces: the tenant a request's keys and deps live in, the policy version its keys are
//! scoped to, and the partition of its keys (by default a hash of the caller's credentials,
//! docs/design.md §3), with the defaults of each.

use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use crate::context::RequestHead;
use crate::key;

/// A namespace: the tenant keys and deps live in, the policy version keys are scoped to, and
/// an optional partition of the keys (by default, a hash of the caller's credentials).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Namespace {
    tenant: Arc<str>,
    policy_version: Arc<str>,
    partition: Option<Arc<str>>,
}

impl Namespace {
    /// A namespace for `tenant` at `policy_version`.
    pub fn new(tenant: impl Into<Arc<str>>, policy_version: impl Into<Arc<str>>) -> Self {
        Self {
            tenant: tenant.into(),
            policy_version: policy_version.into(),
            partition: None,
        }
    }

    /// Splits the tenant's keys by `partition`: requests in different partitions never share
    /// an entry, while deps (and so invalidation) stay the tenant's.
    #[must_use]
    pub fn with_partition(mut self, partition: impl Into<Arc<str>>) -> Self {
        self.partition = Some(partition.into());
        self
    }

    /// The key partition, if any.
    pub fn partition(&self) -> Option<&str> {
        self.partition.as_deref()
    }

    /// The tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The policy version.
    pub fn policy_version(&self) -> &str {
        &self.policy_version
    }

    /// The tenant, shared (a key holds it without copying).
    pub(crate) fn tenant_shared(&self) -> &Arc<str> {
        &self.tenant
    }
}

/// Resolves the namespace of a request; `None` makes the request a bypass.
pub type NamespaceResolver = Arc<dyn Fn(&RequestHead<'_>) -> Option<Namespace> + Send + Sync>;

/// The tenant of a layer that is given none (and the one [`CacheInvalidator::invalidate`]
/// works on).
///
/// [`CacheInvalidator::invalidate`]: crate::CacheInvalidator::invalidate
pub const DEFAULT_TENANT: &str = "default";

/// The key partition of requests that carry no credentials at all.
pub const ANONYMOUS_PARTITION: &str = "anonymous";

/// The key partition a request whose only credentials header is `name: value` lands in when
/// the layer is given no tenant (the default): a hash, so the credentials themselves are never
/// stored. A request with several credential headers is partitioned by all of them.
pub fn credentials_partition(name: &str, value: &[u8]) -> String {
    let mut h = CredentialHash::default();
    h.add(&name.to_ascii_lowercase(), value);
    h.finish()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default()
}

/// Hashes every credential header a request has, in the configured order.
#[derive(Default)]
pub(crate) struct CredentialHash(Option<Sha256>);

impl CredentialHash {
    /// Adds one credential header value (the name lower-case, as `HeaderName`s are).
    pub(crate) fn add(&mut self, name: &str, value: &[u8]) {
        let h = self.0.get_or_insert_with(Sha256::new);
        // Length-prefixed, so no two different header sets hash alike.
        h.update((name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_be_bytes());
        h.update(value);
    }

    /// Every value of each of `names` that `headers` has, in the order of `names`.
    pub(crate) fn of(names: &[HeaderName], headers: &HeaderMap) -> Self {
        let mut h = Self::default();
        let mut add = |name: &HeaderName| {
            for value in headers.get_all(name) {
                h.add(name.as_str(), value.as_bytes());
            }
        };
        if names.len() > 64 {
            names.iter().for_each(&mut add);
            return h;
        }
        // A request has a handful of headers and usually one credential: find which names are
        // present in one pass of cheap comparisons, rather than hash every configured name to
        // look it up (this runs on every request, hits included).
        let mut present = 0u64;
        for name in headers.keys() {
            if let Some(i) = names.iter().position(|n| n == name) {
                present |= 1 << i;
            }
        }
        while present != 0 {
            add(&names[present.trailing_zeros() as usize]);
            present &= present - 1;
        }
        h
    }

    /// The partition, or `None` when no credential was added.
    pub(crate) fn finish(self) -> Option<PartitionName> {
        let digest: [u8; 32] = self.0?.finalize().into();
        let mut out = [0; 5 + 32];
        out[..5].copy_from_slice(b"cred-");
        key::hex_into(&digest[..16], &mut out[5..]);
        Some(PartitionName(out))
    }
}

/// A credentials partition, `cred-` and 32 hex digits, built without allocating.
pub(crate) struct PartitionName([u8; 5 + 32]);

impl PartitionName {
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII prefix and hex digits")
    }
}

/// The policy version used when none is configured.
pub const DEFAULT_POLICY_VERSION: &str = "1";
