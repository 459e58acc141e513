//! Test harness: throwaway `redis-server` processes on free loopback ports.
//!
//! - [`RedisServer::start`]: one Redis with no persistence, killed on drop.
//! - [`RedisCluster::start`]: three masters joined with `redis-cli --cluster create`.
//! - [`shared_redis`] / [`shared_cluster`]: one of each per test binary, for suites whose tests
//!   keep apart by tenant.
//! - [`RedisServer::start_stack`] / [`RedisCluster::start_stack`]: the same with the search module
//!   (Redis Stack, fetched by `scripts/fetch-redis-stack` into `target/assets/redis-stack/`).
//!
//! Every process also gets a watchdog (`sh` polling this test process) that kills it when the
//! test binary exits, so servers held in statics never outlive the run. Only 127.0.0.1 is used.
//! A missing `redis-server` is a panic that says how to install it, never a silent skip.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const HOST: &str = "127.0.0.1";

/// How long a fresh server may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a fresh cluster may take to report `cluster_state:ok` on every node.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts at starting on a fresh port (another process may grab a port between our probe and
/// redis-server binding it).
const START_ATTEMPTS: usize = 5;

const INSTALL_HINT: &str = "redis-server was not found on PATH. The Redis tests need it: \
     `apt-get install -y redis-server` (Debian/Ubuntu; provides redis-cli too), \
     or run scripts/test, which installs it.";

const STACK_HINT: &str = "Redis Stack (redis-server with the search module) was not found. \
     The tests of the L2 index on Redis need it: run scripts/fetch-redis-stack (scripts/test runs \
     it), which puts it into target/assets/redis-stack/, or point CACHECORE_REDIS_STACK at a \
     directory with bin/redis-server, lib/redisearch.so and, if they need it, libssl/.";

/// Where Redis Stack is: `$CACHECORE_REDIS_STACK`, or `target/assets/redis-stack` of the crate.
pub fn stack_dir() -> PathBuf {
    std::env::var_os("CACHECORE_REDIS_STACK").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/assets/redis-stack"),
        PathBuf::from,
    )
}

fn check_stack() -> PathBuf {
    let dir = stack_dir();
    for part in ["bin/redis-server", "lib/redisearch.so"] {
        assert!(
            dir.join(part).is_file(),
            "{} is missing. {STACK_HINT}",
            dir.join(part).display()
        );
    }
    dir
}

fn check_installed() {
    for bin in ["redis-server", "redis-cli"] {
        match Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("{bin}: {INSTALL_HINT}")
            }
            Err(e) => panic!("cannot run {bin}: {e}. {INSTALL_HINT}"),
        }
    }
}

/// A free TCP port on 127.0.0.1 (free when probed).
pub fn free_port() -> u16 {
    TcpListener::bind((HOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A string no other call in this process returns; tests use it as a tenant.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir()
        .join("cachecore-tests")
        .join(unique("redis"));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// One `redis-server` on a loopback port.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    /// Redis Stack's directory, when it runs with the search module.
    stack: Option<PathBuf>,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl RedisServer {
    /// Starts a Redis with no persistence on a free port and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(Vec::new())
    }

    /// Starts a Redis Stack (with the search module) with no persistence on a free port.
    pub fn start_stack() -> Self {
        Self::start_in(Vec::new(), Some(check_stack()))
    }

    fn start_with(extra: Vec<String>) -> Self {
        Self::start_in(extra, None)
    }

    fn start_in(extra: Vec<String>, stack: Option<PathBuf>) -> Self {
        check_installed();
        let dir = scratch_dir();
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut server = Self {
                port: free_port(),
                dir: dir.clone(),
                extra: extra.clone(),
                stack: stack.clone(),
                child: None,
                watchdog: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    last = e;
                    server.kill();
                }
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = match &self.stack {
            None => Command::new("redis-server"),
            Some(stack) => {
                let mut cmd = Command::new(stack.join("bin/redis-server"));
                // Its libssl 1.1 (Debian 12 has 3), for this process only.
                let libssl = stack.join("libssl");
                if libssl.is_dir() {
                    cmd.env("LD_LIBRARY_PATH", libssl);
                }
                cmd.arg("--loadmodule").arg(stack.join("lib/redisearch.so"));
                cmd
            }
        };
        cmd.args(["--bind", HOST, "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "yes", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join(format!("redis-{}.log", self.port)))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {redis} 2>/dev/null; rm -rf '{dir}'",
                me = std::process::id(),
                redis = child.id(),
                dir = self.dir.display(),
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        self.child = Some(child);
        self.watchdog = watchdog;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ping(self.port) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("redis-server on {} exited: {status}", self.port));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server on {} never answered PING", self.port));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://{HOST}:{}/", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    /// Starts it again on the same port (empty: no persistence) and waits for PING.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("restart failed: {e}"),
                Err(_) => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Runs `redis-cli` against this server and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// One field of `INFO <section>` (e.g. `used_memory`), if present.
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        info_field(&self.cli(&["INFO", section]), field)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `redis-cli -h 127.0.0.1 -p <port> <args>` and returns stdout.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", HOST, "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}. {INSTALL_HINT}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `field:value` from INFO output.
pub fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|line| {
        line.trim_end()
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::to_owned)
    })
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &format!("{HOST}:{port}").parse().expect("loopback address"),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A Redis Cluster of three masters (no replicas) on loopback ports.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them, and waits for `cluster_state:ok` on
    /// every node.
    pub fn start() -> Self {
        Self::start_in(None)
    }

    /// The same cluster, of Redis Stack servers (with the search module).
    pub fn start_stack() -> Self {
        Self::start_in(Some(check_stack()))
    }

    fn start_in(stack: Option<PathBuf>) -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_in(
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                        // Redis 7 lets the bus port be chosen; the default (port + 10000) may be
                        // taken or out of range.
                        "--cluster-port".into(),
                        free_port().to_string(),
                        "--cluster-node-timeout".into(),
                        "5000".into(),
                    ],
                    stack.clone(),
                )
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("{HOST}:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}. {INSTALL_HINT}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_ok();
        cluster
    }

    fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        loop {
            let ok = self.nodes.iter().all(|n| {
                let info = n.cli(&["CLUSTER", "INFO"]);
                info_field(&info, "cluster_state").as_deref() == Some("ok")
                    && info_field(&info, "cluster_known_nodes").as_deref() == Some("3")
                    && info_field(&info, "cluster_slots_ok").as_deref() == Some("16384")
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster never reached cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Seed URLs, one per node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes, to kill one.
    #[allow(dead_code)]
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// Restarts node `i` (empty, with its saved cluster config) and waits until the cluster is
    /// whole again.
    #[allow(dead_code)]
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_ok();
    }

    /// The port of the master that owns the slot of hash tag `{tag}`.
    #[allow(dead_code)]
    pub fn node_for_tag(&self, tag: &str) -> u16 {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", &format!("{{{tag}}}")])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number");
        let nodes = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = fields
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
            else {
                continue;
            };
            let owns = fields.iter().skip(8).any(|range| {
                let mut ends = range.splitn(2, '-').map(|n| n.parse::<u16>());
                match (ends.next(), ends.next()) {
                    (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
                    (Some(Ok(a)), None) => a == slot,
                    _ => false,
                }
            });
            if owns {
                return port;
            }
        }
        panic!("no master owns slot {slot}: {nodes}");
    }

    /// Runs `redis-cli -c` (follows redirects) against the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        self.nodes[0].cli(&all)
    }
}

/// One Redis per test binary, started on first use.
pub fn shared_redis() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// One three-master cluster per test binary, started on first use.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}
