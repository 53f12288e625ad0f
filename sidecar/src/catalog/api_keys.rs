//! API keys for callers outside the mesh: issued once in clear, stored as SHA-256 hex.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::{audit, check_key, check_text, Actor, CatalogError, CatalogResult};
use crate::storage::{insert_returning_id, now_ms, with_returning_id, Db};

/// Every issued key starts with this, so leaked keys are recognisable by secret scanners.
pub const KEY_PREFIX: &str = "sk-meter-";
/// Characters of the key kept in clear (`key_prefix`) to tell keys apart in listings.
const DISPLAY_PREFIX_CHARS: usize = 14;

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: i64,
    /// First characters of the key, for recognising it; the key itself is never stored.
    pub prefix: String,
    pub user_id: String,
    pub name: Option<String>,
    /// active or revoked.
    pub status: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// The ledger user calls with this key are charged to.
    pub user_id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Unix milliseconds after which the key stops working.
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// Answer of issuing a key: the only time the key is shown.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct IssuedApiKey {
    /// The raw key; store it now, it cannot be shown again.
    pub key: String,
    #[serde(flatten)]
    pub api_key: ApiKey,
}

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct ApiKeyFilter {
    pub user_id: Option<String>,
}

/// Hash under which a raw key is stored; the ledger looks keys up by the same function.
pub fn hash_key(raw: &str) -> String {
    crate::ledger::hash_api_key(raw)
}

fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

const COLUMNS: &str =
    "id, key_prefix, user_id, name, status, created_at, last_used_at, expires_at, revoked_at";

fn from_row(row: &AnyRow) -> Result<ApiKey, sqlx::Error> {
    Ok(ApiKey {
        id: row.try_get("id")?,
        prefix: row.try_get("key_prefix")?,
        user_id: row.try_get("user_id")?,
        name: row.try_get("name")?,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

pub async fn issue(db: &Db, actor: &Actor, input: NewApiKey) -> CatalogResult<IssuedApiKey> {
    check_key("user_id", &input.user_id)?;
    if let Some(name) = &input.name {
        check_text("name", name, 191)?;
    }
    let now = now_ms();
    if matches!(input.expires_at, Some(at) if at <= now) {
        return Err(CatalogError::Invalid(
            "expires_at must be in the future".into(),
        ));
    }
    let key = generate_key();
    let prefix: String = key.chars().take(DISPLAY_PREFIX_CHARS).collect();
    let mut tx = db.begin_write().await?;
    let sql = with_returning_id(
        db.dialect(),
        &db.sql(
            "INSERT INTO api_keys (key_hash, key_prefix, user_id, name, status, created_at, expires_at) \
             VALUES (?, ?, ?, ?, 'active', ?, ?)",
        ),
    );
    let query = sqlx::query(&sql)
        .bind(hash_key(&key))
        .bind(prefix.clone())
        .bind(input.user_id.clone())
        .bind(input.name.clone())
        .bind(now)
        .bind(input.expires_at);
    let id = insert_returning_id(db.dialect(), tx.conn(), query).await?;
    let api_key = ApiKey {
        id,
        prefix,
        user_id: input.user_id,
        name: input.name,
        status: "active".into(),
        created_at: now,
        last_used_at: None,
        expires_at: input.expires_at,
        revoked_at: None,
    };
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "api_key.issue",
        "api_key",
        Some(&id.to_string()),
        &api_key,
    )
    .await?;
    tx.commit().await?;
    Ok(IssuedApiKey { key, api_key })
}

pub async fn list(db: &Db, filter: &ApiKeyFilter) -> CatalogResult<Vec<ApiKey>> {
    let rows = match &filter.user_id {
        Some(user) => {
            let sql = db
                .sql(&format!(
                    "SELECT {COLUMNS} FROM api_keys WHERE user_id = ? ORDER BY id"
                ))
                .into_owned();
            sqlx::query(&sql)
                .bind(user.clone())
                .fetch_all(db.pool())
                .await?
        }
        None => {
            let sql = format!("SELECT {COLUMNS} FROM api_keys ORDER BY id");
            sqlx::query(&sql).fetch_all(db.pool()).await?
        }
    };
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// Revokes a key; revoking a revoked key changes nothing and answers the same.
pub async fn revoke(db: &Db, actor: &Actor, id: i64) -> CatalogResult<ApiKey> {
    let mut tx = db.begin_write().await?;
    let sql = db
        .sql(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = ?"))
        .into_owned();
    let Some(row) = sqlx::query(&sql).bind(id).fetch_optional(tx.conn()).await? else {
        return Err(CatalogError::NotFound(format!(
            "api key {id} does not exist"
        )));
    };
    let mut key = from_row(&row)?;
    if key.status == "revoked" {
        return Ok(key);
    }
    let now = now_ms();
    sqlx::query(&db.sql("UPDATE api_keys SET status = 'revoked', revoked_at = ? WHERE id = ?"))
        .bind(now)
        .bind(id)
        .execute(tx.conn())
        .await?;
    key.status = "revoked".into();
    key.revoked_at = Some(now);
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "api_key.revoke",
        "api_key",
        Some(&id.to_string()),
        &key,
    )
    .await?;
    tx.commit().await?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_hashed_as_hex() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + 64);
        let hash = hash_key(&a);
        assert_eq!(hash.len(), 64);
        assert_ne!(hash, hash_key(&b));
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
