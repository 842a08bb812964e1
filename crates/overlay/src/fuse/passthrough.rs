//! Kernel passthrough of file data: which opens get it, and the backing files they share.

use std::sync::Arc;

use layerfs_sys as sys;

use super::Fuse;

/// Kernel passthrough of file data (FUSE_PASSTHROUGH, kernel ≥ 6.9, CAP_SYS_ADMIN).
///
/// Only upper files are passed through (with the upper inode of a lower hard-link group, which
/// every copy-up of the group's names links), and lower files of a read-only mount: a lower file
/// may be copied up while open, and an fd opened before the copy-up must then read the upper copy
/// (reference/overlay-semantics.md 11), which a passthrough fd on the lower file could not. All passthrough opens of one node share one
/// backing file, kept alive by the handles that use it. The kernel refuses to mix passthrough and
/// cached opens of one inode, so a node with cached opens (from before its copy-up) gets cached
/// opens until those close, and an open that may not be passed through while the node has
/// passthrough opens (or one of another inode than theirs) gets a direct-I/O open, which the
/// kernel lets coexist with either.
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

/// What an open finds of the backing its node's other opens use.
enum Shared {
    /// The node has cached opens: this one is cached too.
    Cached,
    /// A live backing of the same inode, now shared with this handle.
    Found(Arc<Backing>),
    /// A live backing of another inode (the node's object changed while a handle holds it).
    Other,
    /// None yet.
    None,
}

/// How an open is answered.
pub(super) enum OpenMode {
    /// Passed through to this backing file.
    Pass(Arc<Backing>),
    /// Through the daemon and the kernel's page cache.
    Cached,
    /// Through the daemon without the page cache (FOPEN_DIRECT_IO): for an open that may be
    /// neither, because the kernel inode has passthrough opens of another backing file, or the
    /// open may not be passed through while others are. The kernel puts the inode of a cached
    /// open in cached mode and that of a passthrough open in passthrough mode, refuses (EIO) an
    /// open that does not fit the mode, and lets a direct-I/O open fit either.
    Direct,
}

impl OpenMode {
    /// The backing to pass through to, and whether the open is direct.
    pub(super) fn into_parts(self) -> (Option<Arc<Backing>>, bool) {
        match self {
            OpenMode::Pass(b) => (Some(b), false),
            OpenMode::Cached => (None, false),
            OpenMode::Direct => (None, true),
        }
    }
}

#[derive(Default)]
struct InoIo {
    backing: Option<(u64, std::sync::Weak<Backing>)>,
    cached: u32,
}

impl InoIo {
    /// The node's backing of real inode `real`, if a handle still holds it.
    fn live_backing(&self, real: u64) -> Option<Arc<Backing>> {
        self.backing
            .as_ref()
            .filter(|(r, _)| *r == real)
            .and_then(|(_, w)| w.upgrade())
    }

    /// Whether a handle still holds a backing of the node, of whatever inode.
    fn any_live_backing(&self) -> bool {
        self.backing
            .as_ref()
            .is_some_and(|(_, w)| w.strong_count() > 0)
    }
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
    ) -> OpenMode {
        use std::sync::atomic::Ordering::Relaxed;
        // The file and its real inode, found before the state lock is taken (no I/O under it).
        let key = (pass && self.pt.enabled.load(Relaxed))
            .then(|| self.ovl.file_fd(fh).ok())
            .flatten()
            .and_then(|fd| {
                sys::stat_fd(std::os::fd::AsFd::as_fd(&*fd))
                    .ok()
                    .map(|s| (fd, s.st_ino))
            });
        if let Some((fd, real)) = key {
            match self.shared_backing(ino, fh, real) {
                Shared::Cached => {}
                Shared::Found(b) => return OpenMode::Pass(b),
                Shared::Other => return OpenMode::Direct,
                Shared::None => match open_backing(&fd) {
                    // Registered there, as passthrough or cached.
                    Ok(b) => return self.adopt_backing(ino, fh, real, Arc::new(b)),
                    Err(e) => {
                        self.pt.enabled.store(false, Relaxed);
                        tracing::warn!(
                            "kernel passthrough unavailable ({e}); serving data through the daemon"
                        );
                    }
                },
            }
        }
        let mut st = self.pt.state.lock().unwrap_or_else(|e| e.into_inner());
        let io = st.by_ino.entry(ino).or_default();
        if io.any_live_backing() {
            // Not counted: a direct open holds no mode of the inode.
            return OpenMode::Direct;
        }
        io.cached += 1;
        st.by_fh.insert(fh, (ino, None));
        OpenMode::Cached
    }

    /// Whether handle `fh` of node `ino` (real inode `real`) can share a backing: taken if the
    /// node has a live one for that inode; none if the node has cached opens.
    fn shared_backing(&self, ino: u64, fh: u64, real: u64) -> Shared {
        let mut st = self.pt.state.lock().unwrap_or_else(|e| e.into_inner());
        let io = st.by_ino.entry(ino).or_default();
        if io.cached != 0 {
            return Shared::Cached;
        }
        match io.live_backing(real) {
            Some(b) => {
                self.ovl
                    .stats
                    .passthrough_opens
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                st.by_fh.insert(fh, (ino, Some(b.clone())));
                Shared::Found(b)
            }
            None if io.any_live_backing() => Shared::Other,
            None => Shared::None,
        }
    }

    /// Records the backing `made` (opened without the lock) for handle `fh`, or, if another open
    /// of the node registered one for the same inode meanwhile, shares that one and closes
    /// `made`. If a cached open of the node came meanwhile, this one is registered as cached
    /// too (the kernel does not mix them); if a backing of another inode did, it is a direct
    /// open.
    fn adopt_backing(&self, ino: u64, fh: u64, real: u64, made: Arc<Backing>) -> OpenMode {
        let mut st = self.pt.state.lock().unwrap_or_else(|e| e.into_inner());
        let io = st.by_ino.entry(ino).or_default();
        let (kept, spare) = if io.cached != 0 {
            io.cached += 1;
            (None, made)
        } else {
            match io.live_backing(real) {
                Some(b) => (Some(b), made),
                None if io.any_live_backing() => {
                    drop(st);
                    drop(made);
                    return OpenMode::Direct;
                }
                None => {
                    io.backing = Some((real, Arc::downgrade(&made)));
                    (Some(made.clone()), made)
                }
            }
        };
        if kept.is_some() {
            self.ovl
                .stats
                .passthrough_opens
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        st.by_fh.insert(fh, (ino, kept.clone()));
        drop(st);
        // Closes `made` unless it was kept (then another reference lives on in `kept`).
        drop(spare);
        kept.map_or(OpenMode::Cached, OpenMode::Pass)
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
        let (ino, backing) = {
            let mut st = self.pt.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some((ino, backing)) = st.by_fh.remove(&fh) else {
                return;
            };
            if backing.is_none()
                && let Some(io) = st.by_ino.get_mut(&ino)
            {
                io.cached = io.cached.saturating_sub(1);
            }
            (ino, backing)
        };
        // The last handle's reference closes the backing (an ioctl), outside the lock.
        drop(backing);
        let mut st = self.pt.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(io) = st.by_ino.get(&ino) {
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
