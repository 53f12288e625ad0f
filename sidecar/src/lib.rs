//! The ledger sidecar: the single source of truth the Envoy filter asks before and after
//! every LLM call, and that membership, payment and admin systems call to grant quota.
//!
//! - `storage`: database connection, dialect differences, migrations (SQLite, PostgreSQL, MySQL/MariaDB).
//! - `ledger`: lots, holds, settlements, journal, expiry, monthly reset, reconcile.
//! - `pricing`: effective-dated prices and cost computation (rust_decimal).
//! - `catalog`: providers, models, prices, plans, packages, memberships, API keys.
//! - `api`: the internal API for the filter and the admin API (axum, OpenAPI).
//! - `jobs`: background work inside the sidecar (monthly reset, hold and lot expiry).
//! - `config`: settings from flags and environment.
//! - `metrics`: Prometheus exposition.

pub mod api;
pub mod catalog;
pub mod config;
pub mod jobs;
pub mod ledger;
pub mod metrics;
pub mod pricing;
pub mod storage;
