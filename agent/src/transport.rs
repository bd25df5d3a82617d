//! HTTPS to the server: one kept rustls connection (our CA only, optional
//! client certificate, ring provider), HTTP/1.1 framed with httparse, with
//! connect/read/write timeouts, keep-alive and bounded answers. No helper
//! threads; the request head and the answer reuse buffers, so a steady
//! heartbeat allocates only what rustls needs per TLS record.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use miniserde::json;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use stella_proto::api::ErrorBody;

use crate::error::Error;
use crate::tls::{Target, ring_provider};

/// Longest answer read from the server into memory.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;
/// Longest status line and headers of an answer.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(20);
const USER_AGENT: &str = concat!("stella-agent/", env!("CARGO_PKG_VERSION"));

/// An HTTPS client that trusts only our CA and keeps one connection open
/// between requests (for at most its idle time).
pub(crate) struct Client {
    tls: Arc<ClientConfig>,
    idle: Duration,
    conn: Option<Conn>,
    /// The request head (and a small body), rebuilt in place per request.
    head: Vec<u8>,
    /// The answer's head and the start of its body, as read from TLS.
    input: Box<[u8]>,
}

/// The kept connection and whom it is to.
struct Conn {
    host: String,
    port: u16,
    stream: StreamOwned<ClientConnection, TcpStream>,
    idle_since: Instant,
}

/// An HTTPS client that trusts only our CA, optionally presenting the
/// agent's certificate (DER) and key (PKCS#8 PEM). A kept connection idle
/// for longer than `idle` is not reused.
pub(crate) fn http_client(
    ca_der: &[u8],
    client: Option<(&[u8], &str)>,
    idle: Duration,
) -> Result<Client, Error> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| Error::crypto("the CA certificate", e))?;
    let builder = ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::crypto("TLS setup", e))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key_pem)) => {
            let key = stella_proto::pem::decode("PRIVATE KEY", key_pem)
                .map_err(|e| Error::crypto("agent key", e))?;
            builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(cert.to_vec())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
                )
                .map_err(|e| Error::crypto("agent key", e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Client {
        tls: Arc::new(config),
        idle,
        conn: None,
        head: Vec::new(),
        input: vec![0; MAX_HEAD_BYTES].into_boxed_slice(),
    })
}

/// What a request asks for besides its method and URL.
#[derive(Default)]
pub(crate) struct Extra<'a> {
    /// A JSON body.
    pub(crate) json: Option<&'a [u8]>,
    /// `Range: bytes=first-last`.
    pub(crate) range: Option<(u64, u64)>,
}

impl Client {
    /// Sends one request and reads the answer's head; the body is read
    /// from the returned `Response`.
    pub(crate) fn send(
        &mut self,
        method: &str,
        url: &str,
        extra: &Extra<'_>,
    ) -> io::Result<Response<'_>> {
        let target = Target::parse(url)?;
        self.write_head(method, &target, extra);
        self.ensure_connection(&target)?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(io::Error::other("no connection"));
        };
        let sent = conn
            .stream
            .write_all(&self.head)
            .and_then(|()| conn.stream.flush());
        match sent.and_then(|()| Self::read_head(conn, &mut self.input, method == "HEAD")) {
            Ok(answer) => Ok(Response {
                head: answer.head,
                at: answer.at,
                end: answer.end,
                left: answer.left,
                keep_alive: answer.keep_alive,
                client: self,
            }),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    fn write_head(&mut self, method: &str, target: &Target<'_>, extra: &Extra<'_>) {
        let head = &mut self.head;
        head.clear();
        // Writes into a Vec cannot fail.
        let _ = write!(
            head,
            "{method} {} HTTP/1.1\r\nhost: {}\r\n",
            target.path, target.authority
        );
        if let Some((first, last)) = extra.range {
            let _ = write!(head, "range: bytes={first}-{last}\r\n");
        }
        if let Some(body) = extra.json {
            let _ = write!(
                head,
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            );
        }
        let _ = write!(head, "user-agent: {USER_AGENT}\r\naccept: */*\r\n\r\n");
        // Bodies are small (JSON): one write, one TLS record.
        if let Some(body) = extra.json {
            head.extend_from_slice(body);
        }
    }

    /// The kept connection if it is to this server, recent and still open;
    /// otherwise a new one.
    fn ensure_connection(&mut self, target: &Target<'_>) -> io::Result<()> {
        let reusable = self.conn.as_ref().is_some_and(|c| {
            c.host == target.host
                && c.port == target.port
                && c.idle_since.elapsed() < self.idle
                && still_open(&c.stream.sock)
        });
        if !reusable {
            self.conn = None;
            self.conn = Some(self.connect(target)?);
        }
        Ok(())
    }

    fn connect(&self, target: &Target<'_>) -> io::Result<Conn> {
        let name = ServerName::try_from(target.host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = ClientConnection::new(self.tls.clone(), name).map_err(io::Error::other)?;
        let mut last = None;
        for addr in (target.host, target.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(tcp) => {
                    tcp.set_read_timeout(Some(READ_TIMEOUT))?;
                    tcp.set_write_timeout(Some(WRITE_TIMEOUT))?;
                    tcp.set_nodelay(true)?;
                    return Ok(Conn {
                        host: target.host.to_owned(),
                        port: target.port,
                        stream: StreamOwned::new(tls, tcp),
                        idle_since: Instant::now(),
                    });
                }
                Err(e) => {
                    last = Some(io::Error::new(
                        e.kind(),
                        format!("cannot connect to {addr}: {e}"),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} has no address", target.host),
            )
        }))
    }

    /// Reads until the answer's head is complete and parses it.
    fn read_head(conn: &mut Conn, input: &mut [u8], no_body: bool) -> io::Result<AnswerStart> {
        let mut filled = 0;
        loop {
            if filled == input.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the answer's head is longer than {MAX_HEAD_BYTES} bytes"),
                ));
            }
            let n = conn.stream.read(&mut input[filled..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection before answering",
                ));
            }
            filled += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(head_len) = parsed
                .parse(&input[..filled])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            else {
                continue;
            };
            let status = parsed.code.unwrap_or(0);
            let mut head = Head {
                status,
                content_length: None,
                content_range_total: None,
            };
            let mut keep_alive = parsed.version == Some(1);
            for h in parsed.headers.iter() {
                let value = std::str::from_utf8(h.value).unwrap_or("").trim();
                if h.name.eq_ignore_ascii_case("content-length") {
                    head.content_length = Some(value.parse().map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "a bad Content-Length")
                    })?);
                } else if h.name.eq_ignore_ascii_case("content-range") {
                    head.content_range_total =
                        value.rsplit('/').next().and_then(|t| t.parse().ok());
                } else if h.name.eq_ignore_ascii_case("connection") {
                    keep_alive = !value.eq_ignore_ascii_case("close");
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a chunked answer (the server sends Content-Length)",
                    ));
                }
            }
            let left = if no_body || status == 204 || status == 304 {
                Some(0)
            } else {
                head.content_length
            };
            return Ok(AnswerStart {
                head,
                at: head_len,
                end: filled,
                left,
                keep_alive: keep_alive && left.is_some(),
            });
        }
    }
}

/// Whether a kept connection is still open: nothing to read yet (a closed
/// one reads as end of file, or holds the server's close alert).
fn still_open(tcp: &TcpStream) -> bool {
    if tcp.set_nonblocking(true).is_err() {
        return false;
    }
    let open = matches!(tcp.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    tcp.set_nonblocking(false).is_ok() && open
}

/// An answer's head, and where its body starts in the input buffer.
struct AnswerStart {
    head: Head,
    at: usize,
    end: usize,
    left: Option<u64>,
    keep_alive: bool,
}

/// The parts of an answer's head the agent uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) content_length: Option<u64>,
    /// The total of `Content-Range: bytes a-b/total`.
    pub(crate) content_range_total: Option<u64>,
}

/// An answer whose body is read with `Read`. The connection is kept for
/// the next request only when the whole body was read.
pub(crate) struct Response<'a> {
    pub(crate) head: Head,
    client: &'a mut Client,
    /// Body bytes already read, in `client.input[at..end]`.
    at: usize,
    end: usize,
    /// Body bytes still to come; `None`: until the server closes.
    left: Option<u64>,
    keep_alive: bool,
}

impl Read for Response<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let want = match self.left {
            Some(0) => return Ok(0),
            Some(left) => out.len().min(usize::try_from(left).unwrap_or(usize::MAX)),
            None => out.len(),
        };
        let n = if self.at < self.end {
            let n = want.min(self.end - self.at);
            out[..n].copy_from_slice(&self.client.input[self.at..self.at + n]);
            self.at += n;
            n
        } else {
            let conn = self
                .client
                .conn
                .as_mut()
                .ok_or_else(|| io::Error::other("no connection"))?;
            match conn.stream.read(&mut out[..want]) {
                // Without a length, the end of the body is the end of the connection.
                Err(e) if self.left.is_none() && e.kind() == io::ErrorKind::UnexpectedEof => 0,
                other => other?,
            }
        };
        if let Some(left) = &mut self.left {
            if n == 0 && want > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the server closed the connection {left} bytes before the end"),
                ));
            }
            *left -= n as u64;
        }
        Ok(n)
    }
}

impl Drop for Response<'_> {
    fn drop(&mut self) {
        match &mut self.client.conn {
            Some(conn) if self.keep_alive && self.left == Some(0) && self.at == self.end => {
                conn.idle_since = Instant::now();
            }
            _ => self.client.conn = None,
        }
    }
}

/// Reads a body of at most `MAX_ANSWER_BYTES` into `answer` (cleared
/// first, its allocation reused).
fn read_answer(mut response: Response<'_>, answer: &mut String) -> io::Result<u16> {
    answer.clear();
    let status = response.head.status;
    (&mut response)
        .take(MAX_ANSWER_BYTES)
        .read_to_string(answer)?;
    Ok(status)
}

/// POSTs a JSON body; returns the status and the (bounded) answer text.
pub(crate) fn post_json(client: &mut Client, url: &str, body: &str) -> io::Result<(u16, String)> {
    let mut answer = String::new();
    let status = post_json_into(client, url, body, &mut answer)?;
    Ok((status, answer))
}

/// POSTs a JSON body and reads the (bounded) answer into `answer`, reusing
/// its allocation: the heartbeat's hot path.
pub(crate) fn post_json_into(
    client: &mut Client,
    url: &str,
    body: &str,
    answer: &mut String,
) -> io::Result<u16> {
    let extra = Extra {
        json: Some(body.as_bytes()),
        ..Extra::default()
    };
    read_answer(client.send("POST", url, &extra)?, answer)
}

/// GETs a URL; returns the status and the (bounded) answer text.
pub(crate) fn get(client: &mut Client, url: &str) -> io::Result<(u16, String)> {
    let mut answer = String::new();
    let status = read_answer(client.send("GET", url, &Extra::default())?, &mut answer)?;
    Ok((status, answer))
}

/// The server's `{"error": ...}` message, or the raw text.
pub(crate) fn error_message(text: &str) -> String {
    json::from_str::<ErrorBody>(text).map_or_else(|_| text.trim().to_owned(), |b| b.error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_head_has_what_the_server_needs() {
        let mut client = http_client_for_tests();
        let target = Target::parse("https://127.0.0.1:8443/v1/agents/heartbeat").unwrap();
        let extra = Extra {
            json: Some(b"{}"),
            ..Extra::default()
        };
        client.write_head("POST", &target, &extra);
        assert_eq!(
            std::str::from_utf8(&client.head).unwrap(),
            concat!(
                "POST /v1/agents/heartbeat HTTP/1.1\r\nhost: 127.0.0.1:8443\r\n",
                "content-type: application/json\r\ncontent-length: 2\r\n",
                "user-agent: stella-agent/",
                env!("CARGO_PKG_VERSION"),
                "\r\naccept: */*\r\n\r\n{}"
            )
        );
    }

    fn http_client_for_tests() -> Client {
        Client {
            tls: Arc::new(
                ClientConfig::builder_with_provider(ring_provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth(),
            ),
            idle: Duration::from_secs(1),
            conn: None,
            head: Vec::new(),
            input: Box::new([]),
        }
    }
}
