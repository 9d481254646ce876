//! API keys: created with a role, stored as a hash, revocable.

use super::*;

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

impl Store {
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

    pub(super) fn key_from(r: &AnyRow) -> Result<ApiKey, StoreError> {
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

    /// Revokes a key and ends its console sessions; false when no live key has that id.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        self.end_sessions_of(id).await?;
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
}
