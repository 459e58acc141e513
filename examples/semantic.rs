//! L2 in one run: a paraphrase answered from the cache (`HIT_L2`), then missed once the data
//! behind the answer is invalidated.
//!
//! ```text
//! scripts/fetch-semantic-assets            # the test model, all-MiniLM-L6-v2, into target/assets/
//! cargo run --features semantic --example semantic [MODEL_DIR]
//! ```
//!
//! Starts a stand-in LLM server on 127.0.0.1 and puts `CachecoreLayer` with L2 in front of a
//! hyper client. Production would load bge-small-en-v1.5 the same way (a sentence-transformers
//! directory).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use cachecore::semantic::{LocalEmbedder, SemanticCache};
use cachecore::{CachecoreLayer, Dep, Invalidation, MemoryStore, RequestContext};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let model_dir = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/assets/all-MiniLM-L6-v2"),
        PathBuf::from,
    );
    if !model_dir.join("model.safetensors").exists() {
        eprintln!(
            "no model in {}: run scripts/fetch-semantic-assets, or pass a sentence-transformers directory",
            model_dir.display()
        );
        std::process::exit(2);
    }

    // A stand-in for an OpenAI-compatible API.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                (
                    [("content-type", "application/json")],
                    format!(r#"{{"id":"chatcmpl-{n}","choices":[{{"message":{{"role":"assistant","content":"Your order ships on Monday."}}}}]}}"#),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    // L2 with the local model; the test model is less sharp than bge-small-en-v1.5, so the
    // self-hosted threshold.
    let embedder = LocalEmbedder::load(&model_dir)?;
    let cache = CachecoreLayer::builder()
        .store(MemoryStore::new())
        .semantic(SemanticCache::new(embedder).threshold(0.87))
        .build();
    let client = ServiceBuilder::new()
        .layer(cache.clone())
        .service(Client::builder(TokioExecutor::new()).build_http());

    let ask = |question: &'static str| {
        let client = client.clone();
        async move {
            // Greedy decoding: L2 leaves sampled requests alone unless told otherwise.
            let body = serde_json::json!({
                "model": "gpt-5.4-mini",
                "temperature": 0,
                "messages": [{"role": "user", "content": question}],
            });
            let mut req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))?;
            req.extensions_mut()
                .insert(RequestContext::new().dep(Dep::new("order:48213")));
            let res = client.oneshot(req).await?;
            let status = res.headers()["x-cache"].to_str()?.to_owned();
            let similarity = res
                .headers()
                .get("x-cache-similarity")
                .map(|v| v.to_str().unwrap_or("").to_owned());
            res.into_body().collect().await?;
            println!(
                "{question:<48} X-Cache: {status:<7} similarity: {}",
                similarity.as_deref().unwrap_or("-")
            );
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
        }
    };

    let first = ask("When will my order ship?").await?;
    let paraphrase = ask("When is my order going to be shipped?").await?;
    let result = cache
        .invalidator()
        .invalidate(Invalidation::of(["order:48213"]))
        .await;
    println!("invalidate order:48213: ok={}", result.is_ok());
    let after = ask("When is my order going to be shipped?").await?;
    println!("upstream calls: {}", calls.load(Ordering::SeqCst));
    assert_eq!(
        [first.as_str(), paraphrase.as_str(), after.as_str()],
        ["MISS", "HIT_L2", "MISS"]
    );
    Ok(())
}
