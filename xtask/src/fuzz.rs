//! `cargo xtask fuzz --seqs N [--seed S] [--only SEED] [--sut layerfs|kernel] [--max-fails K]
//! [--exclude KIND,…] [--jobs J] [--release]`:
//! runs the differential test (`tests/differential.rs`) with more sequences than CI does.
//!
//! It only sets the test's environment (`LAYERFS_FUZZ_SEQS`, `LAYERFS_FUZZ_SEED`, `LAYERFS_FUZZ_ONLY`,
//! `LAYERFS_FUZZ_MAX_FAILS`, `LAYERFS_FUZZ_EXCLUDE`, `LAYERFS_FUZZ_JOBS`, `LAYERFS_SUT`) and runs `cargo test --test integration` on that one test.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask fuzz --seqs N [--seed S] [--only SEED] [--sut layerfs|kernel] \
                     [--max-fails K] [--exclude KIND,…] [--jobs J] [--release]";

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut env: Vec<(&str, String)> = Vec::new();
    let mut release = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--seqs" => env.push(("LAYERFS_FUZZ_SEQS", value("--seqs")?)),
            "--seed" => env.push(("LAYERFS_FUZZ_SEED", value("--seed")?)),
            "--only" => env.push(("LAYERFS_FUZZ_ONLY", value("--only")?)),
            "--sut" => env.push(("LAYERFS_SUT", value("--sut")?)),
            "--jobs" => env.push(("LAYERFS_FUZZ_JOBS", value("--jobs")?)),
            "--exclude" => env.push(("LAYERFS_FUZZ_EXCLUDE", value("--exclude")?)),
            "--max-fails" => env.push(("LAYERFS_FUZZ_MAX_FAILS", value("--max-fails")?)),
            "--release" => release = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent dir")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["test", "--test", "integration"])
        .args(release.then_some("--release"))
        .args([
            "--",
            "--exact",
            "differential::differential_vs_kernel",
            "--nocapture",
        ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().context("running cargo test")?;
    if !status.success() {
        bail!("differential test failed ({status}); reproductions are printed above");
    }
    Ok(())
}
