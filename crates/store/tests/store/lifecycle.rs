//! After import: commit of an upper dir, save and re-import, rmi, prune, verify, containers.

use super::*;

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
