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
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::store::{duration_ms, DepEpochs, Entry, HIT_HEADER_ROOM};

/// First bytes of every encoded entry.
const MAGIC: &[u8; 3] = b"CCE";

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

    let n = r.count()?;
    let mut headers = HeaderMap::with_capacity(n + HIT_HEADER_ROOM);
    for _ in 0..n {
        let name = HeaderName::from_bytes(r.bytes()?)
            .map_err(|_| DecodeError::Malformed("header name"))?;
        // Values are slices of `raw`, like the body: no copy.
        let value = r.shared_bytes(&raw)?;
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| DecodeError::Malformed("header value"))?;
        headers.append(name, value);
    }

    let n = r.count()?;
    let mut deps = Vec::with_capacity(n);
    for _ in 0..n {
        let id = std::str::from_utf8(r.bytes()?)
            .map_err(|_| DecodeError::Malformed("dep id"))?
            .to_owned();
        deps.push((id, r.varint()?));
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
        deps: DepEpochs::new(deps),
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

    /// An item count; each item takes at least one byte, which bounds preallocation.
    fn count(&mut self) -> Result<usize, DecodeError> {
        self.len()
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
}
