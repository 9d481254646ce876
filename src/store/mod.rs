//! Storage: API keys, datasets, watermarks (secrets sealed), grants, verifications and durable
//! jobs, in SQLite (default) or PostgreSQL.
//!
//! One implementation serves both databases through sqlx's `Any` driver with runtime queries:
//! the schema uses only types both share (text, bigint, double precision) and the SQL is the
//! common dialect (`$n` parameters, `RETURNING`). The one difference is how a job is claimed:
//! PostgreSQL adds `FOR UPDATE SKIP LOCKED` so concurrent claimers skip each other's rows; SQLite
//! serialises writers, so the same single-statement `UPDATE … WHERE id = (SELECT …)` is already
//! atomic there. Migrations live in `migrations/sqlite` and `migrations/postgres`.

mod seal;

use crate::ErrorCode;
use crate::dataset::{Format, Split};
use crate::verify::Decision;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor as _, Row};

pub use seal::{OpenError, Sealer};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A database URL that is neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL {0:?}: expected sqlite://PATH or postgres://…")]
    Url(String),
    /// A sealed secret did not open.
    #[error(transparent)]
    Sealed(#[from] OpenError),
    /// A stored value that does not parse.
    #[error("corrupt stored value in {what}: {detail}")]
    Corrupt {
        /// Which value.
        what: String,
        /// Why.
        detail: String,
    },
}

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages keys; sees every job.
    Admin,
    /// Registers datasets, watermarks releases, grants auditors.
    Publisher,
    /// Verifies models against watermarks it was granted.
    Auditor,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Publisher => "publisher",
            Role::Auditor => "auditor",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "admin" => Ok(Role::Admin),
            "publisher" => Ok(Role::Publisher),
            "auditor" => Ok(Role::Auditor),
            _ => Err(corrupt("api_keys.role", s)),
        }
    }
}

/// An API key's public facts (never the key or its hash).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    /// Identifier.
    pub id: String,
    /// Who holds it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds, when revoked.
    pub revoked_at: Option<i64>,
}

/// A registered dataset.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DatasetInfo {
    /// Identifier.
    pub id: String,
    /// Owning key.
    pub owner_id: String,
    /// Display name.
    pub name: String,
    /// Where the files are on the server.
    #[serde(skip)]
    pub path: String,
    /// On-disk format.
    pub format: Format,
    /// Split read where the folder holds several.
    pub split: Option<Split>,
    /// Samples.
    pub count: i64,
    /// Classes.
    pub num_classes: i64,
    /// `HxWxC`.
    pub shape: String,
    /// The dataset's sha256 (over the sorted (label, image sha256) pairs).
    pub sha256: String,
    /// Whether the files were uploaded (else registered by server path).
    pub uploaded: bool,
    /// Unix milliseconds.
    pub created_at: i64,
}

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
    /// carries several.
    pub spent_trigger: Option<i64>,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Writes a watermarked release.
    Watermark,
    /// Runs a verification.
    Verify,
}

impl JobKind {
    fn as_str(self) -> &'static str {
        match self {
            JobKind::Watermark => "watermark",
            JobKind::Verify => "verify",
        }
    }
    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "watermark" => Ok(JobKind::Watermark),
            "verify" => Ok(JobKind::Verify),
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

/// What the reaper did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Jobs put back in the queue.
    pub requeued: u64,
    /// Jobs failed after their last attempt.
    pub failed: u64,
}

/// The milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn corrupt(what: &str, detail: &str) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        detail: detail.into(),
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// sha256 of an API key, as stored.
fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new API key: `hm_` and 32 random bytes in hex.
fn new_key() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the operating system's random source works");
    format!("hm_{}", hex::encode(b))
}

const JOB_COLUMNS: &str = "id, kind, owner_id, resource_id, state, progress_done, progress_total, \
     attempts, max_attempts, cancel_requested, error_code, error, created_at, started_at, finished_at";

const DATASET_COLUMNS: &str = "id, owner_id, name, path, format, split, count, num_classes, shape, \
     sha256, uploaded, created_at";

const WATERMARK_COLUMNS: &str = "id, owner_id, name, dataset_id, holdout_dataset_id, job_id, \
     commitment, dataset_sha256, poisoned, triggers, created_at, release_path";

const VERIFICATION_COLUMNS: &str = "id, owner_id, watermark_id, holdout_dataset_id, job_id, \
     request, decision, p_value, verdict, spent_trigger, created_at";

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

fn dataset_from(r: &AnyRow) -> Result<DatasetInfo, StoreError> {
    Ok(DatasetInfo {
        id: r.try_get("id")?,
        owner_id: r.try_get("owner_id")?,
        name: r.try_get("name")?,
        path: r.try_get("path")?,
        format: r
            .try_get::<String, _>("format")?
            .parse()
            .map_err(|e: String| corrupt("datasets.format", &e))?,
        split: r
            .try_get::<Option<String>, _>("split")?
            .map(|s| s.parse().map_err(|e: String| corrupt("datasets.split", &e)))
            .transpose()?,
        count: r.try_get("count")?,
        num_classes: r.try_get("num_classes")?,
        shape: r.try_get("shape")?,
        sha256: r.try_get("sha256")?,
        uploaded: r.try_get::<i64, _>("uploaded")? != 0,
        created_at: r.try_get("created_at")?,
    })
}

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
        created_at: r.try_get("created_at")?,
        id,
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

/// A dataset about to be registered.
#[derive(Debug, Clone)]
pub struct NewDataset {
    /// Identifier (chosen by the caller so uploaded files can be placed first).
    pub id: String,
    /// Owning key.
    pub owner_id: String,
    /// Display name.
    pub name: String,
    /// Files on the server.
    pub path: String,
    /// Format.
    pub format: Format,
    /// Split, where one was chosen.
    pub split: Option<Split>,
    /// Samples.
    pub count: i64,
    /// Classes.
    pub num_classes: i64,
    /// `HxWxC`.
    pub shape: String,
    /// Dataset sha256.
    pub sha256: String,
    /// Uploaded rather than registered by path.
    pub uploaded: bool,
}

/// Creates the SQLite database file of `url` readable by its owner only (0600), before SQLite
/// creates it with the process's umask (0644 commonly): it holds sealed secrets and key hashes.
/// SQLite gives its -wal and -shm files the database file's permissions. Only where the URL asks
/// for creation (`mode=rwc`) and the file is missing; in-memory databases are left alone.
fn create_private_sqlite_file(url: &str) {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let creates = query.split('&').any(|kv| kv == "mode=rwc");
    if !creates || path.is_empty() || path.starts_with(':') || query.contains("mode=memory") {
        return;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    // An existing file is kept as it is; a missing parent folder and the like are left to
    // SQLite, whose error names them.
    let _ = opts.open(path);
}

/// The storage of one service (cheap to clone).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    sealer: Sealer,
}

impl Store {
    /// Connects to `url` (`sqlite://PATH` or `postgres://…`), runs the migrations, and seals
    /// secrets with `key`.
    pub async fn connect(url: &str, key: &[u8; 32]) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::Url(url.into()));
        };
        if backend == Backend::Sqlite {
            create_private_sqlite_file(url);
        }
        let options = AnyPoolOptions::new().after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    // WAL lets readers work beside the one writer; waiting on the write lock
                    // (rather than failing at once) is what several workers need.
                    for pragma in [
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = FULL",
                        "PRAGMA foreign_keys = ON",
                        "PRAGMA busy_timeout = 30000",
                    ] {
                        conn.execute(pragma).await?;
                    }
                }
                Ok(())
            })
        });
        let pool = match backend {
            Backend::Sqlite => options.max_connections(4),
            Backend::Postgres => options.max_connections(16),
        }
        .acquire_timeout(std::time::Duration::from_secs(30))
        .connect(url)
        .await?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Self {
            pool,
            backend,
            sealer: Sealer::new(key),
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- keys ----

    /// Creates a key; returns its facts and the key itself, which is never stored.
    pub async fn create_key(&self, name: &str, role: Role) -> Result<(ApiKey, String), StoreError> {
        let key = new_key();
        let info = ApiKey {
            id: new_id(),
            name: name.into(),
            role,
            created_at: now_ms(),
            revoked_at: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, name, role, key_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&info.id)
        .bind(&info.name)
        .bind(role.as_str())
        .bind(key_hash(&key))
        .bind(info.created_at)
        .execute(&self.pool)
        .await?;
        Ok((info, key))
    }

    fn key_from(r: &AnyRow) -> Result<ApiKey, StoreError> {
        Ok(ApiKey {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            role: Role::parse(&r.try_get::<String, _>("role")?)?,
            created_at: r.try_get("created_at")?,
            revoked_at: r.try_get("revoked_at")?,
        })
    }

    /// The live key whose text is `key`.
    pub async fn authenticate(&self, key: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, role, created_at, revoked_at FROM api_keys \
             WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(key_hash(key))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::key_from).transpose()
    }

    /// A key by id.
    pub async fn get_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, role, created_at, revoked_at FROM api_keys WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::key_from).transpose()
    }

    /// Every key, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, role, created_at, revoked_at FROM api_keys ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::key_from).collect()
    }

    /// Revokes a key; false when no live key has that id.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Number of live admin keys.
    pub async fn count_admins(&self) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    // ---- datasets ----

    /// Registers a dataset.
    pub async fn insert_dataset(&self, d: NewDataset) -> Result<DatasetInfo, StoreError> {
        let created_at = now_ms();
        sqlx::query(&format!(
            "INSERT INTO datasets ({DATASET_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&d.id)
        .bind(&d.owner_id)
        .bind(&d.name)
        .bind(&d.path)
        .bind(d.format.as_str())
        .bind(d.split.map(Split::as_str))
        .bind(d.count)
        .bind(d.num_classes)
        .bind(&d.shape)
        .bind(&d.sha256)
        .bind(i64::from(d.uploaded))
        .bind(created_at)
        .execute(&self.pool)
        .await?;
        Ok(DatasetInfo {
            id: d.id,
            owner_id: d.owner_id,
            name: d.name,
            path: d.path,
            format: d.format,
            split: d.split,
            count: d.count,
            num_classes: d.num_classes,
            shape: d.shape,
            sha256: d.sha256,
            uploaded: d.uploaded,
            created_at,
        })
    }

    /// A dataset by id.
    pub async fn get_dataset(&self, id: &str) -> Result<Option<DatasetInfo>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {DATASET_COLUMNS} FROM datasets WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(dataset_from).transpose()
    }

    /// Datasets of one owner (every dataset when `owner` is `None`), oldest first.
    pub async fn list_datasets(&self, owner: Option<&str>) -> Result<Vec<DatasetInfo>, StoreError> {
        let rows = match owner {
            Some(o) => sqlx::query(&format!(
                "SELECT {DATASET_COLUMNS} FROM datasets WHERE owner_id = $1 ORDER BY created_at, id"
            ))
            .bind(o)
            .fetch_all(&self.pool)
            .await?,
            None => {
                sqlx::query(&format!(
                    "SELECT {DATASET_COLUMNS} FROM datasets ORDER BY created_at, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(dataset_from).collect()
    }

    // ---- jobs ----

    async fn insert_job(
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
        let rows = match owner {
            Some(o) => {
                sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE owner_id = $1 \
                     ORDER BY created_at DESC, id DESC LIMIT $2"
                ))
                .bind(o)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, id DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
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
             WHERE state = 'queued' AND id = (SELECT id FROM jobs WHERE state = 'queued' \
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
            "INSERT INTO job_runs (job_id, attempt, worker, started_at) VALUES ($1, $2, $3, $4)",
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

    async fn finish(
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

    /// Asks a job to stop: a queued job is cancelled at once, a running one when its worker next
    /// beats. Returns the job as it now stands.
    pub async fn cancel_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let now = now_ms();
        sqlx::query(
            "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = $1, \
             error_code = $2, error = 'cancelled by a client' \
             WHERE id = $3 AND state = 'queued'",
        )
        .bind(now)
        .bind(ErrorCode::Cancelled.as_str())
        .bind(id)
        .execute(&self.pool)
        .await?;
        sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = $1 AND state = 'running'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.get_job(id).await
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

    // ---- watermarks ----

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
        let sealed = self.sealer.seal(plan, &format!("watermarks/{id}/plan"));
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
        let rows = match owner {
            Some(o) => {
                sqlx::query(&format!(
                    "SELECT {WATERMARK_COLUMNS} FROM watermarks WHERE owner_id = $1 ORDER BY created_at, id"
                ))
                .bind(o)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {WATERMARK_COLUMNS} FROM watermarks ORDER BY created_at, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
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
            .map(|s| self.sealer.open(&s, &format!("watermarks/{id}/plan")))
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

    // ---- verifications ----

    /// How many of a watermark's triggers verifications have spent.
    pub async fn spent_triggers(&self, watermark: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM verifications \
             WHERE watermark_id = $1 AND spent_trigger IS NOT NULL",
        )
        .bind(watermark)
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?)
    }

    /// Creates a verification and its job. With `triggers` > 1 it spends the watermark's next
    /// unspent trigger, and answers `None` when every one is spent; concurrent requests never
    /// spend the same trigger (a unique index; the loser takes the next).
    pub async fn create_verification(
        &self,
        owner: &str,
        watermark: &str,
        holdout: &str,
        request: &serde_json::Value,
        triggers: i64,
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
                let n: i64 = sqlx::query(
                    "SELECT COUNT(*) AS n FROM verifications \
                     WHERE watermark_id = $1 AND spent_trigger IS NOT NULL",
                )
                .bind(watermark)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
                if n >= triggers {
                    tx.rollback().await?;
                    return Ok(None);
                }
                Some(n + 1)
            } else {
                None
            };
            let inserted = sqlx::query(
                "INSERT INTO verifications (id, owner_id, watermark_id, holdout_dataset_id, \
                 job_id, request, spent_trigger, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&id)
            .bind(owner)
            .bind(watermark)
            .bind(holdout)
            .bind(&job_id)
            .bind(request.to_string())
            .bind(spent)
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
        let rows = match owner {
            Some(o) => {
                sqlx::query(&format!(
                    "SELECT {VERIFICATION_COLUMNS} FROM verifications WHERE owner_id = $1 ORDER BY created_at, id"
                ))
                .bind(o)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {VERIFICATION_COLUMNS} FROM verifications ORDER BY created_at, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
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
