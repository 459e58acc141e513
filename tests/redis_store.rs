//! Redis-only behaviour of `RedisStore`: round trips, key schema, bad data, reclamation, expiry
//! of tag sets, connection loss. Each test starts its own `redis-server` so command counters
//! and key listings see only that test.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::store::redis::RedisStore;
use cachecore::store::RefusedReason;
use cachecore::testing::now_ms;
use cachecore::{
    CacheKey, CacheStore, DepEpochs, Entry, Lookup, PutOutcome, StoreErrorKind, POLICY_DEP,
};
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use support::RedisServer;

const DOC: &str = "doc:contract-123";

async fn store(server: &RedisServer) -> RedisStore {
    store_with_timeout(server, Duration::from_secs(2)).await
}

async fn store_with_timeout(server: &RedisServer, timeout: Duration) -> RedisStore {
    RedisStore::builder()
        .url(server.url())
        .timeout(timeout)
        .build()
        .await
        .expect("connect")
}

fn entry(deps: DepEpochs, body: &[u8], ttl: Duration) -> Entry {
    Entry {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        body: Bytes::copy_from_slice(body),
        stored_at_ms: now_ms(),
        fresh_ttl: ttl,
        stale_window: Duration::ZERO,
        deps,
    }
}

fn key(tenant: &str, n: u32) -> CacheKey {
    let mut digest = [0u8; 32];
    digest[28..].copy_from_slice(&n.to_be_bytes());
    CacheKey::new(tenant, digest)
}

async fn fill(store: &RedisStore, k: &CacheKey, deps: &[&str], ttl: Duration) {
    fill_with(store, k, deps, ttl, b"body").await;
}

/// Misses on `k` and stores `body` with the observed epochs.
async fn fill_with(store: &RedisStore, k: &CacheKey, deps: &[&str], ttl: Duration, body: &[u8]) {
    let Lookup::Miss(observed) = store.lookup(k, deps).await.unwrap() else {
        panic!("expected a miss");
    };
    let outcome = store.put(k, entry(observed, body, ttl)).await.unwrap();
    assert_eq!(outcome, PutOutcome::Stored);
}

/// `INFO commandstats` as command name -> calls.
fn command_calls(server: &RedisServer) -> BTreeMap<String, u64> {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Calls since the last `CONFIG RESETSTAT`, leaving out the test's own INFO and CONFIG.
fn calls_since_reset(server: &RedisServer) -> BTreeMap<String, u64> {
    let mut calls = command_calls(server);
    calls.retain(|name, _| !name.starts_with("info") && !name.starts_with("config"));
    calls
}

fn reset_stats(server: &RedisServer) {
    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
}

#[tokio::test]
async fn one_round_trip_per_hit_lookup_and_per_put() {
    const N: u64 = 25;
    let server = RedisServer::start();
    let store = store(&server).await;
    let deps = [POLICY_DEP, DOC, "doc:two"];

    // Puts: each is one EVALSHA and nothing else.
    reset_stats(&server);
    let observed = match store.lookup(&key("t", 0), &deps).await.unwrap() {
        Lookup::Miss(e) => e,
        other => panic!("{other:?}"),
    };
    for n in 0..N {
        let e = entry(observed.clone(), &[7; 1024], Duration::from_secs(60));
        assert_eq!(
            store.put(&key("t", n as u32), e).await.unwrap(),
            PutOutcome::Stored
        );
    }
    // Redis counts the commands a script runs as well: the client sends one MGET for the miss
    // and one EVALSHA per put; the rest is the script's own work (TIME and SET once; GET,
    // ZRANGE, ZADD and PTTL once per dep; PEXPIRE only when a tag set's expiry must grow).
    let calls = calls_since_reset(&server);
    assert_eq!(calls["mget"], 1);
    assert_eq!(calls["evalsha"], N);
    assert_eq!(calls["time"], N);
    assert_eq!(calls["set"], N);
    for per_dep in ["get", "zrange", "zadd", "pttl"] {
        assert_eq!(calls[per_dep], 3 * N, "{per_dep}");
    }
    assert!(calls["pexpire"] <= 3 * N);
    assert_eq!(calls.len(), 9, "{calls:?}");

    // Hits: each is one MGET (the entry and the three epochs) and nothing else.
    reset_stats(&server);
    for n in 0..N {
        assert!(matches!(
            store.lookup(&key("t", n as u32), &deps).await.unwrap(),
            Lookup::Fresh(_)
        ));
    }
    assert_eq!(
        calls_since_reset(&server),
        BTreeMap::from([("mget".to_owned(), N)])
    );

    // After Redis forgot the scripts (a restart, SCRIPT FLUSH), the first put reloads its
    // script and succeeds; the next is one round trip again.
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    let e = entry(observed.clone(), b"again", Duration::from_secs(60));
    assert_eq!(
        store.put(&key("t", 0), e).await.unwrap(),
        PutOutcome::Stored
    );
    reset_stats(&server);
    let e = entry(observed.clone(), b"again", Duration::from_secs(60));
    assert_eq!(
        store.put(&key("t", 1), e).await.unwrap(),
        PutOutcome::Stored
    );
    let calls = calls_since_reset(&server);
    assert_eq!(
        (
            calls["evalsha"],
            calls.get("eval"),
            calls.get("script|load")
        ),
        (1, None, None)
    );
}

#[tokio::test]
async fn keys_follow_the_schema() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let dep = "doc:{odd} id";
    let k = key("acme-prod", 1);
    fill(&store, &k, &[POLICY_DEP, dep], Duration::from_secs(60)).await;
    store
        .invalidate("acme-prod", "doc:other", "h1")
        .await
        .unwrap();

    let mut keys: Vec<String> = server
        .cli(&["--raw", "KEYS", "*"])
        .lines()
        .map(str::to_owned)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "cc:{acme-prod}:dep:keys:cc:policy-version".to_owned(),
            format!("cc:{{acme-prod}}:dep:keys:{dep}"),
            "cc:{acme-prod}:dep:ver:doc:other".to_owned(),
            format!("cc:{{acme-prod}}:l1:{}", k.hex()),
        ]
    );
    // `<epoch>.<life>:<hash>`, the life a random non-zero number.
    let ver = server.cli(&["--raw", "GET", "cc:{acme-prod}:dep:ver:doc:other"]);
    let (version, hash) = ver.trim_end().split_once(':').unwrap();
    let (epoch, life) = version.split_once('.').unwrap();
    assert_eq!((epoch, hash), ("1", "h1"), "{ver}");
    assert!(life.parse::<u64>().is_ok_and(|l| l > 0), "{ver}");
    // An epoch no entry records expires after the retention: the default put deadline (ten
    // minutes) plus a minute for puts under way.
    let ttl: i64 = server
        .cli(&["TTL", "cc:{acme-prod}:dep:ver:doc:other"])
        .trim()
        .parse()
        .unwrap();
    assert!((650..=660).contains(&ttl), "ttl {ttl}");
    assert_eq!(
        server
            .cli(&["--raw", "TYPE", &format!("cc:{{acme-prod}}:l1:{}", k.hex())])
            .trim(),
        "string"
    );

    // Tenants that are unsafe inside a hash tag are hashed: `h-` + 16 bytes of SHA-256, hex.
    for odd in ["we{ird} tenant", "h-looks-hashed", "", &"long".repeat(20)] {
        let k = key(odd, 2);
        fill(&store, &k, &[POLICY_DEP], Duration::from_secs(60)).await;
        let digest = Sha256::digest(odd.as_bytes());
        let tag: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("cc:{{h-{tag}}}:l1:{}", k.hex());
        assert_eq!(
            server.cli(&["EXISTS", &name]).trim(),
            "1",
            "{odd:?} -> {name}"
        );
    }
}

#[tokio::test]
async fn corrupt_or_foreign_value_is_a_miss_and_replaced() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let deps = [POLICY_DEP, DOC];
    let k = key("t", 1);
    let name = format!("cc:{{t}}:l1:{}", k.hex());

    let mut raw = ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let foreign: [(&str, &[u8]); 5] = [
        ("SET", b"{\"json\":\"from another program\"}"),
        ("SET", b"CCE\x63future format version"),
        ("SET", b"CCE\x01\x00\xc8truncated"),
        ("SET", b""),
        ("HSET", b"a hash, not a string"),
    ];
    for setup in foreign {
        server.cli(&["DEL", &name]);
        let mut cmd = ::redis::cmd(setup.0);
        cmd.arg(&name);
        if setup.0 == "HSET" {
            cmd.arg("field");
        }
        let () = cmd
            .arg(setup.1)
            .query_async(&mut raw)
            .await
            .map(|_: ::redis::Value| ())
            .unwrap();
        let lookup = store.lookup(&k, &deps).await.expect("never an error");
        let Lookup::Miss(observed) = lookup else {
            panic!("{setup:?} served: {lookup:?}");
        };
        let outcome = store
            .put(&k, entry(observed, b"fixed", Duration::from_secs(60)))
            .await;
        assert_eq!(outcome.unwrap(), PutOutcome::Stored);
        match store.lookup(&k, &deps).await.unwrap() {
            Lookup::Fresh(e) => assert_eq!(&e.body[..], b"fixed"),
            other => panic!("not replaced after {setup:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn entry_recording_an_undeclared_dep_is_not_served() {
    // Deps are part of the key, so this only happens on a caller bug; the store cannot check
    // an epoch it did not read, so it does not serve.
    let server = RedisServer::start();
    let store = store(&server).await;
    let k = key("t", 1);
    let recorded = DepEpochs::new(vec![(POLICY_DEP.into(), 0), (DOC.into(), 0)]);
    store
        .put(&k, entry(recorded, b"x", Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(matches!(
        store.lookup(&k, &[POLICY_DEP]).await.unwrap(),
        Lookup::Miss(_)
    ));
    assert!(matches!(
        store.lookup(&k, &[POLICY_DEP, DOC]).await.unwrap(),
        Lookup::Fresh(_)
    ));
}

#[tokio::test]
async fn too_large_entries_are_refused() {
    let server = RedisServer::start();
    let store = RedisStore::builder()
        .url(server.url())
        .max_entry_bytes(4096)
        .build()
        .await
        .unwrap();
    let deps = DepEpochs::new(vec![(POLICY_DEP.into(), 0)]);
    let outcome = store
        .put(
            &key("t", 1),
            entry(deps, &[0; 5000], Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(outcome, PutOutcome::Refused(RefusedReason::TooLarge));
}

#[tokio::test]
async fn reclamation_runs_in_bounded_batches() {
    const N: u32 = 420;
    const BATCH: usize = 50;
    let server = RedisServer::start();
    let store = RedisStore::builder()
        .url(server.url())
        .reclaim_batch(BATCH)
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let deps = [POLICY_DEP, DOC];
    let observed = DepEpochs::new(vec![(POLICY_DEP.into(), 0), (DOC.into(), 0)]);
    for n in 0..N {
        store
            .put(
                &key("t", n),
                entry(observed.clone(), b"x", Duration::from_secs(60)),
            )
            .await
            .unwrap();
    }
    reset_stats(&server);
    let result = store.invalidate("t", DOC, "h").await.unwrap();
    assert_eq!(result.deleted, u64::from(N));
    let batches = u64::from(N).div_ceil(BATCH as u64);
    assert_eq!(
        calls_since_reset(&server),
        BTreeMap::from([
            // One round trip bumps the epoch (GET, SET), sets its expiry from its own and the
            // tag set's (PTTL twice; the tag set's also says whether it exists) and detaches
            // the tag set (RENAME) ...
            ("evalsha".to_owned(), 1),
            ("get".to_owned(), 1),
            ("pttl".to_owned(), 2),
            ("set".to_owned(), 1),
            ("rename".to_owned(), 1),
            // ... then bounded batches reclaim the entries, each batch one round trip that
            // unlinks the entries and the L2 vectors beside them (docs/design.md §5a).
            ("zpopmin".to_owned(), batches),
            ("unlink".to_owned(), 2 * batches),
        ])
    );
    // Only the epoch and the policy dep's tag set are left.
    let mut left: Vec<String> = server
        .cli(&["--raw", "KEYS", "*"])
        .lines()
        .map(str::to_owned)
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "cc:{t}:dep:keys:cc:policy-version".to_owned(),
            format!("cc:{{t}}:dep:ver:{DOC}"),
        ]
    );
    assert!(matches!(
        store.lookup(&key("t", 0), &deps).await.unwrap(),
        Lookup::Miss(_)
    ));

    // A dep that tags no entry: the raise is the only round trip, nothing to reclaim.
    reset_stats(&server);
    let result = store.invalidate("t", "row:8271", "h").await.unwrap();
    assert_eq!(result.deleted, 0);
    let calls = calls_since_reset(&server);
    assert_eq!(
        (calls["evalsha"], calls.get("zpopmin")),
        (1, None),
        "{calls:?}"
    );
}

#[tokio::test]
async fn ver_keys_expire_but_never_before_an_entry_that_records_their_dep() {
    const DEADLINE: Duration = Duration::from_millis(200);
    let server = RedisServer::start();
    let store = RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_secs(2))
        .put_deadline(DEADLINE)
        .build()
        .await
        .unwrap();
    let pttl = |name: &str| -> i64 { server.cli(&["PTTL", name]).trim().parse().unwrap() };
    let ver = |dep: &str| format!("cc:{{t}}:dep:ver:{dep}");

    // No entry: kept for the retention (twice the deadline here), then gone.
    store.invalidate("t", "row:1", "h").await.unwrap();
    let left = pttl(&ver("row:1"));
    assert!(left > 0 && left <= 400, "pttl {left}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.cli(&["EXISTS", &ver("row:1")]).trim(), "0");

    // Entries of the epoch before: kept as long as the tag set the raise detaches.
    fill(
        &store,
        &key("t", 1),
        &[POLICY_DEP, DOC],
        Duration::from_secs(60),
    )
    .await;
    store.invalidate("t", DOC, "h").await.unwrap();
    assert!(pttl(&ver(DOC)) > 59_000, "pttl {}", pttl(&ver(DOC)));

    // Entries of the current epoch: each put extends it to the entry's lifetime.
    fill(
        &store,
        &key("t", 2),
        &[POLICY_DEP, DOC],
        Duration::from_secs(120),
    )
    .await;
    assert!(pttl(&ver(DOC)) > 119_000, "pttl {}", pttl(&ver(DOC)));
    // A shorter entry never shortens it.
    fill(
        &store,
        &key("t", 3),
        &[POLICY_DEP, DOC],
        Duration::from_secs(5),
    )
    .await;
    assert!(pttl(&ver(DOC)) > 119_000);
    // Nor does another raise.
    store.invalidate("t", DOC, "h2").await.unwrap();
    assert!(pttl(&ver(DOC)) > 119_000);

    // A value written before ver keys expired keeps no expiry, and gets a life on its next
    // raise; a put that observed it before is refused after.
    assert_eq!(server.cli(&["SET", &ver("legacy"), "4:h"]).trim(), "OK");
    let Lookup::Miss(before) = store.lookup(&key("t", 4), &["legacy"]).await.unwrap() else {
        panic!("expected a miss");
    };
    assert_eq!(before.get("legacy"), Some(4));
    store.invalidate("t", "legacy", "h2").await.unwrap();
    assert_eq!(pttl(&ver("legacy")), -1);
    let value = server.cli(&["--raw", "GET", &ver("legacy")]);
    assert!(
        value.starts_with("5.") && value.trim_end().ends_with(":h2"),
        "{value}"
    );
    let outcome = store
        .put(&key("t", 4), entry(before, b"x", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        PutOutcome::Refused(RefusedReason::DepChanged("legacy".into()))
    );
}

#[tokio::test]
async fn dep_key_sets_live_at_least_as_long_as_their_longest_entry() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let set = format!("cc:{{t}}:dep:keys:{DOC}");
    let pttl = |name: &str| -> i64 { server.cli(&["PTTL", name]).trim().parse().unwrap() };
    // Absolute expiry times (Unix ms): comparing two PTTLs read one after the other would
    // depend on how long the second read took.
    let expires_at =
        |name: &str| -> i64 { server.cli(&["PEXPIRETIME", name]).trim().parse().unwrap() };
    let deps = [POLICY_DEP, DOC];

    fill(&store, &key("t", 1), &deps, Duration::from_secs(600)).await;
    let long = expires_at(&format!("cc:{{t}}:l1:{}", key("t", 1).hex()));
    let set_expiry = expires_at(&set);
    assert!(
        set_expiry >= long,
        "set expires at {set_expiry} < entry {long}"
    );

    // A shorter-lived entry never shortens the set's expiry.
    fill(&store, &key("t", 2), &deps, Duration::from_secs(5)).await;
    assert!(pttl(&set) > 590_000);

    // A longer-lived one extends it.
    fill(&store, &key("t", 3), &deps, Duration::from_secs(1_200)).await;
    assert!(pttl(&set) > 1_190_000);

    // The stale window counts as lifetime.
    let observed = DepEpochs::new(vec![(POLICY_DEP.into(), 0), (DOC.into(), 0)]);
    let mut e = entry(observed, b"x", Duration::from_secs(1));
    e.stale_window = Duration::from_secs(3_600);
    store.put(&key("t", 4), e).await.unwrap();
    assert!(pttl(&set) > 3_590_000);
    assert!(pttl(&format!("cc:{{t}}:l1:{}", key("t", 4).hex())) > 3_590_000);
}

#[tokio::test]
async fn tag_sets_shed_expired_entries_and_stay_bounded() {
    // A dep that keeps getting new entries keeps its tag set alive forever; the set must not
    // keep every entry ever written.
    let server = RedisServer::start();
    let store = store(&server).await;
    let set = format!("cc:{{t}}:dep:keys:{DOC}");
    let card = || -> u64 { server.cli(&["ZCARD", &set]).trim().parse().unwrap() };
    let observed = DepEpochs::new(vec![(POLICY_DEP.into(), 0), (DOC.into(), 0)]);
    for n in 0..40 {
        let e = entry(observed.clone(), b"short", Duration::from_millis(100));
        store.put(&key("t", n), e).await.unwrap();
    }
    assert_eq!(card(), 40);
    // Members are 32-byte digests scored by expiry.
    let members = server.cli(&["--raw", "ZRANGE", &set, "0", "0"]);
    assert_eq!(members.trim_end_matches('\n').len(), 32);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Each put sheds up to 16 expired members and adds itself.
    for n in 100..103 {
        let e = entry(observed.clone(), b"long", Duration::from_secs(60));
        store.put(&key("t", n), e).await.unwrap();
    }
    assert_eq!(card(), 3);
    // The live ones are still reclaimed by an invalidation.
    let r = store.invalidate("t", DOC, "h").await.unwrap();
    assert_eq!(r.deleted, 3);
}

#[tokio::test]
async fn connection_loss_is_survived() {
    const TIMEOUT: Duration = Duration::from_millis(250);
    let mut server = RedisServer::start();
    let store = store_with_timeout(&server, TIMEOUT).await;
    let deps = [POLICY_DEP, DOC];
    fill(&store, &key("t", 1), &deps, Duration::from_secs(60)).await;

    server.kill();
    for _ in 0..5 {
        let started = Instant::now();
        let err = store
            .lookup(&key("t", 1), &deps)
            .await
            .expect_err("Redis is down");
        let took = started.elapsed();
        assert!(
            matches!(
                err.kind(),
                StoreErrorKind::Timeout | StoreErrorKind::Backend
            ),
            "{err}"
        );
        // Within the timeout, plus scheduling slack on a busy machine.
        assert!(took < TIMEOUT * 3, "took {took:?}");
        let err = store
            .invalidate("t", DOC, "h")
            .await
            .expect_err("Redis is down");
        assert!(matches!(
            err.kind(),
            StoreErrorKind::Timeout | StoreErrorKind::Backend
        ));
    }

    server.restart();
    // The same store reconnects on its own (the restarted Redis is empty).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.lookup(&key("t", 1), &deps).await {
            Ok(Lookup::Miss(_)) => break,
            Ok(other) => panic!("restarted Redis is empty, got {other:?}"),
            Err(e) => assert!(Instant::now() < deadline, "never reconnected: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fill(&store, &key("t", 2), &deps, Duration::from_secs(60)).await;
    assert!(matches!(
        store.lookup(&key("t", 2), &deps).await.unwrap(),
        Lookup::Fresh(_)
    ));
}

#[tokio::test]
async fn build_fails_fast_when_redis_is_down_and_build_lazy_does_not() {
    let port = support::free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let started = Instant::now();
    let err = RedisStore::builder()
        .url(url.as_str())
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await
        .expect_err("nothing listens there");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(matches!(
        err.kind(),
        StoreErrorKind::Timeout | StoreErrorKind::Backend
    ));

    let store = RedisStore::builder()
        .url(url.as_str())
        .build_lazy()
        .unwrap();
    assert!(store.lookup(&key("t", 1), &[POLICY_DEP]).await.is_err());

    let no_target = RedisStore::builder().build().await.unwrap_err();
    assert_eq!(no_target.kind(), StoreErrorKind::InvalidInput);
}

#[tokio::test]
async fn cluster_store_reaches_every_slot() {
    // Tenants hash to slots on all three masters; every script and reclamation batch must stay
    // in one slot (a CROSSSLOT error would fail the call).
    let cluster = support::RedisCluster::start();
    let store = RedisStore::builder()
        .cluster(cluster.urls())
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let deps = [POLICY_DEP, DOC];
    let tenants: Vec<String> = (0..30).map(|i| format!("tenant-{i}")).collect();
    for t in &tenants {
        for n in 0..3 {
            fill(&store, &key(t, n), &deps, Duration::from_secs(60)).await;
        }
    }
    let per_node: Vec<u64> = cluster
        .nodes()
        .iter()
        .map(|n| n.cli(&["DBSIZE"]).trim().parse().unwrap())
        .collect();
    assert!(
        per_node.iter().all(|n| *n > 0),
        "keys per node: {per_node:?}"
    );
    for t in &tenants {
        let r = store.invalidate(t, DOC, "h").await.unwrap();
        assert_eq!(r.deleted, 3, "{t}");
        assert!(matches!(
            store.lookup(&key(t, 0), &deps).await.unwrap(),
            Lookup::Miss(_)
        ));
    }
}

#[tokio::test]
async fn a_lookup_given_up_on_a_paused_redis_times_out_and_the_next_reads_its_own_reply() {
    const TIMEOUT: Duration = Duration::from_millis(200);
    let server = RedisServer::start();
    let store = store_with_timeout(&server, TIMEOUT).await;
    let deps = [POLICY_DEP, DOC];
    for n in [1, 2] {
        let body = format!("body {n}");
        fill_with(
            &store,
            &key("t", n),
            &deps,
            Duration::from_secs(60),
            body.as_bytes(),
        )
        .await;
    }
    let body = |lookup: Lookup| match lookup {
        Lookup::Fresh(e) => e.body,
        other => panic!("{other:?}"),
    };

    // Redis answers nothing for 800 ms: the store's own timer bounds the lookup.
    assert_eq!(server.cli(&["CLIENT", "PAUSE", "800", "ALL"]).trim(), "OK");
    let started = Instant::now();
    let err = store.lookup(&key("t", 1), &deps).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Timeout, "{err}");
    assert!(started.elapsed() < TIMEOUT * 3, "{:?}", started.elapsed());

    // Once Redis answers again, the reply to the lookup given up on is not taken for the next.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let next = loop {
        match store.lookup(&key("t", 2), &deps).await {
            Ok(lookup) => break lookup,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
    };
    assert_eq!(body(next), &b"body 2"[..]);
    assert_eq!(
        body(store.lookup(&key("t", 1), &deps).await.unwrap()),
        &b"body 1"[..]
    );
}
