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

#[tokio::test]
async fn invalidate_sends_the_token_and_the_wire_json() {
    let (stub, addr) = stub("", vec![ok_single("doc:1", 3)]).await;
    let r = client(addr).invalidate("doc:1", Some("v2")).await.unwrap();
    assert!(r.ok);
    assert_eq!((r.dep_id.as_str(), r.deleted, r.error), ("doc:1", 3, None));
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
    client(addr).invalidate("doc:1", None).await.unwrap();
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
    let results = client(addr)
        .invalidate_many(&["table:products", "table:prices"], Some("batch-1"))
        .await
        .unwrap();
    assert_eq!(results.len(), 2);
    assert!(results[0].ok && results[0].deleted == 5);
    assert!(!results[1].ok);
    assert_eq!(results[1].error.as_deref(), Some("store down"));
    assert_eq!(
        stub.seen()[0].body,
        json!({"dep_ids": ["table:products", "table:prices"], "new_hash": "batch-1"})
    );
}

#[tokio::test]
async fn a_gateway_under_a_path_prefix() {
    let (stub, addr) = stub("/cache", vec![ok_single("doc:1", 0)]).await;
    let c = CachecoreClient::new(format!("http://{addr}/cache/"), "t").unwrap();
    assert!(c.invalidate("doc:1", None).await.unwrap().ok);
    assert_eq!(stub.seen().len(), 1);
}

#[tokio::test]
async fn retries_503_then_succeeds() {
    let down = answer(
        503,
        json!({"ok": false, "dep_id": "doc:1", "keys_deleted": 0, "error": "store down"}),
    );
    let (stub, addr) = stub("", vec![down.clone(), down, ok_single("doc:1", 1)]).await;
    let r = client(addr).invalidate("doc:1", Some("v2")).await.unwrap();
    assert!(r.ok);
    assert_eq!(stub.seen().len(), 3);
}

#[tokio::test]
async fn retries_429_after_retry_after_seconds() {
    let mut limited = answer(429, error_body("rate_limited", "slow down"));
    limited.retry_after = Some("1");
    let (stub, addr) = stub("", vec![limited, ok_single("doc:1", 0)]).await;
    let started = Instant::now();
    assert!(client(addr).invalidate("doc:1", None).await.unwrap().ok);
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
    let e = client(addr).invalidate("doc:1", None).await.unwrap_err();
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
        let e = client(addr).invalidate("doc:1", None).await.unwrap_err();
        assert_eq!(stub.seen().len(), 1, "{status} must not be retried");
        match &e {
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
    let e = client(addr).invalidate("doc:1", None).await.unwrap_err();
    assert_eq!(stub.seen().len(), 3);
    match &e {
        ClientError::RetriesExhausted { attempts, last } => {
            assert_eq!(*attempts, 3);
            assert_eq!(last.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_errors_are_retried_then_reported() {
    // A port that was free a moment ago: nothing listens there.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let started = Instant::now();
    let e = client(addr).invalidate("doc:1", None).await.unwrap_err();
    match &e {
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
    assert!(c.invalidate("doc:1", None).await.unwrap().ok);
    assert_eq!(stub.seen().len(), 2);
}

#[tokio::test]
async fn a_success_with_an_unexpected_body_is_a_decode_error() {
    let (_stub, addr) = stub("", vec![answer(200, json!({"unexpected": true}))]).await;
    let e = client(addr).invalidate("doc:1", None).await.unwrap_err();
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
