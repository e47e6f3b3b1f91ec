//! Visual tokenizers as data: an ONNX model plus a JSON card beside it that says how to feed it and read it.

use std::path::{Path, PathBuf};

use imglish_ingest::Filter;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::session::{Model, Output, OutputView, SessionOptions};

/// Version of the card format.
pub const CARD_VERSION: u32 = 1;

/// How RGB8 pixels become the model's float input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Normalization {
    /// DALL-E's `map_pixels`: x' = (1 - 2·eps)·x + eps, x = u8/255.
    LogitLaplace {
        /// eps (0.1 for DALL-E).
        eps: f32,
    },
    /// (x - mean) / std per channel, x = u8/255.
    MeanStd {
        /// Channel means.
        mean: [f32; 3],
        /// Channel standard deviations.
        std: [f32; 3],
    },
    /// x' = 2·x - 1, x = u8/255.
    MinusOneOne,
}

impl Normalization {
    /// Per-channel (scale, offset) such that x' = u8 · scale + offset.
    pub fn affine(&self) -> [(f32, f32); 3] {
        match *self {
            Normalization::LogitLaplace { eps } => [((1.0 - 2.0 * eps) / 255.0, eps); 3],
            Normalization::MeanStd { mean, std } => [0, 1, 2].map(|c| (1.0 / (255.0 * std[c]), -mean[c] / std[c])),
            Normalization::MinusOneOne => [(2.0 / 255.0, -1.0); 3],
        }
    }
}

/// What the model outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputKind {
    /// Float logits `[B, V, h, w]`; the token is the argmax over V.
    Logits,
    /// Integer indices `[B, h, w]`.
    Indices,
}

/// The card of a visual tokenizer (`<model>.card.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Card {
    /// Card format version.
    pub card_version: u32,
    /// A human name.
    pub name: String,
    /// Square input size in pixels.
    pub input_size: u32,
    /// Input layout (only `NCHW`).
    pub layout: String,
    /// Pixel normalisation.
    pub normalization: Normalization,
    /// Filter used to resize views to `input_size`.
    pub resize_filter: Filter,
    /// Output kind.
    pub output: OutputKind,
    /// Token grid `[h, w]`.
    pub grid: [u32; 2],
    /// Number of codes.
    pub vocab_size: u32,
    /// sha256 of the ONNX file, hex.
    pub onnx_sha256: String,
    /// sha256 of each external data file the model's initializers point to (location relative to the model's
    /// folder → hex digest); empty for self-contained models.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub external_data: std::collections::BTreeMap<String, String>,
    /// The tokenizer's decoder (tokens → pixels), for tokenizers that have one: `imglish inspect --png` draws
    /// its reconstructions and `imglish tokenizer eval` measures them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<DecoderRef>,
    /// Fit statistics (for tokenizers fitted by imglish): codebook usage, perplexity, quantisation error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
}

impl Card {
    /// The DALL-E dVAE encoder preset (112 input, logit-laplace eps 0.1, 8192 codes on 14x14, logits).
    pub fn dall_e(onnx_sha256: &str) -> Card {
        Card {
            card_version: CARD_VERSION,
            name: "dall-e-dvae-encoder".into(),
            input_size: 112,
            layout: "NCHW".into(),
            normalization: Normalization::LogitLaplace { eps: 0.1 },
            resize_filter: Filter::Lanczos3,
            output: OutputKind::Logits,
            grid: [14, 14],
            vocab_size: 8192,
            onnx_sha256: onnx_sha256.into(),
            external_data: Default::default(),
            decoder: None,
            stats: None,
        }
    }

    /// The BEiT v2 VQ-KD tokenizer preset (224 input, 8192 codes on 14x14, indices). The VQ-KD model applies its
    /// own ImageNet scaling to pixels in [0, 1], so the card feeds x / 255 (`tokenizer/export/export_beit_v2.py`
    /// exports it that way).
    pub fn beit_v2(onnx_sha256: &str) -> Card {
        Card {
            card_version: CARD_VERSION,
            name: "beit-v2-vqkd".into(),
            input_size: 224,
            layout: "NCHW".into(),
            normalization: Normalization::MeanStd {
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            resize_filter: Filter::Bicubic,
            output: OutputKind::Indices,
            grid: [14, 14],
            vocab_size: 8192,
            onnx_sha256: onnx_sha256.into(),
            external_data: Default::default(),
            decoder: None,
            stats: None,
        }
    }

    /// Where the card of `model` lives: `my.onnx` → `my.card.json`.
    pub fn path_for(model: &Path) -> PathBuf {
        model.with_extension("card.json")
    }

    /// Tokens per view.
    pub fn tokens_per_view(&self) -> usize {
        self.grid[0] as usize * self.grid[1] as usize
    }
}

/// sha256 of a byte string, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// What a card for a third-party model says that the model cannot tell: see [`card_for_model`].
#[derive(Debug, Clone)]
pub struct CardSpec {
    /// A human name.
    pub name: String,
    /// Square input size in pixels.
    pub input_size: u32,
    /// Pixel normalisation the model was trained with.
    pub normalization: Normalization,
    /// Filter that resizes views to the input size.
    pub resize_filter: Filter,
    /// Number of codes, for models that output indices (logits give it).
    pub vocab_size: Option<u32>,
}

/// Writes nothing: runs `model_path` (external data resolved from its folder) on a probe batch of two images at
/// `spec.input_size` and builds its card from what comes out: logits `[B, V, h, w]` (vocabulary and grid from the
/// shape) or indices `[B, h, w]` (vocabulary from `spec.vocab_size`, checked against the probe's largest index);
/// the model's and every external data file's sha256.
pub fn card_for_model(model_path: &Path, spec: &CardSpec, options: &SessionOptions) -> Result<Card> {
    let bytes = std::fs::read(model_path).map_err(|source| Error::Io {
        path: model_path.to_path_buf(),
        source,
    })?;
    let external_data = external_data_hashes(model_path, &bytes)?;
    let mut model = if external_data.is_empty() {
        Model::from_bytes(&model_path.display().to_string(), &bytes, options)?
    } else {
        Model::from_path_with_external_data(model_path, options)?
    };
    let s = spec.input_size as usize;
    // Two images: mid-grey and a ramp, in the normalised range.
    let data: Vec<f32> = (0..2 * 3 * s * s)
        .map(|i| {
            if i < 3 * s * s {
                0.0
            } else {
                (i % s) as f32 / s as f32 - 0.5
            }
        })
        .collect();
    let out = model
        .run_f32(&[2, 3, s, s], &data)
        .map_err(|e| mismatch(model_path, format!("a probe batch [2, 3, {s}, {s}] does not run: {e}")))?;
    let (output, grid, vocab_size) = match &out {
        Output::F32 { shape, .. } if shape.len() == 4 && shape[0] == 2 => {
            (OutputKind::Logits, [shape[2], shape[3]], shape[1])
        }
        Output::I64 { shape, data } if shape.len() == 3 && shape[0] == 2 => {
            let vocab = spec.vocab_size.ok_or_else(|| {
                mismatch(
                    model_path,
                    "the model outputs indices [B, h, w]: give the vocabulary size".into(),
                )
            })? as usize;
            if let Some(bad) = data.iter().find(|&&t| t < 0 || t as usize >= vocab) {
                return Err(mismatch(
                    model_path,
                    format!("the probe batch gave index {bad}, outside the vocabulary of {vocab}"),
                ));
            }
            (OutputKind::Indices, [shape[1], shape[2]], vocab)
        }
        other => {
            let shape = match other {
                Output::F32 { shape, .. } | Output::I64 { shape, .. } => shape,
            };
            return Err(mismatch(
                model_path,
                format!("output shape {shape:?} for a batch of 2: expected logits [2, V, h, w] or indices [2, h, w]"),
            ));
        }
    };
    let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(Card {
        card_version: CARD_VERSION,
        name: spec.name.clone(),
        input_size: spec.input_size,
        layout: "NCHW".into(),
        normalization: spec.normalization,
        resize_filter: spec.resize_filter,
        output,
        grid: grid.map(to_u32),
        vocab_size: to_u32(vocab_size),
        onnx_sha256: sha256_hex(&bytes),
        external_data,
        decoder: None,
        stats: None,
    })
}

/// The sha256 of each external data file of the model `bytes` (read from `model_path`'s folder): location →
/// digest. A location that is absolute or climbs out of the folder is refused.
pub fn external_data_hashes(model_path: &Path, bytes: &[u8]) -> Result<std::collections::BTreeMap<String, String>> {
    let proto = crate::onnx::decode(bytes).map_err(|e| mismatch(model_path, format!("not an ONNX model: {e}")))?;
    let dir = model_path.parent().unwrap_or(Path::new("."));
    let mut hashes = std::collections::BTreeMap::new();
    for location in crate::onnx::external_data_files(&proto) {
        let inside = Path::new(&location)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
        if !inside || location.is_empty() {
            return Err(mismatch(
                model_path,
                format!("external data location '{location}' is not a file inside the model's folder"),
            ));
        }
        let path = dir.join(&location);
        let data = std::fs::read(&path).map_err(|e| {
            mismatch(
                model_path,
                format!("cannot read its external data file {} ({e})", path.display()),
            )
        })?;
        hashes.insert(location, sha256_hex(&data));
    }
    Ok(hashes)
}

/// Checks the card's external data digests against the files; `true` when the model has external data.
fn check_external_data(name: &Path, bytes: &[u8], card: &Card) -> Result<bool> {
    let found = external_data_hashes(name, bytes)?;
    for (location, hash) in &found {
        match card.external_data.get(location) {
            None => {
                return Err(mismatch(
                    name,
                    format!(
                        "its external data file {location} (sha256 {hash}) is not in the card's external_data: a \
                         card covers every file of the model (`imglish tokenizer card` writes one)"
                    ),
                ))
            }
            Some(want) if want != hash => {
                return Err(mismatch(
                    name,
                    format!("external data file {location}: sha256 {hash} does not match the card's {want}"),
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = card.external_data.keys().find(|k| !found.contains_key(*k)) {
        return Err(mismatch(
            name,
            format!("the card lists external data file {extra}, which the model does not use"),
        ));
    }
    Ok(!found.is_empty())
}

/// A tokenizer's decoder as its card names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoderRef {
    /// The decoder's ONNX file, relative to the tokenizer's folder.
    pub file: String,
    /// Its sha256, hex.
    pub sha256: String,
}

/// A tokenizer's decoder: token grids `[B, h, w]` → pixels `[B, 3, S, S]` in [0, 1].
#[derive(Debug)]
pub struct TokenDecoder {
    model: Model,
    grid: [u32; 2],
    input_size: u32,
}

impl TokenDecoder {
    /// The decoder of the tokenizer `model_path` with card `card`, checked against the card's hash; `None` when
    /// the tokenizer has none.
    pub fn load(model_path: &Path, card: &Card, options: &SessionOptions) -> Result<Option<TokenDecoder>> {
        let Some(d) = &card.decoder else {
            return Ok(None);
        };
        let path = model_path.parent().unwrap_or(Path::new("")).join(&d.file);
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let hash = sha256_hex(&bytes);
        if hash != d.sha256 {
            return Err(mismatch(
                &path,
                format!(
                    "sha256 {hash} does not match the tokenizer card's decoder sha256 {}",
                    d.sha256
                ),
            ));
        }
        Ok(Some(TokenDecoder {
            model: Model::from_bytes(&path.display().to_string(), &bytes, options)?,
            grid: card.grid,
            input_size: card.input_size,
        }))
    }

    /// Pixels `[B, 3, S, S]` in [0, 1] of `tokens` (each `h·w` codes).
    pub fn decode(&mut self, tokens: &[&[u16]]) -> Result<Vec<f32>> {
        let [h, w] = self.grid.map(|g| g as usize);
        let ids: Vec<i64> = tokens.iter().flat_map(|t| t.iter().map(|&v| i64::from(v))).collect();
        let s = self.input_size as usize;
        match self.model.run_i64(&[tokens.len(), h, w], &ids)? {
            Output::F32 { shape, data } if shape == [tokens.len(), 3, s, s] => Ok(data),
            other => Err(Error::Model {
                model: "tokenizer decoder".into(),
                reason: format!(
                    "output {:?}, expected f32 [{}, 3, {s}, {s}]",
                    match &other {
                        Output::F32 { shape, .. } | Output::I64 { shape, .. } => shape,
                    },
                    tokens.len()
                ),
            }),
        }
    }
}

/// A loaded visual tokenizer: the model, its card, and a fingerprint of both.
#[derive(Debug)]
pub struct VisualTokenizer {
    model: Model,
    card: Card,
    fingerprint: String,
}

fn mismatch(model: &Path, reason: String) -> Error {
    Error::Model {
        model: model.display().to_string(),
        reason,
    }
}

impl VisualTokenizer {
    /// Loads `model` and its card (`my.card.json` beside it), checking the card against the file's hash and the
    /// model's declared inputs and outputs.
    pub fn load(model_path: &Path, options: &SessionOptions) -> Result<Self> {
        // The model first: a mistyped path names the model, not its card.
        let bytes = std::fs::read(model_path).map_err(|source| Error::Io {
            path: model_path.to_path_buf(),
            source,
        })?;
        let card_path = Card::path_for(model_path);
        let card_bytes = std::fs::read(&card_path).map_err(|e| {
            mismatch(
                &card_path,
                format!(
                    "cannot read the tokenizer card that must sit beside {} ({e}); `imglish tokenizer fit` writes \
                     both",
                    model_path.display()
                ),
            )
        })?;
        let card: Card = serde_json::from_slice(&card_bytes)
            .map_err(|e| mismatch(&card_path, format!("invalid tokenizer card: {e}")))?;
        Self::from_parts(model_path, &bytes, card, options)
    }

    /// Checks `card` against the model bytes and builds the tokenizer; `name` is used in messages.
    pub fn from_parts(name: &Path, bytes: &[u8], card: Card, options: &SessionOptions) -> Result<Self> {
        if card.card_version != CARD_VERSION {
            return Err(mismatch(
                name,
                format!("card version {} (this imglish reads {CARD_VERSION})", card.card_version),
            ));
        }
        let hash = sha256_hex(bytes);
        if hash != card.onnx_sha256 {
            return Err(mismatch(
                name,
                format!("sha256 {hash} does not match the card's {}", card.onnx_sha256),
            ));
        }
        if card.vocab_size == 0 || card.vocab_size > 65536 {
            return Err(mismatch(
                name,
                format!("vocab size {} does not fit u16 tokens (1..=65536)", card.vocab_size),
            ));
        }
        if card.layout != "NCHW" {
            return Err(mismatch(
                name,
                format!("layout {} is not supported (NCHW is)", card.layout),
            ));
        }
        let model = if check_external_data(name, bytes, &card)? {
            Model::from_path_with_external_data(name, options)?
        } else {
            Model::from_bytes(&name.display().to_string(), bytes, options)?
        };
        let input = model
            .inputs()
            .first()
            .ok_or_else(|| mismatch(name, "the model has no input".into()))?;
        let s = card.input_size as i64;
        let ok_dim = |d: i64, want: i64| d == -1 || d == want;
        if input.elem != "f32" || input.shape.len() != 4 {
            return Err(mismatch(
                name,
                format!(
                    "input {} is {} of rank {}, expected f32 [B, 3, {s}, {s}]",
                    input.name,
                    input.elem,
                    input.shape.len()
                ),
            ));
        }
        if !(ok_dim(input.shape[1], 3) && ok_dim(input.shape[2], s) && ok_dim(input.shape[3], s)) {
            return Err(mismatch(
                name,
                format!(
                    "input {} has shape {:?}, the card says [B, 3, {s}, {s}]",
                    input.name, input.shape
                ),
            ));
        }
        let output = model
            .outputs()
            .first()
            .ok_or_else(|| mismatch(name, "the model has no output".into()))?;
        let [gh, gw] = card.grid.map(|g| g as i64);
        match card.output {
            OutputKind::Logits => {
                if output.shape.len() != 4 {
                    return Err(mismatch(
                        name,
                        format!(
                            "output {} has rank {}, logits must be [B, V, h, w]",
                            output.name,
                            output.shape.len()
                        ),
                    ));
                }
                let v = card.vocab_size as i64;
                if !(ok_dim(output.shape[1], v) && ok_dim(output.shape[2], gh) && ok_dim(output.shape[3], gw)) {
                    return Err(mismatch(
                        name,
                        format!(
                            "output {} has shape {:?}, the card says [B, {v}, {gh}, {gw}]",
                            output.name, output.shape
                        ),
                    ));
                }
            }
            OutputKind::Indices => {
                if output.shape.len() != 3 || !matches!(output.elem.as_str(), "i64" | "i32") {
                    return Err(mismatch(
                        name,
                        format!(
                            "output {} is {} of rank {}, indices must be integer [B, h, w]",
                            output.name,
                            output.elem,
                            output.shape.len()
                        ),
                    ));
                }
                if !(ok_dim(output.shape[1], gh) && ok_dim(output.shape[2], gw)) {
                    return Err(mismatch(
                        name,
                        format!(
                            "output {} has shape {:?}, the card says [B, {gh}, {gw}]",
                            output.name, output.shape
                        ),
                    ));
                }
            }
        }
        let mut fp = Sha256::new();
        fp.update(bytes);
        fp.update(serde_json::to_vec(&card).unwrap_or_default());
        let fingerprint = fp.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(VisualTokenizer {
            model,
            card,
            fingerprint,
        })
    }

    /// The card.
    pub fn card(&self) -> &Card {
        &self.card
    }

    /// sha256 over the ONNX bytes and the card.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The execution provider in use.
    pub fn provider(&self) -> &'static str {
        self.model.provider()
    }

    /// Normalises a batch of RGB8 images (`input_size`², HWC) into the model's NCHW float input.
    pub fn preprocess(&self, images: &[&[u8]]) -> Vec<f32> {
        let s = self.card.input_size as usize;
        let plane = s * s;
        let aff = self.card.normalization.affine();
        let mut out = vec![0f32; images.len() * 3 * plane];
        for (b, img) in images.iter().enumerate() {
            let base = b * 3 * plane;
            for (i, px) in img.chunks_exact(3).take(plane).enumerate() {
                for c in 0..3 {
                    out[base + c * plane + i] = px[c] as f32 * aff[c].0 + aff[c].1;
                }
            }
        }
        out
    }

    /// Tokenizes a batch of RGB8 views (each `input_size`² HWC bytes): one `Vec<u16>` of `h·w` tokens per view.
    pub fn tokenize(&mut self, images: &[&[u8]]) -> Result<Vec<Vec<u16>>> {
        let s = self.card.input_size as usize;
        let input = self.preprocess(images);
        let (card, batch) = (&self.card, images.len());
        self.model
            .run_f32_with(&[batch, 3, s, s], &input, |out| tokens_from_output(card, out, batch))
    }
}

/// Tokens from the model's output, read in place: indices checked against the vocabulary, or the argmax over
/// the vocabulary axis of `[B, V, h, w]` logits (the first maximum on ties; NaN never wins).
fn tokens_from_output(card: &Card, out: OutputView<'_>, batch: usize) -> Result<Vec<Vec<u16>>> {
    let n = card.tokens_per_view();
    let v = card.vocab_size as usize;
    let bad = |reason: String| Error::Model {
        model: card.name.clone(),
        reason,
    };
    match out {
        OutputView::F32 { shape, data } => {
            if shape != [batch, v, card.grid[0] as usize, card.grid[1] as usize] {
                return Err(bad(format!("logits of shape {shape:?}")));
            }
            // Class-major sweep: each class's plane is contiguous, so the running maxima stream through memory
            // instead of striding by h·w floats per class.
            Ok(data
                .chunks_exact(v * n)
                .map(|logits| {
                    let mut best = vec![f32::NEG_INFINITY; n];
                    let mut arg = vec![0u16; n];
                    for (k, plane) in logits.chunks_exact(n).enumerate() {
                        for ((b, a), &x) in best.iter_mut().zip(arg.iter_mut()).zip(plane) {
                            if x > *b {
                                *b = x;
                                *a = k as u16;
                            }
                        }
                    }
                    arg
                })
                .collect())
        }
        OutputView::I64 { shape, data } => {
            if shape != [batch, card.grid[0] as usize, card.grid[1] as usize] {
                return Err(bad(format!("indices of shape {shape:?}")));
            }
            data.chunks(n)
                .map(|c| {
                    c.iter()
                        .map(|&t| {
                            u16::try_from(t)
                                .ok()
                                .filter(|t| (*t as usize) < v)
                                .ok_or_else(|| bad(format!("token {t} outside the vocabulary of {v}")))
                        })
                        .collect()
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(vocab: u32, grid: [u32; 2]) -> Card {
        Card {
            vocab_size: vocab,
            grid,
            ..Card::dall_e("")
        }
    }

    #[test]
    fn logits_argmax_takes_the_first_maximum_and_never_nan() {
        // [B=2, V=3, 1, 2]: per image, class-major planes of 2 positions.
        let data = [
            0.0,
            5.0,
            /* k=0 */ 1.0,
            5.0,
            /* k=1 */ 1.0,
            4.0, /* k=2: ties at position 0 go to k=1 */
            f32::NAN,
            -1.0,
            /* image 1, k=0 */ -3.0,
            f32::NAN,
            /* k=1 */ -2.0,
            -1.0, /* k=2 */
        ];
        let out = OutputView::F32 {
            shape: vec![2, 3, 1, 2],
            data: &data,
        };
        let tokens = tokens_from_output(&card(3, [1, 2]), out, 2).expect("tokens");
        assert_eq!(tokens, vec![vec![1, 0], vec![2, 0]]);
    }

    #[test]
    fn indices_outside_the_vocabulary_and_wrong_shapes_are_errors() {
        let c = card(4, [1, 2]);
        let ok = OutputView::I64 {
            shape: vec![1, 1, 2],
            data: &[3, 0],
        };
        assert_eq!(tokens_from_output(&c, ok, 1).expect("tokens"), vec![vec![3, 0]]);
        let out_of_vocab = OutputView::I64 {
            shape: vec![1, 1, 2],
            data: &[4, 0],
        };
        assert_eq!(
            tokens_from_output(&c, out_of_vocab, 1).expect_err("vocab").to_string(),
            "dall-e-dvae-encoder: token 4 outside the vocabulary of 4"
        );
        let shape = OutputView::F32 {
            shape: vec![1, 4, 2, 1],
            data: &[0.0; 8],
        };
        assert_eq!(
            tokens_from_output(&c, shape, 1).expect_err("shape").to_string(),
            "dall-e-dvae-encoder: logits of shape [1, 4, 2, 1]"
        );
    }
}
