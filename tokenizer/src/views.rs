//! Decode an image and render its views: view 0 is the centre view, views 1.. are random-resized crops with
//! flips keyed by (seed, sample id, view index), so any view can be reproduced alone.

use image::RgbImage;
use imglish_ingest::{
    center_view, decode_rgb, max_reduction, random_view, render_view, CropSpec, DecodeOptions, Decoded, Filter,
    Rejection, Resizer, ViewParams,
};

/// The geometry of `count` views of a `width`×`height` upright image.
pub(crate) fn view_params(
    width: u32,
    height: u32,
    count: u32,
    crop: &CropSpec,
    seed: u64,
    sample_id: u64,
) -> Vec<ViewParams> {
    let mut views = vec![center_view(width, height)];
    for v in 1..count {
        views.push(random_view(width, height, crop, seed, sample_id, v));
    }
    views
}

/// Settings for rendering views.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ViewSpec {
    pub count: u32,
    pub size: u32,
    pub filter: Filter,
    pub crop: CropSpec,
    pub seed: u64,
}

/// Decodes `bytes` (at a reduced scale when every view allows it) and renders the views.
/// `dims` are the stored (pre-orientation) dimensions from the manifest.
pub(crate) fn render_views(
    bytes: &[u8],
    dims: (u32, u32),
    sample_id: u64,
    spec: &ViewSpec,
    decode: &DecodeOptions,
    resizer: &mut Resizer,
) -> Result<(Vec<ViewParams>, Vec<RgbImage>), Rejection> {
    // EXIF orientation may swap the sides; the reduction must suit both.
    let (w, h) = dims;
    let reduction = max_reduction(
        &view_params(w, h, spec.count, &spec.crop, spec.seed, sample_id),
        spec.size,
    )
    .min(max_reduction(
        &view_params(h, w, spec.count, &spec.crop, spec.seed, sample_id),
        spec.size,
    ));
    let decoded = decode_rgb(bytes, decode, reduction)?;
    Ok(render_decoded(&decoded, sample_id, spec, resizer))
}

pub(crate) fn render_decoded(
    decoded: &Decoded,
    sample_id: u64,
    spec: &ViewSpec,
    resizer: &mut Resizer,
) -> (Vec<ViewParams>, Vec<RgbImage>) {
    let views = view_params(
        decoded.source_width,
        decoded.source_height,
        spec.count,
        &spec.crop,
        spec.seed,
        sample_id,
    );
    let images = views
        .iter()
        .map(|v| render_view(decoded, v, spec.size, spec.filter, resizer))
        .collect();
    (views, images)
}
