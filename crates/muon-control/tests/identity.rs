//! The control plane's identity work end to end over real TLS (issue 9): the CA, join
//! tokens, certificates, and who may call what.

use muon_api::connect;
use muon_api::v1::discovery_client::DiscoveryClient;
use muon_api::v1::identity_client::IdentityClient;
use muon_api::v1::management_client::ManagementClient;
use muon_api::v1::{self, certify_request::Credential};
use muon_control::{Config, Server};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

async fn start(dir: &Path) -> Server {
    let mut config = Config::for_tests(dir);
    config.insecure_plaintext = false;
    Server::start(&config).await.unwrap()
}

fn endpoint(server: &Server) -> Endpoint {
    Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
}

async fn tls_channel(server: &Server, config: Arc<rustls::ClientConfig>) -> Channel {
    connect::channel(endpoint(server), Some(config))
        .await
        .unwrap()
}

fn bundle(dir: &Path) -> rustls::RootCertStore {
    connect::roots_from_pem(&std::fs::read(dir.join("ca/trust-bundle.pem")).unwrap()).unwrap()
}

/// A sidecar's side: a key, a CSR, and a client config presenting what Certify returned.
struct Sidecar {
    key: rcgen::KeyPair,
}

impl Sidecar {
    fn new() -> Sidecar {
        Sidecar {
            key: rcgen::KeyPair::generate().unwrap(),
        }
    }

    fn csr(&self, uri: Option<&str>) -> String {
        let mut params = rcgen::CertificateParams::default();
        if let Some(u) = uri {
            params.subject_alt_names = vec![rcgen::SanType::URI(u.to_string().try_into().unwrap())];
        }
        params.serialize_request(&self.key).unwrap().pem().unwrap()
    }

    fn client(&self, dir: &Path, chain: &[String]) -> Arc<rustls::ClientConfig> {
        let chain: Vec<CertificateDer<'static>> = chain
            .iter()
            .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
            .collect();
        let key = PrivateKeyDer::try_from(self.key.serialize_der()).unwrap();
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&key).unwrap();
        let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, signing));
        connect::tls_config(bundle(dir), Some(Arc::new(Always(certified))))
    }
}

#[derive(Debug)]
struct Always(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Always {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn list() -> v1::ListRequest {
    v1::ListRequest::default()
}

#[tokio::test]
async fn tokens_certificates_and_the_admin_credential_decide_who_may_do_what() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let admin = tls_channel(
        &server,
        connect::admin_tls(&dir.path().join("admin")).unwrap(),
    )
    .await;

    // Plaintext is refused (the port speaks TLS only).
    let plain = connect::channel(endpoint(&server), None).await;
    match plain {
        Err(_) => {}
        Ok(ch) => {
            let r = ManagementClient::new(ch).list(list()).await;
            assert!(r.is_err(), "plaintext was served: {r:?}");
        }
    }

    // TLS without a certificate: anonymous, no management.
    let anonymous = tls_channel(&server, connect::tls_config(bundle(dir.path()), None)).await;
    let err = ManagementClient::new(anonymous.clone())
        .list(list())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // The administrator: management, and join tokens.
    ManagementClient::new(admin.clone())
        .list(list())
        .await
        .unwrap();
    let token = IdentityClient::new(admin.clone())
        .create_join_token(v1::CreateJoinTokenRequest {
            namespace: "shop".into(),
            service_account: "orders".into(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token.identity, "spiffe://cluster.local/ns/shop/sa/orders");
    // An anonymous caller cannot mint tokens.
    let err = IdentityClient::new(anonymous.clone())
        .create_join_token(v1::CreateJoinTokenRequest {
            namespace: "shop".into(),
            service_account: "admin".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A sidecar gets the token's identity, and only that.
    let sidecar = Sidecar::new();
    let certify = |csr: String, cred: Option<Credential>| v1::CertifyRequest {
        csr_pem: csr,
        credential: cred,
        ttl_seconds: 120,
    };
    let mut id_client = IdentityClient::new(anonymous.clone());
    let err = id_client
        .certify(certify(
            sidecar.csr(Some("spiffe://cluster.local/ns/shop/sa/payment")),
            Some(Credential::JoinToken(token.token.clone())),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let cert = id_client
        .certify(certify(
            sidecar.csr(None),
            Some(Credential::JoinToken(token.token.clone())),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cert.identity, "spiffe://cluster.local/ns/shop/sa/orders");
    assert_eq!(cert.cert_chain_pem.len(), 2);
    assert!(!cert.trust_bundle_pem.is_empty());
    // No credential at all, on an anonymous connection: refused.
    let err = id_client
        .certify(certify(sidecar.csr(None), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // A token from another control plane, or altered, or garbage: refused.
    let other_dir = tempfile::tempdir().unwrap();
    let other = start(other_dir.path()).await;
    let other_admin = tls_channel(
        &other,
        connect::admin_tls(&other_dir.path().join("admin")).unwrap(),
    )
    .await;
    let foreign = IdentityClient::new(other_admin)
        .create_join_token(v1::CreateJoinTokenRequest {
            namespace: "shop".into(),
            service_account: "orders".into(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    for bad in [foreign, format!("{}x", token.token), "muon1.nope".into()] {
        let err = id_client
            .certify(certify(
                sidecar.csr(None),
                Some(Credential::JoinToken(bad.clone())),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{bad}: {err}");
    }

    // With its certificate the sidecar renews without a token, and is still no admin.
    let workload = tls_channel(&server, sidecar.client(dir.path(), &cert.cert_chain_pem)).await;
    let renewed = IdentityClient::new(workload.clone())
        .certify(certify(sidecar.csr(None), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.identity, cert.identity);
    let err = ManagementClient::new(workload.clone())
        .apply(v1::ApplyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // Its discovery stream is its own: claiming another service account's node is refused,
    // its own is served; an anonymous connection may not open one at all.
    let stream = |channel: Channel, namespace: &str, sa: &str| {
        let first = v1::DiscoveryRequest {
            node: Some(v1::Node {
                id: format!("x.{namespace}"),
                pod: "x".into(),
                namespace: namespace.into(),
                service_account: sa.into(),
                ..Default::default()
            }),
            type_url: "services".into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        };
        async move {
            let mut client = DiscoveryClient::new(channel);
            let mut responses = client
                .stream(tokio_stream::iter(vec![first]).chain(tokio_stream::pending()))
                .await?
                .into_inner();
            responses
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unknown("the stream ended"))
        }
    };
    let err = stream(workload.clone(), "shop", "payment")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("payment"), "{err}");
    let err = stream(anonymous.clone(), "shop", "orders")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let first = stream(workload.clone(), "shop", "orders").await.unwrap();
    assert_eq!(first.type_url, "services");

    // Refusals are counted.
    let m = server.metrics.encode();
    assert!(
        m.contains(r#"muon_control_certificates_total{result="refused",reason="foreign-token"} 2"#),
        "{m}"
    );
    assert!(
        m.contains(
            r#"muon_control_certificates_total{result="refused",reason="identity-mismatch"} 1"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"muon_control_certificates_total{result="issued",reason=""} 2"#),
        "{m}"
    );
    other.shutdown().await;

    // The root is the same after a restart.
    let before = std::fs::read(dir.path().join("ca/trust-bundle.pem")).unwrap();
    server.shutdown().await;
    let again = start(dir.path()).await;
    assert_eq!(
        std::fs::read(dir.path().join("ca/trust-bundle.pem")).unwrap(),
        before
    );
    // ... and so is the administrator credential.
    let admin = tls_channel(
        &again,
        connect::admin_tls(&dir.path().join("admin")).unwrap(),
    )
    .await;
    ManagementClient::new(admin).list(list()).await.unwrap();
    again.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let admin = tls_channel(
        &server,
        connect::admin_tls(&dir.path().join("admin")).unwrap(),
    )
    .await;
    let token = IdentityClient::new(admin)
        .create_join_token(v1::CreateJoinTokenRequest {
            namespace: "shop".into(),
            service_account: "orders".into(),
            ttl_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let anonymous = tls_channel(&server, connect::tls_config(bundle(dir.path()), None)).await;
    let err = IdentityClient::new(anonymous)
        .certify(v1::CertifyRequest {
            csr_pem: Sidecar::new().csr(None),
            credential: Some(Credential::JoinToken(token)),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{err}");
    server.shutdown().await;
}
