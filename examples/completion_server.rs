//! A bare hyper server that reads the request body and answers one fixed chat completion.
//!
//! `benches/gateway.sh` measures it next to the gateway: it is the ceiling (the same request,
//! the same response bytes, no cache, no authentication), and the gateway's upstream (the one
//! miss that fills the cache comes from here).
//!
//! ```text
//! cargo run --release --example completion_server -- 127.0.0.1:0    # prints the address it bound
//! ```
//!
//! Plain hyper as a user would write it: the tokio multi-threaded runtime with its default
//! worker count, HTTP/1.1 with keep-alive, `TCP_NODELAY`.

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;

/// The answer: an OpenAI chat completion of about 1.2 KB.
fn completion() -> Bytes {
    let content = "The contract renews automatically each January unless either party gives \
                   ninety days' written notice. Fees rise by the published index, capped at \
                   four percent a year. Termination for cause needs thirty days to cure. "
        .repeat(4);
    let body = serde_json::json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_767_225_600u64,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content.trim_end(), "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 132, "completion_tokens": 196, "total_tokens": 328},
        "system_fingerprint": "fp_bench"
    });
    Bytes::from(body.to_string())
}

async fn answer(req: Request<Incoming>, body: Bytes) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the request whole, as the gateway must to key it.
    let _ = req.into_body().collect().await;
    let mut res = Response::new(Full::new(body));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", listener.local_addr()?)?;
    out.flush()?;
    let body = completion();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, body.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
