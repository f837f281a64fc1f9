/// glibc malloc showed up as ~10% of the services' CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use projector::{App, Cli, Command, DlqAction};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let output = common::telemetry::LogOutput::for_process(cli.command.is_some());
    let telemetry = common::telemetry::init("projector", &cli.config.telemetry, output)?;
    let result: anyhow::Result<()> = match cli.command {
        None => match App::build(cli.config).await {
            Ok(app) => app
                .run(common::shutdown::on_signals())
                .await
                .map_err(Into::into),
            Err(e) => Err(e.into()),
        },
        Some(Command::Dlq { action }) => dlq(cli.config, action).await,
        Some(Command::Rebuild { account, reset }) => rebuild(cli.config, account, reset).await,
    };
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "projector failed");
    }
    telemetry.shutdown();
    result
}

async fn dlq(config: projector::Config, action: DlqAction) -> anyhow::Result<()> {
    use projector::consume::dlq;
    let (ctx, _nats) = projector::app::context(&config).await?;
    match action {
        DlqAction::List { page: size } => {
            println!("{:>8}  {:>6}  {:<48}  error", "id", "tries", "subject");
            let (mut after, mut count) = (Some(0), 0);
            while let Some(from) = after {
                let page = dlq::list(&ctx, from, usize::from(size)).await?;
                for l in &page.letters {
                    println!(
                        "{:>8}  {:>6}  {:<48}  {}",
                        l.id, l.deliveries, l.subject, l.error
                    );
                }
                count += page.letters.len();
                after = page.next_after;
            }
            println!("{count} dead letter(s)");
        }
        DlqAction::Show { id } => match dlq::get(&ctx, id).await? {
            Some(l) => println!("{}", serde_json::to_string_pretty(&l)?),
            None => anyhow::bail!("no dead letter {id}"),
        },
        DlqAction::Replay { id: Some(id), .. } => {
            let l = dlq::replay(&ctx, id).await?;
            println!("replayed dead letter {} ({})", l.id, l.subject);
        }
        DlqAction::Replay {
            id: None,
            all: true,
            page: size,
        } => {
            let (mut ok, mut failed, mut after) = (0, 0, Some(0));
            // A page at a time: the stream may hold up to 1 GiB of letters.
            while let Some(from) = after {
                let page = dlq::list(&ctx, from, usize::from(size)).await?;
                for l in &page.letters {
                    match dlq::replay(&ctx, l.id).await {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            failed += 1;
                            eprintln!("{}", common::error_chain(&e));
                        }
                    }
                }
                after = page.next_after;
            }
            println!("replayed {ok}, failed {failed}");
            if failed > 0 {
                anyhow::bail!("{failed} dead letter(s) could not be replayed");
            }
        }
        DlqAction::Replay {
            id: None,
            all: false,
            ..
        } => anyhow::bail!("give a dead letter id or --all"),
    }
    Ok(())
}

async fn rebuild(
    config: projector::Config,
    account: Option<String>,
    reset: bool,
) -> anyhow::Result<()> {
    let (ctx, _nats) = projector::app::context(&config).await?;
    let only = account.map(common::AccountId::parse).transpose()?;
    let report = projector::rebuild::rebuild(&ctx.db, &ctx.core, only, reset).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.failed.is_empty() {
        anyhow::bail!("{} account(s) failed", report.failed.len());
    }
    Ok(())
}
