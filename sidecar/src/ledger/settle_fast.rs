//! PostgreSQL: the common settlement in ONE statement.
//!
//! Why: the general path reads the hold, its account and first lots (locked), computes the
//! charge in Rust and then writes, so a settlement costs two round trips inside its group's
//! transaction, and four alone (BEGIN, the read, the writes, COMMIT). Each round trip wakes
//! a PostgreSQL backend and a tokio thread, and that, more than the rows written, is what a
//! pair costs on loopback (ANALYSIS, section 3). In the common case the charge is known
//! before anything is read: a call's own hold, still `held`, priced by the version the
//! catalog gives the model now, no lot event due, and the first lot in burn order covering
//! the whole charge. The units then follow from the usage and the catalog alone, and what
//! the statement needs from the rows (the hold's amount, its user and start) it takes
//! inside the statement.
//!
//! So one statement locks the same rows in the same order as the general path (hold,
//! account, first lot), checks those conditions, and makes exactly the general path's
//! writes (hold, lot, account, usage record, daily cost, the release and settle journal
//! rows), all or nothing: every write joins the one row of `ok`, which exists only when
//! every condition holds. When one fails it writes nothing, and the general path runs and
//! answers as before (replays, late or direct settlements, debt, several lots, a price
//! changed since the authorization). `one_statement_matches_the_general_path` proves the
//! rows equal.
//!
//! Settlements under a lease (the filter's batches) take the general path: the same
//! statement with the lease in the hold's place was built and measured, and in the proxy
//! bench it made PostgreSQL work more per call, not less (ANALYSIS, section 3).

use llm_meter_protocol::{Outcome, SettleRequest, SettleResponse, SettleStatus};
use sqlx::Row;

use super::accounts::{BURNABLE_OF_L, BURN_ORDER_OF_L, LOTS_OF_H};
use super::settle::{measure, outcome_name, token_columns, Target};
use super::{Ledger, LedgerError};
use crate::pricing::format_micros;
use crate::storage::{bind_values, Conn, Dialect, Value};

/// The statement in PostgreSQL's `$n` form, built once.
fn statement() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        Dialect::Postgres
            .sql(&settle_sql(&daily_cost_upsert()))
            .into_owned()
    })
}

/// The statement; its `?` are bound by [`Ledger::settle_in_one_statement`] in this order.
fn settle_sql(daily_cost_upsert: &str) -> String {
    format!(
        "WITH h AS MATERIALIZED (SELECT user_id, quota_type, amount, created_at \
           FROM ledger_holds WHERE request_id = ? AND status = 'held' AND kind = 'call' \
           AND provider = ? AND model = ? AND quota_type = ? \
           AND price_version_id IS NOT DISTINCT FROM CAST(? AS BIGINT) FOR UPDATE), \
         a AS MATERIALIZED (SELECT a.balance - a.held + h.amount AS available \
           FROM ledger_accounts a JOIN h ON a.user_id = h.user_id AND a.quota_type = h.quota_type \
           WHERE (a.next_event_at IS NULL OR a.next_event_at > ?) FOR UPDATE OF a), \
         l AS MATERIALIZED (SELECT l.id, l.remaining FROM quota_lots l \
           WHERE {LOTS_OF_H} AND {BURNABLE_OF_L} ORDER BY {BURN_ORDER_OF_L} LIMIT 1 \
           FOR UPDATE OF l), \
         ok AS MATERIALIZED (SELECT h.user_id, h.quota_type, h.amount, h.created_at, \
           l.id AS lot_id FROM h, a, l WHERE a.available >= ? AND l.remaining >= ? \
           AND NOT EXISTS (SELECT 1 FROM usage_records u WHERE u.request_id = ?)), \
         wh AS (UPDATE ledger_holds SET status = 'settled', finalized_at = ? FROM ok \
           WHERE ledger_holds.request_id = ?), \
         wl AS (UPDATE quota_lots SET remaining = remaining - ?, used = used + ?, \
           updated_at = ? FROM ok WHERE quota_lots.id = ok.lot_id), \
         wa AS (UPDATE ledger_accounts SET balance = balance - ?, held = held - ok.amount, \
           updated_at = ? FROM ok WHERE ledger_accounts.user_id = ok.user_id \
           AND ledger_accounts.quota_type = ok.quota_type), \
         wu AS (INSERT INTO usage_records (request_id, user_id, provider, model, quota_type, \
           outcome, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, \
           reasoning_tokens, images, units, charged, debt, held, cost_micros, currency, \
           price_version_id, estimated, partial, unpriced, fail_open, upstream_status, status, \
           reason, day, started_at, ended_at, created_at) \
           SELECT ?, ok.user_id, ?, ?, ok.quota_type, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ok.amount, \
           CAST(? AS BIGINT), CAST(? AS VARCHAR), CAST(? AS BIGINT), ?, ?, ?, 0, ?, 'settled', \
           CAST(NULL AS VARCHAR), ?, ok.created_at, ?, ? FROM ok), \
         wd AS ({daily_cost_upsert}), \
         wj AS (INSERT INTO ledger_journal (user_id, quota_type, kind, lot_id, request_id, \
           lot_delta, balance_delta, held_delta, debt_delta, memo, created_at) \
           SELECT ok.user_id, ok.quota_type, 'release', CAST(NULL AS BIGINT), ?, 0, 0, \
           -ok.amount, 0, CAST(NULL AS VARCHAR), ? FROM ok WHERE ok.amount > 0 \
           UNION ALL SELECT ok.user_id, ok.quota_type, 'settle', ok.lot_id, ?, ?, ?, 0, 0, \
           CAST(NULL AS VARCHAR), ? FROM ok) \
         SELECT COUNT(*) FROM ok"
    )
}

/// The daily-cost upsert of `push_daily_cost`, its row taken from `ok`.
fn daily_cost_upsert() -> String {
    let insert = "INSERT INTO daily_costs (day, provider, model, user_id, quota_type, currency, \
        requests, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, \
        reasoning_tokens, images, units, cost_micros, unpriced_requests, updated_at) \
        SELECT ?, ?, ?, ok.user_id, ok.quota_type, CAST(? AS VARCHAR), 1, ?, ?, ?, ?, ?, ?, ?, \
        ?, ?, ? FROM ok";
    Dialect::Postgres.upsert_add(
        insert,
        "daily_costs",
        &["day", "provider", "model", "user_id"],
        &super::DAILY_COST_SUMS,
        &["currency", "updated_at"],
    )
}

impl Ledger {
    /// Settles `req` in one statement when its common case holds (see the module); None
    /// when it did not apply, having written nothing.
    pub(super) async fn settle_in_one_statement(
        &self,
        conn: &mut Conn,
        req: &SettleRequest,
    ) -> Result<Option<SettleResponse>, LedgerError> {
        if !self.may_settle_in_one_statement(req) {
            return Ok(None);
        }
        let now = self.now();
        let model = self
            .prices()
            .resolve(conn, &req.provider, &req.model, now)
            .await?;
        // The hold's user is read by the statement; measuring needs only the catalog.
        let target = Target::by_catalog(req, model, String::new(), false);
        let measured = measure(&target, &req.usage)?;
        let units = measured.units;
        if units <= 0 {
            // No lot is burned and no settle row written: the general path's shape.
            return Ok(None);
        }
        let ended_at = match req.ended_at_ms.and_then(|t| i64::try_from(t).ok()) {
            Some(t) if t > 0 && t <= now => t,
            _ => now,
        };
        let cost_micros = measured.cost.map(|c| c.micros);
        let currency = target.price.as_ref().map(|p| p.currency.clone());
        let price_version = target.price.as_ref().map(|p| p.id);
        let day = self.day_of(ended_at);
        let tokens = token_columns(&measured.usage);
        let rid = req.request_id.as_str();
        let provider = req.provider.as_str();
        let model_code = req.model.as_str();
        let flag = |b: bool| Value::from(i64::from(b));
        let mut values: Vec<Value> = vec![
            // h
            rid.into(),
            provider.into(),
            model_code.into(),
            target.quota_type.as_str().into(),
            price_version.into(),
            // a
            now.into(),
            // ok
            units.into(),
            units.into(),
            rid.into(),
            // wh
            now.into(),
            rid.into(),
            // wl
            units.into(),
            units.into(),
            now.into(),
            // wa
            units.into(),
            now.into(),
            // wu
            rid.into(),
            provider.into(),
            model_code.into(),
            outcome_name(req.outcome).into(),
        ];
        values.extend(tokens.iter().cloned());
        values.extend([
            units.into(),
            units.into(),
            cost_micros.into(),
            currency.clone().into(),
            price_version.into(),
            flag(req.estimated),
            flag(req.outcome == Outcome::Partial),
            flag(target.price.is_none()),
            i64::from(req.upstream_status).into(),
            day.as_str().into(),
            ended_at.into(),
            now.into(),
            // wd
            day.as_str().into(),
            provider.into(),
            model_code.into(),
            currency.clone().into(),
        ]);
        values.extend(tokens);
        values.extend([
            units.into(),
            cost_micros.unwrap_or(0).into(),
            i64::from(cost_micros.is_none()).into(),
            now.into(),
            // wj
            rid.into(),
            now.into(),
            rid.into(),
            (-units).into(),
            (-units).into(),
            now.into(),
        ]);
        let row = bind_values(sqlx::query(statement()), values)
            .fetch_one(&mut *conn)
            .await?;
        if row.try_get::<i64, _>(0)? != 1 {
            return Ok(None);
        }
        Ok(Some(SettleResponse {
            request_id: req.request_id.clone(),
            status: SettleStatus::Settled,
            charged: units as u64,
            debt: 0,
            cost: cost_micros.map(format_micros),
            currency,
        }))
    }

    /// A settlement alone in its group, outside a transaction: the statement is atomic on
    /// its own, so one round trip instead of BEGIN, the statement and COMMIT. None when it
    /// did not apply or failed (it then wrote nothing); the group runs the general path.
    pub(super) async fn settle_alone(&self, req: &SettleRequest) -> Option<SettleResponse> {
        if !self.may_settle_in_one_statement(req) {
            return None;
        }
        let mut conn = Conn::from(self.db().pool().acquire().await.ok()?);
        let answer = self
            .settle_in_one_statement(&mut conn, req)
            .await
            .ok()
            .flatten()?;
        self.count_one_statement_settlements(1);
        Some(answer)
    }
}

impl Ledger {
    /// Whether `req` can have the common case at all: PostgreSQL, and a call's own hold
    /// (not a lease's share; not a fail-open call, which has no hold), so that a call
    /// without one does not pay a round trip for the statement to find nothing.
    fn may_settle_in_one_statement(&self, req: &SettleRequest) -> bool {
        self.db().dialect() == Dialect::Postgres
            && req.lease_id.is_none()
            && req.authorized
            && self.settles_in_one_statement()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use llm_meter_protocol::{Decision, Finalize, Outcome, Usage};
    use sqlx::Row;

    use super::super::lease_tests::{lease_auth, release, under};
    use super::super::tests::{
        assert_clean, auth, fixture, grant_req, price, seed_catalog, settle_req, Fixture, T0,
    };
    use crate::storage::testing::{fresh, selected_backends};
    use crate::storage::{Db, Dialect};

    /// Every case the one statement takes, and every case it must leave to the general path
    /// (two lots, debt, a due lot event, zero units, a price changed since the
    /// authorization, a late or direct settlement, a repeat, settlements under leases), run
    /// once with it and once
    /// without on PostgreSQL: the answers and every row the ledger keeps are the same, and
    /// the statement settled exactly the cases it should.
    #[tokio::test]
    async fn one_statement_matches_the_general_path() {
        if !selected_backends().contains(&Dialect::Postgres) {
            return;
        }
        let (fast_db, general_db) = (
            fresh(Dialect::Postgres).await,
            fresh(Dialect::Postgres).await,
        );
        let fast = fixture(&fast_db).await;
        let general = fixture(&general_db).await;
        general.ledger.settle_by_the_general_path();

        let fast_answers = scenario(&fast, &fast_db.db).await;
        let general_answers = scenario(&general, &general_db.db).await;
        assert_eq!(fast_answers, general_answers);
        let (fast_rows, general_rows) = (dump(&fast_db.db).await, dump(&general_db.db).await);
        for (fast_row, general_row) in fast_rows.iter().zip(&general_rows) {
            assert_eq!(fast_row, general_row);
        }
        assert_eq!(fast_rows.len(), general_rows.len());
        assert_clean(&fast.ledger).await;
        assert_clean(&general.ledger).await;
        let counted = |f: &Fixture| f.ledger.group_commits().one_statement_settlements;
        assert_eq!(
            counted(&fast),
            6,
            "c1, c2, c5, c7, c8, c9: {fast_answers:#?}"
        );
        assert_eq!(counted(&general), 0);
        fast_db.cleanup().await;
        general_db.cleanup().await;
    }

    async fn scenario(f: &Fixture, db: &Db) -> Vec<String> {
        let l = &f.ledger;
        seed_catalog(db).await;
        let mut out = Vec::new();
        let mut first_small = grant_req("u2", 100, "u2-small");
        first_small.priority = -1;
        let mut expiring = grant_req("u4", 1_000, "u4-expiring");
        expiring.expires_at = Some(T0 + 5_000);
        for g in [
            grant_req("u1", 100_000, "u1"),
            first_small,
            grant_req("u2", 10_000, "u2-big"),
            grant_req("u3", 50, "u3"),
            expiring,
            grant_req("u5", 10_000, "u5"),
        ] {
            assert!(l.grant(&g).await.unwrap().created);
        }
        let allow = |id: &str, user: &str, model: &str, input: u64, output: u64| {
            let mut req = auth(id, user, input, output);
            req.model = model.into();
            req
        };
        let calls = [
            allow("c1", "u1", "gpt", 100, 50),
            allow("c2", "u1", "gpt", 100, 50),
            allow("c3", "u2", "gpt", 100, 50),
            allow("c4", "u3", "gpt", 10, 10),
            allow("c5", "u5", "free", 100, 50),
            allow("c6", "u1", "gpt", 10, 10),
            allow("c7", "u1", "gpt", 10, 10),
            allow("c8", "u5", "free", 10, 10),
            allow("c9", "u2", "gpt", 10, 10),
            allow("c10", "u1", "gpt", 10, 10),
            allow("c11", "u4", "gpt", 10, 10),
        ];
        for call in &calls {
            let answer = l.authorize(call).await.unwrap();
            assert_eq!(answer.decision, Decision::Allow, "{}", call.request_id);
        }
        let settle = |id: &str, user: &str, model: &str, input: u64, output: u64| {
            let mut req = settle_req(id, user, input, output);
            req.model = model.into();
            req
        };
        let show = |r: Result<llm_meter_protocol::SettleResponse, super::LedgerError>| match r {
            Ok(r) => format!("{r:?}"),
            Err(e) => format!("error: {e}"),
        };
        // Alone (outside a transaction on PostgreSQL).
        out.push(show(l.settle(&settle("c1", "u1", "gpt", 90, 40)).await));
        let mut detailed = settle("c2", "u1", "gpt", 120, 70);
        detailed.outcome = Outcome::Partial;
        detailed.estimated = true;
        detailed.upstream_status = 499;
        detailed.ended_at_ms = Some((T0 - 10) as u64);
        detailed.usage = Usage {
            input_tokens: 120,
            cached_input_tokens: 200, // clamped to the input
            output_tokens: 70,
            reasoning_tokens: 30,
            ..Usage::default()
        };
        out.push(show(l.settle(&detailed).await));
        // Across two lots (the first holds 100), into debt, unpriced, zero units.
        out.push(show(l.settle(&settle("c3", "u2", "gpt", 100, 50)).await));
        out.push(show(l.settle(&settle("c4", "u3", "gpt", 100, 100)).await));
        out.push(show(l.settle(&settle("c5", "u5", "free", 80, 20)).await));
        out.push(show(l.settle(&settle("c6", "u1", "gpt", 0, 0)).await));
        // A repeat replays.
        out.push(show(l.settle(&settle("c1", "u1", "gpt", 90, 40)).await));
        // In one group transaction.
        let batch = [
            Finalize::Settle(settle("c7", "u1", "gpt", 5, 5)),
            Finalize::Settle(settle("c8", "u5", "free", 5, 5)),
            Finalize::Settle(settle("c9", "u2", "gpt", 5, 5)),
            Finalize::Settle(settle("c7", "u1", "gpt", 5, 5)),
        ];
        out.extend(l.finalize(&batch).await.into_iter().map(show));
        // Leases take the general path (ANALYSIS, section 3, says why).
        out.extend(lease_settlements(l).await);
        // A price in force since the authorization: the hold's price applies.
        f.advance(Duration::from_millis(1));
        price(db, "gpt", l.now(), "0.004", "0.012").await;
        out.push(show(l.settle(&settle("c10", "u1", "gpt", 5, 5)).await));
        // A lot expired since the authorization: the event is due.
        f.set_time(T0 + 6_000);
        out.push(show(l.settle(&settle("c11", "u4", "gpt", 5, 5)).await));
        // A hold that expired before its settlement, and a settlement with no hold.
        let late = allow("c12", "u1", "gpt", 5, 5);
        assert_eq!(l.authorize(&late).await.unwrap().decision, Decision::Allow);
        f.advance(Duration::from_secs(120));
        assert_eq!(l.expire_holds(l.now()).await.unwrap().expired, 1);
        out.push(show(l.settle(&settle("c12", "u1", "gpt", 5, 5)).await));
        let mut direct = settle("c13", "u1", "gpt", 5, 5);
        direct.authorized = false;
        out.push(show(l.settle(&direct).await));
        out
    }

    /// Settlements under leases: alone, in a group (with a repeat and another caller), past
    /// what is left of the lease, and under a released lease.
    async fn lease_settlements(l: &super::Ledger) -> Vec<String> {
        let mut out = Vec::new();
        for g in [grant_req("u6", 100_000, "u6"), grant_req("u7", 1_000, "u7")] {
            assert!(l.grant(&g).await.unwrap().created);
        }
        let mut leases = Vec::new();
        for (user, id, units) in [("u6", "la", 10_000), ("u7", "ld", 300)] {
            let answer = l.authorize(&lease_auth(id, user, 100, 100, units)).await;
            let answer = answer.unwrap();
            assert_eq!(answer.decision, Decision::Allow, "{id}");
            leases.push(answer.lease.expect("a lease").lease_id);
        }
        let (big, small) = (&leases[0], &leases[1]);
        let settled =
            |r: Result<llm_meter_protocol::SettleResponse, super::LedgerError>| format!("{r:?}");
        // The authorizing call, alone.
        out.push(settled(
            l.settle(&under(big, 200, settle_req("la", "u6", 100, 50)))
                .await,
        ));
        let batch = [
            Finalize::Settle(under(big, 300, settle_req("lb", "u6", 200, 100))),
            Finalize::Settle(under(big, 300, settle_req("lb", "u6", 200, 100))),
            Finalize::Settle(under(big, 30, settle_req("lc", "u7", 10, 10))),
            Finalize::Settle(under(big, 30, settle_req("le", "u6", 10, 10))),
        ];
        out.extend(l.finalize(&batch).await.into_iter().map(settled));
        // 400 units against a lease of 300 (200 of it the call's own hold).
        out.push(settled(
            l.settle(&under(small, 200, settle_req("ld", "u7", 200, 200)))
                .await,
        ));
        assert!(l.finalize(&[Finalize::Release(release(big))]).await[0].is_ok());
        out.push(settled(
            l.settle(&under(big, 30, settle_req("lf", "u6", 10, 10)))
                .await,
        ));
        assert!(l.finalize(&[Finalize::Release(release(small))]).await[0].is_ok());
        out
    }

    /// Every row the ledger keeps, as JSON without generated ids, in a stable order.
    async fn dump(db: &Db) -> Vec<String> {
        let tables = [
            ("ledger_accounts", "user_id, quota_type"),
            ("quota_lots", "source_id"),
            ("ledger_holds", "request_id"),
            ("usage_records", "request_id"),
            ("daily_costs", "day, provider, model, user_id"),
            ("ledger_journal", "request_id, kind, lot_id"),
        ];
        let mut rows = Vec::new();
        for (table, order) in tables {
            let sql =
                format!("SELECT (to_jsonb(t) - 'id')::text FROM {table} t ORDER BY {order}, 1");
            for row in sqlx::query(&sql).fetch_all(db.pool()).await.unwrap() {
                rows.push(format!("{table}: {}", row.get::<String, _>(0)));
            }
        }
        rows
    }
}
