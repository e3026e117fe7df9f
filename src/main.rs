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

/// One CPU (a pod limited to one, or a process pinned to one core) gets
/// tokio's single-threaded scheduler; more get the work-stealing one, with a
/// worker per CPU (`TOKIO_WORKER_THREADS` overrides the count). With one
/// worker, work stealing only costs: its queues' atomics, the handoffs
/// between the worker and the I/O driver. The single-threaded scheduler
/// took 8–10 % off the server's CPU per delivery and per message
/// (docs/benchmarks.md, nineteenth VM). `chat_runtime_info` says which runs.
fn main() -> anyhow::Result<()> {
    no_transparent_huge_pages();
    let one_cpu = std::thread::available_parallelism().map_or(1, usize::from) == 1;
    let mut builder = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()?.block_on(run())
}

/// Transparent huge pages off for this process. mimalloc asks for them on
/// its arenas (`MADV_HUGEPAGE`); where the kernel grants them (at a fault
/// when it has 2 MiB free in one piece, or later by merging), the heap is
/// resident in 2 MiB pages however little of each is used: with 19,000
/// idle connections the server held 107–108 MB instead of 98, and the
/// memory per connection measured 3.35–3.96 KiB from run to run,
/// depending on when the kernel granted them. No CPU cost was measurable
/// at target 2 (docs/benchmarks.md, twenty-second VM). A kernel without
/// the setting (before 3.15) keeps its default.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
}

async fn run() -> anyhow::Result<()> {
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
