//! Deadlines from a timeout that may be too long to add (`Duration::MAX`): the gateway's head
//! watchdog (gateway/heads.rs) and the lean Redis connection's sweeper (store/redis/lean.rs).

use std::time::Duration;

use tokio::time::Instant;

/// `at + d`, or a moment decades away when that overflows.
pub(crate) fn after(at: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}
