//! `/applications/{token}/chats/{chat}/messages/events`: a chat's messages as they are
//! accepted, as Server-Sent Events (see [`crate::events`] for the fan-out and resuming).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::openapi::{BadRequest, NotFound, Unavailable};
use crate::domain::{Token, parse_number};
use crate::error::ApiError;
use crate::events::Subscription;
use crate::store::queue::{QueuedMessage, version_of};

/// A comment line this often keeps proxies and load balancers from closing an idle
/// stream (most close after 60 s of silence).
const HEARTBEAT: Duration = Duration::from_secs(15);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}

/// Streams the chat's new and edited messages as Server-Sent Events, in the order the
/// writes were accepted, from any API process: `message.created` and `message.updated`,
/// each with the message as `data` and its version as `id`. A client that reconnects
/// with `Last-Event-ID` first receives each message changed since that event, in its
/// current state, then the live ones: nothing is lost or repeated. A comment line
/// every 15 s keeps the connection open through proxies. A client that cannot keep up
/// is disconnected and resumes by id.
#[utoipa::path(
    get, path = "/applications/{token}/chats/{chat}/messages/events", tag = "messages", operation_id = "streamMessageEvents",
    params(
        ("token" = String, Path, description = "The application's token", example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx"),
        ("chat" = u64, Path, description = "The chat's number", minimum = 1),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received, to resume after it"),
    ),
    responses(
        (status = 200, description = "A `text/event-stream` of `message.created` and `message.updated` events; \
            `data` is the message (the Message schema), `id` its version", content_type = "text/event-stream", body = String),
        (status = 400, response = BadRequest), (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    Path((token, chat)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let token = Token::parse(&token)?;
    let chat = parse_number(&chat, "chat")?;
    let resume = match headers.get("last-event-id") {
        None => None,
        Some(value) => {
            let id = value
                .to_str()
                .ok()
                .filter(|id| version_of(id).is_some())
                .ok_or_else(|| {
                    ApiError::BadRequest("Last-Event-ID must be an event id this API sent".into())
                })?;
            Some(id.to_owned())
        }
    };
    let app_id = state.store.existing_chat(&token, chat).await?;
    // Subscribed first, caught up after: a write accepted in between is in both, and the
    // stream sends it once.
    let subscription = state.events.subscribe(token.as_str(), chat).await?;
    let (missed, complete) = match &resume {
        Some(after) => {
            state
                .store
                .messages_changed_since(&token, chat, app_id, after)
                .await?
        }
        None => (Vec::new(), true),
    };
    let last = resume.as_deref().and_then(version_of).unwrap_or(0);
    // More was missed than one resume sends: this stream ends after its part, and the
    // client (an EventSource does so by itself) resumes from its last id for the next.
    let subscription = complete.then_some(subscription);
    let stream = event_stream(missed, subscription, last);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT))
        .into_response();
    // nginx (and proxies that honour it) pass the stream through unbuffered.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The missed messages, then the live ones (none after a partial catch-up), each sent
/// once with an id above the last.
fn event_stream(
    missed: Vec<QueuedMessage>,
    subscription: Option<Subscription>,
    last: u64,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let state = (missed.into_iter(), subscription, last);
    stream::unfold(
        state,
        |(mut missed, mut subscription, mut last)| async move {
            loop {
                let write = match missed.next() {
                    Some(write) => std::sync::Arc::new(write),
                    None => subscription.as_mut()?.rx.recv().await?,
                };
                let Some(version) = version_of(&write.entry_id).filter(|v| *v > last) else {
                    continue;
                };
                last = version;
                let kind = if write.created {
                    "message.created"
                } else {
                    "message.updated"
                };
                let event = Event::default()
                    .id(&write.entry_id)
                    .event(kind)
                    .json_data(&write.message)
                    .unwrap_or_else(|_| Event::default().comment("unserializable message"));
                return Some((Ok(event), (missed, subscription, last)));
            }
        },
    )
}
