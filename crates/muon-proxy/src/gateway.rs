//! Gateway mode (`--mode gateway`): the edge of the mesh. Clients outside it connect to
//! `--listen` (no capture); each connection is HTTP/1.1 or HTTP/2 (over TLS when a
//! certificate and key are given, with ALPN), and each request is routed by the HTTPRoutes
//! (and GRPCRoutes) attached to the `--gateway` object, hostnames included, then forwarded
//! into the mesh like an outbound request (`crate::http::forward::gateway`).

use crate::accesslog::Record;
use crate::config::GatewayConfig;
use crate::detect::{self, Detected, Prefixed};
use crate::http::{self, ConnCx, ConnKind};
use crate::{Outcome, Shared};
use ::http::Version;
use bytes::BytesMut;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The TLS acceptor for `--tls-cert` and `--tls-key` (ALPN: h2, then http/1.1), or `None`
/// without them. Read once at start: a bad file stops the start with its path.
pub fn tls_acceptor(config: &GatewayConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some((cert, key)) = &config.tls else {
        return Ok(None);
    };
    let file_err = |path: &Path, reason: String| TlsError::File {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(cert, "no PEM certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// One client connection to a gateway listener.
pub async fn handle(shared: &Arc<Shared>, stream: TcpStream, rec: &mut Record) -> Outcome {
    let wait = shared.http.header_read_timeout;
    match &shared.tls {
        Some(acceptor) => {
            let tls = match tokio::time::timeout(wait, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    return Outcome::Error;
                }
                Err(_) => return Outcome::IdleTimeout,
            };
            let version = match tls.get_ref().1.alpn_protocol() {
                Some(b"h2") => Version::HTTP_2,
                _ => Version::HTTP_11,
            };
            serve(shared, tls, version, "https", rec).await
        }
        None => {
            let mut stream = stream;
            let mut buf = BytesMut::new();
            let detected = match detect::sniff(&mut stream, &mut buf, wait).await {
                Ok(d) => d,
                Err(e) => {
                    debug!(error = %e, "reading the first bytes failed");
                    return Outcome::Error;
                }
            };
            let version = match detected {
                Detected::Http2 => Version::HTTP_2,
                Detected::Timeout => return Outcome::IdleTimeout,
                // Anything else gets HTTP/1.1's answer (400 for what is not HTTP).
                _ => Version::HTTP_11,
            };
            serve(
                shared,
                Prefixed::new(buf.freeze(), stream),
                version,
                "http",
                rec,
            )
            .await
        }
    }
}

async fn serve<I>(
    shared: &Arc<Shared>,
    io: I,
    version: Version,
    scheme: &'static str,
    rec: &mut Record,
) -> Outcome
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    rec.service = shared.gateway.clone();
    let cx = ConnCx::new(shared.clone(), rec, version, ConnKind::Gateway { scheme });
    http::serve(io, cx, rec, shared.drain.watch()).await
}
