//! `muonctl install`: the manifests that install Muon's control plane on Kubernetes, as
//! multi-document YAML for `kubectl apply -f -`: the `muon-system` namespace, Muon's CRDs
//! (generated from the resource types, see `muon_core::schema`), the control plane's
//! ServiceAccount and least-privilege RBAC, its Deployment, Service and PodDisruptionBudget,
//! the webhook's serving certificate and the MutatingWebhookConfiguration that sends new pods
//! of opted-in namespaces to it.
//!
//! The output depends only on the flags and the webhook certificates, so it is the same on
//! every run given `--webhook-cert/--webhook-key/--webhook-ca`; without them a CA and a
//! serving certificate are generated (rcgen). The Helm chart in `deploy/helm/muon` renders
//! the same objects (a test compares them).

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::Args;
use muon_core::ports;
use serde_json::{json, Value as Json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The control plane's namespace (the mesh's root namespace).
pub const NAMESPACE: &str = ports::ROOT_NAMESPACE;
/// The Deployment, Service, ServiceAccount and RBAC objects of the control plane.
pub const CONTROL: &str = "muon-control";
/// The webhook's serving certificate.
pub const WEBHOOK_SECRET: &str = "muon-webhook-tls";
/// Where the webhook's certificate is mounted in the control plane's pods.
pub const WEBHOOK_MOUNT: &str = "/etc/muon/webhook";
pub const WEBHOOK_CONFIGURATION: &str = "muon-sidecar-injector";
pub const WEBHOOK_NAME: &str = "sidecar-injector.muon.io";
/// The port the control plane serves the admission webhook on (HTTPS).
pub const WEBHOOK_PORT: u16 = 15017;
/// muon-control's `--metrics-addr` port: /metrics, /ready, /live.
pub const METRICS_PORT: u16 = 15014;
/// The Secret holding the mesh CA's root, shared by every replica.
pub const CA_SECRET: &str = "muon-ca";
pub const DEFAULT_HUB: &str = "ghcr.io/muon-mesh";
/// The names the webhook's serving certificate is for: the API server calls
/// `<service>.<namespace>.svc`.
pub const WEBHOOK_DNS_NAMES: [&str; 2] = [
    "muon-control.muon-system.svc",
    "muon-control.muon-system.svc.cluster.local",
];
/// How long generated webhook certificates are valid (rotate by installing again).
const CERT_DAYS: u64 = 3650;

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// The registry and path of Muon's images: `<hub>/muon-control:<tag>` and
    /// `<hub>/muon-proxy:<tag>`.
    #[arg(long, env = "MUON_HUB", default_value = DEFAULT_HUB)]
    pub hub: String,
    /// The images' tag (default: this muonctl's version).
    #[arg(long, env = "MUON_TAG", default_value = env!("CARGO_PKG_VERSION"))]
    pub tag: String,
    /// Control plane replicas (they hold no state of their own, so any number runs side by
    /// side). With more than one, a PodDisruptionBudget keeps one up during drains.
    #[arg(long, default_value_t = 2)]
    pub replicas: u32,
    /// The webhook's serving certificate (PEM, for muon-control.muon-system.svc, signed by
    /// --webhook-ca); with --webhook-key and --webhook-ca. Without them a CA and a
    /// certificate are generated.
    #[arg(long, requires_all = ["webhook_key", "webhook_ca"])]
    pub webhook_cert: Option<PathBuf>,
    /// The private key of --webhook-cert (PEM).
    #[arg(long, requires_all = ["webhook_cert", "webhook_ca"])]
    pub webhook_key: Option<PathBuf>,
    /// The CA that signed --webhook-cert (PEM): the API server's caBundle for the webhook.
    #[arg(long, requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_ca: Option<PathBuf>,
    /// The SPIFFE trust domain of workload identities (muon-control's --trust-domain).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Print only Muon's CustomResourceDefinitions (what deploy/helm/muon/crds/muon.yaml
    /// holds).
    #[arg(long, conflicts_with_all = ["webhook_cert", "webhook_key", "webhook_ca"])]
    pub crds_only: bool,
}

/// The webhook's serving certificate, its key and its CA, each PEM as given or generated.
#[derive(Debug, Clone)]
pub struct WebhookTls {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// What the manifests are made from, checked.
#[derive(Debug, Clone)]
pub struct Install {
    pub hub: String,
    pub tag: String,
    pub replicas: u32,
    pub trust_domain: String,
    pub webhook: WebhookTls,
}

pub fn run(args: InstallArgs) -> Result<i32> {
    let yaml = if args.crds_only {
        to_yaml(&crd_objects()?)?
    } else {
        let install = Install::from_args(args)?;
        to_yaml(&install.objects()?)?
    };
    print!("{yaml}");
    Ok(0)
}

impl Install {
    /// Checks every flag and reads or generates the webhook's certificate; every problem
    /// with the flags is reported at once.
    pub fn from_args(args: InstallArgs) -> Result<Install> {
        let mut problems = Vec::new();
        if let Err(e) = check_hub(&args.hub) {
            problems.push(format!("--hub: {e}"));
        }
        if let Err(e) = check_tag(&args.tag) {
            problems.push(format!("--tag: {e}"));
        }
        if args.replicas == 0 {
            problems.push("--replicas: must be at least 1".to_string());
        }
        if let Err(e) = muon_core::resource::check_dns_subdomain(&args.trust_domain) {
            problems.push(format!("--trust-domain: {e}"));
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        let webhook = match (args.webhook_cert, args.webhook_key, args.webhook_ca) {
            (Some(cert), Some(key), Some(ca)) => WebhookTls::read(&cert, &key, &ca)?,
            (None, None, None) => WebhookTls::generate()?,
            _ => bail!("--webhook-cert, --webhook-key and --webhook-ca go together"),
        };
        Ok(Install {
            hub: args.hub,
            tag: args.tag,
            replicas: args.replicas,
            trust_domain: args.trust_domain,
            webhook,
        })
    }

    fn image(&self, name: &str) -> String {
        format!("{}/{name}:{}", self.hub, self.tag)
    }

    /// Every object, in the order `kubectl apply` wants them (namespace and CRDs first).
    pub fn objects(&self) -> Result<Vec<Json>> {
        let mut out = vec![namespace()];
        out.extend(crd_objects()?);
        out.push(service_account());
        out.extend(rbac());
        out.push(self.webhook_secret());
        out.push(service());
        out.push(self.deployment());
        if self.replicas > 1 {
            out.push(disruption_budget());
        }
        out.push(self.webhook_configuration());
        Ok(out)
    }

    fn deployment(&self) -> Json {
        let args = [
            "--kubernetes".to_string(),
            "--webhook-addr".into(),
            format!("0.0.0.0:{WEBHOOK_PORT}"),
            "--webhook-cert".into(),
            format!("{WEBHOOK_MOUNT}/tls.crt"),
            "--webhook-key".into(),
            format!("{WEBHOOK_MOUNT}/tls.key"),
            "--proxy-image".into(),
            self.image("muon-proxy"),
            "--trust-domain".into(),
            self.trust_domain.clone(),
            "--tls-san".into(),
            WEBHOOK_DNS_NAMES.join(","),
            "--log-format".into(),
            "json".into(),
        ];
        let field_env = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(CONTROL, Some(NAMESPACE), control_labels()),
            "spec": {
                "replicas": self.replicas,
                "selector": {"matchLabels": selector()},
                "template": {
                    "metadata": {
                        "labels": control_labels(),
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": METRICS_PORT.to_string(),
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": {
                        "serviceAccountName": CONTROL,
                        "securityContext": {
                            "runAsNonRoot": true,
                            "runAsUser": ports::CONTROL_UID,
                            "runAsGroup": ports::CONTROL_UID,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "affinity": {"podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [{
                                "weight": 100,
                                "podAffinityTerm": {
                                    "labelSelector": {"matchLabels": selector()},
                                    "topologyKey": "kubernetes.io/hostname",
                                },
                            }],
                        }},
                        "containers": [{
                            "name": CONTROL,
                            "image": self.image("muon-control"),
                            "imagePullPolicy": "IfNotPresent",
                            "args": args,
                            "env": [
                                field_env("POD_NAMESPACE", "metadata.namespace"),
                                field_env("POD_NAME", "metadata.name"),
                            ],
                            "ports": [
                                {"name": "grpc", "containerPort": ports::CONTROL, "protocol": "TCP"},
                                {"name": "webhook", "containerPort": WEBHOOK_PORT, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/ready", "port": "metrics"},
                                "periodSeconds": 5,
                                "failureThreshold": 3,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/live", "port": "metrics"},
                                "initialDelaySeconds": 5,
                                "periodSeconds": 10,
                                "failureThreshold": 3,
                            },
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "runAsNonRoot": true,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "webhook-tls", "mountPath": WEBHOOK_MOUNT, "readOnly": true},
                                {"name": "data", "mountPath": "/var/lib/muon-control"},
                            ],
                        }],
                        "volumes": [
                            {"name": "webhook-tls", "secret": {"secretName": WEBHOOK_SECRET}},
                            {"name": "data", "emptyDir": {}},
                        ],
                    },
                },
            },
        })
    }

    fn webhook_secret(&self) -> Json {
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta(WEBHOOK_SECRET, Some(NAMESPACE), part_of()),
            "type": "kubernetes.io/tls",
            "data": {
                "tls.crt": b64(&self.webhook.cert),
                "tls.key": b64(&self.webhook.key),
                "ca.crt": b64(&self.webhook.ca),
            },
        })
    }

    fn webhook_configuration(&self) -> Json {
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": meta(WEBHOOK_CONFIGURATION, None, part_of()),
            "webhooks": [{
                "name": WEBHOOK_NAME,
                "clientConfig": {
                    "service": {
                        "name": CONTROL,
                        "namespace": NAMESPACE,
                        "path": "/inject",
                        "port": 443,
                    },
                    "caBundle": b64(&self.webhook.ca),
                },
                "rules": [{
                    "operations": ["CREATE"],
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "resources": ["pods"],
                    "scope": "Namespaced",
                }],
                "namespaceSelector": {"matchLabels": {"muon.io/inject": "enabled"}},
                "objectSelector": {"matchExpressions": [{
                    "key": "muon.io/inject",
                    "operator": "NotIn",
                    "values": ["disabled"],
                }]},
                // A webhook that is down never blocks a pod: it starts without a sidecar.
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 10,
            }],
        })
    }
}

/// Muon's CRDs, in `muon_core::schema`'s table order.
pub fn crd_objects() -> Result<Vec<Json>> {
    muon_core::schema::crds().map_err(|e| anyhow::anyhow!("generating the CRDs: {e}"))
}

/// Multi-document YAML, one object per document.
pub fn to_yaml(objects: &[Json]) -> Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(o).context("writing YAML")?);
    }
    Ok(out)
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

fn part_of() -> Json {
    json!({"app.kubernetes.io/part-of": "muon"})
}

fn selector() -> Json {
    json!({"app": CONTROL})
}

fn control_labels() -> Json {
    json!({
        "app": CONTROL,
        "app.kubernetes.io/name": CONTROL,
        "app.kubernetes.io/part-of": "muon",
    })
}

fn meta(name: &str, namespace: Option<&str>, labels: Json) -> Json {
    let mut m = json!({"name": name, "labels": labels});
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

fn namespace() -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": meta(NAMESPACE, None, part_of()),
    })
}

fn service_account() -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(CONTROL, Some(NAMESPACE), part_of()),
    })
}

/// Least privilege: read what the registry is made of, create TokenReviews, publish the trust
/// bundle's ConfigMap, and in its own namespace only, keep the CA's root Secret.
fn rbac() -> Vec<Json> {
    let read = json!(["get", "list", "watch"]);
    let muon_resources: Vec<String> = muon_core::schema::crd_kinds()
        .map(muon_core::schema::plural)
        .collect();
    let subject = json!([{"kind": "ServiceAccount", "name": CONTROL, "namespace": NAMESPACE}]);
    vec![
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta(CONTROL, None, part_of()),
            "rules": [
                {"apiGroups": [""], "resources": ["services", "pods", "namespaces", "nodes"],
                 "verbs": read},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"],
                 "verbs": read},
                {"apiGroups": ["gateway.networking.x-k8s.io"],
                 "resources": ["xbackendtrafficpolicies"], "verbs": read},
                {"apiGroups": [muon_core::resource::MUON_GROUP], "resources": muon_resources,
                 "verbs": read},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                 "verbs": ["create"]},
                // The trust bundle injected sidecars mount, in every namespace with meshed pods.
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["configmaps"],
                 "resourceNames": [muon_inject::template::CA_CONFIGMAP], "verbs": ["get", "update"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta(CONTROL, None, part_of()),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROL},
            "subjects": subject,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(CONTROL, Some(NAMESPACE), part_of()),
            "rules": [
                // `create` cannot be limited by name (the object does not exist yet).
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
                // Created once, never updated: racing replicas keep the root that won.
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [CA_SECRET],
                 "verbs": ["get"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(CONTROL, Some(NAMESPACE), part_of()),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROL},
            "subjects": subject,
        }),
    ]
}

fn service() -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(CONTROL, Some(NAMESPACE), control_labels()),
        "spec": {
            "selector": selector(),
            "ports": [
                {"name": "grpc", "port": ports::CONTROL, "targetPort": "grpc", "protocol": "TCP",
                 "appProtocol": "grpc"},
                {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    })
}

fn disruption_budget() -> Json {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(CONTROL, Some(NAMESPACE), control_labels()),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": selector()}},
    })
}

/// An image registry and path: lowercase letters, digits, `.`, `-`, `_`, `/` and a `:port`,
/// no tag.
fn check_hub(hub: &str) -> Result<(), String> {
    let ok_chars = hub
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b));
    if hub.is_empty() || !ok_chars || hub.starts_with('/') || hub.ends_with('/') {
        return Err(format!(
            "{hub:?} is not an image registry and path like ghcr.io/muon-mesh (lowercase \
             letters, digits, '.', '-', '_', '/', no tag)"
        ));
    }
    if hub.contains("//") {
        return Err(format!("{hub:?} has an empty path component"));
    }
    // A ':' may only give the registry's port, in the first component.
    if hub.split('/').skip(1).any(|c| c.contains(':')) {
        return Err(format!(
            "{hub:?}: a tag does not belong in --hub; give it with --tag"
        ));
    }
    Ok(())
}

/// An image tag: up to 128 letters, digits, `_`, `.` and `-`, not starting with `.` or `-`.
fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{tag:?} is not an image tag (up to 128 letters, digits, '_', '.' and '-', \
             not starting with '.' or '-')"
        ))
    }
}

impl WebhookTls {
    /// Reads the given certificate, key and CA and checks them as the API server will: the
    /// certificate must chain to the CA, be valid now, be for `muon-control.muon-system.svc`
    /// and match the key.
    pub fn read(cert: &Path, key: &Path, ca: &Path) -> Result<WebhookTls> {
        let read = |flag: &str, path: &Path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("{flag} {}: cannot read it", path.display()))
        };
        let tls = WebhookTls {
            cert: read("--webhook-cert", cert)?,
            key: read("--webhook-key", key)?,
            ca: read("--webhook-ca", ca)?,
        };
        tls.check()
            .with_context(|| format!("--webhook-cert {}", cert.display()))?;
        Ok(tls)
    }

    fn check(&self) -> Result<()> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

        let certs = |pem: &str, what: &str| -> Result<Vec<CertificateDer<'static>>> {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("{what}: not PEM certificates: {e}"))?;
            if certs.is_empty() {
                bail!("{what}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
            }
            Ok(certs)
        };
        let chain = certs(&self.cert, "the certificate")?;
        let roots = certs(&self.ca, "--webhook-ca")?;
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .map_err(|e| anyhow::anyhow!("--webhook-key: not a PEM private key: {e}"))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            store
                .add(root)
                .map_err(|e| anyhow::anyhow!("--webhook-ca: not a CA certificate: {e}"))?;
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            provider.clone(),
        )
        .build()
        .map_err(|e| anyhow::anyhow!("--webhook-ca: {e}"))?;
        let name =
            ServerName::try_from(WEBHOOK_DNS_NAMES[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map_err(|e| {
                anyhow::anyhow!(
                    "not usable by the API server for {}: {e}",
                    WEBHOOK_DNS_NAMES[0]
                )
            })?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| anyhow::anyhow!("--webhook-key: {e}"))?;
        rustls::sign::CertifiedKey::new(chain, signing)
            .keys_match()
            .map_err(|_| anyhow::anyhow!("--webhook-key is not the key of this certificate"))?;
        Ok(())
    }

    /// A new CA and a serving certificate for the control plane's Service, signed by it.
    pub fn generate() -> Result<WebhookTls> {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType,
            ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let now = time::OffsetDateTime::now_utc();
        let not_before = now - time::Duration::hours(1);
        let not_after = now + time::Duration::days(CERT_DAYS as i64);

        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::CommonName, "muon-webhook-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.not_before = not_before;
        ca.not_after = not_after;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate()?;
        let names: Vec<String> = WEBHOOK_DNS_NAMES.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, WEBHOOK_DNS_NAMES[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(WebhookTls {
            cert: cert.pem(),
            key: key.serialize_pem(),
            ca: ca_cert.pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install() -> Install {
        Install {
            hub: DEFAULT_HUB.into(),
            tag: "0.1.0".into(),
            replicas: 2,
            trust_domain: "cluster.local".into(),
            webhook: WebhookTls::generate().unwrap(),
        }
    }

    #[test]
    fn generated_webhook_certificates_pass_the_checks_given_ones_get() {
        let tls = WebhookTls::generate().unwrap();
        tls.check().unwrap();
        let other = WebhookTls::generate().unwrap();
        let mixed = WebhookTls {
            key: other.key.clone(),
            ..tls.clone()
        };
        let e = format!("{:#}", mixed.check().unwrap_err());
        assert!(
            e.contains("--webhook-key is not the key of this certificate"),
            "{e}"
        );
        let wrong_ca = WebhookTls {
            ca: other.ca,
            ..tls
        };
        let e = format!("{:#}", wrong_ca.check().unwrap_err());
        assert!(e.contains("not usable by the API server"), "{e}");
    }

    #[test]
    fn the_deployment_runs_the_contracts_flags_and_mounts_the_webhook_secret() {
        let objects = install().objects().unwrap();
        let find = |kind: &str| {
            objects
                .iter()
                .find(|o| o["kind"] == kind)
                .unwrap_or_else(|| panic!("no {kind}"))
        };
        let d = find("Deployment");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.starts_with(
                "--kubernetes --webhook-addr 0.0.0.0:15017 --webhook-cert /etc/muon/webhook/tls.crt \
                 --webhook-key /etc/muon/webhook/tls.key --proxy-image ghcr.io/muon-mesh/muon-proxy:0.1.0"
            ),
            "{joined}"
        );
        assert_eq!(c["image"], "ghcr.io/muon-mesh/muon-control:0.1.0");
        assert_eq!(d["spec"]["replicas"], 2);
        assert_eq!(find("PodDisruptionBudget")["spec"]["minAvailable"], 1);
        let w = &find("MutatingWebhookConfiguration")["webhooks"][0];
        assert_eq!(w["failurePolicy"], "Ignore");
        assert_eq!(
            w["clientConfig"]["service"],
            json!({"name": "muon-control", "namespace": "muon-system", "path": "/inject", "port": 443})
        );
        let roles = find("ClusterRole")["rules"].to_string();
        assert!(roles.contains("\"authorizationpolicies\""), "{roles}");
        // The CA's root Secret: create (not by name) and get, in its namespace only.
        assert_eq!(
            find("Role")["rules"],
            json!([
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["muon-ca"],
                 "verbs": ["get"]},
            ])
        );
    }

    #[test]
    fn one_replica_gets_no_disruption_budget_that_would_block_every_drain() {
        let mut i = install();
        i.replicas = 1;
        let objects = i.objects().unwrap();
        assert!(!objects.iter().any(|o| o["kind"] == "PodDisruptionBudget"));
    }

    #[test]
    fn hubs_and_tags_are_checked() {
        for ok in [
            "ghcr.io/muon-mesh",
            "localhost:5000/muon",
            "registry.example/a/b_c",
        ] {
            check_hub(ok).unwrap();
        }
        for bad in [
            "",
            "Ghcr.io/x",
            "ghcr.io/muon:0.1",
            "ghcr.io/",
            "a//b",
            "a b",
        ] {
            assert!(check_hub(bad).is_err(), "{bad}");
        }
        for ok in ["0.1.0", "latest", "v1_2-rc.1"] {
            check_tag(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a:b", "a/b", &"a".repeat(129)] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }
}
