//! The reqwest-middleware adapter against a local server: the same cache as the tower layer.
#![cfg(feature = "reqwest")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use cachecore::testing::{cache_status, OutcomeRecorder};
use cachecore::Invalidation;
use cachecore::{
    assert_cache_status, scope, CacheStatus, CachecoreLayer, Dep, MemoryStore, RequestContext,
    POLICY_DEP,
};
use http_body::Frame;
use http_body_util::Full;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::sync::mpsc;

const TENANT: &str = "t";

#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    /// The event stream the next `/v1/stream` call answers with.
    events: Arc<Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>>,
}

impl Upstream {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A body that yields whatever the test sends, when it sends it.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

async fn serve(upstream: Upstream) -> SocketAddr {
    async fn chat(State(up): State<Upstream>, body: String) -> String {
        let n = up.calls.fetch_add(1, Ordering::SeqCst) + 1;
        format!("answer {n} to {body}")
    }
    async fn stream(State(up): State<Upstream>) -> axum::response::Response {
        up.calls.fetch_add(1, Ordering::SeqCst);
        let rx = up
            .events
            .lock()
            .unwrap()
            .take()
            .expect("a stream was prepared");
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::new(ChannelBody(rx)))
            .unwrap()
    }
    let app = Router::new()
        .route("/v1/chat", post(chat))
        .route("/v1/stream", get(stream))
        .with_state(upstream);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Setup {
    addr: SocketAddr,
    upstream: Upstream,
    layer: CachecoreLayer,
    store: MemoryStore,
    client: ClientWithMiddleware,
}

async fn setup_with(builder: cachecore::CachecoreBuilder) -> Setup {
    let upstream = Upstream::default();
    let addr = serve(upstream.clone()).await;
    let store = MemoryStore::new();
    let layer = builder.store(store.clone()).tenant(TENANT).build();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(layer.reqwest_middleware())
        .build();
    Setup {
        addr,
        upstream,
        layer,
        store,
        client,
    }
}

async fn setup() -> Setup {
    setup_with(CachecoreLayer::builder()).await
}

impl Setup {
    fn chat(&self, body: &'static str) -> reqwest_middleware::RequestBuilder {
        self.client
            .post(format!("http://{}/v1/chat", self.addr))
            .header("content-type", "application/json")
            .body(body)
    }
}

async fn text(res: reqwest::Response) -> String {
    res.text().await.unwrap()
}

#[tokio::test]
async fn a_repeated_request_is_a_miss_then_a_hit() {
    let s = setup().await;
    let first = s.chat(r#"{"q":1}"#).send().await.unwrap();
    assert_cache_status!(first, CacheStatus::Miss);
    assert_eq!(first.headers()["x-cache"], "MISS");
    let first = text(first).await;

    // Same JSON, other key order and spacing: the canonical key is the same.
    let second = s.chat(r#"{ "q" : 1 }"#).send().await.unwrap();
    assert_eq!(
        second.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Hit)
    );
    assert_eq!(second.headers()["x-cache"], "HIT_L1");
    assert!(second.headers().contains_key("x-cache-age"));
    assert_eq!(second.url().as_str(), format!("http://{}/v1/chat", s.addr));
    assert_eq!(text(second).await, first);
    assert_eq!(s.upstream.calls(), 1);
    assert_eq!(s.store.entry_count(), 1);
}

#[tokio::test]
async fn different_bodies_are_different_entries() {
    let s = setup().await;
    for body in [r#"{"q":1}"#, r#"{"q":2}"#] {
        let res = s.chat(body).send().await.unwrap();
        assert_cache_status!(res, CacheStatus::Miss);
        text(res).await;
    }
    assert_eq!(s.upstream.calls(), 2);
}

#[tokio::test]
async fn invalidating_a_dep_declared_in_the_extension_drops_the_entry() {
    let s = setup().await;
    let ctx = || RequestContext::new().dep(Dep::new("doc:contract-123").hash("v1"));
    let send = || s.chat(r#"{"q":"summarise"}"#).with_extension(ctx()).send();

    let res = send().await.unwrap();
    assert_cache_status!(res, CacheStatus::Miss);
    text(res).await;
    let key = s.store.entries()[0].0.clone();
    let mut deps = s.store.deps_of(&key).unwrap();
    deps.sort();
    assert_eq!(deps, ["cc:policy-version", "doc:contract-123"]);
    assert_cache_status!(send().await.unwrap(), CacheStatus::Hit);

    let result = s
        .layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:contract-123"]).new_hash("v2"))
        .await
        .unwrap();
    assert_eq!(result.entries_deleted(), 1);

    let res = send().await.unwrap();
    assert_cache_status!(
        res,
        CacheStatus::Miss,
        "the dep moved: the old entry must not be served"
    );
    assert_eq!(text(res).await, r#"answer 2 to {"q":"summarise"}"#);
    assert_eq!(s.upstream.calls(), 2);
}

#[tokio::test]
async fn deps_declared_with_a_task_local_scope_are_recorded() {
    let s = setup().await;
    let ctx = RequestContext::new().dep(Dep::new("table:products"));
    let res = scope(ctx.clone(), s.chat(r#"{"q":"prices"}"#).send())
        .await
        .unwrap();
    assert_cache_status!(res, CacheStatus::Miss);
    text(res).await;
    assert_eq!(s.store.tagged_count(TENANT, "table:products"), 1);
    assert_eq!(s.store.tagged_count(TENANT, POLICY_DEP), 1);

    // Deps are part of the key: the same body outside the scope is another entry.
    assert_cache_status!(
        s.chat(r#"{"q":"prices"}"#).send().await.unwrap(),
        CacheStatus::Miss
    );
    let hit = scope(ctx, s.chat(r#"{"q":"prices"}"#).send())
        .await
        .unwrap();
    assert_cache_status!(hit, CacheStatus::Hit);

    let _ = s
        .layer
        .invalidator()
        .invalidate(Invalidation::of(["table:products"]))
        .await;
    let res = scope(
        RequestContext::new().dep(Dep::new("table:products")),
        s.chat(r#"{"q":"prices"}"#).send(),
    )
    .await
    .unwrap();
    assert_cache_status!(res, CacheStatus::Miss);
}

#[tokio::test]
async fn the_extension_wins_over_the_scope() {
    let s = setup().await;
    let send = || {
        scope(
            RequestContext::new().dep(Dep::new("from-scope")),
            s.chat(r#"{"q":1}"#)
                .with_extension(RequestContext::new().dep(Dep::new("from-extension")))
                .send(),
        )
    };
    text(send().await.unwrap()).await;
    assert_eq!(s.store.tagged_count(TENANT, "from-extension"), 1);
    assert_eq!(s.store.tagged_count(TENANT, "from-scope"), 0);
}

#[tokio::test]
async fn bypass_reads_and_writes_nothing() {
    let s = setup().await;
    text(s.chat(r#"{"q":1}"#).send().await.unwrap()).await;
    for _ in 0..2 {
        let res = s
            .chat(r#"{"q":1}"#)
            .with_extension(RequestContext::bypass_all())
            .send()
            .await
            .unwrap();
        assert_cache_status!(res, CacheStatus::Bypass);
        text(res).await;
    }
    let res = scope(RequestContext::bypass_all(), s.chat(r#"{"q":2}"#).send())
        .await
        .unwrap();
    assert_cache_status!(res, CacheStatus::Bypass);
    text(res).await;
    assert_eq!(s.upstream.calls(), 4);
    assert_eq!(s.store.entry_count(), 1);
}

#[tokio::test]
async fn an_invalid_dep_id_bypasses_and_says_why() {
    let s = setup().await;
    let res = s
        .chat(r#"{"q":1}"#)
        .with_extension(RequestContext::new().dep(Dep::new("")))
        .send()
        .await
        .unwrap();
    assert_cache_status!(res, CacheStatus::Bypass);
    assert!(res.headers().contains_key("x-cache-error"));
}

#[tokio::test]
async fn a_streaming_request_body_passes_through_uncached() {
    let s = setup().await;
    for n in 1..=2 {
        let body = reqwest::Body::wrap(Full::new(Bytes::from_static(b"{\"q\":1}")));
        let res = s
            .client
            .post(format!("http://{}/v1/chat", s.addr))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_cache_status!(res, CacheStatus::Bypass);
        assert_eq!(text(res).await, format!("answer {n} to {{\"q\":1}}"));
    }
    assert_eq!(s.store.entry_count(), 0);
}

#[tokio::test]
async fn an_sse_response_arrives_incrementally_and_is_replayed_exactly() {
    let s = setup().await;
    let (tx, rx) = mpsc::unbounded_channel();
    *s.upstream.events.lock().unwrap() = Some(rx);
    let url = format!("http://{}/v1/stream", s.addr);

    let events: [&[u8]; 3] = [
        b"data: {\"delta\":\"Hel\"}\n\n",
        b"data: {\"delta\":\"lo\"}\n\n",
        b"data: [DONE]\n\n",
    ];
    let mut res = s.client.get(&url).send().await.unwrap();
    assert_cache_status!(res, CacheStatus::Miss);
    let mut seen = Vec::new();
    for event in events {
        // Each event is sent only after the previous one reached the client: a layer that
        // buffered the response would hang here.
        tx.send(Bytes::from_static(event)).unwrap();
        let chunk = tokio::time::timeout(Duration::from_secs(5), res.chunk())
            .await
            .expect("the event arrives before the stream ends")
            .unwrap()
            .unwrap();
        assert_eq!(&chunk[..], event);
        seen.extend_from_slice(&chunk);
    }
    drop(tx);
    assert!(res.chunk().await.unwrap().is_none());
    // The write is finished before the end of the body is reported.
    assert_eq!(s.store.entry_count(), 1);

    let hit = s.client.get(&url).send().await.unwrap();
    assert_cache_status!(hit, CacheStatus::Hit);
    assert_eq!(hit.headers()["content-type"], "text/event-stream");
    assert_eq!(hit.bytes().await.unwrap(), seen);
    assert_eq!(s.upstream.calls(), 1);
}

#[tokio::test]
async fn a_stream_cut_short_stores_nothing() {
    let s = setup().await;
    let (tx, rx) = mpsc::unbounded_channel();
    *s.upstream.events.lock().unwrap() = Some(rx);
    let url = format!("http://{}/v1/stream", s.addr);
    let mut res = s.client.get(&url).send().await.unwrap();
    tx.send(Bytes::from_static(b"data: partial\n\n")).unwrap();
    res.chunk().await.unwrap().unwrap();
    drop(res);
    drop(tx);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.store.entry_count(), 0);
}

#[tokio::test]
async fn a_stale_entry_is_revalidated_in_line() {
    let s = setup_with(
        CachecoreLayer::builder()
            .default_ttl(Duration::from_secs(1))
            .stale_window(Duration::from_secs(60)),
    )
    .await;
    text(s.chat(r#"{"q":1}"#).send().await.unwrap()).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = s.chat(r#"{"q":1}"#).send().await.unwrap();
    assert_cache_status!(res, CacheStatus::Miss);
    assert_eq!(text(res).await, r#"answer 2 to {"q":1}"#);
    let res = s.chat(r#"{"q":1}"#).send().await.unwrap();
    assert_cache_status!(res, CacheStatus::Hit);
    assert_eq!(text(res).await, r#"answer 2 to {"q":1}"#);
}

#[tokio::test]
async fn concurrent_identical_requests_make_one_upstream_call() {
    let s = setup().await;
    let calls = (0..8).map(|_| async {
        let res = s.chat(r#"{"q":"same"}"#).send().await.unwrap();
        let status = cache_status(&res).unwrap();
        (status, text(res).await)
    });
    let results = futures_join_all(calls).await;
    assert!(results
        .iter()
        .all(|(_, body)| body == r#"answer 1 to {"q":"same"}"#));
    assert_eq!(s.upstream.calls(), 1);
}

#[tokio::test]
async fn the_outcome_recorder_works_as_reqwest_middleware() {
    let upstream = Upstream::default();
    let addr = serve(upstream.clone()).await;
    let layer = CachecoreLayer::builder().tenant(TENANT).build();
    let outcomes = OutcomeRecorder::new();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(outcomes.clone())
        .with(layer.reqwest_middleware())
        .build();
    for _ in 0..2 {
        let res = client
            .post(format!("http://{addr}/v1/chat?x=1"))
            .body("{}")
            .send()
            .await
            .unwrap();
        text(res).await;
    }
    assert_eq!(outcomes.statuses(), [CacheStatus::Miss, CacheStatus::Hit]);
    assert_eq!(outcomes.outcomes()[0].path, "/v1/chat?x=1");
}

/// Runs the futures concurrently on this task (no `futures` dependency for one helper).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in set.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// A client whose default `Authorization` the middleware cannot see (reqwest merges default
/// headers after middleware runs).
fn client_with_key(layer: &CachecoreLayer, key: &str, declare: bool) -> ClientWithMiddleware {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
    let inner = reqwest::Client::builder()
        .default_headers(headers.clone())
        .build()
        .unwrap();
    let mw = layer.reqwest_middleware();
    let mw = if declare {
        mw.client_credentials(&headers)
    } else {
        mw
    };
    ClientBuilder::new(inner).with(mw).build()
}

#[tokio::test]
async fn two_clients_with_different_default_credentials_never_share_an_entry() {
    let upstream = Upstream::default();
    let addr = serve(upstream.clone()).await;
    // No tenant: the credentials partition is the only thing keeping callers apart.
    let layer = CachecoreLayer::new();
    let url = format!("http://{addr}/v1/chat");
    let alice = client_with_key(&layer, "alice", false);
    let bob = client_with_key(&layer, "bob", false);
    let a = alice.post(&url).body("q").send().await.unwrap();
    assert_cache_status!(a, CacheStatus::Miss);
    let a = text(a).await;
    let again = alice.post(&url).body("q").send().await.unwrap();
    assert_cache_status!(again, CacheStatus::Hit);
    let b = bob.post(&url).body("q").send().await.unwrap();
    assert_cache_status!(b, CacheStatus::Miss);
    assert_ne!(text(b).await, a, "bob was served alice's answer");
}

#[tokio::test]
async fn clients_that_declare_the_same_credentials_share_entries_and_others_do_not() {
    let upstream = Upstream::default();
    let addr = serve(upstream.clone()).await;
    let layer = CachecoreLayer::new();
    let url = format!("http://{addr}/v1/chat");
    let first = client_with_key(&layer, "alice", true);
    let second = client_with_key(&layer, "alice", true);
    let bob = client_with_key(&layer, "bob", true);
    text(first.post(&url).body("q").send().await.unwrap()).await;
    let shared = second.post(&url).body("q").send().await.unwrap();
    assert_cache_status!(shared, CacheStatus::Hit);
    let other = bob.post(&url).body("q").send().await.unwrap();
    assert_cache_status!(other, CacheStatus::Miss);
}
