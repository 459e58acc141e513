//! Redis dies in the middle of a steady stream of requests through the layer and comes back:
//! no client request fails at any point, and hits resume once Redis is back. Once with a single
//! Redis, once with one master of a three-master Redis Cluster, where the tenants on the other
//! masters keep their hits however often the dead master's tenants fail.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::store::redis::{RedisStore, RedisStoreBuilder};
use cachecore::CachecoreLayer;
use cachecore::Namespace;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{RedisCluster, RedisServer};
use tokio::task::JoinHandle;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};

/// Concurrent clients in the stream.
const CLIENTS: usize = 4;
/// Distinct prompts they cycle through (so most requests can be hits).
const PROMPTS: usize = 8;
/// Pause between one client's requests.
const PACE: Duration = Duration::from_millis(5);
/// Header the test's namespace resolver reads the tenant from.
const TENANT_HEADER: &str = "x-test-tenant";
/// Consecutive store failures that open the layer's circuit breaker.
const BREAKER_FAILURES: u32 = 5;
/// How long an open breaker skips the store.
const BREAKER_COOLDOWN: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Tally {
    /// `X-Cache` of the requests that started and ended in the current phase.
    by_status: BTreeMap<String, usize>,
    /// Tenants that had at least one hit in the current phase.
    hit_tenants: BTreeSet<String>,
    /// Requests that started in an earlier phase (in flight while Redis was killed or restarted):
    /// they must not fail, but their cache status belongs to neither phase.
    straddled: usize,
    failures: Vec<String>,
    max_latency: Duration,
}

impl Tally {
    fn hits(&self) -> usize {
        self.by_status.get("HIT_L1").copied().unwrap_or(0)
    }

    fn report(&self, label: &str) {
        println!(
            "{label}: {:?} ({} straddled) hits for {:?}, max latency {:?}",
            self.by_status, self.straddled, self.hit_tenants, self.max_latency
        );
    }

    fn absorb(&mut self, other: Tally) {
        for (k, v) in other.by_status {
            *self.by_status.entry(k).or_default() += v;
        }
        self.hit_tenants.extend(other.hit_tenants);
        self.straddled += other.straddled;
        self.failures.extend(other.failures);
        self.max_latency = self.max_latency.max(other.max_latency);
    }
}

/// The upstream: answers every prompt with a body derived from it, and counts its calls.
fn upstream() -> impl Service<
    Request<cachecore::RequestBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|req: Request<_>| async move {
        let body: Bytes = BodyExt::collect(req.into_body())
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let answer = format!("{{\"answer\":{}}}", String::from_utf8_lossy(&body));
        Ok::<_, Infallible>(
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(answer)))
                .unwrap(),
        )
    })
}

/// A stream of requests for `tenants` through the layer on the store `store` builds, in front
/// of [`upstream`].
async fn stream_through(store: RedisStoreBuilder, tenants: &'static [&'static str]) -> Stream {
    let store = store
        .timeout(Duration::from_millis(250))
        .build()
        .await
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer(store))
        .service(upstream());
    Stream::start(svc, tenants)
}

/// One request for `tenant` with prompt number `n`, as the stream sends it.
fn request(tenant: &str, n: usize) -> (Request<Full<Bytes>>, String) {
    let prompt = format!("{{\"prompt\":\"question {}\"}}", n % PROMPTS);
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header(TENANT_HEADER, tenant)
        .body(Full::new(Bytes::from(prompt.clone())))
        .unwrap();
    (req, prompt)
}

/// The layer under test: short store timeout, a circuit breaker, the tenant from a header.
fn layer(store: RedisStore) -> CachecoreLayer {
    CachecoreLayer::builder()
        .store(store)
        .namespace_resolver(|head| {
            let tenant = head.headers.get(TENANT_HEADER)?.to_str().ok()?;
            Some(Namespace::new(tenant.to_owned(), "1"))
        })
        .store_timeout(Duration::from_millis(250))
        .circuit_breaker(BREAKER_FAILURES, BREAKER_COOLDOWN)
        .build()
}

/// A steady stream of requests from [`CLIENTS`] tasks, each request tallied under the phase it
/// started in.
struct Stream {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    phase: Arc<AtomicU8>,
    clients: Vec<JoinHandle<()>>,
}

impl Stream {
    fn start<S, B>(svc: S, tenants: &'static [&'static str]) -> Self
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
        B: http_body::Body + Send,
        B::Data: Send,
        B::Error: std::fmt::Display,
    {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU8::new(0));
        let clients = (0..CLIENTS)
            .map(|c| {
                let (svc, tally, stop, paused, phase) = (
                    svc.clone(),
                    Arc::clone(&tally),
                    Arc::clone(&stop),
                    Arc::clone(&paused),
                    Arc::clone(&phase),
                );
                tokio::spawn(async move {
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) {
                        if paused.load(Ordering::Relaxed) {
                            tokio::time::sleep(PACE).await;
                            continue;
                        }
                        let tenant = tenants[i % tenants.len()];
                        let (req, prompt) = request(tenant, i);
                        i += 1;
                        let started = Instant::now();
                        let started_in = phase.load(Ordering::SeqCst);
                        let outcome = ask(svc.clone(), req, &prompt).await;
                        let took = started.elapsed();
                        {
                            let mut t = tally.lock().unwrap();
                            t.max_latency = t.max_latency.max(took);
                            match outcome {
                                Ok(_) if started_in != phase.load(Ordering::SeqCst) => {
                                    t.straddled += 1
                                }
                                Ok(x_cache) => {
                                    if x_cache == "HIT_L1" {
                                        t.hit_tenants.insert(tenant.to_owned());
                                    }
                                    *t.by_status.entry(x_cache).or_default() += 1
                                }
                                Err(e) => t.failures.push(e),
                            }
                        }
                        tokio::time::sleep(PACE).await;
                    }
                })
            })
            .collect();
        Self {
            tally,
            stop,
            paused,
            phase,
            clients,
        }
    }

    /// Stops sending (requests in flight finish) or starts again.
    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Starts a new phase: requests already in flight are not counted in it, and neither is
    /// anything tallied before it (a hit that landed while a node was being killed belongs to
    /// the old phase). The phase moves under the tally's lock, where each request is tallied,
    /// so no request is counted in a phase it did not start in.
    fn next_phase(&self) {
        let old = {
            let mut tally = self.tally.lock().unwrap();
            self.phase.fetch_add(1, Ordering::SeqCst);
            std::mem::take(&mut *tally)
        };
        old.report("end of phase");
        assert!(old.failures.is_empty(), "end of phase: {:?}", old.failures);
    }

    /// What was tallied since the last call.
    fn take(&self, label: &str) -> Tally {
        let t = std::mem::take(&mut *self.tally.lock().unwrap());
        t.report(label);
        assert!(t.failures.is_empty(), "{label}: {:?}", t.failures);
        t
    }

    /// Tallies until `done` holds, for at most `limit`.
    async fn until(&self, label: &str, limit: Duration, done: impl Fn(&Tally) -> bool) -> Tally {
        let deadline = Instant::now() + limit;
        let mut seen = Tally::default();
        while !done(&seen) {
            assert!(
                Instant::now() < deadline,
                "{label}: never got there: {:?}, hits for {:?}",
                seen.by_status,
                seen.hit_tenants
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen.absorb(std::mem::take(&mut *self.tally.lock().unwrap()));
            assert!(seen.failures.is_empty(), "{label}: {:?}", seen.failures);
        }
        seen.report(label);
        seen
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in std::mem::take(&mut self.clients) {
            c.await.unwrap();
        }
        self.take("rest");
    }
}

/// Sends one request and checks the answer is the upstream's for this prompt.
async fn ask<S, B>(svc: S, req: Request<Full<Bytes>>, prompt: &str) -> Result<String, String>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: std::fmt::Display,
{
    let res = svc
        .oneshot(req)
        .await
        .map_err(|e| format!("service error: {}", e.into()))?;
    let status = res.status();
    let x_cache = res
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body error: {e}"))?
        .to_bytes();
    let want = format!("{{\"answer\":{prompt}}}");
    if status == StatusCode::OK && body == want.as_bytes() {
        Ok(x_cache)
    } else {
        Err(format!("{status} {x_cache} {body:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dies_mid_stream_and_no_request_fails() {
    let mut server = RedisServer::start();
    let stream = stream_through(RedisStore::builder().url(server.url()), &["fault-test"]).await;

    // Redis up: the stream settles into hits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(stream.take("before").hits() > 0);

    // Redis is killed (like a crash) mid-stream. A request whose reply Redis sent before it died
    // may still be a hit; only requests that start once the process is gone count here.
    server.kill();
    stream.next_phase();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let during = stream.take("during");
    assert!(during.by_status.values().sum::<usize>() > 0);
    assert_eq!(during.hits(), 0, "Redis is down, nothing to hit");

    // Redis is back on the same port (empty); hits resume without a new store.
    server.restart();
    stream.next_phase();
    stream
        .until("after", Duration::from_secs(10), |t| t.hits() >= 20)
        .await;
    stream.stop().await;
}

/// Tenants whose hash tags spread over all three masters' slots.
const CLUSTER_TENANTS: &[&str] = &["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_dies_and_only_its_tenants_lose_their_hits() {
    let mut cluster = RedisCluster::start();
    let killed = 1;
    let port = cluster.nodes()[killed].port();
    let (on_killed, healthy): (Vec<&str>, Vec<&str>) = CLUSTER_TENANTS
        .iter()
        .copied()
        .partition(|t| cluster.node_for_tag(t) == port);
    assert!(
        !on_killed.is_empty() && !healthy.is_empty(),
        "the test tenants must land on the killed master and on the others: {on_killed:?}"
    );
    let store = RedisStore::builder()
        .cluster(cluster.urls())
        .timeout(Duration::from_millis(250))
        .build()
        .await
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer(store))
        .service(upstream());
    let stream = Stream::start(svc.clone(), CLUSTER_TENANTS);

    // Every tenant settles into hits.
    stream
        .until("before", Duration::from_secs(10), |t| {
            t.hit_tenants.len() == CLUSTER_TENANTS.len()
        })
        .await;
    // The probes below ask each healthy tenant its first prompt: make sure it is stored.
    for t in &healthy {
        let (req, prompt) = request(t, 0);
        ask(svc.clone(), req, &prompt).await.unwrap();
        let (req, prompt) = request(t, 0);
        assert_eq!(ask(svc.clone(), req, &prompt).await.unwrap(), "HIT_L1");
    }

    // One master dies (well inside the cluster's node timeout, so the others keep serving their
    // slots). Its tenants cannot hit; no request fails.
    cluster.nodes_mut()[killed].kill();
    stream.next_phase();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let during = stream.take("during");
    assert!(during.by_status.values().sum::<usize>() > 0);
    for t in &on_killed {
        assert!(
            !during.hit_tenants.contains(*t),
            "{t} lives on the dead master, yet hit"
        );
    }

    // The dead master's tenants fail many times in a row, with nothing in between (the stream
    // paused, its requests in flight finished): far more consecutive store failures than the
    // breaker's threshold. That must not stop the other tenants' hits: the dead master is not
    // theirs.
    stream.pause(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let burst: Vec<_> = (0..3 * BREAKER_FAILURES as usize)
        .map(|n| {
            let (req, prompt) = request(on_killed[n % on_killed.len()], n);
            let svc = svc.clone();
            tokio::spawn(async move { ask(svc, req, &prompt).await })
        })
        .collect();
    for call in burst {
        let x_cache = call.await.unwrap().expect("no request fails");
        assert_ne!(x_cache, "HIT_L1");
    }
    for t in &healthy {
        let (req, prompt) = request(t, 0);
        assert_eq!(
            ask(svc.clone(), req, &prompt).await.unwrap(),
            "HIT_L1",
            "{t} is on a live master, yet lost its hit after failures on the dead one"
        );
    }
    stream.pause(false);

    // It comes back (empty, same slots); the same store reconnects and every tenant hits again.
    cluster.restart_node(killed);
    stream.next_phase();
    stream
        .until("after", Duration::from_secs(20), |t| {
            on_killed.iter().all(|k| t.hit_tenants.contains(*k))
                && t.hit_tenants.len() == CLUSTER_TENANTS.len()
        })
        .await;
    stream.stop().await;
}
