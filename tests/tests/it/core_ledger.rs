//! The core ledger: B1-B8, B12, and the core side of B30/B31.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bank_tests::apps::{CORE_READ_TOKEN, CORE_TOKEN, CoreOptions, core, core_with};
use bank_tests::client::transfer_body;
use bank_tests::db::RowLock;
use bank_tests::nats::stream_messages;
use bank_tests::{Api, CoreApp, NatsServer, eventually, unique};
use futures::future::join_all;
use proptest::prelude::*;
use serde_json::{Value, json};

fn amount(v: &Value) -> i128 {
    v.as_str().unwrap().parse().unwrap()
}

/// Seqs are 1..=n without gaps and every balance_after follows from the previous one.
fn assert_chain(entries: &[Value], final_balance: i128) {
    let mut balance = 0i128;
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            e["seq"].as_i64().unwrap(),
            i as i64 + 1,
            "gap or duplicate at {e}"
        );
        balance += amount(&e["amount"]);
        assert_eq!(
            amount(&e["balance_after"]),
            balance,
            "balance_after does not chain at {e}"
        );
    }
    assert_eq!(balance, final_balance, "entries do not sum to the balance");
}

#[tokio::test]
async fn b01_concurrent_writers_on_one_account_leave_gap_free_seqs() {
    let (_nats, core) = core().await;
    let hot = core.api.funded_account(0).await;
    let source = core.api.funded_account(1_000_000).await;
    let writers = (0..32).map(|i| {
        let api = core.api.clone();
        let (hot, source) = (hot.clone(), source.clone());
        async move {
            if i % 2 == 0 {
                api.deposit(&hot, 1000 + i).await.expect(200);
            } else {
                api.core_transfer(&source, &hot, 10 + i).await.expect(200);
            }
        }
    });
    join_all(writers).await;
    let entries = core.api.all_entries(&hot).await;
    assert_eq!(entries.len(), 32);
    let balance = core.api.balance(&hot).await;
    assert_chain(&entries, balance);
    let expected: i128 = (0..32u64)
        .map(|i| if i % 2 == 0 { 1000 + i } else { 10 + i } as i128)
        .sum();
    assert_eq!(balance, expected);
    let account = core
        .api
        .get(&format!("/v1/accounts/{hot}"))
        .await
        .expect(200);
    assert_eq!(account.body["last_seq"], 32);
}

#[derive(Debug, Clone)]
enum Op {
    Deposit { to: usize, amount: u64 },
    Transfer { from: usize, to: usize, amount: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4usize, 1..1_000u64).prop_map(|(to, amount)| Op::Deposit { to, amount }),
        (0..4usize, 0..4usize, 1..2_000u64).prop_map(|(from, to, amount)| Op::Transfer {
            from,
            to,
            amount
        }),
    ]
}

async fn check_conservation(api: &Api, ops: Vec<Op>) -> Result<(), String> {
    let mut accounts = Vec::new();
    for _ in 0..4 {
        accounts.push(api.funded_account(0).await);
    }
    let results = join_all(ops.iter().map(|op| {
        let api = api.clone();
        let accounts = accounts.clone();
        let op = op.clone();
        async move {
            match op {
                Op::Deposit { to, amount } => {
                    (None, api.deposit(&accounts[to], amount).await, amount)
                }
                Op::Transfer { from, to, amount } => {
                    let id = unique("trf_");
                    let r = api
                        .post(
                            "/v1/transfers",
                            transfer_body(&id, &accounts[from], &accounts[to], amount),
                        )
                        .await;
                    (Some(id), r, amount)
                }
            }
        }
    }))
    .await;
    let mut deposited = 0i128;
    let mut refused = HashSet::new();
    for (id, reply, amount) in &results {
        match (id, reply.status) {
            (None, 200) => deposited += *amount as i128,
            (Some(_), 200) => {}
            (Some(id), 422) => {
                refused.insert(id.clone());
            }
            (_, s) => return Err(format!("unexpected answer {s}: {}", reply.body)),
        }
    }
    let mut total = 0i128;
    for a in &accounts {
        let balance = api.balance(a).await;
        if balance < 0 {
            return Err(format!("negative balance {balance}"));
        }
        let entries = api.all_entries(a).await;
        let mut sum = 0i128;
        for (i, e) in entries.iter().enumerate() {
            if e["seq"].as_i64() != Some(i as i64 + 1) {
                return Err(format!("gap in {a} at {e}"));
            }
            sum += amount(&e["amount"]);
            if let Some(t) = e["transfer_id"].as_str()
                && refused.contains(t)
            {
                return Err(format!("refused transfer {t} has an entry"));
            }
        }
        if sum != balance {
            return Err(format!("{a}: entries sum {sum} but balance {balance}"));
        }
        total += balance;
    }
    if total != deposited {
        return Err(format!(
            "money not conserved: balances {total}, deposits {deposited}"
        ));
    }
    Ok(())
}

#[test]
fn b02_random_concurrent_movements_conserve_money_and_keep_entries_consistent() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_nats, core) = rt.block_on(core());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 1..40), |ops| {
            rt.block_on(check_conservation(&core.api, ops))
                .map_err(proptest::test_runner::TestCaseError::fail)
        })
        .unwrap();
}

/// Both entries or neither: the database refuses the credit side (a
/// trigger, the fault) after the debit side was written in the same
/// transaction. The transfer fails as a whole, nothing of it stays, and
/// the same transfer goes through once the fault is gone.
#[tokio::test]
async fn b02_a_transfer_whose_credit_cannot_be_written_leaves_no_debit_behind() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let from = api.funded_account(1000).await;
    let to = api.funded_account(0).await;
    let db = sea_orm::Database::connect(core.db_url.as_str())
        .await
        .unwrap();
    use sea_orm::ConnectionTrait;
    db.execute_unprepared(&format!(
        "CREATE FUNCTION refuse_credit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected fault: no credit to %', NEW.account_id; END $$;
         CREATE TRIGGER refuse_credit BEFORE INSERT ON ledger_entries FOR EACH ROW
         WHEN (NEW.account_id = '{to}') EXECUTE FUNCTION refuse_credit();"
    ))
    .await
    .unwrap();
    let id = unique("trf_");
    let r = api
        .post("/v1/transfers", transfer_body(&id, &from, &to, 100))
        .await;
    assert!(
        r.status >= 500,
        "the transfer failed: {} {}",
        r.status,
        r.body
    );
    assert_eq!(api.balance(&from).await, 1000, "no debit");
    assert_eq!(api.balance(&to).await, 0, "no credit");
    assert_eq!(api.all_entries(&from).await.len(), 1, "only the funding");
    assert!(api.all_entries(&to).await.is_empty());
    let events_of = |id: String| {
        let url = core.db_url.clone();
        async move {
            bank_tests::db::query_strings(
                &url,
                &format!("SELECT count(*)::text FROM outbox WHERE payload LIKE '%{id}%'"),
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(events_of(id.clone()).await, ["0"], "no event of it");
    db.execute_unprepared("DROP TRIGGER refuse_credit ON ledger_entries")
        .await
        .unwrap();
    api.post("/v1/transfers", transfer_body(&id, &from, &to, 100))
        .await
        .expect(200);
    assert_eq!(api.balance(&from).await, 900);
    assert_eq!(api.balance(&to).await, 100);
    assert_eq!(
        events_of(id).await,
        ["2"],
        "one event per entry, once it went through"
    );
}

#[tokio::test]
async fn b03_seed_example_concurrent_credit_and_deposit_end_at_500() {
    let (_nats, core) = core().await;
    for _ in 0..3 {
        let account = core.api.funded_account(100).await;
        let other = core.api.funded_account(100).await;
        // Both are in flight at once, for certain: another session holds the
        // account's row until the credit and the deposit both wait for it
        // (each on a worker of its own; had they come in one batch, one
        // transaction would wait), and then lets them go together.
        let lock = RowLock::account(&core.db_url, &account).await.unwrap();
        let api = core.api.clone();
        let (from, to) = (other.clone(), account.clone());
        let credit = tokio::spawn(async move { api.core_transfer(&from, &to, 100).await });
        lock.until_blocked(1, "the credit waits for the account")
            .await;
        let api = core.api.clone();
        let to = account.clone();
        let deposit = tokio::spawn(async move { api.deposit(&to, 300).await });
        lock.until_blocked(2, "the deposit waits for the account too")
            .await;
        lock.release().await.unwrap();
        credit.await.unwrap().expect(200);
        deposit.await.unwrap().expect(200);
        assert_eq!(core.api.balance(&account).await, 500);
        assert_chain(&core.api.all_entries(&account).await, 500);
    }
}

#[tokio::test]
async fn b03_concurrent_transfers_back_and_forth_never_surface_lock_errors() {
    let (_nats, core) = core().await;
    let mut accounts = Vec::new();
    for _ in 0..4 {
        accounts.push(core.api.funded_account(100_000).await);
    }
    let transfers = (0..64).map(|i| {
        let api = core.api.clone();
        let from = accounts[i % 4].clone();
        let to = accounts[(i * 3 + 1) % 4].clone();
        async move { api.core_transfer(&from, &to, 100 + i as u64).await }
    });
    for r in join_all(transfers).await {
        assert!(
            r.status == 200 || r.code() == Some("same_account"),
            "{} {}",
            r.status,
            r.body
        );
    }
    let mut total = 0;
    for a in &accounts {
        let balance = core.api.balance(a).await;
        assert_chain(&core.api.all_entries(a).await, balance);
        total += balance;
    }
    assert_eq!(total, 400_000);
    // Locks taken in one order: PostgreSQL detected no deadlock (one would
    // have been retried out of the callers' sight). A backend reports its
    // counts when it ends, so the core's sessions are ended first.
    assert_eq!(deadlocks_detected(&core.db_url).await, 0);
}

/// Deadlocks PostgreSQL detected in the database of `db_url`. A backend
/// reports its counts when it ends, so the sessions open now (the core's) are
/// ended first; the core connects again as it needs to.
async fn deadlocks_detected(db_url: &str) -> i64 {
    let query = |sql: String| async move {
        bank_tests::db::query_strings(db_url, &sql)
            .await
            .map_err(|e| e.to_string())
    };
    let ended = query(
        // OFFSET 0 keeps the filter apart from the termination (which
        // would otherwise be free to run first, on this session too).
        "SELECT pid::text FROM (SELECT pid FROM pg_stat_activity \
           WHERE datname = current_database() AND pid <> pg_backend_pid() OFFSET 0) s \
         WHERE pg_terminate_backend(pid)"
            .to_owned(),
    )
    .await
    .unwrap();
    eventually(
        "the core's sessions have ended",
        Duration::from_secs(10),
        || async {
            let left = query(format!(
                "SELECT count(*)::text FROM pg_stat_activity WHERE pid IN ({})",
                ended
                    .iter()
                    .map(String::as_str)
                    .chain(["0"])
                    .collect::<Vec<_>>()
                    .join(",")
            ))
            .await?;
            if left == ["0"] {
                Ok(())
            } else {
                Err(format!("sessions left: {left:?}"))
            }
        },
    )
    .await;
    let n = query(
        "SELECT deadlocks::text FROM pg_stat_database WHERE datname = current_database()"
            .to_owned(),
    )
    .await
    .unwrap();
    n.first()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("deadlocks: {n:?}"))
}

#[tokio::test]
async fn b03_lock_held_past_lock_timeout_is_retried_transparently() {
    let (_nats, core) = core_with(CoreOptions {
        lock_timeout_ms: 100,
        ..Default::default()
    })
    .await;
    let from = core.api.funded_account(1000).await;
    let to = core.api.funded_account(0).await;
    // Another session holds the source row lock (the fault) until the
    // transfer has waited, timed out and tried again in a new transaction.
    let lock = RowLock::account(&core.db_url, &from).await.unwrap();
    let api = core.api.clone();
    let (f, t) = (from.clone(), to.clone());
    let transfer = tokio::spawn(async move { api.core_transfer(&f, &t, 300).await });
    lock.until_retried("the transfer retried after its lock timeout")
        .await;
    assert!(
        !transfer.is_finished(),
        "still waiting while the lock is held"
    );
    lock.release().await.unwrap();
    transfer.await.unwrap().expect(200);
    assert_eq!(core.api.balance(&to).await, 300);
}

/// A ledger of one worker over a core's database, so a test decides what one
/// batch holds: whatever queued while the worker was busy.
struct OneWorker {
    ledger: core_bank::ledger::Ledger,
    _workers: tokio::task::JoinSet<()>,
}

type LedgerAnswer = Result<core_bank::ledger::TransferRecord, core_bank::ledger::LedgerError>;

impl OneWorker {
    /// With `parked_max` places for batches waiting on held accounts.
    async fn start(core: &CoreApp, lock_timeout: Duration, parked_max: usize) -> Self {
        let pool = common::config::PoolArgs {
            db_max_connections: 4,
            db_lock_timeout_ms: lock_timeout.as_millis() as u64,
            db_statement_timeout_ms: 30_000,
        };
        let db = common::db::connect(&core.db_url, &pool, "b03-test")
            .await
            .unwrap();
        let clock = core_bank::app::clock(&core.config, &db).await.unwrap();
        let (ledger, workers) = core_bank::ledger::Ledger::start(
            db,
            clock,
            core_bank::ledger::LedgerConfig {
                batch_max: 128,
                workers: 1,
                parked_max,
                queue_max: 64,
                request_ttl: Duration::from_secs(600),
            },
            std::sync::Arc::new(|_: &[common::AccountId]| {}),
        );
        Self {
            ledger,
            _workers: workers,
        }
    }

    /// Transfers 100 from `from` to `to`, as transfer `id`.
    fn transfer_as(&self, id: &str, from: &str, to: &str) -> tokio::task::JoinHandle<LedgerAnswer> {
        self.transfer_at(
            id,
            from,
            to,
            core_bank::clock::truncate_micros(chrono::Utc::now()),
        )
    }

    /// Transfers 100 from `from` to `to`, as transfer `id` requested at `at`.
    fn transfer_at(
        &self,
        id: &str,
        from: &str,
        to: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> tokio::task::JoinHandle<LedgerAnswer> {
        let ledger = self.ledger.clone();
        let cmd = core_bank::ledger::TransferCmd {
            transfer_id: common::TransferId::parse(id).unwrap(),
            from_account: common::AccountId::parse(from).unwrap(),
            to_account: common::AccountId::parse(to).unwrap(),
            amount: common::Amount::from_won(100).unwrap(),
            memo: None,
            requested_at: at,
        };
        tokio::spawn(async move { ledger.transfer(cmd).await })
    }

    /// Transfers 100 from `from` to `to`.
    fn transfer(&self, from: &str, to: &str) -> tokio::task::JoinHandle<LedgerAnswer> {
        self.transfer_as(common::TransferId::generate().as_str(), from, to)
    }

    /// Makes the worker wait on a gate until it is released: a transfer of
    /// 100 from `from` to `to` whose id another transaction is inserting (a
    /// lock that is no account's, so the worker waits and retries it).
    async fn gate(
        &self,
        core: &CoreApp,
        from: &str,
        to: &str,
    ) -> (RowLock, tokio::task::JoinHandle<LedgerAnswer>) {
        let id = unique("trf_");
        let lock = RowLock::transfer_id(&core.db_url, &id).await.unwrap();
        let transfer = self.transfer_as(&id, from, to);
        lock.until_blocked(1, "the worker waits on the gate").await;
        (lock, transfer)
    }

    /// Until `n` commands wait in the queue: the batch the worker takes next.
    async fn until_queued(&self, n: usize) {
        eventually(
            &format!("{n} commands queued"),
            Duration::from_secs(10),
            || async {
                match self.ledger.queued() {
                    q if q == n => Ok(()),
                    q => Err(format!("{q} queued")),
                }
            },
        )
        .await;
    }
}

fn succeeded(answer: Result<LedgerAnswer, tokio::task::JoinError>) {
    let answer = answer.unwrap();
    assert!(
        matches!(&answer, Ok(r) if r.status == core_bank::ledger::Status::Succeeded),
        "{answer:?}"
    );
}

/// B3: a lock another transaction holds for long (an interest payout over a
/// busy account, an operator's session) holds up the commands that need that
/// account, and none of the commands batched with them; once the ledger waits
/// on held accounts as much as it may, a further command on one is answered
/// "account busy" at once rather than stopping a worker.
#[tokio::test]
async fn b03_an_account_held_past_the_lock_timeout_holds_up_only_the_commands_that_need_it() {
    let (_nats, core) = core().await;
    let gate = core.api.funded_account(1_000).await;
    let held = core.api.funded_account(1_000).await;
    let held_to = core.api.funded_account(0).await;
    let mut pairs = Vec::new();
    for _ in 0..4 {
        pairs.push((
            core.api.funded_account(1_000).await,
            core.api.funded_account(0).await,
        ));
    }
    let one = OneWorker::start(&core, Duration::from_secs(1), 1).await;

    // The worker waits on the gate (a transfer id another transaction is
    // inserting, which holds up no account) while the next batch queues: a
    // transfer from the held account and four that need neither.
    let (gate_lock, first) = one.gate(&core, &gate, &pairs[0].1).await;
    let held_lock = RowLock::account(&core.db_url, &held).await.unwrap();
    let blocked = one.transfer(&held, &held_to);
    let unrelated: Vec<_> = pairs.iter().map(|(f, t)| one.transfer(f, t)).collect();
    one.until_queued(5).await;
    gate_lock.release().await.unwrap();
    succeeded(first.await);

    // The four run once the batch's first lock wait ends; the held
    // account's transfer keeps waiting.
    for t in unrelated {
        succeeded(t.await);
    }
    assert!(
        !blocked.is_finished(),
        "the held account's transfer still waits for its lock"
    );
    // It waits apart: the one worker goes on with the queue.
    succeeded(one.transfer(&pairs[1].0, &pairs[1].1).await);
    assert!(!blocked.is_finished(), "still waiting after the later one");

    // The one place for waiting batches is taken: another command on the
    // held account, batched with one that needs neither, is answered
    // "account busy" at once instead of stopping the worker.
    let (gate_lock, second_gate) = one.gate(&core, &gate, &pairs[0].1).await;
    let busy = one.transfer(&held, &pairs[3].1);
    let beside = one.transfer(&pairs[2].0, &pairs[2].1);
    one.until_queued(2).await;
    gate_lock.release().await.unwrap();
    succeeded(second_gate.await);
    succeeded(beside.await);
    let refused = busy.await.unwrap();
    assert!(
        matches!(refused, Err(core_bank::ledger::LedgerError::AccountBusy)),
        "{refused:?}"
    );
    assert!(!blocked.is_finished(), "the parked one still waits");

    held_lock.release().await.unwrap();
    succeeded(blocked.await);
    for (i, (from, to)) in pairs.iter().enumerate() {
        // The first target also got the gate's two; the second and third
        // pairs moved twice; the fourth target got nothing from the refused
        // transfer.
        let (sent, received) = match i {
            0 => (100, 300),
            1 | 2 => (200, 200),
            _ => (100, 100),
        };
        assert_eq!(core.api.balance(from).await, 1_000 - sent);
        assert_eq!(core.api.balance(to).await, received);
    }
    assert_eq!(core.api.balance(&gate).await, 800);
    assert_eq!(core.api.balance(&held).await, 900);
    assert_eq!(core.api.balance(&held_to).await, 100);
}

/// B3/B4: a retry of a transfer already answered, batched with a new
/// command on an account that is now held, gets its recorded answer at once
/// (it needs no lock), not after the held account's wait or "account busy".
#[tokio::test]
async fn b03_b04_a_retry_of_an_answered_transfer_is_not_held_up_by_a_held_account() {
    let (_nats, core) = core().await;
    let gate = core.api.funded_account(1_000).await;
    let gate_to = core.api.funded_account(0).await;
    let held = core.api.funded_account(1_000).await;
    let to = core.api.funded_account(0).await;
    let one = OneWorker::start(&core, Duration::from_millis(200), 1).await;
    let id = unique("trf_");
    let at = core_bank::clock::truncate_micros(chrono::Utc::now());
    succeeded(one.transfer_at(&id, &held, &to, at).await);

    let (gate_lock, first) = one.gate(&core, &gate, &gate_to).await;
    let held_lock = RowLock::account(&core.db_url, &held).await.unwrap();
    let retry = one.transfer_at(&id, &held, &to, at);
    let new = one.transfer(&held, &to);
    one.until_queued(2).await;
    gate_lock.release().await.unwrap();
    succeeded(first.await);
    // Still held: the retry has its recorded answer, the new one waits.
    succeeded(retry.await);
    assert!(
        !new.is_finished(),
        "the new transfer waits for the held account"
    );
    held_lock.release().await.unwrap();
    succeeded(new.await);
    assert_eq!(core.api.balance(&to).await, 200);
}

/// B3: a parked batch whose account stays held through all its retries
/// answers "account busy" (nothing executed, the database is well), not
/// "the database is unavailable".
#[tokio::test]
async fn b03_a_parked_batch_whose_account_stays_held_answers_account_busy() {
    let (_nats, core) = core().await;
    let held = core.api.funded_account(1_000).await;
    let to = core.api.funded_account(0).await;
    let one = OneWorker::start(&core, Duration::from_millis(50), 1).await;
    let held_lock = RowLock::account(&core.db_url, &held).await.unwrap();
    let answer = one.transfer(&held, &to).await.unwrap();
    held_lock.release().await.unwrap();
    assert!(
        matches!(answer, Err(core_bank::ledger::LedgerError::AccountBusy)),
        "{answer:?}"
    );
    assert_eq!(core.api.balance(&held).await, 1_000, "nothing executed");
}

/// B3: the commands on two held accounts wait apart, each account's on its
/// own: the one whose lock goes first completes while the other still waits
/// (an account that only looked held, locked for a moment by a concurrent
/// batch when the ledger asked, so does not wait in one transaction with a
/// really held one).
#[tokio::test]
async fn b03_commands_on_two_held_accounts_wait_apart() {
    let (_nats, core) = core().await;
    let gate = core.api.funded_account(1_000).await;
    let long = core.api.funded_account(1_000).await;
    let short = core.api.funded_account(1_000).await;
    let (from, to) = (
        core.api.funded_account(1_000).await,
        core.api.funded_account(0).await,
    );
    let one = OneWorker::start(&core, Duration::from_secs(1), 2).await;
    // Ids are time-ordered: `to` sorts after both held accounts, so neither
    // transfer holds it while waiting for its held account (rows are locked
    // in id order; a target of lower id would make the short-held account's
    // transfer wait behind the long-held one's).

    // One batch: a transfer from each held account and one that needs
    // neither, queued while the worker waits on the gate.
    let (gate_lock, first) = one.gate(&core, &gate, &to).await;
    let long_lock = RowLock::account(&core.db_url, &long).await.unwrap();
    let short_lock = RowLock::account(&core.db_url, &short).await.unwrap();
    let from_long = one.transfer(&long, &to);
    let from_short = one.transfer(&short, &to);
    let free = one.transfer(&from, &to);
    one.until_queued(3).await;
    gate_lock.release().await.unwrap();
    succeeded(first.await);
    succeeded(free.await);
    long_lock
        .until_blocked(1, "the long-held account's transfer")
        .await;
    short_lock
        .until_blocked(1, "the short-held account's transfer")
        .await;

    short_lock.release().await.unwrap();
    succeeded(from_short.await);
    assert!(
        !from_long.is_finished(),
        "the long-held account's transfer still waits"
    );
    long_lock.release().await.unwrap();
    succeeded(from_long.await);
    assert_eq!(core.api.balance(&to).await, 400);
}

/// B3: a lone command on a held account does not stop its worker either, and
/// once an account was found held, a later command on it runs apart at once
/// (while there is a place for that) instead of making the worker wait a lock
/// timeout on it again. Once the account is free, all of them complete.
#[tokio::test]
async fn b03_a_held_account_stops_no_worker_and_is_not_waited_on_twice() {
    let (_nats, core) = core().await;
    let held = core.api.funded_account(1_000).await;
    let from = core.api.funded_account(1_000).await;
    let mut to = Vec::new();
    for _ in 0..5 {
        to.push(core.api.funded_account(0).await);
    }
    // A long lock timeout, so that a worker waiting one shows.
    let lock_timeout = Duration::from_secs(5);
    let one = OneWorker::start(&core, lock_timeout, 2).await;

    let lock = RowLock::account(&core.db_url, &held).await.unwrap();
    let waiting = one.transfer(&held, &to[0]);
    lock.until_blocked(1, "the lone transfer").await;
    succeeded(one.transfer(&from, &to[1]).await);
    assert!(
        !waiting.is_finished(),
        "the held account's transfer waits apart while the worker goes on"
    );

    // The account is remembered: the next transfer from it waits apart at
    // once, and the worker answers the one after it well before a lock
    // timeout could have passed.
    let second = one.transfer(&held, &to[2]);
    lock.until_blocked(2, "both transfers from the held account")
        .await;
    let after = tokio::time::timeout(lock_timeout / 2, one.transfer(&from, &to[3])).await;
    succeeded(after.expect("the worker waited on the held account"));
    assert!(!waiting.is_finished() && !second.is_finished());

    lock.release().await.unwrap();
    succeeded(waiting.await);
    succeeded(second.await);
    // Forgotten once its transfers committed: used as any other.
    succeeded(one.transfer(&held, &to[4]).await);
    assert_eq!(core.api.balance(&held).await, 700);
    assert_eq!(core.api.balance(&from).await, 800);
    for account in &to {
        assert_eq!(core.api.balance(account).await, 100);
    }
}

/// B3: a parked batch (commands set aside on an account found held) that
/// meets another held account splits again: the commands that need neither
/// held account complete, and those on the newly held one wait apart, instead
/// of the whole parked batch waiting for it.
#[tokio::test]
async fn b03_a_parked_batch_that_meets_another_held_account_splits_again() {
    let (_nats, core) = core().await;
    // Ids are time-ordered: `later` sorts before `held`, so the parked batch
    // locks it first; `to` sorts after both.
    let later = core.api.funded_account(1_000).await;
    let held = core.api.funded_account(1_000).await;
    let to = core.api.funded_account(0).await;
    let (gate, gate_to) = (
        core.api.funded_account(1_000).await,
        core.api.funded_account(0).await,
    );
    assert!(later < held && held < to, "ids sort in creation order");
    let one = OneWorker::start(&core, Duration::from_secs(1), 2).await;

    // `held` is found held (a lone transfer from it waits apart) and so
    // remembered; the worker answering the next command shows it went on.
    let held_lock = RowLock::account(&core.db_url, &held).await.unwrap();
    let first = one.transfer(&held, &to);
    held_lock.until_blocked(1, "the lone transfer").await;
    succeeded(one.transfer(&gate, &gate_to).await);

    // One batch of two transfers from the remembered account, one of them
    // to `later`, which is held now too: set aside at once, as one parked
    // batch, which waits for `later` first.
    let later_lock = RowLock::account(&core.db_url, &later).await.unwrap();
    let (gate_lock, gated) = one.gate(&core, &gate, &gate_to).await;
    let to_free = one.transfer(&held, &to);
    let to_later = one.transfer(&held, &later);
    one.until_queued(2).await;
    gate_lock.release().await.unwrap();
    succeeded(gated.await);
    later_lock
        .until_blocked(1, "the parked batch, on the later-held account")
        .await;

    // `held` is free again: once the parked batch's lock wait ends, the
    // transfer that needs only `held` and `to` completes while `later` is
    // still held.
    held_lock.release().await.unwrap();
    succeeded(first.await);
    let done = tokio::time::timeout(Duration::from_secs(30), to_free).await;
    succeeded(done.expect("the parked batch waited whole for the later-held account"));
    assert!(
        !to_later.is_finished(),
        "the transfer to the later-held account waits for it"
    );
    later_lock.release().await.unwrap();
    succeeded(to_later.await);
    assert_eq!(core.api.balance(&held).await, 700);
    assert_eq!(core.api.balance(&to).await, 200);
    assert_eq!(core.api.balance(&later).await, 1_100);
}

/// B3: remembering held accounts never refuses a command: with every place
/// for waiting batches taken, a command on an account found held before, and
/// free again, runs on the worker like any other.
#[tokio::test]
async fn b03_a_remembered_account_free_again_is_served_while_every_place_is_taken() {
    let (_nats, core) = core().await;
    let long = core.api.funded_account(1_000).await;
    let brief = core.api.funded_account(1_000).await;
    let (from, to) = (
        core.api.funded_account(1_000).await,
        core.api.funded_account(0).await,
    );
    let one = OneWorker::start(&core, Duration::from_secs(1), 1).await;

    // The one place is taken by a transfer waiting on `long`.
    let long_lock = RowLock::account(&core.db_url, &long).await.unwrap();
    let parked = one.transfer(&long, &to);
    long_lock.until_blocked(1, "the parked transfer").await;
    succeeded(one.transfer(&from, &to).await);

    // `brief` is found held with no place left: its transfer is answered
    // "account busy", and the account is remembered.
    let brief_lock = RowLock::account(&core.db_url, &brief).await.unwrap();
    let refused = one.transfer(&brief, &to).await.unwrap();
    assert!(
        matches!(refused, Err(core_bank::ledger::LedgerError::AccountBusy)),
        "{refused:?}"
    );
    brief_lock.release().await.unwrap();

    // Free again, with every place still taken: served, not refused and not
    // kept waiting for a place.
    let served = tokio::time::timeout(Duration::from_secs(10), one.transfer(&brief, &to)).await;
    succeeded(served.expect("the transfer waited for a place"));
    assert!(!parked.is_finished(), "the parked transfer still waits");

    long_lock.release().await.unwrap();
    succeeded(parked.await);
    assert_eq!(core.api.balance(&long).await, 900);
    assert_eq!(core.api.balance(&brief).await, 900);
    assert_eq!(core.api.balance(&from).await, 900);
    assert_eq!(core.api.balance(&to).await, 300);
}

#[tokio::test]
async fn b04_replay_returns_first_answer_conflict_is_rejected_and_concurrent_same_id_executes_once()
{
    let (_nats, core) = core().await;
    let from = core.api.funded_account(10_000).await;
    let to = core.api.funded_account(0).await;
    let id = unique("trf_");
    let body = transfer_body(&id, &from, &to, 1000);
    let first = core
        .api
        .post("/v1/transfers", body.clone())
        .await
        .expect(200);
    let again = core
        .api
        .post("/v1/transfers", body.clone())
        .await
        .expect(200);
    assert_eq!(
        first.body, again.body,
        "a replay returns the first answer, same seqs"
    );
    assert_eq!(
        core.api.balance(&from).await,
        9_000,
        "a replay moves nothing"
    );

    let mut changed = body.clone();
    changed["amount"] = json!("2000");
    let conflict = core.api.post("/v1/transfers", changed).await.expect(409);
    assert_eq!(conflict.code(), Some("idempotency_conflict"));
    assert_eq!(conflict.body["error"]["field"], "amount");

    // 16 concurrent requests with one new id: executed once, same answer for all.
    let id = unique("trf_");
    let body = transfer_body(&id, &from, &to, 500);
    let answers = join_all((0..16).map(|_| core.api.post("/v1/transfers", body.clone()))).await;
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body, answers[0].body);
    }
    assert_eq!(core.api.balance(&from).await, 8_500);
    let with_id = core
        .api
        .all_entries(&from)
        .await
        .into_iter()
        .filter(|e| e["transfer_id"] == json!(id))
        .count();
    assert_eq!(with_id, 1);

    // Deposits are idempotent by deposit_id the same way.
    let dep = json!({"deposit_id": unique("dep_"), "to_account": to, "amount": "700",
        "sender_bank": "Shinhan", "sender_name": "Park"});
    let d1 = core.api.post("/v1/deposits", dep.clone()).await.expect(200);
    let d2 = core.api.post("/v1/deposits", dep.clone()).await.expect(200);
    assert_eq!(d1.body, d2.body);
    let mut dep2 = dep.clone();
    dep2["sender_name"] = json!("Choi");
    assert_eq!(
        core.api.post("/v1/deposits", dep2).await.expect(409).code(),
        Some("idempotency_conflict")
    );
}

#[tokio::test]
async fn b05_request_older_than_ttl_is_refused_and_recorded() {
    let (_nats, core) = core_with(CoreOptions {
        request_ttl_secs: 5,
        ..Default::default()
    })
    .await;
    let from = core.api.funded_account(1000).await;
    let to = core.api.funded_account(0).await;
    let id = unique("trf_");
    let mut body = transfer_body(&id, &from, &to, 100);
    body["requested_at"] = json!((chrono::Utc::now() - chrono::Duration::seconds(6)).to_rfc3339());
    let r = core
        .api
        .post("/v1/transfers", body.clone())
        .await
        .expect(422);
    assert_eq!(r.code(), Some("request_expired"));
    let status = core
        .api
        .get(&format!("/v1/transfers/{id}"))
        .await
        .expect(200);
    assert_eq!(status.body["status"], "failed");
    assert_eq!(status.body["reason"], "request_expired");
    assert_eq!(core.api.balance(&from).await, 1000);
    // A request within the TTL executes.
    body["transfer_id"] = json!(unique("trf_"));
    body["requested_at"] = json!((chrono::Utc::now() - chrono::Duration::seconds(3)).to_rfc3339());
    core.api.post("/v1/transfers", body).await.expect(200);
}

/// A request that is within its TTL when it arrives but expires while it
/// waits for an account lock is refused: the core checks the age once the
/// rows are locked, not before the wait.
#[tokio::test]
async fn b05_a_request_that_expires_while_waiting_for_a_lock_is_refused() {
    let (_nats, core) = core_with(CoreOptions {
        request_ttl_secs: 2,
        lock_timeout_ms: 10_000,
        ..Default::default()
    })
    .await;
    let from = core.api.funded_account(1000).await;
    let to = core.api.funded_account(0).await;
    // Another transaction holds the source account's row lock.
    let lock = RowLock::account(&core.db_url, &from).await.unwrap();
    let id = unique("trf_");
    let requested_at = chrono::Utc::now() - chrono::Duration::milliseconds(1500);
    let mut body = transfer_body(&id, &from, &to, 100);
    body["requested_at"] = json!(requested_at.to_rfc3339());
    let request = tokio::spawn({
        let api = core.api.clone();
        async move { api.post("/v1/transfers", body).await }
    });
    // Release the lock only once the core waits for it and the TTL has passed.
    eventually(
        "the core waits for the lock until the request expired",
        Duration::from_secs(10),
        || async {
            let waiting = lock.waiters().await.map_err(|e| e.to_string())?;
            let expired = chrono::Utc::now() - requested_at > chrono::Duration::milliseconds(2100);
            if waiting > 0 && expired {
                Ok(())
            } else {
                Err(format!("waiting {waiting}, expired {expired}"))
            }
        },
    )
    .await;
    lock.release().await.unwrap();
    let r = request.await.unwrap().expect(422);
    assert_eq!(r.code(), Some("request_expired"));
    assert_eq!(core.api.balance(&from).await, 1000);
    assert_eq!(core.api.balance(&to).await, 0);
}

#[tokio::test]
async fn b06_every_refusal_is_final_recorded_and_reported() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let rich = api.funded_account(1_000_000).await;
    let poor = api.funded_account(10).await;
    let suspended = api
        .funded_account_with(1000, json!({"status": "suspended"}))
        .await;
    let closed = api
        .funded_account_with(0, json!({"status": "closed"}))
        .await;
    let no_withdrawal = api
        .funded_account_with(1000, json!({"withdrawal_stopped": true}))
        .await;
    let no_deposit = api
        .funded_account_with(0, json!({"deposit_stopped": true}))
        .await;
    let fenced = unique("trf_");
    api.post(&format!("/v1/transfers/{fenced}/fence"), json!({}))
        .await
        .expect(200);

    let cases = [
        (
            "insufficient_funds",
            transfer_body(&unique("trf_"), &poor, &rich, 11),
        ),
        (
            "account_not_found",
            transfer_body(&unique("trf_"), &rich, "acc_does_not_exist", 1),
        ),
        (
            "account_not_found",
            transfer_body(&unique("trf_"), "acc_does_not_exist", &rich, 1),
        ),
        (
            "account_not_active",
            transfer_body(&unique("trf_"), &suspended, &rich, 1),
        ),
        (
            "account_not_active",
            transfer_body(&unique("trf_"), &rich, &closed, 1),
        ),
        (
            "withdrawal_stopped",
            transfer_body(&unique("trf_"), &no_withdrawal, &rich, 1),
        ),
        (
            "deposit_stopped",
            transfer_body(&unique("trf_"), &rich, &no_deposit, 1),
        ),
        (
            "same_account",
            transfer_body(&unique("trf_"), &rich, &rich, 1),
        ),
        ("transfer_fenced", transfer_body(&fenced, &rich, &poor, 1)),
    ];
    for (code, body) in cases.clone() {
        let id = body["transfer_id"].as_str().unwrap().to_owned();
        let r = api.post("/v1/transfers", body.clone()).await;
        assert_eq!((r.status, r.code()), (422, Some(code)), "{}", r.body);
        // Final: a replay gets the same refusal.
        let again = api.post("/v1/transfers", body).await;
        assert_eq!(again.code(), Some(code));
        let status = api.get(&format!("/v1/transfers/{id}")).await.expect(200);
        assert_eq!(status.body["status"], "failed");
        let expected_reason = if code == "transfer_fenced" {
            "never_received"
        } else {
            code
        };
        assert_eq!(status.body["reason"], expected_reason);
    }
    assert_eq!(
        api.balance(&rich).await,
        1_000_000,
        "no refusal moved money"
    );
    assert_eq!(api.balance(&poor).await, 10);
    // Deposits are refused the same way.
    assert_eq!(
        api.deposit(&closed, 5).await.code(),
        Some("account_not_active")
    );
    assert_eq!(
        api.deposit(&no_deposit, 5).await.code(),
        Some("deposit_stopped")
    );
    assert_eq!(
        api.deposit("acc_does_not_exist", 5).await.code(),
        Some("account_not_found")
    );
    assert_eq!(
        api.get("/v1/transfers/trf_never_seen")
            .await
            .expect(404)
            .code(),
        Some("transfer_not_found")
    );
    // Final even once the cause is gone: the poor account funded, the
    // suspended one active again, the stops lifted. A retry of a refused
    // transfer id still gets its refusal and moves nothing (the channel
    // tells the customer "failed" on the strength of it, B11).
    api.deposit(&poor, 1_000).await.expect(200);
    api.patch(
        &format!("/v1/accounts/{suspended}"),
        json!({"status": "active"}),
    )
    .await
    .expect(200);
    api.patch(
        &format!("/v1/accounts/{no_withdrawal}"),
        json!({"withdrawal_stopped": false}),
    )
    .await
    .expect(200);
    api.patch(
        &format!("/v1/accounts/{no_deposit}"),
        json!({"deposit_stopped": false}),
    )
    .await
    .expect(200);
    let balances = [&rich, &poor, &suspended, &no_withdrawal, &no_deposit];
    let mut before = Vec::new();
    for a in balances {
        before.push(api.balance(a).await);
    }
    for (code, body) in cases {
        let again = api.post("/v1/transfers", body.clone()).await;
        assert_eq!((again.status, again.code()), (422, Some(code)), "{body}");
    }
    let mut after = Vec::new();
    for a in balances {
        after.push(api.balance(a).await);
    }
    assert_eq!(after, before, "a refused transfer never executes later");
}

#[tokio::test]
async fn b07_deposit_from_another_bank_produces_an_entry_and_event() {
    let (nats, core) = core().await;
    let account = core.api.funded_account(0).await;
    let dep_id = unique("dep_");
    let r = core
        .api
        .post(
            "/v1/deposits",
            json!({"deposit_id": dep_id, "to_account": account, "amount": "250000",
                   "sender_bank": "Woori", "sender_name": "Lee Sunsin"}),
        )
        .await
        .expect(200);
    assert_eq!(
        r.body,
        json!({"deposit_id": dep_id, "status": "succeeded", "seq": 1, "balance": "250000"})
    );
    let entries = core.api.all_entries(&account).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["kind"], "deposit");
    assert_eq!(entries[0]["deposit_id"], json!(dep_id));
    assert_eq!(entries[0]["counterparty"], "Woori / Lee Sunsin");
    let js = nats.jetstream().await.unwrap();
    let subject = format!("bank.ledger.{account}");
    eventually(
        "the deposit's ledger event",
        Duration::from_secs(10),
        || async {
            let msgs = stream_messages(&js, "LEDGER")
                .await
                .map_err(|e| e.to_string())?;
            msgs.iter()
                .find(|m| m.subject.as_str() == subject)
                .map(|_| ())
                .ok_or_else(|| "not yet".to_owned())
        },
    )
    .await;
}

#[tokio::test]
async fn b08_every_entry_reaches_ledger_once_with_its_event_id() {
    let (nats, core) = core().await;
    let mut accounts = Vec::new();
    for _ in 0..3 {
        accounts.push(core.api.funded_account(100_000).await);
    }
    join_all((0..30).map(|i| {
        core.api
            .core_transfer(&accounts[i % 3], &accounts[(i + 1) % 3], 10)
    }))
    .await;
    let mut expected = HashSet::new();
    for a in &accounts {
        for e in core.api.all_entries(a).await {
            expected.insert(format!(
                "{}:{}",
                e["account_id"].as_str().unwrap(),
                e["seq"]
            ));
        }
    }
    assert_eq!(expected.len(), 63);
    let js = nats.jetstream().await.unwrap();
    let msgs = eventually("all ledger events", Duration::from_secs(20), || async {
        let msgs = stream_messages(&js, "LEDGER")
            .await
            .map_err(|e| e.to_string())?;
        if msgs.len() >= 63 {
            Ok(msgs)
        } else {
            Err(format!("{} of 63", msgs.len()))
        }
    })
    .await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &msgs {
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        let id = body["event_id"].as_str().unwrap().to_owned();
        assert_eq!(
            m.headers.get("Nats-Msg-Id").map(|v| v.to_string()),
            Some(id.clone())
        );
        assert_eq!(
            id,
            format!("{}:{}", body["account_id"].as_str().unwrap(), body["seq"])
        );
        assert_eq!(
            m.subject.as_str(),
            format!("bank.ledger.{}", body["account_id"].as_str().unwrap())
        );
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), 63);
    assert!(
        seen.values().all(|&n| n == 1),
        "an event was published twice"
    );
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), expected);
}

#[tokio::test]
async fn b12_fence_then_late_transfer_is_refused_and_existing_transfer_is_not_fenced() {
    let (_nats, core) = core().await;
    let from = core.api.funded_account(1000).await;
    let to = core.api.funded_account(0).await;
    let id = unique("trf_");
    let fence = core
        .api
        .post(&format!("/v1/transfers/{id}/fence"), json!({}))
        .await
        .expect(200);
    assert_eq!(fence.body["status"], "failed");
    assert_eq!(fence.body["reason"], "never_received");
    let late = core
        .api
        .post("/v1/transfers", transfer_body(&id, &from, &to, 100))
        .await
        .expect(422);
    assert_eq!(late.code(), Some("transfer_fenced"));
    assert_eq!(core.api.balance(&from).await, 1000);
    // Fencing an executed transfer reports it instead.
    let done = unique("trf_");
    core.api
        .post("/v1/transfers", transfer_body(&done, &from, &to, 100))
        .await
        .expect(200);
    let f = core
        .api
        .post(&format!("/v1/transfers/{done}/fence"), json!({}))
        .await
        .expect(200);
    assert_eq!(f.body["status"], "succeeded");
    // Fence and execution racing: exactly one wins, and the answers agree.
    for _ in 0..10 {
        let id = unique("trf_");
        let fence_path = format!("/v1/transfers/{id}/fence");
        let (t, f) = tokio::join!(
            core.api
                .post("/v1/transfers", transfer_body(&id, &from, &to, 1)),
            core.api.post(&fence_path, json!({}))
        );
        let status = core
            .api
            .get(&format!("/v1/transfers/{id}"))
            .await
            .expect(200);
        if t.status == 200 {
            assert_eq!(f.body["status"], "succeeded");
            assert_eq!(status.body["status"], "succeeded");
        } else {
            assert_eq!(t.code(), Some("transfer_fenced"));
            assert_eq!(f.body["reason"], "never_received");
            assert_eq!(status.body["reason"], "never_received");
        }
    }
}

/// A fence and a transfer record are told apart by the database too: a
/// write (a manual repair, say) that would make a fence look like a request,
/// or a request record lose its request, its seqs or its reason, is refused,
/// so a replay always reads a record of one known shape.
#[tokio::test]
async fn b12_b04_the_database_refuses_a_transfer_record_of_no_known_shape() {
    use sea_orm::ConnectionTrait;
    let (_nats, core) = core().await;
    let from = core.api.funded_account(1000).await;
    let to = core.api.funded_account(0).await;
    let fenced = unique("trf_");
    core.api
        .post(&format!("/v1/transfers/{fenced}/fence"), json!({}))
        .await
        .expect(200);
    let done = unique("trf_");
    let done_body = transfer_body(&done, &from, &to, 100);
    core.api
        .post("/v1/transfers", done_body.clone())
        .await
        .expect(200);
    let refused = unique("trf_");
    let refused_body = transfer_body(&refused, &from, &to, 1_000_000);
    core.api
        .post("/v1/transfers", refused_body.clone())
        .await
        .expect(422);
    let db = sea_orm::Database::connect(core.db_url.as_str())
        .await
        .unwrap();
    for (id, change) in [
        (
            &fenced,
            format!("amount = 5, from_account = '{from}', to_account = '{to}'"),
        ),
        (&fenced, "status = 'succeeded', reason = NULL".to_owned()),
        (&fenced, "reason = 'insufficient_funds'".to_owned()),
        (&fenced, "reason = NULL".to_owned()),
        (&done, "fenced = true".to_owned()),
        (&done, "from_seq = NULL".to_owned()),
        (&done, "reason = 'insufficient_funds'".to_owned()),
        (&done, "amount = NULL".to_owned()),
        (&refused, "reason = NULL".to_owned()),
        (&refused, "from_seq = 7".to_owned()),
    ] {
        let e = db
            .execute_unprepared(&format!(
                "UPDATE transfers SET {change} WHERE transfer_id = '{id}'"
            ))
            .await
            .expect_err(&change);
        assert!(e.to_string().contains("transfers_shape"), "{change}: {e}");
    }
    // The records still replay as they were written.
    for (body, status) in [
        (transfer_body(&fenced, &from, &to, 100), 422),
        (done_body, 200),
        (refused_body, 422),
    ] {
        let r = core.api.post("/v1/transfers", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
    }
    assert_eq!(core.api.balance(&from).await, 900);
}

#[tokio::test]
async fn b30_core_routes_require_the_service_token() {
    let (_nats, core) = core().await;
    let account = core.api.funded_account(0).await;
    let routes = [
        ("POST", "/v1/customers".to_owned()),
        ("PATCH", "/v1/customers/cus_x".to_owned()),
        ("POST", "/v1/accounts".to_owned()),
        ("GET", "/v1/accounts".to_owned()),
        ("GET", format!("/v1/accounts/{account}")),
        ("PATCH", format!("/v1/accounts/{account}")),
        ("POST", "/v1/deposits".to_owned()),
        ("POST", "/v1/transfers".to_owned()),
        ("GET", "/v1/transfers/t1".to_owned()),
        ("POST", "/v1/transfers/t1/fence".to_owned()),
        ("GET", format!("/v1/accounts/{account}/entries")),
        ("GET", format!("/v1/accounts/{account}/interest")),
        ("POST", format!("/v1/accounts/{account}/interest/payouts")),
        ("GET", "/v1/admin/interest/rollout".to_owned()),
        ("PUT", "/v1/admin/interest/rollout".to_owned()),
        ("POST", "/v1/admin/interest/verify".to_owned()),
        ("GET", "/v1/admin/clock".to_owned()),
        ("POST", "/v1/admin/clock".to_owned()),
    ];
    let missing = core.api.with_token(None);
    let wrong = core.api.with_token(Some(format!("{CORE_TOKEN}x")));
    for (method, path) in &routes {
        for api in [&missing, &wrong] {
            let r = api.send(method, path, Some(json!({})), &[]).await;
            assert_eq!(
                (r.status, r.code()),
                (401, Some("unauthorized")),
                "{method} {path}"
            );
        }
    }
    // The read-only credential reads, and nothing else.
    let reader = core.api.with_token(Some(CORE_READ_TOKEN.to_owned()));
    for (method, path) in &routes {
        let r = reader.send(method, path, Some(json!({})), &[]).await;
        if *method == "GET" {
            assert!(
                !matches!(r.status, 401 | 403),
                "{method} {path}: {} {:?}",
                r.status,
                r.body
            );
        } else {
            assert_eq!(
                (r.status, r.code()),
                (403, Some("forbidden")),
                "{method} {path}"
            );
        }
    }
    assert_eq!(
        reader.get(&format!("/v1/accounts/{account}")).await.status,
        200
    );
    assert_eq!(core.api.balance(&account).await, 0, "nothing moved");
    // Operational endpoints stay open.
    assert_eq!(missing.get("/healthz").await.status, 200);
    assert_eq!(missing.get("/openapi.json").await.status, 200);
}

#[tokio::test]
async fn b31_core_bad_input_gets_a_documented_4xx_and_writes_nothing() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let from = api.funded_account(1000).await;
    let to = api.funded_account(0).await;
    let good = transfer_body(&unique("trf_"), &from, &to, 10);
    let with = |field: &str, value: Value| {
        let mut b = good.clone();
        b[field] = value;
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("amount", json!(10)), "invalid_request"),
        (with("amount", json!("0")), "invalid_request"),
        (with("amount", json!("-5")), "invalid_request"),
        (with("amount", json!("10.5")), "invalid_request"),
        (with("amount", json!("1e3")), "invalid_request"),
        (with("amount", json!("1000000000000001")), "invalid_request"),
        (
            with("amount", json!("99999999999999999999999")),
            "invalid_request",
        ),
        (with("from_account", json!(5)), "invalid_request"),
        (with("from_account", json!("bad.id")), "invalid_request"),
        (with("requested_at", json!("yesterday")), "invalid_request"),
        (
            with("requested_at", json!("1969-12-31T23:59:59.999999Z")),
            "invalid_request",
        ),
        (
            with("requested_at", json!("1600-01-01T00:00:00.123456789Z")),
            "invalid_request",
        ),
        // A leap second: stored as the next second, a retry would not match.
        (
            with("requested_at", json!("2026-06-30T23:59:60Z")),
            "invalid_request",
        ),
        (with("memo", json!("x".repeat(141))), "invalid_request"),
        (with("extra", json!(1)), "invalid_request"),
        (json!({"transfer_id": "t"}), "invalid_request"),
        (json!([1, 2]), "invalid_request"),
    ];
    for (body, code) in cases {
        let r = api.post("/v1/transfers", body.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (400, Some(code)),
            "{body}: {}",
            r.body
        );
    }
    let r = api
        .send_raw(
            "POST",
            "/v1/transfers",
            "application/json",
            b"{not json".to_vec(),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, Some("malformed_json")));
    let r = api
        .send_raw("POST", "/v1/transfers", "text/plain", b"{}".to_vec())
        .await;
    assert_eq!((r.status, r.code()), (415, Some("unsupported_media_type")));
    let big = format!("{{\"memo\":\"{}\"}}", "x".repeat(70 * 1024));
    let r = api
        .send_raw(
            "POST",
            "/v1/transfers",
            "application/json",
            big.into_bytes(),
        )
        .await;
    assert_eq!((r.status, r.code()), (413, Some("payload_too_large")));
    // Unknown accounts are refusals (recorded), not errors.
    let r = api
        .post(
            "/v1/transfers",
            transfer_body(&unique("trf_"), &from, "acc_unknown", 1),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, Some("account_not_found")));
    assert_eq!(
        api.get("/v1/accounts/acc_unknown").await.expect(404).code(),
        Some("account_not_found")
    );
    assert_eq!(
        api.get("/v1/accounts/bad.id").await.expect(400).code(),
        Some("invalid_id")
    );
    assert_eq!(
        api.get(&format!("/v1/accounts/{from}/entries?limit=0"))
            .await
            .expect(400)
            .code(),
        Some("invalid_query")
    );
    assert_eq!(
        api.get(&format!("/v1/accounts/{from}/entries?limit=abc"))
            .await
            .expect(400)
            .code(),
        Some("invalid_query")
    );
    assert_eq!(
        api.get(&format!("/v1/accounts/{from}/entries?after_seq=-1"))
            .await
            .expect(400)
            .code(),
        Some("invalid_query")
    );
    let r = api.post("/v1/deposits", json!({"deposit_id": "d1", "to_account": to, "amount": "5", "sender_bank": "", "sender_name": "x"})).await;
    assert_eq!((r.status, r.code()), (400, Some("invalid_request")));
    assert_eq!(
        api.post("/v1/customers", json!({"name": ""}))
            .await
            .expect(400)
            .code(),
        Some("invalid_request")
    );
    assert_eq!(
        api.patch(&format!("/v1/accounts/{to}"), json!({"status": "frozen"}))
            .await
            .expect(400)
            .code(),
        Some("invalid_request")
    );
    assert_eq!(
        api.get("/v1/nowhere").await.expect(404).code(),
        Some("not_found")
    );
    // Nothing was written by any of it.
    assert_eq!(api.balance(&from).await, 1000);
    assert_eq!(api.all_entries(&from).await.len(), 1);
    assert_eq!(api.all_entries(&to).await.len(), 0);
}

/// The operator and interest routes refuse bad input with the documented
/// 4xx and change nothing; without `BANK_TEST_CLOCK` the clock cannot be set,
/// and the route answers 404 whatever body it is sent.
/// The test clock stays a test's: a test may move the business date at most
/// ten years past the real one, and a core running without
/// `BANK_TEST_CLOCK=1` refuses to start on a database whose date a test
/// clock moved ahead (it would otherwise date entries and accrue interest
/// on it), naming the stored date.
#[tokio::test]
async fn b31_a_date_moved_by_the_test_clock_is_not_run_on_without_it() {
    let nats = NatsServer::start().await.unwrap();
    let core = CoreApp::spawn(&nats).await.unwrap();
    let api = &core.api;
    let real = api.business_date().await;
    let far = (real + chrono::Days::new(3_700)).to_string();
    let r = api.post("/v1/admin/clock", json!({"today": far})).await;
    assert_eq!(
        (r.status, r.code()),
        (400, Some("invalid_request")),
        "{}",
        r.body
    );
    assert_eq!(api.business_date().await, real, "the clock did not move");
    // A replica without BANK_TEST_CLOCK=1 that is already running when the
    // date moves (its clock is the one its settings loop refreshes every
    // second) refuses the stored date and keeps the real one.
    let db = sea_orm::Database::connect(&core.db_url).await.unwrap();
    let mut plain = core.config.clone();
    plain.test_clock = false;
    let running = core_bank::app::clock(&plain, &db).await.unwrap();
    let moved = api.advance_business_date(3).await;
    let refused = running.refresh(&db).await;
    assert!(
        matches!(
            refused,
            Err(core_bank::clock::RefreshError::MovedByATestClock { stored, real: r })
                if stored == moved && r == real
        ),
        "{refused:?}"
    );
    assert_eq!(running.today(), real);
    let nats_url = nats.url();
    let env = [
        ("CORE_DATABASE_URL", core.db_url.as_str()),
        ("NATS_URL", nats_url.as_str()),
        ("BANK_TEST_CLOCK", "0"),
        ("CORE_HTTP_ADDR", "127.0.0.1:0"),
    ];
    let out = bank_tests::process::run_to_exit("core-bank", &[], &env, Duration::from_secs(30))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {stderr}");
    assert!(
        stderr.contains(&moved.to_string()) && stderr.contains("BANK_TEST_CLOCK=1"),
        "{stderr}"
    );
}

#[tokio::test]
async fn b31_core_admin_and_interest_routes_refuse_bad_input() {
    let (_nats, core) = core_with(CoreOptions {
        test_clock: false,
        ..CoreOptions::default()
    })
    .await;
    let api = &core.api;
    let today = api.business_date().await;
    for body in [
        json!({"today": (today + chrono::Days::new(3)).to_string()}),
        json!({"today": "not a date"}),
        json!([1]),
    ] {
        let r = api.post("/v1/admin/clock", body.clone()).await;
        assert_eq!((r.status, r.code()), (404, Some("not_found")), "{body}");
    }
    let r = api
        .send_raw("POST", "/v1/admin/clock", "text/plain", b"{".to_vec())
        .await;
    assert_eq!((r.status, r.code()), (404, Some("not_found")));
    assert_eq!(api.business_date().await, today, "the clock did not move");

    let rollout = api.get("/v1/admin/interest/rollout").await.expect(200).body;
    for body in [
        json!({"new_path_percent": 101, "shadow": false}),
        json!({"new_path_percent": -1, "shadow": false}),
        json!({"new_path_percent": "50", "shadow": false}),
        json!({"new_path_percent": 50}),
        json!({"new_path_percent": 50, "shadow": false, "extra": 1}),
    ] {
        let r = api.put("/v1/admin/interest/rollout", body.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (400, Some("invalid_request")),
            "{body}"
        );
    }
    assert_eq!(
        api.get("/v1/admin/interest/rollout").await.expect(200).body,
        rollout,
        "the rollout did not change"
    );
    for body in [
        json!({"sample": 0}),
        json!({"sample": 10_001}),
        json!({"sample": "5"}),
    ] {
        let r = api.post("/v1/admin/interest/verify", body.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (400, Some("invalid_request")),
            "{body}"
        );
    }
    // An optional body still has to say what it is: bytes without a
    // Content-Type are refused, not ignored in favour of the defaults.
    for headers in [&[][..], &[("content-type", "text/plain")][..]] {
        let r = api
            .send_bytes(
                "POST",
                "/v1/admin/interest/verify",
                headers,
                br#"{"sample":1}"#.to_vec(),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (415, Some("unsupported_media_type")),
            "{headers:?}"
        );
    }
    let r = api
        .send_raw(
            "POST",
            "/v1/admin/interest/verify",
            "application/json",
            b"{not json".to_vec(),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, Some("malformed_json")));
    let doc = api.get("/openapi.json").await.expect(200);
    let verify_body = &doc.body["paths"]["/v1/admin/interest/verify"]["post"]["requestBody"];
    assert!(
        verify_body.get("required").is_none_or(|r| r == false),
        "the published contract says the body is optional: {verify_body}"
    );

    let account = api.funded_account(1_000_000).await;
    for body in [
        json!({"payout_id": "bad.id"}),
        json!({"payout_id": 7}),
        json!({}),
    ] {
        let r = api
            .post(
                &format!("/v1/accounts/{account}/interest/payouts"),
                body.clone(),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (400, Some("invalid_request")),
            "{body}"
        );
    }
    assert_eq!(
        api.get(&format!("/v1/accounts/{account}/interest/payouts/bad.id"))
            .await
            .expect(400)
            .code(),
        Some("invalid_id")
    );
    assert_eq!(api.balance(&account).await, 1_000_000, "nothing was paid");
}

#[tokio::test]
async fn b01_an_accounts_entry_dates_never_go_back_between_replicas_a_moment_apart() {
    let nats = NatsServer::start().await.unwrap();
    let a = CoreApp::spawn(&nats).await.unwrap();
    let b = a.replica(&nats).await.unwrap();
    let account = a.api.funded_account(1_000).await;
    let today = a.api.business_date().await;
    // Replica a passes midnight first and writes an entry of the new date;
    // replica b (its clock a moment behind: it reads the new date within a
    // second) writes the next entry of the account.
    let tomorrow = a.api.advance_business_date(1).await;
    a.api.deposit(&account, 10).await.expect(200);
    b.api.deposit(&account, 20).await.expect(200);
    let entries = a
        .api
        .get(&format!(
            "/v1/accounts/{account}/entries?after_seq=0&limit=10"
        ))
        .await
        .expect(200)
        .body["entries"]
        .as_array()
        .unwrap()
        .clone();
    let dates: Vec<&str> = entries
        .iter()
        .map(|e| e["business_date"].as_str().unwrap())
        .collect();
    let (d0, d1) = (today.to_string(), tomorrow.to_string());
    assert_eq!(dates, [d0.as_str(), d1.as_str(), d1.as_str()]);
}

/// A batch failing for a reason of the database as a whole (here a statement
/// timeout behind a table lock, as a stalled disk would cause) is answered to
/// all its commands at once: run one by one, each would meet the same failure
/// again, one after another, while their callers wait. (A failure that may be
/// one command's still splits the batch: one bad command cannot fail its
/// neighbours.)
#[tokio::test]
async fn f7_a_batch_failing_for_the_whole_database_is_not_run_again_command_by_command() {
    let nats = NatsServer::start().await.unwrap();
    let stack = bank_tests::procs::ProcStack::start(
        &nats,
        HashMap::from([
            ("LEDGER_WORKERS".to_owned(), "1".to_owned()),
            (
                "DATABASE_STATEMENT_TIMEOUT_MS".to_owned(),
                "3000".to_owned(),
            ),
            ("DATABASE_LOCK_TIMEOUT_MS".to_owned(), "30000".to_owned()),
        ]),
    )
    .await
    .unwrap();
    let core = stack.core_api();
    let from = core.funded_account(1_000).await;
    let to = core.funded_account(0).await;
    let failures = || bank_tests::metrics::read(&core.base, "ledger_batch_failures_total");
    let before = failures().await;
    // The one worker's first batch waits on the lock; the next commands
    // queue behind it and become one batch of seven.
    let lock = RowLock::table(&stack.cfg.core_db, "transfers")
        .await
        .unwrap();
    let first = tokio::spawn({
        let (core, from, to) = (core.clone(), from.clone(), to.clone());
        async move { core.core_transfer(&from, &to, 1).await }
    });
    lock.until_waited_on("the first batch").await;
    let rest = join_all((0..7).map(|_| core.core_transfer(&from, &to, 1))).await;
    let first = first.await.unwrap();
    lock.release().await.unwrap();
    for answer in std::iter::once(&first).chain(&rest) {
        assert!(answer.status >= 500, "{} {}", answer.status, answer.body);
    }
    assert_eq!(
        failures().await - before,
        2.0,
        "two failed batches, not one per command"
    );
    assert_eq!(core.balance(&from).await, 1_000);
    assert_eq!(core.balance(&to).await, 0);
}
