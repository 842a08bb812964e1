//! Bad input: hostile tars, broken images, odd and over-long names, a full disk. Each is refused
//! (or cleaned) and leaves the store as it was.

use super::*;

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
    let (dir, mut m) = extract_docker_archive(&t.path().join("docker-dir"));
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
