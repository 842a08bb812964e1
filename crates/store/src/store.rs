//! [`Store`]: the root directory, its lock, and the record types kept in it (layout in the crate
//! doc). Import, export, images and containers add their methods in their own modules.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rustix::fs::{FlockOperation, Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::format::Encoding;
use crate::util;

/// Errors callers may branch on. Everything else is an `anyhow` error with context.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No image, tag, layer or container by that name.
    #[error("{kind} {name:?}: not found")]
    NotFound {
        /// "image", "layer", "container".
        kind: &'static str,
        /// What was asked for.
        name: String,
    },
    /// Refused because something still uses it.
    #[error("{what}: {reason}")]
    InUse {
        /// The thing that was to be removed.
        what: String,
        /// Who uses it.
        reason: String,
    },
    /// Input (an archive, a layer tar) is malformed or hostile.
    #[error("{file}: {entry}: {reason}")]
    BadInput {
        /// The file (archive, blob) being read.
        file: String,
        /// The entry inside it, or `-`.
        entry: String,
        /// Why it was refused.
        reason: String,
    },
}

/// One stored layer: `layers/<chain hex>/layer.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// sha256 of the uncompressed layer tar.
    pub diff_id: Digest,
    /// ChainID of this layer on top of its parents; the directory name.
    pub chain_id: Digest,
    /// ChainID of the layer below, if any.
    pub parent: Option<Digest>,
    /// Bytes of regular file data in the layer (as `docker history` counts).
    pub size: u64,
    /// When the layer was stored (RFC 3339).
    pub created: String,
    /// What made it (from the image history, or the import/commit command).
    pub created_by: String,
    /// Digest of the metadata of `diff/` when published (see [`crate::tarsplit::meta_digest`]);
    /// `verify` compares it.
    #[serde(default)]
    pub meta_digest: Option<Digest>,
}

/// One image: `images/<id hex>.json`. The id is the sha256 of `config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// sha256 of the config bytes.
    pub id: Digest,
    /// The config JSON, byte for byte as received (its digest is the id).
    pub config: String,
    /// ChainIDs of its layers, bottom first (one per `rootfs.diff_ids` entry).
    pub layers: Vec<Digest>,
    /// `repo:tag` names, each unique in the store.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Where it came from (file name) or what made it.
    #[serde(default)]
    pub source: String,
    /// The manifest digest it was imported with, if any.
    #[serde(default)]
    pub manifest_digest: Option<Digest>,
}

/// An open layer store. Cheap to clone the paths; the lock is taken per operation.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    encoding: Encoding,
}

/// A held store lock; released on drop.
pub struct StoreLock {
    _fd: OwnedFd,
}

impl Store {
    /// The root used when none is given: `LAYERFS_ROOT`, else `/var/lib/layerfs` as root, else
    /// `$XDG_DATA_HOME/layerfs` (`~/.local/share/layerfs`).
    pub fn default_root() -> PathBuf {
        if let Some(r) = std::env::var_os("LAYERFS_ROOT").filter(|r| !r.is_empty()) {
            return PathBuf::from(r);
        }
        if rustix::process::geteuid().is_root() {
            return PathBuf::from("/var/lib/layerfs");
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|r| !r.is_empty()) {
            return PathBuf::from(x).join("layerfs");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
        PathBuf::from(home).join(".local/share/layerfs")
    }

    /// Opens (creating if needed) the store at `root`, or at [`Store::default_root`].
    pub fn open(root: Option<PathBuf>) -> anyhow::Result<Store> {
        let root = root.unwrap_or_else(Store::default_root);
        for sub in ["layers", "images", "containers", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p)
                .with_context(|| format!("{}: cannot create store", p.display()))?;
        }
        let root = fs::canonicalize(&root)?;
        Ok(Store {
            root,
            encoding: Encoding::for_this_process(),
        })
    }

    /// The same store writing whiteouts and opaque marks in `encoding` (the default is
    /// [`Encoding::for_this_process`]; `Unprivileged` lets root build layers for rootless use).
    pub fn with_encoding(mut self, encoding: Encoding) -> Store {
        self.encoding = encoding;
        self
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How layers and upper dirs in this store encode whiteouts.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn lock(&self, op: FlockOperation) -> anyhow::Result<StoreLock> {
        let path = self.root.join("lock");
        let fd = rustix::fs::open(
            &path,
            OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("{}: cannot open store lock", path.display()))?;
        rustix::fs::flock(&fd, op).with_context(|| format!("{}: cannot lock", path.display()))?;
        Ok(StoreLock { _fd: fd })
    }

    /// Takes the store lock exclusively (blocks until free).
    pub(crate) fn lock_exclusive(&self) -> anyhow::Result<StoreLock> {
        self.lock(FlockOperation::LockExclusive)
    }

    /// Takes the store lock shared (blocks while someone changes the store).
    pub(crate) fn lock_shared(&self) -> anyhow::Result<StoreLock> {
        self.lock(FlockOperation::LockShared)
    }

    /// `layers/<chain hex>`.
    pub fn layer_dir(&self, chain: &Digest) -> PathBuf {
        self.root.join("layers").join(chain.hex())
    }

    /// `layers/<chain hex>/diff`: what the overlay uses as a lower dir.
    pub fn layer_diff_dir(&self, chain: &Digest) -> PathBuf {
        self.layer_dir(chain).join("diff")
    }

    pub(crate) fn image_path(&self, id: &Digest) -> PathBuf {
        self.root.join("images").join(format!("{}.json", id.hex()))
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Whether layer `chain` is present (published).
    pub fn has_layer(&self, chain: &Digest) -> bool {
        self.layer_dir(chain).join("layer.json").is_file()
    }

    /// Reads one layer record.
    pub fn layer(&self, chain: &Digest) -> anyhow::Result<LayerRecord> {
        let p = self.layer_dir(chain).join("layer.json");
        let bytes = fs::read(&p).map_err(|_| StoreError::NotFound {
            kind: "layer",
            name: chain.to_string(),
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: corrupt record", p.display()))
    }

    /// All published layers.
    pub fn layers(&self) -> anyhow::Result<Vec<LayerRecord>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("layers"))? {
            let e = e?;
            let Some(d) = e
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
            else {
                continue;
            };
            if let Ok(rec) = self.layer(&d) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// All images, oldest first by creation time.
    pub fn images(&self) -> anyhow::Result<Vec<ImageRecord>> {
        let _l = self.lock_shared()?;
        self.images_locked()
    }

    pub(crate) fn images_locked(&self) -> anyhow::Result<Vec<ImageRecord>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("images"))? {
            let e = e?;
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(id) = Digest::from_hex(hex) else {
                continue;
            };
            out.push(self.read_image(&id)?);
        }
        out.sort_by_key(|i| (crate::images::created_secs(i), i.id));
        Ok(out)
    }

    pub(crate) fn read_image(&self, id: &Digest) -> anyhow::Result<ImageRecord> {
        let p = self.image_path(id);
        let bytes = fs::read(&p).map_err(|_| StoreError::NotFound {
            kind: "image",
            name: id.to_string(),
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: corrupt record", p.display()))
    }

    pub(crate) fn write_image(&self, rec: &ImageRecord) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(rec)?;
        util::write_atomic(&self.image_path(&rec.id), &bytes)
    }

    /// Finds an image by `repo:tag`, `repo` (meaning `:latest`), full or short id (≥ 4 hex digits,
    /// with or without `sha256:`).
    pub fn resolve_image(&self, reference: &str) -> anyhow::Result<ImageRecord> {
        let _l = self.lock_shared()?;
        self.resolve_image_locked(reference)
    }

    pub(crate) fn resolve_image_locked(&self, reference: &str) -> anyhow::Result<ImageRecord> {
        let images = self.images_locked()?;
        let tag = crate::images::normalize_tag(reference);
        if let Some(i) = images.iter().find(|i| i.tags.contains(&tag)) {
            return Ok(i.clone());
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let found: Vec<_> = images
                .iter()
                .filter(|i| i.id.hex().starts_with(hex))
                .collect();
            match found.as_slice() {
                [one] => return Ok((*one).clone()),
                [] => {}
                _ => bail!("image {reference:?}: ambiguous id prefix"),
            }
        }
        Err(StoreError::NotFound {
            kind: "image",
            name: reference.to_string(),
        }
        .into())
    }

    /// The diff dirs of an image's layers, top (nearest) first: the overlay's `lowerdir` order.
    pub fn image_lower_dirs(&self, image: &ImageRecord) -> Vec<PathBuf> {
        image
            .layers
            .iter()
            .rev()
            .map(|c| self.layer_diff_dir(c))
            .collect()
    }

    /// A fresh staging directory under `tmp/`, removed on drop unless kept.
    pub(crate) fn staging(&self) -> anyhow::Result<Staging> {
        let dir = tempfile::Builder::new()
            .prefix("stage-")
            .tempdir_in(self.tmp_dir())
            .context("cannot create staging dir in store tmp/")?;
        Ok(Staging { path: dir.keep() })
    }

    /// Publishes a staged layer directory (`diff/`, `layer.json`, `tar-split.zst`) as
    /// `layers/<chain hex>`. Returns `false` when the layer was already present (shared).
    pub(crate) fn publish_layer(&self, staged: &Path, chain: &Digest) -> anyhow::Result<bool> {
        let dest = self.layer_dir(chain);
        if self.has_layer(chain) {
            return Ok(false);
        }
        if dest.exists() {
            // Not a complete layer (no record): a leftover; replace it.
            util::remove_tree(&dest)?;
        }
        let dir = fs::File::open(staged)?;
        layerfs_sys::syncfs(&dir)?;
        match fs::rename(staged, &dest) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("{}: cannot publish layer", dest.display())),
        }
    }
}

/// A staging directory in the store's `tmp/`; the tree is removed on drop, so a failed import
/// leaves nothing behind.
pub(crate) struct Staging {
    path: PathBuf,
}

impl Staging {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Published staging dirs were renamed away: then there is nothing left to remove.
        if let Err(e) = util::remove_tree(&self.path) {
            tracing::warn!("{}: cannot remove staging dir: {e}", self.path.display());
        }
    }
}
