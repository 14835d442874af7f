//! Authorization and peer authentication for this pod: the control plane's `policies`
//! compiled into what the inbound side asks of each connection and request.
//!
//! ```text
//! discovery: v1::Policy ─► PolicyDef::from_proto (checked with muon-core's validation, once)
//! table:     every PolicyDef that applies to this pod ─► Authz::compile (off the runtime)
//! inbound:   Authz::authorize(peer, port, method, path) per TCP connection / HTTP request;
//!            Authz::mtls_mode(port) for the TLS side (STRICT or PERMISSIVE)
//! ```
//!
//! A policy applies to this pod when it is in the pod's namespace and selects it (the control
//! plane names the workloads a selector selects), or covers the whole namespace, or is in the
//! root namespace (`muon-system`) without a selector: the whole mesh.
//!
//! Evaluation is Istio's: DENY policies first (any match denies); then, when no ALLOW policy
//! applies, allow; otherwise allow only what some ALLOW policy matches. A policy matches when
//! any of its rules does; a rule when any `from` and any `to` entry match (an empty list
//! matches everything); an entry when every non-empty field does. A plaintext peer has no
//! principal and no namespace: fields that require one do not match it, their `not*`
//! counterparts do. A connection that is not HTTP has no method and no path: an ALLOW entry
//! that asks for either never matches it, a DENY entry ignores them (so it denies more, never
//! less), as Istio does for TCP.
//!
//! Pure: no I/O, no clock. Decisions are counted with counters resolved at compile time.

use crate::metrics::Metrics;
use crate::Direction;
use muon_api::v1;
use muon_core::ports::ROOT_NAMESPACE;
use muon_core::resource::policy::{self as core, Action, MtlsMode, StringMatch};
use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Who is calling, as the peer sidecar's certificate names it (mutual TLS; `None`:
/// plaintext). Policies read its `principal` (`td/ns/NS/sa/SA`) and `namespace`.
pub use crate::tls::Peer as PeerIdentity;

/// What a decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a> {
    pub peer: Option<&'a PeerIdentity>,
    /// The workload port the peer connected to (the original destination's).
    pub port: u16,
    /// `None`: a TCP connection (not HTTP).
    pub http: Option<HttpAttrs<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// Without the query, normalised.
    pub path: &'a str,
}

impl<'a> Attrs<'a> {
    pub fn tcp(peer: Option<&'a PeerIdentity>, port: u16) -> Self {
        Attrs {
            peer,
            port,
            http: None,
        }
    }

    pub fn http(peer: Option<&'a PeerIdentity>, port: u16, method: &'a str, path: &'a str) -> Self {
        Attrs {
            peer,
            port,
            http: Some(HttpAttrs { method, path }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model: one policy as received

/// How specific a policy is for this pod; the more specific wins (peer authentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// In the root namespace without a selector.
    Mesh,
    /// In the pod's namespace without a selector.
    Namespace,
    /// In the pod's namespace, selecting the pod.
    Workload,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Mesh => "mesh",
            Level::Namespace => "namespace",
            Level::Workload => "workload",
        }
    }
}

/// A policy as received, checked and with its patterns built (once, when received).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyDef {
    /// `namespace/name`: how decisions, logs and metrics name it.
    pub name: Arc<str>,
    pub namespace: String,
    /// The selected workloads of `namespace` (ignored when `all_workloads`).
    pub workloads: BTreeSet<String>,
    pub all_workloads: bool,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Authorization(AuthorizationDef),
    PeerAuthentication(PeerAuthnDef),
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationDef {
    pub action: Action,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<OperationMatch>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceMatch {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct OperationMatch {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PeerAuthnDef {
    pub mode: MtlsMode,
    pub ports: BTreeMap<u16, MtlsMode>,
}

fn patterns(
    field: &str,
    values: &[String],
    parse: fn(&str) -> Result<StringMatch, String>,
) -> Result<Vec<StringMatch>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse(v).map_err(|e| format!("{field}[{i}]: {e}")))
        .collect()
}

fn ports(field: &str, values: &[u32]) -> Result<Vec<u16>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, p)| core::port_number(u64::from(*p)).map_err(|e| format!("{field}[{i}]: {e}")))
        .collect()
}

fn methods(field: &str, values: &[String]) -> Result<Vec<String>, String> {
    for (i, m) in values.iter().enumerate() {
        core::check_method(m).map_err(|e| format!("{field}[{i}]: {e}"))?;
    }
    Ok(values.to_vec())
}

fn mtls_mode(field: &str, m: i32) -> Result<MtlsMode, String> {
    match v1::MtlsMode::try_from(m) {
        Ok(v1::MtlsMode::Unset) => Ok(MtlsMode::Unset),
        Ok(v1::MtlsMode::Permissive) => Ok(MtlsMode::Permissive),
        Ok(v1::MtlsMode::Strict) => Ok(MtlsMode::Strict),
        Err(_) => Err(format!("{field}: unknown mode {m}")),
    }
}

impl PolicyDef {
    /// Checks a received policy with the validation the control plane applied, and builds
    /// its patterns. `Err` is the reason the client NACKs it with.
    pub fn from_proto(p: &v1::Policy) -> Result<PolicyDef, String> {
        if p.name.is_empty() || p.namespace.is_empty() {
            return Err("a policy needs a name and a namespace".into());
        }
        let body = match &p.kind {
            None => return Err("neither an authorization nor a peer authentication policy".into()),
            Some(v1::policy::Kind::Authorization(a)) => {
                let action = match v1::authorization_policy::Action::try_from(a.action) {
                    Ok(v1::authorization_policy::Action::Allow) => Action::Allow,
                    Ok(v1::authorization_policy::Action::Deny) => Action::Deny,
                    Err(_) => return Err(format!("unknown action {}", a.action)),
                };
                let mut rules = Vec::with_capacity(a.rules.len());
                for (r, rule) in a.rules.iter().enumerate() {
                    let mut from = Vec::with_capacity(rule.from.len());
                    for (i, s) in rule.from.iter().enumerate() {
                        let f = format!("rules[{r}].from[{i}]");
                        from.push(SourceMatch {
                            principals: patterns(
                                &format!("{f}.principals"),
                                &s.principals,
                                core::principal_match,
                            )?,
                            not_principals: patterns(
                                &format!("{f}.notPrincipals"),
                                &s.not_principals,
                                core::principal_match,
                            )?,
                            namespaces: patterns(
                                &format!("{f}.namespaces"),
                                &s.namespaces,
                                core::namespace_match,
                            )?,
                            not_namespaces: patterns(
                                &format!("{f}.notNamespaces"),
                                &s.not_namespaces,
                                core::namespace_match,
                            )?,
                        });
                    }
                    let mut to = Vec::with_capacity(rule.to.len());
                    for (i, o) in rule.to.iter().enumerate() {
                        let f = format!("rules[{r}].to[{i}]");
                        to.push(OperationMatch {
                            ports: ports(&format!("{f}.ports"), &o.ports)?,
                            not_ports: ports(&format!("{f}.notPorts"), &o.not_ports)?,
                            methods: methods(&format!("{f}.methods"), &o.methods)?,
                            not_methods: methods(&format!("{f}.notMethods"), &o.not_methods)?,
                            paths: patterns(&format!("{f}.paths"), &o.paths, core::path_match)?,
                            not_paths: patterns(
                                &format!("{f}.notPaths"),
                                &o.not_paths,
                                core::path_match,
                            )?,
                        });
                    }
                    rules.push(Rule { from, to });
                }
                Body::Authorization(AuthorizationDef { action, rules })
            }
            Some(v1::policy::Kind::PeerAuthentication(pa)) => {
                let mut ports = BTreeMap::new();
                for (port, m) in &pa.port_level_mtls {
                    let port = core::port_number(u64::from(*port))
                        .map_err(|e| format!("portLevelMtls[{port}]: {e}"))?;
                    ports.insert(port, mtls_mode(&format!("portLevelMtls[{port}]"), *m)?);
                }
                Body::PeerAuthentication(PeerAuthnDef {
                    mode: mtls_mode("mode", pa.mode)?,
                    ports,
                })
            }
        };
        Ok(PolicyDef {
            name: format!("{}/{}", p.namespace, p.name).into(),
            namespace: p.namespace.clone(),
            workloads: p.workloads.iter().cloned().collect(),
            all_workloads: p.all_workloads,
            body,
        })
    }

    /// How the policy applies to pod `pod` of namespace `namespace`, if at all.
    pub fn level(&self, pod: &str, namespace: &str) -> Option<Level> {
        if namespace.is_empty() {
            return None;
        }
        if self.namespace == namespace {
            return match self.all_workloads {
                true => Some(Level::Namespace),
                false => self.workloads.contains(pod).then_some(Level::Workload),
            };
        }
        (self.namespace == ROOT_NAMESPACE && self.all_workloads).then_some(Level::Mesh)
    }
}

// ---------------------------------------------------------------------------------------------
// Matching

fn any_match(patterns: &[StringMatch], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

impl SourceMatch {
    fn matches(&self, peer: Option<&PeerIdentity>) -> bool {
        let principal = peer.map(|p| &*p.principal);
        let namespace = peer.map(|p| &*p.namespace);
        (self.principals.is_empty() || any_match(&self.principals, principal))
            && (self.not_principals.is_empty() || !any_match(&self.not_principals, principal))
            && (self.namespaces.is_empty() || any_match(&self.namespaces, namespace))
            && (self.not_namespaces.is_empty() || !any_match(&self.not_namespaces, namespace))
    }
}

impl OperationMatch {
    fn http_only(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }

    fn matches(&self, a: &Attrs<'_>, action: Action) -> bool {
        let ports = (self.ports.is_empty() || self.ports.contains(&a.port))
            && (self.not_ports.is_empty() || !self.not_ports.contains(&a.port));
        if !ports {
            return false;
        }
        match a.http {
            Some(h) => {
                let method = |list: &[String]| list.iter().any(|m| m == h.method);
                let path = |list: &[StringMatch]| list.iter().any(|p| p.matches(h.path));
                (self.methods.is_empty() || method(&self.methods))
                    && (self.not_methods.is_empty() || !method(&self.not_methods))
                    && (self.paths.is_empty() || path(&self.paths))
                    && (self.not_paths.is_empty() || !path(&self.not_paths))
            }
            // TCP: ALLOW never grants what needs HTTP; DENY ignores it (denies more).
            None => !self.http_only() || action == Action::Deny,
        }
    }
}

impl Rule {
    fn matches(&self, a: &Attrs<'_>, action: Action) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a.peer)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a, action)))
    }
}

impl AuthorizationDef {
    /// Whether any rule matches (a policy without rules matches nothing).
    pub fn matches(&self, a: &Attrs<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(a, self.action))
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled for this pod

/// What a connection or request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No authorization policy applies to this pod: nothing was decided.
    NoPolicy,
    Allow,
    Deny,
}

/// A decision and the policy that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The DENY policy that matched, the ALLOW policy that matched, or (denied because no
    /// ALLOW policy matched) the ALLOW policies that apply. `None`: allowed because no DENY
    /// policy matched and no ALLOW policy applies.
    pub policy: Option<Arc<str>>,
    /// Denied because nothing allowed it (rather than by a DENY policy).
    pub by_default: bool,
}

impl Decision {
    const NO_POLICY: Decision = Decision {
        verdict: Verdict::NoPolicy,
        policy: None,
        by_default: false,
    };

    pub fn allowed(&self) -> bool {
        self.verdict != Verdict::Deny
    }

    /// The access log's `authz`: `allow`, `deny`, or "" when no policy applies.
    pub fn label(&self) -> &'static str {
        match self.verdict {
            Verdict::NoPolicy => "",
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }

    /// What a denied HTTP client is told.
    pub fn message(&self) -> String {
        let policy = self.policy.as_deref().unwrap_or_default();
        match (self.by_default, policy.contains(',')) {
            (false, _) => format!("RBAC: access denied by policy {policy}"),
            (true, false) => format!("RBAC: access denied: not allowed by policy {policy}"),
            (true, true) => format!(
                "RBAC: access denied: not allowed by any of the policies {}",
                policy.replace(',', ", ")
            ),
        }
    }
}

/// One authorization policy that applies, with its decision counter.
#[derive(Debug)]
struct Applied {
    def: Arc<PolicyDef>,
    level: Level,
    /// Counts what this policy decided (`deny` for DENY policies, `allow` for ALLOW ones).
    decided: Counter,
}

impl Applied {
    fn authorization(&self) -> Option<&AuthorizationDef> {
        match &self.def.body {
            Body::Authorization(a) => Some(a),
            Body::PeerAuthentication(_) => None,
        }
    }
}

/// STRICT or PERMISSIVE: whether a port of this pod accepts plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mtls {
    Permissive,
    Strict,
}

impl Mtls {
    pub fn as_str(self) -> &'static str {
        match self {
            Mtls::Permissive => "PERMISSIVE",
            Mtls::Strict => "STRICT",
        }
    }
}

/// The policies of this pod, compiled: what the inbound side asks.
#[derive(Debug)]
pub struct Authz {
    deny: Vec<Applied>,
    allow: Vec<Applied>,
    /// Names the ALLOW policies when none matched (`ns/a,ns/b`).
    not_allowed: Arc<str>,
    not_allowed_count: Counter,
    /// Allowed because no DENY policy matched and no ALLOW policy applies.
    default_allow_count: Counter,
    /// The peer authentication of each level that has one (the first by name).
    peer_authn: Vec<(Level, Arc<PolicyDef>)>,
    mtls_default: Mtls,
    mtls_ports: HashMap<u16, Mtls>,
    /// Every policy compiled in, to tell whether a new table changed them.
    sources: Vec<Arc<PolicyDef>>,
}

impl Default for Authz {
    fn default() -> Self {
        Authz {
            deny: Vec::new(),
            allow: Vec::new(),
            not_allowed: "".into(),
            not_allowed_count: Counter::default(),
            default_allow_count: Counter::default(),
            peer_authn: Vec::new(),
            mtls_default: Mtls::Permissive,
            mtls_ports: HashMap::new(),
            sources: Vec::new(),
        }
    }
}

impl Authz {
    /// The policies among `policies` (by resource name) that apply to pod `pod` of
    /// `namespace`. Counters are resolved here, not per decision.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a Arc<PolicyDef>>,
        pod: &str,
        namespace: &str,
        metrics: &Metrics,
    ) -> Authz {
        let mut authz = Authz::default();
        let mut peer_authn: BTreeMap<Level, Arc<PolicyDef>> = BTreeMap::new();
        let counter =
            |decision, policy: &str| metrics.authz_decision(Direction::Inbound, decision, policy);
        for def in policies {
            let Some(level) = def.level(pod, namespace) else {
                continue;
            };
            authz.sources.push(def.clone());
            match &def.body {
                Body::Authorization(a) => {
                    let (list, decision) = match a.action {
                        Action::Deny => (&mut authz.deny, "deny"),
                        Action::Allow => (&mut authz.allow, "allow"),
                    };
                    list.push(Applied {
                        decided: counter(decision, &def.name),
                        def: def.clone(),
                        level,
                    });
                }
                Body::PeerAuthentication(_) => {
                    // Several at one level: the first by name wins (Istio takes the oldest).
                    peer_authn.entry(level).or_insert_with(|| def.clone());
                }
            }
        }
        if !authz.deny.is_empty() || !authz.allow.is_empty() {
            let names: Vec<&str> = authz.allow.iter().map(|a| &*a.def.name).collect();
            authz.not_allowed = names.join(",").into();
            authz.not_allowed_count = counter("deny", &authz.not_allowed);
            authz.default_allow_count = counter("allow", "");
        }
        // The most specific level first.
        authz.peer_authn = peer_authn.into_iter().rev().collect();
        let ports: BTreeSet<u16> = authz
            .peer_authn
            .iter()
            .filter_map(|(_, d)| match &d.body {
                Body::PeerAuthentication(p) => Some(p.ports.keys().copied()),
                Body::Authorization(_) => None,
            })
            .flatten()
            .collect();
        authz.mtls_default = authz.resolve_mtls(None);
        authz.mtls_ports = ports
            .into_iter()
            .map(|p| (p, authz.resolve_mtls(Some(p))))
            .collect();
        authz
    }

    /// The mode of `port` (`None`: a port no policy names): the most specific level that
    /// says STRICT or PERMISSIVE decides, its port-level setting before its own mode.
    fn resolve_mtls(&self, port: Option<u16>) -> Mtls {
        for (_, def) in &self.peer_authn {
            let Body::PeerAuthentication(p) = &def.body else {
                continue;
            };
            let at_port = port.and_then(|port| p.ports.get(&port)).copied();
            for mode in [at_port.unwrap_or_default(), p.mode] {
                match mode {
                    MtlsMode::Strict => return Mtls::Strict,
                    MtlsMode::Permissive => return Mtls::Permissive,
                    MtlsMode::Unset => {}
                }
            }
        }
        Mtls::Permissive
    }

    /// Whether plaintext is accepted on this pod's `port` (for the TLS side to enforce).
    pub fn mtls_mode(&self, port: u16) -> Mtls {
        self.mtls_ports
            .get(&port)
            .copied()
            .unwrap_or(self.mtls_default)
    }

    /// No authorization policy applies: every decision is [`Verdict::NoPolicy`].
    pub fn is_open(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    fn decide(&self, a: &Attrs<'_>) -> (Decision, Option<&Counter>) {
        if self.is_open() {
            return (Decision::NO_POLICY, None);
        }
        fn matched<'p>(list: &'p [Applied], a: &Attrs<'_>) -> Option<&'p Applied> {
            list.iter()
                .find(|p| p.authorization().is_some_and(|d| d.matches(a)))
        }
        if let Some(p) = matched(&self.deny, a) {
            let d = Decision {
                verdict: Verdict::Deny,
                policy: Some(p.def.name.clone()),
                by_default: false,
            };
            return (d, Some(&p.decided));
        }
        if self.allow.is_empty() {
            let d = Decision {
                verdict: Verdict::Allow,
                policy: None,
                by_default: false,
            };
            return (d, Some(&self.default_allow_count));
        }
        match matched(&self.allow, a) {
            Some(p) => {
                let d = Decision {
                    verdict: Verdict::Allow,
                    policy: Some(p.def.name.clone()),
                    by_default: false,
                };
                (d, Some(&p.decided))
            }
            None => {
                let d = Decision {
                    verdict: Verdict::Deny,
                    policy: Some(self.not_allowed.clone()),
                    by_default: true,
                };
                (d, Some(&self.not_allowed_count))
            }
        }
    }

    /// Decides a new connection or request, and counts the decision.
    pub fn authorize(&self, a: &Attrs<'_>) -> Decision {
        let (d, counter) = self.decide(a);
        if let Some(c) = counter {
            c.inc();
        }
        d
    }

    /// Decides an open connection again after a policy change; counts only a denial (the
    /// connection was counted when it was allowed).
    pub fn recheck(&self, a: &Attrs<'_>) -> Decision {
        let (d, counter) = self.decide(a);
        if let (false, Some(c)) = (d.allowed(), counter) {
            c.inc();
        }
        d
    }

    /// Whether `other` was compiled from the same policies (so open connections need no new
    /// look).
    pub fn same_policies(&self, other: &Authz) -> bool {
        self.sources.len() == other.sources.len()
            && self
                .sources
                .iter()
                .zip(&other.sources)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }

    /// `/config_dump`'s view: the policies that apply, and the mTLS mode per port.
    pub fn dump(&self) -> Value {
        let applied = |list: &[Applied]| {
            list.iter()
                .map(|p| json!({"name": &*p.def.name, "level": p.level.as_str()}))
                .collect::<Vec<_>>()
        };
        let mut ports: Vec<(&u16, &Mtls)> = self.mtls_ports.iter().collect();
        ports.sort_by_key(|(p, _)| **p);
        json!({
            "deny": applied(&self.deny),
            "allow": applied(&self.allow),
            "peerAuthentication": self.peer_authn.iter()
                .map(|(level, d)| json!({"name": &*d.name, "level": level.as_str()}))
                .collect::<Vec<_>>(),
            "mtls": {
                "default": self.mtls_default.as_str(),
                "ports": ports.into_iter()
                    .map(|(p, m)| (p.to_string(), Value::from(m.as_str())))
                    .collect::<serde_json::Map<_, _>>(),
            },
        })
    }
}

/// `/config_dump`'s view of a received policy (prost types have no serde).
pub fn dump_proto(p: &v1::Policy) -> Value {
    let selector = |s: &Option<v1::WorkloadSelector>| {
        s.as_ref().map(|s| {
            let labels: BTreeMap<&String, &String> = s.match_labels.iter().collect();
            json!({"matchLabels": labels})
        })
    };
    let mode = |m: i32| {
        v1::MtlsMode::try_from(m)
            .map(|m| m.as_str_name())
            .unwrap_or("?")
    };
    let body = match &p.kind {
        Some(v1::policy::Kind::Authorization(a)) => json!({
            "kind": "AuthorizationPolicy",
            "selector": selector(&a.selector),
            "action": v1::authorization_policy::Action::try_from(a.action)
                .map(|a| a.as_str_name()).unwrap_or("?"),
            "rules": a.rules.iter().map(|r| json!({
                "from": r.from.iter().map(|s| json!({
                    "principals": s.principals, "notPrincipals": s.not_principals,
                    "namespaces": s.namespaces, "notNamespaces": s.not_namespaces,
                })).collect::<Vec<_>>(),
                "to": r.to.iter().map(|o| json!({
                    "ports": o.ports, "notPorts": o.not_ports,
                    "methods": o.methods, "notMethods": o.not_methods,
                    "paths": o.paths, "notPaths": o.not_paths,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
        Some(v1::policy::Kind::PeerAuthentication(pa)) => {
            let ports: BTreeMap<String, &str> = pa
                .port_level_mtls
                .iter()
                .map(|(p, m)| (p.to_string(), mode(*m)))
                .collect();
            json!({
                "kind": "PeerAuthentication",
                "selector": selector(&pa.selector),
                "mode": mode(pa.mode),
                "portLevelMtls": ports,
            })
        }
        None => Value::Null,
    };
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "workloads": p.workloads,
        "allWorkloads": p.all_workloads,
        "policy": body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::authorization_policy::Action as A;

    fn rule(
        from: Vec<v1::AuthorizationSource>,
        to: Vec<v1::AuthorizationOperation>,
    ) -> v1::AuthorizationRule {
        v1::AuthorizationRule { from, to }
    }

    fn authz(name: &str, ns: &str, action: A, rules: Vec<v1::AuthorizationRule>) -> v1::Policy {
        v1::Policy {
            name: name.into(),
            namespace: ns.into(),
            kind: Some(v1::policy::Kind::Authorization(v1::AuthorizationPolicy {
                selector: None,
                action: action.into(),
                rules,
            })),
            workloads: vec![],
            all_workloads: true,
        }
    }

    fn principals(p: &[&str]) -> v1::AuthorizationSource {
        v1::AuthorizationSource {
            principals: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn paths(p: &[&str]) -> v1::AuthorizationOperation {
        v1::AuthorizationOperation {
            paths: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn ports(p: &[u32]) -> v1::AuthorizationOperation {
        v1::AuthorizationOperation {
            ports: p.to_vec(),
            ..Default::default()
        }
    }

    fn compile(policies: &[v1::Policy]) -> Authz {
        let defs: Vec<Arc<PolicyDef>> = policies
            .iter()
            .map(|p| Arc::new(PolicyDef::from_proto(p).unwrap()))
            .collect();
        Authz::compile(&defs, "payment-0", "shop", &Metrics::new())
    }

    fn peer(principal: &str) -> PeerIdentity {
        let ns = principal.split('/').nth(2).unwrap_or_default();
        PeerIdentity {
            id: format!("spiffe://{principal}").into(),
            principal: principal.into(),
            namespace: ns.into(),
            version: "TLSv1_3",
            cipher: "TLS13_AES_128_GCM_SHA256",
        }
    }

    const ORDERS: &str = "cluster.local/ns/shop/sa/orders";
    const WEB: &str = "cluster.local/ns/web/sa/frontend";

    fn get<'a>(peer: Option<&'a PeerIdentity>, port: u16, path: &'static str) -> Attrs<'a> {
        Attrs::http(peer, port, "GET", path)
    }

    #[test]
    fn no_policy_decides_nothing_and_permits_everything() {
        let a = compile(&[]);
        let d = a.authorize(&Attrs::tcp(None, 80));
        assert_eq!(
            (d.verdict, d.label(), d.allowed()),
            (Verdict::NoPolicy, "", true)
        );
        assert!(a.is_open());
        assert_eq!(a.mtls_mode(80), Mtls::Permissive);
    }

    #[test]
    fn deny_is_evaluated_before_allow_and_an_allow_policy_denies_the_rest() {
        let orders = peer(ORDERS);
        let web = peer(WEB);
        let a = compile(&[
            authz(
                "allow-orders",
                "shop",
                A::Allow,
                vec![rule(vec![principals(&[ORDERS])], vec![])],
            ),
            authz(
                "deny-admin",
                "shop",
                A::Deny,
                vec![rule(vec![], vec![paths(&["/admin/*"])])],
            ),
        ]);
        let d = a.authorize(&get(Some(&orders), 8080, "/charge"));
        assert_eq!(
            (d.label(), d.policy.as_deref()),
            ("allow", Some("shop/allow-orders"))
        );
        // DENY first, even for a caller an ALLOW policy allows.
        let d = a.authorize(&get(Some(&orders), 8080, "/admin/users"));
        assert_eq!(
            (d.label(), d.policy.as_deref()),
            ("deny", Some("shop/deny-admin"))
        );
        assert_eq!(d.message(), "RBAC: access denied by policy shop/deny-admin");
        // Once an ALLOW policy applies, what it does not allow is denied, and the answer
        // names it.
        let d = a.authorize(&get(Some(&web), 8080, "/charge"));
        assert_eq!((d.label(), d.by_default), ("deny", true));
        assert_eq!(
            d.message(),
            "RBAC: access denied: not allowed by policy shop/allow-orders"
        );
    }

    #[test]
    fn only_deny_policies_allow_what_they_do_not_match() {
        let a = compile(&[authz(
            "deny-admin",
            "shop",
            A::Deny,
            vec![rule(vec![], vec![paths(&["/admin"])])],
        )]);
        let d = a.authorize(&get(None, 80, "/x"));
        assert_eq!((d.label(), d.policy.clone()), ("allow", None));
        assert!(!a.authorize(&get(None, 80, "/admin")).allowed());
    }

    #[test]
    fn a_policy_without_rules_matches_nothing_and_an_empty_rule_everything() {
        let a = compile(&[authz("nothing", "shop", A::Allow, vec![])]);
        assert!(!a.authorize(&get(Some(&peer(ORDERS)), 80, "/")).allowed());
        assert!(!a.authorize(&Attrs::tcp(None, 80)).allowed());
        let a = compile(&[authz("deny-none", "shop", A::Deny, vec![])]);
        assert!(a.authorize(&Attrs::tcp(None, 80)).allowed());
        let a = compile(&[authz("all", "shop", A::Allow, vec![rule(vec![], vec![])])]);
        assert!(a.authorize(&Attrs::tcp(None, 80)).allowed());
        // Several ALLOW policies, none matching: the answer names them all.
        let a = compile(&[
            authz("a", "shop", A::Allow, vec![]),
            authz("b", "shop", A::Allow, vec![]),
        ]);
        let d = a.authorize(&Attrs::tcp(None, 80));
        assert_eq!(d.policy.as_deref(), Some("shop/a,shop/b"));
        assert_eq!(
            d.message(),
            "RBAC: access denied: not allowed by any of the policies shop/a, shop/b"
        );
    }

    #[test]
    fn any_from_and_any_to_entry_and_every_field_of_an_entry() {
        let op = v1::AuthorizationOperation {
            ports: vec![9090],
            methods: vec!["POST".into()],
            paths: vec!["/charge".into(), "/api/*".into()],
            ..Default::default()
        };
        let a = compile(&[authz(
            "p",
            "shop",
            A::Allow,
            vec![rule(
                vec![
                    principals(&["cluster.local/ns/other/sa/x"]),
                    principals(&[ORDERS]),
                ],
                vec![ports(&[1]), op],
            )],
        )]);
        let orders = peer(ORDERS);
        let post = |port, path| Attrs::http(Some(&orders), port, "POST", path);
        assert!(a.authorize(&post(9090, "/charge")).allowed());
        assert!(a.authorize(&post(9090, "/api/v1/pay")).allowed());
        assert!(
            a.authorize(&post(1, "/anything")).allowed(),
            "the other `to` entry"
        );
        assert!(!a.authorize(&post(9090, "/refund")).allowed(), "path");
        assert!(!a.authorize(&post(8080, "/charge")).allowed(), "port");
        assert!(
            !a.authorize(&Attrs::http(Some(&orders), 9090, "GET", "/charge"))
                .allowed(),
            "method"
        );
        let web = peer(WEB);
        assert!(
            !a.authorize(&Attrs::http(Some(&web), 9090, "POST", "/charge"))
                .allowed(),
            "principal"
        );
    }

    #[test]
    fn principals_and_namespaces_with_wildcards_and_their_negations() {
        let src = v1::AuthorizationSource {
            principals: vec!["cluster.local/ns/shop/sa/*".into(), "*/sa/frontend".into()],
            not_principals: vec!["cluster.local/ns/shop/sa/intruder".into()],
            namespaces: vec!["shop".into(), "we*".into()],
            not_namespaces: vec!["*-dev".into()],
        };
        let a = compile(&[authz("p", "shop", A::Allow, vec![rule(vec![src], vec![])])]);
        let ok = |p: &str| a.authorize(&Attrs::tcp(Some(&peer(p)), 80)).allowed();
        assert!(ok(ORDERS));
        assert!(ok(WEB));
        assert!(!ok("cluster.local/ns/shop/sa/intruder"), "notPrincipals");
        assert!(!ok("cluster.local/ns/other/sa/orders"), "principals");
        assert!(!ok("cluster.local/ns/web-dev/sa/frontend"), "notNamespaces");
        // A plaintext peer has neither: it cannot match principals or namespaces.
        assert!(!a.authorize(&Attrs::tcp(None, 80)).allowed());

        // ... but it does match their negations (`notPrincipals: ["*"]` is "no identity").
        let a = compile(&[authz(
            "deny-plaintext",
            "shop",
            A::Deny,
            vec![rule(
                vec![v1::AuthorizationSource {
                    not_principals: vec!["*".into()],
                    ..Default::default()
                }],
                vec![],
            )],
        )]);
        assert!(!a.authorize(&Attrs::tcp(None, 80)).allowed());
        assert!(a.authorize(&Attrs::tcp(Some(&peer(ORDERS)), 80)).allowed());
        // The `spiffe://` form is the same principal.
        let a = compile(&[authz(
            "p",
            "shop",
            A::Allow,
            vec![rule(
                vec![principals(&["spiffe://cluster.local/ns/shop/sa/orders"])],
                vec![],
            )],
        )]);
        assert!(a.authorize(&Attrs::tcp(Some(&peer(ORDERS)), 80)).allowed());
    }

    #[test]
    fn not_ports_not_methods_and_not_paths() {
        let op = v1::AuthorizationOperation {
            not_ports: vec![15000],
            not_methods: vec!["DELETE".into()],
            not_paths: vec!["/private*".into()],
            ..Default::default()
        };
        let a = compile(&[authz("p", "shop", A::Allow, vec![rule(vec![], vec![op])])]);
        assert!(a.authorize(&get(None, 80, "/public")).allowed());
        assert!(!a.authorize(&get(None, 15000, "/public")).allowed());
        assert!(!a
            .authorize(&Attrs::http(None, 80, "DELETE", "/public"))
            .allowed());
        assert!(!a.authorize(&get(None, 80, "/private/x")).allowed());
    }

    #[test]
    fn tcp_cannot_match_http_fields_in_allow_and_deny_ignores_them() {
        // ALLOW port 9090 for GET: a TCP connection to 9090 is not allowed by it.
        let get_9090 = v1::AuthorizationOperation {
            ports: vec![9090],
            methods: vec!["GET".into()],
            ..Default::default()
        };
        let a = compile(&[authz(
            "p",
            "shop",
            A::Allow,
            vec![rule(vec![], vec![get_9090.clone()])],
        )]);
        assert!(!a.authorize(&Attrs::tcp(None, 9090)).allowed());
        assert!(a.authorize(&get(None, 9090, "/")).allowed());
        // The same as a DENY: a TCP connection to 9090 is denied (the method cannot be
        // checked, so it counts as matching), other ports are not.
        let a = compile(&[authz(
            "p",
            "shop",
            A::Deny,
            vec![rule(vec![], vec![get_9090])],
        )]);
        assert!(!a.authorize(&Attrs::tcp(None, 9090)).allowed());
        assert!(a.authorize(&Attrs::tcp(None, 9091)).allowed());
        assert!(a.authorize(&Attrs::http(None, 9090, "POST", "/")).allowed());
        // Ports alone are TCP's as much as HTTP's.
        let a = compile(&[authz(
            "p",
            "shop",
            A::Deny,
            vec![rule(vec![], vec![ports(&[7000])])],
        )]);
        assert!(!a.authorize(&Attrs::tcp(None, 7000)).allowed());
        assert!(a.authorize(&Attrs::tcp(None, 7001)).allowed());
    }

    #[test]
    fn policies_apply_by_namespace_selection_or_from_the_root_namespace() {
        let mut selected = authz("selected", "shop", A::Deny, vec![rule(vec![], vec![])]);
        selected.all_workloads = false;
        selected.workloads = vec!["payment-0".into()];
        let mut other_pod = selected.clone();
        other_pod.name = "other-pod".into();
        other_pod.workloads = vec!["payment-1".into()];
        let mut mesh_selector = authz("root-selected", ROOT_NAMESPACE, A::Deny, vec![]);
        mesh_selector.all_workloads = false;
        mesh_selector.workloads = vec!["payment-0".into()];
        let a = compile(&[
            selected,
            other_pod,
            authz("ns", "shop", A::Deny, vec![]),
            authz("mesh", ROOT_NAMESPACE, A::Deny, vec![]),
            mesh_selector,
            authz("elsewhere", "web", A::Deny, vec![]),
        ]);
        let names: Vec<(String, String)> = a.dump()["deny"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().into(),
                    v["level"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("shop/selected".into(), "workload".into()),
                ("shop/ns".into(), "namespace".into()),
                ("muon-system/mesh".into(), "mesh".into()),
            ]
        );
    }

    fn peer_authn(
        name: &str,
        ns: &str,
        mode: v1::MtlsMode,
        ports: &[(u32, v1::MtlsMode)],
        pods: Option<&[&str]>,
    ) -> v1::Policy {
        v1::Policy {
            name: name.into(),
            namespace: ns.into(),
            kind: Some(v1::policy::Kind::PeerAuthentication(
                v1::PeerAuthentication {
                    selector: None,
                    mode: mode.into(),
                    port_level_mtls: ports.iter().map(|(p, m)| (*p, i32::from(*m))).collect(),
                },
            )),
            workloads: pods
                .unwrap_or_default()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            all_workloads: pods.is_none(),
        }
    }

    #[test]
    fn mtls_mode_the_most_specific_level_wins_port_level_first_unset_inherits() {
        use v1::MtlsMode::{Permissive as P, Strict as S, Unset as U};
        // Nothing: PERMISSIVE.
        assert_eq!(compile(&[]).mtls_mode(9090), Mtls::Permissive);
        // The mesh says STRICT; the namespace leaves it unset but opens 8080; the workload
        // opens 9090 only, and says nothing else.
        let a = compile(&[
            peer_authn("mesh", ROOT_NAMESPACE, S, &[], None),
            peer_authn("ns", "shop", U, &[(8080, P)], None),
            peer_authn(
                "wl",
                "shop",
                U,
                &[(9090, P), (7070, U)],
                Some(&["payment-0"]),
            ),
        ]);
        assert_eq!(a.mtls_mode(9090), Mtls::Permissive, "workload port level");
        assert_eq!(a.mtls_mode(8080), Mtls::Permissive, "namespace port level");
        assert_eq!(a.mtls_mode(7070), Mtls::Strict, "UNSET inherits the mesh's");
        assert_eq!(a.mtls_mode(1), Mtls::Strict, "the mesh's mode");
        // The workload's own mode beats the namespace's port level.
        let a = compile(&[
            peer_authn("ns", "shop", P, &[(8080, S)], None),
            peer_authn("wl", "shop", S, &[], Some(&["payment-0"])),
        ]);
        assert_eq!(a.mtls_mode(8080), Mtls::Strict);
        assert_eq!(a.mtls_mode(1), Mtls::Strict);
        let a = compile(&[
            peer_authn("ns", "shop", S, &[], None),
            peer_authn("wl", "shop", P, &[], Some(&["payment-0"])),
            // Selects another pod: not this one's.
            peer_authn("other", "shop", S, &[(1, S)], Some(&["payment-1"])),
        ]);
        assert_eq!(a.mtls_mode(1), Mtls::Permissive);
        // Two at one level: the first by name.
        let a = compile(&[
            peer_authn("a", "shop", S, &[], None),
            peer_authn("b", "shop", P, &[], None),
        ]);
        assert_eq!(a.mtls_mode(1), Mtls::Strict);
        assert_eq!(a.dump()["mtls"]["default"], "STRICT");
    }

    #[test]
    fn received_policies_are_checked_as_the_control_plane_checks_them() {
        let bad = |p: v1::Policy| PolicyDef::from_proto(&p).unwrap_err();
        let e = bad(authz(
            "p",
            "shop",
            A::Allow,
            vec![rule(vec![principals(&["orders"])], vec![])],
        ));
        assert!(
            e.starts_with("rules[0].from[0].principals[0]: \"orders\" is not a principal"),
            "{e}"
        );
        let e = bad(authz(
            "p",
            "shop",
            A::Allow,
            vec![rule(vec![], vec![ports(&[0])])],
        ));
        assert!(
            e.contains("rules[0].to[0].ports[0]: must be a port number"),
            "{e}"
        );
        let e = bad(authz(
            "p",
            "shop",
            A::Allow,
            vec![rule(vec![], vec![paths(&["/a*b"])])],
        ));
        assert!(e.contains("rules[0].to[0].paths[0]"), "{e}");
        let mut p = authz("p", "shop", A::Allow, vec![]);
        p.kind = None;
        assert!(bad(p).contains("neither"));
        let mut p = authz("p", "shop", A::Allow, vec![]);
        if let Some(v1::policy::Kind::Authorization(a)) = &mut p.kind {
            a.action = 7;
        }
        assert!(bad(p).contains("unknown action 7"));
        let e = bad(peer_authn(
            "p",
            "shop",
            v1::MtlsMode::Strict,
            &[(70000, v1::MtlsMode::Strict)],
            None,
        ));
        assert!(e.contains("portLevelMtls[70000]"), "{e}");
    }

    #[test]
    fn decisions_are_counted_and_rechecks_count_only_denials() {
        let metrics = Metrics::new();
        let defs = [Arc::new(
            PolicyDef::from_proto(&authz(
                "deny-7000",
                "shop",
                A::Deny,
                vec![rule(vec![], vec![ports(&[7000])])],
            ))
            .unwrap(),
        )];
        let a = Authz::compile(&defs, "payment-0", "shop", &metrics);
        a.authorize(&Attrs::tcp(None, 7000));
        a.authorize(&Attrs::tcp(None, 80));
        a.recheck(&Attrs::tcp(None, 80));
        a.recheck(&Attrs::tcp(None, 7000));
        let text = metrics.encode();
        for want in [
            r#"muon_authz_decisions_total{direction="inbound",decision="deny",policy="shop/deny-7000"} 2"#,
            r#"muon_authz_decisions_total{direction="inbound",decision="allow",policy=""} 1"#,
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        // The same policies compiled again are the same policies.
        let b = Authz::compile(&defs, "payment-0", "shop", &metrics);
        assert!(a.same_policies(&b));
        assert!(!a.same_policies(&Authz::default()));
    }
}
