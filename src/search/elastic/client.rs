//! The HTTP side of the Elasticsearch backend: TLS, authentication, timeouts, and the
//! reading of ES's answers into what the adapter acts on.
//!
//! * TLS is rustls (its aws-lc-rs provider). With `ELASTICSEARCH_CA_CERT`, only that
//!   bundle is trusted (ES 8 signs its HTTP certificate with a CA of its own); without
//!   it, the system's CA store is.
//! * Authentication: `Authorization: ApiKey <key>` (`ELASTICSEARCH_API_KEY`), or Basic
//!   from the user and password of `ELASTICSEARCH_URL`. Credentials are taken out of the
//!   URL once, so no error message or log line carries them, and both headers are
//!   marked sensitive.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::config::{ElasticConfig, SecretUrl};

/// Most characters of an ES answer kept in an error (for the log).
const REASON_MAX: usize = 500;

/// What the adapter needs to reach a cluster.
#[derive(Clone, Debug)]
pub struct Connection {
    pub url: SecretUrl,
    pub config: ElasticConfig,
}

/// A configuration Elasticsearch cannot be reached with; fatal at start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// No answer: connection refused, TLS handshake failed, timeout.
    Transport(String),
    /// Elasticsearch answered with an error status.
    Status(StatusCode, String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "{e}"),
            Self::Status(status, reason) => write!(f, "{status}: {reason}"),
        }
    }
}

impl CallError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status(status, _) => Some(*status),
            Self::Transport(_) => None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub fn new(connection: &Connection) -> Result<Self, ConfigError> {
        let mut url = reqwest::Url::parse(connection.url.expose())
            .map_err(|e| ConfigError(format!("ELASTICSEARCH_URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError(
                "ELASTICSEARCH_URL: use an http:// or https:// URL".into(),
            ));
        }
        let basic = (!url.username().is_empty()).then(|| {
            let user = percent_decode(url.username());
            let password = url.password().map(percent_decode).unwrap_or_default();
            (user, password)
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);

        let config = &connection.config;
        let authorization = match (config.api_key(), basic) {
            (Some(_), Some(_)) => {
                return Err(ConfigError(
                    "ELASTICSEARCH_URL carries a user and password and an API key is set \
                     (ELASTICSEARCH_API_KEY or ELASTICSEARCH_API_KEY_FILE): use one"
                        .into(),
                ));
            }
            (Some(key), None) => Some(format!("ApiKey {}", key.expose())),
            (None, Some((user, password))) => {
                use base64::Engine;
                let pair = format!("{user}:{password}");
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
            }
            (None, None) => None,
        };
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                ConfigError("ELASTICSEARCH_API_KEY: not a valid header value".into())
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(config.elasticsearch_timeout)
            .connect_timeout(config.elasticsearch_connect_timeout)
            .pool_idle_timeout(Duration::from_secs(50));
        if let Some(bundle) = &config.elasticsearch_ca_cert {
            let certs = reqwest::Certificate::from_pem_bundle(&bundle.pem)
                .map_err(|e| ConfigError(format!("ELASTICSEARCH_CA_CERT: {e}")))?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ConfigError(format!("Elasticsearch client: {e}")))?;
        Ok(Self {
            http,
            base: url.as_str().trim_end_matches('/').to_owned(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    /// Sends a request; an answer outside 2xx is an error carrying ES's reason.
    pub async fn call(&self, method: Method, path: &str, body: Body) -> Result<Answer, CallError> {
        let mut request = self.http.request(method, self.url(path));
        request = match body {
            Body::None => request,
            Body::Json(value) => request.json(&value),
            Body::Ndjson(text) => request
                .header("content-type", "application/x-ndjson")
                .body(text),
        };
        let response = request
            .send()
            .await
            .map_err(|e| CallError::Transport(transport_reason(&e)))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| CallError::Transport(transport_reason(&e)))?;
        if !status.is_success() {
            return Err(CallError::Status(status, error_reason(&text)));
        }
        Ok(Answer { status, text })
    }

    /// The JSON of a 2xx answer.
    pub async fn json(&self, method: Method, path: &str, body: Body) -> Result<Value, CallError> {
        let answer = self.call(method, path, body).await?;
        answer.json()
    }
}

pub enum Body {
    None,
    Json(Value),
    Ndjson(String),
}

pub struct Answer {
    pub status: StatusCode,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Result<Value, CallError> {
        serde_json::from_str(&self.text).map_err(|e| {
            CallError::Status(
                self.status,
                format!("unreadable answer ({e}): {}", truncate(&self.text)),
            )
        })
    }
}

/// The cause of a transport error, with its sources (reqwest's own message is only
/// "error sending request").
fn transport_reason(e: &reqwest::Error) -> String {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}

/// ES's `{"error": {"type", "reason"}, "status"}` as `type: reason`, else the text.
pub fn error_reason(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(value) if value.get("error").is_some() => describe_error(&value["error"]),
        _ => truncate(text),
    }
}

/// An ES error object (`{"type", "reason", ...}`, or a bare string) as `type: reason`.
pub fn describe_error(error: &Value) -> String {
    match (error["type"].as_str(), error["reason"].as_str()) {
        (Some(kind), Some(reason)) => truncate(&format!("{kind}: {reason}")),
        (Some(kind), None) => kind.to_owned(),
        _ => match error.as_str() {
            Some(text) => truncate(text),
            None => truncate(&error.to_string()),
        },
    }
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(REASON_MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn es_errors_read_as_type_and_reason() {
        let text = r#"{"error":{"root_cause":[],"type":"security_exception","reason":"missing authentication credentials"},"status":401}"#;
        assert_eq!(
            error_reason(text),
            "security_exception: missing authentication credentials"
        );
        assert_eq!(
            error_reason("<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
        assert_eq!(truncate(&"x".repeat(600)).chars().count(), REASON_MAX + 1);
    }

    #[test]
    fn url_credentials_are_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aword"), "p@ss:word");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn an_api_key_and_url_credentials_together_are_refused() {
        let connection = Connection {
            url: "https://app:secret@es:9200".parse().unwrap(),
            config: ElasticConfig {
                elasticsearch_api_key: Some("a2V5".parse().unwrap()),
                ..ElasticConfig::default()
            },
        };
        let err = Client::new(&connection).err().unwrap().to_string();
        assert!(err.contains("ELASTICSEARCH_API_KEY"), "{err}");
        assert!(!err.contains("secret"));
        let bad = Connection {
            url: "ftp://es:9200".parse().unwrap(),
            config: ElasticConfig::default(),
        };
        assert!(Client::new(&bad).is_err());
    }
}
