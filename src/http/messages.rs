//! `/applications/{token}/chats/{number}/messages`: creates and updates go through the queue.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{
    JsonBody, MaybeIdempotencyKey, NumberPage, QueryParams, page_after, page_limit,
};
use super::openapi::{
    BadRequest, IdempotencyKeyHeader, NotFound, PayloadTooLarge, Unavailable, UnsupportedMediaType,
    ValidationFailed,
};
use super::{AppState, created, numbered_page, page_of};
use crate::domain::{Body, Token, parse_number};
use crate::error::ApiError;
use crate::resources::Message;
use crate::search::{SearchQuery, parse_terms};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(search))
        .routes(routes!(show, update, replace))
}

/// Body of `POST .../messages`. Other fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(example = json!({"body": "Hello, world"}))]
pub struct CreateMessage {
    /// 1 to 65,535 bytes of text, not only blanks.
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1)]
    pub body: Option<String>,
}

/// Body of `PATCH` and `PUT .../messages/{number}`. Other fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(example = json!({"body": "Hello, world (edited)"}))]
pub struct UpdateMessage {
    /// The new text: 1 to 65,535 bytes, not only blanks.
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1)]
    pub body: Option<String>,
}

/// Posts a message to a chat; its number is allocated at once and it is persisted
/// asynchronously.
#[utoipa::path(
    post, path = "/applications/{token}/chats/{chat}/messages", tag = "messages", operation_id = "createMessage",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"), ("chat" = u64, Path, description = "The chat's number", minimum = 1), IdempotencyKeyHeader),
    request_body = CreateMessage,
    responses(
        (status = 201, description = "Created: the message, with its number", body = Message,
            headers(("Location" = String, description = "URL of the new message"))),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge), (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed), (status = 503, response = Unavailable),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Path((token, chat)): Path<(String, String)>,
    MaybeIdempotencyKey(key): MaybeIdempotencyKey,
    JsonBody(input): JsonBody<CreateMessage>,
) -> Result<Response, ApiError> {
    let token = Token::parse(&token)?;
    let chat = parse_number(&chat, "chat")?;
    let body = Body::parse(input.body)?;
    let message = state
        .store
        .create_message(&token, chat, body, key.as_ref())
        .await?;
    let location = format!(
        "/applications/{}/chats/{chat}/messages/{}",
        token.as_str(),
        message.number
    );
    Ok(created(location, message))
}

/// Lists a chat's messages, oldest first (`order=asc`, the default, paged with `after`)
/// or newest first (`order=desc`, paged with `before`: a chat screen opens on the latest
/// page and scrolls back). Messages accepted but not yet persisted are included: a
/// message is listed as soon as its create is answered, on any API process.
#[utoipa::path(
    get, path = "/applications/{token}/chats/{chat}/messages", tag = "messages", operation_id = "listMessages",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"), ("chat" = u64, Path, description = "The chat's number", minimum = 1), NumberPage),
    responses(
        (status = 200, description = "A page of messages, in the order asked for", body = [Message],
            headers(("Link" = String, description = "`<next page>; rel=\"next\"` when more exist"))),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Path((token, chat)): Path<(String, String)>,
    QueryParams(page): QueryParams<NumberPage>,
) -> Result<Response, ApiError> {
    let token = Token::parse(&token)?;
    let chat = parse_number(&chat, "chat")?;
    let request = page.request()?;
    let messages = state.store.list_messages(&token, chat, request).await?;
    let path = format!("/applications/{}/chats/{chat}/messages", token.as_str());
    Ok(numbered_page(&path, &request, messages))
}

/// Shows one message, including one accepted but not yet persisted.
#[utoipa::path(
    get, path = "/applications/{token}/chats/{chat}/messages/{number}", tag = "messages", operation_id = "getMessage",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"), ("chat" = u64, Path, description = "The chat's number", minimum = 1), ("number" = u64, Path, description = "The message's number", minimum = 1)),
    responses(
        (status = 200, description = "The message", body = Message),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Path((token, chat, number)): Path<(String, String, String)>,
) -> Result<Json<Message>, ApiError> {
    let token = Token::parse(&token)?;
    let chat = parse_number(&chat, "chat")?;
    let number = parse_number(&number, "message")?;
    Ok(Json(state.store.message(&token, chat, number).await?))
}

/// Replaces the body of a message.
#[utoipa::path(
    patch, path = "/applications/{token}/chats/{chat}/messages/{number}", tag = "messages", operation_id = "updateMessage",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"), ("chat" = u64, Path, description = "The chat's number", minimum = 1), ("number" = u64, Path, description = "The message's number", minimum = 1)),
    request_body = UpdateMessage,
    responses(
        (status = 200, description = "The updated message", body = Message),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge), (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed), (status = 503, response = Unavailable),
    )
)]
pub async fn update(
    state: State<AppState>,
    path: Path<(String, String, String)>,
    input: JsonBody<UpdateMessage>,
) -> Result<Json<Message>, ApiError> {
    apply_update(state, path, input).await
}

/// Replaces the body of a message: `PUT` is the same as `PATCH`.
#[utoipa::path(
    put, path = "/applications/{token}/chats/{chat}/messages/{number}", tag = "messages", operation_id = "replaceMessage",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"), ("chat" = u64, Path, description = "The chat's number", minimum = 1), ("number" = u64, Path, description = "The message's number", minimum = 1)),
    request_body = UpdateMessage,
    responses(
        (status = 200, description = "The updated message", body = Message),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge), (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed), (status = 503, response = Unavailable),
    )
)]
pub async fn replace(
    state: State<AppState>,
    path: Path<(String, String, String)>,
    input: JsonBody<UpdateMessage>,
) -> Result<Json<Message>, ApiError> {
    apply_update(state, path, input).await
}

async fn apply_update(
    State(state): State<AppState>,
    Path((token, chat, number)): Path<(String, String, String)>,
    JsonBody(input): JsonBody<UpdateMessage>,
) -> Result<Json<Message>, ApiError> {
    let token = Token::parse(&token)?;
    let chat = parse_number(&chat, "chat")?;
    let number = parse_number(&number, "message")?;
    let body = Body::parse(input.body)?;
    Ok(Json(
        state
            .store
            .update_message(&token, chat, number, body)
            .await?,
    ))
}

/// Query of the search endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// Every whitespace-separated term must occur in the body, as a case-insensitive
    /// substring: both compared after Unicode NFKC case folding (`NFKC_Casefold`, ICU's
    /// `nfkc_cf`). Special characters are literal. Not empty after trimming; at most 32
    /// terms of at most 256 bytes each.
    #[param(required = true, value_type = String, min_length = 1, example = "hello wor")]
    pub q: Option<String>,
    /// Page size, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "super::extract::canonical")]
    pub limit: Option<u32>,
    /// The last `number` of the previous page.
    #[param(minimum = 0, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "super::extract::canonical")]
    pub after: Option<u64>,
}

/// Searches the messages of one chat by partial, case-insensitive match of every term.
///
/// "Case-insensitive substring" has one definition, the same in every search backend: a
/// message matches when, after Unicode NFKC case folding (`NFKC_Casefold`, which ICU
/// calls `nfkc_cf`) of its body and of the term, the folded term occurs in the folded
/// body. The folding removes differences of case, including those that change length
/// (`STRASSE` finds "Straße", `οδος` finds "ΟΔΟΣ"), of compatibility forms (`finance`
/// finds "ﬁnance", `abc` finds "ＡＢＣ"), of composition (a precomposed `é` finds a
/// decomposed one) and default-ignorable characters (soft hyphens, zero-width joiners,
/// emoji variation selectors). It is Unicode's default folding, not a language's:
/// `İ` folds to `i` with a combining dot above, so `stanbul` and `İSTANBUL` find
/// "İstanbul" but `istanbul` does not, and the dotless `ı` stays apart from `i`. A term
/// that folds to nothing (only default-ignorable characters) is left out. The stored body
/// is never altered; responses carry it as written.
///
/// A message is findable within seconds of its creation. A search that runs past its
/// time budget (`SEARCH_TIME_BUDGET`) stops with a 503 `search-timed-out`; one sent to a
/// host whose embedded index is not the one being written answers 503
/// `search-index-elsewhere` (several hosts use Elasticsearch).
#[utoipa::path(
    get, path = "/applications/{token}/chats/{chat}/messages/search", tag = "messages", operation_id = "searchMessages",
    params(("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"), ("chat" = u64, Path, description = "The chat's number", minimum = 1), SearchParams),
    responses(
        (status = 200, description = "Matching messages, ascending `number`", body = [Message],
            headers(("Link" = String, description = "`<next page>; rel=\"next\"` when more exist"))),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
pub async fn search(
    State(state): State<AppState>,
    Path((token, chat)): Path<(String, String)>,
    QueryParams(params): QueryParams<SearchParams>,
) -> Result<Response, ApiError> {
    let token = Token::parse(&token)?;
    let chat = parse_number(&chat, "chat")?;
    let terms = parse_terms(params.q.as_deref())?;
    let limit = page_limit(params.limit)?;
    state.store.existing_chat(&token, chat).await?;
    let query = SearchQuery {
        token: token.as_str().to_owned(),
        chat,
        terms,
        after: page_after(params.after)?,
        limit,
    };
    let found = state.search.search(query).await?;
    // The terms as sent (folding may put a space inside a term), joined by a space and
    // form-encoded (a space is `+`, a `+` is `%2B`).
    let sent: Vec<&str> = params
        .q
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let q = serde_urlencoded::to_string([("q", sent.join(" "))])
        .map_err(|e| ApiError::internal(format!("encoding the next link: {e}")))?;
    let path = format!(
        "/applications/{}/chats/{chat}/messages/search?{q}",
        token.as_str(),
    );
    Ok(page_of(&path, limit, found, |m| m.number))
}
