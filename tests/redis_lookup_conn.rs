//! The lookups' own multiplexed connection of `RedisStore` (src/store/redis/lean.rs,
//! docs/design.md §7 "Lookup connection"), against a real `redis-server` per test: one
//! connection for every concurrent lookup, the URL's user and database, a restart costing no
//! more than the lookups in flight, and a randomized program (lookups cancelled, timing out,
//! Redis paused, its connections killed, Redis killed and restarted) under a watchdog, in which
//! every lookup that completes with an entry got its own key's.
//!
//! `CACHECORE_SEED=<n>` replays one seed of the randomized program.

mod common;
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::store::redis::RedisStore;
use cachecore::testing::now_ms;
use cachecore::{CacheKey, CacheStore, DepEpochs, Entry, Lookup, PutOutcome, POLICY_DEP};
use common::watchdog;
use http::{HeaderMap, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use support::RedisServer;

const DOC: &str = "doc:lookup-conn";
const DEPS: [&str; 2] = [POLICY_DEP, DOC];
/// Keys `0..STORED` are filled; `STORED..KEYS` never are, so a hit on one is someone else's.
const STORED: u32 = 12;
const KEYS: u32 = 18;
const TASKS: usize = 24;
const OPS_PER_TASK: usize = 120;
const CI_SEEDS: [u64; 3] = [1, 2, 3];
/// Short, so that a paused Redis makes lookups time out.
const TIMEOUT: Duration = Duration::from_millis(150);

fn key(n: u32) -> CacheKey {
    let mut digest = [0u8; 32];
    digest[28..].copy_from_slice(&n.to_be_bytes());
    CacheKey::new("t", digest)
}

/// A value of its own per key, of a length of its own too.
fn body_of(n: u32) -> Bytes {
    Bytes::from(format!("value of key {n};").repeat(1 + n as usize % 7))
}

async fn store(url: String) -> RedisStore {
    RedisStore::builder()
        .url(url)
        .timeout(TIMEOUT)
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await
        .expect("connect")
}

/// Misses on key `n` and stores its value; `false` when any step failed or it was there.
async fn fill(store: &RedisStore, n: u32) -> bool {
    let Ok(Lookup::Miss(observed)) = store.lookup(&key(n), &DEPS).await else {
        return false;
    };
    let entry = entry(observed, body_of(n));
    matches!(store.put(&key(n), entry).await, Ok(PutOutcome::Stored))
}

fn entry(deps: DepEpochs, body: Bytes) -> Entry {
    Entry {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        body,
        stored_at_ms: now_ms(),
        fresh_ttl: Duration::from_secs(60),
        stale_window: Duration::ZERO,
        deps,
    }
}

/// The body of a hit, or `None` for a miss.
fn hit_body(lookup: Lookup) -> Option<Bytes> {
    match lookup {
        Lookup::Fresh(e) | Lookup::Stale(e) => Some(e.body),
        Lookup::Miss(_) => None,
    }
}

/// Normal clients in `CLIENT LIST`, leaving out the `redis-cli` that asks.
fn clients(server: &RedisServer) -> Vec<String> {
    server
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| !l.contains(" cmd=client|list "))
        .map(str::to_owned)
        .collect()
}

/// `n` lookups of key 1 under way at once; how many hit with its value.
async fn concurrent_hits(store: &RedisStore, n: usize) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let store = store.clone();
        set.spawn(async move { store.lookup(&key(1), &DEPS).await });
    }
    let mut hits = 0;
    while let Some(done) = set.join_next().await {
        if let Ok(Some(body)) = done.unwrap().map(hit_body) {
            assert_eq!(body, body_of(1));
            hits += 1;
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_share_one_connection() {
    let server = RedisServer::start();
    let store = store(server.url()).await;
    assert!(fill(&store, 1).await);
    for _ in 0..5 {
        assert_eq!(concurrent_hits(&store, 200).await, 200);
    }
    // The store's shared connection and the lookups' one.
    let clients = clients(&server);
    assert_eq!(clients.len(), 2, "{clients:#?}");
}

#[tokio::test]
async fn lookups_read_the_database_of_the_url() {
    let server = RedisServer::start();
    let store = store(format!("{}3", server.url())).await;
    assert!(fill(&store, 1).await);
    let hit = hit_body(store.lookup(&key(1), &DEPS).await.unwrap());
    assert_eq!(hit, Some(body_of(1)));
    assert_eq!(server.cli(&["-n", "0", "DBSIZE"]).trim(), "0");
    assert_ne!(server.cli(&["-n", "3", "DBSIZE"]).trim(), "0");
}

#[tokio::test]
async fn lookups_log_in_as_the_user_of_the_url() {
    let server = RedisServer::start();
    let setup = server.cli(&["ACL", "SETUSER", "looker", "on", ">pw-1", "~*", "+@all"]);
    assert_eq!(setup.trim(), "OK");
    let url = server.url().replace("redis://", "redis://looker:pw-1@");
    let store = store(url).await;
    assert!(fill(&store, 1).await);
    assert_eq!(concurrent_hits(&store, 8).await, 8);
    let clients = clients(&server);
    assert_eq!(clients.len(), 2, "{clients:#?}");
    assert!(
        clients.iter().all(|c| c.contains(" user=looker ")),
        "{clients:#?}"
    );
}

#[tokio::test]
async fn a_wrong_password_fails_lookups_open_and_never_serves() {
    let server = RedisServer::start();
    let store = store(server.url()).await;
    assert!(fill(&store, 1).await);
    let setup = server.cli(&["ACL", "SETUSER", "looker", "on", ">pw-1", "~*", "+@all"]);
    assert_eq!(setup.trim(), "OK");
    let wrong = server.url().replace("redis://", "redis://looker:wrong@");
    let lazy = RedisStore::builder().url(wrong).build_lazy().unwrap();
    for _ in 0..3 {
        assert!(lazy.lookup(&key(1), &DEPS).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_and_a_restart_cost_at_most_one_failed_lookup_each() {
    let mut server = RedisServer::start();
    let store = store(server.url()).await;
    assert!(fill(&store, 1).await);
    assert_eq!(concurrent_hits(&store, 16).await, 16);

    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    let mut failed = 0;
    for _ in 0..20 {
        match store.lookup(&key(1), &DEPS).await.map(hit_body) {
            Ok(Some(body)) => assert_eq!(body, body_of(1)),
            Ok(None) => panic!("a miss on a Redis that kept its data"),
            Err(_) => failed += 1,
        }
    }
    assert!(failed <= 1, "{failed} lookups failed after CLIENT KILL");

    server.restart();
    let mut failed = 0;
    for _ in 0..20 {
        match store.lookup(&key(1), &DEPS).await {
            Ok(lookup) => assert_eq!(hit_body(lookup), None, "restarted Redis is empty"),
            Err(_) => failed += 1,
        }
    }
    assert!(failed <= 1, "{failed} lookups failed after a restart");
    // The reconnection pinged the store's other connection: the first put after it stores.
    assert!(fill(&store, 2).await);
    let hit = hit_body(store.lookup(&key(2), &DEPS).await.unwrap());
    assert_eq!(hit, Some(body_of(2)));
}

#[test]
fn a_store_outliving_the_runtime_that_built_it_still_looks_up() {
    let server = RedisServer::start();
    let built = tokio::runtime::Runtime::new().unwrap();
    let store = built.block_on(async {
        let store = store(server.url()).await;
        assert!(fill(&store, 1).await);
        store
    });
    // The lookup connection's task goes with that runtime; the next lookup starts another.
    drop(built);
    let other = tokio::runtime::Runtime::new().unwrap();
    let hit = other.block_on(async { store.lookup(&key(1), &DEPS).await.map(hit_body) });
    assert_eq!(hit.unwrap(), Some(body_of(1)));
}

/// What the lookups of one seed saw.
#[derive(Default)]
struct Seen {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    given_up: AtomicU64,
}

/// Counts one more of what `c` counts.
fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Seen {
    fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "hits {}, misses {}, errors {}, given up {}",
            get(&self.hits),
            get(&self.misses),
            get(&self.errors),
            get(&self.given_up)
        )
    }
}

/// Checks what a lookup of key `n` answered: a hit is on a stored key, with that key's value.
fn check(seen: &Seen, n: u32, answer: Result<Lookup, cachecore::StoreError>, replay: &str) {
    match answer.map(hit_body) {
        Ok(Some(body)) => {
            assert!(n < STORED, "key {n} was never stored, yet hit: {replay}");
            assert_eq!(
                body,
                body_of(n),
                "key {n} got another key's value: {replay}"
            );
            count(&seen.hits);
        }
        Ok(None) => count(&seen.misses),
        Err(_) => count(&seen.errors),
    }
}

/// One task's lookups: plain, under a timeout of a few milliseconds, or spawned and aborted.
async fn lookups(store: RedisStore, seed: u64, task: usize, seen: Arc<Seen>, replay: String) {
    let mut rng = SmallRng::seed_from_u64(seed.wrapping_mul(1000) + task as u64);
    for _ in 0..OPS_PER_TASK {
        let n = rng.random_range(0..KEYS);
        match rng.random_range(0..10) {
            0..=5 => check(&seen, n, store.lookup(&key(n), &DEPS).await, &replay),
            6..=7 => {
                let within = Duration::from_micros(rng.random_range(0..3000));
                match tokio::time::timeout(within, store.lookup(&key(n), &DEPS)).await {
                    Ok(answer) => check(&seen, n, answer, &replay),
                    Err(_) => count(&seen.given_up),
                }
            }
            _ => {
                let (store, seen2, replay2) = (store.clone(), Arc::clone(&seen), replay.clone());
                let handle = tokio::spawn(async move {
                    let answer = store.lookup(&key(n), &DEPS).await;
                    check(&seen2, n, answer, &replay2);
                });
                tokio::task::yield_now().await;
                handle.abort();
                match handle.await {
                    Ok(()) => {}
                    Err(e) if e.is_cancelled() => count(&seen.given_up),
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
        }
        if rng.random_range(0..4) == 0 {
            tokio::task::yield_now().await;
        }
    }
}

/// Runs `f` on the server off the runtime's workers (it blocks: processes, sleeps).
async fn on_server<T: Send + 'static>(
    server: &Arc<Mutex<RedisServer>>,
    f: impl FnOnce(&mut RedisServer) -> T + Send + 'static,
) -> T {
    let server = Arc::clone(server);
    tokio::task::spawn_blocking(move || f(&mut server.lock().unwrap()))
        .await
        .unwrap()
}

/// Faults while the lookups run: Redis killed and restarted empty (then filled again), paused
/// past the lookups' timeout, its client connections killed.
async fn chaos(store: RedisStore, server: Arc<Mutex<RedisServer>>, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xc4a0_5eed);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..80))).await;
        match rng.random_range(0..3) {
            0 => {
                on_server(&server, |s| s.kill()).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..50))).await;
                on_server(&server, |s| s.restart()).await;
                for n in 0..STORED {
                    fill(&store, n).await;
                }
            }
            1 => {
                on_server(&server, |s| s.cli(&["CLIENT", "PAUSE", "250", "ALL"])).await;
            }
            _ => {
                on_server(&server, |s| s.cli(&["CLIENT", "KILL", "TYPE", "normal"])).await;
            }
        }
    }
}

#[test]
fn lookups_cancelled_timing_out_and_across_restarts_each_get_their_own_keys_value() {
    let seeds = match std::env::var("CACHECORE_SEED") {
        Ok(seed) => vec![seed.parse().expect("CACHECORE_SEED is a u64")],
        Err(_) => CI_SEEDS.to_vec(),
    };
    for seed in seeds {
        one_seed(seed);
    }
}

fn one_seed(seed: u64) {
    let replay = format!(
        "seed {seed}; replay: CACHECORE_SEED={seed} cargo test --all-features --test \
         redis_lookup_conn -- lookups_cancelled"
    );
    let name = format!("redis lookup connection, seed {seed}");
    let bound = Duration::from_secs(60);
    watchdog::run(&name, 2, bound, move |wd| async move {
        wd.note("seed", replay.clone());
        let server = RedisServer::start();
        let url = server.url();
        let server = Arc::new(Mutex::new(server));
        let store = store(url).await;
        for n in 0..STORED {
            assert!(fill(&store, n).await, "{replay}");
        }
        let seen = Arc::new(Seen::default());
        type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let mut tasks: Vec<(String, Task)> = (0..TASKS)
            .map(|t| {
                let run = lookups(store.clone(), seed, t, Arc::clone(&seen), replay.clone());
                (format!("lookups {t}"), Box::pin(run) as Task)
            })
            .collect();
        let faults = chaos(store.clone(), Arc::clone(&server), seed);
        tasks.push(("faults".to_owned(), Box::pin(faults)));
        if let Err(stuck) = wd
            .join_named("the lookups", Duration::from_secs(40), tasks)
            .await
        {
            panic!("{replay}\n{}\n{stuck}", seen.summary());
        }
        assert!(
            seen.hits.load(Ordering::Relaxed) > 0,
            "no lookup hit: {}; {replay}",
            seen.summary()
        );

        // Afterwards every stored key hits again with its own value (filled again if the last
        // fault was a restart that raced its fill).
        let deadline = Instant::now() + Duration::from_secs(5);
        for n in 0..STORED {
            loop {
                match store.lookup(&key(n), &DEPS).await.map(hit_body) {
                    Ok(Some(body)) => {
                        assert_eq!(body, body_of(n), "{replay}");
                        break;
                    }
                    Ok(None) => {
                        fill(&store, n).await;
                    }
                    Err(e) => assert!(Instant::now() < deadline, "{e}; {replay}"),
                }
                assert!(
                    Instant::now() < deadline,
                    "key {n} never hit again; {replay}"
                );
            }
        }
        eprintln!("seed {seed}: {}", seen.summary());
    });
}
