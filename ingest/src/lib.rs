//! # imglish-ingest: stage 1, image corpora and caption sets into a validated manifest
//!
//! Ingest reads image corpora (folder trees, class-per-folder trees, WebDataset tar shards, Parquet with image
//! bytes) and caption sets, joins them, validates every image cheaply, and records every sample it saw: accepted
//! ones in the manifest, the rest as rejects with a reason code. It is also the image-preparation library the
//! tokenize stage calls for every image.
//!
//! This crate also holds the generator of the embedded demo corpus ([`write_demo_corpus`]), the synthetic data
//! every stage can run on with no external data or weights:
//!
//! ```
//! use imglish_ingest::{write_demo_corpus, DemoConfig};
//!
//! # fn main() -> Result<(), imglish_ingest::Error> {
//! let dir = tempfile::tempdir().expect("tempdir");
//! let config = DemoConfig::default().try_with_images(12)?.with_seed(7);
//! let summary = write_demo_corpus(&dir.path().join("demo"), &config, &|_| {})?;
//! assert_eq!(summary.images, 12);
//! assert!(summary.bad_inputs.iter().any(|b| b.reason == "too-large"));
//! # Ok(())
//! # }
//! ```

mod captions;
mod demo;
mod error;
mod fsutil;
mod jpeg;
mod parquet_io;
mod png;
mod prepare;
mod progress;
mod rng;
mod run;
mod sources;
mod texts;
mod validate;

pub use captions::{CsvHeader, JoinOn};
pub use demo::{write_demo_corpus, BadInput, DemoConfig, DemoSummary, CLASSES, DEMO_VERSION};
pub use error::{Error, Result};
pub use fast_image_resize::Resizer;
pub use fsutil::write_atomic;
pub use parquet_io::{
    write_df as write_parquet, write_image_parquet, write_rejects_parquet, ManifestRow, RejectRow, Split,
};
pub use prepare::{
    center_view, decode_rgb, max_reduction, random_view, render_view, resize_image, CropSpec, DecodeOptions, Decoded,
    Filter, ViewParams,
};
pub use progress::Progress;
pub use rng::{mix64, Rng};
pub use run::{
    ingest, read_image_bytes, sample_id, IngestConfig, IngestCounts, IngestSummary, LabelMode, Manifest,
    MANIFEST_VERSION,
};
pub use sources::{tar_append, Locator, ParquetColumns, SourceKind, DOWNLOAD_RECORD};
pub use texts::{read_texts_file, TextOptions, TextRow, TEXTS_FILE};
pub use validate::{validate_bytes, ImageInfo, Reason, Rejection, ValidationLimits};
