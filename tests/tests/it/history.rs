//! The channel history: B17-B19.

use std::collections::HashSet;
use std::time::Duration;

use axum::http::Method;
use bank_tests::proxy::Action;
use bank_tests::{Stack, StackOptions};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};

/// A stack whose transfer service waits 300 ms for the core (transfers the
/// core does not answer at once stay pending).
fn core_timeout_300ms() -> StackOptions {
    StackOptions {
        transfer: bank_tests::apps::TransferOptions {
            core_timeout_ms: 300,
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn deposits(stack: &Stack, account: &str, n: usize) {
    for i in 0..n {
        stack
            .core
            .api
            .deposit(account, 100 + i as u64)
            .await
            .expect(200);
    }
}

/// The seqs of the account's first history page of `limit`, as listed.
async fn history_seqs(api: &bank_tests::client::Api, account: &str, limit: u32) -> Vec<i64> {
    let h = api
        .get(&format!("/v1/accounts/{account}/history?limit={limit}"))
        .await
        .expect(200)
        .body;
    h["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {h}"))
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn b17_keyset_pages_cover_every_seq_once_newest_first_with_an_index_scan() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (_, account, api) = stack.customer_with_account(0).await;
    deposits(&stack, &account, 250).await;
    let s = api
        .post(&format!("/v1/accounts/{account}/history/sync"), json!({}))
        .await
        .expect(200);
    assert_eq!(s.body["synced_through_seq"], 250);
    let mut seqs = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/accounts/{account}/history?limit=20&cursor={c}"),
            None => format!("/v1/accounts/{account}/history?limit=20"),
        };
        let page = api.get(&path).await.expect(200).body;
        pages += 1;
        for e in page["entries"].as_array().unwrap() {
            seqs.push(e["seq"].as_i64().unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 20, "pagination does not end");
    }
    assert_eq!(pages, 13);
    assert_eq!(
        seqs,
        (1..=250).rev().collect::<Vec<i64>>(),
        "every seq exactly once, newest first"
    );

    // Page cost does not depend on depth: both the first and a deep page are
    // a backward range scan of the primary key, with no sort.
    // The plan is checked on a table the size of a real channel: other
    // accounts' entries around this one (100,000 rows), then fresh statistics.
    let db = Database::connect(stack.transfer.db_url.as_str())
        .await
        .unwrap();
    db.execute_unprepared(
        "INSERT INTO history_entries (account_id, seq, kind, amount, balance_after, occurred_at, business_date)          SELECT 'acc_other_' || (g / 100), g % 100 + 1, 'deposit', 1, g % 100 + 1, now(), current_date          FROM generate_series(0, 99999) g;
         ANALYZE history_entries",
    )
    .await
    .unwrap();
    for before in [i64::MAX, 31] {
        let plan = db
            .query_one_raw(Statement::from_sql_and_values(
                db.get_database_backend(),
                format!(
                    "EXPLAIN (FORMAT JSON) {}",
                    transfer::history::page::PAGE_SQL
                ),
                [account.clone().into(), before.into(), 20i64.into()],
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<Value>(0)
            .unwrap();
        let text = plan.to_string();
        assert!(text.contains("\"Node Type\":\"Index Scan\""), "{text}");
        assert!(text.contains("\"Scan Direction\":\"Backward\""), "{text}");
        assert!(text.contains("history_entries_pkey"), "{text}");
        assert!(!text.contains("\"Sort\""), "no sort node: {text}");
        assert!(!text.contains("\"Seq Scan\""), "no sequential scan: {text}");
    }
}

/// Infinite scroll appends pages: the transfers in flight are listed on the
/// first page, not again on every later one.
#[tokio::test]
async fn b17_b18_pending_transfers_are_listed_on_the_first_page_only() {
    let stack = Stack::start(core_timeout_300ms()).await.unwrap();
    let (_, account, api) = stack.customer_with_account(10_000).await;
    deposits(&stack, &account, 4).await;
    let to = stack.core.api.funded_account(0).await;
    // Lost on its way to the core: pending until the TTL (60 s here).
    stack
        .proxy
        .add(Some(Method::POST), "/v1/transfers", Action::Drop, Some(1));
    let id = api
        .post(
            "/v1/transfers",
            json!({"from_account": account, "to_account": to, "amount": "500"}),
        )
        .await
        .expect(202)
        .str("transfer_id");
    let first = api
        .get(&format!("/v1/accounts/{account}/history?limit=2"))
        .await
        .expect(200)
        .body;
    assert_eq!(first["pending"][0]["transfer_id"], json!(id), "{first}");
    assert_eq!(first["pending"][0]["status"], "pending", "{first}");
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let second = api
        .get(&format!(
            "/v1/accounts/{account}/history?limit=2&cursor={cursor}"
        ))
        .await
        .expect(200)
        .body;
    assert_eq!(
        second["entries"].as_array().map(Vec::len),
        Some(2),
        "{second}"
    );
    assert_eq!(second["pending"], json!([]), "{second}");
}

/// The core executes a pending transfer while a history request is syncing
/// (its entries fetch already answered, without the transfer). The answer
/// must still show the transfer: as pending, or as an entry, never as
/// neither (settling after the sync used to mark it succeeded and then serve
/// a page without it).
#[tokio::test]
async fn b18_a_transfer_executed_during_the_sync_is_shown_pending_or_as_an_entry() {
    // No projector: whatever the history shows comes from the on-demand sync.
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (_, account, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    stack
        .proxy
        .add(Some(Method::POST), "/v1/transfers", Action::Hold, Some(1));
    let sent = api
        .post(
            "/v1/transfers",
            json!({"from_account": account, "to_account": to, "amount": "500"}),
        )
        .await
        .expect(202);
    let id = sent.str("transfer_id");
    // The history's entries fetch is answered by the core at once, but the
    // answer reaches the channel only 3 s later.
    stack.proxy.add(
        Some(Method::GET),
        "/entries",
        Action::DelayResponse(Duration::from_secs(3)),
        Some(1),
    );
    let history = tokio::spawn({
        let api = api.clone();
        let account = account.clone();
        async move { api.get(&format!("/v1/accounts/{account}/history")).await }
    });
    bank_tests::eventually(
        "the core answered the history's entries fetch",
        Duration::from_secs(10),
        || async {
            let answered = stack.proxy.answered();
            if answered
                .iter()
                .any(|(m, p, _)| m == Method::GET && p.contains("/entries"))
            {
                Ok(())
            } else {
                Err(format!("{answered:?}"))
            }
        },
    )
    .await;
    // Now the core executes the transfer, before that answer arrives.
    stack.proxy.release_held();
    bank_tests::eventually(
        "the core executed the transfer",
        Duration::from_secs(10),
        || async {
            let r = stack.core.api.get(&format!("/v1/transfers/{id}")).await;
            if r.status == 200 && r.body["status"] == "succeeded" {
                Ok(())
            } else {
                Err(r.body.to_string())
            }
        },
    )
    .await;
    let h = history.await.unwrap().expect(200).body;
    let pending = h["pending"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["transfer_id"] == json!(id));
    let entry = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["transfer_id"] == json!(id));
    assert!(pending || entry, "the transfer is in neither list: {h}");
}

/// A customer told "sent" finds the transfer even when the history cannot be
/// synced: no projector, and the core's entries cannot be read. The transfer
/// the core confirmed is listed with the pending ones, with its status.
#[tokio::test]
async fn b18_a_confirmed_transfer_is_listed_while_the_history_cannot_be_synced() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (_, account, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    stack
        .proxy
        .add(Some(Method::GET), "/entries", Action::Fail(503), None);
    let sent = api
        .post(
            "/v1/transfers",
            json!({"from_account": account, "to_account": to, "amount": "500"}),
        )
        .await
        .expect(200);
    let id = sent.str("transfer_id");
    let history = api
        .get(&format!("/v1/accounts/{account}/history"))
        .await
        .expect(200);
    // The sync was tried and refused (the fault took effect), so the
    // transfer cannot be an entry: it is listed, with the core's outcome.
    assert!(
        stack
            .proxy
            .applied()
            .iter()
            .any(|(m, path, action)| *m == Method::GET
                && path.contains("/entries")
                && *action == "fail"),
        "the history did not try to read the core's entries"
    );
    let entries = history.body["entries"].as_array().unwrap();
    let pending = history.body["pending"].as_array().unwrap();
    assert!(
        !entries.iter().any(|e| e["transfer_id"] == json!(id)),
        "{}",
        history.body
    );
    assert!(
        pending
            .iter()
            .any(|p| p["transfer_id"] == json!(id) && p["status"] == "succeeded"),
        "the sent transfer is not listed: {}",
        history.body
    );

    // Once the core can be read again, it is an entry and no longer listed.
    stack.proxy.clear();
    let history = api
        .get(&format!("/v1/accounts/{account}/history"))
        .await
        .expect(200);
    assert!(
        history.body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["transfer_id"] == json!(id)),
        "{}",
        history.body
    );
    assert_eq!(history.body["pending"], json!([]), "{}", history.body);
}

/// A slow core does not hold the history: the account's pending transfers
/// are asked about together within a budget, and what did not settle is
/// listed as pending. (Asked one at a time, eight transfers at the client's
/// 5 s timeout each held the page past the 30 s HTTP timeout: 503.)
#[tokio::test]
async fn b18_history_answers_with_pending_transfers_listed_while_the_core_is_slow() {
    let stack = Stack::start(core_timeout_300ms()).await.unwrap();
    let (_, account, api) = stack.customer_with_account(0).await;
    // Eight incoming transfers the core never receives: pending.
    stack
        .proxy
        .add(Some(Method::POST), "/v1/transfers", Action::Drop, None);
    for _ in 0..8 {
        let (_, from, sender) = stack.customer_with_account(1_000).await;
        sender
            .post(
                "/v1/transfers",
                json!({"from_account": from, "to_account": account, "amount": "100"}),
            )
            .await
            .expect(202);
    }
    // The core answers status questions only after the client gave up.
    stack.proxy.add(
        Some(Method::GET),
        "/v1/transfers/",
        Action::DelayResponse(Duration::from_secs(6)),
        None,
    );
    let asked_from = std::time::Instant::now();
    let history = api
        .get(&format!("/v1/accounts/{account}/history"))
        .await
        .expect(200);
    assert_eq!(
        history.body["pending"].as_array().map(Vec::len),
        Some(8),
        "{}",
        history.body
    );
    // It did ask the core (and the core was slow), not skip the question:
    // the page waited the 2 s budget for the answers. (The proxy's count
    // below alone cannot show it: the resolvers ask about the same
    // transfers meanwhile.)
    let took = asked_from.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the history did not wait for the core's answers: {took:?}"
    );
    let asked = stack
        .proxy
        .applied()
        .iter()
        .filter(|(m, path, action)| {
            *m == Method::GET && path.starts_with("/v1/transfers/") && *action == "delay response"
        })
        .count();
    assert!(asked > 0, "no status question reached the core");
    assert!(
        stack
            .proxy
            .seen()
            .iter()
            .any(|(m, path, at)| *m == Method::GET
                && path.starts_with("/v1/transfers/")
                && *at >= asked_from),
        "no status question during the history request"
    );
}

#[tokio::test]
async fn b18_history_syncs_from_the_core_when_the_channel_knows_of_unshown_activity() {
    // No projector: whatever the history shows comes from the on-demand sync.
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (_, account, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    // Nothing pending and nothing confirmed yet: the (empty) copy is served.
    let h = api
        .get(&format!("/v1/accounts/{account}/history"))
        .await
        .expect(200)
        .body;
    assert_eq!(h["synced_through_seq"], 0);

    // A transfer told "sent" is always in the history.
    let sent = api
        .post(
            "/v1/transfers",
            json!({"from_account": account, "to_account": to, "amount": "1000"}),
        )
        .await
        .expect(200);
    let h = api
        .get(&format!("/v1/accounts/{account}/history"))
        .await
        .expect(200)
        .body;
    let seqs: Vec<i64> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        vec![2, 1],
        "the deposit and the transfer, synced from the core"
    );
    assert_eq!(h["entries"][0]["transfer_id"], sent.body["transfer_id"]);

    // A pending transfer is shown as pending while the core has not executed it.
    stack
        .proxy
        .add(Some(Method::POST), "/v1/transfers", Action::Hold, Some(1));
    let pending = tokio::spawn({
        let api = api.clone();
        let (account, to) = (account.clone(), to.clone());
        async move {
            api.post(
                "/v1/transfers",
                json!({"from_account": account, "to_account": to, "amount": "500"}),
            )
            .await
        }
    });
    let held_id = bank_tests::eventually(
        "the second transfer is pending",
        Duration::from_secs(10),
        || async {
            let h = api
                .get(&format!("/v1/accounts/{account}/history"))
                .await
                .expect(200)
                .body;
            match h["pending"].as_array().and_then(|p| p.first()) {
                Some(p) => Ok(p["transfer_id"].as_str().unwrap().to_owned()),
                None => Err(h.to_string()),
            }
        },
    )
    .await;
    let h = api
        .get(&format!("/v1/accounts/{account}/history"))
        .await
        .expect(200)
        .body;
    assert_eq!(h["pending"][0]["status"], "pending");
    assert_eq!(h["entries"].as_array().unwrap().len(), 2);
    // The core executes it; opening the history syncs its entry even without a projector.
    stack.proxy.release_held();
    let _ = pending.await;
    let h = bank_tests::eventually(
        "the executed transfer in the history",
        Duration::from_secs(10),
        || async {
            let h = api
                .get(&format!("/v1/accounts/{account}/history"))
                .await
                .expect(200)
                .body;
            if h["synced_through_seq"] == 3 && h["pending"].as_array().is_some_and(|p| p.is_empty())
            {
                Ok(h)
            } else {
                Err(h.to_string())
            }
        },
    )
    .await;
    assert_eq!(h["entries"][0]["transfer_id"], json!(held_id));
    assert_eq!(h["entries"][0]["amount"], "-500");
    assert_eq!(h["entries"][0]["balance_after"], "8500");
}

/// A quiet account whose history holds entries past the core's last seq
/// that are not the core's (a forged event that continued the balances) is
/// cut back to the core's ledger by a manual sync: no later entry of the
/// core would ever contradict them.
#[tokio::test]
async fn b19_a_manual_sync_cuts_back_entries_past_the_cores_ledger_that_are_not_the_cores() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (_, account, api) = stack.customer_with_account(0).await;
    deposits(&stack, &account, 2).await;
    let synced = api
        .post(&format!("/v1/accounts/{account}/history/sync"), json!({}))
        .await
        .expect(200);
    assert_eq!(synced.body["synced_through_seq"], 2);
    // Deposits of 100 and 101: the forged seqs 3 and 4 continue the balance.
    let id = common::AccountId::parse(account.clone()).unwrap();
    let db = Database::connect(stack.transfer.db_url.as_str())
        .await
        .unwrap();
    let forged = [
        bank_tests::verify::deposit_entry(&id, 3, 7, 208),
        bank_tests::verify::deposit_entry(&id, 4, 1, 209),
    ];
    let written = transfer::history::writer::apply(&db, &forged)
        .await
        .unwrap();
    assert_eq!(written.applied, 2);

    let cut = api
        .post(&format!("/v1/accounts/{account}/history/sync"), json!({}))
        .await
        .expect(200);
    assert_eq!(
        cut.body,
        json!({"account_id": account, "synced_through_seq": 2, "applied": 0})
    );
    assert_eq!(history_seqs(&api, &account, 100).await, [2, 1]);
}

#[tokio::test]
async fn b19_manual_sync_applies_what_is_missing_once() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (_, account, api) = stack.customer_with_account(0).await;
    deposits(&stack, &account, 5).await;
    let first = api
        .post(&format!("/v1/accounts/{account}/history/sync"), json!({}))
        .await
        .expect(200);
    assert_eq!(
        first.body,
        json!({"account_id": account, "synced_through_seq": 5, "applied": 5})
    );
    let again = api
        .post(&format!("/v1/accounts/{account}/history/sync"), json!({}))
        .await
        .expect(200);
    assert_eq!(again.body["applied"], 0);
    deposits(&stack, &account, 2).await;
    let more = api
        .post(&format!("/v1/accounts/{account}/history/sync"), json!({}))
        .await
        .expect(200);
    assert_eq!(
        (
            more.body["synced_through_seq"].as_i64(),
            more.body["applied"].as_i64()
        ),
        (Some(7), Some(2))
    );
    let seqs: HashSet<i64> = history_seqs(&api, &account, 100)
        .await
        .into_iter()
        .collect();
    assert_eq!(seqs, (1..=7).collect());
    // With the core unreachable the sync says so, and nothing breaks.
    stack.proxy.add(None, "/entries", Action::Fail(503), None);
    let r = api
        .post(&format!("/v1/accounts/{account}/history/sync"), json!({}))
        .await;
    assert_eq!((r.status, r.code()), (503, Some("unavailable")));
}
