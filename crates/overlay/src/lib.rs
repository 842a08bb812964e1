//! The layerfs union filesystem: lower directories merged top-down under a writable upper
//! directory, with kernel overlayfs semantics (reference/overlay-semantics.md).
//!
//! Request path: kernel → [`fuse`] (the only module that sees fuser) → an [`Overlay`] operation
//! (`Result<_, Errno>`) → [`layerfs_sys`] fd-relative syscalls on the layer directories.

pub mod acl;
pub mod attrs;
pub mod changes;
pub mod copyup;
mod dirfds;
pub mod durability;
pub mod fuse;
pub mod group;
pub mod handles;
pub mod index;
pub mod io;
pub mod layers;
pub mod namespace;
pub mod node;
pub mod overlay;
pub mod rename;
pub mod stats;

pub use layers::OverlayConfig;
pub use overlay::Overlay;
