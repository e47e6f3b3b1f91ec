//! `imglish quickstart`: the whole pipeline on the embedded demo corpus, no external data or weights: demo corpus
//! → ingest → fit a visual codebook and a text tokenizer → tokenize → pack → verify → train a tiny model → probe.
//! Each stage runs through the same code (and argument parser) as its own subcommand and prints its summary;
//! the end lists every artifact, the loss curve and the probe next to the random-encoder baseline.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, ValueEnum};
use imglish_train::{probe, probe_retrieval, ProbeConfig, RetrievalConfig, RetrievalReport, TorchDevice};

use crate::cli::Cli;
use crate::commands::tokenizer::Features;
use crate::commands::train::{parse_mix, ModelArg, SizeArgs, DEFAULT_MIX};
use crate::output::{BarProgress, Output};

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Directory for every artifact. It must be new, empty, or an earlier quickstart's directory (whose stage
    /// outputs are then replaced: `imglish build` is the command that reuses finished stages).
    #[arg(long, value_name = "DIR", default_value = "quickstart")]
    pub out: PathBuf,
    /// Demo images to draw.
    #[arg(long, default_value_t = 1200)]
    pub images: usize,
    /// Views tokenized per image.
    #[arg(long, default_value_t = 4)]
    pub views: u32,
    /// Visual codebook size.
    #[arg(long, default_value_t = 1024)]
    pub codebook: u32,
    /// What the visual codes match (see `imglish tokenizer fit --features`). The demo's labels are shapes in
    /// random colours, which colour codes cannot see.
    #[arg(long, value_enum, default_value_t = Features::Structure)]
    pub features: Features,
    /// Use this visual tokenizer (ONNX with its card, e.g. from `imglish tokenizer train-dvae`) instead of
    /// fitting a k-means codebook (--codebook and --features then do not apply); the dataset and the model
    /// take its grid and vocabulary.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Text tokenizer vocabulary.
    #[arg(long, default_value_t = 2000)]
    pub text_vocab: u32,
    /// The model: BEiT (masked image modelling) or BEiT-3 (masked data modelling on images, captions and
    /// image-caption pairs; also runs the retrieval probe).
    #[arg(long, value_enum, default_value_t = ModelArg::Beit)]
    pub model: ModelArg,
    /// Model preset. With the default `tiny`, quickstart narrows it to the demo model (--dim 128 --depth 4
    /// --heads 4 --abs-pos: ~4 minutes for the default steps on 2 cores) unless --dim/--depth/--heads are given.
    #[arg(long, default_value = "tiny", value_parser = crate::cli::preset_arg)]
    pub preset: String,
    #[command(flatten)]
    pub size: SizeArgs,
    /// Training steps.
    #[arg(long, default_value_t = 2400)]
    pub steps: u64,
    /// Samples per training step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Peak learning rate of the training stage (`imglish train --lr`).
    #[arg(long, default_value_t = 1.5e-3)]
    pub lr: f64,
    /// BEiT-3: relative weights of image, text and pair samples (`imglish train --mix`).
    #[arg(long, default_value = DEFAULT_MIX, value_parser = mix_arg)]
    pub mix: String,
    /// Seed of every stage.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `--mix`: checked with `train`'s own parser when the command line is parsed, kept as written (it is passed on).
fn mix_arg(s: &str) -> Result<String, String> {
    parse_mix(s).map(|_| s.to_string())
}

/// Marks a directory as quickstart's, so that a re-run may replace what it wrote there (and nothing else).
const MARKER: &str = ".imglish-quickstart";
const STAGE_DIRS: [&str; 6] = ["demo", "manifest", "tokenizers", "tokens", "dataset", "run"];

fn prepare_dir(d: &Path) -> anyhow::Result<()> {
    let exists_nonempty = std::fs::read_dir(d).map(|mut r| r.next().is_some()).unwrap_or(false);
    if exists_nonempty {
        if !d.join(MARKER).exists() {
            anyhow::bail!(
                "{} is not empty and was not made by quickstart; choose a new --out directory",
                d.display()
            );
        }
        for sub in STAGE_DIRS {
            let p = d.join(sub);
            if p.exists() {
                std::fs::remove_dir_all(&p).with_context(|| format!("cannot clear {}", p.display()))?;
            }
        }
    }
    std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    std::fs::write(d.join(MARKER), b"imglish quickstart output directory\n")
        .with_context(|| format!("cannot write {}", d.join(MARKER).display()))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

pub fn run(args: &QuickstartArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    if args.model == ModelArg::Beit && args.mix != DEFAULT_MIX {
        anyhow::bail!("--mix applies to --model beit3 (BEiT trains on images only)");
    }
    // A given tokenizer is read from where the command was started, not from inside the output directory.
    let tokenizer = match &args.tokenizer {
        Some(t) => Some(std::fs::canonicalize(t).with_context(|| format!("--tokenizer {}", t.display()))?),
        None => None,
    };
    prepare_dir(&args.out)?;
    // The stages run inside the output directory with relative paths, so that what they record (ingest's source
    // paths, from which sample ids derive) and hence every result is the same wherever the directory lives.
    let home = std::env::current_dir().context("cannot read the working directory")?;
    std::env::set_current_dir(&args.out).with_context(|| format!("cannot enter {}", args.out.display()))?;
    let result = run_in_place(args, tokenizer.as_deref(), threads, out);
    std::env::set_current_dir(&home).context("cannot return to the working directory")?;
    result
}

fn run_in_place(args: &QuickstartArgs, tokenizer: Option<&Path>, threads: usize, out: &Output) -> anyhow::Result<()> {
    let d = Path::new("");
    let (demo, manifest, tok, tokens, dataset, run_dir) = (
        d.join("demo"),
        d.join("manifest"),
        d.join("tokenizers"),
        d.join("tokens"),
        d.join("dataset"),
        d.join("run"),
    );
    let (visual, text) = (
        tokenizer.map_or_else(|| tok.join("visual.onnx"), Path::to_path_buf),
        tok.join("text.json"),
    );
    let seed = args.seed.to_string();
    let mut train = vec![
        "train".to_string(),
        "--dataset".into(),
        path(&dataset),
        "--out".into(),
        path(&run_dir),
        "--preset".into(),
        args.preset.clone(),
        "--steps".into(),
        args.steps.to_string(),
        "--batch-size".into(),
        args.batch_size.to_string(),
        "--warmup-steps".into(),
        (args.steps / 10).to_string(),
        "--eval-every".into(),
        (args.steps / 4).max(1).to_string(),
        "--checkpoint-every".into(),
        (args.steps / 4).max(1).to_string(),
        "--seed".into(),
        seed.clone(),
        "--lr".into(),
        args.lr.to_string(),
    ];
    let demo_model = args.preset == "tiny" && args.size.flags().iter().all(|(_, v)| v.is_none());
    for (flag, v) in args.size.flags() {
        let v = match (v, flag) {
            (None, "--dim") if demo_model => Some(128),
            (None, "--depth" | "--heads") if demo_model => Some(4),
            _ => v,
        };
        if let Some(v) = v {
            train.extend([flag.to_string(), v.to_string()]);
        }
    }
    match args.model {
        ModelArg::Beit if demo_model => train.push("--abs-pos".into()),
        ModelArg::Beit => {}
        // BEiT-3 always has absolute (Multiway) position embeddings.
        ModelArg::Beit3 => train.extend(["--model".into(), "beit3".into(), "--mix".into(), args.mix.clone()]),
    }
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let fit_stage = s(&[
        "tokenizer",
        "fit",
        "--manifest",
        &path(&manifest),
        "--patch",
        "8",
        "--input-size",
        "112",
        "--codebook",
        &args.codebook.to_string(),
        "--features",
        args.features
            .to_possible_value()
            .expect("no skipped variants")
            .get_name(),
        "--seed",
        &seed,
        "--out",
        &path(&visual),
    ]);
    let stages: Vec<Vec<String>> = vec![
        s(&[
            "demo-corpus",
            "--out",
            &path(&demo),
            "--images",
            &args.images.to_string(),
            "--seed",
            &seed,
        ]),
        s(&[
            "ingest",
            "--images",
            &path(&demo.join("images")),
            "--captions",
            &path(&demo.join("captions/coco_captions.json")),
            "--labels",
            "from-folders",
            "--val-fraction",
            "0.2",
            "--seed",
            &seed,
            "--out",
            &path(&manifest),
        ]),
        s(&[
            "tokenizer",
            "fit-text",
            "--manifest",
            &path(&manifest),
            "--vocab-size",
            &args.text_vocab.to_string(),
            "--out",
            &path(&text),
        ]),
        s(&[
            "tokenize",
            "--manifest",
            &path(&manifest),
            "--tokenizer",
            &path(&visual),
            "--text-tokenizer",
            &path(&text),
            "--views",
            &args.views.to_string(),
            "--seed",
            &seed,
            "--out",
            &path(&tokens),
        ]),
        s(&[
            "pack",
            "--tokens",
            &path(&tokens),
            "--manifest",
            &path(&manifest),
            "--out",
            &path(&dataset),
            "--shuffle-seed",
            &seed,
        ]),
        s(&["verify", &path(&dataset)]),
        train,
    ];
    let mut stages = stages;
    if tokenizer.is_none() {
        stages.insert(2, fit_stage);
    } else {
        std::fs::create_dir_all(&tok).with_context(|| format!("cannot create {}", tok.display()))?;
    }
    let started = std::time::Instant::now();
    for argv in stages {
        let stage = argv[..argv.len().min(2)].join(" ");
        let cli = Cli::try_parse_from(std::iter::once("imglish".to_string()).chain(argv))
            .with_context(|| format!("quickstart: bad arguments for `{stage}`"))?;
        super::dispatch(cli.command, threads, out).with_context(|| format!("quickstart: `{stage}` failed"))?;
    }
    let checkpoint = imglish_train::latest_checkpoint(&run_dir)?.context("quickstart: training wrote no checkpoint")?;
    let bar = out.spinner("probe");
    let report = probe(
        &dataset,
        &checkpoint,
        &ProbeConfig::default(),
        TorchDevice::Cpu,
        &BarProgress(&bar),
    )
    .with_context(|| format!("quickstart: probing {} failed", checkpoint.display()))?;
    let retrieval = match args.model {
        ModelArg::Beit3 => Some(
            probe_retrieval(
                &dataset,
                &checkpoint,
                &RetrievalConfig::default(),
                TorchDevice::Cpu,
                &BarProgress(&bar),
            )
            .with_context(|| format!("quickstart: the retrieval probe of {} failed", checkpoint.display()))?,
        ),
        ModelArg::Beit => None,
    };
    bar.finish_and_clear();
    let vals: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "val")
        .collect();
    let (first, last) = (vals.first(), vals.last());
    let text = format!(
        "quickstart done in {:.0}s. Artifacts under {}:\n  demo/        the generated corpus (images, captions, tar shards, bad inputs)\n  \
         manifest/    samples.parquet, rejects.parquet, classes.json, ingest.json\n  tokenizers/  visual.onnx + \
         visual.card.json (k-means codebook; not with --tokenizer), text.json\n  tokens/      token parts + tokenize.json\n  dataset/     \
         Arrow IPC shards + index.json\n  run/         checkpoints/, metrics.jsonl, config.json, loss.png\n{}\n\
         linear probe (val accuracy ± standard error): {:.3} ± {:.3} trained encoder vs {:.3} ± {:.3} random encoder \
         (majority class {:.3}, {} classes){}",
        started.elapsed().as_secs_f64(),
        args.out.display(),
        loss_lines(args.model, first, last, &args.out.join(run_dir.join("loss.png"))),
        report.accuracy,
        report.accuracy_se,
        report.random_accuracy,
        report.random_accuracy_se,
        report.majority_accuracy,
        report.classes,
        retrieval.as_ref().map(retrieval_line).unwrap_or_default(),
    );
    let loss = |v: Option<&serde_json::Value>| v.and_then(|v| v["loss"].as_f64()).unwrap_or(f64::NAN);
    out.summary(
        &text,
        &serde_json::json!({
            "event": "quickstart",
            "out": args.out,
            "initial_val_loss": loss(first),
            "final_val_loss": loss(last),
            "initial_val": first,
            "final_val": last,
            "loss_png": args.out.join(run_dir.join("loss.png")),
            "checkpoint": args.out.join(&checkpoint),
            "probe": report,
            "retrieval": retrieval,
            "seconds": started.elapsed().as_secs_f64(),
        }),
    );
    Ok(())
}

/// The validation losses at the start and the end (BEiT-3: per task).
fn loss_lines(
    model: ModelArg,
    first: Option<&serde_json::Value>,
    last: Option<&serde_json::Value>,
    png: &Path,
) -> String {
    let at = |v: Option<&serde_json::Value>, key: &[&str]| {
        v.and_then(|v| key.iter().try_fold(v, |v, k| v.get(*k)))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    match model {
        ModelArg::Beit => format!(
            "validation MIM loss {:.3} at step 0 -> {:.3} at the end; curve: {}",
            at(first, &["loss"]),
            at(last, &["loss"]),
            png.display()
        ),
        ModelArg::Beit3 => {
            let tasks = [
                ("MIM on images", "image_mim"),
                ("MLM on texts", "text_mlm"),
                ("MIM on pairs", "pair_mim"),
                ("MLM on pairs", "pair_mlm"),
            ];
            let parts: Vec<String> = tasks
                .iter()
                .map(|(what, key)| {
                    format!(
                        "{what} {:.3} -> {:.3}",
                        at(first, &["tasks", key, "loss"]),
                        at(last, &["tasks", key, "loss"])
                    )
                })
                .collect();
            format!(
                "validation losses from step 0 to the end: {}; curve: {}",
                parts.join(", "),
                png.display()
            )
        }
    }
}

fn retrieval_line(r: &RetrievalReport) -> String {
    format!(
        "\nretrieval probe on {} val pairs (chance R@1 {:.3}): image->text R@1 {:.3} vs {:.3} random encoder, \
         text->image R@1 {:.3} vs {:.3} (R@5 {:.3}/{:.3} vs {:.3}/{:.3})",
        r.val_pairs,
        r.chance_r1,
        r.trained.i2t_r1,
        r.random.i2t_r1,
        r.trained.t2i_r1,
        r.random.t2i_r1,
        r.trained.i2t_r5,
        r.trained.t2i_r5,
        r.random.i2t_r5,
        r.random.t2i_r5
    )
}
