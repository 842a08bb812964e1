//! Fd-relative file operations. Every function takes a directory fd plus a [`Component`], or an fd
//! of the object itself; none follows a symlink in the last component.
//!
//! Objects are held as `O_PATH` fds ([`open_path`]). Operations that the kernel refuses on an
//! `O_PATH` fd (chmod, utimes, xattrs, reopen for I/O) go through its `/proc/self/fd/N` magic
//! link, which names exactly that inode and is never re-resolved by name.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, CWD};
pub use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat, StatFs, Timespec, Timestamps,
};

use crate::{Component, Errno, SysResult};

/// `/proc/self/fd/N` for `fd`: the magic link that reaches exactly that open inode.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal number never holds a NUL byte.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Opens a directory given by a trusted path (a layer root, an upper dir) as an `O_PATH` fd.
pub fn open_root(path: &Path) -> SysResult<OwnedFd> {
    rfs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// `pread` that takes data only from the page cache (`RWF_NOWAIT`): `Errno::AGAIN` if it would
/// wait for the disk, also where the filesystem does not support asking (`EOPNOTSUPP`).
pub fn pread_nowait(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    use rustix::io::ReadWriteFlags;
    let mut iov = [std::io::IoSliceMut::new(buf)];
    match rustix::io::preadv2(fd, &mut iov, offset, ReadWriteFlags::NOWAIT) {
        Err(Errno::OPNOTSUPP) => Err(Errno::AGAIN),
        r => r,
    }
}

/// Opens the directory `dir` (any fd of it, `O_PATH` too) for reading its entries.
pub fn reopen_dir(dir: BorrowedFd<'_>) -> SysResult<OwnedFd> {
    rfs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Takes an exclusive `flock` of the directory `dir` (any fd of it, `O_PATH` too) and returns the
/// fd that holds it: the lock lasts until that fd is closed or the process ends, however it
/// ends. A holder that is letting go (a daemon exiting after its unmount) is waited for, up to
/// `patience`; one that does not gives `Errno::BUSY`.
pub fn lock_dir(dir: BorrowedFd<'_>, patience: std::time::Duration) -> SysResult<OwnedFd> {
    use rustix::fs::FlockOperation;
    let fd = reopen_dir(dir)?;
    match rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => return Ok(fd),
        Err(Errno::WOULDBLOCK) => {}
        Err(e) => return Err(e),
    }
    // A blocking flock on a duplicate (the lock belongs to the open file both share), in a thread
    // that is left behind if the holder stays: it then closes its duplicate once it gets the
    // lock, which releases it, as `fd` is gone by then.
    let dup = fd
        .try_clone()
        .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("dir-lock".into())
        .spawn(move || {
            let _ = tx.send(rfs::flock(&dup, FlockOperation::LockExclusive));
        })
        .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::AGAIN))?;
    match rx.recv_timeout(patience) {
        Ok(Ok(())) => Ok(fd),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Errno::BUSY),
    }
}

/// Opens the root of a private, detached clone of the mount that holds the directory `path`
/// (`open_tree(OPEN_TREE_CLONE)`), rooted at `path`: the way kernel overlayfs holds its layers
/// (`clone_private_mount`). Fds below the clone keep the filesystem alive but do not make the
/// original mount busy, so the layers' filesystems can be unmounted as soon as the overlay is,
/// not only once this process has exited. Mounts below `path` are not part of the clone (as for
/// kernel overlayfs). Needs `CAP_SYS_ADMIN` in the mount's user namespace.
pub fn open_private_root(path: &Path) -> SysResult<OwnedFd> {
    use rustix::mount::{OpenTreeFlags, open_tree};
    open_tree(
        CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
}

/// Opens the directory `rel` below `root` as an `O_PATH` fd, one component at a time, never
/// following a symlink. `rel` holds only plain components (no `.`, `..` or root).
pub fn open_path_below(root: BorrowedFd<'_>, rel: &Path) -> SysResult<OwnedFd> {
    let mut cur = rfs::openat(
        root,
        c".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for part in rel.components() {
        let std::path::Component::Normal(name) = part else {
            return Err(Errno::INVAL);
        };
        cur = open_path_dir(cur.as_fd(), &Component::new(name)?)?;
    }
    Ok(cur)
}

/// Opens `name` in `dir` as an `O_PATH` fd without following a final symlink.
pub fn open_path(dir: BorrowedFd<'_>, name: &Component) -> SysResult<OwnedFd> {
    rfs::openat(
        dir,
        name.as_c_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Makes an unnamed regular file in directory `dir` (`O_TMPFILE`), opened with `flags` (access
/// mode and the like) and permission bits `mode`; `linkat` with `AT_EMPTY_PATH` names it.
pub fn open_tmpfile(dir: BorrowedFd<'_>, flags: OFlags, mode: Mode) -> SysResult<OwnedFd> {
    rfs::openat(dir, c".", OFlags::TMPFILE | OFlags::CLOEXEC | flags, mode)
}

/// Opens `name` in `dir` as an `O_PATH` fd, which must be a directory.
pub fn open_path_dir(dir: BorrowedFd<'_>, name: &Component) -> SysResult<OwnedFd> {
    rfs::openat(
        dir,
        name.as_c_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens `name` in `dir` with `flags` (plus `O_NOFOLLOW|O_CLOEXEC`), creating it with `mode` if
/// `flags` has `O_CREAT`.
pub fn open_at(
    dir: BorrowedFd<'_>,
    name: &Component,
    flags: OFlags,
    mode: Mode,
) -> SysResult<OwnedFd> {
    rfs::openat(
        dir,
        name.as_c_str(),
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        mode,
    )
}

/// Opens a path below `root` without ever leaving it: `openat2(RESOLVE_IN_ROOT |
/// RESOLVE_NO_MAGICLINKS)`, so `..` and absolute symlinks stay inside `root`.
pub fn open_in_root(root: BorrowedFd<'_>, path: &Path, flags: OFlags) -> SysResult<OwnedFd> {
    rfs::openat2(
        root,
        path,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Opens `path` (relative, `/`-separated bytes) below `root` one component at a time: every
/// intermediate as a directory with `O_NOFOLLOW`, the last with `flags | O_NOFOLLOW`. Works at any
/// depth (no PATH_MAX limit); a symlink on the way gives `ELOOP`/`ENOTDIR`, `..` gives `EINVAL`.
pub fn open_beneath(root: BorrowedFd<'_>, path: &[u8], flags: OFlags) -> SysResult<OwnedFd> {
    let parts: Vec<&[u8]> = path
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    let Some((last, dirs)) = parts.split_last() else {
        return rfs::openat(root, c".", flags | OFlags::CLOEXEC, Mode::empty());
    };
    let mut cur: Option<OwnedFd> = None;
    for d in dirs {
        let c = Component::new(std::ffi::OsStr::from_bytes(d))?;
        let at = cur.as_ref().map_or(root, |f| f.as_fd());
        cur = Some(open_path_dir(at, &c)?);
    }
    let c = Component::new(std::ffi::OsStr::from_bytes(last))?;
    let at = cur.as_ref().map_or(root, |f| f.as_fd());
    rfs::openat(
        at,
        c.as_c_str(),
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the object behind an `O_PATH` fd again, for I/O, with `flags`. Used for regular files and
/// directories only (the magic link would refuse a symlink).
pub fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> SysResult<OwnedFd> {
    let flags = flags & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW);
    rfs::open(
        proc_path(fd).as_c_str(),
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &Component) -> SysResult<Stat> {
    rfs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
}

/// `fstat` of any fd, `O_PATH` included.
pub fn stat_fd(fd: BorrowedFd<'_>) -> SysResult<Stat> {
    rfs::fstat(fd)
}

/// `statfs` of the filesystem holding `fd`.
pub fn statfs_fd(fd: BorrowedFd<'_>) -> SysResult<StatFs> {
    rfs::fstatfs(fd)
}

/// `mkdirat`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &Component, mode: Mode) -> SysResult<()> {
    rfs::mkdirat(dir, name.as_c_str(), mode)
}

/// `mknodat` (FIFOs, sockets, devices, whiteouts).
pub fn mknod_at(
    dir: BorrowedFd<'_>,
    name: &Component,
    kind: FileType,
    mode: Mode,
    rdev: u64,
) -> SysResult<()> {
    rfs::mknodat(dir, name.as_c_str(), kind, mode, rdev)
}

/// `symlinkat(target, dir, name)`.
pub fn symlink_at(target: &[u8], dir: BorrowedFd<'_>, name: &Component) -> SysResult<()> {
    let target = CString::new(target).map_err(|_| Errno::INVAL)?;
    rfs::symlinkat(target.as_c_str(), dir, name.as_c_str())
}

/// `readlinkat(fd, "")` of an `O_PATH` fd of a symlink.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> SysResult<Vec<u8>> {
    rfs::readlinkat(fd, c"", Vec::new()).map(CString::into_bytes)
}

/// `unlinkat`, of a directory when `dir_flag` is set.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &Component, remove_dir: bool) -> SysResult<()> {
    let flags = if remove_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    rfs::unlinkat(dir, name.as_c_str(), flags)
}

/// `renameat2`.
pub fn rename_at(
    old_dir: BorrowedFd<'_>,
    old: &Component,
    new_dir: BorrowedFd<'_>,
    new: &Component,
    flags: RenameFlags,
) -> SysResult<()> {
    rfs::renameat_with(old_dir, old.as_c_str(), new_dir, new.as_c_str(), flags)
}

/// Makes a new hard link `dir/name` to the object behind `fd` (any fd, `O_PATH` included).
pub fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &Component) -> SysResult<()> {
    // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the magic link with AT_SYMLINK_FOLLOW does not.
    match rfs::linkat(fd, c"", dir, name.as_c_str(), AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT | Errno::PERM) => rfs::linkat(
            CWD,
            proc_path(fd).as_c_str(),
            dir,
            name.as_c_str(),
            AtFlags::SYMLINK_FOLLOW,
        ),
        other => other,
    }
}

/// The ids of a chown (`None`: unchanged).
fn ids(
    uid: Option<u32>,
    gid: Option<u32>,
) -> (Option<rustix::process::Uid>, Option<rustix::process::Gid>) {
    (
        uid.map(rustix::process::Uid::from_raw),
        gid.map(rustix::process::Gid::from_raw),
    )
}

/// Changes owner of the object behind `fd` (symlinks included, never their target).
pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
    let (uid, gid) = ids(uid, gid);
    rfs::chownat(
        fd,
        c"",
        uid,
        gid,
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
}

/// `fchown` of an fd opened for I/O (not `O_PATH`).
pub fn chown_open(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
    let (uid, gid) = ids(uid, gid);
    rfs::fchown(fd, uid, gid)
}

/// Changes owner of `dir/name` (a symlink itself, never its target).
pub fn chown_at(
    dir: BorrowedFd<'_>,
    name: &Component,
    uid: Option<u32>,
    gid: Option<u32>,
) -> SysResult<()> {
    let (uid, gid) = ids(uid, gid);
    rfs::chownat(dir, name.as_c_str(), uid, gid, AtFlags::SYMLINK_NOFOLLOW)
}

/// Changes the permission bits of `dir/name` (not for symlinks: `fchmodat` follows them).
pub fn chmod_at(dir: BorrowedFd<'_>, name: &Component, mode: Mode) -> SysResult<()> {
    rfs::chmodat(dir, name.as_c_str(), mode, AtFlags::empty())
}

/// Changes the permission bits of the object behind `fd` (not for symlinks).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: Mode) -> SysResult<()> {
    rfs::chmodat(CWD, proc_path(fd).as_c_str(), mode, AtFlags::empty())
}

/// Sets atime/mtime of the object behind `fd`; `UTIME_OMIT`/`UTIME_NOW` as in `utimensat`.
/// The magic link is resolved to the object itself, a symlink included.
pub fn utimes_fd(fd: BorrowedFd<'_>, times: &Timestamps) -> SysResult<()> {
    rfs::utimensat(CWD, proc_path(fd).as_c_str(), times, AtFlags::empty())
}

/// `fchmod` of an fd opened for I/O (not `O_PATH`): no walk of the `/proc` magic link.
pub fn chmod_open(fd: BorrowedFd<'_>, mode: Mode) -> SysResult<()> {
    rfs::fchmod(fd, mode)
}

/// `futimens` of an fd opened for I/O (not `O_PATH`).
pub fn utimes_open(fd: BorrowedFd<'_>, times: &Timestamps) -> SysResult<()> {
    rfs::futimens(fd, times)
}

/// Sets the times of the directory `dir` itself (`O_PATH` fds included), by `"."`: no walk of the
/// `/proc` magic link.
pub fn utimes_dir(dir: BorrowedFd<'_>, times: &Timestamps) -> SysResult<()> {
    rfs::utimensat(dir, c".", times, AtFlags::empty())
}

/// Sets times of `dir/name` without following a symlink.
pub fn utimes_at(dir: BorrowedFd<'_>, name: &Component, times: &Timestamps) -> SysResult<()> {
    rfs::utimensat(dir, name.as_c_str(), times, AtFlags::SYMLINK_NOFOLLOW)
}

/// Truncates the regular file `dir/name` to `size` (opened by name, never through a symlink).
pub fn truncate_at(dir: BorrowedFd<'_>, name: &Component, size: u64) -> SysResult<()> {
    let file = open_at(dir, name, OFlags::WRONLY, Mode::empty())?;
    rfs::ftruncate(&file, size)
}

/// Truncates the regular file behind `fd` to `size`.
pub fn truncate_fd(fd: BorrowedFd<'_>, size: u64) -> SysResult<()> {
    let file = reopen(fd, OFlags::WRONLY)?;
    rfs::ftruncate(&file, size)
}

/// `fsync` (or `fdatasync`) of an fd opened for I/O.
pub fn sync_fd(fd: impl AsFd, data_only: bool) -> SysResult<()> {
    if data_only {
        rfs::fdatasync(fd)
    } else {
        rfs::fsync(fd)
    }
}

/// Writes back the dirty pages of the whole file behind `fd` (opened for I/O) and waits until that
/// writeback has completed: `sync_file_range(fd, 0, 0, WAIT_BEFORE | WRITE | WAIT_AFTER)`. Unlike
/// [`sync_fd`] it commits no journal and flushes no device cache, so it makes nothing durable by
/// itself: a caller relies on what its filesystem orders after it (docs/durability.md).
pub fn write_back_and_wait(fd: impl AsFd) -> SysResult<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range only reads its integer arguments; the fd is borrowed and stays open
    // for the duration of the call.
    let rc = unsafe { libc::sync_file_range(fd.as_fd().as_raw_fd(), 0, 0, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
    }
}

/// `syncfs` of the filesystem that holds `fd`.
pub fn syncfs(fd: impl AsFd) -> SysResult<()> {
    rfs::syncfs(fd)
}

/// A `Timespec` from a `Stat`'s atime.
pub fn atime_of(st: &Stat) -> Timespec {
    Timespec {
        tv_sec: st.st_atime,
        tv_nsec: st.st_atime_nsec as _,
    }
}

/// A `Timespec` from a `Stat`'s mtime.
pub fn mtime_of(st: &Stat) -> Timespec {
    Timespec {
        tv_sec: st.st_mtime,
        tv_nsec: st.st_mtime_nsec as _,
    }
}

/// The file type bits of a `Stat`.
pub fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}
