//! Copying file data: reflink (`FICLONE`) where the filesystem can, else `copy_file_range`
//! (server-side, sparse-aware on most filesystems), else plain read/write.

use std::os::fd::BorrowedFd;

use rustix::fs::{self as rfs, SeekFrom};

use crate::{Errno, SysResult};

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Shared extents: no data was written.
    Reflink,
    /// `copy_file_range`.
    CopyRange,
    /// Userspace read/write.
    ReadWrite,
}

/// Copies all of `src` (opened for reading) into the empty file `dst` (opened for writing),
/// keeping holes where `SEEK_DATA`/`SEEK_HOLE` shows them. Returns how it copied.
pub fn copy_data(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, len: u64) -> SysResult<CopyMethod> {
    if len == 0 {
        return Ok(CopyMethod::CopyRange);
    }
    if rfs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(CopyMethod::Reflink);
    }
    let mut method = CopyMethod::CopyRange;
    let mut pos = 0u64;
    // Where the copy's written data ends.
    let mut end = 0u64;
    while pos < len {
        // Skip holes: find the next data extent.
        let data = match rfs::seek(src, SeekFrom::Data(pos)) {
            Ok(off) => off,
            Err(Errno::NXIO) => break,
            Err(_) => pos,
        };
        let hole = rfs::seek(src, SeekFrom::Hole(data)).unwrap_or(len).min(len);
        let mut off = data;
        while off < hole {
            let chunk = (hole - off).min(1 << 30) as usize;
            let copied = if method == CopyMethod::CopyRange {
                let (mut i, mut o) = (off, off);
                match rfs::copy_file_range(src, Some(&mut i), dst, Some(&mut o), chunk) {
                    Ok(n) => n,
                    Err(Errno::XDEV | Errno::NOSYS | Errno::INVAL | Errno::OPNOTSUPP) => {
                        method = CopyMethod::ReadWrite;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                read_write(src, dst, off, chunk)?
            };
            if copied == 0 {
                break;
            }
            off += copied as u64;
        }
        end = end.max(off);
        pos = hole.max(off);
    }
    // A trailing hole (or a source that shrank): give the copy its full size. A copy that
    // reached it needs no call.
    if end < len {
        rfs::ftruncate(dst, len)?;
    }
    Ok(method)
}

fn read_write(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, off: u64, len: usize) -> SysResult<usize> {
    let mut buf = vec![0u8; len.min(1 << 20)];
    let n = rustix::io::pread(src, &mut buf[..], off)?;
    let mut done = 0;
    while done < n {
        done += rustix::io::pwrite(dst, &buf[done..n], off + done as u64)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn copies_data_and_holes() {
        let mut src = tempfile::tempfile().unwrap();
        src.write_all(b"hello").unwrap();
        src.seek(std::io::SeekFrom::Start(3 << 20)).unwrap();
        src.write_all(b"world").unwrap();
        let len = src.metadata().unwrap().len();
        let mut dst = tempfile::tempfile().unwrap();
        copy_data(src.as_fd(), dst.as_fd(), len).unwrap();
        let mut a = Vec::new();
        let mut b = Vec::new();
        src.rewind().unwrap();
        src.read_to_end(&mut a).unwrap();
        dst.read_to_end(&mut b).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a == b);
    }
}
