//! The merged index of one directory: for every name, what the upper dir holds and what the lower
//! dirs would show. Built once per directory from one `getdents` pass over each of its layers, then
//! kept up to date by the operations that change the directory, so a lookup costs one hash probe
//! however many layers there are.
//!
//! Invariant: `lower` describes the lower dirs alone (ignoring the upper), so "would a whiteout be
//! needed if the upper entry went away" is `lower.is_some()`.

use std::collections::hash_map::Entry as MapEntry;

use foldhash::{HashMap, HashMapExt};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use layerfs_store::format::{self, DirMark, NameKind};
use layerfs_sys::{self as sys, Component, FileType, SysResult};

use crate::layers::LayerIdx;

/// A name in an index, shared with the listings made from it (a listing takes a reference, not a
/// copy, of each name).
pub type Name = Arc<[u8]>;

/// What the upper dir holds under a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpperSlot {
    /// A real entry of this type.
    Present(FileType),
    /// A whiteout: the name is deleted.
    Whiteout,
}

/// What the lower dirs show under a name: the first lower layer that has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerSlot {
    /// The topmost lower layer holding the name.
    pub layer: LayerIdx,
    /// Its type.
    pub kind: FileType,
    /// Its inode number in that layer (`d_ino`).
    pub ino: u64,
    /// For a directory: the further lower layers whose directory of the same name merges with it
    /// (until a non-directory, a whiteout or an opaque marker stops the merge).
    pub more: Box<[LayerIdx]>,
}

/// One name of a merged directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexEntry {
    /// What the upper dir holds.
    pub upper: Option<UpperSlot>,
    /// What the lower dirs show.
    pub lower: Option<LowerSlot>,
}

/// Where the visible object of a name lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visible {
    /// The layer of the topmost object.
    pub layer: LayerIdx,
    /// Its type.
    pub kind: FileType,
}

impl IndexEntry {
    /// The object the merged view shows, if any.
    pub fn visible(&self) -> Option<Visible> {
        match self.upper {
            Some(UpperSlot::Present(kind)) => Some(Visible {
                layer: LayerIdx::UPPER,
                kind,
            }),
            Some(UpperSlot::Whiteout) => None,
            None => self.lower.as_ref().map(|l| Visible {
                layer: l.layer,
                kind: l.kind,
            }),
        }
    }
}

/// The merged index of a directory. Owned by the directory's node, guarded by its state lock.
#[derive(Debug)]
pub struct DirIndex {
    entries: Entries,
}

/// The names of an index.
#[derive(Debug)]
enum Entries {
    /// Sorted by name, each once: a directory of one lower layer under an empty upper (most of an
    /// image's), until its first change. Found by binary search; listed in order. Building it
    /// costs a sort, which a listing needs anyway, where a hash map cost a fifth of the daemon's
    /// time listing a directory of 50k names.
    Sorted(Vec<(Name, IndexEntry)>),
    /// Any index, once changed.
    Map(HashMap<Name, IndexEntry>),
}

impl Default for DirIndex {
    fn default() -> Self {
        DirIndex {
            entries: Entries::Sorted(Vec::new()),
        }
    }
}

/// A layer directory to read while building an index.
pub struct LayerDir<'a> {
    /// Which layer.
    pub layer: LayerIdx,
    /// `O_PATH` fd of the directory in that layer.
    pub fd: BorrowedFd<'a>,
    /// Its opaque mark, if known (else read from its xattrs).
    pub mark: Option<DirMark>,
}

/// The lower half of an entry while the index is built.
enum LowerBuild {
    Dir(LowerSlot),
    /// Decided, and closed to further layers (non-dir, or a dir whose merge stopped).
    Closed(LowerSlot),
    Whiteout,
}

impl DirIndex {
    /// Reads `upper` (if any) and then `lowers` (top first) and merges them.
    pub fn build(upper: Option<BorrowedFd<'_>>, lowers: &[LayerDir<'_>]) -> SysResult<DirIndex> {
        let mut entries: HashMap<Name, IndexEntry> = HashMap::new();
        let mut lowers_visible = true;
        let mut upper_empty = true;
        if let Some(fd) = upper {
            let listing = read_layer(fd, None)?;
            if listing.opaque {
                lowers_visible = false;
            }
            upper_empty = listing.items.is_empty();
            for (name, item) in listing.items {
                let slot = match item {
                    Item::Whiteout => UpperSlot::Whiteout,
                    Item::Entry(kind, _) => UpperSlot::Present(kind),
                };
                let e = entries.entry(name).or_default();
                // A real entry beats a `.wh.` file of the same name.
                if e.upper.is_none() || slot != UpperSlot::Whiteout {
                    e.upper = Some(slot);
                }
            }
        }
        // One lower layer under an empty upper (most directories of an image): its entries are the
        // index, and its whiteouts hide nothing.
        if let ([dir], true, true) = (lowers, upper_empty, lowers_visible) {
            let listing = read_layer(dir.fd, dir.mark)?;
            let mut sorted: Vec<(Name, IndexEntry)> = listing
                .items
                .into_iter()
                .filter_map(|(name, item)| match item {
                    Item::Entry(kind, ino) => Some((
                        name,
                        IndexEntry {
                            upper: None,
                            lower: Some(LowerSlot::new(dir.layer, kind, ino)),
                        },
                    )),
                    Item::Whiteout => None,
                })
                .collect();
            sort_by_name(&mut sorted, 0, |(n, _)| n);
            return Ok(DirIndex {
                entries: Entries::Sorted(sorted),
            });
        }
        let mut lower: HashMap<Name, LowerBuild> = HashMap::new();
        if lowers_visible {
            for dir in lowers {
                let listing = read_layer(dir.fd, dir.mark)?;
                for (name, item) in listing.items {
                    match lower.entry(name) {
                        MapEntry::Vacant(v) => {
                            v.insert(match item {
                                Item::Whiteout => LowerBuild::Whiteout,
                                Item::Entry(FileType::Directory, ino) => LowerBuild::Dir(
                                    LowerSlot::new(dir.layer, FileType::Directory, ino),
                                ),
                                Item::Entry(kind, ino) => {
                                    LowerBuild::Closed(LowerSlot::new(dir.layer, kind, ino))
                                }
                            });
                        }
                        MapEntry::Occupied(mut o) => {
                            if let LowerBuild::Dir(slot) = o.get_mut() {
                                if matches!(item, Item::Entry(FileType::Directory, _)) {
                                    let mut more = slot.more.to_vec();
                                    more.push(dir.layer);
                                    slot.more = more.into_boxed_slice();
                                } else {
                                    let slot = std::mem::replace(slot, empty_slot());
                                    o.insert(LowerBuild::Closed(slot));
                                }
                            }
                        }
                    }
                }
                if listing.opaque {
                    break;
                }
            }
        }
        for (name, state) in lower {
            let slot = match state {
                LowerBuild::Dir(s) | LowerBuild::Closed(s) => s,
                LowerBuild::Whiteout => continue,
            };
            entries.entry(name).or_default().lower = Some(slot);
        }
        Ok(DirIndex {
            entries: Entries::Map(entries),
        })
    }

    /// Every name with its entry, in name order if [`DirIndex::iterates_sorted`].
    fn iter(&self) -> Box<dyn Iterator<Item = (&Name, &IndexEntry)> + '_> {
        match &self.entries {
            Entries::Sorted(v) => Box::new(v.iter().map(|(n, e)| (n, e))),
            Entries::Map(m) => Box::new(m.iter()),
        }
    }

    /// Whether [`DirIndex::for_each_visible`] goes in name order.
    pub fn iterates_sorted(&self) -> bool {
        matches!(self.entries, Entries::Sorted(_))
    }

    /// The entry for `name`.
    pub fn get(&self, name: &[u8]) -> Option<&IndexEntry> {
        match &self.entries {
            Entries::Sorted(v) => v
                .binary_search_by(|(n, _)| (**n).cmp(name))
                .ok()
                .map(|i| &v[i].1),
            Entries::Map(m) => m.get(name),
        }
    }

    /// The visible object under `name`.
    pub fn visible(&self, name: &[u8]) -> Option<Visible> {
        self.get(name).and_then(IndexEntry::visible)
    }

    /// Records what the upper dir now holds under `name` (`None`: nothing). A sorted index
    /// becomes a map.
    pub fn set_upper(&mut self, name: &[u8], slot: Option<UpperSlot>) {
        if slot.is_none() && self.get(name).is_none() {
            return;
        }
        if let Entries::Sorted(v) = &mut self.entries {
            let mut m = HashMap::with_capacity(v.len() + 1);
            m.extend(std::mem::take(v));
            self.entries = Entries::Map(m);
        }
        let Entries::Map(entries) = &mut self.entries else {
            return;
        };
        match (entries.get_mut(name), slot) {
            (Some(e), slot) => {
                e.upper = slot;
                if e.upper.is_none() && e.lower.is_none() {
                    entries.remove(name);
                }
            }
            (None, Some(slot)) => {
                entries.insert(
                    name.into(),
                    IndexEntry {
                        upper: Some(slot),
                        lower: None,
                    },
                );
            }
            (None, None) => {}
        }
    }

    /// Whether the merged directory shows no entry.
    pub fn is_empty_merged(&self) -> bool {
        self.iter().all(|(_, e)| e.visible().is_none())
    }

    /// Visible names with their entries, sorted by name.
    pub fn visible_sorted(&self) -> Vec<(Name, Visible)> {
        let mut out: Vec<_> = self
            .iter()
            .filter_map(|(n, e)| e.visible().map(|v| (n.clone(), v)))
            .collect();
        if !self.iterates_sorted() {
            sort_by_name(&mut out, 0, |(n, _)| n);
        }
        out
    }

    /// Calls `f(name, visible, lower)` for each visible name (in name order if
    /// [`DirIndex::iterates_sorted`]), with the `(layer, d_ino)` of its lower object when the
    /// lower object is what the view shows (for `d_ino` without opening it).
    pub fn for_each_visible(&self, mut f: impl FnMut(&Name, Visible, Option<(LayerIdx, u64)>)) {
        for (n, e) in self.iter() {
            let Some(v) = e.visible() else {
                continue;
            };
            let lower = e
                .lower
                .as_ref()
                .filter(|_| !v.layer.is_upper())
                .map(|l| (l.layer, l.ino));
            f(n, v, lower);
        }
    }

    /// How many names the index holds (visible or not): a listing's capacity.
    pub fn capacity_hint(&self) -> usize {
        match &self.entries {
            Entries::Sorted(v) => v.len(),
            Entries::Map(m) => m.len(),
        }
    }
}

/// Sorts `items` after the first `skip` by `name`, bytewise. The sort compares the first eight
/// bytes of the names as one big-endian number, and whole names only where those are equal, and
/// moves 16-byte keys, not items; each item then moves once.
pub(crate) fn sort_by_name<T>(items: &mut Vec<T>, skip: usize, name: impl Fn(&T) -> &[u8]) {
    fn prefix(name: &[u8]) -> u64 {
        let mut b = [0u8; 8];
        let n = name.len().min(8);
        b[..n].copy_from_slice(&name[..n]);
        u64::from_be_bytes(b)
    }
    let mut keys: Vec<(u64, usize)> = items
        .iter()
        .enumerate()
        .skip(skip)
        .map(|(i, e)| (prefix(name(e)), i))
        .collect();
    keys.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| name(&items[a.1]).cmp(name(&items[b.1])))
    });
    let mut slots: Vec<Option<T>> = std::mem::take(items).into_iter().map(Some).collect();
    // The first `skip` in place, then `keys`, which holds each other index once: every slot is
    // taken exactly once.
    let order = (0..skip.min(slots.len())).chain(keys.iter().map(|&(_, i)| i));
    *items = order
        .filter_map(|i| slots.get_mut(i).and_then(Option::take))
        .collect();
}

fn empty_slot() -> LowerSlot {
    LowerSlot::new(LayerIdx::UPPER, FileType::Unknown, 0)
}

impl LowerSlot {
    /// A name found in `layer` alone (no further layer merged yet).
    fn new(layer: LayerIdx, kind: FileType, ino: u64) -> Self {
        LowerSlot {
            layer,
            kind,
            ino,
            more: Box::new([]),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Entry(FileType, u64),
    Whiteout,
}

struct Listing {
    /// Each name once (a real entry beats a `.wh.` file naming it).
    items: Vec<(Name, Item)>,
    opaque: bool,
}

/// One layer directory, decoded: whiteouts in every encoding, opaque marker entries, and
/// `d_type`s filled in where the filesystem left them unknown. `mark`: its opaque mark if known.
fn read_layer(fd: BorrowedFd<'_>, mark: Option<DirMark>) -> SysResult<Listing> {
    let mark = mark.unwrap_or_else(|| format::dir_mark(fd));
    let mut items: Vec<(Name, Item)> = Vec::new();
    // `.wh.NAME` files: they may name an entry of this same dir, resolved at the end.
    let mut wh_files = Vec::new();
    let mut opaque = mark == DirMark::Opaque;
    sys::dir::for_each(fd, |name, mut kind, ino| {
        match format::classify_name(name) {
            NameKind::OpaqueMarker => {
                opaque = true;
                return Ok(());
            }
            NameKind::WhiteoutFor(target) => {
                wh_files.push(Name::from(target));
                return Ok(());
            }
            NameKind::Meta | NameKind::Invalid => return Ok(()),
            NameKind::Plain => {}
        }
        let needs_stat = matches!(kind, FileType::Unknown | FileType::CharacterDevice)
            || (mark == DirMark::HasXWhiteouts && kind == FileType::RegularFile);
        if needs_stat {
            let comp = Component::new(OsStr::from_bytes(name))?;
            let st = match sys::stat_at(fd, &comp) {
                Ok(st) => st,
                Err(sys::Errno::NOENT) => return Ok(()),
                Err(e) => return Err(e),
            };
            kind = sys::file_type(&st);
            if format::is_chardev_whiteout(&st) {
                items.push((name.into(), Item::Whiteout));
                return Ok(());
            }
            if mark == DirMark::HasXWhiteouts && kind == FileType::RegularFile && st.st_size == 0 {
                let f = sys::open_path(fd, &comp)?;
                if format::is_xwhiteout(f.as_fd(), &st) {
                    items.push((name.into(), Item::Whiteout));
                    return Ok(());
                }
            }
        }
        // Straight from the getdents buffer into the listing: one allocation per name.
        items.push((name.into(), Item::Entry(kind, ino)));
        Ok(())
    })?;
    if !wh_files.is_empty() {
        let named: std::collections::HashSet<&[u8]> = items.iter().map(|(n, _)| &**n).collect();
        let mut extra: Vec<Name> = wh_files
            .into_iter()
            .filter(|t| !named.contains(&**t))
            .collect();
        extra.sort_unstable();
        extra.dedup();
        items.extend(extra.into_iter().map(|t| (t, Item::Whiteout)));
    }
    Ok(Listing { items, opaque })
}

/// Keeps an fd alive next to a layer index.
pub type LayerFd = (LayerIdx, Arc<OwnedFd>);

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;

    /// Layers 1 and 2 of an index build.
    fn two_lowers<'a>(f1: &'a OwnedFd, f2: &'a OwnedFd) -> [LayerDir<'a>; 2] {
        [
            LayerDir {
                layer: LayerIdx(1),
                fd: f1.as_fd(),
                mark: None,
            },
            LayerDir {
                layer: LayerIdx(2),
                fd: f2.as_fd(),
                mark: None,
            },
        ]
    }

    fn layer(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f.trim_end_matches('/'));
            if f.ends_with('/') {
                fs::create_dir_all(&p).expect("mkdir");
            } else {
                fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                fs::write(&p, b"x").expect("write");
            }
        }
    }

    /// Upper and two lowers, in the unprivileged encoding (`.wh.` files), merged by name.
    #[test]
    fn merges_layers_top_down() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (u, l1, l2) = (
            tmp.path().join("u"),
            tmp.path().join("l1"),
            tmp.path().join("l2"),
        );
        layer(&u, &["new", ".wh.gone", "both", "dir/"]);
        layer(
            &l1,
            &[
                "both",
                "gone",
                "dir/",
                "only1",
                ".wh.hidden2",
                "file_over_dir",
            ],
        );
        layer(
            &l2,
            &["hidden2", "dir/", "only2", "file_over_dir/", "deep/"],
        );
        let open = |p: &Path| sys::open_root(p).expect("open");
        let (uf, f1, f2) = (open(&u), open(&l1), open(&l2));
        let lowers = two_lowers(&f1, &f2);
        let idx = DirIndex::build(Some(uf.as_fd()), &lowers).expect("build");
        let vis = |n: &str| idx.visible(n.as_bytes()).map(|v| v.layer.0);
        let cases: &[(&str, Option<u16>)] = &[
            ("new", Some(0)),
            ("both", Some(0)),
            ("gone", None),
            ("only1", Some(1)),
            ("hidden2", None),
            ("only2", Some(2)),
            ("file_over_dir", Some(1)),
            ("deep", Some(2)),
            ("dir", Some(0)),
            ("absent", None),
        ];
        for (name, want) in cases {
            assert_eq!(vis(name), *want, "{name}");
        }
        // A deleted name still counts as present in the lowers (a whiteout must stay).
        assert!(idx.get(b"gone").is_some_and(|e| e.lower.is_some()));
        // The directory merges with both lowers; a file above a directory stops the merge.
        let dir = idx
            .get(b"dir")
            .and_then(|e| e.lower.clone())
            .expect("dir lower");
        assert_eq!((dir.layer, &*dir.more), (LayerIdx(1), &[LayerIdx(2)][..]));
        let fod = idx
            .get(b"file_over_dir")
            .and_then(|e| e.lower.clone())
            .expect("lower");
        assert_eq!((fod.kind, fod.more.len()), (FileType::RegularFile, 0));
        assert_eq!(idx.visible_sorted().len(), 7);
    }

    /// A directory of one lower layer under an empty upper is kept sorted and found by binary
    /// search; whiteouts in it hide nothing and are not names; its first change makes it a map
    /// that answers the same.
    #[test]
    fn one_lower_layer_is_searched_then_changed_as_a_map() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (u, l1) = (tmp.path().join("u"), tmp.path().join("l1"));
        let names = ["m", "a", "zz", "abcdefghB", "abcdefghA", "\u{e9}", "dir/"];
        layer(&l1, &names);
        layer(&l1, &[".wh.ghost"]);
        fs::create_dir_all(&u).expect("mkdir");
        let (uf, f1) = (
            sys::open_root(&u).expect("open"),
            sys::open_root(&l1).expect("open"),
        );
        let lowers = [LayerDir {
            layer: LayerIdx(1),
            fd: f1.as_fd(),
            mark: None,
        }];
        let mut idx = DirIndex::build(Some(uf.as_fd()), &lowers).expect("build");
        assert!(idx.iterates_sorted());
        let mut want: Vec<&[u8]> = names
            .iter()
            .map(|n| n.trim_end_matches('/').as_bytes())
            .collect();
        want.sort();
        let listed: Vec<Name> = idx.visible_sorted().into_iter().map(|(n, _)| n).collect();
        assert_eq!(listed.iter().map(|n| &**n).collect::<Vec<_>>(), want);
        let mut walked = Vec::new();
        idx.for_each_visible(|n, _, lower| {
            assert_eq!(lower.map(|l| l.0), Some(LayerIdx(1)));
            walked.push(n.clone());
        });
        assert_eq!(walked, listed);
        for n in &want {
            assert_eq!(idx.visible(n).map(|v| v.layer), Some(LayerIdx(1)), "{n:?}");
        }
        for absent in [&b"ghost"[..], b"", b"abcdefgh", b"zzz", b"0"] {
            assert!(idx.get(absent).is_none(), "{absent:?}");
        }
        assert_eq!(
            idx.visible(b"dir").map(|v| v.kind),
            Some(FileType::Directory)
        );
        // Deleting a name that is not there changes nothing; a change makes a map.
        idx.set_upper(b"nothing", None);
        assert!(idx.iterates_sorted());
        idx.set_upper(b"a", Some(UpperSlot::Whiteout));
        idx.set_upper(b"new", Some(UpperSlot::Present(FileType::RegularFile)));
        assert!(!idx.iterates_sorted());
        assert!(idx.visible(b"a").is_none() && idx.get(b"a").is_some());
        assert_eq!(idx.visible(b"new").map(|v| v.layer), Some(LayerIdx::UPPER));
        assert_eq!(idx.visible(b"m").map(|v| v.layer), Some(LayerIdx(1)));
        let listed: Vec<Name> = idx.visible_sorted().into_iter().map(|(n, _)| n).collect();
        assert_eq!(listed.len(), want.len());
        assert!(listed.windows(2).all(|w| w[0] < w[1]), "{listed:?}");
    }

    /// An opaque marker in a lower dir hides everything below it.
    #[test]
    fn opaque_marker_stops_the_merge() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (l1, l2) = (tmp.path().join("l1"), tmp.path().join("l2"));
        layer(&l1, &["a", ".wh..wh..opq"]);
        layer(&l2, &["b"]);
        let (f1, f2) = (
            sys::open_root(&l1).expect("open"),
            sys::open_root(&l2).expect("open"),
        );
        let lowers = two_lowers(&f1, &f2);
        let idx = DirIndex::build(None, &lowers).expect("build");
        assert!(idx.visible(b"a").is_some());
        assert!(idx.visible(b"b").is_none());
        assert!(idx.visible(b".wh..wh..opq").is_none());
    }
}
