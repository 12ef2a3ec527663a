//! `/applications`: written to MySQL synchronously (creation is rare).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{CursorPage, JsonBody, MaybeIdempotencyKey, QueryParams, page_limit};
use super::openapi::{
    BadRequest, IdempotencyKeyHeader, InProgress, ListingDisabled, NotFound, PayloadTooLarge,
    Unauthorized, Unavailable, UnsupportedMediaType, ValidationFailed,
};
use super::{AppState, created, page_of};
use crate::domain::{Name, Token};
use crate::error::ApiError;
use crate::idempotency::{NextAction, fingerprint};
use crate::resources::{Application, now};
use crate::store::mysql;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, update, replace))
}

/// Body of `POST /applications`. Other fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(example = json!({"name": "my chat app"}))]
pub struct CreateApplication {
    /// 1 to 255 characters, not only blanks.
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 255)]
    pub name: Option<String>,
}

/// Body of `PATCH` and `PUT /applications/{token}`. Other fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(example = json!({"name": "renamed"}))]
pub struct UpdateApplication {
    /// The new name: 1 to 255 characters, not only blanks.
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 255)]
    pub name: Option<String>,
}

/// Registers an application and returns its token.
#[utoipa::path(
    post, path = "/applications", tag = "applications", operation_id = "createApplication",
    params(IdempotencyKeyHeader),
    request_body = CreateApplication,
    responses(
        (status = 201, description = "Created: the application, with its token", body = Application,
            headers(("Location" = String, description = "URL of the new application"))),
        (status = 400, response = BadRequest), (status = 409, response = InProgress),
        (status = 413, response = PayloadTooLarge), (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed), (status = 503, response = Unavailable),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    MaybeIdempotencyKey(key): MaybeIdempotencyKey,
    JsonBody(input): JsonBody<CreateApplication>,
) -> Result<Response, ApiError> {
    let name = Name::parse(input.name)?;
    let Some(key) = key else {
        let app = insert_application(&state, name).await?;
        return Ok(created(format!("/applications/{}", app.token), app));
    };
    let queue = &state.store.queue;
    let redis_key = queue.keys.idempotency_applications(key.as_str());
    let fingerprint = fingerprint(&[Some(name.as_str())]);
    match queue.begin(&redis_key, &fingerprint).await? {
        NextAction::Proceed => {}
        NextAction::Replay(answer) => {
            let app: Application = serde_json::from_str(&answer)
                .map_err(|e| ApiError::internal(format!("a recorded answer: {e}")))?;
            return Ok(created(format!("/applications/{}", app.token), app));
        }
        NextAction::InProgress => {
            return Err(ApiError::Conflict(
                "a request with this Idempotency-Key is still in progress; retry later".into(),
            ));
        }
        NextAction::Mismatch => return Err(ApiError::idempotency_mismatch()),
    }
    let app = match insert_application(&state, name).await {
        Ok(app) => app,
        Err(e) => {
            if let Err(abandon) = queue.abandon(&redis_key).await {
                tracing::warn!(error = %abandon, "cannot free an idempotency key");
            }
            return Err(e);
        }
    };
    // The application exists: a failure to record the answer must not turn its 201 into
    // an error (retries then get a 409 until the key expires).
    let answer = serde_json::to_string(&app).unwrap_or_default();
    if let Err(e) = queue.complete(&redis_key, &fingerprint, &answer).await {
        tracing::warn!(error = %e, "cannot record an idempotent answer");
    }
    Ok(created(format!("/applications/{}", app.token), app))
}

/// Writes a new application to MySQL and caches its token.
async fn insert_application(state: &AppState, name: Name) -> Result<Application, ApiError> {
    let at = now();
    let token = Token::generate()?;
    let app = Application {
        token: token.as_str().to_owned(),
        name: name.into_string(),
        chats_count: 0,
        created_at: at,
        updated_at: at,
    };
    let id = mysql::insert_application(&state.store.mysql, &app).await?;
    // The application exists from here on: a failed cache write must not turn its 201
    // into an error (a retry would create a second one). The first create under the
    // token then finds the cache cold and fills it from MySQL.
    if let Err(e) = state
        .store
        .queue
        .cache_application(&app.token, id, true)
        .await
    {
        tracing::warn!(error = %e, "application created but not cached");
    }
    tracing::info!(token = %token.log_id(), "application created");
    Ok(app)
}

/// Lists applications in creation order. The list reveals every token, so it is
/// disabled (403) unless the server sets `ADMIN_API_KEY`, and then requires
/// `Authorization: Bearer <ADMIN_API_KEY>` (401 without it).
#[utoipa::path(
    get, path = "/applications", tag = "applications", operation_id = "listApplications",
    params(CursorPage),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "A page of applications, oldest first", body = [Application],
            headers(("Link" = String, description = "`<next page>; rel=\"next\"` when more exist"))),
        (status = 400, response = BadRequest), (status = 401, response = Unauthorized),
        (status = 403, response = ListingDisabled), (status = 503, response = Unavailable),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(page): QueryParams<CursorPage>,
) -> Result<Response, ApiError> {
    state.authorize_admin(&headers)?;
    let limit = page_limit(page.limit)?;
    let not_issued = || ApiError::BadRequest("`after` is not a cursor this API issued".into());
    // The cursor is the last token of the previous page: anything else is refused here,
    // before it reaches SQL.
    let after = match page.after.as_deref() {
        Some(cursor) => Some(Token::parse(cursor).map_err(|_| not_issued())?),
        None => None,
    };
    let apps = mysql::applications_after(
        &state.store.mysql,
        after.as_ref().map(Token::as_str),
        limit + 1,
    )
    .await?
    .ok_or_else(not_issued)?;
    Ok(page_of("/applications", limit, apps, |a| a.token.clone()))
}

/// Shows one application.
#[utoipa::path(
    get, path = "/applications/{token}", tag = "applications", operation_id = "getApplication",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx")),
    responses(
        (status = 200, description = "The application", body = Application),
        (status = 404, response = NotFound), (status = 503, response = Unavailable),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<Json<Application>, ApiError> {
    let token = Token::parse(&token)?;
    mysql::application(&state.store.mysql, token.as_str())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("application"))
}

/// Renames an application.
#[utoipa::path(
    patch, path = "/applications/{token}", tag = "applications", operation_id = "updateApplication",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx")),
    request_body = UpdateApplication,
    responses(
        (status = 200, description = "The renamed application", body = Application),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge), (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed), (status = 503, response = Unavailable),
    )
)]
pub async fn update(
    state: State<AppState>,
    token: Path<String>,
    input: JsonBody<UpdateApplication>,
) -> Result<Json<Application>, ApiError> {
    rename(state, token, input).await
}

/// Renames an application: `PUT` is the same as `PATCH`.
#[utoipa::path(
    put, path = "/applications/{token}", tag = "applications", operation_id = "replaceApplication",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx")),
    request_body = UpdateApplication,
    responses(
        (status = 200, description = "The renamed application", body = Application),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge), (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed), (status = 503, response = Unavailable),
    )
)]
pub async fn replace(
    state: State<AppState>,
    token: Path<String>,
    input: JsonBody<UpdateApplication>,
) -> Result<Json<Application>, ApiError> {
    rename(state, token, input).await
}

async fn rename(
    State(state): State<AppState>,
    Path(token): Path<String>,
    JsonBody(input): JsonBody<UpdateApplication>,
) -> Result<Json<Application>, ApiError> {
    let token = Token::parse(&token)?;
    let name = Name::parse(input.name)?;
    let app = mysql::rename_application(&state.store.mysql, token.as_str(), name.as_str(), now())
        .await?
        .ok_or_else(|| ApiError::not_found("application"))?;
    Ok(Json(app))
}
