//! Cheap, complete validation of one image's bytes: format sniffed from the bytes (never the extension), header
//! dimensions read without decoding pixels, limits, truncation checks, and optionally a full decode.

use std::io::Cursor;

use image::{ImageFormat, ImageReader};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a sample was rejected. The string forms are the stable reason codes written to `rejects.parquet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The file could not be read.
    Unreadable,
    /// Zero bytes.
    Empty,
    /// Not an image format imglish decodes.
    UnsupportedFormat,
    /// The header or the pixel data is broken (including truncated files).
    Corrupt,
    /// More pixels than `--max-pixels`, or a larger file than `--max-bytes`.
    TooLarge,
    /// A side shorter than `--min-side`.
    TooSmall,
    /// Aspect ratio beyond `--max-aspect`.
    ExtremeAspect,
    /// Byte-identical to a sample with a smaller `sample_id`.
    Duplicate,
    /// An archive member name that is absolute or climbs out with `..`.
    UnsafePath,
    /// A caption row whose image does not exist in any source.
    MissingImage,
    /// No caption, with `--require-captions`.
    MissingCaption,
    /// A malformed row in a caption set or a Parquet source.
    BadRecord,
}

impl Reason {
    /// The stable reason code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Unreadable => "unreadable",
            Reason::Empty => "empty",
            Reason::UnsupportedFormat => "unsupported-format",
            Reason::Corrupt => "corrupt",
            Reason::TooLarge => "too-large",
            Reason::TooSmall => "too-small",
            Reason::ExtremeAspect => "extreme-aspect",
            Reason::Duplicate => "duplicate",
            Reason::UnsafePath => "unsafe-path",
            Reason::MissingImage => "missing-image",
            Reason::MissingCaption => "missing-caption",
            Reason::BadRecord => "bad-record",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// A reject reason with a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reason code.
    pub reason: Reason,
    /// What exactly is wrong.
    pub message: String,
}

impl Rejection {
    pub(crate) fn new(reason: Reason, message: impl Into<String>) -> Self {
        Rejection {
            reason,
            message: message.into(),
        }
    }
}

/// Limits applied at validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValidationLimits {
    /// Maximum width × height (default 178956970, Pillow's decompression-bomb limit).
    pub max_pixels: u64,
    /// Minimum length of the shorter side (default 32).
    pub min_side: u32,
    /// Maximum long side / short side (default 10).
    pub max_aspect: f64,
    /// Maximum file size in bytes (default 256 MiB).
    pub max_bytes: u64,
    /// Decode every image fully to catch corrupt pixel data.
    pub full_decode: bool,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            max_pixels: 178_956_970,
            min_side: 32,
            max_aspect: 10.0,
            max_bytes: 256 << 20,
            full_decode: false,
        }
    }
}

/// What validation learns about an accepted image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `jpeg`, `png`, `webp`, `gif`, `bmp` or `tiff`.
    pub format: &'static str,
    /// Width in pixels (as stored, before EXIF orientation).
    pub width: u32,
    /// Height in pixels (as stored).
    pub height: u32,
    /// sha256 of the bytes, hex.
    pub content_hash: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The formats imglish accepts, by the name stored in the manifest.
pub(crate) fn format_name(f: ImageFormat) -> Option<&'static str> {
    match f {
        ImageFormat::Jpeg => Some("jpeg"),
        ImageFormat::Png => Some("png"),
        ImageFormat::WebP => Some("webp"),
        ImageFormat::Gif => Some("gif"),
        ImageFormat::Bmp => Some("bmp"),
        ImageFormat::Tiff => Some("tiff"),
        _ => None,
    }
}

fn sniff(bytes: &[u8]) -> Result<(ImageFormat, &'static str), Rejection> {
    match image::guess_format(bytes) {
        Ok(f) => match format_name(f) {
            Some(name) => Ok((f, name)),
            None => Err(Rejection::new(
                Reason::UnsupportedFormat,
                format!("{f:?} images are not supported (jpeg, png, webp, gif, bmp, tiff are)"),
            )),
        },
        Err(_) => {
            let head: String = bytes
                .iter()
                .take(8)
                .map(|b| if b.is_ascii_graphic() { *b as char } else { '.' })
                .collect();
            Err(Rejection::new(
                Reason::UnsupportedFormat,
                format!("not a recognised image format (first bytes: \"{head}\")"),
            ))
        }
    }
}

/// Truncation checks that need no decoding: a JPEG must end with its end-of-image marker, a PNG with IEND.
fn check_trailer(format: ImageFormat, bytes: &[u8]) -> Result<(), Rejection> {
    match format {
        ImageFormat::Jpeg => {
            // Allow padding after EOI, as many writers add some.
            let tail = &bytes[bytes.len().saturating_sub(64)..];
            if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
                return Err(Rejection::new(
                    Reason::Corrupt,
                    "truncated JPEG: no end-of-image marker at the end of the file",
                ));
            }
        }
        ImageFormat::Png => {
            let tail = &bytes[bytes.len().saturating_sub(64)..];
            if !tail.windows(4).any(|w| w == b"IEND") {
                return Err(Rejection::new(
                    Reason::Corrupt,
                    "truncated PNG: no IEND chunk at the end of the file",
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Validates one image's bytes against `limits`. Never panics and never allocates pixel buffers unless
/// `limits.full_decode` is set (and then only within the limits).
pub fn validate_bytes(bytes: &[u8], limits: &ValidationLimits) -> Result<ImageInfo, Rejection> {
    validate_hashed(bytes, limits, None)
}

/// [`validate_bytes`] for a caller that has already computed the sha256 `digest` of `bytes`.
pub(crate) fn validate_hashed(
    bytes: &[u8],
    limits: &ValidationLimits,
    digest: Option<&[u8; 32]>,
) -> Result<ImageInfo, Rejection> {
    if bytes.is_empty() {
        return Err(Rejection::new(Reason::Empty, "zero-byte file"));
    }
    if bytes.len() as u64 > limits.max_bytes {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("{} bytes exceeds the limit of {} bytes", bytes.len(), limits.max_bytes),
        ));
    }
    let (format, name) = sniff(bytes)?;
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| Rejection::new(Reason::Corrupt, format!("unreadable {name} header: {e}")))?;
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!(
                "{width}x{height} = {pixels} pixels exceeds --max-pixels {}",
                limits.max_pixels
            ),
        ));
    }
    let (short, long) = (width.min(height), width.max(height));
    if short < limits.min_side {
        return Err(Rejection::new(
            Reason::TooSmall,
            format!(
                "{width}x{height}: shorter side {short} is below --min-side {}",
                limits.min_side
            ),
        ));
    }
    let aspect = long as f64 / short as f64;
    if aspect > limits.max_aspect {
        return Err(Rejection::new(
            Reason::ExtremeAspect,
            format!(
                "{width}x{height}: aspect ratio {aspect:.1} exceeds --max-aspect {}",
                limits.max_aspect
            ),
        ));
    }
    check_trailer(format, bytes)?;
    if limits.full_decode {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        reader.limits(decode_limits(limits));
        reader
            .decode()
            .map_err(|e| Rejection::new(Reason::Corrupt, format!("{name} decode failed: {e}")))?;
    }
    Ok(ImageInfo {
        format: name,
        width,
        height,
        content_hash: match digest {
            Some(d) => hex(d),
            None => hex(&Sha256::digest(bytes)),
        },
        bytes: bytes.len() as u64,
    })
}

/// The decode-time size check (the same rule as at ingest, shorter message): a reject before any pixel buffer
/// is allocated when `width x height` is over `limits.max_pixels`.
pub(crate) fn check_pixels(width: u32, height: u32, limits: &ValidationLimits) -> Result<(), Rejection> {
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("{width}x{height} exceeds --max-pixels"),
        ));
    }
    Ok(())
}

/// Decoder limits derived from the validation limits (checked before any pixel buffer is allocated).
pub(crate) fn decode_limits(limits: &ValidationLimits) -> image::Limits {
    let mut l = image::Limits::default();
    let side = limits.max_pixels.min(u32::MAX as u64) as u32;
    l.max_image_width = Some(side);
    l.max_image_height = Some(side);
    // RGBA16 is the largest common decoded layout: 8 bytes per pixel, plus headroom.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    l
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .expect("encode");
        out
    }

    #[test]
    fn reasons_for_each_kind_of_bad_input() {
        let l = ValidationLimits::default();
        let code = |b: &[u8]| validate_bytes(b, &l).map(|_| ()).map_err(|r| r.reason);
        assert_eq!(code(&[]), Err(Reason::Empty));
        assert_eq!(code(b"hello world, not an image"), Err(Reason::UnsupportedFormat));
        assert_eq!(code(&png(8, 8)), Err(Reason::TooSmall));
        assert_eq!(code(&png(700, 40)), Err(Reason::ExtremeAspect));
        let good = png(64, 48);
        assert_eq!(code(&good), Ok(()));
        assert_eq!(code(&good[..good.len() - 12]), Err(Reason::Corrupt));
        let info = validate_bytes(&good, &l).expect("valid");
        assert_eq!((info.format, info.width, info.height), ("png", 64, 48));
        assert_eq!(info.content_hash.len(), 64);
    }

    #[test]
    fn messages_are_specific() {
        let l = ValidationLimits::default();
        let err = validate_bytes(b"GIF89a", &l).expect_err("truncated gif header");
        assert_eq!(err.reason, Reason::Corrupt);
        let err = validate_bytes(&png(8, 8), &l).expect_err("small");
        assert_eq!(err.message, "8x8: shorter side 8 is below --min-side 32");
    }
}
