//! docs/design.md §4 rule 8, "nothing grows forever", for dep epochs: a dep invalidated once per
//! row (`row:<uuid>`) must not leave state behind for every row. A million one-off
//! invalidations, against a `MemoryStore` (its dep index) and a Redis (`DBSIZE`), with a short
//! put deadline so the retention (twice the deadline here) passes during the run.

mod support;

use std::time::{Duration, Instant};

use cachecore::{CacheStore, MemoryStore};

/// One-off invalidations per test.
const ROWS: usize = 1_000_000;

/// How much per-dep state the memory store may hold at any moment: what one retention's worth
/// of invalidations leaves at the rate one thread reaches, with room to spare, and far below
/// [`ROWS`]. A store that forgets nothing ends at `ROWS`. (The Redis test's bound follows its
/// measured rate: two threads and pipelining reach far more.)
const FLAT: usize = ROWS / 5;

#[test]
fn a_million_one_off_invalidations_leave_the_memory_dep_index_flat() {
    const DEADLINE: Duration = Duration::from_millis(50);
    let store = MemoryStore::builder().put_deadline(DEADLINE).build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut held = 0;
    rt.block_on(async {
        for row in 0..ROWS {
            store
                .invalidate("t", &format!("row:{row:08x}"), "gone")
                .await
                .unwrap();
            if row % 10_000 == 0 {
                held = held.max(store.dep_index_size());
                assert!(
                    held < FLAT,
                    "{held} dep states after {row} one-off invalidations"
                );
            }
        }
    });
    println!(
        "{ROWS} invalidations in {:?}, at most {held} dep states held",
        started.elapsed()
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
    let started = Instant::now();
    // How many ids were invalidated by when: what Redis may still hold is what the last
    // retention (twice the deadline) wrote, plus what its sampled expiry has not reached yet
    // (it stops a cycle once a tenth of the keys it samples are expired); so the bound follows
    // the rate this machine reaches (one machine ran 140,000 a second: 200,000 keys were live
    // within the retention, and a fixed bound failed). A store that forgets nothing grows
    // past it, and past the drain below.
    const WINDOW: Duration = DEADLINE
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1));
    let mut done: Vec<(Instant, usize)> = vec![(started, 0)];
    let mut held = 0;
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
        let now = Instant::now();
        done.push((now, next));
        let before_window = done
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= WINDOW)
            .map_or(0, |&(_, n)| n);
        let recent = next - before_window;
        let size = dbsize();
        held = held.max(size);
        assert!(
            size < 2 * recent + 20_000,
            "DBSIZE {size} after {next} one-off invalidations, {recent} of them in the last {WINDOW:?}"
        );
    }
    println!(
        "{ROWS} invalidations in {:?}, DBSIZE at most {held}",
        started.elapsed()
    );
    // Redis forgets the rest on its own, with no writes.
    let deadline = Instant::now() + Duration::from_secs(15);
    while dbsize() > 0 {
        assert!(Instant::now() < deadline, "DBSIZE still {}", dbsize());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
