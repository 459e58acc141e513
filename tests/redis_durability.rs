//! docs/design.md §4 rule 9, "durability is stated, not assumed": what an invalidation survives
//! on Redis, measured rather than assumed. A crash of a server with `appendfsync always`; an
//! acknowledged invalidation (`WAIT`) that says whether the replicas have the raise; and a
//! failover to a replica that missed it, which brings the invalidated entry back unless the
//! invalidation was acknowledged.
//!
//! Each test starts its own `redis-server` processes (with persistence or replication, unlike
//! `support::RedisServer`) on free loopback ports, in their own scratch directories.
#![cfg(feature = "redis")]

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecore::testing::now_ms;
use cachecore::{CacheKey, CacheStore, Entry, Lookup, PutOutcome, RedisStore, POLICY_DEP};
use http::{HeaderMap, StatusCode};

const DOC: &str = "doc:contract-123";
const DEPS: [&str; 2] = [POLICY_DEP, DOC];

/// How long a server may take to answer PING (an AOF replay included).
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One `redis-server` with the options a test gives it, in a directory that outlives restarts.
struct Server {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let dir = std::env::temp_dir()
            .join("cachecore-tests")
            .join(support::unique("durability"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port: support::free_port(),
            dir,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
            watchdog: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install -y redis-server)");
        // Kills the server if this test process dies first.
        self.watchdog = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {redis} 2>/dev/null",
                me = std::process::id(),
                redis = child.id(),
            ))
            .stdin(Stdio::null())
            .spawn()
            .ok();
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server never answered PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, like a crash: nothing is flushed on the way out.
    fn kill(&mut self) {
        for mut child in [self.child.take(), self.watchdog.take()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the process: a replica that is alive but does
    /// not answer, like one behind a network partition.
    fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("running").id();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn cli(&self, args: &[&str]) -> String {
        support::cli(self.port, args)
    }

    /// Starts a replica of this server and waits until it is in sync.
    fn replica(&self) -> Self {
        let replica = Self::start(&["--replicaof", "127.0.0.1", &self.port.to_string()]);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let info = replica.cli(&["INFO", "replication"]);
            if support::info_field(&info, "master_link_status").as_deref() == Some("up") {
                return replica;
            }
            assert!(Instant::now() < deadline, "replica never synced: {info}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes this replica a master (a failover).
    fn promote(&self) {
        assert_eq!(self.cli(&["REPLICAOF", "NO", "ONE"]).trim(), "OK");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A frozen process must be thawed to die cleanly.
            self.freeze(false);
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn store(server: &Server) -> RedisStore {
    RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("connect")
}

fn key(n: u32) -> CacheKey {
    let mut digest = [0u8; 32];
    digest[28..].copy_from_slice(&n.to_be_bytes());
    CacheKey::new("t", digest)
}

/// Lookup (a miss), then a put of an entry living ten minutes.
async fn fill(store: &RedisStore, k: &CacheKey) {
    let Lookup::Miss(observed) = store.lookup(k, &DEPS).await.unwrap() else {
        panic!("expected a miss");
    };
    let entry = Entry {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        body: Bytes::from_static(b"answer from before"),
        stored_at_ms: now_ms(),
        fresh_ttl: Duration::from_secs(600),
        stale_window: Duration::ZERO,
        deps: observed,
    };
    assert_eq!(store.put(k, entry).await.unwrap(), PutOutcome::Stored);
    assert!(matches!(
        store.lookup(k, &DEPS).await.unwrap(),
        Lookup::Fresh(_)
    ));
}

fn entry_key(k: &CacheKey) -> String {
    format!("cc:{{t}}:l1:{}", k.hex())
}

/// Invalidates `DOC`, then puts the entry's value back, as a reclamation that never ran would
/// have left it: only the raised epoch keeps it from being served.
async fn invalidate_keeping_the_entry(store: &RedisStore, server: &Server, k: &CacheKey) {
    let mut raw = ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let value: Vec<u8> = ::redis::cmd("GET")
        .arg(entry_key(k))
        .query_async(&mut raw)
        .await
        .unwrap();
    let r = store.invalidate("t", DOC, "v2").await.unwrap();
    assert!(r.deleted == 1, "{r:?}");
    let () = ::redis::cmd("SET")
        .arg(entry_key(k))
        .arg(value)
        .arg("PX")
        .arg(600_000)
        .query_async(&mut raw)
        .await
        .unwrap();
}

/// Waits until `server` holds `key` (replication is asynchronous).
fn wait_for_key(server: &Server, key: &str) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while server.cli(&["EXISTS", key]).trim() != "1" {
        assert!(Instant::now() < deadline, "{key} never reached the replica");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn an_invalidation_survives_kill_9_with_appendfsync_always() {
    let mut server = Server::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let k = key(1);
    {
        let store = store(&server).await;
        fill(&store, &k).await;
        invalidate_keeping_the_entry(&store, &server, &k).await;
    }
    // Killed the moment the invalidation returned, then started again on the same directory.
    server.restart();
    let store = store(&server).await;
    assert_eq!(
        server.cli(&["EXISTS", &entry_key(&k)]).trim(),
        "1",
        "the AOF kept the entry"
    );
    match store.lookup(&k, &DEPS).await.unwrap() {
        Lookup::Miss(epochs) => assert_eq!(epochs.get(DOC), Some(1), "the AOF kept the raise"),
        other => panic!("an invalidated entry was served after a crash: {other:?}"),
    }
}

#[tokio::test]
async fn an_acknowledged_invalidation_says_whether_the_replicas_have_the_raise() {
    let master = Server::start(&[]);
    let replica = master.replica();
    let acked = RedisStore::builder()
        .url(master.url())
        .timeout(Duration::from_secs(2))
        .ack_replicas(1, Duration::from_millis(500))
        .build()
        .await
        .unwrap();

    // Not asked for: not reported.
    let r = store(&master)
        .await
        .invalidate("t", "doc:a", "h")
        .await
        .unwrap();
    assert_eq!(r.acknowledged, None);

    // Asked for, and the replica is there: acknowledged, and the replica has the raise.
    let r = acked.invalidate("t", DOC, "v2").await.unwrap();
    assert_eq!(r.acknowledged, Some(true), "{r:?}");
    let ver = format!("cc:{{t}}:dep:ver:{DOC}");
    assert!(replica.cli(&["--raw", "GET", &ver]).starts_with("1."));
    let rs = acked.invalidate_many("t", &["doc:b", "doc:c"], "h").await;
    assert!(
        rs.iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.acknowledged == Some(true))),
        "{rs:?}"
    );

    // More replicas than there are: the raise stands, unacknowledged.
    let two = RedisStore::builder()
        .url(master.url())
        .ack_replicas(2, Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let r = two.invalidate("t", DOC, "v3").await.unwrap();
    assert_eq!(r.acknowledged, Some(false), "{r:?}");

    // The replica is frozen: unacknowledged after the timeout. Hits through the same store do
    // not queue behind the WAIT.
    let k = key(7);
    fill(&acked, &k).await;
    replica.freeze(true);
    let waiting = {
        let acked = acked.clone();
        tokio::spawn(async move { acked.invalidate("t", "doc:d", "h").await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    assert!(matches!(
        acked.lookup(&k, &DEPS).await.unwrap(),
        Lookup::Fresh(_)
    ));
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "a hit waited {:?} behind WAIT",
        started.elapsed()
    );
    let r = waiting.await.unwrap();
    assert_eq!(r.acknowledged, Some(false), "{r:?}");
    replica.freeze(false);
}

#[tokio::test]
async fn a_failover_to_a_replica_that_missed_the_raise_serves_the_entry_again() {
    let mut master = Server::start(&[]);
    let mut replica = master.replica();
    let acked = |server: &Server| {
        RedisStore::builder()
            .url(server.url())
            .timeout(Duration::from_secs(2))
            .ack_replicas(1, Duration::from_millis(300))
            .build()
    };

    // The replica is cut off while the invalidation runs (frozen, and its link closed, so
    // nothing of the raise even waits in its socket): the raise never reaches it, and the
    // acknowledgement says so.
    let k = key(1);
    let store = acked(&master).await.unwrap();
    fill(&store, &k).await;
    wait_for_key(&replica, &entry_key(&k));
    replica.freeze(true);
    master.cli(&["CLIENT", "KILL", "TYPE", "replica"]);
    let r = store.invalidate("t", DOC, "v2").await.unwrap();
    assert_eq!(r.acknowledged, Some(false), "{r:?}");
    assert!(matches!(
        store.lookup(&k, &DEPS).await.unwrap(),
        Lookup::Miss(_)
    ));

    // The master dies and the replica takes over: the invalidated entry is back. This is what
    // `acknowledged: Some(false)` warned about.
    master.kill();
    replica.freeze(false);
    replica.promote();
    let promoted = acked(&replica).await.unwrap();
    match promoted.lookup(&k, &DEPS).await.unwrap() {
        Lookup::Fresh(e) => assert_eq!(&e.body[..], b"answer from before"),
        other => panic!("expected the rolled-back entry, got {other:?}"),
    }

    // Acknowledged, the raise survives the next failover.
    let standby = replica.replica();
    let r = promoted.invalidate("t", DOC, "v2").await.unwrap();
    assert_eq!(r.acknowledged, Some(true), "{r:?}");
    fill(&promoted, &key(2)).await;
    let k2 = key(2);
    invalidate_keeping_the_entry(&promoted, &replica, &k2).await;
    let r = promoted.invalidate("t", "doc:sync", "h").await.unwrap();
    assert_eq!(r.acknowledged, Some(true), "{r:?}");
    replica.kill();
    standby.promote();
    let after = acked(&standby).await.unwrap();
    assert_eq!(standby.cli(&["EXISTS", &entry_key(&k2)]).trim(), "1");
    assert!(matches!(
        after.lookup(&k2, &DEPS).await.unwrap(),
        Lookup::Miss(_)
    ));
    for k in [k, k2] {
        assert!(matches!(
            after.lookup(&k, &DEPS).await.unwrap(),
            Lookup::Miss(_)
        ));
    }
}
