//! Changes of an upper dir against its lowers: the lines `docker diff` prints.
//!
//! Rules (moby go-archive `changes.go`, reference/overlay-semantics.md "diff"): a whiteout is `D`
//! (only the deleted top path); an upper object whose path exists in a lower is `C`; a path no
//! lower has is `A`, with every descendant of an added directory; a directory made opaque over a
//! lower directory lists the lower children it hides as `D` and its own as `A`; a directory is `C`
//! when its mode or owner changed or anything below it changed; every ancestor of a change is `C`
//! (never `/`). Only the upper dir is walked; the lowers are consulted per directory.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use layerfs_store::format::{self, DirMark, NameKind};
use layerfs_sys::{self as sys, Component, Errno, FileType};

use crate::index::{DirIndex, LayerDir};
use crate::layers::LayerIdx;

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// Changed (`C`).
    Modified,
    /// Added (`A`).
    Added,
    /// Deleted (`D`).
    Deleted,
}

impl ChangeKind {
    /// The letter `docker diff` prints.
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Modified => 'C',
            ChangeKind::Added => 'A',
            ChangeKind::Deleted => 'D',
        }
    }

    /// The number Docker's API uses (`Kind`: 0 modified, 1 added, 2 deleted).
    pub fn api_kind(self) -> u8 {
        match self {
            ChangeKind::Modified => 0,
            ChangeKind::Added => 1,
            ChangeKind::Deleted => 2,
        }
    }
}

/// One changed path (absolute, as seen in the mount).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    /// `/etc/passwd`.
    pub path: Vec<u8>,
    /// What happened.
    pub kind: ChangeKind,
}

/// Computes the changes of `upper` over `lowers` (top first), sorted by path.
pub fn changes(upper: &Path, lowers: &[std::path::PathBuf]) -> Result<Vec<Change>, String> {
    let open = |p: &Path| sys::open_root(p).map_err(|e| format!("{}: {e}", p.display()));
    let upper_fd = open(upper)?;
    let mut lower_fds = Vec::new();
    for (i, l) in lowers.iter().enumerate() {
        let fd = open(l)?;
        let opaque = format::dir_mark(fd.as_fd()) == DirMark::Opaque;
        lower_fds.push((LayerIdx(i as u16 + 1), fd));
        if opaque {
            break;
        }
    }
    let mut roots = Vec::new();
    for (i, l) in lowers.iter().enumerate() {
        roots.push((LayerIdx(i as u16 + 1), open(l)?));
    }
    let mut out = BTreeMap::new();
    let ctx = Walk { roots: &roots };
    ctx.walk(upper_fd.as_fd(), &lower_fds, b"", &mut out)
        .map_err(|e| format!("{}: {e}", upper.display()))?;
    // Every ancestor of a change is changed.
    let paths: Vec<Vec<u8>> = out.keys().cloned().collect();
    for p in paths {
        let mut cut = p.len();
        while let Some(pos) = p[..cut].iter().rposition(|b| *b == b'/') {
            if pos == 0 {
                break;
            }
            out.entry(p[..pos].to_vec()).or_insert(ChangeKind::Modified);
            cut = pos;
        }
    }
    Ok(out
        .into_iter()
        .map(|(path, kind)| Change { path, kind })
        .collect())
}

fn join(base: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = base.to_vec();
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// What every level of the walk shares.
struct Walk<'a> {
    /// Every lower root, for absolute redirects.
    roots: &'a [(LayerIdx, OwnedFd)],
}

/// The redirect target of an upper directory moved by the kernel overlay, if any.
fn redirect_of(dir: BorrowedFd<'_>) -> Option<Vec<u8>> {
    ["trusted.overlay.redirect", "user.overlay.redirect"]
        .iter()
        .find_map(|n| sys::xattr::get(dir, OsStr::new(n)).ok())
}

impl Walk<'_> {
    /// The lower dirs a redirect points at.
    fn redirect_dirs(
        &self,
        target: &[u8],
        lowers: &[(LayerIdx, OwnedFd)],
    ) -> Vec<(LayerIdx, OwnedFd)> {
        fn borrow(v: &[(LayerIdx, OwnedFd)]) -> Vec<(LayerIdx, BorrowedFd<'_>)> {
            v.iter().map(|(l, fd)| (*l, fd.as_fd())).collect()
        }
        crate::layers::resolve_redirect(&borrow(self.roots), &borrow(lowers), target, redirect_of)
            .unwrap_or_default()
    }

    /// Lists the whole merged tree of `upper` (if any) over `lowers` as added.
    fn all_added_merged(
        &self,
        upper: Option<BorrowedFd<'_>>,
        lowers: &[(LayerIdx, OwnedFd)],
        path: &[u8],
        out: &mut BTreeMap<Vec<u8>, ChangeKind>,
    ) -> Result<(), Errno> {
        let index = DirIndex::build(upper, &layer_dirs(lowers))?;
        for (name, vis) in index.visible_sorted() {
            let child = join(path, &name);
            out.insert(child.clone(), ChangeKind::Added);
            if vis.kind != FileType::Directory {
                continue;
            }
            let comp = Component::new(OsStr::from_bytes(&name))?;
            let slot = index.get(&name).and_then(|e| e.lower.clone());
            let mut sub_lowers = child_lower_dirs(lowers, slot.as_ref(), &comp);
            match upper.filter(|_| vis.layer.is_upper()) {
                Some(upper) => {
                    let sub = sys::open_path_dir(upper, &comp)?;
                    if format::dir_mark(sub.as_fd()) == DirMark::Opaque {
                        sub_lowers.clear();
                    }
                    self.all_added_merged(Some(sub.as_fd()), &sub_lowers, &child, out)?;
                }
                None => self.all_added_merged(None, &sub_lowers, &child, out)?,
            }
        }
        Ok(())
    }

    /// Walks one upper directory whose lower counterparts are `lowers`.
    fn walk(
        &self,
        upper: BorrowedFd<'_>,
        lowers: &[(LayerIdx, OwnedFd)],
        path: &[u8],
        out: &mut BTreeMap<Vec<u8>, ChangeKind>,
    ) -> Result<(), Errno> {
        let lower_index = DirIndex::build(None, &layer_dirs(lowers))?;
        for entry in sys::dir::read_all(upper)? {
            let name = entry.name.as_bytes();
            let child_path = join(path, name);
            match format::classify_name(name) {
                NameKind::WhiteoutFor(target) => {
                    if lower_index.visible(target).is_some() {
                        out.insert(join(path, target), ChangeKind::Deleted);
                    }
                    continue;
                }
                NameKind::OpaqueMarker | NameKind::Meta | NameKind::Invalid => continue,
                NameKind::Plain => {}
            }
            let comp = Component::new(OsStr::from_bytes(name))?;
            let st = sys::stat_at(upper, &comp)?;
            if format::is_chardev_whiteout(&st) {
                if lower_index.visible(name).is_some() {
                    out.insert(child_path, ChangeKind::Deleted);
                }
                continue;
            }
            let kind = sys::file_type(&st);
            if kind == FileType::Directory {
                let sub = sys::open_path_dir(upper, &comp)?;
                if let Some(target) = redirect_of(sub.as_fd()) {
                    // Moved by the kernel overlay: added, with everything it shows.
                    out.insert(child_path.clone(), ChangeKind::Added);
                    let dirs = self.redirect_dirs(&target, lowers);
                    self.all_added_merged(Some(sub.as_fd()), &dirs, &child_path, out)?;
                    continue;
                }
            }
            let lower = lower_index.get(name).and_then(|e| e.lower.clone());
            let Some(lower) = lower else {
                out.insert(child_path.clone(), ChangeKind::Added);
                if kind == FileType::Directory {
                    let sub = sys::open_path_dir(upper, &comp)?;
                    all_added(sub.as_fd(), &child_path, out)?;
                }
                continue;
            };
            if kind != FileType::Directory || lower.kind != FileType::Directory {
                out.insert(child_path.clone(), ChangeKind::Modified);
                if kind == FileType::Directory {
                    let sub = sys::open_path_dir(upper, &comp)?;
                    all_added(sub.as_fd(), &child_path, out)?;
                }
                continue;
            }
            // A directory in both: recurse with its lower counterparts.
            let sub = sys::open_path_dir(upper, &comp)?;
            let sub_lowers = child_lower_dirs(lowers, Some(&lower), &comp);
            let Some((_, top)) = sub_lowers.first() else {
                return Err(Errno::IO);
            };
            let top_lower = sys::stat_fd(top.as_fd())?;
            let own_change = st.st_mode != top_lower.st_mode
                || st.st_uid != top_lower.st_uid
                || st.st_gid != top_lower.st_gid;
            if own_change {
                out.insert(child_path.clone(), ChangeKind::Modified);
            }
            let opaque = format::dir_mark(sub.as_fd()) == DirMark::Opaque
                || sys::dir::read_all(sub.as_fd())?
                    .iter()
                    .any(|e| e.name.as_bytes() == format::OPAQUE_MARKER);
            if opaque {
                // The lower children it hides are deleted, its own are added.
                let hidden = DirIndex::build(None, &layer_dirs(&sub_lowers))?;
                let upper_names: std::collections::HashSet<Vec<u8>> =
                    sys::dir::read_all(sub.as_fd())?
                        .into_iter()
                        .map(|e| e.name.as_bytes().to_vec())
                        .collect();
                let mut any = false;
                for (n, _) in hidden.visible_sorted() {
                    if !upper_names.contains(&*n) {
                        out.insert(join(&child_path, &n), ChangeKind::Deleted);
                        any = true;
                    }
                }
                let before = out.len();
                all_added(sub.as_fd(), &child_path, out)?;
                // An upper child that a lower also has was replaced, not added.
                for n in &upper_names {
                    if hidden.visible(n).is_some()
                        && let Some(k) = out.get_mut(&join(&child_path, n))
                    {
                        *k = ChangeKind::Modified;
                    }
                }
                if any || out.len() > before {
                    out.entry(child_path).or_insert(ChangeKind::Modified);
                }
            } else {
                self.walk(sub.as_fd(), &sub_lowers, &child_path, out)?;
            }
        }
        Ok(())
    }
}

/// The layer dirs of `lowers`, for building an index.
fn layer_dirs(lowers: &[(LayerIdx, OwnedFd)]) -> Vec<LayerDir<'_>> {
    lowers
        .iter()
        .map(|(l, fd)| LayerDir {
            layer: *l,
            fd: fd.as_fd(),
            mark: None,
        })
        .collect()
}

/// The lower dirs of child directory `name`, from its lower slot in the parent's index: each layer
/// of the slot in turn, stopping after an opaque one.
fn child_lower_dirs(
    lowers: &[(LayerIdx, OwnedFd)],
    slot: Option<&crate::index::LowerSlot>,
    name: &Component,
) -> Vec<(LayerIdx, OwnedFd)> {
    let mut out = Vec::new();
    let Some(l) = slot.filter(|l| l.kind == FileType::Directory) else {
        return out;
    };
    for layer in std::iter::once(l.layer).chain(l.more.iter().copied()) {
        let Some((_, parent)) = lowers.iter().find(|(x, _)| *x == layer) else {
            continue;
        };
        let Ok(fd) = sys::open_path_dir(parent.as_fd(), name) else {
            continue;
        };
        let opaque = format::dir_mark(fd.as_fd()) == DirMark::Opaque;
        out.push((layer, fd));
        if opaque {
            break;
        }
    }
    out
}

/// Lists everything below the upper directory `dir` as added.
fn all_added(
    dir: BorrowedFd<'_>,
    path: &[u8],
    out: &mut BTreeMap<Vec<u8>, ChangeKind>,
) -> Result<(), Errno> {
    for entry in sys::dir::read_all(dir)? {
        let name = entry.name.as_bytes();
        if format::classify_name(name) != NameKind::Plain {
            continue;
        }
        let comp = Component::new(OsStr::from_bytes(name))?;
        let st = sys::stat_at(dir, &comp)?;
        if format::is_chardev_whiteout(&st) {
            continue;
        }
        let child = join(path, name);
        out.insert(child.clone(), ChangeKind::Added);
        if sys::file_type(&st) == FileType::Directory {
            let sub = sys::open_path_dir(dir, &comp)?;
            all_added(sub.as_fd(), &child, out)?;
        }
    }
    Ok(())
}
