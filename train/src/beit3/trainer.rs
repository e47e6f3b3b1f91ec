//! BEiT-3 pretraining: masked data modelling on the image, text and pair samples of each batch (one forward per
//! kind present), the loss the sum of the mean MIM and mean MLM cross-entropies; the optimiser, schedule,
//! checkpoints (torchscale names, plus `torchscale.json` where torchscale can build the model) and exact resume
//! are BEiT's.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use imglish_ingest::mix64;
use imglish_pack::{Dataset, Split};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::beit3::config::Beit3Config;
use crate::beit3::data::{fixed_set, Beit3Batch, Beit3Batcher, Beit3Builder, Objective, SampleKind};
use crate::beit3::model::{Beit3, ImageIn, TextIn};
use crate::data::{Loader, StreamConfig};
use crate::error::{io_err, Result, TrainError};
use crate::optim::{AdamW, OptimConfig};
use crate::plot::plot_losses;
use crate::trainer::{
    latest_checkpoint, read_state, restore, write_checkpoint, write_json_line, CheckpointState, DataMode, RunOptions,
    Source, CHECKPOINT_VERSION,
};

/// Everything that decides what a BEiT-3 run computes (resuming requires the same values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Beit3TrainConfig {
    /// The model.
    pub model: Beit3Config,
    /// The objective: kind weights and mask ratios.
    pub objective: Objective,
    /// The optimiser and schedule.
    pub optim: OptimConfig,
    /// Optimiser steps of the whole run.
    pub steps: u64,
    /// Micro-batches per optimiser step.
    pub accum: u32,
    /// Seed of the initialisation, order, views, kinds, captions, masks and stochastic depth.
    pub seed: u64,
    /// The stream.
    pub stream: StreamConfig,
}

/// Loss and accuracy of one prediction task over some samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Accuracy of the argmax.
    pub accuracy: f64,
    /// Predicted tokens.
    pub tokens: i64,
}

/// One line of `metrics.jsonl`: a train log interval or a validation pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beit3Metrics {
    /// `"train"` or `"val"`.
    pub kind: String,
    /// Optimiser steps done.
    pub step: u64,
    /// The stream's epoch (train lines).
    pub epoch: u64,
    /// Mean MIM cross-entropy plus mean MLM cross-entropy.
    pub loss: f64,
    /// Per task: `image_mim`, `pair_mim`, `text_mlm`, `pair_mlm` (those present).
    pub tasks: BTreeMap<String, TaskMetrics>,
    /// Samples per kind.
    pub samples: BTreeMap<String, u64>,
    /// Learning rate of the last step (train lines).
    pub lr: f64,
    /// Gradient norm before clipping, last step (train lines).
    pub grad_norm: f64,
    /// Samples per second over the interval (train lines).
    pub samples_per_s: f64,
    /// Fraction of the interval spent waiting for data (train lines).
    pub data_wait: f64,
}

/// What a BEiT-3 run reports as it goes.
#[derive(Debug, Clone)]
pub enum Beit3Event {
    /// The run starts (or resumes) at `step` and runs until `until`.
    Started {
        /// First step.
        step: u64,
        /// Last step.
        until: u64,
        /// Parameters.
        parameters: i64,
        /// The device in words.
        device: String,
    },
    /// A step finished.
    Step(u64),
    /// A train log line or a validation pass.
    Metrics(Beit3Metrics),
    /// A checkpoint was written.
    Checkpoint(PathBuf),
    /// A sample was skipped.
    Skipped(u64, String),
}

/// The end of a BEiT-3 run.
#[derive(Debug, Clone, Serialize)]
pub struct Beit3Summary {
    /// Steps done in total.
    pub steps: u64,
    /// Steps run by this process.
    pub steps_this_run: u64,
    /// The validation pass at step 0, if any.
    pub initial_val: Option<Beit3Metrics>,
    /// The last validation pass.
    pub final_val: Option<Beit3Metrics>,
    /// Training samples processed (all runs).
    pub samples: u64,
    /// Wall time of the training loop.
    pub train_seconds: f64,
    /// Samples skipped.
    pub skipped: u64,
    /// The last checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// The loss plot.
    pub plot: PathBuf,
}

/// Sums of one task over a window or a validation pass.
#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    loss: f64,
    correct: i64,
    count: i64,
}

/// Task sums in the order image MIM, pair MIM, text MLM, pair MLM.
#[derive(Debug, Clone, Default)]
struct Tally {
    tasks: [Acc; 4],
    samples: [u64; 3],
}

const TASKS: [&str; 4] = ["image_mim", "pair_mim", "text_mlm", "pair_mlm"];

impl Tally {
    fn add(&mut self, other: &Tally) {
        for (a, b) in self.tasks.iter_mut().zip(&other.tasks) {
            a.loss += b.loss;
            a.correct += b.correct;
            a.count += b.count;
        }
        for (a, b) in self.samples.iter_mut().zip(&other.samples) {
            *a += b;
        }
    }

    /// Mean MIM + mean MLM cross-entropy.
    fn loss(&self) -> f64 {
        let mean = |a: &Acc, b: &Acc| {
            let n = a.count + b.count;
            if n > 0 {
                (a.loss + b.loss) / n as f64
            } else {
                0.0
            }
        };
        mean(&self.tasks[0], &self.tasks[1]) + mean(&self.tasks[2], &self.tasks[3])
    }

    fn metrics(&self, kind: &str, step: u64) -> Beit3Metrics {
        let tasks = TASKS
            .iter()
            .zip(&self.tasks)
            .filter(|(_, a)| a.count > 0)
            .map(|(name, a)| {
                let n = a.count as f64;
                (
                    (*name).to_string(),
                    TaskMetrics {
                        loss: a.loss / n,
                        accuracy: a.correct as f64 / n,
                        tokens: a.count,
                    },
                )
            })
            .collect();
        let samples = SampleKind::ALL
            .iter()
            .zip(self.samples)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (k.name().to_string(), n))
            .collect();
        Beit3Metrics {
            kind: kind.into(),
            step,
            epoch: 0,
            loss: self.loss(),
            tasks,
            samples,
            lr: 0.0,
            grad_norm: 0.0,
            samples_per_s: 0.0,
            data_wait: 0.0,
        }
    }
}

fn cross_entropy(logits: &Tensor, targets: &Tensor) -> (Tensor, Acc) {
    let logits = logits.to_kind(Kind::Float);
    let loss = logits.cross_entropy_loss::<Tensor>(targets, None, tch::Reduction::Sum, -100, 0.0);
    let correct = logits.argmax(-1, false).eq_tensor(targets).sum(Kind::Int64);
    let acc = Acc {
        loss: loss.double_value(&[]),
        correct: correct.int64_value(&[]),
        count: targets.size()[0],
    };
    (loss, acc)
}

/// The summed MIM and MLM cross-entropies of one batch (`[mim, mlm]`, `None` where the batch has no such
/// prediction) and its tally.
fn batch_loss(model: &Beit3, batch: &Beit3Batch, pad: u32, train: Option<u64>) -> ([Option<Tensor>; 2], Tally) {
    let config = model.config();
    let mut tally = Tally::default();
    let mut sums: [Option<Tensor>; 2] = [None, None];
    let mut add = |slot: usize, t: Tensor| {
        sums[slot] = Some(match sums[slot].take() {
            Some(s) => s + t,
            None => t,
        });
    };
    for kind in SampleKind::ALL {
        let group = &batch.groups[kind as usize];
        if group.ids.is_empty() {
            continue;
        }
        tally.samples[kind as usize] += group.ids.len() as u64;
        let d = group.to_device(kind, config, pad, model.device());
        let image = d.image.as_ref().map(|input| ImageIn {
            input,
            mask: d.image_mask.as_ref(),
        });
        let text = d.text.as_ref().map(|ids| TextIn {
            ids,
            padding: d.padding.as_ref(),
        });
        let key = train.map(|k| mix64(k ^ (kind as u64 + 1)));
        let encoded = model.encode(image.as_ref(), text.as_ref(), key);
        if let (Some(mask), Some(targets)) = (&d.image_mask, &d.mim_targets) {
            if targets.size()[0] > 0 {
                let (loss, acc) = cross_entropy(&model.mim_logits(&encoded, mask), targets);
                tally.tasks[if kind == SampleKind::Pair { 1 } else { 0 }] = acc;
                add(0, loss);
            }
        }
        if let (Some(predict), Some(targets)) = (&d.text_predict, &d.mlm_targets) {
            if targets.size()[0] > 0 {
                let (loss, acc) = cross_entropy(&model.mlm_logits(&encoded, predict), targets);
                tally.tasks[if kind == SampleKind::Pair { 3 } else { 2 }] = acc;
                add(1, loss);
            }
        }
    }
    (sums, tally)
}

/// Validation metrics over a fixed set.
fn evaluate(model: &Beit3, batches: &[Beit3Batch], pad: u32, step: u64) -> Beit3Metrics {
    tch::no_grad(|| {
        let mut tally = Tally::default();
        for b in batches {
            tally.add(&batch_loss(model, b, pad, None).1);
        }
        tally.metrics("val", step)
    })
}

/// Reads a BEiT-3 checkpoint and builds the model with its weights.
pub fn load_beit3(checkpoint: &Path, device: Device) -> Result<(Beit3, Beit3TrainConfig)> {
    let state: CheckpointState<Beit3TrainConfig> = read_state(checkpoint, "beit3")?;
    let mut model = Beit3::new(&state.config.model, device, state.config.seed)?;
    model.load(&checkpoint.join("model.safetensors"))?;
    Ok((model, state.config))
}

fn check_dataset(dataset: &Dataset, config: &Beit3TrainConfig) -> Result<()> {
    let m = &config.model;
    crate::trainer::check_fit(
        dataset,
        m.grid,
        m.vocab_size,
        Some(m.text_vocab_size),
        m.input == crate::InputKind::Pixels,
    )?;
    if dataset.tokenizer().text_vocab_size.is_none() && config.objective.mix[0] <= 0.0 {
        return Err(TrainError::Dataset {
            path: dataset.dir().to_path_buf(),
            reason: "the dataset has no captions, so only image samples exist, and --mix gives images weight 0".into(),
        });
    }
    Ok(())
}

fn validate(config: &Beit3TrainConfig) -> Result<()> {
    config.model.validate()?;
    config.optim.validate()?;
    config.objective.validate()?;
    if config.steps == 0 || config.accum == 0 || config.stream.batch_size == 0 {
        return Err(TrainError::Config(
            "steps, accum and batch size must be positive".into(),
        ));
    }
    config.stream.check_single_process()?;
    Ok(())
}

/// Pretrains BEiT-3 on `dataset_dir`, writing checkpoints, `metrics.jsonl` and `loss.png` under `out`.
pub fn train_beit3(
    dataset_dir: &Path,
    out: &Path,
    config: &Beit3TrainConfig,
    options: &RunOptions,
    observer: &mut dyn FnMut(&Beit3Event),
) -> Result<Beit3Summary> {
    validate(config)?;
    let device = options.device.resolve()?;
    let dataset = Dataset::open(dataset_dir)?;
    check_dataset(&dataset, config)?;
    fs::create_dir_all(out.join("checkpoints")).map_err(io_err(out))?;
    let metrics_path = out.join("metrics.jsonl");
    let mut model = Beit3::new(&config.model, device, config.seed)?;
    model.set_compute_kind(options.precision.compute_kind());
    let mut opt = AdamW::new(model.named_parameters(), config.optim.clone())?;
    let (mut step, mut stream_state, mut samples) = restore(
        out,
        config,
        &dataset.index().build_fingerprint,
        "beit3",
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
    let json = serde_json::to_vec_pretty(config).map_err(|e| TrainError::Config(e.to_string()))?;
    fs::write(out.join("config.json"), json).map_err(io_err(out.join("config.json")))?;

    let until = options.stop_at.map_or(config.steps, |s| s.min(config.steps));
    let pad = config.objective.text.pad_id();
    let builder = Beit3Builder {
        config: config.model.clone(),
        objective: config.objective.clone(),
        seed: config.seed,
    };
    let (val, val_skipped) = fixed_set(
        &dataset,
        Split::Val,
        &builder,
        config.stream.batch_size,
        options.eval_samples,
    )?;
    observer(&Beit3Event::Started {
        step,
        until,
        parameters: model.num_parameters(),
        device: options.device.describe(device),
    });
    let mut skipped = val_skipped.len() as u64;
    for (id, why) in &val_skipped {
        observer(&Beit3Event::Skipped(*id, why.clone()));
    }
    let eval = |model: &Beit3, step: u64, observer: &mut dyn FnMut(&Beit3Event)| -> Result<Option<Beit3Metrics>> {
        if val.is_empty() {
            return Ok(None);
        }
        let m = evaluate(model, &val, pad, step);
        write_json_line(&metrics_path, &m)?;
        observer(&Beit3Event::Metrics(m.clone()));
        Ok(Some(m))
    };
    let mut last_val = if step == 0 { eval(&model, 0, observer)? } else { None };

    let mut loader = Loader::spawn(
        dataset.clone(),
        Beit3Batcher::new(builder),
        config.seed,
        config.stream.clone(),
        stream_state,
    )?;
    let mut source = match options.data {
        DataMode::Stream => Source::Stream(loader),
        DataMode::Memory => {
            let need = (until.saturating_sub(step) * u64::from(config.accum)) as usize;
            let batches = (0..need).map(|_| loader.next_batch()).collect::<Result<Vec<_>>>()?;
            Source::Memory(batches.into_iter())
        }
    };
    let started = Instant::now();
    let first_step = step;
    let (mut window, mut window_start, mut waited_before) = (Tally::default(), Instant::now(), source.waited());
    let mut last_ckpt = None;
    while step < until {
        let lr = config.optim.lr_at(step, config.steps);
        opt.zero_grad();
        for micro in 0..config.accum {
            let batch = source.next()?;
            for (id, why) in &batch.skipped {
                skipped += 1;
                observer(&Beit3Event::Skipped(*id, why.clone()));
            }
            stream_state = batch.state;
            samples += batch.len() as u64;
            let key = mix64(config.seed ^ mix64(step.wrapping_mul(1024).wrapping_add(u64::from(micro))));
            let (sums, tally) = batch_loss(&model, &batch, pad, Some(key));
            let counts = [
                tally.tasks[0].count + tally.tasks[1].count,
                tally.tasks[2].count + tally.tasks[3].count,
            ];
            let mut loss: Option<Tensor> = None;
            for (sum, n) in sums.into_iter().zip(counts) {
                if let Some(s) = sum {
                    let mean = s / (n.max(1) as f64 * f64::from(config.accum));
                    loss = Some(match loss {
                        Some(l) => l + mean,
                        None => mean,
                    });
                }
            }
            if let Some(l) = loss {
                l.backward();
            }
            window.add(&tally);
        }
        let grad_norm = match config.optim.clip_grad {
            Some(max) => opt.clip(max),
            None => opt.grad_norm(),
        };
        opt.step(lr);
        step += 1;
        let loss = window.loss();
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step, loss });
        }
        observer(&Beit3Event::Step(step));
        if step % options.log_every.max(1) == 0 || step == until {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let mut m = window.metrics("train", step);
            m.epoch = stream_state.epoch;
            m.lr = lr;
            m.grad_norm = grad_norm;
            m.samples_per_s = window.samples.iter().sum::<u64>() as f64 / secs;
            m.data_wait = (source.waited().saturating_sub(waited_before).as_secs_f64() / secs).min(1.0);
            write_json_line(&metrics_path, &m)?;
            observer(&Beit3Event::Metrics(m));
            (window, window_start, waited_before) = (Tally::default(), Instant::now(), source.waited());
        }
        if options.eval_every > 0 && step % options.eval_every == 0 && step < until {
            last_val = eval(&model, step, observer)?;
            plot_losses(&metrics_path, &out.join("loss.png"))?;
        }
        if (options.checkpoint_every > 0 && step % options.checkpoint_every == 0) || step == until {
            let state = CheckpointState {
                format_version: CHECKPOINT_VERSION,
                imglish_version: env!("CARGO_PKG_VERSION").into(),
                architecture: "beit3".into(),
                step,
                stream: stream_state,
                samples,
                dataset_fingerprint: dataset.index().build_fingerprint.clone(),
                tokenizer_fingerprint: Some(dataset.tokenizer().fingerprint.clone()),
                config: config.clone(),
                files: Default::default(),
            };
            let save = |p: &Path| save_with_torchscale_config(&model, p);
            let path = write_checkpoint(out, &save, &opt, &state, options.keep_checkpoints)?;
            observer(&Beit3Event::Checkpoint(path.clone()));
            last_ckpt = Some(path);
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    drop(source);
    if step > first_step || last_val.is_none() {
        last_val = eval(&model, step, observer)?;
    }
    let plot = out.join("loss.png");
    plot_losses(&metrics_path, &plot)?;
    let initial_val = val_lines(&metrics_path).into_iter().find(|m| m.step == 0);
    Ok(Beit3Summary {
        steps: step,
        steps_this_run: step - first_step,
        initial_val,
        final_val: last_val,
        samples,
        train_seconds,
        skipped,
        checkpoint: last_ckpt.or(latest_checkpoint(out)?),
        plot,
    })
}

/// Saves the weights, and next to them `torchscale.json` (the `EncoderConfig` keyword arguments) when
/// torchscale's BEiT3 can hold this model (pixel input, square images).
fn save_with_torchscale_config(model: &Beit3, path: &Path) -> Result<()> {
    model.save(path)?;
    if let Ok(kwargs) = model.config().torchscale_kwargs() {
        let file = path.with_file_name("torchscale.json");
        let json = serde_json::to_vec_pretty(&kwargs).map_err(|e| TrainError::Config(e.to_string()))?;
        fs::write(&file, json).map_err(io_err(&file))?;
    }
    Ok(())
}

fn val_lines(metrics: &Path) -> Vec<Beit3Metrics> {
    fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Beit3Metrics>(l).ok())
        .filter(|m| m.kind == "val")
        .collect()
}
