//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{applications, chats, messages, ops};
use crate::error::{FieldError, Problem};
use crate::resources::{Application, Chat, Message};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "chat-system",
        description = "Applications, chats and messages, numbered per parent and searchable. \
            Every error the API answers is an RFC 9457 `application/problem+json` document \
            (a request the HTTP/1 parser cannot read gets a bare 400, 414 or 431). Creates \
            and updates answer 503 with `Retry-After` while the write backlog is over its \
            bound; reads keep working.",
    ),
    paths(
        applications::create, applications::list, applications::show, applications::update,
        chats::create, chats::list, chats::show, chats::update,
        messages::create, messages::list, messages::show, messages::update, messages::search,
        ops::healthz, ops::readyz, ops::metrics_text, ops::openapi_json,
    ),
    components(schemas(
        Application, Chat, Message, Problem, FieldError,
        applications::ApplicationInput, chats::ChatInput, messages::MessageInput,
    )),
    modifiers(&AdminKey),
    tags(
        (name = "applications", description = "Register client applications"),
        (name = "chats", description = "Chats of an application, numbered 1, 2, 3, ..."),
        (name = "messages", description = "Messages of a chat, numbered 1, 2, 3, ..."),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

struct AdminKey;

impl Modify for AdminKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "admin_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}
