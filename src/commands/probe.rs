//! `imglish probe`: linear probe of a checkpoint's frozen encoder vs a random encoder.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use imglish_train::{probe, probe_retrieval, ProbeConfig, Recall, RetrievalConfig, TorchDevice};

use super::folders::{expect, Folder};
use crate::output::{BarProgress, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    /// A linear classifier on mean-pooled image features (needs labels).
    Classify,
    /// BEiT-3: image-to-text and text-to-image retrieval on the validation pairs (needs captions).
    Retrieval,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// What to probe.
    #[arg(long, value_enum, default_value_t = TaskArg::Classify)]
    pub task: TaskArg,

    /// A checkpoint directory (`RUN/checkpoints/step-NNNNNNNN`) or a run directory (its newest checkpoint).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,

    /// Dataset directory (labels from `ingest --labels from-folders`).
    #[arg(long, value_name = "DIR")]
    pub dataset: PathBuf,

    /// Classifier iterations (full-batch Adam).
    #[arg(long, default_value_t = ProbeConfig::default().iterations)]
    pub iterations: usize,

    /// Classifier learning rate.
    #[arg(long, default_value_t = ProbeConfig::default().lr)]
    pub lr: f64,

    /// L2 penalty on the classifier's weights.
    #[arg(long, default_value_t = ProbeConfig::default().weight_decay)]
    pub weight_decay: f64,

    /// At most this many samples per split.
    #[arg(long, default_value_t = ProbeConfig::default().max_samples)]
    pub max_samples: usize,

    /// Train the classifier on the training images' centre views only (default: every stored view).
    #[arg(long)]
    pub centre_views_only: bool,

    /// Retrieval: contrastive fine-tuning steps of the whole encoder, the checkpoint's and the random one alike,
    /// on the training pairs before probing (0: frozen features).
    #[arg(long, default_value_t = 0)]
    pub finetune_steps: usize,

    /// Retrieval: peak learning rate of that fine-tuning.
    #[arg(long, default_value_t = 2e-4)]
    pub finetune_lr: f64,

    /// Retrieval: only standardise each dimension of the frozen features before fitting the projections, instead
    /// of whitening them (PCA whitening fitted on the training features, the default).
    #[arg(long)]
    pub no_whiten: bool,

    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::cli::device_arg)]
    pub device: String,
}

pub fn run(args: &ProbeArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    expect(&args.dataset, Folder::Dataset, "--dataset")?;
    imglish_train::prepare_process(threads);
    let device: TorchDevice = args.device.parse()?;
    let checkpoint = imglish_train::resolve_checkpoint(&args.checkpoint)?;
    if args.task == TaskArg::Retrieval {
        return run_retrieval(args, &checkpoint, device, out);
    }
    let config = ProbeConfig {
        iterations: args.iterations,
        lr: args.lr,
        weight_decay: args.weight_decay,
        max_samples: args.max_samples,
        train_all_views: !args.centre_views_only,
        ..ProbeConfig::default()
    };
    let started = std::time::Instant::now();
    let bar = out.spinner("probe");
    let report = probe(&args.dataset, &checkpoint, &config, device, &BarProgress(&bar))
        .with_context(|| format!("probing {} on {} failed", checkpoint.display(), args.dataset.display()))?;
    bar.finish_and_clear();
    let text = format!(
        "probe: val accuracy {:.3} ± {:.3} (random encoder {:.3} ± {:.3}, majority class {:.3}); {} classes, {} train \
         examples / {} val samples; checkpoint {} ({:.1}s)",
        report.accuracy,
        report.accuracy_se,
        report.random_accuracy,
        report.random_accuracy_se,
        report.majority_accuracy,
        report.classes,
        report.train_samples,
        report.val_samples,
        checkpoint.display(),
        started.elapsed().as_secs_f64()
    );
    let mut json = serde_json::to_value(&report).unwrap_or_default();
    json["event"] = "probe".into();
    json["checkpoint"] = checkpoint.display().to_string().into();
    out.summary(&text, &json);
    Ok(())
}

fn recall_text(r: &Recall) -> String {
    format!(
        "image->text R@1 {:.3} R@5 {:.3}, text->image R@1 {:.3} R@5 {:.3}",
        r.i2t_r1, r.i2t_r5, r.t2i_r1, r.t2i_r5
    )
}

fn run_retrieval(
    args: &ProbeArgs,
    checkpoint: &std::path::Path,
    device: TorchDevice,
    out: &Output,
) -> anyhow::Result<()> {
    let config = RetrievalConfig {
        iterations: args.iterations,
        lr: args.lr,
        max_samples: args.max_samples,
        finetune_steps: args.finetune_steps,
        finetune_lr: args.finetune_lr,
        whiten: !args.no_whiten,
        ..RetrievalConfig::default()
    };
    let started = std::time::Instant::now();
    let bar = out.spinner("retrieval probe");
    let report = probe_retrieval(&args.dataset, checkpoint, &config, device, &BarProgress(&bar))
        .with_context(|| format!("probing {} on {} failed", checkpoint.display(), args.dataset.display()))?;
    bar.finish_and_clear();
    let text = format!(
        "retrieval probe: {} (random encoder: {}; chance R@1 {:.3}); {} train / {} val pairs; checkpoint {} \
         ({:.1}s)",
        recall_text(&report.trained),
        recall_text(&report.random),
        report.chance_r1,
        report.train_pairs,
        report.val_pairs,
        checkpoint.display(),
        started.elapsed().as_secs_f64()
    );
    let mut json = serde_json::to_value(&report).unwrap_or_default();
    json["event"] = "probe".into();
    json["task"] = "retrieval".into();
    json["checkpoint"] = checkpoint.display().to_string().into();
    out.summary(&text, &json);
    Ok(())
}
