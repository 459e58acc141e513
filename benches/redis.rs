//! `RedisStore` measures (issue 3), against a `redis-server` this bench starts on a free
//! loopback port:
//!
//! 1. hit throughput and latency through the layer at concurrency 1 and 32, with and without the
//!    near cache, against a raw `GET` of a value of the same size with the same client library
//!    and connection type;
//! 2. a dep tagged on 100,000 entries: time until readers miss (the epoch bump), time until
//!    every entry is reclaimed, and the worst latency of concurrent hits meanwhile;
//! 3. bytes Redis uses per entry with a 1 KiB body;
//! 4. the near cache's cross-process window: how long after another store's invalidation
//!    returned a store with a near cache stops serving the entry (the end of its last lookup
//!    that still served it; the start of its first lookup that missed is printed too, as an
//!    upper bound), p50/p99, at idle and under a c=32 hit load on the near store.
//!
//! ```text
//! cargo bench --features redis --bench redis
//! BENCH_SECS=10 BENCH_ENTRIES=100000 cargo bench --features redis --bench redis
//! BENCH_WORKERS=1 BENCH_PARTS=throughput cargo bench --features redis --bench redis
//! BENCH_PARTS=window BENCH_WINDOW_SAMPLES=500 cargo bench --features redis --bench redis
//! ```
//!
//! Without `--bench` (as under `cargo test --all-targets`) it runs a short smoke version.

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::{
    CacheKey, CacheStore, CachecoreLayer, DepEpochs, Entry, Lookup, RedisStore, POLICY_DEP,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use support::RedisServer;
use tower::{Layer, ServiceExt};

/// Body size of the cached answer.
const BODY_BYTES: usize = 1024;

struct Settings {
    secs: f64,
    entries: u32,
    memory_entries: u32,
    window_samples: u32,
}

impl Settings {
    fn from_env() -> Self {
        let full = std::env::args().any(|a| a == "--bench");
        let var = |name: &str, full_default: f64, smoke: f64| -> f64 {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(if full { full_default } else { smoke })
        };
        Self {
            secs: var("BENCH_SECS", 5.0, 0.3),
            entries: var("BENCH_ENTRIES", 100_000.0, 2_000.0) as u32,
            memory_entries: var("BENCH_MEMORY_ENTRIES", 20_000.0, 1_000.0) as u32,
            window_samples: var("BENCH_WINDOW_SAMPLES", 300.0, 20.0) as u32,
        }
    }
}

fn main() {
    let settings = Settings::from_env();
    if !std::env::args().any(|a| a == "--bench") {
        println!("smoke run (no --bench): small sizes, short runs; the numbers are not measures");
    }
    let server = RedisServer::start();
    // BENCH_WORKERS: client runtime threads (default 2, the machine's cores; redis-server
    // competes with them for those cores).
    let workers = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    // BENCH_PARTS=throughput,invalidation,memory,window (default: all) runs a subset.
    let parts = std::env::var("BENCH_PARTS").unwrap_or_default();
    let run = |part: &str| parts.is_empty() || parts.split(',').any(|p| p == part);
    rt.block_on(async {
        if run("throughput") {
            throughput(&server, &settings).await;
        }
        if run("invalidation") {
            invalidation(&server, &settings).await;
        }
        if run("memory") {
            memory(&server, &settings).await;
        }
        if run("window") {
            window(&server, &settings).await;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 1. Hits through the layer against raw GETs.

fn answer() -> Bytes {
    let prefix = r#"{"id":"chatcmpl-1","choices":[{"message":{"content":""#;
    let suffix = r#""}}]}"#;
    let text = "x".repeat(BODY_BYTES - prefix.len() - suffix.len());
    let body = format!("{prefix}{text}{suffix}");
    assert_eq!(body.len(), BODY_BYTES);
    Bytes::from(body)
}

async fn inner<B: Body>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(answer()));
    res.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    Ok(res)
}

fn request(task: usize) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"gpt-5.4-mini","messages":[{{"role":"user","content":"question {task}"}}],"temperature":0}}"#
    );
    Request::post("http://api.local/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

struct Run {
    ops: usize,
    secs: f64,
    latencies_us: Vec<u32>,
}

impl Run {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    fn percentile(&self, p: f64) -> u32 {
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i]
    }

    fn report(&self, what: &str) {
        println!(
            "  {what:<28} {:>9.0} ops/s   p50 {:>5} us   p99 {:>5} us   max {:>6} us",
            self.ops_per_sec(),
            self.percentile(0.5),
            self.percentile(0.99),
            self.latencies_us.last().copied().unwrap_or(0),
        );
    }
}

/// Runs `op` in `concurrency` tasks for `secs` seconds.
async fn drive<F, Fut>(concurrency: usize, secs: f64, op: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let op = Arc::clone(&op);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    op(task).await;
                    lat.push(t.elapsed().as_micros() as u32);
                    // As a server's request task waits for its next request: a near hit never
                    // waits for I/O, and a loop of them would keep every other task (the
                    // tracking connection's reader, its heartbeat) off this thread.
                    tokio::task::yield_now().await;
                }
                lat
            })
        })
        .collect();
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    Run {
        ops: latencies_us.len(),
        secs,
        latencies_us,
    }
}

/// Hits through `svc` (a layer over a store holding every task's answer) in `concurrency`
/// tasks for `secs` seconds.
async fn layer_hits<S, B>(svc: S, concurrency: usize, secs: f64) -> Run
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    drive(concurrency, secs, move |task| {
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(request(task)).await.unwrap();
            debug_assert_eq!(res.headers()["x-cache"], "HIT_L1");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), BODY_BYTES);
        }
    })
    .await
}

async fn throughput(server: &RedisServer, s: &Settings) {
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let deps = DepEpochs::new(vec![(POLICY_DEP.into(), 0), ("doc:contract-123".into(), 0)]);
    fill(&store, "store-only", 5, 32, &deps).await;
    // Give the two epochs values, as in a store that has seen invalidations.
    for dep in deps.iter().map(|(id, _)| id) {
        store.invalidate("store-only", dep, "v1").await.unwrap();
    }
    let deps = DepEpochs::new(vec![(POLICY_DEP.into(), 1), ("doc:contract-123".into(), 1)]);
    fill(&store, "store-only", 5, 32, &deps).await;
    let layer = CachecoreLayer::builder()
        .store(store.clone())
        .tenant("bench")
        .default_ttl(Duration::from_secs(3600))
        .build();
    let svc = layer.layer(tower::service_fn(inner));
    for task in 0..32 {
        let res = svc.clone().oneshot(request(task)).await.unwrap();
        res.into_body().collect().await.unwrap();
    }
    let res = svc.clone().oneshot(request(0)).await.unwrap();
    assert_eq!(res.headers()["x-cache"], "HIT_L1");
    // The same entries through a store with a near cache (its own connections).
    let near_store = RedisStore::builder()
        .url(server.url())
        .near_cache(NEAR_BYTES)
        .build()
        .await
        .unwrap();
    let near_layer = CachecoreLayer::builder()
        .store(near_store.clone())
        .tenant("bench")
        .default_ttl(Duration::from_secs(3600))
        .build();
    let near_svc = near_layer.layer(tower::service_fn(inner));
    for _ in 0..2 {
        for task in 0..32 {
            let res = near_svc.clone().oneshot(request(task)).await.unwrap();
            assert_eq!(res.headers()["x-cache"], "HIT_L1");
            res.into_body().collect().await.unwrap();
        }
    }

    // The raw value is as large as what a hit reads: the encoded entry.
    let entry_key = server
        .cli(&["--raw", "KEYS", "cc:{bench}:l1:*"])
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let value_len: usize = server.cli(&["STRLEN", &entry_key]).trim().parse().unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let raw = redis::aio::ConnectionManager::new(client).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("raw:value")
        .arg(vec![b'x'; value_len])
        .query_async(&mut raw.clone())
        .await
        .unwrap();

    println!(
        "hit throughput ({BODY_BYTES} B body, encoded entry {value_len} B), {} s per run:",
        s.secs
    );
    let mut ratios = Vec::new();
    for concurrency in [1, 32] {
        let layer_run = layer_hits(svc.clone(), concurrency, s.secs).await;
        let get_raw = raw.clone();
        let raw_run = drive(concurrency, s.secs, move |_| {
            let mut raw = get_raw.clone();
            async move {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg("raw:value")
                    .query_async(&mut raw)
                    .await
                    .unwrap();
                assert_eq!(v.len(), value_len);
            }
        })
        .await;
        // The store alone (the same lookup the layer makes), to split the layer's cost from
        // Redis's: one MGET of the entry and two epochs (policy dep + one declared dep).
        let st = store.clone();
        let store_run = drive(concurrency, s.secs, move |task| {
            let st = st.clone();
            async move {
                let k = CacheKey::new("store-only", key(task as u32, 5));
                let hit = st
                    .lookup(&k, &[POLICY_DEP, "doc:contract-123"])
                    .await
                    .unwrap();
                assert!(matches!(hit, Lookup::Fresh(_)));
            }
        })
        .await;
        // The floor of any one-round-trip hit that checks epochs: the same MGET, raw.
        let mget_raw = raw.clone();
        let mget_run = drive(concurrency, s.secs, move |task| {
            let mut raw = mget_raw.clone();
            async move {
                let k = CacheKey::new("store-only", key(task as u32, 5));
                let v: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                    .arg(format!("cc:{{store-only}}:l1:{}", k.hex()))
                    .arg("cc:{store-only}:dep:ver:cc:policy-version")
                    .arg("cc:{store-only}:dep:ver:doc:contract-123")
                    .query_async(&mut raw)
                    .await
                    .unwrap();
                assert!(v[0].is_some());
            }
        })
        .await;
        let near_run = layer_hits(near_svc.clone(), concurrency, s.secs).await;
        near_run.report(&format!("layer hit, near cache, c={concurrency}"));
        layer_run.report(&format!("layer hit, c={concurrency}"));
        store_run.report(&format!("RedisStore::lookup, c={concurrency}"));
        mget_run.report(&format!("raw MGET entry+2 epochs, c={concurrency}"));
        raw_run.report(&format!("raw GET, c={concurrency}"));
        let ratio = layer_run.ops_per_sec() / raw_run.ops_per_sec();
        let near_ratio = near_run.ops_per_sec() / raw_run.ops_per_sec();
        println!(
            "  layer / raw GET at c={concurrency}: {:.2}x; with the near cache: {:.2}x",
            ratio, near_ratio
        );
        ratios.push(near_ratio);
    }
    println!(
        "  target: near cache >= 1.0x raw GET at c=32: {}",
        if ratios[1] >= 1.0 { "met" } else { "NOT met" }
    );
}

/// The near cache's bound in these measures: far more than the entries they read.
const NEAR_BYTES: u64 = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// 2. Invalidating a dep tagged on many entries.

fn entry(deps: &DepEpochs, body: &Bytes) -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Entry {
        status: StatusCode::OK,
        headers,
        body: body.clone(),
        stored_at_ms: cachecore::testing::now_ms(),
        fresh_ttl: Duration::from_secs(3600),
        stale_window: Duration::ZERO,
        deps: deps.clone(),
    }
}

fn key(n: u32, salt: u8) -> [u8; 32] {
    let mut d = [salt; 32];
    d[..4].copy_from_slice(&n.to_be_bytes());
    d
}

/// Puts `n` entries recording `deps` in `tenant`, 64 at a time.
async fn fill(store: &RedisStore, tenant: &str, salt: u8, n: u32, deps: &DepEpochs) {
    let body = answer();
    let tenant: Arc<str> = Arc::from(tenant);
    let mut next = 0u32;
    while next < n {
        let end = (next + 64).min(n);
        let puts = (next..end).map(|i| {
            let (store, tenant, deps, body) =
                (store.clone(), tenant.clone(), deps.clone(), body.clone());
            async move {
                let k = CacheKey::new(tenant, key(i, salt));
                store.put(&k, entry(&deps, &body)).await.unwrap();
            }
        });
        futures_join_all(puts).await;
        next = end;
    }
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    for h in handles {
        h.await.unwrap();
    }
}

async fn invalidation(server: &RedisServer, s: &Settings) {
    const TENANT: &str = "inv";
    const BIG: &str = "table:products";
    const OTHER: &str = "doc:unrelated";
    const READERS: usize = 8;
    const OTHER_ENTRIES: u32 = 1_000;
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let big = DepEpochs::new(vec![(POLICY_DEP.into(), 0), (BIG.into(), 0)]);
    let other = DepEpochs::new(vec![(POLICY_DEP.into(), 0), (OTHER.into(), 0)]);
    let filled = Instant::now();
    fill(&store, TENANT, 1, s.entries, &big).await;
    fill(&store, TENANT, 2, OTHER_ENTRIES, &other).await;
    println!(
        "invalidation of a dep tagged on {} entries ({:.1} s to fill):",
        s.entries,
        filled.elapsed().as_secs_f64()
    );

    let stop = Arc::new(AtomicBool::new(false));
    // Readers hitting unrelated entries the whole time.
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let deps = [POLICY_DEP, OTHER];
                let mut samples = Vec::new();
                let mut i = r as u32;
                while !stop.load(Ordering::Relaxed) {
                    let k = CacheKey::new(TENANT, key(i % OTHER_ENTRIES, 2));
                    i += READERS as u32;
                    let t = Instant::now();
                    let hit = store.lookup(&k, &deps).await.unwrap();
                    samples.push((t, t.elapsed()));
                    assert!(matches!(hit, Lookup::Fresh(_)));
                }
                samples
            })
        })
        .collect();
    // A reader of an entry of the invalidated dep, to see when it starts missing.
    let watcher = {
        let store = store.clone();
        tokio::spawn(async move {
            let deps = [POLICY_DEP, BIG];
            let k = CacheKey::new(TENANT, key(0, 1));
            loop {
                if let Lookup::Miss(_) = store.lookup(&k, &deps).await.unwrap() {
                    return Instant::now();
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let result = store.invalidate(TENANT, BIG, "etl-run").await.unwrap();
    let reclaimed = t0.elapsed();
    let first_miss = watcher.await.unwrap().saturating_duration_since(t0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let mut during = Vec::new();
    let mut all = 0usize;
    for r in readers {
        for (t, took) in r.await.unwrap() {
            all += 1;
            if t >= t0 && t <= t0 + reclaimed {
                during.push(took);
            }
        }
    }
    during.sort_unstable();
    assert_eq!(result.deleted, u64::from(s.entries));
    println!(
        "  readers miss after:          {:>8.2} ms (the epoch bump, one round trip)",
        ms(first_miss)
    );
    println!(
        "  all {} entries reclaimed in: {:>8.2} ms ({} per batch)",
        result.deleted,
        ms(reclaimed),
        cachecore::store::redis::DEFAULT_RECLAIM_BATCH
    );
    if let (Some(max), false) = (during.last(), during.is_empty()) {
        let p99 = during[((during.len() - 1) as f64 * 0.99) as usize];
        println!(
            "  concurrent hits meanwhile:   {} ({READERS} readers; {all} in total), p99 {:.2} ms, worst {:.2} ms (target < 10 ms: {})",
            during.len(),
            ms(p99),
            ms(*max),
            if *max < Duration::from_millis(10) { "met" } else { "NOT met" }
        );
    }
    let left: u64 = server
        .cli(&[
            "EVAL",
            "return #redis.call('KEYS', ARGV[1])",
            "0",
            "cc:{inv}:l1:*",
        ])
        .trim()
        .parse()
        .unwrap();
    println!("  entry keys left: {left} (the {OTHER_ENTRIES} unrelated ones)");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// 3. Memory per entry.

async fn memory(server: &RedisServer, s: &Settings) {
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let used = || -> u64 {
        server
            .info_field("memory", "used_memory")
            .unwrap()
            .parse()
            .unwrap()
    };
    let deps = DepEpochs::new(vec![(POLICY_DEP.into(), 0), ("doc:contract-123".into(), 0)]);
    let before = used();
    fill(&store, "mem", 3, s.memory_entries, &deps).await;
    let after = used();
    let per_entry = (after - before) as f64 / f64::from(s.memory_entries);
    let k = CacheKey::new("mem", key(0, 3));
    let name = format!("cc:{{mem}}:l1:{}", k.hex());
    let encoded: u64 = server.cli(&["STRLEN", &name]).trim().parse().unwrap();
    let usage: u64 = server
        .cli(&["MEMORY", "USAGE", &name])
        .trim()
        .parse()
        .unwrap();
    println!(
        "memory, {} entries with a {BODY_BYTES} B body and 2 deps:",
        s.memory_entries
    );
    println!(
        "  used_memory delta per entry: {per_entry:.0} B ({:.2}x the body; includes 2 tag-set memberships)",
        per_entry / BODY_BYTES as f64
    );
    println!("  encoded entry: {encoded} B; MEMORY USAGE of one entry key: {usage} B");
}

// ---------------------------------------------------------------------------------------------
// 4. The near cache's cross-process window.

async fn window(server: &RedisServer, s: &Settings) {
    const TENANT: &str = "window";
    const LOAD: usize = 32;
    // Long timeouts: this measures the window, not how a loaded machine answers.
    let near = RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_secs(2))
        .near_cache(NEAR_BYTES)
        .build()
        .await
        .unwrap();
    let other = RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    println!(
        "near cache: another store invalidates, the near store stops serving after \
         (from the invalidation's return; {} samples each):",
        s.window_samples
    );
    let idle = window_samples(&near, &other, TENANT, "idle", s.window_samples).await;
    report_window("idle", idle, Duration::from_millis(1));

    // The c=32 hit load of part 1, on the near store, through the layer.
    let layer = CachecoreLayer::builder()
        .store(near.clone())
        .tenant("window-load")
        .default_ttl(Duration::from_secs(3600))
        .build();
    let svc = layer.layer(tower::service_fn(inner));
    for _ in 0..2 {
        for task in 0..LOAD {
            let res = svc.clone().oneshot(request(task)).await.unwrap();
            res.into_body().collect().await.unwrap();
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load: Vec<_> = (0..LOAD)
        .map(|task| {
            let (svc, stop, hits) = (svc.clone(), Arc::clone(&stop), Arc::clone(&hits));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let res = svc.clone().oneshot(request(task)).await.unwrap();
                    assert_eq!(res.headers()["x-cache"], "HIT_L1");
                    res.into_body().collect().await.unwrap();
                    hits.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let started = Instant::now();
    let loaded = window_samples(&near, &other, TENANT, "load", s.window_samples).await;
    let rate = hits.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    report_window(
        &format!("under c={LOAD} hits ({rate:.0}/s)"),
        loaded,
        Duration::from_millis(5),
    );
}

/// What one sample of the window saw, from the invalidation's return.
struct WindowSample {
    /// The end of the last lookup on the near store that still served the entry: until then
    /// the near store served it (zero when none ended after the return).
    last_stale: Duration,
    /// The start of the first lookup that missed: an upper bound, which also counts the time the
    /// watching task waited to be run again after its last stale lookup.
    first_miss: Duration,
}

/// `n` times: fill the near store with an entry of a dep of its own, invalidate that dep
/// through `other`, and time from the invalidation's return until the near store stops serving
/// the entry (the issue's "other process stops serving"): the end of the last lookup on `near`
/// that served it, and the start of the first that missed.
async fn window_samples(
    near: &RedisStore,
    other: &RedisStore,
    tenant: &str,
    tag: &str,
    n: u32,
) -> Vec<WindowSample> {
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let dep = format!("doc:{tag}-{i}");
        let deps = [POLICY_DEP, dep.as_str()];
        let k = CacheKey::new(tenant, key(i, if tag == "idle" { 6 } else { 7 }));
        let Lookup::Miss(observed) = near.lookup(&k, &deps).await.unwrap() else {
            panic!("a fresh key misses");
        };
        near.put(&k, entry(&observed, &answer())).await.unwrap();
        // Twice: the put's own push may overtake the first fill.
        for _ in 0..2 {
            assert!(matches!(
                near.lookup(&k, &deps).await.unwrap(),
                Lookup::Fresh(_)
            ));
        }
        let watcher = {
            let (near, k, dep) = (near.clone(), k.clone(), dep.clone());
            tokio::spawn(async move {
                let mut last_stale = None;
                loop {
                    let deps = [POLICY_DEP, dep.as_str()];
                    let started = Instant::now();
                    if let Ok(Lookup::Miss(_)) = near.lookup(&k, &deps).await {
                        return (last_stale, started);
                    }
                    last_stale = Some(Instant::now());
                    tokio::task::yield_now().await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        other.invalidate(tenant, &dep, "v2").await.unwrap();
        let returned = Instant::now();
        let (last_stale, first_miss) = watcher.await.unwrap();
        out.push(WindowSample {
            last_stale: last_stale
                .map_or(Duration::ZERO, |t| t.saturating_duration_since(returned)),
            first_miss: first_miss.saturating_duration_since(returned),
        });
    }
    out
}

fn report_window(what: &str, samples: Vec<WindowSample>, target: Duration) {
    let sorted = |f: fn(&WindowSample) -> Duration| {
        let mut v: Vec<Duration> = samples.iter().map(f).collect();
        v.sort_unstable();
        v
    };
    let at = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let stale = sorted(|s| s.last_stale);
    let miss = sorted(|s| s.first_miss);
    let p99 = at(&stale, 0.99);
    println!(
        "  {what:<28} last stale hit ended: p50 {:>7.3} ms   p99 {:>7.3} ms   max {:>7.3} ms   (target p99 <= {} ms: {})",
        ms(at(&stale, 0.5)),
        ms(p99),
        ms(*stale.last().unwrap()),
        target.as_millis(),
        if p99 <= target { "met" } else { "NOT met" }
    );
    println!(
        "  {:<28} first miss began:     p50 {:>7.3} ms   p99 {:>7.3} ms   max {:>7.3} ms",
        "",
        ms(at(&miss, 0.5)),
        ms(at(&miss, 0.99)),
        ms(*miss.last().unwrap()),
    );
}
