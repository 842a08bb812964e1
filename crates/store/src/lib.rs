//! The layerfs layer store: content-addressed layers and images, import and export of real image
//! formats, containers, cleanup.
//!
//! ```text
//! <root>/                              /var/lib/layerfs as root, $XDG_DATA_HOME/layerfs otherwise,
//!                                      LAYERFS_ROOT or --root to change it
//!   lock                               flock: shared for reads, exclusive for every change
//!   layers/<chain-id hex>/             one layer, named by its ChainID (so by its whole stack below)
//!     diff/                            the extracted layer in the overlay on-disk format (char 0/0
//!                                      whiteouts, trusted.overlay.opaque=y as root; `.wh.` files and
//!                                      user.overlay.opaque=y otherwise); never written after publish
//!     layer.json                       LayerRecord: diff_id, chain_id, parent, size, created,
//!                                      created_by, meta_digest (metadata of diff/ at publish)
//!     tar-split.zst                    the layer tar minus file contents: with diff/ it rebuilds the
//!                                      exact tar whose sha256 is diff_id (save, verify)
//!     tar-split.saved/<n>              contents of files a later entry of the same tar replaced
//!   images/<image id hex>.json         ImageRecord: config bytes, layer chain ids, tags, source
//!   containers/<container id hex>/
//!     upper/ work/                     the container's overlay upper and work dirs
//!     container.json                   ContainerRecord: name, image, lower dirs (top first),
//!                                      mountpoint, pid
//!   tmp/<random>/                      staging; everything is published by rename(2)
//! ```
//!
//! Invariants:
//! - A layer directory appears under `layers/` only complete (built in `tmp/`, synced, renamed).
//!   An already-present layer is success: layers are shared by every image that holds them.
//! - An image record is written (tmp + rename) only after all its layers are published.
//! - Every change runs under the exclusive store lock; readers take it shared. The lock is not
//!   reentrant: public methods take it, private `*_locked` helpers expect it taken.
//! - fsync policy: one `syncfs` of the store's filesystem before each publishing rename, and an
//!   fsync of every record file before its rename; nothing else.

pub mod commit;
pub mod containers;
pub mod digest;
pub mod export;
pub mod extract;
pub mod format;
pub mod images;
pub mod import;
pub mod save;
mod sources;
pub mod store;
pub mod tarsplit;
pub mod util;

pub use digest::{Digest, chain_id};
pub use store::{ImageRecord, LayerRecord, Store, StoreError};
