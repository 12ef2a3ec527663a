//! Typed configuration, read from environment variables (or the matching flags).
//!
//! Every setting has a local default that matches `scripts/deps`, so `chat-system serve`
//! works on a developer machine with no variable set. A bad value stops the process at
//! start with the variable's name in the message (clap does the reporting).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Settings shared by every subcommand that talks to MySQL and Redis.
#[derive(Args, Clone, Debug)]
pub struct StoreConfig {
    /// MySQL (or MariaDB) connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "mysql://root@127.0.0.1:33306/chat_system"
    )]
    pub database_url: SecretUrl,

    /// Maximum number of MySQL connections per process.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: u32,

    /// Redis connection URL.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:36379"
    )]
    pub redis_url: SecretUrl,

    /// Prefix of every Redis key, so several deployments (or tests) can share one Redis.
    #[arg(long, env = "REDIS_PREFIX", default_value = "cs", value_parser = parse_prefix)]
    pub redis_prefix: String,

    /// How long a MySQL or Redis call may take before the dependency counts as down.
    #[arg(long, env = "DEPENDENCY_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub dependency_timeout: Duration,

    /// Creates and updates are refused (503, `Retry-After`) while the write queue holds
    /// this many entries not yet persisted.
    #[arg(long, env = "QUEUE_MAX_ENTRIES", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_max_entries: u64,

    /// Creates and updates are refused (503, `Retry-After`) while Redis uses more memory
    /// than this (`512mb`, `2gb`, or bytes). Default: 90% of Redis's `maxmemory`, when
    /// it has one. Checked by the workers every second.
    #[arg(long, env = "QUEUE_MAX_MEMORY", value_parser = parse_bytes)]
    pub queue_max_memory: Option<u64>,
}

/// Settings of the HTTP API.
#[derive(Args, Clone, Debug)]
pub struct ApiConfig {
    /// Address the HTTP server listens on.
    #[arg(long, env = "BIND", default_value = "127.0.0.1:3000")]
    pub bind: SocketAddr,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "BODY_LIMIT", default_value_t = 256 * 1024)]
    pub body_limit: usize,

    /// Longest time a request may take before it is answered with 503.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Longest time a client may take to send a whole request head (request line and
    /// headers), counted from the opening of the connection or from the first byte of a
    /// later request on it. The connection is closed without an answer when it runs out.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub header_read_timeout: Duration,

    /// A keep-alive connection with no request in flight and none started is closed after
    /// being idle this long. Longer than the 60 s for which the bundled nginx keeps idle
    /// upstream connections: a server that closes first races nginx's next request on the
    /// connection, which then fails.
    #[arg(long, env = "KEEP_ALIVE_TIMEOUT", default_value = "75s", value_parser = parse_timeout)]
    pub keep_alive_timeout: Duration,

    /// Most client connections open at once. Beyond it, new clients wait in the listen
    /// backlog until a connection closes.
    #[arg(
        long,
        env = "MAX_CONNECTIONS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,

    /// Enables `GET /applications` (which reveals every token) for requests that carry
    /// `Authorization: Bearer <key>`. Unset: the listing is disabled (403). An empty key
    /// is refused at start.
    #[arg(long, env = "ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<Secret>,
}

/// Settings of the background worker.
#[derive(Args, Clone, Debug)]
pub struct WorkerConfig {
    /// Most queue entries persisted in one MySQL transaction.
    #[arg(
        long,
        env = "WORKER_BATCH_SIZE",
        value_name = "WORKER_BATCH_SIZE",
        default_value_t = 1000
    )]
    pub batch_size: usize,

    /// Persisting consumers per worker process, each with a batch in flight.
    #[arg(
        long,
        env = "WORKER_CONCURRENCY",
        value_name = "WORKER_CONCURRENCY",
        default_value_t = 4
    )]
    pub concurrency: usize,

    /// Longest wait for new queue entries before a read returns.
    #[arg(long, env = "WORKER_BATCH_WAIT", value_name = "WORKER_BATCH_WAIT", default_value = "50ms", value_parser = parse_duration)]
    pub batch_wait: Duration,

    /// Entries left unacknowledged this long by another consumer are taken over.
    #[arg(long, env = "WORKER_CLAIM_IDLE", value_name = "WORKER_CLAIM_IDLE", default_value = "30s", value_parser = parse_duration)]
    pub claim_idle: Duration,

    /// Name of this consumer in the Redis consumer group (default: host name and pid).
    #[arg(long, env = "WORKER_NAME", value_name = "WORKER_NAME")]
    pub name: Option<String>,

    /// When set, the `worker` command serves `/healthz` and `/metrics` on this address.
    #[arg(long, env = "WORKER_METRICS_BIND", value_name = "WORKER_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,

    /// How far (in time) the search indexer may lag before the stream is trimmed past it
    /// anyway; it then catches up from MySQL. Bounds the Redis memory a search outage
    /// holds.
    #[arg(long, env = "INDEX_LAG_MAX", value_name = "INDEX_LAG_MAX", default_value = "60s", value_parser = parse_duration)]
    pub index_lag_max: Duration,

    /// Most entries kept in the dead-letter stream (approximately; the oldest go first).
    #[arg(
        long,
        env = "DEAD_LETTER_MAX",
        value_name = "DEAD_LETTER_MAX",
        default_value_t = 100_000
    )]
    pub dead_letter_max: u64,

    /// How often `chats_count` and `messages_count` are refreshed.
    #[arg(long, env = "COUNTS_SYNC_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub counts_sync_interval: Duration,
}

/// Settings of the search backend.
#[derive(Args, Clone, Debug)]
pub struct SearchConfig {
    /// Elasticsearch 8 base URL. Unset: the embedded Tantivy index is used.
    #[arg(long, env = "ELASTICSEARCH_URL", hide_env_values = true)]
    pub elasticsearch_url: Option<SecretUrl>,

    /// Name of the Elasticsearch index.
    #[arg(long, env = "ELASTICSEARCH_INDEX", default_value = "messages")]
    pub elasticsearch_index: String,

    /// Directory of the embedded Tantivy index.
    #[arg(long, env = "SEARCH_INDEX_DIR", default_value = ".data/search")]
    pub search_index_dir: PathBuf,

    /// How long one search of the embedded index may run; past it the search stops and
    /// answers 503 rather than hold one of the search slots (one per core).
    #[arg(long, env = "SEARCH_TIME_BUDGET", default_value = "500ms", value_parser = parse_duration)]
    pub search_time_budget: Duration,
}

/// Settings of logging.
#[derive(Args, Clone, Debug)]
pub struct LogConfig {
    /// Log filter, in `tracing` env-filter syntax (`info`, `chat_system=debug,warn`, ...).
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,

    /// `text` for people, `json` for log collectors.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    pub log_format: String,
}

/// A URL that may carry a password: `Debug` and `Display` hide the password.
#[derive(Clone)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.contains("://") {
            return Err("expected a URL such as scheme://host:port/...".into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // scheme://user:password@host -> scheme://user:***@host
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return f.write_str(&self.0);
        };
        match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                let masked = if userinfo.contains(':') { ":***" } else { "" };
                write!(f, "{scheme}://{user}{masked}@{host}")
            }
            None => f.write_str(&self.0),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// A secret value such as an API key: never empty, hidden by `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err("must not be empty (unset it instead)".into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Parses `250ms`, `10s`, `5m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 250ms, 10s or 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value * 60)),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use ms, s or m)")),
    }
}

/// Parses `512mb`, `2gb`, `64kb` or a bare number of bytes (units are powers of 1024,
/// as in Redis's configuration).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (digits, unit) = lower
        .find(|c: char| !c.is_ascii_digit())
        .map_or((lower.as_str(), ""), |i| lower.split_at(i));
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 512mb, 2gb or 1048576"))?;
    let scale: u64 = match unit {
        "" | "b" => 1,
        "kb" | "k" => 1 << 10,
        "mb" | "m" => 1 << 20,
        "gb" | "g" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use kb, mb or gb)")),
    };
    value
        .checked_mul(scale)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{s}` must be above 0 and below 16 EiB"))
}

/// A [`parse_duration`] above zero: a zero timeout would close every connection.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("`{s}`: must be more than zero")),
        d => Ok(d),
    }
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("use letters, digits, `-` and `_` only".into());
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn timeouts_must_be_more_than_zero() {
        assert_eq!(parse_timeout("300ms"), Ok(Duration::from_millis(300)));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("0").is_err());
    }

    #[test]
    fn secret_urls_hide_the_password() {
        let url: SecretUrl = "mysql://app:hunter2@db:3306/chat".parse().unwrap();
        assert_eq!(url.to_string(), "mysql://app:***@db:3306/chat");
        assert_eq!(format!("{url:?}"), "\"mysql://app:***@db:3306/chat\"");
        assert_eq!(url.expose(), "mysql://app:hunter2@db:3306/chat");
        let plain: SecretUrl = "redis://127.0.0.1:6379".parse().unwrap();
        assert_eq!(plain.to_string(), "redis://127.0.0.1:6379");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512mb"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5tb").is_err());
    }

    #[test]
    fn secrets_are_never_shown_and_never_empty() {
        let key: Secret = "hunter2".parse().unwrap();
        assert_eq!(key.expose(), "hunter2");
        assert!(!format!("{key} {key:?}").contains("hunter2"));
        assert!("".parse::<Secret>().is_err());
        assert!("  ".parse::<Secret>().is_err());
    }

    #[test]
    fn prefixes_are_restricted_to_safe_characters() {
        assert!(parse_prefix("cs-test_1").is_ok());
        assert!(parse_prefix("a:b").is_err());
        assert!(parse_prefix("").is_err());
    }
}
