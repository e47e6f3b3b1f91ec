//! JPEG decoding with libjpeg-turbo (vendored and linked statically through `turbojpeg`, so every machine
//! decodes the same bytes to the same pixels): header first, limits checked before any pixel buffer is
//! allocated, DCT-domain scaling (1/2, 1/4, 1/8) for targets much smaller than the image, EXIF orientation.

use std::cell::RefCell;

use image::metadata::Orientation;
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

use crate::prepare::{upright, Decoded};
use crate::validate::{Reason, Rejection, ValidationLimits};

/// Progressive scans allowed before a file is treated as hostile (libjpeg-turbo's recommendation for
/// untrusted input; real encoders write about ten).
const SCAN_LIMIT: u32 = 500;

thread_local! {
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

/// Decodes a JPEG to upright RGB8 at `eighths/8` scale (`eighths` 1..=8: libjpeg-turbo's DCT scaling).
///
/// `Ok(None)` when libjpeg-turbo does not take the file (CMYK/YCCK, lossless, damaged or truncated data, or
/// anything it warns about): the caller then tries the pure-Rust decoders, which decide whether it is a reject.
/// A size over the limits is a reject here, before anything is allocated.
pub(crate) fn decode(bytes: &[u8], limits: &ValidationLimits, eighths: u32) -> Result<Option<Decoded>, Rejection> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            // Settings that never change are set once per thread, not per image.
            *slot = Decompressor::new()
                .ok()
                .and_then(|mut d| d.set_scan_limit(SCAN_LIMIT).ok().map(|()| d));
        }
        match slot.as_mut() {
            Some(d) => decode_with(d, bytes, limits, eighths),
            None => Ok(None),
        }
    })
}

fn decode_with(
    d: &mut Decompressor,
    bytes: &[u8],
    limits: &ValidationLimits,
    eighths: u32,
) -> Result<Option<Decoded>, Rejection> {
    let Ok(header) = d.read_header(bytes) else {
        return Ok(None);
    };
    if matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK) || header.is_lossless {
        return Ok(None);
    }
    let (w, h) = (header.width as u64, header.height as u64);
    if w * h > limits.max_pixels {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("{w}x{h} exceeds --max-pixels"),
        ));
    }
    let scale = ScalingFactor::new(eighths.clamp(1, 8) as usize, 8);
    let scaled = header.scaled(scale);
    if d.set_scaling_factor(scale).is_err() {
        return Ok(None);
    }
    let mut pixels = vec![0u8; 3 * scaled.width * scaled.height];
    let image = Image {
        pixels: pixels.as_mut_slice(),
        width: scaled.width,
        pitch: 3 * scaled.width,
        height: scaled.height,
        format: PixelFormat::RGB,
    };
    if d.decompress(bytes, image).is_err() {
        return Ok(None);
    }
    let orientation = exif(bytes)
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    Ok(upright(
        scaled.width as u32,
        scaled.height as u32,
        pixels,
        (w as u32, h as u32),
        orientation,
    ))
}

/// The EXIF payload (the TIFF structure after `Exif\0\0`) of the first APP1 segment, if any, found by walking
/// the marker segments up to the first scan.
fn exif(bytes: &[u8]) -> Option<&[u8]> {
    let mut at = 2usize;
    if bytes.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    loop {
        // Fill bytes (0xff runs) may precede a marker.
        while *bytes.get(at)? == 0xff && *bytes.get(at + 1)? == 0xff {
            at += 1;
        }
        if *bytes.get(at)? != 0xff {
            return None;
        }
        let marker = *bytes.get(at + 1)?;
        if marker == 0xda || marker == 0xd9 {
            return None;
        }
        if (0xd0..=0xd7).contains(&marker) || marker == 0x01 {
            at += 2;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([*bytes.get(at + 2)?, *bytes.get(at + 3)?]));
        if len < 2 {
            return None;
        }
        let body = bytes.get(at + 4..at + 2 + len)?;
        if marker == 0xe1 {
            if let Some(tiff) = body.strip_prefix(b"Exif\0\0") {
                return Some(tiff);
            }
        }
        at += 2 + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![0xff, marker];
        v.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn exif_is_found_after_other_segments_and_not_past_the_scan() {
        let mut jpeg = vec![0xff, 0xd8];
        jpeg.extend(segment(0xe0, b"JFIF\0\x01\x02"));
        jpeg.extend(segment(0xe1, b"http://ns.adobe.com/xap/1.0/\0<x/>"));
        jpeg.extend(segment(0xe1, b"Exif\0\0MM\0*tiff"));
        assert_eq!(exif(&jpeg), Some(&b"MM\0*tiff"[..]));

        let mut late = vec![0xff, 0xd8];
        late.extend(segment(0xda, b"\x01\x01\x00\x00\x3f\x00"));
        late.extend(segment(0xe1, b"Exif\0\0II*\0"));
        assert_eq!(exif(&late), None);
    }

    #[test]
    fn exif_survives_truncated_and_hostile_lengths() {
        assert_eq!(exif(b""), None);
        assert_eq!(exif(&[0xff, 0xd8, 0xff]), None);
        assert_eq!(exif(&[0xff, 0xd8, 0xff, 0xe1, 0xff, 0xff, b'E']), None);
        assert_eq!(exif(&[0xff, 0xd8, 0xff, 0xe1, 0x00, 0x01]), None);
        assert_eq!(exif(&[0x00, 0xd8]), None);
    }

    #[test]
    fn scaled_decode_matches_the_requested_reduction() {
        let img = image::RgbImage::from_fn(203, 97, |x, y| image::Rgb([(x % 256) as u8, (y * 2) as u8, 128]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&img)
            .unwrap_or_else(|e| panic!("encode: {e}"));
        let limits = ValidationLimits::default();
        for (eighths, size) in [
            (8, (203, 97)),
            (4, (102, 49)),
            (3, (77, 37)),
            (2, (51, 25)),
            (1, (26, 13)),
        ] {
            let d = decode(&jpeg, &limits, eighths)
                .unwrap_or_else(|e| panic!("{e:?}"))
                .unwrap_or_else(|| panic!("libjpeg-turbo refused a plain JPEG"));
            assert_eq!(d.image.dimensions(), size, "scale {eighths}/8");
            assert_eq!((d.source_width, d.source_height), (203, 97));
        }
        let tight = ValidationLimits {
            max_pixels: 203 * 97 - 1,
            ..ValidationLimits::default()
        };
        let err = decode(&jpeg, &tight, 8)
            .err()
            .unwrap_or_else(|| panic!("limit not applied"));
        assert_eq!(err.reason, Reason::TooLarge);
        assert_eq!(
            decode(&jpeg[..jpeg.len() / 2], &limits, 8).ok().flatten().map(|_| ()),
            None
        );
    }

    #[test]
    fn mutated_jpegs_decode_or_reject_never_panic() {
        let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, (x ^ y) as u8]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&img)
            .unwrap_or_else(|e| panic!("encode: {e}"));
        let options = crate::DecodeOptions::default();
        let mut rng = crate::Rng::new(7);
        for i in 0..400 {
            let mut bytes = jpeg.clone();
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] = rng.next_u64() as u8;
            }
            if i % 4 == 0 {
                bytes.truncate(rng.below(bytes.len() as u64) as usize);
            }
            let reduction = [1.0, 4.0, 8.0, 16.0][i % 4];
            if let Ok(d) = crate::decode_rgb(&bytes, &options, reduction) {
                assert!(d.image.width() >= 1 && d.image.height() >= 1);
            }
        }
    }
}
