//! Extractors that turn every malformed request into the house problem format.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use utoipa::{IntoParams, ToSchema};

use crate::domain::parse_canonical;
use crate::error::ApiError;
use crate::idempotency::IdempotencyKey;
use crate::service::PageRequest;
use crate::store::queue::Direction;

/// A JSON request body: 415 without a JSON content type, 400 when it does not parse,
/// 413 over the body limit.
pub struct JsonBody<T>(pub T);

/// Like [`JsonBody`], but an empty body (zero bytes, with any content type) means
/// `T::default()`. Anything else, even whitespace alone, must be a JSON object.
pub struct OptionalJsonBody<T>(pub T);

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<(bool, Bytes), ApiError> {
    let json = is_json(req.headers());
    let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest("the request body could not be read".into())
        }
    })?;
    Ok((json, bytes))
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would also read a struct from an array of its fields; only objects are valid.
    // JSON's whitespace is space, tab, LF and CR (RFC 8259 § 2), not all ASCII whitespace.
    let json_whitespace = |b: &&u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    if bytes.iter().find(|b| !json_whitespace(b)) != Some(&b'{') {
        return Err(ApiError::BadRequest(
            "the request body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "the request body is not valid JSON for this endpoint: {e}"
        ))
    })
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let (_, bytes) = read_body(req, state).await?;
        parse_json(&bytes).map(Self)
    }
}

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (json, bytes) = read_body(req, state).await?;
        if bytes.is_empty() {
            return Ok(Self(T::default()));
        }
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse_json(&bytes).map(Self)
    }
}

/// The optional `Idempotency-Key` header of a request.
pub struct MaybeIdempotencyKey(pub Option<IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeIdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(crate::idempotency::HEADER) {
            None => Ok(Self(None)),
            Some(value) => {
                let value = value.to_str().map_err(|_| {
                    ApiError::BadRequest("Idempotency-Key must be visible ASCII".into())
                })?;
                Ok(Self(Some(IdempotencyKey::parse(value)?)))
            }
        }
    }
}

/// Query parameters, with a 400 problem for any that do not parse.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Self(q))
            .map_err(|e| {
                ApiError::BadRequest(format!("invalid query parameters: {}", e.body_text()))
            })
    }
}

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 1000;

/// Order of a chat or message list.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Oldest first (ascending `number`), paged with `after`.
    #[default]
    Asc,
    /// Newest first (descending `number`), paged with `before`.
    Desc,
}

/// `order`, `limit` and `after` or `before` of chat and message lists.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NumberPage {
    /// `asc` (default): oldest first, from `after`; `desc`: newest first, from `before`.
    #[param(inline)]
    pub order: Option<Order>,
    /// Page size, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "canonical")]
    pub limit: Option<u32>,
    /// `order=asc` only: the last `number` of the previous page (default 0: from the
    /// start).
    #[param(minimum = 0, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "canonical")]
    pub after: Option<u64>,
    /// `order=desc` only: the last `number` of the previous page (default: from the
    /// newest).
    #[param(minimum = 1, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "canonical")]
    pub before: Option<u64>,
}

impl NumberPage {
    /// The validated request: `after` goes with ascending order, `before` with
    /// descending.
    pub fn request(&self) -> Result<PageRequest, ApiError> {
        let limit = page_limit(self.limit)?;
        let (direction, cursor) = match (self.order.unwrap_or_default(), self.after, self.before) {
            (Order::Asc, after, None) => (Direction::Asc, Some(page_after(after)?)),
            (Order::Desc, None, before) => (
                Direction::Desc,
                before.map(|b| page_after(Some(b))).transpose()?,
            ),
            (Order::Asc, _, Some(_)) => {
                return Err(ApiError::BadRequest(
                    "`before` goes with `order=desc`; ascending pages use `after`".into(),
                ));
            }
            (Order::Desc, Some(_), _) => {
                return Err(ApiError::BadRequest(
                    "`after` goes with `order=asc`; descending pages use `before`".into(),
                ));
            }
        };
        Ok(PageRequest {
            direction,
            cursor,
            limit,
        })
    }
}

/// `limit` and `after` of the application list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CursorPage {
    /// Page size, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "canonical")]
    pub limit: Option<u32>,
    /// The opaque cursor from the previous page's `Link` header.
    pub after: Option<String>,
}

/// A validated page size.
pub fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, got {n}"
        ))),
    }
}

/// A validated `after` of a number list: 0 (from the start) up to the largest number
/// there can be.
pub fn page_after(after: Option<u64>) -> Result<u64, ApiError> {
    match after.unwrap_or(0) {
        n if n <= i64::MAX as u64 => Ok(n),
        n => Err(ApiError::BadRequest(format!(
            "after must be between 0 and {}, got {n}",
            i64::MAX
        ))),
    }
}

/// Deserializes a number of a query string in canonical form only (plain digits, no
/// sign, no leading zeros): `limit=%2B5` or `after=007` are a 400, not 5 and 7.
pub fn canonical<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
    parse_canonical(&text)
        .and_then(|n| T::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{}` is not a number in plain digits (no sign, no leading zeros) within range",
                text.chars().take(32).collect::<String>()
            ))
        })
}

/// Deserializes a field that may be absent (`None`), null (`Some(None)`) or set.
pub fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_content_types_are_recognised() {
        let mut headers = HeaderMap::new();
        assert!(!is_json(&headers));
        for (value, expected) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/merge-patch+json", true),
            ("text/plain", false),
            ("application/jsonx", false),
        ] {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_json(&headers), expected, "{value}");
        }
    }

    #[test]
    fn query_numbers_are_canonical() {
        let parse =
            |q: &str| serde_urlencoded::from_str::<NumberPage>(q).map(|p| (p.limit, p.after));
        assert_eq!(parse("limit=5&after=0").unwrap(), (Some(5), Some(0)));
        assert_eq!(parse("").unwrap(), (None, None));
        for bad in [
            "limit=%2B5",
            "limit=05",
            "after=-1",
            "after=007",
            "limit=",
            "limit=5000000000",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_are_bounded() {
        assert_eq!(page_limit(None).unwrap(), 50);
        assert_eq!(page_limit(Some(1000)).unwrap(), 1000);
        assert!(page_limit(Some(0)).is_err());
        assert!(page_limit(Some(1001)).is_err());
    }
}
