//! AdamW with BEiT's parameter groups, the warmup + cosine schedule and gradient clipping. Written out (rather
//! than libtorch's optimizer) so that its state can be checkpointed and restored exactly.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Result, TrainError};
use crate::tensors::{self, Stored};

/// Optimiser and schedule settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    pub min_lr: f64,
    /// Linear warmup steps from 0 to `lr`.
    pub warmup_steps: u64,
    /// AdamW betas.
    pub betas: (f64, f64),
    /// AdamW epsilon.
    pub eps: f64,
    /// Decoupled weight decay (not applied to norms, biases, position tables and special tokens).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub clip_grad: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1.5e-3,
            min_lr: 1e-5,
            warmup_steps: 0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.05,
            clip_grad: Some(3.0),
        }
    }
}

impl OptimConfig {
    /// The schedule and decay a command's flags give (`clip_grad` 0: no clipping), other values at their defaults.
    pub fn from_flags(lr: f64, min_lr: f64, warmup_steps: u64, weight_decay: f64, clip_grad: f64) -> OptimConfig {
        OptimConfig {
            lr,
            min_lr,
            warmup_steps,
            weight_decay,
            clip_grad: (clip_grad > 0.0).then_some(clip_grad),
            ..OptimConfig::default()
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let ok = self.lr > 0.0
            && self.min_lr >= 0.0
            && self.min_lr <= self.lr
            && (0.0..1.0).contains(&self.betas.0)
            && (0.0..1.0).contains(&self.betas.1)
            && self.eps > 0.0
            && self.weight_decay >= 0.0
            && self.clip_grad.is_none_or(|c| c > 0.0);
        if !ok {
            return Err(TrainError::Config(format!("invalid optimiser settings {self:?}")));
        }
        Ok(())
    }

    /// The learning rate of `step` (0-based) in a run of `total` steps: linear warmup, then cosine decay to
    /// `min_lr`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// Whether weight decay applies to a parameter (BEiT, BEiT-3: not to 1-d tensors, biases, position embeddings
/// and special tokens).
pub fn decays(name: &str, dims: usize) -> bool {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let special = ["cls_token", "mask_token", "pos_embed"].contains(&leaf)
        || name.contains("relative_position_bias_table")
        || name.starts_with("encoder.embed_positions.");
    dims > 1 && !name.ends_with(".bias") && !special
}

/// AdamW over named parameters, with its moment estimates.
pub struct AdamW {
    config: OptimConfig,
    params: Vec<Param>,
    step: u64,
}

struct Param {
    name: String,
    tensor: Tensor,
    decay: bool,
    /// Multiplies the learning rate (layer-wise decay when fine-tuning; 1 otherwise).
    lr_scale: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("params", &self.params.len())
            .field("step", &self.step)
            .finish()
    }
}

impl AdamW {
    /// An optimiser over `params` (name → tensor), in name order.
    pub fn new(params: BTreeMap<String, Tensor>, config: OptimConfig) -> Result<AdamW> {
        AdamW::with_lr_scales(params, config, &|_| 1.0)
    }

    /// An optimiser whose learning rate (and with it the decoupled weight decay, as in BEiT's parameter groups)
    /// is multiplied by `lr_scale(name)` for each parameter: layer-wise learning-rate decay.
    pub fn with_lr_scales(
        params: BTreeMap<String, Tensor>,
        config: OptimConfig,
        lr_scale: &dyn Fn(&str) -> f64,
    ) -> Result<AdamW> {
        config.validate()?;
        let params = params
            .into_iter()
            .map(|(name, tensor)| Param {
                decay: decays(&name, tensor.dim()),
                lr_scale: lr_scale(&name),
                exp_avg: tensor.zeros_like().detach(),
                exp_avg_sq: tensor.zeros_like().detach(),
                name,
                tensor,
            })
            .collect();
        Ok(AdamW {
            config,
            params,
            step: 0,
        })
    }

    /// Updates taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Zeroes every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        tch::no_grad(|| {
            let mut total = 0.0;
            for p in &self.params {
                let g = p.tensor.grad();
                if g.defined() {
                    // Per-tensor L2 norms in the gradient's precision (as clip_grad_norm_), summed in f64.
                    total += g.norm().double_value(&[]).powi(2);
                }
            }
            total.sqrt()
        })
    }

    /// Scales the gradients so that their global norm is at most `max` (as `clip_grad_norm_`); returns the norm
    /// before clipping.
    pub fn clip(&mut self, max: f64) -> f64 {
        let norm = self.grad_norm();
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            tch::no_grad(|| {
                for p in &mut self.params {
                    let mut g = p.tensor.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(coef);
                    }
                }
            });
        }
        norm
    }

    /// One AdamW update at learning rate `lr` (decoupled weight decay `lr * wd`, bias-corrected moments).
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let (b1, b2) = self.config.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        let wd = self.config.weight_decay;
        let eps = self.config.eps;
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                let lr = lr * p.lr_scale;
                if p.decay && wd > 0.0 {
                    let _ = p.tensor.g_mul_scalar_(1.0 - lr * wd);
                }
                // In place, as PyTorch's single-tensor AdamW: m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g²;
                // p -= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps). Two temporaries per tensor.
                let _ = p.exp_avg.lerp_(&g, 1.0 - b1);
                let _ = p.exp_avg_sq.g_mul_scalar_(b2).addcmul_(&g, &(&g * (1.0 - b2)));
                if lr > 0.0 {
                    let mut denom = p.exp_avg_sq.sqrt();
                    let _ = denom
                        .g_div_scalar_(bc2.sqrt())
                        .g_add_scalar_(eps)
                        .g_mul_scalar_(-bc1 / lr);
                    let _ = p.tensor.addcdiv_(&p.exp_avg, &denom);
                }
            }
        });
    }

    /// Writes the moments and the step count (safetensors: `exp_avg.NAME`, `exp_avg_sq.NAME`, `step`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len() + 1);
        for p in &self.params {
            named.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            named.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.shallow_clone()));
        }
        named.push(("step".into(), Tensor::from_slice(&[self.step as i64])));
        tensors::write(named, path)
    }

    /// Restores what [`AdamW::save`] wrote; every tensor must be present with the parameter's shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let stored = Stored::read(path, "optimiser state")?;
        let step = stored.get("step")?.int64_value(&[0]);
        for p in &mut self.params {
            stored.copy_into(&format!("exp_avg.{}", p.name), &mut p.exp_avg)?;
            stored.copy_into(&format!("exp_avg_sq.{}", p.name), &mut p.exp_avg_sq)?;
        }
        self.step = u64::try_from(step).map_err(|_| stored.bad(format!("negative step {step}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn schedule_warms_up_then_decays() {
        let c = OptimConfig {
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_steps: 10,
            ..OptimConfig::default()
        };
        assert!((c.lr_at(0, 100) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(9, 100) - 1e-3).abs() < 1e-12);
        assert!((c.lr_at(10, 100) - 1e-3).abs() < 1e-12);
        assert!((c.lr_at(55, 100) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-12);
        assert!((c.lr_at(100, 100) - 1e-5).abs() < 1e-12);
        assert!(c.lr_at(30, 100) > c.lr_at(31, 100));
    }

    #[test]
    fn decay_groups_follow_beit() {
        assert!(decays("blocks.0.attn.qkv.weight", 2));
        assert!(decays("lm_head.weight", 2));
        assert!(!decays("blocks.0.attn.q_bias", 1));
        assert!(!decays("blocks.0.norm1.weight", 1));
        assert!(!decays("lm_head.bias", 1));
        assert!(!decays("cls_token", 3));
        assert!(!decays("mask_token", 3));
        assert!(!decays("rel_pos_bias.relative_position_bias_table", 2));
        assert!(!decays("blocks.0.gamma_1", 1));
    }

    /// A decayed `[1, 3]` weight under a quadratic loss, against a scalar f64 transcription of PyTorch's AdamW
    /// (decoupled decay, bias-corrected moments, eps outside the square root).
    #[test]
    fn matches_the_adamw_update_rule() {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0])
            .view([1, 3])
            .set_requires_grad(true);
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3]);
        let mut params = BTreeMap::new();
        params.insert("x.weight".to_string(), p.shallow_clone());
        let config = OptimConfig::default();
        let mut opt = AdamW::new(params, config.clone()).expect("valid");
        let (mut x, wv) = ([1.0f64, -2.0, 3.0], [1.0f64, 2.0, 3.0]);
        let (mut m, mut v) = ([0.0f64; 3], [0.0f64; 3]);
        let (b1, b2) = config.betas;
        for t in 1..=5 {
            let lr = 0.1 / t as f64;
            opt.zero_grad();
            (&p * &p * &w).sum(Kind::Float).backward();
            opt.step(lr);
            for i in 0..3 {
                let g = 2.0 * x[i] * wv[i];
                x[i] *= 1.0 - lr * config.weight_decay;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let denom = (v[i] / (1.0 - b2.powi(t))).sqrt() + config.eps;
                x[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
            }
        }
        let got: Vec<f32> = Vec::try_from(&p.detach().view([3])).expect("f32");
        for (a, b) in got.iter().zip(x) {
            assert!((f64::from(*a) - b).abs() < 1e-5, "{got:?} vs {x:?}");
        }
        assert_eq!(opt.step_count(), 5);
    }
}
