//! The three services as processes (the real binaries), for tests and tools
//! that kill, signal or observe whole processes.

use std::collections::HashMap;
use std::time::Duration;

use crate::apps::{CORE_READ_TOKEN, CORE_TOKEN, JWT_SECRET};
use crate::client::Api;
use crate::nats::{NatsServer, free_port};
use crate::process::ServiceProcess;

/// Addresses and settings of a process stack.
#[derive(Debug, Clone)]
pub struct ProcConfig {
    /// core-bank base URL.
    pub core_url: String,
    /// transfer base URL.
    pub transfer_url: String,
    /// projector base URL.
    pub projector_url: String,
    /// Core database.
    pub core_db: String,
    /// Channel database.
    pub channel_db: String,
    /// Extra environment for every process.
    pub env: HashMap<String, String>,
}

/// core-bank, transfer and projector running as processes.
pub struct ProcStack {
    /// Settings.
    pub cfg: ProcConfig,
    /// core-bank.
    pub core: ServiceProcess,
    /// transfer.
    pub transfer: ServiceProcess,
    /// projector.
    pub projector: ServiceProcess,
}

impl ProcStack {
    /// Fresh databases and free ports; `extra` is added to every process's environment.
    pub async fn start(nats: &NatsServer, extra: HashMap<String, String>) -> anyhow::Result<Self> {
        let cfg = ProcConfig {
            // A test may choose the core's address (to put a proxy before it).
            core_url: extra
                .get("CORE_HTTP_ADDR")
                .cloned()
                .unwrap_or_else(|| format!("127.0.0.1:{}", free_port())),
            transfer_url: format!("127.0.0.1:{}", free_port()),
            projector_url: format!("127.0.0.1:{}", free_port()),
            core_db: crate::db::fresh_database("core").await?,
            channel_db: crate::db::fresh_database("channel").await?,
            env: extra,
        };
        let mut base = cfg.env.clone();
        for (k, v) in [
            ("NATS_URL", nats.url()),
            ("CORE_API_TOKEN", CORE_TOKEN.to_owned()),
            ("CORE_READ_API_TOKEN", CORE_READ_TOKEN.to_owned()),
            ("AUTH_JWT_SECRET", JWT_SECRET.to_owned()),
            ("CORE_URL", format!("http://{}", cfg.core_url)),
            ("CORE_DATABASE_URL", cfg.core_db.clone()),
            ("CHANNEL_DATABASE_URL", cfg.channel_db.clone()),
            ("CORE_HTTP_ADDR", cfg.core_url.clone()),
            ("TRANSFER_HTTP_ADDR", cfg.transfer_url.clone()),
            ("PROJECTOR_HTTP_ADDR", cfg.projector_url.clone()),
            ("DATABASE_MAX_CONNECTIONS", "8".to_owned()),
        ] {
            base.entry(k.to_owned()).or_insert(v);
        }
        // The core's log lines are kept (`logged_lines`): a test asserts
        // what it logged.
        let core = ServiceProcess::start_logged("core-bank", base.clone())?;
        wait_ready(&format!("http://{}", cfg.core_url)).await?;
        let transfer = ServiceProcess::start("transfer", base.clone())?;
        // The projector only reads from the core.
        let mut projector_env = base;
        if !cfg.env.contains_key("CORE_API_TOKEN") {
            projector_env.insert("CORE_API_TOKEN".to_owned(), CORE_READ_TOKEN.to_owned());
        }
        let projector = ServiceProcess::start("projector", projector_env)?;
        wait_ready(&format!("http://{}", cfg.transfer_url)).await?;
        wait_ready(&format!("http://{}", cfg.projector_url)).await?;
        Ok(Self {
            cfg,
            core,
            transfer,
            projector,
        })
    }

    /// Service client of the core.
    pub fn core_api(&self) -> Api {
        Api::new(
            format!("http://{}", self.cfg.core_url),
            Some(CORE_TOKEN.to_owned()),
        )
    }

    /// Base URL of the transfer service.
    pub fn transfer_base(&self) -> String {
        format!("http://{}", self.cfg.transfer_url)
    }

    /// Client of the projector.
    pub fn projector_api(&self) -> Api {
        Api::new(format!("http://{}", self.cfg.projector_url), None)
    }
}

/// Waits (up to 60 s) until `base/readyz` answers 200.
pub async fn wait_ready(base: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http
            .get(format!("{base}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && r.status().is_success()
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{base} not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
