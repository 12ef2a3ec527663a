//! The one error type of the HTTP API and its mapping to RFC 9457 problem responses.
//!
//! Handlers return `Result<_, ApiError>`; extractor rejections, unknown routes and
//! middleware failures are turned into the same shape (see `http::problem_bodies`).
//! Every conversion into it is here, so the layers below know nothing of HTTP. Bodies of
//! 5xx answers are constant: the cause is kept as the error's source and logged once,
//! when the response is made, never sent to the client.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

pub use crate::domain::FieldError;
use crate::domain::{Malformed, UnknownToken};

/// A dependency whose failure turns a request into a 503.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dependency {
    Mysql,
    Redis,
    Search,
}

impl Dependency {
    pub fn name(self) -> &'static str {
        match self {
            Self::Mysql => "mysql",
            Self::Redis => "redis",
            Self::Search => "search",
        }
    }
}

/// Why new writes are refused for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overload {
    /// The write backlog is over `QUEUE_MAX_ENTRIES` or `QUEUE_MAX_MEMORY`.
    Backlog,
    /// Redis answered `OOM`: it is at its `maxmemory`.
    RedisMemory,
    /// The process has `EVENTS_MAX_SUBSCRIBERS` live subscribers already.
    Subscribers,
}

/// Seconds a client is asked to wait before retrying a refused write: long enough for
/// workers to drain a few batches, short enough not to look like an outage.
const OVERLOAD_RETRY_AFTER: &str = "5";

/// A failure whose details are for the log only.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unauthorized")]
    Unauthorized,
    #[error("the application list is disabled")]
    ListingDisabled,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("request timed out")]
    Timeout,
    #[error("{} is unavailable", .0.name())]
    Unavailable(Dependency, #[source] Cause),
    #[error("overloaded: {0:?}")]
    Overloaded(Overload),
    /// A search stopped at its time budget.
    #[error("search ran past its budget of {0:?}")]
    SearchTimedOut(std::time::Duration),
    /// This host's embedded search index is not the one being written.
    #[error("search index not on this host")]
    SearchNotHere(#[source] Cause),
    /// `/readyz` with a failing check: each check and its state.
    #[error("not ready")]
    NotReady(BTreeMap<&'static str, &'static str>),
    #[error("internal error")]
    Internal(#[source] Cause),
}

impl ApiError {
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound(what.into())
    }

    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ListingDisabled => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(..)
            | Self::Timeout
            | Self::Overloaded(_)
            | Self::NotReady(_)
            | Self::SearchTimedOut(_)
            | Self::SearchNotHere(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn problem(&self) -> Problem {
        let status = self.status();
        let (slug, detail) = match self {
            Self::BadRequest(detail) => ("bad-request", detail.clone()),
            Self::Unauthorized => (
                "unauthorized",
                "this endpoint requires `Authorization: Bearer <ADMIN_API_KEY>`".into(),
            ),
            Self::ListingDisabled => (
                "listing-disabled",
                "listing applications is disabled on this server; its operator enables it by \
                 setting ADMIN_API_KEY, then callers send `Authorization: Bearer <key>`"
                    .into(),
            ),
            Self::NotFound(what) => ("not-found", format!("{what} was not found")),
            Self::Conflict(detail) => ("conflict", detail.clone()),
            Self::MethodNotAllowed => (
                "method-not-allowed",
                "this method is not allowed on this path; see the Allow header".into(),
            ),
            Self::PayloadTooLarge => (
                "payload-too-large",
                "the request body is larger than the configured limit".into(),
            ),
            Self::UnsupportedMediaType => (
                "unsupported-media-type",
                "the request body must be JSON, sent with `Content-Type: application/json`".into(),
            ),
            Self::Validation(_) => (
                "validation-failed",
                "one or more fields are invalid; see `errors`".into(),
            ),
            Self::Unavailable(dep, _) => (
                "dependency-unavailable",
                format!("{} is unavailable; retry later", dep.name()),
            ),
            Self::Overloaded(Overload::Backlog) => (
                "overloaded",
                "the write backlog is over its bound; reads still work; retry writes after \
                 Retry-After seconds"
                    .into(),
            ),
            Self::Overloaded(Overload::RedisMemory) => (
                "overloaded",
                "the write queue's memory is full; reads still work; retry writes after \
                 Retry-After seconds"
                    .into(),
            ),
            Self::Overloaded(Overload::Subscribers) => (
                "overloaded",
                "this server has its most live subscribers; retry after Retry-After seconds \
                 (another server may have room)"
                    .into(),
            ),
            Self::NotReady(checks) => (
                "dependency-unavailable",
                format!(
                    "not ready: {}",
                    checks
                        .iter()
                        .filter(|(_, state)| **state != "ok")
                        .map(|(name, state)| format!("{name} {state}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Self::SearchTimedOut(budget) => (
                "search-timed-out",
                format!(
                    "the search ran past its time budget of {} ms and was stopped; longer, \
                     more specific terms search faster",
                    budget.as_millis()
                ),
            ),
            Self::SearchNotHere(_) => (
                "search-index-elsewhere",
                "search is not served here: this host's embedded search index is not the one \
                 the indexing worker writes (an embedded index serves one host); deployments \
                 of several hosts use Elasticsearch (ELASTICSEARCH_URL)"
                    .into(),
            ),
            Self::Timeout => (
                "timeout",
                "the request did not complete in time; retry later".into(),
            ),
            Self::Internal(_) => ("internal", "an unexpected error occurred".into()),
        };
        Problem {
            problem_type: format!("/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            errors: match self {
                Self::Validation(errors) => Some(errors.clone()),
                _ => None,
            },
            checks: match self {
                Self::NotReady(checks) => Some(checks.clone()),
                _ => None,
            },
        }
    }
}

/// An RFC 9457 problem document, the body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI reference naming the kind of problem, such as `/problems/not-found`.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// The HTTP reason phrase.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, for people.
    pub detail: String,
    /// The invalid fields, for 422 answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
    /// Each readiness check and its state (`ok`, `unavailable`, `full`), for `/readyz`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<BTreeMap<&'static str, &'static str>>,
}

pub const PROBLEM_JSON: &str = "application/problem+json";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(cause) => {
                tracing::error!(error = %chain(cause.as_ref()), "internal error")
            }
            Self::Unavailable(dep, cause) => tracing::warn!(
                dependency = dep.name(),
                error = %chain(cause.as_ref()),
                "dependency unavailable"
            ),
            Self::Overloaded(why) => tracing::warn!(reason = ?why, "write refused: overloaded"),
            _ => {}
        }
        let problem = self.problem();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (self.status(), body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        let retry_after = match self {
            Self::Unavailable(..) | Self::Timeout | Self::SearchTimedOut(_) => Some("1"),
            Self::Overloaded(_) => Some(OVERLOAD_RETRY_AFTER),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }
}

/// An error with its sources, `outer: inner: ...`, for one log field.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

impl ApiError {
    /// A failure of the service itself: a 500 whose cause only the log sees.
    pub fn internal(cause: impl Into<Cause>) -> Self {
        Self::Internal(cause.into())
    }

    /// The `Idempotency-Key` was used before with another body.
    pub fn idempotency_mismatch() -> Self {
        Self::invalid(
            "Idempotency-Key",
            "this key was used with a different request body",
        )
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        Self::from_mysql(crate::store::mysql_is_down(&err), err.into())
    }
}

/// A coalesced read's error, shared by the reads of its statement.
impl From<crate::store::coalesce::ReadError> for ApiError {
    fn from(err: crate::store::coalesce::ReadError) -> Self {
        Self::from_mysql(crate::store::mysql_is_down(&err), err.into())
    }
}

impl ApiError {
    /// A MySQL failure: a 503 when MySQL cannot be reached, else an internal error.
    fn from_mysql(down: bool, cause: Cause) -> Self {
        if down {
            Self::Unavailable(Dependency::Mysql, cause)
        } else {
            Self::Internal(cause)
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(err: redis::RedisError) -> Self {
        if crate::store::redis_is_full(&err) {
            Self::Overloaded(Overload::RedisMemory)
        } else if crate::store::redis_is_down(&err) {
            Self::Unavailable(Dependency::Redis, err.into())
        } else {
            Self::Internal(err.into())
        }
    }
}

impl From<crate::events::SubscribeError> for ApiError {
    fn from(err: crate::events::SubscribeError) -> Self {
        use crate::events::SubscribeError;
        match err {
            SubscribeError::Full => Self::Overloaded(Overload::Subscribers),
            SubscribeError::Closed => Self::Unavailable(Dependency::Redis, err.into()),
            SubscribeError::Redis(e) => e.into(),
        }
    }
}

impl From<crate::search::SearchError> for ApiError {
    fn from(err: crate::search::SearchError) -> Self {
        match err {
            crate::search::SearchError::Unavailable(_) => {
                Self::Unavailable(Dependency::Search, err.into())
            }
            crate::search::SearchError::Failed(_) => Self::Internal(err.into()),
            crate::search::SearchError::TimedOut(budget) => Self::SearchTimedOut(budget),
            crate::search::SearchError::ForeignIndex(_) => Self::SearchNotHere(err.into()),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(err: FieldError) -> Self {
        Self::Validation(vec![err])
    }
}

impl From<Malformed> for ApiError {
    fn from(Malformed(detail): Malformed) -> Self {
        Self::BadRequest(detail)
    }
}

impl From<UnknownToken> for ApiError {
    fn from(_: UnknownToken) -> Self {
        Self::not_found("application")
    }
}

impl From<getrandom::Error> for ApiError {
    fn from(err: getrandom::Error) -> Self {
        Self::Internal(format!("random source failed: {err}").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let problem = ApiError::internal("SELECT secret FROM t").problem();
        assert_eq!(problem.status, 500);
        assert!(!problem.detail.contains("SELECT"));
    }

    #[test]
    fn redis_not_ready_is_a_503_and_a_bad_command_is_not() {
        use redis::{ErrorKind, RedisError, ServerErrorKind};
        for kind in [
            ServerErrorKind::BusyLoading,
            ServerErrorKind::TryAgain,
            ServerErrorKind::MasterDown,
            ServerErrorKind::ReadOnly,
        ] {
            let err = RedisError::from((ErrorKind::Server(kind), "not ready"));
            assert_eq!(ApiError::from(err).problem().status, 503, "{kind:?}");
        }
        let err = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "bad"));
        assert_eq!(ApiError::from(err).problem().status, 500);
    }

    #[test]
    fn overload_is_a_503_with_a_longer_retry_after() {
        let response = ApiError::Overloaded(Overload::Backlog).into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(
            response.headers()[header::RETRY_AFTER],
            OVERLOAD_RETRY_AFTER
        );
    }

    #[test]
    fn a_search_past_its_budget_is_a_503_that_says_so() {
        use crate::search::SearchError;
        let err = ApiError::from(SearchError::TimedOut(std::time::Duration::from_millis(500)));
        let problem = err.problem();
        assert_eq!(problem.status, 503);
        assert_eq!(problem.problem_type, "/problems/search-timed-out");
        assert!(problem.detail.contains("500 ms"), "{}", problem.detail);
    }

    #[test]
    fn a_foreign_search_index_is_a_503_that_points_to_elasticsearch() {
        use crate::search::SearchError;
        let err = ApiError::from(SearchError::ForeignIndex("index 1234 is not 5678".into()));
        let problem = err.problem();
        assert_eq!(problem.status, 503);
        assert_eq!(problem.problem_type, "/problems/search-index-elsewhere");
        assert!(
            problem.detail.contains("Elasticsearch"),
            "{}",
            problem.detail
        );
        assert!(!problem.detail.contains("1234"), "details stay in the log");
    }

    #[test]
    fn validation_errors_list_fields() {
        let problem = ApiError::invalid("name", "must not be empty").problem();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.problem_type, "/problems/validation-failed");
        assert_eq!(problem.errors.unwrap()[0].field, "name");
    }
}
