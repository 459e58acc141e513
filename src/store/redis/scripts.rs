//! The Lua scripts. Each declares every key it touches in `KEYS`, and all of them belong to one
//! tenant, hence one cluster slot.
//!
//! A dep ver key is a string `<epoch>.<life>:<last new_hash>`: one `MGET` reads an entry and the
//! epochs of all its deps, atomically, without a script (see `RedisStore::lookup_inner`). A
//! missing ver key is epoch 0 (never raised, or forgotten). The life is a random number given to
//! the key when a raise creates it: a key that expired and was raised again has a new one, so a
//! put that observed the old key is refused even when the epoch numbers agree. Values written
//! before lives existed (`<epoch>:<hash>`) have none and never expire.
//!
//! A ver key expires (docs/design.md §4 rule 8), but never while an entry that records the dep
//! lives, nor within the epoch retention (put deadline plus transit margin) of its last raise:
//! a raise sets its expiry to the longest of the key's own, the tag set's (which outlives every
//! entry tagged since the last raise) and the retention; a put extends it to the entry's
//! lifetime. Once it is gone, no live entry and no admissible put can carry an older epoch.

use redis::Script;

/// Writes an entry if every observed epoch is still current, tags it, extends the tag sets and
/// the ver keys.
///
/// `KEYS[1]` entry, `KEYS[2..=n+1]` dep ver keys, `KEYS[n+2..=2n+1]` dep tag sets.
/// `ARGV[1]` encoded entry, `ARGV[2]` lifetime in ms, `ARGV[3]` the key's 32-byte digest,
/// `ARGV[4..]` observed versions: `<epoch>.<life>`, or `<epoch>` when the life is not known
/// (compared on the number alone). Returns 0 when stored, else the 1-based index of the first
/// dep whose version moved.
///
/// Versions are compared as decimal strings, so no precision is lost to Lua's doubles; a ver
/// value that does not parse never matches. A tag set is a sorted set of digests scored by the
/// entry's expiry (server time, ms): each put first drops up to [`PRUNE_PER_PUT`] members whose
/// entries have expired, so a tag set of a dep that never goes quiet stays bounded by the live
/// entries instead of growing with every entry ever written. The expiry of a tag set or of a
/// ver key is only ever extended here, never shortened, so each outlives every entry it covers.
const PUT: &str = r"
local n = (#KEYS - 1) / 2
local raised = {}
for i = 1, n do
  local ver = redis.call('GET', KEYS[1 + i])
  local cur = '0'
  if ver then cur = string.match(ver, '^(%d+%.?%d*):') or '' end
  local want = ARGV[3 + i]
  if not string.find(want, '.', 1, true) then cur = string.match(cur, '^%d*') end
  if cur ~= want then return i end
  raised[i] = ver ~= false
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
  if raised[i] then
    local left = redis.call('PTTL', KEYS[1 + i])
    if left >= 0 and left < ttl then
      redis.call('PEXPIRE', KEYS[1 + i], ttl)
    end
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
/// `ARGV[1]` new hash, `ARGV[2]` epoch retention in ms, `ARGV[3]` the life of a ver key this
/// raise creates. Returns, per dep, the new epoch and 1 when a tag set was detached (0 when
/// there is nothing to reclaim). The increment is done in Lua on a double, exact up to 2^53
/// invalidations of one dep. The ver key expires no sooner than the retention, than its current
/// expiry, or than the tag set it detaches (whose entries record older epochs); a key written
/// before keys expired keeps no expiry. The detached set keeps its expiry, so a reclamation that
/// never finishes leaves nothing behind for longer than the entries it names. Entries tagged
/// after this point (with the new epoch) go into a new tag set and are not reclaimed by this
/// invalidation.
const BUMP: &str = r"
local out = {}
local retention = tonumber(ARGV[2])
for i = 1, #KEYS / 3 do
  local ver, tags, gc = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local old = redis.call('GET', ver)
  local epoch, life = 0, ''
  if old then
    local e, l = string.match(old, '^(%d+)%.?(%d*):')
    epoch = tonumber(e) or 0
    life = l or ''
  end
  if life == '' then life = ARGV[3] end
  epoch = epoch + 1
  local value = string.format('%.0f', epoch) .. '.' .. life .. ':' .. ARGV[1]
  local left = redis.call('PTTL', ver)
  local tagged = redis.call('PTTL', tags)
  if left == -1 then
    redis.call('SET', ver, value)
  else
    local keep = retention
    if left > keep then keep = left end
    if tagged > keep then keep = tagged end
    redis.call('SET', ver, value, 'PX', keep)
  end
  out[2 * i - 1] = epoch
  out[2 * i] = 0
  if tagged ~= -2 then
    redis.call('RENAME', tags, gc)
    out[2 * i] = 1
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
