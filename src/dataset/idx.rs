//! IDX files (MNIST, Fashion-MNIST): a big-endian header `0 0 type ndim`, `ndim` u32 sizes, then
//! the data. Only unsigned-byte data (type 0x08) is used by image datasets and supported here.
//! Files may be gzipped; gzip is recognised by its magic bytes, not by the file name.

use super::ParseError;
use std::io::Write;

const TYPE_U8: u8 = 0x08;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// An n-dimensional array of bytes read from an IDX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Sizes of each dimension, outermost first.
    pub dims: Vec<usize>,
    /// Row-major data, exactly the product of `dims` bytes.
    pub data: Vec<u8>,
}

/// True when the bytes start like a gzip stream.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&GZIP_MAGIC)
}

/// Decompresses gzip (one or several concatenated members); other bytes are returned as they are.
pub fn maybe_gunzip(raw: Vec<u8>) -> Result<Vec<u8>, ParseError> {
    maybe_gunzip_capped(raw, usize::MAX)
}

/// [`maybe_gunzip`], refusing a stream that inflates to more than `cap` bytes before more than
/// that is allocated: a small gzip file cannot claim gigabytes (a decompression bomb).
pub fn maybe_gunzip_capped(raw: Vec<u8>, cap: usize) -> Result<Vec<u8>, ParseError> {
    if !is_gzip(&raw) {
        return Ok(raw);
    }
    gunzip_members(&raw, cap).map_err(|e| match e {
        Gunzip::Corrupt(at) => ParseError::new(
            Some(at as u64),
            format!("corrupt gzip stream (member at compressed byte {at})"),
        ),
        Gunzip::TooLarge => ParseError::new(
            None,
            format!("the gzip stream inflates to more than the {cap} bytes allowed"),
        ),
    })
}

enum Gunzip {
    Corrupt(usize),
    TooLarge,
}

/// libdeflate, member by member: each call reports how much input it consumed, so concatenated
/// members (which hallmark itself writes) are all decoded. The output buffer starts at the size
/// the last trailer gives (exact for one member) and grows when a member needs more, up to
/// deflate's largest possible ratio (1032:1), so a forged trailer cannot force a huge allocation.
fn gunzip_members(raw: &[u8], cap: usize) -> Result<Vec<u8>, Gunzip> {
    use libdeflate_sys::*;
    let ratio_limit = raw.len().saturating_mul(1032).max(1 << 16);
    let limit = ratio_limit.min(cap);
    let trailer = if raw.len() >= 18 {
        u32::from_le_bytes(raw[raw.len() - 4..].try_into().expect("4 bytes")) as usize
    } else {
        0
    };
    let mut out: Vec<u8> = vec![0; trailer.min(limit).max(1024)];
    let mut filled = 0usize;
    let mut at = 0usize;
    // SAFETY: the decompressor is allocated here, checked for null, used only by this thread
    // and freed on every path below.
    let d = unsafe { libdeflate_alloc_decompressor() };
    if d.is_null() {
        return Err(Gunzip::Corrupt(0));
    }
    let result = loop {
        if at == raw.len() {
            break Ok(());
        }
        if !raw[at..].starts_with(&GZIP_MAGIC) {
            break Err(Gunzip::Corrupt(at));
        }
        let (mut used_in, mut used_out) = (0usize, 0usize);
        // SAFETY: input and output pointers and lengths describe live, correctly sized slices.
        let ret = unsafe {
            libdeflate_gzip_decompress_ex(
                d,
                raw[at..].as_ptr().cast(),
                raw.len() - at,
                out[filled..].as_mut_ptr().cast(),
                out.len() - filled,
                &mut used_in,
                &mut used_out,
            )
        };
        if ret == libdeflate_result_LIBDEFLATE_SUCCESS {
            filled += used_out;
            at += used_in;
        } else if ret == libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE && out.len() < limit {
            let grown = (out.len() * 2).min(limit);
            out.resize(grown, 0);
        } else if ret == libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE && limit < ratio_limit {
            break Err(Gunzip::TooLarge);
        } else {
            break Err(Gunzip::Corrupt(at));
        }
    };
    // SAFETY: allocated above, not used after this.
    unsafe { libdeflate_free_decompressor(d) };
    result?;
    out.truncate(filled);
    Ok(out)
}

/// The dimensions and header length of an IDX file that may be gzipped, read from its first
/// bytes (inflating only those): what the file declares, known before anything is allocated
/// for it.
pub fn peek_header(raw: &[u8]) -> Result<(Vec<usize>, usize), ParseError> {
    if !is_gzip(raw) {
        return parse_header(raw);
    }
    use std::io::Read;
    let mut z = flate2::read::MultiGzDecoder::new(raw);
    let mut head = vec![0u8; 4];
    let corrupt = |_| ParseError::new(Some(0), "corrupt or truncated gzip stream");
    z.read_exact(&mut head).map_err(corrupt)?;
    let ndim = head[3] as usize;
    head.resize(4 + 4 * ndim, 0);
    if ndim > 0 && head[0] == 0 && head[1] == 0 {
        z.read_exact(&mut head[4..]).map_err(corrupt)?;
    }
    parse_header(&head)
}

/// Parses the header of an IDX file: returns the dimensions and the header's length in bytes.
pub fn parse_header(bytes: &[u8]) -> Result<(Vec<usize>, usize), ParseError> {
    if bytes.len() < 4 {
        return Err(ParseError::new(
            Some(0),
            format!(
                "file is {} bytes long, too short for an IDX magic number",
                bytes.len()
            ),
        ));
    }
    // The messages name what is wrong, never the bytes found: a file read by mistake (a key, a
    // configuration) must not show up in an error.
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(ParseError::new(
            Some(0),
            "wrong magic number: an IDX file starts with two zero bytes",
        ));
    }
    if bytes[2] != TYPE_U8 {
        return Err(ParseError::new(
            Some(2),
            "data type is not supported; only unsigned bytes (0x08) are",
        ));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 {
        return Err(ParseError::new(
            Some(3),
            "the header declares zero dimensions",
        ));
    }
    let header_len = 4 + 4 * ndim;
    if bytes.len() < header_len {
        return Err(ParseError::new(
            Some(bytes.len() as u64),
            format!("truncated header: {ndim} dimensions need {header_len} bytes"),
        ));
    }
    let dims = (0..ndim)
        .map(|d| {
            let at = 4 + 4 * d;
            u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize
        })
        .collect();
    Ok((dims, header_len))
}

/// Parses a whole (decompressed) IDX file, checking that the data matches the header exactly.
pub fn parse(mut bytes: Vec<u8>) -> Result<IdxArray, ParseError> {
    let (dims, header_len) = parse_header(&bytes)?;
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| ParseError::new(Some(4), format!("dimensions {dims:?} overflow")))?;
    let found = bytes.len() - header_len;
    if found < expected {
        return Err(ParseError::new(
            Some(bytes.len() as u64),
            format!(
                "truncated: dimensions {dims:?} need {expected} data bytes after the header, found {found}"
            ),
        ));
    }
    if found > expected {
        return Err(ParseError::new(
            Some((header_len + expected) as u64),
            format!(
                "{} trailing bytes after the {expected} data bytes that dimensions {dims:?} declare",
                found - expected
            ),
        ));
    }
    bytes.copy_within(header_len.., 0);
    bytes.truncate(expected);
    Ok(IdxArray { dims, data: bytes })
}

/// The IDX header for unsigned-byte data of the given dimensions.
pub fn header(dims: &[usize]) -> Result<Vec<u8>, ParseError> {
    if dims.is_empty() || dims.len() > 255 {
        return Err(ParseError::new(
            None,
            format!("IDX needs 1 to 255 dimensions, not {}", dims.len()),
        ));
    }
    let mut out = vec![0, 0, TYPE_U8, dims.len() as u8];
    for &d in dims {
        let d = u32::try_from(d)
            .map_err(|_| ParseError::new(None, format!("dimension {d} does not fit IDX's u32")))?;
        out.extend_from_slice(&d.to_be_bytes());
    }
    Ok(out)
}

/// Writes an IDX file (header then data) to `w`.
pub fn write(w: &mut impl Write, dims: &[usize], data: &[u8]) -> std::io::Result<()> {
    let h = header(dims).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&h)?;
    w.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dims: &[usize], data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write(&mut v, dims, data).unwrap();
        v
    }

    #[test]
    fn a_written_array_parses_back() {
        let data: Vec<u8> = (0..24).collect();
        let a = parse(file(&[2, 3, 4], &data)).unwrap();
        assert_eq!(a.dims, vec![2, 3, 4]);
        assert_eq!(a.data, data);
    }

    #[test]
    fn wrong_magic_is_named() {
        let e = parse(vec![1, 2, 8, 1, 0, 0, 0, 0]).unwrap_err();
        assert!(e.message.contains("wrong magic"), "{e}");
        assert_eq!(e.offset, Some(0));
    }

    #[test]
    fn unsupported_type_is_named() {
        let e = parse(vec![0, 0, 0x0d, 1, 0, 0, 0, 0]).unwrap_err();
        assert!(e.message.contains("data type is not supported"), "{e}");
        assert!(
            !e.message.contains("0d"),
            "the file's bytes are not quoted: {e}"
        );
    }

    #[test]
    fn truncated_data_is_reported_with_sizes() {
        let mut f = file(&[2, 2], &[1, 2, 3, 4]);
        f.pop();
        let e = parse(f).unwrap_err();
        assert!(
            e.message.contains("truncated")
                && e.message.contains("need 4")
                && e.message.contains("found 3"),
            "{e}"
        );
    }

    #[test]
    fn trailing_bytes_are_reported() {
        let mut f = file(&[2], &[1, 2]);
        f.push(9);
        let e = parse(f).unwrap_err();
        assert!(e.message.contains("1 trailing bytes"), "{e}");
        assert_eq!(e.offset, Some(10));
    }

    #[test]
    fn truncated_header_is_reported() {
        let e = parse(vec![0, 0, 8, 3, 0, 0, 0, 1]).unwrap_err();
        assert!(e.message.contains("truncated header"), "{e}");
    }

    #[test]
    fn overflowing_dimensions_are_an_error_not_a_panic() {
        let mut f = vec![0, 0, 8, 4];
        for _ in 0..4 {
            f.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        assert!(parse(f).unwrap_err().message.contains("overflow"));
    }

    #[test]
    fn gzip_is_recognised_by_magic_and_multi_member_streams_decode() {
        use flate2::{Compression, write::GzEncoder};
        let plain = file(&[3], &[7, 8, 9]);
        let mut gz = Vec::new();
        for part in [&plain[..5], &plain[5..]] {
            let mut e = GzEncoder::new(Vec::new(), Compression::fast());
            e.write_all(part).unwrap();
            gz.extend(e.finish().unwrap());
        }
        assert_eq!(maybe_gunzip(gz).unwrap(), plain);
        assert_eq!(maybe_gunzip(plain.clone()).unwrap(), plain);
    }

    #[test]
    fn every_member_is_decoded_even_when_the_first_matches_the_trailer_size() {
        use flate2::{Compression, write::GzEncoder};
        let member = |b: &[u8]| {
            let mut e = GzEncoder::new(Vec::new(), Compression::fast());
            e.write_all(b).unwrap();
            e.finish().unwrap()
        };
        let (a, b) = (vec![1u8; 8], vec![2u8; 8]);
        let mut gz = member(&a);
        gz.extend(member(&b));
        gz.extend(member(&vec![3u8; 5000]));
        gz.extend(member(&b));
        let out = maybe_gunzip(gz).unwrap();
        assert_eq!(out.len(), 8 + 8 + 5000 + 8);
        assert_eq!((out[0], out[8], out[16], out[5016]), (1, 2, 3, 2));
    }

    #[test]
    fn trailing_garbage_after_a_member_is_an_error() {
        use flate2::{Compression, write::GzEncoder};
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(b"abc").unwrap();
        let mut gz = e.finish().unwrap();
        gz.extend_from_slice(b"junk");
        assert!(
            maybe_gunzip(gz)
                .unwrap_err()
                .message
                .contains("corrupt gzip")
        );
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let e = maybe_gunzip(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]).unwrap_err();
        assert!(e.message.contains("corrupt gzip"), "{e}");
    }
}
