//! Layer store tests on real images built by umoci and converted by skopeo.

#![allow(clippy::unwrap_used)]

mod fixture;

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
    let dir = t.path().join("legacy");
    fs::create_dir(&dir).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-xf")
        .arg(&image().docker_archive));
    let mut m: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
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
fn full_disk_mid_import_leaves_the_store_as_it_was() {
    let Some(()) = tools() else { return };
    if !fixture::root() {
        eprintln!("*** skipped: full-disk test needs root to mount a small tmpfs ***");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("small");
    fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    let s = Store::open(Some(mnt.join("store"))).unwrap();
    // The base image (2 MB) fits; the final one (6 MB) does not.
    s.import(&image().layout, Some("fits")).map(|_| ()).ok();
    let before = store_listing(&s);
    let err = format!(
        "{:#}",
        s.import(&image().docker_archive, Some("big"))
            .expect_err("disk full")
    );
    assert!(
        err.contains("No space left") || err.contains("os error 28"),
        "{err}"
    );
    assert_eq!(store_listing(&s), before, "store changed");
}

#[test]
fn commit_of_a_kernel_overlay_upper_matches_its_merged_view() {
    let Some(()) = tools() else { return };
    if !fixture::root() {
        eprintln!("*** skipped: kernel overlay test needs root ***");
        return;
    }
    let (t, s) = store();
    s.import(&image().docker_archive, Some("base")).unwrap();
    let c = s.create_container("base", Some("k")).unwrap();
    let d = s.container_dirs(&c);
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let lower = d
        .lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={},redirect_dir=on,index=off,metacopy=off",
        d.upper.display(),
        d.work.display()
    );
    let mounted = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&mnt)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("*** skipped: cannot mount kernel overlayfs here ***");
        return;
    }
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let guard = Umount(mnt.clone());
    // Edits of every kind: new, changed, deleted, replaced dir, renamed lower dir, hard link.
    fs::write(mnt.join("etc/new"), "new\n").unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("etc/passwd"))
        .unwrap()
        .write_all(b"x:x:1:1::/:/bin/sh\n")
        .unwrap();
    fs::remove_file(mnt.join("etc/hosts")).unwrap();
    fs::remove_dir_all(mnt.join("opt/old")).unwrap();
    fs::create_dir(mnt.join("opt/old")).unwrap();
    fs::write(mnt.join("opt/old/fresh"), "fresh\n").unwrap();
    fs::rename(mnt.join("usr/share/doc"), mnt.join("usr/doc-moved")).unwrap();
    fs::write(mnt.join("usr/doc-moved/added"), "added\n").unwrap();
    fs::hard_link(mnt.join("etc/passwd"), mnt.join("etc/passwd2")).unwrap();
    std::os::unix::fs::symlink("../etc/new", mnt.join("bin/new-link")).unwrap();
    let want = snapshot(&mnt);
    drop(guard);
    assert!(
        layerfs_sys::xattr::get(
            std::os::fd::AsFd::as_fd(
                &layerfs_sys::open_root(&d.upper.join("usr/doc-moved")).unwrap()
            ),
            std::ffi::OsStr::new("trusted.overlay.redirect")
        )
        .is_ok(),
        "the kernel recorded a redirect"
    );
    let a = s
        .commit_container(
            "k",
            &CommitOptions {
                tag: Some("k:1".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let b = s.commit_container("k", &CommitOptions::default()).unwrap();
    assert_eq!(a.diff_id, b.diff_id);
    let img = s.resolve_image("k:1").unwrap();
    let got = merge(&s.image_lower_dirs(&img));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        assert_eq!(&got[k], w, "{k}");
    }
    // A third party reads the committed layer the same way: umoci unpack of the saved image.
    let od = t.path().join("k-oci");
    s.save_oci_dir(&["k:1"], &od).unwrap();
    let bundle = t.path().join("k-bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:k:1", od.display()))
        .arg(&bundle));
    let theirs = snapshot(&bundle.join("rootfs"));
    assert_eq!(
        theirs.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        assert_eq!(&theirs[k], w, "umoci: {k}");
    }
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

#[test]
fn saved_images_feed_back_to_skopeo_and_reimport() {
    let Some(()) = tools() else { return };
    let (t, s) = store();
    s.import(&image().oci_archive, Some("test/final:1"))
        .unwrap();
    let want = diff_ids(&s, "test/final:1");
    let id = s.resolve_image("test/final:1").unwrap().id;
    let da = t.path().join("saved-docker.tar");
    let oa = t.path().join("saved-oci.tar");
    let od = t.path().join("saved-oci-dir");
    s.save(&["test/final:1"], &da, SaveFormat::DockerArchive)
        .unwrap();
    s.save(&["test/final:1"], &oa, SaveFormat::OciArchive)
        .unwrap();
    s.save_oci_dir(&["test/final:1"], &od).unwrap();
    let out = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("docker-archive:{}", da.display())));
    assert!(out.contains(&want[0].to_string()), "{out}");
    run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", oa.display())));
    let copied = t.path().join("copied");
    run(Command::new("skopeo")
        .args(["copy", "-q"])
        .arg(format!("oci:{}:test/final:1", od.display()))
        .arg(format!("dir:{}", copied.display())));
    run(Command::new("skopeo")
        .args(["copy", "-q"])
        .arg(format!("docker-archive:{}", da.display()))
        .arg(format!("oci:{}:back", t.path().join("back").display())));
    // umoci (strict about OCI layouts) unpacks the saved directory to the same tree.
    let bundle = t.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:test/final:1", od.display()))
        .arg(&bundle));
    assert_eq!(snapshot(&bundle.join("rootfs")), snapshot(&image().rootfs));
    for saved in [&da, &oa, &od] {
        let (_t2, s2) = store();
        s2.import(saved, Some("re"))
            .unwrap_or_else(|e| panic!("{}: {e:#}", saved.display()));
        assert_eq!(diff_ids(&s2, "re"), want, "{}", saved.display());
        assert_eq!(
            s2.resolve_image("re").unwrap().id,
            id,
            "{}",
            saved.display()
        );
        assert_same_tree(&s2, "re", &image().rootfs);
    }
}

/// A tar built entry by entry with raw names (hostile ones included).
fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        let bytes = name.as_bytes();
        h.as_gnu_mut().unwrap().name[..bytes.len()].copy_from_slice(bytes);
        if !link.is_empty() {
            h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn hostile_layers_are_refused_and_leave_nothing() {
    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};
    let outside = std::env::temp_dir().join(format!("layerfs-escape-{}", std::process::id()));
    let out_s = outside.to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "dotdot",
            raw_tar(&[("a/../../evil", F, "", b"x")]),
            "a/../../evil",
            "`..`",
        ),
        (
            "symlink parent",
            raw_tar(&[("a", S, &out_s, b""), ("a/x", F, "", b"x")]),
            "a/x",
            "symlink",
        ),
        (
            "link outside",
            raw_tar(&[("h", H, "../../etc/passwd", b"")]),
            "h",
            "`..`",
        ),
        (
            "link to later",
            raw_tar(&[("h", H, "later", b""), ("later", F, "", b"x")]),
            "h",
            "not an earlier file",
        ),
        (
            "link to dir",
            raw_tar(&[("d", D, "", b""), ("h", H, "d", b"")]),
            "h",
            "not an earlier file",
        ),
        (
            "bare whiteout",
            raw_tar(&[("etc", D, "", b""), ("etc/.wh.", F, "", b"")]),
            "etc/.wh.",
            "bare `.wh.`",
        ),
        (
            "truncated",
            {
                let mut t = raw_tar(&[("big", F, "", &[7u8; 4096])]);
                t.truncate(512 + 1000);
                t
            },
            "big",
            "truncated",
        ),
    ];
    fs::create_dir_all(&outside).unwrap();
    for (what, tar, entry, reason) in cases {
        let (t, s) = store();
        let before = store_listing(&s);
        let file = t.path().join(format!("{}.tar", what.replace(' ', "-")));
        fs::write(&file, &tar).unwrap();
        let err = format!("{:#}", s.import(&file, Some("bad")).expect_err(what));
        assert!(
            err.contains(file.to_str().unwrap()),
            "{what}: no file in {err:?}"
        );
        assert!(err.contains(entry), "{what}: no entry {entry:?} in {err:?}");
        assert!(
            err.contains(reason),
            "{what}: no reason {reason:?} in {err:?}"
        );
        assert!(!err.contains('\n'), "{what}: not one line: {err:?}");
        assert_eq!(store_listing(&s), before, "{what}: store changed");
        assert!(
            fs::read_dir(&outside).unwrap().next().is_none(),
            "{what}: wrote outside"
        );
    }
    fs::remove_dir(&outside).unwrap();
}

#[test]
fn absolute_and_odd_names_are_cleaned() {
    use tar::EntryType::{Directory as D, Link as H, Regular as F};
    let (t, s) = store();
    let tar = raw_tar(&[
        ("/abs/file", F, "", b"abs"),
        ("./dot/./x", F, "", b"dot"),
        ("deep/missing/parents/f", F, "", b"p"),
        ("dup", F, "", b"first"),
        ("dup", F, "", b"second"),
        ("d", D, "", b""),
        ("d/", D, "", b""),
        ("hl", H, "/dup", b""),
        ("gone/f", F, "", b"in a dir that a file replaces"),
        ("gone", F, "", b"now a file"),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar[..tar.len() / 2]).unwrap();
    let mut both = gz.finish().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar[tar.len() / 2..]).unwrap();
    both.extend(gz.finish().unwrap());
    let file = t.path().join("odd.tar.gz");
    fs::write(&file, &both).unwrap();
    let rep = s.import(&file, Some("odd")).unwrap();
    let layer = &rep.images[0].layers[0];
    use sha2::Digest as _;
    assert_eq!(
        layer.diff_id.hex(),
        hex::encode(sha2::Sha256::digest(&tar)),
        "diff_id over the whole stream"
    );
    let diff = s.layer_diff_dir(&layer.chain_id);
    assert_eq!(fs::read(diff.join("abs/file")).unwrap(), b"abs");
    assert_eq!(fs::read(diff.join("dot/x")).unwrap(), b"dot");
    assert_eq!(fs::read(diff.join("dup")).unwrap(), b"second");
    assert_eq!(fs::read(diff.join("gone")).unwrap(), b"now a file");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(diff.join("hl")).unwrap().ino(),
        fs::metadata(diff.join("dup")).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(diff.join("deep/missing")).unwrap().mode() & 0o7777,
        0o755
    );
    // The tar-split still rebuilds the original bytes (the first `dup` was replaced).
    assert!(s.verify().unwrap().iter().all(|r| r.problem.is_none()));
    // A bad name is refused before anything is stored.
    let before = store_listing(&s);
    let err = format!("{:#}", s.import(&file, Some("bad name!")).unwrap_err());
    assert!(
        err.contains("bad name!") && err.contains("invalid"),
        "{err}"
    );
    assert_eq!(store_listing(&s), before);
    // The same tar as zstd (two frames): the same layer.
    let mut z = zstd::encode_all(&tar[..100], 3).unwrap();
    z.extend(zstd::encode_all(&tar[100..], 3).unwrap());
    let zf = t.path().join("odd.tar.zst");
    fs::write(&zf, &z).unwrap();
    let rep = s.import(&zf, Some("oddz")).unwrap();
    assert_eq!(rep.images[0].layers[0].diff_id, layer.diff_id);
    assert!(rep.images[0].layers[0].shared);
    // Tars without end-of-archive blocks are read all the same.
    let cut = &tar[..tar.len() - 1024];
    let file2 = t.path().join("noend.tar");
    fs::write(&file2, cut).unwrap();
    s.import(&file2, Some("noend")).unwrap();
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
fn paths_beyond_path_max() {
    let (t, s) = store();
    let deep: String = (0..30).map(|i| format!("{i:0>200}/")).collect();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o640);
    h.set_size(5);
    h.set_mtime(1);
    b.append_data(&mut h, format!("{deep}file"), &b"deep\n"[..])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o700);
    h.set_size(0);
    h.set_mtime(2);
    b.append_data(&mut h, &deep, &b""[..]).unwrap();
    let tar = b.into_inner().unwrap();
    assert!(deep.len() > 4096);
    let file = t.path().join("deep.tar");
    fs::write(&file, &tar).unwrap();
    let rep = s.import(&file, Some("deep")).unwrap();
    let root =
        layerfs_sys::open_root(&s.layer_diff_dir(&rep.images[0].layers[0].chain_id)).unwrap();
    let d = layerfs_sys::open_beneath(
        std::os::fd::AsFd::as_fd(&root),
        deep.as_bytes(),
        layerfs_sys::OFlags::PATH,
    )
    .unwrap();
    let st = layerfs_sys::stat_fd(std::os::fd::AsFd::as_fd(&d)).unwrap();
    assert_eq!(
        (st.st_mode & 0o7777, st.st_mtime),
        (0o700, 2),
        "deep dir attributes applied"
    );
    assert!(s.verify().unwrap().iter().all(|r| r.problem.is_none()));
    let out = t.path().join("deep-saved.tar");
    s.save(&["deep"], &out, SaveFormat::OciArchive).unwrap();
    let (_t2, s2) = store();
    s2.import(&out, Some("again")).unwrap();
    assert_eq!(
        diff_ids(&s2, "again"),
        vec![rep.images[0].layers[0].diff_id]
    );
}

#[test]
fn broken_images_are_refused_and_leave_nothing() {
    let Some(()) = tools() else { return };
    let (t, s) = store();
    let before = store_listing(&s);
    // Wrong digest in an OCI layout: a layer blob replaced by other bytes.
    let bad = t.path().join("bad-layout");
    run(Command::new("cp").arg("-a").arg(&image().layout).arg(&bad));
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(bad.join("index.json")).unwrap()).unwrap();
    let fin = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "final")
        .unwrap();
    let mdigest = fin["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(bad.join("blobs/sha256").join(&mdigest)).unwrap())
            .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let blob = bad.join("blobs/sha256").join(&layer);
    let mut bytes = fs::read(&blob).unwrap();
    // Byte 4 is the gzip header's MTIME: the blob still decompresses, only its digest is wrong.
    assert_eq!(&bytes[..2], &[0x1f, 0x8b]);
    bytes[4] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let err = format!("{:#}", s.import(&bad, None).expect_err("corrupt blob"));
    assert!(err.contains(&layer), "{err}");
    assert!(
        err.contains("digest is") && err.contains("should be"),
        "{err}"
    );
    assert_eq!(store_listing(&s), before);

    // A layer blob swapped for another valid blob: the digest check names it.
    run(Command::new("rm").arg("-rf").arg(&bad));
    run(Command::new("cp").arg("-a").arg(&image().layout).arg(&bad));
    let other = manifest["layers"][2]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    fs::copy(bad.join("blobs/sha256").join(&other), &blob).unwrap();
    let err = format!("{:#}", s.import(&bad, None).expect_err("swapped blob"));
    assert!(
        err.contains(&layer) && err.contains("size is") && err.contains("descriptor says"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    assert_eq!(store_listing(&s), before);

    // History that does not match the layers: an extracted docker save with one step too many.
    let dir = t.path().join("docker-dir");
    fs::create_dir(&dir).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-xf")
        .arg(&image().docker_archive));
    let mut m: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let cfg_name = m[0]["Config"].as_str().unwrap().to_string();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(&cfg_name)).unwrap()).unwrap();
    cfg["history"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"created_by": "extra"}));
    fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    m[0]["Config"] = "config.json".into();
    fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let err = format!("{:#}", s.import(&dir, None).expect_err("history"));
    assert!(
        err.contains("config.json") && err.contains("history"),
        "{err}"
    );
    assert_eq!(store_listing(&s), before);
}

fn mknod_whiteout(path: &Path) {
    run(Command::new("mknod").arg(path).args(["c", "0", "0"]));
}

#[test]
fn commit_is_reproducible_and_round_trips() {
    let Some(()) = tools() else { return };
    let (t, s) = store();
    s.import(&image().docker_archive, Some("base")).unwrap();
    let c = s.create_container("base", Some("c1")).unwrap();
    let dirs = s.container_dirs(&c);
    assert_eq!(dirs.lowers.len(), 3);
    fs::create_dir_all(dirs.upper.join("etc")).unwrap();
    fs::write(dirs.upper.join("etc/new"), "new\n").unwrap();
    fs::create_dir_all(dirs.upper.join("opt")).unwrap();
    fs::write(dirs.upper.join("opt/only"), "only\n").unwrap();
    if fixture::root() {
        mknod_whiteout(&dirs.upper.join("etc/passwd"));
        let fd = layerfs_sys::open_root(&dirs.upper.join("opt")).unwrap();
        layerfs_store::format::set_opaque(
            std::os::fd::AsFd::as_fd(&fd),
            layerfs_store::format::Encoding::Kernel,
        )
        .unwrap();
        layerfs_sys::xattr::set(
            std::os::fd::AsFd::as_fd(&fd),
            std::ffi::OsStr::new("trusted.overlay.origin"),
            b"x",
            0,
        )
        .unwrap();
    }
    let opts = CommitOptions {
        tag: Some("base:edited".into()),
        ..Default::default()
    };
    let a = s.commit_container("c1", &opts).unwrap();
    let b = s
        .commit_container(
            "c1",
            &CommitOptions {
                tag: Some("base:again".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.diff_id, b.diff_id, "same upper, same diff_id");
    assert!(b.shared);
    let hist = s.history("base:edited").unwrap();
    assert_eq!(hist[0].created_by, "layerfs commit c1");
    // The committed image = upper over the lowers.
    let mut stack = vec![dirs.upper.clone()];
    stack.extend(dirs.lowers.clone());
    let img = s.resolve_image("base:edited").unwrap();
    assert_eq!(merge(&s.image_lower_dirs(&img)), merge(&stack));
    if fixture::root() {
        let m = merge(&s.image_lower_dirs(&img));
        assert!(!m.contains_key("etc/passwd") && m.contains_key("etc/new"));
        assert_eq!(
            m.keys()
                .filter(|k| k.starts_with("opt/"))
                .collect::<Vec<_>>(),
            ["opt/only"]
        );
    }
    // The saved layer holds OCI whiteouts and no private xattrs.
    let out = t.path().join("edited.tar");
    s.save(&["base:edited"], &out, SaveFormat::DockerArchive)
        .unwrap();
    run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("docker-archive:{}", out.display())));
    let layer_tar = fs::read(
        s.root()
            .join("layers")
            .join(a.chain_id.hex())
            .join("diff")
            .parent()
            .unwrap()
            .join("layer.json"),
    )
    .unwrap();
    assert!(!layer_tar.is_empty());
    let mut rebuilt = Vec::new();
    layerfs_store::tarsplit::rebuild(&s.layer_dir(&a.chain_id), &mut rebuilt).unwrap();
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(&rebuilt[..]);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        names.push(String::from_utf8_lossy(&e.path_bytes()).into_owned());
        if let Some(x) = e.header().as_ustar() {
            let _ = x;
        }
    }
    if fixture::root() {
        let at = |n: &str| {
            names
                .iter()
                .position(|x| x == n)
                .unwrap_or_else(|| panic!("no {n} in {names:?}"))
        };
        assert!(
            at("etc/") < at("etc/.wh.passwd") && at("etc/.wh.passwd") < at("etc/new"),
            "{names:?}"
        );
        assert!(
            at("opt/") < at("opt/.wh..wh..opq") && at("opt/.wh..wh..opq") < at("opt/only"),
            "{names:?}"
        );
        assert!(names.contains(&"etc/.wh.passwd".to_string()), "{names:?}");
        assert!(names.contains(&"opt/.wh..wh..opq".to_string()), "{names:?}");
        assert!(
            !String::from_utf8_lossy(&rebuilt).contains("trusted.overlay"),
            "private xattr exported"
        );
    }
}

#[test]
fn rmi_prune_verify_and_containers() {
    let Some(()) = tools() else { return };
    let (_t, s) = store();
    s.import(&image().layout, None).unwrap();
    s.tag("oci:final", "other:tag").unwrap();
    let c = s.create_container("oci:final", Some("web")).unwrap();
    // A tag with other tags left: just untagged.
    let r = s.rmi("other:tag", false).unwrap();
    assert!(r.deleted.is_none());
    let err = format!("{:#}", s.rmi("oci:final", false).unwrap_err());
    assert!(err.contains("web") && err.contains("--force"), "{err}");
    s.set_container_mounted("web", Path::new("/"), std::process::id(), &[])
        .unwrap();
    let err = format!("{:#}", s.rmi("oci:final", true).unwrap_err());
    assert!(err.contains("mounted"), "{err}");
    assert!(
        s.remove_container("web").is_err(),
        "mounted container removed"
    );
    s.set_container_unmounted("web").unwrap();
    assert!(s.rmi("oci:final", true).unwrap().deleted.is_some());
    // The container still holds its layers.
    assert_eq!(s.prune().unwrap().layers.len(), 0);
    s.remove_container(&c.name).unwrap();
    let p = s.prune().unwrap();
    assert_eq!(p.layers.len(), 2, "base layer stays for oci:base");
    assert!(p.bytes_freed > 0);
    assert!(s.verify().unwrap().iter().all(|r| r.problem.is_none()));
    // A mode change in a stored layer: verify sees the metadata.
    let fin = s.resolve_image("oci:base").unwrap();
    let diff0 = s.layer_diff_dir(&fin.layers[0]);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(diff0.join("etc/motd"), fs::Permissions::from_mode(0o600)).unwrap();
    let rows = s.verify().unwrap();
    let row = rows.iter().find(|r| r.chain_id == fin.layers[0]).unwrap();
    assert!(
        row.problem.as_deref().unwrap_or("").contains("metadata"),
        "{rows:?}"
    );
    // Damage a stored file: verify names the layer.
    let base = s.resolve_image("oci:base").unwrap();
    let f = s.layer_diff_dir(&base.layers[0]).join("etc/passwd");
    fs::write(&f, "evil\n").unwrap();
    let rows = s.verify().unwrap();
    assert!(
        rows.iter()
            .any(|r| r.chain_id == base.layers[0] && r.problem.is_some()),
        "{rows:?}"
    );
    let inspect = s.inspect_image("oci:base").unwrap();
    assert_eq!(inspect["RootFS"]["Layers"].as_array().unwrap().len(), 1);
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
