//! Fuzzes image decoding as tokenize runs it (libjpeg-turbo with DCT scaling, the progressive-scan filter
//! (reductions of 4 and more), the PNG path (libdeflate + paired-row unfiltering), the pure-Rust fallbacks, EXIF
//! orientation, limits): any bytes must give a decoded image or a reject, never a panic or an abort.
//!
//! Run with `cargo +nightly fuzz run decode_image` from `ingest/`; seed the corpus with real images, e.g.
//! `cp /usr/share/wallpapers/*/contents/images/*.jpg ingest/fuzz/corpus/decode_image/`. The normal test suite
//! runs bounded versions (`mutated_jpegs_decode_or_reject_never_panic` in ingest/src/jpeg.rs,
//! `mutated_pngs_decode_or_reject_never_panic` in ingest/src/png.rs).
#![no_main]

use imglish_ingest::{decode_rgb, DecodeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the reduction, as the views of a sample would.
    let Some((&r, bytes)) = data.split_first() else { return };
    let _ = decode_rgb(bytes, &DecodeOptions::default(), f64::from(r % 20));
});
