//! Upstream + sidecar + Envoy wired together for one test.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::admin::Admin;
use crate::delay_proxy::DelayProxy;
use crate::procs::{Envoy, EnvoyOptions, FilterOptions, Sidecar, ADMIN_TOKEN};
use crate::upstream::ScriptedUpstream;

pub struct Stack {
    pub dir: PathBuf,
    pub upstream: ScriptedUpstream,
    pub sidecar: Sidecar,
    pub envoy: Envoy,
    pub admin: Admin,
    pub http: reqwest::Client,
    /// Between Envoy and the sidecar when [`StackOptions::slow_sidecar_proxy`] is set.
    pub sidecar_proxy: Option<DelayProxy>,
}

/// Everything a test may vary about a stack.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    pub filter: FilterOptions,
    pub sidecar_env: Vec<(String, String)>,
    pub envoy: EnvoyOptions,
    /// Route Envoy's calls to the sidecar through a [`DelayProxy`] (no delay until set).
    pub slow_sidecar_proxy: bool,
    /// A database URL instead of a fresh SQLite file.
    pub database_url: Option<String>,
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
        let options = StackOptions {
            filter,
            sidecar_env: sidecar_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..StackOptions::default()
        };
        Stack::start_opts(label, options).await
    }

    pub async fn start_opts(label: &str, options: StackOptions) -> Stack {
        let dir = crate::scratch_dir(label);
        let database_url = options
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.join("ledger.db").display()));
        let upstream = ScriptedUpstream::start().await;
        let env: Vec<(&str, &str)> = options
            .sidecar_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let sidecar = Sidecar::start(&database_url, &dir, &env);
        let sidecar_proxy = match options.slow_sidecar_proxy {
            true => Some(DelayProxy::start(sidecar.port).await),
            false => None,
        };
        let sidecar_port = sidecar_proxy.as_ref().map_or(sidecar.port, |p| p.port);
        let envoy = Envoy::start_with(
            &dir,
            sidecar_port,
            upstream.addr.port(),
            &options.filter,
            &options.envoy,
        );
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
            sidecar_proxy,
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

impl Drop for Stack {
    /// A passing test leaves nothing behind; a failing one keeps its logs and database for a look.
    fn drop(&mut self) {
        self.envoy.kill();
        self.sidecar.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
