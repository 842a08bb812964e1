//! Operations that change names: create, mknod, mkdir, symlink, link, unlink, rmdir.
//! (`rename` lives in [`crate::rename`].)
//!
//! Rules (reference/overlay-semantics.md 3, 4, 6, 18): a whiteout is written only when a lower
//! layer has the name; creating over a whiteout replaces it atomically (built in the work dir, then
//! exchanged); a directory created over a whiteout is opaque; new objects belong to the caller.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::MutexGuard;

use layerfs_store::format;
use layerfs_sys::{self as sys, Component, Errno, FileType, Mode, OFlags};

use crate::acl;
use crate::copyup::CopyData;
use crate::index::{DirIndex, IndexEntry, LayerDir, UpperSlot};
use crate::layers::LayerIdx;
use crate::node::Node;
use crate::overlay::{Attr, Overlay, OvlResult};

/// Who asks: new objects get this owner.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// fsuid of the calling process.
    pub uid: u32,
    /// fsgid of the calling process.
    pub gid: u32,
    /// The caller's umask, unapplied (FUSE_DONT_MASK); 0 where the request carries none.
    pub umask: u32,
}

/// What to create.
#[derive(Debug)]
pub enum NewObject<'a> {
    /// A regular file, opened with these flags.
    File { mode: u32, flags: OFlags },
    /// A directory.
    Dir { mode: u32 },
    /// A device, FIFO or socket.
    Node {
        kind: FileType,
        mode: u32,
        rdev: u64,
    },
    /// A symlink.
    Symlink { target: &'a [u8] },
}

impl NewObject<'_> {
    /// The same object with its mode passed through `f` (a symlink has none).
    fn with_mode(self, f: impl FnOnce(u32) -> u32) -> Self {
        match self {
            NewObject::File { mode, flags } => NewObject::File {
                mode: f(mode),
                flags,
            },
            NewObject::Dir { mode } => NewObject::Dir { mode: f(mode) },
            NewObject::Node { kind, mode, rdev } => NewObject::Node {
                kind,
                mode: f(mode),
                rdev,
            },
            NewObject::Symlink { target } => NewObject::Symlink { target },
        }
    }
}

/// Sets the ACLs a new object built in `work/` inherits (`fd`: its `O_PATH` fd).
fn set_inherited_acls(fd: BorrowedFd<'_>, inh: &acl::Inherited) -> OvlResult<()> {
    for (name, value) in [
        (acl::ACCESS_ACL, &inh.access),
        (acl::DEFAULT_ACL, &inh.default),
    ] {
        if let Some(value) = value {
            sys::xattr::set(fd, OsStr::new(name), value, 0)?;
        }
    }
    Ok(())
}

/// Owner and set-id bits (`setid`, which the chown clears) of a file just created, through the
/// fd it was created with.
fn finish_new_file(io: BorrowedFd<'_>, uid: u32, gid: u32, setid: u32) -> OvlResult<()> {
    sys::chown_open(io, Some(uid), Some(gid))?;
    if setid != 0 {
        // The permission bits stay as made: under a default ACL they hold its mask.
        let perms = sys::stat_fd(io)?.st_mode & 0o1777;
        sys::chmod_open(io, Mode::from_raw_mode(perms | setid))?;
    }
    Ok(())
}

/// A directory ready for a change: its upper fd, its op lock, and the entry of the name.
pub(crate) struct Prepared<'a> {
    pub upper: Arc<OwnedFd>,
    pub _guard: MutexGuard<'a, ()>,
    pub entry: IndexEntry,
}

/// The object at a name about to be removed.
#[derive(Default)]
pub(crate) struct AtName {
    /// Its node, if the kernel knows the object under this name.
    pub node: Option<Arc<Node>>,
    /// It has a single link, so it is in no hard-link group (nothing to count down).
    pub single_link: bool,
}

impl Overlay {
    /// Copies `dir` up, takes its op lock, and reads the entry of `name`.
    pub(crate) fn prepare<'a>(
        &self,
        dir: &'a Arc<Node>,
        name: &Component,
    ) -> OvlResult<Prepared<'a>> {
        if !dir.is_dir {
            return Err(Errno::NOTDIR);
        }
        let upper = self.copy_up(dir, CopyData::All)?;
        let guard = dir.op_lock();
        self.ensure_index_locked(dir)?;
        let entry = dir
            .read()
            .index
            .as_ref()
            .and_then(|i| i.get(name.as_bytes()).cloned());
        Ok(Prepared {
            upper,
            _guard: guard,
            entry: entry.unwrap_or_default(),
        })
    }

    /// CREATE, MKNOD, MKDIR, SYMLINK: makes `name` in `parent`. For a file, also returns the fd
    /// opened with the requested flags.
    pub fn create_object(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        obj: NewObject<'_>,
        caller: Caller,
    ) -> OvlResult<(Attr, Option<OwnedFd>)> {
        let name = Component::new(name)?;
        if let NewObject::Node {
            kind: FileType::CharacterDevice,
            rdev: 0,
            ..
        } = obj
        {
            // A user-made char 0/0 would read as a whiteout.
            return Err(Errno::PERM);
        }
        let dir = self.node(parent)?;
        let p = self.prepare(&dir, &name)?;
        if p.entry.visible().is_some() {
            return Err(Errno::EXIST);
        }
        let dir_st = sys::stat_fd(p.upper.as_fd())?;
        let gid = if dir_st.st_mode & 0o2000 != 0 {
            dir_st.st_gid
        } else {
            caller.gid
        };
        let over_whiteout = p.entry.upper == Some(UpperSlot::Whiteout);
        // The parent's default ACL matters only where the umask would take bits away or the
        // object is built in work/ (most creates by tar and cp ask for no bit the umask holds).
        let mode = match &obj {
            NewObject::File { mode, .. }
            | NewObject::Dir { mode }
            | NewObject::Node { mode, .. } => *mode,
            NewObject::Symlink { .. } => 0,
        };
        let parent_acl = (over_whiteout || mode & caller.umask & 0o777 != 0)
            .then(|| sys::xattr::get(p.upper.as_fd(), OsStr::new(acl::DEFAULT_ACL)).ok())
            .flatten();
        let obj = obj.with_mode(|m| acl::create_mode(m, caller.umask, parent_acl.as_deref()));
        // Built in work/, the object is out of reach of the parent's default ACL: set it by hand.
        let inherited = match (&parent_acl, &obj) {
            (Some(dacl), NewObject::File { mode, .. } | NewObject::Node { mode, .. })
                if over_whiteout =>
            {
                acl::inherit(dacl, *mode, false)
            }
            (Some(dacl), NewObject::Dir { mode }) if over_whiteout => {
                acl::inherit(dacl, *mode, true)
            }
            _ => None,
        };
        // Over a whiteout: build in work/ and exchange. Otherwise straight in the upper dir.
        let (target_dir, target_name) = if over_whiteout {
            (self.layers.work()?, self.tmp_name())
        } else {
            (p.upper.as_fd(), name.clone())
        };
        let mut io_fd = None;
        let kind = match &obj {
            NewObject::File { mode, flags } => {
                let access = *flags
                    & (OFlags::RWMODE
                        | OFlags::APPEND
                        | OFlags::SYNC
                        | OFlags::DSYNC
                        | OFlags::NONBLOCK
                        | OFlags::DIRECT);
                let fd = sys::open_at(
                    target_dir,
                    &target_name,
                    OFlags::CREATE | OFlags::EXCL | access,
                    Mode::from_raw_mode(*mode & 0o7777),
                )?;
                io_fd = Some(fd);
                FileType::RegularFile
            }
            NewObject::Dir { mode } => {
                sys::mkdir_at(
                    target_dir,
                    &target_name,
                    Mode::from_raw_mode(*mode & 0o7777),
                )?;
                FileType::Directory
            }
            NewObject::Node { kind, mode, rdev } => {
                sys::mknod_at(
                    target_dir,
                    &target_name,
                    *kind,
                    Mode::from_raw_mode(*mode & 0o7777),
                    *rdev,
                )?;
                *kind
            }
            NewObject::Symlink { target } => {
                sys::symlink_at(target, target_dir, &target_name)?;
                FileType::Symlink
            }
        };
        let setid = match &obj {
            NewObject::File { mode, .. } | NewObject::Node { mode, .. } => mode & 0o6000,
            // mkdir(2) ignores S_ISGID in its mode; a setgid parent passes it on.
            NewObject::Dir { .. } => dir_st.st_mode & 0o2000,
            NewObject::Symlink { .. } => 0,
        };
        // A file is finished through the fd it was created with; anything else through an
        // `O_PATH` fd, which the node then keeps.
        let finished = match &io_fd {
            Some(io) => finish_new_file(io.as_fd(), caller.uid, gid, setid).map(|()| None),
            None => self
                .finish_new(
                    target_dir,
                    &target_name,
                    kind,
                    caller.uid,
                    gid,
                    setid,
                    over_whiteout,
                )
                .map(Some),
        }
        .and_then(|fd| {
            if let Some(inh) = &inherited {
                let target = fd.as_ref().or(io_fd.as_ref()).ok_or(Errno::IO)?;
                set_inherited_acls(target.as_fd(), inh)?;
            }
            Ok(fd)
        });
        let fd = match finished {
            Ok(fd) => fd,
            Err(e) => {
                let _ = crate::layers::remove_tree(target_dir, &target_name);
                return Err(e);
            }
        };
        if over_whiteout
            && let Err(e) =
                self.publish_over_whiteout(target_dir, &target_name, p.upper.as_fd(), &name)
        {
            let _ = crate::layers::remove_tree(target_dir, &target_name);
            return Err(e);
        }
        let kind_slot = Some(UpperSlot::Present(kind));
        if let Some(idx) = dir.write().index.as_mut() {
            idx.set_upper(name.as_bytes(), kind_slot);
        }
        let st = sys::stat_fd(fd.as_ref().or(io_fd.as_ref()).ok_or(Errno::IO)?.as_fd())?;
        let fd = fd.map(Arc::new);
        let probe = crate::overlay::Probe {
            vis: crate::index::Visible {
                layer: crate::layers::LayerIdx::UPPER,
                kind,
            },
            fd,
            ino: self.layers.xino(crate::layers::LayerIdx::UPPER, st.st_ino),
            st,
            lower_dirs: Vec::new(),
            group: false,
            pinned: false,
            plain_lowers: false,
        };
        let (node, attr) = self.node_from_probe(&dir, &name, probe);
        self.nodes.add_lookup(&node);
        Ok((attr, io_fd))
    }

    /// Owner, set-id bits (`setid`, which the chown clears) and the opaque mark of a new object;
    /// returns its `O_PATH` fd.
    #[allow(clippy::too_many_arguments)]
    fn finish_new(
        &self,
        dir: BorrowedFd<'_>,
        name: &Component,
        kind: FileType,
        uid: u32,
        gid: u32,
        setid: u32,
        opaque: bool,
    ) -> OvlResult<OwnedFd> {
        let fd = sys::open_path(dir, name)?;
        sys::chown_fd(fd.as_fd(), Some(uid), Some(gid))?;
        if setid != 0 {
            // The permission bits stay as made: under a default ACL they hold its mask.
            let perms = sys::stat_fd(fd.as_fd())?.st_mode & 0o1777;
            sys::chmod_fd(fd.as_fd(), Mode::from_raw_mode(perms | setid))?;
        }
        if kind == FileType::Directory && opaque {
            format::set_opaque(fd.as_fd(), self.layers.encoding)?;
        }
        Ok(fd)
    }

    /// Moves `work/tmp` onto the whiteout at `dir/name`.
    fn publish_over_whiteout(
        &self,
        work: BorrowedFd<'_>,
        tmp: &Component,
        dir: BorrowedFd<'_>,
        name: &Component,
    ) -> OvlResult<()> {
        self.clear_unprivileged_whiteout(dir, name)?;
        match sys::rename_at(work, tmp, dir, name, sys::RenameFlags::EXCHANGE) {
            Ok(()) => sys::unlink_at(work, tmp, false),
            Err(Errno::NOENT) => sys::rename_at(work, tmp, dir, name, sys::RenameFlags::NOREPLACE),
            Err(e) => Err(e),
        }
    }

    /// LINK: a new name `newname` in `newparent` for node `ino`.
    pub fn link(&self, ino: u64, newparent: u64, newname: &std::ffi::OsStr) -> OvlResult<Attr> {
        let name = Component::new(newname)?;
        let node = self.node(ino)?;
        if node.is_dir {
            return Err(Errno::PERM);
        }
        let src = self.copy_up(&node, CopyData::All)?;
        let dir = self.node(newparent)?;
        let p = self.prepare(&dir, &name)?;
        if p.entry.visible().is_some() {
            return Err(Errno::EXIST);
        }
        let kind = sys::file_type(&sys::stat_fd(src.as_fd())?);
        if p.entry.upper == Some(UpperSlot::Whiteout) {
            let work = self.layers.work()?;
            let tmp = self.tmp_name();
            sys::link_fd(src.as_fd(), work, &tmp)?;
            if let Err(e) = self.publish_over_whiteout(work, &tmp, p.upper.as_fd(), &name) {
                let _ = sys::unlink_at(work, &tmp, false);
                return Err(e);
            }
        } else {
            sys::link_fd(src.as_fd(), p.upper.as_fd(), &name)?;
        }
        if let Some(idx) = dir.write().index.as_mut() {
            idx.set_upper(name.as_bytes(), Some(UpperSlot::Present(kind)));
        }
        self.adjust_group_count(src.as_fd(), 1)?;
        {
            let mut s = node.write();
            if s.unlinked {
                // An `O_TMPFILE` file (the kernel links no other unlinked file): this is its
                // name now.
                s.unlinked = false;
                s.orphan = None;
                s.parent = dir.ino;
                s.name = Some(name.clone());
            } else {
                s.add_alias(dir.ino, &name);
            }
        }
        self.nodes.add_lookup(&node);
        self.attr(&node)
    }

    /// TMPFILE (`open(dir, O_TMPFILE)`): an unnamed file in the upper copy of `parent`, owned by
    /// the caller, with the mode a file created there would get; returns its attributes (link
    /// count 0) and its fd opened with `flags`. [`Overlay::link`] names it.
    pub fn create_tmpfile(
        &self,
        parent: u64,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> OvlResult<(Attr, OwnedFd)> {
        let dir = self.node(parent)?;
        if !dir.is_dir {
            return Err(Errno::NOTDIR);
        }
        let upper = self.copy_up(&dir, CopyData::All)?;
        let dir_st = sys::stat_fd(upper.as_fd())?;
        let gid = if dir_st.st_mode & 0o2000 != 0 {
            dir_st.st_gid
        } else {
            caller.gid
        };
        // Made in the upper dir itself, the file inherits its default ACL from the filesystem;
        // the ACL only decides whether the umask applies.
        let parent_acl = (mode & caller.umask & 0o777 != 0)
            .then(|| sys::xattr::get(upper.as_fd(), OsStr::new(acl::DEFAULT_ACL)).ok())
            .flatten();
        let mode = acl::create_mode(mode, caller.umask, parent_acl.as_deref());
        let access = OFlags::from_bits_retain(flags as _)
            & (OFlags::RWMODE | OFlags::APPEND | OFlags::SYNC | OFlags::DSYNC | OFlags::DIRECT);
        let fd = sys::open_tmpfile(upper.as_fd(), access, Mode::from_raw_mode(mode & 0o777))?;
        sys::chown_fd(fd.as_fd(), Some(caller.uid), Some(gid))?;
        if mode & 0o6000 != 0 {
            let perms = sys::stat_fd(fd.as_fd())?.st_mode & 0o1777;
            sys::chmod_fd(fd.as_fd(), Mode::from_raw_mode(perms | (mode & 0o6000)))?;
        }
        let st = sys::stat_fd(fd.as_fd())?;
        let ino = self.layers.xino(crate::layers::LayerIdx::UPPER, st.st_ino);
        let orphan = Arc::new(
            fd.try_clone()
                .map_err(<Errno as crate::overlay::ErrnoExt>::from_io_error_or_io)?,
        );
        let state = crate::node::NodeState {
            unlinked: true,
            orphan: Some(orphan),
            ..crate::node::NodeState::new(dir.ino, None, crate::layers::LayerIdx::UPPER)
        };
        let node = crate::node::Node::new(ino, false, state);
        let (node, _) = self.nodes.insert_or_get(node, |_| false);
        self.nodes.add_lookup(&node);
        let attr = self.attr_from(&node, st, Some(fd.as_fd()));
        Ok((attr, fd))
    }

    /// The existing node (if the kernel knows one) of `name` in `dir`, whose entry is `entry`.
    pub(crate) fn existing_child(
        &self,
        dir: &Node,
        name: &Component,
        entry: &IndexEntry,
    ) -> OvlResult<Option<Arc<Node>>> {
        Ok(self.at_name(dir, name, entry)?.node)
    }

    /// What removing `name` from `dir` needs to know of the object there.
    pub(crate) fn at_name(
        &self,
        dir: &Node,
        name: &Component,
        entry: &IndexEntry,
    ) -> OvlResult<AtName> {
        let Some(vis) = entry.visible() else {
            return Ok(AtName::default());
        };
        let node_at = |ino| {
            self.nodes
                .get(ino)
                .filter(|n| n.read().is_at(dir.ino, name))
        };
        if vis.layer.is_upper() && vis.kind != FileType::Directory {
            // An upper file with one link: its stat says all a probe would. A file made in the
            // upper has the upper inode number as its node id, found without reading anything
            // more; a copied-up one has its origin's, read by name.
            let parent = self.dir_fd_in(dir, vis.layer)?;
            let st = sys::stat_at(parent.as_fd(), name)?;
            if st.st_nlink <= 1 && sys::file_type(&st) != FileType::Directory {
                let node = match node_at(self.layers.xino(LayerIdx::UPPER, st.st_ino)) {
                    Some(node) => Some(node),
                    None => {
                        let origin = crate::overlay::Origin::Named(parent.as_fd(), name);
                        node_at(self.ino_of(vis, origin, &st, &[])?)
                    }
                };
                return Ok(AtName {
                    node,
                    single_link: true,
                });
            }
        }
        let Some(probe) = self.probe(dir, name, entry)? else {
            return Ok(AtName::default());
        };
        Ok(AtName {
            node: node_at(probe.ino),
            // The stat of the name itself, unless it was replaced by a group's (more links).
            single_link: !probe.group && probe.st.st_nlink <= 1,
        })
    }

    /// Bookkeeping after the name `dir/name` of `child` went away: the node is unlinked once it
    /// has no known name left and no link in the upper either.
    pub(crate) fn name_removed(
        &self,
        child: &Node,
        dir: u64,
        name: &Component,
        object: Option<(LayerIdx, Arc<OwnedFd>)>,
    ) {
        let mut s = child.write();
        if s.drop_location(dir, name) {
            // No known name left: the node lives on for its open files only (a hard link elsewhere
            // that the kernel looks up later gets a fresh node).
            s.unlinked = true;
            s.orphan = object.map(|(_, fd)| fd);
        }
    }

    /// UNLINK.
    pub fn unlink(&self, parent: u64, name: &std::ffi::OsStr) -> OvlResult<()> {
        let name = Component::new(name)?;
        let dir = self.node(parent)?;
        let p = self.prepare(&dir, &name)?;
        let vis = p.entry.visible().ok_or(Errno::NOENT)?;
        if vis.kind == FileType::Directory {
            return Err(Errno::ISDIR);
        }
        let AtName {
            node: child,
            single_link,
        } = self.at_name(&dir, &name, &p.entry)?;
        let child_obj = child.as_ref().and_then(|c| self.object(c).ok());
        if !single_link {
            self.group_unlinked(&dir, &name, &p.entry)?;
        }
        self.remove_entry(&dir, &p, &name, false)?;
        if let Some(child) = child {
            self.name_removed(&child, dir.ino, &name, child_obj);
        }
        Ok(())
    }

    /// Removes the upper entry of `name` (if any) and writes a whiteout if a lower has the name.
    fn remove_entry(
        &self,
        dir: &Node,
        p: &Prepared<'_>,
        name: &Component,
        is_dir: bool,
    ) -> OvlResult<()> {
        if let Some(UpperSlot::Present(_)) = p.entry.upper {
            sys::unlink_at(p.upper.as_fd(), name, is_dir)?;
        }
        let slot = if p.entry.lower.is_some() {
            if p.entry.upper != Some(UpperSlot::Whiteout) {
                format::write_whiteout(p.upper.as_fd(), name, self.layers.encoding)?;
            }
            Some(UpperSlot::Whiteout)
        } else {
            None
        };
        if let Some(idx) = dir.write().index.as_mut() {
            idx.set_upper(name.as_bytes(), slot);
        }
        Ok(())
    }

    /// The merged index of the child directory behind a probe (without making a node).
    pub(crate) fn child_index(&self, probe: &crate::overlay::Probe) -> OvlResult<DirIndex> {
        let fd = probe.fd.as_ref().ok_or(Errno::IO)?;
        let upper = probe.vis.layer.is_upper().then(|| fd.as_fd());
        let lowers: Vec<LayerDir<'_>> = probe
            .lower_dirs
            .iter()
            .map(|(l, fd)| LayerDir {
                layer: *l,
                fd: fd.as_fd(),
                mark: probe.plain_lowers.then_some(format::DirMark::Plain),
            })
            .collect();
        DirIndex::build(upper, &lowers)
    }

    /// RMDIR: the merged directory must be empty; its upper copy (holding only whiteouts) goes.
    pub fn rmdir(&self, parent: u64, name: &std::ffi::OsStr) -> OvlResult<()> {
        let name = Component::new(name)?;
        let dir = self.node(parent)?;
        let p = self.prepare(&dir, &name)?;
        let vis = p.entry.visible().ok_or(Errno::NOENT)?;
        if vis.kind != FileType::Directory {
            return Err(Errno::NOTDIR);
        }
        let probe = self.probe(&dir, &name, &p.entry)?.ok_or(Errno::NOENT)?;
        if !self.child_index(&probe)?.is_empty_merged() {
            return Err(Errno::NOTEMPTY);
        }
        if probe.vis.layer.is_upper() {
            crate::layers::remove_children(probe.fd.as_ref().ok_or(Errno::IO)?.as_fd())?;
        }
        let child = self.nodes.get(probe.ino).filter(|n| {
            let s = n.read();
            s.parent == dir.ino && s.name.as_ref() == Some(&name)
        });
        if let Some(child) = &child {
            // Files still open on the directory keep using its fds once it has no name to reopen
            // them by: get them back now if the fd cache closed them (it cannot close them again
            // while this directory's op_lock is held, nor once the child is unlinked).
            self.dir_fds(child)?;
        }
        self.remove_entry(&dir, &p, &name, true)?;
        if let Some(child) = child {
            let mut s = child.write();
            s.unlinked = true;
            s.index = Some(Box::default());
        }
        Ok(())
    }
}
