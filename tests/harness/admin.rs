//! A small client of the sidecar's admin API, for seeding the catalog and asserting the
//! ledger after a scenario.

use serde_json::{json, Value};

pub struct Admin {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Admin {
    pub fn new(base: &str, token: &str) -> Admin {
        Admin {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("admin GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("admin POST");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// POST that must succeed (2xx), returning the body.
    pub async fn must_post(&self, path: &str, body: Value) -> Value {
        let (status, value) = self.post(path, body.clone()).await;
        assert!(
            (200..300).contains(&status),
            "POST {path} {body} answered {status}: {value}"
        );
        value
    }

    /// POST /admin/v1/grants: an admin grant of `amount` units.
    pub async fn grant(&self, user: &str, quota_type: &str, amount: i64, source_id: &str) -> Value {
        self.must_post(
            "/admin/v1/grants",
            json!({
                "user_id": user,
                "quota_type": quota_type,
                "amount": amount,
                "source_type": "admin_grant",
                "source_id": source_id,
                "remark": "e2e",
            }),
        )
        .await
    }

    /// The quota view of one user for one quota type.
    pub async fn quota(&self, user: &str, quota_type: &str) -> Value {
        let (status, value) = self.get(&format!("/admin/v1/users/{user}/quotas")).await;
        assert_eq!(status, 200, "quota view answered {status}: {value}");
        find_quota(&value, quota_type).unwrap_or(Value::Null)
    }

    /// The quota view once nothing is held any more: calls admitted under a lease leave
    /// the lease's remainder held until the filter releases it (when idle), so a test that
    /// checks what is left waits for that release (up to 20 s) instead of racing it.
    pub async fn quota_released(&self, user: &str, quota_type: &str) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let quota = self.quota(user, quota_type).await;
            if num(&quota, "held") == 0 || std::time::Instant::now() >= deadline {
                return quota;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Usage records of one user (first page, newest first).
    pub async fn usage_of(&self, user: &str) -> Vec<Value> {
        let (status, value) = self
            .get(&format!("/admin/v1/usage?user_id={user}&limit=500"))
            .await;
        assert_eq!(status, 200, "usage listing answered {status}: {value}");
        value
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }
}

/// Quota views are a list of per-type entries (or keyed by type); accept either.
fn find_quota(view: &Value, quota_type: &str) -> Option<Value> {
    let list = view
        .get("quotas")
        .and_then(Value::as_array)
        .or_else(|| view.as_array())?;
    list.iter()
        .find(|q| q.get("quota_type").and_then(Value::as_str) == Some(quota_type))
        .cloned()
}

/// A numeric field that may be serialised as a number or a decimal string.
pub fn num(value: &Value, field: &str) -> i64 {
    match value.get(field) {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}
