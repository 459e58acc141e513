//! Dependencies: the pieces of data a cached response was computed from.

use std::fmt;

/// The dependency every entry records automatically. Invalidating it retires a whole tenant
/// (docs/design.md §4, rule 6).
pub const POLICY_DEP: &str = "cc:policy-version";

/// Longest dep id accepted, in bytes. Ids are stored inside store keys; anything longer is a
/// caller bug rather than a real identifier.
pub const MAX_DEP_ID_LEN: usize = 512;

/// A piece of data a response was derived from, with the version of it the caller knows.
///
/// ```
/// use cachecore::Dep;
/// let dep = Dep::new("doc:contract-123").hash("v1");
/// assert_eq!(dep.id(), "doc:contract-123");
/// assert_eq!(dep.expected_hash(), Some("v1"));
/// ```
///
/// The pair `(id, hash)` is part of the cache key: callers that pin different versions of the
/// same data never share an entry. Invalidating the id drops every entry that declared it,
/// whatever hash it pinned.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dep {
    id: String,
    hash: Option<String>,
}

impl Dep {
    /// A dependency on `id` (for example `doc:contract-123` or `table:products`).
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            hash: None,
        }
    }

    /// Pins the version of the data this request was built from.
    #[must_use]
    pub fn hash(mut self, hash: impl Into<String>) -> Self {
        self.hash = Some(hash.into());
        self
    }

    /// The dependency id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pinned version, if any.
    pub fn expected_hash(&self) -> Option<&str> {
        self.hash.as_deref()
    }
}

impl fmt::Debug for Dep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.hash {
            Some(h) => write!(f, "Dep({}@{})", self.id, h),
            None => write!(f, "Dep({})", self.id),
        }
    }
}

/// Why a dep id was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidDepId {
    /// The id is the empty string.
    Empty,
    /// The id is longer than [`MAX_DEP_ID_LEN`] bytes.
    TooLong(usize),
    /// The id contains an ASCII control character (which would corrupt logs and store keys).
    ControlCharacter,
}

impl fmt::Display for InvalidDepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("dep id is empty"),
            Self::TooLong(n) => {
                write!(f, "dep id is {n} bytes long; the limit is {MAX_DEP_ID_LEN}")
            }
            Self::ControlCharacter => f.write_str("dep id contains a control character"),
        }
    }
}

impl std::error::Error for InvalidDepId {}

/// Checks that `id` can be used as a dep id.
pub fn validate_dep_id(id: &str) -> Result<(), InvalidDepId> {
    if id.is_empty() {
        return Err(InvalidDepId::Empty);
    }
    if id.len() > MAX_DEP_ID_LEN {
        return Err(InvalidDepId::TooLong(id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err(InvalidDepId::ControlCharacter);
    }
    Ok(())
}

/// Longest `new_hash` accepted, in bytes. A version is a digest, an ETag or a timestamp: a
/// SHA-512 in hex is 128 bytes, and twice that leaves room for an algorithm prefix or a
/// composite version (`<etag>@<time>`). It is copied into every `dep:ver` value and can travel
/// in request headers, so a bound keeps both small.
pub const MAX_NEW_HASH_LEN: usize = 256;

/// Why a `new_hash` (the version recorded by an invalidation) was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidNewHash {
    /// The hash is the empty string. Leave it out instead: a random one is recorded.
    Empty,
    /// The hash is longer than [`MAX_NEW_HASH_LEN`] bytes.
    TooLong(usize),
    /// The byte at this offset is white space (a space, tab or line break).
    Whitespace(usize),
    /// The byte at this offset is an ASCII control character.
    ControlCharacter(usize),
    /// The byte at this offset is not ASCII.
    NonAscii(usize),
}

impl fmt::Display for InvalidNewHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const ALLOWED: &str = "only printable ASCII without spaces is allowed";
        match self {
            Self::Empty => f.write_str("new_hash is empty; leave it out to record a random one"),
            Self::TooLong(n) => write!(
                f,
                "new_hash is {n} bytes long; the limit is {MAX_NEW_HASH_LEN}"
            ),
            Self::Whitespace(at) => write!(f, "new_hash has white space at byte {at}; {ALLOWED}"),
            Self::ControlCharacter(at) => {
                write!(
                    f,
                    "new_hash has a control character at byte {at}; {ALLOWED}"
                )
            }
            Self::NonAscii(at) => write!(f, "new_hash has a non-ASCII byte at {at}; {ALLOWED}"),
        }
    }
}

impl std::error::Error for InvalidNewHash {}

/// Checks that `hash` can be recorded as the `new_hash` of an invalidation.
///
/// A hash is 1 to [`MAX_NEW_HASH_LEN`] bytes of printable ASCII (`!` to `~`): no white space,
/// no control characters, nothing outside ASCII. It travels in HTTP headers, JSON, Redis
/// values and log lines, and must read the same in all of them.
///
/// ```
/// use cachecore::{validate_new_hash, InvalidNewHash};
/// assert!(validate_new_hash("sha256:9f86d081884c7d65").is_ok());
/// assert_eq!(validate_new_hash("v 2"), Err(InvalidNewHash::Whitespace(1)));
/// ```
pub fn validate_new_hash(hash: &str) -> Result<(), InvalidNewHash> {
    if hash.is_empty() {
        return Err(InvalidNewHash::Empty);
    }
    if hash.len() > MAX_NEW_HASH_LEN {
        return Err(InvalidNewHash::TooLong(hash.len()));
    }
    match hash.bytes().position(|b| !b.is_ascii_graphic()) {
        None => Ok(()),
        Some(at) => Err(match hash.as_bytes()[at] {
            b if b.is_ascii_whitespace() => InvalidNewHash::Whitespace(at),
            b if b.is_ascii_control() => InvalidNewHash::ControlCharacter(at),
            _ => InvalidNewHash::NonAscii(at),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical_versions_are_valid_new_hashes() {
        for hash in [
            "v2",
            "7",
            "2024-06-01T12:00:00Z",
            "\"33a64df551425fcc55e4d42a148795d9f25f89d4\"",
            "W/\"etag\"",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "!~",
        ] {
            assert_eq!(validate_new_hash(hash), Ok(()), "{hash:?}");
        }
        assert_eq!(validate_new_hash(&"f".repeat(MAX_NEW_HASH_LEN)), Ok(()));
    }

    #[test]
    fn an_empty_new_hash_is_rejected() {
        assert_eq!(validate_new_hash(""), Err(InvalidNewHash::Empty));
    }

    #[test]
    fn a_new_hash_over_the_limit_is_rejected() {
        let long = "a".repeat(MAX_NEW_HASH_LEN + 1);
        assert_eq!(
            validate_new_hash(&long),
            Err(InvalidNewHash::TooLong(MAX_NEW_HASH_LEN + 1))
        );
        // The limit is in bytes, not characters.
        let wide = "é".repeat(MAX_NEW_HASH_LEN);
        assert_eq!(
            validate_new_hash(&wide),
            Err(InvalidNewHash::TooLong(2 * MAX_NEW_HASH_LEN))
        );
    }

    #[test]
    fn white_space_in_a_new_hash_is_rejected_where_it_is() {
        for (hash, at) in [(" v2", 0), ("v 2", 1), ("v2\t", 2), ("v\n2", 1), ("v\r", 1)] {
            assert_eq!(
                validate_new_hash(hash),
                Err(InvalidNewHash::Whitespace(at)),
                "{hash:?}"
            );
        }
        // Unicode white space is not ASCII either.
        assert_eq!(
            validate_new_hash("v\u{a0}2"),
            Err(InvalidNewHash::NonAscii(1))
        );
    }

    #[test]
    fn control_characters_in_a_new_hash_are_rejected() {
        for (hash, at) in [("\0", 0), ("v2\u{1b}[0m", 2), ("v\u{7f}", 1), ("v\u{b}", 1)] {
            assert_eq!(
                validate_new_hash(hash),
                Err(InvalidNewHash::ControlCharacter(at)),
                "{hash:?}"
            );
        }
    }

    #[test]
    fn non_ascii_in_a_new_hash_is_rejected() {
        assert_eq!(
            validate_new_hash("versión"),
            Err(InvalidNewHash::NonAscii(5))
        );
        assert_eq!(
            validate_new_hash("\u{200b}"),
            Err(InvalidNewHash::NonAscii(0))
        );
    }

    #[test]
    fn new_hash_errors_say_what_is_wrong() {
        assert_eq!(
            InvalidNewHash::TooLong(300).to_string(),
            format!("new_hash is 300 bytes long; the limit is {MAX_NEW_HASH_LEN}")
        );
        assert_eq!(
            InvalidNewHash::Whitespace(1).to_string(),
            "new_hash has white space at byte 1; only printable ASCII without spaces is allowed"
        );
        assert!(InvalidNewHash::Empty.to_string().contains("empty"));
        assert!(InvalidNewHash::ControlCharacter(0)
            .to_string()
            .contains("control character at byte 0"));
        assert!(InvalidNewHash::NonAscii(4)
            .to_string()
            .contains("non-ASCII"));
    }
}
