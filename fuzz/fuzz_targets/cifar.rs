//! CIFAR batch parsing never panics, and what parses encodes back to the same bytes.
#![no_main]
use hallmark::dataset::cifar::{Variant, encode, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for v in [Variant::Cifar10, Variant::Cifar100] {
        if let Ok(b) = parse(data, v) {
            assert_eq!(encode(&b.pixels, &b.labels, b.coarse.as_deref(), v).unwrap(), data);
        }
    }
});
