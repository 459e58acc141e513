//! `CachecoreClient` against a scripted stub gateway on 127.0.0.1: request shape, decoding,
//! retries on 503 / 429 (with `Retry-After`) and connection errors, none on other 4xx.
#![cfg(feature = "client")]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use cachecore::client::{CachecoreClient, ClientError};
use cachecore::{DepErrorKind, Invalidation, InvalidationError};
use serde_json::{json, Value};

/// One scripted answer: status, `Retry-After`, body, and how long to wait before answering.
#[derive(Clone)]
struct Answer {
    status: u16,
    retry_after: Option<&'static str>,
    body: Value,
    delay: Duration,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer {
        status,
        retry_after: None,
        body,
        delay: Duration::ZERO,
    }
}

/// What the stub saw.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    headers: HeaderMap,
    body: Value,
}

#[derive(Clone, Default)]
struct Stub {
    script: Arc<Mutex<VecDeque<Answer>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Stub {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn handle(
    State(stub): State<Stub>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    stub.seen.lock().unwrap().push(Seen {
        at: Instant::now(),
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    let next = stub.script.lock().unwrap().pop_front();
    let Some(a) = next else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "script exhausted").into_response();
    };
    tokio::time::sleep(a.delay).await;
    let mut res = (
        StatusCode::from_u16(a.status).unwrap(),
        [("content-type", "application/json")],
        a.body.to_string(),
    )
        .into_response();
    if let Some(ra) = a.retry_after {
        res.headers_mut().insert("retry-after", ra.parse().unwrap());
    }
    res
}

/// Starts a stub that answers `script` in order, under `prefix`.
async fn stub(prefix: &str, script: Vec<Answer>) -> (Stub, SocketAddr) {
    let stub = Stub {
        script: Arc::new(Mutex::new(script.into())),
        ..Stub::default()
    };
    let app = Router::new()
        .route(&format!("{prefix}/v1/invalidate"), post(handle))
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (stub, addr)
}

fn client(addr: SocketAddr) -> CachecoreClient {
    CachecoreClient::builder(format!("http://{addr}"), "cc_live_k1.header.payload.sig")
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .max_attempts(3)
        .build()
        .unwrap()
}

fn ok_single(dep: &str, n: u64) -> Answer {
    answer(200, json!({"ok": true, "dep_id": dep, "keys_deleted": n}))
}

fn error_body(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}

/// `doc:1`, without a new hash.
fn doc_1() -> Invalidation {
    Invalidation::of(["doc:1"])
}

/// The client error that failed the whole call, after checking every dep reports it with
/// `kind`.
fn whole_call(e: &InvalidationError, kind: DepErrorKind) -> &ClientError {
    assert!(
        e.failed().count() > 0 && e.failed().all(|d| d.kind() == kind),
        "{e:?}"
    );
    ClientError::of(e).expect("a whole-call failure keeps its client error")
}

#[tokio::test]
async fn invalidate_sends_the_token_and_the_wire_json() {
    let (stub, addr) = stub("", vec![ok_single("doc:1", 3)]).await;
    let r = client(addr)
        .invalidate(doc_1().new_hash("v2"))
        .await
        .unwrap();
    assert_eq!(r.deps().len(), 1);
    assert_eq!(
        (r.deps()[0].dep_id.as_str(), r.deps()[0].deleted),
        ("doc:1", 3)
    );
    let seen = stub.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["authorization"],
        "Bearer cc_live_k1.header.payload.sig"
    );
    assert_eq!(seen[0].headers["content-type"], "application/json");
    assert_eq!(seen[0].body, json!({"dep_id": "doc:1", "new_hash": "v2"}));
}

#[tokio::test]
async fn invalidate_without_new_hash_omits_it() {
    let (stub, addr) = stub("", vec![ok_single("doc:1", 0)]).await;
    client(addr).invalidate(doc_1()).await.unwrap();
    assert_eq!(stub.seen()[0].body, json!({"dep_id": "doc:1"}));
}

#[tokio::test]
async fn invalidate_many_returns_per_dep_results() {
    let (stub, addr) = stub(
        "",
        vec![answer(
            200,
            json!({"results": [
                {"ok": true, "dep_id": "table:products", "keys_deleted": 5, "error": null},
                {"ok": false, "dep_id": "table:prices", "keys_deleted": 0, "error": "store down"},
            ]}),
        )],
    )
    .await;
    let e = client(addr)
        .invalidate(Invalidation::of(["table:products", "table:prices"]).new_hash("batch-1"))
        .await
        .unwrap_err();
    assert!(ClientError::of(&e).is_none(), "the call itself succeeded");
    let results = e.results();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].as_ref().unwrap().deleted, 5);
    let failed = results[1].as_ref().unwrap_err();
    assert_eq!(failed.dep_id(), "table:prices");
    assert_eq!(failed.to_string(), "store down");
    assert_eq!(
        stub.seen()[0].body,
        json!({"dep_ids": ["table:products", "table:prices"], "new_hash": "batch-1"})
    );
}

#[tokio::test]
async fn a_gateway_under_a_path_prefix() {
    let (stub, addr) = stub("/cache", vec![ok_single("doc:1", 0)]).await;
    let c = CachecoreClient::new(format!("http://{addr}/cache/"), "t").unwrap();
    c.invalidate(doc_1()).await.unwrap();
    assert_eq!(stub.seen().len(), 1);
}

#[tokio::test]
async fn retries_503_then_succeeds() {
    let down = answer(
        503,
        json!({"ok": false, "dep_id": "doc:1", "keys_deleted": 0, "error": "store down"}),
    );
    let (stub, addr) = stub("", vec![down.clone(), down, ok_single("doc:1", 1)]).await;
    client(addr)
        .invalidate(doc_1().new_hash("v2"))
        .await
        .unwrap();
    assert_eq!(stub.seen().len(), 3);
}

#[tokio::test]
async fn retries_429_after_retry_after_seconds() {
    let mut limited = answer(429, error_body("rate_limited", "slow down"));
    limited.retry_after = Some("1");
    let (stub, addr) = stub("", vec![limited, ok_single("doc:1", 0)]).await;
    let started = Instant::now();
    client(addr).invalidate(doc_1()).await.unwrap();
    let seen = stub.seen();
    assert_eq!(seen.len(), 2);
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= Duration::from_millis(990),
        "retried after {waited:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_retry_after_beyond_the_limit_is_not_waited_for() {
    let mut limited = answer(429, error_body("rate_limited", "come back in an hour"));
    limited.retry_after = Some("3600");
    let (stub, addr) = stub("", vec![limited]).await;
    let started = Instant::now();
    let e = client(addr).invalidate(doc_1()).await.unwrap_err();
    let e = whole_call(&e, DepErrorKind::Transport);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(stub.seen().len(), 1);
    assert_eq!(e.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(e.code(), Some("rate_limited"));
    assert!(
        matches!(e, ClientError::RetriesExhausted { attempts: 1, .. }),
        "{e}"
    );
}

#[tokio::test]
async fn no_retry_on_4xx() {
    for (status, code) in [
        (400, "malformed_json"),
        (401, "unauthorized"),
        (413, "payload_too_large"),
        (422, "invalid_dep_id"),
    ] {
        let (stub, addr) = stub("", vec![answer(status, error_body(code, "named problem"))]).await;
        let e = client(addr).invalidate(doc_1()).await.unwrap_err();
        let e = whole_call(&e, DepErrorKind::Rejected);
        assert_eq!(stub.seen().len(), 1, "{status} must not be retried");
        match e {
            ClientError::Http {
                status: s,
                code: c,
                message,
            } => {
                assert_eq!(s.as_u16(), status);
                assert_eq!(c.as_deref(), Some(code));
                assert_eq!(message, "named problem");
            }
            other => panic!("expected Http, got {other:?}"),
        }
        assert!(e.to_string().contains(code), "{e}");
    }
}

#[tokio::test]
async fn gives_up_after_max_attempts() {
    let down = answer(500, json!("oops"));
    let (stub, addr) = stub("", vec![down.clone(), down.clone(), down.clone(), down]).await;
    let e = client(addr).invalidate(doc_1()).await.unwrap_err();
    let e = whole_call(&e, DepErrorKind::Transport);
    assert_eq!(stub.seen().len(), 3);
    match e {
        ClientError::RetriesExhausted { attempts, last } => {
            assert_eq!(*attempts, 3);
            assert_eq!(last.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_errors_are_retried_then_reported() {
    let addr = closed_port();
    let started = Instant::now();
    let e = client(addr).invalidate(doc_1()).await.unwrap_err();
    match whole_call(&e, DepErrorKind::Transport) {
        ClientError::RetriesExhausted { attempts: 3, last } => {
            assert!(matches!(**last, ClientError::Transport(_)), "{last:?}")
        }
        other => panic!("expected RetriesExhausted(Transport), got {other:?}"),
    }
    // Two backoffs of at most 10 ms and 20 ms.
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_slow_gateway_times_out_and_is_retried() {
    let mut slow = ok_single("doc:1", 0);
    slow.delay = Duration::from_secs(2);
    let (stub, addr) = stub("", vec![slow, ok_single("doc:1", 0)]).await;
    let c = CachecoreClient::builder(format!("http://{addr}"), "t")
        .timeout(Duration::from_millis(200))
        .backoff(Duration::from_millis(10), Duration::from_millis(10))
        .build()
        .unwrap();
    c.invalidate(doc_1()).await.unwrap();
    assert_eq!(stub.seen().len(), 2);
}

#[tokio::test]
async fn a_success_with_an_unexpected_body_is_a_decode_error() {
    let (_stub, addr) = stub("", vec![answer(200, json!({"unexpected": true}))]).await;
    let e = client(addr).invalidate(doc_1()).await.unwrap_err();
    let e = whole_call(&e, DepErrorKind::Other);
    assert!(matches!(e, ClientError::Decode(_)), "{e:?}");
}

#[test]
fn bad_configuration_is_reported() {
    for (url, token) in [
        ("not a url", "t"),
        ("https://gw.example", "t"),
        ("http://127.0.0.1:1", ""),
        ("http://127.0.0.1:1", "bad\ntoken"),
    ] {
        let e = CachecoreClient::new(url, token).unwrap_err();
        assert!(
            matches!(e, ClientError::InvalidConfig(_)),
            "{url} {token:?}: {e:?}"
        );
    }
}

#[tokio::test]
async fn an_invalidation_for_another_tenant_fails_without_a_call() {
    let (stub, addr) = stub("", vec![ok_single("doc:1", 0)]).await;
    // The token's tenant was not declared: a named tenant cannot be checked, so it is refused.
    let e = client(addr)
        .invalidate(doc_1().tenant("acme"))
        .await
        .unwrap_err();
    assert!(e.failed().all(|d| d.kind() == DepErrorKind::Tenant), "{e}");
    let declared = CachecoreClient::builder(format!("http://{addr}"), "t")
        .tenant("acme")
        .build()
        .unwrap();
    let e = declared
        .invalidate(doc_1().tenant("other"))
        .await
        .unwrap_err();
    assert!(e.failed().all(|d| d.kind() == DepErrorKind::Tenant), "{e}");
    assert!(stub.seen().is_empty(), "nothing was sent");
    declared.invalidate(doc_1().tenant("acme")).await.unwrap();
    assert_eq!(stub.seen().len(), 1);
}

#[tokio::test]
async fn an_empty_invalidation_sends_nothing() {
    let (stub, addr) = stub("", Vec::new()).await;
    let done = client(addr)
        .invalidate(Invalidation::of(Vec::<String>::new()))
        .await
        .unwrap();
    assert!(done.deps().is_empty());
    assert!(stub.seen().is_empty());
}

/// A port that was free a moment ago: nothing listens there.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Posts `body` to an invalidation service applying its invalidations through `client`, for
/// tenant `acme`; the status and the JSON answer.
async fn forward(client: CachecoreClient, body: &'static str) -> (StatusCode, Value) {
    use cachecore::auth::FixedTenant;
    use cachecore::invalidate::InvalidateService;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    let req = http::Request::post("/v1/invalidate")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res = InvalidateService::new(client, FixedTenant::new("acme"))
        .oneshot(req)
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// The client is an `Invalidator`: an invalidation service forwards to a remote gateway
/// through it, and a gateway out of reach is a 503 naming why, as a store that is down is.
#[tokio::test]
async fn an_invalidation_service_can_forward_through_the_client() {
    let (stub, addr) = stub(
        "",
        vec![answer(
            200,
            json!({"results": [
                {"ok": true, "dep_id": "a", "keys_deleted": 2, "error": null},
                {"ok": true, "dep_id": "b", "keys_deleted": 0, "error": null},
            ]}),
        )],
    )
    .await;
    let remote = CachecoreClient::builder(format!("http://{addr}"), "t")
        .tenant("acme")
        .build()
        .unwrap();
    let (status, body) = forward(remote, r#"{"dep_ids":["a","b"],"new_hash":"v2"}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["results"][0]["keys_deleted"], 2);
    assert_eq!(
        stub.seen()[0].body,
        json!({"dep_ids": ["a", "b"], "new_hash": "v2"})
    );

    let unreachable = CachecoreClient::builder(format!("http://{}", closed_port()), "t")
        .tenant("acme")
        .max_attempts(1)
        .build()
        .unwrap();
    let (status, body) = forward(unreachable, r#"{"dep_id":"a"}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["ok"], false);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("could not reach the gateway"),
        "{body}"
    );
}
