//! Registered datasets.

use super::*;

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
    /// Whether it is read shard by shard (its sha256 is then over its images' stored bytes,
    /// `hallmark-stream-v1`, and `shape` is its largest image's) and released by one job per
    /// shard.
    pub streamed: bool,
    /// Unix milliseconds.
    pub created_at: i64,
}

const DATASET_COLUMNS: &str = "id, owner_id, name, path, format, split, count, num_classes, shape, \
     sha256, uploaded, streamed, created_at";

fn dataset_from(r: &AnyRow) -> Result<DatasetInfo, StoreError> {
    Ok(DatasetInfo {
        id: r.try_get("id")?,
        owner_id: r.try_get("owner_id")?,
        name: r.try_get("name")?,
        path: r.try_get("path")?,
        format: r
            .try_get::<String, _>("format")?
            .parse()
            .map_err(|e: crate::Invalid| corrupt("datasets.format", &e.0))?,
        split: r
            .try_get::<Option<String>, _>("split")?
            .map(|s| {
                s.parse()
                    .map_err(|e: crate::Invalid| corrupt("datasets.split", &e.0))
            })
            .transpose()?,
        count: r.try_get("count")?,
        num_classes: r.try_get("num_classes")?,
        shape: r.try_get("shape")?,
        sha256: r.try_get("sha256")?,
        uploaded: r.try_get::<i64, _>("uploaded")? != 0,
        streamed: r.try_get::<i64, _>("streamed")? != 0,
        created_at: r.try_get("created_at")?,
    })
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
    /// Read shard by shard.
    pub streamed: bool,
}

impl Store {
    /// Registers a dataset.
    pub async fn insert_dataset(&self, d: NewDataset) -> Result<DatasetInfo, StoreError> {
        let created_at = now_ms();
        sqlx::query(&format!(
            "INSERT INTO datasets ({DATASET_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
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
        .bind(i64::from(d.streamed))
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
            streamed: d.streamed,
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
        let rows = self
            .owned_rows("datasets", DATASET_COLUMNS, owner, "created_at, id", None)
            .await?;
        rows.iter().map(dataset_from).collect()
    }
}
