//! How many heap allocations a cache hit makes, counted by a global allocator that only this
//! test binary uses. Allocations are what a hit costs most under contention (two threads share
//! the allocator's locks), so the count is kept from creeping up.

use std::alloc::System;
use std::convert::Infallible;

use bytes::Bytes;
use cachecore::{CacheStatus, CachecoreLayer, Dep, RequestContext};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Layer, Service, ServiceExt};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations (and reallocations) made while `f` runs. The counter is process-wide: this
/// binary has one test, and its runtime runs on the test's thread.
fn count<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let region = Region::new(GLOBAL);
    let out = f();
    let stats = region.change();
    (out, stats.allocations + stats.reallocations)
}

const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"What does clause 7 say?"}],"temperature":0.2}"#;

fn request(ctx: Option<&RequestContext>) -> Request<Full<Bytes>> {
    let mut req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap();
    if let Some(ctx) = ctx {
        req.extensions_mut().insert(ctx.clone());
    }
    req
}

async fn inner<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"{\"answer\":42}")));
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(res)
}

/// Allocations of one hit through the layer on a `MemoryStore`, on a current-thread runtime
/// (everything runs on this thread, so the count is exact), request and response building
/// included; also the same for the bare service, to subtract.
fn hit_allocations(ctx: Option<RequestContext>) -> (usize, usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let layer = CachecoreLayer::builder().build();
    let svc = layer.layer(tower::service_fn(
        inner::<cachecore::RequestBody<Full<Bytes>>>,
    ));
    rt.block_on(async {
        let roundtrip = || {
            let req = request(ctx.as_ref());
            let svc = svc.clone();
            async move {
                let res = svc.oneshot(req).await.unwrap();
                let status = res.extensions().get::<CacheStatus>().copied();
                res.into_body().collect().await.unwrap();
                status
            }
        };
        // Warm up: the miss, then a few hits (lazily built internals settle).
        for _ in 0..4 {
            roundtrip().await;
        }
        let mut layered = usize::MAX;
        let mut bare = usize::MAX;
        // The least of a few runs: moka's housekeeping allocates now and then.
        for _ in 0..8 {
            let (status, n) = count(|| futures_block(roundtrip()));
            assert_eq!(status, Some(CacheStatus::Hit));
            layered = layered.min(n);
            let mut plain = tower::service_fn(inner::<Full<Bytes>>);
            let (_, n) = count(|| {
                futures_block(async {
                    let res = plain.call(request(ctx.as_ref())).await.unwrap();
                    res.into_body().collect().await.unwrap();
                })
            });
            bare = bare.min(n);
        }
        (layered, bare)
    })
}

/// Polls `fut` once on this thread: a hit never waits on anything, so it must be ready.
fn futures_block<F: std::future::Future>(fut: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(fut).poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("a hit waited on something"),
    }
}

/// Allocations a hit may make beyond the bare service: today 5 without a declared dep, 7 with
/// one (the request's future, its body pinned while read, the response's header map and the
/// `CacheStatus` extension; with a dep, its id lists). A memory hit builds no store future and
/// no engine future (`Engine::serve_now`), and `X-Cache-Age` is a made value. Two to spare for
/// other toolchain or dependency versions.
const BUDGET: usize = 9;

#[test]
fn a_memory_hit_allocates_little() {
    for (what, ctx) in [
        ("no declared dep", None),
        (
            "one declared dep",
            Some(RequestContext::new().dep(Dep::new("doc:contract-123").hash("v7"))),
        ),
    ] {
        let (layered, bare) = hit_allocations(ctx);
        println!("{what}: a hit makes {layered} allocations, the bare service {bare}");
        assert!(
            layered.saturating_sub(bare) <= BUDGET,
            "{what}: a hit makes {} allocations more than the bare service",
            layered - bare
        );
    }
}
