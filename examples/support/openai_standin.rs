//! A stand-in for an OpenAI-compatible server (`POST /v1/chat/completions`, JSON or SSE), on a
//! free loopback port, so the client examples run without a network or an API key.
//!
//! It answers deterministically (the same request gets the same answer), takes
//! [`SIMULATED_LATENCY`] per call like a model would, and counts the calls it served.
// Included as a private module by several examples, each using a different part of it.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// What every call costs: enough for a hit to be visibly faster, short enough for tests.
pub const SIMULATED_LATENCY: Duration = Duration::from_millis(30);

/// A running stand-in server.
#[derive(Debug)]
pub struct StandIn {
    /// Where it listens (always 127.0.0.1).
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl StandIn {
    /// Calls the server has answered (a cache hit never reaches it).
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The OpenAI-style API base, `http://127.0.0.1:<port>/v1`.
    pub fn api_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The chat completions endpoint.
    pub fn chat_url(&self) -> String {
        format!("{}/chat/completions", self.api_base())
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Starts a stand-in on a free port of 127.0.0.1.
pub async fn start() -> std::io::Result<StandIn> {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(Arc::clone(&calls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(StandIn {
        addr,
        calls,
        server,
    })
}

/// The answer the stand-in gives to a prompt: what a test can expect back.
pub fn answer_to(model: &str, prompt: &str) -> String {
    format!("[{model}] You asked: {prompt}")
}

async fn chat_completions(
    State(calls): State<Arc<AtomicUsize>>,
    Json(req): Json<Value>,
) -> Response {
    calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(SIMULATED_LATENCY).await;
    let model = req["model"].as_str().unwrap_or("unknown").to_owned();
    let prompt = req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let content = answer_to(&model, prompt);
    if req["stream"].as_bool() == Some(true) {
        // One chunk per word, in the chat.completion.chunk format, then [DONE].
        let mut sse = String::new();
        for word in content.split_inclusive(' ') {
            let chunk = json!({
                "id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}],
            });
            sse.push_str(&format!("data: {chunk}\n\n"));
        }
        sse.push_str("data: [DONE]\n\n");
        return ([(CONTENT_TYPE, "text/event-stream")], sse).into_response();
    }
    let words = u32::try_from(content.split(' ').count()).unwrap_or(u32::MAX);
    Json(json!({
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": words, "completion_tokens": words, "total_tokens": 2 * words},
    }))
    .into_response()
}
