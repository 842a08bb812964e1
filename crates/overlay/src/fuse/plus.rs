//! Which READDIRPLUS entries carry attributes, learnt per caller.
//!
//! An entry with attributes costs the daemon a lookup (an `fstatat` per file) and the kernel an
//! inode; it saves a LOOKUP round trip only if the caller then looks at the file (`du`, `ls -l`,
//! `tar c`). A walker that only lists (`find -type f`, `rm -r` of entries it made) pays for
//! nothing it uses: five times the kernel overlay's time on `find` over 100k files. The kernel
//! asks for READDIRPLUS at the start of every listing whatever the caller does, so the daemon
//! decides, per calling thread (the request header's pid), from what that thread did:
//!
//! - a new caller is [`Habit::Looks`]: every entry carries attributes, except that now and then
//!   (every `interval` listings, doubling up to [`MAX_INTERVAL`]) the first answer of a listing
//!   is a probe that leaves them out of its first [`PROBE_ENTRIES`] non-directories;
//! - a probe is judged when the caller starts listing another directory: if it looked up a
//!   non-directory of the probed one in between, it stays [`Habit::Looks`]; else it becomes
//!   [`Habit::Walks`];
//! - a [`Habit::Walks`] caller gets no attributes for non-directories until it looks one up,
//!   which makes it [`Habit::Looks`] again (at twice the interval).
//!
//! Directories always carry attributes: a walker enters them. A probe costs a caller that looks
//! [`PROBE_ENTRIES`] LOOKUPs; a wrong guess of [`Habit::Walks`] a LOOKUP per file of one
//! directory. Only the io_uring transport answers lean entries (node id 0 with the
//! `d_ino` the listing knows); fuser's reply type ties the two together.

use std::sync::Mutex;

/// Callers remembered at once; a caller whose slot is taken starts over as [`Habit::Looks`].
const SLOTS: usize = 64;

/// The most listings between two probes of a caller that looks at what it lists.
const MAX_INTERVAL: u16 = 512;

/// Non-directories a probe sends without attributes: enough to see whether the caller looks at
/// them, few enough that a wrong guess costs little.
const PROBE_ENTRIES: usize = 4;

/// What a caller was seen to do with the entries it listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Habit {
    /// It looks at them: attributes for every entry; the next probe in `countdown` listings.
    Looks { interval: u16, countdown: u16 },
    /// The first answer of the listing of `dir` went without attributes for non-directories;
    /// `hit` once the caller looked one of them up.
    Probing { dir: u64, interval: u16, hit: bool },
    /// It only lists: no attributes for non-directories.
    Walks { interval: u16 },
}

impl Habit {
    const NEW: Habit = Habit::Looks {
        interval: 1,
        countdown: 1,
    };

    /// Back to [`Habit::Looks`] after a wrong guess (it looked at what it listed), with the next
    /// probe twice as far as the last one.
    fn looks(interval: u16) -> Habit {
        let interval = interval.saturating_mul(2).min(MAX_INTERVAL);
        Habit::Looks {
            interval,
            countdown: interval,
        }
    }
}

/// One caller's record.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// The caller's thread id; 0 for a free slot.
    pid: u32,
    habit: Habit,
    /// The directory whose listing it read last (later answers of a lean listing stay lean).
    current: u64,
}

/// The per-caller records; a fixed table, so a stream of short-lived callers costs no memory.
#[derive(Debug)]
pub(super) struct PlusPolicy {
    /// Indexed by pid; held for a few comparisons, never across I/O.
    slots: Mutex<[Slot; SLOTS]>,
}

impl Slot {
    /// A caller seen for the first time (pid 0: a free slot).
    const fn new(pid: u32) -> Slot {
        Slot {
            pid,
            habit: Habit::NEW,
            current: 0,
        }
    }
}

impl Default for PlusPolicy {
    fn default() -> Self {
        PlusPolicy {
            slots: Mutex::new([Slot::new(0); SLOTS]),
        }
    }
}

impl PlusPolicy {
    fn with_slot<T>(&self, pid: u32, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut slots[pid as usize % SLOTS];
        if slot.pid != pid {
            *slot = Slot::new(pid);
        }
        f(slot)
    }

    /// How many non-directories of the READDIRPLUS answer for `pid` of directory `dir` from
    /// `offset` (0: the start of a listing) go without attributes.
    pub(super) fn lean(&self, pid: u32, dir: u64, offset: u64) -> usize {
        self.with_slot(pid, |s| {
            if offset != 0 {
                let walks = s.current == dir && matches!(s.habit, Habit::Walks { .. });
                return if walks { usize::MAX } else { 0 };
            }
            s.current = dir;
            if let Habit::Probing {
                dir: probed,
                interval,
                hit,
            } = s.habit
            {
                if probed == dir {
                    return 0;
                }
                s.habit = if hit {
                    Habit::looks(interval)
                } else {
                    Habit::Walks { interval }
                };
            }
            match &mut s.habit {
                Habit::Walks { .. } => usize::MAX,
                Habit::Looks {
                    interval,
                    countdown,
                } => {
                    *countdown = countdown.saturating_sub(1);
                    if *countdown > 0 {
                        return 0;
                    }
                    s.habit = Habit::Probing {
                        dir,
                        interval: *interval,
                        hit: false,
                    };
                    PROBE_ENTRIES
                }
                Habit::Probing { .. } => 0,
            }
        })
    }

    /// The lean answer for `pid` of `dir` from offset 0 had no non-directory in it: not a probe
    /// (the next listing probes instead).
    pub(super) fn nothing_left_out(&self, pid: u32, dir: u64) {
        self.with_slot(pid, |s| {
            if let Habit::Probing {
                dir: probed,
                interval,
                ..
            } = s.habit
                && probed == dir
            {
                s.habit = Habit::Looks {
                    interval,
                    countdown: 1,
                };
            }
        })
    }

    /// `pid` looked up a non-directory in `parent`.
    pub(super) fn looked_at(&self, pid: u32, parent: u64) {
        self.with_slot(pid, |s| match &mut s.habit {
            Habit::Probing { dir, hit, .. } if *dir == parent => *hit = true,
            Habit::Walks { interval } => s.habit = Habit::looks(*interval),
            _ => {}
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists directories `dirs` as `pid` (one answer each), looking up a file of each when `looks`;
    /// returns how many answers were lean.
    fn walk(p: &PlusPolicy, pid: u32, dirs: std::ops::Range<u64>, looks: bool) -> usize {
        let mut lean = 0;
        for d in dirs {
            lean += usize::from(p.lean(pid, d, 0) > 0);
            if looks {
                p.looked_at(pid, d);
            }
        }
        lean
    }

    #[test]
    fn a_walker_goes_lean_after_one_probe() {
        let p = PlusPolicy::default();
        // Listing 1 is the probe; listing 2 judges it (no lookup) and is lean, as are the rest.
        assert_eq!(walk(&p, 7, 1..101, false), 100);
        assert_eq!(
            p.lean(7, 100, 4096),
            usize::MAX,
            "later answers of a lean listing stay lean"
        );
        assert_eq!(p.lean(7, 99, 4096), 0, "but not those of another listing");
    }

    #[test]
    fn a_caller_that_looks_gets_attributes_with_probes_ever_rarer() {
        let p = PlusPolicy::default();
        // Probes at listings 1, 3, 7, 15, …: the interval doubles after each probe that was hit.
        let lean = walk(&p, 9, 1..5001, true);
        assert!((9..=20).contains(&lean), "{lean} lean listings of 5000");
    }

    #[test]
    fn a_walker_that_starts_looking_gets_attributes_back() {
        let p = PlusPolicy::default();
        walk(&p, 5, 1..10, false);
        assert_eq!(p.lean(5, 10, 0), usize::MAX);
        p.looked_at(5, 10);
        assert_eq!(p.lean(5, 11, 0), 0);
        assert_eq!(p.lean(5, 10, 4096), 0);
    }

    #[test]
    fn only_the_first_answer_of_a_big_listing_is_a_probe() {
        let p = PlusPolicy::default();
        assert_eq!(p.lean(3, 1, 0), PROBE_ENTRIES);
        for off in 1..100 {
            assert_eq!(p.lean(3, 1, off * 4096), 0, "answer at {off}");
        }
    }

    #[test]
    fn a_probe_of_directories_only_is_no_probe() {
        let p = PlusPolicy::default();
        assert_eq!(p.lean(4, 1, 0), PROBE_ENTRIES);
        p.nothing_left_out(4, 1);
        // The next listing probes; a caller that looks there stays with attributes.
        assert_eq!(p.lean(4, 2, 0), PROBE_ENTRIES);
        p.looked_at(4, 2);
        assert_eq!(p.lean(4, 3, 0), 0);
    }

    #[test]
    fn callers_do_not_share_a_habit() {
        let p = PlusPolicy::default();
        walk(&p, 1, 1..10, false);
        assert_eq!(p.lean(1, 10, 0), usize::MAX);
        // pid 65 takes pid 1's slot and starts over; pid 2 has its own.
        assert_eq!(
            p.lean(65, 1, 0),
            PROBE_ENTRIES,
            "a new caller's first listing is a probe"
        );
        assert_eq!(p.lean(65, 1, 4096), 0);
        assert_eq!(p.lean(2, 1, 0), PROBE_ENTRIES);
        p.looked_at(2, 1);
        assert_eq!(p.lean(2, 2, 0), 0);
    }
}
