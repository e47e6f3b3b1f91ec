//! `imglish finetune`: image classification fine-tuning of a pretraining checkpoint (BEiT's recipe).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use imglish_pack::Dataset;
use imglish_train::{
    finetune, finetune_config, FinetuneEvent, FinetuneMetrics, FinetuneOptions, MixConfig, OptimConfig, StreamConfig,
};

use super::folders::{expect, Folder};
use super::train::{RunArgs, ShuffleArg};
use crate::output::Output;

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// A pretraining checkpoint (`RUN/checkpoints/step-NNNNNNNN`) or run directory (its newest checkpoint): the
    /// encoder's architecture and, unless --random-init or --init, its weights.
    #[arg(long, value_name = "DIR", required_unless_present = "init")]
    pub checkpoint: Option<PathBuf>,
    /// Dataset directory with labels (`ingest --labels from-folders`).
    #[arg(long, value_name = "DIR")]
    pub dataset: PathBuf,
    /// Output run directory (checkpoints, best/, metrics.jsonl, loss.png).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Start from random weights (the checkpoint gives only the architecture): the baseline pretraining must
    /// beat.
    #[arg(long, conflicts_with = "init")]
    pub random_init: bool,
    /// Start the encoder from this safetensors file instead (timm `beit_*`, torchscale `BEiT3`, imglish names;
    /// shapes checked, position tables resized, shared relative position table copied to every block). Without
    /// --checkpoint the file must be a timm `Beit` state dict: it gives the architecture too, and its `fc_norm`
    /// and `head` are loaded when they have this dataset's number of classes.
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// Attention heads of an --init file that has no relative position table (otherwise read from the file).
    #[arg(long, requires = "init", conflicts_with = "checkpoint")]
    pub heads: Option<i64>,
    /// Pixel-input encoders: fine-tune at this image side in pixels (a multiple of the patch size; position
    /// tables are resized, as BEiT does at 384). Default: the encoder's own.
    #[arg(long, value_name = "PX")]
    pub input_size: Option<i64>,
    /// Pixel-input encoders: cut each view afresh from the original images of this ingest manifest (the one the
    /// dataset was tokenized from): a new random-resized crop with flip every epoch at the input size, the centre
    /// view for evaluation. Default: the dataset's stored views (`pack --include-pixels`).
    #[arg(long, value_name = "MANIFEST")]
    pub images: Option<PathBuf>,

    /// Optimiser steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Samples per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Peak learning rate of the head (block i of N gets lr · layer_decay^(N - i)).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-6)]
    pub min_lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Layer-wise learning-rate decay (default: 0.65 up to 12 blocks, 0.75 deeper: BEiT's base / large values).
    #[arg(long)]
    pub layer_decay: Option<f64>,
    /// Stochastic depth rate of the last block.
    #[arg(long, default_value_t = 0.1)]
    pub drop_path: f64,
    /// Label smoothing.
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Mixup's Beta(α, α) (0: off; BEiT uses 0.8). Needs a pixel-input encoder.
    #[arg(long, default_value_t = 0.0)]
    pub mixup: f64,
    /// CutMix's Beta(α, α) (0: off; BEiT uses 1.0). Boxes follow the patch grid, so token input can use it.
    #[arg(long, default_value_t = 0.0)]
    pub cutmix: f64,
    /// Probability that a batch is mixed.
    #[arg(long, default_value_t = 1.0)]
    pub mix_prob: f64,
    /// With both mixup and CutMix on, the probability of CutMix.
    #[arg(long, default_value_t = 0.5)]
    pub switch_prob: f64,
    /// Clip the global gradient norm (0: off, BEiT fine-tuning's default).
    #[arg(long, default_value_t = 0.0)]
    pub clip_grad: f64,

    /// Seed of the head, order, views, mixing and stochastic depth.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Epoch order.
    #[arg(long, value_enum, default_value_t = ShuffleArg::Window)]
    pub shuffle: ShuffleArg,
    /// Batches prepared ahead of the trainer.
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    /// Skip samples of corrupt shards (counted and reported) instead of stopping.
    #[arg(long)]
    pub skip_corrupt: bool,

    /// Evaluate (top-1 / top-5 on the validation split) every N steps (0: about once an epoch).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Validation samples used.
    #[arg(long, default_value_t = 50_000)]
    pub eval_samples: usize,

    #[command(flatten)]
    pub run: RunArgs,
}

impl FinetuneArgs {
    fn options(&self) -> FinetuneOptions {
        FinetuneOptions {
            optim: OptimConfig::from_flags(
                self.lr,
                self.min_lr,
                self.warmup_steps,
                self.weight_decay,
                self.clip_grad,
            ),
            layer_decay: self.layer_decay,
            drop_path: self.drop_path,
            label_smoothing: self.label_smoothing,
            mix: MixConfig {
                mixup: self.mixup,
                cutmix: self.cutmix,
                prob: self.mix_prob,
                switch_prob: self.switch_prob,
            },
            steps: self.steps,
            seed: self.seed,
            stream: StreamConfig {
                batch_size: self.batch_size,
                shuffle: self.shuffle.into(),
                rank: 0,
                world_size: 1,
                prefetch: self.prefetch,
                skip_corrupt: self.skip_corrupt,
            },
            random_init: self.random_init,
            init: self.init.clone(),
            heads: self.heads,
            input_size: self.input_size,
            images: self.images.clone(),
        }
    }
}

fn val_line(m: &FinetuneMetrics) -> String {
    format!(
        "step {:>6}  val loss {:.4}  top-1 {:.3}  top-5 {:.3}  ({} samples)",
        m.step,
        m.loss,
        m.top1,
        m.top5.unwrap_or(0.0),
        m.samples
    )
}

pub fn run(args: &FinetuneArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    let _lock = super::lock::lock_dir(&args.out)?;
    expect(&args.dataset, Folder::Dataset, "--dataset")?;
    imglish_train::prepare_process(threads);
    let checkpoint = match &args.checkpoint {
        Some(c) => Some(imglish_train::resolve_checkpoint(c)?),
        None => None,
    };
    if let Some(images) = &args.images {
        expect(images, Folder::Manifest, "--images")?;
    }
    let dataset =
        Dataset::open(&args.dataset).with_context(|| format!("cannot open the dataset {}", args.dataset.display()))?;
    let config = finetune_config(checkpoint.as_deref(), &dataset, &args.options())?;
    let options = args.run.options(args.eval_every, args.eval_samples)?;
    let bar = out.progress(0, "fine-tuning");
    let mut observer = |e: &FinetuneEvent| match e {
        FinetuneEvent::Started {
            step,
            until,
            parameters,
            device,
            init,
        } => {
            crate::output::start_steps(&bar, *step, *until);
            tracing::info!(
                "fine-tuning {:.2}M parameters ({} classes) on {device}, steps {step}..{until}",
                *parameters as f64 / 1e6,
                config.classes
            );
            if !init.is_empty() {
                tracing::info!("{init}");
            }
        }
        FinetuneEvent::Step(s) => bar.set_position(*s),
        FinetuneEvent::Metrics(m) => {
            let text = if m.kind == "val" {
                val_line(m)
            } else {
                bar.set_message(format!("loss {:.3}", m.loss));
                format!(
                    "step {:>6}  loss {:.4}  top-1 {:.3}  lr {:.2e}  {:.1} samples/s",
                    m.step,
                    m.loss,
                    m.top1,
                    m.lr.unwrap_or(0.0),
                    m.samples_per_s.unwrap_or(0.0)
                )
            };
            bar.suspend(|| out.summary(&text, &serde_json::to_value(m).unwrap_or_default()));
        }
        FinetuneEvent::Best(m) => tracing::info!("new best top-1 {:.3} at step {}: weights in best/", m.top1, m.step),
        FinetuneEvent::Checkpoint(p) => tracing::info!("checkpoint {}", p.display()),
        FinetuneEvent::Skipped(id, why) => tracing::warn!("sample {id} skipped: {why}"),
    };
    let summary = finetune(&args.dataset, &args.out, &config, &options, &mut observer)
        .with_context(|| format!("fine-tuning on {} failed", args.dataset.display()))?;
    bar.finish_and_clear();
    let top = |m: Option<&FinetuneMetrics>| {
        m.map_or("-".into(), |m| {
            format!(
                "top-1 {:.3} top-5 {:.3} (step {})",
                m.top1,
                m.top5.unwrap_or(0.0),
                m.step
            )
        })
    };
    let text = format!(
        "finetune: {} steps ({} this run, {:.1}s); last val {}; best {} in {}; {} skipped; checkpoint {}; plot {}",
        summary.steps,
        summary.steps_this_run,
        summary.train_seconds,
        top(summary.final_val.as_ref()),
        top(summary.best.as_ref()),
        args.out.join("best").display(),
        summary.skipped,
        summary
            .checkpoint
            .as_ref()
            .map_or("-".into(), |p| p.display().to_string()),
        summary.plot.display()
    );
    let mut json = serde_json::to_value(&summary).unwrap_or_default();
    json["event"] = "finetune".into();
    out.summary(&text, &json);
    Ok(())
}
