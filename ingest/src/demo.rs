//! The embedded demo corpus: deterministic synthetic images with captions, so every stage runs with no
//! external data.
//!
//! Images are procedurally drawn: a large centred shape whose class is the label and, in most images, a smaller
//! second shape beside it (the caption says on which side), in named colours on a textured background, at
//! sizes from 64 px to 1500 px and varied aspect ratios, as JPEG or PNG, some grayscale and some RGBA.
//! Captions describe what is drawn. The same seed gives the same bytes.
//!
//! Layout written under the output directory:
//!
//! ```text
//! images/<class>/demo_NNNNN.{jpg,png}   class-per-folder (ImageFolder) tree, plus the bad inputs below
//! captions/coco_captions.json           COCO captions (images[] + annotations[], several per image)
//! captions/captions.jsonl               {"image": <relative path>, "captions": [...]} per line
//! captions/captions.tsv                 CC3M-style `caption<TAB>path`, one caption per row, with a header
//! shards/demo-NNNNN.tar                 the same samples in WebDataset naming (key.jpg|png, key.txt, key.cls)
//! demo.json                             what was generated: seed, counts, classes, the bad inputs
//! ```
//!
//! Deliberately bad inputs (all under `images/`, so one ingest of the tree exercises them): a zero-byte file,
//! a truncated JPEG, a text file named `.png`, a PNG whose header claims 100000x100000 pixels, a tiny image, an
//! extreme sliver, and a byte-identical duplicate; every caption set also has rows for images that do not exist.

use std::fs;
use std::path::{Path, PathBuf};

use image::{ImageBuffer, Luma, Rgb, Rgba};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{sync_dir, write_atomic};
use crate::rng::Rng;

/// Version of the generator; bump when the bytes it writes change.
pub const DEMO_VERSION: u32 = 2;

/// The shape classes (the label of an image is the class of its large centred shape); class index = position here,
/// which is also the sorted order of the folder names.
pub const CLASSES: [&str; 6] = ["circle", "cross", "diamond", "ring", "square", "triangle"];

/// Options for [`write_demo_corpus`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DemoConfig {
    images: usize,
    seed: u64,
    shard_samples: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            images: 240,
            seed: 0,
            shard_samples: 100,
        }
    }
}

impl DemoConfig {
    /// Generates `n` good images (at least 1).
    pub fn try_with_images(mut self, n: usize) -> Result<Self> {
        if n == 0 || n > 1_000_000 {
            return Err(Error::Config {
                option: "--images".into(),
                reason: format!("{n} is out of range 1..=1000000"),
            });
        }
        self.images = n;
        Ok(self)
    }

    /// Uses `seed` for every random choice.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Number of good images.
    pub fn images(&self) -> usize {
        self.images
    }
}

/// One bad input and the reject reason ingest must give it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadInput {
    /// Path relative to the corpus root (for caption rows: the image path they point at).
    pub path: String,
    /// The expected reject reason code.
    pub reason: String,
    /// What is wrong with it.
    pub what: String,
}

/// What [`write_demo_corpus`] wrote; also saved as `demo.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DemoSummary {
    /// Generator version.
    pub version: u32,
    /// The configuration used.
    pub config: DemoConfig,
    /// Good images written under `images/`.
    pub images: usize,
    /// Captions per caption set (rows pointing at missing images excluded).
    pub captions: usize,
    /// Tar shards under `shards/`.
    pub shards: usize,
    /// The class names, in label order.
    pub classes: Vec<String>,
    /// The deliberately bad inputs.
    pub bad_inputs: Vec<BadInput>,
}

const COLORS: [(&str, [u8; 3]); 12] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 220, 40]),
    ("orange", [245, 140, 30]),
    ("purple", [140, 60, 180]),
    ("pink", [245, 130, 190]),
    ("cyan", [40, 210, 220]),
    ("brown", [130, 80, 40]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
    ("gray", [128, 128, 128]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Background {
    Plain,
    Striped { vertical: bool },
    Checkered,
    Gradient { vertical: bool },
    Speckled,
}

impl Background {
    fn word(self) -> &'static str {
        match self {
            Background::Plain => "plain",
            Background::Striped { .. } => "striped",
            Background::Checkered => "checkered",
            Background::Gradient { .. } => "gradient",
            Background::Speckled => "speckled",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    class: usize,
    color: usize,
    large: bool,
    cx: f64,
    cy: f64,
    r: f64,
}

impl Shape {
    /// Signed distance (pixels, negative inside) of point (x, y) to this shape.
    fn sdf(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let r = self.r;
        match CLASSES[self.class] {
            "circle" => (dx * dx + dy * dy).sqrt() - r,
            "square" => dx.abs().max(dy.abs()) - r * 0.85,
            "diamond" => (dx.abs() + dy.abs() - r) * std::f64::consts::FRAC_1_SQRT_2,
            "ring" => ((dx * dx + dy * dy).sqrt() - 0.72 * r).abs() - 0.28 * r,
            "cross" => {
                let t = r / 3.0;
                (dx.abs() - r).max(dy.abs() - t).min((dx.abs() - t).max(dy.abs() - r))
            }
            _ => {
                // Equilateral triangle, apex up, circumradius r (image y grows downwards).
                let ri = 0.5 * r;
                let s = 0.866_025_403_784_438_6;
                let d1 = dy - ri;
                let d2 = s * dx - 0.5 * dy - ri;
                let d3 = -s * dx - 0.5 * dy - ri;
                d1.max(d2).max(d3)
            }
        }
    }
}

/// Everything random about one image, drawn up front from its own keyed stream.
struct Plan {
    width: u32,
    height: u32,
    background: Background,
    bg_colors: ([u8; 3], [u8; 3]),
    bg_period: f64,
    shapes: Vec<Shape>,
    relation: Option<&'static str>,
    mode: Mode,
    jpeg_quality: Option<u8>,
    noise_seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Rgb,
    Gray,
    Rgba,
}

fn plan(seed: u64, index: usize) -> Plan {
    let mut rng = Rng::keyed(&[seed, 0xDE30, index as u64]);
    // Sizes: mostly small and medium, some large, a few tiny; aspect ratio 1:2 .. 2:1.
    let long = match rng.below(20) {
        0 => rng.range(64, 96),
        1..=13 => rng.range(96, 512),
        14..=18 => rng.range(512, 1024),
        _ => rng.range(1024, 1500),
    } as f64;
    let aspect = rng.uniform(1.0, 2.0);
    let short = (long / aspect).round().max(64.0);
    let (width, height) = if rng.chance(0.5) { (long, short) } else { (short, long) };
    let background = match rng.below(7) {
        0 => Background::Plain,
        1 => Background::Striped { vertical: false },
        2 => Background::Striped { vertical: true },
        3 => Background::Checkered,
        4 => Background::Gradient { vertical: false },
        5 => Background::Gradient { vertical: true },
        _ => Background::Speckled,
    };
    let c1 = COLORS[rng.below(COLORS.len() as u64) as usize].1;
    let c2 = COLORS[rng.below(COLORS.len() as u64) as usize].1;
    let m = width.min(height);
    let bg_period = m / rng.uniform(4.0, 12.0);

    let class = index % CLASSES.len();
    // The labelled shape is the subject: centred and large enough to dominate the centre view, so that its
    // class shows in the visual tokens. The optional second shape is smaller and sits towards the edge on the
    // side the caption names (drawn underneath, so the subject stays whole).
    let relation = if rng.chance(0.7) {
        Some(*rng.pick(&["above", "below", "to the left of", "to the right of"]))
    } else {
        None
    };
    let large = rng.chance(0.5);
    let r = m * if large {
        rng.uniform(0.3, 0.38)
    } else {
        rng.uniform(0.2, 0.26)
    };
    let color = rng.below(COLORS.len() as u64) as usize;
    let (cx, cy) = (0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.04, 0.04));
    let mut shapes = vec![Shape {
        class,
        color,
        large,
        cx: cx * width,
        cy: cy * height,
        r,
    }];
    if let Some(rel) = relation {
        let other_class = rng.below(CLASSES.len() as u64) as usize;
        let other_r = m * rng.uniform(0.08, 0.11);
        let mut other_color = rng.below(COLORS.len() as u64) as usize;
        if other_color == color {
            other_color = (other_color + 1) % COLORS.len();
        }
        // "subject REL other": the other shape is on the opposite side, a margin in from the border.
        let (ox, oy) = match rel {
            "above" => (cx * width, height - other_r * 1.25),
            "below" => (cx * width, other_r * 1.25),
            "to the left of" => (width - other_r * 1.25, cy * height),
            _ => (other_r * 1.25, cy * height),
        };
        shapes.push(Shape {
            class: other_class,
            color: other_color,
            large: false,
            cx: ox,
            cy: oy,
            r: other_r,
        });
    }
    let mode = match rng.below(20) {
        0..=2 => Mode::Gray,
        3..=4 => Mode::Rgba,
        _ => Mode::Rgb,
    };
    let jpeg_quality = if mode != Mode::Rgba && rng.chance(0.65) {
        Some(rng.range(80, 95) as u8)
    } else {
        None
    };
    Plan {
        width: width as u32,
        height: height as u32,
        background,
        bg_colors: (c1, c2),
        bg_period,
        shapes,
        relation,
        mode,
        jpeg_quality,
        noise_seed: rng.next_u64(),
    }
}

fn hash2(seed: u64, x: i64, y: i64) -> f64 {
    let h = crate::rng::mix64(
        seed ^ (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (y as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    );
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn lerp(a: [u8; 3], b: [u8; 3], t: f64) -> [f64; 3] {
    [0, 1, 2].map(|i| a[i] as f64 + (b[i] as f64 - a[i] as f64) * t)
}

fn render(p: &Plan) -> (Vec<[f64; 3]>, Vec<f64>) {
    let (w, h) = (p.width as usize, p.height as usize);
    let mut rgb = Vec::with_capacity(w * h);
    let mut alpha = Vec::with_capacity(w * h);
    let (c1, c2) = p.bg_colors;
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
            let mut px = match p.background {
                Background::Plain => lerp(c1, c1, 0.0),
                Background::Striped { vertical } => {
                    let v = if vertical { fx } else { fy };
                    if ((v / p.bg_period) as i64) % 2 == 0 {
                        lerp(c1, c1, 0.0)
                    } else {
                        lerp(c2, c2, 0.0)
                    }
                }
                Background::Checkered => {
                    let a = (fx / p.bg_period) as i64 + (fy / p.bg_period) as i64;
                    if a % 2 == 0 {
                        lerp(c1, c1, 0.0)
                    } else {
                        lerp(c2, c2, 0.0)
                    }
                }
                Background::Gradient { vertical } => {
                    let t = if vertical { fy / h as f64 } else { fx / w as f64 };
                    lerp(c1, c2, t)
                }
                Background::Speckled => {
                    // Value noise on a coarse grid, bilinear.
                    let s = p.bg_period / 2.0;
                    let (gx, gy) = (fx / s, fy / s);
                    let (ix, iy) = (gx.floor() as i64, gy.floor() as i64);
                    let (tx, ty) = (gx - ix as f64, gy - iy as f64);
                    let n = |a, b| hash2(p.noise_seed, a, b);
                    let v = (n(ix, iy) * (1.0 - tx) + n(ix + 1, iy) * tx) * (1.0 - ty)
                        + (n(ix, iy + 1) * (1.0 - tx) + n(ix + 1, iy + 1) * tx) * ty;
                    lerp(c1, c2, v)
                }
            };
            let mut a = if p.mode == Mode::Rgba { 0.0 } else { 1.0 };
            // Draw the second shape first so the labelled shape is on top.
            for s in p.shapes.iter().rev() {
                let cov = (0.5 - s.sdf(fx, fy)).clamp(0.0, 1.0);
                if cov > 0.0 {
                    let c = COLORS[s.color].1;
                    for (i, v) in px.iter_mut().enumerate() {
                        *v = *v * (1.0 - cov) + c[i] as f64 * cov;
                    }
                    a = a + (1.0 - a) * cov;
                }
            }
            // A little sensor-like noise on the JPEGs so they look like photographs to a codec (PNGs stay
            // clean, like graphics, and small).
            if p.jpeg_quality.is_some() {
                let noise = (hash2(p.noise_seed ^ 0x5EED, x as i64, y as i64) - 0.5) * 6.0;
                for v in px.iter_mut() {
                    *v += noise;
                }
            }
            rgb.push(px);
            alpha.push(a);
        }
    }
    (rgb, alpha)
}

fn to_u8(v: f64) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

fn encode(p: &Plan, path_for_errors: &Path) -> Result<(Vec<u8>, &'static str)> {
    let (rgb, alpha) = render(p);
    let (w, h) = (p.width, p.height);
    let mut out = Vec::new();
    let err = |e: image::ImageError| Error::Encode {
        path: path_for_errors.to_path_buf(),
        reason: e.to_string(),
    };
    let mut cursor = std::io::Cursor::new(&mut out);
    let ext = match p.mode {
        Mode::Rgb => {
            let img: ImageBuffer<Rgb<u8>, Vec<u8>> =
                ImageBuffer::from_fn(w, h, |x, y| Rgb(rgb[(y * w + x) as usize].map(to_u8)));
            write_image(&img, p.jpeg_quality, &mut cursor).map_err(err)?
        }
        Mode::Gray => {
            let img: ImageBuffer<Luma<u8>, Vec<u8>> = ImageBuffer::from_fn(w, h, |x, y| {
                let c = rgb[(y * w + x) as usize];
                Luma([to_u8(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])])
            });
            write_image(&img, p.jpeg_quality, &mut cursor).map_err(err)?
        }
        Mode::Rgba => {
            let img: ImageBuffer<Rgba<u8>, Vec<u8>> = ImageBuffer::from_fn(w, h, |x, y| {
                let i = (y * w + x) as usize;
                let c = rgb[i].map(to_u8);
                Rgba([c[0], c[1], c[2], to_u8(alpha[i] * 255.0)])
            });
            write_image(&img, None, &mut cursor).map_err(err)?
        }
    };
    Ok((out, ext))
}

fn write_image<P, W>(
    img: &ImageBuffer<P, Vec<u8>>,
    jpeg_quality: Option<u8>,
    out: &mut W,
) -> image::ImageResult<&'static str>
where
    P: image::Pixel<Subpixel = u8> + image::PixelWithColorType,
    W: std::io::Write,
{
    use image::ImageEncoder;
    match jpeg_quality {
        Some(q) => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(out, q).write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                P::COLOR_TYPE,
            )?;
            Ok("jpg")
        }
        None => {
            image::codecs::png::PngEncoder::new(out).write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                P::COLOR_TYPE,
            )?;
            Ok("png")
        }
    }
}

fn captions(p: &Plan) -> Vec<String> {
    let gray = p.mode == Mode::Gray;
    let describe = |s: &Shape| {
        let size = if s.large { "large" } else { "small" };
        if gray {
            format!("{size} {}", CLASSES[s.class])
        } else {
            format!("{size} {} {}", COLORS[s.color].0, CLASSES[s.class])
        }
    };
    let bg = if p.mode == Mode::Rgba {
        "transparent".to_string()
    } else {
        p.background.word().to_string()
    };
    let main = &p.shapes[0];
    let mut out = Vec::new();
    let first = match (p.relation, p.shapes.get(1)) {
        (Some(rel), Some(other)) => format!("a {} {rel} a {} on a {bg} background", describe(main), describe(other)),
        _ => format!("a {} on a {bg} background", describe(main)),
    };
    out.push(first);
    let lead = if gray {
        "a black and white picture of"
    } else {
        "a picture of"
    };
    out.push(format!(
        "{lead} a {} {}",
        CLASSES[main.class],
        if main.large {
            "that fills much of the frame"
        } else {
            "drawn small"
        }
    ));
    if let Some(other) = p.shapes.get(1) {
        out.push(format!("a {} and a {}", CLASSES[main.class], CLASSES[other.class]));
    }
    out
}

/// A PNG whose IHDR claims `w`x`h` pixels, with a valid CRC but no real pixel data.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// CRC-32 (IEEE), as PNG chunks use.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

struct Generated {
    rel_path: String,
    key: String,
    class: usize,
    bytes: Vec<u8>,
    ext: &'static str,
    captions: Vec<String>,
}

/// Writes the demo corpus into `out` (which must not exist, or hold a complete corpus of the same
/// configuration, in which case nothing is written). The corpus is assembled in a temporary sibling directory
/// and renamed into place, so `out` is never half-written.
///
/// `progress` is called with the number of images just written (for progress bars).
pub fn write_demo_corpus(out: &Path, config: &DemoConfig, progress: &dyn Fn(u64)) -> Result<DemoSummary> {
    if out.exists() {
        let marker = out.join("demo.json");
        if let Ok(bytes) = fs::read(&marker) {
            if let Ok(existing) = serde_json::from_slice::<DemoSummary>(&bytes) {
                if existing.config == *config && existing.version == DEMO_VERSION {
                    return Ok(existing);
                }
            }
        }
        return Err(Error::Config {
            option: "--out".into(),
            reason: format!(
                "{} already exists and is not a demo corpus with these settings; remove it or choose another directory",
                out.display()
            ),
        });
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).at(parent)?;
    let tmp = crate::fsutil::temp_sibling(out);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    let result = write_into(&tmp, config, progress);
    match result {
        Ok(summary) => {
            fs::rename(&tmp, out).at(out)?;
            sync_dir(parent);
            Ok(summary)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_into(root: &Path, config: &DemoConfig, progress: &dyn Fn(u64)) -> Result<DemoSummary> {
    let images_dir = root.join("images");
    for class in CLASSES {
        let d = images_dir.join(class);
        fs::create_dir_all(&d).at(&d)?;
    }
    for d in ["captions", "shards"] {
        fs::create_dir_all(root.join(d)).at(root.join(d))?;
    }

    // Images are drawn in parallel, each from its own keyed random stream, and written in index order: the
    // bytes do not depend on the thread count.
    let mut generated = Vec::with_capacity(config.images);
    let indices: Vec<usize> = (0..config.images).collect();
    for chunk in indices.chunks(64) {
        let drawn: Vec<Result<Generated>> = chunk
            .par_iter()
            .map(|&index| {
                let p = plan(config.seed, index);
                let class = p.shapes[0].class;
                let key = format!("demo_{index:05}");
                let placeholder = PathBuf::from(format!("images/{}/{key}", CLASSES[class]));
                let (bytes, ext) = encode(&p, &placeholder)?;
                Ok(Generated {
                    rel_path: format!("{}/{key}.{ext}", CLASSES[class]),
                    key,
                    class,
                    bytes,
                    ext,
                    captions: captions(&p),
                })
            })
            .collect();
        for g in drawn {
            let g = g?;
            let path = images_dir.join(&g.rel_path);
            fs::write(&path, &g.bytes).at(&path)?;
            progress(1);
            generated.push(g);
        }
    }

    // Bad inputs.
    let mut bad = Vec::new();
    let mut put_bad = |rel: &str, bytes: &[u8], reason: &str, what: &str| -> Result<()> {
        let path = images_dir.join(rel);
        fs::write(&path, bytes).at(&path)?;
        bad.push(BadInput {
            path: format!("images/{rel}"),
            reason: reason.into(),
            what: what.into(),
        });
        Ok(())
    };
    put_bad("circle/bad_empty.jpg", &[], "empty", "zero-byte file")?;
    let jpeg = generated.iter().find(|g| g.ext == "jpg").map(|g| g.bytes.clone());
    let truncated = match jpeg {
        Some(b) => b[..b.len() * 3 / 5].to_vec(),
        None => b"\xFF\xD8\xFF\xE0".to_vec(),
    };
    put_bad(
        "square/bad_truncated.jpg",
        &truncated,
        "corrupt",
        "JPEG cut off after 60% of its bytes",
    )?;
    put_bad(
        "triangle/bad_text.png",
        b"this is a text file pretending to be a PNG image\n",
        "unsupported-format",
        "text file named .png",
    )?;
    put_bad(
        "cross/bad_huge.png",
        &png_header_only(100_000, 100_000),
        "too-large",
        "PNG header claiming 100000x100000 pixels",
    )?;
    let tiny = plan(config.seed, usize::MAX);
    let tiny = Plan {
        width: 12,
        height: 12,
        shapes: Vec::new(),
        jpeg_quality: None,
        mode: Mode::Rgb,
        ..tiny
    };
    put_bad(
        "ring/bad_tiny.png",
        &encode(&tiny, Path::new("ring/bad_tiny.png"))?.0,
        "too-small",
        "12x12 pixels",
    )?;
    let sliver = Plan {
        width: 1200,
        height: 40,
        ..tiny
    };
    put_bad(
        "diamond/bad_sliver.png",
        &encode(&sliver, Path::new("diamond/bad_sliver.png"))?.0,
        "extreme-aspect",
        "1200x40 pixels (aspect ratio 30)",
    )?;
    if let Some(first) = generated.first() {
        let dup = format!("{}/copy_of_{}.{}", CLASSES[first.class], first.key, first.ext);
        put_bad(
            &dup,
            &first.bytes,
            "duplicate",
            &format!("byte-identical copy of images/{}", first.rel_path),
        )?;
    }
    let missing = ["circle/demo_99998.jpg", "square/demo_99999.png"];
    for m in missing {
        bad.push(BadInput {
            path: format!("images/{m}"),
            reason: "missing-image".into(),
            what: "caption rows (in every caption set) for an image that does not exist".into(),
        });
    }

    // Caption sets.
    let mut coco_images = Vec::new();
    let mut coco_annotations = Vec::new();
    let mut jsonl = String::new();
    let mut tsv = String::from("caption\tpath\n");
    let mut n_captions = 0usize;
    let all = generated
        .iter()
        .map(|g| (g.rel_path.clone(), g.captions.clone()))
        .chain(
            missing
                .iter()
                .map(|m| (m.to_string(), vec![format!("a caption for {m}, which does not exist")])),
        );
    for (id, (rel, caps)) in all.enumerate() {
        coco_images.push(serde_json::json!({"id": id, "file_name": rel}));
        for c in &caps {
            coco_annotations.push(serde_json::json!({"id": coco_annotations.len(), "image_id": id, "caption": c}));
            tsv.push_str(&format!("{c}\t{rel}\n"));
        }
        jsonl.push_str(&serde_json::json!({"image": rel, "captions": caps}).to_string());
        jsonl.push('\n');
        if id < generated.len() {
            n_captions += caps.len();
        }
    }
    let coco = serde_json::json!({
        "info": {"description": "imglish demo corpus", "version": DEMO_VERSION},
        "images": coco_images,
        "annotations": coco_annotations,
    });
    let captions_dir = root.join("captions");
    write_atomic(&captions_dir.join("coco_captions.json"), coco.to_string().as_bytes())?;
    write_atomic(&captions_dir.join("captions.jsonl"), jsonl.as_bytes())?;
    write_atomic(&captions_dir.join("captions.tsv"), tsv.as_bytes())?;

    // WebDataset tar shards.
    let shards_dir = root.join("shards");
    let mut shards = 0;
    for (i, chunk) in generated.chunks(config.shard_samples.max(1)).enumerate() {
        let path = shards_dir.join(format!("demo-{i:05}.tar"));
        let mut builder = tar::Builder::new(Vec::new());
        for g in chunk {
            let io = |r: std::io::Result<()>| r.at(&path);
            io(crate::sources::tar_append(
                &mut builder,
                &format!("{}.{}", g.key, g.ext),
                &g.bytes,
            ))?;
            io(crate::sources::tar_append(
                &mut builder,
                &format!("{}.txt", g.key),
                g.captions[0].as_bytes(),
            ))?;
            io(crate::sources::tar_append(
                &mut builder,
                &format!("{}.cls", g.key),
                g.class.to_string().as_bytes(),
            ))?;
        }
        let bytes = builder.into_inner().at(&path)?;
        write_atomic(&path, &bytes)?;
        shards += 1;
    }

    let summary = DemoSummary {
        version: DEMO_VERSION,
        config: config.clone(),
        images: generated.len(),
        captions: n_captions,
        shards,
        classes: CLASSES.iter().map(|s| s.to_string()).collect(),
        bad_inputs: bad,
    };
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Io {
        path: root.join("demo.json"),
        source: e.into(),
    })?;
    write_atomic(&root.join("demo.json"), &json)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn shapes_cover_their_centre_and_not_far_away() {
        for (class, name) in CLASSES.iter().enumerate() {
            let s = Shape {
                class,
                color: 0,
                large: true,
                cx: 50.0,
                cy: 50.0,
                r: 20.0,
            };
            let centre = if *name == "ring" {
                s.sdf(50.0 + 14.4, 50.0)
            } else {
                s.sdf(50.0, 50.0)
            };
            assert!(centre < 0.0, "{name}");
            assert!(s.sdf(95.0, 95.0) > 0.0, "{name}");
        }
    }
}
