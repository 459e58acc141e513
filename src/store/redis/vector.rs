//! The L2 vector index on the Redis Query Engine (RediSearch), docs/design.md §5a.
//!
//! ```text
//! cc:{<tenant>}:l2:<key hex>   hash beside the L1 entry of the same digest, with its expiry:
//!                              v  the question's vector (FLOAT32, little endian)
//!                              q  the question (the lexical guards read it)
//!                              t  the tenant as between the braces (TAG)
//!                              s  the hex of the context signature (TAG)
//!                              d  the vector's dimension (the index of that dimension takes it)
//! ```
//!
//! On a single Redis, one index per dimension, `cachecore:l2:v1:<dims>`, `ON HASH PREFIX 1 cc:{`
//! with `FILTER @d==<dims>`: the only hashes the store writes are these, and a vector of another
//! length never reaches an index that could not hold it. On a cluster the search module keeps
//! an index in the hash slot of its name and indexes the keys of its own node only, so one name
//! cannot cover every primary: each tenant has its own index,
//! `cachecore:l2:v1:<dims>:{<tenant>}` over `cc:{<tenant>}:l2:`, created on the tenant's first
//! vector on the master of the tenant's slot, where the search goes too.

use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{Cmd, FromRedisValue, Script, Value};

use super::keys::{self, tenant_tag, TenantKeys};
use super::{Conn, RedisStore};
use crate::key::to_hex;
use crate::store::{StoreError, StoreErrorKind};

/// Writes the hash of an L2 vector only while its L1 entry exists, with that entry's remaining
/// lifetime: the two expire together, and an entry reclaimed before this runs leaves no vector.
///
/// `KEYS[1]` the l2 hash, `KEYS[2]` its L1 entry. `ARGV[1]` vector, `ARGV[2]` question,
/// `ARGV[3]` tenant tag, `ARGV[4]` signature hex, `ARGV[5]` dimension. Returns 1 when written.
const WRITE: &str = r"
local ttl = redis.call('PTTL', KEYS[2])
if ttl <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'q', ARGV[2], 't', ARGV[3], 's', ARGV[4], 'd', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
";

/// One neighbour found by a search: the digest its key names, its cosine similarity, and its
/// question when the reply carried it.
pub(crate) struct Neighbour {
    pub(crate) digest: [u8; 32],
    pub(crate) similarity: f32,
    pub(crate) question: Option<String>,
}

/// The index of `dims`-long vectors.
pub(crate) fn index_name(dims: usize) -> String {
    format!("cachecore:l2:v1:{dims}")
}

/// `value` as a TAG query term: every character that is not a letter, a digit or `_` is
/// escaped. Unescaped, punctuation in a tag (`gpt-4o`, `acme.eu`) is read as query syntax: the
/// query fails or silently matches nothing.
pub(crate) fn escape_tag(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 2);
    for c in value.chars() {
        if !(c.is_ascii_alphanumeric() || c == '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The vector as the index stores it: FLOAT32, little endian.
fn blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn unsupported(detail: &str) -> StoreError {
    StoreError::new(
        StoreErrorKind::Unsupported,
        format!(
            "this Redis has no search module (Redis Query Engine / RediSearch), which the L2 \
             index on RedisStore needs: {detail}. Use Redis Stack or Redis 8 \
             (scripts/fetch-redis-stack fetches Redis Stack), or keep L2's in-process MemoryIndex"
        ),
    )
}

/// Whether a server error says the command does not exist.
fn is_unknown_command(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("unknown command")
}

impl RedisStore {
    /// Checks that every server has the search module and, on a single Redis, creates the
    /// index of `dims`-long vectors if it is missing. Fails with
    /// [`StoreErrorKind::Unsupported`] when a server has no search module.
    pub(crate) async fn l2_check(&self, dims: usize) -> Result<(), StoreError> {
        match &self.conn {
            Conn::Single(_) => self.l2_ensure_index(dims, "").await,
            Conn::Cluster(c) => {
                // The search module keeps an index in the slot of its name: one index cannot
                // cover every primary, so a cluster has one per tenant (see l2_index).
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let reply = self
                    .timed(c.clone().route_command(redis::cmd("FT._LIST"), routing))
                    .await;
                let errors: Vec<String> = match reply {
                    Ok(Value::Map(nodes)) => nodes
                        .into_iter()
                        .filter_map(|(node, v)| match v {
                            Value::ServerError(e) => Some(format!(
                                "{node:?}: {} {}",
                                e.code(),
                                e.details().unwrap_or_default()
                            )),
                            _ => None,
                        })
                        .collect(),
                    Ok(_) => Vec::new(),
                    Err(e) => vec![e.to_string()],
                };
                match errors.first() {
                    None => Ok(()),
                    Some(e) if is_unknown_command(e) => {
                        Err(unsupported(&format!("FT._LIST answered {e:?}")))
                    }
                    Some(e) => Err(StoreError::new(
                        StoreErrorKind::Backend,
                        format!("FT._LIST: {e}"),
                    )),
                }
            }
        }
    }

    /// The index holding `tenant`'s vectors. A single Redis has one index for every tenant. On
    /// a cluster the search module keeps an index in the hash slot of its name and indexes
    /// only the keys of its own node, so each tenant has its own index, named with the
    /// tenant's hash tag: it lives on the master of the tenant's slot, beside the tenant's
    /// keys, and moves with them.
    pub(crate) fn l2_index(&self, dims: usize, tenant: &str) -> String {
        match self.conn {
            Conn::Single(_) => index_name(dims),
            Conn::Cluster(_) => format!("{}:{{{}}}", index_name(dims), tenant_tag(tenant)),
        }
    }

    /// Creates the index holding `tenant`'s vectors ([`l2_index`](Self::l2_index)) if it is
    /// missing.
    pub(crate) async fn l2_ensure_index(
        &self,
        dims: usize,
        tenant: &str,
    ) -> Result<(), StoreError> {
        let prefix = match self.conn {
            Conn::Single(_) => "cc:{".to_owned(),
            Conn::Cluster(_) => format!("cc:{{{}}}:l2:", tenant_tag(tenant)),
        };
        self.l2_create(&self.l2_index(dims, tenant), &prefix, dims)
            .await
    }

    /// `FT.CREATE` of the index `name` over the hashes under `prefix`; an index that exists
    /// already is left as it is.
    async fn l2_create(&self, name: &str, prefix: &str, dims: usize) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("FT.CREATE");
        cmd.arg(name)
            .arg("ON")
            .arg("HASH")
            .arg("PREFIX")
            .arg(1)
            .arg(prefix)
            .arg("FILTER")
            .arg(format!("@d=={dims}"))
            .arg("SCHEMA")
            .arg("t")
            .arg("TAG")
            .arg("CASESENSITIVE")
            .arg("s")
            .arg("TAG")
            .arg("CASESENSITIVE")
            .arg("v")
            .arg("VECTOR")
            .arg("HNSW")
            .arg(6)
            .arg("TYPE")
            .arg("FLOAT32")
            .arg("DIM")
            .arg(dims)
            .arg("DISTANCE_METRIC")
            .arg("COSINE");
        let reply = match &self.conn {
            Conn::Single(_) => self.timed(self.conn.query::<Value>(&cmd)).await,
            Conn::Cluster(c) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(keys::slot_of_key(name), SlotAddr::Master),
                ));
                self.timed(c.clone().route_command(cmd, routing)).await
            }
        };
        match reply {
            Ok(_) => Ok(()),
            Err(e) => {
                let message = e.to_string();
                if message.to_ascii_lowercase().contains("already exists") {
                    Ok(())
                } else if is_unknown_command(&message) {
                    Err(unsupported(&format!("FT.CREATE answered {message:?}")))
                } else {
                    Err(StoreError::new(
                        StoreErrorKind::Backend,
                        format!("FT.CREATE {name}: {message}"),
                    ))
                }
            }
        }
    }

    /// Stores the vector of the entry `digest` of `tenant` beside it, if the entry is there.
    pub(crate) async fn l2_write(
        &self,
        tenant: &str,
        digest: &[u8; 32],
        signature: &[u8; 32],
        vector: &[f32],
        question: &str,
    ) -> Result<bool, StoreError> {
        static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| Script::new(WRITE));
        let keys = TenantKeys::new(tenant);
        let mut inv = script.prepare_invoke();
        inv.key(keys.l2_digest(digest))
            .key(keys.entry_digest(digest))
            .arg(blob(vector))
            .arg(question)
            .arg(tenant_tag(tenant).as_ref())
            .arg(to_hex(signature))
            .arg(vector.len());
        let written: i64 = self.timed(self.conn.invoke(&inv)).await?;
        Ok(written == 1)
    }

    /// The `k` nearest vectors of `tenant` under `signature`, nearest first: `FT.SEARCH` KNN
    /// restricted by the two tags, the vector passed as a parameter, on the master of the
    /// tenant's slot. `None` when the index does not exist (a tenant of a cluster with nothing
    /// stored yet, or a Redis restarted empty).
    pub(crate) async fn l2_search(
        &self,
        dims: usize,
        tenant: &str,
        signature: &[u8; 32],
        vector: &[f32],
        k: usize,
    ) -> Result<Option<Vec<Neighbour>>, StoreError> {
        let index = self.l2_index(dims, tenant);
        let query = format!(
            "(@t:{{{}}} @s:{{{}}})=>[KNN {k} @v $vec AS dist]",
            escape_tag(&tenant_tag(tenant)),
            to_hex(signature)
        );
        let mut cmd = redis::cmd("FT.SEARCH");
        cmd.arg(&index)
            .arg(query)
            .arg("PARAMS")
            .arg(2)
            .arg("vec")
            .arg(blob(vector))
            .arg("SORTBY")
            .arg("dist")
            .arg("RETURN");
        // A cluster node's search module cannot load a hash's fields into its reply (it
        // answers the ids alone), so there the questions are read with HMGET afterwards.
        let cluster = matches!(self.conn, Conn::Cluster(_));
        if cluster {
            cmd.arg(1).arg("dist");
        } else {
            cmd.arg(2).arg("dist").arg("q");
        }
        cmd.arg("LIMIT").arg(0).arg(k).arg("DIALECT").arg(2);
        let reply = match &self.conn {
            Conn::Single(_) => self.timed(self.conn.query::<Value>(&cmd)).await,
            Conn::Cluster(c) => {
                let route = Route::new(keys::slot(tenant), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                self.timed(c.clone().route_command(cmd, routing)).await
            }
        };
        match reply {
            Ok(reply) => parse_search(reply).map(Some),
            Err(e) if e.to_string().to_ascii_lowercase().contains("no such index") => Ok(None),
            Err(e) if is_unknown_command(&e.to_string()) => {
                Err(unsupported("FT.SEARCH is an unknown command"))
            }
            Err(e) => Err(e),
        }
    }

    /// The questions of `digests` (of `tenant`), `None` where the hash is gone.
    pub(crate) async fn l2_questions(
        &self,
        tenant: &str,
        digests: &[[u8; 32]],
    ) -> Result<Vec<Option<String>>, StoreError> {
        let keys = TenantKeys::new(tenant);
        let mut pipe = redis::pipe();
        for d in digests {
            pipe.cmd("HGET").arg(keys.l2_digest(d)).arg("q");
        }
        let values: Vec<Option<Vec<u8>>> = self.timed(self.conn.pipe(&pipe)).await?;
        Ok(values
            .into_iter()
            .map(|v| v.and_then(|b| String::from_utf8(b).ok()))
            .collect())
    }

    /// Drops the vector of the entry `digest` of `tenant`.
    pub(crate) async fn l2_remove(
        &self,
        tenant: &str,
        digest: &[u8; 32],
    ) -> Result<(), StoreError> {
        let keys = TenantKeys::new(tenant);
        let mut cmd = Cmd::new();
        cmd.arg("UNLINK").arg(keys.l2_digest(digest));
        self.timed(self.conn.query::<u64>(&cmd)).await.map(|_| ())
    }
}

/// Reads an `FT.SEARCH` reply, in either protocol. RESP2: the total, then an id and a flat
/// array of fields per document. RESP3 (a connection opened with `protocol=resp3`): a map whose
/// `results` are maps of `id` and `extra_attributes` (a map of the returned fields). The
/// distance is the cosine *distance*, `1 - cosine similarity`, in `[0, 2]`.
fn parse_search(reply: Value) -> Result<Vec<Neighbour>, StoreError> {
    let mut out = Vec::new();
    match reply {
        Value::Array(items) => {
            let mut items = items.into_iter();
            items.next().ok_or_else(|| bad_reply("empty"))?;
            while let Some(id) = items.next() {
                let fields = match items.next() {
                    Some(Value::Array(fields)) => fields,
                    _ => Vec::new(),
                };
                let mut fields = fields.into_iter();
                let mut pairs = Vec::new();
                while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    pairs.push((name, value));
                }
                out.extend(neighbour(id, pairs)?);
            }
        }
        Value::Map(entries) => {
            let results = entries
                .into_iter()
                .find_map(|(k, v)| is_name(&k, b"results").then_some(v));
            let Some(Value::Array(docs)) = results else {
                return Err(bad_reply("a RESP3 map without results"));
            };
            for doc in docs {
                let Value::Map(doc) = doc else {
                    return Err(bad_reply("a RESP3 result that is not a map"));
                };
                let (mut id, mut fields) = (None, Vec::new());
                for (k, v) in doc {
                    if is_name(&k, b"id") {
                        id = Some(v);
                    } else if is_name(&k, b"extra_attributes") {
                        if let Value::Map(attributes) = v {
                            fields = attributes;
                        }
                    }
                }
                let id = id.ok_or_else(|| bad_reply("a RESP3 result without an id"))?;
                out.extend(neighbour(id, fields)?);
            }
        }
        _ => return Err(bad_reply("neither a RESP2 array nor a RESP3 map")),
    }
    Ok(out)
}

fn bad_reply(what: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Backend, format!("FT.SEARCH reply: {what}"))
}

/// Whether a RESP3 map key (a simple or a bulk string) is `name`.
fn is_name(key: &Value, name: &[u8]) -> bool {
    match key {
        Value::SimpleString(s) => s.as_bytes() == name,
        Value::BulkString(b) => b.as_slice() == name,
        _ => false,
    }
}

/// One document of a reply: its id and its returned fields. `None` for a key that names no
/// digest, or a document with no distance (gone between the search and the reply).
fn neighbour(id: Value, fields: Vec<(Value, Value)>) -> Result<Option<Neighbour>, StoreError> {
    let id: Vec<u8> = FromRedisValue::from_redis_value(id).map_err(|_| bad_reply("document id"))?;
    let Some(digest) = digest_of(&id) else {
        return Ok(None);
    };
    let mut distance = None;
    let mut question = None;
    for (name, value) in fields {
        let name: Vec<u8> =
            FromRedisValue::from_redis_value(name).map_err(|_| bad_reply("field"))?;
        let value: Vec<u8> =
            FromRedisValue::from_redis_value(value).map_err(|_| bad_reply("value"))?;
        match name.as_slice() {
            b"dist" => {
                distance = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.parse::<f32>().ok());
            }
            b"q" => question = String::from_utf8(value).ok(),
            _ => {}
        }
    }
    Ok(distance.map(|distance| Neighbour {
        digest,
        similarity: 1.0 - distance,
        question,
    }))
}

/// The digest an l2 key names: the 64 hex digits after its last `:`.
fn digest_of(key: &[u8]) -> Option<[u8; 32]> {
    let hex = &key[key.iter().rposition(|b| *b == b':')? + 1..];
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_punctuation_is_escaped() {
        assert_eq!(escape_tag("gpt-4o"), r"gpt\-4o");
        assert_eq!(escape_tag("acme.eu:1_a"), r"acme\.eu\:1_a");
        assert_eq!(escape_tag("h-0123abcd"), r"h\-0123abcd");
        assert_eq!(escape_tag(r"a b{c}|d\"), r"a\ b\{c\}\|d\\");
    }

    #[test]
    fn the_reply_distance_is_turned_into_a_similarity() {
        let key = format!("cc:{{t}}:l2:{}", "ab".repeat(32));
        let doc = |dist: &str| {
            vec![
                Value::BulkString(key.clone().into_bytes()),
                Value::Array(vec![
                    Value::BulkString(b"dist".to_vec()),
                    Value::BulkString(dist.as_bytes().to_vec()),
                    Value::BulkString(b"q".to_vec()),
                    Value::BulkString(b"hello".to_vec()),
                ]),
            ]
        };
        let mut items = vec![Value::Int(3)];
        items.extend(doc("0"));
        items.extend(doc("0.399999976158"));
        items.extend(doc("2"));
        let found = parse_search(Value::Array(items)).unwrap();
        let sims: Vec<f32> = found.iter().map(|n| n.similarity).collect();
        assert!((sims[0] - 1.0).abs() < 1e-6);
        assert!((sims[1] - 0.6).abs() < 1e-6);
        assert!((sims[2] + 1.0).abs() < 1e-6);
        assert_eq!(found[0].digest, [0xab; 32]);
        assert_eq!(found[0].question.as_deref(), Some("hello"));
    }

    #[test]
    fn a_resp3_reply_is_read_like_a_resp2_one() {
        // The shape RediSearch 2.10 answers on a RESP3 connection (HELLO 3).
        let s = |t: &str| Value::SimpleString(t.to_owned());
        let b = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let doc = |hex: &str, dist: &str, q: Option<&str>| {
            let mut attributes = vec![(b("dist"), b(dist))];
            if let Some(q) = q {
                attributes.push((b("q"), b(q)));
            }
            Value::Map(vec![
                (s("id"), b(&format!("cc:{{t}}:l2:{}", hex.repeat(32)))),
                (s("extra_attributes"), Value::Map(attributes)),
                (s("values"), Value::Array(Vec::new())),
            ])
        };
        let reply = Value::Map(vec![
            (s("attributes"), Value::Array(Vec::new())),
            (s("total_results"), Value::Int(3)),
            (s("format"), s("STRING")),
            (
                s("results"),
                Value::Array(vec![
                    doc("ab", "0.0500000119209", Some("hello")),
                    doc("cd", "0.399999976158", None),
                    doc("zz", "0", Some("not an l2 key")),
                ]),
            ),
            (s("warning"), Value::Array(Vec::new())),
        ]);
        let found = parse_search(reply).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].digest, [0xab; 32]);
        assert!((found[0].similarity - 0.95).abs() < 1e-6);
        assert_eq!(found[0].question.as_deref(), Some("hello"));
        assert_eq!(found[1].digest, [0xcd; 32]);
        assert!((found[1].similarity - 0.6).abs() < 1e-6);
        assert_eq!(found[1].question, None);

        let empty = Value::Map(vec![
            (s("total_results"), Value::Int(0)),
            (s("results"), Value::Array(Vec::new())),
        ]);
        assert!(parse_search(empty).unwrap().is_empty());
        assert!(parse_search(Value::Map(Vec::new())).is_err());
        assert!(parse_search(Value::Int(1)).is_err());
    }

    #[test]
    fn only_l2_keys_of_64_hex_digits_name_a_digest() {
        assert_eq!(
            digest_of(format!("cc:{{t}}:l2:{}", "0f".repeat(32)).as_bytes()),
            Some([0x0f; 32])
        );
        assert_eq!(digest_of(b"cc:{t}:l2:abc"), None);
        assert_eq!(digest_of(format!("x:{}", "zz".repeat(32)).as_bytes()), None);
    }
}
