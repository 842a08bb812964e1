//! The deterministic data set: lower layers and the lists the workloads use.
//!
//! Everything derives from [`Shape`] and fixed seeds, so two machines build the same bytes. On disk, under
//! `<root>/data/<shape>-v1/`:
//!
//! ```text
//! l1/tree/aTT/bSSS/fFF        100k files (0..16 KiB) in 5k leaf dirs    (bottom layer)
//! l1/bigdir/eNNNNN            50k empty files in one dir
//! l1/big/big.bin              1 GiB, unique 1 MiB blocks
//! l2/tree/...                 every 20th tree file again, new content    (upper lower layer)
//! thin/tKKK/tree/aTT/bSSS/... 50 thin layers of 200 small files each     (the 50-layer stack, over l1)
//! lists/{copyup,bottom,neg}.txt   10k paths each: files only in l1, other l1 files, missing names
//! create.tar                  20k small files in 1k dirs (untar workload)
//! .done                       written last: the set is complete
//! ```
//! `--quick` (Shape::quick) is about 1/10 of that: 10k files in 500 dirs, 5k-entry dir, 100 MiB file.

use super::cmd::{self, q};
use super::system::remove_inside;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// Sizes of the data set.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Name of the data directory.
    pub name: &'static str,
    /// Top-level dirs of the tree.
    pub ntop: usize,
    /// Leaf dirs per top-level dir.
    pub nsub: usize,
    /// Files per leaf dir.
    pub nper: usize,
    /// Entries of the big directory.
    pub nbigdir: usize,
    /// Size of the big file (and of the sequential write), MiB.
    pub big_mib: usize,
    /// Dirs of the untar archive (20 files each).
    pub ncreate_dirs: usize,
    /// Thin layers of the many-layer stack.
    pub nlayers: usize,
    /// Files per thin layer.
    pub thin_files: usize,
}

impl Shape {
    /// The issue's sizes.
    pub const FULL: Shape = Shape {
        name: "full",
        ntop: 20,
        nsub: 250,
        nper: 20,
        nbigdir: 50_000,
        big_mib: 1024,
        ncreate_dirs: 1000,
        nlayers: 50,
        thin_files: 200,
    };
    /// About 1/10 of [`Shape::FULL`] (still 50 layers: the layer count is what that workload measures).
    pub const QUICK: Shape = Shape {
        name: "quick",
        ntop: 20,
        nsub: 25,
        nper: 20,
        nbigdir: 5_000,
        big_mib: 100,
        ncreate_dirs: 100,
        nlayers: 50,
        thin_files: 20,
    };

    /// Files in the tree.
    pub fn nfiles(&self) -> usize {
        self.ntop * self.nsub * self.nper
    }
    /// Leaf dirs of the tree.
    pub fn nleaf(&self) -> usize {
        self.ntop * self.nsub
    }
    /// Files in the untar archive.
    pub fn ncreate(&self) -> usize {
        self.ncreate_dirs * 20
    }
    /// Tree files seen through the many-layer stack.
    pub fn nfiles_layers(&self) -> usize {
        self.nfiles() + self.nlayers * self.thin_files
    }
}

/// The lower-layer stacks a workload can mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// l2 over l1.
    Two,
    /// The thin layers over l1.
    Many,
}

/// A built (or to be built) data set.
pub struct Data {
    /// Its sizes.
    pub shape: Shape,
    /// `<root>/data/<shape>-v1`.
    pub dir: PathBuf,
}

/// SplitMix64: a small deterministic generator, enough for sizes and offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

impl Data {
    /// The data set of `shape` under `root`.
    pub fn new(root: &Path, shape: Shape) -> Data {
        Data {
            shape,
            dir: root.join("data").join(format!("{}-v1", shape.name)),
        }
    }

    pub fn l1(&self) -> PathBuf {
        self.dir.join("l1")
    }
    fn l2(&self) -> PathBuf {
        self.dir.join("l2")
    }
    fn thin(&self, k: usize) -> PathBuf {
        self.dir.join(format!("thin/t{k:03}"))
    }
    /// A list file (`copyup`, `bottom`, `neg`).
    pub fn list(&self, name: &str) -> PathBuf {
        self.dir.join(format!("lists/{name}.txt"))
    }
    /// The untar archive.
    pub fn create_tar(&self) -> PathBuf {
        self.dir.join("create.tar")
    }
    /// The big file, relative to a layer or the mount.
    pub const BIG: &'static str = "big/big.bin";

    /// The lower dirs of `stack`, top first.
    pub fn lowers(&self, stack: Stack) -> Vec<PathBuf> {
        match stack {
            Stack::Two => vec![self.l2(), self.l1()],
            Stack::Many => (1..=self.shape.nlayers)
                .rev()
                .map(|k| self.thin(k))
                .chain([self.l1()])
                .collect(),
        }
    }

    /// Every directory holding lower data of `stack` (for re-warming).
    pub fn layer_roots(&self, stack: Stack) -> Vec<PathBuf> {
        self.lowers(stack)
    }

    fn tree_rel(&self, idx: usize) -> String {
        let s = &self.shape;
        let (t, r) = (idx / (s.nsub * s.nper), idx % (s.nsub * s.nper));
        format!("tree/a{t:02}/b{:03}/f{:02}", r / s.nper, r % s.nper)
    }

    /// Builds the data set unless `.done` says it is complete.
    pub fn ensure(&self, data_root: &Path) -> Result<()> {
        let done = self.dir.join(".done");
        if done.exists() {
            return Ok(());
        }
        let s = self.shape;
        eprintln!(
            "bench: building the {} data set in {}: {} files in {} dirs, {}-entry dir, {} MiB file, {} thin layers",
            s.name,
            self.dir.display(),
            s.nfiles(),
            s.nleaf(),
            s.nbigdir,
            s.big_mib,
            s.nlayers
        );
        let t0 = Instant::now();
        remove_inside(&self.dir, data_root)?;
        std::fs::create_dir_all(self.dir.join("lists"))?;
        let mut pool = vec![0u8; 2 * MIB];
        let mut rng = Rng(20240501);
        for chunk in pool.chunks_mut(8) {
            let n = chunk.len();
            chunk.copy_from_slice(&rng.next().to_le_bytes()[..n]);
        }
        let slice = |rng: &mut Rng, max: usize| {
            let size = rng.below(max + 1);
            let off = rng.below(MIB);
            &pool[off..off + size]
        };
        // l1: the tree.
        let mut sizes = vec![0usize; s.nfiles()];
        let l1 = self.l1();
        for (idx, size) in sizes.iter_mut().enumerate() {
            let p = l1.join(self.tree_rel(idx));
            if idx % s.nper == 0 {
                mkdir_parent(&p)?;
            }
            let bytes = slice(&mut rng, 16384);
            *size = bytes.len();
            write(&p, bytes)?;
        }
        // l1: the big directory and the big file.
        std::fs::create_dir_all(l1.join("bigdir"))?;
        for i in 0..s.nbigdir {
            write(&l1.join(format!("bigdir/e{i:05}")), &[])?;
        }
        let big = l1.join(Self::BIG);
        mkdir_parent(&big)?;
        let mut f = std::fs::File::create(&big)?;
        let mut block = pool[..MIB].to_vec();
        for i in 0..s.big_mib {
            block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            std::io::Write::write_all(&mut f, &block)?;
        }
        f.sync_all()?;
        drop(f);
        // l2: every 20th tree file, new content.
        let mut rng2 = Rng(7);
        for idx in (7..s.nfiles()).step_by(20) {
            let p = self.l2().join(self.tree_rel(idx));
            mkdir_parent(&p)?;
            write(&p, slice(&mut rng2, 16384))?;
        }
        // Thin layers: small files spread over the leaf dirs.
        for k in 1..=s.nlayers {
            let mut rng = Rng(1000 + k as u64);
            for j in 0..s.thin_files {
                let leaf = ((k * s.thin_files + j) * 7919) % s.nleaf();
                let p = self.thin(k).join(format!(
                    "tree/a{:02}/b{:03}/t{k:03}_{j:03}",
                    leaf / s.nsub,
                    leaf % s.nsub
                ));
                mkdir_parent(&p)?;
                write(&p, slice(&mut rng, 4096))?;
            }
        }
        // Lists: files only in l1 (idx % 20 != 7, so idx % 10 in {0, 3} never hits l2) and missing names.
        let mut copyup = String::new();
        let mut bottom = String::new();
        let mut neg = String::new();
        for idx in (0..s.nfiles()).step_by(10) {
            let _ = writeln!(copyup, "{}", self.tree_rel(idx));
            let _ = writeln!(bottom, "{}", self.tree_rel(idx + 3));
            let i = idx / 10;
            let _ = writeln!(neg, "tree/a{:02}/nx{i:05}", i % s.ntop);
        }
        std::fs::write(self.list("copyup"), copyup)?;
        std::fs::write(self.list("bottom"), bottom)?;
        std::fs::write(self.list("neg"), neg)?;
        // The untar archive, built from a scratch tree with fixed metadata.
        let src = self.dir.join("ctree-src");
        let mut rng3 = Rng(99);
        for d in 0..s.ncreate_dirs {
            let dir = src.join(format!("ctree/c{d:04}"));
            std::fs::create_dir_all(&dir)?;
            for i in 0..20 {
                write(&dir.join(format!("x{i:02}")), slice(&mut rng3, 4096))?;
            }
        }
        cmd::sh(
            &format!(
                "tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner \
                 --mode=go-w -cf {} -C {} ctree",
                q(self.create_tar()),
                q(&src)
            ),
            Duration::from_secs(600),
        )?;
        remove_inside(&src, &self.dir)?;
        cmd::sh("sync", Duration::from_secs(600))?;
        std::fs::write(
            &done,
            format!("built in {:.0} s\n", t0.elapsed().as_secs_f64()),
        )?;
        eprintln!(
            "bench: data set built in {:.0} s",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

fn mkdir_parent(p: &Path) -> Result<()> {
    let parent = p.parent().context("path without parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))
}

fn write(p: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(p, bytes).with_context(|| format!("write {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_the_issue() {
        let f = Shape::FULL;
        assert_eq!(
            (f.nfiles(), f.nleaf(), f.ncreate()),
            (100_000, 5_000, 20_000)
        );
        let q = Shape::QUICK;
        assert_eq!((q.nfiles(), q.nleaf(), q.ncreate()), (10_000, 500, 2_000));
    }

    #[test]
    fn tree_paths_and_stacks() {
        let d = Data::new(Path::new("/r"), Shape::QUICK);
        assert_eq!(d.tree_rel(0), "tree/a00/b000/f00");
        assert_eq!(d.tree_rel(Shape::QUICK.nfiles() - 1), "tree/a19/b024/f19");
        let many = d.lowers(Stack::Many);
        assert_eq!(many.len(), 51);
        assert!(many[0].ends_with("thin/t050") && many[50].ends_with("l1"));
        assert_eq!(
            d.lowers(Stack::Two),
            vec![d.dir.join("l2"), d.dir.join("l1")]
        );
    }
}
