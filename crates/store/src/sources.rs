//! Reading the files of an image source by name: a directory (OCI layout, extracted docker save)
//! or an archive tar (docker save, OCI archive), indexed once so members are read in place.
//! Names are cleaned; symlink members (skopeo's docker-archive) are followed inside the archive.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use layerfs_sys::{self as sys, OFlags};

/// Largest JSON document (config, manifest, index) read into memory.
const MAX_JSON: u64 = 64 << 20;

pub(crate) enum Member {
    Data { offset: u64, size: u64 },
    Symlink(String),
    Hardlink(String),
}

/// Files of an image source.
pub(crate) enum Source {
    /// A directory; files are opened with `RESOLVE_IN_ROOT`.
    Dir { path: PathBuf, root: OwnedFd },
    /// An uncompressed tar with its member index.
    Archive {
        path: PathBuf,
        file: File,
        members: HashMap<String, Member>,
    },
}

/// `a/./b/`, `/a/b`, `./a/b` → `a/b`; `..` pops (never above the top). `None` if it would leave.
pub(crate) fn clean_name(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

impl Source {
    pub(crate) fn dir(path: &Path) -> anyhow::Result<Source> {
        let root =
            sys::open_root(path).with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(Source::Dir {
            path: path.to_path_buf(),
            root,
        })
    }

    /// Indexes the uncompressed tar `file` (named `path` in errors).
    pub(crate) fn archive(path: &Path, mut file: File) -> anyhow::Result<Source> {
        let label = path.display();
        file.seek(SeekFrom::Start(0))?;
        let mut members = HashMap::new();
        {
            let mut ar = tar::Archive::new(&file);
            for e in ar
                .entries_with_seek()
                .with_context(|| format!("{label}: not a tar archive"))?
            {
                let e = e.with_context(|| format!("{label}: truncated or corrupt tar"))?;
                let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                let Some(clean) = clean_name(&name) else {
                    continue;
                };
                let kind = e.header().entry_type();
                let link = || {
                    e.link_name_bytes()
                        .map(|l| String::from_utf8_lossy(&l).into_owned())
                };
                let m = if kind.is_symlink() {
                    Member::Symlink(link().unwrap_or_default())
                } else if kind.is_hard_link() {
                    Member::Hardlink(link().unwrap_or_default())
                } else if kind.is_file() {
                    Member::Data {
                        offset: e.raw_file_position(),
                        size: e.size(),
                    }
                } else {
                    continue;
                };
                members.insert(clean, m);
            }
        }
        Ok(Source::Archive {
            path: path.to_path_buf(),
            file,
            members,
        })
    }

    /// The source's name for messages.
    pub(crate) fn label(&self) -> String {
        match self {
            Source::Dir { path, .. } | Source::Archive { path, .. } => path.display().to_string(),
        }
    }

    /// Whether `name` exists.
    pub(crate) fn exists(&self, name: &str) -> bool {
        self.open(name).is_ok()
    }

    /// Opens member `name` for reading; returns it and its size.
    pub(crate) fn open(&self, name: &str) -> anyhow::Result<(Box<dyn Read + '_>, u64)> {
        let label = self.label();
        let clean = clean_name(name)
            .with_context(|| format!("{label}: {name}: path leaves the archive"))?;
        match self {
            Source::Dir { root, .. } => {
                let fd = sys::open_in_root(root.as_fd(), Path::new(&clean), OFlags::RDONLY)
                    .with_context(|| format!("{label}: {name}: cannot open"))?;
                let f = File::from(fd);
                let size = f.metadata()?.len();
                if !f.metadata()?.is_file() {
                    bail!("{label}: {name}: not a regular file");
                }
                Ok((Box::new(f), size))
            }
            Source::Archive { file, members, .. } => {
                let mut cur = clean;
                for _ in 0..16 {
                    match members.get(&cur) {
                        None => bail!("{label}: {name}: no such member"),
                        Some(Member::Data { offset, size }) => {
                            let r = SectionReader {
                                file,
                                pos: *offset,
                                end: offset + size,
                            };
                            return Ok((Box::new(r), *size));
                        }
                        Some(Member::Hardlink(t)) => {
                            cur = clean_name(t)
                                .with_context(|| format!("{label}: {name}: bad link"))?;
                        }
                        Some(Member::Symlink(t)) => {
                            let base = cur.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                            let joined = if t.starts_with('/') {
                                t.clone()
                            } else {
                                format!("{base}/{t}")
                            };
                            cur = clean_name(&joined).with_context(|| {
                                format!("{label}: {name}: symlink leaves the archive")
                            })?;
                        }
                    }
                }
                bail!("{label}: {name}: too many levels of links")
            }
        }
    }

    /// Reads a (JSON) member whole.
    pub(crate) fn read(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let (r, size) = self.open(name)?;
        if size > MAX_JSON {
            bail!(
                "{}: {name}: {size} bytes is too large for a JSON document",
                self.label()
            );
        }
        let mut buf = Vec::with_capacity(size as usize);
        r.take(MAX_JSON).read_to_end(&mut buf)?;
        Ok(buf)
    }
}

/// A window of a file, read with `pread` so several may be open at once.
struct SectionReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for SectionReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let left = (self.end - self.pos).min(buf.len() as u64) as usize;
        if left == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..left], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive member ends early",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::clean_name;

    #[test]
    fn names_are_cleaned() {
        assert_eq!(clean_name("./a/b/").as_deref(), Some("a/b"));
        assert_eq!(clean_name("/a/../b").as_deref(), Some("b"));
        assert_eq!(clean_name("../x"), None);
    }
}
