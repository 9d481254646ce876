//! Storage: API keys, datasets, watermarks (secrets sealed), grants, verifications and durable
//! jobs, in SQLite (default) or PostgreSQL.
//!
//! One implementation serves both databases through sqlx's `Any` driver with runtime queries:
//! the schema uses only types both share (text, bigint, double precision) and the SQL is the
//! common dialect (`$n` parameters, `RETURNING`). The one difference is how a job is claimed:
//! PostgreSQL adds `FOR UPDATE SKIP LOCKED` so concurrent claimers skip each other's rows; SQLite
//! serialises writers, so the same single-statement `UPDATE … WHERE id = (SELECT …)` is already
//! atomic there. Migrations live in `migrations/sqlite` and `migrations/postgres`.

mod datasets;
mod jobs;
mod keys;
mod migrations;
mod seal;
mod sessions;
mod verifications;
mod watermarks;

pub use datasets::{DatasetInfo, NewDataset};
pub use jobs::{Beat, Claimed, Job, JobKind, JobState, Reaped, ShardJob};
pub use keys::{ApiKey, Role};
pub use verifications::VerificationInfo;
pub use watermarks::{NewWatermark, ReleaseFacts, WatermarkInfo};

use crate::ErrorCode;
use crate::dataset::{Format, Split};
use crate::verify::Decision;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor as _, Row};

pub use seal::{OpenError, Sealer};

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
            Backend::Sqlite => migrations::sqlite().await?.run(&pool).await?,
            Backend::Postgres => migrations::postgres().await?.run(&pool).await?,
        }
        Ok(Self {
            pool,
            backend,
            sealer: Sealer::new(key),
        })
    }

    /// Rows (`columns`) of `table` that belong to `owner` (every row when `None`), in `order`,
    /// at most `limit` when given: the one owner filter of every listing.
    async fn owned_rows(
        &self,
        table: &str,
        columns: &str,
        owner: Option<&str>,
        order: &str,
        limit: Option<i64>,
    ) -> Result<Vec<AnyRow>, StoreError> {
        let mut sql = format!("SELECT {columns} FROM {table}");
        let mut n = 0;
        if owner.is_some() {
            n += 1;
            sql.push_str(&format!(" WHERE owner_id = ${n}"));
        }
        sql.push_str(&format!(" ORDER BY {order}"));
        if limit.is_some() {
            n += 1;
            sql.push_str(&format!(" LIMIT ${n}"));
        }
        let mut q = sqlx::query(&sql);
        if let Some(o) = owner {
            q = q.bind(o);
        }
        if let Some(l) = limit {
            q = q.bind(l);
        }
        Ok(q.fetch_all(&self.pool).await?)
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
}
