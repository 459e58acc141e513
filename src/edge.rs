//! What the crate's HTTP endpoints and clients share: the boxed error of a body, a body read
//! with a cap, and the JSON error envelope (docs/design.md §8).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

/// The error of a boxed body or service.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a capped read stopped.
#[derive(Debug)]
pub(crate) enum CappedReadError {
    /// The body is longer than the cap (declared, or found while reading).
    TooLarge,
    /// The body failed.
    Body(BoxError),
}

impl CappedReadError {
    /// As a boxed error.
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) fn into_box(self) -> BoxError {
        match self {
            Self::TooLarge => self.to_string().into(),
            Self::Body(e) => e,
        }
    }
}

impl std::fmt::Display for CappedReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge => f.write_str("body over the length limit"),
            Self::Body(e) => e.fmt(f),
        }
    }
}

/// Reads at most `limit` bytes of `body`: a larger declared length is refused before reading,
/// and reading stops at the first frame that goes over. Trailers are ignored.
pub(crate) async fn read_capped<B>(body: B, limit: usize) -> Result<Bytes, CappedReadError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(CappedReadError::TooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CappedReadError::Body(e.into()))?;
        if let Ok(mut data) = frame.into_data() {
            if buf.len() + data.remaining() > limit {
                return Err(CappedReadError::TooLarge);
            }
            buf.put(&mut data);
        }
    }
    Ok(buf.freeze())
}

/// `{"error": {"code": "...", "message": "..."}}`: every error the crate answers over HTTP.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorEnvelope {
    pub(crate) error: ErrorDetail,
}

/// The inside of an [`ErrorEnvelope`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorDetail {
    pub(crate) code: String,
    pub(crate) message: String,
}

impl ErrorEnvelope {
    /// The JSON body of an error with this code and message.
    pub(crate) fn body(code: &str, message: &str) -> Vec<u8> {
        serde_json::to_vec(&Self {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.to_owned(),
            },
        })
        .expect("an error envelope serializes")
    }

    /// Parses an error body.
    pub(crate) fn parse(body: &[u8]) -> Option<ErrorDetail> {
        serde_json::from_slice::<Self>(body).ok().map(|e| e.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn capped_read_refuses_a_declared_length_over_the_cap_before_reading() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        assert!(matches!(
            read_capped(body, 9).await,
            Err(CappedReadError::TooLarge)
        ));
        let body = Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(read_capped(body, 10).await.unwrap(), "0123456789");
    }

    /// A body of several frames that declares no length.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|d| Ok(http_body::Frame::data(d))))
        }
    }

    #[tokio::test]
    async fn capped_read_stops_at_the_frame_that_goes_over_an_undeclared_length() {
        let frames = || {
            Frames(
                ["abc", "def", "ghi"]
                    .map(|s| Bytes::from_static(s.as_bytes()))
                    .into(),
            )
        };
        assert!(matches!(
            read_capped(frames(), 8).await,
            Err(CappedReadError::TooLarge)
        ));
        assert_eq!(read_capped(frames(), 9).await.unwrap(), "abcdefghi");
    }

    #[test]
    fn error_envelope_round_trips() {
        let body = ErrorEnvelope::body("payload_too_large", "over 10 bytes");
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"error":{"code":"payload_too_large","message":"over 10 bytes"}}"#
        );
        let d = ErrorEnvelope::parse(&body).unwrap();
        assert_eq!(
            (d.code.as_str(), d.message.as_str()),
            ("payload_too_large", "over 10 bytes")
        );
    }
}
