//! The client examples, run as tests: each example's `run()` is what `cargo run --example`
//! does, against its own local stand-in server.

// Each example carries the shared stand-in server as a module of its own (so it runs alone with
// `cargo run --example`); compiling two examples here includes that file twice, on purpose.
#![allow(clippy::duplicate_mod)]

use cachecore::CacheStatus::{Hit, Miss};

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/hyper_client.rs"]
mod hyper_client;

#[cfg(feature = "reqwest")]
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/async_openai.rs"]
mod async_openai_example;

#[tokio::test]
async fn hyper_client_example() {
    let report = hyper_client::run().await.unwrap();
    assert_eq!(report.statuses, [Miss, Hit, Miss, Hit, Miss]);
    assert_eq!(report.upstream_calls, 3);
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn async_openai_example() {
    let report = async_openai_example::run().await.unwrap();
    assert_eq!(report.statuses, [Miss, Hit, Miss]);
    assert_eq!(report.upstream_calls, 2);
    assert!(report
        .answers
        .iter()
        .all(|a| a.ends_with("Summarise contract 123")));
}
