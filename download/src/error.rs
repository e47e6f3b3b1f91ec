use std::path::PathBuf;

/// Errors that stop a download run. A URL that cannot be fetched is not an error: it gets a failed row in the
/// status table with a reason code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The URL list cannot be read as a whole (unknown format, missing column, unreadable file).
    #[error("{}: {reason}", path.display())]
    UrlList {
        /// The URL list.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing a shard or the status table failed.
    #[error(transparent)]
    Ingest(#[from] imglish_ingest::Error),
    /// An option has an invalid value.
    #[error("invalid option {option}: {reason}")]
    Config {
        /// The option (`--concurrency`, ...).
        option: String,
        /// Why it is invalid.
        reason: String,
    },
    /// `--out` holds a download made from another URL list or with other settings.
    #[error("{} holds a download of {other} ({field} differs: {theirs} there, {ours} now); use another --out, or --overwrite to start it again", out.display())]
    OtherRun {
        /// The output folder.
        out: PathBuf,
        /// What the earlier run downloaded.
        other: String,
        /// The setting that differs.
        field: String,
        /// Its value in the earlier run.
        theirs: String,
        /// Its value now.
        ours: String,
    },
    /// Every URL failed (or the list was empty) and empty output was not allowed.
    #[error("nothing downloaded: {listed} URLs listed, {failed} failed{top}; see {}", status.display())]
    NothingDownloaded {
        /// Rows in the URL list.
        listed: u64,
        /// Rows that failed.
        failed: u64,
        /// ", most as REASON (N)" or empty.
        top: String,
        /// The status table.
        status: PathBuf,
    },
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot start the HTTP client: {0}")]
    Client(String),
}

/// `Result` with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
