//! Writes a large Parquet image source of distinct tiny PNGs, for the manifest-scale benchmark of
//! `scripts/bench-ingest`.
//!
//! ```text
//! cargo run -p imglish-ingest --example gen_tiny_parquet -- OUT_DIR ROWS FILES
//! ```
//!
//! Writes `OUT_DIR/tiny-NNNNN.parquet` (FILES files, ROWS rows in all) in the Hugging Face `datasets` layout
//! (`image: struct{bytes, path}`, `caption`, `label`) with [`imglish_ingest::write_image_parquet`]. Image `i`
//! is a 32x32 RGB PNG: a flat colour chosen by `i % 7` with `i`'s bytes written into the first pixels, so no
//! two images are byte-identical (nothing is rejected as a duplicate). Deterministic.

use std::path::PathBuf;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use imglish_ingest::write_image_parquet;
use rayon::prelude::*;

const SIDE: u32 = 32;
const PALETTE: [[u8; 3]; 7] = [
    [200, 60, 40],
    [40, 160, 70],
    [50, 80, 200],
    [220, 200, 60],
    [150, 60, 170],
    [60, 190, 190],
    [120, 120, 120],
];

fn tiny_png(i: u64) -> Vec<u8> {
    let base = PALETTE[(i % 7) as usize];
    let mut px = vec![0u8; (SIDE * SIDE * 3) as usize];
    for p in px.chunks_exact_mut(3) {
        p.copy_from_slice(&base);
    }
    // Bytes of i in the first row: 8 bytes spread over three pixels.
    for (k, b) in i.to_le_bytes().iter().enumerate() {
        px[k] = *b;
    }
    let mut out = Vec::with_capacity(128);
    PngEncoder::new(&mut out)
        .write_image(&px, SIDE, SIDE, ExtendedColorType::Rgb8)
        .expect("encode png");
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, rows, files] = args.as_slice() else {
        eprintln!("usage: gen_tiny_parquet OUT_DIR ROWS FILES");
        std::process::exit(2);
    };
    let out = PathBuf::from(out);
    let rows: u64 = rows.parse().expect("ROWS");
    let files: u64 = files.parse::<u64>().expect("FILES").max(1);
    std::fs::create_dir_all(&out).expect("create OUT_DIR");
    let per_file = rows.div_ceil(files);
    let mut total_bytes = 0u64;
    for f in 0..files {
        let (lo, hi) = (f * per_file, ((f + 1) * per_file).min(rows));
        if lo >= hi {
            break;
        }
        let batch: Vec<(Vec<u8>, String, String, i64)> = (lo..hi)
            .into_par_iter()
            .map(|i| {
                (
                    tiny_png(i),
                    format!("tiny/{i:08}.png"),
                    format!(
                        "a tiny {} square, number {i}",
                        ["red", "green", "blue", "yellow", "purple", "teal", "grey"][(i % 7) as usize]
                    ),
                    (i % 7) as i64,
                )
            })
            .collect();
        total_bytes += batch.iter().map(|r| r.0.len() as u64).sum::<u64>();
        let path = out.join(format!("tiny-{f:05}.parquet"));
        write_image_parquet(&path, &batch).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("wrote {} ({} rows)", path.display(), hi - lo);
    }
    println!("rows={rows} files={files} png_bytes={total_bytes}");
}
