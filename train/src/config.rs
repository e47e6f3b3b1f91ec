//! Model configuration: named presets and free sizes, validated before any tensor is allocated.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// What the encoder reads for each patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// The view's visual token ids through an embedding table (`token_embed`); masked positions get the mask
    /// token. Cheap: the default on CPU.
    Tokens,
    /// The view's pixels (rebuilt from the stored working image), 16x16 patches through a strided convolution
    /// (`patch_embed.proj`), normalised with mean = std = 0.5: BEiT's input.
    Pixels,
}

/// Where relative position biases live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelPosBias {
    /// One table shared by every layer (`rel_pos_bias.relative_position_bias_table`), as in BEiT pretraining.
    Shared,
    /// One table per layer (`blocks.N.attn.relative_position_bias_table`), as in BEiT fine-tuning.
    PerLayer,
    /// None.
    Off,
}

/// A BEiT encoder with its masked-image-modeling head. Build one from a preset ([`ModelConfig::preset`]) or set
/// every field; [`ModelConfig::validate`] checks the combination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub dim: i64,
    /// Transformer blocks.
    pub depth: i64,
    /// Attention heads (`dim` must be a multiple).
    pub heads: i64,
    /// Hidden width of the MLP as a multiple of `dim`.
    pub mlp_ratio: f64,
    /// Patch grid `[h, w]` (the visual tokenizer's grid).
    pub grid: [i64; 2],
    /// Patch side in pixels (pixel input: the image side is `grid * patch_size`).
    pub patch_size: i64,
    /// What the encoder reads.
    pub input: InputKind,
    /// Visual vocabulary: the MIM head's classes and, for token input, the embedding table's rows.
    pub vocab_size: i64,
    /// Relative position bias placement.
    pub rel_pos_bias: RelPosBias,
    /// A learned absolute position embedding (`pos_embed`); BEiT pretraining uses relative positions only.
    pub abs_pos_emb: bool,
    /// Layer scale init (`gamma_1`, `gamma_2`); `None` disables layer scale.
    pub layer_scale_init: Option<f64>,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Stochastic depth rate of the last block (linearly increasing from 0).
    pub drop_path: f64,
    /// Standard deviation of the truncated-normal initialisation.
    pub init_std: f64,
}

/// The named presets: `(name, dim, depth, heads, layer scale init)`.
pub const PRESETS: [(&str, i64, i64, i64, f64); 4] = [
    ("tiny", 192, 12, 3, 0.1),
    ("small", 384, 12, 6, 0.1),
    ("base", 768, 12, 12, 0.1),
    ("large", 1024, 24, 16, 1e-5),
];

impl ModelConfig {
    /// A preset (`tiny`, `small`, `base`, `large`) for a tokenizer with this grid and vocabulary.
    pub fn preset(name: &str, grid: [i64; 2], vocab_size: i64) -> Result<ModelConfig> {
        let (_, dim, depth, heads, ls) = PRESETS.iter().find(|p| p.0 == name).copied().ok_or_else(|| {
            let names: Vec<_> = PRESETS.iter().map(|p| p.0).collect();
            TrainError::Config(format!("unknown model preset '{name}' (one of: {})", names.join(", ")))
        })?;
        let config = ModelConfig {
            dim,
            depth,
            heads,
            mlp_ratio: 4.0,
            grid,
            patch_size: 16,
            input: InputKind::Tokens,
            vocab_size,
            rel_pos_bias: RelPosBias::Shared,
            abs_pos_emb: false,
            layer_scale_init: Some(ls),
            layer_norm_eps: 1e-6,
            drop_path: 0.1,
            init_std: 0.02,
        };
        config.validate()?;
        Ok(config)
    }

    /// Patches per view.
    pub fn num_patches(&self) -> i64 {
        self.grid[0] * self.grid[1]
    }

    /// Pixel input side `[h, w]`.
    pub fn image_size(&self) -> [i64; 2] {
        [self.grid[0] * self.patch_size, self.grid[1] * self.patch_size]
    }

    /// Checks every field and the combination.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.dim <= 0 || self.depth <= 0 || self.heads <= 0 {
            return bad(format!(
                "dim, depth and heads must be positive (got {}, {}, {})",
                self.dim, self.depth, self.heads
            ));
        }
        if self.dim % self.heads != 0 {
            return bad(format!("dim {} is not a multiple of heads {}", self.dim, self.heads));
        }
        if !(self.mlp_ratio > 0.0 && self.mlp_ratio.is_finite()) || (self.dim as f64 * self.mlp_ratio) < 1.0 {
            return bad(format!("mlp_ratio must be positive (got {})", self.mlp_ratio));
        }
        if self.grid[0] <= 0 || self.grid[1] <= 0 || self.patch_size <= 0 {
            return bad(format!(
                "grid {:?} and patch_size {} must be positive",
                self.grid, self.patch_size
            ));
        }
        if self.vocab_size < 2 || self.vocab_size > 65536 {
            return bad(format!("vocab_size must be in 2..=65536 (got {})", self.vocab_size));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return bad(format!("drop_path must be in [0, 1) (got {})", self.drop_path));
        }
        if self.layer_norm_eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
            || self.init_std.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return bad("layer_norm_eps and init_std must be positive".into());
        }
        if let Some(ls) = self.layer_scale_init {
            if !(ls > 0.0 && ls.is_finite()) {
                return bad(format!("layer_scale_init must be positive (got {ls})"));
            }
        }
        Ok(())
    }
}
