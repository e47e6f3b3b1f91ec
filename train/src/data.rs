//! The data path: pack's streaming reader on a background thread, turned into batches of model input, targets
//! and masks with bounded prefetch; and fixed evaluation sets (centre view, fixed masks).

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use imglish_ingest::{decode_rgb, render_view, DecodeOptions, Filter, Resizer, ViewParams};
use imglish_pack::{
    Dataset, Partition, Sample, SampleKind, Shuffle, Split, StreamOptions, StreamState, TokenRecord, ViewRecord,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::{InputKind, ModelConfig};
use crate::error::{Result, TrainError};
use crate::masking::Masking;
use crate::originals::Originals;
use image::RgbImage;

/// Samples read without a usable one, at the start of a run, after which the loader warns (the error comes only
/// after a whole epoch: a dataset may hold a long run of samples this model skips, such as texts for BEiT).
const EARLY_WARNING: u64 = 4096;
use crate::model::Input;

/// The `epoch` key of evaluation masks (never a training epoch).
const EVAL_EPOCH: u64 = u64::MAX;

/// A batch as the loader builds it (plain vectors; tensors are made on the training thread).
#[derive(Debug, Clone)]
pub struct Batch {
    /// The samples, in stream order.
    pub sample_ids: Vec<u64>,
    /// Class labels (`-1` for none).
    pub labels: Vec<i64>,
    /// Token ids `[B * N]` (token input) or normalised pixels `[B * 3 * H * W]` (pixel input).
    input: BatchInput,
    /// The views' tokens `[B * N]`: the prediction targets.
    pub targets: Vec<i64>,
    /// `[B * N]`, `true` = masked.
    pub mask: Vec<bool>,
    /// The stream's state after this batch (what a checkpoint records).
    pub state: StreamState,
    /// Samples skipped while building this batch (bad stored pixels), with the reason.
    pub skipped: Vec<(u64, String)>,
}

#[derive(Debug, Clone)]
enum BatchInput {
    Tokens,
    Pixels(Vec<f32>),
}

/// A batch on the device.
#[derive(Debug)]
pub struct DeviceBatch {
    /// Model input.
    pub input: Input,
    /// `[B, N]` bool.
    pub mask: Tensor,
    /// Targets of the masked positions, `[M]` int64 in row-major `(b, n)` order.
    pub targets: Tensor,
    /// Labels `[B]` int64 (`-1`: none).
    pub labels: Tensor,
}

impl Batch {
    /// Samples in the batch.
    pub fn len(&self) -> usize {
        self.sample_ids.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.sample_ids.is_empty()
    }

    /// The normalised pixels `[B * 3 * H * W]` of a pixel-input batch.
    pub fn pixels(&self) -> Option<&[f32]> {
        match &self.input {
            BatchInput::Pixels(p) => Some(p),
            BatchInput::Tokens => None,
        }
    }

    /// The tensors on `device`.
    pub fn to_device(&self, config: &ModelConfig, device: Device) -> DeviceBatch {
        let b = self.len() as i64;
        let n = config.num_patches();
        let input = match &self.input {
            BatchInput::Tokens => Input::Tokens(Tensor::from_slice(&self.targets).view([b, n]).to_device(device)),
            BatchInput::Pixels(p) => {
                let [h, w] = config.image_size();
                Input::Pixels(Tensor::from_slice(p).view([b, 3, h, w]).to_device(device))
            }
        };
        let masked: Vec<i64> = self
            .targets
            .iter()
            .zip(&self.mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect();
        DeviceBatch {
            input,
            mask: Tensor::from_slice(&self.mask).view([b, n]).to_device(device),
            targets: Tensor::from_slice(&masked).to_device(device),
            labels: Tensor::from_slice(&self.labels).to_device(device),
        }
    }
}

/// Turns samples into batches: masks, targets, and (pixel input) the view rebuilt from the stored working image
/// or cut afresh from the original image.
#[derive(Clone)]
pub(crate) struct Builder {
    pub(crate) config: ModelConfig,
    pub(crate) masking: Masking,
    pub(crate) seed: u64,
    /// Read the stored tokens (masked-modelling targets, token input). A pixel-input classifier does not: its
    /// grid may differ from the dataset's, and it masks nothing.
    pub(crate) read_tokens: bool,
    /// Pixel input cut from the original images instead of the stored working image.
    pub(crate) originals: Option<Arc<Originals>>,
}

struct Pending {
    ids: Vec<u64>,
    labels: Vec<i64>,
    targets: Vec<i64>,
    mask: Vec<bool>,
    pixels: Vec<f32>,
    skipped: Vec<(u64, String)>,
}

impl Builder {
    /// A builder of masked-modelling batches (stored tokens; pixels from the stored working image).
    pub(crate) fn new(config: ModelConfig, masking: Masking, seed: u64) -> Builder {
        Builder {
            config,
            masking,
            seed,
            read_tokens: true,
            originals: None,
        }
    }

    fn pending(&self) -> Pending {
        Pending {
            ids: Vec::new(),
            labels: Vec::new(),
            targets: Vec::new(),
            mask: Vec::new(),
            pixels: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Adds one view of one sample; a sample whose pixels cannot be rebuilt is recorded in `skipped`.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        p: &mut Pending,
        resizer: &mut Resizer,
        sample_id: u64,
        epoch: u64,
        tokens: &[u16],
        crop: [u32; 4],
        flip: bool,
        pixels: Option<&[u8]>,
        label: Option<i32>,
    ) {
        if !self.read_tokens {
            match self.classifier_pixels(resizer, sample_id, epoch, crop, flip, pixels) {
                Ok(px) => p.pixels.extend(px),
                Err(reason) => return p.skipped.push((sample_id, reason)),
            }
            p.ids.push(sample_id);
            p.labels.push(label.map_or(-1, i64::from));
            p.mask
                .extend(std::iter::repeat_n(false, self.config.num_patches() as usize));
            return;
        }
        if tokens.len() != self.config.num_patches() as usize {
            p.skipped.push((
                sample_id,
                format!(
                    "{} tokens, the model's grid has {}",
                    tokens.len(),
                    self.config.num_patches()
                ),
            ));
            return;
        }
        if self.config.input == InputKind::Pixels {
            match render_pixels(pixels, crop, flip, self.config.image_size(), resizer) {
                Ok(px) => p.pixels.extend(px),
                Err(reason) => {
                    p.skipped.push((sample_id, reason));
                    return;
                }
            }
        }
        p.ids.push(sample_id);
        p.labels.push(label.map_or(-1, i64::from));
        p.targets.extend(tokens.iter().map(|&t| i64::from(t)));
        p.mask.extend(self.masking.mask(self.seed, epoch, sample_id));
    }

    /// A classifier's pixel input: from the original image when the builder has them, else from the stored one.
    fn classifier_pixels(
        &self,
        resizer: &mut Resizer,
        sample_id: u64,
        epoch: u64,
        crop: [u32; 4],
        flip: bool,
        pixels: Option<&[u8]>,
    ) -> Result<Vec<f32>, String> {
        let Some(originals) = &self.originals else {
            return render_pixels(pixels, crop, flip, self.config.image_size(), resizer);
        };
        if epoch == EVAL_EPOCH {
            return originals.centre_pixels(sample_id, self.config.image_size(), resizer);
        }
        let side = square_side(self.config.image_size())?;
        Ok(normalize(&originals.view(
            sample_id,
            self.seed,
            Some(epoch),
            side,
            resizer,
        )?))
    }

    fn finish(&self, p: Pending, state: StreamState) -> Batch {
        Batch {
            input: if self.config.input == InputKind::Pixels {
                BatchInput::Pixels(p.pixels)
            } else {
                BatchInput::Tokens
            },
            sample_ids: p.ids,
            labels: p.labels,
            targets: p.targets,
            mask: p.mask,
            state,
            skipped: p.skipped,
        }
    }
}

/// A view's `[3, H, W]` model input: the crop box from the stored working image, bicubic to the model's image
/// size, mirrored if the view is, normalised with mean = std = 0.5.
pub(crate) fn render_pixels(
    pixels: Option<&[u8]>,
    crop: [u32; 4],
    flip: bool,
    size: [i64; 2],
    resizer: &mut Resizer,
) -> Result<Vec<f32>, String> {
    let bytes = pixels.ok_or("the dataset has no pixels (pack with --include-pixels)")?;
    let decoded =
        decode_rgb(bytes, &DecodeOptions::default(), 1.0).map_err(|r| format!("stored pixels: {}", r.message))?;
    let side = square_side(size)?;
    let img = render_view(&decoded, &ViewParams { crop, flip }, side, Filter::Bicubic, resizer);
    Ok(normalize(&img))
}

pub(crate) fn square_side([h, w]: [i64; 2]) -> Result<u32, String> {
    if h != w {
        return Err(format!("pixel input needs a square image size, not {h}x{w}"));
    }
    Ok(h as u32)
}

/// `[3, H, W]` planes normalised with mean = std = 0.5.
pub(crate) fn normalize(img: &RgbImage) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) / 255.0 - 0.5) / 0.5;
        }
    }
    out
}

/// Turns streamed samples into batches on the loader thread.
pub(crate) trait Batcher: Send + 'static {
    /// What the loader sends.
    type Batch: Send + 'static;
    /// Adds one sample of `epoch`.
    fn push(&mut self, sample: Sample, epoch: u64);
    /// Samples taken into the pending batch (the batch is sent when this reaches the batch size).
    fn pending(&self) -> usize;
    /// The pending batch, with the stream's state after it.
    fn take(&mut self, state: StreamState) -> Self::Batch;
    /// Why the first sample not taken into the pending batch was skipped, if one was.
    fn first_skip(&self) -> Option<(u64, String)>;
}

/// The BEiT batcher: a [`Builder`] with its pending batch and resizer.
pub(crate) struct BeitBatcher {
    builder: Builder,
    pending: Pending,
    resizer: Resizer,
    /// The first text sample passed over (BEiT trains on images only).
    text_seen: Option<u64>,
    /// Pass over images without a label (fine-tuning a classifier).
    labelled_only: bool,
    /// The first unlabelled image passed over.
    unlabelled_seen: Option<u64>,
}

impl BeitBatcher {
    pub(crate) fn new(builder: Builder) -> BeitBatcher {
        BeitBatcher {
            pending: builder.pending(),
            builder,
            resizer: Resizer::new(),
            text_seen: None,
            labelled_only: false,
            unlabelled_seen: None,
        }
    }

    /// A batcher of labelled images only (classification fine-tuning).
    pub(crate) fn labelled(builder: Builder) -> BeitBatcher {
        BeitBatcher {
            labelled_only: true,
            ..BeitBatcher::new(builder)
        }
    }
}

impl Batcher for BeitBatcher {
    type Batch = Batch;

    fn push(&mut self, s: Sample, epoch: u64) {
        if s.kind == SampleKind::Text {
            self.text_seen.get_or_insert(s.sample_id);
            return;
        }
        if self.labelled_only && s.label.is_none() {
            self.unlabelled_seen.get_or_insert(s.sample_id);
            return;
        }
        self.builder.push(
            &mut self.pending,
            &mut self.resizer,
            s.sample_id,
            epoch,
            &s.tokens,
            s.crop,
            s.flip,
            s.pixels.as_deref(),
            s.label,
        );
    }

    fn pending(&self) -> usize {
        self.pending.ids.len()
    }

    fn take(&mut self, state: StreamState) -> Batch {
        let full = std::mem::replace(&mut self.pending, self.builder.pending());
        self.builder.finish(full, state)
    }

    fn first_skip(&self) -> Option<(u64, String)> {
        let unlabelled = self.unlabelled_seen.map(|id| {
            (
                id,
                "an image without a label: fine-tuning needs labels (ingest with --labels from-folders)".into(),
            )
        });
        self.pending.skipped.first().cloned().or(unlabelled).or_else(|| {
            self.text_seen.map(|id| {
                (
                    id,
                    "a text sample: BEiT trains on images (--model beit3 trains on texts)".into(),
                )
            })
        })
    }
}

/// How the training stream reads the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// Samples per (micro-)batch.
    pub batch_size: usize,
    /// Epoch order.
    pub shuffle: Shuffle,
    /// This process's rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// Batches the loader may hold ready ahead of the trainer.
    pub prefetch: usize,
    /// Skip samples of corrupt shards instead of failing (counted and reported).
    pub skip_corrupt: bool,
}

impl StreamConfig {
    /// Refuses anything but rank 0 of 1: several processes running this trainer would train unrelated models.
    /// Data-parallel training runs on torch.distributed through `python -m imglish.pretrain`.
    pub fn check_single_process(&self) -> Result<()> {
        if self.world_size != 1 || self.rank != 0 {
            return Err(TrainError::Config(format!(
                "rank {} of world size {}: this trainer runs in one process (several would train unrelated \
                 models); data-parallel training runs under torchrun: `torchrun --nproc_per_node N -m \
                 imglish.pretrain ...`",
                self.rank, self.world_size
            )));
        }
        Ok(())
    }
}

/// Batches from a background thread: the training stream, epoch after epoch.
pub struct Loader<B = Batch> {
    rx: Receiver<Result<B>>,
    handle: Option<JoinHandle<()>>,
    waited: Duration,
}

impl<B> std::fmt::Debug for Loader<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader").field("waited", &self.waited).finish()
    }
}

impl<B: Send + 'static> Loader<B> {
    /// Starts streaming the train split from `start` (epochs follow each other; a batch may span two).
    pub(crate) fn spawn<T: Batcher<Batch = B>>(
        dataset: Dataset,
        mut batcher: T,
        seed: u64,
        stream: StreamConfig,
        start: StreamState,
    ) -> Result<Loader<B>> {
        if dataset.index().counts.train == 0 {
            return Err(TrainError::Dataset {
                path: dataset.dir().to_path_buf(),
                reason: "the train split is empty".into(),
            });
        }
        let (tx, rx) = sync_channel(stream.prefetch.max(1));
        let handle = std::thread::Builder::new()
            .name("imglish-train-loader".into())
            .spawn(move || {
                let mut state = start;
                let mut sent_any = false;
                let mut warned = false;
                loop {
                    let options = StreamOptions {
                        split: Some(Split::Train),
                        shuffle: stream.shuffle,
                        seed,
                        partition: Partition::rank(stream.rank, stream.world_size),
                        skip_corrupt: stream.skip_corrupt,
                        ..StreamOptions::default()
                    };
                    let mut samples = match dataset.stream(&options, state) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let epoch = state.epoch;
                    let mut delivered = 0u64;
                    while let Some(sample) = samples.next() {
                        let s: Sample = match sample {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = tx.send(Err(e.into()));
                                return;
                            }
                        };
                        delivered += 1;
                        batcher.push(s, epoch);
                        if !sent_any && !warned && delivered == EARLY_WARNING && batcher.pending() == 0 {
                            // Nothing usable yet: say so within seconds rather than after a whole epoch.
                            warned = true;
                            let why = batcher.first_skip().map_or(String::new(), |(id, why)| {
                                format!(" (the first, sample {id}{}: {why})", in_shard(&dataset, id))
                            });
                            tracing::warn!(
                                "no usable training sample among the first {EARLY_WARNING} read{why}; still reading, \
                                 the run stops with an error if a whole epoch has none"
                            );
                        }
                        if batcher.pending() == stream.batch_size {
                            sent_any = true;
                            if tx.send(Ok(batcher.take(samples.state()))).is_err() {
                                return;
                            }
                        }
                    }
                    if delivered == 0 && state.position == 0 {
                        let _ = tx.send(Err(TrainError::Dataset {
                            path: dataset.dir().to_path_buf(),
                            reason: format!("rank {} of {} gets no training samples", stream.rank, stream.world_size),
                        }));
                        return;
                    }
                    if !sent_any && batcher.pending() == 0 && state.position == 0 {
                        // A whole epoch gave the batcher nothing it could use: fail instead of looping forever.
                        let _ = tx.send(Err(TrainError::Dataset {
                            path: dataset.dir().to_path_buf(),
                            reason: match batcher.first_skip() {
                                Some((id, why)) => format!(
                                    "no usable training sample in a whole epoch ({delivered} read; the first, \
                                     sample {id}{}, was skipped: {why})",
                                    in_shard(&dataset, id)
                                ),
                                None => format!("no usable training sample in a whole epoch ({delivered} read)"),
                            },
                        }));
                        return;
                    }
                    state = samples.state();
                }
            })
            .map_err(|e| TrainError::Io {
                path: "imglish-train-loader".into(),
                source: e,
            })?;
        Ok(Loader {
            rx,
            handle: Some(handle),
            waited: Duration::ZERO,
        })
    }

    /// The next batch (blocks while the loader is behind; the time is counted in [`Loader::waited`]).
    pub fn next_batch(&mut self) -> Result<B> {
        let t = Instant::now();
        let b = self
            .rx
            .recv()
            .map_err(|_| TrainError::Config("the data loader stopped".into()))?;
        self.waited += t.elapsed();
        b
    }

    /// Total time spent waiting for data.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl<B> Drop for Loader<B> {
    fn drop(&mut self) {
        // Closing the channel stops the thread at its next send.
        let (_, dead) = sync_channel(1);
        self.rx = dead;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A fixed set of batches: every sample of a split, its centre view (view 0) or every stored view, masks keyed
/// by a reserved epoch. Used for validation loss during training and for features in `probe`.
#[derive(Debug, Clone)]
pub struct FixedSet {
    /// The batches.
    pub batches: Vec<Batch>,
    /// Samples.
    pub samples: usize,
    /// Samples skipped (bad stored pixels).
    pub skipped: Vec<(u64, String)>,
}

impl FixedSet {
    /// The share of the most frequent code among the masked targets (0 when nothing is masked).
    pub fn majority_accuracy(&self) -> f64 {
        let mut counts: std::collections::HashMap<i64, u64> = std::collections::HashMap::new();
        let mut total = 0u64;
        for b in &self.batches {
            for (&t, _) in b.targets.iter().zip(&b.mask).filter(|(_, &m)| m) {
                *counts.entry(t).or_insert(0) += 1;
                total += 1;
            }
        }
        counts.values().max().map_or(0.0, |&m| m as f64 / total.max(1) as f64)
    }

    /// Up to `limit` samples of `split` in dataset order: their centre views, or with `all_views` every stored
    /// view (the augmented crops too: `samples` then counts views).
    pub(crate) fn load(
        dataset: &Dataset,
        split: Split,
        builder: &Builder,
        batch_size: usize,
        limit: usize,
        all_views: bool,
    ) -> Result<FixedSet> {
        let mut resizer = Resizer::new();
        let mut batches = Vec::new();
        let mut skipped = Vec::new();
        let mut pending = builder.pending();
        let mut samples = 0usize;
        let add = |pending: &mut Pending, r: &TokenRecord, v: &ViewRecord, resizer: &mut Resizer| {
            builder.push(
                pending,
                resizer,
                r.sample_id,
                EVAL_EPOCH,
                &v.tokens,
                v.crop,
                v.flip,
                r.pixels.as_deref(),
                r.label,
            );
        };
        'outer: for (i, shard) in dataset.shards().iter().enumerate() {
            if shard.split != split {
                continue;
            }
            for b in 0..shard.batches as usize {
                // Text samples have nothing for an image model.
                for r in dataset.batch_records(i, b)?.into_iter().filter(|r| !r.views.is_empty()) {
                    if samples >= limit {
                        break 'outer;
                    }
                    samples += 1;
                    let views = if all_views { &r.views[..] } else { &r.views[..1] };
                    for v in views {
                        add(&mut pending, &r, v, &mut resizer);
                        if pending.ids.len() == batch_size {
                            let full = std::mem::replace(&mut pending, builder.pending());
                            skipped.extend(full.skipped.iter().cloned());
                            batches.push(builder.finish(full, StreamState::default()));
                        }
                    }
                }
            }
        }
        if !pending.ids.is_empty() || !pending.skipped.is_empty() {
            skipped.extend(pending.skipped.iter().cloned());
            if !pending.ids.is_empty() {
                batches.push(builder.finish(pending, StreamState::default()));
            }
        }
        let kept = batches.iter().map(Batch::len).sum();
        Ok(FixedSet {
            batches,
            samples: kept,
            skipped,
        })
    }

    /// Labels as a `[samples]` tensor (`-1` for none).
    pub fn labels(&self) -> Tensor {
        let all: Vec<i64> = self.batches.iter().flat_map(|b| b.labels.iter().copied()).collect();
        Tensor::from_slice(&all).to_kind(Kind::Int64)
    }
}

/// " in shard shard-NNNNN.arrow" for a sample id of `dataset` (a scan; error paths only), or nothing.
fn in_shard(dataset: &Dataset, sample_id: u64) -> String {
    match dataset.shard_of(sample_id) {
        Ok(Some(shard)) => format!(" in shard {}", shard.file),
        _ => String::new(),
    }
}
