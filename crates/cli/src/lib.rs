//! The layerfs command line: argument parsing, output formatting, progress. No filesystem logic
//! lives here; it calls `layerfs-overlay` and `layerfs-store`.
//!
//! Two spellings start a mount: `layerfs mount --lower … --upper … --work … MNT` and the
//! fuse-overlayfs/mount-helper form `layerfs [SOURCE] MNT -o lowerdir=…,upperdir=…,workdir=…`
//! (what `mount -t fuse.layerfs` runs through mount.fuse3).

mod mount;
mod mounts;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Docker-style image layers as a live directory, over FUSE.
#[derive(Debug, Parser)]
#[command(name = "layerfs", version, about)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount lower dirs under an upper dir: `mount --lower L1 --lower L2 --upper U --work W MNT`.
    Mount(mount::MountArgs),
    /// Unmount a layerfs mount and end its daemon.
    Umount {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
    /// List what changed in a mount (or an upper dir over lowers), like `docker diff`.
    Diff(output::DiffArgs),
    /// Print the daemon's request counters for a mount (JSON).
    Stats {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
}

/// Subcommand names, to tell `layerfs mount …` from the helper form `layerfs SOURCE MNT -o …`.
const SUBCOMMANDS: &[&str] = &["mount", "umount", "diff", "stats", "help"];

/// Entry point of the `layerfs` binary.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let first = args.get(1).map(String::as_str).unwrap_or("");
    let helper_form = !first.is_empty()
        && !SUBCOMMANDS.contains(&first)
        && !matches!(first, "-h" | "--help" | "-V" | "--version")
        && !(first.starts_with("-v") && args.len() > 2 && SUBCOMMANDS.contains(&args[2].as_str()));
    let result = if helper_form {
        mount::helper_main(&args[1..])
    } else {
        let cli = Cli::parse();
        init_logging(cli.verbose);
        run(cli.command)
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("layerfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Mount(args) => mount::run(args),
        Command::Umount { mountpoint } => mounts::umount(&mountpoint).map(|()| ExitCode::SUCCESS),
        Command::Diff(args) => output::diff(args).map(|()| ExitCode::SUCCESS),
        Command::Stats { mountpoint } => output::stats(&mountpoint).map(|()| ExitCode::SUCCESS),
    }
}

/// Logs to stderr through tracing; `RUST_LOG` wins over `-v`.
pub(crate) fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
