//! `layerfs diff` checked line by line against hand-written expectations (overlay-semantics.md, "diff"):
//! A, C, D, parent-C lines, an opaque directory (rm -rf + mkdir over a lower dir), a renamed lower dir, a
//! deleted-and-recreated file, owner-only and xattr-only changes, and a directory whose only change is its
//! mtime (copied up, but not listed).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{Fixture, Impl, Layers, Mount, can_mount, layerfs_bin, sh_ok, skip, sut};

const BOTTOM: &str = r#"
mkdir -p base old/sub opq nest/l1/l2
echo keep > base/keep.txt
echo gone > base/gone.txt
echo edit > base/edit.txt
echo a > old/a.txt
echo b > old/sub/b.txt
echo x > opq/x.txt
echo y > opq/y.txt
echo deep > nest/l1/l2/file.txt
echo top > top.txt
echo r > recreate.txt
mkdir -p owned/sub mtimeonly
echo o > owned/sub/o.txt
echo m > mtimeonly/m.txt
"#;

const TOP: &str = r#"
mkdir -p base untouched
echo extra > base/extra.txt
echo c > chmodme.txt
echo u > untouched/u.txt
"#;

const SCRIPT: &str = r#"
set -e
echo new >> base/edit.txt
rm base/gone.txt
echo hi > base/new.txt
mv old renamed
rm -rf opq && mkdir opq && echo z > opq/z.txt
chmod 600 chmodme.txt
mkdir -p newdir/deep && echo q > newdir/deep/f
echo more >> nest/l1/l2/file.txt
rm top.txt
rm recreate.txt && echo again > recreate.txt
chown 1000:1000 owned
touch mtimeonly
python3 -c 'import os; os.setxattr("untouched/u.txt", "user.k", b"v")'
"#;

const EXPECTED: &str = "\
C /base
C /base/edit.txt
D /base/gone.txt
A /base/new.txt
C /chmodme.txt
C /nest
C /nest/l1
C /nest/l1/l2
C /nest/l1/l2/file.txt
A /newdir
A /newdir/deep
A /newdir/deep/f
D /old
C /opq
D /opq/x.txt
D /opq/y.txt
A /opq/z.txt
C /owned
C /recreate.txt
A /renamed
A /renamed/a.txt
A /renamed/sub
A /renamed/sub/b.txt
D /top.txt
C /untouched
C /untouched/u.txt
";

fn lowers(fix: &Fixture) -> Vec<PathBuf> {
    let top = fix.dir("lower0");
    let bottom = fix.dir("lower1");
    sh_ok(&top, TOP);
    sh_ok(&bottom, BOTTOM);
    sh_ok(
        fix.path(),
        "find lower0 lower1 -exec touch -h -d @1000000000 {} +",
    );
    vec![top, bottom]
}

fn layerfs_diff(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = crate::util::output(Command::new(layerfs_bin()).arg("diff").args(args))
        .expect("spawn layerfs diff");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn offline_args(layers: &Layers) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec!["--upper".into(), layers.upper.clone().into()];
    for l in &layers.lowers {
        v.push("--lower".into());
        v.push(l.clone().into());
    }
    v
}

fn assert_lines(what: &str, got: &str) {
    let exp: Vec<&str> = EXPECTED.lines().collect();
    let got_l: Vec<&str> = got.lines().collect();
    let mut report = String::new();
    for i in 0..exp.len().max(got_l.len()) {
        let (e, g) = (exp.get(i).copied(), got_l.get(i).copied());
        if e != g {
            report += &format!("line {}: expected {e:?}, got {g:?}\n", i + 1);
        }
    }
    assert!(
        report.is_empty(),
        "{what}: diff output differs from expectation:\n{report}--- full output ---\n{got}"
    );
}

/// Runs SCRIPT on an `imp` mount; returns its layers (unmounted again unless `keep`).
fn written_by(fix: &Fixture, lowers: &[PathBuf], imp: Impl, side: &str) -> (Layers, Mount) {
    let (upper, work) = fix.upper_work(side);
    let layers = Layers {
        lowers: lowers.to_vec(),
        upper,
        work,
        options: Vec::new(),
    };
    let m = Mount::new(imp, &layers, &fix.mountpoint(side));
    sh_ok(&m.path, SCRIPT);
    (layers, m)
}

/// `--json` is Docker's `ContainerChanges` shape: `[{"Kind": 0|1|2, "Path": "/p"}]` with 0 = C, 1 = A,
/// 2 = D; it must carry exactly the expected changes in order.
fn check_json(what: &str, json: &str) {
    let v: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("{what}: --json output is not JSON ({e}):\n{json}"));
    let items = v
        .as_array()
        .unwrap_or_else(|| panic!("{what}: --json is not an array:\n{json}"));
    let mut lines = String::new();
    for it in items {
        let kind = match it.get("Kind").and_then(|k| k.as_u64()) {
            Some(0) => 'C',
            Some(1) => 'A',
            Some(2) => 'D',
            other => panic!("{what}: bad Kind {other:?} in {it}"),
        };
        let path = it
            .get("Path")
            .and_then(|p| p.as_str())
            .unwrap_or_else(|| panic!("{what}: no Path in {it}"));
        lines += &format!("{kind} {path}\n");
    }
    assert_lines(what, &lines);
}

/// `layerfs diff MOUNTPOINT` on a live layerfs mount, and `--json`.
#[test]
fn diff_of_live_mount() {
    if !can_mount("diff_of_live_mount") {
        return;
    }
    if sut() != Impl::Layerfs {
        skip(
            "diff_of_live_mount",
            "LAYERFS_SUT is not layerfs: `layerfs diff MOUNTPOINT` needs a layerfs mount",
        );
        return;
    }
    let fix = Fixture::new("diff-live");
    let lowers = lowers(&fix);
    let (_layers, m) = written_by(&fix, &lowers, Impl::Layerfs, "s");
    let (ok, out, err) = layerfs_diff(&[m.path.as_os_str()]);
    assert!(ok, "layerfs diff failed: {err}");
    assert_lines("layerfs diff MOUNTPOINT", &out);
    let (ok, json, err) = layerfs_diff(&["--json".as_ref(), m.path.as_os_str()]);
    assert!(ok, "layerfs diff --json failed: {err}");
    check_json("layerfs diff --json MOUNTPOINT", &json);
    m.unmount();
}

/// `layerfs diff --upper U --lower …` over the upper the system under test wrote.
#[test]
fn diff_offline_sut_upper() {
    if !can_mount("diff_offline_sut_upper") {
        return;
    }
    let fix = Fixture::new("diff-sut");
    let lowers = lowers(&fix);
    let (layers, m) = written_by(&fix, &lowers, sut(), "s");
    m.unmount();
    let args = offline_args(&layers);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, out, err) = layerfs_diff(&args);
    assert!(ok, "layerfs diff --upper failed: {err}");
    assert_lines(
        "layerfs diff --upper (upper written by the system under test)",
        &out,
    );
}

/// The same offline diff over an upper that kernel overlayfs wrote (char 0/0 whiteouts, trusted.overlay.*
/// opaque and redirect xattrs) gives the same lines.
#[test]
fn diff_offline_kernel_upper() {
    if !can_mount("diff_offline_kernel_upper") {
        return;
    }
    let fix = Fixture::new("diff-kernel");
    let lowers = lowers(&fix);
    let (layers, m) = written_by(&fix, &lowers, Impl::Kernel, "k");
    m.unmount();
    let args = offline_args(&layers);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, out, err) = layerfs_diff(&args);
    assert!(ok, "layerfs diff --upper failed: {err}");
    assert_lines(
        "layerfs diff --upper (upper written by kernel overlayfs)",
        &out,
    );
}

/// A path that is not a layerfs mount gets an error, not empty output.
#[test]
fn diff_of_non_mount_fails() {
    let fix = Fixture::new("diff-nomount");
    let d: &Path = &fix.dir("plain");
    let (ok, out, err) = layerfs_diff(&[d.as_os_str()]);
    assert!(
        !ok,
        "layerfs diff on a plain dir succeeded with output {out:?}"
    );
    assert!(!err.trim().is_empty(), "no error message");
}
