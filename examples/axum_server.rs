//! The layer on one route of an axum app: `POST /v1/docs/{id}/summary` calls an expensive
//! function and is cached, with the document as a dep; `PUT /v1/docs/{id}` edits the document
//! and invalidates its summaries; `/health` never sees the cache.
//!
//! ```text
//! cargo run --example axum_server
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use cachecore::{CachecoreLayer, Dep, Invalidation, RequestContext};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the expensive function costs (an LLM call, in real life).
const EXPENSIVE: Duration = Duration::from_millis(50);

/// The app's state: the documents, the layer (to invalidate from), and a count of expensive
/// calls so you can see the cache at work.
#[derive(Clone, Debug)]
pub struct AppState {
    docs: Arc<RwLock<HashMap<u32, String>>>,
    layer: CachecoreLayer,
    /// How many times the expensive function ran.
    pub expensive_calls: Arc<AtomicUsize>,
}

impl AppState {
    /// State with one document, `1`.
    pub fn new(layer: CachecoreLayer) -> Self {
        let docs = HashMap::from([(1, "Tower layers wrap services.".to_owned())]);
        Self {
            docs: Arc::new(RwLock::new(docs)),
            layer,
            expensive_calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Runs of the expensive function so far.
    pub fn expensive_calls(&self) -> usize {
        self.expensive_calls.load(Ordering::SeqCst)
    }
}

/// The layer for the summary route: each request's dep is the document in its path.
pub fn summary_cache() -> CachecoreLayer {
    CachecoreLayer::builder()
        .context_resolver(|head| {
            let id = head
                .uri
                .path()
                .strip_prefix("/v1/docs/")
                .and_then(|rest| rest.strip_suffix("/summary"));
            Ok(id.map(|id| RequestContext::new().dep(Dep::new(format!("doc:{id}")))))
        })
        .build()
}

/// The app. Only the summary route has the cache layer (`MethodRouter::layer`).
pub fn app(state: AppState) -> Router {
    let cache = state.layer.clone();
    Router::new()
        .route("/v1/docs/{id}/summary", post(summarize).layer(cache))
        .route("/v1/docs/{id}", put(update_doc))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
}

/// The expensive part: an LLM call in real life.
async fn expensive_summary(state: &AppState, text: &str, style: &str) -> String {
    state.expensive_calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(EXPENSIVE).await;
    format!("({style}) {}", text.split('.').next().unwrap_or(text))
}

async fn summarize(
    State(state): State<AppState>,
    Path(id): Path<u32>,
    Json(req): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    let text = state
        .docs
        .read()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?
        .get(&id)
        .cloned()
        .ok_or(StatusCode::NOT_FOUND)?;
    let style = req["style"].as_str().unwrap_or("short");
    let summary = expensive_summary(&state, &text, style).await;
    Ok(Json(json!({"doc": id, "summary": summary})))
}

async fn update_doc(
    State(state): State<AppState>,
    Path(id): Path<u32>,
    text: String,
) -> StatusCode {
    match state.docs.write() {
        Ok(mut docs) => docs.insert(id, text),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR,
    };
    let result = state
        .layer
        .invalidator()
        .invalidate(Invalidation::of([format!("doc:{id}")]))
        .await;
    if result.is_ok() {
        StatusCode::NO_CONTENT
    } else {
        // The edit is in, but old summaries could still be served: say so.
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// One exchange the example made: method and path, status, `X-Cache` (if any), body.
pub type Exchange = (String, u16, Option<String>, String);

/// Serves the app on a free loopback port and calls it over HTTP; returns what it saw and the
/// number of expensive calls.
pub async fn run() -> Result<(Vec<Exchange>, usize), BoxError> {
    let state = AppState::new(summary_cache());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = app(state.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut seen = Vec::new();
    let calls: [(&str, &str, &str); 5] = [
        ("POST", "/v1/docs/1/summary", r#"{"style":"short"}"#),
        ("POST", "/v1/docs/1/summary", r#"{ "style": "short" }"#),
        ("GET", "/health", ""),
        (
            "PUT",
            "/v1/docs/1",
            "Caches must forget. Otherwise they lie.",
        ),
        ("POST", "/v1/docs/1/summary", r#"{"style":"short"}"#),
    ];
    for (method, path, body) in calls {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let res = client.request(req).await?;
        let x_cache = res
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = res.status().as_u16();
        let body = String::from_utf8(res.into_body().collect().await?.to_bytes().to_vec())?;
        println!(
            "{method:>4} {path:<20} {status} x-cache={:<7} {body}",
            x_cache.as_deref().unwrap_or("-")
        );
        seen.push((format!("{method} {path}"), status, x_cache, body));
    }
    server.abort();
    Ok((seen, state.expensive_calls()))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (seen, expensive) = run().await?;
    println!(
        "{} requests, the expensive function ran {expensive} times",
        seen.len()
    );
    Ok(())
}
