//! Differential test: random operation sequences applied to kernel overlayfs and to the system under test
//! over the same read-only lowers; every outcome and the final merged trees must agree.
//!
//! Environment:
//! - `LAYERFS_FUZZ_SEQS` (default 500): number of sequences.
//! - `LAYERFS_FUZZ_SEED` (default fixed): base seed; sequence i uses `seq_seed(base, i)`.
//! - `LAYERFS_FUZZ_ONLY`: run just this one sequence seed (as printed in a failure).
//! - `LAYERFS_FUZZ_JOBS` (default 2): sequences run in parallel.
//! - `LAYERFS_FUZZ_MAX_FAILS` (default 3): stop after this many failing sequences (each is shrunk).
//! - `LAYERFS_FUZZ_EXCLUDE=kind,…`: leave out op kinds / `lower-hardlinks` / `private-xattrs` (see
//!   `opgen::GenConfig`), to look past a known divergence.
//! - `LAYERFS_FUZZ_NO_DIFF=1`: skip comparing `layerfs diff --upper` over the two uppers.
//! - `LAYERFS_SUT=kernel`: kernel-vs-kernel, to check the harness itself.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::fsops::{Session, apply};
use crate::lowergen::{Lowers, build_layer, gen_lowers, seq_seed};
use crate::opgen::{GenConfig, Op, gen_ops};
use crate::util::{
    Fixture, Impl, Layers, Mount, SnapOpts, Snapshot, can_mount, diff_snapshots, snapshot, sut,
};

const DEFAULT_SEED: u64 = 0x1a7e_2f5d_0000_0001;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

/// The kernel lists a lower whiteout that hides nothing in a directory it reads straight from one
/// layer (then lstat says ENOENT); layerfs hides every whiteout (reference/overlay-semantics.md 2).
/// Such entries are dropped from the kernel's READDIR outcome before comparing.
fn without_leaked_whiteouts(outcome: &str) -> String {
    const LEAK: &str = ":CharacterDevice(lstat ENOENT)";
    let Some(list) = outcome.strip_prefix("ok ") else {
        return outcome.to_string();
    };
    // Entries are space-separated, and the marker itself holds a space: rebuild entry by entry.
    let mut entries: Vec<String> = Vec::new();
    for tok in list.split(' ') {
        match entries.last_mut() {
            Some(last) if tok.ends_with(')') && last.ends_with("(lstat") => {
                last.push(' ');
                last.push_str(tok);
            }
            _ => entries.push(tok.to_string()),
        }
    }
    entries.retain(|e| !e.ends_with(LEAK));
    if entries.is_empty() {
        "ok".to_string()
    } else {
        format!("ok {}", entries.join(" "))
    }
}

fn snap_opts() -> SnapOpts {
    SnapOpts {
        times: true,
        dir_nlink: true,
        ..SnapOpts::default()
    }
}

/// Lowers built on disk for one seed, shared read-only by both mounts.
struct Built {
    seed: u64,
    fix: Fixture,
    lowers: Vec<PathBuf>,
    before: Snapshot,
}

fn build(seed: u64, spec: &Lowers) -> Built {
    let fix = Fixture::new(&format!("fuzz-{seed:016x}"));
    let mut lowers = Vec::new();
    for (i, l) in spec.layers.iter().enumerate() {
        let d = fix.dir(&format!("lower{i}"));
        build_layer(l, &d);
        lowers.push(d);
    }
    let before = lower_snapshot(&lowers);
    Built {
        seed,
        fix,
        lowers,
        before,
    }
}

fn lower_snapshot(lowers: &[PathBuf]) -> Snapshot {
    let mut all = Snapshot::default();
    for (i, l) in lowers.iter().enumerate() {
        let s = snapshot(l, &snap_opts());
        for (k, v) in s.entries {
            all.entries.insert(format!("lower{i}/{k}"), v);
        }
    }
    all
}

/// What went wrong in one run; empty `problems` means the two sides agreed.
#[derive(Default)]
struct RunResult {
    /// Per op: (reference outcome, sut outcome).
    outcomes: Vec<(String, String)>,
    problems: Vec<String>,
}

/// The mount options of sequence `seed`'s system under test:
/// - every other sequence runs with a tiny directory fd cache, so that directories keep giving up
///   their fds and reopening them by name mid-sequence;
/// - every other pair of sequences takes its requests over `/dev/fuse` (`uring=off`), the others
///   from io_uring queues where the kernel allows, so both transports are held to the kernel's
///   results.
fn sut_options(seed: u64) -> Vec<String> {
    let mut o = Vec::new();
    if seed % 2 == 1 {
        o.push("dir_fds=2".to_string());
    }
    if (seed / 2) % 2 == 1 {
        o.push("uring=off".to_string());
    }
    o
}

/// Runs `ops` on a fresh kernel mount and a fresh `sut` mount over `built`'s lowers.
/// `run` numbers the attempt so each gets fresh upper/work dirs.
fn run_ops(built: &Built, ops: &[Op], sut: Impl, run: usize) -> RunResult {
    let mut res = RunResult::default();
    let layers = |side: &str| {
        let (upper, work) = built.fix.upper_work(side);
        Layers {
            lowers: built.lowers.clone(),
            upper,
            work,
            options: sut_options(built.seed),
        }
    };
    let ref_side = format!("r{run}");
    let sut_side = format!("s{run}");
    let ref_layers = layers(&ref_side);
    let sut_layers = layers(&sut_side);
    let ref_m = Mount::new(Impl::Kernel, &ref_layers, &built.fix.mountpoint(&ref_side));
    let sut_m = Mount::new(sut, &sut_layers, &built.fix.mountpoint(&sut_side));
    let stats = std::env::var_os("LAYERFS_FUZZ_STATS").is_some();
    let mut ref_s = Session::new(&ref_m.path);
    let mut sut_s = Session::new(&sut_m.path);
    for (i, op) in ops.iter().enumerate() {
        let a = apply(&mut ref_s, op);
        if stats {
            eprintln!("STAT {} {}", op.kind(), a.split(' ').next().unwrap_or(""));
        }
        let b = apply(&mut sut_s, op);
        if without_leaked_whiteouts(&a) != b {
            res.problems.push(format!(
                "op {}: {op}\n    kernel: {a}\n    {sut}: {b}",
                i + 1
            ));
        }
        res.outcomes.push((a, b));
    }
    ref_s.close_all();
    sut_s.close_all();
    let sa = snapshot(&ref_m.path, &snap_opts());
    let sb = snapshot(&sut_m.path, &snap_opts());
    for d in diff_snapshots("kernel", &sa, &sut.to_string(), &sb) {
        res.problems.push(format!("final tree: {d}"));
    }
    // Persistence: after a remount the tree and the inode numbers are unchanged.
    let inos_before = inos(&sut_m.path);
    sut_m.unmount();
    ref_m.unmount();
    // `layerfs diff` over the two uppers (same merged tree) must list the same changes — except
    // over lower hard-link groups: FUSE names only the inode a change goes through, not the name,
    // so which names of a group get an upper entry can differ from the kernel's choice (the merged
    // trees, compared above, agree; tests/DIVERGENCES.md "H").
    let lower_groups = built.lowers.iter().any(|l| has_hard_links(l));
    if std::env::var_os("LAYERFS_FUZZ_NO_DIFF").is_none() && !lower_groups {
        let da = offline_diff(&ref_layers);
        let db = offline_diff(&sut_layers);
        if da != db {
            res.problems.push(format!(
                "`layerfs diff --upper` differs:\n    over the kernel's upper: {da:?}\n    over the {sut} upper: {db:?}"
            ));
        }
    }
    // A different mount point: a daemon that is still exiting must not be able to touch the new mount
    // (that race has its own test, `cli::cli_remount_same_mountpoint_after_umount`).
    let sut_m = Mount::new(
        sut,
        &sut_layers,
        &built.fix.mountpoint(&format!("{sut_side}b")),
    );
    let sc = snapshot(&sut_m.path, &snap_opts());
    for d in diff_snapshots("before remount", &sb, "after remount", &sc) {
        res.problems.push(format!("{sut} remount: {d}"));
    }
    let inos_after = inos(&sut_m.path);
    if inos_before != inos_after {
        for (p, i) in &inos_before {
            if inos_after.get(p) != Some(i) {
                res.problems.push(format!(
                    "{sut} remount: st_ino of {p:?} changed {i} -> {:?}",
                    inos_after.get(p)
                ));
            }
        }
    }
    sut_m.unmount();
    let after = lower_snapshot(&built.lowers);
    for d in diff_snapshots("lowers before", &built.before, "lowers after", &after) {
        res.problems.push(format!("LOWER LAYER MODIFIED: {d}"));
    }
    res
}

/// Whether a lower dir holds a regular file with more than one link.
fn has_hard_links(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| match e.metadata() {
        Ok(m) if m.is_dir() => has_hard_links(&e.path()),
        Ok(m) => m.is_file() && m.nlink() > 1,
        Err(_) => false,
    })
}

/// `layerfs diff --upper U --lower …` (or the error message).
fn offline_diff(l: &Layers) -> String {
    let mut c = std::process::Command::new(crate::util::layerfs_bin());
    c.arg("diff").arg("--upper").arg(&l.upper);
    for low in &l.lowers {
        c.arg("--lower").arg(low);
    }
    match crate::util::output(&mut c) {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => format!("FAILED: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => format!("FAILED: {e}"),
    }
}

fn inos(root: &std::path::Path) -> std::collections::BTreeMap<String, u64> {
    let snap = snapshot(root, &SnapOpts::default());
    snap.entries
        .keys()
        .filter_map(|k| {
            let p = if k.is_empty() {
                root.to_path_buf()
            } else {
                root.join(k)
            };
            rustix::fs::lstat(&p).ok().map(|st| (k.clone(), st.st_ino))
        })
        .collect()
}

/// Removes ops while the run still fails: chunks of halving size, then single ops.
/// The kinds of problem a run shows: `op:<kind>` for a differing outcome, else the problem's leading words
/// (`final tree`, `layerfs diff`, `remount`, `LOWER LAYER MODIFIED`).
fn signatures(ops: &[Op], res: &RunResult) -> Vec<String> {
    res.problems
        .iter()
        .map(|p| {
            if let Some(rest) = p.strip_prefix("op ") {
                let n: usize = rest
                    .split(':')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let kind = match ops.get(n.wrapping_sub(1)) {
                    Some(Op::AsUser { op, .. }) => format!("as-user {}", op.kind()),
                    Some(op) => op.kind().to_string(),
                    None => "?".to_string(),
                };
                format!("op:{kind}")
            } else if p.contains("remount") {
                "remount".to_string()
            } else {
                p.split(':').next().unwrap_or("").to_string()
            }
        })
        .collect()
}

/// Removes ops while the run still fails with the original first kind of problem (so the reproduction
/// does not slip to another bug): chunks of halving size, then single ops.
fn shrink(built: &Built, ops: &[Op], first: &str, sut: Impl, runs: &mut usize) -> Vec<Op> {
    let mut cur = ops.to_vec();
    let mut chunk = cur.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        let mut changed = false;
        while i < cur.len() {
            let end = (i + chunk).min(cur.len());
            let mut cand = cur[..i].to_vec();
            cand.extend_from_slice(&cur[end..]);
            *runs += 1;
            let still_fails = !cand.is_empty() && {
                let r = run_ops(built, &cand, sut, *runs);
                signatures(&cand, &r).iter().any(|s| s == first)
            };
            if still_fails {
                cur = cand;
                changed = true;
            } else {
                i += chunk;
            }
        }
        if chunk == 1 && !changed {
            return cur;
        }
        if !changed {
            chunk = (chunk / 2).max(1);
        }
    }
}

/// Runs one sequence seed; on failure returns a printable minimal reproduction.
pub fn check_seed(seed: u64, sut: Impl) -> Result<(), String> {
    let mut cfg = GenConfig::from_env();
    // O_TMPFILE reaches layerfs only from io_uring queues (fuser 0.18 does not decode
    // FUSE_TMPFILE): left out of the `uring=off` sequences and where the kernel has no io_uring
    // for FUSE (tests/DIVERGENCES.md, G).
    let uring =
        crate::util::kernel_has_fuse_uring() && !sut_options(seed).iter().any(|o| o == "uring=off");
    if sut == Impl::Layerfs && !uring {
        cfg.exclude.push("tmpfile-link".to_string());
    }
    let spec = gen_lowers(seed, &cfg);
    let ops = gen_ops(seed, 20, 40, &cfg);
    let built = build(seed, &spec);
    let res = run_ops(&built, &ops, sut, 0);
    if res.problems.is_empty() {
        return Ok(());
    }
    let mut runs = 0;
    let first = signatures(&ops, &res).first().cloned().unwrap_or_default();
    let min = shrink(&built, &ops, &first, sut, &mut runs);
    runs += 1;
    let min_res = run_ops(&built, &min, sut, runs);
    let excl = if cfg.exclude.is_empty() {
        String::new()
    } else {
        format!(" LAYERFS_FUZZ_EXCLUDE={}", cfg.exclude.join(","))
    };
    let mut s = format!(
        "\n=== DIVERGENCE: seed 0x{seed:016x} (replay: LAYERFS_FUZZ_ONLY=0x{seed:x}{excl}) ===\n\
         first problem: {first}; {} ops, shrunk to {} ({} shrink runs)\nlowers:\n{spec}minimal reproduction (outcome kernel | {sut}):\n",
        ops.len(),
        min.len(),
        runs
    );
    for (i, op) in min.iter().enumerate() {
        let (a, b) = min_res
            .outcomes
            .get(i)
            .cloned()
            .unwrap_or_else(|| ("?".into(), "?".into()));
        let mark = if a == b { "  " } else { "!!" };
        s += &format!("  {mark} {:2}. {op}\n        -> {a} | {b}\n", i + 1);
    }
    let problems = if min_res.problems.is_empty() {
        &res.problems
    } else {
        &min_res.problems
    };
    s += "problems:\n";
    for p in problems {
        s += &format!("  {p}\n");
    }
    Err(s)
}

#[test]
fn differential_vs_kernel() {
    if !can_mount("differential_vs_kernel") {
        return;
    }
    let sut = sut();
    let start = Instant::now();
    if let Some(only) = env_u64("LAYERFS_FUZZ_ONLY") {
        if let Err(e) = check_seed(only, sut) {
            panic!("{e}");
        }
        return;
    }
    let n = env_u64("LAYERFS_FUZZ_SEQS").unwrap_or(500);
    let base = env_u64("LAYERFS_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let max_fails = env_u64("LAYERFS_FUZZ_MAX_FAILS").unwrap_or(3) as usize;
    let jobs = env_u64("LAYERFS_FUZZ_JOBS").unwrap_or(2).max(1);
    // Workers take sequence indices from one counter; each sequence has its own dirs and mounts.
    let next = AtomicU64::new(0);
    let ran = AtomicU64::new(0);
    let fails = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n || lock(&fails).len() >= max_fails {
                        break;
                    }
                    let seed = seq_seed(base, i);
                    ran.fetch_add(1, Ordering::SeqCst);
                    // A mount or umount failure panics inside the sequence: report it as that seed's
                    // failure and go on with the others.
                    let outcome = std::panic::catch_unwind(|| check_seed(seed, sut));
                    let failed = match outcome {
                        Ok(Ok(())) => false,
                        Ok(Err(e)) => {
                            eprintln!("{e}");
                            true
                        }
                        Err(p) => {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            eprintln!(
                                "\n=== HARNESS PANIC: seed 0x{seed:016x} (replay: LAYERFS_FUZZ_ONLY=0x{seed:x}) ===\n{msg}"
                            );
                            true
                        }
                    };
                    if failed {
                        lock(&fails).push(seed);
                    }
                }
            });
        }
    });
    let ran = ran.into_inner();
    let fails = fails.into_inner().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "differential: {ran} sequences kernel vs {sut}, base seed 0x{base:x}, {} failing, {:.1}s",
        fails.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        fails.is_empty(),
        "{} of {ran} sequences diverged (seeds {:x?}); reproductions printed above",
        fails.len(),
        fails
    );
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The generator itself: deterministic and covering at least 20 kinds of operation.
#[test]
fn generator_is_deterministic_and_broad() {
    let cfg = GenConfig::default();
    let a = gen_ops(42, 20, 40, &cfg);
    let b = gen_ops(42, 20, 40, &cfg);
    assert_eq!(a, b);
    let mut kinds = std::collections::BTreeSet::new();
    for s in 0..200 {
        for op in gen_ops(seq_seed(1, s), 20, 40, &cfg) {
            kinds.insert(op.kind());
        }
    }
    assert!(
        kinds.len() >= 25,
        "only {} op kinds: {kinds:?}",
        kinds.len()
    );
}

/// The harness notices a real difference: kernel overlayfs without redirect_dir/index (EXDEV on renaming a
/// lower directory, broken hard links on copy-up) must diverge from the reference within a few seeds, and
/// the reproduction must shrink to a handful of ops.
#[test]
fn harness_detects_divergence() {
    if !rustix::process::geteuid().is_root() {
        crate::util::skip("harness_detects_divergence", "not root, cannot mount");
        return;
    }
    for i in 0..200 {
        let seed = seq_seed(7, i);
        if let Err(repro) = check_seed(seed, Impl::KernelPlain) {
            assert!(repro.contains("minimal reproduction"), "{repro}");
            let shrunk: usize = repro
                .split("shrunk to ")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .and_then(|n| n.parse().ok())
                .expect("shrunk count in report");
            assert!(shrunk <= 4, "shrinking left {shrunk} ops:\n{repro}");
            eprintln!("harness self-check found (as it should):{repro}");
            return;
        }
    }
    panic!(
        "200 sequences found no difference between index=on,redirect_dir=on and plain kernel overlayfs"
    );
}
