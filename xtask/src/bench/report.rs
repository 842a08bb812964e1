//! Results: one [`Record`] per (workload, round, system) run, aggregated into the markdown report.
//!
//! A cell is the median over the measured rounds; the ratio is the median over the rounds of the same-round
//! ratio to the kernel's reference metric (the same metric, except for the volatile copy-up, which the issue
//! compares with the kernel's ordinary, fsync'd copy-up). The secondary tables (daemon usage, request
//! counters, failures ...) are in `tables.rs`.

use super::cmd::Usage;
use super::system::System;
use super::tables::{daemon_table, failures, flatness_table, noise_line, request_table};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// One run of one workload on one system.
#[derive(Clone, Debug)]
pub struct Record {
    /// Workload name.
    pub workload: &'static str,
    /// Round number (1-based, measured rounds only).
    pub round: usize,
    /// The system.
    pub sys: System,
    /// (metric, seconds).
    pub metrics: Vec<(&'static str, f64)>,
    /// Seconds to mount.
    pub mount_secs: f64,
    /// FUSE daemon usage just before unmount.
    pub usage: Option<Usage>,
    /// `layerfs stats` before and after the workload (the request-count hook).
    pub stats: Option<(String, String)>,
    /// Why the run failed.
    pub error: Option<String>,
    /// Count mismatches.
    pub checks: Vec<String>,
    /// Runs thrown away because someone else dropped the page cache during them.
    pub disturbed: usize,
}

impl Record {
    /// A record with no result yet.
    pub fn new(workload: &'static str, round: usize, sys: System) -> Record {
        Record {
            workload,
            round,
            sys,
            metrics: Vec::new(),
            mount_secs: 0.0,
            usage: None,
            stats: None,
            error: None,
            checks: Vec::new(),
            disturbed: 0,
        }
    }
}

/// A row of the main table: metric, target from the issue, what it does, reference metric for the ratio.
struct Row {
    metric: &'static str,
    target: &'static str,
    what: &'static str,
    reference: &'static str,
}

const ROWS: &[Row] = &[
    row(
        "seq-read",
        "≤ 1.05×",
        "dd bs=1M of the big lower file, lower in page cache, fresh mount",
    ),
    row(
        "seq-read-again",
        "",
        "the same read a second time on that mount",
    ),
    row(
        "rand-read",
        "≤ 1.1×",
        "fio psync 4 KiB random reads of 1/4 of the big file (distinct blocks)",
    ),
    row(
        "seq-write",
        "≤ 1.0×",
        "dd of a new file of the big file's size, conv=fsync",
    ),
    row("find", "≤ 2×", "find tree -type f | wc -l"),
    row("stat-all", "≤ 2×", "du -s tree (stat everything)"),
    row("ls-f", "≤ 2×", "ls -f of the big dir"),
    row("ls-l", "≤ 2×", "ls -l of the big dir"),
    row(
        "tar-read",
        "≤ 1.5×",
        "tar c of the tree into a pipe (every byte)",
    ),
    row(
        "copy-up",
        "≤ 0.5×",
        "append 1 byte to each of 1/10 of the tree's files (all in the bottom layer)",
    ),
    Row {
        metric: "copy-up-volatile",
        target: "≤ 0.15×",
        what: "the same on a `volatile` mount; ratio to the kernel's ordinary copy-up",
        reference: "copy-up",
    },
    row(
        "untar",
        "≤ 3×",
        "tar xf of the small-file archive into the mount",
    ),
    row("rm-rf", "≤ 3×", "rm -rf of what was untarred"),
    row(
        "stat-bottom",
        "≤ 2×",
        "lstat of 1/10 of the tree's files, all in the bottom layer",
    ),
    row(
        "stat-missing",
        "≤ 2×",
        "lstat of as many missing names in merged dirs",
    ),
    row(
        "layers50-find",
        "≤ 2×",
        "find over 50 thin layers + the tree",
    ),
    row("layers50-stat", "≤ 2×", "stat-bottom with 50 layers"),
    row("layers50-missing", "≤ 2×", "stat-missing with 50 layers"),
    row(
        "mount",
        "",
        "from the mount command to a mount that answers `stat` (every run)",
    ),
];

const fn row(metric: &'static str, target: &'static str, what: &'static str) -> Row {
    Row {
        metric,
        target,
        what,
        reference: metric,
    }
}

pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt_secs(s: f64) -> String {
    if s < 0.01 {
        format!("{:.2} ms", s * 1e3)
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Medians per (metric, system), with the number of values.
pub(super) type Medians = BTreeMap<(&'static str, &'static str), (f64, usize)>;

/// `sys`'s `metric` over the kernel's `reference`: the median over rounds of the same-round ratio (a round
/// runs the systems back to back, so a pair shares the machine's load), or the ratio of the medians when
/// no round pairs up.
fn ratio(
    records: &[Record],
    med: &Medians,
    metric: &str,
    reference: &str,
    sys: &str,
) -> Option<f64> {
    let value = |m: &str, s: &str, round: usize| {
        records
            .iter()
            .filter(|r| r.error.is_none() && r.round == round && r.sys.name() == s)
            .find_map(|r| r.metrics.iter().find(|(x, _)| *x == m).map(|(_, v)| *v))
    };
    let rounds: BTreeSet<usize> = records.iter().map(|r| r.round).collect();
    let pairs: Vec<f64> = rounds
        .iter()
        .filter_map(|&round| {
            let v = value(metric, sys, round)?;
            let k = value(reference, "kernel", round)?;
            (k > 0.0).then(|| v / k)
        })
        .collect();
    median(pairs).or_else(|| {
        let v = med.get(&(metric, sys))?.0;
        let k = med.get(&(reference, "kernel"))?.0;
        (k > 0.0).then(|| v / k)
    })
}

/// (metric, system) pairs with a count mismatch in some round.
fn flagged(records: &[Record]) -> BTreeSet<(&'static str, &'static str)> {
    records
        .iter()
        .filter(|r| !r.checks.is_empty())
        .flat_map(|r| r.metrics.iter().map(|(m, _)| (*m, r.sys.name())))
        .collect()
}

/// Medians per (metric, system).
fn medians(records: &[Record]) -> Medians {
    let mut obs: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.error.is_none()) {
        for (m, v) in &r.metrics {
            obs.entry((m, r.sys.name())).or_default().push(*v);
        }
        obs.entry(("mount", r.sys.name()))
            .or_default()
            .push(r.mount_secs);
    }
    obs.into_iter()
        .filter_map(|(k, v)| {
            let n = v.len();
            median(v).map(|m| (k, (m, n)))
        })
        .collect()
}

/// The markdown report: header lines (already formatted), the main table, daemon and request tables.
pub fn markdown(header: &[String], systems: &[System], runs: usize, records: &[Record]) -> String {
    let med = medians(records);
    let flagged = flagged(records);
    let mut out = String::new();
    for h in header {
        let _ = writeln!(out, "{h}");
    }
    let names: Vec<&str> = systems.iter().map(|s| s.name()).collect();
    let _ = writeln!(
        out,
        "\nMedian seconds over {runs} interleaved rounds (the order turned by one each round); (×) = median over the rounds of the ratio to \
         kernel overlayfs in the same round (lower is better); \
         (!) = a count was wrong in some round (see the failures at the end): the figure is not comparable.\n"
    );
    let _ = writeln!(out, "| workload | target | {} |", names.join(" | "));
    let _ = writeln!(out, "|---|---|{}", "---|".repeat(names.len()));
    let mut known: Vec<&str> = ROWS.iter().map(|r| r.metric).collect();
    let mut rows: Vec<(&str, &str, &str)> = ROWS
        .iter()
        .map(|r| (r.metric, r.target, r.reference))
        .collect();
    for ((m, _), _) in med.iter() {
        if !known.contains(m) {
            known.push(m);
            rows.push((m, "", m));
        }
    }
    for (metric, target, reference) in rows {
        if !names.iter().any(|s| med.contains_key(&(metric, *s))) {
            continue;
        }
        let cells: Vec<String> = names
            .iter()
            .map(|s| match med.get(&(metric, *s)) {
                None => "-".to_string(),
                Some((v, n)) => {
                    let mut cell = fmt_secs(*v);
                    if (*s != "kernel" || metric != reference)
                        && let Some(r) = ratio(records, &med, metric, reference, s)
                    {
                        let _ = write!(cell, " ({r:.2}×)");
                    }
                    if flagged.contains(&(metric, *s)) {
                        cell.push_str(" (!)");
                    }
                    if *n < runs && metric != "mount" {
                        let _ = write!(cell, " [n={n}]");
                    }
                    cell
                }
            })
            .collect();
        let _ = writeln!(out, "| {metric} | {target} | {} |", cells.join(" | "));
    }
    verdict(&mut out, &med, &flagged, records);
    noise_line(&mut out, records);
    flatness_table(&mut out, &names, &med);
    daemon_table(&mut out, systems, records);
    request_table(&mut out, systems, records);
    let _ = writeln!(out, "\nWorkloads:\n");
    for r in ROWS
        .iter()
        .filter(|r| med.keys().any(|(m, _)| *m == r.metric))
    {
        let _ = writeln!(out, "- `{}`: {}", r.metric, r.what);
    }
    let retried: usize = records.iter().map(|r| r.disturbed).sum();
    if retried > 0 {
        let _ = writeln!(
            out,
            "\nRuns repeated because another process dropped the page cache: {retried}."
        );
    }
    failures(&mut out, records);
    out
}

/// The workload that produces `metric`.
fn workload_of(metric: &str) -> &str {
    match metric {
        "seq-read-again" => "seq-read",
        "untar" | "rm-rf" => "untar-rm",
        m => m,
    }
}

/// The target of a row as a number: "≤ 1.05×" → 1.05.
fn target_value(target: &str) -> Option<f64> {
    target
        .trim_start_matches('≤')
        .trim()
        .trim_end_matches('×')
        .parse()
        .ok()
}

/// One line: which of the targets layerfs meets in this run.
fn verdict(
    out: &mut String,
    med: &Medians,
    flagged: &BTreeSet<(&'static str, &'static str)>,
    records: &[Record],
) {
    let mut met = Vec::new();
    let mut missed = Vec::new();
    for r in ROWS {
        let failed = records.iter().any(|x| {
            x.sys == System::Layerfs && x.error.is_some() && x.workload == workload_of(r.metric)
        });
        if failed && target_value(r.target).is_some() {
            missed.push(format!("{} (failed)", r.metric));
            continue;
        }
        let (Some(t), Some(ratio)) = (
            target_value(r.target),
            ratio(records, med, r.metric, r.reference, "layerfs"),
        ) else {
            continue;
        };
        if flagged.contains(&(r.metric, "layerfs")) {
            missed.push(format!("{} (wrong counts)", r.metric));
        } else if ratio <= t {
            met.push(r.metric.to_string());
        } else {
            missed.push(format!("{} {ratio:.2}× > {t}×", r.metric));
        }
    }
    let find_rss: Vec<f64> = records
        .iter()
        .filter(|r| r.sys == System::Layerfs && r.workload == "find" && r.error.is_none())
        .filter_map(|r| r.usage.map(|u| u.hwm_mib))
        .collect();
    if let Some(rss) = median(find_rss) {
        if rss <= 16.0 {
            met.push("daemon RSS after find".into());
        } else {
            missed.push(format!("daemon RSS after find {rss:.1} MiB > 16 MiB"));
        }
    }
    if met.is_empty() && missed.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nlayerfs meets {} of {} targets in this run{}{}.",
        met.len(),
        met.len() + missed.len(),
        if missed.is_empty() { "" } else { "; misses: " },
        missed.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn targets_parse() {
        assert_eq!(target_value("≤ 1.05×"), Some(1.05));
        assert_eq!(target_value("≤ 0.15×"), Some(0.15));
        assert_eq!(target_value(""), None);
    }

    fn rec(sys: System, round: usize, metric: &'static str, v: f64) -> Record {
        Record {
            metrics: vec![(metric, v)],
            mount_secs: 0.01,
            ..Record::new(metric, round, sys)
        }
    }

    #[test]
    fn ratios_use_kernel_medians_and_the_volatile_reference() {
        let records = vec![
            rec(System::Kernel, 1, "find", 1.0),
            rec(System::Kernel, 2, "find", 3.0),
            rec(System::Layerfs, 1, "find", 2.0),
            rec(System::Layerfs, 2, "find", 4.0),
            rec(System::Kernel, 1, "copy-up", 2.0),
            rec(System::Kernel, 1, "copy-up-volatile", 0.5),
            rec(System::Layerfs, 1, "copy-up-volatile", 0.2),
        ];
        let md = markdown(&[], &[System::Layerfs, System::Kernel], 2, &records);
        // Same-round ratios 2/1 and 4/3: median 1.67 (the ratio of the medians would be 1.50).
        assert!(
            md.contains("| find | ≤ 2× | 3.00 s (1.67×) | 2.00 s |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| copy-up-volatile | ≤ 0.15× | 200 ms (0.10×) [n=1] | 500 ms (0.25×) [n=1] |"
            ),
            "{md}"
        );
        assert!(
            md.contains("layerfs meets 2 of 2 targets in this run."),
            "{md}"
        );
        let slow = [
            rec(System::Kernel, 1, "ls-f", 1.0),
            rec(System::Layerfs, 1, "ls-f", 2.5),
        ];
        let md = markdown(&[], &[System::Layerfs, System::Kernel], 1, &slow);
        assert!(
            md.contains("layerfs meets 0 of 1 targets in this run; misses: ls-f 2.50× > 2×."),
            "{md}"
        );
    }
}
