//! The server crate's error type: what went wrong, and with what, in one line.

use std::fmt;
use std::path::Path;

/// Every failure the server binary reports.
#[derive(Debug)]
#[non_exhaustive]
pub(crate) enum Error {
    /// Bad command line: exit 2.
    Usage(String),
    /// A file or socket operation failed.
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The redb store failed or holds something unreadable.
    Store(String),
    /// Certificate or key material could not be made or read.
    Crypto(String),
    /// Input that is well-formed but not acceptable.
    Invalid(String),
    /// A named thing does not exist.
    NotFound(String),
    /// A lifecycle change that is not allowed from the current state.
    Conflict(String),
    /// An admin command could not reach the server.
    Client(String),
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

    pub(crate) fn store(path: &Path, e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::Store(format!(
                "{} is in use by another stella-server process",
                path.display()
            )),
            other => Error::Store(format!("cannot open {}: {other}", path.display())),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m)
            | Error::Store(m)
            | Error::Crypto(m)
            | Error::Invalid(m)
            | Error::NotFound(m)
            | Error::Conflict(m)
            | Error::Client(m) => f.write_str(m),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Api { status, message } => write!(f, "server refused ({status}): {message}"),
        }
    }
}

impl std::error::Error for Error {}

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(format!("store: {e}"))
            }
        }
    )*};
}
store_error_from!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Error::Crypto(format!("certificate: {e}"))
    }
}

impl From<rustls::Error> for Error {
    fn from(e: rustls::Error) -> Self {
        Error::Crypto(format!("TLS: {e}"))
    }
}
