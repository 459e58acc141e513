//! `cachecore-gateway`: an OpenAI-compatible caching proxy that speaks the hosted product's wire
//! format (docs/design.md section 7), built from `cachecore::gateway`.
//!
//! ```text
//! cargo install cachecore --features gateway            # add `,redis` for the Redis store
//! cachecore-gateway --upstream http://127.0.0.1:9000 --jwt-secret "$SECRET"
//! ```
//!
//! Every flag can come from the environment instead (`--help` names each variable); a flag wins
//! over its variable. `RUST_LOG` filters the log (default `info`). SIGTERM or Ctrl-C shut it down
//! gracefully: no new connections, in-flight requests and streams finish within
//! `--shutdown-timeout`, then the queue worker stops after acknowledging what it applied.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use cachecore::auth::jwt::JwtAuth;
use cachecore::gateway::{self, Gateway, ServeOptions};
use cachecore::CachecoreLayer;
use clap::Parser;
use http::HeaderValue;

/// An OpenAI-compatible caching proxy: tenants from HS256 JWTs, deps from X-CacheCore-Deps,
/// invalidation at POST /v1/invalidate, health at GET /health, metrics at GET /metrics.
#[derive(Debug, Parser)]
#[command(name = "cachecore-gateway", version)]
struct Args {
    /// Address to listen on (loopback by default, so a gateway is never exposed by accident).
    #[arg(long, env = "CACHECORE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// The OpenAI-compatible upstream, e.g. http://127.0.0.1:9000 (a path in it prefixes every
    /// forwarded path).
    #[arg(long, env = "CACHECORE_UPSTREAM")]
    upstream: String,

    /// The HS256 secret tenant tokens are signed with: at least 32 bytes.
    #[arg(long, env = "CACHECORE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,

    /// Require this `aud` claim in tenant tokens.
    #[arg(long, env = "CACHECORE_JWT_AUDIENCE")]
    jwt_audience: Option<String>,

    /// Require this `iss` claim in tenant tokens.
    #[arg(long, env = "CACHECORE_JWT_ISSUER")]
    jwt_issuer: Option<String>,

    /// `Authorization` value sent upstream in place of the caller's (e.g. "Bearer sk-...").
    #[arg(long, env = "CACHECORE_UPSTREAM_API_KEY", hide_env_values = true)]
    upstream_api_key: Option<String>,

    /// Comma-separated `[METHOD ]PATH` entries to cache (a trailing `*` for a prefix); every
    /// other request is forwarded as a BYPASS. Default: the POSTs of /v1/chat/completions,
    /// /v1/completions, /v1/embeddings, /v1/moderations, /v1/responses.
    #[arg(long, env = "CACHECORE_CACHEABLE_PATHS", value_delimiter = ',')]
    cacheable_paths: Option<Vec<String>>,

    /// How long an entry is fresh (e.g. 90s, 10m, 1h).
    #[arg(long, env = "CACHECORE_DEFAULT_TTL", default_value = "1h", value_parser = nonzero_duration)]
    default_ttl: Duration,

    /// Longest wait for one cache store call; past it the request goes upstream uncached.
    #[arg(long, env = "CACHECORE_STORE_TIMEOUT", default_value = "250ms", value_parser = nonzero_duration)]
    store_timeout: Duration,

    /// Redis URL for the entries (shared by every gateway instance) and the invalidation queue
    /// worker; entries are kept in memory without it.
    #[cfg(feature = "redis")]
    #[arg(long, env = "CACHECORE_REDIS_URL")]
    redis: Option<String>,

    /// Redis stream the queue worker reads invalidation events from (with --redis).
    #[cfg(feature = "redis")]
    #[arg(long, env = "CACHECORE_QUEUE_STREAM", default_value = cachecore::queue::DEFAULT_STREAM)]
    queue_stream: String,

    /// Consumer group of the queue workers (with --redis).
    #[cfg(feature = "redis")]
    #[arg(long, env = "CACHECORE_QUEUE_GROUP", default_value = cachecore::queue::DEFAULT_GROUP)]
    queue_group: String,

    /// Do not run the invalidation queue worker (with --redis).
    #[cfg(feature = "redis")]
    #[arg(long, env = "CACHECORE_NO_QUEUE_WORKER")]
    no_queue_worker: bool,

    /// Keep hot entries in this process too, up to this size (e.g. 64MiB; with --redis, single
    /// Redis only): hits without a round trip, kept coherent by Redis's invalidation pushes, so
    /// another instance's invalidation is seen here a moment later, not at once.
    #[cfg(feature = "redis")]
    #[arg(long, env = "CACHECORE_REDIS_NEAR_CACHE", value_parser = byte_size, requires = "redis")]
    redis_near_cache: Option<u64>,

    /// Longest wait for a TCP connection to the upstream (then 502).
    #[arg(long, env = "CACHECORE_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = nonzero_duration)]
    upstream_connect_timeout: Duration,

    /// Longest wait for the upstream's response head, waiting for a free slot included (then
    /// 504). 10 minutes: what the OpenAI SDKs wait themselves.
    #[arg(long, env = "CACHECORE_UPSTREAM_TIMEOUT", default_value = "10m", value_parser = nonzero_duration)]
    upstream_timeout: Duration,

    /// Longest silence between two chunks of an upstream body (then the response is cut and
    /// not cached).
    #[arg(long, env = "CACHECORE_UPSTREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = nonzero_duration)]
    upstream_idle_timeout: Duration,

    /// Upstream requests in flight at once; more wait for a slot.
    #[arg(long, env = "CACHECORE_UPSTREAM_MAX_INFLIGHT", default_value_t = gateway::DEFAULT_UPSTREAM_MAX_INFLIGHT)]
    upstream_max_inflight: usize,

    /// Idle upstream connections kept for reuse.
    #[arg(long, env = "CACHECORE_UPSTREAM_POOL_MAX_IDLE", default_value_t = gateway::DEFAULT_UPSTREAM_POOL_MAX_IDLE)]
    upstream_pool_max_idle: usize,

    /// Client connections open at once; past it the gateway stops accepting until one closes.
    #[arg(long, env = "CACHECORE_MAX_CONNECTIONS", default_value_t = ServeOptions::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,

    /// Longest time a client may take to send a request head.
    #[arg(long, env = "CACHECORE_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = nonzero_duration)]
    header_read_timeout: Duration,

    /// On SIGTERM or Ctrl-C: longest wait for in-flight requests and streams to finish.
    #[arg(long, env = "CACHECORE_SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = duration)]
    shutdown_timeout: Duration,

    /// Turns on the semantic (L2) cache with the sentence-transformers model in this directory
    /// (model.safetensors, tokenizer.json, config.json, 1_Pooling/config.json; e.g.
    /// bge-small-en-v1.5): a chat request that means the same as a cached one is answered
    /// HIT_L2. With --redis, the vectors are kept in Redis when it has the search module (Redis
    /// Stack, Redis 8), else in this process, with a warning.
    #[cfg(feature = "semantic")]
    #[arg(long, env = "CACHECORE_SEMANTIC_MODEL")]
    semantic_model: Option<std::path::PathBuf>,

    /// Lowest cosine similarity an L2 match may have (with --semantic-model); a request may
    /// raise it with X-CacheCore-Min-Similarity, never lower it.
    #[cfg(feature = "semantic")]
    #[arg(long, env = "CACHECORE_SEMANTIC_THRESHOLD", default_value_t = cachecore::semantic::DEFAULT_THRESHOLD, value_parser = similarity)]
    semantic_threshold: f32,

    /// Longest wait for one embedding (with --semantic-model); past it the request is a miss.
    #[cfg(feature = "semantic")]
    #[arg(long, env = "CACHECORE_SEMANTIC_TIMEOUT", default_value = "250ms", value_parser = nonzero_duration)]
    semantic_timeout: Duration,
}

/// A cosine similarity threshold: a number in [-1, 1].
#[cfg(feature = "semantic")]
fn similarity(text: &str) -> Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(t) if (-1.0..=1.0).contains(&t) => Ok(t),
        _ => Err(format!(
            "{text:?} is not a cosine similarity between -1 and 1 (e.g. 0.92)"
        )),
    }
}

/// The leading number of `text` and the rest (its unit); `what` says what was expected.
fn number_and_unit<'t>(text: &'t str, what: &str) -> Result<(u64, &'t str), String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n = number
        .parse()
        .map_err(|_| format!("{text:?} is not {what}"))?;
    Ok((n, unit))
}

/// A duration: a number with a unit (`ms`, `s`, `m`, `h`), or bare seconds.
fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (n, unit) = number_and_unit(text, "a duration such as 250ms, 30s, 5m or 1h")?;
    let secs = |mul: u64| {
        n.checked_mul(mul)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too long"))
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        other => Err(format!(
            "unknown unit {other:?} in {text:?}: use ms, s, m or h"
        )),
    }
}

/// A duration that must be longer than zero: a zero timeout would fail every request (a zero
/// request-head timeout would close every connection before its first request), and a zero
/// TTL would store entries that are never fresh.
fn nonzero_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        Duration::ZERO => Err(format!("{:?} must be longer than zero", text.trim())),
        d => Ok(d),
    }
}

/// A size in bytes: a number with an optional unit (`KiB`, `MiB`, `GiB`, or `KB`, `MB`, `GB`).
#[cfg(feature = "redis")]
fn byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (n, unit) = number_and_unit(text, "a size such as 64MiB or 1GiB")?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use KiB, MiB or GiB"
            ))
        }
    };
    match n.checked_mul(mul) {
        Some(0) => Err(format!("{text:?}: a near cache needs some room")),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{text:?} is too large")),
    }
}

/// How often the queue's lag, pending count and dead letters are read for `/metrics`.
#[cfg(feature = "redis")]
const QUEUE_METRICS_INTERVAL: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cachecore-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cachecore-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut auth = JwtAuth::new(&args.jwt_secret)?;
    if let Some(aud) = &args.jwt_audience {
        auth = auth.audience(aud);
    }
    if let Some(iss) = &args.jwt_issuer {
        auth = auth.issuer(iss);
    }

    let cache = CachecoreLayer::builder()
        .default_ttl(args.default_ttl)
        .store_timeout(args.store_timeout);
    #[cfg(feature = "redis")]
    let redis_store = match &args.redis {
        Some(url) => {
            let mut store = cachecore::RedisStore::builder().url(url.as_str());
            if let Some(bytes) = args.redis_near_cache {
                store = store.near_cache(bytes);
            }
            tracing::info!(redis = %url, near_cache_bytes = ?args.redis_near_cache, "entries in Redis");
            Some(store.build().await?)
        }
        None => None,
    };
    #[cfg(feature = "redis")]
    let cache = match &redis_store {
        Some(store) => cache.store(store.clone()),
        None => cache,
    };
    #[cfg(not(feature = "redis"))]
    tracing::info!("entries in memory (built without the `redis` feature)");
    #[cfg(feature = "semantic")]
    let cache = match &args.semantic_model {
        Some(dir) => {
            let model = cachecore::semantic::LocalEmbedder::load(dir)
                .map_err(|e| format!("cannot load the semantic model in {}: {e}", dir.display()))?;
            tracing::info!(model = %dir.display(), threshold = args.semantic_threshold, "semantic cache (L2) on");
            #[cfg(feature = "redis")]
            let dims = model.dims();
            let l2 = cachecore::semantic::SemanticCache::new(model)
                .threshold(args.semantic_threshold)
                .timeout(args.semantic_timeout);
            // With Redis, the vectors go beside the entries when Redis has the search module;
            // without it, L2 keeps them in this process and says so (L1 is unaffected).
            #[cfg(feature = "redis")]
            let l2 = match &redis_store {
                Some(store) => match cachecore::semantic::RedisIndex::create(store, dims).await {
                    Ok(index) => {
                        tracing::info!("L2 vectors in Redis (Redis Query Engine)");
                        l2.redis_index(index)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "L2 vectors stay in this process");
                        l2
                    }
                },
                None => l2,
            };
            cache.semantic(l2)
        }
        None => cache,
    };

    let queue_metrics = cachecore::metrics::QueueMetrics::default();
    let mut builder = Gateway::builder(&args.upstream, auth)
        .cache(cache)
        .upstream_connect_timeout(args.upstream_connect_timeout)
        .upstream_timeout(args.upstream_timeout)
        .upstream_idle_timeout(args.upstream_idle_timeout)
        .upstream_max_inflight(args.upstream_max_inflight)
        .upstream_pool_max_idle(args.upstream_pool_max_idle);
    if let Some(key) = &args.upstream_api_key {
        builder = builder.upstream_authorization(HeaderValue::from_str(key)?);
    }
    if let Some(paths) = &args.cacheable_paths {
        builder = builder.cacheable_paths(paths.iter().map(|p| p.trim()).filter(|p| !p.is_empty()));
    }
    #[cfg(feature = "redis")]
    if args.redis.is_some() && !args.no_queue_worker {
        builder = builder.queue_metrics(queue_metrics.clone());
    }
    let gateway = builder.build()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    #[cfg(feature = "redis")]
    let worker = match &args.redis {
        Some(url) if !args.no_queue_worker => {
            Some(start_queue_worker(url, &args, &gateway, &queue_metrics, &stop_rx).await?)
        }
        _ => None,
    };
    let _ = &queue_metrics;

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, upstream = %args.upstream, "gateway ready");
    let options = ServeOptions::default()
        .max_connections(args.max_connections)
        .header_read_timeout(args.header_read_timeout)
        .shutdown_timeout(args.shutdown_timeout);
    let report = gateway::serve(listener, gateway, options, shutdown_signal()).await;
    tracing::info!(
        connections = report.connections,
        open_at_shutdown = report.open_at_shutdown,
        cut = report.cut,
        "HTTP server stopped"
    );

    let _ = stop_tx.send(true);
    drop(stop_rx);
    #[cfg(feature = "redis")]
    if let Some(worker) = worker {
        // The worker finishes (and acknowledges) the event in progress; the rest stays pending
        // for another worker. Bounded like the HTTP drain.
        match tokio::time::timeout(args.shutdown_timeout, worker).await {
            Ok(Ok(Ok(report))) => tracing::info!(
                applied = report.applied,
                dead_lettered = report.dead_lettered,
                "queue worker stopped"
            ),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "queue worker failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "queue worker panicked"),
            Err(_) => tracing::warn!("queue worker did not stop in time"),
        }
    }
    Ok(())
}

#[cfg(feature = "redis")]
type WorkerTask =
    tokio::task::JoinHandle<Result<cachecore::queue::WorkerReport, cachecore::queue::QueueError>>;

/// Starts the invalidation queue worker on the gateway's cache, and a task that reads the
/// queue's lag, pending count and dead letters from Redis for `/metrics`. Both stop when
/// `stop` turns true.
#[cfg(feature = "redis")]
async fn start_queue_worker(
    url: &str,
    args: &Args,
    gateway: &Gateway,
    metrics: &cachecore::metrics::QueueMetrics,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<WorkerTask, Box<dyn std::error::Error>> {
    use cachecore::queue::{dead_letter_stream_for, QueueWorker};

    let worker = QueueWorker::builder(url)
        .stream(&args.queue_stream)
        .group(&args.queue_group)
        .build()
        .await?;
    let client = redis::Client::open(url)?;
    let watch = QueueWatch {
        stream: args.queue_stream.clone(),
        group: args.queue_group.clone(),
        dead_letter: dead_letter_stream_for(&args.queue_stream),
        metrics: metrics.clone(),
    };
    let mut stop_watch = stop.clone();
    tokio::spawn(async move {
        let mut conn = None;
        loop {
            if conn.is_none() {
                conn = client.get_multiplexed_async_connection().await.ok();
            }
            if let Some(c) = &mut conn {
                if let Err(e) = watch.read(c).await {
                    tracing::debug!(error = %e, "cannot read the queue's numbers");
                    watch.unknown();
                    conn = None;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(QUEUE_METRICS_INTERVAL) => {}
                _ = stop_watch.wait_for(|s| *s) => break,
            }
        }
    });
    let cache = gateway.cache().clone();
    let mut stop = stop.clone();
    Ok(tokio::spawn(async move {
        worker
            .run(cache, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    }))
}

/// Reads what Redis knows of the queue: `XINFO GROUPS` (lag, pending) and `XLEN` of the
/// dead-letter stream.
#[cfg(feature = "redis")]
struct QueueWatch {
    stream: String,
    group: String,
    dead_letter: String,
    metrics: cachecore::metrics::QueueMetrics,
}

#[cfg(feature = "redis")]
impl QueueWatch {
    async fn read(&self, conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(conn)
            .await?;
        let group = groups.groups.iter().find(|g| g.name == self.group);
        self.metrics
            .set_lag(group.and_then(|g| g.lag).map(|n| n as u64));
        self.metrics.set_pending(group.map(|g| g.pending as u64));
        let dead: u64 = redis::cmd("XLEN")
            .arg(&self.dead_letter)
            .query_async(conn)
            .await?;
        self.metrics.set_dead_letters(Some(dead));
        Ok(())
    }

    fn unknown(&self) {
        self.metrics.set_lag(None);
        self.metrics.set_pending(None);
        self.metrics.set_dead_letters(None);
    }
}
