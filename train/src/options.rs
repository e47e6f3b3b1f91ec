//! The options of a pretraining run as a user gives them (`imglish train` flags, `python -m imglish.pretrain`
//! arguments), and the one place where they become a [`TrainConfig`] or a [`Beit3TrainConfig`] for a dataset.
//! Both front ends go through here, so that the same options give the same configuration, and a checkpoint
//! written by one resumes in the other.

use std::path::PathBuf;

use imglish_pack::{Dataset, Shuffle};
use serde::{Deserialize, Serialize};

use crate::beit3::{Beit3Config, Beit3TrainConfig, Objective, TextMasking};
use crate::config::{InputKind, ModelConfig, RelPosBias};
use crate::data::StreamConfig;
use crate::error::{Result, TrainError};
use crate::masking::{MaskKind, Masking};
use crate::optim::OptimConfig;
use crate::trainer::TrainConfig;

/// Which model a run pretrains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// BEiT v1 masked image modelling.
    Beit,
    /// BEiT-3 masked data modelling on images, texts and pairs.
    Beit3,
}

/// Every option that decides what a pretraining run computes, with `imglish train`'s defaults. Unknown fields
/// are refused when read from JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// The model.
    pub model: ModelKind,
    /// A size preset (`tiny`, `small`, `base`, `large`; BEiT-3 also takes `beit3-*` names).
    pub preset: String,
    /// A model configuration file (JSON) instead of a preset.
    pub model_config: Option<PathBuf>,
    /// Width override (BEiT-3: the feed-forward width becomes 4x).
    pub dim: Option<i64>,
    /// Depth override.
    pub depth: Option<i64>,
    /// Heads override.
    pub heads: Option<i64>,
    /// Stochastic depth override.
    pub drop_path: Option<f64>,
    /// BEiT: relative position bias override.
    pub rel_pos: Option<RelPosBias>,
    /// BEiT: absolute position embeddings.
    pub abs_pos: bool,
    /// Token ids or pixels.
    pub input: InputKind,
    /// BEiT-3: weights of the image, text and pair kinds.
    pub mix: [f64; 3],
    /// BEiT-3: masked share of a text-only sample's tokens.
    pub text_mask_ratio: f64,
    /// BEiT-3: masked share of a pair's caption tokens.
    pub pair_text_mask_ratio: f64,
    /// BEiT-3: the MLM head shares the text embedding.
    pub tie_mlm_head: bool,
    /// BEiT-3: top layers with a vision-language expert.
    pub vl_experts: i64,
    /// LayerScale's initial value (BEiT: overrides the preset's; BEiT-3: adds LayerScale, which torchscale
    /// lacks).
    pub layer_scale: Option<f64>,
    /// Optimiser steps.
    pub steps: u64,
    /// Samples per micro-batch, over all processes together.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub accum: u32,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Gradient clipping norm (`<= 0`: off).
    pub clip_grad: f64,
    /// Mask shape.
    pub mask: MaskKind,
    /// Masked share of the patches (default: BEiT's 75/196, BEiT-3's 40%).
    pub mask_ratio: Option<f64>,
    /// Smallest block of the blockwise masks, in patches.
    pub min_mask_block: Option<usize>,
    /// Seed of the initialisation, order, views and masks.
    pub seed: u64,
    /// Epoch order.
    pub shuffle: Shuffle,
    /// Batches the loader may hold ready.
    pub prefetch: usize,
    /// Skip samples of corrupt shards.
    pub skip_corrupt: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            model: ModelKind::Beit,
            preset: "tiny".into(),
            model_config: None,
            dim: None,
            depth: None,
            heads: None,
            drop_path: None,
            rel_pos: None,
            abs_pos: false,
            input: InputKind::Tokens,
            mix: [1.0, 1.0, 1.0],
            text_mask_ratio: 0.15,
            pair_text_mask_ratio: 0.5,
            tie_mlm_head: false,
            vl_experts: 0,
            layer_scale: None,
            steps: 1000,
            batch_size: 64,
            accum: 1,
            lr: 1.5e-3,
            min_lr: 1e-5,
            warmup_steps: 0,
            weight_decay: 0.05,
            clip_grad: 3.0,
            mask: MaskKind::Blockwise,
            mask_ratio: None,
            min_mask_block: None,
            seed: 0,
            shuffle: Shuffle::default(),
            prefetch: 4,
            skip_corrupt: false,
        }
    }
}

fn config_error(what: &str) -> impl Fn(String) -> TrainError + '_ {
    move |e| TrainError::Config(format!("{what}: {e}"))
}

fn read_model_config<T: serde::de::DeserializeOwned>(path: &PathBuf, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io {
        path: path.clone(),
        source: e,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| e.to_string())
        .map_err(config_error(&format!(
            "{} is not a {what} configuration",
            path.display()
        )))
}

impl TrainOptions {
    fn stream(&self) -> StreamConfig {
        StreamConfig {
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            rank: 0,
            world_size: 1,
            prefetch: self.prefetch,
            skip_corrupt: self.skip_corrupt,
        }
    }

    fn optim(&self) -> Result<OptimConfig> {
        let optim = OptimConfig::from_flags(
            self.lr,
            self.min_lr,
            self.warmup_steps,
            self.weight_decay,
            self.clip_grad,
        );
        optim.validate()?;
        Ok(optim)
    }

    /// Checks the mix weights: finite, non-negative, at least one positive.
    pub fn validate_mix(mix: [f64; 3]) -> std::result::Result<(), String> {
        if let Some(w) = mix.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
            return Err(format!("mix weight {w} must be a non-negative number"));
        }
        if mix.iter().sum::<f64>() <= 0.0 {
            return Err("at least one kind needs a positive weight".into());
        }
        Ok(())
    }

    /// The BEiT configuration for `dataset` (its grid and vocabulary).
    pub fn beit_config(&self, dataset: &Dataset) -> Result<TrainConfig> {
        let info = dataset.tokenizer();
        let grid = [i64::from(info.grid[0]), i64::from(info.grid[1])];
        let mut model = match &self.model_config {
            Some(path) => read_model_config::<ModelConfig>(path, "model")?,
            None => ModelConfig::preset(&self.preset, grid, i64::from(info.vocab_size))?,
        };
        model.dim = self.dim.unwrap_or(model.dim);
        model.depth = self.depth.unwrap_or(model.depth);
        model.heads = self.heads.unwrap_or(model.heads);
        if let Some(p) = self.drop_path {
            model.drop_path = p;
        }
        model.abs_pos_emb |= self.abs_pos;
        if self.layer_scale.is_some() {
            model.layer_scale_init = self.layer_scale;
        }
        if let Some(r) = self.rel_pos {
            model.rel_pos_bias = r;
        }
        model.input = self.input;
        model.validate()?;
        let mut masking = Masking::new(self.mask, [grid[0] as usize, grid[1] as usize])?;
        if let Some(r) = self.mask_ratio {
            masking = masking.try_with_ratio(r)?;
        }
        if let Some(b) = self.min_mask_block {
            masking = masking.try_with_min_block(b)?;
        }
        Ok(TrainConfig {
            model,
            optim: self.optim()?,
            masking,
            steps: self.steps,
            accum: self.accum,
            seed: self.seed,
            stream: self.stream(),
        })
    }

    /// The BEiT-3 configuration for `dataset` (its grid, visual and text vocabularies, special text tokens).
    pub fn beit3_config(&self, dataset: &Dataset) -> Result<Beit3TrainConfig> {
        let info = dataset.tokenizer();
        let grid = [i64::from(info.grid[0]), i64::from(info.grid[1])];
        let text_vocab = info.text_vocab_size.ok_or_else(|| TrainError::Dataset {
            path: dataset.dir().to_path_buf(),
            reason: "BEiT-3 needs text token ids, and this dataset was tokenized without a text tokenizer \
                     (tokenize --text-tokenizer)"
                .into(),
        })?;
        let mut model = match &self.model_config {
            Some(path) => read_model_config::<Beit3Config>(path, "BEiT-3 model")?,
            None => {
                let name = if self.preset.starts_with("beit3-") {
                    self.preset.clone()
                } else {
                    format!("beit3-{}", self.preset)
                };
                Beit3Config::preset(&name, grid, i64::from(info.vocab_size), i64::from(text_vocab))?
            }
        };
        if let Some(d) = self.dim {
            model.dim = d;
            model.ffn_dim = 4 * d;
        }
        model.depth = self.depth.unwrap_or(model.depth);
        model.heads = self.heads.unwrap_or(model.heads);
        if let Some(p) = self.drop_path {
            model.drop_path = p;
        }
        model.tie_mlm_head |= self.tie_mlm_head;
        if self.vl_experts > 0 {
            model.vl_experts = self.vl_experts;
        }
        if self.layer_scale.is_some() {
            model.layer_scale_init = self.layer_scale;
        }
        model.input = self.input;
        model.validate()?;
        let text =
            TextMasking::from_special_ids(text_vocab, &info.text_special_ids).map_err(|e| TrainError::Dataset {
                path: dataset.dir().to_path_buf(),
                reason: match e {
                    TrainError::Config(m) => m,
                    other => other.to_string(),
                },
            })?;
        let g = [grid[0] as usize, grid[1] as usize];
        let mut objective = Objective::beit3(g, text)?;
        if let Some(r) = self.mask_ratio {
            objective.image_masking = objective.image_masking.clone().try_with_ratio(r)?;
            objective.pair_image_masking = objective.pair_image_masking.clone().try_with_ratio(r)?;
        }
        if let Some(b) = self.min_mask_block {
            objective.image_masking = objective.image_masking.clone().try_with_min_block(b)?;
            objective.pair_image_masking = objective.pair_image_masking.clone().try_with_min_block(b)?;
        }
        Self::validate_mix(self.mix).map_err(config_error("--mix"))?;
        objective.mix = self.mix;
        objective.text_ratio = self.text_mask_ratio;
        objective.pair_text_ratio = self.pair_text_mask_ratio;
        objective.validate()?;
        Ok(Beit3TrainConfig {
            model,
            objective,
            optim: self.optim()?,
            steps: self.steps,
            accum: self.accum,
            seed: self.seed,
            stream: self.stream(),
        })
    }
}
