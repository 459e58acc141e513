//! What the cache did with a request.

use std::fmt;

/// What the cache did with one request. Sent as the `X-Cache` header and put in the response's
/// extensions, so tests and middleware further out can read it without parsing headers.
///
/// ```
/// # fn check(res: http::Response<()>) {
/// use cachecore::CacheStatus;
/// assert_eq!(res.extensions().get::<CacheStatus>(), Some(&CacheStatus::Hit));
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    /// Served from a fresh entry (`HIT_L1`).
    Hit,
    /// Served from an entry past its fresh TTL, within its stale window, while one background
    /// refresh runs (`HIT_L1_STALE`).
    StaleHit,
    /// Served from the entry of a request that means the same (`HIT_L2`, feature `semantic`):
    /// its question was near enough and passed every guard, and the entry was valid by the L1
    /// rules. `X-Cache-Similarity` says how near.
    HitL2,
    /// Sent to the inner service; the response is stored if it may be (`MISS`).
    Miss,
    /// Not read from nor written to the cache (`BYPASS`).
    Bypass,
}

impl CacheStatus {
    /// The `X-Cache` header value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "HIT_L1",
            Self::StaleHit => "HIT_L1_STALE",
            Self::HitL2 => "HIT_L2",
            Self::Miss => "MISS",
            Self::Bypass => "BYPASS",
        }
    }

    /// Parses an `X-Cache` header value.
    pub fn from_header(value: &str) -> Option<Self> {
        Some(match value {
            "HIT_L1" => Self::Hit,
            "HIT_L1_STALE" => Self::StaleHit,
            "HIT_L2" => Self::HitL2,
            "MISS" => Self::Miss,
            "BYPASS" => Self::Bypass,
            _ => return None,
        })
    }

    /// Whether the response came from the cache.
    pub const fn is_hit(self) -> bool {
        matches!(self, Self::Hit | Self::StaleHit | Self::HitL2)
    }
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
