//! Upstream + sidecar + Envoy wired together for one test.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::admin::Admin;
use crate::procs::{Envoy, FilterOptions, Sidecar, ADMIN_TOKEN};
use crate::upstream::ScriptedUpstream;

pub struct Stack {
    pub dir: PathBuf,
    pub upstream: ScriptedUpstream,
    pub sidecar: Sidecar,
    pub envoy: Envoy,
    pub admin: Admin,
    pub http: reqwest::Client,
}

impl Stack {
    /// A stack on a fresh SQLite ledger with the default filter options.
    pub async fn start(label: &str) -> Stack {
        Stack::start_with(label, FilterOptions::default(), &[]).await
    }

    pub async fn start_with(
        label: &str,
        filter: FilterOptions,
        sidecar_env: &[(&str, &str)],
    ) -> Stack {
        let dir = crate::scratch_dir(label);
        let database_url = format!("sqlite://{}?mode=rwc", dir.join("ledger.db").display());
        let upstream = ScriptedUpstream::start().await;
        let sidecar = Sidecar::start(&database_url, &dir, sidecar_env);
        let envoy = Envoy::start(&dir, sidecar.port, upstream.addr.port(), &filter);
        let admin = Admin::new(&sidecar.base_url(), ADMIN_TOKEN);
        Stack {
            dir,
            upstream,
            sidecar,
            envoy,
            admin,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        }
    }

    /// Seed provider `openai` (idempotent) and a text model priced per 1k tokens.
    pub async fn seed_priced_model(&self, model: &str, input_per_1k: &str, output_per_1k: &str) {
        self.seed_model(model).await;
        self.admin
            .must_post(
                "/admin/v1/prices",
                json!({
                    "provider": "openai",
                    "model": model,
                    "currency": "CNY",
                    "items": [
                        {"pricing_type": "input_token", "unit": "per_1k_tokens", "unit_price": input_per_1k},
                        {"pricing_type": "output_token", "unit": "per_1k_tokens", "unit_price": output_per_1k},
                    ],
                }),
            )
            .await;
    }

    /// Seed provider `openai` (idempotent) and a text model without a price.
    pub async fn seed_model(&self, model: &str) {
        let _ = self
            .admin
            .post(
                "/admin/v1/providers",
                json!({"code": "openai", "name": "OpenAI"}),
            )
            .await;
        self.admin
            .must_post(
                "/admin/v1/models",
                json!({"provider": "openai", "model": model, "model_type": "text"}),
            )
            .await;
    }

    /// POST a JSON body through Envoy as `user`, with scripted-upstream headers.
    pub async fn call(
        &self,
        path: &str,
        user: Option<&str>,
        body: &Value,
        script: &[(&str, &str)],
    ) -> Reply {
        let mut request = self.http.post(self.envoy.url(path)).json(body);
        if let Some(user) = user {
            request = request.header("x-user-id", user);
        }
        for (name, value) in script {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request through envoy");
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map(|b| b.to_vec())
            .unwrap_or_default();
        Reply { status, body }
    }

    /// Wait until the ledger shows `n` usage records for `user` (settlement is asynchronous).
    pub async fn wait_for_usage(&self, user: &str, n: usize) -> Vec<Value> {
        for _ in 0..200 {
            let records = self.admin.usage_of(user).await;
            if records.len() >= n {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "expected {n} usage records for {user}; sidecar log:\n{}\nenvoy log:\n{}",
            self.sidecar.log(),
            self.envoy.log()
        );
    }
}

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}
