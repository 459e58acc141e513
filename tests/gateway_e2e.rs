//! End to end through the gateway (`cachecore::gateway`, served by `cachecore::gateway::serve`
//! as the `cachecore-gateway` binary serves it) against a stand-in OpenAI-compatible upstream,
//! all on 127.0.0.1: the six recipes of the hosted product's "Invalidation Patterns" one by
//! one, tenant isolation, every bad input of the invalidation API, streaming, graceful
//! shutdown, the limits towards the upstream and the metrics exposition.
#![cfg(all(feature = "gateway", feature = "jwt"))]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use cachecore::auth::jwt::{Claims, JwtAuth};
use cachecore::client::CachecoreClient;
use cachecore::gateway::{serve, Gateway, ServeOptions, ServeReport};
use cachecore::metrics::QueueMetrics;
use cachecore::wire::encode_deps;
use cachecore::{CachecoreBuilder, CachecoreLayer, Dep, Invalidation};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

const SECRET: &str = "gateway-e2e-secret-0123456789abcdef";

// The stand-in upstream.

/// A body fed by a channel: each message is one frame, sent when it arrives.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    /// The second SSE event waits for a permit.
    sse_gate: Arc<Semaphore>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            calls: Arc::default(),
            seen: Arc::default(),
            sse_gate: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Upstream {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn last_headers(&self) -> HeaderMap {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

async fn chat(
    State(up): State<Upstream>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let n = up.calls.fetch_add(1, Ordering::SeqCst) + 1;
    up.seen.lock().unwrap().push(headers);
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(ms) = req["delay_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if req["stream"] == true {
        let (tx, rx) = mpsc::channel(4);
        let gate = Arc::clone(&up.sse_gate);
        tokio::spawn(async move {
            let event = |text: &str| {
                Bytes::from(format!("data: {}\n\n", json!({"call": n, "delta": text})))
            };
            tx.send(event("Hel")).await.unwrap();
            gate.acquire().await.unwrap().forget();
            tx.send(event("lo")).await.unwrap();
            tx.send(Bytes::from_static(b"data: [DONE]\n\n"))
                .await
                .unwrap();
        });
        return (
            [("content-type", "text/event-stream")],
            axum::body::Body::new(ChannelBody(rx)),
        )
            .into_response();
    }
    axum::Json(json!({
        "id": format!("chatcmpl-{n}"),
        "call": n,
        "choices": [{"message": {"role": "assistant", "content": format!("answer {n}")}}],
        "echo": req,
    }))
    .into_response()
}

async fn start_upstream() -> (Upstream, SocketAddr) {
    let up = Upstream::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/responses", post(chat))
        .route("/v1/threads/{thread}/messages", post(chat))
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"data": [{"id": "m"}]})) }),
        )
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (up, addr)
}

// The gateway and its callers.

struct Env {
    up: Upstream,
    gateway: Gateway,
    addr: SocketAddr,
    http: Client<HttpConnector, Full<Bytes>>,
    jwt: JwtAuth,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<ServeReport>>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn x_cache(&self) -> &str {
        self.headers
            .get("x-cache")
            .map_or("-", |v| v.to_str().unwrap())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// Which upstream call produced this answer.
    fn call(&self) -> u64 {
        self.json()["call"].as_u64().unwrap()
    }
}

impl Env {
    async fn start() -> Self {
        Self::with(CachecoreLayer::builder(), |b| b).await
    }

    /// The default gateway, served with a request-head timeout of `timeout`.
    async fn with_head_timeout(timeout: Duration) -> Self {
        Self::serving(
            CachecoreLayer::builder(),
            |b| b,
            ServeOptions::default().header_read_timeout(timeout),
        )
        .await
    }

    async fn with(
        cache: CachecoreBuilder,
        configure: impl FnOnce(cachecore::gateway::GatewayBuilder) -> cachecore::gateway::GatewayBuilder,
    ) -> Self {
        Self::serving(cache, configure, ServeOptions::default()).await
    }

    /// The gateway served by [`serve`], as the binary serves it, until [`Env::shutdown`].
    async fn serving(
        cache: CachecoreBuilder,
        configure: impl FnOnce(cachecore::gateway::GatewayBuilder) -> cachecore::gateway::GatewayBuilder,
        options: ServeOptions,
    ) -> Self {
        let (up, up_addr) = start_upstream().await;
        let jwt = JwtAuth::new(SECRET).unwrap();
        let gateway =
            configure(Gateway::builder(format!("http://{up_addr}"), jwt.clone()).cache(cache))
                .build()
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, gateway.clone(), options, async move {
            let _ = stopped.await;
        }));
        Self {
            up,
            gateway,
            addr,
            http: Client::builder(TokioExecutor::new()).build_http(),
            jwt,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Sends the shutdown signal; the handle completes when the server has stopped.
    fn shutdown(&mut self) -> tokio::task::JoinHandle<ServeReport> {
        let _ = self.stop.take().expect("shut down once").send(());
        self.server.take().unwrap()
    }

    /// The `/metrics` text.
    async fn metrics(&self) -> String {
        let res = self.send(Method::GET, "/metrics", &[], "").await;
        String::from_utf8(res.body.to_vec()).unwrap()
    }

    /// A tenant token as the hosted product hands it out: `cc_live_<id>.<jwt>`.
    fn token(&self, tenant: &str, policy_version: &str) -> String {
        let jwt = self
            .jwt
            .mint(&Claims::new(tenant, Duration::from_secs(3600)).policy_version(policy_version));
        format!("cc_live_{tenant}.{jwt}")
    }

    fn client(&self, token: &str) -> CachecoreClient {
        CachecoreClient::new(format!("http://{}", self.addr), token).unwrap()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .http
            .request(
                req.body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// A chat completion through the gateway, as the Python SDK sends it: the token in
    /// `Authorization`, the deps in `X-CacheCore-Deps`.
    async fn chat(&self, token: Option<&str>, deps: &[Dep], prompt: &str) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let deps = (!deps.is_empty()).then(|| encode_deps(deps));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a));
        }
        if let Some(d) = &deps {
            headers.push(("x-cachecore-deps", d));
        }
        let body =
            json!({"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": prompt}]});
        self.send(
            Method::POST,
            "/v1/chat/completions",
            &headers,
            &body.to_string(),
        )
        .await
    }

    /// `curl -X POST <gw>/v1/invalidate -H "Authorization: Bearer <token>" -d '<body>'`,
    /// header for header.
    async fn curl_invalidate(&self, token: &str, body: &str) -> Reply {
        let auth = format!("Bearer {token}");
        self.send(
            Method::POST,
            "/v1/invalidate",
            &[
                ("user-agent", "curl/8.5.0"),
                ("accept", "*/*"),
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            body,
        )
        .await
    }
}

// The six recipes.

#[tokio::test]
async fn recipe_1_database_webhook() {
    let env = Env::start().await;
    let token = env.token("acme", "v1");
    let deps = [Dep::new("doc:contract-123").hash("v1")];

    let first = env
        .chat(Some(&token), &deps, "Summarise contract #123")
        .await;
    assert_eq!((first.status, first.x_cache()), (StatusCode::OK, "MISS"));
    assert_eq!(first.headers["x-cache-similarity"], "0.00");
    let hit = env
        .chat(Some(&token), &deps, "Summarise contract #123")
        .await;
    assert_eq!(hit.x_cache(), "HIT_L1");
    assert_eq!(hit.headers["x-cache-similarity"], "1.00");
    assert!(hit.headers.contains_key("x-cache-age"));
    assert_eq!(hit.call(), first.call());

    // The document was updated: the webhook handler invalidates it.
    let result = env
        .client(&token)
        .invalidate(Invalidation::of(["doc:contract-123"]).new_hash("v2"))
        .await
        .unwrap();
    let result = &result.deps()[0];
    assert_eq!(
        (result.dep_id.as_str(), result.deleted),
        ("doc:contract-123", 1)
    );

    let after = env
        .chat(Some(&token), &deps, "Summarise contract #123")
        .await;
    assert_eq!(after.x_cache(), "MISS");
    assert_eq!(env.up.calls(), 2);
}

#[tokio::test]
async fn recipe_2_batch_table_invalidation() {
    let env = Env::start().await;
    let token = env.token("acme", "v1");
    let products = [Dep::new("table:products")];
    let prices = [Dep::new("table:prices")];
    let users = [Dep::new("table:users")];
    for deps in [&products, &prices, &users] {
        assert_eq!(
            env.chat(Some(&token), deps, "report").await.x_cache(),
            "MISS"
        );
        assert_eq!(
            env.chat(Some(&token), deps, "report").await.x_cache(),
            "HIT_L1"
        );
    }

    let results = env
        .client(&token)
        .invalidate(
            Invalidation::of(["table:products", "table:prices"]).new_hash("batch-2026-11-23"),
        )
        .await;
    let results = results.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        results
            .deps()
            .iter()
            .map(|r| (r.dep_id.as_str(), r.deleted))
            .collect::<Vec<_>>(),
        [("table:products", 1), ("table:prices", 1)]
    );

    assert_eq!(
        env.chat(Some(&token), &products, "report").await.x_cache(),
        "MISS"
    );
    assert_eq!(
        env.chat(Some(&token), &prices, "report").await.x_cache(),
        "MISS"
    );
    assert_eq!(
        env.chat(Some(&token), &users, "report").await.x_cache(),
        "HIT_L1"
    );
}

#[tokio::test]
async fn recipe_3_version_pinned_deps() {
    let env = Env::start().await;
    let token = env.token("acme", "v1");
    let v3 = [Dep::new("classifier-prompt").hash("v3")];
    let v4 = [Dep::new("classifier-prompt").hash("v4")];
    assert_eq!(
        env.chat(Some(&token), &v3, "classify: refund")
            .await
            .x_cache(),
        "MISS"
    );
    assert_eq!(
        env.chat(Some(&token), &v3, "classify: refund")
            .await
            .x_cache(),
        "HIT_L1"
    );
    // Callers pinning another version never share the entry.
    assert_eq!(
        env.chat(Some(&token), &v4, "classify: refund")
            .await
            .x_cache(),
        "MISS"
    );

    // After updating the prompt.
    let r = env
        .client(&token)
        .invalidate(Invalidation::of(["classifier-prompt"]).new_hash("v4"))
        .await
        .unwrap();
    assert_eq!(
        r.entries_deleted(),
        2,
        "every entry of the dep, whatever version it pinned"
    );
    assert_eq!(
        env.chat(Some(&token), &v3, "classify: refund")
            .await
            .x_cache(),
        "MISS"
    );
    assert_eq!(
        env.chat(Some(&token), &v4, "classify: refund")
            .await
            .x_cache(),
        "MISS"
    );
    assert_eq!(
        env.chat(Some(&token), &v4, "classify: refund")
            .await
            .x_cache(),
        "HIT_L1"
    );
}

#[tokio::test]
async fn recipe_4_policy_version_rollout_with_curl() {
    let env = Env::start().await;
    let old = env.token("acme", "v1");
    let docs = [Dep::new("doc:1")];
    let first = env.chat(Some(&old), &docs, "hello").await;
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(
        env.chat(Some(&old), &[], "no deps at all").await.x_cache(),
        "MISS"
    );
    assert_eq!(
        env.chat(Some(&old), &docs, "hello").await.x_cache(),
        "HIT_L1"
    );
    assert_eq!(
        env.chat(Some(&old), &[], "no deps at all").await.x_cache(),
        "HIT_L1"
    );

    // The recipe, verbatim: no content type beyond curl's default.
    let res = env
        .curl_invalidate(&old, r#"{"dep_id": "cc:policy-version", "new_hash": "v2"}"#)
        .await;
    assert_eq!(res.status, StatusCode::OK, "{:?}", res.body);
    assert_eq!(
        res.json(),
        json!({"ok": true, "dep_id": "cc:policy-version", "keys_deleted": 2})
    );

    // Every entry of the tenant is retired, tagged or not.
    assert_eq!(env.chat(Some(&old), &docs, "hello").await.x_cache(), "MISS");
    assert_eq!(
        env.chat(Some(&old), &[], "no deps at all").await.x_cache(),
        "MISS"
    );

    // New JWTs with policy_version v2 are a different namespace; old tokens still work.
    let new = env.token("acme", "v2");
    assert_eq!(env.chat(Some(&new), &docs, "hello").await.x_cache(), "MISS");
    assert_eq!(
        env.chat(Some(&new), &docs, "hello").await.x_cache(),
        "HIT_L1"
    );
    assert_eq!(
        env.chat(Some(&old), &docs, "hello").await.x_cache(),
        "HIT_L1"
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_5_event_driven_queue() {
    use cachecore::queue::{InvalidationEvent, InvalidationQueue, QueueWorker};
    use cachecore::RedisStore;

    let redis = support::shared_redis().url();
    let store = RedisStore::connect(&redis).await.unwrap();
    let env = Env::with(CachecoreLayer::builder().store(store), |b| b).await;
    let tenant = support::unique("tenant");
    let token = env.token(&tenant, "v1");
    let deps = [Dep::new("doc:contract-7").hash("3")];
    assert_eq!(
        env.chat(Some(&token), &deps, "summarise").await.x_cache(),
        "MISS"
    );
    assert_eq!(
        env.chat(Some(&token), &deps, "summarise").await.x_cache(),
        "HIT_L1"
    );

    // The worker applies events through the gateway's cache.
    let stream = support::unique("invalidations");
    let worker = QueueWorker::builder(&redis)
        .stream(&stream)
        .group(support::unique("gateways"))
        .block(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(env.gateway.cache().clone(), async move {
        let _ = stopped.await;
    }));

    // The producer (an ORM save hook) publishes and returns at once.
    let queue = InvalidationQueue::connect(&redis)
        .await
        .unwrap()
        .stream(&stream);
    queue
        .publish(&InvalidationEvent::new(&tenant, "doc:contract-7").new_hash("4"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while env.gateway.cache().metrics().invalidations == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never applied the event"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        env.chat(Some(&token), &deps, "summarise").await.x_cache(),
        "MISS"
    );

    stop.send(()).unwrap();
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.applied, 1);
}

#[tokio::test]
async fn recipe_6_bypass() {
    let env = Env::start().await;
    let token = env.token("acme", "v1");
    let auth = format!("Bearer {token}");
    let body = json!({"model": "gpt-5.4-mini", "messages": [{"role": "user",
        "content": "Generate a unique confirmation for order #12345"}]})
    .to_string();
    for n in 1..=2 {
        let res = env
            .send(
                Method::POST,
                "/v1/chat/completions",
                &[
                    ("authorization", &auth),
                    ("x-cachecore-bypass", "1"),
                    ("content-type", "application/json"),
                ],
                &body,
            )
            .await;
        assert_eq!(res.x_cache(), "BYPASS");
        assert_eq!(res.headers["x-cache-similarity"], "0.00");
        assert_eq!(res.call(), n);
    }
    // No credentials at all: bypass too.
    let res = env.chat(None, &[], "Generate a unique confirmation").await;
    assert_eq!(res.x_cache(), "BYPASS");
    assert!(!res.headers.contains_key("x-cache-error"));
    assert_eq!(env.up.calls(), 3);
    assert_eq!(env.gateway.cache().metrics().bypasses, 3);
}

// Tenants, bad input, headers, streaming.

#[tokio::test]
async fn tenant_isolation() {
    let env = Env::start().await;
    let a = env.token("tenant-a", "v1");
    let b = env.token("tenant-b", "v1");
    let deps = [Dep::new("doc:1")];

    // Identical requests: B is not served A's entry.
    let a1 = env.chat(Some(&a), &deps, "same prompt").await;
    let b1 = env.chat(Some(&b), &deps, "same prompt").await;
    assert_eq!((a1.x_cache(), b1.x_cache()), ("MISS", "MISS"));
    assert_ne!(a1.call(), b1.call());
    let a2 = env.chat(Some(&a), &deps, "same prompt").await;
    let b2 = env.chat(Some(&b), &deps, "same prompt").await;
    assert_eq!((a2.call(), b2.call()), (a1.call(), b1.call()));

    // A's token invalidates A's dep only.
    let r = env
        .client(&a)
        .invalidate(Invalidation::of(["doc:1"]))
        .await
        .unwrap();
    assert_eq!(r.entries_deleted(), 1);
    assert_eq!(
        env.chat(Some(&b), &deps, "same prompt").await.x_cache(),
        "HIT_L1"
    );
    assert_eq!(
        env.chat(Some(&a), &deps, "same prompt").await.x_cache(),
        "MISS"
    );

    // A token claiming B's tenant but not signed with the secret is refused.
    let forged = JwtAuth::new("not-the-gateway-secret-0123456789")
        .unwrap()
        .mint(&Claims::new("tenant-b", Duration::from_secs(60)));
    let res = env.curl_invalidate(&forged, r#"{"dep_id": "doc:1"}"#).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let res = env.chat(Some(&forged), &deps, "same prompt").await;
    assert_eq!(res.x_cache(), "BYPASS");
    assert!(res.headers["x-cache-error"]
        .to_str()
        .unwrap()
        .contains("signature"));
    assert_eq!(
        env.chat(Some(&b), &deps, "same prompt").await.x_cache(),
        "HIT_L1"
    );
}

/// Method, headers, body, expected status, expected error code.
type BadCase<'a> = (
    Method,
    Vec<(&'a str, &'a str)>,
    String,
    StatusCode,
    &'static str,
);

#[tokio::test]
async fn every_bad_invalidation_gets_its_status_and_error_and_changes_nothing() {
    let env = Env::start().await;
    let token = env.token("acme", "v1");
    let deps = [Dep::new("doc:1")];
    assert_eq!(env.chat(Some(&token), &deps, "q").await.x_cache(), "MISS");

    let auth = format!("Bearer {token}");
    let expired = format!(
        "Bearer {}",
        env.jwt
            .mint(&Claims::new("acme", Duration::ZERO).expires_at(1_000))
    );
    let json = ("content-type", "application/json");
    let long = "x".repeat(513);
    let big_batch =
        json!({"dep_ids": (0..1001).map(|i| format!("d{i}")).collect::<Vec<_>>()}).to_string();
    let huge = json!({"dep_id": "doc:1", "pad": "x".repeat(70 * 1024)}).to_string();
    let cases: Vec<BadCase<'_>> = vec![
        (
            Method::POST,
            vec![("authorization", &auth), json],
            r#"{"dep_id": "#.into(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), json],
            r#"{"dep_id": 42}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), json],
            r#"{"dep_ids": "doc:1"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            vec![json],
            r#"{"dep_id": "doc:1"}"#.into(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Method::POST,
            vec![("authorization", &expired), json],
            r#"{"dep_id": "doc:1"}"#.into(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Method::POST,
            vec![("authorization", "Bearer cc_live_x.not.a.jwt"), json],
            r#"{"dep_id": "doc:1"}"#.into(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Method::GET,
            vec![("authorization", &auth)],
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::DELETE,
            vec![("authorization", &auth), json],
            r#"{"dep_id": "doc:1"}"#.into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), json],
            huge,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), ("content-type", "text/plain")],
            r#"{"dep_id": "doc:1"}"#.into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), json],
            r#"{"dep_id": ""}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dep_id",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), json],
            json!({"dep_id": long}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dep_id",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), json],
            r#"{"dep_id": "doc:1\u0000"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dep_id",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), json],
            big_batch,
            StatusCode::UNPROCESSABLE_ENTITY,
            "batch_too_large",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), json],
            r#"{"dep_ids": []}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_batch",
        ),
        (
            Method::POST,
            vec![("authorization", &auth), json],
            r#"{"dep_ids": ["doc:1", "bad\n"]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dep_id",
        ),
    ];
    for (method, headers, body, status, code) in cases {
        let res = env
            .send(method.clone(), "/v1/invalidate", &headers, &body)
            .await;
        assert_eq!(res.status, status, "{method} {body:.60}: {:?}", res.body);
        assert_eq!(res.headers["content-type"], "application/json");
        let err = res.json();
        assert_eq!(err["error"]["code"], code, "{err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(res.headers["allow"], "POST");
        }
    }
    assert_eq!(env.gateway.cache().metrics().invalidations, 0);
    assert_eq!(env.chat(Some(&token), &deps, "q").await.x_cache(), "HIT_L1");
}

#[tokio::test]
async fn a_malformed_deps_header_bypasses_with_the_reason() {
    let env = Env::start().await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    for _ in 0..2 {
        let res = env
            .send(
                Method::POST,
                "/v1/chat/completions",
                &[
                    ("authorization", &auth),
                    ("x-cachecore-deps", "not base64!"),
                    ("content-type", "application/json"),
                ],
                "{}",
            )
            .await;
        assert_eq!(res.status, StatusCode::OK);
        assert_eq!(res.x_cache(), "BYPASS");
        let why = res.headers["x-cache-error"].to_str().unwrap();
        assert!(why.contains("X-CacheCore-Deps"), "{why}");
    }
    assert_eq!(env.up.calls(), 2);
}

#[tokio::test]
async fn streaming_through_the_gateway_arrives_incrementally_and_is_cached_whole() {
    let env = Env::start().await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let req = || {
        Request::post(format!("http://{}/v1/chat/completions", env.addr))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap()
    };

    let res = env.http.request(req()).await.unwrap();
    assert_eq!(res.headers()["x-cache"], "MISS");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut stream = res.into_body();
    // The first event arrives while the upstream still holds back the second.
    let first = tokio::time::timeout(Duration::from_secs(5), stream.frame())
        .await
        .expect("first event before the stream ends")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    assert!(String::from_utf8_lossy(&first).contains("Hel"));
    env.up.sse_gate.add_permits(1);
    let rest = stream.collect().await.unwrap().to_bytes();
    let whole = [first, rest].concat();
    assert!(whole.ends_with(b"data: [DONE]\n\n"));

    let again = env.http.request(req()).await.unwrap();
    assert_eq!(again.headers()["x-cache"], "HIT_L1");
    assert_eq!(again.into_body().collect().await.unwrap().to_bytes(), whole);
    assert_eq!(env.up.calls(), 1);
}

#[tokio::test]
async fn cachecore_headers_and_tenant_keys_never_reach_the_upstream() {
    let env = Env::start().await;
    let token = env.token("acme", "v1");
    // The hosted-product style: the tenant key in Authorization. It stays at the gateway.
    env.chat(Some(&token), &[Dep::new("doc:1")], "x").await;
    let seen = env.up.last_headers();
    for name in ["authorization", "x-cachecore-token", "x-cachecore-deps"] {
        assert!(!seen.contains_key(name), "{name} forwarded: {seen:?}");
    }
    // The caller's own provider key in Authorization, the tenant token in X-CacheCore-Token.
    let jwt = token.split_once('.').unwrap().1;
    env.send(
        Method::POST,
        "/v1/chat/completions",
        &[
            ("authorization", "Bearer sk-provider-key"),
            ("x-cachecore-token", jwt),
            ("content-type", "application/json"),
        ],
        "{}",
    )
    .await;
    let seen = env.up.last_headers();
    assert_eq!(seen["authorization"], "Bearer sk-provider-key");
    assert!(!seen.contains_key("x-cachecore-token"));
}

#[tokio::test]
async fn an_upstream_key_replaces_the_callers_authorization() {
    let env = Env::with(CachecoreLayer::builder(), |b| {
        b.upstream_authorization(HeaderValue::from_static("Bearer sk-gateway-key"))
    })
    .await;
    let token = env.token("acme", "v1");
    let jwt = token.split_once('.').unwrap().1;
    let res = env.chat(Some(jwt), &[], "x").await;
    assert_eq!(res.x_cache(), "MISS");
    assert_eq!(
        env.up.last_headers()["authorization"],
        "Bearer sk-gateway-key"
    );
}

#[tokio::test]
async fn a_bare_tenant_jwt_never_reaches_the_upstream() {
    let env = Env::start().await;
    let token = env.token("acme", "v1");
    let jwt = token.split_once('.').unwrap().1;
    // The signature segment identifies the credential in whatever form it travels.
    let signature = jwt.rsplit_once('.').unwrap().1;
    let leaked = |seen: &HeaderMap| {
        seen.iter()
            .find(|(_, v)| v.to_str().is_ok_and(|v| v.contains(signature)))
            .map(|(name, _)| name.clone())
    };

    // Documented as accepted: the JWT alone in Authorization, no `cc_live_` prefix.
    let res = env.chat(Some(jwt), &[], "bare").await;
    assert_eq!(res.x_cache(), "MISS");
    let seen = env.up.last_headers();
    assert_eq!(leaked(&seen), None, "tenant token forwarded: {seen:?}");
    assert!(!seen.contains_key("authorization"), "{seen:?}");

    // Every accepted form, with the caller's provider key in a header of its own: the key
    // goes on, the tenant credential stays.
    let bare = format!("Bearer {jwt}");
    let prefixed = format!("Bearer {token}");
    let forms: [&[(&str, &str)]; 4] = [
        &[("authorization", &bare)],
        &[("authorization", &prefixed)],
        &[("x-cachecore-token", jwt)],
        // The same token in both places.
        &[("x-cachecore-token", &bare), ("authorization", &bare)],
    ];
    for (i, form) in forms.into_iter().enumerate() {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("x-api-key", "sk-ant-provider-key"),
        ];
        headers.extend_from_slice(form);
        let res = env
            .send(
                Method::POST,
                "/v1/chat/completions",
                &headers,
                &json!({"form": i}).to_string(),
            )
            .await;
        assert_eq!(
            (res.status, res.x_cache()),
            (StatusCode::OK, "MISS"),
            "{form:?}"
        );
        let seen = env.up.last_headers();
        assert_eq!(leaked(&seen), None, "{form:?} forwarded: {seen:?}");
        assert_eq!(seen["x-api-key"], "sk-ant-provider-key", "{form:?}");
    }

    // A rejected tenant token is still a tenant token.
    let expired = env
        .jwt
        .mint(&Claims::new("acme", Duration::ZERO).expires_at(1_000));
    let res = env.chat(Some(&expired), &[], "expired").await;
    assert_eq!(res.x_cache(), "BYPASS");
    assert!(!env.up.last_headers().contains_key("authorization"));
}

#[tokio::test]
async fn non_idempotent_endpoints_are_never_cached() {
    let env = Env::start().await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    let body = json!({"role": "user", "content": "add this to the thread"}).to_string();
    let mut calls = Vec::new();
    for _ in 0..2 {
        let res = env
            .send(
                Method::POST,
                "/v1/threads/t/messages",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                &body,
            )
            .await;
        assert_eq!((res.status, res.x_cache()), (StatusCode::OK, "BYPASS"));
        calls.push(res.call());
    }
    // Two messages created, not one replayed.
    assert_eq!(calls, [1, 2]);
    assert_eq!(env.gateway.cache().metrics().stored, 0);
}

#[tokio::test]
async fn responses_that_the_provider_stores_are_never_cached() {
    let env = Env::start().await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    let respond = |body: Value| {
        let auth = &auth;
        let env = &env;
        async move {
            env.send(
                Method::POST,
                "/v1/responses",
                &[
                    ("authorization", auth),
                    ("content-type", "application/json"),
                ],
                &body.to_string(),
            )
            .await
            .x_cache()
            .to_owned()
        }
    };
    // The Responses API stores by default: no `store` field is `store: true`.
    for body in [
        json!({"model": "m", "input": "hi"}),
        json!({"model": "m", "input": "hi", "store": true}),
        json!({"model": "m", "input": "hi", "store": null}),
    ] {
        assert_eq!(respond(body.clone()).await, "BYPASS", "{body}");
        assert_eq!(respond(body.clone()).await, "BYPASS", "{body}");
    }
    let unstored = json!({"model": "m", "input": "hi", "store": false});
    assert_eq!(respond(unstored.clone()).await, "MISS");
    assert_eq!(respond(unstored).await, "HIT_L1");
    assert_eq!(env.up.calls(), 7);
}

#[tokio::test]
async fn chat_completions_that_ask_to_be_stored_are_never_cached() {
    let env = Env::start().await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let stored = json!({"model": "m", "messages": [], "store": true}).to_string();
    for _ in 0..2 {
        let res = env
            .send(Method::POST, "/v1/chat/completions", &headers, &stored)
            .await;
        assert_eq!(res.x_cache(), "BYPASS");
    }
    // Chat completions are not stored unless asked: `store: false` and no field both cache.
    let escaped = r#"{"model": "m", "messages": [], "st\u006fre": true}"#;
    assert_eq!(
        env.send(Method::POST, "/v1/chat/completions", &headers, escaped)
            .await
            .x_cache(),
        "BYPASS",
        "an escaped key is the same key"
    );
    for body in [
        json!({"model": "m", "messages": [], "store": false}),
        json!({"model": "m", "messages": []}),
    ] {
        let body = body.to_string();
        let first = env
            .send(Method::POST, "/v1/chat/completions", &headers, &body)
            .await;
        let second = env
            .send(Method::POST, "/v1/chat/completions", &headers, &body)
            .await;
        assert_eq!((first.x_cache(), second.x_cache()), ("MISS", "HIT_L1"));
    }
}

#[tokio::test]
async fn bodies_read_for_the_store_check_reach_the_upstream_intact() {
    let env = Env::with(CachecoreLayer::builder().max_body_bytes(256), |b| b).await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    let chunked: Client<HttpConnector, ChannelBody> =
        Client::builder(TokioExecutor::new()).build_http();
    // Sent in pieces (chunked, no Content-Length): `store` split across frames still counts.
    let send_in_pieces = |pieces: Vec<&'static str>| {
        let (tx, rx) = mpsc::channel(pieces.len());
        for p in pieces {
            tx.try_send(Bytes::from_static(p.as_bytes())).unwrap();
        }
        drop(tx);
        let req = Request::post(format!("http://{}/v1/chat/completions", env.addr))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(ChannelBody(rx))
            .unwrap();
        let fut = chunked.request(req);
        async move {
            let res = fut.await.unwrap();
            let x_cache = res.headers()["x-cache"].to_str().unwrap().to_owned();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let echo = serde_json::from_slice::<Value>(&body).unwrap()["echo"].clone();
            (x_cache, echo)
        }
    };
    let stored = vec![r#"{"model": "m", "#, r#""sto"#, r#"re": tr"#, r#"ue}"#];
    let (x_cache, echo) = send_in_pieces(stored.clone()).await;
    assert_eq!(x_cache, "BYPASS");
    assert_eq!(echo, json!({"model": "m", "store": true}));
    let plain = vec![r#"{"model": "m", "#, r#""messages": []}"#];
    assert_eq!(send_in_pieces(plain.clone()).await.0, "MISS");
    let (x_cache, echo) = send_in_pieces(plain).await;
    assert_eq!(x_cache, "HIT_L1");
    assert_eq!(echo, json!({"model": "m", "messages": []}));

    // Past the cache's body limit the gateway stops reading: the whole body still goes on.
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let res = env
        .send(
            Method::POST,
            "/v1/chat/completions",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            &big.to_string(),
        )
        .await;
    assert_eq!((res.status, res.x_cache()), (StatusCode::OK, "BYPASS"));
    assert_eq!(res.json()["echo"], big);
}

#[tokio::test]
async fn the_cacheable_paths_are_configurable() {
    let env = Env::with(CachecoreLayer::builder(), |b| {
        b.cacheable_paths(["GET /v1/models", "POST /v1/threads/*"])
    })
    .await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let models = || env.send(Method::GET, "/v1/models", &headers, "");
    assert_eq!(models().await.x_cache(), "MISS");
    assert_eq!(models().await.x_cache(), "HIT_L1");
    let thread = || env.send(Method::POST, "/v1/threads/t/messages", &headers, "{}");
    assert_eq!(thread().await.x_cache(), "MISS");
    assert_eq!(thread().await.x_cache(), "HIT_L1");
    // Chat completions are no longer in the list.
    let chat = || env.send(Method::POST, "/v1/chat/completions", &headers, "{}");
    assert_eq!(chat().await.x_cache(), "BYPASS");
    assert_eq!(chat().await.x_cache(), "BYPASS");

    for bad in ["v1/no-slash", "POST /v1/a /v1/b", "/v1/*/messages"] {
        let e = Gateway::builder("http://127.0.0.1:9", JwtAuth::new(SECRET).unwrap())
            .cacheable_paths([bad])
            .build()
            .unwrap_err();
        assert!(e.to_string().contains(bad), "{bad}: {e}");
    }
}

#[tokio::test]
async fn every_path_is_forwarded() {
    let env = Env::start().await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    // Paths outside the cacheable list reach the upstream every time, marked as bypasses.
    for _ in 0..2 {
        let res = env
            .send(Method::GET, "/v1/models", &[("authorization", &auth)], "")
            .await;
        assert_eq!((res.status, res.x_cache()), (StatusCode::OK, "BYPASS"));
        assert_eq!(res.json()["data"][0]["id"], "m");
    }
    let res = env
        .send(
            Method::GET,
            "/v1/nothing-here",
            &[("authorization", &auth)],
            "",
        )
        .await;
    assert_eq!(
        (res.status, res.x_cache()),
        (StatusCode::NOT_FOUND, "BYPASS")
    );
    assert_eq!(env.gateway.cache().metrics().stored, 0);
}

#[tokio::test]
async fn health_and_metrics() {
    let env = Env::start().await;
    let res = env.send(Method::GET, "/health", &[], "").await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.json(), json!({"status": "ok"}));

    let token = env.token("acme", "v1");
    env.chat(Some(&token), &[], "q").await;
    env.chat(Some(&token), &[], "q").await;
    env.chat(None, &[], "q").await;
    env.client(&token)
        .invalidate(Invalidation::of(["doc:1"]))
        .await
        .unwrap();
    let res = env.send(Method::GET, "/metrics", &[], "").await;
    assert_eq!(res.status, StatusCode::OK);
    assert!(res.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(res.body.to_vec()).unwrap();
    for line in [
        r#"cachecore_requests_total{status="HIT_L1"} 1"#,
        r#"cachecore_requests_total{status="MISS"} 1"#,
        r#"cachecore_requests_total{status="BYPASS"} 1"#,
        "cachecore_invalidations_total 1",
        "# TYPE cachecore_gateway_requests_total counter",
    ] {
        assert!(
            text.lines().any(|l| l == line || l.starts_with(line)),
            "{line} missing from\n{text}"
        );
    }
}

// A gateway's responses say what the cache did in `X-Cache` only: the `CacheStatus` extension,
// made and dropped on every request for nothing once the response is on the wire, is left off
// (module docs of `cachecore::gateway`), also when the gateway is called in process.
#[tokio::test]
async fn gateway_responses_carry_x_cache_and_no_status_extension() {
    use cachecore::testing::CacheStatusOf;
    use cachecore::CacheStatus;
    use tower::ServiceExt;
    let env = Env::start().await;
    let token = env.token("acme", "v1");
    let request = || {
        Request::post("/v1/chat/completions")
            .header("x-cachecore-token", &token)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"m","messages":[]}"#,
            )))
            .unwrap()
    };
    for expected in [CacheStatus::Miss, CacheStatus::Hit] {
        let res = env.gateway.clone().oneshot(request()).await.unwrap();
        assert_eq!(res.headers()["x-cache"], expected.as_str());
        assert_eq!(res.extensions().get::<CacheStatus>(), None);
        assert_eq!(res.cache_status(), Some(expected));
        res.into_body().collect().await.unwrap();
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_never_cached() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gateway = Gateway::builder(format!("http://{dead}"), JwtAuth::new(SECRET).unwrap())
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        gateway.clone(),
        ServeOptions::default(),
        std::future::pending(),
    ));
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let token = JwtAuth::new(SECRET)
        .unwrap()
        .mint(&Claims::new("acme", Duration::from_secs(60)));
    for _ in 0..2 {
        let res = http
            .request(
                Request::post(format!("http://{addr}/v1/chat/completions"))
                    .header("authorization", format!("Bearer {token}"))
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        let body: Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["error"]["code"], "upstream_unavailable");
    }
    assert_eq!(gateway.cache().metrics().stored, 0);
    assert!(gateway
        .prometheus()
        .contains(r#"cachecore_gateway_upstream_errors_total{reason="unreachable"} 2"#));
}

#[test]
fn https_upstreams_need_a_connector() {
    let e = Gateway::builder("https://api.openai.com", JwtAuth::new(SECRET).unwrap())
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("TLS connector"), "{e}");
    assert!(Gateway::builder("not a url", JwtAuth::new(SECRET).unwrap())
        .build()
        .is_err());
}

// Serving: graceful shutdown, connection limits, limits towards the upstream, metrics.

/// A streamed chat completion request; the stand-in holds its second event until
/// `sse_gate` gets a permit.
fn stream_request(env: &Env, token: &str, prompt: &str) -> Request<Full<Bytes>> {
    let body = json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": prompt}]})
    .to_string();
    Request::post(format!("http://{}/v1/chat/completions", env.addr))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Opens a stream and returns its body once the first event has arrived.
async fn open_stream(env: &Env, token: &str, prompt: &str) -> hyper::body::Incoming {
    let res = env
        .http
        .request(stream_request(env, token, prompt))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event in time")
        .unwrap()
        .unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"data: {"));
    body
}

/// Waits (bounded) until connecting to `addr` is refused.
async fn until_refused(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections still accepted after the shutdown signal"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn shutdown_finishes_an_open_stream_and_refuses_new_connections() {
    let mut env = Env::start().await;
    let token = env.token("acme", "v1");
    let body = open_stream(&env, &token, "drain me").await;

    let server = env.shutdown();
    until_refused(env.addr).await;
    assert!(env.gateway.is_draining());

    // The stream that was in flight runs to its end, and is cached whole.
    env.up.sse_gate.add_permits(1);
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the stream ends")
        .unwrap()
        .to_bytes();
    assert!(rest.ends_with(b"data: [DONE]\n\n"), "{rest:?}");
    let report = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops once the stream is done")
        .unwrap();
    assert_eq!(report.cut, 0, "{report:?}");
    assert!(report.open_at_shutdown >= 1, "{report:?}");
    assert_eq!(env.gateway.cache().metrics().stored, 1);
}

#[tokio::test]
async fn the_shutdown_bound_closes_what_is_still_running() {
    let mut env = Env::serving(
        CachecoreLayer::builder(),
        |b| b,
        ServeOptions::default().shutdown_timeout(Duration::from_millis(300)),
    )
    .await;
    let token = env.token("acme", "v1");
    let body = open_stream(&env, &token, "never ends").await;
    let started = tokio::time::Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(5), env.shutdown())
        .await
        .expect("the bound holds")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(report.cut, 1, "{report:?}");
    // The caller sees the stream cut, and nothing partial was stored.
    assert!(tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .unwrap()
        .is_err());
    assert_eq!(env.gateway.cache().metrics().stored, 0);
}

#[tokio::test]
async fn draining_health_is_a_503() {
    let mut env = Env::start().await;
    let token = env.token("acme", "v1");
    // A kept-alive connection that is busy with a stream when the signal comes.
    let body = open_stream(&env, &token, "keep busy").await;
    let server = env.shutdown();
    until_refused(env.addr).await;
    assert_eq!(
        health_in_process(env.gateway.clone()).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    env.up.sse_gate.add_permits(1);
    body.collect().await.unwrap();
    server.await.unwrap();
}

/// `GET /health` straight to the service (the listener is closed by then).
async fn health_in_process(gateway: Gateway) -> StatusCode {
    use tower::ServiceExt;
    gateway
        .oneshot(
            Request::get("/health")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn connections_past_the_limit_wait_for_a_free_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let env = Env::serving(
        CachecoreLayer::builder(),
        |b| b,
        ServeOptions::default().max_connections(1),
    )
    .await;
    const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n";
    async fn answer(conn: &mut tokio::net::TcpStream) -> String {
        let mut buf = vec![0; 1024];
        let n = conn.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    // The first connection takes the only slot and keeps it (kept alive).
    let mut first = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    first.write_all(HEALTH).await.unwrap();
    assert!(answer(&mut first).await.starts_with("HTTP/1.1 200"));

    // The second is queued by the kernel, not served...
    let mut second = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    second.write_all(HEALTH).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), answer(&mut second))
            .await
            .is_err(),
        "served past the connection limit"
    );
    // ...until the first closes.
    drop(first);
    let reply = tokio::time::timeout(Duration::from_secs(5), answer(&mut second))
        .await
        .expect("served once a slot is free");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// `GET /health` on a raw connection; the answer's first bytes (one read: the answer is small).
async fn raw_health(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

// The request-head timeout (`ServeOptions::header_read_timeout`) is armed for every head on a
// kept-alive connection, not only the first, and only while a head is awaited.

#[tokio::test]
async fn a_head_trickled_past_the_head_timeout_closes_the_connection_after_earlier_requests() {
    use tokio::io::AsyncWriteExt;
    let timeout = Duration::from_millis(200);
    let env = Env::with_head_timeout(timeout).await;
    let mut conn = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    for _ in 0..3 {
        assert!(raw_health(&mut conn).await.starts_with("HTTP/1.1 200"));
    }
    let started = tokio::time::Instant::now();
    conn.write_all(b"GET /health HTTP/1.1\r\nhost:")
        .await
        .unwrap();
    closed_at_the_head_timeout(&mut conn, started, timeout).await;
}

/// Waits (bounded) for the server to close `conn`, and checks it did not before `timeout`
/// had passed since `started`.
async fn closed_at_the_head_timeout(
    conn: &mut tokio::net::TcpStream,
    started: tokio::time::Instant,
    timeout: Duration,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the connection is closed within the head timeout's bound");
    assert!(matches!(read, Ok(0) | Err(_)), "an answer: {read:?}");
    assert!(started.elapsed() >= timeout - Duration::from_millis(20));
}

#[tokio::test]
async fn prompt_heads_keep_a_connection_open_longer_than_the_head_timeout() {
    let timeout = Duration::from_millis(200);
    let env = Env::with_head_timeout(timeout).await;
    let mut conn = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    // Each head comes 50 ms after the last answer: four times the timeout in all.
    while started.elapsed() < timeout * 4 {
        let reply = raw_health(&mut conn).await;
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "closed after {:?}: {reply:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_head_timeout() {
    let timeout = Duration::from_millis(200);
    let env = Env::with_head_timeout(timeout).await;
    let mut conn = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    assert!(raw_health(&mut conn).await.starts_with("HTTP/1.1 200"));
    let started = tokio::time::Instant::now();
    closed_at_the_head_timeout(&mut conn, started, timeout).await;
}

// The head timeout runs only while a head is awaited: a request whose upstream call, or whose
// stream, takes longer than it keeps its connection, and the connection serves the next.
#[tokio::test]
async fn a_request_served_for_longer_than_the_head_timeout_is_not_cut() {
    let timeout = Duration::from_millis(200);
    let env = Env::with_head_timeout(timeout).await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    // The same client, so the second request may reuse the kept-alive connection.
    for body in [
        r#"{"model": "m", "delay_ms": 600}"#,
        r#"{"model": "m", "delay_ms": 600, "n": 2}"#,
    ] {
        let res = env
            .send(Method::POST, "/v1/chat/completions", &headers, body)
            .await;
        assert_eq!(res.status, StatusCode::OK, "{:?}", res.body);
    }
    // A stream held open for three timeouts arrives whole.
    let token = env.token("acme", "v1");
    let body = open_stream(&env, &token, "long").await;
    tokio::time::sleep(timeout * 3).await;
    env.up.sse_gate.add_permits(1);
    let text = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the stream ends")
        .expect("the stream is not cut")
        .to_bytes();
    assert!(text.ends_with(b"data: [DONE]\n\n"), "{text:?}");
}

#[tokio::test]
async fn an_upstream_slower_than_the_head_timeout_is_a_504() {
    let env = Env::with(CachecoreLayer::builder(), |b| {
        b.upstream_timeout(Duration::from_millis(200))
    })
    .await;
    let auth = format!("Bearer {}", env.token("acme", "v1"));
    let started = tokio::time::Instant::now();
    let res = env
        .send(
            Method::POST,
            "/v1/chat/completions",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"model": "m", "delay_ms": 3000}"#,
        )
        .await;
    assert_eq!(res.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(res.json()["error"]["code"], "upstream_timeout");
    assert_eq!(env.gateway.cache().metrics().stored, 0);
    assert!(env
        .metrics()
        .await
        .contains(r#"cachecore_gateway_upstream_errors_total{reason="timeout"} 1"#));
}

#[tokio::test]
async fn a_stream_that_goes_silent_is_cut_after_the_idle_timeout_and_not_stored() {
    let env = Env::with(CachecoreLayer::builder(), |b| {
        b.upstream_idle_timeout(Duration::from_millis(200))
    })
    .await;
    let token = env.token("acme", "v1");
    let body = open_stream(&env, &token, "silence").await;
    // The stand-in never sends the second event: the gateway cuts the stream.
    let outcome = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("cut within the bound");
    assert!(outcome.is_err(), "the caller sees the stream end in error");
    assert_eq!(env.gateway.cache().metrics().stored, 0);
    assert!(env
        .metrics()
        .await
        .contains(r#"cachecore_gateway_upstream_errors_total{reason="idle_timeout"} 1"#));
}

#[tokio::test]
async fn requests_past_the_upstream_slots_wait_within_the_head_timeout() {
    let env = Env::with(CachecoreLayer::builder(), |b| {
        b.upstream_max_inflight(1)
            .upstream_timeout(Duration::from_millis(400))
    })
    .await;
    let token = env.token("acme", "v1");
    // A stream holds the only upstream slot until its body ends.
    let body = open_stream(&env, &token, "hold the slot").await;
    assert!(env
        .metrics()
        .await
        .contains("cachecore_gateway_upstream_inflight 1"));
    let waited = env.chat(Some(&token), &[], "behind it").await;
    assert_eq!(waited.status, StatusCode::GATEWAY_TIMEOUT);

    env.up.sse_gate.add_permits(1);
    body.collect().await.unwrap();
    let res = env.chat(Some(&token), &[], "behind it").await;
    assert_eq!((res.status, res.x_cache()), (StatusCode::OK, "MISS"));
    assert!(env
        .metrics()
        .await
        .contains("cachecore_gateway_upstream_inflight 0"));
}

/// Checks one line of the text exposition: a comment, or `name{labels} value`.
fn parse_sample(line: &str) -> Option<(&str, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("value of {line:?}"));
    let name = series.split('{').next().unwrap();
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "metric name in {line:?}"
    );
    if let Some(labels) = series.strip_prefix(name) {
        assert!(
            labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
            "labels of {line:?}"
        );
    }
    Some((name, value))
}

#[tokio::test]
async fn metrics_exposition_parses_and_names_what_an_operator_needs() {
    let queue = QueueMetrics::default();
    let env = Env::with(CachecoreLayer::builder(), |b| {
        b.queue_metrics(queue.clone())
    })
    .await;
    let token = env.token("acme", "v1");
    env.chat(Some(&token), &[], "q").await;
    env.chat(Some(&token), &[], "q").await;
    env.chat(None, &[], "q").await;
    env.client(&token)
        .invalidate(Invalidation::of(["doc:1"]))
        .await
        .unwrap();
    queue.applied(2);
    queue.set_lag(Some(7));
    queue.set_pending(Some(1));
    queue.set_dead_letters(Some(0));

    // The Prometheus text format by default.
    let res = env.send(Method::GET, "/metrics", &[], "").await;
    assert_eq!(
        res.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = String::from_utf8(res.body.to_vec()).unwrap();
    let samples: Vec<(&str, f64)> = text.lines().filter_map(parse_sample).collect();
    for name in [
        "cachecore_requests_total",
        "cachecore_store_writes_total",
        "cachecore_store_errors_total",
        "cachecore_store_skipped_total",
        "cachecore_store_breaker_open",
        "cachecore_store_breaker_opened_total",
        "cachecore_store_call_duration_seconds_bucket",
        "cachecore_store_call_duration_seconds_sum",
        "cachecore_store_call_duration_seconds_count",
        "cachecore_coalesced_total",
        "cachecore_invalidations_total",
        "cachecore_invalidation_errors_total",
        "cachecore_invalidated_entries_total",
        "cachecore_queue_applied_total",
        "cachecore_queue_dead_lettered_total",
        "cachecore_queue_lag",
        "cachecore_queue_pending",
        "cachecore_queue_dead_letters",
        "cachecore_gateway_requests_total",
        "cachecore_gateway_upstream_inflight",
        "cachecore_gateway_connections",
    ] {
        assert!(
            samples.iter().any(|(n, _)| *n == name),
            "{name} missing from\n{text}"
        );
    }
    for line in [
        r#"cachecore_requests_total{status="HIT_L1"} 1"#,
        r#"cachecore_requests_total{status="MISS"} 1"#,
        r#"cachecore_requests_total{status="BYPASS"} 1"#,
        r#"cachecore_store_writes_total{outcome="stored"} 1"#,
        r#"cachecore_store_call_duration_seconds_count{op="lookup"} 2"#,
        r#"cachecore_store_call_duration_seconds_bucket{op="put",le="+Inf"} 1"#,
        "cachecore_store_breaker_open 0",
        "cachecore_queue_applied_total 2",
        "cachecore_queue_lag 7",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }
    assert!(text.contains("# TYPE cachecore_store_call_duration_seconds histogram"));

    // OpenMetrics for a scraper that asks for it.
    let res = env
        .send(
            Method::GET,
            "/metrics",
            &[(
                "accept",
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            )],
            "",
        )
        .await;
    assert!(res.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = String::from_utf8(res.body.to_vec()).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    for line in text.lines() {
        parse_sample(line);
    }
    assert!(text.contains(r#"cachecore_requests_total{status="HIT_L1"} 1"#));
}

/// A `tracing` writer into a buffer the test reads.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_request_logs_one_line_with_method_path_status_and_x_cache() {
    // The test runtime has one thread: the gateway's tasks log on it, to this subscriber.
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let env = Env::start().await;
    let token = env.token("acme", "v1");
    env.chat(Some(&token), &[], "q").await;
    env.chat(Some(&token), &[], "q").await;
    env.send(Method::GET, "/health", &[], "").await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(" request ")).collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (line, (path, x_cache)) in lines.iter().zip([
        ("/v1/chat/completions", "MISS"),
        ("/v1/chat/completions", "HIT_L1"),
        ("/health", "-"),
    ]) {
        assert!(line.contains(&format!("path={path}")), "{line}");
        assert!(line.contains("status=200"), "{line}");
        assert!(line.contains(&format!("x_cache=\"{x_cache}\"")), "{line}");
        assert!(line.contains(" ms="), "{line}");
    }
}
