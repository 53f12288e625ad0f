//! The admin API under `/admin/v1` (bearer admin token; see `auth`).

pub mod catalog;
pub mod operations;
pub mod quota;
pub mod reports;

use super::routes::{Method, RouteTable};
use super::AppState;

pub fn routes() -> RouteTable<AppState> {
    use Method::{Delete, Get, Patch, Post};
    RouteTable::new()
        .add(Get, "/admin/v1/providers", catalog::list_providers)
        .add(Post, "/admin/v1/providers", catalog::create_provider)
        .add(Get, "/admin/v1/providers/{code}", catalog::get_provider)
        .add(
            Patch,
            "/admin/v1/providers/{code}",
            catalog::update_provider,
        )
        .add(
            Delete,
            "/admin/v1/providers/{code}",
            catalog::delete_provider,
        )
        .add(Get, "/admin/v1/models", catalog::list_models)
        .add(Post, "/admin/v1/models", catalog::create_model)
        .add(Get, "/admin/v1/models/{id}", catalog::get_model)
        .add(Patch, "/admin/v1/models/{id}", catalog::update_model)
        .add(Delete, "/admin/v1/models/{id}", catalog::delete_model)
        .add(Get, "/admin/v1/prices", catalog::list_prices)
        .add(Post, "/admin/v1/prices", catalog::create_price)
        .add(Get, "/admin/v1/prices/{id}", catalog::get_price)
        .add(Delete, "/admin/v1/prices/{id}", catalog::delete_price)
        .add(Get, "/admin/v1/plans", catalog::list_plans)
        .add(Post, "/admin/v1/plans", catalog::create_plan)
        .add(Get, "/admin/v1/plans/{code}", catalog::get_plan)
        .add(Patch, "/admin/v1/plans/{code}", catalog::update_plan)
        .add(Delete, "/admin/v1/plans/{code}", catalog::delete_plan)
        .add(Get, "/admin/v1/packages", catalog::list_packages)
        .add(Post, "/admin/v1/packages", catalog::create_package)
        .add(Get, "/admin/v1/packages/{code}", catalog::get_package)
        .add(Patch, "/admin/v1/packages/{code}", catalog::update_package)
        .add(Delete, "/admin/v1/packages/{code}", catalog::delete_package)
        .add(Get, "/admin/v1/api-keys", catalog::list_api_keys)
        .add(Post, "/admin/v1/api-keys", catalog::issue_api_key)
        .add(Delete, "/admin/v1/api-keys/{id}", catalog::revoke_api_key)
        .add(Get, "/admin/v1/quota-types", catalog::list_quota_types)
        .add(Get, "/admin/v1/memberships", quota::list_memberships)
        .add(Post, "/admin/v1/memberships", quota::activate_membership)
        .add(Post, "/admin/v1/purchases", quota::record_purchase)
        .add(Post, "/admin/v1/grants", quota::grant)
        .add(Get, "/admin/v1/users/{user_id}/quotas", quota::user_quotas)
        .add(Post, "/admin/v1/consume", quota::consume)
        .add(Get, "/admin/v1/usage", reports::list_usage)
        .add(Get, "/admin/v1/reports/cost", reports::cost_report)
        .add(Get, "/admin/v1/audit", reports::list_audit)
        .add(Get, "/admin/v1/resets", operations::list_resets)
        .add(Post, "/admin/v1/resets", operations::trigger_reset)
        .add(Post, "/admin/v1/reconcile", operations::reconcile)
}
