//! The BEiT-3 Multiway Transformer (torchscale's `BEiT3` with `subln`, pre-LayerNorm) with a MIM head over the
//! visual vocabulary and an MLM head over the text vocabulary. Parameter names are torchscale's, so the encoder's
//! weights load into `torchscale.model.BEiT3.BEiT3` with `strict=True` (the heads, `mim_head.*` and
//! `mlm_head.*`, are imglish's).
//!
//! Multiway is one wrapper ([`Multiway`]) around a module: an `A` copy for vision positions and a `B` copy for
//! text positions, applied to the two parts of the joint sequence; only attention mixes them.

use std::collections::BTreeMap;
use std::path::Path;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use imglish_ingest::mix64;

use crate::beit3::config::Beit3Config;
use crate::config::InputKind;
use crate::error::Result;
use crate::model::{drop_path, lin, param_key, patch_embed, trunc_normal_, uniform_, with_mask_token, Input};
use crate::tensors;

/// Which expert each position of a sequence uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Every position is vision (`A`): image-only input.
    Vision,
    /// Every position is text (`B`): text-only input.
    Text,
    /// The first `n` positions are vision, the rest text: image-text pairs.
    Split(i64),
}

/// A module with a vision (`A`) and a language (`B`) copy.
struct Multiway<T> {
    a: T,
    b: T,
}

impl<T> Multiway<T> {
    fn new(p: &nn::Path<'_>, make: impl Fn(nn::Path<'_>) -> T) -> Multiway<T> {
        Multiway {
            a: make(p / "A"),
            b: make(p / "B"),
        }
    }

    /// Applies `f` with the `A` copy to vision positions and the `B` copy to text positions (dimension 1).
    fn apply(&self, x: &Tensor, way: Way, f: impl Fn(&T, &Tensor) -> Tensor) -> Tensor {
        match way {
            Way::Vision => f(&self.a, x),
            Way::Text => f(&self.b, x),
            Way::Split(n) => {
                let len = x.size()[1];
                Tensor::cat(
                    &[f(&self.a, &x.narrow(1, 0, n)), f(&self.b, &x.narrow(1, n, len - n))],
                    1,
                )
            }
        }
    }
}

impl Multiway<nn::Linear> {
    fn forward(&self, x: &Tensor, way: Way, cast: Option<Kind>) -> Tensor {
        self.apply(x, way, |l, x| lin(l, x, cast))
    }
}

impl Multiway<nn::LayerNorm> {
    fn forward(&self, x: &Tensor, way: Way) -> Tensor {
        self.apply(x, way, |l, x| l.forward(x))
    }
}

struct Ffn {
    fc1: nn::Linear,
    fc2: nn::Linear,
    ffn_layernorm: nn::LayerNorm,
}

struct Layer {
    self_attn_layer_norm: Multiway<nn::LayerNorm>,
    q_proj: Multiway<nn::Linear>,
    k_proj: Multiway<nn::Linear>,
    v_proj: Multiway<nn::Linear>,
    out_proj: Multiway<nn::Linear>,
    inner_attn_ln: Multiway<nn::LayerNorm>,
    final_layer_norm: Multiway<nn::LayerNorm>,
    ffn: Multiway<Ffn>,
    /// The vision-language expert (`ffn.C`), in the top `vl_experts` layers: pairs use it over the whole
    /// sequence.
    ffn_vl: Option<Ffn>,
    /// LayerScale factors of the attention and feed-forward branches (BEiT's `gamma_1`, `gamma_2`).
    gamma: Option<(Tensor, Tensor)>,
    drop_path: f64,
}

enum VisionInput {
    Pixels(nn::Conv2D),
    Tokens(nn::Embedding),
}

/// The image side of a forward pass.
#[derive(Debug)]
pub struct ImageIn<'a> {
    /// Token ids `[B, N]` or normalised pixels `[B, 3, H, W]`.
    pub input: &'a Input,
    /// `[B, N]` bool, `true` = replaced by the mask token.
    pub mask: Option<&'a Tensor>,
}

/// The text side of a forward pass.
#[derive(Debug)]
pub struct TextIn<'a> {
    /// `[B, L]` int64 text token ids (already masked for MLM).
    pub ids: &'a Tensor,
    /// `[B, L]` bool, `true` = padding (ignored by attention, zeroed after embedding).
    pub padding: Option<&'a Tensor>,
}

/// The encoder's output.
#[derive(Debug)]
pub struct Encoded {
    /// `[B, L, dim]` after the final Multiway LayerNorm: `[cls, patches..., text...]`.
    pub x: Tensor,
    /// How the sequence is split between the experts.
    pub way: Way,
}

impl Encoded {
    /// The vision part `[B, N+1, dim]` (CLS first), if any.
    pub fn vision(&self) -> Option<Tensor> {
        match self.way {
            Way::Vision => Some(self.x.shallow_clone()),
            Way::Text => None,
            Way::Split(n) => Some(self.x.narrow(1, 0, n)),
        }
    }

    /// The text part `[B, L, dim]`, if any.
    pub fn text(&self) -> Option<Tensor> {
        match self.way {
            Way::Vision => None,
            Way::Text => Some(self.x.shallow_clone()),
            Way::Split(n) => Some(self.x.narrow(1, n, self.x.size()[1] - n)),
        }
    }
}

/// A BEiT-3 encoder + MIM and MLM heads and the variables it owns.
pub struct Beit3 {
    config: Beit3Config,
    vs: nn::VarStore,
    text_embed: Tensor,
    vision: VisionInput,
    cls_token: Tensor,
    mask_token: Tensor,
    pos_a: Tensor,
    pos_b: Tensor,
    layers: Vec<Layer>,
    layer_norm: Multiway<nn::LayerNorm>,
    mim_head: nn::Linear,
    mlm_weight: Option<Tensor>,
    mlm_bias: Tensor,
    cast: Option<Kind>,
}

impl std::fmt::Debug for Beit3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beit3")
            .field("config", &self.config)
            .field("parameters", &self.num_parameters())
            .finish()
    }
}

fn layer_norm(p: nn::Path<'_>, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

fn linear(p: nn::Path<'_>, i: i64, o: i64) -> nn::Linear {
    nn::linear(p, i, o, Default::default())
}

fn ffn(p: nn::Path<'_>, c: &Beit3Config) -> Ffn {
    Ffn {
        fc1: linear(&p / "fc1", c.dim, c.ffn_dim),
        fc2: linear(&p / "fc2", c.ffn_dim, c.dim),
        ffn_layernorm: layer_norm(&p / "ffn_layernorm", c.ffn_dim, c.layer_norm_eps),
    }
}

impl Ffn {
    fn forward(&self, h: &Tensor, cast: Option<Kind>) -> Tensor {
        let a = lin(&self.fc1, h, cast).gelu("none");
        lin(&self.fc2, &self.ffn_layernorm.forward(&a), cast)
    }
}

impl Beit3 {
    /// Builds the model on `device`, initialised from `seed`: truncated normal (std `init_std`, cut at ±1 std)
    /// for linear weights, embeddings and tokens; zero biases; LayerNorm one/zero; then torchscale's sub-LN
    /// scaling of `fc1`, `fc2`, `out_proj` and `v_proj` weights by `sqrt(ln(2 * depth))`.
    pub fn new(config: &Beit3Config, device: Device, seed: u64) -> Result<Beit3> {
        config.validate()?;
        let c = config;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let eps = c.layer_norm_eps;
        let text_embed = (&root / "text_embed").zeros("weight", &[c.text_vocab_size, c.dim]);
        let ve = &root / "vision_embed";
        let vision = match c.input {
            InputKind::Pixels => {
                let cc = nn::ConvConfig {
                    stride: c.patch_size,
                    ..Default::default()
                };
                VisionInput::Pixels(nn::conv2d(&ve / "proj", 3, c.dim, c.patch_size, cc))
            }
            InputKind::Tokens => VisionInput::Tokens(nn::embedding(
                &ve / "token_embed",
                c.vocab_size,
                c.dim,
                Default::default(),
            )),
        };
        let cls_token = ve.zeros("cls_token", &[1, 1, c.dim]);
        let mask_token = ve.zeros("mask_token", &[1, 1, c.dim]);
        let enc = &root / "encoder";
        let pos = &enc / "embed_positions";
        let pos_a = (&pos / "A").zeros("weight", &[c.num_patches() + 1 + 2, c.dim]);
        let pos_b = (&pos / "B").zeros("weight", &[c.max_source_positions, c.dim]);
        let layers = (0..c.depth)
            .map(|i| {
                let l = &enc / "layers" / i;
                let a = &l / "self_attn";
                Layer {
                    self_attn_layer_norm: Multiway::new(&(&l / "self_attn_layer_norm"), |p| layer_norm(p, c.dim, eps)),
                    q_proj: Multiway::new(&(&a / "q_proj"), |p| linear(p, c.dim, c.dim)),
                    k_proj: Multiway::new(&(&a / "k_proj"), |p| linear(p, c.dim, c.dim)),
                    v_proj: Multiway::new(&(&a / "v_proj"), |p| linear(p, c.dim, c.dim)),
                    out_proj: Multiway::new(&(&a / "out_proj"), |p| linear(p, c.dim, c.dim)),
                    inner_attn_ln: Multiway::new(&(&a / "inner_attn_ln"), |p| layer_norm(p, c.dim, eps)),
                    final_layer_norm: Multiway::new(&(&l / "final_layer_norm"), |p| layer_norm(p, c.dim, eps)),
                    ffn: Multiway::new(&(&l / "ffn"), |p| ffn(p, c)),
                    ffn_vl: (i >= c.depth - c.vl_experts).then(|| ffn(&l / "ffn" / "C", c)),
                    gamma: c
                        .layer_scale_init
                        .map(|_| (l.zeros("gamma_1", &[c.dim]), l.zeros("gamma_2", &[c.dim]))),
                    drop_path: if c.depth > 1 {
                        c.drop_path * i as f64 / (c.depth - 1) as f64
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        let layer_norm = Multiway::new(&(&enc / "layer_norm"), |p| layer_norm(p, c.dim, eps));
        let mim_head = linear(&root / "mim_head", c.dim, c.vocab_size);
        let mlm = &root / "mlm_head";
        let mlm_weight = (!c.tie_mlm_head).then(|| mlm.zeros("weight", &[c.text_vocab_size, c.dim]));
        let mlm_bias = mlm.zeros("bias", &[c.text_vocab_size]);
        let model = Beit3 {
            config: c.clone(),
            vs,
            text_embed,
            vision,
            cls_token,
            mask_token,
            pos_a,
            pos_b,
            layers,
            layer_norm,
            mim_head,
            mlm_weight,
            mlm_bias,
            cast: None,
        };
        model.initialise(seed);
        Ok(model)
    }

    fn initialise(&self, seed: u64) {
        let c = &self.config;
        let subln_scale = (2.0 * c.depth as f64).ln().sqrt();
        tch::no_grad(|| {
            for (name, mut t) in self.named_parameters() {
                let key = param_key(seed, &name);
                if name.ends_with(".gamma_1") || name.ends_with(".gamma_2") {
                    let _ = t.fill_(c.layer_scale_init.unwrap_or(1.0));
                } else if name.contains("norm") || name.contains("_ln.") {
                    let _ = if name.ends_with(".weight") {
                        t.fill_(1.0)
                    } else {
                        t.zero_()
                    };
                } else if name.starts_with("vision_embed.proj.") {
                    // PyTorch's default Conv2d initialisation: U(±1/sqrt(fan_in)) for both tensors.
                    let fan_in = 3 * c.patch_size * c.patch_size;
                    uniform_(&mut t, 1.0 / (fan_in as f64).sqrt(), key);
                } else if name.ends_with(".bias") {
                    let _ = t.zero_();
                } else {
                    trunc_normal_(&mut t, c.init_std, key);
                    let scaled = ["fc1.", "fc2.", "out_proj.", "v_proj."];
                    if name.starts_with("encoder.layers.") && scaled.iter().any(|s| name.contains(s)) {
                        let _ = t.g_mul_scalar_(subln_scale);
                    }
                }
            }
        });
    }

    /// Runs matrix products in `kind` (e.g. `Kind::BFloat16`) with float32 weights, norms, softmax and loss.
    pub fn set_compute_kind(&mut self, kind: Option<Kind>) {
        self.cast = kind;
    }

    /// The configuration.
    pub fn config(&self) -> &Beit3Config {
        &self.config
    }

    /// The device the variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Every parameter by name, sorted.
    pub fn named_parameters(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// Number of scalar parameters.
    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(Tensor::numel).map(|n| n as i64).sum()
    }

    /// `[B, N+1, dim]`: patch embeddings (masked positions replaced by the mask token), CLS first, plus the
    /// vision position embeddings (rows 2.. of table A).
    fn embed_image(&self, image: &ImageIn<'_>) -> Tensor {
        let x = match (&self.vision, image.input) {
            (VisionInput::Tokens(e), Input::Tokens(t)) => e.forward(t),
            (VisionInput::Pixels(conv), Input::Pixels(p)) => patch_embed(conv, p, self.config.patch_size, self.cast),
            _ => panic!("model input kind does not match the model configuration"),
        };
        let x = with_mask_token(x, image.mask, &self.mask_token);
        let b = x.size()[0];
        let cls = self.cls_token.expand([b, 1, self.config.dim], false);
        let x = Tensor::cat(&[cls, x], 1);
        let n = x.size()[1];
        x + self.pos_a.narrow(0, 2, n).unsqueeze(0)
    }

    /// `[B, L, dim]`: text embeddings plus the text position embeddings (rows 2.. of table B).
    fn embed_text(&self, text: &TextIn<'_>) -> Tensor {
        let len = text.ids.size()[1];
        assert!(
            len <= self.config.max_text_len(),
            "text of {len} tokens is longer than the position table allows ({})",
            self.config.max_text_len()
        );
        Tensor::embedding(&self.text_embed, text.ids, -1, false, false) + self.pos_b.narrow(0, 2, len).unsqueeze(0)
    }

    /// The encoder over an image, a text, or both (the joint sequence `[cls, patches, text]`). `train:
    /// Some(key)` enables stochastic depth keyed by `(key, layer)`; `None` is evaluation.
    pub fn encode(&self, image: Option<&ImageIn<'_>>, text: Option<&TextIn<'_>>, train: Option<u64>) -> Encoded {
        let (mut x, way, padding) = match (image, text) {
            (Some(i), None) => (self.embed_image(i), Way::Vision, None),
            (None, Some(t)) => (self.embed_text(t), Way::Text, t.padding.map(Tensor::shallow_clone)),
            (Some(i), Some(t)) => {
                let v = self.embed_image(i);
                let n = v.size()[1];
                let padding = t.padding.map(|p| {
                    let b = p.size()[0];
                    Tensor::cat(&[Tensor::zeros([b, n], (Kind::Bool, p.device())), p.shallow_clone()], 1)
                });
                (Tensor::cat(&[v, self.embed_text(t)], 1), Way::Split(n), padding)
            }
            (None, None) => panic!("BEiT-3 needs an image, a text or both"),
        };
        if let Some(p) = &padding {
            x = &x * (1.0 - p.unsqueeze(-1).to_kind(x.kind()));
        }
        // Padded keys get -inf before the softmax (torchscale's key_padding_mask).
        let key_mask = padding.as_ref().map(|p| p.unsqueeze(1).unsqueeze(2));
        for (i, layer) in self.layers.iter().enumerate() {
            let key = train.map(|k| mix64(k ^ mix64(i as u64 + 1)));
            x = layer.forward(&x, way, key_mask.as_ref(), &self.config, key, self.cast);
        }
        Encoded {
            x: self.layer_norm.forward(&x, way),
            way,
        }
    }

    /// MIM logits `[M, vocab]` for the masked patches (`mask` `[B, N]`), row-major over `(b, n)`.
    pub fn mim_logits(&self, encoded: &Encoded, mask: &Tensor) -> Tensor {
        let vision = encoded.vision().expect("MIM logits need an image");
        let patches = vision.narrow(1, 1, self.config.num_patches());
        let picked = patches.index(&[Some(mask.shallow_clone())]);
        lin(&self.mim_head, &picked, self.cast)
    }

    /// MLM logits `[M, text_vocab]` for the text positions selected by `mask` (`[B, L]`), row-major.
    pub fn mlm_logits(&self, encoded: &Encoded, mask: &Tensor) -> Tensor {
        let text = encoded.text().expect("MLM logits need a text");
        let picked = text.index(&[Some(mask.shallow_clone())]);
        let weight = self.mlm_weight.as_ref().unwrap_or(&self.text_embed);
        match self.cast {
            None => picked.linear(weight, Some(&self.mlm_bias)),
            Some(k) => picked
                .to_kind(k)
                .linear(&weight.to_kind(k), Some(&self.mlm_bias.to_kind(k)))
                .to_kind(Kind::Float),
        }
    }

    /// Pooled image features `[B, dim]` of unmasked views: the mean of the patch outputs (image-only forward).
    pub fn image_pooled(&self, input: &Input) -> Tensor {
        let e = self.encode(Some(&ImageIn { input, mask: None }), None, None);
        e.x.narrow(1, 1, self.config.num_patches())
            .mean_dim(1, false, Kind::Float)
    }

    /// The CLS output `[B, dim]` of an image-only forward.
    pub fn image_cls(&self, input: &Input) -> Tensor {
        let e = self.encode(Some(&ImageIn { input, mask: None }), None, None);
        e.x.select(1, 0)
    }

    /// Pooled text features `[B, dim]`: the mean of a text-only forward's outputs over the non-padding
    /// positions.
    pub fn text_pooled(&self, ids: &Tensor, padding: Option<&Tensor>) -> Tensor {
        let e = self.encode(None, Some(&TextIn { ids, padding }), None);
        match padding {
            None => e.x.mean_dim(1, false, Kind::Float),
            Some(p) => {
                let keep = p.logical_not().unsqueeze(-1).to_kind(Kind::Float);
                (&e.x * &keep).sum_dim_intlist(1, false, Kind::Float) / keep.sum_dim_intlist(1, false, Kind::Float)
            }
        }
    }

    /// Writes every parameter to a safetensors file (float32, torchscale names plus `mim_head.*`,
    /// `mlm_head.*`).
    pub fn save(&self, path: &Path) -> Result<()> {
        tensors::save_params(self.named_parameters(), path)
    }

    /// Loads every parameter from a safetensors file written by [`Beit3::save`] (or by PyTorch with the same
    /// names); a missing, extra or misshaped tensor is an error naming it.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        tensors::load_params(self.named_parameters(), path)
    }
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        way: Way,
        key_mask: Option<&Tensor>,
        c: &Beit3Config,
        key: Option<u64>,
        cast: Option<Kind>,
    ) -> Tensor {
        let scaled = |y: Tensor, g: fn(&(Tensor, Tensor)) -> &Tensor| match &self.gamma {
            Some(gamma) => y * g(gamma),
            None => y,
        };
        let y = self.attention(&self.self_attn_layer_norm.forward(x, way), way, key_mask, c, cast);
        let y = scaled(y, |g| &g.0);
        let x = x + drop_path(&y, self.drop_path, key.map(|k| mix64(k ^ 1)));
        let h = self.final_layer_norm.forward(&x, way);
        let y = match (&self.ffn_vl, way) {
            (Some(vl), Way::Split(_)) => vl.forward(&h, cast),
            _ => self.ffn.apply(&h, way, |f, h| f.forward(h, cast)),
        };
        let y = scaled(y, |g| &g.1);
        &x + drop_path(&y, self.drop_path, key.map(|k| mix64(k ^ 2)))
    }

    fn attention(
        &self,
        x: &Tensor,
        way: Way,
        key_mask: Option<&Tensor>,
        c: &Beit3Config,
        cast: Option<Kind>,
    ) -> Tensor {
        let (b, n) = (x.size()[0], x.size()[1]);
        let hd = c.dim / c.heads;
        let heads = |t: Tensor| t.view([b, n, c.heads, hd]).transpose(1, 2);
        let q = heads(self.q_proj.forward(x, way, cast) * (hd as f64).powf(-0.5));
        let k = heads(self.k_proj.forward(x, way, cast));
        let v = heads(self.v_proj.forward(x, way, cast));
        let kind = cast.unwrap_or(Kind::Float);
        let mut attn = q
            .to_kind(kind)
            .matmul(&k.to_kind(kind).transpose(-2, -1))
            .to_kind(Kind::Float);
        if let Some(m) = key_mask {
            attn = attn.masked_fill(m, f64::NEG_INFINITY);
        }
        let out = attn
            .softmax(-1, Kind::Float)
            .to_kind(kind)
            .matmul(&v.to_kind(kind))
            .transpose(1, 2)
            .reshape([b, n, c.dim])
            .to_kind(Kind::Float);
        let out = self.inner_attn_ln.forward(&out, way);
        self.out_proj.forward(&out, way, cast)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vision_language_experts_change_pairs_only() {
        let mut c = Beit3Config::preset("beit3-tiny", [2, 2], 20, 30).expect("preset");
        (c.dim, c.heads, c.depth, c.ffn_dim, c.max_source_positions) = (16, 2, 2, 32, 12);
        let plain = Beit3::new(&c, Device::Cpu, 1).expect("model");
        c.vl_experts = 1;
        let vl = Beit3::new(&c, Device::Cpu, 1).expect("model");
        let extra: Vec<String> = vl
            .named_parameters()
            .into_keys()
            .filter(|k| !plain.named_parameters().contains_key(k))
            .collect();
        assert_eq!(
            extra,
            [
                "encoder.layers.1.ffn.C.fc1.bias",
                "encoder.layers.1.ffn.C.fc1.weight",
                "encoder.layers.1.ffn.C.fc2.bias",
                "encoder.layers.1.ffn.C.fc2.weight",
                "encoder.layers.1.ffn.C.ffn_layernorm.bias",
                "encoder.layers.1.ffn.C.ffn_layernorm.weight",
            ]
        );
        let tokens = Input::Tokens(Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8]).view([2, 4]));
        let ids = Tensor::from_slice(&[2i64, 7, 9, 3, 2, 11, 3, 0]).view([2, 4]);
        let image = ImageIn {
            input: &tokens,
            mask: None,
        };
        let text = TextIn {
            ids: &ids,
            padding: None,
        };
        let diff = |a: &Encoded, b: &Encoded| (&a.x - &b.x).abs().max().double_value(&[]);
        assert_eq!(
            diff(
                &plain.encode(Some(&image), None, None),
                &vl.encode(Some(&image), None, None)
            ),
            0.0
        );
        assert_eq!(
            diff(
                &plain.encode(None, Some(&text), None),
                &vl.encode(None, Some(&text), None)
            ),
            0.0
        );
        assert!(
            diff(
                &plain.encode(Some(&image), Some(&text), None),
                &vl.encode(Some(&image), Some(&text), None)
            ) > 1e-3
        );
        c.vl_experts = 3;
        assert!(c.validate().is_err());
    }

    #[test]
    fn layer_scale_multiplies_each_branch() {
        let mut c = Beit3Config::preset("beit3-tiny", [2, 2], 20, 30).expect("preset");
        (c.dim, c.heads, c.depth, c.ffn_dim, c.max_source_positions) = (16, 2, 2, 32, 12);
        let plain = Beit3::new(&c, Device::Cpu, 1).expect("model");
        c.layer_scale_init = Some(0.1);
        let scaled = Beit3::new(&c, Device::Cpu, 1).expect("model");
        let params = scaled.named_parameters();
        let gammas: Vec<&String> = params.keys().filter(|k| k.contains("gamma")).collect();
        assert_eq!(
            gammas,
            [
                "encoder.layers.0.gamma_1",
                "encoder.layers.0.gamma_2",
                "encoder.layers.1.gamma_1",
                "encoder.layers.1.gamma_2"
            ]
        );
        assert_eq!(params["encoder.layers.0.gamma_1"].double_value(&[3]), 0.1_f32 as f64);
        assert!(c.torchscale_kwargs().is_err(), "no torchscale counterpart");
        let tokens = Input::Tokens(Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8]).view([2, 4]));
        let image = ImageIn {
            input: &tokens,
            mask: None,
        };
        let x = |m: &Beit3| m.encode(Some(&image), None, None).x;
        assert!((x(&plain) - x(&scaled)).abs().max().double_value(&[]) > 1e-3);
        // With factors of 1 the model is the plain one (same seed, same other parameters).
        tch::no_grad(|| {
            for g in &gammas {
                let _ = params[*g].shallow_clone().fill_(1.0);
            }
        });
        assert!((x(&plain) - x(&scaled)).abs().max().double_value(&[]) < 1e-6);
    }
}
