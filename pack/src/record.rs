//! The records that flow from the tokenize stage through pack to the trainer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{PackError, Result};

/// One augmented view of a sample: where it was cropped from, whether it was flipped, and its visual tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewRecord {
    /// The crop in source pixels: x, y, width, height.
    pub crop: [u32; 4],
    /// Whether the crop was mirrored horizontally before tokenizing.
    pub flip: bool,
    /// `grid_h * grid_w` visual token ids, row-major.
    pub tokens: Vec<u16>,
}

/// Which split a sample belongs to. Stored in shards as a `u8` code: train = 0, val = 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training data.
    Train,
    /// Held-out validation data.
    Val,
}

impl Split {
    /// Both splits, in shard order (train shards come first in a dataset).
    pub const ALL: [Split; 2] = [Split::Train, Split::Val];

    /// The `u8` code stored in parts and shards.
    pub fn code(self) -> u8 {
        match self {
            Split::Train => 0,
            Split::Val => 1,
        }
    }

    /// The split for a stored code, if valid.
    pub fn from_code(code: u8) -> Option<Split> {
        match code {
            0 => Some(Split::Train),
            1 => Some(Split::Val),
            _ => None,
        }
    }

    /// `"train"` or `"val"`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The three kinds of sample a dataset holds. Stored in shards (format 2) as a `u8` code: image = 0, text = 1,
/// pair = 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleKind {
    /// An image without a caption.
    Image,
    /// A text without an image (a segment of a text-only document).
    Text,
    /// An image with one or more captions.
    Pair,
}

impl SampleKind {
    /// The `u8` code stored in shards.
    pub fn code(self) -> u8 {
        match self {
            SampleKind::Image => 0,
            SampleKind::Text => 1,
            SampleKind::Pair => 2,
        }
    }

    /// The kind for a stored code, if valid.
    pub fn from_code(code: u8) -> Option<SampleKind> {
        match code {
            0 => Some(SampleKind::Image),
            1 => Some(SampleKind::Text),
            2 => Some(SampleKind::Pair),
            _ => None,
        }
    }

    /// `"image"`, `"text"` or `"pair"`.
    pub fn name(self) -> &'static str {
        match self {
            SampleKind::Image => "image",
            SampleKind::Text => "text",
            SampleKind::Pair => "pair",
        }
    }
}

/// Everything the tokenize stage produced for one sample: one row of a token part and of a shard. A text sample
/// has no views and exactly one caption (its text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The sample's id (unique in the dataset; from the manifest).
    pub sample_id: u64,
    /// Exactly `views_per_sample` views.
    pub views: Vec<ViewRecord>,
    /// Text token ids of each caption (may be empty).
    pub captions: Vec<Vec<u32>>,
    /// The class label, if the corpus has one.
    pub label: Option<i32>,
    /// The split.
    pub split: Split,
    /// The working image (JPEG bytes), if the tokenize stage kept it.
    pub pixels: Option<Vec<u8>>,
}

impl TokenRecord {
    /// Text when it has no views, pair when it has views and captions, image otherwise.
    pub fn kind(&self) -> SampleKind {
        match (self.views.is_empty(), self.captions.is_empty()) {
            (true, _) => SampleKind::Text,
            (false, true) => SampleKind::Image,
            (false, false) => SampleKind::Pair,
        }
    }
}

/// Counts per split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    /// Training samples.
    pub train: u64,
    /// Validation samples.
    pub val: u64,
}

impl SplitCounts {
    /// Adds one sample of `split`.
    pub fn add(&mut self, split: Split) {
        *self.get_mut(split) += 1;
    }

    /// The count of `split`.
    pub fn get(&self, split: Split) -> u64 {
        match split {
            Split::Train => self.train,
            Split::Val => self.val,
        }
    }

    /// The count of `split`, mutably.
    pub fn get_mut(&mut self, split: Split) -> &mut u64 {
        match split {
            Split::Train => &mut self.train,
            Split::Val => &mut self.val,
        }
    }

    /// All samples.
    pub fn total(&self) -> u64 {
        self.train + self.val
    }
}

/// What the visual and text tokenizers were: recorded in every token part, in `tokenize.json`, in every shard's
/// schema metadata and in `index.json`, so that tokens are never mixed across tokenizers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// sha256 (hex) over the visual tokenizer's ONNX model and its card.
    pub fingerprint: String,
    /// The tokenizer card (free-form JSON written by the tokenize stage).
    pub card: serde_json::Value,
    /// The token grid of one view: `[grid_h, grid_w]`.
    pub grid: [u32; 2],
    /// Number of visual codes; every token is `< vocab_size` (at most 65536, tokens are `u16`).
    pub vocab_size: u32,
    /// Number of text token ids, if captions were tokenized; every caption token is `< text_vocab_size`.
    pub text_vocab_size: Option<u32>,
    /// Special text token ids by name (e.g. `"bos"`, `"eos"`, `"pad"`).
    #[serde(default)]
    pub text_special_ids: BTreeMap<String, u32>,
    /// Views (augmented crops) stored per sample, `K`.
    pub views_per_sample: u32,
}

impl TokenizerInfo {
    /// Tokens per view, `grid_h * grid_w`.
    pub fn tokens_per_view(&self) -> usize {
        self.grid[0] as usize * self.grid[1] as usize
    }

    /// `K`, views per sample.
    pub fn views(&self) -> usize {
        self.views_per_sample as usize
    }

    /// Checks the description itself.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PackError::InvalidTokenizer(m));
        if self.grid[0] == 0 || self.grid[1] == 0 || self.tokens_per_view() > 1 << 20 {
            return bad(format!(
                "grid {}x{} must be non-empty and at most 2^20 tokens",
                self.grid[0], self.grid[1]
            ));
        }
        if self.vocab_size == 0 || self.vocab_size > 1 << 16 {
            return bad(format!(
                "vocab_size {} must be in 1..=65536 (tokens are u16)",
                self.vocab_size
            ));
        }
        if self.views_per_sample == 0 || self.views_per_sample > 1024 {
            return bad(format!(
                "views_per_sample {} must be in 1..=1024",
                self.views_per_sample
            ));
        }
        if self.text_vocab_size == Some(0) {
            return bad("text_vocab_size must not be 0".into());
        }
        if let Some(tv) = self.text_vocab_size {
            if let Some((name, id)) = self.text_special_ids.iter().find(|(_, &id)| id >= tv) {
                return bad(format!(
                    "special text token {name} = {id} is not below text_vocab_size {tv}"
                ));
            }
        }
        Ok(())
    }

    /// Checks that a record fits this tokenizer: `K` views of `grid_h * grid_w` tokens below `vocab_size`,
    /// crops with a non-empty size, caption tokens below `text_vocab_size`.
    pub fn check_record(&self, r: &TokenRecord) -> Result<()> {
        let bad = |reason: String| {
            Err(PackError::InvalidRecord {
                sample_id: r.sample_id,
                reason,
            })
        };
        if r.views.is_empty() {
            if r.captions.len() != 1 || r.captions[0].is_empty() || r.pixels.is_some() {
                return bad(
                    "is a text sample (no views) but does not have exactly one non-empty text and no pixels".into(),
                );
            }
            if self.text_vocab_size.is_none() {
                return bad("is a text sample, but the tokenizer info has no text vocabulary".into());
            }
        } else if r.views.len() != self.views() {
            return bad(format!(
                "has {} views, the tokenizer info says {}",
                r.views.len(),
                self.views()
            ));
        }
        for (i, v) in r.views.iter().enumerate() {
            if v.tokens.len() != self.tokens_per_view() {
                return bad(format!(
                    "view {i} has {} tokens, the grid {}x{} needs {}",
                    v.tokens.len(),
                    self.grid[0],
                    self.grid[1],
                    self.tokens_per_view()
                ));
            }
            if let Some(t) = v.tokens.iter().find(|&&t| u32::from(t) >= self.vocab_size) {
                return bad(format!(
                    "view {i} has token {t}, not below vocab_size {}",
                    self.vocab_size
                ));
            }
            if v.crop[2] == 0 || v.crop[3] == 0 {
                return bad(format!("view {i} has an empty crop {:?}", v.crop));
            }
        }
        if let Some(tv) = self.text_vocab_size {
            for (i, c) in r.captions.iter().enumerate() {
                if let Some(t) = c.iter().find(|&&t| t >= tv) {
                    return bad(format!("caption {i} has token {t}, not below text_vocab_size {tv}"));
                }
            }
        }
        Ok(())
    }
}

/// The views of `records` flattened column-wise: all tokens, all crop boxes (4 values each), all flips, in
/// record then view order (the layout both the part and the shard writers store).
pub(crate) fn flatten_views(records: &[TokenRecord]) -> (Vec<u16>, Vec<u32>, Vec<bool>) {
    let views = || records.iter().flat_map(|r| r.views.iter());
    (
        views().flat_map(|v| v.tokens.iter().copied()).collect(),
        views().flat_map(|v| v.crop).collect(),
        views().map(|v| v.flip).collect(),
    )
}
