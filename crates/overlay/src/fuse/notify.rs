//! What the daemon tells the kernel on its own (FUSE notifications): attributes a copy-up changed
//! behind the kernel's back, and the data of small lower files put into the page cache at OPEN.

use fuser::INodeNo;

use super::Fuse;

impl Fuse {
    /// Passes `result` on after telling the kernel to drop its cached attributes of the nodes a
    /// copy-up on this thread changed (a parent dir that gained an upper entry: its ctime moved),
    /// which the kernel cannot know from the request itself. Attribute-only invalidations take no
    /// inode lock in the kernel, so they are safe while serving a request.
    pub(super) fn changed<T>(&self, result: T) -> T {
        let mut changed = crate::copyup::take_changed_attrs();
        // Nested copy-ups name a directory twice (as the parent of one, as the copy of the next).
        changed.sort_unstable();
        changed.dedup();
        if let Some(n) = self.notifier.get() {
            for ino in changed {
                let _ = n.inval_inode(INodeNo(ino), -1, 0);
            }
        }
        result
    }
}

/// Lower files up to this size have their data put in the kernel's page cache when opened.
const PREFILL_MAX: u64 = 64 * 1024;

impl Fuse {
    /// Puts the data of a small lower file, just opened as handle `fh`, into the kernel's page
    /// cache (FUSE_NOTIFY_STORE) before the open is answered: reading it then costs no READ round
    /// trip, and no GETATTR either (a READ makes the kernel drop its cached atime). Best effort.
    ///
    /// Only for the node's sole open (no READ of it can be in flight, whose page locks the store
    /// would wait for), and skipped if the node's copy-up lock is taken: the store holds that lock
    /// so that no copy-up and write can slip in between reading the data and storing it.
    pub(super) fn prefill(&self, fh: u64) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        let _ = self
            .ovl
            .with_small_lower_data(fh, PREFILL_MAX, |ino, data| {
                if let Err(e) = notifier.store(INodeNo(ino), 0, data) {
                    tracing::debug!("page cache prefill of node {ino}: {e}");
                }
            });
    }
}
