//! The transfer service: B9-B13, B20, B30, B31 and F1-F4.

use std::time::{Duration, Instant};

use axum::http::Method;
use bank_tests::apps::TransferOptions;
use bank_tests::nats::stream_messages;
use bank_tests::proxy::Action;
use bank_tests::tcp_proxy::TcpCut;
use bank_tests::{Api, Reply, Stack, StackOptions, TransferApp, eventually, unique};
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};

async fn send(api: &Api, from: &str, to: &str, amount: u64) -> Reply {
    api.post(
        "/v1/transfers",
        json!({"from_account": from, "to_account": to, "amount": amount.to_string()}),
    )
    .await
}

async fn status(api: &Api, id: &str) -> Value {
    api.get(&format!("/v1/transfers/{id}"))
        .await
        .expect(200)
        .body
}

async fn wait_status(api: &Api, id: &str, want: &str, within: Duration) -> Value {
    eventually(&format!("transfer {id} {want}"), within, || async {
        let s = status(api, id).await;
        if s["status"] == want {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await
}

/// Until the next `proxy.clear()`, the transfer service cannot learn a
/// transfer's outcome from the core's status endpoint, so a pending transfer
/// stays pending while a test checks what happens meanwhile (its resolver
/// would otherwise clear it within ~100 ms, racing the check on a loaded
/// machine).
fn hide_core_status(stack: &Stack) {
    stack
        .proxy
        .add(Some(Method::GET), "/v1/transfers/", Action::Fail(503), None);
}

fn fast(ttl: u64, core_timeout_ms: u64) -> StackOptions {
    StackOptions {
        transfer: TransferOptions {
            request_ttl_secs: ttl,
            core_timeout_ms,
            reconcile_interval_ms: 200,
            fence_margin_ms: 1000,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Sends a transfer whose call to the core is held at the proxy (until
/// `release_held`), and returns once the proxy holds it.
async fn send_held(
    stack: &Stack,
    api: &Api,
    from: &str,
    to: &str,
    amount: u64,
) -> tokio::task::JoinHandle<Reply> {
    stack
        .proxy
        .add(Some(Method::POST), "/v1/transfers", Action::Hold, Some(1));
    let request = tokio::spawn({
        let api = api.clone();
        let (from, to) = (from.to_owned(), to.to_owned());
        async move { send(&api, &from, &to, amount).await }
    });
    eventually(
        "the request is held at the proxy",
        Duration::from_secs(5),
        || async {
            if stack
                .proxy
                .seen()
                .iter()
                .any(|(m, p, _)| m == Method::POST && p == "/v1/transfers")
            {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    )
    .await;
    request
}

#[tokio::test]
async fn b09_transfer_is_stored_pending_with_id_and_requested_at_before_the_core_is_called() {
    let stack = Stack::start(fast(60, 5000)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let request = send_held(&stack, &api, &from, &to, 1000).await;
    // The core has not received it, yet the channel already stored it.
    assert!(
        !stack
            .proxy
            .forwarded()
            .iter()
            .any(|(m, p)| m == Method::POST && p == "/v1/transfers")
    );
    let stored = bank_tests::db::query_strings(
        &stack.transfer.db_url,
        &format!(
            "SELECT transfer_id || ' ' || (extract(epoch FROM requested_at) * 1000000)::int8 \
             FROM transfer_requests WHERE from_account = '{from}' AND status = 'pending'"
        ),
    )
    .await
    .unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    stack.proxy.release_held();
    let r = request.await.unwrap().expect(200);
    assert_eq!(r.body["status"], "succeeded");
    // What was stored before the call is the transfer the customer is told
    // about: the same id and request time.
    let requested_at = chrono::DateTime::parse_from_rfc3339(&r.str("requested_at"))
        .unwrap()
        .timestamp_micros();
    assert_eq!(
        stored[0],
        format!("{} {requested_at}", r.str("transfer_id")),
        "{}",
        r.body
    );
    assert!(r.str("transfer_id").starts_with("trf_"));
    assert_eq!(stack.core.api.balance(&to).await, 1000);
}

/// F1: the core executed the transfer, but the channel database cannot
/// record its answer (an outside lock on the requests table outlasts the
/// lock timeout). The customer is told the transfer is pending, not given an
/// error for money that moved, and the resolver records the outcome once the
/// database is back.
#[tokio::test]
async fn b11_an_answer_the_channel_database_cannot_record_leaves_the_transfer_pending() {
    use sea_orm::TransactionTrait;
    let stack = Stack::start(fast(60, 5000)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let request = send_held(&stack, &api, &from, &to, 1000).await;
    let db = Database::connect(stack.transfer.db_url.as_str())
        .await
        .unwrap();
    let lock = db.begin().await.unwrap();
    lock.execute_unprepared("LOCK TABLE transfer_requests IN SHARE MODE")
        .await
        .unwrap();
    stack.proxy.release_held();
    let r = request.await.unwrap().expect(202);
    assert_eq!(r.body["status"], "pending", "{r:?}");
    assert_eq!(
        stack.core.api.balance(&to).await,
        1000,
        "the core executed it"
    );
    lock.rollback().await.unwrap();
    wait_status(
        &api,
        &r.str("transfer_id"),
        "succeeded",
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(stack.core.api.balance(&to).await, 1000, "moved once");
    assert_eq!(stack.core.api.balance(&from).await, 9_000);
}

#[tokio::test]
async fn b10_second_transfer_while_pending_is_refused_by_the_database() {
    let stack = Stack::start(fast(60, 300)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    stack
        .proxy
        .add(Some(Method::POST), "/v1/transfers", Action::Hold, Some(1));
    let first = send(&api, &from, &to, 1000).await.expect(202);
    let id = first.str("transfer_id");
    let second = send(&api, &from, &to, 1000).await.expect(409);
    assert_eq!(second.code(), Some("transfer_in_progress"));
    assert_eq!(second.body["error"]["transfer_id"], json!(id));
    // Enforced by the database itself, not only by code.
    let db = Database::connect(stack.transfer.db_url.as_str())
        .await
        .unwrap();
    let err = db
        .execute_unprepared(&format!(
            "INSERT INTO transfer_requests (transfer_id, customer_id, from_account, to_account, amount, status, requested_at) \
             VALUES ('trf_direct', 'cus_x', '{from}', '{to}', 5, 'pending', now())"
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("transfer_requests_one_pending_per_account"),
        "{err}"
    );
    stack.proxy.release_held();
    wait_status(&api, &id, "succeeded", Duration::from_secs(10)).await;
    // Free again once resolved.
    send(&api, &from, &to, 500).await.expect(200);
    assert_eq!(stack.core.api.balance(&to).await, 1500);
}

/// The one-pending index refuses the insert, but the pending transfer it
/// collided with has resolved by the time it is looked up: the request is
/// tried again (a few times, with a pause) so that a `transfer_in_progress`
/// answer can name the transfer, and answers 503 if it never can. A trigger
/// raises exactly that conflict with no pending row behind it, `budget`
/// times (a sequence counts the attempts: it does not roll back).
async fn phantom_pending_conflicts(db: &sea_orm::DatabaseConnection, from: &str, budget: i64) {
    db.execute_unprepared(&format!(
        "DROP TRIGGER IF EXISTS phantom_pending ON transfer_requests;
         DROP SEQUENCE IF EXISTS phantom_attempts;
         CREATE SEQUENCE phantom_attempts;
         CREATE OR REPLACE FUNCTION phantom_pending() RETURNS trigger AS $$
         BEGIN
           IF NEW.from_account = '{from}' AND nextval('phantom_attempts') <= {budget} THEN
             RAISE EXCEPTION 'duplicate key value violates unique constraint'
               USING ERRCODE = 'unique_violation',
                     CONSTRAINT = 'transfer_requests_one_pending_per_account';
           END IF;
           RETURN NEW;
         END $$ LANGUAGE plpgsql;
         CREATE TRIGGER phantom_pending BEFORE INSERT ON transfer_requests
           FOR EACH ROW EXECUTE FUNCTION phantom_pending();"
    ))
    .await
    .unwrap();
}

async fn attempts_seen(db: &sea_orm::DatabaseConnection) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT last_value FROM phantom_attempts",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get("", "last_value").unwrap()
}

#[tokio::test]
async fn b10_a_conflict_with_a_transfer_already_resolved_is_retried_then_refused_with_503() {
    let stack = Stack::start(fast(60, 5000)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let db = Database::connect(stack.transfer.db_url.as_str())
        .await
        .unwrap();

    // Two phantom conflicts: the third attempt goes through.
    phantom_pending_conflicts(&db, &from, 2).await;
    let id = send(&api, &from, &to, 1000)
        .await
        .expect(200)
        .str("transfer_id");
    assert_eq!(attempts_seen(&db).await, 3, "two retries, then the insert");
    assert_eq!(status(&api, &id).await["status"], "succeeded");

    // Conflicts that never name a pending transfer: 503 after five attempts,
    // nothing stored, no money moved.
    phantom_pending_conflicts(&db, &from, i64::MAX).await;
    let refused = send(&api, &from, &to, 1000).await.expect(503);
    assert_eq!(refused.code(), Some("unavailable"));
    assert!(
        refused.body["error"].get("transfer_id").is_none(),
        "{}",
        refused.body
    );
    assert_eq!(attempts_seen(&db).await, 5);
    let stored = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT count(*) AS n FROM transfer_requests WHERE from_account = '{from}'"),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(stored, 1, "only the first transfer");
    assert_eq!(stack.core.api.balance(&from).await, 9_000);
    let metrics = bank_tests::metrics::scrape(&stack.transfer.base).await;
    assert!(
        bank_tests::metrics::metric(&metrics, "transfer_requests_total{result=\"contended\"")
            >= 1.0,
        "{metrics}"
    );

    // The index answers truthfully again: transfers go through.
    db.execute_unprepared("DROP TRIGGER phantom_pending ON transfer_requests")
        .await
        .unwrap();
    send(&api, &from, &to, 500).await.expect(200);
    assert_eq!(stack.core.api.balance(&to).await, 1500);
}

/// A customer repeating a request (same `Idempotency-Key`) to learn its
/// outcome gets it from the channel's record even while the core cannot be
/// reached: the replay needs no owner check at the core (it was made when
/// the transfer was). Here a second replica, whose owner cache is empty,
/// cannot read the core's accounts at all.
#[tokio::test]
async fn b10_a_repeated_request_is_answered_while_the_core_cannot_be_reached() {
    let stack = Stack::start(fast(60, 5000)).await.unwrap();
    let (customer, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let key = unique("key-");
    let body = json!({"from_account": from, "to_account": to, "amount": "100"});
    let headers = [("Idempotency-Key", key.as_str())];
    let first = api
        .send("POST", "/v1/transfers", Some(body.clone()), &headers)
        .await
        .expect(200);
    stack
        .proxy
        .add(Some(Method::GET), "/v1/accounts/", Action::Fail(503), None);
    let replica = TransferApp::spawn(
        &stack.nats,
        &stack.proxy.url(),
        TransferOptions {
            database_url: Some(stack.transfer.db_url.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let again = replica
        .as_customer(&customer)
        .send("POST", "/v1/transfers", Some(body.clone()), &headers)
        .await
        .expect(200);
    assert_eq!(again.body, first.body);
    // A new request still needs the owner check: the core is unreachable.
    let other_key = unique("key-");
    let fresh = replica
        .as_customer(&customer)
        .send(
            "POST",
            "/v1/transfers",
            Some(body),
            &[("Idempotency-Key", other_key.as_str())],
        )
        .await;
    assert_eq!(fresh.status, 503, "{}", fresh.body);
    assert_eq!(stack.core.api.balance(&to).await, 100);
}

/// A client that double-submits (the same `Idempotency-Key`, sent twice at
/// once) gets the one transfer twice. Both requests can miss the key look-up;
/// the second insert then collides on the one-pending index as well as on the
/// key, and must be answered as a replay, not as `transfer_in_progress`.
#[tokio::test]
async fn b10_concurrent_submits_with_one_idempotency_key_get_one_transfer() {
    let stack = Stack::start(fast(60, 5000)).await.unwrap();
    let to = stack.core.api.funded_account(0).await;
    let mut customers = Vec::new();
    for _ in 0..12 {
        customers.push(stack.customer_with_account(10_000).await);
    }
    let rounds = customers.iter().map(|(_, from, api)| {
        let to = to.clone();
        async move {
            let key = unique("key-");
            let body = json!({"from_account": from, "to_account": to, "amount": "100"});
            let headers = [("Idempotency-Key", key.as_str())];
            let answers = futures::future::join_all(
                (0..3).map(|_| api.send("POST", "/v1/transfers", Some(body.clone()), &headers)),
            )
            .await;
            (from.clone(), answers)
        }
    });
    for (from, answers) in futures::future::join_all(rounds).await {
        let ids: Vec<Value> = answers
            .iter()
            .map(|r| {
                assert!(
                    r.status == 200 || r.status == 202,
                    "{from}: {} {}",
                    r.status,
                    r.body
                );
                r.body["transfer_id"].clone()
            })
            .collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "{from}: {ids:?}");
        let id = ids[0].as_str().unwrap().to_owned();
        let api = &customers.iter().find(|c| c.1 == from).unwrap().2;
        wait_status(api, &id, "succeeded", Duration::from_secs(10)).await;
        assert_eq!(stack.core.api.balance(&from).await, 9_900, "{from}");
    }
    assert_eq!(stack.core.api.balance(&to).await, 1_200);
}

/// The interest routes pass the core's answers about the customer's request
/// through; a status from something between channel and core (a gateway's
/// 429 without a body) or the core refusing the channel's own credentials is
/// answered 503 in the error shape, never passed on as the customer's.
#[tokio::test]
async fn b31_a_gateway_status_on_the_interest_routes_is_answered_503_in_the_error_shape() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (_, account, api) = stack.customer_with_account(10_000).await;
    let path = format!("/v1/accounts/{account}/interest");
    api.get(&path).await.expect(200);
    for status in [429, 401] {
        stack.proxy.add(
            Some(Method::GET),
            "/interest",
            Action::Fail(status),
            Some(1),
        );
        let r = api.get(&path).await.expect(503);
        assert!(r.code().is_some(), "{status}: {:?}", r.body);
    }
    // The core's own refusal about the request is the customer's answer.
    let r = api
        .post(
            &format!("/v1/accounts/{account}/interest/receive"),
            json!({}),
        )
        .await
        .expect(422);
    assert_eq!(r.code(), Some("nothing_to_pay"), "{:?}", r.body);
}

/// A status that something between channel and core may send after passing
/// the request on (429 from a gateway, 408) is not the core's refusal: the
/// transfer stays pending until the core's own answer (here: it never saw
/// the request, so it ends through the fence after the TTL, as F3).
#[tokio::test]
async fn f3_a_gateway_status_between_channel_and_core_is_not_taken_as_a_refusal() {
    let stack = Stack::start(fast(2, 5000)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    for gateway_status in [429, 408] {
        stack.proxy.add(
            Some(Method::POST),
            "/v1/transfers",
            Action::Fail(gateway_status),
            Some(1),
        );
        let r = send(&api, &from, &to, 1000).await.expect(202);
        assert_eq!(r.str("status"), "pending", "{gateway_status}: {}", r.body);
        let id = r.str("transfer_id");
        let done = wait_status(&api, &id, "failed", Duration::from_secs(15)).await;
        // The fence's record: the core never received it.
        assert_eq!(done["reason"], "never_received", "{gateway_status}: {done}");
    }
    assert_eq!(stack.core.api.balance(&from).await, 10_000);
    // A status the core also gives (400 for a malformed request), or a 422
    // that is not one of the core's refusals, is final only once the
    // transfer is fenced: here a gateway answered it, and a copy of the
    // request still reaches the core afterwards (a retry or a mirror).
    for (gateway_status, name) in [(400, "400"), (422, "422 without a core refusal")] {
        stack.proxy.add(
            Some(Method::POST),
            "/v1/transfers",
            Action::FailAndHold(gateway_status),
            Some(1),
        );
        let r = send(&api, &from, &to, 1000).await;
        assert_eq!(
            (r.status, r.code()),
            (422, Some("never_received")),
            "{name}: {}",
            r.body
        );
        let id = r.body["error"]["transfer_id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{name}: no transfer_id in {}", r.body));
        // The copy arrives within the TTL, and is refused by the fence.
        let copies = || {
            stack
                .proxy
                .answered()
                .into_iter()
                .filter(|(m, p, _)| m == Method::POST && p == "/v1/transfers")
                .map(|(_, _, status)| status)
                .collect::<Vec<u16>>()
        };
        let before = copies().len();
        stack.proxy.release_held();
        let answers = eventually(
            "the late copy answered by the core",
            Duration::from_secs(10),
            || async {
                let answers = copies();
                if answers.len() > before {
                    Ok(answers)
                } else {
                    Err(format!("{answers:?}"))
                }
            },
        )
        .await;
        assert_eq!(answers.last(), Some(&422), "{name}: the copy was refused");
        let core_view = stack
            .core
            .api
            .get(&format!("/v1/transfers/{id}"))
            .await
            .expect(200);
        assert_eq!(
            core_view.str("status"),
            "failed",
            "{name}: {}",
            core_view.body
        );
        assert_eq!(
            stack.core.api.balance(&from).await,
            10_000,
            "{name}: money moved"
        );
        stack.proxy.clear();
    }
}

/// A customer's account with 10,000 won and another customer's empty
/// account: (from, to, the customer's client).
async fn sender_and_recipient(stack: &Stack) -> (String, String, Api) {
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    (from, to, api)
}

/// When the proxy saw each call to the core's `POST /v1/transfers`.
fn transfer_calls(stack: &Stack) -> Vec<Instant> {
    stack
        .proxy
        .seen()
        .into_iter()
        .filter(|(m, p, _)| m == Method::POST && p == "/v1/transfers")
        .map(|(_, _, at)| at)
        .collect()
}

/// The core unavailable for a moment (a 5xx: restarting behind a gateway,
/// `account_busy`, a failed database; not its `overloaded`, see
/// `core_client`'s tests) is called again with backoff within the
/// core timeout, with the same transfer id: the customer gets the outcome,
/// not a pending transfer that would be fenced after the TTL. Here the
/// first 503 comes from a gateway that passes the request on later anyway
/// (nobody hears the core's answer): the same id executes once.
#[tokio::test]
async fn f3_f7_a_core_answering_503_is_called_again_and_the_money_moves_once() {
    let stack = Stack::start(fast(60, 3000)).await.unwrap();
    let (from, to, api) = sender_and_recipient(&stack).await;
    for gateway in [Action::FailAndHold(503), Action::Fail(503)] {
        stack
            .proxy
            .add(Some(Method::POST), "/v1/transfers$", gateway, Some(1));
    }
    let r = send(&api, &from, &to, 1000).await.expect(200);
    assert_eq!(r.str("status"), "succeeded", "{}", r.body);
    assert_eq!(
        transfer_calls(&stack).len(),
        3,
        "two 503s, then the core's answer"
    );
    // The copy the gateway held reaches the core after the answer: the
    // core answers it as the transfer it already executed.
    let answered = |status: u16| {
        stack
            .proxy
            .answered()
            .into_iter()
            .filter(|(m, p, s)| m == Method::POST && p == "/v1/transfers" && *s == status)
            .count()
    };
    assert_eq!(answered(200), 1);
    stack.proxy.release_held();
    eventually(
        "the held copy answered by the core",
        Duration::from_secs(10),
        || async {
            match answered(200) {
                2 => Ok(()),
                n => Err(format!("{n} answered 200")),
            }
        },
    )
    .await;
    assert_eq!(stack.core.api.balance(&from).await, 9_000, "moved once");
    assert_eq!(stack.core.api.balance(&to).await, 1_000);
}

/// The core's own 503 `overloaded` (its ledger queue is full; nothing
/// executed) is called again too, same transfer id, but only after a pause
/// of at least 500 ms, so that the calls do not keep the queue full.
#[tokio::test]
async fn f3_f7_after_the_cores_overloaded_the_transfer_is_sent_again_after_a_longer_pause() {
    let stack = Stack::start(fast(60, 3000)).await.unwrap();
    let (from, to, api) = sender_and_recipient(&stack).await;
    stack.proxy.add(
        Some(Method::POST),
        "/v1/transfers$",
        Action::FailAs(503, "overloaded"),
        Some(1),
    );
    let r = send(&api, &from, &to, 1000).await.expect(200);
    assert_eq!(r.str("status"), "succeeded", "{}", r.body);
    let calls = transfer_calls(&stack);
    assert_eq!(calls.len(), 2, "overloaded, then the core's answer");
    let pause = calls[1] - calls[0];
    assert!(
        pause >= Duration::from_millis(500),
        "called again after {pause:?}"
    );
    assert_eq!(stack.core.api.balance(&from).await, 9_000, "moved once");
}

/// B11 with a core that keeps answering 503: the calls are repeated only
/// while the core timeout leaves room, then the customer hears 202 pending
/// (never an error for a transfer that may yet move money), and the
/// transfer ends through the fence after the TTL, as a lost request (F3).
#[tokio::test]
async fn b11_f3_a_core_unavailable_for_the_whole_core_timeout_answers_pending_then_fails() {
    let core_timeout = Duration::from_millis(3000);
    let stack = Stack::start(fast(2, core_timeout.as_millis() as u64))
        .await
        .unwrap();
    let (from, to, api) = sender_and_recipient(&stack).await;
    stack.proxy.add(
        Some(Method::POST),
        "/v1/transfers$",
        Action::Fail(503),
        None,
    );
    let started = Instant::now();
    let r = send(&api, &from, &to, 1000).await.expect(202);
    let took = started.elapsed();
    assert_eq!(r.str("status"), "pending", "{}", r.body);
    // The calls stay within the core timeout (the rest is the request's
    // own work: the token, the owner look-up, the pending row).
    assert!(
        took < core_timeout + Duration::from_secs(1),
        "answered after {took:?}"
    );
    let posts = transfer_calls(&stack).len();
    assert!(posts >= 3, "called {posts} times");
    // The core back: the transfer it never executed is failed by the
    // fence after the TTL.
    stack.proxy.clear();
    let id = r.str("transfer_id");
    let done = wait_status(&api, &id, "failed", Duration::from_secs(15)).await;
    assert_eq!(done["reason"], "never_received", "{done}");
    assert_eq!(stack.core.api.balance(&from).await, 10_000);
}

#[tokio::test]
async fn b11_timeout_answers_pending_and_the_result_arrives_without_another_request() {
    let stack = Stack::start(fast(60, 300)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    stack.proxy.add(
        Some(Method::POST),
        "/v1/transfers",
        Action::DelayResponse(Duration::from_millis(1500)),
        Some(1),
    );
    let r = send(&api, &from, &to, 2500).await.expect(202);
    assert_eq!(r.body["status"], "pending");
    let id = r.str("transfer_id");
    let done = wait_status(&api, &id, "succeeded", Duration::from_secs(5)).await;
    assert!(done["from_seq"].is_i64());
    assert_eq!(stack.core.api.balance(&to).await, 2500);
    let posts = stack
        .proxy
        .seen()
        .iter()
        .filter(|(m, p, _)| m == Method::POST && p == "/v1/transfers")
        .count();
    assert_eq!(posts, 1, "the transfer was sent to the core once");
}

#[tokio::test]
async fn b13_reconciler_resolves_pending_transfers_left_by_a_crash_at_start_up() {
    let stack = Stack::start(fast(2, 3000)).await.unwrap();
    let (customer, from, _) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let mut transfer = stack.transfer;
    transfer.stop().await.unwrap();
    // Two transfers left pending by a "crash": one the core executed, one it never saw.
    let executed = unique("trf_");
    stack
        .core
        .api
        .post(
            "/v1/transfers",
            bank_tests::client::transfer_body(&executed, &from, &to, 700),
        )
        .await
        .expect(200);
    let lost = unique("trf_");
    let other_from = stack.core.api.new_account(&customer).await;
    let db = Database::connect(transfer.db_url.as_str()).await.unwrap();
    db.execute_unprepared(&format!(
        "INSERT INTO transfer_requests (transfer_id, customer_id, from_account, to_account, amount, status, requested_at) VALUES \
         ('{executed}', '{customer}', '{from}', '{to}', 700, 'pending', now() - interval '1 second'), \
         ('{lost}', '{customer}', '{other_from}', '{to}', 100, 'pending', now() - interval '10 seconds')"
    ))
    .await
    .unwrap();
    let restarted = TransferApp::spawn(
        &stack.nats,
        &stack.proxy.url(),
        TransferOptions {
            request_ttl_secs: 2,
            database_url: Some(transfer.db_url.clone()),
            // No periodic pass within the test: only the start-up pass can
            // resolve them.
            reconcile_interval_ms: 3_600_000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let api = restarted.as_customer(&customer);
    let a = wait_status(&api, &executed, "succeeded", Duration::from_secs(5)).await;
    assert_eq!(a["from_seq"], 2);
    let b = wait_status(&api, &lost, "failed", Duration::from_secs(5)).await;
    assert_eq!(b["reason"], "never_received");
    assert_eq!(stack.core.api.balance(&to).await, 700);
}

/// A reconciler pass reaches every pending transfer, not only the oldest
/// page: 520 transfers the core never saw (they wait for their fence) are
/// older than 20 the core executed, and those 20 are resolved at once.
#[tokio::test]
async fn b13_a_reconciler_pass_reaches_transfers_behind_a_long_head_of_unresolvable_ones() {
    let stack = Stack::start(fast(60, 3000)).await.unwrap();
    let (customer, _, _) = stack.customer_with_account(0).await;
    let to = stack.core.api.funded_account(0).await;
    let mut transfer = stack.transfer;
    transfer.stop().await.unwrap();
    let mut rows = Vec::new();
    for i in 0..520u128 {
        rows.push(format!(
            "('{}', '{customer}', 'acc_{:032x}', '{to}', 1, 'pending', now() - interval '30 seconds' + {i} * interval '1 millisecond')",
            unique("trf_"),
            0xfeed_0000_0000_u128 + i
        ));
    }
    let mut executed = Vec::new();
    for _ in 0..20 {
        let from = stack.core.api.new_account(&customer).await;
        stack.core.api.deposit(&from, 100).await.expect(200);
        let id = unique("trf_");
        stack
            .core
            .api
            .post(
                "/v1/transfers",
                bank_tests::client::transfer_body(&id, &from, &to, 100),
            )
            .await
            .expect(200);
        rows.push(format!(
            "('{id}', '{customer}', '{from}', '{to}', 100, 'pending', now() - interval '2 seconds')"
        ));
        executed.push(id);
    }
    let db = Database::connect(transfer.db_url.as_str()).await.unwrap();
    db.execute_unprepared(&format!(
        "INSERT INTO transfer_requests (transfer_id, customer_id, from_account, to_account, amount, status, requested_at) VALUES {}",
        rows.join(", ")
    ))
    .await
    .unwrap();
    let restarted = TransferApp::spawn(
        &stack.nats,
        &stack.proxy.url(),
        TransferOptions {
            database_url: Some(transfer.db_url.clone()),
            ..fast(60, 3000).transfer
        },
    )
    .await
    .unwrap();
    let api = restarted.as_customer(&customer);
    // Well before the head's fence (about 31 s from now).
    eventually(
        "the executed transfers are resolved",
        Duration::from_secs(10),
        || async {
            let mut left = 0;
            for id in &executed {
                if status(&api, id).await["status"] != "succeeded" {
                    left += 1;
                }
            }
            if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} still pending"))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn b20_status_changes_are_published_as_transfer_events() {
    let stack = Stack::start(fast(60, 3000)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let ok = send(&api, &from, &to, 1000)
        .await
        .expect(200)
        .str("transfer_id");
    let refused = send(&api, &from, &to, 1_000_000).await.expect(422);
    assert_eq!(refused.code(), Some("insufficient_funds"));
    let refused_id = refused.body["error"]["transfer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let js = stack.nats.jetstream().await.unwrap();
    let events = eventually("four transfer events", Duration::from_secs(10), || async {
        let m = stream_messages(&js, "TRANSFERS")
            .await
            .map_err(|e| e.to_string())?;
        if m.len() >= 4 {
            Ok(m)
        } else {
            Err(format!("{} events", m.len()))
        }
    })
    .await;
    let mut seen: Vec<(String, String)> = Vec::new();
    for m in &events {
        let ev: Value = serde_json::from_slice(&m.payload).unwrap();
        let id = ev["event_id"].as_str().unwrap().to_owned();
        assert_eq!(
            m.headers.get("Nats-Msg-Id").map(|v| v.to_string()),
            Some(id.clone())
        );
        assert!(m.headers.get("traceparent").is_some());
        let word = m
            .subject
            .as_str()
            .strip_prefix("bank.transfer.")
            .unwrap()
            .to_owned();
        assert_eq!(
            id,
            format!("{}:{word}", ev["transfer_id"].as_str().unwrap())
        );
        let expected_status = if word == "requested" {
            "pending"
        } else {
            word.as_str()
        };
        assert_eq!(ev["status"], expected_status);
        seen.push((ev["transfer_id"].as_str().unwrap().to_owned(), word));
        if ev["status"] == "failed" {
            assert_eq!(ev["reason"], "insufficient_funds");
        }
    }
    for expected in [
        (ok.clone(), "requested"),
        (ok.clone(), "succeeded"),
        (refused_id.clone(), "requested"),
        (refused_id.clone(), "failed"),
    ] {
        assert!(
            seen.contains(&(expected.0.clone(), expected.1.to_owned())),
            "missing {expected:?} in {seen:?}"
        );
    }
    assert_eq!(events.len(), 4);
}

#[tokio::test]
async fn b30_customers_need_a_valid_token_and_act_only_on_their_own_accounts() {
    let stack = Stack::start(fast(60, 3000)).await.unwrap();
    let (my_id, mine, me) = stack.customer_with_account(10_000).await;
    let (_, theirs, them) = stack.customer_with_account(10_000).await;
    let their_transfer = send(&them, &theirs, &mine, 10)
        .await
        .expect(200)
        .str("transfer_id");

    let anonymous = me.with_token(None);
    // (A token expiring now is still inside the validation leeway; this one
    // is past it.)
    let expired_long_ago = {
        // exp in the past beyond the leeway
        let claims = json!({"sub": "cus_x", "exp": 1_000_000});
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(bank_tests::apps::JWT_SECRET.as_bytes()),
        )
        .unwrap();
        me.with_token(Some(t))
    };
    let wrong_key = me.with_token(Some(
        transfer::auth::issue_token("another-secret", "cus_x", 3600).unwrap(),
    ));
    let no_exp = {
        let claims = json!({"sub": "cus_x"});
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(bank_tests::apps::JWT_SECRET.as_bytes()),
        )
        .unwrap();
        me.with_token(Some(t))
    };
    let signed = |header: jsonwebtoken::Header, claims: Value| {
        let t = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(bank_tests::apps::JWT_SECRET.as_bytes()),
        )
        .unwrap();
        me.with_token(Some(t))
    };
    let now = chrono::Utc::now().timestamp();
    // My own customer id, the right key, not expired: refused only because
    // it is not valid yet.
    let not_yet_valid = signed(
        jsonwebtoken::Header::default(),
        json!({"sub": my_id, "nbf": now + 3600, "exp": now + 7200}),
    );
    // The right key and claims, but another HMAC algorithm than the pinned one.
    let other_algorithm = signed(
        jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        json!({"sub": my_id, "exp": now + 3600}),
    );
    let garbage = me.with_token(Some("not-a-jwt".into()));
    let routes = [
        ("POST", "/v1/transfers".to_owned()),
        ("GET", format!("/v1/transfers/{their_transfer}")),
        ("GET", format!("/v1/accounts/{mine}/history")),
        ("POST", format!("/v1/accounts/{mine}/history/sync")),
        ("GET", format!("/v1/accounts/{mine}/interest")),
        ("POST", format!("/v1/accounts/{mine}/interest/receive")),
    ];
    for client in [
        &anonymous,
        &expired_long_ago,
        &wrong_key,
        &no_exp,
        &not_yet_valid,
        &other_algorithm,
        &garbage,
    ] {
        for (m, p) in &routes {
            let r = client
                .send(
                    m,
                    p,
                    Some(json!({"from_account": mine, "to_account": theirs, "amount": "1"})),
                    &[],
                )
                .await;
            assert_eq!((r.status, r.code()), (401, Some("unauthorized")), "{m} {p}");
        }
    }
    // Someone else's account: 403 everywhere; someone else's transfer: not found.
    let r = send(&me, &theirs, &mine, 1).await;
    assert_eq!((r.status, r.code()), (403, Some("forbidden")));
    for (m, p) in [
        ("GET", format!("/v1/accounts/{theirs}/history")),
        ("POST", format!("/v1/accounts/{theirs}/history/sync")),
        ("GET", format!("/v1/accounts/{theirs}/interest")),
        ("POST", format!("/v1/accounts/{theirs}/interest/receive")),
        ("GET", "/v1/accounts/acc_nobody/history".to_owned()),
        // Authorization comes before the query: no hint from a bad cursor or limit.
        (
            "GET",
            format!("/v1/accounts/{theirs}/history?cursor=garbage"),
        ),
        ("GET", format!("/v1/accounts/{theirs}/history?limit=0")),
        // ... nor from a query that does not parse at all.
        ("GET", format!("/v1/accounts/{theirs}/history?limit=abc")),
        ("GET", format!("/v1/accounts/{theirs}/history?colour=red")),
    ] {
        let r = me.send(m, &p, None, &[]).await;
        assert_eq!((r.status, r.code()), (403, Some("forbidden")), "{m} {p}");
    }
    // ... nor from a bad Idempotency-Key.
    let r = me
        .send(
            "POST",
            &format!("/v1/accounts/{theirs}/interest/receive"),
            None,
            &[("Idempotency-Key", "not a key")],
        )
        .await;
    assert_eq!((r.status, r.code()), (403, Some("forbidden")));
    assert_eq!(
        me.get(&format!("/v1/transfers/{their_transfer}"))
            .await
            .expect(404)
            .code(),
        Some("transfer_not_found")
    );
    assert_eq!(
        stack.core.api.balance(&theirs).await,
        9_990,
        "nothing moved from their account"
    );
}

#[tokio::test]
async fn b31_transfer_service_bad_input_gets_a_documented_4xx() {
    let stack = Stack::start(fast(60, 3000)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let (_, other, _) = stack.customer_with_account(0).await;
    let good = json!({"from_account": from, "to_account": other, "amount": "10"});
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    for body in [
        with("amount", json!(10)),
        with("amount", json!("0")),
        with("amount", json!("-1")),
        with("amount", json!("0.5")),
        with("amount", json!("10000000000000000")),
        with("amount", json!(null)),
        with("to_account", json!("has space")),
        with("memo", json!("m".repeat(141))),
        with("unexpected", json!(true)),
        json!({}),
        json!("string"),
    ] {
        let r = api.post("/v1/transfers", body.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (400, Some("invalid_request")),
            "{body}: {}",
            r.body
        );
    }
    let r = api
        .send_raw(
            "POST",
            "/v1/transfers",
            "application/json",
            b"{\"from_account\":".to_vec(),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, Some("malformed_json")));
    let r = api
        .send_raw(
            "POST",
            "/v1/transfers",
            "application/json",
            vec![b' '; 100 * 1024],
        )
        .await;
    assert_eq!((r.status, r.code()), (413, Some("payload_too_large")));
    let r = api
        .send(
            "POST",
            "/v1/transfers",
            Some(good.clone()),
            &[("Idempotency-Key", "bad key with spaces")],
        )
        .await;
    assert_eq!((r.status, r.code()), (400, Some("invalid_idempotency_key")));
    for q in [
        "limit=0",
        "limit=101",
        "limit=abc",
        "cursor=%%%",
        "cursor=aDE6YWNjX290aGVyOjU",
        "extra=1",
    ] {
        let r = api.get(&format!("/v1/accounts/{from}/history?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert!(
            matches!(r.code(), Some("invalid_query" | "invalid_cursor")),
            "{q}: {}",
            r.body
        );
    }
    assert_eq!(
        api.get("/v1/accounts/bad.id/history")
            .await
            .expect(400)
            .code(),
        Some("invalid_id")
    );
    assert_eq!(
        api.get("/v1/transfers/bad.id").await.expect(400).code(),
        Some("invalid_id")
    );
    // None of the above reached the core or left a record.
    assert_eq!(
        bank_tests::db::query_strings(
            &stack.transfer.db_url,
            "SELECT count(*)::text FROM transfer_requests"
        )
        .await
        .unwrap(),
        ["0"],
        "a refused request writes nothing"
    );
    assert_eq!(stack.core.api.balance(&from).await, 10_000);
    // A target that does not exist is the core's refusal, recorded as failed.
    let r = send(&api, &from, "acc_nobody", 10).await.expect(422);
    assert_eq!(r.code(), Some("account_not_found"));
    assert_eq!(stack.core.api.balance(&from).await, 10_000);
    // Idempotency-Key: same key, same transfer; same key, other body: conflict.
    let key = [("Idempotency-Key", "order-42")];
    let a = api
        .send("POST", "/v1/transfers", Some(good.clone()), &key)
        .await
        .expect(200);
    let b = api
        .send("POST", "/v1/transfers", Some(good.clone()), &key)
        .await
        .expect(200);
    assert_eq!(a.body["transfer_id"], b.body["transfer_id"]);
    let c = api
        .send(
            "POST",
            "/v1/transfers",
            Some(with("amount", json!("11"))),
            &key,
        )
        .await
        .expect(409);
    assert_eq!(c.code(), Some("idempotency_conflict"));
    assert_eq!(stack.core.api.balance(&other).await, 10);
}

#[tokio::test]
async fn f1_core_answers_after_the_timeout_pending_then_succeeded_no_second_transfer_meanwhile() {
    let mut opts = fast(60, 300);
    opts.with_projector = true;
    let stack = Stack::start(opts).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    stack.proxy.add(
        Some(Method::POST),
        "/v1/transfers",
        Action::DelayResponse(Duration::from_secs(2)),
        Some(1),
    );
    hide_core_status(&stack);
    let r = send(&api, &from, &to, 3000).await.expect(202);
    let id = r.str("transfer_id");
    assert_eq!(
        send(&api, &from, &to, 3000).await.expect(409).code(),
        Some("transfer_in_progress")
    );
    stack.proxy.clear();
    wait_status(&api, &id, "succeeded", Duration::from_secs(5)).await;
    // The event brings the entry: the projector writes it into the channel
    // database before anyone asks for the history (which could sync it from
    // the core itself, B18).
    eventually(
        "the projector wrote the entry",
        Duration::from_secs(10),
        || async {
            let h = bank_tests::verify::channel_history(&stack.transfer.db_url, &from)
                .await
                .map_err(|e| e.to_string())?;
            if h.iter().any(|e| e.4.as_deref() == Some(id.as_str())) {
                Ok(())
            } else {
                Err(format!("{h:?}"))
            }
        },
    )
    .await;
    // The history shows the transfer once.
    let hist = eventually(
        "the transfer in the history",
        Duration::from_secs(10),
        || async {
            let h = api
                .get(&format!("/v1/accounts/{from}/history"))
                .await
                .expect(200)
                .body;
            if h["synced_through_seq"] == 2 {
                Ok(h)
            } else {
                Err(h.to_string())
            }
        },
    )
    .await;
    let with_id: Vec<&Value> = hist["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["transfer_id"] == json!(id))
        .collect();
    assert_eq!(with_id.len(), 1);
    assert_eq!(
        stack.core.api.balance(&from).await,
        7_000,
        "money moved once"
    );
}

#[tokio::test]
async fn f2_customer_retry_after_timeout_is_refused_and_money_moves_once() {
    let stack = Stack::start(fast(60, 300)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    stack.proxy.add(
        Some(Method::POST),
        "/v1/transfers",
        Action::DelayRequest(Duration::from_secs(1)),
        Some(1),
    );
    hide_core_status(&stack);
    let id = send(&api, &from, &to, 4000)
        .await
        .expect(202)
        .str("transfer_id");
    // The customer saw a timeout and presses "send" again, several times.
    for _ in 0..3 {
        let r = send(&api, &from, &to, 4000).await.expect(409);
        assert_eq!(r.code(), Some("transfer_in_progress"));
        assert_eq!(r.body["error"]["transfer_id"], json!(id));
    }
    stack.proxy.clear();
    wait_status(&api, &id, "succeeded", Duration::from_secs(5)).await;
    assert_eq!(stack.core.api.balance(&to).await, 4000);
    assert_eq!(stack.core.api.balance(&from).await, 6000);
}

/// Once its pending row is written a transfer request is answered in time
/// (202 at the latest), whatever recording the core's answer waits on (here
/// a row lock another session holds): never the 503 of the HTTP request
/// timeout, which would leave a customer who sent no `Idempotency-Key`
/// unsure whether to send again. The execution goes on and records the
/// outcome once the lock is gone.
#[tokio::test]
async fn b09_f1_a_request_whose_outcome_cannot_be_recorded_in_time_answers_pending_not_503() {
    let core_timeout_ms = 3_000;
    let http_timeout = Duration::from_millis(core_timeout_ms + 7_000);
    let stack = Stack::start(StackOptions {
        transfer: TransferOptions {
            core_timeout_ms,
            // The least the service accepts: the core's wait, a fence call
            // and 2 s.
            request_timeout_ms: core_timeout_ms + 7_000,
            lock_timeout_ms: 30_000,
            // Only the request's own execution records the outcome (the
            // reconciler would settle it from the core's status otherwise,
            // maybe before the lock is taken).
            reconcile_interval_ms: 3_600_000,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    // The owner look-up (the account is not cached yet) is 2.5 s slow: the
    // deadline counts from the request's start, as the HTTP timeout does,
    // not from when the transfer was stored.
    stack.proxy.add(
        Some(Method::GET),
        "/v1/accounts/",
        Action::DelayResponse(Duration::from_millis(2_500)),
        Some(1),
    );
    // The core's answer comes 1.5 s late (within the core timeout): time to
    // take the lock first.
    stack.proxy.add(
        Some(Method::POST),
        "/v1/transfers",
        Action::DelayResponse(Duration::from_millis(1_500)),
        Some(1),
    );
    let started = Instant::now();
    let request = {
        let (api, from, to) = (api.clone(), from.clone(), to.clone());
        tokio::spawn(async move { send(&api, &from, &to, 1000).await })
    };
    let db_url = stack.transfer.db_url.clone();
    let id = bank_tests::db::until_pending_transfer(&db_url).await;
    let lock = bank_tests::db::RowLock::channel_transfer(&db_url, &id)
        .await
        .unwrap();
    lock.until_waited_on("recording the core's answer").await;
    let r = request.await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.str("status"), "pending");
    assert_eq!(r.str("transfer_id"), id);
    // Answered at the deadline, after the core's answer had come.
    assert!(
        took >= Duration::from_millis(4_000) && took < http_timeout,
        "answered after {took:?}"
    );
    lock.release().await.unwrap();
    wait_status(&api, &id, "succeeded", Duration::from_secs(10)).await;
    assert_eq!(stack.core.api.balance(&to).await, 1000);
}

/// B9, F3: the channel database stores the pending transfer, and the
/// connection is lost before its answer arrives (the commit happened; the
/// service cannot know). The service stores it again by the same id, finds
/// it stored, and executes it: the customer gets the outcome, the money
/// moves once, and no row is left pending, unexecuted, until its fence
/// (before, the customer got 503 and the account was held for the TTL).
#[tokio::test]
async fn b09_f3_a_stored_transfer_whose_answer_was_lost_is_executed_once() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let db = TcpCut::before(&stack.transfer.db_url, 5432).await.unwrap();
    let transfer = TransferApp::spawn(
        &stack.nats,
        &stack.proxy.url(),
        TransferOptions {
            database_url: Some(db.route(&stack.transfer.db_url).unwrap()),
            // Only the request's own execution may execute the transfer
            // (the stack's own transfer service only reads the core's
            // status before the TTL).
            reconcile_interval_ms: 3_600_000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (customer, from, _) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let api = transfer.as_customer(&customer);
    // The memo reaches the database only in the statement storing the
    // transfer: that statement's answer is lost.
    let memo = unique("answer-lost-");
    db.lose_answer_after(memo.as_bytes());
    let r = api
        .post(
            "/v1/transfers",
            json!({"from_account": from, "to_account": to, "amount": "700", "memo": memo}),
        )
        .await;
    assert_eq!(db.answers_lost(), 1, "the answer was not lost: {}", r.body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.str("status"), "succeeded");
    let id = r.str("transfer_id");
    assert_eq!(status(&api, &id).await["status"], "succeeded");
    assert_eq!(stack.core.api.balance(&to).await, 700);
    assert_eq!(stack.core.api.balance(&from).await, 9_300);
    let channel = Database::connect(stack.transfer.db_url.as_str())
        .await
        .unwrap();
    let stored = channel
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!(
                "SELECT count(*) AS n, count(*) FILTER (WHERE status = 'pending') AS pending \
                 FROM transfer_requests WHERE memo = '{memo}'"
            ),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.try_get::<i64>("", "n").unwrap(), 1);
    assert_eq!(stored.try_get::<i64>("", "pending").unwrap(), 0);
    // The next transfer from the account is not held up by the first.
    let again = send(&api, &from, &to, 300).await;
    assert_eq!(again.status, 200, "{}", again.body);
}

/// The channel's transfer from `account`, the only one stored (`id` and
/// `status`, `reason`), or `None`.
async fn only_transfer_from(db_url: &str, account: &str) -> Option<(String, String, String)> {
    let rows = bank_tests::db::query_strings(
        db_url,
        &format!(
            "SELECT transfer_id || ' ' || status || ' ' || coalesce(reason, '-') \
             FROM transfer_requests WHERE from_account = '{account}'"
        ),
    )
    .await
    .unwrap();
    assert!(rows.len() <= 1, "more than one transfer stored: {rows:?}");
    let row = rows.first()?;
    let mut parts = row.split(' ').map(str::to_owned);
    Some((parts.next()?, parts.next()?, parts.next()?))
}

fn holding_the_store() -> StackOptions {
    StackOptions {
        transfer: TransferOptions {
            core_timeout_ms: 1_000,
            // The least the service accepts: the answer is due 6 s after
            // the request's start.
            request_timeout_ms: 8_000,
            // The store waits on the test's lock for as long as it holds it.
            lock_timeout_ms: 30_000,
            // Nobody but the request's own task may settle the transfer.
            reconcile_interval_ms: 3_600_000,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// B9, F3: the customer hangs up while the transfer is being stored (the
/// statement waits on a lock, then commits). The request is dropped, and
/// the transfer, stored after all, is executed: never left pending,
/// unexecuted, holding the account until its fence. The services run as
/// processes of their own, so the transfer service's count of dropped
/// requests is this test's alone.
#[tokio::test]
async fn b09_f3_a_transfer_stored_after_its_customer_hung_up_is_executed() {
    let nats = bank_tests::NatsServer::start().await.unwrap();
    let env = [
        // The store waits on the test's lock for as long as it holds it.
        ("DATABASE_LOCK_TIMEOUT_MS", "30000"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "60000"),
        // Nobody but the request's own task may settle the transfer.
        ("RECONCILE_INTERVAL_MS", "3600000"),
    ];
    let stack = bank_tests::procs::ProcStack::start(
        &nats,
        env.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
    .await
    .unwrap();
    let core = stack.core_api();
    let customer = core.new_customer("Customer").await;
    let from = core.new_account(&customer).await;
    core.deposit(&from, 10_000).await.expect(200);
    let to = core.funded_account(0).await;
    let api = Api::new(
        stack.transfer_base(),
        Some(bank_tests::apps::customer_token(&customer)),
    );
    let db_url = stack.cfg.channel_db.clone();
    let held = bank_tests::db::RowLock::channel_pending(&db_url, &customer, &from)
        .await
        .unwrap();
    let abandoned = r#"transfer_requests_total{result="abandoned""#;
    assert_eq!(
        bank_tests::metrics::read(&stack.transfer_base(), abandoned).await,
        0.0
    );
    let request = {
        let (api, from, to) = (api.clone(), from.clone(), to.clone());
        tokio::spawn(async move { send(&api, &from, &to, 700).await })
    };
    held.until_waited_on("storing the transfer").await;
    // The customer hangs up: the service drops the request.
    request.abort();
    eventually(
        "the request is dropped",
        Duration::from_secs(10),
        || async {
            match bank_tests::metrics::read(&stack.transfer_base(), abandoned).await {
                1.0 => Ok(()),
                n => Err(format!("abandoned {n}")),
            }
        },
    )
    .await;
    held.release().await.unwrap();
    eventually(
        "the transfer is executed",
        Duration::from_secs(10),
        || async {
            match only_transfer_from(&db_url, &from).await {
                Some((_, status, _)) if status == "succeeded" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(core.balance(&to).await, 700);
    assert_eq!(core.balance(&from).await, 9_300);
}

/// After a 503: transfer `id` never reached the core and moved nothing
/// (its target `to` is still empty), and the retry of `body` with the same
/// `key` makes the transfer, once (700 won).
async fn not_made_then_made_by_the_retry(
    stack: &Stack,
    api: &Api,
    id: &str,
    body: Value,
    key: &str,
    to: &str,
) {
    stack
        .core
        .api
        .get(&format!("/v1/transfers/{id}"))
        .await
        .expect(404);
    assert_eq!(stack.core.api.balance(to).await, 0);
    let retry = api
        .send(
            "POST",
            "/v1/transfers",
            Some(body),
            &[("Idempotency-Key", key)],
        )
        .await;
    assert!(matches!(retry.status, 200 | 202), "{}", retry.body);
    assert_ne!(retry.str("transfer_id"), id);
    wait_status(
        api,
        &retry.str("transfer_id"),
        "succeeded",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(stack.core.api.balance(to).await, 700);
}

/// B9, F3: the transfer cannot be stored before the answer is due (the
/// statement waits on a lock): the customer is answered 503, and when the
/// store goes through after all the transfer is failed at once, never
/// executed (not left pending until its fence, nor sent to the core after
/// the customer was told it was not made), and its `Idempotency-Key` is
/// freed: the customer's retry with it, as the 503 invites, makes the
/// transfer.
#[tokio::test]
async fn b09_f3_a_transfer_stored_after_its_request_answered_503_is_failed_not_executed() {
    let stack = Stack::start(holding_the_store()).await.unwrap();
    let (customer, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let db_url = stack.transfer.db_url.clone();
    let held = bank_tests::db::RowLock::channel_pending(&db_url, &customer, &from)
        .await
        .unwrap();
    let key = unique("key-");
    let body = json!({"from_account": from, "to_account": to, "amount": "700"});
    let request = {
        let (api, body, key) = (api.clone(), body.clone(), key.clone());
        tokio::spawn(async move {
            api.send(
                "POST",
                "/v1/transfers",
                Some(body),
                &[("Idempotency-Key", key.as_str())],
            )
            .await
        })
    };
    held.until_waited_on("storing the transfer").await;
    let r = request.await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "unavailable");
    held.release().await.unwrap();
    let (id, _, reason) = eventually(
        "the transfer is failed",
        Duration::from_secs(10),
        || async {
            match only_transfer_from(&db_url, &from).await {
                Some((id, status, reason)) if status == "failed" => Ok((id, status, reason)),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(reason, "never_received");
    assert_eq!(status(&api, &id).await["status"], "failed");
    // The core never received it.
    not_made_then_made_by_the_retry(&stack, &api, &id, body, &key, &to).await;
}

/// B9, F3: the store's answer is lost and the channel database stays out of
/// reach past the answer's deadline: the customer is answered 503, and once
/// the database is back the transfer, which had been stored, is failed
/// (never executed) and its `Idempotency-Key` freed, so the customer's retry
/// makes it, once.
#[tokio::test]
async fn b09_f3_a_store_of_unknown_outcome_past_the_deadline_is_settled_as_not_made() {
    store_of_unknown_outcome_past_the_deadline(Lost::Answer).await;
}

/// B9, F3: as above, but the store never reached the database (the client
/// cannot tell the two apart): the id is taken by a failed row of reason
/// `not_stored`, so no late copy of the store can make a pending transfer,
/// and the retry with the same key makes the transfer, once.
#[tokio::test]
async fn b09_f3_a_store_lost_on_its_way_past_the_deadline_takes_its_id_and_makes_nothing() {
    store_of_unknown_outcome_past_the_deadline(Lost::Request).await;
}

enum Lost {
    Answer,
    Request,
}

async fn store_of_unknown_outcome_past_the_deadline(lost: Lost) {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let db = TcpCut::before(&stack.transfer.db_url, 5432).await.unwrap();
    let opts = holding_the_store().transfer;
    let transfer = TransferApp::spawn(
        &stack.nats,
        &stack.proxy.url(),
        TransferOptions {
            database_url: Some(db.route(&stack.transfer.db_url).unwrap()),
            ..opts
        },
    )
    .await
    .unwrap();
    let (customer, from, _) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let api = transfer.as_customer(&customer);
    // The memo reaches the database only in the statement storing the
    // transfer.
    let memo = unique("answer-lost-");
    let key = unique("key-");
    let body = json!({"from_account": from, "to_account": to, "amount": "700", "memo": memo});
    match lost {
        Lost::Answer => db.lose_answer_then_cut(memo.as_bytes()),
        Lost::Request => db.lose_request_then_cut(memo.as_bytes()),
    }
    let r = api
        .send(
            "POST",
            "/v1/transfers",
            Some(body.clone()),
            &[("Idempotency-Key", key.as_str())],
        )
        .await;
    assert_eq!(db.answers_lost(), 1, "nothing was lost: {}", r.body);
    assert_eq!(r.status, 503, "{}", r.body);
    let channel_db = stack.transfer.db_url.clone();
    // The service could not reach the database since.
    let before = only_transfer_from(&channel_db, &from).await;
    match lost {
        Lost::Answer => assert_eq!(before.map(|(_, s, _)| s).as_deref(), Some("pending")),
        Lost::Request => assert_eq!(before, None),
    }
    db.restore();
    let (id, reason) = eventually(
        "the transfer is settled",
        Duration::from_secs(15),
        || async {
            match only_transfer_from(&channel_db, &from).await {
                Some((id, status, reason)) if status == "failed" => Ok((id, reason)),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    match lost {
        Lost::Answer => assert_eq!(reason, "never_received"),
        Lost::Request => assert_eq!(reason, "not_stored"),
    }
    not_made_then_made_by_the_retry(&stack, &api, &id, body, &key, &to).await;
}

/// B3, F3: the core answers 503 `account_busy` (the source account stayed
/// held by another operation through the ledger's retries; nothing was
/// executed): the transfer service takes it for "not executed, try again",
/// not for a refusal, and calls again with the same transfer id; once the
/// account is free the transfer succeeds, once.
#[tokio::test]
async fn b03_f3_a_core_answering_account_busy_is_called_again_and_the_money_moves_once() {
    let stack = Stack::start(StackOptions {
        core: bank_tests::apps::CoreOptions {
            // The ledger gives up on a held account within about a second.
            lock_timeout_ms: 50,
            ..Default::default()
        },
        transfer: TransferOptions {
            core_timeout_ms: 8_000,
            request_timeout_ms: 15_000,
            // Only the request's own calls may settle the transfer.
            reconcile_interval_ms: 3_600_000,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    let held = bank_tests::db::RowLock::account(&stack.core.db_url, &from)
        .await
        .unwrap();
    let request = {
        let (api, from, to) = (api.clone(), from.clone(), to.clone());
        tokio::spawn(async move { send(&api, &from, &to, 700).await })
    };
    let busy = || {
        stack
            .proxy
            .answered()
            .into_iter()
            .filter(|(m, p, status)| m == Method::POST && p == "/v1/transfers" && *status == 503)
            .count()
    };
    eventually(
        "the core answers account_busy",
        Duration::from_secs(10),
        || async {
            match busy() {
                0 => Err("not yet".to_owned()),
                n => Ok(n),
            }
        },
    )
    .await;
    held.release().await.unwrap();
    let r = request.await.unwrap();
    assert!(matches!(r.status, 200 | 202), "{}", r.body);
    let id = r.str("transfer_id");
    wait_status(&api, &id, "succeeded", Duration::from_secs(10)).await;
    assert_eq!(stack.core.api.balance(&to).await, 700);
    assert_eq!(stack.core.api.balance(&from).await, 9_300);
    let calls = stack
        .proxy
        .answered()
        .into_iter()
        .filter(|(m, p, _)| m == Method::POST && p == "/v1/transfers")
        .count();
    assert!(
        calls > busy(),
        "called again after account_busy: {calls} calls"
    );
}

/// B11's bound with the reconciler as shipped (its default period and
/// fence margin; only the TTL shortened): a lost request is failed by the
/// reconciler alone, nobody asking, within the TTL + 5 s.
#[tokio::test]
async fn b11_f3_with_the_default_reconciler_a_lost_request_fails_within_the_ttl_plus_5_s() {
    let shipped = transfer::Config::defaults();
    let ttl = 2;
    let stack = Stack::start(StackOptions {
        transfer: TransferOptions {
            request_ttl_secs: ttl,
            core_timeout_ms: 300,
            reconcile_interval_ms: shipped.reconcile_interval_ms,
            fence_margin_ms: shipped.fence_margin_ms,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    stack
        .proxy
        .add(Some(Method::POST), "/v1/transfers", Action::Drop, Some(1));
    let started = Instant::now();
    let id = send(&api, &from, &to, 1000)
        .await
        .expect(202)
        .str("transfer_id");
    // Read from the channel database, not through the API (a status
    // question settles a pending transfer itself).
    let sql = format!(
        "SELECT status || ' ' || coalesce(reason, '') FROM transfer_requests WHERE transfer_id = '{id}'"
    );
    bank_tests::db::until_rows(
        &stack.transfer.db_url,
        &sql,
        &["failed never_received"],
        "the reconciler failed it",
        Duration::from_secs(30),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(ttl) && took <= Duration::from_secs(ttl + 5),
        "failed after {took:?}: the bound is the TTL ({ttl} s) + 5 s"
    );
    assert_eq!(stack.core.api.balance(&from).await, 10_000);
}

#[tokio::test]
async fn f3_lost_request_fails_after_the_ttl_and_the_account_is_usable_again() {
    let stack = Stack::start(fast(2, 300)).await.unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    stack
        .proxy
        .add(Some(Method::POST), "/v1/transfers", Action::Drop, Some(1));
    let started = Instant::now();
    let r = send(&api, &from, &to, 1000).await.expect(202);
    let id = r.str("transfer_id");
    let failed = wait_status(&api, &id, "failed", Duration::from_secs(60)).await;
    // Not before the TTL: until then the request could still reach the core.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "failed before the 2 s TTL ran out"
    );
    // B11: and no later than the TTL + 5 s.
    assert!(
        started.elapsed() <= Duration::from_secs(2 + 5),
        "failed only after {:?}, past the TTL + 5 s",
        started.elapsed()
    );
    assert_eq!(failed["reason"], "never_received");
    // The core recorded the fence.
    let core_view = stack
        .core
        .api
        .get(&format!("/v1/transfers/{id}"))
        .await
        .expect(200);
    assert_eq!(core_view.body["reason"], "never_received");
    send(&api, &from, &to, 1000).await.expect(200);
    assert_eq!(
        stack.core.api.balance(&to).await,
        1000,
        "only the second transfer moved money"
    );
}

#[tokio::test]
async fn f4_request_arriving_after_the_channel_declared_failure_never_moves_money() {
    // The core's TTL as the channel's (the request is also past it when it
    // arrives), and the core's TTL much longer (a misconfiguration): the
    // fence alone must refuse it then.
    for core_ttl in [None, Some(600)] {
        late_request_never_moves_money(core_ttl).await;
    }
}

async fn late_request_never_moves_money(core_ttl: Option<u64>) {
    let stack = Stack::start(StackOptions {
        core_request_ttl_secs: core_ttl,
        ..fast(2, 300)
    })
    .await
    .unwrap();
    let (_, from, api) = stack.customer_with_account(10_000).await;
    let to = stack.core.api.funded_account(0).await;
    stack
        .proxy
        .add(Some(Method::POST), "/v1/transfers", Action::Hold, Some(1));
    let id = send(&api, &from, &to, 1000)
        .await
        .expect(202)
        .str("transfer_id");
    wait_status(&api, &id, "failed", Duration::from_secs(7)).await;
    // Now the delayed request reaches the core.
    let delivered = || {
        stack
            .proxy
            .forwarded()
            .iter()
            .filter(|(m, p)| m == Method::POST && p == "/v1/transfers")
            .count()
    };
    assert_eq!(delivered(), 0);
    stack.proxy.release_held();
    // The core answered the late request (nobody listens any more): it is
    // refused as fenced.
    let late_answer = eventually(
        "the core answered the held request",
        Duration::from_secs(5),
        || async {
            let answers: Vec<u16> = stack
                .proxy
                .answered()
                .into_iter()
                .filter(|(m, p, _)| m == Method::POST && p == "/v1/transfers")
                .map(|(_, _, status)| status)
                .collect();
            match answers.as_slice() {
                [status] => Ok(*status),
                _ => Err(format!("answers so far: {answers:?}")),
            }
        },
    )
    .await;
    assert_eq!(delivered(), 1);
    assert_eq!(late_answer, 422, "the late request is refused");
    // It was refused by the fence: the same request again gets the core's
    // recorded answer for this id, whichever refused it first.
    let again = stack
        .core
        .api
        .post(
            "/v1/transfers",
            bank_tests::client::transfer_body(&id, &from, &to, 1000),
        )
        .await;
    assert_eq!(
        (again.status, again.code()),
        (422, Some("transfer_fenced")),
        "core TTL {core_ttl:?}: {}",
        again.body
    );
    let core_view = eventually("the core's decision", Duration::from_secs(5), || async {
        let r = stack.core.api.get(&format!("/v1/transfers/{id}")).await;
        if r.status == 200 {
            Ok(r.body)
        } else {
            Err(r.body.to_string())
        }
    })
    .await;
    assert_eq!(core_view["status"], "failed");
    assert_eq!(
        stack.core.api.balance(&from).await,
        10_000,
        "money never moves"
    );
    assert_eq!(stack.core.api.balance(&to).await, 0);
    assert_eq!(status(&api, &id).await["status"], "failed");
}
