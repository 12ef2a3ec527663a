//! Building and running the processes: the API server, the worker, or both.
//!
//! Building binds the listener (so the port is known before serving, which tests use
//! with port 0); running serves until the shutdown signal, then drains.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{ApiConfig, StoreConfig, WorkerConfig};
use crate::events::EventHub;
use crate::http::{self, AppState};
use crate::search::{Search, SearchError};
use crate::server::{self, Limits};
use crate::store::{ConnectError, ReadCache, Store};
use crate::worker::{Backlog, Inbox, Role, Worker, WorkerError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot listen on {addr} (BIND): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("search index: {0}")]
    Search(#[from] SearchError),
    #[error("worker: {0}")]
    Worker(#[from] WorkerError),
}

/// Connections the kernel queues for `accept` (it caps the figure at
/// `net.core.somaxconn`, 4,096 on current Linux; `ss -ltn` shows it as Send-Q). A burst
/// of connects beyond the queue loses SYNs, which clients resend only after a second:
/// tokio's default of 1,024 let a burst of 1,000 connects delay other clients by that.
const LISTEN_BACKLOG: u32 = 8192;

/// A listening socket on `addr`, with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As tokio's `bind` does: a restarted server binds at once, whatever sockets of its
    // predecessor are still in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A bound, not yet serving, API server.
pub struct ApiServer {
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    events: EventHub,
}

impl ApiServer {
    pub async fn build(
        mut store: Store,
        search: Search,
        config: &ApiConfig,
    ) -> Result<Self, StartError> {
        // The recorder first: the read cache registers its metrics once, when made.
        let metrics = http::install_metrics_recorder();
        store.read_cache = Arc::new(ReadCache::new(config.read_cache_size));
        let listener = listen(config.bind).map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
        let events = EventHub::new(store.clone(), config.events_max_subscribers as usize);
        let state = AppState::new(
            store,
            search,
            events.clone(),
            metrics,
            config.admin_api_key.as_ref(),
        );
        Ok(Self {
            listener,
            router: http::router(state, config),
            limits: api_limits(config),
            events,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes, then finishes the requests in flight.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        tracing::info!(
            addr = %self.local_addr(),
            max_connections = self.limits.max_connections,
            "listening"
        );
        // Live streams never end on their own: close them as the shutdown begins, so that
        // the drain is not held up by them.
        let events = self.events.clone();
        let shutdown = async move {
            shutdown.await;
            events.close();
        };
        server::serve(self.listener, self.router, self.limits, shutdown).await;
        Ok(())
    }
}

/// Time allowed after the request timeout for the last responses to be written.
const DRAIN_MARGIN: Duration = Duration::from_secs(5);

fn api_limits(config: &ApiConfig) -> Limits {
    Limits {
        header_read_timeout: config.header_read_timeout,
        keep_alive_timeout: config.keep_alive_timeout,
        max_connections: usize::try_from(config.max_connections).unwrap_or(usize::MAX),
        // A request in flight ends within the request timeout, with a 503 at worst.
        drain_timeout: config.request_timeout + DRAIN_MARGIN,
    }
}

/// The worker's metrics server is scraped by Prometheus and probed by health checks
/// only: a few connections, each answered at once.
const WORKER_METRICS_LIMITS: Limits = Limits {
    header_read_timeout: Duration::from_secs(10),
    keep_alive_timeout: Duration::from_secs(75),
    max_connections: 64,
    drain_timeout: DRAIN_MARGIN,
};

/// Makes a consumer of `role`'s group (it starts reading when run).
pub async fn build_worker(
    store: Store,
    _store_config: &StoreConfig,
    config: &WorkerConfig,
    role: Role,
) -> Result<Worker, StartError> {
    Ok(Worker::new(store, config.clone(), role).await?)
}

/// Starts the persisting worker and, when this process may write the search index, the
/// indexing worker; returns their tasks.
pub async fn spawn_workers(
    store: &Store,
    search: &Search,
    store_config: &StoreConfig,
    config: &WorkerConfig,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, StartError> {
    let base = config
        .name
        .clone()
        .unwrap_or_else(crate::worker::default_consumer_name);
    let mut tasks = Vec::new();
    let backlog = Backlog::default();
    // Several persisting consumers per process overlap one batch's MySQL commit with the
    // next batch's reads; they share one consumer name and the fetchers that read every
    // shard for it. One of them does the periodic maintenance.
    let mut persist_config = config.clone();
    persist_config.name = Some(format!("{base}-persist"));
    let inbox = Inbox::spawn(
        store,
        crate::worker::PERSIST_GROUP,
        &format!("{base}-persist"),
        config.batch_size,
        config.batch_wait,
        shutdown,
    )
    .await
    .map_err(crate::worker::WorkerError::from)?;
    for i in 0..config.concurrency.max(1) {
        let mut persist =
            build_worker(store.clone(), store_config, &persist_config, Role::Persist).await?;
        if i > 0 {
            persist.skip_maintenance();
        }
        persist.share_backlog(backlog.clone());
        persist.share_inbox(inbox.clone());
        tasks.push(tokio::spawn(persist.run(shutdown.clone())));
    }
    let mut index_config = config.clone();
    index_config.name = Some(format!("{base}-index"));
    if search.can_index() {
        let mut indexer = build_worker(
            store.clone(),
            store_config,
            &index_config,
            Role::Index(search.clone()),
        )
        .await?;
        indexer.share_backlog(backlog);
        tasks.push(tokio::spawn(indexer.run(shutdown.clone())));
    } else {
        tasks.push(tokio::spawn(standby_indexer(
            store.clone(),
            search.clone(),
            store_config.clone(),
            index_config,
            backlog,
            shutdown.clone(),
        )));
    }
    Ok(tasks)
}

/// How often a process without the index writer tries to take it over.
const STANDBY_POLL: Duration = Duration::from_secs(2);

/// Waits for the embedded index's writer to come free (its holder stopped or died),
/// takes it and indexes from then on: indexing never stays stalled while a worker runs.
async fn standby_indexer(
    store: Store,
    search: Search,
    store_config: StoreConfig,
    config: WorkerConfig,
    backlog: Backlog,
    mut shutdown: watch::Receiver<bool>,
) {
    while !*shutdown.borrow() {
        tokio::select! {
            _ = tokio::time::sleep(STANDBY_POLL) => {}
            _ = shutdown.changed() => continue,
        }
        match search.try_take_writer().await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "could not take the search index writer");
                continue;
            }
        }
        match build_worker(
            store.clone(),
            &store_config,
            &config,
            Role::Index(search.clone()),
        )
        .await
        {
            Ok(mut indexer) => {
                indexer.share_backlog(backlog);
                tracing::info!("took over the search index writer");
                return indexer.run(shutdown).await;
            }
            Err(e) => tracing::warn!(error = %e, "could not start the indexing worker"),
        }
    }
}

/// Serves `/healthz` and `/metrics` of a worker process in the background.
pub async fn serve_worker_metrics(
    addr: SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
    let router = http::worker_router(http::install_metrics_recorder());
    tokio::spawn(server::serve(
        listener,
        router,
        WORKER_METRICS_LIMITS,
        wait_for(shutdown),
    ));
    Ok(())
}

/// A watch channel that turns true on SIGINT or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutdown signal received; finishing work in hand");
        let _ = tx.send(true);
    });
    rx
}

/// Resolves when the watch turns true.
pub async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
