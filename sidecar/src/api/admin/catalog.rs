//! Admin endpoints of the catalog: providers, models, prices, plans, packages, API keys,
//! quota types.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

use crate::api::auth::AdminActor;
use crate::api::docs::Problem;
use crate::api::problem::{ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::api::AppState;
use crate::catalog::api_keys::{self, ApiKey, ApiKeyFilter, IssuedApiKey, NewApiKey};
use crate::catalog::models::{self, Model, ModelFilter, ModelPatch, NewModel};
use crate::catalog::packages::{self, NewPackage, Package, PackagePatch};
use crate::catalog::plans::{self, NewPlan, Plan, PlanPatch};
use crate::catalog::prices::{self, NewPrice, PriceFilter, PriceVersionView};
use crate::catalog::providers::{self, NewProvider, Provider, ProviderPatch};
use crate::catalog::quota_types::{self, QuotaType};

// ---- providers ----

/// List providers.
#[utoipa::path(get, path = "/admin/v1/providers", tag = "catalog", security(("admin" = [])),
    responses((status = 200, body = [Provider])))]
pub async fn list_providers(State(state): State<AppState>) -> ApiResult<Json<Vec<Provider>>> {
    Ok(Json(providers::list(&state.db).await?))
}

/// Create a provider.
#[utoipa::path(post, path = "/admin/v1/providers", tag = "catalog", security(("admin" = [])),
    request_body = NewProvider,
    responses((status = 201, body = Provider), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_provider(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiJson(input): ApiJson<NewProvider>,
) -> ApiResult<(StatusCode, Json<Provider>)> {
    let provider = providers::create(&state.db, &actor.into(), input).await?;
    state.catalog_changed();
    Ok((StatusCode::CREATED, Json(provider)))
}

/// One provider.
#[utoipa::path(get, path = "/admin/v1/providers/{code}", tag = "catalog", security(("admin" = [])),
    params(("code" = String, Path)), responses((status = 200, body = Provider), (status = 404, body = Problem)))]
pub async fn get_provider(
    State(state): State<AppState>,
    ApiPath(code): ApiPath<String>,
) -> ApiResult<Json<Provider>> {
    Ok(Json(providers::get(&state.db, &code).await?))
}

/// Change a provider's name, base URL or status.
#[utoipa::path(patch, path = "/admin/v1/providers/{code}", tag = "catalog", security(("admin" = [])),
    params(("code" = String, Path)), request_body = ProviderPatch,
    responses((status = 200, body = Provider), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn update_provider(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(code): ApiPath<String>,
    ApiJson(patch): ApiJson<ProviderPatch>,
) -> ApiResult<Json<Provider>> {
    let provider = providers::update(&state.db, &actor.into(), &code, patch).await?;
    state.catalog_changed();
    Ok(Json(provider))
}

/// Delete a provider without models.
#[utoipa::path(delete, path = "/admin/v1/providers/{code}", tag = "catalog", security(("admin" = [])),
    params(("code" = String, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete_provider(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(code): ApiPath<String>,
) -> ApiResult<StatusCode> {
    providers::delete(&state.db, &actor.into(), &code).await?;
    state.catalog_changed();
    Ok(StatusCode::NO_CONTENT)
}

// ---- models ----

/// List models, optionally of one provider.
#[utoipa::path(get, path = "/admin/v1/models", tag = "catalog", security(("admin" = [])), params(ModelFilter),
    responses((status = 200, body = [Model])))]
pub async fn list_models(
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<ModelFilter>,
) -> ApiResult<Json<Vec<Model>>> {
    Ok(Json(models::list(&state.db, &filter).await?))
}

/// Add a model to a provider.
#[utoipa::path(post, path = "/admin/v1/models", tag = "catalog", security(("admin" = [])), request_body = NewModel,
    responses((status = 201, body = Model), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_model(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiJson(input): ApiJson<NewModel>,
) -> ApiResult<(StatusCode, Json<Model>)> {
    let model = models::create(&state.db, &actor.into(), input).await?;
    state.catalog_changed();
    Ok((StatusCode::CREATED, Json(model)))
}

/// One model.
#[utoipa::path(get, path = "/admin/v1/models/{id}", tag = "catalog", security(("admin" = [])),
    params(("id" = i64, Path)), responses((status = 200, body = Model), (status = 404, body = Problem)))]
pub async fn get_model(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<Model>> {
    Ok(Json(models::get(&state.db, id).await?))
}

/// Change a model (enable/disable, quota type, display name).
#[utoipa::path(patch, path = "/admin/v1/models/{id}", tag = "catalog", security(("admin" = [])),
    params(("id" = i64, Path)), request_body = ModelPatch,
    responses((status = 200, body = Model), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn update_model(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(patch): ApiJson<ModelPatch>,
) -> ApiResult<Json<Model>> {
    let model = models::update(&state.db, &actor.into(), id, patch).await?;
    state.catalog_changed();
    Ok(Json(model))
}

/// Delete a model without price versions.
#[utoipa::path(delete, path = "/admin/v1/models/{id}", tag = "catalog", security(("admin" = [])),
    params(("id" = i64, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete_model(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    models::delete(&state.db, &actor.into(), id).await?;
    state.catalog_changed();
    Ok(StatusCode::NO_CONTENT)
}

// ---- prices ----

/// List price versions (newest first per model).
#[utoipa::path(get, path = "/admin/v1/prices", tag = "catalog", security(("admin" = [])), params(PriceFilter),
    responses((status = 200, body = [PriceVersionView])))]
pub async fn list_prices(
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<PriceFilter>,
) -> ApiResult<Json<Vec<PriceVersionView>>> {
    Ok(Json(prices::list(&state.db, &filter).await?))
}

/// Create a new price version (prices are never edited in place).
#[utoipa::path(post, path = "/admin/v1/prices", tag = "catalog", security(("admin" = [])), request_body = NewPrice,
    responses((status = 201, body = PriceVersionView), (status = 422, body = Problem)))]
pub async fn create_price(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiJson(input): ApiJson<NewPrice>,
) -> ApiResult<(StatusCode, Json<PriceVersionView>)> {
    let version = prices::create(&state.db, &actor.into(), input).await?;
    state.catalog_changed();
    Ok((StatusCode::CREATED, Json(version)))
}

/// One price version.
#[utoipa::path(get, path = "/admin/v1/prices/{id}", tag = "catalog", security(("admin" = [])),
    params(("id" = i64, Path)), responses((status = 200, body = PriceVersionView), (status = 404, body = Problem)))]
pub async fn get_price(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<PriceVersionView>> {
    Ok(Json(prices::get(&state.db, id).await?))
}

/// Withdraw a price version that is not yet in force (409 once effective).
#[utoipa::path(delete, path = "/admin/v1/prices/{id}", tag = "catalog", security(("admin" = [])),
    params(("id" = i64, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete_price(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    prices::delete(&state.db, &actor.into(), id).await?;
    state.catalog_changed();
    Ok(StatusCode::NO_CONTENT)
}

// ---- plans ----

/// List subscription plans.
#[utoipa::path(get, path = "/admin/v1/plans", tag = "catalog", security(("admin" = [])),
    responses((status = 200, body = [Plan])))]
pub async fn list_plans(State(state): State<AppState>) -> ApiResult<Json<Vec<Plan>>> {
    Ok(Json(plans::list(&state.db).await?))
}

/// Create a subscription plan with its monthly quotas.
#[utoipa::path(post, path = "/admin/v1/plans", tag = "catalog", security(("admin" = [])), request_body = NewPlan,
    responses((status = 201, body = Plan), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_plan(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiJson(input): ApiJson<NewPlan>,
) -> ApiResult<(StatusCode, Json<Plan>)> {
    Ok((
        StatusCode::CREATED,
        Json(plans::create(&state.db, &actor.into(), input).await?),
    ))
}

/// One plan.
#[utoipa::path(get, path = "/admin/v1/plans/{code}", tag = "catalog", security(("admin" = [])),
    params(("code" = String, Path)), responses((status = 200, body = Plan), (status = 404, body = Problem)))]
pub async fn get_plan(
    State(state): State<AppState>,
    ApiPath(code): ApiPath<String>,
) -> ApiResult<Json<Plan>> {
    Ok(Json(plans::get(&state.db, &code).await?))
}

/// Change a plan; new quotas apply from the next grant.
#[utoipa::path(patch, path = "/admin/v1/plans/{code}", tag = "catalog", security(("admin" = [])),
    params(("code" = String, Path)), request_body = PlanPatch,
    responses((status = 200, body = Plan), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn update_plan(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(code): ApiPath<String>,
    ApiJson(patch): ApiJson<PlanPatch>,
) -> ApiResult<Json<Plan>> {
    Ok(Json(
        plans::update(&state.db, &actor.into(), &code, patch).await?,
    ))
}

/// Delete a plan nobody subscribed to.
#[utoipa::path(delete, path = "/admin/v1/plans/{code}", tag = "catalog", security(("admin" = [])),
    params(("code" = String, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete_plan(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(code): ApiPath<String>,
) -> ApiResult<StatusCode> {
    plans::delete(&state.db, &actor.into(), &code).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- packages ----

/// List token packages.
#[utoipa::path(get, path = "/admin/v1/packages", tag = "catalog", security(("admin" = [])),
    responses((status = 200, body = [Package])))]
pub async fn list_packages(State(state): State<AppState>) -> ApiResult<Json<Vec<Package>>> {
    Ok(Json(packages::list(&state.db).await?))
}

/// Create a token package.
#[utoipa::path(post, path = "/admin/v1/packages", tag = "catalog", security(("admin" = [])), request_body = NewPackage,
    responses((status = 201, body = Package), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_package(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiJson(input): ApiJson<NewPackage>,
) -> ApiResult<(StatusCode, Json<Package>)> {
    Ok((
        StatusCode::CREATED,
        Json(packages::create(&state.db, &actor.into(), input).await?),
    ))
}

/// One package.
#[utoipa::path(get, path = "/admin/v1/packages/{code}", tag = "catalog", security(("admin" = [])),
    params(("code" = String, Path)), responses((status = 200, body = Package), (status = 404, body = Problem)))]
pub async fn get_package(
    State(state): State<AppState>,
    ApiPath(code): ApiPath<String>,
) -> ApiResult<Json<Package>> {
    Ok(Json(packages::get(&state.db, &code).await?))
}

/// Change a package (applies to later purchases).
#[utoipa::path(patch, path = "/admin/v1/packages/{code}", tag = "catalog", security(("admin" = [])),
    params(("code" = String, Path)), request_body = PackagePatch,
    responses((status = 200, body = Package), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn update_package(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(code): ApiPath<String>,
    ApiJson(patch): ApiJson<PackagePatch>,
) -> ApiResult<Json<Package>> {
    Ok(Json(
        packages::update(&state.db, &actor.into(), &code, patch).await?,
    ))
}

/// Delete a package (purchased quota stays).
#[utoipa::path(delete, path = "/admin/v1/packages/{code}", tag = "catalog", security(("admin" = [])),
    params(("code" = String, Path)), responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete_package(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(code): ApiPath<String>,
) -> ApiResult<StatusCode> {
    packages::delete(&state.db, &actor.into(), &code).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- API keys ----

/// List API keys (never the keys themselves).
#[utoipa::path(get, path = "/admin/v1/api-keys", tag = "api-keys", security(("admin" = [])), params(ApiKeyFilter),
    responses((status = 200, body = [ApiKey])))]
pub async fn list_api_keys(
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<ApiKeyFilter>,
) -> ApiResult<Json<Vec<ApiKey>>> {
    Ok(Json(api_keys::list(&state.db, &filter).await?))
}

/// Issue an API key for a user; the raw key is in this answer only.
#[utoipa::path(post, path = "/admin/v1/api-keys", tag = "api-keys", security(("admin" = [])), request_body = NewApiKey,
    responses((status = 201, body = IssuedApiKey), (status = 422, body = Problem)))]
pub async fn issue_api_key(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiJson(input): ApiJson<NewApiKey>,
) -> ApiResult<(StatusCode, Json<IssuedApiKey>)> {
    Ok((
        StatusCode::CREATED,
        Json(api_keys::issue(&state.db, &actor.into(), input).await?),
    ))
}

/// Revoke an API key (idempotent).
#[utoipa::path(delete, path = "/admin/v1/api-keys/{id}", tag = "api-keys", security(("admin" = [])),
    params(("id" = i64, Path)), responses((status = 200, body = ApiKey), (status = 404, body = Problem)))]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<ApiKey>> {
    let key = api_keys::revoke(&state.db, &actor.into(), id).await?;
    state.catalog_changed();
    Ok(Json(key))
}

// ---- quota types ----

/// Configured quota types.
#[utoipa::path(get, path = "/admin/v1/quota-types", tag = "catalog", security(("admin" = [])),
    responses((status = 200, body = [QuotaType])))]
pub async fn list_quota_types(State(state): State<AppState>) -> ApiResult<Json<Vec<QuotaType>>> {
    Ok(Json(quota_types::list(&state.db).await?))
}
