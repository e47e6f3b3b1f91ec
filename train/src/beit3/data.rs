//! BEiT-3's data path: every streamed sample becomes one of three kinds (an image, a text, or an image-text
//! pair) chosen per epoch from `(seed, epoch, sample_id)` with the `--mix` weights among the kinds the sample
//! can be; images get blockwise masks, texts BERT masks, at each kind's ratios.

use imglish_ingest::{Resizer, Rng};
use imglish_pack::{Dataset, Sample, Split, StreamState};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::beit3::config::Beit3Config;
use crate::beit3::text_mask::TextMasking;
use crate::config::InputKind;
use crate::data::{render_pixels, Batcher};
use crate::error::{Result, TrainError};
use crate::masking::Masking;
use crate::model::Input;

/// The three kinds of sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleKind {
    /// An image alone: masked image modelling.
    Image,
    /// A text alone: masked language modelling.
    Text,
    /// An image with one of its captions: both, over the joint sequence.
    Pair,
}

impl SampleKind {
    /// All kinds, in batch order.
    pub const ALL: [SampleKind; 3] = [SampleKind::Image, SampleKind::Text, SampleKind::Pair];

    /// `"image"`, `"text"` or `"pair"`.
    pub fn name(self) -> &'static str {
        match self {
            SampleKind::Image => "image",
            SampleKind::Text => "text",
            SampleKind::Pair => "pair",
        }
    }

    /// Whether samples of this kind have an image.
    pub fn has_image(self) -> bool {
        self != SampleKind::Text
    }

    /// Whether samples of this kind have a text.
    pub fn has_text(self) -> bool {
        self != SampleKind::Image
    }
}

/// The masked-data-modelling objective: how kinds are mixed and how much of each is masked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    /// Relative weights of image, text and pair samples (`--mix image=1,text=1,pair=1`).
    pub mix: [f64; 3],
    /// Image masking of image-only samples (BEiT-3: blockwise, 40%).
    pub image_masking: Masking,
    /// Image masking of pairs (BEiT-3: blockwise, 40%).
    pub pair_image_masking: Masking,
    /// Share of text tokens predicted in text-only samples (BEiT-3: 15%).
    pub text_ratio: f64,
    /// Share of text tokens predicted in pairs (BEiT-3: 50%).
    pub pair_text_ratio: f64,
    /// The text tokenizer's mask, padding and special tokens.
    pub text: TextMasking,
}

impl Objective {
    /// BEiT-3's recipe for `grid`: 40% blockwise image masking, 15% of text tokens alone and 50% in pairs.
    pub fn beit3(grid: [usize; 2], text: TextMasking) -> Result<Objective> {
        let masking = Masking::new(crate::masking::MaskKind::Blockwise, grid)?.try_with_ratio(0.4)?;
        Ok(Objective {
            mix: [1.0, 1.0, 1.0],
            image_masking: masking.clone(),
            pair_image_masking: masking,
            text_ratio: 0.15,
            pair_text_ratio: 0.5,
            text,
        })
    }

    /// Checks the weights and ratios.
    pub fn validate(&self) -> Result<()> {
        if self.mix.iter().any(|w| !(w.is_finite() && *w >= 0.0)) || self.mix.iter().sum::<f64>() <= 0.0 {
            return Err(TrainError::Config(format!(
                "mix weights must be non-negative with a positive sum (got image={}, text={}, pair={})",
                self.mix[0], self.mix[1], self.mix[2]
            )));
        }
        for (what, r) in [("text", self.text_ratio), ("pair text", self.pair_text_ratio)] {
            if !(r > 0.0 && r <= 1.0) {
                return Err(TrainError::Config(format!("{what} mask ratio {r} is not in (0, 1]")));
            }
        }
        Ok(())
    }

    /// The kind `sample_id` is in `epoch`: a weighted draw among the kinds it can be (an image; with a caption
    /// also a text and a pair). `None` when every kind it can be has weight 0.
    pub fn kind(&self, seed: u64, epoch: u64, sample_id: u64, has_image: bool, has_text: bool) -> Option<SampleKind> {
        let allowed = |k: SampleKind| (!k.has_image() || has_image) && (!k.has_text() || has_text);
        let weights: Vec<(SampleKind, f64)> = SampleKind::ALL
            .iter()
            .zip(self.mix)
            .filter(|(k, w)| allowed(**k) && *w > 0.0)
            .map(|(k, w)| (*k, w))
            .collect();
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        if weights.is_empty() {
            return None;
        }
        let mut r = Rng::keyed(&[seed, epoch, sample_id, 0x6b69_6e64]).next_f64() * total;
        for (k, w) in &weights {
            if r < *w {
                return Some(*k);
            }
            r -= w;
        }
        weights.last().map(|(k, _)| *k)
    }
}

/// Which caption of a pair is used in `epoch`.
pub fn caption_for(seed: u64, epoch: u64, sample_id: u64, captions: usize) -> usize {
    if captions <= 1 {
        return 0;
    }
    Rng::keyed(&[seed, epoch, sample_id, 0x6361_7074]).below(captions as u64) as usize
}

/// The samples of one kind in a batch.
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// Sample ids.
    pub ids: Vec<u64>,
    /// The views' tokens `[n * N]` (MIM targets; token-input model input).
    pub tokens: Vec<i64>,
    /// Pixels `[n * 3 * H * W]` (pixel input).
    pub pixels: Vec<f32>,
    /// `[n * N]` image mask.
    pub image_mask: Vec<bool>,
    /// Original text ids per sample.
    pub texts: Vec<Vec<u32>>,
    /// Masked text input ids per sample.
    pub text_input: Vec<Vec<u32>>,
    /// Predicted text positions per sample.
    pub text_predict: Vec<Vec<bool>>,
}

/// A batch: its samples grouped by kind.
#[derive(Debug, Clone)]
pub struct Beit3Batch {
    /// Image, text and pair groups (in [`SampleKind::ALL`] order).
    pub groups: [Group; 3],
    /// The stream's state after this batch.
    pub state: StreamState,
    /// Samples skipped, with the reason.
    pub skipped: Vec<(u64, String)>,
}

impl Beit3Batch {
    /// Samples in the batch.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.ids.len()).sum()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A group on the device.
#[derive(Debug)]
pub struct DeviceGroup {
    /// Image input, if the kind has one.
    pub image: Option<Input>,
    /// `[n, N]` image mask.
    pub image_mask: Option<Tensor>,
    /// MIM targets of the masked patches `[M]`.
    pub mim_targets: Option<Tensor>,
    /// `[n, L]` masked text input (padded).
    pub text: Option<Tensor>,
    /// `[n, L]` padding.
    pub padding: Option<Tensor>,
    /// `[n, L]` predicted positions.
    pub text_predict: Option<Tensor>,
    /// MLM targets `[M]`.
    pub mlm_targets: Option<Tensor>,
}

impl Group {
    /// The group's tensors on `device` for `kind`.
    pub fn to_device(&self, kind: SampleKind, config: &Beit3Config, pad_id: u32, device: Device) -> DeviceGroup {
        let n = self.ids.len() as i64;
        let mut g = DeviceGroup {
            image: None,
            image_mask: None,
            mim_targets: None,
            text: None,
            padding: None,
            text_predict: None,
            mlm_targets: None,
        };
        if kind.has_image() {
            let np = config.num_patches();
            g.image = Some(match config.input {
                InputKind::Tokens => Input::Tokens(Tensor::from_slice(&self.tokens).view([n, np]).to_device(device)),
                InputKind::Pixels => {
                    let [h, w] = config.image_size();
                    Input::Pixels(Tensor::from_slice(&self.pixels).view([n, 3, h, w]).to_device(device))
                }
            });
            let masked: Vec<i64> = self
                .tokens
                .iter()
                .zip(&self.image_mask)
                .filter(|(_, &m)| m)
                .map(|(&t, _)| t)
                .collect();
            g.image_mask = Some(Tensor::from_slice(&self.image_mask).view([n, np]).to_device(device));
            g.mim_targets = Some(Tensor::from_slice(&masked).to_device(device));
        }
        if kind.has_text() {
            let t = self.text_arrays(pad_id);
            let len = t.len as i64;
            g.text = Some(Tensor::from_slice(&t.ids).view([n, len]).to_device(device));
            g.padding = Some(Tensor::from_slice(&t.padding).view([n, len]).to_device(device));
            g.text_predict = Some(Tensor::from_slice(&t.predict).view([n, len]).to_device(device));
            g.mlm_targets = Some(Tensor::from_slice(&t.targets).to_device(device));
        }
        g
    }
}

/// Builds BEiT-3 batches from samples (on the loader thread, and for the fixed validation set).
/// A group's texts padded to one length: model input ids (masked), padding and prediction flags `[n, len]`
/// row-major, and the original ids of the predicted positions in that order (the MLM targets).
#[derive(Debug, Clone, Default)]
pub struct TextArrays {
    /// The padded length (the longest text of the group).
    pub len: usize,
    /// Input ids (masked; padding filled with the pad id).
    pub ids: Vec<i64>,
    /// `true` at padding.
    pub padding: Vec<bool>,
    /// `true` where the MLM head predicts.
    pub predict: Vec<bool>,
    /// Original ids at the predicted positions.
    pub targets: Vec<i64>,
}

impl Group {
    /// The group's texts as padded arrays (see [`TextArrays`]).
    pub fn text_arrays(&self, pad_id: u32) -> TextArrays {
        let len = self.texts.iter().map(Vec::len).max().unwrap_or(0);
        let mut t = TextArrays {
            len,
            ..TextArrays::default()
        };
        for ((orig, input), pred) in self.texts.iter().zip(&self.text_input).zip(&self.text_predict) {
            for i in 0..len {
                t.ids.push(i64::from(input.get(i).copied().unwrap_or(pad_id)));
                t.padding.push(i >= input.len());
                t.predict.push(pred.get(i).copied().unwrap_or(false));
            }
            t.targets
                .extend(orig.iter().zip(pred).filter(|(_, &p)| p).map(|(&t, _)| i64::from(t)));
        }
        t
    }
}

#[derive(Clone)]
pub(crate) struct Beit3Builder {
    pub(crate) config: Beit3Config,
    pub(crate) objective: Objective,
    pub(crate) seed: u64,
}

impl Beit3Builder {
    /// Adds `sample` (its view `tokens`, `crop`, `flip`) as `kind` to `group`; `Err` is why it was skipped.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        group: &mut Group,
        kind: SampleKind,
        epoch: u64,
        sample_id: u64,
        view: (&[u16], [u32; 4], bool),
        pixels: Option<&[u8]>,
        caption: Option<&[u32]>,
        resizer: &mut Resizer,
    ) -> std::result::Result<(), String> {
        let (tokens, crop, flip) = view;
        let np = self.config.num_patches() as usize;
        if kind.has_image() && tokens.len() != np {
            return Err(format!("{} tokens, the model's grid has {np}", tokens.len()));
        }
        let mut px = Vec::new();
        if kind.has_image() && self.config.input == InputKind::Pixels {
            px = render_pixels(pixels, crop, flip, self.config.image_size(), resizer)?;
        }
        let text = match caption {
            Some(c) if kind.has_text() => {
                let max = self.config.max_text_len() as usize;
                if c.is_empty() {
                    return Err("empty caption".into());
                }
                let mut t = c.to_vec();
                if t.len() > max {
                    // Keep the last token (the end token) after truncation.
                    let last = t[t.len() - 1];
                    t.truncate(max);
                    t[max - 1] = last;
                }
                if let Some(&bad) = t.iter().find(|&&id| i64::from(id) >= self.config.text_vocab_size) {
                    return Err(format!(
                        "text token {bad} is not below the model's text vocabulary {}",
                        self.config.text_vocab_size
                    ));
                }
                Some(t)
            }
            _ => None,
        };
        group.ids.push(sample_id);
        if kind.has_image() {
            let masking = match kind {
                SampleKind::Pair => &self.objective.pair_image_masking,
                _ => &self.objective.image_masking,
            };
            group.tokens.extend(tokens.iter().map(|&t| i64::from(t)));
            group.image_mask.extend(masking.mask(self.seed, epoch, sample_id));
            group.pixels.extend(px);
        }
        if let Some(t) = text {
            let ratio = match kind {
                SampleKind::Pair => self.objective.pair_text_ratio,
                _ => self.objective.text_ratio,
            };
            let m = self.objective.text.mask(&t, ratio, self.seed, epoch, sample_id);
            group.texts.push(t);
            group.text_input.push(m.input);
            group.text_predict.push(m.predict);
        }
        Ok(())
    }
}

/// The loader-thread side: a builder with its pending batch.
pub(crate) struct Beit3Batcher {
    builder: Beit3Builder,
    pending: Beit3Batch,
    resizer: Resizer,
}

fn empty_batch() -> Beit3Batch {
    Beit3Batch {
        groups: Default::default(),
        state: StreamState::default(),
        skipped: Vec::new(),
    }
}

impl Beit3Batcher {
    pub(crate) fn new(builder: Beit3Builder) -> Beit3Batcher {
        Beit3Batcher {
            builder,
            pending: empty_batch(),
            resizer: Resizer::new(),
        }
    }
}

impl Batcher for Beit3Batcher {
    type Batch = Beit3Batch;

    fn push(&mut self, s: Sample, epoch: u64) {
        let b = &self.builder;
        let has_text = !s.captions.is_empty();
        let has_image = s.kind != imglish_pack::SampleKind::Text;
        let Some(kind) = b.objective.kind(b.seed, epoch, s.sample_id, has_image, has_text) else {
            return;
        };
        let caption =
            has_text.then(|| s.captions[caption_for(b.seed, epoch, s.sample_id, s.captions.len())].as_slice());
        let group = &mut self.pending.groups[kind as usize];
        let view = (s.tokens.as_slice(), s.crop, s.flip);
        if let Err(why) = b.add(
            group,
            kind,
            epoch,
            s.sample_id,
            view,
            s.pixels.as_deref(),
            caption,
            &mut self.resizer,
        ) {
            self.pending.skipped.push((s.sample_id, why));
        }
    }

    fn pending(&self) -> usize {
        self.pending.len()
    }

    fn take(&mut self, state: StreamState) -> Beit3Batch {
        let mut full = std::mem::replace(&mut self.pending, empty_batch());
        full.state = state;
        full
    }

    fn first_skip(&self) -> Option<(u64, String)> {
        self.pending.skipped.first().cloned()
    }
}

/// Samples skipped, with the reason.
type Skipped = Vec<(u64, String)>;

/// The fixed validation set: the first `limit` samples of a split, centre view and first caption, each sample
/// in every kind it can be (so that all three kinds are scored), masks keyed by a reserved epoch.
pub(crate) fn fixed_set(
    dataset: &Dataset,
    split: Split,
    builder: &Beit3Builder,
    batch_size: usize,
    limit: usize,
) -> Result<(Vec<Beit3Batch>, Skipped)> {
    const EVAL_EPOCH: u64 = u64::MAX;
    let mut resizer = Resizer::new();
    let (mut batches, mut skipped) = (Vec::new(), Vec::new());
    let mut pending = empty_batch();
    let mut seen = 0usize;
    'outer: for (i, shard) in dataset.shards().iter().enumerate() {
        if shard.split != split {
            continue;
        }
        for b in 0..shard.batches as usize {
            for r in dataset.batch_records(i, b)? {
                if seen >= limit {
                    break 'outer;
                }
                seen += 1;
                let v = r.views.first();
                let caption = r.captions.first().map(Vec::as_slice);
                for kind in SampleKind::ALL {
                    let missing = (kind.has_text() && caption.is_none()) || (kind.has_image() && v.is_none());
                    if missing || builder.objective.mix[kind as usize] <= 0.0 {
                        continue;
                    }
                    let view = v.map_or((&[][..], [0; 4], false), |v| (v.tokens.as_slice(), v.crop, v.flip));
                    let group = &mut pending.groups[kind as usize];
                    let added = builder.add(
                        group,
                        kind,
                        EVAL_EPOCH,
                        r.sample_id,
                        view,
                        r.pixels.as_deref(),
                        caption,
                        &mut resizer,
                    );
                    if let Err(why) = added {
                        skipped.push((r.sample_id, why));
                    }
                }
                if pending.len() >= batch_size {
                    batches.push(std::mem::replace(&mut pending, empty_batch()));
                }
            }
        }
    }
    if !pending.is_empty() {
        batches.push(pending);
    }
    Ok((batches, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objective(mix: [f64; 3]) -> Objective {
        let text = TextMasking::new(100, 4, 0, [0, 1, 2, 3, 4]).expect("text");
        let mut o = Objective::beit3([4, 4], text).expect("objective");
        o.mix = mix;
        o
    }

    #[test]
    fn kinds_follow_the_weights_and_what_a_sample_can_be() {
        let o = objective([1.0, 1.0, 2.0]);
        let mut counts = [0usize; 3];
        for id in 0..8000 {
            counts[o.kind(1, 0, id, true, true).expect("kind") as usize] += 1;
        }
        assert!((counts[0] as f64 / 8000.0 - 0.25).abs() < 0.02, "{counts:?}");
        assert!((counts[2] as f64 / 8000.0 - 0.5).abs() < 0.02, "{counts:?}");
        // Without a caption a sample can only be an image.
        assert!((0..100).all(|id| o.kind(1, 0, id, true, false) == Some(SampleKind::Image)));
        // Deterministic, and redrawn per epoch.
        let a: Vec<_> = (0..50).map(|id| o.kind(3, 1, id, true, true)).collect();
        assert_eq!(a, (0..50).map(|id| o.kind(3, 1, id, true, true)).collect::<Vec<_>>());
        assert_ne!(a, (0..50).map(|id| o.kind(3, 2, id, true, true)).collect::<Vec<_>>());
        let images_only = objective([0.0, 1.0, 1.0]);
        assert_eq!(images_only.kind(1, 0, 5, true, false), None);
        assert!(objective([0.0, 0.0, 0.0]).validate().is_err());
        assert!(objective([-1.0, 1.0, 0.0]).validate().is_err());
    }

    #[test]
    fn beit3_ratios() {
        let o = objective([1.0; 3]);
        assert_eq!(o.image_masking.count(), 6); // round(0.4 * 16)
        assert_eq!((o.text_ratio, o.pair_text_ratio), (0.15, 0.5));
        let picks: std::collections::BTreeSet<usize> = (0..200).map(|id| caption_for(0, 0, id, 3)).collect();
        assert_eq!(picks.len(), 3);
        assert_eq!(caption_for(0, 0, 9, 1), 0);
    }
}
