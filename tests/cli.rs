//! Mount lifecycle across daemons: a new mount at a mount point whose previous daemon is still exiting.
//! (Both CLI spellings, `layerfs umount` and bad arguments are tested in `mount_cli.rs`.)

use crate::dual::standard_lowers;
use crate::util::{Fixture, Impl, can_mount_layerfs, is_mounted, pids_mentioning, skip, wait_exit};

fn layerfs_only(test: &str) -> bool {
    can_mount_layerfs(test, "this tests the layerfs command line")
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
