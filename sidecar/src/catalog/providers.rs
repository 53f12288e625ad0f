//! Upstream providers (openai, dashscope, ...), keyed by code.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::ToSchema;

use super::{audit, check_code, check_text, Actor, CatalogError, CatalogResult, Status};
use crate::storage::{is_unique_violation, now_ms, Db};

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// Code the filter's routes use, e.g. `openai`.
    pub code: String,
    pub name: String,
    pub base_url: Option<String>,
    pub status: Status,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewProvider {
    pub code: String,
    pub name: String,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub status: Status,
}

/// Fields to change; absent fields stay as they are.
#[derive(Deserialize, Serialize, ToSchema, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ProviderPatch {
    pub name: Option<String>,
    pub base_url: Option<String>,
    pub status: Option<Status>,
}

const COLUMNS: &str = "code, name, base_url, status, created_at, updated_at";

fn from_row(row: &AnyRow) -> Result<Provider, sqlx::Error> {
    Ok(Provider {
        code: row.try_get("code")?,
        name: row.try_get("name")?,
        base_url: row.try_get("base_url")?,
        status: Status::parse(&row.try_get::<String, _>("status")?),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub async fn list(db: &Db) -> CatalogResult<Vec<Provider>> {
    let sql = format!("SELECT {COLUMNS} FROM providers ORDER BY code");
    let rows = sqlx::query(&sql).fetch_all(db.pool()).await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

pub async fn get(db: &Db, code: &str) -> CatalogResult<Provider> {
    let sql = db
        .sql(&format!("SELECT {COLUMNS} FROM providers WHERE code = ?"))
        .into_owned();
    let row = sqlx::query(&sql)
        .bind(code.to_string())
        .fetch_optional(db.pool())
        .await?;
    match row {
        Some(row) => Ok(from_row(&row)?),
        None => Err(CatalogError::NotFound(format!(
            "provider {code:?} does not exist"
        ))),
    }
}

pub async fn create(db: &Db, actor: &Actor, input: NewProvider) -> CatalogResult<Provider> {
    check_code("code", &input.code)?;
    check_text("name", &input.name, 191)?;
    check_base_url(input.base_url.as_deref())?;
    let now = now_ms();
    let mut tx = db.begin_write().await?;
    let sql = db.sql("INSERT INTO providers (code, name, base_url, status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)");
    let inserted = sqlx::query(&sql)
        .bind(input.code.clone())
        .bind(input.name.clone())
        .bind(input.base_url.clone())
        .bind(input.status.as_str())
        .bind(now)
        .bind(now)
        .execute(tx.conn())
        .await;
    match inserted {
        Err(err) if is_unique_violation(&err) => {
            return Err(CatalogError::Conflict(format!(
                "provider {:?} already exists",
                input.code
            )))
        }
        other => other?,
    };
    let provider = Provider {
        code: input.code,
        name: input.name,
        base_url: input.base_url,
        status: input.status,
        created_at: now,
        updated_at: now,
    };
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "provider.create",
        "provider",
        Some(&provider.code),
        &provider,
    )
    .await?;
    tx.commit().await?;
    Ok(provider)
}

pub async fn update(
    db: &Db,
    actor: &Actor,
    code: &str,
    patch: ProviderPatch,
) -> CatalogResult<Provider> {
    if let Some(name) = &patch.name {
        check_text("name", name, 191)?;
    }
    check_base_url(patch.base_url.as_deref())?;
    let mut provider = get(db, code).await?;
    if let Some(name) = &patch.name {
        provider.name = name.clone();
    }
    if patch.base_url.is_some() {
        provider.base_url = patch.base_url.clone();
    }
    if let Some(status) = patch.status {
        provider.status = status;
    }
    provider.updated_at = now_ms();
    let mut tx = db.begin_write().await?;
    let sql = db.sql(
        "UPDATE providers SET name = ?, base_url = ?, status = ?, updated_at = ? WHERE code = ?",
    );
    let result = sqlx::query(&sql)
        .bind(provider.name.clone())
        .bind(provider.base_url.clone())
        .bind(provider.status.as_str())
        .bind(provider.updated_at)
        .bind(code.to_string())
        .execute(tx.conn())
        .await?;
    if result.rows_affected() == 0 {
        return Err(CatalogError::NotFound(format!(
            "provider {code:?} does not exist"
        )));
    }
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "provider.update",
        "provider",
        Some(code),
        &patch,
    )
    .await?;
    tx.commit().await?;
    Ok(provider)
}

/// Deletes a provider that has no models (a provider in use is disabled instead).
pub async fn delete(db: &Db, actor: &Actor, code: &str) -> CatalogResult<()> {
    let mut tx = db.begin_write().await?;
    let sql = db.sql("SELECT COUNT(*) FROM models WHERE provider_code = ?");
    let models: i64 = sqlx::query(&sql)
        .bind(code.to_string())
        .fetch_one(tx.conn())
        .await?
        .try_get(0)?;
    if models > 0 {
        return Err(CatalogError::Conflict(format!(
            "provider {code:?} has {models} model(s); delete them first or disable the provider"
        )));
    }
    let sql = db.sql("DELETE FROM providers WHERE code = ?");
    let result = sqlx::query(&sql)
        .bind(code.to_string())
        .execute(tx.conn())
        .await?;
    if result.rows_affected() == 0 {
        return Err(CatalogError::NotFound(format!(
            "provider {code:?} does not exist"
        )));
    }
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "provider.delete",
        "provider",
        Some(code),
        &(),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

fn check_base_url(url: Option<&str>) -> CatalogResult<()> {
    match url {
        Some(url)
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 1000 =>
        {
            Err(CatalogError::Invalid(format!(
                "base_url must be an http(s) URL of at most 1000 characters (got {url:?})"
            )))
        }
        _ => Ok(()),
    }
}
