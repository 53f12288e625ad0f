//! The OpenAPI document served at `/openapi.json`.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::{Modify, OpenApi, ToSchema};

use super::problem::PROBLEM_CONTENT_TYPE;
use super::{admin, health, internal};

/// RFC 7807 problem body of every error answer (`llm_meter_protocol::Problem`).
#[derive(serde::Serialize, ToSchema)]
pub struct Problem {
    /// Problem type URN, e.g. `urn:llm-meter:problem:invalid-input`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary, e.g. `invalid input`.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What exactly is wrong with the request.
    pub detail: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "llm-meter ledger sidecar",
        description = "Quota, reservation and cost ledger for the LLM metering Envoy filter. \
            Internal API (x-meter-secret) for the filter; admin API (bearer token) for operators \
            and membership/payment systems. Money is a decimal string, tokens are integers, \
            timestamps are Unix milliseconds. Errors are application/problem+json bodies. \
            Admin calls may name their operator in `x-admin-actor` (recorded in the audit trail)."
    ),
    paths(
        health::healthz,
        health::readyz,
        health::metrics,
        openapi_json,
        internal::authorize,
        internal::settle,
        internal::void,
        internal::finalize,
        admin::catalog::list_providers,
        admin::catalog::create_provider,
        admin::catalog::get_provider,
        admin::catalog::update_provider,
        admin::catalog::delete_provider,
        admin::catalog::list_models,
        admin::catalog::create_model,
        admin::catalog::get_model,
        admin::catalog::update_model,
        admin::catalog::delete_model,
        admin::catalog::list_prices,
        admin::catalog::create_price,
        admin::catalog::get_price,
        admin::catalog::delete_price,
        admin::catalog::list_plans,
        admin::catalog::create_plan,
        admin::catalog::get_plan,
        admin::catalog::update_plan,
        admin::catalog::delete_plan,
        admin::catalog::list_packages,
        admin::catalog::create_package,
        admin::catalog::get_package,
        admin::catalog::update_package,
        admin::catalog::delete_package,
        admin::catalog::list_api_keys,
        admin::catalog::issue_api_key,
        admin::catalog::revoke_api_key,
        admin::catalog::list_quota_types,
        admin::quota::activate_membership,
        admin::quota::list_memberships,
        admin::quota::record_purchase,
        admin::quota::grant,
        admin::quota::user_quotas,
        admin::quota::consume,
        admin::reports::list_usage,
        admin::reports::cost_report,
        admin::reports::list_audit,
        admin::operations::trigger_reset,
        admin::operations::list_resets,
        admin::operations::reconcile,
    ),
    components(schemas(Problem)),
    modifiers(&Security, &ProblemContentType, &CommonProblems),
    tags(
        (name = "health", description = "Liveness, readiness, metrics"),
        (name = "internal", description = "The filter's calls (x-meter-secret)"),
        (name = "catalog", description = "Providers, models, prices, plans, packages"),
        (name = "api-keys", description = "Caller API keys"),
        (name = "quota", description = "Memberships, purchases, grants, balances, direct consume"),
        (name = "reports", description = "Usage records, cost reports, audit trail"),
        (name = "operations", description = "Monthly reset and reconcile"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document of this service.
#[utoipa::path(get, path = "/openapi.json", tag = "health", responses((status = 200, description = "OpenAPI 3.1 document")))]
pub async fn openapi_json() -> axum::Json<OpenApiDoc> {
    axum::Json(ApiDoc::openapi())
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "shared_secret",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(
                llm_meter_protocol::HEADER_SECRET,
            ))),
        );
    }
}

/// Error answers are `application/problem+json`, not `application/json`.
struct ProblemContentType;

impl Modify for ProblemContentType {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                for (status, response) in operation.responses.responses.iter_mut() {
                    let utoipa::openapi::RefOr::T(response) = response else {
                        continue;
                    };
                    if status.starts_with('2') {
                        continue;
                    }
                    if let Some(content) = response.content.shift_remove("application/json") {
                        response
                            .content
                            .insert(PROBLEM_CONTENT_TYPE.to_string(), content);
                    }
                }
            }
        }
    }
}

/// Answers any operation may give besides its own: credential failures on secured
/// operations, malformed input where there is input, and database trouble (500/503)
/// everywhere but the process-local endpoints. Declared here once so the document lists
/// every status the service can answer.
struct CommonProblems;

impl CommonProblems {
    const PROCESS_LOCAL: [&'static str; 3] = ["/healthz", "/metrics", "/openapi.json"];
}

impl Modify for CommonProblems {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let local = Self::PROCESS_LOCAL.contains(&path.as_str());
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                let mut common: Vec<(&str, &str)> = Vec::new();
                if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    common.push(("401", "missing credentials"));
                    common.push(("403", "wrong credentials"));
                }
                let has_parameters = operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
                let has_body = operation.request_body.is_some();
                if has_parameters || has_body {
                    common.push(("400", "malformed path, query or body"));
                    common.push(("422", "invalid values or missing fields"));
                }
                if has_body {
                    common.push(("413", "body too large"));
                    common.push(("415", "the body is not `application/json`"));
                }
                if !local {
                    common.push(("500", "internal error; nothing was applied"));
                    common.push((
                        "503",
                        "database unavailable or busy; nothing was applied, retry",
                    ));
                }
                for (status, description) in common {
                    operation
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| problem_response(description));
                }
            }
        }
    }
}

fn problem_response(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    use utoipa::openapi::{Content, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            PROBLEM_CONTENT_TYPE,
            Content::new(Some(Ref::from_schema_name("Problem"))),
        )
        .build()
        .into()
}
