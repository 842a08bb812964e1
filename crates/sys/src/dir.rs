//! Reading a directory given by an fd (an `O_PATH` fd is fine).

use std::ffi::OsString;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStringExt;

use rustix::fs::{FileType, RawDir};

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
    let mut entries = Vec::new();
    for_each(dir, |name, kind, ino| {
        entries.push(Entry {
            name: OsString::from_vec(name.to_vec()),
            kind,
            ino,
        });
        Ok(())
    })?;
    Ok(entries)
}

/// Calls `f(name, d_type, d_ino)` for each entry of the directory `dir` but `.` and `..`, in
/// `getdents` order, straight from the `getdents` buffer (nothing is collected); stops at the
/// first error `f` returns.
pub fn for_each(
    dir: BorrowedFd<'_>,
    mut f: impl FnMut(&[u8], FileType, u64) -> SysResult<()>,
) -> SysResult<()> {
    let fd = crate::fd::reopen_dir(dir)?;
    // One buffer of 32 KiB per thread: a directory of a few hundred entries is one `getdents`
    // (and the one that says it ended), where a growing buffer took five. `f` must not read a
    // directory itself (the buffer is borrowed): a nested call gets a buffer of its own.
    READ_BUF.with(|buf| {
        let mut own;
        let mut borrowed;
        let buf: &mut [std::mem::MaybeUninit<u8>] = match buf.try_borrow_mut() {
            Ok(b) => {
                borrowed = b;
                &mut borrowed[..]
            }
            Err(_) => {
                own = vec![std::mem::MaybeUninit::uninit(); BUF_LEN];
                &mut own[..]
            }
        };
        let mut dir = RawDir::new(&fd, buf);
        while let Some(entry) = dir.next() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            f(name, entry.file_type(), entry.ino())?;
        }
        Ok(())
    })
}

/// The size of a `getdents` buffer.
const BUF_LEN: usize = 32 << 10;

std::thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<std::mem::MaybeUninit<u8>>> =
        std::cell::RefCell::new(vec![std::mem::MaybeUninit::uninit(); BUF_LEN]);
}
