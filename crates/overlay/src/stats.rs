//! Counters of what the daemon did, for the request-count regression guard and `layerfs stats`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Event counters; relaxed atomics, no lock.
#[derive(Debug, Default)]
pub struct Stats {
    /// LOOKUP requests.
    pub lookups: AtomicU64,
    /// GETATTR requests.
    pub getattrs: AtomicU64,
    /// READDIR requests.
    pub readdirs: AtomicU64,
    /// READDIRPLUS requests.
    pub readdirpluses: AtomicU64,
    /// READDIRPLUS entries sent without attributes (`fuse/plus.rs`).
    pub bare_entries: AtomicU64,
    /// Directory indexes built.
    pub index_builds: AtomicU64,
    /// Objects copied up.
    pub copy_ups: AtomicU64,
    /// fsyncs issued by copy-up ([`crate::durability::SyncPolicy::Fsync`]).
    pub fsyncs: AtomicU64,
    /// Copies written back and waited for by copy-up instead of an fsync
    /// ([`crate::durability::SyncPolicy::WriteBack`]).
    pub writebacks: AtomicU64,
    /// OPEN requests.
    pub opens: AtomicU64,
    /// Opens served by kernel passthrough.
    pub passthrough_opens: AtomicU64,
    /// Opens of big lower files read without the page cache (`direct_read`).
    pub direct_opens: AtomicU64,
    /// READ requests.
    pub reads: AtomicU64,
    /// Requests taken from io_uring queues ([`crate::fuse`]'s `uring` module) rather than
    /// `/dev/fuse`.
    pub uring_requests: AtomicU64,
    /// io_uring answers committed as a `SCHED_IDLE` thread (`fuse/idle.rs`).
    pub idle_commits: AtomicU64,
    /// io_uring requests that may block (a copy-up, an fsync, data not in the page cache),
    /// answered by a worker thread so that their queue's thread goes on serving.
    pub offloads: AtomicU64,
    /// Directories that gave up their fds ([`crate::dirfds`]).
    pub dir_fd_evictions: AtomicU64,
    /// Directories that reopened them.
    pub dir_fd_restores: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default, PartialEq, Eq)]
#[serde(default)]
pub struct StatsSnapshot {
    pub lookups: u64,
    pub getattrs: u64,
    pub readdirs: u64,
    pub readdirpluses: u64,
    #[serde(default)]
    pub bare_entries: u64,
    pub index_builds: u64,
    pub copy_ups: u64,
    pub fsyncs: u64,
    #[serde(default)]
    pub writebacks: u64,
    pub opens: u64,
    pub passthrough_opens: u64,
    pub direct_opens: u64,
    #[serde(default)]
    pub reads: u64,
    #[serde(default)]
    pub uring_requests: u64,
    pub idle_commits: u64,
    #[serde(default)]
    pub offloads: u64,
    pub dir_fd_evictions: u64,
    pub dir_fd_restores: u64,
    pub nodes: u64,
    /// The mount's copy-up sync policy ([`crate::durability::SyncPolicy::name`]).
    #[serde(default)]
    pub copyup_sync: String,
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self, nodes: usize, copyup_sync: &str) -> StatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            lookups: r(&self.lookups),
            getattrs: r(&self.getattrs),
            readdirs: r(&self.readdirs),
            readdirpluses: r(&self.readdirpluses),
            bare_entries: r(&self.bare_entries),
            index_builds: r(&self.index_builds),
            copy_ups: r(&self.copy_ups),
            fsyncs: r(&self.fsyncs),
            writebacks: r(&self.writebacks),
            opens: r(&self.opens),
            passthrough_opens: r(&self.passthrough_opens),
            direct_opens: r(&self.direct_opens),
            reads: r(&self.reads),
            uring_requests: r(&self.uring_requests),
            idle_commits: r(&self.idle_commits),
            offloads: r(&self.offloads),
            dir_fd_evictions: r(&self.dir_fd_evictions),
            dir_fd_restores: r(&self.dir_fd_restores),
            nodes: nodes as u64,
            copyup_sync: copyup_sync.to_string(),
        }
    }
}
