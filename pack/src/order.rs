//! Deterministic epoch orders and their partition across ranks and loader workers.
//!
//! An epoch's order is a function from a *global position* `p` in `[0, n)` to a sample index, fixed by
//! `(seed, epoch)` and the dataset. Rank `r` of `world_size` takes the positions `p ≡ r (mod world_size)`; its
//! loader worker `w` of `num_workers` takes every `num_workers`-th of those, so reading the workers round-robin
//! gives the rank's order back. A stream's state is the global position every rank has reached; on resume,
//! with the same or another world size, the positions from there on are split again. Nothing is padded: when
//! `world_size` does not divide the remaining samples, ranks get counts that differ by one (or use `drop_last`).

use serde::{Deserialize, Serialize};

use crate::error::{PackError, Result};
use crate::util::{derive_key, keyed_hash};

const ROUNDS: usize = 6;
const TAG_GLOBAL: u64 = 0x474c_4f42;
const TAG_SHARDS: u64 = 0x5348_5244;
const TAG_WINDOW: u64 = 0x5749_4e44;
const TAG_VIEW: u64 = 0x5649_4557;

/// A keyed bijection of `[0, n)` (a balanced Feistel network on the next even power of two, with cycle
/// walking): O(1) memory, O(1) expected time per index, the same on every platform.
#[derive(Debug, Clone)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; ROUNDS],
}

impl Permutation {
    /// The permutation of `[0, n)` for `key`.
    pub fn new(n: u64, key: u64) -> Permutation {
        let bits = if n <= 1 { 2 } else { 64 - (n - 1).leading_zeros() };
        let half_bits = bits.div_ceil(2).max(1);
        let keys = std::array::from_fn(|i| keyed_hash(key, i as u64));
        Permutation { n, half_bits, keys }
    }

    /// The domain size.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether the domain is empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = keyed_hash(k, r) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    /// The image of `i` (`i < n`).
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = self.feistel(i);
        while x >= self.n {
            x = self.feistel(x);
        }
        x
    }
}

/// How an epoch is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Shuffle {
    /// Dataset order (shards in index order, rows in order).
    None,
    /// A uniformly scrambled permutation of all samples ([`Permutation`]). Best mixing; reading costs about one
    /// record-batch decode per sample unless the dataset is small.
    Global,
    /// Shards in a shuffled order, record batches in order within a shard, samples shuffled within windows of
    /// `batches` consecutive record batches. Each batch is decoded once per window; mixing is local.
    Window {
        /// Record batches per window.
        batches: u32,
    },
}

impl Default for Shuffle {
    fn default() -> Self {
        Shuffle::Window { batches: 16 }
    }
}

/// Which slice of the epoch a reader takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// This process's rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// This loader worker (within the rank).
    pub worker: u32,
    /// Loader workers per rank.
    pub num_workers: u32,
}

impl Default for Partition {
    fn default() -> Self {
        Partition {
            rank: 0,
            world_size: 1,
            worker: 0,
            num_workers: 1,
        }
    }
}

impl Partition {
    /// Rank `rank` of `world_size`, one worker.
    pub fn rank(rank: u32, world_size: u32) -> Partition {
        Partition {
            rank,
            world_size,
            ..Partition::default()
        }
    }

    /// Checks `rank < world_size` and `worker < num_workers`.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0
            || self.rank >= self.world_size
            || self.num_workers == 0
            || self.worker >= self.num_workers
        {
            return Err(PackError::InvalidConfig(format!("invalid partition {self:?}")));
        }
        Ok(())
    }

    /// The global positions this reader takes, from `start` (a global position every rank has reached) up to
    /// `end`, in order.
    pub fn positions(&self, start: u64, end: u64) -> impl Iterator<Item = u64> + Clone {
        let stride = u64::from(self.world_size) * u64::from(self.num_workers);
        let first = start + u64::from(self.rank) + u64::from(self.world_size) * u64::from(self.worker);
        (0..).map(move |k| first + k * stride).take_while(move |&p| p < end)
    }

    /// The epoch's end for readers that resume at `start`: `n`, or with `drop_last` the last position at which
    /// every rank has taken the same number of samples.
    pub fn end(&self, start: u64, n: u64, drop_last: bool) -> u64 {
        if !drop_last || start >= n {
            return n;
        }
        let ws = u64::from(self.world_size);
        start + (n - start) / ws * ws
    }
}

/// Where a stream is: the epoch and the global position that every rank has reached. Small, serialisable, and
/// valid across a change of world size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// The epoch.
    pub epoch: u64,
    /// Global positions `[0, position)` of the epoch have been delivered (across all ranks).
    pub position: u64,
}

/// One block of consecutive samples (a record batch) in epoch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    /// Index of the first sample (in the dataset's selection order).
    pub(crate) first: u64,
    pub(crate) rows: u64,
}

/// The order of one epoch over a selection of samples: `sample_at(p)` for every global position `p`.
#[derive(Debug, Clone)]
pub struct EpochOrder {
    n: u64,
    kind: OrderKind,
}

#[derive(Debug, Clone)]
enum OrderKind {
    Identity,
    Global(Permutation),
    Window {
        key: u64,
        /// Per window: its first global position, and its blocks (first sample, rows) in order.
        starts: Vec<u64>,
        windows: Vec<Vec<Block>>,
    },
}

impl EpochOrder {
    /// The order of epoch `epoch` over samples laid out in `shards` (each a list of record-batch row counts, in
    /// dataset order; sample indices are consecutive over all of them).
    pub(crate) fn new(shards: &[Vec<u64>], shuffle: Shuffle, seed: u64, epoch: u64) -> Result<EpochOrder> {
        let n: u64 = shards.iter().flatten().sum();
        let kind = match shuffle {
            Shuffle::None => OrderKind::Identity,
            Shuffle::Global => OrderKind::Global(Permutation::new(n, derive_key(seed, &[TAG_GLOBAL, epoch]))),
            Shuffle::Window { batches } => {
                if batches == 0 {
                    return Err(PackError::InvalidConfig(
                        "a shuffle window needs at least one batch".into(),
                    ));
                }
                let mut firsts = Vec::with_capacity(shards.len());
                let mut first = 0u64;
                for s in shards {
                    firsts.push(first);
                    first += s.iter().sum::<u64>();
                }
                let perm = Permutation::new(shards.len() as u64, derive_key(seed, &[TAG_SHARDS, epoch]));
                let mut blocks = Vec::new();
                for i in 0..shards.len() as u64 {
                    let s = perm.apply(i) as usize;
                    let mut f = firsts[s];
                    for &rows in &shards[s] {
                        blocks.push(Block { first: f, rows });
                        f += rows;
                    }
                }
                let windows: Vec<Vec<Block>> = blocks.chunks(batches as usize).map(<[Block]>::to_vec).collect();
                let mut starts = Vec::with_capacity(windows.len());
                let mut p = 0u64;
                for w in &windows {
                    starts.push(p);
                    p += w.iter().map(|b| b.rows).sum::<u64>();
                }
                OrderKind::Window {
                    key: derive_key(seed, &[TAG_WINDOW, epoch]),
                    starts,
                    windows,
                }
            }
        };
        Ok(EpochOrder { n, kind })
    }

    /// Samples in the epoch.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether the epoch is empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The sample index at global position `p < len()`.
    pub fn sample_at(&self, p: u64) -> u64 {
        match &self.kind {
            OrderKind::Identity => p,
            OrderKind::Global(perm) => perm.apply(p),
            OrderKind::Window { key, starts, windows } => {
                let w = starts.partition_point(|&s| s <= p) - 1;
                let blocks = &windows[w];
                let size: u64 = blocks.iter().map(|b| b.rows).sum();
                let mut k = Permutation::new(size, keyed_hash(*key, w as u64)).apply(p - starts[w]);
                for b in blocks {
                    if k < b.rows {
                        return b.first + k;
                    }
                    k -= b.rows;
                }
                unreachable!("a window's permutation stays inside the window")
            }
        }
    }
}

/// The view of a sample used in an epoch: a keyed hash of `(seed, epoch, sample_id)` modulo `views`.
pub fn view_for(seed: u64, epoch: u64, sample_id: u64, views: u32) -> u32 {
    (keyed_hash(derive_key(seed, &[TAG_VIEW, epoch]), sample_id) % u64::from(views.max(1))) as u32
}

/// Shuffle quality: mean `|sample_at(p+1) - sample_at(p)|` divided by its value for a uniformly random
/// permutation, `(n+1)/3`. About 1 for a good global shuffle; near `1/n` for no shuffle.
pub fn mean_jump_ratio(order: &EpochOrder) -> f64 {
    let n = order.len();
    if n < 2 {
        return 0.0;
    }
    let mut prev = order.sample_at(0);
    let mut total = 0f64;
    for p in 1..n {
        let s = order.sample_at(p);
        total += s.abs_diff(prev) as f64;
        prev = s;
    }
    total / (n - 1) as f64 / ((n + 1) as f64 / 3.0)
}
