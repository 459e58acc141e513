//! The response body every adapter hands back: an entry's bytes on a hit, or the upstream's
//! body forwarded frame by frame (and recorded on a cacheable miss).

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::record::{PendingStore, Recorder};

/// A body chunk as `Bytes` (without a copy when it already is one).
pub(crate) fn into_bytes<D: Buf>(mut d: D) -> Bytes {
    d.copy_to_bytes(d.remaining())
}

/// Polls `inner` for its next frame, its data as `Bytes`.
pub(crate) fn poll_bytes<B: Body>(
    inner: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
    inner
        .poll_frame(cx)
        .map(|f| f.map(|f| f.map(|f| f.map_data(into_bytes))))
}

/// The one frame of a body held in memory (`None` once it was taken, or when it is empty).
pub(crate) fn take_bytes<E>(data: &mut Option<Bytes>) -> Poll<Option<Result<Frame<Bytes>, E>>> {
    Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
}

pin_project! {
    /// The response body the cache returns: an entry's bytes on a hit, or the inner service's
    /// body forwarded frame by frame (and recorded on a cacheable miss).
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Cached { data: Option<Bytes> },
        Passthrough { #[pin] inner: B },
        Recording {
            #[pin] inner: B,
            recorder: Option<Recorder>,
            storing: PendingStore,
            // The body's last frame, held back while its entry is written.
            last: Option<Frame<Bytes>>,
            ended: bool,
        },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn cached(data: Bytes) -> Self {
        Self {
            kind: ResponseKind::Cached {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            kind: ResponseKind::Passthrough { inner },
        }
    }

    pub(crate) fn recording(inner: B, recorder: Recorder) -> Self {
        Self {
            kind: ResponseKind::Recording {
                inner,
                recorder: Some(recorder),
                storing: PendingStore::default(),
                last: None,
                ended: false,
            },
        }
    }
}

/// A [`ResponseBody`] taken apart, for an adapter whose client has a body type of its own.
#[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
// Built once per response and taken apart at once: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Unwrapped<B> {
    /// An entry's bytes.
    Cached(Bytes),
    /// The upstream's body, untouched.
    Passthrough(B),
    /// A body being recorded: it must be polled as it is.
    Recording(ResponseBody<B>),
}

impl<B> ResponseBody<B> {
    /// Takes the body apart (see [`Unwrapped`]).
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) fn into_unwrapped(self) -> Unwrapped<B> {
        match self.kind {
            ResponseKind::Cached { data } => Unwrapped::Cached(data.unwrap_or_default()),
            ResponseKind::Passthrough { inner } => Unwrapped::Passthrough(inner),
            kind @ ResponseKind::Recording { .. } => Unwrapped::Recording(Self { kind }),
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            ResponseKind::Cached { .. } => "Cached",
            ResponseKind::Passthrough { .. } => "Passthrough",
            ResponseKind::Recording { .. } => "Recording",
        };
        f.debug_tuple("ResponseBody").field(&kind).finish()
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Cached { data } => take_bytes(data),
            ResponseKindProj::Passthrough { inner } => poll_bytes(inner, cx),
            ResponseKindProj::Recording {
                mut inner,
                recorder,
                storing,
                last,
                ended,
            } => {
                // The entry is written before the end of the body is reported, and before its
                // last bytes when the body knows which they are: a client that stops reading
                // at the declared length (an HTTP/1 `Content-Length` response) has not seen
                // the whole answer before the next request can find it cached.
                if storing.is_pending() {
                    ready!(storing.poll(cx));
                    *ended = true;
                    return Poll::Ready(last.take().map(Ok));
                }
                if *ended {
                    return Poll::Ready(None);
                }
                let frame = match ready!(inner.as_mut().poll_frame(cx)) {
                    None => {
                        *ended = true;
                        if let Some(r) = recorder.take() {
                            *storing = r.finish();
                            ready!(storing.poll(cx));
                        }
                        return Poll::Ready(None);
                    }
                    Some(Err(e)) => {
                        // A broken stream stores nothing.
                        recorder.take();
                        return Poll::Ready(Some(Err(e)));
                    }
                    Some(Ok(frame)) => frame.map_data(into_bytes),
                };
                match frame.data_ref() {
                    Some(data) => {
                        if recorder.as_mut().is_some_and(|r| !r.push(data)) {
                            recorder.take();
                        }
                    }
                    // Trailers are not replayed, so a response that has them is not stored.
                    None => drop(recorder.take()),
                }
                if inner.is_end_stream() {
                    if let Some(r) = recorder.take() {
                        *storing = r.finish();
                        if storing.is_pending() {
                            *last = Some(frame);
                            ready!(storing.poll(cx));
                            *ended = true;
                            return Poll::Ready(last.take().map(Ok));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Cached { data } => data.is_none(),
            ResponseKind::Passthrough { inner } => inner.is_end_stream(),
            ResponseKind::Recording {
                inner,
                storing,
                ended,
                ..
            } => !storing.is_pending() && (*ended || inner.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Cached { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Passthrough { inner } | ResponseKind::Recording { inner, .. } => {
                inner.size_hint()
            }
        }
    }
}
