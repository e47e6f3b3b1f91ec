//! The crate's error type: every variant names the file (part, shard, index), and where it applies the record
//! batch or sample, so that a one-line report is enough to find the problem.

use std::path::PathBuf;

/// Everything that can go wrong while writing or reading token parts, shards and dataset indexes.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A file or directory could not be read, written, synced or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A token part (Parquet) could not be written or decoded.
    #[error("token part {}: {source}", path.display())]
    Parquet {
        /// The part file.
        path: PathBuf,
        /// The underlying error.
        source: parquet::errors::ParquetError,
    },
    /// A token part has the wrong schema, metadata or content.
    #[error("token part {}: {reason}", path.display())]
    InvalidPart {
        /// The part file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file's content hash differs from the one recorded for it (token part).
    #[error("{}: sha256 is {actual}, but {expected} was recorded", path.display())]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// The recorded hash (hex).
        expected: String,
        /// The hash of the bytes on disk (hex).
        actual: String,
    },
    /// A JSON file (`tokenize.json`, `index.json`, `ingest.json`, `pack.progress`) is malformed or invalid.
    #[error("{}: {reason}", path.display())]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A record does not match the tokenizer description (view count, grid, vocabulary, crop).
    #[error("sample {sample_id}: {reason}")]
    InvalidRecord {
        /// The sample.
        sample_id: u64,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer description itself is invalid.
    #[error("invalid tokenizer info: {0}")]
    InvalidTokenizer(String),
    /// Two records carry the same sample id.
    #[error("sample {sample_id} appears more than once in the token parts")]
    DuplicateSample {
        /// The repeated sample id.
        sample_id: u64,
    },
    /// A shard could not be written.
    #[error("shard {shard}: cannot write: {reason}")]
    ShardWrite {
        /// The shard file name.
        shard: String,
        /// What went wrong.
        reason: String,
    },
    /// A shard is missing, truncated, altered or not a shard of this dataset.
    #[error("shard {shard}{}: {reason}", batch.map(|b| format!(" batch {b}")).unwrap_or_default())]
    CorruptShard {
        /// The shard file name.
        shard: String,
        /// The record batch, where the problem is inside one.
        batch: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// Object storage could not be reached or answered an error.
    #[error("{url}: {reason}")]
    Remote {
        /// The dataset or object URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// An invalid pack, stream or read option.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A sample, shard or batch index past the end.
    #[error("{what} {index} is out of range (the dataset has {len})")]
    OutOfRange {
        /// What was indexed ("sample", "shard", "batch").
        what: &'static str,
        /// The index asked for.
        index: u64,
        /// How many there are.
        len: u64,
    },
    /// The output directory already holds a dataset or an interrupted build made from other inputs or settings.
    #[error("{}: {reason}", path.display())]
    OutputConflict {
        /// The output directory.
        path: PathBuf,
        /// What is there.
        reason: String,
    },
}

/// `Result` with [`PackError`].
pub type Result<T, E = PackError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> PackError {
    let path = path.into();
    move |source| PackError::Io { path, source }
}
