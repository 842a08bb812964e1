//! Crash safety of copy-up (docs/durability.md): a power cut and a killed daemon never leave a
//! renamed-in copy that is empty or partial.
//!
//! The power cut: the upper and work dirs live on an ext4 on a loop device over `cutfs`'s
//! `disk.img` (crates/cutfs), served from this process. Many lower files are copied up (by an
//! append), one unrelated new file on the ext4 is fsynced (which commits the running journal
//! transaction, renames included, without writing back anybody else's data), then the power is
//! cut. The image as it then stands is mounted again (the journal replays) and every upper copy
//! must be whole. The same run with `volatile` must lose copies, or the simulator simulates
//! nothing and the test fails.
//!
//! Layout of a power-cut fixture:
//! ```text
//! <tmp>/layerfs-<test>-XXXX/
//!     backing/            tmpfs: disk.img (the disk), crashed.img (its copy after the cut),
//!                         lower/dNN/fNNNN (the lower files)
//!     cut/disk.img        cutfs
//!     ext4/{upper,work}   the ext4 on the loop device over cut/disk.img
//!     after/              crashed.img mounted again
//!     m/x/y/mnt           layerfs
//! ```

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{
    Fixture, Impl, Layers, Mount, can_mount_layerfs, have_program, layerfs_bin, output,
    pids_mentioning, sh_ok, skip, spawn, stats,
};

/// Files copied up per power-cut run (in [`DIRS`] directories).
const FILES: usize = 2000;
const DIRS: usize = 4;
/// Appended to each file; its last block has room for it, so an append never allocates.
const APPEND: usize = 16;
const BLOCK: usize = 4096;

/// Whether this test can run here; says why not, loudly.
fn ready(test: &str, programs: &[&str]) -> bool {
    if !can_mount_layerfs(test, "this tests the layerfs daemon") {
        return false;
    }
    if let Some(p) = programs.iter().find(|p| !have_program(p)) {
        skip(test, &format!("{p} is not installed (cargo xtask setup)"));
        return false;
    }
    true
}

/// The lower content of file `i`: distinct bytes, 1..4 blocks long, the last block never full.
fn lower_content(i: usize) -> Vec<u8> {
    let len = BLOCK * (i % 4) + 100 + (i * 37) % (BLOCK - 100 - APPEND);
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

fn append_content(i: usize) -> Vec<u8> {
    format!("+append {i:07}+\n").into_bytes()
}

fn rel_path(i: usize) -> String {
    format!("d{:02}/f{i:04}", i % DIRS)
}

fn make_lower(dir: &Path) {
    for d in 0..DIRS {
        std::fs::create_dir_all(dir.join(format!("d{d:02}"))).expect("mkdir lower");
    }
    for i in 0..FILES {
        std::fs::write(dir.join(rel_path(i)), lower_content(i)).expect("write lower");
    }
}

/// What a file of the upper looked like after the crash.
#[derive(Debug, Default)]
struct Outcome {
    /// Not copied up durably: the lower shows through.
    absent: usize,
    /// The lower content, without the append.
    original: usize,
    /// The lower content and the append.
    appended: usize,
    /// The lower content, then the append's size in zeros: the append itself was never synced
    /// (its size was journaled, its block not written), as on any ext4.
    append_zeroed: usize,
    /// Everything else: empty, short, or wrong bytes in the copied part.
    bad: Vec<String>,
}

fn classify(upper: &Path) -> Outcome {
    let mut out = Outcome::default();
    for i in 0..FILES {
        let data = match std::fs::read(upper.join(rel_path(i))) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                out.absent += 1;
                continue;
            }
            Err(e) => {
                out.bad.push(format!("{}: {e}", rel_path(i)));
                continue;
            }
        };
        let lower = lower_content(i);
        let append = append_content(i);
        let (head, tail) = data.split_at(data.len().min(lower.len()));
        if head != lower.as_slice() {
            let zeros = head.iter().filter(|b| **b == 0).count();
            out.bad.push(format!(
                "{}: {} bytes ({zeros} zero) where the lower has {}",
                rel_path(i),
                data.len(),
                lower.len()
            ));
        } else if tail.is_empty() {
            out.original += 1;
        } else if tail == append.as_slice() {
            out.appended += 1;
        } else if tail.len() == append.len() && tail.iter().all(|b| *b == 0) {
            out.append_zeroed += 1;
        } else {
            out.bad.push(format!(
                "{}: tail {:?}",
                rel_path(i),
                String::from_utf8_lossy(tail)
            ));
        }
    }
    out
}

/// An ext4 on a loop device over a cutfs disk, torn down on drop (layerfs first).
struct CutExt4 {
    /// The disk's backing image, on the fixture's tmpfs.
    image: PathBuf,
    /// Where the ext4 is mounted.
    ext4: PathBuf,
    /// The loop device, while attached.
    dev: Option<String>,
    ext4_mounted: bool,
    cutfs: Option<cutfs::CutFs>,
}

impl CutExt4 {
    /// A fresh ext4 (4 KiB blocks, journal, `data=ordered` unless `mount_opts` says otherwise).
    fn new(fix: &Fixture, mount_opts: &str) -> CutExt4 {
        let backing = fix.dir("backing");
        sh_ok(
            fix.path(),
            &format!("mount -t tmpfs -o size=1g tmpfs {}", backing.display()),
        );
        let image = backing.join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(256 << 20))
            .expect("create disk image");
        sh_ok(
            fix.path(),
            &format!(
                "mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 {}",
                image.display()
            ),
        );
        let cutfs = cutfs::CutFs::mount(&image, &fix.dir("cut")).expect("mount cutfs");
        let mut disk = CutExt4 {
            image,
            ext4: fix.dir("ext4"),
            dev: None,
            ext4_mounted: false,
            cutfs: Some(cutfs),
        };
        let disk_file = disk.cutfs().disk();
        let dev = sh_ok(
            fix.path(),
            &format!("losetup --direct-io=on -f --show {}", disk_file.display()),
        );
        disk.dev = Some(dev.trim().to_string());
        let opts = if mount_opts.is_empty() {
            String::new()
        } else {
            format!("-o {mount_opts}")
        };
        sh_ok(
            fix.path(),
            &format!(
                "mount -t ext4 {opts} {} {}",
                dev.trim(),
                disk.ext4.display()
            ),
        );
        disk.ext4_mounted = true;
        disk
    }

    fn cutfs(&self) -> &cutfs::CutFs {
        self.cutfs.as_ref().expect("cutfs is mounted")
    }

    /// Unmounts the ext4 (its late writes vanish), detaches the loop device and unmounts cutfs.
    fn tear_down(&mut self) {
        if self.ext4_mounted {
            self.ext4_mounted = false;
            let _ = output(Command::new("umount").arg(&self.ext4));
            if crate::util::is_mounted(&self.ext4) {
                eprintln!("*** umount {}: busy, detaching lazily", self.ext4.display());
                let _ = output(Command::new("umount").arg("-l").arg(&self.ext4));
            }
        }
        if let Some(dev) = self.dev.take() {
            let _ = output(Command::new("losetup").arg("-d").arg(&dev));
            // The detach completes asynchronously; cutfs cannot go while the loop holds its file.
            let backing = format!(
                "/sys/block/{}/loop/backing_file",
                dev.trim_start_matches("/dev/")
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new(&backing).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(fs) = self.cutfs.take() {
            let _ = fs.unmount();
        }
    }
}

impl Drop for CutExt4 {
    fn drop(&mut self) {
        self.tear_down();
    }
}

/// One power-cut run: copy every lower file up by an append on a layerfs mounted with
/// `layerfs_opts` over an ext4 mounted with `ext4_opts`, commit the journal, cut the power, and
/// classify the upper as the crashed disk holds it. Also returns the daemon's counters.
fn power_cut_run(
    name: &str,
    ext4_opts: &str,
    layerfs_opts: &[&str],
) -> (Outcome, serde_json::Value) {
    let fix = Fixture::new(name);
    let mut disk = CutExt4::new(&fix, ext4_opts);
    let lower = disk.image.with_file_name("lower");
    make_lower(&lower);
    let layers = Layers {
        lowers: vec![lower.clone()],
        upper: disk.ext4.join("upper"),
        work: disk.ext4.join("work"),
        options: Vec::new(),
    };
    std::fs::create_dir_all(&layers.upper).expect("mkdir upper");
    std::fs::create_dir_all(&layers.work).expect("mkdir work");
    let mnt = fix.mountpoint("m");
    let mount = Mount::try_new_with(Impl::Layerfs, &layers, &mnt, layerfs_opts)
        .unwrap_or_else(|e| panic!("layerfs mount: {e}"));
    for i in 0..FILES {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(mnt.join(rel_path(i)))
            .expect("open for append");
        f.write_all(&append_content(i)).expect("append");
        if i == 0 {
            // A user's fsync through the mount is a real one, whatever the copy-up policy.
            f.sync_all().expect("fsync through the mount");
        }
    }
    let counters = stats(&mnt);
    // Commit the running transaction (every rename is in it or an earlier one) without writing
    // back any other file's data: fsync of an unrelated new file.
    let mut marker = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(disk.ext4.join("marker"))
        .expect("create marker");
    marker.write_all(b"committed\n").expect("write marker");
    marker.sync_all().expect("fsync marker");
    drop(marker);
    disk.cutfs().cut();
    let counts = disk.cutfs().counts();
    eprintln!("{name}: cut after {counts:?}");
    // The disk no longer changes: take the crashed image, then tear everything down.
    let crashed = disk.image.with_file_name("crashed.img");
    sh_ok(
        fix.path(),
        &format!(
            "cp --sparse=always {} {}",
            disk.image.display(),
            crashed.display()
        ),
    );
    let pid = daemon_pid(&mnt);
    mount.unmount();
    // The ext4 is busy until the daemon has closed its upper and work dirs.
    crate::util::wait_exit(pid);
    disk.tear_down();
    let after = fix.dir("after");
    // Mounting replays the journal, as a boot after the power cut would.
    sh_ok(
        fix.path(),
        &format!("mount -o loop {} {}", crashed.display(), after.display()),
    );
    assert_eq!(
        std::fs::read(after.join("marker")).ok().as_deref(),
        Some(&b"committed\n"[..]),
        "{name}: the fsynced marker did not survive the cut: the simulator lost a committed write"
    );
    let outcome = classify(&after.join("upper"));
    sh_ok(fix.path(), &format!("umount {}", after.display()));
    let fsck = output(Command::new("e2fsck").arg("-fn").arg(&crashed)).expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "{name}: e2fsck -fn after the journal replay: {}\n{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout)
    );
    eprintln!(
        "{name}: absent {}, original {}, appended {}, append zeroed {}, bad {}",
        outcome.absent,
        outcome.original,
        outcome.appended,
        outcome.append_zeroed,
        outcome.bad.len()
    );
    (outcome, counters)
}

/// Asserts a run that claims crash safety: every copy is there (the commit covered every rename)
/// and whole; file 0, fsynced by the user, has its append.
fn assert_safe(name: &str, out: &Outcome) {
    assert!(
        out.bad.is_empty(),
        "{name}: {} copies are empty or partial after the power cut:\n{}",
        out.bad.len(),
        out.bad[..out.bad.len().min(20)].join("\n")
    );
    assert_eq!(
        out.absent, 0,
        "{name}: copies missing although the journal was committed after their renames"
    );
    assert!(
        out.appended >= 1,
        "{name}: the fsynced append of file 0 was lost"
    );
}

const POWER_CUT_TOOLS: &[&str] = &["mkfs.ext4", "e2fsck", "losetup", "cp"];

/// A power cut on an ext4 mounted with `ext4_opts` keeps every copy whole; the mount chose the
/// sync policy `policy` and counted `writebacks` and `fsyncs`.
fn assert_power_cut_safe(test: &str, ext4_opts: &str, policy: &str, writebacks: u64, fsyncs: u64) {
    if !ready(test, POWER_CUT_TOOLS) {
        return;
    }
    let (out, counters) = power_cut_run(test, ext4_opts, &[]);
    assert_safe(test, &out);
    assert_eq!(counters["copyup_sync"], policy, "{counters}");
    assert_eq!(counters["writebacks"], writebacks, "{counters}");
    assert_eq!(counters["fsyncs"], fsyncs, "{counters}");
}

/// ext4 `data=ordered`: write-back without fsync keeps every copy whole.
#[test]
fn durability_power_cut_ext4_ordered() {
    let files = FILES as u64;
    let policy = "writeback (ext4 data=ordered)";
    assert_power_cut_safe("durability_power_cut_ext4_ordered", "", policy, files, 0);
}

/// ext4 `data=journal`: no sync at all keeps every copy whole.
#[test]
fn durability_power_cut_ext4_journal() {
    let policy = "none (ext4 data=journal)";
    assert_power_cut_safe(
        "durability_power_cut_ext4_journal",
        "data=journal",
        policy,
        0,
        0,
    );
}

/// ext4 `data=writeback`: the fallback, an fsync per copy, keeps every copy whole.
#[test]
fn durability_power_cut_ext4_writeback_fsyncs() {
    let test = "durability_power_cut_ext4_writeback_fsyncs";
    assert_power_cut_safe(test, "data=writeback", "fsync", 0, FILES as u64);
}

/// The test's teeth: with `volatile` (no sync at all) the same power cut must lose copies.
#[test]
fn durability_power_cut_volatile_loses_copies() {
    let test = "durability_power_cut_volatile_loses_copies";
    if !ready(test, POWER_CUT_TOOLS) {
        return;
    }
    let (out, counters) = power_cut_run(test, "", &["volatile"]);
    assert_eq!(counters["copyup_sync"], "none (volatile)");
    assert!(
        !out.bad.is_empty(),
        "{test}: no copy was lost without any sync: the power-cut simulator simulates nothing \
         (absent {}, original {}, appended {})",
        out.absent,
        out.original,
        out.appended
    );
}

/// The pid of the layerfs daemon serving `mnt`.
fn daemon_pid(mnt: &Path) -> i32 {
    let bin = std::fs::canonicalize(layerfs_bin()).expect("layerfs binary");
    let pids: Vec<i32> = pids_mentioning(&mnt.to_string_lossy())
        .into_iter()
        .filter(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == bin))
        .collect();
    assert_eq!(
        pids.len(),
        1,
        "one daemon expected for {}: {pids:?}",
        mnt.display()
    );
    pids[0]
}

/// The one file in `dir` and its size, if there is exactly one.
fn only_file(dir: &Path) -> Option<(PathBuf, u64)> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    if entries.len() != 1 {
        return None;
    }
    let e = entries.pop()?;
    Some((e.path(), e.metadata().ok()?.len()))
}

/// SIGKILL of the daemon in the middle of a long copy-up: no partial file under the real name;
/// the half-built copy stays in the work dir, and the next mount clears it and copies afresh.
#[test]
fn durability_kill_during_copy_up() {
    let test = "durability_kill_during_copy_up";
    if !ready(test, &[]) {
        return;
    }
    const SIZE: u64 = 200 << 20;
    let fix = Fixture::new("kill-copyup");
    // The lower on tmpfs: a copy across filesystems goes by read/write, 1 MiB at a time.
    let lower = fix.dir("lower");
    sh_ok(
        fix.path(),
        &format!("mount -t tmpfs -o size=300m tmpfs {}", lower.display()),
    );
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut big = std::fs::File::create(lower.join("big")).expect("create big");
    for _ in 0..SIZE >> 20 {
        big.write_all(&chunk).expect("write big");
    }
    drop(big);
    let (upper, work) = fix.upper_work("a");
    let layers = Layers {
        lowers: vec![lower.clone()],
        upper: upper.clone(),
        work: work.clone(),
        options: Vec::new(),
    };
    let mnt = fix.mountpoint("a");
    let mount = Mount::new(Impl::Layerfs, &layers, &mnt);
    let pid = daemon_pid(&mnt);
    let mut writer = spawn(
        Command::new("sh")
            .arg("-c")
            .arg(format!("printf tail >> '{}'", mnt.join("big").display())),
    )
    .expect("spawn writer");
    // Wait, by polling, until the copy is under way in work/work, then kill the daemon.
    let building = work.join("work");
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        if let Some((path, size)) = only_file(&building)
            && size >= 1 << 20
        {
            break path;
        }
        assert!(
            Instant::now() < deadline,
            "no copy grew in {} within 60 s",
            building.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("kill the daemon");
    crate::util::wait_exit(pid);
    let status = writer.wait().expect("wait writer");
    assert!(
        !status.success(),
        "the append succeeded although its daemon was killed"
    );
    let left = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(
        left < SIZE,
        "the copy was complete before the kill ({left} bytes): the test killed nothing mid-copy"
    );
    assert!(
        !upper.join("big").exists(),
        "a partial copy is under the real name after the kill"
    );
    mount.unmount();
    // A new mount clears the work dir and copies afresh.
    let mount = Mount::new(Impl::Layerfs, &layers, &mnt);
    assert!(
        std::fs::read_dir(&building)
            .expect("work/work")
            .next()
            .is_none(),
        "the half-built copy was left in work/work by the new mount"
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("big"))
        .expect("open for append");
    f.write_all(b"tail").expect("append");
    drop(f);
    mount.unmount();
    let copy = std::fs::read(upper.join("big")).expect("read the upper copy");
    assert_eq!(copy.len() as u64, SIZE + 4);
    assert!(
        copy.chunks(1 << 20)
            .take((SIZE >> 20) as usize)
            .all(|c| c == chunk.as_slice()),
        "the upper copy differs from the lower"
    );
    assert_eq!(&copy[SIZE as usize..], b"tail");
}
