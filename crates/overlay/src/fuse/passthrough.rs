//! Kernel passthrough of file data: which opens get it, and the backing files they share.

use std::sync::Arc;

use layerfs_sys as sys;

use super::Fuse;

/// Kernel passthrough of file data (FUSE_PASSTHROUGH, kernel ≥ 6.9, CAP_SYS_ADMIN).
///
/// Only upper files are passed through, and lower files of a read-only mount: a lower file may
/// be copied up while open, and an fd opened before the copy-up must then read the upper copy
/// (reference/overlay-semantics.md 11), which a passthrough fd on the lower file could not. All passthrough opens of one node share one
/// backing file, kept alive by the handles that use it. The kernel refuses to mix passthrough and
/// cached opens of one inode, so a node with cached opens (from before its copy-up) gets cached
/// opens until those close.
#[derive(Default)]
pub(super) struct Passthrough {
    /// Off until INIT granted it; off for good after the first refusal.
    pub(super) enabled: std::sync::atomic::AtomicBool,
    /// Lock order: `state` is a leaf lock, never held across a reply or I/O.
    state: std::sync::Mutex<PtState>,
}

#[derive(Default)]
struct PtState {
    /// Per node id: (real inode of the upper file, its shared backing) and the cached opens.
    by_ino: std::collections::HashMap<u64, InoIo>,
    /// Per handle: its node and the backing it holds (None: a cached open).
    by_fh: std::collections::HashMap<u64, (u64, Option<Arc<Backing>>)>,
}

#[derive(Default)]
struct InoIo {
    backing: Option<(u64, std::sync::Weak<Backing>)>,
    cached: u32,
}

impl Fuse {
    /// Replies to an OPEN/CREATE of handle `fh` on node `ino`: passthrough when `pass` (an upper
    /// file, or any file of a read-only mount) and possible, else a cached open.
    pub(super) fn open_mode(
        &self,
        ino: u64,
        fh: u64,
        pass: bool,
        open_backing: impl FnOnce(&OwnedFdRef) -> std::io::Result<Backing>,
    ) -> Option<Arc<Backing>> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut st = self.pt.state.lock().unwrap_or_else(|e| e.into_inner());
        if pass && self.pt.enabled.load(Relaxed) {
            let key = self.ovl.file_fd(fh).ok().and_then(|fd| {
                sys::stat_fd(std::os::fd::AsFd::as_fd(&*fd))
                    .ok()
                    .map(|s| (fd, s.st_ino))
            });
            let io = st.by_ino.entry(ino).or_default();
            if let (0, Some((fd, real))) = (io.cached, key) {
                let existing = io
                    .backing
                    .as_ref()
                    .filter(|(r, _)| *r == real)
                    .and_then(|(_, w)| w.upgrade());
                let backing = match existing {
                    Some(b) => Some(b),
                    None => match open_backing(&fd) {
                        Ok(b) => {
                            let b = Arc::new(b);
                            io.backing = Some((real, Arc::downgrade(&b)));
                            Some(b)
                        }
                        Err(e) => {
                            self.pt.enabled.store(false, Relaxed);
                            tracing::warn!(
                                "kernel passthrough unavailable ({e}); serving data through the daemon"
                            );
                            None
                        }
                    },
                };
                if let Some(b) = backing {
                    self.ovl.stats.passthrough_opens.fetch_add(1, Relaxed);
                    st.by_fh.insert(fh, (ino, Some(b.clone())));
                    return Some(b);
                }
            }
        }
        st.by_ino.entry(ino).or_default().cached += 1;
        st.by_fh.insert(fh, (ino, None));
        None
    }

    /// Whether node `ino` has exactly one open, a cached one.
    pub(super) fn sole_cached_open(&self, ino: u64) -> bool {
        let st = self.pt.state.lock().unwrap_or_else(|e| e.into_inner());
        st.by_ino
            .get(&ino)
            .is_some_and(|io| io.cached == 1 && io.backing.is_none())
    }

    /// RELEASE: drops what handle `fh` held.
    pub(super) fn release_mode(&self, fh: u64) {
        let mut st = self.pt.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some((ino, backing)) = st.by_fh.remove(&fh) else {
            return;
        };
        if let Some(io) = st.by_ino.get_mut(&ino) {
            if backing.is_none() {
                io.cached = io.cached.saturating_sub(1);
            }
            drop(backing);
            let live = io
                .backing
                .as_ref()
                .is_some_and(|(_, w)| w.strong_count() > 0);
            if io.cached == 0 && !live {
                st.by_ino.remove(&ino);
            }
        }
    }
}

/// A registered backing file of the connection. Made by the transport that answers the open:
/// fuser's reply for requests read from `/dev/fuse`, an ioctl on the connection's fd for requests
/// taken from io_uring. Closed when the last handle using it is released.
pub(super) enum Backing {
    /// Registered through a fuser reply (closed by fuser on drop).
    Session(fuser::BackingId),
    /// Registered by id on the connection `dev`.
    Raw {
        id: u32,
        dev: Arc<std::os::fd::OwnedFd>,
    },
}

impl Backing {
    /// The id the kernel knows it by, if this module knows it (fuser keeps its ids to itself).
    pub(super) fn raw_id(&self) -> Option<u32> {
        match self {
            Backing::Session(_) => None,
            Backing::Raw { id, .. } => Some(*id),
        }
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        if let Backing::Raw { id, dev } = self
            && let Err(e) = sys::fuse_uring::backing_close(std::os::fd::AsFd::as_fd(&**dev), *id)
        {
            tracing::debug!("closing backing file {id}: {e}");
        }
    }
}

/// The fd type handed to `open_backing`.
pub(super) type OwnedFdRef = Arc<std::os::fd::OwnedFd>;
