//! `cargo xtask bench`: layerfs against kernel overlayfs and fuse-overlayfs, over the same lower layers.
//!
//! Outside (as invoked): install the missing tools, build layerfs in release, then re-run this program in a
//! private mount namespace (`unshare -m --propagation private`), so that no other process can capture a bench
//! mount (a captured FUSE mount keeps its daemon alive after our unmount). Inside: take `<base>/lock`, mount
//! the ext4 loop image, build the data set once, drop every system whose probe mount fails, then for each
//! workload run the rounds interleaved, the order turned by one each round (A B C, B C A, C A B, ...),
//! each run on a fresh mount with fresh upper and work
//! dirs and the lower data re-warmed, and write the markdown report (and raw JSON under `<base>/results`).
//!
//! Request-count hook: if `layerfs stats MNT` exits 0, its output is recorded before and after each layerfs
//! run and the counter deltas are tabled (see docs/bench-request-guard.md).

pub mod cmd;
mod data;
pub mod host;
mod opts;
mod profile;
mod report;
mod results;
mod system;
mod tables;
mod workload;

use anyhow::{Context, Result, bail};
use data::{Data, Shape};
use opts::Opts;
use report::Record;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use system::{Bins, Mount, RunDirs, System};
use workload::{Ctx, Workload};

/// Set in the environment of the re-executed bench, inside the private mount namespace.
const NS_ENV: &str = "LAYERFS_BENCH_NS";

/// Size of the loop image when it is first created.
const IMAGE_SIZE: &str = "16G";

/// Set by the first Ctrl-C: finish the current run, unmount, write a partial report.
static STOP: AtomicBool = AtomicBool::new(false);

/// Runs repeated at most this often when another process drops the page cache during them.
const RETRIES: usize = 2;

/// Entry point: `args` are the arguments after `bench`.
pub fn main(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("__op") {
        return workload::op_main(&args[1..]);
    }
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{}", opts::USAGE);
        return Ok(());
    }
    let opts = Opts::parse(args)?;
    if let Some(file) = &opts.report {
        let r = results::load(file)?;
        let md = report::markdown(&r.header, &r.systems, r.runs, &r.records);
        return write_report(&opts, &workspace_root(), &md);
    }
    select_workloads(&opts)?;
    if !is_root() {
        bail!("cargo xtask bench must run as root (mounts, loop devices)");
    }
    let workspace = workspace_root();
    if std::env::var_os(NS_ENV).is_some() {
        return inside(&opts, &workspace);
    }
    host::ensure_packages()?;
    if opts.systems.iter().any(|s| s.is_layerfs()) && opts.layerfs_bin.is_none() {
        host::build_layerfs(&workspace)?;
    }
    // The inner bench handles Ctrl-C; this one waits for it.
    let _ = ctrlc::set_handler(|| {});
    // This very binary through /proc (the file may be rebuilt while the bench builds layerfs).
    let exe = format!("/proc/{}/exe", std::process::id());
    let status = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(exe)
        .arg("bench")
        .args(args)
        .env(NS_ENV, "1")
        .status()
        .context("cannot run unshare")?;
    if !status.success() {
        bail!("bench failed ({status})");
    }
    Ok(())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

fn now(fmt: &str) -> String {
    cmd::sh_quiet(&format!("date -u +{}", cmd::q(fmt)))
}

/// The run, inside the private mount namespace.
fn inside(opts: &Opts, workspace: &Path) -> Result<()> {
    std::fs::create_dir_all(&opts.base)
        .with_context(|| format!("mkdir {}", opts.base.display()))?;
    let lock = File::create(opts.base.join("lock"))?;
    if lock.try_lock().is_err() {
        eprintln!(
            "bench: waiting for another bench run ({})",
            opts.base.join("lock").display()
        );
        lock.lock()?;
    }
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("bench: second interrupt: exiting now (the next run reaps what is left)");
            host::restore_halt_poll();
            std::process::exit(130);
        }
        eprintln!(
            "bench: interrupted: stopping after the current run (Ctrl-C again to exit at once)"
        );
    });
    reap_orphans(&opts.base.join("fs/run"));
    if let Some(n) = opts.nice {
        // Inherited by every command and daemon started from here on, so all systems get the same.
        cmd::sh(
            &format!("renice -n {n} -p {}", std::process::id()),
            Duration::from_secs(10),
        )?;
    }
    let _halt_poll = opts.halt_poll_ns.map(host::HaltPoll::set).transpose()?;
    let fs = host::LoopFs::up(&opts.base, IMAGE_SIZE)?;
    let data = Data::new(
        &fs.mnt,
        if opts.quick {
            Shape::QUICK
        } else {
            Shape::FULL
        },
    );
    std::fs::create_dir_all(fs.mnt.join("data"))?;
    data.ensure(&fs.mnt.join("data"))?;
    let run_root = fs.mnt.join("run");
    system::remove_inside(&run_root, &fs.mnt)?;
    let logs = opts.base.join("logs");
    std::fs::create_dir_all(&logs)?;
    let bins = Bins {
        layerfs: opts.layerfs_bin.clone().unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join("target"))
                .join("release/layerfs")
        }),
        base: opts.base_bin.clone(),
    };
    let timeout = Duration::from_secs(opts.timeout_secs);
    let workloads = select_workloads(opts)?;
    let systems = probe(opts, &bins, &data, &run_root, &logs);
    if systems.is_empty() {
        bail!("no system could be mounted (logs in {})", logs.display());
    }
    if !systems.contains(&System::Kernel) {
        eprintln!("bench: kernel overlayfs is not among the systems: no ratios");
    }
    let mut header = vec![
        "# layerfs benchmarks".to_string(),
        String::new(),
        format!(
            "`cargo xtask bench{}` — {} UTC, {} data set ({} files in {} dirs, {}-entry dir, {} MiB file, \
             {} thin layers), {} measured round(s) after {} warm-up round(s){}.",
            std::env::args()
                .skip(2)
                .map(|a| format!(" {a}"))
                .collect::<String>(),
            now("%Y-%m-%d %H:%M"),
            data.shape.name,
            data.shape.nfiles(),
            data.shape.nleaf(),
            data.shape.nbigdir,
            data.shape.big_mib,
            data.shape.nlayers,
            opts.runs,
            opts.warmup,
            opts.nice.map(|n| format!(", niceness {n}")).unwrap_or_default(),
        ),
        String::new(),
        "Reproduce (as root): `cargo xtask bench` (full size) or `cargo xtask bench --quick`; raw numbers per run \
         in `<base>/results/*.json`; how it works: `xtask/src/bench.rs`."
            .to_string(),
        String::new(),
    ];
    header.extend(host::describe(
        &fs,
        workspace,
        systems
            .iter()
            .any(|s| s.is_layerfs())
            .then_some(bins.layerfs.as_path()),
    ));
    let env = RunEnv {
        data: &data,
        bins: &bins,
        run_root: &run_root,
        logs: &logs,
        timeout,
    };
    let perf_dir = opts.base.join("perf");
    let mut profiles = Vec::new();
    let results = opts.base.join("results");
    std::fs::create_dir_all(&results)?;
    let raw = results.join(format!("bench-{}.json", now("%Y%m%d-%H%M%S")));
    let save = |header: &[String], records: &[Record]| -> Result<()> {
        let text =
            serde_json::to_string_pretty(&results::to_json(header, &systems, opts.runs, records))?;
        std::fs::write(&raw, text).with_context(|| format!("write {}", raw.display()))
    };
    let mut records = Vec::new();
    'all: for w in &workloads {
        for round in (1..=opts.warmup + opts.runs).map(|r| r as isize - opts.warmup as isize) {
            // The order turns by one each round (A B C, B C A, C A B, ...): the system that runs
            // first after the previous round's last one does not pay for its leftovers every
            // time (the first `seq-write` of a round was 1.4-3× slower, most likely while the
            // 1 GiB file of the round before was being freed).
            let turn = round.rem_euclid(systems.len().max(1) as isize) as usize;
            let order = systems[turn..].iter().chain(&systems[..turn]);
            for &sys in order {
                if STOP.load(Ordering::SeqCst) {
                    header.push("- **interrupted**: partial results".to_string());
                    break 'all;
                }
                if opts.perf && round == 1 && sys == System::Layerfs {
                    match env.profile(w, &perf_dir) {
                        Ok(p) => profiles.push((w.name, p)),
                        Err(e) => eprintln!("bench: profiling {} failed: {e:#}", w.name),
                    }
                }
                let rec = env.run_one(sys, w, round.max(0) as usize);
                progress(&rec, round);
                if round > 0 {
                    records.push(rec);
                }
            }
        }
        save(&header, &records)?;
    }
    header.push(format!("- load average at end: {}", host::loadavg()));
    let mut md = report::markdown(&header, &systems, opts.runs, &records);
    md.push_str(&tables::profiles(&profiles));
    save(&header, &records)?;
    eprintln!("bench: raw results in {}", raw.display());
    write_report(opts, workspace, &md)?;
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted: the report above is partial");
    }
    Ok(())
}

/// Writes the markdown to `--out` (relative to the workspace) and prints it.
fn write_report(opts: &Opts, workspace: &Path, md: &str) -> Result<()> {
    let out = if opts.out.is_absolute() {
        opts.out.clone()
    } else {
        workspace.join(&opts.out)
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, md).with_context(|| format!("write {}", out.display()))?;
    println!("{md}");
    eprintln!("bench: report in {}", out.display());
    Ok(())
}

/// The workloads `--workloads` names (all by default), in report order.
fn select_workloads(opts: &Opts) -> Result<Vec<Workload>> {
    let known: Vec<&str> = workload::all().iter().map(|w| w.name).collect();
    if let Some(n) = opts.workloads.iter().find(|n| !known.contains(&n.as_str())) {
        bail!("unknown workload {n:?} (known: {})", known.join(", "));
    }
    // The volatile copy-up is compared with the kernel's ordinary copy-up: select that too.
    let wanted = |name: &str| {
        opts.workloads.is_empty()
            || opts.workloads.iter().any(|n| n == name)
            || (name == "copy-up" && opts.workloads.iter().any(|n| n == "copy-up-volatile"))
    };
    Ok(workload::all()
        .into_iter()
        .filter(|w| wanted(w.name))
        .collect())
}

/// Ends FUSE daemons left by a bench that was killed (their command line names our run dir): after we
/// took the lock, no live bench uses that dir.
fn reap_orphans(run_root: &Path) {
    let root = run_root.to_string_lossy();
    for pid in cmd::fuse_holders() {
        if cmd::cmdline(pid).contains(&*root) {
            eprintln!(
                "bench: ending daemon {pid} left by an earlier bench: {}",
                cmd::cmdline(pid)
            );
            cmd::kill(pid, "TERM");
        }
    }
}

/// Keeps the systems that mount and unmount cleanly over the two-layer stack.
fn probe(opts: &Opts, bins: &Bins, data: &Data, run_root: &Path, logs: &Path) -> Vec<System> {
    let mut ok = Vec::new();
    for &sys in &opts.systems {
        let dirs = RunDirs::new(run_root, sys);
        let lowers = lowers(data, data::Stack::Two);
        let r = dirs
            .reset(run_root)
            .and_then(|()| Mount::start(sys, bins, &lowers, &dirs, false, &log_path(logs, sys)))
            .and_then(Mount::unmount)
            .and_then(|()| system::remove_inside(&dirs.dir, run_root));
        match r {
            Ok(()) => ok.push(sys),
            Err(e) => eprintln!(
                "bench: WARNING: dropping {}: probe mount failed: {e:#}",
                sys.name()
            ),
        }
    }
    ok
}

fn lowers(data: &Data, stack: data::Stack) -> String {
    data.lowers(stack)
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

fn log_path(logs: &Path, sys: System) -> PathBuf {
    logs.join(format!("{}.log", sys.name()))
}

fn progress(r: &Record, round: isize) {
    let mut line = format!(
        "{} {:<17} {:<7} {:<21}",
        now("%H:%M:%S"),
        r.workload,
        if round > 0 {
            format!("r{round}")
        } else {
            "warmup".into()
        },
        r.sys.name()
    );
    for (m, v) in &r.metrics {
        line.push_str(&format!(" {m}={v:.3}s"));
    }
    if let Some(u) = r.usage {
        line.push_str(&format!(
            "  [daemon {:.1} MiB, cpu {:.2} s]",
            u.hwm_mib, u.cpu_secs
        ));
    }
    if let Some(e) = &r.error {
        line.push_str(&format!("  ERROR {e}"));
    }
    if !r.checks.is_empty() {
        line.push_str(&format!("  CHECK {}", r.checks.join("; ")));
    }
    eprintln!("{line}");
}

/// What every run needs.
struct RunEnv<'a> {
    data: &'a Data,
    bins: &'a Bins,
    run_root: &'a Path,
    logs: &'a Path,
    timeout: Duration,
}

impl RunEnv<'_> {
    /// One measured (or warm-up, `round` 0) run of `w` on `sys`; failures are recorded, not returned.
    fn run_one(&self, sys: System, w: &Workload, round: usize) -> Record {
        let mut rec = Record::new(w.name, round, sys);
        loop {
            let drops = drop_count();
            let result = self.try_run(sys, w, &mut rec, None);
            if drop_count() != drops && rec.disturbed < RETRIES {
                rec.disturbed += 1;
                eprintln!("bench: page cache dropped by someone else during the run: repeating it");
                std::thread::sleep(Duration::from_secs(2));
                continue;
            }
            if let Err(e) = result {
                rec.error = Some(format!("{e:#}"));
            }
            return rec;
        }
    }

    /// An extra, unrecorded run of `w` on layerfs under `perf record`; returns the summary file.
    fn profile(&self, w: &Workload, dir: &Path) -> Result<PathBuf> {
        let mut rec = Record::new(w.name, 0, System::Layerfs);
        let mut summary = None;
        self.try_run(System::Layerfs, w, &mut rec, Some((dir, &mut summary)))?;
        let summary = summary.context("no daemon to profile")?;
        eprintln!(
            "bench: profile of {} on layerfs: {}",
            w.name,
            summary.display()
        );
        Ok(summary)
    }

    fn try_run(
        &self,
        sys: System,
        w: &Workload,
        rec: &mut Record,
        profile: Option<(&Path, &mut Option<PathBuf>)>,
    ) -> Result<()> {
        rec.metrics.clear();
        rec.checks.clear();
        rec.usage = None;
        rec.stats = None;
        let dirs = RunDirs::new(self.run_root, sys);
        dirs.reset(self.run_root)?;
        let warm = workload::rewarm(self.data, w)?;
        if warm > 10.0 {
            eprintln!("bench: re-warming for {} took {warm:.1} s", w.name);
        }
        let lowers = lowers(self.data, w.stack);
        let mount = Mount::start(
            sys,
            self.bins,
            &lowers,
            &dirs,
            w.volatile,
            &log_path(self.logs, sys),
        )?;
        rec.mount_secs = mount.mount_secs;
        let before = mount.request_stats(self.bins);
        let ctx = Ctx {
            mnt: &mount.mnt,
            data: self.data,
            timeout: self.timeout,
            checks: Default::default(),
        };
        let recording = match (&profile, mount.daemon) {
            (Some((dir, _)), Some(pid)) => Some(profile::start(dir, w.name, pid)?),
            _ => None,
        };
        let result = (w.run)(&ctx);
        if let (Some(r), Some((_, out))) = (recording, profile) {
            *out = Some(r.finish()?);
        }
        rec.checks = ctx.checks.take();
        rec.usage = mount.usage();
        if let (Some(b), Some(a)) = (before, mount.request_stats(self.bins)) {
            rec.stats = Some((b, a));
        }
        mount.unmount()?;
        rec.metrics = result?;
        system::remove_inside(&dirs.dir, self.run_root)
    }
}

/// How often the page cache has been dropped (`echo 1|3 > drop_caches`) since boot; the bench never does.
fn drop_count() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("drop_pagecache "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
