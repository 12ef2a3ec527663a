//! The Elasticsearch adapter over HTTPS, against a local TLS server whose certificate is
//! signed by a CA made in the test, as ES 8 signs its HTTP certificate with a CA of its
//! own (<https://www.elastic.co/guide/en/elasticsearch/reference/8.15/configuring-stack-security.html>).
//! The server answers the calls of a readiness check in ES's documented format.

use std::net::SocketAddr;
use std::sync::Arc;

use chat_system::config::{CaBundle, ElasticConfig};
use chat_system::search::SearchError;
use chat_system::search::elastic::ElasticIndex;
use chat_system::search::elastic::client::Connection;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA, as PEM, and a server certificate for `localhost` and 127.0.0.1 signed by it.
struct Pki {
    ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(
        DnType::CommonName,
        "Elasticsearch security auto-configuration HTTP CA",
    );
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_cert: server_cert.der().clone(),
        server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    }
}

/// ES's answer to the calls made at start and by the readiness check.
async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = match request.uri().path() {
        "/_alias/messages" => {
            json!({"messages-v1": {"aliases": {"messages": {"is_write_index": true}}}})
        }
        "/messages/_mapping" => json!({"messages-v1": {"mappings": {
            "_meta": {"chat_system": {"mapping": 2, "state": "complete"}}
        }}}),
        "/messages/_search" => json!({
            "took": 1, "timed_out": false,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {"max_score": null, "hits": []}
        }),
        _ => json!({"error": {"type": "unexpected"}, "status": 400}),
    };
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap())
}

/// An HTTPS server on a free port; returns its address.
async fn https_server(pki: &Pki) -> SocketAddr {
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![pki.server_cert.clone()], pki.server_key.clone_key())
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: not an error here.
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service_fn(answer))
                        .await;
                }
            });
        }
    });
    addr
}

fn ca_file(pem: &str) -> CaBundle {
    CaBundle {
        path: "test-ca.crt".into(),
        pem: pem.as_bytes().to_vec(),
    }
}

async fn ping(addr: SocketAddr, ca: Option<CaBundle>) -> Result<(), SearchError> {
    let connection = Connection {
        url: format!("https://localhost:{}", addr.port())
            .parse()
            .unwrap(),
        config: ElasticConfig {
            elasticsearch_ca_cert: ca,
            ..ElasticConfig::default()
        },
    };
    let es = ElasticIndex::connect(&connection, "messages").await?;
    es.ping().await
}

#[tokio::test]
async fn https_with_a_self_signed_ca_works_with_elasticsearch_ca_cert_and_only_with_it() {
    let pki = pki();
    let addr = https_server(&pki).await;

    ping(addr, Some(ca_file(&pki.ca_pem)))
        .await
        .expect("trusted through ELASTICSEARCH_CA_CERT");

    // Not in the system's store: refused.
    let err = ping(addr, None).await.unwrap_err();
    assert!(
        matches!(&err, SearchError::Unavailable(e) if e.to_lowercase().contains("certificate")),
        "{err}"
    );

    // Another CA: refused.
    let other = pki_other_ca();
    let err = ping(addr, Some(ca_file(&other))).await.unwrap_err();
    assert!(matches!(err, SearchError::Unavailable(_)), "{err}");
}

fn pki_other_ca() -> String {
    pki().ca_pem
}
