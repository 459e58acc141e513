//! The caching gateway composed by hand: what the `cachecore-gateway` binary does, in a few
//! lines, for a service that wants to embed it or add routes of its own.
//!
//! ```text
//! CACHECORE_UPSTREAM=http://127.0.0.1:9000 CACHECORE_JWT_SECRET=... \
//!     cargo run --example gateway --features gateway
//! ```
//!
//! For production, run the binary instead (`cargo run --features gateway --bin
//! cachecore-gateway -- --help`): it adds the command line, the Redis store and queue worker,
//! and SIGTERM handling.

use std::time::Duration;

use cachecore::auth::jwt::JwtAuth;
use cachecore::gateway::{serve, Gateway, ServeOptions};
use cachecore::CachecoreLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let upstream = std::env::var("CACHECORE_UPSTREAM")?;
    let secret = std::env::var("CACHECORE_JWT_SECRET")?;

    // The cache (in memory here; `.store(RedisStore::connect(url).await?)` to share it), the
    // tenants' authenticator, and the limits towards the upstream.
    let gateway = Gateway::builder(upstream, JwtAuth::new(secret)?)
        .cache(CachecoreLayer::builder().default_ttl(Duration::from_secs(600)))
        .upstream_timeout(Duration::from_secs(120))
        .build()?;

    // Served until Ctrl-C, then drained: in-flight requests and streams finish first.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    let report = serve(listener, gateway, ServeOptions::default(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    println!("served {} connections", report.connections);
    Ok(())
}
