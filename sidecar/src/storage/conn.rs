//! [`Conn`]: the connection a ledger or catalog write runs on, whichever driver is under it.
//! It is an sqlx executor of the `Any` database, so queries are written and their rows
//! decoded the same way on every backend.

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use sqlx::any::{AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, Either, Execute, Executor, Transaction};
use sqlx_core::describe::Describe;

use super::direct::{DirectConn, Step};

/// A connection to run statements on.
#[derive(Debug)]
pub enum Conn {
    /// A pooled connection inside a transaction (PostgreSQL, MySQL writes).
    Tx(Transaction<'static, Any>),
    /// A pooled connection.
    Pooled(PoolConnection<Any>),
    /// A connection of its own through sqlx (SQLite's writer on an in-memory database).
    Sqlx(AnyConnection),
    /// SQLite's writer, driven on the calling thread (see [`super::direct`]).
    Direct(DirectConn),
}

impl From<PoolConnection<Any>> for Conn {
    fn from(conn: PoolConnection<Any>) -> Conn {
        Conn::Pooled(conn)
    }
}

/// What a [`Conn`] runs statements through.
enum Driver<'a> {
    Sqlx(&'a mut AnyConnection),
    Direct(&'a mut DirectConn),
}

impl Conn {
    fn driver(&mut self) -> Driver<'_> {
        match self {
            Conn::Tx(tx) => Driver::Sqlx(tx),
            Conn::Pooled(conn) => Driver::Sqlx(conn),
            Conn::Sqlx(conn) => Driver::Sqlx(conn),
            Conn::Direct(direct) => Driver::Direct(direct),
        }
    }
}

/// Runs `query` on the direct connection, at most `row_limit` rows.
fn run_direct<'q, E: Execute<'q, Any>>(
    direct: &mut DirectConn,
    mut query: E,
    row_limit: Option<usize>,
) -> Result<Vec<Step>, sqlx::Error> {
    let arguments = query
        .take_arguments()
        .map_err(sqlx::Error::Encode)?
        .map(|arguments| arguments.values.0)
        .unwrap_or_default();
    direct.run(query.sql(), arguments, query.persistent(), row_limit)
}

fn unsupported<T>(what: &str) -> Result<T, sqlx::Error> {
    Err(sqlx::Error::Protocol(format!(
        "{what} is not supported on the SQLite writer connection"
    )))
}

impl<'c> Executor<'c> for &'c mut Conn {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match self.driver() {
            Driver::Sqlx(conn) => conn.fetch_many(query),
            Driver::Direct(direct) => match run_direct(direct, query, None) {
                Ok(steps) => futures_util::stream::iter(steps.into_iter().map(Ok)).boxed(),
                Err(e) => futures_util::stream::once(async move { Err(e) }).boxed(),
            },
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match self.driver() {
            Driver::Sqlx(conn) => conn.fetch_optional(query),
            Driver::Direct(direct) => {
                let first = run_direct(direct, query, Some(1)).map(|steps| {
                    steps.into_iter().find_map(|step| match step {
                        Either::Right(row) => Some(row),
                        Either::Left(_) => None,
                    })
                });
                futures_util::future::ready(first).boxed()
            }
        }
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<AnyStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        match self.driver() {
            Driver::Sqlx(conn) => conn.prepare_with(sql, parameters),
            Driver::Direct(_) => futures_util::future::ready(unsupported("prepare")).boxed(),
        }
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<Any>, sqlx::Error>>
    where
        'c: 'e,
    {
        match self.driver() {
            Driver::Sqlx(conn) => conn.describe(sql),
            Driver::Direct(_) => futures_util::future::ready(unsupported("describe")).boxed(),
        }
    }
}
