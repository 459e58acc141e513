//! A bare hyper server that reads the request body and answers one fixed chat completion
//! (`support/bare_completion.rs`): the baseline of `benches/gateway.sh`, and the gateway's
//! upstream there (the one miss that fills the cache comes from here).
//!
//! ```text
//! cargo run --release --example completion_server -- 127.0.0.1:0    # prints the address it bound
//! ```
//!
//! The tokio multi-threaded runtime with its default worker count, as `#[tokio::main]` gives.

use std::io::Write;

#[path = "support/bare_completion.rs"]
mod bare_completion;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", listener.local_addr()?)?;
    out.flush()?;
    bare_completion::serve(listener).await;
    Ok(())
}
