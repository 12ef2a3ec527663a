use std::process::ExitCode;

use clap::Parser;

use chat_system::cli::{Cli, Command};
use chat_system::process::{OpenFiles, configure_allocator, raise_open_files_limit};
use chat_system::startup::{self, StartError};
use chat_system::{commands, reindex, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before the runtime starts its threads, which allocate.
    configure_allocator();
    let open_files = raise_open_files_limit();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(start(open_files)),
        Err(e) => {
            eprintln!("chat-system: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn start(open_files: OpenFiles) -> ExitCode {
    let cli = Cli::parse();
    let report = matches!(
        cli.command,
        Some(Command::QueueStatus { .. } | Command::CreateScript { .. })
    );
    if let Err(e) = telemetry::init(&cli.log, report) {
        eprintln!("chat-system: {e}");
        return ExitCode::from(2);
    }
    match open_files {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
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
    // Before anything records a metric: what start-up records (the index writer's
    // holder, say) would otherwise be lost.
    chat_system::http::install_metrics_recorder();
    match command {
        Command::Migrate { store } => commands::migrate(&store).await,
        Command::Api { store, search, api } => commands::api(&store, &search, &api, shutdown).await,
        Command::Worker {
            store,
            search,
            worker,
        } => commands::worker(&store, &search, &worker, shutdown).await,
        Command::Serve {
            store,
            search,
            api,
            worker,
        } => commands::serve(&store, &search, &api, &worker, shutdown).await,
        Command::QueueStatus { store, counters_of } => {
            commands::queue_status(&store, &counters_of).await
        }
        Command::CreateScript {
            store,
            token,
            chat,
            body,
        } => {
            commands::create_script(&store, &token, chat, &body);
            Ok(())
        }
        Command::Reindex {
            store,
            search,
            batch,
            fresh,
            settle,
        } => {
            let options = reindex::Options {
                fresh,
                settle,
                ..reindex::Options::default()
            };
            commands::reindex(&store, &search, batch, options).await
        }
        Command::VerifyElasticsearch { search } => commands::verify_elasticsearch(&search).await,
    }
}
