use std::str::FromStr;
use std::time::Duration;

use super::*;
use crate::storage::testing::each_backend;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn item(pricing_type: PricingType, unit: PriceUnit, price: &str) -> PriceItem {
    PriceItem {
        pricing_type,
        unit,
        unit_price: dec(price),
    }
}

fn version(items: Vec<PriceItem>, min_charge: &str) -> PriceVersion {
    PriceVersion {
        id: 1,
        provider: "openai".into(),
        model: "gpt".into(),
        currency: "CNY".into(),
        min_charge: dec(min_charge),
        effective_from: 0,
        effective_to: None,
        items,
    }
}

fn text_price() -> Vec<PriceItem> {
    vec![
        item(PricingType::InputToken, PriceUnit::Per1kTokens, "0.002"),
        item(PricingType::OutputToken, PriceUnit::Per1kTokens, "0.006"),
    ]
}

#[test]
fn input_and_output_are_priced_per_thousand() {
    let usage = Usage {
        input_tokens: 1000,
        output_tokens: 500,
        ..Usage::default()
    };
    let cost = version(text_price(), "0").cost(&usage).unwrap();
    assert_eq!(cost.amount, dec("0.005"));
    assert_eq!(cost.micros, 5000);
    assert_eq!(format_micros(cost.micros), "0.005000");
}

#[test]
fn cached_and_cache_write_tokens_use_their_prices_or_fall_back_to_input() {
    let usage = Usage {
        input_tokens: 1_000_000,
        cached_input_tokens: 400_000,
        cache_write_tokens: 100_000,
        ..Usage::default()
    };
    let mut items = vec![
        item(PricingType::InputToken, PriceUnit::Per1mTokens, "2"),
        item(PricingType::CachedInputToken, PriceUnit::Per1mTokens, "0.5"),
    ];
    // 500k plain * 2 + 400k cached * 0.5 + 100k write at the input price * 2
    assert_eq!(
        version(items.clone(), "0").cost(&usage).unwrap().amount,
        dec("1.4")
    );
    items.push(item(
        PricingType::CacheWriteToken,
        PriceUnit::Per1mTokens,
        "2.5",
    ));
    assert_eq!(
        version(items, "0").cost(&usage).unwrap().amount,
        dec("1.45")
    );
}

#[test]
fn reasoning_is_a_clamped_subset_of_output() {
    let mut items = text_price();
    items.push(item(
        PricingType::ReasoningToken,
        PriceUnit::Per1kTokens,
        "0.01",
    ));
    let usage = Usage {
        output_tokens: 1000,
        reasoning_tokens: 5000,
        ..Usage::default()
    };
    // All 1000 output tokens are reasoning (clamped), none billed twice.
    assert_eq!(
        version(items, "0").cost(&usage).unwrap().amount,
        dec("0.01")
    );
    let usage = Usage {
        output_tokens: 1000,
        reasoning_tokens: 400,
        ..Usage::default()
    };
    // Without a reasoning price, reasoning is billed as output.
    assert_eq!(
        version(text_price(), "0").cost(&usage).unwrap().amount,
        dec("0.006")
    );
}

#[test]
fn rounding_is_half_up_once_per_call() {
    // 1 token at 0.0015 per 1k = 0.0000015 -> 0.000002 (half-up at the 6th decimal).
    let items = vec![item(
        PricingType::InputToken,
        PriceUnit::Per1kTokens,
        "0.0015",
    )];
    let usage = Usage {
        input_tokens: 1,
        ..Usage::default()
    };
    assert_eq!(version(items.clone(), "0").cost(&usage).unwrap().micros, 2);
    // Components are summed before rounding: 1 input (0.0000015) + 1 output (0.0000015)
    // = 0.000003 exactly, where rounding each would have given 0.000004.
    let items = vec![
        item(PricingType::InputToken, PriceUnit::Per1kTokens, "0.0015"),
        item(PricingType::OutputToken, PriceUnit::Per1kTokens, "0.0015"),
    ];
    let usage = Usage {
        input_tokens: 1,
        output_tokens: 1,
        ..Usage::default()
    };
    assert_eq!(version(items, "0").cost(&usage).unwrap().micros, 3);
}

#[test]
fn min_charge_applies_only_to_calls_that_used_something() {
    let v = version(text_price(), "0.01");
    let tiny = Usage {
        input_tokens: 1,
        ..Usage::default()
    };
    assert_eq!(v.cost(&tiny).unwrap().amount, dec("0.01"));
    assert_eq!(v.cost(&Usage::default()).unwrap().micros, 0);
    let big = Usage {
        input_tokens: 100_000,
        ..Usage::default()
    };
    assert_eq!(v.cost(&big).unwrap().amount, dec("0.2"));
}

#[test]
fn images_and_per_request_prices_add_up() {
    let items = vec![
        item(PricingType::Image, PriceUnit::PerImage, "0.14"),
        item(PricingType::PerRequest, PriceUnit::PerRequest, "0.001"),
    ];
    let usage = Usage {
        images: 3,
        ..Usage::default()
    };
    assert_eq!(
        version(items, "0").cost(&usage).unwrap().amount,
        dec("0.421")
    );
}

#[test]
fn huge_counts_overflow_cleanly_instead_of_panicking() {
    let items = vec![item(PricingType::InputToken, PriceUnit::PerRequest, "1")];
    let mut v = version(items, "0");
    v.items[0].pricing_type = PricingType::InputToken;
    v.items[0].unit = PriceUnit::PerImage;
    let usage = Usage {
        input_tokens: u64::MAX,
        ..Usage::default()
    };
    assert!(matches!(v.cost(&usage), Err(PricingError::Overflow)));
}

#[test]
fn validation_rejects_inconsistent_versions() {
    let mut v = NewPriceVersion {
        provider: "openai".into(),
        model: "gpt".into(),
        currency: "CNY".into(),
        min_charge: Decimal::ZERO,
        effective_from: 0,
        effective_to: None,
        items: text_price(),
        remark: None,
        created_by: None,
    };
    assert!(v.validate().is_ok());
    v.items
        .push(item(PricingType::Image, PriceUnit::Per1kTokens, "1"));
    assert!(v.validate().is_err());
    v.items.pop();
    v.items
        .push(item(PricingType::InputToken, PriceUnit::Per1kTokens, "1"));
    assert!(v.validate().is_err());
    v.items.pop();
    v.effective_to = Some(0);
    assert!(v.validate().is_err());
}

#[tokio::test]
async fn the_version_in_force_follows_effective_dates() {
    for t in each_backend().await {
        let db = &t.db;
        sqlx::query(&db.sql(
            "INSERT INTO models (provider_code, model_code, model_type, status, created_at, updated_at) \
             VALUES ('openai', 'gpt', 'text', 'enabled', 0, 0)",
        ))
        .execute(db.pool())
        .await
        .unwrap();
        let mut new = NewPriceVersion {
            provider: "openai".into(),
            model: "gpt".into(),
            currency: "CNY".into(),
            min_charge: Decimal::ZERO,
            effective_from: 1_000,
            effective_to: None,
            items: text_price(),
            remark: None,
            created_by: None,
        };
        let first = create_price_version(db, &new).await.unwrap();
        new.effective_from = 5_000;
        new.effective_to = Some(9_000);
        new.items[0].unit_price = dec("0.004");
        let second = create_price_version(db, &new).await.unwrap();

        let book = PriceBook::new(db.clone(), Duration::from_secs(60));
        let mut conn = crate::storage::Conn::from(db.pool().acquire().await.unwrap());
        let price_id = |p: &ModelPricing| p.price.as_ref().map(|v| v.id);
        let p = book.resolve(&mut conn, "openai", "gpt", 999).await.unwrap();
        assert_eq!(price_id(&p), None, "{:?}", t.backend);
        let p = book
            .resolve(&mut conn, "openai", "gpt", 1_000)
            .await
            .unwrap();
        assert_eq!(price_id(&p), Some(first));
        let p = book
            .resolve(&mut conn, "openai", "gpt", 5_000)
            .await
            .unwrap();
        assert_eq!(price_id(&p), Some(second));
        assert_eq!(p.price.as_ref().unwrap().items[0].unit_price, dec("0.004"));
        assert_eq!(p.quota_type, "text_token");
        assert_eq!(p.measure, Measure::TotalTokens);
        // When the second version ends, the open-ended first one is in force again.
        let p = book
            .resolve(&mut conn, "openai", "gpt", 9_000)
            .await
            .unwrap();
        assert_eq!(price_id(&p), Some(first));
        // Everything is cached now: the hot path needs no connection.
        let cached = book.resolve_cached("openai", "gpt", 5_000).unwrap();
        assert_eq!(price_id(&cached), Some(second));
        assert_eq!(cached.quota_type, "text_token");
        assert!(book.resolve_cached("openai", "never-seen", 5_000).is_none());
        book.invalidate();
        assert!(book.resolve_cached("openai", "gpt", 5_000).is_none());
        let unknown = book
            .resolve(&mut conn, "openai", "nope", 5_000)
            .await
            .unwrap();
        assert!(!unknown.known && unknown.price.is_none());
        assert_eq!(unknown.quota_type, "text_token");
        drop(conn);
        t.cleanup().await;
    }
}
