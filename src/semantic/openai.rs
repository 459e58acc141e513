//! An embedder that calls an OpenAI-compatible `/v1/embeddings` endpoint through any tower
//! service.

use std::fmt;
use std::future::poll_fn;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::Full;
use tower_service::Service;

use crate::edge::{read_capped, BoxError};

use super::embed::{normalize, EmbedError, EmbedFuture, Embedder};

/// The largest embeddings response read (a batch of 32 vectors of 3072 floats as JSON fits).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Embeds through an OpenAI-compatible `POST /v1/embeddings` (`{"model", "input": [...]}` in,
/// `{"data": [{"index", "embedding"}]}` out), sent through `service`: a hyper client, a
/// `tower` stack with retries, or a stand-in in tests.
///
/// Every call is bounded by the [`SemanticCache`](super::SemanticCache) timeout, and any
/// failure (an error status, a malformed answer, a dead endpoint) is a miss, never an error.
///
/// ```
/// use cachecore::semantic::OpenAiEmbedder;
/// # fn make<S>(client: S) where S: tower_service::Service<http::Request<http_body_util::Full<bytes::Bytes>>, Response = http::Response<http_body_util::Full<bytes::Bytes>>> + Clone + Send + Sync + 'static, S::Future: Send, S::Error: std::fmt::Display {
/// let embedder = OpenAiEmbedder::new(client, "http://127.0.0.1:8080/v1/embeddings".parse().unwrap(), "text-embedding-3-small")
///     .bearer_token("sk-...");
/// # }
/// ```
pub struct OpenAiEmbedder<S> {
    service: S,
    uri: Uri,
    model: String,
    authorization: Option<HeaderValue>,
    id: Arc<str>,
}

impl<S> fmt::Debug for OpenAiEmbedder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("uri", &self.uri)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl<S> OpenAiEmbedder<S> {
    /// Calls `uri` with `model` through `service`.
    pub fn new(service: S, uri: Uri, model: impl Into<String>) -> Self {
        let model = model.into();
        let id = format!("openai:{uri}:{model}").into();
        Self {
            service,
            uri,
            model,
            authorization: None,
            id,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every call.
    #[must_use]
    pub fn bearer_token(mut self, token: &str) -> Self {
        self.authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .ok()
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        self
    }
}

impl<S, B> Embedder for OpenAiEmbedder<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: fmt::Display,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn id(&self) -> &str {
        &self.id
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a> {
        Box::pin(async move {
            let body = serde_json::json!({ "model": self.model, "input": texts });
            let mut req = Request::new(Full::new(Bytes::from(body.to_string())));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = self.uri.clone();
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(auth) = &self.authorization {
                req.headers_mut()
                    .insert(header::AUTHORIZATION, auth.clone());
            }
            let mut service = self.service.clone();
            poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(|e| EmbedError::new(format!("embeddings endpoint: {e}")))?;
            let res = service
                .call(req)
                .await
                .map_err(|e| EmbedError::new(format!("embeddings endpoint: {e}")))?;
            let status = res.status();
            let bytes = read_capped(res.into_body(), MAX_RESPONSE_BYTES)
                .await
                .map_err(|e| EmbedError::new(format!("embeddings response: {e}")))?;
            if !status.is_success() {
                return Err(EmbedError::new(format!(
                    "embeddings endpoint answered {status}"
                )));
            }
            parse(&bytes, texts.len())
        })
    }
}

#[derive(serde::Deserialize)]
struct Answer {
    data: Vec<Item>,
}

#[derive(serde::Deserialize)]
struct Item {
    index: usize,
    embedding: Vec<f32>,
}

fn parse(bytes: &[u8], expected: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
    let answer: Answer = serde_json::from_slice(bytes)
        .map_err(|e| EmbedError::new(format!("embeddings response: {e}")))?;
    let mut out: Vec<Option<Vec<f32>>> = vec![None; expected];
    for item in answer.data {
        let slot = out
            .get_mut(item.index)
            .ok_or_else(|| EmbedError::new("embeddings response: index out of range"))?;
        let mut v = item.embedding;
        normalize(&mut v);
        *slot = Some(v);
    }
    let out: Vec<Vec<f32>> = out
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| EmbedError::new("embeddings response: a text has no vector"))?;
    let dims = out.first().map_or(0, Vec::len);
    if dims == 0 || out.iter().any(|v| v.len() != dims) {
        return Err(EmbedError::new(
            "embeddings response: vectors of different lengths",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_put_back_in_order_and_normalised() {
        let out = parse(
            br#"{"data":[{"index":1,"embedding":[0,2]},{"index":0,"embedding":[3,4]}]}"#,
            2,
        )
        .unwrap();
        assert_eq!(out, vec![vec![0.6, 0.8], vec![0.0, 1.0]]);
        assert!(parse(br#"{"data":[{"index":0,"embedding":[1]}]}"#, 2).is_err());
        assert!(parse(br#"{"error":"x"}"#, 1).is_err());
    }
}
