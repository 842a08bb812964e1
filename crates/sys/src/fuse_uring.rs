//! FUSE over io_uring (kernel ≥ 6.14, `CONFIG_FUSE_IO_URING`, fuse module parameter
//! `enable_uring=Y`): one queue per possible CPU, each a ring of entries the kernel fills with a
//! request of a task running on that CPU. A thread pinned to the CPU waits on its ring, answers an
//! entry and hands it back for the next request in one `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`. The
//! caller and the server then meet on one CPU: no idle vCPU has to be woken per request.
//!
//! The layout of an entry (`include/uapi/linux/fuse.h`, protocol 7.42): a 288-byte header —
//! 128 bytes for the in header of a request and the out header of its answer, 128 bytes for the
//! request's first argument (its fixed-size struct), and the entry's own in/out fields — and a
//! payload buffer with the request's other arguments (names, write data) and then the answer's
//! body. This module owns the buffers and the ring; what the bytes mean is the caller's business.
//!
//! Only the queue's thread submits to its ring. A request that may take long can be lent
//! ([`Queue::lend`]) to another thread, which answers in the entry's buffers and hands it back
//! for the queue's thread to commit ([`Queue::answer_lent`]), waking it through a [`Waker`].

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// Bytes of the header area that holds `fuse_in_header` (request) and `fuse_out_header` (answer).
pub const IN_OUT_LEN: usize = 128;
/// Bytes of the area holding the request's first argument.
pub const OP_IN_LEN: usize = 128;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct EntInOut {
    flags: u64,
    /// The request's `unique`; handed back in the commit command.
    commit_id: u64,
    /// Request: bytes of payload the kernel wrote. Answer: bytes of payload we wrote.
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`: iovec 0 of an entry.
#[repr(C)]
struct Header {
    in_out: [u8; IN_OUT_LEN],
    op_in: [u8; OP_IN_LEN],
    ent: EntInOut,
}

/// `struct fuse_uring_cmd_req`, in the command area of a 128-byte SQE.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CmdReq {
    flags: u64,
    commit_id: u64,
    qid: u16,
    padding: [u8; 6],
}

const _: () = assert!(std::mem::size_of::<Header>() == 288);
const _: () = assert!(std::mem::size_of::<CmdReq>() == 24);

/// One ring entry: its header, payload and the iovecs the kernel was given for them, at
/// addresses that stay put. Shared between the queue and the [`Lent`] handle of a request being
/// answered on another thread, so the buffers outlive whichever of the two ends last.
///
/// Who may touch the buffers: the kernel while the entry is offered to it (registered or
/// committed, no completion seen since); the queue's thread once a completion handed it the
/// request; the holder of the entry's one [`Lent`] while it is lent. Never two at once.
struct EntryBuf {
    /// In/out headers and the first argument (iovec 0).
    header: UnsafeCell<Header>,
    /// The other arguments of a request, then the answer's body (iovec 1).
    payload: UnsafeCell<Box<[u8]>>,
    /// The two iovecs REGISTER hands the kernel, pointing at the two above.
    iov: UnsafeCell<[libc::iovec; 2]>,
}

// SAFETY: the cells are only reached by whoever holds the entry at the time (see `EntryBuf`):
// the queue's thread through `&mut Queue`, or the thread that owns the entry's unique `Lent`.
unsafe impl Send for EntryBuf {}
// SAFETY: as above; a shared `EntryBuf` is never read through by two threads at once.
unsafe impl Sync for EntryBuf {}

impl EntryBuf {
    fn new(payload_len: usize) -> Arc<EntryBuf> {
        let buf = Arc::new(EntryBuf {
            header: UnsafeCell::new(Header {
                in_out: [0; IN_OUT_LEN],
                op_in: [0; OP_IN_LEN],
                ent: EntInOut::default(),
            }),
            payload: UnsafeCell::new(vec![0u8; payload_len].into_boxed_slice()),
            iov: UnsafeCell::new(
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 2],
            ),
        });
        // SAFETY: the entry was just made; nothing else refers to it yet.
        unsafe {
            let payload = &mut *buf.payload.get();
            *buf.iov.get() = [
                libc::iovec {
                    iov_base: buf.header.get().cast(),
                    iov_len: std::mem::size_of::<Header>(),
                },
                libc::iovec {
                    iov_base: payload.as_mut_ptr().cast(),
                    iov_len: payload.len(),
                },
            ];
        }
        buf
    }

    /// The request it holds and its payload buffer with the number of request bytes in it.
    ///
    /// SAFETY: the caller holds the entry (see [`EntryBuf`]) for as long as the borrows live.
    // The entry is shared (`Arc`) with the kernel's and a `Lent`'s view of it, so `&mut self`
    // cannot be had; holding the entry is what makes the mutable borrow unique.
    #[allow(clippy::mut_from_ref)]
    unsafe fn parts(&self) -> (Request<'_>, &mut [u8], usize) {
        // SAFETY: per the caller's contract nobody else reads or writes these cells meanwhile;
        // the header and the payload are separate allocations.
        unsafe {
            let header = &*self.header.get();
            let payload = &mut **self.payload.get();
            let n = (header.ent.payload_sz as usize).min(payload.len());
            (
                Request {
                    in_header: &header.in_out,
                    op_in: &header.op_in,
                },
                payload,
                n,
            )
        }
    }

    /// Writes the answer's out header and length; returns the request's commit id.
    ///
    /// SAFETY: the caller holds the entry (see [`EntryBuf`]).
    unsafe fn set_answer(&self, out_header: &[u8; 16], len: usize) -> u64 {
        // SAFETY: per the caller's contract nobody else touches the entry meanwhile.
        unsafe {
            let header = &mut *self.header.get();
            let cap = (&*self.payload.get()).len();
            header.in_out[..16].copy_from_slice(out_header);
            header.ent.payload_sz = len.min(cap) as u32;
            header.ent.commit_id
        }
    }
}

/// A request handed to another thread to answer ([`Queue::lend`]): its buffers, held alone.
/// Given back with [`Queue::answer_lent`]; one that is dropped instead is lost to its queue.
pub struct Lent {
    buf: Arc<EntryBuf>,
    idx: usize,
}

impl Lent {
    /// The request, its payload buffer and the number of request bytes in it; the answer's body
    /// goes to the start of the buffer.
    pub fn parts(&mut self) -> (Request<'_>, &mut [u8], usize) {
        // SAFETY: a `Lent` is the entry's only handle while it exists: the queue does not touch a
        // lent entry and the kernel waits for its commit; `&mut self` makes this borrow unique.
        unsafe { self.buf.parts() }
    }
}

/// Wakes a queue's thread from another thread (an eventfd its ring reads).
#[derive(Clone)]
pub struct Waker(Arc<OwnedFd>);

impl Waker {
    /// Wakes the queue's thread, or makes its next wait return at once.
    pub fn wake(&self) {
        let _ = rustix::io::write(&*self.0, &1u64.to_ne_bytes());
    }
}

/// `user_data` of the eventfd read that wakes the queue's thread.
const WAKE: u64 = u64::MAX;

/// One queue of a FUSE connection: a ring and its registered entries. Used by one thread.
pub struct Queue {
    /// The ring (128-byte SQEs for uring commands). Declared first: dropped before the buffers.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Registered entries; an SQE's `user_data` is its index here.
    entries: Vec<Arc<EntryBuf>>,
    /// Which entries are lent to another thread.
    lent: Vec<bool>,
    /// The eventfd of [`Queue::waker`] and the buffer its pending read fills.
    wake: Option<(Arc<OwnedFd>, Box<[u8; 8]>)>,
    /// The connection's `/dev/fuse` fd the commands go to.
    dev: OwnedFd,
    /// The queue (= CPU) the entries belong to.
    qid: u16,
    /// Entries registered again after the kernel refused them ([`Queue::wait`]).
    rearmed: u64,
    /// The errno of the last refusal.
    last_error: i32,
}

/// The header areas of a request taken from an entry.
pub struct Request<'a> {
    /// `fuse_in_header` and what follows it in the header area.
    pub in_header: &'a [u8; IN_OUT_LEN],
    /// The first argument (zeroes past its size).
    pub op_in: &'a [u8; OP_IN_LEN],
}

impl Queue {
    /// Makes a ring for queue `qid` of the connection `dev` (a `/dev/fuse` fd, duplicated here)
    /// and registers `depth` entries with payloads of `payload_len` bytes. Requests start to
    /// arrive once every queue of the connection has registered.
    pub fn register(
        dev: BorrowedFd<'_>,
        qid: u16,
        depth: usize,
        payload_len: usize,
    ) -> io::Result<Queue> {
        let dev = dev.try_clone_to_owned()?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_single_issuer()
            .build((depth * 2 + 1).next_power_of_two() as u32)?;
        let mut q = Queue {
            ring,
            entries: (0..depth).map(|_| EntryBuf::new(payload_len)).collect(),
            lent: vec![false; depth],
            wake: None,
            dev,
            qid,
            rearmed: 0,
            last_error: 0,
        };
        for i in 0..depth {
            q.push_register(i)?;
        }
        q.ring.submit()?;
        // A refused REGISTER completes at once; an accepted one completes with the first request.
        if let Some(c) = q.ring.completion().next()
            && c.result() < 0
        {
            return Err(io::Error::from_raw_os_error(-c.result()));
        }
        Ok(q)
    }

    /// The uring command `op` for entry `idx`, with the entry's iovecs for REGISTER.
    fn command(
        &self,
        op: u32,
        commit_id: u64,
        iov: Option<*const libc::iovec>,
        idx: usize,
    ) -> squeue::Entry128 {
        let req = CmdReq {
            commit_id,
            qid: self.qid,
            ..CmdReq::default()
        };
        let mut cmd = [0u8; 80];
        cmd[..8].copy_from_slice(&req.flags.to_ne_bytes());
        cmd[8..16].copy_from_slice(&req.commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&req.qid.to_ne_bytes());
        let mut b = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), op).cmd(cmd);
        if let Some(p) = iov {
            b = b.addr(Some(p as u64));
        }
        let mut sqe = b.build().user_data(idx as u64);
        if iov.is_some() {
            // REGISTER takes its two iovecs in sqe->addr and their count in sqe->len, which the
            // crate's UringCmd80 builder has no setter for: `len` is the u32 at byte 24.
            // SAFETY: Entry128 is the 128-byte SQE itself (repr(C) wrapper around the kernel's
            // struct), so viewing it as bytes and writing 4 of them in bounds is sound.
            let raw = unsafe { &mut *(&mut sqe as *mut squeue::Entry128).cast::<[u8; 128]>() };
            raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        }
        sqe
    }

    /// Queues the REGISTER of entry `idx` (its buffers handed to the kernel).
    fn push_register(&mut self, idx: usize) -> io::Result<()> {
        let iov = self.entries[idx]
            .iov
            .get()
            .cast::<libc::iovec>()
            .cast_const();
        let sqe = self.command(CMD_REGISTER, 0, Some(iov), idx);
        self.push(&sqe)
    }

    /// A [`Waker`] for this queue's thread: the first call makes the eventfd and queues its read.
    pub fn waker(&mut self) -> io::Result<Waker> {
        if self.wake.is_none() {
            let fd = rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )?;
            self.wake = Some((Arc::new(fd), Box::new([0; 8])));
            self.push_wake_read()?;
        }
        let fd = self.wake.as_ref().map(|(fd, _)| fd.clone());
        fd.map(Waker).ok_or_else(|| io::Error::other("no eventfd"))
    }

    /// Queues the read of the wake eventfd, completed by the next [`Waker::wake`].
    fn push_wake_read(&mut self) -> io::Result<()> {
        let Some((fd, buf)) = &mut self.wake else {
            return Ok(());
        };
        let sqe: squeue::Entry128 =
            opcode::Read::new(types::Fd(fd.as_fd().as_raw_fd()), buf.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE)
                .into();
        self.push(&sqe)
    }

    fn push(&mut self, sqe: &squeue::Entry128) -> io::Result<()> {
        // SAFETY: the buffers an SQE points at (an entry's iovecs, header and payload, the wake
        // read's buffer) are held by `self`, whose ring drops first (fields drop in order), and
        // an entry's buffers also by its `Lent`, if any.
        let pushed = unsafe { self.ring.submission().push(sqe) };
        if pushed.is_err() {
            // The ring has room for every entry twice; a full queue means it was drained wrong.
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(sqe) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        Ok(())
    }

    /// Submits the answers pushed so far and waits for requests: the indexes of the entries that
    /// hold one go to `ready`. `Ok(false)` once the connection is gone (unmounted, aborted).
    ///
    /// An entry the kernel hands back with any other error (a commit it refused) would be lost
    /// to the queue, and a queue without entries stalls every request made on its CPU: such an
    /// entry is registered again, and counted ([`Queue::rearmed`]).
    pub fn wait(&mut self, ready: &mut Vec<usize>) -> io::Result<bool> {
        ready.clear();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let mut ended = false;
        let mut lost = Vec::new();
        let mut woken = false;
        for c in self.ring.completion() {
            let idx = c.user_data() as usize;
            match -c.result() {
                _ if c.user_data() == WAKE => woken = true,
                _ if idx >= self.entries.len() => {}
                e if e <= 0 => ready.push(idx),
                libc::ENOTCONN | libc::ECANCELED | libc::ENODEV => ended = true,
                e => lost.push((idx, e)),
            }
        }
        if ended {
            return Ok(!ready.is_empty());
        }
        if woken {
            self.push_wake_read()?;
        }
        for (idx, errno) in lost {
            self.rearmed += 1;
            self.last_error = errno;
            self.push_register(idx)?;
        }
        Ok(true)
    }

    /// Submits the answers pushed so far without waiting for requests (the next
    /// [`Queue::wait`] waits).
    pub fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether requests (or a wake) have arrived since the last [`Queue::wait`]: a caller is
    /// waiting for this thread.
    pub fn has_waiting(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// How many entries were registered again after the kernel refused them, and the errno of
    /// the last refusal.
    pub fn rearmed(&self) -> (u64, i32) {
        (self.rearmed, self.last_error)
    }

    /// The request held by entry `idx`: its header areas, and its payload buffer with the
    /// number of request bytes in it. The answer's body is written to the same buffer once the
    /// request's arguments have been read.
    ///
    /// `None` for an entry that is lent, or out of range.
    pub fn entry(&mut self, idx: usize) -> Option<(Request<'_>, &mut [u8], usize)> {
        if *self.lent.get(idx)? {
            return None;
        }
        // SAFETY: the entry is not lent, and `wait` reported its request, so the kernel waits for
        // its commit; `&mut self` keeps the queue's own access unique while the borrows live.
        Some(unsafe { self.entries[idx].parts() })
    }

    /// Answers the request of entry `idx` (`out_header`: the 16-byte `fuse_out_header`; `len`:
    /// bytes of answer body written at the start of its payload) and asks for the next one.
    /// Sent with the next [`Queue::wait`]. An entry that is lent is refused.
    pub fn answer(&mut self, idx: usize, out_header: &[u8; 16], len: usize) -> io::Result<()> {
        if self.lent.get(idx) != Some(&false) {
            return Err(io::Error::other(
                "answer of an entry that is lent or unknown",
            ));
        }
        // SAFETY: as in `entry`.
        let commit_id = unsafe { self.entries[idx].set_answer(out_header, len) };
        let sqe = self.command(CMD_COMMIT_AND_FETCH, commit_id, None, idx);
        self.push(&sqe)
    }

    /// Lends the request of entry `idx` (reported by [`Queue::wait`], not answered) to another
    /// thread. `None` if it is lent already, or out of range.
    pub fn lend(&mut self, idx: usize) -> Option<Lent> {
        let lent = self.lent.get_mut(idx)?;
        if *lent {
            return None;
        }
        *lent = true;
        Some(Lent {
            buf: self.entries[idx].clone(),
            idx,
        })
    }

    /// Answers a lent request (as [`Queue::answer`]), which returns its entry to the queue.
    pub fn answer_lent(&mut self, lent: Lent, out_header: &[u8; 16], len: usize) -> io::Result<()> {
        let idx = lent.idx;
        match self.entries.get(idx) {
            Some(e) if Arc::ptr_eq(e, &lent.buf) && self.lent[idx] => {}
            _ => return Err(io::Error::other("answer of an entry lent by another queue")),
        }
        drop(lent);
        self.lent[idx] = false;
        self.answer(idx, out_header, len)
    }
}

/// The number of possible CPUs: the kernel makes one queue for each.
pub fn possible_cpus() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    s.trim()
        .rsplit([',', '-'])
        .next()
        .and_then(|last| last.parse::<usize>().ok())
        .map_or(1, |last| last + 1)
}

/// Pins the calling thread to `cpu` if the thread may run there (its affinity mask, as set by
/// `taskset` or a cpuset, allows it); `Ok(false)` leaves it as it was.
pub fn pin_to_cpu(cpu: usize) -> io::Result<bool> {
    let allowed = rustix::thread::sched_getaffinity(None).map_err(io::Error::from)?;
    if !allowed.is_set(cpu) {
        return Ok(false);
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(io::Error::from)?;
    Ok(true)
}

/// Whether the fuse module lets connections use io_uring (`enable_uring`).
pub fn uring_enabled() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|s| s.trim() == "Y")
}

/// Whether this process may make an io_uring with the entry size the queues use (the
/// `kernel.io_uring_disabled` sysctl, seccomp and the like may refuse it).
pub fn ring_allowed() -> io::Result<()> {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .build(1)
        .map(drop)
}

/// `FUSE_DEV_IOC_BACKING_OPEN`: registers `fd` as a passthrough backing file of the connection
/// `dev` and returns its id.
pub fn backing_open(dev: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<u32> {
    #[repr(C)]
    struct BackingMap {
        fd: i32,
        flags: u32,
        padding: u64,
    }
    let map = BackingMap {
        fd: fd.as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // _IOW(229, 1, struct fuse_backing_map)
    const BACKING_OPEN: libc::c_ulong = 0x4010_e501;
    // SAFETY: the ioctl reads a fuse_backing_map from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), BACKING_OPEN, &map as *const BackingMap) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u32)
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: drops backing file `id` of the connection `dev`.
pub fn backing_close(dev: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    // _IOW(229, 2, uint32_t)
    const BACKING_CLOSE: libc::c_ulong = 0x4004_e502;
    // SAFETY: the ioctl reads a u32 from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), BACKING_CLOSE, &id as *const u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the scheduler for a short time slice (`ns`, EEVDF custom slice, kernel ≥ 6.12) for the
/// calling thread, as a normal (`SCHED_OTHER`) thread at its current niceness: a woken thread with
/// a shorter slice than the running task's preempts it, so a queue thread is not left waiting
/// behind a busy task on its CPU. Returns the niceness, for [`set_policy`].
pub fn request_short_slice(ns: u64) -> io::Result<i32> {
    // SAFETY: getpriority only reads the calling thread's niceness (-1 is a valid value, and
    // the call cannot fail for the caller itself).
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    set_policy(0, Policy::Normal { nice, slice_ns: ns })?;
    Ok(nice)
}

/// The calling thread's id, for [`set_policy`] from another thread.
pub fn gettid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// A scheduling policy for [`set_policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// `SCHED_OTHER` at niceness `nice`, with an EEVDF slice of `slice_ns` (0: the default).
    Normal { nice: i32, slice_ns: u64 },
    /// `SCHED_IDLE`: runs only when nothing else wants the CPU, and a CPU that runs nothing
    /// else counts as idle to the scheduler's wakeup placement.
    Idle,
}

/// `sched_setattr` of thread `tid` of this process (0: the calling thread). Going back from
/// [`Policy::Idle`] to a normal policy needs `CAP_SYS_NICE` (or a fitting `RLIMIT_NICE`).
pub fn set_policy(tid: i32, policy: Policy) -> io::Result<()> {
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        sched_policy: u32,
        sched_flags: u64,
        sched_nice: i32,
        sched_priority: u32,
        sched_runtime: u64,
        sched_deadline: u64,
        sched_period: u64,
        sched_util_min: u32,
        sched_util_max: u32,
    }
    let (sched_policy, sched_nice, sched_runtime) = match policy {
        Policy::Normal { nice, slice_ns } => (libc::SCHED_OTHER as u32, nice, slice_ns),
        Policy::Idle => (libc::SCHED_IDLE as u32, 0, 0),
    };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy,
        sched_flags: 0,
        sched_nice,
        sched_priority: 0,
        sched_runtime,
        sched_deadline: 0,
        sched_period: 0,
        sched_util_min: 0,
        sched_util_max: 0,
    };
    // SAFETY: sched_setattr reads `size` bytes of a sched_attr from the pointer, valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const SchedAttr, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
