//! Open files and directory listings in progress. A file handle remembers which layer its fd
//! belongs to, so that a handle opened on a lower file before a copy-up reads the upper copy
//! afterwards (as the kernel overlay's `ovl_real_fdget` does).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use layerfs_sys::{Errno, FileType, OFlags};

use crate::layers::LayerIdx;
use crate::node::Node;
use crate::overlay::OvlResult;

/// An open file.
#[derive(Debug)]
pub struct FileHandle {
    /// The node it was opened on.
    pub node: Arc<Node>,
    /// Flags to reopen with after a copy-up (access mode and status flags, no create/trunc).
    pub flags: OFlags,
    /// The fd for I/O and the layer it belongs to; swapped after a copy-up. Own lock, held only to
    /// read or swap the pair, never across I/O.
    file: Mutex<(LayerIdx, Arc<OwnedFd>)>,
}

/// One entry of a directory listing snapshot.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Name (shared with the directory's index).
    pub name: crate::index::Name,
    /// `d_ino` (= `st_ino`).
    pub ino: u64,
    /// `d_type`.
    pub kind: FileType,
}

impl DirEntry {
    /// Its name as an `OsStr`.
    pub fn name(&self) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(&self.name)
    }
}

impl FileHandle {
    /// A handle on `fd` (from `layer`) for `node`.
    pub fn new(node: Arc<Node>, flags: OFlags, layer: LayerIdx, fd: OwnedFd) -> Self {
        FileHandle {
            node,
            flags,
            file: Mutex::new((layer, Arc::new(fd))),
        }
    }

    /// The fd to do I/O on and the layer it belongs to.
    pub fn current(&self) -> (LayerIdx, Arc<OwnedFd>) {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Switches the handle to `fd` on the upper copy (after a copy-up).
    pub fn switch_to_upper(&self, fd: Arc<OwnedFd>) {
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = (LayerIdx::UPPER, fd);
    }
}

/// All open files. Lock: `map` (never held across I/O).
#[derive(Debug, Default)]
pub struct HandleTable {
    map: RwLock<HashMap<u64, Arc<FileHandle>>>,
    next: AtomicU64,
}

impl HandleTable {
    /// Registers a handle and returns its number.
    pub fn insert(&self, h: FileHandle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(h));
        fh
    }

    /// The file handle `fh`.
    pub fn file(&self, fh: u64) -> OvlResult<Arc<FileHandle>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(Errno::BADF)
    }

    /// Removes `fh`.
    pub fn remove(&self, fh: u64) -> Option<Arc<FileHandle>> {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh)
    }
}

/// A directory listing being read: READDIR carries no handle (the mount declines OPENDIR, so the
/// kernel sends no OPENDIR or RELEASEDIR at all), so the offsets a listing hands out name it:
/// `id << 32 | position`. The listing is taken at offset 0 and kept until it is read to its end
/// (or pushed out by newer ones), so one reader sees every entry present throughout exactly once
/// even while the directory changes.
#[derive(Clone)]
pub struct Listing {
    /// Its id (31 bits: offsets stay positive as `loff_t`).
    pub id: u32,
    /// The entries, `.` and `..` first.
    pub entries: Arc<Vec<DirEntry>>,
}

/// How many listings in progress are kept at once; an older one that is read on is taken again.
const LISTINGS_KEPT: usize = 256;
/// How many entries they may hold in all (about 20 MiB); the newest is kept whatever its size.
const ENTRIES_KEPT: usize = 1 << 18;

/// Listings in progress. Lock: `recent` (a leaf, never held across I/O).
#[derive(Debug, Default)]
pub struct Listings {
    /// (directory node id, listing), oldest first.
    recent: Mutex<std::collections::VecDeque<(u64, Listing)>>,
    next: std::sync::atomic::AtomicU32,
}

impl Listings {
    /// The offset of the entry after `pos` entries of listing `id`.
    pub fn offset(id: u32, pos: usize) -> u64 {
        (u64::from(id) << 32) | pos as u64
    }

    /// The listing and the position that `offset` (non-zero) names in directory `dir`, if kept.
    pub fn find(&self, dir: u64, offset: u64) -> Option<(Listing, usize)> {
        let id = (offset >> 32) as u32;
        let pos = (offset & u64::from(u32::MAX)) as usize;
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .find(|(d, l)| l.id == id && *d == dir)
            .map(|(_, l)| (l.clone(), pos))
    }

    /// Keeps a new listing of directory `dir`.
    pub fn add(&self, dir: u64, entries: Arc<Vec<DirEntry>>) -> Listing {
        let id = self.next.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
        let listing = Listing { id, entries };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_back((dir, listing.clone()));
        let mut total: usize = recent.iter().map(|(_, l)| l.entries.len()).sum();
        while recent.len() > LISTINGS_KEPT || (total > ENTRIES_KEPT && recent.len() > 1) {
            if let Some((_, old)) = recent.pop_front() {
                total -= old.entries.len();
            }
        }
        listing
    }

    /// Drops listing `id` (read to its end).
    pub fn done(&self, id: u32) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|(_, l)| l.id != id);
    }
}

impl std::fmt::Debug for Listing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listing({}, {} entries)", self.id, self.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize) -> Arc<Vec<DirEntry>> {
        Arc::new(
            (0..n)
                .map(|i| DirEntry {
                    name: format!("e{i}").as_bytes().into(),
                    ino: i as u64 + 1,
                    kind: FileType::RegularFile,
                })
                .collect(),
        )
    }

    #[test]
    fn offsets_name_their_listing_and_position() {
        let l = Listings::default();
        let a = l.add(7, entries(3));
        let b = l.add(7, entries(5));
        assert_ne!(a.id, b.id);
        let off = Listings::offset(b.id, 4);
        assert!(off > 0 && off < i64::MAX as u64);
        let (found, pos) = l.find(7, off).expect("kept");
        assert_eq!((found.id, found.entries.len(), pos), (b.id, 5, 4));
        assert!(l.find(8, off).is_none(), "another directory's offset");
        l.done(b.id);
        assert!(l.find(7, off).is_none());
        assert!(l.find(7, Listings::offset(a.id, 1)).is_some());
    }

    #[test]
    fn old_listings_are_pushed_out() {
        let l = Listings::default();
        let first = l.add(1, entries(1));
        for _ in 0..LISTINGS_KEPT {
            l.add(1, entries(1));
        }
        assert!(l.find(1, Listings::offset(first.id, 1)).is_none());
        // By size: a big listing pushes out the others, and is kept itself.
        let small = l.add(2, entries(10));
        let big = l.add(3, entries(ENTRIES_KEPT + 1));
        assert!(l.find(2, Listings::offset(small.id, 1)).is_none());
        assert!(l.find(3, Listings::offset(big.id, 1)).is_some());
    }
}
