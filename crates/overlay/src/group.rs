//! Lower hard-link groups kept over copy-up (the kernel overlay's `index=on`).
//!
//! Names of a lower file with `st_nlink > 1` are one object. The first time any of them needs an
//! upper inode, the copy is also linked into `work/layerfs-index/<st_ino hex>`; every later
//! copy-up of a name of the group links that inode instead of copying, and a lookup of a name still
//! in the lower serves the index inode, so all names keep showing one file. The merged view's link
//! count lives in an xattr of that inode (`…overlay.layerfs.nlink`): it starts at the lower link
//! count and follows unlink, link and rename-over of the group's names.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use layerfs_store::format;
use layerfs_sys::{self as sys, Component, Errno, FileType, RenameFlags, Stat, xattr};

use crate::copyup::CopyData;
use crate::overlay::{Overlay, OvlResult};

fn entry_name(key: u64) -> OvlResult<Component> {
    Component::new(format!("{key:016x}"))
}

impl Overlay {
    /// The index entry of group `key`, if the group has an upper inode.
    pub(crate) fn group_entry(&self, key: u64) -> OvlResult<Option<OwnedFd>> {
        let Some(index) = self.layers.index() else {
            return Ok(None);
        };
        if !self.layers.group_may_exist(key) {
            return Ok(None);
        }
        match sys::open_path(index, &entry_name(key)?) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The merged-view link count recorded on a group inode whose real link count is `real`:
    /// layerfs's own decimal count, or the kernel overlay's `U±n` (relative to `real`).
    pub(crate) fn group_count(&self, fd: BorrowedFd<'_>, real: u64) -> Option<u64> {
        if let Ok(v) = xattr::get(fd, self.layers.encoding.nlink_xattr()) {
            return std::str::from_utf8(&v).ok()?.parse().ok();
        }
        let name = match self.layers.encoding {
            format::Encoding::Kernel => "trusted.overlay.nlink",
            format::Encoding::Unprivileged => "user.overlay.nlink",
        };
        let v = xattr::get(fd, std::ffi::OsStr::new(name)).ok()?;
        let v = std::str::from_utf8(&v).ok()?;
        let rel = v.strip_prefix('U')?;
        let delta: i64 = rel.parse().ok()?;
        Some(real.saturating_add_signed(delta))
    }

    fn set_group_count(&self, fd: BorrowedFd<'_>, n: u64) -> OvlResult<()> {
        xattr::set(
            fd,
            self.layers.encoding.nlink_xattr(),
            n.to_string().as_bytes(),
            0,
        )
    }

    /// Adds `delta` to the link count of the group inode behind `fd`, if it is one.
    pub(crate) fn adjust_group_count(&self, fd: BorrowedFd<'_>, delta: i64) -> OvlResult<()> {
        let real = sys::stat_fd(fd)?.st_nlink;
        if let Ok(v) = xattr::get(fd, self.layers.encoding.nlink_xattr()) {
            let n: u64 = std::str::from_utf8(&v)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(real);
            self.set_group_count(fd, n.saturating_add_signed(delta))?;
        }
        Ok(())
    }

    /// The index entry of the group of lower object `src` (stat `st`, group key `key`), made now
    /// (a full copy, published by rename) if the group has none. `None` if `src` is no hard link
    /// (a lower object's link count never changes: one with a single link has no group).
    pub(crate) fn ensure_group_entry(
        &self,
        key: u64,
        src: BorrowedFd<'_>,
        st: &Stat,
    ) -> OvlResult<Option<OwnedFd>> {
        if st.st_nlink < 2 || sys::file_type(st) == FileType::Directory {
            return Ok(None);
        }
        if let Some(fd) = self.group_entry(key)? {
            return Ok(Some(fd));
        }
        let Some(index) = self.layers.index() else {
            return Ok(None);
        };
        let work = self.layers.work()?;
        let tmp = self.tmp_name();
        let built = self
            .build_copy(src, st, work, &tmp, CopyData::All, key)
            .and_then(|fd| {
                self.set_group_count(fd.as_fd(), st.st_nlink)?;
                self.layers.note_group(key);
                match sys::rename_at(work, &tmp, index, &entry_name(key)?, RenameFlags::NOREPLACE) {
                    Ok(()) => Ok(Some(fd)),
                    // Another thread made it first: use theirs.
                    Err(Errno::EXIST) => {
                        let _ = sys::unlink_at(work, &tmp, false);
                        self.group_entry(key)
                    }
                    Err(e) => Err(e),
                }
            });
        if built.is_err() {
            let _ = crate::layers::remove_tree(work, &tmp);
        }
        built
    }

    /// Counts one name less for the object about to be removed from `dir/name` (whose entry shows
    /// `vis_layer`): a group member loses a link in the merged view.
    pub(crate) fn group_unlinked(
        &self,
        dir: &crate::node::Node,
        name: &Component,
        entry: &crate::index::IndexEntry,
    ) -> OvlResult<()> {
        let Some(vis) = entry.visible() else {
            return Ok(());
        };
        if vis.kind == FileType::Directory || self.layers.index().is_none() {
            return Ok(());
        }
        let parent = self.dir_fd_in(dir, vis.layer)?;
        // Most objects have one link: a stat by name settles it without opening anything.
        if sys::stat_at(parent.as_fd(), name)?.st_nlink < 2 {
            return Ok(());
        }
        let fd = sys::open_path(parent.as_fd(), name)?;
        let st = sys::stat_fd(fd.as_fd())?;
        if st.st_nlink < 2 {
            return Ok(());
        }
        if vis.layer.is_upper() {
            return self.adjust_group_count(fd.as_fd(), -1);
        }
        let key = self.layers.xino(vis.layer, st.st_ino);
        if let Some(group) = self.ensure_group_entry(key, fd.as_fd(), &st)? {
            self.adjust_group_count(group.as_fd(), -1)?;
        }
        Ok(())
    }
}
