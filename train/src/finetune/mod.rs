//! Image classification fine-tuning, BEiT's recipe: the pretrained encoder with mean pooling, `fc_norm` and a
//! linear head, layer-wise learning-rate decay, stochastic depth, label smoothing, optional mixup / CutMix,
//! warmup + cosine; evaluated on the validation split (top-1 / top-5) every interval, the best evaluation's
//! weights kept in `OUT/best/`, checkpoints that resume exactly.

mod mix;
mod model;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use imglish_ingest::mix64;
use imglish_pack::{Dataset, Split};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

pub use mix::MixConfig;
pub use model::{Backbone, Classifier};

use crate::data::{BeitBatcher, Builder, FixedSet, Loader, StreamConfig};
use crate::error::{io_err, torch_err, Result, TrainError};
use crate::masking::Masking;
use crate::optim::{AdamW, OptimConfig};
use crate::originals::Originals;
use crate::plot::plot_losses;
use crate::trainer::{
    check_fit, check_probe_fit, checkpoint_architecture, latest_checkpoint, read_state, restore, write_checkpoint,
    write_json_line, CheckpointState, RunOptions, Source, TrainConfig, CHECKPOINT_VERSION,
};

/// Where the encoder's weights come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// The pretraining checkpoint's weights.
    Checkpoint(PathBuf),
    /// A safetensors file (timm / torchscale / imglish names, see [`crate::init_params`]).
    File(PathBuf),
    /// Random initialisation (the baseline pretraining must beat).
    Random,
}

/// Everything that decides what a fine-tuning run computes (resuming requires the same values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    /// The encoder.
    pub backbone: Backbone,
    /// Where its weights come from.
    pub start: Start,
    /// Output classes.
    pub classes: i64,
    /// Optimiser and schedule (peak lr of the head; block `i` gets `lr · layer_decay^(depth - i)`).
    pub optim: OptimConfig,
    /// Layer-wise learning-rate decay.
    pub layer_decay: f64,
    /// Label smoothing.
    pub label_smoothing: f64,
    /// Mixup / CutMix.
    pub mix: MixConfig,
    /// Optimiser steps.
    pub steps: u64,
    /// Seed of the head's initialisation, the order, views, mixing and stochastic depth.
    pub seed: u64,
    /// The stream.
    pub stream: StreamConfig,
    /// The pretraining run's masking (it only keys the data builder; fine-tuning masks nothing).
    pub masking: Masking,
    /// Views cut from the original images of this ingest manifest (pixel input) instead of the stored ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<PathBuf>,
}

/// Settings of a fine-tuning run that do not come from the checkpoint.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    /// Optimiser and schedule.
    pub optim: OptimConfig,
    /// Layer-wise decay (`None`: 0.65 up to 12 blocks, 0.75 deeper, BEiT's base / large values).
    pub layer_decay: Option<f64>,
    /// Stochastic depth of the last block.
    pub drop_path: f64,
    /// Label smoothing.
    pub label_smoothing: f64,
    /// Mixup / CutMix.
    pub mix: MixConfig,
    /// Optimiser steps.
    pub steps: u64,
    /// Seed.
    pub seed: u64,
    /// The stream.
    pub stream: StreamConfig,
    /// Start from random weights instead of the checkpoint's.
    pub random_init: bool,
    /// Start from these weights instead of the checkpoint's (the checkpoint gives the architecture; without
    /// one, this timm `Beit` state dict gives it).
    pub init: Option<PathBuf>,
    /// Attention heads of an `--init` file without relative position tables (the heads cannot be read from it).
    pub heads: Option<i64>,
    /// Pixel input: fine-tune at this image side (the grid becomes side / patch; position tables are resized).
    pub input_size: Option<i64>,
    /// Pixel input: cut the views from the original images of this ingest manifest.
    pub images: Option<PathBuf>,
}

/// One line of `metrics.jsonl`: a train interval (`kind: "train"`) or an evaluation (`kind: "val"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneMetrics {
    /// `"train"` or `"val"`.
    pub kind: String,
    /// Optimiser steps done.
    pub step: u64,
    /// Cross-entropy: against the (smoothed, mixed) targets for train, the labels for val.
    pub loss: f64,
    /// Top-1 accuracy (train: against the unmixed labels).
    pub top1: f64,
    /// Top-5 accuracy (top-`classes` when fewer than 5 classes); val only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top5: Option<f64>,
    /// Learning rate of the head at the last step; train only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Samples per second over the interval; train only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_s: Option<f64>,
    /// Samples evaluated or trained on in the interval.
    pub samples: u64,
}

/// What a fine-tuning run reports as it goes.
#[derive(Debug, Clone)]
pub enum FinetuneEvent {
    /// The run starts at `step` and runs until `until`; `init` describes the weights loaded (empty on resume).
    Started {
        /// First step.
        step: u64,
        /// Last step of this run.
        until: u64,
        /// Trained parameters.
        parameters: i64,
        /// The device in words.
        device: String,
        /// What loading the start weights did.
        init: String,
    },
    /// A step finished.
    Step(u64),
    /// A train interval or an evaluation.
    Metrics(FinetuneMetrics),
    /// A new best evaluation; its weights are in `best/`.
    Best(FinetuneMetrics),
    /// A checkpoint was written.
    Checkpoint(PathBuf),
    /// A sample was skipped.
    Skipped(u64, String),
}

/// The end of a fine-tuning run.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneSummary {
    /// Steps done in total.
    pub steps: u64,
    /// Steps run by this process.
    pub steps_this_run: u64,
    /// The last evaluation.
    pub final_val: Option<FinetuneMetrics>,
    /// The best evaluation so far (its weights: `best/model.safetensors`).
    pub best: Option<FinetuneMetrics>,
    /// Wall time of the training loop, evaluations and checkpoint writes excluded.
    pub train_seconds: f64,
    /// Samples skipped.
    pub skipped: u64,
    /// The last checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// The loss plot.
    pub plot: PathBuf,
}

const ARCH_SUFFIX: &str = "-classifier";

/// The fine-tuning configuration for `checkpoint` (a BEiT or BEiT-3 pretraining checkpoint; `None`: the timm
/// `Beit` state dict of `--init` gives the architecture) on `dataset`: checks that they fit (grid, vocabularies,
/// input kind, labels in both splits) before anything is computed.
pub fn finetune_config(
    checkpoint: Option<&Path>,
    dataset: &Dataset,
    options: &FinetuneOptions,
) -> Result<FinetuneConfig> {
    let (backbone, masking) = match checkpoint {
        Some(checkpoint) => pretrained_backbone(checkpoint)?,
        None => {
            let Some(file) = &options.init else {
                return Err(TrainError::Config(
                    "give --checkpoint (a pretraining run) or --init (a timm Beit state dict)".into(),
                ));
            };
            let config = crate::init::timm_beit_config(file, options.heads)?;
            let grid = [config.grid[0] as usize, config.grid[1] as usize];
            (Backbone::Beit(config), Masking::new(crate::MaskKind::Random, grid)?)
        }
    };
    let backbone = match options.input_size {
        Some(size) => backbone.with_input_size(size)?,
        None => backbone,
    };
    check_data(checkpoint, dataset, &backbone, options.images.is_some())?;
    let classes = label_classes(dataset)?;
    let depth = backbone.depth();
    let layer_decay = options.layer_decay.unwrap_or(if depth > 12 { 0.75 } else { 0.65 });
    let start = match (&options.init, options.random_init, checkpoint) {
        (Some(_), true, _) => return Err(TrainError::Config("--init and --random-init exclude each other".into())),
        (Some(file), false, _) => Start::File(file.clone()),
        (None, true, _) => Start::Random,
        (None, false, Some(c)) => Start::Checkpoint(c.to_path_buf()),
        (None, false, None) => unreachable!("checked above: no checkpoint means --init"),
    };
    let config = FinetuneConfig {
        backbone: backbone.for_finetuning(options.drop_path),
        start,
        classes,
        optim: options.optim.clone(),
        layer_decay,
        label_smoothing: options.label_smoothing,
        mix: options.mix,
        steps: options.steps,
        seed: options.seed,
        stream: options.stream.clone(),
        masking,
        images: options.images.clone(),
    };
    validate(&config)?;
    Ok(config)
}

/// The encoder of a pretraining checkpoint and its masking.
fn pretrained_backbone(checkpoint: &Path) -> Result<(Backbone, Masking)> {
    Ok(match checkpoint_architecture(checkpoint)?.as_str() {
        "beit" => {
            let state: CheckpointState<TrainConfig> = read_state(checkpoint, "beit")?;
            (Backbone::Beit(state.config.model), state.config.masking)
        }
        "beit3" => {
            let state: CheckpointState<crate::Beit3TrainConfig> = read_state(checkpoint, "beit3")?;
            (
                Backbone::Beit3(state.config.model),
                state.config.objective.image_masking,
            )
        }
        other => {
            return Err(TrainError::Checkpoint {
                path: checkpoint.to_path_buf(),
                reason: format!(
                    "holds a {other} model; fine-tuning starts from a pretraining checkpoint (beit or beit3)"
                ),
            })
        }
    })
}

/// A token-input encoder must fit the dataset's tokens (grid, vocabularies, tokenizer); a pixel-input one reads
/// no tokens, only images: the stored working images or the originals (`--images`).
fn check_data(checkpoint: Option<&Path>, dataset: &Dataset, backbone: &Backbone, originals: bool) -> Result<()> {
    let data = backbone.data_config();
    if data.input == crate::InputKind::Pixels {
        if originals || dataset.index().config.include_pixels {
            return Ok(());
        }
        return Err(TrainError::Dataset {
            path: dataset.dir().to_path_buf(),
            reason: "holds no images for a pixel-input encoder: pack with --include-pixels, or give the original \
                     images with --images MANIFEST"
                .into(),
        });
    }
    if originals {
        return Err(TrainError::Config(
            "--images needs a pixel-input encoder (this one reads the dataset's tokens)".into(),
        ));
    }
    let text_vocab = match backbone {
        Backbone::Beit3(c) => Some(c.text_vocab_size),
        Backbone::Beit(_) => None,
    };
    // Token input (pixel input returned above): no stored pixels needed.
    let fit = check_fit(dataset, data.grid, data.vocab_size, text_vocab, false);
    match checkpoint {
        Some(c) => check_probe_fit(c, dataset, fit),
        None => fit,
    }
}

fn validate(config: &FinetuneConfig) -> Result<()> {
    config.optim.validate()?;
    match &config.backbone {
        Backbone::Beit(c) => c.validate()?,
        Backbone::Beit3(c) => c.validate()?,
    }
    config
        .mix
        .validate(config.backbone.data_config().input == crate::InputKind::Pixels)?;
    if !(config.layer_decay > 0.0 && config.layer_decay <= 1.0) {
        return Err(TrainError::Config(format!(
            "--layer-decay must be in (0, 1] (got {})",
            config.layer_decay
        )));
    }
    if !(0.0..1.0).contains(&config.label_smoothing) {
        return Err(TrainError::Config(format!(
            "--label-smoothing must be in [0, 1) (got {})",
            config.label_smoothing
        )));
    }
    if config.steps == 0 || config.stream.batch_size == 0 {
        return Err(TrainError::Config("steps and batch size must be positive".into()));
    }
    config.stream.check_single_process()
}

/// Classes = largest label + 1; both splits must hold labelled images.
fn label_classes(dataset: &Dataset) -> Result<i64> {
    let stats = dataset.stats()?;
    let bad = |reason: String| TrainError::Dataset {
        path: dataset.dir().to_path_buf(),
        reason,
    };
    let Some((&max, _)) = stats.labels.last_key_value() else {
        return Err(bad(
            "no sample has a label: fine-tuning a classifier needs labels (ingest with --labels from-folders)".into(),
        ));
    };
    if stats.labels.len() < 2 {
        return Err(bad(format!(
            "every labelled sample has label {max}: a classifier needs at least two classes"
        )));
    }
    Ok(i64::from(max) + 1)
}

/// The weights a run starts from, loaded into `model` (a description for the log).
fn load_start(model: &Classifier, config: &FinetuneConfig) -> Result<String> {
    let file = match &config.start {
        Start::Random => return Ok("random initialisation (--random-init)".into()),
        Start::Checkpoint(dir) => dir.join("model.safetensors"),
        Start::File(f) => f.clone(),
    };
    let report = match config.start {
        // A timm classifier's `fc_norm` and `head` come along when they fit (same number of classes).
        Start::File(_) => crate::init::init_with_optional(
            model.encoder_parameters(),
            model.head_parameters(),
            &file,
            config.backbone.grid(),
        )?,
        _ => crate::init::init_params(model.encoder_parameters(), &file, config.backbone.grid())?,
    };
    if report.loaded == 0 || !report.missing.is_empty() && matches!(config.start, Start::Checkpoint(_)) {
        return Err(TrainError::Checkpoint {
            path: file,
            reason: format!("does not hold this encoder's weights ({})", report.summary()),
        });
    }
    Ok(report.summary())
}

/// Fine-tunes on `dataset_dir`, writing checkpoints, `best/`, `metrics.jsonl` and `loss.png` under `out`.
pub fn finetune(
    dataset_dir: &Path,
    out: &Path,
    config: &FinetuneConfig,
    options: &RunOptions,
    observer: &mut dyn FnMut(&FinetuneEvent),
) -> Result<FinetuneSummary> {
    validate(config)?;
    let device = options.device.resolve()?;
    let dataset = Dataset::open(dataset_dir)?;
    let data = config.backbone.data_config();
    fs::create_dir_all(out.join("checkpoints")).map_err(io_err(out))?;
    let metrics_path = out.join("metrics.jsonl");
    let architecture = format!("{}{ARCH_SUFFIX}", config.backbone.architecture());

    let mut model = Classifier::new(&config.backbone, config.classes, device, config.seed)?;
    model.set_compute_kind(options.precision.compute_kind());
    let backbone = config.backbone.clone();
    let scale = move |name: &str| {
        config
            .layer_decay
            .powi((backbone.depth() + 1 - backbone.layer_id(name)) as i32)
    };
    let mut opt = AdamW::with_lr_scales(model.named_parameters(), config.optim.clone(), &scale)?;
    let (mut step, mut stream_state, mut samples) = restore(
        out,
        config,
        &dataset.index().build_fingerprint,
        &architecture,
        &mut |p| model.load(p),
        &mut opt,
        options.resume,
    )?;
    let init = if step == 0 {
        load_start(&model, config)?
    } else {
        String::new()
    };
    write_config(out, config)?;
    let mut builder = Builder::new(data.clone(), config.masking.clone(), config.seed);
    if data.input == crate::InputKind::Pixels {
        builder.read_tokens = false;
        if let Some(dir) = &config.images {
            builder.originals = Some(std::sync::Arc::new(Originals::open(dir, &dataset)?));
        }
    }
    let val = FixedSet::load(
        &dataset,
        Split::Val,
        &builder,
        config.stream.batch_size,
        options.eval_samples,
        false,
    )?;
    let until = options.stop_at.map_or(config.steps, |s| s.min(config.steps));
    observer(&FinetuneEvent::Started {
        step,
        until,
        parameters: model.num_parameters(),
        device: options.device.describe(device),
        init,
    });
    let mut skipped = val.skipped.len() as u64;
    let mut best = read_best(out);
    // Seconds spent evaluating and writing checkpoints (left out of `train_seconds`).
    let eval_time = std::cell::Cell::new(0.0f64);
    let mut evaluate_at = |model: &Classifier, step: u64, observer: &mut dyn FnMut(&FinetuneEvent)| -> Result<_> {
        let t = Instant::now();
        let m = evaluate(model, &val, config.classes, step)?;
        eval_time.set(eval_time.get() + t.elapsed().as_secs_f64());
        write_json_line(&metrics_path, &m)?;
        observer(&FinetuneEvent::Metrics(m.clone()));
        if best.as_ref().is_none_or(|b: &FinetuneMetrics| m.top1 > b.top1) {
            write_best(out, model, &m)?;
            observer(&FinetuneEvent::Best(m.clone()));
            best = Some(m.clone());
        }
        Ok(Some(m))
    };
    let mut last_val = None;
    if step == 0 {
        last_val = evaluate_at(&model, 0, observer)?;
    }
    let mut source = Source::Stream(Loader::spawn(
        dataset.clone(),
        BeitBatcher::labelled(builder.clone()),
        config.seed,
        config.stream.clone(),
        stream_state,
    )?);
    let eval_every = match options.eval_every {
        0 => (dataset.index().counts.train / config.stream.batch_size as u64).max(1),
        n => n,
    };
    let started = Instant::now();
    let eval_before = eval_time.get();
    let first_step = step;
    let mut window = Window::new();
    let mut last_ckpt = None;
    while step < until {
        let lr = config.optim.lr_at(step, config.steps);
        opt.zero_grad();
        let batch = source.next()?;
        for (id, why) in &batch.skipped {
            skipped += 1;
            observer(&FinetuneEvent::Skipped(*id, why.clone()));
        }
        stream_state = batch.state;
        samples += batch.len() as u64;
        if !batch.is_empty() {
            let key = mix64(config.seed ^ mix64(step.wrapping_add(1) ^ 0x6669_6e65));
            let d = batch.to_device(&data, device);
            let (loss, correct) = train_loss(&model, config, &data, d.input, &d.labels, key);
            loss.backward();
            window.add(loss.double_value(&[]), correct, batch.len() as u64);
        }
        if let Some(max) = config.optim.clip_grad {
            opt.clip(max);
        }
        opt.step(lr);
        step += 1;
        window.lr = lr;
        if !window.loss_sum.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: window.loss_sum,
            });
        }
        observer(&FinetuneEvent::Step(step));
        if step % options.log_every.max(1) == 0 || step == until {
            let m = window.metrics(step);
            write_json_line(&metrics_path, &m)?;
            observer(&FinetuneEvent::Metrics(m));
            window = Window::new();
        }
        if step % eval_every == 0 || step == config.steps {
            last_val = evaluate_at(&model, step, observer)?;
            plot_losses(&metrics_path, &out.join("loss.png"))?;
        }
        if (options.checkpoint_every > 0 && step % options.checkpoint_every == 0) || step == until {
            let state = CheckpointState {
                format_version: CHECKPOINT_VERSION,
                imglish_version: env!("CARGO_PKG_VERSION").into(),
                architecture: architecture.clone(),
                step,
                stream: stream_state,
                samples,
                dataset_fingerprint: dataset.index().build_fingerprint.clone(),
                tokenizer_fingerprint: Some(dataset.tokenizer().fingerprint.clone()),
                config: config.clone(),
                files: Default::default(),
            };
            let t = Instant::now();
            let path = write_checkpoint(out, &|p| model.save(p), &opt, &state, options.keep_checkpoints)?;
            eval_time.set(eval_time.get() + t.elapsed().as_secs_f64());
            observer(&FinetuneEvent::Checkpoint(path.clone()));
            last_ckpt = Some(path);
        }
    }
    let train_seconds = started.elapsed().as_secs_f64() - (eval_time.get() - eval_before);
    drop(source);
    let plot = out.join("loss.png");
    plot_losses(&metrics_path, &plot)?;
    Ok(FinetuneSummary {
        steps: step,
        steps_this_run: step - first_step,
        final_val: last_val.or_else(|| val_history(&metrics_path).pop()),
        best: read_best(out),
        train_seconds,
        skipped,
        checkpoint: last_ckpt.or(latest_checkpoint(out)?),
        plot,
    })
}

fn write_config(out: &Path, config: &FinetuneConfig) -> Result<()> {
    let path = out.join("config.json");
    let json = serde_json::to_vec_pretty(config).map_err(|e| TrainError::Config(e.to_string()))?;
    imglish_ingest::write_atomic(&path, &json).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
}

/// Soft-target cross-entropy of one training batch (mixed and smoothed targets) and the top-1 hits against the
/// unmixed labels.
fn train_loss(
    model: &Classifier,
    config: &FinetuneConfig,
    data: &crate::ModelConfig,
    input: crate::Input,
    labels: &Tensor,
    key: u64,
) -> (Tensor, i64) {
    let (grid, patch) = (data.grid, data.patch_size);
    let targets = mix::soft_targets(labels, config.classes, config.label_smoothing);
    let mixing = mix::draw(&config.mix, grid, mix64(key ^ 0x006d_6978));
    let (input, targets) = mix::apply(mixing, input, targets, grid, patch);
    let logits = model.logits(&input, Some(key));
    let loss = -(targets * logits.log_softmax(-1, Kind::Float))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float);
    let correct = tch::no_grad(|| {
        logits
            .argmax(-1, false)
            .eq_tensor(labels)
            .sum(Kind::Int64)
            .int64_value(&[])
    });
    (loss, correct)
}

/// Loss, top-1 and top-5 over the labelled validation samples (centre views).
pub(crate) fn evaluate(model: &Classifier, set: &FixedSet, classes: i64, step: u64) -> Result<FinetuneMetrics> {
    tch::no_grad(|| {
        let (mut loss, mut top1, mut top5, mut n) = (0.0, 0i64, 0i64, 0i64);
        let data = model.backbone().data_config();
        let device = model.device();
        let k = classes.min(5);
        for b in &set.batches {
            let d = b.to_device(&data, device);
            let keep = d.labels.ge(0);
            let labels = d.labels.masked_select(&keep);
            if labels.numel() == 0 {
                continue;
            }
            let logits = model.logits(&d.input, None).index(&[Some(keep)]);
            loss += logits
                .f_cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Sum, -100, 0.0)
                .map_err(torch_err("fine-tuning evaluation"))?
                .double_value(&[]);
            let (_, idx) = logits.topk(k, -1, true, true);
            let hits = idx.eq_tensor(&labels.unsqueeze(-1));
            top1 += hits.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
            top5 += hits.sum(Kind::Int64).int64_value(&[]);
            n += labels.size()[0];
        }
        if n == 0 {
            return Err(TrainError::Config(
                "the validation split has no labelled image: fine-tuning cannot be evaluated".into(),
            ));
        }
        let n_f = n as f64;
        Ok(FinetuneMetrics {
            kind: "val".into(),
            step,
            loss: loss / n_f,
            top1: top1 as f64 / n_f,
            top5: Some(top5 as f64 / n_f),
            lr: None,
            samples_per_s: None,
            samples: n as u64,
        })
    })
}

fn val_history(metrics: &Path) -> Vec<FinetuneMetrics> {
    fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<FinetuneMetrics>(l).ok())
        .filter(|m| m.kind == "val")
        .collect()
}

fn read_best(out: &Path) -> Option<FinetuneMetrics> {
    serde_json::from_slice(&fs::read(out.join("best").join("best.json")).ok()?).ok()
}

/// Replaces `out/best/` (weights and their evaluation) atomically.
fn write_best(out: &Path, model: &Classifier, m: &FinetuneMetrics) -> Result<()> {
    let dir = out.join("best");
    let tmp = out.join(".tmp-best");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    model.save(&tmp.join("model.safetensors"))?;
    let p = tmp.join("model.safetensors");
    fs::File::open(&p).and_then(|f| f.sync_all()).map_err(io_err(&p))?;
    let json = serde_json::to_vec_pretty(m).map_err(|e| TrainError::Config(e.to_string()))?;
    imglish_ingest::write_atomic(&tmp.join("best.json"), &json).map_err(|e| TrainError::Config(e.to_string()))?;
    let old = out.join(".old-best");
    let _ = fs::remove_dir_all(&old);
    if dir.exists() {
        fs::rename(&dir, &old).map_err(io_err(&dir))?;
    }
    fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

struct Window {
    start: Instant,
    loss_sum: f64,
    batches: u64,
    correct: i64,
    samples: u64,
    lr: f64,
}

impl Window {
    fn new() -> Window {
        Window {
            start: Instant::now(),
            loss_sum: 0.0,
            batches: 0,
            correct: 0,
            samples: 0,
            lr: 0.0,
        }
    }

    fn add(&mut self, loss: f64, correct: i64, samples: u64) {
        self.loss_sum += loss;
        self.batches += 1;
        self.correct += correct;
        self.samples += samples;
    }

    fn metrics(&self, step: u64) -> FinetuneMetrics {
        FinetuneMetrics {
            kind: "train".into(),
            step,
            loss: self.loss_sum / self.batches.max(1) as f64,
            top1: self.correct as f64 / self.samples.max(1) as f64,
            top5: None,
            lr: Some(self.lr),
            samples_per_s: Some(self.samples as f64 / self.start.elapsed().as_secs_f64().max(1e-9)),
            samples: self.samples,
        }
    }
}

/// Loads a fine-tuned checkpoint (for evaluation or features).
pub fn load_classifier(checkpoint: &Path, device: Device) -> Result<(Classifier, FinetuneConfig)> {
    let arch = checkpoint_architecture(checkpoint)?;
    let state: CheckpointState<FinetuneConfig> = read_state(checkpoint, &arch)?;
    if !arch.ends_with(ARCH_SUFFIX) {
        return Err(TrainError::Checkpoint {
            path: checkpoint.to_path_buf(),
            reason: format!("holds a {arch} model, not a fine-tuned classifier"),
        });
    }
    let mut model = Classifier::new(&state.config.backbone, state.config.classes, device, state.config.seed)?;
    model.load(&checkpoint.join("model.safetensors"))?;
    Ok((model, state.config))
}
