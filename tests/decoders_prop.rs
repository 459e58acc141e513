//! Property tests for every decoder of outside input, through the public API only.
//!
//! | decoder | input | properties |
//! |---|---|---|
//! | [`hash_canonical_json`] | request bodies | every serialisation of a value hashes alike, and as a reference canonical text built from serde_json; different values hash differently; any bytes: no panic, accepted exactly when serde_json accepts them (the exceptions named below), nothing hashed on refusal |
//! | [`decode_deps`], [`context_from_headers`] | `X-CacheCore-Deps`, `X-CacheCore-Bypass` | any bytes: no panic, and what is accepted is what a reference reading with serde_json says; every valid list round-trips; a request's headers are refused exactly when one of its deps values is |
//! | [`JwtAuth::verify_at`] (feature `jwt`) | tenant tokens | any string: no panic, never valid; tokens signed with the secret verify to their claims; every single-byte change of a token is refused |
//! | [`InvalidateService`] | `POST /v1/invalidate` bodies | any bytes: `200` or a `4xx` JSON error, never a panic; a `200` did exactly what the body says; every valid payload round-trips |
//!
//! The Redis entry codec is crate-private; its properties live beside it, in
//! `src/store/redis/codec.rs`. A failure found here is fixed in the decoder and kept as a named
//! `#[test]` with the failing input (the `regressions` modules below).
//!
//! Where the canonical JSON hasher deliberately differs from a serde_json `Value` (its module
//! docs, `src/key/canonical.rs`, say why): strings and numbers are kept as written, so
//! `"a"`/`"\u0061"`, `1.0`/`1.00` and `0.0`/`-0.0` (equal `Value`s) get different keys, a miss
//! and never a wrong hit; members with the same key are all kept, where serde_json keeps the last;
//! and it accepts three things serde_json refuses: numbers out of the range of an `f64`
//! (`1e400`), escapes of lone UTF-16 surrogates (`"\ud800"`), and nesting exactly 128 deep
//! (serde_json stops at 127).
//!
//! # Case counts
//!
//! In CI each property runs [`CI_CASES`] cases; the whole file takes about 6 s of CPU (a debug
//! build, measured on a 2-core machine). For a soak run set `CACHECORE_SOAK=<seconds>`: each
//! property then runs as many cases as it gets through in its share of that time (its measured
//! rate, the number in its `config(..)`, times `THREADS × seconds / PROPERTIES`), so with the
//! default two test threads the file takes roughly that many seconds:
//!
//! ```sh
//! CACHECORE_SOAK=600 cargo test --all-features --test decoders_prop
//! ```
//!
//! A failing case is shrunk and printed; it is not written to a file.
//!
//! [`hash_canonical_json`]: cachecore::key::hash_canonical_json
//! [`decode_deps`]: cachecore::wire::decode_deps
//! [`context_from_headers`]: cachecore::wire::context_from_headers
//! [`JwtAuth::verify_at`]: cachecore::auth::jwt::JwtAuth::verify_at
//! [`InvalidateService`]: cachecore::invalidate::InvalidateService

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Number, Value};

/// Cases per property in CI.
const CI_CASES: u32 = 256;

/// Properties in this file, which share a soak run's time.
const PROPERTIES: u64 = 13;

/// Test threads the soak time is spread over (cargo's default on a 2-core machine).
const THREADS: u64 = 2;

/// The config of a property that gets through about `cases_per_second` cases a second (debug
/// build, 2-core machine, measured one property at a time): [`CI_CASES`], or under
/// `CACHECORE_SOAK=<seconds>` as many as fit in its share of that time.
fn config(cases_per_second: u64) -> ProptestConfig {
    let soak = std::env::var("CACHECORE_SOAK")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let cases = soak.map_or(CI_CASES, |secs| {
        let cases = secs
            .saturating_mul(THREADS)
            .saturating_mul(cases_per_second)
            / PROPERTIES;
        u32::try_from(cases).unwrap_or(u32::MAX).max(CI_CASES)
    });
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// JSON values and their serialisations, shared by the properties below.

/// Strings that exercise escapes: any character, with quotes, backslashes, controls, non-ASCII
/// and the characters that sort near them over-represented.
fn json_string() -> impl Strategy<Value = String> {
    const TRICKY: &[char] = &[
        'a', 'b', 'A', '"', '\\', '/', '\n', '\u{1}', '\u{1f}', '\u{7f}', 'é', '😀', ' ',
    ];
    let piece = prop_oneof![3 => any::<char>(), 2 => select(TRICKY)];
    vec(piece, 0..8).prop_map(|chars| chars.into_iter().collect())
}

fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..4).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        select(vec![
            0.0,
            -0.0,
            1.0,
            0.5,
            -2.5,
            1e300,
            5e-324,
            f64::MAX,
            1e16
        ])
        .prop_map(Value::from),
    ]
}

/// Any JSON value serde_json can hold.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        json_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(json_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Values from a small set, so that two drawn independently are often equal or nearly so.
fn small_value() -> impl Strategy<Value = Value> {
    let leaf = select(vec![
        Value::Null,
        Value::Bool(true),
        Value::Bool(false),
        Value::from(0),
        Value::from(1),
        Value::from(-1),
        Value::from(0.0),
        Value::from(-0.0),
        Value::from(1.0),
        Value::from(""),
        Value::from("a"),
        Value::from("1"),
    ]);
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..3).prop_map(Value::Array),
            btree_map(select(vec!["", "a", "b"]), inner, 0..3).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

/// A key or string as serde_json writes it, without the quotes.
fn escaped(s: &str) -> Vec<u8> {
    let quoted = serde_json::to_vec(s).expect("strings serialise");
    quoted[1..quoted.len() - 1].to_vec()
}

/// The reference canonical text of `v`: serde_json's own tokens, object members in byte order
/// of their keys as written, top-level members whose key as written is in `ignored` left out.
fn reference(v: &Value, ignored: &[String], out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut members: Vec<(Vec<u8>, &Value)> = map
                .iter()
                .map(|(k, v)| (escaped(k), v))
                .filter(|(k, _)| !ignored.iter().any(|i| i.as_bytes() == k.as_slice()))
                .collect();
            members.sort_by(|a, b| a.0.cmp(&b.0));
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'"');
                out.extend_from_slice(&k);
                out.extend_from_slice(b"\":");
                reference(v, &[], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                reference(v, &[], out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(&serde_json::to_vec(scalar).expect("scalars serialise")),
    }
}

fn white_space(rng: &mut SmallRng, out: &mut Vec<u8>) {
    for _ in 0..rng.random_range(0..4usize).saturating_sub(1) {
        out.push([b' ', b'\n', b'\r', b'\t'][rng.random_range(0..4)]);
    }
}

/// `v` written with its object members in a random order and random white space between
/// tokens; strings and numbers are serde_json's.
fn write_shuffled(v: &Value, rng: &mut SmallRng, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.shuffle(rng);
            out.push(b'{');
            white_space(rng, out);
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                    white_space(rng, out);
                }
                out.extend_from_slice(&serde_json::to_vec(k).expect("keys serialise"));
                white_space(rng, out);
                out.push(b':');
                white_space(rng, out);
                write_shuffled(v, rng, out);
                white_space(rng, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            white_space(rng, out);
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                    white_space(rng, out);
                }
                write_shuffled(v, rng, out);
                white_space(rng, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(&serde_json::to_vec(scalar).expect("scalars serialise")),
    }
}

fn shuffled(v: &Value, seed: u64) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::new();
    white_space(&mut rng, &mut out);
    write_shuffled(v, &mut rng, &mut out);
    white_space(&mut rng, &mut out);
    out
}

/// One change to a byte string: `(where, what, how)`, `how` picking replace, insert or remove.
type Mutation = (usize, u8, u8);

fn mutations(bytes: impl Strategy<Value = u8>) -> impl Strategy<Value = Vec<Mutation>> {
    vec((any::<usize>(), bytes, 0u8..3), 1..4)
}

fn mutate(mut doc: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for &(at, byte, how) in mutations {
        match how {
            0 if !doc.is_empty() => {
                let at = at % doc.len();
                doc[at] = byte;
            }
            1 if !doc.is_empty() => {
                doc.remove(at % doc.len());
            }
            _ => doc.insert(at % (doc.len() + 1), byte),
        }
    }
    doc
}

/// Bytes JSON is made of, and a few it must not contain.
const JSON_BYTES: &[u8] =
    b"{}[]\",:\\/u0123456789-+.eEtrufalsn \n\r\t\x01\x1f\x7f\xc3\xa9\xed\xa0\x80\xff";

/// Outside input: any bytes, bytes from the JSON alphabet, or a value's serialisation damaged
/// in a few places.
fn json_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..64),
        vec(select(JSON_BYTES), 0..64),
        (json_value(), any::<u64>(), mutations(select(JSON_BYTES)))
            .prop_map(|(v, seed, m)| mutate(shuffled(&v, seed), &m)),
    ]
}

// ---------------------------------------------------------------------------------------------

mod canonical_json {
    use cachecore::key::{hash_canonical_json, NotJson};
    use sha2::{Digest, Sha256};

    use super::*;

    fn hash(json: &[u8], ignored: &[String]) -> Result<[u8; 32], NotJson> {
        let mut h = Sha256::new();
        hash_canonical_json(json, ignored, &mut h)?;
        Ok(h.finalize().into())
    }

    /// `v` with every `-0.0` made `0.0`.
    fn zero_signs_dropped(v: &Value) -> Value {
        match v {
            Value::Number(n) if n.as_f64() == Some(0.0) && n.is_f64() => Value::from(0.0),
            Value::Array(items) => Value::Array(items.iter().map(zero_signs_dropped).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), zero_signs_dropped(v)))
                    .collect::<Map<_, _>>(),
            ),
            other => other.clone(),
        }
    }

    /// A value and one changed in one place, which may or may not leave it equal.
    fn value_pair() -> impl Strategy<Value = (Value, Value)> {
        prop_oneof![
            (small_value(), small_value()),
            small_value().prop_map(|v| (v.clone(), v)),
            (small_value(), any::<u64>(), small_value())
                .prop_map(|(v, at, leaf)| (v.clone(), replace_one(v, at, leaf))),
        ]
    }

    /// `v` with its `at % n`-th node (in pre-order) replaced by `with`.
    fn replace_one(v: Value, at: u64, with: Value) -> Value {
        fn nodes(v: &Value) -> u64 {
            1 + match v {
                Value::Array(items) => items.iter().map(nodes).sum(),
                Value::Object(map) => map.values().map(nodes).sum(),
                _ => 0,
            }
        }
        fn walk(v: Value, at: &mut u64, with: &Value) -> Value {
            if *at == 0 {
                *at = u64::MAX;
                return with.clone();
            }
            *at -= 1;
            match v {
                Value::Array(items) => {
                    Value::Array(items.into_iter().map(|v| walk(v, at, with)).collect())
                }
                Value::Object(map) => Value::Object(
                    map.into_iter()
                        .map(|(k, v)| (k, walk(v, at, with)))
                        .collect(),
                ),
                other => other,
            }
        }
        let mut at = at % nodes(&v);
        walk(v, &mut at, &with)
    }

    /// Ignore lists: `user`, and top-level keys spelt as written or as decoded (which match
    /// only when the two are the same).
    fn ignored_for(v: &Value, picks: &[usize]) -> Vec<String> {
        let mut ignored = vec!["user".to_owned()];
        if let Value::Object(map) = v {
            let keys: Vec<&String> = map.keys().collect();
            for (i, &pick) in picks.iter().enumerate() {
                if let Some(k) = keys.get(pick % keys.len().max(1)) {
                    ignored.push(if i % 2 == 0 {
                        (*k).clone()
                    } else {
                        String::from_utf8(escaped(k)).expect("escaped keys are UTF-8")
                    });
                }
            }
        }
        ignored
    }

    /// Documents that serde_json refuses for reasons the canonical form deliberately does
    /// not check (module docs).
    fn refused_only_by_serde_json(e: &serde_json::Error) -> bool {
        let why = e.to_string();
        [
            "number out of range",
            "surrogate",
            "unexpected end of hex escape",
            "recursion limit exceeded",
        ]
        .iter()
        .any(|allowed| why.contains(allowed))
    }

    proptest! {
        #![proptest_config(config(1_500))]

        /// Compact, pretty and reordered serialisations of a value hash as its reference
        /// canonical text, with or without an ignore list.
        #[test]
        fn every_serialisation_of_a_value_hashes_as_its_reference_text(
            v in json_value(),
            seed in any::<u64>(),
            picks in vec(any::<usize>(), 0..3),
        ) {
            let compact = serde_json::to_vec(&v).unwrap();
            let pretty = serde_json::to_vec_pretty(&v).unwrap();
            let reordered = shuffled(&v, seed);
            for ignored in [Vec::new(), ignored_for(&v, &picks)] {
                let mut text = Vec::new();
                reference(&v, &ignored, &mut text);
                let expected: [u8; 32] = Sha256::digest(&text).into();
                for doc in [&compact, &pretty, &reordered] {
                    prop_assert_eq!(
                        hash(doc, &ignored),
                        Ok(expected),
                        "{} ignoring {:?}", String::from_utf8_lossy(doc), ignored
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(config(4_000))]

        /// Values that differ hash differently. Equal values hash alike, except where serde_json
        /// calls two numbers equal that are written differently (`0.0` and `-0.0`): those are
        /// kept as written, a miss rather than a wrong hit.
        #[test]
        fn different_values_hash_differently((a, b) in value_pair(), seed in any::<u64>()) {
            let compact_a = serde_json::to_vec(&a).unwrap();
            let compact_b = serde_json::to_vec(&b).unwrap();
            let ha = hash(&compact_a, &[]).unwrap();
            let hb = hash(&shuffled(&b, seed), &[]).unwrap();
            if a != b {
                prop_assert_ne!(ha, hb, "{} vs {}", a, b);
            } else if compact_a == compact_b {
                prop_assert_eq!(ha, hb, "{}", a);
            } else {
                let (a, b) = (zero_signs_dropped(&a), zero_signs_dropped(&b));
                prop_assert_eq!(a.to_string(), b.to_string());
                prop_assert_ne!(ha, hb);
            }
        }
    }

    proptest! {
        #![proptest_config(config(3_500))]

        /// Any bytes: no panic; accepted exactly when serde_json accepts them (but for the
        /// documented exceptions); on refusal nothing was fed to the hasher.
        #[test]
        fn arbitrary_bytes_are_json_exactly_when_serde_json_says_so(
            doc in json_ish_bytes(),
            ignore_user in any::<bool>(),
        ) {
            let ignored = if ignore_user { vec!["user".to_owned()] } else { Vec::new() };
            let mut h = Sha256::new();
            let ours = hash_canonical_json(&doc, &ignored, &mut h);
            let theirs = serde_json::from_slice::<Value>(&doc);
            let shown = String::from_utf8_lossy(&doc);
            match (&ours, &theirs) {
                (Ok(()), Ok(_)) => {}
                (Err(NotJson), Err(_)) => {
                    prop_assert_eq!(h.finalize(), Sha256::new().finalize(), "{}", shown);
                }
                (Ok(()), Err(e)) => prop_assert!(refused_only_by_serde_json(e), "{}: {}", shown, e),
                (Err(NotJson), Ok(v)) => {
                    prop_assert!(false, "refused, serde_json reads {}: {}", v, shown)
                }
            }
        }
    }

    mod regressions {
        use super::*;

        /// The exceptions named in the file's docs, pinned.
        #[test]
        fn the_documented_differences_from_serde_json() {
            for doc in [
                &b"[1e400]"[..],
                b"[\"\\ud800\"]",
                b"[\"\\udc00\"]",
                b"[\"\\ud800\\u0041\"]",
            ] {
                assert!(hash(doc, &[]).is_ok(), "{}", String::from_utf8_lossy(doc));
                assert!(serde_json::from_slice::<Value>(doc).is_err());
            }
            let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
            assert!(serde_json::from_slice::<Value>(nested(127).as_bytes()).is_ok());
            assert!(serde_json::from_slice::<Value>(nested(128).as_bytes()).is_err());
            assert!(hash(nested(128).as_bytes(), &[]).is_ok());
            assert_eq!(hash(nested(129).as_bytes(), &[]), Err(NotJson));
            // Equal values, different keys: a miss, never a wrong hit.
            assert_ne!(hash(b"[0.0]", &[]), hash(b"[-0.0]", &[]));
            assert_ne!(hash(b"[1.0]", &[]), hash(b"[1.00]", &[]));
            assert_ne!(hash(br#"{"a":1}"#, &[]), hash(br#"{"\u0061":1}"#, &[]));
            assert_ne!(hash(br#"{"a":1,"a":2}"#, &[]), hash(br#"{"a":2}"#, &[]));
        }
    }
}

// ---------------------------------------------------------------------------------------------

mod deps_header {
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    use cachecore::wire::{
        context_from_headers, decode_deps, encode_deps, MAX_DEPS_PER_REQUEST, X_CACHECORE_BYPASS,
        X_CACHECORE_DEPS,
    };
    use cachecore::{validate_dep_id, Dep, MAX_DEP_ID_LEN};
    use http::{HeaderMap, HeaderValue};

    use super::*;

    /// Valid dep ids: anything but control characters, up to the longest allowed.
    fn dep_id() -> impl Strategy<Value = String> {
        let text = json_string().prop_map(|s| s.chars().filter(|c| !c.is_control()).collect());
        prop_oneof![
            4 => text,
            1 => (1..=MAX_DEP_ID_LEN).prop_map(|n| "x".repeat(n)),
            1 => (1..=MAX_DEP_ID_LEN / 4).prop_map(|n| "😀".repeat(n)),
        ]
        .prop_map(|id: String| {
            if id.is_empty() {
                "doc:1".to_owned()
            } else {
                id
            }
        })
    }

    fn dep() -> impl Strategy<Value = Dep> {
        (dep_id(), proptest::option::of(json_string())).prop_map(|(id, hash)| match hash {
            Some(h) => Dep::new(id).hash(h),
            None => Dep::new(id),
        })
    }

    fn deps() -> impl Strategy<Value = Vec<Dep>> {
        prop_oneof![
            8 => vec(dep(), 0..6),
            1 => vec(dep(), MAX_DEPS_PER_REQUEST..=MAX_DEPS_PER_REQUEST),
        ]
    }

    /// What decoding the JSON `v` should give, read with serde_json: an array of at most
    /// [`MAX_DEPS_PER_REQUEST`] items, each an object with a valid string `dep_id` and an
    /// `expected_hash` that is a string, null or absent (other members ignored). serde's
    /// derived structs also read an item written as an array, `[dep_id, expected_hash?]`; the
    /// decoder accepts that spelling too.
    fn expected(v: &Value) -> Option<Vec<Dep>> {
        let items = v.as_array()?;
        if items.len() > MAX_DEPS_PER_REQUEST {
            return None;
        }
        items
            .iter()
            .map(|item| {
                let (id, hash) = match item {
                    Value::Object(m) => (m.get("dep_id")?, m.get("expected_hash")),
                    Value::Array(a) if (1..=2).contains(&a.len()) => (&a[0], a.get(1)),
                    _ => return None,
                };
                let id = id.as_str()?;
                validate_dep_id(id).ok()?;
                Some(match hash {
                    None | Some(Value::Null) => Dep::new(id),
                    Some(Value::String(h)) => Dep::new(id).hash(h.as_str()),
                    Some(_) => return None,
                })
            })
            .collect()
    }

    /// JSON shaped like a deps list, with every field at times of the wrong type or invalid.
    fn deps_like_json() -> impl Strategy<Value = Value> {
        let field = prop_oneof![
            4 => json_string().prop_map(Value::String),
            1 => dep_id().prop_map(Value::String),
            1 => Just(Value::Null),
            1 => json_value(),
        ];
        let item = prop_oneof![
            6 => (
                proptest::option::of(field.clone()),
                proptest::option::of(field.clone()),
                proptest::option::of(field.clone()),
            )
                .prop_map(|(id, hash, extra)| {
                    let mut m = Map::new();
                    for (k, v) in [("dep_id", id), ("expected_hash", hash), ("other", extra)] {
                        if let Some(v) = v {
                            m.insert(k.to_owned(), v);
                        }
                    }
                    Value::Object(m)
                }),
            1 => vec(field, 0..4).prop_map(Value::Array),
            1 => json_value(),
        ];
        prop_oneof![
            8 => vec(item, 0..5).prop_map(Value::Array),
            1 => json_value(),
        ]
    }

    proptest! {
        #![proptest_config(config(400))]

        #[test]
        fn every_valid_deps_list_round_trips(deps in deps(), padded in any::<bool>()) {
            let mut value = encode_deps(&deps);
            if padded {
                // Some encoders pad, and header values may carry white space around them.
                let json = URL_SAFE_NO_PAD.decode(&value).unwrap();
                value = format!(" {}\t", URL_SAFE.encode(json));
            }
            prop_assert_eq!(decode_deps(value.as_bytes()), Ok(deps));
        }
    }

    proptest! {
        #![proptest_config(config(4_000))]

        /// Any bytes, or base64url of any bytes: no panic, and what is accepted is valid and
        /// reads back the same once encoded again.
        #[test]
        fn arbitrary_bytes_are_refused_or_give_valid_deps(
            raw in json_ish_bytes(),
            encode in any::<bool>(),
        ) {
            let value = if encode { URL_SAFE_NO_PAD.encode(&raw).into_bytes() } else { raw };
            if let Ok(deps) = decode_deps(&value) {
                prop_assert!(deps.len() <= MAX_DEPS_PER_REQUEST);
                for d in &deps {
                    prop_assert!(validate_dep_id(d.id()).is_ok(), "{:?}", d);
                }
                prop_assert_eq!(decode_deps(encode_deps(&deps).as_bytes()), Ok(deps));
            }
        }
    }

    proptest! {
        #![proptest_config(config(1_500))]

        /// Deps-shaped JSON is accepted exactly when a reading of it with serde_json says it
        /// is a valid deps list, and then gives that list.
        #[test]
        fn accepts_exactly_the_valid_lists(v in deps_like_json()) {
            let value = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap());
            prop_assert_eq!(decode_deps(value.as_bytes()).ok(), expected(&v), "{}", v);
        }
    }

    /// A header value: a deps list, deps-shaped JSON, or anything, as far as a header value
    /// may hold it.
    fn header_value() -> impl Strategy<Value = HeaderValue> {
        prop_oneof![
            deps().prop_map(|d| encode_deps(&d).into_bytes()),
            deps_like_json().prop_map(|v| {
                URL_SAFE_NO_PAD
                    .encode(serde_json::to_vec(&v).unwrap())
                    .into_bytes()
            }),
            json_ish_bytes(),
        ]
        .prop_filter_map("not a header value", |b| HeaderValue::from_bytes(&b).ok())
    }

    proptest! {
        #![proptest_config(config(400))]

        /// Every deps header of a request, with or without a bypass header: the context is
        /// refused exactly when a deps value is, or when they declare too many together.
        #[test]
        fn request_headers_are_read_as_their_values_are(
            values in vec(header_value(), 0..4),
            bypass in proptest::option::of(select(vec!["1", " TRUE ", "0", "yes"])),
        ) {
            let mut headers = HeaderMap::new();
            for v in &values {
                headers.append(X_CACHECORE_DEPS, v.clone());
            }
            if let Some(b) = bypass {
                headers.insert(X_CACHECORE_BYPASS, HeaderValue::from_static(b));
            }
            let ctx = context_from_headers(&headers);
            if matches!(bypass, Some("1" | " TRUE ")) {
                prop_assert!(matches!(ctx, Ok(Some(_))));
            } else if values.is_empty() {
                prop_assert!(matches!(ctx, Ok(None)));
            } else {
                let decoded: Result<Vec<_>, _> =
                    values.iter().map(|v| decode_deps(v.as_bytes())).collect();
                let valid = decoded
                    .is_ok_and(|d| d.iter().map(Vec::len).sum::<usize>() <= MAX_DEPS_PER_REQUEST);
                prop_assert_eq!(ctx.is_ok(), valid);
            }
        }
    }

    mod regressions {
        use super::*;

        #[test]
        fn one_dep_over_the_limit_is_refused() {
            let deps = vec![Dep::new("d"); MAX_DEPS_PER_REQUEST + 1];
            let e = decode_deps(encode_deps(&deps).as_bytes()).unwrap_err();
            assert!(e.to_string().contains("limit"), "{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[cfg(feature = "jwt")]
mod jwt {
    use std::time::Duration;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;
    use cachecore::auth::jwt::{Claims, JwtAuth, JwtError, CLOCK_LEEWAY, MAX_TENANT_LEN};
    use hmac::{Hmac, KeyInit, Mac};
    use sha2::Sha256;

    use super::*;

    const SECRET: &str = "decoders-prop-secret-0123456789abcdef";

    /// The time of every check, seconds since the Unix epoch (2030).
    const NOW: u64 = 1_900_000_000;

    fn auth() -> JwtAuth {
        JwtAuth::new(SECRET).unwrap()
    }

    /// `header.payload.signature`, signed with HS256 under `secret`, written here rather than
    /// by [`JwtAuth::mint`].
    fn sign(header: &[u8], payload: &[u8], secret: &str) -> String {
        let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(input.as_bytes());
        format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
    }

    fn tenant() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => json_string(),
            1 => (1..=MAX_TENANT_LEN).prop_map(|n| "t".repeat(n)),
        ]
        .prop_map(|t: String| {
            let t: String = t.chars().filter(|c| !c.is_control()).collect();
            if t.is_empty() {
                "acme".to_owned()
            } else {
                t
            }
        })
    }

    /// Claims valid at [`NOW`].
    fn claims() -> impl Strategy<Value = Claims> {
        let leeway = CLOCK_LEEWAY.as_secs();
        (
            tenant(),
            proptest::option::of(json_string()),
            prop_oneof![NOW - leeway..NOW + 3600, NOW - leeway..=u64::MAX],
            proptest::option::of(0..=NOW + leeway),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(tenant, policy, exp, nbf, iat)| {
                let mut c = Claims::new(tenant, Duration::ZERO).expires_at(exp);
                if let Some(p) = policy {
                    c = c.policy_version(p);
                }
                if let Some(nbf) = nbf {
                    c = c.not_before(nbf);
                }
                c.iat = iat;
                c
            })
    }

    /// JOSE headers an issuer may write for HS256: member order, `typ`, `kid`, white space.
    fn header() -> impl Strategy<Value = Vec<u8>> {
        select(vec![
            &br#"{"alg":"HS256","typ":"JWT"}"#[..],
            br#"{"typ":"JWT","alg":"HS256"}"#,
            br#"{"alg":"HS256"}"#,
            br#"{ "alg" : "HS256", "kid": "k1" }"#,
        ])
        .prop_map(<[u8]>::to_vec)
    }

    /// Strings shaped like tokens, or not at all.
    fn token_ish() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            "[A-Za-z0-9_=+/-]{0,40}",
            json_ish_bytes().prop_map(|b| B64.encode(b)),
            json_value().prop_map(|v| B64.encode(serde_json::to_vec(&v).unwrap())),
        ];
        prop_oneof![
            any::<String>(),
            "[A-Za-z0-9_=. -]{0,120}",
            vec(segment, 0..5).prop_map(|s| s.join(".")),
            (
                proptest::option::of("cc_[a-z_0-9]{0,12}"),
                header(),
                json_ish_bytes(),
                vec(any::<u8>(), 0..40)
            )
                .prop_map(|(prefix, h, p, s)| {
                    let jwt = format!("{}.{}.{}", B64.encode(h), B64.encode(p), B64.encode(s));
                    match prefix {
                        Some(prefix) => format!("{prefix}.{jwt}"),
                        None => jwt,
                    }
                }),
        ]
    }

    proptest! {
        #![proptest_config(config(1_800))]

        /// Any string: no panic, and never a valid token (that would be a forgery).
        #[test]
        fn arbitrary_strings_never_verify(token in token_ish()) {
            prop_assert!(auth().verify_at(&token, NOW).is_err());
        }
    }

    proptest! {
        #![proptest_config(config(2_000))]

        /// A well-signed token with any payload: no panic; claims accepted only when valid.
        #[test]
        fn any_signed_payload_is_read_without_panicking(
            h in header(),
            payload in prop_oneof![
                json_ish_bytes(),
                json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            ],
        ) {
            if let Ok(claims) = auth().verify_at(&sign(&h, &payload, SECRET), NOW) {
                prop_assert!((1..=MAX_TENANT_LEN).contains(&claims.tenant_id.len()));
                prop_assert!(claims.exp.saturating_add(CLOCK_LEEWAY.as_secs()) >= NOW);
            }
        }
    }

    proptest! {
        #![proptest_config(config(2_000))]

        /// Tokens signed with the secret, by `mint` or by hand, verify to their claims; the
        /// same with another secret do not.
        #[test]
        fn tokens_signed_with_the_secret_verify(
            c in claims(),
            h in header(),
            prefix in any::<bool>(),
        ) {
            let minted = auth().mint(&c);
            let by_hand = sign(&h, &serde_json::to_vec(&c).unwrap(), SECRET);
            for token in [minted, by_hand] {
                let token = if prefix { format!("cc_live_k1.{token}") } else { token };
                prop_assert_eq!(auth().verify_at(&token, NOW), Ok(c.clone()));
            }
            let payload = serde_json::to_vec(&c).unwrap();
            let forged = sign(&h, &payload, "another secret of 32 bytes or more");
            prop_assert_eq!(auth().verify_at(&forged, NOW), Err(JwtError::BadSignature));
        }
    }

    proptest! {
        #![proptest_config(config(90))]

        /// Replacing, inserting or removing any one byte anywhere in a valid token makes it
        /// invalid. (White space around a token, `char::is_whitespace`, is not part of it: it is
        /// trimmed.) Each case tries every change at the ends of the token and at a few places
        /// drawn at random, so the cases together reach every position.
        #[test]
        fn every_single_byte_change_is_refused(
            c in claims(),
            h in header(),
            byte in 0u8..0x80,
            drawn in vec(any::<usize>(), 16),
        ) {
            let token = sign(&h, &serde_json::to_vec(&c).unwrap(), SECRET);
            prop_assert!(auth().verify_at(&token, NOW).is_ok());
            let auth = auth();
            let bytes = token.as_bytes();
            let len = bytes.len();
            let ends = [0, 1, len - 2, len - 1, len];
            for at in ends.into_iter().chain(drawn.iter().map(|d| d % (len + 1))) {
                let mut changed = Vec::new();
                if at < len {
                    if bytes[at] != byte {
                        let mut b = bytes.to_vec();
                        b[at] = byte;
                        changed.push(b);
                    }
                    let mut b = bytes.to_vec();
                    b.remove(at);
                    changed.push(b);
                }
                if !((at == 0 || at == len) && char::from(byte).is_whitespace()) {
                    let mut b = bytes.to_vec();
                    b.insert(at, byte);
                    changed.push(b);
                }
                for b in changed {
                    let t = String::from_utf8(b).expect("ASCII");
                    prop_assert!(auth.verify_at(&t, NOW).is_err(), "accepted {}", t);
                }
            }
        }
    }

    mod regressions {
        use super::*;

        /// Found by `every_single_byte_change_is_refused`: padding appended to the signature
        /// segment was accepted, so one token had several spellings.
        #[test]
        fn a_padded_signature_is_refused() {
            let token = auth().mint(&Claims::new("acme", Duration::from_secs(60)).expires_at(NOW));
            assert!(auth().verify_at(&token, NOW).is_ok());
            let padded = format!("{token}=");
            assert!(
                matches!(auth().verify_at(&padded, NOW), Err(JwtError::Malformed(_))),
                "{padded}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------

mod invalidation_payloads {
    use std::sync::{Arc, Mutex, OnceLock};

    use bytes::Bytes;
    use cachecore::auth::FixedTenant;
    use cachecore::invalidate::{
        ApiError, InvalidateFuture, InvalidateService, Invalidator, MAX_BATCH,
    };
    use cachecore::{DepInvalidated, Invalidated, Invalidation};
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    use super::*;

    const TENANT: &str = "acme";

    /// One call to the invalidator: dep ids and new hash.
    type Call = (Vec<String>, Option<String>);

    /// Records every call and reports success.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Call>>>);

    impl Invalidator for Recorder {
        fn invalidate(&self, invalidation: Invalidation) -> InvalidateFuture<'_> {
            assert_eq!(invalidation.tenant_name(), Some(TENANT));
            self.0.lock().unwrap().push((
                invalidation.dep_ids().map(str::to_owned).collect(),
                invalidation.hash().map(str::to_owned),
            ));
            let results = invalidation
                .dep_ids()
                .map(|d| Ok(DepInvalidated::new(d, 0)))
                .collect();
            Box::pin(std::future::ready(Invalidated::from_results(results)))
        }
    }

    /// Posts `body`; returns the status, the response body and what was invalidated.
    fn post(rt: &tokio::runtime::Runtime, body: Vec<u8>) -> (StatusCode, Bytes, Vec<Call>) {
        let recorder = Recorder::default();
        let service = InvalidateService::new(recorder.clone(), FixedTenant::new(TENANT));
        let req = Request::post("/v1/invalidate")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let (status, body) = rt.block_on(async {
            let res = service.oneshot(req).await.unwrap();
            (
                res.status(),
                res.into_body().collect().await.unwrap().to_bytes(),
            )
        });
        let calls = recorder.0.lock().unwrap().clone();
        (status, body, calls)
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        RT.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
        })
    }

    fn dep_id() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:_./ é-]{1,40}"
    }

    /// A new hash any validation accepts: printable ASCII, not too long.
    fn new_hash() -> impl Strategy<Value = String> {
        "[!-~]{1,64}"
    }

    /// A valid payload, as the call it must make.
    fn valid_call() -> impl Strategy<Value = (bool, Call)> {
        prop_oneof![
            (dep_id(), proptest::option::of(new_hash()))
                .prop_map(|(id, hash)| (true, (vec![id], hash))),
            (
                prop_oneof![8 => vec(dep_id(), 1..6), 1 => vec(dep_id(), MAX_BATCH..=MAX_BATCH)],
                proptest::option::of(new_hash()),
            )
                .prop_map(|(ids, hash)| (false, (ids, hash))),
        ]
    }

    fn payload(
        (single, (ids, hash)): &(bool, Call),
        explicit_null: bool,
        extra: Option<Value>,
    ) -> Value {
        let mut m = Map::new();
        if *single {
            m.insert("dep_id".into(), Value::from(ids[0].as_str()));
        } else {
            m.insert("dep_ids".into(), Value::from(ids.clone()));
        }
        match hash {
            Some(h) => {
                m.insert("new_hash".into(), Value::from(h.as_str()));
            }
            None if explicit_null => {
                m.insert("new_hash".into(), Value::Null);
            }
            None => {}
        }
        if let Some(extra) = extra {
            m.insert("extra".into(), extra);
        }
        Value::Object(m)
    }

    /// Bodies shaped like payloads, each field at times of the wrong type or invalid.
    fn payload_ish() -> impl Strategy<Value = Vec<u8>> {
        let field = prop_oneof![
            3 => dep_id().prop_map(Value::from),
            2 => json_string().prop_map(Value::from),
            1 => vec(prop_oneof![3 => dep_id().prop_map(Value::from), 1 => small_value()], 0..4)
                .prop_map(Value::Array),
            1 => small_value(),
        ];
        let object = (
            proptest::option::of(field.clone()),
            proptest::option::of(field.clone()),
            proptest::option::of(field),
        )
            .prop_map(|(id, ids, hash)| {
                let mut m = Map::new();
                for (k, v) in [("dep_id", id), ("dep_ids", ids), ("new_hash", hash)] {
                    if let Some(v) = v {
                        m.insert(k.to_owned(), v);
                    }
                }
                Value::Object(m)
            });
        prop_oneof![
            2 => json_ish_bytes(),
            2 => (object, any::<u64>()).prop_map(|(v, seed)| shuffled(&v, seed)),
            1 => (valid_call(), any::<u64>(), mutations(select(JSON_BYTES)))
                .prop_map(|(call, seed, m)| {
                    mutate(shuffled(&payload(&call, false, None), seed), &m)
                }),
        ]
    }

    proptest! {
        #![proptest_config(config(115))]

        /// Every valid payload, its members in any order and with any white space, invalidates
        /// exactly its ids with its new hash.
        #[test]
        fn every_valid_payload_round_trips(
            call in valid_call(),
            explicit_null in any::<bool>(),
            extra in proptest::option::of(small_value()),
            seed in any::<u64>(),
        ) {
            let rt = runtime();
            let body = shuffled(&payload(&call, explicit_null, extra), seed);
            let (status, res, calls) = post(rt, body);
            prop_assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&res));
            prop_assert_eq!(calls, vec![call.1]);
        }
    }

    proptest! {
        #![proptest_config(config(1_000))]

        /// Any body: `200` having done what serde_json reads in it, or a `400`/`422` JSON error
        /// having done nothing; never a panic, never another status.
        #[test]
        fn arbitrary_bodies_get_a_4xx_or_do_what_they_say(body in payload_ish()) {
            let rt = runtime();
            let (status, res, calls) = post(rt, body.clone());
            let shown = String::from_utf8_lossy(&body);
            match status {
                StatusCode::OK => {
                    let v: Value = serde_json::from_slice(&body).expect("a 200 body is JSON");
                    let hash = v.get("new_hash").and_then(Value::as_str).map(str::to_owned);
                    let ids: Vec<String> = match (v.get("dep_id"), v.get("dep_ids")) {
                        (Some(id), None) => vec![id.as_str().expect("a string").to_owned()],
                        (None, Some(ids)) => {
                            serde_json::from_value(ids.clone()).expect("strings")
                        }
                        _ => panic!("a 200 for {shown}"),
                    };
                    prop_assert_eq!(calls, vec![(ids, hash)], "{}", shown);
                }
                StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                    prop_assert!(calls.is_empty(), "{}", shown);
                    let e = ApiError::from_body(status, &res).expect("a JSON error");
                    prop_assert!(!e.code().is_empty() && !e.message().is_empty());
                    if serde_json::from_slice::<Value>(&body).is_err() {
                        prop_assert_eq!(e.code(), "malformed_json");
                    }
                }
                other => prop_assert!(false, "{} for {}", other, shown),
            }
        }
    }

    mod regressions {
        use super::*;

        #[test]
        fn one_id_over_the_batch_limit_is_refused() {
            let ids = vec![Value::from("d"); MAX_BATCH + 1];
            let body = serde_json::to_vec(&serde_json::json!({ "dep_ids": ids })).unwrap();
            let (status, res, calls) = post(runtime(), body);
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(
                ApiError::from_body(status, &res).unwrap().code(),
                "batch_too_large"
            );
            assert!(calls.is_empty());
        }
    }
}
