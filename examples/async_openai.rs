//! `async-openai` with the cache underneath: its `Client::with_http_service` takes any tower
//! service that turns its request factory into a `reqwest::Response`, so the service here
//! sends through a reqwest-middleware client that has the cachecore middleware.
//!
//! Deps are declared with `cachecore::scope` around the API call: async-openai builds the
//! requests, so the caller never touches them.
//!
//! ```text
//! cargo run --example async_openai --features reqwest
//! ```

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use cachecore::testing::OutcomeRecorder;
use cachecore::{scope, CacheStatus, CachecoreLayer, Dep, Invalidation, RequestContext};
use reqwest_middleware::ClientWithMiddleware;

#[path = "support/openai_standin.rs"]
mod openai_standin;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the example saw, for the test that runs it.
#[derive(Debug)]
pub struct Report {
    /// The answers, in order.
    pub answers: Vec<String>,
    /// The cache status of each call, in order.
    pub statuses: Vec<CacheStatus>,
    /// Calls that reached the server.
    pub upstream_calls: usize,
}

/// An async-openai client whose HTTP goes through `http` (a reqwest-middleware client).
pub fn openai_client(
    api_base: &str,
    http: ClientWithMiddleware,
) -> async_openai::Client<OpenAIConfig> {
    let transport = tower::service_fn(move |factory: HttpRequestFactory| {
        let http = http.clone();
        async move {
            let req = factory.build().await?;
            http.execute(req)
                .await
                .map_err(|e| OpenAIError::Boxed(Box::new(e)))
        }
    });
    let config = OpenAIConfig::new()
        .with_api_base(api_base)
        .with_api_key("sk-demo");
    async_openai::Client::with_config(config).with_http_service(transport)
}

fn question(text: &str) -> Result<CreateChatCompletionRequest, OpenAIError> {
    CreateChatCompletionRequestArgs::default()
        .model("gpt-4o-mini")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(text)
            .build()?
            .into()])
        .build()
}

/// Runs the example against a fresh stand-in server.
pub async fn run() -> Result<Report, BoxError> {
    let server = openai_standin::start().await?;
    let layer = CachecoreLayer::new();
    // Outside the cache in the chain, so it sees the status the cache set.
    let outcomes = OutcomeRecorder::new();
    let http = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(outcomes.clone())
        .with(layer.reqwest_middleware())
        .build();
    let openai = openai_client(&server.api_base(), http);

    let contract = || RequestContext::new().dep(Dep::new("doc:contract-123").hash("v1"));
    let mut answers = Vec::new();
    for _ in 0..2 {
        let res = scope(
            contract(),
            openai.chat().create(question("Summarise contract 123")?),
        )
        .await?;
        answers.push(res.choices[0].message.content.clone().unwrap_or_default());
    }
    // The contract changed: its summaries go, the next call reaches the model again.
    layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:contract-123"]).new_hash("v2"))
        .await?;
    let res = scope(
        contract(),
        openai.chat().create(question("Summarise contract 123")?),
    )
    .await?;
    answers.push(res.choices[0].message.content.clone().unwrap_or_default());

    for (answer, outcome) in answers.iter().zip(outcomes.outcomes()) {
        let status = outcome.status.map_or("-", CacheStatus::as_str);
        println!("{status:>6}  {answer}");
    }
    Ok(Report {
        answers,
        statuses: outcomes.statuses(),
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
