//! Who is calling: tenants from request credentials.
//!
//! An [`Authenticator`] turns a request's headers into the [`Namespace`] it may use (its tenant
//! and policy version), or says why it may not. The same authenticator serves two places:
//!
//! - the layer in trusted-header mode ([`CachecoreBuilder::trusted_headers`]): a request with
//!   no or invalid credentials is a `BYPASS`;
//! - the invalidation service ([`InvalidateService`]): a call with no or invalid credentials
//!   gets `401`, and a valid one only ever touches its own tenant's deps.
//!
//! Two authenticators come with the crate: [`FixedTenant`] (every caller is one tenant; for
//! services behind their own authentication) and, with the `jwt` feature, [`JwtAuth`] (HS256
//! tokens, as the hosted product issues them). Any
//! `Fn(&HeaderMap) -> Result<Namespace, AuthError>` is an authenticator too.
//!
//! ```
//! use cachecore::auth::{bearer_token, AuthError, Authenticator};
//! use cachecore::Namespace;
//!
//! // API keys looked up in a table of your own.
//! let auth = |headers: &http::HeaderMap| match bearer_token(headers) {
//!     Some("key-of-acme") => Ok(Namespace::new("acme", "1")),
//!     Some(_) => Err(AuthError::Invalid("unknown API key".into())),
//!     None => Err(AuthError::Missing),
//! };
//! let mut headers = http::HeaderMap::new();
//! headers.insert("x-cachecore-token", "key-of-acme".parse().unwrap());
//! assert_eq!(auth.authenticate(&headers).unwrap().tenant(), "acme");
//! ```
//!
//! [`CachecoreBuilder::trusted_headers`]: crate::CachecoreBuilder::trusted_headers
//! [`InvalidateService`]: crate::invalidate::InvalidateService
//! [`JwtAuth`]: jwt::JwtAuth

use std::fmt;
use std::sync::Arc;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use http::header::{self, HeaderMap};

use crate::namespace::Namespace;

#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub mod jwt;
#[cfg(feature = "jwt")]
mod memo;

pub use crate::headers::X_CACHECORE_TOKEN;

/// base64url without padding, as written (JWT segments, the `X-CacheCore-Deps` header).
pub(crate) const B64URL: GeneralPurpose = URL_SAFE_NO_PAD;

/// base64url with or without padding, as read: some encoders pad.
pub(crate) const B64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Resolves the namespace a request's credentials entitle it to.
///
/// Called on every request in trusted-header mode, so keep it cheap and synchronous (verify a
/// signature, look a key up in memory); anything slower belongs in front of the cache.
pub trait Authenticator: Send + Sync + 'static {
    /// The namespace of the caller, or why there is none.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Namespace, AuthError>;
}

impl<F> Authenticator for F
where
    F: Fn(&HeaderMap) -> Result<Namespace, AuthError> + Send + Sync + 'static,
{
    fn authenticate(&self, headers: &HeaderMap) -> Result<Namespace, AuthError> {
        self(headers)
    }
}

impl<A: Authenticator + ?Sized> Authenticator for Arc<A> {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Namespace, AuthError> {
        (**self).authenticate(headers)
    }
}

/// Why a request has no namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// The request carries no credentials.
    Missing,
    /// The request carries credentials that were rejected; the message says why (expired, bad
    /// signature, ...). It is shown to the caller, so it never contains the secret.
    Invalid(String),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str(
                "no credentials: send `Authorization: Bearer <token>` or `X-CacheCore-Token: <token>`",
            ),
            Self::Invalid(why) => write!(f, "invalid credentials: {why}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// Every caller is the same tenant, at the same policy version.
///
/// For an invalidation service or gateway that sits behind authentication of its own (a
/// private network, a service mesh): the credentials headers are not looked at.
#[derive(Clone, Debug)]
pub struct FixedTenant {
    namespace: Namespace,
}

impl FixedTenant {
    /// Every caller is `tenant` at policy version [`DEFAULT_POLICY_VERSION`].
    ///
    /// [`DEFAULT_POLICY_VERSION`]: crate::DEFAULT_POLICY_VERSION
    pub fn new(tenant: impl Into<Arc<str>>) -> Self {
        Self::namespace(Namespace::new(tenant, crate::DEFAULT_POLICY_VERSION))
    }

    /// Every caller is in `namespace`.
    pub fn namespace(namespace: Namespace) -> Self {
        Self { namespace }
    }
}

impl Authenticator for FixedTenant {
    fn authenticate(&self, _: &HeaderMap) -> Result<Namespace, AuthError> {
        Ok(self.namespace.clone())
    }
}

/// The token a request presents: `X-CacheCore-Token: <token>` first, else
/// `Authorization: Bearer <token>`.
///
/// `X-CacheCore-Token` wins because in a gateway `Authorization` may carry the upstream
/// provider's key. A `Bearer ` prefix is accepted in `X-CacheCore-Token` too. The token is
/// returned as sent (an API-key prefix such as `cc_live_<id>.` is left on; see
/// [`strip_key_prefix`]).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(X_CACHECORE_TOKEN) {
        let v = v.to_str().ok()?.trim();
        let v = strip_scheme(v).unwrap_or(v);
        return (!v.is_empty()).then_some(v);
    }
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let v = strip_scheme(v)?.trim();
    (!v.is_empty()).then_some(v)
}

fn strip_scheme(v: &str) -> Option<&str> {
    // The auth scheme is case-insensitive (RFC 9110 section 11.1). A prefix compare, not a
    // search for the space: this runs on every request.
    let (scheme, rest) = (v.get(..7)?, &v[7..]);
    scheme
        .eq_ignore_ascii_case("bearer ")
        .then(|| rest.trim_start())
}

/// Removes the API-key prefix of a hosted-product token: `cc_live_<id>.<jwt>` becomes `<jwt>`.
///
/// A JWT has three dot-separated segments; a token with four whose first starts with `cc_` is
/// taken to carry the prefix. Anything else is returned unchanged.
pub fn strip_key_prefix(token: &str) -> &str {
    match token.split_once('.') {
        Some((first, rest)) if first.starts_with("cc_") && rest.matches('.').count() == 2 => rest,
        _ => token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn token_header_wins_over_authorization() {
        let h = headers(&[
            ("authorization", "Bearer sk-up"),
            ("x-cachecore-token", "t"),
        ]);
        assert_eq!(bearer_token(&h), Some("t"));
        let h = headers(&[("authorization", "bearer  abc ")]);
        assert_eq!(bearer_token(&h), Some("abc"));
        let h = headers(&[("authorization", "Basic abc")]);
        assert_eq!(bearer_token(&h), None);
        let h = headers(&[("x-cachecore-token", "Bearer xyz")]);
        assert_eq!(bearer_token(&h), Some("xyz"));
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn only_the_bearer_scheme_followed_by_a_space_gives_a_token() {
        for (value, token) in [
            ("Bearer t", Some("t")),
            ("BEARER   t", Some("t")),
            ("bEaReR t ", Some("t")),
            ("Bearer", None),
            ("Bearer ", None),
            ("Bearert", None),
            ("Bearer\tt", None),
            ("Bear t", None),
            ("Basic t", None),
            ("Bearé t", None),
            ("", None),
        ] {
            let h: HeaderMap = [(
                header::AUTHORIZATION,
                http::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            )]
            .into_iter()
            .collect();
            assert_eq!(bearer_token(&h), token, "{value:?}");
        }
    }

    #[test]
    fn key_prefix_is_stripped_only_from_four_segments() {
        assert_eq!(strip_key_prefix("cc_live_abc.h.p.s"), "h.p.s");
        assert_eq!(strip_key_prefix("h.p.s"), "h.p.s");
        assert_eq!(strip_key_prefix("cc_live_abc.h.p"), "cc_live_abc.h.p");
        assert_eq!(strip_key_prefix("x.h.p.s"), "x.h.p.s");
    }
}
