//! `imglish tokenizer train-dvae` (a learned dVAE tokenizer: train with libtorch, export the encoder and the
//! decoder through imglish's ONNX writer, check the exported encoder's tokens against libtorch's) and
//! `imglish tokenizer eval` (held-out quality of any visual tokenizer).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use imglish_tokenizer::dvae::DvaeWeights;
use imglish_tokenizer::quality::{centre, evaluate_tokenizer, heldout_rows};
use imglish_tokenizer::{Card, SessionOptions, VisualTokenizer};
use imglish_train::dvae::{
    codes_with_margins, load_dvae, train_dvae, DvaeConfig, DvaeEvent, DvaeRunOptions, DvaeTrainConfig, Quantizer, Recon,
};
use imglish_train::OptimConfig;

use super::folders::{expect, Folder};
use crate::output::{BarProgress, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReconArg {
    /// Mean squared error on pixels in [0, 1].
    Mse,
    /// DALL-E's logit-Laplace likelihood (pixels mapped to [0.1, 0.9]).
    LogitLaplace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizerArg {
    /// DALL-E: logits over the codes, Gumbel-softmax relaxation with temperature annealing and a KL term.
    Gumbel,
    /// VQ-VAE: nearest of K code vectors (--vq-dim wide), EMA codebook with restarts of unused codes.
    Vq,
}

#[derive(Debug, Args)]
pub struct TrainDvaeArgs {
    /// The manifest directory written by `imglish ingest` (its train-split images are the training set).
    #[arg(long, value_name = "DIR")]
    pub manifest: PathBuf,
    /// Output encoder (the tokenizer); its card (`NAME.card.json`) and decoder (`NAME.decoder.onnx`) are written
    /// beside it.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The training run's folder (checkpoints, metrics.jsonl, loss.png); default: `NAME.run` beside --out.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Number of codes K.
    #[arg(long, default_value_t = 8192)]
    pub codebook: u32,
    /// Input size in pixels.
    #[arg(long, default_value_t = 112)]
    pub input_size: u32,
    /// Token grid side (input size / grid must be a power of two from 2 to 32).
    #[arg(long, default_value_t = 14)]
    pub grid: u32,
    /// Channels at full resolution (doubling per level up to 4x).
    #[arg(long, default_value_t = 64)]
    pub width: u32,
    /// Residual blocks per level.
    #[arg(long, default_value_t = 1)]
    pub blocks: u32,
    /// Reconstruction loss.
    #[arg(long, value_enum, default_value_t = ReconArg::Mse)]
    pub recon: ReconArg,
    /// How a cell becomes a code.
    #[arg(long, value_enum, default_value_t = QuantizerArg::Gumbel)]
    pub quantizer: QuantizerArg,
    /// With --quantizer vq: width of the code vectors.
    #[arg(long, default_value_t = 64)]
    pub vq_dim: u32,
    /// With --quantizer vq: decay of the codebook's moving averages.
    #[arg(long, default_value_t = 0.99)]
    pub ema_decay: f64,
    /// With --quantizer vq: weight of the commitment loss.
    #[arg(long, default_value_t = 0.25)]
    pub commitment: f64,
    /// Training steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: u64,
    /// Images per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW, warmup then cosine).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Warmup steps.
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: u64,
    /// Gumbel-softmax temperature at the start.
    #[arg(long, default_value_t = 1.0)]
    pub temperature_start: f64,
    /// Gumbel-softmax temperature at the end of the annealing.
    #[arg(long, default_value_t = 1.0 / 16.0)]
    pub temperature_end: f64,
    /// Fraction of the steps over which the temperature anneals (exponentially).
    #[arg(long, default_value_t = 0.8)]
    pub anneal_fraction: f64,
    /// Weight of the KL divergence to the uniform prior.
    #[arg(long, default_value_t = 5e-4)]
    pub kl_weight: f64,
    /// Straight-through Gumbel-softmax: the decoder trains on hard codes (what the exported tokenizer gives it)
    /// with the relaxed sample's gradient.
    #[arg(long)]
    pub straight_through: bool,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::cli::device_arg)]
    pub device: String,
    /// Log every N steps.
    #[arg(long, default_value_t = 20)]
    pub log_every: u64,
    /// Evaluate on the held-out images every N steps.
    #[arg(long, default_value_t = 500)]
    pub eval_every: u64,
    /// Held-out images (validation split, or every tenth image).
    #[arg(long, default_value_t = 256)]
    pub eval_images: usize,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: u64,
    /// Stop after this step (the schedule still spans --steps; rerun with --resume to continue).
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Continue the run in the run folder.
    #[arg(long)]
    pub resume: bool,
}

impl TrainDvaeArgs {
    fn config(&self) -> DvaeTrainConfig {
        DvaeTrainConfig {
            model: DvaeConfig {
                input_size: self.input_size,
                grid: self.grid,
                codebook: self.codebook,
                width: self.width,
                blocks: self.blocks,
                recon: match self.recon {
                    ReconArg::Mse => Recon::Mse,
                    ReconArg::LogitLaplace => Recon::LogitLaplace { eps: 0.1 },
                },
                quantizer: match self.quantizer {
                    QuantizerArg::Gumbel => Quantizer::Gumbel,
                    QuantizerArg::Vq => Quantizer::Vq { dim: self.vq_dim },
                },
            },
            optim: OptimConfig {
                lr: self.lr,
                warmup_steps: self.warmup_steps,
                ..DvaeTrainConfig::default().optim
            },
            steps: self.steps,
            batch_size: self.batch_size,
            seed: self.seed,
            temperature: (self.temperature_start, self.temperature_end),
            anneal_fraction: self.anneal_fraction,
            kl_weight: self.kl_weight,
            straight_through: self.straight_through,
            ema_decay: self.ema_decay,
            commitment: self.commitment,
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| self.out.with_extension("run"))
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The visual tokenizer (ONNX with its card beside it).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: PathBuf,
    /// The manifest directory written by `imglish ingest` (its held-out images are measured).
    #[arg(long, value_name = "DIR")]
    pub manifest: PathBuf,
    /// At most this many held-out images.
    #[arg(long, default_value_t = 256)]
    pub images: usize,
}

/// Exported tokens may differ from libtorch's only where libtorch's best two scores are this close (relative to
/// the best score's size): float rounding then decides, and either code is as good. (VQ models can have many:
/// 189 of 12544 held-out cells for a 2000-step demo model, all within 4.2e-7.)
const NEAR_TIE: f32 = 1e-4;

pub fn train(a: &TrainDvaeArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    expect(&a.manifest, Folder::Manifest, "--manifest")?;
    anyhow::ensure!(
        a.out.extension().is_some_and(|e| e == "onnx"),
        "--out {} must name an .onnx file (the encoder; its card and decoder go beside it)",
        a.out.display()
    );
    let run_dir = a.run_dir();
    let _lock = super::lock::lock_dir(&run_dir)?;
    imglish_train::prepare_process(threads);
    let config = a.config();
    let options = DvaeRunOptions {
        device: a.device.parse()?,
        log_every: a.log_every,
        eval_every: a.eval_every,
        eval_images: a.eval_images,
        checkpoint_every: a.checkpoint_every,
        stop_at: a.stop_at,
        resume: a.resume,
        ..DvaeRunOptions::default()
    };
    let bar = out.progress(0, "training the dVAE");
    let mut observer = |e: &DvaeEvent| report(e, &bar, out);
    let summary = train_dvae(&a.manifest, &run_dir, &config, &options, &mut observer)
        .with_context(|| format!("training the dVAE on {} failed", a.manifest.display()))?;
    bar.finish_and_clear();
    let Some(checkpoint) = summary.checkpoint.clone() else {
        anyhow::bail!("the run in {} wrote no checkpoint", run_dir.display());
    };
    if summary.steps < config.steps {
        let text = format!(
            "train-dvae: stopped at step {} of {}; continue with --resume (the tokenizer is exported when the run \
             ends); checkpoint {}",
            summary.steps,
            config.steps,
            checkpoint.display()
        );
        out.summary(&text, &serde_json::json!({"event": "train-dvae", "stopped_at": summary.steps, "steps": config.steps, "checkpoint": checkpoint}));
        return Ok(());
    }
    let (card, parity) = export(a, &checkpoint, &summary)?;
    let last = summary.last.as_ref();
    let text = format!(
        "train-dvae: {} steps ({} this run, {:.1}s); held-out PSNR {} -> {} dB, codes used {}, perplexity {}; exported \
         encoder tokens equal libtorch's on {}/{} held-out codes\n  wrote {}, {} and {}; run {} (loss plot {})",
        summary.steps,
        summary.steps_this_run,
        summary.train_seconds,
        summary.initial.as_ref().map_or("-".into(), |m| format!("{:.2}", m.psnr)),
        last.map_or("-".into(), |m| format!("{:.2}", m.psnr)),
        last.map_or("-".into(), |m| format!("{:.1}%", m.usage * 100.0)),
        last.map_or("-".into(), |m| format!("{:.1}", m.perplexity)),
        parity.equal,
        parity.codes,
        a.out.display(),
        Card::path_for(&a.out).display(),
        decoder_path(&a.out).display(),
        run_dir.display(),
        summary.plot.display()
    );
    let mut json = serde_json::to_value(&summary)?;
    json["event"] = "train-dvae".into();
    json["out"] = serde_json::to_value(&a.out)?;
    json["parity"] = serde_json::to_value(&parity)?;
    json["card"] = serde_json::to_value(&card)?;
    out.summary(&text, &json);
    Ok(())
}

fn report(e: &DvaeEvent, bar: &indicatif::ProgressBar, out: &Output) {
    match e {
        DvaeEvent::Started {
            step,
            until,
            parameters,
            images,
            device,
        } => {
            crate::output::start_steps(bar, *step, *until);
            tracing::info!(
                "training a dVAE ({:.2}M parameters) on {device}: {} training and {} held-out images, steps \
                 {step}..{until}",
                *parameters as f64 / 1e6,
                images.0,
                images.1
            );
        }
        DvaeEvent::Step(s) => bar.set_position(*s),
        DvaeEvent::Train(m) => {
            bar.set_message(format!("recon {:.4} codes {:.0}%", m.recon, m.code_usage * 100.0));
            bar.suspend(|| {
                out.summary(
                    &format!(
                        "step {:>6}  loss {:.4}  recon {:.4}  kl {:.3}  codes used {:.1}%  tau {:.3}  lr {:.2e}  \
                         {:.1} images/s",
                        m.step,
                        m.loss,
                        m.recon,
                        m.kl,
                        m.code_usage * 100.0,
                        m.temperature,
                        m.lr,
                        m.images_per_second
                    ),
                    &serde_json::to_value(m).unwrap_or_default(),
                )
            });
        }
        DvaeEvent::Val(m) => bar.suspend(|| {
            out.summary(
                &format!(
                    "step {:>6}  held-out PSNR {:.2} dB (mse {:.5})  codes used {:.1}%  perplexity {:.1}  ({} images)",
                    m.step,
                    m.psnr,
                    m.loss,
                    m.usage * 100.0,
                    m.perplexity,
                    m.images
                ),
                &serde_json::to_value(m).unwrap_or_default(),
            )
        }),
        DvaeEvent::Checkpoint(p) => tracing::info!("checkpoint {}", p.display()),
    }
}

fn decoder_path(encoder: &Path) -> PathBuf {
    encoder.with_extension("decoder.onnx")
}

/// How the exported encoder's tokens compare with libtorch's on the held-out centre views.
#[derive(Debug, Clone, serde::Serialize)]
struct Parity {
    codes: usize,
    equal: usize,
    fraction: f64,
    /// The largest relative top-2 score margin (libtorch) among the codes that differ: small values are
    /// near-ties.
    max_margin_of_differences: f32,
}

/// Exports the final checkpoint's encoder and decoder, checks the encoder against libtorch, and writes the
/// decoder, the encoder and the card (last), each atomically.
fn export(
    a: &TrainDvaeArgs,
    checkpoint: &Path,
    summary: &imglish_train::dvae::DvaeSummary,
) -> anyhow::Result<(Card, Parity)> {
    let (mut model, config) = load_dvae(checkpoint, imglish_train::TorchDevice::Cpu.resolve()?)?;
    let retired = model.retire_duplicate_codes();
    let weights = DvaeWeights {
        input_size: config.model.input_size,
        grid: config.model.grid,
        codebook: config.model.codebook,
        blocks: config.model.blocks,
        logit_laplace_eps: match config.model.recon {
            Recon::Mse => None,
            Recon::LogitLaplace { eps } => Some(eps),
        },
        tensors: model.export(),
    };
    let encoder = weights.encoder_onnx()?;
    let decoder = weights.decoder_onnx()?;
    let name = a
        .out
        .file_stem()
        .map_or_else(|| "dvae".into(), |s| s.to_string_lossy().into_owned());
    let decoder_file = decoder_path(&a.out)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let provisional = weights.card(&name, &encoder, &decoder, &decoder_file, serde_json::Value::Null);
    let parity = check_parity(a, &model, &encoder, provisional)?;
    let stats = serde_json::json!({
        "trainer": "imglish tokenizer train-dvae",
        "steps": summary.steps,
        "heldout": summary.last,
        "parity": parity,
        "retired_duplicate_codes": retired,
        "config": config,
    });
    let card = weights.card(&name, &encoder, &decoder, &decoder_file, stats);
    if let Some(dir) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    imglish_ingest::write_atomic(&decoder_path(&a.out), &decoder)?;
    imglish_ingest::write_atomic(&a.out, &encoder)?;
    imglish_ingest::write_atomic(&Card::path_for(&a.out), &serde_json::to_vec_pretty(&card)?)?;
    VisualTokenizer::load(&a.out, &SessionOptions::default()).context("the exported tokenizer does not load back")?;
    Ok((card, parity))
}

fn check_parity(
    a: &TrainDvaeArgs,
    model: &imglish_train::dvae::Dvae,
    encoder: &[u8],
    card: Card,
) -> anyhow::Result<Parity> {
    let mut tok = VisualTokenizer::from_parts(&a.out, encoder, card, &SessionOptions::default())?;
    let manifest = imglish_ingest::Manifest::open(&a.manifest)?;
    let size = model.config().input_size;
    let mut resizer = imglish_ingest::Resizer::new();
    let views = heldout_rows(&manifest, a.eval_images.max(1))
        .into_iter()
        .map(|row| centre(row, size, imglish_ingest::Filter::Bicubic, &mut resizer))
        .collect::<Result<Vec<_>, _>>()?;
    let mut parity = Parity {
        codes: 0,
        equal: 0,
        fraction: 1.0,
        max_margin_of_differences: 0.0,
    };
    for chunk in views.chunks(16) {
        let raw: Vec<&[u8]> = chunk.iter().map(|v| v.as_raw().as_slice()).collect();
        let (codes, margins) = codes_with_margins(model, &raw);
        let onnx: Vec<u16> = tok.tokenize(&raw)?.into_iter().flatten().collect();
        for ((c, m), o) in codes.iter().zip(&margins).zip(&onnx) {
            parity.codes += 1;
            if *c == i64::from(*o) {
                parity.equal += 1;
            } else {
                parity.max_margin_of_differences = parity.max_margin_of_differences.max(*m);
            }
        }
    }
    parity.fraction = parity.equal as f64 / parity.codes.max(1) as f64;
    anyhow::ensure!(
        parity.max_margin_of_differences <= NEAR_TIE,
        "the exported encoder's tokens equal libtorch's on {}/{} held-out codes, and differ where libtorch's best two \
         scores are {:.2e} apart (relative; near-ties are below {NEAR_TIE:.0e}); the export is wrong, nothing was \
         written",
        parity.equal,
        parity.codes,
        parity.max_margin_of_differences
    );
    Ok(parity)
}

pub fn eval(a: &EvalArgs, out: &Output) -> anyhow::Result<()> {
    expect(&a.manifest, Folder::Manifest, "--manifest")?;
    let bar = out.progress(0, "evaluating");
    let q = evaluate_tokenizer(
        &a.tokenizer,
        &a.manifest,
        a.images,
        &SessionOptions::default(),
        &BarProgress(&bar),
    )?;
    bar.finish_and_clear();
    let text = format!(
        "tokenizer eval: {} ({} codes, {}x{} grid) on {} held-out images: codes used {:.1}%, perplexity {:.1}, \
         reconstruction {}",
        q.name,
        q.vocab_size,
        q.grid[0],
        q.grid[1],
        q.images,
        q.usage * 100.0,
        q.perplexity,
        match (q.psnr, q.mse) {
            (Some(p), Some(m)) => format!("PSNR {p:.2} dB (mse {m:.5})"),
            _ => "- (the tokenizer has no decoder)".into(),
        }
    );
    let mut json = serde_json::to_value(&q)?;
    json["event"] = "tokenizer-eval".into();
    out.summary(&text, &json);
    Ok(())
}
