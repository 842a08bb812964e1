//! Seeded generation of lower layers for the differential test, and the tiny PRNG behind all generation.
//!
//! Everything is a pure function of a `u64` seed (splitmix64), so a failing seed replays exactly.
//! Paths come from a small fixed pool so that operations collide with each other and with lower entries.

use std::fmt;
use std::path::Path;

use crate::opgen::GenConfig;

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

pub fn parent(p: &str) -> Option<&str> {
    p.rsplit_once('/').map(|(d, _)| d)
}

pub fn depth(p: &str) -> usize {
    p.matches('/').count() + 1
}

pub const FILE_MODES: &[u32] = &[0o644, 0o644, 0o600, 0o755, 0o444, 0o400, 0o000, 0o4755];
pub const DIR_MODES: &[u32] = &[0o755, 0o755, 0o700, 0o555, 0o1777, 0o2755];
pub const OWNERS: &[u32] = &[0, 0, 1000, 1001];

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

pub fn symlink_target(rng: &mut Rng, at: &str) -> String {
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

pub fn gen_lowers(seed: u64, cfg: &GenConfig) -> Lowers {
    let mut rng = Rng::new(seed ^ 0x10_3e25);
    let n = 1 + rng.below(3) as usize; // 1..=3 layers, mostly 2 or 3
    let mut layers = Vec::new();
    for li in 0..n {
        let bottom = li == n - 1;
        let mut entries: Vec<(String, LowerKind, i64)> = Vec::new();
        let mut dirs: Vec<String> = Vec::new();
        let mut files: Vec<String> = Vec::new();
        let mut opaque_dirs: Vec<String> = Vec::new();
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
                let opaque = !bottom && rng.chance(15);
                if opaque {
                    opaque_dirs.push(p.to_string());
                }
                LowerKind::Dir {
                    mode: *rng.pick(DIR_MODES),
                    uid: *rng.pick(OWNERS),
                    gid: *rng.pick(OWNERS),
                    opaque,
                    xattrs: gen_xattrs(&mut rng),
                }
            } else if r < 92 {
                LowerKind::Symlink(symlink_target(&mut rng, p))
            } else if r < 96
                && !bottom
                // A whiteout below an opaque dir of its own layer is an invalid layer (fo#306: the
                // kernel lists it and lstat gives ENOENT), so never generate one.
                && !opaque_dirs.iter().any(|o| p.starts_with(&format!("{o}/")))
            {
                LowerKind::Whiteout
            } else if r < 98 {
                LowerKind::Fifo
            } else if !files.is_empty() && !cfg.excludes("lower-hardlinks") {
                let to = rng.pick(&files).clone();
                LowerKind::HardLink(to)
            } else {
                LowerKind::Fifo
            };
            entries.push((p.to_string(), kind, mtime));
        }
        layers.push(LowerLayer { entries });
    }
    // The kernel lists a whiteout in a directory that only one lower layer provides (and lstat then
    // fails): such layers are invalid (fo#327), so turn those whiteouts into FIFOs.
    let snapshot = layers.clone();
    for (i, layer) in layers.iter_mut().enumerate() {
        for (p, kind, _) in layer.entries.iter_mut() {
            if matches!(kind, LowerKind::Whiteout) {
                let stack = parent(p).map_or(snapshot.len(), |d| dir_stack(&snapshot, d).len());
                let below = parent(p).is_none_or(|d| dir_stack(&snapshot, d).contains(&i));
                if stack < 2 || !below {
                    *kind = LowerKind::Fifo;
                }
            }
        }
    }
    Lowers { layers }
}

/// Indices of the lower layers that make up the merged directory `dir` (top first): resolution walks
/// down while layers have a directory, stops below an opaque one or at a non-directory.
fn dir_stack(layers: &[LowerLayer], dir: &str) -> Vec<usize> {
    let mut stack: Vec<usize> = (0..layers.len()).collect();
    let mut cur = String::new();
    for comp in dir.split('/') {
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(comp);
        let mut next = Vec::new();
        for &i in &stack {
            match layers[i].entries.iter().find(|(p, _, _)| *p == cur) {
                Some((_, LowerKind::Dir { opaque, .. }, _)) => {
                    next.push(i);
                    if *opaque {
                        break;
                    }
                }
                Some(_) => break,
                None => {}
            }
        }
        stack = next;
    }
    stack
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
                set_owner_mode(&full, *uid, *gid, *mode);
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
            set_owner_mode(&full, *uid, *gid, *mode);
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

/// chown, then chmod (chown drops set-id bits).
fn set_owner_mode(p: &std::path::Path, uid: u32, gid: u32, mode: u32) {
    use rustix::fs::{self as rfs, Mode};
    rfs::chown(
        p,
        Some(rfs::Uid::from_raw(uid)),
        Some(rfs::Gid::from_raw(gid)),
    )
    .expect("chown");
    rfs::chmod(p, Mode::from_raw_mode(mode)).expect("chmod");
}
