//! docs/design.md §4 rule 8, "nothing grows forever", for dep epochs: a dep invalidated once per
//! row (`row:<uuid>`) must not leave state behind for every row. A million one-off
//! invalidations, against a `MemoryStore` (its dep index) and a Redis (`DBSIZE`), with a short
//! put deadline so the retention (twice the deadline here) passes during the run.

mod support;

use std::time::{Duration, Instant};

use cachecore::{CacheStore, MemoryStore};

/// One-off invalidations per test.
const ROWS: usize = 1_000_000;

/// How much per-dep state a store may hold at a moment of the run: twice the state of the ids
/// invalidated within the last `window` (one retention's worth, with room for what the store
/// has yet to sweep), plus 20,000. It follows the rate the machine reaches, moment by moment:
/// one VM ran the Redis test at 140,000 invalidations a second, and a fixed bound tuned on a
/// slower one failed there; a bound from the run's average rate failed on a loaded machine,
/// whose test thread ran in bursts at the full rate. After a pause of the test's thread the
/// window holds few ids, but the checks come after a batch of writes, which have swept (or
/// Redis has expired) what the pause left due. A store that forgets nothing fails it once the
/// run is longer than a few windows; the drains at the end of each test catch it too.
struct Pace {
    window: Duration,
    /// The store's state per invalidated id (the memory store's index holds the dep's state
    /// and its place in the queue of epochs to forget).
    per_id: usize,
    started: Instant,
    /// (when, ids invalidated by then), oldest first: one per check.
    done: Vec<(Instant, usize)>,
}

impl Pace {
    fn new(window: Duration, per_id: usize) -> Self {
        let started = Instant::now();
        Self {
            window,
            per_id,
            started,
            done: vec![(started, 0)],
        }
    }

    /// Records that `done` ids were invalidated by now; returns the bound now, and how many ids
    /// the last `window` (or more: checks are apart) holds.
    fn bound(&mut self, done: usize) -> (usize, usize) {
        let now = Instant::now();
        self.done.push((now, done));
        let before = self
            .done
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= self.window)
            .map_or(0, |&(_, n)| n);
        let recent = done - before;
        (2 * self.per_id * recent + 20_000, recent)
    }
}

#[test]
fn a_million_one_off_invalidations_leave_the_memory_dep_index_flat() {
    const DEADLINE: Duration = Duration::from_millis(50);
    let store = MemoryStore::builder().put_deadline(DEADLINE).build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // The retention (twice the deadline) and as long again for the sweep, which forgets a few
    // states per write once their time has come.
    let mut pace = Pace::new(DEADLINE * 4, 2);
    let mut held = 0;
    let mut tightest = 0f64;
    rt.block_on(async {
        for row in 0..ROWS {
            store
                .invalidate("t", &format!("row:{row:08x}"), "gone")
                .await
                .unwrap();
            if row % 10_000 == 0 {
                let size = store.dep_index_size();
                held = held.max(size);
                let (bound, recent) = pace.bound(row + 1);
                tightest = tightest.max(size as f64 / bound as f64);
                assert!(
                    size < bound,
                    "{size} dep states after {row} one-off invalidations, {recent} of them in the last {:?}",
                    pace.window
                );
            }
        }
    });
    println!(
        "{ROWS} invalidations in {:?}, at most {held} dep states held, at most {:.0}% of the bound",
        pace.started.elapsed(),
        tightest * 100.0
    );
    // Once the writes slow down, what the burst left is forgotten too.
    let drained = Instant::now() + Duration::from_secs(10);
    rt.block_on(async {
        loop {
            store.invalidate("t", "row:trickle", "t").await.unwrap();
            if store.dep_index_size() <= 1_000 {
                break;
            }
            assert!(
                Instant::now() < drained,
                "still {} dep states",
                store.dep_index_size()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    assert_eq!(store.dep_epoch("t", "row:00000000"), 0);
    assert!(store.dep_epoch("t", "row:trickle") > 0);
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_one_off_invalidations_leave_redis_dbsize_flat() {
    use cachecore::RedisStore;
    use std::sync::Arc;

    const DEADLINE: Duration = Duration::from_millis(500);
    /// Ids per `invalidate_many`, and calls in flight at once (pipelined on one connection).
    const BATCH: usize = 2_000;
    const IN_FLIGHT: usize = 8;

    let server = support::RedisServer::start();
    let store = Arc::new(
        RedisStore::builder()
            .url(server.url())
            .timeout(Duration::from_secs(5))
            .put_deadline(DEADLINE)
            .build()
            .await
            .unwrap(),
    );
    let dbsize = || -> usize { server.cli(&["DBSIZE"]).trim().parse().unwrap() };
    // The retention (twice the deadline), and a second for Redis's sampled expiry, which stops
    // a cycle once a tenth of the keys it samples are expired.
    let mut pace = Pace::new(
        DEADLINE
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(1)),
        1,
    );
    let mut held = 0;
    let mut tightest = 0f64;
    let mut next = 0;
    while next < ROWS {
        let calls: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let ids: Vec<String> = (next..(next + BATCH).min(ROWS))
                    .map(|row| format!("row:{row:08x}"))
                    .collect();
                next = (next + BATCH).min(ROWS);
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                    let results = store.invalidate_many("t", &ids, "gone").await;
                    assert!(results.iter().all(Result::is_ok), "{:?}", results.first());
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        let (bound, recent) = pace.bound(next);
        let size = dbsize();
        held = held.max(size);
        tightest = tightest.max(size as f64 / bound as f64);
        assert!(
            size < bound,
            "DBSIZE {size} after {next} one-off invalidations, {recent} of them in the last {:?}",
            pace.window
        );
    }
    println!(
        "{ROWS} invalidations in {:?}, DBSIZE at most {held}, at most {:.0}% of the bound",
        pace.started.elapsed(),
        tightest * 100.0
    );
    // Redis forgets the rest on its own, with no writes.
    let deadline = Instant::now() + Duration::from_secs(15);
    while dbsize() > 0 {
        assert!(Instant::now() < deadline, "DBSIZE still {}", dbsize());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
