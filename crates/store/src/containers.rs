//! Containers: a per-container upper and work dir over an image's layers, and a record saying which
//! layers, where it is mounted and by which process.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::digest::Digest;
use crate::store::{Store, StoreError};
use crate::util;

/// `containers/<id hex>/container.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerRecord {
    /// Random id; the directory name.
    pub id: Digest,
    /// Unique name.
    pub name: String,
    /// The image it was made from.
    pub image: Digest,
    /// How the image was named when the container was made.
    pub image_ref: String,
    /// ChainIDs of its layers, bottom first (kept even if the image is removed).
    pub layers: Vec<Digest>,
    /// The layers' diff dirs, top first: the overlay's `lowerdir` list.
    pub lowers: Vec<PathBuf>,
    /// RFC 3339.
    pub created: String,
    /// Where it is mounted, while it is.
    #[serde(default)]
    pub mountpoint: Option<PathBuf>,
    /// The process serving the mount, while mounted.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Mount options given when it was mounted.
    #[serde(default)]
    pub options: Vec<String>,
}

impl ContainerRecord {
    /// Mounted: a mountpoint is recorded and its serving process (if recorded) is alive.
    pub fn is_mounted(&self) -> bool {
        self.mountpoint.is_some()
            && self.pid.is_none_or(|p| {
                rustix::process::Pid::from_raw(p as i32)
                    .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok())
            })
    }
}

/// The directories an overlay mount of a container needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDirs {
    /// `containers/<id>/upper`.
    pub upper: PathBuf,
    /// `containers/<id>/work`.
    pub work: PathBuf,
    /// Layer diff dirs, top first.
    pub lowers: Vec<PathBuf>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl Store {
    fn container_dir(&self, id: &Digest) -> PathBuf {
        self.root().join("containers").join(id.hex())
    }

    pub(crate) fn containers_locked(&self) -> anyhow::Result<Vec<ContainerRecord>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root().join("containers"))? {
            let p = e?.path().join("container.json");
            let Ok(bytes) = fs::read(&p) else { continue };
            out.push(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{}: corrupt record", p.display()))?,
            );
        }
        out.sort_by(|a: &ContainerRecord, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        Ok(out)
    }

    fn write_container(&self, c: &ContainerRecord) -> anyhow::Result<()> {
        util::write_atomic(
            &self.container_dir(&c.id).join("container.json"),
            &serde_json::to_vec_pretty(c)?,
        )
    }

    /// All containers, oldest first.
    pub fn containers(&self) -> anyhow::Result<Vec<ContainerRecord>> {
        let _l = self.lock_shared()?;
        self.containers_locked()
    }

    pub(crate) fn container_locked(&self, key: &str) -> anyhow::Result<ContainerRecord> {
        let all = self.containers_locked()?;
        if let Some(c) = all.iter().find(|c| c.name == key) {
            return Ok(c.clone());
        }
        let hex = key.strip_prefix("sha256:").unwrap_or(key);
        let by_id: Vec<_> = all
            .iter()
            .filter(|c| hex.len() >= 4 && c.id.hex().starts_with(hex))
            .collect();
        match by_id.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(StoreError::NotFound {
                kind: "container",
                name: key.into(),
            }
            .into()),
            _ => bail!("container {key:?}: ambiguous id prefix"),
        }
    }

    /// A container by name or id (prefix).
    pub fn container(&self, key: &str) -> anyhow::Result<ContainerRecord> {
        let _l = self.lock_shared()?;
        self.container_locked(key)
    }

    /// The container mounted at `mountpoint`, if any.
    pub fn container_by_mountpoint(
        &self,
        mountpoint: &Path,
    ) -> anyhow::Result<Option<ContainerRecord>> {
        let want = fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
        Ok(self
            .containers()?
            .into_iter()
            .find(|c| c.mountpoint.as_deref() == Some(&want)))
    }

    /// A container by mountpoint (when `arg` is a directory a container is mounted at), else by
    /// name or id: what `diff`, `commit` and `umount` take.
    pub fn find_container(&self, arg: &str) -> anyhow::Result<ContainerRecord> {
        let p = Path::new(arg);
        if p.is_dir()
            && let Some(c) = self.container_by_mountpoint(p)?
        {
            return Ok(c);
        }
        self.container(arg)
    }

    /// Makes a container of `image_ref`: `upper/`, `work/` and its record. `name` defaults to the
    /// first 12 hex digits of its id.
    pub fn create_container(
        &self,
        image_ref: &str,
        name: Option<&str>,
    ) -> anyhow::Result<ContainerRecord> {
        let _l = self.lock_exclusive()?;
        let img = self.resolve_image_locked(image_ref)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let id = Digest::of(
            format!("{image_ref}\0{name:?}\0{nanos}\0{}", std::process::id()).as_bytes(),
        );
        let name = name.map_or_else(|| id.short(), str::to_string);
        if !valid_name(&name) {
            bail!("container name {name:?}: invalid (want [a-zA-Z0-9][a-zA-Z0-9_.-]*)");
        }
        if self.containers_locked()?.iter().any(|c| c.name == name) {
            bail!("container name {name:?}: already in use");
        }
        let rec = ContainerRecord {
            id,
            name,
            image: img.id,
            image_ref: image_ref.to_string(),
            layers: img.layers.clone(),
            lowers: self.image_lower_dirs(&img),
            created: util::rfc3339(util::now_secs()),
            mountpoint: None,
            pid: None,
            options: Vec::new(),
        };
        let staged = self.staging()?;
        for d in ["upper", "work"] {
            fs::create_dir(staged.path().join(d))?;
        }
        let dir = self.container_dir(&id);
        util::write_atomic(
            &staged.path().join("container.json"),
            &serde_json::to_vec_pretty(&rec)?,
        )?;
        fs::rename(staged.path(), &dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        Ok(rec)
    }

    /// The dirs an overlay mount of `c` needs.
    pub fn container_dirs(&self, c: &ContainerRecord) -> ContainerDirs {
        let dir = self.container_dir(&c.id);
        ContainerDirs {
            upper: dir.join("upper"),
            work: dir.join("work"),
            lowers: c.lowers.clone(),
        }
    }

    /// Records that container `key` is mounted at `mountpoint`, served by `pid`.
    pub fn set_container_mounted(
        &self,
        key: &str,
        mountpoint: &Path,
        pid: u32,
        options: &[String],
    ) -> anyhow::Result<()> {
        let _l = self.lock_exclusive()?;
        let mut c = self.container_locked(key)?;
        c.mountpoint =
            Some(fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf()));
        c.pid = Some(pid);
        c.options = options.to_vec();
        self.write_container(&c)
    }

    /// Records that container `key` is no longer mounted.
    pub fn set_container_unmounted(&self, key: &str) -> anyhow::Result<()> {
        let _l = self.lock_exclusive()?;
        let mut c = self.container_locked(key)?;
        c.mountpoint = None;
        c.pid = None;
        self.write_container(&c)
    }

    /// `rm CONTAINER`: deletes its dirs and record; refused while it is mounted.
    pub fn remove_container(&self, key: &str) -> anyhow::Result<ContainerRecord> {
        let _l = self.lock_exclusive()?;
        let c = self.container_locked(key)?;
        if c.is_mounted() {
            return Err(StoreError::InUse {
                what: format!("container {}", c.name),
                reason: format!(
                    "mounted at {} (umount it first)",
                    c.mountpoint
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string())
                ),
            }
            .into());
        }
        let dir = self.container_dir(&c.id);
        let doomed = self.tmp_dir().join(format!("rm-{}", c.id.hex()));
        fs::rename(&dir, &doomed).with_context(|| format!("{}: cannot remove", dir.display()))?;
        util::remove_tree(&doomed)?;
        Ok(c)
    }

    /// `inspect CONTAINER`: Docker's container inspect shape (`GraphDriver.Data` with LowerDir
    /// nearest first, UpperDir, WorkDir, MergedDir).
    pub fn inspect_container(&self, key: &str) -> anyhow::Result<Value> {
        let _l = self.lock_shared()?;
        let c = self.container_locked(key)?;
        let d = self.container_dirs(&c);
        let lower: Vec<String> = d.lowers.iter().map(|p| p.display().to_string()).collect();
        Ok(json!({
            "Id": c.id.hex(),
            "Name": c.name,
            "Created": c.created,
            "Image": c.image.to_string(),
            "ImageRef": c.image_ref,
            "State": { "Mounted": c.is_mounted(), "Pid": c.pid },
            "GraphDriver": { "Name": "layerfs", "Data": {
                "LowerDir": lower.join(":"),
                "UpperDir": d.upper.display().to_string(),
                "WorkDir": d.work.display().to_string(),
                "MergedDir": c.mountpoint.as_ref().map(|p| p.display().to_string()),
            }},
            "Options": c.options,
        }))
    }
}
