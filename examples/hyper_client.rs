//! The layer in a `tower::ServiceBuilder` in front of the hyper-util legacy client, calling an
//! OpenAI-compatible server (a local stand-in, so this runs offline).
//!
//! ```text
//! cargo run --example hyper_client
//! ```

use std::time::Instant;

use bytes::Bytes;
use cachecore::{CacheStatus, CachecoreLayer, Dep, Invalidation, RequestBody, RequestContext};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tower::{Service, ServiceBuilder, ServiceExt};

#[path = "support/openai_standin.rs"]
mod openai_standin;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The stack: cache, then the pooled hyper client. The client's request body type is the
/// layer's [`RequestBody`] around ours.
type Stack = cachecore::Cachecore<Client<HttpConnector, RequestBody<Full<Bytes>>>>;

/// What the example saw, for the test that runs it.
#[derive(Debug)]
pub struct Report {
    /// The cache status of each call, in order.
    pub statuses: Vec<CacheStatus>,
    /// Calls that reached the server.
    pub upstream_calls: usize,
}

async fn ask(
    svc: &mut Stack,
    url: &str,
    question: &str,
    ctx: Option<RequestContext>,
) -> Result<(CacheStatus, String), BoxError> {
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
    });
    let mut req = http::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-demo")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
    if let Some(ctx) = ctx {
        req.extensions_mut().insert(ctx);
    }
    let started = Instant::now();
    let res = svc.ready().await?.call(req).await?;
    let status = res
        .extensions()
        .get::<CacheStatus>()
        .copied()
        .ok_or("the cache layer marks every response")?;
    let body: Value = serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!(
        "{:>6} {:>7.1?}  {answer}",
        status.as_str(),
        started.elapsed()
    );
    Ok((status, answer))
}

/// Runs the example against a fresh stand-in server.
pub async fn run() -> Result<Report, BoxError> {
    let server = openai_standin::start().await?;
    let url = server.chat_url();
    let layer = CachecoreLayer::new();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut svc: Stack = ServiceBuilder::new().layer(layer.clone()).service(client);

    let mut statuses = Vec::new();
    // The same question twice: the second answer comes from the cache.
    for _ in 0..2 {
        statuses.push(ask(&mut svc, &url, "What is a Tower layer?", None).await?.0);
    }
    // An answer derived from a document: declare it, and invalidate when the document changes.
    let faq = || Some(RequestContext::new().dep(Dep::new("doc:faq").hash("v1")));
    for _ in 0..2 {
        statuses.push(ask(&mut svc, &url, "Summarise the FAQ", faq()).await?.0);
    }
    let result = layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:faq"]).new_hash("v2"))
        .await?;
    println!(
        "invalidated doc:faq ({} entries deleted)",
        result.entries_deleted()
    );
    statuses.push(ask(&mut svc, &url, "Summarise the FAQ", faq()).await?.0);

    Ok(Report {
        statuses,
        upstream_calls: server.calls(),
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let report = run().await?;
    println!(
        "{} calls, {} reached the server",
        report.statuses.len(),
        report.upstream_calls
    );
    Ok(())
}
