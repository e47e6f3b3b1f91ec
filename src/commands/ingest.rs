use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use imglish_ingest::{
    ingest, CsvHeader, IngestConfig, JoinOn, LabelMode, ParquetColumns, TextOptions, ValidationLimits,
};

use crate::output::{BarProgress, Output};

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Image sources: directories (recursive), WebDataset tar shards, Parquet files with image bytes.
    #[arg(long, num_args = 1.., value_name = "SRC", required_unless_present = "texts")]
    pub images: Vec<PathBuf>,

    /// Text-only corpora: plain text (one document per line), .jsonl (see --text-field), .parquet (see
    /// --text-column). Documents go to texts.parquet; empty, oversized, non-UTF-8 and duplicate ones are rejects.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub texts: Vec<PathBuf>,

    /// The JSONL field holding each document.
    #[arg(long, default_value = "text")]
    pub text_field: String,

    /// The Parquet column holding each document.
    #[arg(long, default_value = "text")]
    pub text_column: String,

    /// Reject documents longer than this many bytes (long documents within it are cut into segments at
    /// tokenize time, not dropped).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_text_bytes: usize,

    /// Caption sets: COCO captions .json, .jsonl, .csv, .tsv, .parquet.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub captions: Vec<PathBuf>,

    /// Output directory of the manifest.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Fraction of samples in the validation split (decided by hashing the key with --seed).
    #[arg(long, default_value_t = 0.05, value_name = "F", value_parser = crate::cli::fraction_arg)]
    pub val_fraction: f64,

    /// Seed of the split assignment.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Where labels come from.
    #[arg(long, value_enum, default_value_t = Labels::Source)]
    pub labels: Labels,

    /// How caption rows are matched to images.
    #[arg(long, value_enum, default_value_t = Join::Path)]
    pub join_on: Join,

    /// Whether CSV/TSV caption files start with a header row.
    #[arg(long, value_enum, default_value_t = Header::Auto)]
    pub csv_header: Header,

    /// Reject images that have no caption.
    #[arg(long)]
    pub require_captions: bool,

    #[command(flatten)]
    pub image: ImageLimitArgs,

    /// Reject files larger than this many bytes.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_bytes: u64,

    /// Also decode every image fully to catch corrupt pixel data.
    #[arg(long)]
    pub full_decode: bool,

    /// Parquet sources: the image column (struct {bytes, path} or binary).
    #[arg(long, default_value = "image")]
    pub image_column: String,

    /// Parquet sources: a caption column (string or list of strings).
    #[arg(long)]
    pub caption_column: Option<String>,

    /// Parquet sources: an integer label column.
    #[arg(long)]
    pub label_column: Option<String>,

    /// Follow symbolic links to files outside a directory source (links to directories are never followed).
    #[arg(long)]
    pub follow_symlinks: bool,

    /// Succeed even when nothing is accepted (by default an empty manifest is an error, exit 1).
    #[arg(long)]
    pub allow_empty: bool,

    /// Replace a manifest in --out made from other inputs or settings (refused by default).
    #[arg(long)]
    pub overwrite: bool,
}

/// The image checks shared by `ingest` and `download`.
#[derive(Debug, Clone, Copy, Args)]
pub struct ImageLimitArgs {
    /// Reject images with more pixels than this.
    #[arg(long, default_value_t = 178_956_970)]
    pub max_pixels: u64,

    /// Reject images whose shorter side is below this.
    #[arg(long, default_value_t = 32)]
    pub min_side: u32,

    /// Reject images whose aspect ratio (long/short) exceeds this.
    #[arg(long, default_value_t = 10.0)]
    pub max_aspect: f64,
}

impl ImageLimitArgs {
    /// The validation limits with this file-size cap and full decoding on or off.
    pub fn limits(&self, max_bytes: u64, full_decode: bool) -> ValidationLimits {
        ValidationLimits {
            max_pixels: self.max_pixels,
            min_side: self.min_side,
            max_aspect: self.max_aspect,
            max_bytes,
            full_decode,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Labels {
    /// Labels carried by the source (tar `key.cls`, a Parquet label column).
    Source,
    /// The top-level folder under a directory source (ImageFolder layout).
    FromFolders,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Join {
    /// Relative path (class/img.jpg) or tar member / Parquet path.
    Path,
    /// File name without folder and extension.
    Stem,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Header {
    /// Detect from the first row.
    Auto,
    /// The first row is a header.
    Yes,
    /// No header: caption, then path.
    No,
}

pub fn run(args: &IngestArgs, out: &Output) -> anyhow::Result<()> {
    let _lock = super::lock::lock_dir(&args.out)?;
    if args.follow_symlinks {
        tracing::warn!(
            "--follow-symlinks: files reached through symbolic links that leave the source folders are read; the \
             manifest records the link, so later stages (tokenize, finetune --images) read whatever the link points \
             to then: keep the targets in place and unchanged until the dataset is built"
        );
    }
    let texts = TextOptions {
        field: args.text_field.clone(),
        column: args.text_column.clone(),
        max_bytes: args.max_text_bytes,
    };
    let config = IngestConfig::try_new_with_texts(args.images.clone(), args.texts.clone(), texts)?
        .with_captions(args.captions.clone())
        .try_with_val_fraction(args.val_fraction)?
        .with_seed(args.seed)
        .with_labels(match args.labels {
            Labels::Source => LabelMode::Source,
            Labels::FromFolders => LabelMode::FromFolders,
        })
        .with_join_on(match args.join_on {
            Join::Path => JoinOn::Path,
            Join::Stem => JoinOn::Stem,
        })
        .with_csv_header(match args.csv_header {
            Header::Auto => CsvHeader::Auto,
            Header::Yes => CsvHeader::Yes,
            Header::No => CsvHeader::No,
        })
        .with_require_captions(args.require_captions)
        .with_follow_symlinks(args.follow_symlinks)
        .try_with_limits(args.image.limits(args.max_bytes, args.full_decode))?
        .with_parquet_columns(ParquetColumns {
            image: args.image_column.clone(),
            caption: args.caption_column.clone(),
            label: args.label_column.clone(),
        });
    check_out_dir(args, &config)?;
    let bar = out.spinner("ingesting");
    let summary = ingest(&config, &args.out, &BarProgress(&bar))
        .with_context(|| format!("ingest into {} failed", args.out.display()))?;
    bar.finish_and_clear();
    let c = &summary.counts;
    let reasons: Vec<String> = c.by_reason.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    let text = format!(
        "ingest: {} seen, {} accepted ({} train, {} val{}), {} rejected{}\n  {} images without captions, {} caption entries without images, {} classes\n  manifest: {} ({:.1}s, {:.0} items/s)",
        c.seen,
        c.accepted,
        c.splits.get("train").copied().unwrap_or(0),
        c.splits.get("val").copied().unwrap_or(0),
        if c.texts > 0 { format!("; {} text documents", c.texts) } else { String::new() },
        c.rejected,
        if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) },
        c.images_without_captions,
        c.captions_without_images,
        c.classes,
        args.out.join("samples.parquet").display(),
        summary.wall_seconds,
        c.seen as f64 / summary.wall_seconds.max(1e-9),
    );
    let mut json = serde_json::to_value(&summary)?;
    json["event"] = "ingest".into();
    json["out"] = serde_json::to_value(&args.out)?;
    out.summary(&text, &json);
    check_outcome(args, c)
}

/// Files an ingest writes into its output folder.
const MANIFEST_FILES: [&str; 5] = [
    "ingest.json",
    "samples.parquet",
    "rejects.parquet",
    "classes.json",
    "texts.parquet",
];

/// Refuses to write into a folder that holds a manifest made from other inputs or settings, or files that are
/// not a manifest's, unless `--overwrite`. The same command again (same inputs, settings and working directory)
/// simply redoes it.
fn check_out_dir(args: &IngestArgs, config: &IngestConfig) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(&args.out) else {
        return Ok(());
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| !n.starts_with('.'))
        .collect();
    if names.is_empty() || args.overwrite {
        return Ok(());
    }
    let dir = args.out.display();
    let Ok(bytes) = std::fs::read(args.out.join("ingest.json")) else {
        if let Some(other) = names.iter().find(|n| !MANIFEST_FILES.contains(&n.as_str())) {
            anyhow::bail!(
                "{dir} is not empty (holds {other}) and holds no imglish manifest; choose another --out (or pass \
                 --overwrite to write into it anyway)"
            );
        }
        return Ok(()); // an interrupted ingest: redo it
    };
    let old: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let new = serde_json::to_value(config)?;
    let mut differs: Vec<String> = Vec::new();
    if let (Some(a), Some(b)) = (old["config"].as_object(), new.as_object()) {
        for key in a.keys().chain(b.keys()) {
            if a.get(key) != b.get(key) && !differs.contains(key) {
                differs.push(key.clone());
            }
        }
    } else {
        differs.push("config".into());
    }
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    if old["base_dir"].as_str().is_some_and(|b| b != cwd) {
        differs.push("working directory (relative source paths)".into());
    }
    if !differs.is_empty() {
        anyhow::bail!(
            "{dir} holds a manifest made from other inputs or settings ({} differ); pass --overwrite to replace \
             it, or choose another --out",
            differs.join(", ")
        );
    }
    Ok(())
}

/// How to fix the usual cause of a reject reason that takes a whole source (`out`: the manifest folder, whose
/// rejects name the `.tar`/`.parquet` files met inside folder sources).
fn hint(reason: &str, out: &std::path::Path) -> String {
    match reason {
        "unsafe-path" => {
            " (symbolic links that lead out of the source folder are refused: pass --follow-symlinks to read them)"
                .into()
        }
        "unsupported-format" => {
            let tables = nested_tables(out);
            let which = if tables.is_empty() {
                "other .tar or .parquet files".to_string()
            } else {
                format!("the .tar and .parquet files found ({})", tables)
            };
            format!(
                " (a folder source reads image files, or the .tar shards of a folder that holds shards and no \
                 images; pass {which} to --images themselves)"
            )
        }
        "bad-record" => " (check the field names: --text-field, or the caption file's columns)".into(),
        _ => String::new(),
    }
}

/// The `.tar` and `.parquet` files that folder sources held and rejected as `unsupported-format`: the first
/// three paths and how many more.
fn nested_tables(out: &std::path::Path) -> String {
    let Ok(rejects) = imglish_ingest::Manifest::rejects(out) else {
        return String::new();
    };
    let paths: Vec<String> = rejects
        .iter()
        .filter(|r| r.reason == "unsupported-format")
        .filter(|r| {
            let k = r.key.to_ascii_lowercase();
            k.ends_with(".tar") || k.ends_with(".parquet")
        })
        .map(|r| std::path::Path::new(&r.source).join(&r.key).display().to_string())
        .collect();
    match paths.len() {
        0 => String::new(),
        n if n <= 3 => paths.join(", "),
        n => format!("{} and {} more", paths[..3].join(", "), n - 3),
    }
}

/// A source most of whose items were rejected for one reason (the run as a whole may look fine: other sources
/// were read) gets a warning naming it, with the reason's hint.
fn warn_per_source(out: &std::path::Path) {
    let record: serde_json::Value = std::fs::read(out.join("ingest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let Ok(rejects) = imglish_ingest::Manifest::rejects(out) else {
        return;
    };
    for source in record["sources"].as_array().into_iter().flatten() {
        let (Some(path), Some(items)) = (source["path"].as_str(), source["items"].as_u64()) else {
            continue;
        };
        let mut by_reason: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
        for r in rejects.iter().filter(|r| r.source == path) {
            *by_reason.entry(r.reason.as_str()).or_default() += 1;
        }
        if let Some((reason, n)) = by_reason.into_iter().max_by_key(|(_, n)| *n) {
            if n * 2 > items {
                tracing::warn!(
                    "{n} of {items} items of source {path} were rejected as {reason}{}",
                    hint(reason, out)
                );
            }
        }
    }
}

/// An ingest that accepted nothing is a failure unless `--allow-empty`; `--labels from-folders` that found no
/// class is one too; a reason that rejects most of what was seen gets a warning.
fn check_outcome(args: &IngestArgs, c: &imglish_ingest::IngestCounts) -> anyhow::Result<()> {
    let top = c.by_reason.iter().max_by_key(|(_, n)| **n);
    if c.accepted == 0 && c.texts == 0 && !args.allow_empty {
        let why = top.map_or(String::new(), |(r, n)| {
            format!("; most rejects: {r} ({n}){}", hint(r, &args.out))
        });
        anyhow::bail!(
            "ingest accepted nothing: {} seen, {} rejected{why}. The manifest in {} is empty; pass --allow-empty \
             to accept that",
            c.seen,
            c.rejected,
            args.out.display()
        );
    }
    if matches!(args.labels, Labels::FromFolders) && c.classes == 0 && c.accepted > 0 {
        anyhow::bail!(
            "--labels from-folders found no class folders: images must sit in SRC/CLASS/..., one folder per class"
        );
    }
    let mut warned = false;
    if let Some((r, n)) = top {
        if *n * 2 > c.seen && c.accepted > 0 {
            tracing::warn!("{n} of {} items were rejected as {r}{}", c.seen, hint(r, &args.out));
            warned = true;
        }
    }
    if !warned && c.accepted > 0 {
        warn_per_source(&args.out);
    }
    if !args.captions.is_empty() && c.accepted > 0 && c.images_without_captions == c.accepted {
        tracing::warn!(
            "none of the {} accepted images got a caption from --captions ({} caption rows rejected as bad-record, {} \
             caption entries name no accepted image): check the caption file's field names and image paths \
             (rejects.parquet has the first reasons)",
            c.accepted,
            c.by_reason.get("bad-record").copied().unwrap_or(0),
            c.captions_without_images
        );
    }
    Ok(())
}
