//! [`Component`]: the only form in which an outside name reaches a path syscall.

use std::ffi::{CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;

use crate::{Errno, SysResult};

/// Longest name a single component may have (NAME_MAX).
pub const NAME_MAX: usize = 255;

/// One validated path component: non-empty, not `.` or `..`, no `/` or NUL, at most [`NAME_MAX`]
/// bytes. Built only by [`Component::new`]; carries its NUL-terminated form for syscalls.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Component(CString);

impl Component {
    /// Validates `name`. `.`/`..`/empty/`/` give `EINVAL`; over 255 bytes gives `ENAMETOOLONG`.
    pub fn new(name: impl AsRef<OsStr>) -> SysResult<Self> {
        let bytes = name.as_ref().as_bytes();
        if bytes.len() > NAME_MAX {
            return Err(Errno::NAMETOOLONG);
        }
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(Errno::INVAL);
        }
        CString::new(bytes).map(Component).map_err(|_| Errno::INVAL)
    }

    /// The name as bytes, without the trailing NUL.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The name as an `OsStr`.
    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(self.as_bytes())
    }

    /// The NUL-terminated form handed to syscalls.
    pub fn as_c_str(&self) -> &CStr {
        &self.0
    }
}

impl AsRef<OsStr> for Component {
    fn as_ref(&self) -> &OsStr {
        self.as_os_str()
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_os_str().to_string_lossy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_validated() {
        let cases: &[(&[u8], Option<Errno>)] = &[
            (b"etc", None),
            (b".wh.x", None),
            (b"...", None),
            (b"", Some(Errno::INVAL)),
            (b".", Some(Errno::INVAL)),
            (b"..", Some(Errno::INVAL)),
            (b"a/b", Some(Errno::INVAL)),
            (b"/", Some(Errno::INVAL)),
            (b"a\0b", Some(Errno::INVAL)),
        ];
        for (name, want) in cases {
            let got = Component::new(OsStr::from_bytes(name)).err();
            assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(name));
        }
        assert_eq!(
            Component::new("x".repeat(255)).map(|c| c.as_bytes().len()),
            Ok(255)
        );
        assert_eq!(
            Component::new("x".repeat(256)).err(),
            Some(Errno::NAMETOOLONG)
        );
    }
}
