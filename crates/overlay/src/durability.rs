//! The fsync policy of copy-up, in one place: what makes a copied-up file's data durable before
//! the rename that publishes it, chosen once per mount from the upper's filesystem.
//!
//! A crash must never leave a renamed-in copy that is empty or partial. The kernel overlay fsyncs
//! every copy (a journal commit and a device cache flush per file); most of that is not needed
//! where the upper filesystem itself orders the data before the rename:
//!
//! | upper filesystem | policy | why it is enough |
//! |---|---|---|
//! | any, mount option `volatile` | [`SyncPolicy::Volatile`]: nothing | the user asked for no crash safety |
//! | tmpfs, ramfs | [`SyncPolicy::Memory`]: nothing | nothing survives a crash anyway |
//! | ext4 `data=journal` | [`SyncPolicy::Journaled`]: nothing | the data is journaled by the writes themselves, in a transaction no later than the rename's |
//! | ext4 `data=ordered` | [`SyncPolicy::WriteBack`]: write back and wait, no fsync | the blocks, and the conversion of unwritten extents, are in a transaction no later than the rename's |
//! | anything else, ext4 `data=writeback` or without a journal | [`SyncPolicy::Fsync`] | what the kernel does |
//!
//! docs/durability.md gives the reasoning and the power-cut test that checks it.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};

use layerfs_sys::{self as sys, SysResult};

/// How a copy-up makes its data durable before the rename. Chosen once per mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// No upper dir (a read-only mount): nothing is ever copied up.
    ReadOnly,
    /// Mount option `volatile`: no sync at all.
    Volatile,
    /// The upper is in memory (tmpfs, ramfs): no sync; nothing survives a crash.
    Memory,
    /// ext4 `data=journal`: no sync; the data blocks are journaled when written.
    Journaled,
    /// ext4 `data=ordered`: `sync_file_range` write-and-wait of the copy before the rename.
    WriteBack,
    /// `fsync` of every copy, as the kernel overlay does.
    Fsync,
}

/// How ext4 treats file data (`data=` mount option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ext4Data {
    /// `data=ordered` (the default).
    Ordered,
    /// `data=journal`.
    Journal,
    /// `data=writeback`.
    Writeback,
    /// No journal at all.
    NoJournal,
}

impl fmt::Display for Ext4Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ext4Data::Ordered => "data=ordered",
            Ext4Data::Journal => "data=journal",
            Ext4Data::Writeback => "data=writeback",
            Ext4Data::NoJournal => "no journal",
        })
    }
}

impl SyncPolicy {
    /// The policy for an upper dir `upper` (any fd on it); `volatile` wins over everything. Also
    /// says, for the mount's log line, what it found.
    pub fn for_upper(upper: BorrowedFd<'_>, volatile: bool) -> (SyncPolicy, String) {
        if volatile {
            return (SyncPolicy::Volatile, "mount option volatile".into());
        }
        match probe(upper) {
            Ok((policy, found)) => (policy, found),
            Err(e) => (
                SyncPolicy::Fsync,
                format!("cannot tell the filesystem: {e}"),
            ),
        }
    }

    /// The policy for an ext4 upper whose data mode is `data`.
    pub fn for_ext4(data: Ext4Data) -> SyncPolicy {
        match data {
            Ext4Data::Ordered => SyncPolicy::WriteBack,
            Ext4Data::Journal => SyncPolicy::Journaled,
            Ext4Data::Writeback | Ext4Data::NoJournal => SyncPolicy::Fsync,
        }
    }

    /// The name shown by `layerfs stats` and the mount's log line.
    pub fn name(self) -> &'static str {
        match self {
            SyncPolicy::ReadOnly => "none (read-only mount)",
            SyncPolicy::Volatile => "none (volatile)",
            SyncPolicy::Memory => "none (tmpfs)",
            SyncPolicy::Journaled => "none (ext4 data=journal)",
            SyncPolicy::WriteBack => "writeback (ext4 data=ordered)",
            SyncPolicy::Fsync => "fsync",
        }
    }

    /// What a copy-up does with its data (opened for writing) once everything but the rename is
    /// done. Returns whether it synced anything, for the counters.
    pub fn sync_copy(self, copy: impl AsFd) -> SysResult<Synced> {
        match self {
            SyncPolicy::ReadOnly
            | SyncPolicy::Volatile
            | SyncPolicy::Memory
            | SyncPolicy::Journaled => Ok(Synced::Nothing),
            SyncPolicy::WriteBack => sys::write_back_and_wait(copy).map(|()| Synced::WriteBack),
            SyncPolicy::Fsync => sys::sync_fd(copy, false).map(|()| Synced::Fsync),
        }
    }
}

impl fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`SyncPolicy::sync_copy`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// No sync was needed.
    Nothing,
    /// The data was written back and waited for.
    WriteBack,
    /// The copy was fsynced.
    Fsync,
}

/// Looks at the filesystem holding `upper`.
fn probe(upper: BorrowedFd<'_>) -> SysResult<(SyncPolicy, String)> {
    let fs = sys::statfs_fd(upper)?;
    let st = sys::stat_fd(upper)?;
    let (major, minor) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let magic = fs.f_type as u64;
    if magic == TMPFS_MAGIC || magic == RAMFS_MAGIC {
        return Ok((SyncPolicy::Memory, "tmpfs".into()));
    }
    if magic != EXT4_SUPER_MAGIC {
        return Ok((SyncPolicy::Fsync, format!("filesystem magic {magic:#x}")));
    }
    // /proc/fs/ext4/<dev>/options lists every option in force, defaults included, and has a
    // `data=` line only when there is a journal; the mount's super options only show the
    // non-default ones.
    let options = device_name(major, minor)
        .and_then(|dev| std::fs::read_to_string(format!("/proc/fs/ext4/{dev}/options")).ok());
    let data = match &options {
        Some(o) => ext4_data_from_options(o),
        None => sys::mountinfo::read()
            .ok()
            .and_then(|mounts| super_options(&mounts, major, minor))
            .and_then(|opts| ext4_data_from_super_options(&opts)),
    };
    Ok(match data {
        Some(data) => (
            SyncPolicy::for_ext4(data),
            format!("ext4 on {major}:{minor}, {data}"),
        ),
        None => (
            SyncPolicy::Fsync,
            format!("ext4 on {major}:{minor}, data mode unknown"),
        ),
    })
}

const EXT4_SUPER_MAGIC: u64 = 0xef53;
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// The kernel's name of block device `major:minor` (`loop0`, `nvme0n1p2`, `dm-1`): the last
/// component of its `/sys/dev/block` link, which is also ext4's `/proc/fs/ext4` name.
fn device_name(major: u32, minor: u32) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// The `data=` mode in the text of `/proc/fs/ext4/<dev>/options` (one option a line);
/// no `data=` line means no journal.
pub fn ext4_data_from_options(text: &str) -> Option<Ext4Data> {
    let mut data = Ext4Data::NoJournal;
    for line in text.lines() {
        if let Some(mode) = line.trim().strip_prefix("data=") {
            data = parse_data_mode(mode)?;
        }
    }
    Some(data)
}

/// The `data=` mode from a mount's super options (`rw,data=journal,…`): they name only a mode
/// other than the default, and say nothing of a missing journal, so only an explicit mode counts.
fn ext4_data_from_super_options(opts: &str) -> Option<Ext4Data> {
    opts.split(',')
        .find_map(|o| o.strip_prefix("data="))
        .and_then(parse_data_mode)
}

fn parse_data_mode(mode: &str) -> Option<Ext4Data> {
    match mode {
        "ordered" => Some(Ext4Data::Ordered),
        "journal" => Some(Ext4Data::Journal),
        "writeback" => Some(Ext4Data::Writeback),
        _ => None,
    }
}

/// The super options of the first mount of device `major:minor`.
pub fn super_options(mounts: &[sys::mountinfo::Mount], major: u32, minor: u32) -> Option<String> {
    mounts
        .iter()
        .find(|m| (m.major, m.minor) == (major, minor))
        .map(|m| m.super_options.clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ext4_data_mode_from_proc_options() {
        let cases = [
            (
                "rw\ndioread_nolock\ndata=ordered\nauto_da_alloc\n",
                Some(Ext4Data::Ordered),
            ),
            ("rw\nnodelalloc\ndata=journal\n", Some(Ext4Data::Journal)),
            ("rw\ndata=writeback\n", Some(Ext4Data::Writeback)),
            (
                "rw\nnojournal_checksum\nbarrier\n",
                Some(Ext4Data::NoJournal),
            ),
            ("rw\ndata=strange\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(ext4_data_from_options(text), want, "{text:?}");
        }
    }

    #[test]
    fn super_options_by_device() {
        let info = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
42 27 7:0 / /tmp/m rw,relatime shared:5 - ext4 /dev/loop0 rw,nodelalloc,data=journal
43 27 0:40 / /tmp/t rw - tmpfs tmpfs rw,size=4k
";
        let info = sys::mountinfo::parse(info);
        assert_eq!(super_options(&info, 254, 0).as_deref(), Some("rw,discard"));
        let loop0 = super_options(&info, 7, 0).unwrap();
        assert_eq!(loop0, "rw,nodelalloc,data=journal");
        assert_eq!(
            ext4_data_from_super_options(&loop0),
            Some(Ext4Data::Journal)
        );
        assert_eq!(ext4_data_from_super_options("rw,discard"), None);
        assert_eq!(super_options(&info, 7, 1), None);
    }

    #[test]
    fn policy_per_ext4_mode() {
        assert_eq!(
            SyncPolicy::for_ext4(Ext4Data::Ordered),
            SyncPolicy::WriteBack
        );
        assert_eq!(
            SyncPolicy::for_ext4(Ext4Data::Journal),
            SyncPolicy::Journaled
        );
        assert_eq!(SyncPolicy::for_ext4(Ext4Data::Writeback), SyncPolicy::Fsync);
        assert_eq!(SyncPolicy::for_ext4(Ext4Data::NoJournal), SyncPolicy::Fsync);
    }

    #[test]
    fn volatile_wins_and_tmpfs_is_memory() {
        let dir = tempfile::tempdir().unwrap();
        let fd = sys::open_root(dir.path()).unwrap();
        assert_eq!(
            SyncPolicy::for_upper(fd.as_fd(), true).0,
            SyncPolicy::Volatile
        );
        let shm = std::path::Path::new("/dev/shm");
        if let Ok(fd) = sys::open_root(shm)
            && sys::statfs_fd(fd.as_fd()).is_ok_and(|s| s.f_type as u64 == TMPFS_MAGIC)
        {
            assert_eq!(
                SyncPolicy::for_upper(fd.as_fd(), false).0,
                SyncPolicy::Memory
            );
        }
    }
}
