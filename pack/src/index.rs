//! `index.json`: the dataset's table of contents. It lists shards (never samples) with their content hashes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{PackError, Result};
use crate::record::{Split, SplitCounts, TokenizerInfo};
use crate::shard::FORMAT_VERSION;
use crate::util;

/// File name of the dataset index.
pub const INDEX_FILE: &str = "index.json";

/// Settings of a pack build. They are part of the build fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackConfig {
    /// A shard is closed after the record batch that brings it to at least this many bytes.
    pub target_shard_bytes: u64,
    /// Rows per record batch (the unit of random access); the last batch of a shard may be shorter.
    pub batch_rows: u32,
    /// zstd level of the shard bodies (1..=22; negative levels are zstd's fast modes).
    pub zstd_level: i32,
    /// Global pre-shuffle: samples are ordered by a keyed hash of their id. `None` keeps the parts' order.
    pub shuffle_seed: Option<u64>,
    /// Keep the working image bytes (`pixels` column).
    pub include_pixels: bool,
}

impl Default for PackConfig {
    fn default() -> Self {
        PackConfig {
            target_shard_bytes: 128 << 20,
            batch_rows: 1024,
            zstd_level: 3,
            shuffle_seed: None,
            include_pixels: false,
        }
    }
}

impl PackConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.batch_rows == 0 || self.batch_rows > 1 << 20 {
            return Err(PackError::InvalidConfig(format!(
                "batch_rows {} must be in 1..=1048576",
                self.batch_rows
            )));
        }
        if self.target_shard_bytes == 0 {
            return Err(PackError::InvalidConfig("target_shard_bytes must be positive".into()));
        }
        if !(-7..=22).contains(&self.zstd_level) {
            return Err(PackError::InvalidConfig(format!(
                "zstd_level {} must be in -7..=22",
                self.zstd_level
            )));
        }
        Ok(())
    }
}

/// One shard as listed in `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name in the dataset directory (`shard-NNNNN.arrow`).
    pub file: String,
    /// The split of every row in the shard.
    pub split: Split,
    /// Rows (samples).
    pub rows: u64,
    /// Record batches.
    pub batches: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// sha256 (hex) of the whole file.
    pub sha256: String,
}

/// `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetIndex {
    /// Shard and index format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Version of imglish that built the dataset.
    pub imglish_version: String,
    /// sha256 over the inputs (token parts, manifest fingerprint), the config and the imglish version.
    pub build_fingerprint: String,
    /// The ingest manifest's fingerprint, if a manifest was given.
    pub manifest_fingerprint: Option<String>,
    /// The tokenizer of every shard.
    pub tokenizer: TokenizerInfo,
    /// The build settings.
    pub config: PackConfig,
    /// Samples per split.
    pub counts: SplitCounts,
    /// The shards: all train shards, then all val shards.
    pub shards: Vec<ShardEntry>,
}

impl DatasetIndex {
    /// Reads and validates `dir/index.json`: version, tokenizer, shard names, counts and batch layout.
    pub fn read(dir: &Path) -> Result<DatasetIndex> {
        let path = dir.join(INDEX_FILE);
        let bytes = std::fs::read(&path).map_err(crate::error::io_err(&path))?;
        DatasetIndex::parse(&bytes, &path)
    }

    /// Parses and validates the bytes of an `index.json` (`path` names it in errors).
    pub(crate) fn parse(bytes: &[u8], path: &Path) -> Result<DatasetIndex> {
        let path = path.to_path_buf();
        let index: DatasetIndex = serde_json::from_slice(bytes).map_err(|e| PackError::InvalidJson {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let invalid = |reason: String| PackError::InvalidJson {
            path: path.clone(),
            reason,
        };
        if !(1..=FORMAT_VERSION).contains(&index.format_version) {
            return Err(invalid(format!(
                "format_version {} is not supported (this build reads 1 to {FORMAT_VERSION})",
                index.format_version
            )));
        }
        index.tokenizer.validate().map_err(|e| invalid(e.to_string()))?;
        index.config.validate().map_err(|e| invalid(e.to_string()))?;
        let mut counts = SplitCounts::default();
        let mut names = std::collections::HashSet::new();
        for s in &index.shards {
            if !util::is_plain_file_name(&s.file) || !names.insert(s.file.as_str()) {
                return Err(invalid(format!(
                    "shard file {:?} is not a plain, unique file name",
                    s.file
                )));
            }
            let br = u64::from(index.config.batch_rows);
            if s.rows == 0 || s.batches != s.rows.div_ceil(br) {
                return Err(invalid(format!(
                    "shard {}: {} rows cannot make {} batches of {br}",
                    s.file, s.rows, s.batches
                )));
            }
            *counts.get_mut(s.split) += s.rows;
        }
        if counts != index.counts {
            return Err(invalid(format!(
                "counts {:?} differ from the shards' sum {counts:?}",
                index.counts
            )));
        }
        Ok(index)
    }

    /// Writes `dir/index.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        util::write_json_atomic(&dir.join(INDEX_FILE), self)
    }

    /// Total samples.
    pub fn len(&self) -> u64 {
        self.counts.total()
    }

    /// Whether the dataset has no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total shard bytes.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}
