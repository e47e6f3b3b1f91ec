//! The `ingest` run: sources and caption sets in, `samples.parquet`, `rejects.parquet`, `classes.json` and
//! `ingest.json` out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::captions::{read_caption_file, CsvHeader, JoinOn};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::write_atomic;
use crate::parquet_io::{self, ManifestRow, RejectRow, Split};
use crate::rng::mix64;
use crate::sources::{self, Item, Locator, ParquetColumns, Source, SourceKind};
use crate::texts::{read_texts, write_texts, TextOptions, TEXTS_FILE};
use crate::validate::{hex, validate_hashed, ImageInfo, Reason, Rejection, ValidationLimits};

/// Version of the manifest layout.
pub const MANIFEST_VERSION: u32 = 1;

/// Where labels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabelMode {
    /// Only labels carried by the source (`key.cls` in tar shards, a Parquet label column).
    #[default]
    Source,
    /// The class of the top-level folder under a directory source (ImageFolder); class indices by sorted name.
    FromFolders,
}

/// The configuration of an ingest run; validated when set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IngestConfig {
    images: Vec<PathBuf>,
    captions: Vec<PathBuf>,
    /// Text-only corpora (`--texts`).
    #[serde(default)]
    texts: Vec<PathBuf>,
    #[serde(default)]
    text_options: TextOptions,
    val_fraction: f64,
    seed: u64,
    labels: LabelMode,
    join_on: JoinOn,
    csv_header: CsvHeader,
    require_captions: bool,
    limits: ValidationLimits,
    parquet: ParquetColumns,
    /// Follow symbolic links to files outside a directory source (`--follow-symlinks`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    follow_symlinks: bool,
}

impl IngestConfig {
    /// A run over these image sources (directories, tar shards, Parquet files).
    pub fn try_new(images: Vec<PathBuf>) -> Result<Self> {
        if images.is_empty() {
            return Err(Error::Config {
                option: "--images".into(),
                reason: "at least one image source is required".into(),
            });
        }
        Ok(IngestConfig {
            images,
            captions: Vec::new(),
            texts: Vec::new(),
            text_options: TextOptions::default(),
            val_fraction: 0.05,
            seed: 0,
            labels: LabelMode::default(),
            join_on: JoinOn::default(),
            csv_header: CsvHeader::default(),
            require_captions: false,
            limits: ValidationLimits::default(),
            parquet: ParquetColumns::default(),
            follow_symlinks: false,
        })
    }

    /// A run over image sources and text-only corpora (either may be empty, not both).
    pub fn try_new_with_texts(images: Vec<PathBuf>, texts: Vec<PathBuf>, options: TextOptions) -> Result<Self> {
        if images.is_empty() && texts.is_empty() {
            return Err(Error::Config {
                option: "--images".into(),
                reason: "at least one image source (--images) or text corpus (--texts) is required".into(),
            });
        }
        if options.max_bytes == 0 {
            return Err(Error::Config {
                option: "--max-text-bytes".into(),
                reason: "must be positive".into(),
            });
        }
        let mut config = IngestConfig::try_new(vec![PathBuf::new()])?;
        config.images = images;
        config.texts = texts;
        config.text_options = options;
        Ok(config)
    }

    /// Caption sets to join.
    pub fn with_captions(mut self, captions: Vec<PathBuf>) -> Self {
        self.captions = captions;
        self
    }

    /// Fraction of samples in the validation split, in `[0, 1]`.
    pub fn try_with_val_fraction(mut self, f: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::Config {
                option: "--val-fraction".into(),
                reason: format!("{f} is not in [0, 1]"),
            });
        }
        self.val_fraction = f;
        Ok(self)
    }

    /// Seed of the split assignment.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Where labels come from.
    pub fn with_labels(mut self, labels: LabelMode) -> Self {
        self.labels = labels;
        self
    }

    /// How captions are joined to images.
    pub fn with_join_on(mut self, join_on: JoinOn) -> Self {
        self.join_on = join_on;
        self
    }

    /// Whether CSV/TSV caption files have a header.
    pub fn with_csv_header(mut self, h: CsvHeader) -> Self {
        self.csv_header = h;
        self
    }

    /// Reject images without any caption.
    pub fn with_require_captions(mut self, on: bool) -> Self {
        self.require_captions = on;
        self
    }

    /// Follow symbolic links to files outside a directory source (a subset made with `ln -s`, an HF cache
    /// snapshot pointing into `../blobs`). Links to directories are never followed.
    pub fn with_follow_symlinks(mut self, on: bool) -> Self {
        self.follow_symlinks = on;
        self
    }

    /// Validation limits.
    pub fn try_with_limits(mut self, limits: ValidationLimits) -> Result<Self> {
        if limits.max_pixels == 0 || limits.max_aspect.is_nan() || limits.max_aspect < 1.0 {
            return Err(Error::Config {
                option: "--max-pixels/--max-aspect".into(),
                reason: "max-pixels must be positive and max-aspect at least 1".into(),
            });
        }
        self.limits = limits;
        Ok(self)
    }

    /// Column names for Parquet sources.
    pub fn with_parquet_columns(mut self, columns: ParquetColumns) -> Self {
        self.parquet = columns;
        self
    }
}

/// Counts of a finished run; also written to `ingest.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IngestCounts {
    /// Everything seen: accepted + rejected.
    pub seen: u64,
    /// Samples in the manifest.
    pub accepted: u64,
    /// Rejects recorded.
    pub rejected: u64,
    /// Rejects per reason code.
    pub by_reason: BTreeMap<String, u64>,
    /// Accepted samples per split.
    pub splits: BTreeMap<String, u64>,
    /// Accepted images with no caption.
    pub images_without_captions: u64,
    /// Caption entries whose image is in no source (also recorded as `missing-image` rejects).
    pub captions_without_images: u64,
    /// Hidden files and folders skipped in directory sources.
    pub hidden_skipped: u64,
    /// Number of classes (0 without labels).
    pub classes: u64,
    /// Accepted text-only documents (also counted in `accepted`).
    #[serde(default)]
    pub texts: u64,
}

/// What an ingest run did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IngestSummary {
    /// Counts.
    pub counts: IngestCounts,
    /// Content fingerprint of all inputs and the config (sha256 hex).
    pub fingerprint: String,
    /// Wall time in seconds.
    pub wall_seconds: f64,
}

#[derive(Serialize)]
struct SourceRecord {
    path: String,
    kind: SourceKind,
    items: u64,
}

#[derive(Serialize)]
struct CaptionRecord {
    path: String,
    sha256: String,
    entries: u64,
}

#[derive(Serialize)]
struct IngestRecord<'a> {
    manifest_version: u32,
    /// The working directory relative source paths were given from (used to find them from elsewhere).
    base_dir: String,
    imglish_version: &'static str,
    config: &'a IngestConfig,
    sources: Vec<SourceRecord>,
    captions: Vec<CaptionRecord>,
    texts: Vec<CaptionRecord>,
    fingerprint: &'a str,
    counts: &'a IngestCounts,
    timing: serde_json::Value,
}

/// One validated item, without its bytes.
struct Checked {
    sample_id: u64,
    item: Item,
    result: std::result::Result<ImageInfo, Rejection>,
    bytes_hash: Option<[u8; 32]>,
}

/// The stable id of a sample: the first 8 bytes of sha256("imglish-sample-v1\0" source "\0" key).
pub fn sample_id(source: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"imglish-sample-v1\0");
    h.update(source.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Split by hashing the key with the seed: stable when files are added or removed.
fn split_of(seed: u64, key: &str, val_fraction: f64) -> Split {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(key.as_bytes());
    let d = h.finalize();
    let v = mix64(u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]));
    if ((v >> 11) as f64 / (1u64 << 53) as f64) < val_fraction {
        Split::Val
    } else {
        Split::Train
    }
}

fn check_chunk(items: Vec<Item>, limits: &ValidationLimits) -> Vec<Checked> {
    items
        .into_par_iter()
        .map(|mut item| {
            let payload = std::mem::replace(&mut item.payload, Ok(Vec::new()));
            let (result, bytes_hash) = match payload {
                Ok(bytes) => {
                    let hash: [u8; 32] = Sha256::digest(&bytes).into();
                    (validate_hashed(&bytes, limits, Some(&hash)), Some(hash))
                }
                Err(r) => (Err(r), None),
            };
            Checked {
                sample_id: sample_id(&item.source, &item.key),
                item,
                result,
                bytes_hash,
            }
        })
        .collect()
}

const CHUNK: usize = 256;

/// Runs ingest and writes the manifest into `out`. `progress` gets a phase per source (with its item count
/// when a folder's files are listed first) and the number of items just checked.
pub fn ingest(config: &IngestConfig, out: &Path, progress: &dyn crate::Progress) -> Result<IngestSummary> {
    let started = Instant::now();
    let mut sources: Vec<Source> = Vec::new();
    for p in &config.images {
        sources.extend(Source::expand(p)?);
    }
    let caption_sets = config
        .captions
        .iter()
        .map(|p| read_caption_file(p, config.csv_header))
        .collect::<Result<Vec<_>>>()?;

    let mut checked: Vec<Checked> = Vec::new();
    let mut hidden = 0u64;
    let mut source_records = Vec::new();
    for source in &sources {
        let before = checked.len();
        let mut emit = |items: Vec<Item>| -> Result<()> {
            let n = items.len() as u64;
            checked.extend(check_chunk(items, &config.limits));
            progress.inc(n);
            Ok(())
        };
        match source.kind {
            SourceKind::Dir => {
                let files = sources::walk_dir(source, config.follow_symlinks, &mut hidden)?;
                progress.phase(&format!("ingesting {}", source.label), files.len() as u64);
                for chunk in files.chunks(CHUNK) {
                    let items: Vec<Item> = chunk
                        .par_iter()
                        .map(|(rel, p)| sources::dir_item(source, rel.clone(), p.clone()))
                        .collect();
                    emit(items)?;
                }
            }
            SourceKind::Tar => {
                progress.phase(&format!("ingesting {}", source.label), 0);
                sources::read_tar(source, CHUNK, &mut emit)?
            }
            SourceKind::Parquet => {
                let label = format!("ingesting {}", source.label);
                progress.phase(&label, 0);
                // The rows are known once the file is read: the phase then gets its total.
                sources::read_parquet(
                    source,
                    &config.parquet,
                    CHUNK,
                    &|n| progress.phase(&label, n),
                    &mut emit,
                )?
            }
        }
        source_records.push(SourceRecord {
            path: source.label.clone(),
            kind: source.kind,
            items: (checked.len() - before) as u64,
        });
    }
    checked.sort_by(|a, b| (a.sample_id, &a.item.source, &a.item.key).cmp(&(b.sample_id, &b.item.source, &b.item.key)));

    // Labels.
    let classes: BTreeMap<String, i32> = match config.labels {
        LabelMode::FromFolders => sources::class_table(checked.iter().filter_map(|c| c.item.folder.as_deref())),
        LabelMode::Source => BTreeMap::new(),
    };

    // Caption join.
    let mut caption_index: HashMap<String, Vec<String>> = HashMap::new();
    for set in &caption_sets {
        for (image, caps) in &set.entries {
            caption_index
                .entry(config.join_on.key(image))
                .or_default()
                .extend(caps.iter().cloned());
        }
    }
    let mut matched: BTreeSet<String> = BTreeSet::new();
    for c in &checked {
        let k = config.join_on.key(&c.item.join_path);
        if caption_index.contains_key(&k) {
            matched.insert(k);
        }
    }

    let mut rejects: Vec<RejectRow> = Vec::new();
    let mut counts = IngestCounts {
        hidden_skipped: hidden,
        classes: classes.len() as u64,
        ..Default::default()
    };
    let reject = |source: &str, key: &str, r: &Rejection, rejects: &mut Vec<RejectRow>| {
        rejects.push(RejectRow {
            source: source.to_string(),
            key: key.to_string(),
            reason: r.reason.code().to_string(),
            message: r.message.clone(),
        });
    };
    // Which items are accepted: decided on borrowed data (the duplicate index points into `checked`), so that
    // the accepted rows can then take their strings out of `checked` instead of copying them (peak memory at
    // a million rows).
    let mut accepted = vec![false; checked.len()];
    let mut by_hash: HashMap<&str, &Checked> = HashMap::new();
    for (c, accept) in checked.iter().zip(&mut accepted) {
        let info = match &c.result {
            Ok(info) => info,
            Err(r) => {
                reject(&c.item.source, &c.item.key, r, &mut rejects);
                continue;
            }
        };
        if let Some(first) = by_hash.get(info.content_hash.as_str()) {
            let r = Rejection::new(
                Reason::Duplicate,
                format!(
                    "byte-identical to sample {} ({}: {})",
                    first.sample_id, first.item.source, first.item.key
                ),
            );
            reject(&c.item.source, &c.item.key, &r, &mut rejects);
            continue;
        }
        by_hash.insert(&info.content_hash, c);
        let extra = caption_index.get(&config.join_on.key(&c.item.join_path));
        let captioned = c
            .item
            .inline_captions
            .iter()
            .chain(extra.into_iter().flatten())
            .any(|s| !s.is_empty());
        if !captioned {
            if config.require_captions {
                let r = Rejection::new(
                    Reason::MissingCaption,
                    "no caption in any caption set (--require-captions)",
                );
                reject(&c.item.source, &c.item.key, &r, &mut rejects);
                continue;
            }
            counts.images_without_captions += 1;
        }
        *accept = true;
    }
    drop(by_hash);

    // Fingerprint: the config and the content of every input.
    let mut fp = Sha256::new();
    fp.update(serde_json::to_vec(config).unwrap_or_default());
    for c in &checked {
        fp.update(c.item.source.as_bytes());
        fp.update([0]);
        fp.update(c.item.key.as_bytes());
        fp.update([0]);
        if let Some(h) = &c.bytes_hash {
            fp.update(h);
        }
    }

    let mut rows: Vec<ManifestRow> = Vec::with_capacity(accepted.iter().filter(|a| **a).count());
    for (c, _) in checked.into_iter().zip(accepted).filter(|(_, a)| *a) {
        let Ok(info) = c.result else { continue };
        let mut captions = c.item.inline_captions;
        if let Some(extra) = caption_index.get(&config.join_on.key(&c.item.join_path)) {
            captions.extend(extra.iter().cloned());
        }
        let mut seen_caps = BTreeSet::new();
        captions.retain(|s| !s.is_empty() && seen_caps.insert(s.clone()));
        let (label, label_name) = match (c.item.folder, config.labels) {
            (Some(folder), LabelMode::FromFolders) => (classes.get(&folder).copied(), Some(folder)),
            _ => (c.item.inline_label.and_then(|l| i32::try_from(l).ok()), None),
        };
        rows.push(ManifestRow {
            sample_id: c.sample_id,
            split: split_of(config.seed, &c.item.key, config.val_fraction),
            key: c.item.key,
            source: c.item.source,
            locator: c.item.locator,
            content_hash: info.content_hash,
            bytes: info.bytes,
            format: info.format.to_string(),
            width: info.width,
            height: info.height,
            label,
            label_name,
            captions,
        });
    }
    // Caption entries without an image, and malformed caption rows.
    let mut caption_records = Vec::new();
    for (set, path) in caption_sets.iter().zip(&config.captions) {
        let mut missing = BTreeSet::new();
        for (image, _) in &set.entries {
            if !matched.contains(&config.join_on.key(image)) && missing.insert(image.clone()) {
                let r = Rejection::new(
                    Reason::MissingImage,
                    format!("no source has an image for caption key {image}"),
                );
                reject(&set.label, image, &r, &mut rejects);
                counts.captions_without_images += 1;
            }
        }
        for (row, r) in &set.bad_rows {
            reject(&set.label, row, r, &mut rejects);
        }
        let bytes = fs::read(path).at(path)?;
        caption_records.push(CaptionRecord {
            path: set.label.clone(),
            sha256: hex(&Sha256::digest(&bytes)),
            entries: set.entries.len() as u64,
        });
    }
    // Text-only corpora.
    let text_ingest = read_texts(&config.texts, &config.text_options, &|source, key| {
        split_of(config.seed, &format!("text\0{source}\0{key}"), config.val_fraction)
    })?;
    rejects.extend(text_ingest.rejects);
    let mut text_records = Vec::new();
    for path in &config.texts {
        let bytes = fs::read(path).at(path)?;
        text_records.push(CaptionRecord {
            path: path.display().to_string(),
            sha256: hex(&Sha256::digest(&bytes)),
            entries: text_ingest
                .rows
                .iter()
                .filter(|r| r.source == path.display().to_string())
                .count() as u64,
        });
    }
    let text_rows = text_ingest.rows;
    rows.sort_by_key(|r| r.sample_id);
    rejects.sort();

    counts.texts = text_rows.len() as u64;
    for r in &text_rows {
        *counts.splits.entry(r.split.as_str().to_string()).or_default() += 1;
    }
    counts.accepted = (rows.len() + text_rows.len()) as u64;
    counts.rejected = rejects.len() as u64;
    counts.seen = counts.accepted + counts.rejected;
    for r in &rejects {
        *counts.by_reason.entry(r.reason.clone()).or_default() += 1;
    }
    for r in &rows {
        *counts.splits.entry(r.split.as_str().to_string()).or_default() += 1;
    }

    for c in caption_records.iter().chain(&text_records) {
        fp.update(c.sha256.as_bytes());
    }
    let fingerprint = hex(&fp.finalize());
    // Free what the manifest no longer needs before the Parquet writer builds its columns (peak memory).
    drop(caption_index);

    fs::create_dir_all(out).at(out)?;
    // ingest.json is written last: its presence marks a complete manifest.
    let _ = fs::remove_file(out.join("ingest.json"));
    parquet_io::write_samples(&out.join("samples.parquet"), &rows)?;
    parquet_io::write_rejects(&out.join("rejects.parquet"), &rejects)?;
    if text_rows.is_empty() {
        let _ = fs::remove_file(out.join(TEXTS_FILE));
    } else {
        write_texts(&out.join(TEXTS_FILE), &text_rows)?;
    }
    let classes_json = serde_json::to_vec_pretty(&classes).map_err(json_err(out))?;
    write_atomic(&out.join("classes.json"), &classes_json)?;
    let wall_seconds = started.elapsed().as_secs_f64();
    let record = IngestRecord {
        manifest_version: MANIFEST_VERSION,
        base_dir: std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        imglish_version: env!("CARGO_PKG_VERSION"),
        config,
        sources: source_records,
        captions: caption_records,
        texts: text_records,
        fingerprint: &fingerprint,
        counts: &counts,
        timing: serde_json::json!({ "wall_seconds": wall_seconds }),
    };
    let json = serde_json::to_vec_pretty(&record).map_err(json_err(out))?;
    write_atomic(&out.join("ingest.json"), &json)?;
    Ok(IngestSummary {
        counts,
        fingerprint,
        wall_seconds,
    })
}

fn json_err(out: &Path) -> impl Fn(serde_json::Error) -> Error + '_ {
    move |e| Error::Io {
        path: out.to_path_buf(),
        source: e.into(),
    }
}

/// A manifest directory written by [`ingest`].
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Accepted samples, sorted by `sample_id`.
    pub rows: Vec<ManifestRow>,
    /// Class name → index (empty without labels).
    pub classes: BTreeMap<String, i32>,
    /// Text-only documents (`texts.parquet`), in source order.
    pub texts: Vec<crate::texts::TextRow>,
    /// The ingest fingerprint.
    pub fingerprint: String,
}

impl Manifest {
    /// Opens `dir` (it must hold a complete manifest: `ingest.json` is written last).
    pub fn open(dir: &Path) -> Result<Manifest> {
        let record_path = dir.join("ingest.json");
        let record: serde_json::Value =
            serde_json::from_slice(&fs::read(&record_path).at(&record_path)?).map_err(|e| Error::Parquet {
                path: record_path.clone(),
                reason: format!("not an ingest record: {e}"),
            })?;
        let version = record.get("manifest_version").and_then(|v| v.as_u64());
        if version != Some(MANIFEST_VERSION as u64) {
            return Err(Error::Parquet {
                path: record_path,
                reason: format!("manifest version {version:?}, this imglish reads version {MANIFEST_VERSION}"),
            });
        }
        let classes_path = dir.join("classes.json");
        let classes = match fs::read(&classes_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Parquet {
                path: classes_path,
                reason: e.to_string(),
            })?,
            Err(_) => BTreeMap::new(),
        };
        let mut rows = parquet_io::read_samples(&dir.join("samples.parquet"))?;
        // Sources given as relative paths are found from the current directory, or else from the directory
        // ingest ran in.
        if let Some(base) = record
            .get("base_dir")
            .and_then(|b| b.as_str())
            .filter(|b| !b.is_empty())
        {
            let mut resolved: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
            for row in &mut rows {
                let relocate = *resolved.entry(row.source.clone()).or_insert_with(|| {
                    let p = Path::new(&row.source);
                    p.is_relative() && !p.exists() && Path::new(base).join(p).exists()
                });
                if relocate {
                    let join = |p: &mut String| *p = Path::new(base).join(&*p).display().to_string();
                    match &mut row.locator {
                        Locator::File { path } => join(path),
                        Locator::TarMember { tar, .. } => join(tar),
                        Locator::ParquetRow { file, .. } => join(file),
                    }
                }
            }
        }
        Ok(Manifest {
            rows,
            classes,
            texts: crate::texts::read_texts_file(&dir.join(TEXTS_FILE))?,
            fingerprint: record
                .get("fingerprint")
                .and_then(|f| f.as_str())
                .unwrap_or_default()
                .to_string(),
        })
    }

    /// The rejects of the manifest in `dir`.
    pub fn rejects(dir: &Path) -> Result<Vec<RejectRow>> {
        parquet_io::read_rejects(&dir.join("rejects.parquet"))
    }
}

/// Reads a sample's image bytes from wherever its locator points. Paths are relative to the working directory
/// the manifest was built from (as given on the command line) unless absolute.
pub fn read_image_bytes(row: &ManifestRow) -> Result<Vec<u8>> {
    match &row.locator {
        Locator::File { path } => fs::read(path).at(path),
        Locator::TarMember { tar, offset, length } => {
            let mut f = fs::File::open(tar).at(tar)?;
            f.seek(SeekFrom::Start(*offset)).at(tar)?;
            let mut buf = vec![0u8; *length as usize];
            f.read_exact(&mut buf).at(tar)?;
            Ok(buf)
        }
        Locator::ParquetRow { file, row: r } => {
            let rows = parquet_io::read_image_rows(Path::new(file), &ParquetColumns::default())?;
            rows.into_iter()
                .nth(*r as usize)
                .and_then(|x| x.bytes)
                .ok_or_else(|| Error::Parquet {
                    path: PathBuf::from(file),
                    reason: format!("row {r} has no image bytes"),
                })
        }
    }
}
