//! BEiT-3 model configuration: presets, free sizes, and the torchscale `EncoderConfig` it corresponds to.

use serde::{Deserialize, Serialize};

use crate::config::InputKind;
use crate::error::{Result, TrainError};

/// A BEiT-3 Multiway Transformer with its MIM and MLM heads. Build one from a preset ([`Beit3Config::preset`])
/// or set every field; [`Beit3Config::validate`] checks the combination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Beit3Config {
    /// Width of the residual stream (`encoder_embed_dim`).
    pub dim: i64,
    /// Encoder layers (`encoder_layers`).
    pub depth: i64,
    /// Attention heads (`encoder_attention_heads`; `dim` must be a multiple).
    pub heads: i64,
    /// Hidden width of each feed-forward expert (`encoder_ffn_embed_dim`).
    pub ffn_dim: i64,
    /// Patch grid `[h, w]` (the visual tokenizer's grid).
    pub grid: [i64; 2],
    /// Patch side in pixels (pixel input: the image side is `grid * patch_size`).
    pub patch_size: i64,
    /// What the vision embedding reads: pixels through `vision_embed.proj` (torchscale's), or visual token ids
    /// through `vision_embed.token_embed` (imglish's cheap CPU option; not a torchscale parameter).
    pub input: InputKind,
    /// Visual vocabulary: the MIM head's classes (and the token embedding's rows for token input).
    pub vocab_size: i64,
    /// Text vocabulary (`vocab_size` in torchscale): `text_embed` rows and the MLM head's classes.
    pub text_vocab_size: i64,
    /// Rows of the text position table (`max_source_positions`); texts are at most this minus 2 tokens
    /// (torchscale's positions start at 2, as in fairseq).
    pub max_source_positions: i64,
    /// LayerNorm epsilon (`layernorm_eps`).
    pub layer_norm_eps: f64,
    /// Stochastic depth rate of the last layer (linearly increasing from 0; `drop_path_rate`).
    pub drop_path: f64,
    /// Standard deviation of the truncated-normal initialisation.
    pub init_std: f64,
    /// The MLM head's weight is the text embedding (only its bias is a parameter of its own).
    pub tie_mlm_head: bool,
    /// The paper's vision-language experts: in the top this-many layers, image-text pairs go through a third
    /// feed-forward expert (`ffn.C`) over the whole joint sequence instead of the vision and language experts
    /// (beyond torchscale, which has none; a model with any has no torchscale counterpart).
    #[serde(default)]
    pub vl_experts: i64,
    /// BEiT's LayerScale: each residual branch is multiplied by a learned per-channel factor starting at this
    /// value (`encoder.layers.L.gamma_1` / `gamma_2`; not in torchscale, so a model with it has no torchscale
    /// counterpart). `None`: no LayerScale, as torchscale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_scale_init: Option<f64>,
}

/// The named presets: `(name, dim, depth, heads, ffn_dim)`.
pub const BEIT3_PRESETS: [(&str, i64, i64, i64, i64); 4] = [
    ("beit3-tiny", 192, 12, 3, 768),
    ("beit3-small", 384, 12, 6, 1536),
    ("beit3-base", 768, 12, 12, 3072),
    ("beit3-large", 1024, 24, 16, 4096),
];

impl Beit3Config {
    /// A preset for a dataset with this token grid and visual and text vocabularies. (unilm's released BEiT-3
    /// uses a 64010-piece SentencePiece model: with that text tokenizer, `text_vocab_size` is 64010.)
    pub fn preset(name: &str, grid: [i64; 2], vocab_size: i64, text_vocab_size: i64) -> Result<Beit3Config> {
        let (_, dim, depth, heads, ffn_dim) = BEIT3_PRESETS.iter().find(|p| p.0 == name).copied().ok_or_else(|| {
            let names: Vec<_> = BEIT3_PRESETS.iter().map(|p| p.0).collect();
            TrainError::Config(format!("unknown BEiT-3 preset '{name}' (one of: {})", names.join(", ")))
        })?;
        let config = Beit3Config {
            dim,
            depth,
            heads,
            ffn_dim,
            grid,
            patch_size: 16,
            input: InputKind::Tokens,
            vocab_size,
            text_vocab_size,
            max_source_positions: 1024,
            layer_norm_eps: 1e-5,
            drop_path: 0.1,
            init_std: 0.02,
            tie_mlm_head: false,
            vl_experts: 0,
            layer_scale_init: None,
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

    /// The longest text the position table covers.
    pub fn max_text_len(&self) -> i64 {
        self.max_source_positions - 2
    }

    /// The BEiT configuration with this model's grid, patch size, input and visual vocabulary: what the shared
    /// data path (views, pixels, image masks) reads.
    pub(crate) fn data_config(&self) -> crate::config::ModelConfig {
        crate::config::ModelConfig {
            dim: self.dim,
            depth: self.depth,
            heads: self.heads,
            mlp_ratio: self.ffn_dim as f64 / self.dim as f64,
            grid: self.grid,
            patch_size: self.patch_size,
            input: self.input,
            vocab_size: self.vocab_size,
            rel_pos_bias: crate::config::RelPosBias::Off,
            abs_pos_emb: false,
            layer_scale_init: self.layer_scale_init,
            layer_norm_eps: self.layer_norm_eps,
            drop_path: self.drop_path,
            init_std: self.init_std,
        }
    }

    /// Checks every field and the combination (the image side with the same rules as a BEiT configuration).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.ffn_dim <= 0 {
            return bad(format!("ffn_dim must be positive (got {})", self.ffn_dim));
        }
        self.data_config().validate()?;
        if self.text_vocab_size < 2 || self.text_vocab_size > 1 << 24 {
            return bad(format!(
                "text_vocab_size must be in 2..=16777216 (got {})",
                self.text_vocab_size
            ));
        }
        if self.max_source_positions < 3 || self.max_source_positions > 1 << 16 {
            return bad(format!(
                "max_source_positions must be in 3..=65536 (got {})",
                self.max_source_positions
            ));
        }
        if !(0..=self.depth).contains(&self.vl_experts) {
            return bad(format!(
                "vl_experts must be in 0..={} (the depth), got {}",
                self.depth, self.vl_experts
            ));
        }
        Ok(())
    }

    /// The keyword arguments of torchscale's `EncoderConfig` that build the same encoder
    /// (`BEiT3(EncoderConfig(**kwargs))`), written next to each checkpoint as `torchscale.json`. torchscale's
    /// vision embedding takes square images and pixels only: other configurations are an error.
    pub fn torchscale_kwargs(&self) -> Result<serde_json::Value> {
        let [h, w] = self.image_size();
        if h != w {
            return Err(TrainError::Config(format!(
                "torchscale's BEiT3 takes square images, this model's are {h}x{w}"
            )));
        }
        if self.input != InputKind::Pixels {
            return Err(TrainError::Config(
                "torchscale's BEiT3 reads pixels; this model reads visual token ids (--input tokens)".into(),
            ));
        }
        if self.vl_experts > 0 {
            return Err(TrainError::Config(
                "torchscale's BEiT3 has no vision-language experts (--vl-experts)".into(),
            ));
        }
        if self.layer_scale_init.is_some() {
            return Err(TrainError::Config(
                "torchscale's BEiT3 has no LayerScale (--layer-scale)".into(),
            ));
        }
        Ok(serde_json::json!({
            "encoder_embed_dim": self.dim,
            "encoder_attention_heads": self.heads,
            "encoder_ffn_embed_dim": self.ffn_dim,
            "encoder_layers": self.depth,
            "multiway": true,
            "subln": true,
            "normalize_output": true,
            "no_output_layer": true,
            "layernorm_embedding": false,
            "no_scale_embedding": true,
            "vocab_size": self.text_vocab_size,
            "img_size": h,
            "patch_size": self.patch_size,
            "in_chans": 3,
            "max_source_positions": self.max_source_positions,
            "layernorm_eps": self.layer_norm_eps,
            "drop_path_rate": self.drop_path,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_the_torchscale_config() {
        let mut c = Beit3Config::preset("beit3-base", [14, 14], 8192, 64010).expect("preset");
        assert_eq!((c.dim, c.depth, c.heads, c.ffn_dim), (768, 12, 12, 3072));
        let e = c
            .torchscale_kwargs()
            .expect_err("token input has no torchscale counterpart");
        assert!(e.to_string().contains("reads visual token ids"), "{e}");
        c.input = InputKind::Pixels;
        let k = c.torchscale_kwargs().expect("kwargs");
        assert_eq!(k["img_size"], 224);
        assert_eq!(k["vocab_size"], 64010);
        assert_eq!(k["encoder_ffn_embed_dim"], 3072);
        c.grid = [14, 7];
        assert!(c.torchscale_kwargs().is_err());
        let e = Beit3Config::preset("huge", [14, 14], 8192, 100).expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "invalid configuration: unknown BEiT-3 preset 'huge' (one of: beit3-tiny, beit3-small, beit3-base, beit3-large)"
        );
    }
}
