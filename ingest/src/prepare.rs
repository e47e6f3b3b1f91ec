//! Image preparation for the tokenize stage: decode under explicit limits (with EXIF orientation, every colour
//! type to RGB8, alpha composited on a background; JPEGs through libjpeg-turbo with DCT-domain scaling when the
//! target is much smaller, the pure-Rust decoders for what it refuses; common PNGs through libdeflate and paired-row
//! SIMD unfiltering, the `image` crate for other PNGs and the other formats),
//! views (centre, random-resized-crop + flip, reproducible from (seed, sample id, view index)), and SIMD
//! resizing with `fast_image_resize`.

use std::io::Cursor;

use fast_image_resize::images::{Image as FirImage, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::jpeg::AcRefinements;
use crate::rng::Rng;
use crate::validate::{check_pixels, decode_limits, Reason, Rejection, ValidationLimits};

/// A decoded image in RGB8, upright (EXIF orientation applied).
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The pixels; possibly smaller than the source when decoded at a reduced scale.
    pub image: RgbImage,
    /// Width of the upright source image in pixels.
    pub source_width: u32,
    /// Height of the upright source image in pixels.
    pub source_height: u32,
}

impl Decoded {
    /// `image` pixels per source pixel (1 unless decoded at a reduced scale).
    pub fn scale(&self) -> f64 {
        self.image.width() as f64 / self.source_width as f64
    }
}

/// How to decode.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodeOptions {
    /// Limits checked before any pixel buffer is allocated.
    pub limits: ValidationLimits,
    /// Background that transparent pixels are composited on (default white).
    pub background: [u8; 3],
    /// Decode JPEGs at 1/2, 1/4 or 1/8 scale when every view still gets at least its target size.
    pub reduced_decode: bool,
    /// Reduce JPEGs as far as Pillow's `draft()` does: keep at least the target size after the DCT reduction
    /// instead of twice it. Faster on large photos, softer views (scripts/bench-ingest reports the PSNR of both).
    #[serde(default)]
    pub draft: bool,
    /// Decode every scan of a progressive JPEG. By default (with `reduced_decode`), when every view is at least
    /// 4x smaller than the image, the final AC refinement scans are left out (the last bit of each AC
    /// coefficient), and when every view is at least 8x smaller (one view pixel per 8x8 DCT block or more),
    /// all AC refinement scans; DC stays exact. The view averages such errors away (scripts/bench-ingest: PSNR
    /// against a full decode + Pillow bicubic), and such files decode in half to two thirds of the time.
    #[serde(default)]
    pub all_scans: bool,
}

/// Reduction (source pixels per view pixel) from which the final AC refinement scans of progressive JPEGs
/// are left out (see [`DecodeOptions::all_scans`]).
const SKIP_LAST_AC_BIT_MIN_REDUCTION: f64 = 4.0;
/// Reduction from which all AC refinement scans of progressive JPEGs are left out.
const SKIP_AC_REFINEMENTS_MIN_REDUCTION: f64 = 8.0;

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            limits: ValidationLimits::default(),
            background: [255, 255, 255],
            reduced_decode: true,
            draft: false,
            all_scans: false,
        }
    }
}

fn corrupt(e: impl std::fmt::Display) -> Rejection {
    Rejection::new(Reason::Corrupt, format!("decode failed: {e}"))
}

pub(crate) fn composite(img: DynamicImage, bg: [u8; 3]) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        for c in 0..3 {
            o[c] = over(p[c], p[3], bg[c]);
        }
    }
    out
}

/// Colour `c` with alpha `a` over background `bg`, rounded.
pub(crate) fn over(c: u8, a: u8, bg: u8) -> u8 {
    let a = a as u32;
    ((c as u32 * a + bg as u32 * (255 - a) + 127) / 255) as u8
}

/// Decodes `bytes` to upright RGB8. `max_reduction` is the largest reduction (source pixels per target pixel)
/// that keeps every requested view at or above its target size; JPEGs are then decoded by libjpeg-turbo at the
/// largest DCT reduction (1/2, 1/4, 1/8) that keeps twice the target resolution (with `draft`: the target
/// resolution); progressive JPEGs leave out AC refinement scans from a `max_reduction` of 4 (see
/// [`DecodeOptions::all_scans`]). JPEGs libjpeg-turbo refuses (CMYK, damaged data) go to the pure-Rust decoders
/// (reduced under the same rule, every scan), whose verdict is the reject reason. 8-bit non-interlaced grey or
/// RGB PNGs (with or without alpha) without palette, transparency or EXIF chunks are inflated by libdeflate and unfiltered two rows at a time (the same
/// pixels as the `image` crate's, about 1.2x faster on the benchmark's photos); other PNGs, and any PNG that
/// path does not take, go to the `image` crate, whose verdict is the reject reason.
pub fn decode_rgb(bytes: &[u8], options: &DecodeOptions, max_reduction: f64) -> Result<Decoded, Rejection> {
    let format = image::guess_format(bytes)
        .map_err(|_| Rejection::new(Reason::UnsupportedFormat, "not a recognised image format"))?;
    if format == ImageFormat::Jpeg {
        let factor = if options.reduced_decode {
            reduction_factor(max_reduction, if options.draft { 1.0 } else { 2.0 })
        } else {
            1
        };
        // libjpeg-turbo could scale by any n/8, but 3/8, 5/8, 6/8 and 7/8 alias visibly more than the
        // power-of-two scales (scripts/bench-ingest: min PSNR 36.9 vs 50.5 dB at 224, 3 of 97 photos under 35 dB
        // at 112) for a few percent of speed, so the reduction stays 1/2, 1/4 or 1/8.
        let refinements = if !options.reduced_decode || options.all_scans {
            AcRefinements::Keep
        } else if max_reduction >= SKIP_AC_REFINEMENTS_MIN_REDUCTION {
            AcRefinements::SkipAll
        } else if max_reduction >= SKIP_LAST_AC_BIT_MIN_REDUCTION {
            AcRefinements::SkipLast
        } else {
            AcRefinements::Keep
        };
        if let Some(d) = crate::jpeg::decode(bytes, &options.limits, 8 / factor, refinements)? {
            return Ok(d);
        }
        // libjpeg-turbo refused it (CMYK/YCCK, or damaged data): the pure-Rust decoders below decide, so a
        // reject carries their reason and what they can recover is kept.
        if factor > 1 {
            if let Some(d) = decode_jpeg_reduced(bytes, options, factor)? {
                return Ok(d);
            }
        }
    }
    if format == ImageFormat::Png {
        if let Some(d) = crate::png::decode(bytes, &options.limits, options.background) {
            return Ok(d);
        }
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decode_limits(&options.limits));
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    // The decoders check each side against the limits, not the whole buffer (`ImageReader::decode` would
    // reserve it; `from_decoder` does not): a header claiming 1,000,000 x 400,000 RGBA pixels would abort the
    // process on a 1.6 TB allocation. The same checks as libjpeg-turbo's path, before anything is allocated.
    let (w, h) = decoder.dimensions();
    check_pixels(w, h, &options.limits)?;
    let mut limits = decode_limits(&options.limits);
    limits.reserve(decoder.total_bytes()).map_err(corrupt)?;
    decoder.set_limits(limits).map_err(corrupt)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    img.apply_orientation(orientation);
    let image = composite(img, options.background);
    Ok(Decoded {
        source_width: image.width(),
        source_height: image.height(),
        image,
    })
}

/// The DCT reduction (1, 2, 4 or 8) for a largest allowed reduction: at least `margin` times the target
/// resolution is kept after the reduction. The default margin 2 leaves the resampling filter the detail it needs
/// (scripts/bench-ingest measures the PSNR against a full decode + Pillow bicubic); 1 is Pillow's draft rule.
fn reduction_factor(max_reduction: f64, margin: f64) -> u32 {
    [8u32, 4, 2]
        .into_iter()
        .find(|f| *f as f64 * margin <= max_reduction)
        .unwrap_or(1)
}

/// `pixels` (RGB8, `width` x `height`, as stored) turned upright; the source size is `source` as stored.
pub(crate) fn upright(
    width: u32,
    height: u32,
    pixels: Vec<u8>,
    source: (u32, u32),
    orientation: image::metadata::Orientation,
) -> Option<Decoded> {
    let img = RgbImage::from_raw(width, height, pixels)?;
    let mut dynimg = DynamicImage::ImageRgb8(img);
    dynimg.apply_orientation(orientation);
    let swap = matches!(
        orientation,
        image::metadata::Orientation::Rotate90
            | image::metadata::Orientation::Rotate270
            | image::metadata::Orientation::Rotate90FlipH
            | image::metadata::Orientation::Rotate270FlipH
    );
    let (w, h) = source;
    let (sw, sh) = if swap { (h, w) } else { (w, h) };
    Some(Decoded {
        image: dynimg.into_rgb8(),
        source_width: sw,
        source_height: sh,
    })
}

fn decode_jpeg_reduced(bytes: &[u8], options: &DecodeOptions, factor: u32) -> Result<Option<Decoded>, Rejection> {
    let mut dec = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    dec.read_info().map_err(corrupt)?;
    let Some(info) = dec.info() else { return Ok(None) };
    let (w, h) = (info.width as u32, info.height as u32);
    check_pixels(w, h, &options.limits)?;
    let orientation = dec
        .exif_data()
        .and_then(image::metadata::Orientation::from_exif_chunk)
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let (rw, rh) = (w.div_ceil(factor), h.div_ceil(factor));
    let (ow, oh) = dec
        .scale(rw.min(u16::MAX as u32) as u16, rh.min(u16::MAX as u32) as u16)
        .map_err(corrupt)?;
    let pixels = dec.decode().map_err(corrupt)?;
    let Some(info) = dec.info() else { return Ok(None) };
    let rgb: Vec<u8> = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        jpeg_decoder::PixelFormat::L16 => pixels.chunks_exact(2).flat_map(|c| [c[0], c[0], c[0]]).collect(),
        jpeg_decoder::PixelFormat::CMYK32 => pixels
            .chunks_exact(4)
            .flat_map(|c| {
                let k = c[3] as u32;
                [0, 1, 2].map(|i| ((c[i] as u32 * k + 127) / 255) as u8)
            })
            .collect(),
    };
    Ok(upright(ow as u32, oh as u32, rgb, (w, h), orientation))
}

/// A view's geometry: the crop box in upright source pixels and whether it is mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewParams {
    /// `[x, y, width, height]` in source pixels.
    pub crop: [u32; 4],
    /// Horizontally flipped.
    pub flip: bool,
}

/// Random-resized-crop settings (BEiT / torchvision defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CropSpec {
    /// Range of the crop's area as a fraction of the image (default 0.08–1).
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio w/h (default 3/4–4/3), sampled log-uniformly.
    pub ratio: (f64, f64),
    /// Probability of a horizontal flip (default 0.5).
    pub flip_p: f64,
}

impl Default for CropSpec {
    fn default() -> Self {
        CropSpec {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
        }
    }
}

/// The centre view: the largest centred square (shorter side resized to S, centre crop S×S).
pub fn center_view(width: u32, height: u32) -> ViewParams {
    let side = width.min(height);
    ViewParams {
        crop: [(width - side) / 2, (height - side) / 2, side, side],
        flip: false,
    }
}

/// A random-resized crop with flip, drawn from the stream keyed by `(seed, sample_id, view)`: up to 10 tries as
/// in torchvision, then the centre crop clamped to the ratio range.
pub fn random_view(width: u32, height: u32, spec: &CropSpec, seed: u64, sample_id: u64, view: u32) -> ViewParams {
    let mut rng = Rng::keyed(&[seed, sample_id, view as u64, 0x7669_6577]);
    let (w, h) = (width as f64, height as f64);
    let area = w * h;
    let (lr0, lr1) = (spec.ratio.0.ln(), spec.ratio.1.ln());
    let mut crop = None;
    for _ in 0..10 {
        let target = area * rng.uniform(spec.scale.0, spec.scale.1);
        let ratio = rng.uniform(lr0, lr1).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let x = rng.range(0, (w - cw) as i64) as u32;
            let y = rng.range(0, (h - ch) as i64) as u32;
            crop = Some([x, y, cw as u32, ch as u32]);
            break;
        }
    }
    let crop = crop.unwrap_or_else(|| {
        let in_ratio = w / h;
        let (cw, ch) = if in_ratio < spec.ratio.0 {
            (w, (w / spec.ratio.0).round())
        } else if in_ratio > spec.ratio.1 {
            ((h * spec.ratio.1).round(), h)
        } else {
            (w, h)
        };
        let (cw, ch) = (cw.max(1.0) as u32, ch.max(1.0) as u32);
        [(width - cw) / 2, (height - ch) / 2, cw, ch]
    });
    ViewParams {
        crop,
        flip: rng.chance(spec.flip_p),
    }
}

/// Resampling filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filter {
    /// Lanczos3 (DALL-E's tokenizer input).
    Lanczos3,
    /// Catmull-Rom bicubic (BEiT's patch input; Pillow's BICUBIC).
    Bicubic,
    /// Bilinear.
    Bilinear,
}

impl Filter {
    fn alg(self) -> ResizeAlg {
        ResizeAlg::Convolution(match self {
            Filter::Lanczos3 => FilterType::Lanczos3,
            Filter::Bicubic => FilterType::CatmullRom,
            Filter::Bilinear => FilterType::Bilinear,
        })
    }
}

/// Renders a view of a decoded image at `size`×`size`: crop (source coordinates, scaled to the decoded
/// resolution), resize with `filter`, mirror if the view says so.
pub fn render_view(decoded: &Decoded, view: &ViewParams, size: u32, filter: Filter, resizer: &mut Resizer) -> RgbImage {
    let (iw, ih) = (decoded.image.width() as f64, decoded.image.height() as f64);
    // Per-axis scales: a reduced decode rounds each side up (e.g. 697x472 at 1/2 is 349x236), so the x and y
    // scales differ slightly; the crop box is clamped to the decoded image so it can never be out of bounds.
    let sx = iw / decoded.source_width.max(1) as f64;
    let sy = ih / decoded.source_height.max(1) as f64;
    let [x, y, w, h] = view.crop;
    let (cx, cy) = (
        (x as f64 * sx).min(iw - 1.0).max(0.0),
        (y as f64 * sy).min(ih - 1.0).max(0.0),
    );
    let cw = (w as f64 * sx).max(1.0).min(iw - cx);
    let ch = (h as f64 * sy).max(1.0).min(ih - cy);
    let src = ImageRef::new(
        decoded.image.width(),
        decoded.image.height(),
        decoded.image.as_raw(),
        PixelType::U8x3,
    );
    let mut dst = FirImage::new(size, size, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(filter.alg()).crop(cx, cy, cw, ch);
    if let Ok(src) = src {
        // Sizes are checked above, and both images are U8x3: resizing cannot fail.
        let _ = resizer.resize(&src, &mut dst, &options);
    }
    let mut out = RgbImage::from_raw(size, size, dst.into_vec()).unwrap_or_else(|| RgbImage::new(size, size));
    if view.flip {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// Resizes a whole image to `width`×`height` with `filter`.
pub fn resize_image(img: &RgbImage, width: u32, height: u32, filter: Filter, resizer: &mut Resizer) -> RgbImage {
    let mut dst = FirImage::new(width, height, PixelType::U8x3);
    if let Ok(src) = ImageRef::new(img.width(), img.height(), img.as_raw(), PixelType::U8x3) {
        let _ = resizer.resize(&src, &mut dst, &ResizeOptions::new().resize_alg(filter.alg()));
    }
    RgbImage::from_raw(width, height, dst.into_vec()).unwrap_or_else(|| RgbImage::new(width, height))
}

/// The largest factor by which the image may be downscaled at decode time so that every view in `views` still
/// has at least `size` pixels on each side of its crop.
pub fn max_reduction(views: &[ViewParams], size: u32) -> f64 {
    views
        .iter()
        .map(|v| v.crop[2].min(v.crop[3]) as f64 / size.max(1) as f64)
        .fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_reduces_jpegs_as_far_as_the_target_allows() {
        let img = RgbImage::from_fn(896, 640, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
        let mut bytes = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Jpeg)
            .expect("encode");
        let draft = DecodeOptions {
            draft: true,
            ..DecodeOptions::default()
        };
        // A 160 px view of the 640 px side allows a reduction of 4: the default keeps twice the target (1/2),
        // draft keeps the target (1/4); a reduction of 1.9 allows none.
        let size = |o: &DecodeOptions, r: f64| decode_rgb(&bytes, o, r).expect("decode").image.dimensions();
        assert_eq!(size(&DecodeOptions::default(), 4.0), (448, 320));
        assert_eq!(size(&draft, 4.0), (224, 160));
        assert_eq!(size(&draft, 1.9), (896, 640));
        assert_eq!(size(&draft, 100.0), (112, 80));
        assert_eq!(decode_rgb(&bytes, &draft, 4.0).expect("decode").source_width, 896);
    }

    #[test]
    fn random_views_are_reproducible_and_inside_the_image() {
        let spec = CropSpec::default();
        for view in 0..200 {
            let a = random_view(640, 480, &spec, 1, 42, view);
            let b = random_view(640, 480, &spec, 1, 42, view);
            assert_eq!(a, b);
            let [x, y, w, h] = a.crop;
            assert!(x + w <= 640 && y + h <= 480 && w > 0 && h > 0);
            let area = (w * h) as f64 / (640.0 * 480.0);
            assert!((0.07..=1.0).contains(&area), "{area}");
        }
        let flips = (0..1000)
            .filter(|v| random_view(100, 100, &spec, 0, 1, *v).flip)
            .count();
        assert!((400..600).contains(&flips), "{flips}");
        assert_ne!(
            random_view(640, 480, &spec, 1, 42, 0),
            random_view(640, 480, &spec, 1, 43, 0)
        );
    }

    #[test]
    fn a_header_claiming_a_huge_image_is_a_reject_not_an_allocation() {
        // A PNG that the image crate's decoder would take (each side is within the per-side limit) but whose
        // pixel buffer would be 1.6 TB: a reject before anything is allocated (it used to abort the process).
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&1_000_000u32.to_be_bytes());
        ihdr.extend_from_slice(&400_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&libdeflater::crc32(&ihdr).to_be_bytes());
        let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
        png.extend_from_slice(&((idat.len() - 4) as u32).to_be_bytes());
        png.extend_from_slice(idat);
        png.extend_from_slice(&libdeflater::crc32(idat).to_be_bytes());
        let r = decode_rgb(&png, &DecodeOptions::default(), 1.0).expect_err("a reject");
        assert_eq!(r.reason, Reason::TooLarge);
        assert_eq!(r.message, "1000000x400000 exceeds --max-pixels");
    }

    #[test]
    fn extreme_images_fall_back_to_a_centre_crop() {
        let spec = CropSpec {
            scale: (0.99, 1.0),
            ..Default::default()
        };
        let v = random_view(1000, 100, &spec, 0, 0, 0);
        assert_eq!(v.crop[3], 100);
        assert_eq!(v.crop[2], 133);
        assert_eq!(v.crop[0], (1000 - 133) / 2);
    }

    #[test]
    fn centre_view_and_render() {
        let mut img = RgbImage::new(300, 200);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([if x < 150 { 255 } else { 0 }, 0, 0]);
        }
        let d = Decoded {
            image: img,
            source_width: 300,
            source_height: 200,
        };
        let v = center_view(300, 200);
        assert_eq!(v.crop, [50, 0, 200, 200]);
        let mut r = Resizer::new();
        let out = render_view(&d, &v, 64, Filter::Bicubic, &mut r);
        assert_eq!(out.dimensions(), (64, 64));
        assert!(out.get_pixel(5, 30)[0] > 250 && out.get_pixel(60, 30)[0] < 5);
        let flipped = render_view(&d, &ViewParams { flip: true, ..v }, 64, Filter::Bicubic, &mut r);
        assert!(flipped.get_pixel(5, 30)[0] < 5);
    }
}
