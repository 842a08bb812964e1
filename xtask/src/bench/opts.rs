//! Command-line options of `cargo xtask bench`.

use super::system::System;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: cargo xtask bench [--quick] [--systems LIST] [--runs N] [--warmup N] [--out FILE]
                         [--workloads LIST] [--base DIR] [--timeout SECS]

Benchmarks layerfs against kernel overlayfs and fuse-overlayfs over the same lower layers, on a
journaled ext4 loop image, in a private mount namespace. Must run as root.

  --quick           about 1/10 of the data (10k files, 100 MiB file) and 3 runs: a few minutes
  --systems LIST    comma separated, column order; default layerfs,kernel,fuse-overlayfs,fuse-overlayfs-tuned
                    (also: layerfs-devfuse, layerfs with uring=off: requests over /dev/fuse;
                    layerfs-direct, layerfs with direct_read=64M: big lower files without the page cache;
                    layerfs-base, the binary given by --base-bin, for an interleaved A/B run)
                    (kernel is the reference of the ratios; a system whose probe mount fails is dropped)
  --runs N          measured rounds, interleaved, the order turned each round: A B C, B C A, ... (default 3)
  --warmup N        unrecorded rounds before them (default 1)
  --workloads LIST  comma separated workload names (default all; see the table in the output)
  --out FILE        markdown report (default docs/benchmarks.md in the workspace)
  --base DIR        image, data and raw results (default /var/tmp/layerfs-bench, or $LAYERFS_BENCH_BASE)
  --timeout SECS    per command (default 600)
  --halt-poll-ns N  set the vCPU halt-poll window (haltpoll cpuidle driver, machine-wide) to N for the
                    run and restore it afterwards; the report says so (default: unchanged)
  --layerfs-bin P   run this layerfs binary instead of building target/release/layerfs (e.g. a baseline)
  --nice N          run the bench (workloads and daemons alike) at this niceness, e.g. -10 on a machine
                    where others compile (default: unchanged)
  --report FILE     only print (and write to --out) the report of a raw results file
  --perf            also profile the layerfs daemon once per workload (perf record; an extra, unrecorded
                    run), into <base>/perf/<workload>.{data,txt}";

/// Parsed options.
#[derive(Clone, Debug)]
pub struct Opts {
    /// 1/10 scale data set.
    pub quick: bool,
    /// Systems in column order.
    pub systems: Vec<System>,
    /// Measured rounds per workload.
    pub runs: usize,
    /// Unrecorded rounds per workload before the measured ones.
    pub warmup: usize,
    /// Markdown report path (relative paths are relative to the workspace root).
    pub out: PathBuf,
    /// Workload names to run; empty = all.
    pub workloads: Vec<String>,
    /// Where the loop image, data and raw results live.
    pub base: PathBuf,
    /// Per-command timeout, seconds.
    pub timeout_secs: u64,
    /// A layerfs binary to use instead of the release build.
    pub layerfs_bin: Option<PathBuf>,
    /// The layerfs binary of the `layerfs-base` column (an A/B comparison in one interleaved run).
    pub base_bin: Option<PathBuf>,
    /// Profile the layerfs daemon once per workload.
    pub perf: bool,
    /// Niceness for the bench and everything it starts.
    pub nice: Option<i32>,
    /// Re-render this raw results file instead of running.
    pub report: Option<PathBuf>,
    /// vCPU halt-poll window for the run ([`super::host::HaltPoll`]).
    pub halt_poll_ns: Option<u64>,
}

impl Opts {
    /// Parses the arguments after `bench`.
    pub fn parse(args: &[String]) -> Result<Opts> {
        let mut quick = false;
        let mut systems = None;
        let mut runs = None;
        let mut warmup = 1;
        let mut out = PathBuf::from("docs/benchmarks.md");
        let mut workloads = Vec::new();
        let mut base = std::env::var_os("LAYERFS_BENCH_BASE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/layerfs-bench"));
        let mut timeout_secs = 600;
        let mut layerfs_bin = None;
        let mut base_bin = None;
        let mut perf = false;
        let mut nice = None;
        let mut report = None;
        let mut halt_poll_ns = None;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = || -> Result<String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .with_context(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag {
                "--quick" => quick = true,
                "--perf" => perf = true,
                "--report" => report = Some(PathBuf::from(value()?)),
                "--nice" => {
                    let v = value()?;
                    nice = Some(
                        v.parse()
                            .with_context(|| format!("--nice wants a number, got {v:?}"))?,
                    )
                }
                "--systems" => {
                    systems = Some(
                        value()?
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(System::parse)
                            .collect::<Result<Vec<_>>>()?,
                    )
                }
                "--runs" => runs = Some(number(flag, &value()?)?),
                "--warmup" => warmup = number(flag, &value()?)?,
                "--out" => out = PathBuf::from(value()?),
                "--workloads" => {
                    workloads = value()?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                }
                "--base" => base = PathBuf::from(value()?),
                "--layerfs-bin" => layerfs_bin = Some(std::path::absolute(value()?)?),
                "--base-bin" => base_bin = Some(std::path::absolute(value()?)?),
                "--timeout" => timeout_secs = number(flag, &value()?)? as u64,
                "--halt-poll-ns" => halt_poll_ns = Some(number(flag, &value()?)? as u64),
                _ => bail!("unknown argument {arg:?}\n{USAGE}"),
            }
        }
        let systems = systems.unwrap_or_else(|| System::ALL.to_vec());
        if systems.is_empty() {
            bail!("--systems is empty");
        }
        for (i, s) in systems.iter().enumerate() {
            if systems[..i].contains(s) {
                bail!("--systems names {} twice", s.name());
            }
        }
        if !base.is_absolute() {
            bail!("--base must be an absolute path");
        }
        if systems.contains(&System::LayerfsBase) != base_bin.is_some() {
            bail!("--systems layerfs-base and --base-bin BIN go together");
        }
        let runs = runs.unwrap_or(3);
        if runs == 0 {
            bail!("--runs must be at least 1");
        }
        Ok(Opts {
            quick,
            systems,
            runs,
            warmup,
            out,
            workloads,
            base,
            timeout_secs,
            layerfs_bin,
            base_bin,
            perf,
            nice,
            report,
            halt_poll_ns,
        })
    }
}

fn number(flag: &str, v: &str) -> Result<usize> {
    v.parse()
        .with_context(|| format!("{flag} wants a number, got {v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Opts> {
        Opts::parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_and_flags() -> Result<()> {
        let o = parse("")?;
        assert_eq!(o.systems, System::ALL.to_vec());
        assert_eq!((o.runs, o.warmup, o.quick), (3, 1, false));
        let o = parse("--quick --systems kernel,fuse-overlayfs --runs=5 --out x.md")?;
        assert_eq!(o.systems, vec![System::Kernel, System::FuseOverlayfs]);
        assert_eq!((o.runs, o.quick), (5, true));
        assert_eq!(o.out, PathBuf::from("x.md"));
        Ok(())
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse("--systems kernel,zfs").is_err());
        assert!(parse("--systems kernel,kernel").is_err());
        assert!(parse("--runs 0").is_err());
        assert!(parse("--runs").is_err());
        assert!(parse("--frobnicate").is_err());
    }
}
