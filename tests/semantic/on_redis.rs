//! L2 on `RedisStore` with its vectors in the Redis Query Engine (`RedisIndex`), on a real
//! Redis Stack started by the test (`scripts/fetch-redis-stack` fetches it; scripts/test runs
//! that). The fake embedder of `tests/semantic.rs` chooses the cosines.

use std::sync::OnceLock;

use cachecore::semantic::RedisIndex;
use cachecore::store::redis::RedisStore;
use cachecore::StoreErrorKind;

use super::*;
use crate::support::{self, unique, RedisCluster, RedisServer};

fn redis_stack() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start_stack)
}

async fn connect(url: &str) -> RedisStore {
    RedisStore::builder()
        .url(url)
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

/// A layer on `store` with L2 in Redis; the tenant is the `x-tenant` header.
async fn layer_on(store: &RedisStore, l2: SemanticCache) -> CachecoreLayer {
    let index = RedisIndex::create(store, DIMS).await.unwrap();
    CachecoreLayer::builder()
        .store(store.clone())
        .namespace_resolver(|head| {
            let t = head.headers.get("x-tenant")?.to_str().ok()?.to_owned();
            Some(Namespace::new(t, "1"))
        })
        .semantic(l2.redis_index(index))
        .build()
}

fn as_tenant(tenant: &str, question: &str, ctx: Option<RequestContext>) -> Request<Full<Bytes>> {
    let mut r = post(body(question));
    r.headers_mut().insert("x-tenant", tenant.parse().unwrap());
    match ctx {
        Some(ctx) => with_ctx(r, ctx),
        None => r,
    }
}

async fn ask_as(svc: &Svc, tenant: &str, question: &str) -> Got {
    send(svc, as_tenant(tenant, question, None)).await
}

/// The keys of `tenant` of one kind (`l1`, `l2`) on the server on `port`.
fn keys_of(port: u16, tenant: &str, kind: &str) -> Vec<String> {
    support::cli(
        port,
        &["--raw", "KEYS", &format!("cc:{{{tenant}}}:{kind}:*")],
    )
    .lines()
    .filter(|l| !l.is_empty())
    .map(str::to_owned)
    .collect()
}

fn pttl(port: u16, key: &str) -> i64 {
    support::cli(port, &["PTTL", key]).trim().parse().unwrap()
}

/// A question, then its paraphrase (cosine 0.955) as a new tenant on `store`: the paraphrase is
/// answered `HIT_L2` with the first answer and the upstream called once. Returns the tenant.
async fn a_paraphrase_hits(store: &RedisStore, prefix: &str) -> String {
    let up = Upstream::default();
    let svc = stack(
        &layer_on(store, SemanticCache::new(fake_pair(0.955))).await,
        &up,
    );
    let tenant = unique(prefix);
    let first = ask_as(&svc, &tenant, Q).await;
    assert_eq!(first.x_cache, "MISS");
    let second = ask_as(&svc, &tenant, PARAPHRASE).await;
    assert_eq!(second.x_cache, "HIT_L2");
    assert_eq!(second.similarity.as_deref(), Some("0.95"));
    assert_eq!(second.body, first.body);
    assert_eq!(up.calls(), 1);
    tenant
}

#[tokio::test]
async fn redis_a_paraphrase_is_hit_l2_and_the_vector_sits_beside_its_entry() {
    let server = redis_stack();
    let store = connect(&server.url()).await;
    let tenant = a_paraphrase_hits(&store, "rq").await;

    // `cc:{<tenant>}:l2:<digest>`, the digest of the L1 entry, and the entry's expiry.
    let l1 = keys_of(server.port(), &tenant, "l1");
    let l2 = keys_of(server.port(), &tenant, "l2");
    assert_eq!((l1.len(), l2.len()), (1, 1), "{l1:?} {l2:?}");
    assert_eq!(l1[0].rsplit(':').next(), l2[0].rsplit(':').next());
    let (e, v) = (pttl(server.port(), &l1[0]), pttl(server.port(), &l2[0]));
    assert!(
        v > 0 && (e - v).abs() < 2_000,
        "entry {e} ms, vector {v} ms"
    );

    // Another process (its own store, index handle and layer) finds the same vector.
    let other = connect(&server.url()).await;
    let svc2 = stack(
        &layer_on(&other, SemanticCache::new(fake_pair(0.955))).await,
        &Upstream::default(),
    );
    assert_eq!(ask_as(&svc2, &tenant, PARAPHRASE).await.x_cache, "HIT_L2");
}

#[tokio::test]
async fn redis_a_resp3_connection_reads_the_search_reply_too() {
    // On RESP3 FT.SEARCH answers a map (`results` of `id` and `extra_attributes`), not the
    // RESP2 array: read as an array, every search failed open and no paraphrase ever hit.
    let server = redis_stack();
    let store = connect(&format!("{}?protocol=resp3", server.url())).await;
    a_paraphrase_hits(&store, "rq-resp3").await;
    let clients = support::cli(server.port(), &["CLIENT", "LIST"]);
    assert!(clients.contains("resp=3"), "no RESP3 client: {clients}");
}

#[tokio::test]
async fn redis_invalidating_the_dep_of_a_matched_entry_makes_the_paraphrase_miss() {
    let server = redis_stack();
    let store = connect(&server.url()).await;
    let layer = layer_on(&store, SemanticCache::new(fake_pair(0.99))).await;
    let svc = stack(&layer, &Upstream::default());
    let tenant = unique("rq-inv");
    let ctx = || Some(RequestContext::new().dep(Dep::new("doc:contract-123")));
    send(&svc, as_tenant(&tenant, Q, ctx())).await;
    let hit = send(&svc, as_tenant(&tenant, PARAPHRASE, ctx())).await;
    assert_eq!(hit.x_cache, "HIT_L2");
    assert_eq!(keys_of(server.port(), &tenant, "l2").len(), 1);

    let result = cachecore::CacheStore::invalidate(&store, &tenant, "doc:contract-123", "v2")
        .await
        .unwrap();
    assert_eq!(result.deleted, 1, "only entries are counted");
    // Reclaimed with the entry, in the same batch.
    assert!(keys_of(server.port(), &tenant, "l2").is_empty());
    let after = send(&svc, as_tenant(&tenant, PARAPHRASE, ctx())).await;
    assert_eq!(after.x_cache, "MISS");
}

#[tokio::test]
async fn redis_tenants_are_isolated_case_and_punctuation_included() {
    let server = redis_stack();
    let store = connect(&server.url()).await;
    let svc = stack(
        &layer_on(&store, SemanticCache::new(fake_pair(0.99))).await,
        &Upstream::default(),
    );
    // TAG fields fold case unless told not to: `Acme-..` and `acme-..` are two tenants.
    let upper = unique("Acme-corp");
    let lower = upper.to_lowercase();
    ask_as(&svc, &upper, Q).await;
    assert_eq!(ask_as(&svc, &lower, PARAPHRASE).await.x_cache, "MISS");
    assert_eq!(
        ask_as(&svc, &unique("other"), PARAPHRASE).await.x_cache,
        "MISS"
    );
    assert_eq!(ask_as(&svc, &upper, PARAPHRASE).await.x_cache, "HIT_L2");
}

#[tokio::test]
async fn redis_tag_values_are_escaped() {
    // `-`, `.` and `:` are query syntax inside a TAG filter: unescaped, `gpt-4o` fails to
    // parse or matches nothing, and no paraphrase would ever hit.
    let server = redis_stack();
    let store = connect(&server.url()).await;
    let svc = stack(
        &layer_on(&store, SemanticCache::new(fake_pair(0.99))).await,
        &Upstream::default(),
    );
    for tenant in [
        unique("gpt-4o.team:eu_1"),
        format!("{{hashed tenant}} {}", unique("x")),
    ] {
        assert_eq!(ask_as(&svc, &tenant, Q).await.x_cache, "MISS");
        assert_eq!(
            ask_as(&svc, &tenant, PARAPHRASE).await.x_cache,
            "HIT_L2",
            "{tenant}"
        );
    }
}

#[tokio::test]
async fn redis_embedders_are_isolated() {
    let server = redis_stack();
    let store = connect(&server.url()).await;
    let with_id = |id: &'static str| {
        SemanticCache::new(Fake {
            id,
            ..fake_pair(0.99).near(0, "where is my parcel", 0.99)
        })
    };
    let one = stack(
        &layer_on(&store, with_id("model-a")).await,
        &Upstream::default(),
    );
    let two = stack(
        &layer_on(&store, with_id("model-b")).await,
        &Upstream::default(),
    );
    let tenant = unique("rq-emb");
    ask_as(&one, &tenant, Q).await;
    assert_eq!(ask_as(&two, &tenant, PARAPHRASE).await.x_cache, "MISS");
    assert_eq!(
        ask_as(&one, &tenant, "where is my parcel").await.x_cache,
        "HIT_L2"
    );
}

#[tokio::test]
async fn redis_the_vector_expires_with_its_entry() {
    let server = redis_stack();
    let store = connect(&server.url()).await;
    let svc = stack(
        &layer_on(&store, SemanticCache::new(fake_pair(0.99))).await,
        &Upstream::default(),
    );
    let tenant = unique("rq-exp");
    let short = RequestContext::new().ttl(Duration::from_millis(300));
    send(&svc, as_tenant(&tenant, Q, Some(short))).await;
    let l2 = keys_of(server.port(), &tenant, "l2");
    assert_eq!(l2.len(), 1);
    assert!(pttl(server.port(), &l2[0]) <= 300);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ask_as(&svc, &tenant, PARAPHRASE).await.x_cache, "MISS");
    assert_eq!(support::cli(server.port(), &["EXISTS", &l2[0]]).trim(), "0");
}

#[tokio::test]
async fn redis_the_distance_is_read_as_one_minus_the_cosine() {
    // KNN always answers the nearest vector, however far: the threshold is checked on the
    // similarity, 1 - the cosine distance Redis reports. Read the other way round, a pair at
    // cosine 0.3 (distance 0.7) would pass a 0.5 threshold and one at 0.7 would not.
    let server = redis_stack();
    let store = connect(&server.url()).await;
    for (similarity, threshold, want) in [
        (0.3, 0.5, "MISS"),
        (0.7, 0.5, "HIT_L2"),
        (0.6, 0.55, "HIT_L2"),
        (0.6, 0.65, "MISS"),
        (-0.9, -1.0, "HIT_L2"),
    ] {
        let l2 = SemanticCache::new(fake_pair(similarity))
            .threshold(threshold)
            .lexical_guards(false);
        let svc = stack(&layer_on(&store, l2).await, &Upstream::default());
        let tenant = unique("rq-scale");
        ask_as(&svc, &tenant, Q).await;
        let got = ask_as(&svc, &tenant, PARAPHRASE).await;
        assert_eq!(
            got.x_cache, want,
            "cosine {similarity}, threshold {threshold}"
        );
        if want == "HIT_L2" {
            let shown: f32 = got.similarity.unwrap().parse().unwrap();
            assert!(
                (shown - similarity).abs() <= 0.011,
                "{shown} for {similarity}"
            );
        }
    }
}

#[tokio::test]
async fn redis_without_the_search_module_says_so_and_l1_keeps_working() {
    let plain = RedisServer::start();
    let store = connect(&plain.url()).await;
    let err = RedisIndex::create(&store, DIMS).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unsupported);
    let message = err.to_string();
    assert!(message.contains("no search module"), "{message}");
    assert!(message.contains("MemoryIndex"), "{message}");

    let layer = CachecoreLayer::builder()
        .store(store)
        .tenant("acme")
        .semantic(SemanticCache::new(fake_pair(0.99)))
        .build();
    let svc = stack(&layer, &Upstream::default());
    assert_eq!(ask(&svc, Q).await.x_cache, "MISS");
    assert_eq!(ask(&svc, Q).await.x_cache, "HIT_L1");
}

#[tokio::test]
async fn redis_an_index_lost_with_a_restart_is_made_again() {
    let mut server = RedisServer::start_stack();
    let store = connect(&server.url()).await;
    let svc = stack(
        &layer_on(&store, SemanticCache::new(fake_pair(0.99))).await,
        &Upstream::default(),
    );
    ask_as(&svc, "t", "warm up").await;
    server.restart();
    // Until the store has reconnected, requests fail open and store nothing.
    for _ in 0..50 {
        ask_as(&svc, "t", "reconnect").await;
        if !keys_of(server.port(), "t", "l1").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The searches found no index; the next write makes it again.
    assert_eq!(ask_as(&svc, "t", Q).await.x_cache, "MISS");
    assert_eq!(ask_as(&svc, "t", PARAPHRASE).await.x_cache, "HIT_L2");
}

#[tokio::test]
async fn redis_cluster_each_tenant_has_its_index_on_its_slot_owner() {
    let cluster = RedisCluster::start_stack();
    let store = RedisStore::builder()
        .cluster(cluster.urls())
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let layer = layer_on(&store, SemanticCache::new(fake_pair(0.99))).await;
    let svc = stack(&layer, &Upstream::default());
    // Tenants until every master owns one.
    let mut owners = std::collections::HashSet::new();
    let ctx = || Some(RequestContext::new().dep(Dep::new("doc:1")));
    for i in 0..64 {
        if owners.len() == cluster.nodes().len() {
            break;
        }
        let tenant = format!("{}-{i}", unique("rqc"));
        if !owners.insert(cluster.node_for_tag(&tenant)) {
            continue;
        }
        send(&svc, as_tenant(&tenant, Q, ctx())).await;
        let hit = send(&svc, as_tenant(&tenant, PARAPHRASE, ctx())).await;
        assert_eq!(hit.x_cache, "HIT_L2", "{tenant}");
        // The search module keeps an index in the slot of its name and indexes its own node's
        // keys only: the tenant's index sits with the tenant's keys.
        let owner = cluster.node_for_tag(&tenant);
        let list = support::cli(owner, &["FT._LIST"]);
        assert!(
            list.contains(&format!("cachecore:l2:v1:{DIMS}:{{{tenant}}}")),
            "{list}"
        );
        assert!(layer
            .invalidator()
            .invalidate(cachecore::Invalidation::of(["doc:1"]).tenant(tenant.as_str()))
            .await
            .is_ok());
        let after = send(&svc, as_tenant(&tenant, PARAPHRASE, ctx())).await;
        assert_eq!(after.x_cache, "MISS", "{tenant}");
    }
    assert_eq!(owners.len(), cluster.nodes().len());
}
