//! The trainer's batch assembly for other front ends (the Python package): samples in, plain little-endian
//! arrays out, with exactly the views, masks, sample kinds and captions that `imglish train` uses for the same
//! `(seed, epoch, sample_id)`, because it is the same code.

use imglish_pack::{Dataset, Sample, Split, StreamState};

use crate::beit3::{beit3_fixed_set, Beit3Batch, Beit3Batcher, Beit3Builder, Beit3TrainConfig, SampleKind};
use crate::config::InputKind;
use crate::data::{Batch, Batcher, BeitBatcher, Builder, FixedSet};
use crate::error::Result;
use crate::trainer::TrainConfig;

/// One named array of a batch: a dtype (`int64`, `uint64`, `bool`, `float32`), a row-major shape and its
/// little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// The name (`tokens`, `image.mask`, `pair.text`, ...).
    pub name: String,
    /// The element type, as numpy names it.
    pub dtype: &'static str,
    /// The shape.
    pub shape: Vec<usize>,
    /// The elements, little-endian, row-major.
    pub bytes: Vec<u8>,
}

impl Array {
    fn i64(name: &str, shape: Vec<usize>, v: &[i64]) -> Array {
        Array {
            name: name.into(),
            dtype: "int64",
            shape,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn u64(name: &str, v: &[u64]) -> Array {
        Array {
            name: name.into(),
            dtype: "uint64",
            shape: vec![v.len()],
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn bool(name: &str, shape: Vec<usize>, v: &[bool]) -> Array {
        Array {
            name: name.into(),
            dtype: "bool",
            shape,
            bytes: v.iter().map(|&b| u8::from(b)).collect(),
        }
    }

    fn f32(name: &str, shape: Vec<usize>, v: &[f32]) -> Array {
        Array {
            name: name.into(),
            dtype: "float32",
            shape,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// A finished batch: its arrays, and the samples that could not be used (id, reason).
#[derive(Debug, Clone, PartialEq)]
pub struct MadeBatch {
    /// The arrays.
    pub arrays: Vec<Array>,
    /// Samples skipped (stored pixels that do not decode, a text too long for the vocabulary, ...).
    pub skipped: Vec<(u64, String)>,
    /// Samples in the batch.
    pub len: usize,
}

enum Inner {
    Beit(Box<BeitBatcher>, TrainConfig),
    Beit3(Box<Beit3Batcher>, Beit3TrainConfig),
}

/// Builds batches as the trainer does, for a BEiT or a BEiT-3 configuration.
///
/// BEiT batches hold `sample_ids` `[B]`, `labels` `[B]` (-1: none), `tokens` `[B, N]` (the view's visual
/// tokens: the MIM targets, and the input of a token-input model), `mask` `[B, N]` and, for pixel input,
/// `pixels` `[B, 3, H, W]`. BEiT-3 batches hold, for each kind `K` in `image`, `text`, `pair` that has samples,
/// `K.ids`, and for kinds with an image `K.tokens`, `K.mask` (and `K.pixels`), for kinds with a text `K.text`
/// (masked input ids, padded), `K.padding`, `K.predict` and `K.targets` (original ids at the predicted
/// positions, row-major).
pub struct BatchMaker {
    inner: Inner,
}

impl std::fmt::Debug for BatchMaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let model = match self.inner {
            Inner::Beit(..) => "beit",
            Inner::Beit3(..) => "beit3",
        };
        f.debug_struct("BatchMaker").field("model", &model).finish()
    }
}

impl BatchMaker {
    /// For a BEiT run.
    pub fn beit(config: &TrainConfig) -> BatchMaker {
        let builder = Builder::new(config.model.clone(), config.masking.clone(), config.seed);
        BatchMaker {
            inner: Inner::Beit(Box::new(BeitBatcher::new(builder)), config.clone()),
        }
    }

    /// For a BEiT-3 run.
    pub fn beit3(config: &Beit3TrainConfig) -> BatchMaker {
        let builder = Beit3Builder {
            config: config.model.clone(),
            objective: config.objective.clone(),
            seed: config.seed,
        };
        BatchMaker {
            inner: Inner::Beit3(Box::new(Beit3Batcher::new(builder)), config.clone()),
        }
    }

    /// Adds a sample of `epoch` to the pending batch.
    pub fn push(&mut self, sample: Sample, epoch: u64) {
        match &mut self.inner {
            Inner::Beit(b, _) => b.push(sample, epoch),
            Inner::Beit3(b, _) => b.push(sample, epoch),
        }
    }

    /// The validation set `imglish train` evaluates on: up to `limit` samples of the val split in dataset order,
    /// with its fixed masks (and kinds, captions, centre views), in batches of `batch_size`.
    pub fn validation(&self, dataset: &Dataset, batch_size: usize, limit: usize) -> Result<Vec<MadeBatch>> {
        match &self.inner {
            Inner::Beit(_, config) => {
                let builder = Builder::new(config.model.clone(), config.masking.clone(), config.seed);
                let set = FixedSet::load(dataset, Split::Val, &builder, batch_size, limit, false)?;
                Ok(set.batches.into_iter().map(|b| beit_arrays(b, config, None)).collect())
            }
            Inner::Beit3(_, config) => {
                let builder = Beit3Builder {
                    config: config.model.clone(),
                    objective: config.objective.clone(),
                    seed: config.seed,
                };
                let (batches, _) = beit3_fixed_set(dataset, Split::Val, &builder, batch_size, limit)?;
                Ok(batches.into_iter().map(|b| beit3_arrays(b, config)).collect())
            }
        }
    }

    /// Takes the pending batch.
    pub fn take(&mut self) -> MadeBatch {
        match &mut self.inner {
            Inner::Beit(b, config) => {
                let skip = b.first_skip();
                beit_arrays(b.take(StreamState::default()), config, skip)
            }
            Inner::Beit3(b, config) => beit3_arrays(b.take(StreamState::default()), config),
        }
    }
}

fn beit_arrays(batch: Batch, config: &TrainConfig, first_skip: Option<(u64, String)>) -> MadeBatch {
    let b = batch.len();
    let n = config.model.num_patches() as usize;
    let mut arrays = vec![
        Array::u64("sample_ids", &batch.sample_ids),
        Array::i64("labels", vec![b], &batch.labels),
        Array::i64("tokens", vec![b, n], &batch.targets),
        Array::bool("mask", vec![b, n], &batch.mask),
    ];
    if let Some(px) = batch.pixels() {
        let [h, w] = config.model.image_size();
        arrays.push(Array::f32("pixels", vec![b, 3, h as usize, w as usize], px));
    }
    let mut skipped = batch.skipped;
    // Text samples are passed over by BEiT: report the first one when nothing else was skipped.
    if skipped.is_empty() {
        skipped.extend(first_skip);
    }
    MadeBatch {
        arrays,
        skipped,
        len: b,
    }
}

fn beit3_arrays(batch: Beit3Batch, config: &Beit3TrainConfig) -> MadeBatch {
    let np = config.model.num_patches() as usize;
    let pad = config.objective.text.pad_id();
    let mut arrays = Vec::new();
    for kind in SampleKind::ALL {
        let g = &batch.groups[kind as usize];
        let n = g.ids.len();
        if n == 0 {
            continue;
        }
        let name = |field: &str| format!("{}.{field}", kind.name());
        arrays.push(Array::u64(&name("ids"), &g.ids));
        if kind.has_image() {
            arrays.push(Array::i64(&name("tokens"), vec![n, np], &g.tokens));
            arrays.push(Array::bool(&name("mask"), vec![n, np], &g.image_mask));
            if config.model.input == InputKind::Pixels {
                let [h, w] = config.model.image_size();
                arrays.push(Array::f32(
                    &name("pixels"),
                    vec![n, 3, h as usize, w as usize],
                    &g.pixels,
                ));
            }
        }
        if kind.has_text() {
            let t = g.text_arrays(pad);
            arrays.push(Array::i64(&name("text"), vec![n, t.len], &t.ids));
            arrays.push(Array::bool(&name("padding"), vec![n, t.len], &t.padding));
            arrays.push(Array::bool(&name("predict"), vec![n, t.len], &t.predict));
            arrays.push(Array::i64(&name("targets"), vec![t.targets.len()], &t.targets));
        }
    }
    MadeBatch {
        len: batch.len(),
        arrays,
        skipped: batch.skipped,
    }
}
