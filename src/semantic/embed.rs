//! Embedders: text in, unit vectors out.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The future an [`Embedder`] returns (boxed so the trait stays object safe).
pub type EmbedFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send + 'a>>;

/// Turns texts into sentence embeddings.
///
/// The vectors come back in the order of the texts, all of one length, and of unit norm (the
/// cache compares them by dot product, which is then their cosine). An implementation must
/// not block the calling thread: run the model elsewhere (a thread of its own, as
/// [`LocalEmbedder`](super::LocalEmbedder) does) or call a service.
pub trait Embedder: Send + Sync + 'static {
    /// Names the model (and anything else that changes its vectors): requests embedded by
    /// different embedders are never compared, so this is part of the context signature.
    fn id(&self) -> &str;

    /// Embeds `texts`, in one batch where the backend can.
    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a>;
}

impl<T: Embedder + ?Sized> Embedder for Arc<T> {
    fn id(&self) -> &str {
        (**self).id()
    }
    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a> {
        (**self).embed(texts)
    }
}

/// Why texts could not be embedded. The cache treats every one as "no L2 for this request".
#[derive(Debug)]
pub struct EmbedError {
    message: String,
}

impl EmbedError {
    /// A new error.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for EmbedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "embedding failed: {}", self.message)
    }
}

impl std::error::Error for EmbedError {}

/// Scales `v` to unit length (a zero vector stays zero).
pub(crate) fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}
