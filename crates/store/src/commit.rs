//! Commit: an upper dir becomes a new layer (its reproducible OCI tar, see [`crate::export`]) on
//! top of its lower layers, and a new image whose config history records what made it.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::digest::{Digest, chain_id};
use crate::import::Txn;
use crate::store::{ImageRecord, LayerRecord, Store};
use crate::{export, extract, util};

/// What a commit should say and do.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Name for the new image.
    pub tag: Option<String>,
    /// The history's `created_by` (default: `layerfs commit`).
    pub created_by: Option<String>,
    /// The history's `comment`.
    pub comment: Option<String>,
    /// The config's `author`.
    pub author: Option<String>,
}

/// What a commit made.
#[derive(Debug, Clone, Serialize)]
pub struct CommitReport {
    /// The new image.
    pub image: Digest,
    /// Its tags.
    pub tags: Vec<String>,
    /// The new layer's diff_id (same changes → same diff_id).
    pub diff_id: Digest,
    /// The new layer's ChainID.
    pub chain_id: Digest,
    /// The layer was already in the store.
    pub shared: bool,
    /// File data bytes in the new layer.
    pub size: u64,
}

impl Store {
    /// Maps an overlay lower dir list (top first) to the store's layers, bottom first. Every dir
    /// must be a stored layer's `diff/` and the list must be that layer's whole stack.
    pub fn layers_of_lowers(&self, lowers: &[PathBuf]) -> anyhow::Result<Vec<Digest>> {
        let mut chains = Vec::new();
        for l in lowers.iter().rev() {
            let canon = std::fs::canonicalize(l).unwrap_or_else(|_| l.clone());
            let hex = canon
                .strip_prefix(self.root().join("layers"))
                .ok()
                .and_then(|rest| {
                    let mut it = rest.components();
                    let hex = it.next()?.as_os_str().to_str()?.to_string();
                    (it.next()?.as_os_str() == "diff" && it.next().is_none()).then_some(hex)
                })
                .with_context(|| {
                    format!(
                        "lower dir {}: not a layer of store {}",
                        l.display(),
                        self.root().display()
                    )
                })?;
            let chain = Digest::from_hex(&hex)?;
            let rec = self.layer(&chain)?;
            if rec.parent != chains.last().copied() {
                bail!(
                    "lower dir {}: its parent layer is not the next lower dir",
                    l.display()
                );
            }
            chains.push(chain);
        }
        Ok(chains)
    }

    /// Commits container `key`: its upper dir on top of its layers, based on its image's config.
    pub fn commit_container(
        &self,
        key: &str,
        opts: &CommitOptions,
    ) -> anyhow::Result<CommitReport> {
        let c = self.container(key)?;
        let dirs = self.container_dirs(&c);
        let mut opts = opts.clone();
        if opts.created_by.is_none() {
            opts.created_by = Some(format!("layerfs commit {}", c.name));
        }
        self.commit_upper_on(&dirs.upper, &c.layers, Some(c.image), &opts)
    }

    /// Commits `upper` on top of the layers whose diff dirs are `lowers` (top first). The base
    /// config is that of an image with exactly those layers, if one exists.
    pub fn commit_upper(
        &self,
        upper: &Path,
        lowers: &[PathBuf],
        opts: &CommitOptions,
    ) -> anyhow::Result<CommitReport> {
        let chains = self.layers_of_lowers(lowers)?;
        self.commit_upper_on(upper, &chains, None, opts)
    }

    fn commit_upper_on(
        &self,
        upper: &Path,
        base: &[Digest],
        prefer: Option<Digest>,
        opts: &CommitOptions,
    ) -> anyhow::Result<CommitReport> {
        if let Some(t) = &opts.tag {
            crate::images::check_tag(t)?;
        }
        let _l = self.lock_exclusive()?;
        let images = self.images_locked()?;
        let base_img = prefer
            .and_then(|id| images.iter().find(|i| i.id == id && i.layers == base))
            .or_else(|| images.iter().find(|i| i.layers == base));
        let mut cfg: Value = match base_img {
            Some(img) => serde_json::from_str(&img.config)?,
            None => {
                let mut diff_ids = Vec::new();
                let mut history = Vec::new();
                for c in base {
                    let l = self.layer(c)?;
                    diff_ids.push(l.diff_id);
                    history.push(json!({ "created": l.created, "created_by": l.created_by }));
                }
                json!({ "architecture": crate::import::host_arch(), "os": "linux", "config": {},
                        "rootfs": { "type": "layers", "diff_ids": diff_ids }, "history": history })
            }
        };
        let mut diff_ids: Vec<Digest> = serde_json::from_value(cfg["rootfs"]["diff_ids"].clone())?;
        let mut txn = Txn::new(self);

        let staging = self.staging()?;
        let tar_path = staging.path().join("layer.tar");
        let lower_dirs: Vec<PathBuf> = base.iter().rev().map(|c| self.layer_diff_dir(c)).collect();
        let (diff_id, _) =
            export::write_upper_tar(upper, &lower_dirs, BufWriter::new(File::create(&tar_path)?))?;
        diff_ids.push(diff_id);
        let chain = chain_id(&diff_ids).context("empty chain")?;
        let now = util::rfc3339(util::now_secs());
        let created_by = opts
            .created_by
            .clone()
            .unwrap_or_else(|| "layerfs commit".into());
        let (shared, size) = if self.has_layer(&chain) {
            (true, self.layer(&chain)?.size)
        } else {
            let layer_stage = self.staging()?;
            let label = format!("commit of {}", upper.display());
            let ex = extract::extract_layer(
                File::open(&tar_path)?,
                layer_stage.path(),
                self.encoding(),
                &label,
            )?;
            if ex.diff_id != diff_id {
                bail!("{label}: layer tar changed while being stored");
            }
            let rec = LayerRecord {
                diff_id,
                chain_id: chain,
                parent: base.last().copied(),
                size: ex.size,
                created: now.clone(),
                created_by: created_by.clone(),
                meta_digest: None,
            };
            (
                self.finish_layer(layer_stage.path(), &rec, &mut txn)?,
                ex.size,
            )
        };

        cfg["rootfs"] = json!({ "type": "layers", "diff_ids": diff_ids });
        cfg["created"] = json!(now);
        if let Some(a) = &opts.author {
            cfg["author"] = json!(a);
        }
        let mut step = json!({ "created": now, "created_by": created_by });
        if let Some(c) = &opts.comment {
            step["comment"] = json!(c);
        }
        if !cfg["history"].is_array() {
            cfg["history"] = json!([]);
        }
        if let Some(h) = cfg["history"].as_array_mut() {
            h.push(step);
        }
        let config = serde_json::to_string(&cfg)?;
        let mut layers = base.to_vec();
        layers.push(chain);
        let img = ImageRecord {
            id: Digest::of(config.as_bytes()),
            config,
            layers,
            tags: Vec::new(),
            source: format!("commit of {}", upper.display()),
            manifest_digest: None,
        };
        let tags: Vec<String> = opts
            .tag
            .iter()
            .map(|t| crate::images::normalize_tag(t))
            .collect();
        let tags = self.write_image_with_tags(img.clone(), &tags)?;
        txn.commit();
        Ok(CommitReport {
            image: img.id,
            tags,
            diff_id,
            chain_id: chain,
            shared,
            size,
        })
    }
}
