//! Seeded generation of operation sequences for the differential test (lowers: `lowergen`).
//!
//! Ops use the same small path pool as the lowers, so they collide with each other and with lower entries.

use std::fmt;

use crate::lowergen::{DIR_MODES, FILE_MODES, OWNERS, POOL, Rng, symlink_target};
use crate::util::OLD_TIME_LIMIT;

/// What the generator leaves out (`LAYERFS_FUZZ_EXCLUDE=a,b,…`): op kinds as named by `Op::kind`, plus
/// `lower-hardlinks` (no hard links inside lower layers) and `private-xattrs` (no `trusted.overlay.*` /
/// `user.overlay.*` names in xattr ops). Used to look past a known divergence for the next one.
#[derive(Clone, Debug, Default)]
pub struct GenConfig {
    pub exclude: Vec<String>,
}

impl GenConfig {
    pub fn from_env() -> GenConfig {
        // Unset: every op. (O_TMPFILE is left out per sequence where layerfs cannot serve it:
        // differential::check_seed.)
        let exclude = std::env::var("LAYERFS_FUZZ_EXCLUDE")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        GenConfig { exclude }
    }

    pub fn excludes(&self, what: &str) -> bool {
        self.exclude.iter().any(|e| e == what)
    }

    fn allows(&self, op: &Op) -> bool {
        if self.excludes(op.kind()) {
            return false;
        }
        let xname = match op {
            Op::AsUser { op, .. } => return self.allows(op),
            Op::SetXattr { name, .. }
            | Op::RemoveXattr { name, .. }
            | Op::GetXattr { name, .. } => name,
            _ => return true,
        };
        !(self.excludes("private-xattrs")
            && (xname.starts_with("trusted.overlay.") || xname.starts_with("user.overlay.")))
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
    /// Open into fd slot 0 or 1 (closing what was there); the fd stays open across later ops.
    Hold {
        slot: usize,
        path: String,
        write: bool,
    },
    HeldRead {
        slot: usize,
    },
    HeldWrite {
        slot: usize,
        len: usize,
    },
    HeldStat {
        slot: usize,
    },
    /// Create and unlink a name of `len` bytes in the root (256 must give ENAMETOOLONG).
    CreateLong {
        len: usize,
    },
    /// open(dir, O_TMPFILE|O_WRONLY), write, linkat(fd, "", path, AT_EMPTY_PATH).
    TmpfileLink {
        dir: String,
        path: String,
        len: usize,
    },
    /// fallocate(PUNCH_HOLE|KEEP_SIZE) or plain allocation beyond EOF.
    Fallocate {
        path: String,
        punch: bool,
        off: u64,
        len: u64,
    },
    /// lseek(SEEK_DATA) and lseek(SEEK_HOLE) from `off`.
    SeekDataHole {
        path: String,
        off: u64,
    },
    /// mknod of a socket or of the char device 1/3.
    Mknod {
        path: String,
        socket: bool,
    },
    /// The inner op run with uid/gid 1000 (no supplementary groups) on this thread.
    AsUser {
        uid: u32,
        op: Box<Op>,
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
            Op::AsUser { .. } => "as-user",
            Op::Hold { .. } => "hold-fd",
            Op::HeldRead { .. } => "held-read",
            Op::HeldWrite { .. } => "held-write",
            Op::HeldStat { .. } => "held-fstat",
            Op::CreateLong { .. } => "create-long-name",
            Op::TmpfileLink { .. } => "tmpfile-link",
            Op::Fallocate { .. } => "fallocate",
            Op::SeekDataHole { .. } => "seek-data-hole",
            Op::Mknod { .. } => "mknod",
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
            Op::AsUser { uid, op } => write!(f, "[as uid/gid {uid}] {op}"),
            Op::Hold { slot, path, write } => write!(
                f,
                "fd{slot}=open({path:?}, {}) (kept open)",
                if *write { "O_RDWR" } else { "O_RDONLY" }
            ),
            Op::HeldRead { slot } => write!(f, "pread(fd{slot}, whole file)"),
            Op::HeldWrite { slot, len } => write!(f, "pwrite(fd{slot}, {len} bytes, off=3)"),
            Op::HeldStat { slot } => write!(f, "fstat(fd{slot})"),
            Op::CreateLong { len } => write!(f, "open(<{len}-byte name>, O_CREAT) + unlink"),
            Op::TmpfileLink { dir, path, len } => write!(
                f,
                "fd=open({dir:?}, O_TMPFILE|O_WRONLY, 0640); write {len} bytes; linkat(fd, \"\", {path:?}, AT_EMPTY_PATH)"
            ),
            Op::Fallocate {
                path,
                punch,
                off,
                len,
            } => write!(
                f,
                "fallocate({path:?}, {}, off={off}, len={len})",
                if *punch { "PUNCH_HOLE|KEEP_SIZE" } else { "0" }
            ),
            Op::SeekDataHole { path, off } => {
                write!(
                    f,
                    "lseek({path:?}, {off}, SEEK_DATA); lseek(.., {off}, SEEK_HOLE)"
                )
            }
            Op::Mknod { path, socket } => write!(
                f,
                "mknod({path:?}, {})",
                if *socket { "S_IFSOCK" } else { "S_IFCHR 1/3" }
            ),
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

/// One random operation; some run as an unprivileged user.
pub fn gen_op(rng: &mut Rng) -> Op {
    let op = gen_plain_op(rng);
    if rng.chance(15) {
        Op::AsUser {
            uid: 1000,
            op: Box::new(op),
        }
    } else {
        op
    }
}

fn gen_plain_op(rng: &mut Rng) -> Op {
    if rng.chance(12) {
        let slot = rng.below(2) as usize;
        return match rng.below(6) {
            0 | 1 => Op::Hold {
                slot,
                path: path(rng),
                write: rng.chance(30),
            },
            2 | 3 => Op::HeldRead { slot },
            4 => Op::HeldWrite {
                slot,
                len: data_len(rng),
            },
            _ => Op::HeldStat { slot },
        };
    }
    if rng.chance(6) {
        return match rng.below(4) {
            0 => {
                let dir = rng.pick(&["", "a", "b", "a/x"]).to_string();
                Op::TmpfileLink {
                    dir,
                    path: dest(rng),
                    len: data_len(rng),
                }
            }
            1 => Op::Fallocate {
                path: path(rng),
                punch: rng.chance(60),
                off: rng.below(3) * 4096,
                len: (1 + rng.below(3)) * 4096,
            },
            2 => Op::SeekDataHole {
                path: path(rng),
                off: rng.below(3) * 4096,
            },
            _ => Op::Mknod {
                path: dest(rng),
                socket: rng.chance(50),
            },
        };
    }
    if rng.chance(1) {
        return Op::CreateLong {
            len: 255 + rng.below(2) as usize,
        };
    }
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
pub fn gen_ops(seed: u64, min: usize, max: usize, cfg: &GenConfig) -> Vec<Op> {
    let mut rng = Rng::new(seed ^ 0x0905_5eed);
    let n = min + rng.below((max - min + 1) as u64) as usize;
    let mut ops = Vec::with_capacity(n);
    while ops.len() < n {
        let op = gen_op(&mut rng);
        if cfg.allows(&op) {
            ops.push(op);
        }
    }
    ops
}
