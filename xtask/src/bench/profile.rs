//! `--perf`: a CPU profile of the layerfs daemon during each workload's first measured round.
//!
//! `perf record --call-graph dwarf -p DAEMON` runs alongside the workload and is stopped with SIGINT after
//! it; the data goes to `<base>/perf/<workload>.data` and a flat summary (self time by symbol, ≥ 1 %) to
//! `<workload>.txt`, for the "prove it with profiles" part of the speed issue. The profiler costs the
//! daemon some CPU, so a profiled run's figure is not used: that round is run again without it.

use super::cmd::{self, q};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `perf record`.
pub struct Recording {
    child: Child,
    data: PathBuf,
}

/// Starts profiling `pid` into `<dir>/<name>.data`.
pub fn start(dir: &Path, name: &str, pid: u32) -> Result<Recording> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join(format!("{name}.data"));
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = cmd::prepare(
        Command::new("perf")
            .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data),
    )
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log)
    .spawn()
    .context("cannot start perf record (apt-get install linux-perf)")?;
    // perf needs a moment to open its events on every thread.
    std::thread::sleep(Duration::from_millis(300));
    Ok(Recording { child, data })
}

impl Recording {
    /// Stops the recording and writes the flat summary next to the data; returns the summary's path.
    pub fn finish(mut self) -> Result<PathBuf> {
        cmd::kill(self.child.id(), "INT");
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                cmd::kill_group(self.child.id());
                let _ = self.child.wait();
                bail!("perf record did not stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let txt = self.data.with_extension("txt");
        cmd::sh(
            &format!(
                "perf report -i {} --stdio --no-children --sort dso,symbol -g none --percent-limit 1 \
                 2>/dev/null > {}",
                q(&self.data),
                q(&txt)
            ),
            Duration::from_secs(600),
        )?;
        Ok(txt)
    }
}
