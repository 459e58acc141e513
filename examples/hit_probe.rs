//! Instruction-count probe for the hit path: `hit_probe N [bare|hit|dep|redis|redis-dep]` runs N
//! requests through the bare inner service, or N cache hits through the layer (`dep`: with one
//! declared dep; `redis*`: on a `RedisStore` at `$HIT_PROBE_REDIS`, built with `--features redis`,
//! so the count is the client's share of a Redis hit).
//! `benches/hit_instructions.sh` runs it under callgrind, here and at a baseline commit, and
//! prints instructions per request: a count that does not move with the machine's load, where
//! the criterion bench's times do.
use bytes::Bytes;
use cachecore::{CachecoreLayer, Dep, MemoryStore, RequestContext};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;
use tower::{Layer, Service, ServiceExt};

async fn inner<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from(vec![b'x'; 1024]))))
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mode = std::env::args().nth(2).unwrap_or_default();
    let dep = mode.ends_with("dep");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let layer = if mode.starts_with("redis") {
            redis_layer().await
        } else {
            CachecoreLayer::builder().store(MemoryStore::new()).build()
        };
        let mut svc = layer.layer(tower::service_fn(inner));
        let body = Bytes::from(format!(
            "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
            "q".repeat(900)
        ));
        let ctx = RequestContext::new().dep(Dep::new("doc:1"));
        for _ in 0..n {
            let mut req = Request::post("http://api.local/v1/chat/completions")
                .header("content-type", "application/json")
                .header("authorization", "Bearer sk-bench")
                .body(Full::new(body.clone()))
                .unwrap();
            if dep {
                req.extensions_mut().insert(ctx.clone());
            }
            if mode == "bare" {
                let res = inner(req).await.unwrap();
                let _ = res.into_body().collect().await.unwrap();
            } else {
                let res = svc.ready().await.unwrap().call(req).await.unwrap();
                let _ = res.into_body().collect().await.unwrap();
            }
        }
    });
}

#[cfg(feature = "redis")]
async fn redis_layer() -> CachecoreLayer {
    let url =
        std::env::var("HIT_PROBE_REDIS").expect("HIT_PROBE_REDIS: a redis:// URL on 127.0.0.1");
    let store = cachecore::RedisStore::builder()
        .url(url)
        .build()
        .await
        .expect("a reachable Redis at HIT_PROBE_REDIS");
    CachecoreLayer::builder().store(store).build()
}

#[cfg(not(feature = "redis"))]
async fn redis_layer() -> CachecoreLayer {
    panic!("the redis modes need --features redis")
}
