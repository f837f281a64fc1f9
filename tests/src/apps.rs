//! The services, spawned in-process on port 0 against fresh databases.

use std::time::Duration;

use common::config::Secret;
use common::shutdown::CancellationToken;
use tokio::task::JoinHandle;

use crate::client::Api;
use crate::db::fresh_database;
use crate::nats::NatsServer;

/// Service credential used by tests.
pub const CORE_TOKEN: &str = "test-core-token";
/// The core's read-only credential in tests: the projector's, so every
/// projector test shows it needs nothing more.
pub const CORE_READ_TOKEN: &str = "test-core-read-token";
/// JWT secret used by tests.
pub const JWT_SECRET: &str = "test-jwt-secret";

/// A core bank running in this process.
pub struct CoreApp {
    /// Authenticated client.
    pub api: Api,
    /// The database URL.
    pub db_url: String,
    /// The configuration it runs with.
    pub config: core_bank::Config,
    task: Running,
}

/// Options for [`CoreApp::spawn`].
#[derive(Debug, Clone)]
pub struct CoreOptions {
    /// `REQUEST_TTL_SECS`.
    pub request_ttl_secs: u64,
    /// `BANK_TEST_CLOCK`.
    pub test_clock: bool,
    /// `REDIS_URL`.
    pub redis_url: String,
    /// `DATABASE_LOCK_TIMEOUT_MS`.
    pub lock_timeout_ms: u64,
    /// Use this database instead of a fresh one.
    pub database_url: Option<String>,
    /// `DATABASE_MAX_CONNECTIONS`.
    pub db_max_connections: u32,
    /// `HTTP_REQUEST_TIMEOUT_MS`.
    pub request_timeout_ms: u64,
    /// `INTEREST_TIERS` (`None`: the default).
    pub interest_tiers: Option<String>,
    /// `INTEREST_TAX_PERCENT` (`None`: the default).
    pub interest_tax_percent: Option<String>,
}

impl Default for CoreOptions {
    fn default() -> Self {
        Self {
            interest_tiers: None,
            interest_tax_percent: None,
            request_ttl_secs: 60,
            test_clock: true,
            redis_url: crate::redis_url(),
            lock_timeout_ms: 2_000,
            database_url: None,
            db_max_connections: 6,
            request_timeout_ms: 30_000,
        }
    }
}

impl CoreApp {
    /// Starts a core bank with default options.
    pub async fn spawn(nats: &NatsServer) -> anyhow::Result<Self> {
        Self::spawn_with(nats, CoreOptions::default()).await
    }

    /// Starts a second replica of this core: the same database, defaults
    /// otherwise.
    pub async fn replica(&self, nats: &NatsServer) -> anyhow::Result<Self> {
        Self::spawn_with(
            nats,
            CoreOptions {
                database_url: Some(self.db_url.clone()),
                ..CoreOptions::default()
            },
        )
        .await
    }

    /// Starts a core bank.
    pub async fn spawn_with(nats: &NatsServer, opts: CoreOptions) -> anyhow::Result<Self> {
        crate::init_logging();
        let db_url = match opts.database_url {
            Some(u) => u,
            None => fresh_database("core").await?,
        };
        let mut config = core_bank::Config::defaults();
        config.http_addr = "127.0.0.1:0".parse()?;
        config.database_url = Secret::new(db_url.clone());
        config.nats.nats_url = Secret::new(nats.url());
        config.redis_url = Secret::new(opts.redis_url);
        config.api_token = Secret::new(CORE_TOKEN);
        config.read_api_token = Some(Secret::new(CORE_READ_TOKEN));
        config.request_ttl_secs = opts.request_ttl_secs;
        config.test_clock = opts.test_clock;
        config.pool.db_max_connections = opts.db_max_connections;
        config.pool.db_lock_timeout_ms = opts.lock_timeout_ms;
        config.http.http_request_timeout_ms = opts.request_timeout_ms;
        if let Some(tiers) = opts.interest_tiers {
            config.interest.interest_tiers = tiers;
        }
        if let Some(tax) = opts.interest_tax_percent {
            config.interest.interest_tax_percent = tax;
        }
        config.relay.outbox_poll_interval_ms = 100;
        Self::start(config).await
    }

    /// Starts a core bank with exactly this configuration.
    pub async fn start(config: core_bank::Config) -> anyhow::Result<Self> {
        let db_url = config.database_url.expose().to_owned();
        let app = core_bank::App::build(config.clone()).await?;
        let addr = app.local_addr()?;
        let task = Running::spawn(|shutdown| app.run(shutdown));
        Ok(Self {
            api: Api::new(format!("http://{addr}"), Some(CORE_TOKEN.to_owned())),
            db_url,
            config,
            task,
        })
    }

    /// Shuts the service down gracefully and waits for it (at most 30 s).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.task.stop().await
    }
}

/// A NATS server of its own and a core bank on it with `opts`.
pub async fn core_with(opts: CoreOptions) -> (NatsServer, CoreApp) {
    let nats = NatsServer::start().await.expect("nats-server");
    let core = CoreApp::spawn_with(&nats, opts).await.expect("core-bank");
    (nats, core)
}

/// A NATS server of its own and a core bank on it with default options.
pub async fn core() -> (NatsServer, CoreApp) {
    core_with(CoreOptions::default()).await
}

/// A customer token signed with the tests' JWT secret, valid for an hour.
pub fn customer_token(customer: &str) -> String {
    transfer::auth::issue_token(JWT_SECRET, customer, 3600).expect("token")
}

/// A transfer service running in this process.
pub struct TransferApp {
    /// Base URL.
    pub base: String,
    /// The channel database URL.
    pub db_url: String,
    /// The configuration it runs with.
    pub config: transfer::Config,
    task: Running,
}

/// Options for [`TransferApp::spawn`].
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// `REQUEST_TTL_SECS`.
    pub request_ttl_secs: u64,
    /// `CORE_TIMEOUT_MS`.
    pub core_timeout_ms: u64,
    /// `RECONCILE_INTERVAL_MS`.
    pub reconcile_interval_ms: u64,
    /// `RECONCILE_FENCE_MARGIN_MS`.
    pub fence_margin_ms: u64,
    /// Use this channel database instead of a fresh one.
    pub database_url: Option<String>,
    /// `HTTP_REQUEST_TIMEOUT_MS`.
    pub request_timeout_ms: u64,
    /// `DATABASE_LOCK_TIMEOUT_MS`.
    pub lock_timeout_ms: u64,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            request_ttl_secs: 60,
            core_timeout_ms: 3000,
            reconcile_interval_ms: 200,
            fence_margin_ms: 1000,
            database_url: None,
            request_timeout_ms: 30_000,
            lock_timeout_ms: 2_000,
        }
    }
}

impl TransferApp {
    /// Starts a transfer service talking to the core at `core_url`.
    pub async fn spawn(
        nats: &NatsServer,
        core_url: &str,
        opts: TransferOptions,
    ) -> anyhow::Result<Self> {
        crate::init_logging();
        let db_url = match opts.database_url {
            Some(u) => u,
            None => fresh_database("channel").await?,
        };
        let mut config = transfer::Config::defaults();
        config.http_addr = "127.0.0.1:0".parse()?;
        config.database_url = Secret::new(db_url.clone());
        config.core.core_url = core_url.to_owned();
        config.core.core_api_token = Secret::new(CORE_TOKEN);
        config.jwt_secret = Secret::new(JWT_SECRET);
        config.nats.nats_url = Secret::new(nats.url());
        config.request_ttl_secs = opts.request_ttl_secs;
        config.core_timeout_ms = opts.core_timeout_ms;
        config.reconcile_interval_ms = opts.reconcile_interval_ms;
        config.fence_margin_ms = opts.fence_margin_ms;
        config.pool.db_max_connections = 6;
        config.pool.db_lock_timeout_ms = opts.lock_timeout_ms;
        config.http.http_request_timeout_ms = opts.request_timeout_ms;
        config.relay.outbox_poll_interval_ms = 100;
        let app = transfer::App::build(config.clone()).await?;
        let addr = app.local_addr()?;
        let task = Running::spawn(|shutdown| app.run(shutdown));
        Ok(Self {
            base: format!("http://{addr}"),
            db_url,
            config,
            task,
        })
    }

    /// A client acting as `customer`.
    pub fn as_customer(&self, customer: &str) -> Api {
        Api::new(self.base.clone(), Some(customer_token(customer)))
    }

    /// Shuts down gracefully and waits (at most 30 s).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.task.stop().await
    }
}

/// A projector running in this process.
pub struct ProjectorApp {
    /// Client of its operations API.
    pub api: Api,
    /// The configuration it runs with.
    pub config: projector::Config,
    task: Running,
}

/// Options for [`ProjectorApp::spawn`].
#[derive(Debug, Clone)]
pub struct ProjectorOptions {
    /// `PROJECTOR_MAX_DELIVERIES`.
    pub max_deliveries: i64,
    /// `PROJECTOR_RETRY_BASE_MS`.
    pub retry_base_ms: u64,
    /// `PROJECTOR_RETRY_MAX_MS`.
    pub retry_max_ms: u64,
    /// `PROJECTOR_ACK_WAIT_SECS`.
    pub ack_wait_secs: u64,
    /// `PROJECTOR_TAX_SWEEP_SECS`.
    pub tax_sweep_secs: u64,
    /// `PROJECTOR_TAX_SWEEP_PAGE`.
    pub tax_sweep_page: i64,
    /// `PROJECTOR_TAX_SWEEP_OVERLAP_SECS`.
    pub tax_sweep_overlap_secs: u64,
    /// `PROJECTOR_API_TOKEN` (unset: `/v1` is open); the app's client
    /// presents it.
    pub api_token: Option<&'static str>,
    /// `PROJECTOR_AUDIT_SECS`.
    pub audit_secs: u64,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        Self {
            max_deliveries: 5,
            retry_base_ms: 100,
            retry_max_ms: 2_000,
            ack_wait_secs: 30,
            tax_sweep_secs: 60,
            tax_sweep_page: 500,
            tax_sweep_overlap_secs: 600,
            api_token: None,
            audit_secs: 600,
        }
    }
}

impl ProjectorOptions {
    /// The configuration of a projector with these options on the channel
    /// database `db_url`, reading the core at `core_url`, listening on a
    /// free port.
    pub fn config(&self, nats: &NatsServer, core_url: &str, db_url: &str) -> projector::Config {
        let mut config = projector::Config::defaults();
        config.http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.database_url = Secret::new(db_url);
        config.core.core_url = core_url.to_owned();
        config.core.core_api_token = Secret::new(CORE_READ_TOKEN);
        config.nats.nats_url = Secret::new(nats.url());
        config.max_deliveries = self.max_deliveries;
        config.retry_base_ms = self.retry_base_ms;
        config.retry_max_ms = self.retry_max_ms;
        config.ack_wait_secs = self.ack_wait_secs;
        config.tax_sweep_secs = self.tax_sweep_secs;
        config.tax_sweep_page = self.tax_sweep_page;
        config.tax_sweep_overlap_secs = self.tax_sweep_overlap_secs;
        config.audit_secs = self.audit_secs;
        config.api_token = self.api_token.map(Secret::new);
        config.pool.db_max_connections = 6;
        config
    }
}

impl ProjectorApp {
    /// Starts a projector on the channel database `db_url`.
    pub async fn spawn(
        nats: &NatsServer,
        core_url: &str,
        db_url: &str,
        opts: ProjectorOptions,
    ) -> anyhow::Result<Self> {
        crate::init_logging();
        let config = opts.config(nats, core_url, db_url);
        let app = projector::App::build(config.clone()).await?;
        let addr = app.local_addr()?;
        let task = Running::spawn(|shutdown| app.run(shutdown));
        Ok(Self {
            api: Api::new(format!("http://{addr}"), opts.api_token.map(str::to_owned)),
            config,
            task,
        })
    }

    /// Shuts down gracefully and waits (at most 30 s).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.task.stop().await
    }
}

/// The whole backbone in one process: NATS, core, transfer service (through
/// a fault proxy to the core) and projector sharing the channel database.
pub struct Stack {
    /// The NATS server.
    pub nats: NatsServer,
    /// The core.
    pub core: CoreApp,
    /// The proxy between the transfer service and the core.
    pub proxy: crate::proxy::FaultProxy,
    /// The transfer service.
    pub transfer: TransferApp,
    /// The projector, if started.
    pub projector: Option<ProjectorApp>,
}

/// Options for [`Stack::start`].
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// Transfer service options.
    pub transfer: TransferOptions,
    /// Core options.
    pub core: CoreOptions,
    /// Start the projector.
    pub with_projector: bool,
    /// Projector options.
    pub projector: ProjectorOptions,
    /// The core's `REQUEST_TTL_SECS`, when it is not to be the channel's
    /// (a misconfiguration the fence must still cover).
    pub core_request_ttl_secs: Option<u64>,
}

impl Stack {
    /// Starts everything.
    pub async fn start(opts: StackOptions) -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        let mut core_opts = opts.core.clone();
        core_opts.request_ttl_secs = opts
            .core_request_ttl_secs
            .unwrap_or(opts.transfer.request_ttl_secs);
        let core = CoreApp::spawn_with(&nats, core_opts).await?;
        let proxy = crate::proxy::FaultProxy::start(&core.api.base).await?;
        let transfer = TransferApp::spawn(&nats, &proxy.url(), opts.transfer.clone()).await?;
        let projector = if opts.with_projector {
            Some(
                ProjectorApp::spawn(
                    &nats,
                    &core.api.base,
                    &transfer.db_url,
                    opts.projector.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        Ok(Self {
            nats,
            core,
            proxy,
            transfer,
            projector,
        })
    }

    /// A customer with one funded account at the core: (customer id, account id, client).
    pub async fn customer_with_account(&self, balance: u64) -> (String, String, Api) {
        let c = self.core.api.new_customer("Customer").await;
        let a = self.core.api.new_account(&c).await;
        if balance > 0 {
            self.core.api.deposit(&a, balance).await.expect(200);
        }
        let api = self.transfer.as_customer(&c);
        (c, a, api)
    }
}

/// A service's run loop on this runtime, shut down gracefully by [`Running::stop`]
/// or, when dropped, by cancelling its token.
struct Running {
    shutdown: CancellationToken,
    handle: Option<JoinHandle<Result<(), common::service::ServiceError>>>,
}

impl Running {
    fn spawn<F>(run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: std::future::Future<Output = Result<(), common::service::ServiceError>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(shutdown.clone()));
        Self {
            shutdown,
            handle: Some(handle),
        }
    }

    /// Cancels the run loop and waits for it (at most 30 s).
    async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), h).await???;
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
