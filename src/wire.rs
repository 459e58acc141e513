//! Trusted-header mode: the hosted product's wire format (DESIGN section 7).
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

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};

use crate::auth::Authenticator;
use crate::{CachecoreBuilder, Dep, RequestContext};

pub use crate::auth::X_CACHECORE_TOKEN;

/// `X-CacheCore-Deps`: the deps a request's response is derived from.
pub const X_CACHECORE_DEPS: HeaderName = HeaderName::from_static("x-cachecore-deps");

/// `X-CacheCore-Bypass`: `1` or `true` makes the request a bypass.
///
/// Not in the hosted product's header table; it is how a caller in another language asks for
/// what the SDK's `request_context(bypass=True)` does.
pub const X_CACHECORE_BYPASS: HeaderName = HeaderName::from_static("x-cachecore-bypass");

/// `X-CacheCore-Min-Similarity`: a cosine similarity that raises the L2 threshold for this
/// request (feature `semantic`); it can make L2 stricter, never looser. Not a number in
/// `[-1, 1]`: `BYPASS` with `X-Cache-Error`.
pub const X_CACHECORE_MIN_SIMILARITY: HeaderName =
    HeaderName::from_static("x-cachecore-min-similarity");

/// Most deps one request may declare. Each is read from the store on every lookup; real
/// responses derive from a handful.
pub const MAX_DEPS_PER_REQUEST: usize = 256;

/// base64url without padding, as written.
pub(crate) const B64URL: GeneralPurpose = URL_SAFE_NO_PAD;

/// base64url with or without padding, as read: some encoders pad.
pub(crate) const B64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

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

impl CachecoreBuilder {
    /// Turns on trusted-header mode (DESIGN section 7; see [`crate::wire`]).
    ///
    /// - the namespace of each request comes from `auth` (no or invalid credentials: `BYPASS`,
    ///   invalid ones with `X-Cache-Error` saying why);
    /// - the deps come from `X-CacheCore-Deps` (malformed: `BYPASS` with `X-Cache-Error`), and
    ///   `X-CacheCore-Bypass: 1` bypasses;
    /// - responses carry `X-Cache-Similarity`.
    ///
    /// A [`RequestContext`] extension or [`scope`](crate::scope) still wins over the headers.
    /// Only turn this on where the headers come from callers you let control the cache: a
    /// gateway in front of an upstream API, not a public app server.
    pub fn trusted_headers(self, auth: impl Authenticator) -> Self {
        self.authenticator(auth)
            .context_resolver(|head| context_from_headers(head.headers).map_err(|e| e.to_string()))
            .similarity_header(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
