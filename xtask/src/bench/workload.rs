//! The workloads, what each re-warms before it runs, and the in-process micro-operations (`__op`).
//!
//! Each workload runs on a fresh mount with the lower data in the page cache (re-read right before every
//! run: this VM reclaims page cache that sits idle, and other users may drop caches), so the figures compare
//! the overlay's own overhead, not the disk. Every workload returns one or more named metrics in seconds.

use super::cmd::{self, q};
use super::data::{Data, Stack};
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What a workload run measured: (metric, seconds) pairs.
pub type Metrics = Vec<(&'static str, f64)>;

/// What a workload needs in the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warm {
    /// The big file.
    Big,
    /// Every file of the stack's lower layers (tree, big dir, thin layers).
    Layers,
    /// The untar archive.
    CreateTar,
}

/// One workload: runs on a fresh mount of `stack`.
pub struct Workload {
    /// Name used by `--workloads` (the metric names it produces may differ).
    pub name: &'static str,
    /// Which lower layers to mount.
    pub stack: Stack,
    /// Mount with the systems' `volatile` option.
    pub volatile: bool,
    /// What to re-warm before each run.
    pub warm: &'static [Warm],
    /// Measures; returns (metric, seconds) pairs.
    pub run: fn(&Ctx) -> Result<Metrics>,
}

/// What a workload run sees.
pub struct Ctx<'a> {
    /// The mount point.
    pub mnt: &'a Path,
    /// The data set.
    pub data: &'a Data,
    /// Per-command timeout.
    pub timeout: Duration,
    /// Mismatches found by the workload (wrong counts): reported, the figure is kept.
    pub checks: std::cell::RefCell<Vec<String>>,
}

impl Ctx<'_> {
    fn sh(&self, script: &str) -> Result<cmd::Ran> {
        cmd::sh(script, self.timeout)
    }
    fn m(&self) -> String {
        q(self.mnt)
    }
    fn check(&self, what: &str, got: usize, want: usize) {
        if got != want {
            self.checks
                .borrow_mut()
                .push(format!("{what}: got {got}, want {want}"));
        }
    }
    /// Runs a micro-operation in a child process (time-bounded, so a hung mount cannot hang the bench).
    fn op(&self, op: &str, list: &Path) -> Result<OpResult> {
        // This very binary, even if a rebuild has replaced the file since the bench started.
        let mut c = Command::new("/proc/self/exe");
        c.args(["bench", "__op", op])
            .arg(self.mnt)
            .arg(list)
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0");
        let out = cmd::run(&mut c, &format!("__op {op}"), self.timeout)?.stdout;
        let f: Vec<&str> = out.split_whitespace().collect();
        let num = |i: usize| -> Result<f64> {
            f.get(i)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("bad __op output {out:?}"))
        };
        Ok(OpResult {
            secs: num(0)?,
            ok: num(1)? as usize,
            failed: num(2)? as usize,
            first_error: f.get(3..).map(|w| w.join(" ")).unwrap_or_default(),
        })
    }
}

struct OpResult {
    secs: f64,
    ok: usize,
    failed: usize,
    /// The first unexpected error, if any.
    first_error: String,
}

/// All workloads, in report order.
pub fn all() -> Vec<Workload> {
    use Stack::*;
    use Warm::*;
    let w = |name, stack, volatile, warm, run| Workload {
        name,
        stack,
        volatile,
        warm,
        run,
    };
    vec![
        w("seq-read", Two, false, &[Big], seq_read),
        w("rand-read", Two, false, &[Big], rand_read),
        w("seq-write", Two, false, &[], seq_write),
        w("find", Two, false, &[Layers], find),
        w("stat-all", Two, false, &[Layers], stat_all),
        w("ls-f", Two, false, &[Layers], ls_f),
        w("ls-l", Two, false, &[Layers], ls_l),
        w("tar-read", Two, false, &[Layers], tar_read),
        w("copy-up", Two, false, &[Layers], copy_up),
        w("copy-up-volatile", Two, true, &[Layers], copy_up_volatile),
        w("untar-rm", Two, false, &[CreateTar], untar_rm),
        w("stat-bottom", Two, false, &[Layers], stat_bottom),
        w("stat-missing", Two, false, &[Layers], stat_missing),
        w("layers50-find", Many, false, &[Layers], find_many),
        w("layers50-stat", Many, false, &[Layers], stat_bottom_many),
        w(
            "layers50-missing",
            Many,
            false,
            &[Layers],
            stat_missing_many,
        ),
    ]
}

/// Re-reads what `w` needs into the page cache; returns the seconds it took.
pub fn rewarm(data: &Data, w: &Workload) -> Result<f64> {
    let t0 = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    for warm in w.warm {
        match warm {
            Warm::Big => read_all(&data.l1().join(Data::BIG), &mut buf)?,
            Warm::Layers => {
                for root in data.layer_roots(w.stack) {
                    read_tree(&root, &mut buf)?;
                }
            }
            Warm::CreateTar => read_all(&data.create_tar(), &mut buf)?,
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

fn read_all(p: &Path, buf: &mut [u8]) -> Result<()> {
    let mut f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    while f.read(buf)? > 0 {}
    Ok(())
}

/// Stats every entry and reads every regular file below `root` (skipping the big file: [`Warm::Big`]).
fn read_tree(root: &Path, buf: &mut [u8]) -> Result<()> {
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("readdir {}", dir.display()))? {
            let e = e?;
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p)?;
            if meta.is_dir() {
                if p.file_name().is_some_and(|n| n != "big") {
                    stack.push(p);
                }
            } else if meta.is_file() && meta.len() > 0 {
                read_all(&p, buf)?;
            }
        }
    }
    Ok(())
}

fn seq_read(c: &Ctx) -> Result<Metrics> {
    let dd = format!(
        "dd if={}/{} of=/dev/null bs=1M status=none",
        c.m(),
        Data::BIG
    );
    let first = c.sh(&dd)?.secs;
    let again = c.sh(&dd)?.secs;
    Ok(vec![("seq-read", first), ("seq-read-again", again)])
}

fn rand_read(c: &Ctx) -> Result<Metrics> {
    // A quarter of the file in distinct random 4 KiB blocks (fio's random map, fixed seed).
    let size = c.data.shape.big_mib << 20;
    let out = c
        .sh(&format!(
            "fio --name=rr --filename={}/{} --readonly --rw=randread --bs=4k --ioengine=psync \
             --invalidate=0 --size={size} --io_size={} --randrepeat=1 --output-format=json",
            c.m(),
            Data::BIG,
            size / 4
        ))?
        .stdout;
    let json: serde_json::Value =
        serde_json::from_str(&out[out.find('{').context("fio: no json")?..]).context("fio json")?;
    let read = &json["jobs"][0]["read"];
    let ios = read["total_ios"].as_f64().context("fio: total_ios")?;
    let iops = read["iops"].as_f64().context("fio: iops")?;
    c.check("rand-read ios", ios as usize, size / 4 / 4096);
    if iops <= 0.0 {
        bail!("fio reported {iops} IOPS");
    }
    Ok(vec![("rand-read", ios / iops)])
}

fn seq_write(c: &Ctx) -> Result<Metrics> {
    let t = c
        .sh(&format!(
            "dd if=/dev/zero of={}/seqw.bin bs=1M count={} conv=fsync status=none",
            c.m(),
            c.data.shape.big_mib
        ))?
        .secs;
    Ok(vec![("seq-write", t)])
}

fn count_find(c: &Ctx, metric: &'static str, want: usize) -> Result<Metrics> {
    let r = c.sh(&format!("find {}/tree -type f | wc -l", c.m()))?;
    c.check(metric, r.stdout.trim().parse().unwrap_or(0), want);
    Ok(vec![(metric, r.secs)])
}

fn find(c: &Ctx) -> Result<Metrics> {
    count_find(c, "find", c.data.shape.nfiles())
}

fn find_many(c: &Ctx) -> Result<Metrics> {
    count_find(c, "layers50-find", c.data.shape.nfiles_layers())
}

fn stat_all(c: &Ctx) -> Result<Metrics> {
    Ok(vec![(
        "stat-all",
        c.sh(&format!("du -s {}/tree >/dev/null", c.m()))?.secs,
    )])
}

fn ls_f(c: &Ctx) -> Result<Metrics> {
    let r = c.sh(&format!("ls -f {}/bigdir | wc -l", c.m()))?;
    c.check(
        "ls-f entries",
        r.stdout.trim().parse().unwrap_or(0),
        c.data.shape.nbigdir + 2,
    );
    Ok(vec![("ls-f", r.secs)])
}

fn ls_l(c: &Ctx) -> Result<Metrics> {
    Ok(vec![(
        "ls-l",
        c.sh(&format!("ls -l {}/bigdir >/dev/null", c.m()))?.secs,
    )])
}

fn tar_read(c: &Ctx) -> Result<Metrics> {
    // Into a pipe: GNU tar does not read file contents when writing to /dev/null.
    Ok(vec![(
        "tar-read",
        c.sh(&format!("tar cf - -C {} tree | wc -c", c.m()))?.secs,
    )])
}

fn append(c: &Ctx, metric: &'static str) -> Result<Metrics> {
    let r = c.op("append", &c.data.list("copyup"))?;
    if r.failed > 0 {
        c.checks.borrow_mut().push(format!(
            "{metric}: {} of {} appends failed, first: {}",
            r.failed,
            r.failed + r.ok,
            r.first_error
        ));
    }
    c.check(&format!("{metric} files"), r.ok, c.data.shape.nfiles() / 10);
    Ok(vec![(metric, r.secs)])
}

fn copy_up(c: &Ctx) -> Result<Metrics> {
    append(c, "copy-up")
}

fn copy_up_volatile(c: &Ctx) -> Result<Metrics> {
    append(c, "copy-up-volatile")
}

fn untar_rm(c: &Ctx) -> Result<Metrics> {
    let untar = c.sh(&format!("tar xf {} -C {}", q(c.data.create_tar()), c.m()))?;
    let n = c.sh(&format!("find {}/ctree -type f | wc -l", c.m()))?;
    c.check(
        "untar files",
        n.stdout.trim().parse().unwrap_or(0),
        c.data.shape.ncreate(),
    );
    let rm = c.sh(&format!("rm -rf {}/ctree", c.m()))?;
    Ok(vec![("untar", untar.secs), ("rm-rf", rm.secs)])
}

fn stat_list(c: &Ctx, list: &str, metric: &'static str, exist: bool) -> Result<Metrics> {
    let r = c.op("stat", &c.data.list(list))?;
    let n = c.data.shape.nfiles() / 10;
    c.check(&format!("{metric} found"), r.ok, if exist { n } else { 0 });
    c.check(
        &format!("{metric} missing"),
        r.failed,
        if exist { 0 } else { n },
    );
    Ok(vec![(metric, r.secs)])
}

fn stat_bottom(c: &Ctx) -> Result<Metrics> {
    stat_list(c, "bottom", "stat-bottom", true)
}
fn stat_missing(c: &Ctx) -> Result<Metrics> {
    stat_list(c, "neg", "stat-missing", false)
}
fn stat_bottom_many(c: &Ctx) -> Result<Metrics> {
    stat_list(c, "bottom", "layers50-stat", true)
}
fn stat_missing_many(c: &Ctx) -> Result<Metrics> {
    stat_list(c, "neg", "layers50-missing", false)
}

/// `xtask bench __op stat|append ROOT LIST`: prints "SECONDS OK FAILED [FIRST ERROR]".
///
/// `stat`: lstat every listed path (FAILED = ENOENT). `append`: open O_APPEND, write one byte, close (the
/// first write to a lower file: a copy-up).
pub fn op_main(args: &[String]) -> Result<()> {
    let [op, root, list] = args else {
        bail!("usage: __op stat|append ROOT LIST");
    };
    let root = PathBuf::from(root);
    let paths: Vec<PathBuf> = std::fs::read_to_string(list)
        .with_context(|| format!("read {list}"))?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| root.join(l))
        .collect();
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut first_error = String::new();
    let t0 = Instant::now();
    match op.as_str() {
        "stat" => {
            for p in &paths {
                match std::fs::symlink_metadata(p) {
                    Ok(_) => ok += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => failed += 1,
                    Err(e) => bail!("lstat {}: {e}", p.display()),
                }
            }
        }
        "append" => {
            for p in &paths {
                let r = std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, b"x"));
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        if failed == 0 {
                            first_error = format!("{}: {e}", p.display());
                        }
                        failed += 1;
                    }
                }
            }
        }
        _ => bail!("unknown __op {op}"),
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("{secs:.9} {ok} {failed} {first_error}");
    Ok(())
}
