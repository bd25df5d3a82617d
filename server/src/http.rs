//! HTTP/1.1 framing over any async byte stream: request parsing with httparse,
//! the head apart from the body (so that the caller is authenticated before
//! the body is read), hard limits on header and body size, an absolute
//! deadline per request (slow clients cannot hold a connection by trickling
//! bytes), keep-alive and pipelining, response writing; and the parsers of
//! request parts (query parameters, `Range`).

use std::time::{Duration, Instant};

use smol::Timer;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 48;

/// One parsed request.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub range: Option<String>,
    pub keep_alive: bool,
    pub body: Vec<u8>,
}

/// A response: headers and a body in memory, or a file range streamed after.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub extra_headers: Vec<(&'static str, String)>,
    pub file: Option<FileBody>,
}

/// Part of a file to stream as the body.
#[derive(Debug)]
pub struct FileBody {
    pub path: std::path::PathBuf,
    pub start: u64,
    pub len: u64,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Self {
            status,
            content_type,
            body,
            extra_headers: Vec::new(),
            file: None,
        }
    }

    /// A JSON body.
    pub fn json(status: u16, body: String) -> Self {
        Self::new(status, "application/json", body.into_bytes())
    }

    /// The `{"error": "..."}` body every refusal carries.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = stella_proto::api::ErrorBody {
            error: message.into(),
        };
        Self::json(status, miniserde::json::to_string(&body))
    }
}

/// Why a request could not be read; some deserve an answer before closing.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection between requests (not an error).
    Closed,
    /// Idle too long between requests, or the request took too long.
    Timeout,
    /// The connection failed.
    Io(std::io::Error),
    /// Malformed or over a limit: answer with this, then close.
    Reject(Response),
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// How many bytes one read asks for.
const READ_CHUNK: usize = 4096;

/// Reads what has arrived (at most [`READ_CHUNK`] bytes) onto the end of
/// `buf`. The bytes go straight into `buf`, not through a chunk on the
/// stack: such a chunk would be part of every connection task's future, and
/// so of every open connection's memory, even while it waits for its next
/// request (the reconnect storm in BENCHMARKS.md).
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<usize, ReadError> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let read = async { stream.read(&mut buf[start..]).await.map_err(ReadError::Io) };
    let timeout = async {
        Timer::at(deadline).await;
        Err(ReadError::Timeout)
    };
    let result = read.or(timeout).await;
    buf.truncate(start + result.as_ref().map_or(0, |n| *n));
    result
}

/// Reads the next request from `stream`, head and body. `buf` holds bytes
/// already received (pipelined requests) and keeps what follows this request.
pub async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    idle: Duration,
    request_time: Duration,
    max_body: usize,
) -> Result<Request, ReadError> {
    let head = read_head(stream, buf, idle, request_time).await?;
    read_body(stream, buf, head, max_body).await
}

/// A request whose head has been read: its body, `body_len` bytes, has not.
#[derive(Debug)]
pub struct Head {
    /// The request, without its body.
    pub request: Request,
    /// The body's length (Content-Length).
    pub body_len: usize,
    deadline: Instant,
}

/// Reads the body of `head` (refused with 413 over `max_body`, before any of
/// it is read).
pub async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: Head,
    max_body: usize,
) -> Result<Request, ReadError> {
    let Head {
        mut request,
        body_len,
        deadline,
    } = head;
    if body_len > max_body {
        return Err(ReadError::Reject(Response::error(
            413,
            format!("request body of {body_len} bytes is over the limit of {max_body} bytes"),
        )));
    }
    while buf.len() < body_len {
        if read_some(stream, buf, deadline).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
    request.body = buf[..body_len].to_vec();
    buf.drain(..body_len);
    Ok(request)
}

/// Reads the body of `head` piece by piece into `sink`, never holding it
/// whole (uploads larger than any request body): refused with 413 over
/// `max`, before any of it is read. Each piece must arrive within `idle` of
/// the last, so a large body may take longer than one request's deadline.
/// Returns the request without its body.
pub async fn stream_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: Head,
    max: u64,
    idle: Duration,
    sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
) -> Result<Request, ReadError> {
    let Head {
        request, body_len, ..
    } = head;
    if body_len as u64 > max {
        return Err(ReadError::Reject(Response::error(
            413,
            format!("request body of {body_len} bytes is over the limit of {max} bytes"),
        )));
    }
    let mut left = body_len;
    loop {
        let n = left.min(buf.len());
        sink(&buf[..n]).map_err(ReadError::Io)?;
        buf.drain(..n);
        left -= n;
        if left == 0 {
            return Ok(request);
        }
        if read_some(stream, buf, Instant::now() + idle).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// Reads and drops the body of a request that was refused on its head, so
/// that the connection can serve the next request.
pub async fn skip_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: &Head,
) -> Result<(), ReadError> {
    let mut left = head.body_len;
    loop {
        let n = left.min(buf.len());
        buf.drain(..n);
        left -= n;
        if left == 0 {
            return Ok(());
        }
        if read_some(stream, buf, head.deadline).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// Reads the head of the next request from `stream` (see `read_request`).
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    idle: Duration,
    request_time: Duration,
) -> Result<Head, ReadError> {
    if buf.is_empty() && read_some(stream, buf, Instant::now() + idle).await? == 0 {
        return Err(ReadError::Closed);
    }
    let deadline = Instant::now() + request_time;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let mut req = Request {
                    method: parsed.method.unwrap_or_default().to_owned(),
                    path: parsed.path.unwrap_or_default().to_owned(),
                    keep_alive: parsed.version == Some(1),
                    ..Request::default()
                };
                let mut content_length: Option<usize> = None;
                for h in parsed.headers.iter() {
                    let value = std::str::from_utf8(h.value).unwrap_or("").trim();
                    let name = h.name;
                    if name.eq_ignore_ascii_case("content-length") {
                        // 1*DIGIT (RFC 9110): `usize::from_str` would also take "+5".
                        let n: usize = value
                            .bytes()
                            .all(|b| b.is_ascii_digit())
                            .then(|| value.parse().ok())
                            .flatten()
                            .ok_or_else(|| {
                                ReadError::Reject(Response::error(400, "invalid Content-Length"))
                            })?;
                        if content_length.is_some_and(|m| m != n) {
                            return Err(ReadError::Reject(Response::error(
                                400,
                                "conflicting Content-Length headers",
                            )));
                        }
                        content_length = Some(n);
                    } else if name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(ReadError::Reject(Response::error(
                            501,
                            "Transfer-Encoding is not supported; send Content-Length",
                        )));
                    } else if name.eq_ignore_ascii_case("authorization") {
                        req.authorization = Some(value.to_owned());
                    } else if name.eq_ignore_ascii_case("content-type") {
                        req.content_type = Some(value.to_owned());
                    } else if name.eq_ignore_ascii_case("range") {
                        req.range = Some(value.to_owned());
                    } else if name.eq_ignore_ascii_case("connection") {
                        if value.eq_ignore_ascii_case("close") {
                            req.keep_alive = false;
                        } else if value.eq_ignore_ascii_case("keep-alive") {
                            req.keep_alive = true;
                        }
                    }
                }
                buf.drain(..head_len);
                return Ok(Head {
                    request: req,
                    body_len: content_length.unwrap_or(0),
                    deadline,
                });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD_BYTES {
                    return Err(ReadError::Reject(Response::error(
                        431,
                        format!("request head is over the limit of {MAX_HEAD_BYTES} bytes"),
                    )));
                }
                if read_some(stream, buf, deadline).await? == 0 {
                    return Err(ReadError::Closed);
                }
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ReadError::Reject(Response::error(
                    431,
                    format!("more than {MAX_HEADERS} headers"),
                )));
            }
            Err(e) => {
                return Err(ReadError::Reject(Response::error(
                    400,
                    format!("malformed HTTP request: {e}"),
                )));
            }
        }
    }
}

/// Writes `resp`; `keep_alive` decides the `Connection` header.
pub async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    resp: &Response,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    use std::io::Write;
    out.clear();
    // One allocation for head and body: the connection gives `out` back
    // between requests, so it starts empty.
    out.reserve(256 + resp.body.len());
    write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.file.as_ref().map_or(resp.body.len() as u64, |f| f.len)
    )?;
    for (name, value) in &resp.extra_headers {
        write!(out, "{name}: {value}\r\n")?;
    }
    out.extend_from_slice(if keep_alive {
        b"connection: keep-alive\r\n\r\n"
    } else {
        b"connection: close\r\n\r\n"
    });
    out.extend_from_slice(&resp.body);
    stream.write_all(out).await?;
    if let Some(file) = &resp.file {
        use smol::io::{AsyncReadExt, AsyncSeekExt};
        let mut f = smol::fs::File::open(&file.path).await?;
        f.seek(std::io::SeekFrom::Start(file.start)).await?;
        let mut left = file.len;
        let mut chunk = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = chunk.len().min(left as usize);
            let n = f.read(&mut chunk[..want]).await?;
            if n == 0 {
                // The blob is shorter than recorded: end the connection
                // rather than send a body shorter than promised.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "blob shorter than recorded",
                ));
            }
            stream.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
    }
    stream.flush().await
}

/// The path of a request target, without its query.
pub fn path_of(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

/// The value of `name` in the query of a request target, percent-decoded
/// (`+` is a space, as in forms); `Err` names a parameter whose encoding is
/// broken or not UTF-8.
pub fn query_param(target: &str, name: &str) -> Result<Option<String>, String> {
    let Some((_, query)) = target.split_once('?') else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)
            .ok_or_else(|| format!("query parameter {key:?} is not valid percent-encoding"))?;
        if key == name {
            return percent_decode(value)
                .map(Some)
                .ok_or_else(|| format!("query parameter {name} is not valid percent-encoding"));
        }
    }
    Ok(None)
}

/// Decodes `%XX` escapes and `+`; `None` for a broken escape or bytes that
/// are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A `Range` header of the two forms we serve, `bytes=START-` and
/// `bytes=START-END` (END inclusive, clamped to the content), as the
/// half-open range [start, end) within `size`; `None` (answered with 416)
/// for anything else: suffix ranges, several ranges, other units, a start at
/// or past the end, an end before the start.
pub fn parse_range(header: &str, size: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => size,
        e => e.parse::<u64>().ok()?.saturating_add(1).min(size),
    };
    (start < end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &[u8]) -> Result<Request, ReadError> {
        let mut stream = smol::io::Cursor::new(input.to_vec());
        let mut buf = Vec::new();
        smol::block_on(read_request(
            &mut stream,
            &mut buf,
            Duration::from_secs(1),
            Duration::from_secs(1),
            64,
        ))
    }

    #[test]
    fn parses_a_post_with_body() {
        let req = parse(b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nAuthorization: Bearer t\r\n\r\nhello").unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/v1/x"));
        assert_eq!(req.body, b"hello");
        assert_eq!(req.authorization.as_deref(), Some("Bearer t"));
        assert!(req.keep_alive);
    }

    #[test]
    fn keeps_pipelined_bytes() {
        let mut stream = smol::io::Cursor::new(
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
        );
        let mut buf = Vec::new();
        let d = Duration::from_secs(1);
        let a = smol::block_on(read_request(&mut stream, &mut buf, d, d, 64)).unwrap();
        let b = smol::block_on(read_request(&mut stream, &mut buf, d, d, 64)).unwrap();
        assert_eq!((a.path.as_str(), b.path.as_str()), ("/a", "/b"));
        assert!(!b.keep_alive);
    }

    #[test]
    fn rejects_over_limits_and_garbage() {
        let status = |r: Result<Request, ReadError>| match r {
            Err(ReadError::Reject(resp)) => resp.status,
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert_eq!(
            status(parse(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n")),
            413
        );
        assert_eq!(
            status(parse(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            501
        );
        assert_eq!(status(parse(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")), 400);
        assert_eq!(
            status(parse(b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello")),
            400
        );
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        assert_eq!(status(parse(&big)), 431);
        assert!(matches!(parse(b""), Err(ReadError::Closed)));
    }

    #[test]
    fn the_head_comes_before_the_body() {
        let mut stream = smol::io::Cursor::new(
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n".to_vec(),
        );
        let mut buf = Vec::new();
        let d = Duration::from_secs(1);
        let head = smol::block_on(read_head(&mut stream, &mut buf, d, d)).unwrap();
        assert_eq!((head.request.path.as_str(), head.body_len), ("/a", 3));
        assert!(
            head.request.body.is_empty(),
            "the body is not read with the head"
        );
        smol::block_on(skip_body(&mut stream, &mut buf, &head)).unwrap();
        let next = smol::block_on(read_request(&mut stream, &mut buf, d, d, 64)).unwrap();
        assert_eq!(
            next.path, "/b",
            "a skipped body leaves the next request intact"
        );
        // Over the limit: refused before a byte of the body is read.
        let mut stream = smol::io::Cursor::new(
            b"POST /a HTTP/1.1\r\nContent-Length: 100000000000\r\n\r\n".to_vec(),
        );
        let mut buf = Vec::new();
        let head = smol::block_on(read_head(&mut stream, &mut buf, d, d)).unwrap();
        assert!(matches!(
            smol::block_on(read_body(&mut stream, &mut buf, head, 64)),
            Err(ReadError::Reject(Response { status: 413, .. }))
        ));
    }

    #[test]
    fn query_parameters_are_percent_decoded() {
        let target = "/v1/admin/agents?limit=10&after=agt_x&label=env%3Dprod+eu&k%61y=%E2%82%AC";
        assert_eq!(path_of(target), "/v1/admin/agents");
        assert_eq!(query_param(target, "limit"), Ok(Some("10".into())));
        assert_eq!(query_param(target, "after"), Ok(Some("agt_x".into())));
        assert_eq!(query_param(target, "label"), Ok(Some("env=prod eu".into())));
        assert_eq!(
            query_param(target, "kay"),
            Ok(Some("€".into())),
            "names decode too"
        );
        assert_eq!(query_param(target, "missing"), Ok(None));
        assert_eq!(query_param("/x", "a"), Ok(None));
        assert_eq!(query_param("/x?a", "a"), Ok(Some(String::new())));
        for broken in ["/x?a=%", "/x?a=%4", "/x?a=%zz", "/x?a=%ff"] {
            assert!(query_param(broken, "a").is_err(), "{broken}");
        }
    }

    #[test]
    fn range_forms_accepted_and_refused() {
        let size = 100;
        for (header, want) in [
            ("bytes=0-", Some((0, 100))),
            ("bytes=10-", Some((10, 100))),
            ("bytes=99-", Some((99, 100))),
            ("bytes=0-0", Some((0, 1))),
            ("bytes=10-19", Some((10, 20))),
            ("bytes=0-99", Some((0, 100))),
            ("bytes=50-1000", Some((50, 100))),
            ("  bytes= 5 - 9 ", Some((5, 10))),
            ("bytes=100-", None),
            ("bytes=150-200", None),
            ("bytes=20-10", None),
            ("bytes=-10", None),
            ("bytes=0-1,5-9", None),
            ("bytes=a-b", None),
            ("bytes=1-x", None),
            ("bytes=+1-2", Some((1, 3))),
            ("bytes=", None),
            ("bytes 0-1", None),
            ("items=0-1", None),
            ("", None),
        ] {
            assert_eq!(parse_range(header, size), want, "{header:?}");
        }
        assert_eq!(
            parse_range("bytes=0-", 0),
            None,
            "nothing to serve of an empty file"
        );
    }
}
