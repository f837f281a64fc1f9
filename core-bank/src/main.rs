/// glibc malloc showed up as ~10% of the services' CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use core_bank::{App, Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let output = common::telemetry::LogOutput::for_process(cli.command.is_some());
    let telemetry = common::telemetry::init("core-bank", &cli.config.telemetry, output)?;
    let result: anyhow::Result<()> = match cli.command {
        None => match App::build(cli.config).await {
            Ok(app) => app
                .run(common::shutdown::on_signals())
                .await
                .map_err(Into::into),
            Err(e) => Err(e.into()),
        },
        Some(Command::VerifyInterest { sample }) => {
            core_bank::app::verify_interest(cli.config, sample)
                .await
                .map(|mismatches| {
                    if mismatches > 0 {
                        eprintln!("{mismatches} mismatches");
                        std::process::exit(1);
                    }
                })
                .map_err(Into::into)
        }
    };
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "core-bank failed");
    }
    telemetry.shutdown();
    result
}
