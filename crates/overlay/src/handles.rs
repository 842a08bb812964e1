//! Open files and directories. A file handle remembers which layer its fd belongs to, so that a
//! handle opened on a lower file before a copy-up reads the upper copy afterwards (as the kernel
//! overlay's `ovl_real_fdget` does).

use std::collections::HashMap;
use std::ffi::OsString;
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
    /// Name.
    pub name: OsString,
    /// `d_ino` (= `st_ino`).
    pub ino: u64,
    /// `d_type`.
    pub kind: FileType,
}

/// An open directory: the listing is taken at the first READDIR from offset 0 and served from
/// that snapshot, so one handle's listing is stable.
#[derive(Debug)]
pub struct DirHandle {
    /// The directory.
    pub node: Arc<Node>,
    /// The snapshot. Own lock.
    pub snapshot: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

/// A handle of either kind.
#[derive(Debug)]
pub enum Handle {
    /// From OPEN/CREATE.
    File(FileHandle),
    /// From OPENDIR.
    Dir(DirHandle),
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

/// All open handles. Lock: `map` (never held across I/O).
#[derive(Debug, Default)]
pub struct HandleTable {
    map: RwLock<HashMap<u64, Arc<Handle>>>,
    next: AtomicU64,
}

impl HandleTable {
    /// Registers a handle and returns its number.
    pub fn insert(&self, h: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(h));
        fh
    }

    /// The handle `fh`.
    pub fn get(&self, fh: u64) -> OvlResult<Arc<Handle>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(Errno::BADF)
    }

    /// The file handle `fh`.
    pub fn file(&self, fh: u64) -> OvlResult<Arc<Handle>> {
        let h = self.get(fh)?;
        match &*h {
            Handle::File(_) => Ok(h),
            Handle::Dir(_) => Err(Errno::ISDIR),
        }
    }

    /// Removes `fh`.
    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh)
    }
}
