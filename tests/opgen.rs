//! Seeded generation of lower layers and operation sequences for the differential test.
//!
//! Everything is a pure function of a `u64` seed (splitmix64), so a failing seed replays exactly.
//! Paths come from a small fixed pool so that operations collide with each other and with lower entries.

use std::fmt;
use std::path::Path;

use crate::util::OLD_TIME_LIMIT;

/// splitmix64: tiny, fast, good enough for test generation.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `pct`%.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Mixes a base seed and an index into a per-sequence seed.
pub fn seq_seed(base: u64, i: u64) -> u64 {
    let mut r = Rng::new(base ^ i.wrapping_mul(0xA24B_AED4_963E_E407));
    r.next_u64()
}

/// The path pool, parents before children.
pub const POOL: &[&str] = &[
    "a", "b", "c", "d", "a/x", "a/y", "b/x", "b/y", "c/x", "c/y", "a/x/p", "a/x/q", "b/x/p",
    "b/x/q",
];

fn parent(p: &str) -> Option<&str> {
    p.rsplit_once('/').map(|(d, _)| d)
}

fn depth(p: &str) -> usize {
    p.matches('/').count() + 1
}

const FILE_MODES: &[u32] = &[0o644, 0o644, 0o600, 0o755, 0o444, 0o400, 0o000, 0o4755];
const DIR_MODES: &[u32] = &[0o755, 0o755, 0o700, 0o555, 0o1777, 0o2755];
const OWNERS: &[u32] = &[0, 0, 1000, 1001];

/// One entry of a generated lower layer.
#[derive(Clone, Debug)]
pub enum LowerKind {
    File {
        data: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
        xattrs: Vec<(String, String)>,
    },
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
        opaque: bool,
        xattrs: Vec<(String, String)>,
    },
    Symlink(String),
    /// Kernel-format whiteout: char device 0/0.
    Whiteout,
    Fifo,
    /// A hard link to an earlier file of the same layer.
    HardLink(String),
}

/// A generated lower layer: entries in creation order, plus an mtime per entry.
#[derive(Clone, Debug)]
pub struct LowerLayer {
    pub entries: Vec<(String, LowerKind, i64)>,
}

/// Lower layers, top first.
#[derive(Clone, Debug)]
pub struct Lowers {
    pub layers: Vec<LowerLayer>,
}

/// Deterministic content of `len` bytes labelled `tag`.
pub fn content(tag: &str, len: usize) -> Vec<u8> {
    let unit = format!("{tag};");
    unit.bytes().cycle().take(len).collect()
}

fn symlink_target(rng: &mut Rng, at: &str) -> String {
    if rng.chance(15) {
        return "zz".to_string(); // dangling
    }
    let ups = "../".repeat(depth(at) - 1);
    format!("{ups}{}", rng.pick(POOL))
}

fn gen_xattrs(rng: &mut Rng) -> Vec<(String, String)> {
    let mut x = Vec::new();
    if rng.chance(25) {
        x.push(("user.a".to_string(), format!("v{}", rng.below(100))));
    }
    if rng.chance(10) {
        x.push(("user.b".to_string(), String::new()));
    }
    if rng.chance(5) {
        x.push(("trusted.t".to_string(), "tv".to_string()));
    }
    x
}

pub fn gen_lowers(seed: u64) -> Lowers {
    let mut rng = Rng::new(seed ^ 0x10_3e25);
    let n = 1 + rng.below(3) as usize; // 1..=3 layers, mostly 2 or 3
    let mut layers = Vec::new();
    for li in 0..n {
        let bottom = li == n - 1;
        let mut entries: Vec<(String, LowerKind, i64)> = Vec::new();
        let mut dirs: Vec<String> = Vec::new();
        let mut files: Vec<String> = Vec::new();
        for &p in POOL {
            if let Some(par) = parent(p)
                && !dirs.iter().any(|d| d == par)
            {
                continue;
            }
            let has_children = POOL.iter().any(|c| parent(c) == Some(p));
            // Paths with children in the pool are mostly directories, so deeper paths exist often.
            let r = if has_children {
                match rng.below(100) {
                    0..15 => 0,   // absent
                    15..30 => 40, // file
                    30..88 => 80, // dir
                    x => x,
                }
            } else {
                rng.below(100)
            };
            let mtime = 1_000_000_000 + rng.below(100_000_000) as i64;
            let kind = if r < 30 {
                continue;
            } else if r < 70 {
                let len = if rng.chance(10) {
                    70_000 + rng.below(5000) as usize
                } else {
                    rng.below(40) as usize
                };
                files.push(p.to_string());
                LowerKind::File {
                    data: content(&format!("L{li}:{p}"), len),
                    mode: *rng.pick(FILE_MODES),
                    uid: *rng.pick(OWNERS),
                    gid: *rng.pick(OWNERS),
                    xattrs: gen_xattrs(&mut rng),
                }
            } else if r < 88 {
                dirs.push(p.to_string());
                LowerKind::Dir {
                    mode: *rng.pick(DIR_MODES),
                    uid: *rng.pick(OWNERS),
                    gid: *rng.pick(OWNERS),
                    opaque: !bottom && rng.chance(15),
                    xattrs: gen_xattrs(&mut rng),
                }
            } else if r < 92 {
                LowerKind::Symlink(symlink_target(&mut rng, p))
            } else if r < 96 && !bottom {
                LowerKind::Whiteout
            } else if r < 98 {
                LowerKind::Fifo
            } else if !files.is_empty() {
                let to = rng.pick(&files).clone();
                LowerKind::HardLink(to)
            } else {
                LowerKind::Fifo
            };
            entries.push((p.to_string(), kind, mtime));
        }
        layers.push(LowerLayer { entries });
    }
    Lowers { layers }
}

/// Creates the layer on disk at `dir` (which must exist and be empty).
pub fn build_layer(layer: &LowerLayer, dir: &Path) {
    use rustix::fs::{self as rfs, AtFlags, CWD, Mode, Timespec, Timestamps};
    for (p, kind, _) in &layer.entries {
        let full = dir.join(p);
        match kind {
            LowerKind::File {
                data,
                mode,
                uid,
                gid,
                xattrs,
            } => {
                std::fs::write(&full, data).expect("write lower file");
                for (k, v) in xattrs {
                    rfs::lsetxattr(&full, k.as_str(), v.as_bytes(), rfs::XattrFlags::empty())
                        .expect("lower xattr");
                }
                rfs::chown(
                    &full,
                    Some(rfs::Uid::from_raw(*uid)),
                    Some(rfs::Gid::from_raw(*gid)),
                )
                .expect("chown");
                rfs::chmod(&full, Mode::from_raw_mode(*mode)).expect("chmod");
            }
            LowerKind::Dir { xattrs, opaque, .. } => {
                std::fs::create_dir(&full).expect("mkdir lower");
                for (k, v) in xattrs {
                    rfs::lsetxattr(&full, k.as_str(), v.as_bytes(), rfs::XattrFlags::empty())
                        .expect("lower xattr");
                }
                if *opaque {
                    rfs::lsetxattr(
                        &full,
                        "trusted.overlay.opaque",
                        b"y",
                        rfs::XattrFlags::empty(),
                    )
                    .expect("opaque xattr");
                }
            }
            LowerKind::Symlink(t) => {
                std::os::unix::fs::symlink(t, &full).expect("symlink");
            }
            LowerKind::Whiteout => {
                rfs::mknodat(
                    CWD,
                    &full,
                    rfs::FileType::CharacterDevice,
                    Mode::empty(),
                    rfs::makedev(0, 0),
                )
                .expect("whiteout");
            }
            LowerKind::Fifo => {
                rfs::mknodat(
                    CWD,
                    &full,
                    rfs::FileType::Fifo,
                    Mode::from_raw_mode(0o644),
                    0,
                )
                .expect("fifo");
            }
            LowerKind::HardLink(to) => {
                std::fs::hard_link(dir.join(to), &full).expect("hard link");
            }
        }
    }
    // Directory modes/owners last (children needed a writable dir), then times deepest first.
    for (p, kind, _) in &layer.entries {
        if let LowerKind::Dir { mode, uid, gid, .. } = kind {
            let full = dir.join(p);
            rfs::chown(
                &full,
                Some(rfs::Uid::from_raw(*uid)),
                Some(rfs::Gid::from_raw(*gid)),
            )
            .expect("chown dir");
            rfs::chmod(&full, Mode::from_raw_mode(*mode)).expect("chmod dir");
        }
    }
    for (p, _, mtime) in layer.entries.iter().rev() {
        let t = Timespec {
            tv_sec: *mtime,
            tv_nsec: 0,
        };
        let ts = Timestamps {
            last_access: t,
            last_modification: t,
        };
        rfs::utimensat(CWD, dir.join(p), &ts, AtFlags::SYMLINK_NOFOLLOW).expect("utimensat lower");
    }
    let t = Timespec {
        tv_sec: 999_999_999,
        tv_nsec: 0,
    };
    let ts = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rfs::utimensat(CWD, dir, &ts, AtFlags::empty()).expect("utimensat lower root");
}

impl fmt::Display for Lowers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.layers.iter().enumerate() {
            writeln!(f, "  lower{i}{}:", if i == 0 { " (top)" } else { "" })?;
            for (p, k, mtime) in &l.entries {
                let d = match k {
                    LowerKind::File {
                        data,
                        mode,
                        uid,
                        gid,
                        xattrs,
                    } => format!(
                        "file {mode:04o} {uid}:{gid} {} bytes{}",
                        data.len(),
                        if xattrs.is_empty() {
                            String::new()
                        } else {
                            format!(" xattrs {xattrs:?}")
                        }
                    ),
                    LowerKind::Dir {
                        mode,
                        uid,
                        gid,
                        opaque,
                        xattrs,
                    } => format!(
                        "dir {mode:04o} {uid}:{gid}{}{}",
                        if *opaque { " OPAQUE" } else { "" },
                        if xattrs.is_empty() {
                            String::new()
                        } else {
                            format!(" xattrs {xattrs:?}")
                        }
                    ),
                    LowerKind::Symlink(t) => format!("symlink -> {t}"),
                    LowerKind::Whiteout => "WHITEOUT (c 0 0)".to_string(),
                    LowerKind::Fifo => "fifo".to_string(),
                    LowerKind::HardLink(t) => format!("hard link to {t}"),
                };
                writeln!(f, "    {p:8} {d}  mtime {mtime}")?;
            }
        }
        Ok(())
    }
}

/// Which rename(2) flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameKind {
    Plain,
    NoReplace,
    Exchange,
}

/// A utimensat time argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeArg {
    At(i64),
    Now,
    Omit,
}

/// setxattr flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XFlag {
    Any,
    Create,
    Replace,
}

/// One operation of a sequence; paths are relative to the mount root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Create {
        path: String,
        mode: u32,
    },
    Write {
        path: String,
        off: u64,
        len: usize,
    },
    Append {
        path: String,
        len: usize,
    },
    OpenTrunc {
        path: String,
        len: usize,
    },
    Truncate {
        path: String,
        len: u64,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
        kind: RenameKind,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        uid: u32,
        gid: u32,
        follow: bool,
    },
    Utimens {
        path: String,
        atime: TimeArg,
        mtime: TimeArg,
        follow: bool,
    },
    SetXattr {
        path: String,
        name: String,
        value: String,
        flag: XFlag,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    GetXattr {
        path: String,
        name: String,
    },
    ListXattr {
        path: String,
    },
    MkFifo {
        path: String,
    },
    MknodWhiteout {
        path: String,
    },
    ReadWhileWrite {
        path: String,
        len: usize,
    },
    UnlinkWhileOpen {
        path: String,
    },
    Read {
        path: String,
    },
    Readdir {
        path: String,
    },
    Stat {
        path: String,
    },
    Readlink {
        path: String,
    },
    InoStable {
        path: String,
    },
    Fsync {
        path: String,
    },
    Access {
        path: String,
        mode: u32,
    },
    CopyFileRange {
        from: String,
        to: String,
    },
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Write { .. } => "write",
            Op::Append { .. } => "append",
            Op::OpenTrunc { .. } => "open-trunc",
            Op::Truncate { .. } => "truncate",
            Op::Unlink { .. } => "unlink",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Link { .. } => "link",
            Op::Symlink { .. } => "symlink",
            Op::Chmod { .. } => "chmod",
            Op::Chown { .. } => "chown",
            Op::Utimens { .. } => "utimens",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::GetXattr { .. } => "getxattr",
            Op::ListXattr { .. } => "listxattr",
            Op::MkFifo { .. } => "mkfifo",
            Op::MknodWhiteout { .. } => "mknod-c00",
            Op::ReadWhileWrite { .. } => "read-while-write",
            Op::UnlinkWhileOpen { .. } => "unlink-while-open",
            Op::Read { .. } => "read",
            Op::Readdir { .. } => "readdir",
            Op::Stat { .. } => "stat",
            Op::Readlink { .. } => "readlink",
            Op::InoStable { .. } => "ino-stable",
            Op::Fsync { .. } => "fsync",
            Op::Access { .. } => "access",
            Op::CopyFileRange { .. } => "copy-file-range",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create { path, mode } => {
                write!(f, "open({path:?}, O_CREAT|O_EXCL|O_WRONLY, {mode:04o})")
            }
            Op::Write { path, off, len } => write!(f, "pwrite({path:?}, off={off}, {len} bytes)"),
            Op::Append { path, len } => write!(f, "open({path:?}, O_APPEND) + write {len} bytes"),
            Op::OpenTrunc { path, len } => {
                write!(
                    f,
                    "open({path:?}, O_CREAT|O_TRUNC|O_WRONLY, 0644) + write {len} bytes"
                )
            }
            Op::Truncate { path, len } => write!(f, "truncate({path:?}, {len})"),
            Op::Unlink { path } => write!(f, "unlink({path:?})"),
            Op::Mkdir { path, mode } => write!(f, "mkdir({path:?}, {mode:04o})"),
            Op::Rmdir { path } => write!(f, "rmdir({path:?})"),
            Op::Rename { from, to, kind } => write!(f, "renameat2({from:?}, {to:?}, {kind:?})"),
            Op::Link { from, to } => write!(f, "link({from:?}, {to:?})"),
            Op::Symlink { target, path } => write!(f, "symlink({target:?}, {path:?})"),
            Op::Chmod { path, mode } => write!(f, "chmod({path:?}, {mode:04o})"),
            Op::Chown {
                path,
                uid,
                gid,
                follow,
            } => {
                write!(
                    f,
                    "{}({path:?}, {uid}, {gid})",
                    if *follow { "chown" } else { "lchown" }
                )
            }
            Op::Utimens {
                path,
                atime,
                mtime,
                follow,
            } => write!(
                f,
                "utimensat({path:?}, atime={atime:?}, mtime={mtime:?}{})",
                if *follow { "" } else { ", AT_SYMLINK_NOFOLLOW" }
            ),
            Op::SetXattr {
                path,
                name,
                value,
                flag,
            } => {
                write!(f, "lsetxattr({path:?}, {name:?}, {value:?}, {flag:?})")
            }
            Op::RemoveXattr { path, name } => write!(f, "lremovexattr({path:?}, {name:?})"),
            Op::GetXattr { path, name } => write!(f, "lgetxattr({path:?}, {name:?})"),
            Op::ListXattr { path } => write!(f, "llistxattr({path:?})"),
            Op::MkFifo { path } => write!(f, "mkfifo({path:?}, 0644)"),
            Op::MknodWhiteout { path } => write!(f, "mknod({path:?}, S_IFCHR, 0/0)"),
            Op::ReadWhileWrite { path, len } => write!(
                f,
                "fdA=open({path:?}, O_RDONLY); fdB=open({path:?}, O_WRONLY); pwrite(fdB, {len} bytes, 0); pread(fdA)"
            ),
            Op::UnlinkWhileOpen { path } => {
                write!(
                    f,
                    "fd=open({path:?}, O_RDONLY); unlink({path:?}); fstat(fd).nlink; read(fd)"
                )
            }
            Op::Read { path } => write!(f, "read({path:?})"),
            Op::Readdir { path } => write!(f, "readdir({path:?})"),
            Op::Stat { path } => write!(f, "lstat({path:?})"),
            Op::Readlink { path } => write!(f, "readlink({path:?})"),
            Op::InoStable { path } => {
                write!(
                    f,
                    "lstat({path:?}).ino; chmod(same mode); lstat({path:?}).ino unchanged?"
                )
            }
            Op::Fsync { path } => write!(f, "fsync(open({path:?}, O_RDONLY))"),
            Op::Access { path, mode } => write!(f, "access({path:?}, {mode})"),
            Op::CopyFileRange { from, to } => {
                write!(
                    f,
                    "copy_file_range({from:?} -> open({to:?}, O_WRONLY|O_CREAT))"
                )
            }
        }
    }
}

/// Names never present in a lower: targets of creations and renames.
pub const FRESH: &[&str] = &["n", "a/n", "b/n", "a/x/n", "b/x/n"];

fn path(rng: &mut Rng) -> String {
    rng.pick(POOL).to_string()
}

/// A destination: a fresh name 40% of the time, else a pool path.
fn dest(rng: &mut Rng) -> String {
    if rng.chance(40) {
        rng.pick(FRESH).to_string()
    } else {
        path(rng)
    }
}

fn data_len(rng: &mut Rng) -> usize {
    if rng.chance(10) {
        5000 + rng.below(80_000) as usize
    } else {
        1 + rng.below(30) as usize
    }
}

fn time_arg(rng: &mut Rng) -> TimeArg {
    match rng.below(4) {
        0 => TimeArg::Now,
        1 => TimeArg::Omit,
        _ => TimeArg::At(1_100_000_000 + rng.below(OLD_TIME_LIMIT as u64 - 1_200_000_000) as i64),
    }
}

fn xattr_name(rng: &mut Rng) -> String {
    let names = [
        "user.a",
        "user.a",
        "user.b",
        "user.c",
        "trusted.t",
        "trusted.overlay.opaque",
        "user.overlay.x",
    ];
    rng.pick(&names).to_string()
}

/// One random operation.
pub fn gen_op(rng: &mut Rng) -> Op {
    let which = rng.below(32);
    let creates = matches!(which, 0 | 1 | 4 | 8 | 9 | 16 | 23);
    let p = if creates { dest(rng) } else { path(rng) };
    match which {
        0 | 1 => Op::Create {
            path: p,
            mode: *rng.pick(FILE_MODES),
        },
        2 => Op::Write {
            path: p,
            off: rng.below(50),
            len: data_len(rng),
        },
        3 => Op::Append {
            path: p,
            len: data_len(rng),
        },
        4 => Op::OpenTrunc {
            path: p,
            len: data_len(rng),
        },
        5 => Op::Truncate {
            path: p,
            len: rng.below(60),
        },
        6 | 7 => Op::Unlink { path: p },
        8 | 9 => Op::Mkdir {
            path: p,
            mode: *rng.pick(DIR_MODES),
        },
        10 | 11 => Op::Rmdir { path: p },
        12..=14 => Op::Rename {
            from: p,
            to: dest(rng),
            kind: match rng.below(4) {
                0 => RenameKind::NoReplace,
                1 => RenameKind::Exchange,
                _ => RenameKind::Plain,
            },
        },
        15 => Op::Link {
            from: p,
            to: dest(rng),
        },
        16 => {
            let target = symlink_target(rng, &p);
            Op::Symlink { target, path: p }
        }
        17 => Op::Chmod {
            path: p,
            mode: *rng.pick(FILE_MODES),
        },
        18 => Op::Chown {
            path: p,
            uid: *rng.pick(OWNERS),
            gid: *rng.pick(OWNERS),
            follow: rng.chance(50),
        },
        19 => Op::Utimens {
            path: p,
            atime: time_arg(rng),
            mtime: time_arg(rng),
            follow: rng.chance(50),
        },
        20 => Op::SetXattr {
            path: p,
            name: xattr_name(rng),
            value: format!("x{}", rng.below(10)),
            flag: *rng.pick(&[XFlag::Any, XFlag::Any, XFlag::Create, XFlag::Replace]),
        },
        21 => Op::RemoveXattr {
            path: p,
            name: xattr_name(rng),
        },
        22 => {
            if rng.chance(50) {
                Op::GetXattr {
                    path: p,
                    name: xattr_name(rng),
                }
            } else {
                Op::ListXattr { path: p }
            }
        }
        23 => {
            if rng.chance(80) {
                Op::MkFifo { path: p }
            } else {
                Op::MknodWhiteout { path: p }
            }
        }
        24 => Op::ReadWhileWrite {
            path: p,
            len: data_len(rng),
        },
        25 => Op::UnlinkWhileOpen { path: p },
        26 => Op::Read { path: p },
        27 => Op::Readdir { path: p },
        28 => {
            if rng.chance(70) {
                Op::Stat { path: p }
            } else {
                Op::Readlink { path: p }
            }
        }
        29 => Op::InoStable { path: p },
        30 => {
            if rng.chance(50) {
                Op::Fsync { path: p }
            } else {
                Op::Access {
                    path: p,
                    mode: rng.below(8) as u32,
                }
            }
        }
        _ => Op::CopyFileRange {
            from: p,
            to: dest(rng),
        },
    }
}

/// A sequence of `min..=max` ops.
pub fn gen_ops(seed: u64, min: usize, max: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed ^ 0x0905_5eed);
    let n = min + rng.below((max - min + 1) as u64) as usize;
    (0..n).map(|_| gen_op(&mut rng)).collect()
}
