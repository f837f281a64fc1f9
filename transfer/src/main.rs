/// glibc malloc showed up as ~10% of the services' CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use transfer::{App, Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::IssueToken { customer, ttl_secs }) = &cli.command {
        println!(
            "{}",
            transfer::auth::issue_token(cli.config.jwt_secret.expose(), customer, *ttl_secs)?
        );
        return Ok(());
    }
    let telemetry = common::telemetry::init(
        "transfer",
        &cli.config.telemetry,
        common::telemetry::LogOutput::Stdout,
    )?;
    let result: anyhow::Result<()> = match App::build(cli.config).await {
        Ok(app) => app
            .run(common::shutdown::on_signals())
            .await
            .map_err(Into::into),
        Err(e) => Err(e.into()),
    };
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "transfer failed");
    }
    telemetry.shutdown();
    result
}
