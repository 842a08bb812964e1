//! Executes one generated `Op` against a mount root and renders the outcome (return value or errno) as a
//! string, so two mounts' outcomes compare with `==`.
//!
//! Every open uses O_NONBLOCK (a FIFO must never block the test) and O_CLOEXEC.

use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, CWD, Mode, OFlags};
use rustix::io::Errno;

use crate::lowergen::content;
use crate::opgen::{Op, RenameKind, TimeArg, XFlag};
use crate::util::{TimeClass, kind_of, sha_hex};

/// Symbolic name of an errno.
pub fn errno_name(e: Errno) -> String {
    let n = e.raw_os_error();
    let name = match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        libc::EAGAIN => "EAGAIN",
        libc::EFAULT => "EFAULT",
        _ => return format!("errno {n}"),
    };
    name.to_string()
}

type R = Result<String, Errno>;

fn render(r: R) -> String {
    match r {
        Ok(s) if s.is_empty() => "ok".to_string(),
        Ok(s) => format!("ok {s}"),
        Err(e) => errno_name(e),
    }
}

fn open(p: &Path, flags: OFlags, mode: u32) -> Result<rustix::fd::OwnedFd, Errno> {
    rfs::open(
        p,
        flags | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
}

fn write_all_at(fd: &rustix::fd::OwnedFd, mut data: &[u8], mut off: u64) -> Result<(), Errno> {
    while !data.is_empty() {
        let n = rustix::io::pwrite(fd, data, off)?;
        if n == 0 {
            return Err(Errno::IO);
        }
        data = &data[n..];
        off += n as u64;
    }
    Ok(())
}

fn write_all(fd: &rustix::fd::OwnedFd, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        let n = rustix::io::write(fd, data)?;
        if n == 0 {
            return Err(Errno::IO);
        }
        data = &data[n..];
    }
    Ok(())
}

/// Reads the whole file from offset 0 with pread; returns `len hash`.
fn read_all(fd: &rustix::fd::OwnedFd) -> R {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = rustix::io::pread(fd, &mut buf[..], out.len() as u64)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() > 1 << 22 {
            break;
        }
    }
    Ok(format!("{} bytes {}", out.len(), sha_hex(&out)))
}

fn stat_line(st: &rfs::Stat) -> String {
    let kind = kind_of(st.st_mode);
    let mut s = format!(
        "{kind} {:04o} {}:{}",
        st.st_mode & 0o7777,
        st.st_uid,
        st.st_gid
    );
    // Directory link counts are checked in snapshots (kernel overlayfs reports 1 for merged dirs).
    if kind != 'd' {
        s += &format!(" size={} nlink={}", st.st_size, st.st_nlink);
    }
    if kind == 'c' || kind == 'b' {
        s += &format!(" rdev={:x}", st.st_rdev);
    }
    s += &format!(
        " mtime={:?}",
        TimeClass::of(st.st_mtime, st.st_mtime_nsec as i64)
    );
    s
}

fn ts(t: TimeArg) -> rfs::Timespec {
    match t {
        TimeArg::At(s) => rfs::Timespec {
            tv_sec: s,
            tv_nsec: 0,
        },
        TimeArg::Now => rfs::Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_NOW,
        },
        TimeArg::Omit => rfs::Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
    }
}

/// One mount's side of a sequence: its root and the fds held open across ops.
pub struct Session {
    pub root: std::path::PathBuf,
    held: [Option<rustix::fd::OwnedFd>; 2],
}

impl Session {
    pub fn new(root: &Path) -> Session {
        Session {
            root: root.to_path_buf(),
            held: [None, None],
        }
    }

    /// Closes held fds (before snapshots and unmounting).
    pub fn close_all(&mut self) {
        self.held = [None, None];
    }

    fn held(&self, slot: usize) -> Result<&rustix::fd::OwnedFd, Errno> {
        self.held[slot].as_ref().ok_or(Errno::BADF)
    }
}

/// Applies `op` in `sess`; returns the rendered outcome.
pub fn apply(sess: &mut Session, op: &Op) -> String {
    // No child process is between fork and exec while the op's fds are open (`util::FD_GATE`).
    let _g = crate::util::FD_GATE
        .read()
        .unwrap_or_else(|e| e.into_inner());
    render(apply_inner(sess, op))
}

fn apply_inner(sess: &mut Session, op: &Op) -> R {
    let root = sess.root.clone();
    let root = root.as_path();
    let j = |p: &str| root.join(p);
    let none = || Ok(String::new());
    match op {
        Op::Create { path, mode } => {
            open(
                &j(path),
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY,
                *mode,
            )?;
            none()
        }
        Op::Write { path, off, len } => {
            let fd = open(&j(path), OFlags::WRONLY, 0)?;
            write_all_at(&fd, &content(&format!("W{len}"), *len), *off)?;
            none()
        }
        Op::Append { path, len } => {
            let fd = open(&j(path), OFlags::WRONLY | OFlags::APPEND, 0)?;
            write_all(&fd, &content(&format!("A{len}"), *len))?;
            let st = rfs::fstat(&fd)?;
            Ok(format!("size={}", st.st_size))
        }
        Op::OpenTrunc { path, len } => {
            let fd = open(
                &j(path),
                OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
                0o644,
            )?;
            write_all(&fd, &content(&format!("T{len}"), *len))?;
            none()
        }
        Op::Truncate { path, len } => {
            let fd = open(&j(path), OFlags::WRONLY, 0)?;
            rfs::ftruncate(&fd, *len)?;
            none()
        }
        Op::Unlink { path } => {
            rfs::unlink(j(path))?;
            none()
        }
        Op::Mkdir { path, mode } => {
            rfs::mkdir(j(path), Mode::from_raw_mode(*mode))?;
            none()
        }
        Op::Rmdir { path } => {
            rfs::rmdir(j(path))?;
            none()
        }
        Op::Rename { from, to, kind } => {
            let flags = match kind {
                RenameKind::Plain => rfs::RenameFlags::empty(),
                RenameKind::NoReplace => rfs::RenameFlags::NOREPLACE,
                RenameKind::Exchange => rfs::RenameFlags::EXCHANGE,
            };
            rfs::renameat_with(CWD, j(from), CWD, j(to), flags)?;
            none()
        }
        Op::Link { from, to } => {
            rfs::link(j(from), j(to))?;
            let st = rfs::lstat(j(to))?;
            Ok(format!("nlink={}", st.st_nlink))
        }
        Op::Symlink { target, path } => {
            rfs::symlink(target, j(path))?;
            none()
        }
        Op::Chmod { path, mode } => {
            rfs::chmod(j(path), Mode::from_raw_mode(*mode))?;
            none()
        }
        Op::Chown {
            path,
            uid,
            gid,
            follow,
        } => {
            let flags = if *follow {
                AtFlags::empty()
            } else {
                AtFlags::SYMLINK_NOFOLLOW
            };
            rfs::chownat(
                CWD,
                j(path),
                Some(rfs::Uid::from_raw(*uid)),
                Some(rfs::Gid::from_raw(*gid)),
                flags,
            )?;
            none()
        }
        Op::Utimens {
            path,
            atime,
            mtime,
            follow,
        } => {
            let flags = if *follow {
                AtFlags::empty()
            } else {
                AtFlags::SYMLINK_NOFOLLOW
            };
            let t = rfs::Timestamps {
                last_access: ts(*atime),
                last_modification: ts(*mtime),
            };
            rfs::utimensat(CWD, j(path), &t, flags)?;
            none()
        }
        Op::SetXattr {
            path,
            name,
            value,
            flag,
        } => {
            let f = match flag {
                XFlag::Any => rfs::XattrFlags::empty(),
                XFlag::Create => rfs::XattrFlags::CREATE,
                XFlag::Replace => rfs::XattrFlags::REPLACE,
            };
            rfs::lsetxattr(j(path), name.as_str(), value.as_bytes(), f)?;
            none()
        }
        Op::RemoveXattr { path, name } => {
            rfs::lremovexattr(j(path), name.as_str())?;
            none()
        }
        Op::GetXattr { path, name } => {
            let mut buf = vec![0u8; 4096];
            let n = rfs::lgetxattr(j(path), name.as_str(), &mut buf[..])?;
            Ok(format!("{:?}", String::from_utf8_lossy(&buf[..n])))
        }
        Op::ListXattr { path } => {
            let mut buf = vec![0u8; 65536];
            let n = rfs::llistxattr(j(path), &mut buf[..])?;
            let mut names: Vec<String> = buf[..n]
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            names.sort();
            Ok(names.join(","))
        }
        Op::MkFifo { path } => {
            rfs::mknodat(
                CWD,
                j(path),
                rfs::FileType::Fifo,
                Mode::from_raw_mode(0o644),
                0,
            )?;
            none()
        }
        Op::MknodWhiteout { path } => {
            rfs::mknodat(
                CWD,
                j(path),
                rfs::FileType::CharacterDevice,
                Mode::from_raw_mode(0o644),
                rfs::makedev(0, 0),
            )?;
            none()
        }
        Op::ReadWhileWrite { path, len } => {
            let a = open(&j(path), OFlags::RDONLY, 0)?;
            let b = match open(&j(path), OFlags::WRONLY, 0) {
                Ok(b) => b,
                Err(e) => return Ok(format!("fdB: {}", errno_name(e))),
            };
            write_all_at(&b, &content(&format!("RWW{len}"), *len), 0)?;
            read_all(&a).map(|s| format!("fdA reads {s}"))
        }
        Op::UnlinkWhileOpen { path } => {
            let a = open(&j(path), OFlags::RDONLY, 0)?;
            rfs::unlink(j(path))?;
            let st = rfs::fstat(&a)?;
            let data = if kind_of(st.st_mode) == 'f' {
                read_all(&a)?
            } else {
                String::new()
            };
            if kind_of(st.st_mode) == 'd' {
                return Ok("dir".to_string());
            }
            Ok(format!("nlink={} {data}", st.st_nlink))
        }
        Op::Read { path } => {
            let fd = open(&j(path), OFlags::RDONLY, 0)?;
            let st = rfs::fstat(&fd)?;
            if kind_of(st.st_mode) != 'f' {
                return Ok(format!("not a file: {}", kind_of(st.st_mode)));
            }
            read_all(&fd)
        }
        Op::Readdir { path } => {
            let fd = open(&j(path), OFlags::RDONLY | OFlags::DIRECTORY, 0)?;
            let mut dir = rfs::Dir::read_from(&fd)?;
            let mut names = Vec::new();
            while let Some(e) = dir.read() {
                let e = e?;
                let n = String::from_utf8_lossy(e.file_name().to_bytes()).into_owned();
                if n == "." || n == ".." {
                    continue;
                }
                let mut s = format!("{n}:{:?}", e.file_type());
                match rfs::lstat(j(path).join(&n)) {
                    Ok(st) if st.st_ino != e.ino() => s += "(d_ino!=st_ino)",
                    Ok(_) => {}
                    Err(err) => s += &format!("(lstat {})", errno_name(err)),
                }
                names.push(s);
            }
            names.sort();
            Ok(names.join(" "))
        }
        Op::Stat { path } => Ok(stat_line(&rfs::lstat(j(path))?)),
        Op::Readlink { path } => {
            let t = rfs::readlink(j(path), Vec::new())?;
            Ok(t.to_string_lossy().into_owned())
        }
        Op::InoStable { path } => {
            let st1 = rfs::lstat(j(path))?;
            if kind_of(st1.st_mode) == 'l' {
                return Ok("symlink".to_string());
            }
            rfs::chmod(j(path), Mode::from_raw_mode(st1.st_mode & 0o7777))?;
            let st2 = rfs::lstat(j(path))?;
            Ok(if st1.st_ino == st2.st_ino && st1.st_dev == st2.st_dev {
                "ino unchanged".to_string()
            } else {
                format!("ino changed {} -> {}", st1.st_ino, st2.st_ino)
            })
        }
        Op::Fsync { path } => {
            let fd = open(&j(path), OFlags::RDONLY, 0)?;
            rfs::fsync(&fd)?;
            none()
        }
        Op::Access { path, mode } => {
            rfs::access(j(path), rfs::Access::from_bits_retain(*mode))?;
            none()
        }
        Op::AsUser { uid, op } => {
            let _creds = Creds::become_user(*uid)?;
            apply_inner(sess, op)
        }
        Op::Hold { slot, path, write } => {
            sess.held[*slot] = None;
            let flags = if *write { OFlags::RDWR } else { OFlags::RDONLY };
            sess.held[*slot] = Some(open(&j(path), flags, 0)?);
            none()
        }
        Op::HeldRead { slot } => {
            let fd = sess.held(*slot)?;
            let st = rfs::fstat(fd)?;
            if kind_of(st.st_mode) != 'f' {
                return Ok(format!("not a file: {}", kind_of(st.st_mode)));
            }
            read_all(fd)
        }
        Op::HeldWrite { slot, len } => {
            let fd = sess.held(*slot)?;
            write_all_at(fd, &content(&format!("H{len}"), *len), 3)?;
            none()
        }
        Op::HeldStat { slot } => Ok(stat_line(&rfs::fstat(sess.held(*slot)?)?)),
        Op::CreateLong { len } => {
            let name = "l".repeat(*len);
            open(&j(&name), OFlags::CREATE | OFlags::WRONLY, 0o644)?;
            rfs::unlink(j(&name))?;
            none()
        }
        Op::TmpfileLink { dir, path, len } => {
            let d = if dir.is_empty() {
                root.to_path_buf()
            } else {
                j(dir)
            };
            let fd = open(&d, OFlags::TMPFILE | OFlags::WRONLY, 0o640)?;
            write_all(&fd, &content(&format!("TMP{len}"), *len))?;
            rfs::linkat(&fd, "", CWD, j(path), AtFlags::EMPTY_PATH)?;
            none()
        }
        Op::Fallocate {
            path,
            punch,
            off,
            len,
        } => {
            let fd = open(&j(path), OFlags::RDWR, 0)?;
            let mode = if *punch {
                rfs::FallocateFlags::PUNCH_HOLE | rfs::FallocateFlags::KEEP_SIZE
            } else {
                rfs::FallocateFlags::empty()
            };
            rfs::fallocate(&fd, mode, *off, *len)?;
            Ok(format!("size={}", rfs::fstat(&fd)?.st_size))
        }
        Op::SeekDataHole { path, off } => {
            let fd = open(&j(path), OFlags::RDONLY, 0)?;
            let st = rfs::fstat(&fd)?;
            if kind_of(st.st_mode) != 'f' {
                // Directory offsets are the underlying filesystem's business.
                return Ok(format!("not a file: {}", kind_of(st.st_mode)));
            }
            let show = |r: Result<u64, Errno>| match r {
                Ok(n) => n.to_string(),
                Err(e) => errno_name(e),
            };
            let data = show(rfs::seek(&fd, rfs::SeekFrom::Data(*off)));
            let hole = show(rfs::seek(&fd, rfs::SeekFrom::Hole(*off)));
            Ok(format!("data={data} hole={hole}"))
        }
        Op::Mknod { path, socket } => {
            let (ft, dev) = if *socket {
                (rfs::FileType::Socket, 0)
            } else {
                (rfs::FileType::CharacterDevice, rfs::makedev(1, 3))
            };
            rfs::mknodat(CWD, j(path), ft, Mode::from_raw_mode(0o640), dev)?;
            none()
        }
        Op::CopyFileRange { from, to } => {
            let src = open(&j(from), OFlags::RDONLY, 0)?;
            let dst = open(&j(to), OFlags::WRONLY | OFlags::CREATE, 0o644)?;
            let n = rfs::copy_file_range(&src, None, &dst, None, 1 << 20)?;
            Ok(format!("{n} bytes"))
        }
    }
}

/// This thread runs as `uid`/`gid == uid` with no supplementary groups until dropped, then is root again.
struct Creds {
    groups: Vec<rustix::process::Gid>,
}

impl Creds {
    fn become_user(uid: u32) -> Result<Creds, Errno> {
        use rustix::process::{Gid, Uid};
        use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
        let groups = rustix::process::getgroups()?;
        let guard = Creds { groups };
        set_thread_groups(&[])?;
        set_thread_res_gid(None::<Gid>, Gid::from_raw(uid), None::<Gid>)?;
        set_thread_res_uid(None::<Uid>, Uid::from_raw(uid), None::<Uid>)?;
        Ok(guard)
    }
}

impl Drop for Creds {
    fn drop(&mut self) {
        use rustix::process::{Gid, Uid};
        use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
        // Regain root first: only then may gid and groups be set back.
        let ok = set_thread_res_uid(None::<Uid>, Uid::ROOT, None::<Uid>).is_ok()
            && set_thread_res_gid(None::<Gid>, Gid::ROOT, None::<Gid>).is_ok()
            && set_thread_groups(&self.groups).is_ok();
        assert!(ok, "could not restore root credentials on the test thread");
    }
}
