//! Starting a mount: the fuser session on `/dev/fuse` and, where the kernel has them, the io_uring
//! queues; the readahead window; the pace of the thread that reads FORGETs.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use fuser::{Config, MountOption, SessionACL};

use super::{Fuse, MAX_READ, uring};
use crate::overlay::Overlay;

/// Mount-level settings of the FUSE session.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// `fsname` shown in /proc/mounts.
    pub fsname: String,
    /// `allow_other` (root's default).
    pub allow_other: bool,
    /// Kernel-side permission checks (root's default).
    pub default_permissions: bool,
    /// Threads reading `/dev/fuse` when requests come from there (`uring=off`, or a kernel
    /// without FUSE over io_uring); with io_uring queues one thread reads it (FORGETs only).
    pub threads: usize,
    /// Generic options passed through (`ro`, `nodev`, `suid`, …).
    pub extra: Vec<MountOption>,
    /// Serve requests from io_uring queues where the kernel allows (`uring=off` turns it off).
    pub uring: bool,
    /// Commit the io_uring answers a caller waits for (`commit_idle` in `fuse/uring.rs`) as a
    /// `SCHED_IDLE` thread where the daemon may (`idle_commit=off` turns it off; see
    /// `fuse/idle.rs`).
    pub idle_commit: bool,
    /// Lower files of at least this many bytes are read without the kernel page cache
    /// (`direct_read=SIZE`; `None`, the default: never). See [`Fuse::open_file`].
    pub direct_read: Option<u64>,
}

/// Runs a FUSE session for `ovl` on `mountpoint` until it is unmounted. `ready` is called once the
/// mount is live.
pub fn serve(
    ovl: Arc<Overlay>,
    mountpoint: &Path,
    opts: &MountOptions,
    ready: impl FnOnce(),
) -> std::io::Result<()> {
    let mut mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        MountOption::CUSTOM("subtype=layerfs".into()),
    ];
    if opts.default_permissions {
        mount_options.push(MountOption::DefaultPermissions);
    }
    mount_options.extend(opts.extra.iter().cloned());
    let mut cfg = Config::default();
    cfg.mount_options = mount_options;
    cfg.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let want_uring = opts.uring && uring::enable();
    // With io_uring queues, `/dev/fuse` carries only FORGETs and INTERRUPTs: one thread reads
    // them, and FORGETs that come while it waits ([`FORGET_PACE`]) arrive as one BATCH_FORGET.
    // With four threads every FORGET woke one of them (`rm -rf` of 20k files: a quarter of all
    // CPU samples in those threads).
    cfg.n_threads = Some(if want_uring { 1 } else { opts.threads.max(1) });
    cfg.clone_fd = true;
    let (ended_tx, ended) = std::sync::mpsc::channel();
    let mut fs = Fuse::new(ovl);
    fs.ended = Some(ended_tx);
    fs.want_uring = want_uring;
    fs.direct_min = opts.direct_read;
    let rings = fs.clone();
    let notifier = fs.notifier.clone();
    let session = fuser::Session::new(fs, mountpoint, &cfg)?;
    let _ = notifier.set(session.notifier());
    // The rings can be registered only once INIT is answered, which `Session::new` did.
    let dev = if rings.uring.load(Relaxed) {
        Some(session.as_fd().try_clone_to_owned()?)
    } else {
        None
    };
    let background = session.spawn()?;
    if let Some(dev) = dev {
        match uring::start(rings, dev, opts.idle_commit) {
            Ok(()) => tracing::info!("requests are served from io_uring queues"),
            Err(e) => {
                tracing::warn!(
                    "io_uring queues not registered ({e}): requests go over /dev/fuse, served by \
                     one thread (mount with -o uring=off for more)"
                )
            }
        }
    }
    raise_readahead(mountpoint);
    ready();
    // The session ends when the kernel drops the mount (`umount`, `layerfs umount`): the
    // filesystem is then destroyed, which sends here (or drops the sender).
    let _ = ended.recv();
    // fuser would unmount the mountpoint path once more when its handle is dropped, which could
    // detach a new mount made there meanwhile: the mount is already gone, so skip that.
    std::mem::forget(background);
    Ok(())
}

/// Sets the mount's readahead to the READ size INIT allows (1 MiB). The kernel starts a FUSE
/// mount at the default 128 KiB, so a sequential read of a file served through the daemon would
/// cost eight round trips per MiB. Needs root (sysfs); without it the default stays.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let set = std::fs::metadata(mountpoint).and_then(|m| {
        let dev = m.dev();
        let bdi = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            rustix::fs::major(dev),
            rustix::fs::minor(dev)
        );
        std::fs::write(bdi, format!("{}\n", MAX_READ >> 10))
    });
    if let Err(e) = set {
        tracing::info!("readahead left at the kernel's default: {e}");
    }
}

/// How long the thread that reads FORGETs waits before it serves a new read of them (io_uring
/// mounts only, where `/dev/fuse` carries little else): FORGETs the kernel queues meanwhile then
/// come in one BATCH_FORGET. `rm -rf` of 20k files queues one FORGET per file, and reading them
/// one by one spent a third of all CPU samples contending with the queueing for the kernel's lock
/// of that queue.
const FORGET_PACE: std::time::Duration = std::time::Duration::from_micros(500);

/// Waits [`FORGET_PACE`] at the first FORGET of each read (`unique`: its request id; the
/// FORGETs of one BATCH_FORGET share it).
pub(super) fn pace_forgets(unique: u64) {
    thread_local! {
        static LAST: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    if LAST.with(|l| l.replace(unique)) != unique {
        std::thread::sleep(FORGET_PACE);
    }
}
