//! Test fixtures: a per-test temp dir, overlay mounts (layerfs or kernel) that always unmount on drop,
//! and tree snapshots that two mounts can be compared by.
//!
//! Layout of a fixture (everything lives under one `tempfile` dir, so removal never leaves it):
//! ```text
//! <tmp>/layerfs-<test>-XXXX/
//!     <name>/            dirs made by `Fixture::dir`
//!     <side>/x/y/mnt     mount points made by `Fixture::mountpoint` (nested so that relative symlinks
//!                        escaping the mount root land in a private, per-side directory)
//! ```
//!
//! The system under test is chosen by `LAYERFS_SUT`: `layerfs` (default) mounts with the `layerfs` binary,
//! `kernel` mounts kernel overlayfs on both sides, so the harness itself can be checked kernel-vs-kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::RwLock;

use sha2::{Digest, Sha256};

/// Timestamps below this (2017-07) are the deterministic ones the tests set; above, "recent".
pub const OLD_TIME_LIMIT: i64 = 1_500_000_000;

/// Which overlay implementation a mount uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// `mount -t overlay` with index=on,redirect_dir=on: the reference.
    Kernel,
    /// The `layerfs` binary (`layerfs mount …`).
    Layerfs,
    /// Kernel overlayfs with index=off,redirect_dir=off: a known-different implementation, used to prove
    /// that the differential harness notices divergences.
    KernelPlain,
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Impl::Kernel => "kernel",
            Impl::Layerfs => "layerfs",
            Impl::KernelPlain => "kernel-plain",
        })
    }
}

/// The implementation under test: `LAYERFS_SUT=kernel` selects kernel-vs-kernel (harness self-check).
pub fn sut() -> Impl {
    match std::env::var("LAYERFS_SUT").as_deref() {
        Ok("kernel") => Impl::Kernel,
        Ok("kernel-plain") => Impl::KernelPlain,
        Ok("layerfs") | Ok("") | Err(_) => Impl::Layerfs,
        Ok(other) => panic!("LAYERFS_SUT={other}: expected `layerfs`, `kernel` or `kernel-plain`"),
    }
}

/// Held for reading while a child process is being spawned (between fork and exec the child holds copies
/// of all our fds, including ones open inside a mount) and for writing while unmounting, so that a spawn in
/// one test never makes another test's umount fail with EBUSY.
static SPAWN_LOCK: RwLock<()> = RwLock::new(());

/// `cmd.output()`, spawned under the spawn lock.
pub fn output(cmd: &mut Command) -> std::io::Result<Output> {
    let child = {
        let _g = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?
    };
    child.wait_with_output()
}

/// `cmd.spawn()` under the spawn lock, stdio to /dev/null: a child the caller waits for (or kills).
pub fn spawn(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let _g = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
}

/// Path of the `layerfs` binary built by cargo for this test.
pub fn layerfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_layerfs")
}

/// Pids of live processes whose command line mentions `needle` (the daemon keeps its mount point in argv).
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && cmd.contains("layerfs") {
            out.push(pid);
        }
    }
    out
}

/// Blocks until process `pid` has exited (returns at once if it is already gone).
pub fn wait_exit(pid: i32) {
    use rustix::event::{PollFd, PollFlags, poll};
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return;
    };
    let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else {
        return; // already reaped
    };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    while poll(&mut fds, None).is_err() {}
}

/// Prints a loud skip line; callers `return` right after.
pub fn skip(test: &str, reason: &str) {
    eprintln!("\n*** {test}: skipped: {reason} ***\n");
}

/// Whether a program is found on PATH.
pub fn have_program(name: &str) -> bool {
    output(
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name} >/dev/null 2>&1")),
    )
    .map(|o| o.status.success())
    .unwrap_or(false)
}

/// Whether we may mount (root); every mounting test checks this first.
pub fn can_mount(test: &str) -> bool {
    if !rustix::process::geteuid().is_root() {
        skip(test, "not root, cannot mount");
        return false;
    }
    if !Path::new("/dev/fuse").exists() && sut() == Impl::Layerfs {
        skip(test, "/dev/fuse is absent");
        return false;
    }
    true
}

/// Whether a test of the layerfs daemon itself (`why` says what it needs) can run: root, /dev/fuse,
/// and `LAYERFS_SUT` naming layerfs.
pub fn can_mount_layerfs(test: &str, why: &str) -> bool {
    if !can_mount(test) {
        return false;
    }
    if sut() != Impl::Layerfs {
        skip(test, &format!("LAYERFS_SUT is not layerfs: {why}"));
        return false;
    }
    true
}

/// A per-test temp dir; mounts under it are lazily detached before it is removed.
pub struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(name: &str) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix(&format!("layerfs-{name}-"))
            .tempdir()
            .expect("create temp dir");
        Fixture { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates (if needed) and returns `<tmp>/<rel>`.
    pub fn dir(&self, rel: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(&p).expect("create fixture dir");
        p
    }

    /// A mount point nested three levels below `<tmp>/<side>`.
    pub fn mountpoint(&self, side: &str) -> PathBuf {
        self.dir(&format!("{side}/x/y/mnt"))
    }

    /// A fresh `(upper, work)` pair on the same filesystem.
    pub fn upper_work(&self, side: &str) -> (PathBuf, PathBuf) {
        (
            self.dir(&format!("{side}/upper")),
            self.dir(&format!("{side}/work")),
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Never let TempDir recurse into a live mount.
        for m in mounts_under(self.dir.path()).into_iter().rev() {
            let _ = output(Command::new("umount").arg("-l").arg(&m));
        }
    }
}

/// Mount points at or below `dir`, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    layerfs_sys::mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Whether `p` is a mount point right now.
pub fn is_mounted(p: &Path) -> bool {
    mounts_under(p).iter().any(|m| m == p)
}

/// Layers of one overlay mount. `lowers[0]` is the top lower.
#[derive(Clone, Debug)]
pub struct Layers {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Extra `-o` options for a layerfs mount (ignored by the kernel one).
    pub options: Vec<String>,
}

/// A live overlay mount; unmounted on drop.
pub struct Mount {
    pub path: PathBuf,
    pub imp: Impl,
    mounted: bool,
}

impl Mount {
    /// Mounts `imp` at `mnt` and panics with the tool's message if it fails.
    pub fn new(imp: Impl, layers: &Layers, mnt: &Path) -> Mount {
        match Mount::try_new(imp, layers, mnt) {
            Ok(m) => m,
            Err(e) => panic!("{imp} mount at {} failed: {e}", mnt.display()),
        }
    }

    pub fn try_new(imp: Impl, layers: &Layers, mnt: &Path) -> Result<Mount, String> {
        Mount::try_new_with(imp, layers, mnt, &[])
    }

    /// Like [`Mount::try_new`], with extra mount options (`volatile`, …).
    pub fn try_new_with(
        imp: Impl,
        layers: &Layers,
        mnt: &Path,
        options: &[&str],
    ) -> Result<Mount, String> {
        let out = match imp {
            Impl::Kernel | Impl::KernelPlain => {
                let extra = if imp == Impl::Kernel {
                    "index=on,redirect_dir=on"
                } else {
                    "index=off,redirect_dir=off"
                };
                let lower = layers
                    .lowers
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":");
                let mut opts = format!(
                    "lowerdir={lower},upperdir={},workdir={},{extra}",
                    layers.upper.display(),
                    layers.work.display()
                );
                for o in options {
                    opts.push(',');
                    opts.push_str(o);
                }
                output(
                    Command::new("mount")
                        .args(["-t", "overlay", "overlay", "-o", &opts])
                        .arg(mnt),
                )
            }
            Impl::Layerfs => {
                let mut c = Command::new(layerfs_bin());
                c.arg("mount");
                for l in &layers.lowers {
                    c.arg("--lower").arg(l);
                }
                c.arg("--upper").arg(&layers.upper);
                c.arg("--work").arg(&layers.work);
                for o in layers
                    .options
                    .iter()
                    .map(String::as_str)
                    .chain(options.iter().copied())
                {
                    c.arg("-o").arg(o);
                }
                c.arg(mnt);
                // The daemon may keep inherited stdio open: never give it our pipes.
                let log = mnt.with_file_name("layerfs-mount.log");
                let file = std::fs::File::create(&log).map_err(|e| format!("{log:?}: {e}"))?;
                let err = file.try_clone().map_err(|e| e.to_string())?;
                c.stdin(std::process::Stdio::null())
                    .stdout(file)
                    .stderr(err);
                let status = {
                    let _g = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
                    c.spawn()
                }
                .and_then(|mut ch| ch.wait());
                status.map(|status| Output {
                    status,
                    stdout: Vec::new(),
                    stderr: std::fs::read(&log).unwrap_or_default(),
                })
            }
        };
        let out = out.map_err(|e| format!("spawn: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "exit {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if !is_mounted(mnt) {
            return Err("command succeeded but nothing is mounted".into());
        }
        Ok(Mount {
            path: mnt.to_path_buf(),
            imp,
            mounted: true,
        })
    }

    /// Unmounts now, asserting success.
    pub fn unmount(mut self) {
        self.mounted = false;
        let st = umount(&self.path);
        assert!(st.is_ok(), "umount {}: {:?}", self.path.display(), st);
    }
}

fn umount(p: &Path) -> Result<(), String> {
    // Exclusive: no other thread is between fork and exec holding copies of fds inside this mount.
    let _g = SPAWN_LOCK.write().unwrap_or_else(|e| e.into_inner());
    // Plain umount(8) for every implementation (the spec allows it for layerfs; `layerfs umount`, which
    // also waits for the daemon to exit, is tested in `cli.rs`).
    let run = || {
        Command::new("umount")
            .arg(p)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|c| c.wait_with_output())
            .map_err(|e| e.to_string())
    };
    let mut out = run()?;
    // Known transient: about once in a thousand fuzz sequences run by two workers, umount of a
    // FUSE mount says "target is busy" while no process holds anything in it (tests/DIVERGENCES.md,
    // "umount EBUSY"); it clears within milliseconds. Retry a bounded number of times, loudly,
    // as unmount helpers (systemd, containerd) do; any holder or a lasting EBUSY still fails.
    for attempt in 1..=20 {
        let busy = String::from_utf8_lossy(&out.stderr).contains("target is busy");
        if out.status.success() || !busy || !holders(p).is_empty() {
            break;
        }
        eprintln!(
            "*** umount {}: EBUSY with no holder, retry {attempt}",
            p.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        out = run()?;
    }
    if out.status.success() && !is_mounted(p) {
        return Ok(());
    }
    let msg = format!(
        "{}; processes using it: {:?}",
        String::from_utf8_lossy(&out.stderr).trim(),
        holders(p)
    );
    // Fall back so that a failing test never leaves a mount behind.
    let _ = Command::new("umount").arg("-l").arg(p).output();
    Err(format!("umount failed: {} {msg}", out.status))
}

/// `pid cmdline: path` for every open fd, cwd or root of any process below `mnt` (to explain EBUSY).
fn holders(mnt: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let mut links: Vec<PathBuf> = ["cwd", "root"].iter().map(|l| e.path().join(l)).collect();
        for fd in std::fs::read_dir(e.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            links.push(fd.path());
        }
        for l in links {
            if let Ok(t) = std::fs::read_link(&l)
                && t.starts_with(mnt)
            {
                out.push(format!(
                    "{pid} {}: {} -> {}",
                    cmd.trim(),
                    l.display(),
                    t.display()
                ));
            }
        }
    }
    out
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = umount(&self.path);
        }
    }
}

/// Runs `sh -c script` in `cwd`; returns the output.
pub fn sh(cwd: &Path, script: &str) -> Output {
    output(
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(cwd)
            .env("LC_ALL", "C"),
    )
    .expect("spawn sh")
}

/// Like `sh` but panics with stderr when the script fails.
pub fn sh_ok(cwd: &Path, script: &str) -> String {
    let o = sh(cwd, script);
    assert!(
        o.status.success(),
        "script failed in {}: {script}\nstatus {}\nstdout: {}\nstderr: {}",
        cwd.display(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

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
