//! Checkpoints of a training run: the variables and the SGD momentum in `checkpoint.ot`, then
//! `checkpoint.json` (settings, data hash, epochs done, history) that says they are complete.
//! A run with the same settings and data resumes from them exactly.

use super::TrainError;
use super::config::{EpochReport, TrainConfig};
use crate::dataset::ImageShape;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Tensor, nn};

const WEIGHTS: &str = "checkpoint.ot";
const META: &str = "checkpoint.json";

/// What a checkpoint says about its run.
#[derive(Serialize, Deserialize)]
pub(crate) struct Meta {
    pub config: TrainConfig,
    pub shape: ImageShape,
    pub classes: usize,
    pub train_sha256: String,
    pub epochs_done: usize,
    pub history: Vec<EpochReport>,
}

/// Loads the checkpoint in `dir` into `vs` and `momentum` when there is one, after checking that
/// it is of this run (`config`, `train_sha256`, `shape`); returns its epochs done and history.
pub(crate) fn load(
    dir: &Path,
    vs: &nn::VarStore,
    momentum: &mut [Tensor],
    run: (&TrainConfig, &str, ImageShape),
    device: Device,
) -> Result<Option<(usize, Vec<EpochReport>)>, TrainError> {
    let (config, train_sha256, shape) = run;
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Io(dir.display().to_string(), e))?;
    let meta_path = dir.join(META);
    if !meta_path.exists() {
        return Ok(None);
    }
    let meta: Meta = serde_json::from_slice(
        &std::fs::read(&meta_path)
            .map_err(|e| TrainError::Io(meta_path.display().to_string(), e))?,
    )
    .map_err(|e| TrainError::Config(format!("{}: {e}", meta_path.display())))?;
    if meta.config != *config || meta.train_sha256 != train_sha256 || meta.shape != shape {
        return Err(TrainError::Config(format!(
            "{} holds a checkpoint of another run (settings or data differ); remove it or use another folder",
            dir.display()
        )));
    }
    let named =
        Tensor::load_multi_with_device(dir.join(WEIGHTS), device).map_err(TrainError::Torch)?;
    let lookup: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
    tch::no_grad(|| -> Result<(), TrainError> {
        for (name, var) in vs.variables() {
            let t = lookup
                .get(&name)
                .ok_or_else(|| TrainError::Config(format!("checkpoint lacks {name}")))?;
            var.shallow_clone().copy_(t);
        }
        for (i, m) in momentum.iter_mut().enumerate() {
            let t = lookup
                .get(&format!("momentum.{i}"))
                .ok_or_else(|| TrainError::Config("checkpoint lacks momentum".into()))?;
            m.copy_(t);
        }
        Ok(())
    })?;
    Ok(Some((meta.epochs_done, meta.history)))
}

/// Saves the run's state in `dir`: the weights first, then the metadata that says they are
/// complete; both by rename.
pub(crate) fn save(
    dir: &Path,
    vs: &nn::VarStore,
    momentum: &[Tensor],
    meta: &Meta,
) -> Result<(), TrainError> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.extend(
        momentum
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("momentum.{i}"), t.shallow_clone())),
    );
    let tmp = dir.join(format!("{WEIGHTS}.partial"));
    Tensor::save_multi(&named, &tmp).map_err(TrainError::Torch)?;
    std::fs::rename(&tmp, dir.join(WEIGHTS))
        .map_err(|e| TrainError::Io(dir.display().to_string(), e))?;
    let bytes = serde_json::to_vec_pretty(meta).expect("serialising to memory");
    crate::fsutil::write_file_atomic(&dir.join(META), &bytes, 0o644, true)
        .map_err(|e| TrainError::Io(dir.display().to_string(), e))
}
