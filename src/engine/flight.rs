//! Single-flight: one upstream call per key at a time; identical requests wait for it within
//! bounds (docs/design.md §4 rule 8), then read its answer back from the store.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::store::CacheKey;

/// The upstream calls in flight, and the keys being refreshed in the background.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    calls: Mutex<HashMap<CacheKey, watch::Receiver<FlightState>>>,
    refreshing: Mutex<HashSet<CacheKey>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps behind these locks stay consistent at every await-free step; a panic elsewhere
    // must not turn every later request into a failure.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the leader of an in-flight call tells its followers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FlightState {
    /// The upstream call runs.
    Pending,
    /// The response head arrived and is being recorded: its body should end soon.
    Recording,
    /// Whether the leader's answer was stored (if not, followers call upstream themselves).
    Done { stored: bool },
}

pub(crate) enum Flight {
    Leader(FlightGuard),
    Follower(watch::Receiver<FlightState>),
}

impl Flight {
    /// Waits for the leader, within bounds (docs/design.md §4 rule 8); true when it stored its
    /// answer. At most `total` in all, and at most `after_head` once the leader's response head
    /// has arrived. Without a Tokio runtime there is no timer to bound the wait: no waiting.
    pub(crate) async fn wait(
        mut rx: watch::Receiver<FlightState>,
        total: Duration,
        after_head: Duration,
    ) -> bool {
        if tokio::runtime::Handle::try_current().is_err() {
            return false;
        }
        let start = tokio::time::Instant::now();
        let mut deadline = start + total;
        let mut head_seen = false;
        loop {
            match *rx.borrow_and_update() {
                FlightState::Done { stored } => return stored,
                FlightState::Recording if !head_seen => {
                    head_seen = true;
                    deadline = deadline.min(tokio::time::Instant::now() + after_head);
                }
                FlightState::Recording | FlightState::Pending => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The leader is gone without a word, or too slow: stop waiting on it.
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }
}

/// Held by the leader of an in-flight call; dropping it without [`finish`](Self::finish)
/// releases the followers to call the inner service themselves.
pub(crate) struct FlightGuard {
    flights: Arc<Flights>,
    key: Option<CacheKey>,
    pub(super) tx: watch::Sender<FlightState>,
}

impl FlightGuard {
    pub(crate) fn finish(mut self, stored: bool) {
        self.release(stored);
    }

    fn release(&mut self, stored: bool) {
        if let Some(key) = self.key.take() {
            lock(&self.flights.calls).remove(&key);
            self.tx.send_replace(FlightState::Done { stored });
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.release(false);
    }
}

/// Held while a background refresh of a stale entry runs.
pub(crate) struct RefreshGuard {
    flights: Arc<Flights>,
    key: CacheKey,
}

impl Drop for RefreshGuard {
    fn drop(&mut self) {
        lock(&self.flights.refreshing).remove(&self.key);
    }
}

impl Flights {
    /// Joins the in-flight upstream call for `key`, or becomes its leader.
    pub(crate) fn join(self: &Arc<Self>, key: &CacheKey) -> Flight {
        let mut flights = lock(&self.calls);
        if let Some(rx) = flights.get(key) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(FlightState::Pending);
        flights.insert(key.clone(), rx);
        Flight::Leader(FlightGuard {
            flights: Arc::clone(self),
            key: Some(key.clone()),
            tx,
        })
    }

    /// Marks `key` as being refreshed in the background; `None` when a refresh already runs.
    pub(crate) fn begin_refresh(self: &Arc<Self>, key: &CacheKey) -> Option<RefreshGuard> {
        if lock(&self.refreshing).insert(key.clone()) {
            Some(RefreshGuard {
                flights: Arc::clone(self),
                key: key.clone(),
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        CacheKey::new(Arc::from("t"), [n; 32])
    }

    fn follower(f: Flight) -> watch::Receiver<FlightState> {
        match f {
            Flight::Follower(rx) => rx,
            Flight::Leader(_) => panic!("expected a follower"),
        }
    }

    #[test]
    fn the_first_caller_of_a_key_leads_and_the_next_follows() {
        let flights = Arc::new(Flights::default());
        let Flight::Leader(leader) = flights.join(&key(1)) else {
            panic!("the first caller leads");
        };
        let _ = follower(flights.join(&key(1)));
        // Another key has a flight of its own.
        assert!(matches!(flights.join(&key(2)), Flight::Leader(_)));
        leader.finish(true);
        assert!(matches!(flights.join(&key(1)), Flight::Leader(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_its_followers_at_once_with_nothing_stored() {
        let flights = Arc::new(Flights::default());
        let Flight::Leader(leader) = flights.join(&key(1)) else {
            panic!("the first caller leads");
        };
        let rx = follower(flights.join(&key(1)));
        drop(leader);
        let waited = tokio::time::timeout(
            Duration::from_secs(5),
            Flight::wait(rx, Duration::from_secs(60), Duration::from_secs(60)),
        )
        .await;
        assert_eq!(waited, Ok(false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_stops_waiting_after_the_head_bound_once_the_leader_records() {
        let flights = Arc::new(Flights::default());
        let Flight::Leader(leader) = flights.join(&key(1)) else {
            panic!("the first caller leads");
        };
        let rx = follower(flights.join(&key(1)));
        leader.tx.send_replace(FlightState::Recording);
        let started = tokio::time::Instant::now();
        let stored = Flight::wait(rx, Duration::from_secs(30), Duration::from_secs(1)).await;
        assert!(!stored);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        drop(leader);
    }

    #[test]
    fn one_background_refresh_per_key_until_its_guard_drops() {
        let flights = Arc::new(Flights::default());
        let guard = flights
            .begin_refresh(&key(1))
            .expect("the first refresh runs");
        assert!(flights.begin_refresh(&key(1)).is_none());
        drop(guard);
        assert!(flights.begin_refresh(&key(1)).is_some());
    }
}
