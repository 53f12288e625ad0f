//! Quota types (`text_token`, `image`, ...): what a quota counts. Rows, not code.

use crate::storage::Conn;
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use super::{CatalogError, CatalogResult};
use crate::storage::{Db, Dialect};

#[derive(Serialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct QuotaType {
    pub code: String,
    pub name: String,
    /// What one unit is: total_tokens, input_tokens, output_tokens, images, requests, cost_micros.
    pub measure: String,
    /// Model type metered by this quota by default (text, image, embedding).
    pub model_type: Option<String>,
    pub unit_label: String,
}

pub async fn list(db: &Db) -> CatalogResult<Vec<QuotaType>> {
    let rows = sqlx::query(
        "SELECT code, name, measure, model_type, unit_label FROM quota_types ORDER BY code",
    )
    .fetch_all(db.pool())
    .await?;
    let mut types = Vec::with_capacity(rows.len());
    for row in rows {
        types.push(QuotaType {
            code: row.try_get("code")?,
            name: row.try_get("name")?,
            measure: row.try_get("measure")?,
            model_type: row.try_get("model_type")?,
            unit_label: row.try_get("unit_label")?,
        });
    }
    Ok(types)
}

/// Refuses a quota type that is not configured (422 with the known ones).
pub async fn ensure_exists(conn: &mut Conn, dialect: Dialect, code: &str) -> CatalogResult<()> {
    let sql = dialect.sql("SELECT code FROM quota_types WHERE code = ?");
    if sqlx::query(&sql)
        .bind(code.to_string())
        .fetch_optional(&mut *conn)
        .await?
        .is_some()
    {
        return Ok(());
    }
    let known: Vec<String> = sqlx::query("SELECT code FROM quota_types ORDER BY code")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
    Err(CatalogError::Invalid(format!(
        "unknown quota_type {code:?}; configured: {}",
        known.join(", ")
    )))
}

/// The quota type that meters a model type by default, if one is configured.
pub async fn default_for_model_type(
    conn: &mut Conn,
    dialect: Dialect,
    model_type: &str,
) -> CatalogResult<Option<String>> {
    let sql = dialect.sql("SELECT code FROM quota_types WHERE model_type = ? ORDER BY code");
    let row = sqlx::query(&sql)
        .bind(model_type.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|row| row.try_get::<String, _>(0)).transpose()?)
}
