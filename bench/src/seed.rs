//! Seeding a bench ledger through the sidecar's own catalog and ledger API: the provider,
//! the priced model the load generators call, and quota for the bench users.

use anyhow::{Context, Result};
use llm_meter_protocol::{AuthorizeRequest, Caller, Outcome, SettleRequest, Usage};
use llm_meter_sidecar::catalog::models::{self, NewModel};
use llm_meter_sidecar::catalog::prices::{self, NewPrice, PriceItemView};
use llm_meter_sidecar::catalog::providers::{self, NewProvider};
use llm_meter_sidecar::catalog::{Actor, Status};
use llm_meter_sidecar::ledger::{GrantRequest, Ledger};
use rust_decimal::Decimal;

use crate::stream::{MODEL, PROMPT_TOKENS};

pub const PROVIDER: &str = "openai";
pub const QUOTA_TYPE: &str = "text_token";
/// Output cap every bench request asks for; with the prompt estimate it sizes the hold.
pub const MAX_OUTPUT_TOKENS: u64 = 300;

/// Provider, model and a price (0.15 / 0.60 yuan per 1k tokens).
pub async fn seed_catalog(ledger: &Ledger) -> Result<()> {
    let db = ledger.db();
    let actor = Actor("bench".into());
    providers::create(
        db,
        &actor,
        NewProvider {
            code: PROVIDER.into(),
            name: "OpenAI".into(),
            base_url: None,
            status: Status::Enabled,
        },
    )
    .await
    .context("create provider")?;
    models::create(
        db,
        &actor,
        NewModel {
            provider: PROVIDER.into(),
            model: MODEL.into(),
            display_name: None,
            model_type: "text".into(),
            quota_type: None,
            status: Status::Enabled,
        },
    )
    .await
    .context("create model")?;
    let item = |pricing_type: &str, price: i64| PriceItemView {
        pricing_type: pricing_type.into(),
        unit: "per_1k_tokens".into(),
        unit_price: Decimal::new(price, 2),
    };
    prices::create(
        db,
        &actor,
        NewPrice {
            provider: PROVIDER.into(),
            model: MODEL.into(),
            currency: "CNY".into(),
            min_charge: None,
            effective_from: None,
            items: vec![item("input_token", 15), item("output_token", 60)],
            remark: Some("bench".into()),
        },
    )
    .await
    .context("create price")?;
    ledger.prices().invalidate();
    Ok(())
}

/// Grant `amount` text tokens to `user` (one lot, idempotent by `source_id`).
pub async fn grant(ledger: &Ledger, user: &str, amount: u64, source_id: &str) -> Result<()> {
    ledger
        .grant(&GrantRequest {
            user_id: user.into(),
            quota_type: QUOTA_TYPE.into(),
            amount,
            source_type: "admin_grant".into(),
            source_id: source_id.into(),
            remark: None,
            effective_from: None,
            expires_at: None,
            priority: 0,
        })
        .await
        .with_context(|| format!("grant {user}"))?;
    Ok(())
}

/// `bench-user-0 .. bench-user-{n-1}` (the names the load generators send).
pub fn user_name(i: usize) -> String {
    format!("bench-user-{i}")
}

pub async fn grant_users(ledger: &Ledger, users: usize, amount: u64) -> Result<()> {
    for i in 0..users {
        let user = user_name(i);
        grant(ledger, &user, amount, &format!("bench-{user}")).await?;
    }
    Ok(())
}

/// The authorize request the filter would send for one bench call.
pub fn authorize_request(request_id: &str, user: &str) -> AuthorizeRequest {
    AuthorizeRequest {
        request_id: request_id.into(),
        caller: Caller::UserId(user.into()),
        provider: PROVIDER.into(),
        model: MODEL.into(),
        estimated_input_tokens: PROMPT_TOKENS,
        max_output_tokens: Some(MAX_OUTPUT_TOKENS),
        requested_images: None,
        stream: true,
        lease: None,
    }
}

/// Units one bench call holds (and, settled in full, consumes).
pub fn units_per_call() -> u64 {
    PROMPT_TOKENS + MAX_OUTPUT_TOKENS
}

/// The settlement of one bench call: it used exactly what it held.
pub fn settle_request(request_id: &str, user: &str) -> SettleRequest {
    SettleRequest {
        request_id: request_id.into(),
        caller: Caller::UserId(user.into()),
        provider: PROVIDER.into(),
        model: MODEL.into(),
        outcome: Outcome::Completed,
        usage: Usage {
            input_tokens: PROMPT_TOKENS,
            output_tokens: MAX_OUTPUT_TOKENS,
            ..Usage::default()
        },
        estimated: false,
        authorized: true,
        upstream_status: 200,
        ended_at_ms: None,
        lease_id: None,
        held: 0,
    }
}
