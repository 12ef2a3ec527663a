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

    /// Seed nodes of a Redis Cluster (`host:port,host:port,...`, or `redis://` URLs; a
    /// password in them is used for every node). Set: Redis is used as a cluster and
    /// `REDIS_URL` is ignored.
    #[arg(
        long,
        env = "REDIS_CLUSTER_NODES",
        hide_env_values = true,
        value_parser = parse_cluster_nodes
    )]
    pub redis_cluster_nodes: Option<ClusterNodes>,

    /// Shards of the write queue: each is a stream with the keys of its applications
    /// under one hash tag, so a Redis Cluster spreads them over its masters. Fixed for
    /// the life of a deployment: changing it moves applications to other shards (see the
    /// README for the procedure).
    #[arg(long, env = "REDIS_SHARDS", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub redis_shards: u16,

    /// Prefix of every Redis key, so several deployments (or tests) can share one Redis.
    #[arg(long, env = "REDIS_PREFIX", default_value = "cs", value_parser = parse_prefix)]
    pub redis_prefix: String,

    /// How long a MySQL or Redis call may take before the dependency counts as down.
    #[arg(long, env = "DEPENDENCY_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub dependency_timeout: Duration,

    /// MySQL closes a connection of this process idle this long (`wait_timeout`, whole
    /// seconds), rolling back a transaction left open by a stalled process (a frozen
    /// worker keeps its connection): its rows are free again for the other workers. The
    /// pool closes its own idle connections before then.
    #[arg(long, env = "DATABASE_IDLE_TIMEOUT", default_value = "10s", value_parser = parse_idle_timeout)]
    pub database_idle_timeout: Duration,

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

/// The seed nodes of a Redis Cluster, as `redis://` URLs (secret: they may hold a
/// password).
#[derive(Clone)]
pub struct ClusterNodes(Vec<String>);

impl ClusterNodes {
    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Debug for ClusterNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterNodes({} nodes, redacted)", self.0.len())
    }
}

/// `host:port,host:port` or `redis://...` URLs, comma-separated.
pub fn parse_cluster_nodes(s: &str) -> Result<ClusterNodes, String> {
    let nodes: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            if n.contains("://") {
                n.to_owned()
            } else {
                format!("redis://{n}")
            }
        })
        .collect();
    if nodes.is_empty() {
        return Err("expected at least one `host:port`".into());
    }
    for node in &nodes {
        redis::IntoConnectionInfo::into_connection_info(node.as_str())
            .map_err(|_| "expected `host:port` or a `redis://` URL for each node".to_owned())?;
    }
    Ok(ClusterNodes(nodes))
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

    /// Most live subscribers (`.../messages/events` streams) per API process; beyond,
    /// 503 with `Retry-After`.
    #[arg(
        long,
        env = "EVENTS_MAX_SUBSCRIBERS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub events_max_subscribers: u32,

    /// Bytes of persisted messages each API process keeps to answer repeated reads
    /// without MySQL (checked against Redis on every read; see `store::read_cache`). 0
    /// turns the cache off.
    #[arg(long, env = "READ_CACHE_SIZE", default_value_t = 16 * 1024 * 1024)]
    pub read_cache_size: usize,

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

    /// After a read of less than a batch, how long the worker waits before it reads the
    /// queue again: at a steady load, the entries of each interval go in one batch.
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

    /// Name of the Elasticsearch alias the messages are read and written through. The
    /// indices behind it are named after it (`<alias>-v1`, `<alias>-v2`, ...), one per
    /// `reindex`.
    #[arg(long, env = "ELASTICSEARCH_INDEX", default_value = "messages", value_parser = parse_index_name)]
    pub elasticsearch_index: String,

    /// Directory of the embedded Tantivy index.
    #[arg(long, env = "SEARCH_INDEX_DIR", default_value = ".data/search")]
    pub search_index_dir: PathBuf,

    /// How long one search of the embedded index may run; past it the search stops and
    /// answers 503 rather than hold one of the search slots (one per core).
    #[arg(long, env = "SEARCH_TIME_BUDGET", default_value = "500ms", value_parser = parse_duration)]
    pub search_time_budget: Duration,

    #[command(flatten)]
    pub elastic: ElasticConfig,
}

/// How the Elasticsearch backend connects and writes (used when `ELASTICSEARCH_URL` is set).
#[derive(Args, Clone, Debug)]
pub struct ElasticConfig {
    /// PEM file of the CA certificate(s) that signed Elasticsearch's HTTPS certificate
    /// (ES 8 makes its own CA: `config/certs/http_ca.crt`). When set, only these are
    /// trusted; unset, the system's CA store is.
    #[arg(long, env = "ELASTICSEARCH_CA_CERT", value_parser = parse_ca_bundle)]
    pub elasticsearch_ca_cert: Option<CaBundle>,

    /// API key, sent as `Authorization: ApiKey <key>`: the `encoded` value ES returns
    /// when the key is created. Without it, the user and password of
    /// `ELASTICSEARCH_URL`, if any, are sent as Basic authentication.
    #[arg(
        long,
        env = "ELASTICSEARCH_API_KEY",
        hide_env_values = true,
        conflicts_with = "elasticsearch_api_key_file"
    )]
    pub elasticsearch_api_key: Option<Secret>,

    /// A file holding the API key (as `ELASTICSEARCH_API_KEY`), for keys handed over on a
    /// volume or as a container secret.
    #[arg(long, env = "ELASTICSEARCH_API_KEY_FILE", value_parser = parse_secret_file)]
    pub elasticsearch_api_key_file: Option<Secret>,

    /// Longest time an Elasticsearch request may take (a bulk request included).
    #[arg(long, env = "ELASTICSEARCH_TIMEOUT", default_value = "30s", value_parser = parse_timeout)]
    pub elasticsearch_timeout: Duration,

    /// Longest time to open a connection to Elasticsearch.
    #[arg(long, env = "ELASTICSEARCH_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_timeout)]
    pub elasticsearch_connect_timeout: Duration,

    /// Largest `_bulk` request body (`10mb`, or bytes). Larger batches are split; one
    /// document is always sent, whatever its size. ES refuses bodies over its
    /// `http.max_content_length` (100mb by default) with a 413.
    #[arg(long, env = "ELASTICSEARCH_BULK_MAX_BYTES", default_value = "10mb", value_parser = parse_bytes)]
    pub elasticsearch_bulk_max_bytes: u64,
}

impl ElasticConfig {
    /// The API key, from `ELASTICSEARCH_API_KEY` or `ELASTICSEARCH_API_KEY_FILE`.
    pub fn api_key(&self) -> Option<&Secret> {
        self.elasticsearch_api_key
            .as_ref()
            .or(self.elasticsearch_api_key_file.as_ref())
    }
}

impl Default for ElasticConfig {
    fn default() -> Self {
        Self {
            elasticsearch_ca_cert: None,
            elasticsearch_api_key: None,
            elasticsearch_api_key_file: None,
            elasticsearch_timeout: Duration::from_secs(30),
            elasticsearch_connect_timeout: Duration::from_secs(2),
            elasticsearch_bulk_max_bytes: 10 << 20,
        }
    }
}

/// The PEM text of one or more CA certificates, checked to parse when read.
#[derive(Clone)]
pub struct CaBundle {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaBundle({})", self.path.display())
    }
}

fn parse_ca_bundle(s: &str) -> Result<CaBundle, String> {
    let path = PathBuf::from(s);
    let pem = std::fs::read(&path).map_err(|e| format!("cannot read `{s}`: {e}"))?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(CaBundle { path, pem }),
        Ok(_) => Err(format!("`{s}` holds no PEM certificate")),
        Err(e) => Err(format!("`{s}` is not a PEM certificate bundle: {e}")),
    }
}

/// Reads a secret from a file; surrounding whitespace (a final newline) is not part of it.
fn parse_secret_file(s: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(s).map_err(|e| format!("cannot read `{s}`: {e}"))?;
    text.trim()
        .parse()
        .map_err(|e| format!("`{s}`: the file {e}"))
}

/// Elasticsearch's rules for index and alias names that matter here: lower case, no
/// characters with a meaning in URLs or index patterns, not starting with `-`, `_`, `+`.
fn parse_index_name(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 200
        && !s.starts_with(['-', '_', '+', '.'])
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(s.to_owned())
    } else {
        Err("use lower-case letters, digits, `-`, `_` and `.` (not first), at most 200".into())
    }
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

/// A duration of whole seconds from 2 s to a year: MySQL's `wait_timeout` takes whole
/// seconds up to a year, and the pool closes idle connections at half of it.
fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 || !(2..=365 * 24 * 3600).contains(&d.as_secs()) {
        return Err(format!("`{s}` must be whole seconds from 2s to 525600m"));
    }
    Ok(d)
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
    fn the_database_idle_timeout_is_whole_seconds_mysql_takes() {
        assert_eq!(parse_idle_timeout("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_idle_timeout("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_idle_timeout("1s").is_err());
        assert!(parse_idle_timeout("2500ms").is_err());
        assert!(parse_idle_timeout("525601m").is_err());
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
    fn elasticsearch_names_and_files_are_checked_when_read() {
        assert!(parse_index_name("messages").is_ok());
        assert!(parse_index_name("chat.messages-2").is_ok());
        assert!(parse_index_name("Messages").is_err());
        assert!(parse_index_name("_messages").is_err());
        assert!(parse_index_name("a*b").is_err());
        assert!(parse_index_name("").is_err());

        let dir = std::env::temp_dir().join(format!("cs-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "c2VjcmV0OmtleQ==\n").unwrap();
        assert_eq!(
            parse_secret_file(key.to_str().unwrap()).unwrap().expose(),
            "c2VjcmV0OmtleQ=="
        );
        std::fs::write(&key, "\n").unwrap();
        assert!(parse_secret_file(key.to_str().unwrap()).is_err());
        let missing = parse_ca_bundle("/nonexistent/ca.crt").unwrap_err();
        assert!(missing.contains("/nonexistent/ca.crt"), "{missing}");
        let not_pem = dir.join("ca.crt");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        assert!(parse_ca_bundle(not_pem.to_str().unwrap()).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn prefixes_are_restricted_to_safe_characters() {
        assert!(parse_prefix("cs-test_1").is_ok());
        assert!(parse_prefix("a:b").is_err());
        assert!(parse_prefix("").is_err());
    }
}
