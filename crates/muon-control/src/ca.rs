//! The mesh's certificate authority: it signs sidecars' keys into short-lived certificates
//! naming their SPIFFE identity, and mints and checks the join tokens that prove an identity
//! outside Kubernetes.
//!
//! Its key is either generated on first start and kept with the store
//! (`<data-dir>/ca/root-key.pem`, mode 0600, beside `root-cert.pem`), so the root is the same
//! across restarts, or given (`--ca-cert`, `--ca-key`): a root, or an intermediate followed by
//! its chain up to the root. The trust bundle sidecars get is that root, plus any
//! `--extra-roots` (a CA rotation: trust the new root everywhere before it signs).
//!
//! A certificate names exactly the identity the caller proved; whatever the CSR asks for
//! (subject, SANs) is ignored. Join tokens are `muon1.<payload>.<HMAC-SHA256>`, keyed by a
//! secret of this control plane (`<data-dir>/ca/token-key`): a token from another control
//! plane, altered or expired, is refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use muon_core::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Clock skew between the control plane and sidecars that a new certificate tolerates.
const BACKDATE: Duration = Duration::from_secs(300);
/// A generated root's lifetime.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const TOKEN_PREFIX: &str = "muon1";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

/// Why a join token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a Muon join token")]
    Malformed,
    #[error("the join token was not issued by this control plane (or was altered)")]
    Foreign,
    #[error("the join token expired {0} s ago")]
    Expired(u64),
    #[error("the join token is for trust domain {0:?}, not this mesh's")]
    OtherTrustDomain(String),
}

impl TokenError {
    /// For the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed-token",
            TokenError::Foreign => "foreign-token",
            TokenError::Expired(_) => "expired-token",
            TokenError::OtherTrustDomain(_) => "other-trust-domain",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CaConfig {
    pub data_dir: PathBuf,
    pub trust_domain: String,
    /// The signing CA's certificate, then its chain to the root (PEM), and its key.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Roots to trust besides this CA's (a rotation).
    pub extra_roots: Option<PathBuf>,
    /// The longest (and default) certificate lifetime.
    pub cert_ttl: Duration,
}

/// A signed certificate and what the sidecar needs with it.
#[derive(Debug, Clone)]
pub struct Certified {
    /// The certificate, then the CA's chain, PEM.
    pub chain: Vec<String>,
    pub bundle: Vec<String>,
    pub not_after: SystemTime,
}

pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The signing CA's certificate and its issuers, PEM: sent after every certificate.
    chain: Vec<String>,
    bundle: Vec<String>,
    cert_ttl: Duration,
    token_key: ring::hmac::Key,
    /// Where the key came from, for the start-up log.
    pub origin: String,
}

/// The signing CA's certificate chain and key (PEM), and where they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// The signing CA's certificate, then its chain to the root.
    pub chain: String,
    pub key: String,
    /// For the start-up log.
    pub origin: String,
    /// It was given by `--ca-cert`/`--ca-key` (not generated).
    pub given: bool,
}

impl Root {
    /// The CA of this control plane alone: `--ca-cert`/`--ca-key`, or the root kept in the
    /// data directory (generated on first start).
    pub fn local(cfg: &CaConfig) -> Result<Root, CaError> {
        let dir = cfg.data_dir.join("ca");
        std::fs::create_dir_all(&dir).map_err(|source| CaError::Io {
            path: dir.clone(),
            source,
        })?;
        let (chain, key, origin, given) = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => (
                read(cert)?,
                read(key)?,
                format!("--ca-cert {}", cert.display()),
                true,
            ),
            (None, None) => {
                let (cert, key) = (dir.join("root-cert.pem"), dir.join("root-key.pem"));
                if !key.exists() {
                    let (c, k) = generate_root(&cfg.trust_domain)?;
                    write_private(&key, &k)?;
                    write_private(&cert, &c)?;
                    tracing::info!(dir = %dir.display(), "generated the mesh's root CA");
                }
                (
                    read(&cert)?,
                    read(&key)?,
                    format!("{}", cert.display()),
                    false,
                )
            }
            _ => {
                return Err(CaError::Invalid(
                    "--ca-cert and --ca-key go together".into(),
                ))
            }
        };
        Ok(Root {
            chain,
            key,
            origin,
            given,
        })
    }
}

impl Ca {
    /// Loads (or, on first start, creates) the CA of this control plane alone.
    pub fn open(cfg: &CaConfig) -> Result<Ca, CaError> {
        Ca::with_root(cfg, Root::local(cfg)?)
    }

    /// The CA signing with `root` (e.g. the one every replica shares).
    pub fn with_root(cfg: &CaConfig, root: Root) -> Result<Ca, CaError> {
        let dir = cfg.data_dir.join("ca");
        std::fs::create_dir_all(&dir).map_err(|source| CaError::Io {
            path: dir.clone(),
            source,
        })?;
        let Root {
            chain, key, origin, ..
        } = root;
        let certs = pem_certs(&chain)?;
        let first = certs
            .first()
            .ok_or_else(|| CaError::Invalid(format!("{origin}: no certificate in the file")))?;
        let signing_key =
            KeyPair::from_pem(&key).map_err(|e| CaError::Invalid(format!("the CA key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(first, signing_key)
            .map_err(|e| CaError::Invalid(format!("{origin}: {e}")))?;
        let mut bundle = vec![certs.last().cloned().unwrap_or_default()];
        if let Some(extra) = &cfg.extra_roots {
            bundle.extend(pem_certs(&read(extra)?)?);
        }
        Ok(Ca {
            trust_domain: cfg.trust_domain.clone(),
            issuer,
            chain: certs,
            bundle,
            cert_ttl: cfg.cert_ttl,
            token_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &token_key(&dir)?),
            origin,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots the mesh trusts, PEM.
    pub fn bundle(&self) -> &[String] {
        &self.bundle
    }

    /// The longest certificate lifetime.
    pub fn cert_ttl(&self) -> Duration {
        self.cert_ttl
    }

    /// Signs the key of `csr_pem` into a certificate for `id` (at most `cert_ttl`).
    pub fn certify(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<Certified, CaError> {
        if id.trust_domain != self.trust_domain {
            return Err(CaError::Invalid(format!(
                "{id} is not in this mesh's trust domain {:?}",
                self.trust_domain
            )));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Invalid(format!("the CSR: {e}")))?;
        // A CSR may name the identity it expects; it must be the proven one.
        let want = id.to_string();
        for san in &csr.params.subject_alt_names {
            if let SanType::URI(uri) = san {
                if uri.as_str() != want {
                    return Err(CaError::Mismatch(format!(
                        "the CSR asks for {}, but the credential proves {want}",
                        uri.as_str()
                    )));
                }
            }
        }
        let ttl = ttl.map_or(self.cert_ttl, |t| t.min(self.cert_ttl));
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e| CaError::Invalid(format!("{id}: {e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial()?);
        params.not_before = offset(now.checked_sub(BACKDATE).unwrap_or(now));
        let not_after = now + ttl;
        params.not_after = offset(not_after);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok(Certified {
            chain,
            bundle: self.bundle.clone(),
            not_after,
        })
    }

    /// A join token for `id`, valid for `ttl`; its expiry.
    pub fn create_token(&self, id: &SpiffeId, ttl: Duration) -> (String, SystemTime) {
        let now = unix(SystemTime::now());
        let exp = now + ttl.as_secs();
        let payload = serde_json::json!({
            "td": id.trust_domain,
            "ns": id.namespace,
            "sa": id.service_account,
            "iat": now,
            "exp": exp,
        });
        let body = format!("{TOKEN_PREFIX}.{}", B64.encode(payload.to_string()));
        let mac = ring::hmac::sign(&self.token_key, body.as_bytes());
        (
            format!("{body}.{}", B64.encode(mac.as_ref())),
            UNIX_EPOCH + Duration::from_secs(exp),
        )
    }

    /// The identity a join token proves.
    pub fn check_token(&self, token: &str) -> Result<SpiffeId, TokenError> {
        let token = token.trim();
        let (body, mac) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let payload = body
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|p| p.strip_prefix('.'))
            .ok_or(TokenError::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| TokenError::Malformed)?;
        ring::hmac::verify(&self.token_key, body.as_bytes(), &mac)
            .map_err(|_| TokenError::Foreign)?;
        let payload: serde_json::Value = B64
            .decode(payload)
            .ok()
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or(TokenError::Malformed)?;
        let field = |k: &str| payload[k].as_str().unwrap_or_default();
        let exp = payload["exp"].as_u64().ok_or(TokenError::Malformed)?;
        let now = unix(SystemTime::now());
        if now >= exp {
            return Err(TokenError::Expired(now - exp));
        }
        if field("td") != self.trust_domain {
            return Err(TokenError::OtherTrustDomain(field("td").to_owned()));
        }
        SpiffeId::new(field("td"), field("ns"), field("sa")).map_err(|_| TokenError::Malformed)
    }

    /// An administrator's certificate and key (`spiffe://<td>/muon/admin/<name>`), valid for
    /// `ttl`: what `muonctl` presents to the management API.
    pub fn admin_certificate(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<(Vec<String>, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            crate::auth::admin_uri(&self.trust_domain, name)
                .try_into()
                .map_err(|e| CaError::Invalid(format!("{e}")))?,
        )];
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("muon admin {name}"));
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial()?);
        let now = SystemTime::now();
        params.not_before = offset(now.checked_sub(BACKDATE).unwrap_or(now));
        params.not_after = offset(now + ttl);
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }

    /// A certificate and key for the control plane's own gRPC port: DNS names and IPs in
    /// `names`, and the control plane's SPIFFE id.
    pub fn serving_certificate(&self, names: &[String]) -> Result<(Vec<String>, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.subject_alt_names.push(SanType::URI(
            format!("spiffe://{}/muon-control", self.trust_domain)
                .try_into()
                .map_err(|e| CaError::Invalid(format!("{e}")))?,
        ));
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "muon-control");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial()?);
        let now = SystemTime::now();
        params.not_before = offset(now.checked_sub(BACKDATE).unwrap_or(now));
        params.not_after = offset(now + ROOT_LIFETIME.min(Duration::from_secs(365 * 24 * 3600)));
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }
}

fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, "Muon mesh root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(serial()?);
    let now = SystemTime::now();
    params.not_before = offset(now.checked_sub(BACKDATE).unwrap_or(now));
    params.not_after = offset(now + ROOT_LIFETIME);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Every certificate in a PEM file, each as PEM.
fn pem_certs(pem: &str) -> Result<Vec<String>, CaError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = der.map_err(|e| CaError::Invalid(format!("a certificate: {e}")))?;
        out.push(to_pem("CERTIFICATE", &der));
    }
    Ok(out)
}

fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The token key: 32 random bytes, created on first start.
fn token_key(dir: &Path) -> Result<Vec<u8>, CaError> {
    let path = dir.join("token-key");
    match std::fs::read(&path) {
        Ok(k) if k.len() == 32 => Ok(k),
        Ok(_) => Err(CaError::Invalid(format!(
            "{} is not a token key (32 bytes); remove it to make a new one (tokens issued so far stop working)",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut k = vec![0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut k)
                .map_err(|_| CaError::Invalid("no randomness for the token key".into()))?;
            write_private(&path, &k)?;
            Ok(k)
        }
        Err(source) => Err(CaError::Io { path, source }),
    }
}

fn serial() -> Result<SerialNumber, CaError> {
    let mut s = vec![0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut s)
        .map_err(|_| CaError::Invalid("no randomness for a serial number".into()))?;
    s[0] &= 0x7f; // positive
    Ok(SerialNumber::from(s))
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix(t) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file only its owner can read (a key), durably: temporary file, fsync, rename.
pub fn write_private(path: &Path, data: impl AsRef<[u8]>) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data.as_ref()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn ca(dir: &Path) -> Ca {
        Ca::open(&CaConfig {
            data_dir: dir.to_owned(),
            trust_domain: "cluster.local".into(),
            cert_file: None,
            key_file: None,
            extra_roots: None,
            cert_ttl: Duration::from_secs(3600),
        })
        .unwrap()
    }

    fn csr_for(uri: Option<&str>) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["pretend.example".to_string()]).unwrap();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.to_string().try_into().unwrap()));
        }
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn csr() -> String {
        csr_for(None)
    }

    #[test]
    fn the_root_is_kept_and_a_certificate_names_the_proven_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let first = ca(dir.path());
        let again = ca(dir.path());
        assert_eq!(
            first.bundle(),
            again.bundle(),
            "the root survives a restart"
        );
        let key_mode = std::fs::metadata(dir.path().join("ca/root-key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            0o600
        );

        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        let c = again
            .certify(&csr(), &id, Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(c.chain.len(), 2);
        let der = rustls_pki_types::CertificateDer::from_pem_slice(c.chain[0].as_bytes()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<String> = x509
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, ["URI(spiffe://cluster.local/ns/shop/sa/orders)"]);
        let lifetime =
            x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
        assert!(lifetime <= 60 + 300, "{lifetime}");
        // Chains to the root.
        let root =
            rustls_pki_types::CertificateDer::from_pem_slice(first.bundle()[0].as_bytes()).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&root).unwrap();
        assert!(x509.verify_signature(Some(root.public_key())).is_ok());

        // A CSR that asks for another identity than the proven one is refused; one that asks
        // for the proven one is fine.
        let other = csr_for(Some("spiffe://cluster.local/ns/kube-system/sa/admin"));
        assert!(matches!(
            again.certify(&other, &id, None),
            Err(CaError::Mismatch(_))
        ));
        let same = csr_for(Some("spiffe://cluster.local/ns/shop/sa/orders"));
        assert!(again.certify(&same, &id, None).is_ok());
        let foreign = SpiffeId::parse("spiffe://other.mesh/ns/shop/sa/orders").unwrap();
        assert!(again.certify(&csr(), &foreign, None).is_err());
        assert!(again.certify("not a csr", &id, None).is_err());
    }

    #[test]
    fn join_tokens_prove_their_identity_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        let (token, _) = ca.create_token(&id, Duration::from_secs(60));
        assert_eq!(ca.check_token(&token), Ok(id.clone()));

        let other = tempfile::tempdir().unwrap();
        let foreign = super::tests::ca(other.path());
        assert_eq!(foreign.check_token(&token), Err(TokenError::Foreign));

        let (body, mac) = token.rsplit_once('.').unwrap();
        let (prefix, _) = body.split_once('.').unwrap();
        let forged_payload = B64.encode(
            serde_json::json!({"td": "cluster.local", "ns": "shop", "sa": "admin", "iat": 0, "exp": u64::MAX})
                .to_string(),
        );
        assert_eq!(
            ca.check_token(&format!("{prefix}.{forged_payload}.{mac}")),
            Err(TokenError::Foreign)
        );
        let (expired, _) = ca.create_token(&id, Duration::ZERO);
        assert!(matches!(
            ca.check_token(&expired),
            Err(TokenError::Expired(_))
        ));
        assert_eq!(ca.check_token("garbage"), Err(TokenError::Malformed));
    }
}
