//! Export of images: `docker-archive` (Docker ≥ 25 layout: `manifest.json` plus an OCI layout, so
//! both Docker and OCI readers take it), `oci-archive`, and an OCI layout directory.
//!
//! Layers are written uncompressed, rebuilt byte for byte from their tar-split (so each blob's
//! digest is the layer's diff_id and the config is unchanged: the image id stays the same).
//! `index.json` names each tag with `org.opencontainers.image.ref.name` = `repo:tag` and
//! `io.containerd.image.name`. Archives are written to a temp file next to the target and renamed.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use crate::digest::Digest;
use crate::store::{ImageRecord, Store};
use crate::tarsplit;

/// Archive format of [`Store::save`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveFormat {
    /// `docker save` / `docker load` format (Docker ≥ 25 layout).
    DockerArchive,
    /// OCI image layout in a tar.
    OciArchive,
}

/// What a save wrote.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SaveReport {
    /// Images written.
    pub images: Vec<Digest>,
    /// Distinct layer blobs written.
    pub layers: usize,
    /// Bytes of blobs written.
    pub bytes: u64,
}

const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";

trait Sink {
    fn add(&mut self, name: &str, size: u64, data: &mut dyn Read) -> anyhow::Result<()>;
}

struct TarSink<W: Write> {
    b: tar::Builder<W>,
}

impl<W: Write> TarSink<W> {
    fn dir(&mut self, name: &str) -> io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(0);
        h.set_size(0);
        h.set_path(name)?;
        h.set_cksum();
        self.b.append(&h, io::empty())
    }
}

impl<W: Write> Sink for TarSink<W> {
    fn add(&mut self, name: &str, size: u64, data: &mut dyn Read) -> anyhow::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(size);
        h.set_path(name)?;
        h.set_cksum();
        self.b.append(&h, data)?;
        Ok(())
    }
}

struct DirSink {
    root: PathBuf,
}

impl Sink for DirSink {
    fn add(&mut self, name: &str, _size: u64, data: &mut dyn Read) -> anyhow::Result<()> {
        let path = self.root.join(name);
        if let Some(p) = path.parent() {
            fs::create_dir_all(p)?;
        }
        let tmp = path.with_extension("partial");
        let mut f =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        io::copy(data, &mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }
}

impl Store {
    fn write_images(
        &self,
        images: &[(ImageRecord, Vec<String>)],
        sink: &mut dyn Sink,
        docker_manifest: bool,
    ) -> anyhow::Result<SaveReport> {
        let mut report = SaveReport::default();
        let mut written: HashSet<Digest> = HashSet::new();
        let mut index = Vec::new();
        let mut docker = Vec::new();
        sink.add(
            "oci-layout",
            30,
            &mut &br#"{"imageLayoutVersion":"1.0.0"}"#[..],
        )?;
        for (img, tags) in images {
            let staging = self.staging()?;
            let mut layers = Vec::new();
            let mut layer_paths = Vec::new();
            for chain in &img.layers {
                let rec = self.layer(chain)?;
                let blob = format!("blobs/sha256/{}", rec.diff_id.hex());
                let tmp = staging.path().join(rec.diff_id.hex());
                let (digest, size) = if written.contains(&rec.diff_id) {
                    (
                        rec.diff_id,
                        fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0),
                    )
                } else {
                    let mut f = BufWriter::new(File::create(&tmp)?);
                    let (digest, size) = tarsplit::rebuild(&self.layer_dir(chain), &mut f)
                        .with_context(|| {
                            format!("layer {}: cannot rebuild its tar", rec.diff_id)
                        })?;
                    f.flush()?;
                    if digest != rec.diff_id {
                        bail!(
                            "layer {}: changed on disk (rebuilt tar hashes to {digest}); run `layerfs verify`",
                            rec.diff_id
                        );
                    }
                    let mut r = File::open(&tmp)?;
                    r.rewind()?;
                    sink.add(&blob, size, &mut r)?;
                    written.insert(digest);
                    report.layers += 1;
                    report.bytes += size;
                    (digest, size)
                };
                layers.push(json!({ "mediaType": MT_LAYER, "digest": digest, "size": size }));
                layer_paths.push(blob);
            }
            let cfg = img.config.as_bytes();
            let cfg_blob = format!("blobs/sha256/{}", img.id.hex());
            if written.insert(img.id) {
                sink.add(&cfg_blob, cfg.len() as u64, &mut &cfg[..])?;
            }
            let manifest = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": MT_MANIFEST,
                "config": { "mediaType": MT_CONFIG, "digest": img.id, "size": cfg.len() },
                "layers": layers,
            }))?;
            let mdigest = Digest::of(&manifest);
            if written.insert(mdigest) {
                sink.add(
                    &format!("blobs/sha256/{}", mdigest.hex()),
                    manifest.len() as u64,
                    &mut &manifest[..],
                )?;
            }
            let desc = |tag: Option<&String>| {
                let mut d =
                    json!({ "mediaType": MT_MANIFEST, "digest": mdigest, "size": manifest.len() });
                if let Some(t) = tag {
                    d["annotations"] = json!({ "org.opencontainers.image.ref.name": t, "io.containerd.image.name": t });
                }
                d
            };
            if tags.is_empty() {
                index.push(desc(None));
            }
            for t in tags {
                index.push(desc(Some(t)));
            }
            docker.push(json!({ "Config": cfg_blob, "RepoTags": tags, "Layers": layer_paths }));
            report.images.push(img.id);
        }
        let idx = serde_json::to_vec(
            &json!({ "schemaVersion": 2, "mediaType": MT_INDEX, "manifests": index }),
        )?;
        sink.add("index.json", idx.len() as u64, &mut &idx[..])?;
        if docker_manifest {
            let m = serde_json::to_vec(&docker)?;
            sink.add("manifest.json", m.len() as u64, &mut &m[..])?;
        }
        Ok(report)
    }

    fn resolve_for_save(&self, refs: &[&str]) -> anyhow::Result<Vec<(ImageRecord, Vec<String>)>> {
        if refs.is_empty() {
            bail!("save: no image given");
        }
        let mut out: Vec<(ImageRecord, Vec<String>)> = Vec::new();
        for r in refs {
            let img = self.resolve_image_locked(r)?;
            let tag = crate::images::normalize_tag(r);
            // Named by a tag: save that tag; by id: all its tags.
            let tags = if img.tags.contains(&tag) {
                vec![tag]
            } else {
                img.tags.clone()
            };
            match out.iter_mut().find(|(i, _)| i.id == img.id) {
                Some((_, t)) => t.extend(
                    tags.into_iter()
                        .filter(|x| !t.contains(x))
                        .collect::<Vec<_>>(),
                ),
                None => out.push((img, tags)),
            }
        }
        Ok(out)
    }

    /// `save IMAGE… -o FILE`: writes an archive `out` in `format`.
    pub fn save(
        &self,
        refs: &[&str],
        out: &Path,
        format: SaveFormat,
    ) -> anyhow::Result<SaveReport> {
        let _l = self.lock_shared()?;
        let images = self.resolve_for_save(refs)?;
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".layerfs-save-")
            .tempfile_in(dir)
            .with_context(|| format!("{}: cannot write", out.display()))?;
        let mut sink = TarSink {
            b: tar::Builder::new(BufWriter::new(tmp.reopen()?)),
        };
        sink.dir("blobs/")?;
        sink.dir("blobs/sha256/")?;
        let report = self.write_images(&images, &mut sink, format == SaveFormat::DockerArchive)?;
        let mut w = sink.b.into_inner()?;
        w.flush()?;
        w.get_ref().sync_all()?;
        tmp.persist(out)
            .map_err(|e| e.error)
            .with_context(|| format!("{}: cannot write", out.display()))?;
        Ok(report)
    }

    /// `save IMAGE… --oci-dir DIR`: writes (or adds to) an OCI image layout directory. An existing
    /// layout's `index.json` is replaced by one naming the saved images.
    pub fn save_oci_dir(&self, refs: &[&str], dir: &Path) -> anyhow::Result<SaveReport> {
        let _l = self.lock_shared()?;
        let images = self.resolve_for_save(refs)?;
        fs::create_dir_all(dir.join("blobs/sha256"))
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut sink = DirSink {
            root: dir.to_path_buf(),
        };
        self.write_images(&images, &mut sink, false)
    }
}
