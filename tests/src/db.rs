//! A fresh PostgreSQL database per test.

use sea_orm::{ConnectionTrait, Database, Statement};

/// Creates an empty database named `bank_test_<hint>_<unique>` and returns its
/// URL. Databases are left behind for inspection; `make test` drops the old
/// ones before it runs.
pub async fn fresh_database(hint: &str) -> anyhow::Result<String> {
    let admin_url = crate::pg_admin_url();
    let name = format!(
        "bank_test_{hint}_{}",
        &uuid::Uuid::now_v7().simple().to_string()[16..]
    );
    let admin = Database::connect(admin_url.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach PostgreSQL at {admin_url}: {e}"))?;
    admin
        .execute_raw(Statement::from_string(
            admin.get_database_backend(),
            format!("CREATE DATABASE \"{name}\""),
        ))
        .await?;
    admin.close().await?;
    Ok(with_database(&admin_url, &name))
}

/// `url` naming database `name` instead, its parameters (`?sslmode=...`)
/// kept: without them the services would connect with the driver's default
/// (`prefer`, TLS where the server offers it) instead of what the admin URL
/// asks for.
pub fn with_database(url: &str, name: &str) -> String {
    let (address, params) = match url.split_once('?') {
        Some((a, p)) => (a, Some(p)),
        None => (url, None),
    };
    let base = address.rsplit_once('/').map_or(address, |(b, _)| b);
    match params {
        Some(p) => format!("{base}/{name}?{p}"),
        None => format!("{base}/{name}"),
    }
}

/// Runs one SQL statement on `url` and returns the first column of each row as text.
pub async fn query_strings(url: &str, sql: &str) -> anyhow::Result<Vec<String>> {
    let db = Database::connect(url).await?;
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r.try_get_by_index::<String>(0)?);
    }
    db.close().await?;
    Ok(out)
}

/// Waits (at most `within`) until `sql` (one text column) at `url` returns
/// exactly `expected`; `what` names it in the failure message.
pub async fn until_rows(
    url: &str,
    sql: &str,
    expected: &[&str],
    what: &str,
    within: std::time::Duration,
) {
    crate::eventually(what, within, || async {
        let rows = query_strings(url, sql).await.map_err(|e| e.to_string())?;
        if rows == expected {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;
}

/// Waits (at most 10 s) until the channel database at `url` holds a
/// pending transfer; its id (the first, when there are several).
pub async fn until_pending_transfer(url: &str) -> String {
    crate::eventually(
        "a pending transfer",
        std::time::Duration::from_secs(10),
        || async {
            query_strings(
                url,
                "SELECT transfer_id FROM transfer_requests WHERE status = 'pending' \
                 ORDER BY requested_at LIMIT 1",
            )
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .next()
            .ok_or_else(|| "none yet".to_owned())
        },
    )
    .await
}

/// A row lock held from outside the services (as a long transaction of
/// another replica would), to make a service wait for it.
pub struct RowLock {
    db: sea_orm::DatabaseConnection,
    txn: sea_orm::DatabaseTransaction,
    /// The holding session's backend.
    pid: i32,
}

impl RowLock {
    /// Locks `account`'s row in the core database at `db_url`.
    pub async fn account(db_url: &str, account: &str) -> anyhow::Result<Self> {
        Self::hold(
            db_url,
            "SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE",
            account,
        )
        .await
    }

    /// Holds transfer id `id` in the core database at `db_url`, as a
    /// transaction inserting it that has not committed yet would: a ledger
    /// batch executing a transfer of that id waits on it, and asking which of
    /// its accounts are held finds none.
    pub async fn transfer_id(db_url: &str, id: &str) -> anyhow::Result<Self> {
        Self::hold(
            db_url,
            "INSERT INTO transfers (transfer_id, status, reason, fenced, completed_at) \
             VALUES ($1, 'failed', 'never_received', true, now())",
            id,
        )
        .await
    }

    /// Adds `amount` won to `account`'s balance and to its closing balance
    /// of `business_date` in the core database at `db_url`, moving its
    /// `last_seq` as every ledger write does, without committing: a write of
    /// a completed day's balance by a replica whose clock is behind, holding
    /// the account's row. (No ledger entry is written: the test that uses it
    /// looks at interest figures only.)
    pub async fn closing_balance_write(
        db_url: &str,
        account: &str,
        business_date: chrono::NaiveDate,
        amount: i64,
    ) -> anyhow::Result<Self> {
        Self::hold_values(
            db_url,
            "WITH a AS (UPDATE accounts SET balance = balance + $3, last_seq = last_seq + 1 \
                        WHERE account_id = $1 RETURNING balance) \
             INSERT INTO daily_balances (account_id, business_date, closing_balance) \
             SELECT $1, $2, balance FROM a \
             ON CONFLICT (account_id, business_date) DO UPDATE SET closing_balance = EXCLUDED.closing_balance",
            vec![account.into(), business_date.into(), amount.into()],
        )
        .await
    }

    /// Locks transfer request `id`'s row in the channel database at
    /// `db_url`, as another replica's long transaction would.
    pub async fn channel_transfer(db_url: &str, id: &str) -> anyhow::Result<Self> {
        Self::hold(
            db_url,
            "SELECT 1 FROM transfer_requests WHERE transfer_id = $1 FOR UPDATE",
            id,
        )
        .await
    }

    /// Stores a pending transfer from `account` of `customer` in the
    /// channel database at `db_url` without committing it, as a concurrent
    /// request would: storing another transfer from the account waits on it
    /// (the one-pending index), and goes on once it is released (undone).
    pub async fn channel_pending(
        db_url: &str,
        customer: &str,
        account: &str,
    ) -> anyhow::Result<Self> {
        Self::hold_values(
            db_url,
            "INSERT INTO transfer_requests (transfer_id, customer_id, from_account, to_account, amount, status, requested_at) \
             VALUES ('trf_held_' || md5(random()::text), $1, $2, $2, 1, 'pending', now())",
            vec![customer.into(), account.into()],
        )
        .await
    }

    /// Locks `account`'s `history_sync` row in the channel database at
    /// `db_url`: a history writer applying entries of that account waits.
    pub async fn history_sync(db_url: &str, account: &str) -> anyhow::Result<Self> {
        Self::hold(
            db_url,
            "SELECT 1 FROM history_sync WHERE account_id = $1 FOR UPDATE",
            account,
        )
        .await
    }

    /// Inserts a tax record for `payout_id` to `account` in the channel
    /// database at `db_url` (gross 100, tax 1, net 99) without committing
    /// it, as a concurrent writer of the same payout would: a tax record
    /// insert of that payout waits on it.
    pub async fn tax_record(db_url: &str, payout_id: &str, account: &str) -> anyhow::Result<Self> {
        Self::hold_values(
            db_url,
            "INSERT INTO tax_records (payout_id, account_id, gross, tax, net, from_date, through_date, paid_at) \
             VALUES ($1, $2, 100, 1, 99, current_date, current_date, now())",
            vec![payout_id.into(), account.into()],
        )
        .await
    }

    /// Locks table `table` of the database at `db_url` against every use,
    /// reads included (`ACCESS EXCLUSIVE`), as a migration would: anything
    /// reading it waits.
    pub async fn table(db_url: &str, table: &'static str) -> anyhow::Result<Self> {
        let sql = format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
        Self::hold_values(db_url, &sql, Vec::new()).await
    }

    async fn hold(db_url: &str, sql: &str, value: &str) -> anyhow::Result<Self> {
        Self::hold_values(db_url, sql, vec![value.into()]).await
    }

    async fn hold_values(
        db_url: &str,
        sql: &str,
        values: Vec<sea_orm::Value>,
    ) -> anyhow::Result<Self> {
        use sea_orm::TransactionTrait;
        let db = Database::connect(db_url).await?;
        let txn = db.begin().await?;
        let backend = txn.get_database_backend();
        txn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        let pid = txn
            .query_one_raw(Statement::from_string(
                backend,
                "SELECT pg_backend_pid() AS pid",
            ))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no backend pid"))?
            .try_get::<i32>("", "pid")?;
        Ok(Self { db, txn, pid })
    }

    /// How many sessions wait for this lock now, directly or queued behind
    /// another waiter (a row's second waiter waits for the first), and not
    /// for another lock.
    async fn blocked(&self) -> anyhow::Result<usize> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                self.db.get_database_backend(),
                "WITH RECURSIVE blocked(pid) AS ( \
                   SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)) \
                   UNION \
                   SELECT a.pid FROM pg_stat_activity a JOIN blocked b \
                     ON b.pid = ANY(pg_blocking_pids(a.pid))) \
                 SELECT count(*) AS n FROM blocked",
                [self.pid.into()],
            ))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no count"))?;
        Ok(usize::try_from(row.try_get::<i64>("", "n")?)?)
    }

    /// How many sessions of this database wait for a lock now.
    pub async fn waiters(&self) -> anyhow::Result<usize> {
        Ok(self.waiting_transactions().await?.len())
    }

    /// Returns once a session of this database waits for a lock (`what`
    /// names the waiter in the failure message).
    pub async fn until_waited_on(&self, what: &str) {
        crate::eventually(what, std::time::Duration::from_secs(10), || async {
            match self.waiters().await {
                Ok(n) if n > 0 => Ok(()),
                other => Err(format!("not waiting yet: {other:?}")),
            }
        })
        .await
    }

    /// Returns once `n` sessions wait for this lock (see [`Self::blocked`];
    /// `what` names the waiters in the failure message).
    pub async fn until_blocked(&self, n: usize, what: &str) {
        crate::eventually(what, std::time::Duration::from_secs(10), || async {
            match self.blocked().await {
                Ok(b) if b == n => Ok(()),
                other => Err(format!("sessions waiting: {other:?}")),
            }
        })
        .await
    }

    /// Returns once a session waited for a lock in this database, gave up
    /// (its lock timeout) and waits again in a later transaction (`what`
    /// names the waiter in the failure message).
    pub async fn until_retried(&self, what: &str) {
        let timeout = std::time::Duration::from_secs(10);
        let first = crate::eventually(what, timeout, || async {
            match self.waiting_transactions().await {
                Ok(w) if !w.is_empty() => Ok(w[0]),
                other => Err(format!("not waiting yet: {other:?}")),
            }
        })
        .await;
        crate::eventually(what, timeout, || async {
            match self.waiting_transactions().await {
                Ok(w) if w.iter().any(|started| *started > first) => Ok(()),
                other => Err(format!("not waiting again yet: {other:?}")),
            }
        })
        .await
    }

    /// When the transactions now waiting for a lock in this database began
    /// (microseconds since the epoch, oldest first). A waiter that gave up
    /// (lock timeout) and tried again shows up with a later start.
    pub async fn waiting_transactions(&self) -> anyhow::Result<Vec<i64>> {
        let rows = self
            .db
            .query_all_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT (extract(epoch FROM xact_start) * 1000000)::int8 AS started \
                 FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                 ORDER BY 1",
            ))
            .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<i64>("", "started")?))
            .collect()
    }

    /// Releases the lock, undoing what holding it wrote.
    pub async fn release(self) -> anyhow::Result<()> {
        self.txn.rollback().await?;
        self.db.close().await?;
        Ok(())
    }

    /// Releases the lock, committing what holding it wrote.
    pub async fn commit(self) -> anyhow::Result<()> {
        self.txn.commit().await?;
        self.db.close().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_fresh_database_url_keeps_the_admin_urls_parameters() {
        assert_eq!(
            with_database(
                "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
                "t1"
            ),
            "postgres://postgres@127.0.0.1:5432/t1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u:p@db:5432/postgres", "t2"),
            "postgres://u:p@db:5432/t2"
        );
    }
}
