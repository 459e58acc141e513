//! The dependency contract (DESIGN sections 3 and 4), checked against a reference model by
//! seeded random programs.
//!
//! A program is a few client tasks, each a list of operations run concurrently against one
//! layer on a multi-thread runtime: requests (alone, as two identical requests awaited
//! together, or with the body dropped unread), invalidations, and pauses that let short TTLs
//! run out. Requests vary every part of the key (scheme and authority, method, path, each
//! credential header, `Accept-Encoding`, a header the response may name in `Vary`, declared deps
//! and their pinned hashes, the body, also re-ordered and re-spaced JSON) plus things that are
//! not part of the key (the `user` field the layer ignores, TTLs, bypass, refresh, how the
//! context is given). The store under the layer fails or stalls some calls.
//!
//! The upstream answers with a call number, and records for each call the request that caused
//! it and how many invalidations of each dep had been issued when it started. The model is a
//! few maps: requests, calls, and per dep the invalidations issued and the highest one that
//! returned ok. After every response it checks:
//!
//! - the answer is byte for byte what upstream sent for that call, and a request either got its
//!   own upstream call (`MISS`, `BYPASS`) or a stored one (`HIT_*`), never anything else;
//! - a stored answer is served only to a request equal to the one that caused it in every key
//!   part of section 3, and in the headers the stored response names in `Vary`;
//! - no answer to a bypass request, no uncacheable answer (non-2xx, `no-store`, `Set-Cookie`,
//!   `Vary: *`) is ever served from the cache, and bypass and refresh requests are never served
//!   from it;
//! - rule 4: an answer whose upstream call started before an invalidation of one of its deps
//!   (the policy dep included) was issued is never served to a request issued after that
//!   invalidation returned ok;
//! - nothing is served after its TTL (plus stale window) ran out;
//! - every request completes: each seed runs under a watchdog that names the requests still in
//!   flight if it overruns.
//!
//! The Redis store runs as it is, with its near cache on, and as two stores on two connections
//! (two processes): the layer reads through a store with a near cache, and every other
//! invalidation is made through a second layer on a store of its own, so the first hears of it
//! only through Redis's push. There rule 4 holds with a bound: an invalidation made through
//! the other store stops being served to requests issued more than [`REMOTE_BOUND`] after it
//! returned ok (docs/design.md §7, "Near cache").
//!
//! Knobs (environment):
//!
//! - `CACHECORE_SEED=<n>`: replay one seed (every failure prints the exact command);
//! - `CACHECORE_SOAK=<seconds>`: random seeds for that long, per store;
//! - `CACHECORE_EXCLUDE=<list>`: generate programs without some operations (`pair`, `abandon`,
//!   `invalidate`, `sleep`), store `faults`, the `stale` window, request options (`bypass`,
//!   `refresh`, `scope`, `ttl`) or variations of key parts (`authority`, `path`, `credentials`,
//!   `encoding`, `tone`, `deps`, `body`), to narrow a failure down. It changes the programs, so
//!   it is part of the replay command.
//!
//! Without them, a fixed set of seeds runs per store: a few seconds each.

mod common;
#[cfg(feature = "redis")]
mod support;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::{self, Write as _};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::store::StoreFuture;
use cachecore::{
    CacheKey, CacheStore, CachecoreLayer, Dep, DepInvalidated, Entry, Lookup, MemoryStore,
    PutOutcome, RequestBody, RequestContext, StoreError, StoreErrorKind, POLICY_DEP,
};
use cachecore::{Invalidated, Invalidation, InvalidationError};
use common::watchdog::{self, Watchdog, Worker};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------------
// Settings

/// Seeds run per store when no knob is set: about three seconds per store on a 2-core machine.
const CI_SEEDS: u64 = 8;
/// Client tasks per program.
const TASKS: usize = 4;
/// Operations per client task.
const OPS_PER_TASK: usize = 30;
/// Worker threads of the runtime the layer runs on (more than the cores on purpose: more
/// interleavings).
const WORKERS: usize = 3;
/// One seed normally takes well under a second; past this its requests are reported as stuck.
const SEED_BOUND: Duration = Duration::from_secs(15);
/// The TTL of requests that do not set their own: longer than any program.
const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// The layer's bound on one store call; the injected stalls last longer than this.
const STORE_TIMEOUT: Duration = Duration::from_millis(150);
/// The SystemTime the store stamps entries with and the Instant the model reads are different
/// clocks, each read at millisecond precision by the store.
const CLOCK_SLACK: Duration = Duration::from_millis(25);
/// The longest a single-flight follower may wait in all; far above any upstream delay here.
const COALESCE_TOTAL: Duration = Duration::from_secs(5);
/// Events kept for a failure report.
const EVENTS_KEPT: usize = 60;
/// Two stores on two connections: how long after an invalidation made through the other store
/// returned its answers may still be served (the push on its way). Far above the measured
/// window (README, "Near cache"), so a loaded test machine does not fail it.
const REMOTE_BOUND: Duration = Duration::from_millis(250);

/// What `CACHECORE_EXCLUDE` can leave out of generated programs: operations, store faults, the
/// stale window, request options, and the key parts requests vary in.
const EXCLUDABLE: [&str; 17] = [
    "pair",
    "abandon",
    "invalidate",
    "sleep",
    "faults",
    "stale",
    "bypass",
    "refresh",
    "scope",
    "ttl",
    "authority",
    "path",
    "credentials",
    "encoding",
    "tone",
    "deps",
    "body",
];

#[derive(Clone, Debug)]
struct Settings {
    plan: SeedPlan,
    exclude: BTreeSet<String>,
}

#[derive(Clone, Debug)]
enum SeedPlan {
    Fixed(Vec<u64>),
    Soak(Duration),
}

impl Settings {
    fn from_env() -> Self {
        let exclude: BTreeSet<String> = std::env::var("CACHECORE_EXCLUDE")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        for e in &exclude {
            assert!(
                EXCLUDABLE.contains(&e.as_str()),
                "CACHECORE_EXCLUDE: unknown {e:?}; known: {EXCLUDABLE:?}"
            );
        }
        let plan = if let Ok(seed) = std::env::var("CACHECORE_SEED") {
            let seed = seed
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("CACHECORE_SEED={seed:?} is not a u64"));
            SeedPlan::Fixed(vec![seed])
        } else if let Ok(secs) = std::env::var("CACHECORE_SOAK") {
            let secs: u64 = secs
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("CACHECORE_SOAK={secs:?} is not a number of seconds"));
            SeedPlan::Soak(Duration::from_secs(secs))
        } else {
            SeedPlan::Fixed((1..=CI_SEEDS).collect())
        };
        Self { plan, exclude }
    }

    fn allows(&self, what: &str) -> bool {
        !self.exclude.contains(what)
    }

    /// The bound on a whole store test: only reached when every worker is wedged (the per-seed
    /// bound reports everything else).
    fn total_bound(&self) -> Duration {
        let work = match &self.plan {
            SeedPlan::Fixed(seeds) => SEED_BOUND * seeds.len().min(6) as u32,
            SeedPlan::Soak(d) => *d + SEED_BOUND,
        };
        work + Duration::from_secs(60)
    }

    fn replay(&self, test: &str, seed: u64) -> String {
        let exclude = if self.exclude.is_empty() {
            String::new()
        } else {
            let list: Vec<&str> = self.exclude.iter().map(String::as_str).collect();
            format!("CACHECORE_EXCLUDE={} ", list.join(","))
        };
        format!(
            "{exclude}CACHECORE_SEED={seed} cargo test --all-features --test contract_model -- \
             {test} --exact --nocapture"
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The vocabulary programs are made of. Small pools, so that requests collide often: most
// requests differ from another one in exactly one part, which is what a key that forgets that
// part gets wrong.

/// `(scheme, authority)`. Client stacks send absolute URIs; server stacks a relative one and
/// the authority in `Host`. Loopback addresses only, never connected to.
const TARGETS: [(&str, &str); 4] = [
    ("http", "127.0.0.1:8001"),
    ("https", "127.0.0.1:8001"),
    ("http", "127.0.0.2:8001"),
    ("http", "127.0.0.1:8002"),
];
const AUTHORIZATIONS: [Option<&str>; 3] = [None, Some("Bearer sk-a"), Some("Bearer sk-b")];
const COOKIES: [Option<&str>; 3] = [None, Some("sid=1"), Some("sid=2")];
const API_KEYS: [Option<&str>; 3] = [None, Some("key-1"), Some("key-2")];
/// The rest of the credential headers of DESIGN section 3, one at a time.
const OTHER_CREDENTIALS: [Option<(&str, &str)>; 5] = [
    None,
    Some(("proxy-authorization", "Basic cHJveHk6cHc=")),
    Some(("api-key", "azure-1")),
    Some(("x-goog-api-key", "goog-1")),
    Some(("x-cachecore-token", "cc-token-1")),
];
const ENCODINGS: [Option<&str>; 4] = [None, Some("gzip"), Some("br"), Some("gzip, br")];
/// Values of `X-Tone`, a request header a response may name in `Vary`.
const TONES: [Option<&str>; 3] = [None, Some("warm"), Some("cold")];
const DEPS: [&str; 3] = ["doc:a", "doc:b", "table:t"];
const DEP_HASHES: [Option<&str>; 3] = [None, Some("v1"), Some("v2")];
const NEW_HASHES: [Option<&str>; 3] = [None, Some("etl-1"), Some("etl-2")];
const PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/chat/completions?v=2",
    "/v1/embeddings",
    "/v1/models",
];
/// Every dep an answer can carry: the declared ones and the policy dep.
const ALL_DEPS: [&str; 4] = [DEPS[0], DEPS[1], DEPS[2], POLICY_DEP];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    /// Absolute URIs, as a hyper/reqwest client sends them.
    Client,
    /// Relative URIs and a `Host` header, as a server receives them.
    Server,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodySpec {
    Empty,
    /// A chat request in one of three renderings (key order, white space) of the same JSON,
    /// with a `user` field the layer is told to ignore.
    Json {
        prompt: u8,
        user: u8,
        form: u8,
    },
    Raw {
        prompt: u8,
    },
}

impl BodySpec {
    fn render(self) -> String {
        match self {
            Self::Empty => String::new(),
            Self::Raw { prompt } => format!("prompt {prompt}"),
            Self::Json { prompt, user, form } => match form {
                0 => format!(
                    r#"{{"model":"m-1","messages":[{{"role":"user","content":"prompt {prompt}"}}],"temperature":0,"user":"u{user}"}}"#
                ),
                1 => format!(
                    r#"{{"user":"u{user}","temperature":0,"messages":[{{"content":"prompt {prompt}","role":"user"}}],"model":"m-1"}}"#
                ),
                _ => format!(
                    "{{\n  \"temperature\" : 0,\n  \"model\": \"m-1\",\n  \"messages\": [ {{ \"role\": \"user\", \"content\": \"prompt {prompt}\" }} ],\n  \"user\": \"u{user}\"\n}}"
                ),
            },
        }
    }

    /// What the key may depend on: the JSON value without the ignored field, or the bytes.
    fn keyed(self) -> (bool, u8) {
        match self {
            Self::Empty => (false, u8::MAX),
            Self::Raw { prompt } => (false, prompt),
            Self::Json { prompt, .. } => (true, prompt),
        }
    }
}

/// How the upstream answers; chosen per request, not part of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Plain,
    /// Two body chunks.
    Chunked,
    /// `Vary: X-Tone`.
    VaryTone,
    /// `Vary: Accept-Encoding`.
    VaryEncoding,
    /// `Vary: *`: never stored.
    VaryStar,
    TooMany,
    Failed,
    NoStore,
    SetCookie,
}

impl Answer {
    fn storable(self) -> bool {
        matches!(
            self,
            Self::Plain | Self::Chunked | Self::VaryTone | Self::VaryEncoding
        )
    }
}

#[derive(Clone, Debug)]
struct Req {
    target: usize,
    path: usize,
    authorization: usize,
    cookie: usize,
    api_key: usize,
    other_credential: usize,
    encoding: usize,
    tone: usize,
    /// `(dep, pinned hash)` indices, as declared (order and duplicates included).
    deps: Vec<(usize, usize)>,
    via_scope: bool,
    bypass: bool,
    refresh: bool,
    ttl_ms: Option<u64>,
    body: BodySpec,
    answer: Answer,
    delay_ms: u64,
}

impl Req {
    fn method(&self) -> Method {
        if self.body == BodySpec::Empty {
            Method::GET
        } else {
            Method::POST
        }
    }

    fn dep_key(&self) -> Vec<(&'static str, Option<&'static str>)> {
        let mut deps: Vec<_> = self
            .deps
            .iter()
            .map(|&(d, h)| (DEPS[d], DEP_HASHES[h]))
            .collect();
        deps.sort_unstable();
        deps.dedup();
        deps
    }

    fn dep_ids(&self) -> BTreeSet<&'static str> {
        self.deps.iter().map(|&(d, _)| DEPS[d]).collect()
    }

    fn context(&self) -> RequestContext {
        let mut ctx = RequestContext::with_deps(self.deps.iter().map(|&(d, h)| {
            let dep = Dep::new(DEPS[d]);
            match DEP_HASHES[h] {
                Some(hash) => dep.hash(hash),
                None => dep,
            }
        }));
        if self.bypass {
            ctx = ctx.bypass();
        }
        if self.refresh {
            ctx = ctx.refresh();
        }
        if let Some(ms) = self.ttl_ms {
            ctx = ctx.ttl(Duration::from_millis(ms));
        }
        ctx
    }

    fn uri(&self, style: Style) -> String {
        let (scheme, authority) = TARGETS[self.target];
        match style {
            Style::Client => format!("{scheme}://{authority}{}", PATHS[self.path]),
            Style::Server => PATHS[self.path].to_owned(),
        }
    }

    /// The header values the test sets (besides the request id), as sent.
    fn headers(&self, style: Style) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if style == Style::Server {
            out.push(("host", TARGETS[self.target].1));
        }
        match self.body {
            BodySpec::Json { .. } => out.push(("content-type", "application/json")),
            BodySpec::Raw { .. } => out.push(("content-type", "text/plain")),
            BodySpec::Empty => {}
        }
        let optional = [
            ("authorization", AUTHORIZATIONS[self.authorization]),
            ("cookie", COOKIES[self.cookie]),
            ("x-api-key", API_KEYS[self.api_key]),
            ("accept-encoding", ENCODINGS[self.encoding]),
            ("x-tone", TONES[self.tone]),
        ];
        out.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
        out.extend(OTHER_CREDENTIALS[self.other_credential]);
        out
    }

    fn build(&self, style: Style, id: u64) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(self.method())
            .uri(self.uri(style))
            .header("x-req-id", id);
        for (k, v) in self.headers(style) {
            b = b.header(k, v);
        }
        let mut req = b
            .body(Full::new(Bytes::from(self.body.render())))
            .expect("a valid request");
        if !self.via_scope {
            req.extensions_mut().insert(self.context());
        }
        req
    }

    /// The key parts (DESIGN section 3) in which `self` differs from `other`. `vary_tone`: the
    /// stored response named `X-Tone` in `Vary`.
    fn key_differences(&self, other: &Req, style: Style, vary_tone: bool) -> Vec<&'static str> {
        let mut out = Vec::new();
        let same_target = match style {
            Style::Client => TARGETS[self.target] == TARGETS[other.target],
            Style::Server => TARGETS[self.target].1 == TARGETS[other.target].1,
        };
        if !same_target {
            out.push("scheme/authority");
        }
        if self.method() != other.method() {
            out.push("method");
        }
        if PATHS[self.path] != PATHS[other.path] {
            out.push("path and query");
        }
        if AUTHORIZATIONS[self.authorization] != AUTHORIZATIONS[other.authorization] {
            out.push("authorization");
        }
        if COOKIES[self.cookie] != COOKIES[other.cookie] {
            out.push("cookie");
        }
        if API_KEYS[self.api_key] != API_KEYS[other.api_key] {
            out.push("x-api-key");
        }
        if OTHER_CREDENTIALS[self.other_credential] != OTHER_CREDENTIALS[other.other_credential] {
            out.push("another credential header");
        }
        if ENCODINGS[self.encoding] != ENCODINGS[other.encoding] {
            out.push("accept-encoding");
        }
        if vary_tone && TONES[self.tone] != TONES[other.tone] {
            out.push("x-tone (named in the stored response's Vary)");
        }
        if self.dep_key() != other.dep_key() {
            out.push("declared deps");
        }
        if self.body.keyed() != other.body.keyed() {
            out.push("body");
        }
        out
    }
}

impl fmt::Display for Req {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, authority) = TARGETS[self.target];
        write!(
            f,
            "{} {scheme}://{authority}{}",
            self.method(),
            PATHS[self.path]
        )?;
        let opt = |name: &str, v: Option<&str>| v.map(|v| format!(" {name}={v:?}"));
        for part in [
            opt("auth", AUTHORIZATIONS[self.authorization]),
            opt("cookie", COOKIES[self.cookie]),
            opt("x-api-key", API_KEYS[self.api_key]),
            OTHER_CREDENTIALS[self.other_credential].map(|(k, v)| format!(" {k}={v:?}")),
            opt("ae", ENCODINGS[self.encoding]),
            opt("tone", TONES[self.tone]),
        ]
        .into_iter()
        .flatten()
        {
            f.write_str(&part)?;
        }
        if !self.deps.is_empty() {
            let deps: Vec<String> = self
                .deps
                .iter()
                .map(|&(d, h)| match DEP_HASHES[h] {
                    Some(h) => format!("{}@{h}", DEPS[d]),
                    None => DEPS[d].to_owned(),
                })
                .collect();
            write!(f, " deps=[{}]", deps.join(","))?;
        }
        match self.body {
            BodySpec::Empty => {}
            BodySpec::Raw { prompt } => write!(f, " body=raw{prompt}")?,
            BodySpec::Json { prompt, user, form } => {
                write!(f, " body=json{prompt}/u{user}/form{form}")?
            }
        }
        for (on, name) in [
            (self.bypass, " BYPASS"),
            (self.refresh, " REFRESH"),
            (self.via_scope, " (scope)"),
        ] {
            if on {
                f.write_str(name)?;
            }
        }
        if let Some(ms) = self.ttl_ms {
            write!(f, " ttl={ms}ms")?;
        }
        if self.answer != Answer::Plain {
            write!(f, " answer={:?}", self.answer)?;
        }
        if self.delay_ms > 0 {
            write!(f, " delay={}ms", self.delay_ms)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Send(Req),
    /// The same request twice, awaited together (`tokio::join!`), then both bodies read.
    Pair(Req),
    /// The response head is read, the body dropped unread.
    Abandon(Req),
    Invalidate {
        deps: Vec<&'static str>,
        many: bool,
        new_hash: Option<&'static str>,
    },
    Sleep(u64),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Send(r) => write!(f, "send {r}"),
            Self::Pair(r) => write!(f, "pair {r}"),
            Self::Abandon(r) => write!(f, "abandon {r}"),
            Self::Invalidate {
                deps,
                many,
                new_hash,
            } => write!(
                f,
                "{} {} new_hash={new_hash:?}",
                if *many {
                    "invalidate_many"
                } else {
                    "invalidate"
                },
                deps.join(",")
            ),
            Self::Sleep(ms) => write!(f, "sleep {ms}ms"),
        }
    }
}

#[derive(Clone, Debug)]
struct Program {
    seed: u64,
    style: Style,
    /// Store calls that fail or stall, per thousand.
    faults_per_mille: u32,
    stale_window_ms: u64,
    /// How long a single-flight follower waits for a leader whose response head has arrived
    /// (its body is then only unread when the leader's caller is not reading it, as in a pair).
    coalesce_after_head_ms: u64,
    tasks: Vec<Vec<Op>>,
}

impl Program {
    fn generate(seed: u64, settings: &Settings) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let style = if rng.random_bool(0.5) {
            Style::Client
        } else {
            Style::Server
        };
        let faults_per_mille = if settings.allows("faults") {
            [0, 0, 30, 100][rng.random_range(0..4)]
        } else {
            0
        };
        let stale_window_ms = if settings.allows("stale") && rng.random_bool(0.3) {
            150
        } else {
            0
        };
        let coalesce_after_head_ms = [30, 150][rng.random_range(0..2)];
        let tasks = (0..TASKS)
            .map(|_| {
                (0..OPS_PER_TASK)
                    .map(|_| gen_op(&mut rng, settings))
                    .collect()
            })
            .collect();
        Self {
            seed,
            style,
            faults_per_mille,
            stale_window_ms,
            coalesce_after_head_ms,
            tasks,
        }
    }

    fn describe(&self, done: &[usize]) -> String {
        let mut out = format!(
            "  program of seed {}: {} stack, store faults {}/1000, stale window {}ms, \
             single-flight wait after head {}ms, {} tasks\n",
            self.seed,
            match self.style {
                Style::Client => "client (absolute URIs)",
                Style::Server => "server (relative URIs, the authority in Host)",
            },
            self.faults_per_mille,
            self.stale_window_ms,
            self.coalesce_after_head_ms,
            self.tasks.len()
        );
        for (t, ops) in self.tasks.iter().enumerate() {
            let at = done.get(t).copied().unwrap_or(0);
            let _ = writeln!(out, "  task t{t} ({at}/{} ops done):", ops.len());
            for (i, op) in ops.iter().enumerate() {
                let mark = if i == at { "  <-- here" } else { "" };
                let _ = writeln!(out, "    #{i:02} {op}{mark}");
            }
        }
        out
    }
}

fn chance(rng: &mut SmallRng, p: f64) -> bool {
    rng.random_bool(p)
}

fn pick(rng: &mut SmallRng, n: usize) -> usize {
    rng.random_range(0..n)
}

fn gen_op(rng: &mut SmallRng, settings: &Settings) -> Op {
    loop {
        let roll = rng.random_range(0..100);
        let op = match roll {
            0..=66 => Op::Send(gen_req(rng, settings)),
            67..=74 if settings.allows("pair") => Op::Pair(gen_req(rng, settings)),
            75..=78 if settings.allows("abandon") => Op::Abandon(gen_req(rng, settings)),
            79..=88 if settings.allows("invalidate") => {
                let many = chance(rng, 0.3);
                let mut deps = vec![if chance(rng, 0.05) {
                    POLICY_DEP
                } else {
                    DEPS[pick(rng, DEPS.len())]
                }];
                if many && chance(rng, 0.7) {
                    deps.push(DEPS[pick(rng, DEPS.len())]);
                }
                Op::Invalidate {
                    deps,
                    many,
                    new_hash: NEW_HASHES[pick(rng, NEW_HASHES.len())],
                }
            }
            89..=99 if settings.allows("sleep") => Op::Sleep(rng.random_range(10..=80)),
            _ => continue,
        };
        return op;
    }
}

/// A request from one of four families, with a few parts changed.
fn gen_req(rng: &mut SmallRng, settings: &Settings) -> Req {
    let family = pick(rng, 4);
    let (path, deps, body) = match family {
        0 => (
            0,
            vec![(0, 0)],
            BodySpec::Json {
                prompt: 0,
                user: 0,
                form: 0,
            },
        ),
        1 => (
            0,
            vec![(1, 0), (2, 0)],
            BodySpec::Json {
                prompt: 1,
                user: 0,
                form: 0,
            },
        ),
        2 => (
            2,
            vec![],
            BodySpec::Json {
                prompt: 2,
                user: 0,
                form: 0,
            },
        ),
        _ => (3, vec![(2, 0)], BodySpec::Empty),
    };
    let mut r = Req {
        target: 0,
        path,
        authorization: 0,
        cookie: 0,
        api_key: 0,
        other_credential: 0,
        encoding: 0,
        tone: 0,
        deps,
        via_scope: false,
        bypass: false,
        refresh: false,
        ttl_ms: None,
        body,
        answer: Answer::Plain,
        delay_ms: 0,
    };
    // Key parts left out with CACHECORE_EXCLUDE keep their family's value.
    let on = |what: &str| settings.allows(what);
    if chance(rng, 0.12) && on("authority") {
        r.target = pick(rng, TARGETS.len());
    }
    if chance(rng, 0.1) && r.path == 0 && on("path") {
        r.path = 1;
    }
    for (field, n) in [
        (&mut r.authorization, AUTHORIZATIONS.len()),
        (&mut r.cookie, COOKIES.len()),
        (&mut r.api_key, API_KEYS.len()),
        (&mut r.other_credential, OTHER_CREDENTIALS.len()),
    ] {
        let v = pick(rng, n);
        if chance(rng, 0.1) && on("credentials") {
            *field = v;
        }
    }
    let v = pick(rng, ENCODINGS.len());
    if chance(rng, 0.12) && on("encoding") {
        r.encoding = v;
    }
    let v = pick(rng, TONES.len());
    if chance(rng, 0.15) && on("tone") {
        r.tone = v;
    }
    if chance(rng, 0.08) && on("deps") {
        let d = pick(rng, DEPS.len());
        match r.deps.iter().position(|&(x, _)| x == d) {
            Some(i) => {
                r.deps.remove(i);
            }
            None => r.deps.push((d, 0)),
        }
    }
    if chance(rng, 0.1) && !r.deps.is_empty() && on("deps") {
        let i = pick(rng, r.deps.len());
        r.deps[i].1 = pick(rng, DEP_HASHES.len());
    }
    if chance(rng, 0.05) && !r.deps.is_empty() {
        // The same dep declared twice: the key must not change.
        let d = r.deps[0];
        r.deps.push(d);
    }
    if chance(rng, 0.1) {
        r.deps.reverse();
    }
    if let (BodySpec::Json { prompt, user, form }, true) = (&mut r.body, on("body")) {
        if chance(rng, 0.5) {
            *form = rng.random_range(0..3);
        }
        if chance(rng, 0.3) {
            *user = rng.random_range(0..3);
        }
        if chance(rng, 0.1) {
            *prompt = rng.random_range(0..3);
        }
        if chance(rng, 0.05) {
            r.body = BodySpec::Raw { prompt: *prompt };
        }
    }
    r.via_scope = settings.allows("scope") && chance(rng, 0.2);
    r.bypass = settings.allows("bypass") && chance(rng, 0.05);
    r.refresh = settings.allows("refresh") && chance(rng, 0.05);
    r.ttl_ms = match rng.random_range(0..100) {
        0..=9 if on("ttl") => Some(30),
        10..=17 if on("ttl") => Some(120),
        _ => None,
    };
    r.answer = match rng.random_range(0..100) {
        0..=69 => Answer::Plain,
        70..=77 => Answer::VaryTone,
        78..=81 => Answer::VaryEncoding,
        82..=85 => Answer::Chunked,
        86..=88 => Answer::VaryStar,
        89..=90 => Answer::TooMany,
        91..=92 => Answer::Failed,
        93..=96 => Answer::NoStore,
        _ => Answer::SetCookie,
    };
    r.delay_ms = match rng.random_range(0..100) {
        0..=49 => 0,
        50..=84 => rng.random_range(1..=5),
        _ => rng.random_range(20..=40),
    };
    r
}

// ---------------------------------------------------------------------------------------------
// The reference model

struct ReqRecord {
    req: Req,
    label: String,
    issued_at: Instant,
    /// Per dep, the highest invalidation that had returned ok when this request was issued
    /// (one made through the other store: that had returned ok [`REMOTE_BOUND`] before).
    required: [u64; ALL_DEPS.len()],
    /// Per dep, the highest invalidation that had returned ok, wherever it was made.
    returned: [u64; ALL_DEPS.len()],
}

struct CallRecord {
    req_id: u64,
    /// Per dep, how many invalidations had been issued when the upstream call started.
    issued_at_start: [u64; ALL_DEPS.len()],
    answer: Answer,
    status: StatusCode,
    body: Bytes,
    /// When the client that caused the call had read its whole body (the entry, if any, was
    /// written before then).
    body_done_at: Option<Instant>,
}

#[derive(Clone, Debug, Default)]
struct Stats {
    seeds: u64,
    requests: u64,
    hits: u64,
    stale_hits: u64,
    misses: u64,
    bypasses: u64,
    upstream_calls: u64,
    invalidations_ok: u64,
    invalidations_failed: u64,
    pairs: u64,
    faults: u64,
    /// Invalidations made through the other store (two stores on two connections).
    remote_invalidations: u64,
    /// Answers served within [`REMOTE_BOUND`] of a remote invalidation they predate: the push
    /// had not arrived yet.
    served_in_window: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.seeds += o.seeds;
        self.requests += o.requests;
        self.hits += o.hits;
        self.stale_hits += o.stale_hits;
        self.misses += o.misses;
        self.bypasses += o.bypasses;
        self.upstream_calls += o.upstream_calls;
        self.invalidations_ok += o.invalidations_ok;
        self.invalidations_failed += o.invalidations_failed;
        self.pairs += o.pairs;
        self.faults += o.faults;
        self.remote_invalidations += o.remote_invalidations;
        self.served_in_window += o.served_in_window;
    }
}

struct Model {
    style: Style,
    stale_window: Duration,
    /// Per dep (index into `ALL_DEPS`): invalidations issued, and the highest one returned ok.
    issued: [u64; ALL_DEPS.len()],
    confirmed: [u64; ALL_DEPS.len()],
    /// Per dep, invalidations made through the other store that returned ok, and when.
    remote_confirmed: [Vec<(u64, Instant)>; ALL_DEPS.len()],
    requests: HashMap<u64, ReqRecord>,
    calls: HashMap<u64, CallRecord>,
    next_req: u64,
    next_call: u64,
    violations: Vec<String>,
    events: VecDeque<String>,
    stats: Stats,
}

fn dep_index(id: &str) -> usize {
    ALL_DEPS
        .iter()
        .position(|d| *d == id)
        .expect("a dep of the vocabulary")
}

impl Model {
    fn new(program: &Program) -> Self {
        Self {
            style: program.style,
            stale_window: Duration::from_millis(program.stale_window_ms),
            issued: [0; ALL_DEPS.len()],
            confirmed: [0; ALL_DEPS.len()],
            remote_confirmed: Default::default(),
            requests: HashMap::new(),
            calls: HashMap::new(),
            next_req: 1,
            next_call: 1,
            violations: Vec::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    fn event(&mut self, e: String) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn violation(&mut self, v: String) -> String {
        self.event(format!("VIOLATION: {v}"));
        self.violations.push(v.clone());
        v
    }

    fn issue(&mut self, req: &Req, label: String) -> (u64, String) {
        let id = self.next_req;
        self.next_req += 1;
        let label = format!("{label} req#{id}");
        let now = Instant::now();
        let (mut required, mut returned) = (self.confirmed, self.confirmed);
        for (d, remote) in self.remote_confirmed.iter().enumerate() {
            for &(seq, at) in remote {
                returned[d] = returned[d].max(seq);
                if at + REMOTE_BOUND <= now {
                    required[d] = required[d].max(seq);
                }
            }
        }
        self.requests.insert(
            id,
            ReqRecord {
                req: req.clone(),
                label: label.clone(),
                issued_at: now,
                required,
                returned,
            },
        );
        self.stats.requests += 1;
        (id, label)
    }

    /// Checks one response against the model; `body` is `None` when it was dropped unread.
    fn check(
        &mut self,
        id: u64,
        head: &http::response::Parts,
        body: Option<&Bytes>,
    ) -> Result<(), String> {
        let now = Instant::now();
        let rec = self.requests.get(&id).expect("issued request");
        let (label, req, issued_at, required, returned) = (
            rec.label.clone(),
            rec.req.clone(),
            rec.issued_at,
            rec.required,
            rec.returned,
        );
        let x_cache = head
            .headers
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let Some(call_id) = head
            .headers
            .get("x-call")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return Err(self.violation(format!(
                "{label}: response {} {x_cache} does not come from the upstream (no x-call)",
                head.status
            )));
        };
        self.event(format!(
            "{label} -> {} {x_cache} call#{call_id}",
            head.status
        ));
        let Some(call) = self.calls.get(&call_id) else {
            return Err(self.violation(format!("{label}: answer of unknown call #{call_id}")));
        };
        let mut problems = Vec::new();
        if head.status != call.status {
            problems.push(format!(
                "status {} but call #{call_id} answered {}",
                head.status, call.status
            ));
        }
        if let Some(body) = body {
            if *body != call.body {
                problems.push(format!(
                    "body {:?} is not what call #{call_id} sent ({:?})",
                    String::from_utf8_lossy(body),
                    String::from_utf8_lossy(&call.body)
                ));
            }
        }
        let own = call.req_id == id;
        if own {
            let expected = if req.bypass { "BYPASS" } else { "MISS" };
            if x_cache != expected {
                problems.push(format!(
                    "its own upstream call #{call_id} came back as {x_cache:?}, not {expected}"
                ));
            }
        } else {
            let origin = &self.requests[&call.req_id];
            let label_o = &origin.label;
            if !x_cache.starts_with("HIT") {
                problems.push(format!(
                    "got call #{call_id} of {label_o} labelled {x_cache:?}: another request's \
                     answer must be a hit"
                ));
            }
            if req.bypass {
                problems.push(format!(
                    "a bypass request was served call #{call_id} of {label_o}"
                ));
            }
            if req.refresh {
                problems.push(format!(
                    "a refresh request was served call #{call_id} of {label_o} instead of going \
                     upstream"
                ));
            }
            if origin.req.bypass {
                problems.push(format!(
                    "served call #{call_id}, the answer to the bypass request {label_o}"
                ));
            }
            if !call.answer.storable() {
                problems.push(format!(
                    "served call #{call_id} of {label_o}, a {:?} answer that must never be stored",
                    call.answer
                ));
            }
            let diffs =
                req.key_differences(&origin.req, self.style, call.answer == Answer::VaryTone);
            if !diffs.is_empty() {
                problems.push(format!(
                    "served call #{call_id} of {label_o} [{}], which differs in key part(s) {diffs:?}",
                    origin.req
                ));
            }
            // Rule 4, for every dep the answer carries (the policy dep included).
            let mut window = false;
            let deps = origin
                .req
                .dep_ids()
                .into_iter()
                .chain([POLICY_DEP])
                .map(dep_index);
            for d in deps {
                if call.issued_at_start[d] < required[d] {
                    problems.push(format!(
                        "rule 4: served call #{call_id} of {label_o}, whose upstream call started \
                         when {} invalidation(s) of {} had been issued, to a request issued after \
                         invalidation #{} of it returned ok",
                        call.issued_at_start[d], ALL_DEPS[d], required[d]
                    ));
                } else if call.issued_at_start[d] < returned[d] {
                    window = true;
                }
            }
            self.stats.served_in_window += u64::from(window);
            if let Some(done) = call.body_done_at {
                let ttl = origin.req.ttl_ms.map_or(DEFAULT_TTL, Duration::from_millis);
                let life = ttl + self.stale_window + CLOCK_SLACK;
                if issued_at > done + life {
                    problems.push(format!(
                        "served call #{call_id} of {label_o} {:?} after its body was complete, \
                         past its TTL {ttl:?} + stale window {:?}",
                        issued_at - done,
                        self.stale_window
                    ));
                }
            }
        }
        match x_cache.as_str() {
            "HIT_L1" => self.stats.hits += 1,
            "HIT_L1_STALE" => self.stats.stale_hits += 1,
            "MISS" => self.stats.misses += 1,
            "BYPASS" => self.stats.bypasses += 1,
            _ => {}
        }
        if own && body.is_some() {
            if let Some(call) = self.calls.get_mut(&call_id) {
                call.body_done_at.get_or_insert(now);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(self.violation(format!(
                "{label} [{req}] -> {x_cache}: {}",
                problems.join("; ")
            )))
        }
    }
}

fn lock(m: &Mutex<Model>) -> MutexGuard<'_, Model> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The upstream: identifies each call, records it in the model, answers as the request asks.

/// A response body of fixed chunks.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.iter().map(|c| c.len() as u64).sum())
    }
}

type UpReq = Request<RequestBody<Full<Bytes>>>;
type Inner = tower::util::BoxCloneSyncService<UpReq, Response<Chunks>, Infallible>;
type Stack = cachecore::Cachecore<Inner>;

async fn upstream(model: Arc<Mutex<Model>>, req: UpReq) -> Result<Response<Chunks>, Infallible> {
    let id: Option<u64> = req
        .headers()
        .get("x-req-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    // The call starts now: take the invalidation counts before anything else.
    let (call_id, spec, style, issued_at_start) = {
        let mut m = lock(&model);
        let call_id = m.next_call;
        m.next_call += 1;
        m.stats.upstream_calls += 1;
        let spec = id.and_then(|id| m.requests.get(&id)).map(|r| r.req.clone());
        let issued = m.issued;
        let answer = spec.as_ref().map_or(Answer::Failed, |s| s.answer);
        m.calls.insert(
            call_id,
            CallRecord {
                req_id: id.unwrap_or(0),
                issued_at_start: issued,
                answer,
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: Bytes::new(),
                body_done_at: None,
            },
        );
        (call_id, spec, m.style, issued)
    };
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes());
    let mut problems = Vec::new();
    let Some(spec) = spec else {
        lock(&model).violation(format!(
            "upstream call #{call_id} for a request the test did not send (x-req-id {id:?})"
        ));
        let mut res = Response::new(Chunks(VecDeque::new()));
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(res);
    };
    // The layer must hand the request on as it was sent.
    if parts.method != spec.method() {
        problems.push(format!("method {}", parts.method));
    }
    if parts.uri.to_string() != spec.uri(style) {
        problems.push(format!("uri {}", parts.uri));
    }
    for (name, value) in spec.headers(style) {
        let got: Vec<&[u8]> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if got != [value.as_bytes()] {
            problems.push(format!("header {name}: {got:?}"));
        }
    }
    match &body {
        Ok(b) if *b == spec.body.render().as_bytes() => {}
        Ok(b) => problems.push(format!("body {:?}", String::from_utf8_lossy(b))),
        Err(_) => problems.push("body unreadable".to_owned()),
    }
    if spec.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(spec.delay_ms)).await;
    }

    let status = match spec.answer {
        Answer::TooMany => StatusCode::TOO_MANY_REQUESTS,
        Answer::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::OK,
    };
    // What upstream saw, for whoever reads a failure; the checks use the model's records.
    let seen = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let credentials: serde_json::Map<String, serde_json::Value> =
        ["authorization", "cookie", "x-api-key"]
            .into_iter()
            .chain(OTHER_CREDENTIALS.iter().flatten().map(|(k, _)| *k))
            .filter(|k| parts.headers.contains_key(*k))
            .map(|k| (k.to_owned(), serde_json::Value::from(seen(k))))
            .collect();
    let text = serde_json::json!({
        "call": call_id,
        "req": id.unwrap_or(0),
        "uri": parts.uri.to_string(),
        "host": seen("host"),
        "credentials": credentials,
        "accept-encoding": seen("accept-encoding"),
        "x-tone": seen("x-tone"),
        "body": body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default(),
        "invalidations_issued_at_start": ALL_DEPS
            .iter()
            .zip(issued_at_start)
            .map(|(d, n)| ((*d).to_owned(), serde_json::Value::from(n)))
            .collect::<serde_json::Map<_, _>>(),
        "answer": format!("{:?}", spec.answer),
    })
    .to_string();
    let body = Bytes::from(text);
    let chunks: VecDeque<Bytes> = if spec.answer == Answer::Chunked {
        let mid = body.len() / 2;
        [body.slice(..mid), body.slice(mid..)].into()
    } else {
        [body.clone()].into()
    };
    let mut res = Response::new(Chunks(chunks));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert("content-type", "application/json".parse().unwrap());
    h.insert("x-call", call_id.into());
    match spec.answer {
        Answer::VaryTone => {
            h.insert("vary", "X-Tone".parse().unwrap());
        }
        Answer::VaryEncoding => {
            h.insert("vary", "Accept-Encoding".parse().unwrap());
        }
        Answer::VaryStar => {
            h.insert("vary", "*".parse().unwrap());
        }
        Answer::NoStore => {
            h.insert("cache-control", "no-store".parse().unwrap());
        }
        Answer::SetCookie => {
            h.insert("set-cookie", "session=abc; Path=/".parse().unwrap());
        }
        _ => {}
    }
    let mut m = lock(&model);
    if let Some(call) = m.calls.get_mut(&call_id) {
        call.status = status;
        call.body = body;
    }
    if !problems.is_empty() {
        let label = id
            .and_then(|id| m.requests.get(&id))
            .map(|r| r.label.clone())
            .unwrap_or_default();
        m.violation(format!(
            "upstream call #{call_id} for {label} [{spec}] received an altered request: {}",
            problems.join("; ")
        ));
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------------
// A store wrapper that fails or stalls some calls, and keeps runs apart on shared servers by
// prefixing the tenant.

#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// An error before the call reaches the store.
    FailBefore,
    /// The store did the work, the answer was lost.
    FailAfter,
    Delay(u64),
    /// Longer than the layer's store timeout.
    Stall,
}

struct Faulty {
    inner: Arc<dyn CacheStore>,
    tenant_prefix: String,
    per_mille: u32,
    rng: Mutex<SmallRng>,
    injected: Arc<AtomicU64>,
}

fn injected() -> StoreError {
    StoreError::new(StoreErrorKind::Backend, "injected fault")
}

impl Faulty {
    fn pick(&self, can_stall: bool) -> Fault {
        if self.per_mille == 0 {
            return Fault::None;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        if rng.random_range(0..1000) >= self.per_mille {
            return Fault::None;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        match rng.random_range(0..10) {
            0..=3 => Fault::FailBefore,
            4..=5 => Fault::FailAfter,
            6..=8 => Fault::Delay(rng.random_range(1..=15)),
            _ if can_stall => Fault::Stall,
            _ => Fault::Delay(20),
        }
    }

    fn tenant(&self, tenant: &str) -> String {
        format!("{}{tenant}", self.tenant_prefix)
    }

    async fn before(fault: Fault) -> Result<(), StoreError> {
        match fault {
            Fault::FailBefore => Err(injected()),
            Fault::Delay(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
            Fault::Stall => {
                tokio::time::sleep(STORE_TIMEOUT * 2).await;
                Ok(())
            }
            Fault::None | Fault::FailAfter => Ok(()),
        }
    }

    fn after<T>(fault: Fault, out: Result<T, StoreError>) -> Result<T, StoreError> {
        match fault {
            Fault::FailAfter => out.and(Err(injected())),
            _ => out,
        }
    }
}

impl CacheStore for Faulty {
    fn lookup<'a>(&'a self, key: &'a CacheKey, deps: &'a [&'a str]) -> StoreFuture<'a, Lookup> {
        let fault = self.pick(true);
        let key = CacheKey::new(self.tenant(key.tenant()), *key.digest());
        Box::pin(async move {
            Self::before(fault).await?;
            Self::after(fault, self.inner.lookup(&key, deps).await)
        })
    }

    // Stores that answer at once (the memory store, a near hit) are answered here, so the
    // layer's synchronous hit path runs under the same faults. A delay is no answer at once:
    // `lookup` then runs, with a fault of its own.
    fn lookup_now(&self, key: &CacheKey, deps: &[&str]) -> Option<Result<Lookup, StoreError>> {
        let fault = match self.pick(true) {
            Fault::Delay(_) | Fault::Stall => return None,
            Fault::FailBefore => return Some(Err(injected())),
            fault => fault,
        };
        let key = CacheKey::new(self.tenant(key.tenant()), *key.digest());
        let out = self.inner.lookup_now(&key, deps)?;
        Some(Self::after(fault, out))
    }

    fn put<'a>(&'a self, key: &'a CacheKey, entry: Entry) -> StoreFuture<'a, PutOutcome> {
        let fault = self.pick(true);
        let key = CacheKey::new(self.tenant(key.tenant()), *key.digest());
        Box::pin(async move {
            Self::before(fault).await?;
            Self::after(fault, self.inner.put(&key, entry).await)
        })
    }

    fn invalidate<'a>(
        &'a self,
        tenant: &'a str,
        dep_id: &'a str,
        new_hash: &'a str,
    ) -> StoreFuture<'a, DepInvalidated> {
        // The layer does not bound invalidations (a caller told "ok" must be able to rely on
        // it), so they are failed or delayed, never stalled.
        let fault = self.pick(false);
        let tenant = self.tenant(tenant);
        Box::pin(async move {
            Self::before(fault).await?;
            Self::after(
                fault,
                self.inner.invalidate(&tenant, dep_id, new_hash).await,
            )
        })
    }

    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        new_hash: &'a str,
    ) -> cachecore::store::InvalidateManyFuture<'a> {
        let fault = self.pick(false);
        let tenant = self.tenant(tenant);
        Box::pin(async move {
            if Self::before(fault).await.is_err() {
                return dep_ids.iter().map(|_| Err(injected())).collect();
            }
            let results = self.inner.invalidate_many(&tenant, dep_ids, new_hash).await;
            results.into_iter().map(|r| Self::after(fault, r)).collect()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Running a program

#[derive(Clone)]
enum StoreKind {
    Memory,
    #[cfg(feature = "redis")]
    Redis {
        name: &'static str,
        store: Arc<dyn CacheStore>,
        /// Another store on the same Redis, on connections of its own, through which every
        /// other invalidation is made (two processes).
        remote: Option<Arc<dyn CacheStore>>,
    },
}

impl StoreKind {
    fn name(&self) -> &'static str {
        match self {
            Self::Memory => "MemoryStore",
            #[cfg(feature = "redis")]
            Self::Redis { name, .. } => name,
        }
    }

    /// The store for one seed, the tenant prefix that keeps it apart, and the other store.
    fn for_seed(&self, seed: u64) -> (Arc<dyn CacheStore>, String, Option<Arc<dyn CacheStore>>) {
        match self {
            Self::Memory => (Arc::new(MemoryStore::new()), String::new(), None),
            #[cfg(feature = "redis")]
            Self::Redis { store, remote, .. } => (
                Arc::clone(store),
                format!("{}-s{seed}-", support::unique("contract")),
                remote.clone(),
            ),
        }
    }
}

#[derive(Clone)]
struct Env {
    svc: Stack,
    layer: CachecoreLayer,
    /// A layer on the other store, for the invalidations made through it.
    remote: Option<CachecoreLayer>,
    model: Arc<Mutex<Model>>,
    wd: Watchdog,
    style: Style,
    progress: Arc<Vec<AtomicUsize>>,
}

impl Env {
    fn issue(&self, req: &Req, label: String) -> (u64, String) {
        lock(&self.model).issue(req, label)
    }

    fn check(
        &self,
        id: u64,
        head: &http::response::Parts,
        body: Option<&Bytes>,
    ) -> Result<(), String> {
        lock(&self.model).check(id, head, body)
    }

    fn failed(&self) -> bool {
        !lock(&self.model).violations.is_empty()
    }

    async fn call(&self, req: Request<Full<Bytes>>) -> Response<cachecore::ResponseBody<Chunks>> {
        match self.svc.clone().oneshot(req).await {
            Ok(res) => res,
            Err(e) => match e {},
        }
    }
}

async fn read(res: Response<cachecore::ResponseBody<Chunks>>) -> (http::response::Parts, Bytes) {
    let (parts, body) = res.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => match e {},
    };
    (parts, body)
}

async fn run_task(env: Env, task: usize, ops: Vec<Op>) -> Result<(), String> {
    for (i, op) in ops.into_iter().enumerate() {
        env.progress[task].store(i, Ordering::Relaxed);
        if env.failed() {
            return Ok(());
        }
        let label = format!("t{task} op#{i:02}");
        match op {
            Op::Send(req) => {
                let (id, label) = env.issue(&req, format!("{label} send"));
                let _tracked = env.wd.track(format!("{label} [{req}]"));
                let request = req.build(env.style, id);
                let res = if req.via_scope {
                    cachecore::scope(req.context(), env.call(request)).await
                } else {
                    env.call(request).await
                };
                let (head, body) = read(res).await;
                env.check(id, &head, Some(&body))?;
            }
            Op::Abandon(req) => {
                let (id, label) = env.issue(&req, format!("{label} abandon"));
                let _tracked = env.wd.track(format!("{label} [{req}]"));
                let request = req.build(env.style, id);
                let res = if req.via_scope {
                    cachecore::scope(req.context(), env.call(request)).await
                } else {
                    env.call(request).await
                };
                let (head, body) = res.into_parts();
                drop(body);
                env.check(id, &head, None)?;
            }
            Op::Pair(req) => {
                lock(&env.model).stats.pairs += 1;
                let (a, label_a) = env.issue(&req, format!("{label} pair-a"));
                let (b, label_b) = env.issue(&req, format!("{label} pair-b"));
                let _ta = env.wd.track(format!("{label_a} [{req}]"));
                let _tb = env.wd.track(format!("{label_b} [{req}]"));
                let both = async {
                    tokio::join!(
                        env.call(req.build(env.style, a)),
                        env.call(req.build(env.style, b))
                    )
                };
                let (ra, rb) = if req.via_scope {
                    cachecore::scope(req.context(), both).await
                } else {
                    both.await
                };
                let (head_a, body_a) = read(ra).await;
                let (head_b, body_b) = read(rb).await;
                env.check(a, &head_a, Some(&body_a))?;
                env.check(b, &head_b, Some(&body_b))?;
            }
            Op::Invalidate {
                deps,
                many,
                new_hash,
            } => {
                let seqs: Vec<u64> = {
                    let mut m = lock(&env.model);
                    deps.iter()
                        .map(|d| {
                            let i = dep_index(d);
                            m.issued[i] += 1;
                            m.issued[i]
                        })
                        .collect()
                };
                let _tracked = env
                    .wd
                    .track(format!("{label} invalidate {}", deps.join(",")));
                // With two stores, every other invalidation goes through the other one.
                let remote = env.remote.is_some() && (task + i).is_multiple_of(2);
                let layer = match &env.remote {
                    Some(other) if remote => other,
                    _ => &env.layer,
                };
                let ids = if many { &deps[..] } else { &deps[..1] };
                let mut invalidation = Invalidation::of(ids.iter().copied());
                if let Some(h) = new_hash {
                    invalidation = invalidation.new_hash(h);
                }
                let results = layer
                    .invalidator()
                    .invalidate(invalidation)
                    .await
                    .map_or_else(InvalidationError::into_results, Invalidated::into_results);
                let mut m = lock(&env.model);
                if results.len() != deps.len() {
                    return Err(m.violation(format!(
                        "{label}: {} results for {} deps: {results:?}",
                        results.len(),
                        deps.len()
                    )));
                }
                for ((dep, seq), r) in deps.iter().zip(seqs).zip(&results) {
                    let (dep_id, ok) = match r {
                        Ok(d) => (d.dep_id.as_str(), true),
                        Err(e) => (e.dep_id(), false),
                    };
                    if dep_id != *dep {
                        return Err(m.violation(format!(
                            "{label}: result for {dep_id:?} in the place of {dep:?}"
                        )));
                    }
                    let i = dep_index(dep);
                    if ok && remote {
                        m.stats.invalidations_ok += 1;
                        m.stats.remote_invalidations += 1;
                        m.remote_confirmed[i].push((seq, Instant::now()));
                    } else if ok {
                        m.stats.invalidations_ok += 1;
                        m.confirmed[i] = m.confirmed[i].max(seq);
                    } else {
                        m.stats.invalidations_failed += 1;
                    }
                    m.event(format!("{label} invalidate {dep} #{seq} -> {r:?}"));
                }
            }
            Op::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
    env.progress[task].store(usize::MAX, Ordering::Relaxed);
    Ok(())
}

fn events_of(model: &Model) -> String {
    let mut out = String::from("  last events:\n");
    for e in &model.events {
        let _ = writeln!(out, "    {e}");
    }
    out
}

fn done_counts(progress: &[AtomicUsize], program: &Program) -> Vec<usize> {
    progress
        .iter()
        .zip(&program.tasks)
        .map(|(p, ops)| p.load(Ordering::Relaxed).min(ops.len()))
        .collect()
}

async fn run_seed(
    test: &str,
    kind: &StoreKind,
    seed: u64,
    settings: &Settings,
    wd: &Watchdog,
) -> Result<Stats, String> {
    let program = Program::generate(seed, settings);
    let (store, tenant_prefix, remote) = kind.for_seed(seed);
    let remote = remote.map(|store| {
        let faultless = Faulty {
            inner: store,
            tenant_prefix: tenant_prefix.clone(),
            per_mille: 0,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            injected: Arc::new(AtomicU64::new(0)),
        };
        CachecoreLayer::builder()
            .shared_store(Arc::new(faultless))
            .build()
    });
    let faults = Arc::new(AtomicU64::new(0));
    let faulty = Faulty {
        inner: store,
        tenant_prefix,
        per_mille: program.faults_per_mille,
        rng: Mutex::new(SmallRng::seed_from_u64(seed ^ 0x5eed)),
        injected: Arc::clone(&faults),
    };
    let layer = CachecoreLayer::builder()
        .shared_store(Arc::new(faulty))
        .default_ttl(DEFAULT_TTL)
        .stale_window(Duration::from_millis(program.stale_window_ms))
        .ignore_json_field("user")
        .store_timeout(STORE_TIMEOUT)
        .circuit_breaker(3, Duration::from_millis(25))
        .coalesce_wait(
            COALESCE_TOTAL,
            Duration::from_millis(program.coalesce_after_head_ms),
        )
        .build();
    let model = Arc::new(Mutex::new(Model::new(&program)));
    let inner: Inner = tower::util::BoxCloneSyncService::new(tower::service_fn({
        let model = Arc::clone(&model);
        move |req: UpReq| upstream(Arc::clone(&model), req)
    }));
    let svc = tower::Layer::layer(&layer, inner);
    let progress: Arc<Vec<AtomicUsize>> = Arc::new(
        (0..program.tasks.len())
            .map(|_| AtomicUsize::new(0))
            .collect(),
    );
    let env = Env {
        svc,
        layer: layer.clone(),
        remote,
        model: Arc::clone(&model),
        wd: wd.clone(),
        style: program.style,
        progress: Arc::clone(&progress),
    };
    let replay = settings.replay(test, seed);
    wd.note("seed", format!("{seed} on {}", kind.name()));
    wd.note("replay", replay.clone());
    {
        let (model, progress, program) =
            (Arc::clone(&model), Arc::clone(&progress), program.clone());
        wd.on_report(move || {
            let mut out = program.describe(&done_counts(&progress, &program));
            // The report may run while a task holds the model: never wait for it.
            match model.try_lock() {
                Ok(m) => out.push_str(&events_of(&m)),
                Err(_) => out.push_str("  (model locked: events not shown)\n"),
            }
            out
        });
    }
    let tasks = program
        .tasks
        .iter()
        .cloned()
        .enumerate()
        .map(|(t, ops)| (format!("t{t}"), run_task(env.clone(), t, ops)));
    let outcome = wd
        .join_named(&format!("seed {seed}"), SEED_BOUND, tasks)
        .await;
    let fail = |what: String| {
        let m = lock(&model);
        format!(
            "contract_model [{}] seed {seed} FAILED: {what}\n  replay: {replay}\n{}{}",
            kind.name(),
            program.describe(&done_counts(&progress, &program)),
            events_of(&m)
        )
    };
    let results = match outcome {
        Ok(results) => results,
        // The report already holds the program and the events.
        Err(stuck) => {
            return Err(format!(
                "contract_model [{}] seed {seed} FAILED: requests never completed\n{stuck}",
                kind.name()
            ))
        }
    };
    if let Some(Err(first)) = results.into_iter().find(Result::is_err) {
        return Err(fail(first));
    }
    let mut m = lock(&model);
    if let Some(v) = m.violations.first().cloned() {
        drop(m);
        return Err(fail(v));
    }
    m.stats.seeds = 1;
    m.stats.faults = faults.load(Ordering::Relaxed);
    Ok(m.stats.clone())
}

fn contract(test: &'static str, kind: impl FnOnce() -> StoreKindFuture + Send + 'static) {
    let settings = Settings::from_env();
    let bound = settings.total_bound();
    watchdog::run(test, WORKERS, bound, move |wd| async move {
        let kind = kind().await;
        let started = Instant::now();
        let mut totals = Stats::default();
        let mut next_soak_seed = u64::from(std::process::id()) << 32
            | u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos()),
            );
        let mut seeds_run = Vec::new();
        loop {
            let seed = match &settings.plan {
                SeedPlan::Fixed(seeds) => match seeds.get(seeds_run.len()) {
                    Some(s) => *s,
                    None => break,
                },
                SeedPlan::Soak(d) if started.elapsed() < *d => {
                    next_soak_seed = next_soak_seed.wrapping_add(1);
                    next_soak_seed
                }
                SeedPlan::Soak(_) => break,
            };
            seeds_run.push(seed);
            match run_seed(test, &kind, seed, &settings, &wd).await {
                Ok(stats) => totals.add(&stats),
                Err(report) => panic!("{report}"),
            }
        }
        println!(
            "contract_model [{}]: {} seeds in {:?}: {totals:?}",
            kind.name(),
            seeds_run.len(),
            started.elapsed()
        );
        assert!(
            totals.hits > 0,
            "no request was ever served from the cache: the run checked nothing ({totals:?})"
        );
    });
}

type StoreKindFuture = Pin<Box<dyn std::future::Future<Output = StoreKind> + Send>>;

#[test]
fn contract_memory_store() {
    contract("contract_memory_store", || {
        Box::pin(async { StoreKind::Memory })
    });
}

#[cfg(feature = "redis")]
#[test]
fn contract_redis_single() {
    contract("contract_redis_single", || {
        Box::pin(async {
            let url = support::shared_redis().url();
            let store = cachecore::RedisStore::builder()
                .url(url)
                .timeout(Duration::from_secs(2))
                .build()
                .await
                .expect("connect to the test redis");
            StoreKind::Redis {
                name: "RedisStore",
                store: Arc::new(store),
                remote: None,
            }
        })
    });
}

#[cfg(feature = "redis")]
#[test]
fn contract_redis_cluster() {
    contract("contract_redis_cluster", || {
        Box::pin(async {
            let urls = support::shared_cluster().urls();
            let store = cachecore::RedisStore::builder()
                .cluster(urls)
                .timeout(Duration::from_secs(2))
                .build()
                .await
                .expect("connect to the test cluster");
            StoreKind::Redis {
                name: "RedisStore (cluster)",
                store: Arc::new(store),
                remote: None,
            }
        })
    });
}

#[cfg(feature = "redis")]
async fn near_store() -> Arc<dyn CacheStore> {
    let store = cachecore::RedisStore::builder()
        .url(support::shared_redis().url())
        .timeout(Duration::from_secs(2))
        .near_cache(16 * 1024 * 1024)
        .build()
        .await
        .expect("connect to the test redis");
    Arc::new(store)
}

#[cfg(feature = "redis")]
#[test]
fn contract_redis_near_cache() {
    contract("contract_redis_near_cache", || {
        Box::pin(async {
            StoreKind::Redis {
                name: "RedisStore with near cache",
                store: near_store().await,
                remote: None,
            }
        })
    });
}

/// Two processes: the layer reads through a near cache, half the invalidations are made through
/// another store on connections of its own; rule 4 holds within [`REMOTE_BOUND`] for those.
#[cfg(feature = "redis")]
#[test]
fn contract_redis_near_cache_two_stores_bounded_staleness() {
    contract(
        "contract_redis_near_cache_two_stores_bounded_staleness",
        || {
            Box::pin(async {
                let other = cachecore::RedisStore::builder()
                    .url(support::shared_redis().url())
                    .timeout(Duration::from_secs(2))
                    .build()
                    .await
                    .expect("connect to the test redis");
                StoreKind::Redis {
                    name: "RedisStore with near cache, and another store",
                    store: near_store().await,
                    remote: Some(Arc::new(other)),
                }
            })
        },
    );
}

// ---------------------------------------------------------------------------------------------
// The MemoryStore put/invalidate race, on plain threads through the `CacheStore` trait.

fn stress_entry(deps: cachecore::DepEpochs) -> Entry {
    Entry {
        status: StatusCode::OK,
        headers: http::HeaderMap::new(),
        body: Bytes::from_static(b"answer"),
        stored_at_ms: cachecore::testing::now_ms(),
        fresh_ttl: Duration::from_secs(60),
        stale_window: Duration::ZERO,
        deps,
    }
}

fn blocking_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// How long the race runs, and the window in which every thread must finish a step. A lookup
/// or put takes microseconds, but one invalidation sweeps every key tagged since the last and
/// was seen taking 1.2 s on a busy 2-core machine; a deadlock stops a thread for good, so a wide
/// window costs only detection time.
const STRESS_RUN: Duration = Duration::from_secs(6);
const STRESS_WINDOW: Duration = Duration::from_secs(3);
/// Keys each put thread cycles through. Bounded, so the tag set an invalidation sweeps stays
/// bounded too: with fresh keys forever the sweep of one invalidation grows with the put rate
/// and a slow step would look like a stuck one.
const STRESS_KEYS: u32 = 2048;

#[test]
fn memory_store_put_racing_invalidate_keeps_progressing() {
    let store = MemoryStore::new();
    let mut workers = Vec::new();
    for t in 0..2u32 {
        let store = store.clone();
        let rt = blocking_runtime();
        let mut n = 0u32;
        workers.push(Worker::new(format!("lookup+put #{t}"), move || {
            n = (n + 1) % STRESS_KEYS;
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&t.to_be_bytes());
            digest[4..8].copy_from_slice(&n.to_be_bytes());
            let key = CacheKey::new("t", digest);
            rt.block_on(async {
                // A key is fresh again once an invalidation swept it; until then it is a hit.
                if let Lookup::Miss(epochs) = store
                    .lookup(&key, &["doc", POLICY_DEP])
                    .await
                    .expect("a memory lookup does not fail")
                {
                    store
                        .put(&key, stress_entry(epochs))
                        .await
                        .expect("a memory put does not fail");
                }
            });
        }));
    }
    {
        let store = store.clone();
        let rt = blocking_runtime();
        workers.push(Worker::new("invalidate doc", move || {
            rt.block_on(store.invalidate("t", "doc", "h"))
                .expect("a memory invalidation does not fail");
        }));
    }
    let stats = watchdog::threads_keep_progressing(
        "MemoryStore put/invalidate race",
        STRESS_RUN,
        STRESS_WINDOW,
        workers,
    );
    for w in stats {
        println!(
            "{}: {} steps, longest {:?}",
            w.name, w.steps, w.longest_step
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The watchdog itself: a hang must turn into a report that names what hung.

type BoxedUnit = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast::<&str>()
            .map_or_else(|_| "(not a string)".to_owned(), |s| (*s).to_owned()),
    }
}

#[test]
fn watchdog_names_the_tasks_still_running() {
    watchdog::run("self-test", 2, Duration::from_secs(10), |wd| async move {
        let tasks: Vec<(String, BoxedUnit)> = vec![
            ("quick".to_owned(), Box::pin(async {})),
            ("never".to_owned(), Box::pin(std::future::pending())),
        ];
        let stuck = wd
            .join_named("two tasks", Duration::from_millis(200), tasks)
            .await
            .expect_err("one task never ends");
        assert!(stuck.report.contains("task never"), "{stuck}");
        assert!(!stuck.report.contains("task quick"), "{stuck}");
    });
}

#[test]
fn watchdog_fails_a_run_whose_every_worker_is_blocked() {
    let outcome = std::panic::catch_unwind(|| {
        watchdog::run(
            "self-test",
            1,
            Duration::from_millis(200),
            |wd| async move {
                let _tracked = wd.track("a step that blocks its thread");
                // Blocks the only worker: no Tokio timer can fire until it returns.
                std::thread::sleep(Duration::from_millis(1500));
            },
        )
    });
    let text = panic_text(outcome.expect_err("the run overran its bound"));
    assert!(text.contains("a step that blocks its thread"), "{text}");
}

#[test]
fn watchdog_names_a_stuck_thread() {
    let outcome = std::panic::catch_unwind(|| {
        watchdog::threads_keep_progressing(
            "self-test",
            Duration::from_secs(2),
            Duration::from_millis(200),
            vec![
                Worker::new("busy", || std::hint::black_box(())),
                Worker::new("sleeper", || std::thread::sleep(Duration::from_secs(1))),
            ],
        )
    });
    let text = panic_text(outcome.expect_err("the sleeper stalls a window"));
    assert!(text.contains("sleeper") && text.contains("STUCK"), "{text}");
}
