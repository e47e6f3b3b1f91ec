use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use imglish_ingest::{write_demo_corpus, DemoConfig};

use crate::output::Output;

#[derive(Debug, Args)]
pub struct DemoCorpusArgs {
    /// Output directory (must not exist, or hold a demo corpus made with the same settings).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Number of good images to draw.
    #[arg(long, default_value_t = 240)]
    pub images: usize,

    /// Seed for every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: &DemoCorpusArgs, out: &Output) -> anyhow::Result<()> {
    let config = DemoConfig::default().try_with_images(args.images)?.with_seed(args.seed);
    let started = std::time::Instant::now();
    let bar = out.progress(args.images as u64, "drawing");
    let summary = write_demo_corpus(&args.out, &config, &|n| bar.inc(n))
        .with_context(|| format!("cannot write the demo corpus to {}", args.out.display()))?;
    bar.finish_and_clear();
    let text = format!(
        "demo corpus: {} images in {} classes, {} captions, {} tar shards, {} bad inputs -> {} ({:.1}s)",
        summary.images,
        summary.classes.len(),
        summary.captions,
        summary.shards,
        summary.bad_inputs.len(),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    out.summary(
        &text,
        &serde_json::json!({
            "event": "demo-corpus",
            "out": args.out,
            "images": summary.images,
            "captions": summary.captions,
            "shards": summary.shards,
            "bad_inputs": summary.bad_inputs.len(),
            "seconds": started.elapsed().as_secs_f64(),
        }),
    );
    Ok(())
}
