//! Every header the crate names, and what it reads from or strips off a message's headers.
//!
//! One place for the names, so the engine, the adapters, the wire format and the gateway never
//! disagree about a spelling or about which headers belong to a connection rather than to the
//! message (docs/design.md §5 and §8).

use http::header::{self, HeaderMap, HeaderName};

/// `X-Cache`: what the cache did with the request (`HIT_L1`, `MISS`, ...).
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// `X-Cache-Age`: seconds since the served entry was stored.
pub const X_CACHE_AGE: HeaderName = HeaderName::from_static("x-cache-age");
/// `X-Cache-Similarity`: 1.00 for exact (L1) hits, 0.00 otherwise (wire-compatible mode only);
/// an L2 hit carries the similarity it matched with.
pub const X_CACHE_SIMILARITY: HeaderName = HeaderName::from_static("x-cache-similarity");
/// `X-Cache-Error`: why a request's cache instructions were rejected (the request bypassed).
pub const X_CACHE_ERROR: HeaderName = HeaderName::from_static("x-cache-error");

/// `X-CacheCore-Token`: the tenant token, when `Authorization` is taken by something else (in a
/// gateway, often the upstream provider's API key).
pub const X_CACHECORE_TOKEN: HeaderName = HeaderName::from_static("x-cachecore-token");
/// `X-CacheCore-Deps`: the deps a request's response is derived from.
pub const X_CACHECORE_DEPS: HeaderName = HeaderName::from_static("x-cachecore-deps");
/// `X-CacheCore-Bypass`: `1` or `true` makes the request a bypass.
///
/// Not in the hosted product's header table; it is how a caller in another language asks for
/// what the SDK's `request_context(bypass=True)` does.
pub const X_CACHECORE_BYPASS: HeaderName = HeaderName::from_static("x-cachecore-bypass");
/// `X-CacheCore-Min-Similarity`: a cosine similarity that raises the L2 threshold for this
/// request (feature `semantic`); it can make L2 stricter, never looser. Not a number in
/// `[-1, 1]`: `BYPASS` with `X-Cache-Error`.
pub const X_CACHECORE_MIN_SIMILARITY: HeaderName =
    HeaderName::from_static("x-cachecore-min-similarity");

/// Stored beside a response that names request headers in `Vary`: a digest of the values the
/// request that produced it had for them (RFC 9111 §4.1). Never sent to a client.
pub(crate) const VARY_KEY: HeaderName = HeaderName::from_static("x-cachecore-vary-key");

/// `X-Api-Key`, a provider key in a header of its own.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// `Api-Key` (Azure OpenAI).
const API_KEY: HeaderName = HeaderName::from_static("api-key");
/// `X-Goog-Api-Key` (Gemini).
const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
/// `Keep-Alive` (RFC 9112 appendix C.2.2), which `http` has no constant for.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection`, the pre-standard `Connection` some clients still send.
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that carry the caller's credentials by default (docs/design.md §3): every one a
/// request has goes into its key partition.
pub(crate) fn default_credential_headers() -> Vec<HeaderName> {
    vec![
        header::AUTHORIZATION,
        header::PROXY_AUTHORIZATION,
        header::COOKIE,
        X_API_KEY,
        API_KEY,
        X_GOOG_API_KEY,
        X_CACHECORE_TOKEN,
    ]
}

/// The headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// Removes the hop-by-hop headers: the fixed list and every header `Connection` names. A
/// forwarded message and a stored response both lose them (never replayed, never passed on).
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = comma_separated(headers, &header::CONNECTION)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The elements of every `name` header, split at commas, trimmed, empty ones skipped.
fn comma_separated<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
}

/// The directives of every `Cache-Control` header: `(name, value)`, quotes taken off values.
pub(crate) fn cache_control(headers: &HeaderMap) -> impl Iterator<Item = (&str, Option<&str>)> {
    comma_separated(headers, &header::CACHE_CONTROL).map(|d| match d.split_once('=') {
        Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
        None => (d, None),
    })
}

/// The header names a response's `Vary` lists, as written.
pub(crate) fn vary_names(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    comma_separated(headers, &header::VARY)
}

/// The declared `Content-Length`, when it is a number.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a message is a stream of server-sent events.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_removal_takes_the_fixed_list_and_the_headers_connection_names() {
        let mut h = headers(&[
            ("connection", "close, x-session"),
            ("x-session", "abc"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eA=="),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/json"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn cache_control_directives_are_split_trimmed_and_unquoted() {
        let h = headers(&[
            ("cache-control", r#"no-cache, max-age="0""#),
            ("cache-control", " ,private"),
        ]);
        let d: Vec<_> = cache_control(&h).collect();
        assert_eq!(
            d,
            [
                ("no-cache", None),
                ("max-age", Some("0")),
                ("private", None)
            ]
        );
    }

    #[test]
    fn event_stream_is_recognised_with_parameters_and_any_case() {
        assert!(is_event_stream(&headers(&[(
            "content-type",
            "Text/Event-Stream; charset=utf-8"
        )])));
        assert!(!is_event_stream(&headers(&[(
            "content-type",
            "application/json"
        )])));
    }
}
