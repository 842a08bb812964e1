//! Copying file data: reflink (`FICLONE`) where the filesystem can, else `copy_file_range`
//! (server-side, sparse-aware on most filesystems), else plain read/write.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use rustix::fs::{self as rfs, SeekFrom};

use crate::{Errno, Stat, SysResult};

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

/// Copies all of `src` (opened for reading, stat `st`) into the empty file `dst` (opened for
/// writing), keeping holes where `SEEK_DATA`/`SEEK_HOLE` shows them. Returns how it copied.
///
/// `no_clone` is set once `FICLONE` says the two filesystems cannot share extents (ext4, or two
/// filesystems), and then not tried again. A source whose blocks cover its size has no hole to
/// look for.
pub fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    st: &Stat,
    no_clone: &AtomicBool,
) -> SysResult<CopyMethod> {
    let len = st.st_size as u64;
    if len == 0 {
        return Ok(CopyMethod::CopyRange);
    }
    if !no_clone.load(Relaxed) {
        match rfs::ioctl_ficlone(dst, src) {
            Ok(()) => return Ok(CopyMethod::Reflink),
            Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::NOTTY) => no_clone.store(true, Relaxed),
            Err(_) => {}
        }
    }
    let dense = (st.st_blocks as u64).saturating_mul(512) >= len;
    let mut method = CopyMethod::CopyRange;
    let mut pos = 0u64;
    // Where the copy's written data ends.
    let mut end = 0u64;
    while pos < len {
        // Skip holes: find the next data extent.
        let (data, hole) = if dense {
            (pos, len)
        } else {
            let data = match rfs::seek(src, SeekFrom::Data(pos)) {
                Ok(off) => off,
                Err(Errno::NXIO) => break,
                Err(_) => pos,
            };
            (
                data,
                rfs::seek(src, SeekFrom::Hole(data)).unwrap_or(len).min(len),
            )
        };
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
        let st = crate::stat_fd(src.as_fd()).unwrap();
        assert!(
            (st.st_blocks as u64) * 512 < st.st_size as u64,
            "the source has a hole"
        );
        let mut dst = tempfile::tempfile().unwrap();
        let no_clone = AtomicBool::new(false);
        copy_data(src.as_fd(), dst.as_fd(), &st, &no_clone).unwrap();
        let mut a = Vec::new();
        let mut b = Vec::new();
        src.rewind().unwrap();
        src.read_to_end(&mut a).unwrap();
        dst.read_to_end(&mut b).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a == b);
        let copy = crate::stat_fd(dst.as_fd()).unwrap();
        assert!(copy.st_blocks <= st.st_blocks + 8, "the hole was kept");
    }

    /// A source without holes is copied without looking for them; a filesystem that refused a
    /// reflink is not asked again.
    #[test]
    fn copies_a_dense_file_and_remembers_no_reflink() {
        let mut src = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        src.write_all(&data).unwrap();
        src.sync_all().unwrap();
        let st = crate::stat_fd(src.as_fd()).unwrap();
        let no_clone = AtomicBool::new(false);
        for _ in 0..2 {
            let mut dst = tempfile::tempfile().unwrap();
            let how = copy_data(src.as_fd(), dst.as_fd(), &st, &no_clone).unwrap();
            let mut b = Vec::new();
            dst.read_to_end(&mut b).unwrap();
            assert!(b == data);
            assert_eq!(no_clone.load(Relaxed), how != CopyMethod::Reflink);
        }
    }
}
