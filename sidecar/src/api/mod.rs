//! The HTTP API: the internal API the filter calls (shared secret), the admin API
//! (`/admin/v1`, bearer token), health/readiness, Prometheus metrics and the OpenAPI document.
//!
//! Every error answer is a problem body (see [`problem`]); every admin write is one
//! transaction including its audit row.

pub mod admin;
pub mod auth;
pub mod docs;
pub mod health;
pub mod internal;
pub mod problem;
pub mod routes;
pub mod server;
pub mod wire;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use chrono_tz::Tz;
use tower_http::trace::TraceLayer;

use crate::catalog::{Actor, CatalogError};
use crate::config::Secret;
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::storage::Db;
use problem::ApiError;
use routes::{Method, RouteTable};

/// Secrets the two API surfaces check.
pub struct AuthSecrets {
    pub shared_secret: Secret,
    pub admin_token: Secret,
}

/// Shared state of every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub ledger: Ledger,
    pub auth: Arc<AuthSecrets>,
    pub metrics: Arc<Metrics>,
    /// Zone of report days and of the monthly reset.
    pub timezone: Tz,
}

impl AppState {
    /// Catalog rows changed: drop cached prices/models so the next call sees the change.
    pub fn catalog_changed(&self) {
        self.ledger.prices().invalidate();
    }
}

impl From<auth::AdminActor> for Actor {
    fn from(actor: auth::AdminActor) -> Self {
        Actor(actor.0)
    }
}

impl From<&auth::AdminActor> for Actor {
    fn from(actor: &auth::AdminActor) -> Self {
        Actor(actor.0.clone())
    }
}

impl From<CatalogError> for ApiError {
    fn from(err: CatalogError) -> Self {
        match err {
            CatalogError::NotFound(detail) => ApiError::not_found(detail),
            CatalogError::Conflict(detail) => ApiError::conflict(detail),
            CatalogError::Invalid(detail) => ApiError::unprocessable(detail),
            CatalogError::Db(err) => ApiError::database(err),
        }
    }
}

/// The whole service.
pub fn router(state: AppState) -> Router {
    build(state).0
}

/// The service and the list of its routes (for the OpenAPI agreement test).
pub fn build(state: AppState) -> (Router, Vec<(Method, &'static str)>) {
    let (public, mut recorded) = public_routes().build();
    let (internal, internal_recorded) = internal::routes().build();
    let (admin, admin_recorded) = admin::routes().build();
    recorded.extend(internal_recorded);
    recorded.extend(admin_recorded);
    let internal = internal.route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::require_shared_secret,
    ));
    let admin = admin.route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::require_admin,
    ));
    let router = public
        .merge(internal)
        .merge(admin)
        .fallback(problem::route_not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            track_requests,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state);
    (router, recorded)
}

fn public_routes() -> RouteTable<AppState> {
    RouteTable::new()
        .add(Method::Get, "/healthz", health::healthz)
        .add(Method::Get, "/readyz", health::readyz)
        .add(Method::Get, "/metrics", health::metrics)
        .add(Method::Get, "/openapi.json", docs::openapi_json)
}

/// Counts and times every request by its route template (not the raw path, which would
/// put user ids into metric labels).
async fn track_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    state.metrics.observe_request(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

impl From<LedgerError> for ApiError {
    fn from(err: LedgerError) -> Self {
        match err {
            LedgerError::Conflict(detail) => ApiError::conflict(detail),
            LedgerError::NotFound(detail) => ApiError::not_found(detail),
            LedgerError::Invalid(detail) => ApiError::unprocessable(detail),
            LedgerError::Busy(detail) => {
                ApiError::unavailable(format!("the ledger is busy, retry: {detail}"))
            }
            err if ledger_error_is_transient(&err) => {
                tracing::warn!(error = %err, "transient ledger error");
                ApiError::unavailable(
                    "the database is temporarily unavailable; nothing was applied, retry",
                )
            }
            err => ApiError::internal(err),
        }
    }
}

/// [`LedgerError::is_transient`], plus a database that is unreachable or shutting down
/// (an open connection cut by a restart fails with a server error code, not an I/O error).
pub fn ledger_error_is_transient(err: &LedgerError) -> bool {
    match err {
        LedgerError::Db(db_err) => err.is_transient() || problem::database_unavailable(db_err),
        _ => err.is_transient(),
    }
}
