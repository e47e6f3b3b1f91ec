//! Benchmark and quality harness for image preparation (used by `scripts/bench-ingest`).
//!
//! ```text
//! cargo run -p imglish-ingest --example bench_prepare -- time  LIST MIN_SECONDS THREADS [MODES]
//! cargo run -p imglish-ingest --example bench_prepare -- views LIST OUT_DIR
//! cargo run -p imglish-ingest --example bench_prepare -- breakdown LIST SIZE
//! ```
//!
//! `LIST` has one image per line: `group<TAB>path`. Images are read into memory first, so only decode + centre
//! view + resize is timed, the way the tokenize stage prepares an image whose header dimensions are already in
//! the manifest.
//!
//! `time` prints one tab-separated line per (group, size, decode mode, threads):
//! `imglish  GROUP  SIZE  MODE  THREADS  IMAGES  SECONDS  CPU_SECONDS  CHECKSUM` where MODE is `reduced` (JPEG DCT-domain reduced
//! decode, the default path), `full`, `draft` (reduced as far as Pillow's `draft()`) or `allscans` (reduced,
//! every scan of progressive JPEGs decoded). Sizes: 224 with bicubic (Catmull-Rom), 112 with Lanczos3. THREADS is a
//! comma-separated list; 1 runs on the calling thread, N > 1 on a rayon pool of N threads with one `Resizer`
//! per thread. MODES (optional, for profiling) keeps only the listed modes, e.g. `reduced` or `reduced224,full`.
//!
//! `views` writes, for every image, the raw RGB8 224 bicubic and 112 Lanczos3 centre views from each decode
//! mode (`OUT/NNNN.{full,reduced,draft,allscans}{224,112}.rgb`) and `OUT/views.tsv` (index, path, upright
//! source width and height, the crop box, the reduced decode's scale).
//!
//! `breakdown` prints, per image, the milliseconds to decode (reduced and full) and to render the view.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use imglish_ingest::{
    center_view, decode_rgb, max_reduction, render_view, validate_bytes, DecodeOptions, Filter, Resizer,
    ValidationLimits,
};
use rayon::prelude::*;

struct Img {
    group: String,
    path: PathBuf,
    bytes: Vec<u8>,
    /// Shorter side from the header (as the manifest records it).
    short: u32,
}

fn load(list: &str) -> Vec<Img> {
    let text = fs::read_to_string(list).unwrap_or_else(|e| panic!("{list}: {e}"));
    let limits = ValidationLimits::default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (group, path) = line.split_once('\t').unwrap_or(("all", line));
            let bytes = fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let info = validate_bytes(&bytes, &limits).unwrap_or_else(|r| panic!("{path}: {r:?}"));
            Img {
                group: group.to_string(),
                path: PathBuf::from(path),
                short: info.width.min(info.height),
                bytes,
            }
        })
        .collect()
}

/// Decode + centre view at `size`; returns a byte of the result so the work cannot be optimised away.
fn prepare(img: &Img, size: u32, filter: Filter, options: &DecodeOptions, resizer: &mut Resizer) -> u8 {
    let reduction = img.short as f64 / size as f64;
    let decoded = match decode_rgb(&img.bytes, options, reduction) {
        Ok(d) => d,
        Err(r) => panic!("{}: {r:?}", img.path.display()),
    };
    let view = center_view(decoded.source_width, decoded.source_height);
    debug_assert!(max_reduction(&[view], size) >= reduction - 1e-9);
    let out = render_view(&decoded, &view, size, filter, resizer);
    out.as_raw()[(size as usize * size as usize * 3) / 2]
}

/// CPU seconds (user + system) of this process so far, all threads included (Linux `/proc/self/stat`, in
/// clock ticks of 1/100 s); NaN where unavailable.
fn cpu_seconds() -> f64 {
    let Ok(stat) = fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    match (
        fields.get(11).and_then(|v| v.parse::<f64>().ok()),
        fields.get(12).and_then(|v| v.parse::<f64>().ok()),
    ) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

fn configs() -> Vec<(u32, Filter, &'static str, DecodeOptions)> {
    let reduced = DecodeOptions::default();
    let full = DecodeOptions {
        reduced_decode: false,
        ..DecodeOptions::default()
    };
    let draft = DecodeOptions {
        draft: true,
        ..DecodeOptions::default()
    };
    let all_scans = DecodeOptions {
        all_scans: true,
        ..DecodeOptions::default()
    };
    [(224, Filter::Bicubic), (112, Filter::Lanczos3)]
        .into_iter()
        .flat_map(|(size, filter)| {
            [
                (size, filter, "reduced", reduced),
                (size, filter, "full", full),
                (size, filter, "draft", draft),
                (size, filter, "allscans", all_scans),
            ]
        })
        .collect()
}

/// How many times a multi-threaded pass goes through the set (scripts/bench-ingest's Pillow side does the same).
const PASS_REPEAT: usize = 4;

fn time(imgs: &[Img], min_seconds: f64, threads: &[usize], only: Option<&str>) {
    let mut groups: Vec<&str> = imgs.iter().map(|i| i.group.as_str()).collect();
    groups.dedup();
    groups.sort_unstable();
    groups.dedup();
    for &n in threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .expect("thread pool");
        for group in &groups {
            let set: Vec<&Img> = imgs.iter().filter(|i| i.group == *group).collect();
            // On N threads each pass goes through the set PASS_REPEAT times with one barrier at the end, so the
            // wait for the last large image of a pass is a small part of it (tokenize streams without barriers).
            let repeated: Vec<&Img> = (0..PASS_REPEAT).flat_map(|_| set.iter().copied()).collect();
            for (size, filter, mode, options) in configs()
                .into_iter()
                .filter(|c| only.is_none_or(|o| o.split(',').any(|m| m == c.2 || m == format!("{}{}", c.2, c.0))))
            {
                let mut sink = 0u64;
                let mut done = 0usize;
                let cpu0 = cpu_seconds();
                let start = Instant::now();
                while done == 0 || start.elapsed().as_secs_f64() < min_seconds {
                    if n == 1 {
                        let mut resizer = Resizer::new();
                        for img in &set {
                            sink += prepare(img, size, filter, &options, &mut resizer) as u64;
                        }
                        done += set.len();
                    } else {
                        sink += pool.install(|| {
                            repeated
                                .par_iter()
                                .with_max_len(1)
                                .map_init(Resizer::new, |r, img| prepare(img, size, filter, &options, r) as u64)
                                .sum::<u64>()
                        });
                        done += repeated.len();
                    }
                }
                let secs = start.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu0;
                println!("imglish\t{group}\t{size}\t{mode}\t{n}\t{done}\t{secs:.4}\t{cpu:.2}\t{sink}");
            }
        }
    }
}

fn views(imgs: &[Img], out: &str) {
    let out = PathBuf::from(out);
    fs::create_dir_all(&out).expect("create out dir");
    let mut tsv = String::from("index\tpath\twidth\theight\tx\ty\tw\th\treduced_scale_224\treduced_scale_112\n");
    let mut resizer = Resizer::new();
    for (i, img) in imgs.iter().enumerate() {
        let mut scales = Vec::new();
        let mut geometry = None;
        for (size, filter, mode, options) in configs() {
            let decoded = decode_rgb(&img.bytes, &options, img.short as f64 / size as f64)
                .unwrap_or_else(|r| panic!("{}: {r:?}", img.path.display()));
            let view = center_view(decoded.source_width, decoded.source_height);
            let rgb = render_view(&decoded, &view, size, filter, &mut resizer);
            fs::write(out.join(format!("{i:04}.{mode}{size}.rgb")), rgb.as_raw()).expect("write view");
            if mode == "reduced" {
                scales.push(decoded.scale());
            }
            geometry = Some((decoded.source_width, decoded.source_height, view.crop));
        }
        let (w, h, [x, y, cw, ch]) = geometry.expect("eight configs");
        tsv.push_str(&format!(
            "{i}\t{}\t{w}\t{h}\t{x}\t{y}\t{cw}\t{ch}\t{}\t{}\n",
            img.path.display(),
            scales[0],
            scales[1]
        ));
    }
    fs::write(out.join("views.tsv"), tsv).expect("write views.tsv");
}

/// Per image: milliseconds to decode (reduced / full) and to render the centre view from each, best of 3.
fn breakdown(imgs: &[Img], size: u32) {
    let mut resizer = Resizer::new();
    let filter = if size >= 224 { Filter::Bicubic } else { Filter::Lanczos3 };
    println!("path\twidth\theight\tscale\tdecode_reduced_ms\trender_reduced_ms\tdecode_full_ms\trender_full_ms");
    for img in imgs {
        let mut row = Vec::new();
        let mut dims = (0, 0, 1.0);
        for (_, _, mode, options) in configs()
            .into_iter()
            .filter(|c| c.0 == 224 && matches!(c.2, "reduced" | "full"))
        {
            let (mut dec_best, mut ren_best) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                let t = Instant::now();
                let decoded = decode_rgb(&img.bytes, &options, img.short as f64 / size as f64).expect("decode");
                let t1 = Instant::now();
                let view = center_view(decoded.source_width, decoded.source_height);
                let _ = render_view(&decoded, &view, size, filter, &mut resizer);
                let t2 = Instant::now();
                dec_best = dec_best.min((t1 - t).as_secs_f64() * 1e3);
                ren_best = ren_best.min((t2 - t1).as_secs_f64() * 1e3);
                if mode == "reduced" {
                    dims = (decoded.source_width, decoded.source_height, decoded.scale());
                }
            }
            row.push(format!("{dec_best:.2}\t{ren_best:.2}"));
        }
        println!(
            "{}\t{}\t{}\t{}\t{}",
            img.path.display(),
            dims.0,
            dims.1,
            dims.2,
            row.join("\t")
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["time", list, min_seconds, threads, only @ ..] => {
            let imgs = load(list);
            let threads: Vec<usize> = threads
                .split(',')
                .map(|t| t.parse().expect("THREADS: comma-separated integers"))
                .collect();
            time(
                &imgs,
                min_seconds.parse().expect("MIN_SECONDS"),
                &threads,
                only.first().copied(),
            );
        }
        ["views", list, out] => views(&load(list), out),
        ["breakdown", list, size] => breakdown(&load(list), size.parse().expect("SIZE")),
        _ => {
            eprintln!("usage: bench_prepare time LIST MIN_SECONDS THREADS | views LIST OUT_DIR");
            std::process::exit(2);
        }
    }
}
