//! The inode table: one [`Node`] per object the kernel knows, keyed by its FUSE node id, which is
//! also the `st_ino` the mount shows (fuser sends `attr.ino` as the node id).
//!
//! Lock order (outermost first): a directory's `op_lock` (at most one, except `rename`, which takes
//! two in node-id order), then a node's `copyup_lock`, then `state` locks, then the table lock.
//! Copy-up of parents happens before any `op_lock` is taken. `state` and table guards are never held
//! across blocking I/O: readers clone the `Arc`ed fds they need and drop the guard.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
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
    /// For a directory: no lower part has a mark an index build must read (no `opaque=x`; an
    /// opaque one is the last), as found when they were opened.
    pub plain_lowers: bool,
}

impl NodeState {
    /// The state of an object at `parent/name` in layer `place`, with nothing else known yet.
    pub fn new(parent: u64, name: Option<Component>, place: LayerIdx) -> Self {
        NodeState {
            parent,
            name,
            place,
            upper: None,
            lower_dirs: Vec::new(),
            index: None,
            unlinked: false,
            group: false,
            aliases: None,
            orphan: None,
            evicted: None,
            pinned: false,
            plain_lowers: false,
        }
    }

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

/// A lower non-directory with a single link that the kernel was told about but has not used
/// since: the few bytes needed to make its [`Node`] on first use. A walk hands the kernel one
/// entry per file; most are never touched again, so they stay this small.
#[derive(Debug, Clone)]
pub struct Light {
    /// FUSE node id and `st_ino`.
    pub ino: u64,
    /// Directory the name is in.
    pub parent: u64,
    /// The name.
    pub name: Component,
    /// The lower layer holding the file.
    pub place: LayerIdx,
}

/// What a lookup found: a node, or a file that needs none yet.
#[derive(Debug, Clone)]
pub enum Found {
    /// A node of the table.
    Node(Arc<Node>),
    /// A lower file with a single link; it becomes a node on first use.
    Light(Light),
}

/// The longest name a light entry holds (longer ones get a node): 48 bytes an entry, no heap.
pub const LIGHT_NAME_MAX: usize = 25;

/// Light entries are spread over this many sets, so that growing one (a hash table doubles,
/// holding old and new at once) costs a sixteenth of the memory peak.
const LIGHT_SHARDS: usize = 16;

/// The tables behind [`NodeTable`]'s lock.
#[derive(Debug, Default)]
struct Tables {
    full: HashMap<u64, Arc<Node>>,
    light: [HashSet<LightEntry>; LIGHT_SHARDS],
}

impl Tables {
    fn light(&mut self, ino: u64) -> &mut HashSet<LightEntry> {
        // Node ids of one layer are inode numbers: the low bits spread well.
        &mut self.light[(ino as usize) % LIGHT_SHARDS]
    }

    fn has_light(&self, ino: u64) -> bool {
        self.light[(ino as usize) % LIGHT_SHARDS].contains(&ino)
    }
}

/// A [`Light`] as stored, with its kernel lookup count; hashed and compared by node id alone.
#[derive(Debug)]
struct LightEntry {
    ino: u64,
    parent: u64,
    lookups: u32,
    place: LayerIdx,
    len: u8,
    name: [u8; LIGHT_NAME_MAX],
}

impl LightEntry {
    fn new(l: &Light) -> Option<Self> {
        let bytes = l.name.as_bytes();
        let mut name = [0; LIGHT_NAME_MAX];
        name.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(LightEntry {
            ino: l.ino,
            parent: l.parent,
            lookups: 0,
            place: l.place,
            len: bytes.len() as u8,
            name,
        })
    }

    fn name(&self) -> Option<Component> {
        let bytes = self.name.get(..usize::from(self.len))?;
        Component::new(std::ffi::OsStr::from_bytes(bytes)).ok()
    }
}

impl PartialEq for LightEntry {
    fn eq(&self, other: &Self) -> bool {
        self.ino == other.ino
    }
}

impl Eq for LightEntry {}

impl Hash for LightEntry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.ino.hash(state)
    }
}

impl Borrow<u64> for LightEntry {
    fn borrow(&self) -> &u64 {
        &self.ino
    }
}

/// All nodes the kernel may still name. Lock: `nodes` (innermost of all locks).
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: RwLock<Tables>,
}

impl NodeTable {
    fn read(&self) -> RwLockReadGuard<'_, Tables> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tables> {
        self.nodes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The node with id `ino` (made now from its light entry if it has one).
    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        {
            let t = self.read();
            if let Some(n) = t.full.get(&ino) {
                return Some(n.clone());
            }
            if !t.has_light(ino) {
                return None;
            }
        }
        let mut t = self.write();
        if let Some(n) = t.full.get(&ino) {
            return Some(n.clone());
        }
        let e = t.light(ino).take(&ino)?;
        let state = NodeState::new(e.parent, Some(e.name()?), e.place);
        let node = Arc::new(Node::new(ino, false, state));
        node.lookups.store(u64::from(e.lookups), Ordering::Relaxed);
        t.full.insert(ino, node.clone());
        Some(node)
    }

    /// Whether `ino` has a full node.
    pub fn has_node(&self, ino: u64) -> bool {
        self.read().full.contains_key(&ino)
    }

    /// Inserts `node` unless a node with its id exists; returns the node now in the table.
    /// `same` decides whether an existing node is the same object (else it is replaced).
    ///
    /// The kernel counts its references per node id, not per node: the FORGETs still due for a
    /// replaced node (an unlinked one, say, whose id a lookup now gives again) come under this
    /// id, so the new node takes over its count. Dropped with the old node, that count would
    /// let those FORGETs take the new node out of the table while the kernel still uses it.
    pub fn insert_or_get(&self, node: Node, same: impl FnOnce(&Node) -> bool) -> (Arc<Node>, bool) {
        let mut t = self.write();
        if let Some(existing) = t.full.get(&node.ino)
            && same(existing)
        {
            return (existing.clone(), false);
        }
        // A light entry of the same id is the same lower file: its references carry over.
        if let Some(e) = t.light(node.ino).take(&node.ino) {
            node.lookups
                .fetch_add(u64::from(e.lookups), Ordering::Relaxed);
        }
        let node = Arc::new(node);
        let replaced = t.full.insert(node.ino, node.clone());
        if let Some(old) = &replaced {
            node.lookups
                .fetch_add(old.lookups.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        drop(t);
        // Its fds close outside the table lock (see `forget`).
        drop(replaced);
        (node, true)
    }

    /// Adds one kernel lookup reference to what a lookup found (an entry reply is about to be
    /// sent). A light find whose id has a full node by now counts on that node.
    pub fn add_found(&self, found: &Found) {
        let l = match found {
            Found::Node(n) => return self.add_lookup(n),
            Found::Light(l) => l,
        };
        let mut t = self.write();
        if let Some(n) = t.full.get(&l.ino) {
            n.lookups.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut entry = match t.light(l.ino).take(&l.ino) {
            Some(e) => e,
            None => match LightEntry::new(l) {
                Some(e) => e,
                None => {
                    // Name too long to be light (callers check): make the node.
                    drop(t);
                    let n = self.insert_light_as_node(l);
                    return self.add_lookup(&n);
                }
            },
        };
        entry.lookups = entry.lookups.saturating_add(1);
        t.light(entry.ino).insert(entry);
    }

    /// Makes a full node for a light find.
    fn insert_light_as_node(&self, l: &Light) -> Arc<Node> {
        let state = NodeState::new(l.parent, Some(l.name.clone()), l.place);
        self.insert_or_get(Node::new(l.ino, false, state), |old| {
            !old.is_dir && !old.read().unlinked
        })
        .0
    }

    /// Adds one kernel lookup reference (an entry reply is about to be sent).
    ///
    /// Counted on the node the table holds for that id, under the table lock: a FORGET of the
    /// id's earlier references may have taken `node` out of the table since the lookup found
    /// it (the kernel evicting its inode while it looks the name up again). Then `node` goes
    /// back in; a node that replaced it meanwhile gets the reference instead.
    pub fn add_lookup(&self, node: &Arc<Node>) {
        {
            let t = self.read();
            if t.full.get(&node.ino).is_some_and(|n| Arc::ptr_eq(n, node)) {
                // FORGET takes the write lock: it cannot come between the check and the count.
                node.lookups.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut t = self.write();
        match t.full.get(&node.ino) {
            Some(n) => {
                n.lookups.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                // Its references were all forgotten: this one is the only one, with those of a
                // light entry made for the id meanwhile.
                let light = t.light(node.ino).take(&node.ino).map_or(0, |e| e.lookups);
                node.lookups.store(1 + u64::from(light), Ordering::Relaxed);
                t.full.insert(node.ino, node.clone());
            }
        }
    }

    /// FORGET: drops `n` references; the node leaves the table at zero (never the root).
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.write();
        let mut gone = None;
        if let Some(node) = t.full.get(&ino) {
            let prev = node.lookups.load(Ordering::Relaxed);
            let left = prev.saturating_sub(n);
            node.lookups.store(left, Ordering::Relaxed);
            if left == 0 {
                gone = t.full.remove(&ino);
            }
        } else if let Some(mut entry) = t.light(ino).take(&ino) {
            let left = u64::from(entry.lookups).saturating_sub(n);
            if left > 0 {
                entry.lookups = left as u32;
                t.light(entry.ino).insert(entry);
            }
        }
        drop(t);
        // Outside the table lock: the last reference closes the node's fds, and the close of an
        // unlinked file's last fd is where its filesystem frees it (a journaled truncate).
        drop(gone);
    }

    /// Number of nodes, light ones included (for stats).
    pub fn len(&self) -> usize {
        let t = self.read();
        t.full.len() + t.light.iter().map(HashSet::len).sum::<usize>()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn light(ino: u64, name: &str) -> Found {
        Found::Light(Light {
            ino,
            parent: ROOT,
            name: Component::new(name).expect("name"),
            place: LayerIdx(1),
        })
    }

    #[test]
    fn a_light_entry_is_48_bytes() {
        assert_eq!(std::mem::size_of::<LightEntry>(), 48);
    }

    #[test]
    fn light_entries_count_references_and_become_nodes_on_use() {
        let t = NodeTable::default();
        t.add_found(&light(7, "a"));
        t.add_found(&light(7, "a"));
        assert_eq!(t.len(), 1);
        assert!(!t.has_node(7));
        let n = t.get(7).expect("promoted");
        assert!(t.has_node(7));
        assert_eq!(
            n.location(),
            (ROOT, Some(Component::new("a").expect("name")))
        );
        assert_eq!(n.read().place, LayerIdx(1));
        // A light find of an id with a node counts on the node.
        t.add_found(&light(7, "a"));
        t.forget(7, 2);
        assert!(t.get(7).is_some());
        t.forget(7, 1);
        assert!(t.get(7).is_none());
        assert!(t.is_empty());
        // Forgetting a light entry: gone at zero, never made a node.
        t.add_found(&light(9, "b"));
        t.forget(9, 1);
        assert!(t.get(9).is_none());
        // A name too long to be light makes a node at once.
        let long = "x".repeat(LIGHT_NAME_MAX + 1);
        t.add_found(&light(11, &long));
        assert!(t.has_node(11));
    }

    fn file_node(ino: u64, name: &str) -> Node {
        Node::new(
            ino,
            false,
            NodeState::new(ROOT, Some(Component::new(name).expect("name")), LayerIdx(1)),
        )
    }

    /// The kernel counts references per node id: a node that replaces another of the same id
    /// (an unlinked one looked up again by another name) stays until every reference to the id
    /// is forgotten, and a lookup whose node a FORGET took out of the table puts it back.
    #[test]
    fn references_are_counted_per_node_id() {
        let t = NodeTable::default();
        let (old, _) = t.insert_or_get(file_node(7, "c"), |_| false);
        t.add_lookup(&old);
        t.add_lookup(&old);
        old.write().unlinked = true;
        let (new, inserted) = t.insert_or_get(file_node(7, "d"), |o| !o.read().unlinked);
        assert!(inserted && !Arc::ptr_eq(&old, &new));
        t.add_lookup(&new);
        // The FORGET of the replaced node's two references leaves the new one in the table.
        t.forget(7, 2);
        assert!(t.get(7).is_some_and(|n| Arc::ptr_eq(&n, &new)));
        t.forget(7, 1);
        assert!(t.get(7).is_none());

        // A FORGET between a lookup's find and its count: the count puts the node back.
        let (n, _) = t.insert_or_get(file_node(9, "e"), |_| true);
        t.add_lookup(&n);
        let (found, inserted) = t.insert_or_get(file_node(9, "e"), |_| true);
        assert!(!inserted);
        t.forget(9, 1);
        assert!(t.get(9).is_none());
        t.add_lookup(&found);
        assert!(t.get(9).is_some_and(|g| Arc::ptr_eq(&g, &found)));
        t.forget(9, 1);
        assert!(t.is_empty());
    }
}
