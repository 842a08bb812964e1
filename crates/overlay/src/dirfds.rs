//! A bounded cache of directory fds.
//!
//! A directory node needs an `O_PATH` fd per layer it has a part in (its upper dir and every lower
//! dir merged below): lookups in it open names relative to them. Kept for every directory the
//! kernel caches, that is one fd per layer per directory — 16 000 after a walk of 5 000 dirs over 50
//! layers, close to a typical `RLIMIT_NOFILE`. So the fds are a cache with a budget: past it, the
//! directories whose fds were opened longest ago give them up ([`Overlay::note_dir_fds`]) and reopen
//! them by name from their parent when next needed ([`Overlay::dir_fds`]).
//!
//! Reopening by name gives the same objects because the lowers never change and the node's
//! parent and name follow every rename. A directory whose lower parts are not at its name in its
//! parent's lower dirs — one reached through a `redirect` (moved by us or by the kernel overlay)
//! — keeps its fds (`pinned`); so do the root and removed directories, which have no name to be
//! found by.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use layerfs_store::format::{self, DirMark};
use layerfs_sys::{self as sys, Errno, xattr};

use crate::index::LayerFd;
use crate::layers::LayerIdx;
use crate::node::{Node, ROOT};
use crate::overlay::{Overlay, OvlResult};

/// The budget when the mount does not set one.
pub const DEFAULT_BUDGET: usize = 4096;

/// The fds of one directory: its upper dir (if any) and its lower dirs, top first.
pub(crate) type DirFds = (Option<Arc<OwnedFd>>, Vec<LayerFd>);

/// Directories holding fds, oldest first, with the number of fds each held when noted.
#[derive(Debug)]
pub(crate) struct DirFdCache {
    budget: usize,
    inner: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    dirs: VecDeque<(u64, usize)>,
    held: usize,
}

impl DirFdCache {
    /// A cache that keeps about `budget` directory fds open (0: [`DEFAULT_BUDGET`]).
    pub(crate) fn new(budget: usize) -> Self {
        DirFdCache {
            budget: if budget == 0 { DEFAULT_BUDGET } else { budget },
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Overlay {
    /// `dir`'s upper and lower fds, reopened by name first if they were given up.
    pub(crate) fn dir_fds(&self, dir: &Node) -> OvlResult<DirFds> {
        {
            let s = dir.read();
            if s.evicted.is_none() {
                return Ok((s.upper.clone(), s.lower_dirs.clone()));
            }
        }
        self.restore_dir_fds(dir)
    }

    /// Records that `dir` now holds `count` fds, and closes those of the directories that opened
    /// theirs longest ago while the cache is over budget.
    pub(crate) fn note_dir_fds(&self, dir: &Node, count: usize) {
        if dir.ino == ROOT || count == 0 {
            return;
        }
        let victims: Vec<(u64, usize)> = {
            let mut q = self.dir_fd_cache.lock();
            q.dirs.push_back((dir.ino, count));
            q.held += count;
            let mut v = Vec::new();
            while q.held > self.dir_fd_cache.budget {
                let Some(victim) = q.dirs.pop_front() else {
                    break;
                };
                q.held = q.held.saturating_sub(victim.1);
                v.push(victim);
            }
            v
        };
        for (ino, count) in victims {
            // An older entry of the directory just noted is simply dropped.
            if ino != dir.ino && !self.evict_dir_fds(ino) {
                // In use right now: keep it queued (as the newest; it is tried again later).
                let mut q = self.dir_fd_cache.lock();
                q.dirs.push_back((ino, count));
                q.held += count;
            }
        }
    }

    /// Closes the fds of directory `ino` unless it is busy or cannot reopen them by name.
    /// Returns false if they were kept.
    fn evict_dir_fds(&self, ino: u64) -> bool {
        let Some(node) = self.nodes.get(ino) else {
            return true;
        };
        let parent = node.read().parent;
        let Some(parent) = self.nodes.get(parent) else {
            return true;
        };
        // Nobody may be changing the directory or its entry in the parent (a rename moves both).
        let (Some(_op), Some(_pop), Some(_cu)) = (
            node.try_op_lock(),
            parent.try_op_lock(),
            node.try_copyup_lock(),
        ) else {
            return false;
        };
        let mut s = node.write();
        if s.pinned || s.unlinked || s.evicted.is_some() {
            return true;
        }
        if s.parent != parent.ino {
            return false;
        }
        let layers: Box<[LayerIdx]> = s.lower_dirs.iter().map(|(l, _)| *l).collect();
        s.evicted = Some(layers);
        s.upper = None;
        s.lower_dirs = Vec::new();
        self.stats
            .dir_fd_evictions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Reopens the fds of a directory that gave them up: its upper dir by name in its parent's
    /// upper dir, its lower dirs by name in the same lower layers of its parent as before.
    fn restore_dir_fds(&self, dir: &Node) -> OvlResult<DirFds> {
        loop {
            let (parent_ino, name, place, layers) = {
                let s = dir.read();
                let Some(layers) = &s.evicted else {
                    return Ok((s.upper.clone(), s.lower_dirs.clone()));
                };
                if s.unlinked {
                    return Err(Errno::NOENT);
                }
                (s.parent, s.name.clone(), s.place, layers.clone())
            };
            let name = name.ok_or(Errno::STALE)?;
            let parent = self.node(parent_ino)?;
            let upper = if place.is_upper() {
                let fd =
                    sys::open_path_dir(self.dir_fd_in(&parent, LayerIdx::UPPER)?.as_fd(), &name)?;
                Some(Arc::new(fd))
            } else {
                None
            };
            // As a fresh lookup would: an opaque upper dir has no lower parts, a redirected one
            // has them where the redirect says (such dirs are pinned; this only covers a race).
            let opaque = upper
                .as_ref()
                .is_some_and(|u| format::dir_mark(u.as_fd()) == DirMark::Opaque);
            let redirect = upper
                .as_ref()
                .filter(|_| !opaque)
                .and_then(|u| xattr::get(u.as_fd(), self.layers.encoding.redirect_xattr()).ok());
            let mut lower_dirs = Vec::with_capacity(layers.len());
            let redirected = redirect.is_some();
            if let Some(target) = redirect {
                self.redirect_lower_dirs(&parent, &target, None, &mut lower_dirs)?;
            } else if !opaque {
                for layer in layers.iter().copied() {
                    let pfd = self.dir_fd_in(&parent, layer)?;
                    lower_dirs.push((layer, Arc::new(sys::open_path_dir(pfd.as_fd(), &name)?)));
                }
            }
            let count = lower_dirs.len() + usize::from(upper.is_some());
            {
                let mut s = dir.write();
                if s.evicted.is_none() {
                    return Ok((s.upper.clone(), s.lower_dirs.clone()));
                }
                // Moved meanwhile: the names opened may be another directory's. Try again.
                if s.parent != parent_ino || s.name.as_ref() != Some(&name) || s.place != place {
                    continue;
                }
                s.evicted = None;
                s.upper = upper.clone();
                s.lower_dirs = lower_dirs.clone();
                // Parts found through a redirect had no marks read.
                s.plain_lowers &= !redirected;
            }
            self.stats
                .dir_fd_restores
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.note_dir_fds(dir, count);
            return Ok((upper, lower_dirs));
        }
    }
}
