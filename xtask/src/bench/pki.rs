//! The test PKI of `--mode mtls`: one ECDSA P-256 root and, for each side of a pair, a leaf
//! whose URI SAN is the side's SPIFFE id (`spiffe://cluster.local/ns/bench/sa/<side>`), the
//! same shape as the certificates Muon's control plane issues.
//!
//! Envoy checks the URI SAN of the other side. HAProxy and nginx cannot match a URI SAN, so
//! each leaf also carries a DNS SAN (and CN), `<side>.bench.svc.cluster.local`, which their
//! client sides check (`verifyhost`, `proxy_ssl_name`). Both leaves may serve and be clients
//! (extended key usage serverAuth and clientAuth).
//!
//! Generated once per run (rcgen), written to `pki/` of the results directory, and installed
//! into each side's run directory for the proxy there (the key readable by the proxy's user
//! only). Test material: nothing else trusts this root, and it lives seven days.

use super::peers::Side;
use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "bench";

/// The side's SPIFFE id: its certificate's URI SAN.
pub fn spiffe_id(side: Side) -> String {
    format!(
        "spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}",
        side.as_str()
    )
}

/// The side's DNS SAN, for the peers that verify names and not URIs.
pub fn dns_name(side: Side) -> String {
    format!("{}.{NAMESPACE}.svc.{TRUST_DOMAIN}", side.as_str())
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The run's root and the two leaves it signed.
#[derive(Clone)]
pub struct TestPki {
    pub ca_pem: String,
    pub client: Leaf,
    pub server: Leaf,
}

/// Where one side's proxy finds its TLS files (in its own run directory).
#[derive(Debug, Clone)]
pub struct SideTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate followed by its key, for HAProxy's `crt`.
    pub cert_and_key: PathBuf,
}

impl SideTls {
    /// The file names `install` writes in `dir`.
    pub fn in_dir(dir: &Path) -> SideTls {
        SideTls {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            cert_and_key: dir.join("cert-and-key.pem"),
        }
    }
}

impl TestPki {
    pub fn generate() -> Result<TestPki> {
        let now = SystemTime::now();
        let not_before = now - Duration::from_secs(3600);
        let not_after = now + Duration::from_secs(7 * 24 * 3600);

        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::CommonName, "muon bench test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.not_before = not_before.into();
        ca.not_after = not_after.into();
        let ca_cert = ca.self_signed(&ca_key).context("signing the test root")?;
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |side: Side| -> Result<Leaf> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut p = CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name
                .push(DnType::CommonName, dns_name(side));
            p.subject_alt_names = vec![
                SanType::URI(spiffe_id(side).try_into()?),
                SanType::DnsName(dns_name(side).try_into()?),
            ];
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.use_authority_key_identifier_extension = true;
            p.not_before = not_before.into();
            p.not_after = not_after.into();
            let cert = p
                .signed_by(&key, &issuer)
                .with_context(|| format!("signing the {} leaf", side.as_str()))?;
            Ok(Leaf {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
        };
        Ok(TestPki {
            ca_pem: ca_cert.pem(),
            client: leaf(Side::Client)?,
            server: leaf(Side::Server)?,
        })
    }

    pub fn leaf(&self, side: Side) -> &Leaf {
        match side {
            Side::Client => &self.client,
            Side::Server => &self.server,
        }
    }

    /// The run's copy, kept with its results: `ca.pem`, `<side>.pem`, `<side>.key`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.pem"), &self.ca_pem)?;
        for side in [Side::Client, Side::Server] {
            let l = self.leaf(side);
            std::fs::write(dir.join(format!("{}.pem", side.as_str())), &l.cert_pem)?;
            write_private(
                &dir.join(format!("{}.key", side.as_str())),
                &l.key_pem,
                None,
            )?;
        }
        Ok(())
    }

    /// Writes one side's files into its proxy's directory; the key files belong to `uid`
    /// (the proxy's user) and no one else may read them.
    pub fn install(&self, side: Side, dir: &Path, uid: u32) -> Result<SideTls> {
        let files = SideTls::in_dir(dir);
        let l = self.leaf(side);
        std::fs::write(&files.ca, &self.ca_pem)?;
        std::fs::write(&files.cert, &l.cert_pem)?;
        for f in [&files.ca, &files.cert] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644))?;
        }
        write_private(&files.key, &l.key_pem, Some(uid))?;
        write_private(
            &files.cert_and_key,
            &format!("{}{}", l.cert_pem, l.key_pem),
            Some(uid),
        )?;
        Ok(files)
    }
}

fn write_private(path: &Path, text: &str, owner: Option<u32>) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(uid) = owner {
        nix::unistd::chown(path, Some(uid.into()), Some(uid.into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    #[test]
    fn leaves_carry_the_spiffe_id_and_a_dns_name_and_name_the_root_as_issuer() {
        let pki = TestPki::generate().unwrap();
        let (_, ca) = x509_parser::pem::parse_x509_pem(pki.ca_pem.as_bytes()).unwrap();
        let ca = ca.parse_x509().unwrap();
        assert!(ca.is_ca());
        for side in [Side::Client, Side::Server] {
            let (_, pem) =
                x509_parser::pem::parse_x509_pem(pki.leaf(side).cert_pem.as_bytes()).unwrap();
            let cert = pem.parse_x509().unwrap();
            assert!(!cert.is_ca());
            assert_eq!(cert.issuer(), ca.subject());
            let san = cert.subject_alternative_name().unwrap().unwrap();
            let names: Vec<String> = san
                .value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => format!("uri:{u}"),
                    GeneralName::DNSName(d) => format!("dns:{d}"),
                    other => format!("{other:?}"),
                })
                .collect();
            assert_eq!(
                names,
                [
                    format!("uri:spiffe://cluster.local/ns/bench/sa/{}", side.as_str()),
                    format!("dns:{}.bench.svc.cluster.local", side.as_str()),
                ]
            );
            assert!(pki.leaf(side).key_pem.contains("BEGIN PRIVATE KEY"));
        }
    }
}
