//! Mutual TLS between sidecars (TLS 1.3, rustls).
//!
//! The client side checks the server's chain against the mesh's trust bundle and then that
//! its SPIFFE id is the one the control plane gave the endpoint: a hijacked address cannot
//! pass for a service. Nothing of the app's is sent before that check. The server side
//! requires a client certificate from the mesh and learns the caller's identity from it.
//! ALPN marks mesh traffic and says what is inside: the sidecars' pooled HTTP/2
//! ([`muon_core::ports::ALPN_MESH_H2`]) or the app's bytes ([`ALPN_MESH_TCP`]).
//!
//! Certificates are read at every handshake (see `identity::Resolver`); configurations that
//! hold the trust bundle are rebuilt when it changes, so a renewal or a CA rotation drops no
//! connection.

use crate::identity::{Identity, Resolver};
use arc_swap::ArcSwap;
use muon_core::ports::{ALPN_MESH_H2, ALPN_MESH_TCP};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// What is carried inside a mesh connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    Http2,
    Tcp,
}

impl Inner {
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Inner::Http2 => ALPN_MESH_H2,
            Inner::Tcp => ALPN_MESH_TCP,
        }
    }

    pub fn from_alpn(p: &[u8]) -> Option<Inner> {
        match p {
            _ if p == ALPN_MESH_H2 => Some(Inner::Http2),
            _ if p == ALPN_MESH_TCP => Some(Inner::Tcp),
            _ => None,
        }
    }
}

/// Both ends of a mesh connection and its TLS, for access events.
#[derive(Debug, Clone, Default)]
pub struct Identities {
    pub src: Option<Arc<str>>,
    pub dst: Option<Arc<str>>,
    pub version: &'static str,
    pub cipher: &'static str,
}

impl Identities {
    /// Adds the identity fields to an access event.
    pub fn log(&self, l: &mut crate::jsonlog::Line<'_>) {
        l.str("src_identity", self.src.as_deref().unwrap_or(""));
        l.str("dst_identity", self.dst.as_deref().unwrap_or(""));
        l.str("tls_version", self.version);
        l.str("tls_cipher", self.cipher);
    }
}

/// The version and cipher suite of a finished TLS handshake.
pub fn negotiated<C>(conn: &rustls::ConnectionCommon<C>) -> (&'static str, &'static str) {
    (
        version_name(conn.protocol_version()),
        cipher_name(conn.negotiated_cipher_suite()),
    )
}

/// The peer of a mesh connection, as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// `spiffe://td/ns/NS/sa/SA`.
    pub id: Arc<str>,
    /// `td/ns/NS/sa/SA`: how policies name it.
    pub principal: Arc<str>,
    pub namespace: Arc<str>,
    /// `TLSv1_3`, and the cipher suite.
    pub version: &'static str,
    pub cipher: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate yet: the control plane has not certified this sidecar")]
    NoCertificate,
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("the endpoint presented {got}, not {want}")]
    WrongIdentity { want: String, got: String },
    #[error("the peer presented no SPIFFE id")]
    NoIdentity,
    #[error("the peer spoke no mesh protocol (ALPN)")]
    NotMesh,
}

impl TlsError {
    /// For the `muon_tls_connections_total` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::NoCertificate => "no-certificate",
            TlsError::Handshake(e) => handshake_reason(e),
            TlsError::WrongIdentity { .. } => "wrong-identity",
            TlsError::NoIdentity => "no-identity",
            TlsError::NotMesh => "not-mesh",
        }
    }
}

/// Why a handshake failed, for the metric: the peer's certificate was missing, expired,
/// from another CA or otherwise bad, or something else (`handshake`).
fn handshake_reason(e: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => "peer-no-certificate",
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::UnknownIssuer => "unknown-ca",
            _ => "bad-certificate",
        },
        _ => "handshake",
    }
}

/// The sidecar's mesh TLS configurations.
pub struct MeshTls {
    identity: Arc<Identity>,
    h2: ArcSwap<rustls::ClientConfig>,
    tcp: ArcSwap<rustls::ClientConfig>,
    server: ArcSwap<rustls::ServerConfig>,
    /// The identity generation the configurations were built for.
    built: AtomicU64,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("identity", &self.identity)
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl MeshTls {
    pub fn new(identity: Arc<Identity>) -> Arc<MeshTls> {
        let roots = Arc::new(rustls::RootCertStore::empty());
        let (h2, tcp, server) = build(&identity, roots);
        Arc::new(MeshTls {
            identity,
            h2: ArcSwap::from_pointee(h2),
            tcp: ArcSwap::from_pointee(tcp),
            server: ArcSwap::from_pointee(server),
            built: AtomicU64::new(u64::MAX),
        })
    }

    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// Whether this sidecar can speak mesh TLS (it has a certificate).
    pub fn ready(&self) -> bool {
        self.identity.current().is_some()
    }

    /// This sidecar's SPIFFE id, once certified.
    pub fn own_id(&self) -> Option<Arc<str>> {
        self.identity.current().map(|c| c.id.clone())
    }

    /// Rebuilds the configurations when the trust bundle may have changed.
    fn refresh(&self) {
        let now = *self.identity.changes().borrow();
        if self.built.swap(now, Ordering::AcqRel) == now {
            return;
        }
        let roots = self
            .identity
            .current()
            .map(|c| c.roots.clone())
            .unwrap_or_else(|| Arc::new(rustls::RootCertStore::empty()));
        let (h2, tcp, server) = build(&self.identity, roots);
        self.h2.store(Arc::new(h2));
        self.tcp.store(Arc::new(tcp));
        self.server.store(Arc::new(server));
    }

    /// Mutual TLS to a peer sidecar at `ip` that must be `want` (a SPIFFE id).
    pub async fn connect<S>(
        &self,
        io: S,
        ip: IpAddr,
        want: &str,
        inner: Inner,
    ) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if !self.ready() {
            return Err(TlsError::NoCertificate);
        }
        self.refresh();
        let config = match inner {
            Inner::Http2 => self.h2.load_full(),
            Inner::Tcp => self.tcp.load_full(),
        };
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(ip.into()), io)
            .await
            .map_err(TlsError::Handshake)?;
        let got = peer_id(tls.get_ref().1.peer_certificates()).ok_or(TlsError::NoIdentity)?;
        if &*got != want {
            return Err(TlsError::WrongIdentity {
                want: want.to_owned(),
                got: got.to_string(),
            });
        }
        Ok(tls)
    }

    /// Terminates a peer sidecar's mutual TLS: the stream, who it is and what it carries.
    pub async fn accept<S>(
        &self,
        io: S,
    ) -> Result<(tokio_rustls::server::TlsStream<S>, Peer, Inner), TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if !self.ready() {
            return Err(TlsError::NoCertificate);
        }
        self.refresh();
        let tls = tokio_rustls::TlsAcceptor::from(self.server.load_full())
            .accept(io)
            .await
            .map_err(TlsError::Handshake)?;
        let conn = tls.get_ref().1;
        let inner = conn
            .alpn_protocol()
            .and_then(Inner::from_alpn)
            .ok_or(TlsError::NotMesh)?;
        let id = peer_id(conn.peer_certificates()).ok_or(TlsError::NoIdentity)?;
        let parsed = muon_core::identity::SpiffeId::parse(&id).map_err(|_| TlsError::NoIdentity)?;
        let peer = Peer {
            principal: parsed.principal().into(),
            namespace: parsed.namespace.as_str().into(),
            id,
            version: version_name(conn.protocol_version()),
            cipher: cipher_name(conn.negotiated_cipher_suite()),
        };
        Ok((tls, peer, inner))
    }
}

fn build(
    identity: &Arc<Identity>,
    roots: Arc<rustls::RootCertStore>,
) -> (
    rustls::ClientConfig,
    rustls::ClientConfig,
    rustls::ServerConfig,
) {
    let client = |inner: Inner| {
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported by the ring provider")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MeshServerVerifier {
                roots: roots.clone(),
                provider: provider(),
            }))
            .with_client_cert_resolver(Arc::new(Resolver(identity.clone())));
        c.alpn_protocols = vec![inner.alpn().to_vec()];
        c
    };
    let verifier = match roots.is_empty() {
        // No bundle yet: refuse every client (there is no certificate to serve with anyway).
        true => Arc::new(rustls::server::NoClientAuth)
            as Arc<dyn rustls::server::danger::ClientCertVerifier>,
        false => {
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map(|v| v as Arc<dyn rustls::server::danger::ClientCertVerifier>)
                .unwrap_or_else(|_| Arc::new(rustls::server::NoClientAuth))
        }
    };
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported by the ring provider")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(identity.clone())));
    server.alpn_protocols = vec![ALPN_MESH_H2.to_vec(), ALPN_MESH_TCP.to_vec()];
    (client(Inner::Http2), client(Inner::Tcp), server)
}

/// The SPIFFE id a verified leaf certificate names.
fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<Arc<str>> {
    let leaf = certs?.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    let id = cert
        .valid_uri_names()
        .find(|u| u.starts_with("spiffe://"))?;
    Some(id.into())
}

fn version_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "",
    }
}

fn cipher_name(c: Option<rustls::SupportedCipherSuite>) -> &'static str {
    c.and_then(|c| c.suite().as_str()).unwrap_or("")
}

/// Checks a server's chain against the mesh's roots; its name is checked after the
/// handshake against the identity the control plane gave the endpoint (a mesh certificate
/// has no DNS name to check).
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::InvalidCertificate(webpki_error(e)))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn webpki_error(e: webpki::Error) -> rustls::CertificateError {
    use rustls::CertificateError as C;
    match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    }
}
