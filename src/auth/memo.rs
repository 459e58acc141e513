//! Tokens that verified, so that a caller who sends the same token on every request pays the
//! signature check once, not per request (docs/design.md §8).
//!
//! Keyed by the exact bytes of the token as presented: a token that differs in one byte (a
//! forged signature over the same claims included) is another key, and goes through the full
//! verification. Only a token that verified is stored, with the window its `exp` and `nbf`
//! allow; a lookup outside that window misses, and the verifier then says why.
//!
//! Bounded by construction: [`SLOTS`] slots, one token each, the slot chosen by a keyed hash
//! of the token (a new token replaces whatever was in its slot), and tokens longer than
//! [`MAX_TOKEN_LEN`] are never stored. At most `SLOTS * MAX_TOKEN_LEN` bytes of tokens.

use std::hash::{BuildHasher, RandomState};
use std::sync::RwLock;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::namespace::Namespace;

/// Slots of a memo: distinct tokens in use at once that all stay verified. A gateway's tenants
/// send a handful of tokens each; past this, tokens that share a slot take turns and pay the
/// full check when they do.
pub(crate) const SLOTS: usize = 1024;

/// Longest token stored, in bytes: real tokens are a few hundred bytes; this bounds the memo
/// at 2 MiB of tokens.
pub(crate) const MAX_TOKEN_LEN: usize = 2048;

/// One verified token and what it grants.
struct Verified {
    token: Box<str>,
    namespace: Namespace,
    /// The latest time (seconds since the Unix epoch) the token is still accepted: `exp` plus
    /// the clock leeway.
    until: u64,
    /// The earliest time it is accepted: `nbf` minus the clock leeway (0 without `nbf`).
    from: u64,
}

/// Verified tokens, bounded (see the module docs).
pub(crate) struct TokenMemo {
    slots: Box<[RwLock<Option<Verified>>]>,
    /// The hash seed, drawn per process, so that nobody can aim many tokens at one slot.
    seed: u64,
}

impl TokenMemo {
    pub(crate) fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| RwLock::new(None)).collect(),
            seed: RandomState::new().hash_one(0u8),
        }
    }

    fn slot(&self, token: &str) -> &RwLock<Option<Verified>> {
        // `SLOTS` is a power of two: the mask keeps the low bits of the hash.
        &self.slots[xxh3_64_with_seed(token.as_bytes(), self.seed) as usize & (SLOTS - 1)]
    }

    /// The namespace of `token` if it verified before and `now` is inside its window.
    pub(crate) fn get(&self, token: &str, now: u64) -> Option<Namespace> {
        let slot = self.slot(token).read().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some(v) if *v.token == *token && (v.from..=v.until).contains(&now) => {
                Some(v.namespace.clone())
            }
            _ => None,
        }
    }

    /// Remembers a token that verified: accepted from `from` to `until` (seconds since the
    /// Unix epoch, leeway included).
    pub(crate) fn put(&self, token: &str, namespace: &Namespace, from: u64, until: u64) {
        if token.len() > MAX_TOKEN_LEN {
            return;
        }
        let verified = Verified {
            token: token.into(),
            namespace: namespace.clone(),
            until,
            from,
        };
        *self.slot(token).write().unwrap_or_else(|e| e.into_inner()) = Some(verified);
    }

    /// Tokens stored.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.read().unwrap_or_else(|e| e.into_inner()).is_some())
            .count()
    }
}

const _: () = assert!(SLOTS.is_power_of_two());
