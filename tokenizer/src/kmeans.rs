//! Learned patch codebooks: k-means over image patches of a manifest, exported as an ONNX graph that computes
//! nearest-code indices (one convolution for the distances, then ArgMin), with its card. Structure codebooks
//! cluster the patches' centred luma by direction (spherical k-means) and add a "flat" code; their graph is one
//! convolution for the projections (the flat code's is a constant) and ArgMax.
//!
//! Deterministic for a seed and independent of the thread count: every random choice comes from keyed
//! streams, work is split into fixed-size chunks, and sums are combined in chunk order.

use std::path::Path;

use imglish_ingest::{
    read_image_bytes, CropSpec, DecodeOptions, Filter, Manifest, ManifestRow, Progress, Resizer, Rng, Split,
};
use ndarray::{linalg::general_mat_mul, Array2, ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::card::{sha256_hex, Card, Normalization, OutputKind, CARD_VERSION};
use crate::error::{Error, Result};
use crate::onnx::{self, proto::data_type, Attr, Dim, GraphBuilder};
use crate::views::{render_views, ViewSpec};

/// Settings of `imglish tokenizer fit`; validated by [`FitConfig::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitConfig {
    /// Patch side P in pixels.
    pub patch: u32,
    /// Input size S (a multiple of P); the grid is S/P × S/P.
    pub input_size: u32,
    /// Number of codes K (at most 65536).
    pub codebook: u32,
    /// Lloyd iterations.
    pub iterations: u32,
    /// Seed of every random choice.
    pub seed: u64,
    /// At most this many training images.
    pub max_images: usize,
    /// At most this many training patches (a seeded subsample).
    pub max_patches: usize,
    /// Views per training image (the centre view plus random-resized crops).
    pub views_per_image: u32,
    /// What a patch vector is made of.
    pub features: PatchFeatures,
    /// With [`PatchFeatures::Structure`]: the RMS contrast per pixel (inputs in [-1, 1]) below which a patch is
    /// "flat" (the last code) rather than matched to a learned pattern.
    pub flat_threshold: f32,
}

/// What the codebook matches: the patch's colours, or its colour-free structure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchFeatures {
    /// The RGB pixels (codes capture colour first, then texture).
    #[default]
    Rgb,
    /// The RGB pixels minus the patch mean (brightness-invariant; colour differences remain).
    Centred,
    /// Luma minus the patch mean, matched by direction (spherical k-means): codes are edges, corners and
    /// textures whatever their colours and contrast; a patch whose best code projects below the flat threshold
    /// gets the extra, last code "flat". The ONNX graph is still one convolution and an ArgMax.
    Structure,
}

/// ITU-R BT.601 luma weights.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            patch: 8,
            input_size: 112,
            codebook: 512,
            iterations: 15,
            seed: 0,
            max_images: 5000,
            max_patches: 200_000,
            views_per_image: 2,
            features: PatchFeatures::Rgb,
            flat_threshold: 0.04,
        }
    }
}

impl FitConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::Model {
            model: "tokenizer fit".into(),
            reason,
        };
        if self.patch == 0 || self.input_size == 0 || !self.input_size.is_multiple_of(self.patch) {
            return Err(bad(format!(
                "--input-size {} must be a positive multiple of --patch {}",
                self.input_size, self.patch
            )));
        }
        if !(self.flat_threshold.is_finite() && self.flat_threshold >= 0.0) {
            return Err(bad(format!(
                "--flat-threshold {} must be a finite number >= 0",
                self.flat_threshold
            )));
        }
        let min_codes = if self.features == PatchFeatures::Structure {
            3
        } else {
            2
        };
        if self.codebook < min_codes || self.codebook > 65536 {
            return Err(bad(format!(
                "--codebook {} is out of range {min_codes}..=65536",
                self.codebook
            )));
        }
        if self.views_per_image == 0 || self.max_images == 0 || self.max_patches == 0 {
            return Err(bad("--views, --max-images and --max-patches must be positive".into()));
        }
        Ok(())
    }

    fn dim(&self) -> usize {
        feature_dim(self.features, self.patch)
    }

    /// Codes learned by k-means (structure codebooks reserve one for "flat").
    fn learned_codes(&self) -> usize {
        self.codebook as usize - usize::from(self.features == PatchFeatures::Structure)
    }
}

fn feature_dim(features: PatchFeatures, patch: u32) -> usize {
    let plane = (patch * patch) as usize;
    if features == PatchFeatures::Structure {
        plane
    } else {
        3 * plane
    }
}

/// What fitting measured on held-out images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Training patches used.
    pub train_patches: usize,
    /// Held-out patches evaluated.
    pub heldout_patches: usize,
    /// Held-out images the patches came from (validation images, or every tenth training image when there
    /// is no validation split).
    #[serde(default)]
    pub heldout_images: usize,
    /// Fraction of codes used at least once on held-out patches (a small held-out set under-counts: compare
    /// `fit_usage`).
    pub usage: f64,
    /// Fraction of codes assigned at least once among the `train_patches` fitting patches.
    #[serde(default)]
    pub fit_usage: f64,
    /// Perplexity of the held-out code histogram (exp of its entropy).
    pub perplexity: f64,
    /// Mean squared quantisation error per dimension on held-out patches (inputs in [-1, 1]).
    pub quant_error: f64,
    /// The same error with one code (the mean patch): a baseline.
    pub quant_error_one_code: f64,
    /// Fraction of held-out patches given the "flat" code (structure codebooks; 0 otherwise). The errors above
    /// are then measured on the other patches, as unit vectors.
    #[serde(default)]
    pub flat_fraction: f64,
}

/// A fitted codebook.
#[derive(Debug, Clone)]
pub struct Codebook {
    centroids: Array2<f32>,
    patch: u32,
    input_size: u32,
    features: PatchFeatures,
    flat_threshold: f32,
}

const CHUNK: usize = 1024;

/// Codebooks up to this size are seeded with k-means++.
const KMEANS_PP_MAX: usize = 1024;

impl Codebook {
    /// Number of codes (the vocabulary, "flat" included).
    pub fn len(&self) -> usize {
        self.centroids.nrows() + usize::from(self.features == PatchFeatures::Structure)
    }

    /// What the codes match.
    pub fn features(&self) -> PatchFeatures {
        self.features
    }

    /// The score threshold of the "flat" code: `flat_threshold · √(P²)` (a projection of the centred luma).
    fn flat_score(&self) -> f32 {
        self.flat_threshold * self.patch as f32
    }

    /// `true` without codes (never for a fitted codebook).
    pub fn is_empty(&self) -> bool {
        self.centroids.nrows() == 0
    }

    /// The patch vectors of a normalised CHW image (`3 × S × S` floats), in grid order; each vector is laid
    /// out channel, row, column (the layout of the ONNX convolution weights); structure vectors are the
    /// centred luma, row, column.
    pub fn patches(&self, chw: &[f32]) -> Array2<f32> {
        extract_patches(chw, self.input_size as usize, self.patch as usize, self.features)
    }

    /// The code of every row of `x` (plain Rust; the reference the ONNX graph is checked against) with its
    /// squared distance (structure codebooks: its projection, the flat code's being the threshold).
    pub fn nearest(&self, x: ArrayView2<'_, f32>) -> Vec<(u16, f32)> {
        if self.features != PatchFeatures::Structure {
            return assign(x, &self.centroids);
        }
        let flat = self.centroids.nrows() as u16;
        let threshold = self.flat_score();
        best_per_row(x, &self.centroids, |scores, _| {
            let (k, best) = scores
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |b, (k, &v)| if v > b.1 { (k, v) } else { b });
            if best < threshold {
                (flat, threshold)
            } else {
                (k as u16, best)
            }
        })
    }

    /// How well `code` matches patch `x`, higher is better: minus the squared distance, or for structure
    /// codebooks the projection (the flat code's is the threshold). Tests use it to tell float ties apart.
    pub fn score(&self, x: ArrayView1<'_, f32>, code: u16) -> f32 {
        let k = code as usize;
        match self.features {
            PatchFeatures::Structure if k == self.centroids.nrows() => self.flat_score(),
            PatchFeatures::Structure => x.dot(&self.centroids.row(k)),
            _ => -self
                .centroids
                .row(k)
                .iter()
                .zip(x.iter())
                .map(|(c, v)| (c - v) * (c - v))
                .sum::<f32>(),
        }
    }

    /// The ONNX model computing nearest-code indices `[B, S/P, S/P]` (int64) from normalised pixels
    /// `[B, 3, S, S]`.
    pub fn to_onnx(&self) -> Vec<u8> {
        let k = self.len();
        let p = self.patch as i64;
        let mut w = Vec::with_capacity(k * 3 * (p * p) as usize);
        let mut b = Vec::with_capacity(k);
        let select = if self.features == PatchFeatures::Structure {
            // score_k = Σ_c luma_c · (c_k · x_c): the projection of the patch's luma on the zero-mean code
            // (which ignores the patch mean, so no centring is needed); the flat code scores the threshold.
            for c in self.centroids.outer_iter() {
                for l in LUMA {
                    w.extend(c.iter().map(|v| l * v));
                }
                b.push(0.0);
            }
            w.extend(std::iter::repeat_n(0.0, 3 * (p * p) as usize));
            b.push(self.flat_score());
            "ArgMax"
        } else {
            let d = self.centroids.ncols();
            for c in self.centroids.outer_iter() {
                // argmin_k ||x - c_k||² = argmin_k (-2 x·c_k + ||c_k||²); with patch-mean removal m = Σx/d:
                // ||x - m - c_k||² ≐ x·(-2 c_k + (2 Σc_k / d)·1) + ||c_k||².
                let shift = if self.features == PatchFeatures::Centred {
                    2.0 * c.sum() / d as f32
                } else {
                    0.0
                };
                w.extend(c.iter().map(|v| -2.0 * v + shift));
                b.push(c.iter().map(|v| v * v).sum::<f32>());
            }
            "ArgMin"
        };
        let g = self.input_size as i64 / p;
        let mut gb = GraphBuilder::new("imglish_kmeans_tokenizer");
        let s = self.input_size as i64;
        gb.input(
            "pixels",
            data_type::FLOAT,
            &[Dim::from("batch"), Dim::from(3), Dim::from(s), Dim::from(s)],
        )
        .output(
            "tokens",
            data_type::INT64,
            &[Dim::from("batch"), Dim::from(g), Dim::from(g)],
        )
        .initializer_f32("codes_w", &[k as i64, 3, p, p], &w)
        .initializer_f32("codes_b", &[k as i64], &b)
        .node(
            "Conv",
            &["pixels", "codes_w", "codes_b"],
            &["scores"],
            &[
                ("kernel_shape", Attr::Ints(vec![p, p])),
                ("strides", Attr::Ints(vec![p, p])),
            ],
        )
        .node(
            select,
            &["scores"],
            &["tokens"],
            &[("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))],
        )
        .metadata("imglish.tokenizer", "kmeans");
        onnx::encode(&gb.finish())
    }

    /// The decoder of an RGB codebook: tokens `[B, G, G]` int64 → pixels `[B, 3, S, S]` in [0, 1], each patch
    /// drawn as its code's centroid. `None` for centred and structure codebooks, whose codes drop the patch mean.
    pub fn decoder_onnx(&self) -> Option<Vec<u8>> {
        if self.features != PatchFeatures::Rgb {
            return None;
        }
        let (k, p, s) = (self.len() as i64, i64::from(self.patch), i64::from(self.input_size));
        let g = s / p;
        let table: Vec<f32> = self.centroids.iter().copied().collect();
        let mut gb = GraphBuilder::new("imglish_kmeans_decoder");
        gb.input(
            "tokens",
            data_type::INT64,
            &[Dim::from("batch"), Dim::from(g), Dim::from(g)],
        )
        .output(
            "pixels",
            data_type::FLOAT,
            &[Dim::from("batch"), Dim::from(3), Dim::from(s), Dim::from(s)],
        )
        .initializer_f32("codes", &[k, 3 * p * p], &table)
        .initializer_i64("patch_shape", &[6], &[-1, g, g, 3, p, p])
        .initializer_i64("image_shape", &[4], &[-1, 3, s, s])
        .initializer_f32("half", &[], &[0.5])
        .initializer_f32("zero", &[], &[0.0])
        .initializer_f32("one", &[], &[1.0])
        .node("Gather", &["codes", "tokens"], &["patches"], &[("axis", Attr::Int(0))])
        .node("Reshape", &["patches", "patch_shape"], &["grid"], &[])
        // [B, gy, gx, c, py, px] → [B, c, gy, py, gx, px]
        .node(
            "Transpose",
            &["grid"],
            &["planes"],
            &[("perm", Attr::Ints(vec![0, 3, 1, 4, 2, 5]))],
        )
        .node("Reshape", &["planes", "image_shape"], &["normalised"], &[])
        // x = (x' + 1) / 2 for the minus-one-one normalisation.
        .node("Mul", &["normalised", "half"], &["scaled"], &[])
        .node("Add", &["scaled", "half"], &["shifted"], &[])
        .node("Clip", &["shifted", "zero", "one"], &["pixels"], &[])
        .metadata("imglish.decoder", "kmeans");
        Some(onnx::encode(&gb.finish()))
    }

    /// The card for [`Codebook::to_onnx`]'s bytes.
    pub fn card(&self, onnx_bytes: &[u8], report: &FitReport) -> Card {
        let g = self.input_size / self.patch;
        Card {
            card_version: CARD_VERSION,
            name: format!(
                "imglish-kmeans-{}{}x{}-k{}",
                match self.features {
                    PatchFeatures::Rgb => "",
                    PatchFeatures::Centred => "centred-",
                    PatchFeatures::Structure => "structure-",
                },
                self.patch,
                self.patch,
                self.len()
            ),
            input_size: self.input_size,
            layout: "NCHW".into(),
            normalization: Normalization::MinusOneOne,
            resize_filter: Filter::Bicubic,
            output: OutputKind::Indices,
            grid: [g, g],
            vocab_size: self.len() as u32,
            onnx_sha256: sha256_hex(onnx_bytes),
            external_data: Default::default(),
            decoder: None,
            stats: Some(serde_json::to_value(report).unwrap_or_default()),
        }
    }
}

fn extract_patches(chw: &[f32], s: usize, p: usize, features: PatchFeatures) -> Array2<f32> {
    let g = s / p;
    let d = feature_dim(features, p as u32);
    let mut out = Array2::<f32>::zeros((g * g, d));
    for gy in 0..g {
        for gx in 0..g {
            let mut row = out.row_mut(gy * g + gx);
            if features == PatchFeatures::Structure {
                for dy in 0..p {
                    for dx in 0..p {
                        let at = (gy * p + dy) * s + gx * p + dx;
                        row[dy * p + dx] = (0..3).map(|c| LUMA[c] * chw[c * s * s + at]).sum();
                    }
                }
            } else {
                let mut i = 0;
                for c in 0..3 {
                    for dy in 0..p {
                        let base = c * s * s + (gy * p + dy) * s + gx * p;
                        for dx in 0..p {
                            row[i] = chw[base + dx];
                            i += 1;
                        }
                    }
                }
            }
            if features != PatchFeatures::Rgb {
                let m = row.sum() / d as f32;
                row.mapv_inplace(|v| v - m);
            }
        }
    }
    out
}

/// Nearest centroid (and squared distance) of every row of `x`, computed in fixed chunks in parallel.
fn assign(x: ArrayView2<'_, f32>, c: &Array2<f32>) -> Vec<(u16, f32)> {
    let c_norm: Vec<f32> = c.outer_iter().map(|r| r.dot(&r)).collect();
    best_per_row(x, c, |dots, xr| {
        let mut best = (0usize, f32::INFINITY);
        for (k, (&dot, &cn)) in dots.iter().zip(&c_norm).enumerate() {
            let dist = cn - 2.0 * dot;
            if dist < best.1 {
                best = (k, dist);
            }
        }
        (best.0 as u16, (best.1 + xr.dot(&xr)).max(0.0))
    })
}

/// `pick(x_i · c_k for every k, x_i)` for every row of `x`: the dot products computed in fixed chunks of rows in
/// parallel, so memory stays at one chunk's scores per thread whatever the number of rows.
fn best_per_row(
    x: ArrayView2<'_, f32>,
    c: &Array2<f32>,
    pick: impl Fn(ArrayView1<'_, f32>, ArrayView1<'_, f32>) -> (u16, f32) + Sync,
) -> Vec<(u16, f32)> {
    let ct = c.t();
    let chunks: Vec<usize> = (0..x.nrows()).step_by(CHUNK).collect();
    chunks
        .par_iter()
        .flat_map_iter(|&start| {
            let xb = x.slice(ndarray::s![start..(start + CHUNK).min(x.nrows()), ..]);
            let mut dots = Array2::<f32>::zeros((xb.nrows(), c.nrows()));
            general_mat_mul(1.0, &xb, &ct, 0.0, &mut dots);
            let rows: Vec<(u16, f32)> = dots
                .outer_iter()
                .zip(xb.outer_iter())
                .map(|(d, xr)| pick(d, xr))
                .collect();
            rows
        })
        .collect()
}

/// Renders views of `rows` and returns their patches, in row order.
fn collect_patches(rows: &[&ManifestRow], config: &FitConfig, progress: &(dyn Progress + Sync)) -> Result<Array2<f32>> {
    let s = config.input_size;
    let per_image: Vec<Vec<Array2<f32>>> = rows
        .par_iter()
        .map_init(Resizer::new, |resizer, row| {
            let spec = ViewSpec {
                count: config.views_per_image,
                size: s,
                filter: Filter::Bicubic,
                crop: CropSpec::default(),
                seed: config.seed,
            };
            let out = match read_image_bytes(row).ok().and_then(|bytes| {
                render_views(
                    &bytes,
                    (row.width, row.height),
                    row.sample_id,
                    &spec,
                    &DecodeOptions::default(),
                    resizer,
                )
                .ok()
            }) {
                Some((_, images)) => images
                    .iter()
                    .map(|img| {
                        let chw = normalize_minus_one_one(img.as_raw(), s as usize);
                        extract_patches(&chw, s as usize, config.patch as usize, config.features)
                    })
                    .collect(),
                None => Vec::new(),
            };
            progress.inc(1);
            out
        })
        .collect();
    let blocks: Vec<ArrayView2<'_, f32>> = per_image.iter().flatten().map(|a| a.view()).collect();
    if blocks.is_empty() {
        return Ok(Array2::zeros((0, config.dim())));
    }
    ndarray::concatenate(Axis(0), &blocks).map_err(|e| Error::Model {
        model: "tokenizer fit".into(),
        reason: e.to_string(),
    })
}

/// The rows of `x` whose norm is at least `min_norm` (and above zero), scaled to unit length.
fn unit_rows(x: ArrayView2<'_, f32>, min_norm: f32) -> Array2<f32> {
    let norms: Vec<f32> = x.outer_iter().map(|r| r.dot(&r).sqrt()).collect();
    let keep: Vec<usize> = (0..x.nrows())
        .filter(|&i| norms[i] > 0.0 && norms[i] >= min_norm)
        .collect();
    let mut out = x.select(Axis(0), &keep);
    for (mut row, &i) in out.outer_iter_mut().zip(&keep) {
        row.mapv_inplace(|v| v / norms[i]);
    }
    out
}

/// HWC RGB8 → CHW floats in [-1, 1].
pub(crate) fn normalize_minus_one_one(hwc: &[u8], s: usize) -> Vec<f32> {
    let plane = s * s;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px[c] as f32 * (2.0 / 255.0) - 1.0;
        }
    }
    out
}

fn kmeans_pp(x: ArrayView2<'_, f32>, k: usize, rng: &mut Rng) -> Array2<f32> {
    let n = x.nrows();
    let d = x.ncols();
    let mut centers = Array2::<f32>::zeros((k, d));
    let first = rng.below(n as u64) as usize;
    centers.row_mut(0).assign(&x.row(first));
    let dist_to = |c: ndarray::ArrayView1<'_, f32>| -> Vec<f32> {
        x.outer_iter()
            .collect::<Vec<_>>()
            .par_chunks(CHUNK)
            .flat_map_iter(|rows| {
                rows.iter()
                    .map(|r| r.iter().zip(c.iter()).map(|(a, b)| (a - b) * (a - b)).sum::<f32>())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let mut d2 = dist_to(centers.row(0));
    for j in 1..k {
        let total: f64 = d2.iter().map(|&v| v as f64).sum();
        let pick = if total <= 0.0 {
            rng.below(n as u64) as usize
        } else {
            let mut target = rng.next_f64() * total;
            let mut idx = n - 1;
            for (i, &v) in d2.iter().enumerate() {
                target -= v as f64;
                if target <= 0.0 {
                    idx = i;
                    break;
                }
            }
            idx
        };
        centers.row_mut(j).assign(&x.row(pick));
        let nd = dist_to(centers.row(j));
        for (a, b) in d2.iter_mut().zip(nd) {
            *a = a.min(b);
        }
    }
    centers
}

fn lloyd_step(x: ArrayView2<'_, f32>, centers: &mut Array2<f32>) -> f64 {
    let (k, d) = centers.dim();
    let assignment = assign(x, centers);
    // Per-chunk sums in f64, combined in chunk order: independent of the thread count.
    let chunks: Vec<usize> = (0..x.nrows()).step_by(CHUNK).collect();
    let partial: Vec<(Array2<f64>, Vec<u64>)> = chunks
        .par_iter()
        .map(|&start| {
            let mut sums = Array2::<f64>::zeros((k, d));
            let mut counts = vec![0u64; k];
            let end = (start + CHUNK).min(x.nrows());
            for (i, a) in assignment.iter().enumerate().take(end).skip(start) {
                let c = a.0 as usize;
                counts[c] += 1;
                let mut row = sums.row_mut(c);
                for (s, v) in row.iter_mut().zip(x.row(i)) {
                    *s += *v as f64;
                }
            }
            (sums, counts)
        })
        .collect();
    let mut sums = Array2::<f64>::zeros((k, d));
    let mut counts = vec![0u64; k];
    for (s, c) in partial {
        sums += &s;
        for (a, b) in counts.iter_mut().zip(c) {
            *a += b;
        }
    }
    // Empty clusters take the points that are currently worst served, in a deterministic order.
    let mut worst: Vec<usize> = (0..x.nrows()).collect();
    worst.sort_by(|&a, &b| assignment[b].1.total_cmp(&assignment[a].1).then(a.cmp(&b)));
    let mut next_worst = worst.into_iter();
    for (j, &count) in counts.iter().enumerate() {
        if count > 0 {
            let n = count as f64;
            for (c, s) in centers.row_mut(j).iter_mut().zip(sums.row(j)) {
                *c = (*s / n) as f32;
            }
        } else if let Some(i) = next_worst.next() {
            centers.row_mut(j).assign(&x.row(i));
        }
    }
    assignment.iter().map(|a| a.1 as f64).sum::<f64>() / (x.nrows().max(1) * d) as f64
}

/// Fits a codebook on the manifest in `manifest_dir`. Training images come from the train split, held-out
/// images from the val split (or every tenth image when there is none). `progress` gets the phases (reading
/// training patches, k-means++ seeding, Lloyd iterations, reading held-out patches) with their totals.
pub fn fit_codebook(
    manifest_dir: &Path,
    config: &FitConfig,
    progress: &(dyn Progress + Sync),
) -> Result<(Codebook, FitReport)> {
    config.validate()?;
    let manifest = Manifest::open(manifest_dir).map_err(|e| Error::Model {
        model: manifest_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut train: Vec<&ManifestRow> = manifest.rows.iter().filter(|r| r.split == Split::Train).collect();
    let mut held: Vec<&ManifestRow> = manifest.rows.iter().filter(|r| r.split == Split::Val).collect();
    if held.is_empty() {
        held = train.iter().copied().step_by(10).collect();
        train = train
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 10 != 0)
            .map(|(_, r)| *r)
            .collect();
    }
    let stride = train.len().div_ceil(config.max_images).max(1);
    let train: Vec<&ManifestRow> = train.into_iter().step_by(stride).collect();
    let held: Vec<&ManifestRow> = held.into_iter().take(config.max_images / 5 + 1).collect();

    let structure = config.features == PatchFeatures::Structure;
    progress.phase("reading training patches (images)", train.len() as u64);
    let mut all = collect_patches(&train, config, progress)?;
    if structure {
        // Spherical k-means on the directions of the patches that are not flat.
        all = unit_rows(all.view(), config.flat_threshold * config.patch as f32);
    }
    if all.nrows() < config.learned_codes() {
        return Err(Error::Model {
            model: manifest_dir.display().to_string(),
            reason: format!(
                "only {} {}training patches for a codebook of {} codes (use more images or a smaller --codebook)",
                all.nrows(),
                if structure { "non-flat " } else { "" },
                config.codebook
            ),
        });
    }
    let mut rng = Rng::keyed(&[config.seed, 0x6B6D_6561_6E73]);
    // A seeded subsample of at most max_patches patches (a partial Fisher-Yates over indices).
    let x = if all.nrows() > config.max_patches {
        let mut idx: Vec<usize> = (0..all.nrows()).collect();
        for i in 0..config.max_patches {
            let j = i + rng.below((idx.len() - i) as u64) as usize;
            idx.swap(i, j);
        }
        let mut chosen = idx[..config.max_patches].to_vec();
        chosen.sort_unstable();
        all.select(Axis(0), &chosen)
    } else {
        all
    };
    // k-means++ is O(K·n·d) and sequential in K: for large codebooks the seeding is a seeded draw of distinct
    // patches instead (Lloyd's iterations then do the work).
    let k = config.learned_codes();
    progress.phase(&format!("seeding {k} codes on {} patches", x.nrows()), 0);
    let mut centers = if k <= KMEANS_PP_MAX {
        let init_n = x.nrows().min(20_000.max(4 * k));
        kmeans_pp(x.slice(ndarray::s![..init_n, ..]), k, &mut rng)
    } else {
        let mut idx: Vec<usize> = (0..x.nrows()).collect();
        for i in 0..k {
            let j = i + rng.below((idx.len() - i) as u64) as usize;
            idx.swap(i, j);
        }
        x.select(Axis(0), &idx[..k])
    };
    progress.phase("Lloyd iterations", u64::from(config.iterations));
    for _ in 0..config.iterations {
        lloyd_step(x.view(), &mut centers);
        if structure {
            centers = unit_rows(centers.view(), 0.0);
        }
        progress.inc(1);
    }
    let codebook = Codebook {
        centroids: centers,
        patch: config.patch,
        input_size: config.input_size,
        features: config.features,
        flat_threshold: config.flat_threshold,
    };

    // Held-out evaluation: the code histogram over every patch; the quantisation error over the patches that
    // are matched to a learned code (for structure codebooks, as unit vectors, like the training patches).
    progress.phase("reading held-out patches (images)", held.len() as u64);
    let mut h = collect_patches(&held, config, progress)?;
    let assignment = codebook.nearest(h.view());
    let d = config.dim() as f64;
    let mut hist = vec![0u64; codebook.len()];
    for (k, _) in &assignment {
        hist[*k as usize] += 1;
    }
    let n = assignment.len().max(1) as f64;
    let mut flat_fraction = 0.0;
    let mut err = 0f64;
    if structure {
        let flat = codebook.centroids.nrows();
        flat_fraction = hist[flat] as f64 / n;
        let matched: Vec<usize> = (0..assignment.len())
            .filter(|&i| assignment[i].0 as usize != flat)
            .collect();
        h = unit_rows(h.select(Axis(0), &matched).view(), 0.0);
        for (row, &i) in h.outer_iter().zip(&matched) {
            let c = codebook.centroids.row(assignment[i].0 as usize);
            err += row
                .iter()
                .zip(c.iter())
                .map(|(a, b)| ((a - b) * (a - b)) as f64)
                .sum::<f64>();
        }
    } else {
        err = assignment.iter().map(|a| a.1 as f64).sum();
    }
    let matched_n = h.nrows().max(1) as f64;
    let entropy: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum();
    let mean = x
        .mean_axis(Axis(0))
        .unwrap_or_else(|| ndarray::Array1::zeros(config.dim()));
    let one_code: f64 = h
        .outer_iter()
        .map(|r| {
            r.iter()
                .zip(mean.iter())
                .map(|(a, b)| ((a - b) * (a - b)) as f64)
                .sum::<f64>()
        })
        .sum();
    let fit_codes: std::collections::HashSet<u16> = codebook.nearest(x.view()).iter().map(|a| a.0).collect();
    let report = FitReport {
        train_patches: x.nrows(),
        heldout_patches: assignment.len(),
        heldout_images: held.len(),
        fit_usage: fit_codes.len() as f64 / codebook.len() as f64,
        usage: hist.iter().filter(|&&c| c > 0).count() as f64 / codebook.len() as f64,
        perplexity: entropy.exp(),
        quant_error: err / (matched_n * d),
        quant_error_one_code: one_code / (matched_n * d),
        flat_fraction,
    };
    Ok((codebook, report))
}
