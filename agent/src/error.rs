//! The agent's error type. Messages say what was wrong and with what.

use std::fmt;

/// Every failure the agent reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Bad command line or arguments: exit 2.
    Usage(String),
    /// A file in the state dir could not be read or written.
    Io {
        context: String,
        source: std::io::Error,
    },
    /// Something on disk or on the wire is not what it must be.
    Invalid(String),
    /// Key, certificate or TLS failure.
    Crypto(String),
    /// The server could not be reached.
    Network(String),
    /// The server refused a request (status, its message).
    Refused { status: u16, message: String },
    /// The server says this agent is revoked or unknown: exit 3, do not restart.
    Revoked(String),
    /// Doctor or remediation reported failing checks (already printed): exit 1.
    ChecksFailed,
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m)
            | Error::Invalid(m)
            | Error::Crypto(m)
            | Error::Network(m)
            | Error::Revoked(m) => f.write_str(m),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Refused { status, message } => {
                write!(f, "the server refused ({status}): {message}")
            }
            Error::ChecksFailed => f.write_str("some checks fail"),
        }
    }
}

impl std::error::Error for Error {}
