//! Web console sessions: a random token in a cookie stands for the API key that signed in.

use super::*;

/// sha256 of a session token, as stored.
fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Store {
    /// Opens a session for the key `key_id` lasting `ttl_ms`; returns the token (never stored).
    pub async fn create_session(&self, key_id: &str, ttl_ms: i64) -> Result<String, StoreError> {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).expect("the operating system's random source works");
        let token = hex::encode(b);
        let now = now_ms();
        // Expired sessions go whenever a new one starts.
        sqlx::query("DELETE FROM console_sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (token_hash, key_id, created_at, expires_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(token_hash(&token))
        .bind(key_id)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .execute(&self.pool)
        .await?;
        Ok(token)
    }

    /// The live key behind a session token: none when the session is unknown, expired or
    /// signed out, or its key was revoked.
    pub async fn session_key(&self, token: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(
            "SELECT k.id, k.name, k.role, k.created_at, k.revoked_at \
             FROM console_sessions s JOIN api_keys k ON k.id = s.key_id \
             WHERE s.token_hash = $1 AND s.expires_at > $2 AND k.revoked_at IS NULL",
        )
        .bind(token_hash(token))
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::key_from).transpose()
    }

    /// Ends a session (signing out); false when there was none.
    pub async fn end_session(&self, token: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
            .bind(token_hash(token))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Ends every session of a key.
    pub async fn end_sessions_of(&self, key_id: &str) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM console_sessions WHERE key_id = $1")
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
