//! An in-house LLM client (`complete(prompt) -> String`) that builds its requests itself, with
//! the cache in its tower stack. Its callers never see a request: they declare what an answer
//! depends on, or that it must not be cached, with `cachecore::scope` around the call.
//!
//! ```text
//! cargo run --example inhouse_client
//! ```

use std::fmt;

use bytes::Bytes;
use cachecore::{scope, CachecoreLayer, Dep, Invalidation, RequestBody, RequestContext};
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tower::{Service, ServiceBuilder, ServiceExt};

#[path = "support/openai_standin.rs"]
pub mod openai_standin;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Stack = cachecore::Cachecore<Client<HttpConnector, RequestBody<Full<Bytes>>>>;

/// A typed client for an OpenAI-compatible chat completions endpoint.
#[derive(Clone, Debug)]
pub struct LlmClient {
    http: Stack,
    endpoint: Uri,
    model: String,
}

/// Why a completion failed.
#[derive(Debug)]
pub enum LlmError {
    /// The request could not be sent or the response not read.
    Transport(BoxError),
    /// The server answered with an error status.
    Status(StatusCode),
    /// The answer was not a chat completion.
    Malformed(String),
}

impl fmt::Display for LlmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "transport: {e}"),
            Self::Status(s) => write!(f, "server answered {s}"),
            Self::Malformed(why) => write!(f, "not a chat completion: {why}"),
        }
    }
}

impl std::error::Error for LlmError {}

impl LlmClient {
    /// A client for `endpoint` (a `.../v1/chat/completions` URL) and `model`, caching through
    /// `layer`.
    pub fn new(endpoint: &str, model: &str, layer: &CachecoreLayer) -> Result<Self, LlmError> {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Ok(Self {
            http: ServiceBuilder::new().layer(layer.clone()).service(client),
            endpoint: endpoint
                .parse()
                .map_err(|e| LlmError::Transport(Box::new(e)))?,
            model: model.to_owned(),
        })
    }

    /// The model's answer to `prompt`.
    pub async fn complete(&self, prompt: &str) -> Result<String, LlmError> {
        let body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
        });
        let req = http::Request::post(self.endpoint.clone())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| LlmError::Transport(Box::new(e)))?;
        // A tower service is called through `&mut`; the stack is cheap to clone (a pooled
        // client and the layer's shared engine).
        let mut http = self.http.clone();
        let res = http
            .ready()
            .await
            .map_err(|e| LlmError::Transport(Box::new(e)))?
            .call(req)
            .await
            .map_err(|e| LlmError::Transport(Box::new(e)))?;
        if !res.status().is_success() {
            return Err(LlmError::Status(res.status()));
        }
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| LlmError::Transport(Box::new(e)))?
            .to_bytes();
        let answer: Value =
            serde_json::from_slice(&bytes).map_err(|e| LlmError::Malformed(e.to_string()))?;
        answer["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| LlmError::Malformed("no choices[0].message.content".into()))
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let server = openai_standin::start().await?;
    let layer = CachecoreLayer::new();
    let llm = LlmClient::new(&server.chat_url(), "gpt-4o-mini", &layer)?;

    // Code that knows nothing about caching: identical prompts are answered once.
    for _ in 0..2 {
        println!(
            "{}",
            llm.complete("Is 'refund not received' a billing ticket?")
                .await?
        );
    }

    // The answer depends on a prompt template and a document: say so around the call.
    let ctx = RequestContext::new()
        .dep(Dep::new("prompt:ticket-classifier").hash("v3"))
        .dep(Dep::new("doc:billing-policy"));
    let classify = || llm.complete("Classify ticket 991 with the billing policy");
    println!("{}", scope(ctx.clone(), classify()).await?);
    println!("{}", scope(ctx.clone(), classify()).await?);
    // The billing policy was edited: every answer derived from it goes.
    layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:billing-policy"]))
        .await?;
    println!("{}", scope(ctx, classify()).await?);

    // Never cached, never read from the cache.
    let now = || llm.complete("What is on my calendar right now?");
    scope(RequestContext::bypass_all(), now()).await?;
    scope(RequestContext::bypass_all(), now()).await?;

    let m = layer.metrics();
    println!(
        "hits {}, misses {}, bypassed {}; the server answered {} of {} calls",
        m.hits,
        m.misses,
        m.bypasses,
        server.calls(),
        m.hits + m.misses + m.bypasses,
    );
    Ok(())
}
