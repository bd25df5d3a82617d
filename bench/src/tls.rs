//! TLS to the server under test: the CA it trusts, one rustls client config
//! per simulated agent (its own certificate and key, ring provider) and
//! connecting over loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use futures_rustls::TlsConnector;
use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use smol::net::TcpStream;

/// A TLS connection to the server.
pub(crate) type Stream = futures_rustls::client::TlsStream<TcpStream>;

/// Where the server is and how to trust it.
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    name: ServerName<'static>,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl Target {
    /// `url` is `https://IP:PORT` (what `serve` writes to `server.url`).
    pub(crate) fn new(url: &str, ca_file: &Path) -> Result<Self, String> {
        let hostport = url
            .trim()
            .strip_prefix("https://")
            .ok_or_else(|| format!("server URL {url:?} does not start with https://"))?
            .trim_end_matches('/');
        let addr: SocketAddr = hostport
            .parse()
            .map_err(|_| format!("server URL {url:?} is not https://IP:PORT"))?;
        let name = ServerName::from(addr.ip());
        let pem = std::fs::read_to_string(ca_file)
            .map_err(|e| format!("cannot read {}: {e}", ca_file.display()))?;
        let der = stella_proto::pem::decode("CERTIFICATE", &pem)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
        Ok(Self {
            addr,
            name,
            roots: Arc::new(roots),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// A client config presenting `client` (certificate DER, PKCS#8 key DER),
    /// or no certificate. Resumption is off: connections are kept, not redone.
    pub(crate) fn config(
        &self,
        client: Option<(&[u8], &[u8])>,
    ) -> Result<Arc<ClientConfig>, String> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.roots.clone());
        let mut config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(cert.to_vec())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
                )
                .map_err(|e| format!("client certificate: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// A new TCP connection and TLS handshake.
    pub(crate) async fn connect(&self, config: Arc<ClientConfig>) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        TlsConnector::from(config)
            .connect(self.name.clone(), tcp)
            .await
    }
}
