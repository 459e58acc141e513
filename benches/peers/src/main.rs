//! Cache-hit throughput and latency: cachecore against the Rust caching layers a user would pick
//! instead, on the same axum route, in one run.
//!
//! Every variant wraps the same `Router` (one `POST /v1/chat/completions` route whose handler
//! reads the body and returns a fixed ~1 KiB JSON answer) and is driven in process: each of
//! `concurrency` tokio tasks calls the service with `ready().call()` on a 1 KiB JSON body and
//! reads the whole response body, in a loop, for `MEASURE` per cell. In process (no sockets)
//! because loopback HTTP would put the kernel's noise on top of microsecond-scale hits.
//!
//! Usage: `benches/peers.sh` (builds in release mode, then runs this). Environment:
//! `PEERS_SECONDS` (per cell, default 3), `PEERS_WORKERS` (tokio workers, default 2),
//! `PEERS_REDIS=0` to skip the Redis rows, `PEERS_ONLY=<part of a row name>` to run only the
//! matching rows (and the no-cache baseline).

use std::fmt::Debug;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use cachecore::{CachecoreLayer, Dep, MemoryStore, RequestContext};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};

const PATH: &str = "/v1/chat/completions";
/// Request and answer size: a typical short chat request, as in the issue.
const BODY_BYTES: usize = 1024;
const CONCURRENCY: [usize; 2] = [1, 32];
/// Long enough that nothing expires during a run.
const TTL: Duration = Duration::from_secs(3600);

type Req = Request<Full<Bytes>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A JSON document of exactly `len` bytes: `{"pad":"xxx…"}` around `fields`.
fn json_of_len(fields: &str, len: usize) -> Bytes {
    let skeleton = format!(r#"{{{fields},"pad":""}}"#);
    let pad = len.saturating_sub(skeleton.len());
    let doc = format!(r#"{{{fields},"pad":"{}"}}"#, "x".repeat(pad));
    assert_eq!(doc.len(), len.max(skeleton.len()));
    Bytes::from(doc)
}

fn request_body() -> Bytes {
    json_of_len(
        r#""model":"gpt-4o-mini","temperature":0,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Summarise the contract in one line."}]"#,
        BODY_BYTES,
    )
}

fn answer_body() -> Bytes {
    json_of_len(
        r#""id":"chatcmpl-1","object":"chat.completion","created":0,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"A one-line summary."},"finish_reason":"stop"}]"#,
        BODY_BYTES,
    )
}

/// The route every variant serves; `calls` counts handler runs (misses that reached it).
fn router(calls: Arc<AtomicU64>) -> Router {
    let answer = answer_body();
    Router::new().route(
        PATH,
        post(move |body: Bytes| {
            let (calls, answer) = (Arc::clone(&calls), answer.clone());
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                std::hint::black_box(body);
                ([(CONTENT_TYPE, "application/json")], answer)
            }
        }),
    )
}

/// How a variant's request is built (cachecore's dep row adds its context here, as a caller
/// would).
type MakeReq = Arc<dyn Fn(&Bytes) -> Req + Send + Sync>;

fn plain_request() -> MakeReq {
    Arc::new(|body: &Bytes| {
        Request::post(PATH)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .expect("static request parts are valid")
    })
}

fn request_with_dep() -> MakeReq {
    Arc::new(|body: &Bytes| {
        let mut req = Request::post(PATH)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .expect("static request parts are valid");
        req.extensions_mut()
            .insert(RequestContext::new().dep(Dep::new("doc:contract-123").hash("v7")));
        req
    })
}

#[derive(Clone, Copy, Debug)]
struct Stats {
    requests: u64,
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Drives `svc` with `concurrency` tasks for `duration`; every call reads the whole body.
async fn measure<S, B>(svc: S, make: MakeReq, concurrency: usize, duration: Duration) -> Stats
where
    S: Service<Req, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug + Send,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Debug + Send,
{
    let body = request_body();
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut svc, make, body) = (svc.clone(), Arc::clone(&make), body.clone());
            tokio::spawn(async move {
                let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
                while Instant::now() < deadline {
                    let req = make(&body);
                    let t = Instant::now();
                    let res = svc
                        .ready()
                        .await
                        .expect("ready")
                        .call(req)
                        .await
                        .expect("call");
                    let bytes = res.into_body().collect().await.expect("body").to_bytes();
                    latencies.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
                    std::hint::black_box(bytes);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        f64::from(all.get(i).copied().unwrap_or(0)) / 1000.0
    };
    Stats {
        requests: all.len() as u64,
        per_sec: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// One line of the table.
struct Row {
    name: &'static str,
    keys_on: &'static str,
    group: &'static str,
    stats: Vec<(usize, Stats)>,
    upstream_during_run: u64,
    status_header: Option<String>,
}

/// Warms the cache with one request, checks that the next one is served without reaching the
/// handler, then measures every concurrency level.
async fn run_variant<S, B>(
    name: &'static str,
    keys_on: &'static str,
    group: &'static str,
    svc: S,
    make: MakeReq,
    calls: Arc<AtomicU64>,
    duration: Duration,
) -> Option<Row>
where
    S: Service<Req, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug + Send,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Debug + Send,
{
    let only = std::env::var("PEERS_ONLY").unwrap_or_default();
    if name != "no cache" && !name.contains(only.as_str()) {
        return None;
    }
    let body = request_body();
    let mut status_header = None;
    for _ in 0..2 {
        let res = svc
            .clone()
            .oneshot(make(&body))
            .await
            .expect("warm-up call");
        assert!(
            res.status().is_success(),
            "{name}: warm-up got {}",
            res.status()
        );
        status_header = ["x-cache", "x-cache-status"]
            .iter()
            .find_map(|h| res.headers().get(*h))
            .map(|v| v.to_str().unwrap_or("?").to_owned());
        res.into_body().collect().await.expect("warm-up body");
        // Some layers write the entry in the background.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = calls.load(Ordering::Relaxed);
    let mut stats = Vec::new();
    for c in CONCURRENCY {
        stats.push((
            c,
            measure(svc.clone(), Arc::clone(&make), c, duration).await,
        ));
    }
    let row = Row {
        name,
        keys_on,
        group,
        stats,
        upstream_during_run: calls.load(Ordering::Relaxed) - before,
        status_header,
    };
    eprintln!(
        "  {name:<34} done ({} requests; handler ran {} times during the run; last warm-up status {:?})",
        row.stats.iter().map(|(_, s)| s.requests).sum::<u64>(),
        row.upstream_during_run,
        row.status_header,
    );
    Some(row)
}

/// `reqwest`-style `Sync` wrapper: tower-http-cache wants a `Sync` inner response body and
/// axum's is not. Only the miss path goes through it.
struct SyncBody<B>(Mutex<B>);

impl<B: http_body::Body + Unpin> http_body::Body for SyncBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let inner = self
            .get_mut()
            .0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        std::pin::Pin::new(inner).poll_frame(cx)
    }

    // Forwarded: tower-http-cache treats a body of unknown size as a stream and skips it.
    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .size_hint()
    }
}

type SyncResponse = Response<SyncBody<axum::body::Body>>;

/// [`router`] with a `Sync` response body, for tower-http-cache.
fn sync_router(
    calls: Arc<AtomicU64>,
) -> tower::util::MapResponse<Router, fn(Response<axum::body::Body>) -> SyncResponse> {
    tower::util::MapResponse::new(router(calls), |res: Response<axum::body::Body>| {
        res.map(|b| SyncBody(Mutex::new(b)))
    })
}

/// A redis-server of our own on a free loopback port, stopped on drop.
struct RedisServer {
    child: Child,
    url: String,
}

impl RedisServer {
    fn start() -> Result<Self, BoxError> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("redis-server did not start within 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tower_http_cache_layer<B: tower_http_cache::backend::CacheBackend>(
    backend: B,
) -> tower_http_cache::CacheLayer<B> {
    tower_http_cache::CacheLayer::builder(backend)
        .ttl(TTL)
        // POST is not cached by default; its key extractor sees only method and URI.
        .method_predicate(|m| m == http::Method::POST)
        .key_extractor(tower_http_cache::KeyExtractor::custom(|m, uri| {
            Some(format!("{m} {}", uri.path()))
        }))
        .build()
}

macro_rules! hitbox_config {
    () => {{
        use hitbox_http::extractors::body::{BodyExtraction, BodyExtractor};
        use hitbox_http::extractors::path::PathExtractor;
        use hitbox_http::predicates::{NeutralRequestPredicate, NeutralResponsePredicate};
        hitbox::Config::builder()
            .request_predicate(NeutralRequestPredicate::new())
            .response_predicate(NeutralResponsePredicate::new())
            .extractor(
                hitbox_http::extractors::Method::new()
                    .path(PATH)
                    .body(BodyExtraction::Hash),
            )
            .policy(hitbox::policy::PolicyConfig::builder().ttl(TTL).build())
            .build()
    }};
}

fn main() -> Result<(), BoxError> {
    let seconds: f64 = std::env::var("PEERS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let workers: usize = std::env::var("PEERS_WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let with_redis = std::env::var("PEERS_REDIS").map_or(true, |v| v != "0");
    let duration = Duration::from_secs_f64(seconds);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    eprintln!(
        "peers bench: {BODY_BYTES} B JSON POST, in-process, {workers} tokio workers, {seconds} s per cell, concurrency {CONCURRENCY:?}"
    );
    let rows = rt.block_on(run_all(duration, with_redis))?;
    print_table(&rows, seconds, workers);
    Ok(())
}

async fn run_all(duration: Duration, with_redis: bool) -> Result<Vec<Row>, BoxError> {
    let mut rows = Vec::new();
    let calls = || Arc::new(AtomicU64::new(0));

    // No cache: the handler every time.
    let c = calls();
    rows.extend(
        run_variant(
            "no cache",
            "-",
            "memory",
            router(Arc::clone(&c)),
            plain_request(),
            c,
            duration,
        )
        .await,
    );

    // cachecore on MemoryStore: canonical JSON body, policy-dep epoch checked on every hit.
    let c = calls();
    let layer = CachecoreLayer::builder()
        .store(MemoryStore::new())
        .default_ttl(TTL)
        .build();
    rows.extend(
        run_variant(
            "cachecore (MemoryStore)",
            "canonical JSON body + deps",
            "memory",
            layer.layer(router(Arc::clone(&c))),
            plain_request(),
            c,
            duration,
        )
        .await,
    );
    // The same with one declared dep per request (a RequestContext built per call).
    let c = calls();
    let layer = CachecoreLayer::builder()
        .store(MemoryStore::new())
        .default_ttl(TTL)
        .build();
    rows.extend(
        run_variant(
            "cachecore (MemoryStore, 1 dep)",
            "canonical JSON body + deps",
            "memory",
            layer.layer(router(Arc::clone(&c))),
            request_with_dep(),
            c,
            duration,
        )
        .await,
    );

    // tower-http-cache, in-memory (moka) backend. Keys on method + URI only.
    let c = calls();
    let inner = sync_router(Arc::clone(&c));
    let backend = tower_http_cache::backend::memory::InMemoryBackend::new(10_000);
    rows.extend(
        run_variant(
            "tower-http-cache 0.6.1 (in-memory)",
            "method + path only (no body)",
            "memory",
            tower_http_cache_layer(backend).layer(inner),
            plain_request(),
            c,
            duration,
        )
        .await,
    );

    // hitbox + hitbox-moka: method + path + SHA-256 of the raw body. Its default value format
    // (JSON), then its fastest built-in one (bincode).
    let c = calls();
    let backend = hitbox_moka::MokaBackend::builder()
        .max_entries(10_000)
        .build();
    let layer = hitbox_tower::Cache::builder()
        .backend(backend)
        .config(hitbox_config!())
        .build();
    rows.extend(
        run_variant(
            "hitbox 0.2.4 (hitbox-moka, JSON)",
            "raw body hash (not canonical)",
            "memory",
            layer.layer(router(Arc::clone(&c))),
            plain_request(),
            c,
            duration,
        )
        .await,
    );
    let c = calls();
    let backend = hitbox_moka::MokaBackend::builder()
        .max_entries(10_000)
        .value_format(hitbox_backend::format::BincodeFormat)
        .build();
    let layer = hitbox_tower::Cache::builder()
        .backend(backend)
        .config(hitbox_config!())
        .build();
    rows.extend(
        run_variant(
            "hitbox 0.2.4 (hitbox-moka, bincode)",
            "raw body hash (not canonical)",
            "memory",
            layer.layer(router(Arc::clone(&c))),
            plain_request(),
            c,
            duration,
        )
        .await,
    );

    if !with_redis {
        return Ok(rows);
    }
    let redis = match RedisServer::start() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("no Redis rows: {e}");
            return Ok(rows);
        }
    };

    let c = calls();
    let store = cachecore::store::redis::RedisStore::connect(&redis.url).await?;
    let layer = CachecoreLayer::builder()
        .store(store)
        .default_ttl(TTL)
        .build();
    rows.extend(
        run_variant(
            "cachecore (RedisStore)",
            "canonical JSON body + deps",
            "redis",
            layer.layer(router(Arc::clone(&c))),
            plain_request(),
            c,
            duration,
        )
        .await,
    );

    let c = calls();
    let inner = sync_router(Arc::clone(&c));
    let conn = redis::aio::ConnectionManager::new(redis::Client::open(redis.url.as_str())?).await?;
    let backend = tower_http_cache::backend::redis::RedisBackend::new(conn);
    rows.extend(
        run_variant(
            "tower-http-cache 0.6.1 (redis)",
            "method + path only (no body)",
            "redis",
            tower_http_cache_layer(backend).layer(inner),
            plain_request(),
            c,
            duration,
        )
        .await,
    );

    let c = calls();
    let backend = hitbox_redis::RedisBackend::builder()
        .connection(hitbox_redis::ConnectionMode::single(redis.url.clone()))
        .build()?;
    let layer = hitbox_tower::Cache::builder()
        .backend(backend)
        .config(hitbox_config!())
        .build();
    rows.extend(
        run_variant(
            "hitbox 0.2.4 (hitbox-redis, bincode)",
            "raw body hash (not canonical)",
            "redis",
            layer.layer(router(Arc::clone(&c))),
            plain_request(),
            c,
            duration,
        )
        .await,
    );
    drop(redis);
    Ok(rows)
}

fn print_table(rows: &[Row], seconds: f64, workers: usize) {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let baseline = find("no cache");
    println!();
    println!(
        "Cache hits, 1 KiB JSON POST, in process ({workers} tokio workers, {seconds} s per cell)"
    );
    println!();
    println!("| layer | keys on | conc | hits/s | p50 µs | p99 µs | vs no cache | vs cachecore |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let reference = match row.group {
            "redis" => find("cachecore (RedisStore)"),
            _ => find("cachecore (MemoryStore)"),
        };
        for (c, s) in &row.stats {
            let ratio = |other: Option<&Row>| {
                other
                    .and_then(|o| o.stats.iter().find(|(oc, _)| oc == c))
                    .map_or("-".to_owned(), |(_, o)| {
                        format!("{:.2}x", s.per_sec / o.per_sec)
                    })
            };
            let name = if row.upstream_during_run > 0 && row.name != "no cache" {
                format!("{} (!{} misses)", row.name, row.upstream_during_run)
            } else {
                row.name.to_owned()
            };
            println!(
                "| {name} | {} | {c} | {:.0} | {:.1} | {:.1} | {} | {} |",
                row.keys_on,
                s.per_sec,
                s.p50_us,
                s.p99_us,
                ratio(baseline),
                ratio(reference),
            );
        }
    }
}
