//! `muon-bench bench tls-probe`: one GET to a proxy's TLS port, with the client side's
//! certificate, without any certificate, or in plaintext. It is how `--mode mtls` checks that
//! each peer's server side really requires mutual TLS (see `Running::check_peer_mtls`):
//! the server side must answer only the first.
//!
//! The probe runs in the client pod as the proxy's user, so its connection to the server
//! pod's app port takes the same path as the client-side proxy's: the server pod's capture
//! sends it to the server-side proxy. TLS 1.3 only (rustls), the server's chain checked
//! against the run's test CA and its DNS SAN against `--server-name`; ALPN offers `h2` and
//! `http/1.1`, and the request goes out in whichever was chosen (hyper's client).
//!
//! A refusal is a result, not an error: the probe prints its report and exits 0 whatever the
//! server did; "answered" means a 2xx status, the app's answer through the proxy. (nginx
//! completes the handshake without a client certificate and answers 400 itself.)

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the probe waits after the handshake for the server's verdict on its certificate.
const ALERT_WAIT: Duration = Duration::from_millis(200);

#[derive(clap::Args, Debug, Clone)]
pub struct TlsProbeArgs {
    /// The server's `IP:PORT`.
    #[arg(long)]
    pub addr: SocketAddr,
    /// The CA the server's certificate must chain to (PEM).
    #[arg(long, required_unless_present = "plaintext")]
    pub ca: Option<PathBuf>,
    /// The DNS name the server's certificate must carry; also sent as SNI and Host.
    #[arg(long, default_value = "server.bench.svc.cluster.local")]
    pub server_name: String,
    /// The client certificate (PEM); without it (and --key) the probe offers none.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// No TLS at all: a plaintext HTTP/1.1 GET.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key"])]
    pub plaintext: bool,
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Print the report as JSON (for the harness) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What one probe saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeReport {
    /// The TLS handshake completed on the client's side. (In TLS 1.3 the server checks the
    /// client's certificate after that: a refusal arrives as an alert on the first read.)
    pub handshake: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    /// The server certificate's URI and DNS SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_uris: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_dns: Vec<String>,
    /// The answer's status, if one came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why there was no answer (connect, handshake, alert, reset, timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProbeReport {
    /// The app answered through the proxy.
    pub fn answered(&self) -> bool {
        matches!(self.status, Some(200..=299))
    }

    /// Why it was not answered, in a few words.
    pub fn refusal(&self) -> String {
        match (&self.error, self.status) {
            (Some(e), _) => e.clone(),
            (None, Some(s)) => format!("status {s} from the proxy"),
            (None, None) => "no answer".into(),
        }
    }
}

pub fn run_tls_probe(args: &TlsProbeArgs) -> Result<()> {
    let report = super::load::runtime()?.block_on(probe(args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report:#?}");
    }
    Ok(())
}

/// Errors only for what is wrong on the probe's side (files, names); whatever the server
/// does is in the report.
pub async fn probe(args: &TlsProbeArgs) -> Result<ProbeReport> {
    let mut report = ProbeReport::default();
    let config = if args.plaintext {
        None
    } else {
        Some(client_config(args)?)
    };
    let name = ServerName::try_from(args.server_name.clone())
        .with_context(|| format!("--server-name {:?}", args.server_name))?;
    let tcp = match tokio::time::timeout(STEP_TIMEOUT, super::load::open(args.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            report.error = Some(format!("{e:#}"));
            return Ok(report);
        }
        Err(_) => {
            report.error = Some(format!("connect {}: timed out", args.addr));
            return Ok(report);
        }
    };
    let Some(config) = config else {
        let got = tokio::time::timeout(STEP_TIMEOUT, get(tcp, false, args)).await;
        record(&mut report, got);
        return Ok(report);
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = match tokio::time::timeout(STEP_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            report.error = Some(format!("TLS handshake: {e}"));
            return Ok(report);
        }
        Err(_) => {
            report.error = Some("TLS handshake: timed out".into());
            return Ok(report);
        }
    };
    report.handshake = true;
    let conn = tls.get_ref().1;
    report.version = conn.protocol_version().map(|v| format!("{v:?}"));
    report.cipher = conn
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()));
    report.alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    if let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) {
        (report.peer_uris, report.peer_dns) = sans(leaf);
    }
    let h2 = report.alpn.as_deref() == Some("h2");
    // In TLS 1.3 the server checks the client's certificate after the client's side of the
    // handshake is done: let its verdict (an alert, when it refuses) arrive before the
    // request goes out, so that the first read reports the alert rather than the write a
    // broken pipe.
    tokio::time::sleep(ALERT_WAIT).await;
    let got = tokio::time::timeout(STEP_TIMEOUT, get(tls, h2, args)).await;
    record(&mut report, got);
    Ok(report)
}

fn record(report: &mut ProbeReport, got: Result<Result<u16>, tokio::time::error::Elapsed>) {
    match got {
        Ok(Ok(status)) => report.status = Some(status),
        Ok(Err(e)) => report.error = Some(format!("{e:#}")),
        Err(_) => report.error = Some("no answer within 5s".into()),
    }
}

fn client_config(args: &TlsProbeArgs) -> Result<rustls::ClientConfig> {
    let ca = args.ca.as_ref().context("--ca is required with TLS")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(c.with_context(|| format!("a certificate in {}", ca.display()))?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots);
    let mut config = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The URI and DNS SANs of a certificate.
fn sans(der: &CertificateDer<'_>) -> (Vec<String>, Vec<String>) {
    use x509_parser::extensions::GeneralName;
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return (uris, dns);
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    (uris, dns)
}

/// One GET over an established stream; the status of the answer. When the request fails,
/// the connection's own error says why (a TLS alert, say) better than the request's.
async fn get<S>(io: S, h2: bool, args: &TlsProbeArgs) -> Result<u16>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let scheme = if args.plaintext { "http" } else { "https" };
    if h2 {
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(io)
            .await
            .context("HTTP/2 handshake")?;
        let conn = tokio::spawn(conn);
        let req = Request::get(format!("{scheme}://{}{}", args.server_name, args.path))
            .body(Empty::new())?;
        match send.send_request(req).await {
            Ok(resp) => Ok(resp.status().as_u16()),
            Err(e) => Err(connection_error(conn, e).await),
        }
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
            .await
            .context("HTTP/1.1 handshake")?;
        let conn = tokio::spawn(conn);
        let req = Request::get(args.path.as_str())
            .header("host", args.server_name.as_str())
            .body(Empty::new())?;
        match send.send_request(req).await {
            Ok(resp) => Ok(resp.status().as_u16()),
            Err(e) => Err(connection_error(conn, e).await),
        }
    }
}

async fn connection_error(
    conn: tokio::task::JoinHandle<Result<(), hyper::Error>>,
    request: hyper::Error,
) -> anyhow::Error {
    match tokio::time::timeout(Duration::from_secs(1), conn).await {
        Ok(Ok(Err(e))) => anyhow::Error::new(e),
        _ => anyhow::Error::new(request),
    }
}

#[cfg(test)]
mod tests {
    use super::super::peers::Side;
    use super::super::pki::{self, SideTls, TestPki};
    use super::*;
    use std::convert::Infallible;

    /// A server side as the peers are configured: TLS 1.3, the server leaf, a client
    /// certificate from the test CA required; answers 200 to whoever gets through.
    async fn server(pki: &TestPki) -> SocketAddr {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let leaf = pki.leaf(Side::Server);
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[test]
    fn only_a_client_with_a_certificate_from_the_ca_is_answered() {
        let dir = std::env::temp_dir().join(format!("muon-bench-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = TestPki::generate().unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let files: SideTls = pki.install(Side::Client, &dir, uid).unwrap();
        let rt = super::super::load::runtime().unwrap();
        let (with, without, plain) = rt.block_on(async {
            let addr = server(&pki).await;
            let args = |cert: bool, plaintext: bool| TlsProbeArgs {
                addr,
                ca: (!plaintext).then(|| files.ca.clone()),
                server_name: pki::dns_name(Side::Server),
                cert: cert.then(|| files.cert.clone()),
                key: cert.then(|| files.key.clone()),
                plaintext,
                path: "/".into(),
                json: true,
            };
            (
                probe(&args(true, false)).await.unwrap(),
                probe(&args(false, false)).await.unwrap(),
                probe(&args(false, true)).await.unwrap(),
            )
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert!(with.answered(), "{with:?}");
        assert_eq!(with.version.as_deref(), Some("TLSv1_3"));
        assert_eq!(with.alpn.as_deref(), Some("http/1.1"));
        assert_eq!(with.peer_uris, [pki::spiffe_id(Side::Server)]);
        assert_eq!(with.peer_dns, [pki::dns_name(Side::Server)]);
        assert!(!without.answered(), "{without:?}");
        assert!(
            without.refusal().to_lowercase().contains("certificate"),
            "{without:?}"
        );
        assert!(!plain.answered() && !plain.handshake, "{plain:?}");
    }
}
