//! RENAME (plain, `RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
//!
//! A directory that has lower parts is moved as the kernel overlay does with `redirect_dir=on`:
//! only the directory itself is copied up and renamed, and its `overlay.redirect` xattr records the
//! absolute path of its lower parts, which keep merging below it; a whiteout hides the old name.
//! Nothing of the subtree is copied, there is no EXDEV, and `diff` and exported layers stay exact
//! (the moved tree is D at the old path and A, with everything it shows, at the new one). A
//! directory with no lower parts moved onto a name a lower has is made opaque instead.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use layerfs_store::format;
use layerfs_sys::{self as sys, Component, Errno, FileType, RenameFlags, xattr};

use crate::copyup::CopyData;
use crate::index::{IndexEntry, UpperSlot};
use crate::node::Node;
use crate::overlay::{Overlay, OvlResult};

impl Overlay {
    /// RENAME of `parent/name` to `newparent/newname`.
    pub fn rename(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        newparent: u64,
        newname: &std::ffi::OsStr,
        flags: RenameFlags,
    ) -> OvlResult<()> {
        if flags.contains(RenameFlags::WHITEOUT)
            || flags.contains(RenameFlags::EXCHANGE | RenameFlags::NOREPLACE)
        {
            return Err(Errno::INVAL);
        }
        let exchange = flags.contains(RenameFlags::EXCHANGE);
        let name = Component::new(name)?;
        let newname = Component::new(newname)?;
        let dir = self.node(parent)?;
        let newdir = self.node(newparent)?;
        if !self.layers.has_upper() {
            return Err(Errno::ROFS);
        }
        // Copy-ups first, with no lock held.
        let src_entry = self.entry(&dir, &name)?.unwrap_or_default();
        let src_vis = src_entry.visible().ok_or(Errno::NOENT)?;
        let src = self.child_node(&dir, &name, &src_entry)?;
        let src_redirect = self.make_movable(&src, &dir, &name)?;
        let dst_entry = self.entry(&newdir, &newname)?.unwrap_or_default();
        let dst = match dst_entry.visible() {
            Some(_) => Some(self.child_node(&newdir, &newname, &dst_entry)?),
            None => None,
        };
        let dst_redirect = if exchange {
            self.make_movable(dst.as_ref().ok_or(Errno::NOENT)?, &newdir, &newname)?
        } else {
            None
        };
        if Arc::ptr_eq(&dir, &newdir) && name == newname {
            return Ok(());
        }
        let dir_up = self.copy_up(&dir, CopyData::All)?;
        let newdir_up = self.copy_up(&newdir, CopyData::All)?;
        // Lock both directories in node-id order.
        let (_g1, _g2);
        if dir.ino == newdir.ino {
            _g1 = Some(dir.op_lock());
            _g2 = None;
        } else if dir.ino < newdir.ino {
            _g1 = Some(dir.op_lock());
            _g2 = Some(newdir.op_lock());
        } else {
            _g2 = Some(newdir.op_lock());
            _g1 = Some(dir.op_lock());
        }
        self.ensure_index_locked(&dir)?;
        self.ensure_index_locked(&newdir)?;
        let get = |d: &Node, n: &Component| {
            d.read()
                .index
                .as_ref()
                .and_then(|i| i.get(n.as_bytes()).cloned())
                .unwrap_or_default()
        };
        let src_entry = get(&dir, &name);
        let dst_entry = get(&newdir, &newname);
        let src_vis = src_entry
            .visible()
            .filter(|v| v.kind == src_vis.kind)
            .ok_or(Errno::NOENT)?;
        let src_is_dir = src_vis.kind == FileType::Directory;
        let dst_vis = dst_entry.visible();
        if flags.contains(RenameFlags::NOREPLACE) && dst_vis.is_some() {
            return Err(Errno::EXIST);
        }
        if exchange {
            let dst_vis = dst_vis.ok_or(Errno::NOENT)?;
            sys::rename_at(
                dir_up.as_fd(),
                &name,
                newdir_up.as_fd(),
                &newname,
                RenameFlags::EXCHANGE,
            )?;
            let dst_is_dir = dst_vis.kind == FileType::Directory;
            if let Some(path) = &src_redirect {
                self.set_redirect(newdir_up.as_fd(), &newname, path)?;
                src.write().pinned = true;
            } else if src_is_dir && dst_entry.lower.is_some() {
                self.make_opaque(newdir_up.as_fd(), &newname)?;
            }
            if let Some(path) = &dst_redirect {
                self.set_redirect(dir_up.as_fd(), &name, path)?;
                if let Some(dst) = &dst {
                    dst.write().pinned = true;
                }
            } else if dst_is_dir && src_entry.lower.is_some() {
                self.make_opaque(dir_up.as_fd(), &name)?;
            }
            self.set_slot(&dir, &name, Some(UpperSlot::Present(dst_vis.kind)));
            self.set_slot(&newdir, &newname, Some(UpperSlot::Present(src_vis.kind)));
            src.write()
                .move_location(dir.ino, &name, newdir.ino, &newname);
            if let Some(dst) = &dst {
                dst.write()
                    .move_location(newdir.ino, &newname, dir.ino, &name);
            }
            return Ok(());
        }
        if let Some(dv) = dst_vis {
            let dst_is_dir = dv.kind == FileType::Directory;
            if src_is_dir && !dst_is_dir {
                return Err(Errno::NOTDIR);
            }
            if !src_is_dir && dst_is_dir {
                return Err(Errno::ISDIR);
            }
            let both_upper = matches!(src_entry.upper, Some(UpperSlot::Present(_)))
                && matches!(dst_entry.upper, Some(UpperSlot::Present(_)));
            if both_upper && dst.as_ref().is_some_and(|d| Arc::ptr_eq(d, &src)) {
                // Two upper names of one file: nothing to do (POSIX). A lower name of the same
                // hard-link group is a different entry and is replaced, as the kernel overlay does.
                return Ok(());
            }
            if !dst_is_dir {
                self.group_unlinked(&newdir, &newname, &dst_entry)?;
            }
            if dst_is_dir {
                let probe = self
                    .probe(&newdir, &newname, &dst_entry)?
                    .ok_or(Errno::NOENT)?;
                if self.child_index(&probe)?.is_empty_merged() {
                    if probe.vis.layer.is_upper() {
                        crate::layers::remove_children(
                            probe.fd.as_ref().ok_or(Errno::IO)?.as_fd(),
                        )?;
                    }
                } else if !probe.vis.layer.is_upper() || !probe.lower_dirs.is_empty() {
                    return Err(Errno::NOTEMPTY);
                }
                // A non-empty directory of the upper only: as on the kernel overlay, the
                // upper's own rename refuses it (below), after the redirect is set.
            }
        }
        // A whiteout at the target must go before a directory can take its place.
        if dst_entry.upper == Some(UpperSlot::Whiteout) {
            self.clear_unprivileged_whiteout(newdir_up.as_fd(), &newname)?;
            if src_is_dir {
                match sys::unlink_at(newdir_up.as_fd(), &newname, false) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let dst_obj = dst
            .as_ref()
            .filter(|_| dst_vis.is_some())
            .and_then(|d| self.object(d).ok());
        let whiteout_needed = src_entry.lower.is_some();
        let kernel_wh = self.layers.encoding == format::Encoding::Kernel;
        let mut rflags = RenameFlags::empty();
        if whiteout_needed && kernel_wh {
            rflags |= RenameFlags::WHITEOUT;
        }
        // The redirect goes on before the rename, as the kernel overlay sets it: a rename the
        // upper refuses (a non-empty target) leaves the same traces on both.
        if let Some(path) = &src_redirect {
            self.set_redirect(dir_up.as_fd(), &name, path)?;
        }
        sys::rename_at(dir_up.as_fd(), &name, newdir_up.as_fd(), &newname, rflags)?;
        if whiteout_needed && !kernel_wh {
            format::write_whiteout(dir_up.as_fd(), &name, self.layers.encoding)?;
        }
        if src_redirect.is_some() {
            src.write().pinned = true;
        } else if src_is_dir && dst_entry.lower.is_some() {
            self.make_opaque(newdir_up.as_fd(), &newname)?;
            let mut s = src.write();
            s.lower_dirs.clear();
            if let Some(layers) = s.evicted.as_mut() {
                *layers = Box::new([]);
            }
            s.index = None;
        }
        self.set_slot(&dir, &name, whiteout_needed.then_some(UpperSlot::Whiteout));
        self.set_slot(&newdir, &newname, Some(UpperSlot::Present(src_vis.kind)));
        match dst {
            Some(dst) if Arc::ptr_eq(&dst, &src) => {
                // The replaced name was another name of the moving file.
                let mut st = src.write();
                st.drop_location(newdir.ino, &newname);
                st.move_location(dir.ino, &name, newdir.ino, &newname);
            }
            Some(dst) => {
                src.write()
                    .move_location(dir.ino, &name, newdir.ino, &newname);
                self.name_removed(&dst, newdir.ino, &newname, dst_obj);
            }
            None => src
                .write()
                .move_location(dir.ino, &name, newdir.ino, &newname),
        }
        Ok(())
    }

    fn set_slot(&self, dir: &Node, name: &Component, slot: Option<UpperSlot>) {
        if let Some(idx) = dir.write().index.as_mut() {
            idx.set_upper(name.as_bytes(), slot);
        }
    }

    /// Marks `dir/name` (an upper directory) opaque, dropping whiteouts inside it.
    fn make_opaque(&self, dir: BorrowedFd<'_>, name: &Component) -> OvlResult<()> {
        let fd = sys::open_path_dir(dir, name)?;
        let before = sys::stat_fd(fd.as_fd())?;
        drop_whiteouts(fd.as_fd())?;
        format::set_opaque(fd.as_fd(), self.layers.encoding)?;
        sys::utimes_fd(fd.as_fd(), &times_of(&before))
    }

    /// The node of `name` in `dir` (the kernel has looked it up before a rename, so it exists;
    /// otherwise one is made).
    fn child_node(
        &self,
        dir: &Arc<Node>,
        name: &Component,
        entry: &IndexEntry,
    ) -> OvlResult<Arc<Node>> {
        if let Some(n) = self.existing_child(dir, name, entry)? {
            return Ok(n);
        }
        self.lookup_node(dir, name)?
            .map(|(n, _)| n)
            .ok_or(Errno::NOENT)
    }

    /// Gets `node` ready to move: copied up; for a directory with lower parts, returns the path
    /// of those lower parts (from the layer roots), to record as its redirect once moved.
    fn make_movable(
        &self,
        node: &Arc<Node>,
        dir: &Arc<Node>,
        name: &Component,
    ) -> OvlResult<Option<Vec<u8>>> {
        self.ensure_upper_name(node, dir, name)?;
        if !node.is_dir || self.dir_fds(node)?.1.is_empty() {
            return Ok(None);
        }
        self.lower_path(node).map(Some)
    }

    /// Where the lower parts of directory `node` live: its own redirect if it has one, else its
    /// parent's lower path plus its name. Absolute, `/`-separated.
    fn lower_path(&self, node: &Arc<Node>) -> OvlResult<Vec<u8>> {
        let (parent, name) = node.location();
        let upper = self.dir_fds(node)?.0;
        let Some(name) = name else {
            return Ok(Vec::new());
        };
        let redirect =
            upper.and_then(|u| xattr::get(u.as_fd(), self.layers.encoding.redirect_xattr()).ok());
        if let Some(r) = &redirect
            && r.starts_with(b"/")
        {
            return Ok(r.clone());
        }
        let mut path = self.lower_path(&self.node(parent)?)?;
        path.push(b'/');
        path.extend_from_slice(redirect.as_deref().unwrap_or(name.as_bytes()));
        Ok(path)
    }

    /// Records on the moved upper directory `dir/name` where its lower parts are (the kernel
    /// overlay's `redirect` xattr, absolute form).
    fn set_redirect(&self, dir: BorrowedFd<'_>, name: &Component, path: &[u8]) -> OvlResult<()> {
        let fd = sys::open_path_dir(dir, name)?;
        xattr::set(fd.as_fd(), self.layers.encoding.redirect_xattr(), path, 0)
    }
}

use std::os::unix::ffi::OsStrExt;

/// The atime/mtime of `st`, to put back.
fn times_of(st: &sys::Stat) -> sys::Timestamps {
    sys::Timestamps {
        last_access: sys::atime_of(st),
        last_modification: sys::mtime_of(st),
    }
}

/// Removes every whiteout (char 0/0, `.wh.*` files, opaque markers) directly inside `dir`.
fn drop_whiteouts(dir: BorrowedFd<'_>) -> OvlResult<()> {
    for entry in sys::dir::read_all(dir)? {
        let bytes = entry.name.as_bytes();
        let Ok(name) = Component::new(&entry.name) else {
            continue;
        };
        let is_wh = match format::classify_name(bytes) {
            format::NameKind::Plain => {
                entry.kind == FileType::CharacterDevice
                    && sys::stat_at(dir, &name).is_ok_and(|st| format::is_chardev_whiteout(&st))
            }
            _ => true,
        };
        if is_wh {
            sys::unlink_at(dir, &name, false)?;
        }
    }
    Ok(())
}
