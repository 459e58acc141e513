//! `POST /v1/invalidate`: the success shapes, and every bad-input case with its status, its
//! JSON error, and the store left unchanged.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use cachecore::auth::{bearer_token, AuthError};
use cachecore::invalidate::{InvalidateFuture, InvalidateService, Invalidator, MAX_BODY_BYTES};
use cachecore::{
    CacheStatus, CacheStore, CachecoreLayer, Dep, DepError, Invalidated, Invalidation, MemoryStore,
    Namespace, RequestBody, RequestContext, StoreError, StoreErrorKind,
};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

const TENANT: &str = "acme";
const TOKEN: &str = "token-of-acme";

/// `Bearer token-of-acme` is tenant `acme`; any other token is invalid.
fn auth(headers: &HeaderMap) -> Result<Namespace, AuthError> {
    match bearer_token(headers) {
        Some(TOKEN) => Ok(Namespace::new(TENANT, "1")),
        Some(_) => Err(AuthError::Invalid("unknown token".into())),
        None => Err(AuthError::Missing),
    }
}

type Cached = BoxCloneService<
    Request<Full<Bytes>>,
    Response<cachecore::ResponseBody<Full<Bytes>>>,
    Infallible,
>;

/// A cache with one entry that depends on `doc:1` and `table:products`, the invalidation
/// service in front of it, and a way to ask whether the entry is still served.
struct Fixture {
    layer: CachecoreLayer,
    api: InvalidateService,
    cached: Cached,
    upstream_calls: Arc<AtomicUsize>,
}

impl Fixture {
    async fn new() -> Self {
        Self::with(CachecoreLayer::builder().tenant(TENANT).build()).await
    }

    async fn on(store: Arc<dyn CacheStore>) -> Self {
        Self::with(
            CachecoreLayer::builder()
                .tenant(TENANT)
                .shared_store(store)
                .build(),
        )
        .await
    }

    async fn with(layer: CachecoreLayer) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let cached = ServiceBuilder::new()
            .layer(layer.clone())
            .service(tower::service_fn(
                move |_req: Request<RequestBody<Full<Bytes>>>| {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "answer {n}"
                        )))))
                    }
                },
            ));
        let f = Self {
            api: InvalidateService::new(layer.clone(), auth),
            layer,
            cached: BoxCloneService::new(cached),
            upstream_calls: calls,
        };
        assert_eq!(f.entry_status().await, CacheStatus::Miss);
        assert_eq!(f.entry_status().await, CacheStatus::Hit);
        f
    }

    async fn entry_status(&self) -> CacheStatus {
        let mut req = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"model":"m"}"#)))
            .unwrap();
        req.extensions_mut().insert(RequestContext::with_deps([
            Dep::new("doc:1").hash("v1"),
            Dep::new("table:products"),
        ]));
        let res = self.cached.clone().oneshot(req).await.unwrap();
        let status = *res.extensions().get::<CacheStatus>().unwrap();
        // The entry is written when the body has been read to its end.
        res.into_body().collect().await.unwrap();
        status
    }

    async fn call<B>(&self, req: Request<B>) -> (StatusCode, HeaderMap, Value)
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let res = self.api.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(parts.headers["content-type"], "application/json");
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (parts.status, parts.headers, json)
    }

    /// A bad request: the status, the error code, the message naming the problem, and
    /// nothing invalidated.
    async fn rejects(
        &self,
        req: Request<Full<Bytes>>,
        status: StatusCode,
        code: &str,
        needle: &str,
    ) -> HeaderMap {
        let before = self.layer.metrics().invalidations;
        let (got, headers, body) = self.call(req).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
        assert_eq!(
            self.layer.metrics().invalidations,
            before,
            "nothing invalidated"
        );
        assert_eq!(
            self.entry_status().await,
            CacheStatus::Hit,
            "entry still served"
        );
        headers
    }
}

fn post() -> http::request::Builder {
    Request::post("/v1/invalidate").header("authorization", format!("Bearer {TOKEN}"))
}

fn json_req(body: impl Into<String>) -> Request<Full<Bytes>> {
    let body = body.into();
    post()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

#[tokio::test]
async fn single_form_answers_ok_dep_id_keys_deleted() {
    let f = Fixture::new().await;
    let (status, _, body) = f
        .call(json_req(r#"{"dep_id":"doc:1","new_hash":"v2"}"#))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"ok": true, "dep_id": "doc:1", "keys_deleted": 1})
    );
    assert_eq!(f.entry_status().await, CacheStatus::Miss);
    assert_eq!(f.upstream_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn new_hash_is_optional() {
    let f = Fixture::new().await;
    let (status, _, body) = f.call(json_req(r#"{"dep_id":"table:products"}"#)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ok"], true);
    assert_eq!(f.entry_status().await, CacheStatus::Miss);
}

#[tokio::test]
async fn batch_form_answers_one_result_per_id_in_order() {
    let f = Fixture::new().await;
    let (status, _, body) = f
        .call(json_req(
            r#"{"dep_ids":["table:prices","table:products"],"new_hash":null}"#,
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"results": [
            {"ok": true, "dep_id": "table:prices", "keys_deleted": 0, "error": null},
            {"ok": true, "dep_id": "table:products", "keys_deleted": 1, "error": null},
        ]})
    );
    assert_eq!(f.entry_status().await, CacheStatus::Miss);
}

#[tokio::test]
async fn curl_default_content_type_and_none_are_accepted() {
    // `curl -d '{...}'` sends application/x-www-form-urlencoded; the hosted product's recipes
    // rely on it.
    let f = Fixture::new().await;
    let req = post()
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(br#"{"dep_id":"doc:2"}"#)))
        .unwrap();
    assert_eq!(f.call(req).await.0, StatusCode::OK);
    let req = post()
        .body(Full::new(Bytes::from_static(br#"{"dep_id":"doc:2"}"#)))
        .unwrap();
    assert_eq!(f.call(req).await.0, StatusCode::OK);
    let req = post()
        .header(
            "content-type",
            "application/merge-patch+json; charset=utf-8",
        )
        .body(Full::new(Bytes::from_static(br#"{"dep_id":"doc:2"}"#)))
        .unwrap();
    assert_eq!(f.call(req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn malformed_json_is_400() {
    let f = Fixture::new().await;
    for body in [
        r#"{"dep_id": "doc:1""#,
        "",
        "dep_id=doc:1",
        "{'dep_id': 'doc:1'}",
    ] {
        f.rejects(
            json_req(body),
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "not valid JSON",
        )
        .await;
    }
}

#[tokio::test]
async fn wrong_types_are_400() {
    let f = Fixture::new().await;
    for (body, needle) in [
        (r#"["doc:1"]"#, "JSON object"),
        (r#""doc:1""#, "JSON object"),
        (r#"{"dep_id": 1}"#, "dep_id must be a string"),
        (r#"{"dep_id": null}"#, "dep_id must be a string"),
        (r#"{"dep_id": ["doc:1"]}"#, "dep_id must be a string"),
        (r#"{"dep_ids": "doc:1"}"#, "dep_ids must be an array"),
        (
            r#"{"dep_ids": ["doc:1", 2]}"#,
            "dep_ids[1] must be a string",
        ),
        (
            r#"{"dep_id": "doc:1", "new_hash": 2}"#,
            "new_hash must be a string",
        ),
        (r#"{"dep_id": "doc:1", "dep_ids": ["doc:1"]}"#, "not both"),
        (r#"{"new_hash": "v2"}"#, "missing field"),
        (r#"{}"#, "missing field"),
    ] {
        f.rejects(
            json_req(body),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            needle,
        )
        .await;
    }
}

#[tokio::test]
async fn missing_credentials_are_401() {
    let f = Fixture::new().await;
    let req = Request::post("/v1/invalidate")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"dep_id":"doc:1"}"#)))
        .unwrap();
    let headers = f
        .rejects(
            req,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no credentials",
        )
        .await;
    assert!(headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
}

#[tokio::test]
async fn invalid_credentials_are_401() {
    let f = Fixture::new().await;
    for authorization in ["Bearer someone-else", "Basic YWxhZGRpbjpvcGVuc2VzYW1l"] {
        let req = Request::post("/v1/invalidate")
            .header("authorization", authorization)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"dep_id":"doc:1"}"#)))
            .unwrap();
        f.rejects(req, StatusCode::UNAUTHORIZED, "unauthorized", "credentials")
            .await;
    }
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let f = Fixture::new().await;
    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        let req = post()
            .method(method)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"dep_id":"doc:1"}"#)))
            .unwrap();
        let headers = f
            .rejects(
                req,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                method,
            )
            .await;
        assert_eq!(headers["allow"], "POST");
    }
}

#[tokio::test]
async fn non_json_content_type_is_415() {
    let f = Fixture::new().await;
    for ct in [
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/xml",
    ] {
        let req = post()
            .header("content-type", ct)
            .body(Full::new(Bytes::from_static(br#"{"dep_id":"doc:1"}"#)))
            .unwrap();
        f.rejects(
            req,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "not JSON",
        )
        .await;
    }
}

#[tokio::test]
async fn body_over_64_kib_is_413() {
    let f = Fixture::new().await;
    let ids: Vec<String> = (0..999).map(|i| format!("doc:{i:0>60}")).collect();
    let body = json!({ "dep_ids": ids }).to_string();
    assert!(body.len() > MAX_BODY_BYTES);
    f.rejects(
        json_req(body),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "65536",
    )
    .await;
}

/// An endless body of 16 KiB frames with no declared length, counting what was pulled.
struct Endless(Arc<AtomicUsize>);

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.fetch_add(16 * 1024, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b' '; 16 * 1024])))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::new()
    }
}

#[tokio::test]
async fn oversized_body_is_refused_while_reading_never_buffered() {
    let f = Fixture::new().await;
    let pulled = Arc::new(AtomicUsize::new(0));
    let req = post()
        .header("content-type", "application/json")
        .body(Endless(Arc::clone(&pulled)))
        .unwrap();
    let (status, _, body) = f.call(req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "payload_too_large");
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(pulled <= MAX_BODY_BYTES + 16 * 1024, "read {pulled} bytes");
    assert_eq!(f.entry_status().await, CacheStatus::Hit);
}

#[tokio::test]
async fn declared_oversized_length_is_refused_before_reading() {
    let f = Fixture::new().await;
    let pulled = Arc::new(AtomicUsize::new(0));
    struct Declared(Endless);
    impl Body for Declared {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Pin::new(&mut self.get_mut().0).poll_frame(cx)
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(10 * 1024 * 1024)
        }
    }
    let req = post()
        .header("content-type", "application/json")
        .body(Declared(Endless(Arc::clone(&pulled))))
        .unwrap();
    assert_eq!(f.call(req).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(pulled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn empty_dep_id_is_422() {
    let f = Fixture::new().await;
    f.rejects(
        json_req(r#"{"dep_id":""}"#),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_dep_id",
        "empty",
    )
    .await;
}

#[tokio::test]
async fn dep_id_over_512_bytes_is_422() {
    let f = Fixture::new().await;
    let long = "d".repeat(513);
    f.rejects(
        json_req(json!({ "dep_id": long }).to_string()),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_dep_id",
        "513 bytes",
    )
    .await;
    // 512 is fine.
    let (status, _, _) = f
        .call(json_req(json!({ "dep_id": "d".repeat(512) }).to_string()))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn control_characters_are_422() {
    let f = Fixture::new().await;
    for body in [
        r#"{"dep_id":"doc:1\n"}"#,
        r#"{"dep_id":"doc\u0000:1"}"#,
        r#"{"dep_id":"doc:\u001b[31m1"}"#,
    ] {
        f.rejects(
            json_req(body),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dep_id",
            "control character",
        )
        .await;
    }
    f.rejects(
        json_req(r#"{"dep_id":"doc:1","new_hash":"v\r\n2"}"#),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_new_hash",
        "new_hash has white space",
    )
    .await;
    // The same rule as the layer and the queue: printable ASCII, no spaces, 1 to 256 bytes.
    for hash in ["\"v 2\"", "\"\"", "\"caf\u{e9}\""] {
        f.rejects(
            json_req(format!(r#"{{"dep_id":"doc:1","new_hash":{hash}}}"#)),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_new_hash",
            "new_hash",
        )
        .await;
    }
}

#[tokio::test]
async fn batch_over_1000_ids_is_422() {
    let f = Fixture::new().await;
    let ids: Vec<String> = (0..1001).map(|i| format!("d{i}")).collect();
    f.rejects(
        json_req(json!({ "dep_ids": ids }).to_string()),
        StatusCode::UNPROCESSABLE_ENTITY,
        "batch_too_large",
        "1001",
    )
    .await;
    let ids: Vec<String> = (0..1000).map(|i| format!("d{i}")).collect();
    assert_eq!(
        f.call(json_req(json!({ "dep_ids": ids }).to_string()))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn empty_batch_is_422() {
    let f = Fixture::new().await;
    f.rejects(
        json_req(r#"{"dep_ids":[]}"#),
        StatusCode::UNPROCESSABLE_ENTITY,
        "empty_batch",
        "empty",
    )
    .await;
}

#[tokio::test]
async fn one_bad_id_rejects_the_whole_batch_before_touching_the_store() {
    let f = Fixture::new().await;
    f.rejects(
        json_req(r#"{"dep_ids":["doc:1","table:products",""]}"#),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_dep_id",
        "dep_ids[2]",
    )
    .await;
}

/// Fails every invalidation, as a store that is down would.
struct Down;

impl Invalidator for Down {
    fn invalidate(&self, invalidation: Invalidation) -> InvalidateFuture<'_> {
        let down = StoreError::new(StoreErrorKind::Backend, "connection refused");
        Box::pin(std::future::ready(Invalidated::from_results(
            invalidation
                .dep_ids()
                .map(|id| Err(DepError::store(id, &down)))
                .collect(),
        )))
    }
}

#[tokio::test]
async fn store_failure_is_503_with_the_error() {
    let api = InvalidateService::new(Down, auth);
    let res = api
        .clone()
        .oneshot(json_req(r#"{"dep_id":"doc:1"}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["ok"], false);
    assert_eq!(body["dep_id"], "doc:1");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("connection refused"));

    let res = api
        .oneshot(json_req(r#"{"dep_ids":["a","b"]}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["results"][1]["ok"], false);
}

#[tokio::test]
async fn a_token_only_touches_its_own_tenant() {
    // Two tenants on one store, each with an entry that depends on `doc:1`.
    let store: Arc<dyn CacheStore> = Arc::new(MemoryStore::new());
    let f = Fixture::on(store.clone()).await;
    let other = Fixture::with(
        CachecoreLayer::builder()
            .tenant("other")
            .shared_store(store)
            .build(),
    )
    .await;
    let (status, _, _) = f.call(json_req(r#"{"dep_id":"doc:1"}"#)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(f.entry_status().await, CacheStatus::Miss);
    assert_eq!(other.entry_status().await, CacheStatus::Hit);
}

#[tokio::test]
async fn mounts_under_axum_route_service() {
    let f = Fixture::new().await;
    let app: axum::Router = axum::Router::new().route_service("/v1/invalidate", f.api.clone());
    let res = app
        .clone()
        .oneshot(
            Request::post("/v1/invalidate")
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(
                    r#"{"dep_id":"doc:1","new_hash":"v2"}"#,
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = app
        .oneshot(
            Request::get("/v1/invalidate")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(f.entry_status().await, CacheStatus::Miss);
}
