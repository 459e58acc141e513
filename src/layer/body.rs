//! The request body the layer hands to the inner service.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::engine::{poll_bytes, take_bytes};

pin_project! {
    /// The request body the inner service receives: the buffered body of a cached request, or
    /// the caller's body untouched (a bypassed, uncacheable or oversized request).
    pub struct RequestBody<B: Body> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B: Body> {
        Full { data: Option<Bytes> },
        Passthrough { #[pin] inner: B },
        // The frames read while looking for the end of an oversized body, then the rest.
        Replay { prefix: VecDeque<Frame<Bytes>>, error: Option<B::Error>, rest: Pin<Box<B>> },
    }
}

impl<B: Body> RequestBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: RequestKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            kind: RequestKind::Passthrough { inner },
        }
    }

    pub(crate) fn replay(
        prefix: VecDeque<Frame<Bytes>>,
        error: Option<B::Error>,
        rest: Pin<Box<B>>,
    ) -> Self {
        Self {
            kind: RequestKind::Replay {
                prefix,
                error,
                rest,
            },
        }
    }
}

impl<B: Body> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            RequestKind::Full { .. } => "Full",
            RequestKind::Passthrough { .. } => "Passthrough",
            RequestKind::Replay { .. } => "Replay",
        };
        f.debug_tuple("RequestBody").field(&kind).finish()
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Full { data } => take_bytes(data),
            RequestKindProj::Passthrough { inner } => poll_bytes(inner, cx),
            RequestKindProj::Replay {
                prefix,
                error,
                rest,
            } => {
                if let Some(frame) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(e) = error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                poll_bytes(rest.as_mut(), cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Full { data } => data.is_none(),
            RequestKind::Passthrough { inner } => inner.is_end_stream(),
            RequestKind::Replay {
                prefix,
                error,
                rest,
            } => prefix.is_empty() && error.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Passthrough { inner } => inner.size_hint(),
            RequestKind::Replay { prefix, rest, .. } => {
                let buffered: u64 = prefix
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + buffered);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}
