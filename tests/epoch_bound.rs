//! docs/design.md §4 rule 8, "nothing grows forever", for dep epochs: a dep invalidated once per
//! row (`row:<uuid>`) must not leave state behind for every row. A million one-off
//! invalidations, against a `MemoryStore` (its dep index) and a Redis (`DBSIZE`), with a short
//! put deadline so the retention (twice the deadline here) passes during the run.

mod support;

use std::time::{Duration, Instant};

use cachecore::{CacheStore, MemoryStore};

/// One-off invalidations per test.
const ROWS: usize = 1_000_000;

/// How much per-dep state may be held at any moment: what one retention's worth of
/// invalidations leaves at the rates these tests reach, with room to spare, and far below
/// [`ROWS`]. A store that forgets nothing ends at `ROWS`.
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
        held = held.max(dbsize());
        assert!(
            held < FLAT,
            "DBSIZE {held} after {next} one-off invalidations"
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
