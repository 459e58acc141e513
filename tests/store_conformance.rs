//! One conformance suite for every store: the same functions run against `MemoryStore`
//! (`memory::*`), a single Redis (`redis::*`), a three-master Redis Cluster (`cluster::*`) and a
//! single Redis with the near cache on (`near::*`).
//!
//! Each DESIGN section 4 rule has a test named after it. Tests keep apart by tenant, so the
//! Redis ones share one server (and one cluster) per run.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cachecore::store::redis::RedisStore;
use cachecore::store::{RefusedReason, DEFAULT_PUT_DEADLINE};
use cachecore::testing::now_ms;
use cachecore::{
    CacheKey, CacheStore, DepEpochs, Entry, Lookup, MemoryStore, PutOutcome, StoreErrorKind,
    MAX_DEP_ID_LEN, POLICY_DEP,
};
use http::{HeaderMap, HeaderValue, StatusCode};

/// Generous: these tests check semantics, not latency, on a machine that may be busy.
const TEST_TIMEOUT: Duration = Duration::from_secs(5);

const DOC: &str = "doc:contract-123";

/// A store under test, with raw access to its backend where there is one.
struct Fixture {
    store: Arc<dyn CacheStore>,
    raw: Option<Raw>,
}

enum Raw {
    Single(::redis::aio::MultiplexedConnection),
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl Fixture {
    async fn memory() -> Self {
        Self::memory_with(DEFAULT_PUT_DEADLINE).await
    }

    async fn redis() -> Self {
        Self::redis_with(DEFAULT_PUT_DEADLINE).await
    }

    async fn cluster() -> Self {
        Self::cluster_with(DEFAULT_PUT_DEADLINE).await
    }

    async fn memory_with(put_deadline: Duration) -> Self {
        Self {
            store: Arc::new(MemoryStore::builder().put_deadline(put_deadline).build()),
            raw: None,
        }
    }

    async fn near() -> Self {
        Self::near_with(DEFAULT_PUT_DEADLINE).await
    }

    async fn redis_with(put_deadline: Duration) -> Self {
        Self::single(put_deadline, None).await
    }

    /// A RedisStore with a near cache: the same contract, whatever it serves from process.
    async fn near_with(put_deadline: Duration) -> Self {
        Self::single(put_deadline, Some(16 * 1024 * 1024)).await
    }

    async fn single(put_deadline: Duration, near_cache: Option<u64>) -> Self {
        let server = support::shared_redis();
        let mut builder = RedisStore::builder()
            .url(server.url())
            .timeout(TEST_TIMEOUT)
            .put_deadline(put_deadline);
        if let Some(bytes) = near_cache {
            builder = builder.near_cache(bytes);
        }
        let store = builder.build().await.expect("connect to the test redis");
        let raw = ::redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Self {
            store: Arc::new(store),
            raw: Some(Raw::Single(raw)),
        }
    }

    async fn cluster_with(put_deadline: Duration) -> Self {
        let cluster = support::shared_cluster();
        let store = RedisStore::builder()
            .cluster(cluster.urls())
            .timeout(TEST_TIMEOUT)
            .put_deadline(put_deadline)
            .build()
            .await
            .expect("connect to the test cluster");
        let raw = ::redis::cluster::ClusterClient::new(cluster.urls())
            .unwrap()
            .get_async_connection()
            .await
            .unwrap();
        Self {
            store: Arc::new(store),
            raw: Some(Raw::Cluster(raw)),
        }
    }

    async fn raw_query<T: ::redis::FromRedisValue>(&self, cmd: &::redis::Cmd) -> Option<T> {
        Some(
            match self.raw.as_ref()? {
                Raw::Single(c) => cmd.query_async(&mut c.clone()).await,
                Raw::Cluster(c) => cmd.query_async(&mut c.clone()).await,
            }
            .expect("raw redis command"),
        )
    }

    async fn lookup(&self, key: &CacheKey, deps: &[&str]) -> Lookup {
        self.store.lookup(key, deps).await.expect("lookup")
    }

    async fn put(&self, key: &CacheKey, entry: Entry) -> PutOutcome {
        self.store.put(key, entry).await.expect("put")
    }

    /// Lookup (must miss), then put an entry recording the observed epochs.
    async fn fill(&self, key: &CacheKey, deps: &[&str], body: &str) -> DepEpochs {
        let Lookup::Miss(observed) = self.lookup(key, deps).await else {
            panic!("expected a miss before filling {key:?}");
        };
        let outcome = self
            .put(
                key,
                entry(
                    observed.clone(),
                    body,
                    Duration::from_secs(60),
                    Duration::ZERO,
                ),
            )
            .await;
        assert_eq!(outcome, PutOutcome::Stored);
        observed
    }
}

fn entry(deps: DepEpochs, body: &str, fresh: Duration, stale: Duration) -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Entry {
        status: StatusCode::OK,
        headers,
        body: Bytes::copy_from_slice(body.as_bytes()),
        stored_at_ms: now_ms(),
        fresh_ttl: fresh,
        stale_window: stale,
        deps,
    }
}

fn key(tenant: &str, n: u32) -> CacheKey {
    let mut digest = [0u8; 32];
    digest[..4].copy_from_slice(&n.to_be_bytes());
    digest[31] = 0x5a;
    CacheKey::new(tenant, digest)
}

fn tenant() -> String {
    support::unique("conf")
}

fn body_of(lookup: &Lookup) -> Option<&[u8]> {
    match lookup {
        Lookup::Fresh(e) | Lookup::Stale(e) => Some(&e.body),
        Lookup::Miss(_) => None,
    }
}

fn epochs(lookup: &Lookup) -> &DepEpochs {
    match lookup {
        Lookup::Miss(epochs) => epochs,
        other => panic!("expected a miss, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// DESIGN section 4, one test per rule.

/// Rule 1: a miss returns the current epoch of each declared dep and of the policy dep; the
/// entry written after records exactly those.
async fn record_at_lookup_time(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    for _ in 0..2 {
        fx.store.invalidate(&t, DOC, "h").await.unwrap();
    }
    let k = key(&t, 1);
    let observed = fx.fill(&k, &deps, "answer").await;
    assert_eq!(observed.get(DOC), Some(2));
    assert_eq!(observed.get(POLICY_DEP), Some(0));
    assert_eq!(observed.len(), 2);
    match fx.lookup(&k, &deps).await {
        Lookup::Fresh(e) => {
            assert_eq!(e.deps, observed);
            assert_eq!(&e.body[..], b"answer");
            assert_eq!(e.status, StatusCode::OK);
            assert_eq!(e.headers["content-type"], "application/json");
        }
        other => panic!("expected a fresh hit, got {other:?}"),
    }
}

/// Rule 2: invalidate raises the epoch and deletes the tagged entries; the next lookup misses.
async fn invalidate_turns_next_lookup_into_a_miss(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    let (k1, k2) = (key(&t, 1), key(&t, 2));
    fx.fill(&k1, &deps, "one").await;
    fx.fill(&k2, &deps, "two").await;
    assert!(matches!(fx.lookup(&k1, &deps).await, Lookup::Fresh(_)));

    let result = fx.store.invalidate(&t, DOC, "v2").await.unwrap();
    assert_eq!(result.dep_id, DOC);
    assert_eq!(result.deleted, 2);
    for k in [&k1, &k2] {
        assert_eq!(epochs(&fx.lookup(k, &deps).await).get(DOC), Some(1));
    }
}

/// Rule 3: an entry is served only while every epoch it records is current, even when it is
/// still in the store (reclamation not done yet). Where the backend is reachable directly, the
/// old entry is put back after the invalidation to prove the read itself rejects it.
async fn validate_on_read_rejects_entries_of_an_old_epoch(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    let k = key(&t, 1);
    fx.fill(&k, &deps, "old").await;
    let entry_key = format!("cc:{{{t}}}:l1:{}", k.hex());
    let saved: Option<Vec<u8>> = fx.raw_query(::redis::cmd("GET").arg(&entry_key)).await;

    fx.store.invalidate(&t, DOC, "v2").await.unwrap();
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Miss(_)));

    if let Some(saved) = saved {
        let _: Option<()> = fx
            .raw_query(
                ::redis::cmd("SET")
                    .arg(&entry_key)
                    .arg(saved)
                    .arg("PX")
                    .arg(60_000),
            )
            .await;
        let still_there: Option<i64> = fx.raw_query(::redis::cmd("EXISTS").arg(&entry_key)).await;
        assert_eq!(still_there, Some(1));
        let miss = fx.lookup(&k, &deps).await;
        assert_eq!(epochs(&miss).get(DOC), Some(1));
        // The next put replaces the dead entry.
        fx.put(
            &k,
            entry(
                miss_epochs(miss),
                "new",
                Duration::from_secs(60),
                Duration::ZERO,
            ),
        )
        .await;
        assert_eq!(body_of(&fx.lookup(&k, &deps).await), Some(&b"new"[..]));
    }
}

fn miss_epochs(lookup: Lookup) -> DepEpochs {
    match lookup {
        Lookup::Miss(e) => e,
        other => panic!("expected a miss, got {other:?}"),
    }
}

/// Rule 4: a put whose observed epochs predate an invalidation is refused, and nothing is
/// served afterwards.
async fn invalidation_is_a_barrier(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    let k = key(&t, 1);
    let observed = epochs(&fx.lookup(&k, &deps).await).clone();
    // The upstream call is in flight when the webhook fires.
    fx.store.invalidate(&t, DOC, "v2").await.unwrap();
    let outcome = fx
        .put(
            &k,
            entry(
                observed,
                "stale answer",
                Duration::from_secs(60),
                Duration::ZERO,
            ),
        )
        .await;
    assert_eq!(
        outcome,
        PutOutcome::Refused(RefusedReason::DepChanged(DOC.to_owned()))
    );
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Miss(_)));

    // The policy dep is a barrier too.
    let observed = epochs(&fx.lookup(&k, &deps).await).clone();
    fx.store.invalidate(&t, POLICY_DEP, "p2").await.unwrap();
    let outcome = fx
        .put(
            &k,
            entry(
                observed,
                "stale answer",
                Duration::from_secs(60),
                Duration::ZERO,
            ),
        )
        .await;
    assert_eq!(
        outcome,
        PutOutcome::Refused(RefusedReason::DepChanged(POLICY_DEP.to_owned()))
    );
}

/// Rule 5: a dep tagged on many entries is invalid the moment the epoch moves; its entries are
/// all reclaimed.
async fn cost_does_not_grow_with_the_number_of_entries(fx: Fixture) {
    const N: u32 = 1_500;
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    let observed = epochs(&fx.lookup(&key(&t, 0), &deps).await).clone();
    for n in 0..N {
        let e = entry(
            observed.clone(),
            "x",
            Duration::from_secs(60),
            Duration::ZERO,
        );
        assert_eq!(fx.put(&key(&t, n), e).await, PutOutcome::Stored);
    }
    let result = fx.store.invalidate(&t, DOC, "v2").await.unwrap();
    assert_eq!(result.deleted, u64::from(N));
    for n in (0..N).step_by(97) {
        assert!(matches!(
            fx.lookup(&key(&t, n), &deps).await,
            Lookup::Miss(_)
        ));
    }
}

/// Rule 6: invalidating the policy dep retires every entry of one tenant, and only of that one.
async fn policy_version_dep_retires_one_tenant_only(fx: Fixture) {
    let (a, b) = (tenant(), tenant());
    let (deps_a, deps_b) = ([POLICY_DEP, DOC], [POLICY_DEP, "doc:other"]);
    fx.fill(&key(&a, 1), &deps_a, "a1").await;
    fx.fill(&key(&a, 2), &deps_b, "a2").await;
    fx.fill(&key(&b, 1), &deps_a, "b1").await;

    let result = fx
        .store
        .invalidate(&a, POLICY_DEP, "policy-2")
        .await
        .unwrap();
    assert_eq!(result.deleted, 2);
    assert!(matches!(
        fx.lookup(&key(&a, 1), &deps_a).await,
        Lookup::Miss(_)
    ));
    assert!(matches!(
        fx.lookup(&key(&a, 2), &deps_b).await,
        Lookup::Miss(_)
    ));
    assert_eq!(
        body_of(&fx.lookup(&key(&b, 1), &deps_a).await),
        Some(&b"b1"[..])
    );
}

/// Rule 7: an entry past its fresh TTL is served stale; once a dep moved it is not served at
/// all, stale or not.
async fn stale_is_only_old_never_invalidated(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    let k = key(&t, 1);
    let observed = epochs(&fx.lookup(&k, &deps).await).clone();
    let mut e = entry(
        observed,
        "old",
        Duration::from_secs(1),
        Duration::from_secs(60),
    );
    e.stored_at_ms -= 5_000;
    fx.put(&k, e).await;
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Stale(_)));
    fx.store.invalidate(&t, DOC, "v2").await.unwrap();
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Miss(_)));
}

// ---------------------------------------------------------------------------------------------
// Lifetimes.

/// An entry is gone after its fresh TTL when it has no stale window.
async fn ttl_expiry(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP];
    let k = key(&t, 1);
    let observed = epochs(&fx.lookup(&k, &deps).await).clone();
    fx.put(
        &k,
        entry(
            observed,
            "short",
            Duration::from_millis(300),
            Duration::ZERO,
        ),
    )
    .await;
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Fresh(_)));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Miss(_)));
}

/// Fresh within the TTL, stale within the window after it, then a miss.
async fn stale_window_fresh_then_stale_then_miss(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP];
    let k = key(&t, 1);
    let observed = epochs(&fx.lookup(&k, &deps).await).clone();
    let e = entry(
        observed,
        "w",
        Duration::from_millis(500),
        Duration::from_millis(500),
    );
    let stored_at = e.stored_at_ms;
    fx.put(&k, e).await;
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Fresh(_)));
    sleep_until(stored_at + 750).await;
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Stale(_)));
    sleep_until(stored_at + 1_300).await;
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Miss(_)));

    // The same three states from the stored-at time alone.
    let observed = epochs(&fx.lookup(&k, &deps).await).clone();
    for (n, age, want) in [(2, 0, "fresh"), (3, 15_000, "stale"), (4, 25_000, "miss")] {
        let kn = key(&t, n);
        let mut e = entry(
            observed.clone(),
            "w",
            Duration::from_secs(10),
            Duration::from_secs(10),
        );
        e.stored_at_ms -= age;
        fx.put(&kn, e).await;
        let got = match fx.lookup(&kn, &deps).await {
            Lookup::Fresh(_) => "fresh",
            Lookup::Stale(_) => "stale",
            Lookup::Miss(_) => "miss",
        };
        assert_eq!(got, want, "age {age} ms");
    }
}

async fn sleep_until(ms: u64) {
    let now = now_ms();
    if ms > now {
        tokio::time::sleep(Duration::from_millis(ms - now)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tenants and the invalidation API.

/// The same digest in two tenants names two entries, and a dep id names two deps.
async fn tenant_isolation_same_digest_two_tenants(fx: Fixture) {
    let (a, b) = (tenant(), tenant());
    let deps = [POLICY_DEP, DOC];
    let (ka, kb) = (
        CacheKey::new(a.as_str(), [7; 32]),
        CacheKey::new(b.as_str(), [7; 32]),
    );
    fx.fill(&ka, &deps, "for a").await;
    assert!(matches!(fx.lookup(&kb, &deps).await, Lookup::Miss(_)));
    fx.fill(&kb, &deps, "for b").await;
    assert_eq!(body_of(&fx.lookup(&ka, &deps).await), Some(&b"for a"[..]));
    assert_eq!(body_of(&fx.lookup(&kb, &deps).await), Some(&b"for b"[..]));

    let result = fx.store.invalidate(&a, DOC, "v2").await.unwrap();
    assert_eq!(result.deleted, 1);
    assert!(matches!(fx.lookup(&ka, &deps).await, Lookup::Miss(_)));
    assert_eq!(body_of(&fx.lookup(&kb, &deps).await), Some(&b"for b"[..]));
    assert_eq!(epochs(&fx.lookup(&ka, &deps).await).get(DOC), Some(1));
}

/// Unusual tenant strings (braces, spaces, very long) work and stay apart.
async fn odd_tenants_work_and_stay_apart(fx: Fixture) {
    let base = tenant();
    let odd = [
        format!("{base}{{a}}"),
        format!("{base}{{b}}"),
        format!("{base} spaced é"),
        format!("{base}{}", "x".repeat(300)),
        String::new(),
    ];
    let deps = [POLICY_DEP, DOC];
    for (i, t) in odd.iter().enumerate() {
        let k = CacheKey::new(t.as_str(), [9; 32]);
        if i == odd.len() - 1 {
            // The empty tenant may be shared by other runs: start clean.
            fx.store.invalidate(t, DOC, "reset").await.unwrap();
        }
        fx.fill(&k, &deps, t).await;
    }
    for t in &odd {
        let k = CacheKey::new(t.as_str(), [9; 32]);
        assert_eq!(body_of(&fx.lookup(&k, &deps).await), Some(t.as_bytes()));
    }
    assert_eq!(
        fx.store
            .invalidate(&odd[0], DOC, "v")
            .await
            .unwrap()
            .deleted,
        1
    );
    assert!(matches!(
        fx.lookup(&CacheKey::new(odd[0].as_str(), [9; 32]), &deps)
            .await,
        Lookup::Miss(_)
    ));
    let k1 = CacheKey::new(odd[1].as_str(), [9; 32]);
    assert!(matches!(fx.lookup(&k1, &deps).await, Lookup::Fresh(_)));
}

/// Two invalidations with the same new hash both take effect.
async fn every_call_invalidates_even_with_the_same_new_hash(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    let k = key(&t, 1);
    fx.fill(&k, &deps, "monday").await;
    fx.store
        .invalidate(&t, DOC, "etl-2026-11-23")
        .await
        .unwrap();
    let observed = fx.fill(&k, &deps, "monday, first run").await;
    assert_eq!(observed.get(DOC), Some(1));
    let result = fx
        .store
        .invalidate(&t, DOC, "etl-2026-11-23")
        .await
        .unwrap();
    assert_eq!(result.deleted, 1);
    assert_eq!(epochs(&fx.lookup(&k, &deps).await).get(DOC), Some(2));
}

/// `invalidate_many` reports each id on its own, failures included, in order.
async fn invalidate_many_reports_per_id(fx: Fixture) {
    let t = tenant();
    let (a, b) = ("doc:a", "doc:b");
    fx.fill(&key(&t, 1), &[POLICY_DEP, a], "1").await;
    fx.fill(&key(&t, 2), &[POLICY_DEP, a], "2").await;
    fx.fill(&key(&t, 3), &[POLICY_DEP, b], "3").await;
    let results = fx
        .store
        .invalidate_many(&t, &[a, "", b, "doc:never-used"], "h")
        .await;
    let summary: Vec<Option<(&str, u64)>> = results
        .iter()
        .map(|r| r.as_ref().ok().map(|d| (d.dep_id.as_str(), d.deleted)))
        .collect();
    assert_eq!(
        summary,
        [
            Some((a, 2)),
            None,
            Some((b, 1)),
            Some(("doc:never-used", 0))
        ]
    );
    assert_eq!(
        results[1].as_ref().unwrap_err().kind(),
        StoreErrorKind::InvalidInput
    );
    for n in 1..=3 {
        assert!(matches!(
            fx.lookup(&key(&t, n), &[POLICY_DEP, a, b]).await,
            Lookup::Miss(_)
        ));
    }
    let observed = epochs(&fx.lookup(&key(&t, 9), &[a, b, "doc:never-used"]).await).clone();
    assert_eq!(
        observed.iter().collect::<Vec<_>>(),
        [(a, 1), (b, 1), ("doc:never-used", 1)]
    );
}

/// Empty, over-long and control-character dep ids are refused with an error and change
/// nothing.
async fn invalid_dep_ids_fail_and_change_nothing(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    let k = key(&t, 1);
    fx.fill(&k, &deps, "kept").await;
    let long = "d".repeat(MAX_DEP_ID_LEN + 1);
    let bad = ["", long.as_str(), "doc:1\n", "doc:\u{7f}x", "doc:\u{0}"];
    for id in bad {
        let e = fx.store.invalidate(&t, id, "h").await.unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::InvalidInput, "{id:?} accepted");
        assert!(!e.message().is_empty());
    }
    let rs = fx.store.invalidate_many(&t, &bad, "h").await;
    assert_eq!(rs.len(), bad.len());
    assert!(rs.iter().all(Result::is_err));
    assert_eq!(body_of(&fx.lookup(&k, &deps).await), Some(&b"kept"[..]));
    // The longest valid id works.
    let longest = "d".repeat(MAX_DEP_ID_LEN);
    fx.store.invalidate(&t, &longest, "h").await.unwrap();
    assert_eq!(body_of(&fx.lookup(&k, &deps).await), Some(&b"kept"[..]));
}

/// A put over an existing entry replaces it; an unknown key misses with every epoch at 0.
async fn put_replaces_and_unknown_keys_miss_at_epoch_zero(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC, "doc:two"];
    let k = key(&t, 1);
    let observed = epochs(&fx.lookup(&k, &deps).await).clone();
    assert_eq!(
        observed.iter().collect::<Vec<_>>(),
        [(POLICY_DEP, 0), (DOC, 0), ("doc:two", 0)]
    );
    for body in ["first", "second"] {
        let e = entry(
            observed.clone(),
            body,
            Duration::from_secs(60),
            Duration::ZERO,
        );
        assert_eq!(fx.put(&k, e).await, PutOutcome::Stored);
    }
    assert_eq!(body_of(&fx.lookup(&k, &deps).await), Some(&b"second"[..]));
    // Tagged under every dep: invalidating the last one drops it.
    assert_eq!(
        fx.store
            .invalidate(&t, "doc:two", "h")
            .await
            .unwrap()
            .deleted,
        1
    );
}

// ---------------------------------------------------------------------------------------------
// Rule 8: bounded epoch state. These run on stores with a short put deadline.

/// The put deadline of the stores below: the epoch retention is twice this.
const SHORT_DEADLINE: Duration = Duration::from_millis(1_000);

/// Polls until the store has forgotten `dep`'s epoch (it reads 0 again), writing to the tenant
/// meanwhile (an in-process store forgets on writes). Panics after `limit`.
async fn wait_until_forgotten(fx: &Fixture, t: &str, dep: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let now = epochs(&fx.lookup(&key(t, 999), &[dep]).await).get(dep);
        if now == Some(0) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{dep} still at epoch {now:?} after {limit:?}: epoch state is never forgotten"
        );
        fx.store.invalidate(t, "doc:tick", "t").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A put presented more than the put deadline after its lookup is refused: the store may have
/// forgotten the epochs it observed, so it can no longer check them.
async fn a_put_after_its_deadline_is_refused(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    let k = key(&t, 1);
    let late = epochs(&fx.lookup(&k, &deps).await).clone();
    tokio::time::sleep(SHORT_DEADLINE + Duration::from_millis(100)).await;
    let e = entry(late, "late", Duration::from_secs(60), Duration::ZERO);
    assert_eq!(
        fx.put(&k, e).await,
        PutOutcome::Refused(RefusedReason::DeadlinePassed)
    );
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Miss(_)));
    // In time, the same put is stored; a hit counts as a new observation for a refresh.
    fx.fill(&k, &deps, "on time").await;
    let Lookup::Fresh(hit) = fx.lookup(&k, &deps).await else {
        panic!("expected a hit");
    };
    tokio::time::sleep(SHORT_DEADLINE / 2).await;
    let Lookup::Fresh(again) = fx.lookup(&k, &deps).await else {
        panic!("expected a hit");
    };
    assert!(again.deps.observed_at() > hit.deps.observed_at());
    let refresh = entry(
        again.deps,
        "refreshed",
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert_eq!(fx.put(&k, refresh).await, PutOutcome::Stored);
}

/// A raised epoch that no entry records is forgotten after the retention (it reads 0 again),
/// and a put that observed it before is refused after the dep is raised again, even though the
/// epoch number is the same (a new life).
async fn epochs_are_forgotten_and_a_put_from_the_old_life_is_refused(fx: Fixture) {
    let t = tenant();
    let deps = [POLICY_DEP, DOC];
    let k = key(&t, 1);
    fx.store.invalidate(&t, DOC, "v1").await.unwrap();
    // Observed late in the retention, so the put below is still within its deadline.
    tokio::time::sleep(SHORT_DEADLINE * 3 / 2).await;
    let old_life = epochs(&fx.lookup(&k, &deps).await).clone();
    assert_eq!(old_life.get(DOC), Some(1));
    wait_until_forgotten(&fx, &t, DOC, SHORT_DEADLINE * 3).await;
    fx.store.invalidate(&t, DOC, "v2").await.unwrap();
    assert_eq!(epochs(&fx.lookup(&k, &deps).await).get(DOC), Some(1));
    let e = entry(old_life, "stale", Duration::from_secs(60), Duration::ZERO);
    assert_eq!(
        fx.put(&k, e).await,
        PutOutcome::Refused(RefusedReason::DepChanged(DOC.to_owned()))
    );
    assert!(matches!(fx.lookup(&k, &deps).await, Lookup::Miss(_)));
}

/// An epoch is remembered as long as an entry records it, or records an older one: an entry
/// written at epoch 0 that outlives its invalidation (reclamation missed it) is never served
/// again, however long after the retention; an entry of the current epoch keeps it current.
async fn an_epoch_outlives_every_entry_that_records_it(fx: Fixture) {
    let t = tenant();
    let (doc2, other) = ("doc:two", "doc:other");
    let old = key(&t, 1);
    fx.fill(&old, &[POLICY_DEP, DOC], "old").await;
    let entry_key = format!("cc:{{{t}}}:l1:{}", old.hex());
    let saved: Option<Vec<u8>> = fx.raw_query(::redis::cmd("GET").arg(&entry_key)).await;
    let left: Option<i64> = fx.raw_query(::redis::cmd("PTTL").arg(&entry_key)).await;
    fx.store.invalidate(&t, DOC, "v2").await.unwrap();
    if let (Some(saved), Some(left)) = (saved, left) {
        // Reclamation missed it: the old entry is back, with the expiry it had.
        let _: Option<()> = fx
            .raw_query(
                ::redis::cmd("SET")
                    .arg(&entry_key)
                    .arg(saved)
                    .arg("PX")
                    .arg(left),
            )
            .await;
    }

    // An entry written after a raise keeps that epoch current as long as it lives.
    fx.store.invalidate(&t, doc2, "v2").await.unwrap();
    let current = key(&t, 2);
    fx.fill(&current, &[POLICY_DEP, doc2], "current").await;

    // Well past the retention, with writes that let an in-process store forget.
    fx.store.invalidate(&t, other, "v2").await.unwrap();
    wait_until_forgotten(&fx, &t, other, SHORT_DEADLINE * 4).await;
    assert_eq!(body_of(&fx.lookup(&old, &[POLICY_DEP, DOC]).await), None);
    assert_eq!(
        body_of(&fx.lookup(&current, &[POLICY_DEP, doc2]).await),
        Some(&b"current"[..])
    );
    let now = epochs(&fx.lookup(&key(&t, 3), &[DOC, doc2]).await).clone();
    assert_eq!(now.get(doc2), Some(1));
    if fx.raw.is_some() {
        // The old entry still lives, so its dep's epoch does.
        assert_eq!(now.get(DOC), Some(1));
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $test() { super::$test(super::Fixture::memory().await).await } )*
        }
        mod redis {
            $( #[tokio::test] async fn $test() { super::$test(super::Fixture::redis().await).await } )*
        }
        mod cluster {
            $( #[tokio::test] async fn $test() { super::$test(super::Fixture::cluster().await).await } )*
        }
        mod near {
            $( #[tokio::test] async fn $test() { super::$test(super::Fixture::near().await).await } )*
        }
    };
    (short deadline: $($test:ident),* $(,)?) => {
        mod memory_short_deadline {
            $( #[tokio::test] async fn $test() {
                super::$test(super::Fixture::memory_with(super::SHORT_DEADLINE).await).await
            } )*
        }
        mod redis_short_deadline {
            $( #[tokio::test] async fn $test() {
                super::$test(super::Fixture::redis_with(super::SHORT_DEADLINE).await).await
            } )*
        }
        mod cluster_short_deadline {
            $( #[tokio::test] async fn $test() {
                super::$test(super::Fixture::cluster_with(super::SHORT_DEADLINE).await).await
            } )*
        }
        mod near_short_deadline {
            $( #[tokio::test] async fn $test() {
                super::$test(super::Fixture::near_with(super::SHORT_DEADLINE).await).await
            } )*
        }
    };
}

conformance!(
    record_at_lookup_time,
    invalidate_turns_next_lookup_into_a_miss,
    validate_on_read_rejects_entries_of_an_old_epoch,
    invalidation_is_a_barrier,
    cost_does_not_grow_with_the_number_of_entries,
    policy_version_dep_retires_one_tenant_only,
    stale_is_only_old_never_invalidated,
    ttl_expiry,
    stale_window_fresh_then_stale_then_miss,
    tenant_isolation_same_digest_two_tenants,
    odd_tenants_work_and_stay_apart,
    every_call_invalidates_even_with_the_same_new_hash,
    invalidate_many_reports_per_id,
    invalid_dep_ids_fail_and_change_nothing,
    put_replaces_and_unknown_keys_miss_at_epoch_zero,
);

conformance!(short deadline:
    a_put_after_its_deadline_is_refused,
    epochs_are_forgotten_and_a_put_from_the_old_life_is_refused,
    an_epoch_outlives_every_entry_that_records_it,
);
