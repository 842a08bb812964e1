//! Tar-split: the layer tar minus its file contents, so that `diff/` plus this record rebuilds the
//! exact tar (same bytes, so same `diff_id`) for `save` and `verify` — the way Docker and
//! containers/storage keep layers. An imported tar can not be re-created by re-tarring the
//! extracted tree (header details, ordering and padding differ between tar writers).
//!
//! File `tar-split.zst` (zstd) is a sequence of segments:
//! - `R <u64 len> <len bytes>`: raw tar bytes (headers, PAX records, padding, end blocks, trailer);
//! - `F <u64 size> <u32 n> <n bytes path>`: `size` bytes of the regular file at `path` in `diff/`.
//!
//! A file that a later entry of the same tar replaced keeps its old contents in
//! `tar-split.saved/<segment index>`. Integers are little-endian.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use layerfs_sys::{self as sys, OFlags};

use crate::digest::{Digest, HashWriter};

/// File name of the record inside a layer directory.
pub const SPLIT_FILE: &str = "tar-split.zst";
/// Directory of saved overwritten contents inside a layer directory.
pub const SAVED_DIR: &str = "tar-split.saved";

const FLUSH_AT: usize = 1 << 20;

/// Records the raw tar stream while a layer is extracted.
pub struct SplitWriter {
    out: zstd::Encoder<'static, BufWriter<File>>,
    layer_dir: PathBuf,
    pending: Vec<u8>,
    capturing: bool,
    next_index: u64,
}

impl SplitWriter {
    /// Starts `layer_dir/tar-split.zst`.
    pub fn create(layer_dir: &Path) -> io::Result<Self> {
        let file = File::create(layer_dir.join(SPLIT_FILE))?;
        Ok(SplitWriter {
            out: zstd::Encoder::new(BufWriter::new(file), 3)?,
            layer_dir: layer_dir.to_path_buf(),
            pending: Vec::new(),
            capturing: true,
            next_index: 0,
        })
    }

    fn observe(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.capturing {
            self.pending.extend_from_slice(bytes);
            if self.pending.len() >= FLUSH_AT {
                self.flush_raw()?;
            }
        }
        Ok(())
    }

    fn flush_raw(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.out.write_all(b"R")?;
            self.out
                .write_all(&(self.pending.len() as u64).to_le_bytes())?;
            self.out.write_all(&self.pending)?;
            self.pending.clear();
            self.next_index += 1;
        }
        Ok(())
    }

    /// The bytes read from now on are the contents of a file extracted to `path` (relative to
    /// `diff/`): they are not recorded.
    pub fn begin_file(&mut self) -> io::Result<()> {
        self.flush_raw()?;
        self.capturing = false;
        Ok(())
    }

    /// The file's contents ended after `size` bytes; returns the segment index.
    pub fn end_file(&mut self, path: &[u8], size: u64) -> io::Result<u64> {
        self.out.write_all(b"F")?;
        self.out.write_all(&size.to_le_bytes())?;
        self.out.write_all(&(path.len() as u32).to_le_bytes())?;
        self.out.write_all(path)?;
        self.capturing = true;
        self.next_index += 1;
        Ok(self.next_index - 1)
    }

    /// Keeps the current contents of a recorded file (segment `index`) that is about to be
    /// replaced or removed.
    pub fn save_contents(&mut self, index: u64, file: BorrowedFd<'_>) -> io::Result<()> {
        let dir = self.layer_dir.join(SAVED_DIR);
        fs::create_dir_all(&dir)?;
        let src = sys::reopen(file, OFlags::RDONLY)?;
        let mut dst = File::create(dir.join(index.to_string()))?;
        io::copy(&mut File::from(src), &mut dst)?;
        Ok(())
    }

    /// Writes what is pending and closes the record.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush_raw()?;
        let mut w = self.out.finish()?;
        w.flush()?;
        w.get_ref().sync_all()
    }
}

/// A reader that shows every byte it passes to a shared [`SplitWriter`].
pub struct TeeReader<R> {
    inner: R,
    split: Rc<RefCell<SplitWriter>>,
}

impl<R: Read> TeeReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, split: Rc<RefCell<SplitWriter>>) -> Self {
        TeeReader { inner, split }
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.split.borrow_mut().observe(&buf[..n])?;
        Ok(n)
    }
}

/// Rebuilds the layer tar of the layer directory `layer_dir` into `out`; returns its digest and
/// size. Files are opened below `diff/` per component, never following a symlink.
pub fn rebuild(layer_dir: &Path, out: impl Write) -> io::Result<(Digest, u64)> {
    let mut r = zstd::Decoder::new(BufReader::new(File::open(layer_dir.join(SPLIT_FILE))?))?;
    let root = sys::open_root(&layer_dir.join("diff"))?;
    let mut out = HashWriter::new(out);
    let mut index = 0u64;
    loop {
        let mut tag = [0u8; 1];
        match r.read_exact(&mut tag) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let len = read_u64(&mut r)?;
        match tag[0] {
            b'R' => {
                let n = io::copy(&mut (&mut r).take(len), &mut out)?;
                if n != len {
                    return Err(corrupt("raw segment ends early"));
                }
            }
            b'F' => {
                let mut n = [0u8; 4];
                r.read_exact(&mut n)?;
                let mut path = vec![0u8; u32::from_le_bytes(n) as usize];
                r.read_exact(&mut path)?;
                let saved = layer_dir.join(SAVED_DIR).join(index.to_string());
                let file = if saved.exists() {
                    File::open(saved)?
                } else {
                    File::from(sys::open_beneath(root.as_fd(), &path, OFlags::RDONLY)?)
                };
                let copied = io::copy(&mut file.take(len), &mut out)?;
                if copied != len {
                    return Err(io::Error::other(format!(
                        "{}: file is shorter than the layer tar says",
                        String::from_utf8_lossy(&path)
                    )));
                }
            }
            _ => return Err(corrupt("unknown segment")),
        }
        index += 1;
    }
    let (digest, size, mut w) = out.finish();
    w.flush()?;
    Ok((digest, size))
}

/// A digest of the metadata of the tree `diff`: per entry, in name order, its path, type, mode,
/// owner, mtime, size, device number, symlink target and every xattr (private ones included:
/// they carry opaque marks). File contents are covered by [`rebuild`].
pub fn meta_digest(diff: &Path) -> io::Result<Digest> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let root = sys::open_root(diff)?;
    let mut stack = vec![(root, Vec::<u8>::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let mut entries = sys::dir::read_all(dir.as_fd())?;
        entries.sort_by(|a, b| b.name.as_bytes().cmp(a.name.as_bytes()));
        for e in entries {
            let c = sys::Component::new(&e.name)?;
            let st = sys::stat_at(dir.as_fd(), &c)?;
            let fd = sys::open_path(dir.as_fd(), &c)?;
            let mut path = prefix.clone();
            path.push(b'/');
            path.extend_from_slice(c.as_bytes());
            let kind = sys::file_type(&st);
            let size = if kind == sys::FileType::RegularFile {
                st.st_size
            } else {
                0
            };
            h.update(&path);
            h.update(
                format!(
                    "\0{:o} {} {} {}.{} {} {}\0",
                    st.st_mode,
                    st.st_uid,
                    st.st_gid,
                    st.st_mtime,
                    st.st_mtime_nsec,
                    size,
                    st.st_rdev
                )
                .as_bytes(),
            );
            if kind == sys::FileType::Symlink {
                h.update(sys::readlink_fd(fd.as_fd())?);
            } else {
                let mut names = sys::xattr::list(fd.as_fd()).unwrap_or_default();
                names.sort();
                for n in names {
                    let v = sys::xattr::get(fd.as_fd(), std::ffi::OsStr::from_bytes(&n))
                        .unwrap_or_default();
                    h.update(&n);
                    h.update(b"=");
                    h.update(&v);
                    h.update(b"\0");
                }
            }
            h.update(b"\n");
            if kind == sys::FileType::Directory {
                stack.push((sys::open_path_dir(dir.as_fd(), &c)?, path));
            }
        }
    }
    Ok(Digest::from_hasher(h))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{SPLIT_FILE}: {what}"))
}
