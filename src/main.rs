use std::process::ExitCode;

use clap::Parser;

use chat_system::cli::{Cli, Command};
use chat_system::search::Search;
use chat_system::startup::{self, ApiServer, StartError};
use chat_system::store::{ConnectError, MIGRATOR, Store};
use chat_system::{reindex, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
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
