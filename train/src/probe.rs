//! Linear probing: a frozen encoder, mean-pooled patch features, a linear classifier trained on the training
//! split's labels (every stored view of each training image: the augmented crops are the usual probe-training
//! augmentation) and scored on the centre views of the validation split, next to the same probe on a randomly
//! initialised encoder of the same configuration (and the majority-class baseline).

use std::path::Path;

use imglish_ingest::Progress;
use imglish_pack::{Dataset, Split};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::beit3::{load_beit3, Beit3};
use crate::data::{Builder, FixedSet};
use crate::device::TorchDevice;
use crate::error::{torch_err, Result, TrainError};
use crate::model::Beit;
use crate::trainer::{check_fit, check_probe_fit, checkpoint_architecture, load_model};

/// Probe settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// Full-batch Adam iterations of the classifier.
    pub iterations: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// L2 penalty on the classifier's weights.
    pub weight_decay: f64,
    /// Samples per forward pass when extracting features.
    pub batch_size: usize,
    /// At most this many samples per split.
    pub max_samples: usize,
    /// Train the classifier on every stored view of the training images (default), not only their centre views.
    #[serde(default = "yes")]
    pub train_all_views: bool,
}

fn yes() -> bool {
    true
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            iterations: 300,
            lr: 0.01,
            weight_decay: 1e-4,
            batch_size: 64,
            max_samples: 50_000,
            train_all_views: true,
        }
    }
}

/// The probe's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Classes (largest label + 1).
    pub classes: i64,
    /// Labelled training examples (views, when training on every view).
    pub train_samples: i64,
    /// Labelled validation samples.
    pub val_samples: i64,
    /// Validation accuracy on the checkpoint's encoder.
    pub accuracy: f64,
    /// Validation accuracy on a randomly initialised encoder (same configuration, the run's seed).
    pub random_accuracy: f64,
    /// Validation accuracy of always predicting the most frequent training class.
    pub majority_accuracy: f64,
    /// Binomial standard error of `accuracy` over the validation samples, √(a(1−a)/n): differences between
    /// probes much smaller than about twice this are noise.
    pub accuracy_se: f64,
    /// The same for `random_accuracy`.
    pub random_accuracy_se: f64,
}

/// Probes the encoder of `checkpoint` on `dataset_dir`. `progress` gets the named phases (reading each split,
/// features and classifier iterations of each encoder) with their totals.
pub fn probe(
    dataset_dir: &Path,
    checkpoint: &Path,
    config: &ProbeConfig,
    device: TorchDevice,
    progress: &dyn Progress,
) -> Result<ProbeReport> {
    if config.iterations == 0 || config.batch_size == 0 || config.lr <= 0.0 {
        return Err(TrainError::Config(
            "probe: iterations, batch size and lr must be positive".into(),
        ));
    }
    let device = device.resolve()?;
    let dataset = Dataset::open(dataset_dir)?;
    let (trained, random, builder) = match checkpoint_architecture(checkpoint)?.as_str() {
        "beit3" => {
            let (model, run) = load_beit3(checkpoint, device)?;
            let m = &run.model;
            check_probe_fit(
                checkpoint,
                &dataset,
                check_fit(
                    &dataset,
                    m.grid,
                    m.vocab_size,
                    Some(m.text_vocab_size),
                    m.input == crate::InputKind::Pixels,
                ),
            )?;
            let builder = Builder::new(run.model.data_config(), run.objective.image_masking.clone(), run.seed);
            (
                Encoder::Beit3(model),
                Encoder::Beit3(Beit3::new(&run.model, device, run.seed)?),
                builder,
            )
        }
        _ => {
            let (model, run) = load_model(checkpoint, device)?;
            let m = &run.model;
            check_probe_fit(
                checkpoint,
                &dataset,
                check_fit(
                    &dataset,
                    m.grid,
                    m.vocab_size,
                    None,
                    m.input == crate::InputKind::Pixels,
                ),
            )?;
            let builder = Builder::new(run.model.clone(), run.masking.clone(), run.seed);
            (
                Encoder::Beit(model),
                Encoder::Beit(Beit::new(&run.model, device, run.seed)?),
                builder,
            )
        }
    };
    progress.phase("reading the training split", 0);
    let train = FixedSet::load(
        &dataset,
        Split::Train,
        &builder,
        config.batch_size,
        config.max_samples,
        config.train_all_views,
    )?;
    progress.phase("reading the validation split", 0);
    let val = FixedSet::load(
        &dataset,
        Split::Val,
        &builder,
        config.batch_size,
        config.max_samples,
        false,
    )?;
    let (ytr, yva) = (train.labels(), val.labels());
    let keep_tr = ytr.ge(0);
    let keep_va = yva.ge(0);
    let (ntr, nva) = (
        keep_tr.sum(Kind::Int64).int64_value(&[]),
        keep_va.sum(Kind::Int64).int64_value(&[]),
    );
    if ntr == 0 || nva == 0 {
        return Err(TrainError::Dataset {
            path: dataset_dir.to_path_buf(),
            reason: format!(
                "probe needs labels in both splits ({ntr} labelled train, {nva} labelled val samples; ingest with \
                 --labels from-folders)"
            ),
        });
    }
    let classes = ytr.max().int64_value(&[]).max(yva.max().int64_value(&[])) + 1;
    let ytr = ytr.masked_select(&keep_tr);
    let yva = yva.masked_select(&keep_va);
    let majority = ytr.bincount::<Tensor>(None, classes).argmax(0, false).int64_value(&[]);
    let majority_accuracy = yva
        .eq(majority)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);

    let score = |model: &Encoder, which: &str| -> Result<f64> {
        let batches = (train.batches.len() + val.batches.len()) as u64;
        progress.phase(&format!("features of the {which} encoder (batches)"), batches);
        let ftr = features(model, &train, &builder, progress)?.index(&[Some(keep_tr.shallow_clone())]);
        let fva = features(model, &val, &builder, progress)?.index(&[Some(keep_va.shallow_clone())]);
        progress.phase(
            &format!("fitting the classifier on the {which} encoder's features (iterations)"),
            config.iterations as u64,
        );
        fit_and_score(&ftr, &ytr, &fva, &yva, classes, config, progress)
    };
    let accuracy = score(&trained, "trained")?;
    let random_accuracy = score(&random, "random")?;
    let se = |a: f64| (a * (1.0 - a) / nva as f64).sqrt();
    Ok(ProbeReport {
        classes,
        train_samples: ntr,
        val_samples: nva,
        accuracy,
        random_accuracy,
        majority_accuracy,
        accuracy_se: se(accuracy),
        random_accuracy_se: se(random_accuracy),
    })
}

/// A frozen encoder whose mean-pooled patch features are probed (BEiT-3: an image-only forward).
enum Encoder {
    Beit(Beit),
    Beit3(Beit3),
}

impl Encoder {
    fn pooled(&self, batch: &crate::data::Batch, builder: &Builder) -> Tensor {
        match self {
            Encoder::Beit(m) => m.pooled(&batch.to_device(m.config(), m.device()).input),
            Encoder::Beit3(m) => m.image_pooled(&batch.to_device(&builder.config, m.device()).input),
        }
    }
}

fn features(model: &Encoder, set: &FixedSet, builder: &Builder, progress: &dyn Progress) -> Result<Tensor> {
    tch::no_grad(|| {
        let parts: Vec<Tensor> = set
            .batches
            .iter()
            .map(|b| {
                let pooled = model.pooled(b, builder).to_device(Device::Cpu);
                progress.inc(1);
                pooled
            })
            .collect();
        Tensor::f_cat(&parts, 0).map_err(torch_err("probe features"))
    })
}

/// Standardises with the training statistics, trains a softmax classifier, returns validation accuracy.
fn fit_and_score(
    xtr: &Tensor,
    ytr: &Tensor,
    xva: &Tensor,
    yva: &Tensor,
    classes: i64,
    c: &ProbeConfig,
    progress: &dyn Progress,
) -> Result<f64> {
    let mean = xtr.mean_dim(0, true, Kind::Float);
    let std = xtr.std_dim(0, false, true) + 1e-6;
    let (xtr, xva) = ((xtr - &mean) / &std, (xva - &mean) / &std);
    // Zero initialisation: the problem is convex, and no global RNG is involved.
    let vs = nn::VarStore::new(Device::Cpu);
    let zeros = nn::LinearConfig {
        ws_init: nn::Init::Const(0.0),
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    let head = nn::linear(vs.root(), xtr.size()[1], classes, zeros);
    let mut opt = nn::Adam::default()
        .build(&vs, c.lr)
        .map_err(torch_err("probe optimiser"))?;
    for _ in 0..c.iterations {
        let loss =
            head.forward(&xtr).cross_entropy_for_logits(ytr) + head.ws.square().sum(Kind::Float) * c.weight_decay;
        opt.backward_step(&loss);
        progress.inc(1);
    }
    let acc = tch::no_grad(|| head.forward(&xva).accuracy_for_logits(yva).double_value(&[]));
    Ok(acc)
}
