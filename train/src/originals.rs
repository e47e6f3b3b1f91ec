//! Views cut afresh from the original images (`finetune --images MANIFEST`): each training sample's source
//! image is read through its ingest manifest row, decoded by the ingest decoder and cut to a new random-resized
//! crop with flip at the model's input size, keyed by (seed, epoch, sample id) so a resumed run sees the same
//! views; evaluation uses the centre view (shorter side to the input size, centre square), as the stored view 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use imglish_ingest::{
    center_view, decode_rgb, max_reduction, mix64, random_view, read_image_bytes, render_view, CropSpec, DecodeOptions,
    Filter, Manifest, ManifestRow, Resizer, ViewParams,
};
use imglish_pack::Dataset;

use crate::error::{Result, TrainError};

/// The manifest rows of a dataset's samples, by id.
#[derive(Debug)]
pub(crate) struct Originals {
    dir: PathBuf,
    rows: HashMap<u64, ManifestRow>,
    crop: CropSpec,
}

impl Originals {
    /// Opens the ingest manifest in `dir`; it must be the one `dataset` was tokenized from (same fingerprint).
    pub(crate) fn open(dir: &Path, dataset: &Dataset) -> Result<Originals> {
        let bad = |reason: String| TrainError::Dataset {
            path: dir.to_path_buf(),
            reason,
        };
        let manifest = Manifest::open(dir).map_err(|e| bad(format!("not an ingest manifest: {e}")))?;
        match &dataset.index().manifest_fingerprint {
            Some(fp) if *fp == manifest.fingerprint => {}
            Some(fp) => {
                return Err(bad(format!(
                    "manifest {}, the dataset {} was tokenized from manifest {} (give --images the ingest output \
                     the dataset was made from)",
                    short(&manifest.fingerprint),
                    dataset.dir().display(),
                    short(fp)
                )))
            }
            None => {
                return Err(bad(format!(
                    "the dataset {} does not record the manifest it was made from, so its samples cannot be \
                     matched to original images",
                    dataset.dir().display()
                )))
            }
        }
        Ok(Originals {
            dir: dir.to_path_buf(),
            rows: manifest.rows.into_iter().map(|r| (r.sample_id, r)).collect(),
            crop: CropSpec::default(),
        })
    }

    /// The `size`×`size` view of `sample_id` for `epoch` (`None`: the centre view), or why it cannot be made.
    pub(crate) fn view(
        &self,
        sample_id: u64,
        seed: u64,
        epoch: Option<u64>,
        size: u32,
        resizer: &mut Resizer,
    ) -> std::result::Result<RgbImage, String> {
        let row = self
            .rows
            .get(&sample_id)
            .ok_or_else(|| format!("not in the manifest {}", self.dir.display()))?;
        let bytes = read_image_bytes(row).map_err(|e| format!("original image: {e}"))?;
        let geometry = |w: u32, h: u32| -> ViewParams {
            match epoch {
                None => center_view(w, h),
                Some(e) => random_view(w, h, &self.crop, mix64(seed ^ mix64(e ^ 0x6f72_6967)), sample_id, 1),
            }
        };
        // EXIF orientation may swap the sides: the decode reduction must suit both.
        let (w, h) = (row.width, row.height);
        let reduction = max_reduction(&[geometry(w, h)], size).min(max_reduction(&[geometry(h, w)], size));
        let decoded = decode_rgb(&bytes, &DecodeOptions::default(), reduction)
            .map_err(|r| format!("original image {}: {}", row.key, r.message))?;
        let view = geometry(decoded.source_width, decoded.source_height);
        Ok(render_view(&decoded, &view, size, Filter::Bicubic, resizer))
    }
}

impl Originals {
    /// The normalised `[3, H, W]` centre view of `sample_id` at the model's image `size`.
    pub(crate) fn centre_pixels(
        &self,
        sample_id: u64,
        size: [i64; 2],
        resizer: &mut Resizer,
    ) -> std::result::Result<Vec<f32>, String> {
        let side = crate::data::square_side(size)?;
        Ok(crate::data::normalize(&self.view(sample_id, 0, None, side, resizer)?))
    }
}

fn short(fingerprint: &str) -> &str {
    &fingerprint[..fingerprint.len().min(12)]
}
