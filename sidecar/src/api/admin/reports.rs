//! Read-only reports: usage records (filtered, paginated), cost report by day, provider,
//! model or user, and the admin audit trail.

use axum::extract::State;
use axum::Json;
use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use crate::api::docs::Problem;
use crate::api::problem::{ApiError, ApiQuery, ApiResult};
use crate::api::AppState;
use crate::catalog::as_u64;
use crate::pricing::COST_SCALE;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;
/// Longest range one cost report may cover.
const MAX_REPORT_DAYS: i64 = 3660;

/// Usage statuses a record can have.
const USAGE_STATUSES: [&str; 3] = ["settled", "voided", "expired"];

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    pub user_id: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub request_id: Option<String>,
    /// settled, voided or expired.
    pub status: Option<String>,
    /// Calls that ended at or after this instant (Unix ms).
    pub from: Option<i64>,
    /// Calls that ended before this instant (Unix ms).
    pub to: Option<i64>,
    /// Page size, 1-1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub id: i64,
    pub request_id: String,
    pub user_id: String,
    pub provider: String,
    pub model: String,
    pub quota_type: String,
    /// completed or partial.
    pub outcome: String,
    /// settled, voided or expired.
    pub status: String,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub images: u64,
    /// Quota units the call counted.
    pub units: u64,
    /// Units taken from the user's lots.
    pub charged: u64,
    /// Units beyond the balance, recorded as debt.
    pub debt: u64,
    /// Units that were held at authorize.
    pub held: u64,
    /// Cost, decimal string; absent when the call was unpriced.
    #[schema(value_type = Option<String>)]
    pub cost: Option<Decimal>,
    pub currency: Option<String>,
    pub price_version_id: Option<i64>,
    /// Some count was estimated by the filter rather than reported by the provider.
    pub estimated: bool,
    pub partial: bool,
    pub unpriced: bool,
    /// The call ran without a hold (sidecar unreachable at authorize).
    pub fail_open: bool,
    pub upstream_status: i64,
    pub reason: Option<String>,
    /// Booking day (YYYY-MM-DD in the configured time zone).
    pub day: String,
    pub started_at: Option<i64>,
    pub ended_at: i64,
    pub created_at: i64,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct UsagePage {
    pub items: Vec<UsageRecord>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Usage records, newest first, filtered and paginated.
#[utoipa::path(get, path = "/admin/v1/usage", tag = "reports", security(("admin" = [])), params(UsageQuery),
    responses((status = 200, body = UsagePage), (status = 400, body = Problem), (status = 422, body = Problem)))]
pub async fn list_usage(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> ApiResult<Json<UsagePage>> {
    let limit = page_limit(query.limit)?;
    let cursor = parse_cursor(query.cursor.as_deref())?;
    if let Some(status) = &query.status {
        if !USAGE_STATUSES.contains(&status.as_str()) {
            return Err(ApiError::unprocessable(format!(
                "status must be one of {} (got {status:?})",
                USAGE_STATUSES.join(", ")
            )));
        }
    }
    if let (Some(from), Some(to)) = (query.from, query.to) {
        if from >= to {
            return Err(ApiError::unprocessable("`from` must be before `to`"));
        }
    }
    let mut sql = format!("SELECT {USAGE_COLUMNS} FROM usage_records WHERE 1 = 1");
    let mut text_binds: Vec<(&str, String)> = Vec::new();
    for (column, value) in [
        ("user_id", &query.user_id),
        ("provider", &query.provider),
        ("model", &query.model),
        ("request_id", &query.request_id),
        ("status", &query.status),
    ] {
        if let Some(value) = value {
            text_binds.push((column, value.clone()));
        }
    }
    for (column, _) in &text_binds {
        sql.push_str(&format!(" AND {column} = ?"));
    }
    let mut int_binds = Vec::new();
    if let Some(from) = query.from {
        sql.push_str(" AND ended_at >= ?");
        int_binds.push(from);
    }
    if let Some(to) = query.to {
        sql.push_str(" AND ended_at < ?");
        int_binds.push(to);
    }
    if let Some(cursor) = cursor {
        sql.push_str(" AND id < ?");
        int_binds.push(cursor);
    }
    sql.push_str(" ORDER BY id DESC LIMIT ?");
    let sql = state.db.sql(&sql).into_owned();
    let mut statement = sqlx::query(&sql);
    for (_, value) in text_binds {
        statement = statement.bind(value);
    }
    for value in int_binds {
        statement = statement.bind(value);
    }
    statement = statement.bind(i64::from(limit) + 1);
    let rows = statement
        .fetch_all(state.db.pool())
        .await
        .map_err(ApiError::from)?;
    let mut items = rows
        .iter()
        .map(usage_from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::internal)?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|last| last.id.to_string())
    } else {
        None
    };
    Ok(Json(UsagePage { items, next_cursor }))
}

const USAGE_COLUMNS: &str = "id, request_id, user_id, provider, model, quota_type, outcome, status, input_tokens, \
    cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, images, units, charged, debt, held, \
    cost_micros, currency, price_version_id, estimated, partial, unpriced, fail_open, upstream_status, reason, day, \
    started_at, ended_at, created_at";

fn usage_from_row(row: &AnyRow) -> Result<UsageRecord, sqlx::Error> {
    let flag = |name: &str| row.try_get::<i32, _>(name).map(|v| v != 0);
    let count = |name: &str| row.try_get::<i64, _>(name).map(as_u64);
    let cost_micros: Option<i64> = row.try_get("cost_micros")?;
    Ok(UsageRecord {
        id: row.try_get("id")?,
        request_id: row.try_get("request_id")?,
        user_id: row.try_get("user_id")?,
        provider: row.try_get("provider")?,
        model: row.try_get("model")?,
        quota_type: row.try_get("quota_type")?,
        outcome: row.try_get("outcome")?,
        status: row.try_get("status")?,
        input_tokens: count("input_tokens")?,
        cached_input_tokens: count("cached_input_tokens")?,
        cache_write_tokens: count("cache_write_tokens")?,
        output_tokens: count("output_tokens")?,
        reasoning_tokens: count("reasoning_tokens")?,
        images: count("images")?,
        units: count("units")?,
        charged: count("charged")?,
        debt: count("debt")?,
        held: count("held")?,
        cost: cost_micros.map(|micros| Decimal::new(micros, COST_SCALE)),
        currency: row.try_get("currency")?,
        price_version_id: row.try_get("price_version_id")?,
        estimated: flag("estimated")?,
        partial: flag("partial")?,
        unpriced: flag("unpriced")?,
        fail_open: flag("fail_open")?,
        upstream_status: row.try_get::<i64, _>("upstream_status")?,
        reason: row.try_get("reason")?,
        day: row.try_get("day")?,
        started_at: row.try_get("started_at")?,
        ended_at: row.try_get("ended_at")?,
        created_at: row.try_get("created_at")?,
    })
}

fn page_limit(limit: Option<u32>) -> ApiResult<u32> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        limit @ 1..=MAX_LIMIT => Ok(limit),
        other => Err(ApiError::unprocessable(format!(
            "limit must be 1-{MAX_LIMIT} (got {other})"
        ))),
    }
}

fn parse_cursor(cursor: Option<&str>) -> ApiResult<Option<i64>> {
    cursor
        .map(|raw| {
            raw.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
                ApiError::bad_request(format!("cursor {raw:?} is not a cursor this API returned"))
            })
        })
        .transpose()
}

// ---- cost report ----

#[derive(Deserialize, Serialize, ToSchema, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Day,
    Provider,
    Model,
    User,
}

impl GroupBy {
    /// Column expression the report groups by.
    fn expression(self) -> &'static str {
        match self {
            GroupBy::Day => "day",
            GroupBy::Provider => "provider",
            // A model name is only unique within its provider.
            GroupBy::Model => "provider, model",
            GroupBy::User => "user_id",
        }
    }
}

#[derive(Deserialize, IntoParams, Debug)]
#[into_params(parameter_in = Query)]
pub struct CostQuery {
    /// First day, YYYY-MM-DD (configured time zone), inclusive.
    pub from: String,
    /// Last day, YYYY-MM-DD, inclusive.
    pub to: String,
    /// day (default), provider, model or user.
    pub group_by: Option<GroupBy>,
    /// Only this user's calls.
    pub user_id: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct CostRow {
    /// The group: a day, a provider code, `provider/model`, or a user id.
    pub key: String,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Absent for calls that were not priced.
    pub currency: Option<String>,
    pub requests: u64,
    pub unpriced_requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub images: u64,
    pub units: u64,
    /// Decimal string, exact to 0.000001.
    #[schema(value_type = String)]
    pub cost: Decimal,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct CostReport {
    pub from: String,
    pub to: String,
    pub group_by: GroupBy,
    pub timezone: String,
    pub rows: Vec<CostRow>,
    /// One total per currency (and one for unpriced calls).
    pub totals: Vec<CostRow>,
}

/// Cost and usage sums over days, grouped by day, provider, model or user.
#[utoipa::path(get, path = "/admin/v1/reports/cost", tag = "reports", security(("admin" = [])), params(CostQuery),
    responses((status = 200, body = CostReport), (status = 400, body = Problem), (status = 422, body = Problem)))]
pub async fn cost_report(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<CostQuery>,
) -> ApiResult<Json<CostReport>> {
    let from = parse_day("from", &query.from)?;
    let to = parse_day("to", &query.to)?;
    if to < from {
        return Err(ApiError::unprocessable("`to` must not be before `from`"));
    }
    if (to - from).num_days() > MAX_REPORT_DAYS {
        return Err(ApiError::unprocessable(format!(
            "a report covers at most {MAX_REPORT_DAYS} days"
        )));
    }
    let group_by = query.group_by.unwrap_or(GroupBy::Day);
    let (from, to) = (
        from.format("%Y-%m-%d").to_string(),
        to.format("%Y-%m-%d").to_string(),
    );
    let rows = cost_rows(&state, group_by, &from, &to, query.user_id.as_deref())
        .await
        .map_err(ApiError::from)?;
    let totals = totals_by_currency(&rows);
    Ok(Json(CostReport {
        from,
        to,
        group_by,
        timezone: state.timezone.name().to_string(),
        rows,
        totals,
    }))
}

async fn cost_rows(
    state: &AppState,
    group_by: GroupBy,
    from: &str,
    to: &str,
    user_id: Option<&str>,
) -> Result<Vec<CostRow>, sqlx::Error> {
    let dialect = state.db.dialect();
    let sums = crate::ledger::DAILY_COST_SUMS
        .iter()
        .map(|column| format!("{} AS {column}", dialect.sum_i64(column)))
        .collect::<Vec<_>>()
        .join(", ");
    let group = group_by.expression();
    let user_filter = if user_id.is_some() {
        " AND user_id = ?"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {group}, currency, {sums} FROM daily_costs WHERE day >= ? AND day <= ?{user_filter} \
         GROUP BY {group}, currency ORDER BY {group}, currency"
    );
    let sql = state.db.sql(&sql).into_owned();
    let mut statement = sqlx::query(&sql)
        .bind(from.to_string())
        .bind(to.to_string());
    if let Some(user_id) = user_id {
        statement = statement.bind(user_id.to_string());
    }
    let rows = statement.fetch_all(state.db.pool()).await?;
    rows.iter().map(|row| cost_row(row, group_by)).collect()
}

fn cost_row(row: &AnyRow, group_by: GroupBy) -> Result<CostRow, sqlx::Error> {
    let count = |name: &str| row.try_get::<i64, _>(name).map(as_u64);
    let (key, provider, model) = match group_by {
        GroupBy::Day => (row.try_get("day")?, None, None),
        GroupBy::Provider => {
            let provider: String = row.try_get("provider")?;
            (provider.clone(), Some(provider), None)
        }
        GroupBy::Model => {
            let provider: String = row.try_get("provider")?;
            let model: String = row.try_get("model")?;
            (format!("{provider}/{model}"), Some(provider), Some(model))
        }
        GroupBy::User => (row.try_get("user_id")?, None, None),
    };
    Ok(CostRow {
        key,
        provider,
        model,
        currency: row.try_get("currency")?,
        requests: count("requests")?,
        unpriced_requests: count("unpriced_requests")?,
        input_tokens: count("input_tokens")?,
        cached_input_tokens: count("cached_input_tokens")?,
        cache_write_tokens: count("cache_write_tokens")?,
        output_tokens: count("output_tokens")?,
        reasoning_tokens: count("reasoning_tokens")?,
        images: count("images")?,
        units: count("units")?,
        cost: Decimal::new(row.try_get::<i64, _>("cost_micros")?, COST_SCALE),
    })
}

/// Sums rows per currency; money of different currencies is never added together.
fn totals_by_currency(rows: &[CostRow]) -> Vec<CostRow> {
    let mut totals: Vec<CostRow> = Vec::new();
    for row in rows {
        let index = match totals
            .iter()
            .position(|total| total.currency == row.currency)
        {
            Some(index) => index,
            None => {
                totals.push(CostRow {
                    key: "total".to_string(),
                    provider: None,
                    model: None,
                    currency: row.currency.clone(),
                    requests: 0,
                    unpriced_requests: 0,
                    input_tokens: 0,
                    cached_input_tokens: 0,
                    cache_write_tokens: 0,
                    output_tokens: 0,
                    reasoning_tokens: 0,
                    images: 0,
                    units: 0,
                    cost: Decimal::new(0, COST_SCALE),
                });
                totals.len() - 1
            }
        };
        let total = &mut totals[index];
        total.requests += row.requests;
        total.unpriced_requests += row.unpriced_requests;
        total.input_tokens += row.input_tokens;
        total.cached_input_tokens += row.cached_input_tokens;
        total.cache_write_tokens += row.cache_write_tokens;
        total.output_tokens += row.output_tokens;
        total.reasoning_tokens += row.reasoning_tokens;
        total.images += row.images;
        total.units += row.units;
        total.cost += row.cost;
    }
    totals
}

fn parse_day(field: &str, raw: &str) -> ApiResult<NaiveDate> {
    NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| {
        ApiError::unprocessable(format!("`{field}` must be a day YYYY-MM-DD (got {raw:?})"))
    })
}

// ---- audit trail ----

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    pub actor: Option<String>,
    /// e.g. `grant.create`, `price.create`.
    pub action: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct AuditEntry {
    pub id: i64,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: Option<String>,
    /// JSON text of what was done.
    pub detail: Option<String>,
    pub created_at: i64,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct AuditPage {
    pub items: Vec<AuditEntry>,
    pub next_cursor: Option<String>,
}

/// Admin actions, newest first.
#[utoipa::path(get, path = "/admin/v1/audit", tag = "reports", security(("admin" = [])), params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = Problem), (status = 422, body = Problem)))]
pub async fn list_audit(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    let limit = page_limit(query.limit)?;
    let cursor = parse_cursor(query.cursor.as_deref())?;
    let mut sql =
        "SELECT id, actor, action, target_type, target_id, detail, created_at FROM admin_audit WHERE 1 = 1".to_string();
    let mut text_binds = Vec::new();
    if let Some(actor) = &query.actor {
        sql.push_str(" AND actor = ?");
        text_binds.push(actor.clone());
    }
    if let Some(action) = &query.action {
        sql.push_str(" AND action = ?");
        text_binds.push(action.clone());
    }
    if cursor.is_some() {
        sql.push_str(" AND id < ?");
    }
    sql.push_str(" ORDER BY id DESC LIMIT ?");
    let sql = state.db.sql(&sql).into_owned();
    let mut statement = sqlx::query(&sql);
    for value in text_binds {
        statement = statement.bind(value);
    }
    if let Some(cursor) = cursor {
        statement = statement.bind(cursor);
    }
    statement = statement.bind(i64::from(limit) + 1);
    let rows = statement
        .fetch_all(state.db.pool())
        .await
        .map_err(ApiError::from)?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        items.push(audit_from_row(row).map_err(ApiError::internal)?);
    }
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|last| last.id.to_string())
    } else {
        None
    };
    Ok(Json(AuditPage { items, next_cursor }))
}

fn audit_from_row(row: &AnyRow) -> Result<AuditEntry, sqlx::Error> {
    Ok(AuditEntry {
        id: row.try_get("id")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target_type: row.try_get("target_type")?,
        target_id: row.try_get("target_id")?,
        detail: row.try_get("detail")?,
        created_at: row.try_get("created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(currency: Option<&str>, requests: u64, cost: &str) -> CostRow {
        CostRow {
            key: "k".into(),
            provider: None,
            model: None,
            currency: currency.map(str::to_string),
            requests,
            unpriced_requests: 0,
            input_tokens: 1,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 1,
            reasoning_tokens: 0,
            images: 0,
            units: 2,
            cost: cost.parse().unwrap(),
        }
    }

    #[test]
    fn totals_never_mix_currencies() {
        let totals = totals_by_currency(&[
            row(Some("CNY"), 1, "0.000001"),
            row(Some("USD"), 2, "1.5"),
            row(Some("CNY"), 3, "0.000002"),
        ]);
        assert_eq!(totals.len(), 2);
        assert_eq!(totals[0].currency.as_deref(), Some("CNY"));
        assert_eq!(totals[0].requests, 4);
        assert_eq!(totals[0].cost.to_string(), "0.000003");
        assert_eq!(totals[1].cost.to_string(), "1.5");
    }

    #[test]
    fn limits_and_cursors_are_checked() {
        assert_eq!(page_limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(page_limit(Some(0)).unwrap_err().status, 422);
        assert_eq!(page_limit(Some(MAX_LIMIT + 1)).unwrap_err().status, 422);
        assert_eq!(parse_cursor(Some("42")).unwrap(), Some(42));
        assert_eq!(parse_cursor(Some("abc")).unwrap_err().status, 400);
        assert!(parse_day("from", "2025-02-30").is_err());
    }
}
