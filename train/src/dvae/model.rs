//! The discrete VAE: a convolutional encoder with residual blocks producing logits over K codes per grid cell,
//! and a convolutional decoder from (relaxed) one-hot codes back to pixels.
//!
//! Layout for an input of S pixels and a grid of G cells (S/G = 2^L):
//! - encoder: `enc.stem` (3x3, 3 → w) at full resolution; for each level l = 1..=L a 2x2 stride-2 convolution
//!   `enc.down{l}` (halving the resolution) then `blocks` residual blocks `enc.level{l}.block{b}`
//!   (x + conv1x1(relu(conv3x3(relu(x)))), the 3x3 convolution halving the channels); `enc.logits` (1x1 → K)
//!   after a ReLU.
//! - decoder: `dec.embed` (1x1, K → width at level L: on one-hot codes, a table lookup); for l = L..=1 the
//!   residual blocks `dec.level{l}.block{b}` then a 2x2 stride-2 transposed convolution `dec.up{l}` after a ReLU;
//!   `dec.out` (3x3 → 3 pixel channels for MSE, 6 for logit-Laplace: means then log-scales) after a ReLU.
//!
//! Widths: w at full resolution, doubling per level up to 4w. The ONNX export (`imglish_tokenizer::dvae`) builds
//! the same graph from these parameter names.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::model::{param_key, uniform_};
use crate::tensors;

/// The value of every component of a retired VQ code vector: its score `2 z·c - |c|²` is then about `-D·10⁸`,
/// below any real code's.
const RETIRED: f32 = 1e4;
/// Codes closer than this to a more used code (relative to the mean code norm) are retired before export.
const NEAR_DUPLICATE: f64 = 2e-2;

/// What the decoder's pixels are scored with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Recon {
    /// Mean squared error on pixels in [0, 1].
    #[default]
    Mse,
    /// DALL-E's logit-Laplace likelihood on pixels mapped to [eps, 1 - eps] (the decoder predicts a location and
    /// a log-scale per channel).
    LogitLaplace {
        /// The pixel mapping's margin (DALL-E: 0.1).
        eps: f32,
    },
}

/// How the encoder's output becomes a code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Quantizer {
    /// DALL-E: logits over the K codes (`enc.logits`), relaxed with Gumbel-softmax in training; the code is the
    /// argmax.
    #[default]
    Gumbel,
    /// VQ-VAE with an EMA codebook: a `dim`-wide vector per cell (`enc.proj`), the code is the nearest of the K
    /// vectors of `quant.codebook` (updated by exponential moving averages, unused codes restarted from encoder
    /// outputs); the decoder reads the code's vector.
    Vq {
        /// Width of the code vectors.
        dim: u32,
    },
}

/// The architecture of a dVAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DvaeConfig {
    /// Square input size S in pixels.
    pub input_size: u32,
    /// Grid side G (S / G must be a power of two, 2 to 32).
    pub grid: u32,
    /// Codes K (at most 65536).
    pub codebook: u32,
    /// Channels at full resolution (doubling per level up to four times this).
    pub width: u32,
    /// Residual blocks per level.
    pub blocks: u32,
    /// The reconstruction loss.
    pub recon: Recon,
    /// Gumbel-softmax (DALL-E) or a VQ codebook.
    #[serde(default)]
    pub quantizer: Quantizer,
}

impl Default for DvaeConfig {
    fn default() -> Self {
        DvaeConfig {
            input_size: 112,
            grid: 14,
            codebook: 8192,
            width: 64,
            blocks: 1,
            recon: Recon::Mse,
            quantizer: Quantizer::Gumbel,
        }
    }
}

impl DvaeConfig {
    /// Checks the sizes; returns the number of levels L (S = G · 2^L).
    pub fn validate(&self) -> Result<u32> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.grid == 0 || self.input_size == 0 || !self.input_size.is_multiple_of(self.grid) {
            return bad(format!(
                "--input-size {} must be a multiple of --grid {}",
                self.input_size, self.grid
            ));
        }
        let factor = self.input_size / self.grid;
        if !factor.is_power_of_two() || !(2..=32).contains(&factor) {
            return bad(format!(
                "--input-size / --grid = {factor} must be a power of two from 2 to 32 (e.g. 112 / 14 = 8)"
            ));
        }
        if !(2..=65536).contains(&self.codebook) {
            return bad(format!("--codebook {} is out of range 2..=65536", self.codebook));
        }
        if self.width < 2 || !self.width.is_multiple_of(2) {
            return bad(format!("--width {} must be an even number >= 2", self.width));
        }
        if let Quantizer::Vq { dim } = self.quantizer {
            if dim == 0 {
                return bad("--vq-dim must be positive".into());
            }
        }
        if let Recon::LogitLaplace { eps } = self.recon {
            if !(eps > 0.0 && eps < 0.5) {
                return bad(format!("the logit-Laplace eps {eps} must be in (0, 0.5)"));
            }
        }
        Ok(factor.trailing_zeros())
    }

    /// Channels at level `l` (0: full resolution).
    pub fn width_at(&self, l: u32) -> i64 {
        i64::from(self.width) << l.min(2)
    }

    fn out_channels(&self) -> i64 {
        match self.recon {
            Recon::Mse => 3,
            Recon::LogitLaplace { .. } => 6,
        }
    }
}

struct ResBlock {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
}

impl ResBlock {
    fn new(p: nn::Path<'_>, c: i64) -> ResBlock {
        let pad = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        ResBlock {
            conv1: nn::conv2d(&p / "conv1", c, c / 2, 3, pad),
            conv2: nn::conv2d(&p / "conv2", c / 2, c, 1, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x + self.conv2.forward(&self.conv1.forward(&x.relu()).relu())
    }
}

/// A dVAE and the variables it owns.
pub struct Dvae {
    config: DvaeConfig,
    vs: nn::VarStore,
    stem: nn::Conv2D,
    down: Vec<nn::Conv2D>,
    enc_blocks: Vec<Vec<ResBlock>>,
    /// `enc.logits` (Gumbel) or `enc.proj` (VQ).
    head: nn::Conv2D,
    /// `quant.codebook`, `quant.cluster_size`, `quant.embed_sum` (VQ only; not trained by the optimiser).
    codebook: Option<[Tensor; 3]>,
    embed: nn::Conv2D,
    dec_blocks: Vec<Vec<ResBlock>>,
    up: Vec<nn::ConvTranspose2D>,
    out: nn::Conv2D,
}

impl std::fmt::Debug for Dvae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dvae").field("config", &self.config).finish()
    }
}

impl Dvae {
    /// Builds the model on `device`, every tensor drawn from `(seed, name)` (see `initialise`).
    pub fn new(config: &DvaeConfig, device: Device, seed: u64) -> Result<Dvae> {
        let levels = config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (enc, dec) = (&root / "enc", &root / "dec");
        let pad = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let halve = nn::ConvConfig {
            stride: 2,
            ..Default::default()
        };
        let double = nn::ConvTransposeConfig {
            stride: 2,
            ..Default::default()
        };
        let k = i64::from(config.codebook);
        let w = |l| config.width_at(l);
        let (head, code_width, codebook) = match config.quantizer {
            Quantizer::Gumbel => (
                nn::conv2d(&enc / "logits", w(levels), k, 1, Default::default()),
                k,
                None,
            ),
            Quantizer::Vq { dim } => {
                let d = i64::from(dim);
                let q = &root / "quant";
                (
                    nn::conv2d(&enc / "proj", w(levels), d, 1, Default::default()),
                    d,
                    Some([
                        q.zeros_no_train("codebook", &[k, d]),
                        q.zeros_no_train("cluster_size", &[k]),
                        q.zeros_no_train("embed_sum", &[k, d]),
                    ]),
                )
            }
        };
        let blocks = |p: &nn::Path<'_>, l: u32| -> Vec<ResBlock> {
            (0..config.blocks)
                .map(|b| ResBlock::new(p / format!("level{l}") / format!("block{b}"), w(l)))
                .collect()
        };
        let model = Dvae {
            stem: nn::conv2d(&enc / "stem", 3, w(0), 3, pad),
            down: (1..=levels)
                .map(|l| nn::conv2d(&enc / format!("down{l}"), w(l - 1), w(l), 2, halve))
                .collect(),
            enc_blocks: (1..=levels).map(|l| blocks(&enc, l)).collect(),
            head,
            codebook,
            embed: nn::conv2d(&dec / "embed", code_width, w(levels), 1, Default::default()),
            dec_blocks: (1..=levels).map(|l| blocks(&dec, l)).collect(),
            up: (1..=levels)
                .map(|l| nn::conv_transpose2d(&dec / format!("up{l}"), w(l), w(l - 1), 2, double))
                .collect(),
            out: nn::conv2d(&dec / "out", w(0), config.out_channels(), 3, pad),
            config: config.clone(),
            vs,
        };
        model.initialise(seed);
        Ok(model)
    }

    /// He (Kaiming) uniform weights for the ReLU network, U(±sqrt(6 / fan_in)) with the fan-in a position
    /// actually receives (in·k² for a convolution, in for the 2x2 stride-2 transposed ones), zero biases, and the
    /// last convolution of every residual branch zero, so each block starts as the identity: the signal keeps
    /// its scale through the ~20 layers from pixels to pixels, which plain U(±1/sqrt(fan_in)) shrinks by orders of
    /// magnitude (training then stalls for hundreds of steps).
    fn initialise(&self, seed: u64) {
        tch::no_grad(|| {
            for (name, t) in self.named_parameters() {
                let mut t = t.shallow_clone();
                if name.starts_with("quant.") || name.ends_with(".bias") || name.ends_with(".conv2.weight") {
                    let _ = t.zero_();
                    continue;
                }
                let size = t.size();
                let transposed = name.starts_with("dec.up");
                let fan_in = if transposed {
                    size[0]
                } else {
                    size[1] * size[2..].iter().product::<i64>()
                };
                uniform_(&mut t, (6.0 / fan_in.max(1) as f64).sqrt(), param_key(seed, &name));
            }
        });
    }

    /// The architecture.
    pub fn config(&self) -> &DvaeConfig {
        &self.config
    }

    /// The device the variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Every parameter by name.
    pub fn named_parameters(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// The number of parameters.
    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(|t| t.numel() as i64).sum()
    }

    /// The encoder's output for pixels `[B, 3, S, S]` normalised to [-1, 1] (x = 2·u8/255 - 1): logits
    /// `[B, K, G, G]` (Gumbel) or vectors `[B, D, G, G]` (VQ).
    pub fn encode(&self, pixels: &Tensor) -> Tensor {
        let mut h = self.stem.forward(pixels);
        for (down, blocks) in self.down.iter().zip(&self.enc_blocks) {
            h = down.forward(&h.relu());
            for b in blocks {
                h = b.forward(&h);
            }
        }
        self.head.forward(&h.relu())
    }

    /// The VQ codebook `[K, D]`, its EMA cluster sizes `[K]` and sums `[K, D]` (`None` for Gumbel).
    pub fn vq_state(&self) -> Option<&[Tensor; 3]> {
        self.codebook.as_ref()
    }

    /// VQ: makes every code vector that (nearly) repeats a more used code unreachable (moved far from every
    /// encoder output; its decoder row is never used) and returns how many there were: codes within
    /// `NEAR_DUPLICATE` of a kept code's vector, relative to the mean code norm, visited from the most used
    /// (EMA cluster size; ties by index). Restarts draw encoder outputs with replacement, so some codes land on
    /// or next to another; for two codes 1% apart, every encoder output near their bisector scores both within
    /// float rounding, and libtorch and ONNX Runtime, summing in different orders, break such ties differently
    /// (on the demo dVAE, 2.9% of cells had a top-2 margin under 1e-5). Merging them before export keeps the
    /// tokens of both runtimes identical; the reconstruction barely moves (there, 61 of 1024 codes retired,
    /// held-out PSNR within 2e-5 dB). Gumbel models have none.
    pub fn retire_duplicate_codes(&mut self) -> usize {
        let Some([codebook, cluster_size, _]) = &self.codebook else {
            return 0;
        };
        let (k, d) = (codebook.size()[0] as usize, codebook.size()[1] as usize);
        let mut values = Vec::<f32>::try_from(codebook.to_device(Device::Cpu).flatten(0, -1)).unwrap_or_default();
        let usage = Vec::<f32>::try_from(cluster_size.to_device(Device::Cpu)).unwrap_or_default();
        if values.len() != k * d || usage.len() != k {
            return 0;
        }
        // Codes retired before (a checkpoint exported twice) are neither counted nor compared.
        let live: Vec<bool> = values
            .chunks_exact(d)
            .map(|r| r.iter().any(|v| *v != RETIRED))
            .collect();
        let norm = |r: &[f32]| r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let live_norms: Vec<f64> = values
            .chunks_exact(d)
            .zip(&live)
            .filter(|(_, l)| **l)
            .map(|(r, _)| norm(r))
            .collect();
        let mean_norm = live_norms.iter().sum::<f64>() / live_norms.len().max(1) as f64;
        let limit = (NEAR_DUPLICATE * mean_norm).powi(2);
        let mut order: Vec<usize> = (0..k).filter(|&i| live[i]).collect();
        order.sort_by(|&a, &b| usage[b].total_cmp(&usage[a]).then(a.cmp(&b)));
        let mut kept: Vec<usize> = Vec::with_capacity(k);
        let mut retired = 0;
        for i in order {
            let row = &values[i * d..(i + 1) * d];
            let near = kept.iter().any(|&j| {
                let other = &values[j * d..(j + 1) * d];
                let dist: f64 = row.iter().zip(other).map(|(a, b)| f64::from(a - b).powi(2)).sum();
                dist <= limit
            });
            if near {
                values[i * d..(i + 1) * d].fill(RETIRED);
                retired += 1;
            } else {
                kept.push(i);
            }
        }
        if retired > 0 {
            let mut cb = codebook.shallow_clone();
            let new = Tensor::from_slice(&values)
                .view([k as i64, d as i64])
                .to_device(cb.device());
            tch::no_grad(|| cb.copy_(&new));
        }
        retired
    }

    /// Scores `[B, K, G, G]` whose argmax is the code: the logits (Gumbel), or for VQ `2 z·c_k - |c_k|²`
    /// (the nearest code vector: `|z - c_k|²` minus the per-cell constant `|z|²`).
    pub fn code_scores(&self, pixels: &Tensor) -> Tensor {
        let z = self.encode(pixels);
        match &self.codebook {
            None => z,
            Some([codebook, _, _]) => {
                let dots = z.permute([0, 2, 3, 1]).matmul(&codebook.tr()).permute([0, 3, 1, 2]);
                let norms = codebook
                    .square()
                    .sum_dim_intlist(1, false, Kind::Float)
                    .view([1, -1, 1, 1]);
                dots * 2.0 - norms
            }
        }
    }

    /// The decoder's input `[B, K or D, G, G]` for codes `[B, G, G]`: one-hot (Gumbel) or the code vectors (VQ).
    pub fn code_input(&self, tokens: &Tensor) -> Tensor {
        match &self.codebook {
            None => self.one_hot(tokens),
            Some([codebook, _, _]) => codebook
                .index_select(0, &tokens.flatten(0, -1))
                .view([tokens.size()[0], tokens.size()[1], tokens.size()[2], -1])
                .permute([0, 3, 1, 2]),
        }
    }

    /// The decoder's raw output `[B, 3 or 6, S, S]` for its input: codes `[B, K, G, G]` (one-hot or relaxed,
    /// Gumbel) or code vectors `[B, D, G, G]` (VQ).
    pub fn decode(&self, codes: &Tensor) -> Tensor {
        let mut h = self.embed.forward(codes);
        for (up, blocks) in self.up.iter().zip(&self.dec_blocks).rev() {
            for b in blocks {
                h = b.forward(&h);
            }
            h = up.forward(&h.relu());
        }
        self.out.forward(&h.relu())
    }

    /// Reconstructed pixels in [0, 1] from the decoder's raw output.
    pub fn pixels_from(&self, out: &Tensor) -> Tensor {
        match self.config.recon {
            Recon::Mse => out.clamp(0.0, 1.0),
            Recon::LogitLaplace { eps } => {
                let eps = f64::from(eps);
                ((out.narrow(1, 0, 3).sigmoid() - eps) / (1.0 - 2.0 * eps)).clamp(0.0, 1.0)
            }
        }
    }

    /// The reconstruction loss (mean per pixel channel) of the decoder's raw output against pixels `x` in
    /// [0, 1]. Logit-Laplace: the negative log-likelihood without its constant terms (ln 2 + ln x' + ln(1 - x')).
    pub fn recon_loss(&self, out: &Tensor, x: &Tensor) -> Tensor {
        match self.config.recon {
            Recon::Mse => out.mse_loss(x, tch::Reduction::Mean),
            Recon::LogitLaplace { eps } => {
                let eps = f64::from(eps);
                let mapped = x * (1.0 - 2.0 * eps) + eps;
                let target = (&mapped / (-&mapped + 1.0)).log();
                let mu = out.narrow(1, 0, 3);
                let log_b = out.narrow(1, 3, 3);
                ((target - mu).abs() * (-&log_b).exp() + log_b).mean(Kind::Float)
            }
        }
    }

    /// Hard codes `[B, G, G]` (argmax of the scores, first maximum on ties) of normalised pixels.
    pub fn tokens(&self, pixels: &Tensor) -> Tensor {
        tch::no_grad(|| self.code_scores(pixels).argmax(1, false))
    }

    /// One-hot `[B, K, G, G]` codes of tokens `[B, G, G]`.
    pub fn one_hot(&self, tokens: &Tensor) -> Tensor {
        tokens
            .one_hot(i64::from(self.config.codebook))
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
    }

    /// Writes every parameter to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        tensors::save_params(self.named_parameters(), path)
    }

    /// Loads every parameter from a safetensors file written by [`Dvae::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        tensors::load_params(self.named_parameters(), path)
    }

    /// Every parameter as (shape, float32 values), for the ONNX export.
    pub fn export(&self) -> BTreeMap<String, (Vec<i64>, Vec<f32>)> {
        self.named_parameters()
            .into_iter()
            .map(|(name, t)| {
                let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
                let values = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap_or_default();
                (name, (t.size(), values))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_duplicate_codes_are_retired_keeping_the_more_used() {
        let config = DvaeConfig {
            input_size: 8,
            grid: 4,
            codebook: 5,
            width: 4,
            blocks: 1,
            recon: Recon::Mse,
            quantizer: Quantizer::Vq { dim: 2 },
        };
        let mut model = Dvae::new(&config, Device::Cpu, 1).expect("model");
        // Code 1 is 1% (of the mean norm, 1) from code 0 and more used: code 0 goes. Code 3 repeats code 2 exactly
        // and is less used: code 3 goes. Code 4 is 10% from code 2: kept.
        let codes = [1.0f32, 0.0, 1.0, 0.01, 0.0, 1.0, 0.0, 1.0, 0.0, 1.1];
        let usage = [2.0f32, 5.0, 3.0, 1.0, 4.0];
        if let Some([codebook, cluster_size, _]) = model.vq_state() {
            let (mut cb, mut cs) = (codebook.shallow_clone(), cluster_size.shallow_clone());
            tch::no_grad(|| {
                cb.copy_(&Tensor::from_slice(&codes).view([5, 2]));
                cs.copy_(&Tensor::from_slice(&usage));
            });
        }
        assert_eq!(model.retire_duplicate_codes(), 2);
        let cb = model.vq_state().map(|[c, _, _]| c.shallow_clone()).expect("vq");
        let after = Vec::<f32>::try_from(cb.flatten(0, -1)).expect("values");
        assert_eq!(after[0..2], [RETIRED, RETIRED]);
        assert_eq!(after[2..4], codes[2..4]);
        assert_eq!(after[6..8], [RETIRED, RETIRED]);
        assert_eq!(after[8..10], codes[8..10]);
        // Exported again, nothing more to retire.
        assert_eq!(model.retire_duplicate_codes(), 0);
    }
}
