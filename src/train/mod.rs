//! The trainer (feature `train`): BackdoorBox's models trained with libtorch through tch, so that
//! every watermark kind can be calibrated end to end on real data.

pub mod attack;
pub mod calibrate;
mod checkpoint;
pub mod config;
pub mod craft;
pub mod defence;
pub mod fit;
pub mod gate;
pub mod generator;
pub mod metrics;
pub mod model;
pub mod repair;
pub mod serve;
pub mod tensor;

pub use attack::{Attack, train_attacked};
pub use fit::{Hook, Init, Run, Schedule, TrainConfig, Trained, train};
pub use model::{Arch, Net};

/// Progress of crafting or of training a generator: step, of steps, current loss.
pub type Progress<'a> = dyn Fn(usize, usize, f64) + 'a;

/// libtorch's random generator is global to the process: seeding it and initialising a network
/// from it must not interleave with another thread's draws, or the same seed gives other weights.
pub(crate) static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Unit tests that use libtorch run one at a time: they share its generator and its OpenMP pool,
/// and a concurrent one changes another's thread teams and so its float summation order.
#[cfg(test)]
pub(crate) fn exclusive_torch() -> std::sync::MutexGuard<'static, ()> {
    static TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The first `n` images of a Fashion-MNIST split (installed by `scripts/test`), for unit tests.
#[cfg(test)]
pub(crate) fn fashion(split: crate::dataset::Split, n: usize) -> crate::dataset::Dataset {
    let ds = crate::dataset::read(
        std::path::Path::new("/usr/share/datasets/fashion-mnist"),
        Some(crate::dataset::Format::Idx),
        Some(split),
        &|| {},
    )
    .expect("Fashion-MNIST is installed by scripts/test")
    .dataset;
    ds.subset(&(0..n).collect::<Vec<_>>()).unwrap()
}

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Settings that cannot work.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The loss became NaN or infinite.
    #[error("training diverged in epoch {epoch} (the loss is not finite); lower the learning rate")]
    Diverged {
        /// Epoch (1-based).
        epoch: usize,
    },
    /// Stopped on request after a checkpoint; running again resumes.
    #[error("interrupted after {epochs_done} epochs; run again to resume")]
    Interrupted {
        /// Epochs completed.
        epochs_done: usize,
    },
    /// The watermark could not be rendered.
    #[error(transparent)]
    Watermark(#[from] crate::watermark::WatermarkError),
}

/// The device to train on: CUDA when libtorch has it and `force_cpu` is not set.
pub fn device(choice: DeviceChoice) -> Result<tch::Device, TrainError> {
    match choice {
        DeviceChoice::Cpu => Ok(tch::Device::Cpu),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        DeviceChoice::Cuda => Err(TrainError::Config(
            "CUDA was asked for, but libtorch sees no CUDA device".into(),
        )),
        DeviceChoice::Auto => Ok(tch::Device::cuda_if_available()),
    }
}

/// Which device to use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    Auto,
    /// CPU.
    Cpu,
    /// CUDA (an error when there is none).
    Cuda,
}
