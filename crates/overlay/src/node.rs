//! The inode table: one [`Node`] per object the kernel knows, keyed by its FUSE node id, which is
//! also the `st_ino` the mount shows (fuser sends `attr.ino` as the node id).
//!
//! Lock order (outermost first): a directory's `op_lock` (at most one, except `rename`, which takes
//! two in node-id order), then a node's `copyup_lock`, then `state` locks, then the table lock.
//! Copy-up of parents happens before any `op_lock` is taken. `state` and table guards are never held
//! across blocking I/O: readers clone the `Arc`ed fds they need and drop the guard.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use layerfs_sys::Component;

use crate::index::{DirIndex, LayerFd};
use crate::layers::LayerIdx;

/// The FUSE node id of the root.
pub const ROOT: u64 = 1;

/// An object of the merged tree the kernel holds a reference to.
#[derive(Debug)]
pub struct Node {
    /// FUSE node id and `st_ino`. Immutable.
    pub ino: u64,
    /// Directory or not; fixed for the node's life (a different type under the name is a new node).
    pub is_dir: bool,
    /// Lookup references the kernel holds (paid back by FORGET). Atomic, no lock.
    lookups: AtomicU64,
    /// Where the object lives. Guarded by its own lock.
    state: RwLock<NodeState>,
    /// For a directory: serializes changes to its entries (and building its index).
    op_lock: Mutex<()>,
    /// Serializes the copy-up of this node.
    copyup_lock: Mutex<()>,
}

/// Where a node's object lives; guarded by `Node::state`.
#[derive(Debug)]
pub struct NodeState {
    /// Node id of the directory the object was last seen in (0 for the root).
    pub parent: u64,
    /// Its name there (`None` for the root).
    pub name: Option<Component>,
    /// The layer that holds the object (the upper once copied up). A non-directory keeps no fd:
    /// it is opened by name from its parent's directory fd when needed, so the number of open
    /// fds is bounded by the directories the kernel caches, not the files.
    pub place: LayerIdx,
    /// Directory only: `O_PATH` fd of the upper directory, once there is one.
    pub upper: Option<Arc<OwnedFd>>,
    /// For a directory: every lower dir merged below the upper, top first.
    pub lower_dirs: Vec<LayerFd>,
    /// For a directory: its merged index, built on first use; a cache of what is on disk, which
    /// may be dropped at any time outside the directory's `op_lock` ([`crate::overlay`] keeps
    /// only the most recently built ones).
    pub index: Option<Box<DirIndex>>,
    /// The object's last name was removed (open files keep the node alive).
    pub unlinked: bool,
    /// A lower hard-link group member served from the group's index entry ([`crate::group`]).
    pub group: bool,
    /// Further names of a non-directory (hard links) the kernel has looked up.
    /// Boxed: most nodes have none, and every node pays for the field.
    pub aliases: Option<Box<Vec<(u64, Component)>>>,
    /// Once `unlinked`: the object, still reachable by the files open on it.
    pub orphan: Option<Arc<OwnedFd>>,
    /// For a directory whose fds were closed by the fd cache ([`crate::dirfds`]): the lower layers
    /// it had parts in (`upper` and `lower_dirs` are empty until they are reopened).
    pub evicted: Option<Box<[LayerIdx]>>,
    /// For a directory: its fds cannot be reopened by name (root, or reached through a redirect).
    pub pinned: bool,
}

impl NodeState {
    /// Whether the object has an upper copy.
    pub fn in_upper(&self) -> bool {
        self.place.is_upper()
    }

    /// Whether the object is known under `name` in directory `parent`.
    pub fn is_at(&self, parent: u64, name: &Component) -> bool {
        (self.parent == parent && self.name.as_ref() == Some(name))
            || self
                .aliases
                .iter()
                .flat_map(|a| a.iter())
                .any(|(p, n)| *p == parent && n == name)
    }

    /// Records another name of the object.
    pub fn add_alias(&mut self, parent: u64, name: &Component) {
        if !self.is_at(parent, name) {
            self.aliases
                .get_or_insert_default()
                .push((parent, name.clone()));
        }
    }

    /// The name `parent/name` now reads `to_parent/to_name`.
    pub fn move_location(
        &mut self,
        parent: u64,
        name: &Component,
        to_parent: u64,
        to_name: &Component,
    ) {
        if self.parent == parent && self.name.as_ref() == Some(name) {
            self.parent = to_parent;
            self.name = Some(to_name.clone());
        } else if let Some(a) = self
            .aliases
            .iter_mut()
            .flat_map(|a| a.iter_mut())
            .find(|(p, n)| *p == parent && n == name)
        {
            *a = (to_parent, to_name.clone());
        } else {
            self.parent = to_parent;
            self.name = Some(to_name.clone());
        }
    }

    /// Forgets the name `parent/name`; true if the object has no known name left.
    pub fn drop_location(&mut self, parent: u64, name: &Component) -> bool {
        if self.parent == parent && self.name.as_ref() == Some(name) {
            match self.aliases.as_mut().and_then(|a| a.pop()) {
                Some((p, n)) => {
                    self.parent = p;
                    self.name = Some(n);
                    false
                }
                None => true,
            }
        } else {
            if let Some(a) = self.aliases.as_mut() {
                a.retain(|(p, n)| !(*p == parent && n == name));
            }
            false
        }
    }

    /// For a directory: whether it merges more than one layer (its `st_nlink` is then 1).
    pub fn is_merged(&self) -> bool {
        let lowers = match &self.evicted {
            Some(layers) => layers.len(),
            None => self.lower_dirs.len(),
        };
        lowers + usize::from(self.place.is_upper()) > 1
    }
}

impl Node {
    /// A node with no kernel references yet.
    pub fn new(ino: u64, is_dir: bool, state: NodeState) -> Self {
        Node {
            ino,
            is_dir,
            lookups: AtomicU64::new(0),
            state: RwLock::new(state),
            op_lock: Mutex::new(()),
            copyup_lock: Mutex::new(()),
        }
    }

    /// Reads the state (poisoning is ignored: state stays consistent between statements).
    pub fn read(&self) -> RwLockReadGuard<'_, NodeState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the state.
    pub fn write(&self) -> RwLockWriteGuard<'_, NodeState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the directory operation lock.
    pub fn op_lock(&self) -> MutexGuard<'_, ()> {
        self.op_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the directory operation lock if it is free.
    pub fn try_op_lock(&self) -> Option<MutexGuard<'_, ()>> {
        self.op_lock.try_lock().ok()
    }

    /// Takes the copy-up lock.
    pub fn copyup_lock(&self) -> MutexGuard<'_, ()> {
        self.copyup_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the copy-up lock if it is free.
    pub fn try_copyup_lock(&self) -> Option<MutexGuard<'_, ()>> {
        self.copyup_lock.try_lock().ok()
    }

    /// Parent node id and name.
    pub fn location(&self) -> (u64, Option<Component>) {
        let s = self.read();
        (s.parent, s.name.clone())
    }
}

/// All nodes the kernel may still name. Lock: `nodes` (innermost of all locks).
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
}

impl NodeTable {
    /// The node with id `ino`.
    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .cloned()
    }

    /// Inserts `node` unless a node with its id exists; returns the node now in the table.
    /// `same` decides whether an existing node is the same object (else it is replaced).
    pub fn insert_or_get(&self, node: Node, same: impl FnOnce(&Node) -> bool) -> (Arc<Node>, bool) {
        let mut map = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = map.get(&node.ino)
            && same(existing)
        {
            return (existing.clone(), false);
        }
        let node = Arc::new(node);
        map.insert(node.ino, node.clone());
        (node, true)
    }

    /// Adds one kernel lookup reference (an entry reply is about to be sent).
    pub fn add_lookup(&self, node: &Node) {
        node.lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// FORGET: drops `n` references; the node leaves the table at zero (never the root).
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut map = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(node) = map.get(&ino) {
            let prev = node.lookups.load(Ordering::Relaxed);
            let left = prev.saturating_sub(n);
            node.lookups.store(left, Ordering::Relaxed);
            if left == 0 {
                map.remove(&ino);
            }
        }
    }

    /// Number of nodes (for stats).
    pub fn len(&self) -> usize {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
