//! Verifications and their sealed verdicts.

use super::*;

/// A verification and, once done, its verdict.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VerificationInfo {
    /// Identifier.
    pub id: String,
    /// The key that asked for it.
    pub owner_id: String,
    /// The watermark verified.
    pub watermark_id: String,
    /// The benign images used.
    pub holdout_dataset_id: String,
    /// The job running it.
    pub job_id: String,
    /// The request as submitted (endpoint and test settings).
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
    /// The verdict's decision, once done.
    pub decision: Option<Decision>,
    /// The primary test's p-value, once done.
    pub p_value: Option<f64>,
    /// The whole verdict with the audit trail, once done.
    #[schema(value_type = Option<Object>)]
    pub verdict: Option<serde_json::Value>,
    /// Which trigger of the watermark this verification spent (1-based), where its release
    /// carries several; the first of them, where it spent several.
    pub spent_trigger: Option<i64>,
    /// How many triggers from `spent_trigger` on this verification spent, where it tested the
    /// model with several (each at alpha / k); absent: one.
    pub spent_count: Option<i64>,
    /// Unix milliseconds.
    pub created_at: i64,
}

const VERIFICATION_COLUMNS: &str = "id, owner_id, watermark_id, holdout_dataset_id, job_id, \
     request, decision, p_value, verdict, spent_trigger, spent_count, created_at";

fn json_column(r: &AnyRow, col: &str) -> Result<Option<serde_json::Value>, StoreError> {
    let text: Option<String> = r.try_get(col)?;
    text.map(|t| {
        serde_json::from_str(&t)
            .map_err(|e| corrupt(&format!("verifications.{col}"), &e.to_string()))
    })
    .transpose()
}

fn verification_from(r: &AnyRow, sealer: &Sealer) -> Result<VerificationInfo, StoreError> {
    let id: String = r.try_get("id")?;
    // The verdict is sealed (it holds what only the watermark's owner may see); a verdict stored
    // in plain JSON by an earlier version is read as it is.
    let verdict: Option<String> = r.try_get("verdict")?;
    let verdict = verdict
        .map(|text| {
            let plain = if text.starts_with('{') {
                text.into_bytes()
            } else {
                sealer.open(&text, &format!("verifications/{id}/verdict"))?
            };
            serde_json::from_slice(&plain)
                .map_err(|e| corrupt("verifications.verdict", &e.to_string()))
        })
        .transpose()?;
    Ok(VerificationInfo {
        owner_id: r.try_get("owner_id")?,
        watermark_id: r.try_get("watermark_id")?,
        holdout_dataset_id: r.try_get("holdout_dataset_id")?,
        job_id: r.try_get("job_id")?,
        request: json_column(r, "request")?.unwrap_or(serde_json::Value::Null),
        decision: r
            .try_get::<Option<String>, _>("decision")?
            .map(|d| Decision::parse(&d).ok_or_else(|| corrupt("verifications.decision", &d)))
            .transpose()?,
        p_value: r.try_get("p_value")?,
        verdict,
        spent_trigger: r.try_get("spent_trigger")?,
        spent_count: r.try_get("spent_count")?,
        created_at: r.try_get("created_at")?,
        id,
    })
}

/// The last trigger a watermark's verifications spent, which is how many they spent: each
/// spends the next ones in order.
const SPENT_TRIGGERS: &str = "SELECT CAST(COALESCE(MAX(spent_trigger + COALESCE(spent_count, 1) - 1), 0) \
     AS BIGINT) AS n FROM verifications WHERE watermark_id = $1 AND spent_trigger IS NOT NULL";

impl Store {
    /// How many of a watermark's triggers verifications have spent.
    pub async fn spent_triggers(&self, watermark: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query(SPENT_TRIGGERS)
            .bind(watermark)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// Creates a verification and its job. With `triggers` > 1 it spends the watermark's next
    /// `spend` unspent triggers (one, or several that test one model together), and answers
    /// `None` when fewer are left; concurrent requests never spend the same trigger: on SQLite
    /// the write lock serialises them, on PostgreSQL they queue on the watermark's row, and a
    /// unique index on the first of each verification's triggers backs both (a request that
    /// collides on it reads the count again and takes the next).
    pub async fn create_verification(
        &self,
        owner: &str,
        watermark: &str,
        holdout: &str,
        request: &serde_json::Value,
        (triggers, spend): (i64, i64),
        max_attempts: i64,
    ) -> Result<Option<(VerificationInfo, Job)>, StoreError> {
        let (id, job_id, now) = (new_id(), new_id(), now_ms());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = self.pool.begin().await?;
            // The job's row is written first: on SQLite the transaction then holds the write
            // lock, so the count below cannot change before the insert.
            Self::insert_job(
                &mut tx,
                &job_id,
                JobKind::Verify,
                owner,
                &id,
                max_attempts,
                now,
            )
            .await?;
            let spent = if triggers > 1 {
                if self.backend == Backend::Postgres {
                    // Concurrent spenders of one watermark queue on its row here, so each reads
                    // the count its predecessor committed (READ COMMITTED takes a new snapshot
                    // per statement) instead of colliding on the index below.
                    sqlx::query("SELECT id FROM watermarks WHERE id = $1 FOR UPDATE")
                        .bind(watermark)
                        .fetch_optional(&mut *tx)
                        .await?;
                }
                let n: i64 = sqlx::query(SPENT_TRIGGERS)
                    .bind(watermark)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("n")?;
                if n + spend > triggers {
                    tx.rollback().await?;
                    return Ok(None);
                }
                Some(n + 1)
            } else {
                None
            };
            let inserted = sqlx::query(
                "INSERT INTO verifications (id, owner_id, watermark_id, holdout_dataset_id, \
                 job_id, request, spent_trigger, spent_count, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&id)
            .bind(owner)
            .bind(watermark)
            .bind(holdout)
            .bind(&job_id)
            .bind(request.to_string())
            .bind(spent)
            .bind((spent.is_some() && spend > 1).then_some(spend))
            .bind(now)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {
                    tx.commit().await?;
                    break;
                }
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt < 5 => {
                    tx.rollback().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let v = self
            .get_verification(&id)
            .await?
            .ok_or_else(|| corrupt("verifications", "vanished"))?;
        let job = self
            .get_job(&job_id)
            .await?
            .ok_or_else(|| corrupt("jobs", "vanished"))?;
        Ok(Some((v, job)))
    }

    /// A verification by id.
    pub async fn get_verification(&self, id: &str) -> Result<Option<VerificationInfo>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {VERIFICATION_COLUMNS} FROM verifications WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(|r| verification_from(r, &self.sealer))
            .transpose()
    }

    /// Verifications of one owner (all when `None`), oldest first.
    pub async fn list_verifications(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<VerificationInfo>, StoreError> {
        let rows = self
            .owned_rows(
                "verifications",
                VERIFICATION_COLUMNS,
                owner,
                "created_at, id",
                None,
            )
            .await?;
        rows.iter()
            .map(|r| verification_from(r, &self.sealer))
            .collect()
    }

    /// Stores a verdict and ends its job, in one transaction; false when the job is no longer
    /// `worker`'s.
    pub async fn finish_verification(
        &self,
        job_id: &str,
        worker: &str,
        id: &str,
        verdict: &serde_json::Value,
        decision: Decision,
        p_value: f64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !Self::finish(&mut tx, job_id, worker, JobState::Succeeded, None, None).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "UPDATE verifications SET verdict = $1, decision = $2, p_value = $3 WHERE id = $4",
        )
        .bind(self.sealer.seal(
            verdict.to_string().as_bytes(),
            &format!("verifications/{id}/verdict"),
        ))
        .bind(decision.as_str())
        .bind(p_value)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}
