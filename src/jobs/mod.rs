//! Durable jobs: watermarking a release and running a verification.
//!
//! Jobs live in the database. Each worker claims one at a time (atomically, so two workers or
//! two processes never run the same job), renews a lease by heartbeat while it works, and ends
//! the job in the same transaction that stores its result; a worker that lost its lease (because
//! it stalled and the job was given to another) writes nothing. A reaper puts jobs whose worker
//! died (no heartbeat for one lease) back in the queue, or fails them after their last attempt.
//! Watermark releases are written under a temporary name and renamed into place only once
//! complete, and writing is deterministic from the stored seed and nonce, so a job resumed after a
//! crash produces the same bytes and the same commitment.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::ErrorCode;
use crate::dataset;
use crate::endpoint::{EndpointConfig, HttpEndpoint};
use crate::fsutil::AtomicDir;
use crate::spec::WatermarkSpec;
use crate::store::{
    Beat, Claimed, DatasetInfo, JobKind, JobState, ReleaseFacts, Store, StoreError,
};
use crate::verify::{self, VerifyConfig};
use crate::watermark::{self, Secret};

mod stream;

/// What a watermark job applies: the spec and the nonce, fixed when the job is created so that
/// every attempt writes the same release. Stored sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatermarkPlan {
    /// The spec.
    pub spec: serde_json::Value,
    /// 32 random bytes, hex.
    pub nonce: String,
    /// How many independent triggers the release carries.
    #[serde(default = "one")]
    pub triggers: usize,
    /// Specs of other families of which the release also carries one trigger each, after the
    /// spec's `triggers` (`watermark::apply_trigger_specs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_specs: Vec<serde_json::Value>,
    /// A streamed release's label pass, stored once its job has handed the shards out (each
    /// shard job reads it, and the job assembles the release from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub survey: Option<dataset::stream::Survey>,
}

/// How a job's run ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Its result is stored and it succeeded.
    Finished,
    /// Another worker holds it now: nothing was written.
    Lost,
    /// A streamed release's job handed its shards to shard jobs and waits for them.
    HandedOut,
}

fn one() -> usize {
    1
}

/// What a verification job runs: where the model is and how to test it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyPlan {
    /// The model endpoint (its `allow_private` is the server's setting, never the client's).
    pub endpoint: EndpointConfig,
    /// The test settings.
    pub config: VerifyConfig,
}

/// Settings of the job runner.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Where releases are written (`releases/<watermark id>`).
    pub data_dir: PathBuf,
    /// Concurrent jobs in this process.
    pub workers: usize,
    /// A job whose worker has not beaten for this long is given to another.
    pub lease: Duration,
    /// How often an idle worker looks for work.
    pub poll: Duration,
    /// At shutdown, how long running jobs may go on before they are parked in the queue.
    pub shutdown_grace: Duration,
    /// Whether verification endpoints may be private addresses.
    pub allow_private_endpoints: bool,
    /// Where datasets may lie (the configured roots and the uploads folder): a link inside a
    /// dataset that leads out of them fails the job.
    pub dataset_roots: Vec<PathBuf>,
    /// Bounds on the datasets read.
    pub dataset_limits: dataset::Limits,
    /// Most starts of a job (the shard jobs a streamed release hands out get as many).
    pub job_max_attempts: i64,
}

/// Why a job failed: a stable code and a message for the client.
#[derive(Debug)]
pub struct JobError {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

impl JobError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage error in a job");
        Self::new(ErrorCode::Internal, "storage error (see the server log)")
    }
}

#[derive(Default)]
struct Progress {
    done: AtomicI64,
    total: AtomicI64,
}

/// Runs jobs in the background of one `hallmark serve` process.
#[derive(Clone)]
pub struct Runner {
    store: Store,
    cfg: Arc<RunnerConfig>,
    worker_id: String,
    wake: Arc<Notify>,
}

/// A started runner; [`RunnerHandle::stop`] shuts it down gracefully.
pub struct RunnerHandle {
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    wake: Arc<Notify>,
}

impl RunnerHandle {
    /// Tells idle workers that a job was queued.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Stops claiming, lets running jobs finish within the grace period, parks the rest.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

impl Runner {
    /// A runner over `store`.
    pub fn new(store: Store, cfg: RunnerConfig) -> Self {
        let worker_id = format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            &uuid::Uuid::new_v4().to_string()[..8]
        );
        Self {
            store,
            cfg: Arc::new(cfg),
            worker_id,
            wake: Arc::new(Notify::new()),
        }
    }

    /// This process's worker identity (recorded with every job it starts).
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Starts the workers and the reaper.
    pub fn start(self) -> RunnerHandle {
        let (tx, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for n in 0..self.cfg.workers.max(1) {
            let r = self.clone();
            let rx = rx.clone();
            tasks.push(tokio::spawn(async move { r.work(n, rx).await }));
        }
        let r = self.clone();
        let rx2 = rx.clone();
        tasks.push(tokio::spawn(async move { r.reap(rx2).await }));
        RunnerHandle {
            shutdown: tx,
            tasks,
            wake: self.wake.clone(),
        }
    }

    async fn reap(self, mut shutdown: watch::Receiver<bool>) {
        let every = (self.cfg.lease / 2).max(Duration::from_millis(100));
        loop {
            let stale_before = crate::store::now_ms() - self.cfg.lease.as_millis() as i64;
            match self.store.reap(stale_before).await {
                Ok(r) if r.requeued + r.failed > 0 => {
                    tracing::warn!(
                        requeued = r.requeued,
                        failed = r.failed,
                        "jobs whose worker stopped responding"
                    );
                    self.wake.notify_waiters();
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "reaping jobs failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn work(self, n: usize, mut shutdown: watch::Receiver<bool>) {
        let worker = format!("{}/{n}", self.worker_id);
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.store.claim(&worker).await {
                Ok(Some(job)) => self.run_one(&worker, job, shutdown.clone()).await,
                Ok(None) => {
                    tokio::select! {
                        _ = tokio::time::sleep(self.cfg.poll) => {}
                        _ = self.wake.notified() => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming a job failed");
                    tokio::select! {
                        _ = tokio::time::sleep(self.cfg.poll) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }

    async fn run_one(&self, worker: &str, job: Claimed, shutdown: watch::Receiver<bool>) {
        use tracing::Instrument;
        // The span is entered only while this job's future runs (never held across an await,
        // which would put other tasks' logs on this thread inside the job's span).
        let span =
            tracing::info_span!("job", id = %job.id, kind = ?job.kind, attempt = job.attempt);
        self.run_in_span(worker, job, shutdown)
            .instrument(span)
            .await
    }

    async fn run_in_span(&self, worker: &str, job: Claimed, mut shutdown: watch::Receiver<bool>) {
        tracing::info!("started");
        let progress = Arc::new(Progress::default());
        let work = self.execute(worker, &job, progress.clone());
        tokio::pin!(work);
        // Beats renew the lease and publish progress: at least every second.
        let every = (self.cfg.lease / 3).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut beat = tokio::time::interval(every);
        beat.tick().await;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                result = &mut work => {
                    match result {
                        Ok(Ended::Finished) => tracing::info!("succeeded"),
                        Ok(Ended::Lost) => tracing::warn!("lost its lease before finishing; result discarded"),
                        Ok(Ended::HandedOut) => tracing::info!("handed out one job per shard; waits for them"),
                        Err(e) => {
                            tracing::warn!(code = %e.code, message = %e.message, "failed");
                            if let Err(se) = self.store.end_job(&job.id, worker, JobState::Failed, e.code, &e.message).await {
                                tracing::error!(error = %se, "could not record the failure");
                            }
                        }
                    }
                    return;
                }
                _ = beat.tick() => {
                    let done = progress.done.load(Ordering::Relaxed);
                    let total = progress.total.load(Ordering::Relaxed);
                    match self.store.heartbeat(&job.id, worker, done, total).await {
                        Ok(Beat::Continue) => {}
                        Ok(Beat::Lost) => {
                            tracing::warn!("lost its lease; stopping");
                            return;
                        }
                        Ok(Beat::Cancel) => {
                            tracing::info!("cancelled");
                            let _ = self.store.end_job(&job.id, worker, JobState::Cancelled, ErrorCode::Cancelled, "cancelled by a client").await;
                            return;
                        }
                        Err(e) => tracing::error!(error = %e, "heartbeat failed"),
                    }
                    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        tracing::info!("parked at shutdown");
                        let _ = self.store.park(&job.id, worker).await;
                        return;
                    }
                }
                _ = shutdown.changed(), if deadline.is_none() => {
                    deadline = Some(tokio::time::Instant::now() + self.cfg.shutdown_grace);
                }
            }
        }
    }

    async fn execute(
        &self,
        worker: &str,
        job: &Claimed,
        progress: Arc<Progress>,
    ) -> Result<Ended, JobError> {
        match job.kind {
            JobKind::Watermark => self.watermark(worker, job, progress).await,
            JobKind::Verify => self.verify(worker, job, progress).await,
            JobKind::WatermarkShard => self.watermark_shard(worker, job, progress).await,
        }
    }

    /// Where a watermark's release is written.
    pub fn release_dir(data_dir: &Path, watermark_id: &str) -> PathBuf {
        data_dir.join("releases").join(watermark_id)
    }

    async fn watermark(
        &self,
        worker: &str,
        job: &Claimed,
        progress: Arc<Progress>,
    ) -> Result<Ended, JobError> {
        let id = &job.resource_id;
        let wm = self
            .store
            .get_watermark(id)
            .await?
            .ok_or_else(|| JobError::new(ErrorCode::NotFound, "the watermark was deleted"))?;
        let (plan, spec, nonce) = self.plan(id).await?;
        let ds_id = wm
            .dataset_id
            .ok_or_else(|| JobError::new(ErrorCode::Invalid, "the watermark names no dataset"))?;
        let ds = self
            .store
            .get_dataset(&ds_id)
            .await?
            .ok_or_else(|| JobError::new(ErrorCode::NotFound, "the dataset was deleted"))?;
        if ds.streamed {
            let w = stream::Streamed {
                worker,
                job,
                spec,
                nonce,
                ds,
            };
            return self.watermark_streamed(w, plan, progress).await;
        }
        let dest = Self::release_dir(&self.cfg.data_dir, id);
        let triggers = plan.triggers;
        let also = plan
            .also_specs
            .iter()
            .map(|v| WatermarkSpec::from_json_value(v.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| JobError::new(ErrorCode::InvalidSpec, e.to_string()))?;
        progress.total.store(4, Ordering::Relaxed);
        let p = progress.clone();
        let (roots, limits) = (self.cfg.dataset_roots.clone(), self.cfg.dataset_limits);
        let written = tokio::task::spawn_blocking(move || {
            let mut loaded = read_registered(&ds, &roots, &limits)?;
            if loaded.dataset.sha256() != ds.sha256 {
                return Err(JobError::new(
                    ErrorCode::DatasetChanged,
                    "the dataset's files changed since it was registered (sha256 differs)",
                ));
            }
            p.done.store(1, Ordering::Relaxed);
            let marked = if also.is_empty() {
                watermark::mark(&mut loaded.dataset, &spec, nonce, triggers, None)
            } else {
                let specs: Vec<&WatermarkSpec> =
                    std::iter::repeat_n(&spec, triggers).chain(&also).collect();
                watermark::apply_trigger_specs(&mut loaded.dataset, &specs, nonce)
            };
            let mut marked =
                marked.map_err(|e| JobError::new(ErrorCode::InvalidSpec, e.to_string()))?;
            // Poisoned JPEG images are encoded again now, so that the record names what the
            // release decodes to.
            marked
                .settle(&mut loaded.layout, &mut loaded.dataset)
                .map_err(|e| JobError::new(ErrorCode::Io, e.to_string()))?;
            p.done.store(2, Ordering::Relaxed);
            let commitment = marked.secret.commitment();
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    JobError::new(ErrorCode::Io, format!("{}: {e}", parent.display()))
                })?;
            }
            // This worker holds the job's lease, so what an earlier, killed attempt left half
            // written can go.
            crate::fsutil::remove_leftovers(&dest)
                .map_err(|e| JobError::new(ErrorCode::Io, format!("{}: {e}", dest.display())))?;
            // Overwrite: an earlier attempt may have moved an identical release into place
            // before its process died.
            let dir = AtomicDir::create(&dest, true)
                .map_err(|e| JobError::new(ErrorCode::Io, format!("{}: {e}", dest.display())))?;
            let mut info = dataset::write_release(
                &loaded.dataset,
                &loaded.layout,
                dir.path(),
                &marked.image_hashes,
                &|| {},
            )
            .map_err(|e| JobError::new(ErrorCode::Io, e.to_string()))?;
            info.commitment = Some(commitment.clone());
            dataset::write_release_info(dir.path(), &info)
                .map_err(|e| JobError::new(ErrorCode::Io, e.to_string()))?;
            p.done.store(3, Ordering::Relaxed);
            Ok((dir, marked.secret, commitment, info.dataset_sha256))
        })
        .await
        .map_err(|e| {
            JobError::new(
                ErrorCode::Internal,
                format!("the watermark task panicked: {e}"),
            )
        })??;
        let (dir, secret, commitment, sha_after) = written;
        // The secret is stored before the release becomes visible: a release never exists
        // without its secret.
        self.store
            .store_secret(id, &secret.to_json_pretty())
            .await?;
        let dest = Self::release_dir(&self.cfg.data_dir, id);
        tokio::task::spawn_blocking(move || dir.commit())
            .await
            .map_err(|e| JobError::new(ErrorCode::Internal, format!("commit task panicked: {e}")))?
            .map_err(|e| JobError::new(ErrorCode::Io, format!("{}: {e}", dest.display())))?;
        progress.done.store(4, Ordering::Relaxed);
        self.store.heartbeat(&job.id, worker, 4, 4).await?;
        Ok(ended(
            self.store
                .finish_watermark(
                    &job.id,
                    worker,
                    id,
                    &ReleaseFacts {
                        commitment,
                        dataset_sha256: sha_after,
                        release_path: Some(dest.to_string_lossy().into_owned()),
                        poisoned: secret.poisoned_count() as i64,
                    },
                )
                .await?,
        ))
    }

    /// A watermark's stored plan (opened), with its spec and nonce.
    async fn plan(&self, id: &str) -> Result<(WatermarkPlan, WatermarkSpec, [u8; 32]), JobError> {
        let plan = self
            .store
            .watermark_plan(id)
            .await?
            .ok_or_else(|| JobError::new(ErrorCode::Invalid, "the watermark has no plan"))?;
        let plan: WatermarkPlan = serde_json::from_slice(&plan)
            .map_err(|e| JobError::new(ErrorCode::Internal, format!("stored plan: {e}")))?;
        let (spec, nonce) = spec_and_nonce(&plan)?;
        Ok((plan, spec, nonce))
    }

    async fn verify(
        &self,
        worker: &str,
        job: &Claimed,
        progress: Arc<Progress>,
    ) -> Result<Ended, JobError> {
        let v = self
            .store
            .get_verification(&job.resource_id)
            .await?
            .ok_or_else(|| JobError::new(ErrorCode::NotFound, "the verification was deleted"))?;
        let mut plan: VerifyPlan = serde_json::from_value(v.request.clone())
            .map_err(|e| JobError::new(ErrorCode::Internal, format!("stored request: {e}")))?;
        plan.endpoint.allow_private = self.cfg.allow_private_endpoints;
        let record = self
            .store
            .secret_record(&v.watermark_id)
            .await?
            .ok_or_else(|| {
                JobError::new(
                    ErrorCode::NotReady,
                    "the watermark has no secret record yet",
                )
            })?;
        let secret = Secret::from_json(
            std::str::from_utf8(&record)
                .map_err(|_| JobError::new(ErrorCode::Internal, "secret record is not UTF-8"))?,
        )
        .map_err(|e| JobError::new(ErrorCode::Internal, format!("secret record: {e}")))?;
        // The triggers this verification spent: one, or several that test the model together.
        let numbers: Vec<Option<usize>> = match v.spent_trigger {
            None => vec![None],
            Some(first) => (first..first + v.spent_count.unwrap_or(1))
                .map(|n| Some(n as usize))
                .collect(),
        };
        let records = numbers
            .iter()
            .map(|&n| secret.trigger(n).map(|(r, spent)| (r.clone(), spent)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| JobError::new(ErrorCode::Internal, format!("secret record: {e}")))?;
        let k = records.len();
        let ds = self
            .store
            .get_dataset(&v.holdout_dataset_id)
            .await?
            .ok_or_else(|| {
                JobError::new(ErrorCode::NotFound, "the held-out dataset was deleted")
            })?;
        let (roots, limits) = (self.cfg.dataset_roots.clone(), self.cfg.dataset_limits);
        let pool = tokio::task::spawn_blocking(move || {
            read_registered(&ds, &roots, &limits).map(|l| l.dataset)
        })
        .await
        .map_err(|e| JobError::new(ErrorCode::Internal, format!("reading task panicked: {e}")))??;
        progress.total.store(
            (k * (2 * plan.config.m + 2 * (plan.config.control_count() + 1))) as i64,
            Ordering::Relaxed,
        );
        // The seed only spreads the retries' jitter.
        let jitter = plan.config.seed.unwrap_or(plan_jitter(&records[0].0));
        let mut endpoint = HttpEndpoint::connect(plan.endpoint.clone(), jitter)
            .await
            .map_err(|e| JobError::new(ErrorCode::Endpoint, e.to_string()))?;
        endpoint.set_class_names(pool.class_names().map(<[String]>::to_vec));
        let p = progress.clone();
        let report = move |q: usize| p.done.store(q as i64, Ordering::Relaxed);
        let verdicts = verify::verify_each(&endpoint, &records, &pool, &plan.config, &report)
            .await
            .map_err(|e| match e {
                verify::VerifyError::Endpoint(e) => {
                    JobError::new(ErrorCode::Endpoint, e.to_string())
                }
                other => JobError::new(ErrorCode::Invalid, other.to_string()),
            })?;
        // One trigger: its verdict. Several: the model's, each verified at alpha / k.
        let (json, decision, p_value, queried) = if k == 1 {
            let v = &verdicts[0];
            (
                serde_json::to_value(v),
                v.decision,
                v.p_value(),
                v.queries as i64,
            )
        } else {
            let c = verify::CombinedVerdict::new(plan.config.alpha * k as f64, verdicts);
            (
                serde_json::to_value(&c),
                c.decision,
                c.p_value,
                c.queries as i64,
            )
        };
        let json = json.map_err(|e| JobError::new(ErrorCode::Internal, format!("verdict: {e}")))?;
        self.store
            .heartbeat(&job.id, worker, queried, queried)
            .await?;
        Ok(ended(
            self.store
                .finish_verification(&job.id, worker, &job.resource_id, &json, decision, p_value)
                .await?,
        ))
    }
}

/// Reads a registered dataset as it was registered (format and split from the store), within
/// `limits`, after checking that no link inside it leads out of `roots`.
fn read_registered(
    ds: &DatasetInfo,
    roots: &[PathBuf],
    limits: &dataset::Limits,
) -> Result<dataset::Loaded, JobError> {
    let path = check_roots(ds, roots)?;
    dataset::read_limited(path, Some(ds.format), ds.split, &|| {}, limits)
        .map_err(|e| JobError::new(ErrorCode::DatasetUnreadable, e.to_string()))
}

/// A registered dataset's path, after checking that it is still below `roots` and that no link
/// inside it leads out of them.
fn check_roots<'a>(ds: &'a DatasetInfo, roots: &[PathBuf]) -> Result<&'a Path, JobError> {
    let path = Path::new(&ds.path);
    match crate::fsutil::escapes_roots(path, roots, 4) {
        Ok(None) => {}
        Ok(Some(entry)) if entry == Path::new(".") => {
            return Err(JobError::new(
                ErrorCode::DatasetUnreadable,
                "the dataset is no longer below a configured dataset root",
            ));
        }
        Ok(Some(entry)) => {
            return Err(JobError::new(
                ErrorCode::DatasetUnreadable,
                format!(
                    "{} is a link that leads out of the dataset roots",
                    entry.display()
                ),
            ));
        }
        Err(e) => return Err(JobError::new(ErrorCode::DatasetUnreadable, e.to_string())),
    }
    Ok(path)
}

/// A plan's spec and nonce.
fn spec_and_nonce(plan: &WatermarkPlan) -> Result<(WatermarkSpec, [u8; 32]), JobError> {
    let spec = WatermarkSpec::from_json_value(plan.spec.clone())
        .map_err(|e| JobError::new(ErrorCode::InvalidSpec, e.to_string()))?;
    let nonce: [u8; 32] = hex::decode(&plan.nonce)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| JobError::new(ErrorCode::Internal, "stored nonce is not 32 bytes"))?;
    Ok((spec, nonce))
}

/// A finishing transaction's answer: whether the job was still this worker's.
fn ended(still_ours: bool) -> Ended {
    if still_ours {
        Ended::Finished
    } else {
        Ended::Lost
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

/// A jitter seed for a verification's retries, from its record's commitment.
fn plan_jitter(record: &crate::watermark::SecretRecord) -> u64 {
    crate::spec::family::derived_seed(record.commitment().as_bytes(), "jitter", 0)
}
