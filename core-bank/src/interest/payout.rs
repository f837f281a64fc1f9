//! The interest payout transaction (B22-B24).
//!
//! One transaction that locks only the account row: checks the customer and
//! account states, allows one payout per business date, computes the accrual
//! with the account's rollout path, credits `net` as a ledger entry of kind
//! `interest` with the account's next sequence number, records the payout and
//! enqueues the ledger event and `bank.interest.paid`. The withholding tax is
//! not written here: the projector records it from the event (B23), which
//! keeps this transaction to what must be consistent at once.

use chrono::{DateTime, NaiveDate, Utc};
use common::events::{EntryKind, InterestPaidEvent, LedgerEntry, LedgerEvent};
use common::outbox::OutboxMessage;
use common::{AccountId, PayoutId, Won};
use rust_decimal::Decimal;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement, TransactionTrait};
use serde::Serialize;

use super::{AccountTerms, Accrual, InterestService};
use crate::accounts::CustomerStatus;
use crate::clock::Clock;

/// A completed payout: the answer of `POST .../interest/payouts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Payout {
    /// The payout id.
    #[schema(value_type = String)]
    pub payout_id: PayoutId,
    /// The account.
    #[schema(value_type = String)]
    pub account_id: AccountId,
    /// Interest before tax.
    #[schema(value_type = String)]
    pub gross: Won,
    /// Withholding tax.
    #[schema(value_type = String)]
    pub tax: Won,
    /// Credited amount.
    #[schema(value_type = String)]
    pub net: Won,
    /// Balance after the credit.
    #[schema(value_type = String)]
    pub balance: Won,
    /// Sequence number of the credit entry.
    pub seq: i64,
    /// First business date covered.
    pub from: NaiveDate,
    /// Last business date covered.
    pub through: NaiveDate,
    /// When it committed.
    pub paid_at: DateTime<Utc>,
}

/// Why a payout did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PayoutError {
    /// No such account.
    #[error("account not found")]
    AccountNotFound,
    /// The customer is in a protected state.
    #[error("the customer is in a protected state ({0}); interest cannot be paid out")]
    CustomerProtected(&'static str),
    /// The account is suspended or closed.
    #[error("the account is not active")]
    AccountNotActive,
    /// The account refuses deposits.
    #[error("the account is stopped for deposits")]
    DepositStopped,
    /// A payout already happened on this business date.
    #[error("interest was already paid out today")]
    AlreadyPaidToday,
    /// No completed day, or less than one won accrued.
    #[error("no interest has accrued since the last payout")]
    NothingToPay,
    /// The payout would take the balance above the supported maximum.
    #[error("the payout would take the balance above 10^18 won")]
    BalanceLimitExceeded,
    /// Another payout of the account committed while this one waited for
    /// its lock; the payout is run again, so callers see this only if it
    /// keeps happening.
    #[error("a concurrent payout of this account committed first")]
    PaidMeanwhile,
    /// The business date changed while the payout waited for its lock; it
    /// is run again under the new date, so callers see this only if it
    /// keeps happening.
    #[error("the business date changed during the payout")]
    DateChanged,
    /// The payout id is known for another account.
    #[error("payout {0} was already used for another account")]
    IdempotencyConflict(String),
    /// The database failed.
    #[error("payout storage")]
    Db(#[from] DbErr),
}

impl PayoutError {
    /// Whether the payout is known to have written nothing: every refusal is
    /// decided before the commit; a database error may be the commit's own,
    /// whose answer was lost after the server committed.
    fn wrote_nothing(&self) -> bool {
        !matches!(self, PayoutError::Db(_))
    }
}

impl common::db::AsDbErr for PayoutError {
    fn as_db_err(&self) -> Option<&DbErr> {
        match self {
            PayoutError::Db(e) => Some(e),
            _ => None,
        }
    }

    /// Transient database errors, and the two races a fresh snapshot
    /// resolves: the same payout id inserted concurrently, and a payout of
    /// the account committed while this one waited for its lock.
    fn is_retryable(&self) -> bool {
        match self {
            PayoutError::PaidMeanwhile | PayoutError::DateChanged => true,
            PayoutError::Db(e) => {
                common::db::is_transient(e)
                    || common::db::is_unique_violation_of(e, "interest_payouts_pkey")
            }
            _ => false,
        }
    }
}

/// Pays out the accrued interest of `account`, idempotently by `payout_id`.
pub async fn pay(
    db: &DatabaseConnection,
    clock: &Clock,
    interest: &InterestService,
    account: &AccountId,
    payout_id: &PayoutId,
) -> Result<Payout, PayoutError> {
    // The figure each attempt computed; the last one is compared with the
    // other path once, whatever the outcome (a refused payout too).
    let shadow = std::sync::Mutex::new(None);
    // Until the payout's outcome is known, it may have committed: a COMMIT
    // whose answer was lost, or this future dropped while it waited for it
    // (the request timeout, a caller gone). Then the cached figure from
    // before it must not be served either.
    let mut unsettled = Unsettled {
        cache: interest.cache(),
        account,
        armed: true,
    };
    let payout = common::db::retry_transient(9, || {
        try_pay(db, clock, interest, account, payout_id, &shadow)
    })
    .await;
    if let Some((terms, today, accrual)) = shadow.lock().ok().and_then(|mut s| s.take()) {
        interest.spawn_shadow_check(terms, today, accrual);
    }
    let payout = match payout {
        Ok(payout) => payout,
        Err(e) if e.wrote_nothing() => {
            unsettled.armed = false;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    interest.wake_relay();
    interest
        .cache()
        .invalidate_now(std::slice::from_ref(account))
        .await;
    unsettled.armed = false;
    Ok(payout)
}

/// Invalidates an account's cached figure in the background when dropped:
/// armed while a payout's outcome is unknown (see [`pay`]), forgotten once
/// it is.
struct Unsettled<'a> {
    cache: &'a super::cache::InterestCache,
    account: &'a AccountId,
    armed: bool,
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.cache
                .invalidate_unsettled(std::slice::from_ref(self.account));
        }
    }
}

/// The payout `payout_id` of `account`, if the core made it (a payout of
/// another account is not this account's).
pub async fn find<C: ConnectionTrait>(
    conn: &C,
    account: &AccountId,
    payout_id: &PayoutId,
) -> Result<Option<Payout>, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            format!(
                "SELECT {PAYOUT_COLUMNS} FROM interest_payouts WHERE payout_id = $1 AND account_id = $2"
            ),
            [payout_id.to_string().into(), account.to_string().into()],
        ))
        .await?;
    row.as_ref().map(payout_from_row).transpose()
}

const PAYOUT_COLUMNS: &str =
    "payout_id, account_id, gross, tax, net, balance_after, seq, from_date, through_date, paid_at";

fn payout_from_row(r: &sea_orm::QueryResult) -> Result<Payout, DbErr> {
    let won = |col: &str| -> Result<Won, DbErr> {
        let d: Decimal = r.try_get("", col)?;
        Won::new(d).map_err(|e| DbErr::Custom(format!("stored {col}: {e}")))
    };
    let id: String = r.try_get("", "payout_id")?;
    let account: String = r.try_get("", "account_id")?;
    Ok(Payout {
        payout_id: PayoutId::parse(id)
            .map_err(|e| DbErr::Custom(format!("stored payout id: {e}")))?,
        account_id: AccountId::parse(account)
            .map_err(|e| DbErr::Custom(format!("stored account id: {e}")))?,
        gross: won("gross")?,
        tax: won("tax")?,
        net: won("net")?,
        balance: won("balance_after")?,
        seq: r.try_get("", "seq")?,
        from: r.try_get("", "from_date")?,
        through: r.try_get("", "through_date")?,
        paid_at: r.try_get("", "paid_at")?,
    })
}

const WRITE_SQL: &str = r#"
WITH
ins_e AS (
  INSERT INTO ledger_entries (account_id, seq, kind, amount, balance_after, occurred_at, business_date, payout_id)
  VALUES ($1, $2, 'interest', $3, $4, $5, $6, $7)
),
upd_a AS (
  UPDATE accounts SET balance = $4, last_seq = $2, interest_paid_through = $8, updated_at = $5,
                      last_business_date = GREATEST(last_business_date, $6)
  WHERE account_id = $1
),
ups_b AS (
  INSERT INTO daily_balances (account_id, business_date, closing_balance) VALUES ($1, $6, $4)
  ON CONFLICT (account_id, business_date) DO UPDATE SET closing_balance = EXCLUDED.closing_balance
),
ins_p AS (
  INSERT INTO interest_payouts (payout_id, account_id, business_date, from_date, through_date, days,
                                gross, tax, net, seq, balance_after, path, paid_at, rates)
  VALUES ($7, $1, $6, $9, $8, $10, $11, $12, $3, $2, $4, $13, $5, $18)
),
ins_o AS (
  INSERT INTO outbox (event_id, subject, payload, traceparent)
  SELECT e, s, p, NULLIF(t, '')
  FROM unnest($14::text[], $15::text[], $16::text[], $17::text[]) WITH ORDINALITY AS x(e, s, p, t, n)
  ORDER BY n
)
SELECT 1
"#;

async fn try_pay(
    db: &DatabaseConnection,
    clock: &Clock,
    interest: &InterestService,
    account: &AccountId,
    payout_id: &PayoutId,
    shadow: &std::sync::Mutex<Option<(AccountTerms, NaiveDate, Accrual)>>,
) -> Result<Payout, PayoutError> {
    let backend = db.get_database_backend();
    let today = clock.today();
    let txn = db.begin().await?;
    // The pools force custom plans (for the batch statements' arrays); these
    // statements have one shape and look rows up by key, so their cached
    // generic plans are as good, and re-planning them on every payout was
    // ~30% of PostgreSQL's CPU under payouts.
    txn.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan")
        .await?;
    // One round trip: the payout if this id is known, and the account,
    // locked (only this row), with its customer's status and whether it was
    // paid today.
    //
    // After waiting for the lock of a transaction that paid the account,
    // PostgreSQL returns the new row but reads the rest (the known id, the
    // `EXISTS`) on the statement's older snapshot. The row tells: a payout on
    // date D pays through D - 1, so `interest_paid_through = today - 1` with
    // no payout dated today in the snapshot means one committed while this
    // one waited, and the transaction is run again with a fresh snapshot.
    // Without that, a concurrent retry of the same payout id was refused
    // (`nothing_to_pay`) instead of answered with the payout.
    let row = txn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "SELECT k.*, acc.* FROM (SELECT 1) AS one \
                 LEFT JOIN LATERAL (SELECT {PAYOUT_COLUMNS} FROM interest_payouts WHERE payout_id = $3) k ON true \
                 LEFT JOIN LATERAL ( \
                   SELECT a.balance, a.last_seq, a.status, a.deposit_stopped, a.opened_on, a.interest_paid_through, \
                          COALESCE(a.last_business_date, a.opened_on) AS last_business_date, \
                          c.status AS customer_status, \
                          coalesce(a.interest_paid_through = $2::date - 1, false) AS paid_by_row, \
                          EXISTS (SELECT 1 FROM interest_payouts p WHERE p.account_id = a.account_id \
                                  AND p.business_date = $2) AS paid_today \
                   FROM accounts a JOIN customers c ON c.customer_id = a.customer_id \
                   WHERE a.account_id = $1 FOR UPDATE OF a FOR SHARE OF c) acc ON true"
            ),
            [account.to_string().into(), today.into(), payout_id.to_string().into()],
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("payout look-up returned no row".into()))?;
    // The date was read before the lock wait; a payout must not pay under a
    // date that ended while it waited (a transfer of the new date may be
    // ahead of it on this account).
    if clock.today() != today {
        return Err(PayoutError::DateChanged);
    }
    let now = clock.now();
    if row.try_get::<Option<String>>("", "payout_id")?.is_some() {
        let payout = payout_from_row(&row)?;
        txn.commit().await?;
        return if &payout.account_id == account {
            Ok(payout)
        } else {
            Err(PayoutError::IdempotencyConflict(payout_id.to_string()))
        };
    }
    if row.try_get::<Option<String>>("", "status")?.is_none() {
        return Err(PayoutError::AccountNotFound);
    }
    // Another replica, whose clock passed midnight a moment earlier, wrote
    // an entry of the next date: this one's date is about to change too.
    let last_date: Option<chrono::NaiveDate> = row.try_get("", "last_business_date")?;
    if last_date.is_some_and(|d| d > today) {
        return Err(PayoutError::DateChanged);
    }
    if row.try_get::<bool>("", "paid_by_row")? && !row.try_get::<bool>("", "paid_today")? {
        return Err(PayoutError::PaidMeanwhile);
    }
    let customer_status: String = row.try_get("", "customer_status")?;
    if let Some(s) = CustomerStatus::parse(&customer_status).filter(|s| s.is_protected()) {
        return Err(PayoutError::CustomerProtected(s.as_str()));
    }
    let status: String = row.try_get("", "status")?;
    if status != "active" {
        return Err(PayoutError::AccountNotActive);
    }
    if row.try_get::<bool>("", "deposit_stopped")? {
        return Err(PayoutError::DepositStopped);
    }
    if row.try_get::<bool>("", "paid_today")? {
        return Err(PayoutError::AlreadyPaidToday);
    }
    let terms = AccountTerms {
        account_id: account.clone(),
        opened_on: row.try_get("", "opened_on")?,
        paid_through: row.try_get("", "interest_paid_through")?,
    };
    // Read in a statement of its own, now that the lock is held: the look-up
    // above sees everything but the locked row on its older snapshot, so
    // daily balances read there would miss a write it waited for (a replica
    // whose clock is behind writing a completed day's balance). Reading them
    // there (one round trip fewer, falling back to this read when the
    // snapshot's `last_seq` was not the row's) measured no faster; see the
    // README's Performance section.
    let accrual = interest.compute_for_bucket(&txn, &terms, today).await?;
    if interest.shadow_mode()
        && let Ok(mut s) = shadow.lock()
    {
        *s = Some((terms, today, accrual.clone()));
    }
    let locked = Locked {
        account,
        payout_id,
        rates: interest.rates(),
        balance: row.try_get("", "balance")?,
        last_seq: row.try_get("", "last_seq")?,
        today,
        now,
    };
    // The shadow comparison runs once the transaction has ended (in `pay`),
    // on a task and a connection of its own: the answer neither waits for it
    // nor depends on it.
    write(txn, locked, accrual).await
}

/// A payout's account as read under its lock, and the moment it pays.
struct Locked<'a> {
    account: &'a AccountId,
    payout_id: &'a PayoutId,
    /// The rates the figure is computed under (recorded with the payout).
    rates: &'a str,
    balance: Decimal,
    last_seq: i64,
    today: NaiveDate,
    now: DateTime<Utc>,
}

/// The rest of a payout, in its transaction: the checks on the figure, the
/// entry, the payout record and the two events.
async fn write(
    txn: sea_orm::DatabaseTransaction,
    locked: Locked<'_>,
    accrual: crate::interest::Accrual,
) -> Result<Payout, PayoutError> {
    let Locked {
        account,
        payout_id,
        rates,
        balance,
        last_seq,
        today,
        now,
    } = locked;
    let backend = txn.get_database_backend();
    if accrual.days <= 0 || accrual.gross.value() <= Decimal::ZERO {
        return Err(PayoutError::NothingToPay);
    }
    let seq = last_seq + 1;
    // The bound every balance keeps (as transfers and deposits check it):
    // an event above it could not be read by the consumers.
    if balance + accrual.net.value() > Decimal::from(common::MAX_BALANCE_WON) {
        return Err(PayoutError::BalanceLimitExceeded);
    }
    let new_balance =
        Won::new(balance + accrual.net.value()).map_err(|e| DbErr::Custom(e.to_string()))?;

    let entry = LedgerEntry {
        account_id: account.clone(),
        seq,
        kind: EntryKind::Interest,
        amount: accrual.net,
        balance_after: new_balance,
        occurred_at: now,
        business_date: today,
        transfer_id: None,
        deposit_id: None,
        payout_id: Some(payout_id.clone()),
        counterparty: None,
        memo: None,
    };
    let paid = InterestPaidEvent {
        event_id: InterestPaidEvent::id_for(payout_id),
        payout_id: payout_id.clone(),
        account_id: account.clone(),
        gross: accrual.gross,
        tax: accrual.tax,
        net: accrual.net,
        from: accrual.from,
        through: accrual.through,
        paid_at: now,
    };
    let messages = [
        OutboxMessage::from_event(&LedgerEvent::from(entry)),
        OutboxMessage::from_event(&paid),
    ]
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| DbErr::Custom(format!("serializing payout events: {e}")))?;

    let values: Vec<sea_orm::Value> = vec![
        account.to_string().into(),
        seq.into(),
        accrual.net.value().into(),
        new_balance.value().into(),
        now.into(),
        today.into(),
        payout_id.to_string().into(),
        accrual.through.into(),
        accrual.from.into(),
        (accrual.days as i32).into(),
        accrual.gross.value().into(),
        accrual.tax.value().into(),
        accrual.path.as_str().into(),
        messages
            .iter()
            .map(|m| m.event_id.clone())
            .collect::<Vec<_>>()
            .into(),
        messages
            .iter()
            .map(|m| m.subject.clone())
            .collect::<Vec<_>>()
            .into(),
        messages
            .iter()
            .map(|m| m.payload.clone())
            .collect::<Vec<_>>()
            .into(),
        messages
            .iter()
            .map(|m| m.traceparent.clone().unwrap_or_default())
            .collect::<Vec<_>>()
            .into(),
        rates.into(),
    ];
    txn.execute_raw(Statement::from_sql_and_values(backend, WRITE_SQL, values))
        .await
        .map_err(|e| {
            if common::db::is_unique_violation_of(&e, "interest_payouts_once_per_day") {
                PayoutError::AlreadyPaidToday
            } else {
                PayoutError::Db(e)
            }
        })?;
    txn.commit().await?;
    metrics::counter!("interest_payouts_total").increment(1);
    Ok(Payout {
        payout_id: payout_id.clone(),
        account_id: account.clone(),
        gross: accrual.gross,
        tax: accrual.tax,
        net: accrual.net,
        balance: new_balance,
        seq,
        from: accrual.from,
        through: accrual.through,
        paid_at: now,
    })
}
