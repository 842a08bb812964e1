//! cutfs: a power-cut simulator for crash tests, as a one-file FUSE filesystem.
//!
//! ```text
//! <mountpoint>/
//!     disk.img    the backing image file, byte for byte (its size is fixed at mount)
//! ```
//!
//! Put a loop device on `disk.img` and a filesystem on the loop device. Every open is
//! `direct_io`, so every write the loop device completes has reached [`CutFs::mount`]'s image
//! file (`pwrite`) before it is acknowledged, and a flush (`fsync`) is an `fdatasync` of it.
//! [`CutFs::cut`] (or `setfattr -n user.cut -v 1 disk.img`) cuts the power: from then on every
//! write and flush is answered as successful and discarded. The image file is then exactly what
//! a power cut leaves on a disk without a volatile write cache: every write completed before the
//! cut, none after. (Writes in flight at the cut land whole or not at all; a real disk may also
//! tear them. A disk with a volatile cache may lose more: that is not modelled.)
//!
//! Reads always come from the image file. Test support only: layerfs never links it.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL, WriteFlags,
};

/// The one file's name.
pub const DISK: &str = "disk.img";

/// The xattr that cuts the power when set on [`DISK`].
pub const CUT_XATTR: &str = "user.cut";

const DISK_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);

/// What the simulated disk saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Writes that reached the image.
    pub writes_kept: u64,
    /// Writes answered after the cut and discarded.
    pub writes_dropped: u64,
    /// Flushes before the cut.
    pub flushes: u64,
}

/// The disk: the image file and the power switch. Shared by the session's threads.
#[derive(Debug)]
struct Disk {
    /// The backing image, opened read-write.
    image: File,
    /// Its size, fixed at mount.
    size: u64,
    /// Set once by a cut; never cleared.
    cut: AtomicBool,
    writes_kept: AtomicU64,
    writes_dropped: AtomicU64,
    flushes: AtomicU64,
}

impl Disk {
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == DISK_INO {
            (FileType::RegularFile, 0o600, self.size, 1)
        } else {
            (FileType::Directory, 0o755, 0, 2)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

/// The FUSE front of a [`Disk`].
struct Fs(Arc<Disk>);

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == DISK {
            reply.entry(&TTL, &self.0.attr(DISK_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == DISK_INO {
            reply.attr(&TTL, &self.0.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == DISK_INO {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = (size as u64).min(self.0.size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        match self.0.image.read_exact_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if offset.saturating_add(data.len() as u64) > self.0.size {
            reply.error(Errno::ENOSPC);
            return;
        }
        if self.0.is_cut() {
            self.0.writes_dropped.fetch_add(1, Ordering::Relaxed);
            reply.written(data.len() as u32);
            return;
        }
        match self.0.image.write_all_at(data, offset) {
            Ok(()) => {
                self.0.writes_kept.fetch_add(1, Ordering::Relaxed);
                reply.written(data.len() as u32);
            }
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.0.is_cut() {
            reply.ok();
            return;
        }
        self.0.flushes.fetch_add(1, Ordering::Relaxed);
        match self.0.image.sync_data() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if ino == DISK_INO && name == CUT_XATTR {
            self.0.cut();
            reply.ok();
        } else {
            reply.error(Errno::ENOTSUP);
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
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted cutfs; unmounted on drop.
pub struct CutFs {
    disk: Arc<Disk>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl CutFs {
    /// Serves `image` (an existing file, whose size becomes the disk's) as `<mountpoint>/disk.img`
    /// from threads of this process.
    pub fn mount(image: &Path, mountpoint: &Path) -> std::io::Result<CutFs> {
        let file = File::options().read(true).write(true).open(image)?;
        let size = file.metadata()?.len();
        let disk = Arc::new(Disk {
            image: file,
            size,
            cut: AtomicBool::new(false),
            writes_kept: AtomicU64::new(0),
            writes_dropped: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("cutfs".into()),
            MountOption::CUSTOM("subtype=cutfs".into()),
        ];
        cfg.acl = SessionACL::All;
        cfg.n_threads = Some(4);
        let session = fuser::spawn_mount(Fs(disk.clone()), mountpoint, &cfg)?;
        Ok(CutFs {
            disk,
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
        })
    }

    /// The disk file to put a loop device on.
    pub fn disk(&self) -> PathBuf {
        self.mountpoint.join(DISK)
    }

    /// Cuts the power: every later write and flush is acknowledged and discarded.
    pub fn cut(&self) {
        self.disk.cut();
    }

    /// What the disk saw so far.
    pub fn counts(&self) -> Counts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            writes_kept: r(&self.disk.writes_kept),
            writes_dropped: r(&self.disk.writes_dropped),
            flushes: r(&self.disk.flushes),
        }
    }

    /// Unmounts and waits for the session's threads.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for CutFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}
