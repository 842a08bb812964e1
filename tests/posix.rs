//! POSIX corner cases a conformance run (pjdfstest) showed, checked with direct syscalls on kernel
//! overlayfs and on the system under test over the standard lowers.

use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, CWD, Mode};

use crate::dual::Dual;
use crate::util::can_mount;

fn ctime_ns(p: &Path) -> i128 {
    let st = rfs::lstat(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec)
}

/// Whether `chown(path, -1, -1)` (no owner, no group) moves the ctime of `rel`.
/// The lstat before the chown also makes the next timestamp fine-grained on filesystems with
/// multigrain timestamps, so a change is always visible without waiting for the clock.
fn chown_nothing_moves_ctime(root: &Path, rel: &str) -> bool {
    let p = root.join(rel);
    let before = ctime_ns(&p);
    rfs::chownat(CWD, &p, None, None, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("chown(-1, -1) {}: {e}", p.display()));
    ctime_ns(&p) > before
}

/// pjdfstest chown/00: `chown(path, -1, -1)` succeeds and, on Linux, updates ctime (kernel overlayfs
/// passes `ATTR_CTIME` to the upper). FUSE sends this as a SETATTR with no field set; layerfs used to
/// do nothing for it, so new upper files kept their ctime.
#[test]
fn posix_chown_minus_one_updates_ctime() {
    if !can_mount("posix_chown_minus_one_updates_ctime") {
        return;
    }
    let d = Dual::new("chown-ctime");
    let mut rels = Vec::new();
    for root in [&d.kernel.path, &d.sut.path] {
        rfs::mkdir(root.join("newdir"), Mode::from_raw_mode(0o755)).expect("mkdir");
        std::fs::write(root.join("newdir/file"), b"x").expect("create");
        rfs::symlinkat("file", CWD, root.join("newdir/link")).expect("symlink");
        rfs::mknodat(
            CWD,
            root.join("newdir/fifo"),
            rfs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo");
    }
    // New upper objects, a lower file and a lower (merged) directory.
    rels.extend(["newdir", "newdir/file", "newdir/link", "newdir/fifo"]);
    rels.extend(["etc/app.conf", "proj/src"]);
    for rel in rels {
        let kernel = chown_nothing_moves_ctime(&d.kernel.path, rel);
        let sut = chown_nothing_moves_ctime(&d.sut.path, rel);
        assert!(
            kernel,
            "{rel}: kernel overlayfs kept its ctime (harness assumption broken)"
        );
        assert_eq!(
            sut, kernel,
            "{rel}: ctime after chown(-1, -1), {} vs kernel",
            d.sut.imp
        );
    }
}
