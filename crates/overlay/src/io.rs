//! Open files and directories: OPEN/CREATE handles, READ/WRITE, FSYNC, FALLOCATE, LSEEK,
//! COPY_FILE_RANGE, and directory listings (READDIR/READDIRPLUS from a per-handle snapshot).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use layerfs_sys::{self as sys, Component, Errno, FileType, Mode, OFlags};

use crate::copyup::CopyData;
use crate::handles::{DirEntry, FileHandle, Listing};
use crate::index::sort_by_name;
use crate::layers::LayerIdx;
use crate::node::Node;
use crate::overlay::{Attr, ObjectAt, Overlay, OvlResult};

/// Flags kept when a file is (re)opened for a handle.
fn io_flags(flags: OFlags) -> OFlags {
    flags
        & (OFlags::RWMODE
            | OFlags::APPEND
            | OFlags::SYNC
            | OFlags::DSYNC
            | OFlags::NONBLOCK
            | OFlags::DIRECT
            | OFlags::LARGEFILE)
}

/// Whether `flags` ask for write access.
fn wants_write(flags: OFlags) -> bool {
    let acc = flags & OFlags::RWMODE;
    acc == OFlags::WRONLY || acc == OFlags::RDWR
}

impl Overlay {
    /// OPEN: returns the handle number and whether the file lives in a lower layer.
    pub fn open(&self, ino: u64, flags: i32) -> OvlResult<(u64, LayerIdx)> {
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        let flags = OFlags::from_bits_retain(flags as _);
        let node = self.node(ino)?;
        if node.is_dir {
            return Err(Errno::ISDIR);
        }
        let trunc = flags.contains(OFlags::TRUNC);
        let (layer, at) = if wants_write(flags) || trunc {
            if !self.layers.has_upper() {
                return Err(Errno::ROFS);
            }
            let data = if trunc {
                CopyData::Nothing
            } else {
                CopyData::All
            };
            if !node.read().in_upper() {
                self.copy_up(&node, data)?;
            }
            // Opened below like any upper file: by name where the name reaches it.
            match self.object_at(&node)? {
                (place, at) if place.is_upper() => (place, at),
                // Never a lower object for writing.
                _ => return Err(Errno::IO),
            }
        } else {
            self.object_at(&node)?
        };
        // A name of a hard-link group with an upper inode is served from that inode, which
        // every copy-up of the group's names links into place: it is the object for good, like
        // an upper file (and is passed through like one, as other names' opens of it may be).
        let layer = match at {
            ObjectAt::Fd(_) if !layer.is_upper() && is_group_served(&node) => LayerIdx::UPPER,
            _ => layer,
        };
        let keep = io_flags(flags);
        let open = keep | (flags & OFlags::TRUNC);
        // A file reachable by name is opened by name: one `openat`, where an `O_PATH` fd would
        // need a second open through its `/proc` magic link.
        let fd = match at {
            ObjectAt::Fd(fd) => sys::reopen(fd.as_fd(), open)?,
            ObjectAt::Named(dir, name) => sys::open_at(dir.as_fd(), &name, open, Mode::empty())?,
        };
        let fh = self.handles.insert(FileHandle::new(node, keep, layer, fd));
        Ok((fh, layer))
    }

    /// Registers a handle for a file CREATE just made.
    pub fn adopt_created(&self, ino: u64, flags: i32, fd: OwnedFd) -> OvlResult<u64> {
        let node = self.node(ino)?;
        let keep = io_flags(OFlags::from_bits_retain(flags as _));
        Ok(self
            .handles
            .insert(FileHandle::new(node, keep, LayerIdx::UPPER, fd)))
    }

    /// The fd of file handle `fh`, reopened on the upper copy if the node was copied up since
    /// the handle was opened (so it reads what the writers wrote).
    pub(crate) fn file_fd(&self, fh: u64) -> OvlResult<Arc<OwnedFd>> {
        let f = self.handles.file(fh)?;
        let (layer, fd) = f.current();
        if layer.is_upper() || !f.node.read().in_upper() {
            return Ok(fd);
        }
        let (_, upper) = self.object(&f.node)?;
        let fresh = Arc::new(sys::reopen(upper.as_fd(), f.flags)?);
        f.switch_to_upper(fresh.clone());
        Ok(fresh)
    }

    /// Runs `f` on the whole content of the lower file behind handle `fh` if it is at most `max`
    /// bytes (and not empty), holding the node's copy-up lock from the read to the end of `f`: no
    /// copy-up (and so no write) of the node can come between. Does nothing if the lock is taken
    /// or the node has an upper copy.
    pub fn with_small_lower_data(
        &self,
        fh: u64,
        max: u64,
        f: impl FnOnce(u64, &[u8]),
    ) -> OvlResult<()> {
        let file = self.handles.file(fh)?;
        let node = file.node.clone();
        let Some(_g) = node.try_copyup_lock() else {
            return Ok(());
        };
        if node.read().in_upper() {
            return Ok(());
        }
        let (_, fd) = file.current();
        let size = sys::stat_fd(fd.as_fd())?.st_size as u64;
        if size == 0 || size > max {
            return Ok(());
        }
        // From the page cache only: a cold file is read by the READs that follow, which may
        // wait for the disk where this OPEN must not (`fuse/uring.rs`).
        self.read_with(fh, 0, size as u32, true, |data| {
            if data.len() as u64 == size {
                f(node.ino, data);
            }
        })
    }

    /// READ: `f` gets the data read (short at end of file). With `nowait`, from the page cache
    /// only (see [`Overlay::read_into`]).
    ///
    /// The data goes through a buffer kept per request thread, so a 1 MiB READ neither
    /// allocates nor faults in fresh pages (at most one READ's size per thread stays allocated).
    pub fn read_with<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        nowait: bool,
        f: impl FnOnce(&[u8]) -> R,
    ) -> OvlResult<R> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with(|cell| {
            // Re-entry cannot happen (`f` only replies), but take a fresh buffer if it does.
            let mut own = Vec::new();
            let mut guard = cell.try_borrow_mut();
            let buf = match guard.as_deref_mut() {
                Ok(b) => b,
                Err(_) => &mut own,
            };
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let buf = &mut buf[..size as usize];
            let done = self.read_into(fh, offset, buf, nowait)?;
            Ok(f(&buf[..done]))
        })
    }

    /// READ into `buf` (as much as fits): the number of bytes read (short at end of file). With
    /// `nowait`, from the page cache only: `EAGAIN` (and nothing read) if that would wait for the
    /// disk, or if the layer's filesystem cannot say (`RWF_NOWAIT`).
    pub fn read_into(
        &self,
        fh: u64,
        offset: u64,
        buf: &mut [u8],
        nowait: bool,
    ) -> OvlResult<usize> {
        let fd = self.file_fd(fh)?;
        let mut done = 0;
        while done < buf.len() {
            let (rest, at) = (&mut buf[done..], offset + done as u64);
            let n = if nowait {
                sys::pread_nowait(fd.as_fd(), rest, at)?
            } else {
                rustix::io::pread(fd.as_fd(), rest, at)?
            };
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// WRITE.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> OvlResult<u32> {
        let fd = self.file_fd(fh)?;
        let mut done = 0;
        while done < data.len() {
            let n = rustix::io::pwrite(fd.as_fd(), &data[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done as u32)
    }

    /// FSYNC.
    pub fn fsync(&self, fh: u64, datasync: bool) -> OvlResult<()> {
        let fd = self.file_fd(fh)?;
        sys::sync_fd(fd.as_fd(), datasync)
    }

    /// FSYNCDIR: syncs the directory's upper copy, if any.
    pub fn fsyncdir(&self, ino: u64) -> OvlResult<()> {
        let node = self.node(ino)?;
        let Some(upper) = node.read().upper.clone() else {
            return Ok(());
        };
        let fd = sys::reopen(upper.as_fd(), OFlags::RDONLY | OFlags::DIRECTORY)?;
        sys::sync_fd(fd, false)
    }

    /// RELEASE.
    pub fn release(&self, fh: u64) {
        self.handles.remove(fh);
    }

    /// FALLOCATE.
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> OvlResult<()> {
        let fd = self.file_fd(fh)?;
        let flags = rustix::fs::FallocateFlags::from_bits_retain(mode as _);
        rustix::fs::fallocate(fd.as_fd(), flags, offset, len)
    }

    /// LSEEK (SEEK_DATA / SEEK_HOLE; the kernel handles the others).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> OvlResult<i64> {
        let fd = self.file_fd(fh)?;
        let pos = match whence {
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
            _ => return Err(Errno::INVAL),
        };
        rustix::fs::seek(fd.as_fd(), pos).map(|p| p as i64)
    }

    /// COPY_FILE_RANGE between two open files of the mount.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> OvlResult<u32> {
        let input = self.file_fd(fh_in)?;
        let output = self.file_fd(fh_out)?;
        let (mut i, mut o) = (off_in, off_out);
        let len = len.min(u32::MAX as u64 & !0xfff) as usize;
        rustix::fs::copy_file_range(
            input.as_fd(),
            Some(&mut i),
            output.as_fd(),
            Some(&mut o),
            len,
        )
        .map(|n| n as u32)
    }

    /// The listing of directory `ino` that READDIR `offset` continues, and the position in it:
    /// offset 0 takes a new one; a listing no longer kept is taken again at the same position.
    /// `None` once the listing has been read to its end (it is then dropped).
    pub fn listing(&self, ino: u64, offset: u64) -> OvlResult<Option<(Listing, usize, Arc<Node>)>> {
        let node = self.node(ino)?;
        if !node.is_dir {
            return Err(Errno::NOTDIR);
        }
        let (list, pos) = match self.listings.find(ino, offset).filter(|_| offset != 0) {
            Some(found) => found,
            None => {
                let entries = Arc::new(self.list(&node)?);
                let pos = (offset & u64::from(u32::MAX)) as usize;
                (self.listings.add(ino, entries), pos)
            }
        };
        if pos >= list.entries.len() {
            self.listings.done(list.id);
            return Ok(None);
        }
        Ok(Some((list, pos, node)))
    }

    /// The merged entries of `dir`, `.` and `..` first, then the names sorted.
    fn list(&self, dir: &Arc<Node>) -> OvlResult<Vec<DirEntry>> {
        let (parent, _) = dir.location();
        let parent_ino = if parent == 0 { dir.ino } else { parent };
        let (mut entries, sorted) = self.with_index(dir, |idx| {
            let mut entries = Vec::with_capacity(idx.capacity_hint() + 2);
            for (name, ino) in [(&b"."[..], dir.ino), (&b".."[..], parent_ino)] {
                entries.push(DirEntry {
                    name: name.into(),
                    ino,
                    kind: FileType::Directory,
                });
            }
            idx.for_each_visible(|name, vis, lower| {
                // A lower object's d_ino is known from the listing; an upper one (which may
                // carry an origin) is worked out when the entry is sent.
                let ino = lower.map_or(0, |(layer, ino)| self.layers.xino(layer, ino));
                entries.push(DirEntry {
                    name: name.clone(),
                    ino,
                    kind: vis.kind,
                });
            });
            (entries, idx.iterates_sorted())
        })?;
        if !sorted {
            sort_by_name(&mut entries, 2, |e| &e.name);
        }
        Ok(entries)
    }

    /// `d_ino` of `name` in `dir` (= the `st_ino` a lookup would give); `None` if it is gone.
    pub fn entry_ino(
        &self,
        dir: &crate::node::Node,
        name: &std::ffi::OsStr,
    ) -> OvlResult<Option<u64>> {
        let comp = Component::new(name)?;
        let Some(e) = self.entry(dir, &comp)? else {
            return Ok(None);
        };
        Ok(self.probe(dir, &comp, &e)?.map(|p| p.ino))
    }

    /// One READDIRPLUS entry: a full lookup of `name` in `dir` (no kernel reference taken yet:
    /// the caller calls [`Overlay::entry_sent`] once the entry is in the reply).
    pub fn dir_entry_plus(
        &self,
        dir: &Arc<crate::node::Node>,
        name: &std::ffi::OsStr,
    ) -> OvlResult<Option<(crate::node::Found, Attr)>> {
        let comp = Component::new(name)?;
        self.lookup_found(dir, &comp)
    }

    /// Takes the kernel reference for an entry that went out in a READDIRPLUS reply.
    pub fn entry_sent(&self, found: &crate::node::Found) {
        self.nodes.add_found(found);
    }
}

/// Whether `node` (a file) is served from its hard-link group's inode in the index.
fn is_group_served(node: &Node) -> bool {
    let s = node.read();
    s.group && !s.unlinked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &[u8]) -> DirEntry {
        DirEntry {
            name: name.into(),
            ino: 1,
            kind: FileType::RegularFile,
        }
    }

    /// Names sharing their first eight bytes, shorter than eight, and bytes above 0x7f sort
    /// bytewise; the first `skip` entries stay where they are.
    #[test]
    fn sorts_by_name_bytewise_after_skip() {
        let names: [&[u8]; 8] = [
            b".",
            b"..",
            b"abcdefghZ",
            b"abcdefgh",
            b"b\xff",
            b"ab",
            b"abcdefghA",
            b"B",
        ];
        let mut entries: Vec<DirEntry> = names.iter().map(|n| entry(n)).collect();
        sort_by_name(&mut entries, 2, |e| &e.name);
        let got: Vec<&[u8]> = entries.iter().map(|e| &*e.name).collect();
        let mut want: Vec<&[u8]> = names[2..].to_vec();
        want.sort();
        assert_eq!(&got[..2], &[&b"."[..], &b".."[..]]);
        assert_eq!(&got[2..], &want[..]);
    }
}
