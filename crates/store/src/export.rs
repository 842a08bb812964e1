//! Turning a directory in the overlay on-disk format (a container's upper dir, a plain directory)
//! into an OCI layer tar, and committing an upper dir as a new layer and image.
//!
//! The tar is reproducible: the same tree gives the same bytes. Names are visited in byte order;
//! in each directory its opaque marker (`dir/.wh..wh..opq`) comes first, then its whiteouts
//! (`.wh.NAME`, empty, mode 0600, owner 0:0, mtime 0), then the other entries; headers are ustar
//! with PAX records for long names, large ids and xattrs (sorted), no user/group names, whole
//! second mtimes as the files have them. A char 0/0 (or an xwhiteout) becomes `.wh.NAME`; an
//! opaque xattr or a `.wh..wh..opq` file becomes the marker; private xattrs are dropped; a second
//! name of an inode becomes a hard link to the first name in that order.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::Context;
use layerfs_sys::{self as sys, Component, FileType, OFlags, Stat};
use tar::{EntryType, Header};

use crate::digest::{Digest, HashWriter};
use crate::format::{self, DirMark, NameKind};

/// Writes the layer tar of `dir` into `out`; returns its digest (the diff_id) and size. `dir`
/// must not hold redirected directories (see [`write_upper_tar`]).
pub fn write_layer_tar(dir: &Path, out: impl Write) -> anyhow::Result<(Digest, u64)> {
    write_upper_tar(dir, &[], out)
}

/// Writes the layer tar of the overlay upper dir `upper` over `lowers` (layer dirs, top first).
/// The lowers are read only for directories the overlay renamed (`overlay.redirect`): such a
/// directory is written as an opaque directory holding its whole merged content.
pub fn write_upper_tar(
    upper: &Path,
    lowers: &[std::path::PathBuf],
    out: impl Write,
) -> anyhow::Result<(Digest, u64)> {
    let root =
        sys::open_root(upper).with_context(|| format!("{}: cannot open", upper.display()))?;
    let lowers = lowers
        .iter()
        .map(|l| sys::open_root(l).with_context(|| format!("{}: cannot open", l.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut w = TarWriter {
        b: tar::Builder::new(HashWriter::new(out)),
        links: HashMap::new(),
        lowers,
    };
    w.dir(root.as_fd(), &[])
        .with_context(|| format!("{}: cannot export", upper.display()))?;
    let hw = w.b.into_inner()?;
    let (digest, size, mut inner) = hw.finish();
    inner.flush()?;
    Ok((digest, size))
}

/// What is written below a directory's own entry.
enum Below {
    /// The upper dir's entries as they are (whiteouts included).
    Upper,
    /// The merged content of this upper dir over the lower dirs given (top first).
    MergedUpper(Vec<OwnedFd>),
    /// The merged content of the lower dirs given (top first; the first is this dir).
    MergedLower(Vec<OwnedFd>),
}

/// The redirect target of an upper directory, if the overlay recorded one.
fn redirect_of(dir: BorrowedFd<'_>) -> Option<Vec<u8>> {
    ["trusted.overlay.redirect", "user.overlay.redirect"]
        .iter()
        .find_map(|n| sys::xattr::get(dir, OsStr::new(n)).ok())
        .filter(|v| !v.is_empty())
}

/// Whether a layer directory hides everything below it.
fn is_opaque(dir: BorrowedFd<'_>) -> bool {
    format::dir_mark(dir) == DirMark::Opaque
        || Component::new(OsStr::from_bytes(format::OPAQUE_MARKER))
            .is_ok_and(|m| sys::stat_at(dir, &m).is_ok())
}

/// Whether `dir` (a layer directory) holds a whiteout for `name`.
fn whited_out(dir: BorrowedFd<'_>, name: &Component, st: Option<&Stat>) -> bool {
    st.is_some_and(format::is_chardev_whiteout)
        || format::whiteout_file_name(name).is_ok_and(|wh| sys::stat_at(dir, &wh).is_ok())
}

/// The directories named `name` in the layer dirs `stack` (top first) that the merged view
/// combines: down to the first whiteout, non-directory or opaque directory.
fn child_stack(stack: &[OwnedFd], name: &Component) -> sys::SysResult<Vec<OwnedFd>> {
    let mut out = Vec::new();
    for layer in stack {
        let st = match sys::stat_at(layer.as_fd(), name) {
            Ok(st) => Some(st),
            Err(sys::Errno::NOENT) => None,
            Err(e) => return Err(e),
        };
        if whited_out(layer.as_fd(), name, st.as_ref()) {
            break;
        }
        let Some(st) = st else { continue };
        if sys::file_type(&st) != FileType::Directory {
            break;
        }
        let d = sys::open_path_dir(layer.as_fd(), name)?;
        let stop = is_opaque(d.as_fd());
        out.push(d);
        if stop {
            break;
        }
    }
    Ok(out)
}

struct TarWriter<W: Write> {
    b: tar::Builder<HashWriter<W>>,
    /// (dev, ino) of regular files with several names → the first name written.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Root fds of the lower layers, top first (only read below redirected directories).
    lowers: Vec<OwnedFd>,
}

fn child(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = prefix.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl<W: Write> TarWriter<W> {
    fn dir(&mut self, dir: BorrowedFd<'_>, prefix: &[u8]) -> anyhow::Result<()> {
        let mark = format::dir_mark(dir);
        let mut opaque = mark == DirMark::Opaque;
        let mut whiteouts = Vec::new();
        let mut nodes = Vec::new();
        let mut entries = sys::dir::read_all(dir)?;
        entries.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        for e in entries {
            let c = Component::new(&e.name)?;
            let st = sys::stat_at(dir, &c)?;
            match format::classify_name(c.as_bytes()) {
                NameKind::OpaqueMarker => opaque = true,
                NameKind::Meta | NameKind::Invalid => {}
                NameKind::WhiteoutFor(t) => whiteouts.push(t.to_vec()),
                NameKind::Plain => {
                    let xwh = mark == DirMark::HasXWhiteouts
                        && sys::open_path(dir, &c)
                            .is_ok_and(|fd| format::is_xwhiteout(fd.as_fd(), &st));
                    if format::is_chardev_whiteout(&st) || xwh {
                        whiteouts.push(c.as_bytes().to_vec());
                    } else {
                        nodes.push((c, st));
                    }
                }
            }
        }
        if opaque && !prefix.is_empty() {
            self.marker(&child(prefix, format::OPAQUE_MARKER))?;
        }
        whiteouts.sort();
        whiteouts.dedup();
        for w in whiteouts {
            let mut name = format::WH_PREFIX.to_vec();
            name.extend_from_slice(&w);
            self.marker(&child(prefix, &name))?;
        }
        for (c, st) in nodes {
            self.node(dir, &c, &st, &child(prefix, c.as_bytes()), Below::Upper)?;
        }
        Ok(())
    }

    /// An empty 0600 file owned by 0:0 with mtime 0: a whiteout or opaque marker.
    fn marker(&mut self, path: &[u8]) -> io::Result<()> {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o600);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        self.append(h, path, None, Vec::new(), io::empty())
    }

    /// The lower dirs (top first) that a redirect target names, from the layer roots.
    fn lower_stack(&self, path: &[u8]) -> anyhow::Result<Vec<OwnedFd>> {
        let mut stack: Vec<OwnedFd> = self
            .lowers
            .iter()
            .map(|l| l.try_clone())
            .collect::<io::Result<_>>()?;
        for part in path
            .split(|b| *b == b'/')
            .filter(|p| !p.is_empty() && *p != b".")
        {
            let c = Component::new(OsStr::from_bytes(part))?;
            stack = child_stack(&stack, &c)?;
        }
        Ok(stack)
    }

    /// Writes the merged content of `upper` (if any) over `stack`, below `prefix`: every entry
    /// of the union, upper first, none of the whiteouts (the caller made `prefix` opaque).
    fn merged(
        &mut self,
        upper: Option<BorrowedFd<'_>>,
        stack: Vec<OwnedFd>,
        prefix: &[u8],
    ) -> anyhow::Result<()> {
        // name → (layer index, or None for upper; its stat)
        let mut decided: std::collections::BTreeMap<Vec<u8>, (Option<usize>, Stat)> =
            Default::default();
        let mut deleted = std::collections::HashSet::new();
        let stack = match upper {
            Some(u) if is_opaque(u) => Vec::new(),
            _ => stack,
        };
        let layers: Vec<(Option<usize>, BorrowedFd<'_>)> = upper
            .map(|u| (None, u))
            .into_iter()
            .chain(stack.iter().enumerate().map(|(i, l)| (Some(i), l.as_fd())))
            .collect();
        for (idx, dir) in &layers {
            for e in sys::dir::read_all(*dir)? {
                let c = Component::new(&e.name)?;
                let st = sys::stat_at(*dir, &c)?;
                match format::classify_name(c.as_bytes()) {
                    NameKind::WhiteoutFor(t) => {
                        deleted.insert(t.to_vec());
                    }
                    NameKind::Plain if format::is_chardev_whiteout(&st) => {
                        deleted.insert(c.as_bytes().to_vec());
                    }
                    NameKind::Plain => {
                        let n = c.as_bytes().to_vec();
                        if !decided.contains_key(&n) && !deleted.contains(&n) {
                            decided.insert(n, (*idx, st));
                        }
                    }
                    _ => {}
                }
            }
        }
        for (name, (idx, st)) in decided {
            let c = Component::new(OsStr::from_bytes(&name))?;
            let path = child(prefix, &name);
            let is_dir = sys::file_type(&st) == FileType::Directory;
            match idx {
                None => {
                    let u = upper.context("upper vanished")?;
                    let below = if !is_dir {
                        Below::Upper
                    } else {
                        let sub = sys::open_path_dir(u, &c)?;
                        match redirect_of(sub.as_fd()) {
                            Some(r) => Below::MergedUpper(self.lower_stack(&origin(&path, &r))?),
                            None => Below::MergedUpper(child_stack(&stack, &c)?),
                        }
                    };
                    self.node(u, &c, &st, &path, below)?;
                }
                Some(i) => {
                    let below = if is_dir {
                        Below::MergedLower(child_stack(&stack[i..], &c)?)
                    } else {
                        Below::Upper
                    };
                    self.node(stack[i].as_fd(), &c, &st, &path, below)?;
                }
            }
        }
        Ok(())
    }

    fn node(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &Component,
        st: &Stat,
        path: &[u8],
        below: Below,
    ) -> anyhow::Result<()> {
        let fd = sys::open_path(dir, name)?;
        let kind = sys::file_type(st);
        let mut h = Header::new_ustar();
        h.set_mode(st.st_mode & 0o7777);
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        set_id(&mut h, &mut pax, "uid", u64::from(st.st_uid));
        set_id(&mut h, &mut pax, "gid", u64::from(st.st_gid));
        if st.st_mtime >= 0 && st.st_mtime < 0o77777777777 {
            h.set_mtime(st.st_mtime as u64);
        } else {
            h.set_mtime(0);
            pax.push(("mtime".into(), st.st_mtime.to_string().into_bytes()));
        }
        h.set_size(0);
        if kind != FileType::Symlink {
            let mut names = sys::xattr::list(fd.as_fd()).unwrap_or_default();
            names.sort();
            for n in names {
                if format::is_private_xattr(&n) {
                    continue;
                }
                if let Ok(v) = sys::xattr::get(fd.as_fd(), OsStr::from_bytes(&n)) {
                    let key = format!("SCHILY.xattr.{}", String::from_utf8_lossy(&n));
                    pax.push((key, v));
                }
            }
        }
        let mut path = path.to_vec();
        match kind {
            FileType::Directory => {
                h.set_entry_type(EntryType::Directory);
                path.push(b'/');
                self.append(h, &path, None, pax, io::empty())?;
                let sub = sys::open_path_dir(dir, name)?;
                let bare = &path[..path.len() - 1];
                return match below {
                    Below::MergedUpper(stack) => self.merged(Some(sub.as_fd()), stack, bare),
                    Below::MergedLower(stack) => self.merged(None, stack, bare),
                    Below::Upper => match redirect_of(sub.as_fd()) {
                        Some(r) if !is_opaque(sub.as_fd()) => {
                            if self.lowers.is_empty() {
                                anyhow::bail!(
                                    "{}: renamed directory (overlay.redirect) but no lower layers given",
                                    String::from_utf8_lossy(bare)
                                );
                            }
                            self.marker(&child(bare, format::OPAQUE_MARKER))?;
                            let stack = self.lower_stack(&origin(bare, &r))?;
                            self.merged(Some(sub.as_fd()), stack, bare)
                        }
                        _ => self.dir(sub.as_fd(), bare),
                    },
                };
            }
            FileType::RegularFile => {
                if st.st_nlink > 1 {
                    let key = (st.st_dev, st.st_ino);
                    if let Some(first) = self.links.get(&key).cloned() {
                        h.set_entry_type(EntryType::Link);
                        return Ok(self.append(h, &path, Some(&first), pax, io::empty())?);
                    }
                    self.links.insert(key, path.clone());
                }
                h.set_entry_type(EntryType::Regular);
                h.set_size(st.st_size as u64);
                let file = File::from(sys::reopen(fd.as_fd(), OFlags::RDONLY)?);
                let data = Exact {
                    inner: file.take(st.st_size as u64),
                    left: st.st_size as u64,
                };
                self.append(h, &path, None, pax, data)?;
            }
            FileType::Symlink => {
                h.set_entry_type(EntryType::Symlink);
                let target = sys::readlink_fd(fd.as_fd())?;
                self.append(h, &path, Some(&target), pax, io::empty())?;
            }
            FileType::Fifo => {
                h.set_entry_type(EntryType::Fifo);
                self.append(h, &path, None, pax, io::empty())?;
            }
            FileType::CharacterDevice | FileType::BlockDevice => {
                let t = if kind == FileType::CharacterDevice {
                    EntryType::Char
                } else {
                    EntryType::Block
                };
                h.set_entry_type(t);
                h.set_device_major(rustix::fs::major(st.st_rdev))?;
                h.set_device_minor(rustix::fs::minor(st.st_rdev))?;
                self.append(h, &path, None, pax, io::empty())?;
            }
            // Sockets do not go into layers.
            _ => {}
        }
        Ok(())
    }

    /// Writes PAX records (if any, or if a name does not fit), then the header and data.
    fn append(
        &mut self,
        mut h: Header,
        path: &[u8],
        link: Option<&[u8]>,
        mut pax: Vec<(String, Vec<u8>)>,
        data: impl Read,
    ) -> io::Result<()> {
        let fits = |b: &[u8]| b.len() <= 100 && std::str::from_utf8(b).is_ok();
        if !fits(path) {
            pax.push(("path".into(), path.to_vec()));
        }
        if let Some(l) = link.filter(|l| !fits(l)) {
            pax.push(("linkpath".into(), l.to_vec()));
        }
        pax.sort();
        {
            let u = h
                .as_ustar_mut()
                .ok_or_else(|| io::Error::other("not a ustar header"))?;
            let n = path.len().min(100);
            u.name[..n].copy_from_slice(&path[..n]);
            if let Some(l) = link {
                let n = l.len().min(100);
                u.linkname[..n].copy_from_slice(&l[..n]);
            }
        }
        if !pax.is_empty() {
            let mut body = Vec::new();
            for (k, v) in &pax {
                // "<len> <key>=<value>\n", where <len> counts itself.
                let rest = k.len() + v.len() + 3;
                let mut len = rest + 1;
                while len != rest + len.to_string().len() {
                    len = rest + len.to_string().len();
                }
                body.extend_from_slice(format!("{len} {k}=").as_bytes());
                body.extend_from_slice(v);
                body.push(b'\n');
            }
            let mut ph = Header::new_ustar();
            let base = path
                .rsplit(|b| *b == b'/')
                .find(|s| !s.is_empty())
                .unwrap_or(b"x");
            let mut pname = b"PaxHeaders.0/".to_vec();
            pname.extend_from_slice(&base[..base.len().min(80)]);
            let u = ph
                .as_ustar_mut()
                .ok_or_else(|| io::Error::other("not a ustar header"))?;
            u.name[..pname.len()].copy_from_slice(&pname);
            ph.set_entry_type(EntryType::XHeader);
            ph.set_mode(0o644);
            ph.set_mtime(0);
            ph.set_size(body.len() as u64);
            ph.set_cksum();
            self.b.append(&ph, &body[..])?;
        }
        h.set_cksum();
        self.b.append(&h, data)
    }
}

/// The path a redirect names: absolute from the root, or a name beside `path`.
fn origin(path: &[u8], redirect: &[u8]) -> Vec<u8> {
    if redirect.starts_with(b"/") {
        return redirect.to_vec();
    }
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => child(&path[..i], redirect),
        None => redirect.to_vec(),
    }
}

fn set_id(h: &mut Header, pax: &mut Vec<(String, Vec<u8>)>, key: &str, id: u64) {
    let v = if id < 0o7777777 { id } else { 0 };
    if key == "uid" {
        h.set_uid(v)
    } else {
        h.set_gid(v)
    }
    if id >= 0o7777777 {
        pax.push((key.into(), id.to_string().into_bytes()));
    }
}

/// A reader that must deliver exactly `left` more bytes: a file that shrank while being
/// exported is an error, not a corrupt tar.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being exported",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
