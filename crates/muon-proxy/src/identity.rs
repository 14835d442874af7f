//! This sidecar's identity: an ECDSA P-256 key generated in the process (it never leaves
//! it), and the certificate the control plane's CA signs for it, naming
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The first certificate is asked for with a join token (`--join-token` or
//! `--join-token-file`); each renewal, at about half the certificate's lifetime (with
//! jitter), with the certificate itself over mutual TLS. A renewal that fails is retried
//! with backoff while the certificate is still valid; the old one keeps serving. Certificate
//! and trust bundle are swapped in place ([`Identity::current`]): TLS configurations read
//! them at every handshake, so open connections are never dropped.

use arc_swap::ArcSwapOption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A certificate in use, with what was learned with it.
#[derive(Debug)]
pub struct Certs {
    /// For rustls: the chain and this process's signing key.
    pub certified: Arc<CertifiedKey>,
    /// `spiffe://…`, as the certificate names it.
    pub id: Arc<str>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The certificate's serial number, hex.
    pub serial: String,
    /// Every root the mesh trusts now.
    pub roots: Arc<rustls::RootCertStore>,
    pub bundle_pem: Vec<String>,
    pub chain_pem: Vec<String>,
}

impl Certs {
    /// When to renew: half-way through the lifetime, give or take a tenth of it.
    pub fn renew_at(&self, jitter: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        let frac = (0.5 + (jitter.clamp(-1.0, 1.0) * 0.1)).max(0.1);
        self.not_before + life.mul_f64(frac)
    }

    pub fn expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }
}

/// The key and the current certificate.
pub struct Identity {
    key: rcgen::KeyPair,
    signing: Arc<dyn rustls::sign::SigningKey>,
    current: ArcSwapOption<Certs>,
    /// Bumped at every new certificate or bundle, so TLS configurations know to rebuild
    /// what depends on the bundle.
    generation: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.current().map(|c| c.id.clone()))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("generating the key: {0}")]
    Key(String),
    #[error("the control plane's answer: {0}")]
    Answer(String),
}

impl Identity {
    /// A new key; no certificate yet.
    pub fn generate() -> Result<Arc<Identity>, IdentityError> {
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
        let der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        Ok(Arc::new(Identity {
            key,
            signing,
            current: ArcSwapOption::empty(),
            generation: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// A certificate signing request for this key. It names nothing: the certificate
    /// names the identity the credential proves.
    pub fn csr(&self) -> Result<String, IdentityError> {
        rcgen::CertificateParams::default()
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(|e| IdentityError::Key(e.to_string()))
    }

    /// The certificate in use, if any.
    pub fn current(&self) -> Option<Arc<Certs>> {
        self.current.load_full()
    }

    /// Changes whenever the certificate or the bundle does.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Takes the control plane's answer into use.
    pub fn install(
        &self,
        resp: &muon_api::v1::CertifyResponse,
    ) -> Result<Arc<Certs>, IdentityError> {
        let bad = |m: String| IdentityError::Answer(m);
        let chain: Vec<CertificateDer<'static>> = resp
            .cert_chain_pem
            .iter()
            .map(|p| CertificateDer::from_pem_slice(p.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("the certificate chain: {e}")))?;
        let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
        let cert = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| bad(format!("the certificate: {e}")))?;
        // The certificate must be for this process's key.
        let ours = rcgen::PublicKeyData::subject_public_key_info(&self.key);
        if cert.subject_public_key_info().as_ref() != ours.as_slice() {
            return Err(bad("the certificate is not for this sidecar's key".into()));
        }
        let id: Arc<str> = cert
            .valid_uri_names()
            .find(|u| u.starts_with("spiffe://"))
            .ok_or_else(|| bad("the certificate names no SPIFFE id".into()))?
            .into();
        let mut roots = rustls::RootCertStore::empty();
        for pem in &resp.trust_bundle_pem {
            let der = CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| bad(format!("the trust bundle: {e}")))?;
            roots
                .add(der)
                .map_err(|e| bad(format!("the trust bundle: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("an empty trust bundle".into()));
        }
        let serial = hex(cert.serial());
        let not_after = UNIX_EPOCH + Duration::from_secs(resp.not_after_unix.max(0) as u64);
        let certs = Arc::new(Certs {
            certified: Arc::new(CertifiedKey::new(chain, self.signing.clone())),
            id,
            not_before: SystemTime::now(),
            not_after,
            serial,
            roots: Arc::new(roots),
            bundle_pem: resp.trust_bundle_pem.clone(),
            chain_pem: resp.cert_chain_pem.clone(),
        });
        self.current.store(Some(certs.clone()));
        self.generation.send_modify(|g| *g += 1);
        Ok(certs)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How this sidecar reaches the control plane: its address, and for `https://` the TLS
/// roots (`--ca-bundle`, plus the mesh's bundle once known) and this sidecar's certificate.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// As given (`http://` or `https://`).
    pub url: String,
    /// `--ca-bundle`'s roots, when the control plane speaks TLS.
    pub bootstrap: Option<Arc<rustls::RootCertStore>>,
    pub identity: Option<Arc<Identity>>,
}

impl ControlPlane {
    /// The URL tonic dials (the connector does the TLS).
    pub fn dial_url(&self) -> String {
        match self.url.strip_prefix("https://") {
            Some(rest) => format!("http://{rest}"),
            None => self.url.clone(),
        }
    }

    /// The TLS configuration for a new connection, or `None` for plaintext.
    pub fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        let bootstrap = self.bootstrap.as_ref()?;
        let mut roots = (**bootstrap).clone();
        let resolver = self.identity.as_ref().map(|id| {
            if let Some(c) = id.current() {
                roots.roots.extend(c.roots.roots.iter().cloned());
            }
            Arc::new(Resolver(id.clone())) as Arc<dyn rustls::client::ResolvesClientCert>
        });
        Some(muon_api::connect::tls_config(roots, resolver))
    }

    /// A channel to the control plane, for short calls.
    pub async fn channel(&self, timeout: Duration) -> Result<tonic::transport::Channel, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(self.dial_url())
            .map_err(|e| format!("{}: {e}", self.url))?
            .timeout(timeout)
            .tcp_nodelay(true);
        let connect = muon_api::connect::channel(endpoint.connect_timeout(timeout), self.tls());
        match tokio::time::timeout(timeout * 2, connect).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!(
                "connecting to {}: {}",
                self.url,
                crate::discovery::client::error_chain(&e)
            )),
            Err(_) => Err(format!(
                "connecting to {} took more than {:?}",
                self.url,
                timeout * 2
            )),
        }
    }
}

/// Waits until `identity` has a certificate.
pub async fn certified(identity: &Identity) {
    let mut changes = identity.changes();
    while identity.current().is_none() {
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps this sidecar certified for the life of the process: the first certificate with
/// the join token, each renewal at about half-way with the certificate (over mutual TLS),
/// or with the token again when that is refused or the control plane speaks plaintext.
pub async fn keep_certified(
    cp: ControlPlane,
    identity: Arc<Identity>,
    token: Option<crate::config::JoinToken>,
    ttl: Option<Duration>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let mut backoff =
        crate::discovery::client::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        if let Some(c) = identity.current() {
            let jitter = (crate::http::headers::random() % 2001) as f64 / 1000.0 - 1.0;
            let wait = c
                .renew_at(jitter)
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
        match certify_once(&cp, &identity, token.as_ref(), ttl, TIMEOUT).await {
            Ok(certs) => {
                backoff.reset();
                metrics.certificate("issued");
                let left = certs
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tracing::info!(identity = %certs.id, serial = %certs.serial, valid_for_s = left.as_secs(), "certificate installed");
            }
            Err(e) => {
                metrics.certificate("failed");
                let pause = backoff.next_pause();
                let valid = identity.current().is_some_and(|c| !c.expired());
                tracing::warn!(error = %e, retry_in = ?pause, keeping_current = valid, "could not get a certificate");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

async fn certify_once(
    cp: &ControlPlane,
    identity: &Arc<Identity>,
    token: Option<&crate::config::JoinToken>,
    ttl: Option<Duration>,
    timeout: Duration,
) -> Result<Arc<Certs>, String> {
    use muon_api::v1::certify_request::Credential;
    let channel = cp.channel(timeout).await?;
    let mut client = muon_api::v1::identity_client::IdentityClient::new(channel);
    // With a valid certificate over TLS, the certificate is the credential.
    let by_cert = cp.bootstrap.is_some() && identity.current().is_some_and(|c| !c.expired());
    let csr = identity.csr().map_err(|e| e.to_string())?;
    let ask = |credential: Option<Credential>| muon_api::v1::CertifyRequest {
        csr_pem: csr.clone(),
        credential,
        ttl_seconds: ttl.map_or(0, |t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX)),
    };
    let token = || -> Result<Option<Credential>, String> {
        let Some(t) = token else {
            return Ok(None);
        };
        let value = t.read().map_err(|e| format!("reading the token: {e}"))?;
        Ok(Some(match t {
            crate::config::JoinToken::KubernetesFile(_) => Credential::KubernetesToken(value),
            _ => Credential::JoinToken(value),
        }))
    };
    let answer = match by_cert {
        true => match client.certify(ask(None)).await {
            Ok(r) => Ok(r),
            // Refused (say, a CA rotation made it foreign): try the token.
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                client.certify(ask(token()?)).await
            }
            Err(s) => Err(s),
        },
        false => client.certify(ask(token()?)).await,
    };
    let resp = answer
        .map_err(|s| format!("the control plane refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    identity.install(&resp).map_err(|e| e.to_string())
}

/// The TLS pieces that read the current certificate at every handshake.
#[derive(Debug)]
pub struct Resolver(pub Arc<Identity>);

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.current().is_some()
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| c.certified.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_half_way_with_a_tenth_of_jitter() {
        let id = Identity::generate().unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let certs = Certs {
            certified: Arc::new(CertifiedKey::new(Vec::new(), id.signing.clone())),
            id: "spiffe://cluster.local/ns/a/sa/b".into(),
            not_before: t0,
            not_after: t0 + Duration::from_secs(1000),
            serial: String::new(),
            roots: Arc::new(rustls::RootCertStore::empty()),
            bundle_pem: Vec::new(),
            chain_pem: Vec::new(),
        };
        assert_eq!(certs.renew_at(0.0), t0 + Duration::from_secs(500));
        assert_eq!(certs.renew_at(1.0), t0 + Duration::from_secs(600));
        assert_eq!(certs.renew_at(-1.0), t0 + Duration::from_secs(400));
        assert!(id.csr().unwrap().contains("CERTIFICATE REQUEST"));
    }
}
