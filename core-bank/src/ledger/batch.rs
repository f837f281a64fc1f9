//! One ledger transaction over a batch of commands.
//!
//! Round trips per batch, whatever its size: `BEGIN`, one read of the known
//! transfer ids (and one of deposit ids, when the batch has deposits), one
//! `SELECT ... FOR UPDATE` of all accounts involved in account-id order, one
//! statement that writes everything (transfer and deposit records, entries,
//! balances, daily balances, outbox rows; a chain of data-modifying CTEs over
//! `unnest`ed arrays), and `COMMIT`: five for a batch of transfers.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use common::events::{EntryKind, LedgerEntry, LedgerEvent};
use common::outbox::OutboxMessage;
use common::{AccountId, Won};
use rust_decimal::Decimal;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, Statement, TransactionTrait,
};

use super::executor::{Job, LedgerConfig};
use super::queries;
use super::{
    DepositCmd, DepositRecord, LedgerError, MAX_BALANCE_WON, Refusal, Status, TransferCmd,
    TransferRecord,
};
use crate::clock::Clock;

/// A command for the ledger.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    Transfer(TransferCmd),
    Deposit(DepositCmd),
}

impl Command {
    /// The accounts the command changes.
    pub(crate) fn accounts(&self) -> impl Iterator<Item = &AccountId> {
        let (first, second) = match self {
            Command::Transfer(c) => (&c.from_account, Some(&c.to_account)),
            Command::Deposit(c) => (&c.to_account, None),
        };
        std::iter::once(first).chain(second)
    }
}

/// The commands of a batch the ledger has recorded already (retries of
/// answered commands), by id: their answer is the record, and needs no
/// account's lock.
#[derive(Debug, Default)]
pub(crate) struct Known {
    transfers: HashMap<String, TransferRecord>,
    deposits: HashMap<String, DepositRecord>,
}

impl Known {
    /// Reads the records of `jobs`' ids (committed ones, or this
    /// transaction's when `conn` is one).
    pub(crate) async fn load<C: ConnectionTrait>(conn: &C, jobs: &[Job]) -> Result<Self, DbErr> {
        let mut transfer_ids = Vec::new();
        let mut deposit_ids = Vec::new();
        for job in jobs {
            match &job.cmd {
                Command::Transfer(c) => transfer_ids.push(c.transfer_id.to_string()),
                Command::Deposit(c) => deposit_ids.push(c.deposit_id.to_string()),
            }
        }
        let transfers = if transfer_ids.is_empty() {
            HashMap::new()
        } else {
            queries::load_transfers(conn, transfer_ids).await?
        };
        let deposits = if deposit_ids.is_empty() {
            HashMap::new()
        } else {
            queries::load_deposits(conn, deposit_ids).await?
        };
        Ok(Self {
            transfers,
            deposits,
        })
    }

    /// Whether `cmd`'s id is recorded.
    pub(crate) fn has(&self, cmd: &Command) -> bool {
        match cmd {
            Command::Transfer(c) => self.transfers.contains_key(c.transfer_id.as_str()),
            Command::Deposit(c) => self.deposits.contains_key(c.deposit_id.as_str()),
        }
    }
}

/// The result of one command.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Transfer(TransferRecord),
    Deposit(DepositRecord),
}

/// Why a batch transaction failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchError {
    #[error("ledger transaction")]
    Db(#[from] DbErr),
    /// Another transaction inserted one of the batch's ids first; the retry
    /// will see it and replay it.
    #[error("a concurrent request inserted the same id first")]
    Race,
}

impl BatchError {
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            BatchError::Race => true,
            BatchError::Db(e) => common::db::is_transient(e),
        }
    }

    /// True when the failure may be one command's (its data refused, a
    /// stored row that does not read back), so that running each command
    /// alone isolates it; false for what retries are for (a race, a lock
    /// timeout, a deadlock, a lost connection: spent when this is asked) and
    /// for a failure of the database as a whole (read-only, a statement timed
    /// out), which every command run alone would meet again.
    pub(crate) fn may_be_one_commands(&self) -> bool {
        match self {
            BatchError::Race => false,
            BatchError::Db(e) => !common::db::is_transient(e) && !common::db::is_systemic(e),
        }
    }

    /// True when an account lock was not granted within `lock_timeout`:
    /// another transaction holds a row the batch needs.
    pub(crate) fn is_lock_timeout(&self) -> bool {
        match self {
            BatchError::Db(e) => common::db::is_lock_timeout(e),
            BatchError::Race => false,
        }
    }
}

/// Time spent in each phase of a batch transaction, recorded as
/// `ledger_phase_duration_seconds{phase}` (where a slow batch spends its time).
struct Phases(std::time::Instant);

impl Phases {
    fn start() -> Self {
        Self(std::time::Instant::now())
    }

    fn mark(&mut self, phase: &'static str) {
        metrics::histogram!("ledger_phase_duration_seconds", "phase" => phase)
            .record(self.0.elapsed().as_secs_f64());
        self.0 = std::time::Instant::now();
    }
}

/// What a committed batch did.
pub(crate) struct BatchOutput {
    /// Each command's answer, in the batch's order.
    pub outcomes: Vec<Result<Outcome, LedgerError>>,
    /// The accounts whose balance changed.
    pub touched: Vec<AccountId>,
    /// The accounts the transaction locked.
    pub locked: Vec<AccountId>,
}

struct AccountState {
    id: AccountId,
    balance: Decimal,
    last_seq: i64,
    active: bool,
    deposit_stopped: bool,
    withdrawal_stopped: bool,
    /// The business date of the account's last entry (or of its opening).
    last_business_date: Option<NaiveDate>,
    changed: bool,
}

/// What each command of the batch turns into before the writes.
enum Plan {
    Done(Box<Result<Outcome, LedgerError>>),
    Execute,
    SameAsEarlier(usize),
}

/// Column arrays of everything the batch writes.
#[derive(Default)]
struct Writes {
    t_id: Vec<String>,
    t_from: Vec<String>,
    t_to: Vec<String>,
    t_amount: Vec<Decimal>,
    t_memo: Vec<String>,
    t_requested: Vec<DateTime<Utc>>,
    t_status: Vec<String>,
    t_reason: Vec<String>,
    t_from_seq: Vec<i64>,
    t_to_seq: Vec<i64>,
    t_completed: Vec<DateTime<Utc>>,
    d_id: Vec<String>,
    d_to: Vec<String>,
    d_amount: Vec<Decimal>,
    d_bank: Vec<String>,
    d_name: Vec<String>,
    d_status: Vec<String>,
    d_reason: Vec<String>,
    d_seq: Vec<i64>,
    d_balance: Vec<Decimal>,
    d_completed: Vec<DateTime<Utc>>,
    e_account: Vec<String>,
    e_seq: Vec<i64>,
    e_kind: Vec<String>,
    e_amount: Vec<Decimal>,
    e_balance: Vec<Decimal>,
    e_transfer: Vec<String>,
    e_deposit: Vec<String>,
    e_counterparty: Vec<String>,
    e_memo: Vec<String>,
    outbox: Vec<OutboxMessage>,
}

impl Writes {
    fn is_empty(&self) -> bool {
        self.t_id.is_empty() && self.d_id.is_empty()
    }

    fn transfer(&mut self, rec: &TransferRecord) {
        let Some(req) = &rec.request else { return };
        self.t_id.push(rec.transfer_id.to_string());
        self.t_from.push(req.from_account.to_string());
        self.t_to.push(req.to_account.to_string());
        self.t_amount.push(req.amount.value());
        self.t_memo.push(req.memo.clone().unwrap_or_default());
        self.t_requested.push(req.requested_at);
        self.t_status.push(rec.status.as_str().to_owned());
        self.t_reason.push(rec.reason.clone().unwrap_or_default());
        self.t_from_seq.push(rec.from_seq.unwrap_or(0));
        self.t_to_seq.push(rec.to_seq.unwrap_or(0));
        self.t_completed.push(rec.completed_at);
    }

    fn deposit(&mut self, rec: &DepositRecord) {
        let req = &rec.request;
        self.d_id.push(req.deposit_id.to_string());
        self.d_to.push(req.to_account.to_string());
        self.d_amount.push(req.amount.value());
        self.d_bank.push(req.sender_bank.clone());
        self.d_name.push(req.sender_name.clone());
        self.d_status.push(rec.status.as_str().to_owned());
        self.d_reason.push(rec.reason.clone().unwrap_or_default());
        self.d_seq.push(rec.seq.unwrap_or(0));
        self.d_balance
            .push(rec.balance_after.map_or(Decimal::NEGATIVE_ONE, Won::value));
        self.d_completed.push(rec.completed_at);
    }

    fn entry(&mut self, entry: LedgerEntry, traceparent: &Option<String>) -> Result<(), DbErr> {
        self.e_account.push(entry.account_id.to_string());
        self.e_seq.push(entry.seq);
        self.e_kind.push(entry.kind.as_str().to_owned());
        self.e_amount.push(entry.amount.value());
        self.e_balance.push(entry.balance_after.value());
        self.e_transfer.push(
            entry
                .transfer_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        self.e_deposit.push(
            entry
                .deposit_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        self.e_counterparty
            .push(entry.counterparty.clone().unwrap_or_default());
        self.e_memo.push(entry.memo.clone().unwrap_or_default());
        let mut msg = OutboxMessage::from_event(&LedgerEvent::from(entry))
            .map_err(|e| DbErr::Custom(format!("serializing ledger event: {e}")))?;
        msg.traceparent = traceparent.clone();
        self.outbox.push(msg);
        Ok(())
    }
}

/// Runs one batch in one transaction. On error nothing was committed.
pub(crate) async fn run_batch(
    db: &DatabaseConnection,
    clock: &Clock,
    cfg: &LedgerConfig,
    jobs: &[Job],
) -> Result<BatchOutput, BatchError> {
    let mut phases = Phases::start();
    let txn = db.begin().await?;
    phases.mark("begin");
    // Any failure after `BEGIN` rolls back at once (see `roll_back_now`).
    let (outputs, accounts) = match decide_and_write(&txn, clock, cfg, jobs, &mut phases).await {
        Ok(decided) => decided,
        Err(e) => {
            roll_back_now(txn).await;
            return Err(e);
        }
    };
    txn.commit().await?;
    phases.mark("commit");

    for out in &outputs {
        let label = match out {
            Ok(Outcome::Transfer(r)) => r.reason.clone().unwrap_or_else(|| "succeeded".to_owned()),
            Ok(Outcome::Deposit(r)) => r.reason.clone().unwrap_or_else(|| "succeeded".to_owned()),
            Err(LedgerError::IdempotencyConflict { .. }) => "idempotency_conflict".to_owned(),
            Err(_) => "error".to_owned(),
        };
        metrics::counter!("core_ledger_commands_total", "result" => label).increment(1);
    }
    let touched = accounts
        .iter()
        .filter(|a| a.changed)
        .map(|a| a.id.clone())
        .collect();
    Ok(BatchOutput {
        outcomes: outputs,
        touched,
        locked: accounts.into_iter().map(|a| a.id).collect(),
    })
}

/// The batch's work inside its transaction: reads the known ids, locks the
/// accounts, decides each command and writes the results; each command's
/// answer and the locked accounts as they end up.
async fn decide_and_write(
    txn: &DatabaseTransaction,
    clock: &Clock,
    cfg: &LedgerConfig,
    jobs: &[Job],
    phases: &mut Phases,
) -> Result<(Vec<Result<Outcome, LedgerError>>, Vec<AccountState>), BatchError> {
    let known = Known::load(txn, jobs).await?;

    phases.mark("read_known_ids");
    // Decide what needs the accounts, and which accounts.
    let mut plans = Vec::with_capacity(jobs.len());
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    let mut needed: BTreeSet<String> = BTreeSet::new();
    for (i, job) in jobs.iter().enumerate() {
        let plan = match &job.cmd {
            Command::Transfer(c) => {
                let key = format!("t:{}", c.transfer_id);
                if let Some(known) = known.transfers.get(c.transfer_id.as_str()) {
                    Plan::Done(Box::new(replay_transfer(known, c).map(Outcome::Transfer)))
                } else if let Some(&j) = first_seen.get(&key) {
                    Plan::SameAsEarlier(j)
                } else {
                    first_seen.insert(key, i);
                    needed.insert(c.from_account.to_string());
                    needed.insert(c.to_account.to_string());
                    Plan::Execute
                }
            }
            Command::Deposit(c) => {
                let key = format!("d:{}", c.deposit_id);
                if let Some(known) = known.deposits.get(c.deposit_id.as_str()) {
                    Plan::Done(Box::new(replay_deposit(known, c).map(Outcome::Deposit)))
                } else if let Some(&j) = first_seen.get(&key) {
                    Plan::SameAsEarlier(j)
                } else {
                    first_seen.insert(key, i);
                    needed.insert(c.to_account.to_string());
                    Plan::Execute
                }
            }
        };
        plans.push(plan);
    }

    let mut accounts = if needed.is_empty() {
        Vec::new()
    } else {
        lock_accounts(txn, needed.into_iter().collect()).await?
    };
    phases.mark("lock_accounts");
    // The time and business date are read once the rows are locked, not
    // before the wait: a request that expired while waiting is refused
    // (B5), and entries written after a date change, behind a payout of the
    // new date, carry the new date.
    let now = clock.now();
    // Never before an entry already written on these accounts: another
    // replica whose clock passed midnight a moment earlier may have written
    // one under the next date, and an account's dates must not go back (the
    // daily closing balances would be overwritten out of order).
    let today = accounts
        .iter()
        .filter_map(|a| a.last_business_date)
        .fold(clock.today(), std::cmp::max);
    let index: HashMap<String, usize> = accounts
        .iter()
        .enumerate()
        .map(|(i, a)| (a.id.to_string(), i))
        .collect();

    let mut writes = Writes::default();
    let mut results: Vec<Option<Result<Outcome, LedgerError>>> = Vec::with_capacity(jobs.len());
    let mut copies: Vec<(usize, usize)> = Vec::new();
    for (i, (job, plan)) in jobs.iter().zip(plans).enumerate() {
        let result = match plan {
            Plan::Done(r) => Some(*r),
            Plan::SameAsEarlier(j) => {
                copies.push((i, j));
                None
            }
            Plan::Execute => Some(match &job.cmd {
                Command::Transfer(c) => {
                    let rec = execute_transfer(
                        c,
                        &mut accounts,
                        &index,
                        cfg,
                        now,
                        today,
                        &job.traceparent,
                        &mut writes,
                    )?;
                    writes.transfer(&rec);
                    Ok(Outcome::Transfer(rec))
                }
                Command::Deposit(c) => {
                    let rec = execute_deposit(
                        c,
                        &mut accounts,
                        &index,
                        now,
                        today,
                        &job.traceparent,
                        &mut writes,
                    )?;
                    writes.deposit(&rec);
                    Ok(Outcome::Deposit(rec))
                }
            }),
        };
        results.push(result);
    }
    // A later copy of an id inside the batch is answered like a replay of the
    // first copy (same answer, or a conflict if the bodies differ).
    for (i, j) in copies {
        let answer = match (&results[j], &jobs[i].cmd) {
            (Some(Ok(Outcome::Transfer(first))), Command::Transfer(c)) => {
                replay_transfer(first, c).map(Outcome::Transfer)
            }
            (Some(Ok(Outcome::Deposit(first))), Command::Deposit(c)) => {
                replay_deposit(first, c).map(Outcome::Deposit)
            }
            _ => Err(LedgerError::Db(DbErr::Custom(
                "batch copy without a first result".to_owned(),
            ))),
        };
        results[i] = Some(answer);
    }
    let outputs: Vec<Result<Outcome, LedgerError>> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(LedgerError::Db(DbErr::Custom(
                    "unanswered command".to_owned(),
                )))
            })
        })
        .collect();

    phases.mark("decide");
    if !writes.is_empty() {
        write_all(txn, &writes, &accounts, now, today).await?;
    }
    phases.mark("write");
    Ok((outputs, accounts))
}

/// Ends a failed batch's transaction now, not when the dropped transaction's
/// connection goes back to the pool: after a lock timeout the executor asks
/// which accounts are held, and the rows this transaction locked must not
/// look held.
async fn roll_back_now(txn: DatabaseTransaction) {
    if let Err(e) = txn.rollback().await {
        tracing::debug!(error = %e, "rolling back a ledger batch");
    }
}

#[allow(clippy::too_many_arguments)]
fn execute_transfer(
    c: &TransferCmd,
    accounts: &mut [AccountState],
    index: &HashMap<String, usize>,
    cfg: &LedgerConfig,
    now: DateTime<Utc>,
    today: NaiveDate,
    traceparent: &Option<String>,
    writes: &mut Writes,
) -> Result<TransferRecord, DbErr> {
    let refused = |r: Refusal| TransferRecord {
        transfer_id: c.transfer_id.clone(),
        request: Some(c.clone()),
        status: Status::Failed,
        reason: Some(r.code().to_owned()),
        from_seq: None,
        to_seq: None,
        fenced: false,
        completed_at: now,
    };
    if c.from_account == c.to_account {
        return Ok(refused(Refusal::SameAccount));
    }
    let age = now.signed_duration_since(c.requested_at);
    if age.num_milliseconds() > cfg.request_ttl.as_millis() as i64 {
        return Ok(refused(Refusal::RequestExpired));
    }
    let (Some(&fi), Some(&ti)) = (
        index.get(c.from_account.as_str()),
        index.get(c.to_account.as_str()),
    ) else {
        return Ok(refused(Refusal::AccountNotFound));
    };
    let amount = c.amount.value();
    {
        let (from, to) = (&accounts[fi], &accounts[ti]);
        if !from.active || !to.active {
            return Ok(refused(Refusal::AccountNotActive));
        }
        if from.withdrawal_stopped {
            return Ok(refused(Refusal::WithdrawalStopped));
        }
        if to.deposit_stopped {
            return Ok(refused(Refusal::DepositStopped));
        }
        if from.balance < amount {
            return Ok(refused(Refusal::InsufficientFunds));
        }
        if to.balance + amount > Decimal::from(MAX_BALANCE_WON) {
            return Ok(refused(Refusal::BalanceLimitExceeded));
        }
    }
    let from_seq = debit_or_credit(&mut accounts[fi], -amount);
    let from_balance = accounts[fi].balance;
    let to_seq = debit_or_credit(&mut accounts[ti], amount);
    let to_balance = accounts[ti].balance;
    let base = |account: &AccountId, seq, kind, amount, balance, other: &AccountId| LedgerEntry {
        account_id: account.clone(),
        seq,
        kind,
        amount: Won::new(amount).unwrap_or_default(),
        balance_after: Won::new(balance).unwrap_or_default(),
        occurred_at: now,
        business_date: today,
        transfer_id: Some(c.transfer_id.clone()),
        deposit_id: None,
        payout_id: None,
        counterparty: Some(other.to_string()),
        memo: c.memo.clone(),
    };
    writes.entry(
        base(
            &c.from_account,
            from_seq,
            EntryKind::TransferOut,
            -amount,
            from_balance,
            &c.to_account,
        ),
        traceparent,
    )?;
    writes.entry(
        base(
            &c.to_account,
            to_seq,
            EntryKind::TransferIn,
            amount,
            to_balance,
            &c.from_account,
        ),
        traceparent,
    )?;
    Ok(TransferRecord {
        transfer_id: c.transfer_id.clone(),
        request: Some(c.clone()),
        status: Status::Succeeded,
        reason: None,
        from_seq: Some(from_seq),
        to_seq: Some(to_seq),
        fenced: false,
        completed_at: now,
    })
}

fn execute_deposit(
    c: &DepositCmd,
    accounts: &mut [AccountState],
    index: &HashMap<String, usize>,
    now: DateTime<Utc>,
    today: NaiveDate,
    traceparent: &Option<String>,
    writes: &mut Writes,
) -> Result<DepositRecord, DbErr> {
    let refused = |r: Refusal| DepositRecord {
        request: c.clone(),
        status: Status::Failed,
        reason: Some(r.code().to_owned()),
        seq: None,
        balance_after: None,
        completed_at: now,
    };
    let Some(&ti) = index.get(c.to_account.as_str()) else {
        return Ok(refused(Refusal::AccountNotFound));
    };
    let amount = c.amount.value();
    {
        let to = &accounts[ti];
        if !to.active {
            return Ok(refused(Refusal::AccountNotActive));
        }
        if to.deposit_stopped {
            return Ok(refused(Refusal::DepositStopped));
        }
        if to.balance + amount > Decimal::from(MAX_BALANCE_WON) {
            return Ok(refused(Refusal::BalanceLimitExceeded));
        }
    }
    let seq = debit_or_credit(&mut accounts[ti], amount);
    let balance = Won::new(accounts[ti].balance).unwrap_or_default();
    writes.entry(
        LedgerEntry {
            account_id: c.to_account.clone(),
            seq,
            kind: EntryKind::Deposit,
            amount: c.amount.into(),
            balance_after: balance,
            occurred_at: now,
            business_date: today,
            transfer_id: None,
            deposit_id: Some(c.deposit_id.clone()),
            payout_id: None,
            counterparty: Some(format!("{} / {}", c.sender_bank, c.sender_name)),
            memo: None,
        },
        traceparent,
    )?;
    Ok(DepositRecord {
        request: c.clone(),
        status: Status::Succeeded,
        reason: None,
        seq: Some(seq),
        balance_after: Some(balance),
        completed_at: now,
    })
}

/// Applies a signed change to an account in memory and returns its new seq.
fn debit_or_credit(account: &mut AccountState, delta: Decimal) -> i64 {
    account.balance += delta;
    account.last_seq += 1;
    account.changed = true;
    account.last_seq
}

/// A known transfer id: same request, same answer; a different request is a
/// conflict, naming the first differing field.
fn replay_transfer(known: &TransferRecord, c: &TransferCmd) -> Result<TransferRecord, LedgerError> {
    let Some(req) = &known.request else {
        // A fence: the answer for any request with this id.
        return Ok(known.clone());
    };
    let field = if req.from_account != c.from_account {
        Some("from_account")
    } else if req.to_account != c.to_account {
        Some("to_account")
    } else if req.amount != c.amount {
        Some("amount")
    } else if req.memo != c.memo {
        Some("memo")
    } else if req.requested_at != c.requested_at {
        Some("requested_at")
    } else {
        None
    };
    match field {
        Some(field) => Err(LedgerError::IdempotencyConflict {
            kind: "transfer",
            id: c.transfer_id.to_string(),
            field,
        }),
        None => Ok(known.clone()),
    }
}

fn replay_deposit(known: &DepositRecord, c: &DepositCmd) -> Result<DepositRecord, LedgerError> {
    let req = &known.request;
    let field = if req.to_account != c.to_account {
        Some("to_account")
    } else if req.amount != c.amount {
        Some("amount")
    } else if req.sender_bank != c.sender_bank {
        Some("sender_bank")
    } else if req.sender_name != c.sender_name {
        Some("sender_name")
    } else {
        None
    };
    match field {
        Some(field) => Err(LedgerError::IdempotencyConflict {
            kind: "deposit",
            id: c.deposit_id.to_string(),
            field,
        }),
        None => Ok(known.clone()),
    }
}

async fn lock_accounts(
    txn: &DatabaseTransaction,
    ids: Vec<String>,
) -> Result<Vec<AccountState>, DbErr> {
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "SELECT account_id, balance, last_seq, status, deposit_stopped, withdrawal_stopped, \
                    COALESCE(last_business_date, opened_on) AS last_business_date \
             FROM accounts WHERE account_id = ANY($1) ORDER BY account_id FOR UPDATE",
            [ids.into()],
        ))
        .await?;
    rows.into_iter()
        .map(|r| {
            let id: String = r.try_get("", "account_id")?;
            let status: String = r.try_get("", "status")?;
            Ok(AccountState {
                id: AccountId::parse(id)
                    .map_err(|e| DbErr::Custom(format!("stored account id: {e}")))?,
                balance: r.try_get("", "balance")?,
                last_seq: r.try_get("", "last_seq")?,
                active: status == "active",
                deposit_stopped: r.try_get("", "deposit_stopped")?,
                withdrawal_stopped: r.try_get("", "withdrawal_stopped")?,
                last_business_date: r.try_get("", "last_business_date")?,
                changed: false,
            })
        })
        .collect()
}

const WRITE_SQL: &str = r#"
WITH
ins_t AS (
  INSERT INTO transfers (transfer_id, from_account, to_account, amount, memo, requested_at,
                         status, reason, from_seq, to_seq, completed_at)
  SELECT id, f, t, a, NULLIF(m, ''), r, s, NULLIF(rs, ''), NULLIF(fs, 0), NULLIF(ts, 0), c
  FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[], $5::text[], $6::timestamptz[],
              $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::timestamptz[])
       AS x(id, f, t, a, m, r, s, rs, fs, ts, c)
),
ins_d AS (
  INSERT INTO deposits (deposit_id, to_account, amount, sender_bank, sender_name, status, reason,
                        seq, balance_after, completed_at)
  SELECT id, t, a, b, n, s, NULLIF(rs, ''), NULLIF(q, 0), NULLIF(ba, -1), c
  FROM unnest($12::text[], $13::text[], $14::numeric[], $15::text[], $16::text[], $17::text[],
              $18::text[], $19::bigint[], $20::numeric[], $21::timestamptz[])
       AS x(id, t, a, b, n, s, rs, q, ba, c)
),
ins_e AS (
  INSERT INTO ledger_entries (account_id, seq, kind, amount, balance_after, occurred_at, business_date,
                              transfer_id, deposit_id, counterparty, memo)
  SELECT acc, q, k, a, ba, $27::timestamptz, $28::date, NULLIF(tid, ''), NULLIF(did, ''), NULLIF(cp, ''), NULLIF(m, '')
  FROM unnest($22::text[], $23::bigint[], $24::text[], $25::numeric[], $26::numeric[],
              $29::text[], $30::text[], $31::text[], $32::text[])
       AS x(acc, q, k, a, ba, tid, did, cp, m)
),
upd_a AS (
  UPDATE accounts SET balance = x.b, last_seq = x.q, updated_at = $27::timestamptz,
                      last_business_date = GREATEST(accounts.last_business_date, $28::date)
  FROM unnest($33::text[], $34::numeric[], $35::bigint[]) AS x(id, b, q)
  WHERE accounts.account_id = x.id
),
ups_b AS (
  INSERT INTO daily_balances (account_id, business_date, closing_balance)
  SELECT id, $28::date, b FROM unnest($33::text[], $34::numeric[]) AS x(id, b)
  ON CONFLICT (account_id, business_date) DO UPDATE SET closing_balance = EXCLUDED.closing_balance
),
ins_o AS (
  INSERT INTO outbox (event_id, subject, payload, traceparent)
  SELECT e, s, p, NULLIF(tp, '')
  FROM unnest($36::text[], $37::text[], $38::text[], $39::text[]) WITH ORDINALITY AS x(e, s, p, tp, n)
  ORDER BY n
)
SELECT 1
"#;

async fn write_all(
    txn: &DatabaseTransaction,
    w: &Writes,
    accounts: &[AccountState],
    now: DateTime<Utc>,
    today: NaiveDate,
) -> Result<(), BatchError> {
    let changed: Vec<&AccountState> = accounts.iter().filter(|a| a.changed).collect();
    let (mut o_id, mut o_subject, mut o_payload, mut o_trace) = (vec![], vec![], vec![], vec![]);
    for m in &w.outbox {
        o_id.push(m.event_id.clone());
        o_subject.push(m.subject.clone());
        o_payload.push(m.payload.clone());
        o_trace.push(m.traceparent.clone().unwrap_or_default());
    }
    let values: Vec<sea_orm::Value> = vec![
        w.t_id.clone().into(),
        w.t_from.clone().into(),
        w.t_to.clone().into(),
        w.t_amount.clone().into(),
        w.t_memo.clone().into(),
        w.t_requested.clone().into(),
        w.t_status.clone().into(),
        w.t_reason.clone().into(),
        w.t_from_seq.clone().into(),
        w.t_to_seq.clone().into(),
        w.t_completed.clone().into(),
        w.d_id.clone().into(),
        w.d_to.clone().into(),
        w.d_amount.clone().into(),
        w.d_bank.clone().into(),
        w.d_name.clone().into(),
        w.d_status.clone().into(),
        w.d_reason.clone().into(),
        w.d_seq.clone().into(),
        w.d_balance.clone().into(),
        w.d_completed.clone().into(),
        w.e_account.clone().into(),
        w.e_seq.clone().into(),
        w.e_kind.clone().into(),
        w.e_amount.clone().into(),
        w.e_balance.clone().into(),
        now.into(),
        today.into(),
        w.e_transfer.clone().into(),
        w.e_deposit.clone().into(),
        w.e_counterparty.clone().into(),
        w.e_memo.clone().into(),
        changed
            .iter()
            .map(|a| a.id.to_string())
            .collect::<Vec<_>>()
            .into(),
        changed.iter().map(|a| a.balance).collect::<Vec<_>>().into(),
        changed
            .iter()
            .map(|a| a.last_seq)
            .collect::<Vec<_>>()
            .into(),
        o_id.into(),
        o_subject.into(),
        o_payload.into(),
        o_trace.into(),
    ];
    let res = txn
        .execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            WRITE_SQL,
            values,
        ))
        .await;
    match res {
        Ok(_) => Ok(()),
        Err(e)
            if common::db::is_unique_violation_of(&e, "transfers_pkey")
                || common::db::is_unique_violation_of(&e, "deposits_pkey") =>
        {
            Err(BatchError::Race)
        }
        Err(e) => Err(BatchError::Db(e)),
    }
}
