//! Puts the control plane together: store and registry, the debouncer, the config-directory
//! and Kubernetes sources, the gRPC server (Discovery, Management, reflection) and the
//! metrics server; and takes it apart again on shutdown.
//!
//! Shutdown reads top to bottom: one `watch` says "stop"; discovery streams end with
//! UNAVAILABLE (sidecars reconnect elsewhere or keep their last tables), the gRPC server stops
//! accepting and finishes in-flight calls, and [`Server::shutdown`] waits for every task.

use crate::config::Config;
use crate::discovery::{DiscoveryService, Proxies};
use crate::management::ManagementService;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::wire::DiscoveryServer;
use anyhow::Context;
use muon_api::v1;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

/// Largest discovery or management message, either way: the one limit both ends use.
const MAX_MESSAGE: usize = muon_api::MAX_MESSAGE_BYTES;

/// A running control plane.
pub struct Server {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The admission webhook's address, when it serves.
    pub webhook_addr: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    pub proxies: Arc<Proxies>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    calls: TaskTracker,
}

impl Server {
    /// Loads the store (refusing a corrupt one), binds both addresses and starts serving.
    pub async fn start(config: &Config) -> anyhow::Result<Server> {
        let metrics = Arc::new(Metrics::new());
        let own = own_addresses(config.grpc_addr);
        let limits = crate::rules::Limits {
            service_cidrs: config.service_cidrs.clone(),
            reserved: own.clone(),
            max_object_bytes: config.max_object_bytes,
            max_apply_bytes: config.max_apply_bytes,
        };
        let registry = Registry::open(
            &config.data_dir,
            &config.trust_domain,
            limits,
            metrics.clone(),
        )?;
        // Before anything is written or served: a control plane that cannot build its client
        // (no in-cluster configuration, a bad kubeconfig) says so and does not start.
        let kubernetes = match &config.kubernetes {
            Some(api) => Some(crate::kubernetes::client(api).await?),
            None => None,
        };
        let ca_config = crate::ca::CaConfig {
            data_dir: config.data_dir.clone(),
            trust_domain: config.trust_domain.clone(),
            cert_file: config.ca_cert.clone(),
            key_file: config.ca_key.clone(),
            extra_roots: config.extra_roots.clone(),
            cert_ttl: config.cert_ttl,
        };
        let mut root = crate::ca::Root::local(&ca_config).context("the certificate authority")?;
        // In Kubernetes every replica signs with the root kept in the Secret.
        if let Some(client) = &kubernetes {
            let (namespace, name) = &config.ca_secret;
            root = crate::kubernetes::identity::shared_root(client.clone(), namespace, name, root)
                .await?;
        }
        let ca = Arc::new(
            crate::ca::Ca::with_root(&ca_config, root).context("the certificate authority")?,
        );
        info!(root = %ca.origin, "the CA signs with this root");
        let tls = tls_config(&ca, config, &own)?;
        write_credentials(&ca, &config.data_dir)?;
        if config.insecure_plaintext {
            tracing::warn!(
                "--insecure-plaintext: plaintext gRPC is accepted and trusted as anyone"
            );
        }
        let grpc = bind_grpc(config.grpc_addr)
            .with_context(|| format!("binding --grpc-addr {}", config.grpc_addr))?;
        let http = TcpListener::bind(config.metrics_addr)
            .await
            .with_context(|| format!("binding --metrics-addr {}", config.metrics_addr))?;
        let webhook = match &config.webhook {
            Some(w) => {
                let tls = crate::webhook::tls_config(w)?;
                let listener = TcpListener::bind(w.addr)
                    .await
                    .with_context(|| format!("binding --webhook-addr {}", w.addr))?;
                Some((listener, tls, Arc::new(w.template.clone())))
            }
            None => None,
        };
        let grpc_addr = grpc.local_addr()?;
        let metrics_addr = http.local_addr()?;
        let webhook_addr = match &webhook {
            Some((listener, _, _)) => Some(listener.local_addr()?),
            None => None,
        };

        let (shutdown, stop) = watch::channel(false);
        let proxies = Arc::new(Proxies::default());
        let mut tasks = JoinSet::new();
        // The tasks calls start: discovery streams, watches, registry writes.
        let calls = TaskTracker::new();

        tasks.spawn(registry.clone().run_debouncer(
            config.debounce,
            config.debounce_max,
            stop.clone(),
        ));
        if let Some(dir) = &config.config_dir {
            tasks.spawn(crate::sources::watch_config_dir(
                dir.clone(),
                registry.clone(),
                stop.clone(),
            ));
        }
        if let Some(client) = kubernetes.clone() {
            tasks.spawn(crate::kubernetes::run(
                client,
                registry.clone(),
                ca.bundle().concat(),
                stop.clone(),
            ));
        }
        tasks.spawn(crate::http::serve(http, metrics.clone(), stop.clone()));
        if let Some((listener, tls, template)) = webhook {
            tasks.spawn(crate::webhook::serve(listener, tls, template, stop.clone()));
        }

        let discovery = DiscoveryServer::new(
            DiscoveryService::new(
                registry.clone(),
                proxies.clone(),
                metrics.clone(),
                stop.clone(),
            )
            .with_split_bytes(config.discovery_split_bytes)
            .with_tasks(calls.clone()),
            MAX_MESSAGE,
        );
        let management = v1::management_server::ManagementServer::new(
            ManagementService::new(registry.clone(), proxies.clone(), stop.clone())
                .with_tasks(calls.clone()),
        )
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the reflection service")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building the reflection service")?;

        let gate = crate::gate::Gate::new(
            crate::gate::within_fd_limit(config.connections),
            metrics.clone(),
        );
        let incoming = crate::gate::Incoming::new(
            grpc,
            gate,
            crate::gate::Security {
                tls: Some(tls),
                plaintext: config.insecure_plaintext,
                trust_domain: config.trust_domain.as_str().into(),
            },
        );
        let mut identity = crate::identity::IdentityService::new(ca.clone(), metrics.clone());
        if let Some(client) = &kubernetes {
            identity = identity.with_kubernetes(Arc::new(
                crate::kubernetes::identity::TokenReviewer::new(client.clone()),
            ));
        }
        let identity = v1::identity_server::IdentityServer::new(identity);
        let mut grpc_stop = stop.clone();
        let router = tonic::transport::Server::builder()
            // Find sidecars that vanished without closing their stream.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Unary calls end in time (a stream's response starts at once, so streams are
            // not cut by this).
            .timeout(config.call_timeout)
            .add_service(discovery)
            .add_service(management)
            .add_service(identity)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        tasks.spawn(async move {
            let signal = async move {
                let _ = grpc_stop.changed().await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                error!(error = %e, "gRPC server failed");
            }
        });
        info!(grpc = %grpc_addr, metrics = %metrics_addr, "muon-control serving");
        Ok(Server {
            grpc_addr,
            metrics_addr,
            webhook_addr,
            registry,
            proxies,
            metrics,
            shutdown,
            tasks,
            calls,
        })
    }

    /// Stops everything and waits for every task to end.
    pub async fn shutdown(mut self) {
        info!("shutting down");
        self.shutdown.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
        // Every stream saw the stop; writes finish.
        self.calls.close();
        self.calls.wait().await;
        info!("stopped");
    }
}

/// The gRPC port's TLS: TLS 1.3, a certificate from the mesh CA for every address of the
/// control plane (and `--tls-san`), client certificates from the mesh CA optional (callers
/// without one are anonymous: see `auth`).
fn tls_config(
    ca: &crate::ca::Ca,
    config: &Config,
    own: &[std::net::IpAddr],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut names: Vec<String> = vec!["localhost".into(), "muon-control".into()];
    names.extend(own.iter().map(|ip| ip.to_string()));
    if !config.grpc_addr.ip().is_unspecified() {
        names.push(config.grpc_addr.ip().to_string());
    }
    names.extend(config.tls_sans.iter().cloned());
    names.sort();
    names.dedup();
    let (chain, key) = ca
        .serving_certificate(&names)
        .context("the control plane's certificate")?;
    let certs = chain
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("the control plane's certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).context("the control plane's key")?;
    let mut roots = rustls::RootCertStore::empty();
    for pem in ca.bundle() {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).context("the trust bundle")?)
            .context("the trust bundle")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("the client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("the control plane's certificate")?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(tls))
}

/// Writes what others need to reach this control plane: the trust bundle
/// (`<data-dir>/ca/trust-bundle.pem`, for sidecars' `--ca-bundle`), and, once, an
/// administrator credential for `muonctl` (`<data-dir>/admin/{ca.pem,cert.pem,key.pem}`,
/// readable by the control plane's user only).
fn write_credentials(ca: &crate::ca::Ca, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let bundle: String = ca.bundle().concat();
    let ca_dir = data_dir.join("ca");
    std::fs::write(ca_dir.join("trust-bundle.pem"), &bundle)
        .with_context(|| format!("writing {}", ca_dir.join("trust-bundle.pem").display()))?;
    let admin = data_dir.join("admin");
    if !admin.join("key.pem").exists() {
        std::fs::create_dir_all(&admin).with_context(|| format!("creating {}", admin.display()))?;
        let (chain, key) = ca.admin_certificate("admin", ADMIN_CERT_TTL)?;
        crate::ca::write_private(&admin.join("key.pem"), key)?;
        crate::ca::write_private(&admin.join("cert.pem"), chain.concat())?;
        info!(dir = %admin.display(), "wrote an administrator credential for muonctl");
    }
    crate::ca::write_private(&admin.join("ca.pem"), &bundle)?;
    Ok(())
}

/// The administrator credential written on first start.
const ADMIN_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Connections the kernel completes before the control plane accepts them: room for every
/// sidecar of a big mesh reconnecting at once (capped by `net.core.somaxconn`).
const GRPC_BACKLOG: u32 = 4096;

fn bind_grpc(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(GRPC_BACKLOG)
}

/// The addresses sidecars reach this control plane at: the gRPC address, or with a wildcard
/// every address of this host's interfaces. No service may take one as its VIP.
fn own_addresses(grpc: SocketAddr) -> Vec<std::net::IpAddr> {
    if !grpc.ip().is_unspecified() {
        return vec![grpc.ip()];
    }
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|a| {
                let s = a.address?;
                s.as_sockaddr_in()
                    .map(|v4| std::net::IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this host's addresses; VIPs are not checked against them");
            Vec::new()
        }
    }
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    crate::gate::raise_fd_limit();
    let server = Server::start(&config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for SIGINT")?;
            info!("SIGINT received");
        }
    }
    server.shutdown().await;
    Ok(())
}

/// Sets up logging: human or JSON lines on stderr, filtered by `level` (EnvFilter syntax).
pub fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .with_context(|| format!("--log-level {:?}", config.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        crate::config::LogFormat::Human => builder.try_init(),
        crate::config::LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}
