//! B8: the transactional outbox and its relay.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::stream;
use bank_tests::db::fresh_database;
use bank_tests::nats::stream_messages;
use bank_tests::process::signal;
use bank_tests::{NatsServer, eventually};
use common::outbox::{self, OutboxMessage, Relay, RelayConfig, RelayWaker};
use common::shutdown::CancellationToken;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement, TransactionTrait};

async fn outbox_db() -> DatabaseConnection {
    outbox_db_and_url().await.0
}

async fn outbox_db_and_url() -> (DatabaseConnection, String) {
    let url = fresh_database("outbox").await.unwrap();
    let db = Database::connect(url.as_str()).await.unwrap();
    // The same DDL as the services' migrations.
    db.execute_unprepared(outbox::CREATE_SQL).await.unwrap();
    db.execute_unprepared(outbox::NOTIFY_OPT_OUT_SQL)
        .await
        .unwrap();
    db.execute_unprepared(outbox::VACUUM_SETTINGS_SQL)
        .await
        .unwrap();
    (db, url)
}

/// The stream of the test subjects, as a relay creates it again.
const TEST_STREAM: common::jetstream::StreamSpec = common::jetstream::StreamSpec {
    name: "TEST",
    subjects: &["test.>"],
    description: "test subjects",
    max_age: Duration::ZERO,
    max_bytes: None,
};

async fn test_stream(nats: &NatsServer) -> async_nats::jetstream::Context {
    let js = nats.jetstream().await.unwrap();
    js.create_stream(stream::Config {
        name: "TEST".into(),
        subjects: vec!["test.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    js
}

fn relay(
    db: &DatabaseConnection,
    js: &async_nats::jetstream::Context,
    abort_before_mark: bool,
) -> Relay {
    Relay::new(
        db.clone(),
        js.clone(),
        RelayConfig {
            service: "test",
            batch_size: 50,
            poll_interval: Duration::from_millis(100),
            retention: Duration::from_secs(3600),
            streams: &[TEST_STREAM],
            stream_replicas: 1,
            abort_before_mark,
        },
        RelayWaker::default(),
    )
}

fn message(subject: &str, n: usize) -> OutboxMessage {
    OutboxMessage {
        event_id: format!("{subject}:{n}"),
        subject: subject.to_owned(),
        payload: format!("{{\"n\":{n}}}"),
        traceparent: None,
    }
}

async fn unpublished(db: &DatabaseConnection) -> i64 {
    db.query_one_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get("", "n")
    .unwrap()
}

/// `Ok` once every row is published.
async fn all_published(db: &DatabaseConnection) -> Result<(), String> {
    match unpublished(db).await {
        0 => Ok(()),
        n => Err(format!("{n} unpublished")),
    }
}

async fn wait_until_all_published_within(db: &DatabaseConnection, what: &str, within: Duration) {
    eventually(what, within, || all_published(db)).await;
}

async fn published_ids(
    js: &async_nats::jetstream::Context,
) -> Vec<(String, String, serde_json::Value)> {
    stream_messages(js, "TEST")
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .unwrap_or_default();
            assert!(
                m.headers.get("traceparent").is_some(),
                "every message carries traceparent"
            );
            (
                id,
                m.subject.to_string(),
                serde_json::from_slice(&m.payload).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn b08_committed_rows_are_published_once_with_their_event_id() {
    let nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let db = outbox_db().await;
    for n in 0..40 {
        let txn = db.begin().await.unwrap();
        outbox::enqueue(&txn, &[message(&format!("test.s{}", n % 4), n)])
            .await
            .unwrap();
        txn.commit().await.unwrap();
    }
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay(&db, &js, false).run(stop.clone()));
    wait_until_all_published_within(&db, "all rows published", Duration::from_secs(20)).await;
    stop.cancel();
    task.await.unwrap();
    let msgs = published_ids(&js).await;
    assert_eq!(msgs.len(), 40);
    for (id, subject, body) in &msgs {
        assert_eq!(
            id,
            &format!("{subject}:{}", body["n"]),
            "Nats-Msg-Id is the event id"
        );
    }
}

/// A stream the relay publishes to that disappears (deleted, or the server
/// lost its JetStream storage) is created again by the relay, and the rows
/// waiting for it are published: nothing waits for a restart.
#[tokio::test]
async fn b08_a_deleted_stream_is_created_again_by_the_relay_and_the_waiting_rows_published() {
    let nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let db = outbox_db().await;
    let enqueue = |from: usize| {
        let db = db.clone();
        async move {
            for n in from..from + 5 {
                outbox::enqueue(&db, &[message(&format!("test.s{}", n % 2), n)])
                    .await
                    .unwrap();
            }
        }
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay(&db, &js, false).run(stop.clone()));
    enqueue(0).await;
    wait_until_all_published_within(&db, "the first rows published", Duration::from_secs(20)).await;
    js.delete_stream("TEST").await.unwrap();
    enqueue(5).await;
    wait_until_all_published_within(
        &db,
        "the rows published once the stream is back",
        Duration::from_secs(20),
    )
    .await;
    stop.cancel();
    task.await.unwrap();
    let ids: Vec<String> = published_ids(&js)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(
        ids,
        (5..10)
            .map(|n| format!("test.s{}:{n}", n % 2))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn b08_rolled_back_transaction_publishes_nothing() {
    let nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let db = outbox_db().await;
    let txn = db.begin().await.unwrap();
    outbox::enqueue(&txn, &[message("test.rollback", 1)])
        .await
        .unwrap();
    txn.rollback().await.unwrap();
    let txn = db.begin().await.unwrap();
    outbox::enqueue(&txn, &[message("test.commit", 2)])
        .await
        .unwrap();
    txn.commit().await.unwrap();
    let r = relay(&db, &js, false);
    assert_eq!(r.publish_pass().await.unwrap(), 1);
    let msgs = published_ids(&js).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, "test.commit:2");
}

#[tokio::test]
async fn b08_relay_stopped_after_publish_before_mark_republishes_and_stream_keeps_one_copy() {
    let nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let db = outbox_db().await;
    let rows: Vec<_> = (0..10).map(|n| message("test.crash", n)).collect();
    outbox::enqueue(&db, &rows).await.unwrap();
    // Publishes, then fails before marking: as a crash at that point would.
    let crashing = relay(&db, &js, true);
    assert!(crashing.publish_pass().await.is_err());
    assert_eq!(unpublished(&db).await, 10, "nothing was marked");
    assert_eq!(
        published_ids(&js).await.len(),
        10,
        "but everything was published"
    );
    // The restarted relay publishes again; JetStream drops the duplicates.
    let restarted = relay(&db, &js, false);
    assert_eq!(restarted.publish_pass().await.unwrap(), 10);
    assert_eq!(unpublished(&db).await, 0);
    let msgs = published_ids(&js).await;
    assert_eq!(msgs.len(), 10, "one copy of each in the stream");
}

#[tokio::test]
async fn b08_two_relays_publish_every_row_in_per_subject_order() {
    let nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let db = outbox_db().await;
    let stop = CancellationToken::new();
    let a = tokio::spawn(relay(&db, &js, false).run(stop.clone()));
    let b = tokio::spawn(relay(&db, &js, false).run(stop.clone()));
    // Ten writers, each the only writer of its subject, writing in order.
    let mut writers = Vec::new();
    for w in 0..10 {
        let db = db.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..50 {
                let txn = db.begin().await.unwrap();
                outbox::enqueue(&txn, &[message(&format!("test.w{w}"), n)])
                    .await
                    .unwrap();
                txn.commit().await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    wait_until_all_published_within(&db, "all 500 rows published", Duration::from_secs(30)).await;
    stop.cancel();
    a.await.unwrap();
    b.await.unwrap();
    let msgs = published_ids(&js).await;
    assert_eq!(msgs.len(), 500, "every row exactly once");
    let mut last: HashMap<String, i64> = HashMap::new();
    for (_, subject, body) in msgs {
        let n = body["n"].as_i64().unwrap();
        let prev = last.insert(subject.clone(), n);
        assert_eq!(prev.map_or(0, |p| p + 1), n, "{subject} out of order");
    }
}

#[tokio::test]
async fn b08_rows_wait_while_nats_is_down_and_are_published_when_it_returns() {
    let mut nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let db = outbox_db().await;
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay(&db, &js, false).run(stop.clone()));
    nats.stop().await;
    let rows: Vec<_> = (0..20).map(|n| message("test.outage", n)).collect();
    outbox::enqueue(&db, &rows).await.unwrap();
    // While NATS is down nothing can be marked.
    tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            assert_eq!(
                unpublished(&db).await,
                20,
                "rows must wait while NATS is down"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .ok();
    nats.resume().await.unwrap();
    wait_until_all_published_within(
        &db,
        "rows published after NATS returns",
        Duration::from_secs(60),
    )
    .await;
    stop.cancel();
    task.await.unwrap();
    let js = nats.jetstream().await.unwrap();
    assert_eq!(published_ids(&js).await.len(), 20);
}

/// A relay that would otherwise only poll once an hour, so that only a
/// wake-up can explain a prompt publish.
fn slow_polling_relay(
    db: &DatabaseConnection,
    js: &async_nats::jetstream::Context,
    waker: RelayWaker,
) -> Relay {
    Relay::new(
        db.clone(),
        js.clone(),
        RelayConfig {
            service: "test",
            batch_size: 50,
            poll_interval: Duration::from_secs(3600),
            retention: Duration::from_secs(3600),
            streams: &[],
            stream_replicas: 1,
            abort_before_mark: false,
        },
        waker,
    )
}

async fn enqueue_one(db: &DatabaseConnection, n: usize, notify: bool) {
    let txn = db.begin().await.unwrap();
    if !notify {
        txn.execute_unprepared("SET LOCAL bank.outbox_notify = 'off'")
            .await
            .unwrap();
    }
    outbox::enqueue(&txn, &[message("test.wake", n)])
        .await
        .unwrap();
    txn.commit().await.unwrap();
}

async fn wait_until_all_published(db: &DatabaseConnection, what: &str) {
    wait_until_all_published_within(db, what, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn b08_relay_is_woken_by_listen_notify_after_commit() {
    let nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let db = outbox_db().await;
    let stop = CancellationToken::new();
    let task = tokio::spawn(slow_polling_relay(&db, &js, RelayWaker::default()).run(stop.clone()));
    // The notification only reaches a relay that is already listening.
    eventually("the relay listens", Duration::from_secs(20), || async {
        let listening: i64 = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND state = 'idle' \
                   AND query ILIKE 'LISTEN%outbox_inserted%'",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "n")
            .unwrap();
        if listening > 0 {
            Ok(())
        } else {
            Err("no LISTEN session".into())
        }
    })
    .await;
    // A writer outside the services (no opt-out): the trigger's NOTIFY wakes
    // it. (The relay also passes once when its listener connects; only the
    // rows after the first prove the notification.)
    for n in 1..=3 {
        enqueue_one(&db, n, true).await;
        wait_until_all_published(&db, "the notified row is published").await;
    }
    assert_eq!(published_ids(&js).await.len(), 3);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn b08_writer_that_opts_out_of_notify_wakes_its_relay_in_process() {
    let nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let db = outbox_db().await;
    let waker = RelayWaker::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(slow_polling_relay(&db, &js, waker.clone()).run(stop.clone()));
    for n in 1..=3 {
        enqueue_one(&db, n, false).await;
        waker.wake();
        wait_until_all_published(&db, "the row is published after the in-process wake").await;
    }
    let ids: Vec<String> = published_ids(&js)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(ids, ["test.wake:1", "test.wake:2", "test.wake:3"]);
    stop.cancel();
    task.await.unwrap();
}

/// The plan of one of a pass's statements (`sql`, run with `arg`), as
/// `EXPLAIN EXECUTE` prints it, and whether it was a generic plan (which
/// `settings` may ask for).
async fn pass_plan(
    db: &DatabaseConnection,
    settings: Option<&str>,
    sql: &str,
    arg: &str,
) -> (String, bool) {
    let txn = db.begin().await.unwrap();
    if let Some(sql) = settings {
        txn.query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            [1_i64.into()],
        ))
        .await
        .unwrap();
    }
    txn.execute_unprepared(&format!("PREPARE pass_statement AS {sql}"))
        .await
        .unwrap();
    let plan = txn
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            format!("EXPLAIN EXECUTE pass_statement({arg})"),
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get_by_index::<String>(0).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let generic: i64 = txn
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT generic_plans FROM pg_prepared_statements WHERE name = 'pass_statement'",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index(0)
        .unwrap();
    // Prepared statements outlive the transaction.
    txn.execute_unprepared("DEALLOCATE pass_statement")
        .await
        .unwrap();
    txn.rollback().await.unwrap();
    (plan, generic > 0)
}

/// The statistics were taken while rows waited, so the planner expects
/// hundreds of unpublished rows: left to itself it reads the whole table,
/// where every published row's dead entry costs a table read on every pass.
/// The pass's own settings keep it on the index of unpublished rows in id
/// order, which skips dead entries once flagged; and as the pass keeps one
/// generic plan per statement instead of planning each time, that plan is
/// the index scan too, as is the mark's, on a new empty outbox as well.
#[tokio::test]
async fn b08_a_pass_walks_the_index_of_unpublished_rows_whatever_the_statistics() {
    let db = outbox_db().await;
    let settings = Some(outbox::relay::PASS_START_SQL);
    // A generic plan is kept until the table's statistics change, so the one
    // made on a new, empty outbox must already be the right one.
    let (empty, generic) = pass_plan(&db, settings, outbox::relay::UNPUBLISHED_SQL, "1000").await;
    assert!(
        empty.contains("Index Scan using outbox_unpublished") && generic,
        "on an empty outbox:\n{empty}"
    );
    db.execute_unprepared(
        "INSERT INTO outbox (event_id, subject, payload) \
           SELECT 'e' || g, 'test.plan', '{}' FROM generate_series(1, 26000) g;
         UPDATE outbox SET published_at = clock_timestamp() WHERE id <= 25300;
         ANALYZE outbox;
         UPDATE outbox SET published_at = clock_timestamp() WHERE published_at IS NULL;",
    )
    .await
    .unwrap();
    let read = outbox::relay::UNPUBLISHED_SQL;
    let (unguided, _) = pass_plan(&db, None, read, "1000").await;
    assert!(
        !unguided.contains("Index Scan using outbox_unpublished"),
        "precondition: these statistics mislead the planner, but it chose\n{unguided}"
    );
    let (plan, generic) = pass_plan(&db, settings, read, "1000").await;
    assert!(
        plan.contains("Index Scan using outbox_unpublished") && !plan.contains("Sort") && generic,
        "a pass reads the unpublished rows through their index, in id order, with a generic plan:\n{plan}"
    );
    let (mark, generic) = pass_plan(&db, settings, outbox::relay::MARK_SQL, "'{1,2,3}'").await;
    assert!(
        mark.contains("Index Scan using outbox_pkey") && generic,
        "the mark finds its rows by id, with a generic plan:\n{mark}"
    );
}

/// Sessions of `db`'s database inside a transaction, other than the one
/// asking (which must not be one of the pool under test, or it could be the
/// very connection it looks for).
async fn sessions_in_a_transaction(db: &DatabaseConnection) -> i64 {
    db.query_one_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get("", "n")
    .unwrap()
}

/// A pass abandoned in the middle (here: its future dropped while NATS is
/// frozen and the acknowledgements never come) must not leave a pooled
/// connection inside its transaction, holding the relay lock: the pass is
/// rolled back and the next passes publish everything.
#[tokio::test]
async fn b08_a_pass_abandoned_midway_leaves_no_connection_inside_its_transaction() {
    let nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let (db, url) = outbox_db_and_url().await;
    let observer = Database::connect(url.as_str()).await.unwrap();
    let rows: Vec<_> = (0..20).map(|n| message("test.abandoned", n)).collect();
    outbox::enqueue(&db, &rows).await.unwrap();
    let relay = relay(&db, &js, false);
    let pid = nats.pid().unwrap();
    signal(pid, "STOP").unwrap();
    let abandoned = tokio::time::timeout(Duration::from_millis(500), relay.publish_pass()).await;
    signal(pid, "CONT").unwrap();
    assert!(
        abandoned.is_err(),
        "the pass waited for NATS: {abandoned:?}"
    );
    eventually(
        "no session left inside the abandoned pass's transaction",
        Duration::from_secs(10),
        || async {
            match sessions_in_a_transaction(&observer).await {
                0 => Ok(()),
                n => Err(format!("{n} sessions idle in a transaction")),
            }
        },
    )
    .await;
    eventually(
        "the next passes publish every row",
        Duration::from_secs(20),
        || async {
            relay.publish_pass().await.map_err(|e| e.to_string())?;
            all_published(&db).await
        },
    )
    .await;
    assert_eq!(published_ids(&js).await.len(), 20);
}

/// Pruning keeps up with a busy outbox: one run removes every row past the
/// retention, not one batch of them.
#[tokio::test]
async fn b08_pruning_removes_every_expired_row_in_one_run() {
    let nats = NatsServer::start().await.unwrap();
    let js = test_stream(&nats).await;
    let db = outbox_db().await;
    db.execute_unprepared(
        "INSERT INTO outbox (event_id, subject, payload, published_at) \
           SELECT 'e' || g, 'test.prune', '{}', clock_timestamp() - interval '2 hours' \
           FROM generate_series(1, 25000) g;
         INSERT INTO outbox (event_id, subject, payload, published_at) \
           VALUES ('recent', 'test.prune', '{}', clock_timestamp()), ('waiting', 'test.prune', '{}', NULL);",
    )
    .await
    .unwrap();
    // Retention is one hour.
    let pruned = relay(&db, &js, false).prune().await.unwrap();
    assert_eq!(pruned, 25000);
    let left: Vec<String> = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT event_id FROM outbox ORDER BY id",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("", "event_id").unwrap())
        .collect();
    assert_eq!(left, ["recent", "waiting"]);
}

/// A process that ensures the streams brings an existing stream's subjects
/// back to the contract but never lowers what an operator raised (retention,
/// the duplicate window; replicas alike, which one server cannot show): an
/// operator's command run without the production settings changes nothing
/// that protects the messages. A stream's own lower settings are raised.
#[tokio::test]
async fn b08_ensuring_the_streams_keeps_an_operators_longer_retention_and_restores_subjects() {
    let nats = NatsServer::start().await.unwrap();
    let js = nats.jetstream().await.unwrap();
    let day = Duration::from_secs(86_400);
    let mut ledger = common::jetstream::stream_config(&common::jetstream::LEDGER, 1);
    ledger.max_age = 400 * day;
    ledger.duplicate_window = Duration::from_secs(600);
    ledger.subjects = vec!["bank.ledger.operator-only".to_owned()];
    js.create_stream(ledger).await.unwrap();
    let mut dlq = common::jetstream::stream_config(&common::jetstream::DLQ, 1);
    dlq.max_bytes = 1 << 20;
    dlq.duplicate_window = Duration::from_secs(30);
    js.create_stream(dlq).await.unwrap();

    let specs = [common::jetstream::LEDGER, common::jetstream::DLQ];
    common::jetstream::ensure_streams(&js, &specs, 1)
        .await
        .unwrap();

    let spec_ledger = common::jetstream::stream_config(&common::jetstream::LEDGER, 1);
    let ledger = js
        .get_stream("LEDGER")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(
        ledger.max_age,
        400 * day,
        "the operator's retention is kept"
    );
    assert_eq!(ledger.duplicate_window, Duration::from_secs(600));
    assert_eq!(
        ledger.subjects, spec_ledger.subjects,
        "the contract's subjects"
    );
    let dlq = js
        .get_stream("DLQ")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(
        dlq.max_bytes,
        common::jetstream::DLQ_MAX_BYTES,
        "raised to the code's bound"
    );
    assert_eq!(dlq.duplicate_window, common::jetstream::DUPLICATE_WINDOW);

    // Ensuring again changes nothing, and a missing stream is created.
    let interest = [common::jetstream::LEDGER, common::jetstream::INTEREST];
    common::jetstream::ensure_streams(&js, &interest, 1)
        .await
        .unwrap();
    let again = js
        .get_stream("LEDGER")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(again, ledger);
    let interest = js
        .get_stream("INTEREST")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(interest.subjects, ["bank.interest.*"]);
}
