//! The dVAE's images: views cut from an ingest manifest's original images. Training views are random-resized
//! crops covering 60-100% of the image's area (close to the centre views the tokenizer meets, without the
//! zoomed-in detail of BEiT's 8-100% crops) with flips; the batch of step `s` is a pure function of `(seed, s)`
//! (a seeded permutation of the training images per epoch), so a resumed run sees the same batches. Held-out views
//! are centre views of the validation images (or of every tenth image when there is no validation split, those
//! then left out of training), as `imglish tokenizer fit` does.

use std::path::Path;

use image::RgbImage;
use imglish_ingest::{
    center_view, decode_rgb, max_reduction, mix64, random_view, read_image_bytes, render_view, CropSpec, DecodeOptions,
    Filter, Manifest, ManifestRow, Resizer, Rng, Split, ViewParams,
};

use crate::error::{Result, TrainError};

/// Training and held-out images of a manifest.
#[derive(Debug, Clone)]
pub(crate) struct Images {
    pub(crate) train: Vec<ManifestRow>,
    pub(crate) heldout: Vec<ManifestRow>,
    pub(crate) fingerprint: String,
    crop: CropSpec,
}

impl Images {
    pub(crate) fn open(dir: &Path, max_heldout: usize) -> Result<Images> {
        let bad = |reason: String| TrainError::Dataset {
            path: dir.to_path_buf(),
            reason,
        };
        let manifest = Manifest::open(dir).map_err(|e| bad(format!("not an ingest manifest: {e}")))?;
        let mut train: Vec<ManifestRow> = manifest
            .rows
            .iter()
            .filter(|r| r.split == Split::Train)
            .cloned()
            .collect();
        let mut heldout: Vec<ManifestRow> = manifest
            .rows
            .iter()
            .filter(|r| r.split == Split::Val)
            .cloned()
            .collect();
        if heldout.is_empty() {
            heldout = train.iter().step_by(10).cloned().collect();
            train = train
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % 10 != 0)
                .map(|(_, r)| r)
                .collect();
        }
        if train.is_empty() {
            return Err(bad(
                "has no training images (a dVAE trains on the images of the train split; is this a text-only \
                 manifest?)"
                    .into(),
            ));
        }
        heldout.truncate(max_heldout);
        Ok(Images {
            train,
            heldout,
            fingerprint: manifest.fingerprint,
            crop: CropSpec {
                scale: (0.6, 1.0),
                ..CropSpec::default()
            },
        })
    }

    /// The training images of step `step`'s batch and the seed of their views.
    pub(crate) fn batch_rows(&self, seed: u64, step: u64, batch: usize) -> Vec<(&ManifestRow, u64)> {
        let n = self.train.len() as u64;
        let mut perm_epoch = u64::MAX;
        let mut perm: Vec<usize> = Vec::new();
        (0..batch as u64)
            .map(|j| {
                let position = step * batch as u64 + j;
                let epoch = position / n;
                if epoch != perm_epoch {
                    perm = permutation(self.train.len(), seed, epoch);
                    perm_epoch = epoch;
                }
                (
                    &self.train[perm[(position % n) as usize]],
                    mix64(seed ^ mix64(epoch ^ 0x6476_6165)),
                )
            })
            .collect()
    }

    /// A training view (random-resized crop with flip, keyed by the view seed and the sample id).
    pub(crate) fn train_view(
        &self,
        row: &ManifestRow,
        view_seed: u64,
        size: u32,
        resizer: &mut Resizer,
    ) -> Result<RgbImage> {
        view(row, size, resizer, |w, h| {
            random_view(w, h, &self.crop, view_seed, row.sample_id, 1)
        })
    }
}

/// The centre view of `row` at `size`.
pub(crate) fn centre_view(row: &ManifestRow, size: u32, resizer: &mut Resizer) -> Result<RgbImage> {
    view(row, size, resizer, center_view)
}

fn view(
    row: &ManifestRow,
    size: u32,
    resizer: &mut Resizer,
    geometry: impl Fn(u32, u32) -> ViewParams,
) -> Result<RgbImage> {
    let bad = |reason: String| TrainError::Sample {
        sample_id: row.sample_id,
        reason: format!("{} ({reason})", row.key),
    };
    let bytes = read_image_bytes(row).map_err(|e| bad(format!("cannot read the image: {e}")))?;
    // EXIF orientation may swap the sides: the decode reduction must suit both.
    let (w, h) = (row.width, row.height);
    let reduction = max_reduction(&[geometry(w, h)], size).min(max_reduction(&[geometry(h, w)], size));
    let decoded = decode_rgb(&bytes, &DecodeOptions::default(), reduction)
        .map_err(|r| bad(format!("cannot decode: {}", r.message)))?;
    let v = geometry(decoded.source_width, decoded.source_height);
    Ok(render_view(&decoded, &v, size, Filter::Bicubic, resizer))
}

/// A seeded permutation of `0..n` for `epoch` (Fisher-Yates).
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = Rng::keyed(&[seed, epoch, 0x7065_726d]);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// Normalised encoder input `[3, S, S]` (x = 2·u8/255 - 1, the card's `minus-one-one`) and the target
/// `[3, S, S]` in [0, 1] of a view, appended to the batch buffers.
pub(crate) fn push_view(img: &RgbImage, input: &mut Vec<f32>, target: &mut Vec<f32>) {
    let plane = (img.width() * img.height()) as usize;
    let (i0, t0) = (input.len(), target.len());
    input.resize(i0 + 3 * plane, 0.0);
    target.resize(t0 + 3 * plane, 0.0);
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            let v = f32::from(px[c]);
            input[i0 + c * plane + i] = v * (2.0 / 255.0) + -1.0;
            target[t0 + c * plane + i] = v / 255.0;
        }
    }
}
