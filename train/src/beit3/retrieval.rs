//! The retrieval probe: image-to-text and text-to-image retrieval on the validation pairs from frozen BEiT-3
//! features (image: the mean patch output of an image-only forward; text: the mean output over the non-padding
//! positions of a text-only forward; neither CLS nor BOS is trained by masked data modelling), with one linear projection per modality fitted contrastively (symmetric InfoNCE, learned
//! temperature) on the training pairs; the same for a randomly initialised encoder of the same configuration.

use std::path::Path;

use imglish_ingest::{Progress, Resizer};
use imglish_pack::{Dataset, Split};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::beit3::config::Beit3Config;
use crate::beit3::model::Beit3;
use crate::beit3::trainer::load_beit3;
use crate::config::InputKind;
use crate::data::render_pixels;
use crate::device::TorchDevice;
use crate::error::{torch_err, Result, TrainError};
use crate::model::{trunc_normal_, Input};

/// Retrieval probe settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalConfig {
    /// Width of the shared embedding space.
    pub dim: i64,
    /// Full-batch Adam iterations of the projections.
    pub iterations: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Pairs per forward pass when extracting features.
    pub batch_size: usize,
    /// At most this many pairs per split.
    pub max_samples: usize,
    /// Contrastive fine-tuning steps of the whole encoder before the features are probed (0: frozen features,
    /// the default). BEiT-3 reports retrieval after such fine-tuning; both encoders get the same steps.
    #[serde(default)]
    pub finetune_steps: usize,
    /// Peak learning rate of that fine-tuning (AdamW, 10% warmup, cosine).
    #[serde(default = "default_finetune_lr")]
    pub finetune_lr: f64,
    /// Whiten each modality's features (PCA whitening fitted on the training features, eigenvalues floored at
    /// [`WHITEN_FLOOR`] of their mean) before fitting the projections (the default); `false` only standardises
    /// each dimension. Either way the probe is one linear map per modality; whitening makes its fit by a few
    /// hundred Adam steps independent of how the encoder spreads its features over directions (masked data
    /// modelling concentrates mean-pooled features on a few).
    #[serde(default = "yes")]
    pub whiten: bool,
}

/// Whitening floors the covariance eigenvalues at this fraction of their mean, so that directions without
/// variance in the training features are not blown up.
pub const WHITEN_FLOOR: f64 = 1e-3;

fn yes() -> bool {
    true
}

fn default_finetune_lr() -> f64 {
    2e-4
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        RetrievalConfig {
            dim: 64,
            iterations: 300,
            lr: 0.01,
            batch_size: 64,
            max_samples: 50_000,
            finetune_steps: 0,
            finetune_lr: default_finetune_lr(),
            whiten: true,
        }
    }
}

/// Recall at 1 and 5 in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    /// Image to text, R@1.
    pub i2t_r1: f64,
    /// Image to text, R@5.
    pub i2t_r5: f64,
    /// Text to image, R@1.
    pub t2i_r1: f64,
    /// Text to image, R@5.
    pub t2i_r5: f64,
}

/// The retrieval probe's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// Training pairs the projections were fitted on.
    pub train_pairs: i64,
    /// Validation pairs retrieved among.
    pub val_pairs: i64,
    /// The checkpoint's encoder.
    pub trained: Recall,
    /// A randomly initialised encoder of the same configuration.
    pub random: Recall,
    /// What chance gives: R@k = k / pairs.
    pub chance_r1: f64,
}

/// One split's pairs: the centre view and the first caption of each sample that has one.
struct Pairs {
    images: Vec<Input>,
    texts: Vec<(Tensor, Tensor)>,
    count: i64,
}

fn load_pairs(dataset: &Dataset, split: Split, config: &Beit3Config, batch: usize, limit: usize) -> Result<Pairs> {
    let mut resizer = Resizer::new();
    let (mut images, mut texts) = (Vec::new(), Vec::new());
    let (mut img_tokens, mut img_pixels, mut caps): (Vec<i64>, Vec<f32>, Vec<Vec<u32>>) = Default::default();
    let mut count = 0i64;
    let max = config.max_text_len() as usize;
    let mut flush = |tok: &mut Vec<i64>, px: &mut Vec<f32>, caps: &mut Vec<Vec<u32>>| {
        let n = caps.len() as i64;
        if n == 0 {
            return;
        }
        images.push(match config.input {
            InputKind::Tokens => Input::Tokens(Tensor::from_slice(tok).view([n, config.num_patches()])),
            InputKind::Pixels => {
                let [h, w] = config.image_size();
                Input::Pixels(Tensor::from_slice(px).view([n, 3, h, w]))
            }
        });
        let len = caps.iter().map(Vec::len).max().unwrap_or(1);
        let ids: Vec<i64> = caps
            .iter()
            .flat_map(|c| (0..len).map(move |i| c.get(i).map_or(0, |&t| i64::from(t))))
            .collect();
        let pad: Vec<bool> = caps.iter().flat_map(|c| (0..len).map(move |i| i >= c.len())).collect();
        let len = len as i64;
        texts.push((
            Tensor::from_slice(&ids).view([n, len]),
            Tensor::from_slice(&pad).view([n, len]),
        ));
        tok.clear();
        px.clear();
        caps.clear();
    };
    'outer: for (i, shard) in dataset.shards().iter().enumerate() {
        if shard.split != split {
            continue;
        }
        for b in 0..shard.batches as usize {
            for r in dataset.batch_records(i, b)? {
                if count as usize >= limit {
                    break 'outer;
                }
                let (Some(caption), Some(v)) = (r.captions.first().filter(|c| !c.is_empty()), r.views.first()) else {
                    continue;
                };
                if config.input == InputKind::Pixels {
                    let px = render_pixels(r.pixels.as_deref(), v.crop, v.flip, config.image_size(), &mut resizer)
                        .map_err(|reason| TrainError::Sample {
                            sample_id: r.sample_id,
                            reason,
                        })?;
                    img_pixels.extend(px);
                }
                img_tokens.extend(v.tokens.iter().map(|&t| i64::from(t)));
                let mut c = caption.clone();
                if c.len() > max {
                    let last = c[c.len() - 1];
                    c.truncate(max);
                    c[max - 1] = last;
                }
                caps.push(c);
                count += 1;
                if caps.len() == batch {
                    flush(&mut img_tokens, &mut img_pixels, &mut caps);
                }
            }
        }
    }
    flush(&mut img_tokens, &mut img_pixels, &mut caps);
    Ok(Pairs { images, texts, count })
}

fn features(model: &Beit3, pairs: &Pairs, progress: &dyn Progress) -> Result<(Tensor, Tensor)> {
    let device = model.device();
    tch::no_grad(|| {
        let mut img = Vec::new();
        let mut txt = Vec::new();
        for (input, (ids, pad)) in pairs.images.iter().zip(&pairs.texts) {
            let input = match input {
                Input::Tokens(t) => Input::Tokens(t.to_device(device)),
                Input::Pixels(p) => Input::Pixels(p.to_device(device)),
            };
            let (ids, pad) = (ids.to_device(device), pad.to_device(device));
            img.push(model.image_pooled(&input).to_device(Device::Cpu));
            txt.push(model.text_pooled(&ids, Some(&pad)).to_device(Device::Cpu));
            progress.inc(1);
        }
        let cat = |v: &[Tensor]| Tensor::f_cat(v, 0).map_err(torch_err("retrieval features"));
        Ok((cat(&img)?, cat(&txt)?))
    })
}

/// Recall@k of row `i` retrieving column `i` in `sim` (`[n, n]`).
fn recall(sim: &Tensor, k: i64) -> f64 {
    let n = sim.size()[0];
    let k = k.min(n);
    let top = sim.topk(k, 1, true, true).1;
    let truth = Tensor::arange(n, (Kind::Int64, Device::Cpu)).unsqueeze(1);
    top.eq_tensor(&truth)
        .any_dim(1, false)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

/// The PCA-whitening matrix `[d, d]` of centred features `x` (`[n, d]`): `x.matmul(w)` has identity covariance
/// along every direction whose eigenvalue is above the floor.
fn whitening(x: &Tensor) -> Result<Tensor> {
    let n = x.size()[0].max(2);
    let x = x.to_kind(Kind::Double);
    let cov = x.tr().matmul(&x) / (n - 1) as f64;
    let (values, vectors) = cov.f_linalg_eigh("L").map_err(torch_err("whitening the features"))?;
    let floor = values.mean(Kind::Double).double_value(&[]).max(1e-12) * WHITEN_FLOOR;
    let scale = values.clamp_min(floor).rsqrt();
    Ok((&vectors * scale.unsqueeze(0))
        .matmul(&vectors.tr())
        .to_kind(Kind::Float))
}

/// Fits the projections on the training features and scores retrieval on the validation features.
fn fit_and_score(
    train: &(Tensor, Tensor),
    val: &(Tensor, Tensor),
    c: &RetrievalConfig,
    seed: u64,
    progress: &dyn Progress,
) -> Result<Recall> {
    let standardise = |x: &Tensor, ref_x: &Tensor| {
        let mean = ref_x.mean_dim(0, true, Kind::Float);
        let std = ref_x.std_dim(0, false, true) + 1e-6;
        (x - mean) / std
    };
    let (mut ti, mut tt) = (standardise(&train.0, &train.0), standardise(&train.1, &train.1));
    let (mut vi, mut vt) = (standardise(&val.0, &train.0), standardise(&val.1, &train.1));
    if c.whiten {
        let (wi, wt) = (whitening(&ti)?, whitening(&tt)?);
        (ti, vi) = (ti.matmul(&wi), vi.matmul(&wi));
        (tt, vt) = (tt.matmul(&wt), vt.matmul(&wt));
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let d = ti.size()[1];
    let no_bias = nn::LinearConfig {
        bias: false,
        ..Default::default()
    };
    let pi = nn::linear(vs.root() / "image", d, c.dim, no_bias);
    let pt = nn::linear(vs.root() / "text", d, c.dim, no_bias);
    let logit_scale = vs.root().var("logit_scale", &[], nn::Init::Const((1.0f64 / 0.07).ln()));
    // Our own generator for the projections' initial values: the result depends only on the seed.
    tch::no_grad(|| {
        let mut wi = pi.ws.shallow_clone();
        let mut wt = pt.ws.shallow_clone();
        trunc_normal_(&mut wi, (1.0 / d as f64).sqrt(), seed ^ 0x1);
        trunc_normal_(&mut wt, (1.0 / d as f64).sqrt(), seed ^ 0x2);
    });
    let embed = |p: &nn::Linear, x: &Tensor| {
        let y = p.forward(x);
        let norm = y.norm_scalaropt_dim(2, [1], true) + 1e-8;
        y / norm
    };
    let mut opt = nn::Adam::default()
        .build(&vs, c.lr)
        .map_err(torch_err("retrieval optimiser"))?;
    let n = ti.size()[0];
    let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu));
    for _ in 0..c.iterations {
        let logits = embed(&pi, &ti).matmul(&embed(&pt, &tt).tr()) * logit_scale.exp().clamp(1.0, 100.0);
        let loss = (logits.cross_entropy_for_logits(&labels) + logits.tr().cross_entropy_for_logits(&labels)) / 2.0;
        opt.backward_step(&loss);
        progress.inc(1);
    }
    tch::no_grad(|| {
        let sim = embed(&pi, &vi).matmul(&embed(&pt, &vt).tr());
        Ok(Recall {
            i2t_r1: recall(&sim, 1),
            i2t_r5: recall(&sim, 5),
            t2i_r1: recall(&sim.tr(), 1),
            t2i_r5: recall(&sim.tr(), 5),
        })
    })
}

/// Fine-tunes the whole encoder (and two projections into a shared `c.dim` space) with the symmetric
/// contrastive loss on the training pairs, batch by batch in a seeded order: the dual-encoder retrieval
/// fine-tuning of BEiT-3 at a small scale. Returns the first and the last step's loss.
fn finetune(
    model: &Beit3,
    train: &Pairs,
    c: &RetrievalConfig,
    seed: u64,
    progress: &dyn Progress,
) -> Result<(f64, f64)> {
    let device = model.device();
    let d = model.config().dim;
    let mut wi = Tensor::zeros([d, c.dim], (Kind::Float, device));
    let mut wt = Tensor::zeros([d, c.dim], (Kind::Float, device));
    tch::no_grad(|| {
        trunc_normal_(&mut wi, (1.0 / d as f64).sqrt(), seed ^ 0x11);
        trunc_normal_(&mut wt, (1.0 / d as f64).sqrt(), seed ^ 0x12);
    });
    let (wi, wt) = (wi.set_requires_grad(true), wt.set_requires_grad(true));
    let scale = Tensor::from((1.0f32 / 0.07).ln())
        .to_device(device)
        .set_requires_grad(true);
    let mut params = model.named_parameters();
    params.insert("retrieval.image_proj".into(), wi.shallow_clone());
    params.insert("retrieval.text_proj".into(), wt.shallow_clone());
    params.insert("retrieval.logit_scale".into(), scale.shallow_clone());
    let total = c.finetune_steps as u64;
    let optim = crate::optim::OptimConfig {
        lr: c.finetune_lr,
        min_lr: c.finetune_lr / 100.0,
        warmup_steps: total / 10,
        clip_grad: Some(1.0),
        ..Default::default()
    };
    optim.validate()?;
    let mut opt = crate::optim::AdamW::new(params, optim.clone())?;
    let batches = train.images.len();
    let mut rng = imglish_ingest::Rng::keyed(&[seed, 0x7265_7472]);
    let mut order: Vec<usize> = Vec::new();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let normalise = |x: Tensor| {
        let n = x.norm_scalaropt_dim(2, [1], true) + 1e-8;
        x / n
    };
    for step in 0..total {
        if order.is_empty() {
            order = (0..batches).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let b = order.pop().unwrap_or(0);
        let input = match &train.images[b] {
            Input::Tokens(t) => Input::Tokens(t.to_device(device)),
            Input::Pixels(p) => Input::Pixels(p.to_device(device)),
        };
        let (ids, pad) = (&train.texts[b].0, &train.texts[b].1);
        let img = normalise(model.image_pooled(&input).matmul(&wi));
        let txt = normalise(
            model
                .text_pooled(&ids.to_device(device), Some(&pad.to_device(device)))
                .matmul(&wt),
        );
        let logits = img.matmul(&txt.tr()) * scale.exp().clamp(1.0, 100.0);
        let labels = Tensor::arange(logits.size()[0], (Kind::Int64, device));
        let loss = (logits.cross_entropy_for_logits(&labels) + logits.tr().cross_entropy_for_logits(&labels)) / 2.0;
        opt.zero_grad();
        loss.backward();
        opt.clip(1.0);
        opt.step(optim.lr_at(step, total));
        last = loss.double_value(&[]);
        if step == 0 {
            first = last;
        }
        if !last.is_finite() {
            return Err(TrainError::Config(format!(
                "retrieval fine-tuning: the loss is {last} at step {step} (lower --finetune-lr)"
            )));
        }
        progress.inc(1);
    }
    Ok((first, last))
}

/// Runs the retrieval probe of the BEiT-3 `checkpoint` on `dataset_dir`'s pairs. `progress` gets the named
/// phases (reading each split's pairs, fine-tuning steps, features and projection iterations of each encoder).
pub fn probe_retrieval(
    dataset_dir: &Path,
    checkpoint: &Path,
    config: &RetrievalConfig,
    device: TorchDevice,
    progress: &dyn Progress,
) -> Result<RetrievalReport> {
    if config.iterations == 0 || config.batch_size == 0 || config.lr <= 0.0 || config.dim <= 0 {
        return Err(TrainError::Config(
            "retrieval probe: iterations, batch size, lr and dim must be positive".into(),
        ));
    }
    let device = device.resolve()?;
    let dataset = Dataset::open(dataset_dir)?;
    let (trained, run) = load_beit3(checkpoint, device)?;
    let m = &run.model;
    crate::trainer::check_probe_fit(
        checkpoint,
        &dataset,
        crate::trainer::check_fit(
            &dataset,
            m.grid,
            m.vocab_size,
            Some(m.text_vocab_size),
            m.input == crate::InputKind::Pixels,
        ),
    )?;
    progress.phase("reading the training pairs", 0);
    let train = load_pairs(&dataset, Split::Train, m, config.batch_size, config.max_samples)?;
    progress.phase("reading the validation pairs", 0);
    let val = load_pairs(&dataset, Split::Val, m, config.batch_size, config.max_samples)?;
    if train.count < 2 || val.count < 2 {
        return Err(TrainError::Dataset {
            path: dataset_dir.to_path_buf(),
            reason: format!(
                "the retrieval probe needs image-caption pairs in both splits ({} train, {} val pairs)",
                train.count, val.count
            ),
        });
    }
    let score = |model: &Beit3, which: &str| -> Result<Recall> {
        if config.finetune_steps > 0 {
            progress.phase(
                &format!("contrastive fine-tuning of the {which} encoder (steps)"),
                config.finetune_steps as u64,
            );
            let (first, last) = finetune(model, &train, config, run.seed, progress)?;
            tracing::info!("retrieval fine-tuning: contrastive loss {first:.3} -> {last:.3}");
        }
        let batches = (train.images.len() + val.images.len()) as u64;
        progress.phase(&format!("features of the {which} encoder (batches)"), batches);
        let (ftr, fva) = (features(model, &train, progress)?, features(model, &val, progress)?);
        progress.phase(
            &format!("fitting the projections on the {which} encoder's features (iterations)"),
            config.iterations as u64,
        );
        fit_and_score(&ftr, &fva, config, run.seed, progress)
    };
    let random = Beit3::new(m, device, run.seed)?;
    let trained_recall = score(&trained, "trained")?;
    let random_recall = score(&random, "random")?;
    Ok(RetrievalReport {
        train_pairs: train.count,
        val_pairs: val.count,
        trained: trained_recall,
        random: random_recall,
        chance_r1: 1.0 / val.count as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitened_features_have_identity_covariance_and_a_flat_direction_stays_flat() {
        tch::manual_seed(3);
        // Correlated features of very different scales, centred.
        let z = Tensor::randn([500, 4], (Kind::Float, Device::Cpu));
        let mix = Tensor::from_slice(&[
            10.0f32, 0.0, 0.0, 0.0, 6.0, 4.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.8,
        ])
        .view([4, 4]);
        let x = z.matmul(&mix.tr());
        let x = &x - x.mean_dim(0, true, Kind::Float);
        let w = whitening(&x).expect("whitening");
        let y = x.matmul(&w);
        let cov = y.tr().matmul(&y) / 499.0;
        let err = (cov - Tensor::eye(4, (Kind::Float, Device::Cpu)))
            .abs()
            .max()
            .double_value(&[]);
        assert!(err < 1e-3, "covariance of whitened features off identity by {err}");
        // A constant (zero-variance) dimension is floored, not divided by zero: it stays zero and finite.
        let flat = Tensor::cat(
            &[x.narrow(1, 0, 3), Tensor::zeros([500, 1], (Kind::Float, Device::Cpu))],
            1,
        );
        let y = flat.matmul(&whitening(&flat).expect("whitening"));
        assert!(bool::try_from(y.isfinite().all()).expect("bool"));
        assert!(y.narrow(1, 3, 1).abs().max().double_value(&[]) < 1e-6);
        let y3 = y.narrow(1, 0, 3);
        let cov = y3.tr().matmul(&y3) / 499.0;
        let err = (cov - Tensor::eye(3, (Kind::Float, Device::Cpu)))
            .abs()
            .max()
            .double_value(&[]);
        assert!(err < 1e-3, "covariance of the varying dimensions off identity by {err}");
    }

    #[test]
    fn contrastive_fine_tuning_lowers_the_loss_on_its_pairs() {
        let mut c = Beit3Config::preset("beit3-tiny", [2, 2], 12, 20).expect("preset");
        (c.dim, c.heads, c.depth, c.ffn_dim, c.max_source_positions) = (16, 2, 1, 32, 12);
        c.drop_path = 0.0;
        let model = Beit3::new(&c, Device::Cpu, 1).expect("model");
        // 8 pairs whose caption names the image's first token: learnable.
        let images: Vec<i64> = (0..8).flat_map(|i| [i, 11 - i, i % 3, 5]).collect();
        let ids: Vec<i64> = (0..8).flat_map(|i| [1, 5 + i, 2]).collect();
        let pairs = Pairs {
            images: vec![Input::Tokens(Tensor::from_slice(&images).view([8, 4]))],
            texts: vec![(
                Tensor::from_slice(&ids).view([8, 3]),
                Tensor::zeros([8, 3], (Kind::Bool, Device::Cpu)),
            )],
            count: 8,
        };
        let config = RetrievalConfig {
            finetune_steps: 60,
            finetune_lr: 1e-3,
            ..RetrievalConfig::default()
        };
        let (first, last) = finetune(&model, &pairs, &config, 7, &|_| {}).expect("fine-tune");
        assert!(last < 0.5 * first, "loss {first} -> {last}");
    }
}
