//! Mount lifecycle across daemons: a new mount at a mount point whose previous daemon is still exiting.
//! (Both CLI spellings, `layerfs umount` and bad arguments are tested in `mount_cli.rs`.)

use crate::dual::standard_lowers;
use crate::util::{Fixture, Impl, can_mount, is_mounted, skip, sut};

fn layerfs_only(test: &str) -> bool {
    if !can_mount(test) {
        return false;
    }
    if sut() != Impl::Layerfs {
        skip(
            test,
            "LAYERFS_SUT is not layerfs: this tests the layerfs command line",
        );
        return false;
    }
    true
}

/// Pids of live processes whose command line mentions `needle` (the daemon keeps its mount point in argv).
fn pids_mentioning(needle: &str) -> Vec<i32> {
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
fn wait_exit(pid: i32) {
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

/// `umount MNT` then at once `layerfs mount … MNT` again: once the old daemon has exited, the new mount
/// must still be there (a daemon that unmounts its mount point *by path* on exit detaches the new one).
#[test]
fn cli_remount_same_mountpoint_after_umount() {
    if !layerfs_only("cli_remount_same_mountpoint_after_umount") {
        return;
    }
    if !crate::util::have_program("tail") {
        skip(
            "cli_remount_same_mountpoint_after_umount",
            "tail not installed",
        );
        return;
    }
    let fix = Fixture::new("cli-remount");
    let lowers = standard_lowers(&fix);
    let layers = crate::dual::layers_for(&fix, &lowers, "s");
    let mnt = fix.mountpoint("s");
    let needle = mnt.display().to_string();
    let mut lost = 0;
    let rounds = 40;
    for _ in 0..rounds {
        let m = crate::util::Mount::new(Impl::Layerfs, &layers, &mnt);
        let old = pids_mentioning(&needle);
        assert!(!old.is_empty(), "no daemon process found for {needle}");
        m.unmount();
        let m2 = crate::util::Mount::new(Impl::Layerfs, &layers, &mnt);
        // Wait (without sleeping) until the previous daemon has exited: its pidfd becomes readable.
        for pid in old {
            wait_exit(pid);
        }
        if is_mounted(&mnt) {
            m2.unmount();
        } else {
            lost += 1;
            drop(m2);
        }
    }
    assert_eq!(
        lost, 0,
        "{lost} of {rounds} fresh mounts were detached when the previous daemon (ended by plain umount) exited"
    );
}
