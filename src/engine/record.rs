//! Recording and admission: which responses may become entries (docs/design.md §5), and the
//! recorder that collects a forwarded body and stores it when it ends cleanly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::header::{self, HeaderValue};
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::flight::{FlightGuard, FlightState};
use super::Engine;
use crate::headers::{
    cache_control, content_length, is_event_stream, remove_hop_by_hop, vary_names, VARY_KEY,
    X_CACHE, X_CACHE_AGE, X_CACHE_SIMILARITY,
};
use crate::key::to_hex;
use crate::store::{now_ms, CacheKey, DepEpochs, Entry};

/// A forwarded request's right to store its response: the epochs observed at lookup (none when
/// the store could not answer, or when a coalesced follower goes upstream itself), and the
/// single-flight it leads. Dropping it releases the followers.
pub(crate) struct Forward {
    pub(super) observed: Option<DepEpochs>,
    pub(super) flight: Option<FlightGuard>,
    /// The request's L2 vector, stored beside its entry if the entry is stored.
    #[cfg(feature = "semantic")]
    pub(super) l2: Option<crate::semantic::L2Write>,
}

impl Forward {
    /// The right to store of a background refresh: the epochs its stale entry recorded (current
    /// at the lookup that found it), no single-flight.
    pub(crate) fn refresh(observed: DepEpochs) -> Self {
        Self {
            observed: Some(observed),
            flight: None,
            #[cfg(feature = "semantic")]
            l2: None,
        }
    }
}

impl Engine {
    /// The recorder for a forwarded request's response, when it may be stored; `None` (and the
    /// followers released) otherwise.
    ///
    /// `request` are the request's headers (for the response's `Vary`). A streamed response
    /// (server-sent events) releases the followers at once: they call upstream themselves
    /// rather than wait for the whole stream.
    pub(crate) fn start_recording(
        self: &Arc<Self>,
        key: CacheKey,
        fresh_ttl: Duration,
        forward: Forward,
        request: &HeaderMap,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<Recorder> {
        let Forward {
            observed,
            flight,
            #[cfg(feature = "semantic")]
            l2,
        } = forward;
        let observed = observed?;
        if !admits(status, headers, self.config.max_response) {
            return None;
        }
        let flight = match flight {
            Some(flight) if !is_event_stream(headers) => {
                flight.tx.send_replace(FlightState::Recording);
                Some(flight)
            }
            _ => None,
        };
        let mut recorder = self.recorder(key, observed, fresh_ttl, status, headers, flight);
        if let Some(fingerprint) = vary_fingerprint(headers, request) {
            recorder.headers.insert(VARY_KEY, fingerprint);
        }
        #[cfg(feature = "semantic")]
        {
            recorder.l2 = l2;
        }
        Some(recorder)
    }
}

impl Engine {
    /// Starts recording a response that will become an entry when its body ends cleanly.
    fn recorder(
        self: &Arc<Self>,
        key: CacheKey,
        observed: DepEpochs,
        fresh_ttl: Duration,
        status: StatusCode,
        headers: &HeaderMap,
        flight: Option<FlightGuard>,
    ) -> Recorder {
        Recorder {
            engine: Arc::clone(self),
            key,
            observed,
            status,
            headers: storable_headers(headers),
            fresh_ttl,
            buf: BytesMut::with_capacity(
                content_length(headers)
                    .map_or(0, |n| usize::try_from(n).unwrap_or(0))
                    .min(self.config.max_response),
            ),
            flight,
            #[cfg(feature = "semantic")]
            l2: None,
        }
    }
}

/// Whether a response may be stored (docs/design.md §5): 2xx only, and not a partial
/// `206` (`Range` is not in the key); no `no-store`, `private` (with or without field
/// names), `no-cache` (but see event streams below) or a zero `max-age`/`s-maxage` (this
/// cache cannot revalidate, so "revalidate before every reuse" means "do not reuse");
/// nothing that sets cookies; no `Vary: *`; not larger than the recording limit when its
/// length is known.
fn admits(status: StatusCode, headers: &HeaderMap, max_response: usize) -> bool {
    if !status.is_success() || status == StatusCode::PARTIAL_CONTENT {
        return false;
    }
    if headers.contains_key(header::SET_COOKIE) {
        return false;
    }
    // Event streams carry `no-cache` by convention (it keeps intermediaries from buffering
    // a live stream; LLM APIs send it on every streamed completion), not as a statement
    // about reusing the finished stream: for them only the other directives count.
    let stream = is_event_stream(headers);
    let forbidden = cache_control(headers).any(|(name, value)| {
        name.eq_ignore_ascii_case("no-store")
            || name.eq_ignore_ascii_case("private")
            || (name.eq_ignore_ascii_case("no-cache") && !stream)
            || ((name.eq_ignore_ascii_case("max-age") || name.eq_ignore_ascii_case("s-maxage"))
                && value.is_some_and(|v| v.parse::<u64>().map_or(true, |n| n == 0)))
    });
    if forbidden || vary_names(headers).any(|name| name == "*") {
        return false;
    }
    !matches!(content_length(headers), Some(len) if len > max_response as u64)
}

/// What of a response's headers an entry keeps: not the hop-by-hop ones (they describe one
/// connection, never replay them), nor the cache's own marks.
fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    remove_hop_by_hop(&mut out);
    for name in [X_CACHE, X_CACHE_AGE, X_CACHE_SIMILARITY, VARY_KEY] {
        out.remove(name);
    }
    out
}

/// The digest of `request`'s values for the headers `response` varies on, if it varies.
fn vary_fingerprint(response: &HeaderMap, request: &HeaderMap) -> Option<HeaderValue> {
    let mut names = vary_names(response).peekable();
    names.peek()?;
    let mut h = Sha256::new();
    for name in names {
        let name = name.to_ascii_lowercase();
        h.update((name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        let values = request.get_all(name.as_str());
        h.update((values.iter().count() as u64).to_be_bytes());
        for v in values {
            h.update((v.len() as u64).to_be_bytes());
            h.update(v.as_bytes());
        }
    }
    let digest: [u8; 32] = h.finalize().into();
    HeaderValue::from_str(&to_hex(&digest[..16])).ok()
}

/// Whether an entry may answer a request with these headers: it names no `Vary` headers, or
/// the request has the same values for them as the one that produced it.
pub(super) fn vary_matches(entry: &HeaderMap, request: &HeaderMap) -> bool {
    match entry.get(VARY_KEY) {
        None => true,
        Some(stored) => vary_fingerprint(entry, request).is_some_and(|now| now == stored),
    }
}

/// Whether a finished event stream reported an error in band: an `event: error`, or a `data:`
/// line carrying an `{"error": ...}` object (as LLM APIs send when generation fails midway).
/// Such a stream ended cleanly at the HTTP level but is not an answer to replay.
fn sse_reports_error(body: &[u8]) -> bool {
    body.split(|&b| b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let field = |name: &[u8]| {
            line.strip_prefix(name).map(|rest| {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                rest.trim_ascii()
            })
        };
        if field(b"event:").is_some_and(|v| v == b"error") {
            return true;
        }
        field(b"data:").is_some_and(|v| {
            v.strip_prefix(b"{")
                .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"\"error\""))
        })
    })
}

/// Collects a response body while it is forwarded; stores it when the body ends cleanly.
/// Dropped before that (client gone, stream error, too large): nothing is stored.
pub(crate) struct Recorder {
    engine: Arc<Engine>,
    key: CacheKey,
    observed: DepEpochs,
    status: StatusCode,
    headers: HeaderMap,
    fresh_ttl: Duration,
    buf: BytesMut,
    flight: Option<FlightGuard>,
    #[cfg(feature = "semantic")]
    l2: Option<crate::semantic::L2Write>,
}

impl Recorder {
    /// Appends a chunk; false once the response is too large to store (drop the recorder then).
    pub(crate) fn push(&mut self, chunk: &[u8]) -> bool {
        if self.buf.len() + chunk.len() > self.engine.config.max_response {
            return false;
        }
        self.buf.extend_from_slice(chunk);
        true
    }

    /// The body ended cleanly: returns the write of the entry (then the release of the
    /// followers). Poll it to completion before reporting the end of the body, so a caller
    /// that has seen the whole response finds the entry on its next request; dropped before
    /// completion, it finishes in the background.
    pub(crate) fn finish(self) -> PendingStore {
        let Self {
            engine,
            key,
            observed,
            status,
            headers,
            fresh_ttl,
            buf,
            flight,
            #[cfg(feature = "semantic")]
            l2,
        } = self;
        if is_event_stream(&headers) && sse_reports_error(&buf) {
            // Dropping the flight guard releases the followers: nothing to read back.
            return PendingStore::default();
        }
        let entry = Entry {
            status,
            headers,
            body: buf.freeze(),
            stored_at_ms: now_ms(),
            fresh_ttl,
            stale_window: engine.config.stale_window,
            deps: observed,
        };
        #[cfg(feature = "semantic")]
        let lifetime = entry.lifetime();
        PendingStore(Some(Box::pin(async move {
            let stored = engine.put(&key, entry).await;
            // The vector goes beside the entry only once the entry is there (docs/design.md §5a).
            #[cfg(feature = "semantic")]
            if let (true, Some(l2)) = (stored, l2) {
                l2.stored(&key, lifetime).await;
            }
            if let Some(flight) = flight {
                flight.finish(stored);
            }
        })))
    }
}

/// The write of a finished recording. Polled by the response body before it reports its end;
/// if the body is dropped first, the write goes on in the background.
#[derive(Default)]
pub(crate) struct PendingStore(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl PendingStore {
    pub(crate) fn is_pending(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(fut) = &mut self.0 {
            ready!(fut.as_mut().poll(cx));
            self.0 = None;
        }
        Poll::Ready(())
    }

    /// Runs the write to completion.
    pub(crate) async fn wait(mut self) {
        std::future::poll_fn(|cx| self.poll(cx)).await;
    }

    fn spawn_rest(&mut self) {
        if let Some(fut) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(fut);
                }
                Err(_) => {
                    tracing::warn!(target: "cachecore", "no tokio runtime to finish a cache write on; not cached");
                }
            }
        }
    }
}

impl Drop for PendingStore {
    fn drop(&mut self) {
        self.spawn_rest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn admission_takes_2xx_without_forbidding_directives_only() {
        let ok = |status: u16, h: &[(&str, &str)]| {
            admits(StatusCode::from_u16(status).unwrap(), &headers(h), 100)
        };
        assert!(ok(200, &[]));
        assert!(!ok(206, &[]), "a partial answer is not the answer");
        assert!(!ok(500, &[]));
        assert!(!ok(200, &[("set-cookie", "a=b")]));
        assert!(!ok(200, &[("cache-control", "private")]));
        assert!(!ok(200, &[("cache-control", "max-age=0")]));
        assert!(!ok(200, &[("cache-control", "s-maxage=junk")]));
        assert!(!ok(200, &[("cache-control", "no-cache")]));
        assert!(ok(
            200,
            &[
                ("cache-control", "no-cache"),
                ("content-type", "text/event-stream")
            ]
        ));
        assert!(!ok(200, &[("vary", "accept, *")]));
        assert!(!ok(200, &[("content-length", "101")]));
        assert!(ok(200, &[("content-length", "100")]));
    }

    #[test]
    fn an_event_stream_that_reports_an_error_in_band_is_recognised() {
        assert!(sse_reports_error(
            b"data: {\"x\":1}\n\nevent: error\ndata: boom\n\n"
        ));
        assert!(sse_reports_error(
            b"data:{ \"error\": {\"message\": \"overloaded\"}}\r\n\r\n"
        ));
        assert!(!sse_reports_error(
            b"data: {\"text\":\"an error\"}\n\ndata: [DONE]\n\n"
        ));
    }

    #[test]
    fn a_varying_entry_answers_only_the_same_values_of_the_named_headers() {
        let response = headers(&[("vary", "Accept-Language")]);
        let en = headers(&[("accept-language", "en")]);
        let mut entry = response.clone();
        entry.insert(VARY_KEY, vary_fingerprint(&response, &en).unwrap());
        assert!(vary_matches(&entry, &en));
        assert!(!vary_matches(
            &entry,
            &headers(&[("accept-language", "de")])
        ));
        assert!(!vary_matches(&entry, &HeaderMap::new()));
        assert!(vary_matches(&HeaderMap::new(), &en), "no Vary: any request");
    }

    #[test]
    fn a_stored_response_keeps_no_hop_by_hop_header_nor_the_cache_marks() {
        let stored = storable_headers(&headers(&[
            ("connection", "x-trace"),
            ("x-trace", "1"),
            ("x-cache", "MISS"),
            ("content-type", "application/json"),
        ]));
        assert_eq!(stored.len(), 1, "{stored:?}");
    }
}
