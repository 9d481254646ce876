//! Configuration of `hallmark serve`: a TOML file, then `HALLMARK_*` environment variables, then
//! command-line flags, each overriding the one before. Every setting has a default, so the
//! service starts with none of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Bad configuration: which setting, from where, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A setting has an invalid value.
    #[error("{origin}: {message}")]
    Invalid {
        /// `HALLMARK_X`, `--x` or `file: x`.
        origin: String,
        /// What was wrong.
        message: String,
    },
}

/// Settings as given by one source; absent ones fall through to the next.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialConfig {
    /// Address to listen on.
    pub bind: Option<String>,
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: Option<String>,
    /// Where releases, uploads and (by default) the database and key live.
    pub data_dir: Option<PathBuf>,
    /// 64 hex digits: the key that seals secrets at rest.
    pub secret_key: Option<String>,
    /// A file holding the key (64 hex digits).
    pub secret_key_file: Option<PathBuf>,
    /// Folders whose datasets may be registered by path.
    pub dataset_roots: Option<Vec<PathBuf>>,
    /// Let verifications query private, loopback and link-local addresses.
    pub allow_private_endpoints: Option<bool>,
    /// Jobs run at once by this process.
    pub workers: Option<usize>,
    /// Seconds without heartbeat after which a job is given to another worker.
    pub job_lease_secs: Option<f64>,
    /// Seconds an idle worker waits before it looks for work queued by another process.
    pub job_poll_secs: Option<f64>,
    /// Attempts before a job whose worker keeps dying is failed.
    pub job_max_attempts: Option<i64>,
    /// Seconds running jobs may take to finish at shutdown before they are parked.
    pub shutdown_grace_secs: Option<f64>,
    /// Largest JSON request body, bytes.
    pub body_limit: Option<usize>,
    /// Largest dataset upload, bytes.
    pub upload_limit: Option<usize>,
    /// Seconds a request may take.
    pub request_timeout_secs: Option<f64>,
    /// Requests handled at once (more wait).
    pub concurrency_limit: Option<usize>,
    /// Requests per second allowed to one key (bursts up to twice this).
    pub rate_limit_per_key: Option<f64>,
    /// The longest image side a dataset may have.
    pub max_image_side: Option<usize>,
    /// Decoded pixels of one dataset, bytes.
    pub max_dataset_bytes: Option<usize>,
    /// Files in one upload.
    pub max_upload_files: Option<usize>,
    /// Datasets one key may register or upload.
    pub max_datasets_per_key: Option<usize>,
    /// Bytes of uploads one key may keep on the server.
    pub max_upload_bytes_per_key: Option<u64>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on.
    pub bind: String,
    /// Database URL.
    pub database_url: String,
    /// Data folder.
    pub data_dir: PathBuf,
    /// The sealing key (from the configuration, or a key file in the data folder).
    pub secret_key: Option<[u8; 32]>,
    /// A file with the key.
    pub secret_key_file: Option<PathBuf>,
    /// Folders whose datasets may be registered by path.
    pub dataset_roots: Vec<PathBuf>,
    /// Private endpoints allowed.
    pub allow_private_endpoints: bool,
    /// Concurrent jobs.
    pub workers: usize,
    /// Job lease.
    pub job_lease: Duration,
    /// How often an idle worker looks for work.
    pub job_poll: Duration,
    /// Attempts per job.
    pub job_max_attempts: i64,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// JSON body limit.
    pub body_limit: usize,
    /// Upload limit.
    pub upload_limit: usize,
    /// Request timeout.
    pub request_timeout: Duration,
    /// Concurrent requests.
    pub concurrency_limit: usize,
    /// Requests per second per key.
    pub rate_limit_per_key: f64,
    /// The longest image side a dataset may have.
    pub max_image_side: usize,
    /// Decoded pixels of one dataset, bytes.
    pub max_dataset_bytes: usize,
    /// Files in one upload.
    pub max_upload_files: usize,
    /// Datasets one key may register or upload.
    pub max_datasets_per_key: usize,
    /// Bytes of uploads one key may keep on the server.
    pub max_upload_bytes_per_key: u64,
}

impl PartialConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.into(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// Reads `HALLMARK_*` variables through `get` (the process environment in production).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        fn parse<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            name: &str,
        ) -> Result<Option<T>, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            get(name)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.trim().parse::<T>().map_err(|e| ConfigError::Invalid {
                        origin: name.into(),
                        message: format!("{v:?}: {e}"),
                    })
                })
                .transpose()
        }
        Ok(Self {
            bind: parse(&get, "HALLMARK_BIND")?,
            database_url: parse(&get, "HALLMARK_DATABASE_URL")?,
            data_dir: parse(&get, "HALLMARK_DATA_DIR")?,
            secret_key: parse(&get, "HALLMARK_SECRET_KEY")?,
            secret_key_file: parse(&get, "HALLMARK_SECRET_KEY_FILE")?,
            dataset_roots: get("HALLMARK_DATASET_ROOTS")
                .filter(|v| !v.is_empty())
                .map(|v| std::env::split_paths(&v).collect()),
            allow_private_endpoints: parse(&get, "HALLMARK_ALLOW_PRIVATE_ENDPOINTS")?,
            workers: parse(&get, "HALLMARK_WORKERS")?,
            job_lease_secs: parse(&get, "HALLMARK_JOB_LEASE_SECS")?,
            job_poll_secs: parse(&get, "HALLMARK_JOB_POLL_SECS")?,
            job_max_attempts: parse(&get, "HALLMARK_JOB_MAX_ATTEMPTS")?,
            shutdown_grace_secs: parse(&get, "HALLMARK_SHUTDOWN_GRACE_SECS")?,
            body_limit: parse(&get, "HALLMARK_BODY_LIMIT")?,
            upload_limit: parse(&get, "HALLMARK_UPLOAD_LIMIT")?,
            request_timeout_secs: parse(&get, "HALLMARK_REQUEST_TIMEOUT_SECS")?,
            concurrency_limit: parse(&get, "HALLMARK_CONCURRENCY_LIMIT")?,
            rate_limit_per_key: parse(&get, "HALLMARK_RATE_LIMIT_PER_KEY")?,
            max_image_side: parse(&get, "HALLMARK_MAX_IMAGE_SIDE")?,
            max_dataset_bytes: parse(&get, "HALLMARK_MAX_DATASET_BYTES")?,
            max_upload_files: parse(&get, "HALLMARK_MAX_UPLOAD_FILES")?,
            max_datasets_per_key: parse(&get, "HALLMARK_MAX_DATASETS_PER_KEY")?,
            max_upload_bytes_per_key: parse(&get, "HALLMARK_MAX_UPLOAD_BYTES_PER_KEY")?,
        })
    }

    /// `self` with every setting that `over` gives replaced.
    pub fn overridden_by(self, over: PartialConfig) -> Self {
        Self {
            bind: over.bind.or(self.bind),
            database_url: over.database_url.or(self.database_url),
            data_dir: over.data_dir.or(self.data_dir),
            secret_key: over.secret_key.or(self.secret_key),
            secret_key_file: over.secret_key_file.or(self.secret_key_file),
            dataset_roots: over.dataset_roots.or(self.dataset_roots),
            allow_private_endpoints: over
                .allow_private_endpoints
                .or(self.allow_private_endpoints),
            workers: over.workers.or(self.workers),
            job_lease_secs: over.job_lease_secs.or(self.job_lease_secs),
            job_poll_secs: over.job_poll_secs.or(self.job_poll_secs),
            job_max_attempts: over.job_max_attempts.or(self.job_max_attempts),
            shutdown_grace_secs: over.shutdown_grace_secs.or(self.shutdown_grace_secs),
            body_limit: over.body_limit.or(self.body_limit),
            upload_limit: over.upload_limit.or(self.upload_limit),
            request_timeout_secs: over.request_timeout_secs.or(self.request_timeout_secs),
            concurrency_limit: over.concurrency_limit.or(self.concurrency_limit),
            rate_limit_per_key: over.rate_limit_per_key.or(self.rate_limit_per_key),
            max_image_side: over.max_image_side.or(self.max_image_side),
            max_dataset_bytes: over.max_dataset_bytes.or(self.max_dataset_bytes),
            max_upload_files: over.max_upload_files.or(self.max_upload_files),
            max_datasets_per_key: over.max_datasets_per_key.or(self.max_datasets_per_key),
            max_upload_bytes_per_key: over
                .max_upload_bytes_per_key
                .or(self.max_upload_bytes_per_key),
        }
    }

    /// Fills in defaults and checks every value.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let invalid = |origin: &str, message: String| ConfigError::Invalid {
            origin: origin.into(),
            message,
        };
        let secs = |v: Option<f64>, default: f64, name: &str| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(default);
            if !(v.is_finite() && v > 0.0 && v < 1e7) {
                return Err(invalid(
                    name,
                    format!("{v} is not a positive number of seconds"),
                ));
            }
            Ok(Duration::from_secs_f64(v))
        };
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| PathBuf::from("hallmark-data"));
        let database_url = self.database_url.unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                data_dir.join("hallmark.db").display()
            )
        });
        let secret_key = self
            .secret_key
            .map(|k| parse_key(&k).map_err(|m| invalid("secret_key", m.0)))
            .transpose()?;
        let workers = self.workers.unwrap_or(2);
        if workers == 0 || workers > 256 {
            return Err(invalid("workers", format!("{workers}: expected 1 to 256")));
        }
        // Two: a job whose worker died twice may be what kills it (a crash loop), so it is failed
        // rather than given a third worker to kill.
        let job_max_attempts = self.job_max_attempts.unwrap_or(2);
        if !(1..=100).contains(&job_max_attempts) {
            return Err(invalid(
                "job_max_attempts",
                format!("{job_max_attempts}: expected 1 to 100"),
            ));
        }
        let concurrency_limit = self.concurrency_limit.unwrap_or(256);
        if concurrency_limit == 0 {
            return Err(invalid("concurrency_limit", "must be at least 1".into()));
        }
        let rate_limit_per_key = self.rate_limit_per_key.unwrap_or(100.0);
        if !(rate_limit_per_key.is_finite() && rate_limit_per_key > 0.0) {
            return Err(invalid(
                "rate_limit_per_key",
                format!("{rate_limit_per_key}: expected a positive number"),
            ));
        }
        let positive = |v: Option<usize>, default: usize, name: &str| match v.unwrap_or(default) {
            0 => Err(invalid(name, "must be at least 1".into())),
            v => Ok(v),
        };
        let max_image_side = positive(self.max_image_side, 4096, "max_image_side")?;
        let max_dataset_bytes = positive(self.max_dataset_bytes, 2 << 30, "max_dataset_bytes")?;
        let max_upload_files = positive(self.max_upload_files, 100_000, "max_upload_files")?;
        let max_datasets_per_key =
            positive(self.max_datasets_per_key, 1000, "max_datasets_per_key")?;
        let max_upload_bytes_per_key = self.max_upload_bytes_per_key.unwrap_or(8 << 30);
        let dataset_roots = self
            .dataset_roots
            .unwrap_or_else(|| vec![data_dir.join("imports")]);
        Ok(ServeConfig {
            bind: self.bind.unwrap_or_else(|| "127.0.0.1:8080".into()),
            database_url,
            secret_key,
            secret_key_file: self.secret_key_file,
            dataset_roots,
            allow_private_endpoints: self.allow_private_endpoints.unwrap_or(false),
            workers,
            job_lease: secs(self.job_lease_secs, 30.0, "job_lease_secs")?,
            job_poll: secs(self.job_poll_secs, 0.5, "job_poll_secs")?,
            job_max_attempts,
            shutdown_grace: secs(self.shutdown_grace_secs, 20.0, "shutdown_grace_secs")?,
            body_limit: self.body_limit.unwrap_or(1 << 20),
            upload_limit: self.upload_limit.unwrap_or(512 << 20),
            request_timeout: secs(self.request_timeout_secs, 60.0, "request_timeout_secs")?,
            concurrency_limit,
            rate_limit_per_key,
            max_image_side,
            max_dataset_bytes,
            max_upload_files,
            max_datasets_per_key,
            max_upload_bytes_per_key,
            data_dir,
        })
    }
}

/// Parses 64 hex digits into a key.
pub fn parse_key(text: &str) -> Result<[u8; 32], crate::Invalid> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{} bytes; expected 32 (64 hex digits)", b.len()).into())
}

impl ServeConfig {
    /// The bounds every dataset the service reads is held to.
    pub fn dataset_limits(&self) -> crate::dataset::Limits {
        crate::dataset::Limits {
            max_side: self.max_image_side,
            max_bytes: self.max_dataset_bytes,
            ..crate::dataset::Limits::default()
        }
    }

    /// The sealing key: configured, or read from the key file, or (on first start with the
    /// default SQLite set-up) created in the data folder with mode 0600.
    pub fn load_or_create_key(&self) -> Result<[u8; 32], ConfigError> {
        if let Some(k) = self.secret_key {
            return Ok(k);
        }
        let (path, may_create) = match &self.secret_key_file {
            Some(p) => (p.clone(), false),
            None => (self.data_dir.join("secret.key"), true),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_key(&text).map_err(|m| ConfigError::File {
                path: path.clone(),
                message: m.0,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
                if self.database_url.starts_with("postgres") {
                    return Err(ConfigError::Invalid {
                        origin: "secret_key".into(),
                        message: "PostgreSQL is shared by several processes, which must seal \
                                  with the same key: set HALLMARK_SECRET_KEY or secret_key_file"
                            .into(),
                    });
                }
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| ConfigError::Invalid {
                    origin: "secret_key".into(),
                    message: format!("no random source: {e}"),
                })?;
                let file_err = |e: std::io::Error| ConfigError::File {
                    path: path.clone(),
                    message: e.to_string(),
                };
                crate::fsutil::create_private_dir(&self.data_dir).map_err(file_err)?;
                crate::fsutil::write_file_atomic(
                    &path,
                    format!("{}\n", hex::encode(key)).as_bytes(),
                    0o600,
                    false,
                )
                .map_err(file_err)?;
                tracing::warn!(
                    path = %path.display(),
                    "created a new sealing key; back it up: sealed secrets cannot be opened without it"
                );
                Ok(key)
            }
            Err(e) => Err(ConfigError::File {
                path,
                message: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_environment_which_overrides_the_file() {
        let file: PartialConfig =
            toml::from_str("bind = \"0.0.0.0:1\"\nworkers = 3\nbody_limit = 10").unwrap();
        let env = PartialConfig::from_env(|k| match k {
            "HALLMARK_BIND" => Some("0.0.0.0:2".into()),
            "HALLMARK_WORKERS" => Some("5".into()),
            _ => None,
        })
        .unwrap();
        let flags = PartialConfig {
            bind: Some("0.0.0.0:3".into()),
            ..Default::default()
        };
        let c = file
            .overridden_by(env)
            .overridden_by(flags)
            .resolve()
            .unwrap();
        assert_eq!(c.bind, "0.0.0.0:3");
        assert_eq!(c.workers, 5);
        assert_eq!(c.body_limit, 10);
        assert!(
            c.database_url
                .starts_with("sqlite://hallmark-data/hallmark.db")
        );
    }

    #[test]
    fn bad_values_name_their_origin() {
        let e = PartialConfig::from_env(|k| (k == "HALLMARK_WORKERS").then(|| "many".into()))
            .unwrap_err();
        assert!(e.to_string().starts_with("HALLMARK_WORKERS:"), "{e}");
        let e = toml::from_str::<PartialConfig>("wrokers = 2").unwrap_err();
        assert!(e.to_string().contains("wrokers"), "{e}");
        let e = PartialConfig {
            secret_key: Some("abcd".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("secret_key: 2 bytes"), "{e}");
        let e = PartialConfig {
            job_lease_secs: Some(-1.0),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("job_lease_secs"), "{e}");
    }
}
