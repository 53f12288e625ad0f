//! The database schema and its versioned migrations (one definition, rendered per dialect).
//!
//! Conventions: every key is VARCHAR(191) (MySQL utf8mb4 index limit); token and unit counts
//! are BIGINT; timestamps are BIGINT Unix milliseconds (`*_at`); days are VARCHAR(10)
//! `YYYY-MM-DD` in the configured time zone; flags are INTEGER 0/1; prices are decimal
//! strings (VARCHAR(40), parsed with rust_decimal); costs are BIGINT `cost_micros`
//! (1e-6 of the currency unit). No foreign keys: integrity is kept by the ledger code and
//! checked by `reconcile`, and FK share-locks would add deadlocks on MySQL. CHECK
//! constraints keep balances, holds, debt and lot remainders non-negative, so an arithmetic
//! bug aborts its transaction instead of corrupting the ledger.
//!
//! Catalog (written by the admin API, read by the ledger):
//! - `providers`: upstream providers by `code` (openai, dashscope, ...), enabled/disabled.
//! - `models`: (provider_code, model_code) -> model_type (text/image/embedding), optional
//!   `quota_type` override, status enabled/disabled.
//! - `quota_types`: what a quota counts: `measure` is one of total_tokens, input_tokens,
//!   output_tokens, images, requests, cost_micros; `model_type` is the model type it meters
//!   by default. A new kind of quota is a row here, not code.
//! - `price_versions`: effective-dated price of one (provider, model): currency, min_charge
//!   (decimal string), effective_from / effective_to (ms), status active/retired. Immutable
//!   once created: a price change is a new version.
//! - `price_items`: per version, one row per pricing_type (input_token, output_token,
//!   cached_input_token, cache_write_token, reasoning_token, image, per_request) with its
//!   unit (per_1k_tokens, per_1m_tokens, per_image, per_request) and unit_price (decimal string).
//! - `subscription_plans`: plans (code, name, price, period 'month', status).
//! - `plan_quotas`: per plan and quota type, the amount granted each period and its priority.
//! - `token_packages`: purchasable packages: quota type, amount, price, valid_days, priority.
//! - `memberships`: a user's subscription to a plan: status active/cancelled/expired,
//!   starts_at, ends_at (NULL = open-ended).
//! - `api_keys`: caller keys stored as SHA-256 hex (`key_hash`), with a display prefix,
//!   owner user_id, status active/revoked, optional expires_at.
//!
//! Ledger (written only by `crate::ledger`):
//! - `ledger_accounts`: one row per (user_id, quota_type): `balance` (remaining units of
//!   active lots), `held` (open reservations), `debt` (units consumed beyond the balance),
//!   `next_event_at` (earliest lot expiry/activation; admission re-checks lots once it passes).
//!   Every reservation is a guarded update of this row, which serialises one user's writes.
//! - `quota_lots`: grants. amount = remaining + used + expired. source (type, id) is the
//!   idempotency key per quota type. status pending (not yet effective) / active / expired.
//! - `ledger_holds`: one per authorized request: held amount, price version, status
//!   held/settled/voided/expired, expires_at (hold TTL). `kind` is `call`, or `lease` for
//!   a lease (keyed `lease:<request id>`): units held for one caller and model from which the
//!   filter admits calls itself; `amount` is what is left of it, `granted` what it started
//!   with, `first_held` the authorizing call's share, `admit_until` the end of admission
//!   (`expires_at` adds the hold TTL), status held/released/expired.
//! - `ledger_journal`: append-only. Every change to a lot, balance, held or debt is a row
//!   with its deltas (lot_delta, balance_delta, held_delta, debt_delta); kinds: grant,
//!   activate, reserve, release, settle, debt, repay, void, expire, reset, adjust.
//!   `request_id` is the call's request id (or `adjust:<id>` for a deduction).
//! - `usage_records`: one per finalized call (settled / voided / expired) with all token
//!   fields, units, charged, debt, cost_micros, flags (estimated, partial, unpriced, fail_open).
//! - `ledger_adjustments`: one per applied deduction (`adjustment_id`, its idempotency key)
//!   with its account and delta; the journal holds its movements.
//! - `daily_costs`: per (day, provider, model, user_id) sums, updated in the same
//!   transaction as each usage record.
//! - `reset_runs`: one per (membership_id, period) monthly reset, its idempotency key.
//! - `admin_audit`: who changed what through the admin API.
//! - `schema_migrations`: applied migration versions.

use sqlx::{AnyConnection, Executor, Row};

use super::{now_ms, Db, Dialect, StorageError};

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run, oldest first (empty when already up to date).
    pub applied: Vec<i64>,
    /// Highest version now in the database.
    pub current: i64,
}

struct Migration {
    version: i64,
    name: &'static str,
    statements: fn(Dialect) -> Vec<String>,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        statements: initial_schema,
    },
    Migration {
        version: 2,
        name: "default quota types",
        statements: default_quota_types,
    },
    Migration {
        version: 3,
        name: "leases",
        statements: leases,
    },
    Migration {
        version: 4,
        name: "lean settlement indexes",
        statements: lean_settlement_indexes,
    },
    Migration {
        version: 5,
        name: "burn-order index",
        statements: burn_order_index,
    },
];

/// Highest migration version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

/// Tables as (name, DDL body with `{ID}` for an auto-increment primary key), then indexes.
const TABLES: &[(&str, &str)] = &[
    (
        "providers",
        "code VARCHAR(191) NOT NULL PRIMARY KEY,
        name VARCHAR(191) NOT NULL,
        base_url VARCHAR(1000) NULL,
        status VARCHAR(16) NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL",
    ),
    (
        "models",
        "id {ID},
        provider_code VARCHAR(191) NOT NULL,
        model_code VARCHAR(191) NOT NULL,
        display_name VARCHAR(191) NULL,
        model_type VARCHAR(32) NOT NULL,
        quota_type VARCHAR(64) NULL,
        status VARCHAR(16) NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        CONSTRAINT uq_models_provider_model UNIQUE (provider_code, model_code)",
    ),
    (
        "quota_types",
        "code VARCHAR(64) NOT NULL PRIMARY KEY,
        name VARCHAR(191) NOT NULL,
        measure VARCHAR(32) NOT NULL,
        model_type VARCHAR(32) NULL,
        unit_label VARCHAR(32) NOT NULL,
        created_at BIGINT NOT NULL",
    ),
    (
        "price_versions",
        "id {ID},
        provider_code VARCHAR(191) NOT NULL,
        model_code VARCHAR(191) NOT NULL,
        currency VARCHAR(8) NOT NULL,
        min_charge VARCHAR(40) NOT NULL,
        effective_from BIGINT NOT NULL,
        effective_to BIGINT NULL,
        status VARCHAR(16) NOT NULL,
        remark VARCHAR(1000) NULL,
        created_by VARCHAR(191) NULL,
        created_at BIGINT NOT NULL",
    ),
    (
        "price_items",
        "version_id BIGINT NOT NULL,
        pricing_type VARCHAR(32) NOT NULL,
        unit VARCHAR(32) NOT NULL,
        unit_price VARCHAR(40) NOT NULL,
        PRIMARY KEY (version_id, pricing_type)",
    ),
    (
        "subscription_plans",
        "id {ID},
        code VARCHAR(191) NOT NULL,
        name VARCHAR(191) NOT NULL,
        description VARCHAR(1000) NULL,
        price VARCHAR(40) NULL,
        currency VARCHAR(8) NOT NULL,
        period VARCHAR(16) NOT NULL,
        status VARCHAR(16) NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        CONSTRAINT uq_plans_code UNIQUE (code)",
    ),
    (
        "plan_quotas",
        "plan_id BIGINT NOT NULL,
        quota_type VARCHAR(64) NOT NULL,
        amount BIGINT NOT NULL,
        priority INTEGER NOT NULL,
        PRIMARY KEY (plan_id, quota_type)",
    ),
    (
        "token_packages",
        "id {ID},
        code VARCHAR(191) NOT NULL,
        name VARCHAR(191) NOT NULL,
        quota_type VARCHAR(64) NOT NULL,
        amount BIGINT NOT NULL,
        price VARCHAR(40) NOT NULL,
        currency VARCHAR(8) NOT NULL,
        valid_days INTEGER NULL,
        priority INTEGER NOT NULL,
        status VARCHAR(16) NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        CONSTRAINT uq_packages_code UNIQUE (code)",
    ),
    (
        "memberships",
        "id {ID},
        user_id VARCHAR(191) NOT NULL,
        plan_id BIGINT NOT NULL,
        status VARCHAR(16) NOT NULL,
        starts_at BIGINT NOT NULL,
        ends_at BIGINT NULL,
        external_ref VARCHAR(191) NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL",
    ),
    (
        "api_keys",
        "id {ID},
        key_hash VARCHAR(64) NOT NULL,
        key_prefix VARCHAR(16) NOT NULL,
        user_id VARCHAR(191) NOT NULL,
        name VARCHAR(191) NULL,
        status VARCHAR(16) NOT NULL,
        created_at BIGINT NOT NULL,
        last_used_at BIGINT NULL,
        expires_at BIGINT NULL,
        revoked_at BIGINT NULL,
        CONSTRAINT uq_api_keys_hash UNIQUE (key_hash)",
    ),
    (
        "ledger_accounts",
        "user_id VARCHAR(191) NOT NULL,
        quota_type VARCHAR(64) NOT NULL,
        balance BIGINT NOT NULL,
        held BIGINT NOT NULL,
        debt BIGINT NOT NULL,
        next_event_at BIGINT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (user_id, quota_type),
        CONSTRAINT ck_accounts_non_negative CHECK (balance >= 0 AND held >= 0 AND debt >= 0)",
    ),
    (
        "quota_lots",
        "id {ID},
        user_id VARCHAR(191) NOT NULL,
        quota_type VARCHAR(64) NOT NULL,
        source_type VARCHAR(32) NOT NULL,
        source_id VARCHAR(191) NOT NULL,
        amount BIGINT NOT NULL,
        remaining BIGINT NOT NULL,
        used BIGINT NOT NULL,
        expired BIGINT NOT NULL,
        priority INTEGER NOT NULL,
        effective_from BIGINT NOT NULL,
        expires_at BIGINT NULL,
        status VARCHAR(16) NOT NULL,
        remark VARCHAR(1000) NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        CONSTRAINT uq_lots_source UNIQUE (source_type, source_id, quota_type),
        CONSTRAINT ck_lots_non_negative CHECK (remaining >= 0 AND used >= 0 AND expired >= 0)",
    ),
    (
        "ledger_holds",
        "request_id VARCHAR(191) NOT NULL PRIMARY KEY,
        user_id VARCHAR(191) NOT NULL,
        quota_type VARCHAR(64) NOT NULL,
        provider VARCHAR(191) NOT NULL,
        model VARCHAR(191) NOT NULL,
        amount BIGINT NOT NULL,
        price_version_id BIGINT NULL,
        priced INTEGER NOT NULL,
        status VARCHAR(16) NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        finalized_at BIGINT NULL",
    ),
    (
        "ledger_journal",
        "id {ID},
        user_id VARCHAR(191) NOT NULL,
        quota_type VARCHAR(64) NOT NULL,
        kind VARCHAR(16) NOT NULL,
        lot_id BIGINT NULL,
        request_id VARCHAR(191) NULL,
        lot_delta BIGINT NOT NULL,
        balance_delta BIGINT NOT NULL,
        held_delta BIGINT NOT NULL,
        debt_delta BIGINT NOT NULL,
        memo VARCHAR(1000) NULL,
        created_at BIGINT NOT NULL",
    ),
    (
        "usage_records",
        "id {ID},
        request_id VARCHAR(191) NOT NULL,
        user_id VARCHAR(191) NOT NULL,
        provider VARCHAR(191) NOT NULL,
        model VARCHAR(191) NOT NULL,
        quota_type VARCHAR(64) NOT NULL,
        outcome VARCHAR(16) NOT NULL,
        input_tokens BIGINT NOT NULL,
        cached_input_tokens BIGINT NOT NULL,
        cache_write_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        reasoning_tokens BIGINT NOT NULL,
        images BIGINT NOT NULL,
        units BIGINT NOT NULL,
        charged BIGINT NOT NULL,
        debt BIGINT NOT NULL,
        held BIGINT NOT NULL,
        cost_micros BIGINT NULL,
        currency VARCHAR(8) NULL,
        price_version_id BIGINT NULL,
        estimated INTEGER NOT NULL,
        partial INTEGER NOT NULL,
        unpriced INTEGER NOT NULL,
        fail_open INTEGER NOT NULL,
        upstream_status INTEGER NOT NULL,
        status VARCHAR(16) NOT NULL,
        reason VARCHAR(1000) NULL,
        day VARCHAR(10) NOT NULL,
        started_at BIGINT NULL,
        ended_at BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        CONSTRAINT uq_usage_request UNIQUE (request_id)",
    ),
    (
        "daily_costs",
        "day VARCHAR(10) NOT NULL,
        provider VARCHAR(191) NOT NULL,
        model VARCHAR(191) NOT NULL,
        user_id VARCHAR(191) NOT NULL,
        quota_type VARCHAR(64) NOT NULL,
        currency VARCHAR(8) NULL,
        requests BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        cached_input_tokens BIGINT NOT NULL,
        cache_write_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        reasoning_tokens BIGINT NOT NULL,
        images BIGINT NOT NULL,
        units BIGINT NOT NULL,
        cost_micros BIGINT NOT NULL,
        unpriced_requests BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (day, provider, model, user_id)",
    ),
    (
        "reset_runs",
        "membership_id BIGINT NOT NULL,
        period VARCHAR(7) NOT NULL,
        user_id VARCHAR(191) NOT NULL,
        plan_id BIGINT NOT NULL,
        granted_lots INTEGER NOT NULL,
        expired_units BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (membership_id, period)",
    ),
    (
        "admin_audit",
        "id {ID},
        actor VARCHAR(191) NOT NULL,
        action VARCHAR(64) NOT NULL,
        target_type VARCHAR(64) NOT NULL,
        target_id VARCHAR(191) NULL,
        detail VARCHAR(4000) NULL,
        created_at BIGINT NOT NULL",
    ),
];

/// (index name, table, columns).
const INDEXES: &[(&str, &str, &str)] = &[
    (
        "ix_price_versions_model",
        "price_versions",
        "provider_code, model_code, effective_from",
    ),
    ("ix_memberships_user", "memberships", "user_id"),
    ("ix_memberships_status", "memberships", "status"),
    ("ix_api_keys_user", "api_keys", "user_id"),
    ("ix_accounts_next_event", "ledger_accounts", "next_event_at"),
    ("ix_lots_user", "quota_lots", "user_id, quota_type, status"),
    (
        "ix_holds_status_expiry",
        "ledger_holds",
        "status, expires_at",
    ),
    ("ix_usage_user_time", "usage_records", "user_id, ended_at"),
    ("ix_daily_costs_user", "daily_costs", "user_id, day"),
    ("ix_audit_time", "admin_audit", "created_at"),
];

fn id_column(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
        Dialect::Postgres => "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        Dialect::MySql => "BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
    }
}

fn create_table(dialect: Dialect, name: &str, body: &str) -> String {
    let body = body.replace("{ID}", id_column(dialect));
    let options = match dialect {
        // Binary collation: keys compare byte-wise, as on PostgreSQL and SQLite.
        Dialect::MySql => " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        Dialect::Sqlite | Dialect::Postgres => "",
    };
    format!("CREATE TABLE IF NOT EXISTS {name} (\n        {body}\n){options}")
}

fn create_index(dialect: Dialect, name: &str, table: &str, columns: &str) -> String {
    match dialect {
        // MySQL has no CREATE INDEX IF NOT EXISTS; a duplicate (1061) is ignored when run.
        Dialect::MySql => format!("CREATE INDEX {name} ON {table} ({columns})"),
        Dialect::Sqlite | Dialect::Postgres => {
            format!("CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})")
        }
    }
}

fn initial_schema(dialect: Dialect) -> Vec<String> {
    let mut statements: Vec<String> = TABLES
        .iter()
        .map(|(name, body)| create_table(dialect, name, body))
        .collect();
    statements.extend(
        INDEXES
            .iter()
            .map(|(name, table, columns)| create_index(dialect, name, table, columns)),
    );
    statements
}

fn default_quota_types(dialect: Dialect) -> Vec<String> {
    let now = now_ms();
    [
        (
            "text_token",
            "Text tokens",
            "total_tokens",
            "text",
            "tokens",
        ),
        ("image", "Images", "images", "image", "images"),
        (
            "embedding_token",
            "Embedding tokens",
            "input_tokens",
            "embedding",
            "tokens",
        ),
    ]
    .iter()
    .map(|(code, name, measure, model_type, unit)| {
        dialect.insert_ignore(
            &format!(
                "INSERT INTO quota_types (code, name, measure, model_type, unit_label, created_at) \
                 VALUES ('{code}', '{name}', '{measure}', '{model_type}', '{unit}', {now})"
            ),
            "code",
        )
    })
    .collect()
}

/// Version 3: what a lease needs on its hold row (see the module documentation).
fn leases(dialect: Dialect) -> Vec<String> {
    [
        "kind VARCHAR(16) NOT NULL DEFAULT 'call'",
        "granted BIGINT NULL",
        "first_held BIGINT NULL",
        "admit_until BIGINT NULL",
    ]
    .iter()
    .map(|column| add_column(dialect, "ledger_holds", column))
    .collect()
}

/// Indexes that version 1 created and nothing reads, dropped by version 4.
const UNREAD_INDEXES: &[(&str, &str)] = &[
    ("ix_journal_account", "ledger_journal"),
    ("ix_journal_request", "ledger_journal"),
    ("ix_usage_day", "usage_records"),
];

/// Version 4: every settlement writes journal and usage rows, and each index on them is one
/// more B-tree page the commit writes (the journal indexes keyed by user and by request id
/// land on random pages). None of these served a query but the deduplication of
/// deductions, which now has its own table (`ledger_adjustments`, filled from the journal).
fn lean_settlement_indexes(dialect: Dialect) -> Vec<String> {
    let mut statements = vec![create_table(
        dialect,
        "ledger_adjustments",
        "adjustment_id VARCHAR(191) NOT NULL PRIMARY KEY,
        user_id VARCHAR(191) NOT NULL,
        quota_type VARCHAR(64) NOT NULL,
        delta BIGINT NOT NULL,
        created_at BIGINT NOT NULL",
    )];
    // Deductions applied before this version: journal rows keyed `adjust:<id>`.
    let backfill = format!(
        "INSERT INTO ledger_adjustments (adjustment_id, user_id, quota_type, delta, created_at) \
         SELECT SUBSTR(request_id, 8), MIN(user_id), MIN(quota_type), {}, MIN(created_at) \
         FROM ledger_journal WHERE kind = 'adjust' AND request_id IS NOT NULL \
         GROUP BY request_id",
        dialect.sum_i64("balance_delta")
    );
    statements.push(dialect.insert_ignore(&backfill, "adjustment_id"));
    statements.extend(
        UNREAD_INDEXES
            .iter()
            .map(|(name, table)| drop_index(dialect, name, table)),
    );
    statements
}

/// The columns of `ix_lots_burn`: an account's key, then the lot's status and the burn
/// order (`ledger::accounts::BURN_ORDER`, its expression in parentheses).
pub(crate) const BURN_INDEX_COLUMNS: &str = "user_id, quota_type, status, priority, \
     (CASE WHEN expires_at IS NULL THEN 1 ELSE 0 END), expires_at, created_at, id";

/// Version 5: a burn reads an account's first active lots in burn order. Served by
/// `ix_lots_user` (user, quota type, status), the database read and sorted every active lot
/// to return the first 16: a user with 1,000 live lots settled in twice the time of a user
/// with one. Ordered by the burn order after the same prefix, the index returns those lots
/// in order, and it still serves every query `ix_lots_user` did (the same three leading
/// columns), which it replaces. Burns update only `remaining`, `used` and `updated_at`, none
/// of them indexed, so PostgreSQL keeps updating lots in place (HOT). MySQL has no
/// expression index short of a generated column; there the lots keep `ix_lots_user`.
/// Building the index holds writes to `quota_lots` for its duration (seconds for millions
/// of lots), once, when the first sidecar of this version starts.
fn burn_order_index(dialect: Dialect) -> Vec<String> {
    match dialect {
        Dialect::Sqlite | Dialect::Postgres => vec![
            create_index(dialect, "ix_lots_burn", "quota_lots", BURN_INDEX_COLUMNS),
            drop_index(dialect, "ix_lots_user", "quota_lots"),
        ],
        Dialect::MySql => Vec::new(),
    }
}

fn drop_index(dialect: Dialect, name: &str, table: &str) -> String {
    match dialect {
        Dialect::Sqlite | Dialect::Postgres => format!("DROP INDEX IF EXISTS {name}"),
        // MySQL has no DROP INDEX IF EXISTS; a missing index (1091) is ignored when run.
        Dialect::MySql => format!("DROP INDEX {name} ON {table}"),
    }
}

fn add_column(dialect: Dialect, table: &str, column: &str) -> String {
    match dialect {
        Dialect::Postgres => format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}"),
        // SQLite runs the migration in one transaction; MySQL's duplicate column (1060) from
        // an interrupted earlier run is ignored when run.
        Dialect::Sqlite | Dialect::MySql => format!("ALTER TABLE {table} ADD COLUMN {column}"),
    }
}

/// Applies pending migrations under a cross-process lock.
pub(super) async fn migrate(db: &Db) -> Result<MigrationReport, StorageError> {
    let dialect = db.dialect();
    let mut conn = db.pool().acquire().await?;
    lock(dialect, &mut conn).await?;
    let result = apply_pending(dialect, &mut conn).await;
    let unlocked = unlock(dialect, &mut conn).await;
    let report = result?;
    unlocked?;
    Ok(report)
}

async fn lock(dialect: Dialect, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    match dialect {
        Dialect::Postgres => {
            conn.execute(
                "SELECT pg_advisory_lock(hashtext(current_schema() || '.llm_meter_migrate'))",
            )
            .await?;
        }
        Dialect::MySql => {
            conn.execute("SELECT GET_LOCK(CONCAT(DATABASE(), '.llm_meter_migrate'), 120)")
                .await?;
        }
        // Each SQLite migration runs inside BEGIN IMMEDIATE, which excludes other writers.
        Dialect::Sqlite => {}
    }
    Ok(())
}

async fn unlock(dialect: Dialect, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    match dialect {
        Dialect::Postgres => {
            conn.execute(
                "SELECT pg_advisory_unlock(hashtext(current_schema() || '.llm_meter_migrate'))",
            )
            .await?;
        }
        Dialect::MySql => {
            conn.execute("SELECT RELEASE_LOCK(CONCAT(DATABASE(), '.llm_meter_migrate'))")
                .await?;
        }
        Dialect::Sqlite => {}
    }
    Ok(())
}

async fn apply_pending(
    dialect: Dialect,
    conn: &mut AnyConnection,
) -> Result<MigrationReport, StorageError> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT NOT NULL PRIMARY KEY,
            name VARCHAR(191) NOT NULL,
            applied_at BIGINT NOT NULL)",
    )
    .await?;
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        if is_applied(dialect, conn, migration.version).await? {
            continue;
        }
        apply_one(dialect, conn, migration)
            .await
            .map_err(|source| StorageError::Migration {
                version: migration.version,
                name: migration.name,
                source,
            })?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
        applied.push(migration.version);
    }
    let current: Option<i64> = sqlx::query("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    let current = current.unwrap_or(0);
    Ok(MigrationReport { applied, current })
}

async fn is_applied(
    dialect: Dialect,
    conn: &mut AnyConnection,
    version: i64,
) -> Result<bool, sqlx::Error> {
    let sql = dialect.sql("SELECT version FROM schema_migrations WHERE version = ?");
    let row = sqlx::query(&sql)
        .bind(version)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.is_some())
}

async fn apply_one(
    dialect: Dialect,
    conn: &mut AnyConnection,
    migration: &Migration,
) -> Result<(), sqlx::Error> {
    // PostgreSQL and SQLite DDL is transactional; MySQL commits each DDL statement, so
    // there every statement is written to be re-runnable instead.
    let begin = match dialect {
        Dialect::Sqlite => Some("BEGIN IMMEDIATE"),
        Dialect::Postgres => Some("BEGIN"),
        Dialect::MySql => None,
    };
    if let Some(begin) = begin {
        conn.execute(begin).await?;
    }
    let result = run_statements(dialect, conn, migration).await;
    match (result, begin.is_some()) {
        (Ok(()), true) => {
            conn.execute("COMMIT").await?;
            Ok(())
        }
        (Ok(()), false) => Ok(()),
        (Err(e), true) => {
            let _ = conn.execute("ROLLBACK").await;
            Err(e)
        }
        (Err(e), false) => Err(e),
    }
}

async fn run_statements(
    dialect: Dialect,
    conn: &mut AnyConnection,
    migration: &Migration,
) -> Result<(), sqlx::Error> {
    for statement in (migration.statements)(dialect) {
        if let Err(e) = conn.execute(statement.as_str()).await {
            if !is_already_applied(&e) {
                return Err(e);
            }
        }
    }
    let sql =
        dialect.sql("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)");
    sqlx::query(&sql)
        .bind(migration.version)
        .bind(migration.name)
        .bind(now_ms())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// MySQL errors 1060 (duplicate column name), 1061 (duplicate key name) and 1091 (no such
/// key to drop): the column or index exists, or is gone, from an interrupted earlier run
/// (MySQL DDL is not transactional), or was never created by a newer version 1.
fn is_already_applied(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|e| matches!(e.number(), 1060 | 1061 | 1091)),
        _ => false,
    }
}
