//! Building and running the projector.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use common::http::Readiness;
use common::service::{ServiceError, StepExt};
use common::shutdown::CancellationToken;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::consume::{self, Context, Feed};
use crate::migration::Migrator;

/// Connects to the channel database, NATS and the core; applies migrations
/// and ensures the streams. Shared by the service and the CLI.
pub async fn context(config: &Config) -> Result<(Context, async_nats::Client), ServiceError> {
    let db: DatabaseConnection =
        transfer::app::connect_db(config.database_url.expose(), &config.pool, "projector").await?;
    common::db::migrate::<Migrator>(config.database_url.expose(), &config.pool, "projector")
        .await
        .step("migrating the projector tables")?;
    let nats = common::jetstream::connect(config.nats.nats_url.expose(), "projector")
        .await
        .step("connecting to NATS (NATS_URL)")?;
    let js = jetstream::new(nats.clone());
    common::jetstream::ensure_streams(
        &js,
        &[
            common::jetstream::LEDGER,
            common::jetstream::INTEREST,
            common::jetstream::DLQ,
        ],
        config.nats.stream_replicas,
    )
    .await
    .step("creating or updating the streams")?;
    let core = config
        .core
        .client(Duration::from_secs(10))
        .step("building the core client")?;
    Ok((
        Context {
            db,
            core,
            js,
            config: config.clone(),
        },
        nats,
    ))
}

/// A built projector: connected, consumers created, listening.
pub struct App {
    ctx: Context,
    nats: async_nats::Client,
    listener: TcpListener,
    ledger: jetstream::consumer::PullConsumer,
    interest: jetstream::consumer::PullConsumer,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl App {
    /// Connects, migrates, creates the durable consumers and binds the listener.
    pub async fn build(config: Config) -> Result<Self, ServiceError> {
        let _ = common::metrics::handle();
        for warning in config.pool.warnings() {
            tracing::warn!("{warning}");
        }
        // Series the alerts watch with increase(), present from the start: a
        // counter first seen at 1 would count as no increase.
        for stream in [
            common::jetstream::LEDGER_STREAM,
            common::jetstream::INTEREST_STREAM,
        ] {
            for kind in ["permanent", "exhausted"] {
                metrics::counter!("projector_dead_letters_total", "stream" => stream, "kind" => kind)
                    .increment(0);
            }
        }
        metrics::counter!("projector_dead_letter_publish_failures_total").increment(0);
        metrics::counter!("projector_conflicting_events_total").increment(0);
        metrics::counter!("projector_interest_events_not_the_cores_total").increment(0);
        metrics::counter!("projector_tax_records_recovered_total").increment(0);
        metrics::counter!("projector_tax_sweep_errors_total").increment(0);
        metrics::counter!("projector_tax_sweep_given_up_total").increment(0);
        metrics::counter!("history_repairs_total").increment(0);
        metrics::counter!("projector_audit_repairs_total").increment(0);
        metrics::counter!("projector_audit_errors_total").increment(0);
        let (ctx, nats) = context(&config).await?;
        let ledger = consume::consumer(&ctx, Feed::Ledger)
            .await
            .step("creating the ledger consumer")?;
        let interest = consume::consumer(&ctx, Feed::Interest)
            .await
            .step("creating the interest consumer")?;
        let listener = TcpListener::bind(config.http_addr)
            .await
            .step(format!("binding {}", config.http_addr))?;
        if config.api_token.is_none() && !config.http_addr.ip().is_loopback() {
            // Dead letters hold memos and names, and a replay writes.
            tracing::warn!(addr = %config.http_addr, "the dead-letter and tax-record API is open to anyone who can reach this address; set PROJECTOR_API_TOKEN");
        }
        Ok(Self {
            ctx,
            nats,
            listener,
            ledger,
            interest,
        })
    }

    /// The address of the operations API.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Consumes and serves until `shutdown`; then stops fetching, finishes
    /// the batches in hand, and exits. Unacknowledged messages are redelivered.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServiceError> {
        let consumers = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(consume::run(
            self.ctx.clone(),
            Feed::Ledger,
            self.ledger.clone(),
            consumers.clone(),
        ));
        tasks.spawn(consume::run(
            self.ctx.clone(),
            Feed::Interest,
            self.interest.clone(),
            consumers.clone(),
        ));
        tasks.spawn(consume::tax::sweep(
            self.ctx.clone(),
            Duration::from_secs(self.ctx.config.tax_sweep_secs.max(1)),
            Duration::from_secs(self.ctx.config.tax_sweep_overlap_secs),
            self.ctx.config.tax_sweep_page,
            consumers.clone(),
        ));
        tasks.spawn(consume::audit::audit(
            self.ctx.clone(),
            self.ledger.clone(),
            Duration::from_secs(self.ctx.config.audit_secs.max(1)),
            self.ctx.config.audit_page,
            consumers.clone(),
        ));
        tasks.spawn(consume::report_pending(
            vec![
                (Feed::Ledger, self.ledger.clone()),
                (Feed::Interest, self.interest.clone()),
            ],
            consumers.clone(),
        ));
        let readiness = Readiness::database_and_nats(self.ctx.db.clone(), self.nats.clone());
        let router = crate::http::router(
            self.ctx.clone(),
            readiness.clone(),
            self.ctx
                .config
                .api_token
                .as_ref()
                .map(|t| t.expose().to_owned()),
            self.ctx.config.http.request_timeout(),
        );
        let stop_http = readiness.drain_on(shutdown.clone(), self.ctx.config.http.drain_delay());
        // Fetching stops at once; unacknowledged messages are redelivered.
        let stop_consumers = consumers.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stop_consumers.cancel();
        });
        common::http::serve("projector", self.listener, router, stop_http).await?;
        consumers.cancel();
        while tasks.join_next().await.is_some() {}
        let _ = self.nats.flush().await;
        tracing::info!("projector stopped");
        Ok(())
    }
}
