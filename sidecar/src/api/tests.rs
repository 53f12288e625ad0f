//! In-process API tests: the real router over real databases (SQLite, PostgreSQL, MariaDB
//! via `storage::testing`), driven with `tower::ServiceExt::oneshot`.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use llm_meter_protocol::HEADER_SECRET;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{build, AppState, AuthSecrets};
use crate::config::Secret;
use crate::ledger::{Ledger, LedgerConfig};
use crate::metrics::Metrics;
use crate::storage::testing::{each_backend, TestDb};
use crate::storage::Dialect;

const SECRET: &str = "test-shared-secret";
const ADMIN: &str = "test-admin-token";

struct TestApp {
    router: Router,
    routes: Vec<(super::routes::Method, &'static str)>,
    ledger: Ledger,
    db: TestDb,
}

impl TestApp {
    async fn new(db: TestDb) -> TestApp {
        let ledger = Ledger::new(
            db.db.clone(),
            LedgerConfig {
                timezone: chrono_tz::UTC,
                ..LedgerConfig::default()
            },
        );
        let state = AppState {
            db: db.db.clone(),
            ledger: ledger.clone(),
            auth: Arc::new(AuthSecrets {
                shared_secret: Secret::new(SECRET),
                admin_token: Secret::new(ADMIN),
            }),
            metrics: Arc::new(Metrics::new()),
            timezone: chrono_tz::UTC,
        };
        let (router, routes) = build(state);
        TestApp {
            router,
            routes,
            ledger,
            db,
        }
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, String, Value) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, content_type, body)
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header("x-admin-actor", "tester");
        let body = match body {
            Some(body) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let (status, content_type, body) = self.send(builder.body(body).unwrap()).await;
        if !status.is_success() {
            assert_eq!(
                content_type, "application/problem+json",
                "{method} {path}: {status} {body}"
            );
            assert_eq!(body["status"], status.as_u16(), "{body}");
        }
        (status, body)
    }

    async fn internal(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method("POST")
            .uri(path)
            .header(HEADER_SECRET, SECRET)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let (status, _, body) = self.send(request).await;
        (status, body)
    }

    /// Provider `openai`, text model `m1` priced 0.002 / 0.006 CNY per 1k tokens.
    async fn seed_priced_model(&self) {
        let (status, body) = self
            .admin(
                "POST",
                "/admin/v1/providers",
                Some(json!({"code": "openai", "name": "OpenAI"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = self
            .admin(
                "POST",
                "/admin/v1/models",
                Some(json!({"provider": "openai", "model": "m1"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = self
            .admin(
                "POST",
                "/admin/v1/prices",
                Some(json!({"provider": "openai", "model": "m1", "items": [
                    {"pricing_type": "input_token", "unit": "per_1k_tokens", "unit_price": "0.002"},
                    {"pricing_type": "output_token", "unit": "per_1k_tokens", "unit_price": "0.006"}
                ]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    async fn finish(self) {
        self.db.cleanup().await;
    }
}

async fn apps() -> Vec<TestApp> {
    let mut apps = Vec::new();
    for db in each_backend().await {
        apps.push(TestApp::new(db).await);
    }
    apps
}

#[tokio::test]
async fn admin_auth_missing_is_401_and_wrong_is_403() {
    for app in apps().await {
        let missing = Request::get("/admin/v1/providers")
            .body(Body::empty())
            .unwrap();
        let (status, content_type, body) = app.send(missing).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(body["status"], 401);
        let wrong = Request::get("/admin/v1/providers")
            .header(header::AUTHORIZATION, "Bearer not-the-token")
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.send(wrong).await.0, StatusCode::FORBIDDEN);
        let internal_missing = Request::post(llm_meter_protocol::PATH_AUTHORIZE)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(app.send(internal_missing).await.0, StatusCode::UNAUTHORIZED);
        let internal_wrong = Request::post(llm_meter_protocol::PATH_AUTHORIZE)
            .header(HEADER_SECRET, "nope")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(app.send(internal_wrong).await.0, StatusCode::FORBIDDEN);
        // The admin token does not open the internal API, nor the secret the admin API.
        let crossed = Request::get("/admin/v1/providers")
            .header(HEADER_SECRET, SECRET)
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.send(crossed).await.0, StatusCode::UNAUTHORIZED);
        app.finish().await;
    }
}

#[tokio::test]
async fn bad_input_answers_problem_bodies() {
    for app in apps().await {
        // Syntax error -> 400.
        let request = Request::post("/admin/v1/providers")
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{not json"))
            .unwrap();
        let (status, content_type, body) = app.send(request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(content_type, "application/problem+json");
        assert!(body["detail"].as_str().unwrap().len() > 5, "{body}");
        // Missing field -> 422 naming it.
        let (status, body) = app
            .admin("POST", "/admin/v1/providers", Some(json!({"code": "x"})))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(body["detail"].as_str().unwrap().contains("name"), "{body}");
        // Invalid value -> 422 saying why.
        let (status, body) = app
            .admin(
                "POST",
                "/admin/v1/providers",
                Some(json!({"code": "has space", "name": "X"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(body["detail"].as_str().unwrap().contains("code"), "{body}");
        // Unknown thing -> 404; duplicate -> 409.
        let (status, _) = app.admin("GET", "/admin/v1/providers/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        app.seed_priced_model().await;
        let (status, body) = app
            .admin(
                "POST",
                "/admin/v1/providers",
                Some(json!({"code": "openai", "name": "again"})),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        // Bad path parameter and query -> 400.
        let (status, _) = app.admin("GET", "/admin/v1/models/abc", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = app.admin("GET", "/admin/v1/usage?limit=abc", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        // Known path, wrong method -> 405 problem.
        let (status, _) = app.admin("PUT", "/admin/v1/grants", Some(json!({}))).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        // No such route -> 404 problem.
        let (status, _) = app.admin("GET", "/admin/v1/nothing-here", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // Internal API: malformed protocol body -> 422 problem.
        let (status, body) = app
            .internal(llm_meter_protocol::PATH_SETTLE, json!({"request_id": "r"}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["status"], 422);
        app.finish().await;
    }
}

#[tokio::test]
async fn prices_are_versioned_never_edited() {
    for app in apps().await {
        app.seed_priced_model().await;
        let (_, list) = app
            .admin("GET", "/admin/v1/prices?provider=openai&model=m1", None)
            .await;
        let versions = list.as_array().unwrap();
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0]["items"][0]["unit_price"], "0.002");
        let id = versions[0]["id"].as_i64().unwrap();
        // In force: cannot be deleted.
        let (status, body) = app
            .admin("DELETE", &format!("/admin/v1/prices/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        // A future version can be withdrawn before it takes effect.
        let future = crate::storage::now_ms() + 86_400_000;
        let (status, created) = app
            .admin(
                "POST",
                "/admin/v1/prices",
                Some(json!({"provider": "openai", "model": "m1", "effective_from": future, "items": [
                    {"pricing_type": "input_token", "unit": "per_1k_tokens", "unit_price": "0.001"}]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let (status, _) = app
            .admin(
                "DELETE",
                &format!("/admin/v1/prices/{}", created["id"]),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        // Backdating and nonsense units are refused with a reason.
        let (status, body) = app
            .admin(
                "POST",
                "/admin/v1/prices",
                Some(json!({"provider": "openai", "model": "m1", "effective_from": 1000, "items": [
                    {"pricing_type": "input_token", "unit": "per_1k_tokens", "unit_price": "0.001"}]})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            body["detail"].as_str().unwrap().contains("backdated"),
            "{body}"
        );
        let (status, body) = app
            .admin(
                "POST",
                "/admin/v1/prices",
                Some(json!({"provider": "openai", "model": "m1", "items": [
                    {"pricing_type": "image", "unit": "per_1k_tokens", "unit_price": "0.001"}]})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        // Every write left an audit row naming the actor.
        let (_, audit) = app
            .admin("GET", "/admin/v1/audit?action=price.create", None)
            .await;
        assert_eq!(audit["items"].as_array().unwrap().len(), 2, "{audit}");
        assert_eq!(audit["items"][0]["actor"], "tester");
        app.finish().await;
    }
}

#[tokio::test]
async fn catalog_crud_round_trip() {
    for app in apps().await {
        app.seed_priced_model().await;
        let (status, model) = app
            .admin("GET", "/admin/v1/models?provider=openai", None)
            .await;
        assert_eq!(status, StatusCode::OK);
        let id = model[0]["id"].as_i64().unwrap();
        let (status, patched) = app
            .admin(
                "PATCH",
                &format!("/admin/v1/models/{id}"),
                Some(json!({"status": "disabled"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{patched}");
        assert_eq!(patched["status"], "disabled");
        let (status, _) = app
            .admin("DELETE", &format!("/admin/v1/models/{id}"), None)
            .await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "a priced model is disabled, not deleted"
        );
        let (status, _) = app
            .admin("DELETE", "/admin/v1/providers/openai", None)
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        let (status, plan) = app
            .admin(
                "POST",
                "/admin/v1/plans",
                Some(json!({"code": "pro", "name": "Pro", "price": "99.00",
                    "quotas": [{"quota_type": "text_token", "amount": 1000000}]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{plan}");
        assert_eq!(plan["price"], "99.00");
        assert_eq!(plan["quotas"][0]["amount"], 1000000);
        let (status, body) = app
            .admin(
                "POST",
                "/admin/v1/plans",
                Some(json!({"code": "bad", "name": "Bad",
                "quotas": [{"quota_type": "gold_coins", "amount": 1}]})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            body["detail"].as_str().unwrap().contains("gold_coins"),
            "{body}"
        );
        let (status, package) = app
            .admin(
                "POST",
                "/admin/v1/packages",
                Some(
                    json!({"code": "p1m", "name": "1M tokens", "quota_type": "text_token",
                    "amount": 1000000, "price": "10", "valid_days": 30}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{package}");
        let (status, patched) = app
            .admin(
                "PATCH",
                "/admin/v1/packages/p1m",
                Some(json!({"price": "12.50"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(patched["price"], "12.50");
        let (_, types) = app.admin("GET", "/admin/v1/quota-types", None).await;
        assert!(types
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["code"] == "text_token"));
        app.finish().await;
    }
}

#[tokio::test]
async fn api_keys_are_shown_once_and_revocable() {
    for app in apps().await {
        let (status, issued) = app
            .admin(
                "POST",
                "/admin/v1/api-keys",
                Some(json!({"user_id": "alice", "name": "ci"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{issued}");
        let key = issued["key"].as_str().unwrap().to_string();
        assert!(key.starts_with("sk-meter-"));
        assert_eq!(
            app.ledger.resolve_api_key(&key).await.unwrap().as_deref(),
            Some("alice")
        );
        let (_, listed) = app
            .admin("GET", "/admin/v1/api-keys?user_id=alice", None)
            .await;
        assert_eq!(listed.as_array().unwrap().len(), 1);
        assert!(
            !listed.to_string().contains(&key),
            "the raw key is never listed"
        );
        let id = issued["id"].as_i64().unwrap();
        let (status, revoked) = app
            .admin("DELETE", &format!("/admin/v1/api-keys/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(revoked["status"], "revoked");
        assert_eq!(app.ledger.resolve_api_key(&key).await.unwrap(), None);
        app.finish().await;
    }
}

#[tokio::test]
async fn openapi_document_matches_the_router() {
    let db = crate::storage::testing::fresh(Dialect::Sqlite).await;
    let app = TestApp::new(db).await;
    let request = Request::get("/openapi.json").body(Body::empty()).unwrap();
    let (status, _, doc) = app.send(request).await;
    assert_eq!(status, StatusCode::OK);
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    let routed: BTreeSet<(String, String)> = app
        .routes
        .iter()
        .map(|(method, path)| (method.as_openapi().to_string(), path.to_string()))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from /openapi.json: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented but not routed: {unrouted:?}"
    );
    assert_eq!(routed.len(), app.routes.len(), "a route was added twice");
    // And every documented operation really reaches a handler (not the 404/405 fallback).
    for (method, path) in &documented {
        let uri = path
            .replace("{code}", "x")
            .replace("{id}", "1")
            .replace("{user_id}", "u");
        let request = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(&uri)
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(HEADER_SECRET, SECRET)
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = app.send(request).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert_ne!(body["title"], "no such route", "{method} {uri}");
    }
    // Error answers are documented as problem bodies.
    let responses = &doc["paths"]["/admin/v1/grants"]["post"]["responses"];
    assert!(
        responses["422"]["content"]["application/problem+json"].is_object(),
        "{responses}"
    );
    app.finish().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let db = crate::storage::testing::fresh(Dialect::Sqlite).await;
    let app = TestApp::new(db).await;
    let (status, _, body) = app
        .send(Request::get("/healthz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, _, body) = app
        .send(Request::get("/readyz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    let (_, content_type, metrics) = app
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert!(content_type.starts_with("text/plain"));
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains(
            "meter_http_requests_total{route=\"/readyz\",method=\"GET\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("meter_http_request_duration_seconds_bucket{route=\"/healthz\""),
        "{text}"
    );
    // Readiness follows the database.
    app.db.db.close().await;
    let (status, content_type, _) = app
        .send(Request::get("/readyz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(content_type, "application/problem+json");
    app.finish().await;
}

async fn quotas_of(app: &TestApp, user: &str) -> Value {
    let (status, body) = app
        .admin("GET", &format!("/admin/v1/users/{user}/quotas"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn text_quota(quotas: &Value) -> &Value {
    quotas["quotas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["quota_type"] == "text_token")
        .unwrap_or_else(|| panic!("no text_token quota in {quotas}"))
}

#[tokio::test]
async fn grants_and_purchases_are_idempotent() {
    for app in apps().await {
        let grant = json!({"user_id": "bob", "quota_type": "text_token", "amount": 5000,
            "source_type": "support_ticket", "source_id": "T-1", "remark": "goodwill"});
        let (status, first) = app
            .admin("POST", "/admin/v1/grants", Some(grant.clone()))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{first}");
        assert_eq!(first["created"], true);
        let (status, again) = app
            .admin("POST", "/admin/v1/grants", Some(grant.clone()))
            .await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(
            (again["created"].as_bool(), &again["lot_id"]),
            (Some(false), &first["lot_id"])
        );
        let mut other = grant.clone();
        other["amount"] = json!(6000);
        let (status, body) = app.admin("POST", "/admin/v1/grants", Some(other)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let (status, body) = app
            .admin(
                "POST",
                "/admin/v1/grants",
                Some(json!({"user_id": "bob", "quota_type": "text_token",
                "amount": 0, "source_id": "T-2"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

        let (status, _) = app
            .admin(
                "POST",
                "/admin/v1/packages",
                Some(
                    json!({"code": "p10k", "name": "10k", "quota_type": "text_token",
                "amount": 10000, "price": "1.00", "valid_days": 30}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let purchase =
            json!({"order_id": "O-1", "user_id": "bob", "package_code": "p10k", "bonus": 500});
        let (status, first) = app
            .admin("POST", "/admin/v1/purchases", Some(purchase.clone()))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{first}");
        assert_eq!(first["total"], 10500);
        assert!(first["expires_at"].as_i64().unwrap() > crate::storage::now_ms() + 29 * 86_400_000);
        let (status, again) = app
            .admin("POST", "/admin/v1/purchases", Some(purchase.clone()))
            .await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["lot_id"], first["lot_id"]);
        let mut other = purchase.clone();
        other["user_id"] = json!("carol");
        let (status, body) = app.admin("POST", "/admin/v1/purchases", Some(other)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let (status, _) = app
            .admin(
                "POST",
                "/admin/v1/purchases",
                Some(json!({"order_id": "O-2", "user_id": "bob", "package_code": "nope"})),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let quotas = quotas_of(&app, "bob").await;
        let text = text_quota(&quotas);
        assert_eq!(text["granted"], 15500, "{quotas}");
        assert_eq!(text["available"], 15500);
        assert_eq!(text["lots"].as_array().unwrap().len(), 2);
        let (_, audit) = app.admin("GET", "/admin/v1/audit?actor=tester", None).await;
        let actions: Vec<&str> = audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions.iter().filter(|a| **a == "grant.create").count(),
            1,
            "{actions:?}"
        );
        assert_eq!(
            actions.iter().filter(|a| **a == "purchase.record").count(),
            1,
            "{actions:?}"
        );
        app.finish().await;
    }
}

#[tokio::test]
async fn membership_activation_grants_the_plan_quota_once() {
    for app in apps().await {
        let (status, _) = app
            .admin("POST", "/admin/v1/plans", Some(json!({"code": "basic", "name": "Basic",
                "quotas": [{"quota_type": "text_token", "amount": 200000}, {"quota_type": "image", "amount": 20}]})))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let activation = json!({"order_id": "M-1", "user_id": "dora", "plan_code": "basic"});
        let (status, first) = app
            .admin("POST", "/admin/v1/memberships", Some(activation.clone()))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{first}");
        assert_eq!(first["lots_granted"], 2);
        let (status, again) = app
            .admin("POST", "/admin/v1/memberships", Some(activation))
            .await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["lots_granted"], 0);
        assert_eq!(again["membership"]["id"], first["membership"]["id"]);
        let (status, body) = app
            .admin(
                "POST",
                "/admin/v1/memberships",
                Some(json!({"order_id": "M-1", "user_id": "eve", "plan_code": "basic"})),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let (status, _) = app
            .admin(
                "POST",
                "/admin/v1/memberships",
                Some(json!({"order_id": "M-2", "user_id": "eve", "plan_code": "gold"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

        let quotas = quotas_of(&app, "dora").await;
        let text = text_quota(&quotas);
        assert_eq!(
            (text["granted"].as_u64(), text["available"].as_u64()),
            (Some(200000), Some(200000)),
            "{quotas}"
        );
        assert_eq!(text["lots"][0]["source_type"], "membership");
        assert!(
            text["lots"][0]["expires_at"].as_i64().is_some(),
            "monthly lots expire at the period end"
        );
        let (_, listed) = app
            .admin("GET", "/admin/v1/memberships?user_id=dora", None)
            .await;
        assert_eq!(listed.as_array().unwrap().len(), 1);

        // The reset of the current period, triggered twice, grants nothing more.
        let (status, run) = app.admin("POST", "/admin/v1/resets", None).await;
        assert_eq!(status, StatusCode::OK, "{run}");
        assert_eq!(
            (run["memberships"].as_u64(), run["already_done"].as_u64()),
            (Some(1), Some(1)),
            "{run}"
        );
        let (status, run) = app.admin("POST", "/admin/v1/resets", Some(json!({}))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (run["reset"].as_u64(), run["completed"].as_bool()),
            (Some(0), Some(true)),
            "{run}"
        );
        assert_eq!(
            text_quota(&quotas_of(&app, "dora").await)["granted"],
            200000
        );
        let (_, status_view) = app.admin("GET", "/admin/v1/resets", None).await;
        assert_eq!(
            status_view["last_completed_period"], status_view["current_period"],
            "{status_view}"
        );
        assert_eq!(status_view["runs"].as_array().unwrap().len(), 1);
        assert!(status_view["next_reset_at"].as_i64().unwrap() > crate::storage::now_ms());
        let (status, body) = app
            .admin(
                "POST",
                "/admin/v1/resets",
                Some(json!({"period": "2999-01"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let (status, _) = app
            .admin("POST", "/admin/v1/resets", Some(json!({"period": "May"})))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        app.finish().await;
    }
}

/// Authorize + settle one call through the internal API.
async fn metered_call(
    app: &TestApp,
    request_id: &str,
    user: &str,
    input: u64,
    output: u64,
) -> Value {
    let (status, auth) = app
        .internal(
            llm_meter_protocol::PATH_AUTHORIZE,
            json!({"request_id": request_id, "caller": {"user_id": user}, "provider": "openai", "model": "m1",
                "estimated_input_tokens": input, "max_output_tokens": output}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{auth}");
    assert_eq!(auth["decision"], "allow", "{auth}");
    let (status, settled) = app
        .internal(
            llm_meter_protocol::PATH_SETTLE,
            json!({"request_id": request_id, "caller": {"user_id": user}, "provider": "openai", "model": "m1",
                "outcome": "completed", "usage": {"input_tokens": input, "output_tokens": output},
                "upstream_status": 200}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{settled}");
    settled
}

async fn grant_text(app: &TestApp, user: &str, amount: u64) {
    let (status, body) = app
        .admin(
            "POST",
            "/admin/v1/grants",
            Some(json!({"user_id": user, "quota_type": "text_token",
            "amount": amount, "source_id": format!("seed-{user}")})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn usage_pages_and_cost_report_sums() {
    for app in apps().await {
        app.seed_priced_model().await;
        grant_text(&app, "ann", 1_000_000).await;
        grant_text(&app, "ben", 1_000_000).await;
        // 1000 in + 1000 out = 0.002 + 0.006 = 0.008 per call.
        for i in 0..5 {
            let settled = metered_call(&app, &format!("r-ann-{i}"), "ann", 1000, 1000).await;
            assert_eq!(settled["cost"], "0.008000", "{settled}");
        }
        metered_call(&app, "r-ben-0", "ben", 500, 0).await;

        // Pagination: 6 records in pages of 4, newest first, no overlap.
        let (_, page1) = app.admin("GET", "/admin/v1/usage?limit=4", None).await;
        assert_eq!(page1["items"].as_array().unwrap().len(), 4, "{page1}");
        assert_eq!(page1["items"][0]["request_id"], "r-ben-0");
        let cursor = page1["next_cursor"].as_str().unwrap();
        let (_, page2) = app
            .admin(
                "GET",
                &format!("/admin/v1/usage?limit=4&cursor={cursor}"),
                None,
            )
            .await;
        assert_eq!(page2["items"].as_array().unwrap().len(), 2);
        assert!(page2["next_cursor"].is_null());
        let ids: BTreeSet<String> = page1["items"]
            .as_array()
            .unwrap()
            .iter()
            .chain(page2["items"].as_array().unwrap())
            .map(|r| r["request_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 6);
        // Filters.
        let (_, bens) = app
            .admin("GET", "/admin/v1/usage?user_id=ben&status=settled", None)
            .await;
        assert_eq!(bens["items"].as_array().unwrap().len(), 1);
        assert_eq!(bens["items"][0]["input_tokens"], 500);
        assert_eq!(bens["items"][0]["cost"], "0.001000");
        let (_, one) = app
            .admin("GET", "/admin/v1/usage?request_id=r-ann-3", None)
            .await;
        assert_eq!(one["items"][0]["user_id"], "ann");
        let (_, none) = app.admin("GET", "/admin/v1/usage?from=1&to=2", None).await;
        assert!(none["items"].as_array().unwrap().is_empty());
        let (status, _) = app.admin("GET", "/admin/v1/usage?status=paid", None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

        // Cost report: grouped by user and in total, exact to the micro-yuan.
        let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let (status, report) = app
            .admin(
                "GET",
                &format!("/admin/v1/reports/cost?from={today}&to={today}&group_by=user"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{report}");
        let rows = report["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{report}");
        assert_eq!(
            (rows[0]["key"].as_str(), rows[0]["cost"].as_str()),
            (Some("ann"), Some("0.040000"))
        );
        assert_eq!(rows[0]["requests"], 5);
        assert_eq!(rows[1]["cost"], "0.001000");
        assert_eq!(report["totals"][0]["cost"], "0.041000");
        assert_eq!(report["totals"][0]["input_tokens"], 5500);
        let (_, by_model) = app
            .admin(
                "GET",
                &format!("/admin/v1/reports/cost?from={today}&to={today}&group_by=model"),
                None,
            )
            .await;
        assert_eq!(by_model["rows"][0]["key"], "openai/m1");
        let (_, by_day) = app
            .admin(
                "GET",
                &format!("/admin/v1/reports/cost?from={today}&to={today}"),
                None,
            )
            .await;
        assert_eq!(by_day["rows"][0]["key"], today.as_str());
        assert_eq!(by_day["rows"][0]["requests"], 6);
        let (status, _) = app
            .admin(
                "GET",
                "/admin/v1/reports/cost?from=2025-02-01&to=2025-01-01",
                None,
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let (status, _) = app
            .admin(
                "GET",
                "/admin/v1/reports/cost?from=yesterday&to=2025-01-01",
                None,
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let (status, _) = app
            .admin(
                "GET",
                "/admin/v1/reports/cost?from=2025-01-01&to=2025-01-02&group_by=planet",
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        // The quota view agrees: 5 * 2000 + 500 units used by ann and ben.
        assert_eq!(text_quota(&quotas_of(&app, "ann").await)["used"], 10000);
        let (_, reconcile) = app.admin("POST", "/admin/v1/reconcile", None).await;
        assert_eq!(reconcile["clean"], true, "{reconcile}");
        app.finish().await;
    }
}

#[tokio::test]
async fn finalize_batch_answers_each_item() {
    for app in apps().await {
        app.seed_priced_model().await;
        grant_text(&app, "fay", 100_000).await;
        for id in ["b-1", "b-2"] {
            let (_, auth) = app
                .internal(
                    llm_meter_protocol::PATH_AUTHORIZE,
                    json!({"request_id": id, "caller": {"user_id": "fay"}, "provider": "openai", "model": "m1",
                        "estimated_input_tokens": 10, "max_output_tokens": 10}),
                )
                .await;
            assert_eq!(auth["decision"], "allow");
        }
        let settle = |id: &str, output: u64| {
            json!({"op": "settle", "request_id": id, "caller": {"user_id": "fay"}, "provider": "openai",
                "model": "m1", "outcome": "completed", "usage": {"input_tokens": 10, "output_tokens": output}})
        };
        let batch = json!({"items": [
            settle("b-1", 5),
            {"op": "void", "request_id": "b-2", "reason": "upstream 500", "upstream_status": 500},
            settle("b-1", 5),
            settle("b-1", 9),
            {"op": "void", "request_id": "", "reason": "x"}
        ]});
        let (status, body) = app
            .internal(llm_meter_protocol::PATH_FINALIZE_BATCH, batch)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 5);
        assert_eq!(
            (results[0]["result"].as_str(), results[0]["status"].as_str()),
            (Some("ok"), Some("settled"))
        );
        assert_eq!(results[1]["status"], "voided");
        assert_eq!(results[2]["status"], "already_settled");
        assert_eq!(
            results[3]["result"], "rejected",
            "a retry with other figures is permanent: {body}"
        );
        assert_eq!(results[3]["request_id"], "b-1");
        assert_eq!(results[4]["result"], "rejected");
        // A database outage is transient: every item says retry.
        app.db.db.close().await;
        let (status, body) = app
            .internal(
                llm_meter_protocol::PATH_FINALIZE_BATCH,
                json!({"items": [settle("b-9", 1)]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["results"][0]["result"], "retry", "{body}");
        app.finish().await;
    }
}

/// A lease through the internal API: granted with the authorization, the calls under it
/// settled and voided in one outbox batch with the release, the remainder given back.
#[tokio::test]
async fn leases_over_the_internal_api() {
    for app in apps().await {
        app.seed_priced_model().await;
        grant_text(&app, "lee", 1_000_000).await;
        let (status, auth) = app
            .internal(
                llm_meter_protocol::PATH_AUTHORIZE,
                json!({"request_id": "l-1", "caller": {"user_id": "lee"}, "provider": "openai",
                    "model": "m1", "estimated_input_tokens": 10, "max_output_tokens": 10,
                    "lease": {"units": 5000, "ttl_ms": 600000}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{auth}");
        assert_eq!(
            (auth["decision"].as_str(), auth["held"].as_u64()),
            (Some("allow"), Some(20))
        );
        let lease = &auth["lease"];
        assert_eq!(lease["lease_id"], "lease:l-1", "{auth}");
        assert_eq!(lease["units"], 5000);
        assert_eq!(lease["measure"], "total_tokens");
        assert_eq!(lease["default_max_output_tokens"], 4096);
        // The ask's 10 minutes are capped to the default 60 s.
        let now = crate::storage::now_ms() as u64;
        let expires = lease["expires_at_ms"].as_u64().unwrap();
        assert!(expires > now + 50_000 && expires <= now + 60_000, "{auth}");
        assert_eq!(text_quota(&quotas_of(&app, "lee").await)["held"], 5000);

        let settle = |id: &str, output: u64| {
            json!({"op": "settle", "request_id": id, "caller": {"user_id": "lee"},
                "provider": "openai", "model": "m1", "outcome": "completed",
                "usage": {"input_tokens": 10, "output_tokens": output},
                "lease_id": "lease:l-1", "held": 20})
        };
        let batch = json!({"items": [
            settle("l-1", 10),
            settle("l-2", 30),
            {"op": "void", "request_id": "l-3", "reason": "upstream 500", "upstream_status": 500,
                "lease_id": "lease:l-1", "held": 20},
            settle("l-1", 10),
            {"op": "release", "lease_id": "lease:l-1"},
            {"op": "release", "lease_id": "lease:l-1"},
            {"op": "release", "lease_id": "lease:unknown"},
            settle("l-4", 10)
        ]});
        let (status, body) = app
            .internal(llm_meter_protocol::PATH_FINALIZE_BATCH, batch)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let results: Vec<(String, String)> = body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let status = r["status"].as_str().unwrap_or_default().to_string();
                (r["result"].as_str().unwrap().to_string(), status)
            })
            .collect();
        let expected = [
            ("ok", "settled"),
            ("ok", "settled"),
            ("ok", "voided"),
            ("ok", "already_settled"),
            ("ok", "released"),
            ("ok", "already_released"),
            ("rejected", ""),
            ("ok", "settled"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(results, expected, "{body}");
        assert_eq!(body["results"][0]["charged"], 20);
        assert_eq!(body["results"][0]["cost"], "0.000080");
        assert_eq!(body["results"][1]["charged"], 40);
        assert_eq!(body["results"][6]["request_id"], "lease:unknown");
        // l-4 arrived after the release: charged like a late settlement, nothing held.
        let quota = text_quota(&quotas_of(&app, "lee").await).clone();
        assert_eq!(
            (quota["held"].as_u64(), quota["used"].as_u64()),
            (Some(0), Some(80))
        );
        let (_, _, metrics) = app
            .send(Request::get("/metrics").body(Body::empty()).unwrap())
            .await;
        let text = metrics.as_str().unwrap();
        assert!(
            text.contains("meter_leases_total{event=\"granted\"} 1"),
            "{text}"
        );
        // The lease, its settlements and its release went through the group writers.
        let counter = |name: &str| -> u64 {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        let groups = counter("meter_ledger_groups_total");
        assert!(groups >= 2, "{text}");
        assert!(
            counter("meter_ledger_group_operations_total") >= groups,
            "{text}"
        );
        let busy_seconds: f64 = text
            .lines()
            .find_map(|line| line.strip_prefix("meter_ledger_writer_busy_seconds_total "))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no writer busy time in {text}"));
        assert!(busy_seconds > 0.0, "{text}");
        // Nothing contended here: no attempt was tried again.
        assert_eq!(counter("meter_ledger_transient_retries_total"), 0, "{text}");
        assert!(
            text.contains("meter_leases_total{event=\"released\"} 1"),
            "{text}"
        );
        let report = app.ledger.reconcile().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.drifts);
        app.finish().await;
    }
}

#[tokio::test]
async fn direct_consume_by_user_or_api_key() {
    for app in apps().await {
        app.seed_priced_model().await;
        grant_text(&app, "gil", 10_000).await;
        let (_, issued) = app
            .admin(
                "POST",
                "/admin/v1/api-keys",
                Some(json!({"user_id": "gil"})),
            )
            .await;
        let key = issued["key"].as_str().unwrap();
        let (status, body) = app
            .admin(
                "POST",
                "/admin/v1/consume",
                Some(
                    json!({"request_id": "c-1", "api_key": key, "provider": "openai",
                "model": "m1", "usage": {"input_tokens": 100, "output_tokens": 50}}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["authorization"]["decision"], "allow");
        assert_eq!(body["settlement"]["charged"], 150);
        let (_, denied) = app
            .admin(
                "POST",
                "/admin/v1/consume",
                Some(
                    json!({"request_id": "c-2", "user_id": "gil", "provider": "openai",
                "model": "m1", "usage": {"input_tokens": 100000, "output_tokens": 0}}),
                ),
            )
            .await;
        assert_eq!(denied["authorization"]["decision"], "deny", "{denied}");
        assert!(denied["settlement"].is_null());
        let (_, bad_key) = app
            .admin(
                "POST",
                "/admin/v1/consume",
                Some(json!({"request_id": "c-3", "api_key": "sk-meter-nope",
                "provider": "openai", "model": "m1", "usage": {"input_tokens": 1}})),
            )
            .await;
        assert_eq!(
            bad_key["authorization"]["denial"]["code"],
            "invalid_api_key"
        );
        let (status, _) = app
            .admin(
                "POST",
                "/admin/v1/consume",
                Some(
                    json!({"request_id": "c-4", "provider": "openai", "model": "m1",
                "usage": {"input_tokens": 1}}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(text_quota(&quotas_of(&app, "gil").await)["used"], 150);
        app.finish().await;
    }
}

#[tokio::test]
async fn server_serves_and_stops_gracefully() {
    let test_db = crate::storage::testing::fresh(Dialect::Sqlite).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = crate::config::ServeSettings {
        listen: addr,
        database_url: test_db.url.clone(),
        shared_secret: Secret::new(SECRET),
        admin_token: Secret::new(ADMIN),
        timezone: chrono_tz::UTC,
        ledger: LedgerConfig::default(),
        sweep_interval: std::time::Duration::from_secs(60),
        shutdown_grace: std::time::Duration::from_secs(5),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let db = test_db.db.clone();
    let server = tokio::spawn(async move {
        super::server::serve_on(listener, db, &settings, async {
            let _ = stopped.await;
        })
        .await
    });
    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let granted = client
        .post(format!("http://{addr}/admin/v1/grants"))
        .bearer_auth(ADMIN)
        .json(
            &json!({"user_id": "hal", "quota_type": "text_token", "amount": 10, "source_id": "g"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), 201);
    stop.send(()).unwrap();
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(
        client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .is_err(),
        "still accepting after shutdown"
    );
    test_db.cleanup().await;
}

#[tokio::test]
async fn replayed_settlement_with_other_figures_is_409() {
    for app in apps().await {
        app.seed_priced_model().await;
        grant_text(&app, "ivy", 100_000).await;
        let (_, auth) = app
            .internal(
                llm_meter_protocol::PATH_AUTHORIZE,
                json!({"request_id": "rp-1", "caller": {"user_id": "ivy"}, "provider": "openai",
                    "model": "m1", "estimated_input_tokens": 10, "max_output_tokens": 10}),
            )
            .await;
        assert_eq!(auth["decision"], "allow", "{auth}");
        let settle = |output: u64, user: &str| {
            json!({"request_id": "rp-1", "caller": {"user_id": user}, "provider": "openai",
                "model": "m1", "outcome": "completed", "usage": {"input_tokens": 10, "output_tokens": output}})
        };
        let (status, first) = app
            .internal(llm_meter_protocol::PATH_SETTLE, settle(5, "ivy"))
            .await;
        assert_eq!(
            (status, first["status"].as_str()),
            (StatusCode::OK, Some("settled")),
            "{first}"
        );
        let (status, same) = app
            .internal(llm_meter_protocol::PATH_SETTLE, settle(5, "ivy"))
            .await;
        assert_eq!(
            (status, same["status"].as_str()),
            (StatusCode::OK, Some("already_settled")),
            "{same}"
        );
        assert_eq!(same["charged"], first["charged"]);
        // Other figures, or a void after the settlement: 409 problems.
        for (path, body) in [
            (llm_meter_protocol::PATH_SETTLE, settle(500, "ivy")),
            (llm_meter_protocol::PATH_SETTLE, settle(6, "ivy")),
            (
                llm_meter_protocol::PATH_VOID,
                json!({"request_id": "rp-1", "reason": "late void"}),
            ),
        ] {
            let request = Request::post(path)
                .header(HEADER_SECRET, SECRET)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let (status, content_type, problem) = app.send(request).await;
            assert_eq!(
                status,
                StatusCode::CONFLICT,
                "{:?} {body}: {problem}",
                app.db.backend
            );
            assert_eq!(content_type, "application/problem+json");
            assert_eq!(problem["type"], "urn:llm-meter:problem:conflict");
            assert!(
                problem["detail"].as_str().unwrap().contains("rp-1"),
                "the detail names the request: {problem}"
            );
        }
        // Nothing moved: charged once, with the first figures.
        assert_eq!(text_quota(&quotas_of(&app, "ivy").await)["used"], 15);
        app.finish().await;
    }
}

#[tokio::test]
async fn a_grant_whose_audit_row_was_lost_gets_it_from_the_repeat() {
    for app in apps().await {
        let grant = json!({"user_id": "jon", "quota_type": "text_token", "amount": 500,
            "source_id": "lost-audit-1"});
        let (status, _) = app
            .admin("POST", "/admin/v1/grants", Some(grant.clone()))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        // The ledger committed the grant; its audit row did not make it.
        let sql = app
            .db
            .db
            .sql("DELETE FROM admin_audit WHERE action = 'grant.create' AND target_id = ?");
        sqlx::query(&sql)
            .bind("admin_grant:lost-audit-1")
            .execute(app.db.db.pool())
            .await
            .unwrap();
        let audit_rows = || async {
            let (_, audit) = app
                .admin("GET", "/admin/v1/audit?action=grant.create", None)
                .await;
            audit["items"].as_array().unwrap().clone()
        };
        assert!(audit_rows().await.is_empty());
        for _ in 0..2 {
            let (status, body) = app
                .admin("POST", "/admin/v1/grants", Some(grant.clone()))
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["created"], false);
            let rows = audit_rows().await;
            assert_eq!(rows.len(), 1, "{:?}: {rows:?}", app.db.backend);
            assert_eq!(rows[0]["actor"], "tester");
            assert_eq!(rows[0]["target_id"], "admin_grant:lost-audit-1");
            assert!(rows[0]["created_at"].as_i64().unwrap() > 0);
        }
        assert_eq!(text_quota(&quotas_of(&app, "jon").await)["granted"], 500);
        app.finish().await;
    }
}
