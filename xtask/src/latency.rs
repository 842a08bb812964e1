//! `cargo xtask latency`: what one FUSE round trip costs on this machine, and how much of it is
//! the wake-up of a daemon thread on another CPU.
//!
//! One process stats `N` distinct names that exist (each a LOOKUP) and then `N` that do not (each a
//! negative LOOKUP) in a fresh mount, then reads an absent xattr of one file `10 × N` times (each
//! a GETXATTR: the bare round trip, the daemon's work being one `getxattrat`); the figure is the
//! mean time per call. Mounts: kernel
//! overlayfs (no round trip: the floor), layerfs with the scheduler placing daemon and caller
//! freely, both pinned to CPU 0, and daemon on CPU 0 with the caller on CPU 1; each layerfs setup
//! with requests from io_uring queues (the default where the kernel has them) and over `/dev/fuse`
//! (`-o uring=off`). Several rounds, interleaved; medians printed. Needs root and at least two CPUs; uses `taskset`.
//!
//! `cargo xtask latency [--n N] [--rounds R] [--base DIR] [--layerfs-bin PATH] [--halt-poll-ns NS]`
//! (`--halt-poll-ns`: the vCPU halt-poll window for the run, as in `cargo xtask bench`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::cmd::{self, q};

const USAGE: &str = "usage: cargo xtask latency [--n N] [--rounds R] [--base DIR] [--layerfs-bin PATH] \
                     [--halt-poll-ns NS]";

/// Where the daemon and the caller run.
#[derive(Clone, Copy)]
enum Setup {
    Kernel,
    Free,
    SameCpu,
    OtherCpu,
    FreeDev,
    SameCpuDev,
    OtherCpuDev,
}

impl Setup {
    const ALL: [Setup; 7] = [
        Setup::Kernel,
        Setup::Free,
        Setup::SameCpu,
        Setup::OtherCpu,
        Setup::FreeDev,
        Setup::SameCpuDev,
        Setup::OtherCpuDev,
    ];

    fn name(self) -> &'static str {
        match self {
            Setup::Kernel => "kernel overlayfs",
            Setup::Free => "layerfs, placed by the scheduler",
            Setup::SameCpu => "layerfs, daemon and caller on CPU 0",
            Setup::OtherCpu => "layerfs, daemon on CPU 0, caller on CPU 1",
            Setup::FreeDev => "layerfs uring=off, placed by the scheduler",
            Setup::SameCpuDev => "layerfs uring=off, daemon and caller on CPU 0",
            Setup::OtherCpuDev => "layerfs uring=off, daemon on CPU 0, caller on CPU 1",
        }
    }

    /// Requests over `/dev/fuse` rather than io_uring queues.
    fn dev_fuse(self) -> bool {
        matches!(
            self,
            Setup::FreeDev | Setup::SameCpuDev | Setup::OtherCpuDev
        )
    }

    /// (daemon CPU, caller CPU)
    fn cpus(self) -> (Option<u32>, Option<u32>) {
        match self {
            Setup::Kernel | Setup::Free | Setup::FreeDev => (None, None),
            Setup::SameCpu | Setup::SameCpuDev => (Some(0), Some(0)),
            Setup::OtherCpu | Setup::OtherCpuDev => (Some(0), Some(1)),
        }
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let mut n = 2000usize;
    let mut rounds = 5usize;
    let mut base = PathBuf::from("/var/tmp/layerfs-latency");
    let mut bin = None;
    let mut halt_poll = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--n" => n = value()?.parse().context("--n")?,
            "--rounds" => rounds = value()?.parse().context("--rounds")?,
            "--base" => base = PathBuf::from(value()?),
            "--layerfs-bin" => bin = Some(std::path::absolute(value()?)?),
            "--halt-poll-ns" => halt_poll = Some(value()?.parse().context("--halt-poll-ns")?),
            _ => bail!("unknown argument {a:?}\n{USAGE}"),
        }
    }
    if !crate::bench::is_root() {
        bail!("latency: needs root (it mounts)");
    }
    if std::thread::available_parallelism().map_or(1, |p| p.get()) < 2 {
        bail!("latency: needs at least two CPUs");
    }
    let bin = match bin {
        Some(b) => b,
        None => crate::bench::host::build_layerfs(&crate::bench::workspace_root())?,
    };
    let _halt_poll = halt_poll
        .map(crate::bench::host::HaltPoll::set)
        .transpose()?;
    let lower = base.join("lower");
    if !lower.join("d").join(format!("f{}", n - 1)).exists() {
        std::fs::create_dir_all(lower.join("d"))?;
        for i in 0..n {
            std::fs::write(lower.join("d").join(format!("f{i}")), b"x")?;
        }
    }
    let me = std::env::current_exe()?;
    let mut results: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); Setup::ALL.len()];
    for _ in 0..rounds {
        for (i, setup) in Setup::ALL.into_iter().enumerate() {
            results[i].push(one(setup, &bin, &me, &base, n)?);
        }
    }
    println!(
        "stat of {n} existing and {n} missing names, then {reads} reads of an absent xattr, one process, fresh mount; median of {rounds} rounds (µs per call); \
         guest_halt_poll_ns: {halt}",
        reads = n * XATTR_READS,
        halt = crate::bench::host::halt_poll_ns().map_or("-".to_string(), |ns| ns.to_string()),
    );
    println!("| setup | existing | missing | getxattr |\n|---|---|---|---|");
    for (setup, r) in Setup::ALL.into_iter().zip(&results) {
        let med = |f: fn(&(f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = r.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.1} |",
            setup.name(),
            med(|x| x.0),
            med(|x| x.1),
            med(|x| x.2)
        );
    }
    Ok(())
}

/// One measurement: mounts, runs the probe with the setup's CPUs, unmounts.
fn one(setup: Setup, bin: &Path, me: &Path, base: &Path, n: usize) -> Result<(f64, f64, f64)> {
    let t = Duration::from_secs(60);
    let (upper, work, mnt) = (base.join("upper"), base.join("work"), base.join("mnt"));
    for d in [&upper, &work] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d)?;
    }
    std::fs::create_dir_all(&mnt)?;
    let lower = base.join("lower");
    let mount = match setup {
        Setup::Kernel => format!(
            "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}",
            q(&lower),
            q(&upper),
            q(&work),
            q(&mnt)
        ),
        _ => format!(
            "{} mount --lower {} --upper {} --work {}{} {}",
            q(bin),
            q(&lower),
            q(&upper),
            q(&work),
            if setup.dev_fuse() {
                " -o uring=off"
            } else {
                ""
            },
            q(&mnt)
        ),
    };
    cmd::sh(&mount, t)?;
    let (daemon_cpu, caller_cpu) = setup.cpus();
    let result = (|| {
        if let Some(cpu) = daemon_cpu {
            let pid = cmd::sh(&format!("pgrep -f -- ' {}$' | head -1", q(&mnt)), t)?.stdout;
            let pid = pid.trim().to_string();
            cmd::sh(&format!("taskset -a -p -c {cpu} {pid} > /dev/null"), t)?;
        }
        let mut c = match caller_cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(me);
                c
            }
            None => Command::new(me),
        };
        c.arg("latency-probe").arg(&mnt).arg(n.to_string());
        let out = cmd::run(&mut c, "latency probe", t)?;
        let text = out.stdout;
        let mut nums = text.split_whitespace().map(str::parse::<f64>);
        match (nums.next(), nums.next(), nums.next()) {
            (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => Ok((a, b, c)),
            _ => bail!("latency probe printed {text:?}"),
        }
    })();
    cmd::sh(&format!("umount {}", q(&mnt)), t)?;
    result
}

/// Reads of an absent xattr per name of the stat rounds.
const XATTR_READS: usize = 10;

/// `xtask latency-probe MNT N`: stats `MNT/d/f0..N` then `MNT/d/g0..N`, then reads the absent
/// xattr `user.absent` of `MNT/d/f0` `10 × N` times; prints µs per call of each.
pub fn probe(args: &[String]) -> Result<()> {
    let (Some(mnt), Some(n)) = (args.first(), args.get(1)) else {
        bail!("usage: xtask latency-probe MNT N");
    };
    let n: usize = n.parse()?;
    let dir = Path::new(mnt).join("d");
    let per = |prefix: &str| {
        let start = Instant::now();
        for i in 0..n {
            let _ = std::fs::symlink_metadata(dir.join(format!("{prefix}{i}")));
        }
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    let existing = per("f");
    let missing = per("g");
    let dirf = std::fs::File::open(&dir)?;
    let f0 = layerfs_sys::Component::new(std::ffi::OsStr::new("f0"))?;
    let name = std::ffi::OsStr::new("user.absent");
    let reads = n * XATTR_READS;
    let start = Instant::now();
    for _ in 0..reads {
        let _ = layerfs_sys::xattr::get_at(std::os::fd::AsFd::as_fd(&dirf), &f0, name);
    }
    let getxattr = start.elapsed().as_secs_f64() * 1e6 / reads as f64;
    println!("{existing:.2} {missing:.2} {getxattr:.2}");
    Ok(())
}
