//! The HTTP accept loop: hyper HTTP/1 connections with a router as the service, under
//! limits that `axum::serve` does not have.
//!
//! * At most [`Limits::max_connections`] client connections are open at once. At the
//!   bound the loop stops accepting: new clients wait in the kernel's listen backlog (and
//!   beyond it their connection attempts are retried by TCP) until a connection closes.
//!   Accepting and closing at once would turn a brief overload into errors that clients
//!   retry at once, and would itself need a file descriptor the process may not have.
//! * A client must send a whole request head within [`Limits::header_read_timeout`] of
//!   connecting, or of the first byte of a later request on the connection.
//! * A keep-alive connection with no request in flight and no new one started is
//!   closed after [`Limits::keep_alive_timeout`] (that idle period starts when the
//!   previous response has been handed to the connection).
//! * No timer of ours runs while a request is in flight: `REQUEST_TIMEOUT` bounds that.
//!
//! hyper's own `header_read_timeout` is turned off: in hyper 1.12 its timer starts as
//! soon as a connection goes idle, so it would also close every keep-alive connection
//! after the header timeout, whatever the keep-alive timeout. A per-connection watchdog
//! ([`Watchdog`]) keeps the two apart, the way Go's `ReadHeaderTimeout` and
//! `IdleTimeout` do.
//!
//! On shutdown the loop stops accepting (the listener is closed), asks every connection
//! to finish its request in flight and close, and waits for them up to
//! [`Limits::drain_timeout`]; connections still open then are closed.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body as AxumBody;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// The gauge of open client connections.
pub const CONNECTIONS_GAUGE: &str = "http_connections_open";

/// Pause after an accept error that is not about one connection (out of file
/// descriptors, socket buffers or memory): retrying at once would spin on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one warning per this period for each kind of trouble in the accept loop, so
/// that a flood of failing accepts cannot flood the log too.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// The limits of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub max_connections: usize,
    /// Longest wait, after the shutdown signal, for requests in flight to finish.
    pub drain_timeout: Duration,
}

/// What open connections are told by the accept loop once it stops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// Finish the request in flight, then close.
    Drain,
    /// Close now: the drain timeout has passed.
    Abort,
}

/// Serves `router` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let (stop, stopping) = watch::channel(Stop::Running);
    let mut limit_warning = Throttle::default();
    let mut error_warning = Throttle::default();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = take_slot(&slots, &mut limit_warning) => permit,
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => spawn_connection(stream, router.clone(), limits, permit, &stopping),
            Err(e) => accept_failed(&e, &mut error_warning).await,
        }
    }
    // Closing the listener refuses new clients, including those still in the backlog.
    drop(listener);
    drain(&slots, &stop, limits).await;
}

/// A connection slot: at once when one is free, otherwise after a warning, when one is.
async fn take_slot(slots: &Arc<Semaphore>, warning: &mut Throttle) -> OwnedSemaphorePermit {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return permit;
    }
    if let Some(suppressed) = warning.allow() {
        tracing::warn!(
            suppressed,
            "connection limit reached (MAX_CONNECTIONS); new clients wait until a connection closes"
        );
    }
    match slots.clone().acquire_owned().await {
        Ok(permit) => permit,
        // The semaphore is never closed; should it be, accepting stops for good rather
        // than overrunning the limit.
        Err(_) => std::future::pending().await,
    }
}

/// Logs an accept error (at most once per [`WARN_EVERY`]) and pauses when it is not
/// about the one connection, so that the loop neither spins nor exits.
async fn accept_failed(error: &io::Error, warning: &mut Throttle) {
    if let Some(suppressed) = warning.allow() {
        tracing::warn!(error = %error, suppressed, "accepting a connection failed");
    }
    if !is_connection_error(error) {
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

/// Errors about the one connection being accepted (it was reset or aborted before the
/// accept): the next accept may well succeed at once.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Tells connections to finish, waits for them up to the drain timeout, then closes
/// the rest.
async fn drain(slots: &Semaphore, stop: &watch::Sender<Stop>, limits: Limits) {
    let _ = stop.send(Stop::Drain);
    let all =
        u32::try_from(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain_timeout, slots.acquire_many(all))
        .await
        .is_err()
    {
        let open = limits
            .max_connections
            .saturating_sub(slots.available_permits());
        tracing::warn!(
            open,
            "connections still open after the drain timeout; closing them"
        );
        let _ = stop.send(Stop::Abort);
    }
}

/// Rate limit of one kind of warning; counts what it held back.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(number held back since the last one)` when a warning may be logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + WARN_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// An open client connection: holds its slot, and counts in the gauge while it lives.
struct Open {
    _slot: OwnedSemaphorePermit,
}

impl Open {
    fn new(slot: OwnedSemaphorePermit) -> Self {
        metrics::gauge!(CONNECTIONS_GAUGE).increment(1.0);
        Self { _slot: slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_GAUGE).decrement(1.0);
    }
}

type Connection = http1::Connection<TokioIo<WatchedIo>, Tracked>;

fn spawn_connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    slot: OwnedSemaphorePermit,
    stopping: &watch::Receiver<Stop>,
) {
    let open = Open::new(slot);
    // As axum::serve does: responses are written whole, so Nagle only adds delay.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(WatchedIo {
        stream,
        activity: activity.clone(),
    });
    let service = Tracked {
        router,
        activity: activity.clone(),
    };
    let connection = http1::Builder::new()
        // See the module documentation: the watchdog times the request head instead.
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(io, service);
    let watchdog = Watchdog::new(connection, activity, limits);
    let stopping = stopping.clone();
    tokio::spawn(async move {
        let _open = open;
        run_connection(watchdog, stopping).await;
    });
}

/// Runs one connection to its end, its deadline, or the end of the drain.
async fn run_connection(watchdog: Watchdog, mut stopping: watch::Receiver<Stop>) {
    tokio::pin!(watchdog);
    loop {
        tokio::select! {
            outcome = watchdog.as_mut() => {
                match outcome {
                    Outcome::Closed(Ok(())) => {}
                    Outcome::Closed(Err(e)) => tracing::debug!(error = %e, "connection error"),
                    Outcome::Expired(phase) => tracing::debug!(phase, "connection timed out"),
                }
                return;
            }
            changed = stopping.changed() => match changed.map(|()| *stopping.borrow_and_update()) {
                Ok(Stop::Running) => {}
                // hyper closes an idle connection at once, a busy one after its response.
                Ok(Stop::Drain) => watchdog.as_mut().graceful_shutdown(),
                // The accept loop gave up waiting, or is gone altogether.
                Ok(Stop::Abort) | Err(_) => return,
            },
        }
    }
}

/// Where a connection stands, for its timeouts.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Waiting for the rest of a request head, since the given instant.
    Head(Instant),
    /// Idle between requests since the given instant.
    Idle(Instant),
    /// This many requests whose response has not been handed over yet.
    Busy(usize),
}

/// A connection's phase, moved on by the socket (bytes read), the service (a request
/// dispatched) and the response body (dropped once hyper is done with it).
struct Activity {
    phase: Mutex<Phase>,
}

impl Activity {
    /// A new connection: its first request head is due within the header timeout.
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Head(Instant::now())),
        }
    }

    fn update(&self, f: impl FnOnce(Phase) -> Phase) {
        // The lock guards a plain value that every update leaves whole: a poisoned lock
        // still holds a valid phase.
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        *phase = f(*phase);
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived: on an idle connection they start a request head.
    fn bytes_read(&self) {
        self.update(|phase| match phase {
            Phase::Idle(_) => Phase::Head(Instant::now()),
            other => other,
        });
    }

    fn request_started(&self) {
        self.update(|phase| match phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
        });
    }

    fn response_done(&self) {
        self.update(|phase| match phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }

    /// When the connection is to be closed unless something happens first.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        match self.phase() {
            Phase::Head(since) => Some((since + limits.header_read_timeout, "request head")),
            Phase::Idle(since) => Some((since + limits.keep_alive_timeout, "keep-alive idle")),
            Phase::Busy(_) => None,
        }
    }
}

/// The socket, telling the connection's [`Activity`] when bytes arrive.
struct WatchedIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The router as a hyper service, marking each request busy until its response body
/// is dropped.
#[derive(Clone)]
struct Tracked {
    router: Router,
    activity: Arc<Activity>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send + 'static>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(self.activity.clone());
        let router = self.router.clone();
        Box::pin(async move {
            let response = router.oneshot(request).await?;
            Ok(response.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A request in flight, from its dispatch until its response body is dropped (or its
/// handler is, when the connection goes first).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.request_started();
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.response_done();
    }
}

/// A response body that ends its request's [`InFlight`] when hyper drops it, which it
/// does once the last frame is handed over (or at once for bodiless responses).
struct TrackedBody {
    body: AxumBody,
    _in_flight: InFlight,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How a connection ended.
enum Outcome {
    Closed(hyper::Result<()>),
    /// Closed by us: the deadline of this phase passed.
    Expired(&'static str),
}

/// A connection with its deadline: polls the connection, then (re)arms one timer for
/// the deadline of the phase the connection is left in. Every change of phase happens
/// while the connection is polled (reading the socket, calling the service, dropping a
/// response body), so the timer is always armed for the current phase.
struct Watchdog {
    connection: Pin<Box<Connection>>,
    activity: Arc<Activity>,
    limits: Limits,
    timer: Pin<Box<Sleep>>,
}

impl Watchdog {
    fn new(connection: Connection, activity: Arc<Activity>, limits: Limits) -> Self {
        let first = Instant::now() + limits.header_read_timeout;
        Self {
            connection: Box::pin(connection),
            activity,
            limits,
            timer: Box::pin(tokio::time::sleep_until(first)),
        }
    }

    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().connection.as_mut().graceful_shutdown();
    }
}

impl Future for Watchdog {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        if let Poll::Ready(result) = this.connection.as_mut().poll(cx) {
            return Poll::Ready(Outcome::Closed(result));
        }
        let Some((deadline, phase)) = this.activity.deadline(&this.limits) else {
            // A request in flight: the request timeout bounds it, and its end moves the
            // phase on while the connection is polled, which comes back here.
            return Poll::Pending;
        };
        if this.timer.deadline() != deadline {
            this.timer.as_mut().reset(deadline);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Outcome::Expired(phase)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_allows_one_warning_per_period_and_counts_the_rest() {
        let mut throttle = Throttle::default();
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        throttle.last = Some(Instant::now() - WARN_EVERY);
        assert_eq!(throttle.allow(), Some(2));
    }

    #[test]
    fn resource_errors_are_not_connection_errors() {
        assert!(!is_connection_error(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(
            libc::ENOBUFS
        )));
        assert!(is_connection_error(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }

    /// The deadline, checked to lie `timeout` after some instant in `[from, to]`.
    fn due(activity: &Activity, limits: &Limits, from: Instant, to: Instant, timeout: Duration) {
        let (deadline, _) = activity.deadline(limits).expect("a deadline");
        assert!(deadline >= from + timeout && deadline <= to + timeout);
    }

    #[test]
    fn the_phase_sets_the_deadline() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(75),
            max_connections: 1,
            drain_timeout: Duration::from_secs(1),
        };
        let before = Instant::now();
        let activity = Activity::new();
        due(
            &activity,
            &limits,
            before,
            Instant::now(),
            limits.header_read_timeout,
        );

        activity.request_started();
        activity.bytes_read(); // the body: no deadline while in flight
        assert!(activity.deadline(&limits).is_none());

        let before = Instant::now();
        activity.response_done();
        due(
            &activity,
            &limits,
            before,
            Instant::now(),
            limits.keep_alive_timeout,
        );

        let before = Instant::now();
        activity.bytes_read();
        due(
            &activity,
            &limits,
            before,
            Instant::now(),
            limits.header_read_timeout,
        );
        // More bytes of the same head do not push the deadline back.
        let first = activity.deadline(&limits);
        std::thread::sleep(Duration::from_millis(2));
        activity.bytes_read();
        assert_eq!(activity.deadline(&limits), first);
    }
}
