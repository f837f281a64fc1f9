//! `make chaos`: a seeded fault campaign over the running backbone.
//!
//! Starts its own nats-server and the three service binaries (fresh
//! databases on the local PostgreSQL), drives a steady load of transfers,
//! deposits and interest payouts, and meanwhile, on a schedule drawn from the
//! seed: SIGKILLs and restarts each service, restarts nats-server, SIGTERMs
//! services, delays and drops requests between the transfer service and the
//! core (through a fault proxy), holds an account's row lock past the lock
//! timeout, publishes poison messages and forged interest events, and loses
//! interest events and accounts' last ledger events (deleted from the stream
//! while the projector is down). Then it stops
//! the faults, waits for convergence, and checks the invariants, printing each
//! with its figure. Exits 1 if any check fails. Replay a run with `--seed`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bank_tests::apps::{CORE_READ_TOKEN, CORE_TOKEN, JWT_SECRET, customer_token};
use bank_tests::nats::{NatsServer, free_port, stream_messages};
use bank_tests::process::ServiceProcess;
use bank_tests::procs::wait_ready;
use bank_tests::proxy::{Action, FaultProxy};
use bank_tests::{Api, unique};
use clap::Parser;
use common::shutdown::CancellationToken;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
#[command(about = "Seeded fault campaign with invariant checks")]
struct Args {
    /// Duration of the fault phase in seconds.
    #[arg(long, default_value_t = 300)]
    secs: u64,
    /// Seed of the fault schedule and the load (random when absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Customers (each with one account) generating load.
    #[arg(long, default_value_t = 12)]
    customers: usize,
    /// Longest wait for convergence after the faults stop, in seconds.
    #[arg(long, default_value_t = 180)]
    converge_secs: u64,
}

/// What the clients know happened (only definitive answers count).
#[derive(Default)]
struct Ledgerbook {
    deposited: i128,
    interest_net: i128,
    transfer_ids: Vec<String>,
    /// Transfers a customer was told succeeded (200).
    told_succeeded: Vec<String>,
    /// Transfers a customer was told failed (422 naming the transfer).
    told_failed: Vec<String>,
}

struct Services {
    core: ServiceProcess,
    transfer: ServiceProcess,
    projector: ServiceProcess,
    core_url: String,
    transfer_url: String,
    projector_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    println!(
        "chaos: seed {seed} (replay with --seed {seed}), {} s of faults",
        args.secs
    );
    let ok = run(&args, seed).await?;
    if ok {
        println!("chaos: all invariants hold (seed {seed})");
        Ok(())
    } else {
        anyhow::bail!("chaos: invariants violated (seed {seed})")
    }
}

async fn run(args: &Args, seed: u64) -> anyhow::Result<bool> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nats = NatsServer::start().await?;
    println!(
        "chaos: nats-server {} with sync_interval: always",
        bank_tests::nats::version()?
    );
    let core_db = bank_tests::db::fresh_database("chaos_core").await?;
    let channel_db = bank_tests::db::fresh_database("chaos_channel").await?;
    let core_addr = format!("127.0.0.1:{}", free_port());
    let core_url = format!("http://{core_addr}");
    let proxy = FaultProxy::start(&core_url).await?;
    let transfer_addr = format!("127.0.0.1:{}", free_port());
    let projector_addr = format!("127.0.0.1:{}", free_port());
    let env = |extra: &[(&str, String)]| {
        let mut e: HashMap<String, String> = HashMap::from([
            ("NATS_URL".into(), nats.url()),
            ("CORE_API_TOKEN".into(), CORE_TOKEN.into()),
            ("AUTH_JWT_SECRET".into(), JWT_SECRET.into()),
            ("CORE_DATABASE_URL".into(), core_db.clone()),
            ("CHANNEL_DATABASE_URL".into(), channel_db.clone()),
            ("REQUEST_TTL_SECS".into(), "8".into()),
            ("CORE_TIMEOUT_MS".into(), "1000".into()),
            ("RECONCILE_INTERVAL_MS".into(), "500".into()),
            ("BANK_TEST_CLOCK".into(), "1".into()),
            ("DATABASE_MAX_CONNECTIONS".into(), "8".into()),
            ("PROJECTOR_MAX_DELIVERIES".into(), "10".into()),
            ("PROJECTOR_RETRY_BASE_MS".into(), "200".into()),
            ("PROJECTOR_RETRY_MAX_MS".into(), "3000".into()),
            ("PROJECTOR_TAX_SWEEP_SECS".into(), "2".into()),
            // Longer than a killed projector's batch takes to come back
            // (the ack wait), so that the audit repairs what was lost, not
            // what lags; its repairs of the load's accounts are reported.
            ("PROJECTOR_AUDIT_SECS".into(), "15".into()),
            ("PROJECTOR_ACK_WAIT_SECS".into(), "10".into()),
            ("CORE_READ_API_TOKEN".into(), CORE_READ_TOKEN.into()),
        ]);
        for (k, v) in extra {
            e.insert((*k).into(), v.clone());
        }
        e
    };
    let mut svc = Services {
        // Its log lines are kept over every restart: a failed ledger batch
        // logs one, also while it drains at SIGTERM (its metrics go with it).
        core: ServiceProcess::start_logged(
            "core-bank",
            env(&[("CORE_HTTP_ADDR", core_addr.clone())]),
        )?,
        transfer: ServiceProcess::start(
            "transfer",
            env(&[
                ("TRANSFER_HTTP_ADDR", transfer_addr.clone()),
                ("CORE_URL", proxy.url()),
            ]),
        )?,
        // Its log lines are kept too: the ledger audit's repairs.
        projector: ServiceProcess::start_logged(
            "projector",
            env(&[
                ("PROJECTOR_HTTP_ADDR", projector_addr.clone()),
                ("CORE_URL", core_url.clone()),
                // The projector only reads from the core.
                ("CORE_API_TOKEN", CORE_READ_TOKEN.into()),
            ]),
        )?,
        core_url: core_url.clone(),
        transfer_url: format!("http://{transfer_addr}"),
        projector_url: format!("http://{projector_addr}"),
    };
    for u in [&svc.core_url, &svc.transfer_url, &svc.projector_url] {
        wait_ready(u).await?;
    }
    let core = Api::new(core_url.clone(), Some(CORE_TOKEN.into()));

    // Customers, one account each, funded.
    let book = Arc::new(Mutex::new(Ledgerbook::default()));
    let mut accounts = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..args.customers {
        let c = core.new_customer("Chaos").await;
        let a = core.new_account(&c).await;
        deposit(&core, &a, 10_000_000, &book).await;
        clients.push(Api::new(svc.transfer_url.clone(), Some(customer_token(&c))));
        accounts.push(a);
    }

    // Load.
    let stop_load = CancellationToken::new();
    let counters = Arc::new(Counters::default());
    let mut load = Vec::new();
    for i in 0..args.customers {
        let (api, from, stop) = (clients[i].clone(), accounts[i].clone(), stop_load.clone());
        let others = accounts.clone();
        let (book, counters) = (book.clone(), counters.clone());
        let mut r = StdRng::seed_from_u64(seed ^ (i as u64 + 1));
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let to = others[r.random_range(0..others.len())].clone();
                let amount: u64 = r.random_range(1..5_000);
                let res = api
                    .try_send("POST", "/v1/transfers", Some(json!({"from_account": from, "to_account": to, "amount": amount.to_string()})), &[])
                    .await;
                counters.record(res.as_ref().map(|r| r.status).unwrap_or(0));
                if let Ok(reply) = res
                    && let Some(id) = reply.body["transfer_id"].as_str().or(reply.body["error"]["transfer_id"].as_str())
                    && reply.status != 409
                {
                    let mut book = book.lock().await;
                    book.transfer_ids.push(id.to_owned());
                    match reply.status {
                        200 => book.told_succeeded.push(id.to_owned()),
                        422 => book.told_failed.push(id.to_owned()),
                        _ => {}
                    }
                }
                if r.random_ratio(1, 20) {
                    let key = unique("chaos-interest-");
                    receive_interest(&api, &from, &key, &book).await;
                }
                tokio::time::sleep(Duration::from_millis(r.random_range(5..40))).await;
            }
        }));
    }
    {
        // A deposit stream from "other banks", retried by deposit id until definitive.
        let (core, accounts, stop, book) = (
            core.clone(),
            accounts.clone(),
            stop_load.clone(),
            book.clone(),
        );
        let mut r = StdRng::seed_from_u64(seed ^ 0xdead);
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let a = &accounts[r.random_range(0..accounts.len())];
                deposit(&core, a, r.random_range(1..100_000), &book).await;
                tokio::time::sleep(Duration::from_millis(r.random_range(20..100))).await;
            }
        }));
    }

    // Faults.
    let started = Instant::now();
    let mut poison_sent = 0u64;
    let mut forged_sent = 0u64;
    let mut interest_events_deleted = 0u64;
    let mut ledger_events_deleted = 0u64;
    // Accounts the load never touches, each with one deposit whose event
    // was deleted (see LOSE_LEDGER_EVENTS).
    let mut quiet: Vec<String> = Vec::new();
    let mut day_shifts = 0;
    let mut unclean_exits = 0u64;
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    while started.elapsed() < Duration::from_secs(args.secs) {
        let pause = Duration::from_millis(rng.random_range(1_000..4_000));
        tokio::time::sleep(pause).await;
        // Copies a gateway kept after answering go on to the core now.
        proxy.release_held();
        let fault = rng.random_range(0..12);
        let name = match fault {
            0 => {
                svc.core.kill().await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..2_000))).await;
                svc.core.restart()?;
                wait_ready(&svc.core_url).await?;
                "kill -9 core-bank"
            }
            1 => {
                svc.transfer.kill().await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..2_000))).await;
                svc.transfer.restart()?;
                wait_ready(&svc.transfer_url).await?;
                "kill -9 transfer"
            }
            2 => {
                svc.projector.kill().await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..2_000))).await;
                svc.projector.restart()?;
                wait_ready(&svc.projector_url).await?;
                "kill -9 projector"
            }
            3 => {
                nats.stop().await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..3_000))).await;
                nats.resume().await?;
                "restart nats-server"
            }
            4 => {
                let which = rng.random_range(0..3);
                let (p, url) = match which {
                    0 => (&mut svc.core, svc.core_url.clone()),
                    1 => (&mut svc.transfer, svc.transfer_url.clone()),
                    _ => (&mut svc.projector, svc.projector_url.clone()),
                };
                let code = p.terminate(Duration::from_secs(60)).await?;
                if code != Some(0) {
                    println!("chaos: a service exited {code:?} after SIGTERM");
                    unclean_exits += 1;
                }
                p.restart()?;
                wait_ready(&url).await?;
                "SIGTERM and restart a service"
            }
            5 | 6 => {
                let n = rng.random_range(1..6);
                let d = Duration::from_millis(rng.random_range(1_200..4_000));
                proxy.add(
                    Some(axum::http::Method::POST),
                    TRANSFER_CALLS,
                    Action::DelayResponse(d),
                    Some(n),
                );
                DELAY_ANSWERS
            }
            7 => match rng.random_range(0..3) {
                0 => {
                    let n = rng.random_range(1..4);
                    proxy.add(
                        Some(axum::http::Method::POST),
                        TRANSFER_CALLS,
                        Action::Drop,
                        Some(n),
                    );
                    DROP_REQUESTS
                }
                1 => {
                    // F4: the request reaches the core after the channel
                    // fenced it (TTL 8 s + fence margin 2 s + up to a
                    // second until a resolver's poll): refused.
                    let d = Duration::from_millis(rng.random_range(13_000..16_000));
                    proxy.add(
                        Some(axum::http::Method::POST),
                        TRANSFER_CALLS,
                        Action::DelayRequest(d),
                        Some(1),
                    );
                    LATE_REQUESTS
                }
                _ => {
                    // A gateway answers 503 and passes the request on
                    // later anyway (at the next fault's release): the
                    // channel calls again with the same id.
                    let n = rng.random_range(1..4);
                    proxy.add(
                        Some(axum::http::Method::POST),
                        TRANSFER_CALLS,
                        Action::FailAndHold(503),
                        Some(n),
                    );
                    GATEWAY_503
                }
            },
            8 => {
                let victim = &accounts[rng.random_range(0..accounts.len())];
                let js = nats.jetstream().await?;
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", unique("poison-").as_str());
                let body = format!("{{\"poison\": {poison_sent}}}");
                if let Ok(ack) = js
                    .publish_with_headers(format!("bank.ledger.{victim}"), h, body.into())
                    .await
                    && ack.await.is_ok()
                {
                    poison_sent += 1;
                }
                // Counted as drawn either way; poison_sent counts what took effect.
                POISON
            }
            9 if rng.random_bool(0.5) => {
                // Payouts whose events never reach the projector: it is
                // down while they are made, and their messages are deleted
                // from the stream before it is back. The sweep must record
                // their tax from the core.
                svc.projector.kill().await;
                let js = nats.jetstream().await?;
                let mut stream = js.get_stream("INTEREST").await?;
                let before = stream.info().await?.state.last_sequence;
                core.advance_business_date(1).await;
                let first = rng.random_range(0..accounts.len());
                for i in 0..accounts.len() {
                    let a = &accounts[(first + i) % accounts.len()];
                    if pay_interest(&core, a, &book).await {
                        break;
                    }
                }
                // Once the relay has published them (it keeps going while
                // the projector is down).
                until_relayed(&core_db, "bank.interest.%").await?;
                let after = stream.info().await?.state.last_sequence;
                let mut deleted = 0;
                for seq in before + 1..=after {
                    // One not deleted is not lost: it only exercises less.
                    match stream.delete_message(seq).await {
                        Ok(true) => deleted += 1,
                        Ok(false) => {}
                        Err(e) => println!("chaos: deleting INTEREST message {seq}: {e}"),
                    }
                }
                interest_events_deleted += deleted;
                svc.projector.restart()?;
                wait_ready(&svc.projector_url).await?;
                LOSE_INTEREST_EVENTS
            }
            9 => {
                // An interest event the core never published, for a payout
                // it never made: dead-lettered, never a tax record.
                let victim = &accounts[rng.random_range(0..accounts.len())];
                let payout_id = unique("pay_forged_");
                let body = json!({
                    "event_id": format!("interest:{payout_id}"),
                    "payout_id": payout_id,
                    "account_id": victim,
                    "gross": "1000",
                    "tax": "154",
                    "net": "846",
                    "from": "2026-01-01",
                    "through": "2026-01-01",
                    "paid_at": chrono::Utc::now(),
                    "forged": forged_sent,
                });
                let js = nats.jetstream().await?;
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", unique("forged-").as_str());
                if let Ok(ack) = js
                    .publish_with_headers("bank.interest.paid", h, body.to_string().into())
                    .await
                    && ack.await.is_ok()
                {
                    forged_sent += 1;
                }
                FORGED
            }
            10 => {
                // Another transaction (a payout on the legacy calculation
                // over a busy account, an operator's session) holds an
                // account's row past DATABASE_LOCK_TIMEOUT_MS: commands on
                // it wait; the ones batched with them must not fail.
                let victim = &accounts[rng.random_range(0..accounts.len())];
                let lock = bank_tests::db::RowLock::account(&core_db, victim).await?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(2_500..6_000))).await;
                lock.release().await?;
                "hold an account's row lock past the lock timeout"
            }
            11 if rng.random_bool(0.5) => {
                // An account's last ledger event lost: the projector is down
                // while a deposit is made to an account the load never
                // touches, and its message is deleted from the stream
                // before it is back. No later event of that account brings
                // a gap fill: the ledger audit must sync it from the core.
                svc.projector.kill().await;
                let customer = core.new_customer("Chaos quiet").await;
                let account = core.new_account(&customer).await;
                deposit(&core, &account, rng.random_range(1..100_000), &book).await;
                quiet.push(account.clone());
                let subject = format!("bank.ledger.{account}");
                until_relayed(&core_db, &subject.replace('_', "\\_")).await?;
                let stream = nats.jetstream().await?.get_stream("LEDGER").await?;
                // One not deleted is not lost: it only exercises less.
                match stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(m) => match stream.delete_message(m.sequence).await {
                        Ok(true) => ledger_events_deleted += 1,
                        Ok(false) => {}
                        Err(e) => println!("chaos: deleting LEDGER message {}: {e}", m.sequence),
                    },
                    Err(e) => println!("chaos: reading the last message of {subject}: {e}"),
                }
                svc.projector.restart()?;
                wait_ready(&svc.projector_url).await?;
                LOSE_LEDGER_EVENTS
            }
            _ => {
                if day_shifts < 5 {
                    day_shifts += 1;
                    core.advance_business_date(1).await;
                    "advance the business date (interest accrues)"
                } else {
                    "nothing"
                }
            }
        };
        *faults.entry(name).or_default() += 1;
    }
    proxy.clear();
    proxy.release_held();
    stop_load.cancel();
    let mut load_failures = Vec::new();
    for l in load {
        if let Err(e) = l.await {
            load_failures.push(e.to_string());
        }
    }
    println!("chaos: faults injected: {faults:?}");
    println!("chaos: transfer answers: {}", counters.summary());

    // Convergence.
    let every: Vec<String> = accounts.iter().chain(&quiet).cloned().collect();
    let converge_started = Instant::now();
    let deadline = converge_started + Duration::from_secs(args.converge_secs);
    let mut converged = false;
    while Instant::now() < deadline {
        let pending = bank_tests::db::query_strings(
            &channel_db,
            "SELECT count(*)::text FROM transfer_requests WHERE status = 'pending'",
        )
        .await?;
        let backlog = bank_tests::db::query_strings(
            &core_db,
            "SELECT count(*)::text FROM outbox WHERE published_at IS NULL",
        )
        .await?;
        let diff = bank_tests::verify::history_mismatches(&core, &channel_db, &every).await?;
        let (paid, taxed) = payouts_and_tax_records(&core_db, &channel_db).await?;
        // Every letter in (a read that fails is "not yet").
        let lettered = DeadLetters::read(&nats)
            .await
            .is_ok_and(|l| l.poisoned.len() as u64 == poison_sent && l.forged == forged_sent);
        if pending == ["0"] && backlog == ["0"] && diff.is_empty() && paid == taxed && lettered {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let converge_time = converge_started.elapsed();

    // Checks.
    let mut all_ok = true;
    let mut check = |name: &str, ok: bool, figure: String| {
        println!(
            "chaos: [{}] {name}: {figure}",
            if ok { " ok " } else { "FAIL" }
        );
        all_ok &= ok;
    };
    check(
        "converged",
        converged,
        format!(
            "{:.1} s after the faults stopped",
            converge_time.as_secs_f64()
        ),
    );
    check(
        "every service exited 0 after SIGTERM",
        unclean_exits == 0,
        format!("{unclean_exits} did not"),
    );
    check(
        "every load client ran to the end (no client task panicked)",
        load_failures.is_empty(),
        format!("{} failed: {load_failures:?}", load_failures.len()),
    );
    // The log over all its lives, and the running core's own counter (a
    // log filtered by TEST_LOG must not make the check pass unseen).
    // The ledger audit's repairs: the quiet accounts' lost last events are
    // its work; a repair of an account the load touched means the consumer
    // left it behind for a whole interval (reported, not failed: a history
    // held up that long by the faults is repaired the same way).
    let repairs = svc.projector.logged_lines(AUDIT_REPAIRED);
    let of_load = repairs
        .iter()
        .filter(|l| !quiet.iter().any(|q| l.contains(q.as_str())))
        .count();
    println!(
        "chaos: [info] ledger audit repairs: {} ({} of the {} quiet accounts, {of_load} of the load's accounts)",
        repairs.len(),
        repairs.len() - of_load,
        quiet.len()
    );
    let batch_failures = svc
        .core
        .logged(LEDGER_BATCH_FAILED)
        .max(bank_tests::metrics::metric(
            &bank_tests::metrics::scrape(&svc.core_url).await,
            "ledger_batch_failures_total",
        ) as usize);
    check(
        "no ledger batch failed (held locks and restarts included)",
        batch_failures == 0,
        format!("{batch_failures} failed batches"),
    );
    let applied = proxy.applied();
    let took = |name: &str| applied.iter().filter(|(_, _, a)| *a == name).count() as u64;
    let drawn = |name: &str| faults.get(name).copied().unwrap_or(0);
    // A fault drawn just before the faults stop may end before it takes
    // effect (a proxy rule cleared before a request meets it); each kind
    // drawn twice or more must have taken effect at least once.
    let effects = [
        (DELAY_ANSWERS, took("delay response"), "answers delayed"),
        (DROP_REQUESTS, took("drop"), "requests dropped"),
        (
            LATE_REQUESTS,
            took("delay request"),
            "requests delivered late",
        ),
        (GATEWAY_503, took("fail and hold"), "gateway 503s"),
        (POISON, poison_sent, "poison messages published"),
        (FORGED, forged_sent, "forged events published"),
        (
            LOSE_INTEREST_EVENTS,
            interest_events_deleted,
            "interest events deleted",
        ),
        (
            LOSE_LEDGER_EVENTS,
            ledger_events_deleted,
            "accounts' last ledger events deleted",
        ),
    ];
    check(
        "every kind of fault drawn twice or more took effect",
        effects.iter().all(|(kind, n, _)| drawn(kind) < 2 || *n > 0),
        effects
            .iter()
            .map(|(kind, n, what)| format!("{n} {what} ({} drawn)", drawn(kind)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let book = book.lock().await;
    let mut total = 0i128;
    for a in &every {
        total += core.balance(a).await;
    }
    let expected = book.deposited + book.interest_net;
    check(
        "no money created or lost",
        total == expected,
        format!(
            "sum of balances {total} = deposits {} + net interest {} -> {expected}",
            book.deposited, book.interest_net
        ),
    );
    let dup = bank_tests::db::query_strings(
        &core_db,
        "SELECT count(*)::text FROM (SELECT transfer_id FROM ledger_entries WHERE transfer_id IS NOT NULL \
         GROUP BY transfer_id HAVING count(*) <> 2) x",
    )
    .await?;
    check(
        "no transfer executed twice (2 entries per executed transfer)",
        dup == ["0"],
        format!("{} anomalies", dup[0]),
    );
    for (name, sql) in LEDGER_CONSISTENCY {
        let n = bank_tests::db::query_strings(&core_db, sql).await?;
        check(name, n == ["0"], format!("{} violations", n[0]));
    }
    let pending = bank_tests::db::query_strings(
        &channel_db,
        "SELECT count(*)::text FROM transfer_requests WHERE status = 'pending'",
    )
    .await?;
    check(
        "no transfer left pending",
        pending == ["0"],
        format!("{} pending", pending[0]),
    );
    let channel_ok = bank_tests::db::query_strings(
        &channel_db,
        "SELECT transfer_id FROM transfer_requests WHERE status = 'succeeded' ORDER BY 1",
    )
    .await?;
    let core_ok = bank_tests::db::query_strings(
        &core_db,
        "SELECT transfer_id FROM transfers WHERE status = 'succeeded' ORDER BY 1",
    )
    .await?;
    check(
        "channel and core agree on every transfer's outcome",
        channel_ok == core_ok,
        format!(
            "{} succeeded at the channel, {} at the core, {} transfers answered",
            channel_ok.len(),
            core_ok.len(),
            book.transfer_ids.len()
        ),
    );
    // Every transfer id a customer was given is the channel's, resolved as
    // the customer was told.
    let channel: HashMap<String, String> = bank_tests::db::query_strings(
        &channel_db,
        "SELECT transfer_id || ' ' || status FROM transfer_requests",
    )
    .await?
    .into_iter()
    .filter_map(|row| {
        row.split_once(' ')
            .map(|(id, status)| (id.to_owned(), status.to_owned()))
    })
    .collect();
    let status_of = |id: &String| channel.get(id).map(String::as_str);
    let unknown: Vec<&String> = book
        .transfer_ids
        .iter()
        .filter(|id| !matches!(status_of(id), Some("succeeded" | "failed")))
        .collect();
    let misrecorded: Vec<&String> = book
        .told_succeeded
        .iter()
        .filter(|id| status_of(id) != Some("succeeded"))
        .chain(
            book.told_failed
                .iter()
                .filter(|id| status_of(id) != Some("failed")),
        )
        .collect();
    check(
        "every transfer id a customer was given is resolved at the channel as the customer was told",
        unknown.is_empty() && misrecorded.is_empty(),
        format!(
            "{} ids given; missing or unresolved (first 5): {:?}; recorded otherwise than told (first 5): {:?}",
            book.transfer_ids.len(),
            &unknown[..unknown.len().min(5)],
            &misrecorded[..misrecorded.len().min(5)]
        ),
    );
    let succeeded_at_core: std::collections::HashSet<&String> = core_ok.iter().collect();
    let contradicted: Vec<&String> = book
        .told_succeeded
        .iter()
        .filter(|id| !succeeded_at_core.contains(id))
        .chain(
            book.told_failed
                .iter()
                .filter(|id| succeeded_at_core.contains(id)),
        )
        .collect();
    check(
        "every definitive answer a customer got is the core's outcome",
        contradicted.is_empty(),
        format!(
            "{} told succeeded, {} told failed; contradicted: {contradicted:?}",
            book.told_succeeded.len(),
            book.told_failed.len()
        ),
    );
    let diff = bank_tests::verify::history_mismatches(&core, &channel_db, &every).await?;
    let entries =
        bank_tests::db::query_strings(&channel_db, "SELECT count(*)::text FROM history_entries")
            .await?;
    check(
        "channel history equals the core ledger",
        diff.is_empty(),
        format!(
            "{} accounts ({} of them quiet, their last event deleted), {} entries, differences: {diff:?}",
            every.len(),
            quiet.len(),
            entries[0]
        ),
    );
    let (paid, taxed) = payouts_and_tax_records(&core_db, &channel_db).await?;
    check(
        "every payout has its tax record, with the core's figures",
        paid == taxed,
        format!(
            "{} payouts at the core, {} tax records ({interest_events_deleted} of their events deleted from the stream); differing: {:?}",
            paid.len(),
            taxed.len(),
            paid.iter()
                .filter(|p| !taxed.contains(p))
                .chain(taxed.iter().filter(|t| !paid.contains(t)))
                .take(5)
                .collect::<Vec<_>>()
        ),
    );
    let letters = DeadLetters::read(&nats).await?;
    check(
        "every forged interest event is dead-lettered (and none is a tax record)",
        letters.forged == forged_sent,
        format!("{forged_sent} published, {} dead-lettered", letters.forged),
    );
    let poison = &letters.poisoned;
    let copies: usize = poison.values().map(Vec::len).sum();
    for (seq, letters) in poison.iter().filter(|(_, l)| l.len() > 1) {
        println!(
            "chaos: poison LEDGER seq {seq} was dead-lettered {} times: {letters:?}",
            letters.len()
        );
    }
    check(
        "every poison message is in the dead-letter stream",
        poison.len() as u64 == poison_sent && copies as u64 == poison_sent,
        format!(
            "{poison_sent} sent, {} dead-lettered ({copies} letters), {} dead letters in all",
            poison.len(),
            letters.total
        ),
    );
    drop(book);
    for p in [&mut svc.core, &mut svc.transfer, &mut svc.projector] {
        let _ = p.terminate(Duration::from_secs(30)).await;
    }
    Ok(all_ok)
}

/// The core's own records agree with each other; each query counts the
/// violations of one rule.
const LEDGER_CONSISTENCY: [(&str, &str); 4] = [
    (
        "every transfer the core records as succeeded has its two entries (amounts, accounts, seqs), every failed one none",
        "SELECT count(*)::text FROM transfers t WHERE CASE t.status \
           WHEN 'succeeded' THEN NOT ( \
             EXISTS (SELECT 1 FROM ledger_entries e WHERE e.account_id = t.from_account AND e.seq = t.from_seq \
                       AND e.transfer_id = t.transfer_id AND e.kind = 'transfer_out' AND e.amount = -t.amount) \
             AND EXISTS (SELECT 1 FROM ledger_entries e WHERE e.account_id = t.to_account AND e.seq = t.to_seq \
                       AND e.transfer_id = t.transfer_id AND e.kind = 'transfer_in' AND e.amount = t.amount)) \
           ELSE EXISTS (SELECT 1 FROM ledger_entries e WHERE e.transfer_id = t.transfer_id) END",
    ),
    (
        "no ledger entry names a transfer the core does not record as succeeded",
        "SELECT count(*)::text FROM ledger_entries e WHERE e.transfer_id IS NOT NULL AND NOT EXISTS \
           (SELECT 1 FROM transfers t WHERE t.transfer_id = e.transfer_id AND t.status = 'succeeded')",
    ),
    (
        "every account's entries run 1, 2, 3... each balance the one before plus the amount",
        "SELECT count(*)::text FROM (SELECT seq, amount, balance_after, \
             row_number() OVER w AS n, lag(balance_after, 1, 0::numeric) OVER w AS before \
           FROM ledger_entries WINDOW w AS (PARTITION BY account_id ORDER BY seq)) x \
         WHERE seq <> n OR balance_after <> before + amount",
    ),
    (
        "every account's balance and last seq are its last entry's",
        "SELECT count(*)::text FROM accounts a LEFT JOIN LATERAL (SELECT seq, balance_after FROM ledger_entries e \
           WHERE e.account_id = a.account_id ORDER BY seq DESC LIMIT 1) l ON true \
         WHERE a.balance <> coalesce(l.balance_after, 0) OR a.last_seq <> coalesce(l.seq, 0)",
    ),
];

/// What the dead-letter stream holds of the campaign's faults.
struct DeadLetters {
    /// Letters of poison messages, by the poison's sequence in `LEDGER`.
    poisoned: BTreeMap<String, Vec<String>>,
    /// Letters of forged interest events.
    forged: u64,
    /// Every letter.
    total: usize,
}

impl DeadLetters {
    async fn read(nats: &NatsServer) -> anyhow::Result<Self> {
        let js = nats.jetstream().await?;
        let dlq = stream_messages(&js, "DLQ").await?;
        let forged = dlq
            .iter()
            .filter(|m| {
                m.subject.as_str() == "bank.dlq.bank.interest.paid"
                    && String::from_utf8_lossy(&m.payload).contains("\"forged\"")
            })
            .count() as u64;
        let mut poisoned: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in &dlq {
            if String::from_utf8_lossy(&m.payload).contains("\"poison\"") {
                let h = |name: &str| {
                    m.headers
                        .get(name)
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                };
                poisoned
                    .entry(h("Bank-Dlq-Stream-Seq"))
                    .or_default()
                    .push(format!(
                        "dlq seq {} at {} after {} deliveries",
                        m.sequence,
                        m.time,
                        h("Bank-Dlq-Deliveries")
                    ));
            }
        }
        Ok(Self {
            poisoned,
            forged,
            total: dlq.len(),
        })
    }
}

/// What core-bank logs for each failed ledger batch (each increment of
/// `ledger_batch_failures_total`).
const LEDGER_BATCH_FAILED: &str = "ledger batch failed; its commands are answered with the error";

/// What the projector's ledger audit logs for each account it synced from
/// the core.
const AUDIT_REPAIRED: &str = "stayed behind the core's ledger for a whole audit interval";

/// The transfer service's calls that execute a transfer (not the fence at
/// `/v1/transfers/{id}/fence`).
const TRANSFER_CALLS: &str = "/v1/transfers$";

// Names of the faults whose effect is checked.
const DELAY_ANSWERS: &str = "delay core answers";
const DROP_REQUESTS: &str = "drop requests to the core";
const LATE_REQUESTS: &str = "deliver a request to the core after the channel fenced it";
const GATEWAY_503: &str = "a gateway answers 503 and passes the request on later";
const POISON: &str = "publish a poison message";
const FORGED: &str = "publish a forged interest event";
const LOSE_INTEREST_EVENTS: &str = "lose interest events (projector down, messages deleted)";
const LOSE_LEDGER_EVENTS: &str =
    "lose an account's last ledger event (projector down, message deleted)";

#[derive(Default)]
struct Counters {
    by_status: std::sync::Mutex<BTreeMap<u16, u64>>,
    total: AtomicU64,
}

impl Counters {
    fn record(&self, status: u16) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.by_status.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    fn summary(&self) -> String {
        let m = self.by_status.lock().map(|m| m.clone()).unwrap_or_default();
        format!(
            "{} requests, by status {m:?} (0 = no answer)",
            self.total.load(Ordering::Relaxed)
        )
    }
}

/// Returns once the core's relay has published every outbox row whose
/// subject is `LIKE subject` (it keeps going while the projector is down);
/// fails after 60 s.
async fn until_relayed(core_db: &str, subject: &str) -> anyhow::Result<()> {
    let relayed = Instant::now() + Duration::from_secs(60);
    let sql = format!(
        "SELECT count(*)::text FROM outbox WHERE published_at IS NULL AND subject LIKE '{subject}'"
    );
    while bank_tests::db::query_strings(core_db, &sql).await? != ["0"] {
        anyhow::ensure!(
            Instant::now() < relayed,
            "the core's relay did not publish {subject} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A deposit from another bank, retried with the same id until definitive.
async fn deposit(core: &Api, account: &str, amount: u64, book: &Mutex<Ledgerbook>) {
    let body = json!({"deposit_id": unique("dep_"), "to_account": account, "amount": amount.to_string(),
        "sender_bank": "Chaos Bank", "sender_name": "Monkey"});
    for _ in 0..600 {
        if let Ok(r) = core
            .try_send("POST", "/v1/deposits", Some(body.clone()), &[])
            .await
        {
            match r.status {
                200 => {
                    book.lock().await.deposited += amount as i128;
                    return;
                }
                400..=499 => return,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("deposit to {account} got no definitive answer in 120 s");
}

/// The core's payouts and the channel's tax records, each as
/// `payout_id account gross tax net`, in payout id order.
async fn payouts_and_tax_records(
    core_db: &str,
    channel_db: &str,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    const FIGURES: &str = "SELECT concat_ws(' ', payout_id, account_id, gross, tax, net)";
    let paid = bank_tests::db::query_strings(
        core_db,
        &format!("{FIGURES} FROM interest_payouts ORDER BY payout_id"),
    )
    .await?;
    let taxed = bank_tests::db::query_strings(
        channel_db,
        &format!("{FIGURES} FROM tax_records ORDER BY payout_id"),
    )
    .await?;
    Ok((paid, taxed))
}

/// A payout through the core; true if it paid (its net is booked).
async fn pay_interest(core: &Api, account: &str, book: &Mutex<Ledgerbook>) -> bool {
    let payout_id = unique("pay_chaos_");
    for _ in 0..50 {
        match core
            .try_send(
                "POST",
                &format!("/v1/accounts/{account}/interest/payouts"),
                Some(json!({ "payout_id": payout_id })),
                &[],
            )
            .await
        {
            Ok(r) if r.status == 200 => {
                let net: i128 = r.body["net"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                book.lock().await.interest_net += net;
                return true;
            }
            Ok(r) if (400..500).contains(&r.status) => return false,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    panic!("interest payout {payout_id} for {account} got no definitive answer");
}

/// "Receive interest now", retried with the same key until definitive.
async fn receive_interest(api: &Api, account: &str, key: &str, book: &Mutex<Ledgerbook>) {
    for _ in 0..600 {
        if let Ok(r) = api
            .try_send(
                "POST",
                &format!("/v1/accounts/{account}/interest/receive"),
                None,
                &[("Idempotency-Key", key)],
            )
            .await
        {
            match r.status {
                200 => {
                    let net: i128 = r.body["net"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    book.lock().await.interest_net += net;
                    return;
                }
                400..=499 => return,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("interest payout for {account} got no definitive answer in 120 s");
}
