//! Building and running the core bank service.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::http::Readiness;
use common::outbox::{Relay, RelayConfig, RelayWaker};
use common::service::{ServiceError, StepExt};
use common::shutdown::CancellationToken;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;

use crate::clock::Clock;
use crate::config::Config;
use crate::http::{self, AppShared, AppState};
use crate::interest::cache::InterestCache;
use crate::interest::rollout::Rollout;
use crate::interest::{InterestService, InterestSettings};
use crate::ledger::{Ledger, LedgerConfig};
use crate::migration::Migrator;

/// A built core bank: connected, migrated, listening, not yet serving.
pub struct App {
    config: Config,
    listener: TcpListener,
    db: DatabaseConnection,
    nats: async_nats::Client,
    js: jetstream::Context,
    clock: Clock,
    interest: InterestService,
    outbox: RelayWaker,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// The streams the core publishes to (through its outbox).
const STREAMS: &[common::jetstream::StreamSpec] = &[
    common::jetstream::LEDGER,
    common::jetstream::INTEREST,
    common::jetstream::ALERTS,
];

/// Connects to the core database and applies migrations.
pub async fn connect_db(config: &Config) -> Result<DatabaseConnection, ServiceError> {
    let db = common::db::connect(config.database_url.expose(), &config.pool, "core-bank")
        .await
        .step("connecting to the core database (CORE_DATABASE_URL)")?;
    common::db::migrate::<Migrator>(config.database_url.expose(), &config.pool, "core-bank")
        .await
        .step("migrating the core database")?;
    Ok(db)
}

/// The interest service over `db` (shared by the server and the verifier).
pub async fn interest_service(
    config: &Config,
    db: &DatabaseConnection,
    clock: &Clock,
    outbox: RelayWaker,
) -> Result<InterestService, ServiceError> {
    let settings = InterestSettings::parse(
        &config.interest.interest_tiers,
        &config.interest.interest_tax_percent,
    )
    .map_err(|e| ServiceError::Settings(format!("interest: {e}")))?;
    let rollout = Rollout::default();
    rollout
        .refresh(db)
        .await
        .step("reading the interest rollout")?;
    let cache = InterestCache::new(config.redis_url.expose(), settings.terms());
    Ok(InterestService::new(
        db.clone(),
        clock.clone(),
        settings,
        rollout,
        cache,
        outbox,
    ))
}

/// The business clock of `config`, synchronised with the database.
pub async fn clock(config: &Config, db: &DatabaseConnection) -> Result<Clock, ServiceError> {
    let tz = chrono_tz::Tz::from_str(&config.interest.time_zone).map_err(|e| {
        ServiceError::Settings(format!(
            "BANK_TIME_ZONE {:?}: {e}",
            config.interest.time_zone
        ))
    })?;
    let clock = Clock::new(tz, config.test_clock);
    clock.refresh(db).await.step("reading the business clock")?;
    Ok(clock)
}

impl App {
    /// Connects, migrates, ensures the streams and binds the listener.
    pub async fn build(config: Config) -> Result<Self, ServiceError> {
        // Install the metrics recorder before anything records.
        let _ = common::metrics::handle();
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        if config
            .read_api_token
            .as_ref()
            .is_some_and(|r| r.expose() == config.api_token.expose())
        {
            return Err(ServiceError::Settings(
                "CORE_READ_API_TOKEN must differ from CORE_API_TOKEN".into(),
            ));
        }
        let db = connect_db(&config).await?;
        let nats = common::jetstream::connect(config.nats.nats_url.expose(), "core-bank")
            .await
            .step("connecting to NATS (NATS_URL)")?;
        let js = jetstream::new(nats.clone());
        common::jetstream::ensure_streams(&js, STREAMS, config.nats.stream_replicas)
            .await
            .step("creating or updating the streams")?;
        let clock = clock(&config, &db).await?;
        let outbox = RelayWaker::default();
        let interest = interest_service(&config, &db, &clock, outbox.clone()).await?;
        let listener = TcpListener::bind(config.http_addr)
            .await
            .step(format!("binding {}", config.http_addr))?;
        Ok(Self {
            config,
            listener,
            db,
            nats,
            js,
            clock,
            interest,
            outbox,
        })
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`, then drains: readiness turns 503, the
    /// listener closes after `SHUTDOWN_DRAIN_DELAY_MS`, in-flight requests and
    /// queued ledger commands finish, the relay finishes its pass, and the
    /// background loops stop.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServiceError> {
        let background = CancellationToken::new();
        let relay = Relay::new(
            self.db.clone(),
            self.js.clone(),
            RelayConfig {
                service: "core-bank",
                batch_size: self.config.relay.outbox_batch_size,
                poll_interval: self.config.relay.poll_interval(),
                retention: Duration::from_secs(self.config.relay.outbox_retention_secs),
                streams: STREAMS,
                stream_replicas: self.config.nats.stream_replicas,
                abort_before_mark: false,
            },
            self.outbox.clone(),
        );
        let cache = self.interest.cache().clone();
        let wake = self.outbox.clone();
        let after_commit = Arc::new(move |touched: &[common::AccountId]| {
            cache.invalidate(touched);
            wake.wake();
        });
        let (ledger, workers) = Ledger::start(
            self.db.clone(),
            self.clock.clone(),
            LedgerConfig {
                batch_max: self.config.ledger_batch_max.max(1),
                workers: self.config.ledger_workers.max(1),
                parked_max: self.config.ledger_workers.max(1),
                queue_max: self.config.ledger_queue_max.max(1),
                request_ttl: self.config.request_ttl(),
            },
            after_commit,
        );

        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(relay.run(background.clone()));
        tasks.spawn(
            self.interest
                .cache()
                .clone()
                .run_invalidations(background.clone()),
        );
        tasks.spawn(refresh_settings(
            self.db.clone(),
            self.clock.clone(),
            self.interest.rollout().clone(),
            background.clone(),
        ));

        let readiness = Readiness::database_and_nats(self.db.clone(), self.nats.clone());
        let state = AppState::new(AppShared {
            db: self.db.clone(),
            clock: self.clock.clone(),
            ledger,
            interest: self.interest.clone(),
            request_ttl: self.config.request_ttl(),
            verifying: tokio::sync::Semaphore::new(1),
            tokens: http::ServiceTokens {
                full: Arc::from(self.config.api_token.expose()),
                read_only: self
                    .config
                    .read_api_token
                    .as_ref()
                    .map(|t| Arc::from(t.expose())),
            },
        });
        let router = http::router(state, readiness.clone(), self.config.http.request_timeout());
        let stop_http = readiness.drain_on(shutdown, self.config.http.drain_delay());
        common::http::serve("core-bank", self.listener, router, stop_http).await?;

        // No request is in flight any more, so no ledger handle is left: the
        // workers finish what is queued and stop.
        workers.join_all().await;
        // Shadow comparisons of answers already given still report, within
        // a bound: a replay stuck behind the database must not hold the exit.
        finish_tracked(
            self.interest.shadow_tasks(),
            "interest shadow comparisons still running at shutdown; not waiting for them",
        )
        .await;
        // A payout cut off before its outcome was known invalidates its
        // account a second time a few seconds later: made before the last
        // flush of the cache's invalidations.
        finish_tracked(
            self.interest.cache().unsettled_tasks(),
            "second interest cache invalidations not made at shutdown",
        )
        .await;
        background.cancel();
        while tasks.join_next().await.is_some() {}
        let _ = self.nats.flush().await;
        tracing::info!("core-bank stopped");
        Ok(())
    }
}

/// Every second: the business clock and the interest rollout, so every
/// replica follows changes made through any other.
async fn refresh_settings(
    db: DatabaseConnection,
    clock: Clock,
    rollout: Rollout,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut refusing_test_date = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match clock.refresh(&db).await {
            Ok(()) => refusing_test_date = false,
            Err(e @ crate::clock::RefreshError::MovedByATestClock { .. }) => {
                // Logged once: it stays so until someone repairs the database.
                if !refusing_test_date {
                    tracing::error!(error = %e, "not following the stored business date");
                }
                refusing_test_date = true;
            }
            Err(e) => {
                tracing::warn!(error = %common::error_chain(&e), "refreshing the business clock")
            }
        }
        if let Err(e) = rollout.refresh(&db).await {
            tracing::warn!(error = %e, "refreshing the interest rollout");
        }
    }
}

/// `core-bank verify-interest`: compares both interest paths with a progress
/// bar; returns the number of mismatches.
pub async fn verify_interest(config: Config, sample: Option<u64>) -> Result<usize, ServiceError> {
    let db = connect_db(&config).await?;
    let clock = clock(&config, &db).await?;
    let interest = interest_service(&config, &db, &clock, RelayWaker::default()).await?;
    // A bar on a terminal; elsewhere (a Kubernetes Job's log, a pipe) the
    // bar would not be drawn, so progress is a line at every tenth.
    use std::io::IsTerminal;
    let on_terminal = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} verifying interest [{bar:40}] {pos}/{len} accounts ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut shown = 0;
    let report = interest
        .verify(sample, |done, total| {
            if on_terminal {
                bar.set_length(total);
                bar.set_position(done);
            } else if done == total || done >= shown + total.div_ceil(10).max(1) {
                shown = done;
                eprintln!("verifying interest: {done}/{total} accounts");
            }
        })
        .await
        .step("verifying interest")?;
    bar.finish();
    println!(
        "{}",
        serde_json::to_string_pretty(&report).step("writing the report")?
    );
    Ok(report.mismatches.len())
}

/// Closes `tasks` and waits for them, at most 10 s (a task stuck behind the
/// database must not hold the exit); `left_behind` is logged, with how many,
/// when some are still running then.
async fn finish_tracked(tasks: &tokio_util::task::TaskTracker, left_behind: &'static str) {
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(left = tasks.len(), "{left_behind}");
    }
}
