//! The Lua scripts. Each declares every key it touches in `KEYS`, and all of them belong to one
//! tenant, hence one cluster slot.

use redis::Script;

/// Reads an entry and the current epoch of each declared dep, in one round trip.
///
/// `KEYS[1]` entry, `KEYS[2..]` dep ver keys. Returns `{entry or nil, epoch, ...}`. A key of
/// another type under the entry name comes back as a value that fails to decode (a miss).
const LOOKUP: &str = r"
local out = {}
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then v = '!not-a-string' end
out[1] = v
for i = 2, #KEYS do
  out[i] = redis.call('HGET', KEYS[i], 'epoch') or '0'
end
return out
";

/// Writes an entry if every observed epoch is still current, tags it, extends the tag sets.
///
/// `KEYS[1]` entry, `KEYS[2..=n+1]` dep ver keys, `KEYS[n+2..=2n+1]` dep tag sets.
/// `ARGV[1]` encoded entry, `ARGV[2]` lifetime in ms, `ARGV[3..]` observed epochs (decimal).
/// Returns 0 when stored, else the 1-based index of the first dep whose epoch moved.
/// Epochs are compared as the decimal strings HINCRBY writes, so no precision is lost to Lua's
/// doubles. A tag set's expiry is only ever extended, never shortened.
const PUT: &str = r"
local n = (#KEYS - 1) / 2
for i = 1, n do
  local cur = redis.call('HGET', KEYS[1 + i], 'epoch') or '0'
  if cur ~= ARGV[2 + i] then return i end
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 1, n do
  local tags = KEYS[1 + n + i]
  redis.call('SADD', tags, KEYS[1])
  if redis.call('PTTL', tags) < ttl then
    redis.call('PEXPIRE', tags, ttl)
  end
end
return 0
";

/// Raises the epoch of each dep, records its new hash, and detaches its tag set for reclamation.
///
/// Per dep `i`: `KEYS[3i-2]` ver key, `KEYS[3i-1]` tag set, `KEYS[3i]` fresh gc name.
/// `ARGV[1]` new hash. Returns the new epochs. The detached set keeps its expiry, so a
/// reclamation that never finishes leaves nothing behind for longer than the entries it names.
/// Entries tagged after this point (with the new epoch) go into a new tag set and are not
/// reclaimed by this invalidation.
const BUMP: &str = r"
local out = {}
for i = 1, #KEYS / 3 do
  local ver, tags, gc = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  out[i] = redis.call('HINCRBY', ver, 'epoch', 1)
  redis.call('HSET', ver, 'hash', ARGV[1])
  if redis.call('EXISTS', tags) == 1 then
    redis.call('RENAME', tags, gc)
  end
end
return out
";

/// The three scripts, hashed once.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) lookup: Script,
    pub(super) put: Script,
    pub(super) bump: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            lookup: Script::new(LOOKUP),
            put: Script::new(PUT),
            bump: Script::new(BUMP),
        }
    }

    pub(super) fn all(&self) -> [&Script; 3] {
        [&self.lookup, &self.put, &self.bump]
    }
}
