//! URL lists: Parquet, CSV / TSV (with a header row), JSONL, or plain text with one URL per line. Every row
//! becomes one [`UrlRow`]; a row that cannot be read (no URL, a malformed JSON line) is kept with the reason, so
//! that it still gets its status row.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use polars::prelude::*;
use serde_json::{Map, Value};

use crate::error::{Error, IoContext, Result};

/// Which columns hold what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UrlColumns {
    /// The URL column (default `url`).
    pub url: String,
    /// The caption column. `None`: `caption` when the list has one, else no captions.
    pub caption: Option<String>,
}

impl Default for UrlColumns {
    fn default() -> Self {
        UrlColumns {
            url: "url".into(),
            caption: None,
        }
    }
}

/// One row of a URL list.
#[derive(Debug, Clone, PartialEq)]
pub struct UrlRow {
    /// Position in the list, from 0; the sample's key is this number, zero-padded.
    pub index: u64,
    /// The URL (empty when the row has none).
    pub url: String,
    /// The caption, if the list has a caption column and this row a value.
    pub caption: Option<String>,
    /// Every other column of the row, kept as JSON values.
    pub extra: Map<String, Value>,
    /// Why the row cannot be fetched (a malformed record), if so.
    pub bad: Option<String>,
}

/// The formats a URL list can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Parquet,
    Csv(u8),
    Jsonl,
    Text,
}

fn format_of(path: &Path) -> Result<Format> {
    let mut head = [0u8; 4];
    let n = File::open(path).at(path)?.read(&mut head).at(path)?;
    if n == 4 && &head == b"PAR1" {
        return Ok(Format::Parquet);
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "csv" => Ok(Format::Csv(b',')),
        "tsv" => Ok(Format::Csv(b'\t')),
        "jsonl" | "json" | "ndjson" => Ok(Format::Jsonl),
        "txt" => Ok(Format::Text),
        "parquet" => Err(Error::UrlList {
            path: path.to_path_buf(),
            reason: "named .parquet but has no Parquet magic (PAR1)".into(),
        }),
        _ => Err(Error::UrlList {
            path: path.to_path_buf(),
            reason: "unknown URL list format: expected .parquet, .csv, .tsv, .jsonl or .txt (one URL per line)".into(),
        }),
    }
}

/// Reads a URL list.
pub fn read_url_list(path: &Path, columns: &UrlColumns) -> Result<Vec<UrlRow>> {
    match format_of(path)? {
        Format::Parquet => read_parquet(path, columns),
        Format::Csv(delim) => read_csv(path, delim, columns),
        Format::Jsonl => read_jsonl(path, columns),
        Format::Text => read_text(path),
    }
}

fn list_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::UrlList {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Checks that the asked columns exist among `names`; returns the caption column to use.
fn resolve_columns(path: &Path, names: &[String], columns: &UrlColumns) -> Result<Option<String>> {
    if !names.contains(&columns.url) {
        return Err(list_err(
            path,
            format!(
                "no URL column '{}' (columns: {}); name it with --url-column",
                columns.url,
                names.join(", ")
            ),
        ));
    }
    match &columns.caption {
        Some(c) if !names.contains(c) => Err(list_err(
            path,
            format!("no caption column '{c}' (columns: {})", names.join(", ")),
        )),
        Some(c) => Ok(Some(c.clone())),
        None => Ok(names.iter().find(|n| *n == "caption").cloned()),
    }
}

fn row(index: u64, url: Option<String>, caption: Option<String>, extra: Map<String, Value>) -> UrlRow {
    let url = url.map(|u| u.trim().to_string()).unwrap_or_default();
    let bad = url.is_empty().then(|| "no URL in this row".to_string());
    UrlRow {
        index,
        url,
        caption: caption.filter(|c| !c.trim().is_empty()),
        extra,
        bad,
    }
}

fn read_csv(path: &Path, delim: u8, columns: &UrlColumns) -> Result<Vec<UrlRow>> {
    let file = File::open(path).at(path)?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delim)
        .has_headers(true)
        .flexible(true)
        .from_reader(file);
    let names: Vec<String> = reader
        .headers()
        .map_err(|e| list_err(path, format!("cannot read the header row: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let caption = resolve_columns(path, &names, columns)?;
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let index = i as u64;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let mut r = row(index, None, None, Map::new());
                r.bad = Some(format!("malformed row: {e}"));
                out.push(r);
                continue;
            }
        };
        let (mut url, mut cap, mut extra) = (None, None, Map::new());
        for (name, value) in names.iter().zip(record.iter()) {
            if *name == columns.url {
                url = Some(value.to_string());
            } else if caption.as_ref() == Some(name) {
                cap = Some(value.to_string());
            } else {
                extra.insert(name.clone(), Value::String(value.to_string()));
            }
        }
        out.push(row(index, url, cap, extra));
    }
    Ok(out)
}

fn read_jsonl(path: &Path, columns: &UrlColumns) -> Result<Vec<UrlRow>> {
    let reader = BufReader::new(File::open(path).at(path)?);
    let mut out = Vec::new();
    let mut index = 0u64;
    for (n, line) in reader.lines().enumerate() {
        let line = line.at(path)?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(&line);
        let r = match parsed {
            Ok(Value::Object(mut obj)) => {
                let url = obj.remove(&columns.url);
                let cap_name = columns.caption.clone().unwrap_or_else(|| "caption".into());
                let cap = obj.remove(&cap_name);
                let mut r = row(
                    index,
                    url.as_ref().and_then(Value::as_str).map(str::to_string),
                    None,
                    obj,
                );
                r.caption = cap
                    .and_then(|c| c.as_str().map(str::to_string))
                    .filter(|c| !c.trim().is_empty());
                if url.is_none() {
                    let have: Vec<&String> = r.extra.keys().collect();
                    r.bad = Some(format!("line {}: no field '{}' (fields: {have:?})", n + 1, columns.url));
                } else if r.url.is_empty() {
                    r.bad = Some(format!(
                        "line {}: field '{}' is not a non-empty string",
                        n + 1,
                        columns.url
                    ));
                }
                r
            }
            Ok(_) => {
                let mut r = row(index, None, None, Map::new());
                r.bad = Some(format!("line {}: not a JSON object", n + 1));
                r
            }
            Err(e) => {
                let mut r = row(index, None, None, Map::new());
                r.bad = Some(format!("line {}: {e}", n + 1));
                r
            }
        };
        out.push(r);
        index += 1;
    }
    // A list where no line has the URL field is a wrong --url-column, not a list of bad rows.
    if !out.is_empty()
        && out
            .iter()
            .all(|r| r.bad.as_deref().is_some_and(|b| b.contains("no field")))
    {
        return Err(list_err(
            path,
            format!(
                "no line has the URL field '{}' ({}); name it with --url-column",
                columns.url,
                out[0].bad.as_deref().unwrap_or_default()
            ),
        ));
    }
    Ok(out)
}

fn read_text(path: &Path) -> Result<Vec<UrlRow>> {
    let reader = BufReader::new(File::open(path).at(path)?);
    let mut out = Vec::new();
    for line in reader.lines() {
        let line = line.at(path)?;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        out.push(row(out.len() as u64, Some(line), None, Map::new()));
    }
    Ok(out)
}

fn read_parquet(path: &Path, columns: &UrlColumns) -> Result<Vec<UrlRow>> {
    let f = File::open(path).at(path)?;
    let df = ParquetReader::new(f)
        .finish()
        .map_err(|e| list_err(path, e.to_string()))?;
    let names: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
    let caption = resolve_columns(path, &names, columns)?;
    let as_strings = |name: &str| -> Result<Vec<Option<String>>> {
        let s = df
            .column(name)
            .map_err(|e| list_err(path, e.to_string()))?
            .as_materialized_series()
            .cast(&DataType::String)
            .map_err(|e| list_err(path, format!("column '{name}': {e}")))?;
        let c = s.str().map_err(|e| list_err(path, e.to_string()))?;
        Ok((0..c.len()).map(|i| c.get(i).map(str::to_string)).collect())
    };
    let urls = as_strings(&columns.url)?;
    let caps = match &caption {
        Some(c) => Some(as_strings(c)?),
        None => None,
    };
    let mut extras: Vec<(String, Series)> = Vec::new();
    for name in &names {
        if *name != columns.url && caption.as_ref() != Some(name) {
            let s = df
                .column(name)
                .map_err(|e| list_err(path, e.to_string()))?
                .as_materialized_series()
                .clone();
            extras.push((name.clone(), s));
        }
    }
    let mut out = Vec::with_capacity(df.height());
    for (i, url) in urls.into_iter().enumerate() {
        let mut extra = Map::new();
        for (name, s) in &extras {
            let v = s.get(i).map(any_to_json).unwrap_or(Value::Null);
            extra.insert(name.clone(), v);
        }
        let cap = caps.as_ref().and_then(|c| c[i].clone());
        out.push(row(i as u64, url, cap, extra));
    }
    Ok(out)
}

fn any_to_json(v: AnyValue<'_>) -> Value {
    match v {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(b),
        AnyValue::String(s) => Value::String(s.to_string()),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::Int8(x) => x.into(),
        AnyValue::Int16(x) => x.into(),
        AnyValue::Int32(x) => x.into(),
        AnyValue::Int64(x) => x.into(),
        AnyValue::UInt8(x) => x.into(),
        AnyValue::UInt16(x) => x.into(),
        AnyValue::UInt32(x) => x.into(),
        AnyValue::UInt64(x) => x.into(),
        AnyValue::Float32(x) => serde_json::Number::from_f64(f64::from(x)).map_or(Value::Null, Value::Number),
        AnyValue::Float64(x) => serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number),
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_keeps_extra_columns_and_marks_rows_without_url() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("list.csv");
        std::fs::write(&p, "url,caption,width\nhttp://a/x.jpg,a cat,10\n,no url,3\n").expect("write");
        let rows = read_url_list(&p, &UrlColumns::default()).expect("read");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].caption.as_deref(), Some("a cat"));
        assert_eq!(rows[0].extra["width"], Value::String("10".into()));
        assert_eq!(rows[1].bad.as_deref(), Some("no URL in this row"));
    }

    #[test]
    fn a_missing_url_column_is_named_with_the_columns_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("list.tsv");
        std::fs::write(&p, "link\ttext\nhttp://a/x.jpg\tx\n").expect("write");
        let err = read_url_list(&p, &UrlColumns::default()).expect_err("no url column");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: no URL column 'url' (columns: link, text); name it with --url-column",
                p.display()
            )
        );
    }

    #[test]
    fn parquet_lists_keep_typed_extra_columns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("list.parquet");
        let mut df = DataFrame::new_infer_height(vec![
            Column::from(Series::new("URL".into(), ["http://a/1.jpg", "http://a/2.jpg"])),
            Column::from(Series::new("TEXT".into(), [Some("one"), None])),
            Column::from(Series::new("width".into(), [640i64, 480])),
        ])
        .expect("frame");
        imglish_ingest::write_parquet(&p, &mut df).expect("write");
        let columns = UrlColumns {
            url: "URL".into(),
            caption: Some("TEXT".into()),
        };
        let rows = read_url_list(&p, &columns).expect("read");
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].caption.as_deref(), rows[1].caption.as_deref()),
            (Some("one"), None)
        );
        assert_eq!(rows[1].extra["width"], Value::from(480));
        assert!(rows.iter().all(|r| r.bad.is_none()));
    }

    #[test]
    fn jsonl_bad_lines_stay_rows_with_their_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("list.jsonl");
        std::fs::write(
            &p,
            "{\"url\": \"http://a/1.jpg\", \"caption\": \"c\", \"id\": 7}\n{oops\n[1]\n",
        )
        .expect("write");
        let rows = read_url_list(&p, &UrlColumns::default()).expect("read");
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].extra["id"], Value::from(7));
        assert!(rows[1].bad.as_deref().is_some_and(|b| b.starts_with("line 2: ")));
        assert_eq!(rows[2].bad.as_deref(), Some("line 3: not a JSON object"));
    }
}
