//! The layerfs command line: argument parsing, output formatting, progress. No filesystem logic
//! lives here; it calls `layerfs-overlay` and `layerfs-store`.
//!
//! Two spellings start a mount: `layerfs mount --lower … --upper … --work … MNT` and the
//! fuse-overlayfs/mount-helper form `layerfs [SOURCE] MNT -o lowerdir=…,upperdir=…,workdir=…`
//! (what `mount -t fuse.layerfs` runs through mount.fuse3).

mod mount;
mod mounts;
mod output;
pub mod store_cmds;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Docker-style image layers as a live directory, over FUSE.
#[derive(Debug, Parser)]
#[command(
    name = "layerfs",
    version,
    about = "Docker-style image layers as a live directory, over FUSE"
)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// The layer store (default /var/lib/layerfs as root, $XDG_DATA_HOME/layerfs otherwise).
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// JSON output for listing commands.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount an image as a new container (`mount IMAGE MNT`), remount a container
    /// (`mount CONTAINER MNT`), or mount dirs (`mount --lower L1 --lower L2 --upper U --work W MNT`).
    Mount(mount::MountArgs),
    /// Turn a container's changes into a new layer and image.
    Commit {
        /// Container name or id, or its mountpoint.
        container: String,
        /// Name the new image NAME[:TAG].
        #[arg(long, short)]
        tag: Option<String>,
        /// History comment.
        #[arg(long, short)]
        message: Option<String>,
        /// Author in the image config.
        #[arg(long, short)]
        author: Option<String>,
    },
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
    #[command(flatten)]
    Store(store_cmds::StoreCommand),
}

/// Whether `word` is a subcommand (or a flag clap handles), to tell `layerfs mount …` from the
/// helper form `layerfs SOURCE MNT -o …`.
fn is_subcommand(word: &str) -> bool {
    use clap::CommandFactory;
    word == "help"
        || Cli::command()
            .get_subcommands()
            .any(|c| c.get_name() == word)
}

/// Entry point of the `layerfs` binary.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let first = args.get(1).map(String::as_str).unwrap_or("");
    let helper_form = !first.is_empty()
        && !first.starts_with('-')
        && !is_subcommand(first)
        && args.iter().skip(1).any(|a| a.starts_with("-o"));
    let result = if helper_form {
        mount::helper_main(&args[1..])
    } else {
        let cli = Cli::parse();
        init_logging(cli.verbose);
        run(cli.command, cli.root, cli.json)
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("layerfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Command, root: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let ok = |()| ExitCode::SUCCESS;
    match cmd {
        Command::Mount(args) => mount::run(args, root),
        Command::Umount { mountpoint } => mounts::umount(&mountpoint, root).map(ok),
        Command::Diff(args) => output::diff(args, root, json).map(ok),
        Command::Stats { mountpoint } => output::stats(&mountpoint).map(ok),
        Command::Commit {
            container,
            tag,
            message,
            author,
        } => output::commit(&container, root, json, tag, message, author).map(ok),
        Command::Store(cmd) => store_cmds::run(cmd, root, json).map(ok),
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
