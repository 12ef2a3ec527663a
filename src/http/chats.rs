//! `/applications/{token}/chats`: creates and updates go through the queue.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{
    JsonBody, MaybeIdempotencyKey, NumberPage, OptionalJsonBody, QueryParams, nullable,
};
use super::openapi::{
    BadRequest, IdempotencyKeyHeader, NotFound, PayloadTooLarge, Unavailable, UnsupportedMediaType,
    ValidationFailed,
};
use super::{AppState, created, numbered_page};
use crate::domain::{Title, Token, parse_number};
use crate::error::ApiError;
use crate::resources::Chat;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, update, replace))
}

/// Body of `POST .../chats`, which may also be empty. Other fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(example = json!({"title": "general"}))]
pub struct CreateChat {
    /// At most 255 characters; absent or null for no title.
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 255)]
    pub title: Option<String>,
}

/// Body of `PATCH` and `PUT .../chats/{number}`. Other fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(example = json!({"title": "renamed"}))]
pub struct UpdateChat {
    /// At most 255 characters; null removes the title; absent leaves it unchanged.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 255)]
    pub title: Option<Option<String>>,
}

fn valid_title(title: Option<String>) -> Result<Option<Title>, ApiError> {
    Ok(Title::parse(title)?)
}

/// Creates a chat; its number is allocated at once and it is persisted asynchronously.
#[utoipa::path(
    post, path = "/applications/{token}/chats", tag = "chats", operation_id = "createChat",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"), IdempotencyKeyHeader),
    request_body(content = CreateChat, description = "Optional: an empty body (zero bytes) creates a chat without a title"),
    responses(
        (status = 201, description = "Created: the chat, with its number", body = Chat,
            headers(("Location" = String, description = "URL of the new chat"))),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge), (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed), (status = 503, response = Unavailable),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Path(token): Path<String>,
    MaybeIdempotencyKey(key): MaybeIdempotencyKey,
    OptionalJsonBody(input): OptionalJsonBody<CreateChat>,
) -> Result<Response, ApiError> {
    let token = Token::parse(&token)?;
    let title = valid_title(input.title)?;
    let chat = state.store.create_chat(&token, title, key.as_ref()).await?;
    let location = format!("/applications/{}/chats/{}", token.as_str(), chat.number);
    Ok(created(location, chat))
}

/// Lists an application's chats, oldest first (`order=asc`, the default, paged with
/// `after`) or newest first (`order=desc`, paged with `before`). Chats accepted but not
/// yet persisted are included: a chat is listed as soon as its create is answered.
#[utoipa::path(
    get, path = "/applications/{token}/chats", tag = "chats", operation_id = "listChats",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"), NumberPage),
    responses(
        (status = 200, description = "A page of chats, in the order asked for", body = [Chat],
            headers(("Link" = String, description = "`<next page>; rel=\"next\"` when more exist"))),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Path(token): Path<String>,
    QueryParams(page): QueryParams<NumberPage>,
) -> Result<Response, ApiError> {
    let token = Token::parse(&token)?;
    let request = page.request()?;
    let chats = state.store.list_chats(&token, request).await?;
    let path = format!("/applications/{}/chats", token.as_str());
    Ok(numbered_page(&path, &request, chats))
}

/// Shows one chat, including one accepted but not yet persisted.
#[utoipa::path(
    get, path = "/applications/{token}/chats/{number}", tag = "chats", operation_id = "getChat",
    params(
        ("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"),
        ("number" = u64, Path, description = "The chat's number", minimum = 1),
    ),
    responses(
        (status = 200, description = "The chat", body = Chat),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Path((token, number)): Path<(String, String)>,
) -> Result<Json<Chat>, ApiError> {
    let token = Token::parse(&token)?;
    let number = parse_number(&number, "chat")?;
    Ok(Json(state.store.chat(&token, number).await?))
}

/// Changes the fields given.
#[utoipa::path(
    patch, path = "/applications/{token}/chats/{number}", tag = "chats", operation_id = "updateChat",
    params(
        ("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"),
        ("number" = u64, Path, description = "The chat's number", minimum = 1),
    ),
    request_body = UpdateChat,
    responses(
        (status = 200, description = "The updated chat", body = Chat),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge), (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed), (status = 503, response = Unavailable),
    )
)]
pub async fn update(
    state: State<AppState>,
    path: Path<(String, String)>,
    input: JsonBody<UpdateChat>,
) -> Result<Json<Chat>, ApiError> {
    apply_update(state, path, input).await
}

/// Changes the fields given: `PUT` is the same as `PATCH`.
#[utoipa::path(
    put, path = "/applications/{token}/chats/{number}", tag = "chats", operation_id = "replaceChat",
    params(
        ("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"),
        ("number" = u64, Path, description = "The chat's number", minimum = 1),
    ),
    request_body = UpdateChat,
    responses(
        (status = 200, description = "The updated chat", body = Chat),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge), (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed), (status = 503, response = Unavailable),
    )
)]
pub async fn replace(
    state: State<AppState>,
    path: Path<(String, String)>,
    input: JsonBody<UpdateChat>,
) -> Result<Json<Chat>, ApiError> {
    apply_update(state, path, input).await
}

async fn apply_update(
    State(state): State<AppState>,
    Path((token, number)): Path<(String, String)>,
    JsonBody(input): JsonBody<UpdateChat>,
) -> Result<Json<Chat>, ApiError> {
    let token = Token::parse(&token)?;
    let number = parse_number(&number, "chat")?;
    let title = input.title.map(valid_title).transpose()?;
    Ok(Json(state.store.update_chat(&token, number, title).await?))
}
