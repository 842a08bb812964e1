//! The FUSE wire format for requests taken from io_uring queues ([`super::uring`]):
//! `include/uapi/linux/fuse.h`, protocol 7.45. Requests are read from byte slices field by field
//! (native endian) and answers written the same way, so a short or odd request reads as zeroes
//! and an answer that does not fit is refused, never a panic. The `/dev/fuse` session gets the
//! same from fuser.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use layerfs_sys::{self as sys, Errno};

use super::TTL;
use crate::attrs::SetTime;
use crate::overlay::Attr;

// Opcodes (include/uapi/linux/fuse.h).
pub(super) const LOOKUP: u32 = 1;
pub(super) const FORGET: u32 = 2;
pub(super) const GETATTR: u32 = 3;
pub(super) const SETATTR: u32 = 4;
pub(super) const READLINK: u32 = 5;
pub(super) const SYMLINK: u32 = 6;
pub(super) const MKNOD: u32 = 8;
pub(super) const MKDIR: u32 = 9;
pub(super) const UNLINK: u32 = 10;
pub(super) const RMDIR: u32 = 11;
pub(super) const RENAME: u32 = 12;
pub(super) const LINK: u32 = 13;
pub(super) const OPEN: u32 = 14;
pub(super) const READ: u32 = 15;
pub(super) const WRITE: u32 = 16;
pub(super) const STATFS: u32 = 17;
pub(super) const RELEASE: u32 = 18;
pub(super) const FSYNC: u32 = 20;
pub(super) const SETXATTR: u32 = 21;
pub(super) const GETXATTR: u32 = 22;
pub(super) const LISTXATTR: u32 = 23;
pub(super) const REMOVEXATTR: u32 = 24;
pub(super) const FLUSH: u32 = 25;
pub(super) const OPENDIR: u32 = 27;
pub(super) const READDIR: u32 = 28;
pub(super) const RELEASEDIR: u32 = 29;
pub(super) const FSYNCDIR: u32 = 30;
pub(super) const ACCESS: u32 = 34;
pub(super) const CREATE: u32 = 35;
pub(super) const DESTROY: u32 = 38;
pub(super) const BATCH_FORGET: u32 = 42;
pub(super) const FALLOCATE: u32 = 43;
pub(super) const READDIRPLUS: u32 = 44;
pub(super) const RENAME2: u32 = 45;
pub(super) const LSEEK: u32 = 46;
pub(super) const COPY_FILE_RANGE: u32 = 47;
pub(super) const TMPFILE: u32 = 51;

// SETATTR `valid` bits.
pub(super) const FATTR_MODE: u32 = 1 << 0;
pub(super) const FATTR_UID: u32 = 1 << 1;
pub(super) const FATTR_GID: u32 = 1 << 2;
pub(super) const FATTR_SIZE: u32 = 1 << 3;
pub(super) const FATTR_ATIME: u32 = 1 << 4;
pub(super) const FATTR_MTIME: u32 = 1 << 5;
pub(super) const FATTR_FH: u32 = 1 << 6;
pub(super) const FATTR_ATIME_NOW: u32 = 1 << 7;
pub(super) const FATTR_MTIME_NOW: u32 = 1 << 8;

pub(super) const FUSE_GETATTR_FH: u32 = 1;
pub(super) const FUSE_FSYNC_FDATASYNC: u32 = 1;
pub(super) const FOPEN_CACHE_DIR: u32 = 1 << 3;
pub(super) const FOPEN_KEEP_CACHE: u32 = 1 << 1;

/// Sizes of the answer structs.
pub(super) const ATTR_LEN: usize = 88;
pub(super) const ENTRY_LEN: usize = 40 + ATTR_LEN;
pub(super) const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
pub(super) const OPEN_OUT_LEN: usize = 16;
pub(super) const DIRENT_HEAD: usize = 24;

/// The fields of `fuse_in_header` the daemon uses.
pub(super) struct InHeader {
    /// What the request is (the constants above).
    pub(super) opcode: u32,
    /// The request's id, echoed in the answer.
    pub(super) unique: u64,
    /// The node the request is about (the parent directory for name operations).
    pub(super) nodeid: u64,
    /// The caller's fsuid.
    pub(super) uid: u32,
    /// The caller's fsgid.
    pub(super) gid: u32,
    /// The caller's thread id.
    pub(super) pid: u32,
}

impl InHeader {
    pub(super) fn parse(b: &[u8]) -> InHeader {
        InHeader {
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
            uid: u32_at(b, 24),
            gid: u32_at(b, 28),
            pid: u32_at(b, 32),
        }
    }
}

pub(super) fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        v.copy_from_slice(s);
    }
    u32::from_ne_bytes(v)
}

pub(super) fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        v.copy_from_slice(s);
    }
    u64::from_ne_bytes(v)
}

/// The NUL-terminated strings at the start of a payload (names, a symlink target).
pub(super) fn strings<const N: usize>(b: &[u8]) -> Result<[&OsStr; N], Errno> {
    let mut out = [OsStr::new(""); N];
    let mut rest = b;
    for slot in &mut out {
        let end = rest.iter().position(|&c| c == 0).ok_or(Errno::INVAL)?;
        *slot = OsStr::from_bytes(&rest[..end]);
        rest = &rest[end + 1..];
    }
    Ok(out)
}

/// Writes `bytes` at `off` of `buf`; false if they do not fit.
pub(super) fn put(buf: &mut [u8], off: usize, bytes: &[u8]) -> bool {
    match buf.get_mut(off..off + bytes.len()) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

/// `struct fuse_attr` of `a` (or of nothing but a node id and a type).
pub(super) fn attr_bytes(ino: u64, st: Option<&sys::Stat>, mode: u32) -> [u8; ATTR_LEN] {
    let mut b = [0u8; ATTR_LEN];
    b[..8].copy_from_slice(&ino.to_ne_bytes());
    let Some(st) = st else {
        b[60..64].copy_from_slice(&mode.to_ne_bytes());
        return b;
    };
    let u64s = [
        st.st_size as u64,
        st.st_blocks as u64,
        st.st_atime as u64,
        st.st_mtime as u64,
        st.st_ctime as u64,
    ];
    for (i, v) in u64s.iter().enumerate() {
        b[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_ne_bytes());
    }
    let u32s = [
        st.st_atime_nsec as u32,
        st.st_mtime_nsec as u32,
        st.st_ctime_nsec as u32,
        st.st_mode,
        st.st_nlink as u32,
        st.st_uid,
        st.st_gid,
        st.st_rdev as u32,
        st.st_blksize as u32,
        0,
    ];
    for (i, v) in u32s.iter().enumerate() {
        b[48 + 4 * i..52 + 4 * i].copy_from_slice(&v.to_ne_bytes());
    }
    b
}

/// `struct fuse_entry_out` for `a`, or a negative entry (node id 0) cached for [`TTL`].
pub(super) fn entry_bytes(a: Option<&Attr>) -> [u8; ENTRY_LEN] {
    entry_of(
        a.map_or(0, |a| a.ino),
        attr_bytes(a.map_or(0, |a| a.ino), a.map(|a| &a.st), libc::S_IFREG),
    )
}

pub(super) fn entry_of(nodeid: u64, attr: [u8; ATTR_LEN]) -> [u8; ENTRY_LEN] {
    let mut b = [0u8; ENTRY_LEN];
    let ttl = TTL.as_secs();
    b[..8].copy_from_slice(&nodeid.to_ne_bytes());
    b[16..24].copy_from_slice(&ttl.to_ne_bytes());
    b[24..32].copy_from_slice(&ttl.to_ne_bytes());
    b[40..].copy_from_slice(&attr);
    b
}

/// `struct fuse_open_out`.
pub(super) fn open_bytes(fh: u64, flags: u32, backing_id: u32) -> [u8; OPEN_OUT_LEN] {
    let mut b = [0u8; OPEN_OUT_LEN];
    b[..8].copy_from_slice(&fh.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&backing_id.to_ne_bytes());
    b
}

/// `struct fuse_dirent` (and the name, padded to 8 bytes) at `off`; false if it does not fit.
pub(super) fn put_dirent(
    buf: &mut [u8],
    off: usize,
    ino: u64,
    next: u64,
    kind: u32,
    name: &[u8],
) -> bool {
    let len = (DIRENT_HEAD + name.len()).next_multiple_of(8);
    let Some(dst) = buf.get_mut(off..off + len) else {
        return false;
    };
    dst.fill(0);
    dst[..8].copy_from_slice(&ino.to_ne_bytes());
    dst[8..16].copy_from_slice(&next.to_ne_bytes());
    dst[16..20].copy_from_slice(&(name.len() as u32).to_ne_bytes());
    dst[20..24].copy_from_slice(&kind.to_ne_bytes());
    dst[DIRENT_HEAD..DIRENT_HEAD + name.len()].copy_from_slice(name);
    true
}

pub(super) fn dirent_len(name: &[u8]) -> usize {
    (DIRENT_HEAD + name.len()).next_multiple_of(8)
}

/// The `d_type` of a file type.
pub(super) fn dtype(k: sys::FileType) -> u32 {
    k.as_raw_mode() >> 12
}

pub(super) fn set_time(valid: u32, set: u32, now: u32, sec: u64, nsec: u32) -> SetTime {
    if valid & now != 0 {
        SetTime::Now
    } else if valid & set != 0 {
        SetTime::At(sys::Timespec {
            tv_sec: sec as i64,
            tv_nsec: nsec as _,
        })
    } else {
        SetTime::Omit
    }
}

/// Answers a getxattr-style request: the size alone when the caller asked for none.
pub(super) fn xattr_answer(
    buf: &mut [u8],
    size: u32,
    r: Result<Vec<u8>, Errno>,
) -> Result<usize, Errno> {
    let v = r?;
    if size == 0 {
        put(buf, 0, &(v.len() as u32).to_ne_bytes());
        put(buf, 4, &[0; 4]);
        return Ok(8);
    }
    if v.len() > size as usize || !put(buf, 0, &v) {
        return Err(Errno::RANGE);
    }
    Ok(v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_header_and_fields_read_native_endian_and_short_as_zero() {
        let mut b = [0u8; 40];
        b[4..8].copy_from_slice(&LOOKUP.to_ne_bytes());
        b[8..16].copy_from_slice(&77u64.to_ne_bytes());
        b[16..24].copy_from_slice(&5u64.to_ne_bytes());
        b[24..28].copy_from_slice(&1000u32.to_ne_bytes());
        b[28..32].copy_from_slice(&100u32.to_ne_bytes());
        let h = InHeader::parse(&b);
        assert_eq!(
            (h.opcode, h.unique, h.nodeid, h.uid, h.gid),
            (LOOKUP, 77, 5, 1000, 100)
        );
        // Past the end of a short slice: zero, not a panic.
        assert_eq!(u64_at(&b[..10], 8), 0);
        assert_eq!(u32_at(&b, 38), 0);
    }

    #[test]
    fn strings_split_at_nul_and_refuse_unterminated() {
        let [a, b] = strings::<2>(b"old\0new\0").expect("two names");
        assert_eq!((a, b), (OsStr::new("old"), OsStr::new("new")));
        let [n] = strings::<1>(b"name\0trailing value").expect("one name");
        assert_eq!(n, OsStr::new("name"));
        assert_eq!(strings::<2>(b"only\0"), Err(Errno::INVAL));
        assert_eq!(strings::<1>(b"no nul"), Err(Errno::INVAL));
    }

    #[test]
    fn answers_are_laid_out_as_the_kernel_reads_them() {
        let f = tempfile::tempfile().expect("tempfile");
        let mut st = sys::stat_fd(std::os::fd::AsFd::as_fd(&f)).expect("fstat");
        st.st_size = 12345;
        st.st_mode = libc::S_IFREG | 0o640;
        st.st_nlink = 2;
        st.st_uid = 7;
        st.st_gid = 8;
        st.st_mtime = 1_700_000_000;
        st.st_mtime_nsec = 5;
        let a = Attr { ino: 42, st };
        let e = entry_bytes(Some(&a));
        assert_eq!(u64_at(&e, 0), 42, "nodeid");
        assert_eq!(u64_at(&e, 16), TTL.as_secs(), "entry_valid");
        assert_eq!(u64_at(&e, 24), TTL.as_secs(), "attr_valid");
        let attr = &e[40..];
        assert_eq!(u64_at(attr, 0), 42, "attr.ino");
        assert_eq!(u64_at(attr, 8), 12345, "attr.size");
        assert_eq!(u64_at(attr, 32), 1_700_000_000, "attr.mtime");
        assert_eq!(u32_at(attr, 52), 5, "attr.mtimensec");
        assert_eq!(u32_at(attr, 60), libc::S_IFREG | 0o640, "attr.mode");
        assert_eq!(u32_at(attr, 64), 2, "attr.nlink");
        assert_eq!((u32_at(attr, 68), u32_at(attr, 72)), (7, 8), "attr.uid/gid");
        // A negative entry: node id 0, cached for the TTL.
        let neg = entry_bytes(None);
        assert_eq!((u64_at(&neg, 0), u64_at(&neg, 16)), (0, TTL.as_secs()));
        let o = open_bytes(9, 3, 4);
        assert_eq!((u64_at(&o, 0), u32_at(&o, 8), u32_at(&o, 12)), (9, 3, 4));
    }

    #[test]
    fn dirents_are_padded_to_eight_bytes_and_refused_when_full() {
        let mut buf = [0xffu8; 64];
        assert!(put_dirent(&mut buf, 0, 3, 1, 4, b"abc"));
        assert_eq!(dirent_len(b"abc"), 32);
        assert_eq!(u64_at(&buf, 0), 3);
        assert_eq!(u64_at(&buf, 8), 1);
        assert_eq!(u32_at(&buf, 16), 3);
        assert_eq!(u32_at(&buf, 20), 4);
        assert_eq!(&buf[24..32], b"abc\0\0\0\0\0");
        assert!(put_dirent(&mut buf, 32, 3, 2, 4, b"12345678"));
        assert!(!put_dirent(&mut buf, 40, 3, 3, 4, b"x"), "past the end");
    }
}
