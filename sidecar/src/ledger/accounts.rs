//! Building blocks shared by the ledger operations, all run inside one write transaction:
//! locking an account row, expiring/activating due lots, burning lots, repaying debt and
//! appending journal rows.
//!
//! Lock order in every transaction: the request's own row (hold, new lot or reset run)
//! first, then the account row, then that account's lots. The account row is the mutex of
//! one user's quota type, so two transactions never wait on each other in opposite order.

use crate::storage::Conn;
use sqlx::Row;

use super::LedgerError;
use crate::storage::{Batch, Db, Dialect, Value};

/// An account row, locked for the rest of the transaction; changed in memory and written
/// back once by [`save_account`].
#[derive(Debug, Clone)]
pub(super) struct Account {
    pub user_id: String,
    pub quota_type: String,
    pub balance: i64,
    pub held: i64,
    pub debt: i64,
    pub next_event_at: Option<i64>,
    /// The account's active lots with units left, in burn order, when they were read with
    /// the account in the same transaction (SQLite's settle reads all three in one query);
    /// `None`: [`burn`] reads them. Cleared by anything that changes lots first.
    pub burnable_lots: Option<Vec<LotRow>>,
}

impl Account {
    pub fn available(&self) -> i64 {
        (self.balance - self.held).max(0)
    }

    pub fn is_due(&self, now: i64) -> bool {
        self.next_event_at.is_some_and(|t| t <= now)
    }
}

/// One journal row. Deltas are the change this entry makes to the lot's `remaining`, the
/// account's `balance`, `held` and `debt`.
#[derive(Debug, Clone, Default)]
pub(super) struct Entry {
    pub kind: &'static str,
    pub lot_id: Option<i64>,
    pub request_id: Option<String>,
    pub lot_delta: i64,
    pub balance_delta: i64,
    pub held_delta: i64,
    pub debt_delta: i64,
    pub memo: Option<String>,
}

/// Journal rows of one transaction, written together by [`write_journal`].
#[derive(Debug, Default)]
pub(super) struct Journal {
    rows: Vec<(String, String, Entry)>,
}

impl Journal {
    pub fn push(&mut self, account: &Account, entry: Entry) {
        self.rows
            .push((account.user_id.clone(), account.quota_type.clone(), entry));
    }

    pub fn push_raw(&mut self, user_id: &str, quota_type: &str, entry: Entry) {
        self.rows
            .push((user_id.to_string(), quota_type.to_string(), entry));
    }
}

/// Locks the account row (creating an empty one when missing and `create`).
pub(super) async fn lock_account(
    db: &Db,
    conn: &mut Conn,
    user_id: &str,
    quota_type: &str,
    create: bool,
    now: i64,
) -> Result<Option<Account>, LedgerError> {
    if let Some(account) = select_account(db, conn, user_id, quota_type).await? {
        return Ok(Some(account));
    }
    if !create {
        return Ok(None);
    }
    let insert = db.dialect().insert_ignore(
        "INSERT INTO ledger_accounts (user_id, quota_type, balance, held, debt, \
         next_event_at, created_at, updated_at) VALUES (?, ?, 0, 0, 0, NULL, ?, ?)",
        "user_id",
    );
    sqlx::query(&db.sql(&insert))
        .bind(user_id)
        .bind(quota_type)
        .bind(now)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    select_account(db, conn, user_id, quota_type).await
}

async fn select_account(
    db: &Db,
    conn: &mut Conn,
    user_id: &str,
    quota_type: &str,
) -> Result<Option<Account>, LedgerError> {
    let sql = format!(
        "SELECT balance, held, debt, next_event_at FROM ledger_accounts \
         WHERE user_id = ? AND quota_type = ?{}",
        db.dialect().for_update()
    );
    let row = sqlx::query(&db.sql(&sql))
        .bind(user_id)
        .bind(quota_type)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(Account {
        user_id: user_id.to_string(),
        quota_type: quota_type.to_string(),
        balance: row.try_get(0)?,
        held: row.try_get(1)?,
        debt: row.try_get(2)?,
        next_event_at: row.try_get(3)?,
        burnable_lots: None,
    }))
}

pub(super) async fn save_account(
    db: &Db,
    conn: &mut Conn,
    account: &Account,
    now: i64,
) -> Result<(), LedgerError> {
    let sql = db.sql(
        "UPDATE ledger_accounts SET balance = ?, held = ?, debt = ?, next_event_at = ?, \
         updated_at = ? WHERE user_id = ? AND quota_type = ?",
    );
    sqlx::query(&sql)
        .bind(account.balance)
        .bind(account.held)
        .bind(account.debt)
        .bind(account.next_event_at)
        .bind(now)
        .bind(&account.user_id)
        .bind(&account.quota_type)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Queues the account's new state into `batch` (see [`save_account`]).
pub(super) fn save_account_in(batch: &mut Batch, account: &Account, now: i64) {
    batch.push(
        "UPDATE ledger_accounts SET balance = ?, held = ?, debt = ?, next_event_at = ?, \
         updated_at = ? WHERE user_id = ? AND quota_type = ?",
        vec![
            account.balance.into(),
            account.held.into(),
            account.debt.into(),
            account.next_event_at.into(),
            now.into(),
            account.user_id.as_str().into(),
            account.quota_type.as_str().into(),
        ],
    );
}

/// Burn order: priority (lower first), soonest expiry (never-expiring last), oldest.
const BURN_ORDER: &str =
    "priority, CASE WHEN expires_at IS NULL THEN 1 ELSE 0 END, expires_at, created_at, id";

/// [`BURN_ORDER`] for lots joined as `l`.
pub(super) const BURN_ORDER_OF_L: &str =
    "l.priority, CASE WHEN l.expires_at IS NULL THEN 1 ELSE 0 END, l.expires_at, l.created_at, l.id";

/// The condition of a lot [`burn`] may take units from.
pub(super) const BURNABLE: &str = "status = 'active' AND remaining > 0";

/// [`BURNABLE`] for lots joined as `l`.
pub(super) const BURNABLE_OF_L: &str = "l.status = 'active' AND l.remaining > 0";

/// PostgreSQL: the lots of the account of the one-row CTE `h` (a hold, read first), as
/// lots joined as `l`. Compared with `h`'s values (read once, before the scan) rather than
/// joined to it, so the planner walks `ix_lots_burn` in burn order and stops at the LIMIT
/// instead of sorting every active lot of the account.
pub(super) const LOTS_OF_H: &str = "l.user_id = (SELECT user_id FROM h) \
     AND l.quota_type = (SELECT quota_type FROM h)";

/// Lots a burn reads at first, in burn order. A call nearly always fits in the first lot
/// or two, so a user with a thousand live lots settles as fast as one with a single lot;
/// a burn the first lots cannot cover reads them all.
pub(super) const BURN_READ_LIMIT: usize = 16;

#[derive(Debug, Clone)]
pub(super) struct LotRow {
    pub id: i64,
    pub status: String,
    pub remaining: i64,
    pub effective_from: i64,
    pub expires_at: Option<i64>,
}

/// The account's open lots in burn order: burnable ones only (the first `limit` of them,
/// when given) or every pending and active one.
async fn open_lots(
    db: &Db,
    conn: &mut Conn,
    account: &Account,
    only_active_with_remaining: bool,
    limit: Option<usize>,
) -> Result<Vec<LotRow>, LedgerError> {
    let filter = if only_active_with_remaining {
        BURNABLE
    } else {
        "status IN ('pending', 'active')"
    };
    let sql = open_lots_sql(db.dialect(), filter, limit);
    let rows = sqlx::query(&db.sql(&sql))
        .bind(&account.user_id)
        .bind(&account.quota_type)
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(LotRow {
                id: r.try_get(0)?,
                status: r.try_get(1)?,
                remaining: r.try_get(2)?,
                effective_from: r.try_get(3)?,
                expires_at: r.try_get(4)?,
            })
        })
        .collect()
}

/// The read of [`open_lots`]: an account's lots passing `filter`, in burn order, locked.
pub(super) fn open_lots_sql(dialect: Dialect, filter: &str, limit: Option<usize>) -> String {
    // Row locks are taken on the lots read, and a burn writes no other lot.
    let limit = limit.map_or(String::new(), |n| format!(" LIMIT {n}"));
    format!(
        "SELECT id, status, remaining, effective_from, expires_at FROM quota_lots \
         WHERE user_id = ? AND quota_type = ? AND {filter} ORDER BY {BURN_ORDER}{limit}{}",
        dialect.for_update()
    )
}

/// Expires lots past their expiry and activates pending lots now effective (paying debt
/// from them first), then recomputes `next_event_at`. Returns (units expired, lots expired).
pub(super) async fn refresh_lots(
    db: &Db,
    conn: &mut Conn,
    account: &mut Account,
    journal: &mut Journal,
    now: i64,
) -> Result<(i64, u64), LedgerError> {
    account.burnable_lots = None;
    let lots = open_lots(db, conn, account, false, None).await?;
    let mut expired_units = 0;
    let mut expired_lots = 0;
    let mut next_event: Option<i64> = None;
    for lot in lots {
        if lot.expires_at.is_some_and(|e| e <= now) {
            expired_units += lot.remaining;
            expired_lots += 1;
            expire_lot(
                db,
                conn,
                account,
                journal,
                lot.id,
                &lot.status,
                lot.remaining,
                "expire",
                now,
            )
            .await?;
            continue;
        }
        let mut remaining = lot.remaining;
        if lot.status == "pending" {
            if lot.effective_from > now {
                next_event = min_opt(next_event, Some(lot.effective_from));
                continue;
            }
            activate_lot(db, conn, account, journal, lot.id, remaining, now).await?;
            remaining -= repay_debt(db, conn, account, journal, lot.id, remaining, now).await?;
        }
        if remaining > 0 {
            next_event = min_opt(next_event, lot.expires_at);
        }
    }
    account.next_event_at = next_event;
    Ok((expired_units, expired_lots))
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Earliest of the account's next event and `at`.
pub(super) fn schedule_event(account: &mut Account, at: Option<i64>) {
    account.next_event_at = min_opt(account.next_event_at, at);
}

/// Marks a lot expired; an active lot's remainder leaves the balance.
#[allow(clippy::too_many_arguments)]
pub(super) async fn expire_lot(
    db: &Db,
    conn: &mut Conn,
    account: &mut Account,
    journal: &mut Journal,
    lot_id: i64,
    status: &str,
    remaining: i64,
    kind: &'static str,
    now: i64,
) -> Result<(), LedgerError> {
    let sql = db.sql(
        "UPDATE quota_lots SET status = 'expired', expired = expired + remaining, \
         remaining = 0, updated_at = ? WHERE id = ?",
    );
    sqlx::query(&sql)
        .bind(now)
        .bind(lot_id)
        .execute(&mut *conn)
        .await?;
    let balance_delta = if status == "active" { -remaining } else { 0 };
    account.balance += balance_delta;
    journal.push(
        account,
        Entry {
            kind,
            lot_id: Some(lot_id),
            lot_delta: -remaining,
            balance_delta,
            ..Entry::default()
        },
    );
    Ok(())
}

async fn activate_lot(
    db: &Db,
    conn: &mut Conn,
    account: &mut Account,
    journal: &mut Journal,
    lot_id: i64,
    remaining: i64,
    now: i64,
) -> Result<(), LedgerError> {
    let sql = db.sql("UPDATE quota_lots SET status = 'active', updated_at = ? WHERE id = ?");
    sqlx::query(&sql)
        .bind(now)
        .bind(lot_id)
        .execute(&mut *conn)
        .await?;
    account.balance += remaining;
    journal.push(
        account,
        Entry {
            kind: "activate",
            lot_id: Some(lot_id),
            balance_delta: remaining,
            ..Entry::default()
        },
    );
    Ok(())
}

/// Pays the account's debt from a newly active lot; returns the units repaid.
pub(super) async fn repay_debt(
    db: &Db,
    conn: &mut Conn,
    account: &mut Account,
    journal: &mut Journal,
    lot_id: i64,
    lot_remaining: i64,
    now: i64,
) -> Result<i64, LedgerError> {
    let repay = account.debt.min(lot_remaining);
    if repay <= 0 {
        return Ok(0);
    }
    take_from_lot(db, conn, lot_id, repay, now).await?;
    account.balance -= repay;
    account.debt -= repay;
    journal.push(
        account,
        Entry {
            kind: "repay",
            lot_id: Some(lot_id),
            lot_delta: -repay,
            balance_delta: -repay,
            debt_delta: -repay,
            ..Entry::default()
        },
    );
    Ok(repay)
}

async fn take_from_lot(
    db: &Db,
    conn: &mut Conn,
    lot_id: i64,
    units: i64,
    now: i64,
) -> Result<(), LedgerError> {
    let sql = db.sql(
        "UPDATE quota_lots SET remaining = remaining - ?, used = used + ?, updated_at = ? \
         WHERE id = ? AND remaining >= ?",
    );
    let done = sqlx::query(&sql)
        .bind(units)
        .bind(units)
        .bind(now)
        .bind(lot_id)
        .bind(units)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() != 1 {
        return Err(LedgerError::Inconsistent(format!(
            "lot {lot_id} does not hold {units} units"
        )));
    }
    Ok(())
}

/// Burns `units` from the account's active lots in burn order (one `kind` row per lot).
/// The lot updates are queued into `batch`; the lots were read under the account lock, and
/// the `remaining >= 0` check constraint guards the arithmetic.
#[allow(clippy::too_many_arguments)]
pub(super) async fn burn(
    db: &Db,
    conn: &mut Conn,
    batch: &mut Batch,
    account: &mut Account,
    journal: &mut Journal,
    units: i64,
    (kind, request_id): (&'static str, &str),
    now: i64,
) -> Result<(), LedgerError> {
    if units <= 0 {
        return Ok(());
    }
    let covers = |lots: &[LotRow]| lots.iter().map(|l| l.remaining).sum::<i64>() >= units;
    let lots = match account.burnable_lots.take() {
        Some(lots) if covers(&lots) => lots,
        // Read with the hold but not enough: the first lots were all there was room for.
        Some(_) => open_lots(db, conn, account, true, None).await?,
        None => {
            let first = open_lots(db, conn, account, true, Some(BURN_READ_LIMIT)).await?;
            if covers(&first) {
                first
            } else {
                open_lots(db, conn, account, true, None).await?
            }
        }
    };
    let mut left = units;
    for lot in lots {
        let take = left.min(lot.remaining);
        batch.push(
            "UPDATE quota_lots SET remaining = remaining - ?, used = used + ?, updated_at = ? \
             WHERE id = ?",
            vec![take.into(), take.into(), now.into(), lot.id.into()],
        );
        account.balance -= take;
        journal.push(
            account,
            Entry {
                kind,
                lot_id: Some(lot.id),
                request_id: Some(request_id.to_string()),
                lot_delta: -take,
                balance_delta: -take,
                ..Entry::default()
            },
        );
        left -= take;
        if left == 0 {
            return Ok(());
        }
    }
    Err(LedgerError::Inconsistent(format!(
        "account {}/{} balance {} is not covered by its lots ({left} units missing)",
        account.user_id, account.quota_type, account.balance
    )))
}

/// Appends the transaction's journal rows in one statement.
pub(super) async fn write_journal(
    db: &Db,
    conn: &mut Conn,
    journal: Journal,
    now: i64,
) -> Result<(), LedgerError> {
    let mut batch = Batch::default();
    journal.into_batch(&mut batch, now);
    batch.execute(db.dialect(), conn).await?;
    Ok(())
}

impl Journal {
    /// Queues the rows as one multi-row `INSERT` into `batch`.
    pub fn into_batch(self, batch: &mut Batch, now: i64) {
        if self.rows.is_empty() {
            return;
        }
        let mut sql = String::from(
            "INSERT INTO ledger_journal (user_id, quota_type, kind, lot_id, request_id, lot_delta, \
             balance_delta, held_delta, debt_delta, memo, created_at) VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(self.rows.len() * 11);
        for (i, (user_id, quota_type, e)) in self.rows.into_iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
            values.extend([
                user_id.into(),
                quota_type.into(),
                e.kind.into(),
                e.lot_id.into(),
                e.request_id.into(),
                e.lot_delta.into(),
                e.balance_delta.into(),
                e.held_delta.into(),
                e.debt_delta.into(),
                e.memo.into(),
                now.into(),
            ]);
        }
        batch.push(sql, values);
    }
}

/// Dialect-aware `SUM` (re-exported for sibling modules).
pub(super) fn sum(dialect: Dialect, expr: &str) -> String {
    dialect.sum_i64(expr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prefixes every lot column of `sql` with `l.` (the columns these clauses name).
    fn of_l(sql: &str) -> String {
        let mut out = sql.to_string();
        for column in [
            "priority",
            "expires_at",
            "created_at",
            "status",
            "remaining",
        ] {
            out = out.replace(column, &format!("l.{column}"));
        }
        out.replace(", id", ", l.id")
    }

    /// `ix_lots_burn` is the burn order with its expression in parentheses.
    #[test]
    fn the_burn_index_follows_the_burn_order() {
        let indexed = crate::storage::schema::BURN_INDEX_COLUMNS
            .replace("(CASE", "CASE")
            .replace("END)", "END");
        assert_eq!(
            indexed,
            format!("user_id, quota_type, status, {BURN_ORDER}")
        );
    }

    /// `sql` with each `?` replaced by the next of `values`, quoted (for EXPLAIN).
    fn with_literals(sql: &str, values: &[&str]) -> String {
        let mut values = values.iter();
        sql.chars()
            .map(|c| match c {
                '?' => format!("'{}'", values.next().expect("a value per placeholder")),
                c => c.to_string(),
            })
            .collect()
    }

    async fn plan_of(db: &Db, sql: &str) -> String {
        let explain = match db.dialect() {
            Dialect::Sqlite => format!("EXPLAIN QUERY PLAN {sql}"),
            _ => format!("EXPLAIN {sql}"),
        };
        let column = usize::from(db.dialect() == Dialect::Sqlite) * 3;
        let rows = sqlx::query(&explain).fetch_all(db.pool()).await.unwrap();
        let lines: Vec<String> = rows.iter().map(|r| r.get(column)).collect();
        lines.join("\n")
    }

    /// A burn reads an account's first lots by walking `ix_lots_burn` in burn order, so an
    /// account with hundreds of live lots does not have them all read and sorted: in
    /// `open_lots` and in a settlement's combined read of hold and lots, on SQLite and
    /// PostgreSQL. MySQL keeps `ix_lots_user` (no expression indexes).
    #[tokio::test]
    async fn burns_walk_the_burn_index_instead_of_sorting_every_lot() {
        use crate::storage::testing::{fresh, selected_backends};
        for backend in selected_backends() {
            if backend == Dialect::MySql {
                continue;
            }
            let t = fresh(backend).await;
            let db = &t.db;
            // 300 live lots of distinct priorities and expiries for one account, one lot
            // for each of 2,000 others.
            let owners = (0..300)
                .map(|i| {
                    (
                        "many".to_string(),
                        i % 7,
                        (i % 3 != 0).then_some(10_000 + i),
                    )
                })
                .chain((0..2000).map(|i| (format!("u{i}"), 0, None)));
            let rows: Vec<_> = owners.collect();
            for (n, chunk) in rows.chunks(200).enumerate() {
                let tuples: Vec<String> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, (user, priority, expires))| {
                        let expires = expires.map_or("NULL".into(), |e: i64| e.to_string());
                        format!(
                            "('{user}', 'text_token', 'grant', 's{n}-{i}', 100, 100, 0, 0, \
                             {priority}, 0, {expires}, 'active', 1, 1)"
                        )
                    })
                    .collect();
                let sql = format!(
                    "INSERT INTO quota_lots (user_id, quota_type, source_type, source_id, amount, \
                     remaining, used, expired, priority, effective_from, expires_at, status, \
                     created_at, updated_at) VALUES {}",
                    tuples.join(", ")
                );
                sqlx::query(&sql).execute(db.pool()).await.unwrap();
            }
            sqlx::query("ANALYZE").execute(db.pool()).await.unwrap();

            let read = open_lots_sql(backend, BURNABLE, Some(BURN_READ_LIMIT));
            let plan = plan_of(db, &with_literals(&read, &["many", "text_token"])).await;
            assert!(plan.contains("ix_lots_burn"), "{backend:?}:\n{plan}");
            assert!(
                !plan.contains("TEMP B-TREE") && !plan.contains("Sort"),
                "{backend:?} sorts the lots:\n{plan}"
            );
            let read = super::super::settle::hold_and_lots_sql(backend);
            let plan = plan_of(db, &with_literals(&read, &["r-1"])).await;
            assert!(plan.contains("ix_lots_burn"), "{backend:?}:\n{plan}");
            match backend {
                // One sort: of the (at most 16) rows read, not of every lot.
                Dialect::Postgres => assert_eq!(plan.matches("Sort Key").count(), 1, "{plan}"),
                _ => assert!(!plan.contains("TEMP B-TREE"), "{plan}"),
            }
            t.cleanup().await;
        }
    }

    /// The joined read of a settlement must burn in the same order, from the same lots, as
    /// `burn`'s own read.
    #[test]
    fn joined_lot_clauses_match_the_plain_ones() {
        assert_eq!(of_l(BURN_ORDER), BURN_ORDER_OF_L);
        assert_eq!(of_l(BURNABLE), BURNABLE_OF_L);
    }
}
