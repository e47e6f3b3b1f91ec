//! A download run: the URL list cut into shards of consecutive rows, every row fetched once (rows of finished
//! shards skipped, failed rows refetched with `retry_failed`), each shard written when its last row is in.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use imglish_ingest::{validate_bytes, Progress, Reason, ValidationLimits};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};

use crate::error::{Error, IoContext, Result};
use crate::fetch::{Attempted, FetchConfig, Fetcher};
use crate::input::{read_url_list, UrlColumns, UrlRow};
use crate::status::{read_status, read_tar_groups, tar_bytes, write_status, Members, StatusRow};

/// The file naming a finished download; `imglish ingest` reads a folder holding it as its tar shards.
pub const DOWNLOAD_FILE: &str = imglish_ingest::DOWNLOAD_RECORD;
/// The status table of every listed row.
pub const STATUS_FILE: &str = "status.parquet";
const SETTINGS_FILE: &str = "settings.json";

/// Everything a download run needs besides the output folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownloadConfig {
    /// The URL list.
    pub urls: PathBuf,
    /// Its columns.
    pub columns: UrlColumns,
    /// Rows of the list per shard.
    pub shard_size: usize,
    /// Worker threads of the async runtime.
    pub threads: usize,
    /// How URLs are fetched.
    pub fetch: FetchConfig,
    /// Image checks applied before anything is stored (those of `imglish ingest`).
    pub limits: ValidationLimits,
    /// Refetch the failed rows of finished shards.
    pub retry_failed: bool,
    /// Delete an earlier download of other inputs in the output folder and start again.
    pub overwrite: bool,
    /// Succeed even when no image was stored.
    pub allow_empty: bool,
    /// Seeds the backoff jitter.
    pub seed: u64,
}

impl DownloadConfig {
    /// Defaults for a list: 1000 rows per shard, two runtime threads, [`FetchConfig::default`].
    pub fn new(urls: impl Into<PathBuf>) -> Self {
        DownloadConfig {
            urls: urls.into(),
            columns: UrlColumns::default(),
            shard_size: 1000,
            threads: 2,
            fetch: FetchConfig::default(),
            limits: ValidationLimits::default(),
            retry_failed: false,
            overwrite: false,
            allow_empty: false,
            seed: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |option: &str, reason: &str| {
            Err(Error::Config {
                option: option.into(),
                reason: reason.into(),
            })
        };
        if self.shard_size == 0 {
            return bad("--shard-size", "must be at least 1");
        }
        if self.fetch.concurrency == 0 {
            return bad("--concurrency", "must be at least 1");
        }
        if self.fetch.per_host == 0 {
            return bad("--per-host", "must be at least 1");
        }
        if !(self.fetch.per_host_rate >= 0.0 && self.fetch.per_host_rate.is_finite()) {
            return bad("--per-host-rate", "must be a finite number >= 0");
        }
        Ok(())
    }
}

/// What a run did, also written to `download.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownloadSummary {
    /// Rows in the URL list.
    pub listed: u64,
    /// Rows with a stored image (this run and earlier ones).
    pub succeeded: u64,
    /// Rows without one.
    pub failed: u64,
    /// Failed rows by reason code.
    pub by_reason: BTreeMap<String, u64>,
    /// Image bytes stored.
    pub bytes: u64,
    /// Shards in the output.
    pub shards: usize,
    /// Shards written by this run (the rest were finished before).
    pub shards_written: usize,
    /// Rows fetched by this run.
    pub fetched_this_run: u64,
    /// Of those, stored.
    pub succeeded_this_run: u64,
    /// Image bytes this run stored.
    pub bytes_this_run: u64,
    /// Whether `X-Robots-Tag` opt-outs were honoured.
    pub honour_opt_out: bool,
    /// Wall time of this run.
    pub wall_seconds: f64,
    /// The URL list's sha256.
    pub urls_sha256: String,
}

/// The settings a resumed run must share with the run that started the folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    urls: String,
    urls_sha256: String,
    url_column: String,
    caption_column: Option<String>,
    shard_size: usize,
}

fn shard_name(id: usize) -> String {
    format!("shard-{id:05}.tar")
}

fn status_name(id: usize) -> String {
    format!("shard-{id:05}.status.parquet")
}

/// Downloads every row of `config.urls` into `out`: `shard-NNNNN.tar` (WebDataset naming: `KEY.jpg|png|...`,
/// `KEY.txt` with the caption, `KEY.json` with the URL and the list's other columns), `status.parquet` (one row
/// per listed row) and `download.json`. A rerun skips finished shards; `progress` gets one phase with the rows
/// to fetch, a count per row and a status message.
pub fn download(config: &DownloadConfig, out: &Path, progress: &dyn Progress) -> Result<DownloadSummary> {
    config.validate()?;
    let started = Instant::now();
    let rows = read_url_list(&config.urls, &config.columns)?;
    let urls_sha256 = file_sha256(&config.urls)?;
    prepare_out(config, out, &urls_sha256)?;
    let plans = plan_shards(&rows, config, out)?;
    let todo: u64 = plans.iter().map(|p| p.todo.len() as u64).sum();
    progress.phase("downloading", todo);
    let fetcher = Arc::new(Fetcher::new(config.fetch.clone(), config.seed)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads.max(1))
        .enable_all()
        .build()
        .at(out)?;
    let tally = runtime.block_on(fetch_all(&plans, fetcher, config, out, progress))?;
    drop(runtime);
    let summary = finish(config, out, &rows, &plans, &tally, started, urls_sha256)?;
    if summary.succeeded == 0 && !config.allow_empty {
        let top = summary
            .by_reason
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(r, n)| format!(", most as {r} ({n})"))
            .unwrap_or_default();
        return Err(Error::NothingDownloaded {
            listed: summary.listed,
            failed: summary.failed,
            top,
            status: out.join(STATUS_FILE),
        });
    }
    Ok(summary)
}

/// sha256 of a file, streamed (URL lists can be large).
fn file_sha256(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut fs::File::open(path).at(path)?, &mut hasher).at(path)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Checks that `out` holds nothing or an earlier run of the same list and settings (or clears it with
/// `overwrite`), and records the settings.
fn prepare_out(config: &DownloadConfig, out: &Path, urls_sha256: &str) -> Result<()> {
    fs::create_dir_all(out).at(out)?;
    let ours = Settings {
        urls: config.urls.display().to_string(),
        urls_sha256: urls_sha256.to_string(),
        url_column: config.columns.url.clone(),
        caption_column: config.columns.caption.clone(),
        shard_size: config.shard_size,
    };
    let path = out.join(SETTINGS_FILE);
    if let Ok(text) = fs::read_to_string(&path) {
        let theirs: Option<Settings> = serde_json::from_str(&text).ok();
        let differs = theirs.as_ref().and_then(|t| first_difference(t, &ours));
        match (theirs, differs) {
            (Some(_), None) => return Ok(()),
            (theirs, differs) if !config.overwrite => {
                let (field, a, b) =
                    differs.unwrap_or_else(|| ("settings.json".into(), "unreadable".into(), "-".into()));
                return Err(Error::OtherRun {
                    out: out.to_path_buf(),
                    other: theirs.map_or_else(|| "another list".into(), |t| t.urls),
                    field,
                    theirs: a,
                    ours: b,
                });
            }
            _ => clear_out(out)?,
        }
    }
    let text = serde_json::to_string_pretty(&ours).unwrap_or_default();
    imglish_ingest::write_atomic(&path, text.as_bytes())?;
    Ok(())
}

fn first_difference(a: &Settings, b: &Settings) -> Option<(String, String, String)> {
    let (ja, jb) = (serde_json::to_value(a).ok()?, serde_json::to_value(b).ok()?);
    let (Value::Object(ma), Value::Object(mb)) = (ja, jb) else {
        return None;
    };
    // The list's path may move; its content (sha256) and the settings may not.
    ma.iter()
        .filter(|(k, _)| k.as_str() != "urls")
        .find(|(k, v)| mb.get(*k) != Some(*v))
        .map(|(k, v)| {
            (
                k.clone(),
                v.to_string(),
                mb.get(k).map(Value::to_string).unwrap_or_default(),
            )
        })
}

fn clear_out(out: &Path) -> Result<()> {
    for entry in fs::read_dir(out).at(out)? {
        let entry = entry.at(out)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("shard-") || name == STATUS_FILE || name == DOWNLOAD_FILE || name == SETTINGS_FILE;
        if ours {
            fs::remove_file(entry.path()).at(entry.path())?;
        }
    }
    Ok(())
}

/// One shard's work: its rows, the status rows of an earlier run, and the positions to fetch now.
struct ShardPlan<'a> {
    id: usize,
    rows: &'a [UrlRow],
    previous: Option<Vec<StatusRow>>,
    todo: Vec<usize>,
}

fn plan_shards<'a>(rows: &'a [UrlRow], config: &DownloadConfig, out: &Path) -> Result<Vec<ShardPlan<'a>>> {
    let mut plans = Vec::new();
    for (id, chunk) in rows.chunks(config.shard_size).enumerate() {
        let status = out.join(status_name(id));
        let previous = if status.exists() {
            Some(read_status(&status)?)
        } else {
            None
        };
        let todo = match &previous {
            None => (0..chunk.len()).collect(),
            Some(prev) if config.retry_failed => prev
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.ok() && r.reason.as_deref() != Some("bad-record"))
                .map(|(i, _)| i)
                .collect(),
            Some(_) => Vec::new(),
        };
        plans.push(ShardPlan {
            id,
            rows: chunk,
            previous,
            todo,
        });
    }
    Ok(plans)
}

/// A row's result: its status row and, on success, its tar members.
struct Done {
    shard: usize,
    position: usize,
    row: StatusRow,
    members: Option<Members>,
}

/// What this run fetched, for the summary.
#[derive(Default)]
struct Tally {
    fetched: u64,
    succeeded: u64,
    bytes: u64,
    shards_written: usize,
}

async fn fetch_all(
    plans: &[ShardPlan<'_>],
    fetcher: Arc<Fetcher>,
    config: &DownloadConfig,
    out: &Path,
    progress: &dyn Progress,
) -> Result<Tally> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
    let stop = Arc::new(AtomicBool::new(false));
    let global = Arc::new(Semaphore::new(config.fetch.concurrency));
    let dispatch = {
        let stop = stop.clone();
        async move {
            for plan in plans.iter().filter(|p| !p.todo.is_empty()) {
                for &position in &plan.todo {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(permit) = global.clone().acquire_owned().await else {
                        return;
                    };
                    let (fetcher, tx, row) = (fetcher.clone(), tx.clone(), plan.rows[position].clone());
                    let (shard, limits) = (plan.id, config.limits);
                    tokio::spawn(async move {
                        let (row, members) = fetch_row(&fetcher, &row, shard, &limits).await;
                        drop(permit);
                        let _ = tx.send(Done {
                            shard,
                            position,
                            row,
                            members,
                        });
                    });
                }
            }
        }
    };
    let collect = async {
        let mut pending: BTreeMap<usize, Vec<Done>> = BTreeMap::new();
        let mut tally = Tally::default();
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        let started = Instant::now();
        while let Some(done) = rx.recv().await {
            tally.fetched += 1;
            if done.row.ok() {
                tally.succeeded += 1;
                tally.bytes += done.row.bytes;
            } else if let Some(r) = &done.row.reason {
                *failures.entry(r.clone()).or_default() += 1;
            }
            progress.inc(1);
            progress.message(&status_line(&tally, &failures, started));
            let shard = done.shard;
            let list = pending.entry(shard).or_default();
            list.push(done);
            let plan = &plans[shard];
            if list.len() == plan.todo.len() {
                let results = pending.remove(&shard).unwrap_or_default();
                if let Err(e) = write_shard(plan, results, out) {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                tally.shards_written += 1;
            }
        }
        Ok(tally)
    };
    let ((), tally) = tokio::join!(dispatch, collect);
    tally
}

fn status_line(t: &Tally, failures: &BTreeMap<String, u64>, started: Instant) -> String {
    let failed: u64 = failures.values().sum();
    let mut top: Vec<(&String, &u64)> = failures.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let reasons: Vec<String> = top.iter().take(3).map(|(r, n)| format!("{r} {n}")).collect();
    let mbps = t.bytes as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-3);
    let why = if reasons.is_empty() {
        String::new()
    } else {
        format!(" ({})", reasons.join(", "))
    };
    format!("{} ok, {failed} failed{why}, {mbps:.1} MB/s", t.succeeded)
}

/// Fetches and checks one row; the status row and, on success, the sample's tar members.
async fn fetch_row(
    fetcher: &Fetcher,
    row: &UrlRow,
    shard: usize,
    limits: &ValidationLimits,
) -> (StatusRow, Option<Members>) {
    let key = format!("{:09}", row.index);
    let mut status = StatusRow {
        index: row.index,
        key: key.clone(),
        shard: shard_name(shard),
        url: row.url.clone(),
        caption: row.caption.clone(),
        status: "failed".into(),
        reason: None,
        http_status: None,
        bytes: 0,
        sha256: None,
        format: None,
        width: None,
        height: None,
        content_type: None,
        final_url: None,
        attempts: 0,
        error: None,
        extra: Value::Object(row.extra.clone()).to_string(),
    };
    if let Some(bad) = &row.bad {
        status.reason = Some("bad-record".into());
        status.error = Some(bad.clone());
        return (status, None);
    }
    let Attempted { result, attempts } = fetcher.fetch(&row.url, row.index).await;
    status.attempts = attempts;
    let fetched = match result {
        Ok(f) => f,
        Err(f) => {
            status.reason = Some(f.reason);
            status.http_status = f.http_status;
            status.error = Some(f.message);
            return (status, None);
        }
    };
    status.http_status = Some(fetched.http_status);
    status.content_type = fetched.content_type.clone();
    status.final_url = Some(fetched.final_url.clone());
    let limits = ValidationLimits {
        max_bytes: limits.max_bytes.min(fetcher.config().max_bytes),
        ..*limits
    };
    let info = match validate_bytes(&fetched.bytes, &limits) {
        Ok(info) => info,
        Err(rej) => {
            status.reason = Some(match rej.reason {
                Reason::UnsupportedFormat | Reason::Empty => "not-an-image".to_string(),
                Reason::TooLarge => "too-large".to_string(),
                other => format!("image-{}", other.code()),
            });
            status.error = Some(match &fetched.content_type {
                Some(ct) => format!("{} (Content-Type: {ct})", rej.message),
                None => rej.message,
            });
            return (status, None);
        }
    };
    status.status = "success".into();
    status.bytes = info.bytes;
    status.sha256 = Some(info.content_hash.clone());
    status.format = Some(info.format.to_string());
    status.width = Some(info.width);
    status.height = Some(info.height);
    let ext = if info.format == "jpeg" { "jpg" } else { info.format };
    let meta = serde_json::json!({
        "key": key,
        "url": row.url,
        "final_url": fetched.final_url,
        "width": info.width,
        "height": info.height,
        "sha256": info.content_hash,
        "extra": Value::Object(row.extra.clone()),
    });
    let mut members = vec![(format!("{key}.{ext}"), fetched.bytes)];
    if let Some(c) = &row.caption {
        members.push((format!("{key}.txt"), c.as_bytes().to_vec()));
    }
    members.push((format!("{key}.json"), meta.to_string().into_bytes()));
    (status, Some(members))
}

/// Writes one shard: the tar (earlier successes kept, new ones added, in row order), then its status table,
/// each atomically; the status table last, so a shard counts as finished only when both are in place.
fn write_shard(plan: &ShardPlan<'_>, results: Vec<Done>, out: &Path) -> Result<()> {
    let tar_path = out.join(shard_name(plan.id));
    let mut rows: Vec<Option<StatusRow>> = match &plan.previous {
        Some(prev) => prev.iter().cloned().map(Some).collect(),
        None => vec![None; plan.rows.len()],
    };
    let mut groups: BTreeMap<String, Members> = BTreeMap::new();
    if let Some(prev) = &plan.previous {
        if prev.iter().any(StatusRow::ok) {
            let mut old = read_tar_groups(&tar_path)?;
            for r in prev.iter().filter(|r| r.ok()) {
                if let Some(m) = old.remove(&r.key) {
                    groups.insert(r.key.clone(), m);
                }
            }
        }
    }
    for done in results {
        if let Some(m) = done.members {
            groups.insert(done.row.key.clone(), m);
        }
        rows[done.position] = Some(done.row);
    }
    let rows: Vec<StatusRow> = rows.into_iter().flatten().collect();
    let bytes = tar_bytes(groups.values()).at(&tar_path)?;
    imglish_ingest::write_atomic(&tar_path, &bytes)?;
    write_status(&out.join(status_name(plan.id)), &rows)?;
    Ok(())
}

/// Joins the shards' status tables into `status.parquet` and writes `download.json`.
fn finish(
    config: &DownloadConfig,
    out: &Path,
    rows: &[UrlRow],
    plans: &[ShardPlan<'_>],
    tally: &Tally,
    started: Instant,
    urls_sha256: String,
) -> Result<DownloadSummary> {
    let mut all = Vec::with_capacity(rows.len());
    for plan in plans {
        all.extend(read_status(&out.join(status_name(plan.id)))?);
    }
    write_status(&out.join(STATUS_FILE), &all)?;
    let mut by_reason = BTreeMap::new();
    for r in all.iter().filter(|r| !r.ok()) {
        *by_reason.entry(r.reason.clone().unwrap_or_default()).or_insert(0u64) += 1;
    }
    let succeeded = all.iter().filter(|r| r.ok()).count() as u64;
    let summary = DownloadSummary {
        listed: rows.len() as u64,
        succeeded,
        failed: all.len() as u64 - succeeded,
        by_reason,
        bytes: all.iter().map(|r| r.bytes).sum(),
        shards: plans.len(),
        shards_written: tally.shards_written,
        fetched_this_run: tally.fetched,
        succeeded_this_run: tally.succeeded,
        bytes_this_run: tally.bytes,
        honour_opt_out: config.fetch.honour_opt_out,
        wall_seconds: started.elapsed().as_secs_f64(),
        urls_sha256,
    };
    let mut json = serde_json::to_value(&summary).unwrap_or(Value::Null);
    json["format"] = "imglish-download".into();
    json["shard_files"] = plans.iter().map(|p| shard_name(p.id)).collect::<Vec<_>>().into();
    json["config"] = serde_json::to_value(config).unwrap_or(Value::Null);
    let text = serde_json::to_string_pretty(&json).unwrap_or_default();
    imglish_ingest::write_atomic(&out.join(DOWNLOAD_FILE), text.as_bytes())?;
    Ok(summary)
}
