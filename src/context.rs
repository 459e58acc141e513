//! Per-request control: a request extension, or a task-local scope for code that cannot touch
//! the request.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Extensions, HeaderMap, Method, Uri};

use crate::Dep;

/// The parts of a request the layer decides on before reading the body.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    /// Method.
    pub method: &'a Method,
    /// URI.
    pub uri: &'a Uri,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// Extensions.
    pub extensions: &'a Extensions,
}

impl<'a> RequestHead<'a> {
    /// The head of `req`.
    pub fn of<B>(req: &'a http::Request<B>) -> Self {
        Self {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }
}

/// Resolves the cache context of a request from its head (for example from trusted headers).
/// Consulted after the extension and the task-local scope.
pub type ContextResolver =
    Arc<dyn Fn(&RequestHead<'_>) -> Result<Option<RequestContext>, String> + Send + Sync>;

/// What the caller wants the cache to do with one request.
///
/// Put it in the request's extensions, or run the code that sends the request inside
/// [`scope`]. The extension wins over the scope.
///
/// ```
/// use cachecore::{Dep, RequestContext};
/// use std::time::Duration;
///
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(
///     RequestContext::new()
///         .dep(Dep::new("doc:contract-123").hash("v1"))
///         .ttl(Duration::from_secs(600)),
/// );
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestContext {
    // Shared: the layer clones the context of every request it plans.
    pub(crate) deps: Arc<[Dep]>,
    pub(crate) bypass: bool,
    pub(crate) refresh: bool,
    pub(crate) ttl: Option<Duration>,
    pub(crate) semantic: SemanticRequest,
}

/// What one request asks of L2 (feature `semantic`): it may only make L2 stricter, or opt in
/// to what L2 skips by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SemanticRequest {
    /// A threshold above the layer's, as `f32` bits (so the context stays `Eq`).
    pub(crate) min_similarity_bits: Option<u32>,
    pub(crate) allow_sampling: bool,
    pub(crate) allow_tools: bool,
    pub(crate) skip: bool,
}

impl SemanticRequest {
    /// The threshold the request asks for, if any.
    #[cfg_attr(not(feature = "semantic"), allow(dead_code))]
    pub(crate) fn min_similarity(self) -> Option<f32> {
        self.min_similarity_bits.map(f32::from_bits)
    }
}

impl RequestContext {
    /// An empty context: cache normally, no deps.
    pub fn new() -> Self {
        Self::default()
    }

    /// A context that declares `deps`.
    pub fn with_deps(deps: impl IntoIterator<Item = Dep>) -> Self {
        Self {
            deps: deps.into_iter().collect::<Vec<_>>().into(),
            ..Self::default()
        }
    }

    /// A context that bypasses the cache: nothing is read or written.
    pub fn bypass_all() -> Self {
        Self {
            bypass: true,
            ..Self::default()
        }
    }

    /// Declares that the response is derived from `dep`.
    #[must_use]
    pub fn dep(mut self, dep: Dep) -> Self {
        // Collected straight into the shared slice: one allocation.
        self.deps = self
            .deps
            .iter()
            .cloned()
            .chain(std::iter::once(dep))
            .collect();
        self
    }

    /// Neither read from nor write to the cache.
    #[must_use]
    pub fn bypass(mut self) -> Self {
        self.bypass = true;
        self
    }

    /// Skip the read, call the inner service, and replace the entry with the fresh response.
    #[must_use]
    pub fn refresh(mut self) -> Self {
        self.refresh = true;
        self
    }

    /// Fresh TTL for the entry this request writes, instead of the layer's default.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Raises the L2 similarity threshold for this request (feature `semantic`). A value at or
    /// below the layer's threshold changes nothing: a request can make L2 stricter, never
    /// looser. Not a number: ignored.
    #[must_use]
    pub fn min_similarity(mut self, threshold: f32) -> Self {
        if !threshold.is_nan() {
            self.semantic.min_similarity_bits = Some(threshold.to_bits());
        }
        self
    }

    /// Lets this request use L2 although it samples (a non-zero or absent `temperature`).
    #[must_use]
    pub fn semantic_sampling(mut self) -> Self {
        self.semantic.allow_sampling = true;
        self
    }

    /// Lets this request use L2 although it has tools.
    #[must_use]
    pub fn semantic_tools(mut self) -> Self {
        self.semantic.allow_tools = true;
        self
    }

    /// Keeps this request out of L2 (L1 still applies).
    #[must_use]
    pub fn no_semantic(mut self) -> Self {
        self.semantic.skip = true;
        self
    }

    /// The L2 threshold this request asks for, if any.
    pub fn min_similarity_override(&self) -> Option<f32> {
        self.semantic.min_similarity()
    }

    /// The declared deps.
    pub fn deps(&self) -> &[Dep] {
        &self.deps
    }

    /// Whether the request bypasses the cache.
    pub fn is_bypass(&self) -> bool {
        self.bypass
    }

    /// Whether the request skips the read and replaces the entry.
    pub fn is_refresh(&self) -> bool {
        self.refresh
    }

    /// The TTL override, if any.
    pub fn ttl_override(&self) -> Option<Duration> {
        self.ttl
    }
}

tokio::task_local! {
    static SCOPE: RequestContext;
}

/// Runs `fut` with `ctx` applying to every request the layer sees while `fut` runs on this task.
///
/// For code that builds its requests internally (an in-house LLM client): the caller wraps the
/// call, the client needs no change. Scopes do not leak across tasks: a task spawned inside
/// `fut` does not inherit it, and concurrent tasks with different scopes never see each other's.
///
/// ```
/// # async fn call_llm() {}
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use cachecore::{scope, Dep, RequestContext};
/// scope(RequestContext::new().dep(Dep::new("classifier-prompt").hash("v3")), call_llm()).await;
/// # }
/// ```
pub async fn scope<F: Future>(ctx: RequestContext, fut: F) -> F::Output {
    SCOPE.scope(ctx, fut).await
}

/// The context of the innermost [`scope`] this code runs in, if any.
pub fn current_scope() -> Option<RequestContext> {
    SCOPE.try_with(Clone::clone).ok()
}
