//! The HTTP API: one router per resource, merged here with the operational endpoints
//! and the middleware stack (request ids, tracing, metrics, limits, problem bodies).

mod applications;
mod chats;
mod events;
pub mod extract;
mod messages;
mod openapi;
mod ops;

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use sha2::{Digest, Sha256};

use crate::config::{ApiConfig, Secret};
use crate::domain::Token;
use crate::error::{ApiError, PROBLEM_JSON};
use crate::search::Search;
use crate::store::Store;

pub use openapi::ApiDoc;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub search: Search,
    /// Live subscriptions of this process.
    pub events: crate::events::EventHub,
    pub metrics: PrometheusHandle,
    /// SHA-256 of `ADMIN_API_KEY`; `None` disables the application list.
    admin_key_digest: Option<[u8; 32]>,
}

impl AppState {
    pub fn new(
        store: Store,
        search: Search,
        events: crate::events::EventHub,
        metrics: PrometheusHandle,
        admin_api_key: Option<&Secret>,
    ) -> Self {
        Self {
            store,
            search,
            events,
            metrics,
            admin_key_digest: admin_api_key.map(|key| Sha256::digest(key.expose()).into()),
        }
    }

    /// Passes only when an admin key is configured and the request carries it. Digests
    /// of equal size are compared in constant time, so neither the key's bytes nor its
    /// length can be found by timing.
    fn authorize_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.admin_key_digest else {
            return Err(ApiError::ListingDisabled);
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let given: [u8; 32] = Sha256::digest(given).into();
        let difference = given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y));
        if difference == 0 {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// Every documented route with its OpenAPI operation, from one list: a route cannot be
/// served undocumented, nor documented unserved.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(applications::router())
        .merge(chats::router())
        .merge(messages::router())
        .merge(events::router())
        .merge(ops::router())
}

/// The OpenAPI document of the API (`/openapi.json`, `docs/openapi.json`).
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let (_, mut document) = api().split_for_parts();
        openapi::finish(&mut document);
        document
    })
}

/// The whole application, ready to serve.
pub fn router(state: AppState, config: &ApiConfig) -> Router {
    let (routes, _) = api().split_for_parts();
    routes
        .merge(ops::docs_ui())
        .fallback(|| async { ApiError::not_found("route") })
        .with_state(state)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            config.request_timeout,
        ))
        // Outside the timeout, so that its bare 503 gets a problem body too.
        .layer(middleware::map_response(problem_bodies))
        .layer(middleware::from_fn(record_metrics))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(SetRequestIdLayer::x_request_id(RandomRequestId))
        .layer(middleware::map_request(drop_invalid_request_id))
}

/// The span of one request. It names the route template, never the path: paths carry
/// tokens, which are secrets, and their length is the client's choice. The token is
/// logged as its [`Token::log_id`], enough to correlate lines, useless to a reader.
fn request_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let token = route
        .starts_with("/applications/{token}")
        .then(|| req.uri().path().split('/').nth(2))
        .flatten()
        .and_then(|t| Token::parse(t).ok())
        .map(|t| t.log_id());
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        method = method_label(req.method()),
        route,
        token = token.as_deref().unwrap_or(""),
        request_id = id,
    )
}

const REQUEST_ID: &str = "x-request-id";

/// A client's `X-Request-Id` is kept (echoed and logged) only when it is 1 to 128 of
/// `[A-Za-z0-9._-]`; any other value could forge log fields or bloat every log line, so
/// it is dropped and the request gets a generated id instead.
async fn drop_invalid_request_id(mut req: Request) -> Request {
    let valid = req.headers().get(REQUEST_ID).is_none_or(|v| {
        let v = v.as_bytes();
        (1..=128).contains(&v.len())
            && v.iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    });
    if !valid {
        req.headers_mut().remove(REQUEST_ID);
    }
    req
}

/// The method as a metric label or log field: one of the standard methods, else
/// `other` (a method is any token a client likes, of any length).
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    STANDARD
        .iter()
        .find(|m| *m == method)
        .map_or("other", Method::as_str)
}

/// Request ids: 64 bits, hex, from a per-thread xorshift generator seeded by the OS
/// (ids need to be unique, not secret, and a system call per request is not free).
#[derive(Clone, Copy)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        thread_local! {
            static STATE: std::cell::Cell<u64> =
                std::cell::Cell::new(getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15) | 1);
        }
        let id = STATE.with(|state| {
            let mut x = state.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            state.set(x);
            x
        });
        HeaderValue::from_str(&format!("{id:016x}"))
            .ok()
            .map(RequestId::new)
    }
}

/// Gives every error response without a problem body (a 405 from routing, a 503 from
/// the timeout layer, ...) the house problem body, keeping its status and headers.
async fn problem_bodies(response: Response) -> Response {
    let status = response.status();
    let has_problem = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if !(status.is_client_error() || status.is_server_error()) || has_problem {
        return response;
    }
    let error = match status {
        StatusCode::NOT_FOUND => ApiError::not_found("route"),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
        StatusCode::SERVICE_UNAVAILABLE => ApiError::Timeout,
        s if s.is_client_error() => {
            ApiError::BadRequest(s.canonical_reason().unwrap_or("bad request").to_owned())
        }
        s => ApiError::internal(format!("{s} without a body")),
    };
    let (mut parts, _) = response.into_parts();
    let (new_parts, body) = error.into_response().into_parts();
    for (name, value) in &new_parts.headers {
        parts.headers.insert(name, value.clone());
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, body)
}

/// `http_requests_total` and `http_request_duration_seconds`, by method, route and status.
async fn record_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let response = next.run(req).await;
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    response
}

/// A 201 with the resource and its `Location`.
fn created<T: Serialize>(location: String, resource: T) -> Response {
    let mut response = (StatusCode::CREATED, Json(resource)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

/// A page of a list from `items`, fetched with one more than `limit` to learn whether
/// more exist: the first `limit` of them, with `Link: <...>; rel="next"` when more exist.
/// `path` may carry a query string of its own; `cursor` is the `after` of the next page,
/// taken from the page's last item.
fn page_of<T: Serialize, C: std::fmt::Display>(
    path: &str,
    limit: u32,
    mut items: Vec<T>,
    cursor: impl Fn(&T) -> C,
) -> Response {
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next = more.then(|| items.last().map(cursor)).flatten();
    let mut response = Json(items).into_response();
    if let Some(after) = next {
        let separator = if path.contains('?') { '&' } else { '?' };
        let link = format!("<{path}{separator}limit={limit}&after={after}>; rel=\"next\"");
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    response
}

/// A page of a numbered list as JSON, with `Link: <next page>; rel="next"` when more may
/// follow (same order and size, the cursor moved on).
fn numbered_page<T: Serialize>(
    path: &str,
    request: &crate::service::PageRequest,
    page: crate::service::Page<T>,
) -> Response {
    let mut response = Json(page.items).into_response();
    if let Some(cursor) = page.next {
        let limit = request.limit;
        let link = match request.direction {
            crate::store::queue::Direction::Asc => {
                format!("<{path}?limit={limit}&after={cursor}>; rel=\"next\"")
            }
            crate::store::queue::Direction::Desc => {
                format!("<{path}?order=desc&limit={limit}&before={cursor}>; rel=\"next\"")
            }
        };
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    response
}

pub use ops::{install_metrics_recorder, worker_router};
