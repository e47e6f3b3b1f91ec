use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use imglish_tokenizer::{
    tokenize, Device, PixelsConfig, SessionOptions, TextTokenizer, TokenizeConfig, VisualTokenizer,
};

use super::folders::{expect, Folder};
use crate::output::{BarProgress, Output};

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// The manifest directory written by `imglish ingest`.
    #[arg(long, value_name = "DIR")]
    pub manifest: PathBuf,
    /// The visual tokenizer (ONNX; its card `NAME.card.json` beside it).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: PathBuf,
    /// A text tokenizer (tokenizer.json) for the captions.
    #[arg(long, value_name = "FILE")]
    pub text_tokenizer: Option<PathBuf>,
    /// Maximum caption length in tokens (special tokens included).
    #[arg(long, default_value_t = 64)]
    pub max_text_len: usize,
    /// Views per image: view 0 is the centre view, the others random-resized crops with flips.
    #[arg(long, default_value_t = 4)]
    pub views: u32,
    /// Output directory of the token parts.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Execution provider: cpu, auto, cuda[:N], tensorrt[:N].
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Views per model batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Samples per part.
    #[arg(long, default_value_t = 4096)]
    pub part_samples: usize,
    /// Seed of the random views.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Decode JPEGs at the reduced scale Pillow's draft() would use (at least the view size, not twice it):
    /// faster on large photos, softer views (docs/performance.md has the speed and PSNR).
    #[arg(long)]
    pub jpeg_draft: bool,
    /// Decode every scan of progressive JPEGs. By default, when the views are at least 4x smaller than the
    /// image, its final AC refinement scans (the last bit of each AC coefficient) are skipped, from 8x all AC
    /// refinement scans: such files decode in a half to two thirds of the time, views ≥ 49.9 dB PSNR against a
    /// full decode on the benchmark photos (docs/performance.md).
    #[arg(long)]
    pub jpeg_all_scans: bool,

    /// Replace parts in --out made by another run (other manifest, tokenizer or settings; refused by default).
    #[arg(long)]
    pub overwrite: bool,
    /// Keep each sample's working image (JPEG) so a trainer can rebuild view pixels.
    #[arg(long)]
    pub keep_pixels: bool,
    /// Shorter side of the kept working image.
    #[arg(long, default_value_t = 256)]
    pub pixels_size: u32,
    /// JPEG quality of the kept working image.
    #[arg(long, default_value_t = 90)]
    pub pixels_quality: u8,
    /// Process only parts n with n % N == I (several processes or machines split the work).
    #[arg(long, value_name = "I/N", value_parser = parse_worker, default_value = "0/1")]
    pub worker: (u32, u32),
}

fn parse_worker(s: &str) -> Result<(u32, u32), String> {
    let (i, n) = s.split_once('/').ok_or_else(|| format!("'{s}' is not I/N"))?;
    let (i, n) = (
        i.parse::<u32>().map_err(|e| e.to_string())?,
        n.parse::<u32>().map_err(|e| e.to_string())?,
    );
    if n == 0 || i >= n {
        return Err(format!("'{s}': expected 0 <= I < N"));
    }
    Ok((i, n))
}

/// A manifest whose ingest accepted nothing (made with `--allow-empty`) has nothing to tokenize: a run that
/// would produce nothing is a failure, not a success.
fn refuse_empty(manifest: &std::path::Path) -> anyhow::Result<()> {
    let record: serde_json::Value = std::fs::read(manifest.join("ingest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let counts = &record["counts"];
    let (accepted, texts) = (counts["accepted"].as_u64(), counts["texts"].as_u64().unwrap_or(0));
    if accepted == Some(0) && texts == 0 {
        anyhow::bail!(
            "--manifest {} holds no samples (its ingest accepted nothing of {} items seen): nothing to tokenize",
            manifest.display(),
            counts["seen"].as_u64().unwrap_or(0)
        );
    }
    Ok(())
}

pub fn run(args: &TokenizeArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    // Workers of one run (`--worker I/N`) share the folder by design (each writes its own parts): they take the
    // folder's lock shared, a single writer takes it alone.
    let _lock = if args.worker.1 == 1 {
        super::lock::lock_dir(&args.out)?
    } else {
        super::lock::share_dir(&args.out)?
    };
    expect(&args.manifest, Folder::Manifest, "--manifest")?;
    refuse_empty(&args.manifest)?;
    let options = SessionOptions::default()
        .with_device(args.device)
        .try_with_threads(threads)?;
    let mut visual = VisualTokenizer::load(&args.tokenizer, &options)
        .with_context(|| format!("cannot load the visual tokenizer {}", args.tokenizer.display()))?;
    tracing::info!(
        provider = visual.provider(),
        "visual tokenizer on {}",
        visual.provider()
    );
    let text = match &args.text_tokenizer {
        Some(p) => {
            let t = TextTokenizer::load(p, args.max_text_len)?;
            for what in t.overridden() {
                tracing::warn!(
                    "{}: its baked-in {what} is overridden (ragged ids, truncation to {})",
                    p.display(),
                    args.max_text_len
                );
            }
            Some(t)
        }
        None => None,
    };
    let config = TokenizeConfig {
        views: args.views,
        batch_size: args.batch_size,
        seed: args.seed,
        part_samples: args.part_samples,
        pixels: args.keep_pixels.then_some(PixelsConfig {
            short_side: args.pixels_size,
            quality: args.pixels_quality,
        }),
        worker: args.worker,
        jpeg_draft: args.jpeg_draft,
        jpeg_all_scans: args.jpeg_all_scans,
        overwrite: args.overwrite,
        tokenizers_label: Some(format!(
            "--tokenizer {}{}",
            args.tokenizer.display(),
            args.text_tokenizer
                .as_ref()
                .map(|t| format!(" --text-tokenizer {}", t.display()))
                .unwrap_or_default()
        )),
        ..TokenizeConfig::default()
    };
    let bar = out.spinner("tokenizing");
    let s = tokenize(
        &args.manifest,
        &args.out,
        &mut visual,
        text.as_ref(),
        &config,
        &BarProgress(&bar),
    )?;
    bar.finish_and_clear();
    let text = format!(
        "tokenize: {} images ({} views) tokenized, {} rejected{}; parts: {} written, {} already done, {} pending\n  {:.1} images/s on {}; model busy {:.0}% of the time, waiting for data {:.0}%\n  {}",
        s.images,
        s.views,
        s.rejected,
        if s.texts > 0 {
            format!(
                "; {} text documents in {} text samples ({} documents longer than --max-text-len cut into \
                 consecutive segments, none dropped)",
                s.texts,
                s.text_segments,
                s.texts_cut
            )
        } else {
            String::new()
        },
        s.parts_written,
        s.parts_skipped,
        s.parts_pending,
        s.images as f64 / s.seconds.max(1e-9),
        visual.provider(),
        s.model_busy() * 100.0,
        (1.0 - s.model_busy()) * 100.0,
        if s.complete {
            format!("complete: {}", args.out.join("tokenize.json").display())
        } else {
            "other workers' parts are not done yet; tokenize.json is written by the last one".to_string()
        }
    );
    let mut json = serde_json::to_value(&s)?;
    json["event"] = "tokenize".into();
    json["model_busy"] = s.model_busy().into();
    out.summary(&text, &json);
    Ok(())
}
