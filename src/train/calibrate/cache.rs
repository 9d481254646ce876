//! Clean models kept between calibrations (`--clean-cache`).

use super::CalibrateError;
use crate::dataset::Dataset;
use crate::train::TrainConfig;
use std::path::{Path, PathBuf};

/// A folder of clean models. A clean model depends only on the training settings, the seed, the
/// data, the device and the trainer's code, so each is stored under a hash of all of them: the
/// executable's own sha256 stands for the code, and a rebuilt hallmark trains afresh.
pub struct CleanCache {
    dir: PathBuf,
    /// sha256 over the executable, the device and the data (shape, pixels, labels in order).
    base: [u8; 32],
}

impl CleanCache {
    /// The cache in `dir` (created) for models trained on `data` on `device`.
    pub fn new(dir: &Path, data: &Dataset, device: tch::Device) -> Result<Self, CalibrateError> {
        use sha2::{Digest, Sha256};
        let exe = std::env::current_exe()
            .map_err(|e| CalibrateError::Io("locating the hallmark executable".into(), e))?;
        let code = Sha256::digest(
            std::fs::read(&exe).map_err(|e| CalibrateError::Io(exe.display().to_string(), e))?,
        );
        let mut h = Sha256::new();
        h.update(b"hallmark-clean-model-v1");
        h.update(code);
        h.update(format!("{device:?}").as_bytes());
        let s = data.shape();
        for v in [s.height, s.width, s.channels, data.len()] {
            h.update((v as u64).to_le_bytes());
        }
        h.update(data.pixels());
        for l in data.labels() {
            h.update(l.to_le_bytes());
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| CalibrateError::Io(dir.display().to_string(), e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            base: h.finalize().into(),
        })
    }

    /// The folder of the clean model trained with `cfg` (it may not exist yet).
    pub fn dir(&self, cfg: &TrainConfig) -> PathBuf {
        use sha2::{Digest, Sha256};
        let key = Sha256::new()
            .chain_update(self.base)
            .chain_update(serde_json::to_vec(cfg).expect("serialising to memory"))
            .finalize();
        self.dir.join(&hex::encode(key)[..24])
    }
}
