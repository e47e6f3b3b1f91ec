//! The training loop: streaming batches, masked-token cross-entropy, AdamW with warmup + cosine, gradient
//! accumulation and clipping, validation with fixed masks, checkpoints that resume exactly, metrics as JSON
//! lines and a `loss.png`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use imglish_ingest::{mix64, write_atomic};
use imglish_pack::{Dataset, Split, StreamState};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::data::{Batch, BeitBatcher, Builder, FixedSet, Loader, StreamConfig};
use crate::device::{Precision, TorchDevice};
use crate::error::{io_err, Result, TrainError};
use crate::masking::Masking;
use crate::model::Beit;
use crate::optim::{AdamW, OptimConfig};
use crate::plot::plot_losses;

/// Checkpoint format version (`state.json`).
pub const CHECKPOINT_VERSION: u32 = 1;

/// Where the batches come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataMode {
    /// pack's streaming reader on a background thread (the normal mode).
    Stream,
    /// Every batch the run needs is read before the clock starts and replayed from memory (benchmarking the
    /// data path's overhead; same batches as `Stream`).
    Memory,
}

/// Everything that decides what a run computes. Resuming requires the same values (rank, world size, device,
/// and the logging/evaluation/checkpoint intervals may change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model.
    pub model: ModelConfig,
    /// The optimiser and schedule.
    pub optim: OptimConfig,
    /// The masks.
    pub masking: Masking,
    /// Optimiser steps of the whole run.
    pub steps: u64,
    /// Micro-batches per optimiser step.
    pub accum: u32,
    /// Seed of the initialisation, order, views, masks and stochastic depth.
    pub seed: u64,
    /// The stream (batch size, order, rank, prefetch).
    pub stream: StreamConfig,
}

/// How a run is carried out (may differ between a run and its resumption).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The device.
    pub device: TorchDevice,
    /// Float precision of the forward pass.
    pub precision: Precision,
    /// Log metrics every this many steps.
    pub log_every: u64,
    /// Evaluate on the validation split every this many steps (0: at the start and the end only).
    pub eval_every: u64,
    /// Validation samples used (the first ones in dataset order).
    pub eval_samples: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Stop after this step (a checkpoint is written there) even though the run has more steps.
    pub stop_at: Option<u64>,
    /// Continue from the newest checkpoint in the output directory.
    pub resume: bool,
    /// Streaming or in-memory batches.
    pub data: DataMode,
    /// Initial weights (`--init`): timm / torchscale / imglish safetensors, applied when the run starts at step
    /// 0 (see [`crate::init_params`]).
    pub init: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            device: TorchDevice::Cpu,
            precision: Precision::F32,
            log_every: 10,
            eval_every: 0,
            eval_samples: 2048,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            stop_at: None,
            resume: false,
            data: DataMode::Stream,
            init: None,
        }
    }
}

/// Metrics of one log interval (one JSON line in `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Always `"train"`.
    pub kind: String,
    /// Optimiser steps done.
    pub step: u64,
    /// The stream's epoch.
    pub epoch: u64,
    /// Mean masked-token cross-entropy over the interval.
    pub loss: f64,
    /// Masked-token accuracy over the interval.
    pub accuracy: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Gradient norm before clipping, last step.
    pub grad_norm: f64,
    /// Samples per second over the interval.
    pub samples_per_s: f64,
    /// Input tokens (patches) per second over the interval.
    pub tokens_per_s: f64,
    /// Fraction of the interval spent waiting for data.
    pub data_wait: f64,
}

/// Validation metrics (one JSON line in `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Always `"val"`.
    pub kind: String,
    /// Optimiser steps done.
    pub step: u64,
    /// Masked-token cross-entropy over the validation samples (fixed masks, centre view).
    pub loss: f64,
    /// Masked-token accuracy.
    pub accuracy: f64,
    /// The accuracy of always predicting the most frequent masked code of the validation set (e.g. a flat
    /// background code): what `accuracy` must beat to mean anything.
    #[serde(default)]
    pub majority_accuracy: f64,
    /// Validation samples.
    pub samples: usize,
}

/// What the run reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// The run starts (or resumes) at this step.
    Started {
        /// First step to run.
        step: u64,
        /// Last step of this run.
        until: u64,
        /// Model parameters.
        parameters: i64,
        /// The device in words.
        device: String,
    },
    /// A step finished.
    Step(u64),
    /// A log interval.
    Train(StepMetrics),
    /// An evaluation.
    Val(EvalMetrics),
    /// A checkpoint was written.
    Checkpoint(PathBuf),
    /// A sample was skipped.
    Skipped(u64, String),
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Steps done in total (including resumed ones).
    pub steps: u64,
    /// Steps run by this process.
    pub steps_this_run: u64,
    /// Validation loss at step 0 (from the metrics history), if evaluated.
    pub initial_val_loss: Option<f64>,
    /// The last validation metrics.
    pub final_val: Option<EvalMetrics>,
    /// Training samples processed by this process.
    pub samples: u64,
    /// Wall time of the training loop (excluding the initial and final evaluation).
    pub train_seconds: f64,
    /// Fraction of the loop spent waiting for data.
    pub data_wait: f64,
    /// Samples skipped (bad stored pixels or corrupt shards).
    pub skipped: u64,
    /// The last checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// The loss plot.
    pub plot: PathBuf,
}

/// `state.json` of a checkpoint (`C`: the run's configuration, [`TrainConfig`] for BEiT).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CheckpointState<C> {
    pub(crate) format_version: u32,
    pub(crate) imglish_version: String,
    /// `"beit"` or `"beit3"` (checkpoints written before BEiT-3 existed have none: BEiT).
    #[serde(default = "beit_architecture")]
    pub(crate) architecture: String,
    pub(crate) step: u64,
    pub(crate) stream: StreamState,
    pub(crate) samples: u64,
    pub(crate) dataset_fingerprint: String,
    /// The visual tokenizer's fingerprint of the dataset trained on (checkpoints written before it was recorded,
    /// and the Python trainer's, have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tokenizer_fingerprint: Option<String>,
    pub(crate) config: C,
    /// The sha256 of each weight file beside `state.json` (`model.safetensors`, `optimizer.safetensors`), filled
    /// in by [`write_checkpoint`] and checked by [`read_state`] before anything loads them, so that a damaged
    /// checkpoint is an error instead of other weights (checkpoints written before it was recorded have none and
    /// are not checked).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) files: BTreeMap<String, String>,
}

fn beit_architecture() -> String {
    "beit".into()
}

/// The model architecture a checkpoint holds: `"beit"` or `"beit3"`.
pub fn checkpoint_architecture(checkpoint: &Path) -> Result<String> {
    #[derive(Deserialize)]
    struct Arch {
        #[serde(default = "beit_architecture")]
        architecture: String,
    }
    let path = checkpoint.join("state.json");
    let bytes = fs::read(&path).map_err(|e| TrainError::Checkpoint {
        path: checkpoint.to_path_buf(),
        reason: format!("cannot read state.json ({e}); not a checkpoint directory?"),
    })?;
    let arch: Arch = serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
        path,
        reason: format!("malformed: {e}"),
    })?;
    Ok(arch.architecture)
}

/// The checkpoint directory name of `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// A checkpoint directory as given, or for a run directory (one without `state.json`) its newest checkpoint.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    match latest_checkpoint(path)? {
        Some(latest) if !path.join("state.json").exists() => Ok(latest),
        _ => Ok(path.to_path_buf()),
    }
}

/// The newest complete checkpoint under `out/checkpoints`, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let dir = out.join("checkpoints");
    if !dir.exists() {
        return Ok(None);
    }
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if entry.path().join("state.json").exists() && best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Reads a checkpoint's model configuration and builds the model with its weights.
pub fn load_model(checkpoint: &Path, device: Device) -> Result<(Beit, TrainConfig)> {
    let state: CheckpointState<TrainConfig> = read_state(checkpoint, "beit")?;
    let mut model = Beit::new(&state.config.model, device, state.config.seed)?;
    model.load(&checkpoint.join("model.safetensors"))?;
    Ok((model, state.config))
}

pub(crate) fn read_state<C: serde::de::DeserializeOwned>(
    checkpoint: &Path,
    architecture: &str,
) -> Result<CheckpointState<C>> {
    let found = checkpoint_architecture(checkpoint)?;
    if found != architecture {
        return Err(TrainError::Checkpoint {
            path: checkpoint.to_path_buf(),
            reason: format!("holds a {found} model, not {architecture}"),
        });
    }
    let path = checkpoint.join("state.json");
    let bytes = fs::read(&path).map_err(|e| TrainError::Checkpoint {
        path: checkpoint.to_path_buf(),
        reason: format!("cannot read state.json ({e}); not a checkpoint directory?"),
    })?;
    let state: CheckpointState<C> = serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        reason: format!("malformed: {e}"),
    })?;
    if state.format_version != CHECKPOINT_VERSION {
        return Err(TrainError::Checkpoint {
            path,
            reason: format!(
                "format version {} (this imglish reads {CHECKPOINT_VERSION})",
                state.format_version
            ),
        });
    }
    for (name, want) in &state.files {
        if Path::new(name).file_name() != Some(std::ffi::OsStr::new(name)) {
            return Err(TrainError::Checkpoint {
                path,
                reason: format!("malformed: `files` names {name:?}, not a file beside state.json"),
            });
        }
        let file = checkpoint.join(name);
        let (got, _) = imglish_pack::sha256_file(&file)?;
        if &got != want {
            return Err(TrainError::Checkpoint {
                path: file,
                reason: format!(
                    "sha256 is {got}, state.json says {want}: the file was damaged or replaced after the \
                     checkpoint was written (resume from an earlier checkpoint: remove this one)"
                ),
            });
        }
    }
    Ok(state)
}

pub(crate) fn write_json_line(path: &Path, value: &impl Serialize) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let line = serde_json::to_string(value).map_err(|e| TrainError::Config(e.to_string()))?;
    writeln!(f, "{line}").map_err(io_err(path))
}

/// Keeps the metrics lines of steps `<= step` (a resumed run rewrites what came after its checkpoint).
pub(crate) fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes()).map_err(|e| TrainError::Config(e.to_string()))
}

/// Masked-token loss (sum over masked positions) and correct predictions of one batch.
fn batch_loss(model: &Beit, b: &crate::data::DeviceBatch, train: Option<u64>) -> (Tensor, Tensor) {
    let logits = model.mim_logits(&b.input, &b.mask, train).to_kind(Kind::Float);
    let loss = logits.cross_entropy_loss::<Tensor>(&b.targets, None, tch::Reduction::Sum, -100, 0.0);
    let correct = logits.argmax(-1, false).eq_tensor(&b.targets).sum(Kind::Int64);
    (loss, correct)
}

/// Validation loss and accuracy over a fixed set.
pub fn evaluate(model: &Beit, set: &FixedSet) -> (f64, f64) {
    tch::no_grad(|| {
        let (mut loss, mut correct, mut count) = (0.0, 0i64, 0i64);
        for b in &set.batches {
            let d = b.to_device(model.config(), model.device());
            let (l, c) = batch_loss(model, &d, None);
            loss += l.double_value(&[]);
            correct += c.int64_value(&[]);
            count += d.targets.size()[0];
        }
        let n = count.max(1) as f64;
        (loss / n, correct as f64 / n)
    })
}

/// Trains on `dataset_dir`, writing checkpoints, `metrics.jsonl` and `loss.png` under `out`.
pub fn train(
    dataset_dir: &Path,
    out: &Path,
    config: &TrainConfig,
    options: &RunOptions,
    observer: &mut dyn FnMut(&Event),
) -> Result<TrainSummary> {
    config.model.validate()?;
    config.optim.validate()?;
    if config.steps == 0 || config.accum == 0 || config.stream.batch_size == 0 {
        return Err(TrainError::Config(
            "steps, accum and batch size must be positive".into(),
        ));
    }
    config.stream.check_single_process()?;
    let device = options.device.resolve()?;
    let dataset = Dataset::open(dataset_dir)?;
    check_dataset(&dataset, &config.model)?;
    fs::create_dir_all(out.join("checkpoints")).map_err(io_err(out))?;
    let metrics_path = out.join("metrics.jsonl");

    let mut model = Beit::new(&config.model, device, config.seed)?;
    model.set_compute_kind(options.precision.compute_kind());
    let mut opt = AdamW::new(model.named_parameters(), config.optim.clone())?;
    let (mut step, mut stream_state, mut samples) = restore(
        out,
        config,
        &dataset.index().build_fingerprint,
        "beit",
        &mut |p| model.load(p),
        &mut opt,
        options.resume,
    )?;
    crate::init::apply(
        options.init.as_deref(),
        step,
        model.named_parameters(),
        config.model.grid,
    )?;
    fs::write(
        out.join("config.json"),
        serde_json::to_vec_pretty(config).map_err(|e| TrainError::Config(e.to_string()))?,
    )
    .map_err(io_err(out.join("config.json")))?;

    let until = options.stop_at.map_or(config.steps, |s| s.min(config.steps));
    let builder = Builder::new(config.model.clone(), config.masking.clone(), config.seed);
    let val = FixedSet::load(
        &dataset,
        Split::Val,
        &builder,
        config.stream.batch_size,
        options.eval_samples,
        false,
    )?;
    observer(&Event::Started {
        step,
        until,
        parameters: model.num_parameters(),
        device: options.device.describe(device),
    });
    let majority_accuracy = val.majority_accuracy();
    let mut skipped = val.skipped.len() as u64;
    for (id, why) in &val.skipped {
        observer(&Event::Skipped(*id, why.clone()));
    }
    let eval = |model: &Beit, step: u64, observer: &mut dyn FnMut(&Event)| -> Result<Option<EvalMetrics>> {
        if val.samples == 0 {
            return Ok(None);
        }
        let (loss, accuracy) = evaluate(model, &val);
        let m = EvalMetrics {
            kind: "val".into(),
            step,
            loss,
            accuracy,
            majority_accuracy,
            samples: val.samples,
        };
        write_json_line(&metrics_path, &m)?;
        observer(&Event::Val(m.clone()));
        Ok(Some(m))
    };
    let mut last_val = None;
    if step == 0 {
        last_val = eval(&model, 0, observer)?;
    }

    let mut source = match options.data {
        DataMode::Stream => Source::Stream(Loader::spawn(
            dataset.clone(),
            BeitBatcher::new(builder.clone()),
            config.seed,
            config.stream.clone(),
            stream_state,
        )?),
        DataMode::Memory => {
            let mut loader = Loader::spawn(
                dataset.clone(),
                BeitBatcher::new(builder.clone()),
                config.seed,
                config.stream.clone(),
                stream_state,
            )?;
            let need = (until.saturating_sub(step) * u64::from(config.accum)) as usize;
            let batches = (0..need).map(|_| loader.next_batch()).collect::<Result<Vec<_>>>()?;
            Source::Memory(batches.into_iter())
        }
    };

    let started = Instant::now();
    let first_step = step;
    let mut window = Window::new(source.waited());
    let mut last_ckpt = None;
    let n_patches = config.model.num_patches() as f64;
    while step < until {
        let lr = config.optim.lr_at(step, config.steps);
        opt.zero_grad();
        for micro in 0..config.accum {
            let batch = source.next()?;
            for (id, why) in &batch.skipped {
                skipped += 1;
                observer(&Event::Skipped(*id, why.clone()));
            }
            stream_state = batch.state;
            samples += batch.len() as u64;
            if batch.is_empty() {
                continue;
            }
            // Stochastic depth draws are keyed by (seed, step, micro-batch): a resumed run draws the same.
            let key = mix64(config.seed ^ mix64(step.wrapping_mul(1024).wrapping_add(u64::from(micro))));
            let d = batch.to_device(&config.model, device);
            let masked = d.targets.size()[0].max(1);
            let (loss, correct) = batch_loss(&model, &d, Some(key));
            (&loss / (masked as f64 * f64::from(config.accum))).backward();
            window.add(loss.double_value(&[]), correct.int64_value(&[]), masked, batch.len());
        }
        let grad_norm = match config.optim.clip_grad {
            Some(max) => opt.clip(max),
            None => opt.grad_norm(),
        };
        opt.step(lr);
        step += 1;
        window.lr = lr;
        window.grad_norm = grad_norm;
        if !window.loss_sum.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: window.loss_sum,
            });
        }
        observer(&Event::Step(step));
        if step % options.log_every.max(1) == 0 || step == until {
            let m = window.metrics(step, stream_state.epoch, n_patches, source.waited());
            write_json_line(&metrics_path, &m)?;
            observer(&Event::Train(m));
            window = Window::new(source.waited());
        }
        if options.eval_every > 0 && step % options.eval_every == 0 && step < until {
            last_val = eval(&model, step, observer)?;
            plot_losses(&metrics_path, &out.join("loss.png"))?;
        }
        if (options.checkpoint_every > 0 && step % options.checkpoint_every == 0) || step == until {
            let state = CheckpointState {
                format_version: CHECKPOINT_VERSION,
                imglish_version: env!("CARGO_PKG_VERSION").into(),
                architecture: beit_architecture(),
                step,
                stream: stream_state,
                samples,
                dataset_fingerprint: dataset.index().build_fingerprint.clone(),
                tokenizer_fingerprint: Some(dataset.tokenizer().fingerprint.clone()),
                config: config.clone(),
                files: Default::default(),
            };
            let path = write_checkpoint(out, &|p| model.save(p), &opt, &state, options.keep_checkpoints)?;
            observer(&Event::Checkpoint(path.clone()));
            last_ckpt = Some(path);
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let waited = source.waited().as_secs_f64();
    drop(source);
    if step > first_step || (last_val.is_none() && !options.resume) {
        last_val = eval(&model, step, observer)?;
    } else if last_val.is_none() {
        // Resumed at the end: the metrics already hold this step's validation.
        last_val = val_history(&metrics_path).pop();
    }
    let plot = out.join("loss.png");
    plot_losses(&metrics_path, &plot)?;
    Ok(TrainSummary {
        steps: step,
        steps_this_run: step - first_step,
        initial_val_loss: initial_val_loss(&metrics_path),
        final_val: last_val,
        samples,
        train_seconds,
        data_wait: if train_seconds > 0.0 {
            waited / train_seconds
        } else {
            0.0
        },
        skipped,
        checkpoint: last_ckpt.or(latest_checkpoint(out)?),
        plot,
    })
}

fn val_history(metrics: &Path) -> Vec<EvalMetrics> {
    fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<EvalMetrics>(l).ok())
        .filter(|m| m.kind == "val")
        .collect()
}

fn initial_val_loss(metrics: &Path) -> Option<f64> {
    val_history(metrics).into_iter().find(|m| m.step == 0).map(|m| m.loss)
}

pub(crate) fn config_diff(a: &impl Serialize, b: &impl Serialize) -> String {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    let mut diffs = Vec::new();
    diff_values("", &a, &b, &mut diffs);
    diffs.join("; ")
}

/// The leaves that differ between `a` and `b`, as `path.to.key: checkpoint A, now B` (objects are compared key
/// by key, so a changed learning rate reads `optim.lr: ...`, not the whole `optim` object twice).
fn diff_values(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a.as_object(), b.as_object()) {
        (Some(oa), Some(ob)) => {
            let keys: std::collections::BTreeSet<&String> = oa.keys().chain(ob.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let null = serde_json::Value::Null;
                diff_values(&p, oa.get(k).unwrap_or(&null), ob.get(k).unwrap_or(&null), out);
            }
        }
        _ if a != b => out.push(format!("{path}: checkpoint {a}, now {b}")),
        _ => {}
    }
}

fn check_dataset(dataset: &Dataset, model: &ModelConfig) -> Result<()> {
    check_fit(
        dataset,
        model.grid,
        model.vocab_size,
        None,
        model.input == crate::config::InputKind::Pixels,
    )
}

/// Checks that a model fits a dataset before any compute: token grid, visual vocabulary, text vocabulary (when
/// the model has one and the dataset has texts) and, when the model reads them (`stored_pixels`), the stored
/// working images. The error names the dataset and the mismatch.
pub(crate) fn check_fit(
    dataset: &Dataset,
    grid: [i64; 2],
    vocab_size: i64,
    text_vocab_size: Option<i64>,
    stored_pixels: bool,
) -> Result<()> {
    let info = dataset.tokenizer();
    let bad = |reason: String| TrainError::Dataset {
        path: dataset.dir().to_path_buf(),
        reason,
    };
    let data_grid = [i64::from(info.grid[0]), i64::from(info.grid[1])];
    if data_grid != grid {
        return Err(bad(format!("token grid {data_grid:?}, the model expects {grid:?}")));
    }
    if i64::from(info.vocab_size) != vocab_size {
        return Err(bad(format!(
            "visual vocabulary of {}, the model expects {vocab_size}",
            info.vocab_size
        )));
    }
    if let (Some(v), Some(m)) = (info.text_vocab_size, text_vocab_size) {
        if i64::from(v) != m {
            return Err(bad(format!("text vocabulary of {v}, the model expects {m}")));
        }
    }
    if stored_pixels && !dataset.index().config.include_pixels {
        return Err(bad("--input pixels needs a dataset packed with --include-pixels".into()));
    }
    Ok(())
}

/// [`check_fit`] for a command given a checkpoint: then the tokenizer fingerprint the checkpoint recorded (if
/// any) must be the dataset's, so that token ids mean the same codes; the error also names the checkpoint.
pub(crate) fn check_probe_fit(checkpoint: &Path, dataset: &Dataset, fit: Result<()>) -> Result<()> {
    let fit = fit.and_then(|()| {
        #[derive(Deserialize)]
        struct Recorded {
            #[serde(default)]
            tokenizer_fingerprint: Option<String>,
        }
        let recorded: Option<Recorded> = fs::read(checkpoint.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let data = &dataset.tokenizer().fingerprint;
        match recorded.and_then(|r| r.tokenizer_fingerprint) {
            Some(fp) if fp != *data => Err(TrainError::Dataset {
                path: dataset.dir().to_path_buf(),
                reason: format!(
                    "tokens of visual tokenizer {}, the checkpoint was trained on tokens of {} (same grid and \
                     vocabulary, other codes: re-tokenize with the checkpoint's tokenizer)",
                    short(data),
                    short(&fp)
                ),
            }),
            _ => Ok(()),
        }
    });
    fit.map_err(|e| match e {
        TrainError::Dataset { path, reason } => TrainError::Dataset {
            path,
            reason: format!("does not fit checkpoint {}: {reason}", checkpoint.display()),
        },
        other => other,
    })
}

fn short(fingerprint: &str) -> &str {
    fingerprint.get(..12).unwrap_or(fingerprint)
}

/// Restores model (through `load_model`), optimiser and stream from the newest checkpoint under `out` when
/// `resume` (refusing one written with other settings, naming the fields, or for another dataset: its build
/// fingerprint, or for a dVAE its manifest's), or refuses an
/// output folder that already holds checkpoints. Returns `(step, stream state, samples)`.
pub(crate) fn restore<C: PartialEq + Serialize + serde::de::DeserializeOwned>(
    out: &Path,
    config: &C,
    dataset_fingerprint: &str,
    architecture: &str,
    load_model: &mut dyn FnMut(&Path) -> Result<()>,
    opt: &mut AdamW,
    resume: bool,
) -> Result<(u64, StreamState, u64)> {
    let metrics = out.join("metrics.jsonl");
    let Some(ckpt) = latest_checkpoint(out)? else {
        let _ = fs::remove_file(&metrics);
        return Ok((0, StreamState::default(), 0));
    };
    if !resume {
        return Err(TrainError::Config(format!(
            "{} already holds checkpoints: pass --resume to continue that run, or choose another --out",
            out.display()
        )));
    }
    let state: CheckpointState<C> = read_state(&ckpt, architecture)?;
    if state.config != *config {
        return Err(TrainError::Checkpoint {
            path: ckpt,
            reason: format!(
                "written by a run with other settings: {}",
                config_diff(&state.config, config)
            ),
        });
    }
    if state.dataset_fingerprint != dataset_fingerprint {
        return Err(TrainError::Checkpoint {
            path: ckpt,
            reason: "written for another dataset (build fingerprints differ)".into(),
        });
    }
    load_model(&ckpt.join("model.safetensors"))?;
    opt.load(&ckpt.join("optimizer.safetensors"))?;
    truncate_metrics(&metrics, state.step)?;
    Ok((state.step, state.stream, state.samples))
}

/// Writes a checkpoint directory atomically (temporary name, fsync, rename), then keeps the newest `keep`.
pub(crate) fn write_checkpoint<C: Serialize>(
    out: &Path,
    save_model: &dyn Fn(&Path) -> Result<()>,
    opt: &AdamW,
    state: &CheckpointState<C>,
    keep: usize,
) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    let name = checkpoint_name(state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    let dst = root.join(&name);
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    save_model(&tmp.join("model.safetensors"))?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    let mut value = serde_json::to_value(state).map_err(|e| TrainError::Config(e.to_string()))?;
    let mut files = serde_json::Map::new();
    for f in ["model.safetensors", "optimizer.safetensors"] {
        files.insert(f.into(), imglish_pack::sha256_file(&tmp.join(f))?.0.into());
    }
    value["files"] = files.into();
    let json = serde_json::to_vec_pretty(&value).map_err(|e| TrainError::Config(e.to_string()))?;
    write_atomic(&tmp.join("state.json"), &json).map_err(|e| TrainError::Config(e.to_string()))?;
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let p = tmp.join(f);
        fs::File::open(&p).and_then(|f| f.sync_all()).map_err(io_err(&p))?;
    }
    let _ = fs::remove_dir_all(&dst);
    fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    if let Ok(d) = fs::File::open(&root) {
        let _ = d.sync_all();
    }
    // Keep the newest `keep` checkpoints.
    let mut steps: Vec<(u64, PathBuf)> = fs::read_dir(&root)
        .map_err(io_err(&root))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("step-")
                .and_then(|s| s.parse().ok())
                .map(|s| (s, e.path()))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep.max(1));
    for (_, p) in steps.into_iter().take(excess) {
        let _ = fs::remove_dir_all(p);
    }
    Ok(dst)
}

pub(crate) enum Source<B = Batch> {
    Stream(Loader<B>),
    Memory(std::vec::IntoIter<B>),
}

impl<B: Send + 'static> Source<B> {
    pub(crate) fn next(&mut self) -> Result<B> {
        match self {
            Source::Stream(l) => l.next_batch(),
            Source::Memory(it) => it
                .next()
                .ok_or_else(|| TrainError::Config("in-memory batches exhausted".into())),
        }
    }

    pub(crate) fn waited(&self) -> std::time::Duration {
        match self {
            Source::Stream(l) => l.waited(),
            Source::Memory(_) => std::time::Duration::ZERO,
        }
    }
}

struct Window {
    start: Instant,
    waited_before: std::time::Duration,
    loss_sum: f64,
    correct: i64,
    masked: i64,
    samples: usize,
    lr: f64,
    grad_norm: f64,
}

impl Window {
    fn new(waited_before: std::time::Duration) -> Window {
        Window {
            start: Instant::now(),
            waited_before,
            loss_sum: 0.0,
            correct: 0,
            masked: 0,
            samples: 0,
            lr: 0.0,
            grad_norm: 0.0,
        }
    }

    fn add(&mut self, loss_sum: f64, correct: i64, masked: i64, samples: usize) {
        self.loss_sum += loss_sum;
        self.correct += correct;
        self.masked += masked;
        self.samples += samples;
    }

    fn metrics(&self, step: u64, epoch: u64, n_patches: f64, waited: std::time::Duration) -> StepMetrics {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let wait = waited.saturating_sub(self.waited_before);
        let m = self.masked.max(1) as f64;
        StepMetrics {
            kind: "train".into(),
            step,
            epoch,
            loss: self.loss_sum / m,
            accuracy: self.correct as f64 / m,
            lr: self.lr,
            grad_norm: self.grad_norm,
            samples_per_s: self.samples as f64 / secs,
            tokens_per_s: self.samples as f64 * n_patches / secs,
            data_wait: (wait.as_secs_f64() / secs).min(1.0),
        }
    }
}
