//! `imglish inspect`: sizes, splits, compression, visual-code usage and caption lengths of a dataset.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use imglish_pack::{Dataset, LengthSummary};

use super::folders::{expect, Folder};
use crate::output::Output;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("one_sample").args(["sample", "key"])))]
pub struct InspectArgs {
    /// Dataset directory (with index.json).
    #[arg(value_name = "DATASET")]
    pub dataset: PathBuf,

    /// Also print this sample (by sample id): its views' crops and tokens, captions and label.
    #[arg(long, value_name = "ID")]
    pub sample: Option<u64>,

    /// With --sample: draw it as a PNG, one column per view: the view cut from the stored pixels (if the
    /// dataset was packed with --include-pixels) above its token grid, one colour per code.
    #[arg(long, value_name = "OUT.png", requires = "one_sample")]
    pub png: Option<PathBuf>,

    /// With --png: the visual tokenizer the dataset was tokenized with (ONNX with its card). When it has a
    /// decoder (`tokenizer train-dvae`, k-means RGB codebooks), a last row draws each view as the decoder
    /// reconstructs it from the view's tokens.
    #[arg(long, value_name = "FILE", requires = "png")]
    pub tokenizer: Option<PathBuf>,

    /// The manifest the dataset was made from (`imglish ingest --out`): class names in the label histogram and
    /// the sample, and --key.
    #[arg(long, value_name = "DIR")]
    pub manifest: Option<PathBuf>,

    /// Print the sample whose source key (the file's path inside its folder or tar, or a Parquet row's key) is
    /// KEY or ends with /KEY; needs --manifest.
    #[arg(long, value_name = "KEY", requires = "manifest", conflicts_with = "sample")]
    pub key: Option<String>,

    /// The text tokenizer (tokenizer.json) the captions were tokenized with: captions are printed as text.
    #[arg(long, value_name = "FILE")]
    pub text_tokenizer: Option<PathBuf>,
}

/// Tokens as rows of the grid, right-aligned to the widest code.
fn token_grid(tokens: &[u16], width: usize, vocab: u32) -> String {
    let w = vocab.saturating_sub(1).max(1).to_string().len();
    tokens
        .chunks(width.max(1))
        .map(|row| {
            let cells: Vec<String> = row.iter().map(|t| format!("{t:>w$}")).collect();
            format!("\n      {}", cells.join(" "))
        })
        .collect()
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
    let manifest = match &args.manifest {
        Some(m) => {
            expect(m, Folder::Manifest, "--manifest")?;
            Some(
                imglish_ingest::Manifest::open(m)
                    .with_context(|| format!("cannot read the manifest {}", m.display()))?,
            )
        }
        None => None,
    };
    let names: BTreeMap<i32, String> = manifest
        .as_ref()
        .map(|m| m.classes.iter().map(|(name, &i)| (i, name.clone())).collect())
        .unwrap_or_default();
    let class = |l: i32| names.get(&l).map_or(l.to_string(), |n| format!("{l} {n}"));
    if !stats.labels.is_empty() {
        let hist: Vec<String> = stats
            .labels
            .iter()
            .map(|(&l, n)| format!("{}: {n}", class(l)))
            .collect();
        text.push_str(&format!(
            "\n  classes           {} ({})",
            stats.labels.len(),
            hist.join(", ")
        ));
    }
    let text_tokenizer = match &args.text_tokenizer {
        Some(p) => Some(
            imglish_tokenizer::TextTokenizer::load(p, usize::MAX)
                .with_context(|| format!("cannot load the text tokenizer {}", p.display()))?,
        ),
        None => None,
    };
    let mut json = serde_json::json!({"event": "inspect", "dataset": args.dataset, "stats": stats});
    let found = match (&args.key, &manifest) {
        (Some(key), Some(m)) => {
            let row = m
                .rows
                .iter()
                .find(|r| r.key == *key || r.key.ends_with(&format!("/{key}")))
                .with_context(|| {
                    format!(
                        "no sample of {} has the key {key}",
                        args.manifest
                            .as_ref()
                            .map_or(String::new(), |p| p.display().to_string())
                    )
                })?;
            Some((row.sample_id, Some(format!("{} in {}", row.key, row.source))))
        }
        _ => args.sample.map(|id| (id, None)),
    };
    if let Some((id, origin)) = found {
        let record = dataset
            .find(id)
            .with_context(|| format!("cannot read {}", args.dataset.display()))?
            .with_context(|| format!("sample {id} is not in {}", args.dataset.display()))?;
        text.push_str(&format!(
            "\nsample {id}{}: split {}, label {}, {} captions",
            origin.map(|o| format!(" ({o})")).unwrap_or_default(),
            record.split,
            record.label.map_or("none".to_string(), class),
            record.captions.len(),
        ));
        for (i, c) in record.captions.iter().enumerate() {
            let decoded = match &text_tokenizer {
                Some(t) => format!("{:?} ", t.decode(c)?),
                None => String::new(),
            };
            text.push_str(&format!("\n  caption {i}: {decoded}ids {c:?}"));
        }
        let info = dataset.tokenizer();
        for (i, v) in record.views.iter().enumerate() {
            text.push_str(&format!(
                "\n  view {i}: crop {:?} flip {}, tokens ({}x{}):{}",
                v.crop,
                v.flip,
                info.grid[0],
                info.grid[1],
                token_grid(&v.tokens, info.grid[1] as usize, info.vocab_size)
            ));
        }
        if let Some(png) = &args.png {
            let info = dataset.tokenizer();
            let reconstructions = match &args.tokenizer {
                Some(t) => reconstruct(t, &dataset, &record)?,
                None => Vec::new(),
            };
            let sheet = super::sheet::render(&record, info.grid, &reconstructions)
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
            if !reconstructions.is_empty() {
                text.push_str(", with the tokenizer decoder's reconstructions");
            }
            json["png"] = serde_json::json!(png);
            json["png_reconstructions"] = serde_json::json!(!reconstructions.is_empty());
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

/// Each view of `record` as the decoder of `tokenizer` draws it from the view's tokens; the tokenizer must be the
/// one the dataset was tokenized with and have a decoder.
fn reconstruct(
    tokenizer: &std::path::Path,
    dataset: &Dataset,
    record: &imglish_pack::TokenRecord,
) -> anyhow::Result<Vec<image::RgbImage>> {
    let options = imglish_tokenizer::SessionOptions::default();
    let tok = imglish_tokenizer::VisualTokenizer::load(tokenizer, &options)
        .with_context(|| format!("cannot load the visual tokenizer {}", tokenizer.display()))?;
    let want = &dataset.tokenizer().fingerprint;
    anyhow::ensure!(
        tok.fingerprint() == want,
        "--tokenizer {} is not the tokenizer the dataset was made with (fingerprint {}, the dataset's {})",
        tokenizer.display(),
        &tok.fingerprint()[..12],
        &want[..want.len().min(12)]
    );
    let Some(mut decoder) = imglish_tokenizer::TokenDecoder::load(tokenizer, tok.card(), &options)? else {
        anyhow::bail!(
            "--tokenizer {} has no decoder to draw reconstructions with (tokenizer train-dvae and k-means RGB \
             codebooks have one)",
            tokenizer.display()
        );
    };
    let views: Vec<&[u16]> = record.views.iter().map(|v| v.tokens.as_slice()).collect();
    let pixels = decoder.decode(&views)?;
    let s = tok.card().input_size;
    let plane = (s * s) as usize;
    Ok(pixels
        .chunks_exact(3 * plane)
        .map(|p| {
            image::RgbImage::from_fn(s, s, |x, y| {
                let i = (y * s + x) as usize;
                image::Rgb([0, 1, 2].map(|c| (p[c * plane + i] * 255.0).round().clamp(0.0, 255.0) as u8))
            })
        })
        .collect())
}
