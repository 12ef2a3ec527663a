//! chat-system: a chat backend. Client applications register and get a token; devices
//! create chats in an application and post messages to chats. Everything is numbered
//! per parent (1, 2, 3, ...) and built for many API processes at once.
//!
//! How a write flows: the API validates it, then one Lua script in Redis allocates the
//! number, appends the write to a Redis Stream and keeps a pending record for reads
//! (`store::queue`). Workers drain the stream into MySQL in idempotent batches
//! (`worker`). MySQL is the system of record (`store::mysql`).
//!
//! | module | holds |
//! |---|---|
//! | [`cli`] | the subcommands: `serve`, `api`, `worker`, `migrate`, `reindex` |
//! | [`commands`] | what each subcommand does; `main` parses and dispatches here |
//! | [`config`] | typed configuration from environment variables |
//! | [`startup`] | building and running the processes, graceful shutdown |
//! | [`http`] | routes by resource, extractors, middleware, OpenAPI |
//! | [`server`] | the accept loop: connection limit, header and keep-alive timeouts |
//! | [`idempotency`] | `Idempotency-Key`: keys, fingerprints, what to do next ([`idempotency::NextAction`]) |
//! | [`error`] | the one API error type and its problem+json mapping |
//! | [`domain`] | input validation: tokens, numbers, names, titles, bodies |
//! | [`resources`] | the public JSON shapes |
//! | [`service`] | chat and message operations over Redis and MySQL |
//! | [`search`] | message search: embedded Tantivy or Elasticsearch |
//! | [`events`] | live delivery: each API process tails the queue for its subscribers |
//! | [`store`] | MySQL statements; Redis keys, scripts and pending records |
//! | [`worker`] | the queue consumers (persist, index), dead letters, count sync |
//! | [`process`] | process-wide settings made at start: allocator tuning, open-files limit |
//! | [`reindex`] | rebuilding the search index from MySQL |
//! | [`telemetry`] | logging |

pub mod cli;
pub mod commands;
pub mod config;
pub mod domain;
pub mod error;
pub mod events;
pub mod http;
pub mod idempotency;
pub mod process;
pub mod reindex;
pub mod resources;
pub mod search;
pub mod server;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod worker;
