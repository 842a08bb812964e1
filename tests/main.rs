//! The one integration-test binary: real mounts, compared with kernel overlayfs.
//!
//! `LAYERFS_SUT=kernel cargo test --test integration` runs everything kernel-vs-kernel (harness check).

mod diff_expect;
mod differential;
mod dual;
mod fsops;
mod interop;
mod mount_cli;
mod opgen;
mod scenarios;
mod util;
