//! The `idemproxy` binary: CLI, config, logging, signals; everything else is the library.
//!
//! Exit codes: `0` after a graceful stop, `2` for a configuration error (flags, environment,
//! config file, TLS files), `1` for a failure at run time (a listener that cannot be bound).
//! `idemproxy key …` runs the key tool instead of the proxy (`keytool`, with its own exit codes).

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use idemproxy::config::{Cli, Command, Config};
use idemproxy::error::Chain;
use idemproxy::ServeError;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Key(command)) = &cli.command {
        return idemproxy::keytool::run(&cli, command);
    }
    let config = match Config::load(&cli) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("idemproxy: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &cli.check_config {
        println!("{}: OK ({} route(s))", path.display(), config.routes.len());
        return ExitCode::SUCCESS;
    }
    if let Err(err) = idemproxy::telemetry::init_logging(config.log_format, &config.log_filter) {
        eprintln!("idemproxy: {err}");
        return ExitCode::from(2);
    }
    // One thread: a current-thread runtime, with no work stealing nor cross-thread wake-ups.
    let runtime = if config.server.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.server.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("idemproxy: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let addr = config.listen;
    let served = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => idemproxy::serve(config, listener, shutdown_signal()).await,
        Err(source) => Err(ServeError::Bind {
            listener: "listen",
            addr,
            source,
        }),
    };
    match served {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            let message = Chain(&err).to_string();
            tracing::error!(error = %message, "idemproxy failed");
            eprintln!("idemproxy: {message}");
            ExitCode::from(if err.is_config() { 2 } else { 1 })
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
