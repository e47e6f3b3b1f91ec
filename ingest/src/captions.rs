//! Caption sets: COCO captions JSON, JSONL, CSV/TSV and Parquet, joined to images by relative path or stem.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::sources::normalize_label;
use crate::validate::{Reason, Rejection};

/// How caption rows are matched to images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JoinOn {
    /// The image's path relative to its source (`class/img.jpg`), or the tar member / Parquet `path`.
    #[default]
    Path,
    /// The file name without directory and extension (`img`): joins tar shards to path-keyed captions.
    Stem,
}

impl JoinOn {
    /// The join key of an image reference under this mode.
    pub(crate) fn key(self, reference: &str) -> String {
        let cleaned = reference.replace('\\', "/");
        let cleaned = cleaned.trim_start_matches("./");
        match self {
            JoinOn::Path => cleaned.to_string(),
            JoinOn::Stem => {
                let base = cleaned.rsplit('/').next().unwrap_or(cleaned);
                match base.rsplit_once('.') {
                    Some((stem, _)) if !stem.is_empty() => stem.to_string(),
                    _ => base.to_string(),
                }
            }
        }
    }
}

/// Whether a CSV/TSV caption file has a header row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsvHeader {
    /// A header if the first row names a caption column and an image column.
    #[default]
    Auto,
    /// The first row is a header.
    Yes,
    /// No header: column 0 is the caption, column 1 the image path (CC3M order).
    No,
}

/// One caption file, parsed.
#[derive(Debug, Default)]
pub(crate) struct CaptionSet {
    /// The file, as given.
    pub label: String,
    /// (image reference as written, captions) in file order; the same image may appear several times.
    pub entries: Vec<(String, Vec<String>)>,
    /// Malformed rows: (row description, problem).
    pub bad_rows: Vec<(String, Rejection)>,
}

const IMAGE_FIELDS: [&str; 5] = ["image", "file_name", "path", "filepath", "url"];
const TEXT_FIELDS: [&str; 4] = ["caption", "captions", "text", "title"];

fn json_captions(v: &serde_json::Value) -> Option<Vec<String>> {
    match v {
        serde_json::Value::String(s) => Some(vec![s.clone()]),
        serde_json::Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

/// Reads a caption file; the format comes from the extension (`.json` COCO, `.jsonl`, `.csv`, `.tsv`,
/// `.parquet`).
pub(crate) fn read_caption_file(path: &Path, header: CsvHeader) -> Result<CaptionSet> {
    let label = normalize_label(path);
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let mut set = CaptionSet {
        label,
        ..Default::default()
    };
    match ext.as_str() {
        "json" => read_coco(path, &mut set)?,
        "jsonl" | "ndjson" => read_jsonl(path, &mut set)?,
        "csv" => read_csv(path, b',', header, &mut set)?,
        "tsv" => read_csv(path, b'\t', header, &mut set)?,
        "parquet" => {
            for (image, captions) in crate::parquet_io::read_caption_rows(path)? {
                set.entries.push((image, captions));
            }
        }
        _ => {
            return Err(Error::Config {
                option: "--captions".into(),
                reason: format!(
                    "{}: unknown caption format (expected .json COCO, .jsonl, .csv, .tsv or .parquet)",
                    path.display()
                ),
            })
        }
    }
    Ok(set)
}

fn read_coco(path: &Path, set: &mut CaptionSet) -> Result<()> {
    let bytes = std::fs::read(path).at(path)?;
    let bad = |reason: String| Error::Config {
        option: "--captions".into(),
        reason: format!("{}: not a COCO captions file: {reason}", path.display()),
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let images = v
        .get("images")
        .and_then(|i| i.as_array())
        .ok_or_else(|| bad("no images[] array".into()))?;
    let annotations = v
        .get("annotations")
        .and_then(|a| a.as_array())
        .ok_or_else(|| bad("no annotations[] array".into()))?;
    let mut by_id: BTreeMap<i64, (usize, String)> = BTreeMap::new();
    let mut order: Vec<(String, Vec<String>)> = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let id = img.get("id").and_then(|x| x.as_i64());
        let name = img.get("file_name").and_then(|x| x.as_str());
        match (id, name) {
            (Some(id), Some(name)) => {
                by_id.insert(id, (order.len(), name.to_string()));
                order.push((name.to_string(), Vec::new()));
            }
            _ => set.bad_rows.push((
                format!("images[{i}]"),
                Rejection::new(Reason::BadRecord, "image entry without an integer id and a file_name"),
            )),
        }
    }
    for (i, a) in annotations.iter().enumerate() {
        let image_id = a.get("image_id").and_then(|x| x.as_i64());
        let caption = a.get("caption").and_then(|x| x.as_str());
        match (image_id.and_then(|id| by_id.get(&id)), caption) {
            (Some((pos, _)), Some(c)) => order[*pos].1.push(c.trim().to_string()),
            (None, _) => set.bad_rows.push((
                format!("annotations[{i}]"),
                Rejection::new(Reason::BadRecord, "annotation refers to no image in images[]"),
            )),
            (_, None) => set.bad_rows.push((
                format!("annotations[{i}]"),
                Rejection::new(Reason::BadRecord, "annotation without a caption string"),
            )),
        }
    }
    set.entries.extend(order);
    Ok(())
}

fn read_jsonl(path: &Path, set: &mut CaptionSet) -> Result<()> {
    let text = std::fs::read_to_string(path).at(path)?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = format!("line {}", i + 1);
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                set.bad_rows
                    .push((row, Rejection::new(Reason::BadRecord, format!("invalid JSON: {e}"))));
                continue;
            }
        };
        let image = IMAGE_FIELDS.iter().find_map(|f| v.get(*f).and_then(|x| x.as_str()));
        let captions = TEXT_FIELDS.iter().find_map(|f| v.get(*f).and_then(json_captions));
        match (image, captions) {
            (Some(img), Some(caps)) => set.entries.push((img.to_string(), caps)),
            _ => {
                let fields: Vec<&str> = v
                    .as_object()
                    .map(|o| o.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                set.bad_rows.push((
                    row,
                    Rejection::new(
                        Reason::BadRecord,
                        format!(
                            "expected {{\"image\": ..., \"caption\": ...}} or \"captions\": [...] (image fields: {}; \
                             caption fields: {}); this line has: {}",
                            IMAGE_FIELDS.join(", "),
                            TEXT_FIELDS.join(", "),
                            if fields.is_empty() {
                                "no fields".to_string()
                            } else {
                                fields.join(", ")
                            }
                        ),
                    ),
                ))
            }
        }
    }
    Ok(())
}

fn read_csv(path: &Path, delimiter: u8, header: CsvHeader, set: &mut CaptionSet) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .quoting(delimiter == b',')
        .from_path(path)
        .map_err(|e| Error::Config {
            option: "--captions".into(),
            reason: format!("{}: {e}", path.display()),
        })?;
    let mut records = reader.records().enumerate().peekable();
    let (mut text_col, mut image_col) = (0usize, 1usize);
    if let Some((_, Ok(first))) = records.peek() {
        let lower: Vec<String> = first.iter().map(|f| f.trim().to_ascii_lowercase()).collect();
        let t = lower.iter().position(|f| TEXT_FIELDS.contains(&f.as_str()));
        let im = lower.iter().position(|f| IMAGE_FIELDS.contains(&f.as_str()));
        let is_header = match header {
            CsvHeader::Yes => true,
            CsvHeader::No => false,
            CsvHeader::Auto => t.is_some() && im.is_some(),
        };
        if is_header {
            match (t, im) {
                (Some(t), Some(im)) => (text_col, image_col) = (t, im),
                _ => {
                    return Err(Error::Config {
                        option: "--captions".into(),
                        reason: format!(
                            "{}: header has no caption column ({}) and image column ({})",
                            path.display(),
                            TEXT_FIELDS.join("/"),
                            IMAGE_FIELDS.join("/")
                        ),
                    })
                }
            }
            records.next();
        }
    }
    for (i, rec) in records {
        let row = format!("line {}", i + 1);
        match rec {
            Ok(r) => match (r.get(text_col), r.get(image_col)) {
                (Some(t), Some(im)) if !im.trim().is_empty() => {
                    set.entries.push((im.trim().to_string(), vec![t.trim().to_string()]));
                }
                _ => set.bad_rows.push((
                    row,
                    Rejection::new(Reason::BadRecord, "row has no caption or no image path"),
                )),
            },
            Err(e) => set
                .bad_rows
                .push((row, Rejection::new(Reason::BadRecord, e.to_string()))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_keys() {
        assert_eq!(JoinOn::Path.key("./circle/a.jpg"), "circle/a.jpg");
        assert_eq!(JoinOn::Stem.key("circle/a.jpg"), "a");
        assert_eq!(JoinOn::Stem.key("demo_0001"), "demo_0001");
    }
}
