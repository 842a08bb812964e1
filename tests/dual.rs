//! Two mounts over the same standard lowers — kernel overlayfs (the reference) and the system under test —
//! for scenario tests that run the same real programs in both and compare.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::util::{
    Fixture, Impl, Layers, Mount, SnapOpts, Snapshot, assert_same_tree, sh, sh_ok, snapshot, sut,
};

/// Bottom lower layer: a small project tree with a symlink, a hard link, a FIFO, odd modes and owners.
pub const LOWER_BOTTOM: &str = r#"
mkdir -p proj/src proj/docs etc/conf.d data/sub
printf 'fn main() {}\n' > proj/src/main.rs
printf 'hello\nworld\n' > proj/docs/readme.txt
ln proj/docs/readme.txt proj/docs/readme.hard
printf 'old\n' > proj/docs/old.txt
ln -s ../etc/app.conf proj/conf
printf 'a=1\nb=2\n' > etc/app.conf
chmod 0640 etc/app.conf
printf 'x\n' > etc/conf.d/x.conf
printf 'y\n' > etc/conf.d/y.conf
head -c 150000 /dev/zero | tr '\0' 'z' > data/big.bin
printf 'sub\n' > data/sub/s.txt
chown 1000:1000 data/sub/s.txt data/sub
chmod 0750 data/sub
mkfifo data/fifo
chmod 0755 proj/src
"#;

/// Top lower layer: overrides a file, adds one, whites one out.
pub const LOWER_TOP: &str = r#"
mkdir -p proj/src proj/docs etc
printf 'fn lib() {}\n' > proj/src/lib.rs
printf 'a=override\n' > etc/app.conf
chmod 0640 etc/app.conf
mknod proj/docs/old.txt c 0 0
"#;

/// Every lower entry gets this mtime, so "old" and "recent" are told apart.
pub const LOWER_TIME: i64 = 1_000_000_000;

/// Builds the standard lowers in `fix` (top first).
pub fn standard_lowers(fix: &Fixture) -> Vec<PathBuf> {
    let top = fix.dir("lower0");
    let bottom = fix.dir("lower1");
    for (dir, script) in [(&top, LOWER_TOP), (&bottom, LOWER_BOTTOM)] {
        sh_ok(dir, script);
        sh_ok(
            dir,
            &format!("find . -exec touch -h -d @{LOWER_TIME} {{}} +"),
        );
    }
    vec![top, bottom]
}

/// Layers for a new mount on `side` over `lowers`.
pub fn layers_for(fix: &Fixture, lowers: &[PathBuf], side: &str) -> Layers {
    let (upper, work) = fix.upper_work(side);
    Layers {
        lowers: lowers.to_vec(),
        upper,
        work,
    }
}

/// The reference and the system under test over one set of lowers.
pub struct Dual {
    // Field order matters: mounts drop (unmount) before the fixture removes its dir.
    pub kernel: Mount,
    pub sut: Mount,
    pub fix: Fixture,
}

impl Dual {
    pub fn new(name: &str) -> Dual {
        let fix = Fixture::new(name);
        let lowers = standard_lowers(&fix);
        let kernel = Mount::new(
            Impl::Kernel,
            &layers_for(&fix, &lowers, "ref"),
            &fix.mountpoint("ref"),
        );
        let sut = Mount::new(
            sut(),
            &layers_for(&fix, &lowers, "sut"),
            &fix.mountpoint("sut"),
        );
        Dual { kernel, sut, fix }
    }

    /// Runs `script` in both mount roots; asserts equal exit status and equal stdout (mount path
    /// replaced by `<MNT>`); returns the system under test's stdout.
    pub fn run(&self, script: &str) -> String {
        let a = sh(&self.kernel.path, script);
        let b = sh(&self.sut.path, script);
        let na = norm_out(&a, &self.kernel.path);
        let nb = norm_out(&b, &self.sut.path);
        assert_eq!(
            a.status.code(),
            b.status.code(),
            "exit status differs for {script:?}\nkernel stderr: {}\n{} stderr: {}",
            String::from_utf8_lossy(&a.stderr),
            self.sut.imp,
            String::from_utf8_lossy(&b.stderr)
        );
        assert!(
            a.status.success(),
            "script failed on both: {script:?}\nstderr: {}",
            String::from_utf8_lossy(&b.stderr)
        );
        assert_eq!(
            na, nb,
            "stdout differs (left kernel, right {})",
            self.sut.imp
        );
        nb
    }

    /// Asserts the merged trees are equal (mount paths normalized in contents).
    pub fn assert_same(&self, what: &str, opts: &SnapOpts) -> Snapshot {
        let (a, b) = self.snapshots(opts);
        assert_same_tree(what, "kernel", &a, &self.sut.imp.to_string(), &b);
        b
    }

    pub fn snapshots(&self, opts: &SnapOpts) -> (Snapshot, Snapshot) {
        let mut oa = opts.clone();
        oa.normalize = Some(self.kernel.path.display().to_string());
        let mut ob = opts.clone();
        ob.normalize = Some(self.sut.path.display().to_string());
        (
            snapshot(&self.kernel.path, &oa),
            snapshot(&self.sut.path, &ob),
        )
    }
}

fn norm_out(o: &Output, mnt: &Path) -> String {
    String::from_utf8_lossy(&o.stdout).replace(&mnt.display().to_string(), "<MNT>")
}

/// Snapshot options used by scenarios: times classified, directory nlink ignored.
pub fn scen_opts() -> SnapOpts {
    SnapOpts {
        times: true,
        ..SnapOpts::default()
    }
}
