//! `imglish tokenizer eval`: how well a visual tokenizer describes held-out images of a manifest: the code
//! usage and perplexity of its tokens and, when it has a decoder, the PSNR of the reconstruction. Every tokenizer
//! is measured by this one path (ONNX Runtime, the card's preprocessing), so the numbers of different tokenizers
//! compare directly.

use std::path::Path;

use image::RgbImage;
use imglish_ingest::{
    center_view, decode_rgb, max_reduction, read_image_bytes, render_view, DecodeOptions, Manifest, ManifestRow,
    Progress, Resizer, Split,
};
use serde::{Deserialize, Serialize};

use crate::card::{TokenDecoder, VisualTokenizer};
use crate::error::{Error, Result};
use crate::session::SessionOptions;

/// What [`evaluate_tokenizer`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerQuality {
    /// The tokenizer's card name.
    pub name: String,
    /// Codes in the vocabulary.
    pub vocab_size: u32,
    /// Token grid.
    pub grid: [u32; 2],
    /// Held-out images (centre views).
    pub images: usize,
    /// Fraction of the codes used on them.
    pub usage: f64,
    /// exp(entropy) of their code histogram.
    pub perplexity: f64,
    /// Mean squared error of the decoder's reconstruction, pixels in [0, 1] (`None` without a decoder).
    pub mse: Option<f64>,
    /// 10·log10(1 / mse) in dB.
    pub psnr: Option<f64>,
}

/// The held-out images of a manifest: the validation split, or every tenth training image when there is none
/// (the images `tokenizer fit` and `tokenizer train-dvae` hold out), at most `max`.
pub fn heldout_rows(manifest: &Manifest, max: usize) -> Vec<&ManifestRow> {
    let val: Vec<&ManifestRow> = manifest.rows.iter().filter(|r| r.split == Split::Val).collect();
    let rows = if val.is_empty() {
        manifest
            .rows
            .iter()
            .filter(|r| r.split == Split::Train)
            .step_by(10)
            .collect()
    } else {
        val
    };
    rows.into_iter().take(max).collect()
}

/// Measures the tokenizer `model` on at most `max_images` held-out images of the manifest in `manifest_dir`.
pub fn evaluate_tokenizer(
    model: &Path,
    manifest_dir: &Path,
    max_images: usize,
    options: &SessionOptions,
    progress: &dyn Progress,
) -> Result<TokenizerQuality> {
    let mut tok = VisualTokenizer::load(model, options)?;
    let card = tok.card().clone();
    let mut decoder = TokenDecoder::load(model, &card, options)?;
    let manifest = Manifest::open(manifest_dir).map_err(|e| Error::Model {
        model: manifest_dir.display().to_string(),
        reason: format!("not an ingest manifest: {e}"),
    })?;
    let rows = heldout_rows(&manifest, max_images);
    if rows.is_empty() {
        return Err(Error::Model {
            model: manifest_dir.display().to_string(),
            reason: "has no images to evaluate on".into(),
        });
    }
    progress.phase("held-out images", rows.len() as u64);
    let mut resizer = Resizer::new();
    let mut hist = vec![0u64; card.vocab_size as usize];
    let (mut sq, mut values) = (0f64, 0usize);
    for chunk in rows.chunks(16) {
        let views = chunk
            .iter()
            .map(|row| centre(row, card.input_size, card.resize_filter, &mut resizer))
            .collect::<Result<Vec<RgbImage>>>()?;
        let raw: Vec<&[u8]> = views.iter().map(|v| v.as_raw().as_slice()).collect();
        let tokens = tok.tokenize(&raw)?;
        for t in tokens.iter().flatten() {
            hist[*t as usize] += 1;
        }
        if let Some(d) = decoder.as_mut() {
            let grids: Vec<&[u16]> = tokens.iter().map(Vec::as_slice).collect();
            let pixels = d.decode(&grids)?;
            let plane = (card.input_size * card.input_size) as usize;
            for (view, rec) in views.iter().zip(pixels.chunks_exact(3 * plane)) {
                for (i, px) in view.pixels().enumerate() {
                    for c in 0..3 {
                        let e = f64::from(rec[c * plane + i]) - f64::from(px[c]) / 255.0;
                        sq += e * e;
                    }
                }
                values += 3 * plane;
            }
        }
        progress.inc(chunk.len() as u64);
    }
    let mse = (values > 0).then(|| sq / values as f64);
    Ok(TokenizerQuality {
        name: card.name.clone(),
        vocab_size: card.vocab_size,
        grid: card.grid,
        images: rows.len(),
        usage: hist.iter().filter(|&&c| c > 0).count() as f64 / hist.len().max(1) as f64,
        perplexity: imglish_pack::perplexity(&hist),
        mse,
        psnr: mse.map(|m| 10.0 * (1.0 / m.max(1e-12)).log10()),
    })
}

/// The centre view of `row` at `size` (shorter side to `size`, centre square), as `tokenize` renders view 0.
pub fn centre(row: &ManifestRow, size: u32, filter: imglish_ingest::Filter, resizer: &mut Resizer) -> Result<RgbImage> {
    let bad = |reason: String| Error::Model {
        model: format!("image {} (sample {})", row.key, row.sample_id),
        reason,
    };
    let bytes = read_image_bytes(row).map_err(|e| bad(e.to_string()))?;
    let (w, h) = (row.width, row.height);
    let reduction = max_reduction(&[center_view(w, h)], size).min(max_reduction(&[center_view(h, w)], size));
    let decoded = decode_rgb(&bytes, &DecodeOptions::default(), reduction).map_err(|r| bad(r.message))?;
    let v = center_view(decoded.source_width, decoded.source_height);
    Ok(render_view(&decoded, &v, size, filter, resizer))
}
