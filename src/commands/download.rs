use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use imglish_download::{download, user_agent, DownloadConfig, FetchConfig, UrlColumns};

use super::ingest::ImageLimitArgs;
use crate::output::{BarProgress, Output};

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// The URL list: .parquet, .csv / .tsv (header row), .jsonl, or .txt with one URL per line.
    #[arg(long, value_name = "FILE")]
    pub urls: PathBuf,

    /// Output folder: shard-NNNNN.tar (WebDataset naming), status.parquet, download.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// The URL column (field for JSONL).
    #[arg(long, default_value = "url")]
    pub url_column: String,

    /// The caption column (default: `caption` when the list has one).
    #[arg(long)]
    pub caption_column: Option<String>,

    /// Rows of the list per tar shard (a shard is held in memory until its last row is in).
    #[arg(long, default_value_t = 1000)]
    pub shard_size: usize,

    /// Requests in flight at once, over all hosts.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,

    /// Requests in flight at once to one host.
    #[arg(long, default_value_t = 8)]
    pub per_host: usize,

    /// Requests started per second to one host (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    pub per_host_rate: f64,

    /// Seconds to open a connection.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Seconds for one request, up to the last byte of the body.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,

    /// Further attempts after a retryable failure (timeout, connection error, truncated body, 429, 5xx).
    #[arg(long, default_value_t = 2)]
    pub retries: u32,

    /// Seconds before the first retry (doubled each time, with jitter).
    #[arg(long, default_value_t = 0.5)]
    pub backoff: f64,

    /// Longest Retry-After (seconds) waited for; a longer one fails the row as http-429.
    #[arg(long, default_value_t = 60.0)]
    pub max_retry_after: f64,

    /// Redirects followed per request.
    #[arg(long, default_value_t = 5)]
    pub max_redirects: u32,

    /// Largest image accepted, in bytes (enforced while reading the body).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_bytes: u64,

    #[command(flatten)]
    pub image: ImageLimitArgs,

    /// Download images whose response says `X-Robots-Tag: noai` (or noimageai, noindex, noimageindex); by
    /// default they are skipped as `opt-out`. Recorded in download.json.
    #[arg(long)]
    pub ignore_opt_out: bool,

    /// Contact (an e-mail or URL) added to the User-Agent so that site owners can reach you.
    #[arg(long)]
    pub user_agent_contact: Option<String>,

    /// Fetch the failed rows of finished shards again.
    #[arg(long)]
    pub retry_failed: bool,

    /// Start again in an --out that holds a download of another list or with another --shard-size.
    #[arg(long)]
    pub overwrite: bool,

    /// Succeed even when no image was stored (by default that is an error, exit 1).
    #[arg(long)]
    pub allow_empty: bool,
}

fn seconds(option: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("invalid option {option}: {s} is not a number of seconds"))
}

impl DownloadArgs {
    fn config(&self, threads: usize) -> anyhow::Result<DownloadConfig> {
        let mut config = DownloadConfig::new(&self.urls);
        config.columns = UrlColumns {
            url: self.url_column.clone(),
            caption: self.caption_column.clone(),
        };
        config.shard_size = self.shard_size;
        config.threads = threads;
        config.fetch = FetchConfig {
            concurrency: self.concurrency,
            per_host: self.per_host,
            per_host_rate: self.per_host_rate,
            connect_timeout: seconds("--connect-timeout", self.connect_timeout)?,
            timeout: seconds("--timeout", self.timeout)?,
            max_bytes: self.max_bytes,
            max_redirects: self.max_redirects,
            retries: self.retries,
            backoff: seconds("--backoff", self.backoff)?,
            max_backoff: Duration::from_secs(30),
            max_retry_after: seconds("--max-retry-after", self.max_retry_after)?,
            honour_opt_out: !self.ignore_opt_out,
            user_agent: user_agent(self.user_agent_contact.as_deref()),
        };
        config.limits = self.image.limits(self.max_bytes, false);
        config.retry_failed = self.retry_failed;
        config.overwrite = self.overwrite;
        config.allow_empty = self.allow_empty;
        Ok(config)
    }
}

pub fn run(args: &DownloadArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    let config = args.config(threads)?;
    let _lock = super::lock::lock_dir(&args.out)?;
    let bar = out.spinner("downloading");
    let summary = download(&config, &args.out, &BarProgress(&bar))
        .with_context(|| format!("download into {} failed", args.out.display()))?;
    bar.finish_and_clear();
    let reasons: Vec<String> = summary.by_reason.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    let secs = summary.wall_seconds.max(1e-9);
    let text = format!(
        "download: {} listed, {} stored, {} failed{}\n  this run: {} fetched, {} stored, {:.1} MB ({:.1} images/s, {:.2} MB/s), {} of {} shards written{}\n  shards: {}  status: {}",
        summary.listed,
        summary.succeeded,
        summary.failed,
        if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) },
        summary.fetched_this_run,
        summary.succeeded_this_run,
        summary.bytes_this_run as f64 / 1e6,
        summary.succeeded_this_run as f64 / secs,
        summary.bytes_this_run as f64 / 1e6 / secs,
        summary.shards_written,
        summary.shards,
        if summary.honour_opt_out { "" } else { "; X-Robots-Tag opt-outs ignored (--ignore-opt-out)" },
        args.out.display(),
        args.out.join(imglish_download::STATUS_FILE).display(),
    );
    let mut json = serde_json::to_value(&summary)?;
    json["event"] = "download".into();
    out.summary(&text, &json);
    Ok(())
}
