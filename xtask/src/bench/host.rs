//! The machine: tools to install, the release build, the loop-mounted ext4 image, and its description.
//!
//! Data and mounts live on a journaled ext4 in a loop image (`<base>/fs.img`, mounted at `<base>/fs` inside
//! the bench's private mount namespace): the root filesystem of a VM may lack a journal (inode allocation then
//! scans recently deleted inodes and create-heavy workloads become order-dependent) and is shared with
//! everybody's builds. The loop device uses direct I/O so the image is not cached twice.

use super::cmd::{self, q};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Debian packages the bench needs, with a program each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("fuse3", "/usr/bin/fusermount3"),
    ("fuse-overlayfs", "/usr/bin/fuse-overlayfs"),
    ("fio", "/usr/bin/fio"),
];

/// Installs the missing packages with apt-get (running `apt-get update` once first).
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, prog)| !Path::new(prog).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bench: installing {}", missing.join(" "));
    cmd::run_visible(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    cmd::run_visible(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
        "apt-get install",
    )
}

/// `cargo build --release -p layerfs`; returns the binary.
pub fn build_layerfs(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("bench: cargo build --release -p layerfs");
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--release", "-p", "layerfs"])
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build --release -p layerfs failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("release/layerfs");
    if !bin.exists() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

/// The loop image, mounted for the lifetime of this value (in the private namespace).
pub struct LoopFs {
    /// Mount point: root of `data/` and `run/`.
    pub mnt: PathBuf,
    /// The loop device.
    dev: String,
    /// Whether this process attached `dev`.
    attached: bool,
    /// Whether this process mounted it.
    mounted: bool,
}

impl LoopFs {
    /// Creates `<base>/fs.img` (ext4, `size`) if absent, attaches and mounts it at `<base>/fs`.
    pub fn up(base: &Path, size: &str) -> Result<LoopFs> {
        let img = base.join("fs.img");
        let mnt = base.join("fs");
        std::fs::create_dir_all(&mnt)?;
        let t = Duration::from_secs(600);
        if cmd::mounted(&mnt).is_some() {
            let dev = cmd::sh_quiet(&format!("findmnt -n -o SOURCE {}", q(&mnt)));
            return Ok(LoopFs {
                mnt,
                dev,
                attached: false,
                mounted: false,
            });
        }
        let new = !img.exists();
        if new {
            cmd::sh(&format!("fallocate -l {size} {}", q(&img)), t)?;
        }
        // Reuse a loop device already backed by the image: a second one would be a second, corrupting,
        // mount of the same ext4; mounting the same device again shares the superblock.
        let existing = cmd::sh(&format!("losetup -j {}", q(&img)), t)?.stdout;
        let (dev, attached) = match existing.lines().find_map(|l| l.split_once(':')) {
            Some((dev, _)) => (dev.to_string(), false),
            None => {
                let out = cmd::sh(&format!("losetup --direct-io=on -f --show {}", q(&img)), t)?;
                (out.stdout.trim().to_string(), true)
            }
        };
        let mut fs = LoopFs {
            mnt,
            dev,
            attached,
            mounted: false,
        };
        if new {
            cmd::sh(&format!("mkfs.ext4 -q -E nodiscard {}", q(&fs.dev)), t)?;
        }
        cmd::sh(&format!("mount {} {}", q(&fs.dev), q(&fs.mnt)), t)?;
        fs.mounted = true;
        eprintln!(
            "bench: {} ({}) mounted at {}",
            img.display(),
            fs.dev,
            fs.mnt.display()
        );
        Ok(fs)
    }

    /// The loop device.
    pub fn dev(&self) -> &str {
        &self.dev
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let t = Duration::from_secs(120);
        if self.mounted
            && let Err(e) = cmd::sh(&format!("umount {}", q(&self.mnt)), t)
        {
            eprintln!("bench: {e:#}");
        }
        // Also a device left attached by a bench that was killed: on a device still in use elsewhere,
        // `losetup -d` only sets autoclear (detached when its last user lets go), so this is safe.
        if self.attached || self.mounted {
            let _ = cmd::sh(&format!("losetup -d {}", q(&self.dev)), t);
        }
    }
}

/// Lines describing the machine, the data filesystem and the tools, for the report.
pub fn describe(fs: &LoopFs, workspace: &Path, bins_layerfs: Option<&Path>) -> Vec<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "?".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let dev = q(fs.dev());
    let fstype = cmd::sh_quiet(&format!("findmnt -n -o FSTYPE -T {}", q(&fs.mnt)));
    let fsopts = cmd::sh_quiet(&format!("findmnt -n -o OPTIONS -T {}", q(&fs.mnt)));
    let journal = cmd::sh_quiet(&format!(
        "dumpe2fs -h {dev} 2>/dev/null | grep -c has_journal"
    ));
    let backing = cmd::sh_quiet(&format!("losetup -n -O BACK-FILE {dev}"));
    let dio = cmd::sh_quiet(&format!("losetup -n -O DIO {dev}"));
    let under = cmd::sh_quiet(&format!(
        "findmnt -n -o FSTYPE,SOURCE -T {} | tr -s ' '",
        q(if backing.is_empty() { "/" } else { &backing })
    ));
    let git = cmd::sh_quiet(&format!(
        "cd {} && git rev-parse --short HEAD && git status --porcelain | head -1",
        q(workspace)
    ));
    let git = match git.lines().collect::<Vec<_>>().as_slice() {
        [rev] => rev.to_string(),
        [rev, ..] => format!("{rev} (dirty)"),
        [] => "?".to_string(),
    };
    let layerfs = match bins_layerfs {
        Some(b) => format!("layerfs {git} ({})", b.display()),
        None => format!("layerfs not run (workspace {git})"),
    };
    vec![
        format!("- kernel: `{}`", cmd::sh_quiet("uname -srvm")),
        format!(
            "- cpu: {nproc} × {cpu}; memory {mem_gib:.1} GiB; load average at start {}",
            loadavg()
        ),
        format!(
            "- data fs: {fstype} ({fsopts}, journal: {}) on {}, loop image {backing} (direct I/O: {}) on {under}",
            if journal.trim() == "1" { "yes" } else { "no" },
            fs.dev(),
            if dio.trim() == "1" { "on" } else { "off" },
        ),
        format!(
            "- cpuidle: {}",
            match (
                std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver"),
                halt_poll_ns()
            ) {
                (Ok(d), Some(ns)) => format!(
                    "{} driver, guest_halt_poll_ns={ns}{}",
                    d.trim(),
                    if ns == 0 {
                        " (an idle vCPU halts at once)"
                    } else {
                        ""
                    }
                ),
                (Ok(d), None) => format!("{} driver", d.trim()),
                (Err(_), _) => "none".to_string(),
            }
        ),
        format!(
            "- tools: {}; fuse-overlayfs {}; {}; {}",
            layerfs,
            cmd::sh_quiet(
                "fuse-overlayfs --version 2>&1 | sed -n 's/^fuse-overlayfs: version //p'"
            ),
            cmd::sh_quiet("fio --version"),
            cmd::sh_quiet("fusermount3 --version 2>&1 | head -1"),
        ),
    ]
}

/// The knob of the guest's `haltpoll` cpuidle driver: how long an idle vCPU polls before it halts.
const HALT_POLL: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// The value [`HaltPoll`] puts back (`u64::MAX`: nothing to put back).
static HALT_POLL_SAVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// The vCPU halt-poll window in ns, where the `haltpoll` cpuidle driver is in use.
pub fn halt_poll_ns() -> Option<u64> {
    std::fs::read_to_string(HALT_POLL).ok()?.trim().parse().ok()
}

/// Sets the vCPU halt-poll window (a machine-wide setting) while it lives, then puts the old
/// value back. With a window of 0 an idle vCPU halts at once, and every FUSE round trip that
/// wakes a thread on the other vCPU waits for the host to resume it (`cargo xtask latency`).
pub struct HaltPoll(());

impl HaltPoll {
    /// Sets the window to `ns`.
    pub fn set(ns: u64) -> Result<HaltPoll> {
        use std::sync::atomic::Ordering::SeqCst;
        let old = halt_poll_ns().context("no haltpoll cpuidle driver on this machine")?;
        HALT_POLL_SAVED.store(old, SeqCst);
        std::fs::write(HALT_POLL, ns.to_string())
            .with_context(|| format!("cannot write {HALT_POLL}"))?;
        eprintln!("bench: guest_halt_poll_ns {old} -> {ns} (restored at the end)");
        Ok(HaltPoll(()))
    }
}

impl Drop for HaltPoll {
    fn drop(&mut self) {
        restore_halt_poll();
    }
}

/// Puts back the halt-poll window [`HaltPoll::set`] changed, if any (also on an abrupt exit).
pub fn restore_halt_poll() {
    let old = HALT_POLL_SAVED.swap(u64::MAX, std::sync::atomic::Ordering::SeqCst);
    if old != u64::MAX && std::fs::write(HALT_POLL, old.to_string()).is_err() {
        eprintln!("bench: could not restore {HALT_POLL} to {old}");
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
