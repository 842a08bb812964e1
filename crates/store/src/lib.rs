//! The layerfs layer store.
//!
//! For now this crate holds the on-disk layer format ([`format`]): how whiteouts and opaque
//! directories are encoded in an upper dir or an extracted layer, read and written.

pub mod format;
