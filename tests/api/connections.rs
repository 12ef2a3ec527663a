//! Connection hygiene over real sockets: the header-read and keep-alive timeouts, the
//! connection limit, graceful shutdown, and service with thousands of idle connections.

use std::time::{Duration, Instant};

use chat_system::config::ApiConfig;
use chat_system::startup::ApiServer;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::helpers::{Options, TestApp, eventually};

const GET_HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";

/// One response read off a raw connection.
struct RawResponse {
    status: u16,
    head: String,
}

/// Reads one response (head and `Content-Length` body) off `stream`.
async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.expect("read a response");
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head[9..12].parse().expect("a status code");
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.expect("read a body");
        assert!(n > 0, "connection closed in a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    RawResponse { status, head }
}

/// Sends `request` and reads its response, failing after 5 s.
async fn exchange(stream: &mut TcpStream, request: &str) -> RawResponse {
    stream.write_all(request.as_bytes()).await.expect("write");
    tokio::time::timeout(Duration::from_secs(5), read_response(stream))
        .await
        .expect("a response within 5 s")
}

/// Waits for the server to close `stream` (end of file or reset), failing after `limit`;
/// returns how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut chunk = [0u8; 1024];
    let wait = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .unwrap_or_else(|_| panic!("the server left the connection open for {limit:?}"));
    start.elapsed()
}

/// Whether `stream` gets any byte within `wait`.
async fn answered_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, stream.peek(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// The `http_connections_open` gauge from `/metrics` (process-wide: tests running
/// beside this one add their own connections).
async fn open_connections_gauge(app: &TestApp) -> f64 {
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("http_connections_open "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_connection_that_sends_part_of_a_request_head_is_closed_after_the_header_timeout() {
    let app = TestApp::with(Options {
        header_read_timeout: Some(Duration::from_millis(300)),
        keep_alive_timeout: Some(Duration::from_secs(30)),
        ..Options::default()
    })
    .await;

    // A whole request sent at once is served.
    let mut whole = TcpStream::connect(app.addr).await.unwrap();
    assert_eq!(exchange(&mut whole, GET_HEALTHZ).await.status, 200);

    // Half a head: closed without an answer once the timeout has run out.
    let mut partial = TcpStream::connect(app.addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let took = closed_within(&mut partial, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(200), "closed after {took:?}");

    // A connection that sends nothing at all gets the same time.
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(200), "closed after {took:?}");

    // A later request on a keep-alive connection that stops halfway: the same.
    assert_eq!(exchange(&mut whole, GET_HEALTHZ).await.status, 200);
    whole.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let took = closed_within(&mut whole, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(200), "closed after {took:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() {
    // A keep-alive timeout longer than the header timeout: idling between requests is
    // not sending a head slowly.
    let app = TestApp::with(Options {
        header_read_timeout: Some(Duration::from_millis(300)),
        keep_alive_timeout: Some(Duration::from_millis(1500)),
        ..Options::default()
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    assert_eq!(exchange(&mut stream, GET_HEALTHZ).await.status, 200);

    // Idle for longer than the header timeout, then a request: still served, on the
    // same connection. Requests keep it open past the keep-alive timeout in all.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let reply = exchange(&mut stream, GET_HEALTHZ).await;
        assert_eq!(reply.status, 200);
        assert!(
            !reply
                .head
                .to_ascii_lowercase()
                .contains("connection: close")
        );
    }

    // Then left idle: closed once the keep-alive timeout has run out.
    let took = closed_within(&mut stream, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(1200), "closed after {took:?}");
}

#[tokio::test]
async fn at_most_max_connections_are_open_and_the_next_client_waits_for_a_free_one() {
    const MAX: u32 = 20;
    let app = TestApp::with(Options {
        max_connections: Some(MAX),
        header_read_timeout: Some(Duration::from_secs(30)),
        keep_alive_timeout: Some(Duration::from_secs(60)),
        ..Options::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..MAX {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        assert_eq!(exchange(&mut stream, GET_HEALTHZ).await.status, 200);
        held.push(stream); // idle, kept alive
    }

    // One more: the kernel completes the handshake, but the server does not take the
    // connection while the limit is reached.
    let mut extra = TcpStream::connect(app.addr).await.unwrap();
    extra.write_all(GET_HEALTHZ.as_bytes()).await.unwrap();
    assert!(
        !answered_within(&mut extra, Duration::from_millis(700)).await,
        "a connection beyond MAX_CONNECTIONS was served"
    );

    // One held connection closes: the waiting one is taken and answered.
    drop(held.pop());
    let reply = tokio::time::timeout(Duration::from_secs(5), read_response(&mut extra))
        .await
        .expect("the waiting client is served once a connection closes");
    assert_eq!(reply.status, 200);

    // All closed: an ordinary client is served as usual.
    drop(held);
    drop(extra);
    let reply = app.get("/healthz").await;
    assert_eq!(reply.status, 200);
    let token = app.application("after the limit").await;
    assert!(!token.is_empty());
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_closes_idle_connections_and_stops_accepting() {
    let app = TestApp::spawn().await;
    let config = ApiConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        body_limit: 256 * 1024,
        request_timeout: Duration::from_secs(10),
        header_read_timeout: Duration::from_secs(10),
        keep_alive_timeout: Duration::from_secs(75),
        max_connections: 100,
        events_max_subscribers: 10,
        read_cache_size: 0,
        admin_api_key: None,
    };
    let server = ApiServer::build(app.store.clone(), app.search.clone(), &config)
        .await
        .expect("build");
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(exchange(&mut idle, GET_HEALTHZ).await.status, 200);
    // A create whose body is still on its way when the shutdown comes.
    let body = json!({ "name": "in flight" }).to_string();
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /applications HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    busy.write_all(head.as_bytes()).await.unwrap();
    busy.write_all(&body.as_bytes()[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // the head is dispatched

    stop.send(()).unwrap();
    closed_within(&mut idle, Duration::from_secs(5)).await;
    // The listener is closed: new clients are refused.
    eventually(Duration::from_secs(5), "the listener is closed", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(!running.is_finished(), "stopped with a request in flight");

    busy.write_all(&body.as_bytes()[5..]).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), read_response(&mut busy))
        .await
        .expect("the request in flight is answered");
    assert_eq!(reply.status, 201);
    closed_within(&mut busy, Duration::from_secs(5)).await;
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the server stops once its connections are closed")
        .expect("the server task")
        .expect("the server");
}

/// Raises this process's soft limit on open files to the hard limit; returns it.
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one `rlimit` on the stack.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// Resident memory of this process, from `/proc/self/status` (Linux), in KiB.
fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_5000_idle_and_slow_connections_open_a_client_is_still_served_within_a_second() {
    // Both ends of every connection are in this process: two descriptors each, plus
    // room for the rest of the test binary.
    let wanted = 5000u64;
    let available = raise_open_files_limit().saturating_sub(1000) / 2;
    let count = wanted.min(available);
    if count < wanted {
        eprintln!("open-files hard limit too low: {count} connections instead of {wanted}");
    }
    let app = TestApp::with(Options {
        // Long enough that no held connection is closed during the test.
        header_read_timeout: Some(Duration::from_secs(60)),
        ..Options::default()
    })
    .await;
    let before = resident_kib();

    let mut held = Vec::new();
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let addr = app.addr;
        tasks.spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            if i % 2 == 1 {
                // Slow: a head that never ends.
                stream
                    .write_all(b"POST /applications HTTP/1.1\r\nHost: test\r\n")
                    .await
                    .expect("write");
            }
            stream
        });
        // A few hundred connection attempts at a time: the listen backlog is finite.
        if tasks.len() >= 250 {
            while let Some(stream) = tasks.join_next().await {
                held.push(stream.expect("connect task"));
            }
        }
    }
    while let Some(stream) = tasks.join_next().await {
        held.push(stream.expect("connect task"));
    }
    eventually(
        Duration::from_secs(20),
        "every connection accepted",
        || async { open_connections_gauge(&app).await >= count as f64 },
    )
    .await;
    let after = resident_kib();

    // A new client, with a connection of its own.
    let client = reqwest::Client::new();
    let start = Instant::now();
    let health = client.get(app.url("/healthz")).send().await.unwrap();
    let health_took = start.elapsed();
    assert_eq!(health.status(), 200);
    let start = Instant::now();
    let created = client
        .post(app.url("/applications"))
        .json(&json!({ "name": "x" }))
        .send()
        .await
        .unwrap();
    let create_took = start.elapsed();
    assert_eq!(created.status(), 201);
    if let (Some(before), Some(after)) = (before, after) {
        eprintln!(
            "{count} connections: resident memory {before} KiB -> {after} KiB \
             ({:.1} KiB per connection, both ends); /healthz {health_took:?}, create {create_took:?}",
            after.saturating_sub(before) as f64 / count as f64
        );
    }
    assert!(health_took < Duration::from_secs(1), "{health_took:?}");
    assert!(create_took < Duration::from_secs(1), "{create_took:?}");
    drop(held);
}
