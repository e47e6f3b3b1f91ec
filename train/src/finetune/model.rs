//! The classifier: a pretrained encoder (BEiT or BEiT-3's vision path), mean pooling over the patch outputs,
//! `fc_norm` and a linear `head` (timm's `Beit` with `global_pool='avg'`; unilm's `BEiT3ForImageClassification`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::beit3::{Beit3, Beit3Config, ImageIn};
use crate::config::{ModelConfig, RelPosBias};
use crate::error::Result;
use crate::model::{param_key, trunc_normal_, Beit, Input};
use crate::tensors;

/// The encoder a classifier is built on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backbone {
    /// A BEiT encoder (timm names). A pretraining checkpoint's shared relative position table becomes one table
    /// per block, as BEiT fine-tunes.
    Beit(ModelConfig),
    /// BEiT-3, image-only forward through its vision experts (torchscale names).
    Beit3(Beit3Config),
}

impl Backbone {
    /// The fine-tuning form of a pretraining configuration: BEiT's shared relative position table becomes
    /// per-block tables; `drop_path` set.
    pub fn for_finetuning(self, drop_path: f64) -> Backbone {
        match self {
            Backbone::Beit(mut c) => {
                if c.rel_pos_bias == RelPosBias::Shared {
                    c.rel_pos_bias = RelPosBias::PerLayer;
                }
                c.drop_path = drop_path;
                Backbone::Beit(c)
            }
            Backbone::Beit3(mut c) => {
                c.drop_path = drop_path;
                Backbone::Beit3(c)
            }
        }
    }

    /// A pixel-input BEiT encoder at another image side (`--input-size`): the grid becomes side / patch, and
    /// the position tables are resized when the weights are loaded.
    pub fn with_input_size(self, size: i64) -> Result<Backbone> {
        let bad = |m: String| Err(crate::TrainError::Config(m));
        match self {
            Backbone::Beit(mut c) => {
                if c.input != crate::InputKind::Pixels {
                    return bad(
                        "--input-size needs a pixel-input encoder (a token-input one reads the tokenizer's \
                                grid)"
                            .into(),
                    );
                }
                if size <= 0 || size % c.patch_size != 0 {
                    return bad(format!(
                        "--input-size {size} is not a positive multiple of the patch size {}",
                        c.patch_size
                    ));
                }
                c.grid = [size / c.patch_size; 2];
                Ok(Backbone::Beit(c))
            }
            Backbone::Beit3(_) => bad(
                "--input-size is not supported for BEiT-3 encoders (their position table covers image and text \
                 positions together)"
                    .into(),
            ),
        }
    }

    /// `"beit"` or `"beit3"`.
    pub fn architecture(&self) -> &'static str {
        match self {
            Backbone::Beit(_) => "beit",
            Backbone::Beit3(_) => "beit3",
        }
    }

    /// Transformer blocks.
    pub fn depth(&self) -> i64 {
        match self {
            Backbone::Beit(c) => c.depth,
            Backbone::Beit3(c) => c.depth,
        }
    }

    /// The patch grid.
    pub fn grid(&self) -> [i64; 2] {
        match self {
            Backbone::Beit(c) => c.grid,
            Backbone::Beit3(c) => c.grid,
        }
    }

    /// The data-side view of the configuration (grid, input kind, patch size).
    pub(crate) fn data_config(&self) -> ModelConfig {
        match self {
            Backbone::Beit(c) => c.clone(),
            Backbone::Beit3(c) => c.data_config(),
        }
    }

    /// BEiT's layer id of a parameter for layer-wise learning-rate decay: 0 for the embeddings (patch/token
    /// embedding, CLS token, position tables), `i + 1` for block `i`, `depth + 1` for the rest (`fc_norm`,
    /// `head`).
    pub fn layer_id(&self, name: &str) -> i64 {
        let depth = self.depth();
        let (blocks, embeds): (&str, &[&str]) = match self {
            Backbone::Beit(_) => (
                "blocks.",
                &[
                    "cls_token",
                    "mask_token",
                    "pos_embed",
                    "patch_embed.",
                    "token_embed.",
                    "rel_pos_bias.",
                ],
            ),
            Backbone::Beit3(_) => (
                "encoder.layers.",
                &["vision_embed.", "text_embed.", "encoder.embed_positions."],
            ),
        };
        if let Some(rest) = name.strip_prefix(blocks) {
            return rest
                .split('.')
                .next()
                .and_then(|i| i.parse::<i64>().ok())
                .map_or(depth + 1, |i| i + 1);
        }
        if embeds.iter().any(|e| name.starts_with(e)) {
            return 0;
        }
        depth + 1
    }

    /// Whether a parameter of the pretraining model takes part in classification (the MIM/MLM heads, the mask
    /// token and, for BEiT with mean pooling, the final `norm` do not).
    fn used(&self, name: &str) -> bool {
        match self {
            Backbone::Beit(_) => !(name.starts_with("lm_head.") || name.starts_with("norm.") || name == "mask_token"),
            Backbone::Beit3(_) => {
                !(name.starts_with("mim_head.") || name.starts_with("mlm_head.") || name == "vision_embed.mask_token")
            }
        }
    }
}

enum Encoder {
    Beit(Beit),
    Beit3(Beit3),
}

/// Encoder + mean pooling + `fc_norm` + `head`.
pub struct Classifier {
    backbone: Backbone,
    encoder: Encoder,
    vs: nn::VarStore,
    fc_norm: nn::LayerNorm,
    head: nn::Linear,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("backbone", &self.backbone)
            .field("parameters", &self.num_parameters())
            .finish()
    }
}

impl Classifier {
    /// A classifier with randomly initialised weights (encoder as in pretraining; `fc_norm` one/zero; `head`
    /// truncated normal scaled by 0.001, as BEiT's `init_scale`), drawn from `seed`.
    pub fn new(backbone: &Backbone, classes: i64, device: Device, seed: u64) -> Result<Classifier> {
        let (encoder, dim, eps) = match backbone {
            Backbone::Beit(c) => (Encoder::Beit(Beit::new(c, device, seed)?), c.dim, c.layer_norm_eps),
            Backbone::Beit3(c) => (Encoder::Beit3(Beit3::new(c, device, seed)?), c.dim, c.layer_norm_eps),
        };
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let fc_norm = nn::layer_norm(
            &root / "fc_norm",
            vec![dim],
            nn::LayerNormConfig {
                eps,
                ..Default::default()
            },
        );
        let head = nn::linear(&root / "head", dim, classes, Default::default());
        tch::no_grad(|| {
            let mut w = head.ws.shallow_clone();
            trunc_normal_(&mut w, 0.02 * 0.001, param_key(seed, "head.weight"));
            if let Some(b) = &head.bs {
                let _ = b.shallow_clone().zero_();
            }
        });
        Ok(Classifier {
            backbone: backbone.clone(),
            encoder,
            vs,
            fc_norm,
            head,
        })
    }

    /// The backbone configuration.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// The device the variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Matrix products in `kind` (bf16 autocast), the head in float32.
    pub fn set_compute_kind(&mut self, kind: Option<Kind>) {
        match &mut self.encoder {
            Encoder::Beit(m) => m.set_compute_kind(kind),
            Encoder::Beit3(m) => m.set_compute_kind(kind),
        }
    }

    /// The encoder's parameters that classification uses, by name.
    pub fn encoder_parameters(&self) -> BTreeMap<String, Tensor> {
        let all = match &self.encoder {
            Encoder::Beit(m) => m.named_parameters(),
            Encoder::Beit3(m) => m.named_parameters(),
        };
        all.into_iter().filter(|(n, _)| self.backbone.used(n)).collect()
    }

    /// `fc_norm.*` and `head.*`.
    pub fn head_parameters(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// Every trained parameter: the encoder's used ones, `fc_norm.*` and `head.*`.
    pub fn named_parameters(&self) -> BTreeMap<String, Tensor> {
        let mut all = self.encoder_parameters();
        all.extend(self.vs.variables());
        all
    }

    /// Scalar parameters trained.
    pub fn num_parameters(&self) -> i64 {
        self.named_parameters().values().map(|t| t.numel() as i64).sum()
    }

    /// The mean-pooled patch features `[B, dim]` before `fc_norm`. `train: Some(key)` enables stochastic depth.
    pub fn pooled(&self, input: &Input, train: Option<u64>) -> Tensor {
        let (x, n) = match &self.encoder {
            Encoder::Beit(m) => (m.blocks_output(input, None, train), m.config().num_patches()),
            Encoder::Beit3(m) => (
                m.encode(Some(&ImageIn { input, mask: None }), None, train).x,
                m.config().num_patches(),
            ),
        };
        x.narrow(1, 1, n).mean_dim(1, false, Kind::Float)
    }

    /// Class logits `[B, classes]`.
    pub fn logits(&self, input: &Input, train: Option<u64>) -> Tensor {
        self.head.forward(&self.fc_norm.forward(&self.pooled(input, train)))
    }

    /// Writes the trained parameters (float32 safetensors, timm / torchscale names plus `fc_norm.*`, `head.*`).
    pub fn save(&self, path: &Path) -> Result<()> {
        tensors::save_params(self.named_parameters(), path)
    }

    /// Loads what [`Classifier::save`] wrote.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        tensors::load_params(self.named_parameters(), path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_follow_beit() {
        let mut c = ModelConfig::preset("tiny", [4, 4], 64).expect("preset");
        c.depth = 3;
        let b = Backbone::Beit(c);
        for (name, id) in [
            ("cls_token", 0),
            ("patch_embed.proj.weight", 0),
            ("token_embed.weight", 0),
            ("rel_pos_bias.relative_position_bias_table", 0),
            ("blocks.0.attn.qkv.weight", 1),
            ("blocks.2.mlp.fc2.bias", 3),
            ("fc_norm.weight", 4),
            ("head.weight", 4),
        ] {
            assert_eq!(b.layer_id(name), id, "{name}");
        }
        let c3 = crate::Beit3Config::preset("beit3-tiny", [4, 4], 64, 100).expect("preset");
        let b3 = Backbone::Beit3(c3);
        assert_eq!(b3.layer_id("vision_embed.proj.weight"), 0);
        assert_eq!(b3.layer_id("encoder.embed_positions.A.weight"), 0);
        assert_eq!(b3.layer_id("encoder.layers.11.ffn.A.fc1.weight"), 12);
        assert_eq!(b3.layer_id("encoder.layer_norm.A.weight"), 13);
        assert_eq!(b3.layer_id("head.bias"), 13);
    }

    #[test]
    fn pretraining_heads_are_left_out() {
        let mut c = ModelConfig::preset("tiny", [2, 2], 16).expect("preset");
        c.depth = 1;
        let m = Classifier::new(&Backbone::Beit(c).for_finetuning(0.1), 3, Device::Cpu, 0).expect("model");
        let names: Vec<String> = m.named_parameters().into_keys().collect();
        assert!(names.contains(&"head.weight".to_string()) && names.contains(&"fc_norm.bias".to_string()));
        assert!(names.contains(&"blocks.0.attn.relative_position_bias_table".to_string()));
        for gone in [
            "lm_head.weight",
            "norm.weight",
            "mask_token",
            "rel_pos_bias.relative_position_bias_table",
        ] {
            assert!(!names.iter().any(|n| n == gone), "{gone} in {names:?}");
        }
        // BEiT's head init: truncated normal scaled by 0.001.
        let w = &m.named_parameters()["head.weight"];
        assert!(w.abs().max().double_value(&[]) <= 0.02 * 0.001 + 1e-9);
    }
}
