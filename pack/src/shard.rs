//! The shard format: an Arrow IPC *file* with zstd-compressed record batches, one row per sample.
//!
//! | column | type | content |
//! |---|---|---|
//! | `sample_id` | `UInt64` | the sample's id |
//! | `tokens` | `FixedSizeList<FixedSizeList<UInt16, grid_h*grid_w>, K>` | visual tokens of each view, row-major |
//! | `crops` | `FixedSizeList<FixedSizeList<UInt32, 4>, K>` | crop `x, y, w, h` of each view in source pixels |
//! | `flips` | `FixedSizeList<Boolean, K>` | horizontal flip of each view |
//! | `captions` | `List<List<UInt32>>` | text tokens of each caption |
//! | `label` | `Int32`, nullable | class label |
//! | `split` | `UInt8` | 0 = train, 1 = val (every shard holds one split) |
//! | `pixels` | `Binary`, nullable, only with `--include-pixels` | the working image (JPEG) |
//!
//! Schema metadata: `imglish.format_version`, `imglish.tokenizer` (the [`TokenizerInfo`] JSON),
//! `imglish.tokenizer_fingerprint`, `imglish.grid` (`"HxW"`), `imglish.views_per_sample`,
//! `imglish.text_vocab_size`, `imglish.text_special_ids` (JSON), `imglish.split_codes`.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, FixedSizeListArray, Int32Array, ListArray, RecordBatch, UInt16Array,
    UInt32Array, UInt64Array, UInt8Array,
};
use arrow::buffer::{Buffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use arrow::ipc::reader::FileDecoder;
use arrow::ipc::writer::{FileWriter, IpcWriteOptions};
use arrow::ipc::{Block, CompressionType, MetadataVersion};

use crate::error::{io_err, PackError, Result};
use crate::index::ShardEntry;
use crate::part::column;
use crate::record::{SampleKind, Split, TokenRecord, TokenizerInfo, ViewRecord};
use crate::util::{self, HashingWriter};

/// Version of the shard and index format written by this build (`imglish.format_version`).
pub const FORMAT_VERSION: u32 = 2;
/// Schema metadata key of the format version.
pub const META_FORMAT_VERSION: &str = "imglish.format_version";
/// Schema metadata key of the [`TokenizerInfo`] JSON.
pub const META_TOKENIZER: &str = "imglish.tokenizer";

const ARROW_MAGIC: &[u8; 6] = b"ARROW1";
const CONTINUATION: [u8; 4] = [0xff; 4];
/// Largest decompressed buffer a shard may declare (guards allocations against hostile length prefixes).
const MAX_BUFFER_BYTES: i64 = 1 << 30;
/// Largest record batch (rows) a shard may declare.
const MAX_BATCH_ROWS: i64 = 1 << 24;

/// The standard shard file name for shard number `n`: `shard-NNNNN.arrow`.
pub fn shard_file_name(n: usize) -> String {
    format!("shard-{n:05}.arrow")
}

fn item(dt: DataType) -> FieldRef {
    Arc::new(Field::new("item", dt, false))
}

fn view_field(dt: DataType) -> FieldRef {
    Arc::new(Field::new("view", dt, false))
}

fn fixed(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The exact schema (fields and metadata) of a shard for this tokenizer.
pub fn shard_schema(info: &TokenizerInfo, include_pixels: bool) -> Schema {
    shard_schema_version(info, include_pixels, FORMAT_VERSION)
}

/// The schema of a shard of format `version` (1: no `kind` column, views never null; 2: `kind`, and the view
/// columns are null on text rows).
pub(crate) fn shard_schema_version(info: &TokenizerInfo, include_pixels: bool, version: u32) -> Schema {
    let (k, g) = (fixed(info.views()), fixed(info.tokens_per_view()));
    let views_nullable = version >= 2;
    let view_tokens = DataType::FixedSizeList(item(DataType::UInt16), g);
    let view_crop = DataType::FixedSizeList(item(DataType::UInt32), 4);
    let mut fields = vec![
        Field::new("sample_id", DataType::UInt64, false),
        Field::new(
            "tokens",
            DataType::FixedSizeList(view_field(view_tokens), k),
            views_nullable,
        ),
        Field::new(
            "crops",
            DataType::FixedSizeList(view_field(view_crop), k),
            views_nullable,
        ),
        Field::new(
            "flips",
            DataType::FixedSizeList(item(DataType::Boolean), k),
            views_nullable,
        ),
        Field::new(
            "captions",
            DataType::List(item(DataType::List(item(DataType::UInt32)))),
            false,
        ),
        Field::new("label", DataType::Int32, true),
        Field::new("split", DataType::UInt8, false),
    ];
    if version >= 2 {
        fields.push(Field::new("kind", DataType::UInt8, false));
    }
    if include_pixels {
        fields.push(Field::new("pixels", DataType::Binary, true));
    }
    let mut metadata: std::collections::HashMap<String, String> = [
        (META_FORMAT_VERSION, version.to_string()),
        (META_TOKENIZER, json(info)),
        ("imglish.tokenizer_fingerprint", info.fingerprint.clone()),
        ("imglish.grid", format!("{}x{}", info.grid[0], info.grid[1])),
        ("imglish.views_per_sample", info.views_per_sample.to_string()),
        ("imglish.vocab_size", info.vocab_size.to_string()),
        (
            "imglish.text_vocab_size",
            info.text_vocab_size.map(|v| v.to_string()).unwrap_or_default(),
        ),
        ("imglish.text_special_ids", json(&info.text_special_ids)),
        ("imglish.split_codes", r#"{"0":"train","1":"val"}"#.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if version >= 2 {
        metadata.insert(
            "imglish.kind_codes".into(),
            r#"{"0":"image","1":"text","2":"pair"}"#.to_string(),
        );
    }
    Schema::new_with_metadata(fields, metadata)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn fsl(values: ArrayRef, item_field: FieldRef, size: usize) -> std::result::Result<FixedSizeListArray, String> {
    FixedSizeListArray::try_new(item_field, fixed(size), values, None).map_err(|e| e.to_string())
}

/// A per-row list of the `K` views, null on text rows.
fn fsl_rows(
    values: ArrayRef,
    item_field: FieldRef,
    size: usize,
    valid: &[bool],
) -> std::result::Result<FixedSizeListArray, String> {
    let nulls = valid
        .iter()
        .any(|v| !v)
        .then(|| arrow::buffer::NullBuffer::from(valid.to_vec()));
    FixedSizeListArray::try_new(item_field, fixed(size), values, nulls).map_err(|e| e.to_string())
}

/// Builds one record batch of a shard. Records must already be checked against `info`.
pub(crate) fn records_to_batch(
    schema: &SchemaRef,
    info: &TokenizerInfo,
    records: &[TokenRecord],
) -> std::result::Result<RecordBatch, String> {
    let (k, g) = (info.views(), info.tokens_per_view());
    // Text rows have no views: their slots hold zeros under a null entry.
    let (mut tokens, mut crops, mut flips) = (Vec::new(), Vec::new(), Vec::new());
    for r in records {
        if r.views.is_empty() {
            tokens.resize(tokens.len() + k * g, 0u16);
            crops.resize(crops.len() + k * 4, 0u32);
            flips.resize(flips.len() + k, false);
        } else {
            let (t, c, f) = crate::record::flatten_views(std::slice::from_ref(r));
            tokens.extend(t);
            crops.extend(c);
            flips.extend(f);
        }
    }
    let valid: Vec<bool> = records.iter().map(|r| !r.views.is_empty()).collect();
    let view_tokens = fsl(Arc::new(UInt16Array::from(tokens)), item(DataType::UInt16), g)?;
    let view_tokens_type = view_tokens.data_type().clone();
    let view_crops = fsl(Arc::new(UInt32Array::from(crops)), item(DataType::UInt32), 4)?;
    let view_crops_type = view_crops.data_type().clone();
    let caption_tokens: Vec<u32> = records
        .iter()
        .flat_map(|r| r.captions.iter().flatten().copied())
        .collect();
    let inner = ListArray::new(
        item(DataType::UInt32),
        OffsetBuffer::from_lengths(records.iter().flat_map(|r| r.captions.iter().map(Vec::len))),
        Arc::new(UInt32Array::from(caption_tokens)),
        None,
    );
    let captions = ListArray::new(
        item(inner.data_type().clone()),
        OffsetBuffer::from_lengths(records.iter().map(|r| r.captions.len())),
        Arc::new(inner),
        None,
    );
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(records.iter().map(|r| r.sample_id))),
        Arc::new(fsl_rows(
            Arc::new(view_tokens),
            view_field(view_tokens_type),
            k,
            &valid,
        )?),
        Arc::new(fsl_rows(Arc::new(view_crops), view_field(view_crops_type), k, &valid)?),
        Arc::new(fsl_rows(
            Arc::new(BooleanArray::from(flips)),
            item(DataType::Boolean),
            k,
            &valid,
        )?),
        Arc::new(captions),
        Arc::new(Int32Array::from_iter(records.iter().map(|r| r.label))),
        Arc::new(UInt8Array::from_iter_values(records.iter().map(|r| r.split.code()))),
    ];
    if schema.field_with_name("kind").is_ok() {
        columns.push(Arc::new(UInt8Array::from_iter_values(
            records.iter().map(|r| r.kind().code()),
        )));
    }
    if schema.fields().len() > columns.len() {
        columns.push(Arc::new(BinaryArray::from_iter(
            records.iter().map(|r| r.pixels.as_deref()),
        )));
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

/// Writes one shard to a temporary sibling name; [`ShardWriter::finish`] fsyncs and renames it.
pub(crate) struct ShardWriter {
    name: String,
    path: PathBuf,
    tmp: PathBuf,
    schema: SchemaRef,
    info: TokenizerInfo,
    split: Split,
    writer: FileWriter<HashingWriter<BufWriter<File>>>,
    rows: u64,
    batches: u64,
}

impl ShardWriter {
    pub(crate) fn create(
        dir: &Path,
        name: String,
        schema: SchemaRef,
        info: &TokenizerInfo,
        split: Split,
        zstd_level: i32,
    ) -> Result<Self> {
        let path = dir.join(&name);
        let tmp = util::temp_path(&path);
        let werr = |e: arrow::error::ArrowError| PackError::ShardWrite {
            shard: name.clone(),
            reason: e.to_string(),
        };
        let options = IpcWriteOptions::default()
            .try_with_compression(Some(CompressionType::ZSTD))
            .and_then(|o| o.try_with_compression_level(Some(zstd_level)))
            .map_err(werr)?;
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let writer = FileWriter::try_new_with_options(HashingWriter::new(BufWriter::new(file)), &schema, options)
            .map_err(werr)?;
        Ok(ShardWriter {
            name,
            path,
            tmp,
            schema,
            info: info.clone(),
            split,
            writer,
            rows: 0,
            batches: 0,
        })
    }

    /// Appends one record batch.
    pub(crate) fn write(&mut self, records: &[TokenRecord]) -> Result<()> {
        let werr = |reason: String| PackError::ShardWrite {
            shard: self.name.clone(),
            reason,
        };
        let batch = records_to_batch(&self.schema, &self.info, records).map_err(werr)?;
        self.writer.write(&batch).map_err(|e| werr(e.to_string()))?;
        self.rows += records.len() as u64;
        self.batches += 1;
        Ok(())
    }

    /// Bytes written so far (the IPC writer does not buffer whole batches).
    pub(crate) fn bytes(&self) -> u64 {
        self.writer.get_ref().written()
    }

    /// Gives up on the shard: closes and deletes its temporary file (after a failure, so that nothing
    /// half-written stays behind).
    pub(crate) fn abandon(self) {
        let tmp = self.tmp.clone();
        drop(self);
        let _ = std::fs::remove_file(tmp);
    }

    pub(crate) fn finish(mut self) -> Result<ShardEntry> {
        let werr = |reason: String| PackError::ShardWrite {
            shard: self.name.clone(),
            reason,
        };
        self.writer.finish().map_err(|e| werr(e.to_string()))?;
        let hashing = self.writer.into_inner().map_err(|e| werr(e.to_string()))?;
        let (buf, sha256, bytes) = hashing.into_parts();
        let file = buf.into_inner().map_err(|e| PackError::Io {
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        util::commit_file(file, &self.tmp, &self.path)?;
        Ok(ShardEntry {
            file: self.name,
            split: self.split,
            rows: self.rows,
            batches: self.batches,
            bytes,
            sha256,
        })
    }
}

/// What a shard must be; `None` fields are taken from the shard itself (standalone reads).
#[derive(Debug, Clone, Default)]
pub(crate) struct Expect {
    pub(crate) info: Option<TokenizerInfo>,
    pub(crate) include_pixels: Option<bool>,
    pub(crate) entry: Option<ShardEntry>,
    pub(crate) batch_rows: Option<u64>,
}

enum Source {
    File(Mutex<File>),
    Bytes(Buffer),
}

/// An opened, verified shard: footer, schema and batch table parsed; batches are read on demand.
pub(crate) struct ShardFile {
    name: String,
    source: Source,
    decoder: FileDecoder,
    schema: SchemaRef,
    info: TokenizerInfo,
    blocks: Vec<Block>,
    batch_rows: Vec<usize>,
    split: Option<Split>,
}

impl std::fmt::Debug for ShardFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardFile")
            .field("name", &self.name)
            .field("batches", &self.blocks.len())
            .finish()
    }
}

impl ShardFile {
    /// Opens a shard listed in an index: checks the size and sha256 (streaming, constant memory), then the
    /// structure. The file handle is kept; batches are read with positioned reads.
    pub(crate) fn open_verified(path: &Path, expect: Expect) -> Result<ShardFile> {
        Self::open_checked(path, expect, true)
    }

    /// [`ShardFile::open_verified`] without the hash, for a file whose sha256 was just checked as it was written
    /// (a shard downloaded into the cache).
    pub(crate) fn open_trusted(path: &Path, expect: Expect) -> Result<ShardFile> {
        Self::open_checked(path, expect, false)
    }

    fn open_checked(path: &Path, expect: Expect, hash: bool) -> Result<ShardFile> {
        let entry = expect
            .entry
            .clone()
            .ok_or_else(|| PackError::InvalidConfig("no shard entry".into()))?;
        let corrupt = |reason: String| PackError::CorruptShard {
            shard: entry.file.clone(),
            batch: None,
            reason,
        };
        let file = File::open(path).map_err(|e| corrupt(format!("cannot open {}: {e}", path.display())))?;
        let len = file.metadata().map_err(|e| corrupt(e.to_string()))?.len();
        if len != entry.bytes {
            return Err(corrupt(format!(
                "is {len} bytes, the index says {} (truncated or replaced)",
                entry.bytes
            )));
        }
        if hash {
            let (sha, _) = util::sha256_file(path).map_err(|e| corrupt(e.to_string()))?;
            if sha != entry.sha256 {
                return Err(corrupt(format!("sha256 is {sha}, the index says {}", entry.sha256)));
            }
        }
        Self::parse(entry.file.clone(), Source::File(Mutex::new(file)), len, &expect)
    }

    /// Parses a shard held in memory (no hash to check against: structure, schema and metadata only).
    pub(crate) fn from_bytes(name: &str, bytes: Vec<u8>, expect: &Expect) -> Result<ShardFile> {
        let len = bytes.len() as u64;
        Self::parse(name.to_string(), Source::Bytes(Buffer::from_vec(bytes)), len, expect)
    }

    fn read_at(&self, offset: u64, len: usize) -> std::result::Result<Buffer, String> {
        match &self.source {
            Source::Bytes(b) => {
                let start = usize::try_from(offset).map_err(|_| "offset overflow".to_string())?;
                if start.checked_add(len).is_none_or(|end| end > b.len()) {
                    return Err(format!("range {start}+{len} is past the end ({} bytes)", b.len()));
                }
                Ok(b.slice_with_length(start, len))
            }
            Source::File(f) => {
                let mut f = f.lock().map_err(|_| "shard file lock poisoned".to_string())?;
                let mut v = vec![0u8; len];
                f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
                f.read_exact(&mut v)
                    .map_err(|e| format!("cannot read {len} bytes at {offset}: {e}"))?;
                Ok(Buffer::from_vec(v))
            }
        }
    }

    fn parse(name: String, source: Source, len: u64, expect: &Expect) -> Result<ShardFile> {
        let corrupt = |reason: String| PackError::CorruptShard {
            shard: name.clone(),
            batch: None,
            reason,
        };
        let mut shard = ShardFile {
            name: name.clone(),
            source,
            decoder: FileDecoder::new(Arc::new(Schema::empty()), MetadataVersion::V5),
            schema: Arc::new(Schema::empty()),
            info: expect.info.clone().unwrap_or_else(placeholder_info),
            blocks: Vec::new(),
            batch_rows: Vec::new(),
            split: expect.entry.as_ref().map(|e| e.split),
        };
        if len < 8 + 10 {
            return Err(corrupt(format!("is {len} bytes, too short for an Arrow IPC file")));
        }
        let head = shard.read_at(0, 8).map_err(&corrupt)?;
        if &head[..6] != ARROW_MAGIC {
            return Err(corrupt("does not start with the Arrow file magic ARROW1".into()));
        }
        let tail = shard.read_at(len - 10, 10).map_err(&corrupt)?;
        if &tail[4..] != ARROW_MAGIC {
            return Err(corrupt(
                "does not end with the Arrow file magic ARROW1 (truncated?)".into(),
            ));
        }
        let footer_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        if footer_len == 0 || footer_len > len - 18 {
            return Err(corrupt(format!(
                "footer length {footer_len} does not fit in {len} bytes"
            )));
        }
        let footer_start = len - 10 - footer_len;
        let footer_bytes = shard.read_at(footer_start, footer_len as usize).map_err(&corrupt)?;
        let footer = arrow::ipc::root_as_footer(&footer_bytes).map_err(|e| corrupt(format!("bad footer: {e}")))?;
        if footer.version() != MetadataVersion::V5 {
            return Err(corrupt(format!(
                "IPC metadata version {:?}, expected V5",
                footer.version()
            )));
        }
        if footer.dictionaries().is_some_and(|d| !d.is_empty()) {
            return Err(corrupt("has dictionary batches; shards have none".into()));
        }
        let fb_schema = footer.schema().ok_or_else(|| corrupt("footer has no schema".into()))?;
        let schema =
            arrow::ipc::convert::try_fb_to_schema(fb_schema).map_err(|e| corrupt(format!("bad schema: {e}")))?;
        let md = schema.metadata();
        let version = match md.get(META_FORMAT_VERSION) {
            Some(v) if v == "1" => 1,
            Some(v) if v == &FORMAT_VERSION.to_string() => FORMAT_VERSION,
            Some(v) => {
                return Err(corrupt(format!(
                    "{META_FORMAT_VERSION} is {v}, this build reads versions 1 to {FORMAT_VERSION}"
                )))
            }
            None => {
                return Err(corrupt(format!(
                    "no {META_FORMAT_VERSION} in the schema metadata (not an imglish shard)"
                )))
            }
        };
        let info: TokenizerInfo = md
            .get(META_TOKENIZER)
            .ok_or_else(|| corrupt(format!("no {META_TOKENIZER} in the schema metadata")))
            .and_then(|s| serde_json::from_str(s).map_err(|e| corrupt(format!("bad {META_TOKENIZER}: {e}"))))?;
        info.validate().map_err(|e| corrupt(e.to_string()))?;
        if let Some(expected) = &expect.info {
            if expected != &info {
                return Err(corrupt(format!(
                    "was made with tokenizer {}, the dataset uses {}",
                    info.fingerprint, expected.fingerprint
                )));
            }
        }
        let pixels = expect
            .include_pixels
            .unwrap_or_else(|| schema.fields().iter().any(|f| f.name() == "pixels"));
        let expected_schema = shard_schema_version(&info, pixels, version);
        if schema.fields() != expected_schema.fields() || schema.metadata() != expected_schema.metadata() {
            return Err(corrupt(format!(
                "schema differs from the imglish shard schema: {schema}"
            )));
        }
        let blocks: Vec<Block> = footer
            .recordBatches()
            .map(|b| b.iter().copied().collect())
            .unwrap_or_default();
        let schema = Arc::new(schema);
        shard.schema = schema.clone();
        shard.decoder = FileDecoder::new(schema, MetadataVersion::V5);
        shard.info = info;
        let mut start = 0u64;
        for (i, block) in blocks.iter().enumerate() {
            let rows = shard.check_block(i, block, footer_start)?;
            shard.batch_rows.push(rows);
            start += rows as u64;
        }
        shard.blocks = blocks;
        if let Some(entry) = &expect.entry {
            if start != entry.rows || shard.blocks.len() as u64 != entry.batches {
                return Err(corrupt(format!(
                    "has {start} rows in {} batches, the index says {} rows in {} batches",
                    shard.blocks.len(),
                    entry.rows,
                    entry.batches
                )));
            }
            if let Some(br) = expect.batch_rows {
                let n = shard.batch_rows.len();
                if let Some(i) =
                    (0..n).find(|&i| (i + 1 < n && shard.batch_rows[i] as u64 != br) || shard.batch_rows[i] == 0)
                {
                    return Err(PackError::CorruptShard {
                        shard: name.clone(),
                        batch: Some(i),
                        reason: format!("has {} rows, expected {br}", shard.batch_rows[i]),
                    });
                }
            }
        }
        Ok(shard)
    }

    /// Checks a batch's block and message header (bounds, compression, row count) and returns its rows.
    fn check_block(&self, i: usize, block: &Block, footer_start: u64) -> Result<usize> {
        let corrupt = |reason: String| PackError::CorruptShard {
            shard: self.name.clone(),
            batch: Some(i),
            reason,
        };
        let (offset, meta_len, body_len) = (block.offset(), block.metaDataLength(), block.bodyLength());
        if offset < 8 || meta_len < 8 || body_len < 0 {
            return Err(corrupt(format!(
                "bad block offset {offset}, metadata {meta_len}, body {body_len}"
            )));
        }
        let end = (offset as u64)
            .checked_add(meta_len as u64)
            .and_then(|e| e.checked_add(body_len as u64));
        if end.is_none_or(|e| e > footer_start) {
            return Err(corrupt(format!(
                "block {offset}+{meta_len}+{body_len} runs past the data ({footer_start})"
            )));
        }
        let meta = self.read_at(offset as u64, meta_len as usize).map_err(&corrupt)?;
        self.check_message(&meta, body_len).map_err(corrupt)
    }

    fn check_message(&self, meta: &[u8], body_len: i64) -> std::result::Result<usize, String> {
        if meta[..4] != CONTINUATION {
            return Err("message does not start with the IPC continuation marker".into());
        }
        let flat_len = i32::from_le_bytes([meta[4], meta[5], meta[6], meta[7]]);
        if flat_len <= 0 || flat_len as usize > meta.len() - 8 {
            return Err(format!("message length {flat_len} does not fit its block"));
        }
        let message =
            arrow::ipc::root_as_message(&meta[8..8 + flat_len as usize]).map_err(|e| format!("bad message: {e}"))?;
        if message.version() != MetadataVersion::V5 || message.bodyLength() != body_len {
            return Err("message version or body length differs from the footer".into());
        }
        let batch = message
            .header_as_record_batch()
            .ok_or("block does not hold a record batch")?;
        match batch.compression() {
            Some(c) if c.codec() == CompressionType::ZSTD => {}
            _ => return Err("record batch is not zstd-compressed".into()),
        }
        let rows = batch.length();
        if !(0..=MAX_BATCH_ROWS).contains(&rows) {
            return Err(format!("record batch declares {rows} rows"));
        }
        for node in batch.nodes().iter().flatten() {
            if !(0..=MAX_BUFFER_BYTES).contains(&node.length())
                || node.null_count() < 0
                || node.null_count() > node.length()
            {
                return Err(format!(
                    "bad field node length {} / nulls {}",
                    node.length(),
                    node.null_count()
                ));
            }
        }
        for buf in batch.buffers().iter().flatten() {
            let end = buf.offset().checked_add(buf.length());
            if buf.offset() < 0 || buf.length() < 0 || end.is_none_or(|e| e > body_len) {
                return Err(format!(
                    "buffer {}+{} is outside the body ({body_len} bytes)",
                    buf.offset(),
                    buf.length()
                ));
            }
        }
        Ok(rows as usize)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn info(&self) -> &TokenizerInfo {
        &self.info
    }

    pub(crate) fn num_batches(&self) -> usize {
        self.blocks.len()
    }

    /// Reads, decompresses and validates record batch `i`.
    pub(crate) fn read_batch(&self, i: usize) -> Result<RecordBatch> {
        let corrupt = |reason: String| PackError::CorruptShard {
            shard: self.name.clone(),
            batch: Some(i),
            reason,
        };
        let block = self.blocks.get(i).ok_or_else(|| PackError::OutOfRange {
            what: "batch",
            index: i as u64,
            len: self.blocks.len() as u64,
        })?;
        let meta_len = block.metaDataLength() as usize;
        let data = self
            .read_at(block.offset() as u64, meta_len + block.bodyLength() as usize)
            .map_err(&corrupt)?;
        let rows = self
            .check_message(&data[..meta_len], block.bodyLength())
            .map_err(&corrupt)?;
        if rows != self.batch_rows[i] {
            return Err(corrupt("the batch changed since the shard was opened".into()));
        }
        // Guard the decompressor's allocation: every compressed buffer starts with its decompressed length.
        let message =
            arrow::ipc::root_as_message(&data[8..meta_len]).map_err(|e| corrupt(format!("bad message: {e}")))?;
        if let Some(buffers) = message.header_as_record_batch().and_then(|b| b.buffers()) {
            let body = &data[meta_len..];
            for b in buffers.iter() {
                let (o, l) = (b.offset() as usize, b.length() as usize);
                if l == 0 {
                    continue;
                }
                if l < 8 {
                    return Err(corrupt(format!(
                        "compressed buffer at {o} is {l} bytes, shorter than its prefix"
                    )));
                }
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&body[o..o + 8]);
                let n = i64::from_le_bytes(prefix);
                if n != -1 && !(0..=MAX_BUFFER_BYTES).contains(&n) {
                    return Err(corrupt(format!(
                        "compressed buffer at {o} declares {n} decompressed bytes"
                    )));
                }
            }
        }
        let batch = self
            .decoder
            .read_record_batch(block, &data)
            .map_err(|e| corrupt(format!("cannot decode: {e}")))?
            .ok_or_else(|| corrupt("block holds no record batch".into()))?;
        if batch.num_rows() != rows {
            return Err(corrupt(format!(
                "decoded {} rows, the header says {rows}",
                batch.num_rows()
            )));
        }
        BatchView::new(&batch, &self.info, self.split).map_err(corrupt)?;
        Ok(batch)
    }

    /// Reads batch `i` and returns it with a typed view over its columns.
    pub(crate) fn with_batch<T>(&self, i: usize, f: impl FnOnce(&BatchView<'_>) -> T) -> Result<T> {
        let batch = self.read_batch(i)?;
        let view = BatchView::new(&batch, &self.info, self.split).map_err(|reason| PackError::CorruptShard {
            shard: self.name.clone(),
            batch: Some(i),
            reason,
        })?;
        Ok(f(&view))
    }
}

fn placeholder_info() -> TokenizerInfo {
    TokenizerInfo {
        fingerprint: String::new(),
        card: serde_json::Value::Null,
        grid: [1, 1],
        vocab_size: 1,
        text_vocab_size: None,
        text_special_ids: Default::default(),
        views_per_sample: 1,
    }
}

/// Typed access to the columns of a validated shard record batch.
pub(crate) struct BatchView<'a> {
    rows: usize,
    k: usize,
    g: usize,
    ids: &'a [u64],
    tokens: &'a [u16],
    crops: &'a [u32],
    flips: &'a BooleanArray,
    captions: &'a ListArray,
    caption_offsets: &'a [i32],
    caption_tokens: &'a [u32],
    labels: &'a Int32Array,
    splits: &'a [u8],
    kinds: Vec<u8>,
    pixels: Option<&'a BinaryArray>,
}

/// The values of a per-row view list whose null rows must be exactly the text rows.
fn view_values<'a, T: Array + 'static>(
    a: &'a FixedSizeListArray,
    text_rows: &[bool],
    what: &str,
) -> std::result::Result<&'a T, String> {
    if a.values().null_count() > 0 {
        return Err(format!("{what} has nulls inside a view"));
    }
    if let Some(row) = (0..a.len()).find(|&r| a.is_null(r) != text_rows[r]) {
        return Err(format!(
            "{what} of row {row} is {} although the row is {}a text sample",
            if a.is_null(row) { "null" } else { "present" },
            if text_rows[row] { "" } else { "not " }
        ));
    }
    a.values()
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| format!("{what} has the wrong type"))
}

fn fsl_values<'a, T: Array + 'static>(a: &'a FixedSizeListArray, what: &str) -> std::result::Result<&'a T, String> {
    if a.null_count() > 0 || a.values().null_count() > 0 {
        return Err(format!("{what} has nulls"));
    }
    a.values()
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| format!("{what} has the wrong type"))
}

impl<'a> BatchView<'a> {
    pub(crate) fn new(
        batch: &'a RecordBatch,
        info: &TokenizerInfo,
        split: Option<Split>,
    ) -> std::result::Result<BatchView<'a>, String> {
        let (k, g, rows) = (info.views(), info.tokens_per_view(), batch.num_rows());
        let ids = column::<UInt64Array>(batch, 0)?;
        let captions = column::<ListArray>(batch, 4)?;
        // Format 2 has a `kind` column after `split`; format 1 has none (every row with a view: image or pair).
        let v2 = batch.schema().fields().iter().any(|f| f.name() == "kind");
        let kinds: Vec<u8> = if v2 {
            let kinds = column::<UInt8Array>(batch, 7)?.values();
            if let Some(p) = kinds.iter().position(|&c| SampleKind::from_code(c).is_none()) {
                return Err(format!("row {p} has kind code {}", kinds[p]));
            }
            kinds.to_vec()
        } else {
            let o = captions.value_offsets();
            (0..rows)
                .map(|r| {
                    if o[r + 1] > o[r] {
                        SampleKind::Pair
                    } else {
                        SampleKind::Image
                    }
                    .code()
                })
                .collect()
        };
        if kinds.len() != rows {
            return Err("column lengths do not match the row count".into());
        }
        let text_rows: Vec<bool> = kinds.iter().map(|&c| c == SampleKind::Text.code()).collect();
        let tokens = view_values::<FixedSizeListArray>(column::<FixedSizeListArray>(batch, 1)?, &text_rows, "tokens")?;
        let tokens = fsl_values::<UInt16Array>(tokens, "tokens")?.values();
        let crops = view_values::<FixedSizeListArray>(column::<FixedSizeListArray>(batch, 2)?, &text_rows, "crops")?;
        let crops = fsl_values::<UInt32Array>(crops, "crops")?.values();
        let flips = view_values::<BooleanArray>(column::<FixedSizeListArray>(batch, 3)?, &text_rows, "flips")?;
        let inner = captions
            .values()
            .as_any()
            .downcast_ref::<ListArray>()
            .ok_or("captions have the wrong type")?;
        let caption_tokens = inner
            .values()
            .as_any()
            .downcast_ref::<UInt32Array>()
            .ok_or("captions have the wrong type")?;
        if captions.null_count() > 0 || inner.null_count() > 0 || caption_tokens.null_count() > 0 {
            return Err("captions have nulls".into());
        }
        let labels = column::<Int32Array>(batch, 5)?;
        let splits = column::<UInt8Array>(batch, 6)?.values();
        let pixel_column = if v2 { 8 } else { 7 };
        let pixels = match batch.num_columns() {
            n if n == pixel_column + 1 => Some(column::<BinaryArray>(batch, pixel_column)?),
            _ => None,
        };
        if ids.len() != rows || tokens.len() != rows * k * g || crops.len() != rows * k * 4 || flips.len() != rows * k {
            return Err("column lengths do not match the row count".into());
        }
        for (row, _) in text_rows.iter().enumerate().filter(|(_, &t)| t) {
            let o = captions.value_offsets();
            if o[row + 1] - o[row] != 1 {
                return Err(format!(
                    "row {row} is a text sample with {} texts, not 1",
                    o[row + 1] - o[row]
                ));
            }
        }
        if info.vocab_size < 1 << 16 {
            if let Some(p) = tokens.iter().position(|&t| u32::from(t) >= info.vocab_size) {
                return Err(format!(
                    "row {} has token {} >= vocab_size {}",
                    p / (k * g),
                    tokens[p],
                    info.vocab_size
                ));
            }
        }
        if let Some(tv) = info.text_vocab_size {
            if let Some(t) = caption_tokens.values().iter().find(|&&t| t >= tv) {
                return Err(format!("caption token {t} >= text_vocab_size {tv}"));
            }
        }
        if let Some(p) = splits
            .iter()
            .position(|&s| Split::from_code(s).is_none_or(|s| split.is_some_and(|e| e != s)))
        {
            return Err(format!(
                "row {p} has split code {}, expected {:?}",
                splits[p],
                split.map(Split::code)
            ));
        }
        Ok(BatchView {
            rows,
            k,
            g,
            ids: ids.values(),
            tokens,
            crops,
            flips,
            captions,
            caption_offsets: inner.value_offsets(),
            caption_tokens: caption_tokens.values(),
            labels,
            splits,
            kinds,
            pixels,
        })
    }

    pub(crate) fn kind(&self, row: usize) -> SampleKind {
        SampleKind::from_code(self.kinds[row]).unwrap_or(SampleKind::Image)
    }

    pub(crate) fn is_text(&self, row: usize) -> bool {
        self.kind(row) == SampleKind::Text
    }

    /// The visual tokens of every view of the rows that have views.
    pub(crate) fn image_tokens(&self) -> impl Iterator<Item = u16> + '_ {
        let per_row = self.k * self.g;
        (0..self.rows)
            .filter(|&r| !self.is_text(r))
            .flat_map(move |r| self.tokens[r * per_row..(r + 1) * per_row].iter().copied())
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn sample_id(&self, row: usize) -> u64 {
        self.ids[row]
    }

    pub(crate) fn split(&self, row: usize) -> Split {
        Split::from_code(self.splits[row]).unwrap_or(Split::Train)
    }

    pub(crate) fn label(&self, row: usize) -> Option<i32> {
        self.labels.is_valid(row).then(|| self.labels.value(row))
    }

    pub(crate) fn view_tokens(&self, row: usize, view: usize) -> &'a [u16] {
        let s = (row * self.k + view) * self.g;
        &self.tokens[s..s + self.g]
    }

    pub(crate) fn view(&self, row: usize, view: usize) -> ViewRecord {
        let c = (row * self.k + view) * 4;
        ViewRecord {
            crop: [self.crops[c], self.crops[c + 1], self.crops[c + 2], self.crops[c + 3]],
            flip: self.flips.value(row * self.k + view),
            tokens: self.view_tokens(row, view).to_vec(),
        }
    }

    /// Token count of each caption of `row`.
    pub(crate) fn caption_lengths(&self, row: usize) -> impl Iterator<Item = usize> + '_ {
        let o = self.captions.value_offsets();
        (o[row] as usize..o[row + 1] as usize).map(|j| (self.caption_offsets[j + 1] - self.caption_offsets[j]) as usize)
    }

    pub(crate) fn captions(&self, row: usize) -> Vec<Vec<u32>> {
        let o = self.captions.value_offsets();
        (o[row] as usize..o[row + 1] as usize)
            .map(|j| {
                self.caption_tokens[self.caption_offsets[j] as usize..self.caption_offsets[j + 1] as usize].to_vec()
            })
            .collect()
    }

    /// Whether `row` has stored pixels.
    pub(crate) fn has_pixels(&self, row: usize) -> bool {
        self.pixels.is_some_and(|p| p.is_valid(row))
    }

    pub(crate) fn pixels(&self, row: usize) -> Option<Vec<u8>> {
        self.pixels.and_then(|p| p.is_valid(row).then(|| p.value(row).to_vec()))
    }

    pub(crate) fn record(&self, row: usize) -> TokenRecord {
        TokenRecord {
            sample_id: self.sample_id(row),
            views: if self.is_text(row) {
                Vec::new()
            } else {
                (0..self.k).map(|v| self.view(row, v)).collect()
            },
            captions: self.captions(row),
            label: self.label(row),
            split: self.split(row),
            pixels: self.pixels(row),
        }
    }
}

/// Reads a standalone shard held in memory, with no index: checks the Arrow file magic, the footer and batch
/// table, the format version and the exact schema in the metadata, then decodes every batch. It never panics
/// on malformed input (this is the entry point the fuzz target drives). Returns the tokenizer description and
/// the records in file order.
pub fn read_shard_bytes(bytes: &[u8]) -> Result<(TokenizerInfo, Vec<TokenRecord>)> {
    let shard = ShardFile::from_bytes("<memory>", bytes.to_vec(), &Expect::default())?;
    let mut records = Vec::new();
    for i in 0..shard.num_batches() {
        shard.with_batch(i, |v| records.extend((0..v.rows()).map(|r| v.record(r))))?;
    }
    Ok((shard.info().clone(), records))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dataset of format 1 (no `kind` column, views never null) stays readable: rows with captions are pairs,
    /// the others images.
    #[test]
    fn format_1_shards_stay_readable() {
        let info = TokenizerInfo {
            fingerprint: "ab".repeat(32),
            card: serde_json::json!({}),
            grid: [2, 2],
            vocab_size: 50,
            text_vocab_size: Some(100),
            text_special_ids: Default::default(),
            views_per_sample: 1,
        };
        let records: Vec<TokenRecord> = (0..6u64)
            .map(|id| TokenRecord {
                sample_id: id,
                views: vec![ViewRecord {
                    crop: [0, 0, 8, 8],
                    flip: false,
                    tokens: vec![id as u16; 4],
                }],
                captions: if id % 2 == 0 { vec![vec![3, 4]] } else { vec![] },
                label: None,
                split: Split::Train,
                pixels: None,
            })
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = Arc::new(shard_schema_version(&info, false, 1));
        let mut w = ShardWriter::create(dir.path(), "shard-00000.arrow".into(), schema, &info, Split::Train, 1)
            .expect("writer");
        w.write(&records).expect("write");
        w.finish().expect("finish");
        let bytes = std::fs::read(dir.path().join("shard-00000.arrow")).expect("read");
        let (back_info, back) = read_shard_bytes(&bytes).expect("a format 1 shard reads");
        assert_eq!(back_info, info);
        assert_eq!(back, records);
        let kinds: Vec<SampleKind> = back.iter().map(TokenRecord::kind).collect();
        assert_eq!(kinds[..2], [SampleKind::Pair, SampleKind::Image]);
    }
}
