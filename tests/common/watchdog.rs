//! A watchdog for tests that can hang: a deadlock or a request waiting on another one forever
//! fails the test with a report of what was still running, instead of stalling CI.
//!
//! Two flavours:
//!
//! - async: [`run`] owns a multi-thread Tokio runtime and bounds the whole test body;
//!   [`Watchdog::within`] bounds one step inside it and [`Watchdog::join_named`] a set of named
//!   tasks. Work registers itself with [`Watchdog::track`] while it runs, so the report names the
//!   requests or tasks that were stuck and for how long.
//! - plain threads: [`threads_keep_progressing`] runs named step loops on threads and checks
//!   from the calling thread that every one of them keeps completing steps.
//!
//! The timers are OS threads, not Tokio timers: when every worker of the runtime is blocked
//! (a lock never released), no Tokio timer fires, but these still do. A runtime with wedged
//! workers is shut down with a grace period and its threads are abandoned, so the failure is
//! reported rather than turned into a hang in `Runtime::drop`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::panic::resume_unwind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a runtime whose test failed may take to shut down before its threads are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Tracks the work in flight in one test and reports it when the test overruns its bound.
#[derive(Clone)]
pub struct Watchdog {
    inner: Arc<Inner>,
}

type ReportHook = Arc<dyn Fn() -> String + Send + Sync>;

struct Inner {
    name: String,
    started: Instant,
    next: AtomicU64,
    in_flight: Mutex<BTreeMap<u64, (String, Instant)>>,
    notes: Mutex<BTreeMap<String, String>>,
    hook: Mutex<Option<ReportHook>>,
}

/// Registration of one piece of work; it leaves the registry when dropped.
#[must_use = "the work counts as in flight only while this guard lives"]
pub struct Tracked {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.inner.in_flight).remove(&self.id);
    }
}

/// A bound was overrun. Its `Display` is the full report.
pub struct Stuck {
    pub report: String,
}

impl fmt::Display for Stuck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report)
    }
}

impl fmt::Debug for Stuck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the report of the others.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watchdog {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                started: Instant::now(),
                next: AtomicU64::new(0),
                in_flight: Mutex::new(BTreeMap::new()),
                notes: Mutex::new(BTreeMap::new()),
                hook: Mutex::new(None),
            }),
        }
    }

    /// Registers `label` as in flight until the returned guard is dropped.
    pub fn track(&self, label: impl Into<String>) -> Tracked {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.in_flight).insert(id, (label.into(), Instant::now()));
        Tracked {
            inner: Arc::clone(&self.inner),
            id,
        }
    }

    /// A line of context for the report (the seed, how to replay it); replaces an earlier note
    /// with the same key.
    pub fn note(&self, key: impl Into<String>, value: impl Into<String>) {
        lock(&self.inner.notes).insert(key.into(), value.into());
    }

    /// Text appended to every report, computed when the report is made. It runs while other
    /// threads may be wedged: take locks with `try_lock` in it.
    pub fn on_report(&self, hook: impl Fn() -> String + Send + Sync + 'static) {
        *lock(&self.inner.hook) = Some(Arc::new(hook));
    }

    /// The labels in flight now, oldest first, with how long each has been running.
    pub fn in_flight(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        let mut out: Vec<(String, Duration)> = lock(&self.inner.in_flight)
            .values()
            .map(|(label, since)| (label.clone(), now.duration_since(*since)))
            .collect();
        out.sort_by_key(|(_, age)| std::cmp::Reverse(*age));
        out
    }

    /// The report: what overran, the notes, everything still in flight, the hook's text.
    pub fn report(&self, why: &str) -> String {
        let mut out = format!(
            "WATCHDOG [{}]: {why} ({:?} since the watchdog started)\n",
            self.inner.name,
            self.inner.started.elapsed()
        );
        for (k, v) in lock(&self.inner.notes).iter() {
            let _ = writeln!(out, "  {k}: {v}");
        }
        let stuck = self.in_flight();
        if stuck.is_empty() {
            out.push_str("  nothing registered as in flight (the hang is outside tracked work)\n");
        } else {
            let _ = writeln!(out, "  still in flight ({}):", stuck.len());
            for (label, age) in stuck {
                let _ = writeln!(out, "    - {label}   (for {age:?})");
            }
        }
        let hook = lock(&self.inner.hook).clone();
        if let Some(hook) = hook {
            out.push_str(&hook());
        }
        out
    }

    /// Runs `fut` for at most `bound`; past it, gives up on it and returns the report.
    ///
    /// The bound is kept by an OS thread, so it holds even when the runtime's timers do not run.
    /// It can only be reported if the task awaiting this is polled: await it from the
    /// `block_on` thread or a task that cannot be wedged ([`run`] covers the rest).
    pub async fn within<F: Future>(
        &self,
        what: &str,
        bound: Duration,
        fut: F,
    ) -> Result<F::Output, Stuck> {
        let (_cancel, fired) = os_timer(bound);
        tokio::pin!(fut);
        tokio::select! {
            biased;
            out = &mut fut => Ok(out),
            _ = fired => Err(Stuck {
                report: self.report(&format!("{what} did not finish within {bound:?}")),
            }),
        }
    }

    /// Spawns each named task and waits for all of them for at most `bound`. On overrun the
    /// report names the tasks still running, and they are aborted. A task's panic is re-raised
    /// here, with its message.
    pub async fn join_named<T, F>(
        &self,
        what: &str,
        bound: Duration,
        tasks: impl IntoIterator<Item = (String, F)>,
    ) -> Result<Vec<T>, Stuck>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let handles: Vec<tokio::task::JoinHandle<T>> = tasks
            .into_iter()
            .map(|(name, fut)| {
                let guard = self.track(format!("task {name}"));
                tokio::spawn(async move {
                    let out = fut.await;
                    drop(guard);
                    out
                })
            })
            .collect();
        let aborts: Vec<tokio::task::AbortHandle> =
            handles.iter().map(|h| h.abort_handle()).collect();
        let all = async move {
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                match h.await {
                    Ok(v) => out.push(v),
                    Err(e) if e.is_panic() => resume_unwind(e.into_panic()),
                    Err(e) => panic!("a watched task was cancelled: {e}"),
                }
            }
            out
        };
        let result = self.within(what, bound, all).await;
        if result.is_err() {
            for a in aborts {
                a.abort();
            }
        }
        result
    }
}

/// A timer on its own OS thread: the receiver fires after `bound` unless the returned sender is
/// dropped first.
fn os_timer(bound: Duration) -> (mpsc::Sender<()>, tokio::sync::oneshot::Receiver<()>) {
    let (cancel_tx, cancel_rx) = mpsc::channel::<()>();
    let (fire_tx, fire_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("watchdog-timer".into())
        .spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = cancel_rx.recv_timeout(bound) {
                let _ = fire_tx.send(());
            }
        })
        .expect("spawn the watchdog timer thread");
    (cancel_tx, fire_rx)
}

/// Runs `body` on a fresh multi-thread runtime with `workers` worker threads and returns its
/// output; panics with the watchdog's report if it has not finished within `bound`.
///
/// The body runs as a spawned task and the bound is awaited on the calling thread, so a body
/// that blocks every worker still fails on time. A panic in the body is re-raised as it is.
pub fn run<T, F>(name: &str, workers: usize, bound: Duration, body: impl FnOnce(Watchdog) -> F) -> T
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
        .expect("build a multi-thread runtime");
    let wd = Watchdog::new(name);
    let fut = body(wd.clone());
    let (cancel, fired) = os_timer(bound);
    let outcome = rt.block_on(async move {
        let task = tokio::spawn(fut);
        tokio::select! {
            joined = task => Some(joined),
            _ = fired => None,
        }
    });
    drop(cancel);
    match outcome {
        Some(Ok(v)) => {
            rt.shutdown_timeout(SHUTDOWN_GRACE);
            v
        }
        Some(Err(e)) => {
            rt.shutdown_timeout(SHUTDOWN_GRACE);
            if e.is_panic() {
                resume_unwind(e.into_panic());
            }
            panic!("[{name}] the test body was cancelled: {e}");
        }
        None => {
            let report = wd.report(&format!("the test did not finish within {bound:?}"));
            rt.shutdown_timeout(SHUTDOWN_GRACE);
            panic!("{report}");
        }
    }
}

/// One named loop for [`threads_keep_progressing`]: `step` is called again and again.
pub struct Worker {
    pub name: String,
    pub step: Box<dyn FnMut() + Send>,
}

impl Worker {
    pub fn new(name: impl Into<String>, step: impl FnMut() + Send + 'static) -> Self {
        Self {
            name: name.into(),
            step: Box::new(step),
        }
    }
}

struct Progress {
    steps: AtomicU64,
    /// Microseconds since the start of the run when the current step began.
    step_began_us: AtomicU64,
    longest_step_us: AtomicU64,
    done: AtomicBool,
}

/// What one worker of [`threads_keep_progressing`] did.
#[derive(Clone, Debug)]
pub struct WorkerStats {
    pub name: String,
    pub steps: u64,
    pub longest_step: Duration,
}

/// Runs each worker's step in a loop on its own thread for `run_for`, and checks every `window`
/// that every worker completed at least one step since the last check. A worker that did not
/// (a deadlock, a livelock) fails the test with the names and step counts of all workers; the
/// stuck threads are abandoned. Returns the steps each worker completed, in order.
pub fn threads_keep_progressing(
    name: &str,
    run_for: Duration,
    window: Duration,
    workers: Vec<Worker>,
) -> Vec<WorkerStats> {
    let started = Instant::now();
    let micros = move || u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let mut progress = Vec::with_capacity(workers.len());
    let mut names = Vec::with_capacity(workers.len());
    let mut handles = Vec::with_capacity(workers.len());
    for Worker {
        name: wname,
        mut step,
    } in workers
    {
        let p = Arc::new(Progress {
            steps: AtomicU64::new(0),
            step_began_us: AtomicU64::new(0),
            longest_step_us: AtomicU64::new(0),
            done: AtomicBool::new(false),
        });
        let (p2, stop2) = (Arc::clone(&p), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name(format!("{name}/{wname}"))
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let began = micros();
                    p2.step_began_us.store(began, Ordering::Relaxed);
                    step();
                    p2.longest_step_us
                        .fetch_max(micros().saturating_sub(began), Ordering::Relaxed);
                    p2.steps.fetch_add(1, Ordering::Relaxed);
                }
                p2.done.store(true, Ordering::Release);
            })
            .expect("spawn a worker thread");
        progress.push(p);
        names.push(wname);
        handles.push(Some(handle));
    }
    let table = |progress: &[Arc<Progress>], stalled: &[usize]| {
        let mut out = String::new();
        for (i, (wname, p)) in names.iter().zip(progress).enumerate() {
            let mark = if stalled.contains(&i) {
                let in_step = micros().saturating_sub(p.step_began_us.load(Ordering::Relaxed));
                format!("STUCK in one step for {:?}", Duration::from_micros(in_step))
            } else {
                "ok".to_owned()
            };
            let _ = writeln!(
                out,
                "    - {wname}: {} steps, longest finished step {:?} [{mark}]",
                p.steps.load(Ordering::Relaxed),
                Duration::from_micros(p.longest_step_us.load(Ordering::Relaxed)),
            );
        }
        out
    };
    let mut last: Vec<u64> = vec![0; progress.len()];
    while started.elapsed() < run_for {
        std::thread::sleep(window);
        let now: Vec<u64> = progress
            .iter()
            .map(|p| p.steps.load(Ordering::Relaxed))
            .collect();
        let stalled: Vec<usize> = (0..now.len()).filter(|&i| now[i] == last[i]).collect();
        // A worker that panicked stops too: report its panic, not a hang.
        for &i in &stalled {
            if handles[i].as_ref().is_some_and(|h| h.is_finished()) {
                stop.store(true, Ordering::Relaxed);
                if let Some(Err(panic)) = handles[i].take().map(|h| h.join()) {
                    resume_unwind(panic);
                }
            }
        }
        if !stalled.is_empty() {
            stop.store(true, Ordering::Relaxed);
            panic!(
                "WATCHDOG [{name}]: no progress in {window:?} after {:?}; the stuck threads are \
                 abandoned:\n{}",
                started.elapsed(),
                table(&progress, &stalled)
            );
        }
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    // Each worker finishes the step it is in; one that cannot within a window is stuck.
    let deadline = Instant::now() + window;
    while Instant::now() < deadline && !progress.iter().all(|p| p.done.load(Ordering::Acquire)) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let unfinished: Vec<usize> = (0..progress.len())
        .filter(|&i| !progress[i].done.load(Ordering::Acquire))
        .collect();
    if !unfinished.is_empty() {
        panic!(
            "WATCHDOG [{name}]: told to stop, these threads did not finish their step within \
             {window:?}:\n{}",
            table(&progress, &unfinished)
        );
    }
    for h in handles.iter_mut().filter_map(Option::take) {
        if let Err(panic) = h.join() {
            resume_unwind(panic);
        }
    }
    names
        .into_iter()
        .zip(&progress)
        .map(|(name, p)| WorkerStats {
            name,
            steps: p.steps.load(Ordering::Relaxed),
            longest_step: Duration::from_micros(p.longest_step_us.load(Ordering::Relaxed)),
        })
        .collect()
}
