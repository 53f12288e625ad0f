//! Reads ahead for a whole group (see `group.rs`): one query instead of one per settlement.
//!
//! A settlement starts by reading its hold and account (on SQLite with the account's first
//! lots in burn order): a round trip per call, which costs thread hand-offs in sqlx's SQLite
//! driver or a network round trip to PostgreSQL, and round trips, not work, bound the
//! ledger. A group reads these rows for all of its settlements at once, right after BEGIN,
//! and the settlements that used them write at the end of the group, all together, merged
//! into a few statements where that pays (their writes touch rows no other operation of the
//! group reads; see `Batch::mergeable`).
//!
//! A row read ahead stays true for the one operation that owns it only while nothing else
//! can change it before that operation runs:
//! - other transactions cannot: SQLite has one writer;
//! - other operations of the group could, so a settlement uses what was read ahead only when
//!   no other operation of the group names its account, its hold or its request id; the
//!   others read for themselves exactly as they would alone.
//!
//! When any settlement's hold is missing (a fail-open settlement charges an account found by
//! its caller, unknown here), the group reads nothing ahead.
//!
//! SQLite only. On PostgreSQL the rows read ahead would have to be locked at BEGIN, before
//! the group's other operations lock theirs: measured, groups then deadlocked against each
//! other (each waiting out `deadlock_timeout`) and throughput fell tenfold at concurrency 64.
//! MySQL groups hold one user's operations (see `group.rs`), which share its account anyway.
//!
//! A group that fails is applied again with savepoints and no read-ahead, so a failing
//! operation is always answered by the classic path. (A settlement under a lease looks for
//! an earlier usage record only on that path; read ahead, a repeat fails on the usage
//! record's unique key and is applied again that way.)

use std::collections::{HashMap, HashSet};

use crate::storage::Conn;
use sqlx::Row;

use super::accounts::{Account, BURNABLE_OF_L, BURN_ORDER_OF_L, BURN_READ_LIMIT};
use super::group::Op;
use super::lease::lease_id_for;
use super::reserve_ahead::reserve_ahead;
use super::settle::{account_of, hold_of, lot_of, Hold};
use super::{Ledger, LedgerError};
use crate::storage::{Batch, Dialect};

/// Most hold keys one read-ahead query names (larger groups read in several queries).
const KEYS_PER_QUERY: usize = 128;

/// Holds and accounts read ahead for a group's settlements, by hold key, and the writes
/// of the settlements that used them, applied together at the end of the group; and the
/// group's settlements made in one statement, counted once it commits.
#[derive(Default)]
pub(super) struct Prefetched {
    holds: HashMap<String, (Hold, Account)>,
    one_statement_settlements: u64,
    /// Authorizations already reserved by the group's merged update (see
    /// `reserve_ahead.rs`), by request id.
    reserved: HashSet<String>,
    deferred: Batch,
}

impl Prefetched {
    /// The hold `key` and its account, when read ahead for the operation now running.
    /// Each is handed out once.
    pub fn take(&mut self, key: &str) -> Option<(Option<Hold>, Option<Account>)> {
        let (hold, account) = self.holds.remove(key)?;
        Some((Some(hold), Some(account)))
    }

    /// Records that the authorization `request_id` was reserved ahead.
    pub fn mark_reserved(&mut self, request_id: &str) {
        self.reserved.insert(request_id.to_string());
    }

    /// Whether the authorization `request_id` was reserved ahead (answered once).
    pub fn take_reserved(&mut self, request_id: &str) -> bool {
        self.reserved.remove(request_id)
    }

    /// Where a settlement that used rows read ahead leaves its writes: they touch rows no
    /// other operation of the group reads, so they can wait for the end of the group and
    /// go to the database merged with the others' (see [`Batch::merged`]).
    pub fn deferred(&mut self) -> &mut Batch {
        &mut self.deferred
    }

    /// A settlement of the group was made in one statement (`settle_fast.rs`).
    pub fn settled_in_one_statement(&mut self) {
        self.one_statement_settlements += 1;
    }

    /// The group's settlements made in one statement (for its metric, once committed).
    pub fn one_statement_settlements(&self) -> u64 {
        self.one_statement_settlements
    }

    /// The deferred writes, to apply (merged where that saves statements) before the
    /// group commits.
    pub fn take_deferred(&mut self) -> Batch {
        std::mem::take(&mut self.deferred).mergeable()
    }

    /// Reads ahead for `ops` on `conn` (inside the group's transaction), and reserves
    /// ahead for its authorizations (see `reserve_ahead.rs`). Empty when it cannot help or
    /// cannot be trusted (see the module documentation).
    pub async fn read(
        ledger: &Ledger,
        conn: &mut Conn,
        ops: &[Op],
    ) -> Result<Prefetched, LedgerError> {
        let mut reads = Prefetched {
            holds: read_settlements(ledger, conn, ops).await?,
            ..Prefetched::default()
        };
        reserve_ahead(ledger, conn, ops, &mut reads).await?;
        Ok(reads)
    }
}

/// The holds and accounts of the group's settlements that share nothing with another
/// operation (SQLite; see the module documentation).
async fn read_settlements(
    ledger: &Ledger,
    conn: &mut Conn,
    ops: &[Op],
) -> Result<HashMap<String, (Hold, Account)>, LedgerError> {
    let dialect = ledger.db().dialect();
    let settlements = ops.iter().filter(|op| matches!(op, Op::Settle(_))).count();
    if dialect != Dialect::Sqlite || settlements < 2 {
        return Ok(HashMap::new());
    }
    let mut keys: Vec<String> = ops.iter().flat_map(hold_keys).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut found = HashMap::with_capacity(keys.len());
    for chunk in keys.chunks(KEYS_PER_QUERY) {
        read_holds(conn, chunk, &mut found).await?;
    }
    let all_found = ops.iter().all(|op| match op {
        Op::Settle(req) => found.contains_key(settle_hold_key(req)),
        _ => true,
    });
    if !all_found {
        return Ok(HashMap::new());
    }
    Ok(owned_by_one(ops, found))
}

/// The hold a settlement charges: its lease's, or its own.
fn settle_hold_key(req: &llm_meter_protocol::SettleRequest) -> &str {
    req.lease_id.as_deref().unwrap_or(&req.request_id)
}

/// Every hold an operation may read or write.
fn hold_keys(op: &Op) -> Vec<String> {
    match op {
        Op::Reserve { req, .. } => vec![req.request_id.clone(), lease_id_for(&req.request_id)],
        Op::Settle(req) => vec![settle_hold_key(req).to_string()],
        Op::Void(req) => {
            let lease = req
                .lease_id
                .clone()
                .unwrap_or_else(|| lease_id_for(&req.request_id));
            vec![req.request_id.clone(), lease]
        }
        Op::Release(req) => vec![req.lease_id.clone()],
    }
}

/// What an operation touches, for telling whether another one of the group shares it.
pub(super) fn touched(op: &Op, found: &HashMap<String, (Hold, Account)>) -> Vec<String> {
    let mut keys: Vec<String> = hold_keys(op)
        .into_iter()
        .map(|k| format!("h:{k}"))
        .collect();
    let request_id = match op {
        Op::Reserve { req, admission } => {
            keys.push(account_key(&admission.user_id, &admission.model.quota_type));
            &req.request_id
        }
        Op::Settle(req) => &req.request_id,
        Op::Void(req) => &req.request_id,
        Op::Release(req) => &req.lease_id,
    };
    keys.push(format!("r:{request_id}"));
    for hold in hold_keys(op) {
        if let Some((h, _)) = found.get(&hold) {
            keys.push(account_key(&h.user_id, &h.quota_type));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn account_key(user_id: &str, quota_type: &str) -> String {
    format!("a:{user_id}\u{1f}{quota_type}")
}

/// Keeps the rows read for settlements that share nothing with another operation.
fn owned_by_one(
    ops: &[Op],
    mut found: HashMap<String, (Hold, Account)>,
) -> HashMap<String, (Hold, Account)> {
    let touched: Vec<Vec<String>> = ops.iter().map(|op| touched(op, &found)).collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for key in touched.iter().flatten() {
        *uses.entry(key.as_str()).or_default() += 1;
    }
    let mut kept = HashMap::new();
    for (op, keys) in ops.iter().zip(&touched) {
        let Op::Settle(req) = op else { continue };
        if keys.iter().all(|k| uses[k.as_str()] == 1) {
            let key = settle_hold_key(req);
            if let Some(row) = found.remove(key) {
                kept.insert(key.to_string(), row);
            }
        }
    }
    kept
}

/// Reads the holds named by `keys` with their accounts and the accounts' first burnable
/// lots in burn order into `found` (SQLite). Holds without an account (finalized orphans)
/// are left out.
async fn read_holds(
    conn: &mut Conn,
    keys: &[String],
    found: &mut HashMap<String, (Hold, Account)>,
) -> Result<(), LedgerError> {
    // A few fixed list lengths, so the statement is prepared once per length and cached.
    let slots = keys.len().next_power_of_two().max(4);
    let list = vec!["?"; slots].join(", ");
    let sql = format!(
        "SELECT h.user_id, h.quota_type, h.provider, h.model, h.amount, h.price_version_id, \
         h.priced, h.status, h.created_at, h.kind, a.balance, a.held, a.debt, \
         a.next_event_at, l.id, l.status, l.remaining, l.effective_from, l.expires_at, \
         h.request_id \
         FROM ledger_holds h JOIN ledger_accounts a \
         ON a.user_id = h.user_id AND a.quota_type = h.quota_type \
         LEFT JOIN (SELECT l.user_id, l.quota_type, l.id, l.status, l.remaining, \
           l.effective_from, l.expires_at, \
           ROW_NUMBER() OVER (PARTITION BY l.user_id, l.quota_type \
             ORDER BY {BURN_ORDER_OF_L}) AS burn_rank \
           FROM quota_lots l WHERE {BURNABLE_OF_L} AND l.user_id IN \
           (SELECT user_id FROM ledger_holds WHERE request_id IN ({list}))) l \
         ON l.user_id = h.user_id AND l.quota_type = h.quota_type \
         AND l.burn_rank <= {BURN_READ_LIMIT} \
         WHERE h.request_id IN ({list}) ORDER BY h.request_id, l.burn_rank"
    );
    let mut query = sqlx::query(&sql);
    for _ in 0..2 {
        for slot in 0..slots {
            query = query.bind(keys.get(slot).map(String::as_str));
        }
    }
    let rows = query.fetch_all(&mut *conn).await?;
    for row in &rows {
        let key: String = row.try_get(19)?;
        let lot = lot_of(row)?;
        if let Some((_, account)) = found.get_mut(&key) {
            let lots = account.burnable_lots.get_or_insert_with(Vec::new);
            lots.extend(lot);
            continue;
        }
        let hold = hold_of(row)?;
        let account = account_of(&hold, row, Some(lot.into_iter().collect()))?;
        found.insert(key, (hold, account));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use llm_meter_protocol::{Finalize, SettleResponse, VoidRequest};

    use super::super::lease_tests::{lease_auth, release, under};
    use super::super::tests::{assert_clean, auth, fixture, grant_req, seed_catalog, settle_req};
    use super::*;
    use crate::storage::testing::{each_backend, fresh};

    fn void(id: &str) -> VoidRequest {
        VoidRequest {
            request_id: id.into(),
            reason: "upstream 503".into(),
            upstream_status: 503,
            lease_id: None,
            held: 0,
        }
    }

    /// Calls of six users: two of u1 (one account twice), a lone one of u2 (two lots),
    /// two calls under u3's lease and its release, a call of u4 settled and voided in the
    /// same batch, a lone one of u5, a lone call under u6's lease.
    async fn authorize_the_mix(ledger: &Ledger) -> Vec<Finalize> {
        for (user, source) in [("u1", "g1"), ("u2", "g2"), ("u3", "g3"), ("u4", "g4")] {
            ledger
                .grant(&grant_req(user, 10_000, source))
                .await
                .unwrap();
        }
        ledger
            .grant(&grant_req("u2", 50, "g2-small"))
            .await
            .unwrap();
        ledger.grant(&grant_req("u5", 1_000, "g5")).await.unwrap();
        ledger.grant(&grant_req("u6", 1_000, "g6")).await.unwrap();
        for (id, user) in [
            ("c1", "u1"),
            ("c2", "u1"),
            ("c3", "u2"),
            ("c4", "u4"),
            ("c5", "u5"),
        ] {
            ledger.authorize(&auth(id, user, 100, 100)).await.unwrap();
        }
        ledger
            .authorize(&lease_auth("l", "u3", 10, 10, 1_000))
            .await
            .unwrap();
        ledger
            .authorize(&lease_auth("m", "u6", 10, 10, 100))
            .await
            .unwrap();
        vec![
            Finalize::Settle(settle_req("c1", "u1", 100, 50)),
            Finalize::Settle(settle_req("c2", "u1", 100, 70)),
            Finalize::Settle(settle_req("c3", "u2", 100, 30)),
            Finalize::Settle(under("lease:l", 20, settle_req("l-1", "u3", 10, 5))),
            Finalize::Settle(under("lease:l", 20, settle_req("l-2", "u3", 10, 6))),
            Finalize::Release(release("lease:l")),
            Finalize::Settle(settle_req("c4", "u4", 100, 10)),
            Finalize::Void(void("c4")),
            Finalize::Settle(settle_req("c5", "u5", 100, 90)),
            Finalize::Settle(under("lease:m", 20, settle_req("m-1", "u6", 10, 7))),
        ]
    }

    fn op_of(item: &Finalize) -> Op {
        match item {
            Finalize::Settle(req) => Op::Settle(req.clone()),
            Finalize::Void(req) => Op::Void(req.clone()),
            Finalize::Release(req) => Op::Release(req.clone()),
        }
    }

    #[tokio::test]
    async fn only_settlements_that_share_nothing_are_read_ahead() {
        let t = fresh(Dialect::Sqlite).await;
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let ops: Vec<Op> = authorize_the_mix(&f.ledger)
            .await
            .iter()
            .map(op_of)
            .collect();
        let mut tx = t.db.begin_write().await.unwrap();
        let mut reads = Prefetched::read(&f.ledger, tx.conn(), &ops).await.unwrap();
        let mut kept: Vec<&str> = reads.holds.keys().map(String::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["c3", "c5", "lease:m"]);

        let (hold, account) = reads.take("c3").unwrap();
        let (hold, account) = (hold.unwrap(), account.unwrap());
        assert_eq!((hold.user_id.as_str(), hold.amount), ("u2", 200));
        assert_eq!((account.balance, account.held), (10_050, 200));
        let lots: Vec<i64> = account
            .burnable_lots
            .unwrap()
            .iter()
            .map(|l| l.remaining)
            .collect();
        assert_eq!(lots, [10_000, 50], "both lots, oldest first");
        assert!(reads.take("c3").is_none(), "handed out once");
        tx.rollback().await.unwrap();

        // A lone settlement has nothing to share: the group reads nothing ahead.
        let mut tx = t.db.begin_write().await.unwrap();
        let lone = [op_of(&Finalize::Settle(settle_req("c5", "u5", 1, 1)))];
        let reads = Prefetched::read(&f.ledger, tx.conn(), &lone).await.unwrap();
        assert!(reads.holds.is_empty());
        // Nor when a settlement has no hold (its account is found from its caller).
        let unheld = [
            op_of(&Finalize::Settle(settle_req("c5", "u5", 1, 1))),
            op_of(&Finalize::Settle(settle_req("no-hold", "u5", 1, 1))),
        ];
        let reads = Prefetched::read(&f.ledger, tx.conn(), &unheld)
            .await
            .unwrap();
        assert!(reads.holds.is_empty());
        tx.rollback().await.unwrap();
        t.cleanup().await;
    }

    /// The same batch on every backend (read ahead on SQLite only) settles exactly, and its
    /// repeat (a lost answer) changes nothing: a settlement under a lease read ahead meets
    /// its earlier usage record on the unique key and is answered as a repeat.
    #[tokio::test]
    async fn a_batch_of_shared_and_lone_accounts_settles_exactly_and_repeats_safely() {
        for t in each_backend().await {
            seed_catalog(&t.db).await;
            let f = fixture(&t).await;
            let l = &f.ledger;
            let b = t.backend;
            // Without the void: a failing item sends the whole group down the classic path.
            let items: Vec<Finalize> = authorize_the_mix(l)
                .await
                .into_iter()
                .filter(|item| !matches!(item, Finalize::Void(_)))
                .collect();
            let statuses = |results: Vec<Result<SettleResponse, LedgerError>>| -> Vec<String> {
                results
                    .iter()
                    .map(|r| match r {
                        Ok(r) => format!("{:?}", r.status),
                        Err(e) => format!("error: {e}"),
                    })
                    .collect()
            };
            let mut expected = vec!["Settled"; 9];
            expected[5] = "Released";
            assert_eq!(statuses(l.finalize(&items).await), expected, "{b:?}");
            let figures = |user: &'static str| async move {
                let balance = l.balance(user, "text_token").await.unwrap().unwrap();
                (balance.remaining, balance.held, balance.available)
            };
            let after = [
                (10_000 - 150 - 170, 0, 10_000 - 150 - 170),
                (10_050 - 130, 0, 10_050 - 130),
                (10_000 - 15 - 16, 0, 10_000 - 15 - 16),
                (10_000 - 110, 0, 10_000 - 110),
                (1_000 - 190, 0, 1_000 - 190),
                // The lease stays open: its 100 units less this call's 17 still held.
                (1_000 - 17, 100 - 17, 1_000 - 100),
            ];
            for (user, expected) in ["u1", "u2", "u3", "u4", "u5", "u6"].into_iter().zip(after) {
                assert_eq!(figures(user).await, expected, "{b:?} {user}");
            }
            assert_clean(l).await;

            let mut repeated = vec!["AlreadySettled"; 9];
            repeated[5] = "AlreadyReleased";
            assert_eq!(statuses(l.finalize(&items).await), repeated, "{b:?}");
            for (user, expected) in ["u1", "u2", "u3", "u4", "u5", "u6"].into_iter().zip(after) {
                assert_eq!(
                    figures(user).await,
                    expected,
                    "{b:?} {user} after the repeat"
                );
            }
            assert_clean(l).await;
            t.cleanup().await;
        }
    }
}
