//! A streamed release as jobs: the watermark's job reads the labels and hands out one job per
//! shard; any worker of any process sharing the database and the data folder writes a shard
//! (`watermark_shard`); once every shard job has ended, the watermark's job is claimed again
//! and assembles the release: the secret record from the shards' outputs, the manifest, and
//! `release.json`, then the release is moved into place. The shards are stamped by the keyed
//! rule (`watermark::keyed`), so a shard's bytes depend only on the nonce and its own samples,
//! and the release equals `hallmark watermark --stream`'s with the same nonce.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Ended, JobError, Progress, Runner, WatermarkPlan, check_roots};
use crate::ErrorCode;
use crate::dataset::{self, stream::ShardOutput};
use crate::spec::WatermarkSpec;
use crate::store::{Claimed, DatasetInfo, JobState, ReleaseFacts};
use crate::watermark::keyed::{self, KeyedMarker};

/// What a streamed release's job knows once it has read its plan.
pub(super) struct Streamed<'a> {
    pub worker: &'a str,
    pub job: &'a Claimed,
    pub spec: WatermarkSpec,
    pub nonce: [u8; 32],
    pub ds: DatasetInfo,
}

/// Where a streamed release's shards are written, by whichever worker: beside the release,
/// under a name no reader takes for a release.
fn shards_dir(data_dir: &std::path::Path, watermark_id: &str) -> PathBuf {
    data_dir
        .join("releases")
        .join(format!(".{watermark_id}.shards"))
}

fn marker(
    spec: &WatermarkSpec,
    nonce: [u8; 32],
    survey: &dataset::stream::Survey,
) -> Result<KeyedMarker, JobError> {
    KeyedMarker::new(
        spec,
        nonce,
        &survey.class_counts,
        survey.channels,
        dataset::encoding::MIN_JPEG_QUALITY,
    )
    .map_err(|e| JobError::new(ErrorCode::InvalidSpec, e.to_string()))
}

fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> JobError + '_ {
    move |e| JobError::new(ErrorCode::Io, format!("{}: {e}", path.display()))
}

fn panicked(e: tokio::task::JoinError) -> JobError {
    JobError::new(
        ErrorCode::Internal,
        format!("the watermark task panicked: {e}"),
    )
}

impl Runner {
    /// A streamed release's job: the first time, reads the labels and hands out the shards;
    /// once they have all ended, assembles the release (or fails with the first failed
    /// shard's error).
    pub(super) async fn watermark_streamed(
        &self,
        w: Streamed<'_>,
        plan: WatermarkPlan,
        progress: Arc<Progress>,
    ) -> Result<Ended, JobError> {
        if plan.triggers > 1 {
            return Err(JobError::new(
                ErrorCode::InvalidSpec,
                "a streamed release carries one trigger",
            ));
        }
        match plan.survey.clone() {
            None => self.hand_out(w, plan, progress).await,
            Some(survey) => {
                let id = w.job.resource_id.clone();
                let r = self.assemble(w, survey, progress).await;
                if r.is_err() {
                    // The job fails for good: its shards are of no use.
                    let dir = shards_dir(&self.cfg.data_dir, &id);
                    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                }
                r
            }
        }
    }

    async fn hand_out(
        &self,
        w: Streamed<'_>,
        mut plan: WatermarkPlan,
        progress: Arc<Progress>,
    ) -> Result<Ended, JobError> {
        let id = w.job.resource_id.clone();
        progress.total.store(w.ds.count, Ordering::Relaxed);
        let roots = self.cfg.dataset_roots.clone();
        let dir = shards_dir(&self.cfg.data_dir, &id);
        let (ds, spec, nonce) = (w.ds.clone(), w.spec.clone(), w.nonce);
        let p = progress.clone();
        let survey = tokio::task::spawn_blocking(move || {
            let path = check_roots(&ds, &roots)?;
            let tick = || {
                p.done.fetch_add(1, Ordering::Relaxed);
            };
            let survey = dataset::stream::survey(path, Some(ds.format), ds.split, &tick)
                .map_err(|e| JobError::new(ErrorCode::DatasetUnreadable, e.to_string()))?;
            if survey.count() as i64 != ds.count {
                return Err(JobError::new(
                    ErrorCode::DatasetChanged,
                    format!(
                        "the dataset held {} samples when registered and holds {} now",
                        ds.count,
                        survey.count()
                    ),
                ));
            }
            // A spec the keyed rule cannot stamp fails here, before any shard is written.
            marker(&spec, nonce, &survey)?;
            // What an earlier attempt wrote before it died goes.
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            Ok(survey)
        })
        .await
        .map_err(panicked)??;
        let shards = survey.shards.len();
        plan.survey = Some(survey);
        let plan = serde_json::to_vec(&plan)
            .map_err(|e| JobError::new(ErrorCode::Internal, format!("plan: {e}")))?;
        let handed = self
            .store
            .fan_out(
                &w.job.id,
                w.worker,
                &id,
                &plan,
                shards,
                self.cfg.job_max_attempts,
            )
            .await?;
        if !handed {
            return Ok(Ended::Lost);
        }
        tracing::info!(shards, "shards handed out");
        // Idle workers of this process start on them at once.
        self.wake.notify_waiters();
        Ok(Ended::HandedOut)
    }

    /// A shard job: stamps its shard into the release's shards folder and stores its output.
    pub(super) async fn watermark_shard(
        &self,
        worker: &str,
        job: &Claimed,
        progress: Arc<Progress>,
    ) -> Result<Ended, JobError> {
        let (id, shard) = self
            .store
            .shard_of(&job.id)
            .await?
            .ok_or_else(|| JobError::new(ErrorCode::Internal, "a shard job without a shard"))?;
        let (plan, spec, nonce) = self.plan(&id).await?;
        let survey = plan
            .survey
            .ok_or_else(|| JobError::new(ErrorCode::Internal, "a shard job before its survey"))?;
        let count = survey.shards.get(shard).map_or(0, |s| s.count);
        progress.total.store(count as i64, Ordering::Relaxed);
        let wm = self
            .store
            .get_watermark(&id)
            .await?
            .ok_or_else(|| JobError::new(ErrorCode::NotFound, "the watermark was deleted"))?;
        let ds = self
            .store
            .get_dataset(wm.dataset_id.as_deref().unwrap_or_default())
            .await?
            .ok_or_else(|| JobError::new(ErrorCode::NotFound, "the dataset was deleted"))?;
        let (roots, limits) = (self.cfg.dataset_roots.clone(), self.cfg.dataset_limits);
        let dir = shards_dir(&self.cfg.data_dir, &id);
        let p = progress.clone();
        let out = tokio::task::spawn_blocking(move || {
            check_roots(&ds, &roots)?;
            let m = marker(&spec, nonce, &survey)?;
            let decide =
                |key: &str, label: u32, bytes: &[u8]| m.process(key, label, bytes, &limits);
            let tick = || {
                p.done.fetch_add(1, Ordering::Relaxed);
            };
            dataset::stream::process_shard(&survey, shard, &dir, &decide, &limits, &tick)
                .map_err(|e| JobError::new(ErrorCode::DatasetUnreadable, e.to_string()))
        })
        .await
        .map_err(panicked)??;
        let json = serde_json::to_vec(&out)
            .map_err(|e| JobError::new(ErrorCode::Internal, format!("shard output: {e}")))?;
        Ok(super::ended(
            self.store
                .finish_shard(&job.id, worker, &id, shard, &json)
                .await?,
        ))
    }

    async fn assemble(
        &self,
        w: Streamed<'_>,
        survey: dataset::stream::Survey,
        progress: Arc<Progress>,
    ) -> Result<Ended, JobError> {
        let id = w.job.resource_id.clone();
        let shards = self.store.watermark_shards(&id).await?;
        progress
            .total
            .store(survey.shards.len() as i64 + 2, Ordering::Relaxed);
        progress
            .done
            .store(survey.shards.len() as i64 + 1, Ordering::Relaxed);
        let mut outputs: Vec<ShardOutput> = Vec::with_capacity(shards.len());
        for s in &shards {
            let name = survey.shards.get(s.shard).map_or("?", |i| i.name.as_str());
            match (s.state, &s.output) {
                (JobState::Succeeded, Some(o)) => {
                    outputs.push(serde_json::from_slice(o).map_err(|e| {
                        JobError::new(ErrorCode::Internal, format!("shard {name}'s output: {e}"))
                    })?)
                }
                (JobState::Cancelled, _) => {
                    return Err(JobError::new(
                        ErrorCode::Cancelled,
                        format!("shard {name} was cancelled"),
                    ));
                }
                _ => {
                    return Err(JobError::new(
                        s.error_code.unwrap_or(ErrorCode::Internal),
                        format!(
                            "shard {name}: {}",
                            s.error.as_deref().unwrap_or("did not finish")
                        ),
                    ));
                }
            }
        }
        if outputs.len() != survey.shards.len() {
            return Err(JobError::new(
                ErrorCode::Internal,
                format!(
                    "{} shard jobs for {} shards",
                    outputs.len(),
                    survey.shards.len()
                ),
            ));
        }
        let dir = shards_dir(&self.cfg.data_dir, &id);
        let dest = Runner::release_dir(&self.cfg.data_dir, &id);
        let registered = w.ds.sha256.clone();
        let (spec, nonce) = (w.spec.clone(), w.nonce);
        let d = dir.clone();
        let record = tokio::task::spawn_blocking(move || {
            let m = marker(&spec, nonce, &survey)?;
            let record = keyed::stream_record(&m, &survey, nonce, &outputs);
            if record.dataset.sha256_before != registered {
                return Err(JobError::new(
                    ErrorCode::DatasetChanged,
                    "the dataset's files changed since it was registered (sha256 differs)",
                ));
            }
            dataset::stream::join_manifest(&d, survey.shards.len())
                .map_err(|e| JobError::new(ErrorCode::Io, e.to_string()))?;
            let info = keyed::stream_release_info(&survey, &record, &outputs);
            dataset::write_release_info(&d, &info)
                .map_err(|e| JobError::new(ErrorCode::Io, e.to_string()))?;
            Ok(record)
        })
        .await
        .map_err(panicked)??;
        let commitment = record.commitment();
        // The secret is stored before the release becomes visible.
        let secret = crate::watermark::Secret::One(Box::new(record));
        self.store
            .store_secret(&id, &secret.to_json_pretty())
            .await?;
        let (from, to) = (dir.clone(), dest.clone());
        tokio::task::spawn_blocking(move || crate::fsutil::AtomicDir::adopt(&from, &to)?.commit())
            .await
            .map_err(panicked)?
            .map_err(io(&dest))?;
        Ok(super::ended(
            self.store
                .finish_watermark(
                    &w.job.id,
                    w.worker,
                    &id,
                    &ReleaseFacts {
                        commitment,
                        dataset_sha256: secret.dataset().sha256_after.clone(),
                        release_path: Some(dest.to_string_lossy().into_owned()),
                        poisoned: secret.poisoned_count() as i64,
                    },
                )
                .await?,
        ))
    }
}
