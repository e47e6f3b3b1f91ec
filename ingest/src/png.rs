//! PNG decoding for the common case, about 1.3x as fast as the `image` crate's path (decode + view of the
//! benchmark's PNG photos: 1.2x): 8-bit grey, grey + alpha, RGB or RGBA, not interlaced. The zlib stream is
//! inflated in one call by libdeflate (vendored C, through `libdeflater`), and the rows are unfiltered two at a
//! time: the Sub, Average and Paeth filters are serial along a row (each pixel needs its left neighbour's
//! result), so one row alone keeps the CPU waiting on that chain; row y + 1 only needs row y one pixel ahead, so
//! on x86-64 both rows go through one SSE2 vector, row y + 1 a pixel behind.
//!
//! Everything else (16-bit, palettes or a PLTE chunk at all, interlacing, transparency chunks, EXIF, APNG), and
//! any file that does not check out (CRCs, IHDR first and well-formed, IDAT chunks contiguous, zlib data, the
//! inflated size, filter types), is left to the `image` crate: its verdict is the reject reason, and the pixels
//! are the same either way (tests compare both paths).

use std::cell::RefCell;

use image::RgbImage;

use crate::prepare::{over, Decoded};
use crate::validate::ValidationLimits;

const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// Scratch buffers up to this size are kept for the next image of the thread; larger ones are allocated per
/// image and freed. Keeping them matters: allocating, zeroing and faulting in the 44 MB of inflated rows of a
/// 5120x2880 RGB image for every image made the PNG set of scripts/bench-ingest 1.5x slower (41 vs 62 images/s).
/// The cost: up to this much memory for inflated rows, and as much for joined IDAT data, stays with each
/// decoding thread.
const KEEP_SCRATCH_BYTES: usize = 64 << 20;

/// The largest expansion of deflate (a 258-byte match in about 2 bits, plus block overhead): zlib's 1032:1.
const MAX_DEFLATE_RATIO: usize = 1032;

thread_local! {
    /// (concatenated IDAT data, inflated rows), kept between images of a thread.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The IHDR fields this path decodes: `channels` 8-bit samples per pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    width: u32,
    height: u32,
    channels: usize,
}

/// The header and the IDAT chunks' data of a PNG this path decodes; `None` for anything else.
fn parse(bytes: &[u8]) -> Option<(Header, Vec<&[u8]>)> {
    let mut rest = bytes.strip_prefix(&SIGNATURE)?;
    let mut header = None;
    let mut idat = Vec::new();
    let mut idat_ended = false;
    loop {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        if len > i32::MAX as u32 {
            return None;
        }
        let len = len as usize;
        let body = rest.get(4..8 + len)?;
        let crc = u32::from_be_bytes(rest.get(8 + len..12 + len)?.try_into().ok()?);
        if libdeflater::crc32(body) != crc {
            return None;
        }
        rest = &rest[12 + len..];
        let (kind, data) = body.split_at(4);
        if header.is_none() && kind != b"IHDR" {
            return None;
        }
        match kind {
            b"IHDR" => {
                if header.is_some() {
                    return None;
                }
                header = Some(ihdr(data)?);
            }
            b"IDAT" => {
                if idat_ended {
                    return None;
                }
                idat.push(data);
            }
            b"IEND" => break,
            // Transparency, orientation and animation are what the `image` crate's path handles, and so is a
            // palette: in a truecolour image it is only a suggestion, but the png crate validates it (length,
            // position, a second one) and rejects the file over a bad one. Any other critical chunk is unknown.
            b"tRNS" | b"eXIf" | b"acTL" | b"fcTL" | b"fdAT" | b"PLTE" => return None,
            _ if kind[0] & 0x20 == 0 => return None,
            _ => {}
        }
        if kind != b"IDAT" && !idat.is_empty() {
            idat_ended = true;
        }
    }
    if idat.is_empty() {
        return None;
    }
    Some((header?, idat))
}

fn ihdr(data: &[u8]) -> Option<Header> {
    let &[w0, w1, w2, w3, h0, h1, h2, h3, depth, colour, compression, filter, interlace] = data else {
        return None;
    };
    let width = u32::from_be_bytes([w0, w1, w2, w3]);
    let height = u32::from_be_bytes([h0, h1, h2, h3]);
    let channels = match colour {
        0 => 1,
        2 => 3,
        4 => 2,
        6 => 4,
        _ => return None,
    };
    let valid = |side: u32| side > 0 && side <= i32::MAX as u32;
    (valid(width) && valid(height) && depth == 8 && compression == 0 && filter == 0 && interlace == 0).then_some(
        Header {
            width,
            height,
            channels,
        },
    )
}

/// Decodes a PNG to RGB8 (alpha composited on `background`); `None` when this path does not take the file
/// (see the module docs) or the image is over `limits`: the caller then uses the `image` crate.
pub(crate) fn decode(bytes: &[u8], limits: &ValidationLimits, background: [u8; 3]) -> Option<Decoded> {
    let (header, idat) = parse(bytes)?;
    let (width, height) = (header.width as usize, header.height as usize);
    if (width as u64) * (height as u64) > limits.max_pixels {
        return None;
    }
    let stride = width.checked_mul(header.channels)?;
    let raw_len = stride.checked_add(1)?.checked_mul(height)?;
    // Deflate expands at most about 1032:1; a header claiming more than the data can hold is truncated or
    // hostile, and is not worth zeroing a buffer for.
    let compressed: usize = idat.iter().map(|d| d.len()).sum();
    if compressed.saturating_mul(MAX_DEFLATE_RATIO) < raw_len {
        return None;
    }
    let pixels = SCRATCH.with(|cell| {
        let (joined, kept) = &mut *cell.borrow_mut();
        let input = if let [only] = idat[..] {
            only
        } else {
            joined.clear();
            idat.iter().for_each(|d| joined.extend_from_slice(d));
            joined.as_slice()
        };
        // Large images get a fresh (lazily zeroed) buffer; the kept one only grows to KEEP_SCRATCH_BYTES.
        let mut fresh = Vec::new();
        let raw = if raw_len > KEEP_SCRATCH_BYTES {
            fresh = vec![0u8; raw_len];
            &mut fresh[..]
        } else {
            if kept.len() < raw_len {
                kept.resize(raw_len, 0);
            }
            &mut kept[..raw_len]
        };
        let inflated = libdeflater::Decompressor::new().zlib_decompress(input, raw);
        let pixels = match inflated {
            Ok(n) if n == raw_len => unfilter(raw, stride, header.channels),
            _ => None,
        };
        drop(fresh);
        if joined.capacity() > KEEP_SCRATCH_BYTES {
            *joined = Vec::new();
        }
        pixels
    })?;
    let rgb = match header.channels {
        3 => pixels,
        1 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        2 => pixels
            .chunks_exact(2)
            .flat_map(|p| background.map(|bg| over(p[0], p[1], bg)))
            .collect(),
        _ => pixels
            .chunks_exact(4)
            .flat_map(|p| [0, 1, 2].map(|c| over(p[c], p[3], background[c])))
            .collect(),
    };
    Some(Decoded {
        image: RgbImage::from_raw(header.width, header.height, rgb)?,
        source_width: header.width,
        source_height: header.height,
    })
}

/// PNG filter types (the first byte of every row).
const NONE: u8 = 0;
const SUB: u8 = 1;
const UP: u8 = 2;
const AVERAGE: u8 = 3;
const PAETH: u8 = 4;

/// Rows of `1 + stride` bytes (filter type, filtered bytes) to `stride`-byte rows of pixels with `bpp` bytes
/// each; `None` for an unknown filter type.
fn unfilter(raw: &[u8], stride: usize, bpp: usize) -> Option<Vec<u8>> {
    unfilter_rows(raw, stride, bpp, pairs(bpp))
}

/// [`unfilter`], with serial rows paired (`pair_rows`, x86-64 only) or each on its own.
fn unfilter_rows(raw: &[u8], stride: usize, bpp: usize, pair_rows: bool) -> Option<Vec<u8>> {
    let row = |y: usize| {
        let r = &raw[y * (stride + 1)..(y + 1) * (stride + 1)];
        (r[0], &r[1..])
    };
    let height = raw.len() / (stride + 1);
    if raw.chunks_exact(stride + 1).any(|r| r[0] > PAETH) {
        return None;
    }
    let mut out = vec![0u8; stride * height];
    let zero = vec![0u8; stride];
    let serial = |f: u8| matches!(f, SUB | AVERAGE | PAETH);
    let mut y = 0;
    while y < height {
        let (done, rest) = out.split_at_mut(y * stride);
        let prev = if y == 0 { &zero[..] } else { &done[(y - 1) * stride..] };
        let (f0, raw0) = row(y);
        let next = (y + 1 < height).then(|| row(y + 1));
        match next {
            Some((f1, raw1)) if pair_rows && serial(f0) && serial(f1) => {
                let (out0, rest) = rest.split_at_mut(stride);
                pair(bpp, [f0, f1], [raw0, raw1], prev, out0, &mut rest[..stride]);
                y += 2;
            }
            _ => {
                one_row(bpp, f0, raw0, prev, &mut rest[..stride]);
                y += 1;
            }
        }
    }
    Some(out)
}

/// The Paeth predictor (PNG spec 9.4) in a branch-free form: the same choice of `a`, `b` or `c`.
#[inline(always)]
fn paeth(a: i16, b: i16, c: i16) -> i16 {
    let thresh = c * 3 - (a + b);
    let (lo, hi) = (a.min(b), a.max(b));
    let t0 = if hi <= thresh { lo } else { c };
    if thresh <= lo {
        hi
    } else {
        t0
    }
}

#[inline(always)]
fn predict(filter: u8, a: i16, b: i16, c: i16) -> i16 {
    match filter {
        SUB => a,
        AVERAGE => (a + b) >> 1,
        _ => paeth(a, b, c),
    }
}

fn one_row(bpp: usize, filter: u8, raw: &[u8], prev: &[u8], out: &mut [u8]) {
    match filter {
        NONE => out.copy_from_slice(raw),
        UP => out
            .iter_mut()
            .zip(raw.iter().zip(prev))
            .for_each(|(o, (r, p))| *o = r.wrapping_add(*p)),
        _ => match bpp {
            1 => serial_row::<1>(filter, raw, prev, out),
            2 => serial_row::<2>(filter, raw, prev, out),
            3 => serial_row::<3>(filter, raw, prev, out),
            _ => serial_row::<4>(filter, raw, prev, out),
        },
    }
}

fn serial_row<const BPP: usize>(filter: u8, raw: &[u8], prev: &[u8], out: &mut [u8]) {
    let mut a = [0i16; BPP];
    let mut c = [0i16; BPP];
    for ((o, r), up) in out
        .chunks_exact_mut(BPP)
        .zip(raw.chunks_exact(BPP))
        .zip(prev.chunks_exact(BPP))
    {
        for i in 0..BPP {
            let b = up[i] as i16;
            a[i] = r[i].wrapping_add(predict(filter, a[i], b, c[i]) as u8) as i16;
            c[i] = b;
            o[i] = a[i] as u8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn pairs(bpp: usize) -> bool {
    bpp >= 3
}

#[cfg(not(target_arch = "x86_64"))]
fn pairs(_bpp: usize) -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn pair(_: usize, _: [u8; 2], _: [&[u8]; 2], _: &[u8], _: &mut [u8], _: &mut [u8]) {
    unreachable!("rows are only paired on x86-64")
}

/// Two serial rows at once: `filters[1]`'s row is the one below `filters[0]`'s (`prev` is above both).
#[cfg(target_arch = "x86_64")]
fn pair(bpp: usize, filters: [u8; 2], raw: [&[u8]; 2], prev: &[u8], out0: &mut [u8], out1: &mut [u8]) {
    use sse::{pair, Average, Paeth, Sub};
    macro_rules! go {
        ($bpp:literal) => {
            match filters {
                [SUB, SUB] => pair::<Sub, Sub, $bpp>(raw, prev, out0, out1),
                [SUB, AVERAGE] => pair::<Sub, Average, $bpp>(raw, prev, out0, out1),
                [SUB, _] => pair::<Sub, Paeth, $bpp>(raw, prev, out0, out1),
                [AVERAGE, SUB] => pair::<Average, Sub, $bpp>(raw, prev, out0, out1),
                [AVERAGE, AVERAGE] => pair::<Average, Average, $bpp>(raw, prev, out0, out1),
                [AVERAGE, _] => pair::<Average, Paeth, $bpp>(raw, prev, out0, out1),
                [_, SUB] => pair::<Paeth, Sub, $bpp>(raw, prev, out0, out1),
                [_, AVERAGE] => pair::<Paeth, Average, $bpp>(raw, prev, out0, out1),
                _ => pair::<Paeth, Paeth, $bpp>(raw, prev, out0, out1),
            }
        };
    }
    if bpp == 3 {
        go!(3)
    } else {
        go!(4)
    }
}

/// SSE2 (part of every x86-64 CPU) through `safe_arch`'s safe wrappers. One vector of eight 16-bit lanes holds
/// a pixel of each row: lanes 0..4 the upper row at x, lanes 4..8 the lower row at x - 1, whose upper
/// neighbours (x - 1 and x - 2 of the upper row) are then already known.
#[cfg(target_arch = "x86_64")]
mod sse {
    use safe_arch::{
        add_i16_m128i, add_i8_m128i, bitand_m128i, bitandnot_m128i, bitor_m128i, byte_shr_imm_u128_m128i,
        cmp_gt_mask_i16_m128i, get_i32_from_m128i_s, m128i, max_i16_m128i, min_i16_m128i, pack_i16_to_u8_m128i,
        set_i32_m128i_s, shr_imm_u16_m128i, sub_i16_m128i, unpack_low_i32_m128i, unpack_low_i64_m128i,
        unpack_low_i8_m128i, zeroed_m128i,
    };

    pub(super) trait Predictor {
        const FILTER: u8;
        fn predict(a: m128i, b: m128i, c: m128i) -> m128i;
    }

    pub(super) struct Sub;
    pub(super) struct Average;
    pub(super) struct Paeth;

    impl Predictor for Sub {
        const FILTER: u8 = super::SUB;
        #[inline(always)]
        fn predict(a: m128i, _: m128i, _: m128i) -> m128i {
            a
        }
    }

    impl Predictor for Average {
        const FILTER: u8 = super::AVERAGE;
        #[inline(always)]
        fn predict(a: m128i, b: m128i, _: m128i) -> m128i {
            shr_imm_u16_m128i::<1>(add_i16_m128i(a, b))
        }
    }

    impl Predictor for Paeth {
        const FILTER: u8 = super::PAETH;
        #[inline(always)]
        fn predict(a: m128i, b: m128i, c: m128i) -> m128i {
            // super::paeth, lane-wise
            let thresh = sub_i16_m128i(add_i16_m128i(add_i16_m128i(c, c), c), add_i16_m128i(a, b));
            let lo = min_i16_m128i(a, b);
            let hi = max_i16_m128i(a, b);
            let take_c = cmp_gt_mask_i16_m128i(hi, thresh);
            let t0 = select(take_c, c, lo);
            let take_t0 = cmp_gt_mask_i16_m128i(thresh, lo);
            select(take_t0, t0, hi)
        }
    }

    #[inline(always)]
    fn select(mask: m128i, yes: m128i, no: m128i) -> m128i {
        bitor_m128i(bitand_m128i(mask, yes), bitandnot_m128i(mask, no))
    }

    /// The pixel at `at` (`BPP` = 3 or 4 bytes) in the low bytes of an i32 (for 3, the top byte is whatever
    /// follows: its lane is never stored). One 4-byte load where the row has room, so no stack round trip.
    #[inline(always)]
    fn load<const BPP: usize>(s: &[u8], at: usize) -> i32 {
        match s.get(at..at + 4) {
            Some(&[b0, b1, b2, b3]) => i32::from_le_bytes([b0, b1, b2, b3]),
            _ => i32::from_le_bytes([s[at], s[at + 1], s[at + 2], 0]),
        }
    }

    /// Stores the low `BPP` bytes of `px` at `at`: four bytes where the row has room (the fourth is the next
    /// pixel's first byte, written again in the next step).
    #[inline(always)]
    fn store<const BPP: usize>(s: &mut [u8], at: usize, px: [u8; 4]) {
        match s.get_mut(at..at + 4) {
            Some(word) => word.copy_from_slice(&px),
            None => s[at..at + BPP].copy_from_slice(&px[..BPP]),
        }
    }

    /// Widens the low four bytes of each of two words to 16-bit lanes 0..4 and 4..8.
    #[inline(always)]
    fn widen(lo: i32, hi: i32) -> m128i {
        unpack_low_i8_m128i(
            unpack_low_i32_m128i(set_i32_m128i_s(lo), set_i32_m128i_s(hi)),
            zeroed_m128i(),
        )
    }

    pub(super) fn pair<P0: Predictor, P1: Predictor, const BPP: usize>(
        raw: [&[u8]; 2],
        prev: &[u8],
        out0: &mut [u8],
        out1: &mut [u8],
    ) {
        let n = out0.len() / BPP;
        let low_lanes = m128i::from([-1i16, -1, -1, -1, 0, 0, 0, 0]);
        // One step: the upper row's pixel (left a, up b, up-left c in lanes 0..4) and the lower row's (lanes
        // 4..8, whose up is the upper row's previous result).
        let step = |a: m128i, c: m128i, up: i32, r0: i32, r1: i32| {
            let b = unpack_low_i64_m128i(widen(up, 0), a);
            let p = if P0::FILTER == P1::FILTER {
                P0::predict(a, b, c)
            } else {
                select(low_lanes, P0::predict(a, b, c), P1::predict(a, b, c))
            };
            // Lanes hold 0..=255, so a byte-wise add is the lane-wise add modulo 256.
            let next = add_i8_m128i(widen(r0, r1), p);
            (next, b)
        };
        // (upper row's pixel, lower row's pixel) as bytes
        let pixels = |v: m128i| {
            let packed = pack_i16_to_u8_m128i(v, v);
            let lower = byte_shr_imm_u128_m128i::<4>(packed);
            (
                get_i32_from_m128i_s(packed).to_le_bytes(),
                get_i32_from_m128i_s(lower).to_le_bytes(),
            )
        };
        if n == 0 {
            return;
        }
        let zero = zeroed_m128i();
        // The first step has no lower-row pixel: with zeros in, its lanes come out zero, which is what the
        // lower row's x = 0 needs as left and up-left.
        let (mut a, mut c) = step(zero, zero, load::<BPP>(prev, 0), load::<BPP>(raw[0], 0), 0);
        store::<BPP>(out0, 0, pixels(a).0);
        for x in 1..n {
            let at = x * BPP;
            let (next, b) = step(
                a,
                c,
                load::<BPP>(prev, at),
                load::<BPP>(raw[0], at),
                load::<BPP>(raw[1], at - BPP),
            );
            let (upper, lower) = pixels(next);
            store::<BPP>(out0, at, upper);
            store::<BPP>(out1, at - BPP, lower);
            (a, c) = (next, b);
        }
        // The last step has no upper-row pixel.
        let at = n * BPP;
        let (last, _) = step(a, c, 0, 0, load::<BPP>(raw[1], at - BPP));
        store::<BPP>(out1, at - BPP, pixels(last).1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::composite;
    use crate::rng::Rng;

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(&body);
        c.extend_from_slice(&libdeflater::crc32(&body).to_be_bytes());
        c
    }

    fn ihdr_chunk(w: u32, h: u32, depth: u8, colour: u8, interlace: u8) -> Vec<u8> {
        let mut d = w.to_be_bytes().to_vec();
        d.extend_from_slice(&h.to_be_bytes());
        d.extend_from_slice(&[depth, colour, 0, 0, interlace]);
        chunk(b"IHDR", &d)
    }

    fn zlib(raw: &[u8]) -> Vec<u8> {
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut out = vec![0u8; c.zlib_compress_bound(raw.len())];
        let n = c.zlib_compress(raw, &mut out).expect("bound is enough");
        out.truncate(n);
        out
    }

    /// A PNG of the given filtered rows (filter byte + bytes), the zlib stream split over `idats` chunks, with
    /// `extra` chunks before the image data.
    fn png(w: u32, h: u32, colour: u8, raw: &[u8], idats: usize, extra: &[Vec<u8>]) -> Vec<u8> {
        let mut f = SIGNATURE.to_vec();
        f.extend(ihdr_chunk(w, h, 8, colour, 0));
        extra.iter().for_each(|c| f.extend_from_slice(c));
        let z = zlib(raw);
        let part = z.len().div_ceil(idats).max(1);
        z.chunks(part).for_each(|p| f.extend(chunk(b"IDAT", p)));
        f.extend(chunk(b"IEND", &[]));
        f
    }

    /// What the `image` crate's path makes of the file.
    fn reference(bytes: &[u8]) -> RgbImage {
        composite(
            image::load_from_memory(bytes).expect("the image crate decodes it"),
            [255, 255, 255],
        )
    }

    fn fast(bytes: &[u8]) -> Option<RgbImage> {
        decode(bytes, &ValidationLimits::default(), [255, 255, 255]).map(|d| d.image)
    }

    #[test]
    fn random_filtered_rows_decode_like_the_image_crate() {
        // Random bytes under random filter types are valid filtered data: every filter pairing, every width
        // remainder, all four colour types, one or several IDAT chunks.
        let mut rng = Rng::new(7);
        for case in 0..400 {
            let colour = *rng.pick(&[0u8, 2, 4, 6]);
            let channels = [1, 0, 3, 0, 2, 0, 4][colour as usize];
            let w = if case % 10 == 0 {
                rng.range(60, 200)
            } else {
                rng.range(1, 18)
            } as u32;
            let h = rng.range(1, 9) as u32;
            let mut raw = Vec::new();
            for _ in 0..h {
                // Mostly the serial filters, so that long runs of pairs occur.
                raw.push(*rng.pick(&[0u8, 1, 2, 3, 4, 1, 3, 4, 4]));
                raw.extend((0..w as usize * channels).map(|_| rng.below(256) as u8));
            }
            let file = png(w, h, colour, &raw, 1 + rng.below(3) as usize, &[]);
            let got = fast(&file).unwrap_or_else(|| panic!("case {case}: not taken"));
            assert_eq!(got, reference(&file), "case {case}: {w}x{h} colour {colour}");
        }
    }

    #[test]
    fn paired_and_single_rows_agree() {
        // The single-row loops are what other architectures run for every row.
        let mut rng = Rng::new(5);
        for case in 0..300 {
            let bpp = 1 + rng.below(4) as usize;
            let (w, h) = (rng.range(1, 70) as usize, rng.range(1, 10) as usize);
            let stride = w * bpp;
            let raw: Vec<u8> = (0..h)
                .flat_map(|_| {
                    let mut row = vec![*rng.pick(&[0u8, 1, 2, 3, 4, 4, 3, 1])];
                    row.extend((0..stride).map(|_| rng.below(256) as u8));
                    row
                })
                .collect();
            let single = unfilter_rows(&raw, stride, bpp, false);
            assert!(single.is_some());
            assert_eq!(
                unfilter_rows(&raw, stride, bpp, pairs(bpp)),
                single,
                "case {case}: {w}x{h}, {bpp} bytes"
            );
        }
    }

    #[test]
    fn encoder_output_decodes_like_the_image_crate() {
        use image::codecs::png::{CompressionType, FilterType, PngEncoder};
        use image::{ExtendedColorType, ImageEncoder};
        let mut rng = Rng::new(11);
        let (w, h) = (97u32, 41u32);
        // A smooth gradient with noise: the adaptive filter picks different filters row by row.
        let rgba: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [(x * 2) as u8, (y * 5) as u8, (x + y) as u8, 255 - (x as u8 / 2)]
            })
            .map(|v| v.wrapping_add(rng.below(4) as u8))
            .collect();
        for filter in [
            FilterType::NoFilter,
            FilterType::Sub,
            FilterType::Up,
            FilterType::Avg,
            FilterType::Paeth,
            FilterType::Adaptive,
        ] {
            for (colour, channels) in [
                (ExtendedColorType::Rgb8, 3),
                (ExtendedColorType::Rgba8, 4),
                (ExtendedColorType::L8, 1),
                (ExtendedColorType::La8, 2),
            ] {
                let pixels: Vec<u8> = rgba.chunks_exact(4).flat_map(|p| p[..channels].to_vec()).collect();
                let mut file = Vec::new();
                PngEncoder::new_with_quality(&mut file, CompressionType::Fast, filter)
                    .write_image(&pixels, w, h, colour)
                    .expect("encodes");
                let got = fast(&file).unwrap_or_else(|| panic!("{filter:?} {colour:?}: not taken"));
                assert_eq!(got, reference(&file), "{filter:?} {colour:?}");
            }
        }
    }

    #[test]
    fn what_this_path_leaves_to_the_image_crate() {
        let raw = [0u8, 1, 2, 3, 4, 5, 6];
        let good = png(2, 1, 2, &raw, 1, &[]);
        assert!(fast(&good).is_some());
        let mut sixteen = SIGNATURE.to_vec();
        sixteen.extend(ihdr_chunk(2, 1, 16, 2, 0));
        sixteen.extend(chunk(b"IDAT", &zlib(&[0u8; 13])));
        sixteen.extend(chunk(b"IEND", &[]));
        assert!(image::load_from_memory(&sixteen).is_ok(), "a valid 16-bit file");
        assert!(fast(&sixteen).is_none(), "16-bit");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "transparency",
                png(2, 1, 2, &raw, 1, &[chunk(b"tRNS", &[0, 1, 0, 2, 0, 3])]),
            ),
            ("exif", png(2, 1, 2, &raw, 1, &[chunk(b"eXIf", b"MM\0*")])),
            (
                "animation",
                png(2, 1, 2, &raw, 1, &[chunk(b"acTL", &[0, 0, 0, 1, 0, 0, 0, 0])]),
            ),
            ("unknown critical chunk", png(2, 1, 2, &raw, 1, &[chunk(b"ABCD", &[])])),
            ("palette image", png(2, 1, 3, &[0, 0, 0], 1, &[chunk(b"PLTE", &[0; 3])])),
            ("bad filter type", png(2, 1, 2, &[5, 1, 2, 3, 4, 5, 6], 1, &[])),
            ("short image data", png(2, 1, 2, &raw[..5], 1, &[])),
            (
                "long image data",
                png(2, 1, 2, &[raw.as_slice(), &[0]].concat(), 1, &[]),
            ),
        ];
        for (what, file) in &cases {
            assert!(fast(file).is_none(), "{what}");
        }
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 16] ^= 1; // the IDAT chunk's CRC (the IEND chunk is the last 12 bytes)
        assert!(fast(&bad_crc).is_none(), "bad CRC");
        for cut in 0..good.len() {
            assert!(fast(&good[..cut]).is_none(), "truncated at {cut}");
        }
        let mut interlaced = SIGNATURE.to_vec();
        interlaced.extend(ihdr_chunk(2, 1, 8, 2, 1));
        interlaced.extend_from_slice(&good[33..]);
        assert!(fast(&interlaced).is_none(), "interlaced");
    }

    #[test]
    fn ancillary_chunks_are_skipped_a_palette_is_left_to_the_image_crate() {
        let raw = [4u8, 10, 20, 30, 40, 50, 60];
        let extra = [
            chunk(b"gAMA", &[0, 0, 177, 143]),
            chunk(b"sRGB", &[0]),
            chunk(b"tEXt", b"k\0v"),
        ];
        let file = png(2, 1, 2, &raw, 1, &extra);
        assert_eq!(fast(&file), Some(reference(&file)));
        // A suggested palette: the png crate checks it, so the image crate decides.
        let file = png(2, 1, 2, &raw, 1, &[chunk(b"PLTE", &[1, 2, 3])]);
        assert_eq!(fast(&file), None);
        let options = crate::DecodeOptions::default();
        let via_image = crate::decode_rgb(&file, &options, 1.0).expect("the image crate decodes it");
        assert_eq!(via_image.image, reference(&file));
    }

    #[test]
    fn a_header_larger_than_the_data_can_hold_is_refused_before_allocating() {
        // 20000 x 20000 RGBA claims 1.6 GB of rows from a few bytes of zlib data.
        let file = png(20_000, 20_000, 6, &[0u8; 8], 1, &[]);
        assert_eq!(fast(&file), None);
    }

    #[test]
    fn images_larger_than_the_kept_scratch_buffer_decode() {
        // 4200 x 4000 RGBA: 67.2 MB of rows, over KEEP_SCRATCH_BYTES, so a buffer of its own.
        let (w, h) = (4200usize, 4000usize);
        let mut raw = vec![0u8; (w * 4 + 1) * h];
        for (y, row) in raw.chunks_exact_mut(w * 4 + 1).enumerate() {
            row[0] = [0, 1, 2, 3, 4][y % 5];
            row[1 + (y * 7) % (w * 4)] = y as u8;
        }
        assert!(raw.len() > KEEP_SCRATCH_BYTES);
        let file = png(w as u32, h as u32, 6, &raw, 3, &[]);
        assert_eq!(fast(&file), Some(reference(&file)));
    }

    /// Recomputes the CRC of every chunk the lengths lead to, so that mutations reach past the CRC check.
    fn fix_crcs(file: &mut [u8]) {
        let mut at = 8;
        while let Some(len) = file
            .get(at..at + 4)
            .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        {
            let Some(end) = (at + 8).checked_add(len).filter(|e| e + 4 <= file.len()) else {
                return;
            };
            let crc = libdeflater::crc32(&file[at + 4..end]);
            file[end..end + 4].copy_from_slice(&crc.to_be_bytes());
            at = end + 4;
        }
    }

    #[test]
    fn mutated_pngs_decode_or_reject_never_panic() {
        let mut rng = Rng::new(13);
        let options = crate::DecodeOptions::default();
        for i in 0..3000 {
            let (colour, channels) = *rng.pick(&[(0u8, 1usize), (2, 3), (4, 2), (6, 4)]);
            let (w, h) = (rng.range(1, 40) as usize, rng.range(1, 12) as usize);
            let raw: Vec<u8> = (0..h)
                .flat_map(|_| {
                    let mut row = vec![rng.below(5) as u8];
                    row.extend((0..w * channels).map(|_| rng.below(256) as u8));
                    row
                })
                .collect();
            // Ancillary chunks the png crate parses (and may judge) for the mutations to hit too.
            let extra = if i % 2 == 0 {
                vec![
                    chunk(b"gAMA", &45455u32.to_be_bytes()),
                    chunk(b"cHRM", &[0; 32]),
                    chunk(b"sRGB", &[0]),
                    chunk(b"sBIT", &[8; 4][..channels]),
                    chunk(b"pHYs", &[0, 0, 11, 19, 0, 0, 11, 19, 1]),
                    chunk(b"iCCP", b"icc\0\0x\x9c\x03\x00\x00\x00\x00\x01"),
                    chunk(b"tEXt", b"Title\0imglish"),
                    chunk(b"zTXt", b"Note\0\0x\x9c\x03\x00\x00\x00\x00\x01"),
                    chunk(b"iTXt", b"Author\0\0\0en\0\0x"),
                ]
            } else {
                Vec::new()
            };
            let mut file = png(w as u32, h as u32, colour, &raw, 1 + i % 3, &extra);
            for _ in 0..1 + rng.below(4) {
                let at = 8 + rng.below(file.len() as u64 - 8) as usize;
                file[at] = rng.next_u64() as u8;
            }
            if i % 4 == 0 {
                file.truncate(rng.below(file.len() as u64) as usize);
            }
            fix_crcs(&mut file);
            // Whatever this path takes, the image crate decodes to the same pixels.
            if let Some(d) = fast(&file) {
                let reference = image::load_from_memory(&file).map(|i| composite(i, [255, 255, 255]));
                assert_eq!(reference.ok(), Some(d), "case {i}");
            }
            let _ = crate::decode_rgb(&file, &options, 1.0);
        }
    }

    #[test]
    fn images_over_the_limit_are_left_to_the_limits_check() {
        let file = png(4, 4, 0, &[0u8; 20], 1, &[]);
        let limits = ValidationLimits {
            max_pixels: 15,
            ..ValidationLimits::default()
        };
        assert!(decode(&file, &limits, [0; 3]).is_none());
    }
}
