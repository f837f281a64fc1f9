//! PostgreSQL helpers shared by the services: connecting with bounded waits,
//! reading PostgreSQL's error codes and constraint names out of `DbErr`, and
//! retrying transactions that failed for a transient reason.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr, RuntimeErr};

use crate::config::PoolArgs;

/// SQLSTATE of a serialization failure.
pub const SERIALIZATION_FAILURE: &str = "40001";
/// SQLSTATE of a detected deadlock.
pub const DEADLOCK_DETECTED: &str = "40P01";
/// SQLSTATE raised when `lock_timeout` expires.
pub const LOCK_NOT_AVAILABLE: &str = "55P03";
/// SQLSTATE of a unique violation.
pub const UNIQUE_VIOLATION: &str = "23505";

/// Opens a connection pool. Every session gets `lock_timeout` and
/// `statement_timeout`, so a blocked statement fails (and is retried) instead
/// of hanging a request.
pub async fn connect(
    url: &str,
    pool: &PoolArgs,
    application_name: &str,
) -> Result<DatabaseConnection, DbErr> {
    let timeouts = Timeouts {
        lock_ms: pool.db_lock_timeout_ms,
        statement_ms: pool.db_statement_timeout_ms,
    };
    open(url, pool.db_max_connections, timeouts, application_name).await
}

/// Every session's `lock_timeout` and `statement_timeout` (0: none).
struct Timeouts {
    lock_ms: u64,
    statement_ms: u64,
}

async fn open(
    url: &str,
    max_connections: u32,
    timeouts: Timeouts,
    application_name: &str,
) -> Result<DatabaseConnection, DbErr> {
    let mut opts = ConnectOptions::new(url.to_owned());
    let lock_timeout = timeouts.lock_ms.to_string();
    let statement_timeout = timeouts.statement_ms.to_string();
    let app = application_name.to_owned();
    opts.max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(Duration::from_secs(300))
        // No ping before handing out a connection (a round trip per
        // transaction); a broken connection fails the statement, which is
        // retried as a transient error.
        .test_before_acquire(false)
        .sqlx_logging(false)
        .map_sqlx_postgres_opts(move |o| {
            // Custom plans: the hot statements take arrays (`= ANY($1)`,
            // `unnest($1)`) whose size a generic plan cannot know; generic
            // plans guessed 100 rows and chose sequential scans of whole tables.
            o.application_name(&app).options([
                ("lock_timeout", lock_timeout.as_str()),
                ("statement_timeout", statement_timeout.as_str()),
                ("plan_cache_mode", "force_custom_plan"),
                // The services wake their relays in-process; see common::outbox.
                ("bank.outbox_notify", "off"),
            ])
        });
    Database::connect(opts)
        .await
        .map_err(|e| without_credentials(e, url))
}

/// The driver's connection errors can quote the whole URL (one that does not
/// parse, or has the wrong scheme), password included; the credentials are
/// taken out of the message before it can reach a log.
fn without_credentials(err: DbErr, url: &str) -> DbErr {
    let Some(userinfo) = url
        .split_once("://")
        .and_then(|(_, rest)| rest.rfind('@').map(|at| &rest[..at]))
        .filter(|u| !u.is_empty())
    else {
        return err;
    };
    let text = err.to_string();
    let mut hidden = text.replace(userinfo, "<credentials hidden>");
    if let Some((_, password)) = userinfo.split_once(':')
        && password.len() >= 3
    {
        hidden = hidden.replace(password, "<hidden>");
    }
    if hidden == text {
        err
    } else {
        DbErr::Conn(RuntimeErr::Internal(hidden))
    }
}

fn database_error(err: &DbErr) -> Option<&(dyn sqlx::error::DatabaseError + 'static)> {
    let runtime = match err {
        DbErr::Exec(e) | DbErr::Query(e) | DbErr::Conn(e) => e,
        _ => return None,
    };
    match runtime {
        RuntimeErr::SqlxError(e) => match e.as_ref() {
            sqlx::Error::Database(db) => Some(db.as_ref()),
            _ => None,
        },
        _ => None,
    }
}

/// The SQLSTATE code of a database error, if the error came from PostgreSQL.
pub fn pg_code(err: &DbErr) -> Option<String> {
    database_error(err).and_then(|e| e.code().map(|c| c.into_owned()))
}

/// The name of the violated constraint, if any.
pub fn violated_constraint(err: &DbErr) -> Option<String> {
    database_error(err).and_then(|e| e.constraint().map(str::to_owned))
}

/// True for a unique violation of the named constraint or index.
pub fn is_unique_violation_of(err: &DbErr, constraint: &str) -> bool {
    pg_code(err).as_deref() == Some(UNIQUE_VIOLATION)
        && violated_constraint(err).as_deref() == Some(constraint)
}

/// True when a row or table lock was not granted within `lock_timeout`.
pub fn is_lock_timeout(err: &DbErr) -> bool {
    pg_code(err).as_deref() == Some(LOCK_NOT_AVAILABLE)
}

/// True when retrying the whole transaction may succeed: lock timeouts,
/// deadlocks, serialization failures, and lost or unavailable connections.
pub fn is_transient(err: &DbErr) -> bool {
    if let Some(code) = pg_code(err) {
        return matches!(
            code.as_str(),
            SERIALIZATION_FAILURE | DEADLOCK_DETECTED | LOCK_NOT_AVAILABLE
        ) || code.starts_with("08") // connection exception
            || code.starts_with("53") // insufficient resources (too many connections, disk full)
            || code == "57P01" // admin shutdown
            || code == "57P02" // crash shutdown
            || code == "57P03"; // cannot connect now
    }
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            matches!(
                e.as_ref(),
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            )
        }
        _ => false,
    }
}

/// True when a statement's outcome is unknown: the connection was lost
/// while it ran (an I/O or protocol failure, not an error PostgreSQL sent,
/// which means the statement failed). A statement that commits on its own
/// may have committed, its answer lost; one that cannot be retried blindly
/// must be checked or repeated idempotently. A failure to get a connection
/// (`DbErr::Conn`, `ConnectionAcquire`) ran nothing.
pub fn outcome_unknown(err: &DbErr) -> bool {
    match err {
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            matches!(e.as_ref(), sqlx::Error::Io(_) | sqlx::Error::Protocol(_))
        }
        _ => false,
    }
}

/// True when PostgreSQL refused the data itself (SQLSTATE class 22, data
/// exception, or 23, integrity constraint violation: a NUL byte in a text,
/// a number out of the column's range, a failed check). The same statement
/// with the same data fails the same way again, so retrying cannot help;
/// other rows in the same transaction are not at fault. A unique violation
/// is left out: here it is the mark of a concurrent insert, which a retry
/// resolves.
pub fn is_rejected_data(err: &DbErr) -> bool {
    pg_code(err)
        .is_some_and(|c| (c.starts_with("22") || c.starts_with("23")) && c != UNIQUE_VIOLATION)
}

/// True when the database itself is out of reach or not serving: a lost or
/// refused connection, an exhausted pool, a server shutting down or starting,
/// too many connections, or a read-only server (a failover under way). A
/// statement timeout is not among them: the server answers, and the same
/// statement may time out again however long one waits.
/// Unlike lock timeouts, deadlocks and serialization failures, which another
/// writer causes and a retry soon cures, these say nothing about the work.
pub fn is_unavailable(err: &DbErr) -> bool {
    if let Some(code) = pg_code(err) {
        return code.starts_with("08")
            || code.starts_with("53")
            || matches!(code.as_str(), "57P01" | "57P02" | "57P03" | "25006");
    }
    is_transient(err)
}

/// True when the failure is the database's as a whole, not one statement's
/// data: it is unavailable ([`is_unavailable`]), or a statement ran out of
/// time or was cancelled (`57014`: a stalled disk, a long lock wait). Work
/// split into smaller parts would meet the same failure in each.
pub fn is_systemic(err: &DbErr) -> bool {
    is_unavailable(err) || pg_code(err).is_some_and(|c| c == "57014")
}

/// Runs `attempt` again while it fails with an error a retry may cure
/// ([`AsDbErr::is_retryable`]: by default a transient database error), with
/// jittered exponential backoff (5 ms doubling to 200 ms, at most `max_retries`
/// retries). Callers never see lock timeouts or deadlocks unless they persist.
pub async fn retry_transient<T, E, F, Fut>(max_retries: usize, attempt: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: AsDbErr + std::fmt::Display,
{
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(5))
                .with_max_delay(Duration::from_millis(200))
                .with_max_times(max_retries)
                .with_jitter(),
        )
        .when(|e: &E| e.is_retryable())
        .notify(|e: &E, wait: Duration| {
            metrics::counter!("db_transaction_retries_total").increment(1);
            tracing::debug!(error = %e, wait_ms = wait.as_millis() as u64, "retrying transaction");
        })
        .await
}

/// Errors that may wrap a database error, for [`retry_transient`].
pub trait AsDbErr {
    /// The database error inside, if there is one.
    fn as_db_err(&self) -> Option<&DbErr>;

    /// Whether running the whole transaction again may succeed. By default:
    /// a transient database error ([`is_transient`]). Callers add their own
    /// races (a concurrent insert of the same id, say).
    fn is_retryable(&self) -> bool {
        self.as_db_err().is_some_and(is_transient)
    }
}

impl AsDbErr for DbErr {
    fn as_db_err(&self) -> Option<&DbErr> {
        Some(self)
    }
}

/// The advisory lock [`migrate`] holds while it applies migrations
/// ("migrate" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x006d_6967_7261_7465;

/// Longest a starting process waits for another one's migrations (replicas,
/// or services sharing a database, that start together).
pub const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Applies `M`'s pending migrations, one process at a time across every
/// process sharing the database, on connections of their own rather than the
/// service's pool, whose timeouts are for requests:
///
/// - the wait for another process's migrations (a database-wide advisory
///   lock, held by an open transaction) is bounded by [`MIGRATION_LOCK_WAIT`],
///   not by `DATABASE_LOCK_TIMEOUT_MS`, so a replica starting beside one that
///   builds an index waits for it instead of failing;
/// - a statement is not bounded by `DATABASE_STATEMENT_TIMEOUT_MS` (an index
///   built over a large table may take longer than any request should);
/// - a statement waiting for a table's lock still gives up after
///   `DATABASE_LOCK_TIMEOUT_MS` (DDL queued behind a long transaction would
///   hold up every query behind it), and the migrations are tried again
///   ([`retry_transient`]; each migration runs in a transaction with its
///   record, so a failed try leaves nothing half done).
pub async fn migrate<M: sea_orm_migration::MigratorTrait>(
    url: &str,
    pool: &PoolArgs,
    application_name: &str,
) -> Result<(), DbErr> {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let timeouts = Timeouts {
        lock_ms: pool.db_lock_timeout_ms,
        statement_ms: 0,
    };
    // One connection holds the lock, one runs the migrations.
    let db = open(url, 2, timeouts, &format!("{application_name} migrations")).await?;
    let result = async {
        let lock = db.begin().await?;
        lock.execute_unprepared(&format!(
            "SET LOCAL lock_timeout = {}",
            MIGRATION_LOCK_WAIT.as_millis()
        ))
        .await?;
        lock.execute_raw(sea_orm::Statement::from_sql_and_values(
            lock.get_database_backend(),
            "SELECT pg_advisory_xact_lock($1)",
            [MIGRATION_LOCK_KEY.into()],
        ))
        .await?;
        retry_transient(9, || M::up(&db, None)).await?;
        lock.commit().await
    }
    .await;
    // The connections are the migrations' only; a failure to close them
    // changes nothing the caller could act on.
    let _ = db.close().await;
    result
}

/// Implements `MigrationTrait` for `$migration` (a unit struct deriving
/// `DeriveMigrationName`, which keeps naming it after its file) as one SQL
/// text run up and one run down: the shape of most migrations here.
#[macro_export]
macro_rules! sql_migration {
    ($migration:ident, up: $up:expr, down: $down:expr $(,)?) => {
        #[sea_orm_migration::async_trait::async_trait]
        impl sea_orm_migration::prelude::MigrationTrait for $migration {
            async fn up(
                &self,
                manager: &sea_orm_migration::prelude::SchemaManager,
            ) -> Result<(), sea_orm_migration::prelude::DbErr> {
                use sea_orm_migration::sea_orm::ConnectionTrait;
                manager.get_connection().execute_unprepared($up).await?;
                Ok(())
            }

            async fn down(
                &self,
                manager: &sea_orm_migration::prelude::SchemaManager,
            ) -> Result<(), sea_orm_migration::prelude::DbErr> {
                use sea_orm_migration::sea_orm::ConnectionTrait;
                manager.get_connection().execute_unprepared($down).await?;
                Ok(())
            }
        }
    };
}
