//! Machine set-up: the Debian packages the demo and the tests need, installed with apt-get when
//! run as root on a fresh machine (nothing is assumed to be there already).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// (package, a file it installs): what the tests drive besides layerfs itself.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("fuse3", "/usr/bin/fusermount3"),
    ("umoci", "/usr/bin/umoci"),
    ("skopeo", "/usr/bin/skopeo"),
    ("busybox-static", "/bin/busybox"),
    ("attr", "/usr/bin/getfattr"),
    ("acl", "/usr/bin/setfacl"),
    ("git", "/usr/bin/git"),
    ("tar", "/bin/tar"),
    // A system interpreter, for scenarios that run python3 as an unprivileged user.
    ("python3", "/usr/bin/python3"),
    // The power-cut tests (tests/durability.rs): an ext4 on a loop device.
    ("e2fsprogs", "/sbin/mkfs.ext4"),
    ("mount", "/sbin/losetup"),
];

/// Installs what the tests need and is missing.
pub fn ensure_test_packages() -> anyhow::Result<()> {
    ensure(TEST_PACKAGES)
}

/// Installs what the demo needs and is missing.
pub fn ensure_demo_packages() -> anyhow::Result<()> {
    ensure(&TEST_PACKAGES[..1])
}

fn ensure(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !rustix_is_root() {
        bail!(
            "missing packages {} (run as root to have them installed)",
            missing.join(" ")
        );
    }
    eprintln!("setup: apt-get install {}", missing.join(" "));
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .context("cannot run apt-get")?;
    if !ok.success() {
        bail!("apt-get update failed ({ok})");
    }
    let ok = Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .status()
        .context("cannot run apt-get")?;
    if !ok.success() {
        bail!("apt-get install {} failed ({ok})", missing.join(" "));
    }
    Ok(())
}

fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}
