//! A memo of recent key computations, so a repeated request skips canonicalising and hashing
//! its body.
//!
//! The memo is exact, not probabilistic: a slot is used only when the encoded head and the raw
//! body are byte-for-byte those it was computed from, and the key is a pure function of them.
//! The fast hash only picks the slot; a collision costs a recomputation, never a wrong key.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Mutex, PoisonError};

/// Slots in the memo (direct-mapped: a new key evicts whatever shared its slot).
const SLOTS: usize = 512;

/// Largest encoded head plus body memoised, in bytes; larger requests are keyed afresh every
/// time. A slot keeps copies of both, so this times [`SLOTS`] bounds what the memo retains, at
/// about 10 MiB. 16 KiB of body holds a chat request with a system prompt and a few turns, and
/// 4 KiB more leaves room for its head (namespace, URI, vary values, deps), so such a request is
/// still memoised whole; anything larger costs milliseconds upstream, next to which hashing it
/// again is noise. The head counts as much as the body: a long query string, vary header values
/// or deps can make it the larger of the two.
const MAX_MEMOISED: usize = 20 * 1024;

#[derive(Debug)]
pub(crate) struct KeyMemo {
    slots: Box<[Mutex<Option<Slot>>]>,
    /// Seeded per process: which requests share a slot cannot be steered from outside.
    hasher: foldhash::fast::RandomState,
}

#[derive(Debug)]
struct Slot {
    hash: u64,
    head: Box<[u8]>,
    body: Box<[u8]>,
    digest: [u8; 32],
}

impl Default for KeyMemo {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl KeyMemo {
    /// The digest of `head` + `body`: from the memo when this exact pair was seen, otherwise
    /// computed with `compute` and remembered.
    pub(crate) fn digest(
        &self,
        head: &[u8],
        body: &[u8],
        compute: impl FnOnce() -> [u8; 32],
    ) -> [u8; 32] {
        if head.len().saturating_add(body.len()) > MAX_MEMOISED {
            return compute();
        }
        // The head's length goes first, so two (head, body) splits of the same bytes do not
        // hash alike by construction (they would only share a slot; the compare decides).
        let mut hasher = self.hasher.build_hasher();
        hasher.write_usize(head.len());
        hasher.write(head);
        hasher.write(body);
        let hash = hasher.finish();
        let slot = &self.slots[(hash as usize) % SLOTS];
        if let Some(s) = &*slot.lock().unwrap_or_else(PoisonError::into_inner) {
            if s.hash == hash && *s.head == *head && *s.body == *body {
                return s.digest;
            }
        }
        let digest = compute();
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Slot {
            hash,
            head: head.into(),
            body: body.into(),
            digest,
        });
        digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memoised_digest_is_returned_only_for_the_exact_same_input() {
        let memo = KeyMemo::default();
        let mut calls = 0;
        let mut get = |head: &[u8], body: &[u8]| {
            memo.digest(head, body, || {
                calls += 1;
                let mut d = [0u8; 32];
                d[0] = head.len() as u8;
                d[1] = body.len() as u8;
                d
            })
        };
        let a = get(b"head", b"body");
        assert_eq!(get(b"head", b"body"), a);
        let b = get(b"head", b"bodz");
        assert_ne!(b, [0u8; 32]);
        get(b"heaf", b"body");
        assert_eq!(calls, 3, "a hit only for the same head and body");
    }

    /// How many times `compute` runs when `head` + `body` is asked for twice.
    fn computations(head: &[u8], body: &[u8]) -> usize {
        let memo = KeyMemo::default();
        let mut calls = 0;
        for _ in 0..2 {
            memo.digest(head, body, || {
                calls += 1;
                [0; 32]
            });
        }
        calls
    }

    #[test]
    fn large_bodies_are_not_memoised() {
        assert_eq!(computations(b"h", &vec![0u8; MAX_MEMOISED + 1]), 2);
    }

    #[test]
    fn large_heads_are_not_memoised() {
        assert_eq!(computations(&vec![0u8; MAX_MEMOISED + 1], b""), 2);
    }

    #[test]
    fn head_and_body_count_together() {
        let half = vec![0u8; MAX_MEMOISED / 2];
        assert_eq!(
            computations(&half, &half),
            1,
            "exactly at the bound: memoised"
        );
        assert_eq!(computations(&half, &[half.as_slice(), b"x"].concat()), 2);
    }

    #[test]
    fn what_the_memo_retains_is_bounded() {
        let memo = KeyMemo::default();
        // Far more distinct oversized requests than there are slots.
        let head = vec![7u8; 64 * 1024];
        for i in 0..4 * SLOTS {
            let body = (i as u64).to_be_bytes();
            memo.digest(&head, &body, || [0; 32]);
        }
        let retained: usize = memo
            .slots
            .iter()
            .filter_map(|s| {
                let s = s.lock().unwrap();
                s.as_ref().map(|s| s.head.len() + s.body.len())
            })
            .sum();
        assert!(
            retained <= SLOTS * MAX_MEMOISED,
            "{retained} bytes retained"
        );
    }
}
