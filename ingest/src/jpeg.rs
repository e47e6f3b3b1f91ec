//! JPEG decoding with libjpeg-turbo (vendored and linked statically through `turbojpeg`, so every machine
//! decodes the same bytes to the same pixels): header first, limits checked before any pixel buffer is
//! allocated, DCT-domain scaling (1/2, 1/4, 1/8) for targets much smaller than the image, EXIF orientation;
//! for progressive JPEGs whose view is much smaller than the image, AC refinement scans (the low bits of the
//! AC coefficients) can be left out.

use std::cell::RefCell;

use image::metadata::Orientation;
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

use crate::prepare::{upright, Decoded};
use crate::validate::{check_pixels, Rejection, ValidationLimits};

/// Progressive scans allowed before a file is treated as hostile (libjpeg-turbo's recommendation for
/// untrusted input; real encoders write about ten).
const SCAN_LIMIT: u32 = 500;

thread_local! {
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

/// Which AC refinement scans of a progressive JPEG to leave out ([`without_ac_refinements`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcRefinements {
    /// Decode every scan.
    Keep,
    /// Leave out the final ones (`Al = 0`): the last bit of each AC coefficient.
    SkipLast,
    /// Leave out all of them: each AC coefficient at the precision of its first scan.
    SkipAll,
}

/// Decodes a JPEG to upright RGB8 at `eighths/8` scale (`eighths` 1..=8: libjpeg-turbo's DCT scaling),
/// leaving out the AC refinement scans `refinements` says of a progressive JPEG.
///
/// `Ok(None)` when libjpeg-turbo does not take the file (CMYK/YCCK, lossless, damaged or truncated data, or
/// anything it warns about): the caller then tries the pure-Rust decoders, which decide whether it is a reject.
/// A size over the limits is a reject here, before anything is allocated.
pub(crate) fn decode(
    bytes: &[u8],
    limits: &ValidationLimits,
    eighths: u32,
    refinements: AcRefinements,
) -> Result<Option<Decoded>, Rejection> {
    let filtered = match refinements {
        AcRefinements::Keep => None,
        AcRefinements::SkipLast => without_ac_refinements(bytes, false),
        AcRefinements::SkipAll => without_ac_refinements(bytes, true),
    };
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            // Settings that never change are set once per thread, not per image.
            *slot = Decompressor::new()
                .ok()
                .and_then(|mut d| d.set_scan_limit(SCAN_LIMIT).ok().map(|()| d));
        }
        match slot.as_mut() {
            Some(d) => match &filtered {
                // The header (size, limits) and EXIF come from the original bytes either way; a stream the
                // filter produced that libjpeg-turbo does not take is decoded in full instead.
                Some(scans) => match decode_with(d, scans, limits, eighths)? {
                    Some(decoded) => Ok(Some(decoded)),
                    None => decode_with(d, bytes, limits, eighths),
                },
                None => decode_with(d, bytes, limits, eighths),
            },
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
    let (w, h) = (header.width as u32, header.height as u32);
    check_pixels(w, h, limits)?;
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
        (w, h),
        orientation,
    ))
}

/// A progressive (Huffman) JPEG without its AC refinement scans (spectral selection `Ss > 0`, successive
/// approximation `Ah > 0`); with `all` false only the final ones (`Al = 0`), which carry the least significant
/// bit of the AC coefficients. Every other segment is copied unchanged. In files from libjpeg's default
/// progression script the final refinements are about half of the entropy-coded bytes (a third of the decode
/// time at 1/2 scale), all refinements about two thirds (e.g. Autumn 2560x1600 from plasma-workspace-wallpapers:
/// 55% and 67% of 745 kB).
///
/// Why it is sound: a final refinement is the last scan for its coefficients, and without refinements at all
/// each AC coefficient is complete at its first scan's precision, so no kept scan ever depends on a dropped one.
/// The decoded AC coefficients are then off by at most one quantisation step (final only) or 2^Al - 1 steps
/// (all; Al is 1 or 2 in common scripts), the DC coefficients are exact (their refinements are kept), and
/// libjpeg-turbo's block smoothing estimates the missing bits of coefficients that are still zero. A view
/// several times smaller than the image averages such errors away: the caller only asks for this when every
/// view is at least 4x (final) or 8x (all, one view pixel per 8x8 block) smaller, and scripts/bench-ingest
/// measures the PSNR of the default path against a full decode.
///
/// `None` when there is nothing to leave out (baseline, arithmetic-coded or single-bit-precision progressive
/// files) or the marker structure is not the plain one this walks (truncated data, a missing EOI): the caller
/// then decodes the original bytes.
pub(crate) fn without_ac_refinements(bytes: &[u8], all: bool) -> Option<Vec<u8>> {
    let (scans, eoi) = progressive_scans(bytes)?;
    let dropped: Vec<&Scan> = scans
        .iter()
        .filter(|s| s.ss > 0 && s.ah > 0 && (all || s.al == 0))
        .collect();
    if dropped.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(eoi + 2 - dropped.iter().map(|s| s.end - s.start).sum::<usize>());
    let mut from = 0;
    for scan in dropped {
        out.extend_from_slice(&bytes[from..scan.start]);
        from = scan.end;
    }
    out.extend_from_slice(&bytes[from..eoi + 2]);
    Some(out)
}

/// One scan of a progressive JPEG: its SOS segment and entropy-coded data (`start..end`), spectral selection
/// start and successive approximation bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scan {
    start: usize,
    end: usize,
    ss: u8,
    ah: u8,
    al: u8,
}

/// The marker segment at `at` (after any 0xff fill bytes): its marker byte, the offset of that marker, the
/// segment's body (after the length field; empty for the stand-alone markers SOI, EOI, RSTn and TEM) and the
/// offset just past the body. `None` when there is no marker there or its length is impossible or runs past the
/// end. An SOS segment's entropy-coded data follows `end` and is not part of the segment.
fn segment_at(bytes: &[u8], mut at: usize) -> Option<(u8, usize, &[u8], usize)> {
    while *bytes.get(at)? == 0xff && *bytes.get(at + 1)? == 0xff {
        at += 1;
    }
    if *bytes.get(at)? != 0xff {
        return None;
    }
    let marker = *bytes.get(at + 1)?;
    if matches!(marker, 0xd0..=0xd9 | 0x01) {
        return Some((marker, at, &[], at + 2));
    }
    let len = usize::from(u16::from_be_bytes([*bytes.get(at + 2)?, *bytes.get(at + 3)?]));
    if len < 2 {
        return None;
    }
    Some((marker, at, bytes.get(at + 4..at + 2 + len)?, at + 2 + len))
}

/// The scans of a progressive Huffman JPEG and the offset of its EOI marker; `None` for any other frame type
/// or a marker structure that is not plain (truncated, no EOI, a second SOI, a stray restart marker).
fn progressive_scans(bytes: &[u8]) -> Option<(Vec<Scan>, usize)> {
    if bytes.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    let mut progressive = false;
    let mut scans = Vec::new();
    let mut at = 2usize;
    loop {
        let (marker, start, body, end) = segment_at(bytes, at)?;
        match marker {
            0xd9 => return Some((scans, start)),
            0xd0..=0xd8 | 0x01 => return None,
            0xc2 => progressive = true,
            // Every other frame type (baseline, extended, lossless, arithmetic-coded, hierarchical).
            0xc0 | 0xc1 | 0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf => return None,
            _ => {}
        }
        at = end;
        if marker != 0xda {
            continue;
        }
        if !progressive {
            return None;
        }
        // SOS: Ns, Ns x (component, tables), Ss, Se, Ah/Al; then entropy-coded data up to the next marker
        // that is neither a stuffed 0x00 nor a restart marker.
        let ns = usize::from(*body.first()?);
        let (ss, ah_al) = (*body.get(1 + 2 * ns)?, *body.get(3 + 2 * ns)?);
        loop {
            at += memchr::memchr(0xff, bytes.get(at..)?)?;
            match *bytes.get(at + 1)? {
                0x00 | 0xd0..=0xd7 => at += 2,
                _ => break,
            }
        }
        scans.push(Scan {
            start,
            end: at,
            ss,
            ah: ah_al >> 4,
            al: ah_al & 0x0f,
        });
    }
}

/// The EXIF payload (the TIFF structure after `Exif\0\0`) of the first APP1 segment, if any, found by walking
/// the marker segments up to the first scan.
fn exif(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    let mut at = 2usize;
    loop {
        let (marker, _, body, end) = segment_at(bytes, at)?;
        match marker {
            0xda | 0xd9 => return None,
            0xe1 => {
                if let Some(tiff) = body.strip_prefix(b"Exif\0\0") {
                    return Some(tiff);
                }
            }
            _ => {}
        }
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::Reason;

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
            let d = decode(&jpeg, &limits, eighths, AcRefinements::Keep)
                .unwrap_or_else(|e| panic!("{e:?}"))
                .unwrap_or_else(|| panic!("libjpeg-turbo refused a plain JPEG"));
            assert_eq!(d.image.dimensions(), size, "scale {eighths}/8");
            assert_eq!((d.source_width, d.source_height), (203, 97));
        }
        let tight = ValidationLimits {
            max_pixels: 203 * 97 - 1,
            ..ValidationLimits::default()
        };
        let err = decode(&jpeg, &tight, 8, AcRefinements::Keep)
            .err()
            .unwrap_or_else(|| panic!("limit not applied"));
        assert_eq!(err.reason, Reason::TooLarge);
        assert_eq!(
            decode(&jpeg[..jpeg.len() / 2], &limits, 8, AcRefinements::Keep)
                .ok()
                .flatten()
                .map(|_| ()),
            None
        );
    }

    /// A textured `w` x `h` photo-like image encoded by libjpeg-turbo (4:2:0), progressive or baseline.
    fn encoded(w: u32, h: u32, progressive: bool) -> Vec<u8> {
        let mut rng = crate::Rng::new(11);
        let pixels: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = ((i % w) as f64, (i / w) as f64);
                let base = 128.0 + 60.0 * (x / 9.0).sin() * (y / 13.0).cos();
                let noise = rng.below(24) as f64;
                [base + noise, 255.0 - base, (base + x * 0.2 + noise).min(255.0)].map(|v| v.clamp(0.0, 255.0) as u8)
            })
            .collect();
        let mut c = turbojpeg::Compressor::new().unwrap_or_else(|e| panic!("{e}"));
        c.set_quality(92).unwrap_or_else(|e| panic!("{e}"));
        c.set_subsamp(turbojpeg::Subsamp::Sub2x2)
            .unwrap_or_else(|e| panic!("{e}"));
        c.set_progressive(progressive).unwrap_or_else(|e| panic!("{e}"));
        let image = Image {
            pixels: pixels.as_slice(),
            width: w as usize,
            pitch: 3 * w as usize,
            height: h as usize,
            format: PixelFormat::RGB,
        };
        c.compress_to_vec(image).unwrap_or_else(|e| panic!("{e}"))
    }

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        10.0 * (255.0f64.powi(2) / mse).log10()
    }

    fn decoded(jpeg: &[u8], eighths: u32, refinements: AcRefinements) -> Vec<u8> {
        decode(jpeg, &ValidationLimits::default(), eighths, refinements)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("libjpeg-turbo refused it ({refinements:?})"))
            .image
            .into_raw()
    }

    #[test]
    fn ac_refinement_scans_are_left_out_of_progressive_jpegs_only() {
        let jpeg = encoded(256, 192, true);
        let (scans, eoi) = progressive_scans(&jpeg).unwrap_or_else(|| panic!("not seen as progressive"));
        assert_eq!(eoi, jpeg.len() - 2);
        let is_ac_refinement = |s: &Scan| s.ss > 0 && s.ah > 0;
        let is_final = |s: &Scan| is_ac_refinement(s) && s.al == 0;
        // libjpeg's default script for YCbCr: 10 scans; 4 AC refinements (luma twice), 3 of them final.
        assert_eq!(scans.len(), 10, "{scans:?}");
        assert_eq!(scans.iter().filter(|s| is_ac_refinement(s)).count(), 4);
        assert_eq!(scans.iter().filter(|s| is_final(s)).count(), 3);

        for (all, left, dropped) in [
            (false, 7, &is_final as &dyn Fn(&Scan) -> bool),
            (true, 6, &is_ac_refinement),
        ] {
            let filtered = without_ac_refinements(&jpeg, all).unwrap_or_else(|| panic!("nothing left out"));
            let (kept, _) = progressive_scans(&filtered).unwrap_or_else(|| panic!("output not progressive"));
            assert_eq!(kept.len(), left, "all: {all}");
            assert!(!kept.iter().any(dropped));
            let dropped_bytes: usize = scans.iter().filter(|s| dropped(s)).map(|s| s.end - s.start).sum();
            assert_eq!(filtered.len(), jpeg.len() - dropped_bytes);
            assert_eq!(
                without_ac_refinements(&filtered, all),
                None,
                "nothing left to leave out"
            );
        }

        // libjpeg-turbo takes both; the pixels differ by the low AC bits only, more so without any refinement.
        let every = decoded(&jpeg, 8, AcRefinements::Keep);
        let last = decoded(&jpeg, 8, AcRefinements::SkipLast);
        let none = decoded(&jpeg, 8, AcRefinements::SkipAll);
        assert!(every != last && last != none);
        let (p_last, p_none) = (psnr(&every, &last), psnr(&every, &none));
        assert!(
            p_last > p_none && p_none > 30.0,
            "full-resolution PSNR {p_last:.1} / {p_none:.1} dB"
        );

        // Baseline, truncated or otherwise not plain: left alone.
        for all in [false, true] {
            assert_eq!(without_ac_refinements(&encoded(64, 48, false), all), None);
            assert_eq!(without_ac_refinements(&jpeg[..jpeg.len() - 2], all), None);
            assert_eq!(without_ac_refinements(&jpeg[..jpeg.len() / 2], all), None);
            assert_eq!(without_ac_refinements(b"", all), None);
        }
    }

    #[test]
    fn views_4x_smaller_skip_the_last_ac_bit_8x_smaller_every_refinement_unless_all_scans() {
        let jpeg = encoded(512, 384, true);
        let default = crate::DecodeOptions::default();
        let all = crate::DecodeOptions {
            all_scans: true,
            ..default
        };
        let full = crate::DecodeOptions {
            reduced_decode: false,
            ..default
        };
        let pixels = |o: &crate::DecodeOptions, reduction: f64| {
            crate::decode_rgb(&jpeg, o, reduction)
                .unwrap_or_else(|e| panic!("{e:?}"))
                .image
                .into_raw()
        };
        // Reduction 3.9: full scale, every scan; 4 and 7.9: 1/2 scale without the last AC bit; 8: 1/4 scale and
        // 16: 1/8 scale, without AC refinements. With --jpeg-all-scans the same scales with every scan.
        let same = |a: Vec<u8>, b: Vec<u8>| a == b;
        for (reduction, eighths, refinements) in [
            (3.9, 8, AcRefinements::Keep),
            (4.0, 4, AcRefinements::SkipLast),
            (7.9, 4, AcRefinements::SkipLast),
            (8.0, 2, AcRefinements::SkipAll),
            (16.0, 1, AcRefinements::SkipAll),
        ] {
            assert!(
                same(pixels(&default, reduction), decoded(&jpeg, eighths, refinements)),
                "default at reduction {reduction}: {eighths}/8, {refinements:?}"
            );
            assert!(
                same(pixels(&all, reduction), decoded(&jpeg, eighths, AcRefinements::Keep)),
                "--jpeg-all-scans at reduction {reduction}"
            );
        }
        assert!(!same(pixels(&default, 8.0), decoded(&jpeg, 2, AcRefinements::SkipLast)));
        assert!(!same(pixels(&default, 4.0), decoded(&jpeg, 4, AcRefinements::Keep)));
        assert!(
            same(pixels(&full, 16.0), decoded(&jpeg, 8, AcRefinements::Keep)),
            "a full decode decodes every scan"
        );
    }

    #[test]
    fn mutated_jpegs_decode_or_reject_never_panic() {
        let baseline = encoded(64, 48, false);
        let progressive = encoded(64, 48, true);
        let options = crate::DecodeOptions::default();
        let mut rng = crate::Rng::new(7);
        for i in 0..800 {
            let mut bytes = if i % 2 == 0 {
                baseline.clone()
            } else {
                progressive.clone()
            };
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] = rng.next_u64() as u8;
            }
            if i % 3 == 0 {
                bytes.truncate(rng.below(bytes.len() as u64) as usize);
            }
            let reduction = [1.0, 4.0, 8.0, 16.0][i / 2 % 4];
            if let Ok(d) = crate::decode_rgb(&bytes, &options, reduction) {
                assert!(d.image.width() >= 1 && d.image.height() >= 1);
            }
        }
    }
}
