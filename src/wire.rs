//! Trusted-header mode: the hosted product's wire format (docs/design.md §8).
//!
//! Off by default. A gateway turns it on with [`CachecoreBuilder::trusted_headers`], so that
//! callers in any language (the `cachecore-python` SDK, curl) control the cache with headers:
//!
//! | direction | header | value |
//! |---|---|---|
//! | request | `X-CacheCore-Token` or `Authorization: Bearer [cc_live_<id>.]<jwt>` | tenant credentials; none = `BYPASS` |
//! | request | `X-CacheCore-Deps` | base64url (no padding) of `[{"dep_id":"...","expected_hash":"..."}]` |
//! | request | `X-CacheCore-Bypass` | `1` / `true`: neither read nor write the cache (an extension of this crate) |
//! | response | `X-Cache` | `HIT_L1`, `HIT_L1_STALE`, `MISS`, `BYPASS` |
//! | response | `X-Cache-Age`, `X-Cache-Similarity` | seconds since stored; `1.00` on hits, `0.00` otherwise |
//! | response | `X-Cache-Error` | why the request bypassed (malformed deps header, invalid token) |
//!
//! A malformed deps header never lets a request be cached without its deps: the request
//! bypasses, with `X-Cache-Error` saying what was wrong. The credentials headers are not part
//! of the key (the tenant in them is).
//!
//! ```
//! use cachecore::auth::FixedTenant;
//! use cachecore::wire::{decode_deps, encode_deps, X_CACHECORE_DEPS};
//! use cachecore::{CachecoreLayer, Dep};
//!
//! let layer = CachecoreLayer::builder()
//!     .trusted_headers(FixedTenant::new("acme"))
//!     .build();
//!
//! let value = encode_deps(&[Dep::new("doc:contract-123").hash("v1")]);
//! let req = http::Request::post("/v1/chat/completions")
//!     .header(X_CACHECORE_DEPS, &value)
//!     .body(())
//!     .unwrap();
//! assert_eq!(decode_deps(value.as_bytes()).unwrap()[0].expected_hash(), Some("v1"));
//! # let _ = (layer, req);
//! ```
//!
//! [`CachecoreBuilder::trusted_headers`]: crate::CachecoreBuilder::trusted_headers

use std::fmt;

use base64::Engine as _;
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::auth::{B64URL, B64URL_LENIENT};
use crate::{Dep, RequestContext};

pub use crate::headers::{
    X_CACHECORE_BYPASS, X_CACHECORE_DEPS, X_CACHECORE_MIN_SIMILARITY, X_CACHECORE_TOKEN,
};

/// Most deps one request may declare. Each is read from the store on every lookup; real
/// responses derive from a handful.
pub const MAX_DEPS_PER_REQUEST: usize = 256;

/// One element of the deps header.
#[derive(Serialize, Deserialize)]
struct WireDep {
    dep_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expected_hash: Option<String>,
}

/// Why an `X-CacheCore-Deps` header was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepsHeaderError(String);

impl fmt::Display for DepsHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "X-CacheCore-Deps: {}", self.0)
    }
}

impl std::error::Error for DepsHeaderError {}

fn bad(why: impl Into<String>) -> DepsHeaderError {
    DepsHeaderError(why.into())
}

/// Decodes an `X-CacheCore-Deps` value: base64url (padding optional) of a JSON array of
/// `{"dep_id": "...", "expected_hash": "..."}` (`expected_hash` optional or null).
pub fn decode_deps(value: &[u8]) -> Result<Vec<Dep>, DepsHeaderError> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return Err(bad("empty value"));
    }
    let json = B64URL_LENIENT
        .decode(value)
        .map_err(|e| bad(format!("not base64url: {e}")))?;
    let deps: Vec<WireDep> = serde_json::from_slice(&json).map_err(|e| {
        bad(format!(
            "not a JSON array of {{\"dep_id\",\"expected_hash\"}}: {e}"
        ))
    })?;
    if deps.len() > MAX_DEPS_PER_REQUEST {
        return Err(bad(format!(
            "{} deps; the limit is {MAX_DEPS_PER_REQUEST}",
            deps.len()
        )));
    }
    deps.into_iter()
        .enumerate()
        .map(|(i, d)| {
            crate::validate_dep_id(&d.dep_id).map_err(|e| bad(format!("[{i}]: {e}")))?;
            let dep = Dep::new(d.dep_id);
            Ok(match d.expected_hash {
                Some(h) => dep.hash(h),
                None => dep,
            })
        })
        .collect()
}

/// Encodes deps as an `X-CacheCore-Deps` value (base64url, no padding).
pub fn encode_deps(deps: &[Dep]) -> String {
    let wire: Vec<WireDep> = deps
        .iter()
        .map(|d| WireDep {
            dep_id: d.id().to_owned(),
            expected_hash: d.expected_hash().map(str::to_owned),
        })
        .collect();
    B64URL.encode(serde_json::to_vec(&wire).expect("deps serialize"))
}

/// The [`RequestContext`] the trusted headers describe: deps from every `X-CacheCore-Deps`
/// header, bypass from `X-CacheCore-Bypass`, a raised L2 threshold from
/// `X-CacheCore-Min-Similarity`. `None` when none is present.
pub fn context_from_headers(
    headers: &HeaderMap,
) -> Result<Option<RequestContext>, DepsHeaderError> {
    // Most requests carry none of these: one pass over the names rules all three out, where
    // each lookup would hash its name and probe the map.
    if !names_a_cachecore_header(headers) {
        return Ok(None);
    }
    let min_similarity = match headers.get(X_CACHECORE_MIN_SIMILARITY) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<f32>().ok())
                .filter(|t| (-1.0..=1.0).contains(t))
                .ok_or_else(|| {
                    bad("X-CacheCore-Min-Similarity must be a cosine similarity in [-1, 1]")
                })?,
        ),
    };
    let ctx = context_from_deps_headers(headers)?;
    Ok(match (ctx, min_similarity) {
        (ctx, None) => ctx,
        (ctx, Some(t)) => Some(ctx.unwrap_or_default().min_similarity(t)),
    })
}

/// Whether a header name starts with `x-cachecore-` (names are stored lower case).
fn names_a_cachecore_header(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| name.as_str().as_bytes().starts_with(b"x-cachecore-"))
}

fn context_from_deps_headers(
    headers: &HeaderMap,
) -> Result<Option<RequestContext>, DepsHeaderError> {
    let bypass = headers.get_all(X_CACHECORE_BYPASS).iter().any(|v| {
        let v = v.as_bytes().trim_ascii();
        v == b"1" || v.eq_ignore_ascii_case(b"true")
    });
    if bypass {
        return Ok(Some(RequestContext::bypass_all()));
    }
    let mut values = headers.get_all(X_CACHECORE_DEPS).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let mut deps = Vec::new();
    for v in values {
        deps.extend(decode_deps(v.as_bytes())?);
    }
    if deps.len() > MAX_DEPS_PER_REQUEST {
        return Err(bad(format!(
            "{} deps; the limit is {MAX_DEPS_PER_REQUEST}",
            deps.len()
        )));
    }
    Ok(Some(RequestContext::with_deps(deps)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    #[test]
    fn deps_round_trip_padded_or_not() {
        let deps = vec![Dep::new("doc:1").hash("v1"), Dep::new("table:products")];
        let v = encode_deps(&deps);
        assert!(!v.contains('='));
        assert_eq!(decode_deps(v.as_bytes()).unwrap(), deps);
        let padded = base64::engine::general_purpose::URL_SAFE
            .encode(br#"[{"dep_id":"a","expected_hash":null}]"#);
        assert_eq!(decode_deps(padded.as_bytes()).unwrap(), vec![Dep::new("a")]);
    }

    #[test]
    fn each_context_header_is_found_among_others_and_none_without_them() {
        let deps = encode_deps(&[Dep::new("doc:1")]);
        let mut plain = HeaderMap::new();
        for (name, value) in [
            ("host", "api.example"),
            ("authorization", "Bearer t"),
            ("content-type", "application/json"),
            ("x-stainless-lang", "python"),
            ("x-cachecore-token", "t"),
            ("x-cachecore", "1"),
        ] {
            plain.append(HeaderName::from_static(name), value.parse().unwrap());
        }
        assert!(context_from_headers(&plain).unwrap().is_none());
        for (name, value) in [
            ("X-CacheCore-Deps", deps.as_str()),
            ("x-cachecore-bypass", "true"),
            ("X-CACHECORE-MIN-SIMILARITY", "0.95"),
        ] {
            let mut headers = plain.clone();
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            headers.append(name.clone(), value.parse().unwrap());
            let ctx = context_from_headers(&headers).unwrap();
            assert!(ctx.is_some(), "{name} not seen among {headers:?}");
        }
    }

    #[test]
    fn malformed_deps_say_why() {
        for (value, needle) in [
            ("", "empty"),
            ("!!!", "base64url"),
            (&B64URL.encode(b"{}"), "JSON array"),
            (
                &B64URL.encode(br#"[{"dep_id":""}]"#),
                "[0]: dep id is empty",
            ),
            (&B64URL.encode(br#"[{"dep_id":1}]"#), "JSON array"),
        ] {
            let e = decode_deps(value.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(needle), "{value:?}: {e}");
        }
    }
}
