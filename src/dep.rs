//! Dependencies: the pieces of data a cached response was computed from.

use std::fmt;

/// The dependency every entry records automatically. Invalidating it retires a whole tenant
/// (DESIGN section 4, rule 6).
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
