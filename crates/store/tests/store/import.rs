//! Importing every image form (docker-save, OCI layout, legacy paths, tar, directory) into the store,
//! checked against umoci's unpack of the same image.

use super::*;

#[test]
fn every_import_form_matches_umoci_unpack() {
    let Some(()) = tools() else { return };
    let img = image();
    // `docker save | gzip`: a compressed archive.
    let gz = img.dir.join("docker.tar.gz");
    if !gz.exists() {
        let mut enc = flate2::write::GzEncoder::new(
            fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::copy(&mut fs::File::open(&img.docker_archive).unwrap(), &mut enc).unwrap();
        enc.finish().unwrap();
    }
    let forms: [(&str, &PathBuf, Option<&str>); 5] = [
        ("docker-archive.gz", &gz, Some("x:gz")),
        ("oci layout (gzip)", &img.layout, None),
        ("docker-archive", &img.docker_archive, Some("x:docker")),
        ("oci-archive", &img.oci_archive, Some("x:oci")),
        ("oci layout (zstd)", &img.zstd_layout, Some("x:zstd")),
    ];
    let mut ids = Vec::new();
    for (what, path, tag) in forms {
        let (_t, s) = store();
        let start = std::time::Instant::now();
        let rep = s
            .import(path, tag)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        eprintln!(
            "import {what}: {} bytes in {:?}",
            fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            start.elapsed()
        );
        let name = match tag {
            Some(t) => t.to_string(),
            None => {
                // umoci's layout: both tags come in, named after the directory.
                let tags: Vec<_> = rep.images.iter().flat_map(|i| i.tags.clone()).collect();
                assert!(tags.contains(&"oci:final".to_string()), "{tags:?}");
                "oci:final".to_string()
            }
        };
        assert_same_tree(&s, &name, &img.rootfs);
        ids.push(diff_ids(&s, &name));
        let bad: Vec<_> = s
            .verify()
            .unwrap()
            .into_iter()
            .filter(|r| r.problem.is_some())
            .collect();
        assert!(bad.is_empty(), "{what}: verify: {bad:?}");
    }
    assert_eq!(ids[0].len(), 3);
    // zstd layers are the same tars: the same diff_ids everywhere.
    assert!(ids.iter().all(|d| *d == ids[0]), "{ids:?}");
}

/// Old-Docker form: manifest.json naming `<id>/layer.tar`, which skopeo writes as symlinks to
/// `../<digest>.tar`; as an extracted directory and as a re-made tar.
#[test]
fn legacy_layer_paths_through_symlinks() {
    let Some(()) = tools() else { return };
    let t = tempfile::tempdir().unwrap();
    let (dir, mut m) = extract_docker_archive(&t.path().join("legacy"));
    let mut legacy = Vec::new();
    for l in m[0]["Layers"].as_array().unwrap() {
        let want = l.as_str().unwrap();
        let link = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path().join("layer.tar"))
            .find(|p| fs::read_link(p).is_ok_and(|t| t.ends_with(want)))
            .unwrap();
        legacy.push(format!(
            "{}/layer.tar",
            link.parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
        ));
    }
    m[0]["Layers"] = serde_json::json!(legacy);
    fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let tarred = t.path().join("legacy.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-cf")
        .arg(&tarred)
        .arg("."));
    for src in [&dir, &tarred] {
        let (_t, s) = store();
        let rep = s
            .import(src, None)
            .unwrap_or_else(|e| panic!("{}: {e:#}", src.display()));
        assert_eq!(rep.images[0].tags, ["test/final:1"]);
        assert_same_tree(&s, "test/final:1", &image().rootfs);
    }
}

#[test]
fn layer_semantics_in_store() {
    let Some(()) = tools() else { return };
    let (_t, s) = store();
    s.import(&image().docker_archive, Some("t")).unwrap();
    let img = s.resolve_image("t").unwrap();
    let lowers = s.image_lower_dirs(&img);
    // Layer 2 deletes etc/motd with a whiteout in the store's encoding.
    let l2 = &lowers[1];
    let md = fs::symlink_metadata(l2.join("etc/motd")).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if fixture::root() {
        assert!(
            md.file_type().is_char_device() && md.rdev() == 0,
            "etc/motd is not a 0/0 whiteout"
        );
        // Layer 3 marks opt/old opaque.
        let fd = layerfs_sys::open_root(&lowers[0].join("opt/old")).unwrap();
        assert_eq!(
            layerfs_store::format::dir_mark(std::os::fd::AsFd::as_fd(&fd)),
            layerfs_store::format::DirMark::Opaque
        );
        let ping = fixture::node(&l2.join("bin/ping"));
        assert!(
            ping.xattrs.iter().any(|(k, _)| k == "security.capability"),
            "{ping:?}"
        );
        assert_eq!(ping.mode, 0o4755);
        assert_eq!(fixture::node(&l2.join("dev/null")).kind, "char");
    }
    assert_eq!(fixture::node(&l2.join("var/fifo")).kind, "fifo");
    // umoci wrote bin/ls as a hard link to bin/busybox in the same layer.
    assert_eq!(
        fs::symlink_metadata(l2.join("bin/ls")).unwrap().ino(),
        fs::symlink_metadata(l2.join("bin/busybox")).unwrap().ino()
    );
    assert!(
        fixture::node(&l2.join("etc/hosts"))
            .xattrs
            .iter()
            .any(|(k, v)| k == "user.layerfs-test" && v == b"hello")
    );
}

#[test]
fn unprivileged_encoding_gives_the_same_tree() {
    let Some(()) = tools() else { return };
    let (_t, s) = store();
    let s = s.with_encoding(layerfs_store::format::Encoding::Unprivileged);
    s.import(&image().oci_archive, Some("u")).unwrap();
    let img = s.resolve_image("u").unwrap();
    let lowers = s.image_lower_dirs(&img);
    assert!(
        lowers[1].join("etc/.wh.motd").is_file(),
        "whiteout as a .wh. file"
    );
    assert_same_tree(&s, "u", &image().rootfs);
    // Commit of an unprivileged upper: .wh. files and user.overlay.opaque.
    let c = s.create_container("u", None).unwrap();
    let up = s.container_dirs(&c).upper;
    fs::create_dir_all(up.join("etc")).unwrap();
    fs::write(up.join("etc/.wh.hosts"), "").unwrap();
    fs::create_dir_all(up.join("bin")).unwrap();
    let fd = layerfs_sys::open_root(&up.join("bin")).unwrap();
    layerfs_store::format::set_opaque(
        std::os::fd::AsFd::as_fd(&fd),
        layerfs_store::format::Encoding::Unprivileged,
    )
    .unwrap();
    let r = s
        .commit_container(&c.name, &CommitOptions::default())
        .unwrap();
    let m = merge(&s.image_lower_dirs(&s.resolve_image(&r.image.to_string()).unwrap()));
    assert!(!m.contains_key("etc/hosts") && m.contains_key("etc/passwd"));
    assert!(
        !m.keys().any(|k| k.starts_with("bin/")),
        "bin is opaque and empty"
    );
}

#[test]
fn shared_base_is_stored_once() {
    let Some(()) = tools() else { return };
    let (_t, s) = store();
    let rep = s.import(&image().layout, None).unwrap();
    assert_eq!(rep.images.len(), 2, "base and final");
    assert_eq!(
        s.layers().unwrap().len(),
        3,
        "the base layer is shared by both images"
    );
    let before = layerfs_store::util::disk_usage(&s.root().join("layers"));
    let rep = s.import(&image().docker_archive, Some("again")).unwrap();
    assert!(rep.images[0].layers.iter().all(|l| l.shared), "{rep:?}");
    assert_eq!(s.layers().unwrap().len(), 3);
    assert_eq!(
        layerfs_store::util::disk_usage(&s.root().join("layers")),
        before
    );
    assert_eq!(s.list_images().unwrap().len(), 3);
}

/// A multi-platform index (nested): only the host's image comes in.
#[test]
fn nested_multi_platform_index() {
    let Some(()) = tools() else { return };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("multi");
    run(Command::new("cp").arg("-a").arg(&image().layout).arg(&dir));
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let by_name = |n: &str| {
        let mut d = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == n)
            .unwrap()
            .clone();
        d.as_object_mut().unwrap().remove("annotations");
        d
    };
    let (mut host, mut other) = (by_name("final"), by_name("base"));
    let arch = if cfg!(target_arch = "x86_64") {
        "amd64"
    } else {
        "arm64"
    };
    let foreign = if arch == "amd64" { "arm64" } else { "amd64" };
    host["platform"] = serde_json::json!({ "architecture": arch, "os": "linux" });
    other["platform"] = serde_json::json!({ "architecture": foreign, "os": "linux" });
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [other, host],
    }))
    .unwrap();
    use sha2::Digest as _;
    let hexd = hex::encode(sha2::Sha256::digest(&nested));
    fs::write(dir.join("blobs/sha256").join(&hexd), &nested).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{hexd}"),
            "size": nested.len(),
            "annotations": { "org.opencontainers.image.ref.name": "multi" },
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    let (_t, s) = store();
    let rep = s.import(&dir, None).unwrap();
    assert_eq!(rep.images.len(), 1, "{rep:?}");
    assert_eq!(rep.images[0].tags, ["multi:multi"]);
    assert_same_tree(&s, "multi:multi", &image().rootfs);
}

#[test]
fn concurrent_imports_are_safe() {
    let Some(()) = tools() else { return };
    let (_t, s) = store();
    let img = image();
    std::thread::scope(|sc| {
        let a = sc.spawn(|| {
            s.import(&img.docker_archive, Some("a"))
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        });
        let b = sc.spawn(|| {
            s.import(&img.oci_archive, Some("b"))
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        });
        let c = sc.spawn(|| s.prune().map(|_| ()).map_err(|e| format!("{e:#}")));
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
        c.join().unwrap().unwrap();
    });
    assert_eq!(s.layers().unwrap().len(), 3);
    assert_eq!(diff_ids(&s, "a"), diff_ids(&s, "b"));
}
