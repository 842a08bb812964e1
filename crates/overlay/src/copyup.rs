//! Copy-up: giving a lower object a copy in the upper dir before it is changed.
//!
//! Order (as the kernel's `ovl_copy_up_workdir`): parents first, top-down; the copy is built in
//! `work/work` under a temporary name, created writable by the daemon whatever its final mode; then
//! data (reflink, else `copy_file_range`), xattrs, mode, owner, times; then the data is made
//! durable as the mount's [`SyncPolicy`](crate::durability::SyncPolicy) says (an fsync, a
//! write-back, or nothing), and the copy is renamed into place. The parent's times are put back
//! afterwards. Open handles notice the new upper object on their next read ([`crate::handles`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use layerfs_store::format;
use layerfs_sys::{
    self as sys, Component, Errno, FileType, Mode, OFlags, RenameFlags, Stat, Timestamps, xattr,
};

use crate::durability::Synced;
use crate::index::UpperSlot;
use crate::layers::LayerIdx;
use crate::node::Node;
use crate::overlay::{Overlay, OvlResult};

std::thread_local! {
    /// Nodes whose attributes a copy-up on this thread changed behind the kernel's back (a parent
    /// that gained an upper entry, a directory now served from its upper copy).
    static CHANGED: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Records that copy-up changed the attributes of node `ino`.
fn attrs_changed(ino: u64) {
    CHANGED.with(|c| c.borrow_mut().push(ino));
}

/// The nodes whose attributes copy-ups on this thread changed since the last call (a request is
/// served on one thread: its front end tells the kernel before it replies).
pub fn take_changed_attrs() -> Vec<u64> {
    CHANGED.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

/// How much of a regular file's data a copy-up takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyData {
    /// All of it.
    All,
    /// None: the caller truncates to zero anyway (`O_TRUNC`).
    Nothing,
}

impl Overlay {
    /// Whether a change to node `ino` would copy up more than `max` bytes: it has no upper copy
    /// yet, and its object is bigger (`false` for a node we do not know: the change fails fast).
    pub fn copy_up_exceeds(&self, ino: u64, max: u64) -> bool {
        let Some(node) = self.nodes.get(ino) else {
            return false;
        };
        if node.read().in_upper() {
            return false;
        }
        self.getattr(ino, None)
            .is_ok_and(|a| a.st.st_size as u64 > max)
    }

    /// Makes sure `node` has an upper object and returns its `O_PATH` fd.
    pub(crate) fn copy_up(&self, node: &Arc<Node>, data: CopyData) -> OvlResult<Arc<OwnedFd>> {
        if node.read().in_upper() {
            return self.object(node).map(|(_, fd)| fd);
        }
        if !self.layers.has_upper() {
            return Err(Errno::ROFS);
        }
        let _g = node.copyup_lock();
        let (parent_ino, name, done, unlinked) = {
            let s = node.read();
            (s.parent, s.name.clone(), s.in_upper(), s.unlinked)
        };
        if done {
            return self.object(node).map(|(_, fd)| fd);
        }
        if unlinked {
            return Err(Errno::NOENT);
        }
        let name = name.ok_or(Errno::IO)?;
        let parent = self.node(parent_ino)?;
        let parent_upper = self.copy_up(&parent, CopyData::All)?;
        let (_, lower_fd) = self.object(node)?;
        let st = sys::stat_fd(lower_fd.as_fd())?;
        let kind = sys::file_type(&st);
        // The data copy runs before the parent's lock is taken: a large copy stalls nobody else.
        let work = self.layers.work()?;
        let tmp = self.tmp_name();
        let group = if kind == FileType::Directory {
            None
        } else if node.read().group {
            // Served from its group's index inode (`st` is that inode's, not the lower's); index
            // entries are never removed.
            self.group_entry(node.ino)?
        } else {
            self.ensure_group_entry(node.ino, lower_fd.as_fd(), &st)?
        };
        if group.is_some() {
            node.write().group = true;
        }
        let built = if let Some(group) = group {
            // A hard-link group with an upper inode: link it, copy nothing.
            sys::link_fd(group.as_fd(), work, &tmp).and_then(|()| sys::open_path(work, &tmp))
        } else {
            self.build_copy(lower_fd.as_fd(), &st, work, &tmp, data, node.ino)
        };
        let fd = match built {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                let _ = crate::layers::remove_tree(work, &tmp);
                return Err(e);
            }
        };
        let _op = parent.op_lock();
        // Someone may have made the upper object meanwhile (a hard link, a moved tree): adopt it.
        let existing = self.entry_locked(&parent, &name)?.and_then(|e| e.upper);
        let fd = if let Some(UpperSlot::Present(_)) = existing {
            let _ = crate::layers::remove_tree(work, &tmp);
            Arc::new(sys::open_path(parent_upper.as_fd(), &name)?)
        } else {
            if let Err(e) = self.publish(work, &tmp, parent_upper.as_fd(), &name, existing) {
                let _ = crate::layers::remove_tree(work, &tmp);
                return Err(e);
            }
            self.update_index(&parent, |idx| {
                idx.set_upper(name.as_bytes(), Some(UpperSlot::Present(kind)))
            })?;
            attrs_changed(parent.ino);
            if node.is_dir {
                attrs_changed(node.ino);
            }
            self.stats.copy_ups.fetch_add(1, Ordering::Relaxed);
            fd
        };
        {
            let mut s = node.write();
            s.place = LayerIdx::UPPER;
            if node.is_dir {
                s.upper = Some(fd.clone());
            }
        }
        if node.is_dir {
            self.note_dir_fds(node, 1);
        }
        Ok(fd)
    }

    /// Makes sure the name `dir/name` of non-directory `node` exists in the upper. A hard-link
    /// group member may already have an upper inode under another name: that inode is linked here.
    pub(crate) fn ensure_upper_name(
        &self,
        node: &Arc<Node>,
        dir: &Arc<Node>,
        name: &Component,
    ) -> OvlResult<()> {
        let upper = self.copy_up(node, CopyData::All)?;
        if node.is_dir {
            return Ok(());
        }
        let dir_up = self.copy_up(dir, CopyData::All)?;
        let _op = dir.op_lock();
        let there = self.entry_locked(dir, name)?.and_then(|e| e.upper);
        if matches!(there, Some(UpperSlot::Present(_))) {
            return Ok(());
        }
        let work = self.layers.work()?;
        let tmp = self.tmp_name();
        sys::link_fd(upper.as_fd(), work, &tmp)?;
        if let Err(e) = self.publish(work, &tmp, dir_up.as_fd(), name, there) {
            let _ = sys::unlink_at(work, &tmp, false);
            return Err(e);
        }
        let kind = sys::file_type(&sys::stat_fd(upper.as_fd())?);
        attrs_changed(dir.ino);
        self.update_index(dir, |idx| {
            idx.set_upper(name.as_bytes(), Some(UpperSlot::Present(kind)))
        })
    }

    /// Builds the copy of `src` as `work/tmp`, with `origin` (the node's inode number, or a
    /// hard-link group's key) in its origin xattr (best effort): everything but the rename.
    pub(crate) fn build_copy(
        &self,
        src: BorrowedFd<'_>,
        st: &Stat,
        work: BorrowedFd<'_>,
        tmp: &Component,
        data: CopyData,
        origin: u64,
    ) -> OvlResult<OwnedFd> {
        let kind = sys::file_type(st);
        let mode = Mode::from_raw_mode(st.st_mode & 0o7777);
        // The copy's data, still open for writing, when there is any to make durable.
        let mut copied = false;
        let mut input = None;
        // Regular files and directories get their metadata through an fd open for I/O (the
        // copy's, the source's), symlinks and special files through the `/proc` magic link of
        // their `O_PATH` fd: the fd form costs no path walk.
        let (fd, meta) = match kind {
            FileType::Directory => {
                sys::mkdir_at(work, tmp, Mode::from_raw_mode(0o700))?;
                let meta =
                    sys::open_at(work, tmp, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
                (sys::open_path_dir(work, tmp)?, Some(meta))
            }
            FileType::RegularFile => {
                let out = sys::open_at(
                    work,
                    tmp,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY,
                    Mode::from_raw_mode(0o600),
                )?;
                let fd = sys::open_path(work, tmp)?;
                if data == CopyData::All && st.st_size > 0 {
                    let opened = sys::reopen(src, OFlags::RDONLY)?;
                    let no_clone = self.layers.no_clone(st.st_dev);
                    sys::copy::copy_data(opened.as_fd(), out.as_fd(), st, no_clone)?;
                    input = Some(opened);
                    copied = true;
                }
                (fd, Some(out))
            }
            FileType::Symlink => {
                let target = sys::readlink_fd(src)?;
                sys::symlink_at(&target, work, tmp)?;
                (sys::open_path(work, tmp)?, None)
            }
            FileType::Fifo
            | FileType::Socket
            | FileType::CharacterDevice
            | FileType::BlockDevice => {
                sys::mknod_at(work, tmp, kind, mode, st.st_rdev)?;
                (sys::open_path(work, tmp)?, None)
            }
            FileType::Unknown => return Err(Errno::IO),
        };
        let source = match (&input, kind) {
            (Some(i), _) => XattrFd::Opened(i.as_fd()),
            (None, FileType::Directory) => XattrFd::Dir(src),
            (None, _) => XattrFd::Path(src),
        };
        let target = match &meta {
            Some(m) => XattrFd::Opened(m.as_fd()),
            None => XattrFd::Path(fd.as_fd()),
        };
        copy_xattrs(source, target, self.layers.encoding)?;
        // Best effort: symlinks and special files may refuse user.* xattrs.
        let _ = target.set(self.origin_xattr(), &origin.to_le_bytes());
        let chmod = |mode| match &meta {
            Some(m) => sys::chmod_open(m.as_fd(), mode),
            None => sys::chmod_fd(fd.as_fd(), mode),
        };
        if kind != FileType::Symlink {
            chmod(mode)?;
        }
        sys::chown_fd(fd.as_fd(), Some(st.st_uid), Some(st.st_gid))?;
        // chown drops set-id bits: put them back.
        if kind != FileType::Symlink && st.st_mode & 0o6000 != 0 {
            chmod(mode)?;
        }
        let times = Timestamps {
            last_access: sys::atime_of(st),
            last_modification: sys::mtime_of(st),
        };
        match &meta {
            Some(m) => sys::utimes_open(m.as_fd(), &times)?,
            None => sys::utimes_fd(fd.as_fd(), &times)?,
        }
        if copied && let Some(out) = meta {
            self.sync_copy(out)?;
        }
        Ok(fd)
    }

    /// Makes a copy's data durable before its rename, as the mount's sync policy says.
    fn sync_copy(&self, out: OwnedFd) -> OvlResult<()> {
        let counter = match self.layers.sync.sync_copy(&out)? {
            Synced::Nothing => return Ok(()),
            Synced::WriteBack => &self.stats.writebacks,
            Synced::Fsync => &self.stats.fsyncs,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Renames `work/tmp` to `dir/name`, replacing a whiteout there if any (`there`: what the
    /// directory's index shows in the upper under `name`), and puts `dir`'s times back as they
    /// were.
    pub(crate) fn publish(
        &self,
        work: BorrowedFd<'_>,
        tmp: &Component,
        dir: BorrowedFd<'_>,
        name: &Component,
        there: Option<UpperSlot>,
    ) -> OvlResult<()> {
        let dir_st = sys::stat_fd(dir)?;
        if there == Some(UpperSlot::Whiteout) {
            self.clear_unprivileged_whiteout(dir, name)?;
        }
        match sys::rename_at(work, tmp, dir, name, RenameFlags::NOREPLACE) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                // Only a whiteout may stand there: exchange, then drop it.
                let there = sys::stat_at(dir, name)?;
                if !format::is_chardev_whiteout(&there) {
                    return Err(Errno::EXIST);
                }
                sys::rename_at(work, tmp, dir, name, RenameFlags::EXCHANGE)?;
                sys::unlink_at(work, tmp, false)?;
            }
            Err(e) => return Err(e),
        }
        let times = Timestamps {
            last_access: sys::atime_of(&dir_st),
            last_modification: sys::mtime_of(&dir_st),
        };
        sys::utimes_dir(dir, &times)
    }

    /// Removes a `.wh.NAME` file in `dir` if there is one.
    pub(crate) fn clear_unprivileged_whiteout(
        &self,
        dir: BorrowedFd<'_>,
        name: &Component,
    ) -> OvlResult<()> {
        let Ok(wh) = format::whiteout_file_name(name) else {
            return Ok(());
        };
        match sys::unlink_at(dir, &wh, false) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// How a copy-up reaches an object's xattrs: by an fd open for I/O, by a directory's `O_PATH`
/// fd (`listxattrat`/`getxattrat` of `"."`), or by the `/proc` magic link of any `O_PATH` fd.
#[derive(Clone, Copy)]
enum XattrFd<'a> {
    Opened(BorrowedFd<'a>),
    Dir(BorrowedFd<'a>),
    Path(BorrowedFd<'a>),
}

impl XattrFd<'_> {
    fn list(self) -> sys::SysResult<Vec<Vec<u8>>> {
        match self {
            XattrFd::Opened(fd) => xattr::list_open(fd),
            XattrFd::Dir(fd) => xattr::list_dir(fd),
            XattrFd::Path(fd) => xattr::list(fd),
        }
    }

    fn get(self, name: &std::ffi::OsStr) -> sys::SysResult<Vec<u8>> {
        match self {
            XattrFd::Opened(fd) => xattr::get_open(fd, name),
            XattrFd::Dir(fd) => xattr::get_dir(fd, name),
            XattrFd::Path(fd) => xattr::get(fd, name),
        }
    }

    fn set(self, name: &std::ffi::OsStr, value: &[u8]) -> sys::SysResult<()> {
        match self {
            XattrFd::Opened(fd) => xattr::set_open(fd, name, value, 0),
            XattrFd::Dir(fd) | XattrFd::Path(fd) => xattr::set(fd, name, value, 0),
        }
    }
}

/// Copies every non-private xattr of `src` to `dst`. Attributes the target refuses (e.g. `user.*`
/// on a symlink) are skipped, as the kernel does.
fn copy_xattrs(src: XattrFd<'_>, dst: XattrFd<'_>, enc: format::Encoding) -> OvlResult<()> {
    let names = match src.list() {
        Ok(n) => n,
        Err(Errno::OPNOTSUPP) | Err(Errno::PERM) | Err(Errno::ACCESS) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names {
        if enc.is_private(&name) {
            continue;
        }
        let name = std::ffi::OsStr::from_bytes(&name);
        let Ok(value) = src.get(name) else {
            continue;
        };
        match dst.set(name, &value) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP | Errno::PERM | Errno::INVAL | Errno::ACCESS) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
