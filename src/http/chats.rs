//! `/applications/{token}/chats`: creates and updates go through the queue.

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use serde::Deserialize;
use utoipa::ToSchema;

use super::extract::{
    JsonBody, NumberPage, OptionalJsonBody, QueryParams, nullable, page_after, page_limit,
};
use super::{AppState, created, paginated};
use crate::domain::{Token, parse_number, parse_title};
use crate::error::{ApiError, Problem};
use crate::idempotency::MaybeIdempotencyKey;
use crate::resources::Chat;
use crate::store::mysql;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/applications/{token}/chats", get(list).post(create))
        .route(
            "/applications/{token}/chats/{number}",
            get(show).patch(update).put(update),
        )
}

/// Body of the chat endpoints.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ChatInput {
    /// At most 255 characters; null for no title. Absent in an update: unchanged.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub title: Option<Option<String>>,
}

impl ChatInput {
    fn title(self) -> Result<Option<Option<String>>, ApiError> {
        self.title
            .map(|t| parse_title(t).map_err(|e| ApiError::Validation(vec![e])))
            .transpose()
    }
}

/// Creates a chat; its number is allocated at once and it is persisted asynchronously.
#[utoipa::path(
    post, path = "/applications/{token}/chats", tag = "chats",
    params(
        ("token" = String, Path, description = "The application's token"),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body within 24 h get the original 201 and create nothing; the same key with another body is a 422"),
    ),
    request_body(content = ChatInput, description = "Optional: an empty body is allowed"),
    responses(
        (status = 201, description = "Created", body = Chat,
            headers(("Location" = String, description = "URL of the new chat"))),
        (status = 400, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"), (status = 415, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"), (status = 503, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Path(token): Path<String>,
    MaybeIdempotencyKey(key): MaybeIdempotencyKey,
    OptionalJsonBody(input): OptionalJsonBody<ChatInput>,
) -> Result<Response, ApiError> {
    let token = Token::parse(&token)?;
    let title = input.title()?.flatten();
    let chat = state.store.create_chat(&token, title, key.as_ref()).await?;
    let location = format!("/applications/{}/chats/{}", token.as_str(), chat.number);
    Ok(created(location, chat))
}

/// Lists persisted chats in ascending `number`.
#[utoipa::path(
    get, path = "/applications/{token}/chats", tag = "chats",
    params(("token" = String, Path, description = "The application's token"), NumberPage),
    responses(
        (status = 200, description = "A page of chats", body = [Chat],
            headers(("Link" = String, description = "`<next page>; rel=\"next\"` when more exist"))),
        (status = 400, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"), (status = 503, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Path(token): Path<String>,
    QueryParams(page): QueryParams<NumberPage>,
) -> Result<Response, ApiError> {
    let token = Token::parse(&token)?;
    let limit = page_limit(page.limit)?;
    let app_id = state.store.application_id(&token).await?;
    let mut chats = mysql::chats_after(
        &state.store.mysql,
        app_id,
        page_after(page.after)?,
        limit + 1,
    )
    .await?;
    let next = (chats.len() > limit as usize).then(|| {
        chats.truncate(limit as usize);
        chats.last().map_or(0, |c| c.number)
    });
    let path = format!("/applications/{}/chats", token.as_str());
    Ok(paginated(&path, limit, next, chats))
}

/// Shows one chat, including one accepted but not yet persisted.
#[utoipa::path(
    get, path = "/applications/{token}/chats/{number}", tag = "chats",
    params(
        ("token" = String, Path, description = "The application's token"),
        ("number" = u64, Path, description = "The chat's number", minimum = 1),
    ),
    responses(
        (status = 200, body = Chat),
        (status = 400, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"), (status = 503, body = Problem, content_type = "application/problem+json"),
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

/// Replaces the given fields of a chat (`PATCH` and `PUT` behave the same).
#[utoipa::path(
    method(patch, put), path = "/applications/{token}/chats/{number}", tag = "chats",
    params(
        ("token" = String, Path, description = "The application's token"),
        ("number" = u64, Path, description = "The chat's number", minimum = 1),
    ),
    request_body = ChatInput,
    responses(
        (status = 200, body = Chat),
        (status = 400, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"), (status = 415, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"), (status = 503, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    Path((token, number)): Path<(String, String)>,
    JsonBody(input): JsonBody<ChatInput>,
) -> Result<Json<Chat>, ApiError> {
    let token = Token::parse(&token)?;
    let number = parse_number(&number, "chat")?;
    let title = input.title()?;
    Ok(Json(state.store.update_chat(&token, number, title).await?))
}
