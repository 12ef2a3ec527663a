use std::process::ExitCode;

use clap::Parser;

use chat_system::cli::{Cli, Command};
use chat_system::startup::{self, ApiServer, StartError};
use chat_system::store::{MIGRATOR, Store};
use chat_system::telemetry;

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
            MIGRATOR
                .run(&pool)
                .await
                .map_err(chat_system::store::ConnectError::from)?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Api { store, api } => {
            let store = Store::connect(&store).await?;
            let server = ApiServer::build(store, &api).await?;
            server.run(startup::wait_for(shutdown)).await
        }
        Command::Worker {
            store: config,
            worker,
        } => {
            let store = Store::connect(&config).await?;
            let worker = startup::build_worker(store, &config, &worker).await?;
            worker.run(shutdown).await;
            Ok(())
        }
        Command::Serve {
            store: config,
            api,
            worker,
        } => {
            let store = Store::connect(&config).await?;
            MIGRATOR
                .run(&store.mysql)
                .await
                .map_err(chat_system::store::ConnectError::from)?;
            let worker = startup::build_worker(store.clone(), &config, &worker).await?;
            let worker = tokio::spawn(worker.run(shutdown.clone()));
            let server = ApiServer::build(store, &api).await?;
            let served = server.run(startup::wait_for(shutdown)).await;
            let _ = worker.await;
            served
        }
    }
}
