//! The store's subcommands: `import, images, history, inspect, tag, rmi, prune, verify, save, ps,
//! rm`. Argument parsing and output only; the work is done by [`layerfs_store::Store`].
//!
//! Listings print Docker-style tables, or JSON with `json`. Errors come back as `anyhow` errors
//! whose `{:#}` form is one line naming the thing and the reason.

use std::path::PathBuf;

use anyhow::bail;
use layerfs_store::Store;
use layerfs_store::save::SaveFormat;
use layerfs_store::util::{age, human_size};
use serde::Serialize;

/// Archive formats of `save`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveFormatArg {
    /// `docker load`-able (Docker ≥ 25 layout, also a valid OCI layout).
    DockerArchive,
    /// OCI image layout in a tar.
    OciArchive,
}

/// Layer store commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum StoreCommand {
    /// Import an image or layer: docker-save tar, OCI layout dir, OCI archive, layer tar (plain,
    /// gzip, zstd) or a directory.
    Import {
        /// The file or directory to import (`-`: standard input).
        source: PathBuf,
        /// Name the (first) image NAME[:TAG].
        #[arg(long, short)]
        tag: Option<String>,
    },
    /// List images (REPOSITORY TAG IMAGE ID CREATED SIZE).
    Images {
        /// Only image ids.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show the history of an image, newest first.
    History {
        /// Image name or id.
        image: String,
        /// Do not shorten ids and commands.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Show an image or container as JSON (RootFS.Layers, GraphDriver.Data like Docker).
    Inspect {
        /// Image or container names or ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Give an image another name.
    Tag {
        /// Existing image name or id.
        source: String,
        /// New NAME[:TAG].
        target: String,
    },
    /// Remove images (refused while a container uses one, unless --force and none is mounted).
    Rmi {
        /// Image names or ids.
        #[arg(required = true)]
        images: Vec<String>,
        /// Remove even if unmounted containers use it.
        #[arg(long, short)]
        force: bool,
    },
    /// Remove layers no image or container uses, and leftover staging files.
    Prune,
    /// Re-hash every layer against its diff_id; non-zero exit if any changed.
    Verify,
    /// Write images to an archive or an OCI layout directory.
    Save {
        /// Image names or ids.
        #[arg(required = true)]
        images: Vec<String>,
        /// Archive to write.
        #[arg(
            long,
            short,
            required_unless_present = "oci_dir",
            conflicts_with = "oci_dir"
        )]
        output: Option<PathBuf>,
        /// Archive format.
        #[arg(long, value_enum, default_value = "docker-archive")]
        format: SaveFormatArg,
        /// Write an OCI image layout directory instead of an archive.
        #[arg(long)]
        oci_dir: Option<PathBuf>,
    },
    /// List containers and where they are mounted.
    Ps,
    /// Remove containers (refused while mounted).
    Rm {
        /// Container names or ids.
        #[arg(required = true)]
        containers: Vec<String>,
    },
}

/// `println!` that treats a closed stdout (`layerfs images | head`) as the end of output, not as
/// a crash.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        match writeln!(std::io::stdout().lock(), $($arg)*) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other?,
        }
    }};
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints rows as left-aligned columns separated by three spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> anyhow::Result<()> {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                s.push_str(&c);
            } else {
                s.push_str(&format!("{c:<width$}   ", width = w[i]));
            }
        }
        outln!("{}", s.trim_end());
        Ok(())
    };
    line(header.iter().map(|h| h.to_string()).collect())?;
    for r in rows {
        line(r.clone())?;
    }
    Ok(())
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// Runs one store command against the store at `root` (default: [`Store::default_root`]).
pub fn run(cmd: StoreCommand, root: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let store = Store::open(root)?;
    match cmd {
        StoreCommand::Import { source, tag } => {
            let rep = store.import(&source, tag.as_deref())?;
            if json {
                return print_json(&rep);
            }
            for img in &rep.images {
                for l in &img.layers {
                    let what = if l.shared {
                        "already exists (shared)"
                    } else {
                        "imported"
                    };
                    eprintln!(
                        "Layer {}: {what}, {}",
                        l.diff_id.short(),
                        human_size(l.size)
                    );
                }
                if img.tags.is_empty() {
                    outln!("Loaded image ID: {}", img.id);
                }
                for t in &img.tags {
                    outln!("Loaded image: {t}");
                }
            }
        }
        StoreCommand::Images { quiet } => {
            let rows = store.list_images()?;
            if json {
                return print_json(&rows);
            }
            if quiet {
                let mut seen = std::collections::HashSet::new();
                for r in rows.iter().filter(|r| seen.insert(r.id)) {
                    outln!("{}", r.id.short());
                }
                return Ok(());
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.repository.clone(),
                        r.tag.clone(),
                        r.id.short(),
                        age(&r.created),
                        human_size(r.size),
                    ]
                })
                .collect();
            table(
                &["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
                &cells,
            )?;
        }
        StoreCommand::History { image, no_trunc } => {
            let rows = store.history(&image)?;
            if json {
                return print_json(&rows);
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let id = match r.id.strip_prefix("sha256:") {
                        Some(hex) if !no_trunc => hex[..12].to_string(),
                        _ => r.id.clone(),
                    };
                    let by = if no_trunc {
                        r.created_by.clone()
                    } else {
                        trunc(&r.created_by, 45)
                    };
                    vec![
                        id,
                        age(&r.created),
                        by,
                        human_size(r.size),
                        r.comment.clone(),
                    ]
                })
                .collect();
            table(
                &["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
                &cells,
            )?;
        }
        StoreCommand::Inspect { names } => {
            let mut out = Vec::new();
            for n in &names {
                match store.inspect_image(n) {
                    Ok(v) => out.push(v),
                    Err(ie) => match store.inspect_container(n) {
                        Ok(v) => out.push(v),
                        Err(_) => return Err(ie.context(format!("no image or container {n:?}"))),
                    },
                }
            }
            print_json(&out)?;
        }
        StoreCommand::Tag { source, target } => store.tag(&source, &target)?,
        StoreCommand::Rmi { images, force } => {
            let mut reports = Vec::new();
            for i in &images {
                let r = store.rmi(i, force)?;
                if !json {
                    for t in &r.untagged {
                        outln!("Untagged: {t}");
                    }
                    if let Some(d) = &r.deleted {
                        outln!("Deleted: {d}");
                    }
                }
                reports.push(r);
            }
            if json {
                print_json(&reports)?;
            }
        }
        StoreCommand::Prune => {
            let r = store.prune()?;
            if json {
                return print_json(&r);
            }
            for l in &r.layers {
                outln!("Deleted layer: {l}");
            }
            outln!("Total reclaimed space: {}", human_size(r.bytes_freed));
        }
        StoreCommand::Verify => {
            let rows = store.verify()?;
            let bad = rows.iter().filter(|r| r.problem.is_some()).count();
            if json {
                print_json(&rows)?;
            } else {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.chain_id.short(),
                            r.diff_id.to_string(),
                            r.problem.clone().unwrap_or_else(|| "ok".into()),
                        ]
                    })
                    .collect();
                table(&["LAYER", "DIFF ID", "STATUS"], &cells)?;
            }
            if bad > 0 {
                bail!("verify: {bad} of {} layers changed on disk", rows.len());
            }
        }
        StoreCommand::Save {
            images,
            output,
            format,
            oci_dir,
        } => {
            let refs: Vec<&str> = images.iter().map(String::as_str).collect();
            let (rep, dest) = match (output, oci_dir) {
                (_, Some(dir)) => (store.save_oci_dir(&refs, &dir)?, dir),
                (Some(out), None) => {
                    let f = match format {
                        SaveFormatArg::DockerArchive => SaveFormat::DockerArchive,
                        SaveFormatArg::OciArchive => SaveFormat::OciArchive,
                    };
                    (store.save(&refs, &out, f)?, out)
                }
                (None, None) => bail!("save: give -o FILE or --oci-dir DIR"),
            };
            if json {
                return print_json(&rep);
            }
            eprintln!(
                "Saved {} image(s), {} layer(s), {} to {}",
                rep.images.len(),
                rep.layers,
                human_size(rep.bytes),
                dest.display()
            );
        }
        StoreCommand::Ps => {
            let cs = store.containers()?;
            if json {
                return print_json(&cs);
            }
            let cells: Vec<Vec<String>> = cs
                .iter()
                .map(|c| {
                    let at = match (&c.mountpoint, c.is_mounted()) {
                        (Some(m), true) => m.display().to_string(),
                        (Some(m), false) => format!("{} (stale)", m.display()),
                        (None, _) => "-".into(),
                    };
                    vec![
                        c.id.short(),
                        c.name.clone(),
                        c.image_ref.clone(),
                        age(&c.created),
                        at,
                    ]
                })
                .collect();
            table(
                &["CONTAINER ID", "NAME", "IMAGE", "CREATED", "MOUNTED AT"],
                &cells,
            )?;
        }
        StoreCommand::Rm { containers } => {
            for c in &containers {
                let rec = store.remove_container(c)?;
                if !json {
                    outln!("{}", rec.name);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: StoreCommand,
    }

    #[test]
    fn parses() {
        let c = Cli::try_parse_from([
            "x",
            "save",
            "a",
            "b",
            "-o",
            "f.tar",
            "--format",
            "oci-archive",
        ])
        .unwrap();
        assert!(matches!(
            c.cmd,
            StoreCommand::Save {
                format: SaveFormatArg::OciArchive,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["x", "save", "a"]).is_err());
        let c = Cli::try_parse_from(["x", "history", "--no-trunc", "busybox"]).unwrap();
        assert!(matches!(
            c.cmd,
            StoreCommand::History { no_trunc: true, .. }
        ));
    }
}
