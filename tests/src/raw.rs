//! Raw HTTPS clients for the hostile-client and crash tests: TLS connections
//! built by hand with rustls (optional client certificate, optional source
//! address on loopback), requests written byte for byte, answers read back,
//! and openssl-made keys and CSRs.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::{Server, text, tool};

/// The server's `IP:PORT`.
pub fn addr(server: &Server) -> SocketAddr {
    server
        .url
        .trim_start_matches("https://")
        .parse()
        .expect("server URL is https://IP:PORT")
}

/// A TLS client configuration trusting the server's CA, with an optional
/// client certificate and key (PEM files).
pub fn tls_config(server: &Server, identity: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(server.ca_pem()).expect("ca.pem"))
        .expect("CA certificate");
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .expect("certificate PEM")
                .map(|c| c.expect("certificate"))
                .collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).expect("key PEM"))
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A TCP connection to the server, from `source` (another loopback address)
/// when given.
pub fn tcp(server: &Server, source: Option<Ipv4Addr>) -> TcpStream {
    let to = addr(server);
    let stream = match (source, to) {
        (Some(ip), SocketAddr::V4(to)) => {
            use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
            let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
            bind(&fd, &SocketAddrV4::new(ip, 0)).expect("bind the source address");
            connect(&fd, &to).expect("connect");
            TcpStream::from(fd)
        }
        _ => TcpStream::connect(to).expect("connect"),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .expect("write timeout");
    stream
}

/// A client TLS connection over TCP.
pub type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection with its handshake done (as far as the client can tell:
/// in TLS 1.3 the server judges the client certificate after that).
pub fn tls(
    server: &Server,
    config: &Arc<ClientConfig>,
    source: Option<Ipv4Addr>,
) -> Result<Tls, String> {
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let conn = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut stream = StreamOwned::new(conn, tcp(server, source));
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(stream)
}

/// A request as bytes; `Connection: close` so the answer ends the exchange.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A POST with a JSON body (and `Connection: close`).
pub fn json_post(path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request("POST", path, &all, body.as_bytes())
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn is_json_error(&self) -> bool {
        self.header("content-type") == Some("application/json")
            && self.body.starts_with("{\"error\":\"")
            && self.body.ends_with("\"}")
    }
}

/// Reads one response (head, then `content-length` bytes of body).
pub fn read_answer(stream: &mut impl Read) -> Result<Answer, String> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(format!("closed before an answer ({} bytes)", data.len())),
            Ok(n) => data.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {head:?}"))?;
    let mut answer = Answer {
        status,
        head,
        body: String::new(),
    };
    let len: usize = answer
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = data[head_end..].to_vec();
    while body.len() < len {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read body: {e}")),
        }
    }
    body.truncate(len);
    answer.body = String::from_utf8_lossy(&body).into_owned();
    Ok(answer)
}

/// Sends `bytes` on a new connection and reads the answer. Write errors are
/// ignored: a server may answer and close before it has read everything.
pub fn exchange(
    server: &Server,
    config: &Arc<ClientConfig>,
    source: Option<Ipv4Addr>,
    bytes: &[u8],
) -> Result<Answer, String> {
    let mut stream = tls(server, config, source)?;
    for piece in bytes.chunks(16 * 1024) {
        if stream
            .write_all(piece)
            .and_then(|()| stream.flush())
            .is_err()
        {
            break;
        }
    }
    read_answer(&mut stream)
}

/// `openssl` with arguments; panics with its output when it fails.
pub fn openssl(args: &[&str]) {
    let out = tool("openssl", args);
    assert!(out.status.success(), "openssl {args:?}: {:?}", text(&out));
}

/// A path as `&str`, for command lines.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A PEM CSR for a new P-256 key, JSON-escaped.
pub fn csr_json(work: &Path, name: &str) -> String {
    let (key, csr) = (
        work.join(format!("{name}.key")),
        work.join(format!("{name}.csr")),
    );
    new_key_and_csr(&key, &csr, name);
    fs::read_to_string(&csr).expect("csr").replace('\n', "\\n")
}

/// Makes a new P-256 key at `key` and a CSR for it with CN = `cn` at `csr`.
pub fn new_key_and_csr(key: &Path, csr: &Path, cn: &str) {
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        path(key),
    ]);
    openssl(&[
        "req",
        "-new",
        "-key",
        path(key),
        "-subj",
        &format!("/CN={cn}"),
        "-out",
        path(csr),
    ]);
}

/// A registration body with this token and CSR (JSON-escaped PEM).
pub fn register_body(token: &str, csr: &str, name: &str) -> String {
    format!(
        r#"{{"token":"{token}","csr":"{csr}","name":"{name}","platform":{{"os":"linux","arch":"x86_64","target":"x86_64-unknown-linux-gnu"}},"version":"0.1.0","capabilities":[]}}"#
    )
}
