//! Tree snapshots: every entry of a merged tree (type, mode, owner, size, content hash, symlink
//! target, xattrs, nlink, time class) and its hard-link groups, so two mounts can be compared.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Timestamps below this (2017-07) are the deterministic ones the tests set; above, "recent".
pub const OLD_TIME_LIMIT: i64 = 1_500_000_000;

/// How a timestamp compares: deterministic ones exactly, the rest only as "recent".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimeClass {
    Old(i64, i64),
    Recent,
}

impl TimeClass {
    pub fn of(sec: i64, nsec: i64) -> TimeClass {
        if sec < OLD_TIME_LIMIT {
            TimeClass::Old(sec, nsec)
        } else {
            TimeClass::Recent
        }
    }
}

/// What a snapshot records about one path.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// `f d l p c b s`.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size of non-directories.
    pub size: Option<u64>,
    /// sha256 prefix of regular-file content.
    pub hash: Option<String>,
    pub target: Option<String>,
    /// All xattr names visible, with values.
    pub xattrs: BTreeMap<String, String>,
    pub nlink: u64,
    pub rdev: u64,
    /// None when the snapshot is told to ignore times.
    pub mtime: Option<TimeClass>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04o} {}:{}",
            self.kind, self.mode, self.uid, self.gid
        )?;
        if let Some(s) = self.size {
            write!(f, " size={s}")?;
        }
        if self.nlink != 0 {
            write!(f, " nlink={}", self.nlink)?;
        }
        if let Some(h) = &self.hash {
            write!(f, " sha={h}")?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {t:?}")?;
        }
        if self.rdev != 0 {
            write!(f, " rdev={:x}", self.rdev)?;
        }
        if !self.xattrs.is_empty() {
            write!(f, " xattrs={:?}", self.xattrs)?;
        }
        match &self.mtime {
            Some(TimeClass::Old(s, ns)) => write!(f, " mtime={s}.{ns:09}"),
            Some(TimeClass::Recent) => write!(f, " mtime=recent"),
            None => Ok(()),
        }
    }
}

/// Options for `snapshot`.
#[derive(Clone, Debug, Default)]
pub struct SnapOpts {
    /// Record mtime classes.
    pub times: bool,
    /// Check directory link counts: 1 ("unknown", what kernel overlayfs reports for merged dirs) or
    /// 2 + number of subdirectories are both fine and recorded alike; anything else is an anomaly.
    pub dir_nlink: bool,
    /// Replace this byte string (e.g. the mount path) in file contents and symlink targets before hashing.
    pub normalize: Option<String>,
    /// Paths (relative) whose content is not compared.
    pub ignore_content: Vec<String>,
}

/// A tree's entries by relative path, plus invariant violations seen while walking.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub entries: BTreeMap<String, Entry>,
    /// Groups of paths sharing one inode (hard links), sorted.
    pub link_groups: BTreeSet<Vec<String>>,
    /// d_ino != st_ino, d_type != st_mode, ...
    pub anomalies: Vec<String>,
}

pub fn kind_of(mode: u32) -> char {
    match mode & libc::S_IFMT {
        libc::S_IFREG => 'f',
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFSOCK => 's',
        _ => '?',
    }
}

/// All xattrs of `p` (not following symlinks), values printed lossily.
pub fn xattrs_of(p: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(p, &mut buf[..]) else {
        return out;
    };
    for name in buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut v = vec![0u8; 65536];
        let val = match rustix::fs::lgetxattr(p, name.as_str(), &mut v[..]) {
            Ok(n) => String::from_utf8_lossy(&v[..n]).into_owned(),
            Err(e) => format!("<{e}>"),
        };
        out.insert(name, val);
    }
    out
}

pub fn sha_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn replace_bytes(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return data.to_vec();
    }
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

/// Walks `root` (not following symlinks) and records every entry below it (the root itself as "").
pub fn snapshot(root: &Path, opts: &SnapOpts) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut inos: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    walk(root, "", opts, &mut snap, &mut inos);
    for (_, mut paths) in inos {
        if paths.len() > 1 {
            paths.sort();
            snap.link_groups.insert(paths);
        }
    }
    snap
}

fn walk(
    root: &Path,
    rel: &str,
    opts: &SnapOpts,
    snap: &mut Snapshot,
    inos: &mut BTreeMap<(u64, u64), Vec<String>>,
) {
    let p = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let st = match rustix::fs::lstat(&p) {
        Ok(st) => st,
        Err(e) => {
            snap.anomalies.push(format!("{rel}: lstat: {e}"));
            return;
        }
    };
    let kind = kind_of(st.st_mode);
    let norm = |data: &[u8]| -> Vec<u8> {
        match &opts.normalize {
            Some(s) => replace_bytes(data, s.as_bytes(), b"<MNT>"),
            None => data.to_vec(),
        }
    };
    let hash = (kind == 'f').then(|| {
        if opts.ignore_content.iter().any(|i| i == rel) {
            "<ignored>".to_string()
        } else {
            match std::fs::read(&p) {
                Ok(d) => sha_hex(&norm(&d)),
                Err(e) => format!("<{e}>"),
            }
        }
    });
    let target = (kind == 'l').then(|| match std::fs::read_link(&p) {
        Ok(t) => String::from_utf8_lossy(&norm(t.as_os_str().as_bytes())).into_owned(),
        Err(e) => format!("<{e}>"),
    });
    let is_dir = kind == 'd';
    let size = if is_dir {
        None
    } else if kind == 'l' && opts.normalize.is_some() {
        target.as_ref().map(|t| t.len() as u64)
    } else {
        Some(st.st_size as u64)
    };
    let e = Entry {
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size,
        hash,
        target,
        xattrs: xattrs_of(&p),
        nlink: if is_dir { 0 } else { st.st_nlink },
        rdev: if kind == 'c' || kind == 'b' {
            st.st_rdev
        } else {
            0
        },
        mtime: opts
            .times
            .then(|| TimeClass::of(st.st_mtime, st.st_mtime_nsec as i64)),
    };
    snap.entries.insert(rel.to_string(), e);
    if !is_dir {
        inos.entry((st.st_dev, st.st_ino))
            .or_default()
            .push(rel.to_string());
        return;
    }
    let dirfd = match rustix::fs::open(
        &p,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => {
            snap.anomalies.push(format!("{rel}: opendir: {e}"));
            return;
        }
    };
    let mut dir = match rustix::fs::Dir::read_from(&dirfd) {
        Ok(d) => d,
        Err(e) => {
            snap.anomalies.push(format!("{rel}: readdir: {e}"));
            return;
        }
    };
    let mut names = Vec::new();
    while let Some(ent) = dir.read() {
        let ent = match ent {
            Ok(e) => e,
            Err(e) => {
                snap.anomalies.push(format!("{rel}: readdir: {e}"));
                break;
            }
        };
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        match rustix::fs::lstat(root.join(&child)) {
            Ok(cst) => {
                if cst.st_ino != ent.ino() {
                    snap.anomalies.push(format!(
                        "{child}: d_ino {} != st_ino {}",
                        ent.ino(),
                        cst.st_ino
                    ));
                }
                let dt = ent.file_type();
                if dt != rustix::fs::FileType::Unknown
                    && dt != rustix::fs::FileType::from_raw_mode(cst.st_mode)
                {
                    snap.anomalies.push(format!(
                        "{child}: d_type {dt:?} != st_mode {:o}",
                        cst.st_mode
                    ));
                }
            }
            Err(e) => snap
                .anomalies
                .push(format!("{child}: listed by readdir but lstat: {e}")),
        }
        names.push(child);
    }
    if opts.dir_nlink {
        let subdirs = names
            .iter()
            .filter(|c| {
                rustix::fs::lstat(root.join(c.as_str()))
                    .map(|st| kind_of(st.st_mode) == 'd')
                    .unwrap_or(false)
            })
            .count() as u64;
        if st.st_nlink != 1 && st.st_nlink != subdirs + 2 {
            snap.anomalies.push(format!(
                "{}: directory nlink {} but {subdirs} subdirectories",
                if rel.is_empty() { "/" } else { rel },
                st.st_nlink
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for n in &names {
        if !seen.insert(n) {
            snap.anomalies.push(format!("{n}: listed twice by readdir"));
        }
    }
    names.sort();
    names.dedup();
    for child in names {
        walk(root, &child, opts, snap, inos);
    }
}

/// Human-readable differences between two snapshots (empty when equal).
pub fn diff_snapshots(a_name: &str, a: &Snapshot, b_name: &str, b: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = a.entries.keys().chain(b.entries.keys()).collect();
    for k in keys {
        let shown = if k.is_empty() { "/" } else { k.as_str() };
        match (a.entries.get(k), b.entries.get(k)) {
            (Some(x), None) => out.push(format!("{shown}: only in {a_name}: {x:?}")),
            (None, Some(y)) => out.push(format!("{shown}: only in {b_name}: {y:?}")),
            (Some(x), Some(y)) if x != y => out.push(format!(
                "{shown}:\n    {a_name}: {x:?}\n    {b_name}: {y:?}"
            )),
            _ => {}
        }
    }
    if a.link_groups != b.link_groups {
        out.push(format!(
            "hard-link groups differ:\n    {a_name}: {:?}\n    {b_name}: {:?}",
            a.link_groups, b.link_groups
        ));
    }
    // The kernel overlay lists a lower whiteout that hides nothing (a directory present in one
    // lower layer only is read straight from that layer) and then answers ENOENT for it; layerfs
    // hides every whiteout, as reference/overlay-semantics.md 2 asks. That leak is no divergence.
    let leaked_whiteout = |x: &String, other: &Snapshot| {
        let path = x.split(": ").next().unwrap_or_default();
        (x.ends_with("listed by readdir but lstat: No such file or directory (os error 2)")
            || x.ends_with(": lstat: No such file or directory (os error 2)"))
            && !other.entries.contains_key(path)
    };
    let a_anom: Vec<&String> = a
        .anomalies
        .iter()
        .filter(|x| !(a_name == "kernel" && leaked_whiteout(x, b)))
        .collect();
    let b_anom: Vec<&String> = b
        .anomalies
        .iter()
        .filter(|x| !(b_name == "kernel" && leaked_whiteout(x, a)))
        .collect();
    if a_anom != b_anom {
        out.push(format!(
            "walk anomalies differ:\n    {a_name}: {:?}\n    {b_name}: {:?}",
            a.anomalies, b.anomalies
        ));
    }
    out
}

/// Asserts two snapshots are equal, printing every difference.
pub fn assert_same_tree(what: &str, a_name: &str, a: &Snapshot, b_name: &str, b: &Snapshot) {
    let d = diff_snapshots(a_name, a, b_name, b);
    assert!(
        d.is_empty(),
        "{what}: trees differ ({} differences):\n{}",
        d.len(),
        d.join("\n")
    );
}
