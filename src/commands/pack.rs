//! `imglish pack`: token parts into Arrow IPC + zstd shards and `index.json`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use imglish_pack::{pack_dataset, PackConfig, TokensManifest};

use super::folders::{expect, Folder};
use crate::output::Output;

#[derive(Debug, Args)]
pub struct PackArgs {
    /// Tokens directory written by `imglish tokenize` (part-NNNNN.parquet + tokenize.json).
    #[arg(long, value_name = "DIR")]
    pub tokens: PathBuf,

    /// Manifest directory written by `imglish ingest`; its fingerprint (ingest.json) joins the build fingerprint.
    #[arg(long, value_name = "DIR")]
    pub manifest: Option<PathBuf>,

    /// Dataset directory to write (must be empty, hold an interrupted build of the same inputs and settings,
    /// or the same complete dataset), or an object storage URL (s3://, gs://, az://): the dataset is packed into
    /// a staging folder under --cache-dir, then uploaded, shards first and index.json last.
    #[arg(long, value_name = "DIR|URL")]
    pub out: PathBuf,

    /// Close a shard after the record batch that brings it to this many bytes.
    #[arg(long, value_name = "N", default_value_t = PackConfig::default().target_shard_bytes)]
    pub target_shard_bytes: u64,

    /// Rows per record batch (the unit of random access).
    #[arg(long, value_name = "R", default_value_t = PackConfig::default().batch_rows)]
    pub batch_rows: u32,

    /// zstd level of the shard bodies.
    #[arg(long, value_name = "L", default_value_t = PackConfig::default().zstd_level, allow_hyphen_values = true)]
    pub zstd_level: i32,

    /// Globally pre-shuffle samples (order by a keyed hash of the sample id); default: keep the parts' order.
    #[arg(long, value_name = "S")]
    pub shuffle_seed: Option<u64>,

    /// Keep the working image bytes in a `pixels` column.
    #[arg(long)]
    pub include_pixels: bool,
}

pub fn run(args: &PackArgs, options: &imglish_pack::RemoteOptions, out: &Output) -> anyhow::Result<()> {
    let url = imglish_pack::remote_url(&args.out).map(str::to_string);
    // A remote dataset is packed into a local staging folder first (kept: a rerun of the same pack reuses it).
    let dir = match &url {
        Some(u) => options.staging_dir(u),
        None => args.out.clone(),
    };
    let _lock = super::lock::lock_dir(&dir)?;
    expect(&args.tokens, Folder::Tokens, "--tokens")?;
    if let Some(m) = &args.manifest {
        expect(m, Folder::Manifest, "--manifest")?;
    }
    let config = PackConfig {
        target_shard_bytes: args.target_shard_bytes,
        batch_rows: args.batch_rows,
        zstd_level: args.zstd_level,
        shuffle_seed: args.shuffle_seed,
        include_pixels: args.include_pixels,
    };
    let started = std::time::Instant::now();
    let tokens = TokensManifest::read(&args.tokens)
        .with_context(|| format!("cannot read the tokens directory {}", args.tokens.display()))?;
    let bar = out.progress(tokens.counts.total(), "packing");
    let summary = pack_dataset(&args.tokens, args.manifest.as_deref(), &dir, &config, &|n| bar.inc(n))
        .with_context(|| format!("cannot pack {} into {}", args.tokens.display(), dir.display()))?;
    bar.finish_and_clear();
    if let Some(u) = &url {
        let bar = out.progress(summary.bytes, "uploading");
        imglish_pack::upload_dataset(&dir, u, &[], &mut |n| bar.set_position(n))
            .with_context(|| format!("cannot upload {} to {u}", dir.display()))?;
        bar.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    let n = summary.counts.total();
    let state = if summary.up_to_date {
        " (already up to date)".to_string()
    } else if summary.reused_shards > 0 {
        format!(" (resumed: {} shards kept)", summary.reused_shards)
    } else {
        String::new()
    };
    let text = format!(
        "pack: {n} samples ({} train, {} val) in {} shards, {:.1} MB, {:.0} bytes/sample -> {}{state} ({seconds:.1}s)",
        summary.counts.train,
        summary.counts.val,
        summary.shards,
        summary.bytes as f64 / 1e6,
        if n == 0 { 0.0 } else { summary.bytes as f64 / n as f64 },
        args.out.display(),
    );
    out.summary(
        &text,
        &serde_json::json!({
            "event": "pack",
            "out": args.out,
            "samples": n,
            "train": summary.counts.train,
            "val": summary.counts.val,
            "shards": summary.shards,
            "reused_shards": summary.reused_shards,
            "up_to_date": summary.up_to_date,
            "bytes": summary.bytes,
            "build_fingerprint": summary.build_fingerprint,
            "seconds": seconds,
        }),
    );
    Ok(())
}
