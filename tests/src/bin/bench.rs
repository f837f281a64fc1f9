//! `make bench`: load scenarios P1-P6 of the benchmark issue, each for a fixed
//! duration, with a same-run pgbench baseline for P1. Prints one table and
//! writes it as Markdown and JSON to `target/bench/`.
//!
//! It uses the PostgreSQL and Redis of the README's bring-up, runs the
//! project's own nats-server (JetStream with `sync_interval: always`, as
//! `make run` would start it) on a free port, and starts the three release
//! binaries with fresh databases.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::float_arithmetic
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bank_tests::apps::{CORE_READ_TOKEN, CORE_TOKEN, JWT_SECRET, customer_token};
use bank_tests::cpu::{CpuMeter, Part, Usage, Who};
use bank_tests::nats::{NatsServer, free_port};
use bank_tests::process::ServiceProcess;
use bank_tests::procs::wait_ready;
use bank_tests::{Api, unique};
use clap::Parser;
use futures::StreamExt;
use rand::Rng;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks P1-P6 with a same-run pgbench baseline")]
struct Args {
    /// Seconds per timed scenario.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Funded accounts for P1.
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
    /// Concurrent clients for P1 and P3.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Offered rate of P2, transfers per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// A lower offered rate for P2, reported for reference (latency below
    /// saturation).
    #[arg(long, default_value_t = 200)]
    reference_rate: u64,
    /// Offered rate of P4's paced payout run (8 clients on a fixed
    /// schedule), payouts per second, reported for reference; by default
    /// half the rate the 8 closed-loop clients reached in the same run.
    #[arg(long)]
    payout_rate: Option<u64>,
    /// History entries of the P5 account.
    #[arg(long, default_value_t = 100_000)]
    history_entries: i64,
    /// Ledger events of the P6 backlog.
    #[arg(long, default_value_t = 200_000)]
    backlog_events: u64,
    /// Only these scenarios (comma separated, e.g. P1,P3).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// JetStream durability of the benchmark's nats-server: `always` (fsync
    /// every write, as the project runs it) or `default` (the server's
    /// 2-minute fsync interval, which can lose acknowledged messages on power
    /// loss; only for measuring what the fsyncs cost).
    #[arg(long, value_enum, default_value_t = NatsSync::Always)]
    nats_sync: NatsSync,
    /// Exit with status 3 when a target is missed (after writing the table),
    /// for a pipeline that gates on the figures. Without it a run that
    /// measured everything exits 0 and marks misses in the table.
    #[arg(long)]
    fail_on_miss: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum NatsSync {
    Always,
    Default,
}

#[derive(Default, Clone, serde::Serialize)]
struct Stats {
    count: usize,
    errors: usize,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Stats {
    /// `9000 payouts, 1163/s, p50 6.35 ms, p99 16.07 ms, max 52.17 ms, errors 0`.
    fn summary(&self, what: &str) -> String {
        format!(
            "{} {what}, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, errors {}",
            self.count, self.per_sec, self.p50_ms, self.p99_ms, self.max_ms, self.errors
        )
    }
}

impl Stats {
    /// Something was measured and nothing failed: a target may be met only
    /// then (latencies of no answers are not fast, they are missing).
    fn clean(&self) -> bool {
        self.count > 0 && self.errors == 0
    }
}

fn stats(mut lat: Vec<Duration>, errors: usize, elapsed: Duration) -> Stats {
    lat.sort();
    let q = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1000.0
    };
    Stats {
        count: lat.len(),
        errors,
        per_sec: lat.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: q(0.50),
        p99_ms: q(0.99),
        max_ms: lat.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
    }
}

#[derive(serde::Serialize)]
struct Row {
    id: String,
    scenario: String,
    figures: String,
    target: String,
    met: Option<bool>,
}

struct Bench {
    args: Args,
    core: Api,
    core_db: DatabaseConnection,
    channel_db: DatabaseConnection,
    channel_db_url: String,
    transfer_url: String,
    projector: ServiceProcess,
    projector_url: String,
    pids: Vec<(&'static str, u32)>,
    /// Peak resident memory (MiB) of service processes that were stopped
    /// during the run (the projector before P6), by service.
    earlier_peaks: HashMap<&'static str, f64>,
    nats_pid: u32,
    /// The P5 account, whose history rows were written directly (not projected).
    synthetic: String,
    rows: Vec<Row>,
    json: serde_json::Map<String, Value>,
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let nats = NatsServer::start_with_fsync(args.nats_sync == NatsSync::Always).await?;
    let core_db_url = bank_tests::db::fresh_database("bench_core").await?;
    let channel_db_url = bank_tests::db::fresh_database("bench_channel").await?;
    let (core_addr, transfer_addr, projector_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let env: HashMap<String, String> = HashMap::from([
        ("NATS_URL".into(), nats.url()),
        ("CORE_API_TOKEN".into(), CORE_TOKEN.into()),
        ("CORE_READ_API_TOKEN".into(), CORE_READ_TOKEN.into()),
        ("AUTH_JWT_SECRET".into(), JWT_SECRET.into()),
        ("CORE_DATABASE_URL".into(), core_db_url.clone()),
        ("CHANNEL_DATABASE_URL".into(), channel_db_url.clone()),
        ("CORE_URL".into(), format!("http://{core_addr}")),
        ("CORE_HTTP_ADDR".into(), core_addr.clone()),
        ("TRANSFER_HTTP_ADDR".into(), transfer_addr.clone()),
        ("PROJECTOR_HTTP_ADDR".into(), projector_addr.clone()),
        ("BANK_TEST_CLOCK".into(), "1".into()),
        ("RUST_LOG".into(), "warn".into()),
    ]);
    let core_proc = ServiceProcess::start("core-bank", env.clone())?;
    wait_ready(&format!("http://{core_addr}")).await?;
    let transfer_proc = ServiceProcess::start("transfer", env.clone())?;
    // The projector only reads from the core, as deployed.
    let mut projector_env = env.clone();
    projector_env.insert("CORE_API_TOKEN".into(), CORE_READ_TOKEN.into());
    let projector = ServiceProcess::start("projector", projector_env)?;
    for u in [
        format!("http://{transfer_addr}"),
        format!("http://{projector_addr}"),
    ] {
        wait_ready(&u).await?;
    }
    let pids = vec![
        ("core-bank", core_proc.pid().unwrap_or(0)),
        ("transfer", transfer_proc.pid().unwrap_or(0)),
        ("projector", projector.pid().unwrap_or(0)),
    ];
    let mut b = Bench {
        core: Api::new(format!("http://{core_addr}"), Some(CORE_TOKEN.into())),
        core_db: Database::connect(core_db_url.as_str()).await?,
        channel_db: Database::connect(channel_db_url.as_str()).await?,
        channel_db_url,
        transfer_url: format!("http://{transfer_addr}"),
        projector,
        projector_url: format!("http://{projector_addr}"),
        pids,
        earlier_peaks: HashMap::new(),
        nats_pid: nats.pid().unwrap_or(0),
        synthetic: String::from("none"),
        rows: Vec::new(),
        json: serde_json::Map::new(),
        args,
    };
    // How fast the disk makes a write durable, one after another: each
    // JetStream message and each PostgreSQL commit waits for one.
    std::fs::create_dir_all("target/bench")?;
    let fsync_ms = bank_tests::cpu::fsync_ms(std::path::Path::new("target/bench"), 1000)?;
    let machine = format!(
        "{}; disk write+fsync {fsync_ms:.2} ms ({:.0}/s one after another); NATS {} JetStream {}",
        machine(),
        1000.0 / fsync_ms.max(1e-9),
        bank_tests::nats::version()?,
        match b.args.nats_sync {
            NatsSync::Always => "with sync_interval: always (fsync per write)",
            NatsSync::Default => {
                "with the server's default sync interval (NOT durable; diagnostic run)"
            }
        }
    );
    println!("bench: {machine}");
    let only = b.args.only.clone();
    let wants = |id: &str| only.is_empty() || only.iter().any(|o| o.eq_ignore_ascii_case(id));
    let accounts = b.funded_accounts(b.args.accounts, 1_000_000_000).await;
    if wants("P1") {
        b.settle().await?;
        b.p1(&accounts).await?;
    }
    if wants("P3") {
        b.settle().await?;
        b.p3().await?;
    }
    if wants("P4") {
        b.settle().await?;
        b.p4(&accounts).await?;
    }
    if wants("P5") {
        b.settle().await?;
        b.p5().await?;
    }
    if wants("P2") {
        b.settle().await?;
        b.p2(b.args.rate, false).await?;
        b.settle().await?;
        b.p2(b.args.reference_rate, true).await?;
    }
    if wants("P6") {
        b.settle().await?;
        b.p6(&accounts).await?;
    }
    b.memory();
    b.report(&machine)?;
    drop(core_proc);
    drop(transfer_proc);
    let missed: Vec<&str> = b
        .rows
        .iter()
        .filter(|r| r.met == Some(false))
        .map(|r| r.id.as_str())
        .collect();
    if b.args.fail_on_miss && !missed.is_empty() {
        eprintln!("bench: targets missed: {}", missed.join(", "));
        return Ok(std::process::ExitCode::from(3));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The cores this process may run on (1 if unknown).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn machine() -> String {
    let cpus = cores();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    format!(
        "{cpus} vCPU ({model}), {mem} GiB RAM; services, PostgreSQL, NATS, Redis and the load generator share the machine"
    )
}

async fn sql(db: &DatabaseConnection, q: &str) -> Vec<sea_orm::QueryResult> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        q.to_owned(),
    ))
    .await
    .unwrap()
}

/// The number of ledger entries (each account holds seqs 1..=last_seq),
/// without scanning the entries.
const LEDGER_ENTRIES: &str = "SELECT COALESCE(sum(last_seq), 0)::bigint FROM accounts";

async fn count(db: &DatabaseConnection, q: &str) -> i64 {
    sql(db, q).await[0].try_get_by_index::<i64>(0).unwrap()
}

impl Bench {
    /// Ledger entries projected into the channel history (the synthetic P5
    /// account excluded). Equal to counting the history entries (they are
    /// exactly seqs 1..=synced per account), without scanning them while the
    /// projector works.
    fn projected_sql(&self) -> String {
        format!(
            "SELECT COALESCE(sum(synced_through_seq), 0)::bigint FROM history_sync WHERE account_id <> '{}'",
            self.synthetic
        )
    }

    /// Waits until the system is quiet: both outboxes are published, the
    /// projector has applied every ledger entry and recorded the tax of every
    /// payout, and no autovacuum worker is
    /// cleaning up after the last scenario, so one scenario's background work
    /// does not run during the next one's measurement.
    async fn settle(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let projected = self.projected_sql();
        while Instant::now() < deadline {
            const UNPUBLISHED: &str = "SELECT count(*) FROM outbox WHERE published_at IS NULL";
            let backlog = count(&self.core_db, UNPUBLISHED).await
                + count(&self.channel_db, UNPUBLISHED).await;
            let ledger = count(&self.core_db, LEDGER_ENTRIES).await;
            let history = count(&self.channel_db, &projected).await;
            let untaxed = count(&self.core_db, "SELECT count(*) FROM interest_payouts").await
                - count(&self.channel_db, "SELECT count(*) FROM tax_records").await;
            let vacuuming = count(
                &self.core_db,
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
            )
            .await;
            if backlog == 0 && history >= ledger && untaxed <= 0 && vacuuming == 0 {
                // Write back what the previous scenario dirtied now, so that a
                // checkpoint it caused does not stall the next measurement
                // (the same server holds both databases).
                if let Err(e) = self.core_db.execute_unprepared("CHECKPOINT").await {
                    println!("bench: CHECKPOINT failed ({e}); figures may include its stalls");
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Figures measured on top of an unfinished backlog would be wrong.
        anyhow::bail!("the system did not settle within 300 s (outbox, projection or tax backlog)")
    }

    /// CPU time of every part of the stack: the three services, NATS,
    /// PostgreSQL (all its processes), Redis and the load generator.
    fn cpu_meter(&self) -> CpuMeter {
        let mut parts: Vec<Part> = self
            .pids
            .iter()
            .map(|(name, pid)| Part {
                name,
                who: Who::Pid(*pid),
            })
            .collect();
        parts.extend([
            Part {
                name: "NATS",
                who: Who::Pid(self.nats_pid),
            },
            Part {
                name: "PostgreSQL",
                who: Who::Named("postgres"),
            },
            Part {
                name: "Redis",
                who: Who::Named("redis-server"),
            },
            Part {
                name: "load generator",
                who: Who::Myself,
            },
        ]);
        CpuMeter::new(parts)
    }

    /// A reference row with the CPU one operation cost across the stack
    /// (`usage` over `ops` operations), and the rate at which that saturates
    /// this machine.
    fn cpu_row(&mut self, id: &str, what: &str, usage: &Usage, ops: usize) {
        let cores = cores() as f64;
        let per_op = usage.total_ms() / ops.max(1) as f64;
        let bound = cores * 1000.0 / per_op.max(1e-9);
        self.json.insert(
            format!("cpu_{}", id.replace(' ', "_")),
            json!({"ops": ops, "usage": usage, "ms_per_op": per_op, "bound_per_sec": bound}),
        );
        self.row(
            &format!("{id} CPU"),
            &format!("CPU per {what}, every process of the stack"),
            format!(
                "{} over {ops} in {:.1} s; {cores:.0} cores at this cost per operation: {bound:.0}/s",
                usage.per_op(ops),
                usage.secs
            ),
            "reference: what bounds the rate",
            None,
        );
    }

    fn row(&mut self, id: &str, scenario: &str, figures: String, target: &str, met: Option<bool>) {
        println!(
            "bench: {id} {scenario}: {figures} (target {target}: {})",
            match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "-",
            }
        );
        self.rows.push(Row {
            id: id.into(),
            scenario: scenario.into(),
            figures,
            target: target.into(),
            met,
        });
    }

    /// `n` accounts (100 per customer), each funded with `amount`.
    async fn funded_accounts(&self, n: usize, amount: u64) -> Vec<String> {
        let started = Instant::now();
        let customers: Vec<String> = futures::stream::iter(0..n.div_ceil(100))
            .map(|_| async { self.core.new_customer("Bench").await })
            .buffer_unordered(32)
            .collect()
            .await;
        let accounts: Vec<String> = futures::stream::iter(0..n)
            .map(|i| {
                let c = customers[i / 100].clone();
                async move {
                    let a = self.core.new_account(&c).await;
                    self.core.deposit(&a, amount).await.expect(200);
                    a
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        println!(
            "bench: {} funded accounts in {:.1} s",
            accounts.len(),
            started.elapsed().as_secs_f64()
        );
        accounts
    }

    /// Runs `clients` loops of `op` for `secs`; returns latencies and errors.
    async fn p1(&mut self, accounts: &[String]) -> anyhow::Result<()> {
        let accounts = Arc::new(accounts.to_vec());
        let cpu = self.cpu_meter().sample();
        let (lat, errors, elapsed) = closed_loop(
            &self.core,
            self.args.clients,
            self.args.secs,
            None,
            move |_| {
                let (a, b) = {
                    let mut r = rand::rng();
                    let a = r.random_range(0..accounts.len());
                    let b = (a + r.random_range(1..accounts.len())) % accounts.len();
                    (a, b)
                };
                Some(Op::post(
                    "/v1/transfers",
                    bank_tests::client::transfer_body(
                        &unique("trf_"),
                        &accounts[a],
                        &accounts[b],
                        1,
                    ),
                ))
            },
        )
        .await?;
        let s = stats(lat, errors, elapsed);
        // The relay and the projector finish their share of these transfers
        // before pgbench runs, so that it does not compete with them.
        self.settle().await?;
        let cpu = self.cpu_meter().since(&cpu);
        let pg = pgbench(self.args.clients, self.args.secs, self.args.accounts).await?;
        let ratio = s.per_sec / pg.max(1e-9);
        self.json.insert(
            "P1".into(),
            json!({"service": s, "pgbench_tps": pg, "ratio": ratio}),
        );
        self.row(
            "P1",
            &format!("core-bank HTTP transfers, {} accounts, {} clients", self.args.accounts, self.args.clients),
            format!(
                "{:.0} transfers/s, p50 {:.2} ms, p99 {:.2} ms, errors {}; pgbench plain SQL {:.0} tps; ratio {:.2}",
                s.per_sec, s.p50_ms, s.p99_ms, s.errors, pg, ratio
            ),
            "ratio >= 1.0, 0 errors",
            Some(s.clean() && ratio >= 1.0),
        );
        self.cpu_row(
            "P1",
            "transfer (ledger, outbox, relay, projector)",
            &cpu,
            s.count,
        );
        Ok(())
    }

    async fn p3(&mut self) -> anyhow::Result<()> {
        let sources = Arc::new(self.funded_accounts(self.args.clients, 1_000_000_000).await);
        let hot = self.core.funded_account(0).await;
        let cpu = self.cpu_meter().sample();
        let (lat, errors, elapsed) = closed_loop(
            &self.core,
            self.args.clients,
            self.args.secs,
            None,
            move |i| {
                Some(Op::post(
                    "/v1/transfers",
                    bank_tests::client::transfer_body(
                        &unique("trf_"),
                        &sources[i / 1_000_000],
                        &hot,
                        1,
                    ),
                ))
            },
        )
        .await?;
        let s = stats(lat, errors, elapsed);
        self.json.insert("P3".into(), json!(s));
        self.row(
            "P3",
            &format!("{} clients into one hot account", self.args.clients),
            format!(
                "{:.0} transfers/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
                s.per_sec, s.p50_ms, s.p99_ms, s.errors
            ),
            ">= 1,000/s, 0 errors",
            Some(s.clean() && s.per_sec >= 1000.0),
        );
        self.settle().await?;
        let cpu = self.cpu_meter().since(&cpu);
        self.cpu_row("P3", "transfer into the hot account", &cpu, s.count);
        Ok(())
    }

    async fn p4(&mut self, accounts: &[String]) -> anyhow::Result<()> {
        // The new path at 100% (the rewritten implementation is what is measured).
        self.core
            .put(
                "/v1/admin/interest/rollout",
                json!({"new_path_percent": 100, "shadow": false}),
            )
            .await
            .expect(200);
        let today: chrono::NaiveDate = self
            .core
            .get("/v1/admin/clock")
            .await
            .str("today")
            .parse()
            .unwrap();
        let set_date = |date: chrono::NaiveDate| {
            self.core
                .post("/v1/admin/clock", json!({"today": date.to_string()}))
        };
        set_date(today + chrono::Duration::days(1))
            .await
            .expect(200);
        // The last accounts are kept for the one-client reference run.
        let reserve = (accounts.len() / 5).min(1000);
        let (main, reserved) = accounts.split_at(accounts.len() - reserve);
        let accounts = Arc::new(main.to_vec());
        let cpu = self.cpu_meter().sample();
        let (lat, errors, elapsed) = closed_loop(
            &self.core,
            8,
            self.args.secs,
            None,
            pay_each_once(accounts.clone()),
        )
        .await?;
        let pay = stats(lat, errors, elapsed);
        // The relay and the projector (history entry, checked tax record)
        // finish these payouts before the next run starts.
        self.settle().await?;
        let pay_cpu = self.cpu_meter().since(&cpu);
        // The same with one client, for reference: latency without queueing.
        let (lat1, errors1, elapsed1) = closed_loop(
            &self.core,
            1,
            self.args.secs / 2,
            None,
            pay_each_once(Arc::new(reserved.to_vec())),
        )
        .await?;
        let pay1 = stats(lat1, errors1, elapsed1);
        // The same 8 clients at a fixed offered rate below saturation, on the
        // next business day so that the accounts can be paid again.
        set_date(today + chrono::Duration::days(2))
            .await
            .expect(200);
        let payout_rate = self
            .args
            .payout_rate
            .unwrap_or(((pay.per_sec / 2.0 / 10.0).round() as u64 * 10).max(10));
        let (lat_r, errors_r, elapsed_r) = closed_loop(
            &self.core,
            8,
            self.args.secs / 2,
            Some(payout_rate),
            pay_each_once(accounts.clone()),
        )
        .await?;
        let paced = stats(lat_r, errors_r, elapsed_r);
        // Cached expected-interest queries over 1,000 accounts (warmed once),
        // once the paced payouts' events are projected.
        self.settle().await?;
        let sample: Arc<Vec<String>> =
            Arc::new(accounts.iter().rev().take(1000).cloned().collect());
        for acc in sample.iter() {
            self.core
                .get(&format!("/v1/accounts/{acc}/interest"))
                .await
                .expect(200);
        }
        eprintln!(
            "bench: P4 cached expected-interest queries, 8 clients, {} s",
            self.args.secs
        );
        let one_client_sample = sample.clone();
        let cpu = self.cpu_meter().sample();
        let (lat, errors, elapsed) = closed_loop(&self.core, 8, self.args.secs, None, move |i| {
            Some(Op::get(format!(
                "/v1/accounts/{}/interest",
                sample[i % sample.len()]
            )))
        })
        .await?;
        let cached = stats(lat, errors, elapsed);
        let cached_cpu = self.cpu_meter().since(&cpu);
        // The same queries from one client: the latency of a query that does
        // not queue behind others for the CPU. (Not a paced run: at these
        // rates a client's interval is about a millisecond, the timer's
        // granularity, and the timer's lateness would count as latency.)
        let (lat, errors, elapsed) =
            closed_loop(&self.core, 1, (self.args.secs / 2).max(1), None, move |i| {
                Some(Op::get(format!(
                    "/v1/accounts/{}/interest",
                    one_client_sample[i % one_client_sample.len()]
                )))
            })
            .await?;
        let cached_one = stats(lat, errors, elapsed);
        self.json.insert(
            "P4".into(),
            json!({
                "payout": pay,
                "payout_one_client": pay1,
                "payout_paced": paced,
                "payout_paced_rate": payout_rate,
                "cached_query": cached,
                "cached_query_one_client": cached_one
            }),
        );
        self.row(
            "P4",
            "interest payouts, 8 clients, distinct accounts",
            pay.summary("payouts"),
            "p99 <= 7 ms, max <= 11 ms, 0 errors",
            Some(pay.clean() && pay.p99_ms <= 7.0 && pay.max_ms <= 11.0),
        );
        self.cpu_row(
            "P4",
            "payout (ledger, outbox, relay, projector with its check)",
            &pay_cpu,
            pay.count,
        );
        self.row(
            "P4 (ref)",
            "interest payouts, 1 client, distinct accounts",
            pay1.summary("payouts"),
            "reference: no queueing",
            None,
        );
        self.row(
            "P4 (ref)",
            &format!(
                "interest payouts, 8 clients at {payout_rate}/s offered (half the closed-loop rate unless set), distinct accounts"
            ),
            paced.summary("payouts"),
            "reference: below saturation",
            None,
        );
        self.row(
            "P4",
            "cached expected-interest query, 8 clients",
            format!(
                "{:.0}/s, p50 {:.3} ms, p99 {:.3} ms, errors {}",
                cached.per_sec, cached.p50_ms, cached.p99_ms, cached.errors
            ),
            "p99 <= 1 ms, 0 errors",
            Some(cached.clean() && cached.p99_ms <= 1.0),
        );
        self.row(
            "P4 (ref)",
            "cached expected-interest query, 1 client",
            format!(
                "{:.0}/s, p50 {:.3} ms, p99 {:.3} ms, errors {}",
                cached_one.per_sec, cached_one.p50_ms, cached_one.p99_ms, cached_one.errors
            ),
            "reference: no queueing",
            None,
        );
        self.cpu_row("P4 cached", "cached query", &cached_cpu, cached.count);
        Ok(())
    }

    async fn p5(&mut self) -> anyhow::Result<()> {
        let n = self.args.history_entries;
        let customer = self.core.new_customer("History").await;
        let account = self.core.new_account(&customer).await;
        // The read path is measured: the entries are written straight into the
        // channel history (as a long-lived projection would hold them).
        self.channel_db
            .execute_unprepared(&format!(
                "INSERT INTO history_entries (account_id, seq, kind, amount, balance_after, occurred_at, business_date) \
                 SELECT '{account}', g, 'deposit', 1, g, now(), current_date FROM generate_series(1, {n}) g;
                 INSERT INTO history_sync (account_id, synced_through_seq) VALUES ('{account}', {n});
                 ANALYZE history_entries;"
            ))
            .await?;
        self.synthetic = account.clone();
        // The insert's own work (autovacuum, checkpoint) is not measured.
        self.settle().await?;
        let api = Api::new(self.transfer_url.clone(), Some(customer_token(&customer)));
        let id = common::AccountId::parse(account.as_str())?;
        // Page k's cursor: the entries below the lowest seq of page k - 1.
        let cursor_of_page =
            |k: i64| transfer::history::page::encode_cursor(&id, n - 20 * (k - 1) + 1);
        let mut figures = Vec::new();
        let mut results = serde_json::Map::new();
        // Page 1 is what a customer opening the history gets (it also lists
        // pending transfers and may sync the account); page 2 is the first
        // cursor page, the same query as page 500 near the top of the index.
        for (label, path) in [
            ("page 1", format!("/v1/accounts/{account}/history?limit=20")),
            (
                "page 2",
                format!(
                    "/v1/accounts/{account}/history?limit=20&cursor={}",
                    cursor_of_page(2)
                ),
            ),
            (
                "page 500",
                format!(
                    "/v1/accounts/{account}/history?limit=20&cursor={}",
                    cursor_of_page(500)
                ),
            ),
        ] {
            let check = api.get(&path).await.expect(200);
            assert_eq!(check.body["entries"].as_array().map(|e| e.len()), Some(20));
            let (lat, errors, elapsed) =
                closed_loop(&api, 8, self.args.secs / 2, None, move |_| {
                    Some(Op::get(path.clone()))
                })
                .await?;
            let s = stats(lat, errors, elapsed);
            figures.push(s.clone());
            results.insert(label.into(), json!(s));
        }
        let ratio = figures[2].p99_ms / figures[0].p99_ms.max(1e-9);
        let cursor_ratio = figures[2].p99_ms / figures[1].p99_ms.max(1e-9);
        self.json.insert("P5".into(), Value::Object(results));
        self.row(
            "P5",
            &format!("history pages, account with {n} entries, 8 clients"),
            format!(
                "page 1 p50 {:.2} / p99 {:.2} ms; page 2 p50 {:.2} / p99 {:.2} ms; page 500 p50 {:.2} / p99 {:.2} ms (p99 ratio to page 1 {ratio:.2}, to page 2 {cursor_ratio:.2}); errors {}",
                figures[0].p50_ms, figures[0].p99_ms, figures[1].p50_ms, figures[1].p99_ms,
                figures[2].p50_ms, figures[2].p99_ms,
                figures.iter().map(|f| f.errors).sum::<usize>()
            ),
            "page 500 p99 within 1.5x of page 1 (and of page 2, the same query near the top), 0 errors",
            Some(figures.iter().all(Stats::clean) && ratio <= 1.5 && cursor_ratio <= 1.5),
        );
        Ok(())
    }

    async fn p2(&mut self, rate: u64, reference: bool) -> anyhow::Result<()> {
        let n_customers = 1000;
        let mut senders = Vec::new();
        let customers: Vec<String> = futures::stream::iter(0..n_customers)
            .map(|_| async { self.core.new_customer("E2E").await })
            .buffer_unordered(32)
            .collect()
            .await;
        for c in &customers {
            let a = self.core.new_account(c).await;
            self.core.deposit(&a, 1_000_000_000).await.expect(200);
            senders.push((
                Api::new(self.transfer_url.clone(), Some(customer_token(c))),
                a,
            ));
        }
        let senders = Arc::new(senders);
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let total = rate * self.args.secs;
        let sent: SentLog = Arc::default();
        let errors = Arc::new(AtomicU64::new(0));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(total as usize);
        let cpu = self.cpu_meter().sample();
        let started = Instant::now();
        let t0 = chrono::Utc::now();
        let step = chrono::Duration::from_std(period)?;
        for i in 0..total as usize {
            tick.tick().await;
            let (senders, sent, errors) = (senders.clone(), sent.clone(), errors.clone());
            // Latency counts from when the request was due, not from when
            // a late generator got to send it (no coordinated omission).
            let at = t0 + step * i as i32;
            tasks.push(tokio::spawn(async move {
                let (api, from) = &senders[i % senders.len()];
                let to = &senders[(i * 7 + 1) % senders.len()].1;
                match api
                    .try_send(
                        "POST",
                        "/v1/transfers",
                        Some(json!({"from_account": from, "to_account": to, "amount": "1"})),
                        &[],
                    )
                    .await
                {
                    // Accepted: succeeded at once, or pending (202) and
                    // visible once it succeeds (one that fails never is,
                    // and counts as an error).
                    Ok(r) if r.status == 200 || r.status == 202 => {
                        if let Ok(mut s) = sent.lock() {
                            s.push((r.str("transfer_id"), at));
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let offered = started.elapsed();
        let sent = sent.lock().map(|s| s.clone()).unwrap_or_default();
        // Wait until every accepted transfer is in the channel history.
        let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
        // Wait cheaply (no scan of the history while the projector works),
        // then read the application times once.
        self.settle().await?;
        let cpu = self.cpu_meter().since(&cpu);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut applied: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
        while Instant::now() < deadline {
            let rows = self
                .channel_db
                .query_all_raw(Statement::from_sql_and_values(
                    self.channel_db.get_database_backend(),
                    "SELECT transfer_id, applied_at FROM history_entries WHERE kind = 'transfer_out' AND transfer_id = ANY($1)",
                    [ids.clone().into()],
                ))
                .await?;
            applied = rows
                .iter()
                .map(|r| {
                    (
                        r.try_get::<String>("", "transfer_id").unwrap(),
                        r.try_get("", "applied_at").unwrap(),
                    )
                })
                .collect();
            if applied.len() == ids.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let lat: Vec<Duration> = sent
            .iter()
            .filter_map(|(id, at)| {
                applied
                    .get(id)
                    .map(|a| (*a - *at).to_std().unwrap_or_default())
            })
            .collect();
        let missing = sent.len() - lat.len();
        let s = stats(
            lat,
            errors.load(Ordering::Relaxed) as usize + missing,
            offered,
        );
        let key = if reference { "P2_reference" } else { "P2" };
        self.json.insert(key.into(), json!(s));
        self.row(
            if reference { "P2 (ref)" } else { "P2" },
            &format!(
                "end to end at {}/s offered: accepted -> visible in channel history",
                rate
            ),
            format!(
                "{} accepted ({:.0}/s), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, errors {}",
                s.count, s.per_sec, s.p50_ms, s.p99_ms, s.max_ms, s.errors
            ),
            if reference {
                "reference: below saturation"
            } else {
                "p99 <= 100 ms, 0 errors"
            },
            if reference {
                None
            } else {
                Some(s.clean() && s.p99_ms <= 100.0)
            },
        );
        self.cpu_row(
            if reference { "P2 (ref)" } else { "P2" },
            "transfer end to end (channel, core, both relays, projector)",
            &cpu,
            s.count,
        );
        Ok(())
    }

    async fn p6(&mut self, accounts: &[String]) -> anyhow::Result<()> {
        // Everything so far is projected; then the projector stops.
        let projected = self.projected_sql();
        // Let the projector finish what earlier scenarios produced.
        self.settle().await?;
        let applied_before = count(&self.channel_db, &projected).await;
        // Its peak memory so far (P1-P5), before the process goes.
        if let Some(pid) = self.projector.pid()
            && let Some(peak) = status_mib(pid, "VmHWM:")
        {
            self.earlier_peaks.insert("projector", peak);
        }
        self.projector.terminate(Duration::from_secs(60)).await?;
        let transfers = self.args.backlog_events / 2;
        let accounts = Arc::new(accounts.to_vec());
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let workers: Vec<_> = (0..self.args.clients)
            .map(|_| {
                let (core, accounts, done) = (self.core.clone(), accounts.clone(), done.clone());
                tokio::spawn(async move {
                    let mut failing_since: Option<Instant> = None;
                    while done.fetch_add(1, Ordering::Relaxed) < transfers {
                        let (a, b) = {
                            let mut r = rand::rng();
                            let a = r.random_range(0..accounts.len());
                            (a, (a + r.random_range(1..accounts.len())) % accounts.len())
                        };
                        let body = bank_tests::client::transfer_body(&unique("trf_"), &accounts[a], &accounts[b], 1);
                        loop {
                            if matches!(core.try_send("POST", "/v1/transfers", Some(body.clone()), &[]).await, Ok(r) if r.status == 200) {
                                failing_since = None;
                                break;
                            }
                            let since = *failing_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_secs(60) {
                                anyhow::bail!("P6: the core refused transfers for 60 s");
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for w in workers {
            w.await??;
        }
        println!(
            "bench: P6 backlog of {} transfers written in {:.1} s",
            transfers,
            started.elapsed().as_secs_f64()
        );
        // Wait until the relay published everything.
        let deadline = Instant::now() + Duration::from_secs(300);
        while count(
            &self.core_db,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
        )
        .await
            > 0
        {
            if Instant::now() > deadline {
                anyhow::bail!("P6: the core's relay did not publish the backlog within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let target = count(&self.core_db, LEDGER_ENTRIES).await;
        let backlog = target - applied_before;
        self.projector.restart()?;
        let started = Instant::now();
        if let Some(pid) = self.projector.pid() {
            self.pids.retain(|(n, _)| *n != "projector");
            self.pids.push(("projector", pid));
        }
        let cpu = self.cpu_meter().sample();
        wait_ready(&self.projector_url).await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut now_applied = 0;
        let mut first_applied: Option<Duration> = None;
        while Instant::now() < deadline {
            now_applied = count(&self.channel_db, &projected).await;
            if first_applied.is_none() && now_applied > applied_before {
                first_applied = Some(started.elapsed());
            }
            if now_applied >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let elapsed = started.elapsed();
        let rate = (now_applied - applied_before) as f64 / elapsed.as_secs_f64();
        let cpu = self.cpu_meter().since(&cpu);
        self.json.insert(
            "P6".into(),
            json!({"backlog": backlog, "seconds": elapsed.as_secs_f64(), "events_per_sec": rate,
                   "first_applied_after_seconds": first_applied.map(|d| d.as_secs_f64())}),
        );
        self.row(
            "P6",
            &format!("projector catch-up from a backlog of {backlog} ledger events"),
            format!(
                "{rate:.0} events/s ({:.1} s, start-up included; first event applied after {:.1} s)",
                elapsed.as_secs_f64(),
                first_applied.unwrap_or_default().as_secs_f64()
            ),
            ">= 20,000 events/s",
            Some(rate >= 20_000.0 && now_applied >= target),
        );
        self.cpu_row(
            "P6",
            "ledger event caught up (projector and PostgreSQL)",
            &cpu,
            usize::try_from(now_applied - applied_before).unwrap_or(0),
        );
        let _ = &self.channel_db_url;
        Ok(())
    }

    fn memory(&mut self) {
        let mut parts = Vec::new();
        let mut ok = true;
        for (name, pid) in self.pids.clone() {
            let rss = status_mib(pid, "VmRSS:");
            // The peak over the whole run (for a process restarted during
            // it, over both), which is what must stay under the limit.
            let peak = status_mib(pid, "VmHWM:")
                .map(|p| p.max(self.earlier_peaks.get(name).copied().unwrap_or(0.0)));
            // A process whose memory cannot be read (it died) fails the row.
            ok &= peak.is_some_and(|peak| peak < 150.0);
            match (rss, peak) {
                (Some(rss), Some(peak)) => {
                    parts.push(format!("{name} {rss:.0} MiB (peak {peak:.0})"))
                }
                _ => parts.push(format!("{name} not running (pid {pid})")),
            }
            self.json.insert(format!("rss_mib_{name}"), json!(rss));
            self.json
                .insert(format!("peak_rss_mib_{name}"), json!(peak));
        }
        self.row(
            "-",
            "resident memory at the end (peak over the run)",
            parts.join(", "),
            "each < 150 MiB at its peak",
            Some(ok),
        );
    }

    fn report(&self, machine: &str) -> anyhow::Result<()> {
        let mut md = format!(
            "Machine: {machine}\n\n| # | scenario | figures | target | met |\n| --- | --- | --- | --- | --- |\n"
        );
        for r in &self.rows {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.id,
                r.scenario,
                r.figures,
                r.target,
                match r.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "-",
                }
            ));
        }
        std::fs::create_dir_all("target/bench")?;
        std::fs::write("target/bench/results.md", &md)?;
        let mut json = self.json.clone();
        json.insert("machine".into(), json!(machine));
        json.insert("rows".into(), serde_json::to_value(&self.rows)?);
        std::fs::write(
            "target/bench/results.json",
            serde_json::to_string_pretty(&json)?,
        )?;
        println!("\n{md}\nwritten to target/bench/results.md and target/bench/results.json");
        Ok(())
    }
}

/// A `/proc/<pid>/status` memory field (`VmRSS:`, `VmHWM:`) in MiB; `None`
/// when it cannot be read (the process is gone) or is zero.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|kib| kib / 1024.0)
        .filter(|mib| *mib > 0.0)
}

/// Runs pgbench with the plain-SQL equivalent of a transfer on the same
/// PostgreSQL and returns its transactions per second.
async fn pgbench(clients: usize, secs: u64, accounts: usize) -> anyhow::Result<f64> {
    let url = bank_tests::db::fresh_database("bench_pgbench").await?;
    let db = Database::connect(url.as_str()).await?;
    db.execute_unprepared(&format!(
        "CREATE TABLE pb_accounts (id int PRIMARY KEY, balance numeric(30,0) NOT NULL, last_seq bigint NOT NULL);
         CREATE TABLE pb_transfers (id bigserial PRIMARY KEY, from_acc int NOT NULL, to_acc int NOT NULL, amount numeric(30,0) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE pb_entries (account int NOT NULL, seq bigint NOT NULL, amount numeric(30,0) NOT NULL, balance_after numeric(30,0) NOT NULL, PRIMARY KEY (account, seq));
         CREATE TABLE pb_outbox (id bigserial PRIMARY KEY, payload text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), published_at timestamptz);
         INSERT INTO pb_accounts SELECT g, 1000000000, 0 FROM generate_series(1, {accounts}) g;"
    ))
    .await?;
    db.close().await?;
    let script = std::env::temp_dir().join(unique("pgbench-").to_string() + ".sql");
    std::fs::write(
        &script,
        format!(
            "\\set a random(1, {accounts})
\\set b 1 + (:a + random(0, {})) % {accounts}
\\set lo least(:a, :b)
\\set hi greatest(:a, :b)
BEGIN;
INSERT INTO pb_transfers (from_acc, to_acc, amount) VALUES (:a, :b, 1);
UPDATE pb_accounts SET balance = balance + CASE WHEN id = :a THEN -1 ELSE 1 END, last_seq = last_seq + 1 WHERE id = :lo;
UPDATE pb_accounts SET balance = balance + CASE WHEN id = :a THEN -1 ELSE 1 END, last_seq = last_seq + 1 WHERE id = :hi;
INSERT INTO pb_entries (account, seq, amount, balance_after) SELECT id, last_seq, CASE WHEN id = :a THEN -1 ELSE 1 END, balance FROM pb_accounts WHERE id IN (:lo, :hi);
INSERT INTO pb_outbox (payload) VALUES ('{{\"event\":\"transfer\"}}');
END;
",
            accounts - 2
        ),
    )?;
    // The same connection URL as the services' (TLS or not alike).
    let out = tokio::process::Command::new("pgbench")
        // Prepared statements: parsed and planned once per connection, as
        // the services' statements are.
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-f",
        ])
        .arg(&script)
        .arg(&url)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("pgbench could not run (install postgresql-client): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| {
            l.trim_start_matches("tps = ")
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no tps in pgbench output: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let failed = text
        .lines()
        .find(|l| l.contains("failed"))
        .unwrap_or("")
        .to_owned();
    println!("bench: pgbench baseline {tps:.0} tps {failed}");
    // A client that aborted (exit status 2) or failed transactions would make
    // the baseline look slower than the SQL is.
    let failures: u64 = failed
        .split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    anyhow::ensure!(
        out.status.success() && failures == 0,
        "pgbench did not run cleanly ({}; {failed}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(tps)
}

/// Transfers accepted by the channel, with the instant each request was sent.
type SentLog = Arc<std::sync::Mutex<Vec<(String, chrono::DateTime<chrono::Utc>)>>>;

/// A closed-loop operation that pays out interest on each of `accounts` once,
/// in order across all clients, and reports `NoMoreWork` when they run out.
/// Each call pays out the next account of `accounts` once; then no more work.
fn pay_each_once(
    accounts: Arc<Vec<String>>,
) -> impl Fn(usize) -> Option<Op> + Clone + Send + 'static {
    let next = Arc::new(AtomicUsize::new(0));
    move |_| {
        let acc = accounts.get(next.fetch_add(1, Ordering::Relaxed))?;
        Some(Op::post(
            format!("/v1/accounts/{acc}/interest/payouts"),
            json!({"payout_id": unique("pay_")}),
        ))
    }
}

/// One request of a closed-loop client.
struct Op {
    method: hyper::Method,
    path: String,
    body: Option<Value>,
}

impl Op {
    fn get(path: String) -> Self {
        Self {
            method: hyper::Method::GET,
            path,
            body: None,
        }
    }

    fn post(path: impl Into<String>, body: Value) -> Self {
        Self {
            method: hyper::Method::POST,
            path: path.into(),
            body: Some(body),
        }
    }
}

/// `clients` closed-loop clients, each on its own kept-alive HTTP/1.1
/// connection to `api` (with its token), each sending `next(i)` until the
/// time is up or `next` has no more work; a request counts when it is
/// answered 200. The client is lean on purpose (no connection pool, timer or
/// JSON parsing per request): the load generator shares the two cores with
/// the services, and reqwest took ~53 us of CPU per request, a third of the
/// machine at 12,000 cached queries/s, which then showed as server latency.
///
/// With `rate` (requests per second over all clients), each client sends on
/// a fixed schedule instead of right after the previous answer, and a
/// request's latency runs from its scheduled time, so time spent behind
/// schedule counts (no coordinated omission).
async fn closed_loop<F>(
    api: &Api,
    clients: usize,
    secs: u64,
    rate: Option<u64>,
    next: F,
) -> anyhow::Result<(Vec<Duration>, usize, Duration)>
where
    F: Fn(usize) -> Option<Op> + Clone + Send + 'static,
{
    use http_body_util::{BodyExt, Full};
    let authority = api
        .base
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("the load client needs an http:// base, got {}", api.base))?
        .to_owned();
    let auth = api.token().map(|t| format!("Bearer {t}"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<bytes::Bytes>>(
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(conn);
        let (next, errors, auth, authority) = (
            next.clone(),
            errors.clone(),
            auth.clone(),
            authority.clone(),
        );
        // Per-client interval of a paced run; clients are staggered evenly.
        let interval = rate.map(|r| Duration::from_secs_f64(clients as f64 / r.max(1) as f64));
        let mut scheduled = interval.map(|iv| started + iv.mul_f64(c as f64 / clients as f64));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c * 1_000_000;
            while Instant::now() < deadline {
                if let Some(at) = scheduled {
                    tokio::time::sleep_until(at.into()).await;
                }
                // The scenario's time ends with the last operation.
                let Some(op) = next(i) else { break };
                i += 1;
                let mut req = hyper::Request::builder()
                    .method(op.method)
                    .uri(op.path)
                    .header(hyper::header::HOST, authority.as_str());
                if let Some(auth) = &auth {
                    req = req.header(hyper::header::AUTHORIZATION, auth.as_str());
                }
                let body = match op.body {
                    Some(b) => {
                        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                        bytes::Bytes::from(serde_json::to_vec(&b).expect("json body"))
                    }
                    None => bytes::Bytes::new(),
                };
                let req = req.body(Full::new(body)).expect("request");
                let t = scheduled.unwrap_or_else(Instant::now);
                if let (Some(at), Some(iv)) = (scheduled.as_mut(), interval) {
                    *at += iv;
                }
                let ok = match sender.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        resp.into_body().collect().await.is_ok() && status == 200
                    }
                    Err(_) => false,
                };
                if ok {
                    lat.push(t.elapsed());
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if sender.ready().await.is_err() {
                        break;
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    Ok((all, errors.load(Ordering::Relaxed), started.elapsed()))
}
