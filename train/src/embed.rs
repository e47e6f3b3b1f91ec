//! Features out of a checkpoint: one Parquet row per sample and view (and, for BEiT-3, per caption), with the
//! encoder's CLS output and/or the mean of its patch (or non-padding text) outputs, for a user's own
//! classifier or retrieval index. Evaluation mode, no masks, no randomness: the same checkpoint and dataset give
//! the same file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use imglish_ingest::Resizer;
use imglish_pack::{Dataset, Split, TokenRecord};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::beit3::{load_beit3, Beit3, TextIn};
use crate::config::InputKind;
use crate::data::render_pixels;
use crate::device::TorchDevice;
use crate::error::{Result, TrainError};
use crate::model::{Beit, Input};
use crate::originals::Originals;
use crate::trainer::{check_fit, check_probe_fit, checkpoint_architecture, load_model};

/// Which pooled features a row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// The CLS output.
    Cls,
    /// The mean over patches (texts: over non-padding tokens).
    Mean,
    /// Both columns.
    Both,
}

/// What to embed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedConfig {
    /// Pooled features.
    pub pool: Pool,
    /// Only this split (`None`: both).
    pub split: Option<Split>,
    /// Every stored view (else the centre view, view 0, only).
    pub all_views: bool,
    /// BEiT-3: also a row per caption and per text sample.
    pub texts: bool,
    /// Inputs per forward pass.
    pub batch_size: usize,
    /// Pixel input: the centre view of each original image of this ingest manifest (the one the dataset was made
    /// from) instead of the stored working image's.
    #[serde(default)]
    pub images: Option<PathBuf>,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            pool: Pool::Both,
            split: None,
            all_views: false,
            texts: true,
            batch_size: 64,
            images: None,
        }
    }
}

/// What [`embed`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbedSummary {
    /// Image rows (sample x view).
    pub image_rows: u64,
    /// Text rows (caption or text sample).
    pub text_rows: u64,
    /// Feature width.
    pub dim: i64,
}

enum Model {
    Beit(Beit),
    Beit3(Beit3),
}

struct Row {
    sample_id: u64,
    split: Split,
    kind: &'static str,
    view: Option<u32>,
    caption: Option<u32>,
    label: Option<i32>,
}

#[derive(Default)]
struct Columns {
    rows: Vec<Row>,
    cls: Vec<f32>,
    mean: Vec<f32>,
}

/// Embeds the dataset's samples with the checkpoint's encoder and writes `out` (Parquet: `sample_id`, `split`,
/// `kind` (`image` or `text`), `view`, `caption`, `label`, then `cls` and/or `mean` as fixed-size float32
/// lists). The checkpoint must fit the dataset (checked first). `progress` gets the rows done.
pub fn embed(
    dataset_dir: &Path,
    checkpoint: &Path,
    out: &Path,
    config: &EmbedConfig,
    device: TorchDevice,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<EmbedSummary> {
    if config.batch_size == 0 {
        return Err(TrainError::Config("embed: the batch size must be positive".into()));
    }
    let device = device.resolve()?;
    let dataset = Dataset::open(dataset_dir)?;
    let (model, input) = load_encoder(checkpoint, &dataset, config.images.is_some(), device)?;
    let originals = match &config.images {
        Some(_) if input != InputKind::Pixels => {
            return Err(TrainError::Config(
                "--images needs a pixel-input encoder (this one reads the dataset's tokens)".into(),
            ))
        }
        Some(_) if config.all_views => {
            return Err(TrainError::Config(
                "--images embeds the centre view of each original image; --all-views reads the stored views".into(),
            ))
        }
        Some(dir) => Some(Originals::open(dir, &dataset)?),
        None => None,
    };
    let ctx = Context {
        model: &model,
        config,
        originals: originals.as_ref(),
    };
    let mut cols = Columns::default();
    let mut images: Vec<(Row, Vec<i64>, Vec<f32>)> = Vec::new();
    let mut texts: Vec<(Row, Vec<u32>)> = Vec::new();
    let mut resizer = Resizer::new();
    let mut dim = 0;
    // Progress counts samples read out of the selected split's total.
    let selected = |split: Split| config.split.is_none_or(|s| s == split);
    let total: u64 = dataset
        .shards()
        .iter()
        .filter(|s| selected(s.split))
        .map(|s| s.rows)
        .sum();
    let mut samples = 0u64;
    for (i, shard) in dataset.shards().iter().enumerate() {
        if !selected(shard.split) {
            continue;
        }
        for b in 0..shard.batches as usize {
            for r in dataset.batch_records(i, b)? {
                add_record(&ctx, &r, &mut resizer, &mut images, &mut texts)?;
                samples += 1;
                if images.len() >= config.batch_size {
                    dim = run_images(&model, &mut images, &mut cols, device)?;
                    progress(samples, total);
                }
                if texts.len() >= config.batch_size {
                    dim = run_texts(&model, &mut texts, &mut cols, device)?;
                    progress(samples, total);
                }
            }
        }
    }
    if !images.is_empty() {
        dim = run_images(&model, &mut images, &mut cols, device)?;
    }
    if !texts.is_empty() {
        dim = run_texts(&model, &mut texts, &mut cols, device)?;
    }
    progress(samples, total);
    if cols.rows.is_empty() {
        return Err(TrainError::Dataset {
            path: dataset_dir.to_path_buf(),
            reason: "nothing to embed (no samples in the selected split)".into(),
        });
    }
    write_parquet(out, &cols, dim, config.pool)?;
    let image_rows = cols.rows.iter().filter(|r| r.kind == "image").count() as u64;
    Ok(EmbedSummary {
        image_rows,
        text_rows: cols.rows.len() as u64 - image_rows,
        dim,
    })
}

/// The encoder of `checkpoint` and what it reads, checked against the dataset (stored pixels are not needed
/// when the original images are given).
fn load_encoder(checkpoint: &Path, dataset: &Dataset, originals: bool, device: Device) -> Result<(Model, InputKind)> {
    // A pixel-input encoder reads the stored working images unless the originals are given.
    let stored = |input: InputKind| input == InputKind::Pixels && !originals;
    Ok(match checkpoint_architecture(checkpoint)?.as_str() {
        "beit3" => {
            let (m, run) = load_beit3(checkpoint, device)?;
            let c = &run.model;
            check_probe_fit(
                checkpoint,
                dataset,
                check_fit(dataset, c.grid, c.vocab_size, Some(c.text_vocab_size), stored(c.input)),
            )?;
            (Model::Beit3(m), c.input)
        }
        _ => {
            let (m, run) = load_model(checkpoint, device)?;
            let c = &run.model;
            check_probe_fit(
                checkpoint,
                dataset,
                check_fit(dataset, c.grid, c.vocab_size, None, stored(c.input)),
            )?;
            (Model::Beit(m), c.input)
        }
    })
}

/// What every record is embedded with.
struct Context<'a> {
    model: &'a Model,
    config: &'a EmbedConfig,
    originals: Option<&'a Originals>,
}

fn add_record(
    ctx: &Context<'_>,
    r: &TokenRecord,
    resizer: &mut Resizer,
    images: &mut Vec<(Row, Vec<i64>, Vec<f32>)>,
    texts: &mut Vec<(Row, Vec<u32>)>,
) -> Result<()> {
    let (model, config) = (ctx.model, ctx.config);
    let (input, size, max_text) = match model {
        Model::Beit(m) => (m.config().input, m.config().image_size(), 0),
        Model::Beit3(m) => (
            m.config().input,
            m.config().image_size(),
            m.config().max_text_len() as usize,
        ),
    };
    let views = if config.all_views {
        r.views.len()
    } else {
        r.views.len().min(1)
    };
    for (v, view) in r.views.iter().take(views).enumerate() {
        let pixels = if input == InputKind::Pixels {
            match ctx.originals {
                Some(o) => o.centre_pixels(r.sample_id, size, resizer),
                None => render_pixels(r.pixels.as_deref(), view.crop, view.flip, size, resizer),
            }
            .map_err(|reason| TrainError::Sample {
                sample_id: r.sample_id,
                reason,
            })?
        } else {
            Vec::new()
        };
        let row = Row {
            sample_id: r.sample_id,
            split: r.split,
            kind: "image",
            view: Some(v as u32),
            caption: None,
            label: r.label,
        };
        images.push((row, view.tokens.iter().map(|&t| i64::from(t)).collect(), pixels));
    }
    if matches!(model, Model::Beit3(_)) && config.texts {
        for (c, caption) in r.captions.iter().enumerate() {
            if caption.is_empty() {
                continue;
            }
            let mut t = caption.clone();
            if t.len() > max_text {
                let last = t[t.len() - 1];
                t.truncate(max_text);
                t[max_text - 1] = last;
            }
            let row = Row {
                sample_id: r.sample_id,
                split: r.split,
                kind: "text",
                view: None,
                caption: Some(c as u32),
                label: r.label,
            };
            texts.push((row, t));
        }
    }
    Ok(())
}

/// Appends the pooled features `x` (`[B, L, dim]`, CLS first) of `rows`, averaging over `keep` (`[B, L]`, the
/// positions that count for the mean).
fn push(cols: &mut Columns, rows: Vec<Row>, x: &Tensor, keep: &Tensor) -> Result<i64> {
    let x = x.to_kind(Kind::Float).to_device(Device::Cpu);
    let keep = keep.to_kind(Kind::Float).to_device(Device::Cpu).unsqueeze(-1);
    let cls = x.select(1, 0).contiguous();
    let mean = ((&x * &keep).sum_dim_intlist(1, false, Kind::Float) / keep.sum_dim_intlist(1, false, Kind::Float))
        .contiguous();
    let dim = x.size()[2];
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        Vec::<f32>::try_from(t.view(-1)).map_err(|e| TrainError::Torch {
            context: "embed: reading features".into(),
            source: e,
        })
    };
    cols.cls.extend(flat(&cls)?);
    cols.mean.extend(flat(&mean)?);
    cols.rows.extend(rows);
    Ok(dim)
}

fn run_images(
    model: &Model,
    batch: &mut Vec<(Row, Vec<i64>, Vec<f32>)>,
    cols: &mut Columns,
    device: Device,
) -> Result<i64> {
    let items = std::mem::take(batch);
    let b = items.len() as i64;
    let (config_input, n, [h, w]) = match model {
        Model::Beit(m) => (m.config().input, m.config().num_patches(), m.config().image_size()),
        Model::Beit3(m) => (m.config().input, m.config().num_patches(), m.config().image_size()),
    };
    let input = match config_input {
        InputKind::Tokens => {
            let ids: Vec<i64> = items.iter().flat_map(|i| i.1.iter().copied()).collect();
            Input::Tokens(Tensor::from_slice(&ids).view([b, n]).to_device(device))
        }
        InputKind::Pixels => {
            let px: Vec<f32> = items.iter().flat_map(|i| i.2.iter().copied()).collect();
            Input::Pixels(Tensor::from_slice(&px).view([b, 3, h, w]).to_device(device))
        }
    };
    let x = tch::no_grad(|| match model {
        Model::Beit(m) => m.features(&input, None, None),
        Model::Beit3(m) => {
            m.encode(
                Some(&crate::beit3::ImageIn {
                    input: &input,
                    mask: None,
                }),
                None,
                None,
            )
            .x
        }
    });
    let keep = Tensor::ones([b, n + 1], (Kind::Float, Device::Cpu));
    let _ = keep.narrow(1, 0, 1).fill_(0.0);
    push(cols, items.into_iter().map(|i| i.0).collect(), &x, &keep)
}

fn run_texts(model: &Model, batch: &mut Vec<(Row, Vec<u32>)>, cols: &mut Columns, device: Device) -> Result<i64> {
    let Model::Beit3(m) = model else {
        batch.clear();
        return Ok(0);
    };
    let items = std::mem::take(batch);
    let b = items.len() as i64;
    let len = items.iter().map(|i| i.1.len()).max().unwrap_or(1);
    let (mut ids, mut pad) = (Vec::new(), Vec::new());
    for (_, t) in &items {
        for k in 0..len {
            ids.push(i64::from(t.get(k).copied().unwrap_or(0)));
            pad.push(k >= t.len());
        }
    }
    let ids = Tensor::from_slice(&ids).view([b, len as i64]).to_device(device);
    let padding = Tensor::from_slice(&pad).view([b, len as i64]).to_device(device);
    let x = tch::no_grad(|| {
        m.encode(
            None,
            Some(&TextIn {
                ids: &ids,
                padding: Some(&padding),
            }),
            None,
        )
        .x
    });
    let keep = padding.logical_not();
    push(cols, items.into_iter().map(|i| i.0).collect(), &x, &keep)
}

fn write_parquet(out: &Path, cols: &Columns, dim: i64, pool: Pool) -> Result<()> {
    let io = |e: std::io::Error| TrainError::Io {
        path: out.to_path_buf(),
        source: e,
    };
    let bad = |e: String| TrainError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let rows = &cols.rows;
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = |values: &[f32]| -> Result<ArrayRef> {
        let a = FixedSizeListArray::try_new(
            item.clone(),
            dim as i32,
            Arc::new(Float32Array::from(values.to_vec())),
            None,
        )
        .map_err(|e| bad(e.to_string()))?;
        Ok(Arc::new(a))
    };
    let mut fields = vec![
        Field::new("sample_id", DataType::UInt64, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("view", DataType::UInt32, true),
        Field::new("caption", DataType::UInt32, true),
        Field::new("label", DataType::Int32, true),
    ];
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(rows.iter().map(|r| r.sample_id).collect::<Vec<_>>())),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.split.name()).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(rows.iter().map(|r| r.kind).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(rows.iter().map(|r| r.view).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(rows.iter().map(|r| r.caption).collect::<Vec<_>>())),
        Arc::new(Int32Array::from(rows.iter().map(|r| r.label).collect::<Vec<_>>())),
    ];
    let list_type = DataType::FixedSizeList(item.clone(), dim as i32);
    if matches!(pool, Pool::Cls | Pool::Both) {
        fields.push(Field::new("cls", list_type.clone(), false));
        arrays.push(list(&cols.cls)?);
    }
    if matches!(pool, Pool::Mean | Pool::Both) {
        fields.push(Field::new("mean", list_type, false));
        arrays.push(list(&cols.mean)?);
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(|e| bad(e.to_string()))?;
    let tmp = out.with_extension("parquet.tmp");
    let file = File::create(&tmp).map_err(io)?;
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).map_err(|e| bad(e.to_string()))?;
    w.write(&batch).map_err(|e| bad(e.to_string()))?;
    let file = w.into_inner().map_err(|e| bad(e.to_string()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, out).map_err(io)?;
    Ok(())
}
