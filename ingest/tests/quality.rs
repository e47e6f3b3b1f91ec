//! Quality of prepared views: the reduced-decode path must render the same view as the full decode (up to the
//! small differences of DCT-domain downscaling), including for sizes that do not divide by the reduction factor.

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, RgbImage};
use imglish_ingest::{center_view, decode_rgb, max_reduction, render_view, DecodeOptions, Filter, Resizer};

/// A smooth test picture (gradients and a soft disc), so downscaling differences stay small.
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let d = ((fx - 0.5).powi(2) + (fy - 0.5).powi(2)).sqrt();
        let disc = (1.0 - (d * 4.0).min(1.0)) * 120.0;
        image::Rgb([
            (40.0 + 150.0 * fx + disc * 0.5) as u8,
            (60.0 + 120.0 * fy) as u8,
            (90.0 + disc) as u8,
        ])
    })
}

fn jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 95)
        .encode(img.as_raw(), img.width(), img.height(), ExtendedColorType::Rgb8)
        .expect("encode");
    out
}

fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&p, &q)| (p as f64 - q as f64).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

#[test]
fn reduced_decode_views_match_full_decode_views_for_odd_sizes() {
    let full = DecodeOptions {
        reduced_decode: false,
        ..DecodeOptions::default()
    };
    let reduced = DecodeOptions::default();
    let mut resizer = Resizer::new();
    // Sides that are not multiples of 2, 4 or 8, portrait and landscape (697x472 at 1/2 decodes to 349x236:
    // the x and y scales differ).
    for (w, h, size) in [
        (697, 472, 112),
        (472, 697, 112),
        (1001, 913, 112),
        (913, 1001, 224),
        (2049, 1541, 224),
    ] {
        let bytes = jpeg(&picture(w, h));
        let view = center_view(w, h);
        let factor = max_reduction(&[view], size);
        let a = decode_rgb(&bytes, &full, factor).expect("full decode");
        let b = decode_rgb(&bytes, &reduced, factor).expect("reduced decode");
        assert_eq!((b.source_width, b.source_height), (w, h));
        assert!(b.image.width() < w, "{w}x{h} should decode at a reduced scale");
        let va = render_view(
            &a,
            &center_view(a.source_width, a.source_height),
            size,
            Filter::Bicubic,
            &mut resizer,
        );
        let vb = render_view(
            &b,
            &center_view(b.source_width, b.source_height),
            size,
            Filter::Bicubic,
            &mut resizer,
        );
        let mean = vb.as_raw().iter().map(|&v| v as f64).sum::<f64>() / vb.as_raw().len() as f64;
        assert!(mean > 30.0, "{w}x{h}: the reduced view is blank (mean {mean})");
        let p = psnr(&va, &vb);
        assert!(p >= 35.0, "{w}x{h} at {size}: reduced vs full decode PSNR {p:.2} dB");
    }
}
