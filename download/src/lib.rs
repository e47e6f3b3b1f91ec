//! # imglish-download: URL lists into WebDataset tar shards, an ingest source
//!
//! Image-text corpora such as CC3M, CC12M, SBU or LAION subsets ship as lists of image URLs with captions.
//! [`download`] fetches every row of such a list (Parquet, CSV/TSV, JSONL or plain text) with bounded global and
//! per-host concurrency, a per-host request rate, timeouts, retries with backoff for the failures that may
//! pass, a body size limit enforced while streaming, `X-Robots-Tag` opt-outs honoured, and the ingest
//! validator run on every body before it is stored. Output: `shard-NNNNN.tar` in WebDataset naming, which
//! `imglish ingest --images DIR` reads directly, and `status.parquet` with exactly one row per listed row.
//!
//! A row that cannot be fetched is a status row with a reason code, never an error; a run that stores nothing
//! is one (unless allowed):
//!
//! ```
//! use imglish_download::{download, DownloadConfig, Error};
//!
//! let dir = tempfile::tempdir().expect("tempdir");
//! let list = dir.path().join("urls.csv");
//! // Port 9 (discard) on the loopback interface refuses connections.
//! std::fs::write(&list, "url,caption\nhttp://127.0.0.1:9/cat.jpg,a cat\n").expect("write");
//! let mut config = DownloadConfig::new(&list);
//! config.fetch.retries = 0;
//! let err = download(&config, &dir.path().join("out"), &|_| {}).expect_err("nothing to store");
//! assert!(matches!(err, Error::NothingDownloaded { listed: 1, failed: 1, .. }));
//! let status = imglish_download::read_status(&dir.path().join("out/status.parquet")).expect("status");
//! assert_eq!(status[0].reason.as_deref(), Some("connect-error"));
//! ```

mod error;
mod fetch;
mod input;
mod run;
mod status;

pub use error::{Error, Result};
pub use fetch::{opted_out, user_agent, FetchConfig, USER_AGENT_TOKEN};
pub use input::{read_url_list, UrlColumns, UrlRow};
pub use run::{download, DownloadConfig, DownloadSummary, DOWNLOAD_FILE, STATUS_FILE};
pub use status::{read_status, StatusRow};
