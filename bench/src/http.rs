//! Just enough HTTP/1.1 for the load: requests built once into bytes, and
//! responses read by `Content-Length` on a keep-alive connection into a
//! reused buffer.

use std::io::{Error, ErrorKind};

use smol::io::{AsyncReadExt, AsyncWriteExt};

use crate::tls::Stream;

/// Largest response accepted (the admin agent list of a big fleet).
const MAX_RESPONSE: usize = 1 << 30;

/// A keep-alive connection with its read buffer.
pub(crate) struct Conn {
    tls: Stream,
    buf: Vec<u8>,
}

/// Appends a request with `body` (if any) to `out`.
pub(crate) fn request(
    out: &mut Vec<u8>,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
) {
    use std::io::Write;
    let _ = write!(
        out,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nuser-agent: stella-loadgen\r\naccept: */*\r\n"
    );
    if let Some(token) = bearer {
        let _ = write!(out, "authorization: Bearer {token}\r\n");
    }
    if let Some(body) = body {
        let _ = write!(
            out,
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
    }
    out.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
}

fn bad(msg: &str) -> Error {
    Error::new(ErrorKind::InvalidData, msg.to_owned())
}

impl Conn {
    pub(crate) fn new(tls: Stream) -> Self {
        Self {
            tls,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one request and reads its response: the status and the body.
    pub(crate) async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, &[u8])> {
        self.tls.write_all(request).await?;
        self.tls.flush().await?;
        self.buf.clear();
        let mut head_len = None;
        let mut body_len = 0usize;
        loop {
            if head_len.is_none()
                && let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n")
            {
                head_len = Some(end + 4);
                body_len = content_length(&self.buf[..end])?;
            }
            if let Some(h) = head_len
                && self.buf.len() >= h + body_len
            {
                break;
            }
            if self.buf.len() > MAX_RESPONSE {
                return Err(bad("response too large"));
            }
            let filled = self.buf.len();
            let want = h_or(head_len, body_len)
                .saturating_sub(filled)
                .clamp(4096, 1 << 20);
            self.buf.resize(filled + want, 0);
            let n = self.tls.read(&mut self.buf[filled..]).await?;
            self.buf.truncate(filled + n);
            if n == 0 {
                return Err(Error::new(ErrorKind::UnexpectedEof, "connection closed"));
            }
        }
        let head = head_len.unwrap_or(0);
        let status = std::str::from_utf8(self.buf.get(9..12).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("malformed status line"))?;
        Ok((status, &self.buf[head..head + body_len]))
    }
}

/// How many bytes the whole response needs, as far as known.
fn h_or(head_len: Option<usize>, body_len: usize) -> usize {
    head_len.map_or(0, |h| h + body_len)
}

fn content_length(head: &[u8]) -> std::io::Result<usize> {
    let text = std::str::from_utf8(head).map_err(|_| bad("response head is not UTF-8"))?;
    for line in text.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            return value.trim().parse().map_err(|_| bad("bad content-length"));
        }
    }
    Ok(0)
}
