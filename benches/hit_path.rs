//! A cache hit through the layer against the same inner service without it.
//!
//! ```text
//! cargo bench --bench hit_path
//! ```
//!
//! Both sides run in one process on one current-thread runtime, so the difference is the
//! layer's own cost: body buffering, canonical-JSON keying, the store lookup with its epoch
//! check, and building the response from the entry.

use std::convert::Infallible;
use std::hint::black_box;

use bytes::Bytes;
use cachecore::{CachecoreLayer, Dep, MemoryStore, RequestContext};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};

/// A chat-completions request body of about `size` bytes.
fn chat_body(size: usize) -> Bytes {
    let filler = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ";
    let mut content = String::new();
    while content.len() + 200 < size {
        content.push_str(filler);
    }
    let body = serde_json::json!({
        "model": "gpt-5.4-mini",
        "messages": [
            {"role": "system", "content": "You are a careful contract analyst."},
            {"role": "user", "content": content},
        ],
        "temperature": 0.2,
        "max_tokens": 256,
        "stream": false,
    });
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

/// The answer the inner service gives: 1 KiB of JSON.
fn answer() -> Bytes {
    let text = "x".repeat(900);
    Bytes::from(format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}}}}]}}"#
    ))
}

async fn inner<B: Body>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(answer()));
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(res)
}

fn request(body: &Bytes, ctx: Option<&RequestContext>) -> Request<Full<Bytes>> {
    let mut req = Request::post("http://api.local/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(Full::new(body.clone()))
        .unwrap();
    if let Some(ctx) = ctx {
        req.extensions_mut().insert(ctx.clone());
    }
    req
}

async fn roundtrip<S, B>(svc: &mut S, body: &Bytes, ctx: Option<&RequestContext>) -> Bytes
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(request(body, ctx))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap().to_bytes()
}

fn hit_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("hit_path");
    for size in [1024usize, 16 * 1024] {
        let body = chat_body(size);
        group.throughput(Throughput::Elements(1));

        let bare = tower::service_fn(inner::<Full<Bytes>>);
        group.bench_with_input(BenchmarkId::new("bare_service", size), &body, |b, body| {
            b.to_async(&rt)
                .iter(|| async { black_box(roundtrip(&mut bare.clone(), body, None).await) })
        });

        // The same hit with no declared dep (the policy dep is still checked), and with one.
        let one_dep = RequestContext::new().dep(Dep::new("doc:contract-123").hash("v1"));
        for (name, ctx) in [("layer_hit", None), ("layer_hit_1dep", Some(&one_dep))] {
            let layer = CachecoreLayer::builder().store(MemoryStore::new()).build();
            let cached = layer.layer(tower::service_fn(
                inner::<cachecore::RequestBody<Full<Bytes>>>,
            ));
            rt.block_on(async {
                let mut warm = cached.clone();
                roundtrip(&mut warm, &body, ctx).await;
                roundtrip(&mut warm, &body, ctx).await;
            });
            assert_eq!(layer.metrics().hits, 1, "the benchmark measures hits");
            group.bench_with_input(BenchmarkId::new(name, size), &body, |b, body| {
                b.to_async(&rt)
                    .iter(|| async { black_box(roundtrip(&mut cached.clone(), body, ctx).await) })
            });
            assert_eq!(layer.metrics().misses, 1, "every measured call was a hit");
        }
    }
    group.finish();
}

criterion_group!(benches, hit_path);
criterion_main!(benches);
