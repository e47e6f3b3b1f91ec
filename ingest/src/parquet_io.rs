//! Everything that touches Parquet, through polars: the manifest and rejects files, Parquet image sources and
//! Parquet caption sets.

use std::fs::File;
use std::path::Path;

use polars::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::temp_sibling;
use crate::sources::{Locator, ParquetColumns};

fn pe(path: &Path) -> impl Fn(PolarsError) -> Error + '_ {
    move |e| Error::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Which split a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    /// Training split.
    Train,
    /// Validation split.
    Val,
}

impl Split {
    /// `train` or `val`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// One accepted sample of a manifest (`samples.parquet`).
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestRow {
    /// Stable id derived from the source and the key.
    pub sample_id: u64,
    /// The key within its source (relative path, WebDataset key, Parquet `path` or `row-N`).
    pub key: String,
    /// The source, as given on the command line.
    pub source: String,
    /// Where the bytes are.
    pub locator: Locator,
    /// sha256 of the image bytes, hex.
    pub content_hash: String,
    /// Size of the image file in bytes.
    pub bytes: u64,
    /// Format sniffed from the bytes.
    pub format: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Class index, if any.
    pub label: Option<i32>,
    /// Class name, if known.
    pub label_name: Option<String>,
    /// Captions, in source order.
    pub captions: Vec<String>,
    /// Train or validation.
    pub split: Split,
}

/// One rejected input (`rejects.parquet`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RejectRow {
    /// The source or caption file.
    pub source: String,
    /// The key (or row) within it.
    pub key: String,
    /// The reason code.
    pub reason: String,
    /// What exactly is wrong.
    pub message: String,
}

/// Writes `df` to `path` as zstd Parquet atomically (temporary sibling, fsync, rename); a failed write names
/// the OS cause and leaves no temporary behind.
pub fn write_df(path: &Path, df: &mut DataFrame) -> Result<()> {
    let tmp = temp_sibling(path);
    let written = (|| {
        let f = File::create(&tmp).at(&tmp)?;
        let mut w = KeepIoError { inner: &f, error: None };
        let result = ParquetWriter::new(&mut w)
            .with_compression(ParquetCompression::Zstd(None))
            .set_parallel(false)
            .finish(df);
        // The Parquet writer reports a failed write as a thrift or format error: give the OS cause instead.
        if let Some(e) = w.error.take() {
            return Err(e).at(&tmp);
        }
        result.map_err(pe(path))?;
        f.sync_all().at(&tmp)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).at(path)?;
    Ok(())
}

/// A writer that keeps the first I/O error it passed on.
struct KeepIoError<W> {
    inner: W,
    error: Option<std::io::Error>,
}

impl<W: std::io::Write> std::io::Write for KeepIoError<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| self.keep(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().inspect_err(|e| self.keep(e))
    }
}

impl<W> KeepIoError<W> {
    fn keep(&mut self, e: &std::io::Error) {
        if self.error.is_none() {
            self.error = Some(match e.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(e.kind(), e.to_string()),
            });
        }
    }
}

fn col<T: Into<Series>>(s: T) -> Column {
    Column::from(s.into())
}

/// Writes `samples.parquet`.
pub(crate) fn write_samples(path: &Path, rows: &[ManifestRow]) -> Result<()> {
    let n = rows.len();
    let mut captions = ListStringChunkedBuilder::new("captions".into(), n, n * 2);
    for r in rows {
        captions.append_values_iter(r.captions.iter().map(String::as_str));
    }
    let (mut path_c, mut tar_off, mut tar_len, mut pq_row) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        match &r.locator {
            Locator::File { path } => {
                path_c.push(path.as_str());
                tar_off.push(None);
                tar_len.push(None);
                pq_row.push(None);
            }
            Locator::TarMember { tar, offset, length } => {
                path_c.push(tar.as_str());
                tar_off.push(Some(*offset));
                tar_len.push(Some(*length));
                pq_row.push(None);
            }
            Locator::ParquetRow { file, row } => {
                path_c.push(file.as_str());
                tar_off.push(None);
                tar_len.push(None);
                pq_row.push(Some(*row));
            }
        }
    }
    // String columns straight from the rows, without a copy of every string first (peak memory).
    let strs = |name: &str, f: &dyn Fn(&ManifestRow) -> &str| {
        col(StringChunked::from_iter_values(name.into(), rows.iter().map(f)).into_series())
    };
    let columns = vec![
        col(Series::new(
            "sample_id".into(),
            rows.iter().map(|r| r.sample_id).collect::<Vec<u64>>(),
        )),
        strs("key", &|r| &r.key),
        strs("source", &|r| &r.source),
        strs("kind", &|r| r.locator.kind()),
        col(Series::new("path".into(), path_c)),
        col(Series::new("tar_offset".into(), tar_off)),
        col(Series::new("tar_length".into(), tar_len)),
        col(Series::new("parquet_row".into(), pq_row)),
        strs("content_hash", &|r| &r.content_hash),
        col(Series::new(
            "bytes".into(),
            rows.iter().map(|r| r.bytes).collect::<Vec<u64>>(),
        )),
        strs("format", &|r| &r.format),
        col(Series::new(
            "width".into(),
            rows.iter().map(|r| r.width).collect::<Vec<u32>>(),
        )),
        col(Series::new(
            "height".into(),
            rows.iter().map(|r| r.height).collect::<Vec<u32>>(),
        )),
        col(Series::new(
            "label".into(),
            rows.iter().map(|r| r.label).collect::<Vec<Option<i32>>>(),
        )),
        col(Series::new(
            "label_name".into(),
            rows.iter()
                .map(|r| r.label_name.as_deref())
                .collect::<Vec<Option<&str>>>(),
        )),
        col(captions.finish().into_series()),
        strs("split", &|r| r.split.as_str()),
    ];
    let mut df = DataFrame::new(n, columns).map_err(pe(path))?;
    write_df(path, &mut df)
}

/// Writes a rejects file (`source`, `key`, `reason`, `message`) atomically: ingest's, and the tokenize stage's.
pub fn write_rejects_parquet(path: &Path, rows: &[RejectRow]) -> Result<()> {
    write_rejects(path, rows)
}

/// Writes `rejects.parquet`.
pub(crate) fn write_rejects(path: &Path, rows: &[RejectRow]) -> Result<()> {
    let strs = |name: &str, f: &dyn Fn(&RejectRow) -> String| {
        col(Series::new(name.into(), rows.iter().map(f).collect::<Vec<String>>()))
    };
    let columns = vec![
        strs("source", &|r| r.source.clone()),
        strs("key", &|r| r.key.clone()),
        strs("reason", &|r| r.reason.clone()),
        strs("message", &|r| r.message.clone()),
    ];
    let mut df = DataFrame::new(rows.len(), columns).map_err(pe(path))?;
    write_df(path, &mut df)
}

fn read_df(path: &Path) -> Result<DataFrame> {
    let f = File::open(path).at(path)?;
    ParquetReader::new(f).finish().map_err(pe(path))
}

fn column<'a>(df: &'a DataFrame, name: &str, path: &Path) -> Result<&'a Series> {
    df.column(name).map(|c| c.as_materialized_series()).map_err(pe(path))
}

/// Reads `samples.parquet`.
pub(crate) fn read_samples(path: &Path) -> Result<Vec<ManifestRow>> {
    let df = read_df(path)?;
    let e = pe(path);
    let sample_id = column(&df, "sample_id", path)?.u64().map_err(&e)?;
    let key = column(&df, "key", path)?.str().map_err(&e)?;
    let source = column(&df, "source", path)?.str().map_err(&e)?;
    let kind = column(&df, "kind", path)?.str().map_err(&e)?;
    let pathc = column(&df, "path", path)?.str().map_err(&e)?;
    let tar_off = column(&df, "tar_offset", path)?.u64().map_err(&e)?;
    let tar_len = column(&df, "tar_length", path)?.u64().map_err(&e)?;
    let pq_row = column(&df, "parquet_row", path)?.u64().map_err(&e)?;
    let hash = column(&df, "content_hash", path)?.str().map_err(&e)?;
    let bytes = column(&df, "bytes", path)?.u64().map_err(&e)?;
    let format = column(&df, "format", path)?.str().map_err(&e)?;
    let width = column(&df, "width", path)?.u32().map_err(&e)?;
    let height = column(&df, "height", path)?.u32().map_err(&e)?;
    let label = column(&df, "label", path)?.i32().map_err(&e)?;
    let label_name = column(&df, "label_name", path)?.str().map_err(&e)?;
    let captions = column(&df, "captions", path)?.list().map_err(&e)?;
    let split = column(&df, "split", path)?.str().map_err(&e)?;
    let bad = |row: usize, what: &str| Error::Parquet {
        path: path.to_path_buf(),
        reason: format!("row {row}: {what}"),
    };
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let caps = captions.get_as_series(i);
        let s = |c: &StringChunked| c.get(i).map(str::to_string);
        let locator_path = s(pathc).ok_or_else(|| bad(i, "null path"))?;
        let locator = match kind.get(i) {
            Some("file") => Locator::File { path: locator_path },
            Some("tar") => Locator::TarMember {
                tar: locator_path,
                offset: tar_off.get(i).ok_or_else(|| bad(i, "tar member without offset"))?,
                length: tar_len.get(i).ok_or_else(|| bad(i, "tar member without length"))?,
            },
            Some("parquet") => Locator::ParquetRow {
                file: locator_path,
                row: pq_row.get(i).ok_or_else(|| bad(i, "parquet source without row"))?,
            },
            other => return Err(bad(i, &format!("unknown kind {other:?}"))),
        };
        let captions = match caps {
            Some(c) => c.str().map_err(&e)?.iter().flatten().map(str::to_string).collect(),
            None => Vec::new(),
        };
        out.push(ManifestRow {
            sample_id: sample_id.get(i).ok_or_else(|| bad(i, "null sample_id"))?,
            key: s(key).unwrap_or_default(),
            source: s(source).unwrap_or_default(),
            locator,
            content_hash: s(hash).unwrap_or_default(),
            bytes: bytes.get(i).unwrap_or(0),
            format: s(format).unwrap_or_default(),
            width: width.get(i).unwrap_or(0),
            height: height.get(i).unwrap_or(0),
            label: label.get(i),
            label_name: s(label_name),
            captions,
            split: match split.get(i) {
                Some("val") => Split::Val,
                _ => Split::Train,
            },
        });
    }
    Ok(out)
}

/// Reads `rejects.parquet`.
pub(crate) fn read_rejects(path: &Path) -> Result<Vec<RejectRow>> {
    let df = read_df(path)?;
    let e = pe(path);
    let get = |name: &str| -> Result<Vec<String>> {
        Ok(column(&df, name, path)?
            .str()
            .map_err(&e)?
            .iter()
            .map(|s| s.unwrap_or("").to_string())
            .collect())
    };
    let (source, key, reason, message) = (get("source")?, get("key")?, get("reason")?, get("message")?);
    Ok(source
        .into_iter()
        .zip(key)
        .zip(reason)
        .zip(message)
        .map(|(((source, key), reason), message)| RejectRow {
            source,
            key,
            reason,
            message,
        })
        .collect())
}

/// One row of a Parquet image source.
pub(crate) struct ImageRow {
    pub bytes: Option<Vec<u8>>,
    pub path: Option<String>,
    pub captions: Vec<String>,
    pub label: Option<i64>,
}

fn string_list(s: &Series, i: usize) -> Vec<String> {
    match s.dtype() {
        DataType::String => s
            .str()
            .ok()
            .and_then(|c| c.get(i))
            .map(|v| vec![v.to_string()])
            .unwrap_or_default(),
        DataType::List(_) => s
            .list()
            .ok()
            .and_then(|l| l.get_as_series(i))
            .and_then(|inner| {
                inner
                    .str()
                    .ok()
                    .map(|c| c.iter().flatten().map(str::to_string).collect())
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Reads every row of a Parquet image source: the image column may be a struct `{bytes, path}` (Hugging Face
/// `datasets`) or plain binary.
pub(crate) fn read_image_rows(path: &Path, columns: &ParquetColumns) -> Result<Vec<ImageRow>> {
    let df = read_df(path)?;
    let e = pe(path);
    let image = column(&df, &columns.image, path)?;
    let (bytes_s, path_s): (Series, Option<Series>) = match image.dtype() {
        DataType::Struct(_) => {
            let st = image.struct_().map_err(&e)?;
            let b = st.field_by_name("bytes").map_err(&e)?;
            let p = st.field_by_name("path").ok();
            (b, p)
        }
        DataType::Binary => (image.clone(), None),
        other => {
            return Err(Error::Parquet {
                path: path.to_path_buf(),
                reason: format!(
                    "column '{}' is {other}, expected a struct {{bytes, path}} or binary",
                    columns.image
                ),
            })
        }
    };
    let bytes_c = bytes_s.binary().map_err(&e)?;
    let path_c = match &path_s {
        Some(p) if p.dtype() == &DataType::String => Some(p.str().map_err(&e)?),
        _ => None,
    };
    let caption_s = match &columns.caption {
        Some(c) => Some(column(&df, c, path)?),
        None => None,
    };
    let label_s = match &columns.label {
        Some(c) => Some(column(&df, c, path)?.cast(&DataType::Int64).map_err(&e)?),
        None => None,
    };
    let label_c = match &label_s {
        Some(s) => Some(s.i64().map_err(&e)?),
        None => None,
    };
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        out.push(ImageRow {
            bytes: bytes_c.get(i).map(<[u8]>::to_vec),
            path: path_c.and_then(|p| p.get(i)).map(str::to_string),
            captions: caption_s.map(|s| string_list(s, i)).unwrap_or_default(),
            label: label_c.and_then(|l| l.get(i)),
        });
    }
    Ok(out)
}

/// Reads a Parquet caption set: an image column (`image`, `file_name` or `path`) and a caption column
/// (`caption`, `captions` or `text`; string or list of strings).
pub(crate) fn read_caption_rows(path: &Path) -> Result<Vec<(String, Vec<String>)>> {
    let df = read_df(path)?;
    let e = pe(path);
    let names: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
    let find = |cands: &[&str]| names.iter().find(|n| cands.contains(&n.as_str())).cloned();
    let (Some(img), Some(cap)) = (
        find(&["image", "file_name", "path", "filepath"]),
        find(&["caption", "captions", "text"]),
    ) else {
        return Err(Error::Parquet {
            path: path.to_path_buf(),
            reason: format!("expected an image column (image/file_name/path) and a caption column (caption/captions/text), found {names:?}"),
        });
    };
    let img_c = column(&df, &img, path)?.str().map_err(&e)?;
    let cap_s = column(&df, &cap, path)?;
    Ok((0..df.height())
        .filter_map(|i| img_c.get(i).map(|im| (im.to_string(), string_list(cap_s, i))))
        .collect())
}

/// Writes a Parquet file of images in the Hugging Face `datasets` layout (`image: struct{bytes, path}`,
/// `caption`, `label`): used by tests and benchmarks to make Parquet sources.
pub fn write_image_parquet(path: &Path, rows: &[(Vec<u8>, String, String, i64)]) -> Result<()> {
    let n = rows.len();
    let bytes = Series::new(
        "bytes".into(),
        rows.iter().map(|r| r.0.clone()).collect::<Vec<Vec<u8>>>(),
    );
    let paths = Series::new("path".into(), rows.iter().map(|r| r.1.clone()).collect::<Vec<String>>());
    let image = StructChunked::from_series("image".into(), n, [bytes, paths].iter()).map_err(pe(path))?;
    let columns = vec![
        col(image.into_series()),
        col(Series::new(
            "caption".into(),
            rows.iter().map(|r| r.2.clone()).collect::<Vec<String>>(),
        )),
        col(Series::new(
            "label".into(),
            rows.iter().map(|r| r.3).collect::<Vec<i64>>(),
        )),
    ];
    let mut df = DataFrame::new(n, columns).map_err(pe(path))?;
    write_df(path, &mut df)
}
