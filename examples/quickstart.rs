//! The whole story in one run, on the in-memory store:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Starts a stand-in LLM server on 127.0.0.1 (it counts calls and answers after ~300 ms), puts
//! `CachecoreLayer` in front of a hyper client, and shows a miss, a hit, an invalidation and a
//! bypass.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use cachecore::{CachecoreLayer, Dep, Invalidated, Invalidation, MemoryStore, RequestContext};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};

/// How long the stand-in model "thinks".
const MODEL_LATENCY: Duration = Duration::from_millis(300);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // A stand-in for an OpenAI-compatible API.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |body: String| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(MODEL_LATENCY).await;
                let summary = if body.contains("contract #123") {
                    "The contract renews yearly."
                } else {
                    "Order #12345 is confirmed."
                };
                (
                    [("content-type", "application/json")],
                    format!(r#"{{"id":"chatcmpl-{n}","choices":[{{"message":{{"role":"assistant","content":"{summary}"}}}}]}}"#),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The client stack: the cache layer in front of a plain hyper client.
    let cache = CachecoreLayer::builder()
        .store(MemoryStore::new())
        .default_ttl(Duration::from_secs(3600))
        .build();
    let client = ServiceBuilder::new()
        .layer(cache.clone())
        .service(Client::builder(TokioExecutor::new()).build_http());

    let ask = |prompt: &'static str, ctx: RequestContext| {
        let client = client.clone();
        async move {
            let body = format!(
                r#"{{"model":"gpt-5.4-mini","messages":[{{"role":"user","content":"{prompt}"}}]}}"#
            );
            let mut req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .header("authorization", "Bearer sk-demo")
                .body(Full::new(Bytes::from(body)))?;
            req.extensions_mut().insert(ctx);
            let started = Instant::now();
            let res = client.oneshot(req).await?;
            let status = res.headers()["x-cache"].to_str()?.to_owned();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, started.elapsed(), body))
        }
    };
    let contract = || RequestContext::new().dep(Dep::new("doc:contract-123").hash("v1"));
    let show = |step: &str, (status, took, body): &(String, Duration, Bytes)| {
        println!(
            "{step:<34} X-Cache: {status:<7} {:>7.1} ms  {}",
            took.as_secs_f64() * 1e3,
            String::from_utf8_lossy(body)
        );
    };

    let miss = ask("Summarise contract #123", contract()).await?;
    show("1. first call", &miss);
    let hit = ask("Summarise contract #123", contract()).await?;
    show("2. same call again", &hit);

    let result = cache
        .invalidator()
        .invalidate(Invalidation::of(["doc:contract-123"]).new_hash("v2"))
        .await;
    println!(
        "3. invalidate doc:contract-123      ok={} deleted={}",
        result.is_ok(),
        result.as_ref().map_or(0, Invalidated::entries_deleted)
    );
    let after = ask("Summarise contract #123", contract()).await?;
    show("4. same call after invalidation", &after);

    let bypass = ask(
        "Generate a unique confirmation for order #12345",
        RequestContext::bypass_all(),
    )
    .await?;
    show("5. bypassed call", &bypass);

    println!(
        "\nupstream calls: {} of 4 requests; the hit took {:.1} ms against {:.0} ms for the miss",
        calls.load(Ordering::SeqCst),
        hit.1.as_secs_f64() * 1e3,
        miss.1.as_secs_f64() * 1e3
    );
    assert_eq!(
        [
            miss.0.as_str(),
            hit.0.as_str(),
            after.0.as_str(),
            bypass.0.as_str()
        ],
        ["MISS", "HIT_L1", "MISS", "BYPASS"]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    Ok(())
}
