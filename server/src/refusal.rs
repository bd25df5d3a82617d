//! The one refusal type: a request the server will not carry out, with the
//! HTTP status it is answered with and a message naming what was wrong. Every
//! domain rule, the authentication gate and the request parser refuse with it;
//! the API turns it into the `{"error": "..."}` body.

use std::fmt;

/// Why a request is refused; each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Malformed or unacceptable input (400).
    BadRequest,
    /// No valid credential: unknown, revoked or superseded certificate, bad
    /// token (401).
    Unauthorized,
    /// A valid caller that may not do this now, e.g. a deactivated agent (403).
    Forbidden,
    /// The named thing does not exist (404).
    NotFound,
    /// The path exists, the method does not (405).
    MethodNotAllowed,
    /// Not allowed from the current state (409).
    Conflict,
    /// The body is not JSON (415).
    UnsupportedMediaType,
    /// A `Range` outside the content (416).
    RangeNotSatisfiable,
    /// Slow down (429).
    TooManyRequests,
    /// The server cannot do this now, e.g. it has no CA key (503).
    Unavailable,
}

impl Why {
    /// The HTTP status.
    pub(crate) fn status(self) -> u16 {
        match self {
            Why::BadRequest => 400,
            Why::Unauthorized => 401,
            Why::Forbidden => 403,
            Why::NotFound => 404,
            Why::MethodNotAllowed => 405,
            Why::Conflict => 409,
            Why::UnsupportedMediaType => 415,
            Why::RangeNotSatisfiable => 416,
            Why::TooManyRequests => 429,
            Why::Unavailable => 503,
        }
    }
}

/// A request refused: nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub(crate) why: Why,
    pub(crate) message: String,
    /// Seconds the caller should wait before trying again (429).
    pub(crate) retry_after: Option<u64>,
}

impl Refusal {
    pub(crate) fn new(why: Why, message: impl Into<String>) -> Self {
        Self {
            why,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Why::BadRequest, message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(Why::Unauthorized, message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(Why::Forbidden, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(Why::NotFound, message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(Why::Conflict, message)
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> u16 {
        self.why.status()
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}
