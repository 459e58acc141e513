//! The axum example: the layer on one route of an app, as a user would test it.

use axum::body::Body;
use cachecore::testing::{cache_status, OutcomeRecorder};
use cachecore::{assert_cache_status, CacheStatus};
use http_body_util::BodyExt;
use tower::ServiceExt;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/axum_server.rs"]
mod axum_server;

use axum_server::{app, summary_cache, AppState};

fn summary(doc: u32, body: &'static str) -> http::Request<Body> {
    http::Request::post(format!("/v1/docs/{doc}/summary"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

async fn body_of(res: http::Response<Body>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn the_cached_route_runs_the_expensive_function_once() {
    let state = AppState::new(summary_cache());
    let app = app(state.clone());

    let first = app
        .clone()
        .oneshot(summary(1, r#"{"style":"short"}"#))
        .await
        .unwrap();
    assert_eq!(first.headers()["x-cache"], "MISS");
    let first = body_of(first).await;
    // Same JSON, other spacing: same key.
    let second = app
        .clone()
        .oneshot(summary(1, r#"{ "style" : "short" }"#))
        .await
        .unwrap();
    assert_eq!(second.headers()["x-cache"], "HIT_L1");
    assert_eq!(body_of(second).await, first);
    assert_eq!(state.expensive_calls(), 1);

    // Another body is another answer.
    let long = app
        .clone()
        .oneshot(summary(1, r#"{"style":"long"}"#))
        .await
        .unwrap();
    assert_cache_status!(long, CacheStatus::Miss);
    assert_eq!(state.expensive_calls(), 2);
}

#[tokio::test]
async fn other_routes_are_untouched() {
    let state = AppState::new(summary_cache());
    let app = app(state.clone());
    for _ in 0..2 {
        let res = app
            .clone()
            .oneshot(http::Request::get("/health").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert!(!res.headers().contains_key("x-cache"));
        assert_eq!(cache_status(&res), None);
        assert_eq!(body_of(res).await, "ok");
    }
    // A 404 from the cached route is passed on and not stored.
    for _ in 0..2 {
        let res = app.clone().oneshot(summary(404, "{}")).await.unwrap();
        assert_eq!(res.status(), 404);
        assert_cache_status!(res, CacheStatus::Miss);
    }
    assert_eq!(state.expensive_calls(), 0);
}

#[tokio::test]
async fn editing_the_document_invalidates_its_summaries_only() {
    let state = AppState::new(summary_cache());
    let app = app(state.clone());
    let outcomes = OutcomeRecorder::new();
    let app = tower::ServiceBuilder::new()
        .layer(outcomes.layer())
        .service(app);

    body_of(app.clone().oneshot(summary(1, "{}")).await.unwrap()).await;
    body_of(app.clone().oneshot(summary(1, "{}")).await.unwrap()).await;
    let put = http::Request::put("/v1/docs/1")
        .body(Body::from("A new first sentence. More."))
        .unwrap();
    assert_eq!(app.clone().oneshot(put).await.unwrap().status(), 204);
    let res = app.clone().oneshot(summary(1, "{}")).await.unwrap();
    assert_cache_status!(res, CacheStatus::Miss, "the document changed");
    assert!(body_of(res).await.contains("A new first sentence"));

    // The PUT went through the recorder but not through the cache.
    let statuses: Vec<_> = outcomes.outcomes().into_iter().map(|o| o.status).collect();
    use CacheStatus::{Hit, Miss};
    assert_eq!(statuses, [Some(Miss), Some(Hit), None, Some(Miss)]);
    assert_eq!(state.expensive_calls(), 2);
}

#[tokio::test]
async fn the_example_runs_over_http() {
    let (seen, expensive) = axum_server::run().await.unwrap();
    let x_cache: Vec<_> = seen.iter().map(|(_, _, x, _)| x.as_deref()).collect();
    assert_eq!(
        x_cache,
        [Some("MISS"), Some("HIT_L1"), None, None, Some("MISS")]
    );
    assert_eq!(expensive, 2);
}
