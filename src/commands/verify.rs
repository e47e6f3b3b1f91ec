//! `imglish verify`: every shard's size, sha256, structure, schema and batches, and the dataset's counts.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use imglish_pack::Dataset;

use super::folders::{expect, Folder};
use crate::output::Output;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Dataset directory (with index.json).
    #[arg(value_name = "DATASET")]
    pub dataset: PathBuf,
}

pub fn run(args: &VerifyArgs, out: &Output) -> anyhow::Result<()> {
    expect(&args.dataset, Folder::Dataset, "DATASET")?;
    let started = std::time::Instant::now();
    let dataset = Dataset::open(&args.dataset).with_context(|| format!("cannot open {}", args.dataset.display()))?;
    let bar = out.phase("verifying shards", dataset.shards().len() as u64);
    let report = dataset.verify_with_progress(&|n| bar.inc(n));
    bar.finish_and_clear();
    if !report.is_ok() {
        let mut lines: Vec<String> = report.bad.iter().map(|(_, e)| e.clone()).collect();
        lines.extend(report.problems.iter().cloned());
        let names: Vec<&str> = report.bad.iter().map(|(f, _)| f.as_str()).collect();
        anyhow::bail!(
            "{}: {} of {} shards bad ({}){}{}",
            args.dataset.display(),
            report.bad.len(),
            report.shards,
            names.join(", "),
            if lines.is_empty() { "" } else { "\n  " },
            lines.join("\n  ")
        );
    }
    let record = super::build::check_record(&args.dataset, &dataset)?;
    let seconds = started.elapsed().as_secs_f64();
    let text = format!(
        "verify: {} ok: {} shards, {} samples ({} train, {} val), {:.1} MB{} ({seconds:.1}s)",
        args.dataset.display(),
        report.shards,
        report.counts.total(),
        report.counts.train,
        report.counts.val,
        dataset.index().bytes() as f64 / 1e6,
        if record.is_some() {
            ", matches its build record"
        } else {
            ""
        },
    );
    out.summary(
        &text,
        &serde_json::json!({
            "event": "verify",
            "dataset": args.dataset,
            "ok": true,
            "shards": report.shards,
            "train": report.counts.train,
            "val": report.counts.val,
            "build_record": record.is_some(),
            "seconds": seconds,
        }),
    );
    Ok(())
}
