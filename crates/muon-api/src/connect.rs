//! Connecting to the control plane's gRPC port: plaintext (a control plane run with
//! `--insecure-plaintext`), or TLS 1.3 with the mesh's trust bundle and, when the caller has
//! one, a client certificate (an administrator's, or a sidecar's mesh certificate).
//!
//! The control plane's certificate names its addresses (and `--tls-san` names), so the host
//! of the URL is what is checked.

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::transport::{Channel, Endpoint, Uri};

/// A TLS client configuration for the control plane: TLS 1.3, ALPN h2, the servers `roots`
/// trusts, and `client` (when given) to present.
pub fn tls_config(
    roots: rustls::RootCertStore,
    client: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("the ring provider supports TLS 1.3")
    .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Every certificate in a PEM file, as roots.
pub fn roots_from_pem(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| format!("a certificate: {e}"))?;
        roots.add(der).map_err(|e| format!("a certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(roots)
}

/// An administrator credential directory, as the control plane writes it
/// (`<data-dir>/admin`): `ca.pem` (the trust bundle), `cert.pem` and `key.pem`.
pub fn admin_tls(dir: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let roots = roots_from_pem(&read("ca.pem")?)
        .map_err(|e| format!("{}: {e}", dir.join("ca.pem").display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read("cert.pem")?)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", dir.join("cert.pem").display()))?;
    let key = PrivateKeyDer::from_pem_slice(&read("key.pem")?)
        .map_err(|e| format!("{}: {e}", dir.join("key.pem").display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: {e}", dir.join("key.pem").display()))?;
    let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, signing));
    Ok(tls_config(roots, Some(Arc::new(Fixed(certified)))))
}

/// Always the same client certificate.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Connects `endpoint`: over TLS with `tls`, else plaintext.
pub async fn channel(
    endpoint: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => endpoint.connect().await,
        Some(config) => endpoint.connect_with_connector(TlsConnect(config)).await,
    }
}

/// TCP, then TLS to the URI's host.
#[derive(Clone)]
struct TlsConnect(Arc<rustls::ClientConfig>);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TlsConnect {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.0.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("the control plane's URL has no host")?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(crate::DEFAULT_PORT);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}
