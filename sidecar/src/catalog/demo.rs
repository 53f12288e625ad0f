//! `seed-demo`: a provider, a priced text model and a user with quota, so a fresh
//! installation can be tried end to end. Idempotent: running it again changes nothing.

use rust_decimal::Decimal;
use serde::Serialize;

use super::models::{self, NewModel};
use super::prices::{self, NewPrice, PriceFilter, PriceItemView, PriceVersionView};
use super::providers::{self, NewProvider};
use super::{Actor, CatalogError, Status};
use crate::ledger::{Balance, GrantRequest, Ledger};

pub const DEMO_PROVIDER: &str = "openai";
pub const DEMO_MODEL: &str = "demo-model";
pub const DEMO_USER: &str = "demo-user";
pub const DEMO_GRANT_UNITS: u64 = 100_000;

#[derive(Serialize, Debug)]
pub struct Seeded {
    pub provider: String,
    pub model: String,
    pub price: PriceVersionView,
    pub user_id: String,
    pub grant_lot_id: i64,
    /// False when an earlier run had already granted it.
    pub grant_created: bool,
    pub quota: Option<Balance>,
}

pub async fn seed(ledger: &Ledger) -> anyhow::Result<Seeded> {
    let db = ledger.db();
    let actor = Actor("seed-demo".into());
    match providers::create(
        db,
        &actor,
        NewProvider {
            code: DEMO_PROVIDER.into(),
            name: "OpenAI".into(),
            base_url: Some("https://api.openai.com".into()),
            status: Status::Enabled,
        },
    )
    .await
    {
        Ok(_) | Err(CatalogError::Conflict(_)) => {}
        Err(err) => return Err(err.into()),
    }
    match models::create(
        db,
        &actor,
        NewModel {
            provider: DEMO_PROVIDER.into(),
            model: DEMO_MODEL.into(),
            display_name: Some("Demo model".into()),
            model_type: "text".into(),
            quota_type: None,
            status: Status::Enabled,
        },
    )
    .await
    {
        Ok(_) | Err(CatalogError::Conflict(_)) => {}
        Err(err) => return Err(err.into()),
    }
    let filter = PriceFilter {
        provider: Some(DEMO_PROVIDER.into()),
        model: Some(DEMO_MODEL.into()),
    };
    let price = match prices::list(db, &filter).await?.into_iter().next() {
        Some(existing) => existing,
        None => prices::create(db, &actor, demo_price()).await?,
    };
    ledger.prices().invalidate();
    let grant = ledger
        .grant(&GrantRequest {
            user_id: DEMO_USER.into(),
            quota_type: "text_token".into(),
            amount: DEMO_GRANT_UNITS,
            source_type: "admin_grant".into(),
            source_id: "seed-demo".into(),
            remark: Some("demo quota from seed-demo".into()),
            effective_from: None,
            expires_at: None,
            priority: 0,
        })
        .await?;
    Ok(Seeded {
        provider: DEMO_PROVIDER.into(),
        model: DEMO_MODEL.into(),
        price,
        user_id: DEMO_USER.into(),
        grant_lot_id: grant.lot_id,
        grant_created: grant.created,
        quota: ledger.balance(DEMO_USER, "text_token").await?,
    })
}

/// 0.002 yuan per 1k input tokens, 0.006 per 1k output tokens.
fn demo_price() -> NewPrice {
    let item = |pricing_type: &str, price: i64| PriceItemView {
        pricing_type: pricing_type.into(),
        unit: "per_1k_tokens".into(),
        unit_price: Decimal::new(price, 3),
    };
    NewPrice {
        provider: DEMO_PROVIDER.into(),
        model: DEMO_MODEL.into(),
        currency: "CNY".into(),
        min_charge: None,
        effective_from: None,
        items: vec![item("input_token", 2), item("output_token", 6)],
        remark: Some("seed-demo".into()),
    }
}
