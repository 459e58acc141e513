//! The future the service returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use crate::engine::{Engine, ResponseBody};

pub(crate) type BoxedResponse<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// Response future of [`Cachecore`](super::Cachecore).
    ///
    /// A bypassed request polls the inner future in place, with no allocation; a cached request
    /// runs the lookup, the single-flight and the upstream call as one boxed future.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Bypass { #[pin] fut: F, engine: Arc<Engine>, error: Option<HeaderValue> },
        Cached { fut: BoxedResponse<B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn bypass(fut: F, engine: Arc<Engine>, error: Option<HeaderValue>) -> Self {
        Self {
            kind: Kind::Bypass { fut, engine, error },
        }
    }

    pub(crate) fn cached(fut: BoxedResponse<B, E>) -> Self {
        Self {
            kind: Kind::Cached { fut },
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Bypass { fut, engine, error } => {
                let (mut parts, body) = ready!(fut.poll(cx))?.into_parts();
                engine.mark_bypass(&mut parts.headers, &mut parts.extensions, error.take());
                Poll::Ready(Ok(Response::from_parts(
                    parts,
                    ResponseBody::passthrough(body),
                )))
            }
            KindProj::Cached { fut } => fut.as_mut().poll(cx),
        }
    }
}
