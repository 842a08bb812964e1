//! Raw results: every run's record as JSON in `<base>/results/bench-*.json`, written after each workload,
//! and read back by `cargo xtask bench --report FILE` to print the markdown again (e.g. with a newer report).

use super::cmd::Usage;
use super::report::Record;
use super::system::System;
use super::workload;
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::path::Path;

/// The file's contents: header lines, systems in column order, measured rounds, records.
pub fn to_json(header: &[String], systems: &[System], runs: usize, records: &[Record]) -> Value {
    json!({
        "header": header,
        "systems": systems.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "rounds": runs,
        "runs": records.iter().map(|r| json!({
            "workload": r.workload,
            "round": r.round,
            "system": r.sys.name(),
            "metrics": r.metrics.iter().map(|(m, v)| (m.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "mount_secs": r.mount_secs,
            "daemon_hwm_mib": r.usage.map(|u| u.hwm_mib),
            "daemon_cpu_secs": r.usage.map(|u| u.cpu_secs),
            "daemon_fds": r.usage.and_then(|u| u.fds),
            "stats_before": r.stats.as_ref().map(|s| &s.0),
            "stats_after": r.stats.as_ref().map(|s| &s.1),
            "error": r.error,
            "checks": r.checks,
            "disturbed": r.disturbed,
        })).collect::<Vec<_>>(),
    })
}

/// What a results file holds.
pub struct Loaded {
    pub header: Vec<String>,
    pub systems: Vec<System>,
    pub runs: usize,
    pub records: Vec<Record>,
}

/// Metric names the bench produces, as the `'static` strings records hold.
fn static_name(name: &str) -> Option<&'static str> {
    const EXTRA: [&str; 3] = ["seq-read-again", "untar", "rm-rf"];
    workload::all()
        .iter()
        .map(|w| w.name)
        .chain(EXTRA)
        .find(|n| *n == name)
}

/// Reads a results file (older files without `systems`/`rounds` work too).
pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut records = Vec::new();
    for r in v["runs"].as_array().context("no runs")? {
        let (Some(workload), Ok(sys)) = (
            r["workload"].as_str().and_then(static_name),
            System::parse(r["system"].as_str().unwrap_or("")),
        ) else {
            continue;
        };
        let mut rec = Record::new(workload, r["round"].as_u64().unwrap_or(0) as usize, sys);
        if let Some(m) = r["metrics"].as_object() {
            rec.metrics = m
                .iter()
                .filter_map(|(k, v)| Some((static_name(k)?, v.as_f64()?)))
                .collect();
        }
        rec.mount_secs = r["mount_secs"].as_f64().unwrap_or(0.0);
        if let (Some(h), Some(c)) = (r["daemon_hwm_mib"].as_f64(), r["daemon_cpu_secs"].as_f64()) {
            rec.usage = Some(Usage {
                hwm_mib: h,
                cpu_secs: c,
                fds: r["daemon_fds"].as_u64().map(|n| n as usize),
            });
        }
        if let (Some(b), Some(a)) = (r["stats_before"].as_str(), r["stats_after"].as_str()) {
            rec.stats = Some((b.to_string(), a.to_string()));
        }
        rec.error = r["error"].as_str().map(String::from);
        rec.checks = strs(&r["checks"]);
        rec.disturbed = r["disturbed"].as_u64().unwrap_or(0) as usize;
        records.push(rec);
    }
    let mut systems: Vec<System> = strs(&v["systems"])
        .iter()
        .filter_map(|s| System::parse(s).ok())
        .collect();
    if systems.is_empty() {
        for r in &records {
            if !systems.contains(&r.sys) {
                systems.push(r.sys);
            }
        }
    }
    let runs = v["rounds"]
        .as_u64()
        .map(|n| n as usize)
        .unwrap_or_else(|| records.iter().map(|r| r.round).max().unwrap_or(1));
    Ok(Loaded {
        header: strs(&v["header"]),
        systems,
        runs,
        records,
    })
}
