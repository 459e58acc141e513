//! Issue 2 behaviours 8 (streaming) and 9 (single-flight).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cachecore::{CachecoreLayer, MemoryStore, RequestBody};
use common::*;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, Semaphore};
use tower::ServiceExt;

type Events = mpsc::Sender<Result<Bytes, std::io::Error>>;

type SseStack = cachecore::Cachecore<
    tower::util::BoxCloneSyncService<
        Request<RequestBody<Full<Bytes>>>,
        Response<ChannelBody>,
        std::convert::Infallible,
    >,
>;

/// An upstream that answers every call with an SSE stream the test feeds by hand.
fn sse_upstream(
    layer: &CachecoreLayer,
) -> (SseStack, mpsc::UnboundedReceiver<Events>, Arc<AtomicUsize>) {
    let (streams_tx, streams_rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = tower::service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let (tx, body) = channel_body();
        streams_tx.send(tx).unwrap();
        async move {
            let res = Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .header("x-request-id", "req-1")
                .body(body)
                .unwrap();
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let inner = tower::util::BoxCloneSyncService::new(inner);
    (tower::Layer::layer(layer, inner), streams_rx, calls)
}

const EVENTS: [&str; 3] = [
    "data: {\"delta\":\"Hel\"}\n\n",
    "data: {\"delta\":\"lo\"}\n\n",
    "data: [DONE]\n\n",
];

async fn next_data<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> Option<Bytes>
where
    B::Error: std::fmt::Debug,
{
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("a frame arrives")?;
    Some(frame.unwrap().into_data().unwrap())
}

#[tokio::test]
async fn each_chunk_reaches_the_client_as_soon_as_the_inner_service_produces_it() {
    let store = MemoryStore::new();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let (svc, mut streams, calls) = sse_upstream(&layer);

    let res = svc.clone().oneshot(chat("stream please")).await.unwrap();
    assert_eq!(res.headers()["x-cache"], "MISS");
    let events = streams.recv().await.unwrap();
    let mut body = res.into_body();
    for event in EVENTS {
        events.send(Ok(Bytes::from(event))).await.unwrap();
        // The client reads this event before the upstream has produced the next one.
        assert_eq!(next_data(&mut body).await.unwrap(), event);
        assert_eq!(
            store.entry_count(),
            0,
            "nothing stored before the stream ends"
        );
    }
    drop(events);
    assert!(next_data(&mut body).await.is_none());
    assert_eq!(
        store.entry_count(),
        1,
        "stored once the stream ended cleanly"
    );

    // A hit replays the exact bytes with the original headers.
    let hit = svc.clone().oneshot(chat("stream please")).await.unwrap();
    assert_eq!(hit.headers()["x-cache"], "HIT_L1");
    assert_eq!(hit.headers()["content-type"], "text/event-stream");
    assert_eq!(hit.headers()["x-request-id"], "req-1");
    let replay = hit.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(replay, EVENTS.concat());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stream_that_errors_stores_nothing() {
    let store = MemoryStore::new();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let (svc, mut streams, calls) = sse_upstream(&layer);

    let res = svc.clone().oneshot(chat("q")).await.unwrap();
    let events = streams.recv().await.unwrap();
    let mut body = res.into_body();
    events.send(Ok(Bytes::from(EVENTS[0]))).await.unwrap();
    assert_eq!(next_data(&mut body).await.unwrap(), EVENTS[0]);
    events
        .send(Err(std::io::Error::other("upstream reset")))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap();
    assert!(err.is_err(), "the error reaches the client");
    drop(events);

    let again = svc.clone().oneshot(chat("q")).await.unwrap();
    assert_eq!(again.headers()["x-cache"], "MISS");
    assert_eq!(store.entry_count(), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_stream_the_client_drops_halfway_stores_nothing() {
    let store = MemoryStore::new();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let (svc, mut streams, calls) = sse_upstream(&layer);

    let res = svc.clone().oneshot(chat("q")).await.unwrap();
    let events = streams.recv().await.unwrap();
    let mut body = res.into_body();
    events.send(Ok(Bytes::from(EVENTS[0]))).await.unwrap();
    assert_eq!(next_data(&mut body).await.unwrap(), EVENTS[0]);
    drop(body);
    // The upstream finishes after the client is gone.
    let _ = events.send(Ok(Bytes::from(EVENTS[1]))).await;
    drop(events);
    tokio::time::sleep(Duration::from_millis(20)).await;

    assert_eq!(store.entry_count(), 0);
    let again = svc.clone().oneshot(chat("q")).await.unwrap();
    assert_eq!(again.headers()["x-cache"], "MISS");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_response_larger_than_the_recording_limit_is_forwarded_whole_and_not_stored() {
    let store = MemoryStore::new();
    let layer = CachecoreLayer::builder()
        .store(store.clone())
        .max_response_bytes(16)
        .build();
    let (svc, mut streams, _) = sse_upstream(&layer);
    let res = svc.clone().oneshot(chat("q")).await.unwrap();
    let events = streams.recv().await.unwrap();
    tokio::spawn(async move {
        for e in EVENTS {
            events.send(Ok(Bytes::from(e))).await.unwrap();
        }
    });
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, EVENTS.concat());
    assert_eq!(store.entry_count(), 0);
}

#[tokio::test]
async fn concurrent_identical_misses_call_the_inner_service_once() {
    const N: usize = 10;
    let (up, gate, mut started) = Upstream::new().gated();
    let layer = CachecoreLayer::new();
    let svc = stack(&layer, &up);
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { send(&svc, chat("same question")).await })
        })
        .collect();
    assert_eq!(started.recv().await, Some(1));
    eventually("the others join the leader", || {
        layer.metrics().coalesced == (N - 1) as u64
    })
    .await;
    gate.add_permits(1);
    let mut bodies = Vec::new();
    for t in tasks {
        let seen = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("no request is left hanging")
            .unwrap();
        assert_eq!(seen.status, StatusCode::OK);
        bodies.push(seen.body);
    }
    assert_eq!(up.calls(), 1);
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "all get the same response"
    );
}

type FlakyStack = cachecore::Cachecore<
    tower::util::BoxCloneSyncService<
        Request<RequestBody<Full<Bytes>>>,
        Response<Full<Bytes>>,
        std::io::Error,
    >,
>;

/// An upstream whose first call fails in the given way (after the gate), later calls succeed.
fn failing_first(
    layer: &CachecoreLayer,
    gate: Arc<Semaphore>,
    first: fn() -> Result<Response<Full<Bytes>>, std::io::Error>,
) -> (FlakyStack, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = tower::service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let gate = gate.clone();
        async move {
            if n == 1 {
                gate.acquire().await.unwrap().forget();
                return first();
            }
            Ok(Response::new(Full::new(Bytes::from(format!("call {n}")))))
        }
    });
    let inner = tower::util::BoxCloneSyncService::new(inner);
    (tower::Layer::layer(layer, inner), calls)
}

async fn followers_go_upstream_when_the_leader_stores_nothing(
    first: fn() -> Result<Response<Full<Bytes>>, std::io::Error>,
) {
    const N: usize = 6;
    let gate = Arc::new(Semaphore::new(0));
    let layer = CachecoreLayer::new();
    let (svc, calls) = failing_first(&layer, gate.clone(), first);
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                match svc.oneshot(chat("q")).await {
                    Ok(res) => Ok(res.into_body().collect().await.unwrap().to_bytes()),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect();
    eventually("the others join the leader", || {
        layer.metrics().coalesced == (N - 1) as u64
    })
    .await;
    gate.add_permits(1);
    let mut ok = 0;
    for t in tasks {
        let out = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("followers are not left hanging")
            .unwrap();
        if let Ok(body) = out {
            if body.starts_with(b"call ") {
                ok += 1;
            }
        }
    }
    assert_eq!(ok, N - 1, "every follower got its own answer");
    assert_eq!(calls.load(Ordering::SeqCst), N);
}

#[tokio::test]
async fn followers_go_upstream_when_the_leader_response_is_not_cacheable() {
    followers_go_upstream_when_the_leader_stores_nothing(|| {
        let mut res = Response::new(Full::new(Bytes::from("overloaded")));
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok(res)
    })
    .await;
}

#[tokio::test]
async fn followers_go_upstream_when_the_leader_fails() {
    followers_go_upstream_when_the_leader_stores_nothing(|| {
        Err(std::io::Error::other("connection reset"))
    })
    .await;
}

/// A store that invalidates `doc:1` right after each successful write, as a webhook racing the
/// write would.
#[derive(Clone)]
struct InvalidateAfterPut(MemoryStore);

impl cachecore::CacheStore for InvalidateAfterPut {
    fn lookup<'a>(
        &'a self,
        key: &'a cachecore::CacheKey,
        deps: &'a [&'a str],
    ) -> cachecore::store::StoreFuture<'a, cachecore::Lookup> {
        self.0.lookup(key, deps)
    }
    fn put<'a>(
        &'a self,
        key: &'a cachecore::CacheKey,
        entry: cachecore::Entry,
    ) -> cachecore::store::StoreFuture<'a, cachecore::PutOutcome> {
        Box::pin(async move {
            let out = self.0.put(key, entry).await?;
            self.0.invalidate(key.tenant(), "doc:1", "v2").await?;
            Ok(out)
        })
    }
    fn invalidate<'a>(
        &'a self,
        tenant: &'a str,
        dep_id: &'a str,
        new_hash: &'a str,
    ) -> cachecore::store::StoreFuture<'a, cachecore::DepInvalidated> {
        self.0.invalidate(tenant, dep_id, new_hash)
    }
}

#[tokio::test]
async fn followers_never_get_an_answer_invalidated_after_the_leader_stored_it() {
    let (up, gate, mut started) = Upstream::new().gated();
    let layer = CachecoreLayer::builder()
        .store(InvalidateAfterPut(MemoryStore::new()))
        .build();
    let svc = stack(&layer, &up);
    let req = || {
        let mut req = chat("summarise doc 1");
        req.extensions_mut()
            .insert(cachecore::RequestContext::with_deps([cachecore::Dep::new(
                "doc:1",
            )]));
        req
    };
    let leader = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, req()).await }
    });
    assert_eq!(started.recv().await, Some(1));
    let follower = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, req()).await }
    });
    eventually("the follower joins", || layer.metrics().coalesced == 1).await;
    gate.add_permits(2);
    assert!(leader.await.unwrap().text().starts_with("call 1"));
    let seen = follower.await.unwrap();
    assert!(
        seen.text().starts_with("call 2"),
        "the follower went upstream instead of serving the invalidated answer: {}",
        seen.text()
    );
}
