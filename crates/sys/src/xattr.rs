//! Extended attributes of the object behind an `O_PATH` fd, through its `/proc/self/fd/N` magic
//! link (the kernel refuses `fgetxattr` on `O_PATH` fds; the magic link names the inode itself,
//! a symlink included, and is never re-resolved by name).

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, XattrFlags};

use crate::{Component, Errno, SysResult, proc_path};

fn cname(name: &OsStr) -> SysResult<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::INVAL)
}

/// Reads xattr `name`; `ENODATA` when absent.
pub fn get(fd: BorrowedFd<'_>, name: &OsStr) -> SysResult<Vec<u8>> {
    let path = proc_path(fd);
    let name = cname(name)?;
    sized(|buf| match buf {
        Some(buf) => rfs::getxattr(path.as_c_str(), name.as_c_str(), buf),
        None => rfs::getxattr_query(path.as_c_str(), name.as_c_str()),
    })
}

/// Set once the kernel answered ENOSYS to getxattrat (Linux < 6.13).
static NO_GETXATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reads xattr `name` of `dir/path` without following a final symlink: one `getxattrat`
/// (Linux ≥ 6.13), where [`get`] needs the object opened and two walks of its `/proc` magic link.
/// Falls back to those where the kernel lacks the call.
pub fn get_at(dir: BorrowedFd<'_>, path: &Component, name: &OsStr) -> SysResult<Vec<u8>> {
    get_at_path(dir, path.as_c_str(), name).or_else(|e| match e {
        Errno::NOSYS => get(crate::open_path(dir, path)?.as_fd(), name),
        e => Err(e),
    })
}

/// Like [`get_at`], for the directory `dir` itself (`O_PATH` fds refuse the fd-only form).
pub fn get_dir(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<Vec<u8>> {
    get_at_path(dir, c".", name).or_else(|e| match e {
        Errno::NOSYS | Errno::NOTDIR => get(dir, name),
        e => Err(e),
    })
}

fn get_at_path(dir: BorrowedFd<'_>, path: &CStr, name: &OsStr) -> SysResult<Vec<u8>> {
    use std::sync::atomic::Ordering::Relaxed;
    if NO_GETXATTRAT.load(Relaxed) {
        return Err(Errno::NOSYS);
    }
    let name = cname(name)?;
    // Most values (ACLs, capabilities, security labels) fit at once; ask for the size otherwise.
    let mut buf = vec![0u8; 256];
    loop {
        match getxattrat(dir, path, name.as_c_str(), &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => {
                let need = getxattrat(dir, path, name.as_c_str(), &mut [])?;
                buf = vec![0u8; need.max(buf.len() * 2)];
            }
            Err(Errno::NOSYS) => {
                NO_GETXATTRAT.store(true, Relaxed);
                return Err(Errno::NOSYS);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The number of `getxattrat` (the same on every architecture: numbers from 424 on are shared);
/// the libc crate does not name it yet.
const SYS_GETXATTRAT: libc::c_long = 464;

/// `getxattrat(dir, path, AT_SYMLINK_NOFOLLOW, name, {buf}, sizeof args)`: the value's length.
fn getxattrat(dir: BorrowedFd<'_>, path: &CStr, name: &CStr, buf: &mut [u8]) -> SysResult<usize> {
    #[repr(C)]
    struct XattrArgs {
        value: u64,
        size: u32,
        flags: u32,
    }
    let args = XattrArgs {
        value: buf.as_mut_ptr() as u64,
        size: u32::try_from(buf.len()).unwrap_or(u32::MAX),
        flags: 0,
    };
    // SAFETY: the path and name are NUL-terminated C strings, `args` points to `buf`, valid and
    // writable for `size` bytes, and all outlive the call; the kernel writes at most `size` bytes.
    let rc = unsafe {
        libc::syscall(
            SYS_GETXATTRAT,
            dir.as_raw_fd(),
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            name.as_ptr(),
            &args as *const XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    };
    syscall_len(rc)
}

/// A length-returning raw syscall's result: the length, or the errno it set.
fn syscall_len(rc: libc::c_long) -> SysResult<usize> {
    if rc < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    Ok(rc as usize)
}

/// Whether xattr `name` exists with value `value` (errors count as "no").
pub fn has_value(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8]) -> bool {
    get(fd, name).is_ok_and(|v| v == value)
}

/// Sets xattr `name` (`flags` as in `setxattr`: 0, `XATTR_CREATE`, `XATTR_REPLACE`).
pub fn set(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
    let path = proc_path(fd);
    let name = cname(name)?;
    let flags = XattrFlags::from_bits_retain(flags as _);
    rfs::setxattr(path.as_c_str(), name.as_c_str(), value, flags)
}

/// Removes xattr `name`.
pub fn remove(fd: BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
    let path = proc_path(fd);
    let name = cname(name)?;
    rfs::removexattr(path.as_c_str(), name.as_c_str())
}

/// Lists xattr names (each without its NUL).
pub fn list(fd: BorrowedFd<'_>) -> SysResult<Vec<Vec<u8>>> {
    let path = proc_path(fd);
    list_with(|buf| match buf {
        Some(buf) => rfs::listxattr(path.as_c_str(), buf),
        None => rfs::listxattr_query(path.as_c_str()),
    })
}

/// Set once the kernel answered ENOSYS to listxattrat (Linux < 6.13).
static NO_LISTXATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Like [`list`], for the directory `dir` itself: one `listxattrat(dir, ".")` (Linux ≥ 6.13), no
/// walk of the `/proc` magic link. Falls back to [`list`] where the kernel lacks the call (or
/// `dir` is no directory).
pub fn list_dir(dir: BorrowedFd<'_>) -> SysResult<Vec<Vec<u8>>> {
    use std::sync::atomic::Ordering::Relaxed;
    if !NO_LISTXATTRAT.load(Relaxed) {
        match list_with(|buf| listxattrat(dir, c".", buf.unwrap_or(&mut []))) {
            Err(Errno::NOSYS) => NO_LISTXATTRAT.store(true, Relaxed),
            // Not a directory after all: the magic link names it.
            Err(Errno::NOTDIR) => {}
            other => return other,
        }
    }
    list(dir)
}

/// Lists the xattr names of an fd opened for I/O (not `O_PATH`): `flistxattr`.
pub fn list_open(fd: BorrowedFd<'_>) -> SysResult<Vec<Vec<u8>>> {
    list_with(|buf| match buf {
        Some(buf) => rfs::flistxattr(fd, buf),
        None => rfs::flistxattr_query(fd),
    })
}

/// Reads xattr `name` of an fd opened for I/O (not `O_PATH`): `fgetxattr`.
pub fn get_open(fd: BorrowedFd<'_>, name: &OsStr) -> SysResult<Vec<u8>> {
    let name = cname(name)?;
    sized(|buf| match buf {
        Some(buf) => rfs::fgetxattr(fd, name.as_c_str(), buf),
        None => rfs::fgetxattr_query(fd, name.as_c_str()),
    })
}

/// Sets xattr `name` of an fd opened for I/O (not `O_PATH`): `fsetxattr`.
pub fn set_open(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
    let name = cname(name)?;
    let flags = XattrFlags::from_bits_retain(flags as _);
    rfs::fsetxattr(fd, name.as_c_str(), value, flags)
}

/// The names from a list call: `call(None)` asks for the size, `call(Some(buf))` fills `buf`.
fn list_with(call: impl FnMut(Option<&mut [u8]>) -> SysResult<usize>) -> SysResult<Vec<Vec<u8>>> {
    Ok(sized(call)?
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// The bytes of a get or list call: `call(None)` asks for the size, `call(Some(buf))` fills
/// `buf`; asked again if the value grew between the two.
fn sized(mut call: impl FnMut(Option<&mut [u8]>) -> SysResult<usize>) -> SysResult<Vec<u8>> {
    loop {
        let size = call(None)?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match call(Some(&mut buf[..])) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The number of `listxattrat` (shared by every architecture, as [`SYS_GETXATTRAT`]).
const SYS_LISTXATTRAT: libc::c_long = 465;

/// `listxattrat(dir, path, AT_SYMLINK_NOFOLLOW, buf, len)`: the length of the name list (with an
/// empty `buf`, the length it needs).
fn listxattrat(dir: BorrowedFd<'_>, path: &CStr, buf: &mut [u8]) -> SysResult<usize> {
    // SAFETY: the path is a NUL-terminated C string and `buf` is valid and writable for its length;
    // both outlive the call, and the kernel writes at most `buf.len()` bytes.
    let rc = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir.as_raw_fd(),
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    syscall_len(rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `get_at` and `get_dir` read what `set` wrote, small and large values alike, answer ENODATA
    /// for a missing name, and read a symlink's own xattrs (or its refusal), never its target's.
    #[test]
    fn get_at_reads_by_name_without_following_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), b"x").expect("write");
        std::os::unix::fs::symlink("f", dir.path().join("l")).expect("symlink");
        let d = crate::open_root(dir.path()).expect("open dir");
        let f = Component::new("f").expect("name");
        let l = Component::new("l").expect("name");
        let ffd = crate::open_path(d.as_fd(), &f).expect("open f");
        let big = vec![7u8; 3000];
        for (name, value) in [("user.small", &b"v"[..]), ("user.big", &big[..])] {
            set(ffd.as_fd(), OsStr::new(name), value, 0).expect("set");
            set(d.as_fd(), OsStr::new(name), value, 0).expect("set on dir");
            assert_eq!(
                get_at(d.as_fd(), &f, OsStr::new(name)).expect("get_at"),
                value
            );
            assert_eq!(
                get_dir(d.as_fd(), OsStr::new(name)).expect("get_dir"),
                value
            );
        }
        assert_eq!(
            get_at(d.as_fd(), &f, OsStr::new("user.none")),
            Err(Errno::NODATA)
        );
        // user.* xattrs are not allowed on symlinks: the link itself answers, not its target.
        assert!(get_at(d.as_fd(), &l, OsStr::new("user.small")).is_err());
    }

    /// `list_dir` (an `O_PATH` directory fd) and `list_open` (an fd open for I/O) list what the
    /// magic-link `list` lists; `set_open` and `get_open` write and read through an open fd; a
    /// non-directory handed to `list_dir` is listed too.
    #[test]
    fn the_fd_forms_agree_with_the_magic_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), b"x").expect("write");
        let d = crate::open_root(dir.path()).expect("open dir");
        let f = Component::new("f").expect("name");
        let opened = crate::open_at(
            d.as_fd(),
            &f,
            rustix::fs::OFlags::RDWR,
            crate::Mode::empty(),
        )
        .expect("open f");
        let fpath = crate::open_path(d.as_fd(), &f).expect("open f");
        for name in ["user.a", "user.b"] {
            set(d.as_fd(), OsStr::new(name), b"d", 0).expect("set on dir");
            set_open(opened.as_fd(), OsStr::new(name), b"f", 0).expect("set_open");
        }
        let sorted = |mut v: Vec<Vec<u8>>| {
            v.sort();
            v
        };
        let want = vec![b"user.a".to_vec(), b"user.b".to_vec()];
        assert_eq!(sorted(list_dir(d.as_fd()).expect("list_dir")), want);
        assert_eq!(sorted(list(d.as_fd()).expect("list")), want);
        assert_eq!(sorted(list_open(opened.as_fd()).expect("list_open")), want);
        assert_eq!(
            sorted(list_dir(fpath.as_fd()).expect("list_dir of a file")),
            want
        );
        assert_eq!(get(fpath.as_fd(), OsStr::new("user.a")).expect("get"), b"f");
        assert_eq!(
            get_open(opened.as_fd(), OsStr::new("user.b")).expect("get_open"),
            b"f"
        );
    }
}
