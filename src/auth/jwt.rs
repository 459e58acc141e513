//! HS256 JWT tenants, as the hosted product issues them, verified with `jsonwebtoken`.
//!
//! A token is read from `X-CacheCore-Token: [cc_live_<id>.]<jwt>` or
//! `Authorization: Bearer [cc_live_<id>.]<jwt>` (see [`bearer_token`]). It must be signed with
//! HS256 under the shared secret (any other `alg`, `none` included, is rejected, whatever the
//! signature) and carry:
//!
//! | claim | meaning |
//! |---|---|
//! | `tenant_id` | the tenant: every key and dep the token touches lives in it (required, a string) |
//! | `policy_version` | the policy version keys are scoped to (optional, a string or a number; default `"1"`) |
//! | `exp` | expiry, seconds since the Unix epoch (required; [`CLOCK_LEEWAY`] allowed) |
//! | `nbf` | not before (optional) |
//! | `aud`, `iss` | checked when the verifier asks for them ([`JwtAuth::audience`], [`JwtAuth::issuer`]) |
//!
//! The secret must be at least [`MIN_SECRET_LEN`] bytes: a shorter one is refused when the
//! verifier is built, not warned about.
//!
//! ```
//! use cachecore::auth::jwt::{Claims, JwtAuth};
//! use cachecore::auth::Authenticator;
//! use std::time::Duration;
//!
//! let auth = JwtAuth::new("a secret of at least 32 bytes, please!!").unwrap();
//! let token = auth.mint(&Claims::new("acme", Duration::from_secs(3600)).policy_version("v2"));
//!
//! let mut headers = http::HeaderMap::new();
//! headers.insert("authorization", format!("Bearer cc_live_k1.{token}").parse().unwrap());
//! let ns = auth.authenticate(&headers).unwrap();
//! assert_eq!((ns.tenant(), ns.policy_version()), ("acme", "v2"));
//!
//! assert!(JwtAuth::new("too short").is_err());
//! ```
//!
//! Signatures, the algorithm list, base64url segments and `aud`/`iss` are checked by
//! `jsonwebtoken` (pure-Rust crypto backend). Two checks stay here, because the errors say more
//! than its own: the header is read first, so a token naming another algorithm is refused as
//! such; and time is checked against a clock the caller may give ([`JwtAuth::verify_at`]).
//!
//! [`bearer_token`]: super::bearer_token

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};

use super::memo::TokenMemo;
use super::{bearer_token, strip_key_prefix, AuthError, Authenticator, B64URL};
use crate::namespace::{Namespace, DEFAULT_POLICY_VERSION};

/// How far past `exp` (and before `nbf`) a token is still accepted: covers the clock drift
/// between the issuer and this process on NTP-synced hosts, and no more.
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(30);

/// Longest token verified, in bytes. Real tokens are a few hundred bytes; the bound keeps a
/// hostile header from costing more than a few microseconds.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Longest `tenant_id` accepted, in bytes.
pub const MAX_TENANT_LEN: usize = 256;

/// Shortest HS256 secret accepted, in bytes: RFC 7518 section 3.2 asks for a key at least as
/// long as the hash output (256 bits).
pub const MIN_SECRET_LEN: usize = 32;

/// The only algorithm accepted.
const ALG: &str = "HS256";

/// The claims a tenant token carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Claims {
    /// The tenant.
    pub tenant_id: String,
    /// The policy version keys are scoped to; [`DEFAULT_POLICY_VERSION`] when absent.
    ///
    /// [`DEFAULT_POLICY_VERSION`]: crate::DEFAULT_POLICY_VERSION
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_number"
    )]
    pub policy_version: Option<String>,
    /// Expiry, in seconds since the Unix epoch.
    #[serde(deserialize_with = "seconds")]
    pub exp: u64,
    /// Not valid before, in seconds since the Unix epoch.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_seconds"
    )]
    pub nbf: Option<u64>,
    /// Issued at, in seconds since the Unix epoch (informational).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_seconds"
    )]
    pub iat: Option<u64>,
    /// The issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The audience a minted token names. On verification `aud` (a string or a list) is
    /// checked by the verifier when it [asks for one](JwtAuth::audience), and not read back
    /// here.
    #[serde(default, skip_serializing_if = "Option::is_none", skip_deserializing)]
    pub aud: Option<String>,
}

impl Claims {
    /// Claims for `tenant_id`, issued now and expiring after `ttl`.
    pub fn new(tenant_id: impl Into<String>, ttl: Duration) -> Self {
        let now = unix_now();
        Self {
            tenant_id: tenant_id.into(),
            policy_version: None,
            exp: now.saturating_add(ttl.as_secs()),
            nbf: None,
            iat: Some(now),
            iss: None,
            aud: None,
        }
    }

    /// Sets the policy version.
    #[must_use]
    pub fn policy_version(mut self, version: impl Into<String>) -> Self {
        self.policy_version = Some(version.into());
        self
    }

    /// Sets the expiry, in seconds since the Unix epoch.
    #[must_use]
    pub fn expires_at(mut self, exp: u64) -> Self {
        self.exp = exp;
        self
    }

    /// Sets the not-before time, in seconds since the Unix epoch.
    #[must_use]
    pub fn not_before(mut self, nbf: u64) -> Self {
        self.nbf = Some(nbf);
        self
    }

    /// Sets the issuer (`iss`).
    #[must_use]
    pub fn issuer(mut self, iss: impl Into<String>) -> Self {
        self.iss = Some(iss.into());
        self
    }

    /// Sets the audience (`aud`).
    #[must_use]
    pub fn audience(mut self, aud: impl Into<String>) -> Self {
        self.aud = Some(aud.into());
        self
    }

    /// The namespace these claims grant.
    pub fn namespace(&self) -> Namespace {
        Namespace::new(
            self.tenant_id.as_str(),
            self.policy_version
                .as_deref()
                .unwrap_or(DEFAULT_POLICY_VERSION),
        )
    }
}

/// The secret given to [`JwtAuth::new`] is too short to sign with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeakSecret {
    /// Its length, in bytes.
    pub len: usize,
}

impl fmt::Display for WeakSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the JWT secret is {} bytes long; HS256 needs at least {MIN_SECRET_LEN} \
             (RFC 7518 section 3.2)",
            self.len
        )
    }
}

impl std::error::Error for WeakSecret {}

/// Why a token was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtError {
    /// Not a compact JWS: wrong number of segments, bad base64url, bad JSON header, too long.
    Malformed(String),
    /// The header names an algorithm other than HS256 (`none` included).
    UnsupportedAlgorithm(String),
    /// The signature does not match the secret.
    BadSignature,
    /// `exp` is past (beyond [`CLOCK_LEEWAY`]).
    Expired {
        /// The token's `exp`.
        exp: u64,
        /// The time of the check.
        now: u64,
    },
    /// `nbf` is in the future (beyond [`CLOCK_LEEWAY`]).
    NotYetValid {
        /// The token's `nbf`.
        nbf: u64,
        /// The time of the check.
        now: u64,
    },
    /// The signature is good but the claims are missing, of the wrong type, or out of range.
    InvalidClaims(String),
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed token: {why}"),
            Self::UnsupportedAlgorithm(alg) => {
                write!(f, "token algorithm {alg:?} is not accepted; only HS256 is")
            }
            Self::BadSignature => f.write_str("token signature does not verify"),
            Self::Expired { exp, now } => {
                write!(f, "token expired {}s ago", now.saturating_sub(*exp))
            }
            Self::NotYetValid { nbf, now } => {
                write!(
                    f,
                    "token is not valid for another {}s",
                    nbf.saturating_sub(*now)
                )
            }
            Self::InvalidClaims(why) => write!(f, "invalid token claims: {why}"),
        }
    }
}

impl std::error::Error for JwtError {}

/// Verifies (and mints) HS256 tenant tokens under one shared secret.
///
/// As an [`Authenticator`] it maps a valid token to the [`Namespace`] of its claims; see the
/// [module docs](self). It remembers the tokens that verified (1024 of them, up to 2 KiB
/// each, keyed by their exact bytes), so a caller who sends the same token on every request
/// pays the signature check once; a remembered token is still refused past its `exp` (or
/// before its `nbf`), and clones share what they remember.
#[derive(Clone)]
pub struct JwtAuth {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    memo: Arc<TokenMemo>,
}

impl fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuth")
            .field("aud", &self.validation.aud)
            .field("iss", &self.validation.iss)
            .finish_non_exhaustive()
    }
}

impl JwtAuth {
    /// A verifier for tokens signed with `secret`, which must be at least [`MIN_SECRET_LEN`]
    /// bytes long (RFC 7518 section 3.2): anything shorter can be brute-forced from one token.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, WeakSecret> {
        let secret = secret.as_ref();
        if secret.len() < MIN_SECRET_LEN {
            return Err(WeakSecret { len: secret.len() });
        }
        // `jsonwebtoken` picks its crypto backend from its features; a build that enables
        // both of its backends picks none, so ours is installed (once per process).
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
                &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
            );
        }
        let mut validation = Validation::new(Algorithm::HS256);
        // Time is checked by `verify_at`, against the clock it is given; `exp` is required by
        // the `Claims` type itself.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        Ok(Self {
            // Refuses only an empty key, which the length check above already did.
            decoding: DecodingKey::from_secret(secret).expect("a non-empty HMAC key"),
            encoding: EncodingKey::from_secret(secret).expect("a non-empty HMAC key"),
            validation,
            memo: Arc::new(TokenMemo::new()),
        })
    }

    /// Accepts only tokens whose `aud` (a string, or a list) names `audience`.
    #[must_use]
    pub fn audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self.validation.validate_aud = true;
        self.validation
            .required_spec_claims
            .insert("aud".to_owned());
        // A clone made before this one accepts tokens this one refuses: they never share.
        self.memo = Arc::new(TokenMemo::new());
        self
    }

    /// Accepts only tokens whose `iss` is `issuer`.
    #[must_use]
    pub fn issuer(mut self, issuer: &str) -> Self {
        self.validation.set_issuer(&[issuer]);
        self.validation
            .required_spec_claims
            .insert("iss".to_owned());
        self.memo = Arc::new(TokenMemo::new());
        self
    }

    /// Verifies `token` (with or without a `cc_live_<id>.` prefix) and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        self.verify_at(token, unix_now())
    }

    /// [`verify`](Self::verify) as if the time were `now` (seconds since the Unix epoch).
    pub fn verify_at(&self, token: &str, now: u64) -> Result<Claims, JwtError> {
        let token = strip_key_prefix(token.trim());
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed(format!(
                "{} bytes long; the limit is {MAX_TOKEN_LEN}",
                token.len()
            )));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(_payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed(
                "a JWT has three dot-separated segments".into(),
            ));
        };
        check_header(header)?;

        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.into_kind() {
                ErrorKind::InvalidSignature => JwtError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    JwtError::UnsupportedAlgorithm(ALG.to_owned())
                }
                ErrorKind::Base64(e) => {
                    JwtError::Malformed(format!("a segment is not unpadded base64url: {e}"))
                }
                ErrorKind::Utf8(e) => JwtError::Malformed(format!("not UTF-8: {e}")),
                ErrorKind::Json(e) => JwtError::InvalidClaims(e.to_string()),
                ErrorKind::InvalidAudience => {
                    JwtError::InvalidClaims("aud does not name this service".into())
                }
                ErrorKind::InvalidIssuer => {
                    JwtError::InvalidClaims("iss is not the accepted issuer".into())
                }
                ErrorKind::MissingRequiredClaim(claim) => {
                    JwtError::InvalidClaims(format!("{claim} is required"))
                }
                ErrorKind::InvalidClaimFormat(claim) => {
                    JwtError::InvalidClaims(format!("{claim} has the wrong type"))
                }
                ErrorKind::InvalidToken => JwtError::Malformed("not a compact JWS".into()),
                other => JwtError::Malformed(format!("{other:?}")),
            })?
            .claims;

        let leeway = CLOCK_LEEWAY.as_secs();
        if now > claims.exp.saturating_add(leeway) {
            return Err(JwtError::Expired {
                exp: claims.exp,
                now,
            });
        }
        if let Some(nbf) = claims.nbf {
            if now.saturating_add(leeway) < nbf {
                return Err(JwtError::NotYetValid { nbf, now });
            }
        }
        check_tenant(&claims.tenant_id)?;
        Ok(claims)
    }

    /// Signs `claims` into a compact JWT (no key prefix). For issuing tokens to tenants, and
    /// for tests.
    pub fn mint(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signs any claims that serialize")
    }
}

impl JwtAuth {
    /// The namespace `token` grants at `now`: from the memo when it verified before and is
    /// still inside its `nbf`..`exp` window, else from a full verification, remembered when it
    /// passes.
    fn namespace_at(&self, token: &str, now: u64) -> Result<Namespace, JwtError> {
        if let Some(namespace) = self.memo.get(token, now) {
            return Ok(namespace);
        }
        let claims = self.verify_at(token, now)?;
        let namespace = claims.namespace();
        let leeway = CLOCK_LEEWAY.as_secs();
        let from = claims.nbf.map_or(0, |nbf| nbf.saturating_sub(leeway));
        self.memo
            .put(token, &namespace, from, claims.exp.saturating_add(leeway));
        Ok(namespace)
    }
}

impl Authenticator for JwtAuth {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Namespace, AuthError> {
        let token = bearer_token(headers).ok_or(AuthError::Missing)?;
        self.namespace_at(token, unix_now())
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// Reads the header before anything else: a token that names another algorithm is refused as
/// such, whatever its signature, and critical extensions (which `jsonwebtoken` ignores) are
/// refused.
fn check_header(segment: &str) -> Result<(), JwtError> {
    let bytes = B64URL
        .decode(segment)
        .map_err(|e| JwtError::Malformed(format!("header is not unpadded base64url: {e}")))?;
    let header: JoseHeader =
        serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
    if header.alg != ALG {
        return Err(JwtError::UnsupportedAlgorithm(header.alg));
    }
    if header.crit.is_some() {
        return Err(JwtError::Malformed(
            "critical header extensions are not supported".into(),
        ));
    }
    Ok(())
}

fn check_tenant(tenant: &str) -> Result<(), JwtError> {
    if tenant.is_empty() {
        return Err(JwtError::InvalidClaims("tenant_id is empty".into()));
    }
    if tenant.len() > MAX_TENANT_LEN {
        return Err(JwtError::InvalidClaims(format!(
            "tenant_id is {} bytes long; the limit is {MAX_TENANT_LEN}",
            tenant.len()
        )));
    }
    if tenant.chars().any(char::is_control) {
        return Err(JwtError::InvalidClaims(
            "tenant_id contains a control character".into(),
        ));
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Issuers differ: `policy_version` may be a string or a number.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(D::Error::custom(format!(
            "policy_version must be a string or a number, got {other}"
        ))),
    }
}

/// NumericDate (RFC 7519 section 2) may be fractional; whole seconds are enough here.
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    use serde::de::Error;
    let n = serde_json::Number::deserialize(d)?;
    n.as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        })
        .ok_or_else(|| D::Error::custom(format!("{n} is not a time in seconds")))
}

fn opt_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "seconds")] u64);
    Ok(Option::<Wrap>::deserialize(d)?.map(|Wrap(s)| s))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trip_and_tamper() {
        let auth = JwtAuth::new(SECRET).unwrap();
        let token = auth.mint(&Claims::new("t1", Duration::from_secs(60)));
        assert_eq!(auth.verify(&token).unwrap().tenant_id, "t1");
        // One character of the signature changed, to another that is still canonical
        // base64url: the first character of a segment carries six bits of the digest, while
        // the last carries four plus two that must be zero (changing it to `B` after an `A`
        // made a malformed segment, not a bad signature, once in sixteen tokens).
        let sig = token.rfind('.').unwrap() + 1;
        let bad = changed_at(&token, sig);
        assert_eq!(auth.verify(&bad), Err(JwtError::BadSignature));
    }

    /// `token` with the character at `at` changed to another that is canonical base64url in
    /// any position (`A` and `Q` both leave the low two bits zero).
    fn changed_at(token: &str, at: usize) -> String {
        let mut bad = token.to_owned();
        let swap = if token[at..].starts_with('A') {
            "Q"
        } else {
            "A"
        };
        bad.replace_range(at..at + 1, swap);
        bad
    }

    #[test]
    fn any_changed_signature_character_is_a_bad_signature() {
        let auth = JwtAuth::new(SECRET).unwrap();
        // Tokens differ in their tenant, so their signatures end in different characters.
        for n in 0..64 {
            let token = auth.mint(&Claims::new(format!("t{n}"), Duration::from_secs(60)));
            let sig = token.rfind('.').unwrap() + 1;
            for at in [sig, token.len() - 1] {
                assert_eq!(
                    auth.verify(&changed_at(&token, at)),
                    Err(JwtError::BadSignature),
                    "{token} at {at}"
                );
            }
        }
    }

    #[test]
    fn a_memoised_token_past_exp_is_refused() {
        let auth = JwtAuth::new(SECRET).unwrap();
        let token = auth.mint(&Claims::new("t", Duration::ZERO).expires_at(1000));
        let last = 1000 + CLOCK_LEEWAY.as_secs();
        assert_eq!(auth.namespace_at(&token, last).unwrap().tenant(), "t");
        assert!(auth.memo.get(&token, last).is_some(), "memoised");
        assert!(matches!(
            auth.namespace_at(&token, last + 1),
            Err(JwtError::Expired { .. })
        ));
    }

    #[test]
    fn a_memoised_token_before_nbf_is_refused() {
        // The clock may step back after the token was remembered.
        let auth = JwtAuth::new(SECRET).unwrap();
        let token = auth.mint(
            &Claims::new("t", Duration::ZERO)
                .not_before(2000)
                .expires_at(5000),
        );
        let first = 2000 - CLOCK_LEEWAY.as_secs();
        assert!(auth.namespace_at(&token, first).is_ok());
        assert!(matches!(
            auth.namespace_at(&token, first - 1),
            Err(JwtError::NotYetValid { .. })
        ));
    }

    #[test]
    fn a_forged_token_with_the_same_claims_is_not_served_from_the_memo() {
        let auth = JwtAuth::new(SECRET).unwrap();
        let claims = Claims::new("victim", Duration::from_secs(600));
        let token = auth.mint(&claims);
        assert!(auth.namespace_at(&token, unix_now()).is_ok());
        let other = JwtAuth::new("another secret, also 32 bytes long!!").unwrap();
        let forged = other.mint(&claims);
        let (body, _) = token.rsplit_once('.').unwrap();
        assert!(forged.starts_with(body), "same header and claims");
        assert_eq!(
            auth.namespace_at(&forged, unix_now()),
            Err(JwtError::BadSignature)
        );
        assert!(auth.memo.get(&forged, unix_now()).is_none());
    }

    #[test]
    fn a_token_that_fails_verification_is_never_memoised() {
        let auth = JwtAuth::new(SECRET).unwrap();
        let expired = auth.mint(&Claims::new("t", Duration::ZERO).expires_at(1000));
        assert!(auth.namespace_at(&expired, 5000).is_err());
        assert!(auth.memo.get(&expired, 1000).is_none());
    }

    #[test]
    fn the_token_memo_stays_bounded() {
        let auth = JwtAuth::new(SECRET).unwrap();
        let now = unix_now();
        for i in 0..super::super::memo::SLOTS + 64 {
            let token = auth.mint(&Claims::new(format!("t{i}"), Duration::from_secs(600)));
            assert!(auth.namespace_at(&token, now).is_ok());
        }
        assert!(auth.memo.len() <= super::super::memo::SLOTS);
        let long = auth.mint(
            &Claims::new("t", Duration::from_secs(600))
                .policy_version("v".repeat(super::super::memo::MAX_TOKEN_LEN)),
        );
        assert!(auth.namespace_at(&long, now).is_ok());
        assert!(auth.memo.get(&long, now).is_none(), "too long to keep");
    }

    #[test]
    fn leeway_applies_to_exp() {
        let auth = JwtAuth::new(SECRET).unwrap();
        let token = auth.mint(&Claims::new("t", Duration::ZERO).expires_at(1000));
        assert!(auth
            .verify_at(&token, 1000 + CLOCK_LEEWAY.as_secs())
            .is_ok());
        assert!(matches!(
            auth.verify_at(&token, 1001 + CLOCK_LEEWAY.as_secs()),
            Err(JwtError::Expired { .. })
        ));
    }
}
