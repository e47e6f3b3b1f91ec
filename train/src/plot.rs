//! `loss.png`: train (blue) and validation (red, with dots) loss against steps, drawn from `metrics.jsonl` with
//! no font or plotting dependency: a title, axis names, a legend and the axis extremes in a built-in 3x5 font.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Result, TrainError};

const W: u32 = 800;
const H: u32 = 480;
const MARGIN: i64 = 50;
const TRAIN: Rgb<u8> = Rgb([31, 119, 180]);
const VAL: Rgb<u8> = Rgb([214, 39, 40]);

/// Draws the curves of `metrics` (JSON lines with `kind`, `step`, `loss`) into `png`.
pub fn plot_losses(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    let mut train = Vec::new();
    let mut val = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(step), Some(loss)) = (v["step"].as_f64(), v["loss"].as_f64()) else {
            continue;
        };
        match v["kind"].as_str() {
            Some("train") => train.push((step, loss)),
            Some("val") => val.push((step, loss)),
            _ => {}
        }
    }
    let img = render(&train, &val);
    let tmp = png.with_extension("tmp.png");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| TrainError::Config(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, png).map_err(crate::error::io_err(png))
}

fn render(train: &[(f64, f64)], val: &[(f64, f64)]) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let all: Vec<(f64, f64)> = train.iter().chain(val).copied().filter(|p| p.1.is_finite()).collect();
    let grey = Rgb([90, 90, 90]);
    let (x0, y0, x1, y1) = (MARGIN, MARGIN, W as i64 - MARGIN / 2, H as i64 - MARGIN);
    let black = Rgb([20, 20, 20]);
    text(&mut img, x0, 8, "LOSS (METRICS.JSONL): TRAIN AND VALIDATION", black);
    text(&mut img, 4, y0 - 18, "LOSS", grey);
    text(&mut img, (x0 + x1) / 2 - 16, y1 + 24, "STEP", grey);
    let legend = x1 - 200;
    line(&mut img, (legend, 34), (legend + 24, 34), TRAIN);
    text(&mut img, legend + 32, 30, "TRAIN", grey);
    for dx in -2..=2 {
        for dy in -2..=2 {
            put(&mut img, legend + 100 + dx, 34 + dy, VAL);
        }
    }
    text(&mut img, legend + 112, 30, "VALIDATION", grey);
    line(&mut img, (x0, y1), (x1, y1), grey);
    line(&mut img, (x0, y0), (x0, y1), grey);
    if all.is_empty() {
        return img;
    }
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let (mut lo, mut hi) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let map = |(s, l): (f64, f64)| {
        let x = x0 + ((s / xmax) * (x1 - x0) as f64).round() as i64;
        let y = y1 - (((l - lo) / (hi - lo)) * (y1 - y0) as f64).round() as i64;
        (x, y)
    };
    for (series, colour, dots) in [(train, TRAIN, false), (val, VAL, true)] {
        let pts: Vec<(i64, i64)> = series.iter().copied().filter(|p| p.1.is_finite()).map(map).collect();
        for w in pts.windows(2) {
            line(&mut img, w[0], w[1], colour);
        }
        if dots {
            for &(x, y) in &pts {
                for dx in -2..=2 {
                    for dy in -2..=2 {
                        put(&mut img, x + dx, y + dy, colour);
                    }
                }
            }
        }
    }
    text(&mut img, 4, y0, &format!("{hi:.2}"), grey);
    text(&mut img, 4, y1 - 10, &format!("{lo:.2}"), grey);
    text(&mut img, x0, y1 + 8, "0", grey);
    let label = format!("{}", xmax as u64);
    text(&mut img, x1 - 8 * label.len() as i64, y1 + 8, &label, grey);
    img
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Bresenham, two pixels thick.
fn line(img: &mut RgbImage, (mut x, mut y): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
    let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x, y, c);
        put(img, x, y + 1, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Digits, capital letters (lower case is drawn as capitals) and `.-:()/,` in a 3x5 font drawn at 2x; other
/// characters are spaces.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    const GLYPHS: [(char, [u8; 5]); 44] = [
        ('A', [2, 5, 7, 5, 5]),
        ('B', [6, 5, 6, 5, 6]),
        ('C', [3, 4, 4, 4, 3]),
        ('D', [6, 5, 5, 5, 6]),
        ('E', [7, 4, 6, 4, 7]),
        ('F', [7, 4, 6, 4, 4]),
        ('G', [3, 4, 5, 5, 3]),
        ('H', [5, 5, 7, 5, 5]),
        ('I', [7, 2, 2, 2, 7]),
        ('J', [1, 1, 1, 5, 2]),
        ('K', [5, 5, 6, 5, 5]),
        ('L', [4, 4, 4, 4, 7]),
        ('M', [5, 7, 7, 5, 5]),
        ('N', [6, 5, 5, 5, 5]),
        ('O', [2, 5, 5, 5, 2]),
        ('P', [6, 5, 6, 4, 4]),
        ('Q', [2, 5, 5, 6, 3]),
        ('R', [6, 5, 6, 5, 5]),
        ('S', [3, 4, 2, 1, 6]),
        ('T', [7, 2, 2, 2, 2]),
        ('U', [5, 5, 5, 5, 7]),
        ('V', [5, 5, 5, 5, 2]),
        ('W', [5, 5, 7, 7, 5]),
        ('X', [5, 5, 2, 5, 5]),
        ('Y', [5, 5, 2, 2, 2]),
        ('Z', [7, 1, 2, 4, 7]),
        (':', [0, 2, 0, 2, 0]),
        ('(', [1, 2, 2, 2, 1]),
        (')', [4, 2, 2, 2, 4]),
        ('/', [1, 1, 2, 4, 4]),
        (',', [0, 0, 0, 2, 4]),
        ('+', [0, 2, 7, 2, 0]),
        ('0', [7, 5, 5, 5, 7]),
        ('1', [2, 6, 2, 2, 7]),
        ('2', [7, 1, 7, 4, 7]),
        ('3', [7, 1, 7, 1, 7]),
        ('4', [5, 5, 7, 1, 1]),
        ('5', [7, 4, 7, 1, 7]),
        ('6', [7, 4, 7, 5, 7]),
        ('7', [7, 1, 1, 1, 1]),
        ('8', [7, 5, 7, 5, 7]),
        ('9', [7, 5, 7, 1, 7]),
        ('.', [0, 0, 0, 0, 2]),
        ('-', [0, 0, 7, 0, 0]),
    ];
    for (i, ch) in s.chars().enumerate() {
        let ch = ch.to_ascii_uppercase();
        let Some((_, rows)) = GLYPHS.iter().find(|g| g.0 == ch) else {
            continue;
        };
        for (r, bits) in rows.iter().enumerate() {
            for b in 0..3 {
                if bits & (4 >> b) != 0 {
                    for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        put(img, x + i as i64 * 8 + b * 2 + ox, y + r as i64 * 2 + oy, c);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_both_curves() {
        let img = render(&[(1.0, 5.0), (2.0, 4.0), (3.0, 3.0)], &[(0.0, 5.5), (3.0, 3.2)]);
        let blue = img.pixels().filter(|p| **p == TRAIN).count();
        let red = img.pixels().filter(|p| **p == VAL).count();
        assert!(blue > 100 && red > 100, "{blue} {red}");
        // The title (the only near-black pixels) and the legend's samples are drawn even without data.
        let titled = |img: &RgbImage| img.pixels().filter(|p| **p == Rgb([20, 20, 20])).count();
        assert!(titled(&img) > 200, "title");
        // Nothing to draw: axes only, no panic.
        let empty = render(&[], &[]);
        assert_eq!(empty.dimensions(), (W, H));
        assert!(titled(&empty) > 200);
        assert!(empty.pixels().filter(|p| **p == TRAIN).count() >= 48, "legend");
        // The axis names: grey text left of the top of the y axis ("LOSS") and under the middle of the x axis
        // ("STEP").
        let grey_in = |img: &RgbImage, (xa, ya, xb, yb): (i64, i64, i64, i64)| {
            (xa..xb)
                .flat_map(|x| (ya..yb).map(move |y| (x, y)))
                .filter(|&(x, y)| *img.get_pixel(x as u32, y as u32) == Rgb([90, 90, 90]))
                .count()
        };
        let (x0, y0, x1, y1) = (MARGIN, MARGIN, W as i64 - MARGIN / 2, H as i64 - MARGIN);
        assert!(grey_in(&empty, (4, y0 - 18, 40, y0 - 8)) > 20, "y axis name");
        assert!(
            grey_in(&empty, ((x0 + x1) / 2 - 16, y1 + 24, (x0 + x1) / 2 + 16, y1 + 34)) > 20,
            "x axis name"
        );
    }
}
