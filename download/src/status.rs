//! The per-URL status table (`status.parquet`, and one `shard-NNNNN.status.parquet` per shard while running)
//! and the tar shards' members.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// One URL's outcome: a row of the status table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRow {
    /// Position in the URL list, from 0.
    pub index: u64,
    /// The sample's key in its tar shard (`index`, zero-padded to 9 digits).
    pub key: String,
    /// The shard file (`shard-00000.tar`) the row belongs to.
    pub shard: String,
    /// The URL as listed.
    pub url: String,
    /// The caption, if listed.
    pub caption: Option<String>,
    /// `success` or `failed`.
    pub status: String,
    /// For failures: `http-404`, `timeout`, `too-large`, `not-an-image`, `opt-out`, ... (docs/download.md).
    pub reason: Option<String>,
    /// The last HTTP status received, if any.
    pub http_status: Option<u16>,
    /// Body bytes kept (0 for failures).
    pub bytes: u64,
    /// sha256 of the image bytes, hex.
    pub sha256: Option<String>,
    /// `jpeg`, `png`, ... as sniffed from the bytes.
    pub format: Option<String>,
    /// Image width as stored.
    pub width: Option<u32>,
    /// Image height as stored.
    pub height: Option<u32>,
    /// The response's `Content-Type`.
    pub content_type: Option<String>,
    /// The URL the image came from after redirects.
    pub final_url: Option<String>,
    /// Attempts made (retries + 1); 0 for rows never fetched.
    pub attempts: u32,
    /// What exactly went wrong.
    pub error: Option<String>,
    /// The list's other columns for this row, as a JSON object.
    pub extra: String,
}

impl StatusRow {
    /// Whether the image was stored.
    pub fn ok(&self) -> bool {
        self.status == "success"
    }
}

fn col<T: Into<Series>>(s: T) -> Column {
    Column::from(s.into())
}

fn pe(path: &Path) -> impl Fn(PolarsError) -> Error + '_ {
    move |e| Error::UrlList {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes `rows` to `path` atomically.
pub(crate) fn write_status(path: &Path, rows: &[StatusRow]) -> Result<()> {
    let s = |f: fn(&StatusRow) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
    let mut df = DataFrame::new_infer_height(vec![
        col(Series::new(
            "index".into(),
            rows.iter().map(|r| r.index).collect::<Vec<_>>(),
        )),
        col(Series::new("key".into(), s(|r| Some(r.key.as_str())))),
        col(Series::new("shard".into(), s(|r| Some(r.shard.as_str())))),
        col(Series::new("url".into(), s(|r| Some(r.url.as_str())))),
        col(Series::new("caption".into(), s(|r| r.caption.as_deref()))),
        col(Series::new("status".into(), s(|r| Some(r.status.as_str())))),
        col(Series::new("reason".into(), s(|r| r.reason.as_deref()))),
        col(Series::new(
            "http_status".into(),
            rows.iter().map(|r| r.http_status.map(u32::from)).collect::<Vec<_>>(),
        )),
        col(Series::new(
            "bytes".into(),
            rows.iter().map(|r| r.bytes).collect::<Vec<_>>(),
        )),
        col(Series::new("sha256".into(), s(|r| r.sha256.as_deref()))),
        col(Series::new("format".into(), s(|r| r.format.as_deref()))),
        col(Series::new(
            "width".into(),
            rows.iter().map(|r| r.width).collect::<Vec<_>>(),
        )),
        col(Series::new(
            "height".into(),
            rows.iter().map(|r| r.height).collect::<Vec<_>>(),
        )),
        col(Series::new("content_type".into(), s(|r| r.content_type.as_deref()))),
        col(Series::new("final_url".into(), s(|r| r.final_url.as_deref()))),
        col(Series::new(
            "attempts".into(),
            rows.iter().map(|r| r.attempts).collect::<Vec<_>>(),
        )),
        col(Series::new("error".into(), s(|r| r.error.as_deref()))),
        col(Series::new("extra".into(), s(|r| Some(r.extra.as_str())))),
    ])
    .map_err(pe(path))?;
    imglish_ingest::write_parquet(path, &mut df)?;
    Ok(())
}

/// Reads a status table written by [`write_status`].
pub fn read_status(path: &Path) -> Result<Vec<StatusRow>> {
    let e = pe(path);
    let df = ParquetReader::new(File::open(path).at(path)?).finish().map_err(&e)?;
    let get = |name: &str| -> Result<Series> { Ok(df.column(name).map_err(&e)?.as_materialized_series().clone()) };
    let strs = |name: &str| -> Result<Vec<Option<String>>> {
        let s = get(name)?;
        let c = s.str().map_err(&e)?;
        Ok((0..c.len()).map(|i| c.get(i).map(str::to_string)).collect())
    };
    let u64s = |name: &str| -> Result<Vec<Option<u64>>> {
        let s = get(name)?.cast(&DataType::UInt64).map_err(&e)?;
        let c = s.u64().map_err(&e)?;
        Ok((0..c.len()).map(|i| c.get(i)).collect())
    };
    let (index, key, shard, url, caption) = (
        u64s("index")?,
        strs("key")?,
        strs("shard")?,
        strs("url")?,
        strs("caption")?,
    );
    let (status, reason, http, bytes) = (strs("status")?, strs("reason")?, u64s("http_status")?, u64s("bytes")?);
    let (sha, format, width, height) = (strs("sha256")?, strs("format")?, u64s("width")?, u64s("height")?);
    let (ctype, final_url, attempts, error, extra) = (
        strs("content_type")?,
        strs("final_url")?,
        u64s("attempts")?,
        strs("error")?,
        strs("extra")?,
    );
    Ok((0..df.height())
        .map(|i| StatusRow {
            index: index[i].unwrap_or(0),
            key: key[i].clone().unwrap_or_default(),
            shard: shard[i].clone().unwrap_or_default(),
            url: url[i].clone().unwrap_or_default(),
            caption: caption[i].clone(),
            status: status[i].clone().unwrap_or_default(),
            reason: reason[i].clone(),
            http_status: http[i].map(|v| v as u16),
            bytes: bytes[i].unwrap_or(0),
            sha256: sha[i].clone(),
            format: format[i].clone(),
            width: width[i].map(|v| v as u32),
            height: height[i].map(|v| v as u32),
            content_type: ctype[i].clone(),
            final_url: final_url[i].clone(),
            attempts: attempts[i].unwrap_or(0) as u32,
            error: error[i].clone(),
            extra: extra[i].clone().unwrap_or_else(|| "{}".into()),
        })
        .collect())
}

/// The members of one sample in a tar shard: (member name, bytes).
pub(crate) type Members = Vec<(String, Vec<u8>)>;

/// Reads a tar shard written by this crate into members grouped by key.
pub(crate) fn read_tar_groups(path: &Path) -> Result<BTreeMap<String, Members>> {
    let mut out: BTreeMap<String, Members> = BTreeMap::new();
    let file = File::open(path).at(path)?;
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries().at(path)? {
        let mut entry = entry.at(path)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let key = name.split('.').next().unwrap_or_default().to_string();
        let mut data = Vec::with_capacity(entry.size().min(1 << 30) as usize);
        entry.read_to_end(&mut data).at(path)?;
        out.entry(key).or_default().push((name, data));
    }
    Ok(out)
}

/// A tar archive of `groups` in order, with fixed metadata (mode 0644, mtime 0, owner 0) so that the same
/// samples give the same bytes.
pub(crate) fn tar_bytes<'a>(groups: impl Iterator<Item = &'a Members>) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for members in groups {
        for (name, data) in members {
            imglish_ingest::tar_append(&mut builder, name, data)?;
        }
    }
    builder.into_inner()
}
