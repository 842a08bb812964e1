//! Test fixtures: a per-test temp dir and overlay mounts (layerfs or kernel) that always unmount on
//! drop. Tree snapshots, which two mounts are compared by, are in `snapshot` (re-exported here).
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

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::RwLock;

pub use crate::snapshot::*;

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

/// Whether layerfs mounts here take their requests from io_uring queues: the kernel has FUSE
/// over io_uring, and io_uring is not switched off for everyone.
pub fn kernel_has_fuse_uring() -> bool {
    Path::new("/sys/module/fuse/parameters/enable_uring").exists()
        && std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map_or(true, |v| v.trim() == "0")
}

/// Held for reading while a child process is being spawned (between fork and exec the child holds copies
/// of all our fds, including ones open inside a mount) and for writing while unmounting, so that a spawn in
/// one test never makes another test's umount fail with EBUSY.
static SPAWN_LOCK: RwLock<()> = RwLock::new(());

/// Held for reading while a differential op has fds open (`fsops::apply`) and for writing while a
/// child process is being spawned: between fork and exec the child holds copies of the fds, so a
/// FIFO an op has just closed would still have a reader, or a writer, when the next op opens it
/// (a nonblocking open for writing then succeeds on one mount and fails with ENXIO on the other).
/// Once a spawn returns, the child has exec'd and its copies are closed (all are `O_CLOEXEC`).
/// Lock order: `SPAWN_LOCK` before `FD_GATE`.
pub static FD_GATE: RwLock<()> = RwLock::new(());

/// `cmd.spawn()` with no differential op's fds open meanwhile (see [`FD_GATE`]).
fn gated_spawn(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let _g = FD_GATE.write().unwrap_or_else(|e| e.into_inner());
    cmd.spawn()
}

/// `cmd.output()`, spawned under the spawn lock.
pub fn output(cmd: &mut Command) -> std::io::Result<Output> {
    let child = {
        let _g = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
        gated_spawn(
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        )?
    };
    child.wait_with_output()
}

/// `cmd.spawn()` under the spawn lock, stdio to /dev/null: a child the caller waits for (or kills).
pub fn spawn(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let _g = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
    gated_spawn(
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
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
                    gated_spawn(&mut c)
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
        gated_spawn(
            Command::new("umount")
                .arg(p)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        )
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

/// The daemon's counters (`layerfs stats MNT`, which reads `user.layerfs.stats` of the root).
pub fn stats(mnt: &Path) -> serde_json::Value {
    let out = output(Command::new(layerfs_bin()).arg("stats").arg(mnt)).expect("layerfs stats");
    assert!(
        out.status.success(),
        "layerfs stats {}: {}",
        mnt.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("layerfs stats prints JSON")
}
