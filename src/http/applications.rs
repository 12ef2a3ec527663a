//! `/applications`: written to MySQL synchronously (creation is rare).

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use serde::Deserialize;
use utoipa::ToSchema;

use super::extract::{CursorPage, JsonBody, QueryParams, page_limit};
use super::{AppState, created, paginated};
use crate::domain::{Token, parse_name};
use crate::error::{ApiError, Problem};
use crate::resources::{Application, now};
use crate::store::mysql;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/applications", get(list).post(create))
        .route("/applications/{token}", get(show).patch(update).put(update))
}

/// Body of `POST /applications`, `PATCH` and `PUT /applications/{token}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ApplicationInput {
    /// 1 to 255 characters.
    #[serde(default)]
    pub name: Option<String>,
}

/// Registers an application and returns its token.
#[utoipa::path(
    post, path = "/applications", tag = "applications",
    request_body = ApplicationInput,
    responses(
        (status = 201, description = "Created", body = Application,
            headers(("Location" = String, description = "URL of the new application"))),
        (status = 400, body = Problem), (status = 413, body = Problem),
        (status = 415, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(input): JsonBody<ApplicationInput>,
) -> Result<Response, ApiError> {
    let name = parse_name(input.name).map_err(|e| ApiError::Validation(vec![e]))?;
    let at = now();
    let app = Application {
        token: Token::generate()?.as_str().to_owned(),
        name,
        chats_count: 0,
        created_at: at,
        updated_at: at,
    };
    let id = mysql::insert_application(&state.store.mysql, &app).await?;
    state
        .store
        .queue
        .cache_application(&app.token, id, true)
        .await?;
    tracing::info!(token = %app.token, "application created");
    Ok(created(format!("/applications/{}", app.token), app))
}

/// Lists applications in creation order. Restricted by `ADMIN_API_KEY` when it is set,
/// because the list reveals every token.
#[utoipa::path(
    get, path = "/applications", tag = "applications",
    params(CursorPage),
    security((), ("admin_key" = [])),
    responses(
        (status = 200, description = "A page of applications", body = [Application],
            headers(("Link" = String, description = "`<next page>; rel=\"next\"` when more exist"))),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 503, body = Problem),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(page): QueryParams<CursorPage>,
) -> Result<Response, ApiError> {
    state.authorize_admin(&headers)?;
    let limit = page_limit(page.limit)?;
    let mut apps = mysql::applications_after(&state.store.mysql, page.after.as_deref(), limit + 1)
        .await?
        .ok_or_else(|| ApiError::BadRequest("`after` is not a cursor this API issued".into()))?;
    let next = (apps.len() > limit as usize).then(|| {
        apps.truncate(limit as usize);
        apps.last().map(|a| a.token.clone()).unwrap_or_default()
    });
    Ok(paginated("/applications", limit, next, apps))
}

/// Shows one application.
#[utoipa::path(
    get, path = "/applications/{token}", tag = "applications",
    params(("token" = String, Path, description = "The application's token")),
    responses(
        (status = 200, body = Application),
        (status = 404, body = Problem), (status = 503, body = Problem),
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

/// Renames an application (`PATCH` and `PUT` behave the same).
#[utoipa::path(
    method(patch, put), path = "/applications/{token}", tag = "applications",
    params(("token" = String, Path, description = "The application's token")),
    request_body = ApplicationInput,
    responses(
        (status = 200, body = Application),
        (status = 400, body = Problem), (status = 404, body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    Path(token): Path<String>,
    JsonBody(input): JsonBody<ApplicationInput>,
) -> Result<Json<Application>, ApiError> {
    let token = Token::parse(&token)?;
    let name = parse_name(input.name).map_err(|e| ApiError::Validation(vec![e]))?;
    let app = mysql::rename_application(&state.store.mysql, token.as_str(), &name, now())
        .await?
        .ok_or_else(|| ApiError::not_found("application"))?;
    Ok(Json(app))
}
