//! The projector: B14-B16, B23, F5-F7.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bank_tests::apps::{CORE_READ_TOKEN, ProjectorOptions};
use bank_tests::nats::stream_messages;
use bank_tests::process::ServiceProcess;
use bank_tests::proxy::{Action, FaultProxy};
use bank_tests::tcp_proxy::TcpCut;
use bank_tests::verify::deposit_entry as entry;
use bank_tests::verify::{channel_history, core_ledger, history_mismatches};
use bank_tests::{CoreApp, NatsServer, ProjectorApp, eventually, unique};
use common::Won;
use common::events::EntryKind;
use serde_json::{Value, json};
use transfer::history::writer;

struct Rig {
    nats: NatsServer,
    core: CoreApp,
    proxy: FaultProxy,
    channel_db: String,
}

impl Rig {
    async fn new() -> Self {
        let nats = NatsServer::start().await.unwrap();
        let core = CoreApp::spawn(&nats).await.unwrap();
        let proxy = FaultProxy::start(&core.api.base).await.unwrap();
        let channel_db = bank_tests::db::fresh_database("channel").await.unwrap();
        Self {
            nats,
            core,
            proxy,
            channel_db,
        }
    }

    /// A projector reaching the core through the proxy.
    async fn projector(&self, opts: ProjectorOptions) -> ProjectorApp {
        ProjectorApp::spawn(&self.nats, &self.proxy.url(), &self.channel_db, opts)
            .await
            .unwrap()
    }

    /// A projector reaching the core through the proxy and its database at `db_url`.
    async fn projector_on(&self, db_url: &str, opts: ProjectorOptions) -> ProjectorApp {
        ProjectorApp::spawn(&self.nats, &self.proxy.url(), db_url, opts)
            .await
            .unwrap()
    }

    async fn synced(&self, account: &str) -> usize {
        channel_history(&self.channel_db, account)
            .await
            .unwrap()
            .len()
    }

    async fn wait_synced(&self, account: &str, n: usize, within: Duration) {
        eventually(
            &format!("{account} history has {n} entries"),
            within,
            || async {
                let got = self.synced(account).await;
                if got == n {
                    Ok(())
                } else {
                    Err(format!("{got}"))
                }
            },
        )
        .await;
    }

    /// Stream sequences of an account's ledger messages, in order.
    async fn ledger_seqs_of(&self, account: &str) -> Vec<(u64, Value)> {
        let js = self.nats.jetstream().await.unwrap();
        stream_messages(&js, "LEDGER")
            .await
            .unwrap()
            .into_iter()
            .filter(|m| m.subject.as_str() == format!("bank.ledger.{account}"))
            .map(|m| (m.sequence, serde_json::from_slice(&m.payload).unwrap()))
            .collect()
    }

    async fn wait_published(&self, account: &str, n: usize) -> Vec<(u64, Value)> {
        eventually(
            "ledger events published",
            Duration::from_secs(10),
            || async {
                let m = self.ledger_seqs_of(account).await;
                if m.len() >= n {
                    Ok(m)
                } else {
                    Err(format!("{}", m.len()))
                }
            },
        )
        .await
    }
}

async fn publish_raw(nats: &NatsServer, subject: &str, body: Vec<u8>) {
    let js = nats.jetstream().await.unwrap();
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", unique("raw-").as_str());
    js.publish_with_headers(subject.to_owned(), h, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The state of a projector's durable consumer on `LEDGER`.
async fn ledger_consumer_info(
    js: &async_nats::jetstream::Context,
    consumer: &str,
) -> Result<async_nats::jetstream::consumer::Info, String> {
    let mut c: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(consumer, "LEDGER")
        .await
        .map_err(|e| e.to_string())?;
    c.info().await.cloned().map_err(|e| e.to_string())
}

/// Waits until the projector's consumer of `stream` has acknowledged every
/// message the stream holds: each delivery, duplicates included, was handled.
async fn consumed_all(rig: &Rig, stream: &str, consumer: &str) {
    let js = rig.nats.jetstream().await.unwrap();
    eventually(
        &format!("{consumer} acknowledged all of {stream}"),
        Duration::from_secs(20),
        || async {
            let last = js
                .get_stream(stream)
                .await
                .map_err(|e| e.to_string())?
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .last_sequence;
            let mut c: async_nats::jetstream::consumer::PullConsumer = js
                .get_consumer_from_stream(consumer, stream)
                .await
                .map_err(|e| e.to_string())?;
            let info = c.info().await.map_err(|e| e.to_string())?;
            if info.ack_floor.stream_sequence >= last
                && info.num_ack_pending == 0
                && info.num_pending == 0
            {
                Ok(())
            } else {
                Err(format!(
                    "ack floor {} of {last}, {} ack-pending, {} pending",
                    info.ack_floor.stream_sequence, info.num_ack_pending, info.num_pending
                ))
            }
        },
    )
    .await;
}

/// A projector's operations API: the in-process app's, or a process's.
trait ProjectorApi {
    fn ops(&self) -> &bank_tests::Api;
}

impl ProjectorApi for ProjectorApp {
    fn ops(&self) -> &bank_tests::Api {
        &self.api
    }
}

impl ProjectorApi for bank_tests::Api {
    fn ops(&self) -> &bank_tests::Api {
        self
    }
}

/// A dead letter's id: a JSON string of digits, like every id of the API.
fn letter_id(letter: &Value) -> u64 {
    let id = letter["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a dead letter's id is a string: {letter}"));
    id.parse()
        .unwrap_or_else(|e| panic!("dead letter id {id:?}: {e}"))
}

async fn dead_letters(p: &impl ProjectorApi) -> Vec<Value> {
    p.ops().get("/v1/dead-letters").await.expect(200).body["dead_letters"]
        .as_array()
        .unwrap()
        .clone()
}

/// Redelivers the only message waiting on the projector's durable `LEDGER`
/// consumer (refusing it, as a projector that died on it would leave it)
/// until it has been delivered more than `limit` times; returns its stream
/// sequence and when it was stored (ns), its key in `overdue_attempts`, and
/// its last delivery's number.
async fn deliver_past(js: &async_nats::jetstream::Context, limit: i64) -> (i64, i64, i64) {
    use async_nats::jetstream::AckKind;
    use futures::StreamExt;
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("projector-ledger", "LEDGER")
        .await
        .unwrap();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        if let Some(m) = batch.next().await {
            let m = m.unwrap();
            let info = m.info().unwrap();
            let (delivered, seq) = (info.delivered, info.stream_sequence as i64);
            let stored = info.published.unix_timestamp_nanos() as i64;
            m.ack_with(AckKind::Nak(None)).await.unwrap();
            if delivered > limit {
                return (seq, stored, delivered);
            }
        }
    }
}

/// F5: a message whose handling never ends (the projector dies or a batch
/// task fails on it, every time) is never settled by the handlers, and the
/// server's `max_deliver` is unlimited. Delivered more than twice
/// `PROJECTOR_MAX_DELIVERIES` times, it is handled alone once: a sound
/// message whose count rose with a crash loop (any message in hand counts a
/// delivery when the process dies) is then applied, not lettered; one whose
/// attempt alone at an earlier delivery never ended either (the row such an
/// attempt leaves in `overdue_attempts` is there) is dead-lettered instead of
/// coming back forever.
#[tokio::test]
async fn f5_a_message_delivered_again_and_again_without_ever_being_settled_is_dead_lettered() {
    use sea_orm::{ConnectionTrait, Statement};
    let rig = Rig::new().await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    p.stop().await.unwrap();
    let js = rig.nats.jetstream().await.unwrap();
    let limit = 2 * ProjectorOptions::default().max_deliveries;
    // A sound event past the limit: applied when handled alone.
    let sound = rig.core.api.funded_account(5000).await;
    deliver_past(&js, limit).await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    rig.wait_synced(&sound, 1, Duration::from_secs(20)).await;
    assert!(dead_letters(&p).await.is_empty());
    p.stop().await.unwrap();
    // One the projector died on when it was handled alone: lettered.
    let account = rig.core.api.funded_account(5000).await;
    let (seq, stored, delivered) = deliver_past(&js, limit).await;
    let db = sea_orm::Database::connect(rig.channel_db.as_str())
        .await
        .unwrap();
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO overdue_attempts (stream, stream_seq, published_ns, delivered) VALUES ('LEDGER', $1, $2, $3)",
        [seq.into(), stored.into(), delivered.into()],
    ))
    .await
    .unwrap();
    let p = rig.projector(ProjectorOptions::default()).await;
    let letters = eventually("the letter", Duration::from_secs(20), || async {
        let letters = dead_letters(&p).await;
        if letters.is_empty() {
            Err("none yet".to_owned())
        } else {
            Ok(letters)
        }
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0]["subject"],
        json!(format!("bank.ledger.{account}"))
    );
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .contains("also when handled alone"),
        "{}",
        letters[0]
    );
    let left = bank_tests::db::query_strings(
        &rig.channel_db,
        "SELECT count(*)::text FROM overdue_attempts",
    )
    .await
    .unwrap();
    assert_eq!(left, ["0"], "the attempt is forgotten once lettered");
}

/// F7: an overdue message handled alone whose attempt ends handed back (the
/// channel database went away during it), and which the projector then
/// naks at shutdown, was not died on: its row in `overdue_attempts` stays
/// (the database is away), but the hand-back is recorded where it survives
/// that, and the next delivery handles it again instead of lettering it.
#[tokio::test]
async fn f7_an_overdue_message_handed_back_in_an_outage_then_naked_at_shutdown_is_not_dead_lettered()
 {
    let rig = Rig::new().await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    p.stop().await.unwrap();
    let js = rig.nats.jetstream().await.unwrap();
    let limit = 2 * ProjectorOptions::default().max_deliveries;
    let account = rig.core.api.funded_account(5000).await;
    let (seq, _, _) = deliver_past(&js, limit).await;
    // The attempt alone is recorded; its history write never reaches the
    // database, which is away from then on.
    let cut = TcpCut::before(&rig.channel_db, 5432).await.unwrap();
    cut.lose_request_then_cut(b"INSERT INTO history_sync (account_id) SELECT unnest");
    let mut p = rig
        .projector_on(
            &cut.route(&rig.channel_db).unwrap(),
            ProjectorOptions::default(),
        )
        .await;
    let row = format!("SELECT delivered::text FROM overdue_attempts WHERE stream_seq = {seq}");
    eventually(
        "the attempt recorded, then handed back and held",
        Duration::from_secs(30),
        || async {
            let recorded = bank_tests::db::query_strings(&rig.channel_db, &row)
                .await
                .map_err(|e| e.to_string())?;
            let paused = bank_tests::metrics::read(
                &p.api.base,
                "projector_database_pauses_total{feed=\"ledger\"",
            )
            .await;
            if recorded.len() == 1 && cut.answers_lost() == 1 && paused >= 1.0 {
                Ok(())
            } else {
                Err(format!(
                    "row {recorded:?}, {} lost, {paused} pauses",
                    cut.answers_lost()
                ))
            }
        },
    )
    .await;
    // SIGTERM while it holds the message: naked, the row still there.
    p.stop().await.unwrap();
    cut.restore();
    let p = rig.projector(ProjectorOptions::default()).await;
    rig.wait_synced(&account, 1, Duration::from_secs(30)).await;
    assert!(
        dead_letters(&p).await.is_empty(),
        "{:?}",
        dead_letters(&p).await
    );
    let left = bank_tests::db::query_strings(
        &rig.channel_db,
        "SELECT count(*)::text FROM overdue_attempts",
    )
    .await
    .unwrap();
    assert_eq!(left, ["0"], "the attempt is forgotten once applied");
}

#[tokio::test]
async fn b14_the_same_event_delivered_twice_changes_nothing() {
    let rig = Rig::new().await;
    let _p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(5000).await;
    rig.wait_synced(&account, 1, Duration::from_secs(10)).await;
    let before = channel_history(&rig.channel_db, &account).await.unwrap();
    let (_, event) = rig.wait_published(&account, 1).await.remove(0);
    for _ in 0..3 {
        publish_raw(
            &rig.nats,
            &format!("bank.ledger.{account}"),
            serde_json::to_vec(&event).unwrap(),
        )
        .await;
    }
    consumed_all(&rig, "LEDGER", "projector-ledger").await;
    // And a later event is still applied.
    rig.core.api.deposit(&account, 1).await.expect(200);
    rig.wait_synced(&account, 2, Duration::from_secs(10)).await;
    let after = channel_history(&rig.channel_db, &account).await.unwrap();
    assert_eq!(after[0], before[0], "the duplicate changed nothing");
    assert!(dead_letters(&_p).await.is_empty());
}

/// Balances may grow past the bound of one movement (10^15 won) up to
/// 10^18. Each entry's `balance_after` must still be readable by the
/// projector, or that account's history stops at the first such entry
/// (dead-lettered as unreadable, and the gap fill failing the same way).
#[tokio::test]
async fn b14_balances_above_the_single_movement_bound_reach_the_history() {
    let rig = Rig::new().await;
    let p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(0).await;
    for _ in 0..3 {
        rig.core
            .api
            .deposit(&account, 1_000_000_000_000_000)
            .await
            .expect(200);
    }
    rig.wait_synced(&account, 3, Duration::from_secs(15)).await;
    let history = channel_history(&rig.channel_db, &account).await.unwrap();
    let balances: Vec<&str> = history.iter().map(|e| e.3.as_str()).collect();
    assert_eq!(
        balances,
        ["1000000000000000", "2000000000000000", "3000000000000000"]
    );
    assert_eq!(history, core_ledger(&rig.core.api, &account).await);
    assert!(dead_letters(&p).await.is_empty());
}

/// Seven deposits reach `LEDGER` while the projector is down; then the
/// messages of seqs `deleted` are removed from the stream and those of `late`
/// are removed and published again after the rest (so they arrive out of
/// order). The restarted projector must build the whole history in order,
/// filling what it lacks from the core.
async fn history_survives_a_damaged_stream(deleted: &[i64], late: &[i64]) {
    let rig = Rig::new().await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    p.stop().await.unwrap();
    let account = rig.core.api.funded_account(0).await;
    for i in 0..7 {
        rig.core.api.deposit(&account, 1000 + i).await.expect(200);
    }
    let msgs = rig.wait_published(&account, 7).await;
    let js = rig.nats.jetstream().await.unwrap();
    let stream = js.get_stream("LEDGER").await.unwrap();
    for (stream_seq, ev) in &msgs {
        let seq = ev["seq"].as_i64().unwrap();
        if deleted.contains(&seq) || late.contains(&seq) {
            assert!(stream.delete_message(*stream_seq).await.unwrap());
        }
    }
    for seq in late {
        let ev = msgs
            .iter()
            .find(|(_, e)| e["seq"] == *seq)
            .unwrap()
            .1
            .clone();
        publish_raw(
            &rig.nats,
            &format!("bank.ledger.{account}"),
            serde_json::to_vec(&ev).unwrap(),
        )
        .await;
    }
    let _p = rig.projector(ProjectorOptions::default()).await;
    rig.wait_synced(&account, 7, Duration::from_secs(15)).await;
    let history = channel_history(&rig.channel_db, &account).await.unwrap();
    assert_eq!(
        history.iter().map(|e| e.0).collect::<Vec<_>>(),
        (1..=8).take(7).collect::<Vec<_>>()
    );
    history_is_the_ledger_now(
        &rig.core.api,
        &rig.channel_db,
        std::slice::from_ref(&account),
    )
    .await;
    assert!(
        rig.proxy
            .seen()
            .iter()
            .any(|(_, p, _)| p.contains(&format!("/v1/accounts/{account}/entries"))),
        "the gap was filled from the core's entries API"
    );
    // Never written past a gap: no entry was applied (its transaction's
    // start, `applied_at`) before an entry of a lower seq.
    let inversions = bank_tests::db::query_strings(
        &rig.channel_db,
        &format!(
            "SELECT a.seq || ' after ' || b.seq FROM history_entries a JOIN history_entries b \
               ON b.account_id = a.account_id AND a.seq < b.seq AND a.applied_at > b.applied_at \
             WHERE a.account_id = '{account}'"
        ),
    )
    .await
    .unwrap();
    assert!(
        inversions.is_empty(),
        "applied out of order: {inversions:?}"
    );
}

#[tokio::test]
async fn b15_deleted_events_are_filled_from_the_core_never_skipping_a_seq() {
    history_survives_a_damaged_stream(&[2, 5], &[]).await;
}

#[tokio::test]
async fn f6_seq_7_before_seq_6_never_skips_6_and_the_gaps_are_filled_from_the_core() {
    // seq 6 arrives after seq 7, and seq 2 is missing altogether.
    history_survives_a_damaged_stream(&[2], &[6]).await;
}

/// F6 exactly: seq 7 arrives, seq 6 has not, and the core cannot be asked
/// for it (its entries API fails). The history stops at 5 (seq 7 is held,
/// not written past the gap); when seq 6 arrives late, both are applied in
/// order, with the core still unreachable.
#[tokio::test]
async fn f6_seq_7_before_seq_6_waits_for_6_and_applies_both_in_order_when_it_arrives() {
    let rig = Rig::new().await;
    let opts = ProjectorOptions {
        // Enough deliveries that seq 7 is still retried when seq 6 arrives.
        max_deliveries: 1_000,
        ..ProjectorOptions::default()
    };
    let mut p = rig.projector(opts.clone()).await;
    let account = rig.core.api.funded_account(0).await;
    for i in 0..5 {
        rig.core.api.deposit(&account, 100 + i).await.expect(200);
    }
    rig.wait_synced(&account, 5, Duration::from_secs(10)).await;
    p.stop().await.unwrap();
    rig.core.api.deposit(&account, 6).await.expect(200);
    rig.core.api.deposit(&account, 7).await.expect(200);
    let msgs = rig.wait_published(&account, 7).await;
    let (six_at, six) = msgs.iter().find(|(_, e)| e["seq"] == 6).unwrap().clone();
    let stream = rig
        .nats
        .jetstream()
        .await
        .unwrap()
        .get_stream("LEDGER")
        .await
        .unwrap();
    assert!(stream.delete_message(six_at).await.unwrap());
    rig.proxy.add(None, "/entries", Action::Fail(503), None);
    let p = rig.projector(opts).await;
    let entries_path = format!("/v1/accounts/{account}/entries");
    eventually(
        "seq 7 received and the gap fill tried, twice",
        Duration::from_secs(15),
        || async {
            let tries = rig
                .proxy
                .seen()
                .iter()
                .filter(|(_, path, _)| path.contains(&entries_path))
                .count();
            if tries >= 2 {
                Ok(())
            } else {
                Err(format!("{tries} tries"))
            }
        },
    )
    .await;
    assert_eq!(
        rig.synced(&account).await,
        5,
        "nothing written past the gap"
    );
    // seq 6 arrives late; the core is still unreachable.
    publish_raw(
        &rig.nats,
        &format!("bank.ledger.{account}"),
        serde_json::to_vec(&six).unwrap(),
    )
    .await;
    rig.wait_synced(&account, 7, Duration::from_secs(15)).await;
    let history = channel_history(&rig.channel_db, &account).await.unwrap();
    assert_eq!(
        history.iter().map(|e| e.0).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert_eq!(history, core_ledger(&rig.core.api, &account).await);
    assert!(dead_letters(&p).await.is_empty());
}

/// The `LEDGER` stream deleted under running services (an operator's
/// mistake, or a server that lost its JetStream storage): the core's relay
/// creates it again for its next events, the projector takes its consumer
/// again, and the history goes on without a restart.
#[tokio::test]
async fn f6_a_deleted_ledger_stream_is_created_again_and_the_history_goes_on() {
    let rig = Rig::new().await;
    let _p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(100).await;
    rig.wait_synced(&account, 1, Duration::from_secs(10)).await;
    let js = rig.nats.jetstream().await.unwrap();
    js.delete_stream("LEDGER").await.unwrap();

    rig.core.api.deposit(&account, 5).await.expect(200);
    rig.wait_synced(&account, 2, Duration::from_secs(30)).await;
    rig.core.api.deposit(&account, 7).await.expect(200);
    rig.wait_synced(&account, 3, Duration::from_secs(10)).await;
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
}

/// F5 with the `DLQ` stream deleted under the running projector: the first
/// attempt to letter a poison finds no stream, creates it again and retries
/// the message; the poison is lettered, nothing is lost.
#[tokio::test]
async fn f5_a_deleted_dead_letter_stream_is_created_again_and_the_poison_lettered() {
    let rig = Rig::new().await;
    let p = rig
        .projector(ProjectorOptions {
            retry_base_ms: 50,
            retry_max_ms: 200,
            ..ProjectorOptions::default()
        })
        .await;
    let victim = rig.core.api.funded_account(100).await;
    rig.wait_synced(&victim, 1, Duration::from_secs(10)).await;
    let js = rig.nats.jetstream().await.unwrap();
    js.delete_stream("DLQ").await.unwrap();
    // No stream, no letters: the operator's views answer, they do not fail.
    assert!(dead_letters(&p).await.is_empty());
    p.api.get("/v1/dead-letters/1").await.expect(404);
    p.api
        .post("/v1/dead-letters/1/replay", json!({}))
        .await
        .expect(404);
    let poison = br#"{"not": "a ledger entry"}"#.to_vec();
    publish_raw(&rig.nats, &format!("bank.ledger.{victim}"), poison.clone()).await;
    eventually(
        "the dead-letter stream is back",
        Duration::from_secs(10),
        || async {
            js.get_stream("DLQ")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    let letters = wait_letters(&p, 1).await;
    assert_eq!(
        letters[0]["body"],
        json!(String::from_utf8(poison).unwrap())
    );
    assert!(
        letters[0]["deliveries"].as_i64().unwrap() >= 2,
        "{letters:?}"
    );
    rig.core.api.deposit(&victim, 5).await.expect(200);
    rig.wait_synced(&victim, 2, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn b16_f5_poison_is_dead_lettered_at_once_and_others_keep_flowing() {
    let rig = Rig::new().await;
    let p = rig.projector(ProjectorOptions::default()).await;
    let victim = rig.core.api.funded_account(100).await;
    rig.wait_synced(&victim, 1, Duration::from_secs(10)).await;
    let poison = br#"{"event_id": "x", "this is": "not a ledger entry"}"#.to_vec();
    publish_raw(&rig.nats, &format!("bank.ledger.{victim}"), poison.clone()).await;
    let other = rig.core.api.funded_account(200).await;
    rig.wait_synced(&other, 1, Duration::from_secs(10)).await;
    let letters = eventually(
        "the poison in the dead-letter stream",
        Duration::from_secs(10),
        || async {
            let l = dead_letters(&p).await;
            if l.len() == 1 {
                Ok(l)
            } else {
                Err(format!("{l:?}"))
            }
        },
    )
    .await;
    let l = &letters[0];
    assert_eq!(l["subject"], json!(format!("bank.ledger.{victim}")));
    assert_eq!(l["body"], json!(String::from_utf8(poison).unwrap()));
    assert_eq!(l["deliveries"], 1, "a permanent failure is not retried");
    assert!(l["error"].as_str().unwrap().contains("not a ledger event"));
    // The DLQ message carries the headers of API.md.
    let js = rig.nats.jetstream().await.unwrap();
    let raw = stream_messages(&js, "DLQ").await.unwrap();
    assert_eq!(
        raw[0].subject.as_str(),
        format!("bank.dlq.bank.ledger.{victim}")
    );
    for h in [
        "Bank-Dlq-Stream",
        "Bank-Dlq-Stream-Seq",
        "Bank-Dlq-Consumer",
        "Bank-Dlq-Deliveries",
        "Bank-Dlq-Error",
    ] {
        assert!(raw[0].headers.get(h).is_some(), "missing header {h}");
    }
    // One letter, inspected on its own, is the listed one.
    let id = letter_id(l);
    let shown = p
        .api
        .get(&format!("/v1/dead-letters/{id}"))
        .await
        .expect(200)
        .body;
    assert_eq!(&shown, l);
    // Replaying it still fails, and it stays.
    let r = p
        .api
        .post(&format!("/v1/dead-letters/{id}/replay"), json!({}))
        .await
        .expect(422);
    assert_eq!(r.code(), Some("replay_failed"));
    assert_eq!(dead_letters(&p).await.len(), 1);
    // The victim's later events are unaffected.
    rig.core.api.deposit(&victim, 5).await.expect(200);
    rig.wait_synced(&victim, 2, Duration::from_secs(10)).await;

    // Pages of letters skip removed ones and end where the letters end.
    for i in 0..3 {
        let body = format!(r#"{{"poison": {i}}}"#).into_bytes();
        publish_raw(&rig.nats, &format!("bank.ledger.{victim}"), body).await;
    }
    let ids: Vec<u64> = wait_letters(&p, 4).await.iter().map(letter_id).collect();
    let dlq = js.get_stream("DLQ").await.unwrap();
    assert!(dlq.delete_message(ids[1]).await.unwrap());
    let page = |after: u64, limit: u64| {
        let api = &p.api;
        async move {
            api.get(&format!("/v1/dead-letters?after={after}&limit={limit}"))
                .await
                .expect(200)
                .body["dead_letters"]
                .as_array()
                .unwrap()
                .iter()
                .map(letter_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(0, 2).await, vec![ids[0], ids[2]]);
    let body = p.api.get("/v1/dead-letters?limit=2").await.expect(200).body;
    assert_eq!(body["next_after"], json!(ids[2].to_string()));
    let body = p.api.get("/v1/dead-letters?limit=4").await.expect(200).body;
    assert_eq!(body["next_after"], Value::Null, "three letters, last page");
    assert_eq!(page(ids[2], 2).await, vec![ids[3]]);
    assert_eq!(page(ids[3], 2).await, Vec::<u64>::new());
    // The operator's command lists the same letters, on standard output.
    let (nats_url, core_url) = (rig.nats.url(), rig.proxy.url());
    let env = [
        ("NATS_URL", nats_url.as_str()),
        ("CHANNEL_DATABASE_URL", rig.channel_db.as_str()),
        ("CORE_URL", core_url.as_str()),
        ("CORE_API_TOKEN", CORE_READ_TOKEN),
    ];
    // One page, and pages of two letters (the removed one skipped).
    for args in [&["dlq", "list"][..], &["dlq", "list", "--page", "2"]] {
        let out =
            bank_tests::process::run_to_exit("projector", args, &env, Duration::from_secs(30))
                .await
                .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {text}");
        assert!(text.contains("3 dead letter(s)"), "{args:?}: {text}");
        let listed: Vec<u64> = text
            .lines()
            .filter(|l| l.contains("bank.ledger."))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(listed, vec![ids[0], ids[2], ids[3]], "{args:?}: {text}");
    }
    // Replaying all of them a page at a time reaches every letter; poison
    // fails again, so each stays and the command says so.
    let out = bank_tests::process::run_to_exit(
        "projector",
        &["dlq", "replay", "--all", "--page", "2"],
        &env,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("replayed 0, failed 3"), "{text}");
    assert_eq!(dead_letters(&p).await.len(), 3);
    let out = bank_tests::process::run_to_exit(
        "projector",
        &["dlq", "list", "--page", "0"],
        &env,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(!out.status.success(), "a page of no letters is refused");
}

/// A DLQ that refuses new letters (full at its size bound) must not cost a
/// message: it is kept (naked, redelivered with backoff) and lettered once
/// there is room, and the consumer keeps applying everything else.
#[tokio::test]
async fn f5_a_full_dead_letter_stream_keeps_the_poison_until_there_is_room() {
    let rig = Rig::new().await;
    let p = rig.projector(ProjectorOptions::default()).await;
    let js = rig.nats.jetstream().await.unwrap();
    let full = |max_bytes: i64| {
        let js = js.clone();
        async move {
            let mut dlq = js.get_stream("DLQ").await.unwrap();
            let mut config = dlq.info().await.unwrap().config.clone();
            config.max_bytes = max_bytes;
            js.update_stream(config).await.unwrap();
        }
    };
    // As created: bounded, and refusing (not dropping) when full.
    let created = js
        .get_stream("DLQ")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(created.max_bytes, common::jetstream::DLQ_MAX_BYTES);
    assert_eq!(
        created.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    );
    // The fault: the DLQ refuses every new letter.
    full(1).await;
    let victim = rig.core.api.funded_account(100).await;
    rig.wait_synced(&victim, 1, Duration::from_secs(10)).await;
    let poison = br#"{"not": "a ledger entry"}"#.to_vec();
    publish_raw(&rig.nats, &format!("bank.ledger.{victim}"), poison).await;
    eventually(
        "the poison redelivered while the DLQ is full",
        Duration::from_secs(20),
        || async {
            let info = ledger_consumer_info(&js, "projector-ledger").await?;
            if info.num_redelivered >= 1 && info.num_ack_pending >= 1 {
                Ok(())
            } else {
                Err(format!(
                    "{} redelivered, {} unacknowledged",
                    info.num_redelivered, info.num_ack_pending
                ))
            }
        },
    )
    .await;
    assert!(dead_letters(&p).await.is_empty(), "nothing was lettered");
    // Everything else keeps flowing meanwhile.
    rig.core.api.deposit(&victim, 5).await.expect(200);
    rig.wait_synced(&victim, 2, Duration::from_secs(10)).await;
    // Room again: the kept message is lettered, once.
    full(common::jetstream::DLQ_MAX_BYTES).await;
    let letters = wait_letters(&p, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0]["deliveries"].as_u64().unwrap() >= 2,
        "{letters:?}"
    );
}

#[tokio::test]
async fn b16_f5_transient_failures_back_off_then_apply_or_dead_letter_and_replay_applies_once() {
    let rig = Rig::new().await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    p.stop().await.unwrap();
    let account = rig.core.api.funded_account(0).await;
    for i in 0..2 {
        rig.core.api.deposit(&account, 10 + i).await.expect(200);
    }
    let msgs = rig.wait_published(&account, 2).await;
    let stream = rig
        .nats
        .jetstream()
        .await
        .unwrap()
        .get_stream("LEDGER")
        .await
        .unwrap();
    stream.delete_message(msgs[0].0).await.unwrap();
    // The core is unreachable for gap fills.
    rig.proxy.add(None, "/entries", Action::Fail(503), None);
    let p = rig
        .projector(ProjectorOptions {
            max_deliveries: 4,
            retry_base_ms: 200,
            retry_max_ms: 5_000,
            ..ProjectorOptions::default()
        })
        .await;
    // Other accounts keep flowing meanwhile.
    let bystander = rig.core.api.funded_account(1).await;
    rig.wait_synced(&bystander, 1, Duration::from_secs(10))
        .await;
    let letters = eventually(
        "the blocked event dead-lettered after 4 deliveries",
        Duration::from_secs(30),
        || async {
            let l = dead_letters(&p).await;
            if l.len() == 1 {
                Ok(l)
            } else {
                Err(format!("{} letters", l.len()))
            }
        },
    )
    .await;
    for l in &letters {
        assert_eq!(l["deliveries"], 4);
        assert!(
            l["error"].as_str().unwrap().contains("filling the gap"),
            "{l}"
        );
    }
    // Retries came with growing delays: the gap-fill attempts spread out.
    let attempts: Vec<Instant> = rig
        .proxy
        .seen()
        .into_iter()
        .filter(|(_, path, _)| path.contains(&format!("/v1/accounts/{account}/entries")))
        .map(|(_, _, t)| t)
        .collect();
    // Each delivery made one gap-fill attempt, and the redeliveries were
    // spaced by a growing backoff: with a 200 ms base doubling per delivery
    // (jitter over the upper half), four deliveries span at least
    // 100 + 200 + 400 = 700 ms, more than three fixed-delay retries could
    // (at most 3 x 200 ms). Load only makes it longer, so this cannot flake.
    assert_eq!(attempts.len(), 4, "one gap-fill attempt per delivery");
    let span = attempts[3] - attempts[0];
    assert!(
        span >= Duration::from_millis(700),
        "retries did not back off: {span:?}"
    );
    // And it grows: the third delay (400-800 ms) is longer than the first
    // (100-200 ms) by at least 200 ms, which a delay that does not grow
    // with the delivery count would not be.
    let (first, third) = (attempts[1] - attempts[0], attempts[3] - attempts[2]);
    assert!(
        third > first,
        "the delay did not grow: first {first:?}, third {third:?}"
    );
    assert_eq!(
        rig.synced(&account).await,
        0,
        "nothing written past the gap"
    );

    // Fix the cause, then replay: applied once.
    rig.proxy.clear();
    for l in &letters {
        let id = letter_id(l);
        p.api
            .post(&format!("/v1/dead-letters/{id}/replay"), json!({}))
            .await
            .expect(200);
        assert_eq!(
            p.api
                .post(&format!("/v1/dead-letters/{id}/replay"), json!({}))
                .await
                .expect(404)
                .code(),
            Some("dead_letter_not_found")
        );
    }
    assert!(dead_letters(&p).await.is_empty());
    history_is_the_ledger_now(
        &rig.core.api,
        &rig.channel_db,
        std::slice::from_ref(&account),
    )
    .await;

    // A transient failure that clears before the limit is simply applied.
    let mut p = p;
    p.stop().await.unwrap();
    rig.core.api.deposit(&account, 99).await.expect(200);
    rig.core.api.deposit(&account, 98).await.expect(200);
    // Seq 1 was deleted above; the stream holds seqs 2..=4. Delete seq 3.
    let msgs = rig.wait_published(&account, 3).await;
    let three = msgs.iter().find(|(_, e)| e["seq"] == 3).unwrap().0;
    stream.delete_message(three).await.unwrap();
    rig.proxy.add(None, "/entries", Action::Fail(503), Some(2));
    let p2 = rig
        .projector(ProjectorOptions {
            max_deliveries: 6,
            retry_base_ms: 200,
            retry_max_ms: 2_000,
            ..ProjectorOptions::default()
        })
        .await;
    rig.wait_synced(&account, 4, Duration::from_secs(20)).await;
    assert!(dead_letters(&p2).await.is_empty());
}

#[tokio::test]
async fn b23_tax_records_are_idempotent_under_duplicate_delivery() {
    let rig = Rig::new().await;
    let p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(60_000_000).await;
    let pid = pay_interest(&rig, &account, 3).await;
    let records = wait_tax_records(&p, &account, 1).await;
    assert_eq!(records[0]["payout_id"], json!(pid));
    assert_eq!(
        (
            records[0]["gross"].as_str(),
            records[0]["tax"].as_str(),
            records[0]["net"].as_str()
        ),
        (Some("8301"), Some("1278"), Some("7023"))
    );
    // The same event again (a redelivery the duplicate window did not catch).
    let js = rig.nats.jetstream().await.unwrap();
    let ev = stream_messages(&js, "INTEREST").await.unwrap().remove(0);
    publish_raw(&rig.nats, "bank.interest.paid", ev.payload.to_vec()).await;
    publish_raw(&rig.nats, "bank.interest.paid", ev.payload.to_vec()).await;
    consumed_all(&rig, "INTEREST", "projector-interest").await;
    assert_eq!(wait_tax_records(&p, &account, 1).await.len(), 1);
    // Then a second payout, recorded as usual.
    let second = pay_interest(&rig, &account, 1).await;
    wait_tax_records(&p, &account, 2).await;
    assert!(dead_letters(&p).await.is_empty());

    // Pages, newest first, end with a null cursor.
    let page = |cursor: Option<String>| {
        let api = &p.api;
        let account = &account;
        async move {
            let mut path = format!("/v1/tax-records?account_id={account}&limit=1");
            if let Some(c) = cursor {
                path.push_str("&cursor=");
                path.extend(form_urlencoded::byte_serialize(c.as_bytes()));
            }
            api.get(&path).await.expect(200).body
        }
    };
    let first = page(None).await;
    assert_eq!(
        first["tax_records"][0]["payout_id"],
        json!(second),
        "{first}"
    );
    let next = page(first["next_cursor"].as_str().map(str::to_owned)).await;
    assert_eq!(next["tax_records"][0]["payout_id"], json!(pid), "{next}");
    let last = page(next["next_cursor"].as_str().map(str::to_owned)).await;
    assert_eq!(last["tax_records"], json!([]), "{last}");
    assert_eq!(last["next_cursor"], Value::Null);
    assert_eq!(
        tax_records(&p, &account).await.len(),
        2,
        "the default page holds both"
    );
    for (bad, code) in [
        ("limit=0", "invalid_query"),
        ("limit=1001", "invalid_query"),
        // As the history's: one code for a cursor this API never returned.
        ("cursor=nonsense", "invalid_cursor"),
    ] {
        let r = p
            .api
            .get(&format!("/v1/tax-records?account_id={account}&{bad}"))
            .await;
        assert_eq!((r.status, r.code()), (400, Some(code)), "{bad}");
    }
}

/// An interest event as anyone able to publish on the broker could send it.
fn interest_event(payout_id: &str, account: &str, gross: i64, tax: i64, date: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "event_id": format!("interest:{payout_id}"),
        "payout_id": payout_id,
        "account_id": account,
        "gross": gross.to_string(),
        "tax": tax.to_string(),
        "net": (gross - tax).to_string(),
        "from": date,
        "through": date,
        "paid_at": chrono::Utc::now(),
    }))
    .unwrap()
}

async fn tax_records(p: &impl ProjectorApi, account: &str) -> Vec<Value> {
    p.ops()
        .get(&format!("/v1/tax-records?account_id={account}"))
        .await
        .expect(200)
        .body["tax_records"]
        .as_array()
        .cloned()
        .expect("a tax_records array")
}

/// Waits until `account` has `n` tax records; returns them.
async fn wait_tax_records(p: &impl ProjectorApi, account: &str, n: usize) -> Vec<Value> {
    eventually(
        &format!("{n} tax records"),
        Duration::from_secs(30),
        || async {
            let list = tax_records(p, account).await;
            if list.len() == n {
                Ok(list)
            } else {
                Err(format!("{list:?}"))
            }
        },
    )
    .await
}

/// A tax record holds the figures of the core's payout answer.
fn assert_the_cores_figures(record: &Value, paid: &Value) {
    for field in ["payout_id", "account_id", "gross", "tax", "net"] {
        assert_eq!(record[field], paid[field], "{field}");
    }
}

#[tokio::test]
async fn b23_an_interest_event_the_core_does_not_confirm_never_becomes_a_tax_record() {
    let rig = Rig::new().await;
    let p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(60_000_000).await;
    let date = rig.core.api.advance_business_date(3).await.to_string();
    // 1. Before the core pays it: an event for the payout id the customer
    //    is about to use, with other figures, and one for a payout that never
    //    happens. (The first record of a payout id is the one kept, so the
    //    first one would otherwise stand as the tax record.)
    let pid = unique("pay_");
    publish_raw(
        &rig.nats,
        "bank.interest.paid",
        interest_event(&pid, &account, 100_000, 15_400, &date),
    )
    .await;
    let never = unique("pay_");
    publish_raw(
        &rig.nats,
        "bank.interest.paid",
        interest_event(&never, &account, 5_000, 770, &date),
    )
    .await;
    let letters = wait_letters(&p, 2).await;
    for l in &letters {
        assert!(
            l["error"]
                .as_str()
                .unwrap()
                .contains("the core made no payout"),
            "{l}"
        );
    }
    assert!(tax_records(&p, &account).await.is_empty());
    // 2. The core's payout is recorded with the core's figures.
    let paid = pay_out(&rig, &account, &pid).await;
    let records = wait_tax_records(&p, &account, 1).await;
    assert_the_cores_figures(&records[0], &paid);
    // 3. Other figures for it after the core's: dead-lettered too, and the
    //    record stays the core's.
    publish_raw(
        &rig.nats,
        "bank.interest.paid",
        interest_event(&pid, &account, 8_301, 1_277, &date),
    )
    .await;
    let letters = wait_letters(&p, 3).await;
    let third = letters
        .iter()
        .find(|l| l["error"].as_str().unwrap().contains("the event says"))
        .unwrap_or_else(|| panic!("{letters:?}"));
    // 4. A replay does not record it either.
    let id = letter_id(third);
    let r = p
        .api
        .post(&format!("/v1/dead-letters/{id}/replay"), json!({}))
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    let records = tax_records(&p, &account).await;
    assert_eq!(records.len(), 1);
    assert_the_cores_figures(&records[0], &paid);
}

/// Something publishes first under the core's own event id
/// (`interest:<payout_id>`): the broker then drops the core's event as a
/// duplicate, inside its two-minute window.
#[tokio::test]
async fn b23_a_forged_event_under_the_cores_event_id_only_delays_the_tax_record() {
    let rig = Rig::new().await;
    let p = rig
        .projector(ProjectorOptions {
            tax_sweep_secs: 1,
            ..ProjectorOptions::default()
        })
        .await;
    let account = rig.core.api.funded_account(60_000_000).await;
    let date = rig.core.api.advance_business_date(3).await.to_string();
    let pid = unique("pay_");
    let js = rig.nats.jetstream().await.unwrap();
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("interest:{pid}").as_str());
    js.publish_with_headers(
        "bank.interest.paid",
        h,
        interest_event(&pid, &account, 100_000, 15_400, &date).into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_letters(&p, 1).await;
    let paid = pay_out(&rig, &account, &pid).await;
    // The core's relay published its event, and the broker dropped it.
    eventually(
        "the core's outbox drained",
        Duration::from_secs(10),
        || async {
            let left = bank_tests::db::query_strings(
                &rig.core.db_url,
                "SELECT count(*)::text FROM outbox WHERE published_at IS NULL",
            )
            .await
            .map_err(|e| e.to_string())?;
            if left == ["0"] {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    let interest = stream_messages(&js, "INTEREST").await.unwrap();
    assert_eq!(interest.len(), 1, "only the forged event is in the stream");
    // The sweep records the core's figures.
    let records = wait_tax_records(&p, &account, 1).await;
    assert_the_cores_figures(&records[0], &paid);
}

/// F7/B15: gap fill needs a later event of the account; an account's last
/// event, lost from the stream, has none. The ledger audit finds the account
/// still behind the core's last seq a pass later and syncs it from the core,
/// so the history equals the ledger even for an account that stays quiet.
#[tokio::test]
async fn f7_b15_an_accounts_lost_last_event_is_repaired_by_the_ledger_audit() {
    let rig = Rig::new().await;
    // No projector yet: the account's only event is deleted from the stream
    // before anything reads it; another account's arrives as usual.
    let quiet = rig.core.api.funded_account(5_000).await;
    let other = rig.core.api.funded_account(7_000).await;
    let js = rig.nats.jetstream().await.unwrap();
    let lost = eventually("the deposit's event", Duration::from_secs(10), || async {
        let msgs = stream_messages(&js, "LEDGER")
            .await
            .map_err(|e| e.to_string())?;
        msgs.into_iter()
            .find(|m| m.subject.as_str() == format!("bank.ledger.{quiet}"))
            .ok_or_else(|| "not published yet".to_owned())
    })
    .await;
    let stream = js.get_stream("LEDGER").await.unwrap();
    assert!(stream.delete_message(lost.sequence).await.unwrap());
    // In-process apps share one metrics registry (the core's /metrics shows
    // it before the projector starts): counted from here on.
    let repairs = "projector_audit_repairs_total";
    let before = bank_tests::metrics::read(&rig.core.api.base, repairs).await;
    let p = rig
        .projector(ProjectorOptions {
            audit_secs: 1,
            ..ProjectorOptions::default()
        })
        .await;
    rig.wait_synced(&other, 1, Duration::from_secs(10)).await;
    rig.wait_synced(&quiet, 1, Duration::from_secs(20)).await;
    assert!(
        bank_tests::metrics::read(&p.api.base, repairs).await > before,
        "counted as a repair"
    );
    history_is_the_ledger_now(&rig.core.api, &rig.channel_db, &[quiet, other]).await;
}

/// B15/F6: a gap larger than one delivery fills (50,000 entries: a history
/// restored from an old backup, a hot account rebuilt) goes on with the
/// event's next delivery, which does not count as a failure while each
/// delivery moves the history on: with a budget of one delivery, the event
/// is applied, not dead-lettered.
#[tokio::test]
async fn b15_f6_a_gap_of_55000_entries_is_filled_without_spending_the_events_deliveries() {
    use sea_orm::{ConnectionTrait, Statement};
    let rig = Rig::new().await;
    let account = rig.core.api.funded_account(1).await;
    // 55,000 deposits of 1 won after the first, written straight into the
    // core's ledger (their events never published), then a real deposit.
    let core_db = sea_orm::Database::connect(rig.core.db_url.as_str())
        .await
        .unwrap();
    core_db
        .execute_raw(Statement::from_sql_and_values(
            core_db.get_database_backend(),
            "WITH e AS ( \
               INSERT INTO ledger_entries (account_id, seq, kind, amount, balance_after, occurred_at, business_date) \
               SELECT $1, n, 'deposit', 1, n, now(), current_date FROM generate_series(2, 55001) AS n RETURNING 1) \
             UPDATE accounts SET balance = 55001, last_seq = 55001 \
              WHERE account_id = $1 AND (SELECT count(*) FROM e) = 55000",
            [account.clone().into()],
        ))
        .await
        .unwrap();
    rig.core.api.deposit(&account, 5).await.expect(200);
    let p = rig
        .projector(ProjectorOptions {
            max_deliveries: 1,
            ..ProjectorOptions::default()
        })
        .await;
    rig.wait_synced(&account, 55_002, Duration::from_secs(120))
        .await;
    assert!(dead_letters(&p).await.is_empty());
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
}

/// A projector's context on the rig's channel database, reading the core
/// through the rig's proxy, for driving the ledger audit's passes by hand.
async fn audit_context(rig: &Rig) -> (projector::consume::Context, async_nats::Client) {
    let config = ProjectorOptions::default().config(&rig.nats, &rig.proxy.url(), &rig.channel_db);
    projector::app::context(&config).await.unwrap()
}

/// The ledger audit runs on one replica at a time: the one holding the
/// audit lease, renewed at every page; another replica's pass stops before
/// reading anything, until the lease has expired.
#[tokio::test]
async fn f7_one_replica_audits_at_a_time() {
    use projector::consume::audit::audit_once;
    let rig = Rig::new().await;
    rig.core.api.funded_account(1).await;
    let (ctx, _nats) = audit_context(&rig).await;
    let (lease, every) = (Duration::from_secs(2), Duration::from_secs(1));
    let first = audit_once(&ctx, 1000, "one", lease, every).await.unwrap();
    assert!(first.complete && first.accounts == 1, "{first:?}");
    let second = audit_once(&ctx, 1000, "two", lease, every).await.unwrap();
    assert!(!second.complete && second.accounts == 0, "{second:?}");
    // The holder renews it; once it has expired, the other takes it.
    assert!(
        audit_once(&ctx, 1000, "one", lease, every)
            .await
            .unwrap()
            .complete
    );
    eventually("the lease taken over", Duration::from_secs(10), || async {
        match audit_once(&ctx, 1000, "two", lease, every).await {
            Ok(pass) if pass.complete => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        !audit_once(&ctx, 1000, "one", lease, every)
            .await
            .unwrap()
            .complete
    );
}

/// B15, F7: a quiet account whose history holds entries past the core's
/// last seq that the core never made (forged deposits that continued the
/// balances, as a message from anyone who can reach the broker could) has
/// them cut by the ledger audit and the history brought back to the core's
/// ledger, instead of showing them until the account's next real entry.
#[tokio::test]
async fn b15_f7_the_ledger_audit_cuts_entries_past_the_cores_ledger_that_are_not_the_cores() {
    use projector::consume::audit::audit_once;
    let rig = Rig::new().await;
    let account = rig.core.api.funded_account(100).await;
    // No projector runs (its audit would hold the lease): the history gets
    // the core's seq 1 from a sync, then the forged entries.
    let (ctx, _nats) = audit_context(&rig).await;
    let id = common::AccountId::parse(account.clone()).unwrap();
    let synced = transfer::history::sync::sync_account(&ctx.db, &ctx.core, &id)
        .await
        .unwrap();
    assert_eq!(synced.synced_through_seq, 1);
    let forged = [entry(&id, 2, 7, 107), entry(&id, 3, 1, 108)];
    assert_eq!(writer::apply(&ctx.db, &forged).await.unwrap().applied, 2);
    assert_eq!(rig.synced(&account).await, 3);

    let (lease, every) = (Duration::from_secs(10), Duration::from_secs(1));
    let pass = audit_once(&ctx, 1000, "one", lease, every).await.unwrap();
    assert!(pass.complete && pass.repaired == 1, "{pass:?}");
    assert_eq!(
        rig.synced(&account).await,
        1,
        "cut back to the core's seq 1"
    );
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
    // The account is the core's again: the next pass finds nothing.
    let again = audit_once(&ctx, 1000, "one", lease, every).await.unwrap();
    assert!(again.complete && again.repaired == 0, "{again:?}");
}

/// An account the core moved on after the audit read its page has a
/// history past the `last_seq` the page gave, and entries still to come:
/// the audit syncs it (nothing to cut, the entries are the core's) and
/// counts no repair, so a busy account never raises `LedgerEventsLost`.
#[tokio::test]
async fn f7_the_ledger_audit_counts_no_repair_of_an_account_the_core_moved_on_since_its_page() {
    use projector::consume::audit::audit_once;
    let rig = Rig::new().await;
    let account = rig.core.api.funded_account(100).await;
    let id = common::AccountId::parse(account.clone()).unwrap();
    // No projector runs: the test brings the history where it wants it.
    let (ctx, _nats) = audit_context(&rig).await;
    let synced = transfer::history::sync::sync_account(&ctx.db, &ctx.core, &id)
        .await
        .unwrap();
    assert_eq!(synced.synced_through_seq, 1);
    // The audit's page of accounts is read (seq 1) and its answer held ...
    rig.proxy.add(
        Some(reqwest::Method::GET),
        "/v1/accounts?",
        bank_tests::proxy::Action::HoldResponse,
        Some(1),
    );
    let (lease, every) = (Duration::from_secs(10), Duration::from_secs(1));
    let audit = {
        let ctx = ctx.clone();
        tokio::spawn(async move { audit_once(&ctx, 1000, "one", lease, every).await })
    };
    until_answered(&rig, "the audit's page", "/v1/accounts?").await;
    // ... while the core moves on: seq 2 reaches the history, seq 3 not yet.
    rig.core.api.deposit(&account, 5).await.expect(200);
    let synced = transfer::history::sync::sync_account(&ctx.db, &ctx.core, &id)
        .await
        .unwrap();
    assert_eq!(synced.synced_through_seq, 2);
    rig.core.api.deposit(&account, 7).await.expect(200);
    rig.proxy.release_held();
    let pass = audit.await.unwrap().unwrap();
    assert!(pass.complete, "{pass:?}");
    assert_eq!(
        pass.repaired, 0,
        "the core moved on, nothing was lost: {pass:?}"
    );
    assert_eq!(rig.synced(&account).await, 3, "synced, nothing cut");
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
}

/// B15/B19: a sync that found the history past the core's ledger, while
/// another sync cut it back before this one could check it, finds nothing
/// to cut itself and reads where the history now ends: it reports the seq
/// the history holds, not the one it read before the other's cut.
#[tokio::test]
async fn b19_a_sync_that_another_sync_cut_back_first_reports_where_the_history_now_ends() {
    use transfer::history::sync::sync_account;
    let rig = Rig::new().await;
    let account = rig.core.api.funded_account(100).await;
    let id = common::AccountId::parse(account.clone()).unwrap();
    // No projector runs: the test brings the history where it wants it,
    // one forged entry past the core's seq 1.
    let (ctx, _nats) = audit_context(&rig).await;
    assert_eq!(
        sync_account(&ctx.db, &ctx.core, &id)
            .await
            .unwrap()
            .synced_through_seq,
        1
    );
    let forged = [bank_tests::verify::deposit_entry(&id, 2, 7, 107)];
    let written = transfer::history::writer::apply(&ctx.db, &forged)
        .await
        .unwrap();
    assert_eq!(written.applied, 1);
    // The first sync has read the history's seq (2) and asked the core for
    // what follows; the core's answer is held ...
    let path = format!("/v1/accounts/{account}/entries?after_seq=2");
    rig.proxy.add(
        Some(reqwest::Method::GET),
        &path,
        bank_tests::proxy::Action::HoldResponse,
        Some(1),
    );
    let first = {
        let (ctx, id) = (ctx.clone(), id.clone());
        tokio::spawn(async move { sync_account(&ctx.db, &ctx.core, &id).await })
    };
    until_answered(&rig, "the first sync's page", &path).await;
    // ... while a second sync cuts the forged entry.
    let second = sync_account(&ctx.db, &ctx.core, &id).await.unwrap();
    assert_eq!((second.synced_through_seq, second.cut), (1, true));
    rig.proxy.release_held();
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        (first.synced_through_seq, first.cut, first.applied),
        (1, false, 0),
        "{first:?}"
    );
    assert_eq!(rig.synced(&account).await, 1);
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
}

/// Waits until the core has answered a request of `path_prefix` through
/// the proxy (whether or not the answer was passed on).
async fn until_answered(rig: &Rig, what: &str, path_prefix: &str) {
    eventually(what, Duration::from_secs(10), || async {
        let read = rig
            .proxy
            .answered()
            .iter()
            .any(|(_, path, _)| path.starts_with(path_prefix));
        if read {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    })
    .await;
}

/// What the ledger audit found, and where its pass stopped, outlive the
/// replica that found it: a replica that takes the lease over (the first
/// one restarted, or another) goes on from the page the failed pass reached,
/// and syncs the account the first one found behind without first finding
/// it again (an audit that kept this in memory would only have started
/// over).
#[tokio::test]
async fn f7_the_ledger_audits_findings_and_position_outlive_its_replica() {
    use projector::consume::audit::audit_once;
    let rig = Rig::new().await;
    // No projector consumes: every account's history is behind.
    let mut accounts = Vec::new();
    for _ in 0..3 {
        accounts.push(rig.core.api.funded_account(100).await);
    }
    accounts.sort();
    let (ctx, _nats) = audit_context(&rig).await;
    let (lease, every) = (Duration::from_secs(2), Duration::from_secs(1));
    // The first replica reads one account a page; the core fails the page
    // after the second account's, every time.
    let third_page = format!("after={}", accounts[1]);
    rig.proxy.add(
        Some(reqwest::Method::GET),
        &third_page,
        bank_tests::proxy::Action::Fail(503),
        None,
    );
    let failed = audit_once(&ctx, 1, "one", lease, every).await;
    assert!(failed.is_err(), "{failed:?}");
    rig.proxy.clear();
    let calls_before = rig.proxy.seen().len();
    // Another replica, once the first one's lease has expired, goes on at
    // the third page ...
    let pass = eventually("the lease taken over", Duration::from_secs(10), || async {
        match audit_once(&ctx, 1, "two", lease, every).await {
            Ok(pass) if pass.complete => Ok(pass),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        (pass.accounts, pass.repaired),
        (1, 0),
        "went on at the third page: {pass:?}"
    );
    let calls: Vec<String> = rig.proxy.seen()[calls_before..]
        .iter()
        .map(|(_, path, _)| path.clone())
        .filter(|p| p.starts_with("/v1/accounts?"))
        .collect();
    assert!(calls[0].contains(&third_page), "{calls:?}");
    // ... and, on its next pass, syncs the two accounts the first replica
    // found behind (more than two seconds ago, the lease's time) at once;
    // the third, which it found itself, once its finding is half an
    // interval old.
    let pass = audit_once(&ctx, 1, "two", lease, every).await.unwrap();
    assert!(pass.complete && pass.repaired >= 2, "{pass:?}");
    let repaired = std::sync::atomic::AtomicU64::new(pass.repaired);
    eventually(
        "the third account synced",
        Duration::from_secs(10),
        || async {
            let pass = audit_once(&ctx, 1, "two", lease, every)
                .await
                .map_err(|e| e.to_string())?;
            let total = repaired.fetch_add(pass.repaired, std::sync::atomic::Ordering::SeqCst)
                + pass.repaired;
            if total == 3 {
                Ok(())
            } else {
                Err(format!("{total} repaired; {pass:?}"))
            }
        },
    )
    .await;
    history_is_the_ledger_now(&rig.core.api, &rig.channel_db, &accounts).await;
}

#[tokio::test]
async fn b23_a_payout_whose_event_was_lost_from_the_stream_still_gets_its_tax_record() {
    let rig = Rig::new().await;
    // No projector yet: the payout's event is deleted from the stream
    // before anything reads it.
    let account = rig.core.api.funded_account(60_000_000).await;
    let pid = pay_interest(&rig, &account, 3).await;
    let js = rig.nats.jetstream().await.unwrap();
    let ev = eventually("the interest event", Duration::from_secs(10), || async {
        let msgs = stream_messages(&js, "INTEREST")
            .await
            .map_err(|e| e.to_string())?;
        msgs.into_iter()
            .find(|m| String::from_utf8_lossy(&m.payload).contains(&pid))
            .ok_or_else(|| "not published yet".to_owned())
    })
    .await;
    let mut stream = js.get_stream("INTEREST").await.unwrap();
    assert!(stream.delete_message(ev.sequence).await.unwrap());
    assert!(stream.info().await.unwrap().state.messages == 0);
    let p = rig
        .projector(ProjectorOptions {
            tax_sweep_secs: 1,
            ..ProjectorOptions::default()
        })
        .await;
    let records = wait_tax_records(&p, &account, 1).await;
    let paid = rig
        .core
        .api
        .get(&format!("/v1/accounts/{account}/interest/payouts/{pid}"))
        .await
        .expect(200)
        .body;
    assert_the_cores_figures(&records[0], &paid);
    assert_eq!(records[0]["net"], json!("7023"));
    assert!(dead_letters(&p).await.is_empty());
}

#[tokio::test]
async fn f5_a_tax_event_the_core_cannot_confirm_is_retried_dead_lettered_and_still_recorded() {
    let rig = Rig::new().await;
    // The core's payout look-ups fail (503) through the projector's path.
    rig.proxy
        .add(None, "/interest/payouts/", Action::Fail(503), None);
    let p = rig
        .projector(ProjectorOptions {
            max_deliveries: 3,
            retry_base_ms: 50,
            retry_max_ms: 200,
            tax_sweep_secs: 1,
            ..ProjectorOptions::default()
        })
        .await;
    let account = rig.core.api.funded_account(60_000_000).await;
    let pid = pay_interest(&rig, &account, 3).await;
    // Retried with backoff, then dead-lettered, never recorded unconfirmed.
    let letters = wait_letters(&p, 1).await;
    let error = letters[0]["error"].as_str().unwrap();
    assert!(
        error.contains("cannot confirm") && error.contains("after 3 deliveries"),
        "{error}"
    );
    assert_eq!(letters[0]["deliveries"], 3);
    assert!(tax_records(&p, &account).await.is_empty());
    // The core answers again: the sweep records the payout from it, and a
    // replay of the letter is then a duplicate.
    rig.proxy.clear();
    let records = wait_tax_records(&p, &account, 1).await;
    assert_eq!(records[0]["payout_id"], json!(pid));
    assert_eq!(records[0]["net"], json!("7023"));
    let id = letter_id(&letters[0]);
    p.api
        .post(&format!("/v1/dead-letters/{id}/replay"), json!({}))
        .await
        .expect(200);
    assert!(dead_letters(&p).await.is_empty());
    assert_eq!(tax_records(&p, &account).await.len(), 1);
}

/// B16's operator routes, with `PROJECTOR_API_TOKEN` set, answer only to
/// that token: none, a wrong one or another scheme gets 401 on every `/v1`
/// route; the probes, metrics and OpenAPI stay open.
#[tokio::test]
async fn b16_with_an_operator_token_set_every_dead_letter_and_tax_route_needs_it() {
    let rig = Rig::new().await;
    let p = rig
        .projector(ProjectorOptions {
            api_token: Some("operator-token"),
            ..ProjectorOptions::default()
        })
        .await;
    let account = rig.core.api.funded_account(100).await;
    assert!(dead_letters(&p).await.is_empty(), "the token is accepted");
    assert!(tax_records(&p, &account).await.is_empty());
    let routes = [
        ("GET", "/v1/dead-letters".to_owned()),
        ("GET", "/v1/dead-letters/1".to_owned()),
        ("POST", "/v1/dead-letters/1/replay".to_owned()),
        ("GET", format!("/v1/tax-records?account_id={account}")),
    ];
    let anonymous = p.api.with_token(None);
    let wrong = p.api.with_token(Some("operator-token-2".to_owned()));
    for (method, path) in &routes {
        for client in [&anonymous, &wrong] {
            let r = client.send(method, path, Some(json!({})), &[]).await;
            assert_eq!(
                (r.status, r.code()),
                (401, Some("unauthorized")),
                "{method} {path}"
            );
        }
        let basic = anonymous
            .send(
                method,
                path,
                Some(json!({})),
                &[("authorization", "Basic operator-token")],
            )
            .await;
        assert_eq!(basic.status, 401, "{method} {path} with another scheme");
    }
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(anonymous.get(open).await.status, 200, "{open}");
    }
}

#[tokio::test]
async fn b15_an_interest_entry_for_a_payout_the_core_never_made_is_cut_by_the_tax_sweep_also_on_an_account_the_core_does_not_have()
 {
    let rig = Rig::new().await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(100).await;
    rig.wait_synced(&account, 1, Duration::from_secs(10)).await;
    p.stop().await.unwrap();
    let db = sea_orm::Database::connect(rig.channel_db.as_str())
        .await
        .unwrap();
    // First, so that the sweep meets it first: an interest entry of an
    // account the core does not have at all (its entries API answers 404
    // `account_not_found`, so none of it is the core's).
    let ghost = common::AccountId::generate();
    let mut haunting = entry(&ghost, 1, 7, 7);
    haunting.kind = EntryKind::Interest;
    haunting.payout_id = Some(common::PayoutId::parse(unique("pay_")).unwrap());
    assert_eq!(writer::apply(&db, &[haunting]).await.unwrap().applied, 1);
    // Then an interest entry the core never made on a real account,
    // continuing the balances, as the last entry (no later entry of the
    // core contradicts it).
    let id = common::AccountId::parse(account.clone()).unwrap();
    let mut forged = entry(&id, 2, 7, 107);
    forged.kind = EntryKind::Interest;
    forged.payout_id = Some(common::PayoutId::parse(unique("pay_")).unwrap());
    assert_eq!(writer::apply(&db, &[forged]).await.unwrap().applied, 1);
    assert_eq!(rig.synced(&account).await, 2);
    // The sweep looks for their tax records, asks the core for the payouts,
    // and cuts both entries.
    let p = rig
        .projector(ProjectorOptions {
            tax_sweep_secs: 1,
            ..ProjectorOptions::default()
        })
        .await;
    eventually("both entries cut", Duration::from_secs(30), || async {
        match (rig.synced(ghost.as_str()).await, rig.synced(&account).await) {
            (0, 1) => Ok(()),
            (g, n) => Err(format!(
                "{g} entries of the unknown account, {n} of the real one"
            )),
        }
    })
    .await;
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
    assert!(tax_records(&p, &account).await.is_empty());
    assert!(tax_records(&p, ghost.as_str()).await.is_empty());
}

/// B15: the tax sweep that cuts an interest entry the core never made
/// fetches the core's entries from that seq back at once (here the core's
/// own entry at that seq, whose event was lost), instead of leaving the
/// history short until the next event or the ledger audit.
#[tokio::test]
async fn b15_the_tax_sweep_fetches_the_cores_entries_back_after_cutting_one_that_is_not_the_cores()
{
    let rig = Rig::new().await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(100).await;
    rig.wait_synced(&account, 1, Duration::from_secs(10)).await;
    p.stop().await.unwrap();
    // The core's seq 2 (a deposit), whose event is lost from the stream...
    rig.core.api.deposit(&account, 5).await.expect(200);
    let js = rig.nats.jetstream().await.unwrap();
    let stream = js.get_stream("LEDGER").await.unwrap();
    let subject = format!("bank.ledger.{account}");
    let lost = eventually("the deposit's event", Duration::from_secs(10), || async {
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) if String::from_utf8_lossy(&m.payload).contains("\"seq\":2") => Ok(m.sequence),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(stream.delete_message(lost).await.unwrap());
    // ...and in the history an interest entry the core never made at seq 2.
    let db = sea_orm::Database::connect(rig.channel_db.as_str())
        .await
        .unwrap();
    let id = common::AccountId::parse(account.clone()).unwrap();
    let mut forged = entry(&id, 2, 7, 107);
    forged.kind = EntryKind::Interest;
    forged.payout_id = Some(common::PayoutId::parse(unique("pay_")).unwrap());
    assert_eq!(writer::apply(&db, &[forged]).await.unwrap().applied, 1);
    let _p = rig
        .projector(ProjectorOptions {
            tax_sweep_secs: 1,
            ..ProjectorOptions::default()
        })
        .await;
    eventually(
        "the core's seq 2 in the history",
        Duration::from_secs(30),
        || async {
            let held = bank_tests::db::query_strings(
                &rig.channel_db,
                &format!("SELECT kind || ':' || amount::text FROM history_entries WHERE account_id = '{account}' AND seq = 2"),
            )
            .await
            .map_err(|e| e.to_string())?;
            if held == ["deposit:5"] {
                Ok(())
            } else {
                Err(format!("{held:?}"))
            }
        },
    )
    .await;
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
}

/// B23 against a slow core: the interest consumer keeps telling the server
/// it is still checking the payout, so a check that takes longer than the
/// ack wait neither gets the event redelivered (and checked again) nor
/// spends its deliveries.
#[tokio::test]
async fn b23_a_payout_check_slower_than_the_ack_wait_does_not_get_the_event_redelivered() {
    let rig = Rig::new().await;
    rig.proxy.add(
        None,
        "/interest/payouts/",
        Action::DelayResponse(Duration::from_secs(5)),
        None,
    );
    let p = rig
        .projector(ProjectorOptions {
            ack_wait_secs: 2,
            max_deliveries: 2,
            ..ProjectorOptions::default()
        })
        .await;
    let account = rig.core.api.funded_account(60_000_000).await;
    let pid = pay_interest(&rig, &account, 3).await;
    let records = wait_tax_records(&p, &account, 1).await;
    assert_eq!(records[0]["payout_id"], json!(pid));
    let js = rig.nats.jetstream().await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("projector-interest", "INTEREST")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.delivered.consumer_sequence, 1,
        "the one event was delivered once: {:?}",
        info.delivered
    );
    let looked_up = rig
        .proxy
        .seen()
        .iter()
        .filter(|(_, path, _)| path.contains(&pid))
        .count();
    assert_eq!(looked_up, 1, "the payout was checked once");
    assert!(dead_letters(&p).await.is_empty());
}

/// B23's sweep settles each interest entry on its own: one the core refuses
/// to explain (here a 403 from a gateway on its payout) is logged, counted
/// and kept for the next pass, and the entries after it still get their
/// tax records.
#[tokio::test]
async fn b23_an_interest_entry_the_core_refuses_to_explain_does_not_hold_up_the_tax_sweep() {
    refused_entry_does_not_hold_up_the_sweep(500).await;
}

/// The same across pages: with a page of one entry, the refused entry fills
/// every page that starts at the oldest; the next pass goes on after it.
#[tokio::test]
async fn b23_an_entry_the_core_keeps_refusing_does_not_hold_up_the_next_sweep_pages() {
    refused_entry_does_not_hold_up_the_sweep(1).await;
}

async fn refused_entry_does_not_hold_up_the_sweep(tax_sweep_page: i64) {
    let rig = Rig::new().await;
    let p = rig
        .projector(ProjectorOptions {
            max_deliveries: 2,
            retry_base_ms: 50,
            retry_max_ms: 200,
            tax_sweep_secs: 1,
            tax_sweep_page,
            ..ProjectorOptions::default()
        })
        .await;
    let (stuck, lost) = (
        rig.core.api.funded_account(10_000_000).await,
        rig.core.api.funded_account(10_000_000).await,
    );
    let (stuck_payout, lost_payout) = (unique("pay_"), unique("pay_"));
    // A gateway refuses the projector's look-ups of both payouts, so both
    // events are dead-lettered unrecorded, `stuck`'s first.
    rig.proxy.add(None, &stuck_payout, Action::Fail(403), None);
    rig.proxy.add(None, &lost_payout, Action::Fail(403), None);
    rig.core.api.advance_business_date(3).await;
    pay_out(&rig, &stuck, &stuck_payout).await;
    rig.wait_synced(&stuck, 2, Duration::from_secs(10)).await;
    pay_out(&rig, &lost, &lost_payout).await;
    wait_letters(&p, 2).await;
    // Then only `stuck`'s stays refused: the sweep meets it first on every
    // pass, and still records `lost`'s.
    rig.proxy.remove(&lost_payout);
    let records = wait_tax_records(&p, &lost, 1).await;
    assert_eq!(records[0]["payout_id"], json!(lost_payout));
    let errors = bank_tests::metrics::metric(
        &bank_tests::metrics::scrape(&p.api.base).await,
        "projector_tax_sweep_errors_total",
    );
    assert!(errors >= 1.0, "the refused entry is counted: {errors}");
    assert!(tax_records(&p, &stuck).await.is_empty());
    // Once the core explains it, it is recorded too.
    rig.proxy.remove(&stuck_payout);
    let records = wait_tax_records(&p, &stuck, 1).await;
    assert_eq!(records[0]["payout_id"], json!(stuck_payout));
}

/// B23: a tax record that already holds other figures for a payout (a
/// manual insert, an older version without the core check) keeps its first
/// record, but the core's figures arriving for it are not dropped in
/// silence: counted, for the `TaxRecordConflicts` alert.
#[tokio::test]
async fn b23_a_tax_record_with_other_figures_than_the_cores_is_kept_and_reported() {
    let rig = Rig::new().await;
    let p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(60_000_000).await;
    rig.core.api.advance_business_date(3).await;
    let pid = unique("pay_");
    use sea_orm::{ConnectionTrait, Database, Statement};
    let db = Database::connect(&rig.channel_db).await.unwrap();
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO tax_records (payout_id, account_id, gross, tax, net, from_date, through_date, paid_at) \
         VALUES ($1, $2, 100, 1, 99, current_date, current_date, now())",
        [pid.clone().into(), account.clone().into()],
    ))
    .await
    .unwrap();
    // In-process apps share one metrics registry: counted from here on.
    let conflicts = || async {
        bank_tests::metrics::metric(
            &bank_tests::metrics::scrape(&p.api.base).await,
            "projector_tax_record_conflicts_total",
        )
    };
    let before = conflicts().await;
    pay_out(&rig, &account, &pid).await;
    eventually("the conflict counted", Duration::from_secs(30), || async {
        let n = conflicts().await;
        if n > before {
            Ok(())
        } else {
            Err(n.to_string())
        }
    })
    .await;
    let records = tax_records(&p, &account).await;
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0]["gross"].as_str(), records[0]["tax"].as_str()),
        (Some("100"), Some("1")),
        "the first record stands"
    );
    assert!(dead_letters(&p).await.is_empty());
}

/// B23: the conflict check also sees a record of the payout that another
/// writer inserted while this one ran (the insert waits for that
/// transaction, then skips the payout): the core's figures arriving for it
/// are reported, not dropped in silence.
#[tokio::test]
async fn b23_a_tax_record_inserted_concurrently_with_other_figures_is_reported() {
    use sea_orm::Database;
    use sea_orm_migration::MigratorTrait;
    let url = bank_tests::db::fresh_database("tax").await.unwrap();
    let db = Database::connect(url.as_str()).await.unwrap();
    projector::migration::Migrator::up(&db, None).await.unwrap();
    let (payout, account) = (common::PayoutId::generate(), common::AccountId::generate());
    let other = bank_tests::db::RowLock::tax_record(&url, payout.as_str(), account.as_str())
        .await
        .unwrap();
    let today = chrono::Utc::now().date_naive();
    let event = common::events::InterestPaidEvent {
        event_id: common::events::InterestPaidEvent::id_for(&payout),
        payout_id: payout.clone(),
        account_id: account.clone(),
        gross: Won::new(200.into()).unwrap(),
        tax: Won::new(30.into()).unwrap(),
        net: Won::new(170.into()).unwrap(),
        from: today,
        through: today,
        paid_at: chrono::Utc::now(),
    };
    let recording = tokio::spawn({
        let db = db.clone();
        async move { projector::consume::tax::record(&db, &[event]).await }
    });
    other
        .until_blocked(1, "the insert waiting for the other writer")
        .await;
    other.commit().await.unwrap();
    let recorded = recording.await.unwrap().unwrap();
    assert_eq!(recorded.new, 0, "the first record stands");
    assert_eq!(recorded.differing, [payout.to_string()]);
    let kept = bank_tests::db::query_strings(
        &url,
        &format!("SELECT gross::text FROM tax_records WHERE payout_id = '{payout}'"),
    )
    .await
    .unwrap();
    assert_eq!(kept, ["100"]);
}

/// B23: an interest entry the sweep cannot settle (the core refuses its
/// payout) is tried again at every pass until it is 30 days old; then it is
/// given up, not dropped in silence: logged at error and counted, for the
/// `TaxRecordsGivenUp` alert.
#[tokio::test]
async fn b23_an_interest_entry_the_sweep_never_settles_is_given_up_at_30_days_and_counted() {
    use sea_orm::{ConnectionTrait, Statement};
    let rig = Rig::new().await;
    let account = rig.core.api.funded_account(100).await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    rig.wait_synced(&account, 1, Duration::from_secs(10)).await;
    p.stop().await.unwrap();
    // An interest entry whose payout the core refuses to explain (through
    // the projector's path), written 30 s short of 30 days ago.
    let payout = unique("pay_");
    rig.proxy.add(None, &payout, Action::Fail(403), None);
    let db = sea_orm::Database::connect(rig.channel_db.as_str())
        .await
        .unwrap();
    let id = common::AccountId::parse(account.clone()).unwrap();
    let mut interest = entry(&id, 2, 7, 107);
    interest.kind = EntryKind::Interest;
    interest.payout_id = Some(common::PayoutId::parse(payout.clone()).unwrap());
    assert_eq!(writer::apply(&db, &[interest]).await.unwrap().applied, 1);
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "UPDATE history_entries SET applied_at = now() - interval '30 days' + interval '30 seconds' \
         WHERE account_id = $1 AND seq = 2",
        [account.clone().into()],
    ))
    .await
    .unwrap();
    // As if it was written then: the first projector's sweep, which caught
    // up before the entry was written, has recorded no progress past it.
    db.execute_unprepared("DELETE FROM tax_sweep_progress")
        .await
        .unwrap();
    // In-process apps share one metrics registry (the core's /metrics shows
    // it while no projector runs): counted from here on.
    let given_up = "projector_tax_sweep_given_up_total";
    let before = bank_tests::metrics::read(&rig.core.api.base, given_up).await;
    let p = rig
        .projector(ProjectorOptions {
            tax_sweep_secs: 1,
            ..ProjectorOptions::default()
        })
        .await;
    eventually("the entry given up", Duration::from_secs(60), || async {
        match bank_tests::metrics::read(&p.api.base, given_up).await {
            n if n > before => Ok(()),
            n => Err(format!("{n} given up")),
        }
    })
    .await;
    assert!(tax_records(&p, &account).await.is_empty());
}

/// B23's sweep reads what was written since its last pass, not its whole
/// window again (at a bank's volume, millions of recorded entries a pass):
/// each interest entry is read once, passes that find nothing new read
/// nothing, and an entry the core could not explain at first is tried
/// again from what the sweep kept, not by reading everything again.
#[tokio::test]
async fn b23_the_tax_sweep_reads_each_entry_once_and_retries_only_what_failed() {
    let rig = Rig::new().await;
    // A process of its own: the counters read are this projector's alone
    // (in-process apps of parallel tests share one metrics registry).
    let (mut process, base, p) = sweeping_projector(&rig, 0, []).await;
    let metric = |name: &'static str| {
        let base = base.clone();
        async move { bank_tests::metrics::metric(&bank_tests::metrics::scrape(&base).await, name) }
    };
    let mut accounts = Vec::new();
    for _ in 0..4 {
        accounts.push(rig.core.api.funded_account(10_000_000).await);
    }
    let refused = accounts.pop().unwrap();
    rig.core.api.advance_business_date(3).await;
    for account in &accounts {
        pay_out(&rig, account, &unique("pay_")).await;
    }
    for a in &accounts {
        wait_tax_records(&p, a, 1).await;
    }
    until_metric(&base, "projector_tax_sweep_scanned_total", |n| n == 3.0).await;
    let passes = metric("projector_tax_sweep_passes_total").await;
    until_metric(&base, "projector_tax_sweep_passes_total", |n| {
        n >= passes + 3.0
    })
    .await;
    assert_eq!(
        metric("projector_tax_sweep_scanned_total").await,
        3.0,
        "passes with nothing new read nothing"
    );
    // A payout the core refuses to explain at first: its event is
    // dead-lettered unrecorded, the sweep reads its entry once and keeps it.
    let pid = unique("pay_");
    rig.proxy.add(None, &pid, Action::Fail(403), None);
    pay_out(&rig, &refused, &pid).await;
    wait_letters(&p, 1).await;
    until_metric(&base, "projector_tax_sweep_retrying", |n| n == 1.0).await;
    rig.proxy.remove(&pid);
    let records = wait_tax_records(&p, &refused, 1).await;
    assert_eq!(records[0]["payout_id"], json!(pid));
    assert_eq!(
        metric("projector_tax_sweep_scanned_total").await,
        4.0,
        "recorded from what the sweep kept, not by reading again"
    );
    process.terminate_cleanly().await.unwrap();
}

/// B23, the sweep's overlap: an interest entry is stamped with its
/// transaction's start, so one whose apply waited (here on the account's
/// `history_sync` lock) commits stamped before the time later passes have
/// read up to. With its tax event dead-lettered unrecorded, only the sweep
/// can record its tax, and it finds it because each pass reads from
/// `PROJECTOR_TAX_SWEEP_OVERLAP_SECS` before where the last one ended.
#[tokio::test]
async fn b23_the_tax_sweep_finds_an_entry_committed_after_passes_read_past_its_stamp() {
    let rig = Rig::new().await;
    let account = rig.core.api.funded_account(10_000_000).await;
    // The interest entry's apply waits for the lock as long as the test
    // holds it, in one transaction (one stamp).
    let (mut process, base, p) =
        sweeping_projector(&rig, 60, [("DATABASE_LOCK_TIMEOUT_MS", "30000")]).await;
    rig.wait_synced(&account, 1, Duration::from_secs(30)).await;
    rig.core.api.advance_business_date(3).await;

    // The core refuses to explain the payout at first: its tax event is
    // dead-lettered unrecorded.
    let pid = unique("pay_");
    rig.proxy.add(None, &pid, Action::Fail(403), None);
    let lock = bank_tests::db::RowLock::history_sync(&rig.channel_db, &account)
        .await
        .unwrap();
    pay_out(&rig, &account, &pid).await;
    lock.until_waited_on("the interest entry's apply").await;
    wait_letters(&p, 1).await;
    rig.proxy.remove(&pid);
    // Passes run while the entry is uncommitted, each reading up to a
    // second ago: after three the sweep has read past the entry's stamp.
    let passes = bank_tests::metrics::metric(
        &bank_tests::metrics::scrape(&base).await,
        "projector_tax_sweep_passes_total",
    );
    until_metric(&base, "projector_tax_sweep_passes_total", |n| {
        n >= passes + 3.0
    })
    .await;
    lock.release().await.unwrap();
    rig.wait_synced(&account, 2, Duration::from_secs(30)).await;
    let records = wait_tax_records(&p, &account, 1).await;
    assert_eq!(records[0]["payout_id"], json!(pid));
    process.terminate_cleanly().await.unwrap();
}

/// B23: a restarted projector's tax sweep goes on from where the sweep had
/// settled every interest entry (`tax_sweep_progress`), instead of reading
/// its whole 30-day window again.
#[tokio::test]
async fn b23_a_restarted_projector_sweeps_on_from_where_the_sweep_had_settled_everything() {
    let rig = Rig::new().await;
    let (mut process, base, p) = sweeping_projector(&rig, 0, []).await;
    let mut accounts = Vec::new();
    for _ in 0..3 {
        accounts.push(rig.core.api.funded_account(10_000_000).await);
    }
    rig.core.api.advance_business_date(3).await;
    pay_out_and_sweep(&rig, &p, &base, &accounts, 3.0).await;
    process.terminate_cleanly().await.unwrap();

    let (mut process, base, p) = sweeping_projector(&rig, 0, []).await;
    until_metric(&base, "projector_tax_sweep_passes_total", |n| n >= 3.0).await;
    let read = |name: &'static str| {
        let base = base.clone();
        async move { bank_tests::metrics::read(&base, name).await }
    };
    assert_eq!(
        read("projector_tax_sweep_scanned_total").await,
        0.0,
        "the new process read none of the entries settled before it started"
    );
    assert_eq!(read("projector_tax_sweep_errors_total").await, 0.0);
    // And it reads what is written from then on.
    let next = rig.core.api.funded_account(10_000_000).await;
    rig.core.api.advance_business_date(3).await;
    pay_out(&rig, &next, &unique("pay_")).await;
    wait_tax_records(&p, &next, 1).await;
    until_metric(&base, "projector_tax_sweep_scanned_total", |n| n == 1.0).await;
    process.terminate_cleanly().await.unwrap();
}

/// B23: an entry the sweep keeps for another try lives in its process's
/// memory; when that process stops, the next one still sweeps it, because
/// the progress recorded stops short of the oldest entry kept.
#[tokio::test]
async fn b23_an_entry_the_sweep_kept_for_another_try_is_swept_by_the_next_process() {
    let rig = Rig::new().await;
    let (mut process, base, p) = sweeping_projector(&rig, 0, []).await;
    let refused = rig.core.api.funded_account(10_000_000).await;
    let mut later = Vec::new();
    for _ in 0..2 {
        later.push(rig.core.api.funded_account(10_000_000).await);
    }
    rig.core.api.advance_business_date(3).await;
    // The core refuses to explain this payout for as long as the first
    // process runs: its event is dead-lettered and the sweep keeps it.
    let pid = unique("pay_");
    rig.proxy.add(None, &pid, Action::Fail(403), None);
    pay_out(&rig, &refused, &pid).await;
    wait_letters(&p, 1).await;
    until_metric(&base, "projector_tax_sweep_retrying", |n| n == 1.0).await;
    // Entries after it are settled, and passes catch up past them all.
    pay_out_and_sweep(&rig, &p, &base, &later, 3.0).await;
    assert!(tax_records(&p, &refused).await.is_empty());
    process.terminate_cleanly().await.unwrap();

    rig.proxy.remove(&pid);
    let (mut process, _, p) = sweeping_projector(&rig, 0, []).await;
    let records = wait_tax_records(&p, &refused, 1).await;
    assert_eq!(records[0]["payout_id"], json!(pid));
    process.terminate_cleanly().await.unwrap();
}

/// Pays out each of `accounts`, and waits until each has its tax record,
/// the sweeping process at `base` has read `scanned` entries in all, and
/// two more of its passes have ended: the pass that read the last of them
/// may have been under way, and each pass that catches up records how far
/// it got (a pass under way at shutdown is dropped).
#[allow(clippy::float_arithmetic)] // counters, as scraped: whole numbers in f64
async fn pay_out_and_sweep(
    rig: &Rig,
    p: &bank_tests::Api,
    base: &str,
    accounts: &[String],
    scanned: f64,
) {
    for account in accounts {
        pay_out(rig, account, &unique("pay_")).await;
    }
    for a in accounts {
        wait_tax_records(p, a, 1).await;
    }
    until_metric(base, "projector_tax_sweep_scanned_total", |n| n == scanned).await;
    let passes = bank_tests::metrics::read(base, "projector_tax_sweep_passes_total").await;
    until_metric(base, "projector_tax_sweep_passes_total", |n| {
        n >= passes + 2.0
    })
    .await;
}

/// A projector process reaching the core through the proxy, giving up on
/// a message after two deliveries and sweeping every second with an overlap
/// of `overlap_secs`; `extra` settings on top. The process, its base URL
/// and its API.
async fn sweeping_projector<const N: usize>(
    rig: &Rig,
    overlap_secs: u64,
    extra: [(&str, &str); N],
) -> (ServiceProcess, String, bank_tests::Api) {
    let port = bank_tests::nats::free_port();
    let mut env = projector_env(rig);
    env.extend(
        [
            ("PROJECTOR_HTTP_ADDR", format!("127.0.0.1:{port}")),
            ("CORE_URL", rig.proxy.url()),
            ("PROJECTOR_MAX_DELIVERIES", "2".to_owned()),
            ("PROJECTOR_RETRY_BASE_MS", "50".to_owned()),
            ("PROJECTOR_RETRY_MAX_MS", "200".to_owned()),
            ("PROJECTOR_TAX_SWEEP_SECS", "1".to_owned()),
            ("PROJECTOR_TAX_SWEEP_OVERLAP_SECS", overlap_secs.to_string()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    env.extend(extra.map(|(k, v)| (k.to_owned(), v.to_owned())));
    let process = ServiceProcess::start("projector", env).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    bank_tests::procs::wait_ready(&base).await.unwrap();
    let api = bank_tests::Api::new(base.clone(), None);
    (process, base, api)
}

/// Waits until metric `name` of the service at `base` satisfies `ok`.
async fn until_metric(base: &str, name: &str, ok: impl Fn(f64) -> bool) {
    eventually(name, Duration::from_secs(30), || async {
        let n = bank_tests::metrics::metric(&bank_tests::metrics::scrape(base).await, name);
        if ok(n) { Ok(()) } else { Err(n.to_string()) }
    })
    .await;
}

/// Asserts that the history in the channel database at `db_url` equals
/// the core's ledger for `accounts` now (no waiting: see
/// [`history_equals_ledger`] for that).
async fn history_is_the_ledger_now(core: &bank_tests::Api, db_url: &str, accounts: &[String]) {
    let mismatches = history_mismatches(core, db_url, accounts).await.unwrap();
    assert!(mismatches.is_empty(), "{mismatches:?}");
}

async fn history_equals_ledger(rig: &Rig, accounts: &[String]) {
    eventually(
        "history equals ledger for every account",
        Duration::from_secs(60),
        || async {
            let m = history_mismatches(&rig.core.api, &rig.channel_db, accounts)
                .await
                .map_err(|e| e.to_string())?;
            if m.is_empty() {
                Ok(())
            } else {
                Err(format!("{m:?}"))
            }
        },
    )
    .await;
}

fn projector_env(rig: &Rig) -> HashMap<String, String> {
    HashMap::from([
        ("CHANNEL_DATABASE_URL".to_owned(), rig.channel_db.clone()),
        ("CORE_URL".to_owned(), rig.core.api.base.clone()),
        ("CORE_API_TOKEN".to_owned(), CORE_READ_TOKEN.to_owned()),
        ("NATS_URL".to_owned(), rig.nats.url()),
        ("PROJECTOR_HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("DATABASE_MAX_CONNECTIONS".to_owned(), "4".to_owned()),
        // A killed instance's unacknowledged messages go to the next one
        // after the ack wait (60 s by default).
        ("PROJECTOR_ACK_WAIT_SECS".to_owned(), "5".to_owned()),
    ])
}

/// B29 for the projector: SIGTERM while a batch is in hand (its apply
/// waiting on a row lock). The process exits 0 after handing the batch back
/// (naked, not acked), and the next process applies it: nothing acked
/// unapplied, nothing lost.
#[tokio::test]
async fn b29_the_projector_hands_back_its_batch_in_hand_at_sigterm_and_exits_zero() {
    let rig = Rig::new().await;
    let account = rig.core.api.funded_account(1_000).await;
    let mut env = projector_env(&rig);
    // The apply waits 3 s for the lock, then fails (transient: naked).
    env.insert("DATABASE_LOCK_TIMEOUT_MS".to_owned(), "3000".to_owned());
    let port = bank_tests::nats::free_port();
    env.insert(
        "PROJECTOR_HTTP_ADDR".to_owned(),
        format!("127.0.0.1:{port}"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let mut projector = ServiceProcess::start("projector", env.clone()).unwrap();
    bank_tests::procs::wait_ready(&base).await.unwrap();
    rig.wait_synced(&account, 1, Duration::from_secs(30)).await;
    let lock = bank_tests::db::RowLock::history_sync(&rig.channel_db, &account)
        .await
        .unwrap();
    rig.core.api.deposit(&account, 5).await.expect(200);
    lock.until_waited_on("the projector's apply").await;
    projector.terminate_cleanly().await.unwrap();
    lock.release().await.unwrap();
    assert_eq!(rig.synced(&account).await, 1, "nothing applied meanwhile");
    // Handed back, not acked: the next process gets it again and applies it.
    let mut again = ServiceProcess::start("projector", env).unwrap();
    rig.wait_synced(&account, 2, Duration::from_secs(30)).await;
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
    again.terminate_cleanly().await.unwrap();
}

/// F7 for the projector, killed (SIGKILL) with a batch provably in hand:
/// its apply's transaction is waiting on a row lock when the process dies.
/// The transaction never commits, the message was never acked, and the
/// next process applies it once, after the ack wait.
#[tokio::test]
async fn f7_a_projector_killed_with_its_apply_in_flight_loses_and_repeats_nothing() {
    let rig = Rig::new().await;
    let account = rig.core.api.funded_account(1_000).await;
    let mut env = projector_env(&rig);
    let port = bank_tests::nats::free_port();
    env.insert(
        "PROJECTOR_HTTP_ADDR".to_owned(),
        format!("127.0.0.1:{port}"),
    );
    let mut projector = ServiceProcess::start("projector", env).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    bank_tests::procs::wait_ready(&base).await.unwrap();
    rig.wait_synced(&account, 1, Duration::from_secs(30)).await;
    let lock = bank_tests::db::RowLock::history_sync(&rig.channel_db, &account)
        .await
        .unwrap();
    rig.core.api.deposit(&account, 5).await.expect(200);
    lock.until_waited_on("the projector's apply").await;
    projector.kill().await;
    // The dead process's transaction goes on once the lock is free, and
    // rolls back when it finds its client gone.
    lock.release().await.unwrap();
    assert_eq!(rig.synced(&account).await, 1, "nothing applied meanwhile");
    projector.restart().unwrap();
    rig.wait_synced(&account, 2, Duration::from_secs(30)).await;
    rig.core.api.deposit(&account, 7).await.expect(200);
    rig.wait_synced(&account, 3, Duration::from_secs(30)).await;
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
    let letters = stream_messages(&rig.nats.jetstream().await.unwrap(), "DLQ")
        .await
        .unwrap();
    assert!(letters.is_empty(), "{} dead letters", letters.len());
    projector.terminate_cleanly().await.unwrap();
}

#[tokio::test]
async fn f7_projector_killed_repeatedly_and_two_instances_keep_history_equal_to_ledger() {
    let rig = Rig::new().await;
    let mut accounts = Vec::new();
    for _ in 0..8 {
        accounts.push(rig.core.api.funded_account(1_000_000).await);
    }
    let mut projector = ServiceProcess::start("projector", projector_env(&rig)).unwrap();
    let stop = common::shutdown::CancellationToken::new();
    let load = {
        let api = rig.core.api.clone();
        let accounts = accounts.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let r = api
                    .core_transfer(&accounts[i % 8], &accounts[(i * 5 + 3) % 8], 1 + i as u64)
                    .await;
                assert!(
                    r.status == 200 || r.code() == Some("same_account"),
                    "{}",
                    r.body
                );
                i += 1;
            }
            i
        })
    };
    // Kill it (SIGKILL) five times while the transfers flow, each time once
    // the instance (the first, or the one restarted after the last kill)
    // has applied entries of its own.
    let projected = || async {
        bank_tests::db::query_strings(
            &rig.channel_db,
            "SELECT count(*)::text FROM history_entries",
        )
        .await
        .map_err(|e| e.to_string())
        .and_then(|v| v[0].parse::<u64>().map_err(|e| e.to_string()))
    };
    let mut before = projected().await.unwrap_or(0);
    for kill in 0..5 {
        before = eventually(
            &format!("the instance before kill {kill} applies entries"),
            Duration::from_secs(30),
            || async {
                match projected().await? {
                    n if n > before => Ok(n),
                    n => Err(format!("{n} entries projected")),
                }
            },
        )
        .await;
        assert!(!load.is_finished(), "the load is still running");
        projector.kill().await;
        projector.restart().unwrap();
    }
    stop.cancel();
    let sent = load.await.unwrap();
    assert!(sent > 0);
    history_equals_ledger(&rig, &accounts).await;

    // Two instances on the same durable consumer.
    let mut second = ServiceProcess::start("projector", projector_env(&rig)).unwrap();
    let transfers = (0..300usize).map(|i| {
        rig.core
            .api
            .core_transfer(&accounts[(i * 3) % 8], &accounts[(i + 1) % 8], 7)
    });
    for r in futures::future::join_all(transfers).await {
        r.expect(200);
    }
    history_equals_ledger(&rig, &accounts).await;
    projector.kill().await;
    second.kill().await;
}

#[tokio::test]
async fn f5_poison_redelivered_after_the_broker_forgot_its_termination_is_not_lettered_twice() {
    let rig = Rig::new().await;
    // Every publish on the dead-letter subjects, including any that
    // JetStream's duplicate window would drop from the stream.
    let watcher = async_nats::connect(rig.nats.url()).await.unwrap();
    let mut published = watcher.subscribe("bank.dlq.>").await.unwrap();
    watcher.flush().await.unwrap();

    let mut p = rig.projector(ProjectorOptions::default()).await;
    let victim = rig.core.api.funded_account(100).await;
    rig.wait_synced(&victim, 1, Duration::from_secs(10)).await;
    publish_raw(
        &rig.nats,
        &format!("bank.ledger.{victim}"),
        br#"{"not": "a ledger entry"}"#.to_vec(),
    )
    .await;
    eventually(
        "the poison is lettered",
        Duration::from_secs(10),
        || async {
            match dead_letters(&p).await.len() {
                1 => Ok(()),
                n => Err(format!("{n} letters")),
            }
        },
    )
    .await;
    p.stop().await.unwrap();

    // The broker forgets the consumer's acknowledgements (as after a crash
    // that lost its state): everything in LEDGER is delivered again.
    let js = rig.nats.jetstream().await.unwrap();
    let consumer = p.config.ledger_consumer.clone();
    js.delete_consumer_from_stream(&consumer, "LEDGER")
        .await
        .unwrap();
    let p = rig.projector(ProjectorOptions::default()).await;
    eventually(
        "the redelivered stream is handled",
        Duration::from_secs(20),
        || async {
            let info = ledger_consumer_info(&js, &consumer).await?;
            if info.num_pending == 0
                && info.num_ack_pending == 0
                && info.delivered.stream_sequence > 0
            {
                Ok(())
            } else {
                Err(format!(
                    "{} pending, {} unacknowledged",
                    info.num_pending, info.num_ack_pending
                ))
            }
        },
    )
    .await;

    // Exactly one letter was ever published, and it is the only one kept.
    watcher.flush().await.unwrap();
    let mut seen = 0;
    while let Some(Some(_)) =
        futures::FutureExt::now_or_never(futures::StreamExt::next(&mut published))
    {
        seen += 1;
    }
    assert_eq!(seen, 1, "the redelivered poison was published to DLQ again");
    assert_eq!(dead_letters(&p).await.len(), 1);
    let metrics = bank_tests::metrics::scrape(&p.api.base).await;
    assert!(
        bank_tests::metrics::metric(&metrics, "projector_dead_letters_repeated_total") > 0.0,
        "the repeat is counted"
    );
    // The victim's history is intact and still moves.
    rig.core.api.deposit(&victim, 5).await.expect(200);
    rig.wait_synced(&victim, 2, Duration::from_secs(10)).await;
}

/// A stream deleted and created again numbers its messages from 1 again. A
/// poison message at a sequence number an earlier poison of the old stream
/// had is another message, and gets its own letter (the record of lettered
/// messages, and the letter's `Nats-Msg-Id`, hold when the stream stored it).
#[tokio::test]
async fn f5_a_poison_at_a_sequence_reused_by_a_recreated_stream_gets_its_own_letter() {
    let rig = Rig::new().await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    let victim = rig.core.api.funded_account(100).await;
    rig.wait_synced(&victim, 1, Duration::from_secs(10)).await;
    let subject = format!("bank.ledger.{victim}");
    publish_raw(
        &rig.nats,
        &subject,
        br#"{"not": "a ledger entry"}"#.to_vec(),
    )
    .await;
    let first = eventually(
        "the poison is lettered",
        Duration::from_secs(10),
        || async {
            match dead_letters(&p).await.as_slice() {
                [one] => Ok(one.clone()),
                other => Err(format!("{} letters", other.len())),
            }
        },
    )
    .await;
    let seq = first["stream_seq"].as_u64().unwrap();
    let (_, entry) = rig.wait_published(&victim, 1).await.remove(0);
    p.stop().await.unwrap();

    // The operator deletes LEDGER and creates it again, then the same
    // sequence number comes round with another bad message.
    let js = rig.nats.jetstream().await.unwrap();
    let mut stream = js.get_stream("LEDGER").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    js.delete_stream("LEDGER").await.unwrap();
    js.create_stream(config).await.unwrap();
    let mut stored = 0;
    while stored + 1 < seq {
        // Copies of the victim's first entry: duplicates, applied once.
        let ack = js
            .publish(subject.clone(), entry.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
        stored = ack.sequence;
    }
    let ack = js
        .publish(
            subject.clone(),
            br#"{"still": "not a ledger entry"}"#.to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        ack.sequence, seq,
        "the second poison reuses the first one's sequence"
    );

    let p = rig.projector(ProjectorOptions::default()).await;
    let letters = eventually(
        "the second poison is lettered",
        Duration::from_secs(10),
        || async {
            match dead_letters(&p).await {
                l if l.len() == 2 => Ok(l),
                l => Err(format!("{} letters", l.len())),
            }
        },
    )
    .await;
    let bodies: Vec<&str> = letters.iter().filter_map(|l| l["body"].as_str()).collect();
    assert!(bodies.iter().any(|b| b.contains("still")), "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|l| l["stream_seq"].as_u64() == Some(seq))
    );
}

/// Pays interest on `account` after moving the core's clock `days` ahead.
async fn pay_interest(rig: &Rig, account: &str, days: i64) -> String {
    rig.core.api.advance_business_date(days).await;
    let pid = unique("pay_");
    pay_out(rig, account, &pid).await;
    pid
}

/// Pays the accrued interest of `account` as payout `pid`; the core's answer.
async fn pay_out(rig: &Rig, account: &str, pid: &str) -> Value {
    rig.core
        .api
        .post(
            &format!("/v1/accounts/{account}/interest/payouts"),
            json!({"payout_id": pid}),
        )
        .await
        .expect(200)
        .body
}

#[tokio::test]
async fn f7_a_channel_database_outage_pauses_the_projector_and_dead_letters_nothing() {
    let rig = Rig::new().await;
    let cut = TcpCut::before(&rig.channel_db, 5432).await.unwrap();
    // A delivery budget an outage of a few seconds would spend many times over.
    let p = rig
        .projector_on(
            &cut.route(&rig.channel_db).unwrap(),
            ProjectorOptions {
                max_deliveries: 2,
                retry_base_ms: 50,
                retry_max_ms: 200,
                // What the paused subscription had been sent comes back soon.
                ack_wait_secs: 6,
                ..ProjectorOptions::default()
            },
        )
        .await;
    let mut accounts = Vec::new();
    for _ in 0..6 {
        accounts.push(rig.core.api.funded_account(60_000_000).await);
    }
    for a in &accounts {
        rig.wait_synced(a, 1, Duration::from_secs(10)).await;
    }

    cut.cut();
    for (i, a) in accounts.iter().enumerate() {
        rig.core.api.deposit(a, 10 + i as u64).await.expect(200);
    }
    let payout = pay_interest(&rig, &accounts[0], 3).await;
    // The events reached the projector and it kept failing to reach its
    // database: it went on trying to connect long after the old two-delivery
    // budget would have been spent.
    let js = rig.nats.jetstream().await.unwrap();
    eventually(
        "the projector received the events and kept probing its database",
        Duration::from_secs(30),
        || async {
            let info = ledger_consumer_info(&js, "projector-ledger").await?;
            let pending = info.num_ack_pending + info.num_pending as usize;
            // Six deposits and the interest credit.
            if pending >= 7 && cut.refused() >= 8 {
                Ok(())
            } else {
                Err(format!(
                    "{pending} pending, {} connections refused",
                    cut.refused()
                ))
            }
        },
    )
    .await;
    assert!(
        dead_letters(&p).await.is_empty(),
        "nothing dead-lettered during the outage"
    );
    // Its API says the database is away, in the error format.
    let r = p
        .api
        .get(&format!("/v1/tax-records?account_id={}", accounts[0]))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (503, Some("unavailable")),
        "{}",
        r.body
    );

    cut.restore();
    history_equals_ledger(&rig, &accounts).await;
    let records = eventually("the tax record", Duration::from_secs(30), || async {
        let r = p
            .api
            .get(&format!("/v1/tax-records?account_id={}", accounts[0]))
            .await
            .body;
        let list = r["tax_records"].as_array().cloned().unwrap_or_default();
        if list.len() == 1 {
            Ok(list)
        } else {
            Err(r.to_string())
        }
    })
    .await;
    assert_eq!(records[0]["payout_id"], json!(payout));
    assert!(
        dead_letters(&p).await.is_empty(),
        "nothing dead-lettered after it"
    );

    // Once it answers again, consuming goes on as before: later events, in
    // the lanes that were handed back, are applied without another pause.
    let pauses = || async {
        bank_tests::metrics::metric(
            &bank_tests::metrics::scrape(&p.api.base).await,
            "projector_database_pauses_total{feed=\"ledger\"",
        )
    };
    let paused = pauses().await;
    assert!(paused >= 1.0, "the outage paused the ledger consumer");
    for round in 0..3 {
        for a in &accounts {
            rig.core.api.deposit(a, 100 + round).await.expect(200);
        }
    }
    history_equals_ledger(&rig, &accounts).await;
    assert_eq!(pauses().await, paused, "paused again after the outage");
    let raw = stream_messages(&js, "DLQ").await.unwrap();
    assert!(raw.is_empty(), "{} messages in DLQ", raw.len());
}

#[tokio::test]
async fn f5_an_entry_the_channel_database_refuses_is_dead_lettered_alone_and_at_once() {
    let rig = Rig::new().await;
    // Everything is published before the projector starts, so the forged
    // entry arrives in one batch with the others (and shares a lane with
    // some of them).
    let victim = rig.core.api.funded_account(100).await;
    let mut bystanders = Vec::new();
    for _ in 0..12 {
        bystanders.push(rig.core.api.funded_account(100).await);
    }
    let first = rig.wait_published(&victim, 1).await.remove(0).1;
    // The victim's next entry, as it would pass every check of the event
    // and of the balances, with a memo PostgreSQL cannot store (a NUL).
    let mut forged: Value = serde_json::from_slice(&forged(&first, 2, 100, 200)).unwrap();
    forged["memo"] = json!("bad\u{0}memo");
    publish_raw(
        &rig.nats,
        &format!("bank.ledger.{victim}"),
        serde_json::to_vec(&forged).unwrap(),
    )
    .await;
    for b in &bystanders {
        rig.core.api.deposit(b, 5).await.expect(200);
    }
    let p = rig.projector(ProjectorOptions::default()).await;
    for b in &bystanders {
        rig.wait_synced(b, 2, Duration::from_secs(15)).await;
    }
    let letters = eventually(
        "the forged entry dead-lettered",
        Duration::from_secs(15),
        || async {
            let l = dead_letters(&p).await;
            if l.is_empty() {
                Err("no letter".to_owned())
            } else {
                Ok(l)
            }
        },
    )
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        letters[0]["subject"],
        json!(format!("bank.ledger.{victim}"))
    );
    assert_eq!(letters[0]["deliveries"], 1, "refused data is not retried");
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .contains("channel database"),
        "{}",
        letters[0]
    );
    assert_eq!(rig.synced(&victim).await, 1);
    // The victim's real next entry is applied.
    rig.core.api.deposit(&victim, 7).await.expect(200);
    rig.wait_synced(&victim, 2, Duration::from_secs(15)).await;
    let mut all = bystanders.clone();
    all.push(victim);
    history_equals_ledger(&rig, &all).await;
}

/// `entry` with other values at `seq`: what a corrupt or forged message on
/// the broker would carry.
fn forged(entry: &Value, seq: i64, amount: i64, balance_after: i64) -> Vec<u8> {
    let account = entry["account_id"].as_str().unwrap();
    let mut f = entry.clone();
    f["seq"] = json!(seq);
    f["event_id"] = json!(format!("{account}:{seq}"));
    let money = |n: i64| {
        if entry["amount"].is_string() {
            json!(n.to_string())
        } else {
            json!(n)
        }
    };
    f["amount"] = money(amount);
    f["balance_after"] = money(balance_after);
    serde_json::to_vec(&f).unwrap()
}

async fn wait_letters(p: &impl ProjectorApi, n: usize) -> Vec<Value> {
    eventually(
        &format!("{n} dead letters"),
        Duration::from_secs(30),
        || async {
            let l = dead_letters(p).await;
            if l.len() == n {
                Ok(l)
            } else {
                Err(format!("{l:?}"))
            }
        },
    )
    .await
}

#[tokio::test]
async fn b15_an_event_that_is_not_the_cores_never_stays_in_the_history() {
    let rig = Rig::new().await;
    let p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(100).await;
    rig.wait_synced(&account, 1, Duration::from_secs(10)).await;
    let first = rig.wait_published(&account, 1).await.remove(0).1;
    let subject = format!("bank.ledger.{account}");

    // 1. A forged seq 2 that continues the balances arrives before the
    //    core's: it is applied. The core's seq 2 then conflicts with it, the
    //    core says which is right, and the history is repaired.
    publish_raw(&rig.nats, &subject, forged(&first, 2, 1_000, 1_100)).await;
    rig.wait_synced(&account, 2, Duration::from_secs(10)).await;
    rig.core.api.deposit(&account, 5).await.expect(200);
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
    let history = channel_history(&rig.channel_db, &account).await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");

    // 2. A forged seq 2 after the core's: dead-lettered at once, alone.
    publish_raw(&rig.nats, &subject, forged(&first, 2, 7, 107)).await;
    let letters = wait_letters(&p, 1).await;
    assert_eq!(letters[0]["deliveries"], 1, "{}", letters[0]);
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .contains("differs from the core's ledger"),
        "{}",
        letters[0]
    );

    // 3. A seq 3 that does not continue the balances is never written; the
    //    core's seq 3 is, and the forged one ends in the dead-letter stream.
    publish_raw(&rig.nats, &subject, forged(&first, 3, 7, 999_999)).await;
    rig.core.api.deposit(&account, 9).await.expect(200);
    wait_letters(&p, 2).await;
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
    assert_eq!(rig.synced(&account).await, 3);
}

/// `projector rebuild` (for a lost or damaged channel database) brings every
/// account's history to the core's ledger, paging through the core's
/// accounts; with `--reset` it replaces a damaged history, but only once
/// the core has answered for the account: a reset while the core cannot be
/// read leaves the history as it was, and the account is reported failed.
#[tokio::test]
async fn b19_rebuild_brings_every_history_to_the_ledger_and_a_reset_needs_the_core() {
    let rig = Rig::new().await;
    let a = rig.core.api.funded_account(100).await;
    let b = rig.core.api.funded_account(200).await;
    rig.core.api.deposit(&b, 5).await.expect(200);
    // What the command runs with: a fresh channel database, the core
    // through the proxy.
    let url = bank_tests::db::fresh_database("rebuild").await.unwrap();
    let config = ProjectorOptions::default().config(&rig.nats, &rig.proxy.url(), &url);
    let (ctx, _nats) = projector::app::context(&config).await.unwrap();
    let (db, core) = (ctx.db, ctx.core);
    let accounts = [a.clone(), b.clone()];
    // Every account, from nothing.
    let report = projector::rebuild::rebuild(&db, &core, None, false)
        .await
        .unwrap();
    assert_eq!((report.accounts, report.applied), (2, 3));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    history_is_the_ledger_now(&rig.core.api, &url, &accounts).await;
    // A damaged history (an entry the core never made, continuing the
    // balances) is replaced with --reset.
    let id = common::AccountId::parse(b.clone()).unwrap();
    assert_eq!(
        writer::apply(&db, &[entry(&id, 3, 7, 212)])
            .await
            .unwrap()
            .applied,
        1
    );
    let report = projector::rebuild::rebuild(&db, &core, Some(id), true)
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    history_is_the_ledger_now(&rig.core.api, &url, &accounts).await;
    // With the core's entries unreadable, a reset deletes nothing.
    rig.proxy.add(None, "/entries", Action::Fail(503), None);
    let report = projector::rebuild::rebuild(
        &db,
        &core,
        Some(common::AccountId::parse(a.clone()).unwrap()),
        true,
    )
    .await
    .unwrap();
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert!(
        report.failed[0].1.contains("not reset"),
        "{:?}",
        report.failed
    );
    assert_eq!(channel_history(&url, &a).await.unwrap().len(), 1);
}

/// Two repairs of one account may race: the second must not cut the core's
/// entry the first fetched back. The cut is decided under the writer's lock.
#[tokio::test]
async fn b15_a_late_repair_never_cuts_the_cores_entry_another_repair_fetched_back() {
    use sea_orm::Database;
    use sea_orm_migration::MigratorTrait;
    let url = bank_tests::db::fresh_database("repair").await.unwrap();
    let db = Database::connect(url.as_str()).await.unwrap();
    transfer::migration::Migrator::up(&db, None).await.unwrap();
    let account = common::AccountId::generate();
    // A forged seq 2 that continues the balances is held.
    writer::apply(
        &db,
        &[
            entry(&account, 1, 100, 100),
            entry(&account, 2, 1_000, 1_100),
        ],
    )
    .await
    .unwrap();
    let cores = entry(&account, 2, 7, 107);
    // The first repair cuts it, and the core's seq 2 is fetched back.
    assert!(
        writer::truncate_from(&db, &account, 2, Some(&cores))
            .await
            .unwrap()
    );
    assert_eq!(
        writer::apply(&db, std::slice::from_ref(&cores))
            .await
            .unwrap()
            .applied,
        1
    );
    // The second repair, which saw the forged entry before, cuts nothing.
    assert!(
        !writer::truncate_from(&db, &account, 2, Some(&cores))
            .await
            .unwrap()
    );
    // Nor does one for a seq the history does not hold.
    assert!(!writer::truncate_from(&db, &account, 5, None).await.unwrap());
    let held = bank_tests::db::query_strings(
        &url,
        &format!("SELECT seq::text || ':' || balance_after::text FROM history_entries WHERE account_id = '{account}' ORDER BY seq"),
    )
    .await
    .unwrap();
    assert_eq!(held, ["1:100", "2:107"]);
    assert_eq!(writer::synced_through(&db, &account).await.unwrap(), 2);
}

#[tokio::test]
async fn b15_a_writer_that_waited_for_another_checks_the_balance_the_other_left() {
    use sea_orm::{ConnectionTrait, Database, Statement, TransactionTrait};
    use sea_orm_migration::MigratorTrait;
    let url = bank_tests::db::fresh_database("writer").await.unwrap();
    let db = Database::connect(url.as_str()).await.unwrap();
    transfer::migration::Migrator::up(&db, None).await.unwrap();
    let account = common::AccountId::generate();
    writer::apply(&db, &[entry(&account, 1, 100, 100)])
        .await
        .unwrap();

    // Another writer (a second projector, a customer's sync) holds the
    // account and adds a seq (50 won more) while this writer waits for the
    // lock with the next seq, which does not (999) or does (210) continue it.
    for (held_seq, given, continues) in [(2, 999, false), (3, 210, true)] {
        let other = db.begin().await.unwrap();
        other
            .execute_raw(Statement::from_sql_and_values(
                other.get_database_backend(),
                "SELECT 1 FROM history_sync WHERE account_id = $1 FOR UPDATE",
                [account.to_string().into()],
            ))
            .await
            .unwrap();
        let balance: i64 = 100 + 50 * (held_seq - 1);
        other
            .execute_raw(Statement::from_sql_and_values(
                other.get_database_backend(),
                "INSERT INTO history_entries (account_id, seq, kind, amount, balance_after, occurred_at, business_date) \
                 VALUES ($1, $2, 'deposit', 50, $3, now(), current_date)",
                [account.to_string().into(), held_seq.into(), balance.into()],
            ))
            .await
            .unwrap();
        other
            .execute_raw(Statement::from_sql_and_values(
                other.get_database_backend(),
                "UPDATE history_sync SET synced_through_seq = $2 WHERE account_id = $1",
                [account.to_string().into(), held_seq.into()],
            ))
            .await
            .unwrap();
        let waiting = {
            let db = db.clone();
            let e = entry(&account, held_seq + 1, 10, given);
            tokio::spawn(async move { writer::apply(&db, &[e]).await })
        };
        eventually(
            "the writer waits for the lock",
            Duration::from_secs(10),
            || async {
                let n = bank_tests::db::query_strings(
                    &url,
                    "SELECT count(*)::text FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .await
                .map_err(|e| e.to_string())?;
                if n.first().map(String::as_str) == Some("1") {
                    Ok(())
                } else {
                    Err(format!("{n:?} waiting"))
                }
            },
        )
        .await;
        other.commit().await.unwrap();
        let report = waiting.await.unwrap().unwrap();
        if continues {
            assert_eq!(report.applied, 1, "{report:?}");
        } else {
            assert_eq!(report.applied, 0, "{report:?}");
            assert!(
                report.gaps.first().is_some_and(|g| g.discontinuous),
                "{report:?}"
            );
        }
    }
    let held = bank_tests::db::query_strings(
        &url,
        &format!("SELECT seq::text || ':' || balance_after::text FROM history_entries WHERE account_id = '{account}' ORDER BY seq"),
    )
    .await
    .unwrap();
    assert_eq!(held, ["1:100", "2:150", "3:200", "4:210"]);
}

#[tokio::test]
async fn b15_a_wrong_last_entry_is_repaired_when_the_cores_next_entry_does_not_continue_it() {
    let rig = Rig::new().await;
    let mut p = rig.projector(ProjectorOptions::default()).await;
    let account = rig.core.api.funded_account(100).await;
    rig.wait_synced(&account, 1, Duration::from_secs(10)).await;
    p.stop().await.unwrap();
    let first = rig.wait_published(&account, 1).await.remove(0).1;
    let subject = format!("bank.ledger.{account}");
    // The core's seq 2 is lost from the stream; a forged seq 2 that
    // continues the balances takes its place; then the core's seq 3.
    rig.core.api.deposit(&account, 5).await.expect(200);
    let msgs = rig.wait_published(&account, 2).await;
    let js = rig.nats.jetstream().await.unwrap();
    js.get_stream("LEDGER")
        .await
        .unwrap()
        .delete_message(msgs[1].0)
        .await
        .unwrap();
    publish_raw(&rig.nats, &subject, forged(&first, 2, 1_000, 1_100)).await;
    rig.core.api.deposit(&account, 9).await.expect(200);
    // The forged seq 2 and the core's seq 3.
    rig.wait_published(&account, 3).await;
    let _p = rig.projector(ProjectorOptions::default()).await;
    history_equals_ledger(&rig, std::slice::from_ref(&account)).await;
    assert_eq!(rig.synced(&account).await, 3);
}
