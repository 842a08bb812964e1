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
mkdir big && i=0 && while [ $i -lt 600 ]; do : > big/entry-with-a-longish-name-$i; i=$((i+1)); done
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
        options: Vec::new(),
    }
}

/// The reference and the system under test over one set of lowers.
pub struct Dual {
    // Field order matters: mounts drop (unmount) before the fixture removes its dir.
    pub kernel: Mount,
    pub sut: Mount,
    kernel_layers: Layers,
    sut_layers: Layers,
    pub fix: Fixture,
}

impl Dual {
    pub fn new(name: &str) -> Dual {
        let fix = Fixture::new(name);
        let lowers = standard_lowers(&fix);
        let kernel_layers = layers_for(&fix, &lowers, "ref");
        let sut_layers = layers_for(&fix, &lowers, "sut");
        let kernel = Mount::new(Impl::Kernel, &kernel_layers, &fix.mountpoint("ref"));
        let sut = Mount::new(sut(), &sut_layers, &fix.mountpoint("sut"));
        Dual {
            kernel,
            sut,
            kernel_layers,
            sut_layers,
            fix,
        }
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

impl Dual {
    /// Interop after a scenario: unmounts both, mounts the system under test's upper (and work dir) with
    /// kernel overlayfs and the kernel's upper with the system under test, and asserts each shows the tree
    /// its writer showed.
    pub fn assert_cross_mounts(self, what: &str, opts: &SnapOpts) {
        let (k_before, s_before) = self.snapshots(opts);
        let Dual {
            kernel,
            sut: sut_m,
            kernel_layers,
            sut_layers,
            fix,
        } = self;
        let imp = sut_m.imp;
        // Contents keep the writer's mount path (venv scripts): normalize that one on the reader's side.
        let (k_path, s_path) = (kernel.path.clone(), sut_m.path.clone());
        kernel.unmount();
        sut_m.unmount();
        let k_on_s = Mount::new(Impl::Kernel, &sut_layers, &fix.mountpoint("x-kernel"));
        let s_on_k = Mount::new(imp, &kernel_layers, &fix.mountpoint("x-sut"));
        let snap = |m: &Mount, writer: &std::path::Path| {
            let mut o = opts.clone();
            o.normalize = Some(writer.display().to_string());
            let mut s = snapshot(&m.path, &o);
            cross_tolerances(&mut s);
            s
        };
        let (mut k_before, mut s_before) = (k_before, s_before);
        cross_tolerances(&mut k_before);
        cross_tolerances(&mut s_before);
        assert_same_tree(
            &format!("{what}: upper written by {imp}, mounted by the kernel"),
            &imp.to_string(),
            &s_before,
            "kernel",
            &snap(&k_on_s, &s_path),
        );
        assert_same_tree(
            &format!("{what}: upper written by the kernel, mounted by {imp}"),
            "kernel",
            &k_before,
            &imp.to_string(),
            &snap(&s_on_k, &k_path),
        );
        k_on_s.unmount();
        s_on_k.unmount();
    }
}

/// What cross mounts do not compare (both are known and accepted in main, see tests/DIVERGENCES.md):
/// - hard-link groups of lower files: each implementation keeps them in its own index format
///   (kernel `work/index`, layerfs `work/layerfs-index`) that the other does not read;
/// - d_ino vs st_ino of directories: the kernel reports the upper inode for a directory another writer
///   copied up while readdir gives the lower one.
fn cross_tolerances(s: &mut Snapshot) {
    const LOWER_LINKS: [&str; 2] = ["proj/docs/readme.txt", "proj/docs/readme.hard"];
    for p in LOWER_LINKS {
        s.entries.remove(p);
    }
    s.link_groups
        .retain(|g| !g.iter().any(|p| LOWER_LINKS.contains(&p.as_str())));
    s.anomalies.retain(|a| !a.contains(": d_ino "));
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
