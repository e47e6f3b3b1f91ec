//! `imglish train`: BEiT-style masked image modeling streamed from a packed dataset.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use imglish_pack::{Dataset, Shuffle};
use imglish_train::{
    train, train_beit3, Beit3Event, Beit3Metrics, Beit3TrainConfig, DataMode, Event, InputKind, MaskKind, ModelKind,
    RelPosBias, RunOptions, TrainOptions,
};

use super::folders::{expect, Folder};
use crate::output::Output;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputArg {
    /// The view's visual tokens (masked positions replaced by the mask token).
    Tokens,
    /// The view's pixels rebuilt from the stored working image (needs a dataset packed with --include-pixels).
    Pixels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    /// BEiT (v1): masked image modelling on images.
    Beit,
    /// BEiT-3: a Multiway Transformer, masked data modelling on images, texts and image-text pairs.
    Beit3,
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

impl From<ShuffleArg> for Shuffle {
    fn from(arg: ShuffleArg) -> Shuffle {
        match arg {
            ShuffleArg::Window => Shuffle::default(),
            ShuffleArg::Global => Shuffle::Global,
            ShuffleArg::None => Shuffle::None,
        }
    }
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

    /// The model and objective.
    #[arg(long, value_enum, default_value_t = ModelArg::Beit)]
    pub model: ModelArg,

    /// Model preset: tiny (192/12/3), small (384/12/6), base (768/12/12), large (1024/24/16); with
    /// --model beit3 also written beit3-tiny, ... (feed-forward width 4x).
    #[arg(long, default_value = "tiny", value_parser = crate::cli::preset_arg)]
    pub preset: String,

    /// BEiT-3: relative weights of image, text and pair samples (a sample with a caption is drawn as one of
    /// the three each epoch; one without, as an image).
    #[arg(long, default_value = DEFAULT_MIX, value_parser = parse_mix)]
    pub mix: [f64; 3],
    /// BEiT-3: share of text tokens predicted in text samples.
    #[arg(long, default_value_t = 0.15)]
    pub text_mask_ratio: f64,
    /// BEiT-3: share of text tokens predicted in pairs.
    #[arg(long, default_value_t = 0.5)]
    pub pair_text_mask_ratio: f64,
    /// BEiT-3: the MLM head's weight is the text embedding.
    #[arg(long)]
    pub tie_mlm_head: bool,
    /// BEiT-3: vision-language FFN experts for image-text pairs in the top N layers (the paper's; not in
    /// torchscale).
    #[arg(long, default_value_t = 0)]
    pub vl_experts: i64,
    /// Initial weights: a safetensors state dict of timm `beit_*`, torchscale `BEiT3` (or unilm BEiT-3,
    /// `beit3.*`) or an imglish checkpoint (`RUN/checkpoints/step-N/model.safetensors`); shapes checked, position
    /// tables resized to this grid, missing and unexpected names reported. Not applied again on --resume.
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// LayerScale's initial value: BEiT overrides its preset's (0.1; large 1e-5); BEiT-3 adds BEiT's LayerScale
    /// (not in torchscale) to every layer.
    #[arg(long, value_name = "INIT")]
    pub layer_scale: Option<f64>,

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
    /// Fraction of patches masked (default: BEiT's 75/196; BEiT-3: 0.4).
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

    /// Evaluate on the validation split every N steps (0: at the start and the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Validation samples used.
    #[arg(long, default_value_t = 2048)]
    pub eval_samples: usize,
    /// Read every batch into memory before training (measures the streaming data path's overhead).
    #[arg(long)]
    pub in_memory: bool,

    #[command(flatten)]
    pub run: RunArgs,
}

/// Device, precision, logging and checkpoint flags shared by `train` and `finetune`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::cli::device_arg)]
    pub device: String,
    /// f32, or bf16 (matrix products in bfloat16).
    #[arg(long, default_value = "f32", value_parser = crate::cli::precision_arg)]
    pub precision: String,
    /// Log metrics every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
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
}

impl RunArgs {
    /// The run options these flags give, with the command's evaluation settings.
    pub fn options(&self, eval_every: u64, eval_samples: usize) -> anyhow::Result<RunOptions> {
        Ok(RunOptions {
            device: self.device.parse()?,
            precision: self.precision.parse()?,
            log_every: self.log_every,
            eval_every,
            eval_samples,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
            stop_at: self.stop_at,
            resume: self.resume,
            ..RunOptions::default()
        })
    }
}

/// The default `--mix`: images, texts and pairs alike.
pub const DEFAULT_MIX: &str = "image=1,text=1,pair=1";

/// Parses `image=1,text=1,pair=1` (any subset; missing kinds get 0).
pub(crate) fn parse_mix(text: &str) -> Result<[f64; 3], String> {
    let mut mix = [0.0; 3];
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not KIND=WEIGHT (e.g. image=1,text=1,pair=1)"))?;
        let slot = match name.trim() {
            "image" => 0,
            "text" => 1,
            "pair" => 2,
            other => return Err(format!("unknown sample kind '{other}' (image, text or pair)")),
        };
        let w: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("weight '{value}' of {name} is not a number"))?;
        if !(w.is_finite() && w >= 0.0) {
            return Err(format!("weight {w} of {name} must be a non-negative number"));
        }
        mix[slot] = w;
    }
    TrainOptions::validate_mix(mix)?;
    Ok(mix)
}

impl TrainArgs {
    /// The options that decide what the run computes (shared with `python -m imglish.pretrain`).
    fn options(&self) -> TrainOptions {
        TrainOptions {
            model: match self.model {
                ModelArg::Beit => ModelKind::Beit,
                ModelArg::Beit3 => ModelKind::Beit3,
            },
            preset: self.preset.clone(),
            model_config: self.model_config.clone(),
            dim: self.size.dim,
            depth: self.size.depth,
            heads: self.size.heads,
            drop_path: self.drop_path,
            rel_pos: self.rel_pos.map(|r| match r {
                RelPosArg::Shared => RelPosBias::Shared,
                RelPosArg::PerLayer => RelPosBias::PerLayer,
                RelPosArg::Off => RelPosBias::Off,
            }),
            abs_pos: self.abs_pos,
            input: match self.input {
                InputArg::Tokens => InputKind::Tokens,
                InputArg::Pixels => InputKind::Pixels,
            },
            mix: self.mix,
            text_mask_ratio: self.text_mask_ratio,
            pair_text_mask_ratio: self.pair_text_mask_ratio,
            tie_mlm_head: self.tie_mlm_head,
            vl_experts: self.vl_experts,
            layer_scale: self.layer_scale,
            steps: self.steps,
            batch_size: self.batch_size,
            accum: self.accum,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            clip_grad: self.clip_grad,
            mask: match self.mask {
                MaskArg::Blockwise => MaskKind::Blockwise,
                MaskArg::Random => MaskKind::Random,
            },
            mask_ratio: self.mask_ratio,
            min_mask_block: self.min_mask_block,
            seed: self.seed,
            shuffle: self.shuffle.into(),
            prefetch: self.prefetch,
            skip_corrupt: self.skip_corrupt,
        }
    }
}

pub fn run(args: &TrainArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    if args.world_size != 1 || args.rank != 0 {
        anyhow::bail!(
            "rank {} of world size {}: `imglish train` trains in one process; for data-parallel training over several \
             processes or machines run `torchrun --nproc_per_node N -m imglish.pretrain --dataset {} --out {}` \
             (docs/guides.md, \"From one machine to a cluster\")",
            args.rank,
            args.world_size,
            args.dataset.display(),
            args.out.display()
        );
    }
    let _lock = super::lock::lock_dir(&args.out)?;
    expect(&args.dataset, Folder::Dataset, "--dataset")?;
    imglish_train::prepare_process(threads);
    let dataset =
        Dataset::open(&args.dataset).with_context(|| format!("cannot open the dataset {}", args.dataset.display()))?;
    let options = RunOptions {
        init: args.init.clone(),
        data: if args.in_memory {
            DataMode::Memory
        } else {
            DataMode::Stream
        },
        ..args.run.options(args.eval_every, args.eval_samples)?
    };
    let train_options = args.options();
    if args.model == ModelArg::Beit3 {
        let config = train_options.beit3_config(&dataset)?;
        return run_beit3(args, &config, &options, out);
    }
    let config = train_options.beit_config(&dataset)?;
    let bar = out.progress(0, "training");
    let mut observer = |e: &Event| match e {
        Event::Started {
            step,
            until,
            parameters,
            device,
        } => {
            crate::output::start_steps(&bar, *step, *until);
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
                    "step {:>6}  val loss {:.4}  val acc {:.3} (always the most frequent code: {:.3})  ({} samples)",
                    m.step, m.loss, m.accuracy, m.majority_accuracy, m.samples
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

/// One line for a BEiT-3 metrics record: the total and each task's loss and accuracy.
fn beit3_line(m: &Beit3Metrics) -> String {
    let tasks: Vec<String> = m
        .tasks
        .iter()
        .map(|(name, t)| format!("{name} {:.3}/{:.3}", t.loss, t.accuracy))
        .collect();
    if m.kind == "val" {
        format!(
            "step {:>6}  val loss {:.4}  [{}] (loss/acc)",
            m.step,
            m.loss,
            tasks.join("  ")
        )
    } else {
        format!(
            "step {:>6}  epoch {}  loss {:.4}  [{}]  lr {:.2e}  |g| {:.2}  {:.1} samples/s  data wait {:.1}%",
            m.step,
            m.epoch,
            m.loss,
            tasks.join("  "),
            m.lr,
            m.grad_norm,
            m.samples_per_s,
            m.data_wait * 100.0
        )
    }
}

fn run_beit3(args: &TrainArgs, config: &Beit3TrainConfig, options: &RunOptions, out: &Output) -> anyhow::Result<()> {
    let bar = out.progress(0, "training BEiT-3");
    let mut observer = |e: &Beit3Event| match e {
        Beit3Event::Started {
            step,
            until,
            parameters,
            device,
        } => {
            crate::output::start_steps(&bar, *step, *until);
            tracing::info!(
                "training BEiT-3 ({:.2}M parameters) on {device}, steps {step}..{until}",
                *parameters as f64 / 1e6
            );
        }
        Beit3Event::Step(s) => bar.set_position(*s),
        Beit3Event::Metrics(m) => {
            if m.kind == "train" {
                bar.set_message(format!("loss {:.3}", m.loss));
            }
            bar.suspend(|| out.summary(&beit3_line(m), &serde_json::to_value(m).unwrap_or_default()));
        }
        Beit3Event::Checkpoint(p) => tracing::info!("checkpoint {}", p.display()),
        Beit3Event::Skipped(id, why) => tracing::warn!("sample {id} skipped: {why}"),
    };
    let summary = train_beit3(&args.dataset, &args.out, config, options, &mut observer)
        .with_context(|| format!("training on {} failed", args.dataset.display()))?;
    bar.finish_and_clear();
    let task = |m: Option<&Beit3Metrics>, name: &str| {
        m.and_then(|m| m.tasks.get(name))
            .map_or("-".into(), |t| format!("{:.4}", t.loss))
    };
    let (first, last) = (summary.initial_val.as_ref(), summary.final_val.as_ref());
    let text = format!(
        "train: BEiT-3, {} steps ({} this run, {} samples, {:.1}s); val loss {} -> {} (MIM image {} -> {}, \
         MLM text {} -> {}, pair MIM {} -> {}, pair MLM {} -> {}); {} skipped; checkpoint {}; plot {}",
        summary.steps,
        summary.steps_this_run,
        summary.samples,
        summary.train_seconds,
        first.map_or("-".into(), |v| format!("{:.4}", v.loss)),
        last.map_or("-".into(), |v| format!("{:.4}", v.loss)),
        task(first, "image_mim"),
        task(last, "image_mim"),
        task(first, "text_mlm"),
        task(last, "text_mlm"),
        task(first, "pair_mim"),
        task(last, "pair_mim"),
        task(first, "pair_mlm"),
        task(last, "pair_mlm"),
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
