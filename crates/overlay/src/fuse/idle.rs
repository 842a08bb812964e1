//! Idle commits: a queue thread sends a quick answer (a small READ, a lookup, attributes, an
//! xattr) as a `SCHED_IDLE` thread, so that the caller it wakes stays on its CPU.
//!
//! An answer wakes its caller from inside the queue thread's `io_uring_enter`, while that thread
//! still runs on the caller's CPU. The scheduler then sees a busy CPU there and an idle one
//! elsewhere, and may move the caller to the idle one: that round trip pays a cross-CPU wakeup
//! of a halted vCPU, and the next request lands in the other CPU's queue. A CPU that runs only
//! `SCHED_IDLE` threads counts as idle to that choice, so a thread that is `SCHED_IDLE` while it
//! commits keeps the caller where it was (and is preempted by it at once, as it is about to wait
//! anyway).
//!
//! It pays where callers move: 4 KiB random reads of a lower file moved the reader to the other
//! CPU on 43 % of the reads (`perf stat -e cpu-migrations`), and ran twice as fast with idle
//! commits; `ls -l` of 50k files (two GETXATTRs each) took a fifth less time (docs/benchmarks.md).
//! It costs two `sched_setattr` calls per commit, which lost time on a copy-up's OPEN: committing
//! every answer idle made copy-up slower. And a thread left idle is off the CPU until its CPU has
//! nothing else to run: after a readahead READ the reader goes on copying the pages before it,
//! while the idle thread holds the next READ (sequential reads got slower). So answers to
//! metadata reads and changes, listings, read-only OPENs and small READs are committed idle, not
//! OPENs for writing or big READs (`commit_idle` in `uring.rs`): `rm -rf` of 20k small files (an
//! UNLINK and a GETATTR of the parent each) took 1.60-1.65 s against 1.69-1.94 s once UNLINKs,
//! CREATEs, SETATTRs and the like were committed idle too, and `du -s` of 100k files 0.87-0.92 s
//! against 1.36-1.47 s once listings were (docs/benchmarks.md).
//!
//! The thread goes back to its normal policy right after the commit. In between it may be
//! preempted, and a `SCHED_IDLE` thread behind a busy task waits for a long time; its entry is
//! already offered to the kernel for the next request. A watchdog thread bounds that: a thread
//! that has not left its idle window within [`STARVED`] is put back to normal from outside, at
//! the watchdog's next look ([`POLL_BUSY`]). After a quiet second the watchdog sleeps until the
//! next window opens, so an idle mount wakes no CPU.
//! Leaving `SCHED_IDLE` needs `CAP_SYS_NICE`: without it (a rootless daemon) idle commits stay
//! off, which is checked on a throwaway thread before any queue thread uses them.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use layerfs_sys::fuse_uring::{self, Policy};

/// How long a thread may stay in its idle window before the watchdog puts it back to normal.
const STARVED: Duration = Duration::from_millis(1);

/// How often the watchdog looks while windows open. Every look wakes a CPU: with a look each
/// millisecond, `tar c` of 100k files was slower in every round once lookups and attributes were
/// committed idle. A starved window is rare (a busy task on the caller's CPU); the requests of
/// that CPU wait for it meanwhile, as they waited for the thread whose entry they took when each
/// CPU had two queue threads.
const POLL_BUSY: Duration = Duration::from_millis(5);
/// After this long without a window (and none open), the watchdog sleeps until the next one
/// opens: an idle mount wakes nobody.
const QUIET: Duration = Duration::from_secs(1);

/// The idle windows of a connection's queue threads.
pub(super) struct IdleCommits {
    epoch: Instant,
    slots: Vec<Slot>,
    /// When a window last opened (ns since `epoch`).
    last_open: AtomicU64,
    /// Set when a thread could not leave `SCHED_IDLE` by itself: no more idle windows.
    broken: AtomicBool,
    /// The queue threads' time slice.
    slice_ns: u64,
    /// The watchdog, and whether it sleeps until a window opens (then the next one wakes it).
    watchdog: std::sync::OnceLock<std::thread::Thread>,
    parked: AtomicBool,
}

/// One queue thread.
struct Slot {
    tid: AtomicI32,
    nice: AtomicI32,
    /// When its open window opened (ns since `epoch`, plus one); 0 while none is open.
    open_since: AtomicU64,
}

impl IdleCommits {
    /// Idle windows for `threads` queue threads, if this process may leave `SCHED_IDLE` again;
    /// starts their watchdog.
    pub(super) fn start(threads: usize, slice_ns: u64) -> Option<Arc<IdleCommits>> {
        if !can_leave_idle(slice_ns) {
            tracing::info!(
                "idle commits off: this daemon may not leave SCHED_IDLE (needs CAP_SYS_NICE)"
            );
            return None;
        }
        let ic = Arc::new(IdleCommits {
            epoch: Instant::now(),
            slots: (0..threads)
                .map(|_| Slot {
                    tid: AtomicI32::new(0),
                    nice: AtomicI32::new(0),
                    open_since: AtomicU64::new(0),
                })
                .collect(),
            last_open: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            slice_ns,
            watchdog: std::sync::OnceLock::new(),
            parked: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&ic);
        let spawned = std::thread::Builder::new()
            .name("uring-watchdog".into())
            .spawn(move || watchdog(weak));
        match spawned {
            Ok(handle) => {
                let _ = ic.watchdog.set(handle.thread().clone());
                Some(ic)
            }
            Err(e) => {
                tracing::info!("idle commits off: no watchdog thread: {e}");
                None
            }
        }
    }

    /// Thread `slot` (the calling thread, at niceness `nice`) will use its idle windows.
    pub(super) fn adopt(&self, slot: usize, nice: i32) {
        if let Some(s) = self.slots.get(slot) {
            s.nice.store(nice, Relaxed);
            s.tid.store(fuse_uring::gettid(), Relaxed);
        }
    }

    /// Runs `commit` (the submission of the thread's answers) as a `SCHED_IDLE` thread, and
    /// goes back to normal after it. Says whether it ran idle.
    pub(super) fn commit<R>(&self, slot: usize, commit: impl FnOnce() -> R) -> (R, bool) {
        let Some(s) = self.slots.get(slot) else {
            return (commit(), false);
        };
        if self.broken.load(Relaxed) || s.tid.load(Relaxed) == 0 {
            return (commit(), false);
        }
        let now = self.now();
        // SeqCst with the watchdog's `parked` store and `last_open` load: either it sees this
        // window, or this sees it parked.
        self.last_open.store(now, Ordering::SeqCst);
        s.open_since.store(now + 1, Relaxed);
        if self.parked.load(Ordering::SeqCst)
            && self.parked.swap(false, Ordering::SeqCst)
            && let Some(w) = self.watchdog.get()
        {
            w.unpark();
        }
        let idle = fuse_uring::set_policy(0, Policy::Idle).is_ok();
        let r = commit();
        if idle {
            let normal = Policy::Normal {
                nice: s.nice.load(Relaxed),
                slice_ns: self.slice_ns,
            };
            if let Err(e) = fuse_uring::set_policy(0, normal) {
                // Left open: the watchdog keeps trying.
                if !self.broken.swap(true, Relaxed) {
                    tracing::warn!("idle commits off: a queue thread cannot leave SCHED_IDLE: {e}");
                }
                return (r, true);
            }
        }
        s.open_since.store(0, Relaxed);
        (r, idle)
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Puts back to normal every thread whose window has been open for longer than [`STARVED`];
    /// returns how long to sleep until the next look (`None`: until a window opens).
    fn rescue(&self) -> Option<Duration> {
        let now = self.now();
        let mut open = false;
        for s in &self.slots {
            let since = s.open_since.load(Relaxed);
            open |= since != 0;
            if since != 0 && overdue(now, since - 1) {
                let normal = Policy::Normal {
                    nice: s.nice.load(Relaxed),
                    slice_ns: self.slice_ns,
                };
                let _ = fuse_uring::set_policy(s.tid.load(Relaxed), normal);
            }
        }
        poll_interval(now, self.last_open.load(Relaxed), open)
    }
}

impl Drop for IdleCommits {
    /// Lets a parked watchdog see that the queue threads are gone.
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.get() {
            w.unpark();
        }
    }
}

/// Whether a window opened at `since` is still open at `now` for too long.
fn overdue(now: u64, since: u64) -> bool {
    now.saturating_sub(since) > STARVED.as_nanos() as u64
}

/// How long the watchdog sleeps: briefly while windows open; once none is open and none
/// opened for [`QUIET`], until the next one opens (`None`).
fn poll_interval(now: u64, last_open: u64, open: bool) -> Option<Duration> {
    let quiet = now.saturating_sub(last_open) >= QUIET.as_nanos() as u64;
    (open || !quiet).then_some(POLL_BUSY)
}

/// Looks after the windows until the queue threads are gone.
fn watchdog(ic: Weak<IdleCommits>) {
    loop {
        let Some(ic) = ic.upgrade() else {
            return;
        };
        let pause = ic.rescue();
        let mut missed = false;
        if pause.is_none() {
            ic.parked.store(true, Ordering::SeqCst);
            // A window opened since the look: look again at once (its opener may have seen
            // the flag still down, and then wakes nobody).
            let last = ic.last_open.load(Ordering::SeqCst);
            missed = ic.now().saturating_sub(last) < QUIET.as_nanos() as u64;
        }
        drop(ic);
        match pause {
            Some(p) => std::thread::sleep(p),
            None if missed => {}
            // Until the next window's opener, or the end of the queue threads (`Drop`), wakes it.
            None => std::thread::park(),
        }
    }
}

/// Whether a thread of this process can go to `SCHED_IDLE` and back (tried on a throwaway one).
fn can_leave_idle(slice_ns: u64) -> bool {
    std::thread::spawn(move || {
        let nice = match fuse_uring::request_short_slice(slice_ns) {
            Ok(nice) => nice,
            Err(_) => return false,
        };
        fuse_uring::set_policy(0, Policy::Idle).is_ok()
            && fuse_uring::set_policy(0, Policy::Normal { nice, slice_ns }).is_ok()
    })
    .join()
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window counts as starved only past the limit; the watchdog looks while windows are
    /// open or opened within the last second, and else sleeps until one opens.
    #[test]
    fn the_watchdog_rescues_late_and_sleeps_when_quiet() {
        let ms = |n: u64| n * 1_000_000;
        assert!(!overdue(ms(10), ms(10)));
        assert!(!overdue(ms(10), ms(9)));
        assert!(overdue(ms(10), ms(8)));
        assert!(
            !overdue(ms(1), ms(5)),
            "a window opened after `now` was read"
        );
        assert_eq!(poll_interval(ms(1500), ms(1000), false), Some(POLL_BUSY));
        assert_eq!(poll_interval(ms(2500), ms(1000), false), None);
        assert_eq!(
            poll_interval(ms(2500), ms(1000), true),
            Some(POLL_BUSY),
            "a window still open (its thread starved since) is looked after"
        );
    }

    /// The calling thread goes to SCHED_IDLE for the commit and is normal again after it (as
    /// root, which the tests run as: CAP_SYS_NICE).
    #[test]
    fn a_commit_runs_idle_and_the_thread_comes_back() {
        let Some(ic) = IdleCommits::start(1, 100_000) else {
            panic!("the tests run as root, who may leave SCHED_IDLE");
        };
        std::thread::spawn(move || {
            let nice = fuse_uring::request_short_slice(100_000).expect("slice");
            ic.adopt(0, nice);
            let (during, idle) = ic.commit(0, policy_of_self);
            assert!(idle);
            assert_eq!(during, libc::SCHED_IDLE as u32);
            assert_eq!(policy_of_self(), libc::SCHED_OTHER as u32);
            assert_eq!(ic.slots[0].open_since.load(Relaxed), 0);
        })
        .join()
        .expect("thread");
    }

    /// The calling thread's scheduling policy: field 41 of `/proc/thread-self/stat`.
    fn policy_of_self() -> u32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
        // Fields from the state (3rd) on: the policy is the 41st.
        after_name
            .split(' ')
            .nth(41 - 3)
            .expect("policy")
            .parse()
            .expect("number")
    }
}
