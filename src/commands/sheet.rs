//! `imglish inspect --sample ID --png OUT`: one sample drawn as an image, a column per stored view: the view
//! rendered from the stored working image (when the dataset keeps pixels), its token grid below it, one flat
//! colour per code (the same code is the same colour in every view and every sample), and, when the tokenizer has
//! a decoder, the decoder's reconstruction of the view from its tokens at the bottom.

use image::{Rgb, RgbImage};
use imglish_ingest::{decode_rgb, mix64, render_view, DecodeOptions, Filter, Resizer, ViewParams};
use imglish_pack::TokenRecord;

/// Outer margin and gap between panels, in pixels.
const GAP: u32 = 8;
/// Background of the sheet.
const BACKGROUND: Rgb<u8> = Rgb([32, 32, 32]);

/// The colour a visual code is drawn in: a hash of the id, kept away from black so cells stand out on the
/// background.
pub fn code_colour(code: u16) -> Rgb<u8> {
    let h = mix64(u64::from(code) ^ 0x636f_6465);
    let channel = |shift: u32| 48 + ((h >> shift) & 0xff) as u8 % 208;
    Rgb([channel(0), channel(8), channel(16)])
}

/// What [`render`] drew.
pub struct Sheet {
    /// The picture.
    pub image: RgbImage,
    /// Whether the views' pixels are in it (false when the dataset was packed without `--include-pixels`).
    pub has_pixels: bool,
}

/// Draws `record`'s views (`grid` = [rows, columns] of tokens per view). A view panel is `cell * columns`
/// pixels wide with `cell` chosen so the panel is about 224 pixels; the stored pixels, if any, are decoded once
/// and each view is cut from them with its crop box and flip, exactly as the trainer does. `reconstructions`
/// (one per view, or none) are drawn in a last row, scaled to the panel.
pub fn render(record: &TokenRecord, grid: [u32; 2], reconstructions: &[RgbImage]) -> Result<Sheet, String> {
    let [gh, gw] = grid;
    if gh == 0 || gw == 0 {
        return Err(format!("the dataset's token grid {gh}x{gw} is empty"));
    }
    let cell = (224 / gh.max(gw)).max(1);
    let (pw, ph) = (cell * gw, cell * gh);
    let decoded = match &record.pixels {
        Some(bytes) => Some(
            decode_rgb(bytes, &DecodeOptions::default(), 1.0)
                .map_err(|r| format!("its stored pixels do not decode: {}", r.message))?,
        ),
        None => None,
    };
    let views = record.views.len() as u32;
    if !reconstructions.is_empty() && reconstructions.len() != record.views.len() {
        return Err(format!(
            "{} reconstructions for {} views",
            reconstructions.len(),
            record.views.len()
        ));
    }
    let rows = 1 + u32::from(decoded.is_some()) + u32::from(!reconstructions.is_empty());
    let width = GAP + views * (pw + GAP);
    let height = GAP + rows * (ph + GAP);
    let mut image = RgbImage::from_pixel(width.max(1), height, BACKGROUND);
    let mut resizer = Resizer::new();
    for (i, view) in record.views.iter().enumerate() {
        let x0 = GAP + i as u32 * (pw + GAP);
        let mut y0 = GAP;
        if let Some(decoded) = &decoded {
            let params = ViewParams {
                crop: view.crop,
                flip: view.flip,
            };
            // Square render at the panel width, then scaled to the panel's height if the grid is not square.
            let rendered = render_view(decoded, &params, pw, Filter::Bicubic, &mut resizer);
            let rendered = if ph == pw {
                rendered
            } else {
                image::imageops::resize(&rendered, pw, ph, image::imageops::FilterType::Triangle)
            };
            image::imageops::replace(&mut image, &rendered, i64::from(x0), i64::from(y0));
            y0 += ph + GAP;
        }
        if view.tokens.len() != (gh * gw) as usize {
            return Err(format!(
                "view {i} has {} tokens, the grid is {gh}x{gw}",
                view.tokens.len()
            ));
        }
        for (t, &code) in view.tokens.iter().enumerate() {
            let (r, c) = (t as u32 / gw, t as u32 % gw);
            let colour = code_colour(code);
            for y in 0..cell {
                for x in 0..cell {
                    image.put_pixel(x0 + c * cell + x, y0 + r * cell + y, colour);
                }
            }
        }
        if let Some(rec) = reconstructions.get(i) {
            let scaled = image::imageops::resize(rec, pw, ph, image::imageops::FilterType::Triangle);
            image::imageops::replace(&mut image, &scaled, i64::from(x0), i64::from(y0 + ph + GAP));
        }
    }
    Ok(Sheet {
        image,
        has_pixels: decoded.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use imglish_pack::{Split, ViewRecord};

    fn record(pixels: Option<Vec<u8>>) -> TokenRecord {
        TokenRecord {
            sample_id: 1,
            views: vec![
                ViewRecord {
                    crop: [0, 0, 64, 32],
                    flip: false,
                    tokens: vec![1, 2, 3, 1],
                },
                ViewRecord {
                    crop: [0, 0, 64, 32],
                    flip: true,
                    tokens: vec![3, 3, 2, 1],
                },
            ],
            captions: vec![],
            label: None,
            split: Split::Train,
            pixels,
        }
    }

    #[test]
    fn token_panels_and_pixel_panels() {
        let sheet = render(&record(None), [2, 2], &[]).expect("render");
        assert!(!sheet.has_pixels);
        // 2x2 grid: cells of 112, panels of 224, two views side by side.
        assert_eq!(sheet.image.dimensions(), (8 + 2 * (224 + 8), 8 + 224 + 8));
        let at = |x: u32, y: u32| *sheet.image.get_pixel(x, y);
        assert_eq!(at(8 + 50, 8 + 50), code_colour(1));
        assert_eq!(at(8 + 112 + 50, 8 + 50), code_colour(2));
        assert_eq!(at(8 + 232 + 50, 8 + 112 + 50), code_colour(2));
        assert_eq!(at(8 + 232 + 200, 8 + 200), code_colour(1));
        assert_ne!(code_colour(1), code_colour(2));

        // Left half red, right half blue: view 0 starts red, the mirrored view 1 starts blue.
        let img = RgbImage::from_fn(64, 32, |x, _| if x < 32 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        let sheet = render(&record(Some(png)), [2, 2], &[]).expect("render");
        assert!(sheet.has_pixels);
        assert_eq!(sheet.image.dimensions(), (8 + 2 * (224 + 8), 8 + 2 * (224 + 8)));
        let at = |x: u32, y: u32| *sheet.image.get_pixel(x, y);
        assert_eq!(at(8 + 10, 8 + 100), Rgb([255, 0, 0]));
        assert_eq!(at(8 + 214, 8 + 100), Rgb([0, 0, 255]));
        assert_eq!(at(8 + 232 + 10, 8 + 100), Rgb([0, 0, 255]));
        assert_eq!(at(8 + 50, 8 + 232 + 50), code_colour(1));

        // Reconstructions: a third row, each scaled to its panel.
        let green = RgbImage::from_pixel(16, 16, Rgb([0, 200, 0]));
        let grey = RgbImage::from_pixel(16, 16, Rgb([90, 90, 90]));
        let sheet = render(&record(None), [2, 2], &[green.clone(), grey]).expect("render");
        assert_eq!(sheet.image.dimensions(), (8 + 2 * (224 + 8), 8 + 2 * (224 + 8)));
        assert_eq!(*sheet.image.get_pixel(8 + 100, 8 + 232 + 100), Rgb([0, 200, 0]));
        assert_eq!(*sheet.image.get_pixel(8 + 232 + 100, 8 + 232 + 100), Rgb([90, 90, 90]));
        let err = render(&record(None), [2, 2], &[green]).err().expect("error");
        assert_eq!(err, "1 reconstructions for 2 views");
    }

    #[test]
    fn a_wrong_token_count_is_an_error() {
        let err = render(&record(None), [3, 3], &[]).err().expect("error");
        assert_eq!(err, "view 0 has 4 tokens, the grid is 3x3");
        let err = render(&record(Some(b"not an image".to_vec())), [2, 2], &[])
            .err()
            .expect("error");
        assert!(err.starts_with("its stored pixels do not decode: "), "{err}");
    }
}
