//! The one integration-test binary: real mounts, compared with kernel overlayfs.
//!
//! - `cargo test --test integration` — everything against layerfs (root needed; tests that cannot run print
//!   `skipped: <reason>`).
//! - `LAYERFS_SUT=kernel cargo test --test integration` — the same tests kernel-vs-kernel (harness check).
//! - `cargo xtask fuzz --seqs N [--seed S] [--only SEED] [--exclude KIND,…]` — a longer differential run; see
//!   `differential.rs` for the environment variables it sets.
//!
//! Modules: `util` (fixture, mounts), `snapshot` (trees compared by), `opgen` (seeded lowers and op sequences), `fsops` (runs
//! one op, renders its outcome), `differential` (the fuzzer and shrinker), `dual` (two mounts over the
//! standard lowers), `scenarios` (real programs), `interop` (uppers across implementations),
//! `diff_expect` (`layerfs diff` line by line), `posix` (POSIX corner cases a pjdfstest run showed), `cli` (the mount command line), `data_path` (reads and mmap through the mount), `durability` (power cut
//! and killed daemon during copy-up).
//! Divergences found so far: `tests/DIVERGENCES.md`.

mod cli;
mod data_path;
mod diff_expect;
mod differential;
mod dual;
mod durability;
mod fsops;
mod image_mount;
mod interop;
mod lowergen;
mod mount_cli;
mod opgen;
mod posix;
mod scenarios;
mod snapshot;
mod util;
