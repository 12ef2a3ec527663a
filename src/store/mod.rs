//! Storage: MySQL (the system of record) and Redis (numbers, queue, pending records).
//!
//! * [`mysql`]: reads, the application writes, and the workers' batch upserts.
//! * [`queue`]: everything Redis: key names, the atomic Lua scripts of the create and
//!   update paths, the pending records that serve reads until a worker has persisted a
//!   write, and the sharded write queue the workers consume (one Redis or a cluster).
//! * [`coalesce`]: message reads from MySQL, sharing statements under load.
//! * [`read_cache`]: an API process's copies of persisted messages, checked against
//!   Redis on every read.

pub mod coalesce;
pub mod mysql;
pub mod queue;
pub mod read_cache;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};

use crate::config::StoreConfig;

pub use coalesce::MessageReads;
pub use queue::Queue;
pub use read_cache::ReadCache;

/// Handles to both stores; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub mysql: MySqlPool,
    /// Behind an `Arc`: its scripts and key names would otherwise be copied with the
    /// state of every request.
    pub queue: Arc<Queue>,
    /// Empty (budget 0) unless the process serves the API.
    pub read_cache: Arc<ReadCache>,
    pub message_reads: MessageReads,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("DATABASE_URL is invalid: {0}")]
    DatabaseUrl(sqlx::Error),
    #[error("REDIS_URL or REDIS_CLUSTER_NODES is invalid: {0}")]
    RedisUrl(redis::RedisError),
    #[error("cannot reach MySQL at {url}: {source}")]
    Mysql { url: String, source: sqlx::Error },
    #[error("cannot reach Redis at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl Store {
    /// Connects to both stores, creating the MySQL database if it does not exist yet.
    pub async fn connect(config: &StoreConfig) -> Result<Self, ConnectError> {
        let mysql = connect_mysql(config).await?;
        let queue = Arc::new(connect_queue(config).await?);
        let message_reads = MessageReads::new(mysql.clone(), reads_in_flight(config));
        Ok(Self {
            mysql,
            queue,
            read_cache: Arc::new(ReadCache::new(0)),
            message_reads,
        })
    }
}

/// Coalesced message reads out at once: one per core of this process's machine keeps
/// MySQL busy, and fewer make larger batches under load (measured in
/// `docs/BENCHMARKS.md`).
fn reads_in_flight(config: &StoreConfig) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    cores.clamp(1, config.database_pool_size.max(1) as usize)
}

pub async fn connect_mysql(config: &StoreConfig) -> Result<MySqlPool, ConnectError> {
    let url = config.database_url.to_string();
    let options = MySqlConnectOptions::from_str(config.database_url.expose())
        .map_err(ConnectError::DatabaseUrl)?;
    if let Some(db) = options.get_database().map(str::to_owned) {
        create_database_if_missing(options.clone(), &db)
            .await
            .map_err(|source| ConnectError::Mysql {
                url: url.clone(),
                source,
            })?;
    }
    // A transaction that took rows and then stalled (a frozen process keeps its
    // connection, so its transaction stays open) holds every other writer of those rows.
    // Two bounds: a lock wait longer than a dependency call may take fails (rather than
    // after InnoDB's 50 s), as a transient error that is retried; and the server closes a
    // connection idle for `DATABASE_IDLE_TIMEOUT`, which rolls the stalled transaction
    // back, so that the rows' other writers (a worker taking over the frozen one's
    // entries) get through at last. The pool closes its idle connections first: the
    // server never closes one under it, short of a stall.
    let lock_wait = config.dependency_timeout.as_secs_f64().ceil().max(1.0) as u64;
    let idle = config.database_idle_timeout.as_secs().max(2);
    MySqlPoolOptions::new()
        .max_connections(config.database_pool_size)
        .acquire_timeout(config.dependency_timeout)
        .idle_timeout(Duration::from_secs(idle / 2))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                let sql = format!(
                    "SET SESSION innodb_lock_wait_timeout = {lock_wait}, SESSION wait_timeout = {idle}"
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|source| ConnectError::Mysql { url, source })
}

async fn create_database_if_missing(
    options: MySqlConnectOptions,
    db: &str,
) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut conn = sqlx::MySqlConnection::connect_with(&options.database("")).await?;
    let sql = format!("CREATE DATABASE IF NOT EXISTS `{}`", db.replace('`', "``"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await?;
    conn.close().await
}

/// The Redis side alone.
pub async fn connect_queue(config: &StoreConfig) -> Result<Queue, ConnectError> {
    let redis = connect_redis(config).await?;
    Ok(Queue::new(
        redis,
        redis_target(config),
        config.dependency_timeout,
        &config.redis_prefix,
        config.redis_shards,
    )
    .with_limits(config.queue_max_entries, config.queue_max_memory))
}

/// Where Redis is: the cluster's seed nodes when `REDIS_CLUSTER_NODES` is set, else
/// `REDIS_URL`.
pub fn redis_target(config: &StoreConfig) -> queue::Target {
    match &config.redis_cluster_nodes {
        Some(nodes) => queue::Target::Cluster(nodes.urls().to_vec()),
        None => queue::Target::Single(config.redis_url.expose().to_owned()),
    }
}

pub async fn connect_redis(config: &StoreConfig) -> Result<queue::RedisConn, ConnectError> {
    let url = match &config.redis_cluster_nodes {
        Some(nodes) => format!("the cluster ({} seed nodes)", nodes.urls().len()),
        None => config.redis_url.to_string(),
    };
    queue::RedisConn::connect(&redis_target(config), config.dependency_timeout)
        .await
        .map_err(|source| match source.kind() {
            redis::ErrorKind::InvalidClientConfig => ConnectError::RedisUrl(source),
            _ => ConnectError::Redis { url, source },
        })
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// True when the error means MySQL cannot be reached (rather than a bad statement),
/// or closed the connection. An idle connection it closes (`DATABASE_IDLE_TIMEOUT`,
/// after a stall) is an I/O error here on MariaDB, and error 4031 on MySQL 8, which
/// says why first; MariaDB's error for a connection killed by an operator is 1927.
pub fn mysql_is_down(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
    ) || mysql_error_number(err).is_some_and(|n| matches!(n, 1927 | 4031))
}

fn mysql_error_number(err: &sqlx::Error) -> Option<u16> {
    err.as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .map(|e| e.number())
}

/// True when retrying the same statement later can succeed: MySQL is down, or the
/// statement lost a deadlock or a lock wait to a concurrent transaction.
pub fn mysql_is_transient(err: &sqlx::Error) -> bool {
    mysql_is_down(err) || mysql_error_number(err).is_some_and(|n| matches!(n, 1205 | 1213))
}

/// True when Redis refused a write because it is at its `maxmemory` (`OOM`). With
/// `noeviction` that is backpressure, not an outage: reads and deletes still work.
pub fn redis_is_full(err: &redis::RedisError) -> bool {
    err.code() == Some("OOM")
}

/// True when the error means Redis cannot serve us now (rather than a bad command):
/// unreachable, or up but not ready (loading its data set after a restart, a failover
/// in progress, a cluster slot without a master or being migrated: `CLUSTERDOWN`,
/// `MASTERDOWN`, `TRYAGAIN`), which the client library classes as "wait and retry".
pub fn redis_is_down(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
        || err.is_cluster_error()
        || matches!(
            err.retry_method(),
            redis::RetryMethod::WaitAndRetry | redis::RetryMethod::RefreshSlotsAndRetry
        )
}
