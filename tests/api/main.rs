//! Black-box tests of the whole service against real MariaDB and Redis.

mod applications;
mod backpressure;
mod chats;
mod cluster;
mod connections;
mod elastic;
mod elastic_reindex;
mod elastic_tls;
mod errors;
mod events;
mod helpers;
mod idempotency;
mod messages;
mod operations;
mod processes;
mod search;
mod search_conformance;
mod search_properties;
mod worker;
