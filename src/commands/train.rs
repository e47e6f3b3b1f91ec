//! `imglish train`: BEiT-style masked image modeling streamed from a packed dataset.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use imglish_pack::{Dataset, Shuffle};
use imglish_train::{
    train, DataMode, Event, InputKind, MaskKind, Masking, ModelConfig, OptimConfig, Precision, RelPosBias, RunOptions,
    StreamConfig, TorchDevice, TrainConfig,
};

use crate::output::Output;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputArg {
    /// The view's visual tokens (masked positions replaced by the mask token).
    Tokens,
    /// The view's pixels rebuilt from the stored working image (needs a dataset packed with --include-pixels).
    Pixels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MaskArg {
    /// BEiT's blockwise masking.
    Blockwise,
    /// Uniformly random patches.
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShuffleArg {
    /// Samples shuffled within windows of record batches (shard order shuffled).
    Window,
    /// A global permutation of all samples.
    Global,
    /// Dataset order.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RelPosArg {
    Shared,
    PerLayer,
    Off,
}

/// Overrides of a preset's size (shared by `train` and `quickstart`).
#[derive(Debug, Clone, Copy, Args)]
pub struct SizeArgs {
    /// Override the preset's width.
    #[arg(long)]
    pub dim: Option<i64>,
    /// Override the preset's depth.
    #[arg(long)]
    pub depth: Option<i64>,
    /// Override the preset's heads.
    #[arg(long)]
    pub heads: Option<i64>,
}

impl SizeArgs {
    /// The overrides as `(flag, value)` pairs.
    pub fn flags(&self) -> [(&'static str, Option<i64>); 3] {
        [("--dim", self.dim), ("--depth", self.depth), ("--heads", self.heads)]
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Dataset directory written by `imglish pack`.
    #[arg(long, value_name = "DIR")]
    pub dataset: PathBuf,

    /// Run directory: checkpoints/, metrics.jsonl, loss.png, config.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Model preset: tiny (192/12/3), small (384/12/6), base (768/12/12), large (1024/24/16).
    #[arg(long, default_value = "tiny")]
    pub preset: String,

    /// A model configuration JSON file (every field of the model config) instead of a preset.
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub model_config: Option<PathBuf>,

    #[command(flatten)]
    pub size: SizeArgs,
    /// Stochastic depth rate of the last block.
    #[arg(long)]
    pub drop_path: Option<f64>,
    /// Relative position bias: shared (BEiT pretraining), per-layer or off.
    #[arg(long, value_enum)]
    pub rel_pos: Option<RelPosArg>,
    /// Add learned absolute position embeddings (BEiT's `use_abs_pos_emb`; `pos_embed`). Short runs learn
    /// where a masked patch is much sooner with them (README, "Train and probe", has the numbers).
    #[arg(long)]
    pub abs_pos: bool,

    /// What the encoder reads.
    #[arg(long, value_enum, default_value_t = InputArg::Tokens)]
    pub input: InputArg,

    /// Optimiser steps of the run.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Samples per micro-batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub accum: u32,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1.5e-3)]
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-5)]
    pub min_lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 3.0)]
    pub clip_grad: f64,

    /// Masking strategy.
    #[arg(long, value_enum, default_value_t = MaskArg::Blockwise)]
    pub mask: MaskArg,
    /// Fraction of patches masked (default: BEiT's 75/196).
    #[arg(long)]
    pub mask_ratio: Option<f64>,
    /// Smallest block in patches (default: 16/196 of the grid).
    #[arg(long)]
    pub min_mask_block: Option<usize>,

    /// Seed of initialisation, order, views, masks and stochastic depth.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Epoch order.
    #[arg(long, value_enum, default_value_t = ShuffleArg::Window)]
    pub shuffle: ShuffleArg,
    /// This process's rank.
    #[arg(long, env = "RANK", default_value_t = 0)]
    pub rank: u32,
    /// Number of ranks.
    #[arg(long, env = "WORLD_SIZE", default_value_t = 1)]
    pub world_size: u32,
    /// Batches prepared ahead of the trainer.
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    /// Skip samples of corrupt shards (counted and reported) instead of stopping.
    #[arg(long)]
    pub skip_corrupt: bool,

    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, or bf16 (matrix products in bfloat16).
    #[arg(long, default_value = "f32")]
    pub precision: String,

    /// Log metrics every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Evaluate on the validation split every N steps (0: at the start and the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Validation samples used.
    #[arg(long, default_value_t = 2048)]
    pub eval_samples: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Continue from the newest checkpoint in --out (same settings required).
    #[arg(long)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this step although the run has more.
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<u64>,
    /// Read every batch into memory before training (measures the streaming data path's overhead).
    #[arg(long)]
    pub in_memory: bool,
}

impl TrainArgs {
    fn config(&self, dataset: &Dataset) -> anyhow::Result<TrainConfig> {
        let info = dataset.tokenizer();
        let grid = [i64::from(info.grid[0]), i64::from(info.grid[1])];
        let mut model = match &self.model_config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                serde_json::from_str::<ModelConfig>(&text)
                    .with_context(|| format!("{} is not a model configuration", path.display()))?
            }
            None => ModelConfig::preset(&self.preset, grid, i64::from(info.vocab_size))?,
        };
        model.dim = self.size.dim.unwrap_or(model.dim);
        model.depth = self.size.depth.unwrap_or(model.depth);
        model.heads = self.size.heads.unwrap_or(model.heads);
        if let Some(p) = self.drop_path {
            model.drop_path = p;
        }
        model.abs_pos_emb |= self.abs_pos;
        if let Some(r) = self.rel_pos {
            model.rel_pos_bias = match r {
                RelPosArg::Shared => RelPosBias::Shared,
                RelPosArg::PerLayer => RelPosBias::PerLayer,
                RelPosArg::Off => RelPosBias::Off,
            };
        }
        model.input = match self.input {
            InputArg::Tokens => InputKind::Tokens,
            InputArg::Pixels => InputKind::Pixels,
        };
        model.validate()?;
        let kind = match self.mask {
            MaskArg::Blockwise => MaskKind::Blockwise,
            MaskArg::Random => MaskKind::Random,
        };
        let mut masking = Masking::new(kind, [grid[0] as usize, grid[1] as usize])?;
        if let Some(r) = self.mask_ratio {
            masking = masking.try_with_ratio(r)?;
        }
        if let Some(b) = self.min_mask_block {
            masking = masking.try_with_min_block(b)?;
        }
        let optim = OptimConfig {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            clip_grad: (self.clip_grad > 0.0).then_some(self.clip_grad),
            ..OptimConfig::default()
        };
        optim.validate()?;
        Ok(TrainConfig {
            model,
            optim,
            masking,
            steps: self.steps,
            accum: self.accum,
            seed: self.seed,
            stream: StreamConfig {
                batch_size: self.batch_size,
                shuffle: match self.shuffle {
                    ShuffleArg::Window => Shuffle::default(),
                    ShuffleArg::Global => Shuffle::Global,
                    ShuffleArg::None => Shuffle::None,
                },
                rank: self.rank,
                world_size: self.world_size,
                prefetch: self.prefetch,
                skip_corrupt: self.skip_corrupt,
            },
        })
    }
}

pub fn run(args: &TrainArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    imglish_train::set_threads(threads);
    let device: TorchDevice = args.device.parse()?;
    let precision: Precision = args.precision.parse()?;
    let dataset =
        Dataset::open(&args.dataset).with_context(|| format!("cannot open the dataset {}", args.dataset.display()))?;
    let config = args.config(&dataset)?;
    let options = RunOptions {
        device,
        precision,
        log_every: args.log_every,
        eval_every: args.eval_every,
        eval_samples: args.eval_samples,
        checkpoint_every: args.checkpoint_every,
        keep_checkpoints: args.keep_checkpoints,
        stop_at: args.stop_at,
        resume: args.resume,
        data: if args.in_memory {
            DataMode::Memory
        } else {
            DataMode::Stream
        },
    };
    let bar = out.progress(0, "training");
    let mut observer = |e: &Event| match e {
        Event::Started {
            step,
            until,
            parameters,
            device,
        } => {
            bar.set_length(*until);
            bar.set_position(*step);
            tracing::info!(
                "training {:.2}M parameters on {device}, steps {step}..{until}",
                *parameters as f64 / 1e6
            );
        }
        Event::Step(s) => bar.set_position(*s),
        Event::Train(m) => {
            bar.set_message(format!("loss {:.3}", m.loss));
            bar.suspend(|| {
                out.summary(
                    &format!(
                        "step {:>6}  epoch {}  loss {:.4}  acc {:.3}  lr {:.2e}  |g| {:.2}  {:.1} samples/s  \
                         data wait {:.1}%",
                        m.step,
                        m.epoch,
                        m.loss,
                        m.accuracy,
                        m.lr,
                        m.grad_norm,
                        m.samples_per_s,
                        m.data_wait * 100.0
                    ),
                    &serde_json::to_value(m).unwrap_or_default(),
                )
            });
        }
        Event::Val(m) => bar.suspend(|| {
            out.summary(
                &format!(
                    "step {:>6}  val loss {:.4}  val acc {:.3}  ({} samples)",
                    m.step, m.loss, m.accuracy, m.samples
                ),
                &serde_json::to_value(m).unwrap_or_default(),
            )
        }),
        Event::Checkpoint(p) => tracing::info!("checkpoint {}", p.display()),
        Event::Skipped(id, why) => tracing::warn!("sample {id} skipped: {why}"),
    };
    let summary = train(&args.dataset, &args.out, &config, &options, &mut observer)
        .with_context(|| format!("training on {} failed", args.dataset.display()))?;
    bar.finish_and_clear();
    let val = summary.final_val.as_ref();
    let text = format!(
        "train: {} steps ({} this run, {} samples, {:.1}s, data wait {:.1}%); val loss {} -> {}, val acc {}; \
         {} skipped; checkpoint {}; plot {}",
        summary.steps,
        summary.steps_this_run,
        summary.samples,
        summary.train_seconds,
        summary.data_wait * 100.0,
        summary.initial_val_loss.map_or("-".into(), |l| format!("{l:.4}")),
        val.map_or("-".into(), |v| format!("{:.4}", v.loss)),
        val.map_or("-".into(), |v| format!("{:.3}", v.accuracy)),
        summary.skipped,
        summary
            .checkpoint
            .as_ref()
            .map_or("-".into(), |p| p.display().to_string()),
        summary.plot.display()
    );
    let mut json = serde_json::to_value(&summary).unwrap_or_default();
    json["event"] = "train".into();
    out.summary(&text, &json);
    Ok(())
}
