//! Workers that stay awake for the length of a job ("hot" jobs), so that an operation's parallel loop starts
//! on every thread at once.
//!
//! rayon's idle workers look for work for about 33 rounds of `sched_yield`, then sleep on a futex. A small
//! network runs one parallel loop per convolution, with a few sequential operations between them (longer
//! than that), so every loop first wakes the other threads (26 us on average on a 2-vCPU Intel Xeon VM, for a
//! convolution that takes 100 us on one thread) and then waits for the last of them to hand its part back.
//! At 28x28 ngf 32 that cost as much as the second thread gained. OpenMP runtimes (PyTorch's threads) keep
//! their workers spinning between loops for the same reason.
//!
//! [`hot`] runs a job with one spinner on each other worker: a rayon job that executes whatever work the
//! pool has (`rayon::yield_now`) until the job ends, and after [`BLOCKTIME`] without any work polls every
//! [`NAP`] instead (a job that waits on its caller, such as a C caller's progress callback, then costs
//! little CPU). The job's own thread never spins.
//!
//! Deadlock freedom. A spinner does not return before the job ends, so it blocks whatever lies under it on
//! its thread's stack (a worker waiting on a latch runs other jobs on top of that wait). The job must never
//! need such a frame. Spinners therefore only start before the job does any work: the job waits (a plain
//! loop, which runs no rayon work) until every spinner has checked in or [`CHECK_IN`] has passed, then
//! closes the check-in; a spinner that starts later returns at once. Every frame under a spinner is then
//! older than the job's first parallel loop, so the job depends on none of them, and all of the job's own
//! work is either on its own thread or on top of a spinner, which runs it. Two hot jobs cannot block each
//! other either: for spinner A to sit on job B's work and spinner B on job A's, each job would have to start
//! work before the other's spinners checked in, and each spinner checks in before its own job starts work.
//! One hot job at a time all the same ([`HOT`]): a second concurrent job runs as before.
//!
//! `JOINTDIFF_CPU_SPIN=0` turns this off (for comparisons, or where idle cores must sleep).
use rayon::Yield;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Spin this long without finding work before polling at [`NAP`] intervals.
const BLOCKTIME: Duration = Duration::from_millis(2);
/// The polling interval of a spinner that has found no work for [`BLOCKTIME`].
const NAP: Duration = Duration::from_micros(100);
/// How long a job waits for its spinners to check in.
const CHECK_IN: Duration = Duration::from_millis(2);

/// Whether a hot job is running (one at a time, process-wide).
static HOT: AtomicBool = AtomicBool::new(false);

/// Bit of [`State::gate`]: check-in closed.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// What a job and its spinners share.
#[derive(Default)]
struct State {
    /// Spinners checked in (low bits) and [`CLOSED`].
    gate: AtomicUsize,
    /// Set when the job ends.
    stop: AtomicBool,
    /// Spinners running now.
    running: AtomicUsize,
}

impl State {
    /// A spinner's check-in: false once the job has closed it.
    fn check_in(&self) -> bool {
        self.gate
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                (g & CLOSED == 0).then_some(g + 1)
            })
            .is_ok()
    }

    /// Closes the check-in: no spinner starts after this.
    fn close(&self) {
        self.gate.fetch_or(CLOSED, Ordering::AcqRel);
    }

    fn arrived(&self) -> usize {
        self.gate.load(Ordering::Acquire) & !CLOSED
    }
}

/// Whether jobs run hot (`JOINTDIFF_CPU_SPIN`, read once: `0` or `off` turn it off).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("JOINTDIFF_CPU_SPIN").ok().as_deref(),
            Some("0" | "off")
        )
    })
}

/// A spinner: checks in, then runs the pool's work until the job stops it.
fn spin(st: &State) {
    // counted before the check-in, so that a job that sees its spinners checked in sees them running
    st.running.fetch_add(1, Ordering::AcqRel);
    if st.check_in() {
        let mut idle_since: Option<Instant> = None;
        let mut rounds = 0u32;
        while !st.stop.load(Ordering::Acquire) {
            if let Some(Yield::Executed) = rayon::yield_now() {
                idle_since = None;
                continue;
            }
            rounds = rounds.wrapping_add(1);
            // the clock only every 64 idle rounds
            if !rounds.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= BLOCKTIME {
                std::thread::sleep(NAP);
            }
        }
    }
    st.running.fetch_sub(1, Ordering::AcqRel);
}

/// Ends a hot job (on return or unwind): stops its spinners and lets the next job run hot.
struct Hot(Arc<State>);

impl Drop for Hot {
    fn drop(&mut self) {
        self.0.close();
        self.0.stop.store(true, Ordering::Release);
        HOT.store(false, Ordering::Release);
    }
}

/// Runs `f` with the other workers of the current pool spinning (see the module). Must be called on a
/// worker thread; a nested or concurrent call, a one-thread pool or `JOINTDIFF_CPU_SPIN=0` just run `f`.
pub(crate) fn hot<R>(f: impl FnOnce() -> R) -> R {
    run_hot(CHECK_IN, |_| f())
}

/// [`hot`] with the check-in window `check_in`; `f` gets the job's state (`None` where it does not run hot).
fn run_hot<R>(check_in: Duration, f: impl FnOnce(Option<&Arc<State>>) -> R) -> R {
    let others = rayon::current_num_threads().saturating_sub(1);
    if others == 0
        || rayon::current_thread_index().is_none()
        || !enabled()
        || HOT.swap(true, Ordering::AcqRel)
    {
        return f(None);
    }
    let guard = Hot(Arc::new(State::default()));
    for _ in 0..others {
        let st = Arc::clone(&guard.0);
        rayon::spawn(move || spin(&st));
    }
    // a plain wait: this thread runs no rayon work until the check-in is closed
    let t0 = Instant::now();
    while guard.0.arrived() < others && t0.elapsed() < check_in {
        std::hint::spin_loop();
    }
    guard.0.close();
    f(Some(&guard.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinner_that_starts_after_the_check_in_closed_returns_at_once() {
        // no pool needed; `stop` is set too, so that a spinner that wrongly checks in returns (and the
        // assertion fails) rather than spinning for ever
        let st = State::default();
        st.close();
        st.stop.store(true, Ordering::Release);
        spin(&st);
        assert_eq!(st.arrived(), 0, "a spinner checked in after the close");
    }

    #[test]
    fn spinners_run_the_pools_work_and_stop_with_the_job() {
        // a 3-thread pool: the job sees its 2 spinners checked in and running (a 10 s window, for a loaded
        // machine), runs a parallel loop through them, and they stop when it ends
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let t0 = Instant::now();
        let (st, running, sum) = loop {
            // another test's hot job may hold HOT for a moment: try again
            let got = pool.install(|| {
                run_hot(Duration::from_secs(10), |st| {
                    use rayon::prelude::*;
                    let st = st.cloned()?;
                    let sum: u64 = (0..100_000u64).into_par_iter().sum();
                    let running = st.running.load(Ordering::Acquire);
                    Some((st, running, sum))
                })
            });
            if let Some(g) = got {
                break g;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "never ran hot");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(sum, 100_000 * 99_999 / 2);
        assert_eq!(st.arrived(), 2, "spinners checked in");
        assert_eq!(running, 2, "spinners running during the job");
        let t0 = Instant::now();
        while st.running.load(Ordering::Acquire) > 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            st.running.load(Ordering::Acquire),
            0,
            "spinners still running after the job"
        );
    }

    #[test]
    fn concurrent_and_nested_hot_jobs_finish() {
        // two callers outside a 2-thread pool start jobs at once, each job with nested parallel work and a
        // hot job of its own inside; a deadlock shows as the watchdog's timeout rather than a hang
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        for caller in 0..2u64 {
            let (pool, tx) = (Arc::clone(&pool), tx.clone());
            std::thread::spawn(move || {
                let mut total = 0u64;
                for i in 0..200u64 {
                    total += pool.install(|| {
                        hot(|| {
                            use rayon::prelude::*;
                            (0..64u64)
                                .into_par_iter()
                                .map(|j| {
                                    let (a, b) = rayon::join(
                                        || hot(|| (0..j).into_par_iter().sum::<u64>()),
                                        || caller + i,
                                    );
                                    a + b
                                })
                                .sum::<u64>()
                        })
                    });
                }
                tx.send((caller, total)).unwrap();
            });
        }
        drop(tx);
        // per job: sum over j < 64 of j (j - 1) / 2, plus 64 (caller + i)
        let per: u64 = (0..64u64).map(|j| j * j.saturating_sub(1) / 2).sum();
        for _ in 0..2 {
            let (caller, total) = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("a hot job did not finish: deadlock");
            let want = 200 * per + 64 * (0..200u64).map(|i| caller + i).sum::<u64>();
            assert_eq!(total, want, "caller {caller}");
        }
    }
}
