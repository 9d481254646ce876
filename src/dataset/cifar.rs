//! CIFAR-10 and CIFAR-100 binary batches: fixed-size records of label byte(s) then 3 × 32 × 32
//! planar pixels (all red, then green, then blue). CIFAR-10 records carry one label (0–9);
//! CIFAR-100 records carry a coarse label (0–19) then a fine label (0–99). Images are converted to
//! interleaved HWC here and back when written.

use super::ParseError;
use serde::{Deserialize, Serialize};

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;
const IMAGE: usize = 3 * PLANE;

/// Which CIFAR dataset a batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// One label byte per record, 10 classes.
    Cifar10,
    /// Coarse then fine label byte per record, 100 fine classes.
    Cifar100,
}

impl Variant {
    /// Bytes per record.
    pub fn record_len(self) -> usize {
        match self {
            Self::Cifar10 => 1 + IMAGE,
            Self::Cifar100 => 2 + IMAGE,
        }
    }

    /// Number of (fine) classes.
    pub fn num_classes(self) -> usize {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
        }
    }

    /// The variant whose record size divides `len`, when exactly one does.
    pub fn detect(len: usize) -> Option<Self> {
        match (
            len.is_multiple_of(Self::Cifar10.record_len()),
            len.is_multiple_of(Self::Cifar100.record_len()),
        ) {
            (true, false) => Some(Self::Cifar10),
            (false, true) => Some(Self::Cifar100),
            _ => None,
        }
    }
}

/// Records of one batch file, converted to HWC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// HWC pixels, image after image.
    pub pixels: Vec<u8>,
    /// Fine labels.
    pub labels: Vec<u32>,
    /// Coarse labels (CIFAR-100 only).
    pub coarse: Option<Vec<u32>>,
}

/// The image shape of every CIFAR image.
pub fn shape() -> super::ImageShape {
    super::ImageShape {
        height: SIDE,
        width: SIDE,
        channels: 3,
    }
}

/// Parses one batch file's bytes.
pub fn parse(bytes: &[u8], variant: Variant) -> Result<Batch, ParseError> {
    let rec = variant.record_len();
    if bytes.is_empty() {
        return Err(ParseError::new(
            Some(0),
            "empty file: a batch holds at least one record",
        ));
    }
    if !bytes.len().is_multiple_of(rec) {
        let whole = bytes.len() / rec;
        return Err(ParseError::new(
            Some((whole * rec) as u64),
            format!(
                "truncated record {whole}: file size {} is not a multiple of the {variant:?} record size {rec}",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / rec;
    let mut pixels = vec![0u8; n * IMAGE];
    let mut labels = Vec::with_capacity(n);
    let mut coarse = (variant == Variant::Cifar100).then(|| Vec::with_capacity(n));
    for (i, (record, out)) in bytes
        .chunks_exact(rec)
        .zip(pixels.chunks_exact_mut(IMAGE))
        .enumerate()
    {
        let offset = (i * rec) as u64;
        let (label, planes) = match variant {
            Variant::Cifar10 => (record[0], &record[1..]),
            Variant::Cifar100 => {
                if record[0] >= 20 {
                    return Err(ParseError::new(
                        Some(offset),
                        format!("record {i}: coarse label {} is not below 20", record[0]),
                    ));
                }
                coarse
                    .as_mut()
                    .expect("cifar100")
                    .push(u32::from(record[0]));
                (record[1], &record[2..])
            }
        };
        if usize::from(label) >= variant.num_classes() {
            return Err(ParseError::new(
                Some(offset),
                format!(
                    "record {i}: label {label} is not below {}",
                    variant.num_classes()
                ),
            ));
        }
        labels.push(u32::from(label));
        planar_to_hwc(planes, out);
    }
    Ok(Batch {
        pixels,
        labels,
        coarse,
    })
}

fn planar_to_hwc(planes: &[u8], out: &mut [u8]) {
    let (r, rest) = planes.split_at(PLANE);
    let (g, b) = rest.split_at(PLANE);
    for (p, px) in out.chunks_exact_mut(3).enumerate() {
        px[0] = r[p];
        px[1] = g[p];
        px[2] = b[p];
    }
}

/// Encodes records (HWC pixels in) into a batch file's bytes.
pub fn encode(
    pixels: &[u8],
    labels: &[u32],
    coarse: Option<&[u32]>,
    variant: Variant,
) -> Result<Vec<u8>, ParseError> {
    if pixels.len() != labels.len() * IMAGE {
        return Err(ParseError::new(None, "CIFAR images must be 32×32×3"));
    }
    let mut out = Vec::with_capacity(labels.len() * variant.record_len());
    for (i, (img, &label)) in pixels.chunks_exact(IMAGE).zip(labels).enumerate() {
        let byte = |l: u32, what: &str| {
            u8::try_from(l).map_err(|_| {
                ParseError::new(
                    None,
                    format!("sample {i}: {what} label {l} does not fit a byte"),
                )
            })
        };
        if variant == Variant::Cifar100 {
            let c =
                coarse.ok_or_else(|| ParseError::new(None, "CIFAR-100 needs coarse labels"))?[i];
            out.push(byte(c, "coarse")?);
        }
        out.push(byte(label, "fine")?);
        for c in 0..3 {
            out.extend(img.iter().skip(c).step_by(3));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_planes_become_interleaved() {
        let mut rec = vec![7u8];
        rec.extend(std::iter::repeat_n(1u8, PLANE));
        rec.extend(std::iter::repeat_n(2u8, PLANE));
        rec.extend(std::iter::repeat_n(3u8, PLANE));
        let b = parse(&rec, Variant::Cifar10).unwrap();
        assert_eq!(b.labels, vec![7]);
        assert_eq!(&b.pixels[..6], &[1, 2, 3, 1, 2, 3]);
        assert_eq!(
            encode(&b.pixels, &b.labels, None, Variant::Cifar10).unwrap(),
            rec
        );
    }

    #[test]
    fn truncated_record_is_reported_with_its_offset() {
        let bytes = vec![0u8; 2 * Variant::Cifar10.record_len() - 5];
        let e = parse(&bytes, Variant::Cifar10).unwrap_err();
        assert!(e.message.contains("truncated record 1"), "{e}");
        assert_eq!(e.offset, Some(3073));
    }

    #[test]
    fn out_of_range_labels_are_reported() {
        let mut bytes = vec![0u8; 2 * Variant::Cifar10.record_len()];
        bytes[3073] = 10;
        let e = parse(&bytes, Variant::Cifar10).unwrap_err();
        assert!(e.message.contains("record 1: label 10"), "{e}");
        let mut bytes = vec![0u8; Variant::Cifar100.record_len()];
        bytes[0] = 20;
        assert!(
            parse(&bytes, Variant::Cifar100)
                .unwrap_err()
                .message
                .contains("coarse label 20")
        );
    }

    #[test]
    fn cifar100_keeps_coarse_labels() {
        let mut bytes = vec![0u8; Variant::Cifar100.record_len()];
        bytes[0] = 19;
        bytes[1] = 99;
        let b = parse(&bytes, Variant::Cifar100).unwrap();
        assert_eq!((b.coarse.clone().unwrap()[0], b.labels[0]), (19, 99));
        assert_eq!(
            encode(&b.pixels, &b.labels, b.coarse.as_deref(), Variant::Cifar100).unwrap(),
            bytes
        );
    }

    #[test]
    fn variant_is_detected_from_size_when_unambiguous() {
        assert_eq!(Variant::detect(3073 * 5), Some(Variant::Cifar10));
        assert_eq!(Variant::detect(3074 * 5), Some(Variant::Cifar100));
        assert_eq!(Variant::detect(7), None);
    }
}
