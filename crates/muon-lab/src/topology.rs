//! The lab's topology file: which pods run (with their app command, labels and locality) and
//! which services select them. Users and other tools write this file, so the field names are a
//! contract; unknown fields and bad values are refused with the file, line and reason.

use muon_core::Protocol;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

/// A whole lab: pods and services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Give pods and services IPv6 addresses too. Default: when the kernel has IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    /// Run muon-control in a pod of its own and have the sidecars discover services from
    /// it. `false`: sidecars read a static table file the lab writes.
    #[serde(default = "yes")]
    pub control_plane: bool,
    /// An ingress gateway: `muon-proxy --mode gateway` in a pod of its own, serving the
    /// routes attached to a Gateway of this name (needs the control plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,
}

/// The lab's gateway: a pod (no capture, no app) running muon-proxy as the mesh's edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// The Gateway object (and the pod). Default: `gateway`.
    #[serde(default = "default_gateway_name")]
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The port it listens on, on its pod address. Default: 8080 (8443 with TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Also listen on the host's 127.0.0.1 at this port (forwarded into the gateway pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    /// Terminate TLS for its clients with this certificate and key (PEM files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<GatewayTls>,
    /// Extra flags for the gateway's muon-proxy.
    #[serde(default)]
    pub proxy_args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayTls {
    pub cert_file: String,
    pub key_file: String,
}

impl GatewaySpec {
    pub fn port(&self) -> u16 {
        self.port
            .unwrap_or(if self.tls.is_some() { 8443 } else { 8080 })
    }
}

fn default_gateway_name() -> String {
    "gateway".into()
}

/// One pod template; `replicas` instances are started from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Default: the pod's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<String>,
    #[serde(default = "one")]
    pub replicas: u32,
    /// The app's command line. Default: a process that sleeps, for client-only pods.
    #[serde(default)]
    pub command: Vec<String>,
    /// Extra environment for the app (POD_NAME, POD_NAMESPACE and POD_IP are always set).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The UID (and GID) the app runs as. Must not be the proxy's UID.
    #[serde(default = "default_app_uid")]
    pub run_as_user: u32,
    /// `false` makes a pod outside the mesh: no capture, no sidecar.
    #[serde(default = "yes")]
    pub sidecar: bool,
    /// Extra flags for this pod's muon-init (e.g. `--exclude-outbound-ports=5432`).
    #[serde(default)]
    pub init_args: Vec<String>,
    /// Extra flags for this pod's muon-proxy.
    #[serde(default)]
    pub proxy_args: Vec<String>,
}

/// A service: a stable name and virtual IP in front of the pods its selector matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    /// Balancing, locality, outlier detection, circuit breaking and faults for clients of
    /// this service: the fields of a TrafficPolicy's spec (registered as a TrafficPolicy
    /// named after the service; in the service table without a control plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<muon_core::resource::Traffic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    pub port: u16,
    /// Default: `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// Absent: the sidecars detect the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}
fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_app_uid() -> u32 {
    1000
}

/// The pod the lab runs muon-control in.
pub const CONTROL_PLANE_POD: &str = "muon-control";

/// At most this many pod instances: addresses come from one /16.
pub const MAX_PODS: usize = 60_000;

/// A topology problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub reason: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.reason),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.reason),
            _ => write!(f, "{}: {}", self.file, self.reason),
        }
    }
}

impl std::error::Error for TopologyError {}

/// Every problem found in one file, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyErrors(pub Vec<TopologyError>);

impl fmt::Display for TopologyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TopologyErrors {}

impl PodSpec {
    /// Instance names: `web` for one replica, `web-0`, `web-1`… for more.
    pub fn instance_names(&self) -> Vec<String> {
        if self.replicas == 1 {
            vec![self.name.clone()]
        } else {
            (0..self.replicas)
                .map(|i| format!("{}-{i}", self.name))
                .collect()
        }
    }

    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }
}

impl PortSpec {
    pub fn target_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

impl ServiceSpec {
    pub fn selects(&self, pod: &PodSpec) -> bool {
        pod.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

impl Topology {
    /// Reads and validates a topology file.
    pub fn load(path: &Path) -> Result<Topology, TopologyErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            TopologyErrors(vec![TopologyError {
                file: file.clone(),
                line: None,
                column: None,
                reason: format!("cannot read: {e}"),
            }])
        })?;
        Self::parse(&file, &text)
    }

    /// Parses and validates topology text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Topology, TopologyErrors> {
        let topo: Topology = serde_norway::from_str(text).map_err(|e| {
            let loc = e.location();
            // The library appends " at line L column C"; we put the location up front instead.
            let msg = e.to_string();
            let reason = match msg.rfind(" at line ") {
                Some(i) if loc.is_some() => msg[..i].to_string(),
                _ => msg,
            };
            TopologyErrors(vec![TopologyError {
                file: file.to_string(),
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
                reason,
            }])
        })?;
        let problems = topo.validate();
        if problems.is_empty() {
            return Ok(topo);
        }
        let locator = Locator::new(text);
        Err(TopologyErrors(
            problems
                .into_iter()
                .map(|(path, reason)| TopologyError {
                    file: file.to_string(),
                    line: locator.line_of(&path),
                    column: None,
                    reason: format!("{}: {reason}", path.display()),
                })
                .collect(),
        ))
    }

    /// Checks what serde cannot: names, uniqueness, ranges. Returns every problem.
    fn validate(&self) -> Vec<(ItemPath, String)> {
        let mut out = Vec::new();
        let mut instances = HashSet::new();
        let mut total = 0usize;
        if self.pods.is_empty() {
            out.push((ItemPath::Root, "no pods: a lab needs at least one".into()));
        }
        for (i, pod) in self.pods.iter().enumerate() {
            let at = ItemPath::Pod(i);
            if pod.name == CONTROL_PLANE_POD {
                out.push((
                    at,
                    format!(
                        "the name {CONTROL_PLANE_POD:?} is reserved for the lab's control plane"
                    ),
                ));
            }
            if let Err(r) = check_name(&pod.name, 40) {
                out.push((at, format!("name {:?}: {r}", pod.name)));
            }
            if let Err(r) = check_name(&pod.namespace, 63) {
                out.push((at, format!("namespace {:?}: {r}", pod.namespace)));
            }
            if let Some(sa) = &pod.service_account {
                if let Err(r) = check_name(sa, 63) {
                    out.push((at, format!("serviceAccount {sa:?}: {r}")));
                }
            }
            if pod.replicas == 0 || pod.replicas > 1000 {
                out.push((
                    at,
                    format!("replicas {} is out of range 1..=1000", pod.replicas),
                ));
            }
            if pod.run_as_user == 0 || pod.run_as_user == muon_core::ports::PROXY_UID {
                out.push((
                    at,
                    format!(
                        "runAsUser {} is not allowed: the app must not run as root or as the proxy's UID {}",
                        pod.run_as_user,
                        muon_core::ports::PROXY_UID
                    ),
                ));
            }
            if pod.command.first().is_some_and(|c| c.is_empty()) {
                out.push((at, "command: the program name is empty".into()));
            }
            for key in pod.env.keys() {
                if key.is_empty() || key.contains('=') {
                    out.push((at, format!("env: {key:?} is not a valid variable name")));
                }
            }
            for name in pod.instance_names() {
                if !instances.insert(name.clone()) {
                    out.push((at, format!("pod instance {name:?} is defined twice (pod names are unique in a lab)")));
                }
            }
            total += pod.replicas as usize;
        }
        if total > MAX_PODS {
            out.push((
                ItemPath::Root,
                format!("{total} pod instances; at most {MAX_PODS}"),
            ));
        }
        if let Some(g) = &self.gateway {
            if let Err(r) = check_name(&g.name, 40) {
                out.push((ItemPath::Root, format!("gateway: name {:?}: {r}", g.name)));
            }
            if let Err(r) = check_name(&g.namespace, 63) {
                out.push((
                    ItemPath::Root,
                    format!("gateway: namespace {:?}: {r}", g.namespace),
                ));
            }
            if g.name == CONTROL_PLANE_POD || instances.contains(&g.name) {
                out.push((
                    ItemPath::Root,
                    format!("gateway: name {:?} is already a pod's", g.name),
                ));
            }
            if !self.control_plane {
                out.push((
                    ItemPath::Root,
                    "gateway: needs the control plane (controlPlane: true): it serves the routes applied to it".into(),
                ));
            }
            if g.port == Some(0) || g.host_port == Some(0) {
                out.push((ItemPath::Root, "gateway: ports must be 1..=65535".into()));
            }
            if let Some(tls) = &g.tls {
                for (what, f) in [("certFile", &tls.cert_file), ("keyFile", &tls.key_file)] {
                    if !Path::new(f).is_file() {
                        out.push((
                            ItemPath::Root,
                            format!("gateway: tls.{what} {f:?} is not a file"),
                        ));
                    }
                }
            }
        }
        let mut services = HashSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            let at = ItemPath::Service(i);
            if let Err(r) = check_name(&svc.name, 63) {
                out.push((at, format!("name {:?}: {r}", svc.name)));
            }
            if let Err(r) = check_name(&svc.namespace, 63) {
                out.push((at, format!("namespace {:?}: {r}", svc.namespace)));
            }
            if !services.insert((svc.name.clone(), svc.namespace.clone())) {
                out.push((
                    at,
                    format!("service {}.{} is defined twice", svc.name, svc.namespace),
                ));
            }
            if svc.selector.is_empty() {
                out.push((at, "selector is empty: it would select nothing".into()));
            }
            if svc.ports.is_empty() {
                out.push((at, "ports: a service needs at least one port".into()));
            }
            let mut ports = HashSet::new();
            for p in &svc.ports {
                if p.port == 0 || p.target_port == Some(0) {
                    out.push((at, format!("port {}: ports must be 1..=65535", p.port)));
                }
                if !ports.insert(p.port) {
                    out.push((at, format!("port {} is listed twice", p.port)));
                }
            }
        }
        out
    }
}

/// DNS-1123 label rules, like Kubernetes names, with a length limit that keeps the derived
/// network namespace and interface names valid.
pub fn check_name(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > max {
        return Err(format!("longer than {max} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("use only lowercase letters, digits and '-'".into());
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// Where in the file a semantic problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemPath {
    Root,
    Pod(usize),
    Service(usize),
}

impl ItemPath {
    fn display(&self) -> String {
        match self {
            ItemPath::Root => "topology".into(),
            ItemPath::Pod(i) => format!("pods[{i}]"),
            ItemPath::Service(i) => format!("services[{i}]"),
        }
    }
}

/// Finds the line where the n-th item of the top-level `pods:` or `services:` list starts.
/// Serde does not keep spans after a successful parse, and the file is small and
/// block-style in practice, so a scan of the text is enough to point at the right line.
struct Locator<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str) -> Self {
        Locator {
            lines: text.lines().collect(),
        }
    }

    fn line_of(&self, path: &ItemPath) -> Option<usize> {
        let (key, n) = match path {
            ItemPath::Root => return None,
            ItemPath::Pod(i) => ("pods:", *i),
            ItemPath::Service(i) => ("services:", *i),
        };
        let start = self
            .lines
            .iter()
            .position(|l| l.trim_end().starts_with(key))?;
        let mut item_indent = None;
        let mut seen = 0usize;
        for (idx, line) in self.lines.iter().enumerate().skip(start + 1) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            if indent == 0 && !trimmed.starts_with('-') {
                break; // the next top-level key
            }
            if trimmed.starts_with("- ") || trimmed == "-" {
                let want = *item_indent.get_or_insert(indent);
                if indent == want {
                    if seen == n {
                        return Some(idx + 1);
                    }
                    seen += 1;
                }
            }
        }
        Some(start + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
pods:
  - name: web
    labels: {app: web}
    zone: zone-a
    replicas: 2
    command: [\"python3\", \"-m\", \"http.server\", \"8080\"]
  - name: client
    sidecar: true
services:
  - name: web
    selector: {app: web}
    ports:
      - port: 8080
        protocol: http
";

    #[test]
    fn a_gateway_gets_its_defaults_and_its_problems_are_named() {
        let t = Topology::parse(
            "t.yaml",
            &format!("{GOOD}gateway: {{name: edge, hostPort: 18080}}\n"),
        )
        .unwrap();
        let g = t.gateway.unwrap();
        assert_eq!(
            (g.name.as_str(), g.namespace.as_str(), g.port(), g.host_port),
            ("edge", "default", 8080, Some(18080))
        );
        let bad = format!("{GOOD}controlPlane: false\ngateway: {{name: web-0, tls: {{certFile: /nope.pem, keyFile: /nope.key}}}}\n");
        let err = Topology::parse("t.yaml", &bad).unwrap_err().to_string();
        for want in [
            "already a pod's",
            "needs the control plane",
            "tls.certFile \"/nope.pem\" is not a file",
        ] {
            assert!(err.contains(want), "{want} missing from {err}");
        }
    }

    #[test]
    fn parses_the_documented_shape_with_defaults() {
        let t = Topology::parse("t.yaml", GOOD).unwrap();
        assert_eq!(t.pods.len(), 2);
        let web = &t.pods[0];
        assert_eq!(web.namespace, "default");
        assert_eq!(web.service_account(), "web");
        assert_eq!(web.instance_names(), vec!["web-0", "web-1"]);
        assert!(t.pods[1].sidecar);
        assert_eq!(t.pods[1].instance_names(), vec!["client"]);
        assert_eq!(t.services[0].ports[0].target_port(), 8080);
        assert_eq!(t.services[0].ports[0].protocol, Some(Protocol::Http));
        assert!(t.services[0].selects(web));
        assert!(!t.services[0].selects(&t.pods[1]));
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = GOOD.replace("    zone: zone-a", "    zome: zone-a");
        let err = Topology::parse("t.yaml", &text).unwrap_err().to_string();
        assert!(
            err.starts_with("t.yaml:4:5: pods[0]: unknown field `zome`"),
            "{err}"
        );
    }

    #[test]
    fn bad_protocol_is_refused_with_the_allowed_values() {
        let text = GOOD.replace("protocol: http", "protocol: htp");
        let err = Topology::parse("t.yaml", &text).unwrap_err().to_string();
        assert!(err.starts_with("t.yaml:14:"), "{err}");
        assert!(
            err.contains("unknown variant `htp`") && err.contains("grpc"),
            "{err}"
        );
    }

    #[test]
    fn negative_replicas_is_a_type_error_with_location() {
        let text = GOOD.replace("replicas: 2", "replicas: -2");
        let err = Topology::parse("t.yaml", &text).unwrap_err().to_string();
        assert!(err.starts_with("t.yaml:5:"), "{err}");
    }

    #[test]
    fn semantic_errors_are_all_reported_with_their_item_line() {
        let text = "\
pods:
  - name: web
  - name: Web_1
    replicas: 0
  - name: web
    runAsUser: 1337
services:
  - name: web
    selector: {}
    ports: []
";
        let errs = Topology::parse("t.yaml", text).unwrap_err();
        let all = errs.to_string();
        assert!(all.contains("t.yaml:3: pods[1]: name \"Web_1\""), "{all}");
        assert!(all.contains("t.yaml:3: pods[1]: replicas 0"), "{all}");
        assert!(
            all.contains("t.yaml:5: pods[2]: pod instance \"web\" is defined twice"),
            "{all}"
        );
        assert!(all.contains("t.yaml:5: pods[2]: runAsUser 1337"), "{all}");
        assert!(
            all.contains("t.yaml:8: services[0]: selector is empty"),
            "{all}"
        );
        assert!(all.contains("t.yaml:8: services[0]: ports"), "{all}");
        assert_eq!(errs.0.len(), 6, "{all}");
    }

    #[test]
    fn syntax_error_has_a_location() {
        let err = Topology::parse("t.yaml", "pods: [\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("t.yaml:2:1:"), "{err}");
    }

    #[test]
    fn empty_topology_is_refused() {
        let err = Topology::parse("t.yaml", "services: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no pods"), "{err}");
    }
}
