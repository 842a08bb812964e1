//! Layer store tests on real images built by umoci and converted by skopeo.

#![allow(clippy::unwrap_used)]

mod fixture;
#[path = "store/hostile.rs"]
mod hostile;
#[path = "store/import.rs"]
mod import;
#[path = "store/lifecycle.rs"]
mod lifecycle;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use fixture::{image, merge, run, snapshot, store, store_listing, tools};
use layerfs_store::commit::CommitOptions;
use layerfs_store::save::SaveFormat;
use layerfs_store::{Digest, Store};

fn diff_ids(store: &Store, reference: &str) -> Vec<Digest> {
    let img = store.resolve_image(reference).unwrap();
    img.layers
        .iter()
        .map(|c| store.layer(c).unwrap().diff_id)
        .collect()
}

/// The test image's docker-save tar extracted into `dir`, and its parsed manifest.json.
fn extract_docker_archive(dir: &Path) -> (PathBuf, serde_json::Value) {
    fs::create_dir(dir).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-xf")
        .arg(&image().docker_archive));
    let manifest = fs::read(dir.join("manifest.json")).unwrap();
    (
        dir.to_path_buf(),
        serde_json::from_slice(&manifest).unwrap(),
    )
}

fn assert_same_tree(store: &Store, reference: &str, want: &Path) {
    let img = store.resolve_image(reference).unwrap();
    let got = merge(&store.image_lower_dirs(&img));
    let want = snapshot(want);
    let keys = |m: &std::collections::BTreeMap<String, fixture::Node>| {
        m.keys().cloned().collect::<Vec<_>>()
    };
    assert_eq!(keys(&got), keys(&want), "paths differ for {reference}");
    for (k, w) in &want {
        assert_eq!(&got[k], w, "{reference}: {k} differs");
    }
}
