//! The Redis Streams invalidation worker: at-least-once across a worker killed mid-batch,
//! dead-lettering, graceful shutdown. Needs `redis-server` (started on a loopback port).
#![cfg(feature = "redis")]

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachecore::invalidate::{InvalidateFuture, Invalidator};
use cachecore::queue::{InvalidationEvent, InvalidationQueue, QueueWorker, QueueWorkerBuilder};
use cachecore::InvalidationResult;
use redis::streams::StreamPendingReply;
use tokio::sync::{oneshot, Notify, Semaphore};

/// Records every invalidation; can fail some deps always, hang forever after applying one
/// (a worker that dies before it acknowledges), or wait at a gate on one.
#[derive(Clone, Default)]
struct Recorder {
    applied: Arc<Mutex<Vec<String>>>,
    attempts: Arc<Mutex<HashMap<String, usize>>>,
    fail: HashSet<String>,
    hang_after: Option<(String, Arc<Notify>)>,
    gate: Option<(String, Arc<Notify>, Arc<Semaphore>)>,
}

impl Recorder {
    fn applied(&self) -> Vec<String> {
        self.applied.lock().unwrap().clone()
    }

    fn distinct(&self) -> HashSet<String> {
        self.applied().into_iter().collect()
    }

    fn attempts(&self, dep: &str) -> usize {
        self.attempts.lock().unwrap().get(dep).copied().unwrap_or(0)
    }
}

impl Invalidator for Recorder {
    fn invalidate_many<'a>(
        &'a self,
        tenant: &'a str,
        dep_ids: &'a [&'a str],
        _new_hash: Option<&'a str>,
    ) -> InvalidateFuture<'a> {
        Box::pin(async move {
            assert_eq!(tenant, "acme");
            let mut out = Vec::new();
            for id in dep_ids {
                *self
                    .attempts
                    .lock()
                    .unwrap()
                    .entry(id.to_string())
                    .or_default() += 1;
                if let Some((dep, started, permits)) = &self.gate {
                    if dep == id {
                        started.notify_one();
                        permits.acquire().await.unwrap().forget();
                    }
                }
                if self.fail.contains(*id) {
                    out.push(InvalidationResult::failed(*id, "this dep always fails"));
                    continue;
                }
                self.applied.lock().unwrap().push(id.to_string());
                if let Some((dep, hung)) = &self.hang_after {
                    if dep == id {
                        hung.notify_one();
                        std::future::pending::<()>().await;
                    }
                }
                out.push(InvalidationResult::ok(*id, 0));
            }
            out
        })
    }
}

/// A stream, group and dead-letter stream of this test's own on the shared Redis.
struct Names {
    url: String,
    stream: String,
    group: String,
    dead: String,
}

impl Names {
    fn new() -> Self {
        Self {
            url: support::shared_redis().url(),
            stream: support::unique("inv"),
            group: support::unique("group"),
            dead: support::unique("dead"),
        }
    }

    async fn queue(&self) -> InvalidationQueue {
        InvalidationQueue::connect(&self.url)
            .await
            .unwrap()
            .stream(&self.stream)
    }

    fn worker(&self, consumer: &str) -> QueueWorkerBuilder {
        QueueWorker::builder(&self.url)
            .stream(&self.stream)
            .group(&self.group)
            .dead_letter_stream(&self.dead)
            .consumer(consumer)
            .block(Duration::from_millis(50))
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn pending(&self) -> usize {
        let reply: StreamPendingReply = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        reply.count()
    }

    async fn dead_letters(&self) -> Vec<HashMap<String, String>> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.dead)
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        reply
            .ids
            .iter()
            .map(|e| {
                e.map
                    .keys()
                    .map(|k| (k.clone(), e.get::<String>(k).unwrap()))
                    .collect()
            })
            .collect()
    }
}

fn event(dep: &str) -> InvalidationEvent {
    InvalidationEvent::new("acme", dep).new_hash("v2")
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn shutdown_signal() -> (oneshot::Sender<()>, impl Future<Output = ()> + Send) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_applied_at_least_once_when_a_worker_dies_mid_batch() {
    let names = Names::new();
    let queue = names.queue().await;
    let deps: Vec<String> = (0..20).map(|i| format!("doc:{i:02}")).collect();
    for d in &deps {
        queue.publish(&event(d)).await.unwrap();
    }

    // Worker A reads a batch of 8, applies doc:00..doc:05, and dies before acknowledging
    // doc:05 (doc:06 and doc:07 were read and never started).
    let hung = Arc::new(Notify::new());
    let a = Recorder {
        hang_after: Some(("doc:05".into(), Arc::clone(&hung))),
        ..Recorder::default()
    };
    let worker_a = names
        .worker("a")
        .batch_size(8)
        .claim_idle(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let task_a = tokio::spawn(worker_a.run(a.clone(), std::future::pending()));
    tokio::time::timeout(Duration::from_secs(10), hung.notified())
        .await
        .expect("worker A reached doc:05");
    task_a.abort();
    assert!(task_a.await.unwrap_err().is_cancelled());
    assert_eq!(a.distinct().len(), 6);
    assert_eq!(
        names.pending().await,
        3,
        "doc:05..07 left pending by the dead worker"
    );

    // Worker B picks up the new events and, once they have idled, the dead worker's.
    let b = Recorder {
        applied: Arc::clone(&a.applied),
        ..Recorder::default()
    };
    let worker_b = names
        .worker("b")
        .batch_size(8)
        .claim_idle(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let (stop, signal) = shutdown_signal();
    let task_b = tokio::spawn(worker_b.run(b.clone(), signal));
    let all: HashSet<String> = deps.iter().cloned().collect();
    eventually("every event applied", Duration::from_secs(15), || {
        let done = b.distinct() == all;
        async move { done }
    })
    .await;
    eventually("nothing pending", Duration::from_secs(5), || {
        names.pending_is_zero()
    })
    .await;
    stop.send(()).unwrap();
    let report = task_b.await.unwrap().unwrap();

    assert_eq!(report.reclaimed, 3, "{report:?}");
    assert_eq!(report.applied, 15, "{report:?}");
    let applied = b.applied();
    assert_eq!(
        applied.iter().filter(|d| *d == "doc:05").count(),
        2,
        "applied again"
    );
    assert!(names.dead_letters().await.is_empty());
}

impl Names {
    async fn pending_is_zero(&self) -> bool {
        self.pending().await == 0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_goes_to_dead_letter_after_n_attempts() {
    let names = Names::new();
    let queue = names.queue().await;
    let poison_id = {
        queue.publish(&event("doc:ok-1")).await.unwrap();
        let id = queue.publish(&event("doc:poison")).await.unwrap();
        queue.publish(&event("doc:ok-2")).await.unwrap();
        id
    };
    let rec = Recorder {
        fail: ["doc:poison".to_owned()].into(),
        ..Recorder::default()
    };
    let worker = names
        .worker("w")
        .max_deliveries(3)
        .claim_idle(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let (stop, signal) = shutdown_signal();
    let task = tokio::spawn(worker.run(rec.clone(), signal));
    eventually("a dead letter", Duration::from_secs(10), || async {
        names.dead_letters().await.len() == 1
    })
    .await;
    stop.send(()).unwrap();
    let report = task.await.unwrap().unwrap();

    assert_eq!(rec.attempts("doc:poison"), 3);
    assert_eq!(
        rec.distinct(),
        ["doc:ok-1".to_owned(), "doc:ok-2".to_owned()].into()
    );
    assert_eq!(names.pending().await, 0);
    assert_eq!(
        (report.applied, report.dead_lettered, report.failed_attempts),
        (2, 1, 3)
    );
    let dead = &names.dead_letters().await[0];
    assert_eq!(dead["dep_id"], "doc:poison");
    assert_eq!(dead["tenant"], "acme");
    assert_eq!(dead["new_hash"], "v2");
    assert_eq!(dead["original_id"], poison_id);
    assert_eq!(dead["deliveries"], "3");
    assert!(dead["error"].contains("always fails"), "{dead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_is_dead_lettered_at_once() {
    let names = Names::new();
    let mut conn = names.conn().await;
    let _: String = redis::cmd("XADD")
        .arg(&names.stream)
        .arg("*")
        .arg("tenant")
        .arg("acme")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&names.stream)
        .arg("*")
        .arg("tenant")
        .arg("acme")
        .arg("dep_id")
        .arg("")
        .query_async(&mut conn)
        .await
        .unwrap();
    let rec = Recorder::default();
    let worker = names.worker("w").build().await.unwrap();
    let (stop, signal) = shutdown_signal();
    let task = tokio::spawn(worker.run(rec.clone(), signal));
    eventually("two dead letters", Duration::from_secs(10), || async {
        names.dead_letters().await.len() == 2
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let dead = names.dead_letters().await;
    assert!(
        dead[0]["error"].contains("missing field dep_id"),
        "{dead:?}"
    );
    assert!(dead[1]["error"].contains("dep id is empty"), "{dead:?}");
    assert!(rec.applied().is_empty());
    assert_eq!(names.pending().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_event_in_progress() {
    let names = Names::new();
    let queue = names.queue().await;
    for d in ["doc:slow", "doc:after-1", "doc:after-2"] {
        queue.publish(&event(d)).await.unwrap();
    }
    let started = Arc::new(Notify::new());
    let permits = Arc::new(Semaphore::new(0));
    let rec = Recorder {
        gate: Some((
            "doc:slow".into(),
            Arc::clone(&started),
            Arc::clone(&permits),
        )),
        ..Recorder::default()
    };
    // Nobody else would take the rest over for a minute.
    let worker = names
        .worker("w")
        .claim_idle(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let (stop, signal) = shutdown_signal();
    let task = tokio::spawn(worker.run(rec.clone(), signal));
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .unwrap();
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!task.is_finished(), "waits for the event in progress");
    permits.add_permits(1);
    let report = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("returns once the event is done")
        .unwrap()
        .unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(rec.applied(), vec!["doc:slow".to_owned()]);
    assert_eq!(
        names.pending().await,
        2,
        "the rest is left pending, not lost"
    );

    // The same consumer restarted resumes its own pending events at once.
    let worker = names
        .worker("w")
        .claim_idle(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let (stop, signal) = shutdown_signal();
    let task = tokio::spawn(worker.run(rec.clone(), signal));
    eventually("the rest applied", Duration::from_secs(5), || {
        let n = rec.distinct().len();
        async move { n == 3 }
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(names.pending().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_stops_promptly() {
    let names = Names::new();
    let worker = names
        .worker("w")
        .block(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let (stop, signal) = shutdown_signal();
    let task = tokio::spawn(worker.run(Recorder::default(), signal));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let at = Instant::now();
    stop.send(()).unwrap();
    let report = task.await.unwrap().unwrap();
    assert!(
        at.elapsed() < Duration::from_secs(1),
        "took {:?}",
        at.elapsed()
    );
    assert_eq!(report.applied, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_plain_stream_entries() {
    let names = Names::new();
    let queue = names.queue().await;
    let id = queue
        .publish(&InvalidationEvent::new("acme", "doc:1").new_hash("v2"))
        .await
        .unwrap();
    queue
        .publish(&InvalidationEvent::new("acme", "doc:2"))
        .await
        .unwrap();
    let out = support::shared_redis().cli(&["XRANGE", &names.stream, &id, &id]);
    let fields: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(
        fields,
        ["tenant", "acme", "dep_id", "doc:1", "new_hash", "v2"]
    );

    // Any language can publish: an entry written by redis-cli is applied like the others.
    support::shared_redis().cli(&[
        "XADD",
        &names.stream,
        "*",
        "tenant",
        "acme",
        "dep_id",
        "doc:3",
    ]);
    let rec = Recorder::default();
    let worker = names.worker("w").build().await.unwrap();
    let (stop, signal) = shutdown_signal();
    let task = tokio::spawn(worker.run(rec.clone(), signal));
    eventually("three applied", Duration::from_secs(5), || {
        let n = rec.distinct().len();
        async move { n == 3 }
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_event_waits_for_claim_idle_even_after_a_restart() {
    let names = Names::new();
    names
        .queue()
        .await
        .publish(&event("doc:flaky"))
        .await
        .unwrap();
    let rec = Recorder {
        fail: ["doc:flaky".to_owned()].into(),
        ..Recorder::default()
    };
    for life in 1..=2 {
        // Same consumer name: the restart resumes its own pending event once, then leaves it
        // for `claim_idle` rather than retrying it in a loop.
        let worker = names
            .worker("w")
            .max_deliveries(10)
            .claim_idle(Duration::from_secs(60))
            .build()
            .await
            .unwrap();
        let (stop, signal) = shutdown_signal();
        let task = tokio::spawn(worker.run(rec.clone(), signal));
        eventually("an attempt", Duration::from_secs(5), || {
            let n = rec.attempts("doc:flaky");
            async move { n == life }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(rec.attempts("doc:flaky"), life);
    }
    assert_eq!(names.pending().await, 1);
    assert!(names.dead_letters().await.is_empty());
}
