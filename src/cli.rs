//! Command-line definitions (clap derive).

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands::build::BuildArgs;
use crate::commands::demo::DemoCorpusArgs;
use crate::commands::download::DownloadArgs;
use crate::commands::embed::EmbedArgs;
use crate::commands::finetune::FinetuneArgs;
use crate::commands::ingest::IngestArgs;
use crate::commands::inspect::InspectArgs;
use crate::commands::pack::PackArgs;
use crate::commands::probe::ProbeArgs;
use crate::commands::quickstart::QuickstartArgs;
use crate::commands::tokenize::TokenizeArgs;
use crate::commands::tokenizer::TokenizerArgs;
use crate::commands::train::TrainArgs;
use crate::commands::verify::VerifyArgs;

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  failure (bad input, missing runtime library, I/O error, ...)
  2  usage error (unknown flag, invalid value)

Environment:
  ORT_DYLIB_PATH   path of libonnxruntime.so (default: installed by scripts/setup-onnxruntime)
  RANK, WORLD_SIZE this process's data partition in `imglish train` (or --rank/--world-size)
  IMGLISH_LOG      log filter, e.g. `debug` or `imglish_ingest=trace` (default: info)
  AWS_*, GOOGLE_*, AZURE_*
                   credentials, region and endpoint of s3://, gs://, az:// datasets (e.g. AWS_ACCESS_KEY_ID,
                   AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP)
  IMGLISH_CACHE_DIR
                   default --cache-dir";

/// imglish: image corpora and captions into compressed shards of discrete tokens for masked-modeling
/// pretraining (BEiT, BEiT v2, BEiT-3).
#[derive(Debug, Parser)]
#[command(name = "imglish", version, about, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand accepts.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Worker threads (default: all cores). Ingest, tokenize and pack results never depend on it; training's
    /// last float bits do (libtorch splits its sums by thread), and only `--threads 1` makes a resumed run
    /// bitwise equal to an uninterrupted one on a machine under load.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// Print only errors (no progress bars, no summaries).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Log and summary format on stderr/stdout: human text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Remote datasets (s3://, gs://, az://, https://): local folder of cached shards (default
    /// $IMGLISH_CACHE_DIR, else ~/.cache/imglish/shards).
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<std::path::PathBuf>,

    /// Remote datasets: most shard bytes kept in the cache at once, e.g. 500M, 20G (least recently used shards
    /// are evicted; at least the largest shard).
    #[arg(long, global = true, value_name = "SIZE", default_value = "20G", value_parser = size_arg)]
    pub cache_limit: u64,

    /// Remote datasets: shards downloaded ahead of the reader.
    #[arg(long, global = true, value_name = "N", default_value_t = 2)]
    pub prefetch_shards: usize,
}

impl GlobalArgs {
    /// The remote dataset options these flags set.
    pub fn remote_options(&self) -> imglish_pack::RemoteOptions {
        let mut options = imglish_pack::RemoteOptions::default();
        if let Some(dir) = &self.cache_dir {
            options.cache_dir.clone_from(dir);
        }
        options.cache_limit = self.cache_limit;
        options.prefetch = self.prefetch_shards;
        options
    }
}

/// A size in bytes with an optional K, M, G or T suffix (powers of 1024).
pub fn size_arg(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("'{s}': the size suffix must be K, M, G or T")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (a whole number with an optional K, M, G or T)"))?;
    n.checked_mul(1u64 << shift)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("'{s}': the size must be positive and below 16 EiB"))
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// JSON lines.
    Json,
}

/// The subcommands; each one's arguments live in its module under `src/commands/`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything on the embedded demo corpus in a few minutes: demo corpus, ingest, tokenizers, tokenize, pack,
    /// verify, train a tiny model, probe it.
    Quickstart(QuickstartArgs),
    /// A whole shard build from one versioned config file (TOML): stages in order, finished ones skipped,
    /// interrupted ones resumed; a build record next to the dataset.
    Build(BuildArgs),
    /// Write the deterministic synthetic demo corpus (images, captions, tar shards, bad inputs).
    DemoCorpus(DemoCorpusArgs),
    /// Check the installation: ONNX Runtime library, execution providers, threads.
    Doctor,
    /// Download a URL list (with captions) into WebDataset tar shards and a per-URL status table, an ingest
    /// source: bounded per-host concurrency, retries, opt-outs honoured, every image validated.
    Download(DownloadArgs),
    /// Stage 1: read image sources and caption sets into a validated manifest (samples + rejects).
    Ingest(IngestArgs),
    /// Visual and text tokenizers: fit a patch codebook, train a text tokenizer.
    Tokenizer(TokenizerArgs),
    /// Stage 2: turn every accepted image into K views of visual tokens, captions into text token ids.
    Tokenize(TokenizeArgs),
    /// Stage 3: token parts into zstd Arrow IPC shards and index.json (deterministic, resumable).
    Pack(PackArgs),
    /// Check every shard of a dataset (size, sha256, schema, batches) and its counts; exit 1 naming bad shards.
    Verify(VerifyArgs),
    /// Sizes, splits, compression, visual-code usage and caption lengths of a dataset.
    Inspect(InspectArgs),
    /// Pretrain a BEiT-style encoder by masked image modeling, streaming a packed dataset.
    Train(TrainArgs),
    /// Linear probe of a checkpoint's frozen encoder (vs a randomly initialised one) on the dataset's labels.
    Probe(ProbeArgs),
    /// A checkpoint's pooled features (CLS, mean) of every sample, view and caption, into a Parquet file.
    Embed(EmbedArgs),
    /// Fine-tune a pretraining checkpoint for image classification (layer decay, mixup/CutMix, top-1/top-5,
    /// best checkpoint, exact resume).
    Finetune(FinetuneArgs),
}

impl Cli {
    /// Checks what one flag's parser cannot (combinations of flags), before anything runs: a failure is a usage
    /// error (exit 2), like an invalid value.
    pub fn validate(&self) -> Result<(), String> {
        use crate::commands::tokenizer::TokenizerCommand;
        if let Command::Tokenizer(t) = &self.command {
            if let TokenizerCommand::Fit(a) = &t.command {
                a.config().validate().map_err(|e| {
                    let text = e.to_string();
                    text.strip_prefix("tokenizer fit: ").unwrap_or(&text).to_string()
                })?;
            }
        }
        Ok(())
    }
}

/// `--device`: checked when the command line is parsed (exit 2), kept as written.
pub fn device_arg(s: &str) -> Result<String, String> {
    s.parse::<imglish_train::TorchDevice>()
        .map(|_| s.to_string())
        .map_err(|e| config_reason(&e))
}

/// `--precision`: checked when the command line is parsed (exit 2), kept as written.
pub fn precision_arg(s: &str) -> Result<String, String> {
    s.parse::<imglish_train::Precision>()
        .map(|_| s.to_string())
        .map_err(|e| config_reason(&e))
}

/// `--preset`: one of BEiT's presets or BEiT-3's `beit3-*` names (which model takes which is checked when
/// the model is built).
pub fn preset_arg(s: &str) -> Result<String, String> {
    let beit = imglish_train::PRESETS.iter().map(|p| p.0);
    let beit3 = imglish_train::BEIT3_PRESETS.iter().map(|p| p.0);
    let names: Vec<&str> = beit.chain(beit3).collect();
    if names.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!("unknown preset '{s}' (one of: {})", names.join(", ")))
    }
}

/// A fraction in [0, 1] (`--val-fraction`).
pub fn fraction_arg(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("{f} is not in [0, 1]"))
    }
}

fn config_reason(e: &imglish_train::TrainError) -> String {
    let text = e.to_string();
    text.strip_prefix("invalid configuration: ")
        .unwrap_or(&text)
        .to_string()
}
