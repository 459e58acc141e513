//! The cache key: SHA-256 of everything that makes two requests "the same" (docs/design.md §3).
// Public only with `test-util`, for the crate's own property tests and benches; otherwise
// crate-internal.
#![cfg_attr(not(feature = "test-util"), allow(unreachable_pub, dead_code))]

use http::{HeaderMap, HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

mod canonical;
mod memo;
pub use canonical::hash_canonical_json;
#[cfg(any(test, feature = "test-util"))]
pub use canonical::NotJson;
pub(crate) use memo::KeyMemo;

use crate::Dep;

/// Bumped whenever the encoding below changes, so keys of different formats never collide.
const KEY_FORMAT_VERSION: u8 = 2;

/// How the body is keyed.
#[derive(Clone, Debug, Default)]
pub struct BodyKeying {
    /// Canonicalise JSON bodies (sorted keys, no insignificant white space). Default on.
    pub canonical_json: bool,
    /// Top-level JSON fields left out of the key (for example `user`).
    pub ignored_fields: Vec<String>,
}

/// The parts of a request that make its key, borrowed.
#[derive(Debug)]
pub struct KeyParts<'a> {
    /// Tenant of the namespace.
    pub tenant: &'a str,
    /// Policy version of the namespace.
    pub policy_version: &'a str,
    /// Key partition of the namespace (for example a hash of the caller's credentials).
    pub partition: Option<&'a str>,
    /// Request method.
    pub method: &'a Method,
    /// Request URI: scheme, authority (else the `Host` header), path and query.
    pub uri: &'a Uri,
    /// Request headers (`Host`, and those named in `vary`).
    pub headers: &'a HeaderMap,
    /// Header names that are part of the key.
    pub vary: &'a [HeaderName],
    /// Declared deps, in any order.
    pub deps: &'a [Dep],
    /// The whole request body.
    pub body: &'a [u8],
}

/// Computes the key digest of a request.
///
/// Every part is length-prefixed and the format version comes first, so no two different
/// requests encode to the same byte stream.
///
/// ```
/// use cachecore::key::{compute_key, BodyKeying, KeyParts};
/// let (method, uri, headers) = (http::Method::POST, "/v1/chat".parse().unwrap(), http::HeaderMap::new());
/// let parts = |body: &'static [u8]| KeyParts {
///     tenant: "t", policy_version: "1", partition: None, method: &method, uri: &uri, headers: &headers,
///     vary: &[], deps: &[], body,
/// };
/// let keying = BodyKeying { canonical_json: true, ignored_fields: vec![] };
/// assert_eq!(
///     compute_key(&parts(br#"{"a":1,"b":2}"#), &keying),
///     compute_key(&parts(br#"{ "b": 2, "a": 1 }"#), &keying),
/// );
/// ```
pub fn compute_key(parts: &KeyParts<'_>, keying: &BodyKeying) -> [u8; 32] {
    let mut head = Vec::with_capacity(HEAD_CAPACITY);
    encode_head(parts, &mut head);
    digest(&head, parts.body, keying)
}

/// A typical head (namespace, method, path, a few deps) fits without growing.
pub(crate) const HEAD_CAPACITY: usize = 256;

/// Encodes everything but the body: format version, namespace, method, path and query, vary
/// headers, deps (sorted, deduplicated), each length-prefixed.
pub(crate) fn encode_head(parts: &KeyParts<'_>, out: &mut Vec<u8>) {
    out.push(KEY_FORMAT_VERSION);
    field(out, parts.tenant.as_bytes());
    field(out, parts.policy_version.as_bytes());
    match parts.partition {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            field(out, p.as_bytes());
        }
    }
    field(out, parts.method.as_str().as_bytes());
    // Scheme and authority: two services answering the same path never share an entry. A
    // client stack sends absolute URIs; a server stack sees the authority in `Host` (HTTP/1)
    // or in the URI (HTTP/2's `:authority`).
    field(out, parts.uri.scheme_str().unwrap_or("").as_bytes());
    match parts.uri.authority() {
        Some(authority) => authority_field(out, authority.as_str().as_bytes()),
        None => match parts.headers.get(http::header::HOST) {
            Some(host) => authority_field(out, host.as_bytes()),
            None => field(out, b""),
        },
    }
    field(
        out,
        parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );

    count(out, parts.vary.len());
    for name in parts.vary {
        field(out, name.as_str().as_bytes());
        let values = parts.headers.get_all(name);
        count(out, values.iter().count());
        for v in values {
            field(out, v.as_bytes());
        }
    }

    let mut deps: Vec<(&str, Option<&str>)> = parts
        .deps
        .iter()
        .map(|d| (d.id(), d.expected_hash()))
        .collect();
    deps.sort_unstable();
    deps.dedup();
    count(out, deps.len());
    for (id, hash) in deps {
        field(out, id.as_bytes());
        match hash {
            None => out.push(0),
            Some(hash) => {
                out.push(1);
                field(out, hash.as_bytes());
            }
        }
    }
}

/// SHA-256 of an encoded head followed by the body (canonical JSON when it is JSON and
/// canonicalisation is on, raw bytes otherwise; tagged so the two never collide).
pub(crate) fn digest(head: &[u8], body: &[u8], keying: &BodyKeying) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(head);
    if keying.canonical_json && looks_like_json(body) {
        let mut json = h.clone();
        json.update([b'J']);
        if hash_canonical_json(body, &keying.ignored_fields, &mut json).is_ok() {
            return json.finalize().into();
        }
    }
    h.update([b'R']);
    h.update((body.len() as u64).to_be_bytes());
    h.update(body);
    h.finalize().into()
}

/// Cheap pre-check so binary or form bodies skip the JSON parser.
fn looks_like_json(body: &[u8]) -> bool {
    matches!(
        body.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

/// Host names are case-insensitive: `API.example.com` and `api.example.com` are one service.
fn authority_field(out: &mut Vec<u8>, authority: &[u8]) {
    field(out, authority);
    let start = out.len() - authority.len();
    out[start..].make_ascii_lowercase();
}

fn count(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u64).to_be_bytes());
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    count(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Writes `bytes` as lower-case hex into `out`, which is twice as long.
pub(crate) fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}
