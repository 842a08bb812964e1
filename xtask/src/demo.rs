//! `cargo xtask demo`: the main job on a small two-layer tree the project builds itself —
//! build, mount, `ls`, edit a file, delete one, rename a lower directory, `layerfs diff`, unmount.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::ci::workspace;

fn show(cmd: &mut Command) -> anyhow::Result<()> {
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    println!("$ {}", line.join(" "));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", line[0]))?;
    if !status.success() {
        bail!("{} failed ({status})", line.join(" "));
    }
    Ok(())
}

fn sh(script: &str, dir: &Path) -> anyhow::Result<()> {
    show(Command::new("sh").arg("-c").arg(script).current_dir(dir))
}

/// Builds the tree, mounts it, changes it, prints the diff, unmounts.
pub fn run(_args: &[String]) -> anyhow::Result<()> {
    crate::setup::ensure_demo_packages()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .current_dir(workspace())
        .args(["build", "--release", "-p", "layerfs"])
        .status()
        .context("cannot run cargo")?;
    if !ok.success() {
        bail!("cargo build failed");
    }
    let bin: PathBuf = workspace().join("target/release/layerfs");
    let base = std::env::temp_dir().join(format!("layerfs-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let result = demo(&bin, &base);
    let _ = Command::new(&bin)
        .arg("umount")
        .arg(base.join("merged"))
        .output();
    let _ = Command::new(&bin)
        .arg("umount")
        .arg(base.join("c1"))
        .output();
    if base.starts_with(std::env::temp_dir()) && base.file_name().is_some() {
        let _ = std::fs::remove_dir_all(&base);
    }
    result
}

fn demo(bin: &Path, base: &Path) -> anyhow::Result<()> {
    println!("# two layers: a base system and an app layer that deletes and changes things");
    sh(
        "mkdir -p base/etc base/usr/share/doc base/var/log app/etc app/opt/app upper work merged \
         && echo 'root:x:0:0:root:/root:/bin/sh' > base/etc/passwd \
         && echo 'welcome to base' > base/etc/motd \
         && echo 'base docs' > base/usr/share/doc/README \
         && echo 'boot ok' > base/var/log/boot.log \
         && echo 'app config' > app/etc/app.conf \
         && echo '#!/bin/sh' > app/opt/app/run && chmod 755 app/opt/app/run",
        base,
    )?;
    let b = bin.display();
    println!("# mount: app on top of base, writes go to upper/");
    sh(
        &format!("{b} mount --lower app --lower base --upper upper --work work merged"),
        base,
    )?;
    sh("ls -l merged merged/etc", base)?;
    sh("cat merged/etc/motd", base)?;
    println!("# edit a lower file (copy-up), delete one, rename a lower directory, add one");
    sh("echo 'edited in the container' >> merged/etc/motd", base)?;
    sh("rm merged/etc/passwd", base)?;
    sh(
        "mv merged/usr/share/doc merged/usr/share/documentation",
        base,
    )?;
    sh("mkdir merged/srv && echo hi > merged/srv/hello.txt", base)?;
    sh(
        "cat merged/etc/motd && ls merged/etc merged/usr/share",
        base,
    )?;
    println!("# what changed, as `docker diff` prints it");
    sh(&format!("{b} diff merged"), base)?;
    println!("# the upper dir holds only the changes (kernel overlayfs format)");
    sh("find upper | sort", base)?;
    sh(&format!("{b} umount merged"), base)?;
    println!("# unmounted; diff without a mount, from the dirs:");
    sh(
        &format!("{b} diff --upper upper --lower app --lower base"),
        base,
    )?;
    store_demo(b, base)
}

/// The layer store: import an image, run a container from it, change it, commit, save.
fn store_demo(b: std::path::Display<'_>, base: &Path) -> anyhow::Result<()> {
    println!();
    println!(
        "# the layer store: import an image, mount it as a container, edit, diff, commit, save"
    );
    let r = format!("{b} --root {}", base.join("store").display());
    sh("tar -C base -cf base.tar .", base)?;
    sh(&format!("{r} import base.tar --tag demo:base"), base)?;
    sh(&format!("{r} images"), base)?;
    sh(
        &format!("mkdir -p c1 && {r} mount demo:base c1 --name c1"),
        base,
    )?;
    sh("ls -l c1/etc", base)?;
    sh(
        "echo 'changed in c1' >> c1/etc/motd && rm c1/etc/passwd",
        base,
    )?;
    sh(&format!("{r} diff c1"), base)?;
    sh(&format!("{r} commit c1 --tag demo:edited"), base)?;
    sh(&format!("{r} umount c1 && {r} ps"), base)?;
    sh(&format!("{r} history demo:edited"), base)?;
    sh(
        &format!("{r} save demo:edited -o edited.tar && tar -tf edited.tar"),
        base,
    )?;
    sh(&format!("{r} images"), base)?;
    Ok(())
}
