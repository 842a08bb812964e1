//! Images: config helpers, listing, history, inspect, tag, rmi, and layer cleanup (prune, verify).

use std::collections::HashSet;
use std::fs;

use anyhow::Context;
use serde::Serialize;
use serde_json::{Value, json};

use crate::digest::Digest;
use crate::store::{ImageRecord, Store, StoreError};
use crate::{tarsplit, util};

/// `busybox` → `busybox:latest`; `reg:5000/x` → `reg:5000/x:latest`; `a:b` stays.
pub fn normalize_tag(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || last.contains('@') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// Splits `repo:tag` at the tag's colon.
pub fn split_tag(tag: &str) -> (&str, &str) {
    let slash = tag.rfind('/').map_or(0, |i| i + 1);
    match tag[slash..].rfind(':') {
        Some(i) => (&tag[..slash + i], &tag[slash + i + 1..]),
        None => (tag, "latest"),
    }
}

/// Whether `tag` is a usable `repo[:tag]` name.
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 255
        && !tag.starts_with(['-', '.', ':', '/'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
        && !tag.ends_with([':', '/'])
}

/// `target` normalized (`:latest` added), or an error saying why it is not a usable name.
pub fn check_tag(target: &str) -> anyhow::Result<String> {
    let tag = normalize_tag(target);
    if !valid_tag(&tag) {
        anyhow::bail!("tag {target:?}: invalid name (want repo[:tag] of [a-zA-Z0-9._-/:])");
    }
    Ok(tag)
}

/// The parsed config of an image.
pub fn config_of(img: &ImageRecord) -> Value {
    serde_json::from_str(&img.config).unwrap_or(Value::Null)
}

/// Seconds since the epoch of the config's `created` (0 if absent).
pub fn created_secs(img: &ImageRecord) -> i64 {
    config_of(img)["created"]
        .as_str()
        .and_then(util::parse_rfc3339)
        .unwrap_or(0)
}

/// One row of `images`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    /// Repository, `<none>` when untagged.
    pub repository: String,
    /// Tag, `<none>` when untagged.
    pub tag: String,
    /// Image id (sha256 of the config).
    pub id: Digest,
    /// Creation time from the config (RFC 3339).
    pub created: String,
    /// Sum of the layers' file data.
    pub size: u64,
}

/// One row of `history`, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    /// The image id on the top row, `<missing>` below (as Docker shows).
    pub id: String,
    /// RFC 3339.
    pub created: String,
    /// The command that made the step.
    pub created_by: String,
    /// Bytes the step's layer adds (0 for an empty layer).
    pub size: u64,
    /// The step's comment.
    pub comment: String,
    /// Whether the step made no layer.
    pub empty_layer: bool,
}

/// What `rmi` did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RmiReport {
    /// Tags removed.
    pub untagged: Vec<String>,
    /// The image deleted, if its record went.
    pub deleted: Option<Digest>,
}

/// What `prune` did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PruneReport {
    /// ChainIDs of the layers removed.
    pub layers: Vec<Digest>,
    /// Disk space given back (allocated blocks).
    pub bytes_freed: u64,
}

/// The result of verifying one layer.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyRow {
    /// The layer.
    pub chain_id: Digest,
    /// What it should hash to.
    pub diff_id: Digest,
    /// `None` when the rebuilt tar hashes to `diff_id`, else what went wrong.
    pub problem: Option<String>,
}

impl Store {
    /// `images`: one row per tag (one `<none>` row for an untagged image), newest first.
    pub fn list_images(&self) -> anyhow::Result<Vec<ImageSummary>> {
        let _l = self.lock_shared()?;
        let mut rows = Vec::new();
        for img in self.images_locked()?.into_iter().rev() {
            let created = config_of(&img)["created"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let size = self.image_size(&img);
            let tags = if img.tags.is_empty() {
                vec!["<none>:<none>".to_string()]
            } else {
                img.tags.clone()
            };
            for t in tags {
                let (repo, tag) = split_tag(&t);
                rows.push(ImageSummary {
                    repository: repo.into(),
                    tag: tag.into(),
                    id: img.id,
                    created: created.clone(),
                    size,
                });
            }
        }
        Ok(rows)
    }

    /// Sum of the layer sizes of `img`.
    pub fn image_size(&self, img: &ImageRecord) -> u64 {
        img.layers
            .iter()
            .filter_map(|c| self.layer(c).ok())
            .map(|l| l.size)
            .sum()
    }

    /// `history IMAGE`: one row per config history entry, newest first.
    pub fn history(&self, reference: &str) -> anyhow::Result<Vec<HistoryRow>> {
        let _l = self.lock_shared()?;
        let img = self.resolve_image_locked(reference)?;
        let cfg = config_of(&img);
        let mut layers = img.layers.iter();
        let mut rows = Vec::new();
        let empty = Vec::new();
        for h in cfg["history"].as_array().unwrap_or(&empty) {
            let empty_layer = h["empty_layer"].as_bool().unwrap_or(false);
            let size = if empty_layer {
                0
            } else {
                layers
                    .next()
                    .and_then(|c| self.layer(c).ok())
                    .map_or(0, |l| l.size)
            };
            rows.push(HistoryRow {
                id: "<missing>".into(),
                created: h["created"].as_str().unwrap_or("").into(),
                created_by: h["created_by"].as_str().unwrap_or("").into(),
                size,
                comment: h["comment"].as_str().unwrap_or("").into(),
                empty_layer,
            });
        }
        // A config without history (allowed): one row per layer, from the layer records.
        for c in layers {
            let l = self.layer(c)?;
            rows.push(HistoryRow {
                id: "<missing>".into(),
                created: l.created,
                created_by: l.created_by,
                size: l.size,
                comment: String::new(),
                empty_layer: false,
            });
        }
        rows.reverse();
        if let Some(top) = rows.first_mut() {
            top.id = img.id.to_string();
        }
        Ok(rows)
    }

    /// `inspect IMAGE`: Docker's `image inspect` shape, with `GraphDriver.Data` naming the top
    /// layer as `UpperDir` and the others, nearest parent first, as `LowerDir`.
    pub fn inspect_image(&self, reference: &str) -> anyhow::Result<Value> {
        let _l = self.lock_shared()?;
        let img = self.resolve_image_locked(reference)?;
        let cfg = config_of(&img);
        let mut dirs = self
            .image_lower_dirs(&img)
            .into_iter()
            .map(|p| p.display().to_string());
        let upper = dirs.next().unwrap_or_default();
        let lower: Vec<String> = dirs.collect();
        let top = img
            .layers
            .last()
            .map(|c| self.layer_dir(c).display().to_string())
            .unwrap_or_default();
        let mut data = json!({ "UpperDir": upper, "WorkDir": format!("{top}/work"), "MergedDir": format!("{top}/merged") });
        if !lower.is_empty() {
            data["LowerDir"] = json!(lower.join(":"));
        }
        Ok(json!({
            "Id": img.id.to_string(),
            "RepoTags": img.tags,
            "RepoDigests": img.manifest_digest.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "Created": cfg["created"],
            "Author": cfg["author"],
            "Architecture": cfg["architecture"],
            "Os": cfg["os"],
            "Config": cfg["config"],
            "Size": self.image_size(&img),
            "GraphDriver": { "Name": "layerfs", "Data": data },
            "RootFS": { "Type": "layers", "Layers": cfg["rootfs"]["diff_ids"] },
            "Metadata": { "Source": img.source, "ChainIDs": img.layers },
        }))
    }

    /// `tag SOURCE TARGET`: gives the image `source` the name `target` (taken away from any other
    /// image that had it).
    pub fn tag(&self, source: &str, target: &str) -> anyhow::Result<()> {
        let _l = self.lock_exclusive()?;
        let img = self.resolve_image_locked(source)?;
        self.set_tag_locked(&img.id, target)
    }

    pub(crate) fn set_tag_locked(&self, id: &Digest, target: &str) -> anyhow::Result<()> {
        let tag = check_tag(target)?;
        for mut other in self.images_locked()? {
            if other.id != *id && other.tags.contains(&tag) {
                other.tags.retain(|t| *t != tag);
                self.write_image(&other)?;
            }
        }
        let mut img = self.read_image(id)?;
        if !img.tags.contains(&tag) {
            img.tags.push(tag);
            self.write_image(&img)?;
        }
        Ok(())
    }

    /// `rmi IMAGE`: a tag with other tags left is only untagged; otherwise the image record is
    /// deleted (its layers stay until [`Store::prune`]). Refused while a container uses the image,
    /// unless `force` and none of those containers is mounted.
    pub fn rmi(&self, reference: &str, force: bool) -> anyhow::Result<RmiReport> {
        let _l = self.lock_exclusive()?;
        let mut img = self.resolve_image_locked(reference)?;
        let tag = normalize_tag(reference);
        if img.tags.contains(&tag) && img.tags.len() > 1 {
            img.tags.retain(|t| *t != tag);
            self.write_image(&img)?;
            return Ok(RmiReport {
                untagged: vec![tag],
                deleted: None,
            });
        }
        let users: Vec<_> = self
            .containers_locked()?
            .into_iter()
            .filter(|c| c.image == img.id)
            .collect();
        if let Some(m) = users.iter().find(|c| c.is_mounted()) {
            return Err(StoreError::InUse {
                what: format!("image {reference}"),
                reason: format!(
                    "container {} is mounted at {}",
                    m.name,
                    m.mountpoint
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string())
                ),
            }
            .into());
        }
        if !users.is_empty() && !force {
            let names: Vec<_> = users.iter().map(|c| c.name.as_str()).collect();
            return Err(StoreError::InUse {
                what: format!("image {reference}"),
                reason: format!(
                    "used by container(s) {} (remove them, or use --force)",
                    names.join(", ")
                ),
            }
            .into());
        }
        fs::remove_file(self.image_path(&img.id))?;
        Ok(RmiReport {
            untagged: img.tags,
            deleted: Some(img.id),
        })
    }

    /// Chain ids that an image or a container still uses.
    fn referenced_layers(&self) -> anyhow::Result<HashSet<Digest>> {
        let mut keep: HashSet<Digest> = HashSet::new();
        for img in self.images_locked()? {
            keep.extend(img.layers);
        }
        for c in self.containers_locked()? {
            keep.extend(c.layers);
        }
        Ok(keep)
    }

    /// `prune`: removes every layer no image or container references, and stale staging dirs.
    pub fn prune(&self) -> anyhow::Result<PruneReport> {
        let _l = self.lock_exclusive()?;
        let keep = self.referenced_layers()?;
        let mut report = PruneReport::default();
        for e in fs::read_dir(self.root().join("layers"))? {
            let e = e?;
            let Some(chain) = e
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
            else {
                continue;
            };
            if keep.contains(&chain) {
                continue;
            }
            let dir = self.layer_dir(&chain);
            report.bytes_freed += util::disk_usage(&dir);
            // Unpublish first (rename into tmp/), so a crash never leaves half a layer in layers/.
            let doomed = self.tmp_dir().join(format!("prune-{}", chain.hex()));
            fs::rename(&dir, &doomed)
                .with_context(|| format!("{}: cannot remove", dir.display()))?;
            util::remove_tree(&doomed)?;
            report.layers.push(chain);
        }
        // Nobody is importing while we hold the lock: whatever is in tmp/ is left over.
        for e in fs::read_dir(self.tmp_dir())? {
            let p = e?.path();
            report.bytes_freed += util::disk_usage(&p);
            util::remove_tree(&p)?;
        }
        Ok(report)
    }

    /// `verify`: rebuilds every layer's tar from its tar-split and `diff/` and checks that it
    /// hashes to the layer's diff_id (so a change to any file, header or name shows).
    pub fn verify(&self) -> anyhow::Result<Vec<VerifyRow>> {
        let _l = self.lock_shared()?;
        let mut rows = Vec::new();
        for l in self.layers()? {
            let dir = self.layer_dir(&l.chain_id);
            let problem = match tarsplit::rebuild(&dir, std::io::sink()) {
                Ok((d, _)) if d != l.diff_id => Some(format!("content changed: hashes to {d}")),
                Err(e) => Some(format!("cannot rebuild layer tar: {e}")),
                Ok(_) => match (l.meta_digest, tarsplit::meta_digest(&dir.join("diff"))) {
                    (Some(want), Ok(got)) if want != got => {
                        Some("metadata changed (mode, owner, times, xattrs or names)".into())
                    }
                    (_, Err(e)) => Some(format!("cannot read layer: {e}")),
                    _ => None,
                },
            };
            rows.push(VerifyRow {
                chain_id: l.chain_id,
                diff_id: l.diff_id,
                problem,
            });
        }
        Ok(rows)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(normalize_tag("busybox"), "busybox:latest");
        assert_eq!(normalize_tag("reg:5000/x"), "reg:5000/x:latest");
        assert_eq!(normalize_tag("a:b"), "a:b");
        assert_eq!(split_tag("reg:5000/x:1"), ("reg:5000/x", "1"));
        assert!(valid_tag("busybox:edited"));
        assert!(!valid_tag("bad tag"));
    }
}
