use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use imglish_tokenizer::{fit_codebook, fit_text_tokenizer, Card, FitConfig, Normalization, PatchFeatures, TextModel};

use super::folders::{expect, Folder};
use crate::output::{BarProgress, Output};

#[derive(Debug, Args)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    pub command: TokenizerCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Fit a patch codebook (k-means) on a manifest and write it as an ONNX tokenizer with its card.
    Fit(FitArgs),
    /// Train a text tokenizer (tokenizer.json) on the manifest's captions.
    FitText(FitTextArgs),
    /// Train a discrete VAE tokenizer (DALL-E's Gumbel-softmax recipe) on a manifest's images with libtorch, and
    /// export its encoder (the tokenizer) and decoder as ONNX with the card.
    TrainDvae(super::dvae::TrainDvaeArgs),
    /// Measure a visual tokenizer on a manifest's held-out images: code usage, perplexity and, when it has a
    /// decoder, the reconstruction's PSNR.
    Eval(super::dvae::EvalArgs),
    /// Write the card of a third-party ONNX visual tokenizer (grid, vocabulary and output kind read from a
    /// probe batch; the sha256 of the model and of every external data file), then load it back.
    Card(CardArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NormArg {
    /// DALL-E's map_pixels: (1 - 2·eps)·x + eps, x in [0, 1] (eps from --eps).
    LogitLaplace,
    /// 2·x - 1.
    MinusOneOne,
    /// (x - ImageNet mean) / ImageNet std.
    Imagenet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FilterArg {
    Lanczos3,
    Bicubic,
    Bilinear,
}

#[derive(Debug, Args)]
pub struct CardArgs {
    /// The ONNX model (its external data files, if any, beside it).
    #[arg(long, value_name = "FILE")]
    pub onnx: PathBuf,
    /// Square input size in pixels.
    #[arg(long)]
    pub input_size: u32,
    /// The pixel normalisation the model expects.
    #[arg(long, value_enum)]
    pub normalization: NormArg,
    /// eps of --normalization logit-laplace.
    #[arg(long, default_value_t = 0.1)]
    pub eps: f32,
    /// Filter that resizes views to the input size.
    #[arg(long, value_enum, default_value_t = FilterArg::Bicubic)]
    pub resize_filter: FilterArg,
    /// Number of codes, for models that output indices (logits give it).
    #[arg(long)]
    pub vocab_size: Option<u32>,
    /// A human name (default: the file's stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Where to write the card (default: beside the model as NAME.card.json, where tokenize looks for it).
    #[arg(long, value_name = "CARD")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// The manifest directory written by `imglish ingest`.
    #[arg(long, value_name = "DIR")]
    pub manifest: PathBuf,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 8)]
    pub patch: u32,
    /// Input size (a multiple of --patch); the grid is input/patch squared.
    #[arg(long, default_value_t = 112)]
    pub input_size: u32,
    /// Number of codes.
    #[arg(long, default_value_t = 512)]
    pub codebook: u32,
    /// Lloyd iterations.
    #[arg(long, default_value_t = 15)]
    pub iterations: u32,
    /// Views per training image (centre + random crops).
    #[arg(long, default_value_t = 2)]
    pub views: u32,
    /// At most this many training images.
    #[arg(long, default_value_t = 5000)]
    pub max_images: usize,
    /// At most this many training patches.
    #[arg(long, default_value_t = 200_000)]
    pub max_patches: usize,
    /// What codes match: `rgb` (colours and texture), `centred` (minus each patch's mean) or `structure`
    /// (colour-free edges and textures by direction, plus a "flat" code: the vocabulary stays --codebook).
    #[arg(long, value_enum, default_value_t = Features::Rgb)]
    pub features: Features,
    /// With --features structure: RMS contrast per pixel (pixels in [-1, 1]) below which a patch is "flat".
    #[arg(long, default_value_t = 0.04)]
    pub flat_threshold: f32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output ONNX file; the card is written beside it (`NAME.card.json`).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Features {
    /// RGB pixels.
    Rgb,
    /// RGB pixels minus the patch mean.
    Centred,
    /// Luma minus the patch mean, by direction, plus a "flat" code.
    Structure,
}

impl From<Features> for PatchFeatures {
    fn from(f: Features) -> Self {
        match f {
            Features::Rgb => PatchFeatures::Rgb,
            Features::Centred => PatchFeatures::Centred,
            Features::Structure => PatchFeatures::Structure,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Model {
    /// Byte-pair encoding.
    Bpe,
    /// WordPiece.
    Wordpiece,
    /// Unigram.
    Unigram,
}

#[derive(Debug, Args)]
pub struct FitTextArgs {
    /// The manifest directory written by `imglish ingest`.
    #[arg(long, value_name = "DIR")]
    pub manifest: PathBuf,
    /// Vocabulary size.
    #[arg(long, default_value_t = 2000)]
    pub vocab_size: usize,
    /// Tokenizer model. BPE (the default) trains deterministically: the same captions give the same file. HF's
    /// WordPiece and Unigram trainers break ties in hash-map order, so their output can differ between runs.
    #[arg(long, value_enum, default_value_t = Model::Bpe)]
    pub model: Model,
    /// Output tokenizer.json.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: &TokenizerArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    match &args.command {
        TokenizerCommand::TrainDvae(a) => super::dvae::train(a, threads, out),
        TokenizerCommand::Eval(a) => super::dvae::eval(a, out),
        TokenizerCommand::Fit(a) => fit(a, out),
        TokenizerCommand::FitText(a) => fit_text(a, out),
        TokenizerCommand::Card(a) => card(a, out),
    }
}

fn card(a: &CardArgs, out: &Output) -> anyhow::Result<()> {
    let spec = imglish_tokenizer::CardSpec {
        name: a.name.clone().unwrap_or_else(|| {
            a.onnx
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        }),
        input_size: a.input_size,
        normalization: match a.normalization {
            NormArg::LogitLaplace => Normalization::LogitLaplace { eps: a.eps },
            NormArg::MinusOneOne => Normalization::MinusOneOne,
            NormArg::Imagenet => Normalization::MeanStd {
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
            },
        },
        resize_filter: match a.resize_filter {
            FilterArg::Lanczos3 => imglish_ingest::Filter::Lanczos3,
            FilterArg::Bicubic => imglish_ingest::Filter::Bicubic,
            FilterArg::Bilinear => imglish_ingest::Filter::Bilinear,
        },
        vocab_size: a.vocab_size,
    };
    let options = imglish_tokenizer::SessionOptions::default();
    let card = imglish_tokenizer::card_for_model(&a.onnx, &spec, &options)?;
    let path = a.out.clone().unwrap_or_else(|| Card::path_for(&a.onnx));
    imglish_ingest::write_atomic(&path, &serde_json::to_vec_pretty(&card)?)?;
    if path == Card::path_for(&a.onnx) {
        imglish_tokenizer::VisualTokenizer::load(&a.onnx, &options)
            .context("the model does not load back with the card just written")?;
    } else {
        tracing::warn!(
            "{} is not where tokenize looks for the card ({}): move it there before use",
            path.display(),
            Card::path_for(&a.onnx).display()
        );
    }
    let text = format!(
        "tokenizer card: {} -> {:?} {}x{} grid, {} codes, {} external data file(s); wrote {}",
        a.onnx.display(),
        card.output,
        card.grid[0],
        card.grid[1],
        card.vocab_size,
        card.external_data.len(),
        path.display()
    );
    let mut json = serde_json::to_value(&card)?;
    json["event"] = "tokenizer-card".into();
    out.summary(&text, &json);
    Ok(())
}

impl FitArgs {
    /// The k-means settings these flags give.
    pub fn config(&self) -> FitConfig {
        let a = self;
        FitConfig {
            patch: a.patch,
            input_size: a.input_size,
            codebook: a.codebook,
            iterations: a.iterations,
            seed: a.seed,
            max_images: a.max_images,
            max_patches: a.max_patches,
            views_per_image: a.views,
            features: a.features.into(),
            flat_threshold: a.flat_threshold,
        }
    }
}

/// `tokenizer fit` and `fit-text` write files (model, card, decoder) into a folder: they hold that folder's lock
/// while they run, so a second fit into it is refused at once instead of racing the first one's renames.
fn lock_folder_of(file: &Path) -> anyhow::Result<super::lock::DirLock> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    super::lock::lock_dir(dir)
}

fn fit(a: &FitArgs, out: &Output) -> anyhow::Result<()> {
    let _lock = lock_folder_of(&a.out)?;
    expect(&a.manifest, Folder::Manifest, "--manifest")?;
    let config = a.config();
    let bar = out.spinner("opening the manifest");
    let started = std::time::Instant::now();
    let (codebook, report) = fit_codebook(&a.manifest, &config, &BarProgress(&bar))?;
    bar.finish_and_clear();
    let bytes = codebook.to_onnx();
    let mut card = codebook.card(&bytes, &report);
    // RGB codebooks can draw their codes back (each patch as its centroid): a decoder beside the model.
    if let Some(decoder) = codebook.decoder_onnx() {
        let path = a.out.with_extension("decoder.onnx");
        imglish_ingest::write_atomic(&path, &decoder)?;
        card.decoder = Some(imglish_tokenizer::DecoderRef {
            file: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: imglish_tokenizer::sha256_hex(&decoder),
        });
    }
    imglish_ingest::write_atomic(&a.out, &bytes)?;
    let card_path = Card::path_for(&a.out);
    imglish_ingest::write_atomic(&card_path, &serde_json::to_vec_pretty(&card)?)?;
    // Load it back through ONNX Runtime, exactly as tokenize will.
    imglish_tokenizer::VisualTokenizer::load(&a.out, &imglish_tokenizer::SessionOptions::default())
        .context("the fitted tokenizer does not load back")?;
    let text = format!(
        "tokenizer fit: {} codes of {}x{} patches on {} training patches ({:.1}s); codes used by them {:.1}%\n  held-out: {} patches of {} images, codes used {:.1}%{}, perplexity {:.1}, quantisation error {:.4} (one code: {:.4}){}\n  wrote {} and {}",
        codebook.len(),
        a.patch,
        a.patch,
        report.train_patches,
        started.elapsed().as_secs_f64(),
        report.fit_usage * 100.0,
        report.heldout_patches,
        report.heldout_images,
        report.usage * 100.0,
        if report.heldout_patches < 4 * codebook.len() {
            " (too few patches to see every code)"
        } else {
            ""
        },
        report.perplexity,
        report.quant_error,
        report.quant_error_one_code,
        if codebook.features() == PatchFeatures::Structure {
            format!(", flat {:.1}%", report.flat_fraction * 100.0)
        } else {
            String::new()
        },
        a.out.display(),
        card_path.display()
    );
    let mut json = serde_json::to_value(&report)?;
    json["event"] = "tokenizer-fit".into();
    json["out"] = serde_json::to_value(&a.out)?;
    out.summary(&text, &json);
    Ok(())
}

fn fit_text(a: &FitTextArgs, out: &Output) -> anyhow::Result<()> {
    let _lock = lock_folder_of(&a.out)?;
    expect(&a.manifest, Folder::Manifest, "--manifest")?;
    let manifest = imglish_ingest::Manifest::open(&a.manifest)?;
    let captions: Vec<String> = manifest
        .rows
        .iter()
        .filter(|r| r.split == imglish_ingest::Split::Train)
        .flat_map(|r| r.captions.iter().cloned())
        .chain(
            manifest
                .texts
                .iter()
                .filter(|t| t.split == imglish_ingest::Split::Train)
                .map(|t| t.text.clone()),
        )
        .collect();
    anyhow::ensure!(
        !captions.is_empty(),
        "{}: the train split has no captions and no text documents",
        a.manifest.display()
    );
    let model = match a.model {
        Model::Bpe => TextModel::Bpe,
        Model::Wordpiece => TextModel::Wordpiece,
        Model::Unigram => TextModel::Unigram,
    };
    fit_text_tokenizer(&captions, model, a.vocab_size, &a.out)?;
    let tok = imglish_tokenizer::TextTokenizer::load(&a.out, 64)?;
    let text = format!(
        "tokenizer fit-text: {:?} with {} tokens on {} captions and texts -> {}",
        model,
        tok.vocab_size(),
        captions.len(),
        a.out.display()
    );
    out.summary(
        &text,
        &serde_json::json!({"event": "tokenizer-fit-text", "vocab_size": tok.vocab_size(), "captions": captions.len(), "out": a.out}),
    );
    Ok(())
}
