//! The report's secondary tables: noise, flatness in the number of layers, FUSE daemon usage, layerfs
//! request counters, failures and `--perf` profiles.

use super::cmd::Usage;
use super::report::{Medians, Record, median};
use super::system::System;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The `--perf` section: per workload, the summary file and its top symbols.
pub fn profiles(list: &[(&str, std::path::PathBuf)]) -> String {
    let mut out = String::new();
    if list.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\nProfiles of the layerfs daemon (`--perf`; self time, top symbols):\n"
    );
    for (w, path) in list {
        let top: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('#') && l.trim_start().contains('%'))
            .take(5)
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().filter(|w| *w != "-").collect();
                words.join(" ")
            })
            .collect();
        let _ = writeln!(out, "- `{w}` ({}): {}", path.display(), top.join("; "));
    }
    out
}

/// Lists the cells whose rounds spread by more than 30 % of their median (noise indicator).
pub(super) fn noise_line(out: &mut String, records: &[Record]) {
    let mut obs: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.error.is_none()) {
        for (m, v) in &r.metrics {
            obs.entry((m, r.sys.name())).or_default().push(*v);
        }
    }
    let total = obs.len();
    let mut noisy: Vec<(f64, String)> = obs
        .into_iter()
        .filter_map(|((m, s), v)| {
            let med = median(v.clone())?;
            let max = v.iter().copied().fold(f64::MIN, f64::max);
            let min = v.iter().copied().fold(f64::MAX, f64::min);
            let spread = (max - min) / med;
            (v.len() > 1 && med > 0.0 && spread > 0.3)
                .then(|| (spread, format!("{s}/{m} {:.0}%", 100.0 * spread)))
        })
        .collect();
    if noisy.is_empty() {
        return;
    }
    noisy.sort_by(|a, b| b.0.total_cmp(&a.0));
    let worst: Vec<String> = noisy.iter().take(6).map(|(_, s)| s.clone()).collect();
    let _ = writeln!(
        out,
        "\nNoise: {} of {total} cells spread by more than 30 % of their median over the rounds; worst: {}.",
        noisy.len(),
        worst.join(", ")
    );
}

/// How each system's figures grow from 2 to 51 layers (the issue: ≤ 1.3× for layerfs).
pub(super) fn flatness_table(out: &mut String, names: &[&str], med: &Medians) {
    const PAIRS: [(&str, &str); 3] = [
        ("layers50-find", "find"),
        ("layers50-stat", "stat-bottom"),
        ("layers50-missing", "stat-missing"),
    ];
    let ratio = |many: &str, two: &str, sys: &str| {
        let m = med.get(&(many, sys))?.0;
        let t = med.get(&(two, sys))?.0;
        (t > 0.0).then(|| format!("{:.2}×", m / t))
    };
    if !PAIRS
        .iter()
        .any(|(m, t)| names.iter().any(|s| ratio(m, t, s).is_some()))
    {
        return;
    }
    let _ = writeln!(
        out,
        "\nFlatness in the number of layers: the 50-layer figure over the same system's 2-layer one \
         (target for layerfs: ≤ 1.3×).\n"
    );
    let _ = writeln!(out, "| workload | {} |", names.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(names.len()));
    for (many, two) in PAIRS {
        let cells: Vec<String> = names
            .iter()
            .map(|s| ratio(many, two, s).unwrap_or_else(|| "-".into()))
            .collect();
        let _ = writeln!(out, "| {many} / {two} | {} |", cells.join(" | "));
    }
}

pub(super) fn daemon_table(out: &mut String, systems: &[System], records: &[Record]) {
    let fuse: Vec<System> = systems.iter().copied().filter(|s| s.is_fuse()).collect();
    if fuse.is_empty() || records.iter().all(|r| r.usage.is_none()) {
        return;
    }
    let _ = writeln!(
        out,
        "\nFUSE daemons: peak RSS (VmHWM), CPU time (utime+stime) and open fds at the end of each workload, medians \
         (target: ≤ 16 MiB after `find`).\n"
    );
    let hdr: Vec<&str> = fuse.iter().map(|s| s.name()).collect();
    let _ = writeln!(out, "| workload | {} |", hdr.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(hdr.len()));
    let mut workloads: Vec<&str> = Vec::new();
    for r in records {
        if !workloads.contains(&r.workload) {
            workloads.push(r.workload);
        }
    }
    for w in workloads {
        let cells: Vec<String> = fuse
            .iter()
            .map(|s| {
                let us: Vec<Usage> = records
                    .iter()
                    .filter(|r| r.workload == w && r.sys == *s && r.error.is_none())
                    .filter_map(|r| r.usage)
                    .collect();
                let fds = median(us.iter().filter_map(|u| u.fds).map(|n| n as f64).collect());
                match (
                    median(us.iter().map(|u| u.hwm_mib).collect()),
                    median(us.iter().map(|u| u.cpu_secs).collect()),
                ) {
                    (Some(h), Some(c)) => match fds {
                        Some(f) => format!("{h:.1} MiB, {c:.2} s, {f:.0} fds"),
                        None => format!("{h:.1} MiB, {c:.2} s"),
                    },
                    _ => "-".to_string(),
                }
            })
            .collect();
        let _ = writeln!(out, "| {w} | {} |", cells.join(" | "));
    }
}

/// Counters of `layerfs stats` output: a JSON object of integers (what layerfs prints), or lines
/// `name value` / `name: value` / `name=value`.
pub(super) fn counters(text: &str) -> BTreeMap<String, i64> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text.trim()) {
        return map
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_i64()?)))
            .collect();
    }
    text.lines()
        .filter_map(|l| {
            let l = l.replace([':', '='], " ");
            let mut it = l.split_whitespace();
            let k = it.next()?.to_string();
            let v = it.next()?.parse().ok()?;
            Some((k, v))
        })
        .collect()
}

pub(super) fn request_table(out: &mut String, systems: &[System], records: &[Record]) {
    if !systems.contains(&System::Layerfs) || records.iter().all(|r| r.stats.is_none()) {
        return;
    }
    let _ = writeln!(
        out,
        "\nlayerfs request counters (`layerfs stats`, after minus before the workload, first measured round):\n"
    );
    let _ = writeln!(out, "| workload | counters |\n|---|---|");
    for r in records
        .iter()
        .filter(|r| r.sys == System::Layerfs && r.round == 1)
    {
        let Some((before, after)) = &r.stats else {
            continue;
        };
        let (b, a) = (counters(before), counters(after));
        let deltas: Vec<String> = a
            .iter()
            .map(|(k, v)| (k, v - b.get(k).copied().unwrap_or(0)))
            .filter(|(_, d)| *d != 0)
            .map(|(k, d)| format!("{k} {d}"))
            .collect();
        let _ = writeln!(out, "| {} | {} |", r.workload, deltas.join(", "));
    }
}

/// The failures and count mismatches, one line per (system, workload, message) with the rounds it hit.
pub(super) fn failures(out: &mut String, records: &[Record]) {
    let mut seen: Vec<(String, Vec<usize>)> = Vec::new();
    for r in records
        .iter()
        .filter(|r| r.error.is_some() || !r.checks.is_empty())
    {
        let mut msg = r.error.clone().unwrap_or_default();
        if !r.checks.is_empty() {
            if !msg.is_empty() {
                msg.push_str("; ");
            }
            msg.push_str(&r.checks.join("; "));
        }
        let msg = one_line(&msg);
        let key = format!("{} {}: {msg}", r.sys.name(), r.workload);
        match seen.iter_mut().find(|(k, _)| *k == key) {
            Some((_, rounds)) => rounds.push(r.round),
            None => seen.push((key, vec![r.round])),
        }
    }
    if seen.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nFailures and count mismatches:\n");
    for (key, rounds) in seen {
        let rounds: Vec<String> = rounds.iter().map(|r| r.to_string()).collect();
        let (sys_wl, msg) = key.split_once(": ").unwrap_or((&key, ""));
        let _ = writeln!(out, "- {sys_wl} (round {}): {msg}", rounds.join(", "));
    }
}

/// `s` on one markdown-safe line: no backtrace, lines joined with " / ", at most 400 characters.
pub(super) fn one_line(s: &str) -> String {
    let s = s.split("Stack backtrace:").next().unwrap_or("");
    let joined = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ");
    let mut cut: String = joined.chars().take(400).collect();
    if cut.len() < joined.len() {
        cut.push('…');
    }
    cut.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_accept_three_separators_and_skip_junk() {
        let c = counters("lookup 12\nreaddirplus: 5\nforget=3\n# comment\nname notanumber\n");
        assert_eq!(c.get("lookup"), Some(&12));
        assert_eq!(c.get("readdirplus"), Some(&5));
        assert_eq!(c.get("forget"), Some(&3));
        assert_eq!(c.len(), 3);
        let j = counters(r#"{"lookups": 4, "opens": 0, "name": "x"}"#);
        assert_eq!(j.get("lookups"), Some(&4));
        assert_eq!(j.len(), 2);
    }

    #[test]
    fn failures_are_grouped_on_one_line() {
        let mut a = Record::new("find", 1, System::Layerfs);
        a.checks = vec!["find: got 1, want 2".into()];
        let mut b = Record::new("find", 2, System::Layerfs);
        b.checks = a.checks.clone();
        let mut c = Record::new("ls-l", 1, System::Layerfs);
        c.error = Some("ls failed\nToo many open files\n\nStack backtrace:\n 0: x".into());
        let mut out = String::new();
        failures(&mut out, &[a, b, c]);
        assert!(
            out.contains("- layerfs find (round 1, 2): find: got 1, want 2\n"),
            "{out}"
        );
        assert!(
            out.contains("- layerfs ls-l (round 1): ls failed / Too many open files\n"),
            "{out}"
        );
    }
}
