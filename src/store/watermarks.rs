//! Watermarks (their secrets sealed), their plans, and auditors' grants.

use super::*;

/// A watermark as anyone entitled to see it may: never the spec, trigger or indices.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WatermarkInfo {
    /// Identifier.
    pub id: String,
    /// Owning publisher key.
    pub owner_id: String,
    /// Display name.
    pub name: String,
    /// The dataset watermarked (absent for imported records).
    pub dataset_id: Option<String>,
    /// The held-out images verifications use by default.
    pub holdout_dataset_id: Option<String>,
    /// The job writing the release (absent for imported records).
    pub job_id: Option<String>,
    /// sha256 of the secret record: publish it with the release.
    pub commitment: Option<String>,
    /// sha256 of the watermarked release.
    pub dataset_sha256: Option<String>,
    /// Number of poisoned samples (of every trigger).
    pub poisoned: Option<i64>,
    /// How many independent secret triggers the release carries: with several, each
    /// verification spends one.
    pub triggers: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Where the release was written on the server.
    #[serde(skip)]
    pub release_path: Option<String>,
}

const WATERMARK_COLUMNS: &str = "id, owner_id, name, dataset_id, holdout_dataset_id, job_id, \
     commitment, dataset_sha256, poisoned, triggers, created_at, release_path";

fn watermark_from(r: &AnyRow) -> Result<WatermarkInfo, StoreError> {
    Ok(WatermarkInfo {
        id: r.try_get("id")?,
        owner_id: r.try_get("owner_id")?,
        name: r.try_get("name")?,
        dataset_id: r.try_get("dataset_id")?,
        holdout_dataset_id: r.try_get("holdout_dataset_id")?,
        job_id: r.try_get("job_id")?,
        commitment: r.try_get("commitment")?,
        dataset_sha256: r.try_get("dataset_sha256")?,
        poisoned: r.try_get("poisoned")?,
        triggers: r.try_get("triggers")?,
        created_at: r.try_get("created_at")?,
        release_path: r.try_get("release_path")?,
    })
}

/// A watermark to be written by a job.
#[derive(Debug, Clone, Copy)]
pub struct NewWatermark<'a> {
    /// The publisher's key.
    pub owner: &'a str,
    /// Display name.
    pub name: &'a str,
    /// The dataset to watermark.
    pub dataset_id: &'a str,
    /// Held-out images verifications use by default.
    pub holdout_dataset_id: Option<&'a str>,
    /// The spec and nonce to apply (stored sealed).
    pub plan: &'a [u8],
    /// How many independent triggers the release carries.
    pub triggers: i64,
}

/// What a finished watermark records about its release.
#[derive(Debug, Clone)]
pub struct ReleaseFacts {
    /// sha256 of the secret record.
    pub commitment: String,
    /// sha256 of the watermarked dataset.
    pub dataset_sha256: String,
    /// Where the release was written (absent for imported records).
    pub release_path: Option<String>,
    /// Number of poisoned samples.
    pub poisoned: i64,
}

/// What a watermark's sealed plan is bound to.
pub(super) fn plan_context(id: &str) -> String {
    format!("watermarks/{id}/plan")
}

impl Store {
    /// Creates a watermark to be written by a new job; `plan` (the spec and nonce, secret) is
    /// sealed. Returns the watermark and its job.
    pub async fn create_watermark(
        &self,
        w: NewWatermark<'_>,
        max_attempts: i64,
    ) -> Result<(WatermarkInfo, Job), StoreError> {
        let (id, job_id, now) = (new_id(), new_id(), now_ms());
        let NewWatermark {
            owner,
            name,
            dataset_id,
            holdout_dataset_id,
            plan,
            triggers,
        } = w;
        let sealed = self.sealer.seal(plan, &plan_context(&id));
        let mut tx = self.pool.begin().await?;
        Self::insert_job(
            &mut tx,
            &job_id,
            JobKind::Watermark,
            owner,
            &id,
            max_attempts,
            now,
        )
        .await?;
        sqlx::query(
            "INSERT INTO watermarks (id, owner_id, name, dataset_id, holdout_dataset_id, job_id, \
             spec_sealed, triggers, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&id)
        .bind(owner)
        .bind(name)
        .bind(dataset_id)
        .bind(holdout_dataset_id)
        .bind(&job_id)
        .bind(sealed)
        .bind(triggers)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let wm = self
            .get_watermark(&id)
            .await?
            .ok_or_else(|| corrupt("watermarks", "vanished"))?;
        let job = self
            .get_job(&job_id)
            .await?
            .ok_or_else(|| corrupt("jobs", "vanished"))?;
        Ok((wm, job))
    }

    /// Stores a secret record made elsewhere (`hallmark watermark`), sealed; ready at once.
    pub async fn import_watermark(
        &self,
        owner: &str,
        name: &str,
        holdout_dataset_id: Option<&str>,
        record_json: &[u8],
        facts: &ReleaseFacts,
        triggers: i64,
    ) -> Result<WatermarkInfo, StoreError> {
        let id = new_id();
        let sealed = self
            .sealer
            .seal(record_json, &format!("watermarks/{id}/secret"));
        sqlx::query(
            "INSERT INTO watermarks (id, owner_id, name, holdout_dataset_id, secret_sealed, \
             commitment, dataset_sha256, poisoned, triggers, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&id)
        .bind(owner)
        .bind(name)
        .bind(holdout_dataset_id)
        .bind(sealed)
        .bind(&facts.commitment)
        .bind(&facts.dataset_sha256)
        .bind(facts.poisoned)
        .bind(triggers)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.get_watermark(&id)
            .await?
            .ok_or_else(|| corrupt("watermarks", "vanished"))
    }

    /// A watermark's public facts.
    pub async fn get_watermark(&self, id: &str) -> Result<Option<WatermarkInfo>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {WATERMARK_COLUMNS} FROM watermarks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(watermark_from).transpose()
    }

    /// Watermarks of one owner (all when `None`), oldest first.
    pub async fn list_watermarks(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<WatermarkInfo>, StoreError> {
        let rows = self
            .owned_rows(
                "watermarks",
                WATERMARK_COLUMNS,
                owner,
                "created_at, id",
                None,
            )
            .await?;
        rows.iter().map(watermark_from).collect()
    }

    /// Watermarks an auditor was granted, oldest first.
    pub async fn list_granted(&self, auditor: &str) -> Result<Vec<WatermarkInfo>, StoreError> {
        let cols = WATERMARK_COLUMNS
            .split(", ")
            .map(|c| format!("w.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(&format!(
            "SELECT {cols} FROM watermarks w JOIN grants g ON g.watermark_id = w.id \
             WHERE g.auditor_id = $1 ORDER BY w.created_at, w.id"
        ))
        .bind(auditor)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(watermark_from).collect()
    }

    /// The sealed plan (spec and nonce) of a watermark being written, opened.
    pub async fn watermark_plan(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT spec_sealed FROM watermarks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let sealed: Option<String> = row.try_get("spec_sealed")?;
        sealed
            .map(|s| self.sealer.open(&s, &plan_context(id)))
            .transpose()
            .map_err(Into::into)
    }

    /// The secret record of a finished watermark, opened.
    pub async fn secret_record(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT secret_sealed FROM watermarks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let sealed: Option<String> = row.try_get("secret_sealed")?;
        sealed
            .map(|s| self.sealer.open(&s, &format!("watermarks/{id}/secret")))
            .transpose()
            .map_err(Into::into)
    }

    /// Seals and stores a watermark's secret record before its release is moved into place.
    pub async fn store_secret(&self, id: &str, record_json: &[u8]) -> Result<(), StoreError> {
        let sealed = self
            .sealer
            .seal(record_json, &format!("watermarks/{id}/secret"));
        sqlx::query("UPDATE watermarks SET secret_sealed = $1 WHERE id = $2")
            .bind(sealed)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a written release and ends its job, in one transaction; false (and nothing
    /// written) when the job is no longer `worker`'s.
    pub async fn finish_watermark(
        &self,
        job_id: &str,
        worker: &str,
        id: &str,
        facts: &ReleaseFacts,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !Self::finish(&mut tx, job_id, worker, JobState::Succeeded, None, None).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "UPDATE watermarks SET commitment = $1, dataset_sha256 = $2, release_path = $3, \
             poisoned = $4, spec_sealed = NULL WHERE id = $5",
        )
        .bind(&facts.commitment)
        .bind(&facts.dataset_sha256)
        .bind(&facts.release_path)
        .bind(facts.poisoned)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Lets `auditor` verify against a watermark, at any endpoint or (with `endpoints`) only at
    /// those origins. Granting again replaces the endpoints.
    pub async fn grant(
        &self,
        watermark: &str,
        auditor: &str,
        endpoints: Option<&[String]>,
    ) -> Result<(), StoreError> {
        let endpoints = endpoints.map(|e| serde_json::to_string(e).expect("strings serialise"));
        sqlx::query(
            "INSERT INTO grants (watermark_id, auditor_id, created_at, endpoints) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (watermark_id, auditor_id) DO UPDATE SET endpoints = $4",
        )
        .bind(watermark)
        .bind(auditor)
        .bind(now_ms())
        .bind(endpoints)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The endpoints a grant allows: `None` when there is no grant, `Some(None)` when it allows
    /// any endpoint.
    pub async fn grant_endpoints(
        &self,
        watermark: &str,
        auditor: &str,
    ) -> Result<Option<Option<Vec<String>>>, StoreError> {
        let row =
            sqlx::query("SELECT endpoints FROM grants WHERE watermark_id = $1 AND auditor_id = $2")
                .bind(watermark)
                .bind(auditor)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            let text: Option<String> = r.try_get("endpoints")?;
            text.map(|t| {
                serde_json::from_str(&t).map_err(|e| corrupt("grants.endpoints", &e.to_string()))
            })
            .transpose()
        })
        .transpose()
    }

    /// Withdraws a grant; false when there was none.
    pub async fn revoke_grant(&self, watermark: &str, auditor: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM grants WHERE watermark_id = $1 AND auditor_id = $2")
            .bind(watermark)
            .bind(auditor)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Whether `auditor` may verify against `watermark`.
    pub async fn is_granted(&self, watermark: &str, auditor: &str) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM grants WHERE watermark_id = $1 AND auditor_id = $2",
        )
        .bind(watermark)
        .bind(auditor)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// The auditors granted a watermark.
    pub async fn list_grants(&self, watermark: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT auditor_id FROM grants WHERE watermark_id = $1 ORDER BY created_at, auditor_id",
        )
        .bind(watermark)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("auditor_id")?)).collect()
    }
}
