//! The `cachecore-gateway` binary, run as an operator runs it: its `--help`, its refusal of a
//! weak secret, and a SIGTERM while a stream is in flight. Everything on 127.0.0.1.
#![cfg(all(feature = "gateway", unix))]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use cachecore::auth::jwt::{Claims, JwtAuth};
use http::{Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, Semaphore};

#[cfg(all(feature = "semantic", feature = "redis"))]
mod support;

const BIN: &str = env!("CARGO_BIN_EXE_cachecore-gateway");
const SECRET: &str = "gateway-bin-secret-0123456789abcdef";

/// Every flag of the binary and the variable it can come from.
const FLAGS: &[(&str, &str)] = &[
    ("--listen", "CACHECORE_LISTEN"),
    ("--upstream", "CACHECORE_UPSTREAM"),
    ("--jwt-secret", "CACHECORE_JWT_SECRET"),
    ("--jwt-audience", "CACHECORE_JWT_AUDIENCE"),
    ("--jwt-issuer", "CACHECORE_JWT_ISSUER"),
    ("--upstream-api-key", "CACHECORE_UPSTREAM_API_KEY"),
    ("--cacheable-paths", "CACHECORE_CACHEABLE_PATHS"),
    ("--default-ttl", "CACHECORE_DEFAULT_TTL"),
    ("--store-timeout", "CACHECORE_STORE_TIMEOUT"),
    #[cfg(feature = "redis")]
    ("--redis", "CACHECORE_REDIS_URL"),
    #[cfg(feature = "redis")]
    ("--queue-stream", "CACHECORE_QUEUE_STREAM"),
    #[cfg(feature = "redis")]
    ("--queue-group", "CACHECORE_QUEUE_GROUP"),
    #[cfg(feature = "redis")]
    ("--no-queue-worker", "CACHECORE_NO_QUEUE_WORKER"),
    #[cfg(feature = "redis")]
    ("--redis-near-cache", "CACHECORE_REDIS_NEAR_CACHE"),
    (
        "--upstream-connect-timeout",
        "CACHECORE_UPSTREAM_CONNECT_TIMEOUT",
    ),
    ("--upstream-timeout", "CACHECORE_UPSTREAM_TIMEOUT"),
    ("--upstream-idle-timeout", "CACHECORE_UPSTREAM_IDLE_TIMEOUT"),
    ("--upstream-max-inflight", "CACHECORE_UPSTREAM_MAX_INFLIGHT"),
    (
        "--upstream-pool-max-idle",
        "CACHECORE_UPSTREAM_POOL_MAX_IDLE",
    ),
    ("--max-connections", "CACHECORE_MAX_CONNECTIONS"),
    ("--header-read-timeout", "CACHECORE_HEADER_READ_TIMEOUT"),
    ("--shutdown-timeout", "CACHECORE_SHUTDOWN_TIMEOUT"),
    #[cfg(feature = "semantic")]
    ("--semantic-model", "CACHECORE_SEMANTIC_MODEL"),
    #[cfg(feature = "semantic")]
    ("--semantic-threshold", "CACHECORE_SEMANTIC_THRESHOLD"),
    #[cfg(feature = "semantic")]
    ("--semantic-timeout", "CACHECORE_SEMANTIC_TIMEOUT"),
];

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // Each flag's entry runs from its line to the next flag's: its variable is in it.
    let entries: Vec<&str> = help.split("\n      -").collect();
    for (flag, env) in FLAGS {
        let entry = entries
            .iter()
            .find(|e| {
                let name = e.trim_start_matches('-');
                name.starts_with(&flag[2..]) && name[flag.len() - 2..].starts_with([' ', '\n'])
            })
            .unwrap_or_else(|| panic!("{flag} missing from\n{help}"));
        assert!(
            entry.contains(&format!("[env: {env}")),
            "{flag} does not name {env}:\n{entry}"
        );
    }
    let documented = help.matches("[env: ").count();
    assert_eq!(documented, FLAGS.len(), "a flag is not in FLAGS:\n{help}");
    // Secrets never show their value, even when set.
    let out = Command::new(BIN)
        .arg("--help")
        .env("CACHECORE_JWT_SECRET", "do-not-print-me")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("do-not-print-me"));
}

#[test]
fn a_weak_secret_or_a_bad_duration_is_refused_at_start_up() {
    let out = Command::new(BIN)
        .args(["--upstream", "http://127.0.0.1:9", "--jwt-secret", "short"])
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("CACHECORE_LISTEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 32"), "{err}");

    let out = Command::new(BIN)
        .args(["--upstream", "http://127.0.0.1:9", "--jwt-secret", SECRET])
        .args(["--shutdown-timeout", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shutdown-timeout"));
}

/// How `command` exits, given 10 s: a gateway that starts instead of refusing its arguments
/// would serve until killed, so it is killed then and the test fails.
fn exit_of(command: &mut Command) -> std::process::Output {
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the gateway started: {command:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_zero_timeout_or_ttl_is_refused_at_start_up() {
    // A zero wait would fail every request, and a zero request-head timeout would close every
    // connection before its first request: each is a usage error, not a gateway that runs.
    let mut flags = vec![
        "--default-ttl",
        "--store-timeout",
        "--upstream-connect-timeout",
        "--upstream-timeout",
        "--upstream-idle-timeout",
        "--header-read-timeout",
    ];
    if cfg!(feature = "semantic") {
        flags.push("--semantic-timeout");
    }
    for flag in flags {
        for zero in ["0", "0s", "0ms", " 0m"] {
            let out = exit_of(
                Command::new(BIN)
                    .args(["--upstream", "http://127.0.0.1:9", "--jwt-secret", SECRET])
                    .args(["--listen", "127.0.0.1:0"])
                    .arg(format!("{flag}={zero}")),
            );
            assert_eq!(out.status.code(), Some(2), "{flag}={zero}: a usage error");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(flag) && err.contains("longer than zero"),
                "{flag}={zero}: {err}"
            );
        }
    }
}

#[cfg(feature = "semantic")]
#[test]
fn a_bad_semantic_threshold_or_model_is_refused_at_start_up() {
    for threshold in ["1.5", "-2", "high"] {
        let out = Command::new(BIN)
            .args(["--upstream", "http://127.0.0.1:9", "--jwt-secret", SECRET])
            .arg(format!("--semantic-threshold={threshold}"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{threshold}: a usage error");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("between -1 and 1"), "{threshold}: {err}");
    }
    let out = Command::new(BIN)
        .args(["--upstream", "http://127.0.0.1:9", "--jwt-secret", SECRET])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--semantic-model", "/nonexistent/model"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot load the semantic model"), "{err}");
}

/// A body fed by a channel: each message is one frame.
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

/// An upstream whose streamed answer holds its last events until `gate` gets a permit.
async fn start_upstream(gate: Arc<Semaphore>) -> SocketAddr {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let gate = Arc::clone(&gate);
            async move {
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    let _ = tx
                        .send(Bytes::from_static(b"data: {\"delta\":\"Hel\"}\n\n"))
                        .await;
                    gate.acquire().await.unwrap().forget();
                    let _ = tx
                        .send(Bytes::from_static(b"data: {\"delta\":\"lo\"}\n\n"))
                        .await;
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                });
                (
                    [("content-type", "text/event-stream")],
                    axum::body::Body::new(ChannelBody(rx)),
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Kills the gateway if a test fails before it exits.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Starts the binary in front of `upstream` on a free port, with `extra` flags, and waits until
/// `/health` answers.
async fn start_gateway(upstream: SocketAddr, extra: &[&str]) -> (Gateway, SocketAddr, Http) {
    let addr = free_addr();
    let gateway = Gateway(
        Command::new(BIN)
            .args(["--listen", &addr.to_string()])
            .args(["--upstream", &format!("http://{upstream}")])
            .args(["--shutdown-timeout", "10s"])
            .args(extra)
            .env("CACHECORE_JWT_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = http
            .request(
                Request::get(format!("http://{addr}/health"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        if matches!(res, Ok(ref r) if r.status() == StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (gateway, addr, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_stream_in_flight_and_refuses_new_connections() {
    let gate = Arc::new(Semaphore::new(0));
    let upstream = start_upstream(Arc::clone(&gate)).await;
    let (mut gateway, addr, http) = start_gateway(upstream, &[]).await;

    let token = JwtAuth::new(SECRET)
        .unwrap()
        .mint(&Claims::new("acme", Duration::from_secs(60)));
    let res = http
        .request(
            Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"m","stream":true,"messages":[]}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"data: "));

    let killed = Command::new("kill")
        .args(["-TERM", &gateway.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    // New connections are refused while the stream is still open.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gateway.0.try_wait().unwrap().is_none(), "exited mid-stream");

    // The stream completes, then the process exits cleanly.
    gate.add_permits(1);
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(rest.ends_with(b"data: [DONE]\n\n"), "{rest:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = gateway.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the gateway did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

/// The seed's first recipe, with curl's requests, against the binary itself: a cached answer,
/// its dep invalidated over HTTP, the next request a miss; bad input refused with a JSON error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_recipe_works_against_the_binary() {
    webhook_recipe(&[]).await;
}

/// The same recipe with the entries in Redis and the near cache on: the invalidation made
/// through this instance drops its near copy before the answer.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_recipe_works_with_redis_and_the_near_cache() {
    let redis = support::RedisServer::start();
    let url = redis.url();
    webhook_recipe(&[
        "--redis",
        url.as_str(),
        "--redis-near-cache",
        "1MiB",
        "--no-queue-worker",
    ])
    .await;
}

/// Two instances with near caches on one Redis: an invalidation sent to one stops the other
/// serving its near copy within a bound (the push's way), with no request to the other.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_through_one_instance_reaches_the_other_near_cache() {
    let redis = support::RedisServer::start();
    let url = redis.url();
    let upstream = start_upstream(Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))).await;
    let flags = [
        "--redis",
        url.as_str(),
        "--redis-near-cache",
        "1MiB",
        "--no-queue-worker",
    ];
    let (_a, a, http) = start_gateway(upstream, &flags).await;
    let (_b, b, _) = start_gateway(upstream, &flags).await;
    let token = JwtAuth::new(SECRET)
        .unwrap()
        .mint(&Claims::new("acme", Duration::from_secs(60)));
    let deps = cachecore::wire::encode_deps(&[cachecore::Dep::new("doc:7")]);
    let send = |addr: SocketAddr, path: &'static str, body: &'static str| {
        let req = Request::post(format!("http://{addr}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .header("x-cachecore-deps", deps.as_str())
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let http = http.clone();
        async move {
            let res = http.request(req).await.unwrap();
            let x_cache = res
                .headers()
                .get("x-cache")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            res.into_body().collect().await.unwrap();
            x_cache
        }
    };
    const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"Summarise doc 7"}]}"#;
    assert_eq!(send(b, "/v1/chat/completions", CHAT).await, "MISS");
    // Served twice by b: the second from its near copy.
    assert_eq!(send(b, "/v1/chat/completions", CHAT).await, "HIT_L1");
    assert_eq!(send(b, "/v1/chat/completions", CHAT).await, "HIT_L1");
    send(a, "/v1/invalidate", r#"{"dep_id":"doc:7"}"#).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let seen = send(b, "/v1/chat/completions", CHAT).await;
        if seen == "MISS" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other instance still answers {seen} 2 s after the invalidation"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(feature = "redis")]
#[test]
fn a_bad_near_cache_size_is_refused_at_start_up() {
    for size in ["0", "lots", "5TB", "99999999999999999999GiB"] {
        let out = Command::new(BIN)
            .args(["--upstream", "http://127.0.0.1:9", "--jwt-secret", SECRET])
            .arg(format!("--redis-near-cache={size}"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{size}: a usage error");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--redis-near-cache"),
            "{size}"
        );
    }
}

/// A near cache is a `RedisStore` option: asked for without `--redis` (where entries stay in
/// memory and it would do nothing), start-up stops and says so.
#[cfg(feature = "redis")]
#[test]
fn a_near_cache_without_redis_is_refused_at_start_up() {
    let out = exit_of(
        Command::new(BIN)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:9",
            ])
            .args(["--jwt-secret", SECRET, "--redis-near-cache", "64MiB"])
            .env_remove("CACHECORE_REDIS_URL"),
    );
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--redis <REDIS>"), "{stderr}");
}

/// Cached SSE answer, a bad `new_hash` refused with 422, invalidation over HTTP, then a miss,
/// against the binary started with `extra` flags.
async fn webhook_recipe(extra: &[&str]) {
    // The upstream streams its whole answer at once.
    let upstream = start_upstream(Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))).await;
    let (_gateway, addr, http) = start_gateway(upstream, extra).await;
    let token = JwtAuth::new(SECRET)
        .unwrap()
        .mint(&Claims::new("acme", Duration::from_secs(60)));
    let deps = cachecore::wire::encode_deps(&[cachecore::Dep::new("doc:contract-123").hash("v1")]);
    let send = |path: &str, body: &'static str, with_deps: bool| {
        let mut req = Request::post(format!("http://{addr}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json");
        if with_deps {
            req = req.header("x-cachecore-deps", deps.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let http = http.clone();
        async move {
            let res = http.request(req).await.unwrap();
            let status = res.status();
            let x_cache = res
                .headers()
                .get("x-cache")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, x_cache, String::from_utf8_lossy(&body).into_owned())
        }
    };
    const CHAT: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Summarise contract 123"}]}"#;

    let first = send("/v1/chat/completions", CHAT, true).await;
    assert_eq!((first.0, first.1.as_str()), (StatusCode::OK, "MISS"));
    let again = send("/v1/chat/completions", CHAT, true).await;
    assert_eq!(again.1, "HIT_L1");
    assert_eq!(again.2, first.2, "a hit replays the stream byte for byte");

    let bad = send(
        "/v1/invalidate",
        r#"{"dep_id":"doc:contract-123","new_hash":"v 2"}"#,
        false,
    )
    .await;
    assert_eq!(bad.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.2);
    assert!(bad.2.contains("invalid_new_hash"), "{}", bad.2);
    assert_eq!(send("/v1/chat/completions", CHAT, true).await.1, "HIT_L1");

    let done = send(
        "/v1/invalidate",
        r#"{"dep_id":"doc:contract-123","new_hash":"v2"}"#,
        false,
    )
    .await;
    assert_eq!(done.0, StatusCode::OK, "{}", done.2);
    assert!(done.2.contains(r#""keys_deleted":1"#), "{}", done.2);
    assert_eq!(send("/v1/chat/completions", CHAT, true).await.1, "MISS");
}

/// With `--semantic-model`, a paraphrase is answered `HIT_L2` by the binary, and a negation is
/// not. Needs the test model (scripts/fetch-semantic-assets); `scripts/test` fetches it.
#[cfg(feature = "semantic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_answers_a_paraphrase_from_l2() {
    paraphrase_through_the_binary(&[]).await;
}

/// With `--redis` on a Redis Stack, the binary keeps L2's vectors in Redis beside the entries.
#[cfg(all(feature = "semantic", feature = "redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stack_the_binary_keeps_l2_vectors_in_redis() {
    let redis = support::RedisServer::start_stack();
    let url = redis.url();
    paraphrase_through_the_binary(&["--redis", &url, "--no-queue-worker"]).await;
    let l2 = support::cli(redis.port(), &["--raw", "KEYS", "cc:{acme}:l2:*"]);
    // One per miss: the question, the order to cancel and its negation (the paraphrase hit).
    assert_eq!(l2.lines().filter(|l| !l.is_empty()).count(), 3, "{l2}");
}

/// With `--redis` on a Redis without the search module, L2 keeps its vectors in the process
/// (and logs a warning): paraphrases still hit, and nothing of L2 is written to Redis.
#[cfg(all(feature = "semantic", feature = "redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_search_module_the_binary_keeps_l2_in_process() {
    let redis = support::RedisServer::start();
    let url = redis.url();
    paraphrase_through_the_binary(&["--redis", &url, "--no-queue-worker"]).await;
    let l1 = support::cli(redis.port(), &["--raw", "KEYS", "cc:{acme}:l1:*"]);
    assert!(!l1.trim().is_empty(), "entries are in Redis");
    let l2 = support::cli(redis.port(), &["--raw", "KEYS", "cc:{acme}:l2:*"]);
    assert!(l2.trim().is_empty(), "{l2}");
}

/// A paraphrase is `HIT_L2` and a negation is not, through the binary started with `extra`.
#[cfg(feature = "semantic")]
async fn paraphrase_through_the_binary(extra: &[&str]) {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/assets/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").exists() {
        let how = "the test model is missing: run scripts/fetch-semantic-assets";
        assert!(
            std::env::var_os("CACHECORE_REQUIRE_ASSETS").is_none(),
            "{how}"
        );
        eprintln!("skipped: {how}");
        return;
    }
    let upstream = start_upstream(Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))).await;
    let dir = dir.to_string_lossy().into_owned();
    // A generous embedding timeout: this is about the flags, not the model's speed.
    let flags = [
        "--semantic-model",
        &dir,
        "--semantic-threshold",
        "0.85",
        "--semantic-timeout",
        "30s",
    ];
    let flags: Vec<&str> = flags.iter().chain(extra).copied().collect();
    let (_gateway, addr, http) = start_gateway(upstream, &flags).await;
    let token = JwtAuth::new(SECRET)
        .unwrap()
        .mint(&Claims::new("acme", Duration::from_secs(60)));
    let ask = |question: &str| {
        let body = format!(
            r#"{{"model":"m","temperature":0,"messages":[{{"role":"user","content":"{question}"}}]}}"#
        );
        let req = Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let http = http.clone();
        async move {
            let res = http.request(req).await.unwrap();
            let header = |name: &str| {
                res.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            };
            let seen = (header("x-cache"), header("x-cache-similarity"));
            res.into_body().collect().await.unwrap();
            seen
        }
    };
    assert_eq!(
        ask("What is the fastest way to learn touch typing?")
            .await
            .0,
        "MISS"
    );
    let (status, similarity) = ask("What is the fastest way to learn touch-typing?").await;
    assert_eq!(status, "HIT_L2");
    assert!(similarity.parse::<f32>().unwrap() >= 0.85, "{similarity}");
    ask("Cancel my order please").await;
    assert_eq!(ask("Don't cancel my order please").await.0, "MISS");
}
