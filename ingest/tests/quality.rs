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

/// `picture` with fine texture (stripes and hash noise), so the AC coefficients carry real detail.
fn textured(w: u32, h: u32) -> RgbImage {
    let mut img = picture(w, h);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let hash = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663)) % 31;
        let stripe = (((x + 2 * y) as f32 / 3.0).sin() * 18.0) as i32;
        for c in p.0.iter_mut() {
            *c = (*c as i32 + stripe + hash as i32 - 15).clamp(0, 255) as u8;
        }
    }
    img
}

fn progressive_jpeg(img: &RgbImage) -> Vec<u8> {
    let mut c = turbojpeg::Compressor::new().expect("compressor");
    c.set_quality(90).expect("quality");
    c.set_progressive(true).expect("progressive");
    let image = turbojpeg::Image {
        pixels: img.as_raw().as_slice(),
        width: img.width() as usize,
        pitch: 3 * img.width() as usize,
        height: img.height() as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    c.compress_to_vec(image).expect("encode")
}

#[test]
fn progressive_views_without_ac_refinements_match_every_scan() {
    let all_scans = DecodeOptions {
        all_scans: true,
        ..DecodeOptions::default()
    };
    let full = DecodeOptions {
        reduced_decode: false,
        ..DecodeOptions::default()
    };
    let mut resizer = Resizer::new();
    // Reductions 4.1 (the last AC bit left out), 8.2 and 13.8 (every AC refinement left out).
    for (w, h, size) in [(913, 1001, 224), (1001, 913, 112), (2049, 1541, 112)] {
        let bytes = progressive_jpeg(&textured(w, h));
        let factor = max_reduction(&[center_view(w, h)], size);
        let mut view = |options: &DecodeOptions| {
            let d = decode_rgb(&bytes, options, factor).expect("decode");
            render_view(
                &d,
                &center_view(d.source_width, d.source_height),
                size,
                Filter::Bicubic,
                &mut resizer,
            )
        };
        let (default, every_scan, full) = (view(&DecodeOptions::default()), view(&all_scans), view(&full));
        assert_ne!(default, every_scan, "{w}x{h} at {size}: no scan was left out");
        let p = psnr(&default, &every_scan);
        assert!(p >= 40.0, "{w}x{h} at {size}: vs every scan PSNR {p:.2} dB");
        let p = psnr(&default, &full);
        assert!(p >= 35.0, "{w}x{h} at {size}: vs full decode PSNR {p:.2} dB");
    }
}
