# syntax=docker/dockerfile:1
#
# chat-system image: one binary, one subcommand per role (serve, api, worker, migrate,
# reindex). Built in stages so that the dependency build is cached on its own layer:
#
#   chef     rust:1-bookworm + cargo-chef
#   planner  reduces the workspace to a recipe (manifests + lock file only)
#   builder  cooks the recipe (dependencies only: cached until Cargo.toml/Cargo.lock
#            change), then builds the crate itself
#   probe    a tiny std-only HTTP probe for HEALTHCHECK (the runtime has no curl/wget)
#   runtime  debian:bookworm-slim + ca-certificates, non-root, the two binaries
#
# Build: docker build -t chat-system .   (or `docker compose build`)
# Run:   docker run --rm chat-system api --help    # any subcommand; the default is `serve`,
#        which needs DATABASE_URL and REDIS_URL (docker-compose.yml runs the whole stack)

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- chef ----------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
# rust:1-bookworm tracks the latest stable, which is at least Cargo.toml's rust-version
# (1.94). rust-toolchain.toml is kept out of the context (.dockerignore), so rustup uses
# the image's toolchain rather than fetching the pinned one.
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
    && rm -rf "${CARGO_HOME}/registry"
WORKDIR /build

# --- planner -------------------------------------------------------------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- builder -------------------------------------------------------------------------
FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
# Dependencies only. The same profile, flags and target as the real build below, so the
# real build reuses every artifact of this layer.
RUN cargo chef cook --release --locked --bin chat-system --recipe-path recipe.json
# The crate itself. Migrations are embedded at compile time (sqlx::migrate! reads
# ./migrations), so nothing but the binary leaves this stage.
COPY . .
RUN cargo build --release --locked --bin chat-system \
    && install -D -m 0755 target/release/chat-system /out/chat-system

# --- probe ---------------------------------------------------------------------------
# HEALTHCHECK needs an HTTP client; rather than installing curl (and its libraries) in
# the runtime image, compile a ~350 KB std-only probe. It reads the listen address from
# $BIND (as the server does; another variable may be named as its first argument, e.g.
# WORKER_METRICS_BIND), connects to that port on loopback (when the address is 0.0.0.0
# or ::), sends GET /healthz (or the path given second) and exits 0 on a 200.
FROM ${RUST_IMAGE} AS probe
WORKDIR /probe
# (The blank line after the heredoc's EOF is for hadolint, whose parser needs it.)
COPY <<'EOF' healthcheck.rs
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

fn main() {
    // Usage: chat-system-healthcheck [ADDRESS_VARIABLE [PATH]]
    let mut args = std::env::args().skip(1);
    let var = args.next().unwrap_or_else(|| "BIND".into());
    let path = args.next().unwrap_or_else(|| "/healthz".into());
    let bind = match std::env::var(&var) {
        Ok(value) => value.parse::<SocketAddr>().ok(),
        // The server's own default.
        Err(_) if var == "BIND" => Some(SocketAddr::from(([127, 0, 0, 1], 3000))),
        Err(_) => None,
    };
    let ok = bind.is_some_and(|bind| {
        let ip = match bind.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        probe(SocketAddr::new(ip, bind.port()), &path).unwrap_or(false)
    });
    std::process::exit(if ok { 0 } else { 1 });
}

fn probe(addr: SocketAddr, path: &str) -> std::io::Result<bool> {
    let timeout = Some(Duration::from_secs(2));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut status = [0u8; 12]; // "HTTP/1.1 200"
    stream.read_exact(&mut status)?;
    Ok(status.starts_with(b"HTTP/1.") && &status[8..12] == b" 200")
}
EOF

RUN rustc --edition 2021 -C opt-level=s -C strip=symbols -C panic=abort \
        -o /probe/chat-system-healthcheck healthcheck.rs

# --- runtime -------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates only (for https:// dependency URLs); no shell tools are needed at run
# time. A fixed non-root uid/gid so volumes and orchestrators can rely on it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 chat \
    && useradd --system --no-log-init --uid 10001 --gid chat \
        --home-dir /var/lib/chat-system --create-home --shell /usr/sbin/nologin chat
COPY --from=builder /out/chat-system /usr/local/bin/chat-system
COPY --from=probe /probe/chat-system-healthcheck /usr/local/bin/chat-system-healthcheck
WORKDIR /var/lib/chat-system
USER 10001:10001
# Listen on every interface inside the container. The embedded search index (used when
# ELASTICSEARCH_URL is unset) goes under the writable home directory.
ENV BIND=0.0.0.0:3000 \
    SEARCH_INDEX_DIR=/var/lib/chat-system/search
EXPOSE 3000
# For `serve` and `api`. docker-compose.yml points it at WORKER_METRICS_BIND for
# `worker` and disables it for `migrate`, which serves no HTTP.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["chat-system-healthcheck"]
ENTRYPOINT ["chat-system"]
CMD ["serve"]
