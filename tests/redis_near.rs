//! The near cache of `RedisStore` (docs/design.md §7, "Near cache"): near hits make no round
//! trip, and every way a near copy can become wrong drops it. Each test starts its own
//! `redis-server`, so command counters and `CLIENT LIST` see only that test.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::store::redis::RedisStore;
use cachecore::store::RefusedReason;
use cachecore::testing::now_ms;
use cachecore::{
    CacheKey, CacheStore, DepEpochs, Entry, Lookup, PutOutcome, StoreErrorKind, POLICY_DEP,
};
use http::{HeaderMap, StatusCode};
use support::RedisServer;

const DOC: &str = "doc:contract-123";
const DEPS: [&str; 2] = [POLICY_DEP, DOC];
const NEAR_BYTES: u64 = 4 * 1024 * 1024;
/// Generous: these tests check behaviour, not latency, on a machine that may be busy.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a test waits for something that takes milliseconds (a push, a reconnection).
const PATIENCE: Duration = Duration::from_secs(5);

async fn near_store(server: &RedisServer, bytes: u64) -> RedisStore {
    RedisStore::builder()
        .url(server.url())
        .timeout(TIMEOUT)
        .near_cache(bytes)
        .build()
        .await
        .expect("connect")
}

async fn plain_store(server: &RedisServer) -> RedisStore {
    RedisStore::builder()
        .url(server.url())
        .timeout(TIMEOUT)
        .build()
        .await
        .expect("connect")
}

fn entry(deps: DepEpochs, body: &[u8]) -> Entry {
    Entry {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        body: Bytes::copy_from_slice(body),
        stored_at_ms: now_ms(),
        fresh_ttl: Duration::from_secs(60),
        stale_window: Duration::ZERO,
        deps,
    }
}

fn key(n: u32) -> CacheKey {
    let mut digest = [0u8; 32];
    digest[28..].copy_from_slice(&n.to_be_bytes());
    CacheKey::new("t", digest)
}

/// Misses, puts `body` with the observed epochs, and reads it back until the near cache of
/// `store` holds it: twice, since the push for the put's own write may come in while the first
/// read is under way, and a fill that an invalidation overtook is given up.
async fn fill(store: &RedisStore, k: &CacheKey, body: &[u8]) {
    let Lookup::Miss(observed) = store.lookup(k, &DEPS).await.unwrap() else {
        panic!("expected a miss");
    };
    assert_eq!(
        store.put(k, entry(observed, body)).await.unwrap(),
        PutOutcome::Stored
    );
    for _ in 0..2 {
        assert_eq!(body_of(&store.lookup(k, &DEPS).await.unwrap()), Some(body));
    }
}

/// Looks `k` up on `store` until it misses; fails with `what` after [`PATIENCE`].
async fn until_not_served(store: &RedisStore, k: &CacheKey, what: &str) {
    let started = Instant::now();
    while body_of(&store.lookup(k, &DEPS).await.unwrap()).is_some() {
        assert!(started.elapsed() < PATIENCE, "{what}");
        tokio::task::yield_now().await;
    }
}

fn body_of(lookup: &Lookup) -> Option<&[u8]> {
    match lookup {
        Lookup::Fresh(e) | Lookup::Stale(e) => Some(&e.body),
        Lookup::Miss(_) => None,
    }
}

/// `MGET`s Redis has run: every lookup that was not a near hit.
fn mgets(server: &RedisServer) -> u64 {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_mget:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// The ids of the near cache's tracking connections (`CLIENT LIST`, by name and flag).
fn tracking_clients(server: &RedisServer) -> Vec<String> {
    server
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains(" name=cachecore-near ") && flags(l).contains('t'))
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next().map(str::to_owned))
        .collect()
}

fn flags(line: &str) -> &str {
    line.split(' ')
        .find_map(|f| f.strip_prefix("flags="))
        .unwrap_or("")
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_near_hit_makes_no_round_trip() {
    let server = RedisServer::start();
    let store = near_store(&server, NEAR_BYTES).await;
    fill(&store, &key(1), b"one").await;
    let before = mgets(&server);
    for _ in 0..50 {
        let hit = store.lookup(&key(1), &DEPS).await.unwrap();
        assert!(matches!(hit, Lookup::Fresh(_)), "{hit:?}");
        assert_eq!(body_of(&hit), Some(&b"one"[..]));
    }
    assert_eq!(mgets(&server), before, "near hits went to Redis");
    assert_eq!(tracking_clients(&server).len(), 1);
    // Without the near cache every hit is one MGET.
    let plain = plain_store(&server).await;
    let before = mgets(&server);
    for _ in 0..5 {
        assert_eq!(
            body_of(&plain.lookup(&key(1), &DEPS).await.unwrap()),
            Some(&b"one"[..])
        );
    }
    assert_eq!(mgets(&server), before + 5);
    assert_eq!(plain.near_cache_bytes(), None);
}

#[tokio::test]
async fn an_invalidation_in_this_process_drops_near_copies_before_it_returns() {
    let server = RedisServer::start();
    let store = near_store(&server, NEAR_BYTES).await;
    fill(&store, &key(1), b"one").await;
    // Redis's push for the raise is kept back: only the store's own eviction can make the
    // next lookup miss.
    store.near_cache_hold_pushes(true);
    store.invalidate("t", DOC, "v2").await.unwrap();
    let after = store.lookup(&key(1), &DEPS).await.unwrap();
    assert_eq!(
        body_of(&after),
        None,
        "served after its invalidation returned"
    );
    // A clone shares the near cache.
    let clone = store.clone();
    fill(&clone, &key(2), b"two").await;
    clone.invalidate_many("t", &[DOC], "v3").await[0]
        .as_ref()
        .unwrap();
    assert_eq!(body_of(&store.lookup(&key(2), &DEPS).await.unwrap()), None);
    store.near_cache_hold_pushes(false);
}

#[tokio::test(flavor = "current_thread")]
async fn a_push_is_read_while_the_application_runtime_is_busy() {
    let server = RedisServer::start();
    let near = near_store(&server, NEAR_BYTES).await;
    fill(&near, &key(1), b"one").await;
    let held = near.near_cache_len().unwrap();
    // Another process invalidates, on a thread and runtime of its own, while this test holds
    // the only thread of its runtime: no task of this runtime runs from here on.
    let url = server.url();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let other = RedisStore::builder()
                .url(url)
                .timeout(TIMEOUT)
                .build()
                .await
                .unwrap();
            other.invalidate("t", DOC, "v2").await.unwrap();
        });
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while near.near_cache_len().unwrap() >= held {
        assert!(
            Instant::now() < deadline,
            "the push was not read while the application's runtime was busy"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test]
async fn an_invalidation_from_another_process_evicts_when_the_push_arrives() {
    let server = RedisServer::start();
    let near = near_store(&server, NEAR_BYTES).await;
    let other = plain_store(&server).await;
    fill(&near, &key(1), b"one").await;

    // While the push is on its way the near copy is still served: that is the window.
    near.near_cache_hold_pushes(true);
    other.invalidate("t", DOC, "v2").await.unwrap();
    let before = mgets(&server);
    assert_eq!(
        body_of(&near.lookup(&key(1), &DEPS).await.unwrap()),
        Some(&b"one"[..])
    );
    assert_eq!(
        mgets(&server),
        before,
        "the stale copy came from the near cache"
    );
    // The push arrives: the copy is gone at once.
    near.near_cache_hold_pushes(false);
    assert_eq!(body_of(&near.lookup(&key(1), &DEPS).await.unwrap()), None);

    // Unheld, a remote invalidation stops the near copy as soon as Redis's push is read.
    fill(&near, &key(2), b"two").await;
    other.invalidate("t", DOC, "v3").await.unwrap();
    until_not_served(&near, &key(2), "the push never evicted the copy").await;
    // A put by another process replaces the entry: the old body is not served either.
    fill(&near, &key(3), b"old").await;
    let Lookup::Miss(observed) = other.lookup(&key(4), &DEPS).await.unwrap() else {
        panic!("expected a miss");
    };
    assert_eq!(
        other.put(&key(3), entry(observed, b"new")).await.unwrap(),
        PutOutcome::Stored
    );
    let deadline = Instant::now() + PATIENCE;
    while body_of(&near.lookup(&key(3), &DEPS).await.unwrap()) != Some(&b"new"[..]) {
        assert!(Instant::now() < deadline, "the old body was served on");
        tokio::task::yield_now().await;
    }
}

/// Near hits look a dep's version up once, not on every hit, while nothing in the near cache
/// changed: a push for the version key alone (the entry itself untouched in Redis and held
/// here) must still end them.
#[tokio::test]
async fn a_push_for_a_dep_version_alone_ends_near_hits_that_had_confirmed_it() {
    let server = RedisServer::start();
    let near = near_store(&server, NEAR_BYTES).await;
    // The doc gets a version key in Redis before the entry is written.
    plain_store(&server)
        .await
        .invalidate("t", DOC, "v1")
        .await
        .unwrap();
    fill(&near, &key(1), b"one").await;
    let before = mgets(&server);
    for _ in 0..3 {
        assert_eq!(
            body_of(&near.lookup(&key(1), &DEPS).await.unwrap()),
            Some(&b"one"[..])
        );
    }
    assert_eq!(mgets(&server), before, "near hits, the versions confirmed");

    let pattern = format!("*dep:ver:{DOC}");
    let found = server.cli(&["--scan", "--pattern", &pattern]);
    let ver_key = found.lines().next().expect("the doc's version key").trim();
    // Touching the key's expiry modifies it without changing its value: Redis pushes an
    // invalidation for it, and for nothing else.
    server.cli(&["EXPIRE", ver_key, "100000"]);
    server.cli(&["PERSIST", ver_key]);
    let started = Instant::now();
    loop {
        let seen = mgets(&server);
        assert_eq!(
            body_of(&near.lookup(&key(1), &DEPS).await.unwrap()),
            Some(&b"one"[..]),
            "the entry is still current"
        );
        if mgets(&server) > seen {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "near hits went on after the version's push"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_push_the_reader_has_not_read_yet_stops_near_hits() {
    let server = RedisServer::start();
    let near = near_store(&server, NEAR_BYTES).await;
    let other = plain_store(&server).await;
    fill(&near, &key(1), b"one").await;
    let before = mgets(&server);
    assert_eq!(
        body_of(&near.lookup(&key(1), &DEPS).await.unwrap()),
        Some(&b"one"[..])
    );
    assert_eq!(mgets(&server), before, "a near hit before the invalidation");

    // The reader's thread is not running (a machine that has not woken it yet): the push sits
    // unread in the socket, and still no near hit is served once Redis has written it.
    let stall = Duration::from_secs(2);
    near.near_cache_stall_reader(stall).await;
    let stalled = Instant::now();
    other.invalidate("t", DOC, "v2").await.unwrap();
    until_not_served(&near, &key(1), "the stale copy was served on").await;
    assert!(
        stalled.elapsed() < stall / 2,
        "the stale copy was served until the reader ran again ({:?})",
        stalled.elapsed()
    );
    // Nothing filled meanwhile: once the reader has run, the entry is still gone.
    tokio::time::sleep(stall).await;
    assert_eq!(body_of(&near.lookup(&key(1), &DEPS).await.unwrap()), None);
}

#[tokio::test]
async fn a_killed_tracking_connection_empties_the_near_cache_before_any_further_near_hit() {
    let server = RedisServer::start();
    let near = near_store(&server, NEAR_BYTES).await;
    let other = plain_store(&server).await;
    fill(&near, &key(1), b"one").await;
    assert!(near.near_cache_len().unwrap() > 0);
    let [id] = tracking_clients(&server).try_into().unwrap();

    // Pushes are held, so nothing but the loss of the connection can drop the copy.
    near.near_cache_hold_pushes(true);
    server.cli(&["CLIENT", "KILL", "ID", &id]);
    eventually("the near cache is emptied", || {
        near.near_cache_len() == Some(0)
    })
    .await;
    // Changes made while no tracking connection exists are never pushed to this process.
    other.invalidate("t", DOC, "v2").await.unwrap();
    assert_eq!(body_of(&near.lookup(&key(1), &DEPS).await.unwrap()), None);

    // A new tracking connection comes up and near hits resume, coherent again.
    eventually("a new tracking connection", || {
        tracking_clients(&server).iter().any(|c| *c != id)
    })
    .await;
    near.near_cache_hold_pushes(false);
    fill(&near, &key(2), b"two").await;
    let before = mgets(&server);
    assert_eq!(
        body_of(&near.lookup(&key(2), &DEPS).await.unwrap()),
        Some(&b"two"[..])
    );
    assert_eq!(
        mgets(&server),
        before,
        "near hits resume on the new connection"
    );
    other.invalidate("t", DOC, "v3").await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while body_of(&near.lookup(&key(2), &DEPS).await.unwrap()).is_some() {
        assert!(Instant::now() < deadline, "the new connection got no push");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_redis_restart_empties_the_near_cache() {
    let mut server = RedisServer::start();
    let near = near_store(&server, NEAR_BYTES).await;
    fill(&near, &key(1), b"one").await;
    near.near_cache_hold_pushes(true);
    // The runtime keeps running meanwhile, as a server's does: the process reads the loss of
    // its connections when Redis goes.
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    // The restarted Redis is empty: the first lookup that answers must miss, never serve the
    // copy from before the restart.
    let deadline = Instant::now() + PATIENCE;
    loop {
        match near.lookup(&key(1), &DEPS).await {
            Ok(Lookup::Miss(_)) => break,
            Ok(other) => panic!("served from before the restart: {other:?}"),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("never reconnected: {e}"),
        }
    }
    // Nothing from before the restart is held. If the supervisor had already connected to the
    // restarted Redis, the miss went over the new tracking connection and kept what it read:
    // the versions of the declared deps, never an entry (a race that once failed this test when
    // it asked for an empty near cache).
    let held = near.near_cache_len().unwrap();
    assert!(
        held <= DEPS.len() as u64,
        "{held} near slots after the restart and a miss"
    );
    near.near_cache_hold_pushes(false);
    eventually("a tracking connection to the restarted Redis", || {
        tracking_clients(&server).len() == 1
    })
    .await;
    fill(&near, &key(1), b"again").await;
    let before = mgets(&server);
    assert_eq!(
        body_of(&near.lookup(&key(1), &DEPS).await.unwrap()),
        Some(&b"again"[..])
    );
    assert_eq!(mgets(&server), before);
}

#[tokio::test]
async fn puts_still_go_through_the_conditional_write() {
    let server = RedisServer::start();
    let near = near_store(&server, NEAR_BYTES).await;
    let other = plain_store(&server).await;
    // Both the near store's own epochs and another process's raise are checked by Redis.
    let Lookup::Miss(observed) = near.lookup(&key(1), &DEPS).await.unwrap() else {
        panic!("expected a miss");
    };
    near.near_cache_hold_pushes(true);
    other.invalidate("t", DOC, "v2").await.unwrap();
    // Its near copy of the dep's version is old (the push is held), yet the put is refused.
    assert_eq!(
        near.put(&key(1), entry(observed, b"stale")).await.unwrap(),
        PutOutcome::Refused(RefusedReason::DepChanged(DOC.into()))
    );
    assert_eq!(body_of(&near.lookup(&key(1), &DEPS).await.unwrap()), None);
    near.near_cache_hold_pushes(false);

    // A refresh put after a near hit is checked too: it carries the epochs of the hit.
    fill(&near, &key(2), b"two").await;
    let Lookup::Fresh(hit) = near.lookup(&key(2), &DEPS).await.unwrap() else {
        panic!("expected a near hit");
    };
    near.near_cache_hold_pushes(true);
    other.invalidate("t", DOC, "v3").await.unwrap();
    assert_eq!(
        near.put(&key(2), entry(hit.deps, b"refreshed"))
            .await
            .unwrap(),
        PutOutcome::Refused(RefusedReason::DepChanged(DOC.into()))
    );
    near.near_cache_hold_pushes(false);
}

#[tokio::test]
async fn the_near_cache_stays_within_its_byte_bound() {
    const BOUND: u64 = 64 * 1024;
    let server = RedisServer::start();
    let near = near_store(&server, BOUND).await;
    let body = vec![b'x'; 1024];
    for n in 0..200 {
        fill(&near, &key(n), &body).await;
        assert!(
            near.near_cache_bytes().unwrap() <= BOUND,
            "{} bytes held after {n} entries",
            near.near_cache_bytes().unwrap()
        );
    }
    let held = near.near_cache_bytes().unwrap();
    assert!(
        held > BOUND / 2,
        "only {held} bytes held: the bound is not used"
    );
    // An entry larger than an eighth of the bound is served from Redis, never held.
    let big = vec![b'y'; (BOUND / 4) as usize];
    fill(&near, &key(1000), &big).await;
    let before = mgets(&server);
    near.lookup(&key(1000), &DEPS).await.unwrap();
    assert_eq!(mgets(&server), before + 1);
    assert!(near.near_cache_bytes().unwrap() <= BOUND);
}

#[tokio::test]
async fn an_unanswered_heartbeat_stops_near_hits_after_the_lease() {
    let server = RedisServer::start();
    let near = near_store(&server, NEAR_BYTES).await;
    fill(&near, &key(1), b"one").await;
    // Redis stops answering (every client) for longer than the lease; the heartbeat's own
    // timeout is longer still, so only the lease can stop the near hits.
    server.cli(&["CLIENT", "PAUSE", "1800", "ALL"]);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let started = Instant::now();
    let lookup = near.lookup(&key(1), &DEPS).await.unwrap();
    // The lookup went to Redis and waited for the pause to end.
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "served from the near cache {:?} into a pause, past the lease",
        started.elapsed() + Duration::from_millis(1300)
    );
    assert_eq!(body_of(&lookup), Some(&b"one"[..]));
}

#[tokio::test]
async fn the_near_cache_is_refused_on_redis_cluster() {
    let nodes = ["redis://127.0.0.1:1/", "redis://127.0.0.1:2/"];
    let err = RedisStore::builder()
        .cluster(nodes)
        .near_cache(NEAR_BYTES)
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::InvalidInput);
    assert!(err.to_string().contains("Redis Cluster"), "{err}");
    let err = RedisStore::builder()
        .cluster(nodes)
        .near_cache(NEAR_BYTES)
        .build_lazy()
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::InvalidInput);
}
