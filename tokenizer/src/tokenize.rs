//! The tokenize stage: manifest → views → visual tokens (ONNX Runtime) + caption token ids → token parts.
//!
//! A streaming pipeline: a producer thread decodes and renders views on the rayon pool, one batch ahead, into a
//! bounded queue; the model consumes batches; a writer appends records to the current part. Parts are fixed
//! slices of the manifest (sorted by sample id), written atomically and marked done with a sidecar, so a re-run
//! skips finished parts and `--worker I/N` processes (parts `n` with `n % N == I`) produce the same files as one
//! process. `tokenize.json` (and `rejects.parquet`) are written once every part is done.

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use imglish_ingest::{
    read_image_bytes, CropSpec, DecodeOptions, Manifest, ManifestRow, RejectRow, Resizer, ViewParams,
};
use imglish_pack::{
    part_file_name, PartEntry, PartWriter, Split, TokenRecord, TokenizerInfo, TokensManifest, ViewRecord,
};
use serde::{Deserialize, Serialize};

use crate::card::VisualTokenizer;
use crate::error::{Error, Result};
use crate::ordered;
use crate::text::TextTokenizer;
use crate::views::{render_decoded, render_views, ViewSpec};
use imglish_ingest::Progress;

/// Keep each sample's working image so a trainer can rebuild any view's pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelsConfig {
    /// The shorter side of the stored image (images are never upscaled).
    pub short_side: u32,
    /// JPEG quality.
    pub quality: u8,
}

/// Settings of a tokenize run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizeConfig {
    /// Views per image (view 0 is the centre view).
    pub views: u32,
    /// Views per model batch.
    pub batch_size: usize,
    /// Seed of the random views.
    pub seed: u64,
    /// Samples per part.
    pub part_samples: usize,
    /// Keep working images.
    pub pixels: Option<PixelsConfig>,
    /// This process is worker `worker.0` of `worker.1`.
    pub worker: (u32, u32),
    /// Random-resized-crop settings.
    pub crop: CropSpec,
    /// Reduce JPEGs as far as Pillow's `draft()` (see [`DecodeOptions`]'s `draft`).
    #[serde(default)]
    pub jpeg_draft: bool,
    /// Decode every scan of progressive JPEGs (see [`DecodeOptions`]'s `all_scans`).
    #[serde(default)]
    pub jpeg_all_scans: bool,
    /// Replace parts in the output folder made by another run (other manifest, tokenizer or settings); without
    /// it such a folder is refused.
    #[serde(default)]
    pub overwrite: bool,
    /// How the tokenizers are named to a user in messages (e.g. their paths); their fingerprints otherwise.
    #[serde(default)]
    pub tokenizers_label: Option<String>,
}

impl Default for TokenizeConfig {
    fn default() -> Self {
        TokenizeConfig {
            views: 4,
            batch_size: 64,
            seed: 0,
            part_samples: 4096,
            pixels: None,
            worker: (0, 1),
            crop: CropSpec::default(),
            jpeg_draft: false,
            jpeg_all_scans: false,
            overwrite: false,
            tokenizers_label: None,
        }
    }
}

impl TokenizeConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::Model {
            model: "tokenize".into(),
            reason,
        };
        if self.views == 0 || self.batch_size == 0 || self.part_samples == 0 {
            return Err(bad("--views, --batch-size and --part-samples must be positive".into()));
        }
        if self.worker.1 == 0 || self.worker.0 >= self.worker.1 {
            return Err(bad(format!(
                "--worker {}/{}: expected I/N with 0 <= I < N",
                self.worker.0, self.worker.1
            )));
        }
        Ok(())
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizeSummary {
    /// Images tokenized in this run.
    pub images: u64,
    /// Views tokenized in this run.
    pub views: u64,
    /// Images rejected in this run (decode failures).
    pub rejected: u64,
    /// Parts written by this run.
    pub parts_written: u64,
    /// Parts already done (skipped).
    pub parts_skipped: u64,
    /// Parts belonging to other workers and not done yet.
    pub parts_pending: u64,
    /// Wall seconds.
    pub seconds: f64,
    /// Seconds the model was running.
    pub model_seconds: f64,
    /// Seconds the model waited for decoded views.
    pub wait_seconds: f64,
    /// `true` when every part is done and `tokenize.json` was written.
    pub complete: bool,
    /// Text-only documents tokenized in this run.
    pub texts: u64,
    /// Text samples they gave (a document longer than the maximum text length is cut into several).
    pub text_segments: u64,
    /// Documents that were cut into more than one segment.
    pub texts_cut: u64,
}

impl TokenizeSummary {
    /// Fraction of the pipeline time the model was busy.
    pub fn model_busy(&self) -> f64 {
        self.model_seconds / (self.model_seconds + self.wait_seconds).max(1e-9)
    }
}

/// The sidecar that marks a part done.
#[derive(Debug, Serialize, Deserialize)]
struct PartDone {
    /// Fingerprint of everything that determines the part's bytes (tokenizers, config, manifest).
    run: String,
    entry: PartEntry,
    rejects: Vec<(String, String, String, String)>,
}

fn done_path(out: &Path, n: usize) -> PathBuf {
    out.join(format!("part-{n:05}.done.json"))
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_done(out: &Path, n: usize, run: &str) -> Option<PartDone> {
    let done: PartDone = serde_json::from_slice(&std::fs::read(done_path(out, n)).ok()?).ok()?;
    if done.run != run {
        return None;
    }
    let bytes = std::fs::read(out.join(&done.entry.file)).ok()?;
    (crate::card::sha256_hex(&bytes) == done.entry.sha256).then_some(done)
}

/// A sample's views, their pixels, and the kept working image.
type Rendered = (Vec<ViewParams>, Vec<RgbImage>, Option<Vec<u8>>);

struct Prepared {
    row: usize,
    result: std::result::Result<Rendered, imglish_ingest::Rejection>,
}

fn prepare(
    row: &ManifestRow,
    spec: &ViewSpec,
    decode: &DecodeOptions,
    pixels: Option<PixelsConfig>,
    resizer: &mut Resizer,
) -> Prepared {
    let result = read_image_bytes(row)
        .map_err(|e| imglish_ingest::Rejection {
            reason: imglish_ingest::Reason::Unreadable,
            message: e.to_string(),
        })
        .and_then(|bytes| match pixels {
            None => render_views(&bytes, (row.width, row.height), row.sample_id, spec, decode, resizer)
                .map(|(v, i)| (v, i, None)),
            Some(p) => {
                // The views are rendered from exactly the stored working image, so a trainer that decodes it
                // sees the pixels the tokens were computed from.
                let full = imglish_ingest::decode_rgb(&bytes, decode, 1.0)?;
                let working = working_image(&full, p, resizer);
                let decoded = imglish_ingest::decode_rgb(&working, decode, 1.0)?;
                let (v, i) = render_decoded(&decoded, row.sample_id, spec, resizer);
                Ok((v, i, Some(working)))
            }
        });
    Prepared { row: 0, result }
}

/// The working image: shorter side resized to `p.short_side` (never upscaled), JPEG at `p.quality`.
fn working_image(d: &imglish_ingest::Decoded, p: PixelsConfig, resizer: &mut Resizer) -> Vec<u8> {
    let (w, h) = (d.image.width(), d.image.height());
    let short = w.min(h);
    let resized;
    let img = if short > p.short_side {
        let scale = p.short_side as f64 / short as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(1),
            ((h as f64 * scale).round() as u32).max(1),
        );
        resized = imglish_ingest::resize_image(&d.image, nw, nh, imglish_ingest::Filter::Bicubic, resizer);
        &resized
    } else {
        &d.image
    };
    let mut out = Vec::new();
    let _ = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, p.quality).encode_image(img);
    out
}

/// Runs the tokenize stage for this worker's parts.
pub fn tokenize(
    manifest_dir: &Path,
    out: &Path,
    visual: &mut VisualTokenizer,
    text: Option<&TextTokenizer>,
    config: &TokenizeConfig,
    progress: &dyn Progress,
) -> Result<TokenizeSummary> {
    config.validate()?;
    let started = Instant::now();
    let manifest = Manifest::open(manifest_dir).map_err(|e| Error::Model {
        model: manifest_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let card = visual.card().clone();
    let info = TokenizerInfo {
        fingerprint: visual.fingerprint().to_string(),
        card: serde_json::to_value(&card).unwrap_or_default(),
        grid: card.grid,
        vocab_size: card.vocab_size,
        text_vocab_size: text.map(TextTokenizer::vocab_size),
        text_special_ids: text.map(|t| t.special_ids().clone()).unwrap_or_default(),
        views_per_sample: config.views,
    };
    let spec = ViewSpec {
        count: config.views,
        size: card.input_size,
        filter: card.resize_filter,
        crop: config.crop,
        seed: config.seed,
    };
    // `decode_revision` is bumped whenever the same options give different pixels (2: progressive JPEGs without
    // their final AC refinement scans; 3: and without any AC refinement from a reduction of 8), so parts made by
    // an older binary are never mixed in.
    let run = serde_json::json!({
        "visual": info.fingerprint,
        "text": text.map(TextTokenizer::fingerprint),
        "manifest": manifest.fingerprint,
        "views": config.views,
        "seed": config.seed,
        "part_samples": config.part_samples,
        "pixels": config.pixels,
        "crop": config.crop,
        "jpeg_draft": config.jpeg_draft,
        "jpeg_all_scans": config.jpeg_all_scans,
        "decode_revision": 3,
    });
    let run_fingerprint = crate::card::sha256_hex(run.to_string().as_bytes());
    let label = config.tokenizers_label.clone().unwrap_or_else(|| {
        let text = text
            .map(|t| format!(", text {:.12}", t.fingerprint()))
            .unwrap_or_default();
        format!("visual {:.12}{text}", info.fingerprint)
    });
    let claim = WorkerClaim {
        worker: format!("{}/{}", config.worker.0, config.worker.1),
        run: run_fingerprint.clone(),
        tokenizers: label,
    };
    if config.worker.1 > 1 {
        check_workers(out, &claim, true)?;
    }
    if !config.overwrite {
        refuse_other_runs(out, &run_fingerprint)?;
    }
    let rows = &manifest.rows;
    let docs = &manifest.texts;
    if !docs.is_empty() && text.is_none() {
        return Err(Error::Model {
            model: manifest_dir.display().to_string(),
            reason: format!(
                "the manifest has {} text documents (texts.parquet): tokenize them with --text-tokenizer",
                docs.len()
            ),
        });
    }
    let n_parts = if rows.is_empty() && !docs.is_empty() {
        0
    } else {
        rows.len().div_ceil(config.part_samples).max(1)
    };
    let n_text_parts = docs.len().div_ceil(config.part_samples);
    let mut summary = TokenizeSummary::default();
    let images_per_batch = config.batch_size.div_ceil(config.views as usize).max(1);

    let done = |n: usize| read_done(out, n, &run_fingerprint).is_some();
    let ours = |n: usize| n as u32 % config.worker.1 == config.worker.0;
    // Whether part `n` is done already or another worker's (counted), i.e. not this run's to write.
    let not_mine = |n: usize, summary: &mut TokenizeSummary| {
        if done(n) {
            summary.parts_skipped += 1;
            true
        } else if !ours(n) {
            summary.parts_pending += 1;
            true
        } else {
            false
        }
    };
    // This run's share: the items of parts `first..first + count` it will write (for the progress totals).
    let todo = |first: usize, count: usize, len: usize| -> u64 {
        (0..count)
            .filter(|&j| ours(first + j) && !done(first + j))
            .map(|j| (((j + 1) * config.part_samples).min(len) - (j * config.part_samples).min(len)) as u64)
            .sum()
    };
    progress.phase("tokenizing images", todo(0, n_parts, rows.len()));
    for n in 0..n_parts {
        if not_mine(n, &mut summary) {
            continue;
        }
        let part_rows =
            &rows[(n * config.part_samples).min(rows.len())..((n + 1) * config.part_samples).min(rows.len())];
        let part_path = out.join(part_file_name(n));
        let mut writer = PartWriter::try_new(&part_path, &info).map_err(|e| pack_err(&part_path, e))?;
        let mut rejects = Vec::new();
        let pixels = config.pixels;
        let decode = DecodeOptions {
            draft: config.jpeg_draft,
            all_scans: config.jpeg_all_scans,
            ..DecodeOptions::default()
        };
        // Decode on every rayon thread without a barrier per batch; the model gets batches in row order.
        let mut last = Instant::now();
        ordered::ordered_map(
            part_rows,
            images_per_batch,
            images_per_batch * 4,
            Resizer::new,
            |resizer, i, row| Prepared {
                row: i,
                ..prepare(row, &spec, &decode, pixels, resizer)
            },
            |batch: Vec<Prepared>| -> Result<()> {
                summary.wait_seconds += last.elapsed().as_secs_f64();
                let mut images: Vec<&[u8]> = Vec::new();
                for p in &batch {
                    if let Ok((_, imgs, _)) = &p.result {
                        images.extend(imgs.iter().map(|i| i.as_raw().as_slice()));
                    }
                }
                let busy = Instant::now();
                let tokens = if images.is_empty() {
                    Vec::new()
                } else {
                    visual.tokenize(&images)?
                };
                summary.model_seconds += busy.elapsed().as_secs_f64();
                let mut tokens = tokens.into_iter();
                for p in batch {
                    let row = &part_rows[p.row];
                    match p.result {
                        Ok((views, _, pixels)) => {
                            let views: Vec<ViewRecord> = views
                                .iter()
                                .map(|v| ViewRecord {
                                    crop: v.crop,
                                    flip: v.flip,
                                    tokens: tokens.next().unwrap_or_default(),
                                })
                                .collect();
                            let captions = match text {
                                Some(t) => row.captions.iter().map(|c| t.encode(c)).collect::<Result<Vec<_>>>()?,
                                None => Vec::new(),
                            };
                            writer
                                .write(&TokenRecord {
                                    sample_id: row.sample_id,
                                    views,
                                    captions,
                                    label: row.label,
                                    split: match row.split {
                                        imglish_ingest::Split::Train => Split::Train,
                                        imglish_ingest::Split::Val => Split::Val,
                                    },
                                    pixels,
                                })
                                .map_err(|e| pack_err(&part_path, e))?;
                            summary.images += 1;
                            summary.views += config.views as u64;
                        }
                        Err(r) => {
                            summary.rejected += 1;
                            rejects.push((
                                row.source.clone(),
                                row.key.clone(),
                                r.reason.code().to_string(),
                                r.message,
                            ));
                        }
                    }
                    progress.inc(1);
                }
                last = Instant::now();
                Ok(())
            },
        )?;
        let entry = writer.finish().map_err(|e| pack_err(&part_path, e))?;
        mark_done(out, n, &run_fingerprint, entry, rejects)?;
        summary.parts_written += 1;
    }
    // Text-only documents: parts after the image parts, one text sample per segment.
    if n_text_parts > 0 {
        progress.phase("tokenizing texts", todo(n_parts, n_text_parts, docs.len()));
    }
    for j in 0..n_text_parts {
        let n = n_parts + j;
        if not_mine(n, &mut summary) {
            continue;
        }
        let chunk = &docs[j * config.part_samples..((j + 1) * config.part_samples).min(docs.len())];
        let entry = write_text_part(out, n, chunk, text, &info, &mut summary, progress)?;
        mark_done(out, n, &run_fingerprint, entry, Vec::new())?;
        summary.parts_written += 1;
    }
    let n_parts = n_parts + n_text_parts;

    // Once every part is done (by this or other workers), write the stage's manifest and rejects.
    let mut entries = Vec::with_capacity(n_parts);
    let mut all_rejects = Vec::new();
    for n in 0..n_parts {
        match read_done(out, n, &run_fingerprint) {
            Some(d) => {
                entries.push(d.entry);
                all_rejects.extend(d.rejects.into_iter().map(|(source, key, reason, message)| RejectRow {
                    source,
                    key,
                    reason,
                    message,
                }));
            }
            None => {
                if config.worker.1 > 1 {
                    // A worker started later with other flags must not leave this one's waiting for ever.
                    check_workers(out, &claim, false)?;
                }
                summary.seconds = started.elapsed().as_secs_f64();
                return Ok(summary);
            }
        }
    }
    all_rejects.sort();
    imglish_ingest::write_rejects_parquet(&out.join("rejects.parquet"), &all_rejects).map_err(|e| Error::Model {
        model: out.display().to_string(),
        reason: e.to_string(),
    })?;
    refuse_nothing_tokenized(out, &entries, &all_rejects)?;
    let mut tm = TokensManifest::new(info, entries);
    tm.extra
        .insert("manifest_fingerprint".into(), manifest.fingerprint.clone().into());
    tm.extra.insert(
        "config".into(),
        serde_json::json!({"views": config.views, "seed": config.seed, "part_samples": config.part_samples,
            "pixels": config.pixels, "crop": config.crop}),
    );
    tm.extra.insert("rejected".into(), (all_rejects.len() as u64).into());
    tm.write(out).map_err(|e| pack_err(out, e))?;
    remove_stale_parts(out, n_parts)?;
    remove_worker_claims(out);
    summary.complete = true;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// A run in which every sample was rejected (images unreadable since ingest, links whose targets went) has
/// produced nothing: it fails naming the commonest reason and an example, and writes no `tokenize.json`, so no
/// later stage packs an empty dataset. `rejects.parquet` is written first, for the full list.
fn refuse_nothing_tokenized(out: &Path, entries: &[PartEntry], rejects: &[RejectRow]) -> Result<()> {
    if entries.iter().any(|e| e.rows > 0) {
        return Ok(());
    }
    let mut by_reason: std::collections::BTreeMap<&str, (usize, &RejectRow)> = std::collections::BTreeMap::new();
    for r in rejects {
        by_reason.entry(r.reason.as_str()).or_insert((0, r)).0 += 1;
    }
    let top = by_reason.iter().max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.0.cmp(a.0)));
    let cause = match top {
        Some((reason, (n, example))) => format!(
            "{} of {} samples were rejected as {reason} (e.g. {}: {}); see {}",
            n,
            rejects.len(),
            example.key,
            example.message,
            out.join("rejects.parquet").display()
        ),
        None => "the manifest holds no samples".to_string(),
    };
    Err(Error::Model {
        model: out.display().to_string(),
        reason: format!("no sample was tokenized: {cause}"),
    })
}

/// The part number of a `part-NNNNN.parquet` or `part-NNNNN.done.json` file name.
fn part_number(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("part-")?;
    let digits = rest
        .strip_suffix(".parquet")
        .or_else(|| rest.strip_suffix(".done.json"))?;
    digits.parse().ok()
}

/// Refuses an output folder whose finished parts were made by another run (`--overwrite` replaces them).
fn refuse_other_runs(out: &Path, run: &str) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".done.json"))
        .collect();
    names.sort();
    for name in names {
        let Ok(bytes) = std::fs::read(out.join(&name)) else {
            continue;
        };
        let Ok(done) = serde_json::from_slice::<PartDone>(&bytes) else {
            continue;
        };
        if done.run != run {
            return Err(Error::Model {
                model: out.display().to_string(),
                reason: format!(
                    "holds tokens of another run ({name}: another manifest, tokenizer, imglish version or \
                     settings); pass --overwrite to replace them, or choose another --out"
                ),
            });
        }
    }
    Ok(())
}

/// What a worker of a split run (`--worker I/N`) writes into the folder when it starts (`.worker-I.json`), so
/// that workers started with other tokenizers or settings find each other instead of waiting for ever.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerClaim {
    worker: String,
    run: String,
    tokenizers: String,
}

/// Records `mine` (when `write`) and fails naming both workers' tokenizers when another worker's claim is for
/// another run.
fn check_workers(out: &Path, mine: &WorkerClaim, write: bool) -> Result<()> {
    if write {
        let index = mine.worker.split('/').next().unwrap_or("0");
        let path = out.join(format!(".worker-{index}.json"));
        let bytes = serde_json::to_vec_pretty(mine).unwrap_or_default();
        imglish_ingest::write_atomic(&path, &bytes).map_err(|e| Error::Model {
            model: out.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with(".worker-") && n.ends_with(".json"))
        .collect();
    names.sort();
    for name in names {
        let Some(other) = std::fs::read(out.join(&name))
            .ok()
            .and_then(|b| serde_json::from_slice::<WorkerClaim>(&b).ok())
        else {
            continue;
        };
        if other.run != mine.run && other.worker != mine.worker {
            let same = other.tokenizers == mine.tokenizers;
            return Err(Error::Model {
                model: out.display().to_string(),
                reason: format!(
                    "worker {} of this folder was started with {} ({}) than worker {} ({}); start every worker with \
                     the same flags (or delete {} if that worker's run is abandoned)",
                    other.worker,
                    if same { "other settings" } else { "other tokenizers" },
                    other.tokenizers,
                    mine.worker,
                    mine.tokenizers,
                    out.join(&name).display()
                ),
            });
        }
    }
    Ok(())
}

fn remove_worker_claims(out: &Path) {
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".worker-") && name.ends_with(".json") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Removes part files numbered `n_parts` or more (left by a run with smaller parts), so that no later stage can
/// pick them up.
fn remove_stale_parts(out: &Path, n_parts: usize) -> Result<()> {
    for entry in std::fs::read_dir(out).map_err(io_err(out))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if part_number(&name).is_some_and(|n| n >= n_parts) {
            std::fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    Ok(())
}

/// Marks part `n` done: its entry and rejects in the sidecar, written atomically.
fn mark_done(
    out: &Path,
    n: usize,
    run: &str,
    entry: PartEntry,
    rejects: Vec<(String, String, String, String)>,
) -> Result<()> {
    let done = PartDone {
        run: run.to_string(),
        entry,
        rejects,
    };
    let bytes = serde_json::to_vec_pretty(&done).unwrap_or_default();
    imglish_ingest::write_atomic(&done_path(out, n), &bytes).map_err(|e| Error::Model {
        model: out.display().to_string(),
        reason: e.to_string(),
    })
}

/// Writes part `n` from text-only documents: each document's ids cut into segments of at most the text
/// tokenizer's maximum length, one text sample per segment (the first keeps the document's id, the others get
/// ids derived from it and the segment number).
fn write_text_part(
    out: &Path,
    n: usize,
    docs: &[imglish_ingest::TextRow],
    text: Option<&TextTokenizer>,
    info: &TokenizerInfo,
    summary: &mut TokenizeSummary,
    progress: &dyn Progress,
) -> Result<PartEntry> {
    let Some(text) = text else {
        return Err(Error::Model {
            model: out.display().to_string(),
            reason: "text documents need --text-tokenizer".into(),
        });
    };
    let part_path = out.join(part_file_name(n));
    let mut writer = PartWriter::try_new(&part_path, info).map_err(|e| pack_err(&part_path, e))?;
    for doc in docs {
        let segments = text.encode_segments(&doc.text)?;
        summary.texts += 1;
        summary.text_segments += segments.len() as u64;
        summary.texts_cut += u64::from(segments.len() > 1);
        for (s, ids) in segments.into_iter().enumerate() {
            let sample_id = if s == 0 {
                doc.sample_id
            } else {
                imglish_ingest::mix64(doc.sample_id ^ imglish_ingest::mix64(s as u64))
            };
            let record = TokenRecord {
                sample_id,
                views: Vec::new(),
                captions: vec![ids],
                label: None,
                split: match doc.split {
                    imglish_ingest::Split::Train => Split::Train,
                    imglish_ingest::Split::Val => Split::Val,
                },
                pixels: None,
            };
            writer.write(&record).map_err(|e| pack_err(&part_path, e))?;
        }
        progress.inc(1);
    }
    writer.finish().map_err(|e| pack_err(&part_path, e))
}

fn pack_err(path: &Path, e: imglish_pack::PackError) -> Error {
    Error::Model {
        model: path.display().to_string(),
        reason: e.to_string(),
    }
}
