//! `cargo xtask ci`: the one entry point for checks, used by CI (`.ci/run`) and people alike:
//! set-up, fmt, clippy `-D warnings`, then every test (unit tests and the real-mount integration
//! tests, which compare layerfs with kernel overlayfs).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("ci: cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args(args)
        .status()
        .with_context(|| format!("cannot run cargo {}", args[0]))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs every check; `--quick` skips fmt and clippy.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    crate::setup::ensure_test_packages()?;
    if !quick {
        cargo(&["fmt", "--all", "--", "--check"])?;
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])?;
    }
    cargo(&["build", "--workspace"])?;
    cargo(&["test", "--workspace", "--no-fail-fast"])?;
    eprintln!("ci: all checks passed");
    Ok(())
}
