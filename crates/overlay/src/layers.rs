//! The directories a mount is made of: an optional writable upper dir with its work dir, and the
//! read-only lower dirs, top first. Also the inode-number map ("xino") that keeps `st_ino` unique
//! when the layers sit on several filesystems.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::AtomicBool;

use foldhash::{HashSet, HashSetExt};

use layerfs_store::format::Encoding;
use layerfs_sys::{self as sys, Component, Errno, Mode, SysResult};

use crate::durability::SyncPolicy;

/// Index of a layer in a mount: 0 is the upper dir, `i + 1` is lower dir `i` (top first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerIdx(pub u16);

impl LayerIdx {
    /// The upper dir.
    pub const UPPER: LayerIdx = LayerIdx(0);

    /// Whether this is the upper dir.
    pub fn is_upper(self) -> bool {
        self.0 == 0
    }
}

/// What a mount is made of, as given by the user.
#[derive(Debug, Clone, Default)]
pub struct OverlayConfig {
    /// Lower dirs, top first.
    pub lowers: Vec<PathBuf>,
    /// Upper dir; `None` makes a read-only mount.
    pub upper: Option<PathBuf>,
    /// Work dir, on the same filesystem as `upper`.
    pub work: Option<PathBuf>,
    /// Make no copied-up file durable before its rename (like the kernel's `volatile`): faster,
    /// not crash-safe.
    pub volatile: bool,
    /// About how many directory fds to keep open ([`crate::dirfds`]); 0 = the default.
    pub dir_fds: usize,
}

/// The open layers of a mount. Immutable after mount.
#[derive(Debug)]
pub struct Layers {
    /// `O_PATH` fds of the layer roots: index 0 is the upper (if any), then the lowers.
    roots: Vec<Option<OwnedFd>>,
    /// `O_PATH` fd of `work/work`, where copy-ups and new directories are built.
    work: Option<OwnedFd>,
    /// `O_PATH` fd of `work/layerfs-index`: one entry per lower hard-link group that has an upper
    /// inode, named by the group's `st_ino` ([`crate::group`]). Kept across mounts.
    index: Option<OwnedFd>,
    /// The keys of the entries `index` may hold: every entry it holds, read at mount, and every
    /// key noted before its entry is published since. A key not here has no entry, which spares
    /// the lookup of a lower hard link (whose other names may lie outside every layer: trees
    /// made with `cp -al`, or stores that share files between layers) an `openat` that fails.
    group_keys: RwLock<HashSet<u64>>,
    /// Fds holding an exclusive `flock` of the upper and the work dir for the mount's life.
    _locks: Vec<OwnedFd>,
    /// Per layer: the tag placed in the top bits of `st_ino` (0 when all layers share one fs).
    xino_tag: Vec<u64>,
    /// How whiteouts and opaque marks are written.
    pub encoding: Encoding,
    /// How a copy-up makes its data durable before the rename (chosen from the upper's filesystem).
    pub sync: SyncPolicy,
    /// Per filesystem (`st_dev`) of a layer: set once a copy-up from it into the upper found that
    /// `FICLONE` cannot work (see [`sys::copy::copy_data`]). The last slot stands for any other.
    no_clone: Vec<(u64, AtomicBool)>,
}

/// How long a mount waits for the daemon of an earlier mount of the same upper or work dir to
/// exit (it does so right after its unmount) before it calls the dir in use.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Bits of `st_ino` left for the backing filesystem's inode number when layers span filesystems.
const XINO_SHIFT: u32 = 56;

impl Layers {
    /// Opens every layer of `cfg`, checking what the kernel overlay checks: dirs exist, the work
    /// dir is on the upper's filesystem, the upper is not inside a lower.
    pub fn open(cfg: &OverlayConfig) -> Result<Self, String> {
        if cfg.lowers.is_empty() {
            return Err("at least one lower directory is needed".into());
        }
        if cfg.upper.is_some() != cfg.work.is_some() {
            return Err("upperdir and workdir go together".into());
        }
        let open = |p: &Path, what: &str| {
            sys::open_root(p).map_err(|e| format!("{what} {}: {e}", p.display()))
        };
        let open_lower = |p: &Path| {
            let plain = open(p, "lower directory")?;
            Ok::<_, String>(private_twin(p, [p], [&plain]).map_or(plain, |[l]| l))
        };
        let mut roots = Vec::with_capacity(cfg.lowers.len() + 1);
        let mut devs = Vec::new();
        let mut work = None;
        let mut index = None;
        let mut group_keys = HashSet::new();
        let mut sync = SyncPolicy::ReadOnly;
        let mut locks = Vec::new();
        if let (Some(upper), Some(workdir)) = (&cfg.upper, &cfg.work) {
            let u = open(upper, "upper directory")?;
            let w = open(workdir, "work directory")?;
            // One clone for both: a copy-up renames from the work dir into the upper dir.
            let base = common_ancestor(upper, workdir);
            let (u, w) = match private_twin(&base, [upper, workdir], [&u, &w]) {
                Some([pu, pw]) => (pu, pw),
                None => (u, w),
            };
            let ust = sys::stat_fd(u.as_fd()).map_err(|e| format!("{}: {e}", upper.display()))?;
            let wst = sys::stat_fd(w.as_fd()).map_err(|e| format!("{}: {e}", workdir.display()))?;
            if ust.st_dev != wst.st_dev {
                return Err(format!(
                    "work directory {} is not on the same filesystem as upper directory {}",
                    workdir.display(),
                    upper.display()
                ));
            }
            if (ust.st_dev, ust.st_ino) == (wst.st_dev, wst.st_ino) {
                return Err("upper and work directory are the same directory".into());
            }
            // As the kernel overlay with its index: one mount at a time per upper and work dir.
            // A second would empty `work/work` under the first's copy-ups and race on the index.
            for (fd, dir, what) in [(&u, upper, "upper"), (&w, workdir, "work")] {
                let held = sys::lock_dir(fd.as_fd(), LOCK_PATIENCE).map_err(|e| match e {
                    Errno::BUSY => format!(
                        "{what} directory {} is in use by another mount",
                        dir.display()
                    ),
                    e => format!("{what} directory {}: cannot lock it: {e}", dir.display()),
                })?;
                locks.push(held);
            }
            for lower in &cfg.lowers {
                if is_inside(upper, lower) || is_inside(lower, upper) {
                    return Err(format!(
                        "upper directory {} and lower directory {} overlap",
                        upper.display(),
                        lower.display()
                    ));
                }
            }
            work = Some(prepare_work(w.as_fd()).map_err(|e| {
                format!(
                    "work directory {}: cannot prepare work/work: {e}",
                    workdir.display()
                )
            })?);
            let (fd, keys) = prepare_index(w.as_fd()).map_err(|e| {
                format!(
                    "work directory {}: cannot prepare its index: {e}",
                    workdir.display()
                )
            })?;
            index = Some(fd);
            group_keys = keys;
            let (policy, found) = SyncPolicy::for_upper(u.as_fd(), cfg.volatile);
            tracing::info!("copy-up sync: {policy} ({found})");
            sync = policy;
            devs.push(ust.st_dev);
            roots.push(Some(u));
        } else {
            devs.push(u64::MAX);
            roots.push(None);
        }
        for lower in &cfg.lowers {
            let l = open_lower(lower)?;
            let st = sys::stat_fd(l.as_fd()).map_err(|e| format!("{}: {e}", lower.display()))?;
            devs.push(st.st_dev);
            roots.push(Some(l));
        }
        // xino: one tag per distinct filesystem, in order of first appearance; tag 0 for the first.
        let mut tags: HashMap<u64, u64> = HashMap::new();
        let present: Vec<u64> = devs.iter().copied().filter(|d| *d != u64::MAX).collect();
        let single_fs = present.windows(2).all(|w| w[0] == w[1]);
        let xino_tag = devs
            .iter()
            .map(|d| {
                if single_fs || *d == u64::MAX {
                    0
                } else {
                    let n = tags.len() as u64;
                    *tags.entry(*d).or_insert(n) << XINO_SHIFT
                }
            })
            .collect();
        let mut fs_devs = present;
        fs_devs.sort_unstable();
        fs_devs.dedup();
        fs_devs.push(u64::MAX);
        Ok(Layers {
            roots,
            work,
            index,
            group_keys: RwLock::new(group_keys),
            _locks: locks,
            xino_tag,
            encoding: Encoding::for_this_process(),
            sync,
            no_clone: fs_devs
                .into_iter()
                .map(|d| (d, AtomicBool::new(false)))
                .collect(),
        })
    }

    /// Whether copies from filesystem `dev` into the upper are known not to reflink (set by
    /// [`sys::copy::copy_data`]).
    pub fn no_clone(&self, dev: u64) -> &AtomicBool {
        let i = self
            .no_clone
            .iter()
            .position(|(d, _)| *d == dev)
            .unwrap_or(self.no_clone.len() - 1);
        &self.no_clone[i].1
    }

    /// Number of layers including the (possibly absent) upper slot.
    pub fn count(&self) -> usize {
        self.roots.len()
    }

    /// Whether the mount has an upper dir.
    pub fn has_upper(&self) -> bool {
        self.roots[0].is_some()
    }

    /// Root fd of a layer.
    pub fn root(&self, idx: LayerIdx) -> Option<BorrowedFd<'_>> {
        self.roots
            .get(idx.0 as usize)
            .and_then(|r| r.as_ref())
            .map(|fd| fd.as_fd())
    }

    /// The work dir (`work/work`); `EROFS` on a read-only mount.
    pub fn work(&self) -> SysResult<BorrowedFd<'_>> {
        self.work.as_ref().map(|fd| fd.as_fd()).ok_or(Errno::ROFS)
    }

    /// The hard-link group index dir, on a writable mount.
    pub fn index(&self) -> Option<BorrowedFd<'_>> {
        self.index.as_ref().map(|fd| fd.as_fd())
    }

    /// Whether the index may hold an entry for group `key`: `false` means it holds none.
    pub fn group_may_exist(&self, key: u64) -> bool {
        self.index.is_some()
            && self
                .group_keys
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&key)
    }

    /// Notes that an entry for group `key` is about to be published in the index (before it
    /// is, so that [`Layers::group_may_exist`] never says `false` of an entry that exists).
    pub fn note_group(&self, key: u64) {
        self.group_keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
    }

    /// `st_ino` as shown in the mount for an object of layer `idx` with backing inode `ino`.
    pub fn xino(&self, idx: LayerIdx, ino: u64) -> u64 {
        self.xino_tag.get(idx.0 as usize).copied().unwrap_or(0) | ino
    }
}

/// The deepest directory above (or equal to) both `a` and `b`, after resolving symlinks; `a` if
/// either cannot be resolved.
fn common_ancestor(a: &Path, b: &Path) -> PathBuf {
    let (Ok(ca), Ok(cb)) = (a.canonicalize(), b.canonicalize()) else {
        return a.to_path_buf();
    };
    ca.components()
        .zip(cb.components())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

/// Fds of `dirs` (each at or below `base`) reached through one private clone of the mount at
/// `base` ([`sys::open_private_root`]), so that the mounts holding the layers are not kept busy
/// by this process (kernel overlayfs clones its layer mounts the same way). `None` — use `plain`,
/// the same dirs opened directly — when no clone can be made (no `CAP_SYS_ADMIN`, an old kernel)
/// or when a dir is not the same inode through the clone (a mount between `base` and it).
fn private_twin<const N: usize>(
    base: &Path,
    dirs: [&Path; N],
    plain: [&OwnedFd; N],
) -> Option<[OwnedFd; N]> {
    let base = base.canonicalize().ok()?;
    let root = sys::open_private_root(&base).ok()?;
    dirs.iter()
        .zip(plain)
        .map(|(dir, plain)| {
            let rel = dir.canonicalize().ok()?;
            let fd = sys::open_path_below(root.as_fd(), rel.strip_prefix(&base).ok()?).ok()?;
            let (a, b) = (
                sys::stat_fd(fd.as_fd()).ok()?,
                sys::stat_fd(plain.as_fd()).ok()?,
            );
            ((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)).then_some(fd)
        })
        .collect::<Option<Vec<_>>>()?
        .try_into()
        .ok()
}

fn is_inside(inner: &Path, outer: &Path) -> bool {
    let (Ok(inner), Ok(outer)) = (inner.canonicalize(), outer.canonicalize()) else {
        return false;
    };
    inner.starts_with(&outer)
}

/// Creates `work/work` if needed and empties it (leftovers of a crash are half-built copies).
fn prepare_work(workdir: BorrowedFd<'_>) -> SysResult<OwnedFd> {
    let name = Component::new("work")?;
    match sys::mkdir_at(workdir, &name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    let fd = sys::open_path_dir(workdir, &name)?;
    remove_children(fd.as_fd())?;
    Ok(fd)
}

/// Creates `work/layerfs-index` if needed (its entries are kept), and reads the group keys its
/// entries are named by (16 hex digits; other names are no entry of ours).
fn prepare_index(workdir: BorrowedFd<'_>) -> SysResult<(OwnedFd, HashSet<u64>)> {
    let name = Component::new("layerfs-index")?;
    match sys::mkdir_at(workdir, &name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    let fd = sys::open_path_dir(workdir, &name)?;
    let mut keys = HashSet::new();
    sys::dir::for_each(fd.as_fd(), |name, _, _| {
        if let Some(key) = group_key(name) {
            keys.insert(key);
        }
        Ok(())
    })?;
    Ok((fd, keys))
}

/// The group key an index entry's name stands for.
fn group_key(name: &[u8]) -> Option<u64> {
    if name.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(name).ok()?, 16).ok()
}

/// Removes everything inside the directory `dir` (never following symlinks).
pub fn remove_children(dir: BorrowedFd<'_>) -> SysResult<()> {
    for entry in sys::dir::read_all(dir)? {
        let name = Component::new(&entry.name)?;
        remove_tree(dir, &name)?;
    }
    Ok(())
}

/// Removes `dir/name`, recursively if it is a directory.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &Component) -> SysResult<()> {
    match sys::unlink_at(dir, name, false) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {
            let sub = sys::open_path_dir(dir, name)?;
            remove_children(sub.as_fd())?;
            sys::unlink_at(dir, name, true)
        }
        Err(e) => Err(e),
    }
}

/// The lower directories a redirect `path` names, as the kernel overlay resolves it, layer by
/// layer in the order of `roots`: an absolute path is walked from the layer's root, a bare name in
/// `parents` (the moved directory's parent, in that layer; a layer without it is skipped). A layer
/// without the path is skipped; a whiteout or a non-directory on the path ends the search; an
/// opaque directory on the path (or at its end) ends it after this layer. A directory found with a
/// redirect of its own (`redirect_of`: it was moved while its layer was the upper one) sends the
/// search for the layers below to where that redirect points.
pub fn resolve_redirect(
    roots: &[(LayerIdx, BorrowedFd<'_>)],
    parents: &[(LayerIdx, BorrowedFd<'_>)],
    path: &[u8],
    redirect_of: impl Fn(BorrowedFd<'_>) -> Option<Vec<u8>>,
) -> SysResult<Vec<(LayerIdx, OwnedFd)>> {
    use layerfs_store::format::{self, DirMark};
    use std::os::unix::ffi::OsStrExt;
    let split = |p: &[u8]| -> Vec<Vec<u8>> {
        p.split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    };
    let mut absolute = path.starts_with(b"/");
    let mut comps = split(path);
    let mut out = Vec::new();
    'layers: for (layer, root) in roots {
        let start = if absolute {
            *root
        } else {
            match parents.iter().find(|(l, _)| l == layer) {
                Some((_, fd)) => *fd,
                None => continue,
            }
        };
        let mut cur: Option<OwnedFd> = None;
        let mut stop = false;
        for (i, comp) in comps.iter().enumerate() {
            let name = Component::new(std::ffi::OsStr::from_bytes(comp))?;
            let base = cur.as_ref().map(|f| f.as_fd()).unwrap_or(start);
            let st = match sys::stat_at(base, &name) {
                Ok(st) => st,
                Err(Errno::NOENT) => {
                    let hidden = format::whiteout_file_name(&name)
                        .ok()
                        .is_some_and(|wh| sys::stat_at(base, &wh).is_ok());
                    if hidden || stop {
                        break 'layers;
                    }
                    continue 'layers;
                }
                Err(e) => return Err(e),
            };
            if sys::file_type(&st) != sys::FileType::Directory {
                break 'layers;
            }
            let fd = sys::open_path_dir(base, &name)?;
            if i + 1 < comps.len() && format::dir_mark(fd.as_fd()) == DirMark::Opaque {
                stop = true;
            }
            cur = Some(fd);
        }
        let Some(fd) = cur else { continue };
        let opaque = format::dir_mark(fd.as_fd()) == DirMark::Opaque;
        let moved = redirect_of(fd.as_fd());
        out.push((*layer, fd));
        if opaque || stop {
            break;
        }
        match moved {
            Some(r) if r.starts_with(b"/") => {
                absolute = true;
                comps = split(&r);
            }
            Some(r) => {
                comps.pop();
                comps.extend(split(&r));
            }
            None => {}
        }
    }
    Ok(out)
}
