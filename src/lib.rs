//! The Clash of Code chat service.
//!
//! A tour, from the edges inward:
//!
//! - [`config`]: one typed configuration from flags, environment and `.env`.
//! - [`app`]: builds the backends and the state, binds, serves, drains.
//! - [`ws`]: the WebSocket edge; [`ws::session`] runs one connection.
//! - [`api`]: the REST edge (poem-openapi), probes and metrics.
//! - [`chat`]: the rules of the service, shared by both edges.
//! - [`hub`]: this instance's connections per room, ordering and fan-out.
//! - [`protocol`]: the WebSocket frames, exactly as the contract names them.
//! - [`auth`]: JWT verification and local minting.
//! - [`domain`]: newtypes that can only be built valid.
//! - Backends, each a small trait with its guarantees in its doc comment:
//!   [`store`] (history and rooms), [`bus`] (fan-out between instances),
//!   [`presence`] (who is connected), [`limiter`] (sliding-window limits).
//! - [`error`]: the one error type and its policy.
//! - [`web`]: the browser client served at `/`, and development tokens.

pub mod api;
pub mod app;
pub mod auth;
pub mod bus;
pub mod chat;
pub mod config;
pub mod domain;
pub mod error;
pub mod hub;
pub mod limiter;
pub mod listener;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod redis_conn;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod web;
pub mod ws;
