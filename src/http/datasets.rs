//! `/v1/datasets`: datasets registered by a path under a configured root, or uploaded.

use std::path::{Component, Path, PathBuf};

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::{AppState, Caller, owns};
use crate::config::ServeConfig;
use crate::dataset::{self, Format, Split};
use crate::store::{DatasetInfo, NewDataset, Role};

pub(super) fn router(cfg: &ServeConfig) -> OpenApiRouter<AppState> {
    let upload = OpenApiRouter::new()
        .routes(routes!(upload_dataset))
        .layer(DefaultBodyLimit::max(cfg.upload_limit));
    OpenApiRouter::new()
        .routes(routes!(register_dataset, list_datasets))
        .routes(routes!(get_dataset))
        .merge(upload)
}

const ROLES: &[Role] = &[Role::Publisher, Role::Auditor, Role::Admin];

/// A dataset already on the server, under one of the configured dataset roots.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDatasetRequest {
    /// Display name.
    pub name: String,
    /// A folder or file below a dataset root (`dataset_roots`).
    pub path: String,
    /// `idx`, `cifar`, `cifar10`, `cifar100`, `folder`, `parquet` or `webdataset`; detected
    /// when absent.
    pub format: Option<String>,
    /// `train` or `test`, where the folder holds both.
    pub split: Option<String>,
    /// Read it shard by shard (Parquet or WebDataset shards, or an ImageFolder tree; images of
    /// any size): registering reads each image's stored bytes once, never the whole dataset
    /// into memory, and a watermark of it is written by one job per shard, on any worker
    /// (docs/service.md#streamed-datasets). Default false.
    #[serde(default)]
    pub stream: bool,
}

fn parse_format(f: Option<&str>) -> Result<Option<Format>, ApiError> {
    f.map(|f| {
        f.parse::<Format>()
            .map_err(|e| ApiError::invalid(format!("format: {e}")))
    })
    .transpose()
}

fn parse_split(s: Option<&str>) -> Result<Option<Split>, ApiError> {
    s.map(|s| {
        s.parse::<Split>()
            .map_err(|e| ApiError::invalid(format!("split: {e}")))
    })
    .transpose()
}

/// How a dataset is read when it is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Registered by path, read whole.
    Whole,
    /// Uploaded, read whole; errors name files relative to the upload's own folder (whose
    /// name on the server is nobody's business).
    Upload,
    /// Read shard by shard: the labels surveyed and each image's stored bytes hashed (its
    /// header read for its size), never the whole dataset in memory.
    Streamed,
}

/// Reads the dataset (off the async threads) within the service's limits and describes it for
/// the store.
#[allow(clippy::too_many_arguments)]
async fn describe(
    owner: &str,
    id: String,
    name: String,
    path: PathBuf,
    format: Option<Format>,
    split: Option<Split>,
    reading: Reading,
    limits: dataset::Limits,
) -> Result<NewDataset, ApiError> {
    let owner = owner.to_string();
    tokio::task::spawn_blocking(move || {
        let bad = |e: dataset::DatasetError| {
            let mut m = e.to_string();
            if reading == Reading::Upload {
                let root = path.to_string_lossy();
                m = m
                    .replace(&format!("{root}/"), "")
                    .replace(&*root, "the upload");
            }
            ApiError::invalid(format!("dataset: {m}"))
        };
        let (format, count, num_classes, shape, sha256) = if reading == Reading::Streamed {
            let survey = dataset::stream::survey(&path, format, split, &|| {}).map_err(bad)?;
            let fp = dataset::stream::fingerprint(&survey, &limits, &|| {}).map_err(bad)?;
            let shape = [fp.max_size[0], fp.max_size[1], survey.channels];
            let classes = survey.class_counts.len();
            (survey.format, survey.count(), classes, shape, fp.sha256)
        } else {
            let loaded =
                dataset::read_limited(&path, format, split, &|| {}, &limits).map_err(bad)?;
            let (d, s) = (&loaded.dataset, loaded.dataset.shape());
            let shape = [s.height, s.width, s.channels];
            (
                loaded.layout.format(),
                d.len(),
                d.num_classes(),
                shape,
                d.sha256(),
            )
        };
        Ok(NewDataset {
            id,
            owner_id: owner,
            name,
            path: path.to_string_lossy().into_owned(),
            format,
            split,
            count: count as i64,
            num_classes: num_classes as i64,
            shape: format!("{}x{}x{}", shape[0], shape[1], shape[2]),
            sha256,
            uploaded: reading == Reading::Upload,
            streamed: reading == Reading::Streamed,
        })
    })
    .await
    .map_err(ApiError::internal)?
}

/// Resolves `path` and checks it lies below one of `roots` (after following links), and that no
/// link inside it leads out of them. A path that does not exist gets the same answer as one
/// outside the roots, so the answer tells nothing of the server's other files.
fn inside_roots(path: &str, roots: &[PathBuf]) -> Result<PathBuf, ApiError> {
    let refused = || {
        ApiError::forbidden(
            "path: no dataset there below a configured dataset root (dataset_roots); upload the files instead",
        )
    };
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(ApiError::invalid("path: must be absolute"));
    }
    let real = p.canonicalize().map_err(|_| refused())?;
    if !roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|r| real.starts_with(&r))
    {
        return Err(refused());
    }
    match crate::fsutil::escapes_roots(&real, roots, 4) {
        Ok(None) => Ok(real),
        Ok(Some(entry)) => Err(ApiError::forbidden(format!(
            "path: {} is a link that leads out of the dataset roots",
            entry.display()
        ))),
        Err(_) => Err(refused()),
    }
}

/// Refuses a new dataset when the caller already has as many as its quota allows.
async fn check_dataset_quota(s: &AppState, caller: &Caller) -> Result<(), ApiError> {
    let n = s.store.list_datasets(Some(caller.id())).await?.len();
    if n >= s.cfg.max_datasets_per_key {
        return Err(ApiError::quota(format!(
            "this key has {n} datasets, the most allowed (max_datasets_per_key)"
        )));
    }
    Ok(())
}

/// Bytes the caller's uploads take on the server.
async fn uploaded_bytes(s: &AppState, caller: &Caller) -> Result<u64, ApiError> {
    let dirs: Vec<PathBuf> = s
        .store
        .list_datasets(Some(caller.id()))
        .await?
        .into_iter()
        .filter(|d| d.uploaded)
        .map(|d| PathBuf::from(d.path))
        .collect();
    tokio::task::spawn_blocking(move || dirs.iter().map(|d| dir_size(d)).sum())
        .await
        .map_err(ApiError::internal)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Registers a dataset already on the server.
#[utoipa::path(post, path = "/v1/datasets", tag = "datasets", request_body = RegisterDatasetRequest,
    responses((status = 201, body = DatasetInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn register_dataset(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<RegisterDatasetRequest>,
) -> Result<(StatusCode, ApiJson<DatasetInfo>), ApiError> {
    caller.require(ROLES, "registering datasets")?;
    let name = super::check_name(&req.name)?.to_string();
    let format = parse_format(req.format.as_deref())?;
    let split = parse_split(req.split.as_deref())?;
    let path = inside_roots(&req.path, &s.cfg.dataset_roots)?;
    check_dataset_quota(&s, &caller).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let limits = s.cfg.dataset_limits();
    let reading = if req.stream {
        Reading::Streamed
    } else {
        Reading::Whole
    };
    let new = describe(caller.id(), id, name, path, format, split, reading, limits).await?;
    let info = s.store.insert_dataset(new).await?;
    Ok((StatusCode::CREATED, ApiJson(info)))
}

/// An upload: form fields `name`, optional `format` and `split`, then the files (`images` and
/// `labels` IDX files, CIFAR batches, or `class/image.png` for a folder).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct UploadDatasetForm {
    /// Display name.
    name: String,
    /// Format; detected when absent.
    format: Option<String>,
    /// `train` or `test`.
    split: Option<String>,
    /// The files, each with its file name.
    #[schema(value_type = Vec<String>, format = Binary)]
    files: Vec<Vec<u8>>,
}

/// A file name from an upload: one or two plain components (`class/file.png`).
fn upload_name(name: &str) -> Result<PathBuf, ApiError> {
    let p = Path::new(name);
    let parts: Vec<_> = p.components().collect();
    let plain = |c: &Component| match c {
        Component::Normal(s) => s.to_str().is_some_and(|s| {
            !s.is_empty()
                && s.len() <= 200
                && s.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._- ".contains(ch))
                && !s.starts_with('.')
        }),
        _ => false,
    };
    if parts.is_empty() || parts.len() > 2 || !parts.iter().all(plain) {
        return Err(ApiError::invalid(format!(
            "file name {name:?}: expected `file` or `class/file` with letters, digits, `._- `"
        )));
    }
    Ok(p.to_path_buf())
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(e.body_text())
    } else {
        ApiError::invalid(format!("multipart: {}", e.body_text()))
    }
}

/// Uploads a dataset's files.
#[utoipa::path(post, path = "/v1/datasets/upload", tag = "datasets",
    request_body(content = UploadDatasetForm, content_type = "multipart/form-data"),
    responses((status = 201, body = DatasetInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub(super) async fn upload_dataset(
    State(s): State<AppState>,
    caller: Caller,
    form: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, ApiJson<DatasetInfo>), ApiError> {
    caller.require(ROLES, "uploading datasets")?;
    let mut form = form.map_err(|e| ApiError::invalid(format!("multipart: {}", e.body_text())))?;
    let quota = s.cfg.max_upload_bytes_per_key;
    let left = quota.saturating_sub(uploaded_bytes(&s, &caller).await?);
    let over_quota = || {
        ApiError::quota(format!(
            "the upload would take this key's uploads past {quota} bytes (max_upload_bytes_per_key)"
        ))
    };
    let mut bytes = 0u64;
    let id = uuid::Uuid::new_v4().to_string();
    let uploads = s.cfg.data_dir.join("uploads");
    let dest = uploads.join(&id);
    let dir = crate::fsutil::AtomicDir::create(&dest, false).map_err(ApiError::internal)?;
    let (mut name, mut format, mut split, mut files) = (None, None, None, 0usize);
    // A refused upload still reads the rest of the body (within the upload limit), so the client
    // gets the error rather than a connection reset in the middle of its request.
    let read: Result<(), ApiError> = async {
            while let Some(mut field) = form.next_field().await.map_err(multipart_error)? {
                match (field.name().unwrap_or(""), field.file_name()) {
                    ("name", None) => name = Some(field.text().await.map_err(multipart_error)?),
                    // An empty field (an HTML form's "detect" choice) is an absent one.
                    ("format", None) => format = Some(field.text().await.map_err(multipart_error)?).filter(|f| !f.is_empty()),
                    ("split", None) => split = Some(field.text().await.map_err(multipart_error)?).filter(|s| !s.is_empty()),
                    (_, Some(file)) => {
                        let rel = upload_name(file)?;
                        if files >= s.cfg.max_upload_files {
                            return Err(ApiError::too_large(format!(
                                "more than {} files in one upload (max_upload_files)",
                                s.cfg.max_upload_files
                            )));
                        }
                        let path = dir.path().join(&rel);
                        let clash = || {
                            ApiError::invalid(format!(
                                "file {file:?} clashes with another file of the upload (sent twice, or a file and a folder of one name)"
                            ))
                        };
                        if let Some(parent) = path.parent()
                            && parent != dir.path()
                        {
                            match std::fs::create_dir(parent) {
                                Ok(()) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && parent.is_dir() => {}
                                Err(_) => return Err(clash()),
                            }
                        }
                        let mut out = tokio::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&path)
                            .await
                            .map_err(|_| clash())?;
                        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                            bytes += chunk.len() as u64;
                            if bytes > left {
                                return Err(over_quota());
                            }
                            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                                .await
                                .map_err(ApiError::internal)?;
                        }
                        files += 1;
                    }
                    (other, None) => {
                        return Err(ApiError::invalid(format!(
                            "unexpected form field {other:?}: expected name, format, split or files"
                        )));
                    }
                }
            }
        Ok(())
    }
    .await;
    if let Err(e) = read {
        while let Ok(Some(mut field)) = form.next_field().await {
            while let Ok(Some(_)) = field.chunk().await {}
        }
        return Err(e);
    }
    check_dataset_quota(&s, &caller).await?;
    let name = super::check_name(name.as_deref().unwrap_or(""))?.to_string();
    if files == 0 {
        return Err(ApiError::invalid("no files in the upload"));
    }
    let format = parse_format(format.as_deref())?;
    let split = parse_split(split.as_deref())?;
    // Describe the files where they will stay, so the stored path is the final one.
    let tmp = dir.path().to_path_buf();
    let limits = s.cfg.dataset_limits();
    let mut new = describe(
        caller.id(),
        id,
        name,
        tmp,
        format,
        split,
        Reading::Upload,
        limits,
    )
    .await?;
    tokio::task::spawn_blocking(move || dir.commit())
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    new.path = dest.to_string_lossy().into_owned();
    let info = s.store.insert_dataset(new).await?;
    Ok((StatusCode::CREATED, ApiJson(info)))
}

/// The caller's datasets (every dataset for an admin).
#[utoipa::path(get, path = "/v1/datasets", tag = "datasets",
    responses((status = 200, body = Vec<DatasetInfo>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_datasets(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<Vec<DatasetInfo>>, ApiError> {
    let owner = (caller.role() != Role::Admin).then(|| caller.id().to_string());
    Ok(ApiJson(s.store.list_datasets(owner.as_deref()).await?))
}

/// One dataset.
#[utoipa::path(get, path = "/v1/datasets/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, body = DatasetInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_dataset(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<DatasetInfo>, ApiError> {
    match s.store.get_dataset(&id).await? {
        Some(d) if owns(&caller, &d.owner_id) => Ok(ApiJson(d)),
        _ => Err(ApiError::not_found("dataset")),
    }
}
