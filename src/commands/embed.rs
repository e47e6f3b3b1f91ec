//! `imglish embed`: a checkpoint's features of every sample (and, for BEiT-3, caption) into a Parquet file.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use imglish_pack::Split;
use imglish_train::{embed, EmbedConfig, Pool, TorchDevice};

use super::folders::{expect, Folder};
use crate::output::Output;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolArg {
    /// The CLS output.
    Cls,
    /// The mean over patches (texts: over non-padding tokens).
    Mean,
    /// Both columns.
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Train,
    Val,
    All,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A checkpoint directory (`RUN/checkpoints/step-NNNNNNNN`) or a run directory (its newest checkpoint).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Dataset directory.
    #[arg(long, value_name = "DIR")]
    pub dataset: PathBuf,
    /// The Parquet file to write (written under a temporary name, then renamed).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Pooled features per row.
    #[arg(long, value_enum, default_value_t = PoolArg::Both)]
    pub pool: PoolArg,
    /// Which split.
    #[arg(long, value_enum, default_value_t = SplitArg::All)]
    pub split: SplitArg,
    /// A row for every stored view (default: the centre view only).
    #[arg(long)]
    pub all_views: bool,
    /// BEiT-3: no caption / text rows.
    #[arg(long)]
    pub no_texts: bool,
    /// Inputs per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Pixel-input encoders: embed the centre view of each original image of this ingest manifest (the one the
    /// dataset was made from) instead of the stored working image.
    #[arg(long, value_name = "MANIFEST", conflicts_with = "all_views")]
    pub images: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::cli::device_arg)]
    pub device: String,
}

pub fn run(args: &EmbedArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    expect(&args.dataset, Folder::Dataset, "--dataset")?;
    if let Some(images) = &args.images {
        expect(images, Folder::Manifest, "--images")?;
    }
    imglish_train::prepare_process(threads);
    let device: TorchDevice = args.device.parse()?;
    let checkpoint = imglish_train::resolve_checkpoint(&args.checkpoint)?;
    let config = EmbedConfig {
        pool: match args.pool {
            PoolArg::Cls => Pool::Cls,
            PoolArg::Mean => Pool::Mean,
            PoolArg::Both => Pool::Both,
        },
        split: match args.split {
            SplitArg::Train => Some(Split::Train),
            SplitArg::Val => Some(Split::Val),
            SplitArg::All => None,
        },
        all_views: args.all_views,
        texts: !args.no_texts,
        batch_size: args.batch_size,
        images: args.images.clone(),
    };
    let started = std::time::Instant::now();
    let bar = out.spinner("embedding samples");
    let summary = embed(
        &args.dataset,
        &checkpoint,
        &args.out,
        &config,
        device,
        &mut |n, total| {
            if bar.length() != Some(total) {
                imglish_ingest::Progress::phase(&crate::output::BarProgress(&bar), "embedding samples", total);
            }
            bar.set_position(n)
        },
    )
    .with_context(|| {
        format!(
            "embedding {} with {} failed",
            args.dataset.display(),
            checkpoint.display()
        )
    })?;
    bar.finish_and_clear();
    let text = format!(
        "embed: {} image rows, {} text rows, {} features each; {} ({:.1}s)",
        summary.image_rows,
        summary.text_rows,
        summary.dim,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    let mut json = serde_json::to_value(&summary)?;
    json["event"] = "embed".into();
    json["out"] = serde_json::to_value(&args.out)?;
    out.summary(&text, &json);
    Ok(())
}
