use std::process::ExitCode;

use clap::Parser;

use chat_system::cli::{Cli, Command};
use chat_system::search::Search;
use chat_system::startup::{self, ApiServer, StartError};
use chat_system::store::{ConnectError, MIGRATOR, Store};
use chat_system::{reindex, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in `mimalloc.h`: how many milliseconds freed memory is kept
/// before it goes back to the OS (1,000 by default in mimalloc 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory is returned to the OS as soon as it is freed. With the default delay, pages
/// freed by threads that then go quiet (a search-index merge, a burst of requests) stayed
/// resident: a worker's private memory swung between 80 and 130 MiB under a steady load,
/// and 40 to 50 MiB with this setting.
fn configure_allocator() {
    // SAFETY: sets a plain integer option of the allocator; any value is valid.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

#[tokio::main]
async fn main() -> ExitCode {
    configure_allocator();
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("chat-system: {e}");
        return ExitCode::from(2);
    }
    // No subcommand means `serve`, with its settings from the environment.
    let command = match cli.command {
        Some(command) => command,
        None => match Cli::parse_from(["chat-system", "serve"]).command {
            Some(command) => command,
            None => unreachable!("`serve` parses to a command"),
        },
    };
    match run(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("chat-system: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), StartError> {
    let shutdown = startup::shutdown_signal();
    match command {
        Command::Migrate { store } => {
            let pool = chat_system::store::connect_mysql(&store).await?;
            MIGRATOR.run(&pool).await.map_err(ConnectError::from)?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Api { store, search, api } => {
            let store = Store::connect(&store).await?;
            let search = Search::open(&search, false).await?;
            let server = ApiServer::build(store, search, &api).await?;
            server.run(startup::wait_for(shutdown)).await
        }
        Command::Worker {
            store: config,
            search,
            worker,
        } => {
            let store = Store::connect(&config).await?;
            let search = Search::open(&search, true).await?;
            let tasks =
                startup::spawn_workers(&store, &search, &config, &worker, &shutdown).await?;
            if let Some(addr) = worker.metrics_bind {
                startup::serve_worker_metrics(addr, shutdown.clone()).await?;
            }
            for task in tasks {
                let _ = task.await;
            }
            Ok(())
        }
        Command::Serve {
            store: config,
            search,
            api,
            worker,
        } => {
            let store = Store::connect(&config).await?;
            MIGRATOR
                .run(&store.mysql)
                .await
                .map_err(ConnectError::from)?;
            let search = Search::open(&search, true).await?;
            let tasks =
                startup::spawn_workers(&store, &search, &config, &worker, &shutdown).await?;
            let server = ApiServer::build(store, search, &api).await?;
            let served = server.run(startup::wait_for(shutdown)).await;
            for task in tasks {
                let _ = task.await;
            }
            served
        }
        Command::Reindex {
            store,
            search,
            batch,
        } => {
            let pool = chat_system::store::connect_mysql(&store).await?;
            let search = Search::open(&search, true).await?;
            reindex::run(&pool, &search, batch).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_configured() {
        // SAFETY: reads and sets integer options of the allocator.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(before, 1000, "mimalloc 3 default of purge_delay");
        configure_allocator();
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, 0);
    }
}
