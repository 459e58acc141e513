//! The binary encoding of an [`Entry`] inside Redis.
//!
//! ```text
//! magic "CCE" | format version (1 byte)
//! status (u16 BE) | stored_at_ms, fresh_ttl_ms, stale_window_ms (varints)
//! header count (varint) | per header: name (len + bytes), value (len + bytes)
//! dep count (varint)    | per dep: id (len + bytes), epoch (varint)
//! body (len + bytes)    | nothing after it
//! ```
//!
//! Lengths and numbers are LEB128 varints, so a small response pays a few bytes of framing, not
//! JSON and base64. The magic and version come first: a value written by another program, or by a
//! later format, is recognised as foreign and treated as a miss rather than misread.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::store::{duration_ms, DepEpochs, Entry, HIT_HEADER_ROOM};

/// First bytes of every encoded entry.
const MAGIC: &[u8; 3] = b"CCE";

/// Fewest bytes a header takes: a one-byte name and an empty value, each after its length.
const MIN_HEADER_BYTES: usize = 3;

/// Fewest bytes a dep takes: an empty id after its length, and a one-byte epoch.
const MIN_DEP_BYTES: usize = 2;

/// Bumped whenever the layout above changes. A reader never decodes another version.
pub(super) const FORMAT_VERSION: u8 = 1;

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DecodeError {
    /// The value does not start with the magic bytes: not written by this store.
    Foreign,
    /// Written by another format version.
    Version(u8),
    /// Truncated, overlong or otherwise malformed.
    Malformed(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Foreign => f.write_str("not a cachecore entry (bad magic)"),
            Self::Version(v) => write!(
                f,
                "entry format version {v}, this build reads {FORMAT_VERSION}"
            ),
            Self::Malformed(what) => write!(f, "malformed entry: {what}"),
        }
    }
}

/// Encodes `entry`.
pub(super) fn encode(entry: &Entry) -> Vec<u8> {
    let headers: usize = entry
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let deps: usize = entry.deps.iter().map(|(id, _)| id.len() + 12).sum();
    let mut out = Vec::with_capacity(48 + headers + deps + entry.body.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&entry.status.as_u16().to_be_bytes());
    put_varint(&mut out, entry.stored_at_ms);
    put_varint(&mut out, duration_ms(entry.fresh_ttl));
    put_varint(&mut out, duration_ms(entry.stale_window));
    put_varint(&mut out, entry.headers.len() as u64);
    for (name, value) in &entry.headers {
        put_bytes(&mut out, name.as_str().as_bytes());
        put_bytes(&mut out, value.as_bytes());
    }
    put_varint(&mut out, entry.deps.len() as u64);
    for (id, epoch) in entry.deps.iter() {
        put_bytes(&mut out, id.as_bytes());
        put_varint(&mut out, epoch);
    }
    put_bytes(&mut out, &entry.body);
    out
}

/// Decodes a value written by [`encode`]. The body is a slice of `raw`, not a copy.
pub(super) fn decode(raw: Bytes) -> Result<Entry, DecodeError> {
    let mut r = Reader { buf: &raw, pos: 0 };
    if r.take(MAGIC.len()).ok() != Some(&MAGIC[..]) {
        return Err(DecodeError::Foreign);
    }
    let version = r.byte()?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::Version(version));
    }
    let status = u16::from_be_bytes([r.byte()?, r.byte()?]);
    let status = StatusCode::from_u16(status).map_err(|_| DecodeError::Malformed("status code"))?;
    let stored_at_ms = r.varint()?;
    let fresh_ttl = Duration::from_millis(r.varint()?);
    let stale_window = Duration::from_millis(r.varint()?);

    let n = r.count(MIN_HEADER_BYTES)?;
    // A header map has a maximum size, and `with_capacity` and `append` panic past it: a count
    // that does not fit gets a map grown as headers arrive, and `try_append` says when it is full.
    let mut headers = HeaderMap::try_with_capacity(n + HIT_HEADER_ROOM).unwrap_or_default();
    for _ in 0..n {
        let name = HeaderName::from_bytes(r.bytes()?)
            .map_err(|_| DecodeError::Malformed("header name"))?;
        // Values are slices of `raw`, like the body: no copy.
        let value = r.shared_bytes(&raw)?;
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| DecodeError::Malformed("header value"))?;
        headers
            .try_append(name, value)
            .map_err(|_| DecodeError::Malformed("too many headers"))?;
    }

    let n = r.count(MIN_DEP_BYTES)?;
    let mut deps = Vec::with_capacity(n);
    for _ in 0..n {
        let id = std::str::from_utf8(r.bytes()?)
            .map_err(|_| DecodeError::Malformed("dep id"))?
            .to_owned();
        deps.push((id, r.varint()?, 0));
    }

    let body = r.shared_bytes(&raw)?;
    if r.pos != raw.len() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(Entry {
        status,
        headers,
        body,
        stored_at_ms,
        fresh_ttl,
        stale_window,
        deps: DepEpochs::observed(deps, Instant::now()),
    })
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(DecodeError::Malformed("truncated"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut n = 0u64;
        // A u64 needs at most ten 7-bit groups; the tenth may only carry the top bit.
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if shift == 63 && part > 1 {
                return Err(DecodeError::Malformed("varint overflow"));
            }
            n |= part << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError::Malformed("varint overflow"))
    }

    /// A length that must fit in what is left of the buffer.
    fn len(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.buf.len() - self.pos)
            .ok_or(DecodeError::Malformed("length past the end"))
    }

    /// A count of items that take at least `min_item_bytes` each: it must fit in what is left of
    /// the buffer, so what is preallocated for the items is bounded by the bytes that remain.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| {
                n.checked_mul(min_item_bytes)
                    .is_some_and(|bytes| bytes <= self.buf.len() - self.pos)
            })
            .ok_or(DecodeError::Malformed("count past the end"))
    }

    /// Like [`bytes`](Self::bytes), as a slice of `raw` (the buffer this reader reads).
    fn shared_bytes(&mut self, raw: &Bytes) -> Result<Bytes, DecodeError> {
        let n = self.len()?;
        let start = self.pos;
        self.take(n)?;
        Ok(raw.slice(start..start + n))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Entry {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"{\"answer\":42}"),
            stored_at_ms: 1_700_000_000_123,
            fresh_ttl: Duration::from_millis(60_000),
            stale_window: Duration::from_millis(5_000),
            deps: DepEpochs::new(vec![
                ("cc:policy-version".into(), 0),
                ("doc:1".into(), u64::MAX),
            ]),
        }
    }

    #[test]
    fn round_trips_every_field() {
        let e = sample();
        let d = decode(Bytes::from(encode(&e))).unwrap();
        assert_eq!(d.status, e.status);
        assert_eq!(d.headers, e.headers);
        assert_eq!(d.body, e.body);
        assert_eq!(d.stored_at_ms, e.stored_at_ms);
        assert_eq!(d.fresh_ttl, e.fresh_ttl);
        assert_eq!(d.stale_window, e.stale_window);
        assert_eq!(d.deps, e.deps);
    }

    #[test]
    fn rejects_foreign_other_version_and_every_truncation() {
        let raw = encode(&sample());
        assert_eq!(
            decode(Bytes::from_static(b"hello")).unwrap_err(),
            DecodeError::Foreign
        );
        assert_eq!(decode(Bytes::new()).unwrap_err(), DecodeError::Foreign);
        let mut other = raw.clone();
        other[3] = FORMAT_VERSION + 1;
        assert_eq!(
            decode(Bytes::from(other)).unwrap_err(),
            DecodeError::Version(FORMAT_VERSION + 1)
        );
        for cut in 0..raw.len() {
            assert!(
                decode(Bytes::copy_from_slice(&raw[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = raw;
        longer.push(0);
        assert!(decode(Bytes::from(longer)).is_err());
    }

    /// The fixed part of an entry up to the header count: magic, version, status 200, and
    /// zero for stored-at, fresh TTL and stale window.
    fn prelude() -> Vec<u8> {
        let mut raw = MAGIC.to_vec();
        raw.push(FORMAT_VERSION);
        raw.extend_from_slice(&200u16.to_be_bytes());
        raw.extend_from_slice(&[0, 0, 0]);
        raw
    }

    #[test]
    fn a_crafted_header_count_is_a_miss_not_a_panic() {
        // 30,000 headers announced and as many bytes after the count: within the bytes that
        // remain, but no header fits in one byte, and a header map that size does not exist.
        let mut raw = prelude();
        put_varint(&mut raw, 30_000);
        raw.resize(raw.len() + 30_000, 0);
        assert_eq!(
            decode(Bytes::from(raw)).unwrap_err(),
            DecodeError::Malformed("count past the end")
        );
    }

    #[test]
    fn more_headers_than_a_header_map_holds_is_a_miss_not_a_panic() {
        // Every header well formed and distinct, more of them than `HeaderMap` can hold.
        let n = 40_000;
        let mut raw = prelude();
        put_varint(&mut raw, n);
        for i in 0..n {
            put_bytes(&mut raw, format!("h{i}").as_bytes());
            put_bytes(&mut raw, b"");
        }
        put_varint(&mut raw, 0);
        put_bytes(&mut raw, b"");
        assert_eq!(
            decode(Bytes::from(raw)).unwrap_err(),
            DecodeError::Malformed("too many headers")
        );
    }

    #[test]
    fn a_dep_count_past_the_bytes_that_remain_is_a_miss() {
        let mut raw = prelude();
        put_varint(&mut raw, 0);
        put_varint(&mut raw, 1_000_000);
        raw.resize(raw.len() + 1_000_000, 0);
        assert_eq!(
            decode(Bytes::from(raw)).unwrap_err(),
            DecodeError::Malformed("count past the end")
        );
    }

    #[test]
    fn garbage_after_the_magic_never_panics() {
        // A cheap deterministic generator; no dev-dependency needed.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..400 {
            let mut raw = b"CCE\x01".to_vec();
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                raw.push(x as u8);
            }
            let _ = decode(Bytes::from(raw));
        }
    }

    /// Property tests: what a corrupt or foreign value does to the decoder, and that every entry
    /// the encoder can write reads back. `CACHECORE_SOAK=<seconds>` raises the case counts the
    /// way it does for `tests/decoders_prop.rs`:
    /// `CACHECORE_SOAK=600 cargo test --all-features --lib codec::tests::prop`.
    mod prop {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        /// Cases per property in CI; about a second for all of them in a debug build.
        const CI_CASES: u32 = 256;

        /// Properties below, which share a soak run's time, and the test threads they share it
        /// over (cargo's default on a 2-core machine).
        const PROPERTIES: u64 = 4;
        const THREADS: u64 = 2;

        /// The config of a property that gets through about `cases_per_second` cases a second
        /// (debug build, 2-core machine, measured one at a time): [`CI_CASES`], or under
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
                // A failure is kept as a named regression test above, not as a file.
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        fn header_value() -> impl Strategy<Value = HeaderValue> {
            // Every byte a header value may hold: visible ASCII, obs-text, space and tab.
            let byte = prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff];
            vec(byte, 0..24).prop_map(|v| HeaderValue::from_bytes(&v).expect("valid value bytes"))
        }

        fn entry() -> impl Strategy<Value = Entry> {
            let header = ("[a-z0-9!#$%&'*+.^_`|~-]{1,12}", header_value()).prop_map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).expect("token chars"),
                    v,
                )
            });
            (
                100u16..1000,
                vec(header, 0..8),
                vec(any::<u8>(), 0..200),
                (any::<u64>(), any::<u64>(), any::<u64>()),
                vec((any::<String>(), any::<u64>()), 0..6),
            )
                .prop_map(|(status, headers, body, (at, ttl, stale), deps)| {
                    let mut map = HeaderMap::new();
                    for (name, value) in headers {
                        map.append(name, value);
                    }
                    Entry {
                        status: StatusCode::from_u16(status).expect("100..1000"),
                        headers: map,
                        body: Bytes::from(body),
                        stored_at_ms: at,
                        fresh_ttl: Duration::from_millis(ttl),
                        stale_window: Duration::from_millis(stale),
                        deps: DepEpochs::new(deps),
                    }
                })
        }

        /// A varint the decoder reads as a length or count: small, near the header map's
        /// limits, or anything at all.
        fn count() -> impl Strategy<Value = u64> {
            prop_oneof![0u64..64, 24_000u64..33_000, any::<u64>()]
        }

        /// A change to an encoded value: a byte replaced, inserted or removed, a varint
        /// spliced in, or the value cut short.
        #[derive(Clone, Debug)]
        enum Mutation {
            Replace(usize, u8),
            Insert(usize, u8),
            Remove(usize),
            Splice(usize, u64),
            Truncate(usize),
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            let at = any::<usize>();
            prop_oneof![
                (at, any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
                (at, any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
                at.prop_map(Mutation::Remove),
                (at, count()).prop_map(|(i, n)| Mutation::Splice(i, n)),
                at.prop_map(Mutation::Truncate),
            ]
        }

        fn apply(raw: &mut Vec<u8>, m: &Mutation) {
            let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
            match *m {
                Mutation::Replace(i, b) if !raw.is_empty() => {
                    let i = at(i, raw.len());
                    raw[i] = b;
                }
                Mutation::Insert(i, b) => raw.insert(at(i, raw.len() + 1), b),
                Mutation::Remove(i) if !raw.is_empty() => {
                    raw.remove(at(i, raw.len()));
                }
                Mutation::Splice(i, n) => {
                    let mut varint = Vec::new();
                    put_varint(&mut varint, n);
                    let i = at(i, raw.len() + 1);
                    raw.splice(i..i, varint);
                }
                Mutation::Truncate(i) => raw.truncate(at(i, raw.len() + 1)),
                _ => {}
            }
        }

        fn assert_same(decoded: &Entry, e: &Entry) {
            assert_eq!(decoded.status, e.status);
            assert_eq!(decoded.headers, e.headers);
            assert_eq!(decoded.body, e.body);
            assert_eq!(decoded.stored_at_ms, e.stored_at_ms);
            assert_eq!(decoded.fresh_ttl, e.fresh_ttl);
            assert_eq!(decoded.stale_window, e.stale_window);
            assert_eq!(decoded.deps, e.deps);
        }

        proptest! {
            #![proptest_config(config(400))]

            #[test]
            fn every_entry_round_trips(e in entry()) {
                let decoded = decode(Bytes::from(encode(&e))).expect("an encoded entry decodes");
                assert_same(&decoded, &e);
            }
        }

        proptest! {
            #![proptest_config(config(8_000))]

            #[test]
            fn arbitrary_bytes_decode_or_are_refused_without_panicking(
                with_magic in any::<bool>(),
                tail in vec(any::<u8>(), 0..300),
            ) {
                let mut raw = if with_magic { prelude() } else { Vec::new() };
                raw.extend_from_slice(&tail);
                let _ = decode(Bytes::from(raw));
            }
        }

        proptest! {
            #![proptest_config(config(2_000))]

            #[test]
            fn crafted_counts_and_lengths_are_refused_without_panicking(
                headers in count(),
                header_bytes in vec(any::<u8>(), 0..600),
                // Zeros after them, enough at times for a count near the limits to fit.
                padding in prop_oneof![0usize..16, 20_000usize..40_000],
                deps in count(),
                rest in vec(any::<u8>(), 0..64),
            ) {
                let mut raw = prelude();
                put_varint(&mut raw, headers);
                raw.extend_from_slice(&header_bytes);
                raw.resize(raw.len() + padding, 0);
                put_varint(&mut raw, deps);
                raw.extend_from_slice(&rest);
                let _ = decode(Bytes::from(raw));
            }
        }

        proptest! {
            #![proptest_config(config(400))]

            /// A value damaged anywhere is an error or some entry, never a panic; and an entry
            /// it decodes to encodes to a value that decodes to the same entry.
            #[test]
            fn damaged_entries_are_refused_or_read_consistently(
                e in entry(),
                mutations in vec(mutation(), 1..4),
            ) {
                let mut raw = encode(&e);
                for m in &mutations {
                    apply(&mut raw, m);
                }
                if let Ok(decoded) = decode(Bytes::from(raw)) {
                    let again = decode(Bytes::from(encode(&decoded))).expect("re-encoded entry");
                    assert_same(&again, &decoded);
                }
            }
        }
    }
}
