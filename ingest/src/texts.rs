//! Text-only corpora (`ingest --texts`): plain text (one document per line), JSONL (a string field per record)
//! and Parquet (a string column). Every document is checked (UTF-8, not empty, not oversized, not a duplicate
//! by sha256); accepted ones go to `texts.parquet`, the others are rejects with a reason code, like images.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::parquet_io::{RejectRow, Split};

/// Where the text of each record is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextOptions {
    /// The JSONL field holding the document (default `text`).
    pub field: String,
    /// The Parquet column holding the document (default `text`).
    pub column: String,
    /// Documents longer than this many bytes are rejects (`too-large`); the default is 1 MiB.
    pub max_bytes: usize,
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions {
            field: "text".into(),
            column: "text".into(),
            max_bytes: 1 << 20,
        }
    }
}

/// One accepted document (`texts.parquet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRow {
    /// Stable id from the source and the key (`line-N` or `row-N`, 1-based lines).
    pub sample_id: u64,
    /// The source file, as given.
    pub source: String,
    /// `line-N` (plain text, JSONL) or `row-N` (Parquet).
    pub key: String,
    /// Train or validation.
    pub split: Split,
    /// The document.
    pub text: String,
    /// sha256 of the document's UTF-8 bytes, hex.
    pub sha256: String,
}

/// A document read from a source, before the checks.
struct Raw {
    source: String,
    key: String,
    text: std::result::Result<String, (String, String)>,
}

fn reject(source: &str, key: &str, reason: &str, message: String) -> RejectRow {
    RejectRow {
        source: source.to_string(),
        key: key.to_string(),
        reason: reason.to_string(),
        message,
    }
}

/// The format of a text source, from its extension.
fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "ndjson" | "json")
    )
}

fn is_parquet(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("parquet")
}

fn read_lines(path: &Path, source: &str, options: &TextOptions, jsonl: bool, out: &mut Vec<Raw>) -> Result<()> {
    let file = std::fs::File::open(path).at(path)?;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).at(path)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let key = format!("line-{line_no}");
        let text = match std::str::from_utf8(&buf) {
            Err(e) => Err(("invalid-utf8".to_string(), format!("not UTF-8: {e}"))),
            Ok(s) if !jsonl => Ok(s.to_string()),
            Ok(s) if s.trim().is_empty() => Err(("empty".to_string(), "empty line".to_string())),
            Ok(s) => match serde_json::from_str::<serde_json::Value>(s) {
                Err(e) => Err(("bad-record".to_string(), format!("not a JSON record: {e}"))),
                Ok(v) => match v.get(&options.field) {
                    Some(serde_json::Value::String(t)) => Ok(t.clone()),
                    Some(other) => Err((
                        "bad-record".to_string(),
                        format!("field '{}' is not a string ({other})", options.field),
                    )),
                    None => Err((
                        "bad-record".to_string(),
                        format!("no field '{}' (use --text-field to name the field)", options.field),
                    )),
                },
            },
        };
        out.push(Raw {
            source: source.to_string(),
            key,
            text,
        });
    }
    Ok(())
}

fn read_parquet(path: &Path, source: &str, options: &TextOptions, out: &mut Vec<Raw>) -> Result<()> {
    let pe = |e: PolarsError| Error::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).at(path)?;
    let df = ParquetReader::new(file).finish().map_err(pe)?;
    let column = df.column(&options.column).map_err(|_| Error::Parquet {
        path: path.to_path_buf(),
        reason: format!(
            "no column '{}' (columns: {}; use --text-column)",
            options.column,
            df.get_column_names()
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })?;
    let strings = column.str().map_err(|_| Error::Parquet {
        path: path.to_path_buf(),
        reason: format!("column '{}' is not a string column", options.column),
    })?;
    for (i, v) in strings.iter().enumerate() {
        out.push(Raw {
            source: source.to_string(),
            key: format!("row-{i}"),
            text: v
                .map(str::to_string)
                .ok_or_else(|| ("empty".to_string(), "null value".to_string())),
        });
    }
    Ok(())
}

/// What reading the text sources gave.
#[derive(Debug, Default)]
pub struct TextIngest {
    /// Accepted documents, in source order.
    pub rows: Vec<TextRow>,
    /// Rejected documents.
    pub rejects: Vec<RejectRow>,
}

/// Reads and checks every document of `sources`; `split` assigns the split from the sample's key.
pub fn read_texts(
    sources: &[PathBuf],
    options: &TextOptions,
    split: &dyn Fn(&str, &str) -> Split,
) -> Result<TextIngest> {
    let mut raw = Vec::new();
    for path in sources {
        let source = path.display().to_string();
        if is_parquet(path) {
            read_parquet(path, &source, options, &mut raw)?;
        } else {
            read_lines(path, &source, options, is_jsonl(path), &mut raw)?;
        }
    }
    let mut out = TextIngest::default();
    let mut seen: HashMap<[u8; 32], (String, String)> = HashMap::new();
    for r in raw {
        let text = match r.text {
            Ok(t) => t,
            Err((reason, message)) => {
                out.rejects.push(reject(&r.source, &r.key, &reason, message));
                continue;
            }
        };
        if text.trim().is_empty() {
            out.rejects
                .push(reject(&r.source, &r.key, "empty", "empty document".into()));
            continue;
        }
        if text.len() > options.max_bytes {
            out.rejects.push(reject(
                &r.source,
                &r.key,
                "too-large",
                format!("{} bytes, more than --max-text-bytes {}", text.len(), options.max_bytes),
            ));
            continue;
        }
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if let Some((src, key)) = seen.get(&digest) {
            out.rejects.push(reject(
                &r.source,
                &r.key,
                "duplicate",
                format!("same text as {src} {key}"),
            ));
            continue;
        }
        seen.insert(digest, (r.source.clone(), r.key.clone()));
        out.rows.push(TextRow {
            sample_id: crate::run::sample_id(&r.source, &r.key),
            split: split(&r.source, &r.key),
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
            source: r.source,
            key: r.key,
            text,
        });
    }
    Ok(out)
}

/// The file name of the accepted documents in a manifest directory.
pub const TEXTS_FILE: &str = "texts.parquet";

/// Writes `texts.parquet` (temporary name, fsync, rename).
pub fn write_texts(path: &Path, rows: &[TextRow]) -> Result<()> {
    let s = |name: &str, f: &dyn Fn(&TextRow) -> &str| {
        Column::from(Series::new(
            name.into(),
            rows.iter().map(|r| f(r).to_string()).collect::<Vec<String>>(),
        ))
    };
    let mut df = DataFrame::new(
        rows.len(),
        vec![
            Column::from(Series::new(
                "sample_id".into(),
                rows.iter().map(|r| r.sample_id).collect::<Vec<u64>>(),
            )),
            s("source", &|r| &r.source),
            s("key", &|r| &r.key),
            s("split", &|r| r.split.as_str()),
            s("text", &|r| &r.text),
            s("sha256", &|r| &r.sha256),
        ],
    )
    .map_err(|e| Error::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::parquet_io::write_df(path, &mut df)
}

/// Reads `texts.parquet`; a manifest without one has no text documents.
pub fn read_texts_file(path: &Path) -> Result<Vec<TextRow>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let pe = |e: PolarsError| Error::Parquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).at(path)?;
    let df = ParquetReader::new(file).finish().map_err(pe)?;
    let strs = |name: &str| -> Result<Vec<String>> {
        let c = df.column(name).map_err(pe)?;
        let s = c.str().map_err(pe)?;
        Ok(s.iter().map(|v| v.unwrap_or_default().to_string()).collect())
    };
    let ids: Vec<u64> = df
        .column("sample_id")
        .map_err(pe)?
        .u64()
        .map_err(pe)?
        .iter()
        .map(|v| v.unwrap_or_default())
        .collect();
    let (sources, keys, splits, texts, hashes) = (
        strs("source")?,
        strs("key")?,
        strs("split")?,
        strs("text")?,
        strs("sha256")?,
    );
    Ok(ids
        .into_iter()
        .enumerate()
        .map(|(i, sample_id)| TextRow {
            sample_id,
            source: sources[i].clone(),
            key: keys[i].clone(),
            split: if splits[i] == "val" { Split::Val } else { Split::Train },
            text: texts[i].clone(),
            sha256: hashes[i].clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_line_is_a_reject_and_counts_add_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let txt = dir.path().join("docs.txt");
        let mut bytes = b"first document\n\n   \nsecond document\nfirst document\n".to_vec();
        bytes.extend_from_slice(b"\xff\xfe broken\n");
        bytes.extend_from_slice(&[b'x'; 40]);
        bytes.push(b'\n');
        std::fs::write(&txt, bytes).expect("write");
        let jsonl = dir.path().join("docs.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"a json document\"}\n{\"body\": \"wrong field\"}\nnot json\n{\"text\": 3}\n\n",
        )
        .expect("write");
        let options = TextOptions {
            max_bytes: 30,
            ..TextOptions::default()
        };
        let got = read_texts(&[txt.clone(), jsonl.clone()], &options, &|_, _| Split::Train).expect("read");
        let accepted: Vec<(&str, &str)> = got.rows.iter().map(|r| (r.key.as_str(), r.text.as_str())).collect();
        assert_eq!(
            accepted,
            [
                ("line-1", "first document"),
                ("line-4", "second document"),
                ("line-1", "a json document")
            ]
        );
        let reasons: Vec<(String, &str)> = got
            .rejects
            .iter()
            .map(|r| {
                (
                    format!(
                        "{}:{}",
                        Path::new(&r.source).extension().and_then(|e| e.to_str()).unwrap_or(""),
                        r.key
                    ),
                    r.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            reasons,
            [
                ("txt:line-2".to_string(), "empty"),
                ("txt:line-3".to_string(), "empty"),
                ("txt:line-5".to_string(), "duplicate"),
                ("txt:line-6".to_string(), "invalid-utf8"),
                ("txt:line-7".to_string(), "too-large"),
                ("jsonl:line-2".to_string(), "bad-record"),
                ("jsonl:line-3".to_string(), "bad-record"),
                ("jsonl:line-4".to_string(), "bad-record"),
                ("jsonl:line-5".to_string(), "empty"),
            ]
        );
        assert_eq!(got.rows.len() + got.rejects.len(), 7 + 5);
        let dup = &got.rejects[2];
        assert_eq!(dup.message, format!("same text as {} line-1", txt.display()));
        assert_eq!(
            got.rejects[5].message,
            "no field 'text' (use --text-field to name the field)"
        );

        // texts.parquet round trip.
        let out = dir.path().join(TEXTS_FILE);
        write_texts(&out, &got.rows).expect("write");
        assert_eq!(read_texts_file(&out).expect("read"), got.rows);
    }
}
