//! Durable jobs: queued, claimed under a lease, beaten, finished, parked, reaped.

use super::*;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Writes a watermarked release.
    Watermark,
    /// Runs a verification.
    Verify,
    /// Writes one shard of a streamed release (the watermark's own job assembles them).
    #[serde(rename = "watermark_shard")]
    WatermarkShard,
}

impl JobKind {
    fn as_str(self) -> &'static str {
        match self {
            JobKind::Watermark => "watermark",
            JobKind::Verify => "verify",
            JobKind::WatermarkShard => "watermark_shard",
        }
    }
    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "watermark" => Ok(JobKind::Watermark),
            "verify" => Ok(JobKind::Verify),
            "watermark_shard" => Ok(JobKind::WatermarkShard),
            _ => Err(corrupt("jobs.kind", s)),
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// A worker holds it.
    Running,
    /// Done.
    Succeeded,
    /// Stopped with an error.
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl JobState {
    /// The state's name in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "queued" => Ok(JobState::Queued),
            "running" => Ok(JobState::Running),
            "succeeded" => Ok(JobState::Succeeded),
            "failed" => Ok(JobState::Failed),
            "cancelled" => Ok(JobState::Cancelled),
            _ => Err(corrupt("jobs.state", s)),
        }
    }
    /// Whether the job will not change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A job's status.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Job {
    /// Identifier.
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// The key that created it.
    pub owner_id: String,
    /// The watermark or verification it works for.
    pub resource_id: String,
    /// Where it is.
    pub state: JobState,
    /// Units of work done.
    pub progress_done: i64,
    /// Units of work in all (0 while unknown).
    pub progress_total: i64,
    /// Times a worker started it.
    pub attempts: i64,
    /// Most starts before it is failed.
    pub max_attempts: i64,
    /// Whether a client asked to cancel it.
    pub cancel_requested: bool,
    /// Stable code of the failure.
    pub error_code: Option<ErrorCode>,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the first start.
    pub started_at: Option<i64>,
    /// Unix milliseconds.
    pub finished_at: Option<i64>,
}

/// A job a worker has claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Identifier.
    pub id: String,
    /// What to do.
    pub kind: JobKind,
    /// The watermark or verification.
    pub resource_id: String,
    /// This start's number (1 for the first).
    pub attempt: i64,
}

/// What a heartbeat learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Go on.
    Continue,
    /// A client asked to cancel.
    Cancel,
    /// The job is no longer this worker's (its lease expired and it was given away, or it was
    /// cancelled while queued): stop without writing anything.
    Lost,
}

/// One shard job of a streamed release.
#[derive(Debug, Clone)]
pub struct ShardJob {
    /// Its shard's place in the survey.
    pub shard: usize,
    /// The job.
    pub job_id: String,
    /// Where it is.
    pub state: JobState,
    /// Why it failed.
    pub error_code: Option<ErrorCode>,
    /// Its message.
    pub error: Option<String>,
    /// What it wrote (its `ShardOutput` as JSON), once it succeeded.
    pub output: Option<Vec<u8>>,
}

/// What the reaper did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Jobs put back in the queue.
    pub requeued: u64,
    /// Jobs failed after their last attempt.
    pub failed: u64,
}

/// A job a worker may claim: a queued one, or a streamed release's own job that waits for its
/// shards (running, held by no worker) once none of them is queued or running.
const CLAIMABLE: &str = "(state = 'queued' OR (state = 'running' AND worker IS NULL))";
const CLAIMABLE_Q: &str = "(q.state = 'queued' OR (q.state = 'running' AND q.worker IS NULL \
     AND NOT EXISTS (SELECT 1 FROM watermark_shards s JOIN jobs j ON j.id = s.job_id \
     WHERE s.watermark_id = q.resource_id AND j.state IN ('queued', 'running'))))";

const JOB_COLUMNS: &str = "id, kind, owner_id, resource_id, state, progress_done, progress_total, \
     attempts, max_attempts, cancel_requested, error_code, error, created_at, started_at, finished_at";

fn job_from(r: &AnyRow) -> Result<Job, StoreError> {
    Ok(Job {
        id: r.try_get("id")?,
        kind: JobKind::parse(&r.try_get::<String, _>("kind")?)?,
        owner_id: r.try_get("owner_id")?,
        resource_id: r.try_get("resource_id")?,
        state: JobState::parse(&r.try_get::<String, _>("state")?)?,
        progress_done: r.try_get("progress_done")?,
        progress_total: r.try_get("progress_total")?,
        attempts: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        error_code: r
            .try_get::<Option<String>, _>("error_code")?
            .map(|c| ErrorCode::parse(&c).ok_or_else(|| corrupt("jobs.error_code", &c)))
            .transpose()?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

impl Store {
    pub(super) async fn insert_job(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &str,
        kind: JobKind,
        owner: &str,
        resource: &str,
        max_attempts: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO jobs (id, kind, owner_id, resource_id, state, max_attempts, created_at) \
             VALUES ($1, $2, $3, $4, 'queued', $5, $6)",
        )
        .bind(id)
        .bind(kind.as_str())
        .bind(owner)
        .bind(resource)
        .bind(max_attempts)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// A job by id.
    pub async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from).transpose()
    }

    /// Jobs of one owner (every job when `owner` is `None`), newest first, at most `limit`.
    pub async fn list_jobs(&self, owner: Option<&str>, limit: i64) -> Result<Vec<Job>, StoreError> {
        let rows = self
            .owned_rows(
                "jobs",
                JOB_COLUMNS,
                owner,
                "created_at DESC, id DESC",
                Some(limit),
            )
            .await?;
        rows.iter().map(job_from).collect()
    }

    /// Claims the oldest queued job for `worker`, atomically: two claimers never get the same
    /// job. Records the start in `job_runs`.
    pub async fn claim(&self, worker: &str) -> Result<Option<Claimed>, StoreError> {
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE jobs SET state = 'running', worker = $1, attempts = attempts + 1, \
             heartbeat_at = $2, started_at = COALESCE(started_at, $2) \
             WHERE {CLAIMABLE} AND id = (SELECT id FROM jobs q WHERE {CLAIMABLE_Q} \
             ORDER BY created_at, id LIMIT 1{lock}) \
             RETURNING id, kind, resource_id, attempts"
        ))
        .bind(worker)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let claimed = Claimed {
            id: row.try_get("id")?,
            kind: JobKind::parse(&row.try_get::<String, _>("kind")?)?,
            resource_id: row.try_get("resource_id")?,
            attempt: row.try_get("attempts")?,
        };
        sqlx::query(
            // A start that did not count (parked at shutdown, or a streamed release's job that
            // handed out its shards) is followed by one with the same number: it replaces it.
            "INSERT INTO job_runs (job_id, attempt, worker, started_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (job_id, attempt) DO UPDATE SET worker = excluded.worker, \
             started_at = excluded.started_at",
        )
        .bind(&claimed.id)
        .bind(claimed.attempt)
        .bind(worker)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(claimed))
    }

    /// Renews `worker`'s lease on a job and records its progress.
    pub async fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        done: i64,
        total: i64,
    ) -> Result<Beat, StoreError> {
        let row = sqlx::query(
            "UPDATE jobs SET heartbeat_at = $1, progress_done = $2, progress_total = $3 \
             WHERE id = $4 AND worker = $5 AND state = 'running' RETURNING cancel_requested",
        )
        .bind(now_ms())
        .bind(done)
        .bind(total)
        .bind(id)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Beat::Lost,
            Some(r) if r.try_get::<i64, _>("cancel_requested")? != 0 => Beat::Cancel,
            Some(_) => Beat::Continue,
        })
    }

    pub(super) async fn finish(
        conn: &mut sqlx::AnyConnection,
        id: &str,
        worker: &str,
        state: JobState,
        code: Option<ErrorCode>,
        message: Option<&str>,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE jobs SET state = $1, error_code = $2, error = $3, finished_at = $4, \
             worker = NULL, progress_done = CASE WHEN $1 = 'succeeded' THEN progress_total ELSE progress_done END \
             WHERE id = $5 AND worker = $6 AND state = 'running'",
        )
        .bind(state.as_str())
        .bind(code.map(ErrorCode::as_str))
        .bind(message)
        .bind(now_ms())
        .bind(id)
        .bind(worker)
        .execute(conn)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Ends a running job of `worker` as failed or cancelled; false when it was no longer its.
    pub async fn end_job(
        &self,
        id: &str,
        worker: &str,
        state: JobState,
        code: ErrorCode,
        message: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Self::finish(&mut conn, id, worker, state, Some(code), Some(message)).await
    }

    /// Puts a running job back in the queue without counting the attempt (graceful shutdown).
    pub async fn park(&self, id: &str, worker: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'queued', worker = NULL, heartbeat_at = NULL, \
             attempts = attempts - 1 WHERE id = $1 AND worker = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Asks a job to stop: a queued job (or a streamed release's job waiting for its shards) is
    /// cancelled at once, a running one when its worker next beats; so are the shard jobs of a
    /// streamed release's job. Returns the job as it now stands.
    pub async fn cancel_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let now = now_ms();
        // The shard jobs of the job whose id is parameter `n`, if it is a streamed release's.
        let shards = |n: usize| {
            format!(
                "SELECT s.job_id FROM watermark_shards s JOIN jobs m \
                 ON m.resource_id = s.watermark_id WHERE m.id = ${n} AND m.kind = 'watermark'"
            )
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = $1, \
             error_code = $2, error = 'cancelled by a client' \
             WHERE (id = $3 OR id IN ({})) \
             AND (state = 'queued' OR (state = 'running' AND worker IS NULL))",
            shards(3)
        ))
        .bind(now)
        .bind(ErrorCode::Cancelled.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "UPDATE jobs SET cancel_requested = 1 WHERE (id = $1 OR id IN ({})) \
             AND state = 'running'",
            shards(1)
        ))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.get_job(id).await
    }

    /// Hands a streamed release's job over to its shards: the job (still `worker`'s) waits,
    /// running and held by no worker, until every shard job has ended, and then any worker may
    /// claim it again to assemble the release (handing out does not use an attempt); `plan`
    /// (now with the survey) is stored sealed, and one job per shard is queued. False when the
    /// job was no longer `worker`'s.
    pub async fn fan_out(
        &self,
        job_id: &str,
        worker: &str,
        watermark_id: &str,
        plan: &[u8],
        shards: usize,
        max_attempts: i64,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE jobs SET worker = NULL, heartbeat_at = NULL, attempts = attempts - 1, \
             progress_done = 1, progress_total = $1 \
             WHERE id = $2 AND worker = $3 AND state = 'running' RETURNING owner_id",
        )
        .bind(shards as i64 + 2)
        .bind(job_id)
        .bind(worker)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(false);
        };
        let owner: String = row.try_get("owner_id")?;
        let sealed = self
            .sealer
            .seal(plan, &super::watermarks::plan_context(watermark_id));
        sqlx::query("UPDATE watermarks SET spec_sealed = $1 WHERE id = $2")
            .bind(sealed)
            .bind(watermark_id)
            .execute(&mut *tx)
            .await?;
        // An earlier attempt that died between fanning out and its commit left nothing; one
        // that committed is not this job's any more.
        for shard in 0..shards {
            let id = new_id();
            Self::insert_job(
                &mut tx,
                &id,
                JobKind::WatermarkShard,
                &owner,
                watermark_id,
                max_attempts,
                now,
            )
            .await?;
            sqlx::query(
                "INSERT INTO watermark_shards (watermark_id, shard, job_id) VALUES ($1, $2, $3)",
            )
            .bind(watermark_id)
            .bind(shard as i64)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The watermark and the shard a shard job writes.
    pub async fn shard_of(&self, job_id: &str) -> Result<Option<(String, usize)>, StoreError> {
        let row = sqlx::query("SELECT watermark_id, shard FROM watermark_shards WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok((
                r.try_get("watermark_id")?,
                r.try_get::<i64, _>("shard")? as usize,
            ))
        })
        .transpose()
    }

    /// Ends `worker`'s shard job as succeeded and stores what it wrote (`output`, secret:
    /// sealed) in one transaction; the watermark's job counts one more shard done. False when
    /// the job was no longer `worker`'s.
    pub async fn finish_shard(
        &self,
        job_id: &str,
        worker: &str,
        watermark_id: &str,
        shard: usize,
        output: &[u8],
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !Self::finish(&mut tx, job_id, worker, JobState::Succeeded, None, None).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        let sealed = self
            .sealer
            .seal(output, &format!("watermarks/{watermark_id}/shards/{shard}"));
        sqlx::query(
            "UPDATE watermark_shards SET output_sealed = $1 WHERE watermark_id = $2 AND shard = $3",
        )
        .bind(sealed)
        .bind(watermark_id)
        .bind(shard as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET progress_done = progress_done + 1 \
             WHERE id = (SELECT job_id FROM watermarks WHERE id = $1)",
        )
        .bind(watermark_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The shard jobs of a streamed release, in shard order, with what each wrote (opened).
    pub async fn watermark_shards(&self, watermark_id: &str) -> Result<Vec<ShardJob>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.shard, s.job_id, s.output_sealed, j.state, j.error_code, j.error \
             FROM watermark_shards s JOIN jobs j ON j.id = s.job_id \
             WHERE s.watermark_id = $1 ORDER BY s.shard",
        )
        .bind(watermark_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let shard = r.try_get::<i64, _>("shard")? as usize;
                let output = r
                    .try_get::<Option<String>, _>("output_sealed")?
                    .map(|s| {
                        self.sealer
                            .open(&s, &format!("watermarks/{watermark_id}/shards/{shard}"))
                    })
                    .transpose()?;
                Ok(ShardJob {
                    shard,
                    job_id: r.try_get("job_id")?,
                    state: JobState::parse(&r.try_get::<String, _>("state")?)?,
                    error_code: r
                        .try_get::<Option<String>, _>("error_code")?
                        .and_then(|c| ErrorCode::parse(&c)),
                    error: r.try_get("error")?,
                    output,
                })
            })
            .collect()
    }

    /// Requeues running jobs whose lease ran out before `stale_before` (their worker died), or
    /// fails them when they have used every attempt.
    pub async fn reap(&self, stale_before: i64) -> Result<Reaped, StoreError> {
        let failed = sqlx::query(
            "UPDATE jobs SET state = 'failed', worker = NULL, finished_at = $1, \
             error_code = $3, \
             error = 'the worker running this job stopped responding on its last allowed attempt' \
             WHERE state = 'running' AND heartbeat_at < $2 AND attempts >= max_attempts",
        )
        .bind(now_ms())
        .bind(stale_before)
        .bind(ErrorCode::WorkerLost.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected();
        let requeued = sqlx::query(
            "UPDATE jobs SET state = 'queued', worker = NULL, heartbeat_at = NULL \
             WHERE state = 'running' AND heartbeat_at < $1",
        )
        .bind(stale_before)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(Reaped { requeued, failed })
    }

    /// The workers that started a job, by attempt.
    pub async fn job_runs(&self, id: &str) -> Result<Vec<(i64, String)>, StoreError> {
        let rows =
            sqlx::query("SELECT attempt, worker FROM job_runs WHERE job_id = $1 ORDER BY attempt")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("attempt")?, r.try_get("worker")?)))
            .collect()
    }

    /// Number of jobs per state and kind, for metrics.
    pub async fn job_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state ORDER BY kind, state",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("kind")?, r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }
}
