//! The overlay on-disk format of upper dirs and stored layers: how a deletion (whiteout) and a
//! directory that hides everything below it (opaque dir) are written and read.
//!
//! Reading accepts every encoding in use:
//! - whiteout: a char device 0/0 (kernel overlayfs); a `.wh.NAME` file (OCI tars, unprivileged
//!   overlays); a zero-size regular file with an `overlay.whiteout` xattr inside a directory marked
//!   `overlay.opaque=x` (kernel ≥ 6.7 "xwhiteout");
//! - opaque: `trusted.overlay.opaque=y`, `user.overlay.opaque=y`, or a `.wh..wh..opq` entry.
//!
//! Writing uses [`Encoding::Kernel`] (char 0/0 and `trusted.overlay.opaque=y`) where privileges
//! allow, so a kernel overlay mount of the same directories shows the same tree; otherwise
//! [`Encoding::Unprivileged`] (`.wh.NAME` files and `user.overlay.opaque=y`).
//!
//! Private xattrs (`trusted.overlay.*`, `user.overlay.*`, `trusted.layerfs.*`, `user.layerfs.*`)
//! belong to this format and never show in a merged view or an exported layer.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use layerfs_sys::{self as sys, Component, FileType, Mode, Stat, SysResult, xattr};

/// Prefix of an OCI whiteout file name.
pub const WH_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque marker entry.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// How this process writes whiteouts and opaque markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Char device 0/0 and `trusted.overlay.opaque=y` (needs CAP_MKNOD and CAP_SYS_ADMIN).
    Kernel,
    /// `.wh.NAME` files and `user.overlay.opaque=y`.
    Unprivileged,
}

impl Encoding {
    /// The encoding this process can write: `Kernel` as root, else `Unprivileged`.
    pub fn for_this_process() -> Self {
        if rustix::process::geteuid().is_root() {
            Encoding::Kernel
        } else {
            Encoding::Unprivileged
        }
    }

    /// Whether `name` is private to the overlay in this encoding: what the kernel hides from a
    /// merged view (`trusted.overlay.*` as root, `user.overlay.*` with `userxattr`). Other
    /// names — `user.overlay.*` as root included — are ordinary attributes.
    pub fn is_private(self, name: &[u8]) -> bool {
        let p = self.private_prefix();
        name.starts_with(p) && !name[p.len()..].starts_with(b"overlay.")
    }

    /// `trusted.overlay.` or `user.overlay.`.
    fn private_prefix(self) -> &'static [u8] {
        match self {
            Encoding::Kernel => b"trusted.overlay.",
            Encoding::Unprivileged => b"user.overlay.",
        }
    }

    /// The name under which an attribute set through a merged view is stored: a name in the
    /// private namespace is escaped (`trusted.overlay.X` → `trusted.overlay.overlay.X`), as the
    /// kernel overlay does for nested overlays; any other name is stored as it is.
    pub fn escape(self, name: &[u8]) -> Vec<u8> {
        let p = self.private_prefix();
        match name.strip_prefix(p) {
            Some(rest) => [p, b"overlay.", rest].concat(),
            None => name.to_vec(),
        }
    }

    /// The name a merged view shows for a stored attribute name; `None` for a private one.
    pub fn unescape(self, stored: &[u8]) -> Option<Vec<u8>> {
        let p = self.private_prefix();
        match stored.strip_prefix(p) {
            Some(rest) => rest.strip_prefix(b"overlay.").map(|r| [p, r].concat()),
            None => Some(stored.to_vec()),
        }
    }

    /// Name of the xattr in which layerfs records a copied-up object's original `st_ino`. It sits
    /// in the overlay's private namespace, so a kernel overlay mount hides it too.
    pub fn origin_xattr(self) -> &'static OsStr {
        match self {
            Encoding::Kernel => OsStr::new("trusted.overlay.layerfs.origin"),
            Encoding::Unprivileged => OsStr::new("user.overlay.layerfs.origin"),
        }
    }

    /// Name of the xattr holding the merged-view link count of a lower hard-link group.
    pub fn nlink_xattr(self) -> &'static OsStr {
        match self {
            Encoding::Kernel => OsStr::new("trusted.overlay.layerfs.nlink"),
            Encoding::Unprivileged => OsStr::new("user.overlay.layerfs.nlink"),
        }
    }

    /// Name of the kernel's redirect xattr (a moved directory's lower path).
    pub fn redirect_xattr(self) -> &'static OsStr {
        match self {
            Encoding::Kernel => OsStr::new("trusted.overlay.redirect"),
            Encoding::Unprivileged => OsStr::new("user.overlay.redirect"),
        }
    }

    fn opaque_xattr(self) -> &'static OsStr {
        match self {
            Encoding::Kernel => OsStr::new("trusted.overlay.opaque"),
            Encoding::Unprivileged => OsStr::new("user.overlay.opaque"),
        }
    }
}

/// What a name in a layer directory stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameKind<'a> {
    /// An ordinary entry.
    Plain,
    /// `.wh.NAME`: NAME is deleted from the layers below.
    WhiteoutFor(&'a [u8]),
    /// `.wh..wh..opq`: the directory is opaque.
    OpaqueMarker,
    /// Another `.wh..wh.*` name (AUFS metadata): ignored.
    Meta,
    /// `.wh.` alone: malformed.
    Invalid,
}

/// Classifies a directory entry name.
pub fn classify_name(name: &[u8]) -> NameKind<'_> {
    if name == OPAQUE_MARKER {
        NameKind::OpaqueMarker
    } else if name.starts_with(b".wh..wh.") {
        NameKind::Meta
    } else if let Some(target) = name.strip_prefix(WH_PREFIX) {
        if target.is_empty() {
            NameKind::Invalid
        } else {
            NameKind::WhiteoutFor(target)
        }
    } else {
        NameKind::Plain
    }
}

/// Whether `st` is a kernel whiteout (char device 0/0).
pub fn is_chardev_whiteout(st: &Stat) -> bool {
    sys::file_type(st) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Whether a zero-size regular file is an "xwhiteout" (kernel ≥ 6.7): it carries an
/// `overlay.whiteout` xattr. Only meaningful inside a directory marked `opaque=x`.
pub fn is_xwhiteout(fd: BorrowedFd<'_>, st: &Stat) -> bool {
    sys::file_type(st) == FileType::RegularFile
        && st.st_size == 0
        && (xattr::get(fd, OsStr::new("trusted.overlay.whiteout")).is_ok()
            || xattr::get(fd, OsStr::new("user.overlay.whiteout")).is_ok())
}

/// The opaque state of a layer directory, from its xattrs alone (a `.wh..wh..opq` entry is seen by
/// whoever lists the directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirMark {
    /// No mark.
    Plain,
    /// Opaque: hides every lower directory of the same path.
    Opaque,
    /// Not opaque, but may hold xwhiteouts (`opaque=x`).
    HasXWhiteouts,
}

/// Reads the opaque xattrs of the directory behind `dir`.
pub fn dir_mark(dir: BorrowedFd<'_>) -> DirMark {
    dir_xattrs(dir, None).0
}

/// The opaque mark of the directory behind `dir` and, with `redirect` (the redirect xattr's
/// name), its redirect target. One `listxattr`; a value is read only for a name that is there,
/// so a directory without overlay xattrs (the usual case) costs one call however many are asked.
pub fn dir_xattrs(dir: BorrowedFd<'_>, redirect: Option<&OsStr>) -> (DirMark, Option<Vec<u8>>) {
    let names = xattr::list_dir(dir).unwrap_or_default();
    let has = |name: &OsStr| names.iter().any(|n| n.as_slice() == name.as_bytes());
    let mut mark = DirMark::Plain;
    for name in ["trusted.overlay.opaque", "user.overlay.opaque"].map(OsStr::new) {
        if has(name) {
            match xattr::get_dir(dir, name).as_deref() {
                Ok(b"y") => {
                    mark = DirMark::Opaque;
                    break;
                }
                Ok(b"x") => {
                    mark = DirMark::HasXWhiteouts;
                    break;
                }
                _ => {}
            }
        }
    }
    let target = redirect
        .filter(|r| mark != DirMark::Opaque && has(r))
        .and_then(|r| xattr::get_dir(dir, r).ok());
    (mark, target)
}

/// Marks the directory behind `dir` opaque.
pub fn set_opaque(dir: BorrowedFd<'_>, enc: Encoding) -> SysResult<()> {
    xattr::set(dir, enc.opaque_xattr(), b"y", 0)
}

/// Removes an opaque mark from the directory behind `dir` (absent marks are fine).
pub fn clear_opaque(dir: BorrowedFd<'_>) -> SysResult<()> {
    for name in ["trusted.overlay.opaque", "user.overlay.opaque"] {
        match xattr::remove(dir, OsStr::new(name)) {
            Ok(()) | Err(sys::Errno::NODATA) | Err(sys::Errno::OPNOTSUPP) => {}
            Err(sys::Errno::PERM) if name.starts_with("trusted.") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a whiteout for `name` in `dir`.
pub fn write_whiteout(dir: BorrowedFd<'_>, name: &Component, enc: Encoding) -> SysResult<()> {
    match enc {
        Encoding::Kernel => sys::mknod_at(dir, name, FileType::CharacterDevice, Mode::empty(), 0),
        Encoding::Unprivileged => {
            let wh = whiteout_file_name(name)?;
            sys::open_at(
                dir,
                &wh,
                sys::OFlags::CREATE | sys::OFlags::EXCL | sys::OFlags::WRONLY,
                Mode::from_raw_mode(0o600),
            )
            .map(drop)
        }
    }
}

/// `.wh.NAME` for `name` (ENAMETOOLONG when it would pass 255 bytes).
pub fn whiteout_file_name(name: &Component) -> SysResult<Component> {
    let mut bytes = WH_PREFIX.to_vec();
    bytes.extend_from_slice(name.as_bytes());
    Component::new(OsStr::from_bytes(&bytes))
}

/// Whether an xattr name is private to the overlay format (never shown, never exported).
pub fn is_private_xattr(name: &[u8]) -> bool {
    const PRIVATE: [&[u8]; 4] = [
        b"trusted.overlay.",
        b"user.overlay.",
        b"trusted.layerfs.",
        b"user.layerfs.",
    ];
    PRIVATE.iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified() {
        let cases: &[(&[u8], NameKind<'_>)] = &[
            (b"etc", NameKind::Plain),
            (b".wh.passwd", NameKind::WhiteoutFor(b"passwd")),
            (b".wh..wh..opq", NameKind::OpaqueMarker),
            (b".wh..wh.plnk", NameKind::Meta),
            (b".wh.", NameKind::Invalid),
            (b".whx", NameKind::Plain),
            (b".wh..hidden", NameKind::WhiteoutFor(b".hidden")),
        ];
        for (name, want) in cases {
            assert_eq!(
                classify_name(name),
                *want,
                "{}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn private_xattrs() {
        assert!(is_private_xattr(b"trusted.overlay.opaque"));
        assert!(is_private_xattr(b"user.overlay.origin"));
        assert!(is_private_xattr(b"trusted.layerfs.x"));
        assert!(!is_private_xattr(b"user.comment"));
        assert!(!is_private_xattr(b"security.capability"));
    }

    #[test]
    fn whiteouts_round_trip_unprivileged() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = sys::open_root(tmp.path()).unwrap();
        let name = Component::new("gone").unwrap();
        write_whiteout(dir.as_fd(), &name, Encoding::Unprivileged).unwrap();
        let entries = sys::dir::read_all(dir.as_fd()).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            classify_name(entries[0].name.as_bytes()),
            NameKind::WhiteoutFor(b"gone")
        );
    }

    use std::os::fd::AsFd;
}
