//! HS256 tenant tokens, and the layer in trusted-header mode.
#![cfg(feature = "jwt")]

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use bytes::Bytes;
use cachecore::auth::jwt::{Claims, JwtAuth, JwtError, CLOCK_LEEWAY};
use cachecore::auth::{AuthError, Authenticator};
use cachecore::wire::encode_deps;
use cachecore::Invalidation;
use cachecore::{CacheStatus, CachecoreLayer, Dep, RequestBody, X_CACHE_ERROR, X_CACHE_SIMILARITY};
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use sha2::Sha256;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn auth() -> JwtAuth {
    JwtAuth::new(SECRET).unwrap()
}

fn token(tenant: &str) -> String {
    auth().mint(&Claims::new(tenant, Duration::from_secs(600)))
}

/// A token with any header and payload, signed with HS256 under `secret`.
fn forge(header: &str, payload: &str, secret: &str) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

#[test]
fn a_valid_token_names_tenant_and_policy_version() {
    let t = auth().mint(&Claims::new("acme", Duration::from_secs(60)).policy_version("v2"));
    let ns = auth()
        .authenticate(&headers(&[("authorization", &format!("Bearer {t}"))]))
        .unwrap();
    assert_eq!((ns.tenant(), ns.policy_version()), ("acme", "v2"));
}

#[test]
fn policy_version_defaults_to_1_and_may_be_a_number() {
    let exp = now() + 60;
    let c = auth().verify(&token("acme")).unwrap();
    assert_eq!(c.namespace().policy_version(), "1");
    let t = forge(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"tenant_id":"acme","policy_version":3,"exp":{exp}}}"#),
        SECRET,
    );
    assert_eq!(auth().verify(&t).unwrap().namespace().policy_version(), "3");
}

#[test]
fn key_prefix_and_both_headers_are_accepted() {
    let t = token("acme");
    for h in [
        headers(&[("authorization", &format!("Bearer cc_live_k1.{t}"))]),
        headers(&[("authorization", &format!("bearer {t}"))]),
        headers(&[("x-cachecore-token", &format!("cc_live_abc123.{t}"))]),
        headers(&[("x-cachecore-token", &t)]),
    ] {
        assert_eq!(auth().authenticate(&h).unwrap().tenant(), "acme", "{h:?}");
    }
}

#[test]
fn x_cachecore_token_wins_over_authorization() {
    // In a gateway, Authorization may carry the upstream provider's key.
    let h = headers(&[
        ("authorization", "Bearer sk-upstream-key"),
        ("x-cachecore-token", &token("acme")),
    ]);
    assert_eq!(auth().authenticate(&h).unwrap().tenant(), "acme");
}

#[test]
fn no_credentials_is_missing_and_garbage_is_invalid() {
    assert_eq!(
        auth().authenticate(&HeaderMap::new()),
        Err(AuthError::Missing)
    );
    let e = auth()
        .authenticate(&headers(&[("authorization", "Bearer sk-upstream-key")]))
        .unwrap_err();
    assert!(matches!(e, AuthError::Invalid(_)), "{e:?}");
}

#[test]
fn expired_tokens_are_rejected_beyond_the_leeway() {
    let leeway = CLOCK_LEEWAY.as_secs();
    let t = auth().mint(&Claims::new("acme", Duration::ZERO).expires_at(now() - leeway - 5));
    assert!(matches!(auth().verify(&t), Err(JwtError::Expired { .. })));
    let t = auth().mint(&Claims::new("acme", Duration::ZERO).expires_at(now() - 1));
    assert!(auth().verify(&t).is_ok(), "within the leeway");
    let e = auth()
        .authenticate(&headers(&[(
            "authorization",
            &format!(
                "Bearer {}",
                auth().mint(&Claims::new("acme", Duration::ZERO).expires_at(1_000_000),)
            ),
        )]))
        .unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
}

#[test]
fn not_yet_valid_tokens_are_rejected() {
    let t = auth().mint(&Claims::new("acme", Duration::from_secs(3600)).not_before(now() + 600));
    assert!(matches!(
        auth().verify(&t),
        Err(JwtError::NotYetValid { .. })
    ));
}

#[test]
fn alg_none_is_rejected() {
    let exp = now() + 60;
    let payload = B64.encode(format!(r#"{{"tenant_id":"acme","exp":{exp}}}"#));
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"None"}"#,
        r#"{"alg":"NONE"}"#,
    ] {
        let t = format!("{}.{payload}.", B64.encode(header));
        assert!(
            matches!(auth().verify(&t), Err(JwtError::UnsupportedAlgorithm(_))),
            "{header}"
        );
    }
}

#[test]
fn other_algorithms_are_rejected_even_with_a_valid_hmac() {
    let exp = now() + 60;
    let payload = format!(r#"{{"tenant_id":"acme","exp":{exp}}}"#);
    for alg in ["HS384", "HS512", "RS256", "ES256", "hs256"] {
        let t = forge(&format!(r#"{{"alg":"{alg}"}}"#), &payload, SECRET);
        assert_eq!(
            auth().verify(&t),
            Err(JwtError::UnsupportedAlgorithm(alg.into()))
        );
    }
    let t = forge(r#"{"typ":"JWT"}"#, &payload, SECRET);
    assert!(matches!(auth().verify(&t), Err(JwtError::Malformed(_))));
}

#[test]
fn bad_signatures_are_rejected() {
    let exp = now() + 60;
    let payload = format!(r#"{{"tenant_id":"acme","exp":{exp}}}"#);
    let t = forge(
        r#"{"alg":"HS256"}"#,
        &payload,
        "another-secret-another-secret-xx",
    );
    assert_eq!(auth().verify(&t), Err(JwtError::BadSignature));

    // A payload swapped for another tenant's under the original signature.
    let good = token("acme");
    let mut parts: Vec<&str> = good.split('.').collect();
    let evil = B64.encode(format!(r#"{{"tenant_id":"victim","exp":{exp}}}"#));
    parts[1] = &evil;
    assert_eq!(auth().verify(&parts.join(".")), Err(JwtError::BadSignature));

    let no_sig = format!("{}.{}.", parts[0], B64.encode(&payload));
    assert_eq!(auth().verify(&no_sig), Err(JwtError::BadSignature));
}

#[test]
fn malformed_tokens_are_rejected() {
    for t in ["", "abc", "a.b", "a.b.c.d.e", "!!!.b.c", &"a".repeat(9000)] {
        assert!(
            matches!(auth().verify(t), Err(JwtError::Malformed(_))),
            "{t:.20}"
        );
    }
}

#[test]
fn claims_must_have_tenant_and_exp() {
    let exp = now() + 60;
    for payload in [
        format!(r#"{{"exp":{exp}}}"#),
        r#"{"tenant_id":"acme"}"#.to_owned(),
        format!(r#"{{"tenant_id":"","exp":{exp}}}"#),
        format!(r#"{{"tenant_id":7,"exp":{exp}}}"#),
        format!(r#"{{"tenant_id":"a\nb","exp":{exp}}}"#),
        r#"{"tenant_id":"acme","exp":"tomorrow"}"#.to_owned(),
    ] {
        let t = forge(r#"{"alg":"HS256"}"#, &payload, SECRET);
        assert!(
            matches!(auth().verify(&t), Err(JwtError::InvalidClaims(_))),
            "{payload}: {:?}",
            auth().verify(&t)
        );
    }
}

#[test]
fn minted_tokens_verify_under_the_same_secret_only() {
    let t = token("acme");
    assert_eq!(t.split('.').count(), 3);
    assert!(!t.contains('='));
    assert_eq!(
        JwtAuth::new("a-different-secret-of-32-bytes!!")
            .unwrap()
            .verify(&t),
        Err(JwtError::BadSignature)
    );
}

// Trusted-header mode on the layer.

type Svc = BoxCloneService<
    Request<Full<Bytes>>,
    Response<cachecore::ResponseBody<Full<Bytes>>>,
    Infallible,
>;

fn wire_service(layer: &CachecoreLayer) -> Svc {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(layer.clone())
            .service(tower::service_fn(
                |_req: Request<RequestBody<Full<Bytes>>>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                },
            )),
    )
}

async fn send(svc: &Svc, hs: &[(&str, &str)]) -> Response<()> {
    let mut req = Request::post("/v1/chat/completions");
    for (k, v) in hs {
        req = req.header(*k, *v);
    }
    let res = svc
        .clone()
        .oneshot(
            req.body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    body.collect().await.unwrap();
    Response::from_parts(parts, ())
}

fn x_cache(res: &Response<()>) -> &str {
    res.headers()["x-cache"].to_str().unwrap()
}

#[tokio::test]
async fn wire_mode_caches_per_tenant_and_answers_similarity() {
    let layer = CachecoreLayer::builder().trusted_headers(auth()).build();
    let svc = wire_service(&layer);
    let bearer = format!("Bearer {}", token("acme"));
    let first = send(&svc, &[("authorization", &bearer)]).await;
    assert_eq!(x_cache(&first), "MISS");
    assert_eq!(first.headers()[X_CACHE_SIMILARITY], "0.00");
    let second = send(&svc, &[("authorization", &bearer)]).await;
    assert_eq!(x_cache(&second), "HIT_L1");
    assert_eq!(second.headers()[X_CACHE_SIMILARITY], "1.00");
    assert!(second.headers().contains_key("x-cache-age"));
    // A fresh token for the same tenant is the same namespace: credentials are not in the key.
    let other_token = auth().mint(&Claims::new("acme", Duration::from_secs(900)));
    let third = send(&svc, &[("x-cachecore-token", &other_token)]).await;
    assert_eq!(x_cache(&third), "HIT_L1");
}

#[tokio::test]
async fn wire_mode_without_or_with_bad_credentials_bypasses() {
    let layer = CachecoreLayer::builder().trusted_headers(auth()).build();
    let svc = wire_service(&layer);
    let res = send(&svc, &[]).await;
    assert_eq!(x_cache(&res), "BYPASS");
    assert!(!res.headers().contains_key(X_CACHE_ERROR));
    let expired = auth().mint(&Claims::new("acme", Duration::ZERO).expires_at(1));
    let res = send(&svc, &[("authorization", &format!("Bearer {expired}"))]).await;
    assert_eq!(x_cache(&res), "BYPASS");
    let why = res.headers()[X_CACHE_ERROR].to_str().unwrap();
    assert!(why.contains("expired"), "{why}");
}

#[tokio::test]
async fn wire_mode_new_policy_version_is_a_new_namespace() {
    let layer = CachecoreLayer::builder().trusted_headers(auth()).build();
    let svc = wire_service(&layer);
    let v1 = format!(
        "Bearer {}",
        auth().mint(&Claims::new("acme", Duration::from_secs(60)).policy_version("v1"))
    );
    let v2 = format!(
        "Bearer {}",
        auth().mint(&Claims::new("acme", Duration::from_secs(60)).policy_version("v2"))
    );
    assert_eq!(
        x_cache(&send(&svc, &[("authorization", &v1)]).await),
        "MISS"
    );
    assert_eq!(
        x_cache(&send(&svc, &[("authorization", &v1)]).await),
        "HIT_L1"
    );
    assert_eq!(
        x_cache(&send(&svc, &[("authorization", &v2)]).await),
        "MISS"
    );
}

#[tokio::test]
async fn wire_mode_deps_header_tags_entries_and_malformed_bypasses() {
    let layer = CachecoreLayer::builder().trusted_headers(auth()).build();
    let svc = wire_service(&layer);
    let bearer = format!("Bearer {}", token("acme"));
    let deps = encode_deps(&[Dep::new("doc:1").hash("v1")]);
    let with = [
        ("authorization", bearer.as_str()),
        ("x-cachecore-deps", deps.as_str()),
    ];
    assert_eq!(x_cache(&send(&svc, &with).await), "MISS");
    assert_eq!(x_cache(&send(&svc, &with).await), "HIT_L1");
    assert!(layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:1"]).tenant("acme").new_hash("v2"))
        .await
        .is_ok());
    assert_eq!(x_cache(&send(&svc, &with).await), "MISS");

    for bad in [
        "%%%",
        "W10=x",
        &B64.encode("{\"dep_id\":\"x\"}"),
        &B64.encode(r#"[{"dep_id":""}]"#),
    ] {
        let res = send(
            &svc,
            &[("authorization", &bearer), ("x-cachecore-deps", bad)],
        )
        .await;
        assert_eq!(x_cache(&res), "BYPASS", "{bad}");
        let why = res.headers()[X_CACHE_ERROR].to_str().unwrap();
        assert!(why.starts_with("X-CacheCore-Deps:"), "{why}");
    }
}

#[tokio::test]
async fn wire_mode_bypass_header() {
    let layer = CachecoreLayer::builder().trusted_headers(auth()).build();
    let svc = wire_service(&layer);
    let bearer = format!("Bearer {}", token("acme"));
    for _ in 0..2 {
        let res = send(
            &svc,
            &[("authorization", &bearer), ("x-cachecore-bypass", "1")],
        )
        .await;
        assert_eq!(x_cache(&res), "BYPASS");
    }
    assert_eq!(
        x_cache(&send(&svc, &[("authorization", &bearer)]).await),
        "MISS"
    );
    assert_eq!(layer.metrics().bypasses, 2);
    let _ = CacheStatus::Bypass;
}

/// An authenticator that counts its calls.
#[derive(Clone, Default)]
struct Counting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Authenticator for Counting {
    fn authenticate(&self, headers: &HeaderMap) -> Result<cachecore::Namespace, AuthError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        auth().authenticate(headers)
    }
}

#[tokio::test]
async fn wire_mode_verifies_credentials_once_per_request() {
    let counting = Counting::default();
    let layer = CachecoreLayer::builder()
        .trusted_headers(counting.clone())
        .build();
    let svc = wire_service(&layer);
    let bearer = format!("Bearer {}", token("acme"));
    let deps = encode_deps(&[Dep::new("doc:1")]);
    let hs = [
        ("authorization", bearer.as_str()),
        ("x-cachecore-deps", deps.as_str()),
    ];
    assert_eq!(x_cache(&send(&svc, &hs).await), "MISS");
    assert_eq!(x_cache(&send(&svc, &hs).await), "HIT_L1");
    let res = send(&svc, &[("authorization", "Bearer not-a-token")]).await;
    assert_eq!(x_cache(&res), "BYPASS");
    assert!(res.headers().contains_key(X_CACHE_ERROR));
    assert_eq!(counting.0.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[tokio::test]
async fn an_authenticator_gives_the_layer_its_namespace_without_trusted_headers() {
    let layer = CachecoreLayer::builder().authenticator(auth()).build();
    let svc = wire_service(&layer);
    let acme = format!("Bearer {}", token("acme"));
    let globex = format!("Bearer {}", token("globex"));
    // Deps headers are not trusted here: they are neither read nor an error.
    let hs = [
        ("authorization", acme.as_str()),
        ("x-cachecore-deps", "%%%"),
    ];
    assert_eq!(x_cache(&send(&svc, &hs).await), "MISS");
    assert_eq!(x_cache(&send(&svc, &hs).await), "HIT_L1");
    assert_eq!(
        x_cache(&send(&svc, &[("authorization", &globex)]).await),
        "MISS"
    );
    assert_eq!(x_cache(&send(&svc, &[]).await), "BYPASS");
    let res = send(&svc, &[("authorization", "Bearer not-a-token")]).await;
    assert_eq!(x_cache(&res), "BYPASS");
    assert!(res.headers().contains_key(X_CACHE_ERROR));
    // The policy dep is per tenant: retiring acme leaves globex alone.
    assert!(layer
        .invalidator()
        .invalidate(Invalidation::of([cachecore::POLICY_DEP]).tenant("acme"))
        .await
        .is_ok());
    assert_eq!(x_cache(&send(&svc, &hs).await), "MISS");
    assert_eq!(
        x_cache(&send(&svc, &[("authorization", &globex)]).await),
        "HIT_L1"
    );
}

// Start-up checks and the claims a deployment may require.

#[test]
fn a_secret_shorter_than_32_bytes_is_refused_at_start_up() {
    for short in ["", "secret", &"x".repeat(31)] {
        let e = JwtAuth::new(short).unwrap_err();
        assert_eq!(e.len, short.len());
        assert!(e.to_string().contains("at least 32"), "{e}");
    }
    assert!(JwtAuth::new("x".repeat(32)).is_ok());
}

#[test]
fn audience_and_issuer_are_checked_when_configured() {
    let strict = auth()
        .audience("cachecore")
        .issuer("https://issuer.example");
    let base = || Claims::new("acme", Duration::from_secs(60));
    let good = auth().mint(
        &base()
            .audience("cachecore")
            .issuer("https://issuer.example"),
    );
    assert_eq!(strict.verify(&good).unwrap().tenant_id, "acme");
    // Without the check, the claims are not required.
    assert!(auth().verify(&token("acme")).is_ok());

    for claims in [
        base(),
        base().issuer("https://issuer.example"),
        base().audience("cachecore"),
        base()
            .audience("another-service")
            .issuer("https://issuer.example"),
        base().audience("cachecore").issuer("https://someone.else"),
    ] {
        let t = auth().mint(&claims);
        assert!(
            matches!(strict.verify(&t), Err(JwtError::InvalidClaims(_))),
            "{claims:?}: {:?}",
            strict.verify(&t)
        );
    }

    // `aud` may be a list that names this service among others.
    let exp = now() + 60;
    let listed = forge(
        r#"{"alg":"HS256"}"#,
        &format!(
            r#"{{"tenant_id":"acme","exp":{exp},"iss":"https://issuer.example","aud":["x","cachecore"]}}"#
        ),
        SECRET,
    );
    assert!(strict.verify(&listed).is_ok());
    // `iss` must be a string.
    let typed = forge(
        r#"{"alg":"HS256"}"#,
        &format!(r#"{{"tenant_id":"acme","exp":{exp},"iss":7,"aud":"cachecore"}}"#),
        SECRET,
    );
    assert!(matches!(
        strict.verify(&typed),
        Err(JwtError::InvalidClaims(_))
    ));
}

#[test]
fn padded_segments_are_malformed() {
    let t = token("acme");
    let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
    parts[2].push('=');
    assert!(matches!(
        auth().verify(&parts.join(".")),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn a_verifier_given_an_audience_does_not_accept_what_its_clone_remembered() {
    let open = auth();
    let t = token("acme");
    let h = headers(&[("authorization", &format!("Bearer {t}"))]);
    assert!(open.authenticate(&h).is_ok());
    let strict = open.clone().audience("cachecore");
    assert!(strict.authenticate(&h).is_err(), "no aud in the token");
    let strict = open.clone().issuer("https://issuer.example");
    assert!(strict.authenticate(&h).is_err(), "no iss in the token");
}

#[test]
fn a_remembered_token_is_still_refused_once_expired() {
    // Accepted until `exp` plus the leeway; the memo must not stretch that. The token expires
    // at the next second boundary (leeway included), so the second call comes after it.
    let auth = auth();
    let exp = now() - CLOCK_LEEWAY.as_secs();
    let t = auth.mint(&Claims::new("acme", Duration::ZERO).expires_at(exp));
    let h = headers(&[("authorization", &format!("Bearer {t}"))]);
    if auth.authenticate(&h).is_err() {
        return; // the second turned between `now()` and the call: nothing to remember
    }
    while now() <= exp + CLOCK_LEEWAY.as_secs() {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(auth.authenticate(&h), Err(AuthError::Invalid(_))));
}
