//! RENAME (plain, `RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
//!
//! A directory that has lower parts is moved by first *materializing* it: its whole merged subtree
//! is copied into the upper dir (reflinks where the filesystem can), whiteouts inside are dropped
//! and it is marked opaque. It then lives in the upper alone and renames like any upper directory;
//! a whiteout at the old name hides the lower original. No EXDEV, and `diff` and exported layers
//! stay exact (the moved tree is D at the old path and A at the new one).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use layerfs_store::format;
use layerfs_sys::{self as sys, Component, Errno, FileType, RenameFlags};

use crate::copyup::CopyData;
use crate::index::{DirIndex, IndexEntry, LayerDir, UpperSlot};
use crate::layers::LayerIdx;
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
        self.make_movable(&src)?;
        let dst_entry = self.entry(&newdir, &newname)?.unwrap_or_default();
        let dst = match dst_entry.visible() {
            Some(_) => Some(self.child_node(&newdir, &newname, &dst_entry)?),
            None => None,
        };
        if exchange {
            self.make_movable(dst.as_ref().ok_or(Errno::NOENT)?)?;
        }
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
            if src_is_dir && dst_entry.lower.is_some() {
                self.make_opaque(newdir_up.as_fd(), &newname)?;
            }
            if dst_is_dir && src_entry.lower.is_some() {
                self.make_opaque(dir_up.as_fd(), &name)?;
            }
            self.set_slot(&dir, &name, Some(UpperSlot::Present(dst_vis.kind)));
            self.set_slot(&newdir, &newname, Some(UpperSlot::Present(src_vis.kind)));
            Self::relocate(&src, newdir.ino, &newname);
            if let Some(dst) = &dst {
                Self::relocate(dst, dir.ino, &name);
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
            if let Some(d) = &dst {
                if Arc::ptr_eq(d, &src) {
                    // Two names of one file: nothing to do.
                    return Ok(());
                }
            }
            if !dst_is_dir {
                self.group_unlinked(&newdir, &newname, &dst_entry)?;
            }
            if dst_is_dir {
                let probe = self
                    .probe(&newdir, &newname, &dst_entry)?
                    .ok_or(Errno::NOENT)?;
                if !self.child_index(&probe)?.is_empty_merged() {
                    return Err(Errno::NOTEMPTY);
                }
                if probe.vis.layer.is_upper() {
                    crate::layers::remove_children(probe.fd.as_fd())?;
                }
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
        let whiteout_needed = src_entry.lower.is_some();
        let kernel_wh = self.layers.encoding == format::Encoding::Kernel;
        let mut rflags = RenameFlags::empty();
        if whiteout_needed && kernel_wh {
            rflags |= RenameFlags::WHITEOUT;
        }
        sys::rename_at(dir_up.as_fd(), &name, newdir_up.as_fd(), &newname, rflags)?;
        if whiteout_needed && !kernel_wh {
            format::write_whiteout(dir_up.as_fd(), &name, self.layers.encoding)?;
        }
        if src_is_dir && dst_entry.lower.is_some() {
            self.make_opaque(newdir_up.as_fd(), &newname)?;
            let mut s = src.write();
            s.lower_dirs.clear();
            s.lower = None;
            s.index = None;
        }
        self.set_slot(&dir, &name, whiteout_needed.then_some(UpperSlot::Whiteout));
        self.set_slot(&newdir, &newname, Some(UpperSlot::Present(src_vis.kind)));
        Self::relocate(&src, newdir.ino, &newname);
        if let Some(dst) = dst {
            let mut s = dst.write();
            s.unlinked = true;
        }
        Ok(())
    }

    fn set_slot(&self, dir: &Node, name: &Component, slot: Option<UpperSlot>) {
        if let Some(idx) = dir.write().index.as_mut() {
            idx.set_upper(name.as_bytes(), slot);
        }
    }

    fn relocate(node: &Node, parent: u64, name: &Component) {
        let mut s = node.write();
        s.parent = parent;
        s.name = Some(name.clone());
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

    /// Gets `node` ready to move: copied up, and for a directory with lower parts, materialized.
    fn make_movable(&self, node: &Arc<Node>) -> OvlResult<()> {
        let upper = self.copy_up(node, CopyData::All)?;
        if !node.is_dir {
            return Ok(());
        }
        let lowers = node.read().lower_dirs.clone();
        if lowers.is_empty() {
            return Ok(());
        }
        let _op = node.op_lock();
        let before = sys::stat_fd(upper.as_fd())?;
        self.materialize(upper.as_fd(), &lowers, node.ino)?;
        sys::utimes_fd(upper.as_fd(), &times_of(&before))?;
        let mut s = node.write();
        s.lower_dirs.clear();
        s.lower = None;
        s.index = None;
        Ok(())
    }

    /// Copies every lower-only entry of the merged directory (`upper` + `lowers`) into `upper`,
    /// recursively, then makes `upper` opaque. Nodes the kernel holds inside are pointed at the
    /// copies. `dir_ino` is the node id of the directory.
    fn materialize(
        &self,
        upper: BorrowedFd<'_>,
        lowers: &[(LayerIdx, Arc<OwnedFd>)],
        dir_ino: u64,
    ) -> OvlResult<()> {
        let layer_dirs: Vec<LayerDir<'_>> = lowers
            .iter()
            .map(|(l, fd)| LayerDir {
                layer: *l,
                fd: fd.as_fd(),
            })
            .collect();
        let index = DirIndex::build(Some(upper), &layer_dirs)?;
        let lower_fd = |layer: LayerIdx| {
            lowers
                .iter()
                .find(|(l, _)| *l == layer)
                .map(|(_, fd)| fd.clone())
        };
        for (name, vis) in index.visible_sorted() {
            let name = Component::new(std::ffi::OsStr::from_bytes(&name))?;
            let Some(entry) = index.get(name.as_bytes()) else {
                continue;
            };
            let child_lowers = |out: &mut Vec<(LayerIdx, Arc<OwnedFd>)>| -> OvlResult<()> {
                if let Some(l) = entry
                    .lower
                    .as_ref()
                    .filter(|l| l.kind == FileType::Directory)
                {
                    for layer in std::iter::once(l.layer).chain(l.more.iter().copied()) {
                        let Some(parent) = lower_fd(layer) else {
                            continue;
                        };
                        let fd = sys::open_path_dir(parent.as_fd(), &name)?;
                        let opaque = format::dir_mark(fd.as_fd()) == format::DirMark::Opaque;
                        out.push((layer, Arc::new(fd)));
                        if opaque {
                            break;
                        }
                    }
                }
                Ok(())
            };
            if vis.layer.is_upper() {
                if vis.kind == FileType::Directory {
                    let fd = sys::open_path_dir(upper, &name)?;
                    if format::dir_mark(fd.as_fd()) != format::DirMark::Opaque {
                        let mut sub = Vec::new();
                        child_lowers(&mut sub)?;
                        if !sub.is_empty() {
                            let ino = self
                                .layers
                                .xino(sub[0].0, sys::stat_fd(sub[0].1.as_fd())?.st_ino);
                            let before = sys::stat_fd(fd.as_fd())?;
                            self.materialize(fd.as_fd(), &sub, ino)?;
                            sys::utimes_fd(fd.as_fd(), &times_of(&before))?;
                            self.repoint(dir_ino, &name, fd.try_clone().map_err(|_| Errno::IO)?)?;
                        }
                    }
                }
                continue;
            }
            let parent = lower_fd(vis.layer).ok_or(Errno::IO)?;
            let src = sys::open_path(parent.as_fd(), &name)?;
            let st = sys::stat_fd(src.as_fd())?;
            let ino = self.layers.xino(vis.layer, st.st_ino);
            let group = if vis.kind == FileType::Directory {
                None
            } else {
                self.ensure_group_entry(ino, src.as_fd(), &st)?
            };
            let copy = match group {
                Some(group) => {
                    sys::link_fd(group.as_fd(), upper, &name)?;
                    sys::open_path(upper, &name)?
                }
                None => self.copy_object(src.as_fd(), &st, ino, upper, &name, CopyData::All)?,
            };
            if vis.kind == FileType::Directory {
                let mut sub = Vec::new();
                child_lowers(&mut sub)?;
                self.materialize(copy.as_fd(), &sub, ino)?;
                sys::utimes_fd(copy.as_fd(), &times_of(&st))?;
            }
            self.repoint(dir_ino, &name, copy)?;
        }
        drop_whiteouts(upper)?;
        format::set_opaque(upper, self.layers.encoding)
    }

    /// Points the node of `name` in directory `dir_ino` (if the kernel holds one) at its upper copy.
    fn repoint(&self, dir_ino: u64, name: &Component, fd: OwnedFd) -> OvlResult<()> {
        let Some(dir) = self.nodes.get(dir_ino) else {
            return Ok(());
        };
        let ino = {
            let st = sys::stat_fd(fd.as_fd())?;
            let origin = sys::xattr::get(fd.as_fd(), self.origin_xattr()).ok();
            origin
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(u64::from_le_bytes)
                .unwrap_or(st.st_ino)
        };
        let _ = &dir;
        if let Some(child) = self.nodes.get(ino) {
            let mut s = child.write();
            if s.parent == dir_ino && s.name.as_ref() == Some(name) {
                s.upper = Some(Arc::new(fd));
                if child.is_dir {
                    s.lower_dirs.clear();
                    s.lower = None;
                    s.index = None;
                }
            }
        }
        Ok(())
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
