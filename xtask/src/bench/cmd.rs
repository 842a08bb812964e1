//! Running external commands and reading `/proc` for the bench.
//!
//! Every command runs in its own process group with `LC_ALL=C` and the system directories first in `PATH`
//! (other users of the machine may drop wrappers into `/usr/local`), is bounded in time (the whole group is
//! killed on timeout), and is timed from spawn to exit.

use anyhow::{Context, Result, bail};
use layerfs_sys::mountinfo;
use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `PATH` for every command the bench runs.
const SYS_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin";

/// A command that exited with status 0.
pub struct Ran {
    /// Wall time from spawn to exit.
    pub secs: f64,
    /// Its standard output, lossily decoded.
    pub stdout: String,
}

/// Applies the environment every bench command gets.
pub fn prepare(cmd: &mut Command) -> &mut Command {
    cmd.env("LC_ALL", "C")
        .env("LANG", "C")
        .env("PATH", SYS_PATH)
        .process_group(0)
}

/// Runs `script` with `bash -c`; fails on a non-zero exit or after `timeout`.
pub fn sh(script: &str, timeout: Duration) -> Result<Ran> {
    run(Command::new("bash").arg("-c").arg(script), script, timeout)
}

/// Runs `script` with `bash -c` and returns its trimmed stdout, or "" if it fails (for descriptions).
pub fn sh_quiet(script: &str) -> String {
    sh(script, Duration::from_secs(30))
        .map(|r| r.stdout.trim().to_string())
        .unwrap_or_default()
}

/// Runs `cmd` with stdout and stderr captured; `what` names it in errors.
pub fn run(cmd: &mut Command, what: &str, timeout: Duration) -> Result<Ran> {
    prepare(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send((out, Instant::now()));
    });
    let (out, end) = match rx.recv_timeout(timeout) {
        Ok(done) => done,
        Err(_) => {
            kill_group(pid);
            bail!("`{what}` timed out after {} s", timeout.as_secs());
        }
    };
    let out = out.with_context(|| format!("waiting for `{what}`"))?;
    if !out.status.success() {
        bail!("`{what}` failed ({}): {}", out.status, tail(&out.stderr));
    }
    Ok(Ran {
        secs: (end - start).as_secs_f64(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// Runs `cmd` with the terminal's stdout/stderr (for apt-get and cargo, whose progress a person reads).
pub fn run_visible(cmd: &mut Command, what: &str) -> Result<()> {
    let status = prepare(cmd)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// A command's stderr for an error message: its first and last lines, each cut to 300 characters.
pub fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let cut = |l: &str| l.chars().take(300).collect::<String>();
    match lines.as_slice() {
        [] => String::new(),
        [one] => cut(one),
        [first, .., last] => format!("{} … ({} lines) … {}", cut(first), lines.len(), cut(last)),
    }
}

/// SIGKILLs the process group `pgid` (a command started by [`prepare`] leads its own group).
pub fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// Sends `signal` (e.g. "TERM") to one process.
pub fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug)]
pub struct MountEntry {
    /// Where it is mounted.
    pub target: PathBuf,
    /// `major:minor` of the superblock (for FUSE, minor is the connection number).
    pub dev: String,
    /// Filesystem type, e.g. `overlay`, `fuse.fuse-overlayfs`.
    pub fstype: String,
}

/// The mount table of this mount namespace (the last mount on a path wins in [`mounted`]).
pub fn mounts() -> Vec<MountEntry> {
    mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .map(|m| MountEntry {
            target: m.mount_point,
            dev: format!("{}:{}", m.major, m.minor),
            fstype: m.fstype,
        })
        .collect()
}

/// What is mounted on `path`, if anything.
pub fn mounted(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.target == path)
}

/// Whether anything is mounted on or below `path`.
pub fn mounted_under(path: &Path) -> Option<PathBuf> {
    mounts()
        .into_iter()
        .map(|m| m.target)
        .find(|t| t.starts_with(path))
}

/// Processes (thread-group ids) that hold `/dev/fuse` open.
pub fn fuse_holders() -> BTreeSet<u32> {
    let mut res = BTreeSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return res;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/fuse")))
        {
            res.insert(pid);
        }
    }
    res
}

/// The command line of `pid`, arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
}

/// Fields of `/proc/PID/stat` after the command name: [0] is the state (field 3 of proc(5)).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Resource use of a FUSE daemon, read just before unmount.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Peak resident set (VmHWM), MiB.
    pub hwm_mib: f64,
    /// User + system CPU time, seconds.
    pub cpu_secs: f64,
    /// Open file descriptors.
    pub fds: Option<usize>,
}

/// VmHWM, utime+stime and open fds of `pid`.
pub fn usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let f = stat_fields(pid)?;
    // proc(5): utime and stime are fields 14 and 15, i.e. [11] and [12] after the command name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(Usage {
        hwm_mib: hwm_kib / 1024.0,
        cpu_secs: ticks / clock_ticks(),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|d| d.count()),
    })
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| sh_quiet("getconf CLK_TCK").parse().unwrap_or(100.0))
}

/// Quotes `s` for bash.
pub fn q(s: impl AsRef<std::ffi::OsStr>) -> String {
    let s = s.as_ref().to_string_lossy();
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_keeps_first_and_last_lines() {
        assert_eq!(tail(b""), "");
        assert_eq!(tail(b"one\n"), "one");
        assert_eq!(tail(b"a\nb\n\nc\n"), "a \u{2026} (3 lines) \u{2026} c");
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(q("it's"), r"'it'\''s'");
    }
}
