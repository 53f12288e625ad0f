//! SQLite's writer connection, run on the calling thread (rusqlite) instead of through
//! sqlx's worker thread.
//!
//! Why: sqlx runs every SQLite connection on a thread of its own and hands each statement,
//! and each row back, across threads (a futex wake-up each way), then copies every row into
//! the `Any` driver's form. A ledger group makes a handful of statements and the chain of
//! hand-offs, not SQLite, was most of its time (see bench/ANALYSIS.md, section 3). Here a
//! statement runs where the transaction's code runs, and rows are built straight into
//! [`AnyRow`], so the ledger's code and its decoding (`row.try_get`) stay exactly as they are
//! on every backend.
//!
//! Values keep sqlx's SQLite mapping to the `Any` driver: INTEGER is `BigInt`, REAL
//! `Double`, TEXT `Text`, BLOB `Blob`; errors are [`sqlx::Error::Database`] with SQLite's
//! extended result code, so [`super::is_transient`] and unique-violation checks see what
//! they saw before.
//!
//! Blocking: a statement runs synchronously. Only the wait for SQLite's write lock can be
//! long (another process holding it); [`DirectConn::begin_immediate`] waits for it with
//! async sleeps instead of SQLite's busy handler, so no thread is held while it waits.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, Statement};
use sqlx::any::{AnyQueryResult, AnyRow, AnyTypeInfoKind, AnyValue};
use sqlx::error::{DatabaseError, ErrorKind};
use sqlx_core::any::AnyValueKind;
use sqlx_core::any::{AnyColumn, AnyTypeInfo};
use sqlx_core::ext::ustr::UStr;

/// Prepared statements kept per connection (sqlx's default for SQLite).
const STATEMENT_CACHE: usize = 100;

/// Column lists kept for statements that are cached (their texts repeat).
const COLUMN_CACHE: usize = 256;

/// How long a statement inside a transaction may wait on SQLite's busy handler. The write
/// lock is held from `BEGIN IMMEDIATE`, so in WAL mode nothing should wait; this bounds a
/// rare wait (a recovering WAL) instead of blocking the thread for the full busy timeout.
const IN_TRANSACTION_BUSY: Duration = Duration::from_millis(100);

/// One statement's result: a row, or the statement's summary.
pub type Step = sqlx::Either<AnyQueryResult, AnyRow>;

/// The column names and descriptions of a statement's result, shared by all its rows.
struct Columns {
    names: Arc<sqlx_core::HashMap<UStr, usize>>,
    columns: Vec<AnyColumn>,
}

/// A SQLite connection driven directly on the calling thread.
pub struct DirectConn {
    conn: Connection,
    columns: HashMap<String, Arc<Columns>>,
    /// How long [`DirectConn::begin_immediate`] waits for the write lock.
    busy: Duration,
}

impl std::fmt::Debug for DirectConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectConn").finish_non_exhaustive()
    }
}

impl DirectConn {
    /// Opens the database file at `path` (created if missing) with the session settings
    /// every connection of the pool has, plus `extra` statements (the writer's own).
    pub fn open(path: &Path, busy: Duration, setup: &[String]) -> Result<DirectConn, sqlx::Error> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_PRIVATE_CACHE;
        let conn = Connection::open_with_flags(path, flags).map_err(to_sqlx)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // sqlx turns foreign keys on for its connections: the same rules on every connection.
        conn.execute_batch("PRAGMA foreign_keys = ON")
            .map_err(to_sqlx)?;
        for statement in setup {
            // PRAGMA busy_timeout answers with a row; run every setting as a query.
            run_setting(&conn, statement)?;
        }
        conn.busy_timeout(IN_TRANSACTION_BUSY).map_err(to_sqlx)?;
        Ok(DirectConn {
            conn,
            columns: HashMap::new(),
            busy,
        })
    }

    /// `BEGIN IMMEDIATE`, waiting for another process's write lock with async sleeps for up
    /// to the busy timeout (then SQLite's BUSY error, which callers treat as transient).
    pub async fn begin_immediate(&mut self) -> Result<(), sqlx::Error> {
        let deadline = Instant::now() + self.busy;
        let mut pause = Duration::from_millis(1);
        self.conn.busy_timeout(Duration::ZERO).map_err(to_sqlx)?;
        let begun = loop {
            match self.conn.execute_batch("BEGIN IMMEDIATE") {
                Err(e) if is_busy(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                other => break other,
            }
        };
        self.conn
            .busy_timeout(IN_TRANSACTION_BUSY)
            .map_err(to_sqlx)?;
        begun.map_err(to_sqlx)
    }

    /// Runs statements without arguments or results (`COMMIT`, `ROLLBACK`, `SAVEPOINT ..`).
    pub fn execute_plain(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        self.conn.execute_batch(sql).map_err(to_sqlx)
    }

    /// Runs each `(sql, arguments)` in order; `cached` keeps their prepared forms.
    pub fn execute_each<'q>(
        &mut self,
        statements: impl IntoIterator<Item = (&'q str, Vec<AnyValueKind<'q>>)>,
        cached: bool,
    ) -> Result<(), sqlx::Error> {
        for (sql, arguments) in statements {
            self.run(sql, arguments, cached, None)?;
        }
        Ok(())
    }

    /// Runs `sql` (one or several statements, `?` arguments bound in order) and returns its
    /// rows and summaries as sqlx's executor would: every row, or at most `row_limit` (then
    /// it stops, as sqlx's `fetch_optional` does).
    pub fn run(
        &mut self,
        sql: &str,
        arguments: Vec<AnyValueKind<'_>>,
        cached: bool,
        row_limit: Option<usize>,
    ) -> Result<Vec<Step>, sqlx::Error> {
        let mut steps = Vec::new();
        let mut arguments = arguments.into_iter();
        if !has_several_statements(sql) {
            let mut statement = if cached {
                StatementRef::Cached(self.conn.prepare_cached(sql).map_err(to_sqlx)?)
            } else {
                StatementRef::Fresh(self.conn.prepare(sql).map_err(to_sqlx)?)
            };
            let known = if cached {
                self.columns.get(sql).cloned()
            } else {
                None
            };
            let columns = match known {
                Some(columns) => columns,
                None => {
                    let columns = Arc::new(describe(statement.get()));
                    if cached {
                        if self.columns.len() >= COLUMN_CACHE {
                            self.columns.clear();
                        }
                        self.columns.insert(sql.to_string(), columns.clone());
                    }
                    columns
                }
            };
            step_statement(
                &self.conn,
                &mut statement,
                &mut arguments,
                &columns,
                row_limit,
                &mut steps,
            )?;
        } else {
            let mut batch = rusqlite::Batch::new(&self.conn, sql);
            while let Some(statement) = batch.next().map_err(to_sqlx)? {
                let columns = describe(&statement);
                let mut statement = StatementRef::Fresh(statement);
                let limit = row_limit.map(|n| n.saturating_sub(rows_in(&steps)));
                step_statement(
                    &self.conn,
                    &mut statement,
                    &mut arguments,
                    &columns,
                    limit,
                    &mut steps,
                )?;
                if row_limit.is_some_and(|n| rows_in(&steps) >= n) {
                    break;
                }
            }
        }
        if arguments.next().is_some() {
            return Err(sqlx::Error::Protocol(format!(
                "more arguments than placeholders in `{}`",
                abbreviate(sql)
            )));
        }
        Ok(steps)
    }
}

/// A statement from the cache or prepared for one use.
enum StatementRef<'c> {
    Cached(rusqlite::CachedStatement<'c>),
    Fresh(Statement<'c>),
}

impl<'c> StatementRef<'c> {
    fn get(&self) -> &Statement<'c> {
        match self {
            StatementRef::Cached(s) => s,
            StatementRef::Fresh(s) => s,
        }
    }

    fn get_mut(&mut self) -> &mut Statement<'c> {
        match self {
            StatementRef::Cached(s) => s,
            StatementRef::Fresh(s) => s,
        }
    }
}

/// Binds the statement's share of `arguments`, steps it and appends what it returned.
fn step_statement<'q>(
    conn: &Connection,
    statement: &mut StatementRef<'_>,
    arguments: &mut impl Iterator<Item = AnyValueKind<'q>>,
    columns: &Columns,
    row_limit: Option<usize>,
    steps: &mut Vec<Step>,
) -> Result<(), sqlx::Error> {
    let statement = statement.get_mut();
    for index in 1..=statement.parameter_count() {
        let Some(value) = arguments.next() else {
            return Err(sqlx::Error::Protocol(format!(
                "{} placeholders and fewer arguments",
                statement.parameter_count()
            )));
        };
        bind(statement, index, value)?;
    }
    let mut returned = 0usize;
    {
        let mut rows = statement.raw_query();
        while row_limit.is_none_or(|limit| returned < limit) {
            let Some(row) = rows.next().map_err(to_sqlx)? else {
                break;
            };
            steps.push(sqlx::Either::Right(any_row(row, columns)?));
            returned += 1;
        }
    }
    let changes = if statement.readonly() {
        0
    } else {
        conn.changes()
    };
    steps.push(sqlx::Either::Left(AnyQueryResult {
        rows_affected: changes,
        last_insert_id: Some(conn.last_insert_rowid()),
    }));
    Ok(())
}

fn bind(
    statement: &mut Statement<'_>,
    index: usize,
    value: AnyValueKind<'_>,
) -> Result<(), sqlx::Error> {
    let bound = match value {
        AnyValueKind::Null(_) => statement.raw_bind_parameter(index, rusqlite::types::Null),
        AnyValueKind::Bool(b) => statement.raw_bind_parameter(index, i64::from(b)),
        AnyValueKind::SmallInt(i) => statement.raw_bind_parameter(index, i64::from(i)),
        AnyValueKind::Integer(i) => statement.raw_bind_parameter(index, i64::from(i)),
        AnyValueKind::BigInt(i) => statement.raw_bind_parameter(index, i),
        AnyValueKind::Real(r) => statement.raw_bind_parameter(index, f64::from(r)),
        AnyValueKind::Double(d) => statement.raw_bind_parameter(index, d),
        AnyValueKind::Text(t) => statement.raw_bind_parameter(index, t.as_ref()),
        AnyValueKind::Blob(b) => statement.raw_bind_parameter(index, b.as_ref()),
        other => {
            return Err(sqlx::Error::Protocol(format!(
                "cannot bind {other:?} on SQLite"
            )))
        }
    };
    bound.map_err(to_sqlx)
}

/// Rows returned so far in `steps`.
fn rows_in(steps: &[Step]) -> usize {
    steps.iter().filter(|s| s.is_right()).count()
}

fn describe(statement: &Statement<'_>) -> Columns {
    let mut names = sqlx_core::HashMap::new();
    let mut columns = Vec::with_capacity(statement.column_count());
    for (ordinal, column) in statement.columns().iter().enumerate() {
        let name = UStr::new(column.name());
        // Like sqlx: a later column of the same name does not shadow the first.
        names.entry(name.clone()).or_insert(ordinal);
        columns.push(AnyColumn {
            ordinal,
            name,
            type_info: AnyTypeInfo {
                kind: declared_kind(column.decl_type()),
            },
        });
    }
    Columns {
        names: Arc::new(names),
        columns,
    }
}

/// The `Any` kind of a declared column type (SQLite's type affinity rules).
fn declared_kind(declared: Option<&str>) -> AnyTypeInfoKind {
    let Some(declared) = declared.map(str::to_ascii_uppercase) else {
        return AnyTypeInfoKind::Null;
    };
    if declared.contains("INT") {
        AnyTypeInfoKind::BigInt
    } else if ["CHAR", "CLOB", "TEXT"]
        .iter()
        .any(|t| declared.contains(t))
    {
        AnyTypeInfoKind::Text
    } else if declared.contains("BLOB") {
        AnyTypeInfoKind::Blob
    } else if ["REAL", "FLOA", "DOUB"]
        .iter()
        .any(|t| declared.contains(t))
    {
        AnyTypeInfoKind::Double
    } else {
        AnyTypeInfoKind::Null
    }
}

/// A row in the `Any` driver's form, each value by its own storage class (as sqlx maps it).
fn any_row(row: &rusqlite::Row<'_>, columns: &Columns) -> Result<AnyRow, sqlx::Error> {
    let mut values = Vec::with_capacity(columns.columns.len());
    for index in 0..columns.columns.len() {
        let kind = match row.get_ref(index).map_err(to_sqlx)? {
            ValueRef::Null => AnyValueKind::Null(AnyTypeInfoKind::Null),
            ValueRef::Integer(i) => AnyValueKind::BigInt(i),
            ValueRef::Real(f) => AnyValueKind::Double(f),
            ValueRef::Text(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => AnyValueKind::Text(Cow::Owned(text.to_string())),
                Err(e) => {
                    return Err(sqlx::Error::ColumnDecode {
                        index: index.to_string(),
                        source: Box::new(e),
                    })
                }
            },
            ValueRef::Blob(bytes) => AnyValueKind::Blob(Cow::Owned(bytes.to_vec())),
        };
        values.push(AnyValue { kind });
    }
    Ok(AnyRow {
        column_names: columns.names.clone(),
        columns: columns.columns.clone(),
        values,
    })
}

/// Runs a session setting (`PRAGMA x = y`), whatever it answers.
fn run_setting(conn: &Connection, sql: &str) -> Result<(), sqlx::Error> {
    let mut statement = conn.prepare(sql).map_err(to_sqlx)?;
    let mut rows = statement.raw_query();
    while rows.next().map_err(to_sqlx)?.is_some() {}
    Ok(())
}

/// True when `sql` holds more than one statement (a `;` outside quotes with more after it).
fn has_several_statements(sql: &str) -> bool {
    let mut quote: Option<u8> = None;
    let bytes = sql.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b';' => {
                return bytes[i + 1..].iter().any(|c| !c.is_ascii_whitespace());
            }
            None => {}
        }
    }
    false
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(e, _)
        if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

fn abbreviate(sql: &str) -> &str {
    match sql.char_indices().nth(80) {
        Some((at, _)) => &sql[..at],
        None => sql,
    }
}

/// A SQLite error from the direct connection, as a database error of sqlx's.
#[derive(Debug)]
pub struct DirectSqliteError {
    /// SQLite's extended result code.
    code: i32,
    message: String,
}

impl DirectSqliteError {
    /// SQLite's extended result code.
    pub fn extended_code(&self) -> i32 {
        self.code
    }
}

impl std::fmt::Display for DirectSqliteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for DirectSqliteError {}

impl DatabaseError for DirectSqliteError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        // The extended codes of SQLITE_CONSTRAINT, as sqlx's SqliteError maps them.
        match self.code {
            1555 | 2067 => ErrorKind::UniqueViolation,
            787 => ErrorKind::ForeignKeyViolation,
            1299 => ErrorKind::NotNullViolation,
            275 => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// rusqlite's error as sqlx's: SQLite's own failures are database errors with their code.
fn to_sqlx(error: rusqlite::Error) -> sqlx::Error {
    match error {
        rusqlite::Error::SqliteFailure(e, message) => {
            let message = message.unwrap_or_else(|| e.to_string());
            sqlx::Error::Database(Box::new(DirectSqliteError {
                code: e.extended_code,
                message,
            }))
        }
        other => sqlx::Error::Protocol(format!("SQLite: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{is_transient, is_unique_violation};
    use sqlx::Row;

    fn temp_file() -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "llm-meter-direct-{:016x}.db",
            rand::random::<u64>()
        ))
    }

    fn open(path: &Path, busy: Duration) -> DirectConn {
        let setup = ["PRAGMA journal_mode = WAL".to_string()];
        DirectConn::open(path, busy, &setup).unwrap()
    }

    fn text(s: &str) -> AnyValueKind<'_> {
        AnyValueKind::Text(Cow::Borrowed(s))
    }

    fn rows(steps: Vec<Step>) -> Vec<AnyRow> {
        steps.into_iter().filter_map(|s| s.right()).collect()
    }

    #[test]
    fn statements_are_counted_outside_quotes() {
        assert!(!has_several_statements("SELECT 1"));
        assert!(!has_several_statements("SELECT 1;"));
        assert!(!has_several_statements("SELECT 1;  \n"));
        assert!(!has_several_statements("SELECT ';x'"));
        assert!(has_several_statements("UPDATE t SET a = 1;\nCOMMIT"));
        assert!(has_several_statements("SELECT \"a;\"; SELECT 2"));
    }

    #[test]
    fn declared_types_map_to_any_kinds() {
        assert_eq!(declared_kind(Some("BIGINT")), AnyTypeInfoKind::BigInt);
        assert_eq!(declared_kind(Some("varchar(64)")), AnyTypeInfoKind::Text);
        assert_eq!(declared_kind(Some("REAL")), AnyTypeInfoKind::Double);
        assert_eq!(declared_kind(None), AnyTypeInfoKind::Null);
    }

    /// Values come back by their storage class, as sqlx's SQLite driver maps them into the
    /// `Any` driver, and decode by column name; NULL decodes as None.
    #[test]
    fn rows_decode_as_through_sqlx() {
        let path = temp_file();
        let mut conn = open(&path, Duration::ZERO);
        conn.execute_plain(
            "CREATE TABLE v (k VARCHAR(8) PRIMARY KEY, n BIGINT, x REAL, note TEXT)",
        )
        .unwrap();
        let insert = "INSERT INTO v (k, n, x, note) VALUES (?, ?, ?, ?) RETURNING n";
        for cached in [true, false] {
            let k = if cached { "a" } else { "b" };
            let null = AnyValueKind::Null(AnyTypeInfoKind::Text);
            let args = vec![
                text(k),
                AnyValueKind::BigInt(i64::MAX),
                AnyValueKind::Double(0.5),
                null,
            ];
            let returned = rows(conn.run(insert, args, cached, None).unwrap());
            assert_eq!(returned[0].get::<i64, _>("n"), i64::MAX);
        }
        let all = rows(
            conn.run("SELECT k, n, x, note FROM v ORDER BY k", vec![], true, None)
                .unwrap(),
        );
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].get::<String, _>("k"), "b");
        assert_eq!(all[1].get::<f64, _>("x"), 0.5);
        assert_eq!(all[1].get::<Option<String>, _>("note"), None);
        assert!(
            all[1].try_get::<String, _>("note").is_err(),
            "NULL is not a string"
        );
        assert!(all[0].try_get::<i64, _>("missing").is_err());
        let first = conn
            .run("SELECT k FROM v ORDER BY k", vec![], true, Some(1))
            .unwrap();
        assert_eq!(rows(first).len(), 1, "a row limit stops the statement");
        drop(conn);
        let _ = std::fs::remove_file(path);
    }

    /// Several statements in one text bind their arguments in order, and a count of
    /// arguments that does not match the placeholders is an error, not a silent NULL.
    #[test]
    fn several_statements_share_the_arguments_in_order() {
        let path = temp_file();
        let mut conn = open(&path, Duration::ZERO);
        conn.execute_plain("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER NOT NULL)")
            .unwrap();
        let sql = "INSERT INTO t VALUES (?, ?);\nUPDATE t SET n = n + ? WHERE k = ?";
        let args = vec![
            text("a"),
            AnyValueKind::BigInt(1),
            AnyValueKind::BigInt(41),
            text("a"),
        ];
        let steps = conn.run(sql, args, false, None).unwrap();
        let changed: u64 = steps
            .iter()
            .filter_map(|s| s.as_ref().left())
            .map(|r| r.rows_affected)
            .sum();
        assert_eq!(changed, 2);
        let n = rows(conn.run("SELECT n FROM t", vec![], true, None).unwrap());
        assert_eq!(n[0].get::<i64, _>(0), 42);

        let too_many = vec![text("b"), AnyValueKind::BigInt(1), AnyValueKind::BigInt(2)];
        let error = conn
            .run("INSERT INTO t VALUES (?, ?)", too_many, true, None)
            .err()
            .unwrap();
        assert!(error.to_string().contains("more arguments"), "{error}");
        let too_few = vec![text("c")];
        let error = conn
            .run("INSERT INTO t VALUES (?, ?)", too_few, true, None)
            .err()
            .unwrap();
        assert!(error.to_string().contains("fewer arguments"), "{error}");
        drop(conn);
        let _ = std::fs::remove_file(path);
    }

    /// SQLite's errors keep their meaning: a duplicate key is a unique violation, and a
    /// write lock another connection holds past the busy timeout is transient (retried).
    #[tokio::test]
    async fn errors_keep_their_meaning() {
        let path = temp_file();
        let mut conn = open(&path, Duration::from_millis(30));
        conn.execute_plain("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .unwrap();
        let insert = "INSERT INTO t VALUES (?)";
        conn.run(insert, vec![text("a")], true, None).unwrap();
        let duplicate = conn.run(insert, vec![text("a")], true, None).err().unwrap();
        assert!(is_unique_violation(&duplicate), "{duplicate:?}");
        assert!(!is_transient(&duplicate));

        let mut other = open(&path, Duration::ZERO);
        other.begin_immediate().await.unwrap();
        let started = Instant::now();
        let busy = conn.begin_immediate().await.unwrap_err();
        assert!(is_transient(&busy), "{busy:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(30),
            "it waited for the lock"
        );
        other.execute_plain("ROLLBACK").unwrap();
        drop((conn, other));
        let _ = std::fs::remove_file(path);
    }

    /// `BEGIN IMMEDIATE` waits for another connection's write lock without holding its
    /// thread: other tasks of a one-thread runtime keep running, and it begins once the
    /// lock is released.
    #[tokio::test(flavor = "current_thread")]
    async fn waiting_for_the_write_lock_does_not_hold_the_thread() {
        let path = temp_file();
        let mut conn = open(&path, Duration::from_secs(5));
        let mut other = open(&path, Duration::ZERO);
        other.begin_immediate().await.unwrap();
        let release = async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            other.execute_plain("COMMIT").unwrap();
        };
        let (begun, ()) = tokio::join!(conn.begin_immediate(), release);
        begun.unwrap();
        conn.execute_plain("COMMIT").unwrap();
        drop(conn);
        let _ = std::fs::remove_file(path);
    }
}
