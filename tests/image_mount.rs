//! A real image, made by umoci and exported by skopeo, through the whole product: import each
//! form, `layerfs mount IMAGE` (a FUSE mount of a new container), compare with what
//! `umoci unpack` gives, edit, `diff`, `commit`, `save`, and hand the result back to skopeo.

use std::path::Path;
use std::process::Command;

use crate::util::{can_mount, layerfs_bin, output};

#[allow(clippy::unwrap_used)]
#[path = "../crates/store/tests/fixture/mod.rs"]
mod fixture;

/// `layerfs --root ROOT ARGS…`, which must succeed; returns stdout.
fn lfs(root: &Path, args: &[&str]) -> String {
    let out = output(
        Command::new(layerfs_bin())
            .arg("--root")
            .arg(root)
            .args(args),
    )
    .expect("run layerfs");
    assert!(
        out.status.success(),
        "layerfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn image_forms_mount_edit_commit_save() {
    if !can_mount("image_forms_mount_edit_commit_save") {
        return;
    }
    let Some(()) = fixture::tools() else { return };
    let img = fixture::image();
    let want = fixture::snapshot(&img.rootfs);
    // A regular file of the image to delete through the mount.
    let victim = want
        .iter()
        .find(|(p, n)| n.kind == "file" && !p.contains('/'))
        .or_else(|| want.iter().find(|(_, n)| n.kind == "file"))
        .map(|(p, _)| p.clone())
        .expect("the image has a regular file");
    let forms = [
        ("docker-archive", &img.docker_archive),
        ("oci-archive", &img.oci_archive),
        ("oci-zstd", &img.zstd_layout),
    ];
    for (form, source) in forms {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("store");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let src = source.to_str().expect("utf-8 path");
        lfs(&root, &["import", src, "--tag", &format!("img:{form}")]);
        lfs(
            &root,
            &[
                "mount",
                &format!("img:{form}"),
                mnt.to_str().expect("utf-8"),
                "--name",
                "c1",
            ],
        );
        // The merged view is the image as umoci unpacks it.
        let got = fixture::snapshot(&mnt);
        let keys = |m: &std::collections::BTreeMap<String, fixture::Node>| {
            m.keys().cloned().collect::<Vec<_>>()
        };
        assert_eq!(
            keys(&got),
            keys(&want),
            "{form}: paths differ from umoci unpack"
        );
        for (k, w) in &want {
            assert_eq!(&got[k], w, "{form}: {k} differs from umoci unpack");
        }
        // Edit, and see it in `diff`.
        std::fs::write(mnt.join("added-by-test"), "new\n").expect("write");
        std::fs::remove_file(mnt.join(&victim)).expect("rm");
        let diff = lfs(&root, &["diff", "c1"]);
        assert!(
            diff.lines().any(|l| l == "A /added-by-test"),
            "{form}: diff {diff}"
        );
        assert!(
            diff.lines().any(|l| l == format!("D /{victim}")),
            "{form}: diff {diff}"
        );
        // Commit while mounted, unmount, save, and give it to skopeo.
        lfs(&root, &["commit", "c1", "--tag", "img:edited"]);
        lfs(&root, &["umount", mnt.to_str().expect("utf-8")]);
        let history = lfs(&root, &["history", "img:edited"]);
        assert!(
            history.contains("layerfs commit c1"),
            "{form}: history {history}"
        );
        let saved = tmp.path().join("edited.tar");
        lfs(
            &root,
            &["save", "img:edited", "-o", saved.to_str().expect("utf-8")],
        );
        let inspect = output(
            Command::new("skopeo")
                .arg("inspect")
                .arg(format!("docker-archive:{}", saved.display())),
        )
        .expect("skopeo");
        assert!(
            inspect.status.success(),
            "{form}: skopeo inspect: {}",
            String::from_utf8_lossy(&inspect.stderr)
        );
        // The saved image, imported into a fresh store and mounted, shows the edits.
        let root2 = tmp.path().join("store2");
        lfs(
            &root2,
            &["import", saved.to_str().expect("utf-8"), "--tag", "back:1"],
        );
        lfs(&root2, &["mount", "back:1", mnt.to_str().expect("utf-8")]);
        assert_eq!(
            std::fs::read_to_string(mnt.join("added-by-test")).expect("read"),
            "new\n"
        );
        assert!(!mnt.join(&victim).exists(), "{form}: {victim} came back");
        lfs(&root2, &["umount", mnt.to_str().expect("utf-8")]);
    }
}
