//! `imglish build CONFIG.toml --out DIR`: a whole shard build from one versioned config file. The stages run in
//! order through the same parser and code as their subcommands; a stage whose record (`DIR/.build/STAGE.json`)
//! matches its fingerprint (its arguments, its inputs' fingerprints and the upstream stages' fingerprints) is
//! skipped, an interrupted one resumes in place, a changed one starts over (and so does everything after it).
//! The build record `DIR/dataset/build.json` lists the config, the imglish version, every stage's fingerprint,
//! counts and timing, and the dataset's hashes; `imglish verify` checks a dataset against it.
//!
//! Config (`version = 1`): one table per stage with the stage's own flags as keys (`val_fraction = 0.2` is
//! `--val-fraction 0.2`, `true` is a bare flag, arrays repeat values); the build supplies every input/output
//! path itself. Relative paths are relative to the config file; `{out}` stands for the build directory.
//! Tables: `[demo]` (optional: generate the demo corpus into `{out}/demo`), `[download]` (optional: `imglish
//! download` of `urls = "LIST"` into `{out}/download`, which `[ingest]` names as `images = ["{out}/download"]`),
//! `[ingest]`, `[tokenizer]` with
//! either `model = "tok.onnx"` or `[tokenizer.fit]`, `[text_tokenizer]` (optional) with either
//! `file = "tokenizer.json"` or `[text_tokenizer.fit]`, `[tokenize]`, `[pack]`, and `[upload]` (optional:
//! `url = "s3://..."`: the finished dataset is uploaded there, build.json and shards first, index.json last;
//! skipped when `.build/upload.json` records the same index uploaded to the same URL).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cli::Cli;
use crate::output::Output;

/// Build config format version.
pub const BUILD_CONFIG_VERSION: i64 = 1;
/// The build record in the dataset directory.
pub const BUILD_RECORD: &str = "build.json";

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build config (TOML).
    #[arg(value_name = "CONFIG")]
    pub config: PathBuf,
    /// Build directory: demo/, manifest/, tokenizers/, tokens/, dataset/ (with build.json), .build/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// One stage's completion record (`.build/STAGE.json`) and its entry in the build record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub stage: String,
    pub argv: Vec<String>,
    pub fingerprint: String,
    pub seconds: f64,
    /// The stage's own summary line (JSON), when it printed one.
    pub summary: Option<serde_json::Value>,
}

fn hex(bytes: impl AsRef<[u8]>) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn file_sha(path: &Path) -> anyhow::Result<String> {
    Ok(hex(
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
    ))
}

/// A cheap fingerprint of input files or trees: relative path, size and modification time of every file.
fn tree_fingerprint(path: &Path) -> anyhow::Result<String> {
    fn walk(root: &Path, p: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
        let meta = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for e in entries {
                walk(root, &e, out)?;
            }
        } else {
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let rel = p.strip_prefix(root).unwrap_or(p).display().to_string();
            out.push(format!("{rel}\0{}\0{mtime}", meta.len()));
        }
        Ok(())
    }
    let mut lines = Vec::new();
    walk(path, path, &mut lines)?;
    Ok(hex(lines.join("\n")))
}

/// A TOML table as command-line flags.
fn flags(table: &toml::Table, skip: &[&str], base: &Path, out: &Path) -> anyhow::Result<Vec<String>> {
    let mut argv = Vec::new();
    for (key, value) in table {
        if skip.contains(&key.as_str()) {
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => resolve(s, base, out),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!("`{key}`: unsupported value {other:?} (strings, numbers, booleans or arrays of them)"),
            })
        };
        match value {
            toml::Value::Boolean(true) => argv.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                argv.push(flag);
                for i in items {
                    argv.push(scalar(i)?);
                }
            }
            v => {
                argv.push(flag);
                argv.push(scalar(v)?);
            }
        }
    }
    Ok(argv)
}

/// `{out}/x` → the build directory's `x`; a relative path that exists relative to the config → that; else as is.
fn resolve(s: &str, base: &Path, out: &Path) -> String {
    if let Some(rest) = s.strip_prefix("{out}/") {
        return out.join(rest).display().to_string();
    }
    let p = Path::new(s);
    if p.is_relative() && base.join(p).exists() {
        return base.join(p).display().to_string();
    }
    s.to_string()
}

/// The tables a build config may have, and the keys of those that are not a stage's flags.
const TABLES: [&str; 9] = [
    "version",
    "demo",
    "download",
    "ingest",
    "tokenizer",
    "text_tokenizer",
    "tokenize",
    "pack",
    "upload",
];

/// Refuses unknown tables (and unknown keys of `[tokenizer]` / `[text_tokenizer]`), suggesting the closest name.
fn check_keys(config: &toml::Table) -> anyhow::Result<()> {
    let unknown = |key: &str, known: &[&str], what: &str| -> anyhow::Error {
        let close = known
            .iter()
            .map(|k| (edit_distance(&key.to_lowercase(), k), *k))
            .min()
            .filter(|(d, _)| *d <= 2)
            .map_or(String::new(), |(_, k)| format!(" (did you mean `{k}`?)"));
        anyhow::anyhow!("unknown {what} `{key}`{close}; known: {}", known.join(", "))
    };
    for key in config.keys() {
        if !TABLES.contains(&key.as_str()) {
            return Err(unknown(key, &TABLES, "table"));
        }
    }
    for (name, known) in [("tokenizer", ["model", "fit"]), ("text_tokenizer", ["file", "fit"])] {
        for key in table(config, name).into_iter().flat_map(toml::Table::keys) {
            if !known.contains(&key.as_str()) {
                return Err(unknown(key, &known, &format!("key of [{name}]")));
            }
        }
    }
    Ok(())
}

/// Levenshtein distance (small strings: table and key names).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn table<'a>(config: &'a toml::Table, key: &str) -> Option<&'a toml::Table> {
    config.get(key).and_then(toml::Value::as_table)
}

struct Stage {
    name: &'static str,
    /// The config table its settings come from.
    table: &'static str,
    argv: Vec<String>,
    /// Fingerprints of external inputs (source trees, model files).
    inputs: Vec<String>,
    /// Directories and files the stage writes; cleared when the stage starts over.
    outputs: Vec<PathBuf>,
}

fn plan(config: &toml::Table, base: &Path, out: &Path) -> anyhow::Result<Vec<Stage>> {
    let p = |x: &Path| x.display().to_string();
    let (demo, manifest, tok, tokens, dataset) = (
        out.join("demo"),
        out.join("manifest"),
        out.join("tokenizers"),
        out.join("tokens"),
        out.join("dataset"),
    );
    let mut stages = Vec::new();
    if let Some(t) = table(config, "demo") {
        let mut argv = vec!["demo-corpus".into(), "--out".into(), p(&demo)];
        argv.extend(flags(t, &[], base, out)?);
        stages.push(Stage {
            name: "demo",
            table: "demo",
            argv,
            inputs: vec![],
            outputs: vec![demo.clone()],
        });
    }
    if let Some(t) = table(config, "download") {
        let list = t
            .get("urls")
            .and_then(toml::Value::as_str)
            .context("[download] needs `urls = \"LIST\"` (a .parquet, .csv, .tsv, .jsonl or .txt URL list)")?;
        let list = PathBuf::from(resolve(list, base, out));
        let dl = out.join("download");
        let mut argv = vec!["download".into(), "--out".into(), p(&dl)];
        argv.extend(flags(t, &[], base, out)?);
        stages.push(Stage {
            name: "download",
            table: "download",
            argv,
            inputs: vec![file_sha(&list)?],
            outputs: vec![dl],
        });
    }
    let ingest = table(config, "ingest").context("the config has no [ingest] table")?;
    let mut argv = vec!["ingest".into(), "--out".into(), p(&manifest)];
    argv.extend(flags(ingest, &[], base, out)?);
    // Source trees, caption files and text corpora that exist before the build (the demo's are covered by its
    // stage).
    let mut inputs = Vec::new();
    for key in ["images", "captions", "texts"] {
        for v in ingest.get(key).and_then(toml::Value::as_array).into_iter().flatten() {
            let path = PathBuf::from(resolve(v.as_str().unwrap_or_default(), base, out));
            if !path.starts_with(out) {
                inputs.push(tree_fingerprint(&path)?);
            }
        }
    }
    stages.push(Stage {
        name: "ingest",
        table: "ingest",
        argv,
        inputs,
        outputs: vec![manifest.clone()],
    });

    let tcfg = table(config, "tokenizer").context("the config has no [tokenizer] table")?;
    let visual = match (tcfg.get("model").and_then(toml::Value::as_str), table(tcfg, "fit")) {
        (Some(model), None) => PathBuf::from(resolve(model, base, out)),
        (None, Some(fit)) => {
            let v = tok.join("visual.onnx");
            let mut argv = vec![
                "tokenizer".into(),
                "fit".into(),
                "--manifest".into(),
                p(&manifest),
                "--out".into(),
                p(&v),
            ];
            argv.extend(flags(fit, &[], base, out)?);
            let card = tok.join("visual.card.json");
            stages.push(Stage {
                name: "tokenizer-fit",
                table: "tokenizer.fit",
                argv,
                inputs: vec![],
                outputs: vec![v.clone(), card],
            });
            v
        }
        _ => bail!("[tokenizer] needs exactly one of `model = \"FILE.onnx\"` or a [tokenizer.fit] table"),
    };
    let text = match table(config, "text_tokenizer") {
        None => None,
        Some(t) => match (t.get("file").and_then(toml::Value::as_str), table(t, "fit")) {
            (Some(file), None) => Some(PathBuf::from(resolve(file, base, out))),
            (None, Some(fit)) => {
                // A build promises byte-identical rebuilds: HF `tokenizers` trains WordPiece and Unigram
                // nondeterministically (four fits on one manifest gave four vocabularies each; BPE gave one).
                if let Some(model) = fit.get("model").and_then(toml::Value::as_str).filter(|m| *m != "bpe") {
                    bail!(
                        "[text_tokenizer.fit] model = \"{model}\": its training is not deterministic, and a build \
                         must rebuild byte-identically; use model = \"bpe\", or train it once with `imglish tokenizer \
                         fit-text` and give the file as [text_tokenizer] file = \"tokenizer.json\""
                    );
                }
                let f = tok.join("text.json");
                let mut argv = vec![
                    "tokenizer".into(),
                    "fit-text".into(),
                    "--manifest".into(),
                    p(&manifest),
                    "--out".into(),
                    p(&f),
                ];
                argv.extend(flags(fit, &[], base, out)?);
                stages.push(Stage {
                    name: "text-tokenizer-fit",
                    table: "text_tokenizer.fit",
                    argv,
                    inputs: vec![],
                    outputs: vec![f.clone()],
                });
                Some(f)
            }
            _ => bail!(
                "[text_tokenizer] needs exactly one of `file = \"tokenizer.json\"` or a [text_tokenizer.fit] table"
            ),
        },
    };
    let mut argv = vec![
        "tokenize".into(),
        "--manifest".into(),
        p(&manifest),
        "--tokenizer".into(),
        p(&visual),
        "--out".into(),
        p(&tokens),
    ];
    let mut inputs = Vec::new();
    if !visual.starts_with(out) {
        inputs.push(file_sha(&visual)?);
    }
    if let Some(text) = &text {
        argv.extend(["--text-tokenizer".into(), p(text)]);
        if !text.starts_with(out) {
            inputs.push(file_sha(text)?);
        }
    }
    argv.extend(flags(
        table(config, "tokenize").unwrap_or(&toml::Table::new()),
        &[],
        base,
        out,
    )?);
    stages.push(Stage {
        name: "tokenize",
        table: "tokenize",
        argv,
        inputs,
        outputs: vec![tokens],
    });
    let mut argv = vec![
        "pack".into(),
        "--tokens".into(),
        p(&out.join("tokens")),
        "--manifest".into(),
        p(&manifest),
        "--out".into(),
        p(&dataset),
    ];
    argv.extend(flags(
        table(config, "pack").unwrap_or(&toml::Table::new()),
        &[],
        base,
        out,
    )?);
    stages.push(Stage {
        name: "pack",
        table: "pack",
        argv,
        inputs: vec![],
        outputs: vec![dataset],
    });
    Ok(stages)
}

/// Clears what a stage writes before it starts over.
fn clear(outputs: &[PathBuf]) -> anyhow::Result<()> {
    for p in outputs {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else if p.exists() {
            std::fs::remove_file(p)
        } else {
            Ok(())
        };
        r.with_context(|| format!("cannot clear {}", p.display()))?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    imglish_ingest::write_atomic(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: &BuildArgs, threads: usize, out: &Output) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(&args.config).with_context(|| format!("cannot read {}", args.config.display()))?;
    let config: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", args.config.display()))?;
    match config.get("version").and_then(toml::Value::as_integer) {
        Some(BUILD_CONFIG_VERSION) => {}
        other => bail!(
            "{}: `version = {BUILD_CONFIG_VERSION}` is required (found {})",
            args.config.display(),
            other.map_or("none".to_string(), |v| v.to_string())
        ),
    }
    // Stages run with the build directory as the working directory and paths relative to it, so that what they
    // record (e.g. ingest's source paths, which sample ids derive from) does not depend on where the build lives.
    let config_dir = args
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::fs::canonicalize(config_dir).with_context(|| format!("cannot resolve {}", config_dir.display()))?;
    let d = &args.out;
    // One build per folder: a second build (any config) is refused before it clears or writes anything.
    let _lock = super::lock::lock_dir(d)?;
    std::fs::create_dir_all(d.join(".build")).with_context(|| format!("cannot create {}", d.display()))?;
    let home = std::env::current_dir().context("cannot read the working directory")?;
    std::env::set_current_dir(d).with_context(|| format!("cannot enter {}", d.display()))?;
    let result = build_in_place(args, &config, &text, &base, threads, out);
    std::env::set_current_dir(&home).context("cannot return to the working directory")?;
    result
}

fn build_in_place(
    args: &BuildArgs,
    config: &toml::Table,
    text: &str,
    base: &Path,
    threads: usize,
    out: &Output,
) -> anyhow::Result<()> {
    let d = Path::new(".");
    check_keys(config).with_context(|| format!("{}: invalid build config", args.config.display()))?;
    let upload_to = upload_url(config).with_context(|| format!("{}: invalid build config", args.config.display()))?;
    let stages = plan(config, base, d).with_context(|| format!("{}: invalid build config", args.config.display()))?;
    // Every stage's settings are checked before the first one runs, not hours later when its turn comes.
    let mut parsed = Vec::with_capacity(stages.len());
    for stage in &stages {
        let cli = Cli::try_parse_from(std::iter::once("imglish".to_string()).chain(stage.argv.iter().cloned()))
            .map_err(|e| {
                let msg = e.to_string();
                let first = msg
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ")
                    .to_string();
                let tip = msg.lines().find(|l| l.trim_start().starts_with("tip:")).map(str::trim);
                anyhow::anyhow!(
                    "{}: invalid settings for stage `{}` ([{}] table): {first}{}",
                    args.config.display(),
                    stage.name,
                    stage.table,
                    tip.map_or(String::new(), |t| format!(" ({t})"))
                )
            })?;
        // Combinations of flags too (what `imglish` itself refuses with exit 2 before running).
        cli.validate().map_err(|e| {
            anyhow::anyhow!(
                "{}: invalid settings for stage `{}` ([{}] table): {e}",
                args.config.display(),
                stage.name,
                stage.table
            )
        })?;
        parsed.push(cli);
    }
    let started = Instant::now();
    let mut upstream = hex(format!("imglish-build-v1\0{}", env!("CARGO_PKG_VERSION")));
    let mut changed = false;
    let mut records = Vec::new();
    for (stage, cli) in stages.into_iter().zip(parsed) {
        let fingerprint = hex(format!(
            "{upstream}\0{}\0{}\0{}",
            stage.name,
            serde_json::to_string(&stage.argv)?,
            stage.inputs.join(",")
        ));
        let record_path = d.join(".build").join(format!("{}.json", stage.name));
        let previous: Option<StageRecord> = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match previous {
            Some(r) if r.fingerprint == fingerprint && !changed => {
                out.summary(
                    &format!("build: {} up to date (skipped)", stage.name),
                    &serde_json::json!({"event": "build-stage", "stage": stage.name, "skipped": true}),
                );
                upstream = fingerprint;
                records.push(r);
                continue;
            }
            // Another config or inputs (or an upstream stage ran again): start this stage over.
            Some(_) => clear(&stage.outputs)?,
            // Never completed: an interrupted run resumes in place, unless something upstream changed.
            None if changed => clear(&stage.outputs)?,
            None => {}
        }
        changed = true;
        let _ = std::fs::remove_file(&record_path);
        let t = Instant::now();
        super::dispatch(cli.command, threads, out).with_context(|| {
            format!(
                "build: stage `{}` failed (its paths are relative to {})",
                stage.name,
                args.out.display()
            )
        })?;
        let record = StageRecord {
            stage: stage.name.into(),
            argv: stage.argv.clone(),
            fingerprint: fingerprint.clone(),
            seconds: t.elapsed().as_secs_f64(),
            summary: None,
        };
        write_json(&record_path, &record)?;
        upstream = fingerprint;
        records.push(record);
    }
    let dataset_dir = PathBuf::from("dataset");
    let dataset = imglish_pack::Dataset::open(&dataset_dir)?;
    let index_sha = file_sha(&dataset_dir.join(imglish_pack::INDEX_FILE))?;
    let record = serde_json::json!({
        "build_record_version": 1,
        "imglish_version": env!("CARGO_PKG_VERSION"),
        "config": serde_json::to_value(config)?,
        "config_sha256": hex(text),
        "stages": records,
        "tokenizer_fingerprint": dataset.tokenizer().fingerprint,
        "dataset": {
            "build_fingerprint": dataset.index().build_fingerprint,
            "index_sha256": index_sha,
            "shards": dataset.shards().iter().map(|s| serde_json::json!({"file": s.file, "sha256": s.sha256, "rows": s.rows})).collect::<Vec<_>>(),
            "train": dataset.index().counts.train,
            "val": dataset.index().counts.val,
        },
    });
    write_json(&dataset_dir.join(BUILD_RECORD), &record)?;
    if let Some(url) = &upload_to {
        upload(&dataset_dir, url, &index_sha, out)?;
    }
    out.summary(
        &format!(
            "build: {} -> {} ({} samples: {} train, {} val; index sha256 {}; {:.1}s)",
            args.config.display(),
            args.out.join("dataset").display(),
            dataset.len(),
            dataset.index().counts.train,
            dataset.index().counts.val,
            &index_sha[..16],
            started.elapsed().as_secs_f64()
        ),
        &serde_json::json!({"event": "build", "dataset": args.out.join("dataset"), "index_sha256": index_sha,
            "build_fingerprint": dataset.index().build_fingerprint, "seconds": started.elapsed().as_secs_f64()}),
    );
    Ok(())
}

/// `[upload] url = "s3://..."`: where the finished dataset goes (object storage), if anywhere.
fn upload_url(config: &toml::Table) -> anyhow::Result<Option<String>> {
    let Some(t) = table(config, "upload") else {
        return Ok(None);
    };
    if let Some(k) = t.keys().find(|k| k.as_str() != "url") {
        bail!("[upload] has no key `{k}` (its only key is `url`)");
    }
    match t.get("url").and_then(|v| v.as_str()) {
        Some(u) if imglish_pack::remote_url(std::path::Path::new(u)).is_some() => Ok(Some(u.to_string())),
        _ => bail!(
            "[upload] url must be an object storage URL ({})",
            imglish_pack::REMOTE_SCHEMES.join(", ")
        ),
    }
}

/// Uploads the built dataset to `url` (build.json and shards first, index.json last), unless `.build/upload.json`
/// records the same index already uploaded there.
fn upload(dataset_dir: &Path, url: &str, index_sha: &str, out: &Output) -> anyhow::Result<()> {
    let record_path = Path::new(".build").join("upload.json");
    let record = serde_json::json!({"url": url, "index_sha256": index_sha});
    let done = std::fs::read(&record_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|r| r == record);
    if done {
        out.summary(
            &format!("build: upload to {url} up to date (skipped)"),
            &serde_json::json!({"event": "build-stage", "stage": "upload", "skipped": true}),
        );
        return Ok(());
    }
    let _ = std::fs::remove_file(&record_path);
    let bytes = imglish_pack::upload_dataset(dataset_dir, url, &[BUILD_RECORD], &mut |_| {})
        .with_context(|| format!("build: upload to {url} failed"))?;
    write_json(&record_path, &record)?;
    out.summary(
        &format!("build: uploaded {:.1} MB to {url}", bytes as f64 / 1e6),
        &serde_json::json!({"event": "build-stage", "stage": "upload", "url": url, "bytes": bytes}),
    );
    Ok(())
}

/// Checks a dataset against its build record, if it has one: the index's sha256 and every shard's hash.
pub fn check_record(dataset_dir: &Path, dataset: &imglish_pack::Dataset) -> anyhow::Result<Option<String>> {
    let path = dataset_dir.join(BUILD_RECORD);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let record: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}: malformed build record", path.display()))?;
    let index_sha = file_sha(&dataset_dir.join(imglish_pack::INDEX_FILE))?;
    let want = record["dataset"]["index_sha256"].as_str().unwrap_or_default();
    if want != index_sha {
        bail!(
            "{}: index.json has sha256 {index_sha}, the build record says {want}",
            dataset_dir.display()
        );
    }
    let recorded: BTreeMap<String, String> = record["dataset"]["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["file"].as_str().unwrap_or_default().to_string(),
                s["sha256"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let actual: BTreeMap<String, String> = dataset
        .shards()
        .iter()
        .map(|s| (s.file.clone(), s.sha256.clone()))
        .collect();
    if recorded != actual {
        bail!(
            "{}: the shard list differs from the build record",
            dataset_dir.display()
        );
    }
    Ok(Some(record["config_sha256"].as_str().unwrap_or_default().to_string()))
}
