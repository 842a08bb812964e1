//! What is mounted where: the lines of `/proc/self/mountinfo` (proc_pid_mountinfo(5)).
//!
//! A line reads `id parent major:minor root mount-point options [optional…] - fstype source
//! super-options`; paths have space, tab, newline and backslash escaped as `\ooo` octal.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Device of the superblock (for FUSE, the minor is the connection number).
    pub major: u32,
    /// See `major`.
    pub minor: u32,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type: `ext4`, `overlay`, `fuse.layerfs`, …
    pub fstype: String,
    /// The superblock's options, e.g. `rw,data=journal`.
    pub super_options: String,
}

/// The mounts in `text`, in mount order (a later mount on a path covers an earlier one).
/// Lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// The mounts of this process's mount namespace, in mount order.
pub fn read() -> std::io::Result<Vec<Mount>> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse(&t))
}

/// The topmost mount at exactly `path`.
pub fn at(mounts: &[Mount], path: &Path) -> Option<Mount> {
    mounts.iter().rev().find(|m| m.mount_point == path).cloned()
}

fn parse_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split(' ').collect();
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let sep = fields.iter().position(|f| *f == "-")?;
    Some(Mount {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point: unescape(fields.get(4)?),
        fstype: fields.get(sep + 1)?.to_string(),
        super_options: fields.get(sep + 3).unwrap_or(&"").to_string(),
    })
}

/// Decodes the `\ooo` escapes of a path field; other bytes, non-UTF-8 ones included, are kept.
pub fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_with_optional_fields_and_escapes() {
        let text = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
42 27 7:0 / /tmp/a\\040b rw,relatime shared:5 master:2 - ext4 /dev/loop0 rw,data=journal
garbage
43 27 0:40 / /tmp/m rw - fuse.layerfs layerfs rw,user_id=0
";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!((m[1].major, m[1].minor), (7, 0));
        assert_eq!(m[1].mount_point, Path::new("/tmp/a b"));
        assert_eq!(m[1].super_options, "rw,data=journal");
        assert_eq!(m[2].fstype, "fuse.layerfs");
        assert_eq!(at(&m, Path::new("/tmp/m")).map(|m| m.minor), Some(40));
        assert_eq!(at(&m, Path::new("/tmp")), None);
    }

    #[test]
    fn unescape_keeps_what_is_not_an_escape() {
        assert_eq!(unescape(r"/a\040b\134c"), Path::new(r"/a b\c"));
        assert_eq!(unescape(r"/x\04"), Path::new(r"/x\04"));
        assert_eq!(unescape(r"/x\089"), Path::new(r"/x\089"));
        assert_eq!(unescape(r"/\377").as_os_str().as_bytes(), b"/\xff");
    }
}
