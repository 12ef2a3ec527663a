//! Operational endpoints: liveness, readiness, metrics and the OpenAPI document.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::error::{ApiError, Problem};
use crate::search::SearchError;
use crate::store::mysql;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics_text))
        .routes(routes!(openapi_json))
}

/// The interactive reference, served whole by this process (no CDN), reading
/// `/openapi.json`; not itself part of the document.
pub fn docs_ui() -> Router<AppState> {
    Router::new().merge(
        utoipa_swagger_ui::SwaggerUi::new("/docs")
            .config(utoipa_swagger_ui::Config::from("/openapi.json")),
    )
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn install_metrics_recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            const LATENCY: &[f64] = &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            // Queue lags get finer buckets around their targets (250 ms, 1 s).
            const LAG: &[f64] = &[
                0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4,
                0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(LATENCY)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("lag_seconds".into()), LAG))
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let handle = builder.install_recorder().unwrap_or_else(|_| {
                // Another recorder is installed (only possible in tests): render an
                // independent one so /metrics still answers.
                PrometheusBuilder::new().build_recorder().handle()
            });
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// Histogram samples wait in a buffer until the recorder's upkeep folds them into the
/// buckets; `install_recorder` leaves running it to the caller, and without it every
/// request's latency sample is kept forever (memory grows with traffic). A plain thread:
/// it needs no runtime and lives as long as the process.
fn spawn_upkeep(handle: PrometheusHandle) {
    const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
    }
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`
    status: &'static str,
}

/// The endpoints a worker process serves: liveness and metrics.
pub fn worker_router(metrics: PrometheusHandle) -> Router {
    Router::new().route("/healthz", get(healthz)).route(
        "/metrics",
        get(move || {
            let text = metrics.render();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
        }),
    )
}

/// Liveness: 200 while the process runs.
#[utoipa::path(
    get, path = "/healthz", tag = "operations", operation_id = "getHealth",
    responses((status = 200, description = "The process is alive", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// One dependency's state in a readiness answer.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`
    status: &'static str,
    /// `ok` for each dependency checked.
    checks: serde_json::Value,
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness: 200 when MySQL, Redis (on a cluster: `cluster_state:ok`) and the search
/// backend answer and the write queue takes writes, else 503 naming each check that fails
/// (`queue: full` while creates and updates are refused for backpressure in any shard;
/// reads still work then).
#[utoipa::path(
    get, path = "/readyz", tag = "operations", operation_id = "getReadiness",
    responses(
        (status = 200, description = "Ready: every check is `ok`", body = Readiness),
        (status = 503, description = "Not ready: a problem document whose `checks` names each \
            failing check (`mysql`, `redis`, `search`: `unavailable`; `queue`: `full` while \
            writes are refused for backpressure; `search`: `foreign_index` when this host's \
            embedded search index is not the one the indexing worker writes: an embedded \
            index serves one host, several hosts use Elasticsearch)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let (mysql_ok, redis_ok, search_ok, pressure) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, mysql::ping(&state.store.mysql)),
        tokio::time::timeout(CHECK_TIMEOUT, state.store.queue.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, state.search.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, state.store.queue.any_shard_full()),
    );
    let state_of = |ok: bool| if ok { "ok" } else { "unavailable" };
    let redis_ok = matches!(redis_ok, Ok(Ok(())));
    // The write queue: `full` while creates and updates are refused (reads still work).
    let queue = match pressure {
        Ok(Ok(true)) => "full",
        Ok(Ok(false)) => "ok",
        _ => "unavailable",
    };
    let checks = BTreeMap::from([
        ("mysql", state_of(matches!(mysql_ok, Ok(Ok(()))))),
        ("redis", state_of(redis_ok)),
        (
            "search",
            match search_ok {
                Ok(Ok(())) => "ok",
                // This host's embedded index is not the one being written.
                Ok(Err(SearchError::ForeignIndex(_))) => "foreign_index",
                _ => "unavailable",
            },
        ),
        ("queue", if redis_ok { queue } else { "unavailable" }),
    ]);
    if checks.values().all(|state| *state == "ok") {
        return Json(json!({"status": "ready", "checks": checks})).into_response();
    }
    ApiError::NotReady(checks).into_response()
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(
    get, path = "/metrics", tag = "operations", operation_id = "getMetrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// This OpenAPI 3 document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations", operation_id = "getOpenApi",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(super::openapi())
}
