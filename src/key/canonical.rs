//! Canonical JSON, fed straight into a hasher.
//!
//! The canonical form of a JSON text is the same value written with no insignificant white
//! space, with the members of every object in byte order of their keys, and with every string
//! and number copied exactly as written. It is itself a valid JSON text whose tokens are copies of
//! the input's tokens, so it reads back to exactly one value: two bodies hash alike only when
//! they differ in member order and white space, never when they differ in anything else.
//!
//! Keys are compared, matched against the ignore list and emitted as written, escapes not
//! decoded: `{"a":1}` and `{"\u0061":1}` (or `1.0` and `1.00`) get different keys. That is a
//! miss the cache can afford, never a wrong hit; decoding would cost time on every request to
//! save a miss that clients, which serialise the same way every time, hardly ever cause.
//!
//! Members with the same key are all kept, in the order they were written (a server that takes
//! the last one must see the same last one).
//!
//! Cost, for the compact bodies SDKs send: a vectorised pass for the smallest and largest byte
//! (plus a UTF-8 check if there is non-ASCII), a parsing pass that copies nothing (strings, most
//! of a chat body, are crossed with memchr's vectorised search), one copy that writes the
//! members of objects whose keys are out of order in order (and leaves ignored members out), and
//! a single hasher `update`. White space adds one copy. Every byte is copied at most twice
//! however deeply unsorted objects nest, and nothing is allocated once the per-thread buffers
//! have grown.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::ops::Range;

use sha2::Digest;

/// The body is not valid JSON; the caller falls back to hashing raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJson;

/// Deepest nesting of arrays and objects accepted, about serde_json's default recursion limit;
/// deeper bodies are refused (and hashed raw by the caller) rather than risk the stack.
const MAX_DEPTH: usize = 128;

/// Buffers above this capacity are freed after use, so one huge body does not pin its size in
/// memory on every worker thread; chat bodies are far below it and reuse their buffers.
const MAX_RETAINED_CAPACITY: usize = 1 << 20;

/// Feeds the canonical form of `json` into `hasher`, leaving out the top-level object members
/// whose key, as written, is in `ignored_top_level`.
///
/// `json` must be one JSON value (RFC 8259, UTF-8) with optional white space around it, nested
/// at most 128 deep; anything else is [`NotJson`].
///
/// On error nothing has been written; callers may hash the raw bytes with the same hasher.
pub fn hash_canonical_json<D: Digest>(
    json: &[u8],
    ignored_top_level: &[String],
    hasher: &mut D,
) -> Result<(), NotJson> {
    let run = |bufs: &mut Buffers, hasher: &mut D| {
        let result = write_canonical(json, ignored_top_level, bufs).map(|text| {
            hasher.update(text);
        });
        bufs.release_if_large();
        result
    };
    // The buffers are unavailable only while a thread is being torn down (or if a hasher's
    // `update` called back in here); fresh ones cost an allocation, nothing else.
    let pooled = BUFFERS.try_with(|cell| {
        let mut bufs = cell.try_borrow_mut().ok()?;
        Some(run(&mut bufs, &mut *hasher))
    });
    match pooled {
        Ok(Some(result)) => result,
        _ => run(&mut Buffers::default(), hasher),
    }
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// Working memory of one canonicalisation, reused across calls on a thread.
#[derive(Debug, Default)]
struct Buffers {
    /// The body without white space, when it has any.
    compact: Vec<u8>,
    /// The canonical text, when it differs from the compact one.
    sorted: Vec<u8>,
    /// Members of the objects being parsed, innermost object last.
    members: Vec<Member>,
    /// The objects to write member by member.
    unsorted: Vec<Unsorted>,
    /// Their members, sorted; [`Unsorted::members`] indexes into this.
    unsorted_members: Vec<Member>,
}

impl Buffers {
    fn release_if_large(&mut self) {
        fn release<T>(buf: &mut Vec<T>) {
            if buf.capacity() * size_of::<T>() > MAX_RETAINED_CAPACITY {
                *buf = Vec::new();
            }
        }
        release(&mut self.compact);
        release(&mut self.sorted);
        release(&mut self.members);
        release(&mut self.unsorted);
        release(&mut self.unsorted_members);
    }
}

/// One object member.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// Where the member (its key's opening quote) starts in the compact text.
    start: usize,
    /// Just past its value in the compact text.
    end: usize,
    /// Where the key, without quotes, starts in the body.
    key_start: usize,
    /// Where it ends in the body.
    key_end: usize,
}

impl Member {
    fn key<'a>(&self, src: &'a [u8]) -> &'a [u8] {
        &src[self.key_start..self.key_end]
    }
}

/// Byte order of two keys. Keys are mostly short and differ early; comparing them inline
/// saves a call to `memcmp` per comparison.
fn key_order(a: &[u8], b: &[u8]) -> Ordering {
    /// Keys at least this long on both sides go to `memcmp`.
    const INLINE: usize = 16;
    if a.len() >= INLINE && b.len() >= INLINE {
        return a.cmp(b);
    }
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

/// An object the second pass writes member by member, because its keys are out of order or it
/// has members to leave out; offsets are into the compact text.
#[derive(Debug, Clone)]
struct Unsorted {
    /// The `{`.
    open: usize,
    /// The `}`.
    close: usize,
    /// The members to write, in key order, in [`Buffers::unsorted_members`].
    members: Range<usize>,
    /// Once [`Buffers::unsorted`] is sorted, the index just past the objects nested in this one,
    /// which directly follow it.
    nested_end: usize,
}

/// Writes the canonical form of `json` and returns it.
fn write_canonical<'a>(
    json: &'a [u8],
    ignored_top_level: &[String],
    bufs: &'a mut Buffers,
) -> Result<&'a [u8], NotJson> {
    bufs.compact.clear();
    bufs.members.clear();
    bufs.unsorted.clear();
    bufs.unsorted_members.clear();
    // Non-ASCII is valid only inside strings, where it must be UTF-8, so checking the whole
    // body at once is the same as checking every string, and skipped for ASCII bodies.
    let (lowest, highest) = byte_range(json);
    if highest >= 0x80 && std::str::from_utf8(json).is_err() {
        return Err(NotJson);
    }
    let mut c = Canonicalizer {
        src: json,
        pos: 0,
        pending: 0,
        controls: lowest < 0x20,
        out: &mut bufs.compact,
        members: &mut bufs.members,
        unsorted: &mut bufs.unsorted,
        unsorted_members: &mut bufs.unsorted_members,
    };
    c.skip_ws();
    c.value(0, ignored_top_level)?;
    let end = c.pos;
    if !json[end..]
        .iter()
        .all(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
    {
        return Err(NotJson);
    }
    let compact: &[u8] = if c.out.is_empty() {
        &json[c.pending..end]
    } else {
        c.flush();
        &bufs.compact
    };
    if bufs.unsorted.is_empty() {
        return Ok(compact);
    }
    // Recorded innermost first; the walk below wants them in the order they start.
    let unsorted = &mut bufs.unsorted;
    unsorted.sort_unstable_by_key(|u| u.open);
    for i in 0..unsorted.len() {
        let close = unsorted[i].close;
        unsorted[i].nested_end = i + 1 + unsorted[i + 1..].partition_point(|u| u.open < close);
    }
    bufs.sorted.clear();
    bufs.sorted.reserve(compact.len());
    let reorder = Reorder {
        compact,
        unsorted: &bufs.unsorted,
        members: &bufs.unsorted_members,
    };
    reorder.write(0..compact.len(), 0..bufs.unsorted.len(), &mut bufs.sorted);
    Ok(&bufs.sorted)
}

/// The second pass: copies the compact text, writing the members of unsorted objects in order
/// and without the ignored ones.
struct Reorder<'a> {
    compact: &'a [u8],
    unsorted: &'a [Unsorted],
    members: &'a [Member],
}

impl Reorder<'_> {
    /// Copies `range` of the compact text, a run of whole values, to `out`; the unsorted
    /// objects inside it are among those at indexes `candidates`.
    fn write(&self, range: Range<usize>, candidates: Range<usize>, out: &mut Vec<u8>) {
        let mut copied = range.start;
        // Unsorted objects are disjoint or nested and sorted by start, so the ones inside
        // `range` are a run, and the ones inside one of those follow it directly.
        let mut next = candidates.start
            + self.unsorted[candidates.clone()].partition_point(|u| u.open < range.start);
        while let Some(object) = self.unsorted[..candidates.end]
            .get(next)
            .filter(|u| u.open < range.end)
        {
            out.extend_from_slice(&self.compact[copied..=object.open]);
            for (i, member) in self.members[object.members.clone()].iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let member_range = member.start..member.end;
                if object.nested_end == next + 1 {
                    out.extend_from_slice(&self.compact[member_range]);
                } else {
                    self.write(member_range, next + 1..object.nested_end, out);
                }
            }
            copied = object.close;
            next = object.nested_end;
        }
        out.extend_from_slice(&self.compact[copied..range.end]);
    }
}

/// The first pass: validates the body and computes its compact text, the body without white
/// space.
///
/// Bytes are not copied as they are parsed: `src[pending..pos]` is compact text not yet copied
/// to `out`, and is copied only when white space must be left out, so a compact body is never
/// copied.
struct Canonicalizer<'a> {
    src: &'a [u8],
    pos: usize,
    pending: usize,
    /// Whether the body has bytes below 0x20 anywhere. Compact bodies, the way SDKs send them,
    /// have none, and then strings need not be searched for control characters.
    controls: bool,
    out: &'a mut Vec<u8>,
    members: &'a mut Vec<Member>,
    unsorted: &'a mut Vec<Unsorted>,
    unsorted_members: &'a mut Vec<Member>,
}

impl Canonicalizer<'_> {
    /// Offset in the compact text of the byte at `pos`.
    fn out_pos(&self) -> usize {
        self.out.len() + (self.pos - self.pending)
    }

    fn flush(&mut self) {
        self.out
            .extend_from_slice(&self.src[self.pending..self.pos]);
        self.pending = self.pos;
    }

    fn skip_ws(&mut self) {
        let is_ws = |b: Option<&u8>| matches!(b, Some(b' ' | b'\n' | b'\r' | b'\t'));
        if is_ws(self.src.get(self.pos)) {
            self.flush();
            self.pos += 1;
            while is_ws(self.src.get(self.pos)) {
                self.pos += 1;
            }
            self.pending = self.pos;
        }
    }

    /// Parses the value at `pos` (white space already skipped); `depth` is the number of
    /// arrays and objects around it.
    fn value(&mut self, depth: usize, ignored: &[String]) -> Result<(), NotJson> {
        match self.src.get(self.pos) {
            Some(b'{') => self.object(depth, ignored),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(drop),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            _ => Err(NotJson),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), NotJson> {
        if !self.src[self.pos..].starts_with(word) {
            return Err(NotJson);
        }
        self.pos += word.len();
        Ok(())
    }

    fn number(&mut self) -> Result<(), NotJson> {
        let src = self.src;
        let mut i = self.pos;
        if src.get(i) == Some(&b'-') {
            i += 1;
        }
        match src.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits(src, i + 1),
            _ => return Err(NotJson),
        }
        if src.get(i) == Some(&b'.') {
            i = at_least_one_digit(src, i + 1)?;
        }
        if let Some(b'e' | b'E') = src.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = src.get(i) {
                i += 1;
            }
            i = at_least_one_digit(src, i)?;
        }
        self.pos = i;
        Ok(())
    }

    /// Parses the string at `pos` and returns where its contents are in the body.
    fn string(&mut self) -> Result<Range<usize>, NotJson> {
        let start = self.pos + 1;
        let close = scan_string(self.src, start, self.controls)?;
        self.pos = close + 1;
        Ok(start..close)
    }

    fn array(&mut self, depth: usize) -> Result<(), NotJson> {
        if depth >= MAX_DEPTH {
            return Err(NotJson);
        }
        self.pos += 1;
        self.skip_ws();
        if self.src.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.value(depth + 1, &[])?;
            self.skip_ws();
            match self.src.get(self.pos) {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(NotJson),
            }
        }
    }

    /// Parses an object; if its keys are out of order or some are in `ignored`, records it for
    /// [`Reorder`] to write member by member.
    fn object(&mut self, depth: usize, ignored: &[String]) -> Result<(), NotJson> {
        if depth >= MAX_DEPTH {
            return Err(NotJson);
        }
        let open = self.out_pos();
        self.pos += 1;
        self.skip_ws();
        if self.src.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(());
        }
        // Members of objects nested in this one are pushed above `base` and popped again
        // before their object returns.
        let base = self.members.len();
        let mut in_order = true;
        let mut left_out = false;
        loop {
            if self.src.get(self.pos) != Some(&b'"') {
                return Err(NotJson);
            }
            let start = self.out_pos();
            let key = self.string()?;
            self.skip_ws();
            if self.src.get(self.pos) != Some(&b':') {
                return Err(NotJson);
            }
            self.pos += 1;
            self.skip_ws();
            self.value(depth + 1, &[])?;
            let member = Member {
                start,
                end: self.out_pos(),
                key_start: key.start,
                key_end: key.end,
            };
            let key = member.key(self.src);
            if !ignored.is_empty() && ignored.iter().any(|k| k.as_bytes() == key) {
                // Its bytes stay in the compact text; the second pass writes this object
                // from its member list, which does not have it.
                left_out = true;
            } else {
                if let Some(prev) = self.members[base..].last() {
                    in_order &= key_order(prev.key(self.src), key).is_le();
                }
                self.members.push(member);
            }
            self.skip_ws();
            match self.src.get(self.pos) {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(NotJson),
            }
        }
        if !in_order || left_out {
            if !in_order {
                let src = self.src;
                // Stable, so members with equal keys keep the order they were written in.
                self.members[base..].sort_by(|a, b| key_order(a.key(src), b.key(src)));
            }
            let from = self.unsorted_members.len();
            self.unsorted_members
                .extend_from_slice(&self.members[base..]);
            self.unsorted.push(Unsorted {
                open,
                close: self.out_pos() - 1,
                members: from..self.unsorted_members.len(),
                nested_end: 0,
            });
        }
        self.members.truncate(base);
        Ok(())
    }
}

fn digits(src: &[u8], mut i: usize) -> usize {
    while let Some(b'0'..=b'9') = src.get(i) {
        i += 1;
    }
    i
}

fn at_least_one_digit(src: &[u8], i: usize) -> Result<usize, NotJson> {
    let end = digits(src, i);
    if end > i {
        Ok(end)
    } else {
        Err(NotJson)
    }
}

/// Validates the string whose contents start at `start` and returns the index of its closing
/// quote.
///
/// Jumps from one quote or backslash to the next with a vectorised search (memchr); a long
/// prompt with no escapes is one search at many times the speed of SHA-256. The bytes jumped
/// over are tested for control characters only when the body has any (see
/// [`Canonicalizer::controls`]).
fn scan_string(src: &[u8], start: usize, controls: bool) -> Result<usize, NotJson> {
    let mut i = start;
    loop {
        let rest = &src[i..];
        let k = find_quote_or_backslash(rest).ok_or(NotJson)?;
        // A min fold, unlike `any`, has no early exit and so compiles to vector compares.
        if controls && rest[..k].iter().fold(u8::MAX, |m, &b| m.min(b)) < 0x20 {
            return Err(NotJson);
        }
        i += k;
        if rest[k] == b'"' {
            return Ok(i);
        }
        i = escape(src, i)?;
    }
}

/// Index of the first `"` or `\\` in `haystack`.
///
/// On x86-64 this is memchr's SSE2 searcher, which always exists there and inlines, where
/// `memchr2` picks AVX2 at run time through a function pointer: most searches here end at an
/// escape or a closing quote a few dozen bytes on, where the call costs more than the wider
/// vectors save.
#[cfg(target_arch = "x86_64")]
fn find_quote_or_backslash(haystack: &[u8]) -> Option<usize> {
    match memchr::arch::x86_64::sse2::memchr::Two::new(b'"', b'\\') {
        Some(searcher) => searcher.find(haystack),
        None => memchr::memchr2(b'"', b'\\', haystack),
    }
}

/// Index of the first `"` or `\\` in `haystack`.
#[cfg(not(target_arch = "x86_64"))]
fn find_quote_or_backslash(haystack: &[u8]) -> Option<usize> {
    memchr::memchr2(b'"', b'\\', haystack)
}

/// Length of the escape that starts with a backslash and the byte indexing this table, 0 if
/// that is no escape; a table rather than a `match` so the common escapes take no branch.
const ESCAPE_LEN: [u8; 256] = {
    let mut table = [0; 256];
    let mut simple: &[u8] = b"\"\\/bfnrt";
    while let [c, rest @ ..] = simple {
        table[*c as usize] = 2;
        simple = rest;
    }
    table[b'u' as usize] = 6;
    table
};

/// Validates the escape at `i` (a backslash) and returns the index just past it.
fn escape(src: &[u8], i: usize) -> Result<usize, NotJson> {
    let len = src.get(i + 1).map_or(0, |&c| ESCAPE_LEN[usize::from(c)]);
    match len {
        2 => Ok(i + 2),
        6 => match src.get(i + 2..i + 6) {
            Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => Ok(i + 6),
            _ => Err(NotJson),
        },
        _ => Err(NotJson),
    }
}

/// The smallest and the largest byte of `bytes`, in one vectorised pass.
fn byte_range(bytes: &[u8]) -> (u8, u8) {
    let (mut lo, mut hi) = (u8::MAX, 0u8);
    for &b in bytes {
        lo = lo.min(b);
        hi = hi.max(b);
    }
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use sha2::Sha256;

    use super::*;

    fn canonical(json: &str, ignored: &[&str]) -> Result<String, NotJson> {
        let ignored: Vec<String> = ignored.iter().map(|s| (*s).to_owned()).collect();
        let mut bufs = Buffers::default();
        let text = write_canonical(json.as_bytes(), &ignored, &mut bufs)?;
        Ok(String::from_utf8(text.to_vec()).expect("canonical JSON is UTF-8"))
    }

    fn key(json: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        hash_canonical_json(json.as_bytes(), &[], &mut h).expect("valid JSON");
        h.finalize().into()
    }

    /// The implementation this module replaced: parse with serde_json, write back sorted. It
    /// agrees with the fast one wherever escapes and numbers are written the way serde_json
    /// writes them and no key repeats.
    fn reference(json: &[u8], ignored: &[&str]) -> Option<Vec<u8>> {
        fn write(v: &serde_json::Value, out: &mut Vec<u8>) {
            match v {
                serde_json::Value::Object(map) => {
                    let mut members: Vec<_> = map.iter().collect();
                    members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                    out.push(b'{');
                    for (i, (k, v)) in members.into_iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(serde_json::to_string(k).unwrap().as_bytes());
                        out.push(b':');
                        write(v, out);
                    }
                    out.push(b'}');
                }
                serde_json::Value::Array(items) => {
                    out.push(b'[');
                    for (i, v) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        write(v, out);
                    }
                    out.push(b']');
                }
                other => out.extend_from_slice(other.to_string().as_bytes()),
            }
        }
        let mut value: serde_json::Value = serde_json::from_slice(json).ok()?;
        if let serde_json::Value::Object(map) = &mut value {
            for k in ignored {
                map.remove(*k);
            }
        }
        let mut out = Vec::new();
        write(&value, &mut out);
        Some(out)
    }

    const CHAT: &str = r#"{
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse.\nAnswer in \"one\" line."},
            {"role": "user", "content": "Weather in Paris, café included? \u00e9"}
        ],
        "temperature": 0.7,
        "max_tokens": 512,
        "stream": false,
        "user": "u-1",
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "required": ["location"],
                "properties": {"location": {"type": "string"}}}}}],
        "response_format": null
    }"#;

    #[test]
    fn key_order_and_white_space_do_not_matter() {
        assert_eq!(
            canonical(" {\"b\" :\t[1, 2],\r\n\"a\":{ }} \n", &[]).unwrap(),
            r#"{"a":{},"b":[1,2]}"#
        );
        assert_eq!(key(r#"{"a":1,"b":2}"#), key("{ \"b\": 2,\n  \"a\": 1 }"));
        assert_eq!(key("[ ]"), key("[]"));
    }

    #[test]
    fn nested_objects_are_sorted() {
        assert_eq!(
            canonical(
                r#"{"z":{"y":[{"b":1,"a":2}],"x":{"d":{"f":0,"e":1},"c":3}},"a":0}"#,
                &[]
            )
            .unwrap(),
            r#"{"a":0,"z":{"x":{"c":3,"d":{"e":1,"f":0}},"y":[{"a":2,"b":1}]}}"#
        );
    }

    #[test]
    fn keys_sort_by_their_bytes_without_quotes() {
        // With the quotes, `a"` would sort after `a!`.
        assert_eq!(
            canonical(r#"{"a!":1,"a":2}"#, &[]).unwrap(),
            r#"{"a":2,"a!":1}"#
        );
        assert_eq!(
            canonical(r#"{"é":1,"z":2,"Z":3,"":4}"#, &[]).unwrap(),
            r#"{"":4,"Z":3,"z":2,"é":1}"#
        );
    }

    #[test]
    fn deeply_nested_unsorted_objects_are_sorted_at_every_level() {
        let depth = MAX_DEPTH - 1;
        let text = "x".repeat(1000);
        let doc = format!(
            "{}\"{text}\"{}",
            "{\"b\":".repeat(depth),
            ",\"a\":0}".repeat(depth)
        );
        let expected = format!(
            "{}\"{text}\"{}",
            "{\"a\":0,\"b\":".repeat(depth),
            "}".repeat(depth)
        );
        assert_eq!(canonical(&doc, &[]).unwrap(), expected);
    }

    #[test]
    fn duplicate_keys_are_all_kept_in_written_order() {
        assert_eq!(
            canonical(r#"{"b":1,"a":2,"b":0}"#, &[]).unwrap(),
            r#"{"a":2,"b":1,"b":0}"#
        );
        assert_ne!(key(r#"{"a":1,"a":2}"#), key(r#"{"a":2,"a":1}"#));
        assert_ne!(key(r#"{"a":1,"a":1}"#), key(r#"{"a":1}"#));
    }

    #[test]
    fn array_order_matters() {
        assert_ne!(key("[1,2]"), key("[2,1]"));
        assert_ne!(
            key(r#"{"messages":[{"role":"user"},{"role":"system"}]}"#),
            key(r#"{"messages":[{"role":"system"},{"role":"user"}]}"#)
        );
    }

    #[test]
    fn every_value_change_matters() {
        let variants = [
            CHAT.to_owned(),
            CHAT.replace("gpt-4o-mini", "gpt-4o"),
            CHAT.replace("0.7", "0.70"),
            CHAT.replace("0.7", "0.8"),
            CHAT.replace("512", "513"),
            CHAT.replace("512", "\"512\""),
            CHAT.replace("false", "true"),
            CHAT.replace("null", "\"null\""),
            CHAT.replace("null", "{}"),
            CHAT.replace("terse", "Terse"),
            CHAT.replace("\\nAnswer", "\\u000aAnswer"),
            CHAT.replace("\"role\": \"system\"", "\"role\": \"developer\""),
            CHAT.replace("\"u-1\"", "\"u-2\""),
            CHAT.replace("[\"location\"]", "[]"),
            CHAT.replace("[\"location\"]", "[\"location\",\"location\"]"),
            CHAT.replace("\"stream\"", "\"Stream\""),
            CHAT.replace(",\n        \"response_format\": null", ""),
            CHAT.replace("\"temperature\": 0.7", "\"temperature\": [0.7]"),
            CHAT.replace("\"messages\": [", "\"messages\": [{},"),
        ];
        let keys: HashSet<_> = variants.iter().map(|v| key(v)).collect();
        assert_eq!(keys.len(), variants.len());
    }

    #[test]
    fn ignored_fields_are_dropped_only_at_the_top_level() {
        let ignored = &["user"];
        assert_eq!(
            canonical(r#"{"user":"a","model":"m"}"#, ignored).unwrap(),
            r#"{"model":"m"}"#
        );
        assert_eq!(
            canonical(r#"{"model":"m","user":{"id":[1]}}"#, ignored).unwrap(),
            r#"{"model":"m"}"#
        );
        assert_eq!(
            canonical(r#"{"b":1,"user":2,"a":3}"#, ignored).unwrap(),
            r#"{"a":3,"b":1}"#
        );
        assert_eq!(canonical(r#"{"user":2,"user":3}"#, ignored).unwrap(), "{}");
        // Unsorted objects inside a dropped member are forgotten with it.
        assert_eq!(
            canonical(r#"{"user":{"b":1,"a":2},"z":{"d":1,"c":2},"m":0}"#, ignored).unwrap(),
            r#"{"m":0,"z":{"c":2,"d":1}}"#
        );
        assert_eq!(
            canonical(r#"{"x":{"user":"a"}}"#, ignored).unwrap(),
            r#"{"x":{"user":"a"}}"#
        );
        assert_eq!(
            canonical(r#"[{"user":"a"}]"#, ignored).unwrap(),
            r#"[{"user":"a"}]"#
        );
        // Matched as written: an escaped spelling is kept (a miss, never a wrong hit).
        assert_eq!(
            canonical(r#"{"us\u0065r":"a"}"#, ignored).unwrap(),
            r#"{"us\u0065r":"a"}"#
        );
        // An ignored member is still validated.
        assert_eq!(canonical(r#"{"user":[1,}"#, ignored), Err(NotJson));
    }

    #[test]
    fn strings_and_numbers_are_kept_as_written() {
        let doc = r#"[1.0,1E5,-0,0.5e-3,"\u00E9\/\b\f\n\r\t\\\"","é😀"]"#;
        assert_eq!(canonical(doc, &[]).unwrap(), doc);
        assert_ne!(key(r#"{"a":"é"}"#), key(r#"{"a":"\u00e9"}"#));
    }

    #[test]
    fn scalars_at_the_top_level_are_json() {
        for doc in ["1", "-2.5e+3", "\"s\"", "true", "false", "null", " null "] {
            assert_eq!(canonical(doc, &[]).unwrap(), doc.trim(), "{doc}");
        }
    }

    #[test]
    fn invalid_json_is_refused() {
        let long_string = format!("[\"{}", "a".repeat(100));
        let bad = [
            "",
            "   ",
            "{} x",
            "{}{}",
            "[1] ]",
            "\"abc",
            long_string.as_str(),
            r#"{"a":"b}"#,
            r#"["\x"]"#,
            r#"["\u12"]"#,
            r#"["\u12g4"]"#,
            r#"["\"]"#,
            "[\"a\u{1}b\"]",
            "[\"tab\there\"]",
            "[\"new\nline\"]",
            "[01]",
            "[-01]",
            "-",
            "[-]",
            "[1.]",
            "[.5]",
            "[1e]",
            "[1e+]",
            "[+1]",
            "[0x10]",
            "[NaN]",
            "[Infinity]",
            "[tru]",
            "[True]",
            "[nul]",
            "[1,]",
            "[,1]",
            "[1 2]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{\"a\":}",
            "{a:1}",
            "{'a':1}",
            "{1:1}",
            "{\"a\":1",
            "[\u{c}]",
            "[\u{a0}1]",
            "\u{feff}{}",
            "[é]",
        ];
        for doc in bad {
            assert_eq!(canonical(doc, &[]), Err(NotJson), "{doc:?}");
        }
        // Invalid UTF-8 in a string, in a chunk and in the scalar tail.
        let mut bytes = format!("[\"{}\u{e9}\"]", "a".repeat(40)).into_bytes();
        let at = bytes.len() - 3;
        bytes[at] = 0xff;
        let mut bufs = Buffers::default();
        assert_eq!(write_canonical(&bytes, &[], &mut bufs), Err(NotJson));
        assert_eq!(write_canonical(b"[\"\xc3\"]", &[], &mut bufs), Err(NotJson));
        assert_eq!(
            write_canonical(b"[\"\xed\xa0\x80\"]", &[], &mut bufs),
            Err(NotJson)
        );
    }

    #[test]
    fn nesting_is_limited_without_overflowing_the_stack() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(canonical(&nested(MAX_DEPTH), &[]).is_ok());
        assert_eq!(canonical(&nested(MAX_DEPTH + 1), &[]), Err(NotJson));
        assert_eq!(canonical(&"[".repeat(1_000_000), &[]), Err(NotJson));
        assert_eq!(canonical(&"{\"a\":".repeat(1_000_000), &[]), Err(NotJson));
        let objects = format!("{}1{}", "{\"a\":".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(canonical(&objects, &[]).is_ok());
    }

    #[test]
    fn hashes_exactly_the_canonical_text() {
        let mut h = Sha256::new();
        hash_canonical_json(CHAT.as_bytes(), &["user".to_owned()], &mut h).unwrap();
        let text = canonical(CHAT, &["user"]).unwrap();
        assert_eq!(h.finalize(), Sha256::digest(text.as_bytes()));
        // An error in between leaves the per-thread buffers fit for the next call.
        assert_eq!(
            hash_canonical_json(br#"{"b":{"a":[1,"#, &[], &mut Sha256::new()),
            Err(NotJson)
        );
        let mut h = Sha256::new();
        hash_canonical_json(CHAT.as_bytes(), &["user".to_owned()], &mut h).unwrap();
        assert_eq!(h.finalize(), Sha256::digest(text.as_bytes()));
    }

    #[test]
    fn matches_the_serde_json_reference_on_samples() {
        // serde_json writes `\u00e9` back as `é`.
        let chat = CHAT.replace(" \\u00e9", "");
        let samples = [
            chat.as_str(),
            "{}",
            "[]",
            r#"{"a":[],"b":{},"c":[{}],"d":[[]]}"#,
            r#"[{"b":1,"a":2},{"d":[3,{"f":null,"e":true}],"c":false}]"#,
            r#"{"temperature":0.2,"top_p":1,"n":-3,"seed":12345678901234}"#,
            r#"{"s":"quote \" backslash \\ newline \n tab \t ctl \u001f","é":"ü"}"#,
            r#"{"model":"m","messages":[{"content":"hi","role":"user"}],"stream":true}"#,
        ];
        for doc in samples {
            assert_eq!(
                canonical(doc, &[]).unwrap().into_bytes(),
                reference(doc.as_bytes(), &[]).unwrap(),
                "{doc}"
            );
            assert_eq!(
                canonical(doc, &["user", "model"]).unwrap().into_bytes(),
                reference(doc.as_bytes(), &["user", "model"]).unwrap(),
                "{doc}"
            );
        }
    }

    /// xorshift64: random enough for test documents, and no dev-dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// Generates a value and writes it twice, with independently shuffled members and white
    /// space; escapes and numbers are written the way serde_json writes them, keys are unique
    /// within an object and need no escapes (which would sort differently once decoded).
    fn random_value(rng: &mut Rng, depth: usize, a: &mut String, b: &mut String) {
        let kind = if depth >= 5 {
            rng.below(4)
        } else {
            rng.below(6)
        };
        match kind {
            0 => {
                let lit = *rng.pick(&["true", "false", "null"]);
                a.push_str(lit);
                b.push_str(lit);
            }
            1 => {
                let n = match rng.below(3) {
                    0 => (rng.next() as i64).to_string(),
                    1 => (rng.below(1000) as i64 - 500).to_string(),
                    _ => serde_json::to_string(&((rng.below(4000) as f64 - 2000.0) / 8.0)).unwrap(),
                };
                a.push_str(&n);
                b.push_str(&n);
            }
            2 | 3 => {
                let s = serde_json::to_string(&random_text(rng)).unwrap();
                a.push_str(&s);
                b.push_str(&s);
            }
            4 => {
                let n = rng.below(5);
                a.push('[');
                b.push('[');
                for i in 0..n {
                    if i > 0 {
                        a.push(',');
                        b.push(',');
                    }
                    random_ws(rng, a);
                    random_ws(rng, b);
                    random_value(rng, depth + 1, a, b);
                    random_ws(rng, a);
                    random_ws(rng, b);
                }
                a.push(']');
                b.push(']');
            }
            _ => {
                let mut keys: Vec<String> = (0..rng.below(6)).map(|_| random_key(rng)).collect();
                keys.sort();
                keys.dedup();
                let members: Vec<(String, String, String)> = keys
                    .into_iter()
                    .map(|k| {
                        let (mut va, mut vb) = (String::new(), String::new());
                        random_value(rng, depth + 1, &mut va, &mut vb);
                        (serde_json::to_string(&k).unwrap(), va, vb)
                    })
                    .collect();
                for (out, pick_b) in [(&mut *a, false), (&mut *b, true)] {
                    let mut order: Vec<usize> = (0..members.len()).collect();
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.below(i + 1));
                    }
                    out.push('{');
                    for (i, &m) in order.iter().enumerate() {
                        let (k, va, vb) = &members[m];
                        if i > 0 {
                            out.push(',');
                        }
                        random_ws(rng, out);
                        out.push_str(k);
                        random_ws(rng, out);
                        out.push(':');
                        random_ws(rng, out);
                        out.push_str(if pick_b { vb } else { va });
                        random_ws(rng, out);
                    }
                    out.push('}');
                }
            }
        }
    }

    fn random_text(rng: &mut Rng) -> String {
        const PIECES: &[&str] = &[
            "a", "b", "A", " ", "!", "\"", "\\", "/", "\n", "\t", "\u{1}", "\u{1f}", "é", "😀",
            "model", "messages", "user", "0", "~", "\u{7f}",
        ];
        let len = match rng.below(8) {
            0 => 40 + rng.below(100),
            _ => rng.below(6),
        };
        (0..len).map(|_| *rng.pick(PIECES)).collect()
    }

    fn random_key(rng: &mut Rng) -> String {
        const PIECES: &[&str] = &[
            "a", "b", "A", " ", "!", "/", "é", "😀", "model", "user", "0", "~", "\u{7f}",
        ];
        (0..rng.below(5)).map(|_| *rng.pick(PIECES)).collect()
    }

    fn random_ws(rng: &mut Rng, out: &mut String) {
        for _ in 0..rng.below(4).saturating_sub(1) {
            out.push(*rng.pick(&[' ', '\n', '\r', '\t']));
        }
    }

    #[test]
    fn random_documents_match_the_reference() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let (mut a, mut b) = (String::new(), String::new());
            random_ws(&mut rng, &mut a);
            random_value(&mut rng, 0, &mut a, &mut b);
            random_ws(&mut rng, &mut b);
            let ignored: &[&str] = if rng.below(2) == 0 {
                &[]
            } else {
                &["user", "a"]
            };
            let expected = reference(a.as_bytes(), ignored).expect("generated JSON is valid");
            assert_eq!(
                canonical(&a, ignored).unwrap().into_bytes(),
                expected,
                "{a}"
            );
            assert_eq!(
                canonical(&b, ignored).unwrap().into_bytes(),
                expected,
                "{b}"
            );
        }
    }

    /// Mutated documents: accepted exactly when serde_json accepts them, and when accepted the
    /// canonical text reads back as the same value.
    #[test]
    fn mutated_documents_agree_with_serde_json() {
        const BYTES: &[u8] = b"{}[]\",:\\/0123456789-+.eEtrufalsn \n\x01\x7f\xc3\xa9";
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut bufs = Buffers::default();
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let (mut a, mut b) = (String::new(), String::new());
            random_value(&mut rng, 0, &mut a, &mut b);
            let mut doc = a.into_bytes();
            for _ in 0..1 + rng.below(2) {
                let at = rng.below(doc.len() + 1);
                let byte = *rng.pick(BYTES);
                match rng.below(3) {
                    0 if at < doc.len() => doc[at] = byte,
                    1 if at < doc.len() => {
                        doc.remove(at);
                    }
                    _ => doc.insert(at, byte),
                }
            }
            let ours = write_canonical(&doc, &[], &mut bufs);
            let theirs = serde_json::from_slice::<serde_json::Value>(&doc);
            match (&ours, &theirs) {
                (Ok(text), Ok(value)) => {
                    accepted += 1;
                    let back: serde_json::Value =
                        serde_json::from_slice(text).expect("canonical text is JSON");
                    assert_eq!(&back, value, "{}", String::from_utf8_lossy(&doc));
                }
                (Err(NotJson), Err(_)) => refused += 1,
                // Valid JSON that serde_json refuses to turn into a `Value`.
                (Ok(_), Err(e))
                    if e.to_string().contains("out of range")
                        || e.to_string().contains("surrogate") => {}
                _ => panic!(
                    "ours {ours:?}, serde_json {theirs:?}: {}",
                    String::from_utf8_lossy(&doc)
                ),
            }
        }
        assert!(accepted > 1000 && refused > 1000, "{accepted} {refused}");
    }
}
