//! # imglish-pack: stage 3, token shards and the streaming reader
//!
//! The tokenize stage writes **token parts** ([`PartWriter`], zstd Parquet, one row per sample, listed in
//! `tokenize.json` = [`TokensManifest`]). [`pack_dataset`] turns them into a **dataset**: Arrow IPC files with
//! zstd-compressed record batches (`shard-NNNNN.arrow`, schema in [`shard_schema`]) plus `index.json`
//! ([`DatasetIndex`]) with every shard's row count and sha256. Any Arrow reader (pyarrow, polars, DuckDB) reads
//! the shards without imglish code; a record batch is the unit of random access.
//!
//! The trainer opens a [`Dataset`] and reads a [`SampleStream`] per epoch: a deterministic order from
//! `(seed, epoch)` ([`Shuffle`]), split across ranks and loader workers so that every sample is delivered
//! exactly once per epoch ([`Partition`]), resumable from a [`StreamState`] even with a different world size,
//! one of the `K` stored views per sample per epoch ([`view_for`]), decoded ahead on background threads.
//! Shard bytes are untrusted: sizes, hashes, structure and values are checked before use.
//!
//! ```
//! use imglish_pack::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let work = tempfile::tempdir()?;
//! let (tokens, out) = (work.path().join("tokens"), work.path().join("dataset"));
//! std::fs::create_dir_all(&tokens)?;
//!
//! // The tokenize stage: one part, 100 samples with 2 views of a 2x3 token grid.
//! let info = TokenizerInfo {
//!     fingerprint: "0".repeat(64),
//!     card: serde_json::json!({"name": "example"}),
//!     grid: [2, 3],
//!     vocab_size: 512,
//!     text_vocab_size: Some(1000),
//!     text_special_ids: Default::default(),
//!     views_per_sample: 2,
//! };
//! let mut part = PartWriter::try_new(tokens.join(part_file_name(0)), &info)?;
//! for id in 0..100u64 {
//!     let view = |v: u16| ViewRecord { crop: [0, 0, 64, 64], flip: v == 1, tokens: vec![(id as u16 + v) % 512; 6] };
//!     part.write(&TokenRecord {
//!         sample_id: id,
//!         views: vec![view(0), view(1)],
//!         captions: vec![vec![1, 2, 3]],
//!         label: Some((id % 10) as i32),
//!         split: if id % 10 == 0 { Split::Val } else { Split::Train },
//!         pixels: None,
//!     })?;
//! }
//! TokensManifest::new(info, vec![part.finish()?]).write(&tokens)?;
//!
//! // Pack, then stream the train split for rank 1 of 2.
//! let config = PackConfig { batch_rows: 16, ..PackConfig::default() };
//! let summary = pack_dataset(&tokens, None, &out, &config, &|_| {})?;
//! assert_eq!((summary.counts.train, summary.counts.val), (90, 10));
//!
//! let dataset = Dataset::open(&out)?;
//! let options = StreamOptions { partition: Partition::rank(1, 2), seed: 7, ..StreamOptions::default() };
//! let samples = dataset.stream(&options, StreamState::default())?.collect::<Result<Vec<_>, _>>()?;
//! assert_eq!(samples.len(), 45);
//! assert!(samples.iter().all(|s| s.split == Split::Train && s.tokens.len() == 6));
//! # Ok(())
//! # }
//! ```

mod build;
mod dataset;
mod error;
mod index;
mod order;
mod part;
mod record;
mod remote;
mod shard;
mod util;

pub use build::{manifest_fingerprint, pack_dataset, PackSummary, PROGRESS_FILE};
pub use dataset::{
    perplexity, CorruptReport, Dataset, DatasetStats, EpochReader, LengthSummary, Sample, SampleStream, StreamOptions,
    VerifyReport,
};
pub use error::{PackError, Result};
pub use index::{DatasetIndex, PackConfig, ShardEntry, INDEX_FILE};
pub use order::{mean_jump_ratio, view_for, EpochOrder, Partition, Permutation, Shuffle, StreamState};
pub use part::{
    part_file_name, read_part, PartEntry, PartReader, PartWriter, TokensManifest, PARTS_FORMAT_VERSION,
    PART_METADATA_KEY, TOKENS_MANIFEST_FILE,
};
pub use record::{SampleKind, Split, SplitCounts, TokenRecord, TokenizerInfo, ViewRecord};
pub use remote::{remote_url, set_remote_options, upload_dataset, RemoteOptions, REMOTE_SCHEMES};
pub use shard::{read_shard_bytes, shard_file_name, shard_schema, FORMAT_VERSION, META_FORMAT_VERSION, META_TOKENIZER};
pub use util::sha256_file;
