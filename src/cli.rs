//! The command line: one binary, one subcommand per process role.

use clap::{Parser, Subcommand};

use crate::config::{ApiConfig, LogConfig, SearchConfig, StoreConfig, WorkerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "chat-system",
    version,
    about = "A chat backend: applications, chats, messages, search"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogConfig,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// API and worker in one process (the default).
    Serve {
        #[command(flatten)]
        store: StoreConfig,
        #[command(flatten)]
        search: SearchConfig,
        #[command(flatten)]
        api: ApiConfig,
        #[command(flatten)]
        worker: WorkerConfig,
    },
    /// The HTTP API only.
    Api {
        #[command(flatten)]
        store: StoreConfig,
        #[command(flatten)]
        search: SearchConfig,
        #[command(flatten)]
        api: ApiConfig,
    },
    /// The queue workers only (persisting and, if this process can write it, indexing).
    Worker {
        #[command(flatten)]
        store: StoreConfig,
        #[command(flatten)]
        search: SearchConfig,
        #[command(flatten)]
        worker: WorkerConfig,
    },
    /// Apply the database migrations and create the write queue's consumer groups, then exit.
    Migrate {
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Print the write queue's state as JSON (per shard: entries, dead letters, and each
    /// consumer group's pending entries and lag), then exit. For operators and tools.
    QueueStatus {
        #[command(flatten)]
        store: StoreConfig,
        /// Also print the number counters of this application (repeatable).
        #[arg(long = "counters-of", value_name = "TOKEN", allow_hyphen_values = true)]
        counters_of: Vec<String>,
    },
    /// Print, as JSON, the create-message script with its `KEYS` and `ARGV` for one
    /// message, then exit: for benchmarks that drive Redis directly. Connects to nothing.
    CreateScript {
        #[command(flatten)]
        store: StoreConfig,
        /// An application token (which may start with `-`).
        #[arg(long, allow_hyphen_values = true)]
        token: String,
        #[arg(long, default_value_t = 1)]
        chat: u64,
        #[arg(long, default_value = "hello benchmark body")]
        body: String,
    },
    /// Rebuild the search index from MySQL, in batches; safe to re-run. With the embedded
    /// index, stop the process holding its writer first.
    Reindex {
        #[command(flatten)]
        store: StoreConfig,
        #[command(flatten)]
        search: SearchConfig,
        /// Messages read from MySQL per batch.
        #[arg(long, default_value_t = 5000)]
        batch: u32,
        /// Elasticsearch: start a new index even if an earlier run left one unfinished
        /// (by default, that run is resumed).
        #[arg(long)]
        fresh: bool,
        /// Elasticsearch: wait this long after switching the alias before copying the
        /// writes made during the run a last time.
        #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
        settle: std::time::Duration,
    },
    /// Check an Elasticsearch cluster (ELASTICSEARCH_URL, with the same settings as the
    /// service): in a scratch index, every search of a built-in set must find exactly
    /// what the definition of a match finds. Exits non-zero on any difference.
    VerifyElasticsearch {
        #[command(flatten)]
        search: SearchConfig,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_bad_value_is_reported_with_its_variable_name() {
        for (flag, variable) in [
            ("--batch-size", "WORKER_BATCH_SIZE"),
            ("--batch-wait", "WORKER_BATCH_WAIT"),
            ("--database-pool-size", "DATABASE_POOL_SIZE"),
            ("--request-timeout", "REQUEST_TIMEOUT"),
        ] {
            let command = if flag.starts_with("--batch") {
                "worker"
            } else {
                "serve"
            };
            let err = Cli::try_parse_from(["chat-system", command, flag, "lots"]).unwrap_err();
            assert!(err.to_string().contains(variable), "{err}");
        }
    }

    #[test]
    fn tokens_may_start_with_a_hyphen() {
        // Tokens are URL-safe base64: one in 64 starts with `-`.
        let cli = Cli::try_parse_from(["chat-system", "create-script", "--token", "-9KWJ"]);
        match cli.map(|c| c.command) {
            Ok(Some(Command::CreateScript { token, .. })) => assert_eq!(token, "-9KWJ"),
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["chat-system", "queue-status", "--counters-of", "-x"]);
        match cli.map(|c| c.command) {
            Ok(Some(Command::QueueStatus { counters_of, .. })) => assert_eq!(counters_of, ["-x"]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn subcommands_parse_with_defaults() {
        let cli = Cli::try_parse_from(["chat-system", "worker", "--batch-size", "10"]).unwrap();
        match cli.command {
            Some(Command::Worker { worker, .. }) => assert_eq!(worker.batch_size, 10),
            other => panic!("unexpected {other:?}"),
        }
        assert!(Cli::try_parse_from(["chat-system", "api", "--bind", "nonsense"]).is_err());
        assert!(
            Cli::try_parse_from(["chat-system"])
                .unwrap()
                .command
                .is_none()
        );
    }
}
