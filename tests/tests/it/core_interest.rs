//! Interest now: B21-B27 and F8.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use bank_tests::apps::{CoreOptions, core, core_with};
use bank_tests::db::RowLock;
use bank_tests::nats::{free_port, stream_messages};
use bank_tests::{Api, CoreApp, NatsServer, eventually, unique};
use chrono::NaiveDate;
use futures::future::join_all;
use proptest::prelude::*;
use redis::AsyncCommands;
use serde_json::{Value, json};

/// A core with an account of 60,000,000 won three days into accruing
/// (gross 8,301), and a connection to the Redis of its cache.
async fn accrued_for_three_days() -> (
    NatsServer,
    CoreApp,
    String,
    NaiveDate,
    redis::aio::MultiplexedConnection,
) {
    let (nats, core, account, day) = accrued_with(CoreOptions::default()).await;
    let redis = redis::Client::open(bank_tests::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    (nats, core, account, day, redis)
}

/// Like [`accrued_for_three_days`], for a core with `opts` (its own Redis,
/// say), without the connection.
async fn accrued_with(opts: CoreOptions) -> (NatsServer, CoreApp, String, NaiveDate) {
    let (nats, core) = core_with(opts).await;
    let account = core.api.funded_account(60_000_000).await;
    let day = core.api.advance_business_date(3).await;
    (nats, core, account, day)
}

/// The fault shadow verification exists for: the new path's maintained
/// daily balances drift from the history the legacy path recomputes from
/// (here 10,000,000 won more on every stored day of `account`).
async fn drift_daily_balances(db_url: &str, account: &str) {
    use sea_orm::ConnectionTrait;
    let db = sea_orm::Database::connect(db_url).await.unwrap();
    let drifted = db
        .execute_unprepared(&format!(
            "UPDATE daily_balances SET closing_balance = closing_balance + 10000000 \
             WHERE account_id = '{account}'"
        ))
        .await
        .unwrap()
        .rows_affected();
    assert!(drifted > 0, "{account} has daily balances to drift");
}

async fn set_rollout(api: &Api, percent: u8, shadow: bool) {
    api.put(
        "/v1/admin/interest/rollout",
        json!({"new_path_percent": percent, "shadow": shadow}),
    )
    .await
    .expect(200);
}

/// Queries the expected interest until the answer is in the cache under
/// `path` (an invalidation still on its way to Redis makes the account
/// bypass the cache); returns the last answer.
async fn query_until_cached(
    api: &Api,
    redis: &redis::aio::MultiplexedConnection,
    account: &str,
    day: NaiveDate,
    path: &str,
) -> Value {
    let key = format!("bank:interest:{account}:{day}:{path}");
    eventually(
        &format!("the {path} path's figure is cached"),
        Duration::from_secs(10),
        || {
            let mut redis = redis.clone();
            let key = key.clone();
            async move {
                let answer = interest(api, account).await;
                let stored: bool = redis::cmd("EXISTS")
                    .arg(key)
                    .query_async(&mut redis)
                    .await
                    .map_err(|e| e.to_string())?;
                if stored {
                    Ok(answer)
                } else {
                    Err("not cached yet".into())
                }
            }
        },
    )
    .await
}

async fn interest(api: &Api, account: &str) -> Value {
    api.get(&format!("/v1/accounts/{account}/interest"))
        .await
        .expect(200)
        .body
}

async fn payout(api: &Api, account: &str, payout_id: &str) -> bank_tests::Reply {
    api.post(
        &format!("/v1/accounts/{account}/interest/payouts"),
        json!({"payout_id": payout_id}),
    )
    .await
}

#[tokio::test]
async fn b21_worked_example_on_both_paths() {
    let (_nats, core) = core().await;
    // Two accounts with the same history, one served by each path (a cached
    // figure would hide the second path, so each account is queried once).
    let on_legacy = core.api.funded_account(60_000_000).await;
    let on_new = core.api.funded_account(60_000_000).await;
    let opened = core.api.business_date().await;
    core.api.advance_business_date(3).await;
    for (percent, account, path) in [(0, &on_legacy, "legacy"), (100, &on_new, "new")] {
        set_rollout(&core.api, percent, false).await;
        let i = interest(&core.api, account).await;
        assert_eq!(i["path"], path);
        assert_eq!(i["days"], 3);
        assert_eq!(i["from"], json!(opened.to_string()));
        assert_eq!(
            i["through"],
            json!((opened + chrono::Duration::days(2)).to_string())
        );
        assert_eq!(
            (i["gross"].as_str(), i["tax"].as_str(), i["net"].as_str()),
            (Some("8301"), Some("1278"), Some("7023"))
        );
    }
}

/// B21/B23: the tiers and the tax rate are settings, not constants: with
/// 3.65% up to 1,000,000 won and 0.365% above, and 10% tax, one day on
/// 2,000,000 won earns 100 + 10 = 110 won gross, 11 tax, 99 net, on both
/// paths, in the query, the payout and its event.
#[tokio::test]
async fn b21_b23_configured_tiers_and_tax_rate_are_the_ones_applied() {
    let (nats, core) = core_with(CoreOptions {
        interest_tiers: Some("1000000:3.65,*:0.365".into()),
        interest_tax_percent: Some("10".into()),
        ..Default::default()
    })
    .await;
    let api = &core.api;
    let on_legacy = api.funded_account(2_000_000).await;
    let on_new = api.funded_account(2_000_000).await;
    api.advance_business_date(1).await;
    for (percent, account, path) in [(0, &on_legacy, "legacy"), (100, &on_new, "new")] {
        set_rollout(api, percent, false).await;
        let i = interest(api, account).await;
        assert_eq!(i["path"], path);
        assert_eq!(
            (i["gross"].as_str(), i["tax"].as_str(), i["net"].as_str()),
            (Some("110"), Some("11"), Some("99")),
            "{path}: {i}"
        );
    }
    let pid = unique("pay_");
    let paid = payout(api, &on_new, &pid).await.expect(200).body;
    assert_eq!(
        (
            paid["gross"].as_str(),
            paid["tax"].as_str(),
            paid["net"].as_str()
        ),
        (Some("110"), Some("11"), Some("99")),
        "{paid}"
    );
    assert_eq!(api.balance(&on_new).await, 2_000_099);
    // The payout's record keeps the rates it was computed under.
    assert_eq!(
        payout_rates(&core.db_url, &pid).await,
        "1000000:0.0365,*:0.00365/0.1"
    );
    let js = nats.jetstream().await.unwrap();
    let event = eventually("the interest event", Duration::from_secs(10), || async {
        stream_messages(&js, "INTEREST")
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|m| String::from_utf8_lossy(&m.payload).contains(&pid))
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
    let ev: Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(
        (ev["gross"].as_str(), ev["tax"].as_str(), ev["net"].as_str()),
        (Some("110"), Some("11"), Some("99")),
        "{ev}"
    );
}

#[tokio::test]
async fn b21_tier_boundaries_zero_and_intraday_changes() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let exactly = api.funded_account(50_000_000).await;
    let above = api.funded_account(50_000_001).await;
    let far_above = api.funded_account(50_365_000).await;
    let zero = api.funded_account(0).await;
    let busy = api.funded_account(10_000_000).await;
    let sink = api.funded_account(0).await;
    // Within the day: +10M, -15M. Only the closing balance (5M) counts.
    api.deposit(&busy, 10_000_000).await.expect(200);
    api.core_transfer(&busy, &sink, 15_000_000)
        .await
        .expect(200);
    api.advance_business_date(1).await;
    for percent in [0, 100] {
        set_rollout(api, percent, false).await;
        // floor(50,000,000 x 0.02 / 365) = floor(2739.72) = 2739
        assert_eq!(
            api.post("/v1/admin/interest/verify", json!({}))
                .await
                .expect(200)
                .body["mismatches"],
            json!([])
        );
    }
    let i = interest(api, &exactly).await;
    assert_eq!(
        (i["gross"].as_str(), i["days"].as_i64()),
        (Some("2739"), Some(1))
    );
    // The won above the tier earns 0.1%: 1,000,000.001 / 365 still rounds to 2739.
    assert_eq!(interest(api, &above).await["gross"], "2739");
    // 365,000 won above it earn 1 won a day more: floor(2739.72 + 1) = 2740
    // (a flat 2% would give 2759, a flat 0.1% 137).
    assert_eq!(interest(api, &far_above).await["gross"], "2740");
    assert_eq!(interest(api, &zero).await["gross"], "0");
    // floor(5,000,000 x 0.02 / 365) = floor(273.97) = 273
    assert_eq!(interest(api, &busy).await["gross"], "273");
    // A jump of several days closes each day with the unchanged balance.
    api.advance_business_date(9).await;
    let i = interest(api, &exactly).await;
    // floor(10 x 1,000,000 / 365) = 27397
    assert_eq!(
        (i["gross"].as_str(), i["days"].as_i64()),
        (Some("27397"), Some(10))
    );
}

/// A payout that waits for its account's lock across a change of the
/// business date pays under the new date: it covers the day that just ended
/// and is recorded on the new date, as a payout started after the change.
#[tokio::test]
async fn b22_a_payout_waiting_for_its_lock_across_a_date_change_pays_under_the_new_date() {
    use sea_orm::{ConnectionTrait, Statement};
    let (_nats, core) = core_with(CoreOptions {
        lock_timeout_ms: 10_000,
        ..Default::default()
    })
    .await;
    let api = &core.api;
    let account = api.funded_account(60_000_000).await;
    let day = api.advance_business_date(3).await;
    let lock = RowLock::account(&core.db_url, &account).await.unwrap();
    let payout = tokio::spawn({
        let api = api.clone();
        let account = account.clone();
        async move {
            api.post(
                &format!("/v1/accounts/{account}/interest/payouts"),
                json!({"payout_id": unique("pay_")}),
            )
            .await
        }
    });
    lock.until_waited_on("the payout waits for the account's lock")
        .await;
    let next = api.advance_business_date(1).await;
    lock.release().await.unwrap();
    let db = sea_orm::Database::connect(core.db_url.as_str())
        .await
        .unwrap();
    let paid = payout.await.unwrap().expect(200);
    assert_eq!(paid.str("through"), day.to_string(), "{}", paid.body);
    let recorded = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT business_date::text AS d FROM ledger_entries \
                 WHERE account_id = '{account}' AND kind = 'interest'"
            ),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<String>("", "d")
        .unwrap();
    assert_eq!(recorded, next.to_string());
}

/// Adds 10,000,000 won to `account` on completed day `day`, committed as a
/// replica whose clock is still on that day would (its write of the day's
/// closing balance), holding the account's row until `lock` is committed.
async fn late_write(db_url: &str, account: &str, day: NaiveDate) -> RowLock {
    RowLock::closing_balance_write(db_url, account, day, 10_000_000)
        .await
        .unwrap()
}

#[tokio::test]
async fn b21_b22_a_payout_that_waited_for_its_lock_behind_a_write_of_a_completed_day_pays_on_it() {
    let (_nats, core) = core_with(CoreOptions {
        lock_timeout_ms: 10_000,
        ..Default::default()
    })
    .await;
    let api = &core.api;
    // The new path reads the daily closing balances the write changes (the
    // legacy one replays ledger entries, which it does not write).
    set_rollout(api, 100, false).await;
    let waited = api.funded_account(60_000_000).await;
    let reference = api.funded_account(60_000_000).await;
    let today = api.advance_business_date(3).await;
    let day = today.pred_opt().unwrap();
    assert_eq!(
        interest(api, &waited).await["gross"],
        "8301",
        "three days at 60,000,000 won before the write"
    );

    // The reference account gets the same write before its payout.
    late_write(&core.db_url, &reference, day)
        .await
        .commit()
        .await
        .unwrap();
    let expected = payout(api, &reference, &unique("pay_")).await.expect(200);

    // The payout of the other account waits for the lock the write holds;
    // the write commits during the wait. The statement that waited sees the
    // locked row as the write left it but everything else on its older
    // snapshot: daily balances read in that statement (one round trip fewer,
    // tried in the README's Performance section) would be of before the
    // write, 8,301 won. The payout reads them once it holds the lock.
    let lock = late_write(&core.db_url, &waited, day).await;
    let paying = tokio::spawn({
        let api = api.clone();
        let account = waited.clone();
        async move { payout(&api, &account, &unique("pay_")).await }
    });
    lock.until_waited_on("the payout waits for the account's lock")
        .await;
    lock.commit().await.unwrap();
    let paid = paying.await.unwrap().expect(200);
    assert_eq!(
        paid.str("gross"),
        expected.str("gross"),
        "the payout counts the day's closing balance written while it waited: {} / {}",
        paid.body,
        expected.body
    );
    assert_ne!(paid.str("gross"), "8301", "{}", paid.body);
}

#[tokio::test]
async fn b22_payout_once_per_day_idempotent_by_payout_id() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let account = api.funded_account(60_000_000).await;
    api.advance_business_date(3).await;
    let pid = unique("pay_");
    let first = payout(api, &account, &pid).await.expect(200);
    assert_eq!(
        (first.str("gross"), first.str("tax"), first.str("net")),
        ("8301".into(), "1278".into(), "7023".into())
    );
    assert_eq!(first.str("balance"), "60007023");
    assert_eq!(first.body["seq"], 2);
    // Same payout id: same answer, nothing moves.
    let again = payout(api, &account, &pid).await.expect(200);
    assert_eq!(first.body, again.body);
    assert_eq!(api.balance(&account).await, 60_007_023);
    // Another payout the same day.
    assert_eq!(
        payout(api, &account, &unique("pay_"))
            .await
            .expect(409)
            .code(),
        Some("already_paid_today")
    );
    // The same payout id for another account is a conflict.
    let other = api.funded_account(1_000_000).await;
    assert_eq!(
        payout(api, &other, &pid).await.expect(409).code(),
        Some("idempotency_conflict")
    );
    // It reads back as it was answered, on its account only; an unknown id
    // is not paid by reading it.
    let read = api
        .get(&format!("/v1/accounts/{account}/interest/payouts/{pid}"))
        .await
        .expect(200);
    assert_eq!(read.body, first.body);
    for (acc, id) in [(&other, pid.clone()), (&account, unique("pay_"))] {
        let r = api
            .get(&format!("/v1/accounts/{acc}/interest/payouts/{id}"))
            .await
            .expect(404);
        assert_eq!(r.code(), Some("payout_not_found"));
    }
    assert_eq!(api.balance(&account).await, 60_007_023);
    // The entry is a ledger entry of kind interest.
    let entries = api.all_entries(&account).await;
    assert_eq!(entries[1]["kind"], "interest");
    assert_eq!(entries[1]["amount"], "7023");
    assert_eq!(entries[1]["payout_id"], json!(pid));
    // Next day: one more day accrues on the new balance; payable again.
    api.advance_business_date(1).await;
    let i = interest(api, &account).await;
    assert_eq!(i["days"], 1);
    payout(api, &account, &unique("pay_")).await.expect(200);
}

#[tokio::test]
async fn b23_payout_emits_one_interest_paid_event_with_the_figures() {
    let (nats, core) = core().await;
    let api = &core.api;
    let account = api.funded_account(60_000_000).await;
    api.advance_business_date(3).await;
    let pid = unique("pay_");
    payout(api, &account, &pid).await.expect(200);
    payout(api, &account, &pid).await.expect(200);
    let js = nats.jetstream().await.unwrap();
    let msgs = eventually("bank.interest.paid", Duration::from_secs(10), || async {
        let m = stream_messages(&js, "INTEREST")
            .await
            .map_err(|e| e.to_string())?;
        if m.is_empty() {
            Err("none yet".into())
        } else {
            Ok(m)
        }
    })
    .await;
    assert_eq!(msgs.len(), 1, "one event for a replayed payout");
    let ev: Value = serde_json::from_slice(&msgs[0].payload).unwrap();
    assert_eq!(msgs[0].subject.as_str(), "bank.interest.paid");
    assert_eq!(ev["event_id"], json!(format!("interest:{pid}")));
    assert_eq!(ev["payout_id"], json!(pid));
    assert_eq!(ev["account_id"], json!(account));
    assert_eq!(
        (ev["gross"].as_str(), ev["tax"].as_str(), ev["net"].as_str()),
        (Some("8301"), Some("1278"), Some("7023"))
    );
}

/// B24 holds for a protection set while a payout waits for its account's
/// lock: the payout reads the customer as of after the wait (its customer
/// row locked with the account's), not as the statement first saw it.
#[tokio::test]
async fn b24_a_customer_protected_while_the_payout_waits_for_the_lock_is_not_paid() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let customer = api.new_customer("Protected Later").await;
    let account = api.new_account(&customer).await;
    api.deposit(&account, 60_000_000).await.expect(200);
    api.advance_business_date(2).await;
    let lock = RowLock::account(&core.db_url, &account).await.unwrap();
    let waiting = {
        let (api, account) = (api.clone(), account.clone());
        tokio::spawn(async move { payout(&api, &account, &unique("pay_")).await })
    };
    lock.until_waited_on("the payout").await;
    api.patch(
        &format!("/v1/customers/{customer}"),
        json!({"status": "hacked"}),
    )
    .await
    .expect(200);
    lock.release().await.unwrap();
    let r = waiting.await.unwrap();
    assert_eq!(
        (r.status, r.code()),
        (422, Some("customer_protected")),
        "{}",
        r.body
    );
    assert_eq!(api.balance(&account).await, 60_000_000, "nothing paid");
}

#[tokio::test]
async fn b24_payout_refusals() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let mut protected = Vec::new();
    for status in ["identity_theft", "hacked", "deceased"] {
        let c = api.new_customer("Protected").await;
        let a = api.new_account(&c).await;
        api.deposit(&a, 1_000_000).await.expect(200);
        api.patch(&format!("/v1/customers/{c}"), json!({"status": status}))
            .await
            .expect(200);
        protected.push(a);
    }
    let suspended = api
        .funded_account_with(1_000_000, json!({"status": "suspended"}))
        .await;
    let closed = api
        .funded_account_with(0, json!({"status": "closed"}))
        .await;
    let stopped = api
        .funded_account_with(1_000_000, json!({"deposit_stopped": true}))
        .await;
    let fresh = api.funded_account(1_000_000).await;
    assert_eq!(
        payout(api, &fresh, &unique("pay_"))
            .await
            .expect(422)
            .code(),
        Some("nothing_to_pay")
    );
    api.advance_business_date(2).await;
    for a in &protected {
        assert_eq!(
            payout(api, a, &unique("pay_")).await.expect(422).code(),
            Some("customer_protected")
        );
    }
    for (account, code) in [
        (&suspended, "account_not_active"),
        (&closed, "account_not_active"),
        (&stopped, "deposit_stopped"),
    ] {
        assert_eq!(
            payout(api, account, &unique("pay_"))
                .await
                .expect(422)
                .code(),
            Some(code),
            "{account}"
        );
    }
    assert_eq!(
        payout(api, "acc_nobody", &unique("pay_"))
            .await
            .expect(404)
            .code(),
        Some("account_not_found")
    );
    // A balance too small to earn a won over the days has nothing to pay.
    let tiny = api.funded_account(1).await;
    api.advance_business_date(1).await;
    assert_eq!(
        payout(api, &tiny, &unique("pay_")).await.expect(422).code(),
        Some("nothing_to_pay")
    );
}

#[tokio::test]
async fn b24_a_payout_that_would_take_the_balance_past_the_limit_is_refused() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let account = api.funded_account(0).await;
    // 10^18 won, the largest balance: a thousand of the largest movement.
    let max_won = u64::try_from(common::MAX_WON).unwrap();
    for _ in 0..20 {
        let deposits = (0..50).map(|_| api.deposit(&account, max_won));
        for r in join_all(deposits).await {
            r.expect(200);
        }
    }
    assert_eq!(
        api.balance(&account).await,
        i128::from(common::MAX_BALANCE_WON)
    );
    api.advance_business_date(3).await;
    let r = payout(api, &account, &unique("pay_")).await;
    assert_eq!(
        (r.status, r.code()),
        (422, Some("balance_limit_exceeded")),
        "{}",
        r.body
    );
    assert_eq!(
        api.balance(&account).await,
        i128::from(common::MAX_BALANCE_WON),
        "nothing paid"
    );
}

#[tokio::test]
async fn b25_cache_hit_invalidation_on_payout_and_midnight_key_change() {
    let (_nats, core, account, day, mut redis) = accrued_for_three_days().await;
    let api = &core.api;
    // The deposit's invalidation is applied to Redis in the background; until
    // then the account bypasses the cache, so query until a figure is stored.
    let first = query_until_cached(api, &redis, &account, day, "legacy").await;
    assert_eq!(first["gross"], "8301");
    // Change the truth behind the service's back: a cached answer does not see it.
    let db = sea_orm::Database::connect(core.db_url.as_str())
        .await
        .unwrap();
    use sea_orm::ConnectionTrait;
    db.execute_unprepared(&format!(
        "UPDATE daily_balances SET closing_balance = 1 WHERE account_id = '{account}';
         UPDATE ledger_entries SET balance_after = 1 WHERE account_id = '{account}';"
    ))
    .await
    .unwrap();
    assert_eq!(
        interest(api, &account).await,
        first,
        "second query is served from the cache"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("bank:interest:{account}:{day}:legacy"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let expected = secs_until_next_seoul_midnight();
    assert!(
        (ttl - expected).abs() <= 5,
        "the key expires at the next midnight in Seoul, in {expected} s (ttl {ttl})"
    );
    // Restore, pay out: the payout invalidates the entry.
    db.execute_unprepared(&format!(
        "UPDATE daily_balances SET closing_balance = 60000000 WHERE account_id = '{account}';
         UPDATE ledger_entries SET balance_after = 60000000 WHERE account_id = '{account}';"
    ))
    .await
    .unwrap();
    payout(api, &account, &unique("pay_")).await.expect(200);
    let after = interest(api, &account).await;
    assert_eq!(
        (after["days"].as_i64(), after["gross"].as_str()),
        (Some(0), Some("0"))
    );
    // Next business date: a new key, computed afresh.
    api.advance_business_date(1).await;
    let next = interest(api, &account).await;
    assert_eq!(next["days"], 1);
    assert_ne!(next["gross"], "0");
}

#[derive(Debug, Clone)]
enum Step {
    Deposit(usize, u64),
    Transfer(usize, usize, u64),
    Advance(i64),
    Payout(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..3usize, 1..80_000_000u64).prop_map(|(a, n)| Step::Deposit(a, n)),
        (0..3usize, 0..3usize, 1..40_000_000u64).prop_map(|(a, b, n)| Step::Transfer(a, b, n)),
        (1..5i64).prop_map(Step::Advance),
        (0..3usize).prop_map(Step::Payout),
    ]
}

#[test]
fn b26_legacy_and_new_paths_agree_over_random_histories() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_nats, core) = rt.block_on(core());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(step(), 1..25), |steps| {
            rt.block_on(async {
                let api = &core.api;
                let mut accounts = Vec::new();
                for _ in 0..3 {
                    accounts.push(api.funded_account(0).await);
                }
                for s in steps {
                    match s {
                        Step::Deposit(a, n) => drop(api.deposit(&accounts[a], n).await.expect(200)),
                        Step::Transfer(a, b, n) => {
                            // Refused when the funds or the accounts do not allow it.
                            let r = api.core_transfer(&accounts[a], &accounts[b], n).await;
                            assert!([200, 422].contains(&r.status), "{r:?}");
                        }
                        Step::Advance(d) => drop(api.advance_business_date(d).await),
                        Step::Payout(a) => {
                            // Refused when paid today or nothing accrued.
                            let r = payout(api, &accounts[a], &unique("pay_")).await;
                            assert!([200, 409, 422].contains(&r.status), "{r:?}");
                        }
                    }
                }
                // The verifier computes both paths for every account, uncached.
                let report = api
                    .post("/v1/admin/interest/verify", json!({}))
                    .await
                    .expect(200);
                let mismatches: Vec<&Value> = report.body["mismatches"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| accounts.iter().any(|a| m["account_id"] == json!(a)))
                    .collect();
                if !mismatches.is_empty() {
                    return Err(proptest::test_runner::TestCaseError::fail(format!(
                        "{mismatches:?}"
                    )));
                }
                Ok(())
            })
        })
        .unwrap();
}

/// The account's cache generation in Redis (none if never set or evicted).
async fn interest_generation(
    redis: &redis::aio::MultiplexedConnection,
    account: &str,
) -> Option<String> {
    redis::cmd("GET")
        .arg(format!("bank:interest-gen:{account}"))
        .query_async::<Option<String>>(&mut redis.clone())
        .await
        .unwrap()
}

/// Seconds from now to the next midnight in Asia/Seoul (the default
/// `BANK_TIME_ZONE`), computed here independently of the service.
fn secs_until_next_seoul_midnight() -> i64 {
    use chrono::TimeZone;
    let tz = chrono_tz::Asia::Seoul;
    let now = chrono::Utc::now();
    let tomorrow = now.with_timezone(&tz).date_naive() + chrono::Days::new(1);
    let midnight = tz
        .from_local_datetime(&tomorrow.and_hms_opt(0, 0, 0).unwrap())
        .earliest()
        .unwrap();
    (midnight.with_timezone(&chrono::Utc) - now).num_seconds()
}

/// B27: shadow comparisons wait for a turn in a bounded room. With the
/// shadow path held up (its table locked) and every place taken, a query
/// still answers from its own path, and the comparisons beyond the room are
/// skipped and counted instead of piling up in memory.
#[tokio::test]
async fn b27_shadow_comparisons_beyond_the_waiting_room_are_skipped_and_counted() {
    use core_bank::interest::service::{SHADOW_CONCURRENCY, SHADOW_QUEUE_MAX};
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let (_nats, core) = core_with(CoreOptions {
        lock_timeout_ms: 60_000,
        // The four held-up comparisons each keep a connection.
        db_max_connections: 12,
        ..Default::default()
    })
    .await;
    let api = &core.api;
    let over = 8;
    let mut accounts = Vec::new();
    for _ in 0..SHADOW_CONCURRENCY + SHADOW_QUEUE_MAX + over {
        accounts.push(api.funded_account(60_000_000).await);
    }
    api.advance_business_date(3).await;
    // Every account on the legacy path: only the shadow reads daily balances.
    set_rollout(api, 0, true).await;
    let db = sea_orm::Database::connect(core.db_url.as_str())
        .await
        .unwrap();
    let held = db.begin().await.unwrap();
    held.execute_unprepared("LOCK TABLE daily_balances IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let skipped = || async {
        bank_tests::metrics::metric(
            &bank_tests::metrics::scrape(&api.base).await,
            "interest_shadow_skipped_total",
        )
    };
    let before = skipped().await;

    for account in &accounts {
        let i = interest(api, account).await;
        assert_eq!(
            (i["path"].as_str(), i["gross"].as_str()),
            (Some("legacy"), Some("8301"))
        );
    }
    let after = skipped().await;
    held.rollback().await.unwrap();
    assert!(
        after - before >= over as f64,
        "{} comparisons skipped, {over} expected",
        after - before
    );
}

/// A payout cut off before its outcome is known (here the request timeout
/// drops it while it waits for the account's lock; a COMMIT whose answer was
/// lost takes the same path) still moves the account's cache generation: it
/// may have committed, and the figure from before it must not be served. It
/// moves it again once a COMMIT on its way would have landed.
#[tokio::test]
async fn b25_a_payout_cut_off_before_its_outcome_is_known_still_invalidates_the_cached_figure() {
    let nats = NatsServer::start().await.unwrap();
    let core = CoreApp::spawn(&nats).await.unwrap();
    // The payout goes to a replica whose requests are cut off after 300 ms;
    // everything else to one with the usual timeout.
    let cutting = CoreApp::spawn_with(
        &nats,
        CoreOptions {
            database_url: Some(core.db_url.clone()),
            request_timeout_ms: 300,
            lock_timeout_ms: 10_000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let api = &core.api;
    let account = api.funded_account(60_000_000).await;
    let day = api.advance_business_date(3).await;
    let redis = redis::Client::open(bank_tests::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let path = interest(api, &account).await["path"]
        .as_str()
        .unwrap()
        .to_owned();
    query_until_cached(api, &redis, &account, day, &path).await;
    let before = interest_generation(&redis, &account).await;
    assert!(before.is_some(), "a cached figure has a generation");

    let lock = RowLock::account(&core.db_url, &account).await.unwrap();
    let cut = cutting
        .api
        .post(
            &format!("/v1/accounts/{account}/interest/payouts"),
            json!({"payout_id": unique("pay_")}),
        )
        .await;
    assert_eq!((cut.status, cut.code()), (503, Some("timeout")));
    lock.release().await.unwrap();

    // It moves at once, and once more a few seconds later: a COMMIT that
    // was on its way may land after the first move, and a query in between
    // would have cached the figure from before it under the new generation.
    let moved = eventually(
        "the account's generation moves",
        Duration::from_secs(15),
        || async {
            match interest_generation(&redis, &account).await {
                now if now != before => Ok(now),
                now => Err(format!("still {now:?}")),
            }
        },
    )
    .await;
    // The replica is stopped before that: a clean shutdown makes the second
    // move before it ends.
    let mut cutting = cutting;
    cutting.stop().await.unwrap();
    assert_ne!(
        interest_generation(&redis, &account).await,
        moved,
        "the account's generation moved again before the replica stopped"
    );
}

/// Any balance change (a deposit, a transfer) invalidates the account's
/// cached figure, not only a payout: the account's generation moves, so the
/// figure stored under the old one is never served again.
#[tokio::test]
async fn b25_a_deposit_or_a_transfer_invalidates_the_cached_figure() {
    let (_nats, core, account, day, redis) = accrued_for_three_days().await;
    let api = &core.api;
    let other = api.funded_account(0).await;
    let generation = || interest_generation(&redis, &account);
    for what in ["a deposit", "a transfer out"] {
        query_until_cached(api, &redis, &account, day, "legacy").await;
        let before = generation().await;
        assert!(before.is_some(), "a cached figure has a generation");
        let answer = match what {
            "a deposit" => api.deposit(&account, 1).await,
            _ => api.core_transfer(&account, &other, 1).await,
        };
        answer.expect(200);
        eventually(
            &format!("{what} moves the generation"),
            Duration::from_secs(10),
            || async {
                let now = generation().await;
                if now != before {
                    Ok(())
                } else {
                    Err(format!("{now:?}"))
                }
            },
        )
        .await;
    }
}

/// A rollout change takes effect at once for an account whose figure is
/// already cached: rolling the new path back must not keep serving the new
/// path's cached figure (and `"path"`) until midnight. A payout's answer
/// comes only after its invalidation reached Redis.
#[tokio::test]
async fn b26_a_rollout_change_applies_to_figures_already_cached() {
    let (_nats, core, account, day, redis) = accrued_for_three_days().await;
    let api = &core.api;
    // The new path's figure is in the cache (the deposit's invalidation is
    // applied in the background; until then the account bypasses the cache).
    set_rollout(api, 100, false).await;
    query_until_cached(api, &redis, &account, day, "new").await;
    for (percent, path) in [(100, "new"), (0, "legacy"), (100, "new")] {
        set_rollout(api, percent, false).await;
        // Twice: the second answer comes from the cache once the first
        // stored it.
        for _ in 0..2 {
            let r = interest(api, &account).await;
            assert_eq!(r["path"], path, "rollout {percent}%: {r}");
            assert_eq!(r["gross"], "8301");
        }
    }
    let before = interest_generation(&redis, &account).await;
    api.post(
        &format!("/v1/accounts/{account}/interest/payouts"),
        json!({"payout_id": unique("pay_")}),
    )
    .await
    .expect(200);
    assert_ne!(
        interest_generation(&redis, &account).await,
        before,
        "the payout answered before its cache invalidation reached Redis"
    );
    assert_eq!(interest(api, &account).await["days"], 0);
}

/// Redis under an `allkeys-*` policy may evict any key, a generation among
/// them, while a figure cached under it survives.
#[tokio::test]
async fn b25_an_evicted_generation_never_brings_back_a_figure_from_before_a_payout() {
    let (_nats, core, account, day, mut redis) = accrued_for_three_days().await;
    let api = &core.api;
    let path = interest(api, &account).await["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let value_key = format!("bank:interest:{account}:{day}:{path}");
    let generation_key = format!("bank:interest-gen:{account}");
    let evicting = redis.clone();
    let evict = |keys: Vec<String>| {
        let mut redis = evicting.clone();
        async move {
            redis::cmd("DEL")
                .arg(keys)
                .query_async::<i64>(&mut redis)
                .await
                .unwrap()
        }
    };
    // Both keys evicted: the figure is cached again, under a generation
    // that did not exist before.
    query_until_cached(api, &redis, &account, day, &path).await;
    evict(vec![value_key.clone(), generation_key.clone()]).await;
    let cached = query_until_cached(api, &redis, &account, day, &path).await;
    assert_eq!(cached["gross"], "8301");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&generation_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl > 0, "the generation has a TTL: {ttl}");
    // A payout, then its generation is evicted while the old figure stays.
    api.post(
        &format!("/v1/accounts/{account}/interest/payouts"),
        json!({"payout_id": unique("pay_")}),
    )
    .await
    .expect(200);
    assert_eq!(evict(vec![generation_key.clone()]).await, 1);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&value_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        exists,
        "the figure from before the payout is still in Redis"
    );
    for _ in 0..2 {
        let after = interest(api, &account).await;
        assert_eq!(
            (after["days"].clone(), after["gross"].clone()),
            (json!(0), json!("0")),
            "{after}"
        );
    }
}

#[tokio::test]
async fn b26_rollout_buckets_are_stable_and_change_at_run_time_on_every_replica() {
    let nats = NatsServer::start().await.unwrap();
    let a = CoreApp::spawn(&nats).await.unwrap();
    let b = a.replica(&nats).await.unwrap();
    let mut accounts = Vec::new();
    for _ in 0..20 {
        accounts.push(a.api.funded_account(1000).await);
    }
    set_rollout(&a.api, 50, false).await;
    eventually(
        "replica b follows the rollout",
        Duration::from_secs(3),
        || async {
            let r = b.api.get("/v1/admin/interest/rollout").await.body;
            if r["new_path_percent"] == 50 {
                Ok(())
            } else {
                Err(r.to_string())
            }
        },
    )
    .await;
    for acct in &accounts {
        let id = common::AccountId::parse(acct.as_str()).unwrap();
        let expected = if core_bank::interest::rollout::bucket(&id) < 50 {
            "new"
        } else {
            "legacy"
        };
        for _ in 0..2 {
            // Advance the clock on both (shared database) so each query is a cache miss.
            a.api.advance_business_date(1).await;
            eventually(
                "replica b sees the new date",
                Duration::from_secs(3),
                || async {
                    if b.api.business_date().await == a.api.business_date().await {
                        Ok(())
                    } else {
                        Err("behind".into())
                    }
                },
            )
            .await;
            assert_eq!(interest(&a.api, acct).await["path"], expected);
            assert_eq!(
                interest(&b.api, acct).await["path"],
                expected,
                "same bucket on every replica"
            );
        }
    }
    assert!(
        accounts.iter().any(|acct| {
            common::AccountId::parse(acct.as_str())
                .is_ok_and(|id| core_bank::interest::rollout::bucket(&id) >= 50)
        }),
        "some account is on the legacy path before the change"
    );
    set_rollout(&a.api, 100, false).await;
    a.api.advance_business_date(1).await;
    eventually(
        "replica b switches every account to the new path within a second",
        Duration::from_secs(3),
        || async {
            for account in &accounts {
                let i = b
                    .api
                    .get(&format!("/v1/accounts/{account}/interest"))
                    .await
                    .body;
                if i["path"] != "new" {
                    return Err(i.to_string());
                }
            }
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn b27_concurrent_payouts_in_shadow_mode_publish_every_mismatch_without_starving_the_pool() {
    // A small pool, fewer connections than concurrent payouts.
    let (nats, core) = core_with(CoreOptions {
        db_max_connections: 3,
        ..Default::default()
    })
    .await;
    let api = &core.api;
    let mut accounts = Vec::new();
    for _ in 0..6 {
        accounts.push(api.funded_account(60_000_000).await);
    }
    api.advance_business_date(3).await;
    for a in &accounts {
        drift_daily_balances(&core.db_url, a).await;
    }
    set_rollout(api, 0, true).await;
    let ids: Vec<String> = accounts.iter().map(|_| unique("pay_")).collect();
    let payouts = accounts.iter().zip(&ids).map(|(a, id)| payout(api, a, id));
    for r in join_all(payouts).await {
        r.expect(200);
    }
    let js = nats.jetstream().await.unwrap();
    // Each payout reports its mismatch after its transaction, on a
    // connection of its own; reporting while holding the transaction's
    // waited for a connection none of the payouts would give back, until the
    // pool's acquire timeout, and the alerts were lost.
    eventually(
        "a mismatch alert per payout",
        Duration::from_secs(15),
        || async {
            let m = stream_messages(&js, "ALERTS")
                .await
                .map_err(|e| e.to_string())?;
            if m.len() == accounts.len() {
                Ok(())
            } else {
                Err(format!("{} alerts", m.len()))
            }
        },
    )
    .await;
}

/// B27: the shadow path's failure fails neither the query nor the payout:
/// the caller gets its bucket's figure, and the failure is logged and counted.
#[tokio::test]
async fn b27_a_failing_shadow_calculation_fails_neither_the_query_nor_the_payout() {
    use sea_orm::ConnectionTrait;
    let (_nats, core) = core().await;
    let api = &core.api;
    let account = api.funded_account(60_000_000).await;
    api.advance_business_date(3).await;
    // The fault: a daily balance the new path cannot read (it fits the
    // column, not the decimal type). With every account on the legacy path,
    // only the shadow reads daily balances.
    let db = sea_orm::Database::connect(core.db_url.as_str())
        .await
        .unwrap();
    let broken = db
        .execute_unprepared(&format!(
            "UPDATE daily_balances SET closing_balance = 10::numeric ^ 29 \
             WHERE account_id = '{account}'"
        ))
        .await
        .unwrap()
        .rows_affected();
    assert!(broken > 0);
    set_rollout(api, 0, true).await;
    let errors = || async {
        bank_tests::metrics::metric(
            &bank_tests::metrics::scrape(&api.base).await,
            "interest_shadow_errors_total",
        )
    };
    let before = errors().await;

    let i = interest(api, &account).await;
    assert_eq!(
        (i["path"].as_str(), i["gross"].as_str()),
        (Some("legacy"), Some("8301"))
    );
    let after_query = eventually(
        "the query's shadow failure counted",
        Duration::from_secs(10),
        || async {
            match errors().await {
                n if n > before => Ok(n),
                n => Err(format!("{n} shadow errors")),
            }
        },
    )
    .await;
    let r = payout(api, &account, &unique("pay_")).await.expect(200);
    assert_eq!(r.str("gross"), "8301");
    eventually(
        "the payout's shadow failure counted",
        Duration::from_secs(10),
        || async {
            match errors().await {
                n if n > after_query => Ok(()),
                n => Err(format!("{n} shadow errors")),
            }
        },
    )
    .await;
}

/// B27's batch verifier over HTTP reads up to 10,000 accounts' periods: one
/// runs at a time per process, and another request meanwhile is refused at
/// once rather than taking the pool from payouts and transfers.
#[tokio::test]
async fn b27_one_verification_runs_at_a_time_and_another_meanwhile_is_answered_409() {
    let (_nats, core) = core().await;
    let api = core.api.clone();
    api.funded_account(60_000_000).await;
    // The first verification waits on a lock of the accounts table.
    let lock = RowLock::table(&core.db_url, "accounts").await.unwrap();
    let first = tokio::spawn({
        let api = api.clone();
        async move { api.post("/v1/admin/interest/verify", json!({})).await }
    });
    lock.until_waited_on("the first verification").await;
    let second = api
        .post("/v1/admin/interest/verify", json!({"sample": 1}))
        .await
        .expect(409);
    assert_eq!(second.body["error"]["code"], "verification_running");
    lock.release().await.unwrap();
    let first = first.await.unwrap().expect(200);
    assert_eq!(first.body["checked"], 1);
    // Once it has finished, the next one runs.
    api.post("/v1/admin/interest/verify", json!({"sample": 1}))
        .await
        .expect(200);
}

/// B27's batch verifier runs over every account, for minutes on a large
/// bank: a transient database failure on one account (here a lock timeout
/// behind a table lock, as a migration would hold) is tried again, and the
/// run goes on instead of failing at the first blip.
#[tokio::test]
async fn b27_the_verifier_tries_an_account_again_after_a_transient_database_error() {
    let (_nats, core) = core().await;
    let api = core.api.clone();
    api.funded_account(60_000_000).await;
    api.advance_business_date(3).await;
    let lock = RowLock::table(&core.db_url, "daily_balances")
        .await
        .unwrap();
    let verifying = tokio::spawn({
        let api = api.clone();
        async move { api.post("/v1/admin/interest/verify", json!({})).await }
    });
    lock.until_retried("the verification tried again after its lock timeout")
        .await;
    assert!(
        !verifying.is_finished(),
        "still waiting while the lock is held"
    );
    lock.release().await.unwrap();
    let report = verifying.await.unwrap().expect(200);
    assert_eq!(report.body["checked"], 1);
    assert_eq!(report.body["mismatches"], json!([]));
}

#[tokio::test]
async fn b26_b27_drifted_daily_balances_change_only_the_new_path_and_the_mismatch_is_logged_counted_and_published()
 {
    // The core runs as a process of its own: its metrics and log lines are
    // this test's alone (the in-process apps share one metrics registry).
    let nats = NatsServer::start().await.unwrap();
    let stack = bank_tests::procs::ProcStack::start(
        &nats,
        HashMap::from([("BANK_TEST_CLOCK".to_owned(), "1".to_owned())]),
    )
    .await
    .unwrap();
    let (core, api, db_url) = (&stack.core, &stack.core_api(), &stack.cfg.core_db);
    let mismatches_counted =
        || bank_tests::metrics::read(&api.base, "interest_shadow_mismatches_total");
    let account = api.funded_account(60_000_000).await;
    let honest = api.funded_account(60_000_000).await;
    api.advance_business_date(3).await;
    drift_daily_balances(db_url, &account).await;
    set_rollout(api, 0, true).await;
    let i = interest(api, &account).await;
    assert_eq!(
        (i["path"].as_str(), i["gross"].as_str()),
        (Some("legacy"), Some("8301")),
        "the caller gets its bucket's result"
    );
    assert_eq!(interest(api, &honest).await["gross"], "8301");
    let js = nats.jetstream().await.unwrap();
    let alerts = eventually("the mismatch alert", Duration::from_secs(10), || async {
        let m = stream_messages(&js, "ALERTS")
            .await
            .map_err(|e| e.to_string())?;
        if m.is_empty() {
            Err("none yet".into())
        } else {
            Ok(m)
        }
    })
    .await;
    assert_eq!(alerts.len(), 1, "only the skewed account mismatches");
    let ev: Value = serde_json::from_slice(&alerts[0].payload).unwrap();
    assert_eq!(alerts[0].subject.as_str(), "bank.alert.interest_mismatch");
    assert_eq!(
        (
            ev["account_id"].as_str(),
            ev["legacy"].as_str(),
            ev["new"].as_str()
        ),
        (Some(account.as_str()), Some("8301"), Some("8383"))
    );
    assert_eq!(mismatches_counted().await, 1.0, "the mismatch is counted");
    // Every account on the new path, still in shadow: the caller now gets
    // the new path's figure, and the comparison is made (and reported) again.
    set_rollout(api, 100, true).await;
    let i = interest(api, &account).await;
    assert_eq!(
        (i["path"].as_str(), i["gross"].as_str()),
        (Some("new"), Some("8383")),
        "the caller gets its bucket's result"
    );
    // The comparison runs on a task of its own and is reported again: a
    // second alert row in this core's outbox (the same event, one alert per
    // mismatch and day on the stream) and a second count.
    let sql = format!(
        "SELECT count(*)::text FROM outbox WHERE subject = 'bank.alert.interest_mismatch' \
         AND payload LIKE '%{account}%'"
    );
    bank_tests::db::until_rows(
        db_url,
        &sql,
        &["2"],
        "the mismatch reported again",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(mismatches_counted().await, 2.0, "and counted again");
    let report = api
        .post("/v1/admin/interest/verify", json!({}))
        .await
        .expect(200);
    assert_eq!(report.body["checked"], 2);
    let mismatches = report.body["mismatches"].as_array().unwrap();
    assert_eq!(mismatches.len(), 1);
    assert_eq!(mismatches[0]["account_id"], json!(account));
    // The body is optional: a request without one compares every account too.
    let bare = api
        .send("POST", "/v1/admin/interest/verify", None, &[])
        .await
        .expect(200);
    assert_eq!(bare.body, report.body);
    let null = api
        .post("/v1/admin/interest/verify", Value::Null)
        .await
        .expect(200);
    assert_eq!(null.body, report.body);
    // Each of the three runs found the mismatch again: every one is counted
    // and logged, with the account.
    assert_eq!(mismatches_counted().await, 5.0);
    let logged = core.logged_lines("interest shadow mismatch");
    assert_eq!(logged.len(), 5, "{logged:?}");
    assert!(
        logged.iter().all(|l| l.contains(account.as_str())),
        "{logged:?}"
    );
}

/// The verifier compares what a payout would not: the days already paid
/// (an account paid every day has no unpaid day to compare) and the exact
/// figure below the won (a drift of 1,000 won on one day's closing balance
/// moves the interest by 0.05 won, which rounding down hides).
#[tokio::test]
async fn b27_the_verifier_sees_drift_on_paid_days_and_below_a_won() {
    use sea_orm::ConnectionTrait;
    let (_nats, core) = core().await;
    let api = &core.api;
    let paid = api.funded_account(60_000_000).await;
    let small = api.funded_account(60_000_000).await;
    // A third account without drift: checked, and not reported.
    api.funded_account(60_000_000).await;
    api.advance_business_date(3).await;
    payout(api, &paid, &unique("pay_")).await.expect(200);
    let verify = || async {
        let report = api
            .post("/v1/admin/interest/verify", json!({}))
            .await
            .expect(200)
            .body;
        assert_eq!(report["checked"], 3, "{report}");
        let mut drifted: Vec<Value> = report["mismatches"].as_array().unwrap().clone();
        drifted.sort_by_key(|m| m["account_id"].as_str().unwrap_or_default().to_owned());
        drifted
    };
    assert_eq!(verify().await, Vec::<Value>::new());
    drift_daily_balances(&core.db_url, &paid).await;
    let db = sea_orm::Database::connect(core.db_url.as_str())
        .await
        .unwrap();
    let drifted = db
        .execute_unprepared(&format!(
            "UPDATE daily_balances SET closing_balance = closing_balance + 1000 \
             WHERE account_id = '{small}' AND business_date = \
               (SELECT min(business_date) FROM daily_balances WHERE account_id = '{small}')"
        ))
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(drifted, 1);
    // The small drift does not change a whole won of what a payout pays ...
    assert_eq!(interest(api, &small).await["gross"], "8301");
    // ... and both are found, the small one by its exact figures (to the
    // won, its two paths agree).
    let found = verify().await;
    let ids: Vec<&str> = found
        .iter()
        .map(|m| m["account_id"].as_str().unwrap())
        .collect();
    let mut expected = vec![paid.as_str(), small.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    let small_found = found
        .iter()
        .find(|m| m["account_id"] == json!(small))
        .unwrap();
    assert_eq!(small_found["legacy"]["gross"], small_found["new"]["gross"]);
    assert_ne!(
        small_found["legacy_exact"], small_found["new_exact"],
        "{small_found}"
    );
}

/// The batch verifier as operators run it (`core-bank verify-interest`):
/// over all accounts or a sample, the mismatches in its JSON report, exit
/// status 1 when there are any and 0 when there are none.
#[tokio::test]
async fn b27_the_batch_verifier_command_reports_mismatches_over_all_or_a_sample() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let mut accounts = Vec::new();
    for _ in 0..3 {
        accounts.push(api.funded_account(60_000_000).await);
    }
    api.advance_business_date(3).await;
    drift_daily_balances(&core.db_url, &accounts[1]).await;
    let verify = |args: &'static [&'static str]| {
        let db_url = core.db_url.clone();
        async move {
            let args = [&["verify-interest"], args].concat();
            let redis = bank_tests::redis_url();
            // The business date was moved with the test clock, so the
            // command runs with it too (without it the core refuses a
            // database whose date a test moved ahead).
            let env = [
                ("CORE_DATABASE_URL", db_url.as_str()),
                ("REDIS_URL", redis.as_str()),
                ("BANK_TEST_CLOCK", "1"),
            ];
            let out =
                bank_tests::process::run_to_exit("core-bank", &args, &env, Duration::from_secs(60))
                    .await
                    .unwrap();
            let report: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
            // Progress on stderr (lines, as stderr is not a terminal here).
            let checked = report["checked"].as_u64().unwrap_or_default();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(&format!("verifying interest: {checked}/{checked} accounts")),
                "no progress on stderr: {stderr}"
            );
            (out.status.code(), report)
        }
    };
    let (code, report) = verify(&[]).await;
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["checked"], 3);
    let mismatches = report["mismatches"].as_array().unwrap();
    assert_eq!(mismatches.len(), 1, "{report}");
    assert_eq!(mismatches[0]["account_id"], json!(accounts[1]));
    let (_, report) = verify(&["--sample", "2"]).await;
    assert_eq!(report["checked"], 2, "{report}");
    // Repaired: no mismatch, exit 0.
    use sea_orm::ConnectionTrait;
    let db = sea_orm::Database::connect(core.db_url.as_str())
        .await
        .unwrap();
    db.execute_unprepared(&format!(
        "UPDATE daily_balances SET closing_balance = closing_balance - 10000000 \
         WHERE account_id = '{}'",
        accounts[1]
    ))
    .await
    .unwrap();
    let (code, report) = verify(&[]).await;
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["mismatches"], json!([]));
}

struct OwnRedis {
    port: u16,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    async fn start(port: u16) -> Self {
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect(
                "redis-server must be installed (make test brings it, infra/local/services.sh up)",
            );
        eventually(
            "own redis-server listening",
            Duration::from_secs(10),
            || async {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        Self {
            port,
            child: Some(child),
        }
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.unwrap();
            c.wait().await.unwrap();
        }
    }
}

#[tokio::test]
async fn f8_redis_down_interest_queries_still_answer_correctly() {
    let port = free_port();
    let mut redis = OwnRedis::start(port).await;
    let (_nats, core, account, today) = accrued_with(CoreOptions {
        redis_url: format!("redis://127.0.0.1:{}", redis.port),
        ..Default::default()
    })
    .await;
    let api = &core.api;
    let first = interest(api, &account).await;
    assert_eq!(first["gross"], "8301");
    let url = format!("redis://127.0.0.1:{port}");
    let conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let path = first["path"].as_str().unwrap();
    let cached = query_until_cached(api, &conn, &account, today, path).await;
    assert_eq!(cached["gross"], "8301");
    drop(conn);
    redis.stop().await;
    for _ in 0..3 {
        assert_eq!(
            interest(api, &account).await["gross"],
            "8301",
            "answered from the database while Redis is down"
        );
    }
    payout(api, &account, &unique("pay_")).await.expect(200);
    assert_eq!(
        interest(api, &account).await["gross"],
        "0",
        "correct after a payout while Redis is down"
    );
    let mut redis = OwnRedis::start(port).await;
    assert_eq!(
        interest(api, &account).await["gross"],
        "0",
        "correct after Redis returns"
    );
    api.advance_business_date(1).await;
    let next = interest(api, &account).await;
    assert_eq!(next["days"], 1);
    eventually(
        "the service reconnects and caches again",
        Duration::from_secs(10),
        || async {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            let _ = interest(api, &account).await;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("bank:interest:*")
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            if keys.iter().any(|k| k.contains(&account)) {
                Ok(())
            } else {
                Err(format!("keys {keys:?}"))
            }
        },
    )
    .await;
    redis.stop().await;
}

/// A rate change rolls out one replica at a time: a replica never serves a
/// figure another cached under other rates (the cached value carries the
/// rates it was computed under), so a customer is not shown one amount and
/// paid another.
#[tokio::test]
async fn b25_a_figure_cached_under_other_rates_is_not_served() {
    let (nats, old, account, today, direct) = accrued_for_three_days().await;
    let api = &old.api;
    let path = interest(api, &account).await["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let cached = query_until_cached(api, &direct, &account, today, &path).await;
    assert_eq!(cached["gross"], "8301");
    // A replica with the new rates (a flat 1%) on the same database and Redis.
    let new = bank_tests::CoreApp::spawn_with(
        &nats,
        CoreOptions {
            database_url: Some(old.db_url.clone()),
            interest_tiers: Some("*:1".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // floor(60,000,000 x 0.01 / 365 x 3) = floor(4931.5) = 4931
    for _ in 0..3 {
        assert_eq!(interest(&new.api, &account).await["gross"], "4931");
    }
    // ... and once it has cached its own figure, the old replica computes
    // its own again.
    query_until_cached(&new.api, &direct, &account, today, &path).await;
    assert_eq!(interest(api, &account).await["gross"], "8301");
    // A payout by the new replica pays, and records, the new rates.
    let pid = unique("pay_");
    let paid = payout(&new.api, &account, &pid).await.expect(200).body;
    assert_eq!(paid["gross"], "4931");
    assert_eq!(
        payout_rates(&old.db_url, &pid).await,
        core_bank::interest::calc::InterestSettings::parse(
            &new.config.interest.interest_tiers,
            &new.config.interest.interest_tax_percent
        )
        .unwrap()
        .terms()
    );
    assert!(payout_rates(&old.db_url, &pid).await.starts_with("*:0.01/"));
}

/// The rates recorded with payout `pid` in the core database at `db_url`.
async fn payout_rates(db_url: &str, pid: &str) -> String {
    let rows = bank_tests::db::query_strings(
        db_url,
        &format!("SELECT rates FROM interest_payouts WHERE payout_id = '{pid}'"),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "payout {pid}: {rows:?}");
    rows[0].clone()
}

/// F8 with Redis cut off rather than restarted empty: the cached figure from
/// before a payout is still in Redis when it comes back, and must not be
/// served (the payout's invalidation, which could not reach Redis, lands
/// when it returns; until then the account bypasses the cache).
#[tokio::test]
async fn f8_a_payout_while_redis_is_cut_off_is_not_hidden_by_the_figure_cached_before() {
    let redis_url = bank_tests::redis_url();
    let cut = bank_tests::tcp_proxy::TcpCut::before(&redis_url, 6379)
        .await
        .unwrap();
    let (_nats, core, account, today) = accrued_with(CoreOptions {
        redis_url: cut.route(&redis_url).unwrap(),
        ..Default::default()
    })
    .await;
    let api = &core.api;
    let first = interest(api, &account).await;
    assert_eq!(first["gross"], "8301");
    let path = first["path"].as_str().unwrap().to_owned();
    let direct = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    query_until_cached(api, &direct, &account, today, &path).await;

    cut.cut();
    payout(api, &account, &unique("pay_")).await.expect(200);
    let key = format!("bank:interest:{account}:{today}:{path}");
    let cached_gross = |v: Option<String>| {
        v.and_then(|v| serde_json::from_str::<Value>(&v).ok())
            .map(|v| v["accrual"]["gross"].clone())
    };
    let still_cached: Option<String> = direct.clone().get(&key).await.unwrap();
    assert_eq!(
        cached_gross(still_cached),
        Some(json!("8301")),
        "the figure from before the payout is still in Redis (the fault this test is about)"
    );
    for _ in 0..3 {
        assert_eq!(
            interest(api, &account).await["gross"],
            "0",
            "answered from the database while Redis is cut off"
        );
    }
    cut.restore();
    // Every answer from now on is the payout's, while the invalidation lands
    // and once the cache is used again.
    eventually(
        "the account is cached again, with the figure after the payout",
        Duration::from_secs(15),
        || {
            let mut direct = direct.clone();
            let (api, account, key) = (api, &account, &key);
            async move {
                let answer = interest(api, account).await;
                assert_eq!(answer["gross"], "0", "after Redis returns: {answer}");
                let cached: Option<String> = direct.get(key).await.map_err(|e| e.to_string())?;
                match cached_gross(cached) {
                    Some(gross) if gross == json!("0") => Ok(()),
                    other => Err(format!("cached gross: {other:?}")),
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn b03_b22_seed_example_payout_racing_deposits_loses_nothing() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let account = api.funded_account(60_000_000).await;
    api.advance_business_date(3).await;
    let pid = unique("pay_");
    let (p, deposits) = tokio::join!(
        payout(api, &account, &pid),
        join_all((0..8).map(|i| api.deposit(&account, 100 + i)))
    );
    let p = p.expect(200);
    for d in deposits {
        d.expect(200);
    }
    let deposited: i128 = (0..8).map(|i| 100 + i as i128).sum();
    assert_eq!(api.balance(&account).await, 60_000_000 + 7_023 + deposited);
    let entries = api.all_entries(&account).await;
    assert_eq!(entries.len(), 10);
    let mut balance = 0i128;
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["seq"], (i + 1) as i64);
        balance += e["amount"].as_str().unwrap().parse::<i128>().unwrap();
        assert_eq!(
            e["balance_after"]
                .as_str()
                .unwrap()
                .parse::<i128>()
                .unwrap(),
            balance
        );
    }
    assert_eq!(p.str("net"), "7023");
}

/// Concurrent payouts, with retries of the same payout id and a second id
/// for the same account racing each other: each request gets the answer it
/// would get alone (a replayed id the same payout, the second id
/// `already_paid_today`, refusals only for their own account), and every paid
/// account has exactly one interest entry with the next sequence number. A
/// retry that waited for the lock of its own first attempt used to be
/// refused as `nothing_to_pay`, because the statement's snapshot predated
/// the payout it had waited for.
#[tokio::test]
async fn b22_b24_concurrent_payouts_and_retries_each_get_their_own_answer() {
    let (_nats, core) = core().await;
    let api = &core.api;
    let mut accounts = Vec::new();
    for _ in 0..24 {
        accounts.push(api.funded_account(60_000_000).await);
    }
    let c = api.new_customer("Protected").await;
    let protected = api.new_account(&c).await;
    api.deposit(&protected, 60_000_000).await.expect(200);
    api.patch(&format!("/v1/customers/{c}"), json!({"status": "hacked"}))
        .await
        .expect(200);
    api.advance_business_date(3).await;
    let fresh = api.funded_account(60_000_000).await;

    // Per account: a payout id twice, and a second payout id.
    let ids: Vec<(String, String)> = accounts
        .iter()
        .map(|_| (unique("pay_"), unique("pay_")))
        .collect();
    let mut calls = Vec::new();
    for (account, (first, second)) in accounts.iter().zip(&ids) {
        calls.push((account.clone(), first.clone()));
        calls.push((account.clone(), second.clone()));
        calls.push((account.clone(), first.clone()));
    }
    calls.push((protected.clone(), unique("pay_")));
    calls.push((fresh.clone(), unique("pay_")));
    let answers = join_all(calls.iter().map(|(a, id)| payout(api, a, id))).await;

    let n = accounts.len();
    for (k, account) in accounts.iter().enumerate() {
        let (a, b, again) = (&answers[3 * k], &answers[3 * k + 1], &answers[3 * k + 2]);
        let (winner, loser) = match (a.status, b.status) {
            (200, 409) => (a, b),
            (409, 200) => (b, a),
            other => panic!("{account}: one payout must succeed, got {other:?}"),
        };
        assert_eq!(loser.code(), Some("already_paid_today"), "{account}");
        // The replayed id answers like its first request.
        assert_eq!(again.status, a.status, "{account}");
        if a.status == 200 {
            assert_eq!(again.body, a.body, "{account}");
        }
        assert_eq!(winner.str("net"), "7023");
        assert_eq!(winner.str("balance"), "60007023");
        assert_eq!(winner.body["seq"], 2);
        assert_eq!(api.balance(account).await, 60_007_023);
        let entries = api.all_entries(account).await;
        assert_eq!(entries.len(), 2, "{account}: one interest entry");
        assert_eq!(entries[1]["kind"], "interest");
        assert_eq!(entries[1]["payout_id"], winner.body["payout_id"]);
    }
    assert_eq!(answers[3 * n].code(), Some("customer_protected"));
    assert_eq!(answers[3 * n + 1].code(), Some("nothing_to_pay"));
    assert_eq!(api.balance(&protected).await, 60_000_000);
}

/// A replica refreshes the business date and the rollout every second while
/// its HTTP handlers may change them. A refresh that read the row just before
/// a local change committed must not undo that change when it lands after it
/// (it did: the replica served the old date or rollout for up to a second).
#[tokio::test]
async fn b26_a_refresh_that_read_the_old_row_never_undoes_a_newer_local_change() {
    use core_bank::clock::Clock;
    use core_bank::interest::rollout::{Rollout, RolloutSetting};

    let (_nats, core) = core().await;
    let db = sea_orm::Database::connect(core.db_url.as_str())
        .await
        .unwrap();

    // The clock: set forward here, then a refresh reads an older date (the
    // row as it was before the set committed).
    let clock = Clock::new(chrono_tz::Asia::Seoul, true);
    let start = clock.today();
    let later = start + chrono::Duration::days(3);
    clock.set(&db, later).await.unwrap();
    sea_orm::ConnectionTrait::execute_unprepared(
        &db,
        &format!(
            "UPDATE business_clock SET today = '{}' WHERE id = 1",
            start + chrono::Duration::days(1)
        ),
    )
    .await
    .unwrap();
    clock.refresh(&db).await.unwrap();
    assert_eq!(clock.today(), later, "the business date never moves back");

    // The rollout: a refresh reads the row, a local store commits, then the
    // refresh applies what it read.
    let rollout = Rollout::default();
    rollout.refresh(&db).await.unwrap();
    let old = rollout.get();
    let ticket = rollout.refresh_ticket();
    let read = Rollout::read(&db).await.unwrap().unwrap();
    assert_eq!(read, old);
    let new = RolloutSetting {
        new_path_percent: 70,
        shadow: true,
    };
    rollout.store(&db, new).await.unwrap();
    rollout.apply_refreshed(ticket, read);
    assert_eq!(rollout.get(), new, "the stale read was discarded");
    // The next refresh reads the stored row and keeps it.
    rollout.refresh(&db).await.unwrap();
    assert_eq!(rollout.get(), new);
}
