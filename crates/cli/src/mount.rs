//! Starting a mount: both spellings, argument checks before anything is mounted, the detached
//! daemon, and its mount record.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use layerfs_overlay::fuse::{MountOptions, serve};
use layerfs_overlay::{Overlay, OverlayConfig};
use layerfs_sys::process::{self, Side};

use crate::mounts::{MountRecord, mount_fstype};

/// `layerfs mount`.
#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// A lower dir; repeat for more, the first is the top.
    #[arg(long = "lower", value_name = "DIR")]
    lowers: Vec<PathBuf>,
    /// The upper dir (omit for a read-only mount).
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// The work dir, on the upper's filesystem.
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
    /// Stay in the foreground.
    #[arg(short, long)]
    foreground: bool,
    /// Mount options, as with `-o` of mount(8) (also lowerdir=…,upperdir=…,workdir=…).
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    /// Name of the new container (with IMAGE).
    #[arg(long)]
    name: Option<String>,
    /// [IMAGE|CONTAINER] MOUNTPOINT.
    #[arg(num_args = 1..=2, required = true)]
    args: Vec<PathBuf>,
}

/// Everything a mount needs, from either spelling.
#[derive(Debug, Default)]
struct Plan {
    cfg: OverlayConfig,
    mountpoint: PathBuf,
    foreground: bool,
    source: String,
    read_only: bool,
    extra: Vec<fuser::MountOption>,
    allow_other: Option<bool>,
    default_permissions: bool,
    threads: Option<usize>,
    /// `uring=off`: requests over `/dev/fuse` only, even where the kernel offers io_uring.
    no_uring: bool,
    /// `idle_commit=off`: io_uring answers committed at the thread's normal policy.
    no_idle_commit: bool,
    /// `direct_read=SIZE`: lower files of at least SIZE are read without the page cache
    /// (`None`, the default, or `direct_read=off`: none).
    direct_read: Option<u64>,
    /// The store container this mount serves, and the store's root.
    container: Option<(String, Option<PathBuf>)>,
}

/// `layerfs mount …`.
pub fn run(args: MountArgs, root: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let (what, mountpoint) = match args.args.as_slice() {
        [m] => (None, m.clone()),
        [w, m] => (Some(w.to_string_lossy().into_owned()), m.clone()),
        _ => bail!("usage: layerfs mount [IMAGE|CONTAINER] MOUNTPOINT"),
    };
    let mut plan = Plan {
        cfg: OverlayConfig {
            lowers: args.lowers,
            upper: args.upper,
            work: args.work,
            volatile: false,
            dir_fds: 0,
        },
        mountpoint,
        foreground: args.foreground,
        source: "layerfs".into(),
        default_permissions: true,
        ..Plan::default()
    };
    for o in &args.options {
        apply_options(&mut plan, o)?;
    }
    let Some(what) = what else { return start(plan) };
    if !plan.cfg.lowers.is_empty() {
        bail!("give either IMAGE/CONTAINER or --lower dirs, not both");
    }
    // A container of the store: remount it, or make one from an image.
    let store = layerfs_store::Store::open(root.clone())?;
    let (container, created) = match store.container(&what) {
        Ok(c) if args.name.is_none() => (c, false),
        _ => (store.create_container(&what, args.name.as_deref())?, true),
    };
    if container.is_mounted() {
        let at = container.mountpoint.as_deref().unwrap_or(Path::new("?"));
        bail!(
            "container {} is already mounted at {}",
            container.name,
            at.display()
        );
    }
    let dirs = store.container_dirs(&container);
    plan.cfg.lowers = dirs.lowers;
    plan.cfg.upper = Some(dirs.upper);
    plan.cfg.work = Some(dirs.work);
    plan.container = Some((container.name.clone(), root));
    let result = start(plan);
    match &result {
        Ok(_) if created => eprintln!("container {} created", container.name),
        Err(_) if created => {
            let _ = store.remove_container(&container.name);
        }
        _ => {}
    }
    result
}

/// The helper form: `layerfs [SOURCE] MOUNTPOINT [-o OPTS]… [-f] [-d] [-v]`.
pub fn helper_main(args: &[String]) -> anyhow::Result<ExitCode> {
    let mut plan = Plan {
        source: "layerfs".into(),
        default_permissions: true,
        ..Plan::default()
    };
    let mut positional = Vec::new();
    let mut verbose = 0u8;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => {
                let opts = it.next().context("-o needs a value")?;
                apply_options(&mut plan, opts)?;
            }
            s if s.starts_with("-o") => apply_options(&mut plan, &s[2..])?,
            "-f" | "--foreground" => plan.foreground = true,
            "-d" | "--debug" => {
                plan.foreground = true;
                verbose = verbose.max(2);
            }
            "-v" | "--verbose" => verbose += 1,
            "-vv" => verbose += 2,
            "-n" | "-s" => {}
            s if s.starts_with('-') => bail!("unknown option {s}"),
            s => positional.push(s.to_string()),
        }
    }
    crate::init_logging(verbose);
    match positional.as_slice() {
        [mnt] => plan.mountpoint = PathBuf::from(mnt),
        [source, mnt] => {
            plan.source = source.clone();
            plan.mountpoint = PathBuf::from(mnt);
        }
        _ => bail!(
            "usage: layerfs [SOURCE] MOUNTPOINT -o lowerdir=DIR[:DIR…][,upperdir=DIR,workdir=DIR]"
        ),
    }
    start(plan)
}

/// Applies one `-o a,b=c,…` string. Unknown generic options are tolerated.
fn apply_options(plan: &mut Plan, opts: &str) -> anyhow::Result<()> {
    let opts = split_escaped(opts, ',');
    apply_split(plan, &opts)
}

fn apply_split<'a>(plan: &mut Plan, opts: &'a [String]) -> anyhow::Result<()> {
    use fuser::MountOption as M;
    for opt in opts {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        let need = |v: Option<&'a str>| -> anyhow::Result<&'a str> {
            v.filter(|v| !v.is_empty())
                .with_context(|| format!("option {key} needs a value"))
        };
        match key {
            "lowerdir" => {
                plan.cfg.lowers = split_escaped(need(value)?, ':')
                    .into_iter()
                    .map(PathBuf::from)
                    .collect()
            }
            "upperdir" => plan.cfg.upper = Some(PathBuf::from(need(value)?)),
            "workdir" => plan.cfg.work = Some(PathBuf::from(need(value)?)),
            "volatile" => plan.cfg.volatile = true,
            "dir_fds" => {
                plan.cfg.dir_fds = need(value)?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .context("dir_fds=N needs a positive number")?
            }
            "ro" => plan.read_only = true,
            "rw" => plan.read_only = false,
            "dev" => plan.extra.push(M::Dev),
            "nodev" => plan.extra.push(M::NoDev),
            "suid" => plan.extra.push(M::Suid),
            "nosuid" => plan.extra.push(M::NoSuid),
            "exec" => plan.extra.push(M::Exec),
            "noexec" => plan.extra.push(M::NoExec),
            "noatime" => plan.extra.push(M::NoAtime),
            "allow_other" | "allow_root" => plan.allow_other = Some(true),
            "default_permissions" => plan.default_permissions = true,
            "no_default_permissions" => plan.default_permissions = false,
            "fsname" => plan.source = need(value)?.to_string(),
            "uring" => {
                plan.no_uring = match need(value)? {
                    "on" | "1" => false,
                    "off" | "0" => true,
                    v => bail!("uring={v}: use uring=on or uring=off"),
                }
            }
            "idle_commit" => {
                plan.no_idle_commit = match need(value)? {
                    "on" | "1" => false,
                    "off" | "0" => true,
                    v => bail!("idle_commit={v}: use idle_commit=on or idle_commit=off"),
                }
            }
            "direct_read" => plan.direct_read = parse_direct_read(need(value)?)?,
            "threads" => {
                plan.threads = Some(need(value)?.parse().context("threads=N needs a number")?)
            }
            _ => tracing::debug!("ignoring mount option {opt}"),
        }
    }
    Ok(())
}

/// The value of `direct_read=`: `off`, or a size in bytes with an optional K, M or G suffix.
fn parse_direct_read(v: &str) -> anyhow::Result<Option<u64>> {
    if v == "off" {
        return Ok(None);
    }
    let (digits, shift) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 10),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 20),
        Some(b'G' | b'g') => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .map(Some)
        .with_context(|| format!("direct_read={v}: use a size such as 64M, or off"))
}

/// Splits `s` on `sep`; `\` followed by `sep` stands for `sep` itself, any other backslash is kept
/// (so `-o lowerdir=a\:b,upperdir=u` splits on the comma and keeps `a\:b` for the next split).
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&sep) => {
                cur.push(sep);
                chars.next();
            }
            c if c == sep => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.retain(|o| !o.is_empty());
    out
}

/// Checks everything, then mounts (detached unless `foreground`).
fn start(mut plan: Plan) -> anyhow::Result<ExitCode> {
    let is_root = rustix::process::geteuid().is_root();
    if plan.cfg.lowers.is_empty() {
        bail!("no lower directory given (--lower DIR or -o lowerdir=DIR)");
    }
    if plan.read_only {
        plan.cfg.upper = None;
        plan.cfg.work = None;
    }
    let mnt = &plan.mountpoint;
    let meta = std::fs::metadata(mnt).with_context(|| format!("mountpoint {}", mnt.display()))?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", mnt.display());
    }
    let mnt = mnt
        .canonicalize()
        .with_context(|| format!("mountpoint {}", mnt.display()))?;
    if let Some(t) = mount_fstype(&mnt)? {
        bail!(
            "mountpoint {} is busy: a {t} filesystem is mounted there",
            mnt.display()
        );
    }
    for dir in plan
        .cfg
        .lowers
        .iter()
        .chain(plan.cfg.upper.iter())
        .chain(plan.cfg.work.iter())
    {
        let m = std::fs::metadata(dir).with_context(|| format!("{}", dir.display()))?;
        if !m.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
    }
    let canon = |p: &Path| p.canonicalize().with_context(|| format!("{}", p.display()));
    plan.cfg.lowers = plan
        .cfg
        .lowers
        .iter()
        .map(|p| canon(p))
        .collect::<anyhow::Result<_>>()?;
    plan.cfg.upper = plan.cfg.upper.as_deref().map(canon).transpose()?;
    plan.cfg.work = plan.cfg.work.as_deref().map(canon).transpose()?;
    for (name, d) in [("upper", &plan.cfg.upper), ("work", &plan.cfg.work)] {
        if let Some(d) = d
            && (d.starts_with(&mnt) || mnt.starts_with(d))
        {
            bail!(
                "{name} directory {} and mountpoint {} overlap",
                d.display(),
                mnt.display()
            );
        }
    }
    let nofile = process::raise_nofile();
    if plan.cfg.dir_fds == 0 {
        // Half the fd limit for cached directories; the rest for open files and the session.
        plan.cfg.dir_fds = usize::try_from(nofile.saturating_sub(1024) / 2)
            .unwrap_or(usize::MAX)
            .clamp(64, 16384);
    }
    let ovl = Overlay::new(&plan.cfg).map_err(anyhow::Error::msg)?;
    let opts = MountOptions {
        fsname: plan.source.clone(),
        allow_other: plan.allow_other.unwrap_or(is_root),
        default_permissions: plan.default_permissions,
        threads: plan.threads.unwrap_or_else(default_threads),
        uring: !plan.no_uring,
        idle_commit: !plan.no_idle_commit,
        direct_read: plan.direct_read,
        extra: {
            let mut e = plan.extra.clone();
            // As root, devices and set-id bits work as on a kernel overlay mount unless the
            // options say otherwise (FUSE's own default is nodev,nosuid).
            if is_root {
                use fuser::MountOption as M;
                if !e.iter().any(|o| matches!(o, M::Dev | M::NoDev)) {
                    e.push(M::Dev);
                }
                if !e.iter().any(|o| matches!(o, M::Suid | M::NoSuid)) {
                    e.push(M::Suid);
                }
            }
            if plan.cfg.upper.is_none() {
                e.push(fuser::MountOption::RO);
            }
            e
        },
    };
    let record = MountRecord {
        mountpoint: mnt.clone(),
        lowers: plan.cfg.lowers.clone(),
        upper: plan.cfg.upper.clone(),
        work: plan.cfg.work.clone(),
        pid: 0,
        container: plan.container.as_ref().map(|(n, _)| n.clone()),
    };
    let store_link = plan.container.clone();
    if plan.foreground {
        return serve_mount(ovl, &mnt, &opts, record, store_link, None);
    }
    match process::daemonize().context("cannot start the mount daemon")? {
        Side::Parent { ok: true, .. } => Ok(ExitCode::SUCCESS),
        Side::Parent { ok: false, message } => bail!("{}: {message}", mnt.display()),
        Side::Daemon(ready) => {
            process::detach_stdio();
            serve_mount(ovl, &mnt, &opts, record, store_link, Some(ready))
        }
    }
}

fn default_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    (cores * 2).clamp(4, 16)
}

/// Runs the session; `ready` (if any) learns when the mount is live or why it failed.
fn serve_mount(
    ovl: Overlay,
    mnt: &Path,
    opts: &MountOptions,
    mut record: MountRecord,
    container: Option<(String, Option<PathBuf>)>,
    ready: Option<process::Ready>,
) -> anyhow::Result<ExitCode> {
    let store = match &container {
        Some((_, root)) => Some(layerfs_store::Store::open(root.clone())?),
        None => None,
    };
    process::set_umask(0);
    process::single_malloc_arena();
    record.pid = std::process::id() as i32;
    let ovl = Arc::new(ovl);
    let mut ready = ready;
    let mut record_err = None;
    let result = serve(ovl, mnt, opts, || {
        if let Err(e) = record.save() {
            record_err = Some(e);
        }
        if let (Some(store), Some((name, _))) = (&store, &container)
            && let Err(e) = store.set_container_mounted(name, mnt, record.pid as u32, &[])
        {
            record_err = Some(e);
        }
        if let Some(r) = ready.take() {
            r.ok();
        }
    });
    MountRecord::remove(mnt, record.pid);
    if let (Some(store), Some((name, _))) = (&store, &container) {
        let _ = store.set_container_unmounted(name);
    }
    if let Some(e) = record_err {
        tracing::warn!("{e:#}");
    }
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            let msg = format!("cannot mount: {e}");
            if let Some(r) = ready.take() {
                r.fail(&msg);
            }
            bail!("{}: {msg}", mnt.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_escaped;

    #[test]
    fn options_and_lowerdirs_split_with_escapes() {
        let opts = split_escaped(r"lowerdir=a\:b:c,upperdir=u\,v,rw", ',');
        assert_eq!(opts, [r"lowerdir=a\:b:c", "upperdir=u,v", "rw"]);
        assert_eq!(split_escaped(r"a\:b:c", ':'), ["a:b", "c"]);
        assert_eq!(split_escaped("a::b", ':'), ["a", "b"]);
    }
}
