//! Token parts: the tokenize stage's output and pack's input. A part is a zstd Parquet file with one row per
//! sample; the tokenizer description is stored as JSON under the key-value metadata key [`PART_METADATA_KEY`].
//! `tokenize.json` ([`TokensManifest`]) lists the parts with their row counts and content hashes.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Int32Array, ListArray, RecordBatch, UInt16Array, UInt32Array,
    UInt64Array, UInt8Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::error::{io_err, PackError, Result};
use crate::record::{Split, SplitCounts, TokenRecord, TokenizerInfo, ViewRecord};
use crate::util::{self, HashingWriter};

/// Parquet key-value metadata key holding the [`TokenizerInfo`] JSON in every part.
pub const PART_METADATA_KEY: &str = "imglish.tokenizer";
/// Version of the token-part layout and of `tokenize.json`.
pub const PARTS_FORMAT_VERSION: u32 = 1;
/// File name of the tokens manifest in the tokens directory.
pub const TOKENS_MANIFEST_FILE: &str = "tokenize.json";

const BATCH_ROWS: usize = 512;
const ROW_GROUP_ROWS: usize = 4096;

fn item(dt: DataType) -> FieldRef {
    Arc::new(Field::new("item", dt, false))
}

/// The Arrow schema of a part (tokens, crops and flips flattened over the `K` views, view-major).
fn part_schema() -> SchemaRef {
    let caption = DataType::List(item(DataType::UInt32));
    Arc::new(Schema::new(vec![
        Field::new("sample_id", DataType::UInt64, false),
        Field::new("tokens", DataType::List(item(DataType::UInt16)), false),
        Field::new("crops", DataType::List(item(DataType::UInt32)), false),
        Field::new("flips", DataType::List(item(DataType::Boolean)), false),
        Field::new("captions", DataType::List(item(caption)), false),
        Field::new("label", DataType::Int32, true),
        Field::new("split", DataType::UInt8, false),
        Field::new("pixels", DataType::Binary, true),
    ]))
}

fn list(item_type: DataType, lengths: impl IntoIterator<Item = usize>, values: ArrayRef) -> ListArray {
    ListArray::new(item(item_type), OffsetBuffer::from_lengths(lengths), values, None)
}

fn records_to_part_batch(schema: &SchemaRef, records: &[TokenRecord]) -> std::result::Result<RecordBatch, String> {
    let ids = UInt64Array::from_iter_values(records.iter().map(|r| r.sample_id));
    let (tokens, crops, flips) = crate::record::flatten_views(records);
    let caption_tokens: Vec<u32> = records
        .iter()
        .flat_map(|r| r.captions.iter().flatten().copied())
        .collect();
    let caption_lengths = records.iter().flat_map(|r| r.captions.iter().map(Vec::len));
    let captions_inner = list(
        DataType::UInt32,
        caption_lengths,
        Arc::new(UInt32Array::from(caption_tokens)),
    );
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids),
        Arc::new(list(
            DataType::UInt16,
            records.iter().map(|r| r.views.iter().map(|v| v.tokens.len()).sum()),
            Arc::new(UInt16Array::from(tokens)),
        )),
        Arc::new(list(
            DataType::UInt32,
            records.iter().map(|r| 4 * r.views.len()),
            Arc::new(UInt32Array::from(crops)),
        )),
        Arc::new(list(
            DataType::Boolean,
            records.iter().map(|r| r.views.len()),
            Arc::new(BooleanArray::from(flips)),
        )),
        Arc::new(list(
            DataType::List(item(DataType::UInt32)),
            records.iter().map(|r| r.captions.len()),
            Arc::new(captions_inner),
        )),
        Arc::new(Int32Array::from_iter(records.iter().map(|r| r.label))),
        Arc::new(UInt8Array::from_iter_values(records.iter().map(|r| r.split.code()))),
        Arc::new(BinaryArray::from_iter(records.iter().map(|r| r.pixels.as_deref()))),
    ];
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

/// One finished part, as listed in `tokenize.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartEntry {
    /// File name inside the tokens directory (`part-NNNNN.parquet`).
    pub file: String,
    /// Rows (samples).
    pub rows: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// sha256 (hex) of the file.
    pub sha256: String,
    /// Samples per split.
    pub counts: SplitCounts,
}

/// The standard part file name for part number `n`: `part-NNNNN.parquet`.
pub fn part_file_name(n: usize) -> String {
    format!("part-{n:05}.parquet")
}

/// Writes one token part: rows are buffered, written as zstd Parquet to a temporary sibling name, and the file is
/// fsynced and renamed into place by [`PartWriter::finish`]. Every record is checked against the
/// [`TokenizerInfo`] before it is accepted.
pub struct PartWriter {
    path: PathBuf,
    tmp: PathBuf,
    info: TokenizerInfo,
    schema: SchemaRef,
    writer: ArrowWriter<HashingWriter<BufWriter<File>>>,
    pending: Vec<TokenRecord>,
    rows: u64,
    counts: SplitCounts,
}

impl std::fmt::Debug for PartWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartWriter")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish()
    }
}

impl PartWriter {
    /// Starts a part at `path` (written under a temporary name until [`finish`](Self::finish)).
    pub fn try_new(path: impl Into<PathBuf>, info: &TokenizerInfo) -> Result<Self> {
        Self::with_level(path.into(), info, 3)
    }

    pub(crate) fn with_level(path: PathBuf, info: &TokenizerInfo, zstd_level: i32) -> Result<Self> {
        info.validate()?;
        let parquet_err = |source| PackError::Parquet {
            path: path.clone(),
            source,
        };
        let info_json = serde_json::to_string(info).map_err(|e| PackError::InvalidTokenizer(e.to_string()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level).map_err(parquet_err)?))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_key_value_metadata(Some(vec![KeyValue::new(PART_METADATA_KEY.to_string(), info_json)]))
            .build();
        let tmp = util::temp_path(&path);
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let schema = part_schema();
        let writer = ArrowWriter::try_new(HashingWriter::new(BufWriter::new(file)), schema.clone(), Some(props))
            .map_err(parquet_err)?;
        Ok(PartWriter {
            path,
            tmp,
            info: info.clone(),
            schema,
            writer,
            pending: Vec::with_capacity(BATCH_ROWS),
            rows: 0,
            counts: SplitCounts::default(),
        })
    }

    /// Appends one sample (checked against the tokenizer info).
    pub fn write(&mut self, record: &TokenRecord) -> Result<()> {
        self.info.check_record(record)?;
        self.pending.push(record.clone());
        self.rows += 1;
        self.counts.add(record.split);
        if self.pending.len() >= BATCH_ROWS {
            self.flush_pending()?;
        }
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn flush_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = records_to_part_batch(&self.schema, &self.pending).map_err(|reason| PackError::InvalidPart {
            path: self.path.clone(),
            reason,
        })?;
        self.writer.write(&batch).map_err(|source| PackError::Parquet {
            path: self.path.clone(),
            source,
        })?;
        self.pending.clear();
        Ok(())
    }

    /// Writes the footer, fsyncs, renames the file into place and returns its entry for `tokenize.json`.
    pub fn finish(mut self) -> Result<PartEntry> {
        self.flush_pending()?;
        let hashing = self.writer.into_inner().map_err(|source| PackError::Parquet {
            path: self.path.clone(),
            source,
        })?;
        let (buf, sha256, bytes) = hashing.into_parts();
        let file = buf.into_inner().map_err(|e| PackError::Io {
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        util::commit_file(file, &self.tmp, &self.path)?;
        Ok(PartEntry {
            file: self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            rows: self.rows,
            bytes,
            sha256,
            counts: self.counts,
        })
    }
}

/// Streams the records of one token part, a Parquet row group at a time, checking each against the part's
/// [`TokenizerInfo`].
pub struct PartReader {
    path: PathBuf,
    info: TokenizerInfo,
    rows: u64,
    reader: ParquetRecordBatchReader,
    ready: VecDeque<TokenRecord>,
    failed: bool,
}

impl std::fmt::Debug for PartReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartReader")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish()
    }
}

impl PartReader {
    /// Opens a part and reads its metadata.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let invalid = |reason: String| PackError::InvalidPart {
            path: path.clone(),
            reason,
        };
        let file = File::open(&path).map_err(io_err(&path))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|source| PackError::Parquet {
            path: path.clone(),
            source,
        })?;
        let meta = builder.metadata().file_metadata();
        let info_json = meta
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == PART_METADATA_KEY))
            .and_then(|k| k.value.clone())
            .ok_or_else(|| invalid(format!("no {PART_METADATA_KEY} metadata (not written by PartWriter)")))?;
        let info: TokenizerInfo =
            serde_json::from_str(&info_json).map_err(|e| invalid(format!("bad {PART_METADATA_KEY} metadata: {e}")))?;
        info.validate().map_err(|e| invalid(e.to_string()))?;
        let expected = part_schema();
        let found = builder.schema();
        if found.fields().len() != expected.fields().len()
            || found
                .fields()
                .iter()
                .zip(expected.fields())
                .any(|(a, b)| a.name() != b.name() || a.data_type() != b.data_type())
        {
            return Err(invalid(format!("unexpected schema {found:?}")));
        }
        let rows = u64::try_from(meta.num_rows()).map_err(|_| invalid("negative row count".into()))?;
        let reader = builder
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|source| PackError::Parquet {
                path: path.clone(),
                source,
            })?;
        Ok(PartReader {
            path,
            info,
            rows,
            reader,
            ready: VecDeque::new(),
            failed: false,
        })
    }

    /// The tokenizer description stored in the part.
    pub fn info(&self) -> &TokenizerInfo {
        &self.info
    }

    /// Rows according to the Parquet footer.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn decode(&mut self, batch: &RecordBatch) -> Result<()> {
        let path = &self.path;
        let invalid = |reason: String| PackError::InvalidPart {
            path: path.clone(),
            reason,
        };
        let (k, g) = (self.info.views(), self.info.tokens_per_view());
        let ids = column::<UInt64Array>(batch, 0).map_err(invalid)?;
        let tokens = column::<ListArray>(batch, 1).map_err(invalid)?;
        let crops = column::<ListArray>(batch, 2).map_err(invalid)?;
        let flips = column::<ListArray>(batch, 3).map_err(invalid)?;
        let captions = column::<ListArray>(batch, 4).map_err(invalid)?;
        let labels = column::<Int32Array>(batch, 5).map_err(invalid)?;
        let splits = column::<UInt8Array>(batch, 6).map_err(invalid)?;
        let pixels = column::<BinaryArray>(batch, 7).map_err(invalid)?;
        let token_values = values::<UInt16Array>(tokens).map_err(invalid)?;
        let crop_values = values::<UInt32Array>(crops).map_err(invalid)?;
        let flip_values = values::<BooleanArray>(flips).map_err(invalid)?;
        let caption_lists = values::<ListArray>(captions).map_err(invalid)?;
        let caption_values = values::<UInt32Array>(caption_lists).map_err(invalid)?;
        let (to, co, fo) = (tokens.value_offsets(), crops.value_offsets(), flips.value_offsets());
        let (lo, io) = (captions.value_offsets(), caption_lists.value_offsets());
        for i in 0..batch.num_rows() {
            let sample_id = ids.value(i);
            let bad = |reason: String| PackError::InvalidRecord { sample_id, reason };
            let span = |o: &[i32], n: usize, what: &str| -> Result<std::ops::Range<usize>> {
                let (a, b) = (o[i] as usize, o[i + 1] as usize);
                if b - a != n {
                    return Err(bad(format!("has {} {what}, expected {n}", b - a)));
                }
                Ok(a..b)
            };
            // A text sample has no views at all (empty lists); any other row has all K.
            let k = if to[i + 1] == to[i] { 0 } else { k };
            let t = span(to, k * g, "tokens")?;
            let c = span(co, 4 * k, "crop values")?;
            let f = span(fo, k, "flips")?;
            let views = (0..k)
                .map(|v| ViewRecord {
                    crop: std::array::from_fn(|j| crop_values.value(c.start + 4 * v + j)),
                    flip: flip_values.value(f.start + v),
                    tokens: token_values.values()[t.start + v * g..t.start + (v + 1) * g].to_vec(),
                })
                .collect();
            let captions = (lo[i] as usize..lo[i + 1] as usize)
                .map(|j| caption_values.values()[io[j] as usize..io[j + 1] as usize].to_vec())
                .collect();
            let split =
                Split::from_code(splits.value(i)).ok_or_else(|| bad(format!("bad split code {}", splits.value(i))))?;
            let record = TokenRecord {
                sample_id,
                views,
                captions,
                label: labels.is_valid(i).then(|| labels.value(i)),
                split,
                pixels: pixels.is_valid(i).then(|| pixels.value(i).to_vec()),
            };
            self.info.check_record(&record)?;
            self.ready.push_back(record);
        }
        Ok(())
    }
}

impl Iterator for PartReader {
    type Item = Result<TokenRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(Ok(r));
            }
            if self.failed {
                return None;
            }
            match self.reader.next()? {
                Ok(batch) => {
                    if let Err(e) = self.decode(&batch) {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(PackError::Parquet {
                        path: self.path.clone(),
                        source: e.into(),
                    }));
                }
            }
        }
    }
}

pub(crate) fn column<T: Array + 'static>(batch: &RecordBatch, i: usize) -> std::result::Result<&T, String> {
    let col = batch.column(i);
    col.as_any().downcast_ref::<T>().ok_or_else(|| {
        format!(
            "column {} has type {}, expected another",
            batch.schema().field(i).name(),
            col.data_type()
        )
    })
}

fn values<T: Array + 'static>(list: &ListArray) -> std::result::Result<&T, String> {
    list.values()
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| format!("list values have type {}", list.values().data_type()))
}

/// Reads a whole token part: its tokenizer description and its records, in order.
pub fn read_part(path: impl AsRef<Path>) -> Result<(TokenizerInfo, Vec<TokenRecord>)> {
    let reader = PartReader::open(path.as_ref())?;
    let info = reader.info().clone();
    let records = reader.collect::<Result<Vec<_>>>()?;
    Ok((info, records))
}

/// `tokenize.json`: the tokens directory's manifest, written by the tokenize stage and read by pack.
///
/// The tokenize stage fills it with [`TokensManifest::new`] from the [`PartEntry`]s its [`PartWriter`]s returned
/// (in part order) and writes it last with [`TokensManifest::write`]; extra fields of its own go in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokensManifest {
    /// [`PARTS_FORMAT_VERSION`].
    pub format_version: u32,
    /// The tokenizer every part was made with.
    pub tokenizer: TokenizerInfo,
    /// The parts, in order.
    pub parts: Vec<PartEntry>,
    /// Samples per split over all parts.
    pub counts: SplitCounts,
    /// Anything else the tokenize stage records (config, rejects, timings); kept as is.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl TokensManifest {
    /// A manifest for these parts (counts summed from the entries).
    pub fn new(tokenizer: TokenizerInfo, parts: Vec<PartEntry>) -> Self {
        let mut counts = SplitCounts::default();
        for p in &parts {
            counts.train += p.counts.train;
            counts.val += p.counts.val;
        }
        TokensManifest {
            format_version: PARTS_FORMAT_VERSION,
            tokenizer,
            parts,
            counts,
            extra: BTreeMap::new(),
        }
    }

    /// Writes `dir/tokenize.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        util::write_json_atomic(&dir.join(TOKENS_MANIFEST_FILE), self)
    }

    /// Reads `dir/tokenize.json` and checks its version, the tokenizer info, the part names and the counts.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENS_MANIFEST_FILE);
        let m: TokensManifest = util::read_json(&path)?;
        let invalid = |reason: String| PackError::InvalidJson {
            path: path.clone(),
            reason,
        };
        if m.format_version != PARTS_FORMAT_VERSION {
            return Err(invalid(format!(
                "format_version {} is not supported (this build reads {PARTS_FORMAT_VERSION})",
                m.format_version
            )));
        }
        m.tokenizer.validate().map_err(|e| invalid(e.to_string()))?;
        let mut counts = SplitCounts::default();
        for p in &m.parts {
            if !util::is_plain_file_name(&p.file) {
                return Err(invalid(format!("part file {:?} is not a plain file name", p.file)));
            }
            if p.counts.total() != p.rows {
                return Err(invalid(format!(
                    "part {}: split counts do not add up to rows {}",
                    p.file, p.rows
                )));
            }
            counts.train += p.counts.train;
            counts.val += p.counts.val;
        }
        if counts != m.counts {
            return Err(invalid(format!(
                "counts {:?} differ from the parts' sum {counts:?}",
                m.counts
            )));
        }
        Ok(m)
    }
}
