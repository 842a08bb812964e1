//! Every store subcommand runs against a store holding a small layer; errors are one line.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use clap::Parser;
use layerfs_cli::store_cmds::{StoreCommand, run};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: StoreCommand,
}

fn cmd(args: &[&str]) -> StoreCommand {
    let mut v = vec!["layerfs"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).unwrap().cmd
}

#[test]
fn every_command_runs() {
    let t = tempfile::tempdir().unwrap();
    let root = Some(t.path().join("store"));
    let src = t.path().join("tree");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hello"), "hi\n").unwrap();
    let out = t.path().join("out.tar");
    let oci = t.path().join("oci");
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let ok: Vec<Vec<String>> = vec![
        vec!["import".into(), s(&src), "-t".into(), "tree:1".into()],
        vec!["images".into()],
        vec!["images".into(), "-q".into()],
        vec!["history".into(), "tree:1".into()],
        vec!["history".into(), "--no-trunc".into(), "tree:1".into()],
        vec!["inspect".into(), "tree:1".into()],
        vec!["tag".into(), "tree:1".into(), "other".into()],
        vec!["save".into(), "tree:1".into(), "-o".into(), s(&out)],
        vec!["save".into(), "other".into(), "--oci-dir".into(), s(&oci)],
        vec!["import".into(), s(&out), "-t".into(), "again".into()],
        vec!["verify".into()],
        vec!["ps".into()],
        vec!["rmi".into(), "other".into()],
        vec!["prune".into()],
    ];
    for args in &ok {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        for json in [false, true] {
            if json && ["import", "tag", "save", "rmi"].contains(&a[0]) {
                continue;
            }
            run(cmd(&a), root.clone(), json).unwrap_or_else(|e| panic!("{a:?}: {e:#}"));
        }
    }
    let bad: &[&[&str]] = &[
        &["history", "nope"],
        &["inspect", "nope"],
        &["rm", "nope"],
        &["rmi", "nope"],
    ];
    for a in bad {
        let e = format!("{:#}", run(cmd(a), root.clone(), false).unwrap_err());
        assert!(e.contains("nope") && !e.contains('\n'), "{a:?}: {e}");
    }
}
