//! `imglish inspect`: sizes, splits, compression, visual-code usage and caption lengths of a dataset.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use imglish_pack::{Dataset, LengthSummary};

use super::folders::{expect, Folder};
use crate::output::Output;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Dataset directory (with index.json).
    #[arg(value_name = "DATASET")]
    pub dataset: PathBuf,

    /// Also print this sample (by sample id): its views' crops and tokens, captions and label.
    #[arg(long, value_name = "ID")]
    pub sample: Option<u64>,

    /// With --sample: draw it as a PNG, one column per view: the view cut from the stored pixels (if the
    /// dataset was packed with --include-pixels) above its token grid, one colour per code.
    #[arg(long, value_name = "OUT.png", requires = "sample")]
    pub png: Option<PathBuf>,
}

fn lengths(l: &LengthSummary) -> String {
    format!(
        "min {} / mean {:.1} / p50 {} / p95 {} / max {}",
        l.min, l.mean, l.p50, l.p95, l.max
    )
}

pub fn run(args: &InspectArgs, out: &Output) -> anyhow::Result<()> {
    expect(&args.dataset, Folder::Dataset, "DATASET")?;
    let dataset = Dataset::open(&args.dataset).with_context(|| format!("cannot open {}", args.dataset.display()))?;
    let stats = dataset
        .stats()
        .with_context(|| format!("cannot read {}", args.dataset.display()))?;
    let info = dataset.tokenizer();
    let index = dataset.index();
    let mut text = format!(
        "dataset {}\n\
         \x20 shards            {} ({} record batches of up to {} rows), {:.2} MB\n\
         \x20 samples           {} ({} train, {} val), {:.0} bytes/sample; {} images, {} texts, {} pairs\n\
         \x20 tokens            {} views x {}x{} grid, vocab {}; raw u16 tokens {:.2} MB, compression {:.2}x\n\
         \x20 codes used        {} of {} ({:.1}%), perplexity {:.1}\n\
         \x20 captions/sample   {}\n\
         \x20 tokens/caption    {}\n\
         \x20 tokenizer         {}\n\
         \x20 build             {}",
        args.dataset.display(),
        stats.shards,
        stats.batches,
        index.config.batch_rows,
        stats.bytes as f64 / 1e6,
        stats.counts.total(),
        stats.counts.train,
        stats.counts.val,
        stats.bytes_per_sample,
        stats.kinds[0],
        stats.kinds[1],
        stats.kinds[2],
        info.views_per_sample,
        info.grid[0],
        info.grid[1],
        info.vocab_size,
        stats.token_bytes as f64 / 1e6,
        stats.compression_ratio,
        stats.codes_used,
        stats.vocab_size,
        100.0 * stats.codes_used as f64 / f64::from(stats.vocab_size.max(1)),
        stats.perplexity,
        lengths(&stats.captions_per_sample),
        lengths(&stats.caption_tokens),
        info.fingerprint,
        index.build_fingerprint,
    );
    let mut json = serde_json::json!({"event": "inspect", "dataset": args.dataset, "stats": stats});
    if let Some(id) = args.sample {
        let record = dataset
            .find(id)
            .with_context(|| format!("cannot read {}", args.dataset.display()))?
            .with_context(|| format!("sample {id} is not in {}", args.dataset.display()))?;
        text.push_str(&format!(
            "\nsample {id}: split {}, label {:?}, {} captions {:?}",
            record.split,
            record.label,
            record.captions.len(),
            record.captions
        ));
        for (i, v) in record.views.iter().enumerate() {
            text.push_str(&format!(
                "\n  view {i}: crop {:?} flip {} tokens {:?}",
                v.crop, v.flip, v.tokens
            ));
        }
        if let Some(png) = &args.png {
            let info = dataset.tokenizer();
            let sheet = super::sheet::render(&record, info.grid)
                .map_err(|e| anyhow::anyhow!("cannot draw sample {id} of {}: {e}", args.dataset.display()))?;
            let mut bytes = Vec::new();
            sheet
                .image
                .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
                .context("cannot encode the PNG")?;
            imglish_ingest::write_atomic(png, &bytes).with_context(|| format!("cannot write {}", png.display()))?;
            text.push_str(&format!(
                "\n  drawn to {} ({} views{})",
                png.display(),
                record.views.len(),
                if sheet.has_pixels {
                    ", pixels and token grids"
                } else {
                    ", token grids only: the dataset has no pixels (pack with --include-pixels)"
                }
            ));
            json["png"] = serde_json::json!(png);
            json["png_has_pixels"] = serde_json::json!(sheet.has_pixels);
        }
        json["sample"] = serde_json::json!({
            "sample_id": id,
            "split": record.split,
            "label": record.label,
            "captions": record.captions,
            "views": record.views.iter().map(|v| serde_json::json!({"crop": v.crop, "flip": v.flip, "tokens": v.tokens})).collect::<Vec<_>>(),
        });
    }
    out.summary(&text, &json);
    Ok(())
}
