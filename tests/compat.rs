//! The layer compiles into the stacks users have, without adapters.

use std::convert::Infallible;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use cachecore::{CacheStatus, CachecoreLayer, MemoryStore};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};

#[tokio::test]
async fn works_under_axum_router_layer() {
    let layer = CachecoreLayer::builder().store(MemoryStore::new()).build();
    let app: Router = Router::new()
        .route(
            "/v1/chat",
            post(|body: String| async move { format!("echo {body}") }),
        )
        .layer(layer);
    for expected in [CacheStatus::Miss, CacheStatus::Hit] {
        let res = app
            .clone()
            .oneshot(
                http::Request::post("/v1/chat")
                    .body(axum::body::Body::from("hi"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.headers()["x-cache"], expected.as_str());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "echo hi");
    }
}

#[tokio::test]
async fn works_in_front_of_a_hyper_util_client() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/v1/chat", post(|| async { "answer" }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut svc = ServiceBuilder::new()
        .layer(CachecoreLayer::new())
        .service(client);
    for expected in ["MISS", "HIT_L1"] {
        let req = http::Request::post(format!("http://{addr}/v1/chat"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.headers()["x-cache"], expected);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "answer");
    }
}

#[tokio::test]
async fn keeps_an_infallible_error_type() {
    let svc = tower::service_fn(
        |_req: http::Request<cachecore::RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"x"))))
        },
    );
    let svc = ServiceBuilder::new()
        .layer(CachecoreLayer::new())
        .service(svc);
    fn infallible<S: Service<http::Request<Full<Bytes>>, Error = Infallible>>(_: &S) {}
    infallible(&svc);
}
