//! Caller API keys: stored only as their SHA-256 hash, resolved to the owning user.

use crate::storage::Conn;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{Ledger, LedgerError};

/// Lower-case hex SHA-256 of a raw key: the value stored in `api_keys.key_hash`.
pub fn hash_api_key(raw: &str) -> String {
    hex::encode(Sha256::digest(raw.as_bytes()))
}

impl Ledger {
    /// The user owning an active, unexpired key, or None.
    pub async fn resolve_api_key(&self, raw: &str) -> Result<Option<String>, LedgerError> {
        let mut conn = Conn::from(self.db().pool().acquire().await?);
        self.resolve_api_key_on(&mut conn, raw).await
    }

    /// The user of a live key (active, not expired); None otherwise.
    pub(super) async fn resolve_api_key_on(
        &self,
        conn: &mut Conn,
        raw: &str,
    ) -> Result<Option<String>, LedgerError> {
        let owner = self.api_key_row(conn, raw).await?;
        Ok(owner.and_then(|(user_id, live)| live.then_some(user_id)))
    }

    /// The owner of a key, revoked or expired ones included: who a call admitted earlier
    /// (under a lease) belongs to.
    pub(super) async fn api_key_owner_on(
        &self,
        conn: &mut Conn,
        raw: &str,
    ) -> Result<Option<String>, LedgerError> {
        let owner = self.api_key_row(conn, raw).await?;
        Ok(owner.map(|(user_id, _)| user_id))
    }

    /// The key's owner and whether the key is live now.
    async fn api_key_row(
        &self,
        conn: &mut Conn,
        raw: &str,
    ) -> Result<Option<(String, bool)>, LedgerError> {
        if raw.is_empty() || raw.len() > 1024 {
            return Ok(None);
        }
        let sql = self
            .db()
            .sql("SELECT user_id, status, expires_at FROM api_keys WHERE key_hash = ?");
        let row = sqlx::query(&sql)
            .bind(hash_api_key(raw))
            .fetch_optional(&mut *conn)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status: String = row.try_get(1)?;
        let expires_at: Option<i64> = row.try_get(2)?;
        let live = status == "active" && expires_at.is_none_or(|e| e > self.now());
        Ok(Some((row.try_get(0)?, live)))
    }
}
