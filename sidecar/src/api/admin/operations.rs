//! Operations: the monthly reset (trigger and inspect) and reconcile.

use axum::body::Bytes;
use axum::extract::State;
use axum::{Extension, Json};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use crate::api::auth::AdminActor;
use crate::api::docs::Problem;
use crate::api::problem::{ApiError, ApiQuery, ApiResult};
use crate::api::AppState;
use crate::catalog::{audit, Actor};
use crate::jobs::{last_completed_period, next_reset_at, run_monthly_reset, Period};
use crate::ledger::{MonthlyResetReport, ReconcileReport};

#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ResetTrigger {
    /// YYYY-MM; default the current period. Future periods are refused.
    #[serde(default)]
    pub period: Option<String>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct ResetRun {
    pub period: String,
    /// Active memberships found for the period.
    pub memberships: u64,
    /// Memberships reset by this run.
    pub reset: u64,
    /// Memberships an earlier run had already reset (a second trigger changes nothing).
    pub already_done: u64,
    pub lots_granted: u64,
    pub units_expired: u64,
    /// Memberships that failed, with the reason (the period is then not marked completed).
    #[schema(value_type = Vec<Object>)]
    pub failed: Vec<(i64, String)>,
    /// True when every membership of the period is reset.
    pub completed: bool,
}

impl From<MonthlyResetReport> for ResetRun {
    fn from(report: MonthlyResetReport) -> Self {
        ResetRun {
            completed: report.failed.is_empty(),
            period: report.period,
            memberships: report.memberships,
            reset: report.reset,
            already_done: report.already_done,
            lots_granted: report.lots_granted,
            units_expired: report.units_expired,
            failed: report.failed,
        }
    }
}

/// Run the monthly reset of a period now (safe to repeat: each membership is reset once per period).
#[utoipa::path(post, path = "/admin/v1/resets", tag = "operations", security(("admin" = [])),
    request_body(content = Option<ResetTrigger>, description = "optional; none or {} runs the current period"),
    responses((status = 200, body = ResetRun), (status = 422, body = Problem)))]
pub async fn trigger_reset(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    body: Bytes,
) -> ApiResult<Json<ResetRun>> {
    let trigger: ResetTrigger = if body.iter().all(u8::is_ascii_whitespace) {
        ResetTrigger::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| match err.classify() {
            serde_json::error::Category::Data => ApiError::unprocessable(err.to_string()),
            _ => ApiError::bad_request(format!("body is not valid JSON: {err}")),
        })?
    };
    let current = Period::containing(Utc::now(), state.timezone);
    let period = match trigger.period {
        Some(raw) => raw
            .parse::<Period>()
            .map_err(|err| ApiError::unprocessable(err.to_string()))?,
        None => current,
    };
    if period > current {
        return Err(ApiError::unprocessable(format!(
            "period {period} has not started yet (current period is {current}); its reset runs on its 1st"
        )));
    }
    let ledger = state.ledger.clone();
    let actor = Actor::from(&actor);
    let report = tokio::spawn(async move { run_monthly_reset(&ledger, period, &actor).await })
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(report.into()))
}

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct ResetQuery {
    /// Only runs of this period (YYYY-MM).
    pub period: Option<String>,
    /// Most runs listed, 1-1000 (default 100), newest first.
    pub limit: Option<u32>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct MembershipReset {
    pub membership_id: i64,
    pub period: String,
    pub user_id: String,
    pub plan_id: i64,
    pub granted_lots: i64,
    pub expired_units: i64,
    pub created_at: i64,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ResetStatus {
    pub timezone: String,
    pub current_period: String,
    /// Newest period whose reset completed for every membership.
    pub last_completed_period: Option<String>,
    /// Unix ms of the next scheduled reset (00:00 on the next 1st, configured zone).
    pub next_reset_at: i64,
    /// Per-membership resets, newest first.
    pub runs: Vec<MembershipReset>,
}

/// The monthly reset's state: last completed period, next run, per-membership runs.
#[utoipa::path(get, path = "/admin/v1/resets", tag = "operations", security(("admin" = [])), params(ResetQuery),
    responses((status = 200, body = ResetStatus), (status = 422, body = Problem)))]
pub async fn list_resets(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ResetQuery>,
) -> ApiResult<Json<ResetStatus>> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::unprocessable(format!(
            "limit must be 1-1000 (got {limit})"
        )));
    }
    let period = query
        .period
        .map(|raw| {
            raw.parse::<Period>()
                .map_err(|err| ApiError::unprocessable(err.to_string()))
        })
        .transpose()?;
    let now = Utc::now();
    let columns =
        "membership_id, period, user_id, plan_id, granted_lots, expired_units, created_at";
    let rows = match period {
        Some(period) => {
            let sql = state
                .db
                .sql(&format!(
                    "SELECT {columns} FROM reset_runs WHERE period = ? ORDER BY created_at DESC, membership_id DESC LIMIT {limit}"
                ))
                .into_owned();
            sqlx::query(&sql).bind(period.to_string()).fetch_all(state.db.pool()).await
        }
        None => {
            let sql = format!(
                "SELECT {columns} FROM reset_runs ORDER BY period DESC, created_at DESC, membership_id DESC LIMIT {limit}"
            );
            sqlx::query(&sql).fetch_all(state.db.pool()).await
        }
    }
    .map_err(ApiError::from)?;
    let runs = rows
        .iter()
        .map(reset_from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::internal)?;
    let last = last_completed_period(&state.ledger).await?;
    Ok(Json(ResetStatus {
        timezone: state.timezone.name().to_string(),
        current_period: Period::containing(now, state.timezone).to_string(),
        last_completed_period: last.map(|period| period.to_string()),
        next_reset_at: next_reset_at(now, state.timezone).timestamp_millis(),
        runs,
    }))
}

fn reset_from_row(row: &AnyRow) -> Result<MembershipReset, sqlx::Error> {
    Ok(MembershipReset {
        membership_id: row.try_get("membership_id")?,
        period: row.try_get("period")?,
        user_id: row.try_get("user_id")?,
        plan_id: row.try_get("plan_id")?,
        granted_lots: row.try_get("granted_lots")?,
        expired_units: row.try_get("expired_units")?,
        created_at: row.try_get("created_at")?,
    })
}

#[derive(Serialize, ToSchema, Debug)]
pub struct ReconcileAnswer {
    /// True when the books agree (no drift).
    pub clean: bool,
    /// The ledger's report: accounts/lots/journal entries checked and every drift found.
    #[schema(value_type = Object)]
    pub report: ReconcileReport,
}

/// Check the books: balances vs lots vs journal. Always 200; `clean` says whether they agree.
#[utoipa::path(post, path = "/admin/v1/reconcile", tag = "operations", security(("admin" = [])),
    responses((status = 200, body = ReconcileAnswer)))]
pub async fn reconcile(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
) -> ApiResult<Json<ReconcileAnswer>> {
    let report = state.ledger.reconcile().await?;
    let clean = report.is_clean();
    if !clean {
        tracing::error!(drifts = report.drifts.len(), "reconcile found drift");
    }
    let mut tx = state.db.begin_write().await.map_err(ApiError::from)?;
    let summary = serde_json::json!({"clean": clean, "drifts": report.drifts.len()});
    audit::record(
        tx.conn(),
        state.db.dialect(),
        &Actor::from(&actor),
        "reconcile.run",
        "ledger",
        None,
        &summary,
    )
    .await
    .map_err(ApiError::from)?;
    tx.commit().await.map_err(ApiError::from)?;
    Ok(Json(ReconcileAnswer { clean, report }))
}
