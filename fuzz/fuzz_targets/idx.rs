//! IDX parsing (gzip detection and decompression included) never panics, and whatever parses
//! has exactly as many data bytes as its dimensions say.
#![no_main]
use hallmark::dataset::idx;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(bytes) = idx::maybe_gunzip(data.to_vec())
        && let Ok(a) = idx::parse(bytes)
    {
        assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
    }
});
