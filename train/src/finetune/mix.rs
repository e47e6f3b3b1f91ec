//! Mixup and CutMix (as timm's `Mixup` in batch mode) with label smoothing: the batch is mixed with itself
//! reversed, the targets likewise. Every draw comes from our generator keyed by `(seed, step, micro-batch)`, so a
//! resumed run mixes exactly as an uninterrupted one.

use imglish_ingest::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::model::Input;

/// Mixup / CutMix settings (all zero: off).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MixConfig {
    /// Mixup's Beta(α, α) parameter (0: no mixup). Needs pixel input.
    pub mixup: f64,
    /// CutMix's Beta(α, α) parameter (0: no CutMix). Boxes follow the patch grid, so token input can use it.
    pub cutmix: f64,
    /// Probability that a batch is mixed at all.
    pub prob: f64,
    /// With both enabled, the probability of CutMix rather than mixup.
    pub switch_prob: f64,
}

impl Default for MixConfig {
    fn default() -> Self {
        MixConfig {
            mixup: 0.0,
            cutmix: 0.0,
            prob: 1.0,
            switch_prob: 0.5,
        }
    }
}

impl MixConfig {
    /// Whether any mixing is on.
    pub fn enabled(&self) -> bool {
        (self.mixup > 0.0 || self.cutmix > 0.0) && self.prob > 0.0
    }

    /// Checks the values; mixup needs pixels (token ids cannot be averaged).
    pub fn validate(&self, pixels: bool) -> Result<()> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        if !(self.mixup >= 0.0 && self.cutmix >= 0.0 && self.mixup.is_finite() && self.cutmix.is_finite()) {
            return Err(TrainError::Config(format!(
                "--mixup and --cutmix must be non-negative (got {} and {})",
                self.mixup, self.cutmix
            )));
        }
        if !unit(self.prob) || !unit(self.switch_prob) {
            return Err(TrainError::Config(format!(
                "--mix-prob and --switch-prob must be in [0, 1] (got {} and {})",
                self.prob, self.switch_prob
            )));
        }
        if self.mixup > 0.0 && !pixels {
            return Err(TrainError::Config(
                "--mixup needs a pixel-input encoder (token ids cannot be averaged); use --cutmix, which swaps whole \
                 patches"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// One-hot targets `[B, classes]` of `labels` with label smoothing `s`: `1 - s + s/C` on the label, `s/C`
/// elsewhere.
pub(crate) fn soft_targets(labels: &Tensor, classes: i64, smoothing: f64) -> Tensor {
    let off = smoothing / classes as f64;
    labels.one_hot(classes).to_kind(Kind::Float) * (1.0 - smoothing) + off
}

/// What a draw decided for one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Mixing {
    None,
    /// Mixup with weight `lam` on the batch itself.
    Mixup(f64),
    /// CutMix: the grid box `[y0, y1) x [x0, x1)` comes from the reversed batch; `lam` = the share kept.
    CutMix {
        lam: f64,
        box_: [i64; 4],
    },
}

/// Draws the mixing of one batch (timm's `Mixup._params_per_batch`, box from `rand_bbox` on the patch grid).
pub(crate) fn draw(config: &MixConfig, grid: [i64; 2], key: u64) -> Mixing {
    if !config.enabled() {
        return Mixing::None;
    }
    let mut rng = Rng::new(key);
    if rng.next_f64() >= config.prob {
        return Mixing::None;
    }
    let use_cutmix = match (config.mixup > 0.0, config.cutmix > 0.0) {
        (true, true) => rng.next_f64() < config.switch_prob,
        (_, cutmix) => cutmix,
    };
    if !use_cutmix {
        return Mixing::Mixup(beta(&mut rng, config.mixup));
    }
    let lam = beta(&mut rng, config.cutmix);
    let [h, w] = grid;
    let ratio = (1.0 - lam).sqrt();
    let (ch, cw) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let (cy, cx) = (rng.below(h as u64) as i64, rng.below(w as u64) as i64);
    let (y0, y1) = ((cy - ch / 2).clamp(0, h), (cy + ch / 2).clamp(0, h));
    let (x0, x1) = ((cx - cw / 2).clamp(0, w), (cx + cw / 2).clamp(0, w));
    let area = ((y1 - y0) * (x1 - x0)) as f64;
    Mixing::CutMix {
        lam: 1.0 - area / (h * w) as f64,
        box_: [y0, y1, x0, x1],
    }
}

/// Applies a draw to a batch: the mixed input and targets (`targets` `[B, C]` soft).
pub(crate) fn apply(mixing: Mixing, input: Input, targets: Tensor, grid: [i64; 2], patch: i64) -> (Input, Tensor) {
    let mixed_targets = |lam: f64| &targets * lam + targets.flip([0]) * (1.0 - lam);
    match mixing {
        Mixing::None => (input, targets),
        Mixing::Mixup(lam) => match input {
            Input::Pixels(p) => {
                let mixed = &p * lam + p.flip([0]) * (1.0 - lam);
                (Input::Pixels(mixed), mixed_targets(lam))
            }
            tokens @ Input::Tokens(_) => (tokens, targets),
        },
        Mixing::CutMix { lam, box_ } => {
            let [y0, y1, x0, x1] = box_;
            let region = |t: &Tensor, scale: i64| -> Tensor {
                let size = t.size();
                let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
                let ys = Tensor::arange(h, (Kind::Int64, t.device()));
                let xs = Tensor::arange(w, (Kind::Int64, t.device()));
                let in_y = ys.ge(y0 * scale).logical_and(&ys.lt(y1 * scale)).unsqueeze(1);
                let in_x = xs.ge(x0 * scale).logical_and(&xs.lt(x1 * scale)).unsqueeze(0);
                in_y.logical_and(&in_x)
            };
            let input = match input {
                Input::Pixels(p) => {
                    let m = region(&p, patch);
                    Input::Pixels(p.flip([0]).where_self(&m, &p))
                }
                Input::Tokens(t) => {
                    // [B, N] ids on the row-major grid.
                    let (b, n) = (t.size()[0], t.size()[1]);
                    let g = t.view([b, grid[0], grid[1]]);
                    let m = region(&g, 1);
                    Input::Tokens(g.flip([0]).where_self(&m, &g).view([b, n]))
                }
            };
            (input, mixed_targets(lam))
        }
    }
}

/// A Beta(α, α) draw: `X / (X + Y)` with `X, Y ~ Gamma(α)`.
fn beta(rng: &mut Rng, alpha: f64) -> f64 {
    let x = gamma(rng, alpha);
    let y = gamma(rng, alpha);
    if x + y > 0.0 {
        x / (x + y)
    } else {
        0.5
    }
}

/// A Gamma(α, 1) draw (Marsaglia and Tsang; for α < 1, `Gamma(α + 1) · U^(1/α)`).
fn gamma(rng: &mut Rng, alpha: f64) -> f64 {
    if alpha < 1.0 {
        let u = rng.next_f64().max(f64::MIN_POSITIVE);
        return gamma(rng, alpha + 1.0) * u.powf(1.0 / alpha);
    }
    let d = alpha - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = normal(rng);
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.next_f64().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn normal(rng: &mut Rng) -> f64 {
    let (u1, u2) = (rng.next_f64().max(f64::MIN_POSITIVE), rng.next_f64());
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn beta_draws_have_the_right_mean_and_spread() {
        let mut rng = Rng::new(3);
        for alpha in [0.8, 1.0, 2.0] {
            let draws: Vec<f64> = (0..20_000).map(|_| beta(&mut rng, alpha)).collect();
            let mean = draws.iter().sum::<f64>() / draws.len() as f64;
            let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / draws.len() as f64;
            // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
            assert!((mean - 0.5).abs() < 0.01, "alpha {alpha}: mean {mean}");
            let want = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!((var - want).abs() < 0.1 * want, "alpha {alpha}: var {var} vs {want}");
        }
    }

    #[test]
    fn cutmix_swaps_a_box_of_tokens_and_mixes_targets_by_area() {
        let config = MixConfig {
            cutmix: 1.0,
            ..MixConfig::default()
        };
        // Find a draw whose box is neither empty nor the whole grid.
        let (lam, box_) = (0..100)
            .find_map(|k| match draw(&config, [4, 4], k) {
                Mixing::CutMix { lam, box_ } if lam > 0.0 && lam < 1.0 => Some((lam, box_)),
                _ => None,
            })
            .expect("a partial box");
        let [y0, y1, x0, x1] = box_;
        assert!((lam - (1.0 - ((y1 - y0) * (x1 - x0)) as f64 / 16.0)).abs() < 1e-12);
        let tokens = Tensor::from_slice(&[0i64; 16]).view([1, 16]);
        let tokens = Tensor::cat(&[&tokens, &(tokens.ones_like())], 0);
        let targets = soft_targets(&Tensor::from_slice(&[0i64, 1]), 2, 0.0);
        let (input, t) = apply(Mixing::CutMix { lam, box_ }, Input::Tokens(tokens), targets, [4, 4], 16);
        let Input::Tokens(mixed) = input else { panic!("tokens") };
        // Row 0 took the box from row 1 (all ones): its share of ones is 1 - lam, as is its target for class 1.
        let ones = mixed.get(0).sum(Kind::Int64).int64_value(&[]) as f64 / 16.0;
        assert!((ones - (1.0 - lam)).abs() < 1e-12, "{ones} vs {lam}");
        assert!((t.double_value(&[0, 1]) - (1.0 - lam)).abs() < 1e-6);
        for y in 0..4 {
            for x in 0..4 {
                let inside = (y0..y1).contains(&y) && (x0..x1).contains(&x);
                assert_eq!(mixed.int64_value(&[0, y * 4 + x]), i64::from(inside));
            }
        }
    }

    #[test]
    fn mixup_blends_pixels_and_targets_and_needs_pixels() {
        let p = Tensor::ones([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let p = &p * Tensor::from_slice(&[0.0f32, 1.0]).view([2, 1, 1, 1]);
        let targets = soft_targets(&Tensor::from_slice(&[0i64, 1]), 3, 0.3);
        assert!((targets.double_value(&[0, 0]) - 0.8).abs() < 1e-6);
        assert!((targets.double_value(&[0, 2]) - 0.1).abs() < 1e-6);
        let (input, t) = apply(Mixing::Mixup(0.75), Input::Pixels(p), targets, [1, 1], 4);
        let Input::Pixels(m) = input else { panic!("pixels") };
        assert!((m.double_value(&[0, 0, 0, 0]) - 0.25).abs() < 1e-6);
        assert!((m.double_value(&[1, 0, 0, 0]) - 0.75).abs() < 1e-6);
        assert!((t.double_value(&[0, 1]) - (0.75 * 0.1 + 0.25 * 0.8)).abs() < 1e-6);
        let err = MixConfig {
            mixup: 0.8,
            ..MixConfig::default()
        }
        .validate(false)
        .expect_err("tokens");
        assert!(err.to_string().contains("--mixup needs a pixel-input encoder"), "{err}");
    }

    #[test]
    fn draws_depend_only_on_the_key() {
        let config = MixConfig {
            mixup: 0.8,
            cutmix: 1.0,
            ..MixConfig::default()
        };
        let a: Vec<Mixing> = (0..50).map(|k| draw(&config, [14, 14], k)).collect();
        let b: Vec<Mixing> = (0..50).map(|k| draw(&config, [14, 14], k)).collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|m| matches!(m, Mixing::Mixup(_))));
        assert!(a.iter().any(|m| matches!(m, Mixing::CutMix { .. })));
        assert_eq!(draw(&MixConfig::default(), [14, 14], 1), Mixing::None);
    }
}
