//! A bare hyper server that reads the request body and answers one fixed chat completion: the
//! ceiling `benches/gateway.sh` measures the gateway against, and the gateway's upstream there.
//!
//! Plain hyper as a user would write it: HTTP/1.1 with keep-alive, `TCP_NODELAY`, one task per
//! connection on whatever runtime runs it.

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;

/// The answer: an OpenAI chat completion of 1194 bytes.
pub(crate) fn completion() -> Bytes {
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

/// Serves the completion on every connection `listener` accepts, for ever.
pub(crate) async fn serve(listener: tokio::net::TcpListener) {
    let body = completion();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
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
