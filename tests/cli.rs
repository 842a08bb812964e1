//! The mount command line itself: both spellings, `layerfs umount`, and refusing bad arguments.

use std::process::Command;

use crate::dual::standard_lowers;
use crate::util::{Fixture, Impl, can_mount, is_mounted, layerfs_bin, output, skip, sut};

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

/// `layerfs layerfs MNT -o lowerdir=A:B,upperdir=U,workdir=W,rw,dev` (fuse-overlayfs style), then
/// `layerfs umount MNT`.
#[test]
fn cli_fuse_overlayfs_spelling_and_layerfs_umount() {
    if !layerfs_only("cli_fuse_overlayfs_spelling_and_layerfs_umount") {
        return;
    }
    let fix = Fixture::new("cli-o");
    let lowers = standard_lowers(&fix);
    let (upper, work) = fix.upper_work("s");
    let mnt = fix.mountpoint("s");
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={},rw,dev,suid",
        lowers[0].display(),
        lowers[1].display(),
        upper.display(),
        work.display()
    );
    let out = output(
        Command::new(layerfs_bin())
            .args(["layerfs"])
            .arg(&mnt)
            .args(["-o", &opts])
            .stdin(std::process::Stdio::null()),
    )
    .expect("spawn layerfs");
    assert!(
        out.status.success(),
        "layerfs layerfs MNT -o … failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mnt), "mount not live when the command returned");
    // Leftmost lowerdir is the top.
    let conf = std::fs::read_to_string(mnt.join("etc/app.conf")).expect("read merged file");
    assert_eq!(conf, "a=override\n");
    std::fs::write(mnt.join("new.txt"), "n").expect("write");
    let out = output(Command::new(layerfs_bin()).arg("umount").arg(&mnt)).expect("spawn umount");
    assert!(
        out.status.success(),
        "layerfs umount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&mnt), "still mounted after layerfs umount");
    assert_eq!(
        std::fs::read_to_string(upper.join("new.txt")).expect("upper holds the new file"),
        "n"
    );
}

/// Bad arguments fail with a one-line message and mount nothing.
#[test]
fn cli_rejects_bad_arguments() {
    if !layerfs_only("cli_rejects_bad_arguments") {
        return;
    }
    let fix = Fixture::new("cli-bad");
    let lowers = standard_lowers(&fix);
    let (upper, work) = fix.upper_work("s");
    let mnt = fix.mountpoint("s");
    let missing = fix.path().join("missing");
    let inside_lower = lowers[0].join("proj");
    let cases: Vec<(&str, Vec<std::ffi::OsString>)> = vec![
        (
            "missing lower",
            vec![
                "--lower".into(),
                missing.clone().into(),
                "--upper".into(),
                upper.clone().into(),
                "--work".into(),
                work.clone().into(),
            ],
        ),
        (
            "upper inside a lower",
            vec![
                "--lower".into(),
                lowers[0].clone().into(),
                "--upper".into(),
                inside_lower.into(),
                "--work".into(),
                work.clone().into(),
            ],
        ),
    ];
    for (what, args) in cases {
        let out = output(
            Command::new(layerfs_bin())
                .arg("mount")
                .args(&args)
                .arg(&mnt)
                .stdin(std::process::Stdio::null()),
        )
        .expect("spawn layerfs");
        assert!(!out.status.success(), "{what}: layerfs mount succeeded");
        assert!(!is_mounted(&mnt), "{what}: something got mounted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.trim().is_empty(), "{what}: no error message");
    }
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
    let rounds = 8;
    for _ in 0..rounds {
        let m = crate::util::Mount::new(Impl::Layerfs, &layers, &mnt);
        let old = pids_mentioning(&needle);
        assert!(!old.is_empty(), "no daemon process found for {needle}");
        m.unmount();
        let m2 = crate::util::Mount::new(Impl::Layerfs, &layers, &mnt);
        // Wait (without sleeping) until the previous daemon has exited.
        for pid in old {
            let _ = output(Command::new("tail").args([
                &format!("--pid={pid}"),
                "-s",
                "0.05",
                "-f",
                "/dev/null",
            ]));
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
