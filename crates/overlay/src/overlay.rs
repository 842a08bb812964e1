//! [`Overlay`]: the union itself — resolution of names top-down through the layers, attributes,
//! and the shared helpers the operation modules build on. Every public method is fallible with a
//! raw errno and never panics; the FUSE front only translates.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use layerfs_store::format::{self, DirMark};
use layerfs_sys::{self as sys, Component, Errno, FileType, Stat, xattr};

use crate::dirfds::DirFdCache;
use crate::handles::{HandleTable, Listings};
use crate::index::{DirIndex, IndexEntry, LayerDir, Visible};
use crate::layers::{LayerIdx, Layers, OverlayConfig};
use crate::node::{Found, Light, Node, NodeState, NodeTable, ROOT};
use crate::stats::Stats;

/// How many directory indexes are kept in memory (each is rebuilt from disk on demand).
const INDEX_CACHE: usize = 512;

/// Result of an overlay operation: a raw errno on failure.
pub type OvlResult<T> = Result<T, Errno>;

/// The attributes of a merged object, as the mount shows them.
#[derive(Debug, Clone)]
pub struct Attr {
    /// `st_ino` (= FUSE node id).
    pub ino: u64,
    /// The backing object's stat, with `st_ino` and `st_nlink` already adjusted.
    pub st: Stat,
}

/// Where a node's backing object is ([`Overlay::object_at`]).
pub(crate) enum ObjectAt {
    /// Its own `O_PATH` fd: a directory, an unlinked file, a hard-link group member.
    Fd(Arc<OwnedFd>),
    /// Its name in this directory of its layer.
    Named(Arc<OwnedFd>, Component),
}

/// The union filesystem of one mount.
#[derive(Debug)]
pub struct Overlay {
    /// The layers; immutable.
    pub(crate) layers: Layers,
    /// Inode table.
    pub(crate) nodes: NodeTable,
    /// Open files.
    pub(crate) handles: HandleTable,
    /// Directory listings being read.
    pub(crate) listings: Listings,
    /// Counter for unique temporary names in the work dir.
    tmp_counter: AtomicU64,
    /// Directories with a built index, least recently built first. Own lock, a leaf.
    index_lru: std::sync::Mutex<std::collections::VecDeque<u64>>,
    /// Directories holding fds, to keep their number bounded. Own lock, a leaf.
    pub(crate) dir_fd_cache: DirFdCache,
    /// Request and event counters.
    pub stats: Stats,
}

/// The object found under a name, opened, before it becomes (or joins) a node.
pub(crate) struct Probe {
    pub vis: Visible,
    /// The object, opened (`None` for a lower non-directory with a single link: not needed).
    pub fd: Option<Arc<OwnedFd>>,
    pub st: Stat,
    pub ino: u64,
    pub lower_dirs: Vec<(LayerIdx, Arc<OwnedFd>)>,
    /// Served from a hard-link group's index entry.
    pub group: bool,
    /// A directory whose lower parts were found through a redirect: its fds stay open.
    pub pinned: bool,
    /// A directory whose lower parts all had no mark but an opaque one (read while they were
    /// opened), so an index build need not read them again.
    pub plain_lowers: bool,
}

/// What becomes of the layers below a lower part of a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Below {
    /// They merge in by name.
    Merge,
    /// An opaque part hides them.
    Hidden,
    /// A redirected part: they were looked up where its redirect points.
    Redirected,
}

impl Overlay {
    /// Opens the layers of `cfg` and makes the root node.
    pub fn new(cfg: &OverlayConfig) -> Result<Self, String> {
        let layers = Layers::open(cfg)?;
        let ovl = Overlay {
            layers,
            nodes: NodeTable::default(),
            handles: HandleTable::default(),
            listings: Listings::default(),
            tmp_counter: AtomicU64::new(0),
            index_lru: Default::default(),
            dir_fd_cache: DirFdCache::new(cfg.dir_fds),
            stats: Stats::default(),
        };
        ovl.make_root()
            .map_err(|e| format!("cannot open the layer roots: {e}"))?;
        Ok(ovl)
    }

    fn make_root(&self) -> OvlResult<()> {
        let dup = |fd: BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map(Arc::new)
                .map_err(Errno::from_io_error_or_io)
        };
        let upper = self.layers.root(LayerIdx::UPPER).map(dup).transpose()?;
        let mut lower_dirs = Vec::new();
        for i in 1..self.layers.count() {
            let idx = LayerIdx(i as u16);
            if let Some(fd) = self.layers.root(idx) {
                let opaque = format::dir_mark(fd) == DirMark::Opaque;
                lower_dirs.push((idx, dup(fd)?));
                if opaque {
                    break;
                }
            }
        }
        let upper_opaque = upper
            .as_ref()
            .is_some_and(|u| format::dir_mark(u.as_fd()) == DirMark::Opaque);
        if upper_opaque {
            lower_dirs.clear();
        }
        let place = if upper.is_some() {
            LayerIdx::UPPER
        } else {
            lower_dirs.first().map(|(l, _)| *l).unwrap_or(LayerIdx(1))
        };
        let state = NodeState {
            upper,
            lower_dirs,
            pinned: true,
            ..NodeState::new(0, None, place)
        };
        let root = Node::new(ROOT, true, state);
        let (node, _) = self.nodes.insert_or_get(root, |_| true);
        self.nodes.add_lookup(&node);
        Ok(())
    }

    /// The node `ino` (`ESTALE` if the kernel names one we no longer know).
    pub(crate) fn node(&self, ino: u64) -> OvlResult<Arc<Node>> {
        self.nodes.get(ino).ok_or(Errno::STALE)
    }

    /// A fresh unique name for building something in the work dir.
    pub(crate) fn tmp_name(&self) -> Component {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        // "#<hex>" is always a valid component.
        Component::new(format!("#{n:x}")).unwrap_or_else(|_| unreachable_component())
    }

    /// Name of the xattr that records a copied-up object's original `st_ino`.
    pub(crate) fn origin_xattr(&self) -> &'static OsStr {
        self.layers.encoding.origin_xattr()
    }

    // ---- directory index -------------------------------------------------------------------

    /// Builds `dir`'s index if it has none. The caller holds `dir.op_lock()`.
    pub(crate) fn ensure_index_locked(&self, dir: &Node) -> OvlResult<()> {
        if !dir.is_dir {
            return Err(Errno::NOTDIR);
        }
        if dir.read().index.is_some() {
            return Ok(());
        }
        let (upper, lowers) = self.dir_fds(dir)?;
        let known = dir.read().plain_lowers.then_some(DirMark::Plain);
        let layer_dirs: Vec<LayerDir<'_>> = lowers
            .iter()
            .map(|(l, fd)| LayerDir {
                layer: *l,
                fd: fd.as_fd(),
                mark: known,
            })
            .collect();
        let index = DirIndex::build(upper.as_ref().map(|u| u.as_fd()), &layer_dirs)?;
        self.stats.index_builds.fetch_add(1, Ordering::Relaxed);
        dir.write().index = Some(Box::new(index));
        self.evict_indexes(dir.ino);
        Ok(())
    }

    /// Keeps at most [`INDEX_CACHE`] directory indexes: drops the least recently built ones
    /// whose directory is not being changed right now (its `op_lock` is free).
    fn evict_indexes(&self, built: u64) {
        let victims: Vec<u64> = {
            let mut lru = self.index_lru.lock().unwrap_or_else(|e| e.into_inner());
            lru.retain(|i| *i != built);
            lru.push_back(built);
            let excess = lru.len().saturating_sub(INDEX_CACHE);
            lru.drain(..excess).collect()
        };
        for ino in victims {
            let Some(node) = self.nodes.get(ino) else {
                continue;
            };
            match node.try_op_lock() {
                Some(_g) => node.write().index = None,
                // Busy: keep it, try again later.
                None => self
                    .index_lru
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(ino),
            }
        }
    }

    /// Runs `f` on `dir`'s index, building it first if needed.
    pub(crate) fn with_index<R>(&self, dir: &Node, f: impl FnOnce(&DirIndex) -> R) -> OvlResult<R> {
        {
            let s = dir.read();
            if let Some(idx) = &s.index {
                return Ok(f(idx));
            }
        }
        let _op = dir.op_lock();
        self.ensure_index_locked(dir)?;
        let s = dir.read();
        s.index.as_deref().map(f).ok_or(Errno::IO)
    }

    /// Runs `f` on `dir`'s index for update. The caller holds `dir.op_lock()`.
    pub(crate) fn update_index(&self, dir: &Node, f: impl FnOnce(&mut DirIndex)) -> OvlResult<()> {
        self.ensure_index_locked(dir)?;
        let mut s = dir.write();
        if let Some(idx) = s.index.as_mut() {
            f(idx);
        }
        Ok(())
    }

    /// The index entry of `name` in `dir`; the caller holds `dir.op_lock()`.
    pub(crate) fn entry_locked(
        &self,
        dir: &Node,
        name: &Component,
    ) -> OvlResult<Option<IndexEntry>> {
        self.ensure_index_locked(dir)?;
        Ok(dir
            .read()
            .index
            .as_ref()
            .and_then(|i| i.get(name.as_bytes()).cloned()))
    }

    /// The index entry of `name` in `dir`.
    pub(crate) fn entry(&self, dir: &Node, name: &Component) -> OvlResult<Option<IndexEntry>> {
        self.with_index(dir, |idx| idx.get(name.as_bytes()).cloned())
    }

    // ---- resolution ------------------------------------------------------------------------

    /// The fd of `dir` in `layer`.
    pub(crate) fn dir_fd_in(&self, dir: &Node, layer: LayerIdx) -> OvlResult<Arc<OwnedFd>> {
        let (upper, lower_dirs) = self.dir_fds(dir)?;
        if layer.is_upper() {
            return upper.ok_or(Errno::NOENT);
        }
        lower_dirs
            .iter()
            .find(|(l, _)| *l == layer)
            .map(|(_, fd)| fd.clone())
            .ok_or(Errno::NOENT)
    }

    /// Opens what `entry` shows under `name` in `dir`, and computes its `st_ino`.
    pub(crate) fn probe(
        &self,
        dir: &Node,
        name: &Component,
        entry: &IndexEntry,
    ) -> OvlResult<Option<Probe>> {
        let Some(vis) = entry.visible() else {
            return Ok(None);
        };
        let parent_fd = self.dir_fd_in(dir, vis.layer)?;
        // A non-directory with one link needs no fd: one fstatat says all (the common case of a
        // walk), and for an upper one a `getxattrat` reads its origin. So does a lower hard link
        // whose group has no upper inode: it shows the lower object as it is. Anything else is
        // opened. Names are stable meanwhile: the kernel holds `dir` locked against creates,
        // unlinks and renames in it while it looks up or lists, and a copy-up never replaces an
        // upper entry.
        let single = if vis.kind != FileType::Directory {
            let st = sys::stat_at(parent_fd.as_fd(), name)?;
            let key = self.layers.xino(vis.layer, st.st_ino);
            let plain = self.counts_own_links(vis.layer.is_upper(), key, st.st_nlink);
            (sys::file_type(&st) != FileType::Directory && plain).then_some(st)
        } else {
            None
        };
        let (mut fd, mut st) = match single {
            Some(st) => (None, st),
            None => {
                let fd = sys::open_path(parent_fd.as_fd(), name)?;
                let st = sys::stat_fd(fd.as_fd())?;
                (Some(Arc::new(fd)), st)
            }
        };
        let mut group = false;
        if !vis.layer.is_upper() && st.st_nlink > 1 && sys::file_type(&st) != FileType::Directory {
            // A lower hard link whose group already has an upper inode: that inode is the object.
            let key = self.layers.xino(vis.layer, st.st_ino);
            if let Some(entry) = self.group_entry(key)? {
                st = sys::stat_fd(entry.as_fd())?;
                fd = Some(Arc::new(entry));
                group = true;
            }
        }
        let kind = sys::file_type(&st);
        let vis = Visible {
            layer: vis.layer,
            kind,
        };
        let mut lower_dirs = Vec::new();
        let mut pinned = false;
        let mut plain = true;
        if kind == FileType::Directory {
            let fd = fd.as_ref().ok_or(Errno::IO)?;
            let (upper_opaque, redirect) = if vis.layer.is_upper() {
                let (mark, redirect) =
                    format::dir_xattrs(fd.as_fd(), Some(self.layers.encoding.redirect_xattr()));
                (mark == DirMark::Opaque, redirect)
            } else {
                (false, None)
            };
            if let Some(target) = redirect {
                // A directory the kernel overlay moved: its lowers live at the redirect path.
                self.redirect_lower_dirs(dir, &target, None, &mut lower_dirs)?;
                pinned = true;
                plain = false;
            } else if vis.layer.is_upper() && !upper_opaque {
                if let Some(lower) = entry
                    .lower
                    .as_ref()
                    .filter(|l| l.kind == FileType::Directory)
                {
                    pinned = self.open_lower_dirs(
                        dir,
                        name,
                        lower.layer,
                        &lower.more,
                        &mut lower_dirs,
                        &mut plain,
                    )? == Below::Redirected;
                }
            } else if !vis.layer.is_upper()
                && let Some(lower) = entry.lower.as_ref()
            {
                pinned = match self.push_lower_dir(
                    dir,
                    vis.layer,
                    fd.clone(),
                    &mut lower_dirs,
                    &mut plain,
                )? {
                    Below::Merge => {
                        self.open_lower_dirs(
                            dir,
                            name,
                            LayerIdx(u16::MAX),
                            &lower.more,
                            &mut lower_dirs,
                            &mut plain,
                        )? == Below::Redirected
                    }
                    Below::Hidden => false,
                    Below::Redirected => true,
                };
            }
        }
        let ino = if group {
            self.layers
                .xino(vis.layer, sys::stat_at(parent_fd.as_fd(), name)?.st_ino)
        } else {
            let origin = match fd.as_deref() {
                Some(fd) => Origin::Fd(fd.as_fd()),
                None => Origin::Named(parent_fd.as_fd(), name),
            };
            self.ino_of(vis, origin, &st, &lower_dirs)?
        };
        Ok(Some(Probe {
            vis,
            fd,
            st,
            ino,
            lower_dirs,
            group,
            pinned,
            plain_lowers: plain,
        }))
    }

    /// Opens `name` in each of `dir`'s lower layers `first` (unless `u16::MAX`) and `more`, as
    /// [`Overlay::push_lower_dir`] says: until an opaque one, or a redirected one, after which the
    /// layers below come from its redirect.
    fn open_lower_dirs(
        &self,
        dir: &Node,
        name: &Component,
        first: LayerIdx,
        more: &[LayerIdx],
        out: &mut Vec<(LayerIdx, Arc<OwnedFd>)>,
        plain: &mut bool,
    ) -> OvlResult<Below> {
        let layers = std::iter::once(first)
            .filter(|l| l.0 != u16::MAX)
            .chain(more.iter().copied());
        for layer in layers {
            let parent = self.dir_fd_in(dir, layer)?;
            let fd = Arc::new(sys::open_path_dir(parent.as_fd(), name)?);
            match self.push_lower_dir(dir, layer, fd, out, plain)? {
                Below::Merge => {}
                end => return Ok(end),
            }
        }
        Ok(Below::Merge)
    }

    /// Appends `fd`, a lower part (in `layer`) of a directory of `dir`, to `out`, and says what
    /// becomes of the layers below: an opaque part hides them; a part with a `redirect` (moved
    /// while its layer was the upper one) has its further parts where the redirect points, which
    /// are appended here, as the kernel overlay looks them up. Clears `plain` unless the part
    /// has no mark or is opaque (then it is the last).
    fn push_lower_dir(
        &self,
        dir: &Node,
        layer: LayerIdx,
        fd: Arc<OwnedFd>,
        out: &mut Vec<(LayerIdx, Arc<OwnedFd>)>,
        plain: &mut bool,
    ) -> OvlResult<Below> {
        let (mark, redirect) =
            format::dir_xattrs(fd.as_fd(), Some(self.layers.encoding.redirect_xattr()));
        let opaque = mark == DirMark::Opaque;
        *plain &= mark != DirMark::HasXWhiteouts && redirect.is_none();
        out.push((layer, fd));
        if opaque {
            return Ok(Below::Hidden);
        }
        match redirect {
            Some(target) => {
                self.redirect_lower_dirs(dir, &target, Some(layer), out)?;
                Ok(Below::Redirected)
            }
            None => Ok(Below::Merge),
        }
    }

    /// The lower dirs of a directory moved by the kernel overlay (`redirect` xattr) in the layers
    /// below `below` (all lower layers if `None`): an absolute path is looked up from the layer
    /// roots, a bare name in the parent's lower dirs.
    pub(crate) fn redirect_lower_dirs(
        &self,
        dir: &Node,
        target: &[u8],
        below: Option<LayerIdx>,
        out: &mut Vec<(LayerIdx, Arc<OwnedFd>)>,
    ) -> OvlResult<()> {
        let first = below.map_or(1, |l| usize::from(l.0) + 1);
        let roots: Vec<(LayerIdx, BorrowedFd<'_>)> = (first..self.layers.count())
            .filter_map(|i| {
                let idx = LayerIdx(i as u16);
                self.layers.root(idx).map(|root| (idx, root))
            })
            .collect();
        let parents = if target.starts_with(b"/") {
            Vec::new()
        } else {
            self.dir_fds(dir)?.1
        };
        let parents: Vec<(LayerIdx, BorrowedFd<'_>)> =
            parents.iter().map(|(l, fd)| (*l, fd.as_fd())).collect();
        let redirect_of =
            |fd: BorrowedFd<'_>| xattr::get(fd, self.layers.encoding.redirect_xattr()).ok();
        for (layer, fd) in crate::layers::resolve_redirect(&roots, &parents, target, redirect_of)? {
            out.push((layer, Arc::new(fd)));
        }
        Ok(())
    }

    /// `st_ino` of an object: a merged directory shows its topmost lower dir's inode; a copied-up
    /// object shows the inode it had before (origin xattr); anything else its own.
    pub(crate) fn ino_of(
        &self,
        vis: Visible,
        origin: Origin<'_>,
        st: &Stat,
        lower_dirs: &[(LayerIdx, Arc<OwnedFd>)],
    ) -> OvlResult<u64> {
        if vis.layer.is_upper() {
            if let Some((layer, lfd)) = lower_dirs.first() {
                let lst = sys::stat_fd(lfd.as_fd())?;
                return Ok(self.layers.xino(*layer, lst.st_ino));
            }
            let value = match origin {
                Origin::Fd(fd) => xattr::get(fd, self.origin_xattr()),
                Origin::Named(dir, name) => xattr::get_at(dir, name, self.origin_xattr()),
            };
            if let Ok(v) = value
                && let Ok(bytes) = <[u8; 8]>::try_from(v.as_slice())
            {
                return Ok(u64::from_le_bytes(bytes));
            }
        }
        Ok(self.layers.xino(vis.layer, st.st_ino))
    }

    /// Finds `name` in `dir` and returns its node (created if new; no kernel reference taken).
    pub(crate) fn lookup_node(
        &self,
        dir: &Arc<Node>,
        name: &Component,
    ) -> OvlResult<Option<(Arc<Node>, Attr)>> {
        Ok(self
            .probe_name(dir, name)?
            .map(|probe| self.node_from_probe(dir, name, probe)))
    }

    /// The index entry of `name` in `dir`, probed.
    fn probe_name(&self, dir: &Node, name: &Component) -> OvlResult<Option<Probe>> {
        match self.entry(dir, name)? {
            Some(entry) => self.probe(dir, name, &entry),
            None => Ok(None),
        }
    }

    /// Finds `name` in `dir` for the kernel: like [`Overlay::lookup_node`], but a lower file with a
    /// single link and no node yet gets none ([`Found::Light`]): a walk makes no nodes for files.
    pub(crate) fn lookup_found(
        &self,
        dir: &Arc<Node>,
        name: &Component,
    ) -> OvlResult<Option<(Found, Attr)>> {
        let Some(probe) = self.probe_name(dir, name)? else {
            return Ok(None);
        };
        // A hard link gets a node: the node keeps each name the kernel reached it by.
        let light = !probe.vis.layer.is_upper()
            && probe.vis.kind != FileType::Directory
            && probe.fd.is_none()
            && probe.st.st_nlink <= 1
            && !probe.group
            && name.as_bytes().len() <= crate::node::LIGHT_NAME_MAX
            && !self.nodes.has_node(probe.ino);
        if !light {
            let (node, attr) = self.node_from_probe(dir, name, probe);
            return Ok(Some((Found::Node(node), attr)));
        }
        let mut st = probe.st;
        st.st_ino = probe.ino;
        let found = Found::Light(Light {
            ino: probe.ino,
            parent: dir.ino,
            name: name.clone(),
            place: probe.vis.layer,
        });
        Ok(Some((found, Attr { ino: probe.ino, st })))
    }

    /// Turns a probe into a node in the table (or finds the existing node of the same object).
    pub(crate) fn node_from_probe(
        &self,
        dir: &Node,
        name: &Component,
        probe: Probe,
    ) -> (Arc<Node>, Attr) {
        let is_dir = probe.vis.kind == FileType::Directory;
        let upper = if is_dir && probe.vis.layer.is_upper() {
            probe.fd.clone()
        } else {
            None
        };
        let fds = probe.lower_dirs.len() + usize::from(upper.is_some());
        let state = NodeState {
            upper,
            lower_dirs: probe.lower_dirs,
            group: probe.group,
            pinned: probe.pinned,
            plain_lowers: probe.plain_lowers,
            ..NodeState::new(dir.ino, Some(name.clone()), probe.vis.layer)
        };
        let node = Node::new(probe.ino, is_dir, state);
        let (node, inserted) = self
            .nodes
            .insert_or_get(node, |old| old.is_dir == is_dir && !old.read().unlinked);
        if inserted && is_dir {
            self.note_dir_fds(&node, fds);
        }
        if !is_dir {
            let mut s = node.write();
            s.add_alias(dir.ino, name);
            // The group may have gained its index entry since the node was made.
            s.group |= probe.group;
        }
        let attr = self.attr_from(&node, probe.st, probe.fd.as_deref().map(|f| f.as_fd()));
        (node, attr)
    }

    /// The backing object of `node` and the layer that holds it, as an `O_PATH` fd.
    pub(crate) fn object(&self, node: &Node) -> OvlResult<(LayerIdx, Arc<OwnedFd>)> {
        let (place, at) = self.object_at(node)?;
        match at {
            ObjectAt::Fd(fd) => Ok((place, fd)),
            ObjectAt::Named(dir, name) => {
                Ok((place, Arc::new(sys::open_path(dir.as_fd(), &name)?)))
            }
        }
    }

    /// Like [`Overlay::object`], without opening a file that is reachable by name: for calls
    /// that take a directory fd and a name (one syscall instead of open, call, close).
    pub(crate) fn object_at(&self, node: &Node) -> OvlResult<(LayerIdx, ObjectAt)> {
        if node.is_dir {
            return match self.dir_fds(node)? {
                (Some(u), _) => Ok((LayerIdx::UPPER, ObjectAt::Fd(u))),
                (None, lowers) => lowers
                    .into_iter()
                    .next()
                    .map(|(l, fd)| (l, ObjectAt::Fd(fd)))
                    .ok_or(Errno::STALE),
            };
        }
        let (place, parent, name, group, unlinked, orphan) = {
            let s = node.read();
            (
                s.place,
                s.parent,
                s.name.clone(),
                s.group,
                s.unlinked,
                s.orphan.clone(),
            )
        };
        if unlinked {
            return orphan
                .map(|fd| (place, ObjectAt::Fd(fd)))
                .ok_or(Errno::STALE);
        }
        // Every name of a hard-link group is one inode, kept in the group's index entry (names
        // of the group may sit in different layers).
        if group && let Some(fd) = self.group_entry(node.ino)? {
            return Ok((place, ObjectAt::Fd(Arc::new(fd))));
        }
        let name = name.ok_or(Errno::STALE)?;
        let parent = self.node(parent)?;
        let dir = self.dir_fd_in(&parent, place)?;
        Ok((place, ObjectAt::Named(dir, name)))
    }

    // ---- attributes ------------------------------------------------------------------------

    /// Current attributes of `node`.
    pub(crate) fn attr(&self, node: &Node) -> OvlResult<Attr> {
        let fd = match self.object_at(node)?.1 {
            ObjectAt::Fd(fd) => fd,
            ObjectAt::Named(dir, name) => {
                // One stat by name; the object is opened only to count a hard-link group (a
                // lower hard link whose group has no upper inode counts its real links).
                let st = sys::stat_at(dir.as_fd(), &name)?;
                let (group, upper) = {
                    let s = node.read();
                    (s.group, s.in_upper())
                };
                if !group && self.counts_own_links(upper, node.ino, st.st_nlink) {
                    return Ok(self.attr_from(node, st, None));
                }
                Arc::new(sys::open_path(dir.as_fd(), &name)?)
            }
        };
        let st = sys::stat_fd(fd.as_fd())?;
        Ok(self.attr_from(node, st, Some(fd.as_fd())))
    }

    /// Whether a file with `nlink` links (an upper one if `upper`, else lower with group key
    /// `key`) shows its own link count, with no hard-link group's count to read: one link, or a
    /// lower file whose group has no upper inode.
    fn counts_own_links(&self, upper: bool, key: u64, nlink: u64) -> bool {
        nlink <= 1 || (!upper && !self.layers.group_may_exist(key))
    }

    /// Adjusts a backing stat to what the mount shows.
    pub(crate) fn attr_from(&self, node: &Node, mut st: Stat, fd: Option<BorrowedFd<'_>>) -> Attr {
        st.st_ino = node.ino;
        let s = node.read();
        if !node.is_dir && (st.st_nlink > 1 || s.group) {
            let real = st.st_nlink;
            let n = fd.and_then(|fd| self.group_count(fd, real)).or_else(|| {
                // A lower group member: its group may have an index entry by now.
                let entry = if !s.in_upper() {
                    self.group_entry(node.ino).ok().flatten()
                } else {
                    None
                };
                entry.and_then(|g| self.group_count(g.as_fd(), real))
            });
            if let Some(n) = n {
                st.st_nlink = n as _;
            }
        }
        if node.is_dir && s.is_merged() {
            st.st_nlink = 1;
        }
        Attr { ino: node.ino, st }
    }

    /// LOOKUP: finds `name` in `parent` and takes a kernel reference on it.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> OvlResult<Option<Attr>> {
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let name = Component::new(name)?;
        let dir = self.node(parent)?;
        match self.lookup_found(&dir, &name)? {
            Some((found, attr)) => {
                self.nodes.add_found(&found);
                Ok(Some(attr))
            }
            None => Ok(None),
        }
    }

    /// FORGET.
    pub fn forget(&self, ino: u64, n: u64) {
        self.nodes.forget(ino, n);
    }

    /// GETATTR; `fh` (an open file of the node, from fstat) answers even after the last unlink.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> OvlResult<Attr> {
        let node = self.node(ino)?;
        if let Some(fd) = fh.and_then(|fh| self.file_fd(fh).ok()) {
            let st = sys::stat_fd(fd.as_fd())?;
            return Ok(self.attr_from(&node, st, Some(fd.as_fd())));
        }
        self.attr(&node)
    }

    /// READLINK.
    pub fn readlink(&self, ino: u64) -> OvlResult<Vec<u8>> {
        let node = self.node(ino)?;
        let (_, fd) = self.object(&node)?;
        sys::readlink_fd(fd.as_fd())
    }

    /// STATFS of the upper dir (or the top lower on a read-only mount).
    pub fn statfs(&self) -> OvlResult<sys::StatFs> {
        let fd = self
            .layers
            .root(LayerIdx::UPPER)
            .or_else(|| self.layers.root(LayerIdx(1)));
        sys::statfs_fd(fd.ok_or(Errno::IO)?)
    }

    /// Whether the mount is read-only.
    pub fn read_only(&self) -> bool {
        !self.layers.has_upper()
    }
}

/// Where [`Overlay::ino_of`] reads an upper object's origin xattr: its fd, or its name in its
/// directory (no fd opened, no `/proc` walk).
#[derive(Clone, Copy)]
pub(crate) enum Origin<'a> {
    Fd(BorrowedFd<'a>),
    Named(BorrowedFd<'a>, &'a Component),
}

fn unreachable_component() -> Component {
    // Only reached if "#<hex>" were invalid, which it never is.
    match Component::new("tmp") {
        Ok(c) => c,
        Err(_) => std::process::abort(),
    }
}

/// Converts `std::io::Error` to an errno.
pub(crate) trait ErrnoExt {
    fn from_io_error_or_io(e: std::io::Error) -> Errno;
}

impl ErrnoExt for Errno {
    fn from_io_error_or_io(e: std::io::Error) -> Errno {
        Errno::from_io_error(&e).unwrap_or(Errno::IO)
    }
}
