//! Content hashes: one sha256 per image (over its HWC pixels, as in the manifest) and one for the
//! whole dataset.
//!
//! The dataset hash is defined over the *multiset* of samples so that a release read back from
//! any format, in any file order, hashes the same as the dataset that was written:
//! `sha256("hallmark-dataset-v1" ‖ height ‖ width ‖ channels ‖ count ‖ records)`, all integers u64
//! little-endian, where `records` are the pairs (label as u32 LE, image sha256) sorted by label, then
//! by image hash.

use super::Dataset;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

/// sha256 of each image's pixels, in dataset order.
pub fn image_sha256s(dataset: &Dataset) -> Vec<[u8; 32]> {
    let n = dataset.shape().len();
    dataset
        .pixels()
        .par_chunks(n)
        .with_min_len(256)
        .map(|img| Sha256::digest(img).into())
        .collect()
}

/// sha256 (hex) of the whole dataset, from the per-image hashes of [`image_sha256s`].
pub fn dataset_sha256(dataset: &Dataset, image_hashes: &[[u8; 32]]) -> String {
    assert_eq!(image_hashes.len(), dataset.len(), "one hash per image");
    let mut records: Vec<(u32, [u8; 32])> = dataset
        .labels()
        .iter()
        .copied()
        .zip(image_hashes.iter().copied())
        .collect();
    records.par_sort_unstable();
    let s = dataset.shape();
    let mut h = Sha256::new();
    h.update(b"hallmark-dataset-v1");
    for v in [s.height, s.width, s.channels, dataset.len()] {
        h.update((v as u64).to_le_bytes());
    }
    for (label, digest) in &records {
        h.update(label.to_le_bytes());
        h.update(digest);
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use crate::dataset::{Dataset, ImageShape};

    fn ds(pixels: Vec<u8>, labels: Vec<u32>) -> Dataset {
        Dataset::new(
            ImageShape {
                height: 1,
                width: 2,
                channels: 1,
            },
            pixels,
            labels,
            3,
        )
        .unwrap()
    }

    #[test]
    fn order_does_not_change_the_dataset_hash_but_content_does() {
        let a = ds(vec![1, 2, 3, 4], vec![0, 1]);
        let b = ds(vec![3, 4, 1, 2], vec![1, 0]);
        assert_eq!(a.sha256(), b.sha256());
        assert_ne!(a.sha256(), ds(vec![1, 2, 3, 5], vec![0, 1]).sha256());
        assert_ne!(a.sha256(), ds(vec![1, 2, 3, 4], vec![0, 2]).sha256());
    }
}
