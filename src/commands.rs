//! What each subcommand does, from its parsed configuration to its end. `main` only
//! parses the command line and dispatches here.

use crate::config::{ApiConfig, SearchConfig, StoreConfig, WorkerConfig};
use crate::search::identity::IndexGroup;
use crate::search::{Search, SearchError};
use tokio::sync::watch;

use crate::startup::{self, ApiServer, StartError};
use crate::store::queue::{Keys, create_message_call};
use crate::store::{self, ConnectError, MIGRATOR, Store};
use crate::{reindex, resources};

/// `migrate`: the MySQL schema, and the queue's consumer groups, so that workers then
/// start without writing to Redis (which matters when it is at its maxmemory).
pub async fn migrate(config: &StoreConfig) -> Result<(), StartError> {
    let store = Store::connect(config).await?;
    MIGRATOR
        .run(&store.mysql)
        .await
        .map_err(ConnectError::from)?;
    crate::worker::create_groups(&store).await?;
    tracing::info!("migrations applied; queue consumer groups in place");
    Ok(())
}

/// `api`: the HTTP API alone, until `shutdown`.
pub async fn api(
    config: &StoreConfig,
    search: &SearchConfig,
    api: &ApiConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let store = Store::connect(config).await?;
    let search = Search::open(search, false).await?;
    search.join(index_group(&store)).await?;
    let server = ApiServer::build(store, search, api).await?;
    server.run(startup::wait_for(shutdown)).await
}

/// `worker`: the queue consumers (and their metrics endpoint, if bound), until `shutdown`.
pub async fn worker(
    config: &StoreConfig,
    search: &SearchConfig,
    worker: &WorkerConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let store = Store::connect(config).await?;
    let search = Search::open(search, true).await?;
    search.join(index_group(&store)).await?;
    let tasks = startup::spawn_workers(&store, &search, config, worker, &shutdown).await?;
    if let Some(addr) = worker.metrics_bind {
        startup::serve_worker_metrics(addr, shutdown.clone()).await?;
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

/// `serve`: migrations, then the API and the workers in one process, until `shutdown`.
pub async fn serve(
    config: &StoreConfig,
    search: &SearchConfig,
    api: &ApiConfig,
    worker: &WorkerConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let store = Store::connect(config).await?;
    MIGRATOR
        .run(&store.mysql)
        .await
        .map_err(ConnectError::from)?;
    let search = Search::open(search, true).await?;
    search.join(index_group(&store)).await?;
    let tasks = startup::spawn_workers(&store, &search, config, worker, &shutdown).await?;
    let server = ApiServer::build(store, search, api).await?;
    let served = server.run(startup::wait_for(shutdown)).await;
    for task in tasks {
        let _ = task.await;
    }
    served
}

/// `queue-status`: each shard's state, and the counters of `tokens`, as JSON on stdout.
pub async fn queue_status(config: &StoreConfig, tokens: &[String]) -> Result<(), StartError> {
    let queue = store::connect_queue(config).await?;
    let status = queue
        .status(tokens)
        .await
        .map_err(|source| ConnectError::Redis {
            url: "the write queue".into(),
            source,
        })?;
    print_json(&status);
    Ok(())
}

/// `create-script`: the message create script's call for one message, as JSON on stdout.
pub fn create_script(config: &StoreConfig, token: &str, chat: u64, body: &str) {
    let keys = Keys::new(&config.redis_prefix, config.redis_shards);
    let now = resources::to_micros(resources::now());
    let call = create_message_call(
        &keys,
        config.queue_max_entries,
        token,
        (chat, body),
        now,
        None,
    );
    print_json(&call);
}

/// `reindex`: the search index rebuilt from MySQL, then published as the one the index
/// group feeds (it holds every message now).
pub async fn reindex(
    config: &StoreConfig,
    search: &SearchConfig,
    batch: u32,
    options: reindex::Options,
) -> Result<(), StartError> {
    let pool = store::connect_mysql(config).await?;
    let redis = store::connect_redis(config).await?;
    let search = Search::open(search, true).await?;
    reindex::run_with(&pool, &search, batch, options).await?;
    let keys = Keys::new(&config.redis_prefix, config.redis_shards);
    search
        .adopt(IndexGroup::new(redis, keys.search_index_id()))
        .await?;
    Ok(())
}

/// `verify-elasticsearch`: the matching checks against the configured cluster.
pub async fn verify_elasticsearch(search: &SearchConfig) -> Result<(), StartError> {
    let Search::Elastic(es) = Search::open(search, true).await? else {
        return Err(StartError::Search(SearchError::Failed(
            "set ELASTICSEARCH_URL to the cluster to verify".into(),
        )));
    };
    let report = crate::search::elastic::verify::run(&es).await?;
    for failure in &report.failures {
        tracing::error!("verify-elasticsearch: {failure}");
    }
    if report.failures.is_empty() {
        tracing::info!(
            checks = report.checks,
            "verify-elasticsearch: every check passed"
        );
        return Ok(());
    }
    Err(StartError::Search(SearchError::Failed(format!(
        "{} of {} checks failed",
        report.failures.len(),
        report.checks
    ))))
}

/// The index group of this deployment's write queue (see `search::identity`).
fn index_group(store: &Store) -> IndexGroup {
    IndexGroup::new(store.queue.conn(), store.queue.keys.search_index_id())
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}
