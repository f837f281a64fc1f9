//! Operations: B28 (one trace per transfer, metrics, health), B29
//! (graceful shutdown on SIGTERM), B30 (no empty credentials) and the
//! reconciler's metrics (B13), against the real binaries.

use std::collections::HashMap;
use std::time::Duration;

use bank_tests::apps::customer_token;
use bank_tests::client::transfer_body;
use bank_tests::db::RowLock;
use bank_tests::metrics::{metric, scrape};
use bank_tests::otlp::OtlpReceiver;
use bank_tests::process::{ServiceProcess, run_to_exit};
use bank_tests::procs::{ProcStack, wait_ready};
use bank_tests::proxy::{Action, FaultProxy};
use bank_tests::verify::history_mismatches;
use bank_tests::{Api, NatsServer, eventually, unique};
use sea_orm::{ConnectionTrait, Database};
use serde_json::json;

#[tokio::test]
async fn b28_one_transfer_is_one_trace_across_three_services_and_metrics_move() {
    let otlp = OtlpReceiver::start().await.unwrap();
    let nats = NatsServer::start().await.unwrap();
    let env = HashMap::from([
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), otlp.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
    ]);
    let stack = ProcStack::start(&nats, env).await.unwrap();
    let core = stack.core_api();
    let customer = core.new_customer("Trace").await;
    let from = core.new_account(&customer).await;
    core.deposit(&from, 10_000).await.expect(200);
    let to = core.funded_account(0).await;
    let api = Api::new(stack.transfer_base(), Some(customer_token(&customer)));
    let before_core = scrape(&format!("http://{}", stack.cfg.core_url)).await;

    let r = api
        .post(
            "/v1/transfers",
            json!({"from_account": from, "to_account": to, "amount": "1234"}),
        )
        .await
        .expect(200);
    let transfer_id = r.str("transfer_id");
    eventually(
        "the projector applied the transfer",
        Duration::from_secs(20),
        || async {
            let h = api.get(&format!("/v1/accounts/{from}/history")).await.body;
            let projected = h["entries"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["transfer_id"] == json!(transfer_id)));
            if h["synced_through_seq"] == 2 && projected {
                Ok(())
            } else {
                Err(h.to_string())
            }
        },
    )
    .await;

    // The spans of this transfer: the transfer service's request, its call to
    // the core, the core's request, the relay's publish, the projector's apply.
    let spans = eventually(
        "spans from all three services in one trace",
        Duration::from_secs(30),
        || async {
            let spans = otlp.spans();
            let root = spans
                .iter()
                .find(|s| s.service == "transfer" && s.name == "POST /v1/transfers")
                .ok_or_else(|| {
                    format!(
                        "no transfer request span yet; have {:?}",
                        spans
                            .iter()
                            .map(|s| (&s.service, &s.name))
                            .take(30)
                            .collect::<Vec<_>>()
                    )
                })?;
            let trace: Vec<_> = spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .cloned()
                .collect();
            // Each service exports its spans in batches as they end, so wait
            // until every span this test checks has arrived.
            let wanted = [
                ("transfer", "POST /v1/transfers".to_owned()),
                ("transfer", "core transfer".to_owned()),
                ("core-bank", "POST /v1/transfers".to_owned()),
                ("core-bank", format!("publish bank.ledger.{from}")),
                ("projector", format!("apply bank.ledger.{from}")),
            ];
            let missing: Vec<_> = wanted
                .iter()
                .filter(|(service, name)| {
                    !trace
                        .iter()
                        .any(|s| s.service == *service && s.name == *name)
                })
                .collect();
            if missing.is_empty() {
                Ok(trace)
            } else {
                Err(format!("missing {missing:?}"))
            }
        },
    )
    .await;
    let by_id: HashMap<&str, &bank_tests::otlp::SpanRecord> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_of =
        |s: &bank_tests::otlp::SpanRecord| by_id.get(s.parent_span_id.as_str()).copied();
    let root = spans
        .iter()
        .find(|s| s.service == "transfer" && s.name == "POST /v1/transfers")
        .unwrap();
    assert!(
        root.parent_span_id.is_empty() || parent_of(root).is_none(),
        "the customer request starts the trace"
    );
    let call = spans
        .iter()
        .find(|s| s.service == "transfer" && s.name == "core transfer")
        .expect("core call span");
    assert_eq!(
        parent_of(call).map(|p| p.span_id.as_str()),
        Some(root.span_id.as_str())
    );
    let core_req = spans
        .iter()
        .find(|s| s.service == "core-bank" && s.name == "POST /v1/transfers")
        .expect("core request span");
    assert_eq!(
        core_req.parent_span_id, call.span_id,
        "the core continues the caller's trace"
    );
    let publish = spans
        .iter()
        .find(|s| s.service == "core-bank" && s.name == format!("publish bank.ledger.{from}"))
        .expect("relay publish span");
    assert_eq!(
        publish.parent_span_id, core_req.span_id,
        "the outbox row carried the trace context"
    );
    let apply = spans
        .iter()
        .find(|s| s.service == "projector" && s.name == format!("apply bank.ledger.{from}"))
        .expect("projector apply span");
    assert_eq!(
        apply.parent_span_id, publish.span_id,
        "the NATS traceparent header carried it on"
    );

    // Metrics of each service moved.
    let core_metrics = scrape(&format!("http://{}", stack.cfg.core_url)).await;
    assert!(
        metric(
            &core_metrics,
            "core_ledger_commands_total{result=\"succeeded\"}"
        ) > metric(
            &before_core,
            "core_ledger_commands_total{result=\"succeeded\"}"
        )
    );
    assert!(core_metrics.contains("http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/transfers\",status=\"200\""));
    let transfer_metrics = scrape(&stack.transfer_base()).await;
    assert!(
        metric(
            &transfer_metrics,
            "transfer_requests_total{result=\"succeeded\"}"
        ) >= 1.0
    );
    assert!(transfer_metrics.contains("core_call_duration_seconds_bucket"));
    // Three events reached the projector (the deposit and both legs). Some
    // may already have been written by the transfer service's on-demand sync
    // (B18), in which case the projector counts them as duplicates; lag is
    // recorded for each event the projector itself applied.
    let projector_metrics = eventually(
        "the projector counted the three ledger events",
        Duration::from_secs(15),
        || async {
            let m = scrape(&format!("http://{}", stack.cfg.projector_url)).await;
            let applied = metric(&m, "projector_events_applied_total");
            let duplicates = metric(&m, "projector_duplicates_total");
            let lagged = metric(&m, "projector_lag_seconds_count");
            if applied + duplicates >= 3.0 && applied >= 1.0 && lagged >= applied {
                Ok(m)
            } else {
                Err(format!(
                    "applied {applied}, duplicates {duplicates}, lag samples {lagged}"
                ))
            }
        },
    )
    .await;
    assert!(
        projector_metrics.contains("projector_lag_seconds_bucket{le=\"0.001\"}"),
        "lag histogram has explicit buckets"
    );
    eventually(
        "backlog, published and pending figures reported",
        Duration::from_secs(15),
        || async {
            let c = scrape(&format!("http://{}", stack.cfg.core_url)).await;
            let t = scrape(&stack.transfer_base()).await;
            // The relay counts a pass after its commit, so the counter may
            // trail the published events a little.
            if c.contains("outbox_backlog{service=\"core-bank\"} 0")
                && metric(&c, "outbox_published_total") >= 3.0
                && metric(&c, "outbox_relay_read_duration_seconds_count") >= 1.0
                && metric(&t, "outbox_relay_read_duration_seconds_count") >= 1.0
                && t.contains("pending_transfers 0")
            {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    )
    .await;
    for base in [
        format!("http://{}", stack.cfg.core_url),
        stack.transfer_base(),
        format!("http://{}", stack.cfg.projector_url),
    ] {
        for path in ["/healthz", "/readyz", "/openapi.json"] {
            assert_eq!(
                reqwest::get(format!("{base}{path}"))
                    .await
                    .unwrap()
                    .status(),
                200,
                "{base}{path}"
            );
        }
    }
}

/// Readiness follows the dependencies: every service answers `/readyz` 503
/// (naming the failed check, without the driver's text) while nats-server is
/// down, and 200 again once it is back; a dead letter shows in the
/// projector's metrics.
#[tokio::test]
async fn b28_readiness_follows_nats_and_a_dead_letter_is_counted() {
    let mut nats = NatsServer::start().await.unwrap();
    let stack = ProcStack::start(&nats, HashMap::new()).await.unwrap();
    let projector = format!("http://{}", stack.cfg.projector_url);
    let bases = [
        format!("http://{}", stack.cfg.core_url),
        stack.transfer_base(),
        projector.clone(),
    ];
    let dead_letters = || async {
        scrape(&projector)
            .await
            .lines()
            .filter(|l| l.starts_with("projector_dead_letters_total{"))
            .filter(|l| l.contains("stream=\"LEDGER\"") && l.contains("kind=\"permanent\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(dead_letters().await, 0.0);
    let js = nats.jetstream().await.unwrap();
    js.publish("bank.ledger.acc_poison", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(
        "the dead letter counted",
        Duration::from_secs(20),
        || async {
            match dead_letters().await {
                1.0 => Ok(()),
                n => Err(n.to_string()),
            }
        },
    )
    .await;

    let ready = |base: String| async move {
        let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().await.unwrap())
    };
    for base in &bases {
        assert_eq!(ready(base.clone()).await.0, 200, "{base}");
    }
    nats.stop().await;
    for base in &bases {
        let body = eventually(
            "not ready without NATS",
            Duration::from_secs(20),
            || async {
                match ready(base.clone()).await {
                    (503, body) => Ok(body),
                    (status, body) => Err(format!("{status} {body}")),
                }
            },
        )
        .await;
        assert_eq!(body["checks"]["nats"], "failed", "{base}: {body}");
        assert_eq!(body["checks"]["database"], "ok", "{base}: {body}");
    }
    nats.resume().await.unwrap();
    for base in &bases {
        eventually("ready again", Duration::from_secs(30), || async {
            match ready(base.clone()).await {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status} {body}")),
            }
        })
        .await;
    }
}

/// What hits the stack while customers send transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGTERM to each service in turn; each must exit 0.
    Sigterm,
    /// SIGKILL to each service in turn, as a crash.
    Sigkill,
    /// nats-server killed and started again, twice.
    NatsRestart,
}

/// Six customers send transfers in a loop through the real binaries while
/// `fault` hits the stack; after each hit the stack must make progress again.
/// Then: no transfer is left pending, money is conserved, every transfer the
/// core executed is known as succeeded by the channel (none twice), and the
/// channel history equals the core ledger.
async fn transfers_under_load_survive(fault: Fault) {
    let mut nats = NatsServer::start().await.unwrap();
    // A short TTL: transfers caught by a restart resolve quickly.
    let env = HashMap::from([("REQUEST_TTL_SECS".to_owned(), "5".to_owned())]);
    let mut stack = ProcStack::start(&nats, env).await.unwrap();
    let core = stack.core_api();
    let mut accounts = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let c = core.new_customer("Load").await;
        let a = core.new_account(&c).await;
        core.deposit(&a, 1_000_000).await.expect(200);
        clients.push(Api::new(stack.transfer_base(), Some(customer_token(&c))));
        accounts.push(a);
    }
    // Load: six customers sending in a loop; every answer is recorded.
    let stop = common::shutdown::CancellationToken::new();
    let mut load = Vec::new();
    for i in 0..6 {
        let (api, from, to, stop) = (
            clients[i].clone(),
            accounts[i].clone(),
            accounts[(i + 1) % 6].clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.is_cancelled() {
                let r = api
                    .try_send(
                        "POST",
                        "/v1/transfers",
                        Some(json!({"from_account": from, "to_account": to, "amount": "10"})),
                        &[],
                    )
                    .await;
                answers.push(r.map(|r| r.status).unwrap_or(0));
            }
            answers
        }));
    }
    // Entries on the first account: the load is moving money.
    let progress = || async {
        core.get(&format!("/v1/accounts/{}", accounts[0]))
            .await
            .body["last_seq"]
            .as_i64()
            .unwrap_or(0)
    };
    let progress_past = |before: i64| {
        let progress = &progress;
        async move {
            eventually(
                "transfers moving money",
                Duration::from_secs(60),
                || async {
                    let n = progress().await;
                    if n > before + 1 {
                        Ok(())
                    } else {
                        Err(n.to_string())
                    }
                },
            )
            .await;
        }
    };
    progress_past(0).await;
    let hits: &[&str] = match fault {
        Fault::NatsRestart => &["nats-server", "nats-server"],
        _ => &["projector", "transfer", "core-bank"],
    };
    for name in hits {
        let before = progress().await;
        let (p, base) = match *name {
            "core-bank" => (&mut stack.core, format!("http://{}", stack.cfg.core_url)),
            "transfer" => (
                &mut stack.transfer,
                format!("http://{}", stack.cfg.transfer_url),
            ),
            "projector" => (
                &mut stack.projector,
                format!("http://{}", stack.cfg.projector_url),
            ),
            _ => {
                nats.stop().await;
                // The outage is felt (the core reports NATS unready) and
                // money still moves: its events wait in the outboxes.
                let ready = format!("http://{}/readyz", stack.cfg.core_url);
                eventually(
                    "the core sees NATS down",
                    Duration::from_secs(30),
                    || async {
                        match reqwest::get(&ready).await.map(|r| r.status().as_u16()) {
                            Ok(200) => Err("still ready".to_owned()),
                            Ok(_) => Ok(()),
                            Err(e) => Err(e.to_string()),
                        }
                    },
                )
                .await;
                progress_past(before).await;
                nats.resume().await.unwrap();
                let during = progress().await;
                progress_past(during).await;
                continue;
            }
        };
        if fault == Fault::Sigterm {
            p.terminate_cleanly()
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            p.kill().await;
        }
        p.restart().unwrap();
        wait_ready(&base).await.unwrap();
        progress_past(before).await;
    }
    stop.cancel();
    let mut answers = Vec::new();
    for l in load {
        answers.extend(l.await.unwrap());
    }
    assert!(
        answers.iter().filter(|s| **s == 200).count() > 10,
        "the load ran: {answers:?}"
    );
    // Nothing lost: no transfer stays pending, money is conserved, the
    // history equals the ledger.
    let db_url = stack.cfg.channel_db.clone();
    bank_tests::db::until_rows(
        &db_url,
        "SELECT count(*)::text FROM transfer_requests WHERE status = 'pending'",
        &["0"],
        "no pending transfers",
        Duration::from_secs(90),
    )
    .await;
    let mut total = 0;
    for a in &accounts {
        total += core.balance(a).await;
    }
    assert_eq!(total, 6_000_000, "money conserved");
    let succeeded = bank_tests::db::query_strings(
        &db_url,
        "SELECT transfer_id FROM transfer_requests WHERE status = 'succeeded' ORDER BY 1",
    )
    .await
    .unwrap();
    let core_transfers = bank_tests::db::query_strings(
        &stack.cfg.core_db,
        "SELECT transfer_id FROM transfers WHERE status = 'succeeded' ORDER BY 1",
    )
    .await
    .unwrap();
    assert_eq!(
        succeeded, core_transfers,
        "every transfer the core executed is known as succeeded by the channel"
    );
    // Each executed transfer moved money once: two entries each.
    let entries = bank_tests::db::query_strings(
        &stack.cfg.core_db,
        "SELECT count(*)::text FROM ledger_entries WHERE transfer_id IS NOT NULL",
    )
    .await
    .unwrap();
    assert_eq!(entries, [(2 * core_transfers.len()).to_string()]);
    eventually("history equals ledger", Duration::from_secs(60), || async {
        let m = history_mismatches(&core, &db_url, &accounts)
            .await
            .map_err(|e| e.to_string())?;
        if m.is_empty() {
            Ok(())
        } else {
            Err(format!("{m:?}"))
        }
    })
    .await;
    // Every event reached its stream. The history alone could hide a lost
    // one: the projector fills a gap from the core (B15).
    let js = nats.jetstream().await.unwrap();
    let ledger_events = bank_tests::db::query_strings(
        &stack.cfg.core_db,
        "SELECT account_id || ':' || seq FROM ledger_entries",
    )
    .await
    .unwrap();
    stream_holds_exactly(&js, "LEDGER", ledger_events).await;
    let transfer_events = bank_tests::db::query_strings(
        &db_url,
        // A row of reason `not_stored` only takes the id of a transfer
        // never stored: no event names it.
        "SELECT transfer_id || ':requested' FROM transfer_requests WHERE reason IS DISTINCT FROM 'not_stored' \
         UNION ALL SELECT transfer_id || ':' || status FROM transfer_requests \
         WHERE status <> 'pending' AND reason IS DISTINCT FROM 'not_stored'",
    )
    .await
    .unwrap();
    stream_holds_exactly(&js, "TRANSFERS", transfer_events).await;
}

/// Waits until the event ids in `stream` are exactly `expected` (a copy
/// published twice is allowed: delivery is at least once).
async fn stream_holds_exactly(
    js: &async_nats::jetstream::Context,
    stream: &str,
    expected: Vec<String>,
) {
    let expected: std::collections::BTreeSet<String> = expected.into_iter().collect();
    assert!(!expected.is_empty(), "{stream}: nothing expected");
    eventually(
        &format!("{stream} holds every event"),
        Duration::from_secs(30),
        || async {
            let mut seen = std::collections::BTreeSet::new();
            for m in bank_tests::nats::stream_messages(js, stream)
                .await
                .map_err(|e| e.to_string())?
            {
                let body: serde_json::Value =
                    serde_json::from_slice(&m.payload).map_err(|e| e.to_string())?;
                let id = body["event_id"].as_str().ok_or("no event_id")?;
                seen.insert(id.to_owned());
            }
            let missing: Vec<_> = expected.difference(&seen).take(5).collect();
            let unknown: Vec<_> = seen.difference(&expected).take(5).collect();
            if missing.is_empty() && unknown.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} expected seen; missing (first 5) {missing:?}; not expected (first 5) {unknown:?}",
                    expected.intersection(&seen).count(),
                    expected.len()
                ))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn b29_sigterm_during_load_loses_nothing_and_each_service_exits_zero() {
    transfers_under_load_survive(Fault::Sigterm).await;
}

#[tokio::test]
async fn f7_core_transfer_and_projector_killed_mid_load_lose_and_create_nothing() {
    transfers_under_load_survive(Fault::Sigkill).await;
}

#[tokio::test]
async fn f7_nats_restarted_mid_load_loses_no_event_and_no_history_entry() {
    transfers_under_load_survive(Fault::NatsRestart).await;
}

/// NATS and the three services as processes, the transfer service reaching
/// the core through a fault proxy; `env` is added to every process's.
async fn proc_stack_behind_a_proxy<const N: usize>(
    env: [(&str, String); N],
) -> (NatsServer, FaultProxy, ProcStack) {
    let nats = NatsServer::start().await.unwrap();
    let core_addr = format!("127.0.0.1:{}", bank_tests::nats::free_port());
    let proxy = FaultProxy::start(&format!("http://{core_addr}"))
        .await
        .unwrap();
    let mut all = HashMap::from([
        ("CORE_HTTP_ADDR".to_owned(), core_addr),
        ("CORE_URL".to_owned(), proxy.url()),
    ]);
    all.extend(env.map(|(k, v)| (k.to_owned(), v)));
    let stack = ProcStack::start(&nats, all).await.unwrap();
    (nats, proxy, stack)
}

/// A new customer with two accounts, 1,000 won in the first, sends 10 won
/// from it to the other through the transfer service in the background,
/// the core's answer to it held back `delay` by the proxy: (from, to, the
/// request).
async fn transfer_with_the_answer_delayed(
    proxy: &FaultProxy,
    stack: &ProcStack,
    delay: Duration,
) -> (
    String,
    String,
    tokio::task::JoinHandle<Result<bank_tests::Reply, reqwest::Error>>,
) {
    let core = stack.core_api();
    let customer = core.new_customer("Delayed").await;
    let from = core.new_account(&customer).await;
    let to = core.new_account(&customer).await;
    core.deposit(&from, 1_000).await.expect(200);
    proxy.add(
        Some(reqwest::Method::POST),
        "/v1/transfers",
        Action::DelayResponse(delay),
        Some(1),
    );
    let api = Api::new(stack.transfer_base(), Some(customer_token(&customer)));
    let body = json!({"from_account": from, "to_account": to, "amount": "10"});
    let request =
        tokio::spawn(async move { api.try_send("POST", "/v1/transfers", Some(body), &[]).await });
    (from, to, request)
}

/// Sends SIGTERM to `process` and waits until nothing accepts connections
/// on `addr` any more (the listener closes at once; requests in flight go on).
async fn sigterm_until_the_listener_closes(process: &ServiceProcess, addr: &str) {
    bank_tests::process::signal(process.pid().unwrap(), "TERM").unwrap();
    eventually("the listener closed", Duration::from_secs(2), || async {
        match std::net::TcpStream::connect(addr) {
            Ok(_) => Err("open".to_owned()),
            Err(_) => Ok(()),
        }
    })
    .await;
}

/// B29: a request in flight when SIGTERM arrives is finished and answered;
/// the listener closes at once; the process exits 0 only after the answer.
/// For the transfer service the request waits on the core (its answer held
/// back by a proxy); for the core it waits on a row lock.
#[tokio::test]
async fn b29_a_request_in_flight_at_sigterm_is_answered_before_the_service_exits() {
    let (_nats, proxy, mut stack) =
        proc_stack_behind_a_proxy([("CORE_TIMEOUT_MS", "10000".to_owned())]).await;
    let core_addr = stack.cfg.core_url.clone();
    let core = stack.core_api();
    // The transfer service, waiting on the core's answer.
    let (from, to, request) =
        transfer_with_the_answer_delayed(&proxy, &stack, Duration::from_secs(3)).await;
    eventually(
        "the request at the core",
        Duration::from_secs(10),
        || async {
            if proxy.seen().iter().any(|(_, p, _)| p == "/v1/transfers") {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        },
    )
    .await;
    sigterm_until_the_listener_closes(&stack.transfer, &stack.cfg.transfer_url).await;
    assert!(!request.is_finished(), "the request was still in flight");
    let answer = request.await.unwrap().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    stack.transfer.terminate_cleanly().await.unwrap();
    assert_eq!(core.balance(&from).await, 990, "moved once");

    // The core, waiting on a row lock.
    let lock = RowLock::account(&stack.cfg.core_db, &from).await.unwrap();
    let request = tokio::spawn({
        let core = core.clone();
        let body = transfer_body(&unique("trf_"), &from, &to, 7);
        async move {
            core.try_send("POST", "/v1/transfers", Some(body), &[])
                .await
        }
    });
    lock.until_waited_on("the transfer waits on the lock").await;
    sigterm_until_the_listener_closes(&stack.core, &core_addr).await;
    assert!(!request.is_finished(), "the request was still in flight");
    lock.release().await.unwrap();
    let answer = request.await.unwrap().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    stack.core.terminate_cleanly().await.unwrap();
    stack.core.restart().unwrap();
    wait_ready(&format!("http://{core_addr}")).await.unwrap();
    assert_eq!(core.balance(&from).await, 983, "both moved once");
}

/// B29 for a transfer answered 202 at its deadline while its execution
/// still waits (here on a row lock to record the core's answer): at
/// SIGTERM the transfer service, with no request left in flight, waits for
/// that execution to record the outcome before it exits 0, instead of
/// leaving a transfer the core executed pending for the next process.
#[tokio::test]
async fn b29_the_transfer_service_finishes_executions_that_outlived_their_answers_before_exiting() {
    let core_timeout_ms = 5_000;
    let (_nats, proxy, mut stack) = proc_stack_behind_a_proxy([
        ("CORE_TIMEOUT_MS", core_timeout_ms.to_string()),
        // The least the service accepts: the core's wait, a fence call and
        // 2 s; the answer is due 2 s before it.
        (
            "HTTP_REQUEST_TIMEOUT_MS",
            (core_timeout_ms + 7_000).to_string(),
        ),
        ("DATABASE_LOCK_TIMEOUT_MS", "30000".to_owned()),
        // Only the execution records the outcome (the reconciler would
        // settle it from the core's status otherwise).
        ("RECONCILE_INTERVAL_MS", "3600000".to_owned()),
    ])
    .await;
    stack.transfer.kill().await;
    stack.transfer.restart_logged().unwrap();
    wait_ready(&stack.transfer_base()).await.unwrap();
    let core = stack.core_api();
    // The core's answer comes 3 s late (within the core timeout): time to
    // take the lock on the pending row before the answer is recorded.
    let (from, _, request) =
        transfer_with_the_answer_delayed(&proxy, &stack, Duration::from_secs(3)).await;
    let db = stack.cfg.channel_db.clone();
    let id = bank_tests::db::until_pending_transfer(&db).await;
    let lock = RowLock::channel_transfer(&db, &id).await.unwrap();
    lock.until_waited_on("recording the core's answer").await;
    let answer = request.await.unwrap().unwrap();
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.str("status"), "pending");

    sigterm_until_the_listener_closes(&stack.transfer, &stack.cfg.transfer_url).await;
    stack
        .transfer
        .until_logged(
            "waiting for transfer executions that outlived their answers",
            Duration::from_secs(10),
        )
        .await;
    lock.release().await.unwrap();
    stack.transfer.terminate_cleanly().await.unwrap();
    let status = bank_tests::db::query_strings(
        &db,
        &format!("SELECT status FROM transfer_requests WHERE transfer_id = '{id}'"),
    )
    .await
    .unwrap();
    assert_eq!(status, ["succeeded"], "recorded before the process exited");
    assert_eq!(core.balance(&from).await, 990, "moved once");
}

#[tokio::test]
async fn b30_a_service_given_an_empty_credential_refuses_to_start() {
    // An empty service token would match a request presenting an empty one,
    // and an empty signing key lets anyone sign customer tokens.
    let cases = [
        ("core-bank", "CORE_API_TOKEN"),
        ("core-bank", "CORE_READ_API_TOKEN"),
        ("transfer", "CORE_API_TOKEN"),
        ("transfer", "AUTH_JWT_SECRET"),
        ("projector", "CORE_API_TOKEN"),
        ("projector", "PROJECTOR_API_TOKEN"),
    ];
    for (service, setting) in cases {
        for value in ["", "  "] {
            let env = [
                (setting, value),
                // Were it to start, it would listen on a free port only.
                ("CORE_HTTP_ADDR", "127.0.0.1:0"),
                ("TRANSFER_HTTP_ADDR", "127.0.0.1:0"),
                ("PROJECTOR_HTTP_ADDR", "127.0.0.1:0"),
            ];
            let out = run_to_exit(service, &[], &env, Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("{service} with {setting}={value:?} started: {e}"));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{service} with {setting}={value:?} exited 0"
            );
            assert!(
                stderr.contains("must not be empty"),
                "{service} with {setting}={value:?}: {stderr}"
            );
        }
    }
}

/// Everything a finished command wrote, standard output then standard error.
fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A database URL the driver cannot use (one that does not parse, as a
/// password with an unescaped `#` makes it, or a mistyped scheme) stops the
/// service at start, naming the setting, without the password in anything
/// it prints: the driver's own message quotes the whole URL.
#[tokio::test]
async fn b30_a_database_url_the_driver_cannot_use_is_refused_without_showing_its_password() {
    let cases = [
        ("core-bank", "CORE_DATABASE_URL"),
        ("transfer", "CHANNEL_DATABASE_URL"),
        ("projector", "CHANNEL_DATABASE_URL"),
    ];
    for (service, setting) in cases {
        for url in [
            "postgres://bank:pw-db#secret@127.0.0.1:5432/x",
            "postgress://bank:pw-db-secret@127.0.0.1:5432/x",
        ] {
            let env = [
                (setting, url),
                ("CORE_HTTP_ADDR", "127.0.0.1:0"),
                ("TRANSFER_HTTP_ADDR", "127.0.0.1:0"),
                ("PROJECTOR_HTTP_ADDR", "127.0.0.1:0"),
            ];
            let out = run_to_exit(service, &[], &env, Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("{service} with {url}: {e}"));
            let printed = output_text(&out);
            assert!(!out.status.success(), "{service} with {url} exited 0");
            assert!(
                printed.contains(setting),
                "{service} names {setting}: {printed}"
            );
            assert!(
                !printed.contains("pw-db"),
                "{service} printed the password of {url}:\n{printed}"
            );
        }
    }
}

/// Credentials in `NATS_URL` are what the service authenticates with, and
/// they never reach its output, not even at debug level, where the NATS
/// client logs the server URL of every connection attempt.
#[tokio::test]
async fn b30_nats_credentials_in_the_url_authenticate_and_are_never_logged() {
    let nats = NatsServer::start_with_credentials("bank", "pw-nats-secret")
        .await
        .unwrap();
    let channel_db = bank_tests::db::fresh_database("nats_auth").await.unwrap();
    let with_credentials = nats.url().replace("nats://", "nats://bank:pw-nats-secret@");
    let env = [
        ("NATS_URL", with_credentials.as_str()),
        ("CHANNEL_DATABASE_URL", channel_db.as_str()),
        ("RUST_LOG", "debug"),
    ];
    let out = run_to_exit("projector", &["dlq", "list"], &env, Duration::from_secs(60))
        .await
        .unwrap();
    let printed = output_text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("0 dead letter(s)"), "{printed}");
    assert!(
        printed.contains("127.0.0.1"),
        "the debug output shows the server it connects to: {printed}"
    );
    assert!(
        !printed.contains("pw-nats-secret"),
        "the NATS password was printed:\n{printed}"
    );
}

/// `--help` shows each setting with the value the environment gives it,
/// except credentials and connection URLs (which may carry passwords).
#[tokio::test]
async fn b30_help_never_shows_a_credential_or_a_connection_urls_password() {
    let settings = [
        (
            "core-bank",
            "CORE_DATABASE_URL",
            "postgres://bank:pw-core-db@127.0.0.1/x",
        ),
        ("core-bank", "REDIS_URL", "redis://:pw-redis@127.0.0.1:6379"),
        ("core-bank", "CORE_API_TOKEN", "pw-core-token"),
        (
            "core-bank",
            "NATS_URL",
            "nats://bank:pw-nats@127.0.0.1:4222",
        ),
        (
            "transfer",
            "CHANNEL_DATABASE_URL",
            "postgres://bank:pw-channel@127.0.0.1/y",
        ),
        ("transfer", "AUTH_JWT_SECRET", "pw-jwt"),
        (
            "projector",
            "CHANNEL_DATABASE_URL",
            "postgres://bank:pw-proj@127.0.0.1/y",
        ),
        ("projector", "PROJECTOR_API_TOKEN", "pw-projector-token"),
    ];
    for service in ["core-bank", "transfer", "projector"] {
        let mut env = vec![("LEDGER_WORKERS", "3")];
        for (_, setting, value) in settings.iter().filter(|(s, _, _)| *s == service) {
            env.push((*setting, *value));
        }
        let out = run_to_exit(service, &["--help"], &env, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(out.status.success(), "{service} --help failed");
        let text = String::from_utf8_lossy(&out.stdout);
        for (_, setting, _) in settings.iter().filter(|(s, _, _)| *s == service) {
            assert!(text.contains(setting), "{service} --help lists {setting}");
        }
        assert!(
            !text.contains("pw-"),
            "{service} --help shows a secret:\n{text}"
        );
        if service == "core-bank" {
            // Other settings' values are shown, so the check above is not
            // passing for want of values.
            assert!(text.contains("LEDGER_WORKERS=3"), "{text}");
        }
    }
}

/// The reconciler's metrics (B13), from the running binary: what it resolved
/// and how, the pending gauges, and its failures while the core is down.
#[tokio::test]
async fn b13_the_reconcilers_actions_failures_and_pending_transfers_are_in_its_metrics() {
    let nats = NatsServer::start().await.unwrap();
    let env = HashMap::from([
        ("REQUEST_TTL_SECS".to_owned(), "2".to_owned()),
        ("RECONCILE_INTERVAL_MS".to_owned(), "200".to_owned()),
        ("RECONCILE_FENCE_MARGIN_MS".to_owned(), "500".to_owned()),
    ]);
    let mut stack = ProcStack::start(&nats, env).await.unwrap();
    let core = stack.core_api();
    let customer = core.new_customer("Reconciled").await;
    let from = core.new_account(&customer).await;
    core.deposit(&from, 10_000).await.expect(200);
    let to = core.funded_account(0).await;
    // Left pending by a "crash", both older than the fence: one the core
    // executed, one it never saw.
    let executed = unique("trf_");
    core.post(
        "/v1/transfers",
        bank_tests::client::transfer_body(&executed, &from, &to, 700),
    )
    .await
    .expect(200);
    let lost = unique("trf_");
    let channel = Database::connect(stack.cfg.channel_db.as_str())
        .await
        .unwrap();
    // One pending transfer per account at a time.
    let leave_pending = async |id: &str, from: &str, amount: u32| {
        channel
            .execute_unprepared(&format!(
                "INSERT INTO transfer_requests (transfer_id, customer_id, from_account, to_account, amount, status, requested_at) \
                 VALUES ('{id}', '{customer}', '{from}', '{to}', {amount}, 'pending', now() - interval '10 seconds')"
            ))
            .await
            .unwrap();
    };
    leave_pending(&executed, &from, 700).await;
    let lost_from = core.new_account(&customer).await;
    leave_pending(&lost, &lost_from, 100).await;
    let transfer = stack.transfer_base();
    eventually(
        "both resolutions counted, nothing pending",
        Duration::from_secs(20),
        || async {
            let m = scrape(&transfer).await;
            let found = metric(&m, "reconciler_actions_total{action=\"fenced_found\"}");
            let never = metric(
                &m,
                "reconciler_actions_total{action=\"fenced_never_received\"}",
            );
            if found == 1.0 && never == 1.0 && m.contains("\npending_transfers 0") {
                Ok(())
            } else {
                Err(format!(
                    "fenced_found {found}, fenced_never_received {never}"
                ))
            }
        },
    )
    .await;
    assert_eq!(
        metric(&scrape(&transfer).await, "reconciler_errors_total"),
        0.0
    );

    // With the core down, a pending transfer cannot be settled: the gauges
    // show it and every pass counts the failure.
    let stuck_from = core.new_account(&customer).await;
    stack.core.kill().await;
    let stuck = unique("trf_");
    leave_pending(&stuck, &stuck_from, 50).await;
    eventually(
        "the failure counted and the transfer shown pending",
        Duration::from_secs(20),
        || async {
            let m = scrape(&transfer).await;
            let errors = metric(&m, "reconciler_errors_total");
            let age = metric(&m, "pending_transfers_oldest_age_seconds");
            if errors >= 2.0 && m.contains("\npending_transfers 1") && age >= 10.0 {
                Ok(())
            } else {
                Err(format!("errors {errors}, oldest age {age}"))
            }
        },
    )
    .await;
}

/// A process that starts while another applies migrations (replicas, or the
/// transfer service and the projector sharing the channel database) waits for
/// them however long they take, not just `DATABASE_LOCK_TIMEOUT_MS`, and its
/// own migrations are not cut short by `DATABASE_STATEMENT_TIMEOUT_MS`, which
/// are the limits of requests.
#[tokio::test]
async fn a_service_starting_while_another_migrates_waits_past_its_lock_timeout_then_migrates() {
    use sea_orm::{Statement, TransactionTrait};
    let url = bank_tests::db::fresh_database("migrate").await.unwrap();
    // The other process, in the middle of its migrations.
    let holder = Database::connect(url.as_str()).await.unwrap();
    let other = holder.begin().await.unwrap();
    other
        .execute_raw(Statement::from_sql_and_values(
            other.get_database_backend(),
            "SELECT pg_advisory_xact_lock($1)",
            [common::db::MIGRATION_LOCK_KEY.into()],
        ))
        .await
        .unwrap();

    // Limits far below what the wait and the migrations take.
    let pool = common::config::PoolArgs {
        db_max_connections: 1,
        db_lock_timeout_ms: 50,
        db_statement_timeout_ms: 1,
    };
    let starting_url = url.clone();
    let starting = tokio::spawn(async move {
        common::db::migrate::<core_bank::migration::Migrator>(&starting_url, &pool, "starting")
            .await
    });
    let waited = "SELECT (extract(epoch FROM now() - query_start) * 1000)::int8::text \
                  FROM pg_stat_activity \
                  WHERE datname = current_database() AND wait_event = 'advisory'";
    eventually(
        "the starting process still waits for the lock 20 lock timeouts later",
        Duration::from_secs(20),
        || async {
            let ms = bank_tests::db::query_strings(&url, waited)
                .await
                .map_err(|e| e.to_string())?;
            match ms.first().and_then(|m| m.parse::<u64>().ok()) {
                Some(ms) if ms >= 20 * 50 => Ok(()),
                other => Err(format!("waited so far (ms): {other:?}")),
            }
        },
    )
    .await;
    assert!(!starting.is_finished(), "it gave up waiting");

    other.commit().await.unwrap();
    let migrated = tokio::time::timeout(Duration::from_secs(60), starting)
        .await
        .unwrap()
        .unwrap();
    assert!(migrated.is_ok(), "{migrated:?}");
    let accounts = bank_tests::db::query_strings(&url, "SELECT count(*)::text FROM accounts")
        .await
        .unwrap();
    assert_eq!(accounts, ["0"]);
}
