//! The server crate's error type: what went wrong, and with what, in one
//! line; the cause stays reachable through `source()`.

use std::fmt;

use crate::refusal::Refusal;
use crate::store::StoreError;

/// A cause carried along for `source()`.
pub(crate) type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Every failure the server binary reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Bad command line: exit 2.
    Usage(String),
    /// A file or socket operation failed.
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The store failed or holds something unreadable.
    Store(StoreError),
    /// Certificate or key material could not be made or read.
    Crypto {
        context: String,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A request or command the server will not carry out.
    Refused(Refusal),
    /// An admin command could not reach the server or read its answer.
    Client {
        context: String,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The server answered an admin command with an error.
    Api { status: u16, message: String },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn crypto(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Error::Crypto {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn client(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Error::Client {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// Writing to a closed pipe (`stella-server agents list | head -1`): the
    /// reader has all it wanted, so this is not a failure.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// Whether this is a usage error (exit 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => f.write_str(m),
            Error::Store(e) => e.fmt(f),
            Error::Refused(r) => r.fmt(f),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Crypto { context, source } | Error::Client { context, source } => match source {
                Some(s) => write!(f, "{context}: {s}"),
                None => f.write_str(context),
            },
            Error::Api { status, message } => write!(f, "server refused ({status}): {message}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Store(e) => Some(e),
            Error::Crypto { source, .. } | Error::Client { source, .. } => source
                .as_deref()
                .map(|s| s as &(dyn std::error::Error + 'static)),
            Error::Usage(_) | Error::Refused(_) | Error::Api { .. } => None,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            // The caller's rule refused inside a store transaction.
            StoreError::Aborted(refusal) => Error::Refused(refusal),
            e @ StoreError::NotFound { .. } => Error::Refused(Refusal::not_found(e.to_string())),
            e @ StoreError::Exists { .. } => Error::Refused(Refusal::conflict(e.to_string())),
            other => Error::Store(other),
        }
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        Error::Refused(r)
    }
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Error::crypto("certificate", e)
    }
}

impl From<rustls::Error> for Error {
    fn from(e: rustls::Error) -> Self {
        Error::crypto("TLS", e)
    }
}
