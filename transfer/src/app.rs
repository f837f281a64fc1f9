//! Building and running the transfer service.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use common::http::Readiness;
use common::outbox::{Relay, RelayConfig, RelayWaker};
use common::service::{ServiceError, StepExt};
use common::shutdown::CancellationToken;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;

use crate::auth::TokenVerifier;
use crate::config::Config;
use crate::core_client::CoreClient;
use crate::http::{self, AppShared, AppState};
use crate::migration::Migrator;
use crate::transfers::reconciler::{self, Resolver};
use crate::transfers::service::TransferService;

/// A built transfer service: connected, migrated, listening, not yet serving.
pub struct App {
    config: Config,
    listener: TcpListener,
    db: DatabaseConnection,
    nats: async_nats::Client,
    js: jetstream::Context,
    core: CoreClient,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// The streams the transfer service publishes to (through its outbox).
const STREAMS: &[common::jetstream::StreamSpec] = &[common::jetstream::TRANSFERS];

/// Connects to the channel database and applies the channel migrations.
pub async fn connect_db(
    url: &str,
    pool: &common::config::PoolArgs,
    name: &str,
) -> Result<DatabaseConnection, ServiceError> {
    let db = common::db::connect(url, pool, name)
        .await
        .step("connecting to the channel database (CHANNEL_DATABASE_URL)")?;
    common::db::migrate::<Migrator>(url, pool, name)
        .await
        .step("migrating the channel database")?;
    Ok(db)
}

impl App {
    /// Connects, migrates, ensures the `TRANSFERS` stream and binds the listener.
    pub async fn build(config: Config) -> Result<Self, ServiceError> {
        config.check().map_err(ServiceError::Settings)?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let _ = common::metrics::handle();
        // Watched with increase() by LedgerEventsNotTheCores: present from
        // the start, so the first repair counts.
        metrics::counter!("history_repairs_total").increment(0);
        let db = connect_db(config.database_url.expose(), &config.pool, "transfer").await?;
        let nats = common::jetstream::connect(config.nats.nats_url.expose(), "transfer")
            .await
            .step("connecting to NATS (NATS_URL)")?;
        let js = jetstream::new(nats.clone());
        common::jetstream::ensure_streams(&js, STREAMS, config.nats.stream_replicas)
            .await
            .step("creating or updating the streams")?;
        let core = config
            .core
            .client(crate::config::CORE_CALL_TIMEOUT)
            .step("building the core client")?;
        let listener = TcpListener::bind(config.http_addr)
            .await
            .step(format!("binding {}", config.http_addr))?;
        Ok(Self {
            config,
            listener,
            db,
            nats,
            js,
            core,
        })
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`, then drains (readiness 503, listener closes
    /// after the drain delay, in-flight requests finish, loops stop).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServiceError> {
        let background = CancellationToken::new();
        let fence_after = self.config.fence_after();
        let outbox = RelayWaker::default();
        let resolver = Resolver::new(
            self.db.clone(),
            outbox.clone(),
            self.core.clone(),
            fence_after,
            background.clone(),
        );
        let transfers = TransferService::new(
            self.db.clone(),
            self.core.clone(),
            Duration::from_millis(self.config.core_timeout_ms),
            resolver,
        );
        let relay = Relay::new(
            self.db.clone(),
            self.js.clone(),
            RelayConfig {
                service: "transfer",
                batch_size: self.config.relay.outbox_batch_size,
                poll_interval: self.config.relay.poll_interval(),
                retention: Duration::from_secs(self.config.relay.outbox_retention_secs),
                streams: STREAMS,
                stream_replicas: self.config.nats.stream_replicas,
                abort_before_mark: false,
            },
            outbox.clone(),
        );
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(relay.run(background.clone()));
        tasks.spawn(reconciler::run(
            self.db.clone(),
            outbox.clone(),
            self.core.clone(),
            Duration::from_millis(self.config.reconcile_interval_ms.max(10)),
            fence_after,
            background.clone(),
        ));

        let readiness = Readiness::database_and_nats(self.db.clone(), self.nats.clone());
        let state = AppState::new(AppShared {
            db: self.db.clone(),
            core: self.core.clone(),
            transfers: transfers.clone(),
            verifier: TokenVerifier::new(self.config.jwt_secret.expose()),
            owners: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(self.config.ownership_cache_secs))
                .build(),
        });
        let router = http::router(state, readiness.clone(), self.config.http.request_timeout());
        let stop_http = readiness.drain_on(shutdown, self.config.http.drain_delay());
        common::http::serve("transfer", self.listener, router, stop_http).await?;
        // Requests are answered; transfers answered 202 at their deadline
        // may still be executing: let them record their outcomes.
        transfers
            .finish_executions(self.config.execution_bound())
            .await;
        background.cancel();
        while tasks.join_next().await.is_some() {}
        let _ = self.nats.flush().await;
        tracing::info!("transfer stopped");
        Ok(())
    }
}
