//! A learned discrete VAE tokenizer (`imglish tokenizer train-dvae`), trained with libtorch as in DALL-E: the
//! encoder's logits over K codes per grid cell are relaxed with Gumbel-softmax at a temperature annealed from
//! `temperature.0` to `temperature.1`, a KL term pulls each cell's code distribution towards the uniform prior,
//! and the decoder reconstructs the pixels (MSE or logit-Laplace). Checkpoints, resume, `metrics.jsonl` and
//! `loss.png` work as for `imglish train`; held-out evaluation uses hard codes (the argmax, what the exported
//! ONNX tokenizer computes): PSNR of the reconstruction, code usage and perplexity.

mod data;
mod model;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use imglish_ingest::{mix64, Resizer};
use imglish_pack::StreamState;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

pub use model::{Dvae, DvaeConfig, Quantizer, Recon};

use crate::device::TorchDevice;
use crate::error::{io_err, Result, TrainError};
use crate::optim::{AdamW, OptimConfig};
use crate::plot::plot_losses;
use crate::trainer::{read_state, restore, write_checkpoint, write_json_line, CheckpointState, CHECKPOINT_VERSION};
use data::{centre_view, push_view, Images};

const ARCHITECTURE: &str = "dvae";

/// VQ: codes whose moving count of cells per batch is below `min(1, RESTART_SHARE · cells / K)` are restarted:
/// one cell per batch when a batch has at least twice as many cells as there are codes, else half a code's fair
/// share (so that with more codes than cells, K = 8192 against 16 x 196, codes are not restarted merely for
/// being shared out thinly).
const RESTART_SHARE: f64 = 0.5;

/// Everything that determines a dVAE run's result (a resumed run must have the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DvaeTrainConfig {
    /// The architecture.
    pub model: DvaeConfig,
    /// Optimiser and schedule.
    pub optim: OptimConfig,
    /// Training steps.
    pub steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// Seed of the initialisation, the batches, the views and the Gumbel noise.
    pub seed: u64,
    /// Gumbel-softmax temperature: start and end, annealed exponentially over `anneal_fraction` of the steps.
    pub temperature: (f64, f64),
    /// Fraction of the run over which the temperature anneals.
    pub anneal_fraction: f64,
    /// Weight of the KL divergence to the uniform prior (nats per cell, averaged).
    pub kl_weight: f64,
    /// Straight-through Gumbel-softmax: the decoder sees the hard one-hot of the relaxed sample (what it sees
    /// after export) while the gradient flows through the relaxed one.
    pub straight_through: bool,
    /// VQ: decay of the codebook's exponential moving averages.
    pub ema_decay: f64,
    /// VQ: weight of the commitment loss |z - sg(c)|².
    pub commitment: f64,
}

impl Default for DvaeTrainConfig {
    fn default() -> Self {
        DvaeTrainConfig {
            model: DvaeConfig::default(),
            optim: OptimConfig {
                lr: 1e-3,
                min_lr: 1e-5,
                warmup_steps: 100,
                weight_decay: 1e-4,
                clip_grad: Some(1.0),
                ..OptimConfig::default()
            },
            steps: 2000,
            batch_size: 16,
            seed: 0,
            temperature: (1.0, 1.0 / 16.0),
            anneal_fraction: 0.8,
            kl_weight: 5e-4,
            straight_through: false,
            ema_decay: 0.99,
            commitment: 0.25,
        }
    }
}

impl DvaeTrainConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.optim.validate()?;
        let bad = |m: &str| Err(TrainError::Config(m.into()));
        if self.steps == 0 || self.batch_size == 0 {
            return bad("--steps and --batch-size must be positive");
        }
        let (t0, t1) = self.temperature;
        if !(t0 > 0.0 && t1 > 0.0 && t0.is_finite() && t1.is_finite()) {
            return bad("the Gumbel temperatures must be positive");
        }
        if !((0.0..=1.0).contains(&self.anneal_fraction) && self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            return bad("--anneal-fraction must be in [0, 1] and --kl-weight >= 0");
        }
        if !((0.0..1.0).contains(&self.ema_decay) && self.commitment >= 0.0 && self.commitment.is_finite()) {
            return bad("--ema-decay must be in [0, 1) and --commitment >= 0");
        }
        Ok(())
    }

    /// The temperature of `step`.
    pub fn temperature_at(&self, step: u64) -> f64 {
        let (t0, t1) = self.temperature;
        let span = (self.steps as f64 * self.anneal_fraction).max(1.0);
        t0 * (t1 / t0).powf((step as f64 / span).min(1.0))
    }
}

/// How a run is carried out (not part of its result).
#[derive(Debug, Clone)]
pub struct DvaeRunOptions {
    /// The device.
    pub device: TorchDevice,
    /// Log (and report) every this many steps.
    pub log_every: u64,
    /// Evaluate on the held-out images every this many steps (and at the start and the end).
    pub eval_every: u64,
    /// At most this many held-out images.
    pub eval_images: usize,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Stop after this step (the schedule still spans `steps`): for tests and time-boxed runs.
    pub stop_at: Option<u64>,
    /// Continue the run in the output folder.
    pub resume: bool,
}

impl Default for DvaeRunOptions {
    fn default() -> Self {
        DvaeRunOptions {
            device: TorchDevice::Cpu,
            log_every: 20,
            eval_every: 500,
            eval_images: 256,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            stop_at: None,
            resume: false,
        }
    }
}

/// Training metrics over a log interval (a line of `metrics.jsonl` with `kind: "train"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DvaeStepMetrics {
    /// `"train"`.
    pub kind: String,
    /// The step.
    pub step: u64,
    /// Mean loss (reconstruction + weighted KL).
    pub loss: f64,
    /// Mean reconstruction loss.
    pub recon: f64,
    /// Mean KL to the uniform prior (nats per cell; Gumbel), or the commitment loss (VQ).
    pub kl: f64,
    /// Fraction of the codes chosen (argmax) at least once in the interval's batches.
    pub code_usage: f64,
    /// Gumbel temperature.
    pub temperature: f64,
    /// Learning rate.
    pub lr: f64,
    /// Training images per second.
    pub images_per_second: f64,
}

/// Held-out metrics with hard codes (a line of `metrics.jsonl` with `kind: "val"`; `loss` is the reconstruction
/// MSE on pixels in [0, 1], so the plot shows it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DvaeEvalMetrics {
    /// `"val"`.
    pub kind: String,
    /// The step.
    pub step: u64,
    /// Mean squared error of the reconstruction, pixels in [0, 1].
    pub loss: f64,
    /// 10·log10(1 / loss).
    pub psnr: f64,
    /// Fraction of the codes used on the held-out images.
    pub usage: f64,
    /// exp(entropy) of the held-out code histogram.
    pub perplexity: f64,
    /// Held-out images.
    pub images: usize,
}

/// What a run reports as it goes.
#[derive(Debug, Clone)]
pub enum DvaeEvent {
    /// The run starts (or resumes) at `step` and runs to `until`.
    Started {
        /// First step.
        step: u64,
        /// Last step of this run.
        until: u64,
        /// Parameters.
        parameters: i64,
        /// Training and held-out images.
        images: (usize, usize),
        /// The device in words.
        device: String,
    },
    /// A step finished.
    Step(u64),
    /// A log interval.
    Train(DvaeStepMetrics),
    /// A held-out evaluation.
    Val(DvaeEvalMetrics),
    /// A checkpoint was written.
    Checkpoint(PathBuf),
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct DvaeSummary {
    /// Steps done in total.
    pub steps: u64,
    /// Steps run by this process.
    pub steps_this_run: u64,
    /// Held-out metrics at step 0, if evaluated.
    pub initial: Option<DvaeEvalMetrics>,
    /// The last held-out metrics.
    pub last: Option<DvaeEvalMetrics>,
    /// Wall time of the training loop.
    pub train_seconds: f64,
    /// The last checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// The loss plot.
    pub plot: PathBuf,
}

/// Trains a dVAE on the images of the ingest manifest in `manifest`, writing checkpoints, `metrics.jsonl` and
/// `loss.png` under `out`.
pub fn train_dvae(
    manifest: &Path,
    out: &Path,
    config: &DvaeTrainConfig,
    options: &DvaeRunOptions,
    observer: &mut dyn FnMut(&DvaeEvent),
) -> Result<DvaeSummary> {
    config.validate()?;
    if options.eval_images == 0 {
        return Err(TrainError::Config(
            "--eval-images must be positive (the held-out metrics and the export's check need images)".into(),
        ));
    }
    let device = options.device.resolve()?;
    let images = Images::open(manifest, options.eval_images)?;
    fs::create_dir_all(out.join("checkpoints")).map_err(io_err(out))?;
    let metrics_path = out.join("metrics.jsonl");
    let mut model = Dvae::new(&config.model, device, config.seed)?;
    let mut opt = AdamW::new(model.named_parameters(), config.optim.clone())?;
    let (mut step, _, _) = restore(
        out,
        config,
        &images.fingerprint,
        ARCHITECTURE,
        &mut |p| model.load(p),
        &mut opt,
        options.resume,
    )?;
    let config_path = out.join("config.json");
    let json = serde_json::to_vec_pretty(config).map_err(|e| TrainError::Config(e.to_string()))?;
    fs::write(&config_path, json).map_err(io_err(&config_path))?;
    let until = options.stop_at.map_or(config.steps, |s| s.min(config.steps));
    observer(&DvaeEvent::Started {
        step,
        until,
        parameters: model.num_parameters(),
        images: (images.train.len(), images.heldout.len()),
        device: options.device.describe(device),
    });
    let heldout = HeldOut::load(&images, config.model.input_size)?;
    let eval = |model: &Dvae, step: u64, observer: &mut dyn FnMut(&DvaeEvent)| -> Result<DvaeEvalMetrics> {
        let m = heldout.evaluate(model, step, config.batch_size);
        write_json_line(&metrics_path, &m)?;
        observer(&DvaeEvent::Val(m.clone()));
        Ok(m)
    };
    let initial = if step == 0 {
        Some(eval(&model, 0, observer)?)
    } else {
        None
    };

    let batches = spawn_batches(images.clone(), config.clone(), step, until);
    let started = Instant::now();
    let first = step;
    let mut window = Window::new(config.model.codebook);
    let mut last = None;
    let mut checkpoint = None;
    while step < until {
        let (input, target) = batches
            .recv()
            .map_err(|_| TrainError::Config("the dVAE batch thread stopped".into()))??;
        let (input, target) = (input.to_device(device), target.to_device(device));
        let lr = config.optim.lr_at(step, config.steps);
        let tau = config.temperature_at(step);
        tch::manual_seed(mix64(config.seed ^ mix64(step ^ 0x6775_6d62)) as i64 & i64::MAX);
        let (loss, recon, kl, codes) = forward_loss(&model, &input, &target, tau, config);
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(TrainError::Diverged { step, loss: value });
        }
        opt.zero_grad();
        loss.backward();
        if let Some(max) = config.optim.clip_grad {
            opt.clip(max);
        }
        opt.step(lr);
        step += 1;
        window.add(value, recon, kl, &codes, input.size()[0] as usize);
        observer(&DvaeEvent::Step(step));
        if step.is_multiple_of(options.log_every.max(1)) || step == until {
            let m = window.metrics(step, tau, lr);
            write_json_line(&metrics_path, &m)?;
            observer(&DvaeEvent::Train(m));
            window = Window::new(config.model.codebook);
        }
        if step.is_multiple_of(options.eval_every.max(1)) || step == until {
            last = Some(eval(&model, step, observer)?);
        }
        if step.is_multiple_of(options.checkpoint_every.max(1)) || step == until {
            let state = CheckpointState {
                format_version: CHECKPOINT_VERSION,
                imglish_version: env!("CARGO_PKG_VERSION").into(),
                architecture: ARCHITECTURE.into(),
                step,
                stream: StreamState::default(),
                samples: step * config.batch_size as u64,
                dataset_fingerprint: images.fingerprint.clone(),
                tokenizer_fingerprint: None,
                config: config.clone(),
                files: Default::default(),
            };
            let path = write_checkpoint(out, &|p| model.save(p), &opt, &state, options.keep_checkpoints)?;
            observer(&DvaeEvent::Checkpoint(path.clone()));
            checkpoint = Some(path);
        }
    }
    let plot = out.join("loss.png");
    plot_losses(&metrics_path, &plot)?;
    // A run resumed after its last step (say, killed while exporting) reports what its history holds.
    let history = || -> Option<DvaeEvalMetrics> {
        let text = fs::read_to_string(&metrics_path).ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<DvaeEvalMetrics>(l).ok())
            .rfind(|m| m.kind == "val")
    };
    let checkpoint = match checkpoint {
        Some(c) => Some(c),
        None => crate::trainer::latest_checkpoint(out)?,
    };
    Ok(DvaeSummary {
        steps: step,
        steps_this_run: step - first,
        initial,
        last: last.or_else(history),
        train_seconds: started.elapsed().as_secs_f64(),
        checkpoint,
        plot,
    })
}

/// Loss, mean reconstruction loss, the quantizer's term (KL for Gumbel, commitment for VQ) and the codes of one
/// training batch; a VQ codebook is updated (EMA, restarts) as a side effect.
fn forward_loss(
    model: &Dvae,
    input: &Tensor,
    target: &Tensor,
    tau: f64,
    config: &DvaeTrainConfig,
) -> (Tensor, f64, f64, Tensor) {
    match model.config().quantizer {
        Quantizer::Gumbel => gumbel_loss(model, input, target, tau, config),
        Quantizer::Vq { .. } => vq_loss(model, input, target, config),
    }
}

/// VQ-VAE with an EMA codebook: nearest code vectors, straight-through to the encoder, a commitment loss; the
/// codebook follows the moving averages of the vectors assigned to each code, and a code used by fewer than
/// [`RESTART_SHARE`]'s threshold of cells per batch (moving count) is restarted at a random encoder output of the
/// batch (drawn with replacement: a duplicate ties with its twin, loses, and is restarted again next step).
fn vq_loss(model: &Dvae, input: &Tensor, target: &Tensor, config: &DvaeTrainConfig) -> (Tensor, f64, f64, Tensor) {
    let z = model.encode(input);
    let [b, d, g, _] = z.size()[..] else {
        unreachable!("the encoder's output is 4-d")
    };
    let Some([codebook, cluster_size, embed_sum]) = model.vq_state() else {
        unreachable!("a VQ model has a codebook")
    };
    let flat = z.permute([0, 2, 3, 1]).reshape([-1, d]);
    let scores = flat.detach().matmul(&codebook.tr()) * 2.0
        - codebook.square().sum_dim_intlist(1, false, Kind::Float).unsqueeze(0);
    let codes = scores.argmax(1, false);
    let quantized = codebook.index_select(0, &codes);
    let zq = quantized.view([b, g, g, d]).permute([0, 3, 1, 2]);
    let out = model.decode(&(&z + (&zq - &z).detach()));
    let recon = model.recon_loss(&out, target);
    let commit = (&z - zq.detach()).square().mean(Kind::Float);
    let loss = &recon + &commit * config.commitment;
    tch::no_grad(|| {
        let k = codebook.size()[0];
        let one_hot = codes.one_hot(k).to_kind(Kind::Float);
        let decay = config.ema_decay;
        let mut cs = cluster_size.shallow_clone();
        let mut es = embed_sum.shallow_clone();
        let mut cb = codebook.shallow_clone();
        let _ = cs
            .g_mul_scalar_(decay)
            .g_add_(&(one_hot.sum_dim_intlist(0, false, Kind::Float) * (1.0 - decay)));
        let _ = es
            .g_mul_scalar_(decay)
            .g_add_(&(one_hot.tr().matmul(&flat.detach()) * (1.0 - decay)));
        // Laplace-smoothed cluster sizes, then the means.
        let n = cs.sum(Kind::Float);
        let smoothed = (&cs + 1e-5) / (&n + 1e-5 * k as f64) * &n;
        cb.copy_(&(&es / smoothed.unsqueeze(1)));
        // Restart every code whose moving count is below one cell per batch at a random encoder output of
        // this batch (as Jukebox's VQ-VAE does): it stays if the next batch gives it a cell, else moves again.
        let threshold = (RESTART_SHARE * flat.size()[0] as f64 / k as f64).min(1.0);
        let dead = cs.lt(threshold);
        let n_dead = dead.sum(Kind::Int64).int64_value(&[]);
        if n_dead > 0 {
            let rows = Tensor::randint(flat.size()[0], [n_dead], (Kind::Int64, flat.device()));
            let fresh = flat.detach().index_select(0, &rows);
            let idx = dead.nonzero().squeeze_dim(1);
            let _ = cb.index_copy_(0, &idx, &fresh);
            let _ = es.index_copy_(0, &idx, &fresh);
            let _ = cs.index_fill_(0, &idx, threshold);
        }
    });
    let commit_value = commit.double_value(&[]);
    (loss, recon.double_value(&[]), commit_value, codes.view([b, g, g]))
}

/// Gumbel-softmax (DALL-E): loss, mean reconstruction loss, mean KL and the argmax codes of one training batch.
fn gumbel_loss(
    model: &Dvae,
    input: &Tensor,
    target: &Tensor,
    tau: f64,
    config: &DvaeTrainConfig,
) -> (Tensor, f64, f64, Tensor) {
    let logits = model.encode(input);
    let k = logits.size()[1];
    // Gumbel-softmax over the codes: softmax((logits + g) / tau), g = -log(-log(u)).
    let u = logits.rand_like().clamp(1e-10, 1.0 - 1e-7);
    let gumbel = -(-u.log()).log();
    let soft = ((&logits + gumbel) / tau).softmax(1, Kind::Float);
    let codes_in = if config.straight_through {
        let hard = model.one_hot(&soft.argmax(1, false));
        hard - soft.detach() + &soft
    } else {
        soft
    };
    let out = model.decode(&codes_in);
    let recon = model.recon_loss(&out, target);
    // KL(q || uniform) per cell = sum_k q log q + log K.
    let log_q = logits.log_softmax(1, Kind::Float);
    let kl = (log_q.exp() * (&log_q + (k as f64).ln()))
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float);
    let loss = &recon + &kl * config.kl_weight;
    let codes = logits.detach().argmax(1, false);
    (loss, recon.double_value(&[]), kl.double_value(&[]), codes)
}

type BatchResult = Result<(Tensor, Tensor)>;

/// Renders the batches of steps `from..until` on a background thread, two ahead.
fn spawn_batches(images: Images, config: DvaeTrainConfig, from: u64, until: u64) -> mpsc::Receiver<BatchResult> {
    let (tx, rx) = mpsc::sync_channel(2);
    std::thread::spawn(move || {
        let mut resizer = Resizer::new();
        let s = i64::from(config.model.input_size);
        for step in from..until {
            let rows = images.batch_rows(config.seed, step, config.batch_size);
            let mut input = Vec::new();
            let mut target = Vec::new();
            let made = rows.iter().try_for_each(|(row, view_seed)| {
                let img = images.train_view(row, *view_seed, config.model.input_size, &mut resizer)?;
                push_view(&img, &mut input, &mut target);
                Ok(())
            });
            let shape = [rows.len() as i64, 3, s, s];
            let batch = made.map(|()| {
                (
                    Tensor::from_slice(&input).view(shape),
                    Tensor::from_slice(&target).view(shape),
                )
            });
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// The held-out centre views, rendered once.
struct HeldOut {
    input: Vec<f32>,
    target: Vec<f32>,
    images: usize,
    size: i64,
}

impl HeldOut {
    fn load(images: &Images, size: u32) -> Result<HeldOut> {
        let mut resizer = Resizer::new();
        let (mut input, mut target) = (Vec::new(), Vec::new());
        for row in &images.heldout {
            push_view(&centre_view(row, size, &mut resizer)?, &mut input, &mut target);
        }
        Ok(HeldOut {
            input,
            target,
            images: images.heldout.len(),
            size: i64::from(size),
        })
    }

    fn evaluate(&self, model: &Dvae, step: u64, batch: usize) -> DvaeEvalMetrics {
        let k = model.config().codebook as usize;
        let per = (3 * self.size * self.size) as usize;
        let mut hist = vec![0u64; k];
        let mut sq = 0f64;
        tch::no_grad(|| {
            for (inp, tgt) in self.input.chunks(per * batch).zip(self.target.chunks(per * batch)) {
                let n = (inp.len() / per) as i64;
                let shape = [n, 3, self.size, self.size];
                let x = Tensor::from_slice(inp).view(shape).to_device(model.device());
                let t = Tensor::from_slice(tgt).view(shape).to_device(model.device());
                let tokens = model.tokens(&x);
                let rec = model.pixels_from(&model.decode(&model.code_input(&tokens)));
                sq += (rec - t).square().sum(Kind::Double).double_value(&[]);
                for v in Vec::<i64>::try_from(tokens.flatten(0, -1).to_device(Device::Cpu)).unwrap_or_default() {
                    hist[v as usize] += 1;
                }
            }
        });
        let mse = sq / self.target.len().max(1) as f64;
        let (usage, perplexity) = usage_perplexity(&hist);
        DvaeEvalMetrics {
            kind: "val".into(),
            step,
            loss: mse,
            psnr: psnr(mse),
            usage,
            perplexity,
            images: self.images,
        }
    }
}

/// PSNR in dB of a mean squared error on pixels in [0, 1].
pub fn psnr(mse: f64) -> f64 {
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

/// The fraction of codes used and the perplexity (exp of the entropy) of a code histogram.
pub fn usage_perplexity(hist: &[u64]) -> (f64, f64) {
    let used = hist.iter().filter(|&&c| c > 0).count();
    (used as f64 / hist.len().max(1) as f64, imglish_pack::perplexity(hist))
}

struct Window {
    start: Instant,
    loss: f64,
    recon: f64,
    kl: f64,
    steps: u64,
    images: usize,
    used: Vec<bool>,
}

impl Window {
    fn new(codebook: u32) -> Window {
        Window {
            start: Instant::now(),
            loss: 0.0,
            recon: 0.0,
            kl: 0.0,
            steps: 0,
            images: 0,
            used: vec![false; codebook as usize],
        }
    }

    fn add(&mut self, loss: f64, recon: f64, kl: f64, codes: &Tensor, images: usize) {
        self.loss += loss;
        self.recon += recon;
        self.kl += kl;
        self.steps += 1;
        self.images += images;
        for v in Vec::<i64>::try_from(codes.flatten(0, -1).to_device(Device::Cpu)).unwrap_or_default() {
            self.used[v as usize] = true;
        }
    }

    fn metrics(&self, step: u64, temperature: f64, lr: f64) -> DvaeStepMetrics {
        let n = self.steps.max(1) as f64;
        DvaeStepMetrics {
            kind: "train".into(),
            step,
            loss: self.loss / n,
            recon: self.recon / n,
            kl: self.kl / n,
            code_usage: self.used.iter().filter(|&&u| u).count() as f64 / self.used.len().max(1) as f64,
            temperature,
            lr,
            images_per_second: self.images as f64 / self.start.elapsed().as_secs_f64().max(1e-9),
        }
    }
}

/// The hard codes of RGB8 views (each `S·S·3` bytes, HWC) and, per code, the margin between the best and the
/// second-best score relative to the best score's size, `(s1 - s2) / max(1, |s1|)` (what tells a near-tie):
/// the reference the exported ONNX encoder is checked against.
pub fn codes_with_margins(model: &Dvae, views: &[&[u8]]) -> (Vec<i64>, Vec<f32>) {
    let s = i64::from(model.config().input_size);
    let mut input = Vec::with_capacity(views.len() * 3 * (s * s) as usize);
    let mut unused = Vec::new();
    for v in views {
        let img = image::RgbImage::from_raw(s as u32, s as u32, v.to_vec()).unwrap_or_default();
        push_view(&img, &mut input, &mut unused);
    }
    tch::no_grad(|| {
        let x = Tensor::from_slice(&input)
            .view([views.len() as i64, 3, s, s])
            .to_device(model.device());
        let logits = model.code_scores(&x);
        let codes = logits.argmax(1, false);
        let (top, _) = logits.topk(2, 1, true, true);
        let best = top.narrow(1, 0, 1);
        let margin = (&best - top.narrow(1, 1, 1)) / best.abs().clamp_min(1.0);
        let flat = |t: Tensor| t.flatten(0, -1).to_device(Device::Cpu);
        (
            Vec::<i64>::try_from(flat(codes)).unwrap_or_default(),
            Vec::<f32>::try_from(flat(margin.to_kind(Kind::Float))).unwrap_or_default(),
        )
    })
}

/// Loads the dVAE of a checkpoint directory (or a run's newest checkpoint) with its training configuration.
pub fn load_dvae(checkpoint: &Path, device: Device) -> Result<(Dvae, DvaeTrainConfig)> {
    let checkpoint = crate::trainer::resolve_checkpoint(checkpoint)?;
    let state: CheckpointState<DvaeTrainConfig> = read_state(&checkpoint, ARCHITECTURE)?;
    let mut model = Dvae::new(&state.config.model, device, state.config.seed)?;
    model.load(&checkpoint.join("model.safetensors"))?;
    Ok((model, state.config))
}
