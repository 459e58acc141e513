//! Redis dies in the middle of a steady stream of requests through the layer and comes back:
//! no client request fails at any point, and hits resume once Redis is back.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::store::redis::RedisStore;
use cachecore::CachecoreLayer;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use support::RedisServer;
use tower::{service_fn, ServiceBuilder, ServiceExt};

/// Concurrent clients in the stream.
const CLIENTS: usize = 4;
/// Distinct prompts they cycle through (so most requests can be hits).
const PROMPTS: usize = 8;
/// Pause between one client's requests.
const PACE: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Tally {
    /// `X-Cache` of the requests that started and ended in the current phase.
    by_status: BTreeMap<String, usize>,
    /// Requests that started in an earlier phase (in flight while Redis was killed or restarted):
    /// they must not fail, but their cache status belongs to neither phase.
    straddled: usize,
    failures: Vec<String>,
    max_latency: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dies_mid_stream_and_no_request_fails() {
    let mut server = RedisServer::start();
    let store = RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_millis(250))
        .build()
        .await
        .unwrap();
    let upstream_calls = Arc::new(AtomicUsize::new(0));
    let calls = Arc::clone(&upstream_calls);
    let inner = service_fn(move |req: Request<_>| {
        let calls = Arc::clone(&calls);
        async move {
            calls.fetch_add(1, Ordering::Relaxed);
            let body: Bytes = BodyExt::collect(req.into_body())
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let answer = format!("{{\"answer\":{}}}", String::from_utf8_lossy(&body));
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(answer)))
                    .unwrap(),
            )
        }
    });
    let layer = CachecoreLayer::builder()
        .store(store)
        .tenant("fault-test")
        .store_timeout(Duration::from_millis(250))
        .circuit_breaker(5, Duration::from_millis(500))
        .build();
    let svc = ServiceBuilder::new().layer(layer).service(inner);

    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // Bumped once Redis is dead and once it is back; each request remembers the phase it started in.
    let phase = Arc::new(AtomicU8::new(1));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (svc, tally, stop) = (svc.clone(), Arc::clone(&tally), Arc::clone(&stop));
        let phase = Arc::clone(&phase);
        clients.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let prompt = format!("{{\"prompt\":\"question {}\"}}", i % PROMPTS);
                i += 1;
                let req = Request::post("/v1/chat/completions")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(prompt.clone())))
                    .unwrap();
                let started = Instant::now();
                let started_in = phase.load(Ordering::SeqCst);
                let outcome = match svc.clone().oneshot(req).await {
                    Ok(res) => {
                        let status = res.status();
                        let x_cache = res
                            .headers()
                            .get("x-cache")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_owned();
                        match res.into_body().collect().await {
                            Ok(body) => {
                                let body = body.to_bytes();
                                let want = format!("{{\"answer\":{prompt}}}");
                                if status == StatusCode::OK && body == want.as_bytes() {
                                    Ok(x_cache)
                                } else {
                                    Err(format!("{status} {x_cache} {body:?}"))
                                }
                            }
                            Err(e) => Err(format!("body error: {e}")),
                        }
                    }
                    Err(e) => Err(format!("service error: {e:?}")),
                };
                let took = started.elapsed();
                {
                    let mut t = tally.lock().unwrap();
                    t.max_latency = t.max_latency.max(took);
                    match outcome {
                        Ok(_) if started_in != phase.load(Ordering::SeqCst) => t.straddled += 1,
                        Ok(x_cache) => *t.by_status.entry(x_cache).or_default() += 1,
                        Err(e) => t.failures.push(e),
                    }
                }
                tokio::time::sleep(PACE).await;
            }
        }));
    }
    let take = |tally: &Mutex<Tally>| std::mem::take(&mut *tally.lock().unwrap());

    // Phase 1: Redis up; the stream settles into hits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = take(&tally);
    println!(
        "before: {:?} max latency {:?}",
        before.by_status, before.max_latency
    );
    assert!(before.failures.is_empty(), "{:?}", before.failures);
    assert!(before.by_status.get("HIT_L1").copied().unwrap_or(0) > 0);

    // Phase 2: Redis is killed (like a crash) mid-stream.
    // Requests whose reply Redis sent before it died may still be hits; only those that start
    // after the process is gone are counted for this phase.
    server.kill();
    phase.store(2, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let during = take(&tally);
    println!(
        "during: {:?} ({} in flight at the kill) max latency {:?}",
        during.by_status, during.straddled, during.max_latency
    );
    assert!(during.failures.is_empty(), "{:?}", during.failures);
    assert!(during.by_status.values().sum::<usize>() > 0);
    assert_eq!(
        during.by_status.get("HIT_L1"),
        None,
        "Redis is down, nothing to hit"
    );

    // Phase 3: Redis is back on the same port (empty); hits resume without a new store.
    server.restart();
    phase.store(3, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = Tally::default();
    while after.by_status.get("HIT_L1").copied().unwrap_or(0) < 20 {
        assert!(
            Instant::now() < deadline,
            "hits never resumed: {:?}",
            after.by_status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = take(&tally);
        after.failures.extend(t.failures);
        after.max_latency = after.max_latency.max(t.max_latency);
        for (k, v) in t.by_status {
            *after.by_status.entry(k).or_default() += v;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let rest = take(&tally);
    println!(
        "after: {:?} max latency {:?}",
        after.by_status, after.max_latency
    );
    assert!(after.failures.is_empty(), "{:?}", after.failures);
    assert!(rest.failures.is_empty(), "{:?}", rest.failures);
    println!("upstream calls: {}", upstream_calls.load(Ordering::Relaxed));
}
