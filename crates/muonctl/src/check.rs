//! `muonctl check`: what is wrong with an install of Muon, read from a reachable cluster.
//!
//! Each check prints one line, `ok`, `warn` or `FAIL`, with what it found and, when it is not
//! ok, what to do. The objects looked for are the ones `muonctl install` writes (the names
//! come from `install`), so the two cannot drift apart. Only GETs are made; the exit code is
//! 1 when any check FAILs.

use crate::install::{self, CONTROL, WEBHOOK_CONFIGURATION, WEBHOOK_NAME, WEBHOOK_SECRET};
use anyhow::{Context, Result};
use clap::Args;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use kube::Client;
use muon_inject::template::{ANNOTATION_INJECT, ANNOTATION_STATUS};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The kubeconfig to use (default: in-cluster configuration, else $KUBECONFIG, else
    /// ~/.kube/config), with its current context.
    #[arg(long, conflicts_with = "api")]
    pub kubeconfig: Option<PathBuf>,
    /// Talk to the API server at this plain URL without credentials (`kubectl proxy`'s
    /// `http://127.0.0.1:8001`, tests).
    #[arg(long)]
    pub api: Option<String>,
    /// The namespace Muon's control plane was installed in.
    #[arg(long, default_value = install::NAMESPACE)]
    pub namespace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

/// The lines printed so far.
#[derive(Default)]
struct Report {
    ok: usize,
    warn: usize,
    fail: usize,
}

impl Report {
    /// Prints one check's line: what was found, then (when not ok) what to do.
    fn line(&mut self, level: Level, check: &str, found: &str, todo: &str) {
        let tag = match level {
            Level::Ok => {
                self.ok += 1;
                "ok"
            }
            Level::Warn => {
                self.warn += 1;
                "warn"
            }
            Level::Fail => {
                self.fail += 1;
                "FAIL"
            }
        };
        if todo.is_empty() {
            println!("{tag:<4} {check}: {found}");
        } else {
            println!("{tag:<4} {check}: {found}; {todo}");
        }
    }

    fn ok(&mut self, check: &str, found: &str) {
        self.line(Level::Ok, check, found, "");
    }
}

/// A kube error as a reason: not found, forbidden (RBAC of the user running check) or other.
fn reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => {
            format!("forbidden for this user ({})", s.message)
        }
        kube::Error::Api(s) => format!("the API server answered {}: {}", s.code, s.message),
        other => format!("{other}"),
    }
}

pub fn run(args: CheckArgs, connect_timeout: Duration, timeout: Duration) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(check(args, connect_timeout, timeout))
}

async fn client(args: &CheckArgs, connect_timeout: Duration, timeout: Duration) -> Result<Client> {
    // rustls needs a process-wide crypto provider for the API server's TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = match (&args.api, &args.kubeconfig) {
        (Some(url), _) => {
            let uri: http::Uri = url.parse().with_context(|| format!("--api {url:?}"))?;
            kube::Config::new(uri)
        }
        (None, Some(path)) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        (None, None) => kube::Config::infer().await.context(
            "no Kubernetes configuration (in-cluster, $KUBECONFIG or ~/.kube/config); \
             give --kubeconfig or --api",
        )?,
    };
    config.connect_timeout = Some(connect_timeout);
    config.read_timeout = Some(timeout);
    Client::try_from(config).context("the Kubernetes client")
}

async fn check(args: CheckArgs, connect_timeout: Duration, timeout: Duration) -> Result<i32> {
    let client = client(&args, connect_timeout, timeout).await?;
    let ns = args.namespace.as_str();
    let mut r = Report::default();
    match client.apiserver_version().await {
        Ok(v) => r.ok(
            "api-server",
            &format!("reachable, Kubernetes {}", v.git_version),
        ),
        Err(e) => {
            r.line(
                Level::Fail,
                "api-server",
                &format!("not reachable: {}", reason(&e)),
                "check the kubeconfig's current context (or --kubeconfig, --api) and that \
                 `kubectl version` works",
            );
            summary(&r);
            return Ok(1);
        }
    }
    namespace(&client, ns, &mut r).await;
    crds(&client, &mut r).await?;
    let webhook_port = control_plane(&client, ns, &mut r).await;
    webhook(&client, ns, webhook_port, &mut r).await;
    injection(&client, &mut r).await;
    summary(&r);
    Ok(if r.fail > 0 { 1 } else { 0 })
}

fn summary(r: &Report) {
    println!(
        "\n{} ok, {} warn, {} FAIL{}",
        r.ok,
        r.warn,
        r.fail,
        if r.fail > 0 {
            ": Muon is not installed correctly"
        } else {
            ""
        }
    );
}

const REINSTALL: &str = "install Muon: muonctl install | kubectl apply -f -";

async fn namespace(client: &Client, ns: &str, r: &mut Report) {
    let check = format!("namespace {ns}");
    match Api::<Namespace>::all(client.clone()).get_opt(ns).await {
        Ok(Some(_)) => r.ok(&check, "exists"),
        Ok(None) => r.line(Level::Fail, &check, "does not exist", REINSTALL),
        Err(e) => r.line(Level::Fail, &check, &reason(&e), ""),
    }
}

/// Every CRD `muonctl install` writes exists and the API server has established it.
async fn crds(client: &Client, r: &mut Report) -> Result<()> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in install::crd_objects()? {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        let check = format!("crd {name}");
        match api.get_opt(name).await {
            Ok(Some(found)) => {
                let established = found
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    r.ok(&check, "present and established");
                } else {
                    r.line(
                        Level::Fail,
                        &check,
                        "present but not established",
                        &format!("see why: kubectl describe crd {name}"),
                    );
                }
            }
            Ok(None) => r.line(
                Level::Fail,
                &check,
                "missing",
                "apply the CRDs: muonctl install --crds-only | kubectl apply -f -",
            ),
            Err(e) => r.line(Level::Fail, &check, &reason(&e), ""),
        }
    }
    Ok(())
}

/// The Deployment, its version against this muonctl's, and the Service's ready endpoints.
/// Returns the Service's webhook port, if the Service was read.
async fn control_plane(client: &Client, ns: &str, r: &mut Report) -> Option<i32> {
    let check = format!("deployment {ns}/{CONTROL}");
    let diagnose = format!(
        "see why: kubectl -n {ns} describe deployment {CONTROL}; kubectl -n {ns} logs deployment/{CONTROL}"
    );
    match Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(CONTROL)
        .await
    {
        Ok(Some(d)) => {
            let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let available = d
                .status
                .as_ref()
                .and_then(|s| s.available_replicas)
                .unwrap_or(0);
            let found = format!("{available} of {desired} replicas available");
            if available < 1 {
                r.line(Level::Fail, &check, &found, &diagnose);
            } else if available < desired {
                r.line(Level::Warn, &check, &found, &diagnose);
            } else {
                r.ok(&check, &found);
            }
            version(&d, ns, r);
        }
        Ok(None) => r.line(Level::Fail, &check, "does not exist", REINSTALL),
        Err(e) => r.line(Level::Fail, &check, &reason(&e), ""),
    }

    let check = format!("service {ns}/{CONTROL}");
    let port = match Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(CONTROL)
        .await
    {
        Ok(Some(s)) => s
            .spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref() == Some("webhook"))
            .map(|p| p.port),
        Ok(None) => {
            r.line(Level::Fail, &check, "does not exist", REINSTALL);
            return None;
        }
        Err(e) => {
            r.line(Level::Fail, &check, &reason(&e), "");
            return None;
        }
    };
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={CONTROL}")))
        .await;
    match slices {
        Ok(list) => {
            let ready = list
                .items
                .iter()
                .flat_map(|s| &s.endpoints)
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .count();
            if ready == 0 {
                r.line(
                    Level::Fail,
                    &check,
                    "no ready endpoints: sidecars cannot reach the control plane and the \
                     webhook injects nothing",
                    &format!(
                        "see which pods it selects: kubectl -n {ns} get pods -l app={CONTROL}"
                    ),
                );
            } else {
                r.ok(&check, &format!("{ready} ready endpoints"));
            }
        }
        Err(e) => r.line(Level::Fail, &check, &reason(&e), ""),
    }
    port
}

/// The control plane's image tag against this muonctl's version.
fn version(d: &Deployment, ns: &str, r: &mut Report) {
    let image = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.iter().find(|c| c.name == CONTROL))
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    let mine = env!("CARGO_PKG_VERSION");
    let check = "version";
    if tag == mine {
        r.ok(check, &format!("control plane and muonctl are {mine}"));
    } else {
        r.line(
            Level::Warn,
            check,
            &format!("the control plane runs {image:?}, this muonctl is {mine}"),
            &format!(
                "upgrade the control plane to this muonctl's (muonctl install | kubectl apply \
                 -f -), or use muonctl {tag} with it (namespace {ns})"
            ),
        );
    }
}

/// The MutatingWebhookConfiguration: it calls the control plane's Service, the API server
/// trusts the certificate the control plane serves, and a webhook that is down never blocks
/// a pod.
async fn webhook(client: &Client, ns: &str, service_port: Option<i32>, r: &mut Report) {
    let check = format!("webhook {WEBHOOK_CONFIGURATION}");
    let config = match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(WEBHOOK_CONFIGURATION)
        .await
    {
        Ok(Some(c)) => c,
        Ok(None) => {
            return r.line(
                Level::Fail,
                &check,
                "does not exist: no pod gets a sidecar",
                REINSTALL,
            )
        }
        Err(e) => return r.line(Level::Fail, &check, &reason(&e), ""),
    };
    let Some(hook) = config
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .find(|w| w.name == WEBHOOK_NAME)
    else {
        return r.line(
            Level::Fail,
            &check,
            &format!("has no webhook {WEBHOOK_NAME}"),
            REINSTALL,
        );
    };
    let mut problems = Vec::new();
    match &hook.client_config.service {
        Some(s) if s.name == CONTROL && s.namespace == ns => {
            let port = s.port.unwrap_or(443);
            if let Some(theirs) = service_port.filter(|&p| p != port) {
                problems.push(format!(
                    "it calls port {port}, the Service's webhook port is {theirs}"
                ));
            }
        }
        Some(s) => problems.push(format!(
            "it calls service {}/{}, not {ns}/{CONTROL}",
            s.namespace, s.name
        )),
        None => problems.push(format!("it calls a URL, not the service {ns}/{CONTROL}")),
    }
    if problems.is_empty() {
        r.ok(&check, &format!("calls service {ns}/{CONTROL}"));
    } else {
        r.line(Level::Fail, &check, &problems.join("; "), REINSTALL);
    }

    let policy = hook.failure_policy.as_deref().unwrap_or("Fail");
    if policy == "Ignore" {
        r.ok(
            "webhook failurePolicy",
            "Ignore: a webhook that is down never blocks a pod",
        );
    } else {
        r.line(
            Level::Fail,
            "webhook failurePolicy",
            &format!(
                "{policy}: while the webhook is down no pod in a labelled namespace can be created"
            ),
            "set it back to Ignore: muonctl install | kubectl apply -f -",
        );
    }

    let check = "webhook caBundle";
    let bundle = hook
        .client_config
        .ca_bundle
        .map(|b| b.0)
        .unwrap_or_default();
    if bundle.is_empty() {
        return r.line(
            Level::Fail,
            check,
            "empty: the API server cannot trust the webhook and no pod gets a sidecar",
            REINSTALL,
        );
    }
    let secret = match Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(WEBHOOK_SECRET)
        .await
    {
        Ok(Some(s)) => s,
        Ok(None) => {
            return r.line(
                Level::Fail,
                check,
                &format!("the certificate's Secret {ns}/{WEBHOOK_SECRET} does not exist"),
                REINSTALL,
            )
        }
        Err(e) => {
            return r.line(
                Level::Warn,
                check,
                &format!(
                    "cannot compare it with Secret {ns}/{WEBHOOK_SECRET}: {}",
                    reason(&e)
                ),
                "",
            )
        }
    };
    let cert = secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    match verify(&cert, &bundle) {
        Ok(()) => r.ok(
            check,
            &format!("is the CA of the certificate in Secret {ns}/{WEBHOOK_SECRET}"),
        ),
        Err(e) => r.line(
            Level::Fail,
            check,
            &format!(
                "does not verify the certificate in Secret {ns}/{WEBHOOK_SECRET} ({e}): the \
                 API server rejects the webhook and no pod gets a sidecar"
            ),
            &format!(
                "install again so both come from one run (muonctl install | kubectl apply -f -), \
                 then kubectl -n {ns} rollout restart deployment {CONTROL}"
            ),
        ),
    }
}

/// Whether the PEM certificate `cert` is one the API server accepts for the control plane's
/// Service given the PEM `bundle` as roots: signed by it, valid now, for the Service's name.
fn verify(cert: &[u8], bundle: &[u8]) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    let parse = |pem: &[u8], what: &str| {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{what} is not PEM: {e}"))?;
        if certs.is_empty() {
            return Err(format!("{what} holds no PEM certificate"));
        }
        Ok(certs)
    };
    let chain = parse(cert, "tls.crt")?;
    let mut roots = rustls::RootCertStore::empty();
    for root in parse(bundle, "the caBundle")? {
        roots
            .add(root)
            .map_err(|e| format!("the caBundle holds no usable CA: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(install::WEBHOOK_DNS_NAMES[0]).map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The namespaces labelled for injection, and their pods that have no sidecar.
async fn injection(client: &Client, r: &mut Report) {
    let check = "injection";
    let selector = format!("{ANNOTATION_INJECT}=enabled");
    let namespaces = match Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(list) => list.items,
        Err(e) => return r.line(Level::Warn, check, &reason(&e), ""),
    };
    if namespaces.is_empty() {
        return r.line(
            Level::Warn,
            check,
            &format!("no namespace is labelled {selector}, so no pod gets a sidecar"),
            &format!("label one: kubectl label namespace NAME {selector}"),
        );
    }
    let names: Vec<String> = namespaces
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    r.ok(
        check,
        &format!("namespaces labelled {selector}: {}", names.join(", ")),
    );
    for ns in &names {
        let check = format!("pods in {ns}");
        let pods = match Api::<Pod>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
        {
            Ok(list) => list.items,
            Err(e) => {
                r.line(Level::Warn, &check, &reason(&e), "");
                continue;
            }
        };
        let meshable: Vec<&Pod> = pods.iter().filter(|p| meshable(p)).collect();
        let missing: Vec<&str> = meshable
            .iter()
            .filter(|p| {
                !p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(ANNOTATION_STATUS))
            })
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        if missing.is_empty() {
            r.ok(&check, &format!("all {} have the sidecar", meshable.len()));
        } else {
            r.line(
                Level::Warn,
                &check,
                &format!(
                    "{} of {} have no sidecar ({ANNOTATION_STATUS} is not set): {}",
                    missing.len(),
                    meshable.len(),
                    missing.join(", ")
                ),
                &format!(
                    "they were created before the namespace was labelled or while the webhook \
                     was down; restart them: kubectl -n {ns} rollout restart deployment"
                ),
            );
        }
    }
}

/// A running pod the webhook would inject: not finished, not opted out, not on the host's
/// network.
fn meshable(p: &Pod) -> bool {
    let finished = p
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
    let opted_out = [&p.metadata.annotations, &p.metadata.labels]
        .iter()
        .any(|m| {
            m.as_ref()
                .and_then(|m| m.get(ANNOTATION_INJECT))
                .is_some_and(|v| v == "disabled")
        });
    let host_network = p
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    !finished && !opted_out && !host_network
}
