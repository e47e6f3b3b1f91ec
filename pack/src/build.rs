//! The pack builder: token parts in, verified shards and `index.json` out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{io_err, PackError, Result};
use crate::index::{DatasetIndex, PackConfig, ShardEntry, INDEX_FILE};
use crate::part::{PartReader, PartWriter, TokensManifest};
use crate::record::{Split, SplitCounts, TokenRecord, TokenizerInfo};
use crate::shard::{shard_file_name, shard_schema, ShardWriter, FORMAT_VERSION};
use crate::util;

/// File recording the shards finished so far by an interrupted build.
pub const PROGRESS_FILE: &str = "pack.progress";
const SPILL_DIR: &str = ".pack-spill";
/// Decoded bytes held in memory before the shuffle buckets are spilled to disk.
const SPILL_BUDGET: usize = 128 << 20;
/// Target decoded size of one shuffle bucket (one bucket is held in memory at a time).
const BUCKET_BYTES: u64 = 192 << 20;
const SHUFFLE_TAG: u64 = 0x5348_5546; // "SHUF"

/// What a pack run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackSummary {
    /// Shards in the dataset.
    pub shards: usize,
    /// Shards kept from an interrupted run (verified by hash) instead of being written again.
    pub reused_shards: usize,
    /// Whether the dataset was already complete with the same build fingerprint (nothing written).
    pub up_to_date: bool,
    /// Samples per split.
    pub counts: SplitCounts,
    /// Total shard bytes.
    pub bytes: u64,
    /// The build fingerprint recorded in `index.json`.
    pub build_fingerprint: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    build_fingerprint: String,
    shards: Vec<ShardEntry>,
}

/// Reads the ingest manifest's fingerprint: field `"fingerprint"` of `manifest_dir/ingest.json`, if present.
pub fn manifest_fingerprint(manifest_dir: &Path) -> Result<Option<String>> {
    let path = manifest_dir.join("ingest.json");
    let value: serde_json::Value = util::read_json(&path)?;
    Ok(value.get("fingerprint").and_then(|f| f.as_str()).map(str::to_string))
}

/// The build fingerprint: sha256 over the format and imglish versions, the tokenizer, every part's name and hash,
/// the manifest fingerprint and the pack config.
fn build_fingerprint(tokens: &TokensManifest, manifest_fp: Option<&str>, config: &PackConfig) -> String {
    let parts: Vec<_> = tokens.parts.iter().map(|p| (&p.file, &p.sha256, p.rows)).collect();
    let doc = serde_json::json!({
        "format_version": FORMAT_VERSION,
        "imglish_version": env!("CARGO_PKG_VERSION"),
        "tokenizer": tokens.tokenizer,
        "parts": parts,
        "manifest_fingerprint": manifest_fp,
        "config": config,
    });
    util::sha256_hex(doc.to_string().as_bytes())
}

/// Builds (or resumes, or confirms) the dataset `out` from the token parts in `tokens_dir`.
///
/// * Parts are checked against `tokenize.json` (size, sha256, rows, split counts, tokenizer).
/// * With `config.shuffle_seed`, samples are ordered by a keyed hash of their id (a global shuffle that does not
///   depend on the parts' order); memory stays bounded by spilling hash-range buckets to `out/.pack-spill/`.
/// * Every shard holds one split; train shards come first. A shard is closed after the record batch that
///   brings it to `target_shard_bytes`.
/// * Each shard is written to a temporary name, fsynced and renamed; `pack.progress` records finished shards,
///   so an interrupted run resumes after the last shard that still verifies. `index.json` is written last.
/// * The output depends only on the inputs and `config`, never on the thread count.
///
/// `progress` is called with the number of samples just written (or skipped because already packed).
pub fn pack_dataset(
    tokens_dir: &Path,
    manifest_dir: Option<&Path>,
    out: &Path,
    config: &PackConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<PackSummary> {
    config.validate()?;
    let tokens = TokensManifest::read(tokens_dir)?;
    if tokens.counts.total() == 0 {
        // A dataset of nothing would be a silent empty success for every later stage.
        return Err(PackError::InvalidJson {
            path: tokens_dir.join("tokenize.json"),
            reason: "records no samples (every image was rejected at tokenize; see rejects.parquet there): nothing \
                     to pack"
                .into(),
        });
    }
    tokens.parts.par_iter().try_for_each(|p| -> Result<()> {
        let path = tokens_dir.join(&p.file);
        let (sha256, bytes) = util::sha256_file(&path)?;
        if sha256 != p.sha256 || bytes != p.bytes {
            return Err(PackError::HashMismatch {
                path,
                expected: format!("{} ({} bytes)", p.sha256, p.bytes),
                actual: format!("{sha256} ({bytes} bytes)"),
            });
        }
        Ok(())
    })?;
    let manifest_fp = manifest_dir.map(manifest_fingerprint).transpose()?.flatten();
    let fingerprint = build_fingerprint(&tokens, manifest_fp.as_deref(), config);

    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let conflict = |reason: String| PackError::OutputConflict {
        path: out.to_path_buf(),
        reason,
    };
    let mut previous: Vec<ShardEntry> = Vec::new();
    if out.join(INDEX_FILE).exists() {
        let index: serde_json::Value = util::read_json(&out.join(INDEX_FILE))?;
        if index.get("build_fingerprint").and_then(|f| f.as_str()) != Some(fingerprint.as_str()) {
            return Err(conflict(
                "already holds a dataset built from other inputs or settings (remove it or choose another --out)"
                    .into(),
            ));
        }
        let index = DatasetIndex::read(out)?;
        previous = index.shards;
    } else if out.join(PROGRESS_FILE).exists() {
        let p: Progress = util::read_json(&out.join(PROGRESS_FILE))?;
        if p.build_fingerprint != fingerprint {
            return Err(conflict(format!(
                "holds an interrupted build ({PROGRESS_FILE}) from other inputs or settings (remove it or choose another --out)"
            )));
        }
        previous = p.shards;
    } else {
        let foreign = std::fs::read_dir(out)
            .map_err(io_err(out))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| {
                !(n.starts_with("shard-") || n.starts_with(".shard-") || n == SPILL_DIR || n.starts_with(".pack"))
            });
        if let Some(name) = foreign {
            return Err(conflict(format!(
                "is not empty (holds {name}) and is not an imglish dataset"
            )));
        }
    }

    // Keep the longest prefix of recorded shards that still verifies.
    let ok: Vec<bool> = previous
        .par_iter()
        .map(|s| util::sha256_file(&out.join(&s.file)).is_ok_and(|(h, n)| h == s.sha256 && n == s.bytes))
        .collect();
    let kept_len = ok.iter().position(|&v| !v).unwrap_or(previous.len());
    let mut shards: Vec<ShardEntry> = previous[..kept_len].to_vec();
    let complete = kept_len == previous.len() && out.join(INDEX_FILE).exists();
    clean_stray(out, &shards)?;
    if complete {
        let index = DatasetIndex::read(out)?;
        progress(index.len());
        return Ok(PackSummary {
            shards: index.shards.len(),
            reused_shards: index.shards.len(),
            up_to_date: true,
            counts: index.counts,
            bytes: index.bytes(),
            build_fingerprint: fingerprint,
        });
    }
    let _ = std::fs::remove_file(out.join(INDEX_FILE));
    let reused = shards.len();

    let info = &tokens.tokenizer;
    let schema = Arc::new(shard_schema(info, config.include_pixels));
    let mut spill: Option<Spill> = None;
    for split in Split::ALL {
        let total = tokens.counts.get(split);
        let done: u64 = shards.iter().filter(|s| s.split == split).map(|s| s.rows).sum();
        progress(done);
        if done >= total {
            continue;
        }
        let source: Box<dyn Iterator<Item = Result<TokenRecord>> + Send + '_> = match config.shuffle_seed {
            None => Box::new(ordered_records(tokens_dir, &tokens, split)),
            Some(seed) => {
                if spill.is_none() {
                    spill = Some(Spill::create(tokens_dir, &tokens, out, seed)?);
                }
                Box::new(spill.as_ref().map(|s| s.records(split)).into_iter().flatten())
            }
        };
        let source = source.skip(usize::try_from(done).unwrap_or(usize::MAX));
        let batch_rows = config.batch_rows as usize;
        let mut sink = ShardSink {
            out,
            schema: &schema,
            info,
            config,
            split,
            fingerprint: &fingerprint,
            shards: &mut shards,
            current: None,
            progress,
        };
        if rayon::current_num_threads() > 1 {
            // Read and decode the parts on one thread while this one compresses and writes.
            std::thread::scope(|scope| -> Result<()> {
                let (tx, rx) = mpsc::sync_channel::<Result<Vec<TokenRecord>>>(4);
                scope.spawn(move || {
                    for batch in batches(source, batch_rows) {
                        if tx.send(batch).is_err() {
                            break;
                        }
                    }
                });
                for batch in rx {
                    sink.push(batch?)?;
                }
                Ok(())
            })?;
        } else {
            for batch in batches(source, batch_rows) {
                sink.push(batch?)?;
            }
        }
        sink.close()?;
        drop(sink);
        let written: u64 = shards.iter().filter(|s| s.split == split).map(|s| s.rows).sum();
        if written != total {
            return Err(PackError::InvalidJson {
                path: tokens_dir.join(crate::part::TOKENS_MANIFEST_FILE),
                reason: format!("counts {total} {split} samples, the parts hold {written}"),
            });
        }
    }
    drop(spill);
    let _ = std::fs::remove_dir_all(out.join(SPILL_DIR));

    let mut counts = SplitCounts::default();
    for s in &shards {
        *counts.get_mut(s.split) += s.rows;
    }
    let index = DatasetIndex {
        format_version: FORMAT_VERSION,
        imglish_version: env!("CARGO_PKG_VERSION").to_string(),
        build_fingerprint: fingerprint.clone(),
        manifest_fingerprint: manifest_fp,
        tokenizer: info.clone(),
        config: config.clone(),
        counts,
        shards,
    };
    index.write(out)?;
    let _ = std::fs::remove_file(out.join(PROGRESS_FILE));
    Ok(PackSummary {
        shards: index.shards.len(),
        reused_shards: reused,
        up_to_date: false,
        counts,
        bytes: index.bytes(),
        build_fingerprint: fingerprint,
    })
}

/// Removes shard files and temporaries that are not among the kept shards.
fn clean_stray(out: &Path, kept: &[ShardEntry]) -> Result<()> {
    let keep: std::collections::HashSet<&str> = kept.iter().map(|s| s.file.as_str()).collect();
    for e in std::fs::read_dir(out).map_err(io_err(out))? {
        let e = e.map_err(io_err(out))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let stray_shard = name.starts_with("shard-") && name.ends_with(".arrow") && !keep.contains(name.as_str());
        if stray_shard || (name.starts_with(".shard-") && name.ends_with(".tmp")) {
            std::fs::remove_file(e.path()).map_err(io_err(e.path()))?;
        }
    }
    Ok(())
}

fn batches<I: Iterator<Item = Result<TokenRecord>>>(
    mut source: I,
    rows: usize,
) -> impl Iterator<Item = Result<Vec<TokenRecord>>> {
    std::iter::from_fn(move || {
        let mut batch = Vec::with_capacity(rows);
        for r in source.by_ref() {
            match r {
                Ok(r) => batch.push(r),
                Err(e) => return Some(Err(e)),
            }
            if batch.len() == rows {
                break;
            }
        }
        (!batch.is_empty()).then_some(Ok(batch))
    })
}

struct ShardSink<'a> {
    out: &'a Path,
    schema: &'a arrow::datatypes::SchemaRef,
    info: &'a TokenizerInfo,
    config: &'a PackConfig,
    split: Split,
    fingerprint: &'a str,
    shards: &'a mut Vec<ShardEntry>,
    current: Option<ShardWriter>,
    progress: &'a (dyn Fn(u64) + Sync),
}

impl Drop for ShardSink<'_> {
    /// A sink dropped with a shard still open is a failed pack: its temporary file goes too.
    fn drop(&mut self) {
        if let Some(w) = self.current.take() {
            w.abandon();
        }
    }
}

impl ShardSink<'_> {
    fn push(&mut self, batch: Vec<TokenRecord>) -> Result<()> {
        if self.config.include_pixels {
            if let Some(r) = batch.iter().find(|r| r.pixels.is_none() && !r.views.is_empty()) {
                return Err(PackError::InvalidRecord {
                    sample_id: r.sample_id,
                    reason: "its token part holds no pixels, and --include-pixels needs them: make the token parts \
                             with `imglish tokenize --keep-pixels`"
                        .into(),
                });
            }
        }
        if self.current.is_none() {
            let name = shard_file_name(self.shards.len());
            let writer = ShardWriter::create(
                self.out,
                name,
                self.schema.clone(),
                self.info,
                self.split,
                self.config.zstd_level,
            )?;
            self.current = Some(writer);
        }
        if let Some(w) = self.current.as_mut() {
            w.write(&batch)?;
            (self.progress)(batch.len() as u64);
            if w.bytes() >= self.config.target_shard_bytes {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            self.shards.push(w.finish()?);
            let progress = Progress {
                build_fingerprint: self.fingerprint.to_string(),
                shards: self.shards.clone(),
            };
            util::write_json_atomic(&self.out.join(PROGRESS_FILE), &progress)?;
        }
        Ok(())
    }
}

/// The records of `split` in part order, checking each part's tokenizer and row counts.
fn ordered_records<'a>(
    tokens_dir: &'a Path,
    tokens: &'a TokensManifest,
    split: Split,
) -> impl Iterator<Item = Result<TokenRecord>> + Send + 'a {
    tokens
        .parts
        .iter()
        .flat_map(move |p| checked_part(tokens_dir.join(&p.file), &tokens.tokenizer, p.rows, p.counts))
        .filter(move |r| r.as_ref().map_or(true, |r| r.split == split))
}

/// All records of one part; an error if the part's tokenizer, rows or split counts differ from the manifest.
fn checked_part(
    path: PathBuf,
    info: &TokenizerInfo,
    rows: u64,
    counts: SplitCounts,
) -> Box<dyn Iterator<Item = Result<TokenRecord>> + Send> {
    let reader = match PartReader::open(&path) {
        Ok(r) => r,
        Err(e) => return Box::new(std::iter::once(Err(e))),
    };
    if reader.info() != info {
        return Box::new(std::iter::once(Err(PackError::InvalidPart {
            path,
            reason: format!(
                "made with tokenizer {}, tokenize.json says {}",
                reader.info().fingerprint,
                info.fingerprint
            ),
        })));
    }
    let mut seen = SplitCounts::default();
    let mut reader = reader;
    let mut finished = false;
    Box::new(std::iter::from_fn(move || {
        if finished {
            return None;
        }
        match reader.next() {
            Some(Ok(r)) => {
                seen.add(r.split);
                Some(Ok(r))
            }
            Some(Err(e)) => {
                finished = true;
                Some(Err(e))
            }
            None => {
                finished = true;
                (seen != counts || seen.total() != rows).then(|| {
                    Err(PackError::InvalidPart {
                        path: path.clone(),
                        reason: format!("holds {seen:?}, tokenize.json says {counts:?}"),
                    })
                })
            }
        }
    }))
}

/// Hash-range buckets of the shuffled order, spilled to disk as token parts.
struct Spill {
    dir: PathBuf,
    key: u64,
    buckets: BTreeMap<Split, usize>,
    files: BTreeMap<(Split, usize), Vec<PathBuf>>,
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn approx_bytes(r: &TokenRecord) -> usize {
    96 + r.views.iter().map(|v| 32 + 2 * v.tokens.len()).sum::<usize>()
        + r.captions.iter().map(|c| 24 + 4 * c.len()).sum::<usize>()
        + r.pixels.as_ref().map_or(0, Vec::len)
}

impl Spill {
    fn create(tokens_dir: &Path, tokens: &TokensManifest, out: &Path, seed: u64) -> Result<Spill> {
        let dir = out.join(SPILL_DIR);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let total_rows = tokens.counts.total().max(1);
        let part_bytes: u64 = tokens.parts.iter().map(|p| p.bytes).sum();
        // Decoded records are a few times larger than the zstd parts.
        let buckets: BTreeMap<Split, usize> = Split::ALL
            .into_iter()
            .map(|s| {
                let est = part_bytes.saturating_mul(4).saturating_mul(tokens.counts.get(s)) / total_rows;
                (s, usize::try_from(est.div_ceil(BUCKET_BYTES).max(1)).unwrap_or(1))
            })
            .collect();
        let mut spill = Spill {
            dir,
            key: util::derive_key(seed, &[SHUFFLE_TAG]),
            buckets,
            files: BTreeMap::new(),
        };
        let mut pending: BTreeMap<(Split, usize), Vec<TokenRecord>> = BTreeMap::new();
        let mut pending_bytes = 0usize;
        for p in &tokens.parts {
            for r in checked_part(tokens_dir.join(&p.file), &tokens.tokenizer, p.rows, p.counts) {
                let r = r?;
                pending_bytes += approx_bytes(&r);
                let b = spill.bucket(&r);
                pending.entry((r.split, b)).or_default().push(r);
                if pending_bytes >= SPILL_BUDGET {
                    spill.flush(&mut pending, &tokens.tokenizer)?;
                    pending_bytes = 0;
                }
            }
        }
        spill.flush(&mut pending, &tokens.tokenizer)?;
        Ok(spill)
    }

    fn sort_key(&self, sample_id: u64) -> u64 {
        util::keyed_hash(self.key, sample_id)
    }

    fn bucket(&self, r: &TokenRecord) -> usize {
        let n = self.buckets.get(&r.split).copied().unwrap_or(1) as u128;
        ((u128::from(self.sort_key(r.sample_id)) * n) >> 64) as usize
    }

    fn flush(&mut self, pending: &mut BTreeMap<(Split, usize), Vec<TokenRecord>>, info: &TokenizerInfo) -> Result<()> {
        let jobs: Vec<((Split, usize), Vec<TokenRecord>, PathBuf)> = std::mem::take(pending)
            .into_iter()
            .map(|(k, v)| {
                let n = self.files.get(&k).map_or(0, Vec::len);
                let path = self.dir.join(format!("{}-{:05}-{n:05}.parquet", k.0, k.1));
                (k, v, path)
            })
            .collect();
        let written: Vec<Result<((Split, usize), PathBuf)>> = jobs
            .into_par_iter()
            .map(|(k, records, path)| {
                let mut w = PartWriter::with_level(path.clone(), info, 1)?;
                for r in &records {
                    w.write(r)?;
                }
                w.finish()?;
                Ok((k, path))
            })
            .collect();
        for w in written {
            let (k, path) = w?;
            self.files.entry(k).or_default().push(path);
        }
        Ok(())
    }

    /// The records of `split` in shuffled order: bucket by bucket, each sorted by (key, sample id).
    fn records(&self, split: Split) -> impl Iterator<Item = Result<TokenRecord>> + Send + '_ {
        let n = self.buckets.get(&split).copied().unwrap_or(1);
        (0..n).flat_map(move |b| -> Box<dyn Iterator<Item = Result<TokenRecord>> + Send> {
            match self.load_bucket(split, b) {
                Ok(v) => Box::new(v.into_iter().map(Ok)),
                Err(e) => Box::new(std::iter::once(Err(e))),
            }
        })
    }

    fn load_bucket(&self, split: Split, b: usize) -> Result<Vec<TokenRecord>> {
        let mut records = Vec::new();
        for path in self.files.get(&(split, b)).into_iter().flatten() {
            for r in PartReader::open(path)? {
                records.push(r?);
            }
        }
        records.sort_by_key(|r| (self.sort_key(r.sample_id), r.sample_id));
        if let Some(w) = records.windows(2).find(|w| w[0].sample_id == w[1].sample_id) {
            return Err(PackError::DuplicateSample {
                sample_id: w[0].sample_id,
            });
        }
        Ok(records)
    }
}
