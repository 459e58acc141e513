//! Instruction-count probe for a gateway hit over TCP: `gateway_probe N MODE` sends N requests
//! on one kept-alive connection, as `benches/gateway.sh` does with wrk, to
//!
//! - `bare`: the bare hyper server of `support/bare_completion.rs` (the ceiling);
//! - `memory`: `cachecore::gateway::serve` with the in-memory store, every request a hit;
//! - `redis`: the same with `RedisStore` at `$REDIS_URL` (built with `redis`);
//! - `near`: the same with the Redis store's near cache on (every hit a near hit).
//!
//! `benches/gateway_instructions.sh` runs it under callgrind: instructions per request do not
//! move with the machine's load, where req/s do. The client's share is the same in every mode.

use std::sync::LazyLock;
use std::time::Duration;

use cachecore::auth::jwt::{Claims, JwtAuth};
use cachecore::gateway::{serve, Gateway, ServeOptions};
use cachecore::CachecoreLayer;
use memchr::memmem::Finder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "support/bare_completion.rs"]
mod bare_completion;

const SECRET: &str = "gateway-probe-secret-of-at-least-32-bytes";

/// One request and its response on `conn`; returns the length of the response head. Light on
/// purpose (no zeroed buffers, no copies of the head): the client's share is in every mode.
async fn round_trip(conn: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> usize {
    static HEAD_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));
    // hyper writes header names in lower case.
    static LENGTH: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"content-length: "));
    conn.write_all(request).await.expect("write");
    buf.clear();
    loop {
        if let Some(end) = HEAD_END.find(buf) {
            let at = LENGTH.find(&buf[..end]).expect("a length") + 16;
            let digits = buf[at..].iter().take_while(|b| b.is_ascii_digit());
            let len = digits.fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
            while buf.len() < end + 4 + len {
                read_more(conn, buf).await;
            }
            return end;
        }
        read_more(conn, buf).await;
    }
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) {
    buf.reserve(4096);
    let n = conn.read_buf(buf).await.expect("read");
    assert!(n > 0, "the server closed the connection");
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mode = std::env::args().nth(2).unwrap_or_else(|| "memory".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(bare_completion::serve(upstream));
        let auth = JwtAuth::new(SECRET).unwrap();
        let token = auth.mint(&Claims::new("probe", Duration::from_secs(3600)));
        let target = if mode == "bare" {
            upstream_addr
        } else {
            let cache = CachecoreLayer::builder();
            #[cfg(feature = "redis")]
            let cache = match mode.as_str() {
                "redis" | "near" => {
                    let url = std::env::var("REDIS_URL").expect("REDIS_URL for the redis modes");
                    let mut store = cachecore::RedisStore::builder().url(url);
                    if mode == "near" {
                        store = store.near_cache(64 << 20);
                    }
                    cache.store(store.build().await.unwrap())
                }
                _ => cache,
            };
            let gateway = Gateway::builder(format!("http://{upstream_addr}"), auth)
                .cache(cache)
                .build()
                .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(serve(
                listener,
                gateway,
                ServeOptions::default(),
                std::future::pending(),
            ));
            addr
        };
        let body = format!(
            "{{\"model\":\"gpt-4o-mini\",\"temperature\":0,\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
            "q".repeat(480)
        );
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\n\
             Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut conn = TcpStream::connect(target).await.unwrap();
        conn.set_nodelay(true).unwrap();
        let mut buf = Vec::with_capacity(8192);
        // The first request fills the cache.
        round_trip(&mut conn, request.as_bytes(), &mut buf).await;
        // Built once: a searcher built per request would cost the client more in the gateway
        // modes than in the bare one.
        let hit = Finder::new(b"x-cache: HIT_L1");
        for _ in 0..n {
            let head = round_trip(&mut conn, request.as_bytes(), &mut buf).await;
            assert!(
                mode == "bare" || hit.find(&buf[..head]).is_some(),
                "not a hit: {}",
                String::from_utf8_lossy(&buf[..head])
            );
        }
    });
}
