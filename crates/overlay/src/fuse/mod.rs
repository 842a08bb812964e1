//! The FUSE front: the only module that imports fuser. Each `Filesystem` method calls one fallible
//! [`Overlay`] operation and turns its result into a reply; errors become errnos, never panics.
//!
//! The lowers never change while mounted, and every change to the upper goes through this daemon,
//! so entries, attributes and negative lookups are cached by the kernel for a long time.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use layerfs_sys::{self as sys, Errno};

use crate::attrs::SetAttr;
use crate::namespace::{Caller, NewObject};
use crate::overlay::{Attr, Overlay};

mod convert;
mod idle;
use convert::{bare_attr, errno, file_attr, kind_of_sys, set_time};
mod notify;
mod ops;
use ops::PlusItem;
mod passthrough;
use passthrough::{Backing, Passthrough};
mod plus;
mod session;
pub use session::{MountOptions, serve};
mod uring;
mod wire;

/// How long the kernel may cache entries, attributes and negative lookups.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// The `fuser::Filesystem` of a mount. Clones share everything but the end-of-session signal:
/// the fuser session owns one, each io_uring thread another.
pub struct Fuse {
    ovl: Arc<Overlay>,
    /// Kernel passthrough bookkeeping (its own lock).
    pt: Arc<Passthrough>,
    /// Told when the session ends.
    ended: Option<std::sync::mpsc::Sender<()>>,
    /// Sends notifications to the kernel (set once the session exists).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// The kernel can open directories without OPENDIR (FUSE_NO_OPENDIR_SUPPORT, set at INIT).
    no_opendir: Arc<AtomicBool>,
    /// INIT granted FUSE_OVER_IO_URING: requests are to be taken from io_uring queues.
    uring: Arc<AtomicBool>,
    /// Ask for io_uring at INIT (the mount did not turn it off).
    want_uring: bool,
    /// Which READDIRPLUS entries carry attributes, per caller (its own lock).
    plus: Arc<plus::PlusPolicy>,
    /// Lower files of at least this size are read without the page cache (`direct_read`).
    direct_min: Option<u64>,
}

impl Fuse {
    /// Wraps an overlay.
    pub fn new(ovl: Arc<Overlay>) -> Self {
        Fuse {
            ovl,
            pt: Arc::default(),
            ended: None,
            notifier: Arc::default(),
            no_opendir: Arc::default(),
            uring: Arc::default(),
            want_uring: false,
            plus: Arc::default(),
            direct_min: None,
        }
    }
}

impl Clone for Fuse {
    fn clone(&self) -> Self {
        Fuse {
            ovl: self.ovl.clone(),
            pt: self.pt.clone(),
            ended: None,
            notifier: self.notifier.clone(),
            plus: self.plus.clone(),
            no_opendir: self.no_opendir.clone(),
            uring: self.uring.clone(),
            want_uring: self.want_uring,
            direct_min: self.direct_min,
        }
    }
}

/// The largest READ and WRITE, and the readahead window.
const MAX_READ: u32 = 1 << 20;

/// Open flags of a passthrough open: no FLUSH on close (there is nothing to flush).
const PASSTHROUGH_OPEN: FopenFlags = FopenFlags::FOPEN_NOFLUSH;
/// Open flags of an open served through the daemon: keep the page cache across opens (the data
/// changes only through the mount) and no FLUSH on close.
const CACHED_OPEN: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);
/// The two as `fuse_open_out.open_flags` bits (io_uring answers).
const PASSTHROUGH_OPEN_BITS: u32 = PASSTHROUGH_OPEN.union(FopenFlags::FOPEN_PASSTHROUGH).bits();
const CACHED_OPEN_BITS: u32 = CACHED_OPEN.bits();
/// Open flags of a big lower file, read through the daemon without the page cache (the cache
/// is still kept across opens, for what `mmap` puts there).
const DIRECT_OPEN: FopenFlags = CACHED_OPEN.union(FopenFlags::FOPEN_DIRECT_IO);
const DIRECT_OPEN_BITS: u32 = DIRECT_OPEN.bits();

/// The caller of a request; `umask`: the one the kernel left unapplied (CREATE, MKDIR, MKNOD).
fn caller_of(uid: u32, gid: u32, umask: u32) -> Caller {
    Caller { uid, gid, umask }
}

fn caller(req: &Request) -> Caller {
    caller_of(req.uid(), req.gid(), 0)
}

/// The caller of a CREATE, MKDIR or MKNOD, with the umask the kernel left unapplied.
fn creator(req: &Request, umask: u32) -> Caller {
    caller_of(req.uid(), req.gid(), umask)
}

fn reply_entry(reply: ReplyEntry, r: Result<Attr, Errno>) {
    match r {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, Errno>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(fuser::Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

impl Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
            // The kernel reads ACLs (GETXATTR system.posix_acl_*) and enforces them in its
            // permission checks, as on kernel overlayfs; it also caches them.
            InitFlags::FUSE_POSIX_ACL,
            // The umask is ours to apply: not under a default ACL (namespace::create_object).
            InitFlags::FUSE_DONT_MASK,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            let _ = config.add_capabilities(cap);
        }
        let no_opendir = config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok();
        self.no_opendir.store(no_opendir, Relaxed);
        if self.want_uring {
            let granted = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            self.uring.store(granted, Relaxed);
        }
        let root = rustix::process::geteuid().is_root();
        if root && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() {
            let _ = config.set_max_stack_depth(1);
            self.pt
                .enabled
                .store(true, std::sync::atomic::Ordering::Relaxed);
        } else {
            tracing::info!("kernel passthrough not available: file data goes through the daemon");
        }
        let _ = config.set_max_write(MAX_READ);
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(());
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.ovl.lookup(parent.0, name) {
            Ok(Some(a)) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Ok(None) => {
                reply.entry(&TTL, &bare_attr(0, FileType::RegularFile), Generation(0));
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        if self.uring.load(Relaxed) {
            session::pace_forgets(req.unique().0);
        }
        self.ovl.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.ovl
            .stats
            .getattrs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.ovl.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            fh: fh.map(|f| f.0),
        };
        match self.changed(self.ovl.setattr(ino.0, a)) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.ovl.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = sys::FileType::from_raw_mode(mode);
        let obj = NewObject::Node {
            kind,
            mode,
            rdev: rdev as u64,
        };
        reply_entry(
            reply,
            self.changed(
                self.ovl
                    .create_object(parent.0, name, obj, creator(req, umask))
                    .map(|r| r.0),
            ),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let obj = NewObject::Dir { mode };
        reply_entry(
            reply,
            self.changed(
                self.ovl
                    .create_object(parent.0, name, obj, creator(req, umask))
                    .map(|r| r.0),
            ),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.changed(self.ovl.unlink(parent.0, name)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.changed(self.ovl.rmdir(parent.0, name)));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let obj = NewObject::Symlink {
            target: target.as_os_str().as_bytes(),
        };
        reply_entry(
            reply,
            self.changed(
                self.ovl
                    .create_object(parent.0, link_name, obj, caller(req))
                    .map(|r| r.0),
            ),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let flags = sys::RenameFlags::from_bits_retain(flags.bits() as _);
        reply_empty(
            reply,
            self.changed(self.ovl.rename(parent.0, name, newparent.0, newname, flags)),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.changed(self.ovl.link(ino.0, newparent.0, newname)),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = self.open_file(ino.0, flags.0, |fd| {
            reply.open_backing(&**fd).map(Backing::Session)
        });
        match opened {
            Ok(o) => match o.backing.as_deref() {
                Some(Backing::Session(b)) => {
                    reply.opened_passthrough(FileHandle(o.fh), PASSTHROUGH_OPEN, b)
                }
                Some(Backing::Raw { .. }) => reply.error(fuser::Errno::EIO),
                None if o.direct => reply.opened(FileHandle(o.fh), DIRECT_OPEN),
                None => reply.opened(FileHandle(o.fh), CACHED_OPEN),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.ovl
            .stats
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut reply = Some(reply);
        let read = self.ovl.read_with(fh.0, offset, size, false, |d| {
            if let Some(r) = reply.take() {
                r.data(d);
            }
        });
        if let (Err(e), Some(r)) = (read, reply) {
            r.error(errno(e));
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.ovl.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Nothing to do: writes go straight to the backing file and locks are the kernel's. Opens
    /// carry FOPEN_NOFLUSH, so the kernel does not send this on close: one round trip less per
    /// file. (It was backed out once over an `umount` EBUSY seen right after a close; 250 mount /
    /// write / close / umount cycles with and without it showed no EBUSY either way.)
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_mode(fh.0);
        self.ovl.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.ovl.fsync(fh.0, datasync));
    }

    /// Declined where the kernel can do without (FUSE_NO_OPENDIR_SUPPORT): it then opens
    /// directories by itself, with FOPEN_CACHE_DIR and FOPEN_KEEP_CACHE, and sends neither
    /// OPENDIR nor RELEASEDIR again (two round trips less per directory listed). Elsewhere the
    /// same flags and no handle: READDIR finds its listing by offset
    /// ([`crate::handles::Listings`]).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir.load(Relaxed) {
            reply.error(errno(Errno::NOSYS));
        } else {
            reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR.union(FopenFlags::FOPEN_KEEP_CACHE),
            );
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let filled = self.fill_dir(ino.0, offset, |ino, off, kind, name| {
            reply.add(INodeNo(ino), off, kind_of_sys(kind), name)
        });
        match filled {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // Every entry carries attributes here: fuser's reply cannot send a node id of 0 with a
        // `d_ino` (see `fuse/plus.rs`).
        let filled = self.fill_dir_plus(ino.0, offset, None, |off, name, item| {
            let (ino, attr) = match item {
                PlusItem::Dot(target) => (target, bare_attr(target, FileType::Directory)),
                PlusItem::Entry(a) => (a.ino, file_attr(a)),
                PlusItem::Bare(ino, kind) => (ino, bare_attr(ino, kind_of_sys(kind))),
            };
            reply.add(INodeNo(ino), off, name, &TTL, &attr, Generation(0))
        });
        match filled {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // Not sent once OPENDIR is declined; nothing is held per open directory.
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.ovl.fsyncdir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.ovl.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.changed(self.ovl.setxattr(ino.0, name, value, flags)),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.ovl.getxattr(ino.0, name));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        // The request carries no capabilities: uid 0 stands for CAP_SYS_ADMIN.
        reply_xattr(reply, size, self.ovl.listxattr(ino.0, req.uid() == 0));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.changed(self.ovl.removexattr(ino.0, name)));
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.ovl.access(ino.0, mask.bits(), req.uid(), req.gid()),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let created = self.create_file(parent.0, name, mode, flags, creator(req, umask), |fd| {
            reply.open_backing(&**fd).map(Backing::Session)
        });
        match created {
            Ok((attr, o)) => {
                let fa = file_attr(&attr);
                match o.backing.as_deref() {
                    Some(Backing::Session(b)) => reply.created_passthrough(
                        &TTL,
                        &fa,
                        Generation(0),
                        FileHandle(o.fh),
                        PASSTHROUGH_OPEN,
                        b,
                    ),
                    Some(Backing::Raw { .. }) => reply.error(fuser::Errno::EIO),
                    None => reply.created(&TTL, &fa, Generation(0), FileHandle(o.fh), CACHED_OPEN),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.ovl.fallocate(fh.0, offset, length, mode));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.ovl.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .ovl
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }
}
