//! The systems under test and their mounts: one fresh mount (fresh upper and work dirs) per measured run.
//!
//! A FUSE daemon is found as the new holder of `/dev/fuse` whose command line names the mount point; its
//! peak RSS and CPU time are read just before unmount, and after unmount the bench waits for it to exit
//! (SIGTERM, then SIGKILL, after 20 s, only for a daemon identified by its command line).

use super::cmd::{self, Usage, q};
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A filesystem under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// This project's daemon, `target/release/layerfs layerfs MNT -o ...`.
    Layerfs,
    /// In-kernel overlayfs: the reference of every ratio.
    Kernel,
    /// fuse-overlayfs with its defaults.
    FuseOverlayfs,
    /// fuse-overlayfs with `threaded=1,fast_ino=1,static_nlink,noacl`.
    FuseOverlayfsTuned,
    /// layerfs with `uring=off`: requests over `/dev/fuse` (not in the default set).
    LayerfsDevFuse,
    /// Another layerfs binary (`--base-bin`), for an A/B comparison (not in the default set).
    LayerfsBase,
    /// layerfs with `direct_read=64M`: big lower files read without the page cache (not in the
    /// default set).
    LayerfsDirect,
}

impl System {
    /// The default column order.
    pub const ALL: [System; 4] = [
        System::Layerfs,
        System::Kernel,
        System::FuseOverlayfs,
        System::FuseOverlayfsTuned,
    ];

    /// The name used by `--systems` and in the report.
    pub fn name(self) -> &'static str {
        match self {
            System::Layerfs => "layerfs",
            System::Kernel => "kernel",
            System::FuseOverlayfs => "fuse-overlayfs",
            System::FuseOverlayfsTuned => "fuse-overlayfs-tuned",
            System::LayerfsDevFuse => "layerfs-devfuse",
            System::LayerfsBase => "layerfs-base",
            System::LayerfsDirect => "layerfs-direct",
        }
    }

    /// Runs this project's daemon.
    pub fn is_layerfs(self) -> bool {
        matches!(
            self,
            System::Layerfs | System::LayerfsDevFuse | System::LayerfsBase | System::LayerfsDirect
        )
    }

    /// Parses a `--systems` item.
    pub fn parse(s: &str) -> Result<System> {
        let all = System::ALL.into_iter().chain([
            System::LayerfsDevFuse,
            System::LayerfsBase,
            System::LayerfsDirect,
        ]);
        all.clone().find(|x| x.name() == s).with_context(|| {
            let known: Vec<_> = all.map(|x| x.name()).collect();
            format!("unknown system {s:?} (known: {})", known.join(", "))
        })
    }

    /// Whether it is served by a FUSE daemon.
    pub fn is_fuse(self) -> bool {
        self != System::Kernel
    }

    /// The mount command. `lowers` is top-first, colon separated, like overlayfs's `lowerdir=`.
    fn command(self, bins: &Bins, lowers: &str, dirs: &RunDirs, volatile: bool) -> Command {
        let mut opts = format!(
            "lowerdir={lowers},upperdir={},workdir={}",
            dirs.upper.display(),
            dirs.work.display()
        );
        if self == System::FuseOverlayfsTuned {
            opts.push_str(",threaded=1,fast_ino=1,static_nlink,noacl");
        }
        if self == System::LayerfsDevFuse {
            opts.push_str(",uring=off");
        }
        if self == System::LayerfsDirect {
            opts.push_str(",direct_read=64M");
        }
        // Kernel: no fsync of copied-up files, no syncfs. fuse-overlayfs: `volatile` = `fsync=0`.
        if volatile {
            opts.push_str(",volatile");
        }
        let mut c;
        match self {
            System::Kernel => {
                c = Command::new("mount");
                c.args(["-t", "overlay", "overlay", "-o", &opts])
                    .arg(&dirs.mnt);
            }
            System::Layerfs | System::LayerfsDevFuse | System::LayerfsDirect => {
                c = Command::new(&bins.layerfs);
                c.arg("layerfs").arg(&dirs.mnt).args(["-o", &opts]);
            }
            System::LayerfsBase => {
                c = Command::new(bins.base.as_ref().unwrap_or(&bins.layerfs));
                c.arg("layerfs").arg(&dirs.mnt).args(["-o", &opts]);
            }
            System::FuseOverlayfs | System::FuseOverlayfsTuned => {
                c = Command::new("fuse-overlayfs");
                c.args(["-o", &opts]).arg(&dirs.mnt);
            }
        }
        c
    }
}

/// Paths of the programs under test.
#[derive(Clone, Debug)]
pub struct Bins {
    /// The release build of layerfs.
    pub layerfs: PathBuf,
    /// The `layerfs-base` binary (`--base-bin`).
    pub base: Option<PathBuf>,
}

/// The per-run directories of one system: `<run>/<system>/{u,w,m}`.
#[derive(Clone, Debug)]
pub struct RunDirs {
    /// Parent of the three; removed and recreated around each run.
    pub dir: PathBuf,
    /// upperdir.
    pub upper: PathBuf,
    /// workdir.
    pub work: PathBuf,
    /// Mount point.
    pub mnt: PathBuf,
}

impl RunDirs {
    /// The directories of `sys` under `run_root` (not created).
    pub fn new(run_root: &Path, sys: System) -> RunDirs {
        let dir = run_root.join(sys.name());
        RunDirs {
            upper: dir.join("u"),
            work: dir.join("w"),
            mnt: dir.join("m"),
            dir,
        }
    }

    /// Removes the run dir (refusing if anything is still mounted inside) and creates it afresh.
    pub fn reset(&self, run_root: &Path) -> Result<()> {
        remove_inside(&self.dir, run_root)?;
        for d in [&self.upper, &self.work, &self.mnt] {
            std::fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        Ok(())
    }
}

/// `rm -rf path`, only if `path` is strictly inside `root` and nothing is mounted on or below it.
pub fn remove_inside(path: &Path, root: &Path) -> Result<()> {
    if !root.is_absolute()
        || root.components().count() < 3
        || !path.starts_with(root)
        || path == root
    {
        bail!(
            "refusing to remove {} (not inside {})",
            path.display(),
            root.display()
        );
    }
    if let Some(m) = cmd::mounted_under(path) {
        bail!(
            "refusing to remove {}: {} is mounted",
            path.display(),
            m.display()
        );
    }
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("rm -rf {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// A live mount of one system; unmounted by [`Mount::unmount`] or, on an error path, by `Drop`.
pub struct Mount {
    /// What is mounted.
    pub sys: System,
    /// The mount point.
    pub mnt: PathBuf,
    /// Seconds from running the mount command to the mount being usable.
    pub mount_secs: f64,
    /// The FUSE daemon, if one was identified.
    pub daemon: Option<u32>,
    /// Whether `daemon` was identified by its command line (only then may the bench signal it).
    verified: bool,
    /// The mount command, if it stayed in the foreground (it is then the daemon).
    foreground: Option<Child>,
    /// The FUSE connection number (minor of the superblock), to abort a hung connection.
    fuse_conn: Option<String>,
    /// Set once unmounted.
    done: bool,
}

impl Mount {
    /// Mounts `sys` over `lowers` on `dirs` (already reset); the command's output goes to `log`.
    pub fn start(
        sys: System,
        bins: &Bins,
        lowers: &str,
        dirs: &RunDirs,
        volatile: bool,
        log: &Path,
    ) -> Result<Mount> {
        let mut command = sys.command(bins, lowers, dirs, volatile);
        let what = format!("{command:?}");
        let logf = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        use std::io::Write;
        let _ = writeln!(&logf, "### {what}");
        let before = cmd::fuse_holders();
        let start = Instant::now();
        let mut child = cmd::prepare(&mut command)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let mut m = Mount {
            sys,
            mnt: dirs.mnt.clone(),
            mount_secs: 0.0,
            daemon: None,
            verified: false,
            foreground: None,
            fuse_conn: None,
            done: false,
        };
        // Wait until the mount appears and the command has returned (a daemonizing command), or the mount
        // has been there for 2 s with the command still running (a foreground daemon).
        let mut seen: Option<Instant> = None;
        loop {
            let exited = child.try_wait()?;
            let now = Instant::now();
            if cmd::mounted(&dirs.mnt).is_some() {
                let at = *seen.get_or_insert(now);
                if exited.is_some() || now - at > Duration::from_secs(2) {
                    m.mount_secs = (if exited.is_some() { now } else { at } - start).as_secs_f64();
                    break;
                }
            } else if let Some(status) = exited
                && (!status.success() || now - start > Duration::from_secs(5))
            {
                bail!(
                    "{what} exited ({status}) without mounting; see {}",
                    log.display()
                );
            }
            if now - start > Duration::from_secs(60) {
                cmd::kill_group(child.id());
                bail!("{what}: not mounted after 60 s; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if child.try_wait()?.is_none() {
            m.foreground = Some(child);
        }
        let entry = cmd::mounted(&dirs.mnt).context("mount vanished")?;
        if sys.is_fuse() != entry.fstype.starts_with("fuse") {
            bail!("{what} mounted a {} filesystem", entry.fstype);
        }
        m.fuse_conn = sys
            .is_fuse()
            .then(|| entry.dev.split(':').nth(1).unwrap_or("").to_string());
        if sys.is_fuse() {
            m.find_daemon(&before);
        }
        // The first access, like any user's, is not part of a workload.
        cmd::sh(
            &format!("stat {} >/dev/null", q(&m.mnt)),
            Duration::from_secs(60),
        )?;
        Ok(m)
    }

    fn find_daemon(&mut self, before: &std::collections::BTreeSet<u32>) {
        let new: Vec<u32> = cmd::fuse_holders().difference(before).copied().collect();
        let mnt = self.mnt.to_string_lossy().into_owned();
        if let Some(fg) = &self.foreground
            && new.contains(&fg.id())
        {
            self.daemon = Some(fg.id());
            self.verified = true;
            return;
        }
        if let Some(pid) = new
            .iter()
            .copied()
            .find(|p| cmd::cmdline(*p).contains(&mnt))
        {
            self.daemon = Some(pid);
            self.verified = true;
        } else if new.len() == 1 {
            // Used for statistics only, never signalled.
            self.daemon = new.first().copied();
        }
    }

    /// Peak RSS and CPU of the daemon so far.
    pub fn usage(&self) -> Option<Usage> {
        self.daemon.and_then(cmd::usage)
    }

    /// The output of `layerfs stats MNT`, if this is layerfs and the command exists (the request-count hook).
    pub fn request_stats(&self, bins: &Bins) -> Option<String> {
        if self.sys != System::Layerfs {
            return None;
        }
        let mut c = Command::new(&bins.layerfs);
        c.arg("stats").arg(&self.mnt);
        cmd::run(&mut c, "layerfs stats", Duration::from_secs(10))
            .ok()
            .map(|r| r.stdout)
    }

    /// Unmounts and waits for the daemon to exit.
    pub fn unmount(mut self) -> Result<()> {
        self.done = true;
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mnt = q(&self.mnt);
        let mut result = Ok(());
        if cmd::mounted(&self.mnt).is_some() {
            let mut ok = false;
            for attempt in 1..=3 {
                match cmd::sh(&format!("umount {mnt}"), Duration::from_secs(60)) {
                    Ok(_) => {
                        ok = true;
                        break;
                    }
                    Err(e) => {
                        eprintln!("bench: umount {mnt} failed ({e:#}), retrying");
                        std::thread::sleep(Duration::from_millis(500 * attempt));
                    }
                }
            }
            if !ok {
                if let Some(conn) = &self.fuse_conn {
                    abort_connection(conn);
                }
                let _ = cmd::sh(&format!("umount -l {mnt}"), Duration::from_secs(60));
                result = Err(anyhow::anyhow!("could not unmount {mnt} (lazily detached)"));
            }
        }
        if let (Some(pid), true) = (self.daemon, self.verified) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while cmd::alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if cmd::alive(pid) && cmd::cmdline(pid).contains(&*self.mnt.to_string_lossy()) {
                eprintln!("bench: daemon {pid} still alive 20 s after umount {mnt}: SIGTERM");
                cmd::kill(pid, "TERM");
                std::thread::sleep(Duration::from_secs(2));
                if cmd::alive(pid) {
                    cmd::kill(pid, "KILL");
                }
                result = result.and(Err(anyhow::anyhow!(
                    "daemon {pid} did not exit after umount"
                )));
            }
        }
        if let Some(mut child) = self.foreground.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if child.try_wait().ok().flatten().is_none() {
                cmd::kill_group(child.id());
                let _ = child.wait();
            }
        }
        result
    }
}

/// Aborts a hung FUSE connection (mounting fusectl first if needed: only in the bench's own namespace).
fn abort_connection(conn: &str) {
    let ctl = Path::new("/sys/fs/fuse/connections");
    if cmd::mounted(ctl).is_none() {
        let _ = cmd::sh(
            "mount -t fusectl fusectl /sys/fs/fuse/connections",
            Duration::from_secs(10),
        );
    }
    eprintln!("bench: aborting FUSE connection {conn}");
    let _ = std::fs::write(ctl.join(conn).join("abort"), "1");
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            if let Err(e) = self.teardown() {
                eprintln!("bench: cleanup: {e:#}");
            }
        }
    }
}
