//! An OpenAI-compatible caching proxy that speaks the hosted product's wire format.
//!
//! ```text
//! cargo run --example gateway --features gateway,jwt -- \
//!     --upstream http://127.0.0.1:9000 --jwt-secret "$SECRET" [--listen 127.0.0.1:8080]
//! cargo run --example gateway --features gateway,jwt,redis -- ... --redis redis://127.0.0.1:6379/
//! ```
//!
//! Every flag can come from the environment instead: `CACHECORE_UPSTREAM`, `CACHECORE_LISTEN`,
//! `CACHECORE_REDIS_URL`, `CACHECORE_JWT_SECRET`, `CACHECORE_UPSTREAM_API_KEY` for
//! `--upstream-api-key` (the `Authorization` value sent upstream in place of the caller's) and
//! `CACHECORE_CACHEABLE_PATHS` for `--cacheable-paths` (comma-separated `[METHOD ]PATH` entries,
//! a trailing `*` for a prefix; default: the `POST`s of `/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/moderations`, `/v1/responses`).
//!
//! - every path is forwarded to the upstream (streaming included) in trusted-header mode:
//!   `Authorization: Bearer [cc_live_<id>.]<jwt>` or `X-CacheCore-Token` name the tenant (none:
//!   `BYPASS`), `X-CacheCore-Deps` the deps. Only the cacheable paths go through the cache, and
//!   not when the body asks the provider to store the result (`"store": true`; on
//!   `/v1/responses`, anything but `"store": false`); the rest is `BYPASS`;
//! - the tenant token never goes upstream: without `--upstream-api-key`, a `Bearer` token in
//!   `Authorization` is dropped unless the tenant token came in `X-CacheCore-Token` (then
//!   `Authorization` is the caller's provider key and goes on), and provider keys in headers of
//!   their own (`X-Api-Key`, ...) are forwarded;
//! - `POST /v1/invalidate`, `GET /health`, `GET /metrics` are served by the gateway;
//! - with `--redis`, entries live in Redis (shared by every gateway instance), and an
//!   invalidation queue worker applies events published to the `cachecore:invalidations`
//!   stream;
//! - one log line per request: method, path, status, `X-Cache`, time (`RUST_LOG` filters).

use std::net::SocketAddr;
use std::process::ExitCode;

use cachecore::auth::jwt::JwtAuth;
use cachecore::gateway::Gateway;
use cachecore::CachecoreLayer;
use http::HeaderValue;

const USAGE: &str =
    "usage: gateway --upstream URL --jwt-secret SECRET [--listen ADDR] [--redis URL]
               [--upstream-api-key VALUE] [--cacheable-paths 'POST /v1/chat/completions,...']
  each flag may come from the environment: CACHECORE_UPSTREAM, CACHECORE_JWT_SECRET,
  CACHECORE_LISTEN (default 127.0.0.1:8080), CACHECORE_REDIS_URL, CACHECORE_UPSTREAM_API_KEY,
  CACHECORE_CACHEABLE_PATHS (default: the POSTs of /v1/chat/completions, /v1/completions,
  /v1/embeddings, /v1/moderations, /v1/responses)";

/// The address listened on when none is given: loopback only, so that a gateway is never
/// exposed by accident.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

#[derive(Debug)]
struct Args {
    upstream: String,
    listen: SocketAddr,
    redis: Option<String>,
    jwt_secret: String,
    upstream_api_key: Option<String>,
    /// `None`: the gateway's default list.
    cacheable_paths: Option<Vec<String>>,
}

/// Flags win over the environment.
fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut upstream = env("CACHECORE_UPSTREAM");
    let mut listen = env("CACHECORE_LISTEN");
    let mut redis = env("CACHECORE_REDIS_URL");
    let mut jwt_secret = env("CACHECORE_JWT_SECRET");
    let mut upstream_api_key = env("CACHECORE_UPSTREAM_API_KEY");
    let mut cacheable_paths = env("CACHECORE_CACHEABLE_PATHS");
    while let Some(flag) = argv.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (flag.clone(), None),
        };
        let slot = match name.as_str() {
            "--upstream" => &mut upstream,
            "--listen" => &mut listen,
            "--redis" => &mut redis,
            "--jwt-secret" => &mut jwt_secret,
            "--upstream-api-key" => &mut upstream_api_key,
            "--cacheable-paths" => &mut cacheable_paths,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        };
        let value = match inline {
            Some(v) => v,
            None => argv.next().ok_or_else(|| format!("{name} needs a value"))?,
        };
        *slot = Some(value);
    }
    let listen = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    Ok(Args {
        upstream: upstream.ok_or("--upstream (or CACHECORE_UPSTREAM) is required")?,
        listen: listen
            .parse()
            .map_err(|e| format!("--listen {listen:?}: {e}"))?,
        redis,
        jwt_secret: jwt_secret.ok_or("--jwt-secret (or CACHECORE_JWT_SECRET) is required")?,
        upstream_api_key,
        cacheable_paths: cacheable_paths.map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(str::to_owned)
                .collect()
        }),
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("gateway: {e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cache = match &args.redis {
        #[cfg(feature = "redis")]
        Some(url) => {
            tracing::info!(redis = %url, "entries in Redis");
            CachecoreLayer::builder().store(cachecore::RedisStore::connect(url).await?)
        }
        #[cfg(not(feature = "redis"))]
        Some(_) => return Err("--redis needs the example built with --features redis".into()),
        None => {
            tracing::info!("entries in memory (no --redis given)");
            CachecoreLayer::builder()
        }
    };

    let mut builder = Gateway::builder(&args.upstream, JwtAuth::new(&args.jwt_secret)).cache(cache);
    if let Some(key) = &args.upstream_api_key {
        builder = builder.upstream_authorization(HeaderValue::from_str(key)?);
    }
    if let Some(paths) = &args.cacheable_paths {
        builder = builder.cacheable_paths(paths);
    }
    let gateway = builder.build()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    #[cfg(feature = "redis")]
    let worker = match &args.redis {
        Some(url) => {
            let worker = cachecore::queue::QueueWorker::builder(url.as_str())
                .build()
                .await?;
            let cache = gateway.cache().clone();
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(async move {
                worker
                    .run(cache, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            }))
        }
        None => None,
    };

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, upstream = %args.upstream, "gateway ready");
    let app = axum::Router::new().fallback_service(gateway);
    let mut stop = stop_rx;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        })
        .await?;
    let _ = stop_tx.send(true);
    #[cfg(feature = "redis")]
    if let Some(worker) = worker {
        worker.await??;
    }
    Ok(())
}
