//! Commands that print: `diff`, `stats`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::mounts::MountRecord;

/// `layerfs diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// A layerfs mountpoint (or use --upper/--lower).
    target: Option<PathBuf>,
    /// Upper dir to compare (without a mount).
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// Lower dir (repeat, top first), with --upper.
    #[arg(long = "lower", value_name = "DIR")]
    lowers: Vec<PathBuf>,
    /// JSON output: `[{"Path": "/etc", "Kind": 0}]` as Docker's API (0 C, 1 A, 2 D).
    #[arg(long)]
    json: bool,
}

/// Prints the changes of a mount, or of an upper dir over lowers.
pub fn diff(args: DiffArgs) -> anyhow::Result<()> {
    let (upper, lowers) = match (&args.target, &args.upper) {
        (Some(t), None) => {
            let rec = MountRecord::find(t)?;
            let upper = rec.upper.with_context(|| {
                format!("{} is a read-only mount: nothing changed", t.display())
            })?;
            (upper, rec.lowers)
        }
        (None, Some(u)) => {
            if args.lowers.is_empty() {
                bail!("--upper needs at least one --lower");
            }
            (u.clone(), args.lowers.clone())
        }
        (Some(_), Some(_)) => bail!("give a mountpoint or --upper/--lower, not both"),
        (None, None) => bail!("give a mountpoint, or --upper DIR --lower DIR…"),
    };
    let changes = layerfs_overlay::changes::changes(&upper, &lowers).map_err(anyhow::Error::msg)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let list: Vec<serde_json::Value> = changes
            .iter()
            .map(|c| serde_json::json!({"Path": String::from_utf8_lossy(&c.path), "Kind": c.kind.api_kind()}))
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
    } else {
        for c in &changes {
            out.write_all(&[c.kind.letter() as u8, b' '])?;
            out.write_all(&c.path)?;
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}

/// Prints the daemon's counters, read through a private xattr of the mount root.
pub fn stats(mountpoint: &std::path::Path) -> anyhow::Result<()> {
    MountRecord::find(mountpoint)?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = rustix::fs::getxattr(mountpoint, "user.layerfs.stats", &mut buf[..]).with_context(
        || {
            format!(
                "{}: cannot read the daemon's counters",
                mountpoint.display()
            )
        },
    )?;
    println!("{}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}
