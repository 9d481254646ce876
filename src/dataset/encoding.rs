//! How a changed image is written back into a release that keeps its input's files: in the
//! format its original had, so that the poisoned samples do not stand out by their encoding.
//!
//! A JPEG is re-encoded as JPEG at the quality its original was saved with, read from its
//! luminance quantisation table (the IJG scaling that libjpeg, Pillow and most cameras' software
//! use), but never below [`MIN_JPEG_QUALITY`], where the shipped triggers were measured to
//! survive (docs/formats.md); a WebP becomes a lossless WebP; anything else (PNG, BMP) becomes
//! PNG, which is lossless.

use super::ImageShape;
use image::ImageEncoder;
use image::codecs::webp::WebPEncoder;

/// The lowest quality a poisoned JPEG is re-encoded at (its original's when higher): the
/// shipped BadNets-square and Blended families were learnt from poisons encoded at 10, 30, 50, 75
/// and 95 alike (`scripts/jpeg-survival`), with their effect lowest at 10; a floor above an
/// original's quality would give the poisoned file away by its tables, so it stays low.
pub const MIN_JPEG_QUALITY: u8 = 30;

/// The quality assumed for a JPEG whose tables are not the IJG ones.
const DEFAULT_JPEG_QUALITY: u8 = 90;

/// The IJG (libjpeg) base luminance quantisation table, quality 50, in zigzag order as it is
/// stored in a file (ITU-T T.81, Annex K, table K.1).
const IJG_LUMINANCE: [u16; 64] = [
    16, 11, 12, 14, 12, 10, 16, 14, 13, 14, 18, 17, 16, 19, 24, 40, 26, 24, 22, 22, 24, 49, 35, 37,
    29, 40, 58, 51, 61, 60, 57, 51, 56, 55, 64, 72, 92, 78, 64, 68, 87, 69, 55, 56, 80, 109, 81,
    87, 95, 98, 103, 104, 103, 62, 77, 113, 121, 112, 100, 120, 92, 101, 103, 99,
];

/// The file format of encoded image bytes, from their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JPEG (`FF D8 FF`).
    Jpeg,
    /// WebP (`RIFF....WEBP`).
    Webp,
    /// Anything else; written back as PNG.
    Other,
}

impl Encoding {
    /// What `bytes` hold.
    pub fn of(bytes: &[u8]) -> Self {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Self::Jpeg
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Self::Webp
        } else {
            Self::Other
        }
    }
}

/// The IJG quality (1–100) a JPEG was saved with, estimated from its first luminance
/// quantisation table: libjpeg scales the base table by `5000/q` (q < 50) or `200 − 2q`
/// percent, so the table gives `q` back ([`closest_quality`]). `None` when the bytes hold no
/// 8-bit table 0 before the image data.
pub fn jpeg_quality(bytes: &[u8]) -> Option<u8> {
    jpeg_headers(bytes, &mut |marker, body| {
        if marker != 0xDB {
            return None;
        }
        let mut t = 0;
        while t < body.len() {
            let (precision, id) = (body[t] >> 4, body[t] & 0x0F);
            let size = if precision == 0 { 64 } else { 128 };
            let table = body.get(t + 1..t + 1 + size)?;
            if id == 0 && precision == 0 {
                return Some(closest_quality(table));
            }
            t += 1 + size;
        }
        None
    })
}

/// The chroma sampling of a colour JPEG (its first component's horizontal and vertical
/// factors: (2, 2) for 4:2:0, (1, 1) for 4:4:4), from its frame header.
pub fn jpeg_sampling(bytes: &[u8]) -> Option<(u8, u8)> {
    jpeg_headers(bytes, &mut |marker, body| {
        // Start of frame: C0–CF but C4 (Huffman tables), C8 (reserved), CC (arithmetic).
        let sof = (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker);
        if !sof || body.get(5).copied()? < 3 {
            return None;
        }
        let hv = *body.get(7)?;
        Some((hv >> 4, hv & 0x0F))
    })
}

/// Visits a JPEG's marker segments before its first scan, in order, with each one's marker
/// and body (after the length); the first `Some` that `visit` gives is the answer.
fn jpeg_headers<T>(bytes: &[u8], visit: &mut dyn FnMut(u8, &[u8]) -> Option<T>) -> Option<T> {
    if Encoding::of(bytes) != Encoding::Jpeg {
        return None;
    }
    let mut at = 2;
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            return None;
        }
        let marker = bytes[at + 1];
        // Fill bytes, then markers without a length.
        if marker == 0xFF {
            at += 1;
            continue;
        }
        if marker == 0xD8 || (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            at += 2;
            continue;
        }
        // The scan starts: nothing more to read before it.
        if marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        let end = at + 2 + len;
        if len < 2 || end > bytes.len() {
            return None;
        }
        if let Some(found) = visit(marker, &bytes[at + 4..end]) {
            return Some(found);
        }
        at = end;
    }
    None
}

/// The IJG quality whose scaled base table (clamped to 1–255, as libjpeg's baseline tables are)
/// is nearest to `table`: exact for files written by libjpeg and its descendants, the nearest
/// for others.
fn closest_quality(table: &[u8]) -> u8 {
    (1..=100u32)
        .min_by_key(|&q| {
            let scale = if q < 50 { 5000 / q } else { 200 - 2 * q };
            table
                .iter()
                .zip(IJG_LUMINANCE)
                .map(|(&v, b)| {
                    let want = ((u32::from(b) * scale + 50) / 100).clamp(1, 255);
                    want.abs_diff(u32::from(v))
                })
                .sum::<u32>()
        })
        .map_or(DEFAULT_JPEG_QUALITY, |q| q as u8)
}

/// `pixels` (HWC, `shape`) encoded as the release writes a changed image whose original bytes
/// were `original`: JPEG at the original's quality but at least `min_quality` (a release's
/// default is [`MIN_JPEG_QUALITY`]), lossless WebP, or PNG.
pub fn reencode_like(
    original: Option<&[u8]>,
    pixels: &[u8],
    shape: ImageShape,
    min_quality: u8,
) -> Result<Vec<u8>, image::ImageError> {
    let color = if shape.channels == 3 {
        image::ExtendedColorType::Rgb8
    } else {
        image::ExtendedColorType::L8
    };
    let (w, h) = (shape.width as u32, shape.height as u32);
    let mut out = Vec::new();
    match original.map(Encoding::of) {
        Some(Encoding::Jpeg) => {
            let q = original
                .and_then(jpeg_quality)
                .unwrap_or(DEFAULT_JPEG_QUALITY)
                .clamp(min_quality.clamp(1, 100), 100);
            encode_jpeg(&mut out, pixels, shape, q, original.and_then(jpeg_sampling))?;
        }
        Some(Encoding::Webp) => {
            WebPEncoder::new_lossless(&mut out).write_image(pixels, w, h, color)?;
        }
        _ => return super::folder::encode_png(pixels, shape),
    }
    Ok(out)
}

/// `pixels` (HWC, `shape`) as a baseline JPEG at IJG quality `q` (Annex K tables scaled as
/// libjpeg scales them, so a reader finds `q` again), with the chroma sampling `sampling`
/// (an original's; 4:2:0 when not known, libjpeg's and Pillow's default). The `jpeg-encoder`
/// crate, several times faster than the image crate's encoder.
fn encode_jpeg(
    out: &mut Vec<u8>,
    pixels: &[u8],
    shape: ImageShape,
    q: u8,
    sampling: Option<(u8, u8)>,
) -> Result<(), image::ImageError> {
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
    let fail = |e: jpeg_encoder::EncodingError| {
        image::ImageError::Encoding(image::error::EncodingError::new(
            image::ImageFormat::Jpeg.into(),
            e,
        ))
    };
    let side = |v: usize| {
        u16::try_from(v).map_err(|_| {
            image::ImageError::Limits(image::error::LimitError::from_kind(
                image::error::LimitErrorKind::DimensionError,
            ))
        })
    };
    let (w, h) = (side(shape.width)?, side(shape.height)?);
    let mut enc = Encoder::new(out, q);
    let factor = sampling
        .and_then(|(h, v)| SamplingFactor::from_factors(h, v))
        .unwrap_or(SamplingFactor::F_2_2);
    enc.set_sampling_factor(factor);
    let color = if shape.channels == 3 {
        ColorType::Rgb
    } else {
        ColorType::Luma
    };
    enc.encode(pixels, w, h, color).map_err(fail)
}

/// Changed images encoded lossily ahead of writing, by index: the sha256 of the pixels they
/// decode to, and their bytes.
pub type Settled = std::collections::HashMap<usize, ([u8; 32], Vec<u8>)>;

/// Encodes again, now, each changed image (its hash differs from `original_hashes`) whose
/// original was a JPEG ([`reencode_like`]), writes the pixels it decodes to into `dataset` and
/// their sha256 into `image_hashes`, and returns the bytes to write: a release then reads back
/// as `dataset` exactly, and the hashes of its record and manifest are of what a reader decodes.
/// Lossless encodings need no such step.
pub fn settle_lossy<'a>(
    dataset: &mut super::Dataset,
    image_hashes: &mut [[u8; 32]],
    original_hashes: &[[u8; 32]],
    original: &(dyn Fn(usize) -> Option<&'a [u8]> + Sync),
    min_quality: u8,
) -> Result<Settled, super::DatasetError> {
    use rayon::prelude::*;
    use sha2::{Digest, Sha256};
    let shape = dataset.shape();
    let changed: Vec<usize> = (0..dataset.len())
        .filter(|&i| {
            original_hashes
                .get(i)
                .is_some_and(|h| *h != image_hashes[i])
        })
        .filter(|&i| original(i).map(Encoding::of) == Some(Encoding::Jpeg))
        .collect();
    let ds = &*dataset;
    let done = changed
        .par_iter()
        .map(|&i| {
            let fail = |e: image::ImageError| {
                super::DatasetError::Invalid(format!("cannot encode image {i} again as JPEG: {e}"))
            };
            let bytes =
                reencode_like(original(i), ds.image(i), shape, min_quality).map_err(fail)?;
            let mut pixels = vec![0u8; shape.len()];
            super::folder::decode_into(
                &bytes,
                &super::Limits::default(),
                shape.channels,
                &mut pixels,
            )
            .map_err(fail)?;
            Ok((i, bytes, pixels))
        })
        .collect::<Result<Vec<_>, super::DatasetError>>()?;
    let mut settled = Settled::new();
    for (i, bytes, pixels) in done {
        let hash: [u8; 32] = Sha256::digest(&pixels).into();
        dataset.image_mut(i).copy_from_slice(&pixels);
        image_hashes[i] = hash;
        settled.insert(i, (hash, bytes));
    }
    Ok(settled)
}

/// The bytes a release writes for changed image `i`: those settled for it when its pixels are
/// still the ones settled, else `reencode_like`.
pub fn changed_bytes(
    settled: &Settled,
    i: usize,
    hash: &[u8; 32],
    original: Option<&[u8]>,
    pixels: &[u8],
    shape: ImageShape,
    min_quality: u8,
) -> Result<Vec<u8>, image::ImageError> {
    match settled.get(&i) {
        Some((h, bytes)) if h == hash => Ok(bytes.clone()),
        _ => reencode_like(original, pixels, shape, min_quality),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;

    fn shape() -> ImageShape {
        ImageShape {
            height: 24,
            width: 40,
            channels: 3,
        }
    }

    fn pixels() -> Vec<u8> {
        (0..shape().len()).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn jpeg(q: u8) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, q)
            .write_image(&pixels(), 40, 24, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    #[test]
    fn the_quality_of_a_jpeg_is_read_from_its_tables() {
        for q in [10, 30, 50, 75, 85, 90, 95, 100] {
            assert_eq!(jpeg_quality(&jpeg(q)), Some(q));
        }
        assert_eq!(jpeg_quality(b"\x89PNG\r\n\x1a\n"), None);
        // Truncated inside the table: no answer, no panic.
        let j = jpeg(80);
        for cut in [3, 6, 20, 40] {
            assert_eq!(jpeg_quality(&j[..cut]), None);
        }
    }

    #[test]
    fn a_changed_image_keeps_its_originals_format_and_quality() {
        // A JPEG at 90 stays a JPEG at 90, one at 40 at 40; one at 15 is raised to the floor.
        for (q, want) in [(90, 90), (40, 40), (15, MIN_JPEG_QUALITY)] {
            let out = reencode_like(Some(&jpeg(q)), &pixels(), shape(), MIN_JPEG_QUALITY).unwrap();
            assert_eq!(Encoding::of(&out), Encoding::Jpeg);
            assert_eq!(jpeg_quality(&out), Some(want));
        }
        let mut webp = Vec::new();
        WebPEncoder::new_lossless(&mut webp)
            .write_image(&pixels(), 40, 24, image::ExtendedColorType::Rgb8)
            .unwrap();
        let out = reencode_like(Some(&webp), &pixels(), shape(), MIN_JPEG_QUALITY).unwrap();
        assert_eq!(Encoding::of(&out), Encoding::Webp);
        // Lossless: the pixels come back exactly.
        let back = image::load_from_memory(&out).unwrap().to_rgb8().into_raw();
        assert_eq!(back, pixels());
        let out = reencode_like(None, &pixels(), shape(), MIN_JPEG_QUALITY).unwrap();
        assert!(out.starts_with(b"\x89PNG"));
    }
}
