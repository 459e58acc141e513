//! Canonical JSON, fed straight into a hasher.
//!
//! Object members are emitted in byte order of their keys, insignificant white space is dropped,
//! and everything else (strings with their escapes as written, numbers as written) is kept, so
//! two bodies hash alike exactly when they differ only in key order and white space.

use sha2::Digest;

/// The body is not valid JSON; the caller falls back to hashing raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJson;

/// Feeds the canonical form of `json` into `hasher`, leaving out the top-level object members
/// whose key is in `ignored_top_level`.
///
/// On error nothing useful has been written; callers must start a fresh hasher.
pub fn hash_canonical_json<D: Digest>(
    json: &[u8],
    ignored_top_level: &[String],
    hasher: &mut D,
) -> Result<(), NotJson> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|_| NotJson)?;
    let value = match value {
        serde_json::Value::Object(mut map) if !ignored_top_level.is_empty() => {
            for k in ignored_top_level {
                map.remove(k);
            }
            serde_json::Value::Object(map)
        }
        v => v,
    };
    let mut out = Vec::with_capacity(json.len());
    write_sorted(&value, &mut out);
    hasher.update(&out);
    Ok(())
}

fn write_sorted(v: &serde_json::Value, out: &mut Vec<u8>) {
    match v {
        serde_json::Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(serde_json::to_string(k).unwrap_or_default().as_bytes());
                out.push(b':');
                write_sorted(v, out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(v, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}
