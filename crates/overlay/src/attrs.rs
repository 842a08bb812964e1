//! SETATTR, ACCESS and extended attributes. Changing anything copies the object up first; private
//! xattrs of the overlay format are invisible and cannot be set through the mount.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use layerfs_sys::{self as sys, Errno, FileType, Mode, Timespec, Timestamps, xattr};

use crate::copyup::CopyData;
use crate::overlay::{Attr, ObjectAt, Overlay, OvlResult};

/// Reading this xattr of the mount root returns the daemon's counters as JSON.
pub const STATS_XATTR: &[u8] = b"user.layerfs.stats";

/// A time in a SETATTR.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    /// Leave as is.
    Omit,
    /// The current time.
    Now,
    /// This time.
    At(Timespec),
}

/// What a SETATTR changes.
#[derive(Debug, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: SetTime,
    pub mtime: SetTime,
    /// An open handle to truncate through, if the kernel named one.
    pub fh: Option<u64>,
}

impl SetAttr {
    /// Nothing to change: what FUSE sends for a change it carries only as `ATTR_CTIME`,
    /// such as `chown(path, -1, -1)`.
    fn changes_nothing(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && matches!((self.atime, self.mtime), (SetTime::Omit, SetTime::Omit))
    }
}

fn timespec(t: SetTime) -> Timespec {
    match t {
        SetTime::Omit => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        SetTime::Now => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        SetTime::At(ts) => ts,
    }
}

/// The calls of a SETATTR on an upper object: on its `O_PATH` fd, or on its name in its
/// directory.
impl ObjectAt {
    fn stat(&self) -> sys::SysResult<sys::Stat> {
        match self {
            ObjectAt::Fd(fd) => sys::stat_fd(fd.as_fd()),
            ObjectAt::Named(dir, name) => sys::stat_at(dir.as_fd(), name),
        }
    }

    fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> sys::SysResult<()> {
        match self {
            ObjectAt::Fd(fd) => sys::chown_fd(fd.as_fd(), uid, gid),
            ObjectAt::Named(dir, name) => sys::chown_at(dir.as_fd(), name, uid, gid),
        }
    }

    /// Not for symlinks.
    fn chmod(&self, mode: Mode) -> sys::SysResult<()> {
        match self {
            ObjectAt::Fd(fd) => sys::chmod_fd(fd.as_fd(), mode),
            ObjectAt::Named(dir, name) => sys::chmod_at(dir.as_fd(), name, mode),
        }
    }

    /// Regular files only.
    fn truncate(&self, size: u64) -> sys::SysResult<()> {
        match self {
            ObjectAt::Fd(fd) => sys::truncate_fd(fd.as_fd(), size),
            ObjectAt::Named(dir, name) => sys::truncate_at(dir.as_fd(), name, size),
        }
    }

    fn utimes(&self, times: &Timestamps) -> sys::SysResult<()> {
        match self {
            ObjectAt::Fd(fd) => sys::utimes_fd(fd.as_fd(), times),
            ObjectAt::Named(dir, name) => sys::utimes_at(dir.as_fd(), name, times),
        }
    }
}

impl Overlay {
    /// SETATTR. An upper non-directory reachable by name is changed through its name in its
    /// directory (no fd opened, no `/proc` walk: the kernel holds the inode locked, so no rename
    /// or unlink moves the name meanwhile); anything else through the `O_PATH` fd of its upper
    /// object, copied up first.
    pub fn setattr(&self, ino: u64, a: SetAttr) -> OvlResult<Attr> {
        let node = self.node(ino)?;
        let upper = match self.object_at(&node)? {
            (place, at @ ObjectAt::Named(..)) if place.is_upper() => at,
            _ => {
                let data = if a.size == Some(0) {
                    CopyData::Nothing
                } else {
                    CopyData::All
                };
                ObjectAt::Fd(self.copy_up(&node, data)?)
            }
        };
        // The type matters to a chmod (never through a symlink) and a truncate only: a chown or
        // a change of times (most SETATTRs of `tar x`) needs no stat first.
        let kind = if a.mode.is_some() || a.size.is_some() {
            Some(sys::file_type(&upper.stat()?))
        } else {
            None
        };
        // An empty SETATTR still changes ctime: kernel overlayfs hands `ATTR_CTIME` to the
        // upper, and a chown to (-1, -1) is how the upper's ctime moves to now.
        if a.uid.is_some() || a.gid.is_some() || a.changes_nothing() {
            upper.chown(a.uid, a.gid)?;
        }
        if let Some(mode) = a.mode
            && kind != Some(FileType::Symlink)
        {
            upper.chmod(Mode::from_raw_mode(mode & 0o7777))?;
        }
        if let Some(size) = a.size {
            match kind {
                Some(FileType::Directory) => return Err(Errno::ISDIR),
                Some(FileType::RegularFile) => upper.truncate(size)?,
                _ => return Err(Errno::INVAL),
            }
        }
        if !matches!((a.atime, a.mtime), (SetTime::Omit, SetTime::Omit)) {
            let times = Timestamps {
                last_access: timespec(a.atime),
                last_modification: timespec(a.mtime),
            };
            upper.utimes(&times)?;
        }
        self.attr(&node)
    }

    /// GETXATTR. Private names answer `ENODATA`.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> OvlResult<Vec<u8>> {
        if ino == crate::node::ROOT && name.as_bytes() == STATS_XATTR {
            let snap = self
                .stats
                .snapshot(self.nodes.len(), self.layers.sync.name());
            return serde_json::to_vec(&snap).map_err(|_| Errno::IO);
        }
        let stored = self.layers.encoding.escape(name.as_bytes());
        let stored = OsStr::from_bytes(&stored);
        let node = self.node(ino)?;
        match self.object_at(&node)?.1 {
            ObjectAt::Named(dir, name) => xattr::get_at(dir.as_fd(), &name, stored),
            ObjectAt::Fd(fd) if node.is_dir => xattr::get_dir(fd.as_fd(), stored),
            ObjectAt::Fd(fd) => xattr::get(fd.as_fd(), stored),
        }
    }

    /// LISTXATTR without the private names, NUL-separated.
    /// `privileged`: the caller may see `trusted.*` names (the daemon, running as root, lists
    /// them all; the kernel would hide them from a caller without CAP_SYS_ADMIN).
    pub fn listxattr(&self, ino: u64, privileged: bool) -> OvlResult<Vec<u8>> {
        let node = self.node(ino)?;
        let (_, fd) = self.object(&node)?;
        let mut out = Vec::new();
        for stored in xattr::list(fd.as_fd())? {
            if !privileged && stored.starts_with(b"trusted.") {
                continue;
            }
            if let Some(name) = self.layers.encoding.unescape(&stored) {
                out.extend_from_slice(&name);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// SETXATTR (copies up first).
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> OvlResult<()> {
        let stored = self.layers.encoding.escape(name.as_bytes());
        let node = self.node(ino)?;
        let upper = self.copy_up(&node, CopyData::All)?;
        xattr::set(upper.as_fd(), OsStr::from_bytes(&stored), value, flags)
    }

    /// REMOVEXATTR: an absent attribute is `ENODATA` without a copy-up.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> OvlResult<()> {
        let stored = self.layers.encoding.escape(name.as_bytes());
        let node = self.node(ino)?;
        if !node.read().in_upper() {
            self.getxattr(ino, name)?;
        }
        let upper = self.copy_up(&node, CopyData::All)?;
        xattr::remove(upper.as_fd(), OsStr::from_bytes(&stored))
    }

    /// ACCESS (only sent without `default_permissions`): permission bits against the caller.
    pub fn access(&self, ino: u64, mask: i32, uid: u32, gid: u32) -> OvlResult<()> {
        let attr = self.getattr(ino, None)?;
        if mask & libc::W_OK != 0 && self.read_only() {
            return Err(Errno::ROFS);
        }
        if uid == 0 {
            if mask & libc::X_OK != 0
                && attr.st.st_mode & 0o111 == 0
                && sys::file_type(&attr.st) != FileType::Directory
            {
                return Err(Errno::ACCESS);
            }
            return Ok(());
        }
        let mode = attr.st.st_mode;
        let bits = if attr.st.st_uid == uid {
            (mode >> 6) & 7
        } else if attr.st.st_gid == gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        if (mask as u32) & 7 & !bits != 0 {
            return Err(Errno::ACCESS);
        }
        Ok(())
    }
}
