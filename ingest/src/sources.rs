//! Image sources: directory trees (optionally class-per-folder), WebDataset tar shards read as a stream, and
//! Parquet files with an image-bytes column. Each source yields [`Item`]s in chunks; an item carries either
//! its bytes or the reason it cannot be read.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::validate::{Reason, Rejection};

/// What kind of source a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A directory tree of image files.
    Dir,
    /// A tar shard in WebDataset naming.
    Tar,
    /// A Parquet file with an image-bytes column.
    Parquet,
}

/// Column names for Parquet sources (Hugging Face `datasets` convention by default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParquetColumns {
    /// The image column: a struct `{bytes, path}` or plain binary (default `image`).
    pub image: String,
    /// Optional caption column: string or list of strings.
    pub caption: Option<String>,
    /// Optional integer label column.
    pub label: Option<String>,
}

impl Default for ParquetColumns {
    fn default() -> Self {
        ParquetColumns {
            image: "image".into(),
            caption: None,
            label: None,
        }
    }
}

/// One image source of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The path as given (lexically normalised); part of every sample id from this source.
    pub label: String,
    /// Where it is.
    pub path: PathBuf,
    /// What it is.
    pub kind: SourceKind,
}

/// Lexical normalisation of a user-given path: `./a//b/` → `a/b`. Used in sample ids, so that the same
/// corpus gives the same ids wherever it is checked out.
pub(crate) fn normalize_label(p: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut absolute = false;
    for c in p.components() {
        match c {
            Component::RootDir => absolute = true,
            Component::CurDir => {}
            Component::ParentDir => parts.push("..".into()),
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::Prefix(p) => parts.push(p.as_os_str().to_string_lossy().into_owned()),
        }
    }
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

/// The record `imglish download` writes into its output folder once it finishes; such a folder is read as its
/// tar shards.
pub const DOWNLOAD_RECORD: &str = "download.json";

impl Source {
    /// The sources `path` stands for: a folder written by `imglish download` (it holds [`DOWNLOAD_RECORD`]) is
    /// its tar shards, in the record's order; a folder of WebDataset tar shards (`.tar` files and no images or
    /// subfolders beside them, as img2dataset writes) is its tars in name order; anything else is one source
    /// ([`Source::detect`]).
    pub fn expand(path: &Path) -> Result<Vec<Source>> {
        let record = path.join(DOWNLOAD_RECORD);
        if path.is_dir() && !record.is_file() {
            if let Some(tars) = tar_folder(path)? {
                return tars.iter().map(|t| Source::detect(t)).collect();
            }
        }
        if !path.is_dir() || !record.is_file() {
            return Ok(vec![Source::detect(path)?]);
        }
        let text = fs::read_to_string(&record).at(&record)?;
        let bad = |reason: String| Error::Config {
            option: "--images".into(),
            reason: format!("{}: {reason}", record.display()),
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let files = value
            .get("shard_files")
            .and_then(|f| f.as_array())
            .ok_or_else(|| bad("no shard_files list: not written by `imglish download`".into()))?;
        files
            .iter()
            .map(|f| {
                let name = f
                    .as_str()
                    .filter(|n| !n.contains('/') && !n.contains(".."))
                    .ok_or_else(|| bad(format!("bad shard name {f}")))?;
                Source::detect(&path.join(name))
            })
            .collect()
    }

    /// Detects the kind of `path`: a directory, a tar file (by its `ustar` magic or `.tar` name) or a Parquet
    /// file (by its `PAR1` magic).
    pub fn detect(path: &Path) -> Result<Source> {
        let meta = fs::metadata(path).at(path)?;
        let label = normalize_label(path);
        if meta.is_dir() {
            return Ok(Source {
                label,
                path: path.to_path_buf(),
                kind: SourceKind::Dir,
            });
        }
        let mut head = [0u8; 512];
        let mut f = File::open(path).at(path)?;
        let n = read_up_to(&mut f, &mut head).at(path)?;
        let kind = if n >= 4 && &head[..4] == b"PAR1" {
            SourceKind::Parquet
        } else if (n >= 262 && &head[257..262] == b"ustar") || path.extension().is_some_and(|e| e == "tar") {
            SourceKind::Tar
        } else {
            return Err(Error::Config {
                option: "--images".into(),
                reason: format!(
                    "{}: not a directory, a tar shard or a Parquet file (to ingest single images, pass their folder)",
                    path.display()
                ),
            });
        };
        Ok(Source {
            label,
            path: path.to_path_buf(),
            kind,
        })
    }
}

/// Appends a regular file member with fixed metadata (mode 0644, mtime 0, owner 0), so that the same members
/// give the same archive bytes (the demo corpus's shards, `imglish download`'s shards).
pub fn tar_append(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, name, data)
}

/// The `.tar` files of a folder that holds tar shards beside nothing but metadata (no image files, no
/// subfolders); `None` for any other folder.
fn tar_folder(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    let mut tars = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let p = entry.path();
        if entry.file_type().at(&p)?.is_dir() {
            return Ok(None);
        }
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if IMAGE_EXTS.contains(&ext.as_str()) {
            return Ok(None);
        }
        if ext == "tar" {
            tars.push(p);
        }
    }
    tars.sort();
    Ok((!tars.is_empty()).then_some(tars))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Where a sample's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// A file.
    File {
        /// Path of the file (source path joined with the key).
        path: String,
    },
    /// A member of a tar file.
    TarMember {
        /// The tar file.
        tar: String,
        /// Byte offset of the member's data in the tar file.
        offset: u64,
        /// Length of the member's data.
        length: u64,
    },
    /// A row of a Parquet file.
    ParquetRow {
        /// The Parquet file.
        file: String,
        /// Row index (0-based).
        row: u64,
    },
}

impl Locator {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Locator::File { .. } => "file",
            Locator::TarMember { .. } => "tar",
            Locator::ParquetRow { .. } => "parquet",
        }
    }
}

/// One candidate sample found in a source.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub source: String,
    pub key: String,
    /// The name captions are joined on in `path` mode (relative path or member name).
    pub join_path: String,
    pub locator: Locator,
    /// Class folder (first path component under a directory source), if any.
    pub folder: Option<String>,
    pub inline_captions: Vec<String>,
    pub inline_label: Option<i64>,
    pub payload: std::result::Result<Vec<u8>, Rejection>,
}

/// Extensions treated as images inside tar shards (the format is still sniffed from the bytes).
const IMAGE_EXTS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Walks a directory tree in sorted order. Symlinks to files are followed when they resolve inside the tree
/// (or anywhere with `follow`); others become `unsafe-path` rejects; links to directories are never followed.
/// Hidden entries (names starting with `.`) are skipped and counted.
pub(crate) fn walk_dir(
    source: &Source,
    follow: bool,
    hidden: &mut u64,
) -> Result<Vec<(String, std::result::Result<PathBuf, Rejection>)>> {
    let root = source.path.canonicalize().at(&source.path)?;
    let mut out = Vec::new();
    let mut stack = vec![(source.path.clone(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .at(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .at(&dir)?;
        entries.sort();
        let mut subdirs = Vec::new();
        for name in entries {
            let name_s = name.to_string_lossy().into_owned();
            if name_s.starts_with('.') {
                *hidden += 1;
                continue;
            }
            let path = dir.join(&name);
            let rel_path = if rel.is_empty() {
                name_s.clone()
            } else {
                format!("{rel}/{name_s}")
            };
            let lmeta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    out.push((rel_path, Err(Rejection::new(Reason::Unreadable, e.to_string()))));
                    continue;
                }
            };
            if lmeta.file_type().is_symlink() {
                match path.canonicalize() {
                    Ok(target) if target.starts_with(&root) => {
                        if target.is_dir() {
                            // Directory links inside the tree would visit files twice; not followed.
                            out.push((
                                rel_path,
                                Err(Rejection::new(
                                    Reason::UnsafePath,
                                    "symlink to a directory is not followed",
                                )),
                            ));
                        } else {
                            out.push((rel_path, Ok(path)));
                        }
                    }
                    Ok(target) if follow && !target.is_dir() => out.push((rel_path, Ok(path))),
                    Ok(target) => out.push((
                        rel_path,
                        Err(Rejection::new(
                            Reason::UnsafePath,
                            format!("symlink points outside the source tree (to {})", target.display()),
                        )),
                    )),
                    Err(e) => out.push((
                        rel_path,
                        Err(Rejection::new(Reason::Unreadable, format!("broken symlink: {e}"))),
                    )),
                }
            } else if lmeta.is_dir() {
                subdirs.push((path, rel_path));
            } else if lmeta.is_file() {
                out.push((rel_path, Ok(path)));
            }
        }
        // Depth-first in sorted order: push in reverse so the smallest name is visited first.
        for d in subdirs.into_iter().rev() {
            stack.push(d);
        }
    }
    Ok(out)
}

pub(crate) fn dir_item(source: &Source, rel: String, path: std::result::Result<PathBuf, Rejection>) -> Item {
    let folder = rel.split_once('/').map(|(first, _)| first.to_string());
    let payload = path.and_then(|p| fs::read(&p).map_err(|e| Rejection::new(Reason::Unreadable, e.to_string())));
    Item {
        source: source.label.clone(),
        locator: Locator::File {
            path: format!("{}/{rel}", source.label.trim_end_matches('/')),
        },
        join_path: rel.clone(),
        key: rel,
        folder,
        inline_captions: Vec::new(),
        inline_label: None,
        payload,
    }
}

/// `true` for member names that are absolute or climb out of the archive.
fn unsafe_member(name: &str) -> bool {
    name.starts_with('/') || name.starts_with('\\') || name.split(['/', '\\']).any(|c| c == "..") || name.contains(':')
}

/// The WebDataset key and extension of a member name: the key is everything up to the first `.` of the
/// base name.
fn split_member(name: &str) -> (String, String) {
    let (dir, base) = match name.rsplit_once('/') {
        Some((d, b)) => (Some(d), b),
        None => (None, name),
    };
    let (stem, ext) = match base.split_once('.') {
        Some((s, e)) => (s, e.to_ascii_lowercase()),
        None => (base, String::new()),
    };
    let key = match dir {
        Some(d) => format!("{d}/{stem}"),
        None => stem.to_string(),
    };
    (key, ext)
}

#[derive(Default)]
struct TarGroup {
    image: Option<(String, u64, u64, Vec<u8>)>,
    extra_images: Vec<String>,
    captions: Vec<String>,
    label: Option<i64>,
    label_error: Option<String>,
}

/// Reads a WebDataset tar as a stream (never extracting), calling `emit` with groups of items. Members with
/// unsafe names become `unsafe-path` rejects; keys without an image member become `missing-image` rejects.
pub(crate) fn read_tar(source: &Source, chunk: usize, emit: &mut dyn FnMut(Vec<Item>) -> Result<()>) -> Result<()> {
    let file = File::open(&source.path).at(&source.path)?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, file));
    let mut pending: Vec<Item> = Vec::new();
    let mut current: Option<(String, TarGroup)> = None;
    let tar_label = source.label.clone();

    let flush_group = |key: String, g: TarGroup, out: &mut Vec<Item>| {
        let base = Item {
            source: tar_label.clone(),
            key: key.clone(),
            join_path: key.clone(),
            locator: Locator::TarMember {
                tar: tar_label.clone(),
                offset: 0,
                length: 0,
            },
            folder: None,
            inline_captions: g.captions.clone(),
            inline_label: g.label,
            payload: Err(Rejection::new(Reason::MissingImage, "no image member for this key")),
        };
        match g.image {
            Some((member, offset, length, bytes)) => {
                let payload = match &g.label_error {
                    Some(e) => Err(Rejection::new(Reason::BadRecord, e.clone())),
                    None => Ok(bytes),
                };
                out.push(Item {
                    join_path: member,
                    locator: Locator::TarMember {
                        tar: tar_label.clone(),
                        offset,
                        length,
                    },
                    payload,
                    ..base.clone()
                });
                for extra in g.extra_images {
                    out.push(Item {
                        key: extra.clone(),
                        join_path: extra,
                        payload: Err(Rejection::new(
                            Reason::BadRecord,
                            format!("second image member for key {key}"),
                        )),
                        ..base.clone()
                    });
                }
            }
            None => out.push(base),
        }
    };

    let entries = archive.entries().at(&source.path)?;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // A broken archive: everything after this point is unreadable; record it and stop.
                pending.push(Item {
                    source: tar_label.clone(),
                    key: format!("<after {}>", current.as_ref().map_or("start", |c| c.0.as_str())),
                    join_path: String::new(),
                    locator: Locator::TarMember {
                        tar: tar_label.clone(),
                        offset: 0,
                        length: 0,
                    },
                    folder: None,
                    inline_captions: Vec::new(),
                    inline_label: None,
                    payload: Err(Rejection::new(Reason::Corrupt, format!("tar stream broken: {e}"))),
                });
                break;
            }
        };
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        if unsafe_member(&name) || kind.is_symlink() || kind.is_hard_link() {
            let msg = if unsafe_member(&name) {
                "member name is absolute or contains '..'; not followed".to_string()
            } else {
                "link members are not followed".to_string()
            };
            pending.push(Item {
                source: tar_label.clone(),
                key: name.clone(),
                join_path: name,
                locator: Locator::TarMember {
                    tar: tar_label.clone(),
                    offset: entry.raw_file_position(),
                    length: entry.size(),
                },
                folder: None,
                inline_captions: Vec::new(),
                inline_label: None,
                payload: Err(Rejection::new(Reason::UnsafePath, msg)),
            });
            continue;
        }
        let (key, ext) = split_member(&name);
        if current.as_ref().is_some_and(|(k, _)| *k != key) {
            if let Some((k, g)) = current.take() {
                flush_group(k, g, &mut pending);
            }
            if pending.len() >= chunk {
                emit(std::mem::take(&mut pending))?;
            }
        }
        let group = &mut current.get_or_insert_with(|| (key.clone(), TarGroup::default())).1;
        let offset = entry.raw_file_position();
        let length = entry.size();
        let mut data = Vec::with_capacity(length.min(1 << 30) as usize);
        if let Err(e) = entry.read_to_end(&mut data) {
            group.label_error = Some(format!("cannot read member {name}: {e}"));
            continue;
        }
        let last_ext = ext.rsplit('.').next().unwrap_or("").to_string();
        if IMAGE_EXTS.contains(&last_ext.as_str()) {
            if group.image.is_none() {
                group.image = Some((name, offset, length, data));
            } else {
                group.extra_images.push(name);
            }
        } else if last_ext == "txt" {
            let text = String::from_utf8_lossy(&data).trim().to_string();
            if !text.is_empty() {
                group.captions.push(text);
            }
        } else if last_ext == "cls" {
            match String::from_utf8_lossy(&data).trim().parse::<i64>() {
                Ok(v) => group.label = Some(v),
                Err(_) => group.label_error = Some(format!("{name}: label is not an integer")),
            }
        } else if last_ext == "json" {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) {
                for field in ["caption", "text"] {
                    if let Some(s) = v.get(field).and_then(|c| c.as_str()) {
                        group.captions.push(s.to_string());
                    }
                }
                if group.label.is_none() {
                    group.label = v.get("label").and_then(|l| l.as_i64());
                }
            }
        }
    }
    if let Some((k, g)) = current.take() {
        flush_group(k, g, &mut pending);
    }
    if !pending.is_empty() {
        emit(pending)?;
    }
    Ok(())
}

/// Reads a Parquet source with polars and emits its rows as items, `chunk` at a time.
pub(crate) fn read_parquet(
    source: &Source,
    columns: &ParquetColumns,
    chunk: usize,
    total: &dyn Fn(u64),
    emit: &mut dyn FnMut(Vec<Item>) -> Result<()>,
) -> Result<()> {
    let rows = crate::parquet_io::read_image_rows(&source.path, columns)?;
    total(rows.len() as u64);
    let mut batch = Vec::with_capacity(chunk);
    for (row, r) in rows.into_iter().enumerate() {
        let key = r.path.clone().unwrap_or_else(|| format!("row-{row}"));
        batch.push(Item {
            source: source.label.clone(),
            join_path: key.clone(),
            key,
            locator: Locator::ParquetRow {
                file: source.label.clone(),
                row: row as u64,
            },
            folder: None,
            inline_captions: r.captions,
            inline_label: r.label,
            payload: r.bytes.ok_or_else(|| Rejection::new(Reason::Empty, "null image bytes")),
        });
        if batch.len() >= chunk {
            emit(std::mem::take(&mut batch))?;
        }
    }
    if !batch.is_empty() {
        emit(batch)?;
    }
    Ok(())
}

/// Class indices by sorted class name.
pub(crate) fn class_table<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, i32> {
    let mut set: Vec<&str> = names.collect();
    set.sort_unstable();
    set.dedup();
    set.into_iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), i as i32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names() {
        assert_eq!(
            split_member("a/b/demo_0001.jpg"),
            ("a/b/demo_0001".into(), "jpg".into())
        );
        assert_eq!(split_member("x.seg.png"), ("x".into(), "seg.png".into()));
        assert!(unsafe_member("../etc/passwd"));
        assert!(unsafe_member("/abs.jpg"));
        assert!(unsafe_member("a/../../b.jpg"));
        assert!(!unsafe_member("a/b..c.jpg"));
    }

    #[test]
    fn labels_are_normalised() {
        assert_eq!(normalize_label(Path::new("./a//b/")), "a/b");
        assert_eq!(normalize_label(Path::new("/x/y")), "/x/y");
        assert_eq!(normalize_label(Path::new(".")), ".");
    }
}
