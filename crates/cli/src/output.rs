//! Commands that print: `diff`, `stats`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::mounts::MountRecord;

/// `layerfs diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// A layerfs mountpoint or a container (or use --upper/--lower).
    target: Option<PathBuf>,
    /// Upper dir to compare (without a mount).
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// Lower dir (repeat, top first), with --upper.
    #[arg(long = "lower", value_name = "DIR")]
    lowers: Vec<PathBuf>,
}

/// Prints the changes of a mount, or of an upper dir over lowers.
/// With `--json`: `[{"Path": "/etc", "Kind": 0}]` as Docker's API (0 C, 1 A, 2 D).
pub fn diff(args: DiffArgs, root: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let (upper, lowers) = match (&args.target, &args.upper) {
        (Some(t), None) => match MountRecord::find(t) {
            Ok(rec) => {
                let upper = rec.upper.with_context(|| {
                    format!("{} is a read-only mount: nothing changed", t.display())
                })?;
                (upper, rec.lowers)
            }
            Err(mount_err) => {
                // Not a live mount: a container of the store?
                let name = t.to_string_lossy();
                let store = layerfs_store::Store::open(root)?;
                let Ok(c) = store.find_container(&name) else {
                    return Err(mount_err);
                };
                let dirs = store.container_dirs(&c);
                (dirs.upper, dirs.lowers)
            }
        },
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
    if json {
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

/// `layerfs commit CONTAINER|MNT`: the upper dir becomes a new layer and image.
pub fn commit(
    target: &str,
    root: Option<PathBuf>,
    json: bool,
    tag: Option<String>,
    comment: Option<String>,
    author: Option<String>,
) -> anyhow::Result<()> {
    let store = layerfs_store::Store::open(root)?;
    let opts = layerfs_store::commit::CommitOptions {
        tag,
        created_by: None,
        comment,
        author,
    };
    let report = match store.find_container(target) {
        Ok(c) => store.commit_container(&c.name, &opts)?,
        Err(container_err) => {
            // A plain layerfs mount whose lowers are store layers.
            let Ok(rec) = MountRecord::find(std::path::Path::new(target)) else {
                return Err(container_err);
            };
            let upper = rec
                .upper
                .with_context(|| format!("{target} is a read-only mount"))?;
            store.commit_upper(&upper, &rec.lowers, &opts)?
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if report.shared {
            eprintln!("Layer {}: already exists (shared)", report.diff_id.short());
        }
        println!("{}", report.image);
    }
    Ok(())
}
