//! `--init FILE.safetensors`: start a model from weights written elsewhere — a timm `beit_*` state dict, a
//! torchscale `BEiT3` one (or unilm's BEiT-3, which wraps it as `beit3.*`), or an imglish checkpoint's
//! `model.safetensors`. Names are matched after stripping the file's common prefix (`module.`, `model.`,
//! `beit3.`); shapes are checked; relative position bias tables and absolute position embeddings made for another
//! grid are resized (bicubic, as BEiT and timm do when fine-tuning at another resolution); what the file lacks keeps
//! its initialisation and what the model lacks is ignored, both reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::tensors::Stored;

/// What `--init` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InitReport {
    /// The file.
    pub file: PathBuf,
    /// The prefix stripped from the file's names (`""` when none).
    pub prefix: String,
    /// Parameters copied from the file (resized ones included).
    pub loaded: usize,
    /// Parameters resized to this model's grid.
    pub resized: Vec<String>,
    /// Per-layer relative position tables filled from the file's shared table (`rel_pos_bias.*`), as BEiT does
    /// when a pretrained model is fine-tuned.
    pub from_shared: usize,
    /// This model's parameters the file does not have (they keep their initialisation).
    pub missing: Vec<String>,
    /// The file's tensors this model has no parameter for (ignored; `relative_position_index` buffers, which are
    /// recomputed, are not listed).
    pub unexpected: Vec<String>,
}

impl InitReport {
    /// One line for the log.
    pub fn summary(&self) -> String {
        let list = |v: &[String]| {
            let mut s: Vec<&str> = v.iter().take(6).map(String::as_str).collect();
            if v.len() > 6 {
                s.push("...");
            }
            s.join(", ")
        };
        format!(
            "init from {}: {} tensors loaded{}{}{}; missing (kept at their initialisation): {} [{}]; unexpected \
             (ignored): {} [{}]",
            self.file.display(),
            self.loaded,
            if self.prefix.is_empty() {
                String::new()
            } else {
                format!(" (prefix '{}' stripped)", self.prefix)
            },
            if self.resized.is_empty() {
                String::new()
            } else {
                format!(", resized to this grid: {}", list(&self.resized))
            },
            if self.from_shared == 0 {
                String::new()
            } else {
                format!(
                    ", {} per-layer relative position tables from the shared one",
                    self.from_shared
                )
            },
            self.missing.len(),
            list(&self.missing),
            self.unexpected.len(),
            list(&self.unexpected),
        )
    }
}

const PREFIXES: [&str; 6] = ["", "module.", "model.", "beit3.", "module.beit3.", "model.beit3."];

/// Copies the tensors of `path` into `params` (see the module docs); `grid` is this model's patch grid.
pub fn init_params(params: BTreeMap<String, Tensor>, path: &Path, grid: [i64; 2]) -> Result<InitReport> {
    init_with_optional(params, BTreeMap::new(), path, grid)
}

/// [`init_params`], and also `optional` parameters (a classifier's `fc_norm` and `head`), each copied only when
/// the file holds it with the same shape (a head for another number of classes keeps its initialisation and is
/// reported missing, as timm does).
pub(crate) fn init_with_optional(
    mut params: BTreeMap<String, Tensor>,
    optional: BTreeMap<String, Tensor>,
    path: &Path,
    grid: [i64; 2],
) -> Result<InitReport> {
    let stored = Stored::read(path, "--init weights")?;
    let prefix = stored_prefix(&stored, &params)?;
    let mut skipped = Vec::new();
    for (name, p) in optional {
        match stored.get(&format!("{prefix}{name}")) {
            Ok(src) if src.size() == p.size() => {
                params.insert(name, p);
            }
            _ => skipped.push(name),
        }
    }
    let mut report = copy_params(&stored, &params, path, &prefix, grid)?;
    report.missing.extend(skipped);
    Ok(report)
}

/// The prefix (of [`PREFIXES`]) under which the file holds the most of `params`.
fn stored_prefix(stored: &Stored, params: &BTreeMap<String, Tensor>) -> Result<String> {
    let names: Vec<String> = stored.names().cloned().collect();
    let matches = |prefix: &str| {
        params
            .keys()
            .filter(|n| names.contains(&format!("{prefix}{n}")))
            .count()
    };
    let prefix = PREFIXES
        .iter()
        .copied()
        .max_by_key(|p| (matches(p), std::cmp::Reverse(p.len())))
        .unwrap_or("");
    if matches(prefix) == 0 {
        return Err(stored.bad(format!(
            "none of its {} tensors is a parameter of this model (the file has e.g. '{}', the model e.g. '{}')",
            names.len(),
            names.first().map_or("", String::as_str),
            params.keys().next().map_or("", String::as_str)
        )));
    }
    Ok(prefix.to_string())
}

fn copy_params(
    stored: &Stored,
    params: &BTreeMap<String, Tensor>,
    path: &Path,
    prefix: &str,
    grid: [i64; 2],
) -> Result<InitReport> {
    let names: Vec<String> = stored.names().cloned().collect();
    let mut report = InitReport {
        file: path.to_path_buf(),
        prefix: prefix.to_string(),
        loaded: 0,
        resized: Vec::new(),
        from_shared: 0,
        missing: Vec::new(),
        unexpected: Vec::new(),
    };
    let shared = format!("{prefix}{SHARED_TABLE}");
    for (name, mut p) in params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())) {
        let mut key = format!("{prefix}{name}");
        if stored.get(&key).is_err() && is_layer_table(&name) && stored.get(&shared).is_ok() {
            key.clone_from(&shared);
            report.from_shared += 1;
        }
        let Ok(src) = stored.get(&key) else {
            report.missing.push(name);
            continue;
        };
        if src.size() == p.size() {
            stored.copy_into(&key, &mut p)?;
        } else {
            let resized = resize(&name, src, &p.size(), grid).ok_or_else(|| {
                stored.bad(format!(
                    "tensor '{key}' has shape {:?}, this model's '{name}' is {:?}",
                    src.size(),
                    p.size()
                ))
            })?;
            tch::no_grad(|| p.copy_(&resized));
            report.resized.push(name);
        }
        report.loaded += 1;
    }
    report.unexpected = names
        .iter()
        .filter(|n| !n.ends_with("relative_position_index"))
        .filter(|n| !n.strip_prefix(prefix).is_some_and(|k| params.contains_key(k)))
        .filter(|n| report.from_shared == 0 || **n != shared)
        .cloned()
        .collect();
    Ok(report)
}

const SHARED_TABLE: &str = "rel_pos_bias.relative_position_bias_table";

/// `blocks.N.attn.relative_position_bias_table`: a per-layer table (BEiT fine-tuning's layout).
fn is_layer_table(name: &str) -> bool {
    name.starts_with("blocks.") && name.ends_with(".attn.relative_position_bias_table")
}

/// `src` resized to `dst` when it is a relative position bias table or an absolute position embedding made for
/// another (square) grid; `None` otherwise.
fn resize(name: &str, src: &Tensor, dst: &[i64], grid: [i64; 2]) -> Option<Tensor> {
    let src = src.to_kind(Kind::Float);
    let s = src.size();
    if name.ends_with("relative_position_bias_table") && s.len() == 2 && dst.len() == 2 && s[1] == dst[1] {
        // [(2h-1)(2w-1) + 3, heads]: the distance grid, then cls->token, token->cls, cls->cls.
        let (to_h, to_w) = (2 * grid[0] - 1, 2 * grid[1] - 1);
        let extra = dst[0] - to_h * to_w;
        let side = square_side(s[0] - extra)?;
        if extra < 0 {
            return None;
        }
        let table = bicubic(&src.narrow(0, 0, side * side), side, [to_h, to_w]);
        return Some(Tensor::cat(&[table, src.narrow(0, s[0] - extra, extra)], 0));
    }
    if name.ends_with("pos_embed") && s.len() == 3 && dst.len() == 3 && s[2] == dst[2] && s[0] == 1 {
        // [1, 1 + h*w, dim]: the CLS position, then the grid.
        let side = square_side(s[1] - 1)?;
        let (h, w) = (grid[0], grid[1]);
        if dst[1] != 1 + h * w {
            return None;
        }
        let patches = bicubic(&src.narrow(1, 1, side * side).squeeze_dim(0), side, [h, w]).unsqueeze(0);
        return Some(Tensor::cat(&[src.narrow(1, 0, 1), patches], 1));
    }
    None
}

/// Rows `[side * side, C]` of a square grid resampled (bicubic, corners not aligned) to `[to[0] * to[1], C]`.
fn bicubic(rows: &Tensor, side: i64, to: [i64; 2]) -> Tensor {
    let c = rows.size()[1];
    rows.reshape([1, side, side, c])
        .permute([0, 3, 1, 2])
        .upsample_bicubic2d(to, false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([to[0] * to[1], c])
}

fn square_side(n: i64) -> Option<i64> {
    let side = (n as f64).sqrt().round() as i64;
    (side > 0 && side * side == n).then_some(side)
}

/// Applies `--init` to a run that starts at step 0 (a resumed run's checkpoint already holds the weights).
pub(crate) fn apply(init: Option<&Path>, step: u64, params: BTreeMap<String, Tensor>, grid: [i64; 2]) -> Result<()> {
    let Some(path) = init else { return Ok(()) };
    if step > 0 {
        tracing::info!(
            "resuming at step {step}: --init {} is not applied again",
            path.display()
        );
        return Ok(());
    }
    let report = init_params(params, path, grid)?;
    tracing::info!("{}", report.summary());
    Ok(())
}

/// The architecture of a timm `Beit` state dict (`beit_*` models; a `module.` / `model.` prefix is allowed), for
/// `finetune --init FILE` without a pretraining checkpoint: width and patch size from `patch_embed.proj.weight`,
/// depth from the blocks, MLP ratio from `mlp.fc1`, heads and grid from the relative position tables (else from
/// `heads` and `pos_embed`), layer scale from `gamma_1`. The encoder reads pixels; `vocab_size` (unused by a
/// classifier) is set to 2.
pub fn timm_beit_config(path: &Path, heads: Option<i64>) -> Result<crate::ModelConfig> {
    let stored = Stored::read(path, "--init weights")?;
    let prefix = ["", "module.", "model."]
        .into_iter()
        .find(|p| stored.get(&format!("{p}patch_embed.proj.weight")).is_ok())
        .ok_or_else(|| {
            stored.bad(
                "has no 'patch_embed.proj.weight': without --checkpoint, --init needs a timm Beit state dict (a \
                 pixel-input encoder); give the pretraining checkpoint for other files"
                    .into(),
            )
        })?;
    let shape = |name: &str| stored.get(&format!("{prefix}{name}")).ok().map(Tensor::size);
    let proj = shape("patch_embed.proj.weight").unwrap_or_default();
    let [dim, 3, patch, patch_w] = proj[..] else {
        return Err(stored.bad(format!(
            "'patch_embed.proj.weight' has shape {proj:?}, not [dim, 3, p, p]"
        )));
    };
    if patch != patch_w {
        return Err(stored.bad(format!(
            "patch_embed.proj.weight has non-square patches {patch}x{patch_w}"
        )));
    }
    let depth = (0..)
        .take_while(|i| shape(&format!("blocks.{i}.norm1.weight")).is_some())
        .count() as i64;
    let hidden = shape("blocks.0.mlp.fc1.weight").map_or(0, |s| s[0]);
    let (rel_pos_bias, table) = if let Some(t) = shape("blocks.0.attn.relative_position_bias_table") {
        (crate::RelPosBias::PerLayer, Some(t))
    } else if let Some(t) = shape(SHARED_TABLE) {
        (crate::RelPosBias::Shared, Some(t))
    } else {
        (crate::RelPosBias::Off, None)
    };
    let pos_embed = shape("pos_embed");
    let side = match (&table, &pos_embed) {
        (Some(t), _) => square_side(t[0] - 3).map(|s| (s + 1) / 2),
        (None, Some(p)) => square_side(p[1] - 1),
        (None, None) => None,
    }
    .ok_or_else(|| stored.bad("has neither a relative position table nor a pos_embed to read the grid from".into()))?;
    let heads = match (heads, &table) {
        (Some(h), _) => h,
        (None, Some(t)) => t[1],
        (None, None) => {
            return Err(
                stored.bad("has no relative position table to read the number of heads from: give --heads".into())
            )
        }
    };
    let config = crate::ModelConfig {
        dim,
        depth,
        heads,
        mlp_ratio: hidden as f64 / dim as f64,
        grid: [side, side],
        patch_size: patch,
        input: crate::InputKind::Pixels,
        vocab_size: 2,
        rel_pos_bias,
        abs_pos_emb: pos_embed.is_some(),
        layer_scale_init: shape("blocks.0.gamma_1").map(|_| 0.1),
        layer_norm_eps: 1e-6,
        drop_path: 0.0,
        init_std: 0.02,
    };
    config
        .validate()
        .map_err(|e| stored.bad(format!("does not describe a Beit encoder: {e}")))?;
    Ok(config)
}
