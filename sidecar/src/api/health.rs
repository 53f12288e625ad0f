//! Liveness, readiness and metrics endpoints (no authentication; the sidecar listens on
//! loopback by default).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::docs::Problem;
use super::problem::{ApiError, ApiResult};
use super::AppState;
use crate::metrics::Metrics;

#[derive(Serialize, ToSchema)]
pub struct HealthStatus {
    /// `ok` (process up) or `ready` (database reachable).
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = HealthStatus)))]
pub async fn healthz() -> Json<HealthStatus> {
    Json(HealthStatus { status: "ok" })
}

/// The database answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, body = HealthStatus),
        (status = 503, description = "database unreachable", body = Problem)
    )
)]
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<HealthStatus>> {
    sqlx::query("SELECT 1")
        .execute(state.db.pool())
        .await
        .map_err(|err| {
            tracing::warn!(error = %err, "readiness check failed");
            ApiError::unavailable("the database is not reachable")
        })?;
    Ok(Json(HealthStatus { status: "ready" }))
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = state.metrics.render();
            Metrics::render_ledger(
                &mut text,
                state.ledger.group_commits(),
                state.ledger.transient_retries(),
            );
            text
        },
    )
}
