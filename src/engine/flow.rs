//! The request flow every adapter shares: key → lookup (L1, then the L2 step in one place) →
//! single-flight → forward → record → mark. Planning comes first and is synchronous
//! ([`Engine::plan`]); so is the start of the flow ([`Engine::serve_now`]: the key, and a hit
//! when the store can answer at once), and [`Engine::serve_later`] is the rest. An adapter
//! only converts its request to an [`Upstream`] and the response back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::Response;
use http_body::Body;

use super::body::{into_bytes, ResponseBody};
use super::flight::Flight;
use super::plan::Plan;
use super::record::{vary_matches, Forward};
use super::{Engine, Found};
use crate::context::RequestHead;
use crate::store::{CacheKey, DepEpochs, Entry};
use crate::CacheStatus;

/// What the flow needs from an adapter: the request (its head and buffered body) and the way
/// to send it on.
pub(crate) trait Upstream: Send + Sized {
    /// The request as the adapter holds it, its body already buffered. Borrowed across the
    /// lookup, so it must be `Sync`; the caller (`self`) is only moved.
    type Request: Send + Sync;
    /// The body of the upstream's responses.
    type Body: Body + Send + 'static;
    /// The upstream's error, handed back untouched.
    type Error;

    /// Whether [`refresh`](Self::refresh) can run a call in the background, so a stale entry
    /// may be served meanwhile (docs/design.md §4).
    const REFRESHES: bool;

    /// The request's head.
    fn head(request: &Self::Request) -> RequestHead<'_>;

    /// The request's buffered body.
    fn body(request: &Self::Request) -> &[u8];

    /// Sends the request upstream.
    fn call(
        self,
        request: Self::Request,
    ) -> impl Future<Output = Result<Response<Self::Body>, Self::Error>> + Send;

    /// A copy of the request, sent upstream on its own, for the background refresh of a stale
    /// entry; `None` when the adapter cannot run one or the call failed.
    fn refresh(&self, request: &Self::Request) -> Option<RefreshCall<Self::Body>>;
}

/// The upstream call of a background refresh; `None` when it failed.
pub(crate) type RefreshCall<B> = Pin<Box<dyn Future<Output = Option<Response<B>>> + Send>>;

impl Engine {
    /// The cache path of one planned request whose body is buffered: [`serve_now`](Self::serve_now),
    /// then, when that cannot answer, [`serve_later`](Self::serve_later) in the same future (the
    /// tower service and the gateway box the latter instead, to keep their hit path small).
    #[cfg(feature = "reqwest")]
    pub(crate) async fn serve<U: Upstream>(
        self: &Arc<Self>,
        plan: Plan,
        request: U::Request,
        upstream: U,
    ) -> Result<Response<ResponseBody<U::Body>>, U::Error> {
        match self.serve_now::<U>(&plan, &request) {
            Ok(res) => Ok(res),
            Err(later) => self.serve_later(plan, later, request, upstream).await,
        }
    }

    /// The synchronous start of a cached request's flow: the key, and a fresh hit when the store
    /// can answer at once ([`Engine::lookup_now`]). Anything else (a miss, a stale entry, a
    /// store that answers asynchronously, a refresh) is left to [`serve_later`](Self::serve_later)
    /// with what was learnt here, so the store is asked once.
    ///
    /// An adapter that runs this before building the rest of its future keeps that future small
    /// on the hit path: a hit then moves no room meant for an upstream call.
    // `Later` carries what the store gave (an entry, possibly) and is moved once, to the
    // caller; the hit's response is about as large.
    #[allow(clippy::result_large_err)]
    pub(crate) fn serve_now<U: Upstream>(
        &self,
        plan: &Plan,
        request: &U::Request,
    ) -> Result<Response<ResponseBody<U::Body>>, Later> {
        let head = U::head(request);
        let key = self.key(plan, &head, U::body(request));
        if plan.refresh {
            return Err(Later { key, found: None });
        }
        let found = self.lookup_now(&key, &plan.dep_ids());
        match found {
            Some(Found::Hit(entry, CacheStatus::Hit))
                if vary_matches(&entry.headers, head.headers) =>
            {
                Ok(self.hit_response(entry, CacheStatus::Hit, ResponseBody::cached))
            }
            found => Err(Later { key, found }),
        }
    }

    /// The rest of a cached request's flow after [`serve_now`](Self::serve_now): lookup (unless
    /// `serve_now` had the store's answer), L2, single-flight, forward, record, mark.
    pub(crate) async fn serve_later<U: Upstream>(
        self: &Arc<Self>,
        plan: Plan,
        later: Later,
        request: U::Request,
        upstream: U,
    ) -> Result<Response<ResponseBody<U::Body>>, U::Error> {
        let Later { key, found } = later;
        let head = U::head(&request);
        let body = U::body(&request);
        let forward = match self
            .route(&key, &plan, &head, body, U::REFRESHES, found)
            .await
        {
            Route::Serve(entry, status) => {
                if status == CacheStatus::StaleHit {
                    let observed = entry.deps.clone();
                    self.spawn_refresh(&upstream, &request, key, &plan, observed);
                }
                return Ok(self.hit_response(entry, status, ResponseBody::cached));
            }
            Route::Forward(forward) => forward,
        };
        // The request's headers decide which variant a `Vary` response is; keep them (cheap:
        // this is the miss path, which pays an upstream call).
        let request_headers = head.headers.clone();
        let res = upstream.call(request).await?;
        let (parts, res_body) = res.into_parts();
        let recorder = self.start_recording(
            key,
            plan.fresh_ttl,
            forward,
            &request_headers,
            parts.status,
            &parts.headers,
        );
        let body = match recorder {
            // Servers may never poll a body that is already at its end: store it now, before
            // the response goes out, as a recording body does before it reports its end.
            Some(recorder) if res_body.is_end_stream() => {
                recorder.finish().wait().await;
                ResponseBody::passthrough(res_body)
            }
            Some(recorder) => ResponseBody::recording(res_body, recorder),
            None => ResponseBody::passthrough(res_body),
        };
        let mut res = Response::from_parts(parts, body);
        self.mark(&mut res, CacheStatus::Miss);
        Ok(res)
    }

    /// Starts the one background refresh of a stale entry, unless one is running: the
    /// upstream's answer is recorded with the epochs the stale entry carried.
    fn spawn_refresh<U: Upstream>(
        self: &Arc<Self>,
        upstream: &U,
        request: &U::Request,
        key: CacheKey,
        plan: &Plan,
        observed: DepEpochs,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(guard) = self.flights.begin_refresh(&key) else {
            return;
        };
        let Some(call) = upstream.refresh(request) else {
            return;
        };
        self.metrics
            .background_refreshes
            .fetch_add(1, Ordering::Relaxed);
        let request_headers = U::head(request).headers.clone();
        let engine = Arc::clone(self);
        let fresh_ttl = plan.fresh_ttl;
        rt.spawn(async move {
            let _guard = guard;
            let Some(res) = call.await else {
                return;
            };
            let (parts, body) = res.into_parts();
            let Some(mut recorder) = engine.start_recording(
                key,
                fresh_ttl,
                Forward::refresh(observed),
                &request_headers,
                parts.status,
                &parts.headers,
            ) else {
                return;
            };
            let mut body = std::pin::pin!(body);
            while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                let Ok(frame) = frame else { return };
                let Ok(data) = frame.into_data() else { return };
                if !recorder.push(&into_bytes(data)) {
                    return;
                }
            }
            recorder.finish().wait().await;
        });
    }
}

/// What [`Engine::serve_now`] leaves to [`Engine::serve_later`]: the key, and the store's
/// answer when it gave one at once.
pub(crate) struct Later {
    key: CacheKey,
    found: Option<Found>,
}

/// What to do with a cached request once its key is known.
enum Route {
    /// Serve this entry. A [`CacheStatus::StaleHit`] asks for one background refresh.
    Serve(Entry, CacheStatus),
    /// Call upstream, then hand the response head to [`Engine::start_recording`].
    Forward(Forward),
}

impl Engine {
    /// Looks the key up and joins the single-flight: serve an entry, or forward.
    ///
    /// `head` is the request's: an entry whose response named request headers in `Vary`
    /// is served only to a request with the same values for them. `body` is the buffered
    /// request body (L2 reads the question from it).
    ///
    /// `serve_stale`: whether the adapter can run a background refresh ([`Upstream::REFRESHES`]).
    /// When it cannot, a stale entry is revalidated in line instead. `found`: the store's
    /// answer, when [`Engine::serve_now`] already had it.
    async fn route(
        self: &Arc<Self>,
        key: &CacheKey,
        plan: &Plan,
        head: &RequestHead<'_>,
        body: &[u8],
        serve_stale: bool,
        found: Option<Found>,
    ) -> Route {
        let headers = head.headers;
        let deps = plan.dep_ids();
        let found = match found {
            Some(found) => found,
            None => self.lookup(key, &deps).await,
        };
        #[cfg(feature = "semantic")]
        let l1_missed = matches!(found, Found::Miss(_));
        let observed = match found {
            Found::Hit(entry, status)
                if !plan.refresh
                    && (serve_stale || status != CacheStatus::StaleHit)
                    && vary_matches(&entry.headers, headers) =>
            {
                return Route::Serve(entry, status);
            }
            // A refresh (or another variant) skips the entry, but a valid entry's epochs are
            // the current ones.
            Found::Hit(entry, _) => Some(entry.deps),
            Found::Miss(epochs) => Some(epochs),
            Found::Unavailable => None,
        };
        // L2 (docs/design.md §5a), in this one place: on an L1 miss, an entry whose question
        // means the same may answer.
        #[cfg(feature = "semantic")]
        let l2 = if l1_missed {
            match self.l2(plan, head, body, &deps).await {
                Ok(answer) => return Route::Serve(answer, CacheStatus::HitL2),
                Err(write) => write,
            }
        } else {
            None
        };
        #[cfg(not(feature = "semantic"))]
        let _ = body;
        let mut flight = None;
        if observed.is_some() && !plan.refresh {
            match self.flights.join(key) {
                Flight::Leader(guard) => flight = Some(guard),
                Flight::Follower(rx) => {
                    self.metrics.coalesced.fetch_add(1, Ordering::Relaxed);
                    // The leader stored its answer: read it back from the store rather than take
                    // it from the leader, so an invalidation that ran since the write is seen
                    // (rule 4 holds for followers too). If it stored nothing, or did not finish
                    // within the bounds (docs/design.md §4 rule 8), go upstream ourselves, with
                    // the epochs observed before waiting: a put is refused if any moved since.
                    if Flight::wait(
                        rx,
                        self.config.coalesce_wait,
                        self.config.coalesce_body_wait,
                    )
                    .await
                    {
                        if let Found::Hit(entry, status) = self.lookup(key, &deps).await {
                            if vary_matches(&entry.headers, headers) {
                                return Route::Serve(entry, status);
                            }
                        }
                    }
                }
            }
        }
        Route::Forward(Forward {
            observed,
            flight,
            #[cfg(feature = "semantic")]
            l2,
        })
    }

    /// The L2 step: a match only names an entry; it is read through the L1 lookup, so expiry
    /// and every dep rule apply as to any hit. No embedding is paid on an L1 hit. `Ok`: the
    /// answer; `Err`: no answer, and the right to store the request's vector beside its entry.
    #[cfg(feature = "semantic")]
    async fn l2(
        &self,
        plan: &Plan,
        head: &RequestHead<'_>,
        body: &[u8],
        deps: &[&str],
    ) -> Result<Entry, Option<crate::semantic::L2Write>> {
        let Some(semantic) = &self.config.semantic else {
            return Err(None);
        };
        let parts = plan.key_parts(head, &self.config.vary, &[]);
        let probe = semantic
            .probe(plan.semantic, &parts, &self.config.keying, body)
            .await;
        for m in probe.matches() {
            match self.lookup(&m.key, deps).await {
                Found::Hit(entry, CacheStatus::Hit)
                    if vary_matches(&entry.headers, head.headers) =>
                {
                    return Ok(m.answer(entry));
                }
                Found::Miss(_) => probe.gone(m),
                _ => {}
            }
        }
        Err(probe.into_write())
    }
}
