//! The BEiT encoder with its masked-image-modeling head, built from a [`ModelConfig`]. Parameter names follow
//! the reference BEiT pretraining code and timm's `beit_*` models (see `docs/training.md`), so the encoder's
//! weights load into PyTorch unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use imglish_ingest::{mix64, Rng};

use crate::config::{InputKind, ModelConfig, RelPosBias};
use crate::error::Result;
use crate::tensors;

/// A BEiT encoder + MIM head and the variables it owns.
pub struct Beit {
    config: ModelConfig,
    vs: nn::VarStore,
    embed: Embed,
    cls_token: Tensor,
    mask_token: Tensor,
    pos_embed: Option<Tensor>,
    shared_rel: Option<Tensor>,
    rel_index: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    lm_head: nn::Linear,
    /// Matmul precision (`None`: float32): bf16 "autocast" done per op, norms/softmax/loss stay float32.
    cast: Option<Kind>,
}

impl std::fmt::Debug for Beit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beit")
            .field("config", &self.config)
            .field("parameters", &self.num_parameters())
            .finish()
    }
}

enum Embed {
    Tokens(nn::Embedding),
    Pixels(nn::Conv2D),
}

struct Block {
    norm1: nn::LayerNorm,
    qkv: Tensor,
    q_bias: Tensor,
    v_bias: Tensor,
    proj: nn::Linear,
    rel_table: Option<Tensor>,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    gamma: Option<(Tensor, Tensor)>,
    drop_path: f64,
}

/// The model's input for one batch of views.
#[derive(Debug)]
pub enum Input {
    /// `[B, N]` int64 visual token ids.
    Tokens(Tensor),
    /// `[B, 3, H, W]` float pixels, already normalised to `(x/255 - 0.5) / 0.5`.
    Pixels(Tensor),
}

/// The relative position index of BEiT for a `grid` plus the CLS token: `[(N+1) * (N+1)]` entries into a table
/// of `(2h-1)(2w-1) + 3` rows (the last three: cls→patch, patch→cls, cls→cls).
pub fn relative_position_index(grid: [i64; 2]) -> Vec<i64> {
    let [h, w] = grid;
    let n = (h * w) as usize;
    let distances = (2 * h - 1) * (2 * w - 1) + 3;
    let mut index = vec![0i64; (n + 1) * (n + 1)];
    for a in 0..n {
        let (ya, xa) = (a as i64 / w, a as i64 % w);
        for b in 0..n {
            let (yb, xb) = (b as i64 / w, b as i64 % w);
            index[(a + 1) * (n + 1) + b + 1] = (ya - yb + h - 1) * (2 * w - 1) + (xa - xb + w - 1);
        }
    }
    index[..=n].fill(distances - 3);
    for i in 0..=n {
        index[i * (n + 1)] = distances - 2;
    }
    index[0] = distances - 1;
    index
}

fn layer_norm(p: nn::Path<'_>, config: &ModelConfig) -> nn::LayerNorm {
    let c = nn::LayerNormConfig {
        eps: config.layer_norm_eps,
        ..Default::default()
    };
    nn::layer_norm(p, vec![config.dim], c)
}

fn linear(p: nn::Path<'_>, i: i64, o: i64) -> nn::Linear {
    nn::linear(p, i, o, Default::default())
}

impl Beit {
    /// Builds the model on `device` with BEiT's initialisation drawn from `seed` (truncated normal with
    /// std `init_std` cut at ±1 std for linear weights, tokens and the head; biases zero; LayerNorm one/zero;
    /// the residual projections rescaled by `1/sqrt(2 * layer)`).
    pub fn new(config: &ModelConfig, device: Device, seed: u64) -> Result<Beit> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let c = config;
        let embed = match c.input {
            InputKind::Tokens => Embed::Tokens(nn::embedding(
                &root / "token_embed",
                c.vocab_size,
                c.dim,
                Default::default(),
            )),
            InputKind::Pixels => {
                let cc = nn::ConvConfig {
                    stride: c.patch_size,
                    ..Default::default()
                };
                Embed::Pixels(nn::conv2d(&root / "patch_embed" / "proj", 3, c.dim, c.patch_size, cc))
            }
        };
        let n = c.num_patches();
        let distances = (2 * c.grid[0] - 1) * (2 * c.grid[1] - 1) + 3;
        let cls_token = root.zeros("cls_token", &[1, 1, c.dim]);
        let mask_token = root.zeros("mask_token", &[1, 1, c.dim]);
        let pos_embed = c.abs_pos_emb.then(|| root.zeros("pos_embed", &[1, n + 1, c.dim]));
        let shared_rel = (c.rel_pos_bias == RelPosBias::Shared)
            .then(|| (&root / "rel_pos_bias").zeros("relative_position_bias_table", &[distances, c.heads]));
        let hidden = (c.dim as f64 * c.mlp_ratio) as i64;
        let blocks = (0..c.depth)
            .map(|i| {
                let b = &root / "blocks" / i;
                let a = &b / "attn";
                Block {
                    norm1: layer_norm(&b / "norm1", c),
                    qkv: (&a / "qkv").zeros("weight", &[3 * c.dim, c.dim]),
                    q_bias: a.zeros("q_bias", &[c.dim]),
                    v_bias: a.zeros("v_bias", &[c.dim]),
                    proj: linear(&a / "proj", c.dim, c.dim),
                    rel_table: (c.rel_pos_bias == RelPosBias::PerLayer)
                        .then(|| a.zeros("relative_position_bias_table", &[distances, c.heads])),
                    norm2: layer_norm(&b / "norm2", c),
                    fc1: linear(&b / "mlp" / "fc1", c.dim, hidden),
                    fc2: linear(&b / "mlp" / "fc2", hidden, c.dim),
                    gamma: c
                        .layer_scale_init
                        .map(|_| (b.ones("gamma_1", &[c.dim]), b.ones("gamma_2", &[c.dim]))),
                    drop_path: if c.depth > 1 {
                        c.drop_path * i as f64 / (c.depth - 1) as f64
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        let norm = layer_norm(&root / "norm", c);
        let lm_head = linear(&root / "lm_head", c.dim, c.vocab_size);
        let rel_index = Tensor::from_slice(&relative_position_index(c.grid)).to_device(device);
        let model = Beit {
            config: c.clone(),
            vs,
            embed,
            cls_token,
            mask_token,
            pos_embed,
            shared_rel,
            rel_index,
            blocks,
            norm,
            lm_head,
            cast: None,
        };
        model.initialise(seed);
        Ok(model)
    }

    /// BEiT's initialisation; every tensor's values come from our generator keyed by `(seed, name)`, so they
    /// depend only on the seed (not on libtorch's global generator, the order of creation or other threads).
    fn initialise(&self, seed: u64) {
        let std = self.config.init_std;
        tch::no_grad(|| {
            for (name, mut t) in self.named_parameters() {
                let key = param_key(seed, &name);
                if name.contains("norm") {
                    let _ = if name.ends_with(".weight") {
                        t.fill_(1.0)
                    } else {
                        t.zero_()
                    };
                } else if name.starts_with("patch_embed.") {
                    // PyTorch's default Conv2d initialisation (as in BEiT): U(±1/sqrt(fan_in)) for both tensors.
                    let fan_in = 3 * self.config.patch_size * self.config.patch_size;
                    uniform_(&mut t, 1.0 / (fan_in as f64).sqrt(), key);
                } else if name.ends_with("gamma_1") || name.ends_with("gamma_2") {
                    let _ = t.fill_(self.config.layer_scale_init.unwrap_or(1.0));
                } else if name.contains("relative_position_bias_table")
                    || name.ends_with("_bias")
                    || name.ends_with(".bias")
                {
                    let _ = t.zero_();
                } else {
                    // Linear weights, the token embedding, cls/mask tokens, pos_embed.
                    trunc_normal_(&mut t, std, key);
                }
            }
            // fix_init_weight: rescale the residual branches' output projections by depth.
            for (i, b) in self.blocks.iter().enumerate() {
                let scale = 1.0 / (2.0 * (i + 1) as f64).sqrt();
                let _ = b.proj.ws.shallow_clone().g_mul_scalar_(scale);
                let _ = b.fc2.ws.shallow_clone().g_mul_scalar_(scale);
            }
        });
    }

    /// Runs matrix products (linear layers, attention, patch embedding) in `kind` (e.g. `Kind::BFloat16`) with
    /// float32 weights, norms, softmax and loss: what autocast does (tch 0.26 cannot choose autocast's dtype).
    pub fn set_compute_kind(&mut self, kind: Option<Kind>) {
        self.cast = kind;
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
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

    /// Embeds a batch of views and replaces the masked positions (`mask`: `[B, N]` bool) by the mask token.
    fn embed(&self, input: &Input, mask: Option<&Tensor>) -> Tensor {
        let x = match (&self.embed, input) {
            (Embed::Tokens(e), Input::Tokens(t)) => e.forward(t),
            (Embed::Pixels(conv), Input::Pixels(p)) => patch_embed(conv, p, self.config.patch_size, self.cast),
            _ => panic!("model input kind does not match the model configuration"),
        };
        with_mask_token(x, mask, &self.mask_token)
    }

    fn rel_bias(&self, table: &Tensor) -> Tensor {
        let n = self.config.num_patches() + 1;
        table
            .index_select(0, &self.rel_index)
            .view([n, n, self.config.heads])
            .permute([2, 0, 1])
            .unsqueeze(0)
    }

    /// The encoder: `[B, N+1, dim]` after the final LayerNorm (position 0 is the CLS token). `train: Some(key)`
    /// enables stochastic depth, its per-sample draws keyed by `(key, block)` (no global RNG: the result depends
    /// only on the arguments); `None` is evaluation.
    pub fn features(&self, input: &Input, mask: Option<&Tensor>, train: Option<u64>) -> Tensor {
        self.norm.forward(&self.blocks_output(input, mask, train))
    }

    /// The last block's output `[B, N+1, dim]`, before the final LayerNorm (fine-tuning with mean pooling
    /// normalises the pooled patches with `fc_norm` instead, as timm's `Beit` with `global_pool='avg'`).
    pub fn blocks_output(&self, input: &Input, mask: Option<&Tensor>, train: Option<u64>) -> Tensor {
        let x = self.embed(input, mask);
        let b = x.size()[0];
        let cls = self.cls_token.expand([b, 1, self.config.dim], false);
        let mut x = Tensor::cat(&[cls, x], 1);
        if let Some(p) = &self.pos_embed {
            x += p;
        }
        let shared = self.shared_rel.as_ref().map(|t| self.rel_bias(t));
        for (i, block) in self.blocks.iter().enumerate() {
            let key = train.map(|k| mix64(k ^ mix64(i as u64 + 1)));
            let bias = block
                .rel_table
                .as_ref()
                .map(|t| self.rel_bias(t))
                .or_else(|| shared.as_ref().map(Tensor::shallow_clone));
            x = block.forward(&x, bias.as_ref(), &self.config, key, self.cast);
        }
        x
    }

    /// MIM logits `[M, vocab]` for the `M` masked positions of the batch, in row-major order over `(b, n)`.
    pub fn mim_logits(&self, input: &Input, mask: &Tensor, train: Option<u64>) -> Tensor {
        let x = self.features(input, Some(mask), train);
        let patches = x.narrow(1, 1, self.config.num_patches());
        let picked = patches.index(&[Some(mask.shallow_clone())]);
        lin(&self.lm_head, &picked, self.cast)
    }

    /// Mean-pooled patch features `[B, dim]` of unmasked views (for linear probing).
    pub fn pooled(&self, input: &Input) -> Tensor {
        self.features(input, None, None)
            .narrow(1, 1, self.config.num_patches())
            .mean_dim(1, false, Kind::Float)
    }

    /// Writes every parameter to a safetensors file (float32, PyTorch names; see `docs/training.md`).
    pub fn save(&self, path: &Path) -> Result<()> {
        tensors::save_params(self.named_parameters(), path)
    }

    /// Loads every parameter from a safetensors file written by [`Beit::save`] (or by PyTorch with the same
    /// names); a missing, extra or misshaped tensor is an error naming it.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        tensors::load_params(self.named_parameters(), path)
    }
}

/// Patch embedding `[B, N, dim]` of pixels `[B, 3, H, W]` through the strided convolution `conv`, computed in
/// `cast` (if set) and returned in float32.
pub(crate) fn patch_embed(conv: &nn::Conv2D, pixels: &Tensor, patch: i64, cast: Option<Kind>) -> Tensor {
    match cast {
        None => conv.forward(pixels),
        Some(k) => pixels
            .to_kind(k)
            .conv2d(
                &conv.ws.to_kind(k),
                conv.bs.as_ref().map(|b| b.to_kind(k)),
                [patch; 2],
                [0, 0],
                [1, 1],
                1,
            )
            .to_kind(Kind::Float),
    }
    .flatten(2, -1)
    .transpose(1, 2)
}

/// `x` `[B, N, dim]` with the positions of `mask` (`[B, N]` bool) replaced by `mask_token`.
pub(crate) fn with_mask_token(x: Tensor, mask: Option<&Tensor>, mask_token: &Tensor) -> Tensor {
    match mask {
        Some(m) => {
            let w = m.unsqueeze(-1).to_kind(x.kind());
            &x * (1.0 - &w) + mask_token * &w
        }
        None => x,
    }
}

/// The generator key of parameter `name` for initialisation seed `seed`.
pub(crate) fn param_key(seed: u64, name: &str) -> u64 {
    mix64(
        seed ^ name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| mix64(h ^ u64::from(b))),
    )
}

/// A linear layer computed in `cast` (if set), returned in float32.
pub(crate) fn lin(l: &nn::Linear, x: &Tensor, cast: Option<Kind>) -> Tensor {
    match cast {
        None => l.forward(x),
        Some(k) => x
            .to_kind(k)
            .linear(&l.ws.to_kind(k), l.bs.as_ref().map(|b| b.to_kind(k)))
            .to_kind(Kind::Float),
    }
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        rel_bias: Option<&Tensor>,
        c: &ModelConfig,
        key: Option<u64>,
        cast: Option<Kind>,
    ) -> Tensor {
        let y = self.attention(&self.norm1.forward(x), rel_bias, c, cast);
        let y = match &self.gamma {
            Some((g1, _)) => y * g1,
            None => y,
        };
        let x = x + drop_path(&y, self.drop_path, key.map(|k| mix64(k ^ 1)));
        let y = lin(
            &self.fc2,
            &lin(&self.fc1, &self.norm2.forward(&x), cast).gelu("none"),
            cast,
        );
        let y = match &self.gamma {
            Some((_, g2)) => y * g2,
            None => y,
        };
        &x + drop_path(&y, self.drop_path, key.map(|k| mix64(k ^ 2)))
    }

    fn attention(&self, x: &Tensor, rel_bias: Option<&Tensor>, c: &ModelConfig, cast: Option<Kind>) -> Tensor {
        let (b, n) = (x.size()[0], x.size()[1]);
        let hd = c.dim / c.heads;
        let bias = Tensor::cat(&[&self.q_bias, &self.v_bias.zeros_like(), &self.v_bias], 0);
        let k = cast.unwrap_or(Kind::Float);
        let qkv = x
            .to_kind(k)
            .linear(&self.qkv.to_kind(k), Some(&bias.to_kind(k)))
            .view([b, n, 3, c.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let q = q * (hd as f64).powf(-0.5);
        let mut attn = q.matmul(&k.transpose(-2, -1)).to_kind(Kind::Float);
        if let Some(bias) = rel_bias {
            attn += bias;
        }
        let out = attn
            .softmax(-1, Kind::Float)
            .to_kind(v.kind())
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b, n, c.dim])
            .to_kind(Kind::Float);
        lin(&self.proj, &out, cast)
    }
}

/// Stochastic depth: drops the whole residual branch of a sample with probability `p` (scaled by `1/(1-p)`),
/// the per-sample draws from our own generator keyed by `key` (`None`: evaluation, nothing dropped).
pub(crate) fn drop_path(x: &Tensor, p: f64, key: Option<u64>) -> Tensor {
    let Some(key) = key.filter(|_| p > 0.0) else {
        return x.shallow_clone();
    };
    let keep = 1.0 - p;
    let mut rng = Rng::new(key);
    let scale: Vec<f32> = (0..x.size()[0])
        .map(|_| {
            if rng.next_f64() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    let scale = Tensor::from_slice(&scale)
        .view([-1, 1, 1])
        .to_device(x.device())
        .to_kind(x.kind());
    x * scale
}

/// Fills `t` with BEiT's `trunc_normal_(t, std, a=-std, b=std)`: a normal cut at ±1 std (rejection sampling),
/// drawn from our generator keyed by `key` (independent of libtorch's global generator and of other threads).
pub(crate) fn trunc_normal_(t: &mut Tensor, std: f64, key: u64) {
    let mut rng = Rng::new(key);
    let n = t.numel();
    let mut values = Vec::with_capacity(n);
    while values.len() < n {
        // Box-Muller: two normals per pair of uniforms.
        let (u1, u2) = (rng.next_f64().max(f64::MIN_POSITIVE), rng.next_f64());
        let r = (-2.0 * u1.ln()).sqrt();
        for z in [
            r * (std::f64::consts::TAU * u2).cos(),
            r * (std::f64::consts::TAU * u2).sin(),
        ] {
            if z.abs() <= 1.0 && values.len() < n {
                values.push((z * std) as f32);
            }
        }
    }
    let src = Tensor::from_slice(&values)
        .view(t.size().as_slice())
        .to_device(t.device());
    t.copy_(&src);
}

/// Fills `t` uniformly in `[-bound, bound]` from our generator keyed by `key`.
pub(crate) fn uniform_(t: &mut Tensor, bound: f64, key: u64) {
    let mut rng = Rng::new(key);
    let values: Vec<f32> = (0..t.numel()).map(|_| rng.uniform(-bound, bound) as f32).collect();
    let src = Tensor::from_slice(&values)
        .view(t.size().as_slice())
        .to_device(t.device());
    t.copy_(&src);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_normal_statistics() {
        let mut t = Tensor::zeros([200_000], (Kind::Float, Device::Cpu));
        trunc_normal_(&mut t, 0.02, 7);
        let v: Vec<f32> = Vec::try_from(&t).expect("f32");
        assert!(v.iter().all(|x| x.abs() <= 0.02));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / v.len() as f64;
        // A standard normal cut at ±1 has variance 1 - 2·φ(1)/(Φ(1) - Φ(-1)) = 0.29112.
        assert!(mean.abs() < 1e-4, "{mean}");
        assert!((var.sqrt() / 0.02 - 0.29112f64.sqrt()).abs() < 0.005, "{}", var.sqrt());
    }

    #[test]
    fn relative_position_index_matches_beit() {
        // 2x2 grid: table of 3*3+3 = 12 rows; cls rows/cols point at 9, 10, 11.
        let idx = relative_position_index([2, 2]);
        let n = 5;
        assert_eq!(idx.len(), 25);
        assert_eq!(idx[0], 11);
        assert_eq!(&idx[1..5], &[9, 9, 9, 9]);
        assert!((1..5).all(|i| idx[i * n] == 10));
        // Patch (0,0) to itself: offset (0,0) -> (0+1)*3 + (0+1) = 4; (0,0)->(1,1): dy=-1,dx=-1 -> 0.
        assert_eq!(idx[n + 1], 4);
        assert_eq!(idx[n + 4], 0);
        // (1,1)->(0,0): dy=1, dx=1 -> 2*3 + 2 = 8.
        assert_eq!(idx[4 * n + 1], 8);
        // 14x14: 27*27+3 = 732 rows, every entry in range, symmetric pairs differ.
        let big = relative_position_index([14, 14]);
        assert!(big.iter().all(|&i| (0..732).contains(&i)));
        assert_eq!(big[0], 731);
    }
}
