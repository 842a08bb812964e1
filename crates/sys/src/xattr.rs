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
    loop {
        let size = rfs::getxattr_query(path.as_c_str(), name.as_c_str())?;
        let mut buf = vec![0u8; size];
        match rfs::getxattr(path.as_c_str(), name.as_c_str(), &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // It grew between the two calls: ask again.
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
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
        Errno::NOSYS => get(dir, name),
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
    let raw = loop {
        let size = rfs::listxattr_query(path.as_c_str())?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match rfs::listxattr(path.as_c_str(), &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                break buf;
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    };
    Ok(raw
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
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
}
