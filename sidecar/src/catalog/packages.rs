//! Token packages: quota sold once (by order), optionally valid for a number of days.

use std::str::FromStr;

use crate::storage::Conn;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::ToSchema;

use super::plans::{check_price, default_priority};
use super::{
    as_u64, audit, check_code, check_currency, check_text, default_currency, positive_units,
    quota_types, Actor, CatalogError, CatalogResult, Status,
};
use crate::storage::{
    insert_returning_id, is_unique_violation, now_ms, with_returning_id, Db, Dialect,
};

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub id: i64,
    pub code: String,
    pub name: String,
    pub quota_type: String,
    /// Units granted per purchase.
    pub amount: u64,
    /// Sale price, decimal string.
    #[schema(value_type = String)]
    pub price: Decimal,
    pub currency: String,
    /// Days a purchase stays usable; absent = no expiry.
    pub valid_days: Option<u32>,
    pub priority: i32,
    pub status: Status,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewPackage {
    pub code: String,
    pub name: String,
    pub quota_type: String,
    pub amount: u64,
    #[schema(value_type = String)]
    pub price: Decimal,
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default)]
    pub valid_days: Option<u32>,
    #[serde(default = "default_priority")]
    pub priority: i32,
    #[serde(default)]
    pub status: Status,
}

/// Fields to change; they apply to later purchases only.
#[derive(Deserialize, Serialize, ToSchema, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct PackagePatch {
    pub name: Option<String>,
    pub amount: Option<u64>,
    #[schema(value_type = Option<String>)]
    pub price: Option<Decimal>,
    pub valid_days: Option<u32>,
    pub priority: Option<i32>,
    pub status: Option<Status>,
}

const COLUMNS: &str =
    "id, code, name, quota_type, amount, price, currency, valid_days, priority, status, created_at, updated_at";

fn from_row(row: &AnyRow) -> Result<Package, CatalogError> {
    let price: String = row.try_get("price")?;
    let valid_days: Option<i32> = row.try_get("valid_days")?;
    Ok(Package {
        id: row.try_get("id")?,
        code: row.try_get("code")?,
        name: row.try_get("name")?,
        quota_type: row.try_get("quota_type")?,
        amount: as_u64(row.try_get("amount")?),
        price: Decimal::from_str(&price)
            .map_err(|_| CatalogError::Invalid(format!("stored package price {price:?}")))?,
        currency: row.try_get("currency")?,
        valid_days: valid_days.and_then(|d| u32::try_from(d).ok()),
        priority: row.try_get::<i32, _>("priority")?,
        status: Status::parse(&row.try_get::<String, _>("status")?),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub async fn list(db: &Db) -> CatalogResult<Vec<Package>> {
    let sql = format!("SELECT {COLUMNS} FROM token_packages ORDER BY code");
    let rows = sqlx::query(&sql).fetch_all(db.pool()).await?;
    rows.iter().map(from_row).collect()
}

pub async fn get_on(conn: &mut Conn, dialect: Dialect, code: &str) -> CatalogResult<Package> {
    let sql = dialect
        .sql(&format!(
            "SELECT {COLUMNS} FROM token_packages WHERE code = ?"
        ))
        .into_owned();
    match sqlx::query(&sql)
        .bind(code.to_string())
        .fetch_optional(&mut *conn)
        .await?
    {
        Some(row) => from_row(&row),
        None => Err(CatalogError::NotFound(format!(
            "package {code:?} does not exist"
        ))),
    }
}

pub async fn get(db: &Db, code: &str) -> CatalogResult<Package> {
    let mut conn = Conn::from(db.pool().acquire().await?);
    get_on(&mut conn, db.dialect(), code).await
}

pub async fn create(db: &Db, actor: &Actor, input: NewPackage) -> CatalogResult<Package> {
    check_code("code", &input.code)?;
    check_text("name", &input.name, 191)?;
    check_currency(&input.currency)?;
    check_price(Some(input.price))?;
    let amount = positive_units("amount", input.amount)?;
    let valid_days = check_valid_days(input.valid_days)?;
    let mut tx = db.begin_write().await?;
    quota_types::ensure_exists(tx.conn(), db.dialect(), &input.quota_type).await?;
    let now = now_ms();
    let sql = with_returning_id(
        db.dialect(),
        &db.sql(
            "INSERT INTO token_packages (code, name, quota_type, amount, price, currency, valid_days, priority, status, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ),
    );
    let query = sqlx::query(&sql)
        .bind(input.code.clone())
        .bind(input.name.clone())
        .bind(input.quota_type.clone())
        .bind(amount)
        .bind(input.price.to_string())
        .bind(input.currency.clone())
        .bind(valid_days)
        .bind(input.priority)
        .bind(input.status.as_str())
        .bind(now)
        .bind(now);
    if let Err(err) = insert_returning_id(db.dialect(), tx.conn(), query).await {
        if is_unique_violation(&err) {
            return Err(CatalogError::Conflict(format!(
                "package {:?} already exists",
                input.code
            )));
        }
        return Err(err.into());
    }
    let package = get_on(tx.conn(), db.dialect(), &input.code).await?;
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "package.create",
        "package",
        Some(&package.code),
        &package,
    )
    .await?;
    tx.commit().await?;
    Ok(package)
}

pub async fn update(
    db: &Db,
    actor: &Actor,
    code: &str,
    patch: PackagePatch,
) -> CatalogResult<Package> {
    if let Some(name) = &patch.name {
        check_text("name", name, 191)?;
    }
    check_price(patch.price)?;
    let mut tx = db.begin_write().await?;
    let mut package = get_on(tx.conn(), db.dialect(), code).await?;
    if let Some(name) = &patch.name {
        package.name = name.clone();
    }
    if let Some(amount) = patch.amount {
        positive_units("amount", amount)?;
        package.amount = amount;
    }
    if let Some(price) = patch.price {
        package.price = price;
    }
    if patch.valid_days.is_some() {
        package.valid_days = patch.valid_days;
    }
    if let Some(priority) = patch.priority {
        package.priority = priority;
    }
    if let Some(status) = patch.status {
        package.status = status;
    }
    let sql = db.sql(
        "UPDATE token_packages SET name = ?, amount = ?, price = ?, valid_days = ?, priority = ?, status = ?, updated_at = ? WHERE id = ?",
    );
    sqlx::query(&sql)
        .bind(package.name.clone())
        .bind(positive_units("amount", package.amount)?)
        .bind(package.price.to_string())
        .bind(check_valid_days(package.valid_days)?)
        .bind(package.priority)
        .bind(package.status.as_str())
        .bind(now_ms())
        .bind(package.id)
        .execute(tx.conn())
        .await?;
    let package = get_on(tx.conn(), db.dialect(), code).await?;
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "package.update",
        "package",
        Some(code),
        &patch,
    )
    .await?;
    tx.commit().await?;
    Ok(package)
}

/// Deletes a package from the catalog; lots already purchased keep their quota.
pub async fn delete(db: &Db, actor: &Actor, code: &str) -> CatalogResult<()> {
    let mut tx = db.begin_write().await?;
    let package = get_on(tx.conn(), db.dialect(), code).await?;
    sqlx::query(&db.sql("DELETE FROM token_packages WHERE id = ?"))
        .bind(package.id)
        .execute(tx.conn())
        .await?;
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "package.delete",
        "package",
        Some(code),
        &package,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

fn check_valid_days(days: Option<u32>) -> CatalogResult<Option<i32>> {
    match days {
        None => Ok(None),
        Some(days) if (1..=36_500).contains(&days) => Ok(Some(days as i32)),
        Some(days) => Err(CatalogError::Invalid(format!(
            "valid_days must be 1-36500 (got {days})"
        ))),
    }
}
