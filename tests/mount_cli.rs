//! The mount command line: bad arguments are refused before anything is mounted, the
//! fuse-overlayfs/mount-helper spelling works (also through `mount -t fuse.layerfs`), and the
//! request counters prove that a walk costs one READDIRPLUS per directory, not a LOOKUP per file.

use std::path::Path;
use std::process::Command;

use crate::dual::layers_for;
use crate::util::{
    Fixture, Impl, Layers, Mount, SnapOpts, assert_same_tree, can_mount, is_mounted, layerfs_bin,
    output, sh_ok, snapshot, stats,
};

/// Runs `layerfs ARGS…`; returns (success, stderr).
pub(crate) fn layerfs(args: &[&str]) -> (bool, String) {
    let out = output(Command::new(layerfs_bin()).args(args)).expect("run layerfs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `layerfs mount --lower L --upper U --work W MNT`, which must succeed.
pub(crate) fn mount_one(lower: &Path, upper: &Path, work: &Path, mnt: &Path) {
    mount_with(lower, upper, work, mnt, None);
}

/// [`mount_one`] with `-o OPTION`.
pub(crate) fn mount_with(
    lower: &Path,
    upper: &Path,
    work: &Path,
    mnt: &Path,
    option: Option<&str>,
) {
    let mut args = vec!["mount", "--lower", s(lower), "--upper", s(upper)];
    args.extend(["--work", s(work)]);
    if let Some(o) = option {
        args.extend(["-o", o]);
    }
    args.push(s(mnt));
    let (ok, err) = layerfs(&args);
    assert!(ok, "mount {args:?}: {err}");
}

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// Every refusal: non-zero exit, one line naming the thing, nothing mounted.
#[test]
fn mount_refuses_bad_arguments() {
    if !can_mount("mount_refuses_bad_arguments") {
        return;
    }
    let fix = Fixture::new("badargs");
    let lower = fix.dir("lower");
    std::fs::create_dir_all(lower.join("inner")).expect("mkdir");
    let (upper, work) = fix.upper_work("a");
    let mnt = fix.mountpoint("a");
    let missing = fix.path().join("does-not-exist");
    let tmpfs = fix.dir("tmpfs");
    sh_ok(fix.path(), &format!("mount -t tmpfs tmpfs {}", s(&tmpfs)));
    let other_fs_work = tmpfs.join("work");
    std::fs::create_dir_all(&other_fs_work).expect("mkdir");
    let inner = lower.join("inner");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--lower".into(), s(&missing).into(), s(&mnt).into()],
            "does-not-exist",
        ),
        (
            vec![
                "--lower".into(),
                s(&lower).into(),
                "--upper".into(),
                s(&inner).into(),
                "--work".into(),
                s(&work).into(),
                s(&mnt).into(),
            ],
            "overlap",
        ),
        (
            vec![
                "--lower".into(),
                s(&lower).into(),
                "--upper".into(),
                s(&upper).into(),
                "--work".into(),
                s(&other_fs_work).into(),
                s(&mnt).into(),
            ],
            "same filesystem",
        ),
        (
            vec!["--lower".into(), s(&lower).into(), s(&missing).into()],
            "does-not-exist",
        ),
        (
            vec!["--upper".into(), s(&upper).into(), s(&mnt).into()],
            "lower",
        ),
        (
            vec![
                "--lower".into(),
                s(&lower).into(),
                "-o".into(),
                "direct_read=lots".into(),
                s(&mnt).into(),
            ],
            "direct_read=lots",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["mount"];
        all.extend(args.iter().map(String::as_str));
        let (ok, err) = layerfs(&all);
        assert!(!ok, "layerfs {all:?} succeeded");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "one line expected, got {err:?}"
        );
        assert!(
            err.contains(needle),
            "layerfs {all:?}: {err:?} does not mention {needle:?}"
        );
        assert!(!is_mounted(&mnt), "layerfs {all:?} left a mount");
    }
    // A busy mountpoint: something is already mounted there.
    sh_ok(fix.path(), &format!("mount -t tmpfs busy {}", s(&mnt)));
    let (ok, err) = layerfs(&["mount", "--lower", s(&lower), s(&mnt)]);
    assert!(
        !ok && err.contains("busy"),
        "busy mountpoint accepted: {err:?}"
    );
    sh_ok(fix.path(), &format!("umount {} {}", s(&mnt), s(&tmpfs)));
}

/// One mount at a time per upper and per work dir, as on the kernel overlay with its index: a
/// second mount of either is refused in one line and leaves the first serving; a mount right
/// after the first's plain `umount` waits for its daemon to let go and then succeeds.
#[test]
fn upper_and_work_dir_serve_one_mount_at_a_time() {
    if !can_mount("upper_and_work_dir_serve_one_mount_at_a_time") {
        return;
    }
    let fix = Fixture::new("inuse");
    let lower = fix.dir("lower");
    for f in ["a", "b"] {
        std::fs::write(lower.join(f), format!("{f}\n")).expect("write");
    }
    let (upper, work) = fix.upper_work("one");
    let (upper2, work2) = fix.upper_work("two");
    let mnt = fix.mountpoint("one");
    let mnt2 = fix.mountpoint("two");
    mount_one(&lower, &upper, &work, &mnt);
    sh_ok(fix.path(), &format!("echo more >> {}/a", s(&mnt)));
    for (u, w, needle) in [
        (&upper, &work, "upper directory"),
        (&upper2, &work, "work directory"),
        (&upper, &work2, "upper directory"),
    ] {
        let args = [
            "mount",
            "--lower",
            s(&lower),
            "--upper",
            s(u),
            "--work",
            s(w),
            s(&mnt2),
        ];
        let (ok, err) = layerfs(&args);
        assert!(!ok, "second mount {args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "one line expected: {err:?}");
        assert!(
            err.contains(needle) && err.contains("in use"),
            "{args:?}: {err:?} does not say the {needle} is in use"
        );
        assert!(!is_mounted(&mnt2), "{args:?} left a mount");
    }
    // The first mount still copies up (its work dir was left alone).
    sh_ok(fix.path(), &format!("echo more >> {}/b", s(&mnt)));
    assert_eq!(
        std::fs::read_to_string(upper.join("b")).expect("read"),
        "b\nmore\n"
    );
    sh_ok(fix.path(), &format!("umount {}", s(&mnt)));
    mount_one(&lower, &upper, &work, &mnt2);
    for f in ["a", "b"] {
        assert_eq!(
            std::fs::read_to_string(mnt2.join(f)).expect("read"),
            format!("{f}\nmore\n")
        );
    }
    let (ok, err) = layerfs(&["umount", s(&mnt2)]);
    assert!(ok, "layerfs umount: {err}");
}

/// `layerfs SOURCE MNT -o lowerdir=…` and `mount -t fuse.layerfs` (via mount.fuse3) mount the same
/// tree; lower-only is read-only; `layerfs umount` and plain `umount` both end the daemon.
#[test]
fn helper_form_and_mount_t_fuse_layerfs() {
    if !can_mount("helper_form_and_mount_t_fuse_layerfs") {
        return;
    }
    let fix = Fixture::new("helper");
    let l1 = fix.dir("l1");
    let l2 = fix.dir("l2");
    std::fs::write(l1.join("top"), "top\n").expect("write");
    std::fs::write(l2.join("bottom"), "bottom\n").expect("write");
    std::fs::write(l2.join("top"), "hidden\n").expect("write");
    let (upper, work) = fix.upper_work("a");
    let mnt = fix.mountpoint("a");
    let opts = format!(
        "rw,dev,suid,lowerdir={}:{},upperdir={},workdir={}",
        s(&l1),
        s(&l2),
        s(&upper),
        s(&work)
    );
    let (ok, err) = layerfs(&["layerfs", s(&mnt), "-o", &opts]);
    assert!(ok, "helper form failed: {err}");
    assert_eq!(
        std::fs::read_to_string(mnt.join("top")).expect("read"),
        "top\n"
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("bottom")).expect("read"),
        "bottom\n"
    );
    sh_ok(fix.path(), &format!("echo new > {}/new", s(&mnt)));
    assert!(upper.join("new").exists());
    // Plain umount ends the daemon too.
    sh_ok(fix.path(), &format!("umount {}", s(&mnt)));
    assert!(!is_mounted(&mnt));

    // Lower dirs only: read-only.
    let (ok, err) = layerfs(&["layerfs", s(&mnt), "-o", &format!("lowerdir={}", s(&l1))]);
    assert!(ok, "read-only mount failed: {err}");
    let w = std::fs::write(mnt.join("x"), "x");
    assert_eq!(w.err().and_then(|e| e.raw_os_error()), Some(libc::EROFS));
    // Nothing can be copied up there, so lower files are read through kernel passthrough.
    assert_eq!(
        std::fs::read_to_string(mnt.join("top")).expect("read"),
        "top\n"
    );
    let stats = stats(&mnt);
    assert!(
        stats["passthrough_opens"].as_u64() >= Some(1),
        "a lower file of a read-only mount was not passed through: {stats}"
    );
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "layerfs umount: {err}");

    // mount -t fuse.layerfs: mount.fuse3 runs `layerfs SOURCE MNT -o …` found on its PATH.
    if !Path::new("/sbin/mount.fuse3").exists() && !Path::new("/usr/sbin/mount.fuse3").exists() {
        crate::util::skip(
            "helper_form_and_mount_t_fuse_layerfs",
            "mount.fuse3 (fuse3) is absent",
        );
        return;
    }
    // mount(8) gives helpers a fixed PATH; /usr/local/sbin is on root's. Install a symlink there
    // for the test (replacing only a symlink an earlier test run left).
    let link = Path::new("/usr/local/sbin/layerfs");
    if let Ok(meta) = std::fs::symlink_metadata(link) {
        if !meta.file_type().is_symlink() {
            panic!(
                "{} exists and is not ours: cannot test mount -t fuse.layerfs",
                link.display()
            );
        }
        std::fs::remove_file(link).expect("remove stale symlink");
    }
    std::fs::create_dir_all("/usr/local/sbin").expect("mkdir /usr/local/sbin");
    std::os::unix::fs::symlink(layerfs_bin(), link).expect("symlink");
    let out = output(
        Command::new("mount")
            .args(["-t", "fuse.layerfs", "-o", &opts, "layerfs"])
            .arg(&mnt),
    )
    .expect("run mount");
    let _ = std::fs::remove_file(link);
    assert!(
        out.status.success(),
        "mount -t fuse.layerfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("new")).expect("read"),
        "new\n"
    );
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "layerfs umount: {err}");
    assert!(!is_mounted(&mnt));
}

/// A walk of N files in D directories costs about D READDIRPLUS requests and no per-file LOOKUP;
/// `ls -l` of every file then needs no GETATTR either (attributes came with the listing). A walk
/// that only lists (`find -type f`) gets its files without attributes: the daemon looks up none
/// of them (`fuse/plus.rs`).
#[test]
fn walk_costs_one_readdirplus_per_directory() {
    if !can_mount("walk_costs_one_readdirplus_per_directory") {
        return;
    }
    let fix = Fixture::new("reqcount");
    let lower = fix.dir("lower");
    let (dirs, files) = (20, 50);
    for d in 0..dirs {
        let dp = lower.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dp).expect("mkdir");
        for f in 0..files {
            std::fs::write(dp.join(format!("f{f:03}")), format!("{d}/{f}")).expect("write");
        }
    }
    let (upper, work) = fix.upper_work("a");
    let mnt = fix.mountpoint("a");
    mount_one(&lower, &upper, &work, &mnt);
    let listing = sh_ok(fix.path(), &format!("ls -lR {} | grep -c '^-'", s(&mnt)));
    assert_eq!(listing.trim(), (dirs * files).to_string());
    let walk_stats = stats(&mnt);
    let lookups = walk_stats["lookups"].as_u64().expect("lookups");
    let plus = walk_stats["readdirpluses"].as_u64().expect("readdirpluses");
    eprintln!(
        "walk of {} files in {dirs} dirs: {walk_stats}",
        dirs * files
    );
    assert!(
        plus >= dirs as u64,
        "expected READDIRPLUS per directory, got {plus}"
    );
    assert!(
        lookups <= (dirs as u64) * 2 + 10,
        "{lookups} LOOKUPs for {} files: the walk is not served by READDIRPLUS",
        dirs * files
    );
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "umount: {err}");

    let (upper, work) = fix.upper_work("b");
    let mnt = fix.mountpoint("b");
    mount_one(&lower, &upper, &work, &mnt);
    let found = sh_ok(fix.path(), &format!("find {} -type f | wc -l", s(&mnt)));
    assert_eq!(found.trim(), (dirs * files).to_string());
    let found_stats = stats(&mnt);
    eprintln!(
        "find over {} files in {dirs} dirs: {found_stats}",
        dirs * files
    );
    let uring = found_stats["uring_requests"]
        .as_u64()
        .expect("uring_requests")
        > 0;
    let (bare, nodes) = (
        found_stats["bare_entries"].as_u64().expect("bare_entries"),
        found_stats["nodes"].as_u64().expect("nodes"),
    );
    if uring {
        // Lean answers go out on the io_uring transport only; the first directory of files is
        // the probe that finds out find does not look at them.
        assert!(
            bare >= ((dirs - 1) * files) as u64,
            "{bare} of {} files listed without attributes",
            dirs * files
        );
        assert!(
            nodes <= (dirs + files + 2) as u64,
            "{nodes} nodes after find: files were looked up"
        );
    } else {
        eprintln!(
            "find over {} files: no io_uring queues, every entry has attributes",
            dirs * files
        );
    }
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "umount: {err}");
}

/// Deep paths near PATH_MAX work (every component resolved from a directory fd), and a name over
/// 255 bytes is ENAMETOOLONG.
#[test]
fn deep_paths_and_long_names() {
    if !can_mount("deep_paths_and_long_names") {
        return;
    }
    let fix = Fixture::new("deep");
    let lower = fix.dir("lower");
    let (upper, work) = fix.upper_work("a");
    let mnt = fix.mountpoint("a");
    mount_one(&lower, &upper, &work, &mnt);
    // 20 components of 200 bytes: a relative path of ~4 KiB, built and read back with *at calls.
    let script = r#"
import os, sys, errno
root = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fd = root
name = "d" * 200
for i in range(20):
    os.mkdir(name, dir_fd=fd)
    nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    if fd != root:
        os.close(fd)
    fd = nfd
f = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
os.write(f, b"deep")
os.close(f)
try:
    os.open("x" * 256, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
    print("no error")
except OSError as e:
    print(errno.errorcode[e.errno])
"#;
    let out = output(Command::new("python3").arg("-c").arg(script).arg(&mnt)).expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ENAMETOOLONG");
    // The same deep file is in the upper dir, 20 levels down.
    let count = sh_ok(
        fix.path(),
        &format!("find {} -name leaf | wc -l", s(&upper)),
    );
    assert_eq!(count.trim(), "1");
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "umount: {err}");
}

/// With a directory fd budget far below the number of directories, a walk and changes all over a
/// three-layer tree keep the daemon's open fds near the budget (directories give theirs up and
/// reopen them by name), and the result is the kernel overlay's, renamed merged dirs included.
#[test]
fn directory_fds_stay_bounded() {
    if !can_mount("directory_fds_stay_bounded") {
        return;
    }
    let fix = Fixture::new("dirfds");
    let (dirs, budget) = (120, 24);
    let lowers: Vec<_> = (0..3)
        .map(|l| {
            let root = fix.dir(&format!("lower{l}"));
            for d in 0..dirs {
                let dp = root.join(format!("d{d:03}/sub"));
                std::fs::create_dir_all(&dp).expect("mkdir");
                std::fs::write(dp.join(format!("f{l}")), format!("{l}/{d}")).expect("write");
            }
            std::fs::create_dir_all(root.join("empty")).expect("mkdir");
            root
        })
        .collect();
    let script = "set -e
        find . -type f | sort | xargs cat > /dev/null
        for d in d0*; do echo more >> $d/sub/f1; done
        mv d010 moved && mv moved/sub moved/sub2 && rm -r d020 && mkdir d020
        ls -lR > /dev/null
        cat moved/sub2/f0 moved/sub2/f2 d011/sub/f2 > /dev/null
        find . -type f | sort | xargs cat > /dev/null";
    let mut sut_layers = layers_for(&fix, &lowers, "s");
    sut_layers.options = vec![format!("dir_fds={budget}")];
    let sut = Mount::new(Impl::Layerfs, &sut_layers, &fix.mountpoint("s"));
    let reference = Mount::new(
        Impl::Kernel,
        &layers_for(&fix, &lowers, "r"),
        &fix.mountpoint("r"),
    );
    // A directory open across the walk (its fds get closed by the cache meanwhile), then removed:
    // the open fd still stats it.
    let held = std::fs::File::open(sut.path.join("empty")).expect("open dir");
    sh_ok(&sut.path, script);
    sh_ok(&reference.path, script);
    std::fs::remove_dir(sut.path.join("empty")).expect("rmdir");
    std::fs::remove_dir(reference.path.join("empty")).expect("rmdir");
    let meta = held.metadata().expect("fstat of a removed directory");
    assert!(meta.is_dir());
    drop(held);
    let pid = sh_ok(
        fix.path(),
        &format!("pgrep -f -- ' {}$' | head -1", sut.path.display()),
    );
    let fds = std::fs::read_dir(format!("/proc/{}/fd", pid.trim()))
        .expect("daemon fds")
        .count();
    let stats = stats(&sut.path);
    eprintln!(
        "{fds} fds open with dir_fds={budget} over {} dirs: {stats}",
        dirs * 2 * 3
    );
    assert!(
        stats["dir_fd_evictions"].as_u64() > Some(0) && stats["dir_fd_restores"].as_u64() > Some(0),
        "the cache never gave fds up and reopened them: {stats}"
    );
    // Budget + the session's and layers' own fds + pinned (moved) dirs.
    assert!(fds < budget + 40, "{fds} fds open, budget {budget}");
    let opts = SnapOpts::default();
    assert_same_tree(
        "bounded directory fds",
        "kernel",
        &snapshot(&reference.path, &opts),
        "layerfs",
        &snapshot(&sut.path, &opts),
    );
}

/// A copy-up triggered by an open for writing changes the parent directory (a new upper entry:
/// its ctime moves) without the kernel knowing from the request: the daemon tells it, so a stat
/// right after shows what the upper shows, and `tar` of the tree does not report "file changed as
/// we read it" for the parent.
#[test]
fn parent_attributes_are_fresh_after_a_copy_up() {
    if !can_mount("parent_attributes_are_fresh_after_a_copy_up") {
        return;
    }
    let fix = Fixture::new("freshattr");
    let lower = fix.dir("lower");
    std::fs::create_dir_all(lower.join("d")).expect("mkdir");
    std::fs::write(lower.join("d/f"), "lower\n").expect("write");
    let (upper, work) = fix.upper_work("a");
    let mnt = fix.mountpoint("a");
    mount_one(&lower, &upper, &work, &mnt);
    let ctime = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).expect("stat");
        (m.ctime(), m.ctime_nsec())
    };
    // The kernel caches d's attributes now.
    let _ = ctime(&mnt.join("d"));
    std::fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("d/f"))
        .expect("open for append (copy-up)");
    assert_eq!(ctime(&mnt.join("d")), ctime(&upper.join("d")));
    sh_ok(
        fix.path(),
        &format!("tar cf - -C {} . > /dev/null", s(&mnt)),
    );
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "umount: {err}");
}

/// The filesystems holding the layers can be unmounted while the overlay is mounted, and it keeps
/// working (kernel overlayfs holds private clones of its layer mounts). So a script's `umount MNT;
/// umount UPPER-FS` never races the daemon's exit: before, the daemon's fds kept the upper's mount
/// busy until the process was gone, and the second umount failed about one time in ten.
#[test]
fn layer_filesystems_unmount_while_mounted() {
    if !can_mount("layer_filesystems_unmount_while_mounted") {
        return;
    }
    let fix = Fixture::new("layerumount");
    for imp in [Impl::Kernel, crate::util::sut()] {
        let lower_fs = fix.dir(&format!("{imp}/lowerfs"));
        let upper_fs = fix.dir(&format!("{imp}/upperfs"));
        for d in [&lower_fs, &upper_fs] {
            sh_ok(fix.path(), &format!("mount -t tmpfs layer {}", s(d)));
        }
        let lower = lower_fs.join("l");
        std::fs::create_dir_all(lower.join("d")).expect("mkdir");
        std::fs::write(lower.join("d/f"), "lower\n").expect("write");
        let layers = Layers {
            lowers: vec![lower],
            upper: upper_fs.join("u"),
            work: upper_fs.join("w"),
            options: Vec::new(),
        };
        std::fs::create_dir_all(&layers.upper).expect("mkdir");
        std::fs::create_dir_all(&layers.work).expect("mkdir");
        let mnt = fix.mountpoint(&imp.to_string());
        let m = Mount::new(imp, &layers, &mnt);
        // Copy up once before, once after the layer filesystems are gone from the namespace.
        sh_ok(&mnt, "echo one >> d/f");
        for d in [&upper_fs, &lower_fs] {
            let out = output(Command::new("umount").arg(d)).expect("umount");
            assert!(
                out.status.success(),
                "{imp}: umount {} while mounted: {}",
                d.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        sh_ok(&mnt, "echo two > d/g && mv d/g d/h && echo three >> d/h");
        assert_eq!(
            sh_ok(&mnt, "cat d/f d/h"),
            "lower\none\ntwo\nthree\n",
            "{imp}"
        );
        m.unmount();
    }
}

/// Where the kernel has FUSE over io_uring (the fuse module's `enable_uring` parameter, which the
/// daemon turns on as root), requests are taken from per-CPU io_uring queues; `-o uring=off`
/// keeps them on `/dev/fuse`. Both transports serve the same tree and the same changes. On the
/// rings, READ answers are committed as a SCHED_IDLE thread (the daemon runs as root here),
/// unless `-o idle_commit=off`.
#[test]
fn requests_come_from_io_uring_queues_where_the_kernel_has_them() {
    if !can_mount("requests_come_from_io_uring_queues_where_the_kernel_has_them") {
        return;
    }
    let kernel_has_uring = crate::util::kernel_has_fuse_uring();
    let fix = Fixture::new("uring");
    let lower = fix.dir("lower");
    for d in 0..5 {
        let dp = lower.join(format!("d{d}"));
        std::fs::create_dir_all(&dp).expect("mkdir");
        for f in 0..20 {
            std::fs::write(dp.join(format!("f{f:02}")), format!("{d}/{f}\n")).expect("write");
        }
    }
    // Larger than what an open puts in the page cache by itself: reading it takes READs.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(lower.join("big"), &big).expect("write big");
    let sides = [
        ("on", None),
        ("noidle", Some("idle_commit=off")),
        ("off", Some("uring=off")),
    ];
    for (side, option) in sides {
        let (upper, work) = fix.upper_work(side);
        let mnt = fix.mountpoint(side);
        mount_with(&lower, &upper, &work, &mnt, option);
        let script = "ls -lR d* | grep -c '^-' && cat d3/f07 && echo new > d1/n && echo more >> d2/f01 \
                      && mv d4 d5 && rm d0/f00 && cat d1/n d2/f01 && ls d5 | wc -l";
        let out = sh_ok(&mnt, script);
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            ["100", "3/7", "new", "2/1", "more", "20"],
            "{side}: {out}"
        );
        // Single pages far apart (a random reader): small READs, whose answers go out idle.
        {
            let f = std::fs::File::open(mnt.join("big")).expect("open big");
            rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Random).expect("fadvise");
            for off in [0u64, 200_000, 400_000, 600_000, 800_000] {
                let mut page = [0u8; 4096];
                std::os::unix::fs::FileExt::read_exact_at(&f, &mut page, off).expect("pread");
                let at = off as usize;
                assert!(page[..] == big[at..at + 4096], "{side}: big at {off}");
            }
        }
        assert!(
            std::fs::read(mnt.join("big")).expect("read big") == big,
            "{side}: big"
        );
        let stats = stats(&mnt);
        let uring = stats["uring_requests"].as_u64().expect("uring_requests");
        eprintln!("uring {side}: {stats}");
        let idle = stats["idle_commits"].as_u64().expect("idle_commits");
        if side != "off" && kernel_has_uring {
            assert!(
                uring >= 100,
                "{uring} requests from io_uring queues: the mount did not use them"
            );
            if side == "on" {
                assert!(idle > 0, "small READs of big, yet no idle commit");
            } else {
                assert_eq!(idle, 0, "idle_commit=off, yet {idle} idle commits");
            }
        } else {
            assert_eq!(
                uring, 0,
                "uring=off, yet {uring} requests came from io_uring"
            );
        }
        let (ok, err) = layerfs(&["umount", s(&mnt)]);
        assert!(ok, "umount ({side}): {err}");
        assert!(upper.join("d1/n").is_file() && upper.join("d5").is_dir());
    }
}

/// Many processes on one CPU at once: more concurrent requests than that CPU's io_uring queue has
/// serving threads, some of them slow (copy-ups with their syncs). Every request is answered and
/// every copy is whole.
#[test]
fn concurrent_writers_on_one_cpu() {
    if !can_mount("concurrent_writers_on_one_cpu") {
        return;
    }
    let fix = Fixture::new("onecpu");
    let lower = fix.dir("lower");
    for d in 0..8 {
        let dp = lower.join(format!("d{d}"));
        std::fs::create_dir_all(&dp).expect("mkdir");
        for f in 0..40 {
            let data: Vec<u8> = (0..(f * 997 + d * 13) % 70_000)
                .map(|i| (i % 241) as u8)
                .collect();
            std::fs::write(dp.join(format!("f{f:02}")), data).expect("write");
        }
    }
    let (upper, work) = fix.upper_work("a");
    let mnt = fix.mountpoint("a");
    mount_one(&lower, &upper, &work, &mnt);
    // Eight jobs pinned to CPU 0: each appends to every file of its dir (a copy-up each), copies
    // its dir, lists everything and checksums its copy against the lower files plus the append.
    let script = r#"
        for d in 0 1 2 3 4 5 6 7; do
          taskset -c 0 sh -c '
            for f in d'$d'/f*; do echo x >> "$f"; done
            cp -a d'$d' c'$d'
            ls -lR . > /dev/null
            cd c'$d' && for f in f*; do
              cat "$0/lower/d'$d'/$f" > "$0/want.$$"; echo x >> "$0/want.$$"
              cmp -s "$f" "$0/want.$$" || echo "differs: c'$d'/$f"
            done; rm -f "$0/want.$$"
          ' "$LOWER_PARENT" &
        done
        wait
        ls c0 c1 c2 c3 c4 c5 c6 c7 | grep -c '^f'
    "#;
    let parent = lower.parent().expect("lower has a parent");
    let out = sh_ok(&mnt, &format!("LOWER_PARENT={}; {script}", s(parent)));
    assert_eq!(out.trim(), "320", "{out}");
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "umount: {err}");
}
