//! The requests whose answer is more than one overlay call, written once for both transports
//! (fuser's `/dev/fuse` session and [`super::uring`]): opens with their passthrough decision, and
//! directory listings cut to the reader's buffer.

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use layerfs_sys::{self as sys, Errno};

use super::Fuse;
use super::passthrough::{Backing, OwnedFdRef};
use crate::handles::{DirEntry, Listings};
use crate::namespace::{Caller, NewObject};
use crate::overlay::Attr;

/// An OPEN or CREATE: the handle, and its backing file when its data is passed through.
pub(super) struct Opened {
    /// The handle in the overlay's handle table.
    pub fh: u64,
    /// Kept by the passthrough state too, until the handle's RELEASE.
    pub backing: Option<Arc<Backing>>,
    /// Served through the daemon without the kernel page cache (FOPEN_DIRECT_IO).
    pub direct: bool,
}

/// `__FMODE_EXEC`: the open flag of the kernel's own open of a file it executes.
const FMODE_EXEC: i32 = 0x20;

/// One entry of a READDIRPLUS answer.
pub(super) enum PlusItem<'a> {
    /// "." or "..": the kernel takes no reference and reads no attributes (node id only).
    Dot(u64),
    /// A named entry with its attributes (the kernel takes a reference).
    Entry(&'a Attr),
    /// A named entry without attributes: its `d_ino` and type (node id 0: the kernel lists it
    /// and takes no reference).
    Bare(u64, sys::FileType),
}

impl Fuse {
    /// OPEN of node `ino`: passed through for an upper file (and for any file of a read-only
    /// mount, where nothing is ever copied up), else served through the daemon, with the data of
    /// a small lower file put into the page cache before the answer.
    ///
    /// With `-o direct_read=SIZE`, a lower file of at least SIZE bytes is read with
    /// FOPEN_DIRECT_IO: each read(2) goes to the daemon (1 MiB at most per READ) and its data
    /// straight to the reader's buffer, so its pages are not held twice (the lower file's and the
    /// mount's) and no fresh cache pages are filled. An `exec` (open flag `__FMODE_EXEC`) still
    /// gets a cached open: an mmap of a direct open drops the file's page cache.
    pub(super) fn open_file(
        &self,
        ino: u64,
        flags: i32,
        open_backing: impl FnOnce(&OwnedFdRef) -> std::io::Result<Backing>,
    ) -> Result<Opened, Errno> {
        let (fh, layer) = self.changed(self.ovl.open(ino, flags))?;
        let pass = layer.is_upper() || self.ovl.read_only();
        let (backing, mut direct) = self.open_mode(ino, fh, pass, open_backing).into_parts();
        if backing.is_none() && !direct && !layer.is_upper() {
            direct = flags & FMODE_EXEC == 0 && self.big_enough_for_direct(fh);
            if direct {
                self.ovl.stats.direct_opens.fetch_add(1, Relaxed);
            } else if self.sole_cached_open(ino) {
                self.prefill(fh);
            }
        }
        Ok(Opened {
            fh,
            backing,
            direct,
        })
    }

    /// Whether the file of handle `fh` is at least `direct_read` bytes.
    fn big_enough_for_direct(&self, fh: u64) -> bool {
        let Some(min) = self.direct_min else {
            return false;
        };
        self.ovl
            .file_fd(fh)
            .ok()
            .and_then(|fd| sys::stat_fd(std::os::fd::AsFd::as_fd(&*fd)).ok())
            .is_some_and(|st| st.st_size as u64 >= min)
    }

    /// CREATE of `name` in `parent`: the new file's attributes and its open handle.
    pub(super) fn create_file(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
        open_backing: impl FnOnce(&OwnedFdRef) -> std::io::Result<Backing>,
    ) -> Result<(Attr, Opened), Errno> {
        let obj = NewObject::File {
            mode,
            flags: sys::OFlags::from_bits_retain(flags as _),
        };
        let (attr, fd) = self.changed(self.ovl.create_object(parent, name, obj, caller))?;
        self.open_created(attr, fd.ok_or(Errno::IO)?, flags, open_backing)
    }

    /// TMPFILE in `parent` (`open(dir, O_TMPFILE)`): the unnamed file's attributes and its open
    /// handle, passed through like any upper file.
    pub(super) fn create_tmp_file(
        &self,
        parent: u64,
        mode: u32,
        flags: i32,
        caller: Caller,
        open_backing: impl FnOnce(&OwnedFdRef) -> std::io::Result<Backing>,
    ) -> Result<(Attr, Opened), Errno> {
        let (attr, fd) = self.ovl.create_tmpfile(parent, mode, flags, caller)?;
        self.open_created(attr, fd, flags, open_backing)
    }

    /// The handle of a file just made (an upper file: passed through where possible).
    fn open_created(
        &self,
        attr: Attr,
        fd: std::os::fd::OwnedFd,
        flags: i32,
        open_backing: impl FnOnce(&OwnedFdRef) -> std::io::Result<Backing>,
    ) -> Result<(Attr, Opened), Errno> {
        let fh = self.ovl.adopt_created(attr.ino, flags, fd)?;
        let (backing, direct) = self
            .open_mode(attr.ino, fh, true, open_backing)
            .into_parts();
        Ok((
            attr,
            Opened {
                fh,
                backing,
                direct,
            },
        ))
    }

    /// The `d_ino` of listed entry `e` of `dir` (known from the listing for a lower object, worked
    /// out for an upper one); `None` if it is gone.
    fn d_ino(&self, dir: &crate::node::Node, e: &DirEntry) -> Result<Option<u64>, Errno> {
        if e.ino != 0 {
            return Ok(Some(e.ino));
        }
        self.ovl.entry_ino(dir, e.name())
    }

    /// READDIR of directory `ino` from `offset`: `add(ino, next offset, type, name)` for each
    /// entry until it answers `true` (the reader's buffer is full).
    pub(super) fn fill_dir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, sys::FileType, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        self.ovl.stats.readdirs.fetch_add(1, Relaxed);
        let Some((list, pos, dir)) = self.ovl.listing(ino, offset)? else {
            return Ok(());
        };
        for (i, e) in list.entries.iter().enumerate().skip(pos) {
            let Some(ino) = self.d_ino(&dir, e)? else {
                continue;
            };
            if add(ino, Listings::offset(list.id, i + 1), e.kind, e.name()) {
                break;
            }
        }
        Ok(())
    }

    /// READDIRPLUS of directory `ino` from `offset`: `add(next offset, name, item)` for each
    /// entry until it answers `true` (full). An entry that went into the answer counts as a
    /// lookup of its node. With the caller's `pid`, non-directories go without attributes when
    /// [`super::plus::PlusPolicy`] says the caller does not look at them.
    pub(super) fn fill_dir_plus(
        &self,
        ino: u64,
        offset: u64,
        pid: Option<u32>,
        mut add: impl FnMut(u64, &OsStr, PlusItem<'_>) -> bool,
    ) -> Result<(), Errno> {
        self.ovl.stats.readdirpluses.fetch_add(1, Relaxed);
        let Some((list, pos, dir)) = self.ovl.listing(ino, offset)? else {
            return Ok(());
        };
        let lean = pid.map_or(0, |pid| self.plus.lean(pid, ino, offset));
        let mut bare = 0;
        for (i, e) in list.entries.iter().enumerate().skip(pos) {
            let off = Listings::offset(list.id, i + 1);
            if e.name() == "." || e.name() == ".." {
                let target = if e.name() == "." { ino } else { e.ino };
                if add(off, e.name(), PlusItem::Dot(target)) {
                    break;
                }
                continue;
            }
            if bare < lean && e.kind != sys::FileType::Directory {
                let Some(ino) = self.d_ino(&dir, e)? else {
                    continue;
                };
                if add(off, e.name(), PlusItem::Bare(ino, e.kind)) {
                    break;
                }
                bare += 1;
                continue;
            }
            let Some((node, a)) = self.ovl.dir_entry_plus(&dir, e.name())? else {
                continue;
            };
            if add(off, e.name(), PlusItem::Entry(&a)) {
                break;
            }
            self.ovl.entry_sent(&node);
        }
        self.ovl.stats.bare_entries.fetch_add(bare as u64, Relaxed);
        if let Some(pid) = pid
            && lean > 0
            && bare == 0
            && offset == 0
        {
            self.plus.nothing_left_out(pid, ino);
        }
        Ok(())
    }
}
