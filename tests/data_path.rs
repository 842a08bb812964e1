//! The data path of lower and copied-up files: reads through the daemon (one READ per MiB, or
//! without the page cache with `direct_read`), a shared writable mmap after a copy-up, and
//! requests that wait for the disk served beside the others.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::mount_cli::{layerfs, mount_one, mount_with, s};
use crate::util::{Fixture, can_mount, output, sh_ok, spawn, stats};

/// A sequential read of a lower file served through the daemon costs one READ per MiB: the mount
/// raises the kernel's 128 KiB FUSE readahead to the 1 MiB READs it allows. Without
/// `direct_read`, it goes through the page cache.
#[test]
fn sequential_read_costs_one_read_per_mib() {
    if !can_mount("sequential_read_costs_one_read_per_mib") {
        return;
    }
    let fix = Fixture::new("readahead");
    let lower = fix.dir("lower");
    let mib = 16;
    let data: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(lower.join("big"), &data).expect("write");
    let (upper, work) = fix.upper_work("a");
    let mnt = fix.mountpoint("a");
    mount_one(&lower, &upper, &work, &mnt);
    assert!(std::fs::read(mnt.join("big")).expect("read") == data);
    let stats = stats(&mnt);
    let reads = stats["reads"].as_u64().expect("reads");
    eprintln!("{reads} READs for a {mib} MiB file");
    assert!(
        (mib as u64..=mib as u64 + 4).contains(&reads),
        "{reads} READs for {mib} MiB: readahead is not 1 MiB"
    );
    // Through the page cache unless the mount asks for `direct_read`.
    assert_eq!(stats["direct_opens"].as_u64(), Some(0));
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "umount: {err}");
}

/// A lower file of at least `direct_read` bytes is read without the page cache: every read
/// goes to the daemon again, yet an mmap of it (shared or private) works, an fd opened before a
/// copy-up reads the copy's new data, and an `exec` of such a file gets a cached open.
#[test]
fn big_lower_files_are_read_without_the_page_cache() {
    if !can_mount("big_lower_files_are_read_without_the_page_cache") {
        return;
    }
    let fix = Fixture::new("direct");
    let lower = fix.dir("lower");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(lower.join("big"), &data).expect("write big");
    std::fs::write(lower.join("small"), b"small file").expect("write small");
    std::fs::copy("/bin/true", lower.join("true")).expect("copy /bin/true");
    let (upper, work) = fix.upper_work("a");
    let mnt = fix.mountpoint("a");
    mount_with(&lower, &upper, &work, &mnt, Some("direct_read=16K"));
    let counter = |name: &str| stats(&mnt)[name].as_u64().expect(name);
    for round in 0..2 {
        let reads = counter("reads");
        assert!(std::fs::read(mnt.join("big")).expect("read big") == data);
        let went = counter("reads") - reads;
        // 4 READs of 1 MiB (and the one that finds the end), the second time too: nothing cached.
        assert!(
            (4..=6).contains(&went),
            "round {round}: {went} READs for 4 MiB"
        );
    }
    assert_eq!(counter("direct_opens"), 2);
    assert_eq!(
        std::fs::read(mnt.join("small")).expect("small"),
        b"small file"
    );
    assert_eq!(counter("direct_opens"), 2, "a small file was opened direct");
    // The kernel's open of a program it runs is a cached one (an mmap of a direct open would
    // drop the file's page cache).
    let ran = output(&mut Command::new(mnt.join("true"))).expect("run true");
    assert!(
        ran.status.success(),
        "true from the mount: {:?}",
        ran.status
    );
    assert_eq!(counter("direct_opens"), 2, "exec got a direct open");
    let script = r#"
import mmap, os, sys
p = os.path.join(sys.argv[1], "big")
want = bytes(i % 253 for i in range(1 << 20))
with open(p, "rb") as f:
    for flags in (mmap.MAP_SHARED, mmap.MAP_PRIVATE):
        m = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        assert m[:1 << 20] == want, "mmap data"
        assert m[(3 << 20) + 5] == ((3 << 20) + 5) % 253, "mmap tail"
        m.close()
held = os.open(p, os.O_RDONLY)
assert os.pread(held, 4, 0) == want[:4]
w = os.open(p, os.O_WRONLY)
os.pwrite(w, b"NEW!", 0)
os.close(w)
got = os.pread(held, 4, 0)
assert got == b"NEW!", got
print("ok")
"#;
    let out = output(Command::new("python3").arg("-c").arg(script).arg(&mnt)).expect("python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(counter("copy_ups"), 1);
    assert_eq!(
        &std::fs::read(upper.join("big")).expect("upper big")[..4],
        b"NEW!"
    );
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "umount: {err}");
}

/// A shared writable mmap of a copied-up file writes through; another fd sees the bytes.
#[test]
fn shared_writable_mmap_of_a_copied_up_file() {
    if !can_mount("shared_writable_mmap_of_a_copied_up_file") {
        return;
    }
    let fix = Fixture::new("mmap");
    let lower = fix.dir("lower");
    std::fs::write(lower.join("data"), vec![b'a'; 8192]).expect("write");
    let (upper, work) = fix.upper_work("a");
    let mnt = fix.mountpoint("a");
    mount_one(&lower, &upper, &work, &mnt);
    let script = r#"
import mmap, os, sys
p = os.path.join(sys.argv[1], "data")
reader = os.open(p, os.O_RDONLY)
fd = os.open(p, os.O_RDWR)
m = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
m[100:105] = b"HELLO"
m.flush()
m.close()
os.close(fd)
print(os.pread(reader, 5, 100).decode())
"#;
    let out = output(Command::new("python3").arg("-c").arg(script).arg(&mnt)).expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "HELLO");
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "umount: {err}");
    let data = std::fs::read(upper.join("data")).expect("upper copy");
    assert_eq!(&data[100..105], b"HELLO");
    assert_eq!(std::fs::read(lower.join("data")).expect("lower")[100], b'a');
}

/// An ext4 on a loop file, frozen with `fsfreeze` while held; thawed and unmounted on drop.
struct FreezableExt4 {
    dir: PathBuf,
    frozen: bool,
}

impl FreezableExt4 {
    fn new(fix: &Fixture) -> FreezableExt4 {
        let image = fix.path().join("ext4.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(64 << 20))
            .expect("create image");
        let dir = fix.dir("ext4");
        sh_ok(fix.path(), &format!("mkfs.ext4 -q -F {}", s(&image)));
        sh_ok(
            fix.path(),
            &format!("mount -o loop {} {}", s(&image), s(&dir)),
        );
        FreezableExt4 { dir, frozen: false }
    }

    fn freeze(&mut self, frozen: bool) {
        let op = if frozen { "-f" } else { "-u" };
        sh_ok(&self.dir, &format!("fsfreeze {op} {}", s(&self.dir)));
        self.frozen = frozen;
    }
}

impl Drop for FreezableExt4 {
    fn drop(&mut self) {
        if self.frozen {
            let _ = output(Command::new("fsfreeze").arg("-u").arg(&self.dir));
        }
        let _ = output(Command::new("umount").arg(&self.dir));
    }
}

/// Waits until process `pid` sleeps in a FUSE request (its `wchan`), up to a deadline.
fn wait_in_fuse_request(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan == "request_wait_answer" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never waited for the daemon (wchan {wchan:?})"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Drops `path` from the page cache (written back first, so that it can go).
fn evict(path: &Path) {
    let script = "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); \
                  os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)";
    let out = output(Command::new("python3").args(["-c", script]).arg(path)).expect("python3");
    assert!(out.status.success(), "evict {}: {out:?}", path.display());
}

/// A request that waits does not hold up the others from its CPU: a copy-up into an upper
/// filesystem that is frozen waits until it thaws, and meanwhile a caller on the same CPU gets
/// its answers; then the copy-up completes. A READ of data that is not in the page cache, tried
/// from the page cache first, gets the right bytes (`fuse/uring.rs`).
#[test]
fn requests_that_wait_are_served_beside_the_others() {
    if !can_mount("requests_that_wait_are_served_beside_the_others") {
        return;
    }
    let fix = Fixture::new("waiting");
    let lower = fix.dir("lower");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 241) as u8).collect();
    std::fs::write(lower.join("big"), &data).expect("write");
    std::fs::write(lower.join("cold"), &data).expect("write");
    std::fs::write(lower.join("other"), "other\n").expect("write");
    std::fs::create_dir_all(lower.join("dir/sub")).expect("mkdir");
    let mut ext4 = FreezableExt4::new(&fix);
    let (upper, work) = (ext4.dir.join("upper"), ext4.dir.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let mnt = fix.mountpoint("a");
    mount_one(&lower, &upper, &work, &mnt);

    ext4.freeze(true);
    // Both callers on CPU 0, so both go to that CPU's queue.
    let mut appender = spawn(
        Command::new("taskset")
            .args(["-c", "0", "sh", "-c", "echo appended >> \"$1\"", "sh"])
            .arg(mnt.join("big")),
    )
    .expect("spawn the appender");
    wait_in_fuse_request(appender.id());
    let seen = fix.path().join("seen");
    let mut reader = spawn(
        Command::new("taskset")
            .args(["-c", "0", "sh", "-c"])
            .arg("{ stat -c %s \"$1\"/other && ls \"$1\"/dir && cat \"$1\"/other; } > \"$2\"")
            .arg("sh")
            .arg(&mnt)
            .arg(&seen),
    )
    .expect("spawn the reader");
    // A request the daemon has taken cannot be interrupted: if the reader's waits behind the
    // copy-up, only the thaw lets it (and this test) go on.
    let deadline = Instant::now() + Duration::from_secs(30);
    let finished = loop {
        if let Some(status) = reader.try_wait().expect("wait for the reader") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    ext4.freeze(false);
    let status = finished.or_else(|| reader.wait().ok());
    assert!(
        finished.is_some(),
        "a reader on the same CPU waited for the frozen copy-up (it ended with {status:?} after the thaw)"
    );
    assert!(
        finished.is_some_and(|s| s.success()),
        "the reader failed: {status:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&seen).expect("read what the reader saw"),
        "6\nsub\nother\n"
    );
    let status = appender.wait().expect("wait for the appender");
    assert!(status.success(), "the append failed: {status}");
    let mut want = data.clone();
    want.extend_from_slice(b"appended\n");
    assert!(std::fs::read(mnt.join("big")).expect("read") == want);
    assert!(std::fs::read(upper.join("big")).expect("read upper") == want);

    // A lower file not in the page cache: its READs wait for the disk, on the queue's thread
    // when nothing else waits for it, else on a worker; both give the file's bytes.
    evict(&lower.join("cold"));
    assert!(std::fs::read(mnt.join("cold")).expect("read cold") == data);
    let (ok, err) = layerfs(&["umount", s(&mnt)]);
    assert!(ok, "umount: {err}");
}
