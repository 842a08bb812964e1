//! The one integration-test binary: real mounts, compared with kernel overlayfs.

mod differential;
mod fsops;
mod opgen;
mod util;
