//! Issue 2 behaviours 1-3, 6, 7 and 10: hits, keys, bypass/refresh, admission, body limits,
//! failing stores.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::Invalidation;
use cachecore::{CacheStatus, CachecoreLayer, MemoryStore, RequestContext};
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

fn layer() -> CachecoreLayer {
    CachecoreLayer::builder().store(MemoryStore::new()).build()
}

const BODY: &str = r#"{"model":"gpt-5.4-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Summarise contract #123"}],"temperature":0.2,"stream":false}"#;

#[tokio::test]
async fn repeated_identical_request_is_served_from_the_cache() {
    let up = Upstream::new().header("x-request-id", "abc");
    let layer = layer();
    let svc = stack(&layer, &up);

    let first = send(&svc, chat(BODY)).await;
    assert_eq!(first.x_cache, "MISS");
    assert!(first.headers.get("x-cache-age").is_none());

    let second = send(&svc, chat(BODY)).await;
    assert_eq!(second.x_cache, "HIT_L1");
    assert_eq!(up.calls(), 1, "the inner service is called once");
    assert_eq!(second.status, first.status);
    assert_eq!(second.body, first.body);
    assert!(second.headers.get("x-cache-age").is_some());
    for name in ["content-type", "x-request-id", "x-upstream-call"] {
        assert_eq!(second.headers.get(name), first.headers.get(name), "{name}");
    }

    // A third, after the entry is surely in the store: a plain store hit.
    let third = send(&svc, chat(BODY)).await;
    assert_eq!(third.x_cache, "HIT_L1");
    assert_eq!(third.headers["x-cache-age"], "0");
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn the_cache_status_is_in_the_response_extensions() {
    let up = Upstream::new();
    let svc = stack(&layer(), &up);
    for expected in [CacheStatus::Miss, CacheStatus::Hit] {
        let res = svc.clone().oneshot(chat(BODY)).await.unwrap();
        assert_eq!(res.extensions().get::<CacheStatus>(), Some(&expected));
        res.into_body().collect().await.unwrap();
    }
}

#[tokio::test]
async fn json_key_order_and_white_space_do_not_change_the_key() {
    let up = Upstream::new();
    let svc = stack(&layer(), &up);
    send(
        &svc,
        chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#),
    )
    .await;
    let reordered = send(
        &svc,
        chat("{\n  \"temperature\": 0,\n  \"messages\": [ {\"content\": \"hi\", \"role\": \"user\"} ],\n  \"model\": \"m\"\n}"),
    )
    .await;
    assert_eq!(reordered.x_cache, "HIT_L1");
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn any_other_body_change_changes_the_key() {
    let base = serde_json::json!({
        "model": "gpt-5.4-mini",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "top_p": 1,
        "stream": false,
        "tools": [{"type": "function", "function": {"name": "lookup"}}],
    });
    let variants: Vec<(&str, serde_json::Value)> = vec![
        ("model", serde_json::json!("gpt-5.4")),
        ("temperature", serde_json::json!(0.7)),
        ("top_p", serde_json::json!(0.9)),
        ("stream", serde_json::json!(true)),
        (
            "tools",
            serde_json::json!([{"type": "function", "function": {"name": "search"}}]),
        ),
        (
            "messages",
            serde_json::json!([{"role": "system", "content": "Be thorough."}, {"role": "user", "content": "hi"}]),
        ),
        (
            "response_format",
            serde_json::json!({"type": "json_object"}),
        ),
    ];
    let up = Upstream::new();
    let svc = stack(&layer(), &up);
    assert_eq!(send(&svc, chat(&base.to_string())).await.x_cache, "MISS");
    for (i, (field, value)) in variants.into_iter().enumerate() {
        let mut body = base.clone();
        body[field] = value;
        let seen = send(&svc, chat(&body.to_string())).await;
        assert_eq!(seen.x_cache, "MISS", "changing {field} must change the key");
        assert_eq!(up.calls(), i + 2);
    }
}

#[tokio::test]
async fn method_path_and_query_are_part_of_the_key() {
    let up = Upstream::new();
    let svc = stack(&layer(), &up);
    let get = |uri: &str| Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    send(&svc, get("/v1/models?page=1")).await;
    assert_eq!(send(&svc, get("/v1/models?page=1")).await.x_cache, "HIT_L1");
    assert_eq!(send(&svc, get("/v1/models?page=2")).await.x_cache, "MISS");
    assert_eq!(send(&svc, get("/v1/other?page=1")).await.x_cache, "MISS");
    send(&svc, post("/v1/models?page=1", "")).await;
    assert_eq!(up.calls(), 4, "POST is not GET");
}

#[tokio::test]
async fn two_tenants_never_share_an_entry() {
    let up = Upstream::new();
    let svc = stack(&layer(), &up);
    let with_key = |key: &str| {
        let mut req = chat(BODY);
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        req
    };
    assert_eq!(send(&svc, with_key("sk-alice")).await.x_cache, "MISS");
    assert_eq!(send(&svc, with_key("sk-alice")).await.x_cache, "HIT_L1");
    let bob = send(&svc, with_key("sk-bob")).await;
    assert_eq!(bob.x_cache, "MISS", "another API key is another tenant");
    assert_eq!(
        send(&svc, chat(BODY)).await.x_cache,
        "MISS",
        "no credentials: own tenant"
    );
    assert_eq!(up.calls(), 3);
}

#[tokio::test]
async fn a_fixed_tenant_shares_entries_across_credentials() {
    let up = Upstream::new();
    let layer = CachecoreLayer::builder().tenant("acme").build();
    let svc = stack(&layer, &up);
    let with_key = |key: &str| {
        let mut req = chat(BODY);
        req.headers_mut()
            .insert("authorization", key.parse().unwrap());
        req
    };
    send(&svc, with_key("a")).await;
    assert_eq!(send(&svc, with_key("b")).await.x_cache, "HIT_L1");
}

#[tokio::test]
async fn bypass_calls_the_inner_service_every_time_and_writes_nothing() {
    let up = Upstream::new();
    let store = MemoryStore::new();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let svc = stack(&layer, &up);
    for _ in 0..3 {
        let mut req = chat(BODY);
        req.extensions_mut().insert(RequestContext::bypass_all());
        assert_eq!(send(&svc, req).await.x_cache, "BYPASS");
    }
    assert_eq!(up.calls(), 3);
    assert_eq!(store.entry_count(), 0, "nothing written");
    // Nothing read either: a normal request afterwards is a miss.
    assert_eq!(send(&svc, chat(BODY)).await.x_cache, "MISS");
    // And a bypass after an entry exists still goes upstream.
    let mut req = chat(BODY);
    req.extensions_mut().insert(RequestContext::bypass_all());
    assert_eq!(send(&svc, req).await.x_cache, "BYPASS");
    assert_eq!(up.calls(), 5);
}

#[tokio::test]
async fn bypass_from_a_task_local_scope() {
    let up = Upstream::new();
    let svc = stack(&layer(), &up);
    for _ in 0..2 {
        let seen = cachecore::scope(RequestContext::bypass_all(), send(&svc, chat(BODY))).await;
        assert_eq!(seen.x_cache, "BYPASS");
    }
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn refresh_skips_the_read_and_replaces_the_entry() {
    let up = Upstream::new();
    let svc = stack(&layer(), &up);
    let first = send(&svc, chat(BODY)).await;
    assert!(first.text().starts_with("call 1"));

    let mut req = chat(BODY);
    req.extensions_mut().insert(RequestContext::new().refresh());
    let refreshed = send(&svc, req).await;
    assert_eq!(refreshed.x_cache, "MISS");
    assert!(refreshed.text().starts_with("call 2"));

    let hit = send(&svc, chat(BODY)).await;
    assert_eq!(hit.x_cache, "HIT_L1");
    assert!(
        hit.text().starts_with("call 2"),
        "the fresh response replaced the entry"
    );
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn only_2xx_responses_are_stored() {
    for status in [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::NOT_FOUND,
        StatusCode::MOVED_PERMANENTLY,
    ] {
        let up = Upstream::new().status(status);
        let svc = stack(&layer(), &up);
        assert_eq!(send(&svc, chat(BODY)).await.status, status);
        let again = send(&svc, chat(BODY)).await;
        assert_eq!(again.x_cache, "MISS", "{status} must not be replayed");
        assert_eq!(up.calls(), 2);
    }
}

#[tokio::test]
async fn a_no_store_response_is_not_stored() {
    for cc in ["no-store", "private, max-age=60", "max-age=0, No-Store"] {
        let up = Upstream::new().header("cache-control", cc);
        let svc = stack(&layer(), &up);
        send(&svc, chat(BODY)).await;
        assert_eq!(send(&svc, chat(BODY)).await.x_cache, "MISS", "{cc}");
        assert_eq!(up.calls(), 2);
    }
}

#[tokio::test]
async fn an_oversized_request_body_is_forwarded_intact_and_not_cached() {
    let up = Upstream::new();
    let layer = CachecoreLayer::builder().max_body_bytes(1024).build();
    let svc = stack(&layer, &up);
    let big: String = (0..5000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();

    // Known length: decided from Content-Length, nothing buffered.
    let mut req = post("/v1/chat/completions", &big);
    req.headers_mut()
        .insert("content-length", big.len().to_string().parse().unwrap());
    let seen = send(&svc, req).await;
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(seen.x_cache, "BYPASS");
    assert!(
        seen.text().ends_with(&big),
        "the body reached upstream whole"
    );

    // Unknown length (streamed in chunks): read up to the limit, then replayed + the rest.
    for _ in 0..2 {
        let (tx, body) = channel_body();
        let chunks: Vec<Bytes> = big
            .as_bytes()
            .chunks(700)
            .map(Bytes::copy_from_slice)
            .collect();
        tokio::spawn(async move {
            for c in chunks {
                tx.send(Ok(c)).await.unwrap();
            }
        });
        let req = Request::post("/v1/chat/completions").body(body).unwrap();
        let res = stack_any(&layer, &up).oneshot(req).await.unwrap();
        assert_eq!(res.headers()["x-cache"], "BYPASS");
        let text = res.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&text).ends_with(&big));
    }
    assert_eq!(up.calls(), 3, "never cached");
}

/// The layer around an upstream that takes any request body.
fn stack_any(
    layer: &CachecoreLayer,
    upstream: &Upstream,
) -> cachecore::Cachecore<
    tower::util::BoxCloneSyncService<
        Request<cachecore::RequestBody<ChannelBody>>,
        Res,
        std::convert::Infallible,
    >,
> {
    let up = upstream.clone();
    let inner = tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |req: Request<cachecore::RequestBody<ChannelBody>>| up.clone().handle(req),
    ));
    tower::Layer::layer(layer, inner)
}

#[tokio::test]
async fn bodies_of_requests_that_are_not_cached_are_not_buffered() {
    // A PUT streams through: the upstream reads the first chunk before the caller has sent
    // the second.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let inner = tower::service_fn(move |req: Request<cachecore::RequestBody<ChannelBody>>| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    seen_tx.send(data).unwrap();
                }
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("ok"))))
        }
    });
    let svc = tower::Layer::layer(&layer(), inner);
    let (tx, body) = channel_body();
    let req = Request::put("/v1/files/1").body(body).unwrap();
    let call = tokio::spawn(svc.oneshot(req));
    tx.send(Ok(Bytes::from("first"))).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await
        .expect("upstream saw the first chunk while the body was still open");
    assert_eq!(got.unwrap(), "first");
    tx.send(Ok(Bytes::from("second"))).await.unwrap();
    drop(tx);
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.headers()["x-cache"], "BYPASS");
    assert_eq!(seen_rx.recv().await.unwrap(), "second");
}

#[tokio::test]
async fn a_store_that_always_errors_never_fails_a_request() {
    let up = Upstream::new();
    let store = FailingStore::default();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let svc = stack(&layer, &up);
    for i in 1..=10 {
        let seen = send(&svc, chat(BODY)).await;
        assert_eq!(seen.status, StatusCode::OK);
        assert!(seen.text().starts_with(&format!("call {i}")));
    }
    let m = layer.metrics();
    assert!(m.store_errors >= 5, "{m:?}");
    assert!(m.store_skipped > 0, "the breaker opened: {m:?}");
    let r = layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:1"]))
        .await
        .unwrap_err();
    assert!(
        r.results().iter().all(Result::is_err),
        "a failed invalidation is reported: {r:?}"
    );
}

#[tokio::test]
async fn a_store_that_answers_at_once_is_asked_once_per_request_and_never_asynchronously() {
    // `lookup_now` answers hits and misses alike: `lookup` is never needed, and a miss is not
    // looked up a second time on its way upstream.
    let up = Upstream::new();
    let store = AtOnceStore::answering();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let svc = stack(&layer, &up);
    let first = send(&svc, chat(BODY)).await;
    assert_eq!(first.x_cache, "MISS");
    eventually("the entry is stored", || layer.metrics().stored == 1).await;
    for _ in 0..3 {
        let hit = send(&svc, chat(BODY)).await;
        assert_eq!(hit.x_cache, "HIT_L1");
        assert_eq!(hit.body, first.body);
    }
    assert_eq!(up.calls(), 1);
    assert_eq!((store.now_calls(), store.later_calls()), (4, 0));
    // A refresh reads the store's current epochs the ordinary way, then replaces the entry.
    let mut req = chat(BODY);
    req.extensions_mut().insert(RequestContext::new().refresh());
    let refreshed = send(&svc, req).await;
    assert_eq!(refreshed.x_cache, "MISS");
    assert_eq!((store.now_calls(), store.later_calls()), (4, 1));

    // A store that cannot answer at once is asked through `lookup`, once per request.
    let up = Upstream::new();
    let store = AtOnceStore::default();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let svc = stack(&layer, &up);
    assert_eq!(send(&svc, chat(BODY)).await.x_cache, "MISS");
    eventually("the entry is stored", || layer.metrics().stored == 1).await;
    assert_eq!(send(&svc, chat(BODY)).await.x_cache, "HIT_L1");
    assert_eq!((store.now_calls(), store.later_calls()), (0, 2));
}

#[tokio::test]
async fn errors_answered_at_once_open_the_breaker_like_any_other() {
    let up = Upstream::new();
    let store = AtOnceStore::answering();
    store
        .fail_now
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let layer = CachecoreLayer::builder()
        .store(store.clone())
        .circuit_breaker(3, Duration::from_secs(60))
        .build();
    let svc = stack(&layer, &up);
    for i in 1..=5 {
        let seen = send(&svc, chat(BODY)).await;
        assert_eq!(seen.status, StatusCode::OK, "fails open");
        assert_eq!(seen.x_cache, "MISS");
        assert!(seen.text().starts_with(&format!("call {i}")));
    }
    let m = layer.metrics();
    assert_eq!(m.store_errors, 3, "{m:?}");
    // Open, the breaker skips the store: neither lookup is made, and the skip is counted.
    assert_eq!((store.now_calls(), store.later_calls()), (3, 0));
    assert_eq!(m.store_skipped, 2, "{m:?}");
}

#[tokio::test]
async fn a_store_that_never_answers_costs_at_most_the_store_timeout() {
    let up = Upstream::new();
    let timeout = Duration::from_millis(50);
    let layer = CachecoreLayer::builder()
        .store(SilentStore::default())
        .store_timeout(timeout)
        .build();
    let svc = stack(&layer, &up);
    for i in 1..=3 {
        let started = Instant::now();
        let seen = send(&svc, chat(BODY)).await;
        let took = started.elapsed();
        assert_eq!(seen.status, StatusCode::OK);
        assert!(seen.text().starts_with(&format!("call {i}")));
        // The upstream answers at once; the lookup may wait at most one timeout. The put runs
        // after the response and never delays it.
        assert!(took < timeout * 10, "took {took:?}");
    }
    assert!(layer.metrics().store_errors >= 3);
}

#[tokio::test]
async fn vary_headers_are_part_of_the_key() {
    let up = Upstream::new();
    let layer = CachecoreLayer::builder()
        .vary_header(http::header::ACCEPT_LANGUAGE)
        .build();
    let svc = stack(&layer, &up);
    let lang = |l: &str| {
        let mut req = chat(BODY);
        req.headers_mut()
            .insert("accept-language", l.parse().unwrap());
        req
    };
    send(&svc, lang("en")).await;
    assert_eq!(send(&svc, lang("en")).await.x_cache, "HIT_L1");
    assert_eq!(send(&svc, lang("de")).await.x_cache, "MISS");
}

#[tokio::test]
async fn ignored_json_fields_do_not_change_the_key() {
    let up = Upstream::new();
    let layer = CachecoreLayer::builder().ignore_json_field("user").build();
    let svc = stack(&layer, &up);
    send(&svc, chat(r#"{"model":"m","user":"u1"}"#)).await;
    assert_eq!(
        send(&svc, chat(r#"{"model":"m","user":"u2"}"#))
            .await
            .x_cache,
        "HIT_L1"
    );
    assert_eq!(
        send(&svc, chat(r#"{"model":"m2","user":"u1"}"#))
            .await
            .x_cache,
        "MISS"
    );
}

#[tokio::test]
async fn with_canonical_json_off_the_raw_bytes_are_the_key() {
    let up = Upstream::new();
    let layer = CachecoreLayer::builder().canonical_json(false).build();
    let svc = stack(&layer, &up);
    send(&svc, chat(r#"{"a":1,"b":2}"#)).await;
    assert_eq!(send(&svc, chat(r#"{"a":1,"b":2}"#)).await.x_cache, "HIT_L1");
    assert_eq!(send(&svc, chat(r#"{"b":2,"a":1}"#)).await.x_cache, "MISS");
}

#[tokio::test]
async fn the_key_memo_never_serves_one_tenant_anothers_entry() {
    // Byte-identical bodies from two API keys: the memoised digest must not cross partitions.
    let up = Upstream::new();
    let svc = stack(&layer(), &up);
    let as_key = |k: &str| {
        let mut req = chat(BODY);
        req.headers_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
        req
    };
    for _ in 0..3 {
        for k in ["sk-a", "sk-b"] {
            send(&svc, as_key(k)).await;
        }
    }
    assert_eq!(
        up.calls(),
        2,
        "one upstream call per API key, however often repeated"
    );
    assert!(send(&svc, as_key("sk-a"))
        .await
        .text()
        .starts_with("call 1"));
    assert!(send(&svc, as_key("sk-b"))
        .await
        .text()
        .starts_with("call 2"));
}

#[tokio::test]
async fn a_client_that_stops_reading_at_the_declared_length_finds_the_entry_cached() {
    // An HTTP/1 client reads a `Content-Length` body up to its length and never polls for its
    // end; the next request, on another connection, must still find the entry.
    let up = Upstream::new();
    let layer = layer();
    let svc = stack(&layer, &up);
    let res = svc.clone().oneshot(chat(BODY)).await.unwrap();
    let mut body = res.into_body();
    let len = http_body::Body::size_hint(&body)
        .exact()
        .expect("a length the client knows");
    let mut read = 0;
    while read < len {
        let frame = body.frame().await.expect("a frame").unwrap();
        read += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    // The first body is still held, unpolled past its last bytes.
    let second = send(&svc, chat(BODY)).await;
    assert_eq!(second.x_cache, "HIT_L1");
    assert_eq!(up.calls(), 1);
    drop(body);
}
