//! Finding live layerfs mounts: `/proc/self/mountinfo` says what is mounted where; the record a
//! daemon writes (`/run/layerfs/mounts/<hash>.json`) says which dirs it merges and its pid.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use layerfs_sys::mountinfo;
use serde::{Deserialize, Serialize};

/// What a running daemon records about its mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    /// Canonical mountpoint.
    pub mountpoint: PathBuf,
    /// Lower dirs, top first.
    pub lowers: Vec<PathBuf>,
    /// Upper dir (absent on a read-only mount).
    pub upper: Option<PathBuf>,
    /// Work dir.
    pub work: Option<PathBuf>,
    /// Daemon pid.
    pub pid: i32,
    /// Container this mount belongs to, if the store made it.
    #[serde(default)]
    pub container: Option<String>,
}

/// Directory of mount records.
pub fn records_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        PathBuf::from("/run/layerfs/mounts")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("layerfs/mounts")
    } else {
        PathBuf::from(format!(
            "/tmp/layerfs-{}/mounts",
            rustix::process::getuid().as_raw()
        ))
    }
}

fn record_path(mountpoint: &Path) -> PathBuf {
    // FNV-1a of the canonical path: short, stable, no dependency.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in mountpoint.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    records_dir().join(format!("{h:016x}.json"))
}

impl MountRecord {
    /// Writes the record (by rename, so readers never see half of it).
    pub fn save(&self) -> anyhow::Result<()> {
        let path = record_path(&self.mountpoint);
        let dir = records_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = path.with_extension(format!("tmp{}", self.pid));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Removes the record of `mountpoint` if it is ours.
    pub fn remove(mountpoint: &Path, pid: i32) {
        let path = record_path(mountpoint);
        if let Ok(r) = Self::load_path(&path)
            && r.pid == pid
        {
            let _ = std::fs::remove_file(path);
        }
    }

    fn load_path(path: &Path) -> anyhow::Result<MountRecord> {
        let bytes = std::fs::read(path)?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// The record of the layerfs mount at `mountpoint`, checked against the mount table.
    pub fn find(mountpoint: &Path) -> anyhow::Result<MountRecord> {
        let canon = mountpoint
            .canonicalize()
            .with_context(|| format!("{}: cannot resolve", mountpoint.display()))?;
        match mount_fstype(&canon)? {
            Some(t) if t == "fuse.layerfs" => {}
            Some(t) => bail!(
                "{} is not a layerfs mount (it is a {t} mount)",
                canon.display()
            ),
            None => bail!(
                "{} is not a layerfs mount (nothing is mounted there)",
                canon.display()
            ),
        }
        Self::load_path(&record_path(&canon)).with_context(|| {
            format!(
                "{} is a layerfs mount but its daemon left no record",
                canon.display()
            )
        })
    }
}

/// The fstype of the topmost mount at exactly `path`, if something is mounted there.
pub fn mount_fstype(path: &Path) -> anyhow::Result<Option<String>> {
    let mounts = mountinfo::read().context("cannot read /proc/self/mountinfo")?;
    Ok(mountinfo::at(&mounts, path).map(|m| m.fstype))
}

/// `layerfs umount MNT`: unmounts and waits for the daemon to end.
pub fn umount(mountpoint: &Path, root: Option<PathBuf>) -> anyhow::Result<()> {
    let record = MountRecord::find(mountpoint)?;
    let canon = record.mountpoint.clone();
    match rustix::mount::unmount(&canon, rustix::mount::UnmountFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::PERM) => {
            let status = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&canon)
                .status()
                .context("cannot run fusermount3")?;
            if !status.success() {
                bail!("{}: fusermount3 -u failed", canon.display());
            }
        }
        Err(rustix::io::Errno::BUSY) => {
            bail!("{}: cannot unmount: the mount is busy", canon.display())
        }
        Err(e) => bail!("{}: cannot unmount: {e}", canon.display()),
    }
    // The daemon sees the session end and exits; wait for it (bounded).
    for _ in 0..1000 {
        if !layerfs_sys::process::alive(record.pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    MountRecord::remove(&canon, record.pid);
    if let Some(name) = &record.container {
        let store = layerfs_store::Store::open(root)?;
        store.set_container_unmounted(name)?;
    }
    Ok(())
}
