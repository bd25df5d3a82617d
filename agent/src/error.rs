//! The agent's error type. Messages say what was wrong and with what; an
//! error that has a cause carries it (`source()`).

use std::fmt;

/// The cause behind an error: the library's own error value.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

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
    /// Something read did not parse; `source` says why.
    Malformed { context: String, source: Cause },
    /// An operation failed; `source` says why.
    Failed { context: String, source: Cause },
    /// Key, certificate or TLS failure.
    Crypto {
        context: String,
        source: Option<Cause>,
    },
    /// The server could not be reached.
    Network {
        context: String,
        source: Option<Cause>,
    },
    /// The server refused a request (status, its message).
    Refused { status: u16, message: String },
    /// The server says this agent is revoked or unknown: exit 3, do not restart.
    Revoked(String),
    /// Doctor or remediation reported failing checks (already printed): exit 1.
    ChecksFailed,
    /// Whoever read stdout went away (`| head -1`): stop quietly, exit 0.
    StdoutClosed,
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn malformed(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Error::Malformed {
            context: context.into(),
            source: source.into(),
        }
    }

    pub(crate) fn crypto(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Error::Crypto {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A crypto failure whose library error says nothing more (ring's
    /// `Unspecified` is deliberately empty).
    pub(crate) fn opaque_crypto(context: impl Into<String>) -> Self {
        Error::Crypto {
            context: context.into(),
            source: None,
        }
    }

    pub(crate) fn network(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Error::Network {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A failed write to stdout: a closed pipe is not an error.
    pub(crate) fn stdout(source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::BrokenPipe {
            Error::StdoutClosed
        } else {
            Error::io("cannot write to stdout", source)
        }
    }
}

thread_local! {
    /// The first failed write to stdout; later output is dropped.
    static STDOUT_FAILURE: std::cell::RefCell<Option<std::io::Error>> =
        const { std::cell::RefCell::new(None) };
}

/// Writes one line of command output to stdout (see `outln!`). A failed
/// write is kept for `stdout_failure` and the command goes on, so a reader
/// that went away (`| head -1`) never cuts an install or a remediation short.
pub(crate) fn write_stdout(line: fmt::Arguments<'_>) {
    use std::io::Write as _;
    STDOUT_FAILURE.with_borrow_mut(|failure| {
        if failure.is_none()
            && let Err(e) = writeln!(std::io::stdout().lock(), "{line}")
        {
            *failure = Some(e);
        }
    });
}

/// How writing the command's output failed, if it did: `StdoutClosed` for a
/// closed pipe (a quiet exit 0).
pub(crate) fn stdout_failure() -> Option<Error> {
    STDOUT_FAILURE
        .with_borrow_mut(Option::take)
        .map(Error::stdout)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) | Error::Invalid(m) | Error::Revoked(m) => f.write_str(m),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Malformed { context, source } | Error::Failed { context, source } => {
                write!(f, "{context}: {source}")
            }
            Error::Crypto { context, source } | Error::Network { context, source } => {
                match source {
                    Some(source) => write!(f, "{context}: {source}"),
                    None => f.write_str(context),
                }
            }
            Error::Refused { status, message } => {
                write!(f, "the server refused ({status}): {message}")
            }
            Error::ChecksFailed => f.write_str("some checks fail"),
            Error::StdoutClosed => f.write_str("stdout was closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Malformed { source, .. } | Error::Failed { source, .. } => Some(source.as_ref()),
            Error::Crypto { source, .. } | Error::Network { source, .. } => source
                .as_deref()
                .map(|s| s as &(dyn std::error::Error + 'static)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn errors_name_their_cause_and_carry_it() {
        let e = Error::io(
            "cannot read /s/agent.json",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(e.to_string().starts_with("cannot read /s/agent.json: "));
        assert!(e.source().is_some());
        let e = Error::network("cannot reach https://x", "connection refused");
        assert_eq!(e.to_string(), "cannot reach https://x: connection refused");
        assert_eq!(e.source().unwrap().to_string(), "connection refused");
    }

    #[test]
    fn a_broken_pipe_on_stdout_is_a_quiet_stop() {
        let e = Error::stdout(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(matches!(e, Error::StdoutClosed));
        let e = Error::stdout(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(e, Error::Io { .. }));
    }
}
