//! Extended attributes of the object behind an `O_PATH` fd, through its `/proc/self/fd/N` magic
//! link (the kernel refuses `fgetxattr` on `O_PATH` fds; the magic link names the inode itself,
//! a symlink included, and is never re-resolved by name).

use std::ffi::{CString, OsStr};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, XattrFlags};

use crate::{Errno, SysResult, proc_path};

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
