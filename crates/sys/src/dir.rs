//! Reading a directory given by an fd (an `O_PATH` fd is fine).

use std::ffi::OsString;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStringExt;

use rustix::fs::{self as rfs, FileType, Mode, OFlags, RawDir};

use crate::SysResult;

/// One directory entry as `getdents` returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name (never `.` or `..`).
    pub name: OsString,
    /// `d_type`; `Unknown` on filesystems that do not fill it.
    pub kind: FileType,
    /// `d_ino` of the backing filesystem.
    pub ino: u64,
}

/// All entries of the directory `dir`, without `.` and `..`, in `getdents` order.
pub fn read_all(dir: BorrowedFd<'_>) -> SysResult<Vec<Entry>> {
    let fd = rfs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // One buffer of 32 KiB per thread: a directory of a few hundred entries is one `getdents`
    // (and the one that says it ended), where a growing buffer took five.
    READ_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let mut entries = Vec::new();
        let mut dir = RawDir::new(&fd, &mut buf[..]);
        while let Some(entry) = dir.next() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            entries.push(Entry {
                name: OsString::from_vec(name.to_vec()),
                kind: entry.file_type(),
                ino: entry.ino(),
            });
        }
        Ok(entries)
    })
}

std::thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<std::mem::MaybeUninit<u8>>> =
        std::cell::RefCell::new(vec![std::mem::MaybeUninit::uninit(); 32 << 10]);
}
