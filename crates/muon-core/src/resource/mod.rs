//! The objects users write (`muonctl apply -f`, the control plane's `--config-dir`), in a
//! Kubernetes-style envelope, with their validation.
//!
//! Kinds: `muon.io/v1alpha1` `Service`, `Workload`, `AuthorizationPolicy` and
//! `PeerAuthentication` (see [`policy`]), and the Gateway API's
//! `gateway.networking.k8s.io/v1` `HTTPRoute`, `GRPCRoute` and `Gateway` (see [`route`] and
//! [`gateway`]). Parsing is strict (camelCase, unknown fields
//! refused) and validation reports every problem of every object at once, each naming the
//! object, the field path and the reason. The control plane converts these objects to the
//! data plane's resources; nothing here performs I/O.
//!
//! Leaf values that users get wrong most often (IPs, protocols, durations) are read as strings
//! and checked here, so that the message can name the field; serde only reports structure
//! errors (unknown or missing fields, wrong types).

mod gateway;
pub mod policy;
mod route;
pub mod traffic;

pub use gateway::*;
pub use policy::{AuthorizationPolicySpec, PeerAuthenticationSpec, WorkloadSelector};
pub use route::*;
pub use traffic::{
    BackendTrafficPolicySpec, Retry, Traffic, TrafficPolicySpec, GATEWAY_X_API_VERSION,
};

use crate::table::Protocol;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

pub const MUON_API_VERSION: &str = "muon.io/v1alpha1";
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// The Gateway API's group (a `parentRef` to a `Gateway` may name it).
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// Muon's own group.
pub const MUON_GROUP: &str = "muon.io";
pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// The largest weight a workload or backend may carry (the Gateway API's limit).
pub const MAX_WEIGHT: u32 = 1_000_000;

/// The object kinds the control plane knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Service,
    Workload,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    Gateway,
    AuthorizationPolicy,
    PeerAuthentication,
    TrafficPolicy,
    #[serde(rename = "XBackendTrafficPolicy")]
    BackendTrafficPolicy,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Service,
        Kind::Workload,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::Gateway,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::TrafficPolicy,
        Kind::BackendTrafficPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Workload => "Workload",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::Gateway => "Gateway",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::BackendTrafficPolicy => "XBackendTrafficPolicy",
        }
    }

    /// The `apiVersion` objects of this kind carry (and are written back with).
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service
            | Kind::Workload
            | Kind::AuthorizationPolicy
            | Kind::PeerAuthentication
            | Kind::TrafficPolicy => MUON_API_VERSION,
            Kind::HttpRoute | Kind::GrpcRoute | Kind::Gateway => GATEWAY_API_VERSION,
            Kind::BackendTrafficPolicy => GATEWAY_X_API_VERSION,
        }
    }

    /// Every `apiVersion` accepted for this kind: a `Gateway` may also be written as Muon's
    /// own (`muon.io/v1alpha1`), with the same fields.
    pub fn accepts_api_version(self, api_version: &str) -> bool {
        api_version == self.api_version()
            || (self == Kind::Gateway && api_version == MUON_API_VERSION)
    }

    /// Parses a kind as users type it: `Service`, `service`, `services`, `httproutes`,
    /// `authorizationpolicies`, `peerauthn`.
    pub fn parse(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        match (lower.as_str(), singular) {
            ("authorizationpolicy" | "authorizationpolicies" | "authz", _) => {
                Some(Kind::AuthorizationPolicy)
            }
            ("peerauthn" | "pa", _) | (_, "peerauthentication") => Some(Kind::PeerAuthentication),
            ("trafficpolicy" | "trafficpolicies" | "tp", _) => Some(Kind::TrafficPolicy),
            (
                "xbackendtrafficpolicy"
                | "xbackendtrafficpolicies"
                | "backendtrafficpolicy"
                | "backendtrafficpolicies"
                | "btp",
                _,
            ) => Some(Kind::BackendTrafficPolicy),
            (_, "service") | ("svc", _) => Some(Kind::Service),
            (_, "workload") => Some(Kind::Workload),
            (_, "httproute") => Some(Kind::HttpRoute),
            (_, "grpcroute") => Some(Kind::GrpcRoute),
            (_, "gateway") | ("gw", _) => Some(Kind::Gateway),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies an object: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// A validated object. Only [`Object::from_json`] and [`Object::from_parts`] build one from
/// user input, and both validate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Service(ServiceSpec),
    Workload(WorkloadSpec),
    HttpRoute(HttpRouteSpec),
    GrpcRoute(GrpcRouteSpec),
    Gateway(GatewaySpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
    PeerAuthentication(PeerAuthenticationSpec),
    TrafficPolicy(TrafficPolicySpec),
    BackendTrafficPolicy(BackendTrafficPolicySpec),
}

// ---------------------------------------------------------------------------------------------
// Service

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Virtual IPs clients connect to.
    pub vips: Vec<String>,
    pub ports: Vec<ServicePortSpec>,
    /// Workloads in the same namespace whose labels include all of these are its endpoints.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortSpec {
    pub port: u32,
    /// The workloads' port; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
    /// `tcp`, `http`, `http2`, `grpc`, `tls` or `opaque`. Absent: sidecars detect the
    /// protocol from the first bytes of each connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ServicePortSpec {
    pub fn target_port(&self) -> u32 {
        self.target_port.unwrap_or(self.port)
    }

    /// The declared protocol (valid once the object is validated); `None`: detect.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol.as_deref().and_then(Protocol::parse)
    }
}

// ---------------------------------------------------------------------------------------------
// Workload

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// The workload's IP address.
    pub address: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<WorkloadPortSpec>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub locality: LocalitySpec,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default = "default_true")]
    pub ready: bool,
    /// The workload runs a Muon sidecar, so other sidecars reach it over the mesh's own
    /// protocol (pooled HTTP/2 today). A workload without one gets each app's protocol.
    #[serde(default)]
    pub meshed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadPortSpec {
    pub port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalitySpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cloud: String,
}

fn default_service_account() -> String {
    DEFAULT_SERVICE_ACCOUNT.to_string()
}

pub(crate) fn default_weight() -> u32 {
    1
}

fn default_true() -> bool {
    true
}

// ---------------------------------------------------------------------------------------------
// Problems

/// One thing wrong with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `Service shop/web`, or `object 2` when the envelope itself is unreadable.
    pub object: String,
    /// The field path, e.g. `spec.ports[0].protocol`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.reason)
    }
}

/// Every problem found, in order; displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid(pub Vec<Problem>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Collects problems for one object.
pub(crate) struct Check<'a> {
    object: &'a str,
    problems: Vec<Problem>,
}

impl Check<'_> {
    pub(crate) fn fail(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            object: self.object.to_string(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    pub(crate) fn dns_label(&mut self, field: &str, value: &str) {
        if let Err(reason) = check_dns_label(value) {
            self.fail(field, reason);
        }
    }

    pub(crate) fn port(&mut self, field: &str, port: u32) {
        if !(1..=65535).contains(&port) {
            self.fail(
                field,
                format!("must be a port number from 1 to 65535, got {port}"),
            );
        }
    }

    /// An address a service or workload can have: an IP, routable unicast.
    fn ip(&mut self, field: &str, value: &str) {
        match value.parse::<IpAddr>() {
            Err(_) => self.fail(
                field,
                format!("{value:?} is not an IP address (e.g. 198.19.0.1 or 2001:db8::1)"),
            ),
            Ok(ip) => {
                if let Err(reason) = crate::net::check_unicast(ip) {
                    self.fail(field, reason);
                }
            }
        }
    }

    pub(crate) fn weight(&mut self, field: &str, weight: u32) {
        if weight > MAX_WEIGHT {
            self.fail(field, format!("must be at most {MAX_WEIGHT}, got {weight}"));
        }
    }

    fn labels(&mut self, field: &str, labels: &BTreeMap<String, String>) {
        for (k, v) in labels {
            if let Err(reason) = check_label_key(k) {
                self.fail(format!("{field}[{k:?}]"), reason);
            }
            if let Err(reason) = check_label_value(v) {
                self.fail(format!("{field}[{k:?}]"), reason);
            }
        }
    }
}

/// A DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a
/// letter or digit.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("{s:?} is longer than 63 characters"));
    }
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !s.starts_with('-') && !s.ends_with('-');
    if !ok_chars || !ok_ends {
        return Err(format!(
            "{s:?} is not a DNS-1123 label: use lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    for label in s.split('.') {
        check_dns_label(label).map_err(|_| {
            format!(
                "{s:?} is not a DNS-1123 subdomain: dot-separated labels of lowercase letters, \
                 digits and '-'"
            )
        })?;
    }
    Ok(())
}

fn is_label_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
}

fn check_label_name(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !s.is_empty()
        && s.len() <= 63
        && b.iter().all(|&c| is_label_name_char(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label {s:?} must be 1-63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ))
    }
}

/// A Kubernetes label key: an optional DNS subdomain prefix and '/', then a name.
fn check_label_key(k: &str) -> Result<(), String> {
    match k.split_once('/') {
        Some((prefix, name)) => {
            check_dns_subdomain(prefix).map_err(|e| format!("label key prefix: {e}"))?;
            check_label_name(name)
        }
        None => check_label_name(k),
    }
}

fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        Ok(())
    } else {
        check_label_name(v).map_err(|e| format!("value: {e}"))
    }
}

/// A Gateway API duration (GEP-2257); see [`crate::duration`].
pub use crate::duration::parse as parse_duration;

pub(crate) const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

pub(crate) fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

// ---------------------------------------------------------------------------------------------
// Parsing and validation

/// The envelope as users write it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Json,
}

fn strip_serde_position(e: serde_json::Error) -> String {
    // `from_value` errors carry no position; keep only the message.
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl Object {
    /// Parses and validates one object in its envelope (JSON; YAML documents convert to it).
    /// `index` names the object in messages when its envelope cannot be read.
    pub fn from_json(json: &Json, index: usize) -> Result<Object, Invalid> {
        let fallback = match (
            json.pointer("/kind").and_then(Json::as_str),
            json.pointer("/metadata/name").and_then(Json::as_str),
        ) {
            (Some(kind), Some(name)) => {
                let ns = json
                    .pointer("/metadata/namespace")
                    .and_then(Json::as_str)
                    .unwrap_or(DEFAULT_NAMESPACE);
                format!("{kind} {ns}/{name}")
            }
            _ => format!("object {}", index + 1),
        };
        let envelope: Envelope = serde_json::from_value(json.clone()).map_err(|e| {
            Invalid(vec![Problem {
                object: fallback,
                field: "(envelope)".into(),
                reason: strip_serde_position(e),
            }])
        })?;
        Object::from_parts(
            &envelope.api_version,
            &envelope.kind,
            envelope.metadata,
            &envelope.spec,
        )
    }

    /// Validates an object given as its parts (the management API carries the envelope as
    /// protobuf fields and the spec as a JSON-like `Struct`).
    pub fn from_parts(
        api_version: &str,
        kind: &str,
        metadata: Metadata,
        spec: &Json,
    ) -> Result<Object, Invalid> {
        let object = format!("{kind} {}/{}", metadata.namespace, metadata.name);
        let mut check = Check {
            object: &object,
            problems: Vec::new(),
        };
        check.dns_label("metadata.name", &metadata.name);
        check.dns_label("metadata.namespace", &metadata.namespace);
        check.labels("metadata.labels", &metadata.labels);

        let parsed_kind = Kind::ALL.into_iter().find(|k| k.as_str() == kind);
        let parsed_kind = match parsed_kind {
            Some(k) => k,
            None => {
                check.fail(
                    "kind",
                    format!(
                        "unknown kind {kind:?}; expected one of {}",
                        Kind::ALL.map(Kind::as_str).join(", ")
                    ),
                );
                return Err(Invalid(check.problems));
            }
        };
        if !parsed_kind.accepts_api_version(api_version) {
            check.fail(
                "apiVersion",
                format!(
                    "{kind} must have apiVersion {:?}, got {api_version:?}",
                    parsed_kind.api_version()
                ),
            );
        }
        if spec.is_null() {
            check.fail("spec", "is required");
            return Err(Invalid(check.problems));
        }
        let spec = match parsed_kind {
            Kind::Service => parse_spec(&mut check, spec).map(|s: ServiceSpec| {
                validate_service(&mut check, &s);
                Spec::Service(s)
            }),
            Kind::Workload => parse_spec(&mut check, spec).map(|s: WorkloadSpec| {
                validate_workload(&mut check, &s);
                Spec::Workload(s)
            }),
            Kind::HttpRoute => parse_spec(&mut check, spec).map(|s: HttpRouteSpec| {
                route::validate_http_route(&mut check, &s);
                Spec::HttpRoute(s)
            }),
            Kind::GrpcRoute => parse_spec(&mut check, spec).map(|s: GrpcRouteSpec| {
                route::validate_grpc_route(&mut check, &s);
                Spec::GrpcRoute(s)
            }),
            Kind::Gateway => parse_spec(&mut check, spec).map(|s: GatewaySpec| {
                gateway::validate(&mut check, &s);
                Spec::Gateway(s)
            }),
            Kind::AuthorizationPolicy => {
                parse_spec(&mut check, spec).map(|s: AuthorizationPolicySpec| {
                    policy::validate_authorization(&mut check, &s);
                    Spec::AuthorizationPolicy(s)
                })
            }
            Kind::PeerAuthentication => {
                parse_spec(&mut check, spec).map(|s: PeerAuthenticationSpec| {
                    policy::validate_peer_authentication(&mut check, &s);
                    Spec::PeerAuthentication(s)
                })
            }
            Kind::TrafficPolicy => parse_spec(&mut check, spec).map(|s: TrafficPolicySpec| {
                traffic::validate_traffic_policy(&mut check, &s);
                Spec::TrafficPolicy(s)
            }),
            Kind::BackendTrafficPolicy => {
                parse_spec(&mut check, spec).map(|s: BackendTrafficPolicySpec| {
                    traffic::validate_backend_traffic(&mut check, &s);
                    Spec::BackendTrafficPolicy(s)
                })
            }
        };
        match spec {
            Some(spec) if check.problems.is_empty() => Ok(Object { metadata, spec }),
            _ => Err(Invalid(check.problems)),
        }
    }

    pub fn kind(&self) -> Kind {
        match self.spec {
            Spec::Service(_) => Kind::Service,
            Spec::Workload(_) => Kind::Workload,
            Spec::HttpRoute(_) => Kind::HttpRoute,
            Spec::GrpcRoute(_) => Kind::GrpcRoute,
            Spec::Gateway(_) => Kind::Gateway,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Spec::PeerAuthentication(_) => Kind::PeerAuthentication,
            Spec::TrafficPolicy(_) => Kind::TrafficPolicy,
            Spec::BackendTrafficPolicy(_) => Kind::BackendTrafficPolicy,
        }
    }

    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            kind: self.kind(),
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
        }
    }

    /// The spec as JSON, defaults filled in.
    pub fn spec_json(&self) -> Json {
        let v = match &self.spec {
            Spec::Service(s) => serde_json::to_value(s),
            Spec::Workload(s) => serde_json::to_value(s),
            Spec::HttpRoute(s) => serde_json::to_value(s),
            Spec::GrpcRoute(s) => serde_json::to_value(s),
            Spec::Gateway(s) => serde_json::to_value(s),
            Spec::AuthorizationPolicy(s) => serde_json::to_value(s),
            Spec::PeerAuthentication(s) => serde_json::to_value(s),
            Spec::TrafficPolicy(s) => serde_json::to_value(s),
            Spec::BackendTrafficPolicy(s) => serde_json::to_value(s),
        };
        // Serialising plain data with string keys cannot fail.
        v.unwrap_or(Json::Null)
    }

    /// The whole object in its envelope, as users write it.
    pub fn to_json(&self) -> Json {
        serde_json::json!({
            "apiVersion": self.kind().api_version(),
            "kind": self.kind().as_str(),
            "metadata": self.metadata,
            "spec": self.spec_json(),
        })
    }
}

fn parse_spec<T: serde::de::DeserializeOwned>(check: &mut Check<'_>, spec: &Json) -> Option<T> {
    match serde_json::from_value(spec.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            check.fail("spec", strip_serde_position(e));
            None
        }
    }
}

fn validate_service(check: &mut Check<'_>, s: &ServiceSpec) {
    if s.vips.is_empty() {
        check.fail("spec.vips", "needs at least one virtual IP");
    }
    let mut seen = BTreeSet::new();
    for (i, vip) in s.vips.iter().enumerate() {
        let field = format!("spec.vips[{i}]");
        check.ip(&field, vip);
        if let Ok(ip) = vip.parse::<IpAddr>() {
            if !seen.insert(ip) {
                check.fail(field, format!("{vip} is listed twice"));
            }
        }
    }
    if s.ports.is_empty() {
        check.fail("spec.ports", "needs at least one port");
    }
    let mut ports = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        check.port(&format!("{field}.port"), p.port);
        if !ports.insert(p.port) {
            check.fail(
                format!("{field}.port"),
                format!("port {} is listed twice", p.port),
            );
        }
        if let Some(t) = p.target_port {
            check.port(&format!("{field}.targetPort"), t);
        }
        if let Some(proto) = p.protocol.as_deref() {
            if Protocol::parse(proto).is_none() {
                check.fail(
                    format!("{field}.protocol"),
                    format!(
                        "unknown protocol {proto:?}; expected one of tcp, http, http2, grpc, tls, opaque"
                    ),
                );
            }
        }
        if let Some(name) = &p.name {
            check.dns_label(&format!("{field}.name"), name);
            if !names.insert(name) {
                check.fail(
                    format!("{field}.name"),
                    format!("port name {name:?} is used twice"),
                );
            }
        }
    }
    check.labels("spec.selector", &s.selector);
}

fn validate_workload(check: &mut Check<'_>, w: &WorkloadSpec) {
    check.ip("spec.address", &w.address);
    for (i, p) in w.ports.iter().enumerate() {
        check.port(&format!("spec.ports[{i}].port"), p.port);
        if let Some(name) = &p.name {
            check.dns_label(&format!("spec.ports[{i}].name"), name);
        }
        if let Some(proto) = &p.protocol {
            if Protocol::parse(proto).is_none() {
                check.fail(
                    format!("spec.ports[{i}].protocol"),
                    format!(
                        "unknown protocol {proto:?}; expected one of tcp, http, http2, grpc, tls, opaque"
                    ),
                );
            }
        }
    }
    if let Err(reason) = check_dns_subdomain(&w.service_account) {
        check.fail("spec.serviceAccount", reason);
    }
    check.weight("spec.weight", w.weight);
}

/// Whether `labels` include every pair of a non-empty `selector` (an empty selector selects
/// nothing, as for a Kubernetes Service without one).
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Json) -> Result<Object, Invalid> {
        Object::from_json(&v, 0)
    }

    fn problems(v: Json) -> Vec<String> {
        parse(v)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn service() -> Json {
        json!({
            "apiVersion": "muon.io/v1alpha1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "vips": ["198.19.0.1"],
                "ports": [{"port": 8080, "protocol": "http", "name": "http"}],
                "selector": {"app": "web"}
            }
        })
    }

    #[test]
    fn service_parses_with_defaults() {
        let o = parse(service()).unwrap();
        assert_eq!(o.kind(), Kind::Service);
        let Spec::Service(s) = &o.spec else {
            panic!("not a service")
        };
        assert_eq!(s.ports[0].target_port(), 8080);
        assert_eq!(s.ports[0].protocol(), Some(Protocol::Http));
        let mut v = service();
        v["metadata"] = json!({"name": "web"});
        assert_eq!(parse(v).unwrap().metadata.namespace, "default");
    }

    #[test]
    fn object_round_trips_through_json() {
        let o = parse(service()).unwrap();
        assert_eq!(parse(o.to_json()).unwrap(), o);
    }

    #[test]
    fn every_service_problem_is_reported_at_once() {
        let mut v = service();
        v["metadata"]["name"] = json!("Web_1");
        v["spec"]["vips"] = json!(["198.19.0.300"]);
        v["spec"]["ports"] = json!([
            {"port": 0, "protocol": "htp"},
            {"port": 80, "targetPort": 70000}
        ]);
        let p = problems(v);
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(
            p[0].starts_with("Service shop/Web_1: metadata.name: "),
            "{}",
            p[0]
        );
        assert!(p
            .iter()
            .any(|m| m.contains("spec.vips[0]: \"198.19.0.300\" is not an IP")));
        assert!(p
            .iter()
            .any(|m| m.contains("spec.ports[0].port: must be a port number")));
        assert!(p
            .iter()
            .any(|m| m.contains("spec.ports[0].protocol: unknown protocol \"htp\"")));
        assert!(p
            .iter()
            .any(|m| m.contains("spec.ports[1].targetPort: must be a port number")));
    }

    #[test]
    fn vips_and_workload_addresses_must_be_routable_unicast() {
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "fe80::1",
        ] {
            let mut v = service();
            v["spec"]["vips"] = json!([bad]);
            let p = problems(v);
            assert!(
                p[0].starts_with("Service shop/web: spec.vips[0]: ")
                    && p[0].contains("not a routable unicast"),
                "{bad}: {p:?}"
            );
        }
        let p = problems(json!({
            "apiVersion": "muon.io/v1alpha1", "kind": "Workload",
            "metadata": {"name": "w"}, "spec": {"address": "127.0.0.1"}
        }));
        assert!(
            p[0].contains("spec.address: 127.0.0.1 is a loopback address"),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        let mut v = service();
        v["spec"]["ports"][0]["tragetPort"] = json!(80);
        let p = problems(v);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("Service shop/web: spec: unknown field `tragetPort`"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn wrong_api_version_and_unknown_kind_are_named() {
        let mut v = service();
        v["apiVersion"] = json!("v1");
        assert!(problems(v)[0]
            .contains("apiVersion: Service must have apiVersion \"muon.io/v1alpha1\""));
        let mut v = service();
        v["kind"] = json!("Deployment");
        assert!(problems(v)[0].contains("kind: unknown kind \"Deployment\""));
    }

    #[test]
    fn missing_metadata_names_the_object_by_position() {
        let p = problems(json!({"apiVersion": "muon.io/v1alpha1", "kind": "Service", "spec": {}}));
        assert!(
            p[0].starts_with("object 1: (envelope): missing field `metadata`"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn workload_defaults_and_validation() {
        let o = parse(json!({
            "apiVersion": "muon.io/v1alpha1",
            "kind": "Workload",
            "metadata": {"name": "web-1", "labels": {"app": "web"}},
            "spec": {"address": "198.18.0.5", "locality": {"zone": "a"}}
        }))
        .unwrap();
        let Spec::Workload(w) = &o.spec else {
            panic!("not a workload")
        };
        assert_eq!((w.weight, w.ready), (1, true));
        assert_eq!(w.service_account, "default");

        let p = problems(json!({
            "apiVersion": "muon.io/v1alpha1",
            "kind": "Workload",
            "metadata": {"name": "web-1", "labels": {"app": "we b"}},
            "spec": {"address": "nowhere", "weight": 2000000, "serviceAccount": "Bad SA"}
        }));
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p[0].contains("metadata.labels[\"app\"]"), "{}", p[0]);
        assert!(p[1].contains("spec.address: \"nowhere\" is not an IP address"));
        assert!(p[2].contains("spec.serviceAccount"));
        assert!(p[3].contains("spec.weight: must be at most 1000000"));
    }

    #[test]
    fn dns_labels() {
        assert!(check_dns_label("web-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kinds_parse_as_users_type_them() {
        assert_eq!(Kind::parse("services"), Some(Kind::Service));
        assert_eq!(Kind::parse("Workload"), Some(Kind::Workload));
        assert_eq!(Kind::parse("httproutes"), Some(Kind::HttpRoute));
        assert_eq!(Kind::parse("GRPCRoute"), Some(Kind::GrpcRoute));
        assert_eq!(Kind::parse("gateways"), Some(Kind::Gateway));
        assert_eq!(
            Kind::parse("AuthorizationPolicy"),
            Some(Kind::AuthorizationPolicy)
        );
        assert_eq!(
            Kind::parse("authorizationpolicies"),
            Some(Kind::AuthorizationPolicy)
        );
        assert_eq!(
            Kind::parse("peerauthentications"),
            Some(Kind::PeerAuthentication)
        );
        assert_eq!(Kind::parse("peerauthn"), Some(Kind::PeerAuthentication));
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k), "{k}");
        }
        assert_eq!(Kind::parse("pods"), None);
    }

    #[test]
    fn empty_selector_selects_nothing() {
        let labels: BTreeMap<_, _> = [("app".to_string(), "web".to_string())].into();
        assert!(!selector_matches(&BTreeMap::new(), &labels));
        assert!(selector_matches(&labels, &labels));
    }
}
