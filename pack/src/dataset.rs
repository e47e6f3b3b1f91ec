//! The reader: [`Dataset`] (random access, verification, statistics) and [`SampleStream`] (deterministic,
//! partitioned, resumable, prefetched epochs).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use arrow::array::RecordBatch;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{PackError, Result};
use crate::index::{DatasetIndex, ShardEntry};
use crate::order::{view_for, EpochOrder, Partition, Shuffle, StreamState};
use crate::record::{SampleKind, Split, SplitCounts, TokenRecord, TokenizerInfo};
use crate::remote::{read_remote_index, remote_url, Remote};
use crate::shard::{Expect, ShardFile};

type ShardSlot = OnceLock<std::result::Result<Arc<ShardFile>, (Option<usize>, String)>>;

struct Inner {
    dir: PathBuf,
    index: DatasetIndex,
    shards: Vec<ShardSlot>,
    /// Object storage and the local shard cache of a remote dataset.
    remote: Option<Arc<Remote>>,
}

/// A packed dataset opened for reading.
///
/// [`Dataset::open`] reads and validates `index.json` only. Each shard is verified lazily, before its first
/// use: its size and sha256 must match the index, then the Arrow file magic, footer, format version, exact
/// schema and metadata, tokenizer and batch layout are checked; every record batch is checked again when it is
/// decoded (message bounds, decompressed sizes, row count, nulls, token and split values). The verdict is
/// cached per shard for the life of the `Dataset`. A verified shard keeps an open file handle and is read with
/// positioned reads, so a shard replaced *after* verification is only caught by the per-batch checks.
///
/// `Dataset` is cheap to clone (shared state) and `Send + Sync`.
#[derive(Clone)]
pub struct Dataset {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("dir", &self.inner.dir)
            .field("shards", &self.inner.index.shards.len())
            .field("counts", &self.inner.index.counts)
            .finish()
    }
}

/// One sample as a training stream delivers it: a single view chosen for the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Global position in the epoch order.
    pub position: u64,
    /// Index in the stream's selection (dataset order over the selected split).
    pub index: u64,
    /// The sample id.
    pub sample_id: u64,
    /// Which of the `K` stored views this is ([`view_for`](crate::view_for)).
    pub view: u32,
    /// The view's crop `x, y, w, h` in source pixels.
    pub crop: [u32; 4],
    /// Whether the view is mirrored.
    pub flip: bool,
    /// The view's `grid_h * grid_w` tokens, row-major.
    pub tokens: Vec<u16>,
    /// Text tokens of each caption.
    pub captions: Vec<Vec<u32>>,
    /// The class label.
    pub label: Option<i32>,
    /// The split.
    pub split: Split,
    /// The working image bytes, if the dataset includes pixels.
    pub pixels: Option<Vec<u8>>,
    /// Image, text or pair. A text sample has no view: `tokens` is empty, `crop` zero, `view` 0, and its text is
    /// its one caption.
    pub kind: SampleKind,
}

/// How a [`SampleStream`] reads an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOptions {
    /// Only this split (`None`: all shards, train then val).
    pub split: Option<Split>,
    /// The order.
    pub shuffle: Shuffle,
    /// Seed of the order and of the view choice.
    pub seed: u64,
    /// This rank (its `worker` field is ignored: the stream runs `num_workers` workers itself and interleaves
    /// them back into the rank's order).
    pub partition: Partition,
    /// Stop the epoch where every rank has had the same number of samples.
    pub drop_last: bool,
    /// Skip samples of corrupt shards or batches (counted in [`SampleStream::corrupt`]) instead of failing.
    pub skip_corrupt: bool,
    /// Positions a worker resolves and decodes together (bounds memory; larger chunks decode fewer batches
    /// twice).
    pub chunk_samples: usize,
    /// Decoded chunks each worker may hold ready ahead of the consumer.
    pub prefetch_chunks: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            split: Some(Split::Train),
            shuffle: Shuffle::default(),
            seed: 0,
            partition: Partition::default(),
            drop_last: false,
            skip_corrupt: false,
            chunk_samples: 4096,
            prefetch_chunks: 2,
        }
    }
}

/// The result of [`Dataset::verify`].
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Shards checked.
    pub shards: usize,
    /// Bad shards: file name and the error.
    pub bad: Vec<(String, String)>,
    /// Samples counted in good shards, per split.
    pub counts: SplitCounts,
    /// Dataset-level problems (counts, duplicate ids).
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Whether everything checked out.
    pub fn is_ok(&self) -> bool {
        self.bad.is_empty() && self.problems.is_empty()
    }
}

/// Distribution summary of a list of lengths.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct LengthSummary {
    /// How many.
    pub count: u64,
    /// Smallest.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
    /// Largest.
    pub max: u64,
}

impl LengthSummary {
    fn of(mut v: Vec<u64>) -> LengthSummary {
        if v.is_empty() {
            return LengthSummary::default();
        }
        v.sort_unstable();
        let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
        LengthSummary {
            count: v.len() as u64,
            min: v[0],
            mean: v.iter().sum::<u64>() as f64 / v.len() as f64,
            p50: q(0.5),
            p95: q(0.95),
            max: v[v.len() - 1],
        }
    }
}

/// The result of [`Dataset::stats`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    /// Shards.
    pub shards: usize,
    /// Record batches.
    pub batches: u64,
    /// Total shard bytes.
    pub bytes: u64,
    /// Samples per split.
    pub counts: SplitCounts,
    /// Shard bytes per sample.
    pub bytes_per_sample: f64,
    /// Raw token bytes (`samples * K * grid_h * grid_w * 2`).
    pub token_bytes: u64,
    /// `token_bytes / bytes`.
    pub compression_ratio: f64,
    /// Visual vocabulary size.
    pub vocab_size: u32,
    /// Distinct visual codes that occur.
    pub codes_used: u64,
    /// Perplexity of the code distribution (`exp` of its entropy in nats); `vocab_size` if uniform.
    pub perplexity: f64,
    /// Captions per sample.
    pub captions_per_sample: LengthSummary,
    /// Samples per kind: `[image, text, pair]` (format 1 datasets: no text samples).
    pub kinds: [u64; 3],
    /// Tokens per caption.
    pub caption_tokens: LengthSummary,
    /// Samples per label (class index), for labelled samples; empty when none has a label.
    pub labels: BTreeMap<i32, u64>,
}

impl Dataset {
    /// Opens the dataset in `dir` and validates its `index.json` (shards are verified lazily, see [`Dataset`]).
    ///
    /// `dir` may be a URL (`s3://bucket/prefix`, `gs://`, `az://`, `https://host/path`): `index.json` is read
    /// from object storage and shards are fetched into a local cache as they are needed (see
    /// [`set_remote_options`](crate::set_remote_options) for the cache directory, its limit and the prefetch depth).
    pub fn open(dir: impl AsRef<Path>) -> Result<Dataset> {
        let dir = dir.as_ref().to_path_buf();
        let (index, remote) = match remote_url(&dir) {
            Some(url) => {
                let (index, remote) = read_remote_index(url)?;
                (index, Some(remote))
            }
            None => (DatasetIndex::read(&dir)?, None),
        };
        let shards = index.shards.iter().map(|_| OnceLock::new()).collect();
        Ok(Dataset {
            inner: Arc::new(Inner {
                dir,
                index,
                shards,
                remote,
            }),
        })
    }

    /// The dataset directory (or URL).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The local cache folder of a remote dataset's shards (`None` for a local dataset).
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.remote.as_ref().map(|r| r.cache_dir())
    }

    /// Asks for `shards` (dataset shard indices, in the order they will be read) to be downloaded ahead of the
    /// reader; a no-op for a local dataset. The stream calls it itself.
    pub fn prefetch(&self, shards: &[usize]) {
        if let Some(remote) = &self.inner.remote {
            let wanted: Vec<(usize, ShardEntry)> = shards
                .iter()
                .filter_map(|&i| self.shards().get(i).map(|e| (i, e.clone())))
                .collect();
            remote.prefetch(&wanted);
        }
    }

    /// The parsed `index.json`.
    pub fn index(&self) -> &DatasetIndex {
        &self.inner.index
    }

    /// The tokenizer the dataset was made with.
    pub fn tokenizer(&self) -> &TokenizerInfo {
        &self.inner.index.tokenizer
    }

    /// The shards.
    pub fn shards(&self) -> &[ShardEntry] {
        &self.inner.index.shards
    }

    /// Total samples.
    pub fn len(&self) -> u64 {
        self.inner.index.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, i: usize) -> Result<Arc<ShardFile>> {
        let entry = self.shards().get(i).ok_or(PackError::OutOfRange {
            what: "shard",
            index: i as u64,
            len: self.shards().len() as u64,
        })?;
        let expect = Expect {
            info: Some(self.tokenizer().clone()),
            include_pixels: Some(self.index().config.include_pixels),
            entry: Some(entry.clone()),
            batch_rows: Some(u64::from(self.index().config.batch_rows)),
        };
        if let Some(remote) = &self.inner.remote {
            return remote.shard(i, entry, &expect);
        }
        let slot = self.inner.shards[i].get_or_init(|| {
            ShardFile::open_verified(&self.dir().join(&entry.file), expect)
                .map(Arc::new)
                .map_err(|e| match e {
                    PackError::CorruptShard { batch, reason, .. } => (batch, reason),
                    other => (None, other.to_string()),
                })
        });
        slot.clone().map_err(|(batch, reason)| PackError::CorruptShard {
            shard: entry.file.clone(),
            batch,
            reason,
        })
    }

    /// Record batch `batch` of shard `shard` as Arrow data (the shard is verified first).
    pub fn read_batch(&self, shard: usize, batch: usize) -> Result<RecordBatch> {
        self.shard(shard)?.read_batch(batch)
    }

    /// The records of one record batch, all views included.
    pub fn batch_records(&self, shard: usize, batch: usize) -> Result<Vec<TokenRecord>> {
        self.shard(shard)?
            .with_batch(batch, |v| (0..v.rows()).map(|r| v.record(r)).collect())
    }

    /// Sample `index` in dataset order (shards in index order), all views included.
    pub fn get(&self, index: u64) -> Result<TokenRecord> {
        let mut row = index;
        for (i, s) in self.shards().iter().enumerate() {
            if row < s.rows {
                let br = u64::from(self.index().config.batch_rows);
                let shard = self.shard(i)?;
                let (b, r) = ((row / br) as usize, (row % br) as usize);
                return shard.with_batch(b, |v| v.record(r));
            }
            row -= s.rows;
        }
        Err(PackError::OutOfRange {
            what: "sample",
            index,
            len: self.len(),
        })
    }

    /// Finds a sample by id (a scan: the index lists shards, not samples).
    pub fn find(&self, sample_id: u64) -> Result<Option<TokenRecord>> {
        Ok(self.scan_for(sample_id, |v, r| v.record(r))?.map(|(_, record)| record))
    }

    /// The shard holding a sample id (a scan, as [`Dataset::find`]): what error messages about a sample name.
    pub fn shard_of(&self, sample_id: u64) -> Result<Option<&ShardEntry>> {
        Ok(self.scan_for(sample_id, |_, _| ())?.map(|(i, ())| &self.shards()[i]))
    }

    fn scan_for<T>(
        &self,
        sample_id: u64,
        take: impl Fn(&crate::shard::BatchView<'_>, usize) -> T,
    ) -> Result<Option<(usize, T)>> {
        for (i, s) in self.shards().iter().enumerate() {
            let shard = self.shard(i)?;
            for b in 0..s.batches as usize {
                let found = shard.with_batch(b, |v| {
                    (0..v.rows()).find(|&r| v.sample_id(r) == sample_id).map(|r| take(v, r))
                })?;
                if let Some(t) = found {
                    return Ok(Some((i, t)));
                }
            }
        }
        Ok(None)
    }

    /// Checks every shard (size, sha256, structure, schema, every batch decoded) in parallel, then the
    /// dataset-level counts and that sample ids are unique. Collects every problem instead of stopping. A remote
    /// dataset's shards are fetched again from object storage (what is cached is dropped first), so the objects
    /// themselves are checked.
    pub fn verify(&self) -> VerifyReport {
        self.verify_with_progress(&|_| {})
    }

    /// [`Dataset::verify`], calling `progress(1)` as each shard's check ends (in any order: shards are checked in
    /// parallel).
    pub fn verify_with_progress(&self, progress: &(dyn Fn(u64) + Sync)) -> VerifyReport {
        if let Some(remote) = &self.inner.remote {
            remote.clear();
        }
        let want_pixels = self.index().config.include_pixels;
        type Checked = (SplitCounts, Vec<u64>, Vec<u64>);
        let results: Vec<std::result::Result<Checked, String>> = (0..self.shards().len())
            .into_par_iter()
            .map(|i| {
                let shard = self.shard(i).map_err(|e| e.to_string())?;
                let mut counts = SplitCounts::default();
                let (mut ids, mut no_pixels) = (Vec::new(), Vec::new());
                for b in 0..shard.num_batches() {
                    shard
                        .with_batch(b, |v| {
                            for r in 0..v.rows() {
                                counts.add(v.split(r));
                                ids.push(v.sample_id(r));
                                if want_pixels && !v.is_text(r) && !v.has_pixels(r) {
                                    no_pixels.push(v.sample_id(r));
                                }
                            }
                        })
                        .map_err(|e| e.to_string())?;
                }
                progress(1);
                Ok((counts, ids, no_pixels))
            })
            .collect();
        let mut report = VerifyReport {
            shards: results.len(),
            ..VerifyReport::default()
        };
        let mut seen = HashSet::new();
        for (entry, r) in self.shards().iter().zip(results) {
            match r {
                Ok((c, ids, no_pixels)) => {
                    report.counts.train += c.train;
                    report.counts.val += c.val;
                    if let Some(first) = no_pixels.first() {
                        report.problems.push(format!(
                            "{}: {} samples have no pixels (the first: sample {first}), although index.json says \
                             include_pixels",
                            entry.file,
                            no_pixels.len()
                        ));
                    }
                    for id in ids {
                        if !seen.insert(id) {
                            report
                                .problems
                                .push(format!("sample {id} appears more than once (again in {})", entry.file));
                        }
                    }
                }
                Err(e) => report.bad.push((entry.file.clone(), e)),
            }
        }
        if report.bad.is_empty() && report.counts != self.index().counts {
            report.problems.push(format!(
                "shards hold {:?}, index.json says {:?}",
                report.counts,
                self.index().counts
            ));
        }
        report
    }

    /// Sizes, compression, visual-code usage and caption lengths, over every shard (in parallel).
    pub fn stats(&self) -> Result<DatasetStats> {
        let info = self.tokenizer();
        let vocab = info.vocab_size as usize;
        type Acc = (Vec<u64>, Vec<u64>, Vec<u64>, [u64; 3], BTreeMap<i32, u64>);
        let per_shard: Vec<Result<Acc>> = (0..self.shards().len())
            .into_par_iter()
            .map(|i| {
                let shard = self.shard(i)?;
                let mut hist = vec![0u64; vocab];
                let (mut per_sample, mut lengths, mut kinds) = (Vec::new(), Vec::new(), [0u64; 3]);
                let mut labels = BTreeMap::new();
                for b in 0..shard.num_batches() {
                    shard.with_batch(b, |v| {
                        for t in v.image_tokens() {
                            hist[usize::from(t)] += 1;
                        }
                        for r in 0..v.rows() {
                            kinds[v.kind(r).code() as usize] += 1;
                            if let Some(l) = v.label(r) {
                                *labels.entry(l).or_insert(0u64) += 1;
                            }
                            let before = lengths.len();
                            lengths.extend(v.caption_lengths(r).map(|l| l as u64));
                            per_sample.push((lengths.len() - before) as u64);
                        }
                    })?;
                }
                Ok((hist, per_sample, lengths, kinds, labels))
            })
            .collect();
        let mut hist = vec![0u64; vocab];
        let (mut per_sample, mut lengths, mut kinds) = (Vec::new(), Vec::new(), [0u64; 3]);
        let mut labels: BTreeMap<i32, u64> = BTreeMap::new();
        for r in per_shard {
            let (h, p, l, k, c) = r?;
            for (label, n) in c {
                *labels.entry(label).or_insert(0) += n;
            }
            kinds.iter_mut().zip(k).for_each(|(a, b)| *a += b);
            hist.iter_mut().zip(h).for_each(|(a, b)| *a += b);
            per_sample.extend(p);
            lengths.extend(l);
        }
        let total: u64 = hist.iter().sum();
        let index = self.index();
        let bytes = index.bytes();
        let n = index.len();
        let token_bytes = total * 2;
        Ok(DatasetStats {
            shards: index.shards.len(),
            batches: index.shards.iter().map(|s| s.batches).sum(),
            bytes,
            counts: index.counts,
            bytes_per_sample: if n == 0 { 0.0 } else { bytes as f64 / n as f64 },
            token_bytes,
            compression_ratio: if bytes == 0 {
                0.0
            } else {
                token_bytes as f64 / bytes as f64
            },
            vocab_size: info.vocab_size,
            codes_used: hist.iter().filter(|&&c| c > 0).count() as u64,
            perplexity: perplexity(&hist),
            captions_per_sample: LengthSummary::of(per_sample),
            kinds,
            caption_tokens: LengthSummary::of(lengths),
            labels,
        })
    }

    fn selection(&self, split: Option<Split>) -> Vec<usize> {
        (0..self.shards().len())
            .filter(|&i| split.is_none_or(|s| self.shards()[i].split == s))
            .collect()
    }

    fn batch_layout(&self, shards: &[usize]) -> Vec<Vec<u64>> {
        let br = u64::from(self.index().config.batch_rows);
        shards
            .iter()
            .map(|&i| {
                let rows = self.shards()[i].rows;
                (0..rows.div_ceil(br)).map(|b| br.min(rows - b * br)).collect()
            })
            .collect()
    }

    /// The order of `epoch` over the samples of `split` (`None`: all).
    pub fn epoch_order(&self, split: Option<Split>, shuffle: Shuffle, seed: u64, epoch: u64) -> Result<EpochOrder> {
        EpochOrder::new(&self.batch_layout(&self.selection(split)), shuffle, seed, epoch)
    }

    /// Random access to `epoch` of `split` by global position ([`EpochReader`]).
    pub fn epoch_reader(&self, split: Option<Split>, shuffle: Shuffle, seed: u64, epoch: u64) -> Result<EpochReader> {
        let selection = self.selection(split);
        let layout = self.batch_layout(&selection);
        let order = Arc::new(EpochOrder::new(&layout, shuffle, seed, epoch)?);
        Ok(EpochReader {
            dataset: self.clone(),
            order,
            plan: Arc::new(self.plan(selection)),
            seed,
            epoch,
        })
    }

    fn plan(&self, selection: Vec<usize>) -> Plan {
        let mut firsts = Vec::with_capacity(selection.len());
        let mut f = 0u64;
        for &i in &selection {
            firsts.push(f);
            f += self.shards()[i].rows;
        }
        Plan {
            selection,
            firsts,
            batch_rows: u64::from(self.index().config.batch_rows),
        }
    }

    /// Streams one epoch from `state` (use `StreamState::default()` to start; [`SampleStream::state`] to resume,
    /// with the same or another world size). Workers decode on background threads into bounded channels.
    pub fn stream(&self, options: &StreamOptions, state: StreamState) -> Result<SampleStream> {
        let mut p = options.partition;
        p.worker = 0;
        p.validate()?;
        if options.chunk_samples == 0 || options.prefetch_chunks == 0 {
            return Err(PackError::InvalidConfig(
                "chunk_samples and prefetch_chunks must be positive".into(),
            ));
        }
        let selection = self.selection(options.split);
        let layout = self.batch_layout(&selection);
        let order = Arc::new(EpochOrder::new(&layout, options.shuffle, options.seed, state.epoch)?);
        let n = order.len();
        let start = state.position.min(n);
        let end = p.end(start, n, options.drop_last);
        let plan = Arc::new(self.plan(selection));
        let corrupt = Arc::new(Mutex::new(CorruptReport::default()));
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        for w in 0..p.num_workers {
            let (tx, rx) = sync_channel::<Vec<Slot>>(options.prefetch_chunks);
            let worker = Worker {
                dataset: self.clone(),
                order: order.clone(),
                plan: plan.clone(),
                partition: Partition { worker: w, ..p },
                start,
                end,
                epoch: state.epoch,
                options: options.clone(),
                corrupt: corrupt.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("imglish-pack-worker-{w}"))
                .spawn(move || worker.run(&tx))
                .map_err(|e| PackError::Io {
                    path: self.dir().to_path_buf(),
                    source: e,
                })?;
            receivers.push(rx);
            handles.push(handle);
        }
        let per_rank = if end > start + u64::from(p.rank) {
            (end - start - u64::from(p.rank)).div_ceil(u64::from(p.world_size))
        } else {
            0
        };
        Ok(SampleStream {
            epoch: state.epoch,
            start,
            world_size: u64::from(p.world_size),
            total: per_rank,
            taken: 0,
            queues: receivers.iter().map(|_| VecDeque::new()).collect(),
            receivers,
            handles,
            corrupt,
            failed: false,
        })
    }
}

#[derive(Debug)]
struct Plan {
    selection: Vec<usize>,
    firsts: Vec<u64>,
    batch_rows: u64,
}

impl Plan {
    /// (shard index in the dataset, batch, row in batch) of selection index `idx`.
    fn locate(&self, idx: u64) -> (usize, usize, usize) {
        let s = self.firsts.partition_point(|&f| f <= idx) - 1;
        let row = idx - self.firsts[s];
        (
            self.selection[s],
            (row / self.batch_rows) as usize,
            (row % self.batch_rows) as usize,
        )
    }
}

enum Slot {
    Sample(Box<Sample>),
    Skipped,
    Failed(PackError),
}

/// Samples a stream skipped because their shard or batch was corrupt (`skip_corrupt`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct CorruptReport {
    /// Samples skipped.
    pub skipped_samples: u64,
    /// The first error seen for each bad shard, by file name.
    pub shards: BTreeMap<String, String>,
}

/// (slot in the chunk, row in the batch, selection index) of one sample a chunk needs.
type Wanted = (usize, usize, u64);

struct Worker {
    dataset: Dataset,
    order: Arc<EpochOrder>,
    plan: Arc<Plan>,
    partition: Partition,
    start: u64,
    end: u64,
    epoch: u64,
    options: StreamOptions,
    corrupt: Arc<Mutex<CorruptReport>>,
}

impl Worker {
    fn run(self, tx: &std::sync::mpsc::SyncSender<Vec<Slot>>) {
        let mut positions = self.partition.positions(self.start, self.end).peekable();
        let lookup = Lookup {
            dataset: &self.dataset,
            order: &self.order,
            plan: &self.plan,
            seed: self.options.seed,
            epoch: self.epoch,
        };
        while positions.peek().is_some() {
            let chunk: Vec<u64> = positions.by_ref().take(self.options.chunk_samples).collect();
            let window = self.options.chunk_samples * 64;
            prefetch_after(
                &self.dataset,
                &self.order,
                &self.plan,
                &chunk,
                positions.clone(),
                window,
            );
            let skip = self.options.skip_corrupt.then_some(&*self.corrupt);
            let (out, fatal) = lookup.resolve(&chunk, skip);
            if tx.send(out).is_err() || fatal {
                return;
            }
        }
    }
}

/// Asks a remote dataset for the shards that the positions `next` will read, in reading order, beyond those
/// `current` reads: as many as its prefetch depth, looking at most `window` positions ahead. A no-op for a local
/// dataset.
fn prefetch_after(
    dataset: &Dataset,
    order: &EpochOrder,
    plan: &Plan,
    current: &[u64],
    next: impl Iterator<Item = u64>,
    window: usize,
) {
    let depth = dataset.inner.remote.as_ref().map_or(0, |r| r.prefetch_depth());
    if depth == 0 {
        return;
    }
    let shard_of = |p: u64| plan.locate(order.sample_at(p)).0;
    let current: Vec<usize> = current.iter().map(|&p| shard_of(p)).collect();
    let mut upcoming: Vec<usize> = Vec::new();
    for s in next.take(window).map(shard_of) {
        if !current.contains(&s) && !upcoming.contains(&s) {
            upcoming.push(s);
            if upcoming.len() == depth {
                break;
            }
        }
    }
    dataset.prefetch(&upcoming);
}

/// Resolves global positions of one epoch to samples.
struct Lookup<'a> {
    dataset: &'a Dataset,
    order: &'a EpochOrder,
    plan: &'a Plan,
    seed: u64,
    epoch: u64,
}

impl Lookup<'_> {
    /// The samples at `chunk` (positions), each record batch decoded once. With `skip` (skip corrupt data),
    /// samples of a bad shard or batch become [`Slot::Skipped`] and are counted there; without it the result
    /// stops at the first failed position with [`Slot::Failed`], and the flag is `true`.
    fn resolve(&self, chunk: &[u64], skip: Option<&Mutex<CorruptReport>>) -> (Vec<Slot>, bool) {
        let k = self.dataset.tokenizer().views_per_sample;
        let mut slots: Vec<Option<Slot>> = chunk.iter().map(|_| None).collect();
        let mut groups: BTreeMap<(usize, usize), Vec<Wanted>> = BTreeMap::new();
        for (i, &p) in chunk.iter().enumerate() {
            let idx = self.order.sample_at(p);
            let (s, b, r) = self.plan.locate(idx);
            groups.entry((s, b)).or_default().push((i, r, idx));
        }
        let mut failure: Option<(usize, PackError)> = None;
        for ((s, b), wanted) in groups {
            let result = self.dataset.shard(s).and_then(|shard| {
                shard.with_batch(b, |v| {
                    for &(i, r, idx) in &wanted {
                        if r >= v.rows() {
                            return Err(PackError::CorruptShard {
                                shard: shard.name().to_string(),
                                batch: Some(b),
                                reason: format!("has {} rows, row {r} was expected", v.rows()),
                            });
                        }
                        let sample_id = v.sample_id(r);
                        let kind = v.kind(r);
                        let (view, vr) = if kind == SampleKind::Text {
                            (
                                0,
                                crate::record::ViewRecord {
                                    crop: [0; 4],
                                    flip: false,
                                    tokens: Vec::new(),
                                },
                            )
                        } else {
                            let view = view_for(self.seed, self.epoch, sample_id, k);
                            (view, v.view(r, view as usize))
                        };
                        slots[i] = Some(Slot::Sample(Box::new(Sample {
                            position: chunk[i],
                            index: idx,
                            sample_id,
                            view,
                            crop: vr.crop,
                            flip: vr.flip,
                            tokens: vr.tokens,
                            captions: v.captions(r),
                            label: v.label(r),
                            split: v.split(r),
                            pixels: v.pixels(r),
                            kind,
                        })));
                    }
                    Ok(())
                })?
            });
            if let Err(e) = result {
                if let Some(corrupt) = skip {
                    tracing::warn!("skipping {} samples: {e}", wanted.len());
                    if let Ok(mut c) = corrupt.lock() {
                        c.skipped_samples += wanted.len() as u64;
                        c.shards
                            .entry(self.dataset.shards()[s].file.clone())
                            .or_insert_with(|| e.to_string());
                    }
                    for &(i, _, _) in &wanted {
                        slots[i] = Some(Slot::Skipped);
                    }
                } else {
                    failure = Some((wanted.first().map_or(0, |w| w.0), e));
                    break;
                }
            }
        }
        // On failure, deliver the resolved samples that precede the failed position, then the error (groups go
        // by shard, not by position: positions before the failed one may be unresolved, and end the prefix).
        match failure {
            Some((first, e)) => {
                slots.truncate(first);
                let mut out: Vec<Slot> = slots.into_iter().map_while(|s| s).collect();
                out.push(Slot::Failed(e));
                (out, true)
            }
            None => (slots.into_iter().flatten().collect(), false),
        }
    }
}

/// Random access to one epoch by global position, for readers that plan their own positions (the Python
/// package's `StreamingDataset` hands each DataLoader worker whole batches). Made by [`Dataset::epoch_reader`].
#[derive(Debug, Clone)]
pub struct EpochReader {
    dataset: Dataset,
    order: Arc<EpochOrder>,
    plan: Arc<Plan>,
    seed: u64,
    epoch: u64,
}

impl EpochReader {
    /// Samples in the epoch (positions `0..len()`).
    pub fn len(&self) -> u64 {
        self.order.len()
    }

    /// Whether the epoch is empty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The samples at `positions` (each `< len()`), in that order, with the view of the epoch chosen as the
    /// streaming reader chooses it; each record batch is decoded once per call. A corrupt shard or batch is an
    /// error naming it.
    pub fn samples(&self, positions: &[u64]) -> Result<Vec<Sample>> {
        if let Some(&p) = positions.iter().find(|&&p| p >= self.len()) {
            return Err(PackError::OutOfRange {
                what: "position",
                index: p,
                len: self.len(),
            });
        }
        let lookup = Lookup {
            dataset: &self.dataset,
            order: &self.order,
            plan: &self.plan,
            seed: self.seed,
            epoch: self.epoch,
        };
        // Readers ask for increasing positions: the shards after the last one asked for come next.
        if let Some(&last) = positions.iter().max() {
            let window = positions.len().max(64) * 64;
            prefetch_after(
                &self.dataset,
                &self.order,
                &self.plan,
                positions,
                last + 1..self.len(),
                window,
            );
        }
        let (slots, _) = lookup.resolve(positions, None);
        let mut out = Vec::with_capacity(positions.len());
        for slot in slots {
            match slot {
                Slot::Sample(s) => out.push(*s),
                Slot::Failed(e) => return Err(e),
                Slot::Skipped => {}
            }
        }
        Ok(out)
    }
}

/// One rank's stream of one epoch (see [`Dataset::stream`]). Yields samples in the rank's order; `Err` once and
/// then ends if a shard is corrupt and `skip_corrupt` is off.
pub struct SampleStream {
    epoch: u64,
    start: u64,
    world_size: u64,
    total: u64,
    taken: u64,
    receivers: Vec<Receiver<Vec<Slot>>>,
    queues: Vec<VecDeque<Slot>>,
    handles: Vec<JoinHandle<()>>,
    corrupt: Arc<Mutex<CorruptReport>>,
    failed: bool,
}

impl std::fmt::Debug for SampleStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleStream")
            .field("state", &self.state())
            .field("remaining", &self.remaining())
            .finish()
    }
}

impl SampleStream {
    /// The resumable state: the epoch and the global position reached, assuming every rank has taken as many
    /// samples as this one (true in lock-step data-parallel training). At the end of the epoch: the next epoch,
    /// position 0.
    pub fn state(&self) -> StreamState {
        if self.taken >= self.total {
            return StreamState {
                epoch: self.epoch + 1,
                position: 0,
            };
        }
        StreamState {
            epoch: self.epoch,
            position: self.start + self.taken * self.world_size,
        }
    }

    /// Samples (positions) this rank still has in the epoch.
    pub fn remaining(&self) -> u64 {
        self.total - self.taken
    }

    /// What was skipped so far because of corruption (`skip_corrupt`).
    pub fn corrupt(&self) -> CorruptReport {
        self.corrupt.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn pull(&mut self, w: usize) -> Option<Slot> {
        if self.queues[w].is_empty() {
            let chunk = self.receivers[w].recv().ok()?;
            self.queues[w].extend(chunk);
        }
        self.queues[w].pop_front()
    }
}

impl Iterator for SampleStream {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        while !self.failed && self.taken < self.total {
            let w = (self.taken % self.receivers.len() as u64) as usize;
            match self.pull(w) {
                Some(Slot::Sample(s)) => {
                    self.taken += 1;
                    return Some(Ok(*s));
                }
                Some(Slot::Skipped) => self.taken += 1,
                Some(Slot::Failed(e)) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                None => {
                    self.failed = true;
                    return Some(Err(PackError::InvalidConfig(
                        "a stream worker stopped unexpectedly".into(),
                    )));
                }
            }
        }
        None
    }
}

impl Drop for SampleStream {
    fn drop(&mut self) {
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The perplexity (exp of the entropy in nats) of a histogram of codes; 0 for an empty one.
pub fn perplexity(hist: &[u64]) -> f64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let entropy: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    entropy.exp()
}
