//! HTTPS to the server: the ureq client (our CA only, optional client
//! certificate, ring provider, keep-alive, no helper threads) and JSON posts
//! with bounded answers.

use std::time::Duration;

use miniserde::json;
use stella_proto::api::ErrorBody;

use crate::error::Error;
use crate::tls::ring_provider;

/// Longest answer read from the server.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

/// An HTTPS client that trusts only our CA, optionally presenting the agent's
/// certificate (DER) and key (PKCS#8 PEM). Keep-alive connections are reused between heartbeats. No
/// global or resolve timeout is set: ureq would start a resolver thread for
/// those, and the agent stays on one thread.
pub(crate) fn http_client(
    ca_der: &[u8],
    client: Option<(&[u8], &str)>,
    idle: Duration,
) -> Result<ureq::Agent, Error> {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
    let client_cert = match client {
        Some((cert, key_pem)) => {
            let key = PrivateKey::from_pem(key_pem.as_bytes())
                .map_err(|e| Error::crypto("agent key", e))?;
            Some(ClientCert::new_with_certs(
                &[Certificate::from_der(cert).to_owned()],
                key,
            ))
        }
        None => None,
    };
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::new_with_certs(&[
            Certificate::from_der(ca_der).to_owned()
        ]))
        .client_cert(client_cert)
        .unversioned_rustls_crypto_provider(ring_provider())
        .build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .https_only(true)
        .user_agent(concat!("stella-agent/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_send_request(Some(Duration::from_secs(10)))
        .timeout_send_body(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(20)))
        .max_idle_connections(1)
        .max_idle_connections_per_host(1)
        .max_idle_age(idle)
        .max_response_header_size(16 * 1024)
        // ureq's default is 128 KiB per buffer, four per connection (TCP
        // and TLS, in and out): 512 KiB of zeroed heap for a 1 KiB exchange.
        .input_buffer_size(16 * 1024)
        .output_buffer_size(16 * 1024)
        .build()
        .new_agent())
}

/// POSTs a JSON body; returns the status and the (bounded) answer text.
pub(crate) fn post_json(
    client: &ureq::Agent,
    url: &str,
    body: &str,
) -> Result<(u16, String), ureq::Error> {
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e: ureq::http::uri::InvalidUri| ureq::Error::Http(e.into()))?;
    let mut answer = String::new();
    let status = post_json_into(client, &uri, body, &mut answer)?;
    Ok((status, answer))
}

/// POSTs a JSON body to a parsed URL and reads the (bounded) answer into
/// `answer`, reusing its allocation: the heartbeat's hot path.
pub(crate) fn post_json_into(
    client: &ureq::Agent,
    uri: &ureq::http::Uri,
    body: &str,
    answer: &mut String,
) -> Result<u16, ureq::Error> {
    use std::io::Read;
    let mut resp = client
        .post(uri.clone())
        .content_type("application/json")
        .send(body)?;
    let status = resp.status().as_u16();
    answer.clear();
    resp.body_mut()
        .as_reader()
        .take(MAX_ANSWER_BYTES)
        .read_to_string(answer)?;
    Ok(status)
}

/// GETs a URL; returns the status and the (bounded) answer text.
pub(crate) fn get(client: &ureq::Agent, url: &str) -> Result<(u16, String), ureq::Error> {
    let mut resp = client.get(url).call()?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_string()?;
    Ok((status, text))
}

/// The server's `{"error": ...}` message, or the raw text.
pub(crate) fn error_message(text: &str) -> String {
    json::from_str::<ErrorBody>(text).map_or_else(|_| text.trim().to_owned(), |b| b.error)
}
