//! Extracting one layer tar into a layer directory in the overlay on-disk format.
//!
//! The stream is decompressed by magic (gzip, multi-member; zstd; else plain), hashed whole for
//! the `diff_id` (drained to EOF, so bytes after the end-of-archive blocks count), recorded in a
//! [tar-split](crate::tarsplit) and unpacked into `diff/`.
//!
//! Every parent is resolved one component at a time from directory fds, never following a symlink,
//! so nothing in the tar can write outside `diff/`. Tar semantics (reference/image-formats.md):
//! names are cleaned (leading `/` and `.` dropped, `..` refused); `.wh.NAME` becomes a whiteout and
//! `.wh..wh..opq` an opaque mark in the store's [`Encoding`]; hard links must name an earlier
//! non-directory entry of the same tar; missing parents are made 0755; a directory over a
//! directory only updates attributes; anything else replaces what was there (last one wins).
//! Directory modes and times are applied at the end, deepest first.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use layerfs_sys::{self as sys, Component, Errno, FileType, Mode, OFlags, Timespec, Timestamps};
use tar::EntryType;

use crate::digest::{Digest, HashReader};
use crate::format::{self, Encoding, NameKind};
use crate::store::StoreError;
use crate::tarsplit::{SplitWriter, TeeReader};

/// What an extraction produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extracted {
    /// sha256 of the whole uncompressed stream.
    pub diff_id: Digest,
    /// Bytes of regular file data.
    pub size: u64,
    /// Length of the uncompressed stream.
    pub tar_size: u64,
}

/// Compression of a blob, by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `1f 8b`.
    Gzip,
    /// `28 b5 2f fd`.
    Zstd,
    /// Anything else.
    None,
}

/// Reads up to 4 bytes of `r` and returns the compression they show, with a reader that starts
/// again at the first byte.
pub fn sniff<R: Read>(mut r: R) -> io::Result<(Compression, impl Read)> {
    let mut head = Vec::with_capacity(4);
    (&mut r).take(4).read_to_end(&mut head)?;
    let c = if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    };
    Ok((c, io::Cursor::new(head).chain(r)))
}

/// The uncompressed stream of `r`.
pub fn decompress<'a, R: Read + 'a>(r: R) -> io::Result<Box<dyn Read + 'a>> {
    let (c, r) = sniff(r)?;
    Ok(match c {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(r))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        Compression::None => Box::new(r),
    })
}

/// Extracts the (possibly compressed) layer tar `blob` into `layer_dir/diff` (created here), with
/// its tar-split in `layer_dir`. `label` names the blob in errors.
pub fn extract_layer(
    blob: impl Read,
    layer_dir: &Path,
    encoding: Encoding,
    label: &str,
) -> anyhow::Result<Extracted> {
    let bad = |entry: &str, reason: String| StoreError::BadInput {
        file: label.to_string(),
        entry: entry.to_string(),
        reason,
    };
    let diff = layer_dir.join("diff");
    std::fs::create_dir(&diff)?;
    let root = sys::open_root(&diff)?;
    let split = Rc::new(RefCell::new(SplitWriter::create(layer_dir)?));
    let stream = decompress(io::BufReader::with_capacity(1 << 20, blob))
        .map_err(|e| bad("-", format!("cannot read: {e}")))?;
    let hashed = HashReader::new(stream);
    let mut archive = tar::Archive::new(TeeReader::new(hashed, split.clone()));
    let mut ex = Extractor {
        root,
        encoding,
        split: split.clone(),
        seen: HashSet::new(),
        recorded: BTreeMap::new(),
        dirs: BTreeMap::new(),
        cache: None,
        size: 0,
    };
    let mut last = String::from("-");
    for entry in archive.entries().map_err(|e| bad("-", e.to_string()))? {
        let mut entry = entry.map_err(|e| {
            bad(
                &last,
                format!("truncated or corrupt tar after this entry: {e}"),
            )
        })?;
        last = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        ex.entry(&mut entry).map_err(|reason| bad(&last, reason))?;
    }
    ex.finish_dirs().map_err(|reason| bad("-", reason))?;
    let mut tee = archive.into_inner();
    io::copy(&mut tee, &mut io::sink())
        .map_err(|e| bad(&last, format!("reading past the end: {e}")))?;
    let (diff_id, tar_size) = tee.into_inner().finish();
    let size = ex.size;
    drop(ex);
    let split = Rc::try_unwrap(split).map_err(|_| anyhow::anyhow!("tar-split still shared"))?;
    split.into_inner().finish()?;
    Ok(Extracted {
        diff_id,
        size,
        tar_size,
    })
}

/// Attributes of an entry (for a directory: applied after all entries).
struct Attrs {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Timespec,
    /// `SCHILY.xattr.*` records, private overlay names already dropped.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Extractor {
    /// `diff/` (O_PATH).
    root: OwnedFd,
    encoding: Encoding,
    split: Rc<RefCell<SplitWriter>>,
    /// Non-directory entries made so far (valid hard link targets).
    seen: HashSet<Vec<u8>>,
    /// Regular files whose contents the tar-split refers to: path → segment index.
    recorded: BTreeMap<Vec<u8>, u64>,
    /// Directory entries: path → attributes to apply at the end.
    dirs: BTreeMap<Vec<u8>, Attrs>,
    /// The last parent resolved: its path and fd.
    cache: Option<(Vec<u8>, OwnedFd)>,
    size: u64,
}

type R<T> = Result<T, String>;

fn errno(what: &str, e: Errno) -> String {
    format!("{what}: {}", io::Error::from(e))
}

/// Splits a tar name into components: leading `/` and `.` parts dropped, `..` refused.
fn clean(name: &[u8]) -> R<Vec<Component>> {
    let mut out = Vec::new();
    for part in name.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path contains `..` (would leave the layer)".into()),
            p => out
                .push(Component::new(OsStr::from_bytes(p)).map_err(|e| {
                    errno(&format!("bad name {:?}", String::from_utf8_lossy(p)), e)
                })?),
        }
    }
    Ok(out)
}

fn join(parts: &[Component]) -> Vec<u8> {
    parts
        .iter()
        .map(Component::as_bytes)
        .collect::<Vec<_>>()
        .join(&b'/')
}

fn pax_num(entry: &mut tar::Entry<'_, impl Read>, key: &str) -> Option<f64> {
    let exts = entry.pax_extensions().ok()??;
    exts.flatten()
        .filter(|e| e.key() == Ok(key))
        .filter_map(|e| e.value().ok()?.parse::<f64>().ok())
        .last()
}

impl Extractor {
    fn entry(&mut self, entry: &mut tar::Entry<'_, impl Read>) -> R<()> {
        let parts = clean(&entry.path_bytes())?;
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            return Ok(());
        }
        let Some((name, parents)) = parts.split_last() else {
            // The layer root itself: only a directory entry means something.
            if kind.is_dir() {
                let attrs = self.attrs(entry)?;
                self.dirs.insert(Vec::new(), attrs);
            }
            return Ok(());
        };
        let path = join(&parts);
        match format::classify_name(name.as_bytes()) {
            NameKind::Invalid => Err("bare `.wh.` whiteout names nothing".into()),
            NameKind::Meta => Ok(()),
            NameKind::OpaqueMarker => {
                let dir = self.parent(parents)?;
                mark_opaque(dir.as_fd(), self.encoding).map_err(|e| errno("cannot mark opaque", e))
            }
            NameKind::WhiteoutFor(target) => {
                let target = Component::new(OsStr::from_bytes(target))
                    .map_err(|e| errno("bad whiteout", e))?;
                let dir = self.parent(parents)?;
                let mut tpath = join(parents);
                if !tpath.is_empty() {
                    tpath.push(b'/');
                }
                tpath.extend_from_slice(target.as_bytes());
                self.remove_existing(dir.as_fd(), &target, &tpath)?;
                format::write_whiteout(dir.as_fd(), &target, self.encoding)
                    .map_err(|e| errno("cannot write whiteout", e))
            }
            NameKind::Plain => {
                let dir = self.parent(parents)?;
                self.plain(entry, dir.as_fd(), name, &path, kind)
            }
        }
    }

    fn attrs(&self, entry: &mut tar::Entry<'_, impl Read>) -> R<Attrs> {
        let h = entry.header();
        let mode = h.mode().map_err(|e| e.to_string())?;
        // Some writers leave the id fields blank: that is 0.
        let mut uid = h.uid().unwrap_or(0);
        let mut gid = h.gid().unwrap_or(0);
        let mut secs = h.mtime().map_err(|e| e.to_string())? as f64;
        if let Some(v) = pax_num(entry, "uid") {
            uid = v as u64;
        }
        if let Some(v) = pax_num(entry, "gid") {
            gid = v as u64;
        }
        if let Some(v) = pax_num(entry, "mtime") {
            secs = v;
        }
        let mtime = Timespec {
            tv_sec: secs.floor() as i64,
            tv_nsec: ((secs - secs.floor()) * 1e9).round().min(999_999_999.0) as _,
        };
        let xattrs = xattrs_of(entry)?
            .into_iter()
            .filter(|(k, _)| !format::is_private_xattr(k))
            .collect();
        Ok(Attrs {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    /// The directory at `parents`, made (0755) where missing; a symlink or non-directory on the
    /// way is refused.
    fn parent(&mut self, parents: &[Component]) -> R<OwnedFd> {
        let key = join(parents);
        if let Some((p, fd)) = &self.cache
            && *p == key
        {
            return fd.try_clone().map_err(|e| e.to_string());
        }
        let mut cur = self.root.try_clone().map_err(|e| e.to_string())?;
        for (i, c) in parents.iter().enumerate() {
            let here = || String::from_utf8_lossy(&join(&parents[..=i])).into_owned();
            match sys::stat_at(cur.as_fd(), c) {
                Err(Errno::NOENT) => {
                    sys::mkdir_at(cur.as_fd(), c, Mode::from_raw_mode(0o755))
                        .map_err(|e| errno(&format!("cannot create {}", here()), e))?;
                }
                Err(e) => return Err(errno(&here(), e)),
                Ok(st) => match sys::file_type(&st) {
                    FileType::Directory => {}
                    FileType::Symlink => {
                        return Err(format!(
                            "parent {} is a symlink (would resolve outside the layer)",
                            here()
                        ));
                    }
                    _ if format::is_chardev_whiteout(&st) => {
                        // Deleted below, re-created here: a new, opaque directory.
                        sys::unlink_at(cur.as_fd(), c, false).map_err(|e| errno(&here(), e))?;
                        sys::mkdir_at(cur.as_fd(), c, Mode::from_raw_mode(0o755))
                            .map_err(|e| errno(&here(), e))?;
                        let d =
                            sys::open_path_dir(cur.as_fd(), c).map_err(|e| errno(&here(), e))?;
                        mark_opaque(d.as_fd(), self.encoding).map_err(|e| errno(&here(), e))?;
                    }
                    _ => return Err(format!("parent {} is not a directory", here())),
                },
            }
            cur = sys::open_path_dir(cur.as_fd(), c).map_err(|e| errno(&here(), e))?;
        }
        self.cache = Some((key, cur.try_clone().map_err(|e| e.to_string())?));
        Ok(cur)
    }

    /// Removes whatever is at `dir/name` (path `path`), keeping recorded contents for the
    /// tar-split. Returns what was there.
    fn remove_existing(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &Component,
        path: &[u8],
    ) -> R<Option<sys::Stat>> {
        let st = match sys::stat_at(dir, name) {
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(errno("cannot stat existing entry", e)),
            Ok(st) => st,
        };
        let mut prefix = path.to_vec();
        prefix.push(b'/');
        let doomed: Vec<(Vec<u8>, u64)> = self
            .recorded
            .range(path.to_vec()..)
            .take_while(|(p, _)| p.as_slice() == path || p.starts_with(&prefix))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, idx) in doomed {
            let fd = sys::open_beneath(self.root.as_fd(), &p, OFlags::PATH)
                .map_err(|e| errno("cannot reopen replaced file", e))?;
            self.split
                .borrow_mut()
                .save_contents(idx, fd.as_fd())
                .map_err(|e| e.to_string())?;
            self.recorded.remove(&p);
        }
        self.seen
            .retain(|p| !(p.as_slice() == path || p.starts_with(&prefix)));
        if sys::file_type(&st) == FileType::Directory {
            self.cache = None;
            self.dirs
                .retain(|p, _| !(p.as_slice() == path || p.starts_with(&prefix)));
            remove_tree_at(dir, name).map_err(|e| errno("cannot replace directory", e))?;
        } else {
            sys::unlink_at(dir, name, false).map_err(|e| errno("cannot replace entry", e))?;
        }
        Ok(Some(st))
    }

    fn plain(
        &mut self,
        entry: &mut tar::Entry<'_, impl Read>,
        dir: BorrowedFd<'_>,
        name: &Component,
        path: &[u8],
        kind: EntryType,
    ) -> R<()> {
        let attrs = self.attrs(entry)?;
        // Directory over directory: attributes only.
        if kind.is_dir()
            && sys::stat_at(dir, name).is_ok_and(|st| sys::file_type(&st) == FileType::Directory)
        {
            self.dirs.insert(path.to_vec(), attrs);
            return Ok(());
        }
        // A hard link's target is checked before anything is replaced.
        let link_target = if kind.is_hard_link() {
            let raw = entry
                .link_name_bytes()
                .ok_or("hard link without a target")?;
            let tparts = clean(&raw)?;
            let tpath = join(&tparts);
            if tpath == path || !self.seen.contains(&tpath) {
                return Err(format!(
                    "hard link to {:?}: not an earlier file of this layer",
                    String::from_utf8_lossy(&raw)
                ));
            }
            let (tname, tparents) = tparts.split_last().ok_or("hard link to the layer root")?;
            let tdir = self.parent(tparents)?;
            Some(sys::open_path(tdir.as_fd(), tname).map_err(|e| errno("hard link target", e))?)
        } else {
            None
        };
        let old = self.remove_existing(dir, name, path)?;
        let was_whiteout = old.as_ref().is_some_and(format::is_chardev_whiteout);
        let mode = Mode::from_raw_mode(attrs.mode & 0o7777);
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let fd = sys::open_at(
                    dir,
                    name,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| errno("cannot create file", e))?;
                let mut file = File::from(fd);
                let sparse = kind == EntryType::GNUSparse;
                let want = entry.size();
                if !sparse && want > 0 {
                    self.split
                        .borrow_mut()
                        .begin_file()
                        .map_err(|e| e.to_string())?;
                }
                let copied =
                    copy_big(entry, &mut file).map_err(|e| format!("reading file data: {e}"))?;
                if !sparse && want > 0 {
                    let idx = self
                        .split
                        .borrow_mut()
                        .end_file(path, copied)
                        .map_err(|e| e.to_string())?;
                    self.recorded.insert(path.to_vec(), idx);
                }
                if !sparse && copied != want {
                    return Err(format!(
                        "truncated: file data ends after {copied} of {want} bytes"
                    ));
                }
                self.size += copied;
            }
            EntryType::Directory => {
                sys::mkdir_at(dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| errno("cannot create directory", e))?;
                if was_whiteout {
                    let d = sys::open_path_dir(dir, name).map_err(|e| errno("directory", e))?;
                    mark_opaque(d.as_fd(), self.encoding)
                        .map_err(|e| errno("cannot mark opaque", e))?;
                }
                self.dirs.insert(path.to_vec(), attrs);
                return Ok(());
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or("symlink without a target")?;
                if target.is_empty() {
                    return Err("symlink with an empty target".into());
                }
                sys::symlink_at(&target, dir, name)
                    .map_err(|e| errno("cannot create symlink", e))?;
            }
            EntryType::Link => {
                let target = link_target.ok_or("hard link target vanished")?;
                sys::link_fd(target.as_fd(), dir, name)
                    .map_err(|e| errno("cannot create hard link", e))?;
                self.seen.insert(path.to_vec());
                return Ok(());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (ft, rdev) = match kind {
                    EntryType::Fifo => (FileType::Fifo, 0),
                    k => {
                        let h = entry.header();
                        let major = h.device_major().ok().flatten().unwrap_or(0);
                        let minor = h.device_minor().ok().flatten().unwrap_or(0);
                        let ft = if k == EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (ft, rustix::fs::makedev(major, minor))
                    }
                };
                match sys::mknod_at(dir, name, ft, mode, rdev) {
                    Ok(()) => {}
                    Err(Errno::PERM) if ft != FileType::Fifo => {
                        tracing::warn!(
                            "{}: device node skipped (needs root)",
                            String::from_utf8_lossy(path)
                        );
                        return Ok(());
                    }
                    Err(e) => return Err(errno("cannot create node", e)),
                }
            }
            other => return Err(format!("unsupported entry type {other:?}")),
        }
        self.seen.insert(path.to_vec());
        let fd = sys::open_path(dir, name).map_err(|e| errno("reopen", e))?;
        let is_link = kind == EntryType::Symlink;
        self.apply(fd.as_fd(), &attrs, is_link)?;
        let times = Timestamps {
            last_access: attrs.mtime,
            last_modification: attrs.mtime,
        };
        sys::utimes_at(dir, name, &times).map_err(|e| errno("cannot set times", e))
    }

    /// Owner, mode, xattrs (times are set by the caller).
    fn apply(&self, fd: BorrowedFd<'_>, attrs: &Attrs, is_link: bool) -> R<()> {
        match sys::chown_fd(fd, Some(attrs.uid as u32), Some(attrs.gid as u32)) {
            Ok(()) => {}
            Err(Errno::PERM | Errno::INVAL) if !rustix::process::geteuid().is_root() => {}
            Err(e) => return Err(errno("cannot set owner", e)),
        }
        if !is_link {
            sys::chmod_fd(fd, Mode::from_raw_mode(attrs.mode & 0o7777))
                .map_err(|e| errno("cannot set mode", e))?;
            for (k, v) in &attrs.xattrs {
                match sys::xattr::set(fd, OsStr::from_bytes(k), v, 0) {
                    Ok(()) => {}
                    Err(Errno::PERM | Errno::OPNOTSUPP)
                        if !rustix::process::geteuid().is_root() => {}
                    Err(e) => {
                        return Err(errno(
                            &format!("cannot set xattr {}", String::from_utf8_lossy(k)),
                            e,
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_dirs(&mut self) -> R<()> {
        self.cache = None;
        let mut dirs: Vec<_> = std::mem::take(&mut self.dirs).into_iter().collect();
        // Deepest first, so setting a child's times does not disturb a finished parent.
        dirs.sort_by_key(|(p, _)| {
            std::cmp::Reverse(p.iter().filter(|b| **b == b'/').count() + usize::from(!p.is_empty()))
        });
        for (path, attrs) in dirs {
            let fd = if path.is_empty() {
                self.root.try_clone().map_err(|e| e.to_string())?
            } else {
                match sys::open_beneath(self.root.as_fd(), &path, OFlags::PATH | OFlags::DIRECTORY)
                {
                    Ok(fd) => fd,
                    // Replaced by a non-directory after its entry: nothing to apply.
                    Err(Errno::NOTDIR | Errno::NOENT | Errno::LOOP) => continue,
                    Err(e) => {
                        return Err(errno(&format!("{}", String::from_utf8_lossy(&path)), e));
                    }
                }
            };
            self.apply(fd.as_fd(), &attrs, false)?;
            let times = Timestamps {
                last_access: attrs.mtime,
                last_modification: attrs.mtime,
            };
            sys::utimes_fd(fd.as_fd(), &times)
                .map_err(|e| errno("cannot set directory times", e))?;
        }
        Ok(())
    }
}

/// Marks a layer directory opaque; where the filesystem takes no `user.` xattrs (unprivileged
/// encoding), with a `.wh..wh..opq` file instead, which every reader accepts.
fn mark_opaque(dir: BorrowedFd<'_>, enc: Encoding) -> sys::SysResult<()> {
    match format::set_opaque(dir, enc) {
        Err(Errno::OPNOTSUPP | Errno::PERM) if enc == Encoding::Unprivileged => {
            let marker = Component::new(OsStr::from_bytes(format::OPAQUE_MARKER))?;
            match sys::open_at(
                dir,
                &marker,
                OFlags::CREATE | OFlags::WRONLY,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        }
        other => other,
    }
}

/// `io::copy` with a large buffer (fewer syscalls for big files).
fn copy_big(r: &mut impl Read, w: &mut impl io::Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// The `SCHILY.xattr.*` records of one entry.
fn xattrs_of(entry: &mut tar::Entry<'_, impl Read>) -> R<Vec<(Vec<u8>, Vec<u8>)>> {
    let Some(exts) = entry.pax_extensions().map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in exts {
        let e = e.map_err(|e| e.to_string())?;
        if let Some(name) = e.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            out.push((name.to_vec(), e.value_bytes().to_vec()));
        }
    }
    Ok(out)
}

/// Removes `dir/name` and, for a directory, everything below it, fd-relative, never following
/// a symlink.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &Component) -> sys::SysResult<()> {
    let st = sys::stat_at(dir, name)?;
    if sys::file_type(&st) == FileType::Directory {
        let sub = sys::open_path_dir(dir, name)?;
        for e in sys::dir::read_all(sub.as_fd())? {
            let c = Component::new(&e.name)?;
            remove_tree_at(sub.as_fd(), &c)?;
        }
        sys::unlink_at(dir, name, true)
    } else {
        sys::unlink_at(dir, name, false)
    }
}
