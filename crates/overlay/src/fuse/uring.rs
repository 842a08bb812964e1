//! FUSE over io_uring: requests taken from per-CPU rings ([`layerfs_sys::fuse_uring`]) and
//! answered here, with the same overlay calls as the fuser session answers `/dev/fuse` requests.
//!
//! The kernel puts a request into the queue of the CPU its caller runs on, and each queue is
//! served by a thread pinned to that CPU, so a request and its answer never wait for an idle
//! vCPU to wake (the cost that dominates a `/dev/fuse` round trip on a VM whose idle vCPUs halt at
//! once). The fuser session stays up beside the rings: it answers INIT, and FORGET and INTERRUPT,
//! which the kernel still sends over `/dev/fuse`.
//!
//! One thread serves each queue, whose ring has [`DEPTH`] entries. A request that may block (a
//! copy-up, an fsync, a READ of data not in the page cache: [`Fuse::may_block`]) is lent to one
//! of the queue's [`WORKERS`] (pinned to the same CPU), which answers it and wakes the queue's
//! thread to commit the answer; meanwhile the queue's thread serves the other entries. So a slow
//! request holds up no other, and every quick one is served by the same thread: the kernel gives
//! a request to the entry offered last, and with two threads per queue a RELEASE (which nobody
//! waits for) took the entry of the thread that had just answered, so the next OPEN woke the
//! other thread, a wakeup and a sleep per file of `tar c` (docs/benchmarks.md, tenth session).

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};

use layerfs_sys::fuse_uring::{self, Lent, Queue, Waker};
use layerfs_sys::{self as sys, Errno};

use super::idle::IdleCommits;
use super::ops::{Opened, PlusItem};
use super::passthrough::Backing;
use super::wire::*;
use super::{
    CACHED_OPEN_BITS, DIRECT_OPEN_BITS, Fuse, MAX_READ, PASSTHROUGH_OPEN_BITS, TTL, caller_of,
};
use crate::attrs::SetAttr;
use crate::overlay::Attr;

/// Entries of each queue's ring: requests from one CPU that can be in the daemon at once.
const DEPTH: usize = 4;

/// Worker threads per queue, for the requests that may block: all but one entry can be lent.
const WORKERS: usize = DEPTH - 1;

/// The most a copy-up answered by the queue's thread itself copies: a millisecond or two of
/// copying and writing back.
const QUICK_COPY_UP: u64 = 256 * 1024;

/// READs up to this size have their answer committed idle ([`IdleCommits`]): a reader waiting
/// for a page or two. Larger ones are readahead, whose reader is still busy with the pages before
/// and would keep an idle thread (holding the next READ) off the CPU.
const IDLE_READ_MAX: u32 = 16 * 1024;

/// Whether the answer to a request is committed as a `SCHED_IDLE` thread (`fuse/idle.rs`): the
/// answers a caller waits for that are quick, change names and attributes, or list (a lookup,
/// attributes, an xattr, a create, a chmod, an unlink, a listing: `ls -l` makes two GETXATTRs per
/// file, `tar x` a CREATE and three SETATTRs), READs of at most [`IDLE_READ_MAX`], and read-only
/// OPENs. Listings were left out once, on the reasoning that a reader that goes on with the
/// entries it has keeps the idle thread off the CPU; measured, `du -s` of 100k files took
/// 0.87-0.92 s with them against 1.36-1.47 s without (docs/benchmarks.md). Not an OPEN for
/// writing: with idle commits a copy-up's OPEN was slower (appending a byte to 10k lower files,
/// durable copy-ups: 3.51 / 3.29 s against 3.14 / 2.89 s). Not what nobody waits for (RELEASE,
/// FORGET).
fn commit_idle(opcode: u32, op: &[u8]) -> bool {
    match opcode {
        LOOKUP | GETATTR | READLINK | STATFS | GETXATTR | LISTXATTR | ACCESS => true,
        SETATTR | CREATE | MKNOD | MKDIR | SYMLINK | LINK | UNLINK | RMDIR | RENAME | RENAME2
        | SETXATTR | REMOVEXATTR | TMPFILE => true,
        READDIR | READDIRPLUS => true,
        READ => u32_at(op, 16) <= IDLE_READ_MAX,
        // A read-only open never copies up.
        OPEN => {
            let flags = u32_at(op, 0) as i32;
            flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0
        }
        _ => false,
    }
}

/// How a request is answered: whether it may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serve {
    /// By the queue's thread while other requests wait for it: not where it can tell (a READ then
    /// fails with `EAGAIN` and goes to a worker).
    Inline,
    /// By a worker, or by the queue's thread while nothing else waits for it.
    Blocking,
}

/// The time slice the serving threads ask for (the kernel's minimum custom slice).
const SLICE_NS: u64 = 100_000;

/// Payload bytes of an entry: the largest WRITE or READ, and room for the headers of a
/// READDIRPLUS that asks for as much.
const PAYLOAD: usize = MAX_READ as usize + 4096;

/// Starts the serving thread (and workers) of every queue of the connection `dev` and waits
/// until each has registered its entries. An error leaves the session on `/dev/fuse` (the kernel
/// uses the rings only once every queue has registered).
pub(super) fn start(fuse: Fuse, dev: OwnedFd, idle_commit: bool) -> std::io::Result<()> {
    let dev = Arc::new(dev);
    let cpus = fuse_uring::possible_cpus();
    let idle = if idle_commit {
        IdleCommits::start(cpus, SLICE_NS)
    } else {
        None
    };
    let (tx, rx) = std::sync::mpsc::channel();
    for cpu in 0..cpus {
        let (fuse, dev, tx) = (fuse.clone(), dev.clone(), tx.clone());
        let idle = idle.clone().map(|ic| (ic, cpu));
        std::thread::Builder::new()
            .name(format!("uring-{cpu}"))
            .spawn(move || serve_queue(fuse, dev, cpu, idle, tx))?;
    }
    drop(tx);
    let mut pinned = true;
    for r in rx.iter().take(cpus) {
        pinned &= r?;
    }
    if !pinned {
        tracing::info!(
            "io_uring: the daemon may not run on every CPU; those queues are served from the others"
        );
    }
    Ok(())
}

/// A queue's requests lent to its workers, and their answers on the way back.
#[derive(Default)]
struct Handoff {
    state: Mutex<HandoffState>,
    /// Signalled when a request is lent or the queue ends.
    lent: Condvar,
}

#[derive(Default)]
struct HandoffState {
    /// Requests for the workers.
    todo: VecDeque<Lent>,
    /// Answered requests for the queue's thread to commit: out header and body length.
    done: Vec<(Lent, [u8; 16], usize)>,
    /// Set when the queue's thread stops: the workers stop too.
    ended: bool,
}

impl Handoff {
    /// Lends a request to the workers.
    fn lend(&self, lent: Lent) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.todo.push_back(lent);
        drop(s);
        self.lent.notify_one();
    }

    /// The answers the workers have finished.
    fn take_done(&self, into: &mut Vec<(Lent, [u8; 16], usize)>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut s.done);
    }

    /// Ends the workers once they have finished what they hold.
    fn end(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
        self.lent.notify_all();
    }
}

/// Ends a queue's workers when its thread stops, however it stops.
struct EndOnDrop(Arc<Handoff>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// One worker of queue `cpu`: answers lent requests until the queue ends.
fn work(fuse: Fuse, dev: Arc<OwnedFd>, cpu: usize, handoff: Arc<Handoff>, waker: Waker) {
    let _ = fuse_uring::pin_to_cpu(cpu);
    loop {
        let mut lent = {
            let mut s = handoff.state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(l) = s.todo.pop_front() {
                    break l;
                }
                if s.ended {
                    return;
                }
                s = handoff.lent.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        };
        let (req, payload, len) = lent.parts();
        let h = InHeader::parse(req.in_header);
        let out = out_header(
            &h,
            fuse.answer(&h, req.op_in, payload, len, &dev, Serve::Blocking),
        );
        let mut s = handoff.state.lock().unwrap_or_else(|e| e.into_inner());
        s.done.push((lent, out.0, out.1));
        drop(s);
        waker.wake();
    }
}

/// The thread of queue `cpu`: registers, starts its workers, reports `Ok(pinned)` or the error,
/// then serves until the connection ends. With `idle` (the connection's idle windows and this
/// thread's slot) its quick answers are committed as a `SCHED_IDLE` thread.
fn serve_queue(
    fuse: Fuse,
    dev: Arc<OwnedFd>,
    cpu: usize,
    idle: Option<(Arc<IdleCommits>, usize)>,
    registered: std::sync::mpsc::Sender<std::io::Result<bool>>,
) {
    let pinned = fuse_uring::pin_to_cpu(cpu).unwrap_or(false);
    match fuse_uring::request_short_slice(SLICE_NS) {
        Ok(nice) => {
            if let Some((ic, slot)) = &idle {
                ic.adopt(*slot, nice);
            }
        }
        Err(e) => tracing::debug!("io_uring queue {cpu}: no short time slice: {e}"),
    }
    let qid = u16::try_from(cpu).unwrap_or(u16::MAX);
    let handoff = Arc::new(Handoff::default());
    let _end = EndOnDrop(handoff.clone());
    let started = Queue::register(dev.as_fd(), qid, DEPTH, PAYLOAD).and_then(|mut q| {
        let waker = q.waker()?;
        for n in 0..WORKERS {
            let (fuse, dev, handoff, waker) =
                (fuse.clone(), dev.clone(), handoff.clone(), waker.clone());
            std::thread::Builder::new()
                .name(format!("uring-{cpu}w{n}"))
                .spawn(move || work(fuse, dev, cpu, handoff, waker))?;
        }
        Ok(q)
    });
    let mut q = match started {
        Ok(q) => q,
        Err(e) => {
            let _ = registered.send(Err(e));
            return;
        }
    };
    let _ = registered.send(Ok(pinned));
    drop(registered);
    let mut ready = Vec::with_capacity(DEPTH);
    let mut done = Vec::with_capacity(DEPTH);
    let mut rearmed = 0;
    loop {
        let waited = q.wait(&mut ready);
        if q.rearmed().0 != rearmed {
            let (n, errno) = q.rearmed();
            rearmed = n;
            tracing::warn!(
                "io_uring queue {cpu}: the kernel refused an answer ({}); entry registered again",
                std::io::Error::from_raw_os_error(errno)
            );
        }
        match waited {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!("io_uring queue {cpu}: {e}; its thread stops");
                return;
            }
        }
        handoff.take_done(&mut done);
        for (lent, out, n) in done.drain(..) {
            if let Err(e) = q.answer_lent(lent, &out, n) {
                tracing::warn!("io_uring queue {cpu}: {e}; its thread stops");
                return;
            }
        }
        let mut wakes_reader = false;
        for (i, &idx) in ready.iter().enumerate() {
            // Whether no other request waits for this thread: then a READ from the disk is
            // served here, as a worker's answer would cost its reader more ([`Fuse::may_block`]).
            let alone = i + 1 == ready.len() && !q.has_waiting();
            let Some((req, payload, len)) = q.entry(idx) else {
                continue;
            };
            fuse.ovl.stats.uring_requests.fetch_add(1, Relaxed);
            let h = InHeader::parse(req.in_header);
            let idle_worthy = commit_idle(h.opcode, req.op_in);
            let quick = !fuse.may_block(&h, req.op_in);
            let how = if alone {
                Serve::Blocking
            } else {
                Serve::Inline
            };
            let out =
                quick.then(|| out_header(&h, fuse.answer(&h, req.op_in, payload, len, &dev, how)));
            // A READ whose data is not in the page cache says so with EAGAIN.
            let out = out.filter(|o| !(h.opcode == READ && error_of(&o.0) == -libc::EAGAIN));
            let sent = match out {
                Some((out, n)) => {
                    wakes_reader |= idle_worthy;
                    q.answer(idx, &out, n)
                }
                None => {
                    fuse.ovl.stats.offloads.fetch_add(1, Relaxed);
                    match q.lend(idx) {
                        Some(lent) => {
                            handoff.lend(lent);
                            Ok(())
                        }
                        None => Err(std::io::Error::other("entry already lent")),
                    }
                }
            };
            if let Err(e) = sent {
                tracing::warn!("io_uring queue {cpu}: {e}; its thread stops");
                return;
            }
        }
        // A quick answer goes out now, as a SCHED_IDLE thread (the next `wait` only waits).
        if let Some((ic, slot)) = idle.as_ref().filter(|_| wakes_reader) {
            let (sent, was_idle) = ic.commit(*slot, || q.submit());
            if was_idle {
                fuse.ovl.stats.idle_commits.fetch_add(1, Relaxed);
            }
            if let Err(e) = sent {
                tracing::warn!("io_uring queue {cpu}: {e}; its thread stops");
                return;
            }
        }
    }
}

/// The `fuse_out_header` of the answer `r` to request `h` (a body's length, or an error), and
/// the body's length.
fn out_header(h: &InHeader, r: Result<usize, Errno>) -> ([u8; 16], usize) {
    let (error, n) = match r {
        Ok(n) => (0, n),
        Err(e) => (-e.raw_os_error(), 0),
    };
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&((16 + n) as u32).to_ne_bytes());
    out[4..8].copy_from_slice(&error.to_ne_bytes());
    out[8..].copy_from_slice(&h.unique.to_ne_bytes());
    (out, n)
}

/// The error field of an out header.
fn error_of(out: &[u8; 16]) -> i32 {
    i32::from_ne_bytes([out[4], out[5], out[6], out[7]])
}

/// `fuse_open_out` of an open or create: passed through with its backing's id, else cached.
fn open_out(o: &Opened) -> Result<[u8; OPEN_OUT_LEN], Errno> {
    match o.backing.as_deref().map(Backing::raw_id) {
        Some(Some(id)) => Ok(open_bytes(o.fh, PASSTHROUGH_OPEN_BITS, id)),
        // A backing registered through fuser before the rings were up: not nameable here.
        Some(None) => Err(Errno::IO),
        None if o.direct => Ok(open_bytes(o.fh, DIRECT_OPEN_BITS, 0)),
        None => Ok(open_bytes(o.fh, CACHED_OPEN_BITS, 0)),
    }
}

impl Fuse {
    /// Whether a request may keep its thread waiting for long (for the disk, a big copy-up, a
    /// lock held across one): it goes to a worker. A change to a file that has no upper copy yet
    /// copies it up, which takes long past [`QUICK_COPY_UP`] bytes; truncates, WRITEs, syncs,
    /// renames and links are rare here (upper files are passed through) and may be long. A READ
    /// is tried from the page cache first ([`Serve::Inline`]).
    ///
    /// A worker's answer costs more than the handover: it wakes the caller while the worker is
    /// still runnable on the caller's CPU, which the scheduler then takes for busy and moves the
    /// caller to the other CPU (a halted vCPU to wake). Appending a byte to 10k small lower
    /// files moved the caller 7.6k times with every copy-up handed over, 0.5k times with none,
    /// and took 3.48 / 3.62 s against 2.29 / 2.37 s (volatile copy-ups, docs/benchmarks.md).
    /// For the same reason a READ from the disk goes to a worker only while other requests
    /// wait for the queue's thread: `dd` of a 1 GiB lower file not in the page cache took
    /// 1.91 s against 0.995 s when each such READ went to a worker (overlay-bench).
    fn may_block(&self, h: &InHeader, op: &[u8]) -> bool {
        match h.opcode {
            WRITE | FSYNC | FSYNCDIR | FALLOCATE | COPY_FILE_RANGE | RENAME | RENAME2 | LINK
            | SETXATTR | REMOVEXATTR => true,
            OPEN => {
                let flags = u32_at(op, 0) as i32;
                flags & libc::O_TRUNC != 0
                    || (flags & libc::O_ACCMODE != libc::O_RDONLY
                        && self.ovl.copy_up_exceeds(h.nodeid, QUICK_COPY_UP))
            }
            SETATTR => {
                u32_at(op, 0) & FATTR_SIZE != 0 || self.ovl.copy_up_exceeds(h.nodeid, QUICK_COPY_UP)
            }
            _ => false,
        }
    }

    /// Serves one request: `op` is its first argument, `buf[..len]` its other arguments, and the
    /// answer's body goes to the start of `buf`; returns the body's length. [`Serve::Inline`]
    /// reads data from the page cache only (`EAGAIN` otherwise).
    fn answer(
        &self,
        h: &InHeader,
        op: &[u8],
        buf: &mut [u8],
        len: usize,
        dev: &Arc<OwnedFd>,
        how: Serve,
    ) -> Result<usize, Errno> {
        let ino = h.nodeid;
        let args = &buf[..len];
        let caller = caller_of(h.uid, h.gid, 0);
        let open_backing = |fd: &super::passthrough::OwnedFdRef| {
            fuse_uring::backing_open(dev.as_fd(), fd.as_fd()).map(|id| Backing::Raw {
                id,
                dev: dev.clone(),
            })
        };
        let entry = |buf: &mut [u8], a: Result<Attr, Errno>| -> Result<usize, Errno> {
            put(buf, 0, &entry_bytes(Some(&a?)));
            Ok(ENTRY_LEN)
        };
        let attr_out = |buf: &mut [u8], a: Result<Attr, Errno>| -> Result<usize, Errno> {
            let a = a?;
            let mut b = [0u8; ATTR_OUT_LEN];
            b[..8].copy_from_slice(&TTL.as_secs().to_ne_bytes());
            b[16..].copy_from_slice(&attr_bytes(a.ino, Some(&a.st), 0));
            put(buf, 0, &b);
            Ok(ATTR_OUT_LEN)
        };
        match h.opcode {
            LOOKUP => {
                let [name] = strings::<1>(args)?;
                let found = self.ovl.lookup(ino, name)?;
                if found
                    .as_ref()
                    .is_some_and(|a| a.st.st_mode & libc::S_IFMT != libc::S_IFDIR)
                {
                    self.plus.looked_at(h.pid, ino);
                }
                put(buf, 0, &entry_bytes(found.as_ref()));
                Ok(ENTRY_LEN)
            }
            FORGET => {
                self.ovl.forget(ino, u64_at(op, 0));
                Ok(0)
            }
            BATCH_FORGET => {
                let count = u32_at(op, 0) as usize;
                for i in 0..count.min(args.len() / 16) {
                    self.ovl
                        .forget(u64_at(args, 16 * i), u64_at(args, 16 * i + 8));
                }
                Ok(0)
            }
            GETATTR => {
                self.ovl.stats.getattrs.fetch_add(1, Relaxed);
                let fh = (u32_at(op, 0) & FUSE_GETATTR_FH != 0).then(|| u64_at(op, 8));
                attr_out(buf, self.ovl.getattr(ino, fh))
            }
            SETATTR => {
                let valid = u32_at(op, 0);
                let a = SetAttr {
                    mode: (valid & FATTR_MODE != 0).then(|| u32_at(op, 68)),
                    uid: (valid & FATTR_UID != 0).then(|| u32_at(op, 76)),
                    gid: (valid & FATTR_GID != 0).then(|| u32_at(op, 80)),
                    size: (valid & FATTR_SIZE != 0).then(|| u64_at(op, 16)),
                    atime: set_time(
                        valid,
                        FATTR_ATIME,
                        FATTR_ATIME_NOW,
                        u64_at(op, 32),
                        u32_at(op, 56),
                    ),
                    mtime: set_time(
                        valid,
                        FATTR_MTIME,
                        FATTR_MTIME_NOW,
                        u64_at(op, 40),
                        u32_at(op, 60),
                    ),
                    fh: (valid & FATTR_FH != 0).then(|| u64_at(op, 8)),
                };
                attr_out(buf, self.changed(self.ovl.setattr(ino, a)))
            }
            READLINK => {
                let t = self.ovl.readlink(ino)?;
                if !put(buf, 0, &t) {
                    return Err(Errno::NAMETOOLONG);
                }
                Ok(t.len())
            }
            SYMLINK => {
                let [name, target] = strings::<2>(args)?;
                let obj = crate::namespace::NewObject::Symlink {
                    target: target.as_bytes(),
                };
                let made = self.ovl.create_object(ino, name, obj, caller);
                entry(buf, self.changed(made.map(|r| r.0)))
            }
            MKNOD => {
                let [name] = strings::<1>(args)?;
                let mode = u32_at(op, 0);
                let obj = crate::namespace::NewObject::Node {
                    kind: sys::FileType::from_raw_mode(mode),
                    mode,
                    rdev: u64::from(u32_at(op, 4)),
                };
                let c = caller_of(h.uid, h.gid, u32_at(op, 8));
                let made = self.ovl.create_object(ino, name, obj, c);
                entry(buf, self.changed(made.map(|r| r.0)))
            }
            MKDIR => {
                let [name] = strings::<1>(args)?;
                let obj = crate::namespace::NewObject::Dir {
                    mode: u32_at(op, 0),
                };
                let c = caller_of(h.uid, h.gid, u32_at(op, 4));
                let made = self.ovl.create_object(ino, name, obj, c);
                entry(buf, self.changed(made.map(|r| r.0)))
            }
            UNLINK => {
                let [name] = strings::<1>(args)?;
                self.changed(self.ovl.unlink(ino, name)).map(|()| 0)
            }
            RMDIR => {
                let [name] = strings::<1>(args)?;
                self.changed(self.ovl.rmdir(ino, name)).map(|()| 0)
            }
            RENAME | RENAME2 => {
                let [name, newname] = strings::<2>(args)?;
                let flags = if h.opcode == RENAME2 {
                    u32_at(op, 8)
                } else {
                    0
                };
                let flags = sys::RenameFlags::from_bits_retain(flags as _);
                let newdir = u64_at(op, 0);
                self.changed(self.ovl.rename(ino, name, newdir, newname, flags))
                    .map(|()| 0)
            }
            LINK => {
                let [newname] = strings::<1>(args)?;
                entry(
                    buf,
                    self.changed(self.ovl.link(u64_at(op, 0), ino, newname)),
                )
            }
            OPEN => {
                let o = self.open_file(ino, u32_at(op, 0) as i32, open_backing)?;
                put(buf, 0, &open_out(&o)?);
                Ok(OPEN_OUT_LEN)
            }
            CREATE | TMPFILE => {
                let c = caller_of(h.uid, h.gid, u32_at(op, 8));
                let flags = u32_at(op, 0) as i32;
                let mode = u32_at(op, 4);
                let (attr, o) = if h.opcode == CREATE {
                    let [name] = strings::<1>(args)?;
                    self.create_file(ino, name, mode, flags, c, open_backing)?
                } else {
                    // The name the kernel sends ("/") names nothing.
                    self.create_tmp_file(ino, mode, flags, c, open_backing)?
                };
                let open = open_out(&o)?;
                put(buf, 0, &entry_bytes(Some(&attr)));
                put(buf, ENTRY_LEN, &open);
                Ok(ENTRY_LEN + OPEN_OUT_LEN)
            }
            READ => {
                let size = (u32_at(op, 16) as usize).min(buf.len());
                let (fh, offset, buf) = (u64_at(op, 0), u64_at(op, 8), &mut buf[..size]);
                let read = self.ovl.read_into(fh, offset, buf, how == Serve::Inline);
                // Counted once: an inline try that would wait is served again by a worker.
                if how == Serve::Blocking || read != Err(Errno::AGAIN) {
                    self.ovl.stats.reads.fetch_add(1, Relaxed);
                }
                read
            }
            WRITE => {
                let size = (u32_at(op, 16) as usize).min(args.len());
                let n = self
                    .ovl
                    .write(u64_at(op, 0), u64_at(op, 8), &args[..size])?;
                put(buf, 0, &n.to_ne_bytes());
                put(buf, 4, &[0; 4]);
                Ok(8)
            }
            STATFS => {
                let s = self.ovl.statfs()?;
                let mut b = [0u8; 80];
                for (i, v) in [s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree]
                    .iter()
                    .enumerate()
                {
                    b[8 * i..8 * i + 8].copy_from_slice(&v.to_ne_bytes());
                }
                b[40..44].copy_from_slice(&(s.f_bsize as u32).to_ne_bytes());
                b[44..48].copy_from_slice(&255u32.to_ne_bytes());
                b[48..52].copy_from_slice(&(s.f_frsize as u32).to_ne_bytes());
                put(buf, 0, &b);
                Ok(80)
            }
            RELEASE => {
                let fh = u64_at(op, 0);
                self.release_mode(fh);
                self.ovl.release(fh);
                Ok(0)
            }
            FSYNC => {
                let datasync = u32_at(op, 8) & FUSE_FSYNC_FDATASYNC != 0;
                self.ovl.fsync(u64_at(op, 0), datasync).map(|()| 0)
            }
            FSYNCDIR => self.ovl.fsyncdir(ino).map(|()| 0),
            SETXATTR => {
                let size = u32_at(op, 0) as usize;
                let [name] = strings::<1>(args)?;
                let start = name.len() + 1;
                let value = args.get(start..start + size).ok_or(Errno::INVAL)?;
                let flags = u32_at(op, 4) as i32;
                self.changed(self.ovl.setxattr(ino, name, value, flags))
                    .map(|()| 0)
            }
            GETXATTR => {
                let [name] = strings::<1>(args)?;
                let r = self.ovl.getxattr(ino, name);
                xattr_answer(buf, u32_at(op, 0), r)
            }
            LISTXATTR => {
                // The request carries no capabilities: uid 0 stands for CAP_SYS_ADMIN.
                let r = self.ovl.listxattr(ino, h.uid == 0);
                xattr_answer(buf, u32_at(op, 0), r)
            }
            REMOVEXATTR => {
                let [name] = strings::<1>(args)?;
                self.changed(self.ovl.removexattr(ino, name)).map(|()| 0)
            }
            FLUSH | RELEASEDIR | DESTROY => Ok(0),
            OPENDIR => {
                if self.no_opendir.load(Relaxed) {
                    return Err(Errno::NOSYS);
                }
                put(
                    buf,
                    0,
                    &open_bytes(0, FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE, 0),
                );
                Ok(OPEN_OUT_LEN)
            }
            READDIR => {
                let size = (u32_at(op, 16) as usize).min(buf.len());
                let mut at = 0;
                self.fill_dir(ino, u64_at(op, 8), |ino, next, kind, name| {
                    let name = name.as_bytes();
                    if at + dirent_len(name) > size {
                        return true;
                    }
                    put_dirent(buf, at, ino, next, dtype(kind), name);
                    at += dirent_len(name);
                    false
                })?;
                Ok(at)
            }
            READDIRPLUS => {
                let size = (u32_at(op, 16) as usize).min(buf.len());
                let mut at = 0;
                self.fill_dir_plus(ino, u64_at(op, 8), Some(h.pid), |next, name, item| {
                    let name = name.as_bytes();
                    if at + ENTRY_LEN + dirent_len(name) > size {
                        return true;
                    }
                    let (nodeid, e, mode) = match item {
                        PlusItem::Dot(t) => (
                            t,
                            entry_of(t, attr_bytes(t, None, libc::S_IFDIR)),
                            libc::S_IFDIR,
                        ),
                        PlusItem::Entry(a) => (a.ino, entry_bytes(Some(a)), a.st.st_mode),
                        PlusItem::Bare(ino, kind) => (ino, entry_bytes(None), dtype(kind) << 12),
                    };
                    put(buf, at, &e);
                    put_dirent(buf, at + ENTRY_LEN, nodeid, next, mode >> 12, name);
                    at += ENTRY_LEN + dirent_len(name);
                    false
                })?;
                Ok(at)
            }
            ACCESS => self
                .ovl
                .access(ino, u32_at(op, 0) as i32, h.uid, h.gid)
                .map(|()| 0),
            FALLOCATE => self
                .ovl
                .fallocate(
                    u64_at(op, 0),
                    u64_at(op, 8),
                    u64_at(op, 16),
                    u32_at(op, 24) as i32,
                )
                .map(|()| 0),
            LSEEK => {
                let off =
                    self.ovl
                        .lseek(u64_at(op, 0), u64_at(op, 8) as i64, u32_at(op, 16) as i32)?;
                put(buf, 0, &off.to_ne_bytes());
                Ok(8)
            }
            COPY_FILE_RANGE => {
                let n = self.ovl.copy_file_range(
                    u64_at(op, 0),
                    u64_at(op, 8),
                    u64_at(op, 24),
                    u64_at(op, 32),
                    u64_at(op, 40),
                )?;
                put(buf, 0, &n.to_ne_bytes());
                put(buf, 4, &[0; 4]);
                Ok(8)
            }
            // Locks stay the kernel's; no ioctl, poll, bmap, syncfs, statx: as on the
            // `/dev/fuse` session, the kernel learns so from ENOSYS once.
            _ => Err(Errno::NOSYS),
        }
    }
}

/// Whether io_uring can be offered: the fuse module allows it, turned on here if it does not and
/// the daemon may (root): it is off by default on most kernels, and only connections that ask for
/// io_uring at INIT use it.
pub(super) fn enable() -> bool {
    if let Err(e) = fuse_uring::ring_allowed() {
        tracing::info!("io_uring not available ({e}): requests go over /dev/fuse");
        return false;
    }
    if fuse_uring::uring_enabled() {
        return true;
    }
    let path = "/sys/module/fuse/parameters/enable_uring";
    match std::fs::write(path, "Y\n") {
        Ok(()) => {
            tracing::info!("io_uring: turned on the fuse module's enable_uring");
            fuse_uring::uring_enabled()
        }
        Err(e) => {
            tracing::info!("io_uring not available ({path}: {e}): requests go over /dev/fuse");
            false
        }
    }
}
