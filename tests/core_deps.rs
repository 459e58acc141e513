//! DESIGN section 4, one test per rule, through the layer; TTL and the stale window.

mod common;

use std::time::Duration;

use cachecore::{CachecoreLayer, Dep, MemoryStore, RequestContext, POLICY_DEP};
use cachecore::{DepErrorKind, Invalidated, Invalidation, InvalidationError};
use common::*;

fn with_deps(body: &str, deps: &[Dep]) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = chat(body);
    req.extensions_mut()
        .insert(RequestContext::with_deps(deps.iter().cloned()));
    req
}

fn layer_on(store: &MemoryStore) -> CachecoreLayer {
    CachecoreLayer::builder()
        .store(store.clone())
        .tenant("acme")
        .build()
}

#[tokio::test]
async fn rule_1_record_at_lookup_time() {
    let store = MemoryStore::new();
    let layer = layer_on(&store);
    let up = Upstream::new();
    let svc = stack(&layer, &up);
    for hash in ["v2", "v3"] {
        let _ = layer
            .invalidator()
            .invalidate(Invalidation::of(["doc:1"]).new_hash(hash))
            .await;
    }
    send(&svc, with_deps("a", &[Dep::new("doc:1")])).await;
    let entries = store.entries();
    assert_eq!(entries.len(), 1);
    let deps = &entries[0].1.deps;
    assert_eq!(
        deps.get("doc:1"),
        Some(2),
        "the epoch current when the request was looked up"
    );
    assert_eq!(
        deps.get(POLICY_DEP),
        Some(0),
        "the policy dep is recorded on every entry"
    );
    assert_eq!(deps.len(), 2);
}

#[tokio::test]
async fn rule_2_invalidate_turns_the_next_request_into_a_miss_and_spares_other_entries() {
    let store = MemoryStore::new();
    let layer = layer_on(&store);
    let up = Upstream::new();
    let svc = stack(&layer, &up);
    let contract = || with_deps("summarise 123", &[Dep::new("doc:contract-123").hash("v1")]);
    let other = || with_deps("summarise 456", &[Dep::new("doc:contract-456").hash("v1")]);
    let both = || {
        with_deps(
            "compare",
            &[Dep::new("doc:contract-123"), Dep::new("user:tenant-456")],
        )
    };
    for req in [contract(), other(), both()] {
        assert_eq!(send(&svc, req).await.x_cache, "MISS");
    }
    for req in [contract(), other(), both()] {
        assert_eq!(send(&svc, req).await.x_cache, "HIT_L1");
    }

    let r = layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:contract-123"]).new_hash("v2"))
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        r.unwrap().entries_deleted(),
        2,
        "both entries tagged with the dep are deleted"
    );
    assert_eq!(
        store.dep_hash("acme", "doc:contract-123").as_deref(),
        Some("v2")
    );

    assert_eq!(send(&svc, contract()).await.x_cache, "MISS");
    assert_eq!(
        send(&svc, both()).await.x_cache,
        "MISS",
        "any one dep invalidates"
    );
    assert_eq!(
        send(&svc, other()).await.x_cache,
        "HIT_L1",
        "untagged entries stay"
    );
}

#[tokio::test]
async fn rule_2_every_call_invalidates_even_with_the_same_hash() {
    let store = MemoryStore::new();
    let layer = layer_on(&store);
    let up = Upstream::new();
    let svc = stack(&layer, &up);
    let req = || with_deps("q", &[Dep::new("table:products")]);
    for _ in 0..2 {
        send(&svc, req()).await;
        assert_eq!(send(&svc, req()).await.x_cache, "HIT_L1");
        // Two ETL runs on the same day give the same hash; both must take effect.
        assert!(layer
            .invalidator()
            .invalidate(Invalidation::of(["table:products"]).new_hash("batch-2026-11-23"))
            .await
            .is_ok());
        assert_eq!(send(&svc, req()).await.x_cache, "MISS");
    }
}

#[tokio::test]
async fn rule_2_invalidate_many_reports_per_id() {
    let store = MemoryStore::new();
    let layer = layer_on(&store);
    let up = Upstream::new();
    let svc = stack(&layer, &up);
    send(&svc, with_deps("p", &[Dep::new("table:products")])).await;
    send(&svc, with_deps("q", &[Dep::new("table:prices")])).await;
    send(&svc, with_deps("r", &[Dep::new("table:other")])).await;

    let results = layer
        .invalidator()
        .invalidate(
            Invalidation::of(["table:products", "", "table:prices", "bad\nid"])
                .new_hash("2024-03-15"),
        )
        .await
        .map_or_else(InvalidationError::into_results, Invalidated::into_results);
    let summary: Vec<(&str, bool, u64)> = results
        .iter()
        .map(|r| match r {
            Ok(d) => (d.dep_id.as_str(), true, d.deleted),
            Err(e) => (e.dep_id(), false, 0),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("table:products", true, 1),
            ("", false, 0),
            ("table:prices", true, 1),
            ("bad\nid", false, 0)
        ]
    );
    let error = |i: usize| results[i].as_ref().unwrap_err();
    assert!(error(1).message().contains("empty"));
    assert!(error(3).message().contains("control"));
    assert_eq!(error(1).kind(), DepErrorKind::InvalidInput);
    assert_eq!(
        send(&svc, with_deps("p", &[Dep::new("table:products")]))
            .await
            .x_cache,
        "MISS"
    );
    assert_eq!(
        send(&svc, with_deps("r", &[Dep::new("table:other")]))
            .await
            .x_cache,
        "HIT_L1"
    );
}

#[tokio::test]
async fn rule_3_validate_on_read_rejects_entries_whose_dep_moved() {
    // The store keeps the entry (as if reclamation had not run yet): the epoch check alone
    // must keep it from being served.
    let store = MemoryStore::new();
    let layer = layer_on(&store);
    let up = Upstream::new();
    let svc = stack(&layer, &up);
    let req = || with_deps("q", &[Dep::new("doc:9").hash("v1")]);
    send(&svc, req()).await;
    let (key, mut entry) = store.entries().pop().unwrap();
    assert!(layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:9"]).new_hash("v2"))
        .await
        .is_ok());
    // Put the old entry back under its key behind the store's back, epochs as recorded.
    entry.deps = cachecore::DepEpochs::new(vec![("doc:9".into(), 0), (POLICY_DEP.into(), 0)]);
    let lookup = cachecore::CacheStore::lookup(&store, &key, &["doc:9", POLICY_DEP]).await;
    assert!(matches!(lookup, Ok(cachecore::Lookup::Miss(_))));
    let refused = cachecore::CacheStore::put(&store, &key, entry)
        .await
        .unwrap();
    assert!(matches!(refused, cachecore::PutOutcome::Refused(_)));
    assert_eq!(send(&svc, req()).await.x_cache, "MISS");
}

#[tokio::test]
async fn rule_4_invalidation_is_a_barrier() {
    let store = MemoryStore::new();
    let layer = layer_on(&store);
    let (up, gate, mut started) = Upstream::new().gated();
    let svc = stack(&layer, &up);
    let req = || with_deps("summarise", &[Dep::new("doc:contract-123")]);

    // A slow upstream call is in flight...
    let slow = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, req()).await }
    });
    assert_eq!(started.recv().await, Some(1));
    // ...when the webhook fires.
    assert!(layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:contract-123"]).new_hash("v2"))
        .await
        .is_ok());
    gate.add_permits(1);
    let answer = slow.await.unwrap();
    assert_eq!(answer.x_cache, "MISS", "the caller still gets its answer");
    assert!(answer.text().starts_with("call 1"));

    // It was computed from the old contract: it must never be served after the invalidation.
    gate.add_permits(1);
    let next = send(&svc, req()).await;
    assert_eq!(next.x_cache, "MISS");
    assert!(next.text().starts_with("call 2"));
    assert_eq!(layer.metrics().refused_writes, 1);
    assert_eq!(
        store.entry_count(),
        1,
        "only the post-invalidation answer is stored"
    );
}

#[tokio::test]
async fn rule_5_cost_does_not_grow_with_the_number_of_entries() {
    // One invalidation makes every one of many entries unservable at once.
    let store = MemoryStore::new();
    let layer = layer_on(&store);
    let up = Upstream::new();
    let svc = stack(&layer, &up);
    const N: usize = 2_000;
    for i in 0..N {
        send(
            &svc,
            with_deps(&format!("q{i}"), &[Dep::new("table:products")]),
        )
        .await;
    }
    assert_eq!(store.tagged_count("acme", "table:products"), N);
    let r = layer
        .invalidator()
        .invalidate(Invalidation::of(["table:products"]))
        .await
        .unwrap();
    assert_eq!(r.entries_deleted(), N as u64);
    assert_eq!(store.tagged_count("acme", "table:products"), 0);
    for i in (0..N).step_by(97) {
        let seen = send(
            &svc,
            with_deps(&format!("q{i}"), &[Dep::new("table:products")]),
        )
        .await;
        assert_eq!(seen.x_cache, "MISS");
    }
}

#[tokio::test]
async fn rule_6_invalidating_the_policy_version_retires_one_tenant_only() {
    let store = MemoryStore::new();
    let layer = CachecoreLayer::builder()
        .store(store.clone())
        .namespace_resolver(|head| {
            let tenant = head.headers.get("x-tenant")?.to_str().ok()?;
            Some(cachecore::Namespace::new(tenant, "v1"))
        })
        .build();
    let up = Upstream::new();
    let svc = stack(&layer, &up);
    let as_tenant = |t: &str, body: &str, deps: &[Dep]| {
        let mut req = with_deps(body, deps);
        req.headers_mut().insert("x-tenant", t.parse().unwrap());
        req
    };
    for t in ["tenant-a", "tenant-b"] {
        send(&svc, as_tenant(t, "x", &[])).await;
        send(&svc, as_tenant(t, "y", &[Dep::new("doc:1")])).await;
    }
    let r = layer
        .invalidator()
        .invalidate(
            Invalidation::of([POLICY_DEP])
                .tenant("tenant-a")
                .new_hash("v2"),
        )
        .await
        .unwrap();
    assert_eq!(r.entries_deleted(), 2, "every entry of the tenant");
    assert_eq!(
        send(&svc, as_tenant("tenant-a", "x", &[])).await.x_cache,
        "MISS"
    );
    let a_doc = send(&svc, as_tenant("tenant-a", "y", &[Dep::new("doc:1")])).await;
    assert_eq!(a_doc.x_cache, "MISS");
    assert_eq!(
        send(&svc, as_tenant("tenant-b", "x", &[])).await.x_cache,
        "HIT_L1"
    );
    let b_doc = send(&svc, as_tenant("tenant-b", "y", &[Dep::new("doc:1")])).await;
    assert_eq!(b_doc.x_cache, "HIT_L1");
    // A request the resolver places nowhere is not cached at all.
    assert_eq!(send(&svc, chat("x")).await.x_cache, "BYPASS");
}

#[tokio::test]
async fn invalidation_reaches_every_credentials_partition() {
    // With no tenant configured, keys are split by credentials but deps are the
    // application's: one invalidation drops the entries of every API key.
    let store = MemoryStore::new();
    let layer = CachecoreLayer::builder().store(store.clone()).build();
    let up = Upstream::new();
    let svc = stack(&layer, &up);
    let as_key = |k: &str| {
        let mut req = with_deps("summarise", &[Dep::new("doc:1")]);
        req.headers_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
        req
    };
    for k in ["sk-a", "sk-b"] {
        send(&svc, as_key(k)).await;
        assert_eq!(send(&svc, as_key(k)).await.x_cache, "HIT_L1");
    }
    assert_eq!(store.entry_count(), 2, "one entry per API key");
    let r = layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:1"]))
        .await
        .unwrap();
    assert_eq!(r.deps()[0].deleted, 2);
    for k in ["sk-a", "sk-b"] {
        assert_eq!(send(&svc, as_key(k)).await.x_cache, "MISS");
    }
}

#[tokio::test]
async fn rule_6_a_new_policy_version_changes_every_key() {
    let store = MemoryStore::new();
    let up = Upstream::new();
    let v1 = CachecoreLayer::builder()
        .store(store.clone())
        .tenant("acme")
        .policy_version("v1")
        .build();
    let v2 = CachecoreLayer::builder()
        .store(store.clone())
        .tenant("acme")
        .policy_version("v2")
        .build();
    send(&stack(&v1, &up), chat("q")).await;
    assert_eq!(send(&stack(&v1, &up), chat("q")).await.x_cache, "HIT_L1");
    assert_eq!(send(&stack(&v2, &up), chat("q")).await.x_cache, "MISS");
    assert_eq!(store.entry_count(), 2);
}

#[tokio::test]
async fn pinned_versions_of_the_same_dep_never_share_an_entry() {
    let up = Upstream::new();
    let layer = layer_on(&MemoryStore::new());
    let svc = stack(&layer, &up);
    send(
        &svc,
        with_deps("classify", &[Dep::new("classifier-prompt").hash("v3")]),
    )
    .await;
    let v4 = send(
        &svc,
        with_deps("classify", &[Dep::new("classifier-prompt").hash("v4")]),
    )
    .await;
    assert_eq!(v4.x_cache, "MISS");
    let v3 = send(
        &svc,
        with_deps("classify", &[Dep::new("classifier-prompt").hash("v3")]),
    )
    .await;
    assert_eq!(v3.x_cache, "HIT_L1");
}

#[tokio::test]
async fn expired_entries_are_misses() {
    let up = Upstream::new();
    let layer = CachecoreLayer::builder()
        .default_ttl(Duration::from_millis(150))
        .build();
    let svc = stack(&layer, &up);
    send(&svc, chat("q")).await;
    assert_eq!(send(&svc, chat("q")).await.x_cache, "HIT_L1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(&svc, chat("q")).await.x_cache, "MISS");
}

#[tokio::test]
async fn a_per_request_ttl_overrides_the_default() {
    let up = Upstream::new();
    let layer = CachecoreLayer::builder().build();
    let svc = stack(&layer, &up);
    let short = || {
        let mut req = chat("q");
        req.extensions_mut()
            .insert(RequestContext::new().ttl(Duration::from_millis(150)));
        req
    };
    send(&svc, short()).await;
    assert_eq!(send(&svc, short()).await.x_cache, "HIT_L1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(&svc, short()).await.x_cache, "MISS");
}

#[tokio::test]
async fn stale_entries_are_served_while_exactly_one_refresh_runs() {
    let store = MemoryStore::new();
    let (up, gate, mut started) = Upstream::new().gated();
    let layer = CachecoreLayer::builder()
        .store(store.clone())
        .default_ttl(Duration::from_millis(100))
        .stale_window(Duration::from_secs(30))
        .build();
    let svc = stack(&layer, &up);
    gate.add_permits(1);
    send(&svc, chat("q")).await;
    assert_eq!(started.recv().await, Some(1));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Many stale hits while the refresh is held at the gate.
    let mut stale = Vec::new();
    for _ in 0..20 {
        stale.push(tokio::spawn({
            let svc = svc.clone();
            async move { send(&svc, chat("q")).await }
        }));
    }
    for s in stale {
        let seen = s.await.unwrap();
        assert_eq!(seen.x_cache, "HIT_L1_STALE");
        assert!(seen.text().starts_with("call 1"));
    }
    assert_eq!(started.recv().await, Some(2), "one refresh started");
    gate.add_permits(1);
    eventually("the refresh is stored", || layer.metrics().stored == 2).await;
    assert_eq!(up.calls(), 2, "exactly one background refresh");
    assert_eq!(layer.metrics().background_refreshes, 1);
    let fresh = send(&svc, chat("q")).await;
    assert_eq!(fresh.x_cache, "HIT_L1");
    assert!(fresh.text().starts_with("call 2"));
}

#[tokio::test]
async fn rule_7_stale_is_only_old_never_invalidated() {
    let store = MemoryStore::new();
    let up = Upstream::new();
    let layer = CachecoreLayer::builder()
        .store(store.clone())
        .tenant("acme")
        .default_ttl(Duration::from_millis(100))
        .stale_window(Duration::from_secs(30))
        .build();
    let svc = stack(&layer, &up);
    let req = || with_deps("q", &[Dep::new("doc:1")]);
    send(&svc, req()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:1"]))
        .await
        .is_ok());
    let seen = send(&svc, req()).await;
    assert_eq!(
        seen.x_cache, "MISS",
        "an invalidated entry is never served stale"
    );
    assert!(seen.text().starts_with("call 2"));
}
