//! Group commit: authorize, settle, void and release calls that arrive together are
//! applied by a few writer tasks per process, many to ONE transaction, and each caller is
//! answered on its own once that transaction has committed.
//!
//! Why: every commit costs a WAL flush (PostgreSQL, MySQL) or the single SQLite write lock
//! plus its BEGIN/COMMIT round trips; sharing one commit among the calls waiting at that
//! moment multiplies throughput without changing what each call does. Nothing waits for a
//! window to fill: a writer takes whatever is queued (up to [`MAX_GROUP`]) as soon as it
//! is free, so a lone call costs what it did before.
//!
//! Isolation of failures: a group first runs without savepoints (no extra round trips).
//! When one operation fails, the whole transaction is rolled back and the group runs
//! again with a savepoint around each operation, so the failing one is answered with its
//! own error and the others still commit. A retried request inside the same group sees
//! the first one's uncommitted rows on the group's connection and gets the same answer.
//! Submissions are sorted by user so that groups of different processes lock accounts in
//! the same order (PostgreSQL/MySQL row locks), which keeps deadlocks between them rare;
//! a deadlock that still happens fails an attempt and is retried like any transient error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use crate::storage::Conn;
use llm_meter_protocol::{
    AuthorizeRequest, AuthorizeResponse, ReleaseRequest, SettleResponse, VoidRequest,
};
use llm_meter_protocol::{Caller, SettleRequest};
use sqlx::Executor;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::authorize::Admission;
use super::prefetch::Prefetched;
use super::{Inner, Ledger, LedgerError};
use crate::storage::{is_unique_violation, CommitError, Dialect};

/// Most operations one transaction applies (also keeps PostgreSQL under its 64 cached
/// subtransactions when a group has to run with savepoints).
pub(super) const MAX_GROUP: usize = 48;

/// A ledger write applied inside a group transaction.
pub(super) enum Op {
    Reserve {
        req: AuthorizeRequest,
        admission: Admission,
    },
    Settle(SettleRequest),
    Void(VoidRequest),
    Release(ReleaseRequest),
}

pub(super) enum Done {
    Authorized(AuthorizeResponse),
    Settled(SettleResponse),
    /// None when there is no hold to void.
    Voided(Option<SettleResponse>),
    /// None when there is no such lease.
    Released(Option<SettleResponse>),
}

type Reply = oneshot::Sender<Result<Done, LedgerError>>;

struct Pending {
    op: Op,
    reply: Reply,
}

/// The queues in front of this process's writer tasks.
pub(super) struct GroupCommit {
    queues: Queues,
    writers: usize,
}

enum Queues {
    /// One queue that every writer takes from; a writer groups whatever is queued.
    Shared(mpsc::UnboundedSender<Vec<Pending>>),
    /// A queue per writer (PostgreSQL, MySQL), fed by [`Routes`]; see [`Grouping`] for
    /// what a group holds.
    ByUser {
        queues: Vec<mpsc::UnboundedSender<Vec<Pending>>>,
        routes: Arc<Routes>,
    },
}

/// Which writer a submission goes to (PostgreSQL, MySQL). A user with a submission queued
/// or in flight at a writer sends the next one to the same writer, where it waits for the
/// running transaction and then shares the next with the user's other waiting calls: a hot
/// user's calls take its account's lock and the commit flush once per group instead of once per
/// call. Any other submission goes to the writer with the least outstanding, so calls of
/// different users do not queue behind each other while a writer is idle. Submissions of no
/// single user (a batch of several users', a void, a caller known by API key) go to the
/// least busy writer (on MySQL, alone).
struct Routes {
    /// Submissions sent to each writer and not yet answered.
    outstanding: Vec<AtomicUsize>,
    /// Users with submissions outstanding: their writer and how many.
    users: std::sync::Mutex<HashMap<String, (usize, usize)>>,
    /// Where the search for the least busy writer starts (spreads ties).
    turn: AtomicUsize,
}

impl Routes {
    fn new(writers: usize) -> Routes {
        Routes {
            outstanding: (0..writers).map(|_| AtomicUsize::new(0)).collect(),
            users: std::sync::Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
        }
    }

    /// The writer for a submission of `user` (None: of no single user), among those
    /// `alive` says still run. A writer that stopped (it would only by a bug: its task
    /// panicked) takes no more submissions, and its users move on.
    fn route(&self, user: Option<&str>, alive: impl Fn(usize) -> bool) -> usize {
        let writer = match user {
            Some(user) => {
                let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
                match users.get_mut(user) {
                    Some((writer, count)) if alive(*writer) => {
                        *count += 1;
                        *writer
                    }
                    _ => {
                        let writer = self.least_busy(&alive);
                        users.insert(user.to_string(), (writer, 1));
                        writer
                    }
                }
            }
            None => self.least_busy(&alive),
        };
        self.outstanding[writer].fetch_add(1, Ordering::Relaxed);
        writer
    }

    /// A submission of `user` sent to `writer` was answered.
    fn done(&self, writer: usize, user: Option<&str>) {
        self.outstanding[writer].fetch_sub(1, Ordering::Relaxed);
        let Some(user) = user else { return };
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        // Only the user's current writer's answers count (it may have moved, see `route`).
        if let Some((current, count)) = users.get_mut(user) {
            if *current == writer {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    users.remove(user);
                }
            }
        }
    }

    fn least_busy(&self, alive: &impl Fn(usize) -> bool) -> usize {
        let n = self.outstanding.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|&w| alive(w))
            .min_by_key(|&w| self.outstanding[w].load(Ordering::Relaxed))
            .unwrap_or(start % n.max(1))
    }
}

impl Op {
    /// Groups apply operations in this order: one user's account row is the lock every
    /// one of its writes takes, so a common order avoids lock cycles between groups.
    fn lock_key(&self) -> &str {
        match self {
            Op::Reserve { admission, .. } => &admission.user_id,
            Op::Settle(SettleRequest {
                caller: Caller::UserId(user),
                ..
            }) => user,
            Op::Settle(_) | Op::Void(_) | Op::Release(_) => "",
        }
    }

    async fn apply(
        &self,
        ledger: &Ledger,
        conn: &mut Conn,
        reads: &mut Prefetched,
    ) -> Result<Done, LedgerError> {
        match self {
            Op::Reserve { req, admission } => ledger
                .reserve_on(conn, req, admission, reads)
                .await
                .map(Done::Authorized),
            Op::Settle(req) => ledger.settle_on(conn, req, reads).await.map(Done::Settled),
            Op::Void(req) => ledger.void_on(conn, req).await.map(Done::Voided),
            Op::Release(req) => ledger.release_lease_on(conn, req).await.map(Done::Released),
        }
    }

    /// The answer to an operation whose idempotency key already exists (a retry), read on
    /// `conn` after its own writes were undone. None: the error stands.
    async fn replay(
        &self,
        ledger: &Ledger,
        conn: &mut Conn,
        error: &LedgerError,
    ) -> Option<Result<Done, LedgerError>> {
        let unique = matches!(error, LedgerError::Db(e) if is_unique_violation(e));
        match self {
            Op::Reserve { req, admission } if unique => Some(
                ledger
                    .replay_authorization_on(conn, req, admission)
                    .await
                    .map(Done::Authorized),
            ),
            _ => None,
        }
    }
}

impl GroupCommit {
    /// Starts the writer tasks: one on SQLite (one writer at a time anyway); on PostgreSQL a
    /// quarter of the pool, each with its own queue (see [`Grouping::AnyUsers`]), so groups
    /// of different users commit in parallel (half the pool measured slower: more groups of
    /// fewer operations, more commits and lock waits); on MySQL the whole pool, each writer
    /// with its own queue and its own users (see [`Queues::ByUser`]): a deadlock there rolls
    /// back the whole transaction, and groups of several users, from writers of several
    /// processes, deadlocked against each other and against grants often enough to exhaust
    /// their retries; a group of one user's operations takes the locks one of them would, in
    /// the same order. A hot user's calls
    /// then share one transaction (one lock wait and one commit flush) instead of queueing
    /// one by one on its account row. `LLM_METER_LEDGER_WRITERS` overrides the
    /// PostgreSQL/MySQL figure (for measurements).
    pub(super) fn start(inner: Weak<Inner>, dialect: Dialect, max_connections: u32) -> Self {
        let default = match dialect {
            Dialect::Sqlite => 1,
            Dialect::MySql => max_connections,
            Dialect::Postgres => max_connections / 4,
        };
        let writers = match dialect {
            Dialect::Sqlite => 1,
            Dialect::MySql | Dialect::Postgres => std::env::var("LLM_METER_LEDGER_WRITERS")
                .ok()
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(default)
                .clamp(1, max_connections.max(1)),
        };
        if let Some(grouping) = Grouping::of(dialect) {
            let routes = Arc::new(Routes::new(writers as usize));
            let mut queues = Vec::new();
            for index in 0..writers as usize {
                let (queue, receiver) = mpsc::unbounded_channel();
                let writer = RoutedWriter {
                    index,
                    routes: routes.clone(),
                    grouping,
                };
                tokio::spawn(writer.run(receiver, inner.clone()));
                queues.push(queue);
            }
            return GroupCommit {
                queues: Queues::ByUser { queues, routes },
                writers: writers as usize,
            };
        }
        let (queue, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers {
            tokio::spawn(writer(receiver.clone(), inner.clone()));
        }
        GroupCommit {
            queues: Queues::Shared(queue),
            writers: writers as usize,
        }
    }

    /// Queues `ops` (applied in one group) and waits for their answers, in order.
    pub(super) async fn submit(&self, ops: Vec<Op>) -> Vec<Result<Done, LedgerError>> {
        let mut answers = Vec::with_capacity(ops.len());
        let mut pending = Vec::with_capacity(ops.len());
        for op in ops {
            let (reply, answer) = oneshot::channel();
            pending.push(Pending { op, reply });
            answers.push(answer);
        }
        // A send error means the writers are gone (runtime shutting down): the answers
        // below then report it.
        let _ = self.queue_for(&pending).send(pending);
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(
                answer
                    .await
                    .unwrap_or_else(|_| Err(LedgerError::Busy("the ledger writer stopped".into()))),
            );
        }
        results
    }
}

impl GroupCommit {
    /// How many writer tasks apply groups.
    pub(super) fn writers(&self) -> usize {
        self.writers
    }

    fn queue_for(&self, submission: &[Pending]) -> &mpsc::UnboundedSender<Vec<Pending>> {
        match &self.queues {
            Queues::Shared(queue) => queue,
            Queues::ByUser { queues, routes } => {
                let alive = |w: usize| queues.get(w).is_some_and(|q| !q.is_closed());
                &queues[routes.route(single_user(submission), alive) % queues.len()]
            }
        }
    }
}

/// A writer of the shared queue: groups whatever is queued, up to [`MAX_GROUP`].
async fn writer(receiver: Arc<Mutex<mpsc::UnboundedReceiver<Vec<Pending>>>>, inner: Weak<Inner>) {
    loop {
        let submissions = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            queued_group(first, &mut receiver)
        };
        if !apply(&inner, submissions).await {
            return;
        }
    }
}

/// How a writer with a queue of its own (see [`Routes`]) forms its groups.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Grouping {
    /// MySQL: a group holds one user's submissions (see [`one_users_group`]).
    OneUser,
    /// PostgreSQL: a group holds whatever is queued at the writer, in lock order (see
    /// [`queued_group`]). As a user's submissions all go to one writer while any is
    /// outstanding, two writers of a process never wait for each other's locks on one
    /// account: a hot user's calls share one transaction and one commit instead of four
    /// writers' transactions queueing on its row.
    AnyUsers,
}

impl Grouping {
    /// None: the writers take from one shared queue (SQLite's one writer).
    fn of(dialect: Dialect) -> Option<Grouping> {
        match dialect {
            Dialect::MySql => Some(Grouping::OneUser),
            Dialect::Postgres => Some(Grouping::AnyUsers),
            Dialect::Sqlite => None,
        }
    }
}

/// A writer with a queue of its own, fed by [`Routes`].
struct RoutedWriter {
    index: usize,
    routes: Arc<Routes>,
    grouping: Grouping,
}

impl RoutedWriter {
    async fn run(self, mut receiver: mpsc::UnboundedReceiver<Vec<Pending>>, inner: Weak<Inner>) {
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(first) => first,
                None => match receiver.recv().await {
                    Some(first) => first,
                    None => return,
                },
            };
            let submissions = if self.grouping == Grouping::OneUser {
                let (submissions, after) = one_users_group(first, &mut receiver);
                next = after;
                submissions
            } else {
                queued_group(first, &mut receiver)
            };
            // Whom each submission was routed for, to count its answer against.
            let users: Vec<Option<String>> = submissions
                .iter()
                .map(|s| single_user(s).map(str::to_string))
                .collect();
            let alive = apply(&inner, submissions).await;
            for user in &users {
                self.routes.done(self.index, user.as_deref());
            }
            if !alive {
                return;
            }
        }
    }
}

/// `first` and whatever is queued behind it, up to [`MAX_GROUP`] operations, sorted by
/// the user each locks (a submission keeps its own order).
fn queued_group(
    first: Vec<Pending>,
    receiver: &mut mpsc::UnboundedReceiver<Vec<Pending>>,
) -> Vec<Vec<Pending>> {
    let mut size = first.len();
    let mut submissions = vec![first];
    while size < MAX_GROUP {
        match receiver.try_recv() {
            Ok(more) => {
                size += more.len();
                submissions.push(more);
            }
            Err(_) => break,
        }
    }
    submissions.sort_by(|a, b| lock_key(a).cmp(lock_key(b)));
    submissions
}

/// A MySQL group: `first` and the submissions queued right behind it of the same single
/// user, up to [`MAX_GROUP`] operations; and the first other submission met, which starts
/// the next group. A submission of no single user is a group of its own.
fn one_users_group(
    first: Vec<Pending>,
    receiver: &mut mpsc::UnboundedReceiver<Vec<Pending>>,
) -> (Vec<Vec<Pending>>, Option<Vec<Pending>>) {
    let Some(user) = single_user(&first).map(str::to_string) else {
        return (vec![first], None);
    };
    let mut size = first.len();
    let mut submissions = vec![first];
    while size < MAX_GROUP {
        match receiver.try_recv() {
            Ok(more) if single_user(&more) == Some(user.as_str()) => {
                size += more.len();
                submissions.push(more);
            }
            Ok(other) => return (submissions, Some(other)),
            Err(_) => break,
        }
    }
    (submissions, None)
}

/// Applies `submissions` as one group; false once the ledger is gone.
async fn apply(inner: &Weak<Inner>, submissions: Vec<Vec<Pending>>) -> bool {
    let group: Vec<Pending> = submissions.into_iter().flatten().collect();
    let Some(inner) = inner.upgrade() else {
        return false;
    };
    let ledger = Ledger { inner };
    // Counted before the answers go out, so a caller that got its answer sees its group.
    ledger.count_group(group.len());
    let started = std::time::Instant::now();
    run_group(&ledger, group).await;
    ledger.count_writer_busy(started.elapsed());
    true
}

/// The user every operation of `submission` locks, when they all lock the same known one.
fn single_user(submission: &[Pending]) -> Option<&str> {
    let user = lock_key(submission);
    let same = submission.iter().all(|p| p.op.lock_key() == user);
    (!user.is_empty() && same).then_some(user)
}

/// Why an attempt at a group failed.
enum Failure {
    /// One operation failed; the transaction was rolled back.
    Op(LedgerError),
    /// Beginning or committing failed: every operation shares the error.
    Group(LedgerError),
}

fn lock_key(submission: &[Pending]) -> &str {
    submission.first().map_or("", |p| p.op.lock_key())
}

async fn run_group(ledger: &Ledger, mut group: Vec<Pending>) {
    if let [Pending {
        op: Op::Reserve { req, admission },
        ..
    }] = group.as_slice()
    {
        if let Some(answer) = ledger.reserve_alone(req, admission).await {
            if let Some(lone) = group.pop() {
                // The caller may have gone away; its reservation stands (idempotent).
                let _ = lone.reply.send(Ok(Done::Authorized(answer)));
            }
            return;
        }
    }
    if let [Pending {
        op: Op::Settle(req),
        ..
    }] = group.as_slice()
    {
        if let Some(answer) = ledger.settle_alone(req).await {
            if let Some(lone) = group.pop() {
                // The caller may have gone away; its settlement stands (idempotent).
                let _ = lone.reply.send(Ok(Done::Settled(answer)));
            }
            return;
        }
    }
    let (ops, replies): (Vec<Op>, Vec<Reply>) = group.into_iter().map(|p| (p.op, p.reply)).unzip();
    let results = match attempt(ledger, &ops, false).await {
        Ok(results) => results,
        Err(Failure::Op(error)) if ops.len() == 1 => vec![alone(ledger, &ops[0], error).await],
        Err(Failure::Op(_)) => match attempt(ledger, &ops, true).await {
            Ok(results) => results,
            Err(Failure::Op(error) | Failure::Group(error)) => shared(error, ops.len()),
        },
        Err(Failure::Group(error)) => shared(error, ops.len()),
    };
    for (reply, result) in replies.into_iter().zip(results) {
        // The caller may have gone away; its operation stands (it is idempotent).
        let _ = reply.send(result);
    }
}

/// One transaction for all of `ops`; with `savepoints`, a failing operation is undone and
/// answered alone, otherwise it fails the attempt.
async fn attempt(
    ledger: &Ledger,
    ops: &[Op],
    savepoints: bool,
) -> Result<Vec<Result<Done, LedgerError>>, Failure> {
    let mut tx = ledger
        .db()
        .begin_write()
        .await
        .map_err(|e| Failure::Group(e.into()))?;
    // With savepoints (after a failure) every operation reads for itself.
    let mut reads = if savepoints {
        Prefetched::default()
    } else {
        match Prefetched::read(ledger, tx.conn(), ops).await {
            Ok(reads) => reads,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(Failure::Group(e));
            }
        }
    };
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        if savepoints {
            if let Err(e) = tx.conn().execute("SAVEPOINT ledger_op").await {
                let _ = tx.rollback().await;
                return Err(Failure::Group(e.into()));
            }
        }
        let result = op.apply(ledger, tx.conn(), &mut reads).await;
        let result = match result {
            Ok(done) if savepoints => {
                match tx.conn().execute("RELEASE SAVEPOINT ledger_op").await {
                    Ok(_) => Ok(done),
                    Err(e) => {
                        let _ = tx.rollback().await;
                        return Err(Failure::Group(e.into()));
                    }
                }
            }
            Ok(done) => Ok(done),
            Err(error) if !savepoints => {
                let _ = tx.rollback().await;
                return Err(Failure::Op(error));
            }
            Err(error) => {
                // Fails when the server already rolled the whole transaction back
                // (a MySQL deadlock): then nothing of the group stands.
                if tx
                    .conn()
                    .execute("ROLLBACK TO SAVEPOINT ledger_op")
                    .await
                    .is_err()
                {
                    let _ = tx.rollback().await;
                    let message = format!("the group transaction was lost: {error}");
                    return Err(Failure::Group(LedgerError::Busy(message)));
                }
                match op.replay(ledger, tx.conn(), &error).await {
                    Some(replayed) => replayed,
                    None => Err(error),
                }
            }
        };
        results.push(result);
    }
    // The read-ahead settlements' writes, then COMMIT (one call on SQLite). A failed write
    // names no one operation, so the group runs again with savepoints (and no read-ahead),
    // as for any failing operation; so does a failed COMMIT sent with the writes on SQLite.
    let deferred = reads.take_deferred();
    match tx.commit_with(ledger.db().dialect(), deferred).await {
        Ok(()) => {
            ledger.count_one_statement_settlements(reads.one_statement_settlements());
            Ok(results)
        }
        Err(CommitError::Writes(e)) => Err(Failure::Op(e.into())),
        Err(CommitError::Commit(e)) => Err(Failure::Group(e.into())),
    }
}

/// The answer of an operation that failed alone (its transaction is rolled back).
async fn alone(ledger: &Ledger, op: &Op, error: LedgerError) -> Result<Done, LedgerError> {
    if let Op::Reserve { .. } = op {
        if matches!(&error, LedgerError::Db(e) if is_unique_violation(e)) {
            let mut conn = Conn::from(ledger.db().pool().acquire().await?);
            if let Some(replayed) = op.replay(ledger, &mut conn, &error).await {
                return replayed;
            }
        }
    }
    Err(error)
}

/// The error of a failed group, for each of its `n` operations.
fn shared(error: LedgerError, n: usize) -> Vec<Result<Done, LedgerError>> {
    let mut results: Vec<Result<Done, LedgerError>> =
        (1..n).map(|_| Err(copy_error(&error))).collect();
    results.insert(0, Err(error));
    results
}

/// A copy of a group's error for another operation of the group (sqlx errors cannot be
/// cloned; those that cannot be rebuilt become `Busy`, which callers retry).
fn copy_error(error: &LedgerError) -> LedgerError {
    use sqlx::Error as E;
    match error {
        LedgerError::Db(E::PoolTimedOut) => LedgerError::Db(E::PoolTimedOut),
        LedgerError::Db(E::PoolClosed) => LedgerError::Db(E::PoolClosed),
        LedgerError::Db(E::WorkerCrashed) => LedgerError::Db(E::WorkerCrashed),
        LedgerError::Db(E::Io(io)) => {
            LedgerError::Db(E::Io(std::io::Error::new(io.kind(), io.to_string())))
        }
        LedgerError::Db(E::Protocol(message)) => LedgerError::Db(E::Protocol(message.clone())),
        LedgerError::Busy(message) => LedgerError::Busy(message.clone()),
        other => LedgerError::Busy(format!("the group transaction failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use llm_meter_protocol::VoidRequest;

    use super::super::tests::settle_req;
    use super::*;

    fn pending(op: Op) -> Pending {
        let (reply, _answer) = oneshot::channel();
        Pending { op, reply }
    }

    fn settle(id: &str, user: &str) -> Pending {
        pending(Op::Settle(settle_req(id, user, 1, 1)))
    }

    /// MySQL's writers group a submission with others only when all its operations lock
    /// one known user; a batch of two users, a void (its user is known only once read) and
    /// a caller known by API key go alone, to the writers in turn.
    #[test]
    fn only_submissions_of_one_known_user_are_grouped_by_user() {
        assert_eq!(
            single_user(&[settle("a", "u1"), settle("b", "u1")]),
            Some("u1")
        );
        assert_eq!(single_user(&[settle("a", "u1"), settle("b", "u2")]), None);
        let void = pending(Op::Void(VoidRequest {
            request_id: "a".into(),
            reason: "upstream 503".into(),
            upstream_status: 503,
            lease_id: None,
            held: 0,
        }));
        assert_eq!(single_user(&[void]), None);
        let mut by_key = settle_req("a", "u1", 1, 1);
        by_key.caller = Caller::ApiKey("sk-1".into());
        assert_eq!(single_user(&[pending(Op::Settle(by_key))]), None);
        assert_eq!(single_user(&[]), None);
    }

    /// A MySQL group takes the same user's submissions queued behind the first, stops at
    /// another user's (which starts the next group) and at [`MAX_GROUP`] operations; a
    /// submission of no single user goes alone.
    #[test]
    fn a_mysql_group_holds_one_users_submissions() {
        let (queue, mut receiver) = mpsc::unbounded_channel();
        for (id, user) in [("b", "u1"), ("c", "u1"), ("d", "u2"), ("e", "u1")] {
            queue.send(vec![settle(id, user)]).unwrap();
        }
        let (group, next) = one_users_group(vec![settle("a", "u1")], &mut receiver);
        assert_eq!(group.len(), 3);
        assert!(group.iter().all(|s| single_user(s) == Some("u1")));
        let next = next.expect("u2's submission starts the next group");
        assert_eq!(single_user(&next), Some("u2"));
        let (group, next) = one_users_group(next, &mut receiver);
        assert_eq!(
            (group.len(), next.is_some()),
            (1, true),
            "u1's waits its turn"
        );

        let batch = vec![settle("f", "u1"), settle("g", "u2")];
        let (group, next) = one_users_group(batch, &mut receiver);
        assert_eq!(
            (group.len(), next.is_none()),
            (1, true),
            "no single user: alone"
        );

        for i in 0..MAX_GROUP {
            queue.send(vec![settle(&format!("m{i}"), "u3")]).unwrap();
        }
        let (group, next) = one_users_group(vec![settle("m", "u3")], &mut receiver);
        assert_eq!((group.len(), next.is_none()), (MAX_GROUP, true));
        assert!(
            receiver.try_recv().is_ok(),
            "the rest waits for the next group"
        );
    }

    /// PostgreSQL's and MySQL's writers each have a queue fed by the user routes (a hot
    /// user's calls meet at one writer); SQLite's one writer takes from a shared queue.
    #[test]
    fn routed_writers_on_postgres_and_mysql_only() {
        assert_eq!(Grouping::of(Dialect::Postgres), Some(Grouping::AnyUsers));
        assert_eq!(Grouping::of(Dialect::MySql), Some(Grouping::OneUser));
        assert_eq!(Grouping::of(Dialect::Sqlite), None);
    }

    /// A PostgreSQL (or SQLite) group takes everything queued, of any users, up to
    /// [`MAX_GROUP`] operations, and applies it in lock order; a submission keeps its own
    /// order inside.
    #[test]
    fn a_queued_group_takes_any_users_in_lock_order() {
        let (queue, mut receiver) = mpsc::unbounded_channel();
        queue.send(vec![settle("b", "u3")]).unwrap();
        queue
            .send(vec![settle("c", "u1"), settle("d", "u0")])
            .unwrap();
        queue.send(vec![settle("e", "u2")]).unwrap();
        let group = queued_group(vec![settle("a", "u2")], &mut receiver);
        let order: Vec<&str> = group
            .iter()
            .flatten()
            .map(|p| match &p.op {
                Op::Settle(req) => req.request_id.as_str(),
                _ => "?",
            })
            .collect();
        assert_eq!(order, ["c", "d", "a", "e", "b"]);

        for i in 0..MAX_GROUP + 3 {
            queue.send(vec![settle(&format!("m{i}"), "u4")]).unwrap();
        }
        let group = queued_group(vec![settle("m", "u4")], &mut receiver);
        assert_eq!(group.iter().map(Vec::len).sum::<usize>(), MAX_GROUP);
        assert_eq!(
            std::iter::from_fn(|| receiver.try_recv().ok()).count(),
            4,
            "the rest waits for the next group"
        );
    }

    /// A user's submissions follow the first one's writer while any is outstanding; others
    /// go to the least busy writer; once answered, the user is forgotten.
    #[test]
    fn a_busy_users_calls_follow_it_and_others_go_to_idle_writers() {
        let routes = Routes::new(3);
        let all = |_: usize| true;
        let hot = routes.route(Some("hot"), all);
        assert_eq!(
            routes.route(Some("hot"), all),
            hot,
            "follows its outstanding call"
        );
        let cold = routes.route(Some("cold"), all);
        assert_ne!(cold, hot, "an idle writer, not the busy one");
        let batch = routes.route(None, all);
        assert!(batch != hot && batch != cold, "the last idle writer");
        routes.done(hot, Some("hot"));
        assert_eq!(
            routes.route(Some("hot"), all),
            hot,
            "one call still outstanding"
        );
        routes.done(hot, Some("hot"));
        routes.done(hot, Some("hot"));
        assert!(
            routes.users.lock().unwrap().get("hot").is_none(),
            "forgotten"
        );
        assert_eq!(routes.outstanding[hot].load(Ordering::Relaxed), 0);

        // A stopped writer takes nothing more; its users move to another.
        let stuck = routes.route(Some("stuck"), all);
        let moved = routes.route(Some("stuck"), |w| w != stuck);
        assert_ne!(moved, stuck);
        assert_eq!(routes.route(Some("stuck"), |w| w != stuck), moved);
        for _ in 0..6 {
            assert_ne!(routes.route(None, |w| w != stuck), stuck);
        }
    }
}
