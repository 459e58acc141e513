//! The Lua scripts. Each declares every key it touches in `KEYS`, and all of them belong to one
//! tenant, hence one cluster slot.
//!
//! A dep ver key is a string `<epoch>:<last new_hash>`: one `MGET` reads an entry and the epochs
//! of all its deps, atomically, without a script (see `RedisStore::lookup_inner`). A missing ver
//! key is epoch 0.

use redis::Script;

/// Writes an entry if every observed epoch is still current, tags it, extends the tag sets.
///
/// `KEYS[1]` entry, `KEYS[2..=n+1]` dep ver keys, `KEYS[n+2..=2n+1]` dep tag sets.
/// `ARGV[1]` encoded entry, `ARGV[2]` lifetime in ms, `ARGV[3]` the key's 32-byte digest,
/// `ARGV[4..]` observed epochs (decimal). Returns 0 when stored, else the 1-based index of the
/// first dep whose epoch moved.
///
/// Epochs are compared as decimal strings, so no precision is lost to Lua's doubles; a ver value
/// that does not parse never matches. A tag set is a sorted set of digests scored by the
/// entry's expiry (server time, ms): each put first drops up to [`PRUNE_PER_PUT`] members whose
/// entries have expired, so a tag set of a dep that never goes quiet stays bounded by the live
/// entries instead of growing with every entry ever written. A tag set's expiry is only ever
/// extended, never shortened, so it outlives every entry it names.
const PUT: &str = r"
local n = (#KEYS - 1) / 2
for i = 1, n do
  local ver = redis.call('GET', KEYS[1 + i])
  local cur = '0'
  if ver then cur = string.match(ver, '^(%d+):') end
  if cur ~= ARGV[3 + i] then return i end
end
local ttl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 1, n do
  local tags = KEYS[1 + n + i]
  local gone = redis.call('ZRANGE', tags, '-inf', now, 'BYSCORE', 'LIMIT', 0, PRUNE_PER_PUT)
  if #gone > 0 then
    redis.call('ZREM', tags, unpack(gone))
  end
  redis.call('ZADD', tags, 'GT', now + ttl, ARGV[3])
  if redis.call('PTTL', tags) < ttl then
    redis.call('PEXPIRE', tags, ttl)
  end
end
return 0
";

/// Expired members a put removes from each tag set it touches, at most: each put adds one, so
/// the backlog shrinks under any load, and the work per put stays small and bounded.
pub(super) const PRUNE_PER_PUT: usize = 16;

/// Raises the epoch of each dep, records its new hash, and detaches its tag set for reclamation.
///
/// Per dep `i`: `KEYS[3i-2]` ver key, `KEYS[3i-1]` tag set, `KEYS[3i]` fresh gc name.
/// `ARGV[1]` new hash. Returns the new epochs. The increment is done in Lua on a double, exact
/// up to 2^53 invalidations of one dep. The detached set keeps its expiry, so a
/// reclamation that never finishes leaves nothing behind for longer than the entries it names.
/// Entries tagged after this point (with the new epoch) go into a new tag set and are not
/// reclaimed by this invalidation.
const BUMP: &str = r"
local out = {}
for i = 1, #KEYS / 3 do
  local ver, tags, gc = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local old = redis.call('GET', ver)
  local epoch = (old and tonumber(string.match(old, '^(%d+):')) or 0) + 1
  out[i] = epoch
  redis.call('SET', ver, string.format('%.0f', epoch) .. ':' .. ARGV[1])
  if redis.call('EXISTS', tags) == 1 then
    redis.call('RENAME', tags, gc)
  end
end
return out
";

/// The scripts, hashed once.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) put: Script,
    pub(super) bump: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            put: Script::new(&PUT.replace("PRUNE_PER_PUT", &PRUNE_PER_PUT.to_string())),
            bump: Script::new(BUMP),
        }
    }

    pub(super) fn all(&self) -> [&Script; 2] {
        [&self.put, &self.bump]
    }
}
