use std::process::ExitCode;

use clap::Parser;

use chat_system::cli::{Cli, Command};
use chat_system::process::{OpenFiles, configure_allocator, raise_open_files_limit};
use chat_system::search::identity::IndexGroup;
use chat_system::search::{Search, SearchError};
use chat_system::startup::{self, ApiServer, StartError};
use chat_system::store::{ConnectError, MIGRATOR, Store};
use chat_system::{reindex, telemetry};

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
        Command::Migrate { store } => {
            let store = Store::connect(&store).await?;
            MIGRATOR
                .run(&store.mysql)
                .await
                .map_err(ConnectError::from)?;
            // The queue's consumer groups too: workers then start without writing to
            // Redis, which matters when it is at its maxmemory.
            chat_system::worker::create_groups(&store).await?;
            tracing::info!("migrations applied; queue consumer groups in place");
            Ok(())
        }
        Command::Api {
            store: config,
            search,
            api,
        } => {
            let store = Store::connect(&config).await?;
            let search = Search::open(&search, false).await?;
            search.join(index_group(&store)).await?;
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
            search.join(index_group(&store)).await?;
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
            search.join(index_group(&store)).await?;
            let tasks =
                startup::spawn_workers(&store, &search, &config, &worker, &shutdown).await?;
            let server = ApiServer::build(store, search, &api).await?;
            let served = server.run(startup::wait_for(shutdown)).await;
            for task in tasks {
                let _ = task.await;
            }
            served
        }
        Command::QueueStatus { store, counters_of } => {
            let queue = chat_system::store::connect_queue(&store).await?;
            let status =
                queue
                    .status(&counters_of)
                    .await
                    .map_err(|source| ConnectError::Redis {
                        url: "the write queue".into(),
                        source,
                    })?;
            println!(
                "{}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            );
            Ok(())
        }
        Command::CreateScript {
            store,
            token,
            chat,
            body,
        } => {
            let keys =
                chat_system::store::queue::Keys::new(&store.redis_prefix, store.redis_shards);
            let call = chat_system::store::queue::create_message_call(
                &keys,
                store.queue_max_entries,
                &token,
                (chat, &body),
                chat_system::resources::to_micros(chat_system::resources::now()),
                None,
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&call).unwrap_or_default()
            );
            Ok(())
        }
        Command::Reindex {
            store,
            search,
            batch,
            fresh,
            settle,
        } => {
            let pool = chat_system::store::connect_mysql(&store).await?;
            let redis = chat_system::store::connect_redis(&store).await?;
            let search = Search::open(&search, true).await?;
            let options = reindex::Options {
                fresh,
                settle,
                ..reindex::Options::default()
            };
            reindex::run_with(&pool, &search, batch, options).await?;
            // Rebuilt from MySQL, this index holds every message: the group feeds it now.
            search
                .adopt(IndexGroup::new(
                    redis,
                    chat_system::store::queue::Keys::new(&store.redis_prefix, store.redis_shards)
                        .search_index_id(),
                ))
                .await?;
            Ok(())
        }
        Command::VerifyElasticsearch { search } => {
            let Search::Elastic(es) = Search::open(&search, true).await? else {
                return Err(StartError::Search(SearchError::Failed(
                    "set ELASTICSEARCH_URL to the cluster to verify".into(),
                )));
            };
            let report = chat_system::search::elastic::verify::run(&es).await?;
            for failure in &report.failures {
                tracing::error!("verify-elasticsearch: {failure}");
            }
            if report.failures.is_empty() {
                tracing::info!(
                    checks = report.checks,
                    "verify-elasticsearch: every check passed"
                );
                Ok(())
            } else {
                Err(StartError::Search(SearchError::Failed(format!(
                    "{} of {} checks failed",
                    report.failures.len(),
                    report.checks
                ))))
            }
        }
    }
}

/// The index group of this deployment's write queue (see `search::identity`).
fn index_group(store: &Store) -> IndexGroup {
    IndexGroup::new(store.queue.conn(), store.queue.keys.search_index_id())
}
