//! The system layer of layerfs: every syscall the other crates make on a layer, an upper or a work
//! directory goes through here.
//!
//! Two rules hold for everything in this crate:
//! - A name that came from outside (the kernel, a tar, a user) reaches a path syscall only as a
//!   [`Component`]: one path component, never `.`/`..`, never containing `/` or NUL, at most 255 bytes.
//!   Every call is relative to a directory fd and does not follow a symlink in the last component,
//!   so nothing a layer holds can lead a call outside that layer.
//! - Errors are raw errnos ([`Errno`]) so the FUSE front can answer the kernel with exactly what the
//!   backing filesystem said.
//!
//! `unsafe` is allowed in this crate only; each block carries a `// SAFETY:` line.

pub mod copy;
pub mod dir;
pub mod fd;
pub mod fuse_uring;
pub mod mountinfo;
pub mod name;
pub mod process;
pub mod xattr;

pub use fd::*;
pub use name::Component;
pub use rustix::io::Errno;

/// Result of a syscall wrapper: the raw errno on failure.
pub type SysResult<T> = Result<T, Errno>;
