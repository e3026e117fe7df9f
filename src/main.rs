//! `chat-service`: parse the command line, then hand over to the library.

use chat_service::{
    api,
    app::Application,
    auth::JwtKeys,
    config::{Cli, Command},
    store, telemetry,
};

/// glibc's malloc was a fifth of the service's CPU under load (many small,
/// short-lived allocations across tasks); mimalloc serves them from
/// per-thread free lists. Measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A missing .env is fine; a malformed one is not silently half-read.
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        anyhow::bail!("could not read .env: {err}");
    }
    let cli = Cli::load()?;
    let config = cli.serve;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let _telemetry = telemetry::init(config.log_format);
            let app = Application::build(config).await?;
            app.run(shutdown_signal()).await?;
        }
        Command::Migrate => {
            let _telemetry = telemetry::init(config.log_format);
            let store = store::connect(config.database_url.expose()).await?;
            store.migrate().await?;
            tracing::info!("migrations applied");
        }
        Command::Token(args) => {
            let keys = JwtKeys::new(config.require_secret()?, &config);
            let token = keys.mint(&args.sub, args.name.as_deref(), &args.roles, args.ttl)?;
            println!("{token}");
        }
        Command::Openapi => print!("{}", api::spec_yaml(&api::service())),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can listen for SIGTERM");
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
