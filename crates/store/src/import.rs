//! `Store::import`: bringing an image or a layer into the store.
//!
//! Sources, told apart by content, not by name:
//! - a directory with `oci-layout`/`index.json`: an OCI image layout (nested indexes followed;
//!   every blob's digest and size checked);
//! - a directory with `manifest.json`: an extracted `docker save`;
//! - any other directory: its tree becomes one layer (via the reproducible layer tar writer);
//! - a tar (compressed or not) holding `index.json` + `oci-layout` (OCI archive, Docker ≥ 25 save)
//!   or `manifest.json` (old Docker save with `<id>/layer.tar`, skopeo `docker-archive:` with
//!   symlinked layers): an image archive, read in place through an index of its members;
//! - any other tar, plain, gzip or zstd: one layer.
//!
//! All layers of all images in the source are checked and published first (each staged in `tmp/`
//! and renamed into place); image records are written last. On any error the layers this import
//! published are taken out again, so a failed import leaves the store as it was.

use std::fs::{self, File};
use std::io::{self, IsTerminal, Read};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::digest::{Digest, HashReader, chain_id};
use crate::extract::{self, Compression};
use crate::images::normalize_tag;
use crate::sources::Source;
use crate::store::{ImageRecord, LayerRecord, Store, StoreError};
use crate::{export, util};

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Name for the (first) imported image, overriding names found in the source.
    pub tag: Option<String>,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

/// One layer of an imported image.
#[derive(Debug, Clone, Serialize)]
pub struct LayerOutcome {
    /// sha256 of the uncompressed layer tar.
    pub diff_id: Digest,
    /// Its ChainID (directory name in the store).
    pub chain_id: Digest,
    /// File data bytes.
    pub size: u64,
    /// Already in the store (shared with another image), not extracted again.
    pub shared: bool,
}

/// One imported image.
#[derive(Debug, Clone, Serialize)]
pub struct ImportedImage {
    /// Image id (sha256 of the config).
    pub id: Digest,
    /// Its names after the import.
    pub tags: Vec<String>,
    /// Its layers, bottom first.
    pub layers: Vec<LayerOutcome>,
}

/// What an import did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ImportReport {
    /// Images, in source order.
    pub images: Vec<ImportedImage>,
}

/// A blob named inside a source, with what it must hash to where the source says.
#[derive(Debug, Clone)]
struct BlobRef {
    name: String,
    digest: Option<Digest>,
    size: Option<u64>,
}

/// An image found in a source, not yet imported.
struct ImagePlan {
    config: Vec<u8>,
    config_name: String,
    layers: Vec<BlobRef>,
    tags: Vec<String>,
    manifest_digest: Option<Digest>,
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn bad(file: &str, entry: &str, reason: impl Into<String>) -> anyhow::Error {
    StoreError::BadInput {
        file: file.into(),
        entry: entry.into(),
        reason: reason.into(),
    }
    .into()
}

/// `blobs/sha256/<hex>` or `<hex>.json` → the digest the name promises.
fn digest_in_name(name: &str) -> Option<Digest> {
    let base = name.rsplit('/').next()?;
    if name.contains("blobs/sha256/") {
        return Digest::from_hex(base).ok();
    }
    Digest::from_hex(base.strip_suffix(".json")?).ok()
}

fn short_repo_name(name: &str) -> String {
    let n = name.strip_prefix("docker.io/").unwrap_or(name);
    n.strip_prefix("library/").unwrap_or(n).to_string()
}

pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "layer".into());
    let base = name.split('.').next().unwrap_or(&name).to_ascii_lowercase();
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "imported".into()
    } else {
        clean
    }
}

/// Reads a JSON blob of a source, checking digest and size when known.
fn read_blob(src: &Source, blob: &BlobRef) -> anyhow::Result<Vec<u8>> {
    let label = src.label();
    let bytes = src
        .read(&blob.name)
        .map_err(|e| bad(&label, &blob.name, format!("cannot read: {e:#}")))?;
    if let Some(s) = blob.size.filter(|s| *s != bytes.len() as u64) {
        return Err(bad(
            &label,
            &blob.name,
            format!("size is {} but the descriptor says {s}", bytes.len()),
        ));
    }
    if let Some(d) = blob.digest.filter(|d| *d != Digest::of(&bytes)) {
        return Err(bad(
            &label,
            &blob.name,
            format!("digest is {} but should be {d}", Digest::of(&bytes)),
        ));
    }
    Ok(bytes)
}

/// A `manifest.json` that parses as docker save's (a layer may hold a file of that name too).
fn is_docker_save(src: &Source) -> bool {
    src.read("manifest.json")
        .is_ok_and(|b| serde_json::from_slice::<Vec<DockerEntry>>(&b).is_ok())
}

fn docker_plans(src: &Source) -> anyhow::Result<Vec<ImagePlan>> {
    let label = src.label();
    let bytes = src.read("manifest.json")?;
    let entries: Vec<DockerEntry> = serde_json::from_slice(&bytes).map_err(|e| {
        bad(
            &label,
            "manifest.json",
            format!("not a docker manifest: {e}"),
        )
    })?;
    let mut plans = Vec::new();
    for e in entries {
        let cref = BlobRef {
            name: e.config.clone(),
            digest: digest_in_name(&e.config),
            size: None,
        };
        let config = read_blob(src, &cref)?;
        let layers = e
            .layers
            .iter()
            .map(|l| BlobRef {
                name: l.clone(),
                digest: l
                    .contains("blobs/sha256/")
                    .then(|| digest_in_name(l))
                    .flatten(),
                size: None,
            })
            .collect();
        let tags = e
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| normalize_tag(&short_repo_name(t)))
            .collect();
        plans.push(ImagePlan {
            config,
            config_name: e.config,
            layers,
            tags,
            manifest_digest: None,
        });
    }
    Ok(plans)
}

#[derive(Deserialize, Clone)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: serde_json::Map<String, Value>,
    #[serde(default)]
    platform: Option<Value>,
}

fn blob_of(src: &Source, d: &Descriptor, from: &str) -> anyhow::Result<BlobRef> {
    let digest: Digest = d.digest.parse().map_err(|_| {
        bad(
            &src.label(),
            from,
            format!("unsupported digest {:?} (sha256 only)", d.digest),
        )
    })?;
    Ok(BlobRef {
        name: format!("blobs/sha256/{}", digest.hex()),
        digest: Some(digest),
        size: Some(d.size),
    })
}

fn oci_plans(src: &Source, source_path: &Path) -> anyhow::Result<Vec<ImagePlan>> {
    let label = src.label();
    let index: Value = serde_json::from_slice(&src.read("index.json")?)
        .map_err(|e| bad(&label, "index.json", format!("not JSON: {e}")))?;
    // Docker ≥ 25 also writes manifest.json; its RepoTags name the images.
    let docker_tags: Vec<String> = src
        .read("manifest.json")
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<DockerEntry>>(&b).ok())
        .map(|es| {
            es.into_iter()
                .flat_map(|e| e.repo_tags.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    let mut plans = Vec::new();
    let mut queue: Vec<(Value, String, serde_json::Map<String, Value>)> =
        vec![(index, "index.json".into(), Default::default())];
    let mut depth = 0;
    while let Some((idx, idx_name, inherited)) = queue.pop() {
        depth += 1;
        if depth > 64 {
            return Err(bad(&label, &idx_name, "too many nested indexes"));
        }
        let descs: Vec<Descriptor> = serde_json::from_value(idx["manifests"].clone())
            .map_err(|e| bad(&label, &idx_name, format!("bad manifests list: {e}")))?;
        let matching: Vec<&Descriptor> = descs
            .iter()
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_none_or(|p| p["architecture"].as_str().is_none_or(|a| a == host_arch()))
            })
            .collect();
        let chosen: Vec<&Descriptor> = if matching.is_empty() {
            descs.iter().take(1).collect()
        } else {
            matching
        };
        for d in chosen {
            let mut ann = inherited.clone();
            ann.extend(d.annotations.clone());
            let blob = blob_of(src, d, &idx_name)?;
            let bytes = read_blob(src, &blob)?;
            let doc: Value = serde_json::from_slice(&bytes)
                .map_err(|e| bad(&label, &blob.name, format!("not JSON: {e}")))?;
            let is_index = d.media_type.contains("index")
                || d.media_type.contains("manifest.list")
                || doc.get("manifests").is_some();
            if is_index {
                queue.push((doc, blob.name.clone(), ann));
                continue;
            }
            let cdesc: Descriptor = serde_json::from_value(doc["config"].clone())
                .map_err(|e| bad(&label, &blob.name, format!("bad config descriptor: {e}")))?;
            let cblob = blob_of(src, &cdesc, &blob.name)?;
            let config = read_blob(src, &cblob)?;
            let ldescs: Vec<Descriptor> = serde_json::from_value(doc["layers"].clone())
                .map_err(|e| bad(&label, &blob.name, format!("bad layers list: {e}")))?;
            let layers = ldescs
                .iter()
                .map(|l| blob_of(src, l, &blob.name))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let full = ann.get("io.containerd.image.name").and_then(Value::as_str);
            let refname = ann
                .get("org.opencontainers.image.ref.name")
                .and_then(Value::as_str);
            let mut tags = Vec::new();
            match (full, refname) {
                (Some(f), _) => tags.push(normalize_tag(&short_repo_name(f))),
                (None, Some(r)) if r.contains(':') || r.contains('/') => {
                    tags.push(normalize_tag(&short_repo_name(r)))
                }
                (None, Some(r)) => tags.push(format!("{}:{r}", stem(source_path))),
                (None, None) => {}
            }
            if tags.is_empty() && plans.is_empty() {
                tags.extend(
                    docker_tags
                        .iter()
                        .map(|t| normalize_tag(&short_repo_name(t))),
                );
            }
            plans.push(ImagePlan {
                config,
                config_name: cblob.name,
                layers,
                tags,
                manifest_digest: blob.digest,
            });
        }
    }
    Ok(plans)
}

/// A reader that moves a progress bar.
struct Progress<R> {
    inner: R,
    bar: Option<indicatif::ProgressBar>,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        }
        Ok(n)
    }
}

fn bar(show: bool, size: u64, what: &str) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let b = indicatif::ProgressBar::new(size);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(what.to_string());
    Some(b)
}

/// Layers published by the running import, removed again if it fails.
pub(crate) struct Txn<'a> {
    store: &'a Store,
    published: Vec<Digest>,
    done: bool,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(store: &'a Store) -> Self {
        Txn {
            store,
            published: Vec::new(),
            done: false,
        }
    }

    /// Keeps what was published.
    pub(crate) fn commit(mut self) {
        self.done = true;
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for c in &self.published {
            let doomed = self.store.tmp_dir().join(format!("undo-{}", c.hex()));
            if fs::rename(self.store.layer_dir(c), &doomed).is_ok() {
                let _ = util::remove_tree(&doomed);
            }
        }
    }
}

impl Store {
    /// Imports `source` (see the module doc for the forms), naming the first image `tag` if given.
    /// Progress bars are drawn when stderr is a terminal.
    pub fn import(&self, source: &Path, tag: Option<&str>) -> anyhow::Result<ImportReport> {
        let opts = ImportOptions {
            tag: tag.map(str::to_string),
            progress: io::stderr().is_terminal(),
        };
        self.import_with(source, &opts)
    }

    /// [`Store::import`] with options.
    pub fn import_with(&self, source: &Path, opts: &ImportOptions) -> anyhow::Result<ImportReport> {
        if let Some(t) = &opts.tag {
            crate::images::check_tag(t)?;
        }
        if source == Path::new("-") {
            // `layerfs import - < image.tar`: spooled to a temp file (archives are read in place).
            let mut tmp = tempfile::NamedTempFile::new().context("cannot spool stdin")?;
            io::copy(&mut io::stdin().lock(), &mut tmp).context("reading stdin")?;
            return self.import_with(tmp.path(), opts);
        }
        let _l = self.lock_exclusive()?;
        let md =
            fs::metadata(source).with_context(|| format!("{}: cannot read", source.display()))?;
        let mut txn = Txn::new(self);
        let report = if md.is_dir() {
            let src = Source::dir(source)?;
            if src.exists("index.json") && src.exists("oci-layout") {
                self.import_plans(&src, oci_plans(&src, source)?, opts, &mut txn)?
            } else if is_docker_save(&src) {
                self.import_plans(&src, docker_plans(&src)?, opts, &mut txn)?
            } else {
                self.import_directory(source, opts, &mut txn)?
            }
        } else {
            let (comp, _) = extract::sniff(File::open(source)?)?;
            let staging = self.staging()?;
            let file = if comp == Compression::None {
                File::open(source)?
            } else {
                // A compressed archive: unpack the outer tar once into staging to read it in place.
                let path = staging.path().join("archive.tar");
                let mut out = File::create(&path)?;
                let mut r = extract::decompress(File::open(source)?)?;
                io::copy(&mut r, &mut out).map_err(|e| {
                    bad(
                        &source.display().to_string(),
                        "-",
                        format!("cannot decompress: {e}"),
                    )
                })?;
                File::open(&path)?
            };
            let src = Source::archive(source, file).ok();
            match src {
                Some(src) if src.exists("index.json") && src.exists("oci-layout") => {
                    self.import_plans(&src, oci_plans(&src, source)?, opts, &mut txn)?
                }
                Some(src) if is_docker_save(&src) => {
                    self.import_plans(&src, docker_plans(&src)?, opts, &mut txn)?
                }
                _ => {
                    drop(staging);
                    let label = source.display().to_string();
                    self.import_single_layer(File::open(source)?, &label, source, opts, &mut txn)?
                }
            }
        };
        txn.commit();
        Ok(report)
    }

    fn import_plans(
        &self,
        src: &Source,
        plans: Vec<ImagePlan>,
        opts: &ImportOptions,
        txn: &mut Txn<'_>,
    ) -> anyhow::Result<ImportReport> {
        let label = src.label();
        if plans.is_empty() {
            return Err(bad(&label, "-", "no image in the source"));
        }
        let mut pending = Vec::new();
        for plan in plans {
            let cfg: Value = serde_json::from_slice(&plan.config).map_err(|e| {
                bad(
                    &label,
                    &plan.config_name,
                    format!("config is not JSON: {e}"),
                )
            })?;
            if cfg["rootfs"]["type"].as_str() != Some("layers") {
                return Err(bad(
                    &label,
                    &plan.config_name,
                    "rootfs.type is not \"layers\"",
                ));
            }
            let diff_ids: Vec<Digest> = serde_json::from_value(cfg["rootfs"]["diff_ids"].clone())
                .map_err(|e| {
                bad(
                    &label,
                    &plan.config_name,
                    format!("bad rootfs.diff_ids: {e}"),
                )
            })?;
            if diff_ids.len() != plan.layers.len() {
                return Err(bad(
                    &label,
                    &plan.config_name,
                    format!(
                        "config lists {} diff_ids but the manifest has {} layers",
                        diff_ids.len(),
                        plan.layers.len()
                    ),
                ));
            }
            let empty = Vec::new();
            let history = cfg["history"].as_array().unwrap_or(&empty);
            let steps: Vec<&Value> = history
                .iter()
                .filter(|h| !h["empty_layer"].as_bool().unwrap_or(false))
                .collect();
            if !history.is_empty() && steps.len() != diff_ids.len() {
                return Err(bad(
                    &label,
                    &plan.config_name,
                    format!(
                        "history has {} non-empty steps but there are {} layers",
                        steps.len(),
                        diff_ids.len()
                    ),
                ));
            }
            let mut outcomes = Vec::new();
            let mut chains = Vec::new();
            for (i, blob) in plan.layers.iter().enumerate() {
                let chain = chain_id(&diff_ids[..=i]).context("empty chain")?;
                let parent = chains.last().copied();
                chains.push(chain);
                if self.has_layer(&chain) {
                    let size = self.layer(&chain).map_or(0, |l| l.size);
                    outcomes.push(LayerOutcome {
                        diff_id: diff_ids[i],
                        chain_id: chain,
                        size,
                        shared: true,
                    });
                    continue;
                }
                let created_by = steps
                    .get(i)
                    .and_then(|h| h["created_by"].as_str())
                    .unwrap_or("")
                    .to_string();
                let (reader, size) = src
                    .open(&blob.name)
                    .map_err(|e| bad(&label, &blob.name, format!("{e:#}")))?;
                if let Some(want) = blob.size.filter(|w| *w != size) {
                    return Err(bad(
                        &label,
                        &blob.name,
                        format!("size is {size} but the descriptor says {want}"),
                    ));
                }
                let staging = self.staging()?;
                let what = format!("{label}: {}", blob.name);
                let short = diff_ids[i].short();
                let mut hr = HashReader::new(Progress {
                    inner: reader,
                    bar: bar(opts.progress, size, &short),
                });
                let ex = extract::extract_layer(&mut hr, staging.path(), self.encoding(), &what)?;
                hr.drain()
                    .map_err(|e| bad(&label, &blob.name, format!("cannot read: {e}")))?;
                if let Some(b) = &hr.get_mut().bar {
                    b.finish_and_clear();
                }
                let (blob_digest, _) = hr.finish();
                if let Some(want) = blob.digest.filter(|w| *w != blob_digest) {
                    return Err(bad(
                        &label,
                        &blob.name,
                        format!("digest is {blob_digest} but should be {want}"),
                    ));
                }
                if ex.diff_id != diff_ids[i] {
                    return Err(bad(
                        &label,
                        &blob.name,
                        format!(
                            "uncompressed digest is {} but the config says {}",
                            ex.diff_id, diff_ids[i]
                        ),
                    ));
                }
                let rec = LayerRecord {
                    diff_id: ex.diff_id,
                    chain_id: chain,
                    parent,
                    size: ex.size,
                    created: util::rfc3339(util::now_secs()),
                    created_by,
                    meta_digest: None,
                };
                let shared = self.finish_layer(staging.path(), &rec, txn)?;
                outcomes.push(LayerOutcome {
                    diff_id: ex.diff_id,
                    chain_id: chain,
                    size: ex.size,
                    shared,
                });
            }
            pending.push((plan, chains, outcomes));
        }
        let mut report = ImportReport::default();
        for (i, (plan, chains, layers)) in pending.into_iter().enumerate() {
            let tags = match (&opts.tag, i) {
                (Some(t), 0) => vec![normalize_tag(t)],
                _ => plan
                    .tags
                    .into_iter()
                    .filter(|t| {
                        let ok = crate::images::valid_tag(t);
                        if !ok {
                            tracing::warn!("{label}: ignoring invalid name {t:?}");
                        }
                        ok
                    })
                    .collect(),
            };
            let config = String::from_utf8(plan.config)
                .map_err(|_| bad(&label, &plan.config_name, "config is not UTF-8"))?;
            let img = ImageRecord {
                id: Digest::of(config.as_bytes()),
                config,
                layers: chains,
                tags: Vec::new(),
                source: label.clone(),
                manifest_digest: plan.manifest_digest,
            };
            let tags = self.write_image_with_tags(img.clone(), &tags)?;
            report.images.push(ImportedImage {
                id: img.id,
                tags,
                layers,
            });
        }
        Ok(report)
    }

    /// Writes `layer.json` into a staged layer dir and publishes it; `true` if it was already
    /// present (shared).
    pub(crate) fn finish_layer(
        &self,
        staged: &Path,
        rec: &LayerRecord,
        txn: &mut Txn<'_>,
    ) -> anyhow::Result<bool> {
        let mut rec = rec.clone();
        rec.meta_digest = Some(crate::tarsplit::meta_digest(&staged.join("diff"))?);
        util::write_atomic(
            &staged.join("layer.json"),
            &serde_json::to_vec_pretty(&rec)?,
        )?;
        let fresh = self.publish_layer(staged, &rec.chain_id)?;
        if fresh {
            txn.published.push(rec.chain_id);
        }
        Ok(!fresh)
    }

    /// Writes an image record (keeping tags it already had) and gives it `tags`.
    pub(crate) fn write_image_with_tags(
        &self,
        mut img: ImageRecord,
        tags: &[String],
    ) -> anyhow::Result<Vec<String>> {
        if let Ok(old) = self.read_image(&img.id) {
            img.tags = old.tags;
            img.source = old.source;
        }
        self.write_image(&img)?;
        for t in tags {
            self.set_tag_locked(&img.id, t)?;
        }
        Ok(self.read_image(&img.id)?.tags)
    }

    /// One layer tar (any compression) → one layer and a minimal image around it.
    fn import_single_layer(
        &self,
        blob: impl Read,
        label: &str,
        source: &Path,
        opts: &ImportOptions,
        txn: &mut Txn<'_>,
    ) -> anyhow::Result<ImportReport> {
        let staging = self.staging()?;
        let ex = extract::extract_layer(blob, staging.path(), self.encoding(), label)?;
        let now = util::rfc3339(util::now_secs());
        let created_by = format!(
            "layerfs import {}",
            source
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned())
        );
        let rec = LayerRecord {
            diff_id: ex.diff_id,
            chain_id: ex.diff_id,
            parent: None,
            size: ex.size,
            created: now.clone(),
            created_by: created_by.clone(),
            meta_digest: None,
        };
        let shared = self.finish_layer(staging.path(), &rec, txn)?;
        let config = json!({
            "architecture": host_arch(),
            "os": "linux",
            "created": now,
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [ex.diff_id] },
            "history": [ { "created": now, "created_by": created_by } ],
        });
        let config = serde_json::to_string(&config)?;
        let img = ImageRecord {
            id: Digest::of(config.as_bytes()),
            config,
            layers: vec![ex.diff_id],
            tags: Vec::new(),
            source: label.to_string(),
            manifest_digest: None,
        };
        let tag = opts.tag.clone().unwrap_or_else(|| stem(source));
        let tags = self.write_image_with_tags(img.clone(), &[normalize_tag(&tag)])?;
        let layer = LayerOutcome {
            diff_id: ex.diff_id,
            chain_id: ex.diff_id,
            size: ex.size,
            shared,
        };
        Ok(ImportReport {
            images: vec![ImportedImage {
                id: img.id,
                tags,
                layers: vec![layer],
            }],
        })
    }

    /// A plain directory: its reproducible layer tar, then as a single layer.
    fn import_directory(
        &self,
        dir: &Path,
        opts: &ImportOptions,
        txn: &mut Txn<'_>,
    ) -> anyhow::Result<ImportReport> {
        let staging = self.staging()?;
        let tar_path = staging.path().join("layer.tar");
        let out = io::BufWriter::new(File::create(&tar_path)?);
        export::write_layer_tar(dir, out)?;
        self.import_single_layer(
            File::open(&tar_path)?,
            &dir.display().to_string(),
            dir,
            opts,
            txn,
        )
    }
}
