//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ObjectBuilder, RefOr, Type};
use utoipa::{Modify, OpenApi};

use super::{applications, chats, messages};
use crate::error::{FieldError, Problem};
use crate::resources::{Application, Chat, Message};

pub use documented::*;

/// Types that exist only to describe the API in the document: shared parameters and the
/// error responses (each defined once, referenced by every operation that can answer it;
/// every body is an RFC 9457 problem document). None is ever constructed.
#[allow(dead_code)]
mod documented {
    use utoipa::{IntoParams, ToResponse};

    use crate::error::Problem;

    /// The header of the create endpoints.
    #[derive(IntoParams)]
    #[into_params(parameter_in = Header)]
    pub struct IdempotencyKeyHeader {
        /// 16 to 255 visible ASCII characters (send a UUID). Retries with the same key and
        /// body within 24 h get the original 201 and create nothing; the same key with
        /// another body is a 422. Scoped to the parent (for chats the application, for
        /// messages the chat).
        #[param(
            rename = "Idempotency-Key",
            min_length = 16,
            max_length = 255,
            example = "3f2b8c1e-9d4a-4f6b-8e2a-7c5d1b9e0a42"
        )]
        pub idempotency_key: Option<String>,
    }

    /// Malformed JSON, wrong JSON types, or a query parameter, path number or header that is
    /// not valid (numbers are plain digits without sign or leading zeros).
    #[derive(ToResponse)]
    #[response(content_type = "application/problem+json")]
    pub struct BadRequest(Problem);

    /// `Authorization: Bearer <ADMIN_API_KEY>` is missing or wrong.
    #[derive(ToResponse)]
    #[response(content_type = "application/problem+json")]
    pub struct Unauthorized(Problem);

    /// Listing applications is disabled: the server has no `ADMIN_API_KEY`.
    #[derive(ToResponse)]
    #[response(content_type = "application/problem+json")]
    pub struct ListingDisabled(Problem);

    /// The application, chat or message does not exist.
    #[derive(ToResponse)]
    #[response(content_type = "application/problem+json")]
    pub struct NotFound(Problem);

    /// A request with this `Idempotency-Key` is still in progress; retry later.
    #[derive(ToResponse)]
    #[response(content_type = "application/problem+json")]
    pub struct InProgress(Problem);

    /// The request body is over the configured limit (`BODY_LIMIT`).
    #[derive(ToResponse)]
    #[response(content_type = "application/problem+json")]
    pub struct PayloadTooLarge(Problem);

    /// The request body is not sent as `application/json`.
    #[derive(ToResponse)]
    #[response(content_type = "application/problem+json")]
    pub struct UnsupportedMediaType(Problem);

    /// A field fails validation (see `errors`), or the `Idempotency-Key` was used with
    /// another body.
    #[derive(ToResponse)]
    #[response(content_type = "application/problem+json")]
    pub struct ValidationFailed(Problem);

    /// A dependency is down or did not answer in time, or (for creates and updates) the
    /// write backlog is over its bound: the `type` says which. Nothing was half-written;
    /// retry after `Retry-After` seconds.
    #[derive(ToResponse)]
    #[response(
        content_type = "application/problem+json",
        headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))
    )]
    pub struct Unavailable(Problem);
}

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
    components(
        schemas(
            Application, Chat, Message, Problem, FieldError,
            applications::CreateApplication, applications::UpdateApplication,
            chats::CreateChat, chats::UpdateChat,
            messages::CreateMessage, messages::UpdateMessage,
        ),
        responses(
            BadRequest, Unauthorized, ListingDisabled, NotFound, InProgress, PayloadTooLarge,
            UnsupportedMediaType, ValidationFailed, Unavailable,
        ),
    ),
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

/// Completes the document once every route's operation is in it: every response carries
/// `X-Request-Id` (the client's, when it is 1 to 128 of `[A-Za-z0-9._-]`, else one the
/// server made); the document names no license; a chat's create takes no body at all too.
pub fn finish(openapi: &mut utoipa::openapi::OpenApi) {
    let header = || {
        HeaderBuilder::new()
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(128)),
            ))
            .description(Some(
                "The request's id, for logs and support: the client's own `X-Request-Id` \
                 when it is 1 to 128 of `[A-Za-z0-9._-]`, else one the server made",
            ))
            .build()
    };
    let operations = openapi.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
    });
    for operation in operations {
        for response in operation.responses.responses.values_mut() {
            if let RefOr::T(response) = response {
                response
                    .headers
                    .insert("X-Request-Id".into(), RefOr::T(header()));
            }
        }
    }
    if let Some(components) = openapi.components.as_mut() {
        for response in components.responses.values_mut() {
            if let RefOr::T(response) = response {
                response
                    .headers
                    .insert("X-Request-Id".into(), RefOr::T(header()));
            }
        }
    }
    // No license is published with this document.
    openapi.info.license = None;
    // The one optional request body: a chat may be created with none at all.
    let create_chat = openapi
        .paths
        .paths
        .get_mut("/applications/{token}/chats")
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.request_body.as_mut());
    if let Some(RefOr::T(body)) = create_chat {
        body.required = Some(utoipa::openapi::Required::False);
    }
}

#[cfg(test)]
mod tests {

    const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

    /// The served document is the checked-in one, so that every change to the API shows
    /// in review as a diff of `docs/openapi.json`. `UPDATE_OPENAPI=1 cargo test` rewrites it.
    #[test]
    fn the_document_is_the_checked_in_one() {
        let served = serde_json::to_string_pretty(&crate::http::openapi()).unwrap() + "\n";
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(CHECKED_IN, &served).unwrap();
        }
        let checked_in = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
        assert!(
            served == checked_in,
            "the OpenAPI document differs from docs/openapi.json; review the change, then \
             run `UPDATE_OPENAPI=1 cargo test --lib` to record it"
        );
    }

    #[test]
    fn operation_ids_are_unique_and_every_response_is_described() {
        let doc = serde_json::to_value(crate::http::openapi()).unwrap();
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let id = operation["operationId"].as_str().unwrap_or_default();
                assert!(ids.insert(id.to_owned()), "{method} {path}: `{id}` again");
                for (status, response) in operation["responses"].as_object().unwrap() {
                    let described = response.get("$ref").is_some()
                        || response["description"]
                            .as_str()
                            .is_some_and(|d| !d.is_empty());
                    assert!(described, "{method} {path} {status} has no description");
                }
            }
        }
    }
}
