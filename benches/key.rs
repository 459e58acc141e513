//! Cost of keying a request body: canonical JSON against hashing the raw bytes.
//!
//! The target (DESIGN section 3 makes canonical JSON the default) is that canonicalising a
//! realistic chat-completions body costs at most twice a plain SHA-256 of its bytes.
//!
//! Run with `cargo bench --bench key -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use cachecore::key::{compute_key, hash_canonical_json, BodyKeying, KeyParts};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, Method, Uri};
use sha2::{Digest, Sha256};

/// Body sizes of the two groups: a short prompt, and a long prompt with tools.
const SMALL: usize = 1024;
const LARGE: usize = 16 * 1024;

/// Words the prompts are made of. A few carry characters JSON must escape, about one escape per
/// 55 bytes of prompt: more than English prose, fewer than pasted code, and escapes are what
/// canonicalising a string costs.
const WORDS: &[&str] = &[
    "the",
    "model",
    "should",
    "answer",
    "briefly",
    "and",
    "cite",
    "its",
    "sources",
    "when",
    "asked",
    "about",
    "weather",
    "forecasts",
    "in",
    "Paris",
    "or",
    "Berlin",
    "\"quoted\"",
    "user's",
    "question:",
    "please",
    "summarise",
    "following",
    "document",
    "section",
    "3.2",
    "of",
    "report",
    "revenue",
    "grew",
    "12%",
    "year-over-year,",
    "while",
    "costs",
    "fell.\n",
    "naïve",
    "café",
    "data",
    "pipeline",
    "cache",
    "invalidation",
    "is",
    "hard.\n\n",
];

/// Deterministic word salad of about `len` bytes (xorshift64, fixed seed).
fn text(seed: u64, len: usize) -> String {
    let mut state = seed | 1;
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if !s.is_empty() && !s.ends_with('\n') {
            s.push(' ');
        }
        s.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
    }
    s
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}

/// A chat-completions request as SDKs send it: compact, keys in the SDK's (unsorted) order, so
/// the benchmark pays for sorting the top level, every message and every tool.
fn chat_body(target: usize) -> Vec<u8> {
    let tools = if target >= LARGE {
        let tool = |name: &str, seed: u64| {
            format!(
                r#"{{"type":"function","function":{{"name":"{name}","description":{},"parameters":{{"type":"object","properties":{{"location":{{"type":"string","description":{}}},"unit":{{"type":"string","enum":["celsius","fahrenheit"]}}}},"required":["location"]}}}}}}"#,
                json_str(&text(seed, 200)),
                json_str(&text(seed + 1, 60)),
            )
        };
        format!(
            r#","tools":[{},{},{}],"tool_choice":"auto""#,
            tool("get_weather", 11),
            tool("get_forecast", 12),
            tool("search_documents", 13)
        )
    } else {
        String::new()
    };
    let build = |user_len: usize| {
        format!(
            r#"{{"model":"gpt-4o-mini","messages":[{{"role":"system","content":{}}},{{"role":"user","content":{}}}],"temperature":0.7,"max_tokens":512,"user":"user-1234"{tools}}}"#,
            json_str(&text(1, target / 6)),
            json_str(&text(2, user_len)),
        )
    };
    let fixed = build(0).len();
    let mut user_len = target.saturating_sub(fixed);
    // Escapes make the serialised text a little longer than asked; shrink until it fits.
    let mut body = build(user_len);
    while body.len() > target && user_len > 0 {
        user_len -= (body.len() - target).min(user_len);
        body = build(user_len);
    }
    body.into_bytes()
}

/// The same body pretty-printed (two-space indent), to show what white space costs. serde_json
/// writes keys sorted, so this one has no members to reorder.
fn pretty(body: &[u8]) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(body).expect("bench bodies are JSON");
    serde_json::to_vec_pretty(&v).expect("values always serialise")
}

fn bench_size(c: &mut Criterion, name: &str, size: usize) {
    let body = chat_body(size);
    let pretty_body = pretty(&body);
    let ignored = vec!["user".to_owned()];
    let method = Method::POST;
    let uri: Uri = "/v1/chat/completions".parse().expect("static URI");
    let headers = HeaderMap::new();
    let parts = KeyParts {
        tenant: "tenant-a",
        policy_version: "1",
        partition: Some("3f0c9a51d2e7b864"),
        method: &method,
        uri: &uri,
        headers: &headers,
        vary: &[],
        deps: &[],
        body: &body,
    };
    let canonical = BodyKeying {
        canonical_json: true,
        ignored_fields: ignored.clone(),
    };
    let raw = BodyKeying {
        canonical_json: false,
        ignored_fields: vec![],
    };

    let mut g = c.benchmark_group(format!("key/{name}"));
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("raw_sha256", |b| {
        b.iter(|| Sha256::digest(black_box(&body)))
    });
    g.bench_function("canonical_json", |b| {
        b.iter(|| {
            let mut h = Sha256::new();
            hash_canonical_json(black_box(&body), &ignored, &mut h).expect("valid JSON");
            h.finalize()
        })
    });
    g.bench_function(
        BenchmarkId::new("canonical_json_pretty", pretty_body.len()),
        |b| {
            b.iter(|| {
                let mut h = Sha256::new();
                hash_canonical_json(black_box(&pretty_body), &ignored, &mut h).expect("valid JSON");
                h.finalize()
            })
        },
    );
    g.bench_function("compute_key/canonical_json", |b| {
        b.iter(|| compute_key(black_box(&parts), &canonical))
    });
    g.bench_function("compute_key/raw_body", |b| {
        b.iter(|| compute_key(black_box(&parts), &raw))
    });
    g.finish();
}

fn bench_key(c: &mut Criterion) {
    bench_size(c, "1KiB", SMALL);
    bench_size(c, "16KiB", LARGE);
}

criterion_group!(benches, bench_key);
criterion_main!(benches);
