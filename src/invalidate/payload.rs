//! The JSON bodies of `POST /v1/invalidate` (docs/design.md §8).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, MAX_BATCH};
use crate::{validate_dep_id, DepError, DepInvalidated};

/// A request, validated whole before anything is invalidated.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InvalidateRequest {
    /// `{"dep_id": "...", "new_hash": "..."?}`
    Single {
        dep_id: String,
        new_hash: Option<String>,
    },
    /// `{"dep_ids": [...], "new_hash": "..."?}`
    Batch {
        dep_ids: Vec<String>,
        new_hash: Option<String>,
    },
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl InvalidateRequest {
    /// Parses and validates a body: 400 for JSON that is malformed or of the wrong shape, 422
    /// for values out of range.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| ApiError::malformed_json(&e))?;
        let Value::Object(mut obj) = value else {
            return Err(ApiError::invalid_request(format!(
                "body must be a JSON object, got {}",
                type_name(&value)
            )));
        };
        let new_hash = match obj.remove("new_hash") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(ApiError::invalid_request(format!(
                    "new_hash must be a string or null, got {}",
                    type_name(&other)
                )))
            }
        };
        let req = match (obj.remove("dep_id"), obj.remove("dep_ids")) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_request(
                    "give either dep_id or dep_ids, not both",
                ))
            }
            (None, None) => {
                return Err(ApiError::invalid_request(
                    "missing field: give dep_id (a string) or dep_ids (an array of strings)",
                ))
            }
            (Some(Value::String(dep_id)), None) => Self::Single { dep_id, new_hash },
            (Some(other), None) => {
                return Err(ApiError::invalid_request(format!(
                    "dep_id must be a string, got {}",
                    type_name(&other)
                )))
            }
            (None, Some(Value::Array(items))) => {
                let dep_ids = items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok(s),
                        other => Err(ApiError::invalid_request(format!(
                            "dep_ids[{i}] must be a string, got {}",
                            type_name(&other)
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Self::Batch { dep_ids, new_hash }
            }
            (None, Some(other)) => {
                return Err(ApiError::invalid_request(format!(
                    "dep_ids must be an array of strings, got {}",
                    type_name(&other)
                )))
            }
        };
        req.validate()?;
        Ok(req)
    }

    fn validate(&self) -> Result<(), ApiError> {
        let new_hash = match self {
            Self::Single { dep_id, new_hash } => {
                validate_dep_id(dep_id).map_err(|e| {
                    ApiError::unprocessable("invalid_dep_id", format!("dep_id: {e}"))
                })?;
                new_hash
            }
            Self::Batch { dep_ids, new_hash } => {
                if dep_ids.is_empty() {
                    return Err(ApiError::unprocessable(
                        "empty_batch",
                        "dep_ids is empty; give at least one id",
                    ));
                }
                if dep_ids.len() > MAX_BATCH {
                    return Err(ApiError::batch_too_large(dep_ids.len()));
                }
                for (i, id) in dep_ids.iter().enumerate() {
                    validate_dep_id(id).map_err(|e| {
                        ApiError::unprocessable("invalid_dep_id", format!("dep_ids[{i}]: {e}"))
                    })?;
                }
                new_hash
            }
        };
        if let Some(h) = new_hash {
            // The same rule as every other path (layer, queue): docs/design.md §4 rule 2.
            crate::validate_new_hash(h)
                .map_err(|e| ApiError::unprocessable("invalid_new_hash", e.to_string()))?;
        }
        Ok(())
    }
}

/// The request body, as a client sends it.
#[cfg_attr(not(feature = "client"), allow(dead_code))]
#[derive(Serialize)]
pub(crate) struct RequestBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dep_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dep_ids: Option<&'a [&'a str]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) new_hash: Option<&'a str>,
}

/// One dep's outcome on the wire: `{"ok", "dep_id", "keys_deleted", "error"}`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireResult {
    pub(crate) ok: bool,
    pub(crate) dep_id: String,
    #[serde(default)]
    pub(crate) keys_deleted: u64,
    #[serde(default)]
    pub(crate) error: Option<String>,
}

impl From<Result<DepInvalidated, DepError>> for WireResult {
    fn from(r: Result<DepInvalidated, DepError>) -> Self {
        match r {
            Ok(d) => Self {
                ok: true,
                dep_id: d.dep_id,
                keys_deleted: d.deleted,
                error: None,
            },
            Err(e) => Self {
                ok: false,
                error: Some(e.to_string()),
                dep_id: e.dep_id().to_owned(),
                keys_deleted: 0,
            },
        }
    }
}

impl WireResult {
    /// The dep's outcome, as the service that sent it had it: `acknowledged` is not on the
    /// wire, and a failure's kind is read back from its reason.
    #[cfg(any(feature = "client", test))]
    pub(crate) fn into_result(self) -> Result<DepInvalidated, DepError> {
        if self.ok {
            return Ok(DepInvalidated::new(self.dep_id, self.keys_deleted));
        }
        let reason = self
            .error
            .unwrap_or_else(|| "failed without a reason".to_owned());
        let (kind, message) = match store_failure(&reason) {
            Some((kind, message)) => (crate::DepErrorKind::Store(kind), message.to_owned()),
            None => (crate::DepErrorKind::Other, reason),
        };
        Err(DepError::new(self.dep_id, kind, message))
    }

    /// The single form's answer: this, without `error` when it succeeded.
    pub(crate) fn single(&self) -> SingleBody<'_> {
        SingleBody {
            ok: self.ok,
            dep_id: &self.dep_id,
            keys_deleted: self.keys_deleted,
            error: self.error.as_deref(),
        }
    }
}

/// The kind and message of a store failure's reason (`cache store <kind>: <message>`, as a
/// [`DepError`] of a store displays), or `None` for any other reason.
#[cfg(any(feature = "client", test))]
fn store_failure(reason: &str) -> Option<(crate::StoreErrorKind, &str)> {
    let rest = reason.strip_prefix(crate::store::STORE_ERROR_PREFIX)?;
    crate::StoreErrorKind::ALL.into_iter().find_map(|kind| {
        let message = rest
            .strip_prefix(format!("{kind:?}").as_str())?
            .strip_prefix(": ")?;
        Some((kind, message))
    })
}

/// The single form's answer: like [`WireResult`], without `error` when it succeeded.
#[derive(Serialize)]
pub(crate) struct SingleBody<'a> {
    ok: bool,
    dep_id: &'a str,
    keys_deleted: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// The batch form's answer: `{"results": [...]}`.
#[derive(Serialize, Deserialize)]
pub(crate) struct BatchBody {
    pub(crate) results: Vec<WireResult>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DepErrorKind, StoreErrorKind};

    fn code(body: &str) -> String {
        InvalidateRequest::parse(body.as_bytes())
            .unwrap_err()
            .code()
            .to_owned()
    }

    #[test]
    fn shapes() {
        assert_eq!(
            InvalidateRequest::parse(br#"{"dep_id":"a","new_hash":"v2","extra":1}"#).unwrap(),
            InvalidateRequest::Single {
                dep_id: "a".into(),
                new_hash: Some("v2".into())
            }
        );
        assert_eq!(code("{"), "malformed_json");
        assert_eq!(code("[]"), "invalid_request");
        assert_eq!(code(r#"{"dep_id":1}"#), "invalid_request");
        assert_eq!(code(r#"{"dep_ids":["a",2]}"#), "invalid_request");
        assert_eq!(code(r#"{"dep_id":"a","new_hash":3}"#), "invalid_request");
        assert_eq!(code(r#"{"dep_id":"a","dep_ids":["b"]}"#), "invalid_request");
        assert_eq!(code(r#"{"dep_ids":[]}"#), "empty_batch");
        assert_eq!(code(r#"{"dep_ids":["a",""]}"#), "invalid_dep_id");
        assert_eq!(code("{\"dep_id\":\"a\\u0007\"}"), "invalid_dep_id");
    }

    #[test]
    fn a_failed_deps_kind_survives_the_wire() {
        for kind in StoreErrorKind::ALL {
            let sent = DepError::store("doc:1", &crate::StoreError::new(kind, "it: broke"));
            let wire: WireResult = serde_json::from_slice(
                &serde_json::to_vec(&WireResult::from(Err(sent.clone()))).unwrap(),
            )
            .unwrap();
            assert_eq!(wire.into_result(), Err(sent), "{kind:?}");
        }
        let other = DepError::new("doc:1", DepErrorKind::Other, "cache store Nonsense: x");
        assert_eq!(
            WireResult::from(Err(other.clone())).into_result(),
            Err(other)
        );
        let done = DepInvalidated::new("doc:1", 4);
        assert_eq!(WireResult::from(Ok(done.clone())).into_result(), Ok(done));
    }
}
