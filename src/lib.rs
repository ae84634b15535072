//! idemproxy: a reverse proxy that enforces `Idempotency-Key` semantics
//! (draft-ietf-httpapi-idempotency-key-header) in front of services that lack them.
//!
//! The binary is a thin shell: it parses the command line, loads the [`Config`], starts
//! logging and calls [`serve`]. Tests call the same [`serve`]. `docs/architecture.md` maps the
//! modules; `docs/behaviour.md` is the behaviour they implement.

pub mod admin;
pub mod body;
pub mod config;
pub mod error;
pub mod headers;
pub mod idempotency;
pub mod keytool;
pub mod proxy;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod timer;
pub mod tls;
pub mod upload;
pub mod upstream;

pub use config::Config;
pub use error::ServeError;
pub use server::{serve, serve_with_admin};
