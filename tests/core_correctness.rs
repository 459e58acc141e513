//! Regression tests for defects that made the cache hang or answer wrongly: each is named after
//! the behaviour it pins, and each failed before its fix. Every test that could hang runs under
//! a watchdog ([`within`]) that fails with what was stuck instead of hanging CI.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cachecore::{CacheStatus, CachecoreLayer, MemoryStore, Namespace, RequestBody};
use cachecore::{Invalidated, Invalidation, InvalidationError};
use common::{send, stack, Upstream};
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

/// Fails the test, naming `what`, if `fut` has not finished within `limit`.
async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("watchdog: {what} still pending after {limit:?}"),
    }
}

const WATCHDOG: Duration = Duration::from_secs(20);

type Req = Request<RequestBody<Full<Bytes>>>;

/// An upstream that answers `call <n>` after `delay`; calls listed in `stuck` never answer.
fn slow_upstream(
    delay: Duration,
    stuck: &'static [usize],
    calls: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
       + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |_req: Req| {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if stuck.contains(&n) {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(delay).await;
            let mut res = Response::new(Full::new(Bytes::from(format!("call {n}"))));
            res.headers_mut()
                .insert("content-length", format!("call {n}").len().into());
            Ok::<_, Infallible>(res)
        }
    })
}

fn chat() -> Request<Full<Bytes>> {
    common::chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
}

async fn body_text<B: http_body::Body>(res: Response<B>) -> String
where
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn two_identical_requests_awaited_together_both_complete() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CachecoreLayer::builder().store(MemoryStore::new()).build();
    let svc = tower::Layer::layer(
        &layer,
        slow_upstream(Duration::from_millis(50), &[], calls.clone()),
    );
    let (a, b) = within(WATCHDOG, "two joined identical requests", async {
        tokio::join!(svc.clone().oneshot(chat()), svc.clone().oneshot(chat()))
    })
    .await;
    let (a, b) = within(WATCHDOG, "reading both bodies", async {
        (body_text(a.unwrap()).await, body_text(b.unwrap()).await)
    })
    .await;
    assert!(a.starts_with("call "), "{a}");
    assert!(b.starts_with("call "), "{b}");
}

#[tokio::test]
async fn a_leader_whose_body_is_dropped_releases_its_followers_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    // Bounds far beyond the watchdog: only the leader's liveness can release the follower.
    let layer = CachecoreLayer::builder()
        .coalesce_wait(Duration::from_secs(600), Duration::from_secs(600))
        .build();
    let svc = tower::Layer::layer(
        &layer,
        slow_upstream(Duration::from_millis(100), &[], calls.clone()),
    );
    let leader = tokio::spawn(svc.clone().oneshot(chat()));
    // Let the leader reach the upstream first.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let follower = tokio::spawn(svc.clone().oneshot(chat()));
    let leader = within(WATCHDOG, "leader head", leader)
        .await
        .unwrap()
        .unwrap();
    drop(leader);
    let follower = within(
        WATCHDOG,
        "follower after the leader's body was dropped",
        follower,
    )
    .await
    .unwrap()
    .unwrap();
    let text = within(WATCHDOG, "follower body", body_text(follower)).await;
    assert!(text.starts_with("call "), "{text}");
}

#[tokio::test]
async fn a_follower_stops_waiting_after_the_bound_and_calls_upstream_itself() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CachecoreLayer::builder()
        .coalesce_wait(Duration::from_millis(200), Duration::from_millis(200))
        .build();
    // The leader's upstream call never answers (alive but stuck).
    let svc = tower::Layer::layer(&layer, slow_upstream(Duration::ZERO, &[1], calls.clone()));
    let _leader = tokio::spawn(svc.clone().oneshot(chat()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let res = within(
        WATCHDOG,
        "follower behind a stuck leader",
        svc.clone().oneshot(chat()),
    )
    .await
    .unwrap();
    assert_eq!(
        res.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Miss)
    );
    assert_eq!(body_text(res).await, "call 2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_follower_of_a_stream_is_not_held_until_the_stream_ends() {
    let layer = CachecoreLayer::builder()
        .coalesce_wait(Duration::from_secs(600), Duration::from_secs(600))
        .build();
    let calls = Arc::new(AtomicUsize::new(0));
    let senders = Arc::new(std::sync::Mutex::new(Vec::new()));
    let inner = {
        let (calls, senders) = (calls.clone(), senders.clone());
        tower::service_fn(move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            let (tx, body) = common::channel_body();
            senders.lock().unwrap().push(tx);
            async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let mut res = Response::new(body);
                res.headers_mut()
                    .insert("content-type", "text/event-stream".parse().unwrap());
                Ok::<_, Infallible>(res)
            }
        })
    };
    let svc = tower::Layer::layer(&layer, inner);
    let leader = tokio::spawn(svc.clone().oneshot(chat()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let follower = tokio::spawn(svc.clone().oneshot(chat()));
    let _leader = within(WATCHDOG, "leader head", leader)
        .await
        .unwrap()
        .unwrap();
    // The leader's stream stays open; the follower still gets its own response.
    let follower = within(WATCHDOG, "follower of an open stream", follower)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(follower.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_authority_is_part_of_the_key_on_a_client_stack() {
    let upstream = Upstream::new();
    let layer = CachecoreLayer::new();
    let svc = stack(&layer, &upstream);
    let req = |uri: &str| {
        Request::post(uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"q\":1}")))
            .unwrap()
    };
    let a = send(&svc, req("http://svc-a/v1/x")).await;
    let b = send(&svc, req("http://svc-b/v1/x")).await;
    assert_eq!(b.x_cache, "MISS", "svc-b got svc-a's answer: {}", b.text());
    assert!(b.text().contains("svc-b"), "{}", b.text());
    let https = send(&svc, req("https://svc-a/v1/x")).await;
    assert_eq!(https.x_cache, "MISS", "the scheme is part of the key");
    let again = send(&svc, req("http://SVC-A/v1/x")).await;
    assert_eq!(again.x_cache, "HIT_L1", "host names are case-insensitive");
    assert_eq!(again.body, a.body);
}

#[tokio::test]
async fn the_host_header_is_part_of_the_key_on_a_server_stack() {
    let upstream = Upstream::new();
    let layer = CachecoreLayer::new();
    let svc = stack(&layer, &upstream);
    let req = |host: &str| {
        Request::post("/v1/x")
            .header("host", host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"q\":1}")))
            .unwrap()
    };
    send(&svc, req("tenant-a.example.com")).await;
    let b = send(&svc, req("tenant-b.example.com")).await;
    assert_eq!(b.x_cache, "MISS");
    let a = send(&svc, req("tenant-a.example.com")).await;
    assert_eq!(a.x_cache, "HIT_L1");
}

#[tokio::test]
async fn accept_encoding_is_part_of_the_key_by_default() {
    let upstream = Upstream::new().header("content-encoding", "gzip");
    let layer = CachecoreLayer::new();
    let svc = stack(&layer, &upstream);
    let req = |enc: Option<&str>| {
        let mut b = Request::post("/v1/x").header("content-type", "application/json");
        if let Some(enc) = enc {
            b = b.header("accept-encoding", enc);
        }
        b.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    };
    assert_eq!(send(&svc, req(Some("gzip"))).await.x_cache, "MISS");
    assert_eq!(send(&svc, req(Some("gzip"))).await.x_cache, "HIT_L1");
    let plain = send(&svc, req(None)).await;
    assert_eq!(
        plain.x_cache, "MISS",
        "a gzip body stored for one client was replayed to one that did not ask for it"
    );
}

#[tokio::test]
async fn a_response_vary_is_honoured_and_vary_star_is_never_stored() {
    let upstream = Upstream::new().header("vary", "X-Lang");
    let layer = CachecoreLayer::new();
    let svc = stack(&layer, &upstream);
    let req = |lang: &str| {
        Request::post("/v1/x")
            .header("x-lang", lang)
            .body(Full::new(Bytes::from_static(b"q")))
            .unwrap()
    };
    let en = send(&svc, req("en")).await;
    assert_eq!(en.x_cache, "MISS");
    let en2 = send(&svc, req("en")).await;
    assert_eq!(en2.x_cache, "HIT_L1");
    assert_eq!(en2.body, en.body);
    assert!(
        !en2.headers.contains_key("x-cachecore-vary-key"),
        "internal bookkeeping leaked into a response"
    );
    let fr = send(&svc, req("fr")).await;
    assert_eq!(fr.x_cache, "MISS", "an `en` variant was served to `fr`");

    let star = Upstream::new().header("vary", "*");
    let svc = stack(&CachecoreLayer::new(), &star);
    send(&svc, req("en")).await;
    assert_eq!(send(&svc, req("en")).await.x_cache, "MISS");
}

#[tokio::test]
async fn every_credential_header_partitions_the_key() {
    let upstream = Upstream::new();
    let layer = CachecoreLayer::builder()
        .credential_header(HeaderName::from_static("x-internal-key"))
        .build();
    let svc = stack(&layer, &upstream);
    let req = |headers: &[(&str, &str)]| {
        let mut b = Request::post("/v1/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(Bytes::from_static(b"q"))).unwrap()
    };
    for (first, second) in [
        (
            &[("cookie", "session=alice")][..],
            &[("cookie", "session=bob")][..],
        ),
        (
            &[("proxy-authorization", "Basic a")],
            &[("proxy-authorization", "Basic b")],
        ),
        (&[("x-goog-api-key", "a")], &[("x-goog-api-key", "b")]),
        (&[("x-internal-key", "a")], &[("x-internal-key", "b")]),
        // The second credential header counts too, not only the first one found.
        (
            &[("authorization", "Bearer same"), ("x-api-key", "a")],
            &[("authorization", "Bearer same"), ("x-api-key", "b")],
        ),
    ] {
        assert_eq!(send(&svc, req(first)).await.x_cache, "MISS");
        assert_eq!(send(&svc, req(first)).await.x_cache, "HIT_L1");
        let other = send(&svc, req(second)).await;
        assert_eq!(
            other.x_cache, "MISS",
            "{second:?} was served the answer of {first:?}"
        );
    }
}

#[tokio::test]
async fn a_partial_response_is_never_stored() {
    let upstream = Upstream::new().status(StatusCode::PARTIAL_CONTENT);
    let svc = stack(&CachecoreLayer::new(), &upstream);
    send(&svc, common::chat("{}")).await;
    assert_eq!(send(&svc, common::chat("{}")).await.x_cache, "MISS");
}

#[tokio::test]
async fn responses_that_forbid_reuse_are_not_stored() {
    for cc in [
        "no-cache",
        "max-age=0",
        "s-maxage=0",
        "private=\"x-user\"",
        "public, no-store",
    ] {
        let upstream = Upstream::new().header("cache-control", cc);
        let svc = stack(&CachecoreLayer::new(), &upstream);
        send(&svc, common::chat("{}")).await;
        assert_eq!(
            send(&svc, common::chat("{}")).await.x_cache,
            "MISS",
            "a response with Cache-Control: {cc} was stored"
        );
    }
}

#[tokio::test]
async fn a_request_asking_for_a_fresh_answer_refreshes_and_no_store_bypasses() {
    let upstream = Upstream::new();
    let svc = stack(&CachecoreLayer::new(), &upstream);
    let req = |cc: Option<&str>| {
        let mut b = Request::post("/v1/x");
        if let Some(cc) = cc {
            b = b.header("cache-control", cc);
        }
        b.body(Full::new(Bytes::from_static(b"q"))).unwrap()
    };
    send(&svc, req(None)).await;
    assert_eq!(send(&svc, req(None)).await.x_cache, "HIT_L1");
    for cc in ["no-cache", "max-age=0"] {
        let fresh = send(&svc, req(Some(cc))).await;
        assert_eq!(fresh.x_cache, "MISS", "{cc}");
        // The refreshed answer replaced the old one.
        assert_eq!(send(&svc, req(None)).await.body, fresh.body);
    }
    assert_eq!(send(&svc, req(Some("no-store"))).await.x_cache, "BYPASS");
}

#[tokio::test]
async fn a_stream_that_reports_an_error_event_is_not_stored() {
    for body in [
        "data: {\"choices\":[]}\n\nevent: error\ndata: {\"message\":\"overloaded\"}\n\n",
        "data: {\"choices\":[]}\n\ndata: {\"error\": {\"message\": \"overloaded\"}}\n\n",
    ] {
        let inner = tower::service_fn(move |_req: Req| async move {
            let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            res.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            Ok::<_, Infallible>(res)
        });
        let svc = tower::Layer::layer(&CachecoreLayer::new(), inner);
        for _ in 0..2 {
            let res = svc.clone().oneshot(chat()).await.unwrap();
            assert_eq!(
                res.extensions().get::<CacheStatus>(),
                Some(&CacheStatus::Miss),
                "a stream reporting an error was stored: {body:?}"
            );
            body_text(res).await;
        }
    }
    // A clean stream still is.
    let inner = tower::service_fn(|_req: Req| async {
        let mut res = Response::new(Full::new(Bytes::from_static(
            b"data: ok\n\ndata: [DONE]\n\n",
        )));
        res.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        Ok::<_, Infallible>(res)
    });
    let svc = tower::Layer::layer(&CachecoreLayer::new(), inner);
    body_text(svc.clone().oneshot(chat()).await.unwrap()).await;
    let res = svc.clone().oneshot(chat()).await.unwrap();
    assert_eq!(
        res.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Hit)
    );
}

#[tokio::test]
async fn invalidate_without_a_tenant_refuses_on_a_layer_that_resolves_tenants() {
    let layer = CachecoreLayer::builder()
        .namespace_resolver(|_| Some(Namespace::new("acme", "1")))
        .build();
    let r = layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:1"]))
        .await
        .map_or_else(InvalidationError::into_results, Invalidated::into_results);
    assert!(r[0].is_err(), "silently invalidated tenant `default`");
    assert!(r[0]
        .as_ref()
        .unwrap_err()
        .message()
        .contains("Invalidation::tenant"));
    let many = layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:1", "doc:2"]))
        .await
        .map_or_else(InvalidationError::into_results, Invalidated::into_results);
    assert!(many.iter().all(Result::is_err));
    assert!(layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:1"]).tenant("acme"))
        .await
        .is_ok());
}

#[tokio::test]
async fn an_invalid_new_hash_is_refused_and_changes_nothing() {
    let upstream = Upstream::new();
    let layer = CachecoreLayer::builder().tenant("t").build();
    let svc = stack(&layer, &upstream);
    let req = || {
        let mut req = common::chat("{}");
        req.extensions_mut()
            .insert(cachecore::RequestContext::new().dep(cachecore::Dep::new("doc:1")));
        req
    };
    send(&svc, req()).await;
    for bad in ["has space", "line\nbreak", "", &"x".repeat(300)] {
        let r = layer
            .invalidator()
            .invalidate(Invalidation::of(["doc:1"]).new_hash(bad))
            .await
            .map_or_else(InvalidationError::into_results, Invalidated::into_results);
        assert!(r[0].is_err(), "{bad:?} accepted");
    }
    assert_eq!(send(&svc, req()).await.x_cache, "HIT_L1");
    assert!(layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:1"]).new_hash("v2"))
        .await
        .is_ok());
    assert_eq!(send(&svc, req()).await.x_cache, "MISS");
}
