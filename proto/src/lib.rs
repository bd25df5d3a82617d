//! Wire types and formats shared by the Stella agent and server: API messages,
//! registration tokens, agent ids, durations, RFC 3339 times, PEM and hashes,
//! DSSE envelopes, the signed release statement and signed deployment tasks.
//! Pure functions only: no files, no sockets.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod backoff;
pub mod config;
pub mod dsse;
pub mod duration;
pub mod hash;
pub mod id;
pub mod logfmt;
pub mod pem;
pub mod release;
pub mod states;
pub mod task;
pub mod text;
pub mod time;
pub mod token;

pub use duration::{format_duration, parse_duration};
pub use token::RegistrationToken;

/// Largest request body the server accepts on any endpoint (bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// URI SAN prefix of every agent certificate: `stella://agent/<id>`.
pub const AGENT_URI_PREFIX: &str = "stella://agent/";

/// How long a lost enrollment answer can be recovered by retrying with the same
/// token and public key.
pub const ENROLL_RETRY_WINDOW_SECS: u64 = 600;
